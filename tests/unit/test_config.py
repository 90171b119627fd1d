"""sshfiles.config: defaults, precedence (flag > env > TOML > default), types, ranges, one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from sshfiles.config import SETTINGS, ConfigError, ServeConfig, auto_workers, load_toml, resolve

DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1", "port": 2222, "keys_dir": Path("keys"), "accounts_dir": Path("accounts"),
    "homes_dir": Path("homes"), "store": "", "node_lease": 15.0, "proxy_protocol_from": "",
    "login_timeout": 60.0, "max_auth_tries": 6, "workers": auto_workers(),
    "idle_timeout": 900.0, "grace": 30.0,
    "max_startups": "10:30:100", "per_source_max_startups": 10, "per_source_rate": 5.0, "per_source_burst": 10,
    "ban_threshold": 10.0, "ban_window": 60.0, "ban_time": 300.0, "ban_max": 86400.0, "ban_exempt": "",
    "max_sessions_per_user": 64, "max_channels_per_connection": 10, "legacy_algorithms": False,
    "upload_mode": "standard", "on_upload": "", "on_download": "", "on_delete": "", "on_rename": "",
    "hook_timeout": 30.0,
    "max_handles_per_session": 0, "max_handles_per_user": 0, "reply_buffer_limit": 4194304,
    "max_hash_bytes": 64 << 30, "hash_workers": 2, "hash_per_user_active": 2, "hash_per_user_waiting": 16,
    "log_format": "text", "log_file": "", "metrics_listen": "",
}

# One valid value per setting for each layer, all different from each other and from the default.
FLAG = {"host": "10.0.0.1", "port": 1, "keys_dir": Path("/f/keys"), "accounts_dir": Path("/f/acc"),
        "homes_dir": Path("/f/homes"), "login_timeout": 1.5, "max_auth_tries": 1, "workers": 4,
        "idle_timeout": 5.0, "grace": 2.0}
ENV = {"host": "10.0.0.2", "port": "2", "keys_dir": "/e/keys", "accounts_dir": "/e/acc", "homes_dir": "/e/homes",
       "login_timeout": "2.5", "max_auth_tries": "2", "workers": "5", "idle_timeout": "6", "grace": "3"}
ENV_PARSED = {"host": "10.0.0.2", "port": 2, "keys_dir": Path("/e/keys"), "accounts_dir": Path("/e/acc"),
              "homes_dir": Path("/e/homes"), "login_timeout": 2.5, "max_auth_tries": 2, "workers": 5,
              "idle_timeout": 6.0, "grace": 3.0}
TOML = {"host": "10.0.0.3", "port": 3, "keys_dir": "/t/keys", "accounts_dir": "/t/acc", "homes_dir": "/t/homes",
        "login_timeout": 3.5, "max_auth_tries": 3, "workers": 6, "idle_timeout": 7, "grace": 4.0}
TOML_PARSED = {"host": "10.0.0.3", "port": 3, "keys_dir": Path("/t/keys"), "accounts_dir": Path("/t/acc"),
               "homes_dir": Path("/t/homes"), "login_timeout": 3.5, "max_auth_tries": 3, "workers": 6,
               "idle_timeout": 7.0, "grace": 4.0}


# The pre-auth defence settings (one value per layer, as above).
FLAG.update(max_startups="1:2:3", per_source_max_startups=1, per_source_rate=1.5, per_source_burst=1,
            ban_threshold=1.0, ban_window=1.0, ban_time=1.0, ban_max=1.0, ban_exempt="10.1.0.0/16",
            max_sessions_per_user=1, max_channels_per_connection=1, legacy_algorithms=True,
            max_handles_per_session=1, max_handles_per_user=1, reply_buffer_limit=65536, max_hash_bytes=1,
            hash_workers=1, hash_per_user_active=1, hash_per_user_waiting=1)
ENV.update(max_startups="4:5:6", per_source_max_startups="2", per_source_rate="2.5", per_source_burst="2",
           ban_threshold="2", ban_window="2", ban_time="2", ban_max="2", ban_exempt="10.2.0.0/16",
           max_sessions_per_user="2", max_channels_per_connection="2", legacy_algorithms="yes",
           max_handles_per_session="2", max_handles_per_user="2", reply_buffer_limit="65537", max_hash_bytes="2",
           hash_workers="2", hash_per_user_active="2", hash_per_user_waiting="2")
ENV_PARSED.update(max_startups="4:5:6", per_source_max_startups=2, per_source_rate=2.5, per_source_burst=2,
                  ban_threshold=2.0, ban_window=2.0, ban_time=2.0, ban_max=2.0, ban_exempt="10.2.0.0/16",
                  max_sessions_per_user=2, max_channels_per_connection=2, legacy_algorithms=True,
                  max_handles_per_session=2, max_handles_per_user=2, reply_buffer_limit=65537, max_hash_bytes=2,
                  hash_workers=2, hash_per_user_active=2, hash_per_user_waiting=2)
TOML.update(max_startups="7:8:9", per_source_max_startups=3, per_source_rate=3, per_source_burst=3,
            ban_threshold=3, ban_window=3, ban_time=3, ban_max=3, ban_exempt="10.3.0.0/16, 2001:db8::/32",
            max_sessions_per_user=3, max_channels_per_connection=3, legacy_algorithms=True,
            max_handles_per_session=3, max_handles_per_user=3, reply_buffer_limit=65538, max_hash_bytes=3,
            hash_workers=3, hash_per_user_active=3, hash_per_user_waiting=3)
TOML_PARSED.update(max_startups="7:8:9", per_source_max_startups=3, per_source_rate=3.0, per_source_burst=3,
                   ban_threshold=3.0, ban_window=3.0, ban_time=3.0, ban_max=3.0,
                   ban_exempt="10.3.0.0/16, 2001:db8::/32", max_sessions_per_user=3,
                   max_channels_per_connection=3, legacy_algorithms=True,
                   max_handles_per_session=3, max_handles_per_user=3, reply_buffer_limit=65538, max_hash_bytes=3,
                   hash_workers=3, hash_per_user_active=3, hash_per_user_waiting=3)

# Atomic uploads and hooks.
FLAG.update(upload_mode="atomic", on_upload="/f/up", on_download="/f/down", on_delete="/f/del",
            on_rename="/f/ren", hook_timeout=1.0)
ENV.update(upload_mode="atomic-resume", on_upload="/e/up 'a b'", on_download="/e/down", on_delete="/e/del",
           on_rename="/e/ren", hook_timeout="2")
ENV_PARSED.update(upload_mode="atomic-resume", on_upload="/e/up 'a b'", on_download="/e/down",
                  on_delete="/e/del", on_rename="/e/ren", hook_timeout=2.0)
TOML.update(upload_mode="standard", on_upload="/t/up", on_download="/t/down", on_delete="/t/del",
            on_rename="/t/ren", hook_timeout=3)
TOML_PARSED.update(upload_mode="standard", on_upload="/t/up", on_download="/t/down", on_delete="/t/del",
                   on_rename="/t/ren", hook_timeout=3.0)


def test_upload_mode_and_hook_commands_are_checked_naming_the_source() -> None:
    with pytest.raises(ConfigError, match="--upload-mode: expected one of standard, atomic, atomic-resume"):
        resolve({"upload_mode": "atomik"}, {}, {})
    with pytest.raises(ConfigError, match="SSHFILES_ON_UPLOAD: cannot split"):
        resolve({}, {"SSHFILES_ON_UPLOAD": "/bin/echo 'unclosed"}, {})
    with pytest.raises(ConfigError, match="key hook_timeout"):
        resolve({}, {}, {"hook_timeout": 0})

# Running as a daemon (log_format has a single non-default value, so its layers share it).
FLAG.update(log_format="json", log_file="/f/log", metrics_listen="127.0.0.1:1")
ENV.update(log_format="json", log_file="/e/log", metrics_listen="127.0.0.2:2")
ENV_PARSED.update(log_format="json", log_file="/e/log", metrics_listen="127.0.0.2:2")
TOML.update(log_format="json", log_file="/t/log", metrics_listen="[::1]:3")
TOML_PARSED.update(log_format="json", log_file="/t/log", metrics_listen="[::1]:3")


def test_log_format_and_metrics_listen_syntax_is_checked() -> None:
    with pytest.raises(ConfigError, match="--log-format: must be text or json"):
        resolve({"log_format": "xml"}, {}, {})
    with pytest.raises(ConfigError, match="SSHFILES_METRICS_LISTEN"):
        resolve({}, {"SSHFILES_METRICS_LISTEN": "9122"}, {})
    with pytest.raises(ConfigError, match="key metrics_listen"):
        resolve({}, {}, {"metrics_listen": "localhost:http"})

# Several nodes: the store URL, the owners' lease, the PROXY protocol balancers.
FLAG.update(store="postgresql://f@db/x", node_lease=1.5, proxy_protocol_from="10.9.0.1")
ENV.update(store="postgresql://e@db/x", node_lease="2.5", proxy_protocol_from="10.9.0.2")
ENV_PARSED.update(store="postgresql://e@db/x", node_lease=2.5, proxy_protocol_from="10.9.0.2")
TOML.update(store="sqlite:/t/acc", node_lease=3, proxy_protocol_from="10.9.0.0/24")
TOML_PARSED.update(store="sqlite:/t/acc", node_lease=3.0, proxy_protocol_from="10.9.0.0/24")


def test_store_url_and_balancers_are_checked_without_echoing_the_url() -> None:
    with pytest.raises(ConfigError, match="SSHFILES_STORE: expected postgresql") as err:
        resolve({}, {"SSHFILES_STORE": "mysql://root:hunter2@db/x"}, {})
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="--proxy-protocol-from"):
        resolve({"proxy_protocol_from": "10.0.0.0/33"}, {}, {})
    with pytest.raises(ConfigError, match="key node_lease"):
        resolve({}, {}, {"node_lease": 0})


def test_syntax_of_startups_and_exempt_is_checked_naming_the_source() -> None:
    with pytest.raises(ConfigError, match="--max-startups"):
        resolve({"max_startups": "10:30"}, {}, {})
    with pytest.raises(ConfigError, match="key ban_exempt"):
        resolve({}, {}, {"ban_exempt": "10.0.0.0/33"})
    with pytest.raises(ConfigError, match="SSHFILES_LEGACY_ALGORITHMS"):
        resolve({}, {"SSHFILES_LEGACY_ALGORITHMS": "maybe"}, {})
    with pytest.raises(ConfigError, match="key legacy_algorithms"):
        resolve({}, {}, {"legacy_algorithms": 1})

NO_ENV = {"host", "port"}  # SSHFILES_HOST/SSHFILES_PORT belong to sshfiles-cli (the server it connects to)


def env_of(name: str, text: str) -> dict[str, str]:
    env = SETTINGS[name].env
    return {env: text} if env else {}


def test_every_setting_is_listed_once_with_its_default() -> None:
    assert list(SETTINGS) == list(DEFAULTS)
    assert dataclasses.asdict(resolve({}, {}, {})) == DEFAULTS
    assert dataclasses.asdict(ServeConfig()) == DEFAULTS
    for name, s in SETTINGS.items():
        assert s.default == DEFAULTS[name]


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_metadata_names(name: str) -> None:
    s = SETTINGS[name]
    assert s.env == (None if name in NO_ENV else "SSHFILES_" + name.upper())
    assert s.flag == "--" + name.replace("_", "-")
    assert s.toml_key == name
    assert s.help and "\n" not in s.help


def test_metadata_examples() -> None:
    assert SETTINGS["login_timeout"].flag == "--login-timeout"
    assert SETTINGS["keys_dir"].env == "SSHFILES_KEYS_DIR"


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_precedence_flag_env_toml_default(name: str) -> None:
    env = env_of(name, ENV[name])
    toml = {name: TOML[name]}
    flags = {name: FLAG[name]}
    assert getattr(resolve(flags, env, toml), name) == FLAG[name]
    if name not in NO_ENV:
        assert getattr(resolve({name: None}, env, toml), name) == ENV_PARSED[name]
    assert getattr(resolve({}, {}, toml), name) == TOML_PARSED[name]
    assert getattr(resolve({}, {}, {}), name) == DEFAULTS[name]


def test_layers_mix_per_setting() -> None:
    cfg = resolve({"port": 2200}, {"SSHFILES_WORKERS": "3"}, {"host": "0.0.0.0", "port": 1})
    assert (cfg.port, cfg.workers, cfg.host, cfg.grace) == (2200, 3, "0.0.0.0", 30.0)


@pytest.mark.parametrize("name", ["port", "idle_timeout", "grace"])
def test_zero_is_a_value_not_unset(name: str) -> None:
    env = env_of(name, "7")
    toml = {name: 8}
    assert getattr(resolve({name: 0}, env, toml), name) == 0
    if name not in NO_ENV:
        assert getattr(resolve({}, env_of(name, "0"), toml), name) == 0
    assert getattr(resolve({}, {}, {name: 0}), name) == 0


def test_empty_environment_variable_is_unset() -> None:
    assert resolve({}, {"SSHFILES_WORKERS": ""}, {"workers": 9}).workers == 9


def test_client_variables_never_move_the_server() -> None:
    env = {"SSHFILES_HOST": "files.example.com", "SSHFILES_PORT": "22"}
    assert (resolve({}, env, {}).host, resolve({}, env, {}).port) == ("127.0.0.1", 2222)


def test_unrelated_environment_is_ignored() -> None:
    assert resolve({}, {"SSHFILES_CONFIG": "x.toml", "PORT": "1", "HOME": "/root"}, {}) == ServeConfig()


def test_integers_in_toml_are_accepted_for_float_settings() -> None:
    cfg = resolve({}, {}, {"login_timeout": 5, "grace": 0})
    assert cfg.login_timeout == 5.0 and isinstance(cfg.login_timeout, float)
    assert cfg.grace == 0.0 and isinstance(cfg.grace, float)


def assert_one_line_error(exc: pytest.ExceptionInfo[ConfigError], *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("toml,needles", [
    ({"port": "abc"}, ("port", "integer", "'abc'")),
    ({"port": "22"}, ("port", "integer")),
    ({"port": 22.0}, ("port", "integer")),
    ({"workers": "two"}, ("workers", "integer or auto", "'two'")),
    ({"host": 5}, ("host", "string")),
    ({"workers": True}, ("workers", "True")),
    ({"max_auth_tries": False}, ("max_auth_tries",)),
    ({"login_timeout": True}, ("login_timeout",)),
    ({"grace": "soon"}, ("grace", "number")),
    ({"keys_dir": 1}, ("keys_dir", "path")),
    ({"homes_dir": ["a"]}, ("homes_dir",)),
])
def test_wrong_types_in_toml(toml: dict[str, Any], needles: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({}, {}, toml)
    assert_one_line_error(exc, "config file key", *needles)


@pytest.mark.parametrize("var,text", [("SSHFILES_MAX_AUTH_TRIES", "abc"), ("SSHFILES_WORKERS", "two"),
                                      ("SSHFILES_WORKERS", "2.0"), ("SSHFILES_LOGIN_TIMEOUT", "1m"),
                                      ("SSHFILES_IDLE_TIMEOUT", "nan"), ("SSHFILES_GRACE", "inf")])
def test_wrong_environment_text(var: str, text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({}, {var: text}, {})
    assert_one_line_error(exc, var)


@pytest.mark.parametrize("flags,needle", [({"port": "2222"}, "--port"), ({"workers": True}, "--workers"),
                                          ({"host": 1}, "--host"), ({"login_timeout": "5"}, "--login-timeout")])
def test_wrong_flag_types(flags: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve(flags, {}, {})
    assert_one_line_error(exc, needle)


@pytest.mark.parametrize("name,bad,good", [
    ("port", -1, 0), ("port", 65536, 65535),
    ("login_timeout", 0, 0.001), ("login_timeout", -1.0, 1e-9),
    ("max_auth_tries", 0, 1), ("workers", 0, 1), ("workers", -3, 1),
    ("idle_timeout", -0.5, 0), ("grace", -1, 0),
])
def test_ranges_from_every_layer(name: str, bad: Any, good: Any) -> None:
    s = SETTINGS[name]
    layers = [({name: bad}, {}, {}, s.flag), ({}, {}, {name: bad}, f"config file key {name}")]
    if s.env:
        layers.append(({}, env_of(name, str(bad)), {}, s.env))
    for flags, env, toml, where in layers:
        with pytest.raises(ConfigError) as exc:
            resolve(flags, env, toml)
        assert_one_line_error(exc, where, "must be")
    assert getattr(resolve({name: good}, {}, {}), name) == good


def test_unknown_toml_key_names_it() -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({}, {}, {"prot": 22}, toml_name="/etc/sshfiles.toml")
    assert_one_line_error(exc, "/etc/sshfiles.toml", "'prot'", "unknown key")
    with pytest.raises(ConfigError):
        resolve({}, {}, {"server": {"port": 22}})  # tables are not settings


def test_unknown_flag_name() -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({"colour": "blue"}, {}, {})
    assert_one_line_error(exc, "colour")


def test_a_bad_lower_layer_is_reported_even_when_overridden() -> None:
    """Unknown keys always fail; a mistyped TOML value is only parsed when it is the one used."""
    assert resolve({"port": 1}, {}, {"port": 1}).port == 1
    with pytest.raises(ConfigError):
        resolve({"port": 1}, {}, {"typo": 1})


def test_workers_auto_is_one_per_usable_cpu_at_most_8_from_every_layer() -> None:
    import os
    expected = max(1, min(8, len(os.sched_getaffinity(0))))
    assert auto_workers() == expected == ServeConfig().workers == resolve({}, {}, {}).workers
    assert resolve({"workers": "auto"}, {}, {"workers": 3}).workers == expected
    assert resolve({}, {"SSHFILES_WORKERS": " AUTO "}, {"workers": 3}).workers == expected
    assert resolve({}, {}, {"workers": "auto"}).workers == expected
    assert resolve({}, {"SSHFILES_WORKERS": "1"}, {"workers": "auto"}).workers == 1  # one process stays possible
    with pytest.raises(ConfigError) as exc:
        resolve({}, {"SSHFILES_WORKERS": "many"}, {})
    assert_one_line_error(exc, "SSHFILES_WORKERS", "integer or auto", "'many'")
    with pytest.raises(ConfigError):
        resolve({}, {}, {"port": "auto"})  # only the settings that have an automatic value take the word


def test_direct_construction_is_validated_and_frozen() -> None:
    with pytest.raises(ConfigError) as exc:
        ServeConfig(workers=0)
    assert_one_line_error(exc, "workers")
    with pytest.raises(ConfigError):
        ServeConfig(keys_dir="keys")  # type: ignore[arg-type]
    cfg = ServeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]


def test_load_toml(tmp_path: Path) -> None:
    path = tmp_path / "sshfiles.toml"
    path.write_text('host = "0.0.0.0"\nport = 0\nidle_timeout = 0\nkeys_dir = "/srv/keys"\n')
    cfg = resolve({}, {}, load_toml(path))
    assert (cfg.host, cfg.port, cfg.idle_timeout, cfg.keys_dir) == ("0.0.0.0", 0, 0.0, Path("/srv/keys"))


@pytest.mark.parametrize("content,needle", [
    ("port = \n", "not valid TOML"),
    ("port = 1\nport = 2\n", "not valid TOML"),
    ("[unclosed\n", "not valid TOML"),
    (b"host = \"\xff\"\n", "not valid TOML"),
])
def test_load_toml_invalid(tmp_path: Path, content: str | bytes, needle: str) -> None:
    path = tmp_path / "bad.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        load_toml(path)
    assert_one_line_error(exc, str(path), needle)


def test_load_toml_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_toml(tmp_path / "missing.toml")
    assert_one_line_error(exc, "missing.toml", "No such file")
    with pytest.raises(ConfigError) as exc:
        load_toml(tmp_path)
    assert_one_line_error(exc, "cannot read config file")


def test_relative_toml_paths_are_relative_to_the_file_and_flags_to_the_cwd(tmp_path: Path) -> None:
    toml = {"keys_dir": "k", "accounts_dir": "/abs/acc", "homes_dir": "../h"}
    cfg = resolve({}, {}, toml, toml_dir=tmp_path / "etc")
    assert cfg.keys_dir == tmp_path / "etc" / "k"
    assert cfg.accounts_dir == Path("/abs/acc")
    assert cfg.homes_dir == tmp_path / "etc" / ".." / "h"
    cfg = resolve({"keys_dir": "flagged"}, {"SSHFILES_HOMES_DIR": "env"}, toml, toml_dir=tmp_path)
    assert cfg.keys_dir == Path("flagged") and cfg.homes_dir == Path("env")
    assert resolve({}, {}, {}, toml_dir=tmp_path).keys_dir == Path("keys")  # defaults: the current directory


def test_config_file_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sshfiles.config import config_candidates, find_config
    monkeypatch.chdir(tmp_path)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    assert config_candidates(env) == [Path("sshfiles.toml"), tmp_path / "xdg" / "sshfiles" / "config.toml",
                                      Path("/etc/sshfiles/config.toml")]
    assert config_candidates({"HOME": "/home/u"})[1] == Path("/home/u/.config/sshfiles/config.toml")
    xdg = tmp_path / "xdg" / "sshfiles" / "config.toml"
    xdg.parent.mkdir(parents=True)
    xdg.write_text("")
    assert find_config(env) == xdg
    (tmp_path / "sshfiles.toml").write_text("")
    assert find_config(env) == Path("sshfiles.toml")
