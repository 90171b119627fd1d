"""A locked accounts store never stalls the event loop (Hardening II, item 15), against a real server.

Before: every store call (chunk reservations, entry charges, settlements, the login's account read,
the per-channel re-check) ran on the one event loop, so another process holding the SQLite write
lock froze every session of the worker, even a plain `stat`, for up to the busy timeout per call.

The attack as made: a victim (127.0.0.2) creates directories and writes files, which need the store,
while another process holds the store's write lock for 3 s; a bystander (127.0.0.3, another user)
does `stat` every 5 ms on a session opened before, and logs in (key, then password) meanwhile.
(Run against main, the bystander's worst stat was 1.04 s: one busy timeout per victim request.)
"""

from __future__ import annotations

import asyncio
import time

import asyncssh
from test_quota import assert_ledger_matches_disk, run
from test_quota_exact import assert_entries_match_disk, lock_store

KiB = 1024
VICTIM = "127.0.0.2"
BYSTANDER = "127.0.0.3"


def test_a_locked_store_stalls_only_the_requests_that_need_it(tmp_path, host_keys_dir, monkeypatch):
    from conftest import make_server

    monkeypatch.setenv("SSHFILES_STORE_BUSY_TIMEOUT", "1.0")
    server = make_server(tmp_path, host_keys_dir)
    server.start()
    try:
        victim = server.add_user("victim", quota="64MiB")
        bystander = server.add_user("calm", quota="1MiB", key=True)
        bystander_pw = server.add_user("calmpw", quota="1MiB")

        async def go() -> tuple[float, int, list[str], int, float, float]:
            stop = asyncio.Event()
            latencies: list[float] = []
            outcomes: list[str] = []
            done = 0

            async def stat_loop(sftp: asyncssh.SFTPClient) -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    await sftp.stat(".")
                    latencies.append(time.monotonic() - t0)
                    await asyncio.sleep(0.005)

            async def victim_loop(sftp: asyncssh.SFTPClient) -> None:
                nonlocal done
                i = 0
                while not stop.is_set():
                    try:
                        await sftp.mkdir(f"d{i}")                                  # an entry charge
                        async with sftp.open(f"d{i}/f", "wb") as f:               # one more, and bytes
                            await f.write(b"v" * (200 * KiB))
                        done += 1
                    except asyncssh.SFTPError as exc:
                        outcomes.append(exc.reason)
                    i += 1
                    await asyncio.sleep(0.05)

            async with server.sftp(bystander, local_addr=(BYSTANDER, 0)) as calm, \
                    server.sftp(victim, local_addr=(VICTIM, 0)) as attacker:
                await calm.stat(".")
                watcher = asyncio.ensure_future(stat_loop(calm))
                await asyncio.sleep(0.3)
                # (in a thread: the helper waits for the locker to start, which must not hold our own loop)
                locker = await asyncio.to_thread(lock_store, server.accounts_dir, 3.0)
                writer = asyncio.ensure_future(victim_loop(attacker))
                try:
                    await asyncio.sleep(0.5)
                    t0 = time.monotonic()  # logins while the lock is held: neither stalls the others
                    async with server.connect(bystander, local_addr=(BYSTANDER, 0), preferred_auth="publickey"):
                        key_login = time.monotonic() - t0
                    t0 = time.monotonic()
                    async with server.connect(bystander_pw, local_addr=(BYSTANDER, 0), preferred_auth="password"):
                        password_login = time.monotonic() - t0
                    await asyncio.to_thread(locker.wait, 15)
                    await asyncio.sleep(1.0)  # the victim's requests go through again
                finally:
                    stop.set()
                    await asyncio.gather(watcher, writer)
            return max(latencies), len(latencies), outcomes, done, key_login, password_login

        worst, count, failures, done, key_login, password_login = run(go())
        assert count > 50, count
        assert worst < 0.5, f"the bystander's stat took {worst:.2f} s while the store was locked"
        # Logins read the account in the store's read lane (never behind the victim's locked charges);
        # generous bounds for a loaded machine (argon2 alone is ~0.2-1 s): the stat above is the real check.
        assert key_login < 2.0 and password_login < 4.0, (key_login, password_login)
        assert done > 0, "the victim's requests never went through, even after the lock"
        for message in failures:  # refused while locked: one clean line, no host path
            assert message == "the accounts store is busy; try again later", message
        assert_ledger_matches_disk(server, victim, timeout=8)
        assert_entries_match_disk(server, victim, timeout=8)
    finally:
        server.stop()
