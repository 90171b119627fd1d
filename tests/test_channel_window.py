"""The session channel window and packet size each client gets (server.channel_sizes): OpenSSH's
2 MiB and 256 KiB for stock clients; 8 MiB, and room for a whole 256 KiB WRITE in one packet, for
asyncssh-based ones that pipeline into it. Seen from the clients themselves: the stock ssh client's
own debug output, asyncssh's channel and packet logs."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections.abc import Coroutine
from typing import Any

import asyncssh
import pytest

from sshfiles.asyncssh_seam import request_read, request_write
from sshfiles.client.connect import ConnectOptions, connect
from sshfiles.server import MAX_PACKET, PIPELINING_MAX_PACKET, PIPELINING_WINDOW, WINDOW, channel_sizes
from tests.conftest import ServerHandle


def _run_with_asyncssh_log(scenario: Coroutine[Any, Any, None], level: int,
                           caplog: pytest.LogCaptureFixture) -> None:
    """Run a client scenario with asyncssh's debug log at `level` captured (2: channels, 3: packets)."""
    asyncssh.set_debug_level(level)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            asyncio.run(scenario)
    finally:
        asyncssh.set_debug_level(1)


STOCK = (WINDOW, MAX_PACKET)
PIPELINING = (PIPELINING_WINDOW, PIPELINING_MAX_PACKET)


@pytest.mark.parametrize("version, sizes", [
    ("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3", STOCK),
    ("SSH-2.0-PuTTY_Release_0.78", STOCK),
    ("SSH-2.0-paramiko_3.4.0", STOCK),
    ("SSH-2.0-libssh_0.10.4", STOCK),
    ("SSH-2.0-Go", STOCK),
    ("SSH-2.0-AsyncSSH_2.24.1", PIPELINING),
    ("SSH-2.0-", STOCK),
    ("garbage", STOCK),
    ("SSH-2.0-OpenSSH_9.2 AsyncSSH_2.24.1", STOCK),  # only the software name's start counts
])
def test_the_sizes_follow_the_client_software(version: str, sizes: tuple[int, int]) -> None:
    assert channel_sizes(version) == sizes


def test_the_stock_openssh_client_is_offered_openssh_s_window(server: ServerHandle) -> None:
    """Offered more, OpenSSH's client buffers it all itself and spends several times the CPU
    (channel_sizes' docstring): its own debug output shows what it was offered."""
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

    _run_with_asyncssh_log(scenario(), 2, caplog)
    sends = re.findall(r"Initial send window (\d+), packet size (\d+)", caplog.text)
    assert sends == [(str(PIPELINING_WINDOW), str(PIPELINING_MAX_PACKET))], caplog.text[-3000:]


def test_sshfiles_cli_moves_a_256_kib_write_and_read_reply_in_one_packet_each(
        server: ServerHandle, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """With 256 KiB channel packets each 256 KiB request or reply went as a full packet plus one
    for its 13-byte SFTP header: twice the per-packet work on both ends. asyncssh's packet log
    (debug level 3) shows every channel data packet's size."""
    user = server.add_user("onepacket", password=None, key=True)
    data = bytes(range(256)) * 1024  # 256 KiB

    async def scenario() -> None:
        opts = ConnectOptions(host=server.host, port=server.port, user=user.name,
                              identities=[str(user.key_path)], known_hosts=tmp_path / "known_hosts",
                              notify=lambda line: None)
        conn = await connect(opts)
        try:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open("big.bin", "wb") as f:
                    caplog.clear()
                    await request_write(sftp, f.handle, 0, data)
                    written = list(caplog.messages)
                async with sftp.open("big.bin", "rb") as f:
                    caplog.clear()
                    assert await request_read(sftp, f.handle, 0, len(data)) == data
                    read = list(caplog.messages)
        finally:
            conn.close()
            await conn.wait_closed()

        def sizes(lines: list[str], direction: str) -> list[int]:
            return [int(m) for line in lines
                    for m in re.findall(rf"\b{direction} MSG_CHANNEL_DATA \(94\), (\d+) bytes", line)]
        assert len(sizes(written, "Sent")) == 1 and sizes(written, "Sent")[0] > len(data), written
        assert len(sizes(read, "Received")) == 1 and sizes(read, "Received")[0] > len(data), read

    _run_with_asyncssh_log(scenario(), 3, caplog)
    assert (server.homes_dir / user.name / "big.bin").read_bytes() == data
