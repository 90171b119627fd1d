#!/usr/bin/env python3
"""Siege sshfiles on loopback: one attack at a time, and what an innocent bystander feels meanwhile.

    python scripts/siege.py --quick                 # smoke run: 4 s per attack, about 2 minutes
    python scripts/siege.py --json siege.json       # 20 s per attack, larger floods

A benchmark, not a test (not in CI). It starts ``python -m sshfiles serve`` (scripts/bench.py's
``SshfilesServer``, so the same reaper, state layout and /proc accounting) and runs, one after the
other, each attack below from the loopback source 127.0.0.2, at a stated rate and bounded in count and
seconds. Meanwhile a bystander from 127.0.0.3 logs in again and again (key and password, each timed)
and, on an SFTP session opened before the attack, does ``stat`` every 5 ms; it runs in a process of
its own, so the attacking client's work (decoding 100k-entry listings, say) is not counted as lag. Per attack it prints the
bystander's worst key and password login, stat p99 and worst, and the server's peak RSS and open fds
(sampled every 100 ms over the server's process tree).

Attacks (attacker user ``mallory``, own home; everything stays on 127.0.0.0/8):

* ``preauth-idle``: TCP connections that never send a byte, held open;
* ``wrong-password``: password logins with a wrong password, several at once;
* ``dh-group18``: key exchanges forced to diffie-hellman-group18-sha512 (8192-bit), then dropped;
* ``pipelined-read``: one SFTP channel sending READ requests of 256 KiB and never reading a reply;
* ``handle-flood``: SFTP OPENs of one file, kept open;
* ``big-opendir``: READDIR of a directory of ``--dir-entries`` (100k) files, several at once;
* ``copy-data``: SFTP copy-data of a large (sparse) file (1 GiB quick, 8 GiB full), repeatedly;
* ``hash-flood``: exec ``sha256sum`` and check-file of a 63 GiB sparse file, plus a 4 TiB one;
* ``locked-store``: another process holds the accounts store's write lock while mallory mkdirs.

Targets (README, "Under attack"): bystander key login < 1 s and password login < 2 s under every attack,
stat p99 < 50 ms; server peak RSS < 512 MiB in all, and, for floods of many connections (50 or more),
< 256 KiB per attacking connection above the idle server. A row that misses one says which in its last column.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench import MiB, SshfilesServer, log, tree_mem, tree_pids  # noqa: E402

ATTACKER = "127.0.0.2"
BYSTANDER = "127.0.0.3"
TiB = 1 << 40
GiB = 1 << 30

KEY_LOGIN_TARGET = 1.0
PASSWORD_LOGIN_TARGET = 2.0
STAT_P99_TARGET = 0.050
RSS_TARGET_MIB = 512
RSS_PER_CONN_TARGET_KIB = 256


# --------------------------------------------------------------------------- measurements


def fd_count(root: int) -> int:
    n = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{pid}/fd"))
    return n


class Sampler:
    """Peak RSS (KiB) and fds of the server's process tree, every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self.peak_fds = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.peak_rss = max(self.peak_rss, tree_mem(self.pid)["rss_kib"])
            self.peak_fds = max(self.peak_fds, fd_count(self.pid))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


# --------------------------------------------------------------------------- the bystander


def _bystander_connect(spec: dict, *, key: bool) -> Any:
    return asyncssh.connect("127.0.0.1", spec["port"], local_addr=(BYSTANDER, 0), username=spec["user"],
                            password=None if key else spec["password"],
                            client_keys=[spec["key"]] if key else None, known_hosts=None,
                            login_timeout=spec["login_timeout"])


async def bystander_main(spec: dict) -> dict:
    """The bystander, in a process of its own (``--bystander SPEC``): its event loop is not the
    attacker's, so what it measures is the server's answer time, not the attacking client's own
    work (100k-entry listings decoded by asyncssh in the same loop used to show up as stat lag).

    It opens its SFTP session, prints ``ready``, waits for ``go`` on stdin (the attack has ramped
    up by then), measures for ``seconds`` and prints its results as one JSON line."""
    stats: list[float] = []
    logins: dict[str, list[float]] = {"key": [], "password": []}
    loop = asyncio.get_running_loop()

    async def login(key: bool) -> float:
        t0 = time.monotonic()
        try:
            async with _bystander_connect(spec, key=key):
                return time.monotonic() - t0
        except (TimeoutError, OSError, asyncssh.Error):
            return float("inf")

    async with _bystander_connect(spec, key=True) as conn, conn.start_sftp_client() as sftp:
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        deadline = time.monotonic() + spec["seconds"]

        async def stat_loop() -> None:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    await asyncio.wait_for(sftp.stat("probe"), spec["login_timeout"])
                    stats.append(time.monotonic() - t0)
                except (TimeoutError, OSError, asyncssh.Error):
                    stats.append(float("inf"))
                await asyncio.sleep(0.005)

        async def login_loop() -> None:
            while time.monotonic() < deadline:
                logins["key"].append(await login(True))
                logins["password"].append(await login(False))
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

        await asyncio.gather(stat_loop(), login_loop())
    stats.sort()
    return {"stats": len(stats),
            "stat_p99_ms": 1000 * stats[min(len(stats) - 1, int(len(stats) * 0.99))] if stats else None,
            "stat_worst_ms": 1000 * stats[-1] if stats else None,
            "key_login_s": max(logins["key"], default=None),
            "password_login_s": max(logins["password"], default=None),
            "logins": len(logins["key"]) + len(logins["password"])}


class Bystander:
    """The parent's end of the bystander process."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process and wait until its SFTP session is open (before the attack starts)."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--bystander", json.dumps(self.spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the bystander did not start: {line!r}")

    async def measure(self) -> dict:
        """Tell it to go; its results after ``seconds``."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), self.spec["seconds"] + 120)
        await self.proc.wait()
        return json.loads(line) if line.strip() else {}

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


class Siege:
    def __init__(self, args: argparse.Namespace, srv: SshfilesServer, key: Path, mallory_pw: str) -> None:
        self.args = args
        self.srv = srv
        self.key = key
        self.mallory_pw = mallory_pw
        self.mallory_home = srv.workdir / "homes" / "mallory"
        # Each attack comes from its own loopback address (127.0.1.N): bans live in the store and
        # outlast the restart between attacks, so one attack's ban must not pre-empt the next.
        self.attacker = ATTACKER

    def connect(self, *, source: str, user: str, password: str | None = None, key: bool = False,
                **kw: Any) -> Any:
        return asyncssh.connect("127.0.0.1", self.srv.port, local_addr=(source, 0), username=user,
                                password=password, client_keys=[str(self.key)] if key else None,
                                known_hosts=None, login_timeout=self.args.login_timeout, **kw)

    def mallory(self, **kw: Any) -> Any:
        return self.connect(source=self.attacker, user="mallory", password=self.mallory_pw, **kw)

    # -- the attacks: each runs until `stop`, bounded in count, and returns what it did ------------

    async def preauth_idle(self, stop: asyncio.Event) -> dict:
        socks: list[socket.socket] = []
        refused = 0
        limit, rate = self.args.flood, 200
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set() and len(socks) + refused < limit:
                s = socket.socket()
                s.setblocking(False)
                s.bind((self.attacker, 0))
                try:
                    await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", self.srv.port)), 5)
                    socks.append(s)
                except (TimeoutError, OSError):
                    refused += 1
                    s.close()
                await asyncio.sleep(1 / rate)
            alive = 0
            await stop.wait()
            for s in socks:  # how many did the server keep?
                try:
                    alive += s.recv(1, socket.MSG_PEEK) != b""
                except BlockingIOError:
                    alive += 1
                except OSError:
                    pass
            return {"rate": f"{rate}/s up to {limit}", "connections": len(socks), "refused": refused,
                    "still_open": alive}
        finally:
            for s in socks:
                s.close()

    async def _repeat(self, stop: asyncio.Event, workers: int, limit: int,
                      one: Callable[[], Awaitable[str]]) -> dict:
        outcomes: dict[str, int] = {}
        count = 0

        async def worker() -> None:
            nonlocal count
            while not stop.is_set() and count < limit:
                count += 1
                try:
                    what = await asyncio.wait_for(one(), 60)
                except asyncssh.PermissionDenied:
                    what = "denied"
                except (TimeoutError, OSError, asyncssh.Error) as exc:
                    what = type(exc).__name__
                outcomes[what] = outcomes.get(what, 0) + 1

        await asyncio.gather(*(worker() for _ in range(workers)))
        return {"attempts": count, "outcomes": outcomes}

    async def wrong_password(self, stop: asyncio.Event) -> dict:
        async def one() -> str:
            async with self.connect(source=self.attacker, user="mallory", password="wrong-" + os.urandom(4).hex()):
                return "accepted?!"
        res = await self._repeat(stop, 8, self.args.flood, one)
        return {"rate": "8 concurrent", "connections": 8, **res}

    async def dh_group18(self, stop: asyncio.Event) -> dict:
        async def one() -> str:
            conn = await self.connect(source=self.attacker, user="mallory", password="wrong",
                                      kex_algs=["diffie-hellman-group18-sha512"],
                                      preferred_auth=[])  # kex done, no authentication attempt
            conn.abort()
            return "kex done"
        res = await self._repeat(stop, 4, self.args.flood, one)
        return {"rate": "4 concurrent", "connections": 4, **res}

    async def pipelined_read(self, stop: asyncio.Event) -> dict:
        def pkt(kind: int, body: bytes) -> bytes:
            return struct.pack(">IB", len(body) + 1, kind) + body

        def string(b: bytes) -> bytes:
            return struct.pack(">I", len(b)) + b

        channels, sent = 4, 0
        async with self.mallory() as conn:
            writers = []
            for _ in range(channels):
                writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)
                writer.write(pkt(1, struct.pack(">I", 3)))                                # INIT v3
                await reader.readexactly(4 + struct.unpack(">I", await reader.readexactly(4))[0] - 4)
                writer.write(pkt(3, struct.pack(">I", 1) + string(b"big.bin") + struct.pack(">II", 1, 0)))
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                reply = await reader.readexactly(length)
                handle = reply[5 + 4:]                                                    # type, id, string
                writers.append((writer, handle))
            req = 2
            while not stop.is_set() and sent < self.args.reads:
                for writer, handle in writers:
                    for _ in range(64):
                        writer.write(pkt(5, struct.pack(">I", req) + string(handle)
                                         + struct.pack(">QI", (req % 64) * 256 * 1024, 256 * 1024)))
                        req += 1
                        sent += 1
                await asyncio.sleep(0.01)
            await stop.wait()
            conn.abort()
        return {"rate": f"{channels} channels, up to {self.args.reads} READs of 256 KiB, never read",
                "connections": 1, "reads_sent": sent}

    async def handle_flood(self, stop: asyncio.Event) -> dict:
        opened = failed = 0
        first_error = ""
        async with self.mallory() as conn, conn.start_sftp_client() as sftp:
            files = []
            while not stop.is_set() and opened + failed < self.args.handles:
                batch = [sftp.open("big.bin", "rb") for _ in range(50)]
                for res in await asyncio.gather(*batch, return_exceptions=True):
                    if isinstance(res, BaseException):
                        failed += 1
                        first_error = first_error or str(res)[:60]
                    else:
                        opened += 1
                        files.append(res)
                await asyncio.sleep(0.05)
            await stop.wait()
            conn.abort()
        return {"rate": f"50 OPENs / 50 ms up to {self.args.handles}", "connections": 1,
                "opened": opened, "refused": failed, "error": first_error}

    async def big_opendir(self, stop: asyncio.Event) -> dict:
        async with self.mallory() as conn:
            sftps = [await conn.start_sftp_client() for _ in range(4)]

            async def one_lister(sftp: asyncssh.SFTPClient) -> int:
                n = 0
                while not stop.is_set() and n < 20:
                    with contextlib.suppress(asyncssh.Error, OSError):
                        await sftp.readdir("many")
                    n += 1
                return n

            done = await asyncio.gather(*(one_lister(s) for s in sftps))
            conn.abort()
        return {"rate": f"4 channels listing {self.args.dir_entries} entries back to back",
                "connections": 1, "listings": sum(done)}

    async def copy_data(self, stop: asyncio.Event) -> dict:
        async def one() -> str:
            async with self.mallory() as conn, conn.start_sftp_client() as sftp:
                await sftp.remote_copy("sparse-copy.bin", f"copy-{os.urandom(3).hex()}.bin")
                return "copied"
        res = await self._repeat(stop, 2, 20, one)
        size = f"{self.args.copy_size // GiB} GiB"
        return {"rate": f"2 concurrent copies of a {size} sparse file", "connections": 2, **res}

    async def hash_flood(self, stop: asyncio.Event) -> dict:
        from sshfiles import checkfile
        from sshfiles.asyncssh_seam import extended_request

        outcomes: dict[str, int] = {}

        def note(what: str) -> None:
            outcomes[what] = outcomes.get(what, 0) + 1

        async with self.mallory() as conn:
            async def exec_one(name: str) -> None:
                r = await conn.run(f"sha256sum {name}", stdin=asyncssh.DEVNULL, check=False)
                note({None: "exec cut off", 0: "exec done"}.get(r.exit_status, "exec refused"))

            async def check_one(name: str) -> None:
                async with conn.start_sftp_client() as sftp:
                    try:
                        await extended_request(sftp, checkfile.CHECK_FILE_NAME,
                                               checkfile.encode_request(name.encode(), "sha256"))
                        note("check-file done")
                    except asyncssh.SFTPError as exc:
                        note("check-file refused" if "too large" in exc.reason else "check-file cut off")

            tasks = [asyncio.ensure_future(exec_one("sparse-63g.bin")) for _ in range(6)]
            tasks += [asyncio.ensure_future(check_one("sparse-63g.bin")) for _ in range(6)]
            tasks += [asyncio.ensure_future(exec_one("sparse-4t.bin")) for _ in range(2)]
            await stop.wait()
            conn.abort()  # leave mid-hash: the server should stop hashing
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(2)
        before = self.srv.cpu()
        await asyncio.sleep(2)
        return {"rate": "6 exec + 6 check-file of 63 GiB, 2 exec of 4 TiB (sparse), then disconnect",
                "connections": 1, "outcomes": outcomes,
                "cpu_after_disconnect_s_per_s": round((self.srv.cpu() - before) / 2, 2)}

    async def locked_store(self, stop: asyncio.Event) -> dict:
        db = sqlite3.connect(self.srv.workdir / "accounts" / "accounts.db", isolation_level=None, timeout=10)
        messages: set[str] = set()
        mkdirs = 0

        async def mallory_mkdirs() -> None:
            nonlocal mkdirs
            async with self.mallory() as conn, conn.start_sftp_client() as sftp:
                while mkdirs < 200:
                    try:
                        await sftp.mkdir(f"d-{mkdirs}")
                    except asyncssh.SFTPError as exc:
                        messages.add(exc.reason[:80])
                    mkdirs += 1
                    await asyncio.sleep(0.05)

        db.execute("BEGIN EXCLUSIVE")
        task = asyncio.ensure_future(mallory_mkdirs())
        try:
            await stop.wait()
        finally:
            db.execute("ROLLBACK")  # the lock ends with the attack, whatever mallory is waiting for
            db.close()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        leak = any("/" in m or "accounts.db" in m for m in messages)
        return {"rate": "write lock held for the whole attack; 20 mkdir/s", "connections": 1,
                "mkdirs": mkdirs, "errors_seen": sorted(messages), "host_path_leaked": leak}

    ATTACKS = ("preauth-idle", "wrong-password", "dh-group18", "pipelined-read", "handle-flood",
               "big-opendir", "copy-data", "hash-flood", "locked-store")

    async def run_one(self, name: str) -> dict:
        attack = getattr(self, name.replace("-", "_"))
        self.attacker = f"127.0.1.{self.ATTACKS.index(name) + 1}"
        self.srv.restart()  # each attack meets a fresh server: its memory and fds are its own
        base = {"rss_kib": tree_mem(self.srv.pid)["rss_kib"], "fds": fd_count(self.srv.pid)}
        bystander = Bystander({"port": self.srv.port, "user": self.srv.user, "password": self.srv.password,
                               "key": str(self.key), "login_timeout": self.args.login_timeout,
                               "seconds": self.args.seconds})
        try:
            await bystander.start()
            stop = asyncio.Event()
            sampler = Sampler(self.srv.pid)
            samp = asyncio.ensure_future(sampler.run(stop))
            att = asyncio.ensure_future(attack(stop))
            await asyncio.sleep(1.0)  # the attack ramps up before the bystander starts measuring
            bys = await bystander.measure()
            stop.set()
            try:
                detail = await asyncio.wait_for(att, 60)
            except Exception as exc:  # an attack that broke is reported, not fatal
                detail = {"error": f"{type(exc).__name__}: {exc}"[:120]}
            await samp
        finally:
            bystander.kill()
        row = {"attack": name, **bys, "peak_rss_mib": sampler.peak_rss / 1024, "peak_fds": sampler.peak_fds,
               "base_rss_mib": base["rss_kib"] / 1024, "base_fds": base["fds"], "detail": detail}
        conns = detail.get("connections", 0) if isinstance(detail, dict) else 0
        # Per connection only where there are many (a flood); with a handful it is just the attack's cost.
        row["rss_per_conn_kib"] = ((sampler.peak_rss - base["rss_kib"]) / conns) if conns >= 50 else None
        row["misses"] = misses(row)
        return row


def misses(row: dict) -> str:
    out = []
    if row.get("key_login_s") is None or row["key_login_s"] >= KEY_LOGIN_TARGET:
        out.append("key login")
    if row.get("password_login_s") is None or row["password_login_s"] >= PASSWORD_LOGIN_TARGET:
        out.append("password login")
    if row.get("stat_p99_ms") is None or row["stat_p99_ms"] >= 1000 * STAT_P99_TARGET:
        out.append("stat p99")
    if row["peak_rss_mib"] >= RSS_TARGET_MIB:
        out.append("RSS")
    if row.get("rss_per_conn_kib") is not None and row["rss_per_conn_kib"] >= RSS_PER_CONN_TARGET_KIB:
        out.append("RSS/conn")
    return ", ".join(out) or "met"


def _num(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    if v == float("inf"):
        return "failed"
    return format(v, fmt)


def table(rows: list[dict]) -> str:
    head = ("| attack | key login s | password login s | stat p99 ms | stat worst ms | stats | "
            "peak RSS MiB (idle) | RSS/attacker conn KiB | peak fds (idle) | targets |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {_num(r.get('key_login_s'), '.2f')} | {_num(r.get('password_login_s'), '.2f')} | "
            f"{_num(r.get('stat_p99_ms'), '.1f')} | {_num(r.get('stat_worst_ms'), '.1f')} | {r.get('stats', 0)} | "
            f"{r['peak_rss_mib']:.0f} ({r['base_rss_mib']:.0f}) | {_num(r.get('rss_per_conn_kib'), '.0f')} | "
            f"{r['peak_fds']} ({r['base_fds']}) | {r['misses']} |")
    return "\n".join(lines)


def prepare(srv: SshfilesServer, args: argparse.Namespace) -> str:
    """The bystander is bench's user (key + password); mallory gets a home full of bait."""
    password = "mallory-" + os.urandom(6).hex()
    res = subprocess.run([*srv.base, "user", "add", "mallory", "--password-stdin", "--quota", "1T"],
                         input=password + "\n", text=True, capture_output=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"user add mallory failed: {res.stdout}{res.stderr}")
    home = srv.workdir / "homes" / "mallory"
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "big.bin", "wb") as f:
        f.write(os.urandom(16 * MiB))
    for name, size in (("sparse-63g.bin", 63 * GiB), ("sparse-4t.bin", 4 * TiB),
                       ("sparse-copy.bin", args.copy_size)):
        with open(home / name, "wb") as f:
            f.truncate(size)
    many = home / "many"
    many.mkdir()
    for i in range(args.dir_entries):
        (many / f"entry-{i:06d}-{'x' * 40}").touch()
    (srv.home / "probe").write_bytes(b"probe\n")
    return password


async def amain(args: argparse.Namespace, workdir: Path) -> list[dict]:
    key = workdir / "id_bystander"
    k = asyncssh.generate_private_key("ssh-ed25519")
    k.write_private_key(str(key))
    k.write_public_key(str(key) + ".pub")
    srv = SshfilesServer(workdir, [sys.executable, "-m", "sshfiles"], Path(str(key) + ".pub"), "1T", args.workers,
                         bench_limits=False)  # the server's own defaults: its defences are under test
    srv.setup()
    log(f"preparing bait ({args.dir_entries} directory entries, sparse files)")
    mallory_pw = prepare(srv, args)
    srv.start()
    siege = Siege(args, srv, key, mallory_pw)
    rows = []
    try:
        for name in args.only:
            log(f"attack {name} for {args.seconds:.0f} s")
            row = await siege.run_one(name)
            log(f"  -> {row['misses']}: {json.dumps(row['detail'])[:200]}")
            rows.append(row)
    finally:
        srv.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 s per attack, smaller floods (~2 min)")
    p.add_argument("--seconds", type=float, help="seconds per attack after a 1 s ramp (default 20, quick 4)")
    p.add_argument("--only", default=",".join(Siege.ATTACKS), help="comma list of attacks")
    p.add_argument("--dir-entries", type=int, default=100_000)
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server logs)")
    p.add_argument("--workers", type=int, help="pass --workers N to sshfiles serve (default: its own, auto)")
    p.add_argument("--bystander", help=argparse.SUPPRESS)  # the bystander's own process (JSON spec)
    args = p.parse_args(argv)
    if args.bystander:
        print(json.dumps(asyncio.run(bystander_main(json.loads(args.bystander)))), flush=True)
        return 0
    args.seconds = args.seconds or (4.0 if args.quick else 20.0)
    args.copy_size = (1 if args.quick else 8) * GiB
    args.flood = 300 if args.quick else 1500
    args.reads = 6_000 if args.quick else 20_000  # up to 1.5 / 5 GiB of replies nobody reads
    args.login_timeout = 10.0 if args.quick else 30.0
    args.handles = 1000 if args.quick else 5000
    args.only = [a for a in args.only.split(",") if a]
    unknown = set(args.only) - set(Siege.ATTACKS)
    if unknown:
        p.error(f"unknown attacks: {', '.join(sorted(unknown))}")

    def as_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, as_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="sshfiles-siege-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        rows = asyncio.run(amain(args, workdir))
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
    print(f"sshfiles siege, {started}, {args.seconds:.0f} s per attack{' (--quick)' if args.quick else ''}, "
          f"attackers 127.0.1.N (one per attack), bystander {BYSTANDER}")
    print(table(rows))
    for r in rows:
        print(f"- {r['attack']}: {json.dumps(r['detail'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started, "quick": args.quick, "rows": rows}, indent=1,
                                              default=str))
    return 0 if all(r["misses"] == "met" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
