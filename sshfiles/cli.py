"""`sshfiles`: the admin command line (serve, user ..., quota ...).

A thin click layer over stores/, quota.py and server.py.  Every user
error ends as one line on stderr and a non-zero exit (1), never a traceback;
click's own usage errors exit 2.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import asyncssh
import click

from . import __version__, passwords
from .config import SETTINGS, ConfigError, ServeConfig, load_toml, resolve
from .jail import secure_homes
from .quota import entries_limit, reconcile_dead_owners, rescan_user
from .stores import (
    UNLIMITED_ENTRIES,
    AccountError,
    AccountStore,
    LiveSession,
    StoredKey,
    open_store,
    validate_username,
)
from .units import format_size, parse_size

DEFAULT_USER = "sftpuser"


class Context:
    """The TOML file and the state-directory flags of the `sshfiles` group, for every command.

    Settings come from config.py's one model (flag > environment > TOML > default); a bad value is a
    usage error naming the flag, variable or key.
    """

    def __init__(self, toml: dict[str, Any], toml_name: str, group_flags: dict[str, Any],
                 toml_path: str | None = None) -> None:
        self.toml = toml
        self.toml_name = toml_name
        self.toml_path = toml_path  # re-read by `reload_settings` (serve's SIGHUP)
        self.group_flags = group_flags
        base = self.settings()
        self.keys_dir = base.keys_dir
        self.accounts_dir = base.accounts_dir
        self.homes_dir = base.homes_dir
        self._store: AccountStore | None = None

    def settings(self, **flags: Any) -> ServeConfig:
        try:
            return resolve({**self.group_flags, **flags}, os.environ, self.toml, toml_name=self.toml_name)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None

    def reload_settings(self, **flags: Any) -> ServeConfig:
        """The settings as at start, with the TOML file read again (for SIGHUP); ConfigError if bad."""
        toml = load_toml(self.toml_path) if self.toml_path else {}
        return resolve({**self.group_flags, **flags}, os.environ, toml, toml_name=self.toml_name)

    @property
    def store(self) -> AccountStore:
        if self._store is None:
            self._store = open_store(accounts_dir=self.accounts_dir)
        return self._store


def fail(message: str) -> NoReturn:
    raise click.ClickException(message)


def _help(name: str) -> str:
    """A flag's help from the config model, with its default, environment variable and TOML key."""
    setting = SETTINGS[name]
    env = f", env {setting.env}" if setting.env else ""
    default = "none" if setting.default == "" else setting.default
    return f"{setting.help} [default: {default}{env}; TOML {setting.toml_key}]"


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
@click.option("--keys-dir", help=_help("keys_dir"))
@click.option("--accounts-dir", help=_help("accounts_dir"))
@click.option("--homes-dir", help=_help("homes_dir"))
@click.pass_context
def main(ctx: click.Context, config_path: str | None, keys_dir: str | None, accounts_dir: str | None,
         homes_dir: str | None) -> None:
    """sshfiles: a multi-user SFTP server with jails and quotas."""
    try:
        toml = load_toml(config_path) if config_path else {}
    except ConfigError as exc:
        fail(str(exc))
    ctx.obj = Context(toml, config_path or "config file",
                      {"keys_dir": keys_dir, "accounts_dir": accounts_dir, "homes_dir": homes_dir}, config_path)


# -- serve ------------------------------------------------------------------------


# Settings added with the pre-auth defence get their flag straight from the model (type and help).
_DEFENCE_SETTINGS = ("max_startups", "per_source_max_startups", "per_source_rate", "per_source_burst",
                     "ban_threshold", "ban_window", "ban_time", "ban_max", "ban_exempt",
                     "max_sessions_per_user", "max_channels_per_connection", "legacy_algorithms")
# Settings for running it as a daemon (logs, metrics), from the model too.
_OPS_SETTINGS = ("log_format", "log_file", "metrics_listen")


def _model_options(names: tuple[str, ...]) -> Any:
    def decorate(f: Any) -> Any:
        for name in reversed(names):
            s = SETTINGS[name]
            if s.kind is bool:
                f = click.option(s.flag, name, is_flag=True, default=None, help=_help(name))(f)
            else:
                f = click.option(s.flag, name, type=s.kind, default=None, help=_help(name))(f)
        return f
    return decorate


@main.command()
@click.option("--host", default=None, help=_help("host"))
@click.option("--port", type=int, default=None, help=_help("port"))
@click.option("--workers", type=int, default=None, help=_help("workers"))
@click.option("--login-timeout", type=float, default=None, help=_help("login_timeout"))
@click.option("--max-auth-tries", type=int, default=None, help=_help("max_auth_tries"))
@click.option("--idle-timeout", type=float, default=None, help=_help("idle_timeout"))
@click.option("--grace", type=float, default=None, help=_help("grace"))
@_model_options(_DEFENCE_SETTINGS)
@_model_options(_OPS_SETTINGS)
@click.pass_obj
def serve(obj: Context, host: str | None, port: int | None, workers: int | None,
          login_timeout: float | None, max_auth_tries: int | None, idle_timeout: float | None,
          grace: float | None, **defence: Any) -> None:
    """Run the SFTP server.

    On the first start with an empty accounts store it creates the account
    'sftpuser' with a random password and prints how to connect.
    """
    from .server import configure_logging, run_server

    flags = dict(host=host, port=port, workers=workers, login_timeout=login_timeout,
                 max_auth_tries=max_auth_tries, idle_timeout=idle_timeout, grace=grace, **defence)
    config = obj.settings(**flags)
    try:
        configure_logging(config)  # before the first line we may log (home mode corrections)
    except OSError as exc:
        fail(f"cannot open log file {config.log_file}: {exc.strerror or exc}")
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
        run_server(config, announce=announce, reload=lambda: obj.reload_settings(**flags))
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


# -- ban --------------------------------------------------------------------------


@main.group(cls=_Group)
def ban() -> None:
    """Per-source bans (shared by every server process using this store; applied within a second)."""


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    """"90", "90s", "15m", "2h", "7d", "1w" -> seconds; "forever" -> 100 years."""
    word = text.strip().lower()
    if word in ("forever", "permanent"):
        return 100 * 365 * 86400.0
    number = word.rstrip("smhdw")
    try:
        value = float(number)
    except ValueError:
        fail(f"invalid duration {text!r}: use a number with s, m, h, d or w, or 'forever'")
    if not value > 0 or value != value or value == float("inf"):
        fail(f"invalid duration {text!r}: must be greater than 0")
    return value * _DURATION_UNITS[word[len(number):]]


def _source(text: str) -> str:
    import ipaddress

    from .defence import source_key
    host = text.strip()
    if host.endswith("/64") or host.endswith("/32"):
        host = host[:-3]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        fail(f"invalid address {text!r}: give an IPv4 or IPv6 address (IPv6 bans cover its /64)")
    return source_key(host)


def _when(epoch: float) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@ban.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also list expired bans (kept for their strikes).")
@click.pass_obj
def ban_list(obj: Context, show_all: bool) -> None:
    """List banned sources: address, until, reason, strikes."""
    import time
    now = time.time()
    rows = [b for b in obj.store.bans() if show_all or b.until > now]
    if not rows:
        click.echo("no bans")
        return
    for b in rows:
        state = f"until {_when(b.until)}" if b.until > now else f"expired {_when(b.until)}"
        click.echo(f"{b.source}\t{state}\treason={b.reason}\tstrikes={b.strikes}")


@ban.command("add")
@click.argument("address")
@click.option("--for", "duration", default="1d", show_default=True,
              help="How long: seconds, or with s/m/h/d/w, or 'forever'.")
@click.pass_obj
def ban_add(obj: Context, address: str, duration: str) -> None:
    """Ban ADDRESS (an IPv6 address bans its /64)."""
    import time
    source = _source(address)
    seconds = _duration(duration)
    obj.store.unban(source)  # an admin's ban replaces any automatic one, shorter or longer
    obj.store.ban(source, time.time() + seconds, "admin")
    click.echo(f"banned {source} until {_when(time.time() + seconds)}")


@ban.command("remove")
@click.argument("address")
@click.pass_obj
def ban_remove(obj: Context, address: str) -> None:
    """Lift the ban on ADDRESS (and forget its strikes)."""
    source = _source(address)
    if not obj.store.unban(source):
        fail(f"{source} is not banned")
    click.echo(f"unbanned {source}")


# -- status, kick ------------------------------------------------------------------


def _live(store: AccountStore) -> list[LiveSession]:
    """Rows of running server processes only (a crashed one's rows wait for its reconciliation)."""
    alive: dict[str, bool] = {}
    rows = []
    for row in store.live_sessions():
        if row.owner not in alive:
            alive[row.owner] = store.owner_alive(row.owner)
        if alive[row.owner]:
            rows.append(row)
    return rows


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per session (stable field names).")
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """Who is connected now: user, source, connection id, worker pid, since, current transfers.

    Every server process writes its logged-in connections to the store once a second, so this is at
    most about a second old.
    """
    import json

    from .logsafe import esc
    rows = _live(obj.store)
    if as_json:
        for r in rows:
            click.echo(json.dumps({"user": r.user, "source": r.source, "conn": r.conn, "pid": r.pid,
                                   "since": _when(r.since), "doing": esc(r.doing, quote=False)}))
        return
    if not rows:
        click.echo("no sessions")
        return
    table = [("USER", "SOURCE", "CONN", "PID", "SINCE", "DOING")]
    table += [(r.user, r.source, r.conn, str(r.pid), _when(r.since), esc(r.doing, quote=False) or "-")
              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5])


@main.command()
@click.argument("name")
@click.pass_obj
def kick(obj: Context, name: str) -> None:
    """End every session of user NAME, on every server process, within about a second.

    The user may log in again (to keep them out: `user disable`). Works like a credential change:
    each process's session watcher sees the account's revision move and ends its connections.
    """
    obj.store.kick_user(name)
    count = sum(1 for r in _live(obj.store) if r.user == name)
    click.echo(f"kicked {name}: {count} session{'s' if count != 1 else ''} will end within about a second")


if __name__ == "__main__":  # pragma: no cover
    main()
