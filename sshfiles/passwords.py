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

The queue in front of the pool is bounded (`verify_password_fair`): a source
(defence.source_key) may have at most `PER_SOURCE` checks queued or running
and all sources together at most `QUEUE_MAX`; a check beyond either bound is
not run at all and answers "busy" at once (the caller counts it as a failed
attempt).  With two argon2 threads a flood from one source therefore costs a
login from another at most PER_SOURCE checks' wait per flooding source,
instead of the whole unbounded backlog (6.6 s with 80 attacker connections
before this bound).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import RFC_9106_LOW_MEMORY

__all__ = ["BUSY", "hash_password", "needs_rehash", "verify_password", "verify_password_async",
           "verify_password_fair"]

_hasher = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)
def _lower_priority() -> None:
    """Argon2 threads yield to the event loop: a login burst must not stall transfers.

    Measured with the benchmark's lag probe: worst stat round trip during a
    burst 44.9 -> 29.8 ms, p99 38.2 -> 14.0 ms, same logins per second.
    libargon2's lane threads inherit the priority.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except OSError:
        pass


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2))),
                                              thread_name_prefix="argon2", initializer=_lower_priority)
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


PER_SOURCE = 2    # argon2 checks one source may have queued or running
QUEUE_MAX = 64    # all sources together; beyond it every new check answers BUSY
BUSY = None       # verify_password_fair's answer when a check was refused, not run
_inflight: dict[str, int] = {}  # source -> checks queued or running (event loop only)
_inflight_total = 0


async def verify_password_fair(stored_hash: str | None, password: str, source: str) -> bool | None:
    """`verify_password_async` behind the per-source and total bounds; BUSY (None) when refused."""
    global _inflight_total
    if _inflight.get(source, 0) >= PER_SOURCE or _inflight_total >= QUEUE_MAX:
        return BUSY
    _inflight[source] = _inflight.get(source, 0) + 1
    _inflight_total += 1
    loop = asyncio.get_running_loop()
    try:
        # The slot is freed when the thread's work really ends (or never started): a client
        # that pipelines requests makes asyncssh cancel this await, not the argon2 run.
        cf = _pool.submit(verify_password, stored_hash, password)
    except BaseException:
        _release(source)
        raise
    def _done(_f: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while argon2 still ran
            loop.call_soon_threadsafe(_release, source)

    cf.add_done_callback(_done)
    return await asyncio.wrap_future(cf)


def _release(source: str) -> None:
    global _inflight_total
    _inflight_total -= 1
    n = _inflight.get(source, 0) - 1
    if n <= 0:
        _inflight.pop(source, None)
    else:
        _inflight[source] = n
