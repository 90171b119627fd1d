"""The store's ban contract (SQLite backend) and the v2 -> v3 migration that adds it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sshfiles.stores import open_store
from sshfiles.stores.sqlite import _SCHEMA_VERSION


def test_ban_unban_list_and_a_later_ban_never_shortens(tmp_path: Path) -> None:
    store = open_store(accounts_dir=tmp_path)
    try:
        store.ban("192.0.2.1", 2000.0, "auth-failed", 1)
        store.ban("192.0.2.1", 1500.0, "refused", 2)       # shorter: the end stays, strikes grow
        store.ban("2001:db8::/64", 3000.0, "admin")
        assert [(b.source, b.until, b.strikes) for b in store.bans()] == \
            [("192.0.2.1", 2000.0, 2), ("2001:db8::/64", 3000.0, 1)]
        assert store.is_banned("192.0.2.1", now=1999) and not store.is_banned("192.0.2.1", now=2001)
        assert store.unban("192.0.2.1") and not store.unban("192.0.2.1")
        assert [b.source for b in store.bans()] == ["2001:db8::/64"]
    finally:
        store.close()


def test_a_v2_store_is_migrated_to_the_current_version_with_its_accounts(tmp_path: Path) -> None:
    store = open_store(accounts_dir=tmp_path)
    store.add_user("alice", str(tmp_path / "alice"), None, None)
    store.close()
    db = sqlite3.connect(tmp_path / "accounts.db")
    db.execute("DROP TABLE bans")
    db.execute("DROP TABLE permissions")  # and what later versions added (v4)
    db.execute("ALTER TABLE users DROP COLUMN perm_rev")
    db.execute("ALTER TABLE users DROP COLUMN upload_mode")  # (v5)
    db.execute("UPDATE meta SET value='2' WHERE key='schema'")
    db.commit()
    db.close()
    store = open_store(accounts_dir=tmp_path)
    try:
        assert store.get_user("alice") is not None
        store.ban("192.0.2.9", 10.0, "admin")
        assert [b.source for b in store.bans()] == ["192.0.2.9"]
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "accounts.db")
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (_SCHEMA_VERSION,)  # and on to the current version
    db.close()


def test_a_v3_store_gains_permissions(tmp_path: Path) -> None:
    store = open_store(accounts_dir=tmp_path)
    store.add_user("alice", str(tmp_path / "alice"), None, None)
    store.close()
    db = sqlite3.connect(tmp_path / "accounts.db")
    db.execute("DROP TABLE permissions")
    db.execute("ALTER TABLE users DROP COLUMN perm_rev")
    db.execute("ALTER TABLE users DROP COLUMN upload_mode")  # (v5)
    db.execute("UPDATE meta SET value='3' WHERE key='schema'")
    db.commit()
    db.close()
    store = open_store(accounts_dir=tmp_path)
    try:
        assert store.permissions("alice") == {}
        store.set_permissions("alice", "/in", "upload")
        assert store.permissions("alice") == {"/in": frozenset({"upload"})}
    finally:
        store.close()
