"""The user session (policy layer) in-process: real jail, real SQLite store, no SSH.

These are the fast checks of the rules every protocol adapter relies on; the
black-box suites drive the same code through real clients.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from sshfiles.quota import EntriesExceeded, QuotaExceeded, QuotaManager, scan_usage
from sshfiles.session import UserSession
from sshfiles.stores.sqlite import SQLiteAccountStore

KiB = 1024


@pytest.fixture
def store(tmp_path: Path):
    s = SQLiteAccountStore(tmp_path / "accounts")
    yield s
    s.close()


@pytest.fixture
def make_session(tmp_path: Path, store: SQLiteAccountStore):
    quotas = QuotaManager(store, "test-owner")
    sessions: list[UserSession] = []

    def make(name: str = "alice", quota: int | None = 64 * KiB, max_entries: int | None = None) -> UserSession:
        home = tmp_path / "homes" / name
        if store.get_user(name) is None:
            home.mkdir(parents=True)
            store.add_user(name, str(home), None, quota)
            if max_entries is not None:
                store.set_max_entries(name, max_entries)
        s = UserSession(name, str(home), quotas.ledger(name))
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.close()


def charged(store: SQLiteAccountStore, session: UserSession) -> int:
    session.ledger.settle(release_pool=True)
    return store.charged(session.username)


def in_step(store: SQLiteAccountStore, session: UserSession) -> None:
    """The ledger equals a scan of the home: bytes and entries."""
    usage = scan_usage(session.jail._root_host)
    assert charged(store, session) == usage.bytes
    assert store.require_user(session.username).entries == usage.entries


def test_write_is_charged_and_refused_whole(store, make_session) -> None:
    s = make_session()
    f = s.open("a", os.O_WRONLY | os.O_CREAT)
    assert s.write(f, 0, b"x" * (60 * KiB)) == 60 * KiB
    with pytest.raises(QuotaExceeded) as info:
        s.write(f, 60 * KiB, b"y" * (4 * KiB + 1))
    assert info.value.errno == errno.EDQUOT and "used of" in info.value.strerror
    assert f.failed is not None
    s.write(f, 60 * KiB, b"y" * (4 * KiB))                       # exactly to the quota
    s.close_file(f)
    in_step(store, s)
    assert charged(store, s) == 64 * KiB


def test_remove_while_open_is_credited_by_the_last_close(store, make_session) -> None:
    s, other = make_session(), make_session()
    f = s.open("a", os.O_WRONLY | os.O_CREAT)
    s.write(f, 0, b"x" * (40 * KiB))
    s.close_file(f)
    reader = other.open("a", os.O_RDONLY)
    s.remove("a")
    assert charged(store, s) == 40 * KiB                         # still on disk through `reader`
    with pytest.raises(QuotaExceeded):
        g = s.open("b", os.O_WRONLY | os.O_CREAT)
        try:
            s.write(g, 0, b"y" * (40 * KiB))
        finally:
            s.close_file(g)
    other.close_file(reader)
    assert charged(store, s) == 0
    in_step(store, s)


def test_posix_rename_over_credits_the_target_once(store, make_session) -> None:
    s = make_session()
    for name, size in (("a", 10 * KiB), ("b", 20 * KiB)):
        f = s.open(name, os.O_WRONLY | os.O_CREAT)
        s.write(f, 0, b"z" * size)
        s.close_file(f)
    s.posix_rename("a", "b")
    in_step(store, s)
    assert charged(store, s) == 10 * KiB
    s.posix_rename("b", "b")                                     # onto itself: nothing changes
    in_step(store, s)


def test_truncate_grow_and_shrink(store, make_session) -> None:
    s = make_session()
    f = s.open("t", os.O_RDWR | os.O_CREAT)
    s.truncate(f, 50 * KiB)
    with pytest.raises(QuotaExceeded):
        s.truncate(f, 64 * KiB + 1)
    s.truncate(f, 1)
    s.close_file(f)
    s.set_size("t", 30 * KiB)
    in_step(store, s)
    assert charged(store, s) == 30 * KiB


def test_offsets_past_off_t_are_refused(store, make_session) -> None:
    s = make_session(quota=None)
    f = s.open("h", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError) as info:
        s.write(f, 2**63 - 1, b"x")
    assert info.value.errno == errno.EFBIG
    with pytest.raises(OSError):
        s.truncate(f, 2**63)
    assert s.read(f, 2**64 - 1, 10) == b""
    s.close_file(f)
    in_step(store, s)


def test_entries_are_charged_and_bounded(store, make_session) -> None:
    s = make_session(max_entries=3)
    s.mkdir("d")
    f = s.open("d/f", os.O_WRONLY | os.O_CREAT)
    s.close_file(f)
    f = s.open("d/f", os.O_WRONLY | os.O_CREAT)                 # exists: no new entry
    s.close_file(f)
    s.mkdir("e")
    with pytest.raises(EntriesExceeded) as info:
        s.mkdir("g")
    assert info.value.errno == errno.EDQUOT and "3 of 3" in info.value.strerror
    with pytest.raises(EntriesExceeded):
        s.open("h", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(FileExistsError):
        s.mkdir("d")                                             # a failed create gives its charge back
    s.rmdir("e")
    s.open("h", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    in_step(store, s)


def test_default_entry_limit_follows_the_byte_quota(store, make_session) -> None:
    s = make_session(quota=8 * 1024 * KiB)
    s.mkdir("x")
    from sshfiles.quota import entries_limit
    acct = store.require_user("alice")
    assert entries_limit(acct.quota, acct.max_entries) == 2048
    assert entries_limit(None, None) is None
    assert entries_limit(4096, None) == 1000


def test_read_needs_nothing_from_the_ledger_and_write_needs_a_write_handle(store, make_session) -> None:
    s = make_session()
    f = s.open("r", os.O_WRONLY | os.O_CREAT)
    s.write(f, 0, b"data")
    s.close_file(f)
    r = s.open("r", os.O_RDONLY)
    assert s.read(r, 0, 100) == b"data"
    with pytest.raises(PermissionError):
        s.write(r, 0, b"x")
    with pytest.raises(OSError) as info:
        s.open("r", os.O_RDONLY, trunc=True)
    assert info.value.errno == errno.EINVAL
    s.close_file(r)
    in_step(store, s)
