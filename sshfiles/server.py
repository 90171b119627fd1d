"""The SSH side: listener, host keys, algorithm policy, authentication, session dispatch.

No file logic lives here.  A connection authenticates against the accounts
store (argon2 off the event loop, keys from the store), and each channel then
gets a `UserSession` (session.py) holding the user's jail and ledger; the SFTP
subsystem, SCP and the hash exec commands are adapters over it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import asyncssh
from asyncssh.scp import run_scp_server
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

from . import passwords, speedups
from .exec_commands import run_exec
from .stores import Account, AccountError, open_store, validate_username
from .jail import openat2_available
from .quota import QuotaManager, reconcile_dead_owners
from .session import UserSession
from .sftp import JailedSFTPServer, SshfilesSFTPHandler

__all__ = ["ServerConfig", "SshfilesService", "ensure_host_keys", "run_server"]

log = logging.getLogger("sshfiles.server")

# Only Terrapin-safe, modern algorithms.  asyncssh implements strict key
# exchange (kex-strict-s-v00@openssh.com), which neutralises Terrapin for the
# chacha20 and EtM modes with every client that supports it (OpenSSH >= 9.6
# and Debian's 9.2 backport, PuTTY >= 0.80 and Debian's 0.78 backport); no CBC,
# no SHA-1, no small DH groups are offered at all.
KEX_ALGS = ["curve25519-sha256", "curve25519-sha256@libssh.org", "ecdh-sha2-nistp256",
            "ecdh-sha2-nistp384", "ecdh-sha2-nistp521", "diffie-hellman-group16-sha512",
            "diffie-hellman-group18-sha512", "diffie-hellman-group14-sha256"]
ENCRYPTION_ALGS = ["chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                   "aes128-ctr", "aes192-ctr", "aes256-ctr"]
MAC_ALGS = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
            "hmac-sha2-256", "hmac-sha2-512"]
HOST_KEY_TYPES = [("ssh_host_ed25519_key", "ssh-ed25519", {}),
                  ("ssh_host_ecdsa_key", "ecdsa-sha2-nistp256", {}),
                  ("ssh_host_rsa_key", "ssh-rsa", {"key_size": 3072})]


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 2222
    keys_dir: Path = Path("keys")
    accounts_dir: Path = Path("accounts")
    homes_dir: Path = Path("homes")
    login_timeout: float = 60.0
    max_auth_tries: int = 6
    workers: int = 1


def ensure_host_keys(keys_dir: Path) -> list[asyncssh.SSHKey]:
    """Load the host keys, generating any that are missing (mode 0600)."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    for filename, alg, kwargs in HOST_KEY_TYPES:
        path = keys_dir / filename
        if not path.exists():
            key = asyncssh.generate_private_key(alg, **kwargs)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.export_private_key())
            key.write_public_key(str(path) + ".pub")
            log.info("generated host key %s", path)
        keys.append(asyncssh.read_private_key(path))
    return keys


def fingerprint(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")


class SshfilesService:
    """What all connections of one server process share: store, quotas, config."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store = open_store(accounts_dir=config.accounts_dir)
        self.owner = self.store.register_owner()
        self.quotas = QuotaManager(self.store, self.owner)

    def close(self) -> None:
        self.quotas.settle_all()
        self.store.release_owner(self.owner)
        self.store.close()


class _ChannelSession(SSHServerStreamSession):
    """A session channel: SFTP subsystem, SCP, the hash commands, and a polite no to shells."""

    def __init__(self, conn: "_Connection") -> None:
        super().__init__(None, sftp_factory=None, allow_scp=False)
        self._auth = conn

    def shell_requested(self) -> bool:
        return True  # answered with a clear message, below

    def exec_requested(self, command: str) -> bool:
        return True  # every command gets an answer; only the allowed ones run

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        chan = self._chan
        assert chan is not None and self._conn is not None
        command = chan.get_command()
        stdin = SSHReader[bytes](self, chan)
        stdout = SSHWriter[bytes](self, chan)
        stderr = SSHWriter[bytes](self, chan, asyncssh.EXTENDED_DATA_STDERR)
        chan.set_encoding(None)
        self._encoding = None
        if chan.get_subsystem() == "sftp":
            self._conn.create_task(self._run_sftp(chan, stdin, stdout), stdin.logger)
        elif command and command.startswith("scp "):
            self._conn.create_task(self._run_scp(chan, command, stdin, stdout, stderr), stdin.logger)
        else:
            self._conn.create_task(self._run_exec(chan, command, stdin, stdout, stderr), stdin.logger)

    async def _run_sftp(self, chan: Any, stdin: SSHReader[bytes], stdout: SSHWriter[bytes]) -> None:
        session = self._auth.new_session()
        try:
            server = JailedSFTPServer(chan, session)
            await SshfilesSFTPHandler(server, stdin, stdout, 3).run()  # SFTP v3, as OpenSSH speaks
        finally:
            session.close()
            # OpenSSH's scp (SFTP mode) and `ssh -s sftp` want an exit status; asyncssh sends none.
            try:
                chan.exit(0)
            except OSError:
                pass

    async def _run_scp(self, chan: Any, command: str, stdin: SSHReader[bytes], stdout: SSHWriter[bytes],
                       stderr: SSHWriter[bytes]) -> None:
        session = self._auth.new_session()
        try:
            handler = run_scp_server(JailedSFTPServer(chan, session), command, stdin, stdout, stderr)
            if handler is not None:
                await handler
        finally:
            session.close()

    async def _run_exec(self, chan: Any, command: str | None, stdin: SSHReader[bytes],
                        stdout: SSHWriter[bytes], stderr: SSHWriter[bytes]) -> None:
        status = 1
        try:
            if not command:
                stderr.write(b"This server offers SFTP only: connect with sftp, scp or sshfiles-cli.\r\n")
            else:
                session = self._auth.new_session()
                try:
                    status = await run_exec(command, session, stdout, stderr, stdin)
                finally:
                    session.close()
        except Exception as exc:  # never leave the client hanging without a status
            log.warning("exec failed for %s: %s", self._auth.username, exc)
            stderr.write(b"sshfiles: command failed\n")
        finally:
            try:
                chan.exit(status)
            except OSError:
                pass


class _Connection(asyncssh.SSHServer):
    """Authentication for one SSH connection."""

    def __init__(self, service: SshfilesService) -> None:
        self.service = service
        self.conn: asyncssh.SSHServerConnection | None = None
        self.username = ""
        self.peer = "?"
        self.account: Account | None = None
        self.failures = 0
        self.method = ""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        log.debug("connection from %s", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.account is not None:
            log.info("logout user=%s source=%s", self.username, self.peer)

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def _lookup(self, username: str) -> Account | None:
        """The account, or None for any reason a login must fail (same answer, same cost)."""
        try:
            validate_username(username)
        except AccountError:
            return None
        try:
            acct = self.service.store.get_user(username)
        except AccountError as exc:  # a corrupt or locked store: refuse, keep serving
            log.error("accounts store error: %s", exc)
            return None
        if acct is not None and not Path(acct.home).is_dir():
            log.error("home of %s is missing; refusing login", username)
            return None
        return acct

    def _result(self, username: str, method: str, acct: Account | None, ok: bool) -> bool:
        if ok and acct is not None:
            self.account = acct
            self.method = method
            log.info("login user=%s source=%s method=%s result=ok", username, self.peer, method)
            return True
        self.failures += 1
        log.info("login user=%s source=%s method=%s result=failed", username, self.peer, method)
        if self.failures >= self.service.config.max_auth_tries and self.conn is not None:
            log.info("too many authentication failures from %s; disconnecting", self.peer)
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                 "Too many authentication failures")
        return False

    async def validate_password(self, username: str, password: str) -> bool:
        acct = self._lookup(username)
        stored = acct.password_hash if acct else None
        ok = await passwords.verify_password_async(stored, password)
        if ok and acct is not None and stored and passwords.needs_rehash(stored):
            try:
                self.service.store.set_password_hash(username, await passwords.hash_password_async(password))
                log.info("rehashed password of %s with current argon2 parameters", username)
            except AccountError as exc:
                log.warning("could not rehash password of %s: %s", username, exc)
        return self._result(username, "password", acct, ok)

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        acct = self._lookup(username)
        ok = False
        if acct is not None:
            offered = key.public_data
            for stored in acct.keys:
                try:
                    if asyncssh.import_public_key(stored.key).public_data == offered:
                        ok = True
                        break
                except (asyncssh.KeyImportError, ValueError):
                    continue
        if not ok:
            return self._result(username, "publickey", acct, False)
        # asyncssh asks once without and once with a signature; log the login once.
        if self.account is None:
            self.account = acct
            self.method = "publickey"
        return True

    def auth_completed(self) -> None:
        if self.method == "publickey":
            log.info("login user=%s source=%s method=publickey result=ok", self.username, self.peer)

    def session_requested(self) -> _ChannelSession:
        return _ChannelSession(self)

    def new_session(self) -> UserSession:
        # Re-read the account: a key, home or quota change applies to each new channel.
        acct = self.service.store.get_user(self.username) or self.account
        assert acct is not None
        return UserSession(acct.name, acct.home, self.service.quotas.ledger(acct.name), self.peer)


def _server_options(config: ServerConfig, host_keys: list[asyncssh.SSHKey]) -> dict[str, Any]:
    return dict(
        server_host_keys=host_keys,
        kex_algs=KEX_ALGS, encryption_algs=ENCRYPTION_ALGS, mac_algs=MAC_ALGS,
        compression_algs=["none"],
        # Clients that accept big channel packets (asyncssh, sshfiles-cli) then send a 256 KiB
        # SFTP write as one SSH packet instead of eight; OpenSSH's client stays at 32 KiB.
        window=8 * 1024 * 1024,
        max_pktsize=256 * 1024,
        line_editor=False,
        login_timeout=config.login_timeout,
        server_version="sshfiles",
        allow_scp=True,
    )


async def start_server(config: ServerConfig, service: SshfilesService | None = None,
                       sock: socket.socket | None = None) -> tuple[asyncssh.SSHAcceptor, SshfilesService]:
    """Start listening (on `sock` if given, e.g. a socket shared by workers)."""
    if not openat2_available():
        raise RuntimeError("this kernel lacks openat2 (Linux >= 5.6), which the jail requires")
    if not os.environ.get("SSHFILES_NO_SPEEDUPS"):  # a benchmark lever: measure what they buy
        speedups.install()
    service = service or SshfilesService(config)
    host_keys = ensure_host_keys(config.keys_dir)
    opts = _server_options(config, host_keys)
    if sock is not None:
        acceptor = await asyncssh.listen(sock=sock, server_factory=lambda: _Connection(service), **opts)
    else:
        acceptor = await asyncssh.listen(config.host, config.port, server_factory=lambda: _Connection(service),
                                         reuse_address=True, **opts)
    return acceptor, service


def configure_logging() -> None:
    """Our log is the product's log; asyncssh's per-packet chatter stays at warnings."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def _listening_socket(config: ServerConfig) -> socket.socket:
    """One socket for all workers: the kernel spreads accepted connections between them."""
    infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(addr)
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def _serve(config: ServerConfig, sock: socket.socket) -> None:
    acceptor, service = await start_server(config, sock=sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        acceptor.close()
        await acceptor.wait_closed()
        service.close()


def _event_loop_policy() -> None:
    try:
        import uvloop  # optional extra: pip install 'sshfiles[fast]'
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_server(config: ServerConfig, announce: Callable[[str], None] = print) -> None:
    """Run `sshfiles serve` until SIGINT/SIGTERM, in `config.workers` processes."""
    configure_logging()
    os.umask(0o022)
    if not openat2_available():
        raise RuntimeError("this kernel lacks openat2 (Linux >= 5.6), which the jail requires")
    store = open_store(accounts_dir=config.accounts_dir)
    repaired = reconcile_dead_owners(store)
    if repaired:
        announce(f"quota usage rescanned after an unclean stop: {', '.join(repaired)}")
    store.close()
    for key in ensure_host_keys(config.keys_dir):
        announce(f"host key {key.get_algorithm()} {fingerprint(key)}")
    sock = _listening_socket(config)
    port = sock.getsockname()[1]
    _event_loop_policy()
    if config.workers == 1:
        announce(f"sshfiles listening on {config.host} port {port}")
        asyncio.run(_serve(config, sock))
        announce("sshfiles stopped")
        return
    children: list[int] = []
    for _ in range(config.workers):
        pid = os.fork()
        if pid == 0:  # worker: its own event loop, store connection and owner lock
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                asyncio.run(_serve(config, sock))
            finally:
                os._exit(0)
        children.append(pid)
    announce(f"sshfiles listening on {config.host} port {port} with {config.workers} workers")
    sock.close()

    def _forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, _forward)
    signal.signal(signal.SIGTERM, _forward)
    for child in children:
        while True:
            try:
                os.waitpid(child, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
    announce("sshfiles stopped")
