"""The user session (policy layer) in-process: real jail, real SQLite store, no SSH.

These are the fast checks of the rules every protocol adapter relies on; the
black-box suites drive the same code through real clients.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from sshfiles.quota import EntriesExceeded, QuotaExceeded, QuotaManager, scan_usage
from sshfiles.session import UserSession
from sshfiles.stores.sqlite import SQLiteAccountStore
from sshfiles.stores.worker import StoreWorker

KiB = 1024


@pytest.fixture
def store(tmp_path: Path):
    s = SQLiteAccountStore(tmp_path / "accounts")
    yield s
    s.close()


@pytest.fixture
def make_session(tmp_path: Path, store: SQLiteAccountStore):
    worker = StoreWorker(lambda: SQLiteAccountStore(tmp_path / "accounts"), 5.0)
    quotas = QuotaManager(worker, "test-owner")
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
    worker.close()


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (the session's store calls are awaited there)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


async def charged(store: SQLiteAccountStore, session: UserSession) -> int:
    """Settle the session's ledger and wait until the store thread has done it."""
    session.ledger.settle(release_pool=True)
    await session.ledger.worker.call(lambda _store: None, request=False)
    await asyncio.sleep(0)
    assert session.ledger.in_sync
    return store.charged(session.username)


async def in_step(store: SQLiteAccountStore, session: UserSession) -> None:
    """The ledger equals a scan of the home: bytes and entries."""
    usage = scan_usage(session.jail._root_host)
    assert await charged(store, session) == usage.bytes
    assert store.require_user(session.username).entries == usage.entries


@in_loop
async def test_write_is_charged_and_refused_whole(store, make_session) -> None:
    s = make_session()
    f = await s.open("a", os.O_WRONLY | os.O_CREAT)
    assert await s.write(f, 0, b"x" * (60 * KiB)) == 60 * KiB
    with pytest.raises(QuotaExceeded) as info:
        await s.write(f, 60 * KiB, b"y" * (4 * KiB + 1))
    assert info.value.errno == errno.EDQUOT and "used of" in info.value.strerror
    assert f.failed is not None
    await s.write(f, 60 * KiB, b"y" * (4 * KiB))                       # exactly to the quota
    s.close_file(f)
    await in_step(store, s)
    assert await charged(store, s) == 64 * KiB


@in_loop
async def test_remove_while_open_is_credited_by_the_last_close(store, make_session) -> None:
    s, other = make_session(), make_session()
    f = await s.open("a", os.O_WRONLY | os.O_CREAT)
    await s.write(f, 0, b"x" * (40 * KiB))
    s.close_file(f)
    reader = await other.open("a", os.O_RDONLY)
    s.remove("a")
    assert await charged(store, s) == 40 * KiB                         # still on disk through `reader`
    with pytest.raises(QuotaExceeded):
        g = await s.open("b", os.O_WRONLY | os.O_CREAT)
        try:
            await s.write(g, 0, b"y" * (40 * KiB))
        finally:
            s.close_file(g)
    other.close_file(reader)
    assert await charged(store, s) == 0
    await in_step(store, s)


@in_loop
async def test_posix_rename_over_credits_the_target_once(store, make_session) -> None:
    s = make_session()
    for name, size in (("a", 10 * KiB), ("b", 20 * KiB)):
        f = await s.open(name, os.O_WRONLY | os.O_CREAT)
        await s.write(f, 0, b"z" * size)
        s.close_file(f)
    s.posix_rename("a", "b")
    await in_step(store, s)
    assert await charged(store, s) == 10 * KiB
    s.posix_rename("b", "b")                                     # onto itself: nothing changes
    await in_step(store, s)


@in_loop
async def test_truncate_grow_and_shrink(store, make_session) -> None:
    s = make_session()
    f = await s.open("t", os.O_RDWR | os.O_CREAT)
    await s.truncate(f, 50 * KiB)
    with pytest.raises(QuotaExceeded):
        await s.truncate(f, 64 * KiB + 1)
    await s.truncate(f, 1)
    s.close_file(f)
    await s.set_size("t", 30 * KiB)
    await in_step(store, s)
    assert await charged(store, s) == 30 * KiB


@in_loop
async def test_offsets_past_off_t_are_refused(store, make_session) -> None:
    s = make_session(quota=None)
    f = await s.open("h", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError) as info:
        await s.write(f, 2**63 - 1, b"x")
    assert info.value.errno == errno.EFBIG
    with pytest.raises(OSError):
        await s.truncate(f, 2**63)
    assert s.read(f, 2**64 - 1, 10) == b""
    s.close_file(f)
    await in_step(store, s)


@in_loop
async def test_entries_are_charged_and_bounded(store, make_session) -> None:
    s = make_session(max_entries=3)
    await s.mkdir("d")
    f = await s.open("d/f", os.O_WRONLY | os.O_CREAT)
    s.close_file(f)
    f = await s.open("d/f", os.O_WRONLY | os.O_CREAT)                 # exists: no new entry
    s.close_file(f)
    await s.mkdir("e")
    with pytest.raises(EntriesExceeded) as info:
        await s.mkdir("g")
    assert info.value.errno == errno.EDQUOT and "3 of 3" in info.value.strerror
    with pytest.raises(EntriesExceeded):
        await s.open("h", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(FileExistsError):
        await s.mkdir("d")                                             # a failed create gives its charge back
    s.rmdir("e")
    await s.open("h", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    await in_step(store, s)


@in_loop
async def test_default_entry_limit_follows_the_byte_quota(store, make_session) -> None:
    s = make_session(quota=8 * 1024 * KiB)
    await s.mkdir("x")
    from sshfiles.quota import entries_limit
    acct = store.require_user("alice")
    assert entries_limit(acct.quota, acct.max_entries) == 2048
    assert entries_limit(None, None) is None
    assert entries_limit(4096, None) == 1000


@in_loop
async def test_read_needs_nothing_from_the_ledger_and_write_needs_a_write_handle(store, make_session) -> None:
    s = make_session()
    f = await s.open("r", os.O_WRONLY | os.O_CREAT)
    await s.write(f, 0, b"data")
    s.close_file(f)
    r = await s.open("r", os.O_RDONLY)
    assert s.read(r, 0, 100) == b"data"
    with pytest.raises(PermissionError):
        await s.write(r, 0, b"x")
    with pytest.raises(OSError) as info:
        await s.open("r", os.O_RDONLY, trunc=True)
    assert info.value.errno == errno.EINVAL
    s.close_file(r)
    await in_step(store, s)


@in_loop
async def test_writes_the_pool_covers_never_ask_the_store(store, make_session, monkeypatch) -> None:
    """The WRITE fast path: once a chunk is reserved, writes consume it in memory (no store thread hop)."""
    import sshfiles.quota as quota

    monkeypatch.setattr(quota, "RECHECK_SECONDS", 3600.0)  # no periodic re-check inside this test
    s = make_session(quota=None)
    f = await s.open("w", os.O_WRONLY | os.O_CREAT)
    worker = s.ledger.worker
    calls: list[str] = []
    real_call = worker.call

    async def counting_call(*args: Any, **kwargs: Any) -> Any:
        calls.append("call")
        return await real_call(*args, **kwargs)

    monkeypatch.setattr(worker, "call", counting_call)
    await s.write(f, 0, b"a" * KiB)                             # reserves a chunk: one store call
    assert calls == ["call"]
    for i in range(1, 200):
        await s.write(f, i * KiB, b"b" * KiB)                   # from the pool
    assert calls == ["call"]
    s.close_file(f)
    await in_step(store, s)
