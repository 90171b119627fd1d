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
within one process is exact to the byte.  Consumed bytes are settled into the
store when a write handle closes.  A process that dies leaves a reservation
row; the server rescans the homes of such users (`reconcile_dead_owners`).

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
import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .stores import LEDGER_MAX, UNLIMITED_ENTRIES, AccountError, AccountStore
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

MAX_CHUNK = 64 * 1024 * 1024
RECHECK_SECONDS = 0.25  # how long a reserved chunk is trusted before the quota is read again
RETRY_SECONDS = 1.0     # how soon a credit the store refused is tried again
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
    freed = 0
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass
            else:
                freed = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return freed


@dataclass
class UserLedger:
    """One user's quota bookkeeping inside this process."""

    name: str
    store: AccountStore
    owner: str
    pool: int = 0            # reserved in the store, not yet consumed
    unsettled: int = 0       # consumed (really on disk) but not yet moved into `used`
    pending_bytes: int = 0   # credits the store has not taken yet (retried)
    pending_entries: int = 0
    write_handles: int = 0
    open_handles: int = 0    # file + directory handles of all this user's sessions here (session.py)
    sessions: int = 0        # this user's open sessions in this process (presence row while > 0)
    checked: float = 0.0     # monotonic time the quota was last read
    entry_limit: int | None = None
    entry_limit_read: float = -1e9
    retry: asyncio.TimerHandle | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    # -- charges ------------------------------------------------------------

    def charge(self, n: int) -> None:
        """Account for `n` new bytes before they are written, or raise QuotaExceeded."""
        if n <= 0:
            return
        with self.lock:
            if self.pending_bytes or self.pending_entries:
                self.flush()  # what was freed counts before anything is refused
            try:
                if self.pool and time.monotonic() - self.checked > RECHECK_SECONDS:
                    self._recheck()
                if self.pool < n:
                    self._refill(n - self.pool)
            except AccountError as exc:  # the store is busy or down: refuse this growth, say so plainly
                raise _store_unavailable(exc) from None
            self.pool -= n
            self.unsettled += n

    def _recheck(self) -> None:
        """An admin may have lowered the quota since the pool was reserved: if it no longer
        fits, give the pool back so this charge asks the store (one read per RECHECK_SECONDS)."""
        self.checked = time.monotonic()
        if self.store.reservation(self.owner, self.name) < self.pool + self.unsettled:
            # Our reservation row is gone: the account was removed (and maybe re-created under the
            # same name). Nothing backs the pool any more; the new account starts from its own.
            self.pool = 0
            return
        quota, charged = self.store.quota_state(self.name)
        if quota is not None and charged > quota:
            self.store.settle(self.owner, self.name, 0, self.pool)
            self.pool = 0

    def _refill(self, need: int) -> None:
        """Reserve at least `need` more bytes in the store.

        The store's check counts our own pool as reserved; since the pool is
        about to be consumed by this very charge, ``used + reservations + need``
        is exactly the usage after the write: no false refusal within a process.
        """
        self.checked = time.monotonic()
        quota, charged = self.store.quota_state(self.name)
        if quota is None:
            extra = MAX_CHUNK
        else:
            extra = min(MAX_CHUNK, max(0, (quota - charged - need) // 8))
        if extra and self.store.reserve(self.owner, self.name, need + extra):
            self.pool += need + extra
        elif self.store.reserve(self.owner, self.name, need):
            self.pool += need
        else:
            q, c = self.store.quota_state(self.name)
            if q is None:  # only the ledger's integer range can refuse a user without a quota
                raise OSError(errno.EFBIG, "File too large")
            raise QuotaExceeded(c, q)

    def uncharge(self, n: int) -> None:
        """Give back a charge whose growth did not happen (the write or truncate failed).

        The bytes return to this process's pool, not to the settled usage, so
        the ledger never dips below what is on disk, even for a moment.
        """
        if n > 0:
            with self.lock:
                n = min(n, self.unsettled)
                self.unsettled -= n
                self.pool += n

    def credit(self, n: int) -> None:
        """Bytes that left the disk (remove, shrink, overwritten by rename)."""
        if n > 0:
            with self.lock:
                self.pending_bytes += n
                self.flush()

    # -- entries ------------------------------------------------------------

    def charge_entry(self) -> None:
        """Account for one new file or directory before creating it, or raise EntriesExceeded."""
        with self.lock:
            if self.pending_bytes or self.pending_entries:
                self.flush()
            now = time.monotonic()
            try:
                if now - self.entry_limit_read > RECHECK_SECONDS:
                    quota, max_entries, _ = self.store.entries_state(self.name)
                    self.entry_limit = entries_limit(quota, max_entries)
                    self.entry_limit_read = now
                if not self.store.charge_entries(self.name, 1, self.entry_limit):
                    _, _, entries = self.store.entries_state(self.name)
                    raise EntriesExceeded(entries,
                                          self.entry_limit if self.entry_limit is not None else LEDGER_MAX)
            except AccountError as exc:
                raise _store_unavailable(exc) from None

    def credit_entries(self, n: int) -> None:
        """Entries that are gone (remove, rmdir, replaced by rename), or a charge given back."""
        if n > 0:
            with self.lock:
                self.pending_entries += n
                self.flush()

    # -- store synchronisation ------------------------------------------------

    def flush(self) -> bool:
        """Hand pending credits to the store; on failure keep them and retry soon."""
        with self.lock:
            try:
                if self.pending_bytes:
                    self.store.adjust_used(self.name, -self.pending_bytes)
                    self.pending_bytes = 0
                if self.pending_entries:
                    self.store.adjust_entries(self.name, -self.pending_entries)
                    self.pending_entries = 0
            except AccountError as exc:
                self._retry_later(f"credit of {self.pending_bytes} bytes, {self.pending_entries} entries", exc)
                return False
            return True

    def settle(self, release_pool: bool) -> None:
        """Move consumed bytes into the store's usage; on failure keep them and retry soon."""
        with self.lock:
            release = self.pool if release_pool else 0
            if self.unsettled or release:
                try:
                    self.store.settle(self.owner, self.name, self.unsettled, release, keep_row=self.sessions > 0)
                except AccountError as exc:  # still counted as reserved in the store: nothing over-admitted
                    self._retry_later(f"settlement of {self.unsettled} bytes", exc)
                    return
                self.unsettled = 0
                self.pool -= release
            self.flush()

    def _retry_later(self, what: str, exc: Exception) -> None:
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
        return not (self.unsettled or self.pending_bytes or self.pending_entries)

    # -- presence -----------------------------------------------------------

    def session_opened(self) -> None:
        """A session of this user starts in this process: mark the process present for the user,
        so a crash (which drops its handles without a last-close credit) leads to a rescan."""
        with self.lock:
            self.sessions += 1
            self.checked = 0.0  # a new session re-checks the pool against the store at its first charge
            if self.sessions == 1:
                try:
                    self.store.mark_present(self.owner, self.name)
                except AccountError as exc:
                    log.warning("quota ledger of %s: presence not recorded (%s)", self.name, exc)

    def session_closed(self) -> None:
        with self.lock:
            self.sessions -= 1
            if self.sessions == 0 and self.pool == 0 and self.in_sync:
                try:
                    self.store.unmark_present(self.owner, self.name)
                except AccountError:
                    pass  # a stale presence row only costs a rescan after a crash

    def state(self) -> tuple[int | None, int]:
        return self.store.quota_state(self.name)


class QuotaManager:
    """All users' ledgers for this process, keyed by name."""

    def __init__(self, store: AccountStore, owner: str) -> None:
        self.store = store
        self.owner = owner
        self._ledgers: dict[str, UserLedger] = {}

    def ledger(self, name: str) -> UserLedger:
        led = self._ledgers.get(name)
        if led is None:
            led = self._ledgers[name] = UserLedger(name, self.store, self.owner)
        return led

    def settle_all(self) -> None:
        for led in self._ledgers.values():
            led.settle(release_pool=True)

    def in_sync(self) -> bool:
        """No ledger of this process holds anything the store has not taken."""
        return all(led.in_sync for led in self._ledgers.values())


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
    """Set a user's settled usage (bytes and entries) to what is on disk; returns bytes (before, after)."""
    acct = store.require_user(name)
    before = acct.used
    usage = scan_usage(acct.home) if Path(acct.home).is_dir() else Usage()
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
            if store.get_user(name) is not None:
                before, after = rescan_user(store, name)
                log.info("quota reconciled for %s after an unclean stop: %d -> %d bytes", name, before, after)
                repaired.append(name)
    return repaired
