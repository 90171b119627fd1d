"""Per-user disk quotas: exact admission, cheap on the write path, shared across processes.

Usage is the sum of apparent sizes of the regular files in a home (a sparse
file counts at its full size; directories and symlinks count as zero), and
the number of entries (files, directories, symlinks: each name once).  Every
operation that can change either asks this module first:

* growth (a write past the end, a truncate upwards, a new entry) must be
  *charged* before it happens; a charge that does not fit raises
  `QuotaExceeded` and nothing is written;
* shrinking (remove, truncate down, overwrite by rename) is *credited* after
  it happened.  A credit the store cannot take now (locked, down) is kept in
  memory and retried; it is never lost and never reported to the client as a
  failure of an operation that did happen.

To avoid a store round trip per SFTP WRITE, a process reserves space in
chunks (`UserLedger.pool`) and consumes it in memory.  Chunks are at most an
eighth of the remaining room, so near the limit reservations become exact;
before refusing, a process first gives back its own unused pool, so a refusal
within one process is exact to the byte.  Across processes (workers, nodes) a
refused process asks the others holding reservations for that user to give
their unused pools back (`AccountStore.request_reclaim`; each process answers
within RECLAIM_INTERVAL, `QuotaManager.answer_reclaims`) and tries again for up
to RECLAIM_WAIT seconds before it refuses: a refusal means used bytes plus
writes in flight fill the quota.  Consumed bytes are settled into the
store when a write handle closes.  A process that dies leaves a reservation
row; the server rescans the homes of such users (`reconcile_dead_owners`).

The event loop never waits on the store (the one choice, see stores/worker.py): one store thread
with its own connection per process takes every ledger change in order.  A charge the pool covers
is pure memory (`UserLedger.take`); one it does not cover is awaited (`charge`, `charge_entry`), so
only that request waits, and a locked store fails it after the busy timeout with one plain line
(EAGAIN); settlements and credits are queued and answered at once, and what the store refuses comes
back into the ledger and is retried.  The size lock is never held across such a wait: the charge is
made first and the size measured again under the lock (`UserSession._grown`).

Two kernel locks make the arithmetic exact across worker processes:

* every size change (write past the end, truncate) holds an OFD write lock on
  the file (`size_lock`) from the fstat that measures it to the change itself,
  so two processes can never both charge or both credit the same bytes;
* a removed file's bytes stay on disk while any handle has it open, so they
  are credited when the last handle closes.  Every handle holds a shared
  flock; whoever closes a handle of an unlinked inode tries to convert it to
  an exclusive one: the kernel lets exactly the last holder succeed (a failed
  conversion drops the shared lock), and that one credits the bytes
  (`hold` / `release`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import logging
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .background import BULK_POOL
from .stores import LEDGER_MAX, UNLIMITED_ENTRIES, AccountError, AccountStore, folder_of_ledger
from .stores.worker import StoreWorker
from .units import format_size

__all__ = [
    "MAX_FILE_SIZE",
    "EntriesExceeded",
    "QuotaExceeded",
    "QuotaManager",
    "Usage",
    "UserLedger",
    "check_size",
    "default_max_entries",
    "entries_limit",
    "hold",
    "release",
    "scan_usage",
    "size_lock",
]

log = logging.getLogger("sshfiles.quota")

T = TypeVar("T")

MAX_CHUNK = 64 * 1024 * 1024
RECHECK_SECONDS = 0.25  # how long a reserved chunk is trusted before the quota is read again
RETRY_SECONDS = 1.0     # how soon a credit the store refused is tried again
# A charge the store refuses while other processes (or nodes) hold reservations for the same ledger
# key asks them for their unused pools (`request_reclaim`) and tries again for up to RECLAIM_WAIT
# seconds, every RECLAIM_POLL; a process holding a pool looks for such requests every RECLAIM_INTERVAL.
RECLAIM_WAIT = 2.0
RECLAIM_POLL = 0.1
RECLAIM_INTERVAL = 0.2
# No offset or size past off_t's range: the kernel could not honour it, and a ledger
# value beyond it would stop being an exact integer in the store.
MAX_FILE_SIZE = LEDGER_MAX
# Default entry limit for a user with a byte quota and no explicit --files: one entry per
# 4 KiB of quota (a directory costs a 4 KiB block on most filesystems), at least this many.
MIN_DEFAULT_ENTRIES = 1000
BYTES_PER_DEFAULT_ENTRY = 4096


class QuotaExceeded(OSError):
    """Refused growth; the message carries the numbers a user needs."""

    def __init__(self, used: int, quota: int) -> None:
        super().__init__(errno.EDQUOT, f"quota exceeded: {format_size(used)} used of {format_size(quota)}")
        self.used = used
        self.quota = quota


def _store_unavailable(exc: AccountError) -> OSError:
    """A store failure on a charge, as the one-line OSError a protocol adapter can send: asyncssh
    would answer any other exception with an "Uncaught exception" prefix.  The store's message is
    already generic (no host path)."""
    return OSError(errno.EAGAIN, str(exc))


class EntriesExceeded(OSError):
    """Refused new file or directory: the user's entry quota is full."""

    def __init__(self, entries: int, limit: int) -> None:
        super().__init__(errno.EDQUOT, f"quota exceeded: {entries} of {limit} files and directories")
        self.entries = entries
        self.limit = limit


def default_max_entries(quota: int | None) -> int | None:
    """The entry limit of a user with no explicit one: none without a byte quota."""
    if quota is None:
        return None
    return max(MIN_DEFAULT_ENTRIES, quota // BYTES_PER_DEFAULT_ENTRY)


def entries_limit(quota: int | None, max_entries: int | None) -> int | None:
    """The effective entry limit (None: unlimited) from the stored settings."""
    if max_entries is None:
        return default_max_entries(quota)
    if max_entries == UNLIMITED_ENTRIES or max_entries < 0:
        return None
    return max_entries


def check_size(end: int) -> None:
    """Refuse an offset or size the kernel and the ledger cannot represent."""
    if end < 0 or end > MAX_FILE_SIZE:
        raise OSError(errno.EFBIG, "File too large")


# -- kernel locks that keep the ledger exact across processes ------------------------

# struct flock for F_OFD_SETLKW: l_type, l_whence, l_start, l_len (0 = to the end, any size), l_pid (0 for OFD)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
_WRLCK = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_UNLCK = struct.pack("hhxxxxqqixxxx", fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)


@contextlib.contextmanager
def size_lock(fd: int) -> Iterator[None]:
    """Hold an OFD write lock on the whole file while its size is measured and changed.

    Within one process every size change already runs to completion on the
    event loop; the lock is what makes fstat -> charge -> write atomic against
    other worker processes.  It never blocks for longer than another process's
    single write or truncate, and is independent of the flock used by `hold`.
    """
    fcntl.fcntl(fd, _F_OFD_SETLKW, _WRLCK)
    try:
        yield
    finally:
        fcntl.fcntl(fd, _F_OFD_SETLKW, _UNLCK)


def hold(fd: int) -> None:
    """Register a handle as a holder of its inode (a shared flock), see `release`."""
    with contextlib.suppress(OSError):  # someone else's exclusive lock: we just don't take part
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def release(fd: int) -> int:
    """Close a handle; returns the bytes to credit if it was the last handle of a removed file.

    The conversion to an exclusive lock succeeds for exactly one of the last
    holders of an unlinked inode (a failed non-blocking conversion drops our
    shared lock, so the next one can succeed); the bytes leave the disk when
    the last fd closes, which is this one or one that has already given up.
    """
    try:
        return _credit_of(fd)[0]
    finally:
        os.close(fd)


#: A regular file at least this big is closed on a bulk thread by `release_later`.
BACKGROUND_CLOSE_SIZE = 8 * 1024 * 1024


def release_later(fd: int) -> tuple[int, concurrent.futures.Future[None] | None]:
    """`release`, with the close of a big file on a bulk thread: (the bytes to credit, the close
    still running, for a caller that answers only once it is done; None when already closed).

    Why: a close can take long and the event loop must not wait for it. On ext4 the close of a
    file truncated from a larger size (an upload over an existing file) starts the writeback of
    everything written since (auto_da_alloc): 350-420 ms per GiB, measured; the last close of a
    removed file frees its pages and blocks, about 100 ms per GiB. The file is unlocked first,
    so another holder's conversion (`release`) sees this handle gone; the descriptor stays open
    until the thread closes it, so its number cannot be reused meanwhile.
    """
    try:
        freed, size = _credit_of(fd)
    except BaseException:
        os.close(fd)
        raise
    if size < BACKGROUND_CLOSE_SIZE:
        os.close(fd)
        return freed, None
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    try:
        return freed, BULK_POOL.submit(os.close, fd)
    except RuntimeError:  # the pool is shut down (interpreter exit): close here after all
        os.close(fd)
        return freed, None


def _credit_of(fd: int) -> tuple[int, int]:
    """(the bytes to credit when this is the last handle of a removed file, the file's size)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return 0, 0
    if st.st_nlink == 0:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass
        else:
            size = os.fstat(fd).st_size
            return size, size
    return 0, st.st_size


@dataclass
class UserLedger:
    """One user's quota bookkeeping inside this process; only ever used from the event loop.

    The loop never waits on the store (stores/worker.py): a WRITE consumes the in-memory `pool`
    (`take`, no store call, no thread); a charge the pool cannot cover is awaited from the store
    thread (`charge`, `charge_entry`); settlements and credits are queued to it (`settle`,
    `flush`) and the request that caused them is answered at once.  The store thread's single
    lane runs the queued calls in order, so a credit queued before a charge counts before it.
    Amounts queued but not yet taken by the store are counted in `queued` (not in sync); one
    the store refused comes back into `unsettled`/`pending_*` and is retried.
    """

    name: str
    worker: StoreWorker
    owner: str
    pool: int = 0            # reserved in the store, not yet consumed
    unsettled: int = 0       # consumed (really on disk) but not yet moved into `used`
    pending_bytes: int = 0   # credits not yet handed to the store (retried after a failure)
    pending_entries: int = 0
    queued: int = 0          # settlements and credits handed to the store thread, not finished
    write_handles: int = 0
    open_handles: int = 0    # file + directory handles of all this user's sessions here (session.py)
    sessions: int = 0        # this user's open sessions in this process (presence row while > 0)
    checked: float = 0.0     # monotonic time the quota was last read
    entry_limit: int | None = None
    entry_limit_read: float = -1e9
    retry: asyncio.TimerHandle | None = None
    # One charge of this user asks the store at a time; WRITEs wait for it instead of racing it.
    charging: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- charges ------------------------------------------------------------

    def take(self, n: int) -> bool:
        """The fast path of every WRITE: consume `n` reserved bytes in memory (no store, no await).

        False when the store must be asked first (`charge`): the pool is short, it has not
        been checked against the quota for RECHECK_SECONDS, or another charge of this user is
        asking the store right now."""
        if n <= 0:
            return True
        if self.pool < n or self.charging.locked() or time.monotonic() - self.checked > RECHECK_SECONDS:
            return False
        self.pool -= n
        self.unsettled += n
        return True

    async def charge(self, n: int) -> None:
        """Account for `n` new bytes before they are written, or raise QuotaExceeded (or EAGAIN when
        the store cannot answer within its busy timeout).  Other sessions run while it waits."""
        if self.take(n):
            return
        async with self.charging:
            try:
                if self.pool and time.monotonic() - self.checked > RECHECK_SECONDS:
                    await self._recheck()
                if self.pool < n:
                    if self.pending_bytes or self.pending_entries:
                        self.flush()  # queued first: what was freed counts before anything is refused
                    await self._refill(n - self.pool)
            except AccountError as exc:  # the store is busy or down: refuse this growth, say so plainly
                raise _store_unavailable(exc) from None
            # Nothing but this charge takes from the pool while `charging` is held, and a
            # settlement does not release it meanwhile: the pool now covers `n`.
            self.pool -= n
            self.unsettled += n

    async def _recheck(self) -> None:
        """An admin may have lowered the quota since the pool was reserved: if it no longer
        fits, give the pool back so this charge asks the store (one read per RECHECK_SECONDS)."""
        pool, held, owner, name = self.pool, self.pool + self.unsettled, self.owner, self.name

        def look(store: AccountStore) -> int:
            # In the write lane, so every settlement queued before this one is in the row already.
            if store.reservation(owner, name) < held:
                return -1  # our row is gone: the account was removed (maybe re-created)
            quota, charged = store.quota_state(name)
            if quota is not None and charged > quota:
                store.settle(owner, name, 0, pool)
                return pool
            return 0

        def then(released: int | None, _wanted: bool) -> None:
            if released is None:
                return  # the store failed: the charge fails, the pool stays as it is
            self.checked = time.monotonic()
            if released < 0:
                self.pool = 0  # nothing backs the pool any more; the new account starts from its own
            else:
                self.pool -= released

        await self.worker.call(look, then)

    async def _refill(self, need: int) -> None:
        """Reserve at least `need` more bytes in the store.

        The store's check counts our own pool as reserved; since the pool is
        about to be consumed by this very charge, ``used + reservations + need``
        is exactly the usage after the write: no false refusal within a process.
        Across processes: when the store refuses while other owners hold
        reservations for this key, they are asked for their unused pools and
        the reservation is tried again every RECLAIM_POLL for up to RECLAIM_WAIT
        seconds (only this user's charges wait; the loop and other sessions run).
        """
        owner, name = self.owner, self.name

        def reserve(store: AccountStore, ask: bool) -> int:
            """The bytes reserved; 0 when refused but other owners were asked to give theirs back."""
            quota, charged = store.quota_state(name)
            if quota is None:
                extra = MAX_CHUNK
            else:
                extra = min(MAX_CHUNK, max(0, (quota - charged - need) // 8))
            if extra and store.reserve(owner, name, need + extra):
                return need + extra
            if store.reserve(owner, name, need):
                return need
            if ask and store.request_reclaim(owner, name):
                return 0
            q, c = store.quota_state(name)
            if q is None:  # only the ledger's integer range can refuse a user without a quota
                raise OSError(errno.EFBIG, "File too large")
            raise QuotaExceeded(c, q)

        def then(got: int | None, _wanted: bool) -> None:
            # Applied even if the request was cancelled meanwhile: the bytes stay in the pool.
            if got:
                self.pool += got
                self.checked = time.monotonic()

        if await self.worker.call(functools.partial(reserve, ask=True), then):
            return
        deadline = time.monotonic() + RECLAIM_WAIT
        try:
            while True:
                await asyncio.sleep(RECLAIM_POLL)
                ask = time.monotonic() < deadline  # the last try refuses for good
                if await self.worker.call(functools.partial(reserve, ask=ask), then):
                    return
        finally:  # got it, refused, or the client left: the request is withdrawn in every case
            self._queue(lambda store: store.end_reclaim(owner, name), lambda _r, _e: None)

    def give_back(self) -> bool:
        """Another process asked for this key's unused reservations (`QuotaManager.answer_reclaims`):
        release the pool and settle what was consumed now, so our row holds nothing (the asker
        then knows at once when nothing more can come back). A charge of ours in progress keeps
        the pool: it is about to be consumed."""
        if not (self.pool or self.unsettled) or self.charging.locked():
            return False
        self.settle(release_pool=True)
        return True

    def uncharge(self, n: int) -> None:
        """Give back a charge whose growth did not happen (the write or truncate failed).

        The bytes return to this process's pool, not to the settled usage, so
        the ledger never dips below what is on disk, even for a moment.
        """
        if n > 0:
            n = min(n, self.unsettled)
            self.unsettled -= n
            self.pool += n

    def credit(self, n: int) -> None:
        """Bytes that left the disk (remove, shrink, overwritten by rename): queued to the store."""
        if n > 0:
            self.pending_bytes += n
            self.flush()

    # -- entries ------------------------------------------------------------

    async def charge_entry(self) -> None:
        """Account for one new file or directory before creating it, or raise EntriesExceeded."""
        if self.pending_bytes or self.pending_entries:
            self.flush()
        now = time.monotonic()
        refresh = now - self.entry_limit_read > RECHECK_SECONDS
        known, name = self.entry_limit, self.name

        def charge(store: AccountStore) -> tuple[int | None, bool, int]:
            limit = known
            if refresh:
                quota, max_entries, _ = store.entries_state(name)
                limit = entries_limit(quota, max_entries)
            if store.charge_entries(name, 1, limit):
                return limit, True, 0
            return limit, False, store.entries_state(name)[2]

        def then(result: tuple[int | None, bool, int] | None, wanted: bool) -> None:
            if result is None:
                return
            limit, ok, _ = result
            if refresh:
                self.entry_limit, self.entry_limit_read = limit, now
            if ok and not wanted:  # the request went away: nothing will be created for this charge
                self.credit_entries(1)

        try:
            limit, ok, entries = await self.worker.call(charge, then)
        except AccountError as exc:
            raise _store_unavailable(exc) from None
        if not ok:
            raise EntriesExceeded(entries, limit if limit is not None else LEDGER_MAX)

    def credit_entries(self, n: int) -> None:
        """Entries that are gone (remove, rmdir, replaced by rename), or a charge given back."""
        if n > 0:
            self.pending_entries += n
            self.flush()

    # -- store synchronisation ------------------------------------------------

    def _queue(self, fn: Callable[[AccountStore], T], then: Callable[[T | None, BaseException | None], None]) -> None:
        """Hand `fn` to the store thread; `then(result, error)` runs on the loop when it is done.

        Without a running loop (shutdown, tools) it runs here and now."""
        self.queued += 1

        def done(result: T | None, error: BaseException | None) -> None:
            self.queued -= 1
            then(result, error)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            try:
                result = self.worker.call_sync(fn)
            except AccountError as exc:
                done(None, exc)
            else:
                done(result, None)
            return

        def finished(f: concurrent.futures.Future[T]) -> None:
            error = f.exception()
            done(None if error is not None else f.result(), error)

        try:
            self.worker.submit(fn, finished)
        except RuntimeError as exc:  # the store threads are shut down (the server is stopping)
            done(None, exc)

    def flush(self) -> None:
        """Hand pending credits to the store; what it cannot take comes back and is retried soon."""
        nbytes, nentries, name = self.pending_bytes, self.pending_entries, self.name
        if not (nbytes or nentries):
            return
        self.pending_bytes = self.pending_entries = 0

        def apply(store: AccountStore) -> tuple[int, int, AccountError | None]:
            left_bytes = nbytes
            try:
                if nbytes:
                    store.adjust_used(name, -nbytes)
                    left_bytes = 0
                if nentries:
                    store.adjust_entries(name, -nentries)
            except AccountError as exc:  # what is left, so nothing is credited twice
                return left_bytes, nentries, exc
            return 0, 0, None

        def then(result: tuple[int, int, AccountError | None] | None, error: BaseException | None) -> None:
            left_bytes, left_entries, exc = result if result is not None else (nbytes, nentries, error)
            if left_bytes or left_entries:
                self.pending_bytes += left_bytes
                self.pending_entries += left_entries
                self._retry_later(f"credit of {left_bytes} bytes, {left_entries} entries", exc)
            else:
                self._maybe_unmark()

        self._queue(apply, then)

    def settle(self, release_pool: bool) -> None:
        """Move consumed bytes into the store's usage (queued); on failure they come back, retried soon."""
        consumed = self.unsettled
        release = self.pool if release_pool and not self.charging.locked() else 0
        if consumed or release:
            self.unsettled -= consumed
            self.pool -= release
            owner, name, keep = self.owner, self.name, self.sessions > 0

            def apply(store: AccountStore) -> None:
                store.settle(owner, name, consumed, release, keep_row=keep)

            def then(_result: None, error: BaseException | None) -> None:
                if error is not None:  # still counted as reserved in the store: nothing over-admitted
                    self.unsettled += consumed
                    self.pool += release
                    self._retry_later(f"settlement of {consumed} bytes", error)
                else:
                    self._maybe_unmark()

            self._queue(apply, then)
        self.flush()

    def _retry_later(self, what: str, exc: BaseException | None) -> None:
        if self.retry is not None:
            return  # one retry scheduled at a time; one log line per failure streak
        log.warning("quota ledger of %s: %s postponed, the store failed (%s); retrying", self.name, what, exc)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (admin CLI, shutdown): settle_all and the next charge retry
        self.retry = loop.call_later(RETRY_SECONDS, self._retry)

    def _retry(self) -> None:
        self.retry = None
        self.settle(release_pool=self.write_handles == 0)

    @property
    def in_sync(self) -> bool:
        """Nothing of this ledger waits for the store."""
        return not (self.unsettled or self.pending_bytes or self.pending_entries or self.queued)

    # -- presence -----------------------------------------------------------

    def session_opened(self) -> None:
        """A session of this user starts in this process: mark the process present for the user,
        so a crash (which drops its handles without a last-close credit) leads to a rescan."""
        self.sessions += 1
        self.checked = 0.0  # a new session re-checks the pool against the store at its first charge
        if self.sessions == 1:
            owner, name = self.owner, self.name

            def then(_result: None, error: BaseException | None) -> None:
                if error is not None:
                    log.warning("quota ledger of %s: presence not recorded (%s)", name, error)
                # The last session may have ended while this write was queued (its close saw the
                # ledger out of sync and left the row): drop it now, or a later crash of this
                # process makes the survivors rescan a user it no longer served.
                self._maybe_unmark()

            self._queue(lambda store: store.mark_present(owner, name), then)

    def session_closed(self) -> None:
        self.sessions -= 1
        self._maybe_unmark()

    def _maybe_unmark(self) -> None:
        """The last session is gone and the store has everything: drop the presence row."""
        if self.sessions == 0 and self.pool == 0 and self.in_sync:
            owner, name = self.owner, self.name
            # A failure only leaves a stale presence row, which costs a rescan after a crash.
            self._queue(lambda store: store.unmark_present(owner, name), lambda _r, _e: None)

    async def state(self) -> tuple[int | None, int]:
        name = self.name
        return await self.worker.read(lambda store: store.quota_state(name))


class QuotaManager:
    """All users' ledgers for this process, keyed by name, sharing one store worker."""

    def __init__(self, worker: StoreWorker, owner: str) -> None:
        self.worker = worker
        self.owner = owner
        self._ledgers: dict[str, UserLedger] = {}

    def ledger(self, name: str) -> UserLedger:
        led = self._ledgers.get(name)
        if led is None:
            led = self._ledgers[name] = UserLedger(name, self.worker, self.owner)
        return led

    def settle_all(self) -> None:
        for led in self._ledgers.values():
            led.settle(release_pool=True)

    async def drain(self) -> None:
        """Settle everything and wait until the store thread has done it (shutdown)."""
        self.settle_all()
        await self.worker.call(lambda store: None, request=False)
        await asyncio.sleep(0)  # the queued calls' results, delivered before this one's, are applied

    def in_sync(self) -> bool:
        """No ledger of this process holds anything the store has not taken."""
        return all(led.in_sync for led in self._ledgers.values())

    async def answer_reclaims(self) -> list[str]:
        """Give back the unused pools other processes asked for (`UserLedger._refill`); returns the
        keys released. One read of the store, and only while this process holds a reservation."""
        if not any(led.pool or led.unsettled for led in self._ledgers.values()):
            return []
        owner = self.owner
        asked = await self.worker.read(lambda store: store.reclaim_requests(owner))
        return [name for name in asked if (led := self._ledgers.get(name)) is not None and led.give_back()]

    async def serve_reclaims(self) -> None:
        """Answer reclaim requests every RECLAIM_INTERVAL (until cancelled); a failed round is retried."""
        while True:
            await asyncio.sleep(RECLAIM_INTERVAL)
            try:
                released = await self.answer_reclaims()
            except AccountError as exc:
                log.debug("reclaim requests not read: %s", exc)
            except Exception:
                log.exception("reclaim round failed")
            else:
                for name in released:
                    log.debug("unused reservation of %s given back on request", name)


@dataclass
class Usage:
    """What a home holds, as the ledger counts it."""

    bytes: int = 0
    entries: int = 0


def scan_usage(home: str | os.PathLike[str]) -> Usage:
    """Apparent size of every regular file below `home` (each inode once) and the number of
    entries below it (each name once), never following symlinks.

    Walks by directory fd (os.fwalk), so no path length limit applies: a tree deeper than
    PATH_MAX, which renames through parent fds can build, is counted like any other.
    """
    usage = Usage()
    seen: set[tuple[int, int]] = set()
    for _root, dirs, files, dir_fd in os.fwalk(home, follow_symlinks=False):
        usage.entries += len(dirs) + len(files)
        for name in files:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we scanned
            if stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    usage.bytes += st.st_size
    return usage


def rescan_user(store: AccountStore, name: str,
                on_change: Callable[[str, int, int], None] | None = None) -> tuple[int, int]:
    """Set a user's (or a folder's: a folder_ledger key) settled usage (bytes and entries) to what is
    on disk; returns bytes (before, after)."""
    folder_name = folder_of_ledger(name)
    if folder_name is None:
        acct = store.require_user(name)
        before, root = acct.used, acct.home
    else:
        folder = store.get_folder(folder_name)
        if folder is None:
            raise AccountError(f"no such folder: {folder_name}")
        before, root = folder.used, folder.path
    usage = scan_usage(root) if Path(root).is_dir() else Usage()
    store.set_usage(name, usage.bytes, usage.entries)
    if on_change and before != usage.bytes:
        on_change(name, before, usage.bytes)
    return before, usage.bytes


def reconcile_dead_owners(store: AccountStore) -> list[str]:
    """After a crash: drop dead processes' reservations and rescan the users they wrote for."""
    repaired: list[str] = []
    for owner in store.owners():
        if store.owner_alive(owner):
            continue
        for name in store.drop_owner(owner):
            folder_name = folder_of_ledger(name)
            if (store.get_user(name) if folder_name is None else store.get_folder(folder_name)) is not None:
                before, after = rescan_user(store, name)
                log.info("quota reconciled for %s after an unclean stop: %d -> %d bytes", name, before, after)
                repaired.append(name)
    return repaired
