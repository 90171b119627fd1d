"""The user session (policy layer) in-process: real jail, real SQLite store, no SSH.

These are the fast checks of the rules every protocol adapter relies on; the
black-box suites drive the same code through real clients.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from sshfiles.fileio import pwrite_all
from sshfiles.permissions import PermissionRules, parse_perms
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
async def test_truncating_open_of_an_empty_file_sets_its_times_without_an_ftruncate(
        store, make_session, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ftruncate to 0 makes ext4 flush everything written before the last close (on the event
    loop: 350-420 ms for 1 GiB); an empty file only gets its times set, a non-empty one is truncated
    (on a bulk thread, not the loop's) and credited. The real ftruncate still runs: the wrapper
    only records the calls."""
    import threading
    calls: list[int] = []
    threads: set[int] = set()
    real_ftruncate = os.ftruncate

    def recording(fd: int, length: int) -> None:
        calls.append(length)
        threads.add(threading.get_ident())
        real_ftruncate(fd, length)

    monkeypatch.setattr("sshfiles.session.os.ftruncate", recording)
    s = make_session()
    home = s.jail._root_host
    f = await s.open("new", os.O_WRONLY | os.O_CREAT, trunc=True)   # a new name: nothing to truncate
    await s.write(f, 0, b"x" * (10 * KiB))
    s.close_file(f)
    assert calls == []
    os.utime(os.path.join(home, "new"), (1, 1))
    f = await s.open("empty", os.O_WRONLY | os.O_CREAT)
    s.close_file(f)
    os.utime(os.path.join(home, "empty"), (1, 1))
    f = await s.open("empty", os.O_WRONLY | os.O_CREAT, trunc=True)  # existing and empty
    s.close_file(f)
    assert calls == []
    assert os.stat(os.path.join(home, "empty")).st_mtime > 1             # as a truncation would
    f = await s.open("new", os.O_WRONLY | os.O_CREAT, trunc=True)   # existing with 10 KiB
    s.close_file(f)
    assert calls == [0]
    assert threads and threading.get_ident() not in threads
    assert os.stat(os.path.join(home, "new")).st_size == 0
    await in_step(store, s)
    assert await charged(store, s) == 0


@in_loop
async def test_a_truncate_cancelled_while_its_thread_runs_leaves_the_ledger_exact(
        store, make_session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's connection can drop while a truncate's thread works: the request is cancelled,
    but only once the thread is done, and the ledger follows what the thread did (grown and
    charged, or shrunk and credited)."""
    started: list[int] = []
    real_ftruncate = os.ftruncate

    def slow(fd: int, length: int) -> None:
        started.append(length)
        time.sleep(0.05)  # the cancellation arrives meanwhile
        real_ftruncate(fd, length)

    monkeypatch.setattr("sshfiles.session.os.ftruncate", slow)
    s = make_session()
    f = await s.open("t", os.O_RDWR | os.O_CREAT)
    for size in (40 * KiB, 10 * KiB):                                # a growth, then a shrink
        task = asyncio.create_task(s.truncate(f, size))
        while len(started) < (1 if size == 40 * KiB else 2):
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert os.fstat(f.fd).st_size == size
        await in_step(store, s)
    s.close_file(f)
    assert await charged(store, s) == 10 * KiB


@in_loop
async def test_a_bulk_write_cancelled_while_its_thread_runs_stays_charged(
        store, make_session, monkeypatch: pytest.MonkeyPatch) -> None:
    """copy-data's chunk writes (write_bulk) run on a bulk thread; a request cancelled meanwhile
    (the connection dropped) returns once the thread is done, and the growth it wrote stays
    charged: before, the whole charge was given back, so each dropped copy under-counted a chunk."""
    started: list[int] = []
    real = pwrite_all

    def slow(fd: int, data: bytes, offset: int) -> None:
        started.append(offset)
        time.sleep(0.05)  # the cancellation arrives meanwhile
        real(fd, data, offset)

    monkeypatch.setattr("sshfiles.session.pwrite_all", slow)
    s = make_session()
    f = await s.open("c", os.O_WRONLY | os.O_CREAT)
    task = asyncio.create_task(s.write_bulk(f, 0, b"c" * (20 * KiB)))
    while not started:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.fstat(f.fd).st_size == 20 * KiB
    s.close_file(f)
    await in_step(store, s)
    assert await charged(store, s) == 20 * KiB


@in_loop
async def test_a_big_file_is_closed_off_the_event_loop_and_credited_exactly(
        store, make_session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The close of a big file can take long (ext4's flush at close after a truncation, the
    freeing of a removed file's pages): it runs on a bulk thread, a small file's on the spot; the
    ledger stays exact either way, also when the big file was removed while open. The real close
    still runs: the wrapper only records which thread made it."""
    import threading

    from sshfiles.quota import BACKGROUND_CLOSE_SIZE
    closed: dict[int, int] = {}
    real_close = os.close

    def recording(fd: int) -> None:
        closed[fd] = threading.get_ident()
        real_close(fd)

    monkeypatch.setattr("sshfiles.quota.os.close", recording)
    s = make_session(quota=4 * BACKGROUND_CLOSE_SIZE)
    small = await s.open("small", os.O_WRONLY | os.O_CREAT)
    await s.write(small, 0, b"s" * KiB)
    small_fd = small.fd
    assert s.close_file(small) is None
    assert closed[small_fd] == threading.get_ident()
    big = await s.open("big", os.O_WRONLY | os.O_CREAT)
    await s.write(big, 0, b"b" * BACKGROUND_CLOSE_SIZE)
    reader = await s.open("big", os.O_RDONLY)
    big_fd, reader_fd = big.fd, reader.fd
    pending = s.close_file(big)
    assert pending is not None
    await asyncio.wrap_future(pending)
    assert closed[big_fd] != threading.get_ident()
    s.remove("big")                                                  # still open through `reader`
    assert await charged(store, s) == BACKGROUND_CLOSE_SIZE + KiB
    pending = s.close_file(reader)                                   # the last handle: it credits
    assert pending is not None
    await asyncio.wrap_future(pending)
    assert closed[reader_fd] != threading.get_ident()
    await in_step(store, s)
    assert await charged(store, s) == KiB


@in_loop
async def test_removing_or_replacing_a_big_file_frees_it_off_the_event_loop(
        store, make_session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last close of a removed (or replaced) big file frees its pages and blocks, about 100 ms
    per GiB: it runs on a bulk thread, returned to the protocol to wait for; the ledger is exact."""
    import threading

    from sshfiles.quota import BACKGROUND_CLOSE_SIZE
    threads: list[int] = []
    real_close = os.close

    def recording(fd: int) -> None:
        threads.append(threading.get_ident())
        real_close(fd)

    s = make_session(quota=4 * BACKGROUND_CLOSE_SIZE)
    for name in ("gone", "replaced", "source"):
        f = await s.open(name, os.O_WRONLY | os.O_CREAT)
        await s.write(f, 0, b"g" * BACKGROUND_CLOSE_SIZE)
        pending = s.close_file(f)
        assert pending is not None
        await asyncio.wrap_future(pending)
    monkeypatch.setattr("sshfiles.quota.os.close", recording)
    pending = s.remove("gone")
    assert pending is not None
    await asyncio.wrap_future(pending)
    pending = s.posix_rename("source", "replaced")
    assert pending is not None
    await asyncio.wrap_future(pending)
    assert len([t for t in threads if t != threading.get_ident()]) == 2  # (os.close is everyone's)
    assert not os.path.exists(os.path.join(s.jail._root_host, "gone"))
    await in_step(store, s)
    assert await charged(store, s) == BACKGROUND_CLOSE_SIZE


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


# -- permissions (the rules every adapter gets from the session) --------------------------------


def _rules(rev: int = 1, **by_dir: str) -> PermissionRules:
    """_rules(root="list,download", drop="upload") -> rules for / and /drop."""
    return PermissionRules(rev, {("/" if d == "root" else "/" + d): parse_perms(p) for d, p in by_dir.items()})


async def _denied(call) -> str:
    """The refusal's one line; `call` may return a coroutine (the session's async operations)."""
    with pytest.raises(PermissionError) as info:
        result = call()
        if asyncio.iscoroutine(result):
            await result
    assert info.value.errno == errno.EACCES and "\n" not in info.value.strerror
    return info.value.strerror


@in_loop
async def test_read_only_user_can_read_and_nothing_else(store, make_session) -> None:
    s = make_session()
    home = Path(s.jail._root_host)
    (home / "d").mkdir()
    (home / "d" / "f").write_bytes(b"data")
    scan = scan_usage(str(home))
    store.set_usage("alice", scan.bytes, scan.entries)
    s.set_permissions(_rules(root="list,download"))
    f = await s.open("d/f", os.O_RDONLY)
    assert s.read(f, 0, 10) == b"data"
    s.close_file(f)
    assert [n for n, _ in s.listdir("/d")] == [b".", b"..", b"f"]
    s.close_fd(s.open_for_hash("/d/f"))
    refused = [
        lambda: s.open("/d/new", os.O_WRONLY | os.O_CREAT),
        lambda: s.open("/d/f", os.O_WRONLY | os.O_CREAT, trunc=True),
        lambda: s.open("/d/f", os.O_WRONLY, append=True),
        lambda: s.open("/d/f", os.O_RDWR),
        lambda: s.set_size("/d/f", 0),
        lambda: s.remove("/d/f"),
        lambda: s.rmdir("/d"),
        lambda: s.mkdir("/e"),
        lambda: s.rename("/d/f", "/d/g"),
        lambda: s.posix_rename("/d/f", "/d/g"),
        lambda: s.chmod("/d/f", 0o600),
        lambda: s.utime("/d/f", (1.0, 1.0)),
    ]
    for call in refused:
        assert "Permission denied: no " in await _denied(call)
    assert (home / "d" / "f").read_bytes() == b"data" and sorted(p.name for p in home.rglob("*")) == ["d", "f"]
    await in_step(store, s)


@in_loop
async def test_drop_box_takes_new_files_and_tells_nothing(store, make_session) -> None:
    s = make_session()
    home = Path(s.jail._root_host)
    (home / "drop").mkdir()
    (home / "drop" / "secret").write_bytes(b"someone else's upload")
    store.set_usage("alice", len(b"someone else's upload"), 2)
    s.set_permissions(_rules(root="list", drop="upload"))
    # The upload OpenSSH's sftp does: stat the target (EACCES: quietly not a directory), open CREAT|TRUNC.
    assert "list" in await _denied(lambda: s.stat("/drop/new.txt"))
    f = await s.open("/drop/new.txt", os.O_WRONLY | os.O_CREAT, trunc=True)
    await s.write(f, 0, b"hello")
    await s.truncate(f, 4)                          # its own new file: no overwrite needed
    s.close_file(f)
    assert (home / "drop" / "new.txt").read_bytes() == b"hell"
    # An existing name answers exactly as a missing one to stat and realpath...
    assert await _denied(lambda: s.stat("/drop/secret")) == await _denied(lambda: s.stat("/drop/none"))
    assert s.realpath("/drop/secret/../none") == "/drop/none"
    assert s.stat("/drop").st_mode & 0o40000  # ...but the folder itself can be entered
    # ...and it cannot be listed, read, hashed, overwritten, resumed, appended, deleted or renamed.
    for call in (lambda: s.opendir("/drop"), lambda: s.open("/drop/secret", os.O_RDONLY),
                 lambda: s.open_for_hash("/drop/secret"), lambda: s.open("/drop/new.txt", os.O_WRONLY),
                 lambda: s.open("/drop/secret", os.O_WRONLY | os.O_CREAT, trunc=True),
                 lambda: s.open("/drop/secret", os.O_WRONLY | os.O_CREAT, append=True),
                 lambda: s.remove("/drop/secret"), lambda: s.posix_rename("/drop/new.txt", "/drop/x"),
                 lambda: s.set_size("/drop/secret", 0), lambda: s.mkdir("/drop/sub")):
        await _denied(call)
    assert (home / "drop" / "secret").read_bytes() == b"someone else's upload"
    f = await s.open("/drop/new-2.txt", os.O_WRONLY | os.O_CREAT, trunc=True)   # a retry under a new name works
    s.close_file(f)
    await in_step(store, s)


@in_loop
async def test_rules_change_applies_to_open_handles_at_the_next_operation(make_session) -> None:
    s = make_session()
    f = await s.open("/up", os.O_WRONLY | os.O_CREAT)
    await s.write(f, 0, b"a")
    s.set_permissions(_rules(rev=2, root="list,download"))
    assert "upload" in await _denied(lambda: s.write(f, 1, b"b"))
    s.set_permissions(_rules(rev=3, root="*"))
    await s.write(f, 1, b"b")
    s.close_file(f)


@in_loop
async def test_deeper_rule_overrides_and_rule_directories_do_not_move(make_session) -> None:
    s = make_session()
    s.set_permissions(_rules(root="*", ro="list,download,rename"))
    await s.mkdir("/ro")
    await s.mkdir("/mine")
    f = await s.open("/mine/a", os.O_WRONLY | os.O_CREAT)
    s.close_file(f)
    await _denied(lambda: s.open("/ro/a", os.O_WRONLY | os.O_CREAT))
    await _denied(lambda: s.rename("/ro", "/free"))     # moving it would take its files out of the rule
    await _denied(lambda: s.rename("/mine", "/ro"))      # nor may anything take its place
    # `..` and other spellings are resolved before the rule is looked up
    await _denied(lambda: s.open("/mine/../ro/./b", os.O_WRONLY | os.O_CREAT))
    s.rename("/mine/a", "/ro/a")                   # rename on both sides is enough to move a file in
    await _denied(lambda: s.remove("/ro/a"))


@in_loop
async def test_a_drop_box_answers_stat_and_hash_only_for_the_connections_own_uploads(store, make_session) -> None:
    own: dict[str, None] = {}
    s, hasher, other = make_session(), make_session(), make_session()
    for x in (s, hasher, other):
        x.set_permissions(_rules(root="upload"))
    s._own = hasher._own = own  # two channels of one connection share what it uploaded
    f = await s.open("/mine", os.O_WRONLY | os.O_CREAT, trunc=True)
    await s.write(f, 0, b"abc")
    assert s.fd_for_hash(f) == f.fd              # check-file-handle of its own new file
    s.close_file(f)
    assert s.stat("/mine").st_size == 3 and hasher.stat("/mine").st_size == 3
    hasher.close_fd(hasher.open_for_hash("/mine"))
    assert "list" in await _denied(lambda: other.stat("/mine"))       # another connection learns nothing
    assert "download" in await _denied(lambda: other.open_for_hash("/mine"))


@in_loop
async def test_rules_follow_the_kernels_resolution_of_an_admins_symlinks(make_session) -> None:
    s = make_session()
    home = Path(s.jail._root_host)
    (home / "secret").mkdir()
    (home / "secret" / "f").write_bytes(b"classified")
    (home / "pub").mkdir()
    os.symlink("../secret/f", home / "pub" / "alias")      # a file link out of the open directory
    os.symlink("secret", home / "door")                    # a directory link
    s.set_permissions(_rules(root="*", secret="none", pub="list,download"))
    for path in ("/pub/alias", "/door/f"):
        assert "in /secret" in await _denied(lambda p=path: s.open(p, os.O_RDONLY))
        assert "in /secret" in await _denied(lambda p=path: s.open_for_hash(p))
    await _denied(lambda: s.open("/door/new", os.O_WRONLY | os.O_CREAT))
    await _denied(lambda: s.opendir("/door"))
    await _denied(lambda: s.remove("/door/f"))
    assert (home / "secret" / "f").read_bytes() == b"classified" and not (home / "secret" / "new").exists()


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


def test_a_path_that_does_not_resolve_is_judged_where_the_walk_stopped(make_session) -> None:
    """`_where` names the entry the kernel's walk stopped at, whatever the spelling: `drop/NAME/..`
    stops at NAME inside drop (a file is no directory, a missing name is missing), not at `/`."""
    s = make_session()
    home = Path(s.jail._root_host)
    (home / "drop" / "sub").mkdir(parents=True)
    (home / "drop" / "f").write_bytes(b"x")
    assert s._where("drop/f/..") == ("/drop", "/drop/f")
    assert s._where("drop/missing/..") == ("/drop", "/drop/missing")
    assert s._where("drop/missing/../../../x") == ("/drop", "/drop/missing")
    assert s._where("drop/sub/../new") == ("/drop", "/drop/new")        # resolves up to the new name
    assert s._where("nope/a/b") == ("/", "/nope")
    assert s._where("drop/sub/x/y") == ("/drop/sub", "/drop/sub/x")
    assert s._where("drop/f/") == ("/drop", "/drop/f")
    assert s._where("/") == ("/", "/")


@in_loop
async def test_bulk_writes_are_charged_like_writes_and_refused_whole(store, make_session) -> None:
    """copy-data's writes (`write_bulk`: the pwrite on a bulk thread) keep the ledger exact."""
    s = make_session()
    f = await s.open("a", os.O_WRONLY | os.O_CREAT)
    assert await s.write_bulk(f, 0, b"x" * (40 * KiB)) == 40 * KiB
    assert await s.write_bulk(f, 0, b"z" * (40 * KiB)) == 40 * KiB      # an overwrite grows nothing
    with pytest.raises(QuotaExceeded):
        await s.write_bulk(f, 40 * KiB, b"y" * (24 * KiB + 1))
    assert f.failed is not None and f.quota
    assert os.fstat(f.fd).st_size == 40 * KiB                            # nothing of the refused chunk landed
    await s.write_bulk(f, 40 * KiB, b"y" * (24 * KiB))                  # exactly to the quota
    s.close_file(f)
    g = await s.open("a", os.O_WRONLY, append=True)
    with pytest.raises(QuotaExceeded):
        await s.write_bulk(g, 0, b"!")                                   # append: at the end, past the quota
    s.close_file(g)
    await in_step(store, s)
    assert await charged(store, s) == 64 * KiB
    with open(os.path.join(s.jail._root_host, "a"), "rb") as fh:
        assert fh.read() == b"z" * (40 * KiB) + b"y" * (24 * KiB)


def test_a_bulk_write_whose_growth_outgrew_its_charge_writes_nothing(tmp_path: Path) -> None:
    """Another process may grow the file between the loop's charge and the thread's lock: the
    thread then reports the growth it still needs instead of writing past the charge."""
    from sshfiles.session import _locked_pwrite

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"a" * 100, 0)
        assert _locked_pwrite(fd, 50, False, b"b" * 100, 0, []) == 50         # 50 bytes of growth, none charged
        assert _locked_pwrite(fd, 0, True, b"b" * 10, 9, []) == 1             # append: all 10 bytes are growth
        assert os.fstat(fd).st_size == 100
        assert _locked_pwrite(fd, 50, False, b"b" * 100, 50, []) == (50, None)
        assert _locked_pwrite(fd, 0, True, b"c" * 10, 10, []) == (10, None)
        assert os.pread(fd, 200, 0) == b"a" * 50 + b"b" * 100 + b"c" * 10
    finally:
        os.close(fd)
