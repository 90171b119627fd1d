"""Shared folders in-process: the routing rules (folders.py) and the session's mounts (session.py)
with a real jail and a real SQLite store, no SSH. The black-box suite (tests/test_folders.py) drives
the same code through stock clients."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from sshfiles.folders import FolderMount, ancestor_names, holds_mount, mount_rules, route
from sshfiles.permissions import PermissionRules, parse_perms
from sshfiles.quota import QuotaExceeded, QuotaManager, scan_usage
from sshfiles.session import UserSession
from sshfiles.stores import folder_ledger
from sshfiles.stores.sqlite import SQLiteAccountStore
from sshfiles.stores.worker import StoreWorker

KiB = 1024


def test_route_holds_and_ancestors() -> None:
    mounts = {"/shared/team": "T", "/shared/reports": "R", "/x": "X"}
    assert route(mounts, "/shared/team") == ("T", "/")
    assert route(mounts, "/shared/team/a/b") == ("T", "/a/b")
    assert route(mounts, "/shared/teamwork") is None and route(mounts, "/shared") is None
    assert holds_mount(mounts, "/shared") and holds_mount(mounts, "/") and holds_mount(mounts, "/x")
    assert not holds_mount(mounts, "/shared/team/a") and not holds_mount(mounts, "/sha")
    assert ancestor_names(mounts, "/") == {"shared": None, "x": "/x"}
    assert ancestor_names(mounts, "/shared") == {"team": "/shared/team", "reports": "/shared/reports"}
    assert ancestor_names(mounts, "/x") == {}


def test_mount_rules_act_as_a_rule_at_the_mount_point() -> None:
    user = PermissionRules(7, {"/": parse_perms("list,download"), "/shared/team/in": parse_perms("upload"),
                               "/shared/teamwork": parse_perms("none")})
    rules = mount_rules(user, "/shared/team", parse_perms("*"))
    assert rules.rev == 7 and rules.rules == {"/": parse_perms("*"), "/in": parse_perms("upload")}
    assert not mount_rules(PermissionRules(), "/t", parse_perms("*")).restricted


@pytest.fixture
def env(tmp_path: Path):
    """(store, make_session): users alice and bob (home quota 64 KiB) with folder 'team' (32 KiB) at /team."""
    store = SQLiteAccountStore(tmp_path / "accounts")
    folder = tmp_path / "folders" / "team"
    folder.mkdir(parents=True)
    store.add_folder("team", str(folder), 32 * KiB)
    worker = StoreWorker(lambda: SQLiteAccountStore(tmp_path / "accounts"), 5.0)
    quotas = QuotaManager(worker, "test-owner")
    sessions: list[UserSession] = []

    def make(name: str, perms: str = "*") -> UserSession:
        home = tmp_path / "homes" / name
        if store.get_user(name) is None:
            home.mkdir(parents=True)
            store.add_user(name, str(home), None, 64 * KiB)
        mount = FolderMount("/team", "team", str(folder), folder_ledger("team"), parse_perms(perms))
        s = UserSession(name, str(home), quotas.ledger(name), mounts=[mount], ledger_of=quotas.ledger)
        sessions.append(s)
        return s

    yield store, make, folder
    for s in sessions:
        s.close()
    worker.close()
    store.close()


async def settled(store: SQLiteAccountStore, *sessions: UserSession) -> None:
    for s in sessions:
        for led in [s.ledger, *(c.ledger for c in s.mounts.values())]:
            led.settle(release_pool=True)
            await led.worker.call(lambda _store: None, request=False)
    await asyncio.sleep(0)


Env = tuple[SQLiteAccountStore, Callable[..., UserSession], Path]


def test_concurrent_writers_share_the_folders_quota_exactly(env: Env) -> None:
    store, make, folder = env

    async def run() -> None:
        alice, bob = make("alice"), make("bob")

        async def fill(s: UserSession, name: str) -> int:
            f = await s.open(f"/team/{name}", os.O_WRONLY | os.O_CREAT, trunc=True)
            written = 0
            try:
                while True:
                    try:
                        written += await s.write(f, written, b"x" * 1000)
                    except QuotaExceeded:
                        return written
            finally:
                s.close_file(f)

        wins = await asyncio.gather(fill(alice, "a"), fill(bob, "b"))
        await settled(store, alice, bob)
        usage = scan_usage(folder)
        assert sum(wins) == usage.bytes and 32 * KiB - 1000 < usage.bytes <= 32 * KiB
        assert store.charged(folder_ledger("team")) == usage.bytes
        assert store.entries_state(folder_ledger("team"))[2] == usage.entries == 2
        assert store.charged("alice") == store.charged("bob") == 0
        # a file removed by bob while alice still reads it is credited to the folder when she closes
        f = await alice.open("/team/a", os.O_RDONLY)
        bob.remove("/team/a")
        await settled(store, alice, bob)
        assert store.charged(folder_ledger("team")) == usage.bytes
        alice.close_file(f)
        await settled(store, alice, bob)
        assert store.charged(folder_ledger("team")) == scan_usage(folder).bytes == wins[1]

    asyncio.run(run())


def test_copy_between_home_and_folder_charges_each_side(env: Env) -> None:
    store, make, folder = env

    async def run() -> None:
        alice = make("alice")
        src = await alice.open("/home.bin", os.O_WRONLY | os.O_CREAT)
        await alice.write(src, 0, b"h" * 5000)
        alice.close_file(src)
        src = await alice.open("/home.bin", os.O_RDONLY)
        dst = await alice.open("/team/copy.bin", os.O_WRONLY | os.O_CREAT)
        assert await alice.copy_data(src, 0, 0, dst, 0) == 5000
        alice.close_file(src)
        alice.close_file(dst)
        await settled(store, alice)
        assert store.charged("alice") == 5000 and store.charged(folder_ledger("team")) == 5000
        with pytest.raises(OSError) as exc:
            alice.posix_rename("/team/copy.bin", "/moved.bin")
        assert exc.value.errno == errno.EXDEV
        assert (folder / "copy.bin").exists()
        space = await alice.space("/team/copy.bin")
        assert (space.quota, space.used) == (32 * KiB, 5000)
        assert (await alice.space("/")).quota == 64 * KiB
        fd = alice.open_for_hash("/team/copy.bin")
        alice.close_fd(fd)
        assert alice.handles == 0 and alice.ledger.open_handles == 0

    asyncio.run(run())


def test_read_only_mount_refuses_writes_and_a_permission_change_reaches_the_mount(env: Env) -> None:
    _store, make, folder = env
    (folder / "doc.txt").write_bytes(b"shared")

    async def run() -> None:
        bob = make("bob", "list,download")
        assert sorted(n for n, _ in bob.listdir("/team")) == [b".", b"..", b"doc.txt"]
        assert b"team" in {n for n, _ in bob.listdir("/")}
        with pytest.raises(PermissionError):
            await bob.open("/team/new.txt", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(PermissionError):
            bob.remove("/team/doc.txt")
        # a user rule below the mount overrides the mount's perms, as a deeper rule does
        bob.set_permissions(PermissionRules(1, {"/team/drop": parse_perms("upload")}))
        assert bob.mounts["/team"].perms.rules == {"/": parse_perms("list,download"), "/drop": parse_perms("upload")}

    asyncio.run(run())


def test_store_copy_carries_folders_their_usage_and_mounts(tmp_path: Path) -> None:
    from sshfiles.stores.copy import copy_store

    source, target = SQLiteAccountStore(tmp_path / "a"), SQLiteAccountStore(tmp_path / "b")
    try:
        source.add_user("alice", "/homes/alice", None, None)
        source.add_folder("team", "/srv/team", 1000, 20)
        source.set_usage(folder_ledger("team"), 300, 4)
        source.add_mount("alice", "team", "/shared/team", "list,download")
        copy_store(source, target)
        assert target.list_folders() == source.list_folders()
        assert target.charged(folder_ledger("team")) == 300
        assert target.mounts("alice") == source.mounts("alice")
    finally:
        source.close()
        target.close()
