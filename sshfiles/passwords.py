"""Password hashing with argon2id, and verification that never blocks the event loop.

Parameters: argon2-cffi's RFC 9106 "low memory" profile (time_cost=3,
memory_cost=64 MiB, parallelism=4): about 50-100 ms per check on a current
core, costly for an offline attacker, and with the 64 MiB working set a burst
of logins stays within a small server's memory.  Stored hashes carry their
parameters; a login with an older-parameter hash is rehashed (`needs_rehash`).

Verification runs in a small thread pool (argon2-cffi releases the GIL), so
transfers in progress keep moving during a burst of logins.  An unknown user
is checked against a dummy hash with the same parameters, so the answer takes
the same time and says the same thing as a wrong password.

The queue in front of the pool is bounded and fair (`verify_password_fair`):
a source (defence.source_key) may have at most `PER_SOURCE` checks queued or
running and all sources together at most `QUEUE_MAX`; a check beyond either
bound is not run at all and answers "busy" at once (the caller counts it as a
failed attempt).  Waiting checks are served round-robin between sources, so a
flood from one source delays a login from another by at most the checks
already running plus one per other waiting source, instead of the whole
unbounded FIFO backlog (6.6 s with 80 attacker connections before).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import RFC_9106_LOW_MEMORY

from .background import lower_thread_priority

__all__ = ["BUSY", "hash_password", "needs_rehash", "verify_password", "verify_password_async",
           "verify_password_fair"]

_hasher = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2))),
                                              thread_name_prefix="argon2", initializer=lower_thread_priority)
# Argon2 threads yield to the event loop (background.py): a login burst must not stall transfers.
# Measured with the benchmark's lag probe: worst stat round trip during a burst 44.9 -> 29.8 ms,
# p99 38.2 -> 14.0 ms, same logins per second. libargon2's lane threads inherit the priority.
_DUMMY_HASH = _hasher.hash(os.urandom(16).hex())


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("empty password")
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Constant-work check; a missing hash still pays for one argon2 run."""
    try:
        _hasher.verify(stored_hash or _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return stored_hash is not None


def needs_rehash(stored_hash: str) -> bool:
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


async def verify_password_async(stored_hash: str | None, password: str) -> bool:
    return await asyncio.get_running_loop().run_in_executor(_pool, verify_password, stored_hash, password)


async def hash_password_async(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(_pool, hash_password, password)


PER_SOURCE = 16   # argon2 checks one source may have queued or running (rclone opens a dozen at once)
QUEUE_MAX = 256   # all sources together; beyond it every new check answers BUSY
BUSY = None       # verify_password_fair's answer when a check was refused, not run
_WORKERS = _pool._max_workers  # checks handed to the pool at once; the rest wait in the fair queue


class _Check:
    __slots__ = ("fut", "password", "source", "stored")

    def __init__(self, fut: asyncio.Future[bool], stored: str | None, password: str, source: str) -> None:
        self.fut, self.stored, self.password, self.source = fut, stored, password, source


# Event-loop-only state: per-source FIFO queues served round-robin, so a source's backlog only
# ever delays that source: a login from elsewhere waits for at most the checks already running
# plus one per other waiting source.
_queues: collections.OrderedDict[str, collections.deque[_Check]] = collections.OrderedDict()
_inflight: dict[str, int] = {}  # source -> checks queued or running
_inflight_total = 0
_running = 0


async def verify_password_fair(stored_hash: str | None, password: str, source: str) -> bool | None:
    """`verify_password_async` behind the per-source and total bounds, served round-robin per
    source; BUSY (None) when refused.  A caller cancelled while its check waits leaves the queue;
    one cancelled while its check runs keeps the slot until argon2 is done."""
    global _inflight_total
    if _inflight.get(source, 0) >= PER_SOURCE or _inflight_total >= QUEUE_MAX:
        return BUSY
    loop = asyncio.get_running_loop()
    check = _Check(loop.create_future(), stored_hash, password, source)
    _inflight[source] = _inflight.get(source, 0) + 1
    _inflight_total += 1
    _queues.setdefault(source, collections.deque()).append(check)
    _dispatch()
    return await check.fut


def _dispatch() -> None:
    global _running
    while _running < _WORKERS and _queues:
        source, queue = _queues.popitem(last=False)
        check = queue.popleft()
        if queue:
            _queues[source] = queue  # to the back of the line: round-robin between sources
        if check.fut.done():  # its caller was cancelled while it waited: never run it
            _release(source)
            continue
        _running += 1
        loop = check.fut.get_loop()
        cf = _pool.submit(verify_password, check.stored, check.password)

        def _done(f: concurrent.futures.Future[bool], check: _Check = check, loop: Any = loop) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while argon2 still ran
                loop.call_soon_threadsafe(_finish, check, f)

        cf.add_done_callback(_done)


def _finish(check: _Check, f: concurrent.futures.Future[bool]) -> None:
    global _running
    _running -= 1
    _release(check.source)
    if not check.fut.done():
        exc = f.exception()
        if exc is not None:
            check.fut.set_exception(exc)
        else:
            check.fut.set_result(f.result())
    _dispatch()


def _release(source: str) -> None:
    global _inflight_total
    _inflight_total -= 1
    n = _inflight.get(source, 0) - 1
    if n <= 0:
        _inflight.pop(source, None)
    else:
        _inflight[source] = n
