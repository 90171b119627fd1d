"""The PostgreSQL backend of the store contract: one database shared by several sshfiles nodes.

It implements `AccountStore` (stores/base.py) with the same meaning as the SQLite store
(sqlite.py is the reference for every method's semantics), for an installation that has
outgrown one machine: N nodes behind a balancer share this database and one filesystem.

Synchronous and thread-safe: every call borrows a connection from a psycopg
`ConnectionPool` and runs one short transaction, so any thread (the server's store
thread, the watcher's) may call any method.  Every connection has a connect timeout
and a statement and lock timeout, so a dead or wedged database fails a call in
bounded time (`StoreCorrupt`, one generic line for users, ``.detail`` for the log).

Quotas are exact across nodes.  ``users.reserved`` is the sum of the user's
``reservations`` rows (kept equal by every statement that changes a row), and a
reservation is one conditional UPDATE of the user's row (see `reserve`).

Owners (serving processes) are rows of ``owners`` with a lease: a thread of the
process holding it pushes ``expires`` forward every lease/3 seconds, using the
database's clock (nodes' clocks never meet).  An owner whose lease ran out is dead
to everyone: `reconcile_dead_owners` (quota.py), run by every node's watcher, drops
its reservations, and ``DELETE ... RETURNING`` hands its users to exactly one node
for the rescan.

Schema: ``sshfiles_schema`` holds the version; `_STEPS` maps a version to the
statements that take the store from the previous one to it.  Versions match the
SQLite store's numbers (v3 = users, keys, reservations, bans, plus owners here; v4
permissions, v5 upload modes, v6 live sessions, v7 folders, v8 reclaim requests), so a later SQLite step N is ported
by adding ``N: [...]`` below.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from ..permissions import format_perms, normalize_rule_path, parse_perms
from .base import (
    LEDGER_MAX,
    Account,
    AccountError,
    Ban,
    Folder,
    LiveSession,
    Mount,
    StoreCorrupt,
    StoredKey,
    folder_ledger,
    ledger_row,
    validate_folder_name,
    validate_username,
)

__all__ = ["SCHEMA_VERSION", "PostgresAccountStore", "describe_url"]

log = logging.getLogger(__name__)

# v3 is where the PostgreSQL store starts (the SQLite store's v1-v3 in one step, plus owners).
# "user" is quoted as in SQLite's schema, so statements port between the two with few changes.
_STEPS: dict[int, list[str]] = {
    3: [
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            home TEXT NOT NULL,
            password_hash TEXT,
            quota BIGINT,
            used BIGINT NOT NULL DEFAULT 0,
            reserved BIGINT NOT NULL DEFAULT 0,
            created DOUBLE PRECISION NOT NULL,
            disabled BOOLEAN NOT NULL DEFAULT FALSE,
            auth_rev BIGINT NOT NULL DEFAULT 0,
            entries BIGINT NOT NULL DEFAULT 0,
            max_entries BIGINT
        )""",
        """CREATE TABLE keys (
            "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            fingerprint TEXT NOT NULL,
            key TEXT NOT NULL,
            comment TEXT NOT NULL DEFAULT '',
            seq BIGSERIAL,
            PRIMARY KEY ("user", fingerprint)
        )""",
        """CREATE TABLE reservations (
            owner TEXT NOT NULL,
            "user" TEXT NOT NULL,
            amount BIGINT NOT NULL,
            PRIMARY KEY (owner, "user")
        )""",
        """CREATE TABLE owners (
            owner TEXT PRIMARY KEY,
            node TEXT NOT NULL,
            expires TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE bans (
            source TEXT PRIMARY KEY,
            until DOUBLE PRECISION NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            strikes INTEGER NOT NULL DEFAULT 1
        )""",
    ],
    # v4: per-user, per-directory permissions (permissions.py) and their revision per user.
    4: [
        """CREATE TABLE permissions (
            "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            path TEXT NOT NULL,
            perms TEXT NOT NULL,
            PRIMARY KEY ("user", path)
        )""",
        "ALTER TABLE users ADD COLUMN perm_rev BIGINT NOT NULL DEFAULT 0",
    ],
    # v5: per-user upload mode (atomic.py; NULL = the server's --upload-mode).
    5: ["ALTER TABLE users ADD COLUMN upload_mode TEXT"],
    # v6: who is logged in where (`sshfiles status`), one row per connection, per server process
    # on any node; a dead owner's rows go when it is reconciled (drop_owner).
    6: [
        """CREATE TABLE sessions (
            conn TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            pid INTEGER NOT NULL,
            "user" TEXT NOT NULL,
            source TEXT NOT NULL,
            since DOUBLE PRECISION NOT NULL,
            doing TEXT NOT NULL DEFAULT ''
        )""",
    ],
    # v7: shared folders (sqlite.py's v7): their own ledger row (with `reserved`, as users have) and mounts.
    7: [
        """CREATE TABLE folders (
            name TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            quota BIGINT,
            max_entries BIGINT,
            used BIGINT NOT NULL DEFAULT 0,
            reserved BIGINT NOT NULL DEFAULT 0,
            entries BIGINT NOT NULL DEFAULT 0,
            created DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE mounts (
            "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            folder TEXT NOT NULL REFERENCES folders(name) ON DELETE CASCADE,
            vpath TEXT NOT NULL,
            perms TEXT NOT NULL,
            PRIMARY KEY ("user", vpath)
        )""",
    ],
    # v8: reclaim requests (sqlite.py's v8): a refused owner asks the others for their unused pools.
    8: [
        """CREATE TABLE reclaims (
            "user" TEXT NOT NULL,
            owner TEXT NOT NULL,
            PRIMARY KEY ("user", owner)
        )""",
    ],
}
SCHEMA_VERSION = max(_STEPS)
_MIGRATION_LOCK = 0x55F11E5  # pg_advisory_xact_lock key: one migrating node at a time

DEFAULT_LEASE = 15.0     # seconds an owner stays alive without a heartbeat
_TIMEOUT = 5.0           # connect, statement and lock timeout of every call, in seconds


def describe_url(url: str) -> str:
    """The URL without its password: what logs and admin messages may show."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":?"
    host = parts.hostname or "localhost"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _scrub(text: str, url: str) -> str:
    password = urlsplit(url).password
    text = " ".join(str(text).split())
    return text.replace(password, "***") if password else text


class PostgresAccountStore:
    """PostgreSQL implementation of `AccountStore`, for several nodes sharing one database."""

    def __init__(self, url: str, *, lease: float | None = None, timeout: float | None = None,
                 node: str | None = None, migrate: bool = False, pool_size: int = 4) -> None:
        timeout = _TIMEOUT if timeout is None else timeout  # open_store's busy_timeout (healthz: 1 s)
        self.url = url
        self.where = describe_url(url)
        self.lease = float(lease if lease is not None else os.environ.get("SSHFILES_NODE_LEASE", DEFAULT_LEASE))
        self.node = node or os.uname().nodename
        ms = int(timeout * 1000)
        try:
            given = conninfo_to_dict(url).get("options") or ""  # e.g. a search_path: kept, ours appended
        except psycopg.ProgrammingError as exc:
            raise StoreCorrupt(f"invalid PostgreSQL store URL {self.where}: {_scrub(str(exc), url)}") from None
        self._kwargs: dict[str, Any] = {
            "connect_timeout": max(1, int(timeout)),
            "options": f"{given} -c statement_timeout={ms} -c lock_timeout={ms} "
                       f"-c idle_in_transaction_session_timeout={ms}".strip(),
            "application_name": "sshfiles",
        }
        self._owned: set[str] = set()
        self._owned_lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        # Schema work on a direct connection first: its errors (refused, bad password, unknown
        # database) are the ones an admin needs verbatim; the pool only says "timed out".
        try:
            with psycopg.connect(url, **self._kwargs) as conn:
                self.schema_version = self._check_schema(conn, migrate)
        except psycopg.Error as exc:
            raise StoreCorrupt(f"cannot use the PostgreSQL store {self.where}: {_scrub(str(exc), url)}") from None
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=timeout, kwargs=self._kwargs,
                                    check=ConnectionPool.check_connection, name="sshfiles-store", open=True)

    # -- schema ----------------------------------------------------------------------------

    def _check_schema(self, conn: psycopg.Connection[Any], migrate: bool) -> int:
        """Create an empty store's schema; refuse an older one (unless migrating) or an unknown one."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            has_table = conn.execute("SELECT to_regclass('sshfiles_schema') IS NOT NULL").fetchone()
            if has_table and has_table[0]:
                row = conn.execute("SELECT version FROM sshfiles_schema").fetchone()
                version = int(row[0]) if row else 0
            else:
                other = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()").fetchone()
                if other and other[0]:
                    raise StoreCorrupt(f"PostgreSQL store {self.where} holds tables but no sshfiles schema version; "
                                       "use an empty database")
                conn.execute("CREATE TABLE sshfiles_schema (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO sshfiles_schema VALUES (0)")
                version, migrate = 0, True  # a new store: creating it is migrating from nothing
            if version > SCHEMA_VERSION or (version and version not in _STEPS):
                raise StoreCorrupt(f"PostgreSQL store {self.where} has schema v{version}, unknown to this version "
                                   f"of sshfiles (which knows up to v{SCHEMA_VERSION})")
            if version < SCHEMA_VERSION and not migrate:
                raise StoreCorrupt(f"PostgreSQL store {self.where} has schema v{version}, older than v{SCHEMA_VERSION}:"
                                   " run `sshfiles store migrate`")
            for step in sorted(v for v in _STEPS if v > version):
                for stmt in _STEPS[step]:
                    conn.execute(stmt)  # our own constant SQL
                conn.execute("UPDATE sshfiles_schema SET version = %s", (step,))
                version = step
            return version

    # -- plumbing --------------------------------------------------------------------------

    def _failed(self, exc: Exception) -> StoreCorrupt:
        """One generic line (it can reach a client); the DSN-free details go to ``detail`` for the log."""
        if isinstance(exc, PoolTimeout | psycopg.OperationalError):
            err = StoreCorrupt("the accounts store is unavailable; try again later")
        else:
            err = StoreCorrupt("the accounts store failed; try again later or ask the administrator")
        err.detail = f"accounts store {self.where}: {type(exc).__name__}: {_scrub(str(exc), self.url)}"  # type: ignore[attr-defined]
        return err

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor[Any]]:
        """One short transaction on a pooled connection (committed when the block ends)."""
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except AccountError:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failed(exc) from None

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._tx() as cur:
            cur.execute(sql, args)  # constant SQL, values bound
            return cur.fetchall()

    @staticmethod
    def _lock_user(cur: psycopg.Cursor[Any], name: str) -> bool:
        """Lock the user's row first in every transaction that touches its reservations: one lock
        order everywhere (user row, then reservation rows), so two nodes never deadlock."""
        table, key, _ = ledger_row(name)  # a folder's ledger row (folder_ledger) as a user's
        cur.execute(f"SELECT 1 FROM {table} WHERE name = %s FOR UPDATE", (key,))
        return cur.fetchone() is not None

    def close(self) -> None:
        self._stop.set()
        for owner in list(self._owned):
            with contextlib.suppress(AccountError):
                self.release_owner(owner)
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=_TIMEOUT + 1)
        self._pool.close()

    # -- accounts --------------------------------------------------------------------------

    def add_user(self, name: str, home: str, password_hash: str | None, quota: int | None) -> None:
        validate_username(name)
        now = time.time()
        with self._tx() as cur:
            # auth_rev and perm_rev start at the creation time in ms (see sqlite.py: a re-created
            # name must not match a removed account's live session or its loaded rules).
            cur.execute("INSERT INTO users (name, home, password_hash, quota, used, created, auth_rev, perm_rev) "
                        "VALUES (%s, %s, %s, %s, 0, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                        (name, home, password_hash, quota, now, int(now * 1000), int(now * 1000)))
            if cur.rowcount == 0:
                raise AccountError(f"user {name!r} already exists")

    def get_user(self, name: str) -> Account | None:
        with self._tx() as cur:
            cur.execute("SELECT name, home, password_hash, quota, used, disabled, auth_rev, entries, max_entries, "
                        "perm_rev, upload_mode, reserved FROM users WHERE name = %s", (name,))
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute('SELECT fingerprint, key, comment FROM keys WHERE "user" = %s ORDER BY seq', (name,))
            keys = [StoredKey(*r) for r in cur.fetchall()]
        acct = Account(*row[:11])
        acct.disabled = bool(acct.disabled)
        acct.used = max(0, row[4] + row[11])
        acct.keys = keys
        return acct

    def require_user(self, name: str) -> Account:
        acct = self.get_user(name)
        if acct is None:
            raise AccountError(f"no such user: {name}")
        return acct

    def list_users(self) -> list[Account]:
        return [a for n, in self._query("SELECT name FROM users ORDER BY name COLLATE \"C\"")
                if (a := self.get_user(n))]

    def remove_user(self, name: str) -> Account:
        acct = self.require_user(name)
        with self._tx() as cur:
            self._lock_user(cur, name)
            cur.execute('DELETE FROM reservations WHERE "user" = %s', (name,))
            cur.execute("DELETE FROM users WHERE name = %s", (name,))  # keys, permissions, mounts: ON DELETE CASCADE
        return acct

    def _update_user(self, sql: str, args: tuple[Any, ...], name: str) -> None:
        with self._tx() as cur:
            cur.execute(sql, args)
            if cur.rowcount == 0:
                raise AccountError(f"no such user: {name}")

    def set_password_hash(self, name: str, password_hash: str | None) -> None:
        self._update_user("UPDATE users SET password_hash = %s, auth_rev = auth_rev + 1 WHERE name = %s",
                          (password_hash, name), name)

    def rehash_password(self, name: str, old_hash: str, new_hash: str) -> bool:
        with self._tx() as cur:
            cur.execute("UPDATE users SET password_hash = %s WHERE name = %s AND password_hash = %s",
                        (new_hash, name, old_hash))
            return cur.rowcount == 1

    def set_disabled(self, name: str, disabled: bool) -> None:
        self._update_user("UPDATE users SET disabled = %s, auth_rev = auth_rev + %s WHERE name = %s",
                          (disabled, 1 if disabled else 0, name), name)

    def auth_states(self, names: list[str]) -> dict[str, tuple[bool, int]]:
        rows = self._query("SELECT name, disabled, auth_rev FROM users WHERE name = ANY(%s)", (list(names),))
        return {name: (bool(disabled), rev) for name, disabled, rev in rows}

    # -- permissions -----------------------------------------------------------------------

    def set_permissions(self, name: str, path: str, perms: Iterable[str]) -> None:
        """Set (or replace) NAME's rule for the directory PATH; a bad path or word is an AccountError.

        The perm_rev bump comes first: it locks the user's row, so a concurrent removal either
        happens before (no such user) or waits (and cascades the new rule away)."""
        try:
            path = normalize_rule_path(path)
            text = format_perms(parse_perms(perms))
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        with self._tx() as cur:
            cur.execute("UPDATE users SET perm_rev = perm_rev + 1 WHERE name = %s", (name,))
            if cur.rowcount == 0:
                raise AccountError(f"no such user: {name}")
            cur.execute('INSERT INTO permissions ("user", path, perms) VALUES (%s, %s, %s) '
                        'ON CONFLICT ("user", path) DO UPDATE SET perms = EXCLUDED.perms', (name, path, text))

    def unset_permissions(self, name: str, path: str) -> None:
        """Remove NAME's rule for PATH (the rule above it applies again); no rule: AccountError,
        and the transaction (with its perm_rev bump) is rolled back."""
        try:
            path = normalize_rule_path(path)
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        with self._tx() as cur:
            cur.execute("UPDATE users SET perm_rev = perm_rev + 1 WHERE name = %s", (name,))
            if cur.rowcount == 0:
                raise AccountError(f"no such user: {name}")
            cur.execute('DELETE FROM permissions WHERE "user" = %s AND path = %s', (name, path))
            if cur.rowcount == 0:
                raise AccountError(f"user {name!r} has no permission rule for {path}")

    def permissions(self, name: str) -> dict[str, frozenset[str]]:
        """NAME's rules, directory -> permission set (empty: '*' everywhere), in one read."""
        rows = self._query('SELECT p.path, p.perms FROM users u LEFT JOIN permissions p ON p."user" = u.name '
                           "WHERE u.name = %s", (name,))
        if not rows:
            raise AccountError(f"no such user: {name}")
        return {path: parse_perms(perms) for path, perms in rows if path is not None}

    def permission_revs(self, names: list[str]) -> dict[str, int]:
        """perm_rev of each named account that exists, in one read (the session watcher's query)."""
        rows = self._query("SELECT name, perm_rev FROM users WHERE name = ANY(%s)", (list(names),))
        return {name: rev for name, rev in rows}

    def set_quota(self, name: str, quota: int | None) -> None:
        self._update_user("UPDATE users SET quota = %s WHERE name = %s", (quota, name), name)

    def add_key(self, name: str, key: StoredKey) -> None:
        with self._tx() as cur:
            if not self._lock_user(cur, name):
                raise AccountError(f"no such user: {name}")
            cur.execute('INSERT INTO keys ("user", fingerprint, key, comment) VALUES (%s, %s, %s, %s) '
                        "ON CONFLICT DO NOTHING", (name, key.fingerprint, key.key, key.comment))
            if cur.rowcount == 0:
                raise AccountError(f"user {name!r} already has key {key.fingerprint}")
            cur.execute("UPDATE users SET auth_rev = auth_rev + 1 WHERE name = %s", (name,))

    def remove_key(self, name: str, fingerprint: str) -> None:
        with self._tx() as cur:
            if not self._lock_user(cur, name):
                raise AccountError(f"no such user: {name}")
            cur.execute('DELETE FROM keys WHERE "user" = %s AND fingerprint = %s', (name, fingerprint))
            if cur.rowcount == 0:
                raise AccountError(f"user {name!r} has no key {fingerprint}")
            cur.execute("UPDATE users SET auth_rev = auth_rev + 1 WHERE name = %s", (name,))

    # -- usage ledger ----------------------------------------------------------------------

    def reserve(self, owner: str, name: str, amount: int) -> bool:
        """Atomically reserve `amount` bytes for `owner` if the quota allows it, on any node.

        Why one conditional UPDATE is exact across nodes: the UPDATE takes the user row's lock,
        so concurrent reservations for one user (from any node) run one after the other; under
        READ COMMITTED a waiting UPDATE re-evaluates its WHERE against the row as the previous
        holder committed it (PostgreSQL's EvalPlanQual recheck), so every admission checks
        ``used + reserved + amount <= quota`` on the latest committed values, and ``reserved``
        moves in the same transaction as the owner's reservation row.  No read-then-write gap
        exists for a race to slip through.  Compared as NUMERIC so a sum near LEDGER_MAX
        cannot overflow BIGINT; a user without a quota is bounded by LEDGER_MAX (exact integers).
        """
        table, key, _ = ledger_row(name)
        with self._tx() as cur:
            cur.execute(f"UPDATE {table} SET reserved = reserved + %s WHERE name = %s "
                        "AND used::numeric + reserved::numeric + %s <= COALESCE(quota, %s)",
                        (amount, key, amount, LEDGER_MAX))
            if cur.rowcount != 1:
                return False
            cur.execute('INSERT INTO reservations (owner, "user", amount) VALUES (%s, %s, %s) '
                        'ON CONFLICT (owner, "user") DO UPDATE SET amount = reservations.amount + EXCLUDED.amount',
                        (owner, name, amount))
            return True

    def settle(self, owner: str, name: str, consumed: int, release: int, keep_row: bool = False) -> None:
        """Move `consumed` reserved bytes into `used`, give `release` back (sqlite.py's meaning).

        ``reserved`` only moves with a reservation row that exists: a row another node reclaimed
        (this owner's lease ran out) was already taken out of ``reserved`` then."""
        table, key, _ = ledger_row(name)
        with self._tx() as cur:
            self._lock_user(cur, name)
            cur.execute(f"UPDATE {table} SET used = used + %s WHERE name = %s", (consumed, key))
            cur.execute('UPDATE reservations SET amount = amount - %s WHERE owner = %s AND "user" = %s',
                        (consumed + release, owner, name))
            if cur.rowcount:
                cur.execute(f"UPDATE {table} SET reserved = reserved - %s WHERE name = %s", (consumed + release, key))
            if not keep_row:
                self._drop_empty(cur, owner, name)

    @staticmethod
    def _drop_empty(cur: psycopg.Cursor[Any], owner: str, name: str) -> None:
        """Delete the owner's emptied row for `name`, keeping ``reserved`` equal to the rows' sum."""
        cur.execute('DELETE FROM reservations WHERE owner = %s AND "user" = %s AND amount <= 0 RETURNING amount',
                    (owner, name))
        row = cur.fetchone()
        if row and row[0]:
            table, key, _ = ledger_row(name)
            cur.execute(f"UPDATE {table} SET reserved = reserved - %s WHERE name = %s", (row[0], key))

    def reservation(self, owner: str, name: str) -> int:
        rows = self._query('SELECT amount FROM reservations WHERE owner = %s AND "user" = %s', (owner, name))
        return int(rows[0][0]) if rows else 0

    def mark_present(self, owner: str, name: str) -> None:
        with self._tx() as cur:
            cur.execute('INSERT INTO reservations (owner, "user", amount) VALUES (%s, %s, 0) ON CONFLICT DO NOTHING',
                        (owner, name))

    def unmark_present(self, owner: str, name: str) -> None:
        with self._tx() as cur:
            self._lock_user(cur, name)
            self._drop_empty(cur, owner, name)

    def request_reclaim(self, owner: str, name: str) -> bool:
        """Ask the other owners (any node) holding a reservation for `name` for their unused pools
        (sqlite.py's meaning); False, and nothing recorded, when no other owner holds any."""
        with self._tx() as cur:
            cur.execute('SELECT 1 FROM reservations WHERE "user" = %s AND owner <> %s AND amount > 0 LIMIT 1',
                        (name, owner))
            if cur.fetchone() is None:
                return False
            cur.execute('INSERT INTO reclaims ("user", owner) VALUES (%s, %s) ON CONFLICT DO NOTHING', (name, owner))
            return True

    def reclaim_requests(self, owner: str) -> list[str]:
        return [u for u, in self._query(
            'SELECT DISTINCT c."user" FROM reclaims c JOIN reservations r ON r."user" = c."user" '
            'WHERE r.owner = %s AND r.amount > 0 AND c.owner <> %s ORDER BY c."user"', (owner, owner))]

    def end_reclaim(self, owner: str, name: str) -> None:
        with self._tx() as cur:
            cur.execute('DELETE FROM reclaims WHERE "user" = %s AND owner = %s', (name, owner))

    def _update_ledger(self, sql: str, args: tuple[Any, ...], name: str) -> None:
        """`sql` with {t} the ledger's table: an AccountError if the user or folder does not exist."""
        table, key, what = ledger_row(name)
        with self._tx() as cur:
            cur.execute(sql.format(t=table), (*args, key))
            if cur.rowcount == 0:
                raise AccountError(f"no such {what}: {key}")

    def adjust_used(self, name: str, delta: int) -> None:
        table, key, _ = ledger_row(name)
        with self._tx() as cur:
            cur.execute(f"UPDATE {table} SET used = used + %s WHERE name = %s", (delta, key))

    def set_used(self, name: str, used: int) -> None:
        self._update_ledger("UPDATE {t} SET used = %s WHERE name = %s", (used,), name)

    def charged(self, name: str) -> int:
        table, key, _ = ledger_row(name)
        rows = self._query(f"SELECT used, reserved FROM {table} WHERE name = %s", (key,))
        return max(0, rows[0][0] + rows[0][1]) if rows else 0

    def quota_state(self, name: str) -> tuple[int | None, int]:
        table, key, _ = ledger_row(name)
        rows = self._query(f"SELECT quota, used, reserved FROM {table} WHERE name = %s", (key,))
        if not rows:
            return 0, 0
        return rows[0][0], max(0, rows[0][1] + rows[0][2])

    # -- entries ledger --------------------------------------------------------------------

    def charge_entries(self, name: str, n: int, limit: int | None) -> bool:
        """Count `n` new entries if they fit under `limit`: one conditional UPDATE (see `reserve`)."""
        table, key, _ = ledger_row(name)
        with self._tx() as cur:
            cur.execute(f"UPDATE {table} SET entries = entries + %s WHERE name = %s "
                        "AND entries::numeric + %s <= %s", (n, key, n, LEDGER_MAX if limit is None else limit))
            return cur.rowcount == 1

    def adjust_entries(self, name: str, delta: int) -> None:
        table, key, _ = ledger_row(name)
        with self._tx() as cur:
            cur.execute(f"UPDATE {table} SET entries = entries + %s WHERE name = %s", (delta, key))

    def set_usage(self, name: str, used: int, entries: int) -> None:
        self._update_ledger("UPDATE {t} SET used = %s, entries = %s WHERE name = %s", (used, entries), name)

    def set_max_entries(self, name: str, max_entries: int | None) -> None:
        self._update_ledger("UPDATE {t} SET max_entries = %s WHERE name = %s", (max_entries,), name)

    def set_upload_mode(self, name: str, mode: str | None) -> None:
        """A user's upload mode (atomic.MODES), or None for the server's default."""
        self._update_user("UPDATE users SET upload_mode = %s WHERE name = %s", (mode, name), name)

    def entries_state(self, name: str) -> tuple[int | None, int | None, int]:
        table, key, _ = ledger_row(name)
        rows = self._query(f"SELECT quota, max_entries, entries FROM {table} WHERE name = %s", (key,))
        if not rows:
            return 0, 0, 0
        return rows[0][0], rows[0][1], rows[0][2]

    # -- owners (serving processes, on any node) --------------------------------------------

    def register_owner(self) -> str:
        """A new owner id for this process, alive while its heartbeat thread renews the lease."""
        owner = f"{self.node}-{os.getpid()}-{os.urandom(4).hex()}"
        with self._tx() as cur:
            cur.execute("INSERT INTO owners (owner, node, expires) VALUES (%s, %s, now() + make_interval(secs => %s))",
                        (owner, self.node, self.lease))
        with self._owned_lock:
            self._owned.add(owner)
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name="sshfiles-lease", daemon=True)
                self._heartbeat.start()
        return owner

    def _beat(self) -> None:
        """Renew this process's leases every lease/3 s; a failed renewal is retried on the next beat
        (after a whole lease without one, other nodes take this process for dead)."""
        while not self._stop.wait(self.lease / 3):
            with self._owned_lock:
                owned = list(self._owned)
            if not owned:
                continue
            try:
                with self._tx() as cur:
                    # An upsert, not an UPDATE: after an outage longer than the lease, another node may
                    # have taken this process for dead and deleted its row (and reclaimed its
                    # reservations, which quota.py notices); the process is alive again from now on.
                    for owner in owned:
                        cur.execute("INSERT INTO owners (owner, node, expires) VALUES "
                                    "(%s, %s, now() + make_interval(secs => %s)) ON CONFLICT (owner) "
                                    "DO UPDATE SET expires = EXCLUDED.expires", (owner, self.node, self.lease))
                    # Forget long-dead owners that left nothing to reclaim.
                    cur.execute("DELETE FROM owners o WHERE expires < now() - interval '1 day' AND NOT EXISTS "
                                "(SELECT 1 FROM reservations r WHERE r.owner = o.owner)")
            except AccountError as exc:
                log.error("cannot renew the node lease: %s", getattr(exc, "detail", exc))

    def release_owner(self, owner: str) -> None:
        with self._owned_lock:
            if owner not in self._owned:
                return
            self._owned.discard(owner)
        with self._tx() as cur:
            cur.execute("DELETE FROM owners WHERE owner = %s", (owner,))

    def owner_alive(self, owner: str) -> bool:
        if owner in self._owned:
            return True
        rows = self._query("SELECT expires > now() FROM owners WHERE owner = %s", (owner,))
        return bool(rows and rows[0][0])

    def owners(self) -> list[str]:
        """Owners that hold reservations or live-session rows (what `reconcile_dead_owners` checks)."""
        return [o for o, in self._query("SELECT owner FROM reservations UNION SELECT owner FROM sessions "
                                        "UNION SELECT owner FROM reclaims ORDER BY owner")]

    def drop_owner(self, owner: str) -> list[str]:
        """Forget a process's reservations and live-session rows; returns the users to rescan.
        Concurrent callers (two nodes noticing the same death) get disjoint answers: a row is
        deleted, and returned, once."""
        with self._tx() as cur:
            cur.execute('SELECT name FROM users WHERE name IN (SELECT "user" FROM reservations WHERE owner = %s) '
                        "ORDER BY name FOR UPDATE", (owner,))
            cur.execute("SELECT name FROM folders WHERE %s || name IN "
                        '(SELECT "user" FROM reservations WHERE owner = %s) ORDER BY name FOR UPDATE',
                        (folder_ledger(""), owner))
            cur.execute('DELETE FROM reservations WHERE owner = %s RETURNING "user", amount', (owner,))
            gone = cur.fetchall()
            for name, amount in gone:
                if amount:
                    table, key, _ = ledger_row(name)
                    cur.execute(f"UPDATE {table} SET reserved = reserved - %s WHERE name = %s", (amount, key))
            cur.execute("DELETE FROM sessions WHERE owner = %s", (owner,))
            cur.execute("DELETE FROM reclaims WHERE owner = %s", (owner,))
            if owner not in self._owned:
                cur.execute("DELETE FROM owners WHERE owner = %s AND expires <= now()", (owner,))
        return sorted(name for name, _ in gone)

    # -- bans --------------------------------------------------------------------------------

    def ban(self, source: str, until: float, reason: str, strikes: int = 1) -> None:
        with self._tx() as cur:
            cur.execute("INSERT INTO bans (source, until, reason, strikes) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (source) DO UPDATE SET until = GREATEST(bans.until, EXCLUDED.until), "
                        "reason = EXCLUDED.reason, strikes = GREATEST(bans.strikes, EXCLUDED.strikes)",
                        (source, until, reason, strikes))

    def unban(self, source: str) -> bool:
        with self._tx() as cur:
            cur.execute("DELETE FROM bans WHERE source = %s", (source,))
            return cur.rowcount > 0

    def bans(self) -> list[Ban]:
        return [Ban(*row) for row in self._query(
            'SELECT source, until, reason, strikes FROM bans ORDER BY source COLLATE "C"')]

    def is_banned(self, source: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return bool(self._query("SELECT 1 FROM bans WHERE source = %s AND until > %s", (source, now)))

    def prune_bans(self, expired_before: float) -> int:
        """Forget bans that ended before `expired_before` (epoch seconds), strikes and all."""
        with self._tx() as cur:
            cur.execute("DELETE FROM bans WHERE until < %s", (expired_before,))
            return cur.rowcount

    # -- live sessions (sshfiles status) ----------------------------------------------------

    def set_sessions(self, owner: str, sessions: list[LiveSession]) -> None:
        """Make `sessions` the rows of `owner` (one process's whole set, in one transaction).

        A connection id already stored under another owner is taken over, as SQLite's INSERT OR
        REPLACE does (ids are random per connection: in practice a clash never happens)."""
        with self._tx() as cur:
            cur.execute("DELETE FROM sessions WHERE owner = %s", (owner,))
            if sessions:
                cur.executemany(
                    'INSERT INTO sessions (conn, owner, pid, "user", source, since, doing) '
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (conn) DO UPDATE SET owner = EXCLUDED.owner, "
                    'pid = EXCLUDED.pid, "user" = EXCLUDED."user", source = EXCLUDED.source, '
                    "since = EXCLUDED.since, doing = EXCLUDED.doing",
                    [(s.conn, owner, s.pid, s.user, s.source, s.since, s.doing) for s in sessions])

    def live_sessions(self) -> list[LiveSession]:
        """Every node's rows, oldest login first (a dead process's rows until it is reconciled)."""
        return [LiveSession(*row) for row in self._query(
            'SELECT conn, owner, pid, "user", source, since, doing FROM sessions ORDER BY since, conn COLLATE "C"')]

    def kick_user(self, name: str) -> None:
        """End the user's sessions on every node: each node's watcher sees auth_rev change."""
        self._update_user("UPDATE users SET auth_rev = auth_rev + 1 WHERE name = %s", (name,), name)

    # -- health ---------------------------------------------------------------------------

    def check(self) -> None:
        """Health probe (healthz): the database answers, still holds this store at the schema we
        opened, and would take a write now.

        ``FOR KEY SHARE`` is refused in a read-only transaction, so a node left on a hot standby
        or a database switched read-only after a failover reports unhealthy instead of failing
        every upload; it conflicts with no writer sshfiles has (the version row's UPDATE is not a
        key update), so the probe never waits on the store's own traffic."""
        with self._tx() as cur:
            cur.execute("SELECT version FROM sshfiles_schema FOR KEY SHARE")
            row = cur.fetchone()
        if row is None or int(row[0]) != self.schema_version:
            raise AccountError("accounts store was replaced")

    # -- shared folders (schema v7; sqlite.py's methods, in PostgreSQL) -----------------------

    def add_folder(self, name: str, path: str, quota: int | None, max_entries: int | None = None) -> None:
        validate_folder_name(name)
        with self._tx() as cur:
            cur.execute("INSERT INTO folders (name, path, quota, max_entries, created) VALUES (%s, %s, %s, %s, %s) "
                        "ON CONFLICT (name) DO NOTHING", (name, path, quota, max_entries, time.time()))
            if cur.rowcount == 0:
                raise AccountError(f"folder {name!r} already exists")

    def get_folder(self, name: str) -> Folder | None:
        rows = self._query("SELECT name, path, quota, max_entries, used, reserved, entries FROM folders "
                           "WHERE name = %s", (name,))
        if not rows:
            return None
        n, path, quota, max_entries, used, reserved, entries = rows[0]
        return Folder(n, path, quota, max_entries, max(0, used + reserved), entries)

    def list_folders(self) -> list[Folder]:
        return [f for n, in self._query('SELECT name FROM folders ORDER BY name COLLATE "C"')
                if (f := self.get_folder(n))]

    def remove_folder(self, name: str) -> Folder:
        with self._tx() as cur:
            if not self._lock_user(cur, folder_ledger(name)):
                raise AccountError(f"no such folder: {name}")
            folder = self.get_folder(name)
            assert folder is not None
            cur.execute('DELETE FROM reservations WHERE "user" = %s', (folder_ledger(name),))
            cur.execute("DELETE FROM folders WHERE name = %s", (name,))  # mounts: ON DELETE CASCADE
        return folder

    def add_mount(self, user: str, folder: str, vpath: str, perms: Iterable[str]) -> None:
        """sqlite.py's `add_mount`: the user's row is locked, so two admins never add overlapping mounts."""
        try:
            vpath = normalize_rule_path(vpath)
            text = format_perms(parse_perms(perms))
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        if vpath == "/":
            raise AccountError("a folder cannot be mounted at /: give a directory such as /shared/team")
        with self._tx() as cur:
            if not self._lock_user(cur, user):
                raise AccountError(f"no such user: {user}")
            cur.execute("SELECT 1 FROM folders WHERE name = %s", (folder,))
            if cur.fetchone() is None:
                raise AccountError(f"no such folder: {folder}")
            cur.execute('SELECT vpath FROM mounts WHERE "user" = %s', (user,))
            for other, in cur.fetchall():
                if other == vpath or other.startswith(vpath + "/") or vpath.startswith(other + "/"):
                    raise AccountError(f"user {user!r} already has a folder mounted at {other}; "
                                       "mounts cannot overlap")
            cur.execute('INSERT INTO mounts ("user", folder, vpath, perms) VALUES (%s, %s, %s, %s)',
                        (user, folder, vpath, text))

    def remove_mount(self, user: str, vpath: str) -> None:
        try:
            vpath = normalize_rule_path(vpath)
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        with self._tx() as cur:
            cur.execute('DELETE FROM mounts WHERE "user" = %s AND vpath = %s', (user, vpath))
            if cur.rowcount == 0:
                raise AccountError(f"user {user!r} has no folder mounted at {vpath}")

    def mounts(self, user: str) -> list[Mount]:
        return [Mount(u, f, v, parse_perms(p)) for u, f, v, p in self._query(
            'SELECT "user", folder, vpath, perms FROM mounts WHERE "user" = %s ORDER BY vpath COLLATE "C"', (user,))]
