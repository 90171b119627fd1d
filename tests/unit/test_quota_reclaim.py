"""Exact refusals across processes (quota.py): a charge refused while another owner holds an unused
reservation of the same user asks for it (the store's reclaim request), the holder gives it back at its
next `answer_reclaims`, and the charge succeeds; what really does not fit is still refused, and at once
when nobody holds anything it could give back.

Two `QuotaManager`s (two owners, as two worker processes or nodes have) on one real SQLite store, each
with its own store threads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from sshfiles import quota
from sshfiles.quota import QuotaExceeded, QuotaManager
from sshfiles.stores.sqlite import SQLiteAccountStore
from sshfiles.stores.worker import StoreWorker

QUOTA = 1 << 20


def _reclaim_rows(directory: Path) -> int:
    db = sqlite3.connect(directory / "accounts.db")
    try:
        return int(db.execute("SELECT COUNT(*) FROM reclaims").fetchone()[0])
    finally:
        db.close()


def test_a_refused_charge_gets_the_other_owners_unused_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The mechanism, not its speed: the charge that fits waits up to 30 s for the give-back (2 s in
    # production; a full test run on 2 busy cores once took longer), the refusals after it 0.5 s.
    monkeypatch.setattr(quota, "RECLAIM_WAIT", 30.0)
    store = SQLiteAccountStore(tmp_path, busy_timeout=5)
    store.add_user("u", str(tmp_path / "home"), None, QUOTA)
    workers = [StoreWorker(lambda: SQLiteAccountStore(tmp_path, busy_timeout=5), 5) for _ in range(2)]
    a, b = QuotaManager(workers[0], "owner-a"), QuotaManager(workers[1], "owner-b")

    async def scenario() -> None:
        la, lb = a.ledger("u"), b.ledger("u")
        la.session_opened()
        lb.session_opened()
        la.write_handles = lb.write_handles = 1
        await la.charge(1024)                     # A reserves ahead: 1 KiB plus 1/8 of the rest
        assert la.pool > 0
        answering = [asyncio.create_task(m.serve_reclaims()) for m in (a, b)]
        try:
            await lb.charge(QUOTA - 1024)         # fits exactly: A's unused pool comes back to the store
            assert la.pool == 0
            monkeypatch.setattr(quota, "RECLAIM_WAIT", 0.5)
            with pytest.raises(QuotaExceeded):
                await lb.charge(1)                # nothing left anywhere
            with pytest.raises(QuotaExceeded):
                await la.charge(1)
        finally:
            for task in answering:
                task.cancel()
        for led in (la, lb):
            led.write_handles = 0
            led.settle(release_pool=True)
        await a.drain()
        await b.drain()

    try:
        asyncio.run(scenario())
        assert store.charged("u") == QUOTA
        assert _reclaim_rows(tmp_path) == 0  # every request withdrawn
    finally:
        for w in workers:
            w.close()
        store.close()


def test_a_charge_nobody_can_make_room_for_is_refused_without_waiting_for_anyone(tmp_path: Path) -> None:
    """No other owner holds a reservation: the refusal is final at once (no reclaim request left behind)."""
    store = SQLiteAccountStore(tmp_path, busy_timeout=5)
    store.add_user("u", str(tmp_path / "home"), None, 100)
    worker = StoreWorker(lambda: SQLiteAccountStore(tmp_path, busy_timeout=5), 5)
    manager = QuotaManager(worker, "only")

    async def scenario() -> None:
        led = manager.ledger("u")
        await led.charge(100)
        with pytest.raises(QuotaExceeded):
            await led.charge(1)
        await manager.drain()

    try:
        asyncio.run(scenario())
        assert _reclaim_rows(tmp_path) == 0
    finally:
        worker.close()
        store.close()
