"""StoreWorker (stores/worker.py) with a real SQLite store and a real lock held by another connection."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from sshfiles.stores import AccountError, AccountStore
from sshfiles.stores.sqlite import SQLiteAccountStore
from sshfiles.stores.worker import StoreWorker


def _worker(tmp_path: Path, busy: float) -> StoreWorker:
    store = SQLiteAccountStore(tmp_path, busy_timeout=busy)
    store.add_user("u", str(tmp_path / "home"), None, None)
    store.close()
    return StoreWorker(lambda: SQLiteAccountStore(tmp_path, busy_timeout=busy), busy)


def test_a_request_that_waited_a_busy_timeout_in_the_queue_fails_without_waiting_again(tmp_path: Path) -> None:
    worker = _worker(tmp_path, 0.2)
    ran: list[str] = []

    def charge(name: str):
        def fn(store: AccountStore) -> bool:
            ran.append(name)
            return store.charge_entries("u", 1, None)
        return fn

    async def go() -> list[BaseException | bool]:
        locker = sqlite3.connect(tmp_path / "accounts.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            # the first waits the whole busy timeout for the lock; the second has waited as long by
            # the time its turn comes, so it is refused without touching the store
            return await asyncio.gather(worker.call(charge("first")), worker.call(charge("second")),
                                        return_exceptions=True)
        finally:
            locker.execute("ROLLBACK")
            locker.close()

    first, second = asyncio.run(go())
    assert isinstance(first, AccountError) and isinstance(second, AccountError)
    assert str(second) == "the accounts store is busy; try again later"
    assert ran == ["first"]
    assert asyncio.run(worker.call(charge("after"))) is True  # unlocked: served again
    worker.close()


def test_a_result_is_applied_even_when_its_caller_was_cancelled(tmp_path: Path) -> None:
    worker = _worker(tmp_path, 5.0)
    applied: list[tuple[bool | None, bool]] = []

    async def go() -> None:
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow(store: AccountStore) -> bool:
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()  # until the caller is gone
            return store.charge_entries("u", 1, None)

        task = asyncio.ensure_future(worker.call(slow, lambda r, wanted: applied.append((r, wanted))))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        await worker.call(lambda store: None, request=False)  # FIFO: the first has finished
        await asyncio.sleep(0)

    asyncio.run(go())
    assert applied == [(True, False)]  # the charge happened and its owner was told nobody waits
    worker.close()
