"""The SQLite backend of the store contract: one file, ``accounts.db``, for one machine.

It implements `AccountStore` (stores/base.py) on the standard library's
sqlite3 in WAL mode, which is safe for the admin CLI and several server
processes writing at once: every mutation is one short IMMEDIATE transaction.
This module and its future siblings are the only ones that know SQL.

The ledger keeps, per user, ``used`` (settled bytes) and, per server process,
``reservations`` (bytes that process may write without asking again, plus
what it wrote but has not settled yet).  The quota check is
``used + sum(reservations) + n <= quota``, done atomically in the database,
so processes never over-commit together.  A process that dies leaves its
reservation rows behind; its liveness is an flock'd file beside the database
(the processes sharing a SQLite file share a machine), so `owner_alive`
tells the server which users to rescan (quota.py `reconcile_dead_owners`).

Every call is synchronous and short; a writer waits at most the busy timeout
for another process's lock.  Calls run on the event loop, except those on the
session watcher's path, which run in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

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

__all__ = ["SQLiteAccountStore"]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    home TEXT NOT NULL,
    password_hash TEXT,
    quota INTEGER,
    used INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    auth_rev INTEGER NOT NULL DEFAULT 0,
    entries INTEGER NOT NULL DEFAULT 0,
    max_entries INTEGER,
    perm_rev INTEGER NOT NULL DEFAULT 0,
    upload_mode TEXT
);
CREATE TABLE IF NOT EXISTS keys (
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (user, fingerprint)
);
CREATE TABLE IF NOT EXISTS reservations (
    owner TEXT NOT NULL,
    user TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (owner, user)
);
CREATE TABLE IF NOT EXISTS bans (
    source TEXT PRIMARY KEY,
    until REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    strikes INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS permissions (
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    path TEXT NOT NULL,
    perms TEXT NOT NULL,
    PRIMARY KEY (user, path)
);
CREATE TABLE IF NOT EXISTS sessions (
    conn TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    user TEXT NOT NULL,
    source TEXT NOT NULL,
    since REAL NOT NULL,
    doing TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS folders (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    quota INTEGER,
    max_entries INTEGER,
    used INTEGER NOT NULL DEFAULT 0,
    entries INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mounts (
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    folder TEXT NOT NULL REFERENCES folders(name) ON DELETE CASCADE,
    vpath TEXT NOT NULL,
    perms TEXT NOT NULL,
    PRIMARY KEY (user, vpath)
);
CREATE TABLE IF NOT EXISTS reclaims (
    user TEXT NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (user, owner)
);
"""
_SCHEMA_VERSION = "8"
# Each step takes a store from the version before it to the next, in one transaction.
_MIGRATIONS: dict[str, list[str]] = {
    "1": ["ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0",
          "ALTER TABLE users ADD COLUMN auth_rev INTEGER NOT NULL DEFAULT 0",
          "ALTER TABLE users ADD COLUMN entries INTEGER NOT NULL DEFAULT 0",
          "ALTER TABLE users ADD COLUMN max_entries INTEGER"],
    # v3: per-source bans (defence.py), shared by every process using this store.
    "2": ["CREATE TABLE IF NOT EXISTS bans (source TEXT PRIMARY KEY, until REAL NOT NULL, "
          "reason TEXT NOT NULL DEFAULT '', strikes INTEGER NOT NULL DEFAULT 1)"],
    # v4: per-user, per-directory permissions (permissions.py) and their revision per user.
    "3": ["CREATE TABLE IF NOT EXISTS permissions (user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE, "
          "path TEXT NOT NULL, perms TEXT NOT NULL, PRIMARY KEY (user, path))",
          "ALTER TABLE users ADD COLUMN perm_rev INTEGER NOT NULL DEFAULT 0"],
    # v5: per-user upload mode (atomic.py; NULL = the server's --upload-mode).
    "4": ["ALTER TABLE users ADD COLUMN upload_mode TEXT"],
    # v6: who is logged in where (`sshfiles status`), one row per connection, per server process.
    "5": ["CREATE TABLE IF NOT EXISTS sessions (conn TEXT PRIMARY KEY, owner TEXT NOT NULL, pid INTEGER NOT NULL, "
          "user TEXT NOT NULL, source TEXT NOT NULL, since REAL NOT NULL, doing TEXT NOT NULL DEFAULT '')"],
    # v7: shared folders (their own ledger, keyed folder_ledger(name) in reservations) and their mounts.
    "6": ["CREATE TABLE IF NOT EXISTS folders (name TEXT PRIMARY KEY, path TEXT NOT NULL, quota INTEGER, "
          "max_entries INTEGER, used INTEGER NOT NULL DEFAULT 0, entries INTEGER NOT NULL DEFAULT 0, "
          "created REAL NOT NULL)",
          "CREATE TABLE IF NOT EXISTS mounts (user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE, "
          "folder TEXT NOT NULL REFERENCES folders(name) ON DELETE CASCADE, vpath TEXT NOT NULL, "
          "perms TEXT NOT NULL, PRIMARY KEY (user, vpath))"],
    # v8: reclaim requests: an owner refused a reservation asks the others for their unused pools.
    "7": ["CREATE TABLE IF NOT EXISTS reclaims (user TEXT NOT NULL, owner TEXT NOT NULL, PRIMARY KEY (user, owner))"],
}
_NEXT_VERSION = {"1": "2", "2": "3", "3": "4", "4": "5", "5": "6", "6": "7", "7": "8"}


class SQLiteAccountStore:
    """SQLite implementation of `AccountStore` (one file: ``accounts.db``)."""

    FILENAME = "accounts.db"

    def __init__(self, directory: str | os.PathLike[str], busy_timeout: float | None = None,
                 create: bool = True) -> None:
        if busy_timeout is None:
            # How long a writer waits for another process's lock before the call fails
            # (the ledger keeps failed credits and retries them, see quota.py).
            busy_timeout = float(os.environ.get("SSHFILES_STORE_BUSY_TIMEOUT", "30"))
        self.busy_timeout = busy_timeout  # the store worker's bound on a request's wait (stores/worker.py)
        self.directory = Path(directory)
        self.path = self.directory / self.FILENAME
        self._owner_fds: dict[str, int] = {}
        if not create and not self.path.exists():
            raise AccountError(f"no store at {self.path.absolute()}; run `sshfiles serve` or `sshfiles user add` "
                               f"first, or name the existing one (--accounts-dir, or a config file)")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
        except OSError as exc:
            raise AccountError(f"cannot use accounts directory {self.directory}: {exc.strerror}") from None
        new = not self.path.exists()
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if new:
                os.chmod(self.path, 0o600)
                with self._tx() as db:
                    for stmt in _SCHEMA.strip().split(";"):
                        if stmt.strip():
                            db.execute(stmt)
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            while row and row[0] in _MIGRATIONS:
                with self._tx() as db:
                    # Re-read inside the write lock: another process may have migrated meanwhile.
                    current = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
                    if current in _MIGRATIONS:
                        for stmt in _MIGRATIONS[current]:
                            db.execute(stmt)
                        db.execute("UPDATE meta SET value=? WHERE key='schema'", (_NEXT_VERSION[current],))
                row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"accounts store {self.path} is unreadable or corrupt: {exc}") from None
        if not row or row[0] != _SCHEMA_VERSION:
            raise StoreCorrupt(f"accounts store {self.path} has an unknown schema")
        self.schema_version = int(_SCHEMA_VERSION)
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)  # what `check` compares: the file we opened is still there

    def check(self) -> None:
        """Health probe (healthz): the database file we opened is still in place and a write
        transaction can begin within the busy timeout; one generic line if not."""
        try:
            st = os.stat(self.path)
        except OSError:
            raise AccountError("accounts store is missing") from None
        if (st.st_dev, st.st_ino) != self._ident:
            raise AccountError("accounts store was replaced")
        with self._tx():
            pass

    # -- bans (per-source defence) ----------------------------------------------------------

    def ban(self, source: str, until: float, reason: str, strikes: int = 1) -> None:
        """Ban `source` (a defence.source_key) until the epoch time `until`; a later ban never shortens one."""
        with self._tx() as db:
            db.execute("INSERT INTO bans (source, until, reason, strikes) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(source) DO UPDATE SET until=max(until, excluded.until), "
                       "reason=excluded.reason, strikes=max(strikes, excluded.strikes)",
                       (source, until, reason, strikes))

    def unban(self, source: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM bans WHERE source=?", (source,)).rowcount > 0

    def bans(self) -> list[Ban]:
        """Every stored ban, expired ones included (their strikes make the next ban longer)."""
        return [Ban(*row) for row in self._query("SELECT source, until, reason, strikes FROM bans ORDER BY source")]

    def prune_bans(self, expired_before: float) -> int:
        """Forget bans that ended before `expired_before` (epoch seconds), strikes and all."""
        with self._tx() as db:
            return db.execute("DELETE FROM bans WHERE until < ?", (expired_before,)).rowcount

    def is_banned(self, source: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return bool(self._query("SELECT 1 FROM bans WHERE source=? AND until>?", (source, now)))

    def close(self) -> None:
        for owner in list(self._owner_fds):
            self.release_owner(owner)
        self._db.close()

    def _failed(self, exc: sqlite3.DatabaseError) -> StoreCorrupt:
        """The error for a store call that failed: one generic line, never the path or SQLite's text.

        Its message can reach a client (an SFTP status, exec stderr) through any operation that
        charges the ledger, so it says only what the user can act on. What the administrator needs
        (the database path and SQLite's own message) is kept in ``detail``. Errors from opening the
        store (``__init__``) do name the path: only the admin CLI and ``serve`` at startup see those,
        and it is the admin's own file.
        """
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            err = StoreCorrupt("the accounts store is busy; try again later")
        else:
            err = StoreCorrupt("the accounts store failed; try again later or ask the administrator")
        err.detail = f"accounts store {self.path}: {exc}"  # type: ignore[attr-defined]
        return err

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; IMMEDIATE takes the write lock up front (no upgrade deadlocks)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise self._failed(exc) from None
        try:
            yield self._db
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(sqlite3.DatabaseError):
                self._db.execute("ROLLBACK")
            raise self._failed(exc) from None
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            try:
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                with contextlib.suppress(sqlite3.DatabaseError):
                    self._db.execute("ROLLBACK")
                raise self._failed(exc) from None

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._failed(exc) from None

    # -- accounts -----------------------------------------------------------

    def add_user(self, name: str, home: str, password_hash: str | None, quota: int | None) -> None:
        validate_username(name)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise AccountError(f"user {name!r} already exists")
            # auth_rev starts at the creation time in ms, not 0: a session of a removed account
            # must not match a new account of the same name created within a watcher tick.
            now = time.time()
            db.execute("INSERT INTO users (name, home, password_hash, quota, used, created, auth_rev, perm_rev) "
                       "VALUES (?,?,?,?,0,?,?,?)",
                       (name, home, password_hash, quota, now, int(now * 1000), int(now * 1000)))

    def get_user(self, name: str) -> Account | None:
        rows = self._query("SELECT name, home, password_hash, quota, used, disabled, auth_rev, entries, max_entries, "
                           "perm_rev, upload_mode FROM users WHERE name=?", (name,))
        if not rows:
            return None
        acct = Account(*rows[0])
        acct.disabled = bool(acct.disabled)
        acct.keys = [StoredKey(*r) for r in self._query(
            "SELECT fingerprint, key, comment FROM keys WHERE user=? ORDER BY rowid", (name,))]
        acct.used = self.charged(name)
        return acct

    def require_user(self, name: str) -> Account:
        acct = self.get_user(name)
        if acct is None:
            raise AccountError(f"no such user: {name}")
        return acct

    def list_users(self) -> list[Account]:
        return [a for n, in self._query("SELECT name FROM users ORDER BY name") if (a := self.get_user(n))]

    def remove_user(self, name: str) -> Account:
        acct = self.require_user(name)
        with self._tx() as db:
            db.execute("DELETE FROM keys WHERE user=?", (name,))
            db.execute("DELETE FROM permissions WHERE user=?", (name,))
            db.execute("DELETE FROM mounts WHERE user=?", (name,))
            db.execute("DELETE FROM reservations WHERE user=?", (name,))
            db.execute("DELETE FROM users WHERE name=?", (name,))
        return acct

    def _update_user(self, sql: str, args: tuple, name: str) -> None:
        with self._tx() as db:
            if db.execute(sql, args).rowcount == 0:
                raise AccountError(f"no such user: {name}")

    def set_password_hash(self, name: str, password_hash: str | None) -> None:
        """A new password (or none): bumps auth_rev, so the user's live sessions end."""
        self._update_user("UPDATE users SET password_hash=?, auth_rev=auth_rev+1 WHERE name=?",
                          (password_hash, name), name)

    def rehash_password(self, name: str, old_hash: str, new_hash: str) -> bool:
        """Replace `old_hash` by an equivalent hash with current parameters (at login).

        Unlike `set_password_hash` this does not bump auth_rev: the password is the
        same, and the login doing it must not end its own user's sessions.  Nothing
        changes if the hash is no longer `old_hash` (an admin set a new password
        meanwhile); returns whether it was replaced.
        """
        with self._tx() as db:
            return db.execute("UPDATE users SET password_hash=? WHERE name=? AND password_hash=?",
                              (new_hash, name, old_hash)).rowcount == 1

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Disable (ends live sessions: auth_rev bumps) or re-enable an account."""
        bump = 1 if disabled else 0
        self._update_user("UPDATE users SET disabled=?, auth_rev=auth_rev+? WHERE name=?",
                          (int(disabled), bump, name), name)

    def auth_states(self, names: list[str]) -> dict[str, tuple[bool, int]]:
        """(disabled, auth_rev) of each named account that exists, in one read.

        The session watcher's query: a name missing from the answer was removed.
        """
        states: dict[str, tuple[bool, int]] = {}
        for i in range(0, len(names), 500):  # stay below SQLite's bound-parameter limit
            chunk = names[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for name, disabled, rev in self._query(
                    f"SELECT name, disabled, auth_rev FROM users WHERE name IN ({marks})", tuple(chunk)):
                states[name] = (bool(disabled), rev)
        return states

    # -- permissions --------------------------------------------------------

    def set_permissions(self, name: str, path: str, perms: Iterable[str]) -> None:
        """Set (or replace) NAME's rule for the directory PATH; a bad path or word is an AccountError."""
        try:
            path = normalize_rule_path(path)
            text = format_perms(parse_perms(perms))
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        with self._tx() as db:
            if db.execute("UPDATE users SET perm_rev=perm_rev+1 WHERE name=?", (name,)).rowcount == 0:
                raise AccountError(f"no such user: {name}")
            db.execute("INSERT INTO permissions (user, path, perms) VALUES (?,?,?) "
                       "ON CONFLICT(user, path) DO UPDATE SET perms=excluded.perms", (name, path, text))

    def unset_permissions(self, name: str, path: str) -> None:
        """Remove NAME's rule for PATH (the rule above it applies again)."""
        try:
            path = normalize_rule_path(path)
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        with self._tx() as db:
            if db.execute("UPDATE users SET perm_rev=perm_rev+1 WHERE name=?", (name,)).rowcount == 0:
                raise AccountError(f"no such user: {name}")
            if db.execute("DELETE FROM permissions WHERE user=? AND path=?", (name, path)).rowcount == 0:
                raise AccountError(f"user {name!r} has no permission rule for {path}")

    def permissions(self, name: str) -> dict[str, frozenset[str]]:
        """NAME's rules, directory -> permission set (empty: '*' everywhere)."""
        rows = self._query("SELECT p.path, p.perms FROM users u LEFT JOIN permissions p ON p.user=u.name "
                           "WHERE u.name=?", (name,))
        if not rows:
            raise AccountError(f"no such user: {name}")
        return {path: parse_perms(perms) for path, perms in rows if path is not None}

    def permission_revs(self, names: list[str]) -> dict[str, int]:
        """perm_rev of each named account that exists, in one read (the session watcher's query)."""
        revs: dict[str, int] = {}
        for i in range(0, len(names), 500):  # stay below SQLite's bound-parameter limit
            chunk = names[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for name, rev in self._query(f"SELECT name, perm_rev FROM users WHERE name IN ({marks})", tuple(chunk)):
                revs[name] = rev
        return revs

    def set_quota(self, name: str, quota: int | None) -> None:
        self._update_user("UPDATE users SET quota=? WHERE name=?", (quota, name), name)

    def add_key(self, name: str, key: StoredKey) -> None:
        self.require_user(name)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM keys WHERE user=? AND fingerprint=?", (name, key.fingerprint)).fetchone():
                raise AccountError(f"user {name!r} already has key {key.fingerprint}")
            db.execute("INSERT INTO keys VALUES (?,?,?,?)", (name, key.fingerprint, key.key, key.comment))
            db.execute("UPDATE users SET auth_rev=auth_rev+1 WHERE name=?", (name,))

    def remove_key(self, name: str, fingerprint: str) -> None:
        self.require_user(name)
        with self._tx() as db:
            if db.execute("DELETE FROM keys WHERE user=? AND fingerprint=?", (name, fingerprint)).rowcount == 0:
                raise AccountError(f"user {name!r} has no key {fingerprint}")
            db.execute("UPDATE users SET auth_rev=auth_rev+1 WHERE name=?", (name,))

    def _update_ledger(self, sql: str, args: tuple, name: str) -> None:
        """`sql` with {t} the ledger's table: an AccountError if the user or folder does not exist."""
        table, key, what = ledger_row(name)
        with self._tx() as db:
            if db.execute(sql.format(t=table), (*args, key)).rowcount == 0:
                raise AccountError(f"no such {what}: {key}")

    # -- usage ledger -------------------------------------------------------

    def reserve(self, owner: str, name: str, amount: int) -> bool:
        """Atomically reserve `amount` bytes for `owner` if the quota allows it."""
        table, key, _ = ledger_row(name)
        with self._tx() as db:
            row = db.execute(f"SELECT quota, used FROM {table} WHERE name=?", (key,)).fetchone()
            if row is None:
                return False
            quota, used = row
            reserved = db.execute("SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE user=?",
                                  (name,)).fetchone()[0]
            # Compared in Python (exact integers), never in SQL where a sum could overflow.
            if used + reserved + amount > (LEDGER_MAX if quota is None else quota):
                return False
            db.execute("INSERT INTO reservations (owner, user, amount) VALUES (?,?,?) "
                       "ON CONFLICT(owner, user) DO UPDATE SET amount = amount + excluded.amount",
                       (owner, name, amount))
            return True

    def settle(self, owner: str, name: str, consumed: int, release: int, keep_row: bool = False) -> None:
        """Move `consumed` reserved bytes into `used` and give `release` unused bytes back.

        `keep_row` keeps an emptied row as the owner's presence mark (see `mark_present`)."""
        table, key, _ = ledger_row(name)
        with self._tx() as db:
            db.execute(f"UPDATE {table} SET used = used + ? WHERE name=?", (consumed, key))
            db.execute("UPDATE reservations SET amount = amount - ? WHERE owner=? AND user=?",
                       (consumed + release, owner, name))
            if not keep_row:
                db.execute("DELETE FROM reservations WHERE owner=? AND user=? AND amount <= 0", (owner, name))

    def reservation(self, owner: str, name: str) -> int:
        """What `owner` holds reserved for `name` (0 without a row)."""
        rows = self._query("SELECT amount FROM reservations WHERE owner=? AND user=?", (owner, name))
        return int(rows[0][0]) if rows else 0

    def mark_present(self, owner: str, name: str) -> None:
        """Record that `owner` has sessions of `name` (a zero reservation row): if the owner dies,
        `reconcile_dead_owners` rescans the user, whose open handles may have held removed files."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO reservations (owner, user, amount) VALUES (?,?,0)", (owner, name))

    def unmark_present(self, owner: str, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM reservations WHERE owner=? AND user=? AND amount <= 0", (owner, name))

    def request_reclaim(self, owner: str, name: str) -> bool:
        """Ask every other owner holding a reservation for `name` to give its unused pool back
        (they see it in `reclaim_requests`); False, and nothing recorded, when no other owner holds
        any: then a refused reservation is final."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM reservations WHERE user=? AND owner<>? AND amount > 0 LIMIT 1",
                          (name, owner)).fetchone() is None:
                return False
            db.execute("INSERT OR IGNORE INTO reclaims (user, owner) VALUES (?,?)", (name, owner))
            return True

    def reclaim_requests(self, owner: str) -> list[str]:
        """The ledger keys another owner asked for (`request_reclaim`) that `owner` holds reserved."""
        return [u for u, in self._query(
            "SELECT DISTINCT c.user FROM reclaims c JOIN reservations r ON r.user = c.user "
            "WHERE r.owner=? AND r.amount > 0 AND c.owner<>? ORDER BY c.user", (owner, owner))]

    def end_reclaim(self, owner: str, name: str) -> None:
        """Withdraw `owner`'s request for `name` (it got its reservation, or gave up)."""
        with self._tx() as db:
            db.execute("DELETE FROM reclaims WHERE user=? AND owner=?", (name, owner))

    def adjust_used(self, name: str, delta: int) -> None:
        table, key, _ = ledger_row(name)
        with self._tx() as db:
            db.execute(f"UPDATE {table} SET used = used + ? WHERE name=?", (delta, key))

    def set_used(self, name: str, used: int) -> None:
        self._update_ledger("UPDATE {t} SET used=? WHERE name=?", (used,), name)

    def charged(self, name: str) -> int:
        """Bytes counted against the user: settled usage plus every live reservation."""
        table, key, _ = ledger_row(name)
        rows = self._query(
            "SELECT used + (SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE user=?) "
            f"FROM {table} WHERE name=?", (name, key))
        return max(0, rows[0][0]) if rows else 0

    def quota_state(self, name: str) -> tuple[int | None, int]:
        """(quota, charged) in one read, for statvfs and error messages."""
        table, key, _ = ledger_row(name)
        rows = self._query(
            "SELECT quota, used + (SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE user=?) "
            f"FROM {table} WHERE name=?", (name, key))
        if not rows:
            return 0, 0
        return rows[0][0], max(0, rows[0][1])

    # -- entries ledger (files, directories, symlinks) ------------------------

    def charge_entries(self, name: str, n: int, limit: int | None) -> bool:
        """Count `n` new entries if they fit under `limit` (None: no limit); atomic across processes."""
        table, key, _ = ledger_row(name)
        with self._tx() as db:
            row = db.execute(f"SELECT entries FROM {table} WHERE name=?", (key,)).fetchone()
            if row is None:
                return False
            if row[0] + n > (LEDGER_MAX if limit is None else limit):
                return False
            db.execute(f"UPDATE {table} SET entries = entries + ? WHERE name=?", (n, key))
            return True

    def adjust_entries(self, name: str, delta: int) -> None:
        table, key, _ = ledger_row(name)
        with self._tx() as db:
            db.execute(f"UPDATE {table} SET entries = entries + ? WHERE name=?", (delta, key))

    def set_usage(self, name: str, used: int, entries: int) -> None:
        """A scan's result: settled bytes and entries as they are on disk."""
        self._update_ledger("UPDATE {t} SET used=?, entries=? WHERE name=?", (used, entries), name)

    def set_max_entries(self, name: str, max_entries: int | None) -> None:
        """None: the default for the user's byte quota; UNLIMITED_ENTRIES: no limit."""
        self._update_ledger("UPDATE {t} SET max_entries=? WHERE name=?", (max_entries,), name)

    def set_upload_mode(self, name: str, mode: str | None) -> None:
        """A user's upload mode (atomic.MODES), or None for the server's default."""
        self._update_user("UPDATE users SET upload_mode=? WHERE name=?", (mode, name), name)

    def entries_state(self, name: str) -> tuple[int | None, int | None, int]:
        """(quota, max_entries as stored, entries) in one read."""
        table, key, _ = ledger_row(name)
        rows = self._query(f"SELECT quota, max_entries, entries FROM {table} WHERE name=?", (key,))
        if not rows:
            return 0, 0, 0
        return rows[0][0], rows[0][1], rows[0][2]

    # -- shared folders -----------------------------------------------------------

    def add_folder(self, name: str, path: str, quota: int | None, max_entries: int | None = None) -> None:
        validate_folder_name(name)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM folders WHERE name=?", (name,)).fetchone():
                raise AccountError(f"folder {name!r} already exists")
            db.execute("INSERT INTO folders (name, path, quota, max_entries, used, entries, created) "
                       "VALUES (?,?,?,?,0,0,?)", (name, path, quota, max_entries, time.time()))

    def get_folder(self, name: str) -> Folder | None:
        rows = self._query("SELECT name, path, quota, max_entries, entries FROM folders WHERE name=?", (name,))
        if not rows:
            return None
        n, path, quota, max_entries, entries = rows[0]
        return Folder(n, path, quota, max_entries, self.charged(folder_ledger(n)), entries)

    def list_folders(self) -> list[Folder]:
        return [f for n, in self._query("SELECT name FROM folders ORDER BY name") if (f := self.get_folder(n))]

    def remove_folder(self, name: str) -> Folder:
        folder = self.get_folder(name)
        if folder is None:
            raise AccountError(f"no such folder: {name}")
        with self._tx() as db:
            db.execute("DELETE FROM mounts WHERE folder=?", (name,))
            db.execute("DELETE FROM reservations WHERE user=?", (folder_ledger(name),))
            db.execute("DELETE FROM folders WHERE name=?", (name,))
        return folder

    def add_mount(self, user: str, folder: str, vpath: str, perms: Iterable[str]) -> None:
        """Mount FOLDER into USER's tree at VPATH; a mount never nests in or over another of the user's."""
        try:
            vpath = normalize_rule_path(vpath)
            text = format_perms(parse_perms(perms))
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        if vpath == "/":
            raise AccountError("a folder cannot be mounted at /: give a directory such as /shared/team")
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM users WHERE name=?", (user,)).fetchone():
                raise AccountError(f"no such user: {user}")
            if not db.execute("SELECT 1 FROM folders WHERE name=?", (folder,)).fetchone():
                raise AccountError(f"no such folder: {folder}")
            for other, in db.execute("SELECT vpath FROM mounts WHERE user=?", (user,)):
                if other == vpath or other.startswith(vpath + "/") or vpath.startswith(other + "/"):
                    raise AccountError(f"user {user!r} already has a folder mounted at {other}; "
                                       "mounts cannot overlap")
            db.execute("INSERT INTO mounts (user, folder, vpath, perms) VALUES (?,?,?,?)", (user, folder, vpath, text))

    def remove_mount(self, user: str, vpath: str) -> None:
        try:
            vpath = normalize_rule_path(vpath)
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        with self._tx() as db:
            if db.execute("DELETE FROM mounts WHERE user=? AND vpath=?", (user, vpath)).rowcount == 0:
                raise AccountError(f"user {user!r} has no folder mounted at {vpath}")

    def mounts(self, user: str) -> list[Mount]:
        return [Mount(u, f, v, parse_perms(p)) for u, f, v, p in self._query(
            "SELECT user, folder, vpath, perms FROM mounts WHERE user=? ORDER BY vpath", (user,))]

    # -- owners (serving processes) ------------------------------------------

    def register_owner(self) -> str:
        """A new owner id for this process, alive for as long as it holds its lock file.

        An exclusive flock on ``owners/<id>.lock`` beside the database: the
        kernel drops it when the process dies however it dies, so a crash can
        never leave an owner that looks alive.
        """
        owners = self.directory / "owners"
        owners.mkdir(parents=True, exist_ok=True)
        owner = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(owners / f"{owner}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._owner_fds[owner] = fd
        return owner

    def release_owner(self, owner: str) -> None:
        fd = self._owner_fds.pop(owner, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.directory / "owners" / f"{owner}.lock")
            os.close(fd)

    def owner_alive(self, owner: str) -> bool:
        if owner in self._owner_fds:
            return True
        path = self.directory / "owners" / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        return False

    def owners(self) -> list[str]:
        return [o for o, in self._query("SELECT owner FROM reservations UNION SELECT owner FROM sessions "
                                        "UNION SELECT owner FROM reclaims")]

    def drop_owner(self, owner: str) -> list[str]:
        """Forget a dead process's reservations and sessions; returns the users whose usage must be rescanned."""
        with self._tx() as db:
            users = [u for u, in db.execute("SELECT user FROM reservations WHERE owner=?", (owner,))]
            db.execute("DELETE FROM reservations WHERE owner=?", (owner,))
            db.execute("DELETE FROM sessions WHERE owner=?", (owner,))
            db.execute("DELETE FROM reclaims WHERE owner=?", (owner,))
        return users

    # -- live sessions (sshfiles status) ------------------------------------------------------

    def set_sessions(self, owner: str, sessions: list[LiveSession]) -> None:
        """Make `sessions` the rows of `owner` (one process's whole set, in one transaction)."""
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE owner=?", (owner,))
            db.executemany("INSERT OR REPLACE INTO sessions (conn, owner, pid, user, source, since, doing) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(s.conn, owner, s.pid, s.user, s.source, s.since, s.doing) for s in sessions])

    def live_sessions(self) -> list[LiveSession]:
        """Every process's rows, oldest login first (a dead process's rows until it is reconciled)."""
        return [LiveSession(*row) for row in self._query(
            "SELECT conn, owner, pid, user, source, since, doing FROM sessions ORDER BY since, conn")]

    def kick_user(self, name: str) -> None:
        """End the user's sessions everywhere: the watcher of every process sees auth_rev change."""
        self._update_user("UPDATE users SET auth_rev=auth_rev+1 WHERE name=?", (name,), name)
