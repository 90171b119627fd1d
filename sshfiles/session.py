"""One user's operations on their home: the policy layer every protocol adapter calls.

SFTP (sftp.py), SCP (through the same SFTP server object) and the exec
commands (exec_commands.py) never touch the jail or the quota ledger
themselves: they translate their protocol into calls on a `UserSession` and
its results back into replies.  So every rule — confinement, the byte and
entry quotas, and the permissions and hooks to come — is enforced here, once,
for every protocol.  The module has no SSH types: errors are `OSError`s
(errno says what happened, ``strerror`` is the one line a user sees, never a
host path), which is what asyncssh's SFTP server maps to status codes, and
what makes the layer testable in-process.

Size bookkeeping follows quota.py: growth is charged before it happens, a
shrink credited after, each size change under `size_lock`; every handle holds
its inode (`hold`) so a removed file's bytes are credited by the last handle
that closes it, in whatever session or worker process that is.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import posixpath
import resource
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import atomic, audit, metrics
from .atomic import ServerPath, Upload
from .background import run_bulk
from .fileio import pwrite_all
from .folders import FolderMount, ancestor_names, holds_mount, mount_rules, route
from .hooks import HookEvent, HookRunner
from .jail import DirEntries, Jail, normalize
from .logsafe import esc
from .permissions import PermissionRules, allowed, governs
from .quota import (
    MAX_FILE_SIZE,
    EntriesExceeded,
    QuotaExceeded,
    UserLedger,
    check_size,
    entries_limit,
    hold,
    release,
    release_later,
    size_lock,
)
from .stores import AccountStore

__all__ = ["COPY_CHUNK", "DIR_BATCH", "HANDLE_LIMITS", "MAX_HANDLES_PER_SESSION", "MAX_HANDLES_PER_USER", "MAX_READ",
           "DirHandle", "FileHandle", "HandleLimits", "SpaceInfo", "UserSession", "set_handle_limits"]

log = logging.getLogger("sshfiles.session")

# OpenSSH's sftp-server limits: big enough to keep a pipelined client busy,
# small enough that one request never holds megabytes in memory.
MAX_READ = 256 * 1024


def _fd_limit() -> int:
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1024
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


#: Open handles (files and directories, SFTP and SCP) one user may hold across all their sessions in
#: one server process, and one session (channel) may hold. Every handle is an fd (a directory
#: handle two: its fd and the stream ``os.scandir`` reads), so the per-user bound is also kept to an
#: eighth of the process's fd limit (RLIMIT_NOFILE): one user can take at most a quarter of the
#: process's fds, and logins, other users and the store keep the rest. With the usual 1024..20000
#: limits that is 128..2048 per user and per session 128..512. Clients need a few: OpenSSH's sftp
#: and scp one or two, rclone and lftp one per parallel transfer plus a listing. Refusals are
#: ``EMFILE``: SFTP FAILURE "Too many open files (N per session)". limits@openssh.com advertises the
#: per-session bound. These are the automatic defaults; ``--max-handles-per-session`` and
#: ``--max-handles-per-user`` set others (`set_handle_limits`, once at server start).
MAX_HANDLES_PER_USER = min(2048, max(16, _fd_limit() // 8))
MAX_HANDLES_PER_SESSION = min(512, MAX_HANDLES_PER_USER)


def _locked_truncate(fd: int, size: int, allowance: int, done: list[tuple[int, int]]) -> int | None:
    """On a bulk thread (`UserSession._truncate_fd`): set `fd`'s size under its size lock if the
    growth fits the `allowance` already charged. Returns the growth still needed when it does not
    fit (nothing changed); else appends (the old size, the growth) to `done` and returns None.

    An empty file truncated to empty (every upload's open with SSH_FXF_TRUNC of a new name) only
    has its times set, as the truncation would: on ext4 an ftruncate to size 0 marks the file for
    a flush at its last close ("auto_da_alloc", meant for replace-by-truncate), so the CLOSE of a
    1 GiB upload started the writeback of the whole GiB (350-420 ms on the event loop, measured)
    and sent it to the disk at once. The kernel itself never truncates a file that an O_TRUNC
    open has just created."""
    with size_lock(fd):
        old = os.fstat(fd).st_size
        growth = max(0, size - old)
        if growth > allowance:
            return growth - allowance
        if size == old == 0:
            os.utime(fd)
        else:
            os.ftruncate(fd, size)
        done.append((old, growth))
        return None


def _locked_pwrite(fd: int, offset: int, append: bool, data: bytes,
                   allowance: int, landed: list[int]) -> int | tuple[int, OSError | None]:
    """On a bulk thread (`UserSession.write_bulk`): write `data` under `fd`'s size lock if its
    growth fits the `allowance` already charged. Returns the growth still needed when it does
    not fit (nothing written), else (the bytes of growth that landed, the error if any); the
    growth that landed is also appended to `landed`, for a caller cancelled meanwhile."""
    with size_lock(fd):
        size = os.fstat(fd).st_size
        start = size if append else offset
        growth = max(0, start + len(data) - size)
        if growth > allowance:
            return growth - allowance
        try:
            check_size(start + len(data))
            pwrite_all(fd, data, start)
        except OSError as exc:  # disk full, I/O error, too large: the growth that really landed
            grown = max(0, min(growth, os.fstat(fd).st_size - size))
            landed.append(grown)
            return grown, exc
        landed.append(growth)
        return growth, None


@dataclass
class HandleLimits:
    """The handle bounds in force in this process (one object, so every reader sees a change)."""

    per_session: int = MAX_HANDLES_PER_SESSION
    per_user: int = MAX_HANDLES_PER_USER


HANDLE_LIMITS = HandleLimits()


def set_handle_limits(per_session: int, per_user: int) -> None:
    """Apply the serve settings (0: the automatic default); a session never gets more than its user."""
    HANDLE_LIMITS.per_user = per_user or MAX_HANDLES_PER_USER
    HANDLE_LIMITS.per_session = min(per_session or MAX_HANDLES_PER_SESSION, HANDLE_LIMITS.per_user)

#: copy-data is done in chunks of this size: each chunk is read and written on a bulk thread (the
#: growth charged on the loop first, see `UserSession.write_bulk`); other sessions' requests run meanwhile.
COPY_CHUNK = 1024 * 1024
#: ... and every this many bytes, its output is written back to the disk off the loop (copy_data).
COPY_FLUSH = 32 * COPY_CHUNK

#: Entries of a directory read per READDIR reply (asyncssh sends at most 128 names per reply).
DIR_BATCH = 128

#: How many of its own new files one connection remembers for `stat` and hashes where it may not list.
OWN_UPLOADS = 1024


@dataclass(eq=False)  # identity: a session keeps its open handles in a set
class FileHandle:
    """A file one session has open (an SFTP handle, an SCP transfer)."""

    fd: int
    vpath: str
    writable: bool
    append: bool
    opened: float = field(default_factory=time.monotonic)
    bytes_read: int = 0
    bytes_written: int = 0
    failed: str | None = None
    # Permissions (see UserSession._may): `fresh` = this handle created the file (O_EXCL), so writing
    # it never needs `overwrite`; `rev` is the rules' revision `may_read`/`may_write` were decided at.
    fresh: bool = False
    rev: int = -1
    may_read: bool = True
    may_write: bool = True
    upload: Upload | None = None  # written under a temporary name, renamed onto vpath at close (atomic.py)
    interrupted: bool = False     # the adapter saw its channel go before the close (SCP)
    quota: bool = False  # `failed` is a quota refusal: the transfer's result is "quota"
    # The folder's session (a mount's child, see UserSession.mounts) that opened it; None: the home's.
    owner: UserSession | None = None


class _MountEntries:
    """A listing of a directory that holds mounts (or leads to one): the mounts' names first, then
    the home's own entries of that directory, if it exists on disk, without those names."""

    def __init__(self, extra: list[tuple[bytes, os.stat_result]], entries: DirEntries | None) -> None:
        self._extra = extra
        self._names = {name for name, _ in extra}
        self._entries = entries

    def __iter__(self) -> _MountEntries:
        return self

    def __next__(self) -> tuple[bytes, os.stat_result]:
        if self._extra:
            return self._extra.pop(0)
        if self._entries is None:
            raise StopIteration
        for item in self._entries:
            if item[0] not in self._names:
                return item
        raise StopIteration

    def close(self) -> None:
        if self._entries is not None:
            self._entries.close()


class DirHandle:
    """A directory one session has open (an SFTP directory handle): entries are read on demand.

    It holds one of the session's handles until `close` (which is idempotent)."""

    def __init__(self, entries: DirEntries | _MountEntries, on_close: Callable[[], None]) -> None:
        self._entries = entries
        self._on_close: Callable[[], None] | None = on_close

    def read(self, count: int = DIR_BATCH) -> list[tuple[bytes, os.stat_result]]:
        """Up to `count` more entries with their lstat; an empty list at the end."""
        out: list[tuple[bytes, os.stat_result]] = []
        for item in self._entries:
            out.append(item)
            if len(out) >= count:
                break
        if not out:
            self.close()  # read to the end: the handle's place is given back even if never CLOSEd
        return out

    def close(self) -> None:
        self._entries.close()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()


@dataclass
class SpaceInfo:
    """What `df` should show: the quota as the filesystem when there is one."""

    quota: int | None       # bytes; None = the real filesystem's size
    used: int
    entry_limit: int | None
    entries: int
    fs: os.statvfs_result


def outcome(exc: BaseException | None) -> tuple[str, str | None]:
    """An operation's audit ``result`` and ``error``: ok, denied (permissions), quota, or failed: REASON."""
    if exc is None:
        return "ok", None
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EDQUOT:
            return "quota", reason
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "denied", reason
        return f"failed: {reason}", None
    return f"failed: {type(exc).__name__}", None


class UserSession:
    """One authenticated user's view of their home, with every rule applied.

    One instance per channel (an SFTP subsystem, an SCP or exec command); it
    holds the jail's root fd and shares the user's ledger with the user's
    other sessions in this process.
    """

    def __init__(self, username: str, home: str, ledger: UserLedger, peer: str = "?",
                 on_close: Callable[[UserSession], None] | None = None, conn_id: str = "-",
                 permissions: PermissionRules | None = None, own_uploads: dict[str, tuple[int, int]] | None = None,
                 upload_mode: str = "standard", hooks: HookRunner | None = None,
                 mounts: Sequence[FolderMount] = (), ledger_of: Callable[[str], UserLedger] | None = None,
                 parent: UserSession | None = None, vroot: str = "") -> None:
        self.username = username
        # A mount's child session (see `mounts`): handles count against the parent's bounds, and
        # `vroot` (the mount point) prefixes the paths it shows in the log, hooks and realpath.
        self._parent = parent
        self.vroot = vroot
        self.upload_mode = upload_mode  # atomic.MODES: how this session's uploads become visible
        self.hooks = hooks
        self.peer = peer
        # The user's per-directory rules as this process last read them; the server's watcher
        # replaces them when the store's revision moves (`set_permissions`), never a store read here.
        self.perms = permissions if permissions is not None else PermissionRules()
        # Files created by this session, or by the other channels of its connection when the server
        # shares the dict (newest last, at most OWN_UPLOADS): `stat` and the hashes answer for them even
        # where the user may not list or download, since clients check an upload's size and hash after
        # it (rclone does both, the hash over an exec channel). They tell only what the client wrote.
        # Each is remembered with its (st_dev, st_ino): a name the file left (removed, moved by a hook)
        # may later hold another user's file, which must not answer.
        self._own: dict[str, tuple[int, int]] = own_uploads if own_uploads is not None else {}
        self.conn_id = conn_id  # the connection's id in the log
        self.jail = Jail(home)
        # The user's namespace lock, shared with the user's sessions in every worker process: an
        # flock on the home directory, held while a name and the inode behind it must stay
        # together (open + hold, remove + release, rename over): two processes can then never
        # both credit, or both miss, the same removed file.
        try:
            self._ns_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            self.jail.close()
            raise
        self.ledger = ledger
        ledger.session_opened()
        self._interrupted = False
        self._on_close = on_close
        self._closed = False
        self.handles = 0  # open FileHandles and DirHandles of this session (HANDLE_LIMITS.per_session)
        self.open_files: set[FileHandle] = set()  # what `sshfiles status` shows the session doing
        # Shared folders mounted into this user's tree (folders.py): one child session per mount,
        # with the folder's own jail, namespace lock and ledger, and the mount's permissions. Every
        # public operation routes a path under a mount to its child; a user without mounts pays one
        # attribute test. Mounts are read when the channel opens: a change applies at the next one.
        self.mounts: dict[str, UserSession] = {}
        self._mount_perms: dict[str, frozenset[str]] = {}
        self._hash_fds: dict[int, UserSession] = {}  # open_for_hash fds that a child opened
        for m in mounts:
            assert ledger_of is not None
            try:
                self.mounts[m.vpath] = UserSession(
                    username, m.path, ledger_of(m.ledger), peer, conn_id=conn_id,
                    permissions=mount_rules(self.perms, m.vpath, m.perms), own_uploads=self._own,
                    upload_mode=upload_mode, hooks=hooks, parent=self, vroot=m.vpath)
            except OSError as exc:  # a folder directory gone: that mount is absent, the rest works
                log.warning("folder %s of %s not mounted at %s: %s", esc(m.folder), esc(username), esc(m.vpath),
                            esc(exc.strerror))
                continue
            self._mount_perms[m.vpath] = m.perms

    @property
    def interrupted(self) -> bool:
        """Set when the session ends with transfers still open (client vanished, or the server cut
        it): their handles are closed for them and logged as interrupted. A mount's child session
        follows its parent's."""
        return self._interrupted or (self._parent is not None and self._parent.interrupted)

    @interrupted.setter
    def interrupted(self, value: bool) -> None:
        self._interrupted = value

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for child in self.mounts.values():
                child.close()
            # Handles the adapter did not close (it should have): give their places back anyway.
            self.ledger.open_handles -= self.handles
            self.handles = 0
            self.jail.close()
            os.close(self._ns_fd)
            self.ledger.session_closed()
            if self._on_close is not None:
                self._on_close(self)

    # -- audit ----------------------------------------------------------------

    @contextlib.contextmanager
    def _audited(self, name: str, path: bytes | str, **fields: Any) -> Iterator[None]:
        """Log the operation in the body as one audit event: its virtual path, fields and outcome."""
        try:
            yield
        except BaseException as exc:
            result, error = outcome(exc)
            audit.event(name, self, path=self._shown(normalize(path)), **fields, result=result, error=error)
            raise
        audit.event(name, self, path=self._shown(normalize(path)), **fields, result="ok")

    @contextlib.contextmanager
    def _audit_refusals(self, name: str, path: bytes | str, **fields: Any) -> Iterator[None]:
        """Log the operation only if permissions or a quota refused it (reads are not audited)."""
        try:
            yield
        except OSError as exc:
            result, error = outcome(exc)
            if result in ("denied", "quota"):
                audit.event(name, self, path=self._shown(normalize(path)), **fields, result=result, error=error)
            raise

    def _shown(self, vpath: str) -> str:
        """A path of this session's tree as the user sees it (a mount's child: under its mount point)."""
        if not self.vroot:
            return vpath
        return self.vroot if vpath == "/" else self.vroot + vpath

    @contextlib.contextmanager
    def _namespace(self) -> Iterator[None]:
        """Hold the user's namespace lock (never across a store call or an await)."""
        fcntl.flock(self._ns_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._ns_fd, fcntl.LOCK_UN)

    # -- shared folders (folders.py): which tree a path or handle belongs to -------------------

    def _route(self, path: bytes | str) -> tuple[UserSession, bytes | str]:
        """(the session whose tree holds `path`, the path in it): a mount's child for a path under a
        mount point (the path inside the folder), else this session and the path unchanged."""
        if self.mounts:
            hit = route(self.mounts, normalize(path))
            if hit is not None:
                return hit
        return self, path

    def _of(self, f: FileHandle) -> UserSession:
        """The session whose tree a handle was opened in (its jail, ledger and rules)."""
        return f.owner if f.owner is not None and f.owner is not self else self

    def shown_path(self, f: FileHandle) -> str:
        """A handle's path as the user sees it (`sshfiles status`): under its mount point for a folder's."""
        return self._of(f)._shown(f.vpath)

    def _holds_mount(self, path: bytes | str) -> bool:
        return bool(self.mounts) and holds_mount(self.mounts, normalize(path))

    def _refuse_mount_change(self, event: str, path: bytes | str, **fields: Any) -> None:
        """A mount point (or a directory above one) is part of the admin's layout: never removed or renamed."""
        err = PermissionError(errno.EACCES, "Permission denied: a shared folder's mount point cannot be removed, "
                              "renamed or changed")
        audit.event(event, self, path=normalize(path), **fields, result="denied", error=err.strerror)
        raise err

    def _mount_entries(self, npath: str) -> list[tuple[bytes, os.stat_result]]:
        """The entries a listing of `npath` shows for mounts: a mount point as its folder's root, a
        directory on the way to one as it is in the home (or as the home's root if it is not on disk)."""
        out = []
        for name, vpath in ancestor_names(self.mounts, npath).items():
            try:
                if vpath is not None:
                    st = self.mounts[vpath].jail.stat("/")
                else:
                    st = self._virtual_dir_stat(posixpath.join(npath, name))
            except OSError:
                continue
            out.append((os.fsencode(name), st))
        return out

    def _virtual_dir_stat(self, npath: str) -> os.stat_result:
        """A directory on the way to a mount: the home's own if it is one, else the home root's attributes."""
        try:
            st = self.jail.stat(npath, follow=True)
            if stat.S_ISDIR(st.st_mode):
                return st
        except OSError:
            pass
        return self.jail.stat("/")

    # -- permissions ----------------------------------------------------------
    #
    # A rule on a directory governs the entries inside it (permissions.py), so an operation on an
    # entry is checked against the directory that holds it, and a listing against the directory
    # itself.  Decisions use the kernel's resolution of the path (`_where`), never the client's
    # spelling, and are made before anything is touched, so a refusal changes nothing.  A user
    # without rules pays one attribute test per operation.

    def set_permissions(self, rules: PermissionRules) -> None:
        """New rules (the server's watcher saw the store's revision move): they apply from the next operation."""
        self.perms = rules
        for vpath, child in self.mounts.items():
            child.set_permissions(mount_rules(rules, vpath, self._mount_perms[vpath]))

    def _where(self, path: bytes | str, follow: bool = False) -> tuple[str, str]:
        """(directory whose rule applies, virtual path of the entry), as the kernel resolves `path`.

        An existing entry is named by the fd the jail opens for it (following a final symlink when
        the operation will); a new name by its resolved parent directory. A path that resolves to
        nothing at all is named lexically: the operation itself then fails.
        """
        try:
            fd = self.jail.open(path, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                vpath = self.jail.virtual_path(fd)
            finally:
                os.close(fd)
        else:
            vpath = self._stuck_at(path)
        return posixpath.dirname(vpath), vpath

    def _stuck_at(self, path: bytes | str) -> str:
        """The virtual path of the entry where the kernel's walk of `path` stops (a path that does
        not resolve): the first component that is missing, or the non-directory a later component
        (``..`` included) was looked up in.

        Why not the lexical spelling: ``/drop/NAME/..`` spells ``/drop``, whose parent may allow
        `list`, while the walk failed on NAME, inside the drop box; its error (ENOTDIR for a file,
        ENOENT for nothing) would tell a user who may not list /drop whether NAME exists. The
        longest prefix that resolves is found by bisection (walks resolve left to right, so a
        prefix that fails makes every longer one fail): a few openat2 calls, on failures only.
        """
        raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else bytes(path)
        parts = [p for p in raw.split(b"/") if p and p != b"."]
        good, bad = 0, len(parts)  # the prefix of `good` parts resolves ("" is the root); of `bad`, not
        while bad - good > 1:
            mid = (good + bad) // 2
            try:
                os.close(self.jail.open(b"/".join(parts[:mid]), os.O_PATH))
            except OSError:
                bad = mid
            else:
                good = mid
        if bad == 0:
            return "/"
        try:
            fd = self.jail.open(b"/".join(parts[:good]), os.O_PATH)
        except OSError:
            return normalize(path)  # changed meanwhile: name it as spelled
        try:
            base = self.jail.virtual_path(fd)
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        name = parts[bad - 1]
        if not is_dir or name == b"..":
            return base  # a name looked up in a non-directory: the walk stopped at that entry
        return posixpath.join(base, name.decode("utf-8", "surrogateescape"))

    def _require(self, directory: str, *perms: str) -> None:
        """Refuse with EACCES (SFTP PERMISSION_DENIED) and a one-line reason unless all `perms` hold there."""
        for perm in perms:
            if not allowed(self.perms.rules, directory, perm):
                raise PermissionError(errno.EACCES,
                                      f"Permission denied: no {perm} permission in {esc(self._shown(directory))}")

    def _check(self, path: bytes | str, *perms: str, follow: bool = False) -> None:
        """`_require` on the directory holding `path` (nothing to do for a user without rules)."""
        if self.perms.restricted:
            self._require(self._where(path, follow)[0], *perms)

    def _may(self, f: FileHandle, write: bool) -> None:
        """An open handle obeys the rules too: re-decided once per change of the rules, so a change
        applies to the next READ or WRITE of a transfer already running."""
        if f.rev != self.perms.rev:
            f.rev = self.perms.rev
            d = posixpath.dirname(f.vpath)
            rules = self.perms.rules
            f.may_read = not self.perms.restricted or allowed(rules, d, "download")
            f.may_write = not self.perms.restricted or (
                allowed(rules, d, "upload") and (f.fresh or allowed(rules, d, "overwrite")))
        if not (f.may_write if write else f.may_read):
            perm = ("upload" if f.fresh else "upload or overwrite") if write else "download"
            where = esc(self._shown(posixpath.dirname(f.vpath)))
            raise PermissionError(errno.EACCES, f"Permission denied: no {perm} permission in {where}")

    def _open_rules(self, path: bytes | str, flags: int, trunc: bool) -> tuple[int, bool, bool]:
        """Check an open against the rules; returns (flags, trunc, fresh) as the open must be done.

        Reading needs `download`; writing `upload`, and an existing file also `overwrite` (resume
        and append included). Without `overwrite` a create is made exclusive (O_EXCL), so a name
        that exists, or appears meanwhile, is refused rather than overwritten; a read-only open
        with O_CREAT and no `upload` just opens what exists.
        """
        if not self.perms.restricted:
            return flags, trunc, bool(flags & os.O_CREAT and flags & os.O_EXCL)
        d = self._where(path, follow=True)[0]
        access = flags & os.O_ACCMODE
        if access != os.O_WRONLY:
            self._require(d, "download")
        if access == os.O_RDONLY:
            if flags & os.O_CREAT and not allowed(self.perms.rules, d, "upload"):
                flags &= ~(os.O_CREAT | os.O_EXCL)
        else:
            self._require(d, "upload")
            if not allowed(self.perms.rules, d, "overwrite"):
                if not flags & os.O_CREAT:
                    self._require(d, "overwrite")
                flags |= os.O_EXCL
                trunc = False  # a new file is empty: nothing to truncate
        return flags, trunc, bool(flags & os.O_CREAT and flags & os.O_EXCL)

    def _check_opened(self, vpath: str, path: bytes | str, flags: int) -> None:
        """After the open: if an admin's symlink led elsewhere, the rules of where it led apply too."""
        if self.perms.restricted and posixpath.dirname(vpath) != self._where(path, follow=False)[0]:
            d = posixpath.dirname(vpath)
            access = flags & os.O_ACCMODE
            self._require(d, *(["download"] if access != os.O_WRONLY else []),
                          *(["upload"] if access != os.O_RDONLY else []))

    # -- handles --------------------------------------------------------------

    def _take_handle(self) -> None:
        """Count one more open handle, or refuse with EMFILE past the session's or the user's bound."""
        if self._parent is not None:  # a mount's handles are the channel's and the user's, not the folder's
            self._parent._take_handle()
            return
        limits = HANDLE_LIMITS
        if self.handles >= limits.per_session:
            raise OSError(errno.EMFILE, f"Too many open files ({limits.per_session} per session)")
        if self.ledger.open_handles >= limits.per_user:
            raise OSError(errno.EMFILE, f"Too many open files ({limits.per_user} per user)")
        self.handles += 1
        self.ledger.open_handles += 1

    def _give_handle(self) -> None:
        if self._parent is not None:
            self._parent._give_handle()
            return
        if self.handles > 0:
            self.handles -= 1
            self.ledger.open_handles -= 1

    async def open(self, path: bytes | str, flags: int, trunc: bool = False, append: bool = False,
                   perms: int = 0o666) -> FileHandle:
        """Open a regular file; `flags` are os.O_* (access mode, O_CREAT, O_EXCL)."""
        if self.mounts:
            tree, inner = self._route(path)
            if tree is not self:
                f = await tree.open(inner, flags, trunc, append, perms)
                self.open_files.add(f)
                return f
            if self._holds_mount(path):
                raise IsADirectoryError(errno.EISDIR, "Is a directory")
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if (trunc or append) and not writable:
            raise OSError(errno.EINVAL, "truncate or append needs write access")
        asked_excl = bool(flags & os.O_EXCL)
        with self._audit_refusals("open", path, mode="write" if writable else "read"):
            flags, trunc, fresh = self._open_rules(path, flags, trunc)
        self._take_handle()
        upload: Upload | None = None
        shown: str | None = None
        try:
            with self._audit_refusals("open", path, mode="write" if writable else "read"):
                if self.upload_mode == "standard":
                    fd = await self._open_fd(path, flags, perms)
                else:
                    fd, upload, shown = await self._open_atomic(path, flags, trunc, perms)
        except FileExistsError:
            self._give_handle()
            if asked_excl or not flags & os.O_EXCL:  # the client's own O_EXCL, or not ours at all
                raise
            raise PermissionError(errno.EACCES, "Permission denied: the file exists and there is no overwrite "
                                  "permission here") from None
        except BaseException:
            self._give_handle()
            raise
        counted = False
        try:
            vpath = self.jail.virtual_path(fd)
            self._check_opened(vpath, path, flags)
            if shown is not None:  # opened a temporary or partial: it stands for the name the client gave
                vpath = posixpath.join(posixpath.dirname(vpath), shown)
            if writable:
                self.ledger.write_handles += 1
                counted = True
                if trunc:
                    await self._truncate_fd(fd, 0)
        except BaseException:
            if counted:
                self.ledger.write_handles -= 1
            if upload is not None:
                self._drop_upload(upload)
            self._close_fd(fd)
            self._give_handle()
            raise
        if fresh and upload is None:  # (an atomic upload is its own once its rename made it the name's file)
            st = os.fstat(fd)
            self._remember_own(vpath, (st.st_dev, st.st_ino))
        metrics.transfer_started()
        f = FileHandle(fd, vpath, writable, append, fresh=fresh, upload=upload,
                       owner=self if self._parent is not None else None)
        self.open_files.add(f)
        return f

    def close_file(self, f: FileHandle) -> concurrent.futures.Future[None] | None:
        """Close a handle: settle what it wrote, credit a removed file's bytes if it was the last.

        An atomic upload is renamed onto its name first (or its temporary dropped, see
        `_finish_upload`); a completed transfer then fires its hook.  A rename that fails is the
        CLOSE's error, after the handle is closed all the same. The close of a big file runs on
        a bulk thread (`quota.release_later`): returned, for a protocol that answers only once
        the file is closed; None when it is."""
        if (tree := self._of(f)) is not self:
            self.open_files.discard(f)
            return tree.close_file(f)
        if f.fd < 0:
            return None
        fd, f.fd = f.fd, -1
        error: OSError | None = None
        pending: concurrent.futures.Future[None] | None = None
        try:
            if f.writable:
                self.ledger.write_handles -= 1
                if f.upload is not None:
                    error = self._finish_upload(f, fd)
                self.ledger.settle(release_pool=self.ledger.write_handles == 0)
        finally:
            self.open_files.discard(f)
            metrics.transfer_ended()
            self._give_handle()
            freed, pending = release_later(fd)
            self.ledger.credit(freed)
            self.log_transfer(f)
        self._transfer_hook(f)
        if error is not None:
            raise error
        return pending

    def _remember_own(self, vpath: str, key: tuple[int, int]) -> None:
        """Remember a file this connection created (see `_own`), once it is the file under that name.

        Not before: an atomic upload's name shows someone else's file until its rename, and if the
        rename fails (a file appeared meanwhile) the name keeps that file, which must stay unreadable."""
        if self.perms.restricted:
            self._keep_own(self._shown(vpath), key)  # user-visible paths: a folder's children share the dict

    def _keep_own(self, shown: str, key: tuple[int, int]) -> None:
        self._own.pop(shown, None)  # (newest last: the oldest is forgotten first)
        self._own[shown] = key
        if len(self._own) > OWN_UPLOADS:
            del self._own[next(iter(self._own))]

    def _own_name(self, path: bytes | str) -> str | None:
        """The `_own` key of `path` as it resolves now (None for a user without rules: nothing is kept)."""
        return self._shown(self._where(path)[1]) if self.perms.restricted else None

    def _own_moved(self, old: str | None, new: str | None) -> None:
        """After a rename: an own file stays own under its new name, and whatever the new name held is
        gone (its old name may later hold another user's file: it must not answer for it)."""
        if old is not None and new is not None and old != new:
            was = self._own.pop(old, None)
            self._own.pop(new, None)
            if was is not None:
                self._keep_own(new, was)

    def _is_own(self, shown: str, st: os.stat_result) -> bool:
        """Whether `st` is the very file this connection created under the name `shown`."""
        return self._own.get(shown) == (st.st_dev, st.st_ino)

    # -- atomic uploads (atomic.py) -----------------------------------------------

    async def _open_atomic(self, path: bytes | str, flags: int, trunc: bool,
                     perms: int) -> tuple[int, Upload | None, str | None]:
        """Open for an atomic mode: (fd, the upload if written under a temporary, the name shown).

        A new file (O_CREAT) or a replaced one (TRUNC) is written under a temporary next to it; an
        existing file opened without TRUNC (an append too) is written in place, as in standard
        mode. In atomic-resume, while no file has the name, the name stands for its partial: a
        read opens it, a write without TRUNC (an append too: OpenSSH's reput) continues it.
        """
        resumable = self.upload_mode == "atomic-resume"
        partial = self._partial_of(path)
        parts = atomic.split_name(path)
        shown = None if parts is None else os.fsdecode(parts[1])
        if (flags & os.O_ACCMODE) == os.O_RDONLY:
            try:
                return await self._open_fd(path, flags, perms), None, None
            except FileNotFoundError:
                if partial is None:
                    raise
                return await self._open_fd(partial, flags & ~os.O_CREAT, perms), None, shown
        temp = partial if resumable else atomic.temp_path(path)
        if temp is None:
            return await self._open_fd(path, flags, perms), None, None
        try:
            st = self.jail.lstat_entry(path)
        except OSError:
            st = None  # (a missing directory and the like: the standard route says so)
            temp = None
        if temp is None or (st is not None and not stat.S_ISREG(st.st_mode)) or (st is not None and not trunc):
            return await self._open_fd(path, flags, perms), None, None  # in place (or its error)
        if st is not None and flags & os.O_EXCL:
            raise FileExistsError(errno.EEXIST, "File exists")
        if st is not None and not st.st_mode & stat.S_IWUSR:
            raise PermissionError(errno.EACCES, "Permission denied (the file is read-only)")
        if st is None and not flags & os.O_CREAT and not resumable:
            raise FileNotFoundError(errno.ENOENT, "No such file")
        tflags = flags & ~os.O_EXCL
        if st is not None:
            tflags |= os.O_CREAT  # a replacement is a new file under the temporary name
        fd = await self._open_fd(temp, tflags, perms)
        st_temp = os.fstat(fd)
        key = (st_temp.st_dev, st_temp.st_ino)
        if resumable and not atomic.claim(key):
            self._close_fd(fd)
            raise OSError(errno.EBUSY, "Another upload of this file is in progress")
        if resumable and flags & os.O_EXCL and not trunc:
            try:  # an exclusive create is a new file: it never continues an old partial
                await self._truncate_fd(fd, 0)
            except BaseException:
                atomic.unclaim(key)
                self._close_fd(fd)
                raise
        return fd, Upload(temp, path, resumable, bool(flags & os.O_EXCL), key), shown

    def _finish_upload(self, f: FileHandle, fd: int) -> OSError | None:
        """At the close of an atomic upload: rename its temporary onto the name if the upload
        completed (replacing a file credits it, exactly as a posix-rename), else drop it (atomic)
        or keep it for a resume (atomic-resume). Returns the rename's error, if any."""
        up, f.upload = f.upload, None
        assert up is not None
        error = None
        if f.failed is None and not (f.interrupted or self.interrupted):
            try:
                st = self.jail.lstat_entry(up.temp)
                if st is None or (st.st_dev, st.st_ino) != up.key:  # another worker restarted the partial
                    raise OSError(errno.EBUSY, "Another upload of this file replaced this one")
                if up.exclusive:
                    with self._namespace():
                        self.jail.rename(up.temp, up.target, replace=False)
                else:
                    self._rename_over(up.temp, up.target)
            except OSError as exc:
                error = exc
                f.failed = exc.strerror or "the upload could not be renamed onto its name"
            else:
                if up.resumable:
                    atomic.unclaim(up.key)
                if f.fresh:
                    self._remember_own(f.vpath, up.key)
                return None
        self._drop_upload(up)
        return error

    def _drop_upload(self, up: Upload) -> None:
        """An upload that did not complete: atomic removes its temporary (crediting it), atomic-resume keeps it."""
        if up.resumable:
            atomic.unclaim(up.key)
            return
        try:
            self._remove(up.temp)
        except OSError as exc:
            log.warning("cannot remove an upload temporary of %s: %s", esc(self.username), esc(exc.strerror))

    def _remove_partial(self, path: bytes | str) -> bool:
        """`remove` of a name with no file, in atomic-resume: remove its partial (whether one was).

        The name stands for its partial for stat and opens; without this the partial (charged, never
        listed, reserved) could not be given up: the quota it takes stayed taken for up to 7 days."""
        partial = self._partial_of(path)
        if partial is None:
            return False
        try:
            st = self.jail.lstat_entry(partial)
        except OSError:
            return False
        if st is None or not stat.S_ISREG(st.st_mode):
            return False
        if not atomic.claim((st.st_dev, st.st_ino)):
            raise OSError(errno.EBUSY, "Another upload of this file is in progress")
        try:
            self._remove(partial)
        finally:
            atomic.unclaim((st.st_dev, st.st_ino))
        return True

    def _partial_of(self, path: bytes | str) -> ServerPath | None:
        """The name's partial in mode atomic-resume; in a shared folder (a mount's child) this user's own."""
        if self.upload_mode != "atomic-resume":
            return None
        return atomic.partial_path(path, self.username if self._parent is not None else "")

    def open_for_hash(self, path: bytes | str) -> int:
        """A read-only fd for hashing (check-file-name, exec *sum); close it with `close_fd`.

        A hash tells what a file holds, so it needs `download` like reading it (except for a file the
        client uploaded itself on this connection)."""
        if (tree := self._route(path)[0]) is not self:
            fd = tree.open_for_hash(self._route(path)[1])
            self._hash_fds[fd] = tree
            return fd
        d = ""
        if self.perms.restricted:
            d, vpath = self._where(path, follow=True)
            if self._shown(vpath) not in self._own:
                self._require(d, "download")
        try:
            fd = self._open_held(path, os.O_RDONLY, 0)  # a read-only open needs no store
        except OSError:
            if d:
                self._require(d, "download")  # an own name whose file is gone answers as any other name
            raise
        try:
            if self.perms.restricted:
                vpath = self.jail.virtual_path(fd)
                if not self._is_own(self._shown(vpath), os.fstat(fd)):
                    self._require(posixpath.dirname(vpath), "download")  # (not the file it created)
                    self._check_opened(vpath, path, os.O_RDONLY)
        except BaseException:
            self._close_fd(fd)
            raise
        return fd

    def fd_for_hash(self, f: FileHandle) -> int:
        """An open handle's fd for check-file-handle: `download`, unless the handle created the file
        (a client verifying its own upload learns only what it wrote)."""
        if (tree := self._of(f)) is not self:
            return tree.fd_for_hash(f)
        if not f.fresh:
            self._may(f, write=False)
        return f.fd

    def close_fd(self, fd: int) -> None:
        self._hash_fds.pop(fd, self)._close_fd(fd)  # the last holder of a removed file credits its tree

    async def _open_fd(self, path: bytes | str, flags: int, perms: int = 0o666) -> int:
        """Open a regular file as a holder of its inode, charging an entry if this creates it.

        A create is tried without O_CREAT first, so only a file that really
        comes into being costs an entry; O_EXCL then makes the charge exact
        even if another session creates the same name in between.
        """
        fd = -1
        if flags & os.O_CREAT and not flags & os.O_EXCL:
            try:
                fd = self._open_held(path, flags & ~os.O_CREAT, perms)
            except FileNotFoundError:
                pass
        if fd < 0 and flags & os.O_CREAT:
            await self._charge_entry(path)
            try:
                fd = self._open_held(path, flags | os.O_EXCL, perms)
            except FileExistsError:
                self.ledger.credit_entries(1)
                if flags & os.O_EXCL:
                    raise
                fd = self._open_held(path, flags & ~os.O_CREAT, perms)  # created meanwhile
            except BaseException:
                self.ledger.credit_entries(1)
                raise
        elif fd < 0:
            fd = self._open_held(path, flags, perms)
        return fd

    def _open_held(self, path: bytes | str, flags: int, perms: int) -> int:
        """open + hold as one step under the namespace lock (a removal elsewhere sees both or neither).

        A file with other hard links (only an admin can make them: SFTP refuses links) is never
        opened for writing: its other names may be in another user's home.
        """
        with self._namespace():
            fd = self.jail.open_regular(path, flags, perms)
            try:
                if (flags & os.O_ACCMODE) != os.O_RDONLY and os.fstat(fd).st_nlink > 1:
                    raise PermissionError(errno.EACCES, "Permission denied (the file has other hard links)")
            except BaseException:
                os.close(fd)
                raise
            hold(fd)
        return fd

    async def _charge_entry(self, path: bytes | str) -> None:
        """Charge a new entry; when the quota is full but the name exists, say that instead."""
        try:
            await self.ledger.charge_entry()
        except EntriesExceeded:
            try:
                exists = self.jail.lstat_entry(path) is not None
            except OSError:
                exists = False
            if exists:
                raise FileExistsError(errno.EEXIST, "File exists") from None
            raise

    def _close_fd(self, fd: int) -> None:
        """Close a handle from `_open_fd`; the last one of a removed file credits its bytes."""
        self.ledger.credit(release(fd))

    def _held(self, path: bytes | str) -> int | None:
        """A handle on the regular file a removal is about to unlink (under the namespace lock)."""
        try:
            fd = self.jail.open_regular(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        hold(fd)
        return fd

    @staticmethod
    def _bytes_gone(st: os.stat_result, held: int | None) -> tuple[int, concurrent.futures.Future[None] | None]:
        """The bytes that left the disk with a name that is gone (remove, replaced by rename), and
        the close of `held` if it still runs (a big file's last close frees its pages and blocks:
        on a bulk thread, `quota.release_later`).

        `held` is a handle on the removed file taken before the removal: releasing it yields the
        bytes only if no other handle, in any process, still keeps them on disk (then its last
        closer credits them).  Without one (not a regular file, or it could not be opened), a
        regular file's bytes leave with its last link.
        """
        if held is not None:
            same = os.fstat(held)
            if (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino):
                return release_later(held)
            release(held)  # cannot happen under the namespace lock; never credit twice if it does
            return 0, None
        if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
            return st.st_size, None
        return 0, None

    # -- data -----------------------------------------------------------------

    def read(self, f: FileHandle, offset: int, size: int) -> bytes:
        if (tree := self._of(f)) is not self:
            return tree.read(f, offset, size)
        self._may(f, write=False)
        if offset > MAX_FILE_SIZE:
            return b""  # past any possible end of file: EOF, as for any offset past the end
        data = os.pread(f.fd, min(size, MAX_READ), offset)
        f.bytes_read += len(data)
        return data

    @contextlib.asynccontextmanager
    async def _grown(self, fd: int, growth_of: Callable[[int], int]) -> AsyncIterator[tuple[int, int]]:
        """Hold `fd`'s size lock with its growth charged: yields (size, growth) measured under the lock.

        The growth (`growth_of(size)`) comes from the in-memory pool when it can (`take`: no
        store, no await, the WRITE fast path). When the store must be asked, the lock is let go
        first (the event loop must never wait on it, and another handle of this process may want
        it meanwhile), the charge is awaited, and the size is measured again under the lock: a
        charge made for a size that changed meanwhile is topped up or given back, so what is
        charged is exactly the growth that happens. The body must `uncharge` whatever of the
        growth did not happen.
        """
        held = 0  # charged ahead of the lock for this change
        try:
            for _ in range(8):
                with size_lock(fd):
                    size = os.fstat(fd).st_size
                    growth = growth_of(size)
                    if growth <= held or self.ledger.take(growth - held):
                        self.ledger.uncharge(held - growth)
                        held = 0
                        yield size, growth
                        return
                need = growth - held
                await self.ledger.charge(need)
                held += need
            raise OSError(errno.EAGAIN, "the file keeps changing size; try again")
        finally:
            self.ledger.uncharge(held)

    async def write(self, f: FileHandle, offset: int, data: bytes | memoryview) -> int:
        """Write at `offset` (at the end for an append handle); growth is charged first, whole or not at all.

        `data` may be a view of the SFTP channel's received buffer (asyncssh_seam item 3h): it is
        only read, never kept beyond this call."""
        if (tree := self._of(f)) is not self:
            return await tree.write(f, offset, data)
        if not f.writable:
            raise PermissionError(errno.EACCES, "File not open for writing")
        self._may(f, write=True)
        if not data:
            return 0  # writes nothing, so it may not charge (or extend) anything
        fd = f.fd
        start = offset

        def growth_of(size: int) -> int:
            # The kernel's size, not a remembered one: another handle, session or
            # worker may have changed the file since our last write.
            return max(0, (size if f.append else start) + len(data) - size)

        try:
            async with self._grown(fd, growth_of) as (size, growth):
                if f.append:
                    offset = size
                end = offset + len(data)
                if growth:  # the quota has spoken first: its message is the one a user can act on
                    try:
                        check_size(end)
                    except OSError:
                        self.ledger.uncharge(growth)
                        raise
                try:
                    pwrite_all(fd, data, offset)
                except OSError as exc:
                    # Disk full or I/O error: charge only what really landed.
                    if growth:
                        self.ledger.uncharge(end - max(size, os.fstat(fd).st_size))
                    f.failed = exc.strerror or "write failed"
                    raise
        except QuotaExceeded as exc:
            f.failed = str(exc)
            f.quota = True
            raise
        f.bytes_written += len(data)
        return len(data)

    async def write_bulk(self, f: FileHandle, offset: int, data: bytes) -> int:
        """`write` for one client's bulk work (a copy-data chunk): the pwrite runs on a bulk thread.

        An event loop must not do it: a pwrite of a MiB into ext4 can wait for the journal
        (the copy's own write-back commits it every COPY_FLUSH) or for dirty-page throttling, and
        every session of the worker would wait with it. The growth is charged on the loop first
        (the ledger is the loop's); the thread then takes the file's size lock, measures the size,
        and writes only when the charge covers the growth, else it reports the growth it needs
        and the loop charges the rest and tries again. The lock is held only for that one pwrite,
        as a WRITE holds it on the loop, so another process never waits longer than for a WRITE.
        """
        if (tree := self._of(f)) is not self:
            return await tree.write_bulk(f, offset, data)
        if not f.writable:
            raise PermissionError(errno.EACCES, "File not open for writing")
        self._may(f, write=True)
        if not data:
            return 0
        fd, append = f.fd, f.append
        held = 0  # charged for this chunk and not yet written or given back
        landed: list[int] = []  # the growth the thread wrote, also if this request is cancelled
        size = os.fstat(fd).st_size  # a guess: the thread measures again under the lock
        need = max(0, (size if append else offset) + len(data) - size)
        try:
            for _ in range(8):
                if need > 0:
                    await self.ledger.charge(need)  # from the in-memory pool when it can (`take`)
                    held += need
                outcome = await run_bulk(_locked_pwrite, fd, offset, append, data, held, landed)
                if isinstance(outcome, int):
                    need = outcome  # the file grew meanwhile by another process: charge the rest
                    continue
                grown, error = outcome
                self.ledger.uncharge(held - grown)
                held = 0
                if error is not None:
                    if error.errno != errno.EFBIG:
                        f.failed = error.strerror or "write failed"
                    raise error
                break
            else:
                raise OSError(errno.EAGAIN, "the file keeps changing size; try again")
        except QuotaExceeded as exc:
            f.failed = str(exc)
            f.quota = True
            raise
        finally:
            # `held` is still set only if the outcome never arrived (cancelled: run_bulk returns
            # once the thread is done): what the thread wrote stays charged.
            self.ledger.uncharge(held - (landed[0] if held and landed else 0))
        f.bytes_written += len(data)
        return len(data)

    async def copy_data(self, src: FileHandle, src_offset: int, length: int, dst: FileHandle, dst_offset: int,
                        stop: Callable[[], bool] = lambda: False) -> int:
        """Copy `length` bytes (0: up to the source's end as it is now) from `src` to `dst`; returns the count.

        In `COPY_CHUNK` steps so no copy holds the event loop: each chunk is read on a bulk thread
        (a pread needs no lock and touches no ledger) and written by `write_bulk`, which charges
        the growth on the loop and pwrites on a bulk thread under the file's size lock; the loop
        itself only does the bookkeeping, and every other session's requests run meanwhile.
        "To the end" is the source's size when the copy starts: a copy of a file onto its own end
        would otherwise chase its own writes until the quota (or the disk) is full. A copy that
        `stop` says is no longer wanted (the channel closed) ends after its current chunk.
        The bytes copied before a refusal (quota, disk full) stay written, as with WRITEs.
        """
        if not dst.writable:
            raise PermissionError(errno.EACCES, "File not open for writing")
        self._of(src)._may(src, write=False)  # each side by the rules of its own tree (home or a folder)
        self._of(dst)._may(dst, write=True)
        if length == 0:
            end = os.fstat(src.fd).st_size
        else:
            end = src_offset + length
        check_size(end)
        check_size(dst_offset + max(0, end - src_offset))
        copied = 0
        while src_offset + copied < end and not stop():
            want = min(COPY_CHUNK, end - src_offset - copied)
            # read at the bulk threads' lower priority (background.py): a copy is one client's bulk work
            data = await run_bulk(os.pread, src.fd, want, src_offset + copied)
            if src.fd < 0 or dst.fd < 0:
                raise OSError(errno.EBADF, "file closed during the copy")
            if not data:
                break
            src.bytes_read += len(data)
            await self._of(dst).write_bulk(dst, dst_offset + copied, data)
            copied += len(data)
            if copied % COPY_FLUSH < COPY_CHUNK:
                # Write what this copy dirtied back from a bulk thread, so the page cache never
                # fills with it: the kernel throttles whoever writes next when it is full, and
                # that would be an event loop's pwrite (a stall for every session of the worker).
                await run_bulk(os.fdatasync, dst.fd)
            if len(data) < want:
                break
        return copied

    async def truncate(self, f: FileHandle, size: int) -> None:
        if (tree := self._of(f)) is not self:
            return await tree.truncate(f, size)
        if not f.writable:
            raise PermissionError(errno.EACCES, "File not open for writing")
        self._may(f, write=True)  # `overwrite` unless this handle created the file
        await self._truncate_fd(f.fd, size)

    async def _truncate_fd(self, fd: int, size: int) -> None:
        """Set a file's size: growth is charged before, a shrink credited after.

        The ftruncate runs on a bulk thread under the file's size lock (`_locked_truncate`), as a
        copy-data chunk's write does (`write_bulk`): shrinking a big file frees its pages and
        blocks (about 70 ms per GiB here) and waits for any of them still being written back
        (up to several hundred ms after the close of a large upload), which held every session
        of the worker when it ran on the event loop. The growth is charged on the loop first;
        the thread measures the size under the lock and changes it only if the charge covers
        the growth, else the loop charges the rest and asks again.
        """
        check_size(size)
        held = 0  # charged for this change and not yet used or given back
        need = max(0, size - os.fstat(fd).st_size)  # a guess: the thread measures again under the lock
        done: list[tuple[int, int]] = []  # (old size, growth) once the thread changed the size
        try:
            for _ in range(8):
                if need > 0:
                    await self.ledger.charge(need)  # from the in-memory pool when it can (`take`)
                    held += need
                outcome = await run_bulk(_locked_truncate, fd, size, held, done)
                if isinstance(outcome, int):
                    need = outcome  # the file grew meanwhile by another process: charge the rest
                    continue
                break
            else:
                raise OSError(errno.EAGAIN, "the file keeps changing size; try again")
        finally:
            # Also when cancelled: run_bulk returns only once the thread is done, and `done`
            # says whether the size changed, so the ledger follows what happened.
            if done:
                old, growth = done[0]
                self.ledger.uncharge(held - growth)
                if size < old:
                    self.ledger.credit(old - size)
            else:
                self.ledger.uncharge(held)

    def fsync(self, f: FileHandle) -> None:
        os.fsync(f.fd)

    def fstat(self, f: FileHandle) -> os.stat_result:
        return os.fstat(f.fd)

    # -- metadata ---------------------------------------------------------------

    def stat(self, path: bytes | str, follow: bool = True) -> os.stat_result:
        """A path's attributes. Where the user may not `list`, only directories answer (clients
        navigate through them: `cd`, `put x dir/`) and the files this connection created itself
        (clients check an upload's size); any other name, present or not, is EACCES, so a drop box
        does not tell which files it holds."""
        if self.mounts:
            tree, inner = self._route(path)
            if tree is not self:
                return tree.stat(inner, follow)
            if self._holds_mount(path):
                return self._virtual_dir_stat(normalize(path))
        if self.perms.restricted:
            d, vpath = self._where(path, follow)
            if vpath != "/" and not allowed(self.perms.rules, d, "list"):
                try:
                    st = self._stat_entry(path, follow)
                except OSError:
                    st = None
                if st is None or not (stat.S_ISDIR(st.st_mode) or self._is_own(self._shown(vpath), st)):
                    self._require(d, "list")
                assert st is not None
                return st
        return self._stat_entry(path, follow)

    def _stat_entry(self, path: bytes | str, follow: bool) -> os.stat_result:
        """A name's attributes; in atomic-resume, a name with no file shows its partial (resumes need its size)."""
        try:
            return self.jail.stat(path, follow=follow)
        except FileNotFoundError:
            partial = self._partial_of(path)
            if partial is None:
                raise
            try:
                return self.jail.stat(partial, follow=False)
            except OSError:
                pass
            raise

    def realpath(self, path: bytes | str) -> str:
        """The canonical name; inside a directory the user may not `list`, the lexical one (the
        kernel's answer would tell whether the name exists)."""
        if self.mounts:
            tree, inner = self._route(path)
            if tree is not self:
                return tree._shown(tree.realpath(inner))
            if self._holds_mount(path):
                return normalize(path)
        if self.perms.restricted:
            name = normalize(path)
            if name != "/" and not allowed(self.perms.rules, posixpath.dirname(name), "list"):
                return name
        return self.jail.realpath(path)

    async def set_size(self, path: bytes | str, size: int, follow: bool = True) -> None:
        """setstat of size changes a file's content: `upload` and `overwrite`."""
        self._check(path, "upload", "overwrite", follow=follow)
        fd = await self._open_fd(path, os.O_WRONLY | (0 if follow else os.O_NOFOLLOW))
        try:
            await self._truncate_fd(fd, size)
            self.ledger.settle(release_pool=self.ledger.write_handles == 0)
        finally:
            self._close_fd(fd)

    def chmod(self, path: bytes | str, mode: int, follow: bool = True) -> None:
        self._check(path, "chmod", follow=follow)
        self._unlisted_metadata(path, follow)
        self.jail.chmod(path, mode, follow)

    def _unlisted_metadata(self, path: bytes | str, follow: bool) -> None:
        """Where the user may not `list`, changing a name's mode or times (granted for rclone's modtime)
        applies, as `stat` answers, to directories and the connection's own uploads only: anything
        else, present or not, is EACCES. Otherwise success against "No such file" would tell which
        names a drop box holds, and the user could touch files they never uploaded."""
        if not self.perms.restricted:
            return
        d, vpath = self._where(path, follow)
        if vpath == "/" or allowed(self.perms.rules, d, "list"):
            return
        try:
            st: os.stat_result | None = self.jail.stat(path, follow=follow)
        except OSError:
            st = None
        if st is None or not (stat.S_ISDIR(st.st_mode) or self._is_own(self._shown(vpath), st)):
            self._require(d, "list")

    def fchmod(self, f: FileHandle, mode: int) -> None:
        if self.perms.restricted:
            self._require(posixpath.dirname(f.vpath), "chmod")
        self.jail.fchmod(f.fd, mode)

    def utime(self, path: bytes | str, times: tuple[float, float], follow: bool = True) -> None:
        self._check(path, "chtimes", follow=follow)
        self._unlisted_metadata(path, follow)
        self.jail.utime(path, times, follow)

    def futime(self, f: FileHandle, times: tuple[float, float]) -> None:
        if self.perms.restricted:
            self._require(posixpath.dirname(f.vpath), "chtimes")
        os.utime(f.fd, times)

    async def setstat(self, path: bytes | str, *, size: int | None = None, mode: int | None = None,
                times: tuple[float, float] | None = None, follow: bool = True) -> None:
        """SFTP SETSTAT (and scp -p, chmod, touch): size, then mode, then times; one audit event
        saying what was asked to change (none: nothing to do, nothing logged)."""
        if size is None and mode is None and times is None:
            return
        if self.mounts:
            tree, inner = self._route(path)
            if self._holds_mount(path):
                self._refuse_mount_change("setstat", path, **_changes(size, mode, times))
            if tree is not self:
                return await tree.setstat(inner, size=size, mode=mode, times=times, follow=follow)
        with self._audited("setstat", path, **_changes(size, mode, times)):
            if size is not None:
                await self.set_size(path, size, follow)
            if mode is not None:
                self.chmod(path, mode, follow)
            if times is not None:
                self.utime(path, times, follow)

    async def fsetstat(self, f: FileHandle, *, size: int | None = None, mode: int | None = None,
                 times: tuple[float, float] | None = None) -> None:
        """SFTP FSETSTAT: `setstat` on an open handle (the event names the path it was opened as)."""
        if size is None and mode is None and times is None:
            return
        if (tree := self._of(f)) is not self:
            return await tree.fsetstat(f, size=size, mode=mode, times=times)
        with self._audited("setstat", f.vpath, **_changes(size, mode, times)):
            if size is not None:
                await self.truncate(f, size)
            if mode is not None:
                self.fchmod(f, mode)
            if times is not None:
                self.futime(f, times)

    async def space(self, path: bytes | str | None = None, f: FileHandle | None = None) -> SpaceInfo:
        """The quota and usage of the tree `path` (or handle `f`) is in, with the filesystem's numbers,
        for statvfs: the user's in the home, the folder's inside a mount."""
        tree = self._route(path)[0] if path is not None else self._of(f) if f is not None else self
        if tree is not self:
            return await tree.space()
        name = self.ledger.name

        def read(store: AccountStore) -> tuple[tuple[int | None, int], tuple[int | None, int | None, int]]:
            return store.quota_state(name), store.entries_state(name)

        (quota, used), (_, max_entries, entries) = await self.ledger.worker.read(read)
        return SpaceInfo(quota, used, entries_limit(quota, max_entries), entries, self.jail.statvfs())

    # -- names ----------------------------------------------------------------

    def opendir(self, path: bytes | str) -> DirHandle:
        """Open a directory for listing (it counts as an open handle until closed); needs `list` on it."""
        if self.mounts:
            tree, inner = self._route(path)
            if tree is not self:
                return tree.opendir(inner)
            extra = self._mount_entries(normalize(path))
            if extra:
                return self._opendir_with_mounts(path, extra)
        if self.perms.restricted:
            self._require(self._where(path, follow=True)[1], "list")
        self._take_handle()
        try:
            entries = self.jail.listdir(path)
        except BaseException:
            self._give_handle()
            raise
        return DirHandle(entries, self._give_handle)

    def _opendir_with_mounts(self, path: bytes | str, extra: list[tuple[bytes, os.stat_result]]) -> DirHandle:
        """A directory holding mounts, or on the way to one (then it may not exist in the home)."""
        if self.perms.restricted:
            self._require(normalize(path), "list")
        self._take_handle()
        try:
            entries: DirEntries | None = self.jail.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            entries = None
            st = self.jail.stat("/")
            extra = [(b".", st), (b"..", st), *extra]
        except BaseException:
            self._give_handle()
            raise
        return DirHandle(_MountEntries(extra, entries), self._give_handle)

    def listdir(self, path: bytes | str) -> Iterator[tuple[bytes, os.stat_result]]:
        """Every entry at once (for callers that want a whole, small listing)."""
        d = self.opendir(path)
        try:
            while batch := d.read():
                yield from batch
        finally:
            d.close()

    def readlink(self, path: bytes | str) -> bytes:
        if (tree := self._route(path)[0]) is not self:
            return tree.readlink(self._route(path)[1])
        self._check(path, "list")  # a link's target is part of what a listing shows
        return self.jail.readlink(path)

    async def mkdir(self, path: bytes | str, mode: int = 0o777) -> None:
        if (tree := self._route(path)[0]) is not self:
            return await tree.mkdir(self._route(path)[1], mode)
        with self._audited("mkdir", path, mode=f"{mode & 0o7777:04o}"):
            self._check(path, "create_dirs")
            await self._charge_entry(path)
            try:
                self.jail.mkdir(path, mode)
            except BaseException:
                self.ledger.credit_entries(1)
                raise

    def rmdir(self, path: bytes | str) -> None:
        if self._holds_mount(path):
            self._refuse_mount_change("rmdir", path)
        if (tree := self._route(path)[0]) is not self:
            return tree.rmdir(self._route(path)[1])
        with self._audited("rmdir", path):
            self._check(path, "delete")
            self.jail.rmdir(path)
        self.ledger.credit_entries(1)

    def remove(self, path: bytes | str) -> concurrent.futures.Future[None] | None:
        """Remove a file. Returns the last close of a big removed file while it still runs on a
        bulk thread (`_bytes_gone`), for a protocol that answers once the space is free."""
        if self._holds_mount(path):
            self._refuse_mount_change("remove", path)
        if (tree := self._route(path)[0]) is not self:
            return tree.remove(self._route(path)[1])
        pending = None
        with self._audited("remove", path):
            self._check(path, "delete")
            gone = self._own_name(path)
            try:
                pending = self._remove(path)
            except FileNotFoundError:
                if not self._remove_partial(path):
                    raise
            if gone is not None:  # another file may take the name: it is not this connection's
                self._own.pop(gone, None)
        if self.hooks is not None and self.hooks.wants("delete"):
            self._fire("delete", self._named(path), 0)
        return pending

    def _remove(self, path: bytes | str) -> concurrent.futures.Future[None] | None:
        with self._namespace():
            held = self._held(path)
            try:
                gone = self.jail.unlink(path)
            except BaseException:
                if held is not None:
                    os.close(held)  # still linked: nothing to credit
                raise
            freed, pending = self._bytes_gone(gone, held)
        self.ledger.credit_entries(1)
        self.ledger.credit(freed)
        return pending

    def rename(self, old: bytes | str, new: bytes | str) -> None:
        """SFTP's classic rename: fails if `new` exists."""
        if (tree := self._rename_tree(old, new)) is not self:
            return tree.rename(self._route(old)[1], self._route(new)[1])
        with self._audited("rename", old, to=self._shown(normalize(new))):
            self._check_rename(old, new)
            moved = self._own_name(old), self._own_name(new)
            with self._namespace():
                self.jail.rename(old, new, replace=False)
            self._own_moved(*moved)
        self._rename_hook(old, new)

    def posix_rename(self, old: bytes | str, new: bytes | str) -> concurrent.futures.Future[None] | None:
        """Rename replacing `new`: what it replaced leaves the ledger (its bytes once no handle holds them).

        Replacing needs `overwrite` where `new` is; without it this is the classic rename. Returns
        the replaced file's last close while it still runs on a bulk thread (as `remove`)."""
        if (tree := self._rename_tree(old, new)) is not self:
            return tree.posix_rename(self._route(old)[1], self._route(new)[1])
        pending = None
        with self._audited("rename", old, to=self._shown(normalize(new)), replace=True):
            no_overwrite = self._check_rename(old, new)
            moved = self._own_name(old), self._own_name(new)
            if no_overwrite:
                self._rename_no_overwrite(old, new)
            else:
                pending = self._rename_over(old, new)
            self._own_moved(*moved)
        self._rename_hook(old, new)
        return pending

    def _rename_tree(self, old: bytes | str, new: bytes | str) -> UserSession:
        """The one tree a rename happens in. Across trees (home <-> folder, folder <-> folder) it is
        refused with EXDEV: the bytes would have to be copied between ledgers (and, on different
        filesystems, copied at all), which SFTP's rename cannot do atomically; the client copies."""
        if not self.mounts:
            return self
        for p in (old, new):
            if self._holds_mount(p):
                self._refuse_mount_change("rename", old, to=normalize(new))
        tree = self._route(old)[0]
        if self._route(new)[0] is not tree:
            err = OSError(errno.EXDEV, "cannot move between a folder and the home; copy instead")
            audit.event("rename", self, path=normalize(old), to=normalize(new), result=f"failed: {err.strerror}")
            raise err
        return tree

    def _rename_over(self, old: bytes | str, new: bytes | str) -> concurrent.futures.Future[None] | None:
        with self._namespace():
            held = self._held(new)
            try:
                replaced = self.jail.rename(old, new, replace=True)
            except BaseException:
                if held is not None:
                    os.close(held)  # still linked: nothing to credit
                raise
            if replaced is None:
                if held is not None:
                    os.close(held)  # renamed onto itself: still linked
                return None
            freed, pending = self._bytes_gone(replaced, held)
        self.ledger.credit_entries(1)
        self.ledger.credit(freed)
        return pending

    def _check_rename(self, old: bytes | str, new: bytes | str) -> bool:
        """`rename` on both sides; a directory that has rules of its own (or below it) never moves, nor
        does anything move onto one, since the rules would then govern other files. Returns whether
        the target side lacks `overwrite`."""
        if not self.perms.restricted:
            return False
        (d_old, v_old), (d_new, v_new) = self._where(old), self._where(new)
        self._require(d_old, "rename")
        self._require(d_new, "rename")
        rules = self.perms.rules
        if governs(rules, v_old) or governs(rules, v_new):
            raise PermissionError(errno.EACCES, "Permission denied: a directory with its own permission rules "
                                  "cannot be renamed or replaced")
        return not allowed(rules, d_new, "overwrite")

    def _rename_no_overwrite(self, old: bytes | str, new: bytes | str) -> None:
        with self._namespace():
            try:
                self.jail.rename(old, new, replace=False)
            except FileExistsError:
                raise PermissionError(errno.EACCES, "Permission denied: the target exists and there is no "
                                      "overwrite permission there") from None

    # -- hooks (hooks.py): fired after an operation completed, never waited for --------------

    def _named(self, path: bytes | str) -> str:
        """The virtual path of a name: its directory as resolved now, plus the name (which may be gone)."""
        parts = atomic.split_name(path)
        if parts is None:
            return self.jail.realpath(path)
        head, name = parts
        return posixpath.join(self.jail.realpath(head or b"."), os.fsdecode(name))

    def _fire(self, event: str, vpath: str, nbytes: int, target: str = "") -> None:
        assert self.hooks is not None
        self.hooks.fire(HookEvent(event, self.username, self._shown(vpath), self.jail.host_path(vpath), nbytes,
                                  self.peer, self._shown(target) if target else "",
                                  self.jail.host_path(target) if target else ""))

    def _rename_hook(self, old: bytes | str, new: bytes | str) -> None:
        if self.hooks is not None and self.hooks.wants("rename"):
            self._fire("rename", self._named(old), 0, self._named(new))

    def _transfer_hook(self, f: FileHandle) -> None:
        """After a completed upload (every writable handle closed without an error or an interruption;
        in atomic modes after the rename) or download (a read handle that read something)."""
        if self.hooks is None or f.failed is not None or f.interrupted or self.interrupted:
            return
        if f.writable and self.hooks.wants("upload"):
            self._fire("upload", f.vpath, f.bytes_written)
        elif not f.writable and f.bytes_read and self.hooks.wants("download"):
            self._fire("download", f.vpath, f.bytes_read)

    def refuse_link(self, kind: str, target: bytes | str, path: bytes | str) -> str:
        """A symlink or hard link request: always refused (README Policies), and audited.

        Returns the message for the adapter's refusal (SFTP answers OP_UNSUPPORTED)."""
        message = f"{'Symbolic' if kind == 'symlink' else 'Hard'} links are not supported on this server"
        audit.event(kind, self, path=normalize(path), target=os.fsdecode(target), result="denied", error=message)
        return message

    # -- log --------------------------------------------------------------------

    def log_transfer(self, f: FileHandle) -> None:
        """The transfer's one audit event, when its handle closes: result ok, quota (a write was
        refused by the quota), failed: REASON, or interrupted (the connection ended with it open)."""
        if not (f.bytes_read or f.bytes_written or f.writable):
            return
        direction = "upload" if f.writable else "download"
        nbytes = f.bytes_written if f.writable else f.bytes_read
        error = None
        if f.quota:
            result, error = "quota", f.failed
        elif f.failed:
            result = f"failed: {f.failed}"
        else:
            result = "interrupted" if self.interrupted or f.interrupted else "ok"
        audit.event("transfer", self, path=self._shown(f.vpath), direction=direction, bytes=nbytes,
                    seconds=time.monotonic() - f.opened, result=result, error=error)


def _changes(size: int | None, mode: int | None, times: tuple[float, float] | None) -> dict[str, object]:
    """What a setstat asks to change, as audit fields."""
    out: dict[str, object] = {}
    if size is not None:
        out["size"] = size
    if mode is not None:
        out["mode"] = f"{mode & 0o7777:04o}"
    if times is not None:
        out["atime"], out["mtime"] = int(times[0]), int(times[1])
    return out


__all__ += ["EntriesExceeded", "QuotaExceeded"]
