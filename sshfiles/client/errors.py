"""Client errors as one-line messages with documented exit codes.

Why: a user error (wrong path, full quota, changed host key) must end in one clear line and a
distinct exit status that scripts can test, never in a traceback. Every failure the client expects is
turned into a ``ClientError`` here, in one place; only genuine bugs escape as tracebacks.

Exit codes (also shown by ``sshfiles-cli --help``):

====  ==========================================================
0     success
1     any other error (a remote operation failed, bad local file)
2     usage error (bad option or argument; click's default)
3     could not connect or authenticate
4     the server's host key does not match the known-hosts file
5     no such file or directory, or permission denied
6     quota exceeded or no space left on the server
7     verification failed: local and server sha256 differ
====  ==========================================================
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import asyncssh

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_HOSTKEY = 4
EXIT_NOT_FOUND = 5
EXIT_QUOTA = 6
EXIT_VERIFY = 7

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  other error (a remote operation failed)
  2  usage error
  3  could not connect or authenticate
  4  host key changed (does not match the known-hosts file)
  5  no such file or directory / permission denied
  6  quota exceeded / no space left on the server
  7  verification failed (sha256 differs)"""


class ClientError(Exception):
    """A failure to report as one line on stderr and an exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class HostKeyChanged(ClientError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_HOSTKEY)


class VerifyError(ClientError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_VERIFY)


_SFTP_CODES = {
    asyncssh.FX_NO_SUCH_FILE: EXIT_NOT_FOUND,
    asyncssh.FX_PERMISSION_DENIED: EXIT_NOT_FOUND,
    asyncssh.FX_NO_SUCH_PATH: EXIT_NOT_FOUND,
    asyncssh.FX_QUOTA_EXCEEDED: EXIT_QUOTA,
    asyncssh.FX_NO_SPACE_ON_FILESYSTEM: EXIT_QUOTA,
}


def _is_quota_text(reason: str) -> bool:
    low = reason.lower()
    return "quota" in low or "no space" in low


def from_sftp_error(exc: asyncssh.SFTPError, what: str) -> ClientError:
    """Map an SFTP status to a ClientError whose text is ``what: <server's reason>``.

    The server's own reason text is kept because it carries the numbers (e.g. how much of the quota is
    used); servers speaking SFTP v3 send quota errors as plain FAILURE, so the text decides then.
    """
    reason = (exc.reason or "").strip() or type(exc).__name__
    code = _SFTP_CODES.get(exc.code, EXIT_ERROR)
    if code == EXIT_ERROR and _is_quota_text(reason):
        code = EXIT_QUOTA
    if exc.code == asyncssh.FX_NO_SUCH_FILE and reason.lower() in ("no such file", ""):
        reason = "No such file or directory"
    return ClientError(f"{what}: {reason}", code)


def from_os_error(exc: OSError, what: str) -> ClientError:
    """Map a local filesystem error to a ClientError naming the local path the user gave."""
    code = EXIT_NOT_FOUND if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                                           errno.EISDIR) else EXIT_ERROR
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        code = EXIT_QUOTA
    return ClientError(f"{what}: {exc.strerror or exc}", code)


@contextmanager
def local_errors(path: str) -> Iterator[None]:
    """Turn an OSError of a local file operation (disk full, I/O error) into the one-line error naming
    ``path``, so it is reported as that file's failure and not as a lost connection or a traceback."""
    try:
        yield
    except OSError as exc:
        raise from_os_error(exc, path) from None
