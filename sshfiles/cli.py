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
from .config import AUTO, SETTINGS, ConfigError, ServeConfig, config_candidates, find_config, load_toml, resolve
from .jail import secure_homes
from .permissions import PRESETS, format_perms, normalize_rule_path, parse_perms
from .quota import entries_limit, reconcile_dead_owners, rescan_user
from .stores import (
    UNLIMITED_ENTRIES,
    AccountError,
    AccountStore,
    LiveSession,
    StoredKey,
    folder_ledger,
    open_store,
    validate_folder_name,
    validate_username,
)
from .units import format_size, parse_size

DEFAULT_USER = "sftpuser"


class Context:
    """The config file and the state-directory flags, for every command.

    Settings come from config.py's one model (flag > environment > TOML > default); a bad value is a
    usage error naming the flag, variable or key. The state flags may be given before the command
    (``sshfiles --keys-dir X serve``) or after it (``sshfiles serve --keys-dir X``): ``override``
    applies the latter.
    """

    def __init__(self, toml: dict[str, Any], config_path: Path | None, group_flags: dict[str, Any]) -> None:
        self.toml = toml
        self.config_path = config_path
        self.group_flags = group_flags
        self._store: AccountStore | None = None
        self._apply()

    def _apply(self) -> None:
        base = self.settings()
        self.keys_dir = base.keys_dir
        self.accounts_dir = base.accounts_dir
        self.homes_dir = base.homes_dir
        self.store_url = base.store

    def override(self, flags: dict[str, Any]) -> None:
        """State flags given after the command name win over those given before it."""
        given = {k: v for k, v in flags.items() if v is not None}
        if given:
            self.group_flags = {**self.group_flags, **given}
            self._apply()

    def settings(self, **flags: Any) -> ServeConfig:
        toml_name = str(self.config_path) if self.config_path else "config file"
        toml_dir = self.config_path.parent if self.config_path else None
        try:
            return resolve({**self.group_flags, **flags}, os.environ, self.toml, toml_name=toml_name,
                           toml_dir=toml_dir)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None

    def reload_settings(self, **flags: Any) -> ServeConfig:
        """The settings as at start, with the TOML file read again (for SIGHUP); ConfigError if bad."""
        toml = load_toml(self.config_path) if self.config_path else {}
        toml_name = str(self.config_path) if self.config_path else "config file"
        toml_dir = self.config_path.parent if self.config_path else None
        return resolve({**self.group_flags, **flags}, os.environ, toml, toml_name=toml_name, toml_dir=toml_dir)

    def state_lines(self) -> list[str]:
        """Where this command's state is: what `serve` prints at start and `user list -v` shows."""
        config = str(self.config_path.absolute()) if self.config_path else \
            "none (looked for " + ", ".join(str(p.absolute()) for p in config_candidates(os.environ)) + ")"
        return [f"config: {config}", f"host keys: {self.keys_dir.absolute()}",
                f"accounts: {self.accounts_dir.absolute()}", f"homes: {self.homes_dir.absolute()}"]

    @property
    def store(self) -> AccountStore:
        """The store, created if missing: for `serve` and `user add`, which start a server's state."""
        if self._store is None:
            self._store = open_store(self.store_url, accounts_dir=self.accounts_dir)
        return self._store

    @property
    def existing_store(self) -> AccountStore:
        """The store, which must exist: every other command refuses (one line) rather than create an
        empty store in the wrong directory and show or change nothing."""
        if self._store is None:
            self._store = open_store(self.store_url, accounts_dir=self.accounts_dir, create=False)
        return self._store


def fail(message: str) -> NoReturn:
    raise click.ClickException(message)


def _help(name: str) -> str:
    """A flag's help from the config model, with its default, environment variable and TOML key."""
    setting = SETTINGS[name]
    env = f", env {setting.env}" if setting.env else ""
    default = "auto" if name in AUTO else "none" if setting.default == "" else setting.default
    return f"{setting.help} [default: {default}{env}; TOML {setting.toml_key}]"


class _IntOrAuto(click.ParamType):
    """An integer or the word auto (config.AUTO resolves it, so flag, env and TOML read it alike)."""

    name = "integer|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = str(value).strip()
        if text.lower() == "auto":
            return "auto"
        try:
            return int(text, 10)
        except ValueError:
            self.fail(f"expected an integer or auto, got {value!r}", param, ctx)


_INT_OR_AUTO = _IntOrAuto()


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


def _read_password(from_stdin: bool, confirm: bool = True, key_option: bool = False) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            # getpass would warn (GetPassWarning), echo, and end in "Aborted!" at EOF
            fail("no terminal to read a password from: use --password-stdin"
                 + (" (or --key FILE for a key-only account)" if key_option else ""))
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


_STATE_FLAGS = ("keys_dir", "accounts_dir", "homes_dir", "store")


def _state_params() -> list[click.Option]:
    return [click.Option([SETTINGS[n].flag, n], default=None, help=_help(n)) for n in _STATE_FLAGS]


def _state_options(f: Any) -> Any:
    """The state flags on the `sshfiles` group itself (before the command name)."""
    f.__click_params__ = getattr(f, "__click_params__", []) + _state_params()[::-1]
    return f


class _Group(click.Group):
    """Turns store and account errors from any command into one clean line, and gives every command
    the state flags (``--keys-dir``, ``--accounts-dir``, ``--homes-dir``) after its name too."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not isinstance(cmd, click.Group) and cmd.callback is not None:
            cmd.params.extend(_state_params())
            callback = cmd.callback

            def with_state(*args: Any, **kwargs: Any) -> Any:
                state = {k: kwargs.pop(k) for k in _STATE_FLAGS}
                obj = click.get_current_context().find_object(Context)
                if obj is not None:
                    obj.override(state)
                return callback(*args, **kwargs)

            cmd.callback = with_state
        super().add_command(cmd, name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sshfiles")
@click.option("--config", "config_path", envvar="SSHFILES_CONFIG", type=click.Path(dir_okay=False),
              help="TOML file with defaults for any option (flags override it). Without it: the first of "
                   "./sshfiles.toml, $XDG_CONFIG_HOME/sshfiles/config.toml (~/.config/...), "
                   "/etc/sshfiles/config.toml that exists; relative paths in it are relative to its directory.")
@_state_options
@click.pass_context
def main(ctx: click.Context, config_path: str | None, keys_dir: str | None, accounts_dir: str | None,
         homes_dir: str | None, store: str | None) -> None:
    """sshfiles: a multi-user SFTP server with jails and quotas."""
    path = Path(config_path) if config_path else find_config(os.environ)
    try:
        toml = load_toml(path) if path else {}
    except ConfigError as exc:
        fail(str(exc))
    ctx.obj = Context(toml, path, {"keys_dir": keys_dir, "accounts_dir": accounts_dir, "homes_dir": homes_dir,
                                   "store": store})


# -- serve ------------------------------------------------------------------------


# Settings added with the pre-auth defence get their flag straight from the model (type and help).
_DEFENCE_SETTINGS = ("node_lease", "proxy_protocol_from",
                     "max_startups", "per_source_max_startups", "per_source_rate", "per_source_burst",
                     "ban_threshold", "ban_window", "ban_time", "ban_max", "ban_exempt",
                     "max_sessions_per_user", "max_channels_per_connection", "legacy_algorithms",
                     # the per-session resource limits (session.py, hashing.py, asyncssh_seam.py)
                     "max_handles_per_session", "max_handles_per_user", "reply_buffer_limit", "max_hash_bytes",
                     "hash_workers", "hash_per_user_active", "hash_per_user_waiting",
                     # atomic uploads and hooks (atomic.py, hooks.py)
                     "upload_mode", "on_upload", "on_download", "on_delete", "on_rename", "hook_timeout")
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
@click.option("--workers", type=_INT_OR_AUTO, default=None, metavar="N|auto", help=_help("workers"))
@click.option("--login-timeout", type=float, default=None, help=_help("login_timeout"))
@click.option("--max-auth-tries", type=int, default=None, help=_help("max_auth_tries"))
@click.option("--idle-timeout", type=float, default=None, help=_help("idle_timeout"))
@click.option("--grace", type=float, default=None, help=_help("grace"))
@_model_options(_DEFENCE_SETTINGS)
@_model_options(_OPS_SETTINGS)
@click.pass_obj
def serve(obj: Context, host: str | None, port: int | None, workers: int | str | None,
          login_timeout: float | None, max_auth_tries: int | None, idle_timeout: float | None,
          grace: float | None, **defence: Any) -> None:
    """Run the SFTP server.

    On a start with an empty accounts store it creates the account 'sftpuser' with a random
    password, once the port is bound (a failed start creates nothing), and prints how to connect.
    """
    from .server import configure_logging, run_server

    flags = dict(host=host, port=port, workers=workers, login_timeout=login_timeout,
                 max_auth_tries=max_auth_tries, idle_timeout=idle_timeout, grace=grace, **defence)
    config = obj.settings(**flags)
    try:
        configure_logging(config)  # before the first line we may log (home mode corrections)
    except OSError as exc:
        fail(f"cannot open log file {config.log_file}: {exc.strerror or exc}")
    for line in obj.state_lines():
        click.echo(line, err=True)
    secure_homes(obj.homes_dir, [Path(a.home) for a in obj.store.list_users()])

    def announce(line: str) -> None:
        if line.startswith("sshfiles listening on"):
            # Only now, with the port bound: a start that fails (port busy, no permission) must not
            # use up the one showing of the first account's password. Before the line itself, so
            # whoever waits for it (a test, a script) finds the account already there.
            _first_account(obj)
        click.echo(line, err=True)
        if line.startswith("sshfiles listening on"):
            port_ = line.split(" port ")[1].split()[0]
            click.echo(f"connect with: sftp -P {port_} USER@{_host_for_ssh(config.host)}", err=True)

    try:
        run_server(config, announce=announce, reload=lambda: obj.reload_settings(**flags))
    except OSError as exc:
        fail(f"cannot listen on {config.host} port {config.port}: {exc.strerror or exc}")
    except RuntimeError as exc:
        fail(str(exc))


def _host_for_ssh(host: str) -> str:
    """A listen address as OpenSSH's ``USER@HOST`` wants it: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host else host


def _first_account(obj: Context) -> None:
    """On an empty store, create 'sftpuser' with a random password and show it once."""
    if obj.store.list_users():
        return
    password = secrets.token_urlsafe(12)
    home = _create_home(obj, DEFAULT_USER, None)
    try:
        obj.store.add_user(DEFAULT_USER, str(home), passwords.hash_password(password), None)
    except AccountError:
        return  # another node sharing the store created it first: its output has the password
    click.echo(f"created the first account: user {DEFAULT_USER}, password {password}")
    click.echo("(manage accounts with `sshfiles user ...`; this password is shown only once: "
               f"`sshfiles user passwd {DEFAULT_USER}` sets a new one)")


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
@click.option("--read-only", is_flag=True, help="Only list and download (the rule / = list,download; see `user perm`).")
@click.option("--upload-only", is_flag=True,
              help="Only upload new files: a drop box (the rule / = upload; see `user perm`).")
@click.pass_obj
def user_add(obj: Context, name: str, quota_text: str, password_stdin: bool, key_files: tuple[str, ...],
             home: str | None, files_text: str, read_only: bool, upload_only: bool) -> None:
    """Create an account (prompts for a password unless --password-stdin or --key)."""
    if read_only and upload_only:
        raise click.UsageError("--read-only and --upload-only exclude each other")
    preset = "read-only" if read_only else "upload-only" if upload_only else None
    validate_username(name)
    quota = _size(quota_text)
    max_entries = _files(files_text)
    keys = [k for path in key_files for k in _read_keys(path)]
    password_hash = None
    if password_stdin or not keys:
        password_hash = passwords.hash_password(_read_password(password_stdin, key_option=True))
    if obj.store.get_user(name) is not None:
        fail(f"user {name!r} already exists")
    home_path = _create_home(obj, name, home)
    obj.store.add_user(name, str(home_path), password_hash, quota)
    for k in keys:
        obj.store.add_key(name, k)
    if max_entries is not None:
        obj.store.set_max_entries(name, max_entries)
    if preset is not None:
        obj.store.set_permissions(name, "/", PRESETS[preset])
    rescan_user(obj.store, name)  # an existing home may already hold files
    note = f", {preset}" if preset else ""
    click.echo(f"added user {name} (home {home_path}, quota {format_size(quota)}{note})")


@user.command("list")
@click.option("-v", "--verbose", is_flag=True, help="First say which config file and state directories are used.")
@click.pass_obj
def user_list(obj: Context, verbose: bool) -> None:
    """Users with their auth methods, quota, usage (FILES: entries used/limit) and permissions."""
    if verbose:
        for line in obj.state_lines():
            click.echo(f"# {line}")
    rows = [("NAME", "AUTH", "QUOTA", "USED", "FILES", "PERMS", "HOME")]
    for a in obj.existing_store.list_users():
        auth = (",".join(a.auth_methods) or "-") + (" (disabled)" if a.disabled else "")
        rows.append((a.name, auth, format_size(a.quota), format_size(a.used),
                     _format_files(a.entries, entries_limit(a.quota, a.max_entries)),
                     _perms_summary(obj.existing_store.permissions(a.name)), a.home))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])


def _perms_summary(rules: dict[str, frozenset[str]]) -> str:
    """The PERMS column: '*' (no rules), a preset's name, the rule of '/' alone, or how many rules."""
    for name, perms in PRESETS.items():
        if rules == {"/": perms}:
            return name
    if not rules or all(p == {"*"} for p in rules.values()):
        return "*"
    if list(rules) == ["/"]:
        return format_perms(rules["/"])
    return f"{len(rules)} rule{'s' if len(rules) > 1 else ''}"


@user.group("perm", cls=_Group)
def user_perm() -> None:
    """Per-directory permissions (applied to live sessions within a second, on every worker).

    PERMS is a comma-separated list of list, download, upload, overwrite, delete, rename,
    create_dirs, chmod, chtimes; '*' for all; 'none' for nothing. A rule on a directory applies to
    everything below it until a deeper rule replaces it; a user without rules may do everything.
    """


@user_perm.command("set")
@click.argument("name")
@click.argument("path")
@click.argument("perms")
@click.pass_obj
def user_perm_set(obj: Context, name: str, path: str, perms: str) -> None:
    """Set NAME's permissions in PATH (a directory of the home, '/' = the whole home)."""
    try:
        path, parsed = normalize_rule_path(path), parse_perms(perms)
    except ValueError as exc:
        fail(str(exc))
    obj.existing_store.set_permissions(name, path, parsed)
    click.echo(f"permissions of {name} in {path}: {format_perms(parsed)}")


@user_perm.command("unset")
@click.argument("name")
@click.argument("path")
@click.pass_obj
def user_perm_unset(obj: Context, name: str, path: str) -> None:
    """Remove NAME's rule for PATH (the rule of the nearest directory above applies again)."""
    obj.existing_store.unset_permissions(name, path)  # refuses a bad path, so it normalises below
    click.echo(f"removed the permission rule of {name} for {normalize_rule_path(path)}")


@user_perm.command("list")
@click.argument("name")
@click.pass_obj
def user_perm_list(obj: Context, name: str) -> None:
    """NAME's rules, one 'PATH PERMS' per line ('/ *' when there are none)."""
    rules = obj.existing_store.permissions(name)
    if "/" not in rules:
        click.echo("/\t*\t(default)")
    for path in sorted(rules):
        click.echo(f"{path}\t{format_perms(rules[path])}")


@user.group("folder", cls=_Group)
def user_folder() -> None:
    """Shared folders mounted into a user's tree (`sshfiles folder` creates them).

    A mount change applies to the user's next channel (a new SFTP session or command); the
    channels open at the time keep the mounts they started with.
    """


@user_folder.command("add")
@click.argument("name")
@click.argument("folder")
@click.argument("vpath")
@click.option("--perms", default="*", show_default=True,
              help="What NAME may do inside the folder (as `user perm set NAME VPATH PERMS` would).")
@click.pass_obj
def user_folder_add(obj: Context, name: str, folder: str, vpath: str, perms: str) -> None:
    """Mount FOLDER into NAME's tree at VPATH (e.g. /shared/reports)."""
    try:
        vpath, parsed = normalize_rule_path(vpath), parse_perms(perms)
    except ValueError as exc:
        fail(str(exc))
    obj.existing_store.add_mount(name, folder, vpath, parsed)
    click.echo(f"mounted folder {folder} at {vpath} for {name} ({format_perms(parsed)}; "
               "applies from the user's next channel)")


@user_folder.command("remove")
@click.argument("name")
@click.argument("vpath")
@click.pass_obj
def user_folder_remove(obj: Context, name: str, vpath: str) -> None:
    """Unmount the folder at VPATH from NAME's tree (the folder and its files stay)."""
    obj.existing_store.remove_mount(name, vpath)
    click.echo(f"unmounted {normalize_rule_path(vpath)} for {name}")


@user_folder.command("list")
@click.argument("name")
@click.pass_obj
def user_folder_list(obj: Context, name: str) -> None:
    """NAME's mounts, one 'VPATH FOLDER PERMS' per line."""
    obj.existing_store.require_user(name)
    for m in obj.existing_store.mounts(name):
        click.echo(f"{m.vpath}\t{m.folder}\t{format_perms(m.perms)}")


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of stdin.")
@click.pass_obj
def user_passwd(obj: Context, name: str, password_stdin: bool) -> None:
    """Set a user's password."""
    obj.existing_store.require_user(name)
    obj.existing_store.set_password_hash(name, passwords.hash_password(_read_password(password_stdin)))
    click.echo(f"password of {name} changed")


@user.command("remove")
@click.argument("name")
@click.option("--purge-home", is_flag=True, help="Also delete the home directory and everything in it.")
@click.pass_obj
def user_remove(obj: Context, name: str, purge_home: bool) -> None:
    """Delete an account (its home stays unless --purge-home)."""
    acct = obj.existing_store.remove_user(name)
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
    obj.existing_store.set_disabled(name, True)
    click.echo(f"disabled user {name} (live sessions end within seconds)")


@user.command("enable")
@click.argument("name")
@click.pass_obj
def user_enable(obj: Context, name: str) -> None:
    """Allow NAME to log in again."""
    obj.existing_store.set_disabled(name, False)
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
    obj.existing_store.set_quota(name, quota)
    if files_text is not None:
        obj.existing_store.set_max_entries(name, max_entries)
    acct = obj.existing_store.require_user(name)
    used = acct.used
    note = " (usage is above it: uploads refused until files are removed)" if quota is not None and used > quota else ""
    limit = entries_limit(acct.quota, acct.max_entries)
    files = "unlimited files" if limit is None else f"{limit} files and directories"
    click.echo(f"quota of {name} set to {format_size(quota)}, {files}{note}")


@user.command("upload-mode")
@click.argument("name")
@click.argument("mode", required=False)
@click.pass_obj
def user_upload_mode(obj: Context, name: str, mode: str | None) -> None:
    """Show or set how NAME's uploads become visible: standard, atomic, atomic-resume, or 'default' (the
    server's --upload-mode). Applies to the sessions (channels) opened after it, with no restart."""
    from .atomic import parse_mode

    if mode is None:
        acct = obj.existing_store.require_user(name)
        click.echo(acct.upload_mode or "default (the server's --upload-mode)")
        return
    if mode == "default":
        obj.existing_store.set_upload_mode(name, None)
        click.echo(f"upload mode of {name}: the server's default (--upload-mode)")
        return
    try:
        value = parse_mode(mode)
    except ValueError as exc:
        fail(f"bad upload mode: {exc}")
    obj.existing_store.set_upload_mode(name, value)
    click.echo(f"upload mode of {name}: {value}")


@user.group("key", cls=_Group)
def user_key() -> None:
    """Manage a user's public keys."""


@user_key.command("add")
@click.argument("name")
@click.argument("pubkey_file", type=click.Path(dir_okay=False))
@click.pass_obj
def user_key_add(obj: Context, name: str, pubkey_file: str) -> None:
    """Authorize the key(s) in PUBKEY_FILE for NAME."""
    obj.existing_store.require_user(name)
    for k in _read_keys(pubkey_file):
        obj.existing_store.add_key(name, k)
        click.echo(f"added key {k.fingerprint} to {name}")


@user_key.command("list")
@click.argument("name")
@click.pass_obj
def user_key_list(obj: Context, name: str) -> None:
    """List NAME's keys with their fingerprints."""
    for k in obj.existing_store.require_user(name).keys:
        click.echo(f"{k.fingerprint}  {k.key.split()[0]}  {k.comment}".rstrip())


@user_key.command("remove")
@click.argument("name")
@click.argument("fingerprint")
@click.pass_obj
def user_key_remove(obj: Context, name: str, fingerprint: str) -> None:
    """Remove the key with FINGERPRINT (as `user key list` shows it) from NAME."""
    obj.existing_store.remove_key(name, fingerprint)
    click.echo(f"removed key {fingerprint} from {name}")


# -- folder -----------------------------------------------------------------------


@main.group(cls=_Group)
def folder() -> None:
    """Shared (virtual) folders: a directory with its own quota, mounted into users' trees
    (`sshfiles user folder add`)."""


@folder.command("add")
@click.argument("name")
@click.option("--path", "path_text", default=None,
              help="The folder's host directory (created 0700 if missing) [default: HOMES_DIR/../folders/NAME].")
@click.option("--quota", "quota_text", default="unlimited", show_default=True,
              help="Bytes the folder may hold, whoever writes them (e.g. 10G); unlimited is still counted.")
@click.option("--files", "files_text", default="default", show_default=True,
              help="Most files and directories the folder may hold: a number, 'unlimited', or 'default'.")
@click.pass_obj
def folder_add(obj: Context, name: str, path_text: str | None, quota_text: str, files_text: str) -> None:
    """Create a shared folder NAME (an existing directory is adopted and its usage scanned)."""
    validate_folder_name(name)
    quota, max_entries = _size(quota_text), _files(files_text)
    if obj.store.get_folder(name) is not None:
        fail(f"folder {name!r} already exists")
    path = Path(path_text) if path_text else obj.homes_dir.absolute().parent / "folders" / name
    try:
        if not path_text:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        fail(f"cannot create folder directory {path}: {exc.strerror}")
    if not path.is_dir():
        fail(f"folder path {path} is not a directory")
    secure_homes(None, [path])  # the same rule as a home: nobody else may write it
    obj.store.add_folder(name, str(path.resolve()), quota, max_entries)
    rescan_user(obj.store, folder_ledger(name))
    click.echo(f"added folder {name} ({path.resolve()}, quota {format_size(quota)})")


@folder.command("list")
@click.pass_obj
def folder_list(obj: Context) -> None:
    """Folders with their quota, usage (FILES: entries used/limit) and host path."""
    rows = [("NAME", "QUOTA", "USED", "FILES", "PATH")]
    for f in obj.existing_store.list_folders():
        rows.append((f.name, format_size(f.quota), format_size(f.used),
                     _format_files(f.entries, entries_limit(f.quota, f.max_entries)), f.path))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])


@folder.command("scan")
@click.argument("name", required=False)
@click.pass_obj
def folder_scan(obj: Context, name: str | None) -> None:
    """Recompute a folder's usage from disk (all folders without NAME), as `quota scan` does for users."""
    reconcile_dead_owners(obj.existing_store)
    names = [name] if name else [f.name for f in obj.existing_store.list_folders()]
    for n in names:
        before, after = rescan_user(obj.existing_store, folder_ledger(n))
        change = "unchanged" if before == after else f"was {format_size(before)}"
        click.echo(f"{n}: {format_size(after)} used ({change})")


@folder.command("remove")
@click.argument("name")
@click.pass_obj
def folder_remove(obj: Context, name: str) -> None:
    """Delete folder NAME and every mount of it (its directory and files stay on disk)."""
    f = obj.existing_store.remove_folder(name)
    click.echo(f"removed folder {name} (directory {f.path} kept)")


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
    reconcile_dead_owners(obj.existing_store)
    names = [name] if name else [a.name for a in obj.existing_store.list_users()]
    for n in names:
        before, after = rescan_user(obj.existing_store, n)
        change = "unchanged" if before == after else f"was {format_size(before)}"
        click.echo(f"{n}: {format_size(after)} used ({change})")


# -- store ------------------------------------------------------------------------


@main.group(cls=_Group)
def store() -> None:
    """The accounts store: schema migrations, moving an installation to another backend."""


@store.command("migrate")
@click.pass_obj
def store_migrate(obj: Context) -> None:
    """Upgrade the store (--store / SSHFILES_STORE / TOML store) to this version's schema.

    Servers refuse to start on a PostgreSQL store with an older schema; stop them, migrate, upgrade
    and start them again.  (The SQLite store migrates itself when opened.)
    """
    handle = open_store(obj.store_url, accounts_dir=obj.accounts_dir, migrate=True)
    try:
        version = getattr(handle, "schema_version", "?")
        click.echo(f"store schema is v{version} (current)")
    finally:
        handle.close()


@store.command("copy")
@click.argument("from_url")
@click.argument("to_url")
def store_copy(from_url: str, to_url: str) -> None:
    """Copy every account, key, quota, usage counter and ban from FROM_URL to the empty TO_URL.

    For moving from SQLite (sqlite:ACCOUNTS_DIR) to PostgreSQL (postgresql://...).  Stop every
    server using FROM_URL first: live reservations are not usage and are refused.
    """
    from .stores.copy import copy_store

    source = open_store(from_url)
    try:
        target = open_store(to_url, migrate=True)
        try:
            users, bans = copy_store(source, target)
        finally:
            target.close()
    finally:
        source.close()
    click.echo(f"copied {users} accounts and {bans} bans")


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
    rows = [b for b in obj.existing_store.bans() if show_all or b.until > now]
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
    obj.existing_store.unban(source)  # an admin's ban replaces any automatic one, shorter or longer
    obj.existing_store.ban(source, time.time() + seconds, "admin")  # server.ADMIN_BAN_REASON: ends live sessions too
    click.echo(f"banned {source} until {_when(time.time() + seconds)}")


@ban.command("remove")
@click.argument("address")
@click.pass_obj
def ban_remove(obj: Context, address: str) -> None:
    """Lift the ban on ADDRESS (and forget its strikes)."""
    source = _source(address)
    if not obj.existing_store.unban(source):
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
    rows = _live(obj.existing_store)
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
    obj.existing_store.kick_user(name)
    count = sum(1 for r in _live(obj.existing_store) if r.user == name)
    click.echo(f"kicked {name}: {count} session{'s' if count != 1 else ''} will end within about a second")


if __name__ == "__main__":  # pragma: no cover
    main()
