"""Fixtures that start a real `sshfiles serve` on a free loopback port and drive it with real clients.

Nothing here mocks SSH, SFTP, the filesystem or the accounts store: the
server is the installed command in a subprocess, state lives in a temporary
directory, and clients are asyncssh, paramiko and the OpenSSH binaries.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

HOST = "127.0.0.1"


@dataclass
class User:
    name: str
    password: str | None
    home: Path
    key_path: Path | None = None  # private key file (OpenSSH format), if the user has a key


@dataclass
class ServerHandle:
    root: Path
    keys_dir: Path
    accounts_dir: Path
    homes_dir: Path
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    store: str | None = None  # a --store URL (PostgreSQL); None: the SQLite store in accounts_dir
    port: int = 0
    host: str = HOST
    # The suite's tests were written for one process: `serve` gets `--workers 1` unless extra_args name
    # --workers (None: no flag at all, the server's default, `auto`).
    workers: str | None = "1"

    # -- admin CLI ------------------------------------------------------------

    def base_cmd(self) -> list[str]:
        return [sys.executable, "-m", "sshfiles", "--keys-dir", str(self.keys_dir),
                "--accounts-dir", str(self.accounts_dir), "--homes-dir", str(self.homes_dir),
                *(["--store", self.store] if self.store else [])]

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run `sshfiles ARGS` against this server's state; returns the completed process."""
        res = subprocess.run(self.base_cmd() + list(args), input=input, capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"sshfiles {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def add_user(self, name: str, password: str | None = "", quota: str | int | None = None,
                 key: bool = False) -> User:
        """Create an account; password "" means a random one, None means none (key only)."""
        args = ["user", "add", name]
        if quota is not None:
            args += ["--quota", str(quota)]
        key_path = None
        if key:
            key_path = self.root / f"id_{name}"
            k = asyncssh.generate_private_key("ssh-ed25519")
            k.write_private_key(str(key_path))
            os.chmod(key_path, 0o600)
            k.write_public_key(str(key_path) + ".pub")
            args += ["--key", str(key_path) + ".pub"]
        if password == "":
            password = "pw-" + secrets.token_hex(8)
        stdin = None
        if password is not None:
            args.append("--password-stdin")
            stdin = password + "\n"
        self.cli(*args, input=stdin)
        return User(name, password, self.homes_dir / name, key_path)

    # -- process --------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 20) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # ignore earlier runs' lines
        out = open(self.log_path, "ab")
        workers = [] if self.workers is None or "--workers" in self.extra_args else ["--workers", self.workers]
        self.proc = subprocess.Popen(
            [*self.base_cmd(), "serve", "--host", self.host, "--port", str(self.port), *workers,
             *list(self.extra_args)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.findall(r"^sshfiles listening on \S+ port (\d+)", self.log()[offset:], re.M)
            if m:
                self.port = int(m[-1])
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"server did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL the whole server, as a crash would."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- clients --------------------------------------------------------------

    def connect(self, user: User, **kw: Any) -> Any:
        """asyncssh connection (use as `async with server.connect(user) as conn`)."""
        opts: dict[str, Any] = dict(username=user.name, known_hosts=None, client_keys=None)
        if user.key_path:
            opts["client_keys"] = [str(user.key_path)]
        if user.password:
            opts["password"] = user.password
        opts.update(kw)
        return asyncssh.connect(self.host, self.port, **opts)

    @contextlib.asynccontextmanager
    async def sftp(self, user: User, **kw: Any) -> AsyncIterator[asyncssh.SFTPClient]:
        async with self.connect(user, **kw) as conn, conn.start_sftp_client() as sftp:
            yield sftp

    def ssh_opts(self) -> list[str]:
        return ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10"]

    def openssh(self, tool: str, user: User, args: list[str], input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the stock OpenSSH `sftp`/`scp`/`ssh` with the user's key, or password through sshpass."""
        port_flag = "-p" if tool == "ssh" else "-P"
        env = dict(os.environ)
        if user.key_path:
            cmd = [tool, port_flag, str(self.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                   "-i", str(user.key_path)]
        else:
            cmd = ["sshpass", "-e", tool, port_flag, str(self.port), "-o", "BatchMode=no",
                   "-o", "PubkeyAuthentication=no"]
            env["SSHPASS"] = user.password or ""
        return subprocess.run(cmd + self.ssh_opts() + args, input=input, capture_output=True, text=True,
                              timeout=timeout, env=env)

    def sftp_batch(self, user: User, commands: str, cwd: Path | None = None,
                   timeout: float = 60) -> subprocess.CompletedProcess:
        """OpenSSH `sftp -b -` with the given batch commands (stdin)."""
        args = ["-b", "-", f"{user.name}@{self.host}"]
        old = os.getcwd()
        if cwd:
            os.chdir(cwd)
        try:
            return self.openssh("sftp", user, args, input=commands, timeout=timeout)
        finally:
            os.chdir(old)


@pytest.fixture(scope="session")
def host_keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Host keys generated once per test run (RSA generation is the slow part of a start)."""
    d = tmp_path_factory.mktemp("hostkeys")
    subprocess.run([sys.executable, "-c", "from pathlib import Path; from sshfiles.server import ensure_host_keys;"
                    f"ensure_host_keys(Path({str(d)!r}))"], check=True, timeout=60)
    return d


def make_server(tmp_path: Path, host_keys_dir: Path, extra_args: tuple[str, ...] = ()) -> ServerHandle:
    keys = tmp_path / "keys"
    shutil.copytree(host_keys_dir, keys)
    h = ServerHandle(root=tmp_path, keys_dir=keys, accounts_dir=tmp_path / "accounts",
                     homes_dir=tmp_path / "homes", extra_args=extra_args)
    h.homes_dir.mkdir()
    return h


@pytest.fixture
def server(tmp_path: Path, host_keys_dir: Path) -> Iterator[ServerHandle]:
    """A running `sshfiles serve` on a free 127.0.0.1 port, with its own state directories."""
    h = make_server(tmp_path, host_keys_dir)
    h.start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def workers_server(tmp_path: Path, host_keys_dir: Path) -> Iterator[ServerHandle]:
    """A running `sshfiles serve --workers 2`."""
    h = make_server(tmp_path, host_keys_dir, ("--workers", "2"))
    h.start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A secret file next to the homes, which no user may ever read, change or learn of."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET host data\n")
    return secret


def have(binary: str) -> bool:
    return shutil.which(binary) is not None


# -- PostgreSQL ---------------------------------------------------------------------------------
# .ci/run starts a cluster and exports SSHFILES_TEST_PG (a role that may create schemas). Without the
# variable the tests try the local default below; when neither answers, PostgreSQL tests are skipped
# with the reason (also printed in the session header), and with the variable set they fail instead.
PG_DEFAULT = "postgresql://sshfiles:sshfiles@127.0.0.1/sshfiles"
_pg_state: dict[str, str | None] = {}


def pg_url() -> tuple[str | None, str]:
    """(admin URL, "") if PostgreSQL answers, else (None, why not); probed once per run."""
    if "url" not in _pg_state:
        url = os.environ.get("SSHFILES_TEST_PG") or PG_DEFAULT
        try:
            import psycopg
            with psycopg.connect(url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _pg_state.update(url=url, why="")
        except Exception as exc:  # ImportError, OperationalError: either way, no PostgreSQL here
            why = " ".join(str(exc).split()) or type(exc).__name__
            _pg_state.update(url=None, why=f"PostgreSQL not reachable at {url.split('@')[-1]}: {why}")
    return _pg_state["url"], _pg_state["why"] or ""


def pytest_report_header(config: pytest.Config) -> str:
    url, why = pg_url()
    return f"postgresql: {url.split('@')[-1]} reachable" if url else f"postgresql: {why} (PostgreSQL tests skip)"


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A store URL on a fresh, empty PostgreSQL schema, dropped afterwards (skips without PostgreSQL)."""
    url, why = pg_url()
    if url is None:
        if os.environ.get("SSHFILES_TEST_PG"):
            pytest.fail(f"SSHFILES_TEST_PG is set but {why}")
        print(f"SKIP: {why}", file=sys.stderr)
        pytest.skip(why)
    import psycopg
    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


# -- HAProxy ------------------------------------------------------------------------------------


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


PROBE_SOURCE = "127.0.0.254"  # where the haproxy fixture's readiness probe connects from


@contextlib.contextmanager
def haproxy(root: Path, backends: list[int], balance: str = "roundrobin") -> Iterator[int]:
    """HAProxy in TCP mode on a free 127.0.0.1 port, sending PROXY v2 to each backend port; yields its port.

    Skips (with the reason) only where haproxy is not installed."""
    import socket
    if not have("haproxy"):
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    port = free_port()
    # Connect-only health checks every 300 ms, as a real deployment has: they must cost the nodes nothing.
    servers = "\n".join(f"    server n{i} {HOST}:{p} send-proxy-v2 check inter 300ms" for i, p in enumerate(backends))
    cfg = root / f"haproxy-{port}.cfg"
    cfg.write_text(f"""global
    maxconn 512
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend sftp
    bind {HOST}:{port}
    default_backend nodes
backend nodes
    balance {balance}
{servers}
""")
    log = open(root / f"haproxy-{port}.log", "ab")
    proc = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 10
        while True:
            # From an address of its own: HAProxy may pass this probe on to a backend with a PROXY
            # header naming it, and the backend then logs a client that reset; tests that look for
            # the balancer's or a client's address in the log must not find the probe's there.
            with socket.socket() as s:
                s.bind((PROBE_SOURCE, 0))
                if s.connect_ex((HOST, port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"haproxy did not start: {(root / f'haproxy-{port}.log').read_text()}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
