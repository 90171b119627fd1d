"""A throwaway in-process asyncssh SFTP server for the client and hashing tests.

Why: the client needs a real server that answers ``check-file`` and ``*sum`` exec requests, and these
tests must not depend on the production server's wiring. This is plain asyncssh (chroot'ed
``SFTPServer``) plus sshfiles.hashing / sshfiles.exec_commands, with an optional byte quota so the
"quota exceeded mid-upload" path can be exercised. It listens on 127.0.0.1 on a free port and runs its
event loop in a daemon thread so subprocess clients (which we SIGKILL) can talk to it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import asyncssh
from asyncssh.constants import FXP_EXTENDED_REPLY
from asyncssh.sftp import SFTPServerHandler
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

from sshfiles.exec_commands import run_exec
from sshfiles.hashing import CHECK_FILE_EXTENSION, CheckFileReply, answer_check_file, parse_check_file


class CheckFileHandler(SFTPServerHandler):
    """asyncssh's SFTP server handler plus check-file-handle / check-file-name."""

    _extensions = SFTPServerHandler._extensions + [CHECK_FILE_EXTENSION]
    _return_types = {**SFTPServerHandler._return_types,
                     b"check-file-handle": FXP_EXTENDED_REPLY,
                     b"check-file-name": FXP_EXTENDED_REPLY}

    async def _process_check_file_handle(self, packet):
        req = parse_check_file(packet, by_handle=True)
        file_obj = self._file_handles.get(req.target)
        if file_obj is None:
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        return CheckFileReply(await answer_check_file(file_obj.fileno(), req))

    async def _process_check_file_name(self, packet):
        req = parse_check_file(packet, by_handle=False)
        fd = os.open(self._server.map_path(req.target), os.O_RDONLY)
        try:
            return CheckFileReply(await answer_check_file(fd, req))
        finally:
            os.close(fd)

    _packet_handlers = {**SFTPServerHandler._packet_handlers,
                        b"check-file-handle": _process_check_file_handle,
                        b"check-file-name": _process_check_file_name}


class QuotaSFTPServer(asyncssh.SFTPServer):
    """Chrooted SFTP server that refuses writes growing the home past ``quota`` bytes."""

    def __init__(self, chan, root: Path, quota: Optional[int]):
        super().__init__(chan, chroot=os.fsencode(root))
        self._root = root
        self._quota = quota

    def _usage(self) -> int:
        return sum(p.stat().st_size for p in self._root.rglob("*") if p.is_file())

    def write(self, file_obj, offset, data):
        if self._quota is not None:
            size = os.fstat(file_obj.fileno()).st_size
            growth = max(0, offset + len(data) - size)
            used = self._usage()
            if growth and used + growth > self._quota:
                raise asyncssh.SFTPQuotaExceeded(
                    f"Quota exceeded: {used} of {self._quota} bytes used, "
                    f"write needs {growth} more")
        return super().write(file_obj, offset, data)


@dataclass
class MiniServer:
    """Handle on the running server: where it listens, whose home is where."""

    host: str
    port: int
    home: Path
    user: str
    password: str
    host_key: asyncssh.SSHKey
    quota: Optional[int] = None
    _loop: asyncio.AbstractEventLoop = field(repr=False, default=None)
    _thread: threading.Thread = field(repr=False, default=None)
    _acceptor: object = field(repr=False, default=None)

    def stop(self) -> None:
        async def _close():
            self._acceptor.close()
            await self._acceptor.wait_closed()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def start_server(home: Path, user: str = "alice", password: str = "s3cret-pass",
                 quota: Optional[int] = None, host_key: Optional[asyncssh.SSHKey] = None,
                 port: int = 0) -> MiniServer:
    """Start the server in a daemon thread and return once it is listening."""
    home.mkdir(parents=True, exist_ok=True)
    key = host_key or asyncssh.generate_private_key("ssh-ed25519")
    info = MiniServer("127.0.0.1", 0, home, user, password, key, quota)

    class Auth(asyncssh.SSHServer):
        def begin_auth(self, username):
            return True

        def password_auth_supported(self):
            return True

        def validate_password(self, username, pw):
            return username == user and pw == password

        def session_requested(self):
            return Session()

    def open_file(vpath: bytes) -> int:
        root = os.path.realpath(home)
        rel = vpath.lstrip(b"/").decode(errors="surrogateescape")
        target = os.path.realpath(os.path.join(root, rel))
        if target != root and not target.startswith(root + os.sep):
            raise OSError(errno.ENOENT, "No such file or directory")
        return os.open(target, os.O_RDONLY)

    async def exec_session(stdin, stdout, stderr) -> None:
        chan = stdin.channel
        command = chan.get_command()
        if not command:
            stderr.write(b"sshfiles: no shell access\n")
            chan.exit(1)
            return
        chan.exit(await run_exec(command, open_file, stdout, stderr, stdin))

    class Session(SSHServerStreamSession):
        """Stream session whose SFTP subsystem runs CheckFileHandler."""

        def __init__(self) -> None:
            super().__init__(exec_session, lambda chan: None)

        def session_started(self) -> None:
            if self._chan.get_subsystem() != "sftp":
                return super().session_started()
            self._chan.set_encoding(None)
            self._encoding = None
            stdin, stdout = SSHReader(self, self._chan), SSHWriter(self, self._chan)
            handler = CheckFileHandler(QuotaSFTPServer(self._chan, home, info.quota), stdin, stdout, 3)

            async def run() -> None:
                await handler.run()
                self._chan.exit(0)

            self._conn.create_task(run(), stdin.logger)

    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def _start():
        acceptor = await asyncssh.create_server(
            Auth, "127.0.0.1", port, server_host_keys=[key], encoding=None)
        info._acceptor = acceptor
        info.port = acceptor.sockets[0].getsockname()[1]
        ready.set()

    def _run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(_start())
        loop.run_forever()

    thread = threading.Thread(target=_run, daemon=True, name="minisftp")
    thread.start()
    if not ready.wait(15):
        raise RuntimeError("test server did not start")
    info._loop, info._thread = loop, thread
    return info
