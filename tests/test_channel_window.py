"""The session channel window each client gets (server.channel_window): OpenSSH's 2 MiB for stock
clients, 8 MiB for asyncssh-based ones that pipeline into it. Seen from the clients themselves:
the stock ssh client's own debug output, asyncssh's channel log."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil

import asyncssh
import pytest

from sshfiles.server import MAX_PACKET, PIPELINING_WINDOW, WINDOW, channel_window
from tests.conftest import ServerHandle


@pytest.mark.parametrize("version, window", [
    ("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3", WINDOW),
    ("SSH-2.0-PuTTY_Release_0.78", WINDOW),
    ("SSH-2.0-paramiko_3.4.0", WINDOW),
    ("SSH-2.0-libssh_0.10.4", WINDOW),
    ("SSH-2.0-Go", WINDOW),
    ("SSH-2.0-AsyncSSH_2.24.1", PIPELINING_WINDOW),
    ("SSH-2.0-", WINDOW),
    ("garbage", WINDOW),
    ("SSH-2.0-OpenSSH_9.2 AsyncSSH_2.24.1", WINDOW),  # only the software name's start counts
])
def test_the_window_follows_the_client_software(version: str, window: int) -> None:
    assert channel_window(version) == window


def test_the_stock_openssh_client_is_offered_openssh_s_window(server: ServerHandle) -> None:
    """Offered more, OpenSSH's client buffers it all itself and spends several times the CPU
    (channel_window's docstring): its own debug output shows what it was offered."""
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    user = server.add_user("stock", password=None, key=True)
    res = server.openssh("ssh", user, ["-vv", f"{user.name}@{server.host}", "sha256sum", "/dev/null"])
    # e.g. "debug2: channel 0: open confirm rwindow 2097152 rmax 262144"
    offered = re.findall(r"open confirm rwindow (\d+) rmax (\d+)", res.stderr)
    assert offered == [(str(WINDOW), str(MAX_PACKET))], res.stderr[-3000:]


def test_an_asyncssh_client_is_offered_the_pipelining_window(server: ServerHandle,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    user = server.add_user("piped", password=None, key=True)

    async def scenario() -> None:
        async with server.connect(user) as conn, conn.start_sftp_client() as sftp:
            await sftp.stat(".")

    asyncssh.set_debug_level(2)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            asyncio.run(scenario())
    finally:
        asyncssh.set_debug_level(1)
    sends = re.findall(r"Initial send window (\d+), packet size (\d+)", caplog.text)
    assert sends == [(str(PIPELINING_WINDOW), str(MAX_PACKET))], caplog.text[-3000:]
