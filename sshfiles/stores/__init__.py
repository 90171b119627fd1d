"""Where accounts, keys, quotas and the usage ledger live: the store contract and its backends.

`open_store(url)` is the only way code gets a store.  The contract is
`AccountStore` in base.py; backends: SQLite (sqlite.py, the embedded default,
one machine) and PostgreSQL (postgres.py, one database shared by several nodes).
Both run the same contract tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from .base import (
    LEDGER_MAX,
    UNLIMITED_ENTRIES,
    Account,
    AccountError,
    AccountStore,
    Ban,
    Folder,
    LiveSession,
    Mount,
    StoreCorrupt,
    StoredKey,
    folder_ledger,
    folder_of_ledger,
    validate_folder_name,
    validate_username,
)

__all__ = [
    "LEDGER_MAX",
    "UNLIMITED_ENTRIES",
    "Account",
    "AccountError",
    "AccountStore",
    "Ban",
    "Folder",
    "LiveSession",
    "Mount",
    "StoreCorrupt",
    "StoredKey",
    "folder_ledger",
    "folder_of_ledger",
    "open_store",
    "validate_folder_name",
    "validate_username",
]


def open_store(url: str | None = None, *, accounts_dir: str | os.PathLike[str] = "accounts",
               busy_timeout: float | None = None, create: bool = True, lease: float | None = None,
               migrate: bool = False) -> AccountStore:
    """Open the store named by `url`; without one, the SQLite store in `accounts_dir`.

    ``create=False`` is for commands that only read or change what exists (``user list``, ``ban
    list``...): a missing store is then an ``AccountError`` naming where it was looked for, instead
    of a new empty store that would hide the real one in another directory.

    ``sqlite:PATH`` or ``sqlite:///ABSOLUTE/PATH`` names the directory that
    holds ``accounts.db``; ``postgresql://...`` (or ``postgres://``) a PostgreSQL
    database (psycopg's URL syntax).  `busy_timeout` bounds how long a call waits for a lock (SQLite)
    or for the database: connect, pool, statement and lock timeouts (PostgreSQL; default 5 s), so
    healthz's probe answers within its own bound.  `lease` is the PostgreSQL owners' lease in
    seconds (SQLite's owners live as long as their flock); `migrate` lets a
    PostgreSQL store be upgraded to this version's schema (SQLite's migrate on open).
    Any other scheme is refused with a one-line error.
    """
    from .sqlite import SQLiteAccountStore

    if not url:
        return SQLiteAccountStore(Path(accounts_dir), busy_timeout=busy_timeout, create=create)
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = parts.path if not parts.netloc else f"/{parts.netloc}{parts.path}"
        if not path:
            raise AccountError(f"store URL {url!r} names no directory")
        return SQLiteAccountStore(Path(path), busy_timeout=busy_timeout, create=create)
    if parts.scheme in ("postgresql", "postgres"):
        from .postgres import PostgresAccountStore
        return PostgresAccountStore(url, lease=lease, migrate=migrate, timeout=busy_timeout)
    shown = url.split("://", 1)[0] if "://" in url else url.split(":", 1)[0]
    raise AccountError(f"unsupported store URL scheme {shown!r}: use sqlite:DIR or postgresql://USER@HOST/DB")
