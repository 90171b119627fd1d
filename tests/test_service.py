"""Running as a systemd service: the shipped unit passes `systemd-analyze verify`, and `serve` speaks the
readiness protocol (READY=1 once it listens, STOPPING=1 when it drains) to a real NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import make_server

UNIT = Path(__file__).resolve().parents[1] / "contrib" / "sshfiles.service"


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    unit = tmp_path / "sshfiles.service"
    unit.write_text(unit_text)
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def _installed_unit() -> str:
    """The unit as the README installs it, with ExecStart pointing at this machine's `sshfiles`."""
    exe = shutil.which("sshfiles") or str(Path(sys.executable).with_name("sshfiles"))
    if not os.access(exe, os.X_OK):
        pytest.skip("the sshfiles command is not installed (pip install -e .)")
    return UNIT.read_text().replace("/usr/local/bin/sshfiles", exe)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt-get "
                    "install systemd)")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = _installed_unit()
    res = _verify(text, tmp_path)
    assert res.returncode == 0 and "sshfiles.service" not in res.stderr, res.stderr
    directives = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert directives["Type"] == "notify" and directives["User"] == "sshfiles"
    assert directives["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert directives["ProtectSystem"] == "strict" and directives["NoNewPrivileges"] == "yes"
    assert directives["ReadWritePaths"] == "/srv/sshfiles" and directives["ExecReload"].startswith("/bin/kill -HUP")
    # the check is real: a broken unit fails it
    broken = _verify(text.replace("Type=notify", "Type=notifyy"), tmp_path)
    assert "notifyy" in broken.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_notifies_ready_then_stopping(workers: int, tmp_path: Path, host_keys_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    short = Path(tempfile.mkdtemp(prefix="sdn"))  # AF_UNIX paths are limited to 107 bytes
    path = short / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    server = make_server(tmp_path, host_keys_dir, ("--workers", str(workers)))
    try:
        server.start()
        ready = sock.recv(4096).decode()
        lines = ready.split("\n")
        assert "READY=1" in lines
        assert f"STATUS=listening on 127.0.0.1 port {server.port}" in ready
        assert server.proc is not None and f"MAINPID={server.proc.pid}" in lines  # the main process, not a worker
        os.kill(server.proc.pid, signal.SIGTERM)
        stopping = sock.recv(4096).decode()
        assert "STOPPING=1" in stopping.split("\n")
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
        sock.close()
        shutil.rmtree(short, ignore_errors=True)
