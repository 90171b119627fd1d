"""A connected SFTP session driven from synchronous code (the click commands and the shell).

Why a private event loop instead of ``asyncio.run`` per command: the interactive shell keeps one
connection open across many commands, and click commands are synchronous. A ``RemoteSession`` owns a loop,
connects once, and runs each command's coroutine to completion on it; one-shot commands open a session,
run, and close it. Remote paths are resolved against the shell's working directory here.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncssh

from .connect import ConnectOptions, connect
from .errors import EXIT_CONNECT, ClientError, from_os_error

T = TypeVar("T")


class RemoteSession:
    """One SSH connection and SFTP client, with its own event loop."""

    def __init__(self, opts: ConnectOptions) -> None:
        self.opts = opts
        self.loop = asyncio.new_event_loop()
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None
        self.cwd: str | None = None  # None: the server's start directory (the user's home)

    def __enter__(self) -> RemoteSession:
        try:
            self.conn = self.loop.run_until_complete(connect(self.opts))
            self.sftp = self.loop.run_until_complete(self.conn.start_sftp_client())
        except asyncssh.Error as exc:
            self.close()
            raise ClientError(f"cannot start SFTP on {self.opts.host}: {exc.reason}", EXIT_CONNECT) from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, fn: Callable[[asyncssh.SFTPClient], Awaitable[T]]) -> T:
        """Run ``fn(sftp)`` to completion; a lost connection becomes a one-line ClientError."""
        assert self.sftp is not None
        try:
            return self.loop.run_until_complete(fn(self.sftp))
        except (asyncssh.ConnectionLost, asyncssh.DisconnectError) as exc:
            raise ClientError(f"connection lost: {exc.reason}", EXIT_CONNECT) from None
        except asyncssh.SFTPConnectionLost as exc:
            raise ClientError(f"connection lost: {exc.reason}", EXIT_CONNECT) from None
        except (ConnectionError, TimeoutError) as exc:
            # The socket itself failed (the server stopped mid-transfer: reset, broken pipe);
            # asyncssh raises the OSError as it came from the transport.
            raise ClientError(f"connection lost: {exc.strerror or exc}", EXIT_CONNECT) from None
        except OSError as exc:
            # A local file operation that no command turned into its own message.
            raise from_os_error(exc, exc.filename or "local file") from None

    def resolve(self, path: str) -> str:
        """A remote path relative to the shell's working directory (absolute paths unchanged)."""
        if self.cwd is None or path.startswith("/"):
            return path
        joined = posixpath.normpath(posixpath.join(self.cwd, path))
        # a trailing "/" says "a directory" (put's destination): normpath must not drop it
        return joined + "/" if path.endswith("/") and not joined.endswith("/") else joined

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            if self.sftp is not None:
                self.sftp.exit()
            if self.conn is not None:
                self.conn.close()
                self.loop.run_until_complete(self.conn.wait_closed())
            # let cancelled tasks (e.g. after Ctrl-C) finish so nothing is left pending
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except Exception:  # closing must never mask the real error
            pass
        finally:
            self.loop.close()
