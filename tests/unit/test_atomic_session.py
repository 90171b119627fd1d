"""Atomic uploads and hooks in the session layer, in-process (real jail, real SQLite store, no SSH).

The black-box suites (tests/test_atomic_uploads.py, tests/test_hooks.py) drive the same code with real
clients; these are the fast checks of the rules: which opens take a temporary, what a close does with
it, the ledger after each step, and which operations fire which hook.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from test_session import charged, in_loop

from sshfiles import atomic
from sshfiles.hooks import HookEvent, HookRunner, parse_command
from sshfiles.quota import QuotaManager, scan_usage
from sshfiles.session import UserSession
from sshfiles.stores.sqlite import SQLiteAccountStore
from sshfiles.stores.worker import StoreWorker

W = os.O_WRONLY | os.O_CREAT


class Recorder(HookRunner):
    """A HookRunner that records what the session fires instead of running a command."""

    def __init__(self) -> None:
        super().__init__({"upload": "x", "download": "x", "delete": "x", "rename": "x"}, 1.0)
        self.fired: list[HookEvent] = []

    def fire(self, ev: HookEvent) -> bool:
        self.fired.append(ev)
        return True


@pytest.fixture
def env(tmp_path: Path):
    store = SQLiteAccountStore(tmp_path / "accounts")
    worker = StoreWorker(lambda: SQLiteAccountStore(tmp_path / "accounts"), 5.0)
    quotas = QuotaManager(worker, "test-owner")
    home = tmp_path / "homes" / "ana"
    home.mkdir(parents=True)
    store.add_user("ana", str(home), None, 1 << 20)
    sessions: list[UserSession] = []

    def make(mode: str) -> UserSession:
        s = UserSession("ana", str(home), quotas.ledger("ana"), peer="127.0.0.1:5000", upload_mode=mode,
                        hooks=Recorder())
        sessions.append(s)
        return s

    yield make, store, home
    for s in sessions:
        s.close()
    worker.close()
    store.close()


async def in_step(store: SQLiteAccountStore, s: UserSession, home: Path) -> None:
    usage = scan_usage(home)
    assert await charged(store, s) == usage.bytes
    assert store.require_user("ana").entries == usage.entries


def names(home: Path) -> list[str]:
    return sorted(os.listdir(home))


@in_loop
async def test_atomic_replacement_is_renamed_at_close_and_credits_the_old_file(env):
    make, store, home = env
    s = make("atomic")
    (home / "f").write_bytes(b"old" * 100)
    os.chmod(home / "f", 0o644)
    store.set_usage("ana", 300, 1)
    f = await s.open("f", W, trunc=True)
    assert f.vpath == "/f" and f.upload is not None
    await s.write(f, 0, b"new")
    assert (home / "f").read_bytes() == b"old" * 100
    assert [n for n, _ in s.listdir("/") if n not in (b".", b"..")] == [b"f"]  # the temporary is hidden
    await in_step(store, s, home)  # both charged while writing, as both are on disk
    s.close_file(f)
    assert names(home) == ["f"] and (home / "f").read_bytes() == b"new"
    await in_step(store, s, home)
    assert [(e.event, e.path, e.nbytes) for e in s.hooks.fired] == [("upload", "/f", 3)]  # type: ignore[union-attr]


@in_loop
async def test_atomic_failed_upload_is_removed_and_fires_nothing(env):
    make, store, home = env
    s = make("atomic")
    f = await s.open("d.bin", W, trunc=True)
    await s.write(f, 0, b"x" * 1000)
    f.failed = "quota exceeded"  # as a refused write leaves it
    s.close_file(f)
    assert names(home) == []
    await in_step(store, s, home)
    assert s.hooks.fired == []  # type: ignore[union-attr]


@in_loop
async def test_atomic_resume_keeps_the_partial_and_the_name_stands_for_it(env):
    make, store, home = env
    s = make("atomic-resume")
    f = await s.open("big", W, trunc=True)
    await s.write(f, 0, b"a" * 500)
    s.interrupted = True  # the client vanished with the handle open
    s.close_file(f)
    assert names(home) == [atomic.RESERVED_PREFIX + "p-big"]
    await in_step(store, s, home)
    r = make("atomic-resume")
    assert r.stat("big").st_size == 500                    # what a resuming client asks first
    with pytest.raises(FileNotFoundError):
        r.stat(atomic.RESERVED_PREFIX + "p-big")            # the partial itself has no name for a client
    g = await r.open("big", os.O_RDWR)                           # sshfiles-cli's r+b: continues the partial
    assert r.read(g, 0, 10) == b"a" * 10
    await r.write(g, 500, b"b" * 500)
    r.close_file(g)
    assert names(home) == ["big"] and (home / "big").read_bytes() == b"a" * 500 + b"b" * 500
    await in_step(store, r, home)


@in_loop
async def test_atomic_resume_refuses_a_second_writer_of_one_partial(env):
    make, _store, _home = env
    one, two = make("atomic-resume"), make("atomic-resume")
    f = await one.open("same", W, trunc=True)
    with pytest.raises(OSError) as info:
        await two.open("same", W, trunc=True)
    assert info.value.errno == errno.EBUSY
    one.close_file(f)
    g = await two.open("same", W, trunc=True)
    two.close_file(g)


@in_loop
async def test_exclusive_create_and_read_only_target_keep_their_meaning(env):
    make, store, home = env
    s = make("atomic")
    (home / "ro").write_bytes(b"keep")
    os.chmod(home / "ro", 0o444)
    store.set_usage("ana", 4, 1)
    with pytest.raises(FileExistsError):
        await s.open("ro", W | os.O_EXCL)
    with pytest.raises(PermissionError):
        await s.open("ro", W, trunc=True)
    f = await s.open("new", W | os.O_EXCL)
    (home / "new").write_bytes(b"someone else")  # the name was taken meanwhile: EXCL still holds at close
    with pytest.raises(FileExistsError):
        s.close_file(f)
    assert names(home) == ["new", "ro"] and (home / "ro").read_bytes() == b"keep"
    os.unlink(home / "new")
    await in_step(store, s, home)


@in_loop
async def test_existing_file_without_trunc_is_written_in_place(env):
    make, store, home = env
    s = make("atomic")
    (home / "db").write_bytes(b"0123456789")
    store.set_usage("ana", 10, 1)
    f = await s.open("db", os.O_RDWR)
    assert f.upload is None
    await s.write(f, 2, b"xx")
    s.close_file(f)
    assert (home / "db").read_bytes() == b"01xx456789"
    await in_step(store, s, home)


@in_loop
async def test_delete_rename_and_download_hooks_name_virtual_paths(env):
    make, _store, home = env
    s = make("standard")
    (home / "d").mkdir()
    (home / "d" / "a").write_bytes(b"abc")
    r = await s.open("d/../d/a", os.O_RDONLY)
    s.read(r, 0, 100)
    s.close_file(r)
    s.posix_rename("d/a", "/d/b")
    s.remove("d/b")
    fired = [(e.event, e.path, e.target, e.host_path) for e in s.hooks.fired]  # type: ignore[union-attr]
    d = str(home.resolve() / "d")
    assert fired == [("download", "/d/a", "", d + "/a"), ("rename", "/d/a", "/d/b", d + "/a"),
                     ("delete", "/d/b", "", d + "/b")]
    env_vars = s.hooks.fired[1].env()  # type: ignore[union-attr]
    assert env_vars["SSHFILES_TARGET"] == "/d/b" and env_vars["SSHFILES_HOST_TARGET"] == d + "/b"
    assert env_vars["SSHFILES_REMOTE_ADDR"] == "127.0.0.1:5000" and env_vars["SSHFILES_RESULT"] == "ok"


def test_temporary_names_and_modes():
    assert atomic.split_name(b"a/b/c") == (b"a/b/", b"c")
    assert atomic.split_name("/c") == (b"/", b"c")
    assert atomic.split_name(b"c") == (b"", b"c")
    for bad in (b"", b"dir/", b".", b"a/..", b"/", b".sshfiles-upload-p-x", b"/.sshfiles-upload-d/x"):
        assert atomic.split_name(bad) is None
    assert atomic.partial_path(b"x/y") == b"x/" + atomic.RESERVED_PREFIX.encode() + b"p-y"
    long = atomic.partial_path(b"n" * 250)
    assert long is not None and len(long) <= 255 and isinstance(long, atomic.ServerPath)
    t1, t2 = atomic.temp_path(b"y"), atomic.temp_path(b"y")
    assert t1 != t2 and t1 is not None and t1.startswith(atomic.RESERVED_PREFIX.encode() + b"t")
    with pytest.raises(ValueError, match="expected one of standard, atomic, atomic-resume"):
        atomic.parse_mode("Atomic")


def test_hook_queue_is_bounded_and_overflow_is_dropped():
    runner = HookRunner({"upload": "/bin/true"}, 1.0, workers=0, queue_size=3)  # nothing takes events off
    ev = HookEvent("upload", "ana", "/f", "/h/f", 1, "127.0.0.1:1")
    assert [runner.fire(ev) for _ in range(5)] == [True, True, True, False, False]
    assert not runner.fire(HookEvent("delete", "ana", "/f", "/h/f", 0, "x"))  # no hook for it: nothing queued
    assert runner.wants("upload") and not runner.wants("download")
    runner.close(wait=0)  # shutdown drops what is still queued
    assert runner._queue.empty()
    assert parse_command("/usr/bin/mover --to 'a dir'") == ["/usr/bin/mover", "--to", "a dir"]
    with pytest.raises(ValueError, match="cannot split"):
        parse_command("'open")


@in_loop
async def test_a_reserved_directory_is_not_reached_through_the_partial_fallback(env):
    make, _store, home = env
    s = make("atomic-resume")
    hidden = home / (atomic.RESERVED_PREFIX + "d")  # only an admin could make one
    hidden.mkdir()
    (hidden / "x").write_bytes(b"x")
    (hidden / (atomic.RESERVED_PREFIX + "p-y")).write_bytes(b"partial")
    for path in (hidden.name + "/x", hidden.name + "/y", "/" + hidden.name + "/y"):
        with pytest.raises(FileNotFoundError):
            s.stat(path)
        with pytest.raises(FileNotFoundError):
            await s.open(path, os.O_RDONLY)
        with pytest.raises(FileNotFoundError):
            await s.open(path, os.O_RDWR)
    assert [n for n, _ in s.listdir("/") if n not in (b".", b"..")] == []


@in_loop
async def test_an_exclusive_create_starts_a_partial_over(env):
    make, store, home = env
    s = make("atomic-resume")
    (home / (atomic.RESERVED_PREFIX + "p-n")).write_bytes(b"stale partial")
    store.set_usage("ana", 13, 1)
    f = await s.open("n", W | os.O_EXCL)
    await s.write(f, 0, b"new")
    s.close_file(f)
    assert names(home) == ["n"] and (home / "n").read_bytes() == b"new"
    await in_step(store, s, home)
