"""Threads for work that may wait: bulk work runs at a lower CPU priority than the event loops.

On a busy machine the kernel shares the cores between every thread that wants one; a thread
that only burns CPU for one client (argon2 of a login, the reads of a copy-data) must not take a
core from an event loop that answers everyone else. A nice value of 10 on the thread (Linux
schedules threads one by one) makes the loops win when both want the same core, and costs the
bulk work nothing when the machine is idle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["BULK_POOL", "lower_thread_priority", "run_bulk"]

T = TypeVar("T")


def lower_thread_priority() -> None:
    """Give the calling thread nice 10 (a thread pool's ``initializer``); harmless where refused."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except OSError:
        pass


#: copy-data's chunk reads, writes and write-backs, truncations and big files' closes (session.py, quota.py):
#: two threads per process, at the lower priority.
BULK_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sshfiles-bulk",
                                                  initializer=lower_thread_priority)


async def run_bulk(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` on a bulk thread; a cancelled caller re-raises only once `fn` has returned.

    The work is given file descriptors of the caller's handles: were the cancellation let through
    at once, the caller's cleanup could close a descriptor the thread is still using, and the
    number, reused by another session's open, would be read or written in its place. `fn` is one
    bounded step (a chunk), so the wait is short.
    """
    fut = asyncio.get_running_loop().run_in_executor(BULK_POOL, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue
        raise
