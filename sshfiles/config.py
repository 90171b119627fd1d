"""The ``sshfiles serve`` settings: one typed model, one place for each default, one precedence rule.

Why: each setting used to be spelled out in several places (the click option, its env var, the TOML
lookup, the default, the validation), and they drifted: ``--workers 0`` meant "unset" because of an
``or``, and a TOML ``port = "abc"`` surfaced as a traceback. Here every setting is one field of
``ServeConfig`` carrying its default, its range and its metadata (help text, environment variable,
flag, TOML key), and ``resolve`` applies one rule to all of them:

    flag > environment > TOML file > default

A value that is present wins even if it is 0 or empty-looking (``--idle-timeout 0`` means "no idle
timeout", not "use the default"); only an absent flag (``None``) or environment variable (missing or
``""``, as click treats it) falls through. Every problem -- an unknown TOML key, a wrong type (``port =
"abc"``, ``workers = "two"``, ``host = 5``, ``true`` where a number is expected), a value out of range
-- raises ``ConfigError`` with one line that names the flag, variable or key the user has to fix.

This module does not know click: the CLI passes its parsed flags as a dict keyed by field name.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .metrics import parse_listen

__all__ = ["AUTO", "SETTINGS", "ConfigError", "ServeConfig", "Setting", "auto_workers", "config_candidates",
           "find_config", "load_toml", "parse_startups", "resolve"]

_ENV_PREFIX = "SSHFILES_"


class ConfigError(ValueError):
    """A configuration value the server cannot use; the message is one line naming its source."""


@dataclass(frozen=True)
class Setting:
    """Everything about one serve setting except its value.

    ``kind`` is the Python type of the value (``str``, ``int``, ``float`` or ``Path``); ``minimum`` and
    ``maximum`` bound numbers (inclusive), ``positive`` demands > 0 (for durations where 0 makes no sense).
    """

    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    has_env: bool = True

    @property
    def env(self) -> str | None:
        """Environment variable: ``SSHFILES_<NAME>`` (``SSHFILES_LOGIN_TIMEOUT``), if the setting has one."""
        return _ENV_PREFIX + self.name.upper() if self.has_env else None

    @property
    def flag(self) -> str:
        """Command-line flag: ``--login-timeout``."""
        return "--" + self.name.replace("_", "-")

    @property
    def toml_key(self) -> str:
        """Key in the TOML file: the field name itself (``login_timeout``)."""
        return self.name

    def range_text(self) -> str:
        if self.positive:
            return "greater than 0"
        if self.minimum is not None and self.maximum is not None:
            return f"between {self.minimum:g} and {self.maximum:g}"
        if self.minimum is not None:
            return f"at least {self.minimum:g}"
        return f"at most {self.maximum:g}"  # pragma: no cover - no such setting today


def _meta(kind: type, help: str, *, minimum: float | None = None, maximum: float | None = None,
          positive: bool = False, has_env: bool = True) -> dict[str, Any]:
    """A dataclass field's metadata describing the setting (its name and default come from the field)."""
    return {"sshfiles": {"kind": kind, "help": help, "minimum": minimum, "maximum": maximum, "positive": positive,
                         "has_env": has_env}}


AUTO_WORKERS_MAX = 8  # past this many processes one store and one machine's memory gain little


def auto_workers() -> int:
    """``--workers auto``: one server process per CPU this process may run on (its affinity mask, so
    a container's or a systemd unit's CPU set counts, not the machine's), at most AUTO_WORKERS_MAX."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(AUTO_WORKERS_MAX, cpus))


#: Settings that also accept the word ``auto`` (flag, environment, TOML): field name -> its value.
#: The field's default is that value, computed when this module is imported; help texts say "auto".
AUTO = {"workers": auto_workers}


# Relative to the current directory unless set in a config file (then relative to the file's
# directory), as the README documents.
_KEYS_DIR, _ACCOUNTS_DIR, _HOMES_DIR = Path("keys"), Path("accounts"), Path("homes")


@dataclass(frozen=True)
class ServeConfig:
    """Every setting of ``sshfiles serve``, with its default. Construct it with ``resolve``.

    Instances are always valid: the constructor checks types and ranges too, so code that builds one
    directly (tests, embedding) gets the same guarantees as the CLI.
    """

    # host and port have no environment variable: SSHFILES_HOST / SSHFILES_PORT name the server
    # sshfiles-cli connects to, and one exported for the client must not move the server.
    host: str = field(default="127.0.0.1", metadata=_meta(str, "Address to listen on.", has_env=False))
    # 0 lets the kernel pick a free port (the log line "listening on ... port N" says which): the
    # test suite starts every server that way, so 0 must stay valid.
    port: int = field(default=2222, metadata=_meta(int, "Port to listen on (0: any free port).",
                                                   minimum=0, maximum=65535, has_env=False))
    keys_dir: Path = field(default=_KEYS_DIR,
                           metadata=_meta(Path, "Host keys directory (keys are generated there on first start)."))
    accounts_dir: Path = field(default=_ACCOUNTS_DIR, metadata=_meta(Path, "Accounts store directory."))
    homes_dir: Path = field(default=_HOMES_DIR, metadata=_meta(Path, "Where user homes are created."))
    # Several nodes share one PostgreSQL store (README "Running several nodes"); "" keeps the
    # embedded SQLite store in accounts_dir.
    store: str = field(default="", metadata=_meta(
        str, "Accounts store URL: postgresql://USER@HOST/DB (shared by several nodes) or sqlite:DIR "
        "(empty: the SQLite store in accounts-dir)."))
    node_lease: float = field(default=15.0, metadata=_meta(
        float, "Seconds after which other nodes take a silent node for dead and reclaim its quota "
        "reservations (PostgreSQL store).", positive=True))
    proxy_protocol_from: str = field(default="", metadata=_meta(
        str, "Load balancers (addresses or CIDR networks, comma-separated) whose connections must start "
        "with a PROXY protocol v1/v2 header; from anywhere else a header is refused (empty: no PROXY)."))
    login_timeout: float = field(default=60.0, metadata=_meta(float, "Seconds a connection has to authenticate.",
                                                              positive=True))
    max_auth_tries: int = field(default=6, metadata=_meta(int, "Failed authentication attempts per connection.",
                                                          minimum=1))
    workers: int = field(default=auto_workers(), metadata=_meta(
        int, "Server processes sharing the listening socket, each new connection going to the one holding "
        "fewest (auto: one per CPU this process may run on, at most 8; 1: a single process, no supervisor).",
        minimum=1))
    idle_timeout: float = field(default=900.0, metadata=_meta(
        float, "Seconds a session may be idle before it is closed (0: never).", minimum=0))
    grace: float = field(default=30.0, metadata=_meta(
        float, "Seconds sessions get to finish on shutdown before they are closed.", minimum=0))
    # -- pre-authentication limits and per-source defence (defence.py, README "Defence") --
    max_startups: str = field(default="10:30:100", metadata=_meta(
        str, "Unauthenticated connections, OpenSSH-style start:rate:full: from `start` on, new ones are "
        "dropped with a probability growing from rate % to 100 % at `full`."))
    per_source_max_startups: int = field(default=10, metadata=_meta(
        int, "Unauthenticated connections one source (IPv4 address, IPv6 /64) may hold (0: no limit).",
        minimum=0))
    per_source_rate: float = field(default=5.0, metadata=_meta(
        float, "New connections per second one source may open, after a burst of per-source-burst (0: no "
        "limit).", minimum=0))
    per_source_burst: int = field(default=10, metadata=_meta(
        int, "Connections one source may open at once before per-source-rate applies.", minimum=1))
    ban_threshold: float = field(default=10.0, metadata=_meta(
        float, "Penalty score that bans a source (a failed login scores 1, a login timeout 2, a protocol "
        "error 1, a connection over the per-source limits 0.5; 0: never ban).", minimum=0))
    ban_window: float = field(default=60.0, metadata=_meta(
        float, "Seconds over which a source's penalty points add up (a sliding window).", positive=True))
    ban_time: float = field(default=300.0, metadata=_meta(
        float, "Seconds of a first ban; each repeat doubles it.", positive=True))
    ban_max: float = field(default=86400.0, metadata=_meta(
        float, "Longest automatic ban, in seconds.", positive=True))
    ban_exempt: str = field(default="", metadata=_meta(
        str, "Sources never scored nor banned: addresses or CIDR networks, comma-separated."))
    max_sessions_per_user: int = field(default=64, metadata=_meta(
        int, "Open session channels one user may have in this server process, over all connections.",
        minimum=1))
    max_channels_per_connection: int = field(default=10, metadata=_meta(
        int, "Open session channels per connection.", minimum=1))
    legacy_algorithms: bool = field(default=False, metadata=_meta(
        bool, "Also offer SHA-1 ssh-rsa, the NIST ECDH curves, ECDSA host keys and finite-field DH, for old "
        "clients that need them (weaker; off by default)."))
    # -- atomic uploads (atomic.py) and hooks (hooks.py), README "Atomic uploads" and "Hooks" --
    upload_mode: str = field(default="standard", metadata=_meta(
        str, "How uploads become visible: standard (written in place), atomic (under a hidden temporary "
        "name, renamed onto the name when the upload completes; a failed one is removed) or atomic-resume "
        "(as atomic, but a failed upload's partial is kept for a resume); per user: `user upload-mode`."))
    on_upload: str = field(default="", metadata=_meta(
        str, "Command run (no shell; argv split like a shell would) after each completed upload, with the "
        "facts in SSHFILES_* environment variables."))
    on_download: str = field(default="", metadata=_meta(str, "Command run after each completed download."))
    on_delete: str = field(default="", metadata=_meta(str, "Command run after each file removal."))
    on_rename: str = field(default="", metadata=_meta(str, "Command run after each rename."))
    hook_timeout: float = field(default=30.0, metadata=_meta(
        float, "Seconds a hook may run before it is killed.", positive=True))

    # -- per-session resource limits (session.py, hashing.py, asyncssh_seam.py) --
    max_handles_per_session: int = field(default=0, metadata=_meta(
        int, "Open files and directories one session (channel) may hold (0: automatic, an eighth of the fd "
        "limit, at most 512).", minimum=0))
    max_handles_per_user: int = field(default=0, metadata=_meta(
        int, "Open files and directories one user may hold in this server process, over all sessions (0: "
        "automatic, an eighth of the fd limit, at most 2048).", minimum=0))
    reply_buffer_limit: int = field(default=4 * 1024 * 1024, metadata=_meta(
        int, "Bytes of SFTP replies a client has not read before the server stops reading its requests.",
        minimum=64 * 1024))
    max_hash_bytes: int = field(default=64 << 30, metadata=_meta(
        int, "Most bytes one hash request (check-file, *sum) may read; larger files are refused.", minimum=1))
    hash_workers: int = field(default=2, metadata=_meta(
        int, "Threads that hash, for the whole server process.", minimum=1, maximum=64))
    hash_per_user_active: int = field(default=2, metadata=_meta(
        int, "Hash requests one user may have running at once.", minimum=1))
    hash_per_user_waiting: int = field(default=16, metadata=_meta(
        int, "Hash requests one user may have waiting; more are refused (try again).", minimum=0))

    # -- running as a daemon: logs (audit.py), metrics --
    log_format: str = field(default="text", metadata=_meta(
        str, "Log format: text (one key=value line per event) or json (one JSON object per line)."))
    log_file: str = field(default="", metadata=_meta(
        str, "Append the log to this file instead of stderr; SIGHUP reopens it (for logrotate)."))
    metrics_listen: str = field(default="", metadata=_meta(
        str, "Serve Prometheus metrics and /healthz on HOST:PORT, e.g. 127.0.0.1:9122 (empty: off)."))

    def __post_init__(self) -> None:
        for s in SETTINGS.values():
            problem = _check(s, getattr(self, s.name))
            if problem:
                raise ConfigError(f"ServeConfig.{s.name}: {problem}")
        for name, parse in _PARSED.items():
            try:
                parse(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"ServeConfig.{name}: {exc}") from None


def parse_startups(text: str) -> tuple[int, int, int]:
    """OpenSSH MaxStartups syntax: "full" or "start:rate:full" -> (start, rate %, full); 0 full: no limit."""
    parts = text.strip().split(":")
    try:
        if len(parts) == 1:
            full = int(parts[0])
            start, rate = full, 100
        elif len(parts) == 3:
            start, rate, full = (int(p) for p in parts)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"expected N or START:RATE:FULL, got {text!r}") from None
    if not (0 <= start <= full and 0 <= rate <= 100):
        raise ValueError(f"need 0 <= start <= full and rate between 0 and 100, got {text!r}")
    return start, rate, full


def _parse_exempt(text: str) -> object:
    from .defence import parse_cidrs
    return parse_cidrs(text)


def _parse_store(text: str) -> object:
    if text and not text.startswith(("sqlite:", "postgresql://", "postgres://")):
        raise ValueError("expected postgresql://USER@HOST/DB or sqlite:DIR")
    return text


def _parse_upload_mode(text: str) -> object:
    from .atomic import parse_mode
    return parse_mode(text)


def _parse_hook(text: str) -> object:
    from .hooks import parse_command
    return parse_command(text)


def _parse_log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError(f"must be text or json, got {text!r}")
    return text


_PARSED = {"max_startups": parse_startups, "ban_exempt": _parse_exempt,  # str settings with a syntax
           "upload_mode": _parse_upload_mode, "on_upload": _parse_hook, "on_download": _parse_hook,
           "on_delete": _parse_hook, "on_rename": _parse_hook, "log_format": _parse_log_format,
           "metrics_listen": parse_listen, "proxy_protocol_from": _parse_exempt, "store": _parse_store}


def _settings() -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    for f in fields(ServeConfig):
        meta = f.metadata["sshfiles"]
        assert f.default is not MISSING
        out[f.name] = Setting(f.name, meta["kind"], f.default, meta["help"], meta["minimum"], meta["maximum"],
                              meta["positive"], meta["has_env"])
    return out


#: Field name -> its description, in declaration order (what --help and the README list).
SETTINGS: dict[str, Setting] = _settings()

_TYPE_NAMES = {bool: "true or false", str: "a string", int: "an integer", float: "a number", Path: "a path (string)"}


def _check(s: Setting, value: Any) -> str | None:
    """Why ``value`` (already of the setting's Python type or not) is unusable, or None if it is fine."""
    if s.kind is Path:
        ok = isinstance(value, Path)
    elif s.kind is bool:
        ok = isinstance(value, bool)
    elif s.kind is float:
        ok = isinstance(value, float)
    else:
        ok = isinstance(value, s.kind) and not isinstance(value, bool)
    if not ok:
        return f"expected {_TYPE_NAMES[s.kind]}, got {value!r}"
    if s.kind in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if s.positive and not value > 0:
            return f"must be greater than 0, got {value!r}"
        if (s.minimum is not None and value < s.minimum) or (s.maximum is not None and value > s.maximum):
            return f"must be {s.range_text()}, got {value!r}"
    return None


def _auto(s: Setting, value: Any) -> Any:
    """The value of the word ``auto`` for a setting in AUTO, else None (the value is not that word)."""
    if s.name in AUTO and isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO[s.name]()
    return None


def _type_name(s: Setting) -> str:
    return _TYPE_NAMES[s.kind] + (" or auto" if s.name in AUTO else "")


def _from_value(s: Setting, value: Any) -> Any:
    """A flag or TOML value (already typed by click or tomllib) as the setting's type, or raise
    ``ValueError`` with the reason. No string parsing here: ``port = "22"`` in TOML is a type error
    (only the word ``auto``, for the settings in AUTO)."""
    if (auto := _auto(s, value)) is not None:
        return auto
    if s.kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected {_TYPE_NAMES[s.kind]}, got {value!r}")
    if isinstance(value, bool):  # bool is an int subclass: never let true mean 1
        raise ValueError(f"expected {_TYPE_NAMES[s.kind]}, got {value!r}")
    if s.kind is float and isinstance(value, int):
        return float(value)
    if s.kind is Path and isinstance(value, str | os.PathLike):
        return Path(value)
    if s.kind is str and isinstance(value, str):
        return value
    if s.kind is int and isinstance(value, int):
        return value
    if s.kind is float and isinstance(value, float):
        return value
    raise ValueError(f"expected {_type_name(s)}, got {value!r}")


def _from_text(s: Setting, text: str) -> Any:
    """An environment variable's text as the setting's type, or raise ``ValueError`` with the reason."""
    if (auto := _auto(s, text)) is not None:
        return auto
    if s.kind is bool:
        word = text.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if s.kind is int:
        try:
            return int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"expected {_type_name(s)}, got {text!r}") from None
    if s.kind is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if s.kind is Path:
        return Path(text)
    return text


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file; ``ConfigError`` (one line) if it is unreadable or not valid TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())  # always one line
        raise ConfigError(f"config file {os.fspath(path)} is not valid TOML: {reason}") from None


def config_candidates(env: Mapping[str, str]) -> list[Path]:
    """Where a config file is looked for when none is named, first match wins.

    ``./sshfiles.toml`` (a project directory), then ``$XDG_CONFIG_HOME/sshfiles/config.toml``
    (``~/.config`` without the variable: one user's server), then ``/etc/sshfiles/config.toml`` (a
    service). Why a search at all: the state directories default to the current directory, and an
    admin command run from another directory would otherwise find no accounts (or, before, create an
    empty store there); one file in a known place ties every command to the same state.
    """
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    return [Path("sshfiles.toml"), Path(xdg) / "sshfiles" / "config.toml", Path("/etc/sshfiles/config.toml")]


def find_config(env: Mapping[str, str]) -> Path | None:
    """The first existing file of ``config_candidates``, or None (then every setting is a flag,
    a variable or its default)."""
    for path in config_candidates(env):
        try:
            if path.is_file():
                return path
        except OSError:  # e.g. a service user whose $HOME is another user's (/root): not its file
            continue
    return None


def resolve(flags: Mapping[str, Any], env: Mapping[str, str], toml: Mapping[str, Any],
            *, toml_name: str = "config file", toml_dir: Path | None = None) -> ServeConfig:
    """Build the effective ``ServeConfig``: flag > environment > TOML > default, per setting.

    ``flags`` maps field names to parsed flag values, ``None`` meaning "not given" (click's default);
    ``env`` is usually ``os.environ``; ``toml`` is ``load_toml``'s result (``{}`` without a file) and
    ``toml_name`` how messages call it (e.g. its path). Raises ``ConfigError`` naming the flag, the
    variable or the key for an unknown TOML key or flag name, a wrong type, or a value out of range.
    A relative path from the TOML file is taken relative to ``toml_dir`` (the file's directory), so
    the file means the same directories whatever the current directory is; relative flags and
    variables stay relative to the current directory, as on any command line.
    """
    for key in toml:
        if key not in SETTINGS:
            known = ", ".join(SETTINGS)
            raise ConfigError(f"{toml_name}: unknown key {key!r} (known keys: {known})")
    for key in flags:
        if key not in SETTINGS:
            raise ConfigError(f"unknown serve option {key!r}")
    values: dict[str, Any] = {}
    for name, s in SETTINGS.items():
        flag_value = flags.get(name)
        env_name = s.env or ""
        env_text = env.get(env_name) if env_name else None
        try:
            if flag_value is not None:
                where, value = s.flag, _from_value(s, flag_value)
            elif env_text:
                where, value = env_name, _from_text(s, env_text)
            elif name in toml:
                where, value = f"{toml_name} key {s.toml_key}", _from_value(s, toml[name])
                if isinstance(value, Path) and toml_dir is not None and not value.is_absolute():
                    value = toml_dir / value
            else:
                continue
        except ValueError as exc:
            source = s.flag if flag_value is not None else env_name if env_text else f"{toml_name} key {s.toml_key}"
            raise ConfigError(f"{source}: {exc}") from None
        problem = _check(s, value)
        if problem is None and name in _PARSED:
            try:
                _PARSED[name](value)
            except ValueError as exc:
                problem = str(exc)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        values[name] = value
    return ServeConfig(**values)
