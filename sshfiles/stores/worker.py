"""Store calls off the event loop: the serving process's only way to reach its accounts store.

Every store backend is synchronous (SQLite waits up to its busy timeout for
another process's write lock; a network database waits on the network), and a
serving process has one event loop for all its sessions.  So the loop never
calls a store itself: it hands a function of the store to a `StoreWorker` and
awaits the result, and every other session's requests run meanwhile.

The one design choice (see also quota.py): two lanes, each a single thread
with its own connection, so calls within a lane run one at a time, in the
order they were made:

* the *write* lane (`call`, `submit`) takes every change of the usage ledger
  (reservations, entry charges, settlements, credits, presence marks) and the
  password rehash.  FIFO order is what keeps the ledger simple: a credit
  queued before a charge reaches the store before it, a settlement at close
  before the next session's reservation.
* the *read* lane (`read`) answers logins' and channels' account reads and
  statvfs.  SQLite in WAL mode never makes a reader wait for a writer, so a
  login is not queued behind a charge that waits for a locked store.

A call that has already waited the store's busy timeout in its queue (behind
calls that each waited for a lock) fails at once with the store's usual "busy;
try again" error instead of waiting once more: a request fails after about one
busy timeout, never after many.  Settlements and credits are not requests:
they run whenever their turn comes, and quota.py retries those that fail.

A result the caller no longer waits for (its request was cancelled: the client
left) is still delivered to `then` on the loop, so a reservation or an entry
charge the store has made is never lost from the ledger's books.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .base import AccountStore, StoreCorrupt

__all__ = ["StoreWorker"]

T = TypeVar("T")

BUSY = "the accounts store is busy; try again later"


class _Lane:
    """One thread with its own store connection, opened in that thread on first use."""

    def __init__(self, name: str, opener: Callable[[], AccountStore]) -> None:
        self._opener = opener
        self._store: AccountStore | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, fn: Callable[[AccountStore], T], queued: float, deadline: float | None) -> T:
        if deadline is not None and time.monotonic() - queued > deadline:
            raise StoreCorrupt(BUSY)
        if self._store is None:
            self._store = self._opener()
        return fn(self._store)

    def close(self) -> None:
        def _close() -> None:
            if self._store is not None:
                self._store.close()
                self._store = None
        with contextlib.suppress(RuntimeError):  # already shut down
            self.executor.submit(_close)
        self.executor.shutdown(wait=True)


class StoreWorker:
    """Runs functions of an `AccountStore` in the store threads (see the module docstring).

    `opener` opens a new connection to the same store (one per lane);
    `busy_timeout` is how long a request may wait for the store in all.
    """

    def __init__(self, opener: Callable[[], AccountStore], busy_timeout: float) -> None:
        self.busy_timeout = busy_timeout
        self._write = _Lane("sshfiles-store", opener)
        self._read = _Lane("sshfiles-store-read", opener)
        self._closed = threading.Event()

    # -- from the event loop --------------------------------------------------------------------

    async def call(self, fn: Callable[[AccountStore], T], then: Callable[[T | None, bool], None] | None = None,
                   request: bool = True) -> T:
        """Run `fn(store)` in the write lane and return its result (or raise its exception).

        `then(result, wanted)` runs on the loop when `fn` has finished, before this returns,
        even if the caller was cancelled meanwhile (`wanted` False): it applies what the store
        did to the caller's in-memory books exactly once. It gets None when `fn` raised.
        `request`: fail at once if the call has already waited a busy timeout in the queue.
        """
        return await self._await(self._write, fn, then, request)

    async def read(self, fn: Callable[[AccountStore], T]) -> T:
        """Run a read-only `fn(store)` in the read lane (never behind a write that waits for a lock)."""
        return await self._await(self._read, fn, None, True)

    def submit(self, fn: Callable[[AccountStore], T],
               then: Callable[[concurrent.futures.Future[T]], None] | None = None) -> concurrent.futures.Future[T]:
        """Queue `fn(store)` in the write lane without waiting (settlements, credits, presence).

        `then(future)` runs on the running event loop when it is done (if there is a loop)."""
        fut = self._write.executor.submit(self._write.run, fn, time.monotonic(), None)
        if then is not None:
            loop = asyncio.get_running_loop()

            def _done(f: concurrent.futures.Future[T]) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
                    loop.call_soon_threadsafe(then, f)
            fut.add_done_callback(_done)
        return fut

    async def _await(self, lane: _Lane, fn: Callable[[AccountStore], T],
                     then: Callable[[T | None, bool], None] | None, request: bool) -> T:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()

        def _deliver(f: concurrent.futures.Future[T]) -> None:
            exc = f.exception()
            wanted = not waiter.cancelled()
            try:
                if then is not None:
                    then(None if exc is not None else f.result(), wanted)
            finally:  # the caller is answered even if applying the result failed
                if wanted:
                    if exc is not None:
                        waiter.set_exception(exc)
                    else:
                        waiter.set_result(f.result())

        def _done(f: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
                loop.call_soon_threadsafe(_deliver, f)

        fut = lane.executor.submit(lane.run, fn, time.monotonic(), self.busy_timeout if request else None)
        fut.add_done_callback(_done)
        return await waiter

    # -- outside the loop (startup, shutdown, admin tools) ----------------------------------------

    def call_sync(self, fn: Callable[[AccountStore], T], timeout: float | None = None) -> T:
        """Run `fn(store)` in the write lane and wait here: only where no event loop runs."""
        return self._write.executor.submit(self._write.run, fn, time.monotonic(), None).result(timeout)

    def close(self) -> None:
        """Finish what is queued, then close both connections."""
        if not self._closed.is_set():
            self._closed.set()
            self._write.close()
            self._read.close()

