"""The accounts store contract: what every backend must do, tested through the interface only.

Every test takes ``store`` (one open handle) or ``open_store`` (a factory for more handles on the same
backend, standing in for the several server processes that share one store). Both come from the
parametrised ``open_store`` fixture: SQLite, and PostgreSQL on a fresh schema per test (skipped, with
the reason, only where no PostgreSQL answers; see tests/conftest.py). To add a backend, add a param
and a branch that yields a factory for handles on a fresh, empty database; no test below may know
which backend it runs on.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import pg_schema

from sshfiles.stores import (
    LEDGER_MAX,
    UNLIMITED_ENTRIES,
    Account,
    AccountError,
    AccountStore,
    StoredKey,
    folder_ledger,
)
from sshfiles.stores import open_store as open_store_url
from sshfiles.stores.sqlite import SQLiteAccountStore

OpenStore = Callable[[], AccountStore]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite store, created once: creating one costs 15-40 ms of fsyncs, copying it 1 ms.
    (Creation itself is covered here and by every server start in the integration tests.)"""
    directory = tmp_path_factory.mktemp("template") / "accounts"
    SQLiteAccountStore(directory).close()
    assert not (directory / "accounts.db-wal").exists()  # closed cleanly: the one file is the store
    return directory


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """A factory of handles on one fresh, empty store; every handle is closed after the test."""
    handles: list[AccountStore] = []
    if request.param == "sqlite":
        shutil.copytree(request.getfixturevalue("sqlite_template"), tmp_path / "accounts")

        def factory() -> AccountStore:
            handle = open_store_url(f"sqlite:{tmp_path / 'accounts'}", busy_timeout=30)
            handles.append(handle)
            return handle
        yield factory
    elif request.param == "postgresql":
        with pg_schema() as url:
            def factory() -> AccountStore:
                handle = open_store_url(url)
                handles.append(handle)
                return handle
            try:
                yield factory
            finally:
                for handle in handles:
                    handle.close()
                handles.clear()
    else:  # pragma: no cover - a new backend must add its branch
        raise AssertionError(f"no factory for {request.param}")
    for handle in handles:
        handle.close()


@pytest.fixture
def store(open_store: OpenStore) -> AccountStore:
    return open_store()


def add(store: AccountStore, name: str = "alice", quota: int | None = None,
        password_hash: str | None = "$argon2id$stub") -> None:
    store.add_user(name, f"/homes/{name}", password_hash, quota)


def key(n: int) -> StoredKey:
    return StoredKey(f"SHA256:fp{n}", f"ssh-ed25519 AAAA{n} c{n}", f"c{n}")


# --------------------------------------------------------------------------- users


def test_add_and_get_user(store: AccountStore) -> None:
    add(store, "alice", quota=1000)
    acct = store.get_user("alice")
    assert acct is not None
    # auth_rev is opaque: only its changes mean something (they end live sessions).
    assert acct == Account(name="alice", home="/homes/alice", password_hash="$argon2id$stub", quota=1000, used=0,
                           disabled=False, auth_rev=acct.auth_rev, entries=0, max_entries=None,
                           perm_rev=acct.perm_rev, keys=[])
    assert acct.auth_methods == ["password"]


def test_unknown_user(store: AccountStore) -> None:
    assert store.get_user("nobody") is None
    with pytest.raises(AccountError):
        store.remove_user("nobody")
    for change in (lambda: store.set_password_hash("nobody", None), lambda: store.set_quota("nobody", 1),
                   lambda: store.add_key("nobody", key(1)), lambda: store.set_used("nobody", 1),
                   lambda: store.set_usage("nobody", 1, 1), lambda: store.set_max_entries("nobody", 1)):
        with pytest.raises(AccountError):
            change()


def test_duplicate_user_refused(store: AccountStore) -> None:
    add(store, "alice", quota=5)
    with pytest.raises(AccountError):
        add(store, "alice", quota=None)
    acct = store.get_user("alice")
    assert acct is not None and acct.quota == 5


@pytest.mark.parametrize("name", ["", "-rf", ".hidden", "a/b", "..", "a..b", "x" * 65, "sp ace", "é"])
def test_invalid_names_refused(store: AccountStore, name: str) -> None:
    with pytest.raises(AccountError):
        add(store, name)
    assert store.list_users() == []


def test_list_users_sorted(store: AccountStore) -> None:
    for name in ("carol", "alice", "bob"):
        add(store, name)
    assert [a.name for a in store.list_users()] == ["alice", "bob", "carol"]


def test_remove_user_returns_it_and_forgets_everything(store: AccountStore) -> None:
    add(store, "alice", quota=100)
    store.add_key("alice", key(1))
    assert store.reserve("w1", "alice", 10)
    removed = store.remove_user("alice")
    assert removed.name == "alice" and [k.fingerprint for k in removed.keys] == ["SHA256:fp1"]
    assert store.get_user("alice") is None and store.list_users() == []
    assert store.owners() == []
    add(store, "alice", quota=None)  # the name is free again, with nothing left over
    acct = store.get_user("alice")
    assert acct is not None and acct.keys == [] and acct.used == 0 and acct.quota is None


def test_password_and_quota_changes(store: AccountStore) -> None:
    add(store, "alice", password_hash=None)
    acct = store.get_user("alice")
    assert acct is not None and acct.password_hash is None and acct.auth_methods == []
    store.set_password_hash("alice", "$argon2id$new")
    store.set_quota("alice", 2**40)
    acct = store.get_user("alice")
    assert acct is not None and acct.password_hash == "$argon2id$new" and acct.quota == 2**40
    store.set_quota("alice", None)
    acct = store.get_user("alice")
    assert acct is not None and acct.quota is None


def test_fresh_store_is_empty(open_store: OpenStore) -> None:
    store = open_store()
    assert store.list_users() == [] and store.owners() == []


def test_other_handles_see_changes(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    add(first, "alice", quota=10)
    assert first.reserve("w1", "alice", 4)
    acct = second.get_user("alice")
    assert acct is not None and acct.used == 4 and second.quota_state("alice") == (10, 4)


# --------------------------------------------------------------------------- keys


def test_keys_add_list_remove(store: AccountStore) -> None:
    add(store, "alice", password_hash=None)
    for n in (3, 1, 2):
        store.add_key("alice", key(n))
    acct = store.get_user("alice")
    assert acct is not None and acct.keys == [key(3), key(1), key(2)]  # in the order added
    assert acct.auth_methods == ["publickey"]
    with pytest.raises(AccountError):
        store.add_key("alice", key(1))
    store.remove_key("alice", "SHA256:fp1")
    with pytest.raises(AccountError):
        store.remove_key("alice", "SHA256:fp1")
    acct = store.get_user("alice")
    assert acct is not None and [k.fingerprint for k in acct.keys] == ["SHA256:fp3", "SHA256:fp2"]


def test_keys_are_per_user(store: AccountStore) -> None:
    add(store, "alice")
    add(store, "bob")
    store.add_key("alice", key(1))
    store.add_key("bob", key(1))  # the same key may belong to two accounts
    store.remove_key("bob", "SHA256:fp1")
    alice, bob = store.get_user("alice"), store.get_user("bob")
    assert alice is not None and bob is not None and alice.keys == [key(1)] and bob.keys == []


# --------------------------------------------------------------------------- byte ledger


def test_reserve_admits_exactly_up_to_the_quota(store: AccountStore) -> None:
    add(store, "alice", quota=100)
    assert store.reserve("w1", "alice", 60)
    assert not store.reserve("w2", "alice", 41)
    assert store.reserve("w2", "alice", 40)
    assert not store.reserve("w1", "alice", 1)
    assert store.charged("alice") == 100 and store.quota_state("alice") == (100, 100)


def test_reserve_unknown_user_refused(store: AccountStore) -> None:
    assert not store.reserve("w1", "nobody", 1)
    assert store.owners() == []


def test_unlimited_quota_is_still_bounded_by_exact_integers(store: AccountStore) -> None:
    add(store, "alice", quota=None)
    assert store.reserve("w1", "alice", LEDGER_MAX - 1)
    assert store.reserve("w2", "alice", 1)
    assert not store.reserve("w3", "alice", 1)  # would leave the exact-integer range
    assert store.charged("alice") == LEDGER_MAX and store.quota_state("alice") == (None, LEDGER_MAX)


def test_settle_moves_reserved_bytes_into_used(store: AccountStore) -> None:
    add(store, "alice", quota=100)
    assert store.reserve("w1", "alice", 50)
    store.settle("w1", "alice", consumed=30, release=5)
    acct = store.get_user("alice")
    assert acct is not None and acct.used == 45  # 30 settled + 15 still reserved
    assert store.owners() == ["w1"]
    store.settle("w1", "alice", consumed=0, release=15)
    assert store.charged("alice") == 30 and store.owners() == []  # an emptied reservation is gone
    assert store.reserve("w2", "alice", 70) and not store.reserve("w2", "alice", 1)


def test_adjust_and_set_used(store: AccountStore) -> None:
    add(store, "alice", quota=100)
    store.adjust_used("alice", 40)
    store.adjust_used("alice", -15)
    assert store.charged("alice") == 25
    store.set_used("alice", 90)
    assert store.quota_state("alice") == (100, 90)
    assert not store.reserve("w1", "alice", 11) and store.reserve("w1", "alice", 10)


def test_charged_is_never_negative(store: AccountStore) -> None:
    add(store, "alice", quota=100)
    store.adjust_used("alice", -5)  # a credit that raced ahead of its charge
    assert store.charged("alice") == 0 and store.quota_state("alice") == (100, 0)


def test_lowered_quota_admits_nothing_more(store: AccountStore) -> None:
    add(store, "alice", quota=100)
    store.adjust_used("alice", 80)
    store.set_quota("alice", 50)
    assert not store.reserve("w1", "alice", 1)
    assert store.quota_state("alice") == (50, 80)


def test_quota_state_of_unknown_user(store: AccountStore) -> None:
    assert store.quota_state("nobody") == (0, 0) and store.charged("nobody") == 0


def test_ledger_is_per_user(store: AccountStore) -> None:
    add(store, "alice", quota=10)
    add(store, "bob", quota=10)
    assert store.reserve("w1", "alice", 10)
    assert store.reserve("w1", "bob", 10)
    assert store.charged("alice") == 10 and store.charged("bob") == 10


def _race(open_store: OpenStore, attempt: Callable[[AccountStore, int], bool], rounds: int) -> list[int]:
    """Two threads, each on its own handle (as two workers are), start together and call
    ``attempt(handle, thread_index)`` ``rounds`` times; returns each thread's number of successes."""
    handles = [open_store(), open_store()]
    barrier = threading.Barrier(2)
    wins = [0, 0]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(rounds):
                if attempt(handles[i], i):
                    wins[i] += 1
        except BaseException as exc:  # reported below: a thread's exception must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return wins


def test_reserve_race_never_over_admits(open_store: OpenStore) -> None:
    store = open_store()
    add(store, "alice", quota=1000)
    chunk = 7
    wins = _race(open_store, lambda s, i: s.reserve(f"w{i}", "alice", chunk), rounds=100)
    assert sum(wins) == 1000 // chunk  # every byte that fits was admitted, and not one more
    assert store.charged("alice") == sum(wins) * chunk <= 1000
    assert sorted(store.owners()) == [f"w{i}" for i in range(2) if wins[i]]


def test_charge_entries_race_never_over_admits(open_store: OpenStore) -> None:
    store = open_store()
    add(store, "alice")
    wins = _race(open_store, lambda s, i: s.charge_entries("alice", 1, 150), rounds=100)
    assert sum(wins) == 150
    assert store.entries_state("alice")[2] == 150


# --------------------------------------------------------------------------- entries ledger


def test_charge_entries_up_to_the_limit(store: AccountStore) -> None:
    add(store, "alice")
    assert store.charge_entries("alice", 3, 5)
    assert not store.charge_entries("alice", 3, 5)
    assert store.charge_entries("alice", 2, 5)
    assert not store.charge_entries("alice", 1, 5)
    assert store.charge_entries("alice", 1000, None)  # None: no limit
    assert store.entries_state("alice") == (None, None, 1005)


def test_charge_entries_unknown_user(store: AccountStore) -> None:
    assert not store.charge_entries("nobody", 1, None)
    assert store.entries_state("nobody") == (0, 0, 0)


def test_adjust_entries_and_set_usage(store: AccountStore) -> None:
    add(store, "alice", quota=4096)
    store.adjust_entries("alice", 7)
    store.adjust_entries("alice", -2)
    assert store.entries_state("alice") == (4096, None, 5)
    store.set_usage("alice", 1234, 42)  # a scan's result replaces both counters
    assert store.entries_state("alice") == (4096, None, 42)
    acct = store.get_user("alice")
    assert acct is not None and acct.used == 1234 and acct.entries == 42


def test_set_usage_keeps_live_reservations(store: AccountStore) -> None:
    add(store, "alice", quota=100)
    assert store.reserve("w1", "alice", 30)
    store.set_usage("alice", 10, 1)
    assert store.charged("alice") == 40


def test_set_max_entries(store: AccountStore) -> None:
    add(store, "alice")
    for value in (10, 0, UNLIMITED_ENTRIES, None):
        store.set_max_entries("alice", value)
        assert store.entries_state("alice")[1] == value
        acct = store.get_user("alice")
        assert acct is not None and acct.max_entries == value


def test_upload_mode_set_read_by_other_handles_and_reset(open_store: OpenStore) -> None:
    store, other = open_store(), open_store()
    add(store, "alice")
    add(store, "bob")
    assert other.require_user("alice").upload_mode is None          # None: the server's --upload-mode
    store.set_upload_mode("alice", "atomic-resume")
    assert other.require_user("alice").upload_mode == "atomic-resume"
    assert other.require_user("bob").upload_mode is None
    store.set_upload_mode("alice", None)
    assert other.require_user("alice").upload_mode is None
    with pytest.raises(AccountError, match="no such user"):
        store.set_upload_mode("nobody", "atomic")


# --------------------------------------------------------------------------- owners (server processes)


def test_owners_and_drop_owner(store: AccountStore) -> None:
    add(store, "alice", quota=100)
    add(store, "bob", quota=100)
    assert store.reserve("dead", "alice", 10) and store.reserve("dead", "bob", 20)
    assert store.reserve("live", "alice", 5)
    assert sorted(store.owners()) == ["dead", "live"]
    assert sorted(store.drop_owner("dead")) == ["alice", "bob"]
    assert store.owners() == ["live"]
    assert store.charged("alice") == 5 and store.charged("bob") == 0
    assert store.drop_owner("dead") == [] and store.drop_owner("never") == []


def test_reclaim_request_reaches_the_other_holders_only(open_store: OpenStore) -> None:
    """A refused owner asks the others for their unused pools: each other owner holding a reservation
    for that ledger key sees the request (from its own handle), the asker and idle owners do not, and
    a request nobody could answer is not recorded (the refusal is final)."""
    asker, holder, idle = open_store(), open_store(), open_store()
    add(asker, "alice", quota=100)
    add(asker, "bob", quota=100)
    asker.add_folder("team", "/srv/team", quota=100)
    team = folder_ledger("team")
    assert not asker.request_reclaim("w1", "alice")       # nobody else holds anything
    assert holder.reclaim_requests("w2") == []
    assert asker.reserve("w1", "alice", 10) and holder.reserve("w2", "alice", 80) and holder.reserve("w2", "bob", 5)
    idle.mark_present("w3", "alice")                       # a presence row holds no pool
    assert holder.reserve("w2", team, 30)
    assert asker.request_reclaim("w1", "alice") and asker.request_reclaim("w1", "alice")  # idempotent
    assert asker.request_reclaim("w1", team)
    assert holder.reclaim_requests("w2") == sorted(["alice", team])
    assert asker.reclaim_requests("w1") == [] and idle.reclaim_requests("w3") == []
    holder.settle("w2", "alice", consumed=0, release=80, keep_row=True)   # the answer: the pool goes back
    assert holder.reclaim_requests("w2") == [team]
    assert asker.reserve("w1", "alice", 90)                # what it was refused now fits
    asker.end_reclaim("w1", "alice")
    asker.end_reclaim("w1", team)
    assert holder.reclaim_requests("w2") == []
    assert asker.request_reclaim("w1", "bob") and holder.reclaim_requests("w2") == ["bob"]


def test_a_dead_askers_reclaim_requests_go_with_it(store: AccountStore) -> None:
    add(store, "alice", quota=100)
    assert store.reserve("holder", "alice", 50)
    assert store.request_reclaim("dead", "alice")
    assert "dead" in store.owners()                        # so reconcile_dead_owners finds it
    assert store.reclaim_requests("holder") == ["alice"]
    assert store.drop_owner("dead") == []
    assert store.reclaim_requests("holder") == [] and store.owners() == ["holder"]


def test_prune_bans_forgets_only_bans_that_ended_before(store: AccountStore) -> None:
    """Expired bans are kept for their strikes, until they ended longer ago than the strike memory."""
    store.ban("192.0.2.1", 1000.0, "auth-failed", 3)
    store.ban("192.0.2.2", 5000.0, "auth-failed", 1)
    store.ban("2001:db8::/64", 2000.0, "admin", 2)
    assert store.prune_bans(2000.0) == 1                    # ended before: gone; ended at 2000: kept
    assert [b.source for b in store.bans()] == ["192.0.2.2", "2001:db8::/64"]
    assert store.prune_bans(2000.0) == 0
    assert store.is_banned("192.0.2.2", now=4000.0)


# --------------------------------------------------------------------------- permissions


def test_permissions_set_list_unset(store: AccountStore) -> None:
    add(store, "alice")
    assert store.permissions("alice") == {}
    store.set_permissions("alice", "/", ["list", "download"])
    store.set_permissions("alice", "drop//in/", "upload")           # normalised: absolute, no trailing slash
    store.set_permissions("alice", "/closed", [])                   # no rights at all
    assert store.permissions("alice") == {"/": frozenset({"list", "download"}), "/drop/in": frozenset({"upload"}),
                                          "/closed": frozenset()}
    store.set_permissions("alice", "/drop/in", "*")                  # replaces, does not add
    assert store.permissions("alice")["/drop/in"] == frozenset({"*"})
    store.unset_permissions("alice", "/drop/in/")
    assert "/drop/in" not in store.permissions("alice")
    with pytest.raises(AccountError, match="no permission rule"):
        store.unset_permissions("alice", "/drop/in")


def test_permissions_refuse_bad_input_and_unknown_users(store: AccountStore) -> None:
    add(store, "alice")
    for path, perms in (("/a/../b", "list"), ("", "list"), ("/a", "list,fly"), ("/a", "")):
        with pytest.raises(AccountError):
            store.set_permissions("alice", path, perms)
    assert store.permissions("alice") == {}
    for call in (lambda: store.set_permissions("nobody", "/", "list"), lambda: store.permissions("nobody"),
                 lambda: store.unset_permissions("nobody", "/")):
        with pytest.raises(AccountError, match="no such user"):
            call()


def test_permission_rev_moves_with_every_change_and_is_per_user(open_store: OpenStore) -> None:
    store, other = open_store(), open_store()
    add(store, "alice")
    add(store, "bob")
    revs = other.permission_revs(["alice", "bob", "nobody"])
    assert set(revs) == {"alice", "bob"}
    store.set_permissions("alice", "/", "list")
    after = other.permission_revs(["alice", "bob"])
    assert after["alice"] != revs["alice"] and after["bob"] == revs["bob"]
    acct = other.get_user("alice")
    assert acct is not None and acct.perm_rev == after["alice"]
    store.unset_permissions("alice", "/")
    assert other.permission_revs(["alice"])["alice"] not in (revs["alice"], after["alice"])


def test_removed_user_loses_its_permissions(store: AccountStore) -> None:
    add(store, "alice")
    store.set_permissions("alice", "/", "list")
    store.remove_user("alice")
    add(store, "alice")
    assert store.permissions("alice") == {}


def test_check_passes_on_a_working_store_and_fails_once_it_is_gone(open_store: OpenStore) -> None:
    """healthz asks `check`: it must say no when the store cannot take a write any more."""
    store = open_store()
    store.check()
    path = getattr(store, "path", None)
    if path is None:  # pragma: no cover - a server backend tests this with its own outage
        pytest.skip("no file to remove for this backend")
    Path(path).rename(Path(str(path) + ".moved"))
    with pytest.raises(AccountError):
        store.check()


def test_live_sessions_are_per_owner_and_go_with_a_dead_owner(open_store: OpenStore) -> None:
    """`sshfiles status` reads what each server process wrote; a crashed process's rows are reconciled."""
    from sshfiles.quota import reconcile_dead_owners
    from sshfiles.stores import LiveSession

    store, worker = open_store(), open_store()
    try:
        a, b = worker.register_owner(), worker.register_owner()
        rows_a = [LiveSession("c1", a, 11, "alice", "192.0.2.1:5", 100.0, "upload /x 1.0 KiB"),
                  LiveSession("c2", a, 11, "bob", "192.0.2.2:6", 200.0, "")]
        worker.set_sessions(a, rows_a)
        worker.set_sessions(b, [LiveSession("c3", b, 12, "alice", "192.0.2.3:7", 150.0, "")])
        assert [s.conn for s in store.live_sessions()] == ["c1", "c3", "c2"]  # oldest login first
        assert store.live_sessions()[0] == rows_a[0]
        worker.set_sessions(a, rows_a[1:])  # c1 ended: the process writes its whole set again
        assert [s.conn for s in store.live_sessions()] == ["c3", "c2"]
        worker.release_owner(b)             # process b died without cleaning up
        reconcile_dead_owners(store)
        assert [s.conn for s in store.live_sessions()] == ["c2"]
    finally:
        worker.close()
        store.close()


def test_kick_bumps_auth_rev_and_refuses_unknown_users(store: AccountStore) -> None:
    store.add_user("alice", "/h/alice", None, None)
    before = store.auth_states(["alice"])["alice"]
    store.kick_user("alice")
    assert store.auth_states(["alice"])["alice"] == (before[0], before[1] + 1)
    with pytest.raises(AccountError):
        store.kick_user("nobody")


def test_owner_liveness_is_seen_by_other_handles(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    owner = first.register_owner()
    assert first.owner_alive(owner) and second.owner_alive(owner)
    first.release_owner(owner)
    assert not second.owner_alive(owner) and not second.owner_alive("never-registered")


# --------------------------------------------------------------------------- bans (shared by every node)


def test_bans_are_shared_and_a_later_ban_never_shortens(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    first.ban("192.0.2.1", 2000.0, "auth-failed", 1)
    second.ban("192.0.2.1", 1500.0, "refused", 2)       # shorter: the end stays, strikes grow
    first.ban("2001:db8::/64", 3000.5, "admin")
    assert [(b.source, b.until, b.strikes) for b in second.bans()] == \
        [("192.0.2.1", 2000.0, 2), ("2001:db8::/64", 3000.5, 1)]
    assert second.is_banned("192.0.2.1", now=1999) and not second.is_banned("192.0.2.1", now=2001)
    assert second.unban("192.0.2.1") and not first.unban("192.0.2.1")
    assert [b.source for b in first.bans()] == ["2001:db8::/64"]


# --------------------------------------------------------------------------- shared folders


def test_folders_add_get_list_remove(store: AccountStore) -> None:
    store.add_folder("team", "/srv/folders/team", 1000, 50)
    store.add_folder("archive", "/srv/folders/archive", None)
    team = store.get_folder("team")
    assert team is not None and (team.path, team.quota, team.max_entries, team.used, team.entries) == (
        "/srv/folders/team", 1000, 50, 0, 0)
    assert [f.name for f in store.list_folders()] == ["archive", "team"]
    with pytest.raises(AccountError, match="already exists"):
        store.add_folder("team", "/elsewhere", None)
    with pytest.raises(AccountError, match="invalid folder name"):
        store.add_folder("../x", "/x", None)
    assert store.remove_folder("archive").name == "archive"
    assert store.get_folder("archive") is None
    with pytest.raises(AccountError, match="no such folder"):
        store.remove_folder("archive")


def test_folder_ledger_is_its_own_principal(store: AccountStore) -> None:
    """A folder's ledger key works with every ledger method and never touches a user's numbers."""
    add(store, "alice", quota=100)
    store.add_folder("team", "/srv/team", 50)
    key = folder_ledger("team")
    assert store.reserve("w1", key, 40)
    assert not store.reserve("w2", key, 11)
    assert store.reserve("w2", key, 10)
    assert store.quota_state(key) == (50, 50) and store.charged("alice") == 0
    store.settle("w1", key, consumed=30, release=10)
    store.settle("w2", key, consumed=10, release=0)
    assert store.charged(key) == 40 and store.owners() == []
    assert store.charge_entries(key, 2, 2) and not store.charge_entries(key, 1, 2)
    store.adjust_entries(key, -1)
    assert store.entries_state(key) == (50, None, 1)
    store.set_usage(key, 7, 3)
    folder = store.get_folder("team")
    assert folder is not None and (folder.used, folder.entries) == (7, 3)
    store.set_max_entries(key, 9)
    assert store.entries_state(key) == (50, 9, 3)
    assert store.get_user("alice") is not None and store.entries_state("alice")[2] == 0
    with pytest.raises(AccountError, match="no such folder"):
        store.set_usage(folder_ledger("nope"), 0, 0)
    assert not store.reserve("w1", folder_ledger("nope"), 1)
    # a dead owner's folder reservation is reported for a rescan like a user's
    assert store.reserve("dead", key, 1)
    assert store.drop_owner("dead") == [key] and store.charged(key) == 7


def test_folder_without_quota_is_unlimited_but_counted(store: AccountStore) -> None:
    store.add_folder("open", "/srv/open", None)
    key = folder_ledger("open")
    assert store.reserve("w1", key, 10**12)
    store.settle("w1", key, consumed=10**12, release=0)
    assert store.quota_state(key) == (None, 10**12)


def test_folder_reserve_race_never_over_admits(open_store: OpenStore) -> None:
    store = open_store()
    store.add_folder("team", "/srv/team", 1000)
    key = folder_ledger("team")
    wins = _race(open_store, lambda s, i: s.reserve(f"w{i}", key, 7), rounds=100)
    assert sum(wins) == 1000 // 7 and store.charged(key) == sum(wins) * 7


def test_mounts_add_list_remove(store: AccountStore) -> None:
    add(store, "alice")
    add(store, "bob")
    store.add_folder("team", "/srv/team", None)
    store.add_mount("alice", "team", "/shared/team/", ["*"])
    store.add_mount("bob", "team", "shared/reports", "list,download")
    [m] = store.mounts("alice")
    assert (m.user, m.folder, m.vpath, m.perms) == ("alice", "team", "/shared/team", frozenset({"*"}))
    assert store.mounts("bob")[0].perms == frozenset({"list", "download"})
    for bad in ("/shared/team", "/shared", "/shared/team/sub"):
        with pytest.raises(AccountError, match="overlap"):
            store.add_mount("alice", "team", bad, "*")
    for user, folder, vpath, perms, msg in [("nobody", "team", "/t", "*", "no such user"),
                                            ("alice", "nope", "/t", "*", "no such folder"),
                                            ("alice", "team", "/", "*", "cannot be mounted at /"),
                                            ("alice", "team", "/a/../b", "*", "not allowed"),
                                            ("alice", "team", "/t", "fly", "unknown permission")]:
        with pytest.raises(AccountError, match=msg):
            store.add_mount(user, folder, vpath, perms)
    store.remove_mount("alice", "/shared/team")
    assert store.mounts("alice") == []
    with pytest.raises(AccountError, match="no folder mounted"):
        store.remove_mount("alice", "/shared/team")
    store.remove_folder("team")  # its mounts go with it
    assert store.mounts("bob") == []


def test_removed_user_loses_its_mounts(store: AccountStore) -> None:
    add(store, "alice")
    store.add_folder("team", "/srv/team", None)
    store.add_mount("alice", "team", "/t", "*")
    store.remove_user("alice")
    add(store, "alice")
    assert store.mounts("alice") == []
