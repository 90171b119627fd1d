"""The SFTP protocol adapter: each verb translated into a call on the user's session.

`JailedSFTPServer` is the `asyncssh.SFTPServer` for one channel.  It holds no
rule of its own: paths, quotas and entries are the `UserSession`'s business
(session.py), which raises `OSError`s that asyncssh maps to SFTP statuses,
with ``strerror`` only (no file names), so no host path can appear in a reply.
What stays here is protocol: flag and attribute translation, statvfs
encoding, and telling OpenSSH's clients why a write was refused (they print
the channel's stderr but not a v3 status message).

`SshfilesSFTPHandler` adjusts asyncssh's protocol handler where a stock
client needs it (see its docstring).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import stat
from collections.abc import AsyncIterator, Callable

import asyncssh
from asyncssh import (
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_WRITE,
    SFTPAttrs,
    SFTPLimits,
    SFTPName,
    SFTPVFSAttrs,
)

from . import __version__, checkfile
from .asyncssh_seam import ExtendedReply, SFTPServerHandlerBase, SSHPacket, String, UInt64
from .session import DIR_BATCH, HANDLE_LIMITS, MAX_READ, DirHandle, FileHandle, SpaceInfo, UserSession

__all__ = ["MAX_READ", "MAX_WRITE", "DirListing", "ExtendedReply", "JailedSFTPServer", "SshfilesSFTPHandler"]

MAX_WRITE = 256 * 1024
MAX_PACKET = MAX_WRITE + 1024


def _attrs(st: os.stat_result) -> SFTPAttrs:
    return SFTPAttrs.from_local(st)


def _times(attrs: SFTPAttrs) -> tuple[float, float] | None:
    """SFTP v3 sets access and modification times together (both present) or not at all."""
    if attrs.atime is not None and attrs.mtime is not None:
        return (attrs.atime, attrs.mtime)
    return None


def _handle(file_obj: object) -> FileHandle:
    """asyncssh passes back whatever `open` returned: always one of our handles."""
    if not isinstance(file_obj, FileHandle):
        raise asyncssh.SFTPInvalidHandle("Invalid file handle")
    return file_obj


class DirListing(AsyncIterator[SFTPName]):
    """An SFTP directory handle: asyncssh pulls names for each READDIR (up to 128 per reply), we
    read them from the directory `DIR_BATCH` at a time, so no listing is ever held whole: a
    directory of 100,000 entries costs one batch of memory per handle and one batch of lstats per
    READDIR on the loop, never one long stall at opendir."""

    def __init__(self, d: DirHandle) -> None:
        self._dir = d
        self._batch: list[SFTPName] = []

    def __aiter__(self) -> DirListing:
        return self

    async def __anext__(self) -> SFTPName:
        if not self._batch:
            self._batch = [SFTPName(name, attrs=_attrs(st)) for name, st in self._dir.read(DIR_BATCH)]
            self._batch.reverse()
            if not self._batch:
                raise StopAsyncIteration
        return self._batch.pop()

    async def aclose(self) -> None:
        """CLOSE of the handle, or the end of the session (asyncssh_seam item 4b)."""
        self._batch = []
        self._dir.close()


class JailedSFTPServer(asyncssh.SFTPServer):
    """One channel's SFTP (and SCP) verbs, each a call on the user's session."""

    def __init__(self, chan: asyncssh.SSHServerChannel, session: UserSession,
                 input_ended: Callable[[], bool] | None = None) -> None:
        super().__init__(chan)
        self.session = session
        self.user = session.username
        # SCP only: whether the client's input ended (EOF): a file closed then was cut short.
        self._input_ended = input_ended

    # -- names ----------------------------------------------------------------

    def format_user(self, uid: int | None) -> str:
        return self.user

    def format_group(self, gid: int | None) -> str:
        return self.user

    def realpath(self, path: bytes) -> bytes:
        return self.session.realpath(path).encode("utf-8", "surrogateescape")

    # -- files ----------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> FileHandle:
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
        perms = 0o666 if attrs.permissions is None else stat.S_IMODE(attrs.permissions)
        try:
            return await self.session.open(path, flags, bool(pflags & FXF_TRUNC), bool(pflags & FXF_APPEND), perms)
        except OSError as exc:
            self._notify(exc)
            raise

    async def close(self, file_obj: object) -> None:
        f = _handle(file_obj)
        if self.channel.is_closing() or (self._input_ended is not None and self._input_ended()):
            # asyncssh's SCP closes its file in a `finally` also when the client's data stopped
            # mid-file (EOF: a killed scp's ssh sends one; or the connection dropped). A complete
            # file is followed by its status byte, still unread here, so EOF now means cut short.
            f.interrupted = True
        await _closed(self.session.close_file(f))

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        return self.session.read(_handle(file_obj), offset, size)

    async def write(self, file_obj: object, offset: int, data: bytes | memoryview) -> int:
        f = _handle(file_obj)
        first = f.failed is None
        try:
            return await self.session.write(f, offset, data)
        except OSError as exc:
            if first:  # once per handle: a pipelined upload has many refused writes
                self._notify(exc)
            raise

    def _notify(self, exc: OSError) -> None:
        """Say why a quota refused on the channel's stderr too: OpenSSH's sftp and scp print
        that, but show only 'Failure' for a v3 status (they never print its message)."""
        if exc.errno != errno.EDQUOT:
            return
        chan = self.channel
        if chan.get_subsystem() == "sftp":
            try:
                chan.write_stderr(f"sshfiles: {exc.strerror}\n".encode())
            except OSError:
                pass

    def fstat(self, file_obj: object) -> SFTPAttrs:
        return _attrs(self.session.fstat(_handle(file_obj)))

    async def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        f = _handle(file_obj)
        try:
            await self.session.fsetstat(f, size=attrs.size, mode=attrs.permissions, times=_times(attrs))
        except OSError as exc:
            self._notify(exc)
            raise

    def fsync(self, file_obj: object) -> None:
        self.session.fsync(_handle(file_obj))

    # -- metadata by path ---------------------------------------------------

    def lstat(self, path: bytes) -> SFTPAttrs:
        return _attrs(self.session.stat(path, follow=False))

    def stat(self, path: bytes) -> SFTPAttrs:
        return _attrs(self.session.stat(path, follow=True))

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._setstat(path, attrs, follow=True)

    async def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._setstat(path, attrs, follow=False)

    async def _setstat(self, path: bytes, attrs: SFTPAttrs, follow: bool) -> None:
        try:
            await self.session.setstat(path, size=attrs.size, mode=attrs.permissions, times=_times(attrs),
                                       follow=follow)
        except OSError as exc:
            self._notify(exc)
            raise

    async def statvfs(self, path: bytes) -> SFTPVFSAttrs:
        self.session.stat(path)  # a missing path is an error, as for OpenSSH
        return await self._vfs(await self.session.space(path))

    async def fstatvfs(self, file_obj: object) -> SFTPVFSAttrs:
        return await self._vfs(await self.session.space(f=file_obj if isinstance(file_obj, FileHandle) else None))

    async def _vfs(self, space: SpaceInfo) -> SFTPVFSAttrs:
        """The quota as a filesystem: size = quota, used = usage, free = the rest.

        Blocks are 1 byte, and f_bsize == f_frsize == 1: the counts are then
        exact byte counts whichever field a client multiplies them by
        (OpenSSH's df uses f_frsize as POSIX says; WinSCP uses f_bsize, and
        showed 256 TiB for a 1 GiB quota when f_bsize was 256 KiB).  The
        entry quota shows as the inode counts (`df -i`).
        """
        fsv = space.fs
        files, ffree, favail = fsv.f_files, fsv.f_ffree, fsv.f_favail
        if space.entry_limit is not None:
            room = max(0, space.entry_limit - space.entries)
            files, ffree, favail = space.entry_limit, min(ffree, room), min(favail, room)
        if space.quota is None:
            attrs = SFTPVFSAttrs.from_local(fsv)
            attrs.files, attrs.ffree, attrs.favail = files, ffree, favail
            attrs.bsize = attrs.frsize  # the same rule for every client, as above
            return attrs
        free = max(0, space.quota - space.used)
        disk_free = fsv.f_bavail * fsv.f_frsize
        return SFTPVFSAttrs(bsize=1, frsize=1, blocks=space.quota, bfree=min(free, disk_free),
                            bavail=min(free, disk_free), files=files, ffree=ffree,
                            favail=favail, fsid=0, flags=0, namemax=fsv.f_namemax)

    # -- directories and names ------------------------------------------------

    def scandir(self, path: bytes) -> DirListing:
        # The directory is opened now (a missing one fails at opendir); entries are read per READDIR.
        return DirListing(self.session.opendir(path))

    async def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        try:
            await self.session.mkdir(path, 0o777 if attrs.permissions is None else stat.S_IMODE(attrs.permissions))
        except OSError as exc:
            self._notify(exc)
            raise

    def rmdir(self, path: bytes) -> None:
        self.session.rmdir(path)

    async def remove(self, path: bytes) -> None:
        await _closed(self.session.remove(path))

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self.session.rename(oldpath, newpath)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await _closed(self.session.posix_rename(oldpath, newpath))

    def readlink(self, path: bytes) -> bytes:
        return self.session.readlink(path)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPOpUnsupported(self.session.refuse_link("symlink", oldpath, newpath))

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPOpUnsupported(self.session.refuse_link("link", oldpath, newpath))

    def exit(self) -> None:
        self.session.close()


# -- protocol requests beyond asyncssh's, and its adjustments ---------------------------------


async def _closed(pending: concurrent.futures.Future[None] | None) -> None:
    """Wait for a big file's close that the session left running on a bulk thread (CLOSE, or the
    last close of a removed or replaced file): the reply goes once it is done, as it did when the
    close ran on the event loop. Shielded: a cancelled wait must not cancel the close itself (the
    descriptor would stay open for good)."""
    if pending is not None:
        await asyncio.shield(asyncio.wrap_future(pending))


def _server_of(handler: SFTPServerHandlerBase) -> JailedSFTPServer:
    server = handler.server
    assert isinstance(server, JailedSFTPServer)
    return server


async def _write(handler: SFTPServerHandlerBase, packet: SSHPacket) -> int:
    """WRITE that ignores bytes after the data, as OpenSSH does (rclone 1.60's pkg/sftp sends a
    stale buffer tail; asyncssh answers BAD_MESSAGE).

    The packet may be a view of the channel's received data (asyncssh_seam item 3h): the data
    then reaches ``pwrite`` without a copy, and the handle is made ``bytes`` to look it up."""
    handle = bytes(packet.get_string())
    offset = packet.get_uint64()
    data: bytes | memoryview = packet.get_string()
    file_obj = handler.file_handle(handle)
    if not file_obj:
        raise asyncssh.SFTPInvalidHandle("Invalid file handle")
    return await _server_of(handler).write(file_obj, offset, data)


async def _limits(handler: SFTPServerHandlerBase, packet: SSHPacket) -> SFTPLimits:
    """limits@openssh.com with OpenSSH's 256 KiB read/write sizes and the handles a session may open."""
    packet.check_end()
    return SFTPLimits(MAX_PACKET, MAX_READ, MAX_WRITE, HANDLE_LIMITS.per_session)


async def _copy_data(handler: SFTPServerHandlerBase, packet: SSHPacket) -> None:
    """copy-data (draft-ietf-secsh-filexfer-extensions), chunked off the loop by the session
    (`UserSession.copy_data`) instead of asyncssh's copy, which ran to completion on the loop."""
    src_handle = packet.get_string()
    src_offset = packet.get_uint64()
    length = packet.get_uint64()
    dst_handle = packet.get_string()
    dst_offset = packet.get_uint64()
    packet.check_end()
    src = handler.file_handle(src_handle)
    dst = handler.file_handle(dst_handle)
    if not isinstance(src, FileHandle) or not isinstance(dst, FileHandle):
        raise asyncssh.SFTPInvalidHandle("Invalid file handle")
    server = _server_of(handler)
    chan = server.channel
    try:
        await server.session.copy_data(src, src_offset, length, dst, dst_offset, stop=chan.is_closing)
    except OSError as exc:
        server._notify(exc)
        raise


#: A users-groups-by-id reply must fit the max packet we advertise (limits@openssh.com).
_REPLY_ROOM = MAX_PACKET - 64


async def _users_groups_by_id(handler: SFTPServerHandlerBase, packet: SSHPacket) -> ExtendedReply:
    """OpenSSH's id -> name lookup (sftp's `ls -l FILE`): every id is shown as the account.

    A request whose reply would not fit in the max packet we advertise is refused (FAILURE) before
    anything is built: OpenSSH's sftp asks for the ids of one listing, a few at a time.
    """
    uids = packet.get_string()
    gids = packet.get_string()
    packet.check_end()
    if len(uids) % 4 or len(gids) % 4:
        raise asyncssh.SFTPBadMessage("id lists must be uint32 arrays")
    name = String(_server_of(handler).user)
    count = len(uids) // 4 + len(gids) // 4
    if 8 + count * len(name) > _REPLY_ROOM:
        raise asyncssh.SFTPFailure(f"too many ids: the reply would exceed the maximum packet size ({MAX_PACKET})")
    return ExtendedReply(String(name * (len(uids) // 4)) + String(name * (len(gids) // 4)))


async def _check_file_name(handler: SFTPServerHandlerBase, packet: SSHPacket) -> ExtendedReply:
    req = checkfile.parse_check_file(packet, by_handle=False)
    session = _server_of(handler).session
    fd = session.open_for_hash(req.target)
    try:
        return ExtendedReply(await checkfile.answer_check_file(fd, req, owner=session.username,
                                                               closed=handler.server.channel.wait_closed()))
    finally:
        session.close_fd(fd)


async def _check_file_handle(handler: SFTPServerHandlerBase, packet: SSHPacket) -> ExtendedReply:
    req = checkfile.parse_check_file(packet, by_handle=True)
    file_obj = handler.file_handle(req.target)
    if not isinstance(file_obj, FileHandle):
        raise asyncssh.SFTPInvalidHandle("Invalid file handle")
    server = _server_of(handler)
    fd = server.session.fd_for_hash(file_obj)
    return ExtendedReply(await checkfile.answer_check_file(fd, req, owner=server.user,
                                                           closed=server.channel.wait_closed()))


class SshfilesSFTPHandler(SFTPServerHandlerBase):
    """asyncssh's SFTP server protocol handler, adjusted for stock clients (see each request above).

    ranges@asyncssh.com is not offered (it needs asyncssh's own file objects), nor
    hardlink@openssh.com (hard links are refused).
    """

    DROP_EXTENSIONS = (b"ranges@asyncssh.com", b"hardlink@openssh.com", b"vendor-id")
    EXTENSIONS = (
        (b"vendor-id", String("sshfiles") + String("sshfiles") + String(__version__) + UInt64(0)),
        checkfile.CHECK_FILE_EXTENSION,
        (b"users-groups-by-id@openssh.com", b"1"),
    )
    EXTENDED_REPLIES = (b"check-file-name", b"check-file-handle", b"users-groups-by-id@openssh.com")
    ZERO_COPY_WRITE = True  # `_write` takes its data as a view (asyncssh_seam item 3h)
    REQUESTS = {  # noqa: RUF012 (read once, by SFTPServerHandlerBase.__init_subclass__)
        FXP_WRITE: _write,
        b"limits@openssh.com": _limits,
        b"check-file-name": _check_file_name,
        b"check-file-handle": _check_file_handle,
        b"users-groups-by-id@openssh.com": _users_groups_by_id,
        b"copy-data": _copy_data,
    }

    def on_cleanup(self, exc: Exception | None, handles_left_open: bool) -> None:
        # Handles still open here were never CLOSEd (client vanished, or the server cut the
        # connection): asyncssh closes them now, and their transfers are logged as interrupted.
        if handles_left_open:
            _server_of(self).session.interrupted = True
