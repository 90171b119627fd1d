"""The unauthenticated side under attack ("Hardening II" items 17-20, 22, 11): a real server, real clients.

Every flood is bounded in count and seconds and stays on 127.0.0.0/8: the attacker
connects from 127.0.0.2 (or nearby), the bystander from 127.0.0.3, so per-source rules
can tell them apart.  Each test asserts the refusal *and* that the bystander still
logs in promptly (generous bounds, no tight timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import asyncssh
import pytest
from asyncssh.constants import MSG_USERAUTH_REQUEST
from asyncssh.packet import Boolean, String
from conftest import ServerHandle, User, make_server

ATTACKER, BYSTANDER = "127.0.0.2", "127.0.0.3"


@pytest.fixture
def start(tmp_path, host_keys_dir) -> Iterator:
    """start(*args) -> a running server with those serve flags; stopped at the end."""
    handles: list[ServerHandle] = []

    def _start(*args: str) -> ServerHandle:
        root = tmp_path / f"server{len(handles)}"
        root.mkdir()
        h = make_server(root, host_keys_dir, tuple(args))
        handles.append(h)
        h.start()
        return h

    yield _start
    for h in handles:
        h.stop()


def login_seconds(server: ServerHandle, user: User, source: str = BYSTANDER) -> float:
    """Log in from `source`, stat the home, log out; the seconds it took (raises if refused)."""
    async def go() -> float:
        t0 = time.monotonic()
        async with server.connect(user, local_addr=(source, 0), login_timeout=20) as conn, \
                conn.start_sftp_client() as sftp:
            await sftp.stat(".")
        return time.monotonic() - t0
    return asyncio.run(asyncio.wait_for(go(), 30))


def refused(server: ServerHandle, user: User, source: str) -> bool:
    """True if a login from `source` is cut before authentication (banned or not admitted)."""
    async def go() -> None:
        async with server.connect(user, local_addr=(source, 0), login_timeout=10):
            pass
    try:
        asyncio.run(asyncio.wait_for(go(), 15))
    except (asyncssh.ConnectionLost, asyncssh.DisconnectError, ConnectionError, OSError):
        return True
    except asyncssh.PermissionDenied:
        return False
    return False


@contextlib.contextmanager
def raw_sockets(server: ServerHandle, sources: list[str]) -> Iterator[list[socket.socket]]:
    """One idle TCP connection per entry of `sources` (bound to that address); all closed at the end."""
    socks: list[socket.socket] = []
    try:
        for src in sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(5)
            s.bind((src, 0))
            s.connect((server.host, server.port))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def still_open(socks: list[socket.socket], settle: float = 1.5) -> int:
    """How many of the sockets the server has not closed (after `settle` seconds)."""
    time.sleep(settle)
    n = 0
    for s in socks:
        s.setblocking(False)
        closed = False
        try:
            while True:
                data = s.recv(4096)
                if not data:
                    closed = True
                    break
        except BlockingIOError:
            pass
        except OSError as exc:  # ECONNRESET: aborted by the server
            closed = exc.errno in (errno.ECONNRESET, errno.EPIPE) or True
        n += not closed
    return n


# -- 17: MaxStartups-style limits and a per-source rate ------------------------------------------


def test_idle_preauth_flood_from_one_source_is_capped(start):
    # a total cap well above the per-source one: with the default 10:30:100, the 10 connections this
    # source may keep would start the random early drop for everyone (as OpenSSH's MaxStartups does)
    server = start("--per-source-rate", "0", "--ban-threshold", "0", "--max-startups", "50:30:100")
    user = server.add_user("alice")
    with raw_sockets(server, [ATTACKER] * 40) as socks:
        kept = still_open(socks)
        assert kept <= 10, f"{kept} idle pre-auth connections from one source were kept (limit 10)"
        assert login_seconds(server, user) < 3
    assert "reason=per-source startups" in server.log()


def test_total_preauth_connections_are_capped_with_early_drop(start):
    server = start("--max-startups", "10:50:20", "--per-source-rate", "0", "--ban-threshold", "0")
    user = server.add_user("alice")
    sources = [f"127.0.0.{10 + i % 6}" for i in range(36)]  # 6 per source, under the per-source cap
    with raw_sockets(server, sources) as socks:
        kept = still_open(socks)
        assert 10 <= kept <= 20, kept
    # the flood is gone: the bystander logs in at once
    assert login_seconds(server, user) < 3


def test_the_total_preauth_cap_holds_for_all_workers_together(start):
    """--max-startups counts the server's unauthenticated connections, not each worker's: the workers
    publish theirs in a table in shared memory (worker_balance.py). Before, each of 2 workers admitted
    up to the cap, so 24 idle connections kept 24 of a cap of 12."""
    server = start("--workers", "2", "--max-startups", "12", "--per-source-max-startups", "0",
                   "--per-source-rate", "0", "--ban-threshold", "0")
    user = server.add_user("alice")
    sources = [f"127.0.0.{10 + i}" for i in range(24)]
    for _ in range(2):  # twice: the first flood's connections are released from the count when they end
        with raw_sockets(server, sources) as socks:
            kept = still_open(socks)
            assert kept == 12, kept
        time.sleep(0.5)  # the server notices the closes
    assert "reason=startups full" in server.log()
    # both workers took part in refusing (the balancer spread the flood over them)
    refusing = set(re.findall(r"\[(\d+)\]: .*reason=startups full", server.log()))
    assert len(refusing) == 2, refusing
    assert login_seconds(server, user) < 3


def test_per_source_connection_rate(start):
    server = start("--per-source-max-startups", "0", "--per-source-rate", "2", "--per-source-burst", "5",
                   "--ban-threshold", "0")
    user = server.add_user("alice")
    with raw_sockets(server, [ATTACKER] * 20) as socks:  # opened within a fraction of a second
        kept = still_open(socks, settle=1.0)
        assert kept <= 8, f"{kept} of 20 connections in a burst were accepted (burst 5, 2/s)"
        assert login_seconds(server, user) < 3
    assert "reason=connection rate" in server.log()


# -- 19: password floods, pipelining, max-auth-tries ---------------------------------------------


class _Pipeliner(asyncssh.SSHClient):
    """Answers the password prompt, then sends `extra` more wrong password requests without waiting
    for answers: all at once (spacing 0), or one every `spacing` seconds, so that each arrives while
    the server is still checking the one before."""

    def __init__(self, username: str, extra: int, spacing: float = 0.0) -> None:
        self.username, self.extra, self.spacing = username, extra, spacing
        self.conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    def _send(self, i: int) -> None:
        assert self.conn is not None
        with contextlib.suppress(Exception):  # the server may have hung up already
            self.conn.send_packet(MSG_USERAUTH_REQUEST, String(self.username), String("ssh-connection"),
                                  String("password"), Boolean(False), String(f"wrong-{i}"))

    def password_auth_requested(self) -> str:
        loop = asyncio.get_running_loop()
        for i in range(self.extra):
            if self.spacing:
                loop.call_later(self.spacing * (i + 1), self._send, i)
            else:
                self._send(i)
        return "wrong-first"


async def _pipeline(server: ServerHandle, username: str, extra: int, source: str = ATTACKER,
                    spacing: float = 0.0) -> None:
    with contextlib.suppress(asyncssh.Error, OSError, asyncio.TimeoutError):
        conn, _ = await asyncio.wait_for(asyncssh.create_connection(
            lambda: _Pipeliner(username, extra, spacing), server.host, server.port, username=username,
            known_hosts=None, client_keys=None, preferred_auth="password", local_addr=(source, 0)), 20)
        conn.close()


def test_pipelined_passwords_each_count_and_are_logged(start):
    server = start("--max-auth-tries", "4", "--ban-threshold", "0")
    server.add_user("alice")
    # each request arrives while the one before is in argon2: asyncssh cancels that check
    asyncio.run(_pipeline(server, "alice", 20, spacing=0.02))
    time.sleep(0.5)
    log = server.log()
    failed = re.findall(r"login user=alice source=127\.0\.0\.2:\d+ method=password result=\w+", log)
    assert len(failed) >= 4, log[-3000:]
    assert "too many authentication failures from 127.0.0.2" in log


def test_password_flood_from_one_source_does_not_starve_another(start):
    # Bans off: this is the argon2 queue's own fairness, not the ban that would end the flood.
    server = start("--ban-threshold", "0", "--per-source-rate", "0", "--per-source-max-startups", "0")
    user = server.add_user("alice")

    async def flood_and_login() -> float:
        flood = [asyncio.create_task(_pipeline(server, "alice", 60)) for _ in range(12)]  # 732 checks
        await asyncio.sleep(1.0)
        t0 = time.monotonic()

        async def bystander() -> None:
            async with server.connect(user, local_addr=(BYSTANDER, 0), login_timeout=30):
                pass
        try:
            await asyncio.wait_for(bystander(), 30)
        finally:
            elapsed = time.monotonic() - t0
            for t in flood:
                t.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
        return elapsed

    elapsed = asyncio.run(flood_and_login())
    assert elapsed < 3, f"a login from another source took {elapsed:.1f} s during the flood"
    assert "result=busy" in server.log() or "result=abandoned" in server.log()


# -- 20: per-source defence: scores, bans, CLI, exemptions, shared between workers --------------


def _fail_logins(server: ServerHandle, source: str, n: int) -> None:
    bad = User("alice", "wrong-password", server.homes_dir / "alice")

    async def go() -> None:
        for _ in range(n):
            with contextlib.suppress(asyncssh.Error, OSError):
                async with server.connect(bad, local_addr=(source, 0), login_timeout=10):
                    pass
    asyncio.run(asyncio.wait_for(go(), 60))


def _wait_for(pred, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def test_failed_logins_ban_the_source_and_only_it(start):
    server = start("--ban-threshold", "3", "--max-auth-tries", "1")
    user = server.add_user("alice")
    _fail_logins(server, ATTACKER, 3)
    assert "banned source=127.0.0.2" in server.log()
    assert refused(server, user, ATTACKER)            # even with the right password
    assert login_seconds(server, user) < 3             # another source is untouched
    assert _wait_for(lambda: "127.0.0.2" in server.cli("ban", "list").stdout)  # in the store (watcher)
    server.cli("ban", "remove", "127.0.0.2")
    assert _wait_for(lambda: not refused(server, user, ATTACKER), 5)


def test_admin_ban_applies_to_a_running_server_and_exempt_sources_are_never_banned(start):
    server = start("--ban-threshold", "2", "--max-auth-tries", "1", "--ban-exempt", "127.0.0.5/32, 10.0.0.0/8")
    user = server.add_user("alice")
    assert login_seconds(server, user, "127.0.0.4") < 3
    out = server.cli("ban", "add", "127.0.0.4", "--for", "1h").stdout
    assert "banned 127.0.0.4" in out
    assert _wait_for(lambda: refused(server, user, "127.0.0.4"), 5)
    _fail_logins(server, "127.0.0.5", 5)
    assert "banned source=127.0.0.5" not in server.log()
    assert login_seconds(server, user, "127.0.0.5") < 3
    listing = server.cli("ban", "list").stdout
    assert "127.0.0.4" in listing and "127.0.0.5" not in listing


def test_preauth_timeouts_score_and_ban(start):
    server = start("--login-timeout", "1", "--ban-threshold", "4")
    user = server.add_user("alice")
    with raw_sockets(server, [ATTACKER, ATTACKER]):
        assert _wait_for(lambda: "banned source=127.0.0.2" in server.log(), 6)
    assert "login timeout source=127.0.0.2" in server.log()
    assert refused(server, user, ATTACKER)
    assert login_seconds(server, user) < 3


def test_protocol_errors_score_and_ban(start):
    server = start("--ban-threshold", "3")
    user = server.add_user("alice")
    for _ in range(3):  # a version line, then a packet too short to be one
        with raw_sockets(server, [ATTACKER]) as (sock,):
            sock.sendall(b"SSH-2.0-evil\r\n" + b"\x00\x00\x00\x0c\x0a\x14" + b"\xff" * 64)
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass
    assert _wait_for(lambda: "banned source=127.0.0.2" in server.log(), 5)
    assert "protocol error source=127.0.0.2" in server.log()
    assert refused(server, user, ATTACKER)
    assert login_seconds(server, user) < 3


def test_bans_are_shared_by_workers(start):
    server = start("--workers", "2", "--ban-threshold", "3", "--max-auth-tries", "1")
    user = server.add_user("alice")
    # Scores are per process (the kernel spreads connections over the workers): fail until one bans.
    for _ in range(12):
        _fail_logins(server, ATTACKER, 1)
        if "banned source=127.0.0.2" in server.log():
            break
    assert "banned source=127.0.0.2" in server.log()
    time.sleep(2.5)  # the watchers write and read the store every second
    # whichever worker accepts them, every attempt is refused
    assert all(refused(server, user, ATTACKER) for _ in range(6))
    assert login_seconds(server, user) < 3


# -- 22: algorithm policy ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("ssh-audit") is None, reason="pip install ssh-audit")
def test_ssh_audit_reports_no_failure_and_no_dheat(start):
    server = start()
    res = subprocess.run(["ssh-audit", "-n", "-p", str(server.port), server.host], capture_output=True, text=True,
                         timeout=120)
    out = res.stdout
    assert "(kex) mlkem768x25519-sha256" in out
    assert "[fail]" not in out, out
    assert "DHEat" not in out, out
    kex = re.findall(r"\(kex\) (\S+)", out)
    assert kex[0] == "mlkem768x25519-sha256"


def _negotiate(server: ServerHandle, user: User, **opts) -> asyncssh.SSHClientConnection | None:
    async def go() -> str:
        async with server.connect(user, **opts) as conn:
            return conn.get_extra_info("server_version") or "ok"
    try:
        asyncio.run(asyncio.wait_for(go(), 20))
    except (asyncssh.KeyExchangeFailed, asyncssh.ConnectionLost, asyncssh.PermissionDenied,
            asyncssh.HostKeyNotVerifiable, asyncssh.DisconnectError):
        return None
    return True  # type: ignore[return-value]


def test_sha1_and_legacy_algorithms_only_with_the_opt_in(start, tmp_path):
    server = start()
    user = server.add_user("alice")
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    key_file = tmp_path / "id_rsa"
    rsa.write_private_key(str(key_file))
    rsa.write_public_key(str(key_file) + ".pub")
    server.cli("user", "key", "add", "alice", str(key_file) + ".pub")
    keyed = User("alice", None, user.home, key_file)
    assert _negotiate(server, user, kex_algs=["mlkem768x25519-sha256"])
    assert _negotiate(server, keyed, signature_algs=["rsa-sha2-256"])
    assert not _negotiate(server, keyed, signature_algs=["ssh-rsa"])          # SHA-1 user signature
    assert not _negotiate(server, user, server_host_key_algs=["ssh-rsa"])     # SHA-1 host signature
    assert not _negotiate(server, user, server_host_key_algs=["ecdsa-sha2-nistp256"])
    assert not _negotiate(server, user, kex_algs=["ecdh-sha2-nistp256"])
    assert not _negotiate(server, user, kex_algs=["diffie-hellman-group18-sha512"])  # costly on the loop
    server.stop()
    server.extra_args = ("--legacy-algorithms",)
    server.start()
    assert _negotiate(server, keyed, signature_algs=["ssh-rsa"])
    assert _negotiate(server, user, server_host_key_algs=["ssh-rsa"])
    assert _negotiate(server, user, server_host_key_algs=["ecdsa-sha2-nistp256"], kex_algs=["ecdh-sha2-nistp256"])


# -- 11 (part): channels per connection, sessions per user ---------------------------------------


def test_channels_per_connection_and_sessions_per_user_are_bounded(start):
    server = start("--max-channels-per-connection", "2", "--max-sessions-per-user", "3")
    user = server.add_user("alice")

    async def go() -> tuple[int, int]:
        async with server.connect(user) as c1, server.connect(user) as c2:
            opened: list[asyncssh.SFTPClient] = []
            per_conn = 0
            for _ in range(3):
                try:
                    opened.append(await c1.start_sftp_client())
                    per_conn += 1
                except asyncssh.ChannelOpenError:
                    pass
            per_user = per_conn
            for _ in range(2):
                try:
                    opened.append(await c2.start_sftp_client())
                    per_user += 1
                except asyncssh.ChannelOpenError:
                    pass
            for s in opened:
                s.exit()
            await asyncio.sleep(0.3)
            # closed channels give their slots back
            async with c2.start_sftp_client() as sftp:
                await sftp.stat(".")
            return per_conn, per_user

    per_conn, per_user = asyncio.run(asyncio.wait_for(go(), 30))
    assert per_conn == 2
    assert per_user == 3
    assert "reason=max-channels-per-connection" in server.log()
    assert "reason=max-sessions-per-user" in server.log()
