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
    "LEDGER_MAX",
    "UNLIMITED_ENTRIES",
    "Account",
    "AccountError",
    "AccountStore",
    "Ban",
    "LiveSession",
    "StoreCorrupt",
    "StoredKey",
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
    # ledger
    def reserve(self, owner: str, name: str, amount: int) -> bool: ...
    def settle(self, owner: str, name: str, consumed: int, release: int, keep_row: bool = False) -> None: ...
    def reservation(self, owner: str, name: str) -> int: ...
    def mark_present(self, owner: str, name: str) -> None: ...
    def unmark_present(self, owner: str, name: str) -> None: ...
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
