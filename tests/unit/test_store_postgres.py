"""What only the PostgreSQL store has: node leases, the schema version table, errors that hide the DSN.

The shared contract (users, ledger, bans) runs against it in test_store_contract.py; here are the
parts where several nodes meet: a process that dies without a word (SIGKILL) must lose its
reservations after its lease, to exactly one reclaimer, and a database the server does not know
must stop it with one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import pg_schema

from sshfiles.quota import reconcile_dead_owners
from sshfiles.stores import AccountError, LiveSession, StoreCorrupt, open_store
from sshfiles.stores.postgres import _STEPS, SCHEMA_VERSION


@pytest.fixture
def url() -> Iterator[str]:
    with pg_schema() as u:
        yield u


# A serving process in miniature: registers an owner with a 1 s lease, reserves, says so, waits to die.
_NODE = """
import sys, time
from sshfiles.stores import open_store
store = open_store(sys.argv[1], lease=1.0)
owner = store.register_owner()
assert store.reserve(owner, "alice", 400)
print(owner, flush=True)
time.sleep(600)
"""


def test_a_killed_nodes_reservations_go_back_after_its_lease_to_one_reclaimer(url: str, tmp_path: Path) -> None:
    store = open_store(url, lease=1.0)
    try:
        home = tmp_path / "alice"
        home.mkdir()
        (home / "kept").write_bytes(b"x" * 123)  # what the dead node had written: the rescan finds it
        store.add_user("alice", str(home), None, 1000)
        node = subprocess.Popen([sys.executable, "-c", _NODE, url], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert node.stdout is not None
        owner = node.stdout.readline().strip()
        assert owner and store.owner_alive(owner) and store.charged("alice") == 400
        time.sleep(1.5)
        assert store.owner_alive(owner)  # its heartbeat keeps it alive past one lease
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        deadline = time.monotonic() + 10
        while store.owner_alive(owner) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not store.owner_alive(owner)
        # Two nodes notice at once: the user is rescanned by exactly one of them.
        others = [open_store(url, lease=1.0) for _ in range(2)]
        results: list[list[str]] = []
        barrier = threading.Barrier(2)

        def reclaim(s: object) -> None:
            barrier.wait()
            results.append(reconcile_dead_owners(s))  # type: ignore[arg-type]

        threads = [threading.Thread(target=reclaim, args=(s,)) for s in others]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for s in others:
            s.close()
        assert sorted(results) == [[], ["alice"]]
        assert store.owners() == [] and store.charged("alice") == 123
        assert store.reserve("w", "alice", 877) and not store.reserve("w", "alice", 1)
    finally:
        store.close()


def test_a_live_owner_is_never_reclaimed(url: str) -> None:
    store = open_store(url, lease=2.0)
    try:
        store.add_user("alice", "/nonexistent", None, 100)
        owner = store.register_owner()
        assert store.reserve(owner, "alice", 60)
        time.sleep(3)  # one and a half leases: the heartbeat (every lease/3) renewed it meanwhile
        other = open_store(url, lease=2.0)
        try:
            assert other.owner_alive(owner) and reconcile_dead_owners(other) == []
        finally:
            other.close()
        assert store.charged("alice") == 60
    finally:
        store.close()


def _set_version(url: str, version: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE sshfiles_schema SET version = %s", (version,))


def test_an_unknown_or_older_schema_is_refused_with_one_line(url: str) -> None:
    open_store(url).close()
    _set_version(url, SCHEMA_VERSION + 1)
    with pytest.raises(StoreCorrupt) as err:
        open_store(url)
    assert "unknown to this version" in str(err.value) and "\n" not in str(err.value)
    assert ":sshfiles@" not in str(err.value)  # the URL is shown without its password
    _set_version(url, 0)  # an older version (steps from 0 re-create the tables: only the check matters)
    with pytest.raises(StoreCorrupt, match="run `sshfiles store migrate`"):
        open_store(url)


def test_a_database_with_foreign_tables_is_not_adopted(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE somebody_elses (x int)")
    with pytest.raises(StoreCorrupt, match="no sshfiles schema version"):
        open_store(url)


def test_an_unreachable_database_fails_in_bounded_time_without_the_password() -> None:
    with pytest.raises(AccountError) as err:  # bounded by the connect timeout (and pytest's --timeout)
        open_store("postgresql://sshfiles:s3cret-pw@127.0.0.1:1/sshfiles")
    text = str(err.value)
    assert "s3cret-pw" not in text and "127.0.0.1:1/sshfiles" in text and "\n" not in text


def test_a_failed_call_is_one_generic_line_with_details_for_the_log(url: str) -> None:
    store = open_store(url)
    try:
        store.add_user("alice", "/h", None, 10)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE reservations")  # the database breaks under the server
        with pytest.raises(StoreCorrupt) as err:
            store.reserve("w", "alice", 1)
        assert str(err.value) == "the accounts store failed; try again later or ask the administrator"
        assert "reservations" in err.value.detail and "sshfiles:sshfiles" not in err.value.detail  # type: ignore[attr-defined]
    finally:
        store.close()


def test_a_node_taken_for_dead_during_an_outage_is_alive_again_at_its_next_beat(url: str) -> None:
    store = open_store(url, lease=1.0)
    other = open_store(url, lease=1.0)
    try:
        store.add_user("alice", "/nonexistent", None, 100)
        owner = store.register_owner()
        assert store.reserve(owner, "alice", 60)
        with psycopg.connect(url, autocommit=True) as conn:  # as if no beat reached the database for a lease
            conn.execute("UPDATE owners SET expires = now() - interval '1 second'")
        assert not other.owner_alive(owner)
        assert other.drop_owner(owner) == ["alice"] and other.charged("alice") == 0
        deadline = time.monotonic() + 10
        while not other.owner_alive(owner) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert other.owner_alive(owner)
    finally:
        other.close()
        store.close()


def test_a_v3_store_is_migrated_to_the_current_schema_keeping_its_accounts(url: str) -> None:
    """A cluster's database written by the v3 release: refused until `store migrate`, then every later
    feature (permissions, upload modes, live sessions) works on the old accounts."""
    with psycopg.connect(url) as conn:  # the v3 store exactly as the v3 release created it
        conn.execute("CREATE TABLE sshfiles_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO sshfiles_schema VALUES (3)")
        for stmt in _STEPS[3]:
            conn.execute(stmt)  # type: ignore[arg-type]  # our own constant SQL
        conn.execute("INSERT INTO users (name, home, password_hash, quota, used, created, auth_rev) "
                     "VALUES ('alice', '/h/alice', NULL, 100, 40, 0, 7)")
    with pytest.raises(StoreCorrupt, match="run `sshfiles store migrate`"):
        open_store(url)
    open_store(url, migrate=True).close()
    store = open_store(url)
    try:
        assert store.schema_version == SCHEMA_VERSION == 8  # type: ignore[attr-defined]
        acct = store.require_user("alice")
        assert (acct.used, acct.auth_rev, acct.upload_mode) == (40, 7, None)
        assert store.permissions("alice") == {}
        rev = store.permission_revs(["alice"])["alice"]
        store.set_permissions("alice", "/in", "upload")
        assert store.permissions("alice") == {"/in": frozenset({"upload"})}
        assert store.permission_revs(["alice"])["alice"] != rev
        store.set_upload_mode("alice", "atomic")
        assert store.require_user("alice").upload_mode == "atomic"
        owner = store.register_owner()
        store.set_sessions(owner, [LiveSession("c1", owner, 1, "alice", "192.0.2.1:22", 1.0, "")])
        assert [s.user for s in store.live_sessions()] == ["alice"]
    finally:
        store.close()


def test_check_refuses_a_read_only_database_and_a_replaced_store(url: str) -> None:
    """healthz asks `check`: a node whose database can no longer take a write (a hot standby, a
    database set read-only after a failover) or whose store was dropped must report unhealthy."""
    store = open_store(url)
    store.add_user("alice", "/h", None, 10)
    store.check()
    read_only = open_store(url + "%20-cdefault_transaction_read_only%3Don")  # the same store, reads only
    try:
        assert read_only.require_user("alice").name == "alice"
        with pytest.raises(AccountError) as err:
            read_only.check()
        assert "\n" not in str(err.value) and "sshfiles:sshfiles" not in str(err.value)
        store.check()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE sshfiles_schema")  # the store is gone from under the node
        with pytest.raises(AccountError):
            store.check()
    finally:
        read_only.close()
        store.close()
