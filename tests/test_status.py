"""`sshfiles status` shows who is connected, from where, on which worker, doing what; `sshfiles kick USER`
ends that user's sessions on every worker within about a second, and nobody else's.

A real `serve --workers 2`, real asyncssh clients from distinct loopback sources, the real CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

from conftest import ServerHandle


def _status(server: ServerHandle) -> list[dict]:
    res = server.cli("status", "--json")
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


async def _until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(pred):
            return True
        await asyncio.sleep(0.1)
    return await asyncio.to_thread(pred)


def _login_of(server: ServerHandle, user: str, addr: str) -> tuple[int, str]:
    """(worker pid, conn id) of `user`'s login from `addr`, as the log says."""
    m = re.search(rf"\[(\d+)\]: login user={user} source={re.escape(addr)}:\d+ method=password result=ok "
                  r"conn=(\w+)", server.log())
    assert m, server.log()
    return int(m.group(1)), m.group(2)


def test_status_and_kick_across_workers(workers_server: ServerHandle) -> None:
    server = workers_server
    alice = server.add_user("alice")
    bob = server.add_user("bob")

    async def scenario() -> None:
        a1 = await server.connect(alice, local_addr=("127.0.0.2", 0))
        a2 = await server.connect(alice, local_addr=("127.0.0.3", 0))
        b1 = await server.connect(bob, local_addr=("127.0.0.4", 0))
        try:
            sftp = await a1.start_sftp_client()
            up = await sftp.open("up\nload.bin", "wb")     # a name with a newline: escaped on display
            await up.write(b"u" * 102_400)
            bob_sftp = await b1.start_sftp_client()
            assert await _until(lambda: len(_status(server)) == 3
                                and any("upload" in r["doing"] for r in _status(server)))
            rows = {r["source"].rsplit(":", 1)[0]: r for r in _status(server)}
            for addr, user in (("127.0.0.2", "alice"), ("127.0.0.3", "alice"), ("127.0.0.4", "bob")):
                pid, conn = _login_of(server, user, addr)
                assert rows[addr]["user"] == user and rows[addr]["pid"] == pid and rows[addr]["conn"] == conn
                assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", rows[addr]["since"])
            assert rows["127.0.0.2"]["doing"] == "upload /up\\nload.bin 100.0 KiB"
            assert rows["127.0.0.3"]["doing"] == "" and rows["127.0.0.4"]["doing"] == ""
            text = server.cli("status").stdout
            assert text.splitlines()[0].split() == ["USER", "SOURCE", "CONN", "PID", "SINCE", "DOING"]
            assert "upload /up\\nload.bin 100.0 KiB" in text and "\nload.bin" not in text

            out = (await asyncio.to_thread(server.cli, "kick", "alice")).stdout
            assert out.strip() == "kicked alice: 2 sessions will end within about a second"
            start = time.monotonic()
            await asyncio.wait_for(asyncio.gather(a1.wait_closed(), a2.wait_closed()), 5)
            assert time.monotonic() - start < 3.5  # the watcher looks every second, on each worker
            assert await bob_sftp.exists(".")    # nobody else's sessions
            assert await _until(lambda: [r["user"] for r in _status(server)] == ["bob"], 5)
            async with server.connect(alice, local_addr=("127.0.0.2", 0)):  # kicked, not banned
                pass

            # a worker that dies takes its rows with it (not listed; reconciled by the supervisor)
            bob_pid, _ = _login_of(server, "bob", "127.0.0.4")
            os.kill(bob_pid, signal.SIGKILL)
            assert await _until(lambda: all(r["pid"] != bob_pid for r in _status(server)), 5)
        finally:
            for c in (a1, a2, b1):
                c.close()

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_kick_of_an_unknown_user_is_one_line_exit_1(server: ServerHandle) -> None:
    res = server.cli("kick", "nobody", check=False)
    assert res.returncode == 1 and "no such user: nobody" in res.stderr and "Traceback" not in res.stderr
    assert server.cli("status").stdout.strip() == "no sessions"


def test_status_rows_leave_with_the_connection(server: ServerHandle) -> None:
    user = server.add_user("carol")

    async def scenario() -> None:
        async with server.connect(user):
            assert await _until(lambda: [r["user"] for r in _status(server)] == ["carol"], 5)
        assert await _until(lambda: _status(server) == [], 5)

    asyncio.run(asyncio.wait_for(scenario(), 30))
