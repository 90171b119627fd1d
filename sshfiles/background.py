"""Threads for work that may wait: bulk work runs at a lower CPU priority than the event loops.

On a busy machine the kernel shares the cores between every thread that wants one; a thread
that only burns CPU for one client (argon2 of a login, the reads of a copy-data) must not take a
core from an event loop that answers everyone else. A nice value of 10 on the thread (Linux
schedules threads one by one) makes the loops win when both want the same core, and costs the
bulk work nothing when the machine is idle.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

__all__ = ["BULK_POOL", "lower_thread_priority"]


def lower_thread_priority() -> None:
    """Give the calling thread nice 10 (a thread pool's ``initializer``); harmless where refused."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except OSError:
        pass


#: copy-data's chunk reads (session.py): two threads per process, at the lower priority.
BULK_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sshfiles-bulk",
                                                  initializer=lower_thread_priority)
