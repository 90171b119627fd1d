"""Quota exactness under attack ("Hardening I", items 4-9), against a real `sshfiles serve`.

Each test makes the attack the way a client would and then checks the
invariant: the ledger (bytes and entries) equals a fresh scan of the home
once every handle is closed, and never admitted more than the quota.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time

import asyncssh
import pytest
from conftest import have
from test_quota import (
    KiB,
    add_user,
    assert_ledger_matches_disk,
    disk_usage,
    ledger,
    put,
    refused,
    run,
    seed,
    sftp_on_two_workers,
    user_row,
)

from sshfiles.stores.sqlite import SQLiteAccountStore


def entries_on_disk(home) -> int:
    """Every name below the home (files, directories, symlinks), never following symlinks."""
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(home))


def stored_entries(server, name: str) -> int:
    store = SQLiteAccountStore(server.accounts_dir)
    try:
        acct = store.require_user(name)
        return acct.entries
    finally:
        store.close()


def assert_entries_match_disk(server, user, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        disk = entries_on_disk(user.home)
        stored = stored_entries(server, user.name)
        if stored == disk:
            return disk
        if time.monotonic() > deadline:
            raise AssertionError(f"entries ledger of {user.name} says {stored}, the home holds {disk}")
        time.sleep(0.05)


# -- 4. removed or replaced while open for reading -------------------------------------------


@pytest.mark.parametrize("how", ["remove", "posix_rename"])
def test_file_removed_while_open_for_reading_stays_charged_until_closed(server, how):
    quota = 64 * KiB
    user = add_user(server, f"reader{how[0]}", quota=str(quota))
    seed(server, user, {"big": b"b" * (40 * KiB), "tiny": b"t"})

    async def attack():
        async with server.sftp(user) as sftp:
            held = await sftp.open("big", "rb")                   # keeps the 40 KiB on disk
            if how == "remove":
                await sftp.remove("big")
            else:
                await sftp.posix_rename("tiny", "big")
            # the bytes are still on disk: a second 40 KiB must not fit under 64 KiB
            await refused(put(sftp, "again", b"a" * (40 * KiB)))
            assert await held.read(10) == b"b" * 10                # the reader is undisturbed
            await held.close()                                     # now they leave the disk
            await put(sftp, "again", b"a" * (40 * KiB))
    run(attack())
    assert assert_ledger_matches_disk(server, user) <= quota
    assert_entries_match_disk(server, user)


def test_file_removed_while_open_in_two_sessions_is_credited_once(server):
    user = add_user(server, "tworeaders", quota="64KiB")
    seed(server, user, {"base": b"0" * (10 * KiB), "f": b"f" * (30 * KiB)})

    async def attack():
        async with server.sftp(user) as s1, server.sftp(user) as s2:
            r1, r2, w = await s1.open("f", "rb"), await s2.open("f", "rb"), await s2.open("f", "ab")
            await s1.remove("f")
            await w.write(b"g" * KiB)                              # growth after removal: charged
            await r1.close()
            assert ledger(server, user.name) >= 41 * KiB
            await asyncio.gather(r2.close(), w.close())
    run(attack())
    assert assert_ledger_matches_disk(server, user) == 10 * KiB
    assert_entries_match_disk(server, user)


def test_workers_file_removed_in_one_worker_while_read_in_another(workers_server):
    server = workers_server
    quota = 64 * KiB
    user = add_user(server, "wreader", quota=str(quota))
    seed(server, user, {"big": b"b" * (40 * KiB)})

    async def attack():
        ca, cb, sa, sb = await sftp_on_two_workers(server, user)
        async with ca, cb:
            held = await sa.open("big", "rb")
            await sb.remove("big")
            await refused(put(sb, "again", b"a" * (40 * KiB)))
            await held.close()
            await put(sb, "again", b"a" * (40 * KiB))
    run(attack())
    assert assert_ledger_matches_disk(server, user) == 40 * KiB
    assert_entries_match_disk(server, user)


# -- 5. several workers shrinking the same file ------------------------------------------


def test_workers_truncating_the_same_file_never_credit_twice(workers_server):
    server = workers_server
    quota = 1024 * KiB
    user = add_user(server, "wtrunc2", quota=str(quota))

    async def attack():
        ca, cb, sa, sb = await sftp_on_two_workers(server, user)
        async with ca, cb:
            deadline = time.monotonic() + 4
            rounds = 0
            while time.monotonic() < deadline and rounds < 200:
                await put(sa, "f", b"1" * (quota // 2))
                # shrinks from both processes at once, each to a different size: each must see the other's
                await asyncio.gather(*(s.truncate("f", n * KiB) for n in range(8) for s in (sa, sb)))
                await asyncio.gather(sa.truncate("f", 0), sb.truncate("f", 0))
                rounds += 1
                assert ledger(server, user.name) >= 0
            # had a shrink been credited twice, the user could now store more than the quota
            await refused(put(sa, "g", b"g" * (quota + 1)))
            await put(sb, "g", b"g" * quota)
            await refused(put(sa, "h", b"h"))
    run(attack())
    assert assert_ledger_matches_disk(server, user) == quota
    assert_entries_match_disk(server, user)


def test_workers_overwrite_racing_a_truncate_is_charged(workers_server):
    server = workers_server
    quota = 64 * KiB
    user = add_user(server, "wover", quota=str(quota))

    async def attack():
        ca, cb, sa, sb = await sftp_on_two_workers(server, user)
        async with ca, cb:
            f = await sa.open("f", "wb")
            for _ in range(20):
                await f.write(b"x" * (32 * KiB), 0)
                await asyncio.gather(f.write(b"y" * (32 * KiB), 0), sb.truncate("f", 0))
            await f.close()
    run(attack())
    assert assert_ledger_matches_disk(server, user) <= quota


# -- 6. offsets and sizes at the edge of 64 bits ------------------------------------------


def test_huge_offsets_keep_the_ledger_exact_for_an_unlimited_user(server):
    user = add_user(server, "huge", quota="unlimited")
    seed(server, user, {"small": b"s" * 100})

    async def attack():
        async with server.sftp(user) as sftp:
            fa, fb = await sftp.open("a", "wb"), await sftp.open("b", "wb")
            for f in (fa, fb):
                with pytest.raises(asyncssh.SFTPError):
                    await f.write(b"x", 2**62)                      # ext4 refuses; the ledger must not overflow
            for bad in (2**63 - 1, 2**63, 2**64 - 2):
                with pytest.raises(asyncssh.SFTPError):
                    await fa.write(b"x", bad)
            with pytest.raises(asyncssh.SFTPError):
                await sftp.truncate("small", 2**63)
            await fa.close()
            await fb.close()
            await put(sftp, "after", b"ok" * 1000)                  # the user can still upload
            assert (await sftp.stat("small")).size == 100
    run(attack())
    store = SQLiteAccountStore(server.accounts_dir)
    try:
        used = store._query("SELECT used, typeof(used), entries FROM users WHERE name=?", (user.name,))[0]
    finally:
        store.close()
    assert used[1] == "integer", used
    assert assert_ledger_matches_disk(server, user) == 100 + 2000
    assert_entries_match_disk(server, user)
    server.stop()
    assert server.proc is not None and server.proc.returncode == 0, server.log()[-2000:]


# -- 7. a credit the store cannot take right now is kept and retried ----------------------


def lock_store(accounts_dir, seconds: float) -> subprocess.Popen:
    """Another process holding the store's write lock, as a long admin transaction would."""
    code = (f"import sqlite3, sys, time; db = sqlite3.connect({str(accounts_dir / 'accounts.db')!r}, "
            "isolation_level=None); db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); "
            f"time.sleep({seconds}); db.execute('COMMIT')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_credits_survive_a_locked_store(tmp_path, host_keys_dir, monkeypatch):
    from conftest import make_server

    monkeypatch.setenv("SSHFILES_STORE_BUSY_TIMEOUT", "0.3")
    server = make_server(tmp_path, host_keys_dir)
    server.start()
    try:
        quota = 64 * KiB
        user = add_user(server, "locked", quota=str(quota))
        seed(server, user, {"a": b"a" * (20 * KiB), "b": b"b" * (20 * KiB), "c": b"c" * (20 * KiB)})
        bystander = add_user(server, "calm", quota="64KiB")

        async def attack():
            async with server.sftp(user) as sftp:
                locker = lock_store(server.accounts_dir, 2.0)
                try:
                    await sftp.remove("a")                          # gone from disk: must report success
                    await sftp.truncate("b", 0)
                    await sftp.posix_rename("c", "b")
                    assert not (user.home / "a").exists()
                finally:
                    locker.wait(10)
                # without another request from anyone, the ledger catches up
            async with server.sftp(bystander) as other:
                assert await other.listdir(".") is not None
        run(attack())
        assert assert_ledger_matches_disk(server, user, timeout=8) == 20 * KiB
        assert_entries_match_disk(server, user)
        assert "postponed" in server.log()
    finally:
        server.stop()


# -- 8. entries (files and directories) are counted and bounded -----------------------------


def test_entry_quota_refuses_the_next_directory_or_file(server):
    user = add_user(server, "dirs", quota="1MiB")
    server.cli("user", "quota", user.name, "1MiB", "--files", "20")
    bystander = add_user(server, "neighbour", quota="1MiB")

    async def attack():
        async with server.sftp(user) as sftp:
            made = 0
            with pytest.raises(asyncssh.SFTPError) as info:
                for i in range(100):
                    await sftp.mkdir(f"d{i}")
                    made += 1
            assert made == 20
            assert "20 of 20 files and directories" in info.value.reason
            with pytest.raises(asyncssh.SFTPError):
                await put(sftp, "file", b"x")
            vfs = await sftp.statvfs(".")
            assert (vfs.files, vfs.ffree) == (20, 0)
            await sftp.rmdir("d0")
            await put(sftp, "file", b"x")                          # freed one entry
            await put(sftp, "file", b"y")                          # overwriting costs nothing
            with pytest.raises(asyncssh.SFTPError):
                await sftp.mkdir("d0")
            await sftp.posix_rename("d1", "d2")                    # replaces an empty dir: one entry freed
            await sftp.mkdir("d1")
        async with server.sftp(bystander) as other:
            for i in range(25):
                await other.mkdir(f"n{i}")
    run(attack())
    assert assert_entries_match_disk(server, user) == 20
    assert assert_ledger_matches_disk(server, user) == 1
    assert user_row(server, user.name)["FILES"] == "20/20"
    assert user_row(server, "neighbour")["FILES"] == "25/1000"   # default: 1 per 4 KiB of quota, >= 1000


def test_entry_quota_with_stock_clients(server, tmp_path):
    if not (have("sftp") and have("sshpass")):
        pytest.skip("OpenSSH sftp / sshpass not installed")
    user = server.add_user("stock", quota="1MiB")
    server.cli("user", "quota", user.name, "1MiB", "--files", "3")
    local = tmp_path / "f.txt"
    local.write_text("hello\n")
    res = server.sftp_batch(user, f"mkdir a\nmkdir b\nput {local} c\n-put {local} d\n-mkdir e\nls\n", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(user.home)) == ["a", "b", "c"]
    assert assert_entries_match_disk(server, user) == 3
    res = server.openssh("scp", user, [str(local), f"{user.name}@{server.host}:e.txt"])
    assert res.returncode != 0
    assert not (user.home / "e.txt").exists()
    assert assert_ledger_matches_disk(server, user) == 6


def test_user_list_and_quota_scan_count_entries(server):
    user = add_user(server, "counted", quota="unlimited")
    (user.home / "x" / "y").mkdir(parents=True)
    (user.home / "x" / "y" / "f").write_bytes(b"12345")
    os.symlink("x", user.home / "link")
    res = server.cli("quota", "scan", user.name)
    assert res.returncode == 0
    assert user_row(server, user.name)["FILES"] == "4"           # x, x/y, x/y/f, link; no limit
    res = server.cli("user", "quota", user.name, "unlimited", "--files", "7")
    assert "7 files and directories" in res.stdout
    assert user_row(server, user.name)["FILES"] == "4/7"
    res = server.cli("user", "quota", user.name, "unlimited", "--files", "many", check=False)
    assert res.returncode == 1 and "invalid file count" in res.stderr and "Traceback" not in res.stderr


# -- 9. reservations of a dead server process are not usage -------------------------------


def test_quota_scan_after_a_crash_does_not_double_count(server):
    user = add_user(server, "crashscan", quota="1MiB")

    async def upload_and_crash():
        conn = await server.connect(user)
        sftp = await conn.start_sftp_client()
        f = await sftp.open("partial", "wb")
        await f.write(b"p" * (96 * KiB))
        assert ledger(server, user.name) > disk_usage(user.home)  # a reservation beyond the bytes
        server.kill()
        conn.abort()
    run(upload_and_crash())
    res = server.cli("quota", "scan", user.name)
    assert res.returncode == 0, res.stderr
    assert ledger(server, user.name) == disk_usage(user.home) == 96 * KiB
    assert_entries_match_disk(server, user)


def test_store_schema_v1_is_migrated(tmp_path):
    """A store written by the previous release opens and gains the new columns."""
    d = tmp_path / "accounts"
    d.mkdir()
    db = sqlite3.connect(d / "accounts.db")
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE users (name TEXT PRIMARY KEY, home TEXT NOT NULL, password_hash TEXT, quota INTEGER,
                            used INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
        CREATE TABLE keys (user TEXT NOT NULL, fingerprint TEXT NOT NULL, key TEXT NOT NULL,
                           comment TEXT NOT NULL DEFAULT '', PRIMARY KEY (user, fingerprint));
        CREATE TABLE reservations (owner TEXT NOT NULL, user TEXT NOT NULL, amount INTEGER NOT NULL,
                                   PRIMARY KEY (owner, user));
        INSERT INTO meta VALUES ('schema', '1');
        INSERT INTO users VALUES ('old', '/nonexistent', NULL, 4096, 12, 0);
    """)
    db.commit()
    db.close()
    store = SQLiteAccountStore(d)
    try:
        acct = store.require_user("old")
        assert (acct.quota, acct.used, acct.entries, acct.max_entries, acct.disabled) == (4096, 12, 0, None, False)
    finally:
        store.close()


# -- a crash loses no acknowledged byte, with one worker or several ----------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_loses_no_acknowledged_byte(tmp_path, host_keys_dir, workers):
    from conftest import make_server

    server = make_server(tmp_path, host_keys_dir, ("--workers", str(workers)))
    server.start()
    try:
        user = add_user(server, "durable", quota="4MiB")
        blocks = [os.urandom(32 * KiB) for _ in range(24)]

        async def upload_and_crash():
            conn = await server.connect(user)
            sftp = await conn.start_sftp_client()
            f = await sftp.open("data", "wb")
            for i, block in enumerate(blocks):
                await f.write(block, i * 32 * KiB)      # acknowledged once this returns
            server.kill()
            conn.abort()
        run(upload_and_crash())
        assert (user.home / "data").read_bytes() == b"".join(blocks)
        server.log_path.rename(server.root / "server-before-kill.log")
        server.start()
        assert assert_ledger_matches_disk(server, user) == 24 * 32 * KiB
        assert_entries_match_disk(server, user)
    finally:
        server.stop()


def test_clean_stop_leaves_no_rows_and_no_rescan(server):
    """A SIGTERM stop after sessions of a user (presence rows, pools) leaves the store clean."""
    user = add_user(server, "cleanstop", quota="1MiB")
    seed(server, user, {"a": b"a" * 1000})

    async def hold_open() -> None:
        async with server.sftp(user) as sftp:
            async with sftp.open("a", "rb") as f:
                await f.read(10)
    run(hold_open())
    server.stop()
    store = SQLiteAccountStore(server.accounts_dir)
    try:
        assert store.owners() == []
    finally:
        store.close()
    server.log_path.rename(server.root / "server-before-stop.log")
    server.start()
    assert "rescanned" not in server.log()
