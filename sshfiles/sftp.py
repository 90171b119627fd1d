"""The SFTP verbs: each one a few lines that call the jail and the quota.

`JailedSFTPServer` is the `asyncssh.SFTPServer` for one session.  It never
builds a host path: every path goes to `Jail`, every size change to the
user's `UserLedger` first.  Errors reach the client through asyncssh's
OSError -> status mapping, with ``strerror`` only (no file names), so no
host path can appear in a reply.

`SshfilesSFTPHandler` adjusts asyncssh's protocol handler where a stock
client needs it (see its docstring).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

import asyncssh
from asyncssh.packet import SSHPacket, String, UInt64
from asyncssh.sftp import (
    FXF_APPEND, FXF_CREAT, FXF_EXCL, FXF_READ, FXF_TRUNC, FXF_WRITE,
    FXP_EXTENDED_REPLY, FXP_WRITE, SFTPAttrs, SFTPName, SFTPVFSAttrs, SFTPLimits, SFTPServerHandler,
)

from . import __version__, hashing
from .jail import Jail
from .quota import FileState, QuotaExceeded, UserLedger

if TYPE_CHECKING:
    from .server import Session

__all__ = ["JailedSFTPServer", "SshfilesSFTPHandler", "ExtendedReply", "OpenFile", "MAX_READ", "MAX_WRITE"]

log = logging.getLogger("sshfiles.transfer")

# OpenSSH's sftp-server limits: big enough to keep a pipelined client busy,
# small enough that one request never holds megabytes in memory.
MAX_READ = 256 * 1024
MAX_WRITE = 256 * 1024
MAX_PACKET = MAX_WRITE + 1024


@dataclass
class OpenFile:
    """An open file handle of one session."""

    fd: int
    vpath: str
    writable: bool
    append: bool
    fs: FileState | None
    opened: float = field(default_factory=time.monotonic)
    bytes_read: int = 0
    bytes_written: int = 0
    failed: str | None = None


def _attrs(st: os.stat_result) -> SFTPAttrs:
    return SFTPAttrs.from_local(st)


class JailedSFTPServer(asyncssh.SFTPServer):
    """One user's SFTP session: jail and quota on every verb."""

    def __init__(self, chan: asyncssh.SSHServerChannel, session: "Session") -> None:
        super().__init__(chan)
        self.session = session
        self.jail: Jail = session.jail
        self.ledger: UserLedger = session.ledger
        self.user = session.username

    # -- names ----------------------------------------------------------------

    def format_user(self, uid: int | None) -> str:
        return self.user

    def format_group(self, gid: int | None) -> str:
        return self.user

    def realpath(self, path: bytes) -> bytes:
        return self.jail.realpath(path).encode("utf-8", "surrogateescape")

    # -- files ----------------------------------------------------------------

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> OpenFile:
        if pflags & FXF_READ and pflags & FXF_WRITE:
            flags = os.O_RDWR
        elif pflags & FXF_WRITE:
            flags = os.O_WRONLY
        else:
            flags = os.O_RDONLY
        if pflags & FXF_CREAT:
            flags |= os.O_CREAT
        if pflags & FXF_EXCL:
            flags |= os.O_EXCL
        return self._open(path, flags, bool(pflags & FXF_TRUNC), bool(pflags & FXF_APPEND), attrs)

    def _open(self, path: bytes, flags: int, trunc: bool, append: bool, attrs: SFTPAttrs) -> OpenFile:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if (trunc or append) and not writable:
            raise asyncssh.SFTPInvalidParameter("truncate or append needs write access")
        perms = 0o666 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)
        fd = self.jail.open_regular(path, flags, perms)
        try:
            vpath = self.jail.virtual_path(fd)
            fs = None
            if writable:
                fs = self.ledger.track(os.fstat(fd))
                self.ledger.write_handles += 1
                if trunc:
                    self._truncate_fd(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return OpenFile(fd, vpath, writable, append, fs)

    def close(self, file_obj: OpenFile) -> None:
        if file_obj.fd < 0:
            return
        try:
            if file_obj.fs is not None:
                self.ledger.write_handles -= 1
                self.ledger.untrack(file_obj.fs, os.fstat(file_obj.fd).st_size)
                self.ledger.settle(release_pool=self.ledger.write_handles == 0)
        finally:
            os.close(file_obj.fd)
            file_obj.fd = -1
            self.session.log_transfer(file_obj)

    def read(self, file_obj: OpenFile, offset: int, size: int) -> bytes:
        data = os.pread(file_obj.fd, min(size, MAX_READ), offset)
        file_obj.bytes_read += len(data)
        return data

    def write(self, file_obj: OpenFile, offset: int, data: bytes) -> int:
        if file_obj.fs is None:
            raise asyncssh.SFTPPermissionDenied("File not open for writing")
        # The kernel's size, not a remembered one: another handle, session or
        # worker may have changed the file since our last write.
        size = os.fstat(file_obj.fd).st_size
        if file_obj.append:
            offset = size
        end = offset + len(data)
        try:
            if end > size:
                self.ledger.charge(end - size)
        except QuotaExceeded as exc:
            if file_obj.failed is None:  # once per handle: a pipelined upload has many refused writes
                self._notify(exc)
            file_obj.failed = str(exc)
            raise
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(file_obj.fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            # Disk full or I/O error: charge only what really landed.
            if end > size:
                self.ledger.credit(end - max(size, os.fstat(file_obj.fd).st_size))
            file_obj.failed = exc.strerror or "write failed"
            raise
        file_obj.bytes_written += len(data)
        return len(data)

    def _notify(self, exc: QuotaExceeded) -> None:
        """Say why on the channel's stderr too: OpenSSH's sftp and scp print that, but show
        only 'Failure' for a v3 status (they never print its message)."""
        chan = self.channel
        if chan.get_subsystem() == "sftp":
            try:
                chan.write_stderr(f"sshfiles: {exc.strerror}\n".encode())
            except OSError:
                pass

    def fstat(self, file_obj: OpenFile) -> SFTPAttrs:
        return _attrs(os.fstat(file_obj.fd))

    def fsetstat(self, file_obj: OpenFile, attrs: SFTPAttrs) -> None:
        if attrs.size is not None:
            if file_obj.fs is None:
                raise asyncssh.SFTPPermissionDenied("File not open for writing")
            self._truncate_fd(file_obj.fd, attrs.size)
        if attrs.permissions is not None:
            self.jail.fchmod(file_obj.fd, attrs.permissions)
        if attrs.atime is not None and attrs.mtime is not None:
            os.utime(file_obj.fd, (attrs.atime, attrs.mtime))

    def fsync(self, file_obj: OpenFile) -> None:
        os.fsync(file_obj.fd)

    def _truncate_fd(self, fd: int, size: int) -> None:
        """Set a file's size: growth is charged before, a shrink credited after."""
        old = os.fstat(fd).st_size
        if size > old:
            try:
                self.ledger.charge(size - old)
            except QuotaExceeded as exc:
                self._notify(exc)
                raise
        try:
            os.ftruncate(fd, size)
        except OSError:
            if size > old:
                self.ledger.credit(size - old)
            raise
        if size < old:
            self.ledger.credit(old - size)

    # -- metadata by path ---------------------------------------------------

    def lstat(self, path: bytes) -> SFTPAttrs:
        return _attrs(self.jail.stat(path, follow=False))

    def stat(self, path: bytes) -> SFTPAttrs:
        return _attrs(self.jail.stat(path, follow=True))

    def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._setstat(path, attrs, follow=True)

    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._setstat(path, attrs, follow=False)

    def _setstat(self, path: bytes, attrs: SFTPAttrs, follow: bool) -> None:
        if attrs.size is not None:
            fd = self.jail.open_regular(path, os.O_WRONLY | (0 if follow else os.O_NOFOLLOW))
            try:
                self._truncate_fd(fd, attrs.size)
                self.ledger.settle(release_pool=self.ledger.write_handles == 0)
            finally:
                os.close(fd)
        if attrs.permissions is not None:
            self.jail.chmod(path, attrs.permissions, follow)
        if attrs.atime is not None and attrs.mtime is not None:
            self.jail.utime(path, (attrs.atime, attrs.mtime), follow)

    def statvfs(self, path: bytes) -> SFTPVFSAttrs:
        self.jail.stat(path)  # a missing path is an error, as for OpenSSH
        return self._vfs()

    def fstatvfs(self, file_obj: OpenFile) -> SFTPVFSAttrs:
        return self._vfs()

    def _vfs(self) -> SFTPVFSAttrs:
        """The quota as a filesystem: size = quota, used = usage, free = the rest.

        f_frsize is 1 so block counts are exact byte counts (OpenSSH's df
        multiplies by f_frsize); f_bsize stays a sane I/O size.
        """
        fsv = self.jail.statvfs()
        quota, used = self.ledger.state()
        if quota is None:
            return SFTPVFSAttrs.from_local(fsv)
        free = max(0, quota - used)
        disk_free = fsv.f_bavail * fsv.f_frsize
        return SFTPVFSAttrs(bsize=MAX_WRITE, frsize=1, blocks=quota, bfree=min(free, disk_free),
                            bavail=min(free, disk_free), files=fsv.f_files, ffree=fsv.f_ffree,
                            favail=fsv.f_favail, fsid=0, flags=0, namemax=fsv.f_namemax)

    # -- directories and names ------------------------------------------------

    def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        # Read eagerly so that opendir of a missing directory fails at opendir.
        entries = [SFTPName(name, attrs=_attrs(st)) for name, st in self.jail.listdir(path)]

        async def _iter() -> AsyncIterator[SFTPName]:
            for entry in entries:
                yield entry

        return _iter()

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        self.jail.mkdir(path, 0o777 if attrs.permissions is None else stat.S_IMODE(attrs.permissions))

    def rmdir(self, path: bytes) -> None:
        self.jail.rmdir(path)

    def remove(self, path: bytes) -> None:
        self.ledger.removed(self.jail.unlink(path))

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self.jail.rename(oldpath, newpath, replace=False)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        replaced = self.jail.rename(oldpath, newpath, replace=True)
        if replaced is not None:
            self.ledger.removed(replaced)

    def readlink(self, path: bytes) -> bytes:
        return self.jail.readlink(path)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPOpUnsupported("Symbolic links are not supported on this server")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPOpUnsupported("Hard links are not supported on this server")

    def exit(self) -> None:
        self.session.sftp_ended()


class ExtendedReply:
    """An EXTENDED_REPLY body for asyncssh's handler, which calls ``encode(version)`` on
    results that are not one of its own types (check-file, users-groups-by-id)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def encode(self, sftp_version: int) -> bytes:
        return self.body


class SshfilesSFTPHandler(SFTPServerHandler):
    """asyncssh's SFTP server protocol handler, adjusted for stock clients.

    * WRITE tolerates bytes after the data (rclone 1.60's pkg/sftp sends a
      stale buffer tail; OpenSSH ignores it, asyncssh answered BAD_MESSAGE).
    * limits@openssh.com advertises OpenSSH's 256 KiB read/write sizes.
    * check-file-name / check-file-handle answer hashes (hashing.py).
    * ranges@asyncssh.com is not offered: it needs asyncssh's own file objects.
    """

    _extensions = [(name, data) for name, data in SFTPServerHandler._extensions
                   if name not in (b"ranges@asyncssh.com", b"hardlink@openssh.com", b"vendor-id")]
    _extensions += [(b"vendor-id", String("sshfiles") + String("sshfiles") + String(__version__) + UInt64(0))]
    _extensions += [(b"check-file", ",".join(hashing.ALGORITHMS).encode())]

    _extensions += [(b"users-groups-by-id@openssh.com", b"1")]

    _return_types = dict(SFTPServerHandler._return_types)
    _return_types.update({b"check-file-name": FXP_EXTENDED_REPLY, b"check-file-handle": FXP_EXTENDED_REPLY,
                          b"users-groups-by-id@openssh.com": FXP_EXTENDED_REPLY})

    _server: JailedSFTPServer

    async def _cleanup(self, exc: Exception | None) -> None:
        # Handles still open here were never CLOSEd (client vanished, or the server cut the
        # connection): super() closes them, and their transfers are logged as interrupted.
        if self._file_handles:
            self._server.session.interrupted = True
        # asyncssh's cleanup closes the channel without an exit status (a later chan.exit() is a
        # no-op), so `ssh -s sftp` ends with status -1 and OpenSSH's scp (SFTP mode) exits 1.
        # Report the status first, as OpenSSH's sftp-server process does by exiting.
        writer = self._writer
        if writer is not None and not writer.channel.is_closing():
            try:
                writer.channel.exit(0 if exc is None else 1)
            except OSError:
                pass
        await super()._cleanup(exc)

    async def _process_users_groups_by_id(self, packet: SSHPacket) -> ExtendedReply:
        """OpenSSH's id -> name lookup (sftp's `ls -l FILE`): every id is shown as the account."""
        uids = packet.get_string()
        gids = packet.get_string()
        packet.check_end()
        if len(uids) % 4 or len(gids) % 4:
            raise asyncssh.SFTPBadMessage("id lists must be uint32 arrays")
        name = String(self._server.user)
        return ExtendedReply(String(name * (len(uids) // 4)) + String(name * (len(gids) // 4)))

    async def _process_write(self, packet: SSHPacket) -> int:
        handle = packet.get_string()
        offset = packet.get_uint64()
        data = packet.get_string()
        # No check_end(): trailing bytes after the data are ignored, as OpenSSH does.
        file_obj = self._file_handles.get(handle)
        if not file_obj:
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        return self._server.write(file_obj, offset, data)

    async def _process_limits(self, packet: SSHPacket) -> SFTPLimits:
        packet.check_end()
        return SFTPLimits(MAX_PACKET, MAX_READ, MAX_WRITE, 4096)

    async def _process_check_file_name(self, packet: SSHPacket) -> bytes:
        req = hashing.parse_check_file(packet, by_handle=False)
        fd = self._server.jail.open_regular(req.target, os.O_RDONLY)
        try:
            return ExtendedReply(await hashing.answer_check_file(fd, req))
        finally:
            os.close(fd)

    async def _process_check_file_handle(self, packet: SSHPacket) -> bytes:
        req = hashing.parse_check_file(packet, by_handle=True)
        file_obj = self._file_handles.get(req.target)
        if not isinstance(file_obj, OpenFile):
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        return ExtendedReply(await hashing.answer_check_file(file_obj.fd, req))

    _packet_handlers = dict(SFTPServerHandler._packet_handlers)
    _packet_handlers.pop(b"ranges@asyncssh.com", None)
    _packet_handlers.update({
        FXP_WRITE: _process_write,
        b"limits@openssh.com": _process_limits,
        b"check-file-name": _process_check_file_name,
        b"check-file-handle": _process_check_file_handle,
        b"users-groups-by-id@openssh.com": _process_users_groups_by_id,
    })
