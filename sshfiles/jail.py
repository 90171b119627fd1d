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
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Iterator

__all__ = ["Jail", "JailError", "openat2_available", "normalize"]

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (generic table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_RENAME_NOREPLACE = 1


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
        fd = _syscall(_SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
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


def _relative(vpath: bytes | str) -> bytes:
    """The path to hand to openat2 relative to the root fd (kernel does the '..' handling)."""
    if isinstance(vpath, str):
        vpath = vpath.encode("utf-8", "surrogateescape")
    if b"\x00" in vpath:
        raise JailError(errno.EINVAL, "Invalid path")
    rel = vpath.lstrip(b"/")
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
    """

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.root_fd = os.open(home, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._root_host = os.readlink(f"/proc/self/fd/{self.root_fd}")

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    # -- resolution ---------------------------------------------------------

    def open(self, vpath: bytes | str, flags: int, mode: int = 0o666) -> int:
        """Open a path inside the jail; returns an fd the caller owns."""
        return _openat2(self.root_fd, _relative(vpath), flags, mode)

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
        """Resolve the directory holding a path's last component, and that bare name."""
        rel = _relative(vpath).rstrip(b"/") or b"."
        head, _, name = rel.rpartition(b"/")
        if name in (b"", b".", b".."):
            raise JailError(errno.EINVAL, "Invalid file name")
        fd = _openat2(self.root_fd, head or b".", os.O_PATH | os.O_DIRECTORY)
        return _Parent(fd, name)

    def virtual_path(self, fd: int) -> str:
        """The user-visible path of an fd opened through this jail."""
        host = os.readlink(f"/proc/self/fd/{fd}")
        if host == self._root_host:
            return "/"
        if host.startswith(self._root_host.rstrip("/") + "/"):
            return host[len(self._root_host.rstrip("/")):]
        # The home itself was moved while we held it; never reveal the host path.
        raise JailError(errno.ENOENT, "No such file")

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
        fd = self.open(vpath, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return  # Linux has no symlink modes
            # fchmod refuses O_PATH fds; the /proc link is the already-resolved inode.
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode))
        finally:
            os.close(fd)

    def fchmod(self, fd: int, mode: int) -> None:
        """chmod of a file this jail opened (SFTP fsetstat)."""
        os.fchmod(fd, stat.S_IMODE(mode))

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

    def listdir(self, vpath: bytes | str) -> Iterator[tuple[bytes, os.stat_result]]:
        """Entries with their lstat, read through a directory fd (no path re-resolution)."""
        fd = self.open(vpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield b".", os.fstat(fd)
            # '..' of the home is the home itself: its real parent is none of the user's business
            here = self.virtual_path(fd)
            parent_fd = self.open(posixpath.dirname(here), os.O_PATH | os.O_DIRECTORY)
            try:
                yield b"..", os.fstat(parent_fd)
            finally:
                os.close(parent_fd)
            for name in os.listdir(fd):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we listed
                yield os.fsencode(name), st
        finally:
            os.close(fd)

    def mkdir(self, vpath: bytes | str, mode: int = 0o777) -> None:
        p = self.parent(vpath)
        try:
            os.mkdir(p.name, mode, dir_fd=p.fd)
        finally:
            p.close()

    def rmdir(self, vpath: bytes | str) -> None:
        p = self.parent(vpath)
        try:
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
