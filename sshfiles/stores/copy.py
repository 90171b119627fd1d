"""`sshfiles store copy`: move an installation's accounts and ledger from one store to another.

Written against the `AccountStore` contract only, so it copies between any two backends (in
practice SQLite -> PostgreSQL when one machine becomes several nodes).  The ledger must arrive
exact: settled bytes and entries are copied as numbers (no rescan), and a source with live
reservations is refused, because those bytes belong to a running server, not to the usage.
"""

from __future__ import annotations

from .base import AccountError, AccountStore, folder_ledger

__all__ = ["copy_store"]


def copy_store(source: AccountStore, target: AccountStore) -> tuple[int, int]:
    """Copy users (with keys, quotas, usage, entries, disabled state, permission rules, upload mode)
    and bans; returns their counts.

    Refuses a non-empty target (nothing is merged or overwritten) and a source that servers still
    hold reservations in.  Verifies the copy by reading both stores back.
    """
    if target.list_users() or target.bans() or target.list_folders():
        raise AccountError("the target store is not empty: copy only into a new, empty store")
    owners = source.owners()
    if owners:
        raise AccountError(f"the source store has {len(owners)} server process(es) holding reservations: "
                           "stop every server using it (or run `sshfiles quota scan` after a crash) first")
    accounts = source.list_users()
    for acct in accounts:
        target.add_user(acct.name, acct.home, acct.password_hash, acct.quota)
        for key in acct.keys:
            target.add_key(acct.name, key)
        if acct.disabled:
            target.set_disabled(acct.name, True)
        if acct.max_entries is not None:
            target.set_max_entries(acct.name, acct.max_entries)
        if acct.upload_mode is not None:
            target.set_upload_mode(acct.name, acct.upload_mode)
        for path, perms in source.permissions(acct.name).items():
            target.set_permissions(acct.name, path, perms)
        target.set_usage(acct.name, acct.used, acct.entries)
    for folder in source.list_folders():  # shared folders: settings, usage, then every user's mounts
        target.add_folder(folder.name, folder.path, folder.quota, folder.max_entries)
        target.set_usage(folder_ledger(folder.name), folder.used, folder.entries)
    for acct in accounts:
        for m in source.mounts(acct.name):
            target.add_mount(m.user, m.folder, m.vpath, m.perms)
    bans = source.bans()
    for b in bans:
        target.ban(b.source, b.until, b.reason, b.strikes)
    _verify(source, target)
    return len(accounts), len(bans)


def _verify(source: AccountStore, target: AccountStore) -> None:
    """Both stores read back the same, auth_rev and perm_rev aside (they are opaque revisions, which a
    new account starts at its creation time; a copy starts new sessions anyway)."""
    want = source.list_users()
    got = target.list_users()
    for a in (*want, *got):
        a.auth_rev = a.perm_rev = 0
    mounts_differ = any(source.mounts(a.name) != target.mounts(a.name) for a in want)
    rules_differ = any(source.permissions(a.name) != target.permissions(a.name) for a in want)
    if want != got or source.bans() != target.bans() or source.list_folders() != target.list_folders() \
            or mounts_differ or rules_differ:
        raise AccountError("the copy does not read back like the source (changed while copying?): "
                           "discard the target and try again with every server stopped")
