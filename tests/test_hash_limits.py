"""Hashing under attack (Hardening II, item 14), against a real `sshfiles serve` and real clients.

A sparse file costs nothing on disk but every hole byte costs CPU to hash, so: a request over the cap
is refused at once with one clear line; a hash stops when its client goes away; one user's flood of
huge hashes never makes another user's small hash wait. The server's CPU is read from /proc, the only
honest witness that a worker thread really stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import asyncssh
import pytest

from sshfiles import checkfile
from sshfiles.asyncssh_seam import extended_request
from sshfiles.hashing import MAX_HASH_BYTES

TiB = 1 << 40
GiB = 1 << 30
# Under the cap, yet minutes of SHA-256 (holes read as zeros at ~1-2 GB/s per core).
LONG = MAX_HASH_BYTES - GiB
HUGE = 4 * TiB  # over the cap (ext4 stops at 16 TiB - 4 KiB per file)


def run(coro):
    return asyncio.run(coro)


def sparse(path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the server process, all threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_growth(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


async def check_file(sftp: asyncssh.SFTPClient, path: str, alg: str = "sha256", offset: int = 0,
                     length: int = 0, block: int = 0) -> tuple[str, list[bytes]]:
    body = await extended_request(sftp, checkfile.CHECK_FILE_NAME,
                                  checkfile.encode_request(path.encode(), alg, offset, length, block))
    return checkfile.decode_reply(body)


# -- the cap ---------------------------------------------------------------------------------------


def test_sum_over_the_cap_is_refused_with_one_clear_line(server):
    user = server.add_user("capped")
    sparse(user.home / "huge.img", HUGE)
    (user.home / "small.txt").write_bytes(b"hello\n")

    async def go():
        async with server.connect(user) as conn:
            t0 = time.monotonic()
            r = await conn.run("sha256sum huge.img small.txt", stdin=asyncssh.DEVNULL, check=False)
            return r, time.monotonic() - t0

    r, took = run(go())
    assert took < 5
    assert r.exit_status == 1
    assert r.stderr == "sha256sum: huge.img: file too large to hash here (limit 64 GiB)\n"
    digest = hashlib.sha256(b"hello\n").hexdigest()
    assert r.stdout == f"{digest}  small.txt\n"  # the next file is still hashed
    assert str(server.homes_dir) not in r.stderr


def test_sum_over_the_cap_with_openssh(server):
    user = server.add_user("capssh", key=True)
    sparse(user.home / "huge.img", HUGE)
    r = server.openssh("ssh", user, [f"{user.name}@{server.host}", "md5sum huge.img"], timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["md5sum: huge.img: file too large to hash here (limit 64 GiB)"]


def test_check_file_over_the_cap_is_refused_and_a_range_is_not(server):
    user = server.add_user("capcf")
    sparse(user.home / "huge.img", HUGE)

    async def go():
        async with server.sftp(user) as sftp:
            with pytest.raises(asyncssh.SFTPFailure) as err:
                await check_file(sftp, "huge.img")
            assert "file too large to hash here (limit 64 GiB)" in err.value.reason
            assert "\n" not in err.value.reason and "/tmp" not in err.value.reason
            with pytest.raises(asyncssh.SFTPFailure):   # per-block digests count the whole range too
                await check_file(sftp, "huge.img", length=MAX_HASH_BYTES + 1, block=1 << 30)
            # a range under the cap, far into the holes, is answered
            alg, digests = await check_file(sftp, "huge.img", offset=2 * TiB, length=1 << 20)
            assert (alg, digests) == ("sha256", [hashlib.sha256(bytes(1 << 20)).digest()])
    run(go())


# -- a client that leaves stops its hash -----------------------------------------------------------


def test_exec_hash_stops_when_the_client_disconnects(server):
    user = server.add_user("leaver")
    sparse(user.home / "long.img", LONG)
    assert server.proc is not None
    pid = server.proc.pid

    async def go():
        conn = await server.connect(user)
        procs = [await conn.create_process("sha256sum long.img", stdin=asyncssh.DEVNULL) for _ in range(3)]
        await asyncio.sleep(1.5)
        busy = cpu_seconds(pid)
        await asyncio.sleep(2.0)
        assert cpu_seconds(pid) - busy > 0.3, "the hashes should be running"
        conn.abort()  # the client vanishes mid-hash
        del procs
    run(go())
    time.sleep(1.0)  # within one slice per job the threads stop
    growth = cpu_growth(pid, 3.0)
    assert growth < 0.3, f"server still burning CPU after the client left: {growth:.2f}s in 3s"


def test_check_file_stops_when_the_client_disconnects(server):
    user = server.add_user("leavercf")
    sparse(user.home / "long.img", LONG)
    assert server.proc is not None
    pid = server.proc.pid

    async def go():
        conn = await server.connect(user)
        sftps = [await conn.start_sftp_client() for _ in range(6)]  # 6 requests, as in the report
        tasks = [asyncio.ensure_future(check_file(s, "long.img")) for s in sftps]
        await asyncio.sleep(1.5)
        busy = cpu_seconds(pid)
        await asyncio.sleep(2.0)
        assert cpu_seconds(pid) - busy > 0.3, "the hashes should be running"
        conn.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
    run(go())
    time.sleep(1.0)
    growth = cpu_growth(pid, 3.0)
    assert growth < 0.3, f"server still burning CPU after the client left: {growth:.2f}s in 3s"


# -- fairness: another user's small hash is never stuck behind a flood ----------------------------


def test_small_hash_of_a_bystander_is_prompt_while_another_user_floods(server):
    attacker = server.add_user("flooder")
    bystander = server.add_user("bystander")
    sparse(attacker.home / "long.img", LONG)
    data = os.urandom(4096)
    (bystander.home / "small.bin").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()

    async def go():
        conn = await server.connect(attacker)
        try:
            sftps = [await conn.start_sftp_client() for _ in range(6)]
            flood = [asyncio.ensure_future(check_file(s, "long.img")) for s in sftps]
            flood += [asyncio.ensure_future(conn.run("sha256sum long.img", stdin=asyncssh.DEVNULL, check=False))
                      for _ in range(6)]
            await asyncio.sleep(1.5)  # every worker thread is busy with the attacker's hashes
            times = []
            async with server.connect(bystander) as bconn, bconn.start_sftp_client() as bsftp:
                for _ in range(3):
                    t0 = time.monotonic()
                    r = await bconn.run("sha256sum small.bin", stdin=asyncssh.DEVNULL, check=False)
                    times.append(time.monotonic() - t0)
                    assert (r.exit_status, r.stdout) == (0, f"{want}  small.bin\n")
                    t0 = time.monotonic()
                    assert await check_file(bsftp, "small.bin") == ("sha256", [bytes.fromhex(want)])
                    times.append(time.monotonic() - t0)
            return times
        finally:
            conn.abort()
            await asyncio.gather(*flood, return_exceptions=True)

    times = run(go())
    assert max(times) < 2.0, times


def test_one_user_waiting_hashes_are_bounded(server):
    """A user past PER_OWNER_ACTIVE + PER_OWNER_WAITING requests is told so; others are unaffected."""
    from sshfiles.hashing import PER_OWNER_ACTIVE, PER_OWNER_WAITING

    user = server.add_user("greedy")
    sparse(user.home / "long.img", LONG)

    async def go():
        n = PER_OWNER_ACTIVE + PER_OWNER_WAITING + 3
        # spread over connections: each allows only --max-channels-per-connection (10) channels
        conns = [await server.connect(user) for _ in range((n + 7) // 8)]
        procs: list[asyncio.Future[asyncssh.SSHCompletedProcess]] = []
        try:
            procs = [asyncio.ensure_future(conns[i // 8].run("md5sum long.img", stdin=asyncssh.DEVNULL,
                                                             check=False)) for i in range(n)]
            done, _ = await asyncio.wait(procs, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            refused = [t.result() for t in done]
            assert refused and all(r.exit_status == 1 for r in refused)
            assert "too many hash requests in progress" in refused[0].stderr
        finally:
            for conn in conns:
                conn.abort()
            await asyncio.gather(*procs, return_exceptions=True)
    run(go())


# -- the fd is the caller's again only once the thread has stopped ---------------------------------


def test_a_cancelled_hash_returns_only_after_its_thread_stopped(tmp_path):
    """exec_commands' and sftp's `finally: close_fd(fd)` run after the last pread, never under it."""
    from sshfiles import hashing

    path = tmp_path / "long.img"
    sparse(path, LONG)

    async def go() -> float:
        fd = os.open(path, os.O_RDONLY)
        task = asyncio.ensure_future(hashing.hash_fd_range_async(fd, "sha256", owner="u"))
        await asyncio.sleep(0.5)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        os.close(fd)  # what the callers' finally does
        assert hashing.scheduler.stats() == {"free_workers": hashing.HASH_WORKERS, "owners_active": 0,
                                             "jobs_active": 0, "jobs_waiting": 0}
        before = time.process_time()
        await asyncio.sleep(1.0)
        return time.process_time() - before

    assert run(go()) < 0.1  # nothing hashes any more
