"""SIGHUP reloads the config and host keys without dropping sessions, and says what it changed.

The admin's way: edit the TOML file the server was started with, `kill -HUP` it, read the log.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import asyncssh
import pytest
from conftest import ServerHandle, make_server


def _wait_log(server: ServerHandle, pattern: str, count: int = 1, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = re.findall(pattern, server.log())
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"{pattern!r} x{count} not in log:\n{server.log()}"
            return found
        time.sleep(0.05)


def _hup(server: ServerHandle) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGHUP)


async def _channels(server: ServerHandle, user, n: int) -> int:
    """How many SFTP channels one new connection may open (stops at the first refusal)."""
    async with server.connect(user) as conn:
        clients = []
        try:
            for _ in range(n):
                try:
                    clients.append(await conn.start_sftp_client())
                except asyncssh.ChannelOpenError:
                    break
            return len(clients)
        finally:
            for c in clients:
                c.exit()


@pytest.fixture
def toml_server(tmp_path: Path, host_keys_dir: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = tmp_path / "sshfiles.toml"
    cfg.write_text("max_channels_per_connection = 2\nworkers = 1\n")
    monkeypatch.setenv("SSHFILES_CONFIG", str(cfg))
    h = make_server(tmp_path, host_keys_dir)
    h.workers = None  # from the file, so that a reload can try to change it
    h.start()
    try:
        yield h, cfg
    finally:
        h.stop()


def test_sighup_applies_new_limits_to_new_sessions_and_keeps_live_ones(toml_server) -> None:
    server, cfg = toml_server
    user = server.add_user("alice")

    async def scenario() -> None:
        async with server.connect(user) as live:
            a = await live.start_sftp_client()
            b = await live.start_sftp_client()  # two channels: allowed by the config at start
            cfg.write_text("max_channels_per_connection = 1\nworkers = 3\n")  # workers: restart only
            await asyncio.to_thread(_hup, server)
            line = await asyncio.to_thread(_wait_log, server, r"SIGHUP: reloaded: [^\n]*")
            assert "max_channels_per_connection 2 -> 1" in line[0]
            assert "needs a restart, not applied: workers" in line[0]
            assert await a.exists(".") and await b.exists(".")  # the live session survived, both channels
            assert await _channels(server, user, 3) == 1        # a new one gets the new limit

            cfg.write_text('max_channels_per_connection = "many"\n')  # a bad edit
            await asyncio.to_thread(_hup, server)
            bad = await asyncio.to_thread(_wait_log, server, r"SIGHUP: config not reloaded, keeping the running "
                                          r"one: [^\n]*")
            assert "max_channels_per_connection" in bad[0] and "\n" not in bad[0]
            assert await _channels(server, user, 3) == 1        # the last good config still holds
            assert await a.exists(".")
            a.exit()
            b.exit()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert server.proc is not None and server.proc.poll() is None
    assert "Traceback" not in server.log()


def test_sighup_reloads_host_keys_for_new_connections(toml_server) -> None:
    server, _ = toml_server
    user = server.add_user("bob")

    async def scenario() -> None:
        ed25519 = {"server_host_key_algs": ["ssh-ed25519"]}
        async with server.connect(user, **ed25519) as live, live.start_sftp_client() as sftp:
            old = live.get_server_host_key().get_fingerprint("sha256")
            for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
                (server.keys_dir / name).unlink()  # the admin rotates the ed25519 key
            await asyncio.to_thread(_hup, server)
            line = (await asyncio.to_thread(_wait_log, server, r"SIGHUP: reloaded: [^\n]*"))[0]
            assert "host keys" in line
            async with server.connect(user, **ed25519) as fresh:
                new = fresh.get_server_host_key().get_fingerprint("sha256")
            assert new != old and new in line
            assert await sftp.exists(".")  # the live connection kept its session and its key

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_supervisor_forwards_sighup_to_every_worker(tmp_path: Path, host_keys_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "sshfiles.toml"
    cfg.write_text("idle_timeout = 600\n")
    monkeypatch.setenv("SSHFILES_CONFIG", str(cfg))
    server = make_server(tmp_path, host_keys_dir, ("--workers", "2"))
    server.start()
    try:
        cfg.write_text("idle_timeout = 300\n")
        _hup(server)
        lines = _wait_log(server, r"\[(\d+)\]: SIGHUP: reloaded: idle_timeout 600.0 -> 300.0", count=2)
        assert len(set(lines)) == 2  # one line per worker, each its own pid
        _wait_log(server, r"SIGHUP: forwarding to 2 workers")
    finally:
        server.stop()
