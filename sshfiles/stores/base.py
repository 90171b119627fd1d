"""The store contract: what sshfiles needs from an accounts backend, and the types it speaks.

Everything above `stores/` talks to a store only through `AccountStore`
(obtained from `open_store`), so a backend is one module plus its run of the
contract tests (tests/unit/test_store_contract.py).  Errors a user can act on
are `AccountError`s with a one-line message; a store that cannot be read is a
`StoreCorrupt`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "FOLDER_LEDGER_PREFIX",
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
    "ledger_row",
    "validate_folder_name",
    "validate_username",
]

# Every ledger value is an exact SQLite integer: a user without a byte quota is still bounded
# by this, so no sum can ever overflow into a float (SQLite's silent fallback).
LEDGER_MAX = 2**63 - 1
# Entry quotas: max_entries -1 stores "unlimited" (NULL means the default for the byte quota).
UNLIMITED_ENTRIES = -1

_USERNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")


class AccountError(Exception):
    """A user-facing error about accounts (unknown user, duplicate, bad name)."""


class StoreCorrupt(AccountError):
    """The accounts store cannot be read as an sshfiles store."""


def validate_username(name: str) -> str:
    """Refuse names that could ever be abused as a path or an option.

    Letters, digits, '_', '.', '@', '-', at most 64, not starting with '-' or
    '.', never '..': checked before anything builds a home path from it.
    """
    if not isinstance(name, str) or not _USERNAME.match(name) or ".." in name:
        raise AccountError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '_', '.', '@', '-', "
            "not starting with '-' or '.'")
    return name


#: A shared folder's ledger key: the ledger methods (reserve, settle, charge_entries, ...) take it
#: where they take a user name, so quota.py's reservations, presence rows and reconciliation work
#: per folder unchanged. ':' can never be in a login name (`validate_username`), so no user can
#: ever be charged as, or log in as, a folder.
FOLDER_LEDGER_PREFIX = "folder:"


def validate_folder_name(name: str) -> str:
    """A folder name follows the user-name rules (it names a directory by default, see cli.py)."""
    if not isinstance(name, str) or not _USERNAME.match(name) or ".." in name:
        raise AccountError(
            f"invalid folder name {name!r}: use 1-64 letters, digits, '_', '.', '@', '-', "
            "not starting with '-' or '.'")
    return name


def folder_ledger(folder: str) -> str:
    """The ledger key of a folder."""
    return FOLDER_LEDGER_PREFIX + folder


def folder_of_ledger(key: str) -> str | None:
    """The folder a ledger key names, or None for a user's key."""
    return key[len(FOLDER_LEDGER_PREFIX):] if key.startswith(FOLDER_LEDGER_PREFIX) else None


def ledger_row(key: str) -> tuple[str, str, str]:
    """(table, row name, what) of a ledger key, for the SQL backends: a user's row in ``users`` or a
    folder's in ``folders``. Both tables have the same ledger columns (quota, used, entries,
    max_entries), so each ledger method is one query with the table chosen here, from a fixed pair,
    never from input."""
    folder = folder_of_ledger(key)
    if folder is None:
        return "users", key, "user"
    return "folders", folder, "folder"


@dataclass
class Folder:
    """A shared (virtual) folder: a host directory with its own ledger, mounted into users' trees."""
    name: str
    path: str
    quota: int | None          # bytes; None = unlimited (still counted, see README "Shared folders")
    max_entries: int | None = None  # as Account.max_entries
    used: int = 0              # settled bytes plus live reservations, as Account.used
    entries: int = 0


@dataclass(frozen=True)
class Mount:
    """A folder mounted into one user's tree at `vpath`, with the permissions that apply inside it."""
    user: str
    folder: str
    vpath: str
    perms: frozenset[str]


@dataclass
class Account:
    name: str
    home: str
    password_hash: str | None
    quota: int | None  # bytes; None = unlimited
    used: int = 0
    disabled: bool = False
    # Bumped by every change that must end the user's live sessions (password, keys,
    # disable, removal): a server compares it with the value it saw at login.
    auth_rev: int = 0
    entries: int = 0          # files, directories and symlinks in the home (the entries ledger)
    max_entries: int | None = None  # None = the default for the byte quota (see quota.py)
    # Bumped by every change of the user's permission rules: a server process compares it with
    # the revision its sessions hold and reloads the rules when it moved (no per-operation read).
    perm_rev: int = 0
    upload_mode: str | None = None  # atomic.MODES; None = the server's --upload-mode
    keys: list[StoredKey] = field(default_factory=list)

    @property
    def auth_methods(self) -> list[str]:
        methods = []
        if self.password_hash:
            methods.append("password")
        if self.keys:
            methods.append("publickey")
        return methods


@dataclass
class StoredKey:
    fingerprint: str
    key: str  # one OpenSSH public key line
    comment: str = ""


@dataclass
class Ban:
    """A per-source ban (defence.py): `source` is an IPv4 address or an IPv6 /64 ("2001:db8:1:2::/64")."""
    source: str
    until: float   # epoch seconds; an expired row is kept for its strikes (repeat bans grow)
    reason: str
    strikes: int = 1


@dataclass(frozen=True)
class LiveSession:
    """One logged-in connection, as `sshfiles status` shows it: each server process writes its own
    rows (from its session watcher's thread) and a dead process's rows go with its `owner`."""
    conn: str      # the connection id (the log's conn=)
    owner: str     # the server process's owner id (register_owner): liveness, cleanup
    pid: int
    user: str
    source: str    # address:port
    since: float   # epoch seconds of the login
    doing: str     # open transfers ("upload /a.iso 12.0 MiB", ...), "" when none


class AccountStore(Protocol):
    """What sshfiles needs from an accounts backend."""

    def add_user(self, name: str, home: str, password_hash: str | None, quota: int | None) -> None: ...
    def get_user(self, name: str) -> Account | None: ...
    def require_user(self, name: str) -> Account: ...
    def list_users(self) -> list[Account]: ...
    def remove_user(self, name: str) -> Account: ...
    def set_password_hash(self, name: str, password_hash: str | None) -> None: ...
    def set_quota(self, name: str, quota: int | None) -> None: ...
    def add_key(self, name: str, key: StoredKey) -> None: ...
    def remove_key(self, name: str, fingerprint: str) -> None: ...
    def rehash_password(self, name: str, old_hash: str, new_hash: str) -> bool: ...
    def set_disabled(self, name: str, disabled: bool) -> None: ...
    def auth_states(self, names: list[str]) -> dict[str, tuple[bool, int]]: ...
    # per-directory permissions (permissions.py): path normalised, perms validated, perm_rev bumped
    def set_permissions(self, name: str, path: str, perms: Iterable[str]) -> None: ...
    def unset_permissions(self, name: str, path: str) -> None: ...
    def permissions(self, name: str) -> dict[str, frozenset[str]]: ...
    def permission_revs(self, names: list[str]) -> dict[str, int]: ...
    # shared folders: a folder's ledger key is folder_ledger(name), usable with every ledger method
    def add_folder(self, name: str, path: str, quota: int | None, max_entries: int | None = None) -> None: ...
    def get_folder(self, name: str) -> Folder | None: ...
    def list_folders(self) -> list[Folder]: ...
    def remove_folder(self, name: str) -> Folder: ...  # its mounts go with it
    def add_mount(self, user: str, folder: str, vpath: str, perms: Iterable[str]) -> None: ...
    def remove_mount(self, user: str, vpath: str) -> None: ...
    def mounts(self, user: str) -> list[Mount]: ...  # with `perms` parsed, ordered by vpath
    # ledger
    def reserve(self, owner: str, name: str, amount: int) -> bool: ...
    def settle(self, owner: str, name: str, consumed: int, release: int, keep_row: bool = False) -> None: ...
    def reservation(self, owner: str, name: str) -> int: ...
    def mark_present(self, owner: str, name: str) -> None: ...
    def unmark_present(self, owner: str, name: str) -> None: ...
    # exact refusals across owners: a refused owner asks the others to give their unused pool back
    def request_reclaim(self, owner: str, name: str) -> bool: ...  # False: no other owner holds any
    def reclaim_requests(self, owner: str) -> list[str]: ...  # keys others asked for that owner holds
    def end_reclaim(self, owner: str, name: str) -> None: ...
    def adjust_used(self, name: str, delta: int) -> None: ...
    def set_used(self, name: str, used: int) -> None: ...
    def charged(self, name: str) -> int: ...
    def quota_state(self, name: str) -> tuple[int | None, int]: ...
    def charge_entries(self, name: str, n: int, limit: int | None) -> bool: ...
    def adjust_entries(self, name: str, delta: int) -> None: ...
    def entries_state(self, name: str) -> tuple[int | None, int | None, int]: ...
    def set_usage(self, name: str, used: int, entries: int) -> None: ...
    def set_max_entries(self, name: str, max_entries: int | None) -> None: ...
    def set_upload_mode(self, name: str, mode: str | None) -> None: ...
    def owners(self) -> list[str]: ...
    def drop_owner(self, owner: str) -> list[str]: ...
    # owners: server processes that hold reservations
    def register_owner(self) -> str: ...
    def release_owner(self, owner: str) -> None: ...
    def owner_alive(self, owner: str) -> bool: ...
    # per-source bans, shared by every process and node using the store
    def ban(self, source: str, until: float, reason: str, strikes: int = 1) -> None: ...
    def unban(self, source: str) -> bool: ...
    def bans(self) -> list[Ban]: ...
    def is_banned(self, source: str, now: float | None = None) -> bool: ...
    def prune_bans(self, expired_before: float) -> int: ...  # drop rows whose ban ended before; returns the count
    def set_sessions(self, owner: str, sessions: list[LiveSession]) -> None: ...  # replaces owner's rows
    def live_sessions(self) -> list[LiveSession]: ...
    def kick_user(self, name: str) -> None: ...  # bumps auth_rev: every worker ends the user's sessions
    def check(self) -> None: ...  # health probe: raises AccountError unless a write could begin now
    def close(self) -> None: ...
