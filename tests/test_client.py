"""End-to-end tests of sshfiles-cli against the real server (`server` fixture from conftest.py).

The client runs as a subprocess, so it can be SIGKILLed mid-transfer like a real interrupted run;
bytes are counted through a small loopback TCP proxy written here, which is how "resumed, sending only
the remainder" is proven. Nothing is mocked: real server, real SSH, real files.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sshfiles.client.transfer import check_file

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "sshfiles.client.cli"]
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers

class CountingProxy:
    """Loopback TCP relay that counts bytes each way and can slow the upstream-bound direction.

    ``delay`` seconds are slept per relayed 64 KiB, which stretches a transfer out long enough to kill
    the client in the middle of it deterministically.
    """

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.up = 0     # client -> server
        self.down = 0   # server -> client
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self._stop = False
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst, attr in ((client, upstream, "up"), (upstream, client, "down")):
                t = threading.Thread(target=self._pump, args=(src, dst, attr), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, attr: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    setattr(self, attr, getattr(self, attr) + len(data))
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._sock.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_file(path: Path, size: int, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB pattern, varied per seed
    rnd = os.urandom(size % 65536)
    with open(path, "wb") as f:
        for i in range(size // 65536):
            f.write(block[i % 64:] + block[:i % 64])
        f.write(rnd)
    return path


class Cli:
    """Runs sshfiles-cli for one user against one port (the server's or a proxy's)."""

    def __init__(self, server, user, tmp: Path) -> None:
        self.server, self.user, self.tmp = server, user, tmp
        self.known_hosts = tmp / "known_hosts"
        self.env = dict(os.environ, SSHFILES_PASSWORD=user.password or "", PYTHONPATH=str(ROOT))

    def argv(self, *args: str, port: int | None = None) -> list[str]:
        return [*CLI, "--host", self.server.host, "--port", str(port or self.server.port), "-u", self.user.name, "--known-hosts", str(self.known_hosts), *args]

    def run(self, *args: str, port: int | None = None, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args, port=port), env=self.env, cwd=self.tmp, text=True,
                              capture_output=True, timeout=timeout, input=input)

    def spawn(self, *args: str, port: int | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args, port=port), env=self.env, cwd=self.tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def cli(server, tmp_path):
    user = server.add_user("alice", quota="1GiB")
    work = tmp_path / "work"
    work.mkdir()
    return Cli(server, user, work)


def no_traceback(res: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in res.stderr, res.stderr


def kill_when(proc: subprocess.Popen, cond, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return
        if proc.poll() is not None:
            raise AssertionError(f"client finished before it could be killed: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("condition for killing the client never became true")


# --------------------------------------------------------------------------- basic transfers

def test_put_get_file_and_tree(cli):
    src = cli.tmp / "tree"
    files = {Path("a.bin"): 3 * MiB + 5, Path("sub/b.bin"): 1000, Path("sub/deeper/c.bin"): 0,
             Path("sub/deeper/d.bin"): 700 * 1024}
    for i, (rel, size) in enumerate(files.items()):
        make_file(src / rel, size, seed=i)

    res = cli.run("put", "-r", "-j", "3", "tree", "up")
    assert res.returncode == 0, res.stderr
    no_traceback(res)
    assert res.stderr.count("sha256 verified") == len(files)
    for rel in files:
        assert sha256(cli.user.home / "up" / rel) == sha256(src / rel)

    res = cli.run("get", "-r", "up", "down")
    assert res.returncode == 0, res.stderr
    for rel in files:
        assert sha256(cli.tmp / "down" / rel) == sha256(src / rel)

    res = cli.run("put", str(src / "a.bin"))  # single file into the home, then hash it there
    assert res.returncode == 0, res.stderr
    res = cli.run("hash", "a.bin", "up/sub/b.bin")
    assert res.stdout.splitlines() == [f"{sha256(src / 'a.bin')}  a.bin",
                                       f"{sha256(src / 'sub/b.bin')}  up/sub/b.bin"]


def test_remote_commands_and_errors(cli):
    make_file(cli.tmp / "f.bin", 1234)
    assert cli.run("mkdir", "-p", "x/y/z").returncode == 0
    assert cli.run("put", "f.bin", "x/y/f.bin").returncode == 0
    res = cli.run("ls", "-l", "x/y")
    assert re.search(r"^-rw.* 1234 .* f\.bin$", res.stdout, re.M) and "z" in res.stdout
    assert cli.run("ls", "x").stdout.split() == ["y/"]
    assert cli.run("mv", "x/y/f.bin", "x/g.bin").returncode == 0
    assert (cli.user.home / "x/g.bin").exists()
    res = cli.run("rmdir", "x")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1
    no_traceback(res)
    assert cli.run("rm", "-r", "x").returncode == 0
    assert not (cli.user.home / "x").exists()

    res = cli.run("get", "nope.bin")
    assert res.returncode == 5
    assert res.stderr.strip() == "sshfiles-cli: nope.bin: No such file or directory"
    res = cli.run("put", "missing-local.bin")
    assert res.returncode == 5 and "missing-local.bin" in res.stderr
    no_traceback(res)

    res = cli.run("df")
    assert res.returncode == 0 and "1.0 GiB" in res.stdout, res.stdout


def test_wrong_password_and_host_key_changed(cli):
    first = cli.run("ls")
    assert first.returncode == 0
    assert "trusted on first use" in first.stderr and "SHA256:" in first.stderr
    assert "trusted on first use" not in cli.run("ls").stderr

    bad = dict(cli.env, SSHFILES_PASSWORD="wrong")
    res = subprocess.run(cli.argv("ls"), env=bad, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "permission denied" in res.stderr
    no_traceback(res)

    # Replace the recorded key with another one of the same type: OpenSSH-style hard failure.
    import asyncssh
    line = cli.known_hosts.read_text().split()
    other = asyncssh.generate_private_key(line[1]).export_public_key().decode().split()[1]
    cli.known_hosts.write_text(f"{line[0]} {line[1]} {other}\n")
    res = cli.run("ls")
    assert res.returncode == 4, res.stderr
    assert "host key changed" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    no_traceback(res)


def test_shell_session(cli):
    make_file(cli.tmp / "s.bin", 4096)
    script = "help\nmkdir d\ncd d\npwd\nput s.bin\nls -l\nget s.bin back.bin\ncd /nonexistent\nexit\n"
    res = cli.run("shell", input=script)
    assert res.returncode == 5, res.stderr  # a script stops at its first failure (cd), with its status
    assert "put [-r]" in res.stdout
    assert re.search(r"^/.*d$", res.stdout, re.M)
    assert " 4096 " in res.stdout
    assert "nonexistent" in res.stderr
    assert sha256(cli.tmp / "back.bin") == sha256(cli.tmp / "s.bin")
    assert (cli.user.home / "d" / "s.bin").exists()


# --------------------------------------------------------------------------- resume

@pytest.mark.slow
def test_upload_killed_then_resumed_sends_only_rest(cli):
    size = 48 * MiB
    src = make_file(cli.tmp / "big.bin", size)
    proxy = CountingProxy(cli.server.port, delay=0.002)
    try:
        proc = cli.spawn("put", "big.bin", port=proxy.port)
        target = cli.user.home / "big.bin"
        kill_when(proc, lambda: target.exists() and target.stat().st_size > size // 2)
        partial = target.stat().st_size
        assert partial < size

        proxy.reset()
        proxy.delay = 0
        res = cli.run("put", "big.bin", port=proxy.port)
        assert res.returncode == 0, res.stderr
        assert "resumed at" in res.stderr and "warning" not in res.stderr
        assert sha256(target) == sha256(src)
        remainder = size - partial
        # everything after the partial, plus in-flight holes and protocol overhead, but far from all
        assert proxy.up < remainder + 10 * MiB, (proxy.up, remainder)
        assert proxy.up < size * 0.8
    finally:
        proxy.close()


@pytest.mark.slow
def test_download_killed_then_resumed_receives_only_rest(cli):
    size = 48 * MiB
    make_file(cli.user.home / "big.bin", size)
    # the server's ledger counts files it did not write only after a rescan
    cli.server.cli("quota", "scan", "alice")
    proxy = CountingProxy(cli.server.port, delay=0.002)
    try:
        proc = cli.spawn("get", "big.bin", "local.bin", port=proxy.port)
        local = cli.tmp / "local.bin"
        kill_when(proc, lambda: local.exists() and local.stat().st_size > size // 2)
        partial = local.stat().st_size
        proxy.reset()
        proxy.delay = 0
        res = cli.run("get", "big.bin", "local.bin", port=proxy.port)
        assert res.returncode == 0, res.stderr
        assert "resumed at" in res.stderr
        assert sha256(local) == sha256(cli.user.home / "big.bin")
        assert proxy.down < size - partial + 10 * MiB, (proxy.down, size - partial)
    finally:
        proxy.close()


def _upload_via_sftp(server, user, name: str, data: bytes) -> None:
    async def go():
        async with server.sftp(user) as sftp, sftp.open(name, "wb") as f:
            await f.write(data)
    asyncio.run(go())


def test_tampered_partial_restarts_and_holes_resume(cli):
    size = 24 * MiB
    src = make_file(cli.tmp / "f.bin", size, seed=7)
    data = src.read_bytes()

    # Tampered early in the partial: not our prefix -> warning, restart from zero.
    tampered = bytearray(data[:16 * MiB])
    tampered[1000] ^= 0xFF
    _upload_via_sftp(cli.server, cli.user, "f.bin", bytes(tampered))
    res = cli.run("put", "f.bin")
    assert res.returncode == 0, res.stderr
    assert "does not match" in res.stderr and "restarting from zero" in res.stderr
    assert "resumed at" not in res.stderr
    assert sha256(cli.user.home / "f.bin") == sha256(src)

    # Holes just below the end (what a killed pipelined upload leaves): resume, no warning.
    holed = bytearray(data[:16 * MiB])
    holed[15 * MiB:15 * MiB + 512 * 1024] = bytes(512 * 1024)
    _upload_via_sftp(cli.server, cli.user, "g.bin", bytes(holed))
    res = cli.run("put", "f.bin", "g.bin")
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr
    m = re.search(r"resumed at ([\d.]+) MiB", res.stderr)
    assert m and 14.5 <= float(m.group(1)) <= 15.0, res.stderr
    assert sha256(cli.user.home / "g.bin") == sha256(src)

    # Same for downloads: a tampered local partial is restarted.
    local = cli.tmp / "dl.bin"
    bad = bytearray(data[:8 * MiB])
    bad[5] ^= 1
    local.write_bytes(bytes(bad))
    res = cli.run("get", "f.bin", "dl.bin")
    assert res.returncode == 0 and "restarting from zero" in res.stderr, res.stderr
    assert sha256(local) == sha256(src)

    # --no-resume always starts over, silently.
    res = cli.run("put", "--no-resume", "f.bin")
    assert res.returncode == 0 and "resumed" not in res.stderr and "warning" not in res.stderr


def test_quota_exceeded_mid_upload_then_resume(server, tmp_path):
    user = server.add_user("bob", quota="10MiB")
    work = tmp_path / "w"
    work.mkdir()
    c = Cli(server, user, work)
    src = make_file(work / "big.bin", 16 * MiB)
    res = c.run("put", "big.bin")
    assert res.returncode == 6, res.stderr
    no_traceback(res)
    lines = res.stderr.strip().splitlines()
    err = [l for l in lines if l.startswith("sshfiles-cli:") and "trusted on first use" not in l]
    assert len(err) == 1 and "quota" in err[0].lower() and re.search(r"\d", err[0]), res.stderr
    partial = (user.home / "big.bin").stat().st_size
    assert 0 < partial <= 10 * MiB

    server.cli("user", "quota", "bob", "64MiB")
    res = c.run("put", "big.bin")
    assert res.returncode == 0, res.stderr
    assert "resumed at" in res.stderr
    assert sha256(user.home / "big.bin") == sha256(src)


# --------------------------------------------------------------------------- progress output

def test_progress_plain_and_quiet(cli):
    make_file(cli.tmp / "p1.bin", 2 * MiB)
    make_file(cli.tmp / "p2.bin", 1 * MiB, seed=3)
    res = cli.run("put", "p1.bin", "p2.bin", ".")
    assert res.returncode == 0
    lines = [l for l in res.stderr.strip().splitlines() if "trusted on first use" not in l]
    assert len(lines) == 2 and all("sha256 verified" in l for l in lines), res.stderr
    assert "\r" not in res.stderr
    res = cli.run("-q", "put", "p1.bin", "p2.bin", ".")
    assert res.returncode == 0 and res.stderr == "" and res.stdout == ""


def test_progress_tty(cli):
    make_file(cli.tmp / "t1.bin", 8 * MiB)
    make_file(cli.tmp / "t2.bin", 4 * MiB, seed=2)
    cmd = " ".join(shlex.quote(a) for a in cli.argv("put", "t1.bin", "t2.bin", "."))
    res = subprocess.run(["script", "-qec", cmd, "/dev/null"], env=cli.env, cwd=cli.tmp,
                         capture_output=True, timeout=120)  # bytes: text mode would eat the \r
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out
    assert "\r" in out                         # bars redraw in place
    assert re.search(r"total \(2 files\)", out)  # overall bar
    assert re.search(r"[\d.]+ [KM]iB/s", out)  # rate, in the summaries' binary units
    assert "sha256 verified" in out


# --------------------------------------------------------------------------- server-side hashing

def test_check_file_whole_and_ranges(server, tmp_path):
    user = server.add_user("carol")
    data = make_file(user.home / "h.bin", 3 * MiB + 123, seed=5).read_bytes()
    server.cli("quota", "scan", "carol")

    async def go():
        async with server.sftp(user) as sftp:
            out = {}
            for alg in ("md5", "sha1", "sha256", "sha512"):
                out[alg] = await check_file(sftp, b"h.bin", by_handle=False, algorithms=alg)
            # WinSCP-style preference list: first supported wins
            out["pref"] = await check_file(sftp, b"h.bin", by_handle=False, algorithms="tiger,sha1,md5")
            out["range"] = await check_file(sftp, b"h.bin", by_handle=False, algorithms="sha256",
                                            offset=1000, length=2 * MiB)
            async with sftp.open("h.bin", "rb") as f:
                out["blocks"] = await check_file(sftp, f.handle, by_handle=True, algorithms="md5",
                                                 offset=0, length=0, block_size=MiB)
            return out

    out = asyncio.run(go())
    for alg in ("md5", "sha1", "sha256", "sha512"):
        assert out[alg] == (alg, [hashlib.new(alg, data).digest()])
    assert out["pref"] == ("sha1", [hashlib.sha1(data).digest()])
    assert out["range"] == ("sha256", [hashlib.sha256(data[1000:1000 + 2 * MiB]).digest()])
    assert out["blocks"] == ("md5", [hashlib.md5(data[i:i + MiB]).digest()
                                     for i in range(0, len(data), MiB)])


def test_sha256sum_exec_via_openssh(server):
    user = server.add_user("dave")
    data = make_file(user.home / "dir" / "f x.bin", 100000).read_bytes()
    target = f"{user.name}@{server.host}"
    res = server.openssh("ssh", user, [target, "sha256sum", "'dir/f x.bin'"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{hashlib.sha256(data).hexdigest()}  dir/f x.bin\n"
    res = server.openssh("ssh", user, [target, "md5sum /dir/f\\ x.bin"])  # rclone's escaping
    assert res.stdout == f"{hashlib.md5(data).hexdigest()}  /dir/f x.bin\n"
    res = server.openssh("ssh", user, [target, "md5sum"], input="")  # rclone's probe
    assert res.stdout.split()[0] == hashlib.md5(b"").hexdigest()
    res = server.openssh("ssh", user, [target, "sha1sum", "/nope"])
    assert res.returncode == 1 and res.stderr.strip() == "sha1sum: /nope: No such file or directory"
    res = server.openssh("ssh", user, [target, "sha1sum", "../../etc/passwd"])
    assert res.returncode == 1 and "passwd" in res.stderr and str(server.root) not in res.stderr
    res = server.openssh("ssh", user, [target, "cat", "/etc/passwd"])
    assert res.returncode == 1 and "sshfiles: command not allowed" in res.stderr
    res = server.openssh("ssh", user, [target, "md5sum x; rm -rf /"])
    assert res.returncode == 1 and "not allowed" in res.stderr
