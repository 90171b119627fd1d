"""Per-user disk quotas: exact admission, cheap on the write path, shared across processes.

Usage is the sum of apparent sizes of the regular files in a home (a sparse
file counts at its full size; directories and symlinks count as zero).  Every
operation that can change that sum asks this module first:

* growth (a write past the end, a truncate upwards) must be *charged* before
  it happens; a charge that does not fit raises `QuotaExceeded` and nothing
  is written;
* shrinking (remove, truncate down, overwrite by rename) is *credited* after
  it happened.

To avoid a store round trip per SFTP WRITE, a process reserves space in
chunks (`UserLedger.pool`) and consumes it in memory.  Chunks are at most an
eighth of the remaining room, so near the limit reservations become exact;
before refusing, a process first gives back its own unused pool, so a refusal
within one process is exact to the byte.  Consumed bytes are settled into the
store when a write handle closes.  A process that dies leaves a reservation
row; on start-up the server rescans the homes of such users (`reconcile`).

The size the ledger believes a file has is kept per inode (`FileState`) and
shared by every handle on that inode in this process, so two handles on one
file are not charged twice for the same growth.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .accounts import SQLiteAccountStore
from .units import format_size

__all__ = ["QuotaExceeded", "QuotaManager", "UserLedger", "FileState", "scan_usage"]

log = logging.getLogger("sshfiles.quota")

MAX_CHUNK = 64 * 1024 * 1024
RECHECK_SECONDS = 0.25  # how long a reserved chunk is trusted before the quota is read again


class QuotaExceeded(OSError):
    """Refused growth; the message carries the numbers a user needs."""

    def __init__(self, used: int, quota: int) -> None:
        super().__init__(errno.EDQUOT, f"quota exceeded: {format_size(used)} used of {format_size(quota)}")
        self.used = used
        self.quota = quota


@dataclass
class FileState:
    """An inode this process has open for writing.

    The file's size is always read from the kernel (fstat) when a write or
    truncate is charged, so a change made by another handle, session or
    worker process can never make a charge stale.  What is kept here is only
    what the kernel cannot tell us: whether this process removed the file
    while it was open, so its bytes are credited when the last handle closes.
    """

    key: tuple[int, int]
    refs: int = 0
    removed_here: bool = False


@dataclass
class UserLedger:
    """One user's quota bookkeeping inside this process."""

    name: str
    store: SQLiteAccountStore
    owner: str
    pool: int = 0            # reserved in the store, not yet consumed
    unsettled: int = 0       # consumed (really on disk) but not yet moved into `used`
    write_handles: int = 0
    checked: float = 0.0     # monotonic time the quota was last read
    files: dict[tuple[int, int], FileState] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- charges ------------------------------------------------------------

    def charge(self, n: int) -> None:
        """Account for `n` new bytes before they are written, or raise QuotaExceeded."""
        if n <= 0:
            return
        with self.lock:
            if self.pool and time.monotonic() - self.checked > RECHECK_SECONDS:
                self._recheck()
            if self.pool < n:
                self._refill(n - self.pool)
            self.pool -= n
            self.unsettled += n

    def _recheck(self) -> None:
        """An admin may have lowered the quota since the pool was reserved: if it no longer
        fits, give the pool back so this charge asks the store (one read per RECHECK_SECONDS)."""
        self.checked = time.monotonic()
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
            raise QuotaExceeded(c, q if q is not None else 0)

    def credit(self, n: int) -> None:
        """Bytes that left the disk (remove, shrink, overwritten by rename)."""
        if n > 0:
            self.store.adjust_used(self.name, -n)

    def settle(self, release_pool: bool) -> None:
        with self.lock:
            release = self.pool if release_pool else 0
            if self.unsettled or release:
                self.store.settle(self.owner, self.name, self.unsettled, release)
                self.unsettled = 0
                self.pool -= release

    # -- per-inode size tracking ------------------------------------------

    def track(self, st: os.stat_result) -> FileState:
        key = (st.st_dev, st.st_ino)
        fs = self.files.get(key)
        if fs is None:
            fs = self.files[key] = FileState(key)
        fs.refs += 1
        return fs

    def untrack(self, fs: FileState, size_now: int) -> None:
        """A handle closed; if it was the last on a file removed while open, its bytes leave now."""
        fs.refs -= 1
        if fs.refs <= 0:
            self.files.pop(fs.key, None)
            if fs.removed_here:
                self.credit(size_now)

    def removed(self, st: os.stat_result) -> None:
        """A directory entry is gone: credit its bytes if they really left the home."""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            return  # another link still holds the bytes
        fs = self.files.get((st.st_dev, st.st_ino))
        if fs is not None:
            fs.removed_here = True  # still open here: credited when its last handle closes
            return
        self.credit(st.st_size)

    def state(self) -> tuple[int | None, int]:
        return self.store.quota_state(self.name)


class QuotaManager:
    """All users' ledgers for this process, keyed by name."""

    def __init__(self, store: SQLiteAccountStore, owner: str) -> None:
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


def scan_usage(home: str | os.PathLike[str]) -> int:
    """Apparent size of every regular file below `home`, each inode once, never following symlinks."""
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [os.fspath(home)]
    while stack:
        path = stack.pop()
        try:
            entries = os.scandir(path)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key not in seen:
                        seen.add(key)
                        total += st.st_size
    return total


def rescan_user(store: SQLiteAccountStore, name: str,
                on_change: Callable[[str, int, int], None] | None = None) -> tuple[int, int]:
    """Set a user's settled usage to what is on disk; returns (before, after)."""
    acct = store.require_user(name)
    before = acct.used
    after = scan_usage(acct.home) if Path(acct.home).is_dir() else 0
    store.set_used(name, after)
    if on_change and before != after:
        on_change(name, before, after)
    return before, after


def reconcile_dead_owners(store: SQLiteAccountStore, accounts_dir: str | os.PathLike[str]) -> list[str]:
    """After a crash: drop dead processes' reservations and rescan the users they wrote for."""
    from .accounts import OwnerLock

    repaired: list[str] = []
    for owner in store.owners():
        if OwnerLock.is_alive(accounts_dir, owner):
            continue
        for name in store.drop_owner(owner):
            if store.get_user(name) is not None:
                before, after = rescan_user(store, name)
                log.info("quota reconciled for %s after an unclean stop: %d -> %d bytes", name, before, after)
                repaired.append(name)
    return repaired
