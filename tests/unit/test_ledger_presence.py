"""A user's presence row (quota.py UserLedger): written while the user has sessions in a process, gone
after the last one, so only a process that dies mid-session makes the survivors rescan the user.

Real SQLite store, real store thread; another connection's write lock keeps the presence write queued
while the session ends, as a slow or remote store (PostgreSQL across the network) does on its own.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sshfiles.quota import UserLedger
from sshfiles.stores.sqlite import SQLiteAccountStore
from sshfiles.stores.worker import StoreWorker


def test_a_session_that_ends_before_its_presence_is_written_leaves_no_row(tmp_path: Path) -> None:
    store = SQLiteAccountStore(tmp_path, busy_timeout=5)
    store.add_user("u", str(tmp_path / "home"), None, None)
    worker = StoreWorker(lambda: SQLiteAccountStore(tmp_path, busy_timeout=5), 5)

    async def short_session() -> None:
        ledger = UserLedger("u", worker, "process-1")
        locker = sqlite3.connect(tmp_path / "accounts.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            ledger.session_opened()   # the presence write waits for the lock in the store thread
            await asyncio.sleep(0.05)
            ledger.session_closed()   # e.g. an exec of `echo hi`: over before the store answered
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        for _ in range(2):  # the presence write, then whatever its completion queued
            await worker.call(lambda s: None, request=False)
            await asyncio.sleep(0)
        assert ledger.sessions == 0 and ledger.in_sync

    try:
        asyncio.run(short_session())
        assert store.owners() == []  # no presence row: a later crash of this process rescans nobody
    finally:
        worker.close()
        store.close()
