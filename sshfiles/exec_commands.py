"""The few exec commands sshfiles answers itself: ``*sum`` hashes, ``echo``, ``pwd`` and ``cd``.

Why: rclone's sftp backend (and SFTPGo users' scripts) verify transfers by running ``md5sum PATH`` /
``sha1sum PATH`` over an SSH exec channel. A jailed SFTP server must never start a shell, so we
parse the command line ourselves with ``shlex`` (rclone backslash-escapes paths for a POSIX shell),
answer the handful of commands that matter, and refuse everything else with one clear line.

What rclone 1.60 sends, and how it is answered here:

* ``echo ${ShellId}%ComSpec%`` -- shell-type detection; a POSIX shell prints ``%ComSpec%``, which makes
  rclone pick the "unix" shell type. We expand every ``$VAR``/``${VAR}`` to nothing, like a shell
  with an empty environment.
* ``md5sum`` / ``sha1sum`` with no argument -- hash-command detection; rclone expects the digest of
  empty input (it sends no stdin). We hash stdin when the caller gives us a reader, else empty input.
* ``md5sum /abs/path`` -- the actual hash, printed as coreutils does: ``<hex>  <path>\\n``.

Paths are the user's visible paths; ``files_of`` (the user's session) resolves them in the
user's jail and returns a read-only fd or raises OSError. Error messages only ever show the path the
user typed, never a host path.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
from typing import Protocol

from asyncssh import SSHReader, SSHWriter

from .hashing import HashBusy, HashCancelled, HashTooLarge, hash_fd_range_async

__all__ = ["SUM_COMMANDS", "CommandRefused", "parse_command", "run_exec"]

#: exec command name -> hashing.ALGORITHMS name
SUM_COMMANDS: dict[str, str] = {
    "md5sum": "md5",
    "sha1sum": "sha1",
    "sha224sum": "sha224",
    "sha256sum": "sha256",
    "sha384sum": "sha384",
    "sha512sum": "sha512",
}

_SHELL_OPERATORS = set("();<>|&")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\$[0-9#?*@$!-]")

class FileOpener(Protocol):
    """What the hash commands need from the user's session: a read-only fd of a jailed path and its close."""

    def open_for_hash(self, path: bytes | str) -> int: ...
    def close_fd(self, fd: int) -> None: ...


class CommandRefused(Exception):
    """The command line is not one we run (unknown program or shell syntax)."""


def parse_command(command: str) -> list[str]:
    """Split a command line like a POSIX shell would, refusing anything that needs a real shell.

    Quoting and backslash escapes are honoured (rclone escapes paths that way). Operators such as
    ``;``, ``|``, ``&&``, redirections and command substitution are refused rather than ignored, so
    that ``md5sum a; rm b`` can never be half-run.
    """
    if "`" in command or "$(" in command:
        raise CommandRefused("command substitution is not supported")
    lexer = shlex.shlex(command, posix=True, punctuation_chars="();<>|&")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as exc:  # unbalanced quotes
        raise CommandRefused(f"cannot parse command: {exc}") from None
    for token in tokens:
        if token and set(token) <= _SHELL_OPERATORS:
            raise CommandRefused(f"shell operator {token!r} is not supported")
    return tokens


def _emit(writer: SSHWriter, data: bytes) -> None:
    """Write bytes whatever encoding the channel was opened with (the server picks)."""
    encoding, errors = writer.channel.get_encoding()
    if encoding is None:
        writer.write(data)
    else:
        writer.write(data.decode(encoding, errors="surrogateescape" if errors == "strict" else errors))


def _coreutils_name(name: str) -> tuple[str, str]:
    """Return (prefix, escaped name) the way GNU coreutils prints names with \\ or newline."""
    if "\\" in name or "\n" in name or "\r" in name:
        return "\\", name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return "", name


def _strerror(exc: OSError) -> str:
    return exc.strerror or os.strerror(exc.errno or errno.EIO)


async def _hash_stdin(stdin: SSHReader | None, algorithm: str) -> bytes:
    import hashlib

    hasher = hashlib.new(algorithm)
    if stdin is not None:
        while True:
            chunk = await stdin.read(65536)
            if not chunk:
                break
            hasher.update(chunk if isinstance(chunk, bytes) else chunk.encode())
    return hasher.digest()


async def _run_sum(prog: str, args: list[str], files_of: FileOpener, stdout: SSHWriter,
                   stderr: SSHWriter, stdin: SSHReader | None) -> int:
    algorithm = SUM_COMMANDS[prog]
    files: list[str] = []
    options_done = False
    for arg in args:
        if not options_done and arg == "--":
            options_done = True
        elif not options_done and arg.startswith("-") and arg != "-":
            # -b/-t only change text/binary mode, which is the same on POSIX; the rest we don't do.
            if arg in ("-b", "--binary", "-t", "--text"):
                continue
            _emit(stderr, f"{prog}: unsupported option: {arg}\n".encode(errors="surrogateescape"))
            return 1
        else:
            files.append(arg)
    if not files:
        files = ["-"]

    status = 0
    for name in files:
        if name == "-":
            digest = await _hash_stdin(stdin, algorithm)
        else:
            try:
                fd = files_of.open_for_hash(os.fsencode(name))
            except OSError as exc:
                _emit(stderr, f"{prog}: {name}: {_strerror(exc)}\n".encode(errors="surrogateescape"))
                status = 1
                continue
            # hash_fd_range_async returns (or raises, cancelled included) only once its thread has
            # stopped reading, so the fd is closed after the last pread, never under it: a file
            # opened later may reuse the number.
            try:
                digest = (await hash_fd_range_async(fd, algorithm, owner=getattr(files_of, "username", ""),
                                                    closed=stdout.channel.wait_closed()))[0]
            except OSError as exc:  # EISDIR for a directory, EIO, ...
                _emit(stderr, f"{prog}: {name}: {_strerror(exc)}\n".encode(errors="surrogateescape"))
                status = 1
                continue
            except (HashTooLarge, HashBusy) as exc:
                _emit(stderr, f"{prog}: {name}: {exc}\n".encode(errors="surrogateescape"))
                status = 1
                continue
            except HashCancelled:
                return 1  # the client left (or the channel closed): nobody reads the rest
            finally:
                files_of.close_fd(fd)
        prefix, shown = _coreutils_name(name)
        _emit(stdout, f"{prefix}{digest.hex()}  {shown}\n".encode(errors="surrogateescape"))
    return status


async def run_exec(command: str, files_of: FileOpener, stdout: SSHWriter, stderr: SSHWriter,
                   stdin: SSHReader | None = None) -> int:
    """Run one exec request without a shell and return its exit status.

    ``files_of.open_for_hash(path_bytes)`` resolves a user-visible path inside the user's jail and
    returns a read-only fd (which this function hands back to ``files_of.close_fd``) or raises
    OSError. ``stdin`` is optional: only a bare ``md5sum``/``sha1sum`` reads it; without it, stdin
    counts as empty, which is what rclone's probe expects. Anything we do not answer is refused on
    stderr with exit status 1.
    """
    try:
        argv = parse_command(command)
    except CommandRefused as exc:
        _emit(stderr, f"sshfiles: command not allowed: {exc}\n".encode(errors="surrogateescape"))
        return 1
    if not argv:
        _emit(stderr, b"sshfiles: no shell access; exec one of: "
              + " ".join(sorted([*SUM_COMMANDS, "echo", "pwd", "cd"])).encode() + b"\n")
        return 1

    prog, args = argv[0], argv[1:]
    if prog in SUM_COMMANDS:
        return await _run_sum(prog, args, files_of, stdout, stderr, stdin)
    if prog == "echo":
        words = [_VARIABLE.sub("", a) for a in args]
        newline = True
        if words and words[0] == "-n":
            newline, words = False, words[1:]
        _emit(stdout, (" ".join(words) + ("\n" if newline else "")).encode(errors="surrogateescape"))
        return 0
    if prog == "pwd":
        _emit(stdout, b"/\n")  # every session starts at the root of its own jail
        return 0
    if prog in ("cd", "true", ":"):
        return 0  # no shell, so no state to change: harmless no-ops some clients send

    shown = command if len(command) <= 80 else command[:77] + "..."
    _emit(stderr, f"sshfiles: command not allowed: {shown}\n".encode(errors="surrogateescape"))
    return 1
