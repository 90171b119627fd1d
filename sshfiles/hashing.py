"""Hashing of file ranges on an open descriptor: the one hashing core of sshfiles.

Why this module exists: verified resume needs the server to prove what bytes it holds without sending
them back, and the client to hash the same blocks of its local file; the ``sha256sum``/``md5sum`` exec
commands that rclone relies on need whole-file digests. All of them are "digest this range of this fd,
whole or per block", so that lives here once, for the server and the client alike.

This module is pure hashing: no SSH, no SFTP, no asyncssh. The check-file wire format (requests,
replies, SFTP status errors) is ``sshfiles.checkfile``; it calls into this module.

Everything here works on an already-opened file descriptor: the caller resolves a path or handle
through the jail first, so this module never builds a host path and can be tested on its own. Reads
use ``os.pread`` so the descriptor's offset is never moved (the same fd may be serving pipelined
READs), and ``hash_fd_range_async`` runs the blocking work in a worker thread: hashing a large file
must not stall the event loop that serves every other session.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

__all__ = [
    "ALGORITHMS",
    "HASH_WORKERS",
    "MAX_HASH_BYTES",
    "PER_OWNER_ACTIVE",
    "PER_OWNER_WAITING",
    "READ_CHUNK",
    "SLICE_BYTES",
    "HashBusy",
    "HashCancelled",
    "HashScheduler",
    "HashTooLarge",
    "UnsupportedAlgorithm",
    "block_count",
    "digest_size",
    "hash_fd_range",
    "hash_fd_range_async",
    "hash_span",
    "scheduler",
    "select_algorithm",
]

#: Read size for one pread: large enough to amortise the syscall, small enough to keep memory flat.
READ_CHUNK = 1 << 20



class UnsupportedAlgorithm(ValueError):
    """None of the requested algorithms is one we implement (check-file maps it to OP_UNSUPPORTED)."""


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class _CRC32:
    """CRC-32 in the draft's ``crc32`` form (4 bytes, big-endian); hashlib has no CRC."""

    digest_size = 4

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes, /) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def digest(self) -> bytes:
        return self._crc.to_bytes(4, "big")


def _hashlib_factory(name: str) -> Callable[[], _Hasher]:
    def make() -> _Hasher:
        return hashlib.new(name)

    return make


#: Algorithm name (as check-file and the ``*sum`` commands spell it) -> (constructor, digest size).
#: Order is our own preference when a caller has none; the client's list always wins in check-file.
ALGORITHMS: dict[str, tuple[Callable[[], _Hasher], int]] = {
    "sha256": (_hashlib_factory("sha256"), 32),
    "sha512": (_hashlib_factory("sha512"), 64),
    "sha384": (_hashlib_factory("sha384"), 48),
    "sha224": (_hashlib_factory("sha224"), 28),
    "sha1": (_hashlib_factory("sha1"), 20),
    "md5": (_hashlib_factory("md5"), 16),
    "crc32": (_CRC32, 4),
}

def _new_hasher(algorithm: str) -> _Hasher:
    try:
        factory, _ = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"unsupported hash algorithm: {algorithm}") from None
    return factory()


def digest_size(algorithm: str) -> int:
    """Bytes in one digest of ``algorithm``; 0 for an algorithm we do not know.

    A reply decoder uses it to split concatenated digests, and 0 lets it reject what it cannot split.
    """
    entry = ALGORITHMS.get(algorithm)
    return entry[1] if entry else 0


def select_algorithm(offered: list[str]) -> str:
    """Return the first algorithm in the caller's preference list that we support.

    Names are compared case-insensitively and stripped. Raises ``UnsupportedAlgorithm`` when there
    is none (check-file turns that into OP_UNSUPPORTED, the status the draft asks for).
    """
    for name in offered:
        name = name.strip().lower()
        if name in ALGORITHMS:
            return name
    raise UnsupportedAlgorithm("No supported hash algorithm in: " + ",".join(offered))


def block_count(fd: int, offset: int, length: int, block_size: int) -> int:
    """How many digests ``hash_fd_range(fd, _, offset, length, block_size)`` would return now.

    Computed from the file's current size without reading it, so a caller can refuse a request whose
    answer would be too large before doing any hashing. ``block_size`` must be positive.
    """
    size = os.fstat(fd).st_size
    start = min(offset, size)
    stop = size if not length else min(size, offset + length)
    span = max(0, stop - start)
    return -(-span // block_size)


def hash_span(fd: int, offset: int, length: int) -> int:
    """Bytes ``hash_fd_range(fd, _, offset, length)`` would read now (holes of a sparse file included).

    The work of a hash is the bytes it reads, and a hole reads as zeros that cost as much CPU to hash
    as data does, so this is ``st_size`` based, never ``st_blocks``.
    """
    size = os.fstat(fd).st_size
    start = min(offset, size)
    stop = size if not length else min(size, offset + length)
    return max(0, stop - start)


class HashTooLarge(ValueError):
    """The request would hash more than the server's cap (``MAX_HASH_BYTES``)."""

    def __init__(self, span: int, limit: int) -> None:
        super().__init__(f"file too large to hash here (limit {_format_limit(limit)})")
        self.span = span
        self.limit = limit


class HashCancelled(Exception):
    """The hash was stopped: its caller was cancelled or its client went away."""


class HashBusy(Exception):
    """The owner already has ``PER_OWNER_WAITING`` hash requests waiting: refuse, don't queue more."""


def _format_limit(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


class _Job:
    """One hash as a resumable state machine: ``step`` hashes up to a budget of bytes and returns.

    ``hash_fd_range`` runs it to the end in one go; the scheduler runs it slice by slice in its worker
    threads, so jobs of different owners interleave. ``cancelled`` is checked between chunks: setting
    it (any thread) stops the reading within one ``READ_CHUNK``. A plain attribute is enough: the
    thread only ever reads it, and a bool store is atomic under the GIL.
    """

    def __init__(self, fd: int, algorithm: str, offset: int, length: int, block_size: int,
                 max_bytes: int | None = None) -> None:
        if offset < 0 or length < 0 or block_size < 0:
            raise ValueError("offset, length and block_size must not be negative")
        self.fd = fd
        self.algorithm = algorithm
        self.hasher = _new_hasher(algorithm)
        self.end = offset + length if length else None
        self.block_size = block_size
        self.pos = self.block_start = offset
        self.max_bytes = max_bytes
        self.hashed = 0
        self.digests: list[bytes] = []
        self.done = False
        self.cancelled = False
        self.waiter: asyncio.Future[None] | None = None

    def abort(self) -> None:
        """Stop this job: the thread stops at its next chunk, a wait for a turn ends now."""
        self.cancelled = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HashCancelled())

    def step(self, budget: int | None = None) -> bool:
        """Hash up to ``budget`` bytes (None: to the end); True once the digests are complete."""
        while not self.done and (budget is None or budget > 0):
            if self.cancelled:
                raise HashCancelled()
            limit: int | None = self.end
            if self.block_size:
                block_end = self.block_start + self.block_size
                limit = block_end if self.end is None else min(block_end, self.end)
            want = READ_CHUNK if limit is None else min(READ_CHUNK, limit - self.pos)
            data = os.pread(self.fd, want, self.pos) if want > 0 else b""
            if data:
                self.hashed += len(data)
                if self.max_bytes is not None and self.hashed > self.max_bytes:
                    raise HashTooLarge(self.hashed, self.max_bytes)  # the file grew past the cap
                self.hasher.update(data)
                self.pos += len(data)
                if budget is not None:
                    budget -= len(data)
            eof = not data
            complete = limit is not None and self.pos >= limit
            if not self.block_size:
                if eof or complete:
                    self.digests = [self.hasher.digest()]
                    self.done = True
            elif eof:
                if self.pos > self.block_start:
                    self.digests.append(self.hasher.digest())
                self.done = True
            elif complete:
                self.digests.append(self.hasher.digest())
                if self.end is not None and self.pos >= self.end:
                    self.done = True
                else:
                    self.block_start = self.pos
                    self.hasher = _new_hasher(self.algorithm)
        return self.done


def hash_fd_range(fd: int, algorithm: str, offset: int = 0, length: int = 0,
                  block_size: int = 0) -> list[bytes]:
    """Digest ``length`` bytes of ``fd`` from ``offset`` (0 = to EOF); blocking.

    With ``block_size`` 0 the result is one digest over the whole range (the digest of no data when the
    range is empty). Otherwise it is one digest per ``block_size`` bytes, the last possibly short, and
    an empty list for an empty range. Uses ``os.pread`` only, so the fd's file offset is untouched.
    No cap and no scheduling: this is the client's (and the unit tests') direct call; the server
    hashes through ``hash_fd_range_async``.
    """
    job = _Job(fd, algorithm, offset, length, block_size)
    job.step(None)
    return job.digests


# -- the server's hashing: capped, cancellable, fair between owners ------------------------------
#
# Why: a hash costs CPU for every byte it reads, holes of a sparse file included, and one request can
# name terabytes. So (1) one request may ask for at most MAX_HASH_BYTES (refused before any reading);
# (2) hashing has its own HASH_WORKERS threads (never asyncio's default pool, which the store and
# other blocking calls share) and a job holds a thread for one SLICE_BYTES slice at a time, then
# queues again behind its owner's turn: owners take turns round robin, so another user's 4 KiB hash
# waits at most about one slice per worker, whatever one user has queued; (3) one owner runs at most
# PER_OWNER_ACTIVE jobs at once, with at most PER_OWNER_WAITING more waiting (beyond: HashBusy);
# (4) a job stops within one chunk when its task is cancelled or its client's channel closes, and
# the coroutine returns only after the thread has stopped reading, so the caller may close the fd.

#: Most bytes one request may hash (a hole counts as the bytes it reads). 64 GiB is about a minute of
#: SHA-256 on one core; larger files are hashed by range (check-file with offset/length) or not at
#: all. ``--max-hash-bytes`` sets another (`configure`).
MAX_HASH_BYTES = 64 << 30

#: Threads that hash, for the whole process (a 2-core host: hashing never takes every core).
HASH_WORKERS = 2

#: Bytes a job hashes per turn on a worker (a few ms of SHA-256): the granularity of fairness.
SLICE_BYTES = 8 * READ_CHUNK

#: Jobs one owner (user) may have hashing at once, and may have waiting for those.
PER_OWNER_ACTIVE = 2
PER_OWNER_WAITING = 16


class HashScheduler:
    """Hash jobs on a small private thread pool, interleaved round robin between owners.

    All bookkeeping happens on the event loop (no locks); only ``_Job.step`` runs in the threads.
    """

    def __init__(self, workers: int = HASH_WORKERS, slice_bytes: int = SLICE_BYTES,
                 per_owner_active: int = PER_OWNER_ACTIVE, per_owner_waiting: int = PER_OWNER_WAITING) -> None:
        self.workers = workers
        self.slice_bytes = slice_bytes
        self.per_owner_active = per_owner_active
        self.per_owner_waiting = per_owner_waiting
        self._pool: ThreadPoolExecutor | None = None
        self._free = workers
        self._turns: dict[str, deque[asyncio.Future[None]]] = {}   # owner -> jobs waiting for a worker
        self._rotation: deque[str] = deque()                       # owners with a job waiting, in turn
        self._active: dict[str, int] = {}                          # owner -> jobs admitted
        self._admission: dict[str, deque[asyncio.Future[None]]] = {}

    def stats(self) -> dict[str, int]:
        return {"free_workers": self._free, "owners_active": len(self._active),
                "jobs_active": sum(self._active.values()),
                "jobs_waiting": sum(len(q) for q in self._admission.values())}

    # -- admission: PER_OWNER_ACTIVE jobs per owner, the rest wait (bounded) ------------------------

    async def _admit(self, owner: str, job: _Job) -> None:
        if self._active.get(owner, 0) < self.per_owner_active:
            self._active[owner] = self._active.get(owner, 0) + 1
            return
        queue = self._admission.setdefault(owner, deque())
        if len(queue) >= self.per_owner_waiting:
            raise HashBusy("too many hash requests in progress; try again later")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(fut)
        await self._wait_granted(fut, job, self._leave, owner)

    def _leave(self, owner: str) -> None:
        queue = self._admission.get(owner)
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(None)  # the admitted count passes to it unchanged
                return
        self._admission.pop(owner, None)
        left = self._active.get(owner, 0) - 1
        if left > 0:
            self._active[owner] = left
        else:
            self._active.pop(owner, None)

    # -- turns: one slice on a worker, owners round robin ------------------------------------------

    async def _turn(self, owner: str, job: _Job) -> None:
        if self._free > 0 and not self._rotation:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._turns.setdefault(owner, deque())
        queue.append(fut)
        if owner not in self._rotation:
            self._rotation.append(owner)
        await self._wait_granted(fut, job, lambda _owner: self._end_turn(), owner)

    def _end_turn(self) -> None:
        while self._rotation:
            owner = self._rotation.popleft()
            queue = self._turns.get(owner)
            fut = None
            while queue:
                candidate = queue.popleft()
                if not candidate.done():
                    fut = candidate
                    break
            if queue:
                self._rotation.append(owner)  # more of this owner's jobs: back of the line
            else:
                self._turns.pop(owner, None)
            if fut is not None:
                fut.set_result(None)  # the worker passes to it
                return
        self._free += 1

    @staticmethod
    async def _wait_granted(fut: asyncio.Future[None], job: _Job, give_back: Callable[[str], None],
                            owner: str) -> None:
        job.waiter = fut
        try:
            await fut
        except BaseException:
            # Granted in the same tick as we were cancelled: hand the grant on, don't lose it.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                give_back(owner)
            raise
        finally:
            job.waiter = None

    # -- running a job -----------------------------------------------------------------------------

    async def _slice(self, job: _Job) -> bool:
        """One slice in a worker; returns only once the thread is done with the fd, even if cancelled."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sshfiles-hash")
        fut = asyncio.get_running_loop().run_in_executor(self._pool, job.step, self.slice_bytes)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            job.cancelled = True
            while not fut.done():
                try:
                    await asyncio.wait([fut])
                except asyncio.CancelledError:
                    job.cancelled = True
            raise

    async def run(self, job: _Job, owner: str, closed: Awaitable[object] | None = None) -> list[bytes]:
        """Run ``job`` to its digests; ``closed`` (e.g. the channel's ``wait_closed()``) aborts it."""
        watcher: asyncio.Future[object] | None = None
        if closed is not None:
            watcher = asyncio.ensure_future(closed)
            watcher.add_done_callback(lambda _f: job.abort())
        try:
            if job.cancelled:
                raise HashCancelled()
            await self._admit(owner, job)
            try:
                while True:
                    await self._turn(owner, job)
                    try:
                        if await self._slice(job):
                            return job.digests
                    finally:
                        self._end_turn()
            finally:
                self._leave(owner)
        finally:
            if watcher is not None:
                watcher.cancel()


#: The process's scheduler (one event loop per server process).
scheduler = HashScheduler()

#: The cap `hash_fd_range_async` applies unless told otherwise (``--max-hash-bytes``).
_cap = MAX_HASH_BYTES


def configure(workers: int, per_owner_active: int, per_owner_waiting: int, max_bytes: int) -> None:
    """Apply the serve settings (``--hash-workers``, ``--hash-per-user-active``/``-waiting``,
    ``--max-hash-bytes``): once at server start, before any hashing."""
    global scheduler, _cap
    scheduler = HashScheduler(workers, SLICE_BYTES, per_owner_active, per_owner_waiting)
    _cap = max_bytes



async def hash_fd_range_async(fd: int, algorithm: str, offset: int = 0, length: int = 0,
                              block_size: int = 0, *, owner: str = "", closed: Awaitable[object] | None = None,
                              max_bytes: int | None = -1) -> list[bytes]:
    """``hash_fd_range`` for the server: capped, in the hash workers, fair between owners, cancellable.

    Raises ``HashTooLarge`` before reading anything when the range is over ``max_bytes``, ``HashBusy``
    when ``owner`` already has too many requests waiting, and ``HashCancelled`` when ``closed``
    completes first. When the calling task is cancelled, the thread stops within one chunk and this
    coroutine re-raises only after it has, so the caller's ``finally`` may close ``fd`` safely.
    """
    if max_bytes == -1:  # the configured cap
        max_bytes = _cap
    watch = asyncio.ensure_future(closed) if closed is not None else None
    try:
        job = _Job(fd, algorithm, offset, length, block_size, max_bytes)
        if max_bytes is not None:
            span = await asyncio.to_thread(hash_span, fd, offset, length)
            if span > max_bytes:
                raise HashTooLarge(span, max_bytes)
        return await scheduler.run(job, owner, watch)
    finally:
        if watch is not None:
            watch.cancel()
