"""``sshfiles-cli``: the click layer over the client library (connect, transfer, progress).

Why it is thin: every command is a few lines that resolve paths and call library functions
(``transfer.put_file`` ...), so tests can drive the same code without a terminal, and the interactive
``shell`` reuses these very commands (same options, same help) over one open connection.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import stat as statmod
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncssh
import click

from ..asyncssh_seam import install_speedups_from_env
from ..malloc_tuning import DEFAULTS_ENV as MALLOC_DEFAULTS_ENV
from ..malloc_tuning import keep_freed_memory
from .connect import DEFAULT_KNOWN_HOSTS, PASSWORD_ENV, ConnectOptions
from .errors import (
    EXIT_CODES_HELP,
    EXIT_CONNECT,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    ClientError,
    from_os_error,
    from_sftp_error,
)
from .multiconn import (
    AUTO_CONNECTIONS,
    AUTO_MIN_SIZE,
    MAX_CONNECTIONS,
    ConnectionPool,
    get_file_ranged,
    put_file_ranged,
)
from .progress import human, make_progress
from .session import RemoteSession
from .transfer import Job, TransferOptions, plan_get, plan_put, remote_hash, run_jobs

DEFAULT_PORT = 2222
#: -h as well as --help, for the command line and for every command inside ``shell``.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


def _version() -> str:
    """The installed distribution's version (the client imports nothing of the server side)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("sshfiles")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree never installed
        return "unknown"

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
#: A remote path as typed -> the path relative to the shell's working directory.
Resolve = Callable[[str], str]


@dataclass
class State:
    """Global options, and the shell's open session when commands run inside ``shell``."""

    opts: ConnectOptions
    quiet: bool = False
    session: RemoteSession | None = None
    out: Callable[[str], None] = field(default=lambda s: click.echo(s))


def _remote(state: State, fn: Callable[[asyncssh.SFTPClient, Resolve], Awaitable[T]]) -> T:
    """Run ``fn(sftp, resolve)`` on the shell's session, or on a fresh one for a single command."""
    if state.session is not None:
        s = state.session
        return s.run(lambda sftp: fn(sftp, s.resolve))
    with RemoteSession(state.opts) as s:
        return s.run(lambda sftp: fn(sftp, s.resolve))


def _sftp_call(coro_factory: Callable[[], Awaitable[T]], what: str) -> Coroutine[Any, Any, T]:
    """Await an SFTP call, turning its status into a one-line ClientError naming ``what``."""
    async def run() -> T:
        try:
            return await coro_factory()
        except asyncssh.SFTPError as exc:
            raise from_sftp_error(exc, what) from None
    return run()


@click.group(epilog=EXIT_CODES_HELP, context_settings=CONTEXT_SETTINGS)
@click.version_option(_version(), "--version", "-V", prog_name="sshfiles-cli")
@click.option("--host", default="127.0.0.1", envvar="SSHFILES_HOST", show_default=True,
              help="Server to connect to (env SSHFILES_HOST).")
@click.option("--port", "-P", type=int, default=DEFAULT_PORT, envvar="SSHFILES_PORT", show_default=True,
              help="Server port (env SSHFILES_PORT).")
@click.option("-u", "--user", envvar="SSHFILES_USER", help="User name (env SSHFILES_USER; default: login name).")
@click.option("-i", "--identity", multiple=True, type=click.Path(dir_okay=False),
              help="Private key file (repeatable). Without it, ssh-agent and ~/.ssh keys are tried.")
@click.option("--known-hosts", type=click.Path(dir_okay=False, path_type=Path),
              default=str(DEFAULT_KNOWN_HOSTS), show_default=True,
              help="Known-hosts file: unknown hosts are trusted on first use, changed keys refused.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summaries; errors only.")
@click.pass_context
def cli(ctx: click.Context, host: str, port: int, user: str | None, identity: tuple[str, ...],
        known_hosts: Path, quiet: bool) -> None:
    if ctx.obj is None:  # the shell passes its own State with an open session
        ctx.obj = State(ConnectOptions(host=host, port=port, user=user, identities=list(identity),
                                       known_hosts=known_hosts), quiet=quiet)


cli.help = (f"Transfer files to and from an sshfiles server, with automatic verified resume.\n\n"
            f"The password comes from ${PASSWORD_ENV}, else a prompt on a terminal; keys come from -i, "
            f"ssh-agent or ~/.ssh.")

class _Connections(click.ParamType):
    """``--connections``: ``auto`` (kept as 0) or a count from 1 to MAX_CONNECTIONS."""

    name = "K|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return AUTO
        try:
            count = int(value)
        except ValueError:
            count = -1
        if not 1 <= count <= MAX_CONNECTIONS:
            self.fail(f"{value!r} is neither auto nor a count from 1 to {MAX_CONNECTIONS}", param, ctx)
        return count


#: ``--connections auto``: AUTO_CONNECTIONS for files of AUTO_MIN_SIZE or more (multiconn.py)
AUTO = 0
CONNECTIONS = _Connections()


_transfer_options = [
    click.option("-r", "--recursive", is_flag=True, help="Copy directory trees."),
    click.option("-j", "--jobs", type=click.IntRange(1, 32), default=1, show_default=True,
                 help="Files to transfer at once."),
    click.option("-c", "--connections", type=CONNECTIONS, default="auto", show_default=True,
                 help=f"SSH connections per large file (1-{MAX_CONNECTIONS} or auto): each moves a byte range "
                      "(a server with --workers N runs them on different cores); resumable and verified like "
                      "one. Files under K hash blocks (256 KiB or more each) use one. auto: "
                      f"{AUTO_CONNECTIONS} to download a file of {AUTO_MIN_SIZE >> 20} MiB or more, else 1."),
    click.option("--resume/--no-resume", default=True, show_default=True,
                 help="Resume a partial destination when its content matches (checked by hashing)."),
    click.option("--verify/--no-verify", default=True, show_default=True,
                 help="Compare the server's sha256 with the local one after each file."),
    click.option("--mkdir", is_flag=True,
                 help="Create the destination directory (a DEST ending in / or with several sources) if "
                      "missing; without it that is an error, as in OpenSSH's sftp and scp."),
]


def transfer_options(fn: F) -> F:
    for opt in reversed(_transfer_options):
        fn = opt(fn)
    return fn


async def _run_jobs(state: State, sftp: asyncssh.SFTPClient, plan: list[Job], direction: str,
                    opts: TransferOptions, jobs: int, connections: int) -> list[ClientError]:
    """``run_jobs``, over ``connections`` SSH connections per large file when asked (multiconn.py);
    ``AUTO`` asks for AUTO_CONNECTIONS for the downloads of AUTO_MIN_SIZE or more and one
    connection for uploads (a second one paid for downloads only, see multiconn.AUTO_CONNECTIONS)."""
    progress = make_progress(state.quiet)
    min_size = 0
    if connections == AUTO:
        connections, min_size = AUTO_CONNECTIONS, AUTO_MIN_SIZE
        if direction != "get" or not any(job.size >= min_size for job in plan):
            connections = 1
    if connections <= 1:
        return await run_jobs(sftp, plan, direction, opts, progress, jobs)
    pool = ConnectionPool(state.opts, sftp, connections, progress, min_size)
    try:
        return await run_jobs(sftp, plan, direction, opts, progress, jobs,
                              put=partial(put_file_ranged, pool), get=partial(get_file_ranged, pool))
    finally:
        await pool.close()


def _finish(state: State, errors: list[ClientError]) -> int:
    for err in errors:
        click.echo(f"sshfiles-cli: {err}", err=True)
    if not errors:
        return EXIT_OK
    codes = {e.exit_code for e in errors}
    return codes.pop() if len(codes) == 1 else EXIT_ERROR


@cli.command(short_help="Upload LOCAL... [REMOTE], resuming and verifying.")
@transfer_options
@click.argument("paths", nargs=-1, required=True)
@click.pass_obj
def put(state: State, paths: tuple[str, ...], recursive: bool, jobs: int, connections: int,
        resume: bool, verify: bool, mkdir: bool) -> int:
    """Upload LOCAL... [REMOTE] (REMOTE defaults to the current remote directory)."""
    sources, dest = (list(paths[:-1]), paths[-1]) if len(paths) > 1 else (list(paths), ".")
    opts = TransferOptions(resume=resume, verify=verify)

    async def go(sftp: asyncssh.SFTPClient, resolve: Resolve) -> list[ClientError]:
        plan = await plan_put(sftp, sources, resolve(dest), recursive, mkdir)
        return await _run_jobs(state, sftp, plan, "put", opts, jobs, connections)

    return _finish(state, _remote(state, go))


@cli.command(short_help="Download REMOTE... [LOCAL], resuming and verifying.")
@transfer_options
@click.argument("paths", nargs=-1, required=True)
@click.pass_obj
def get(state: State, paths: tuple[str, ...], recursive: bool, jobs: int, connections: int,
        resume: bool, verify: bool, mkdir: bool) -> int:
    """Download REMOTE... [LOCAL] (LOCAL defaults to the current directory)."""
    sources, dest = (list(paths[:-1]), paths[-1]) if len(paths) > 1 else (list(paths), ".")
    opts = TransferOptions(resume=resume, verify=verify)

    async def go(sftp: asyncssh.SFTPClient, resolve: Resolve) -> list[ClientError]:
        plan = await plan_get(sftp, [resolve(s) for s in sources], dest, recursive, mkdir)
        return await _run_jobs(state, sftp, plan, "get", opts, jobs, connections)

    return _finish(state, _remote(state, go))


def _link_count(longname: str | bytes | None) -> str:
    """The link count from a v3 longname (``ls -l``-style text, its second field): SFTP v3 attributes
    carry none, so the server's longname is the only source; "?" without one, as OpenSSH shows."""
    if isinstance(longname, bytes):
        longname = longname.decode(errors="replace")
    fields = (longname or "").split()
    return fields[1] if len(fields) > 1 and fields[1].isdigit() else "?"


def _long_line(name: str, attrs: asyncssh.SFTPAttrs, longname: str | bytes | None = None) -> str:
    mode = statmod.filemode(attrs.permissions or 0)
    mtime = time.strftime("%Y-%m-%d %H:%M", time.localtime(attrs.mtime or 0))
    return f"{mode} {_link_count(longname):>3} {attrs.size or 0:>12} {mtime} {name}"


@cli.command()
@click.option("-l", "long_", is_flag=True, help="Long listing: mode, links, size, time.")
@click.argument("path", default=".")
@click.pass_obj
def ls(state: State, long_: bool, path: str) -> int:
    """List a remote directory (or show one file)."""
    Entry = tuple[str, asyncssh.SFTPAttrs, "str | bytes | None"]

    async def go(sftp: asyncssh.SFTPClient, resolve: Resolve) -> list[Entry]:
        target = resolve(path)
        attrs = await _sftp_call(lambda: sftp.stat(target), path)
        if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
            # a longname comes only with a listing: not worth listing a whole directory for one file
            return [(posixpath.basename(target), attrs, None)]
        names = await _sftp_call(lambda: sftp.readdir(target), path)
        # readdir of a str path yields str names
        return sorted(((cast(str, n.filename), n.attrs, n.longname) for n in names
                       if n.filename not in (".", "..")), key=lambda t: t[0])

    for name, attrs, longname in _remote(state, go):
        is_dir = attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY
        click.echo(_long_line(name, attrs, longname) if long_ else name + ("/" if is_dir else ""))
    return EXIT_OK


@cli.command()
@click.option("-p", "parents", is_flag=True, help="Make parent directories; no error if existing.")
@click.argument("paths", nargs=-1, required=True)
@click.pass_obj
def mkdir(state: State, parents: bool, paths: tuple[str, ...]) -> int:
    """Create remote directories."""
    async def go(sftp: asyncssh.SFTPClient, resolve: Resolve) -> None:
        for p in paths:
            if parents:
                await _sftp_call(partial(sftp.makedirs, resolve(p), exist_ok=True), p)
            else:
                await _sftp_call(partial(sftp.mkdir, resolve(p)), p)
    _remote(state, go)
    return EXIT_OK


@cli.command()
@click.option("-r", "recursive", is_flag=True, help="Remove directories and their contents.")
@click.argument("paths", nargs=-1, required=True)
@click.pass_obj
def rm(state: State, recursive: bool, paths: tuple[str, ...]) -> int:
    """Remove remote files (and trees with -r)."""
    async def go(sftp: asyncssh.SFTPClient, resolve: Resolve) -> None:
        for p in paths:
            target = resolve(p)
            if recursive and await _sftp_call(partial(sftp.isdir, target), p):
                await _sftp_call(partial(sftp.rmtree, target), p)
            else:
                await _sftp_call(partial(sftp.remove, target), p)
    _remote(state, go)
    return EXIT_OK


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.pass_obj
def rmdir(state: State, paths: tuple[str, ...]) -> int:
    """Remove empty remote directories."""
    async def go(sftp: asyncssh.SFTPClient, resolve: Resolve) -> None:
        for p in paths:
            await _sftp_call(partial(sftp.rmdir, resolve(p)), p)
    _remote(state, go)
    return EXIT_OK


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.pass_obj
def mv(state: State, src: str, dst: str) -> int:
    """Rename or move a remote file or directory (into DST if it is a directory)."""
    async def go(sftp: asyncssh.SFTPClient, resolve: Resolve) -> None:
        s, d = resolve(src), resolve(dst)
        if await sftp.isdir(d):
            d = posixpath.join(d, posixpath.basename(posixpath.normpath(s)))
        try:
            await sftp.posix_rename(s, d)
        except asyncssh.SFTPOpUnsupported:
            await _sftp_call(lambda: sftp.rename(s, d), src)
        except asyncssh.SFTPError as exc:
            raise from_sftp_error(exc, src) from None
    _remote(state, go)
    return EXIT_OK


@cli.command()
@click.pass_obj
def df(state: State) -> int:
    """Show the space (quota) available to you on the server."""
    async def go(sftp: asyncssh.SFTPClient, resolve: Resolve) -> asyncssh.SFTPVFSAttrs:
        return await _sftp_call(lambda: sftp.statvfs(resolve(".")), "df")

    v = _remote(state, go)
    total = v.blocks * v.frsize
    avail = v.bavail * v.frsize
    used = total - v.bfree * v.frsize
    pct = f"{100 * used / total:.0f}%" if total else "-"
    click.echo(f"{'Size':>10} {'Used':>10} {'Avail':>10} Use%")
    click.echo(f"{human(total):>10} {human(used):>10} {human(avail):>10} {pct:>4}")
    return EXIT_OK


@cli.command("hash")
@click.option("-a", "--algorithm", default="sha256", show_default=True,
              type=click.Choice(["sha256", "sha1", "md5", "sha224", "sha384", "sha512"]))
@click.argument("paths", nargs=-1, required=True)
@click.pass_obj
def hash_(state: State, algorithm: str, paths: tuple[str, ...]) -> int:
    """Print the server-computed hash of remote files (sha256sum format)."""
    async def go(sftp: asyncssh.SFTPClient, resolve: Resolve) -> list[tuple[str, str]]:
        return [(p, await remote_hash(sftp, resolve(p), algorithm)) for p in paths]

    for p, digest in _remote(state, go):
        click.echo(f"{digest}  {p}")
    return EXIT_OK


SHELL_HELP = """Commands (each takes -h for its options):
  ls [-l] [PATH]                      list a directory (or show one file)
  put [-r] [-j N] [-c K] [--mkdir] LOCAL... [REMOTE]   upload (REMOTE ending in / must be a directory)
  get [-r] [-j N] [-c K] [--mkdir] REMOTE... [LOCAL]   download
  mkdir [-p] PATH...    rm [-r] PATH...    rmdir PATH...    mv SRC DST
  df                    hash [-a ALG] PATH...
  cd [PATH]   pwd   lcd [PATH]   help   exit (or quit, Ctrl-D)
Not on a terminal (a script on stdin) the shell stops at the first failing command with its exit code."""


def _shell_cd(session: RemoteSession, arg: str | None) -> None:
    """``cd``: OpenSSH's messages: a missing path is "No such file or directory", a file is "Not a
    directory" (a server may canonicalize a path that does not exist, so realpath alone proves
    nothing)."""
    shown = arg or "/"
    target = session.resolve(shown)

    async def chdir(sftp: asyncssh.SFTPClient) -> str:
        path = await _sftp_call(lambda: sftp.realpath(target), shown)
        attrs = await _sftp_call(lambda: sftp.stat(path), shown)
        if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
            raise ClientError(f"{shown}: Not a directory", EXIT_NOT_FOUND)
        return path

    session.cwd = session.run(chdir)


def _enable_line_editing() -> None:
    """Arrow keys, Ctrl-R and history for the prompt, when Python has readline (input() uses it once
    it is imported)."""
    try:
        import readline  # noqa: F401
    except ImportError:  # pragma: no cover - readline is part of CPython on Linux
        pass


def _shell_command(session: RemoteSession, shell_state: State, name: str, args: list[str]) -> int:
    """Run one shell line; return its exit status (0 success). Errors are printed here, one line."""
    try:
        if name in ("help", "?"):
            click.echo(SHELL_HELP)
        elif name == "pwd":
            click.echo(session.cwd)
        elif name == "cd":
            _shell_cd(session, args[0] if args else None)
        elif name == "lcd":
            os.chdir(os.path.expanduser(args[0] if args else "~"))
        elif name == "shell" or name not in cli.commands:
            click.echo(f"sshfiles-cli: unknown command: {name} (try help)", err=True)
            return EXIT_USAGE
        else:
            cmd = cli.commands[name]
            with cmd.make_context(name, args, obj=shell_state, **CONTEXT_SETTINGS) as ctx:
                rv = cmd.invoke(ctx)
            return rv if isinstance(rv, int) else EXIT_OK
    except click.exceptions.Exit as exc:  # -h
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code or EXIT_USAGE
    except ClientError as exc:
        click.echo(f"sshfiles-cli: {exc}", err=True)
        return exc.exit_code
    except OSError as exc:
        click.echo(f"sshfiles-cli: {exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", err=True)
        return from_os_error(exc, "").exit_code
    return EXIT_OK


@cli.command()
@click.pass_obj
def shell(state: State) -> int:
    """Interactive prompt over one connection (help, cd, pwd, ls, put, get, ...).

    On a terminal: line editing and history, and a failing command just prints its error. With a
    script on stdin (not a terminal): like ``sftp -b``, the first failing command ends the shell
    with that command's exit status.
    """
    if state.session is not None:
        raise ClientError("already in the shell")
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
    with RemoteSession(state.opts) as session:
        session.cwd = session.run(lambda sftp: sftp.realpath("."))
        shell_state = State(state.opts, quiet=state.quiet, session=session)
        while True:
            try:
                line = input(f"sshfiles:{session.cwd}> " if interactive else "")
            except EOFError:
                if interactive:
                    click.echo()
                break
            except KeyboardInterrupt:
                click.echo()
                continue
            try:
                argv = shlex.split(line)
            except ValueError as exc:
                click.echo(f"sshfiles-cli: {exc}", err=True)
                code = EXIT_USAGE
            else:
                if not argv:
                    continue
                if argv[0] in ("exit", "quit", "bye"):
                    break
                try:
                    code = _shell_command(session, shell_state, argv[0], argv[1:])
                except KeyboardInterrupt:
                    click.echo("interrupted", err=True)
                    code = 130
            if code == EXIT_CONNECT:
                return code  # the connection is gone: nothing more can succeed
            if code != EXIT_OK and not interactive:
                return code
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command, map every expected failure to one line and an exit code.

    The command is a process of its own, so it takes the seam's per-packet speed-ups as the server
    does (``SSHFILES_NO_SPEEDUPS`` turns them off the same way): without them the client spent
    more CPU per GiB than the server it talks to (an empty IGNORE packet and a socket write per
    request, every received packet copied several times)."""
    install_speedups_from_env(os.environ.get("SSHFILES_NO_SPEEDUPS"))
    keep_freed_memory(os.environ.get(MALLOC_DEFAULTS_ENV))  # as the server does (malloc_tuning.py)
    try:
        rv = cli.main(args=argv, prog_name="sshfiles-cli", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("sshfiles-cli: aborted", err=True)
        sys.exit(130)
    except ClientError as exc:
        click.echo(f"sshfiles-cli: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("sshfiles-cli: interrupted", err=True)
        sys.exit(130)
    except asyncssh.Error as exc:
        click.echo(f"sshfiles-cli: connection error: {exc.reason}", err=True)
        sys.exit(EXIT_CONNECT)
    except (ConnectionError, TimeoutError) as exc:  # outside a session's run (e.g. while closing)
        click.echo(f"sshfiles-cli: connection lost: {exc.strerror or exc}", err=True)
        sys.exit(EXIT_CONNECT)
    except OSError as exc:  # a local file error no command named: still one line
        err = from_os_error(exc, exc.filename or "local file")
        click.echo(f"sshfiles-cli: {err}", err=True)
        sys.exit(err.exit_code)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


if __name__ == "__main__":
    main()
