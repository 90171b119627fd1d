"""`sshfiles`: the admin command line (serve, user ..., quota ...).

A thin click layer over stores/, quota.py and server.py.  Every user
error ends as one line on stderr and a non-zero exit (1), never a traceback;
click's own usage errors exit 2.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import asyncssh
import click

from . import __version__, passwords
from .jail import secure_homes
from .quota import entries_limit, reconcile_dead_owners, rescan_user
from .stores import UNLIMITED_ENTRIES, AccountError, AccountStore, StoredKey, open_store, validate_username
from .units import format_size, parse_size

DEFAULT_PORT = 2222
DEFAULT_USER = "sftpuser"


class Context:
    """Where state lives, from flags > environment > config file > defaults."""

    def __init__(self, keys_dir: Path, accounts_dir: Path, homes_dir: Path, config: dict[str, Any]) -> None:
        self.keys_dir = keys_dir
        self.accounts_dir = accounts_dir
        self.homes_dir = homes_dir
        self.config = config
        self._store: AccountStore | None = None

    @property
    def store(self) -> AccountStore:
        if self._store is None:
            self._store = open_store(accounts_dir=self.accounts_dir)
        return self._store


def fail(message: str) -> NoReturn:
    raise click.ClickException(message)


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        fail(f"cannot read config file {path}: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        fail(f"config file {path} is not valid TOML: {exc}")


def _size(text: str) -> int | None:
    try:
        return parse_size(text)
    except ValueError as exc:
        fail(str(exc))


def _files(text: str) -> int | None:
    """An entry limit: a count, 'unlimited' (also none/off), or 'default' (stored as None)."""
    word = text.strip().lower()
    if word == "default":
        return None
    if word in ("unlimited", "none", "off"):
        return UNLIMITED_ENTRIES
    try:
        count = int(word)
    except ValueError:
        fail(f"invalid file count {text!r}: use a number, 'unlimited' or 'default'")
    if count < 0:
        fail(f"invalid file count {text!r}: must not be negative")
    return count


def _format_files(entries: int, limit: int | None) -> str:
    return f"{entries}" if limit is None else f"{entries}/{limit}"


def _read_password(from_stdin: bool, confirm: bool = True) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=confirm)
    if not password:
        fail("empty password refused")
    return password


def _read_keys(path: str) -> list[StoredKey]:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        fail(f"cannot read key file {path}: {exc.strerror}")
    keys = []
    # Line by line: asyncssh's list reader skips lines it cannot parse, and a
    # half-accepted key file is worse than a clear refusal.
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            keys.append(asyncssh.import_public_key(line))
        except (asyncssh.KeyImportError, ValueError) as exc:
            fail(f"{path} is not a public key file (line {lineno}: {exc})")
    if not keys:
        fail(f"{path} holds no public key")
    return [StoredKey(k.get_fingerprint("sha256"), k.export_public_key().decode().strip(),
                      k.get_comment() or "") for k in keys]


class _Group(click.Group):
    """Turns store and account errors from any command into one clean line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="sshfiles")
@click.option("--config", "config_path", envvar="SSHFILES_CONFIG", type=click.Path(dir_okay=False),
              help="TOML file with defaults for any option (flags override it).")
@click.option("--keys-dir", envvar="SSHFILES_KEYS_DIR", help="Host keys directory [default: keys/].")
@click.option("--accounts-dir", envvar="SSHFILES_ACCOUNTS_DIR", help="Accounts store directory [default: accounts/].")
@click.option("--homes-dir", envvar="SSHFILES_HOMES_DIR", help="Where homes are created [default: homes/].")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, keys_dir: str | None, accounts_dir: str | None,
         homes_dir: str | None) -> None:
    """sshfiles: a multi-user SFTP server with jails and quotas."""
    config = _load_config(config_path)
    ctx.obj = Context(Path(keys_dir or config.get("keys_dir", "keys")),
                      Path(accounts_dir or config.get("accounts_dir", "accounts")),
                      Path(homes_dir or config.get("homes_dir", "homes")), config)


# -- serve ------------------------------------------------------------------------


@main.command()
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help=f"Port to listen on [default: {DEFAULT_PORT}].")
@click.option("--workers", type=int, default=None,
              help="Server processes sharing the port [default: 1; see README].")
@click.option("--login-timeout", type=float, default=None, help="Seconds to authenticate [default: 60].")
@click.option("--max-auth-tries", type=int, default=None, help="Failed attempts per connection [default: 6].")
@click.option("--idle-timeout", type=float, default=None,
              help="Close a connection after this many seconds without channel data or SFTP request; "
                   "0 = never [default: 900].")
@click.option("--grace", type=float, default=None,
              help="Seconds transfers in progress may finish after SIGTERM/SIGINT [default: 30].")
@click.pass_obj
def serve(obj: Context, host: str | None, port: int | None, workers: int | None,
          login_timeout: float | None, max_auth_tries: int | None, idle_timeout: float | None,
          grace: float | None) -> None:
    """Run the SFTP server.

    On the first start with an empty accounts store it creates the account
    'sftpuser' with a random password and prints how to connect.
    """
    from .server import ServerConfig, configure_logging, run_server

    cfg = obj.config
    config = ServerConfig(
        host=host or cfg.get("host", "127.0.0.1"),
        port=port if port is not None else int(cfg.get("port", DEFAULT_PORT)),
        keys_dir=obj.keys_dir, accounts_dir=obj.accounts_dir, homes_dir=obj.homes_dir,
        login_timeout=login_timeout or float(cfg.get("login_timeout", 60)),
        max_auth_tries=max_auth_tries or int(cfg.get("max_auth_tries", 6)),
        workers=workers or int(cfg.get("workers", 1)),
        idle_timeout=idle_timeout if idle_timeout is not None else float(cfg.get("idle_timeout", 900)),
        grace=grace if grace is not None else float(cfg.get("grace", 30)),
    )
    if config.workers < 1:
        fail("--workers must be at least 1")
    if config.idle_timeout < 0 or config.grace < 0:
        fail("--idle-timeout and --grace must not be negative")
    configure_logging()  # before the first line we may log (home mode corrections)
    secure_homes(obj.homes_dir, [Path(a.home) for a in obj.store.list_users()])
    if not obj.store.list_users():
        password = secrets.token_urlsafe(12)
        home = _create_home(obj, DEFAULT_USER, None)
        obj.store.add_user(DEFAULT_USER, str(home), passwords.hash_password(password), None)
        click.echo(f"created the first account: user {DEFAULT_USER}, password {password}")
        click.echo("(manage accounts with `sshfiles user ...`; this password is shown only once)")

    def announce(line: str) -> None:
        click.echo(line, err=True)
        if line.startswith("sshfiles listening on"):
            port_ = line.split(" port ")[1].split()[0]
            click.echo(f"connect with: sftp -P {port_} USER@{config.host}", err=True)

    try:
        run_server(config, announce=announce)
    except OSError as exc:
        fail(f"cannot listen on {config.host} port {config.port}: {exc.strerror or exc}")
    except RuntimeError as exc:
        fail(str(exc))


# -- user -------------------------------------------------------------------------


@main.group(cls=_Group)
def user() -> None:
    """Manage accounts (no restart; password, key, disable and remove end live sessions)."""


def _create_home(obj: Context, name: str, home: str | None) -> Path:
    """Create (or adopt) a home: 0700, in a homes directory that is 0700 too.

    The homes directory is 0700 rather than 0711: only the server's own
    account ever needs to enter it, and without search permission for
    others a home left too open (a restored backup, an admin's chmod) still
    exposes nothing to local accounts.  An existing homes directory that
    gives others any access, or a home others can write, is corrected
    (`jail.secure_homes`, the same rule `serve` applies at start).
    """
    path = Path(home) if home else obj.homes_dir / name
    try:
        if not home:
            obj.homes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        fail(f"cannot create home {path}: {exc.strerror}")
    if not path.is_dir():
        fail(f"home {path} is not a directory")
    secure_homes(obj.homes_dir if not home else None, [path])
    return path.resolve()


@user.command("add")
@click.argument("name")
@click.option("--quota", "quota_text", default="unlimited", show_default=True,
              help="Disk quota: bytes, units like 500MiB / 2GiB / 10GB, or 'unlimited'.")
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of stdin.")
@click.option("--key", "key_files", multiple=True, type=click.Path(dir_okay=False),
              help="Public key file (OpenSSH format); may be repeated.")
@click.option("--home", default=None, help="Home directory [default: HOMES_DIR/NAME].")
@click.option("--files", "files_text", default="default", show_default=True,
              help="Most files and directories the home may hold: a number, 'unlimited', or 'default' "
                   "(one per 4 KiB of quota, at least 1000; unlimited without a quota).")
@click.pass_obj
def user_add(obj: Context, name: str, quota_text: str, password_stdin: bool, key_files: tuple[str, ...],
             home: str | None, files_text: str) -> None:
    """Create an account (prompts for a password unless --password-stdin or --key)."""
    validate_username(name)
    quota = _size(quota_text)
    max_entries = _files(files_text)
    keys = [k for path in key_files for k in _read_keys(path)]
    password_hash = None
    if password_stdin or not keys:
        password_hash = passwords.hash_password(_read_password(password_stdin))
    if obj.store.get_user(name) is not None:
        fail(f"user {name!r} already exists")
    home_path = _create_home(obj, name, home)
    obj.store.add_user(name, str(home_path), password_hash, quota)
    for k in keys:
        obj.store.add_key(name, k)
    if max_entries is not None:
        obj.store.set_max_entries(name, max_entries)
    rescan_user(obj.store, name)  # an existing home may already hold files
    click.echo(f"added user {name} (home {home_path}, quota {format_size(quota)})")


@user.command("list")
@click.pass_obj
def user_list(obj: Context) -> None:
    """Users with their auth methods, quota and usage (FILES: entries used/limit)."""
    rows = [("NAME", "AUTH", "QUOTA", "USED", "FILES", "HOME")]
    for a in obj.store.list_users():
        auth = (",".join(a.auth_methods) or "-") + (" (disabled)" if a.disabled else "")
        rows.append((a.name, auth, format_size(a.quota), format_size(a.used),
                     _format_files(a.entries, entries_limit(a.quota, a.max_entries)), a.home))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of stdin.")
@click.pass_obj
def user_passwd(obj: Context, name: str, password_stdin: bool) -> None:
    """Set a user's password."""
    obj.store.require_user(name)
    obj.store.set_password_hash(name, passwords.hash_password(_read_password(password_stdin)))
    click.echo(f"password of {name} changed")


@user.command("remove")
@click.argument("name")
@click.option("--purge-home", is_flag=True, help="Also delete the home directory and everything in it.")
@click.pass_obj
def user_remove(obj: Context, name: str, purge_home: bool) -> None:
    """Delete an account (its home stays unless --purge-home)."""
    acct = obj.store.remove_user(name)
    if purge_home:
        home = Path(acct.home)
        if home.resolve() in (Path("/"), obj.homes_dir.resolve()):
            fail(f"refusing to purge {home}")
        shutil.rmtree(home, ignore_errors=True)
        click.echo(f"removed user {name} and deleted {home}")
    else:
        click.echo(f"removed user {name} (home {acct.home} kept)")


@user.command("disable")
@click.argument("name")
@click.pass_obj
def user_disable(obj: Context, name: str) -> None:
    """Refuse NAME's logins and end its live sessions (on every worker, within seconds)."""
    obj.store.set_disabled(name, True)
    click.echo(f"disabled user {name} (live sessions end within seconds)")


@user.command("enable")
@click.argument("name")
@click.pass_obj
def user_enable(obj: Context, name: str) -> None:
    """Allow NAME to log in again."""
    obj.store.set_disabled(name, False)
    click.echo(f"enabled user {name}")


@user.command("quota")
@click.argument("name")
@click.argument("size")
@click.option("--files", "files_text", default=None,
              help="Also set the most files and directories: a number, 'unlimited' or 'default'.")
@click.pass_obj
def user_quota(obj: Context, name: str, size: str, files_text: str | None) -> None:
    """Set a user's quota (SIZE as for `user add --quota`; 'unlimited' removes it)."""
    quota = _size(size)
    max_entries = _files(files_text) if files_text is not None else None
    obj.store.set_quota(name, quota)
    if files_text is not None:
        obj.store.set_max_entries(name, max_entries)
    acct = obj.store.require_user(name)
    used = acct.used
    note = " (usage is above it: uploads refused until files are removed)" if quota is not None and used > quota else ""
    limit = entries_limit(acct.quota, acct.max_entries)
    files = "unlimited files" if limit is None else f"{limit} files and directories"
    click.echo(f"quota of {name} set to {format_size(quota)}, {files}{note}")


@user.group("key", cls=_Group)
def user_key() -> None:
    """Manage a user's public keys."""


@user_key.command("add")
@click.argument("name")
@click.argument("pubkey_file", type=click.Path(dir_okay=False))
@click.pass_obj
def user_key_add(obj: Context, name: str, pubkey_file: str) -> None:
    """Authorize the key(s) in PUBKEY_FILE for NAME."""
    obj.store.require_user(name)
    for k in _read_keys(pubkey_file):
        obj.store.add_key(name, k)
        click.echo(f"added key {k.fingerprint} to {name}")


@user_key.command("list")
@click.argument("name")
@click.pass_obj
def user_key_list(obj: Context, name: str) -> None:
    """List NAME's keys with their fingerprints."""
    for k in obj.store.require_user(name).keys:
        click.echo(f"{k.fingerprint}  {k.key.split()[0]}  {k.comment}".rstrip())


@user_key.command("remove")
@click.argument("name")
@click.argument("fingerprint")
@click.pass_obj
def user_key_remove(obj: Context, name: str, fingerprint: str) -> None:
    """Remove the key with FINGERPRINT (as `user key list` shows it) from NAME."""
    obj.store.remove_key(name, fingerprint)
    click.echo(f"removed key {fingerprint} from {name}")


# -- quota ------------------------------------------------------------------------


@main.group(cls=_Group)
def quota() -> None:
    """Quota maintenance."""


@quota.command("scan")
@click.argument("name", required=False)
@click.pass_obj
def quota_scan(obj: Context, name: str | None) -> None:
    """Recompute usage from disk and repair drift.

    Run it after copying files into a home by hand, or after restoring a
    backup.  Best while the user has no upload in flight.
    """
    # Reservations of server processes that died are not usage: drop them first, or the
    # scan's result would be charged on top of them.
    reconcile_dead_owners(obj.store)
    names = [name] if name else [a.name for a in obj.store.list_users()]
    for n in names:
        before, after = rescan_user(obj.store, n)
        change = "unchanged" if before == after else f"was {format_size(before)}"
        click.echo(f"{n}: {format_size(after)} used ({change})")


if __name__ == "__main__":  # pragma: no cover
    main()
