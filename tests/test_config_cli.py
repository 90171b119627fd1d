"""`sshfiles` reads its settings through one model: bad values are one line naming the key, exit 2.

The real command in a subprocess: these are the messages an admin sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def sshfiles(tmp_path: Path, *args: str, toml: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sshfiles"]
    if toml is not None:
        (tmp_path / "sshfiles.toml").write_text(toml)
        cmd += ["--config", str(tmp_path / "sshfiles.toml")]
    cmd += ["--accounts-dir", str(tmp_path / "acc"), "--homes-dir", str(tmp_path / "h"),
            "--keys-dir", str(tmp_path / "k")]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.parametrize("toml,args,needle", [
    ('port = "abc"\n', [], "key port"),
    ('workers = "two"\n', [], "key workers"),
    ("host = 5\n", [], "key host"),
    ('login_timeout = "x"\n', [], "key login_timeout"),
    ("port = 99999\n", [], "key port"),
    ("prot = 22\n", [], "unknown key 'prot'"),
    (None, ["--port", "70000"], "--port"),
    (None, ["--workers", "0"], "--workers"),
    (None, ["--max-auth-tries", "0"], "--max-auth-tries"),
    (None, ["--login-timeout", "-5"], "--login-timeout"),
    (None, ["--idle-timeout", "-1"], "--idle-timeout"),
])
def test_bad_serve_settings_are_one_line_usage_errors(tmp_path: Path, toml: str | None, args: list[str],
                                                      needle: str) -> None:
    res = sshfiles(tmp_path, "serve", "--port", "0", *args, toml=toml) if "--port" not in args \
        else sshfiles(tmp_path, "serve", *args, toml=toml)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert needle in res.stderr and "Traceback" not in res.stderr
    error_lines = [line for line in res.stderr.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, res.stderr
    assert not (tmp_path / "acc").exists()  # refused before anything was created


def test_environment_sets_serve_settings_but_not_the_clients_host(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "sshfiles", "--accounts-dir", str(tmp_path / "acc"), "serve"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "SSHFILES_WORKERS": "zero", "SSHFILES_HOST": "example.com"})
    assert res.returncode == 2 and "SSHFILES_WORKERS" in res.stderr, res.stderr
