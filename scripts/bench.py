#!/usr/bin/env python3
"""Benchmark sshfiles beside OpenSSH's sftp server, in one run, on loopback.

    python scripts/bench.py --quick                      # smoke run (64 MiB, 2 reps): 3-4 minutes
    python scripts/bench.py --json bench-results.json    # full run (1 GiB, 3 reps): 15-25 minutes
                                                         # (measured on 2 CPUs, partly busy)

Starts sshfiles (``python -m sshfiles ... serve``) and OpenSSH ``sshd`` (its own
temporary config, host key, loopback port, ``Subsystem sftp internal-sftp`` and a
temporary system user when run as root), alternates them over several
repetitions and reports medians:

* single-stream upload and download of a random file with the stock OpenSSH
  ``sftp`` client in batch mode and with asyncssh's client, sha256-checked;
* aggregate throughput of 1, 8 and 32 concurrent ``sftp`` clients;
* key logins and password logins per second;
* memory per idle SFTP session with ``--sessions`` (500) sessions open: PSS and
  RSS summed over the server's whole process tree from /proc;
* event-loop lag: the worst and 99th-percentile round trip of small ``stat``
  requests from one idle session while other clients do a burst of password
  logins, and while the server hashes a large file (exec ``sha256sum``).

Server CPU is utime+stime+cutime+cstime summed over the whole live process tree
of each server, which runs under ``scripts/_bench_reaper.py`` (a child
subreaper), so exited and re-parented children (sshd's privilege separation,
forked workers) are all counted.  Every number is a median over ``--reps``
repetitions; the ratio column is sshfiles / OpenSSH (the arrow in the unit says
whether higher or lower is better).  All traffic stays on 127.0.0.1; every
process the bench starts is stopped at the end, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import getpass
import hashlib
import json
import os
import platform
import pwd
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REAPER = HERE / "_bench_reaper.py"
STANDIN = HERE / "_bench_standin.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000


STOP = {"requested": False}


def check_stop() -> None:
    """Raise KeyboardInterrupt once Ctrl-C/SIGTERM was seen (asyncio may swallow a cancellation)."""
    if STOP["requested"]:
        raise KeyboardInterrupt("stop requested")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num = t.rstrip("KMGT")
    return int(float(num) * units[t[len(num):]])


# --------------------------------------------------------------------------- /proc


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in clock ticks) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        # fields[0] is state (field 3); utime is field 14 -> index 11
        table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return table


def tree_pids(root: int, table: dict | None = None) -> list[int]:
    table = table if table is not None else _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [root] if root in table else [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by the tree rooted at root, reaped children included."""
    table = _proc_table()
    return sum(table[p][1] for p in tree_pids(root, table)) / CLK_TCK


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU so far, from /proc/stat (idle and iowait are not busy)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return sum(ticks) - idle, sum(ticks)


def worker_cpu(root: int) -> dict[int, float]:
    """CPU seconds per worker of the ``--workers N`` server under root (the reaper, then the
    supervisor: the first process down the tree with more than one child); {} for one process."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    node = root
    while len(children.get(node, [])) == 1:
        node = children[node][0]
    return {pid: sum(table[p][1] for p in tree_pids(pid, table)) / CLK_TCK for pid in children.get(node, [])}


def tree_mem(root: int) -> dict:
    pss = rss = n = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
            n += 1
        except OSError:
            continue
    return {"pss_kib": pss, "rss_kib": rss, "processes": n}


def kill_tree(root: int, sig: int) -> None:
    for pid in reversed(tree_pids(root)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def make_random_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


async def run_cmd(argv: list[str], *, timeout: float, stdin: bytes | None = None,
                  cwd: Path | None = None) -> tuple[int, str]:
    """Run a client command with a hard timeout; kills it on timeout or cancellation."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(proc.wait(), 5)
        raise
    return proc.returncode, out.decode(errors="replace")


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    workdir: Path
    port: int = 0
    user: str = ""
    password: str = ""
    home: Path = Path()
    proc: subprocess.Popen | None = None
    logfile: Path = Path()
    note: str = ""
    info: dict = field(default_factory=dict)
    remote_prefix: str = ""  # what to prepend to a home-relative path for exec commands
    env: dict = field(default_factory=dict)  # extra environment for the server process

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def mem(self) -> dict:
        return tree_mem(self.pid)

    def _spawn(self, argv: list[str], ready: str, timeout: float = 30) -> None:
        self.logfile = self.workdir / f"{self.name}.log"
        logf = open(self.logfile, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(REAPER), "--", *argv], stdin=subprocess.DEVNULL,
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, cwd=REPO)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.logfile.read_text()[-3000:]}")
            if ready in self.logfile.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.logfile.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            kill_tree(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def restart(self) -> None:
        """A fresh server process, so memory deltas are not hidden by memory freed earlier."""
        self.stop()
        self.start()

    def exec_hash_command(self, rel: str) -> str:
        return f"sha256sum {self.remote_prefix}{rel}"


class SshfilesServer(Server):
    def __init__(self, workdir: Path, cmd: list[str], pubkey: Path, quota: str | None,
                 workers: int | None, label: str = "sshfiles", *, bench_limits: bool = True) -> None:
        super().__init__(label, workdir)
        # False for scripts/siege.py: the attacks there meet the server's default defences.
        self.bench_limits = bench_limits
        self.cmd = cmd
        self.base = [*cmd, "--keys-dir", str(workdir / "keys"), "--accounts-dir",
                     str(workdir / "accounts"), "--homes-dir", str(workdir / "homes")]
        for d in ("keys", "accounts", "homes"):
            (workdir / d).mkdir(parents=True, exist_ok=True)
        self.user = "bench"
        self.password = secrets.token_urlsafe(12)
        self.home = workdir / "homes" / self.user
        self.pubkey = pubkey
        self.quota = quota
        self.workers = workers

    def setup(self) -> None:
        argv = [*self.base, "user", "add", self.user, "--password-stdin", "--key", str(self.pubkey)]
        if self.quota:
            argv += ["--quota", self.quota]
        res = subprocess.run(argv, input=self.password + "\n", text=True, capture_output=True,
                             timeout=120, cwd=REPO)
        if res.returncode != 0:
            raise RuntimeError(f"{self.name} user add failed: {res.stdout}{res.stderr}")
        self.home.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.port = free_port()
        argv = [*self.base, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if str(STANDIN) not in self.cmd and self.bench_limits:
            # The bench's clients all come from 127.0.0.1 (32 concurrent sftp logins, 500 idle
            # sessions): the per-source defence would refuse and ban them, so it is set like the
            # OpenSSH side's "MaxStartups 4000" (a benchmark of transfers, not of the defence).
            # The memory row opens --sessions (500) idle sessions for one user: above the default
            # per-user cap (64), which OpenSSH does not have.
            argv += ["--max-startups", "4000", "--per-source-max-startups", "0", "--per-source-rate", "0",
                     "--ban-exempt", "127.0.0.0/8", "--max-sessions-per-user", "100000"]
        if self.workers:
            argv += ["--workers", str(self.workers)]
        self._spawn(argv, "listening on")

    def chown(self, path: Path) -> None:
        pass


class ClusterServer(SshfilesServer):
    """N sshfiles nodes over one PostgreSQL schema and one homes directory, HAProxy (send-proxy-v2) in front.

    The README's "Running several nodes" on one machine: every process (nodes, their workers, HAProxy)
    runs below one reaper, so the CPU column covers the whole cluster. The nodes share this machine's
    cores with each other and with the clients: the row shows the cost of the extra hop and the shared
    store, not what separate machines would add. Needs PostgreSQL (--pg-url) and haproxy.
    """

    def __init__(self, workdir: Path, cmd: list[str], pubkey: Path, quota: str | None, nodes: int,
                 pg_url: str, label: str) -> None:
        super().__init__(workdir, cmd, pubkey, quota, None, label=label)
        self.nodes = nodes
        self.admin_url = pg_url
        self.schema = "bench_" + secrets.token_hex(4)
        sep = "&" if "?" in pg_url else "?"
        self.store_url = f"{pg_url}{sep}options=-csearch_path%3D{self.schema}"
        self.base += ["--store", self.store_url]

    def setup(self) -> None:
        import psycopg
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.schema}")
        super().setup()

    def start(self) -> None:
        import shlex
        self.port = free_port()
        ports = [free_port() for _ in range(self.nodes)]
        cfg = self.workdir / "haproxy.cfg"
        servers = "\n".join(f"    server n{i} 127.0.0.1:{p} send-proxy-v2" for i, p in enumerate(ports))
        cfg.write_text("global\n    maxconn 4096\ndefaults\n    mode tcp\n    timeout connect 5s\n"
                       "    timeout client 1h\n    timeout server 1h\nfrontend sftp\n"
                       f"    bind 127.0.0.1:{self.port}\n    default_backend nodes\nbackend nodes\n"
                       f"    balance leastconn\n{servers}\n")
        # Host keys first: nodes starting at once on one keys dir would race to generate them.
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from sshfiles.server import "
                        "ensure_host_keys; ensure_host_keys(Path(sys.argv[1]))", str(self.workdir / "keys")],
                       check=True, timeout=120, cwd=REPO, env={**os.environ, **self.env})
        logs = [self.workdir / f"node{i}.log" for i in range(self.nodes)]
        lines = ["trap 'kill $(jobs -p) 2>/dev/null; wait' TERM INT"]
        for p, logf in zip(ports, logs, strict=True):
            argv = [*self.base, "serve", "--host", "127.0.0.1", "--port", str(p),
                    "--proxy-protocol-from", "127.0.0.1/32"]
            lines.append(f"{shlex.join(argv)} > {shlex.quote(str(logf))} 2>&1 &")
        lines.append("for f in " + " ".join(shlex.quote(str(f)) for f in logs)
                     + "; do until grep -q 'listening on' \"$f\"; do sleep 0.1; done; done")
        lines.append(f"haproxy -f {shlex.quote(str(cfg))} -db & echo 'cluster listening on'; wait")
        self._spawn(["bash", "-c", "\n".join(lines)], "cluster listening on", timeout=60)

    def cleanup(self) -> None:
        import psycopg
        with contextlib.suppress(Exception), psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {hostkey}
PidFile none
UsePAM no
PermitRootLogin no
AllowUsers {user}
AuthorizedKeysFile {authorized_keys}
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication {password_auth}
KbdInteractiveAuthentication no
MaxStartups 4000
MaxSessions 10
LoginGraceTime 60
X11Forwarding no
PrintMotd no
UseDNS no
LogLevel INFO
Subsystem sftp internal-sftp -d {home}
"""


class OpenSSHServer(Server):
    def __init__(self, workdir: Path, sshd: str, pubkey: Path) -> None:
        super().__init__("openssh", workdir)
        self.sshd = sshd
        self.pubkey = pubkey
        self.created_user = False
        self.created_privsep_dir = False

    def setup(self) -> None:
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        if os.geteuid() == 0:
            self.user = "sfb" + secrets.token_hex(4)
            self.password = secrets.token_urlsafe(12)
            subprocess.run(["useradd", "-M", "-U", "-d", str(home), "-s", "/bin/sh", self.user],
                           check=True, capture_output=True, timeout=60)
            self.created_user = True
            # an account without a password is "locked" ('!') and sshd (UsePAM no) refuses even keys
            subprocess.run(["chpasswd"], input=f"{self.user}:{self.password}\n", text=True,
                           check=True, capture_output=True, timeout=60)
            pw = pwd.getpwnam(self.user)
            os.chown(home, pw.pw_uid, pw.pw_gid)
            if not os.path.isdir("/run/sshd"):
                os.makedirs("/run/sshd", mode=0o755)
                self.created_privsep_dir = True
        else:
            self.user = getpass.getuser()
            self.note = "not root: sshd runs as the current user; password logins skipped"
        self.remote_prefix = str(home) + "/"
        hostkey = self.workdir / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
                       check=True, capture_output=True, timeout=60)
        ak = self.workdir / "authorized_keys"
        shutil.copyfile(self.pubkey, ak)
        os.chmod(ak, 0o644)
        self.port = free_port()
        self.config = self.workdir / "sshd_config"
        self.config.write_text(SSHD_CONFIG.format(
            port=self.port, hostkey=hostkey, user=self.user, authorized_keys=ak, home=home,
            password_auth="yes" if os.geteuid() == 0 else "no"))
        res = subprocess.run([self.sshd, "-t", "-f", str(self.config)], capture_output=True,
                             text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"sshd -t rejected the config: {res.stderr}")
        self.info["version"] = subprocess.run(
            [self.sshd, "-V"], capture_output=True, text=True, timeout=10).stderr.strip()

    def start(self) -> None:
        self._spawn([self.sshd, "-D", "-e", "-f", str(self.config)], "Server listening on")

    def chown(self, path: Path) -> None:
        if self.created_user:
            pw = pwd.getpwnam(self.user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def cleanup(self) -> None:
        if self.created_user:
            subprocess.run(["userdel", self.user], capture_output=True, timeout=60)
            self.created_user = False
        if self.created_privsep_dir:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")


# --------------------------------------------------------------------------- clients


class SftpSession:
    """A stock OpenSSH ``sftp -b -`` client, logged in before the clock starts.

    ``start`` waits until the session answers ``pwd``; ``run`` then sends the transfer commands
    and ``bye`` and waits for the client to exit, so timings exclude the login."""

    def __init__(self, argv: list[str], timeout: float) -> None:
        self.argv, self.timeout = argv, timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.output: list[str] = []

    async def start(self) -> None:
        check_stop()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)  # Ctrl-C reaches only the bench, which stops its clients
        self.proc.stdin.write(b"pwd\n")
        await self.proc.stdin.drain()

        async def wait_ready() -> None:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError("sftp exited before login: " + "".join(self.output)[-1500:])
                self.output.append(line.decode(errors="replace"))
                if line.startswith(b"Remote working directory"):
                    return

        await asyncio.wait_for(wait_ready(), 60)

    async def run(self, commands: list[str]) -> tuple[int, str]:
        assert self.proc is not None
        self.proc.stdin.write(("".join(c + "\n" for c in commands) + "bye\n").encode())
        await self.proc.stdin.drain()
        self.proc.stdin.close()
        out = await asyncio.wait_for(self.proc.stdout.read(), self.timeout)
        rc = await asyncio.wait_for(self.proc.wait(), 60)
        self.output.append(out.decode(errors="replace"))
        return rc, "".join(self.output)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.proc.wait(), 10)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, servers: list[Server],
                 key: Path, src: Path, src_sha: str) -> None:
        self.args = args
        self.workdir = workdir
        self.servers = servers
        self.key = key
        self.src = src
        self.src_sha = src_sha
        self.size = src.stat().st_size
        self.rows: list[dict] = []
        self.client_cpu = 0.0  # CPU seconds of the last sshfiles-cli process (_cli_transfer)

    # -- plumbing

    def sftp_argv(self, srv: Server, batch: Path | str = "-") -> list[str]:
        return ["sftp", "-q", "-F", "/dev/null", "-b", str(batch), "-P", str(srv.port),
                "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "BatchMode=yes", *(["-c", self.args.cipher] if self.args.cipher else []),
                f"{srv.user}@127.0.0.1"]

    async def connect(self, srv: Server, *, password: bool = False):
        import asyncssh

        check_stop()
        kw = dict(username=srv.user, known_hosts=None, agent_path=None, config=None,
                  login_timeout=60)
        if self.args.cipher:
            kw["encryption_algs"] = [self.args.cipher]
        if password:
            kw.update(password=srv.password, client_keys=None, preferred_auth="password")
        else:
            kw.update(client_keys=[str(self.key)], preferred_auth="publickey")
        return await asyncssh.connect("127.0.0.1", srv.port, **kw)

    def order(self, rep: int) -> list[Server]:
        check_stop()
        return self.servers if rep % 2 == 0 else list(reversed(self.servers))

    def add_row(self, section: str, label: str, unit: str, higher_better: bool,
                values: dict[str, list[float]], cpu: dict[str, list[float]] | None = None,
                extra: dict | None = None) -> dict:
        row = {"section": section, "workload": label, "unit": unit,
               "higher_is_better": higher_better, "servers": {}}
        for srv in self.servers:
            vals = values.get(srv.name) or []
            entry = {"samples": vals, "median": statistics.median(vals) if vals else None}
            if cpu is not None:
                cvals = cpu.get(srv.name) or []
                entry["cpu_s_per_gib_samples"] = cvals
                entry["cpu_s_per_gib"] = statistics.median(cvals) if cvals else None
            row["servers"][srv.name] = entry
        ref_name = reference_name(self.servers)
        ref = row["servers"].get(ref_name, {})
        row["reference"] = ref_name
        for srv in self.servers:
            e = row["servers"][srv.name]
            if srv.name == ref_name:
                continue
            if e.get("median") and ref.get("median"):
                e["ratio"] = e["median"] / ref["median"]
            if e.get("cpu_s_per_gib") and ref.get("cpu_s_per_gib"):
                e["cpu_ratio"] = e["cpu_s_per_gib"] / ref["cpu_s_per_gib"]
        first = row["servers"][self.servers[0].name]
        for k in ("ratio", "cpu_ratio"):
            if k in first:
                row[k] = first[k]
        if extra:
            row.update(extra)
        self.rows.append(row)
        log("  " + format_row(row, self.servers))
        return row

    def place_download_file(self, srv: Server, name: str, size: int | None = None) -> Path:
        dest = srv.home / name
        if not dest.exists() or dest.stat().st_size != (size or self.size):
            if size is None or size == self.size:
                shutil.copyfile(self.src, dest)
            else:
                with open(self.src, "rb") as f, open(dest, "wb") as out:
                    out.write(f.read(size))
            os.chmod(dest, 0o644)
            srv.chown(dest)
        return dest

    # -- single stream

    async def _stock_transfer(self, srv: Server, direction: str, tag: str) -> tuple[float, float]:
        local_dl = self.workdir / f"dl-{tag}.bin"
        remote_up = f"up-{tag}.bin"
        cmd = f"put {self.src} {remote_up}" if direction == "upload" else f"get down.bin {local_dl}"
        sess = SftpSession(self.sftp_argv(srv), self.args.timeout)
        try:
            await sess.start()
            cpu0 = srv.cpu()
            t0 = time.perf_counter()
            rc, out = await sess.run([cmd])
            dt = time.perf_counter() - t0
            cpu = srv.cpu() - cpu0
        finally:
            await sess.close()
        if rc != 0:
            raise RuntimeError(f"sftp {direction} to {srv.name} failed ({rc}): {out[-2000:]}")
        self._check(srv, direction, remote_up, local_dl)
        return dt, cpu

    async def _asyncssh_transfer(self, srv: Server, direction: str, tag: str) -> tuple[float, float]:
        local_dl = self.workdir / f"dl-{tag}.bin"
        remote_up = f"up-{tag}.bin"

        async def go() -> tuple[float, float]:
            async with await self.connect(srv) as conn:
                srv.info.setdefault("asyncssh_client_cipher", conn.get_extra_info("send_cipher"))
                async with conn.start_sftp_client() as sftp:
                    cpu0 = srv.cpu()
                    t0 = time.perf_counter()
                    if direction == "upload":
                        await sftp.put(str(self.src), remote_up)
                    else:
                        await sftp.get("down.bin", str(local_dl))
                    return time.perf_counter() - t0, srv.cpu() - cpu0

        dt, cpu = await asyncio.wait_for(go(), self.args.timeout)
        self._check(srv, direction, remote_up, local_dl)
        return dt, cpu

    async def _cli_transfer(self, srv: Server, direction: str, tag: str,
                            options: tuple[str, ...] = ()) -> tuple[float, float]:
        """``sshfiles-cli put/get`` (a fresh process: connect + login are inside the clock, as a user
        sees it); ``--no-verify``, since the sftp rows verify nothing either (the bench's sha256
        check below still runs). ``options``: more transfer options (``--connections 1``)."""
        local_dl = self.workdir / f"dl-{tag}.bin"
        remote_up = f"up-{tag}.bin"
        argv = [sys.executable, "-c", "from sshfiles.client.cli import main; main()",
                "--host", "127.0.0.1", "-P", str(srv.port), "-u", srv.user, "-i", str(self.key),
                "--known-hosts", str(self.workdir / f"known_hosts-{srv.name}"), "-q"]
        argv += (["put", "--no-verify", "--no-resume", *options, str(self.src), remote_up] if direction == "upload"
                 else ["get", "--no-verify", "--no-resume", *options, "down.bin", str(local_dl)])
        cpu0 = srv.cpu()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        rc, out = await run_cmd(argv, timeout=self.args.timeout, cwd=REPO)  # this checkout's sshfiles
        dt = time.perf_counter() - t0
        cpu = srv.cpu() - cpu0
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the client, waited for by run_cmd
        self.client_cpu = (children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime)
        if rc != 0:
            raise RuntimeError(f"sshfiles-cli {direction} to {srv.name} failed ({rc}): {out[-2000:]}")
        self._check(srv, direction, remote_up, local_dl)
        return dt, cpu

    def _check(self, srv: Server, direction: str, remote_up: str, local_dl: Path) -> None:
        path = srv.home / remote_up if direction == "upload" else local_dl
        try:
            got = sha256_file(path)
        except FileNotFoundError:
            raise RuntimeError(f"{direction} on {srv.name}: {path} missing") from None
        finally:
            if direction == "download":
                local_dl.unlink(missing_ok=True)
        if direction == "upload":
            path.unlink(missing_ok=True)
        if got != self.src_sha:
            raise RuntimeError(f"{direction} on {srv.name}: sha256 mismatch")

    async def single_stream(self) -> None:
        for srv in self.servers:
            self.place_download_file(srv, "down.bin")
        mb = self.size / MB
        clients = ("sftp", "asyncssh") if shutil.which("sftp") else ("asyncssh",)
        if any(srv.name != "openssh" for srv in self.servers):
            # the default (--connections auto: 2 to download a file this size) and one connection
            clients += ("sshfiles-cli", "sshfiles-cli --connections 1")
        for client in clients:
            for direction in ("upload", "download"):
                if direction not in self.args.only and "single" not in self.args.only:
                    continue
                log(f"single stream: {client} {direction} {self.size / MiB:.0f} MiB x {self.args.reps}")
                speeds: dict[str, list[float]] = {}
                cpus: dict[str, list[float]] = {}
                client_cpus: dict[str, list[float]] = {}  # sshfiles-cli's own CPU, start-up included
                fn = {"sftp": self._stock_transfer, "asyncssh": self._asyncssh_transfer,
                      "sshfiles-cli": self._cli_transfer,
                      "sshfiles-cli --connections 1": functools.partial(
                          self._cli_transfer, options=("--connections", "1"))}[client]
                for warm in range(self.args.warmup):  # untimed (see --warmup)
                    for srv in self.servers:
                        if not (client.startswith("sshfiles-cli") and srv.name == "openssh"):
                            await fn(srv, direction, f"{srv.name}-warmup{warm}")
                for rep in range(self.args.reps):
                    for srv in self.order(rep):
                        if client.startswith("sshfiles-cli") and srv.name == "openssh":
                            continue  # it speaks sshfiles' check-file; OpenSSH is compared via its sftp
                        dt, cpu = await fn(srv, direction, f"{srv.name}-{rep}")
                        speeds.setdefault(srv.name, []).append(mb / dt)
                        cpus.setdefault(srv.name, []).append(cpu / (self.size / GiB))
                        if client.startswith("sshfiles-cli"):
                            client_cpus.setdefault(srv.name, []).append(self.client_cpu / (self.size / GiB))
                extra: dict | None = None
                if client.startswith("sshfiles-cli"):  # the target compares it with OpenSSH sftp to OpenSSH
                    extra = {"client_cpu_s_per_gib": {n: statistics.median(v) for n, v in client_cpus.items()}}
                    ref = next((r for r in self.rows if r["workload"] == f"{direction}, sftp client"), None)
                    base = ref and ref["servers"].get("openssh", {}).get("median")
                    if base:
                        extra["vs_openssh_sftp"] = {n: statistics.median(v) / base for n, v in speeds.items()}
                row = self.add_row("single stream", f"{direction}, {client} client", "MB/s ↑", True,
                                   speeds, cpus, extra)
                if extra:
                    log("  client CPU s/GiB: " + "  ".join(
                        f"{n}={c:.2f}" for n, c in row["client_cpu_s_per_gib"].items()))
                if extra and "vs_openssh_sftp" in extra:
                    log("  vs OpenSSH sftp to OpenSSH: " + "  ".join(
                        f"{n}={r:.2f}" for n, r in row["vs_openssh_sftp"].items()))
                if self.args.profile and not client.startswith("sshfiles-cli"):
                    await self._profile_transfer(client, direction)

    async def _profile_transfer(self, client: str, direction: str) -> None:
        """One extra, unmeasured transfer per Python server under py-spy (numbers above unaffected)."""
        sys.path.insert(0, str(HERE))
        from _bench_profile import Recorder

        if not Recorder.available():
            log("  py-spy not installed (pip install py-spy): no profile")
            return
        outdir = Path(self.args.profile)
        outdir.mkdir(parents=True, exist_ok=True)
        for srv in self.servers:
            if srv.name == "openssh":
                continue
            raw = outdir / f"{srv.name}-{direction}-{client}.txt"
            fn = self._stock_transfer if client == "sftp" else self._asyncssh_transfer
            # the reaper's child is the server's main process; py-spy follows its subprocesses
            target = next((p for p in tree_pids(srv.pid) if p != srv.pid), srv.pid)
            with Recorder(target, raw, native=self.args.profile_native, gil=self.args.profile_gil):
                dt, _ = await fn(srv, direction, f"{srv.name}-prof")
            log(f"  profiled {srv.name} {direction} ({client}): {self.size / MB / dt:.0f} MB/s under "
                f"py-spy -> {raw.with_name(raw.stem + '-summary.txt')}")

    # -- concurrency

    async def concurrent(self) -> None:
        for n in self.args.clients:
            per = max(MiB, self.size // n)
            total = per * n
            src_n = self.workdir / f"src-{n}.bin"
            with open(self.src, "rb") as f, open(src_n, "wb") as out:
                out.write(f.read(per))
            for srv in self.servers:
                self.place_download_file(srv, f"conc-{n}.bin", per)
            for direction in ("upload", "download"):
                log(f"concurrent: {n} sftp clients {direction}, {per / MiB:.0f} MiB each")
                speeds: dict[str, list[float]] = {}
                cpus: dict[str, list[float]] = {}
                # Where the machine's CPU went (the clients share its cores with the server) and how
                # evenly the kernel spread the connections over a multi-worker server's processes.
                client_cpu: dict[str, list[float]] = {}
                busy: dict[str, list[float]] = {}
                spread: dict[str, list[float]] = {}
                for rep in range(self.args.reps):
                    for srv in self.order(rep):
                        cmds = [f"put {src_n} cup-{i}.bin" if direction == "upload"
                                else f"get conc-{n}.bin {self.workdir}/cdl-{srv.name}-{i}.bin"
                                for i in range(n)]
                        sessions = [SftpSession(self.sftp_argv(srv), self.args.timeout) for _ in range(n)]
                        try:
                            await asyncio.gather(*(x.start() for x in sessions))  # all logged in
                            cpu0 = srv.cpu()
                            workers0 = worker_cpu(srv.pid)
                            clients0 = sum(tree_cpu(x.proc.pid) for x in sessions if x.proc)
                            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                            busy0 = machine_busy_ticks()
                            t0 = time.perf_counter()
                            results = await asyncio.gather(*(x.run([c]) for x, c in zip(sessions, cmds, strict=False)))
                            dt = time.perf_counter() - t0
                            cpu = srv.cpu() - cpu0
                            busy1 = machine_busy_ticks()
                            workers1 = worker_cpu(srv.pid)
                        finally:
                            await asyncio.gather(*(x.close() for x in sessions))
                        # the clients have exited and been waited for: their CPU (with their ssh
                        # children's) is in the bench's RUSAGE_CHILDREN
                        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        used = (children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime
                                - clients0)
                        client_cpu.setdefault(srv.name, []).append(used / (total / GiB))
                        busy.setdefault(srv.name, []).append(
                            100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]))
                        per_worker = [workers1[p] - workers0[p] for p in workers1 if p in workers0]
                        if isinstance(srv, SshfilesServer) and len(per_worker) > 1 and sum(per_worker) > 0:
                            spread.setdefault(srv.name, []).append(100 * max(per_worker) / sum(per_worker))
                        for i, (rc, out) in enumerate(results):
                            if rc != 0:
                                raise RuntimeError(f"{n} clients {direction} on {srv.name}: {out[-1000:]}")
                            p = (srv.home / f"cup-{i}.bin" if direction == "upload"
                                 else self.workdir / f"cdl-{srv.name}-{i}.bin")
                            if p.stat().st_size != per:
                                raise RuntimeError(f"{n} clients {direction} on {srv.name}: short file {p}")
                            p.unlink()
                        speeds.setdefault(srv.name, []).append(total / MB / dt)
                        cpus.setdefault(srv.name, []).append(cpu / (total / GiB))
                extra = {"clients_cpu_s_per_gib": {k: statistics.median(v) for k, v in client_cpu.items()},
                         "machine_busy_pct": {k: statistics.median(v) for k, v in busy.items()},
                         "busiest_worker_cpu_pct": {k: statistics.median(v) for k, v in spread.items()}}
                self.add_row("concurrent", f"{direction}, {n} concurrent sftp client{'s' if n > 1 else ''}, aggregate", "MB/s ↑",
                             True, speeds, cpus, extra)
                log("    clients' CPU s/GiB " + ", ".join(f"{k}={v:.2f}" for k, v in extra["clients_cpu_s_per_gib"].items())
                    + "; machine busy % " + ", ".join(f"{k}={v:.0f}" for k, v in extra["machine_busy_pct"].items())
                    + "".join(f"; busiest worker's share of {k}'s CPU {v:.0f}%"
                              for k, v in extra["busiest_worker_cpu_pct"].items()))
            src_n.unlink(missing_ok=True)

    # -- logins

    async def _login_burst(self, srv: Server, count: int, concurrency: int, password: bool) -> float:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                conn = await self.connect(srv, password=password)
                conn.close()
                await conn.wait_closed()

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), self.args.timeout)
        return count / (time.perf_counter() - t0)

    async def logins(self) -> None:
        for kind, count in (("key", self.args.key_logins), ("password", self.args.password_logins)):
            log(f"logins: {count} {kind} logins, {self.args.login_concurrency} at a time")
            rates: dict[str, list[float]] = {}
            for rep in range(self.args.reps):
                for srv in self.order(rep):
                    if kind == "password" and not srv.password:
                        continue
                    rates.setdefault(srv.name, []).append(
                        await self._login_burst(srv, count, self.args.login_concurrency, kind == "password"))
            self.add_row("logins", f"{kind} logins/s ({self.args.login_concurrency} concurrent)",
                         "logins/s ↑", True, rates)

    # -- memory

    async def memory(self) -> None:
        n = self.args.sessions
        per_pss: dict[str, list[float]] = {}
        per_rss: dict[str, list[float]] = {}
        base_pss: dict[str, list[float]] = {}
        for srv in self.servers:  # one repetition: opening 500+ sessions is slow on sshd
            log(f"memory: {n} idle SFTP sessions on {srv.name} (freshly restarted)")
            await asyncio.to_thread(srv.restart)
            await asyncio.sleep(1.0)
            before = srv.mem()
            conns, clients = [], []
            sem = asyncio.Semaphore(16)

            async def open_one() -> None:
                async with sem:
                    conn = await self.connect(srv)
                    conns.append(conn)
                    clients.append(await conn.start_sftp_client())

            try:
                await asyncio.wait_for(asyncio.gather(*(open_one() for _ in range(n))),
                                       max(self.args.timeout, n * 0.5))
                # every session has done one round trip, then settles
                await asyncio.gather(*(c.stat(".") for c in clients))
                await asyncio.sleep(1.0)
                after = srv.mem()
            finally:
                for c in clients:
                    c.exit()
                for conn in conns:
                    conn.close()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in conns),
                                                          return_exceptions=True), 60)
            per_pss[srv.name] = [(after["pss_kib"] - before["pss_kib"]) / n]
            per_rss[srv.name] = [(after["rss_kib"] - before["rss_kib"]) / n]
            base_pss[srv.name] = [before["pss_kib"] / 1024]
            srv.info[f"memory_{n}_sessions"] = {"before": before, "after": after}
            await asyncio.sleep(2.0)  # let sshd reap its children before the next workload
        self.add_row("memory", f"PSS per idle SFTP session ({n} open)", "KiB ↓", False, per_pss)
        self.add_row("memory", f"RSS per idle SFTP session ({n} open)", "KiB ↓", False, per_rss)
        self.add_row("memory", "server tree PSS with no session", "MiB ↓", False, base_pss)

    # -- event-loop lag

    async def lag(self) -> None:
        for srv in self.servers:
            self.place_download_file(srv, "down.bin")
        results: dict[str, dict[str, list[float]]] = {}
        for rep in range(self.args.reps):
            for srv in self.order(rep):
                log(f"lag: {srv.name} rep {rep + 1}")
                res = await self._lag_once(srv)
                for phase, stats in res.items():
                    for k, v in stats.items():
                        results.setdefault(f"{phase}:{k}", {}).setdefault(srv.name, []).append(v)
        for phase, label in (("idle", "idle"), ("logins", "during password-login burst"),
                             ("hashing", "during exec sha256sum of the file")):
            for stat, what in (("max_ms", "worst"), ("p99_ms", "p99")):
                vals = results.get(f"{phase}:{stat}")
                if vals:
                    self.add_row("lag", f"stat round trip {what}, {label}", "ms ↓", False, vals)

    async def _lag_once(self, srv: Server) -> dict:
        import asyncssh
        probe = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "_probe", json.dumps(
                {"port": srv.port, "user": srv.user, "key": str(self.key), "interval": 0.005,
                 "max_seconds": self.args.timeout}),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            line = await asyncio.wait_for(probe.stdout.readline(), 60)
            if not line.startswith(b"ready"):
                raise RuntimeError(f"lag probe on {srv.name} failed: {line!r}")

            async def phase(name: str) -> None:
                probe.stdin.write(f"{name}\n".encode())
                await probe.stdin.drain()

            await phase("idle")
            await asyncio.sleep(1.5)
            if srv.password:
                await phase("logins")
                await self._login_burst(srv, self.args.burst_logins, self.args.burst_logins, True)
            await phase("hashing")
            hashed = False
            try:
                async with await self.connect(srv) as conn:
                    res = await asyncio.wait_for(conn.run(srv.exec_hash_command("down.bin")),
                                                 self.args.timeout)
                out = res.stdout if isinstance(res.stdout, str) else ""
                hashed = res.exit_status == 0 and self.src_sha in out
                srv.info["exec_sha256sum"] = "ok" if hashed else (
                    f"failed: status {res.exit_status} {out[:200]!r} {str(res.stderr)[:200]!r}")
            except (OSError, asyncssh.Error) as exc:
                srv.info["exec_sha256sum"] = f"failed: {exc}"
            if not hashed:
                log(f"  exec sha256sum on {srv.name}: {srv.info['exec_sha256sum']}; no hashing row")
            await phase("stop")
            out, _ = await asyncio.wait_for(probe.communicate(), 60)
            result = json.loads(out.decode().splitlines()[-1])
            if not hashed:
                result.pop("hashing", None)
            return result
        finally:
            if probe.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    probe.kill()
                await probe.wait()


# --------------------------------------------------------------------------- lag probe (subprocess)


def probe_main(spec: dict) -> int:
    """One SFTP session timing small stat round trips; phases come on stdin, results on stdout."""
    import asyncssh

    state = {"phase": "setup", "stop": False}

    def reader() -> None:
        for line in sys.stdin:
            state["phase"] = line.strip()
            if state["phase"] == "stop":
                break
        state["stop"] = True

    async def run() -> dict:
        samples: dict[str, list[float]] = {}
        async with asyncssh.connect(
                "127.0.0.1", spec["port"], username=spec["user"], client_keys=[spec["key"]],
                known_hosts=None, agent_path=None, config=None, preferred_auth="publickey") as conn:
            async with conn.start_sftp_client() as sftp:
                await sftp.stat(".")
                print("ready", flush=True)
                threading.Thread(target=reader, daemon=True).start()
                deadline = time.monotonic() + spec["max_seconds"]
                n = 0
                while not state["stop"] and time.monotonic() < deadline and n < 2_000_000:
                    phase = state["phase"]
                    t0 = time.perf_counter()
                    await sftp.stat(".")
                    samples.setdefault(phase, []).append((time.perf_counter() - t0) * 1000)
                    n += 1
                    await asyncio.sleep(spec["interval"])
        out = {}
        for phase, vals in samples.items():
            if phase in ("setup", "stop"):
                continue
            vals.sort()
            out[phase] = {"n": len(vals), "max_ms": vals[-1], "p99_ms": vals[int(0.99 * (len(vals) - 1))],
                          "p50_ms": vals[len(vals) // 2]}
        return out

    print(json.dumps(asyncio.run(run())), flush=True)
    return 0


# --------------------------------------------------------------------------- output


# --------------------------------------------------------------------------- physical floor


def openssl_floor(cipher: str, block: int = 32768) -> float | None:
    """CPU seconds per GiB for ``cipher`` on this machine, one direction, ``block``-byte messages (OpenSSH's
    packet size), from ``openssl speed -evp`` (which divides by its own user CPU time, so load on
    the machine changes this number little)."""
    if not shutil.which("openssl"):
        return None
    try:
        res = subprocess.run(["openssl", "speed", "-mr", "-seconds", "2", "-bytes", str(block), "-evp", cipher],
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    for line in res.stdout.splitlines():
        if line.startswith("+F:"):  # +F:<n>:<name>:<bytes per second>
            rate = float(line.rsplit(":", 1)[1])
            return GiB / rate if rate > 0 else None
    return None


def loopback_tcp_floor(size: int) -> float:
    """CPU seconds per GiB to push ``size`` bytes through a 127.0.0.1 TCP connection (both ends, this
    process's rusage: sender and receiver threads), 256 KiB writes and reads."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = [0]

    def receive() -> None:
        conn, _ = listener.accept()
        with conn:
            buf = bytearray(256 * 1024)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    return
                received[0] += n

    chunk = os.urandom(256 * 1024)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as sender:
        sent = 0
        while sent < size:
            sender.sendall(chunk)
            sent += len(chunk)
    thread.join(120)
    listener.close()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return cpu / (received[0] / GiB)


def measure_floors(size: int) -> list[dict]:
    """The physical floor per GiB that any SSH server on this machine pays (issue 14)."""
    floors = []
    for cipher, label in (("chacha20-poly1305", "chacha20-poly1305 (openssl speed -evp, 32 KiB)"),
                          ("aes-256-gcm", "aes-256-gcm (openssl speed -evp, 32 KiB)")):
        floors.append({"floor": cipher, "label": label, "cpu_s_per_gib": openssl_floor(cipher)})
    floors.append({"floor": "tcp", "label": "loopback TCP, send + receive (256 KiB calls)",
                   "cpu_s_per_gib": loopback_tcp_floor(min(size, GiB))})
    return floors


def floor_tables(floors: list[dict], rows: list[dict], servers: list[Server], cipher: str | None) -> str:
    """The floor rows, then each transfer row's server CPU as a multiple of cipher + TCP floor."""
    by = {f["floor"]: f["cpu_s_per_gib"] for f in floors}
    lines = ["| floor | CPU s/GiB (one direction) |", "|---|---|"]
    lines += [f"| {f['label']} | {_fmt(f['cpu_s_per_gib'])} |" for f in floors]
    aead = "aes-256-gcm" if cipher and "gcm" in cipher else "chacha20-poly1305"
    if by.get(aead) is None or by.get("tcp") is None:
        return "\n".join(lines)
    floor = by[aead] + by["tcp"]
    names = [s.name for s in servers]
    lines += ["", f"Server CPU per GiB as a multiple of the floor ({aead} + loopback TCP = {_fmt(floor)} s/GiB):",
              "", "| workload | " + " | ".join(f"{n} x floor" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for row in rows:
        cells = [row["servers"].get(n, {}).get("cpu_s_per_gib") for n in names]
        if any(c is not None for c in cells):
            lines.append(f"| {row['workload']} | " + " | ".join(
                "—" if c is None else f"{c / floor:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def reference_name(servers: list[Server]) -> str:
    """Ratios are against OpenSSH when it runs, else against the first server."""
    names = [x.name for x in servers]
    return "openssh" if "openssh" in names else names[0]


def format_row(row: dict, servers: list[Server]) -> str:
    parts = [row["workload"], row["unit"]]
    for s in servers:
        e = row["servers"].get(s.name, {})
        parts.append(f"{s.name}={_fmt(e.get('median'))}")
        if "cpu_s_per_gib" in e:
            parts.append(f"cpu={_fmt(e.get('cpu_s_per_gib'))}s/GiB")
        if "ratio" in e:
            parts.append(f"ratio={e['ratio']:.2f}")
    return "  ".join(parts)


def markdown_table(rows: list[dict], servers: list[Server]) -> str:
    names = [s.name for s in servers]
    ref = reference_name(servers)
    others = [n for n in names if n != ref] if len(names) > 1 else []
    has_cpu = any("cpu_s_per_gib" in e for r in rows for e in r["servers"].values())
    head = ["workload", "unit", *names, *(f"{n}/{ref}" for n in others)]
    if has_cpu:
        head += [f"{n} CPU s/GiB" for n in names] + [f"CPU {n}/{ref}" for n in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        sv = row["servers"]
        cells = [row["workload"], row["unit"]]
        cells += [_fmt(sv.get(n, {}).get("median")) for n in names]
        cells += [f"{sv[n]['ratio']:.2f}" if "ratio" in sv.get(n, {}) else "—" for n in others]
        if has_cpu:
            cells += [_fmt(sv.get(n, {}).get("cpu_s_per_gib")) if "cpu_s_per_gib" in sv.get(n, {}) else ""
                      for n in names]
            cells += [f"{sv[n]['cpu_ratio']:.2f}" if "cpu_ratio" in sv.get(n, {}) else "" for n in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def resolve_sshfiles_cmd(choice: str) -> tuple[list[str], str]:
    if choice == "standin":
        return [sys.executable, str(STANDIN)], "bare asyncssh stand-in (scripts/_bench_standin.py)"
    if choice != "auto":
        return choice.split(), choice
    try:
        res = subprocess.run([sys.executable, "-m", "sshfiles", "--help"], capture_output=True,
                             text=True, timeout=60, cwd=REPO)
        if res.returncode == 0 and "serve" in res.stdout:
            return [sys.executable, "-m", "sshfiles"], "python -m sshfiles"
    except subprocess.TimeoutExpired:
        pass
    return ([sys.executable, str(STANDIN)],
            "python -m sshfiles is not usable here: measuring the bare asyncssh stand-in instead")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="sshfiles vs OpenSSH sftp benchmark (loopback only)",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64 MiB file, 2 reps, fewer logins and sessions")
    p.add_argument("--size", help="transfer size (e.g. 1G, 256M); default 1G, 64M with --quick")
    p.add_argument("--reps", type=int, help="repetitions per measurement (median reported); default 3, 2 quick")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed transfers per server before each single-stream row's repetitions (default 1): "
                        "on a VM that hands free memory back to its host, the first write of a GiB into "
                        "fresh page cache costs both servers several times the steady state")
    p.add_argument("--clients", default="1,8,32", help="concurrent client counts (default 1,8,32)")
    p.add_argument("--sessions", type=int, help="idle sessions for the memory test (default 500)")
    p.add_argument("--key-logins", type=int, help="key logins per repetition (default 100, 30 quick)")
    p.add_argument("--password-logins", type=int, help="password logins per repetition (default 32, 12 quick)")
    p.add_argument("--login-concurrency", type=int, default=4)
    p.add_argument("--burst-logins", type=int, default=16,
                   help="concurrent password logins during the lag probe (default 16)")
    p.add_argument("--only", default="single,concurrent,logins,memory,lag",
                   help="comma list of workloads: single (or upload/download), concurrent, logins, memory, lag")
    p.add_argument("--servers", default="sshfiles,openssh",
                   help="comma list from sshfiles, openssh, bare (bare = asyncssh stand-in); default sshfiles,openssh")
    p.add_argument("--sshfiles-cmd", default="auto",
                   help="'auto' (python -m sshfiles, else the stand-in), 'standin', or a command line")
    p.add_argument("--workers", type=int, help="pass --workers N to sshfiles serve")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:BASE[:ITEM,...]",
                   help="one more server measured in the same run: BASE is sshfiles, bare or cluster (N nodes "
                        "on PostgreSQL behind HAProxy, --nodes=N), ITEMs are KEY=VALUE environment, --workers=N "
                        "or --nodes=N, e.g. 'w2:sshfiles:--workers=2', '2nodes:cluster:--nodes=2' or "
                        "'bare-coalesce:bare:SSHFILES_BENCH_STANDIN_COALESCE=1' (repeatable)")
    p.add_argument("--pg-url", default=os.environ.get("SSHFILES_TEST_PG", "postgresql://sshfiles:sshfiles@127.0.0.1/sshfiles"),
                   help="PostgreSQL for cluster variants (a fresh schema per run, dropped at the end)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the Python servers, e.g. PYTHONPATH=/opt/uvloop-site")
    p.add_argument("--bare-opts", metavar="JSON",
                   help="asyncssh.listen keyword arguments for the bare stand-in, e.g. "
                        "'{\"max_pktsize\": 262144, \"window\": 8388608}'")
    p.add_argument("--cipher", help="force one cipher on both clients (sftp -c, asyncssh encryption_algs), "
                   "e.g. aes128-gcm@openssh.com; default: each client's own preference")
    p.add_argument("--quota", default="1T", help="quota given to the sshfiles bench user (default 1T)")
    p.add_argument("--sshd", default=shutil.which("sshd") or "/usr/sbin/sshd")
    p.add_argument("--timeout", type=float, default=600, help="hard timeout per client operation, seconds")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--markdown", help="write the table to this markdown file")
    p.add_argument("--profile", metavar="DIR",
                   help="after each single-stream row, run one extra transfer per Python server under "
                        "py-spy and write raw profiles and summaries to DIR")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--profile-gil", action="store_true",
                   help="py-spy --gil: only samples holding the GIL (Python work, no syscalls)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the floor rows (openssl speed -evp chacha20-poly1305/aes-256-gcm, loopback TCP)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) at the end")
    p.add_argument("--hold", type=float, default=0,
                   help="after setup, print server pids and wait this many seconds before measuring (for profilers)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_probe"]:
        return probe_main(json.loads(argv[1]))
    args = build_parser().parse_args(argv)
    q = args.quick
    args.size = parse_size(args.size or ("64M" if q else "1G"))
    args.reps = args.reps or (2 if q else 3)
    args.clients = [int(x) for x in args.clients.split(",") if x]
    args.sessions = args.sessions or (100 if q else 500)
    args.key_logins = args.key_logins or (30 if q else 100)
    args.password_logins = args.password_logins or (12 if q else 32)
    args.only = set(args.only.split(","))
    wanted = args.servers.split(",")

    # SIGTERM/SIGHUP behave like Ctrl-C so the cleanup below always runs
    def as_interrupt(signum, frame):
        STOP["requested"] = True
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, as_interrupt)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.sessions + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    notes: list[str] = []
    servers: list[Server] = []
    workdir = Path(tempfile.mkdtemp(prefix="sshfiles-bench-"))
    os.chmod(workdir, 0o755)  # the temporary sshd user must reach its home below it
    try:
        import asyncssh  # the client key comes from asyncssh, so ssh-keygen is only needed for sshd

        key = workdir / "client_ed25519"
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key.write_private_key(str(key))
        client_key.write_public_key(str(key.with_suffix(".pub")))
        os.chmod(key, 0o600)
        os.chmod(key.with_suffix(".pub"), 0o644)
        if "sshfiles" in wanted:
            cmd, desc = resolve_sshfiles_cmd(args.sshfiles_cmd)
            if "stand-in" in desc:
                notes.append(desc)
                log("NOTE: " + desc)
            servers.append(SshfilesServer(workdir / "sshfiles", cmd, key.with_suffix(".pub"),
                                          args.quota, args.workers))
        if "openssh" in wanted:
            if os.path.exists(args.sshd) and shutil.which("ssh-keygen"):
                servers.append(OpenSSHServer(workdir / "openssh", args.sshd, key.with_suffix(".pub")))
            else:
                notes.append(f"OpenSSH skipped: {args.sshd} or ssh-keygen not found "
                             "(apt-get install openssh-server)")
                log("NOTE: " + notes[-1])
        if "bare" in wanted:
            servers.append(SshfilesServer(workdir / "bare", [sys.executable, str(STANDIN)],
                                          key.with_suffix(".pub"), None, None, label="bare"))
            if args.bare_opts:
                servers[-1].env["SSHFILES_BENCH_STANDIN_OPTS"] = args.bare_opts
        for spec in args.variant:
            label, _, rest = spec.partition(":")
            base, _, items = rest.partition(":")
            if base not in ("sshfiles", "bare", "cluster") or not label:
                raise SystemExit(f"--variant {spec!r}: want LABEL:sshfiles|bare|cluster[:ITEM,...]")
            workers = None
            nodes = 2
            env = {}
            for item in filter(None, items.split(",")):
                if item.startswith("--workers="):
                    workers = int(item.split("=", 1)[1])
                elif item.startswith("--nodes="):
                    nodes = int(item.split("=", 1)[1])
                else:
                    k, _, v = item.partition("=")
                    env[k] = v
            cmd = resolve_sshfiles_cmd(args.sshfiles_cmd)[0] if base != "bare" else [sys.executable, str(STANDIN)]
            srv: Server
            if base == "cluster":
                srv = ClusterServer(workdir / label, cmd, key.with_suffix(".pub"), args.quota, nodes, args.pg_url,
                                    label=label)
            else:
                srv = SshfilesServer(workdir / label, cmd, key.with_suffix(".pub"),
                                     args.quota if base == "sshfiles" else None, workers, label=label)
            srv.env.update(env)
            servers.append(srv)
        for srv in servers:
            if srv.name != "openssh":
                srv.env = {**dict(kv.split("=", 1) for kv in args.server_env), **srv.env}
        if not servers:
            log("no server to measure")
            return 2
        if not shutil.which("sftp"):
            notes.append("stock sftp client missing (apt-get install openssh-client): "
                         "sftp-client and concurrent rows skipped")
            args.only -= {"concurrent"}
        for srv in servers:
            srv.workdir.mkdir(parents=True, exist_ok=True)
            srv.setup()
            if srv.note:
                notes.append(f"{srv.name}: {srv.note}")
        src = workdir / "src.bin"
        log(f"writing {args.size / MiB:.0f} MiB of random data")
        src_sha = make_random_file(src, args.size)
        os.chmod(src, 0o644)
        for srv in servers:
            srv.start()
            log(f"{srv.name} listening on 127.0.0.1:{srv.port} (tree root pid {srv.pid})")
        bench = Bench(args, workdir, servers, key, src, src_sha)
        if args.hold:
            for srv in servers:
                print(f"HOLD {srv.name} pid={srv.pid} port={srv.port} tree={tree_pids(srv.pid)}", flush=True)
            time.sleep(args.hold)

        async def run_all() -> None:
            if args.only & {"single", "upload", "download"}:
                await bench.single_stream()
            if "concurrent" in args.only:
                await bench.concurrent()
            if "logins" in args.only:
                await bench.logins()
            if "memory" in args.only:
                await bench.memory()
            if "lag" in args.only:
                await bench.lag()

        floors: list[dict] = []
        if not args.no_floor:
            log("floor: openssl speed (chacha20-poly1305, aes-256-gcm) and loopback TCP")
            floors = measure_floors(args.size)
        load0 = os.getloadavg()
        if load0[0] > (os.cpu_count() or 1) / 2:
            notes.append(f"machine busy at start (load average {load0[0]:.1f} on {os.cpu_count()} CPUs): "
                         "throughput is noisy; CPU s/GiB is the steadier column")
            log("NOTE: " + notes[-1])
        t_start = time.monotonic()
        asyncio.run(run_all())
        elapsed = time.monotonic() - t_start

        table = markdown_table(bench.rows, servers)
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release(),
                     "python": platform.python_version()},
            "size_bytes": args.size, "cipher": args.cipher or "client default",
            "workers": args.workers, "server_env": args.server_env, "bare_opts": args.bare_opts, "reps": args.reps, "quick": args.quick,
            "elapsed_s": round(elapsed, 1), "notes": notes,
            "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "servers": {s.name: {"port": s.port, **s.info} for s in servers},
        }
        print()
        print(f"sshfiles bench — {args.size / MiB:.0f} MiB, median of {args.reps}, "
              f"{os.cpu_count()} CPUs, {elapsed:.0f} s")
        for n in notes:
            print(f"note: {n}")
        print()
        print(table)
        vs = [(r["workload"], n, v) for r in bench.rows for n, v in r.get("vs_openssh_sftp", {}).items()]
        if vs:
            print()
            for workload, name, ratio in vs:
                print(f"{workload}: {name} / OpenSSH sftp to OpenSSH = {ratio:.2f}")
        if floors:
            table += "\n\n" + floor_tables(floors, bench.rows, servers, args.cipher)
            print()
            print(floor_tables(floors, bench.rows, servers, args.cipher))
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": bench.rows, "floors": floors},
                                                  indent=2) + "\n")
            log(f"wrote {args.json}")
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping servers")
        return 130
    finally:
        for srv in servers:
            with contextlib.suppress(Exception):
                srv.stop()
        for srv in servers:
            if isinstance(srv, OpenSSHServer | ClusterServer):
                with contextlib.suppress(Exception):
                    srv.cleanup()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
