"""The one confinement gate between a client's path and the host filesystem.

Every filesystem operation the SFTP layer performs goes through a `Jail`.
Nothing else in sshfiles builds a host path from client input.

Confinement is enforced by the kernel, not by string checks: each path is
resolved with ``openat2(2)`` relative to an ``O_PATH`` file descriptor of the
user's home, with ``RESOLVE_IN_ROOT`` (``..`` stops at the home, absolute
symlink targets are re-rooted at the home) and ``RESOLVE_NO_MAGICLINKS``
(no ``/proc/self/fd`` tricks).  Because resolution happens at the moment of
use, a symlink that was renamed, moved up, or swapped in for a directory by a
racing session can never lead outside: the kernel resolves it inside the
home, every time.

Operations on a final path component (unlink, mkdir, rename, ...) first
resolve the *parent* directory this way and then use the ``*at`` system call
on the bare name, which never follows a symlink in the last component.

Names returned to clients are virtual paths (``/`` = home), computed from
the kernel's view of the opened fd, so no host path can leak through
``realpath`` or error messages.

Modes are decided here too, for the same reason: one gate.  Every mode a
client creates with or sets passes `sanitize_mode` (no setuid, setgid or
sticky bit, ever; the owner keeps read, and search on directories); the
home root's mode is not the user's to change; and when the server runs as
root, which ignores permission bits, the jail refuses what the kernel would
refuse an unprivileged owner (`Jail.enforce_owner_bits`), so a file the user
made read-only stays read-only.

Names are reserved here too: a path with a component starting with `RESERVED_PREFIX` (the
temporary files of atomic uploads, atomic.py) does not exist for a client -- every lookup
through the jail answers ``ENOENT`` and listings skip such entries -- unless the server itself
names it with a `ServerPath`.  One check in the one gate, so no protocol or operation can reach
an upload in progress by its temporary name.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import RESERVED_PREFIX, ServerPath

__all__ = ["Jail", "JailError", "normalize", "openat2_available", "sanitize_mode", "secure_homes"]

log = logging.getLogger("sshfiles.jail")

SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
_DIR_WX = stat.S_IWUSR | stat.S_IXUSR

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (generic table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_RENAME_NOREPLACE = 1

_RESERVED = RESERVED_PREFIX.encode()
_RESERVED_COMPONENT = b"/" + _RESERVED


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_renameat2 = getattr(_libc, "renameat2", None)


class JailError(OSError):
    """A request the jail refuses outright (bad name, unsupported object type)."""


def _openat2(dirfd: int, path: bytes, flags: int, mode: int = 0) -> int:
    creates = flags & os.O_CREAT or (flags & os.O_TMPFILE) == os.O_TMPFILE  # O_TMPFILE contains O_DIRECTORY
    how = _OpenHow(flags | os.O_CLOEXEC, mode if creates else 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    while True:
        fd = int(_syscall(_SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err == errno.EAGAIN:  # a concurrent rename raced the lookup; the kernel asks us to retry
            continue
        raise OSError(err, os.strerror(err))


def openat2_available() -> bool:
    """Whether this kernel offers openat2 (Linux >= 5.6); sshfiles refuses to serve without it."""
    try:
        fd = _openat2(os.open("/", os.O_PATH | os.O_DIRECTORY), b".", os.O_PATH)
    except OSError:
        return False
    os.close(fd)
    return True


def normalize(vpath: bytes | str) -> str:
    """Lexically normalise a client path to an absolute virtual path ('/' = home).

    Used only for *naming* (what realpath answers for a path that does not
    exist yet); access decisions never depend on it.
    """
    if isinstance(vpath, bytes):
        vpath = vpath.decode("utf-8", "surrogateescape")
    if "\x00" in vpath:
        raise JailError(errno.EINVAL, "Invalid path")
    path = posixpath.normpath("/" + vpath)
    # normpath keeps a leading '//' and lets '..' climb above '/' lexically: clamp both
    parts = [p for p in path.split("/") if p and p != ".."]
    return "/" + "/".join(parts)


def sanitize_mode(mode: int, is_dir: bool) -> int:
    """The mode a client may create with or set: the one rule every path applies.

    * setuid, setgid and sticky bits are dropped: files a root-run server
      stores are owned by root, so a setuid upload is a root shell for any
      local account that can reach it; setgid and sticky have no use in a
      home either.
    * The owner always keeps read (files) and read+search (directories): the
      server must be able to read whatever it stores (quota scans, hashing,
      accounting that reopens files read-only), also when it runs as an
      unprivileged account that the kernel holds to these bits.  It also
      means the owner-bit emulation below never has to check read or search.
    """
    mode = stat.S_IMODE(mode) & ~SPECIAL_BITS
    return mode | (stat.S_IRUSR | stat.S_IXUSR if is_dir else stat.S_IRUSR)


def _denied(message: str = "Permission denied") -> PermissionError:
    """EACCES, which asyncssh answers as SFTP PERMISSION_DENIED with this text."""
    return PermissionError(errno.EACCES, message)


def _relative(vpath: bytes | str) -> bytes:
    """The path to hand to openat2 relative to the root fd (kernel does the '..' handling)."""
    if isinstance(vpath, str):
        vpath = vpath.encode("utf-8", "surrogateescape")
    if b"\x00" in vpath:
        raise JailError(errno.EINVAL, "Invalid path")
    rel = vpath.lstrip(b"/")
    if _RESERVED in vpath and not isinstance(vpath, ServerPath) and _RESERVED_COMPONENT in b"/" + rel:
        raise FileNotFoundError(errno.ENOENT, "No such file")  # a reserved name does not exist for a client
    return rel or b"."


@dataclass
class _Parent:
    fd: int
    name: bytes

    def close(self) -> None:
        os.close(self.fd)


class Jail:
    """A user's home seen as '/', with kernel-enforced confinement.

    One instance per SFTP session; it holds a single O_PATH fd of the home.

    `enforce_owner_bits` is the one place that decides whether the jail
    checks the owner's permission bits itself.  Root (euid 0) bypasses them
    in the kernel, so a root-run server would overwrite a file its user made
    read-only (OpenSSH refuses, as the user's own process would be refused);
    an unprivileged server is held to them by the kernel and needs no help.
    Only write-side bits are emulated: `sanitize_mode` keeps read and search
    for the owner on everything a client sets.
    """

    def __init__(self, home: str | os.PathLike[str], enforce_owner_bits: bool | None = None) -> None:
        self.root_fd = os.open(home, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._root_host = os.readlink(f"/proc/self/fd/{self.root_fd}")
        st = os.fstat(self.root_fd)
        self._root_id = (st.st_dev, st.st_ino)
        self.enforce_owner_bits = os.geteuid() == 0 if enforce_owner_bits is None else enforce_owner_bits

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    # -- resolution ---------------------------------------------------------

    def open(self, vpath: bytes | str, flags: int, mode: int = 0o666) -> int:
        """Open a path inside the jail; returns an fd the caller owns.

        A created file gets `sanitize_mode(mode)`; with `enforce_owner_bits`,
        writing needs the owner's write bit on the file and creating needs
        write+search on the directory that will hold it.
        """
        rel = _relative(vpath)
        mode = sanitize_mode(mode, is_dir=False)
        writes = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT)
        if flags & os.O_PATH or not (writes and self.enforce_owner_bits):
            return _openat2(self.root_fd, rel, flags, mode)
        return self._open_as_owner(vpath, rel, flags, mode)

    def _open_as_owner(self, vpath: bytes | str, rel: bytes, flags: int, mode: int) -> int:
        """open(2) as the kernel would allow it to the file's unprivileged owner.

        An existing file is opened without O_CREAT/O_TRUNC first, so nothing
        changes before its mode is checked; only a missing one is created,
        after the check of its directory.  A race with the user's own other
        session can only decide which of these two checks applies.
        """
        plain = flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        for _ in range(3):  # bounded: each round trip means another session created or removed the name
            try:
                fd = _openat2(self.root_fd, rel, plain)
            except FileNotFoundError:
                if not flags & os.O_CREAT:
                    raise
            else:
                try:
                    if flags & os.O_CREAT and flags & os.O_EXCL:
                        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
                    st = os.fstat(fd)
                    wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
                    if wants_write and not st.st_mode & stat.S_IWUSR:
                        raise _denied("Permission denied (the file is read-only)")
                    if flags & os.O_TRUNC and stat.S_ISREG(st.st_mode):
                        os.ftruncate(fd, 0)
                except BaseException:
                    os.close(fd)
                    raise
                return fd
            p = self.parent(vpath)
            try:
                self._require_writable_dir(p.fd)
                try:
                    dangling = stat.S_ISLNK(os.stat(p.name, dir_fd=p.fd, follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    dangling = False
            finally:
                p.close()
            # O_EXCL proves we created it (else another session did: look again); a planted dangling
            # symlink cannot be created through with O_EXCL, and its directory is the one checked.
            try:
                return _openat2(self.root_fd, rel, (flags & ~os.O_TRUNC) | (0 if dangling else os.O_EXCL), mode)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
        raise OSError(errno.EBUSY, "The file changed while it was opened; try again")

    def _require_writable_dir(self, dir_fd: int) -> None:
        """Adding, removing or renaming an entry needs write+search on its directory (as for its owner)."""
        if self.enforce_owner_bits and os.fstat(dir_fd).st_mode & _DIR_WX != _DIR_WX:
            raise _denied("Permission denied (the directory is read-only)")

    def _is_root(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == self._root_id

    def open_regular(self, vpath: bytes | str, flags: int, mode: int = 0o666) -> int:
        """Open a regular file only: a FIFO or device in a home must never block or leak."""
        fd = self.open(vpath, flags | os.O_NONBLOCK, mode)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise JailError(errno.EISDIR, "Is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise JailError(errno.EACCES, "Not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent(self, vpath: bytes | str) -> _Parent:
        """Resolve the directory holding a path's last component, and that bare name.

        A trailing slash stays on the name, so the kernel applies POSIX's rule
        that such a name must be a directory (`unlink("file/")` is ENOTDIR):
        every call that resolves the path, the quota's and the removal's, then
        sees the same entry.
        """
        raw = _relative(vpath)
        rel = raw.rstrip(b"/") or b"."
        head, _, name = rel.rpartition(b"/")
        if name in (b"", b".", b".."):
            raise JailError(errno.EINVAL, "Invalid file name")
        fd = _openat2(self.root_fd, head or b".", os.O_PATH | os.O_DIRECTORY)
        return _Parent(fd, name + b"/" if raw.endswith(b"/") else name)

    def virtual_path(self, fd: int) -> str:
        """The user-visible path of an fd opened through this jail."""
        host = os.readlink(f"/proc/self/fd/{fd}")
        if host == self._root_host:
            return "/"
        if host.startswith(self._root_host.rstrip("/") + "/"):
            return host[len(self._root_host.rstrip("/")):]
        # The home itself was moved while we held it; never reveal the host path.
        raise JailError(errno.ENOENT, "No such file")

    def host_path(self, vpath: str) -> str:
        """The host path of a virtual path (for the admin's hooks only: never sent to a client)."""
        return self._root_host.rstrip("/") + "/" + normalize(vpath).lstrip("/")

    # -- metadata -----------------------------------------------------------

    def stat(self, vpath: bytes | str, follow: bool = True) -> os.stat_result:
        fd = self.open(vpath, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def realpath(self, vpath: bytes | str) -> str:
        """Canonical virtual path; a path that does not exist yet is named lexically."""
        try:
            fd = self.open(vpath, os.O_PATH)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return normalize(vpath)
            raise
        try:
            return self.virtual_path(fd)
        finally:
            os.close(fd)

    def chmod(self, vpath: bytes | str, mode: int, follow: bool = True) -> None:
        """setstat's permissions, sanitized; the home root's mode is refused.

        No owner-bit check: the owner may always chmod (that is how a
        read-only file becomes writable again).
        """
        fd = self.open(vpath, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        try:
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                return  # Linux has no symlink modes
            new = self._new_mode(st, mode)
            if new is not None:
                # fchmod refuses O_PATH fds; the /proc link is the already-resolved inode.
                os.chmod(f"/proc/self/fd/{fd}", new)
        finally:
            os.close(fd)

    def fchmod(self, fd: int, mode: int) -> None:
        """chmod of a file this jail opened (SFTP fsetstat), under the same rules as `chmod`."""
        new = self._new_mode(os.fstat(fd), mode)
        if new is not None:
            os.fchmod(fd, new)

    def _new_mode(self, st: os.stat_result, mode: int) -> int | None:
        """The sanitized mode to set, None if nothing changes; refuses a change of the home root's.

        The home root is the admin's: its mode decides who else on the host
        can reach the user's files (a 0777 home made an uploaded setuid binary
        a root shell for every local account).  Asking for the mode it
        already has is not a change and succeeds, so clients that copy a
        directory's attributes onto '/' keep working.
        """
        new = sanitize_mode(mode, stat.S_ISDIR(st.st_mode))
        if self._is_root(st):
            if new == stat.S_IMODE(st.st_mode):
                return None
            raise _denied("Permission denied: the mode of the home directory cannot be changed")
        return new

    def utime(self, vpath: bytes | str, times: tuple[float, float], follow: bool = True) -> None:
        fd = self.open(vpath, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                p = self.parent(vpath)
                try:
                    os.utime(p.name, times, dir_fd=p.fd, follow_symlinks=False)
                finally:
                    p.close()
                return
            os.utime(f"/proc/self/fd/{fd}", times)
        finally:
            os.close(fd)

    # -- directory entries --------------------------------------------------

    def listdir(self, vpath: bytes | str) -> DirEntries:
        """A directory's entries with their lstat, read lazily through a directory fd.

        The directory is opened now (a missing one fails here, at opendir); its entries are read
        as they are consumed, from the kernel's getdents buffer through ``os.scandir`` on the fd,
        and each is lstat'ed relative to the fd (no path re-resolution). Nothing is read ahead:
        a directory of any size costs one fd pair and one ``DIR`` buffer, and consuming N entries
        costs N lstats. Close the result (or exhaust it) to give the fds back.
        """
        fd = self.open(vpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return DirEntries(self, fd)
        except BaseException:
            os.close(fd)
            raise

    def mkdir(self, vpath: bytes | str, mode: int = 0o777) -> None:
        """mkdir with a sanitized mode; a setgid parent (restored by an admin) is not inherited."""
        p = self.parent(vpath)
        try:
            self._require_writable_dir(p.fd)
            os.mkdir(p.name, sanitize_mode(mode, is_dir=True), dir_fd=p.fd)
            # The kernel copies S_ISGID from the parent whatever mode we ask for: take it off again.
            fd = os.open(p.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=p.fd)
            try:
                st = os.fstat(fd)
                if st.st_mode & SPECIAL_BITS:
                    os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) & ~SPECIAL_BITS)
            finally:
                os.close(fd)
        finally:
            p.close()

    def rmdir(self, vpath: bytes | str) -> None:
        p = self.parent(vpath)
        try:
            self._require_writable_dir(p.fd)
            os.rmdir(p.name, dir_fd=p.fd)
        finally:
            p.close()

    def unlink(self, vpath: bytes | str) -> os.stat_result:
        """Remove a non-directory; returns what was removed (the quota needs its size)."""
        p = self.parent(vpath)
        try:
            st = os.stat(p.name, dir_fd=p.fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise JailError(errno.EISDIR, "Is a directory")
            self._require_writable_dir(p.fd)
            os.unlink(p.name, dir_fd=p.fd)
            return st
        finally:
            p.close()

    def lstat_entry(self, vpath: bytes | str) -> os.stat_result | None:
        """lstat of a last component, or None if absent."""
        p = self.parent(vpath)
        try:
            return os.stat(p.name, dir_fd=p.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            p.close()

    def rename(self, old: bytes | str, new: bytes | str, replace: bool) -> os.stat_result | None:
        """Rename within the jail; returns the lstat of a replaced target (or None).

        Without `replace` this is SFTP's classic rename (fail if the target
        exists), done atomically with renameat2(RENAME_NOREPLACE).
        """
        po = self.parent(old)
        try:
            pn = self.parent(new)
            try:
                self._check_rename(po, pn)
                replaced = None
                if replace:
                    try:
                        replaced = os.stat(pn.name, dir_fd=pn.fd, follow_symlinks=False)
                    except FileNotFoundError:
                        pass
                    source = os.stat(po.name, dir_fd=po.fd, follow_symlinks=False)
                    os.rename(po.name, pn.name, src_dir_fd=po.fd, dst_dir_fd=pn.fd)
                    if replaced is not None and (replaced.st_dev, replaced.st_ino) == (source.st_dev, source.st_ino):
                        replaced = None  # the same file (onto itself): rename(2) did nothing
                else:
                    self._rename_noreplace(po, pn)
                return replaced
            finally:
                pn.close()
        finally:
            po.close()

    def _check_rename(self, po: _Parent, pn: _Parent) -> None:
        """rename(2)'s owner checks: write+search on both directories, and write on a directory that
        moves to another parent (its '..' entry changes)."""
        if not self.enforce_owner_bits:
            return
        self._require_writable_dir(po.fd)
        self._require_writable_dir(pn.fd)
        src = os.stat(po.name, dir_fd=po.fd, follow_symlinks=False)
        if stat.S_ISDIR(src.st_mode) and not src.st_mode & stat.S_IWUSR:
            a, b = os.fstat(po.fd), os.fstat(pn.fd)
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                raise _denied("Permission denied (the directory is read-only)")

    @staticmethod
    def _rename_noreplace(po: _Parent, pn: _Parent) -> None:
        if _renameat2 is None:  # pragma: no cover - glibc < 2.28
            raise JailError(errno.EOPNOTSUPP, "rename without replace is not supported here")
        if _renameat2(po.fd, po.name, pn.fd, pn.name, _RENAME_NOREPLACE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def readlink(self, vpath: bytes | str) -> bytes:
        p = self.parent(vpath)
        try:
            return os.readlink(p.name, dir_fd=p.fd)
        finally:
            p.close()

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(f"/proc/self/fd/{self.root_fd}")


# -- the admin's side: homes on the host ---------------------------------------------------------

# What no home root may have: group/other write (anyone could plant files in the jail) and the
# special bits.  The homes directory may give group/other nothing at all: listing it tells every
# local account who the users are, and searching it reaches into any home left open, where files
# stored before these rules (setuid ones too) may still lie.
HOME_ROOT_FORBIDDEN = stat.S_IWGRP | stat.S_IWOTH | SPECIAL_BITS
HOMES_DIR_FORBIDDEN = stat.S_IRWXG | stat.S_IRWXO | SPECIAL_BITS


def secure_homes(homes_dir: Path | None, homes: Iterable[Path]) -> list[str]:
    """Correct the homes directory and home roots that an older version, a restored backup or an
    admin left too open; one warning line each, also returned.  `serve` calls it at start.

    Only the forbidden bits are taken away: 0777 -> 0755 for a home (read access an admin granted
    on purpose, e.g. to a group, stays), anything -> 0700 for the homes directory.  Missing paths
    are skipped; creating them is `user add`'s job.
    """
    lines = []
    targets = [(homes_dir, "homes directory", HOMES_DIR_FORBIDDEN)] if homes_dir is not None else []
    targets += [(home, "home", HOME_ROOT_FORBIDDEN) for home in homes]
    seen = set()
    for path, what, forbidden in targets:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        old = stat.S_IMODE(st.st_mode)
        if old & forbidden:
            new = old & ~forbidden
            try:
                os.chmod(path, new)
            except OSError as exc:
                line = f"cannot correct the mode {old:04o} of {what} {path}: {exc.strerror}"
            else:
                line = f"corrected the mode of {what} {path}: {old:04o} -> {new:04o}"
            log.warning("%s", line)
            lines.append(line)
    return lines


class DirEntries(Iterator[tuple[bytes, os.stat_result]]):
    """`Jail.listdir`'s result: ``.``, ``..``, then every entry, each with its lstat, read lazily."""

    def __init__(self, jail: Jail, fd: int) -> None:
        self._jail = jail
        self._fd = fd
        self._scan: Any = None  # os.scandir's iterator (it has a close())
        self._dots: list[tuple[bytes, os.stat_result]] | None = None

    def __iter__(self) -> DirEntries:
        return self

    def __next__(self) -> tuple[bytes, os.stat_result]:
        if self._fd < 0:
            raise StopIteration
        if self._dots is None:
            st = os.fstat(self._fd)
            # '..' of the home is the home itself: its real parent is none of the user's business
            parent_fd = self._jail.open(posixpath.dirname(self._jail.virtual_path(self._fd)),
                                        os.O_PATH | os.O_DIRECTORY)
            try:
                self._dots = [(b"..", os.fstat(parent_fd)), (b".", st)]
            finally:
                os.close(parent_fd)
        if self._dots:
            return self._dots.pop()
        if self._scan is None:
            self._scan = os.scandir(self._fd)  # dups the fd; entries are lstat'ed relative to ours
        for entry in self._scan:
            if entry.name.startswith(RESERVED_PREFIX):
                continue  # an upload in progress (atomic.py): not there until it completes
            try:
                return os.fsencode(entry.name), entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we listed
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Give the directory's fds back (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            scan, self._scan = self._scan, None
            try:
                if scan is not None:
                    scan.close()
            finally:
                os.close(fd)

    def __del__(self) -> None:
        self.close()
