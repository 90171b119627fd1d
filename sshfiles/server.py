"""The SSH side: listener, host keys, algorithm policy, authentication, session dispatch, lifecycle.

No file logic lives here.  A connection authenticates against the accounts
store (argon2 off the event loop, keys from the store), and each channel then
gets a `UserSession` (session.py) holding the user's jail and ledger; the SFTP
subsystem, SCP and the hash exec commands are adapters over it.

Lifecycle: only a completed authentication binds an account to a connection
(`_ConnectionHandler.auth_completed`).  A watcher per process (`SshfilesService.watch`)
ends the connections of users that were removed, disabled or had their
credentials changed, and connections idle for too long; new channels re-check
the account synchronously.  SIGTERM/SIGINT drain the server (`SshfilesService.
shutdown`), and with ``--workers N`` a supervising parent replaces dead
workers (`run_server`).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh import SSHReader, SSHWriter

from . import audit, hashing, metrics, passwords
from .asyncssh_seam import (
    ChannelSessionBase,
    compiled_chacha_built,
    install_speedups_from_env,
    run_scp,
    serve_accepted,
)
from .atomic import cleanup_homes
from .config import SETTINGS, ConfigError, ServeConfig, parse_startups
from .defence import STRIKE_MEMORY, Admission, Defender, parse_cidrs, source_key
from .exec_commands import run_exec
from .folders import FolderMount
from .hooks import HookRunner
from .jail import openat2_available
from .logsafe import esc
from .malloc_tuning import DEFAULTS_ENV as MALLOC_DEFAULTS_ENV
from .malloc_tuning import keep_freed_memory
from .permissions import PermissionRules
from .proxy_protocol import ProxyListener
from .quota import QuotaManager, reconcile_dead_owners, rescan_user
from .sdnotify import notify
from .session import UserSession, set_handle_limits
from .sftp import JailedSFTPServer, SshfilesSFTPHandler
from .stores import (
    Account,
    AccountError,
    AccountStore,
    Ban,
    LiveSession,
    folder_ledger,
    folder_of_ledger,
    open_store,
    validate_username,
)
from .stores.worker import StoreWorker
from .units import format_size
from .worker_balance import ABSENT, Listener, LoadTable, WorkerLoad

__all__ = ["SshfilesService", "configure_logging", "ensure_host_keys", "run_server"]

log = logging.getLogger("sshfiles.server")

# Only Terrapin-safe, modern algorithms, and only ones that stay cheap for the
# server.  asyncssh implements strict key exchange (kex-strict-s-v00@openssh.com),
# which neutralises Terrapin for the chacha20 and EtM modes with every client that
# supports it (OpenSSH >= 9.6 and Debian's 9.2 backport, PuTTY >= 0.80 and
# Debian's 0.78 backport).  Not offered by default:
# - SHA-1 anywhere: no ssh-rsa host-key signatures, no ssh-rsa/ssh-dss user signatures;
# - the NIST curves for key exchange and the ECDSA host key (ssh-audit fails them);
# - finite-field DH: group16/18 cost the server a 4096/8192-bit modexp per handshake
#   (~15 ms of the only event loop for group18) while the client may do no work at all,
#   which is the DHEat attack; X25519 and ML-KEM cost well under a millisecond;
# Post-quantum hybrid key exchange comes first (OpenSSH 10 warns without one).
# Every one of those comes back with --legacy-algorithms, for old devices, appended
# after the modern choices so a modern client still negotiates these.
KEX_ALGS = ["mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org"]
LEGACY_KEX_ALGS = ["ecdh-sha2-nistp256", "ecdh-sha2-nistp384", "ecdh-sha2-nistp521",
                   "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
                   "diffie-hellman-group14-sha256", "diffie-hellman-group14-sha1"]
ENCRYPTION_ALGS = ["chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                   "aes128-ctr", "aes192-ctr", "aes256-ctr"]
# SHA-2 encrypt-and-MAC stays (after EtM): libssh2 < 1.11 (curl, Debian 12) has no EtM MAC and
# negotiates aes-ctr + hmac-sha2-256; with CTR and strict kex E&M is not Terrapin-affected, and
# ssh-audit only warns about it.
MAC_ALGS = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512"]
LEGACY_MAC_ALGS: list[str] = []
HOST_KEY_TYPES = [("ssh_host_ed25519_key", "ssh-ed25519", {}),
                  ("ssh_host_ecdsa_key", "ecdsa-sha2-nistp256", {}),
                  ("ssh_host_rsa_key", "ssh-rsa", {"key_size": 3072})]
# Host-key signature algorithms offered: the RSA key signs with SHA-2 only.
HOST_KEY_ALGS = ["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"]
LEGACY_HOST_KEY_ALGS = ["ecdsa-sha2-nistp256", "ssh-rsa"]
# User signatures accepted (also what the server-sig-algs extension advertises).  User
# ECDSA keys stay: the issue with NIST curves is the server's choice, and users' existing
# keys must keep working; what goes is SHA-1 (ssh-rsa, ssh-dss).
USER_SIG_ALGS = ["ssh-ed25519", "sk-ssh-ed25519@openssh.com", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                 "ecdsa-sha2-nistp521", "sk-ecdsa-sha2-nistp256@openssh.com", "rsa-sha2-512", "rsa-sha2-256"]
LEGACY_USER_SIG_ALGS = ["ssh-rsa", "ssh-dss"]


WATCH_INTERVAL = 1.0      # seconds between two looks at the live users' accounts
ADMIN_BAN_REASON = "admin"  # the reason `sshfiles ban add` stores (cli.py)
BAN_PRUNE_INTERVAL = 600.0  # seconds between two prunings of long-ended bans (defence.STRIKE_MEMORY)
CLEANUP_TIMEOUT = 5.0     # how long shutdown waits for cut connections to settle and log
WORKER_STOP_EXTRA = 10.0  # a worker gets grace + this to exit after SIGTERM before SIGKILL
RESPAWN_MAX_DELAY = 30.0  # backoff cap for a worker that keeps dying right after it starts
RESPAWN_STABLE = 10.0     # a worker that lived this long resets the backoff


def ensure_host_keys(keys_dir: Path) -> list[asyncssh.SSHKey]:
    """Load the host keys, generating any that are missing (mode 0600).

    Several servers may start at once on one keys directory (nodes on shared storage, a service and
    an admin command): a new key is written whole to a private temporary file and published with
    link(2), which fails if another process published first; the loser then uses the winner's key.
    So no process ever reads a half-written key, and all agree on one key per type.
    """
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    for filename, alg, kwargs in HOST_KEY_TYPES:
        path = keys_dir / filename
        if not path.exists():
            key = asyncssh.generate_private_key(alg, key_size=kwargs["key_size"]) if kwargs \
                else asyncssh.generate_private_key(alg)
            fd, tmp = tempfile.mkstemp(dir=keys_dir, prefix=f".{filename}.")  # mode 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(key.export_private_key())
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process published this key type first: use its key
            else:
                key.write_public_key(str(path) + ".pub")
                log.info("generated host key %s", path)
            finally:
                os.unlink(tmp)
        keys.append(asyncssh.read_private_key(path))
    return keys


def open_config_store(config: ServeConfig) -> AccountStore:
    """The store the configuration names (``--store``; default: SQLite in ``--accounts-dir``)."""
    return open_store(config.store, accounts_dir=config.accounts_dir, lease=config.node_lease)


class SshfilesService:
    """What all connections of one server process share: store, quotas, config, live connections."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.store = open_config_store(config)
        self.owner = self.store.register_owner()
        # Every store call once serving goes through the store threads (stores/worker.py): the
        # event loop never waits for a store that another process holds locked.
        self.store_worker = StoreWorker(lambda: open_config_store(config),
                                        getattr(self.store, "busy_timeout", 30.0))
        self.quotas = QuotaManager(self.store_worker, self.owner)
        self.connections: set[_ConnectionHandler] = set()  # every live connection, authenticated or not
        self.load: WorkerLoad | None = None  # a worker's slot in the table the workers balance by
        self.sessions: set[UserSession] = set()     # channels whose cleanup has not finished
        self.stopping = False                       # set by SIGTERM/SIGINT: no new channels
        # The watcher's own store connection, used only from its thread (one query at a time):
        # the loop's connection may be inside a write transaction at that moment.
        self._watch_store: AccountStore | None = None
        self._watch_lock = threading.Lock()  # close() must not close it under a running query
        self._pruned = -BAN_PRUNE_INTERVAL   # monotonic time of the last pruning of old bans (at once first)
        start, rate, full = parse_startups(config.max_startups)
        self.admission = Admission(start, rate, full, config.per_source_max_startups, config.per_source_rate,
                                   config.per_source_burst)
        # A balancer sending PROXY headers is never scored or banned: its clients are, by their own address
        # (its own connections, health checks with a LOCAL header, count as the balancer).
        self.defender = Defender(config.ban_threshold, config.ban_window, config.ban_time, config.ban_max,
                                 parse_cidrs(config.ban_exempt) + parse_cidrs(config.proxy_protocol_from))
        self.user_channels: dict[str, int] = {}      # user -> open session channels in this process
        self._refusals: dict[str, tuple[float, int]] = {}  # source -> (last logged, refused since)
        self._synced_sessions: list[LiveSession] = []  # what the store last got (sync_sessions)
        self._synced_at = 0.0                          # monotonic time it got them
        self._load_bans()  # before the first connection: a banned source is refused from the start
        # One pool per process (a worker builds its own after the fork): hooks run in its threads.
        self.hooks = HookRunner({"upload": config.on_upload, "download": config.on_download,
                                 "delete": config.on_delete, "rename": config.on_rename}, config.hook_timeout)

    def track(self, conn: _ConnectionHandler) -> None:
        """A connection began: counted, and the count shown to the other workers (worker_balance.py)."""
        self.connections.add(conn)
        if self.load is not None:
            self.load.holding(len(self.connections))

    def untrack(self, conn: _ConnectionHandler) -> None:
        self.connections.discard(conn)
        if self.load is not None:
            self.load.holding(len(self.connections))

    def _load_bans(self) -> None:
        try:
            self.defender.replace_bans((b.source, b.until, b.strikes) for b in self.store.bans())
        except AccountError as exc:
            log.error("accounts store error reading bans: %s", exc)

    # -- per-source defence --------------------------------------------------------------------

    def refused(self, source: str, peer: str, reason: str) -> None:
        """Log a refused connection; a flood logs one line per source per 10 s, with a count."""
        now = time.monotonic()
        last, count = self._refusals.get(source, (0.0, 0))
        if now - last >= 10.0:
            more = f" (and {count} more since the last report)" if count else ""
            log.info("connection refused source=%s reason=%s%s", peer, reason, more)
            self._refusals[source] = (now, 0)
            if len(self._refusals) > 4096:
                self._refusals = {s: v for s, v in self._refusals.items() if now - v[0] < 10.0}
        else:
            self._refusals[source] = (last, count + 1)

    def penalise(self, source: str, event: str) -> None:
        """Score an event against a source; a ban ends its unauthenticated connections at once."""
        ban = self.defender.record(source, event)
        if ban is None:
            return
        audit.event("banned", source=source, seconds=round(ban.until - time.time()), strikes=ban.strikes,
                    cause=event, level=logging.WARNING)
        for c in list(self.connections):
            if c.source == source and c.account is None and c.ended is None:
                c.end("source banned")

    def _sync_bans(self, new: list[Ban]) -> list[Ban]:
        """Runs in the watcher's thread: write this process's new bans, forget those that ended more
        than STRIKE_MEMORY ago (every BAN_PRUNE_INTERVAL), read everyone's."""
        with self._watch_lock:
            if self._watch_store is None:
                self._watch_store = open_config_store(self.config)
            with metrics.store_timer("bans"):
                for b in new:
                    self._watch_store.ban(b.source, b.until, b.reason, b.strikes)
                now = time.monotonic()
                if now - self._pruned >= BAN_PRUNE_INTERVAL:
                    self._pruned = now
                    gone = self._watch_store.prune_bans(time.time() - STRIKE_MEMORY)
                    if gone:
                        log.info("forgot %d bans that ended more than %d days ago", gone, STRIKE_MEMORY // 86400)
                return self._watch_store.bans()

    async def sync_bans(self) -> None:
        new = [Ban(b.source, b.until, b.reason, b.strikes) for b in self.defender.take_new_bans()]
        try:
            bans = await asyncio.to_thread(self._sync_bans, new)
        except AccountError as exc:
            log.error("accounts store error syncing bans: %s", exc)
            return
        self.defender.replace_bans((b.source, b.until, b.strikes) for b in bans)
        now = time.time()
        # An administrator's ban (`sshfiles ban add`) is a decision about the source: it also ends the
        # source's logged-in sessions, in every worker, at this tick. An automatic ban only ends
        # unauthenticated connections: a user who logged in from a source that later floods (a shared
        # NAT) keeps working.
        by_admin = {b.source for b in bans if b.reason == ADMIN_BAN_REASON and b.until > now}
        for c in list(self.connections):  # a ban added elsewhere (CLI, another worker)
            if c.ended is not None or not self.defender.banned(c.source, now):
                continue
            if c.account is None:
                c.end("source banned")
            elif c.source in by_admin and not self.defender.is_exempt(c.source):
                c.end("source banned by the administrator")

    # -- reload (SIGHUP) -------------------------------------------------------------------------

    def apply_config(self, new: ServeConfig) -> tuple[list[str], list[str]]:
        """Make `new` the running config, except what needs a restart; returns (changes, ignored).

        Limits are read from `self.config` where they are used (a new channel, the watcher's
        next round, the next password check), so they apply from now on; the admission and ban
        parameters are updated in place (their live counts and scores stay). Listener options
        (algorithms, login timeout, host keys) are the caller's: `acceptor.update`.
        """
        old = self.config
        changes, ignored = [], []
        for name in SETTINGS:
            before, after = getattr(old, name), getattr(new, name)
            if before != after:
                if name in RESTART_ONLY:
                    ignored.append(name)
                else:
                    changes.append(f"{name} {_shown(before)} -> {_shown(after)}")
        effective = dataclasses.replace(new, **{n: getattr(old, n) for n in RESTART_ONLY})
        self.config = effective
        adm = self.admission
        adm.start, adm.rate, adm.full = parse_startups(effective.max_startups)
        adm.per_source, adm.per_source_rate = effective.per_source_max_startups, effective.per_source_rate
        adm.burst = max(1, effective.per_source_burst)
        d = self.defender
        d.threshold, d.window = effective.ban_threshold, effective.ban_window
        d.ban_time, d.ban_max = effective.ban_time, effective.ban_max
        d.exempt = list(parse_cidrs(effective.ban_exempt))
        return changes, ignored

    def close(self) -> None:
        """After `quotas.drain` (which `_serve` awaits): stop the hooks, close the store threads and the store."""
        self.hooks.close(wait=2.0)  # hooks already queued get a moment; the rest are dropped
        self.store_worker.close()  # runs whatever is still queued first
        if self.quotas.in_sync():
            # A clean stop leaves no row behind (presence marks included): the next start must not
            # take this process for a crashed one and rescan its users.
            with contextlib.suppress(AccountError):
                self.store.drop_owner(self.owner)
        self.store.release_owner(self.owner)
        self.store.close()
        if self._watch_lock.acquire(timeout=5):
            try:
                if self._watch_store is not None:
                    self._watch_store.close()
                    self._watch_store = None
            finally:
                self._watch_lock.release()

    # -- live sessions (sshfiles status) -------------------------------------------------------

    def live_sessions(self) -> list[LiveSession]:
        """This process's logged-in connections as status rows (computed on the loop: no I/O)."""
        pid = os.getpid()
        return sorted((LiveSession(c.cid, self.owner, pid, c.username, c.peer, c.login_time, c.doing())
                       for c in self.connections if c.account is not None and c.ended is None),
                      key=lambda r: r.conn)

    def _write_sessions(self, rows: list[LiveSession]) -> None:
        """Runs in the watcher's thread, on its own store connection."""
        with self._watch_lock:
            if self._watch_store is None:
                self._watch_store = open_config_store(self.config)
            with metrics.store_timer("sessions"):
                self._watch_store.set_sessions(self.owner, rows)

    async def sync_sessions(self) -> None:
        """Write this process's rows when they changed (at most once per watcher round, off the loop),
        and unchanged ones again once per node lease: a PostgreSQL node taken for dead during an
        outage longer than its lease had its rows dropped by another node (drop_owner), and must
        show up in `sshfiles status` again once it is back."""
        rows = self.live_sessions()
        due = bool(rows) and time.monotonic() - self._synced_at >= self.config.node_lease
        if rows == self._synced_sessions and not due:
            return
        try:
            await asyncio.to_thread(self._write_sessions, rows)
        except AccountError as exc:
            log.error("accounts store error writing live sessions: %s", exc)
            return
        self._synced_sessions = rows
        self._synced_at = time.monotonic()

    # -- the session watcher -------------------------------------------------------------------

    def _auth_states(self, names: list[str]) -> dict[str, tuple[bool, int]]:
        """Runs in a thread: the event loop never waits on the store for the watcher."""
        with self._watch_lock:
            if self._watch_store is None:
                self._watch_store = open_config_store(self.config)
            with metrics.store_timer("watch"):
                return self._watch_store.auth_states(names)

    async def watch(self) -> None:
        """Every WATCH_INTERVAL: end stale and idle connections, share bans; every third of the node
        lease: reclaim dead owners' reservations (until cancelled)."""
        last_reclaim = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self.check_connections()
            except Exception:  # the watcher must outlive any one bad round
                log.exception("session watcher round failed")
            try:
                await self.sync_bans()
            except Exception:
                log.exception("ban sync round failed")
            try:
                await self.refresh_permissions()
            except Exception:
                log.exception("permission refresh round failed")
            try:
                await self.sync_sessions()
            except Exception:
                log.exception("live session sync round failed")

            if time.monotonic() - last_reclaim >= self.config.node_lease / 3:
                last_reclaim = time.monotonic()
                try:
                    repaired = await asyncio.to_thread(self._reclaim_dead_owners)
                except AccountError as exc:
                    log.error("accounts store error reclaiming dead owners: %s", getattr(exc, "detail", exc))
                except Exception:
                    log.exception("dead owner reclaim round failed")
                else:
                    if repaired:
                        log.info("reservations of a dead server reclaimed; usage rescanned: %s",
                                 ", ".join(esc(n) for n in repaired))

    def _reclaim_dead_owners(self) -> list[str]:
        """Runs in the watcher's thread: another process or node that died (its flock gone, its lease
        run out) leaves reservations that only a live one can give back (quota.reconcile_dead_owners;
        each dead owner's users are handed to exactly one reclaimer, which rescans them)."""
        with self._watch_lock:
            if self._watch_store is None:
                self._watch_store = open_config_store(self.config)
            with metrics.store_timer("watch"):
                return reconcile_dead_owners(self._watch_store)

    def _permission_updates(self, held: dict[str, set[int]]) -> dict[str, PermissionRules]:
        """Runs in the watcher's thread: fresh rules for each user whose store revision is not the one
        (every one) of its sessions holds. The revision is read before the rules, so a change racing
        with this read is seen again at the next round."""
        with self._watch_lock:
            if self._watch_store is None:
                self._watch_store = open_config_store(self.config)
            store = self._watch_store
            updates: dict[str, PermissionRules] = {}
            for name, rev in store.permission_revs(sorted(held)).items():
                if held[name] != {rev}:
                    try:
                        updates[name] = PermissionRules(rev, store.permissions(name))
                    except AccountError:
                        continue  # removed meanwhile: the account check ends its sessions
            return updates

    async def refresh_permissions(self) -> None:
        """Give live sessions their user's new permission rules (a change applies within a round)."""
        by_user: dict[str, list[UserSession]] = {}
        for s in self.sessions:
            by_user.setdefault(s.username, []).append(s)
        if not by_user:
            return
        held = {name: {s.perms.rev for s in sessions} for name, sessions in by_user.items()}
        try:
            updates = await asyncio.to_thread(self._permission_updates, held)
        except AccountError as exc:
            log.error("accounts store error reading permissions: %s", exc)
            return
        for name, rules in updates.items():
            for s in by_user[name]:
                if s.perms.rev != rules.rev:
                    s.set_permissions(rules)
                    log.info("permissions reloaded user=%s conn=%s", esc(name), s.conn_id)

    async def check_connections(self) -> None:
        """End the connections whose account vanished, is disabled, changed credentials, or idled out."""
        live = [c for c in self.connections if c.account is not None and c.ended is None]
        if not live:
            return
        states: dict[str, tuple[bool, int]] | None
        try:
            states = await asyncio.to_thread(self._auth_states, sorted({c.username for c in live}))
        except AccountError as exc:  # a locked or broken store: keep sessions, still enforce idling
            log.error("accounts store error in the session watcher: %s", exc)
            states = None
        now = time.monotonic()
        for c in live:
            reason = None
            if states is not None:
                reason = c.stale_reason(states.get(c.username))
            if reason is None and c.idle_for(now) > self.config.idle_timeout > 0:
                reason = "idle timeout"
            if reason is not None:
                c.end(reason)

    # -- shutdown ------------------------------------------------------------------------------

    async def shutdown(self, force: asyncio.Event) -> None:
        """Drain: idle connections go at once, transfers get `grace` seconds, then everything is cut.

        Every wait here is bounded, so a stop takes the same time on Python 3.11
        (where `asyncio.run` would cut every connection unlogged) and 3.12+
        (where the listener's `wait_closed` would wait for idle sessions forever).
        """
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.grace
        log.info("stopping: %d connections open; transfers in progress may finish for %g s",
                 len(self.connections), self.config.grace)
        while True:
            for c in list(self.connections):
                if c.ended is None and c.busy() == 0:
                    c.end("server stopping")
            if not self.connections or force.is_set() or loop.time() >= deadline:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(force.wait(), min(0.1, max(0.0, deadline - loop.time())))
        for c in list(self.connections):
            c.end("server stopping", cut=True)
        end = loop.time() + CLEANUP_TIMEOUT
        while (self.connections or self.sessions) and loop.time() < end:
            await asyncio.sleep(0.05)
        if self.connections or self.sessions:
            log.warning("stopping with %d connections and %d sessions not cleaned up",
                        len(self.connections), len(self.sessions))


class _ChannelSession(ChannelSessionBase):
    """A session channel: SFTP subsystem, SCP, the hash commands, and a polite no to shells."""

    def __init__(self, conn: _ConnectionHandler) -> None:
        super().__init__()
        self._auth = conn
        self._counted = True  # session_requested counted this channel (per connection and per user)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._auth.channel_closed()
        super().connection_lost(exc)

    def data_received(self, data: Any, datatype: Any) -> None:
        self._auth.touch()  # every SFTP request arrives here too: this is the idle clock
        super().data_received(data, datatype)

    @staticmethod
    def _refuse(chan: Any) -> None:
        """End a channel whose account no longer holds (or could not be read) before it served anything."""
        with contextlib.suppress(OSError):
            chan.exit(1)

    def shell_requested(self) -> bool:
        return True  # answered with a clear message, below

    def exec_requested(self, command: str) -> bool:
        return True  # every command gets an answer; only the allowed ones run

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        chan, stdin, stdout, stderr = self.streams()
        command = chan.get_command()
        if chan.get_subsystem() == "sftp":
            self.start_task(self._run_sftp(chan, stdin, stdout), stdin.logger)
        elif command and command.startswith("scp "):
            self.start_task(self._run_scp(chan, command, stdin, stdout, stderr), stdin.logger)
        else:
            self.start_task(self._run_exec(chan, command, stdin, stdout, stderr), stdin.logger)

    async def _run_sftp(self, chan: Any, stdin: SSHReader[bytes], stdout: SSHWriter[bytes]) -> None:
        session = await self._auth.new_session()
        if session is None:
            self._refuse(chan)
            return
        handler: SshfilesSFTPHandler | None = None
        try:
            server = JailedSFTPServer(chan, session)
            handler = SshfilesSFTPHandler(server, stdin, stdout, 3)  # SFTP v3, as OpenSSH speaks
            self._auth.handlers.add(handler)
            await handler.run()
        finally:
            if handler is not None:
                self._auth.handlers.discard(handler)
            session.close()
            # OpenSSH's scp (SFTP mode) and `ssh -s sftp` want an exit status; asyncssh sends none.
            try:
                chan.exit(0)
            except OSError:
                pass

    async def _run_scp(self, chan: Any, command: str, stdin: SSHReader[bytes], stdout: SSHWriter[bytes],
                       stderr: SSHWriter[bytes]) -> None:
        session = await self._auth.new_session()
        if session is None:
            self._refuse(chan)
            return
        self._auth.running += 1
        audit.event("exec", self._auth, command=command)
        try:
            handler = run_scp(JailedSFTPServer(chan, session, input_ended=stdin.at_eof), command, stdin, stdout,
                              stderr)
            if handler is not None:
                await handler
        finally:
            self._auth.running -= 1
            session.close()

    async def _run_exec(self, chan: Any, command: str | None, stdin: SSHReader[bytes],
                        stdout: SSHWriter[bytes], stderr: SSHWriter[bytes]) -> None:
        status = 1
        self._auth.running += 1
        try:
            if not command:
                stderr.write(b"This server offers SFTP only: connect with sftp, scp or sshfiles-cli.\r\n")
            else:
                audit.event("exec", self._auth, command=command)
                session = await self._auth.new_session()
                if session is None:
                    stderr.write(b"sshfiles: the account could not be checked; try again later\n")
                else:
                    try:
                        status = await run_exec(command, session, stdout, stderr, stdin)
                    finally:
                        session.close()
        except Exception as exc:  # never leave the client hanging without a status
            log.warning("exec failed for %s: %s conn=%s", esc(self._auth.username), esc(exc), self._auth.cid)
            stderr.write(b"sshfiles: command failed\n")
        finally:
            self._auth.running -= 1
            self._auth.touch()  # a long hash is activity: the idle clock starts after it
            try:
                chan.exit(status)
            except OSError:
                pass


class _ConnectionHandler(asyncssh.SSHServer):
    """asyncssh's callbacks for one client connection (`conn`): authentication and lifecycle.

    Every log line about the connection ends with ``conn=ID`` (`cid`), so one
    connection's login, commands, transfers and end can be followed in the log.

    An account is bound only by a completed authentication (`auth_completed`),
    for the user name asyncssh authenticated: a public-key *query* (no
    signature) for another user's key proves nothing and binds nothing.
    """

    def __init__(self, service: SshfilesService, source: tuple[str, int] | None = None) -> None:
        self.service = service
        self.conn: asyncssh.SSHServerConnection | None = None
        self._proxied = source  # the client's address from a balancer's PROXY header (proxy_protocol.py)
        self.cid = secrets.token_hex(4)
        self.username = ""
        self.peer = "?"
        self.source = "?"            # defence.source_key of the peer: what per-source rules count
        self.admitted = False        # counted by the service's Admission until it authenticates or ends
        self.attempts = 0            # password checks started (pipelined ones included)
        self.channels = 0            # open session channels
        self.account: Account | None = None
        self.perm_rules = PermissionRules()  # the account's permission rules as read at the last channel open
        self.mounts: list[FolderMount] = []  # the shared folders mounted for the user, as read at the last channel open
        self.own_uploads: dict[str, tuple[int, int]] = {}  # files this login created: see UserSession._own
        self.auth_rev = 0            # the account's auth_rev at login; any change ends the connection
        self.failures = 0
        # What each user name was validated with during authentication (the last
        # positive answer per name); only the name that completes is ever bound.
        self._validated: dict[str, tuple[Account, str]] = {}
        self.handlers: set[SshfilesSFTPHandler] = set()
        self.sessions: set[UserSession] = set()  # open sessions of this connection's channels
        self.running = 0             # exec and scp channels in progress
        self.last_activity = time.monotonic()
        self.login_time = 0.0          # epoch seconds of the completed authentication
        self.ended: str | None = None  # why the server ended this connection, once it did

    # -- lifecycle -----------------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """Admission, before the version exchange and any cryptography (asyncssh calls this first).

        A banned source, or one over its share of unauthenticated connections or its
        connection rate, or any source while the unauthenticated total is past MaxStartups'
        start (randomly) or full, is dropped here: the refusal costs a few dict operations,
        no key exchange and no store access (bans are cached, refreshed by the watcher).
        """
        self.conn = conn
        peer = self._proxied or conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.source = source_key(str(peer[0]))
        self.service.track(self)
        log.debug("connection from %s conn=%s", self.peer, self.cid)
        if self.service.stopping:  # accepted just before the listener closed
            self.end("server stopping")
            return
        service = self.service
        exempt = service.defender.is_exempt(self.source)
        reason = None
        if not exempt and service.defender.banned(self.source):
            reason = "banned"
        else:
            reason = service.admission.admit(self.source, per_source=not exempt)
        if reason is not None:
            service.refused(self.source, self.peer, reason)
            if reason in ("per-source startups", "connection rate"):  # this source's own excess
                service.penalise(self.source, "refused")  # (a full server is not the refused one's fault)
            self.ended = reason
            conn.abort()
            return
        self.admitted = True

    def _leave_admission(self) -> None:
        if self.admitted:
            self.admitted = False
            self.service.admission.release(self.source)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_admission()
        if self.account is None and self.ended is None and exc is not None:
            # Pre-auth endings that score: the login grace running out, and protocol errors
            # (a failed key exchange, garbage instead of packets).  A client that just hangs up
            # before authenticating (ssh-keyscan, a cancelled prompt) scores nothing.
            if isinstance(exc, asyncssh.ConnectionLost) and "Login timeout" in str(exc):
                log.info("login timeout source=%s conn=%s", self.peer, self.cid)
                self.service.penalise(self.source, "preauth-timeout")
            elif not isinstance(exc, asyncssh.ConnectionLost) and not (
                    isinstance(exc, asyncssh.DisconnectError) and exc.code in _POLITE_DISCONNECTS):
                # asyncssh reports malformed input as DisconnectError (ProtocolError, MACError,
                # KeyExchangeFailed...) or as the decoding exception itself (PacketDecodeError).
                log.info("protocol error source=%s error=%s conn=%s", self.peer, esc(exc), self.cid)
                self.service.penalise(self.source, "protocol-error")
        # SCP sessions still open lost their client (or were cut) mid-file: the file the SCP
        # server closes now is logged as interrupted.  asyncssh calls this after closing the
        # channels but before their tasks run.  SFTP sessions decide in the handler's _cleanup,
        # once requests the client sent before it left (a CLOSE) have been served.
        sftp = {h.server.session for h in self.handlers if isinstance(h.server, JailedSFTPServer)}
        for session in self.sessions - sftp:
            session.interrupted = True
        self.service.untrack(self)
        if self.account is not None:
            metrics.session_ended()
            audit.event("logout", self)

    @property
    def conn_id(self) -> str:
        """The connection id as `audit.Actor` names it (the log's ``conn=``)."""
        return self.cid

    def doing(self) -> str:
        """What `sshfiles status` says the connection is doing: its open transfers, raw (escaped on display)."""
        parts = []
        for session in self.sessions:
            for f in session.open_files:
                done = f.bytes_written if f.writable else f.bytes_read
                parts.append(f"{'upload' if f.writable else 'download'} {_status_path(session.shown_path(f))} "
                             f"{format_size(done)}")
        if not parts and self.running:
            parts.append("command")
        parts.sort()
        return ", ".join(parts[:4]) + (f" (+{len(parts) - 4} more)" if len(parts) > 4 else "")

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def idle_for(self, now: float) -> float:
        """Seconds without channel data; a running exec or scp command is never idle."""
        return 0.0 if self.running else now - self.last_activity

    def busy(self) -> int:
        """Transfers in progress: open SFTP file handles plus running exec/scp commands."""
        return self.running + sum(h.open_file_count for h in self.handlers)

    def stale_reason(self, state: tuple[bool, int] | None) -> str | None:
        """Why this login no longer holds, given the account's (disabled, auth_rev) or None if gone."""
        if state is None:
            return "account removed"
        disabled, rev = state
        if disabled:
            return "account disabled"
        if rev != self.auth_rev:
            return "credentials changed"
        return None

    def end(self, reason: str, cut: bool = False) -> None:
        """Close the connection now; its open transfers are logged interrupted (`_cleanup`)."""
        if self.ended is not None and not cut:
            return
        first = self.ended is None
        self.ended = reason
        if first and self.account is not None:
            audit.event("session ended", self, reason=reason)
        if self.conn is not None:
            for handler in self.handlers:
                server = handler.server
                if handler.open_file_count and isinstance(server, JailedSFTPServer):
                    server.session.interrupted = True
            with contextlib.suppress(Exception):
                self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"sshfiles: {reason}")

    # -- authentication ------------------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def _lookup(self, username: str) -> Account | None:
        """The account, or None for any reason a login must fail (same answer, same cost).

        Read in the store's read thread: a store locked by another process delays (or fails)
        this login only, never the event loop and everyone else's sessions."""
        try:
            validate_username(username)
        except AccountError:
            return None
        try:
            with metrics.store_timer("login"):
                acct = await self.service.store_worker.read(lambda store: store.get_user(username))
        except AccountError as exc:  # a corrupt or locked store: refuse, keep serving
            log.error("accounts store error: %s", exc)
            return None
        if acct is None:
            Path(self.service.config.homes_dir).is_dir()  # the same stat a known user costs
            return None
        if acct.disabled:
            return None
        if acct is not None and not Path(acct.home).is_dir():
            log.error("home of %s is missing; refusing login", username)
            return None
        return acct

    def _result(self, username: str, method: str, acct: Account | None, ok: bool, result: str = "failed",
                query: bool = False) -> bool:
        if ok and acct is not None:
            self._validated[username] = (acct, method)
            if method == "password":  # a right password completes the authentication
                audit.event("login", self, user=username, method=method, result="ok")
            return True
        self.failures += 1
        audit.event("login", self, user=username, method=method, result=result)
        if not query:
            # A key the client merely offers (a query: OpenSSH tries each key in its agent) is not a
            # guess; a wrong password, a refused or an abandoned check is.
            self.service.penalise(self.source, "auth-failed")
        if self.failures >= self.service.config.max_auth_tries and self.conn is not None and self.ended is None:
            log.info("too many authentication failures from %s; disconnecting conn=%s", self.peer, self.cid)
            self.ended = "too many authentication failures"
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                 "Too many authentication failures")
        return False

    async def validate_password(self, username: str, password: str) -> bool:
        """One password check; each one counts, including those a pipelining client abandons.

        asyncssh cancels the check in progress when the client sends its next request
        before the answer: that check is logged (result=abandoned) and counted as a failure
        here, so pipelining can neither dodge --max-auth-tries nor the log.  Checks beyond
        this source's share of the argon2 queue are not run and fail at once (result=busy).
        """
        self.attempts += 1
        if self.ended is not None or self.attempts > self.service.config.max_auth_tries:
            return self._result(username, "password", None, False, "refused")
        try:  # cancelled while its account is read or while in argon2: either way an abandoned check
            acct = await self._lookup(username)
            stored = acct.password_hash if acct else None
            verdict = await passwords.verify_password_fair(stored, password, self.source)
        except asyncio.CancelledError:
            self._result(username, "password", None, False, "abandoned")
            raise
        if verdict is passwords.BUSY:
            return self._result(username, "password", None, False, "busy")
        ok = bool(verdict)
        if ok and acct is not None and stored and passwords.needs_rehash(stored):
            try:
                # Not set_password_hash: the same password must not end this user's sessions.
                new_hash = await passwords.hash_password_async(password)
                if await self.service.store_worker.call(
                        lambda store: store.rehash_password(username, stored, new_hash), request=False):
                    log.info("rehashed password of %s with current argon2 parameters", username)
            except AccountError as exc:
                log.warning("could not rehash password of %s: %s", username, exc)
        return self._result(username, "password", acct, ok)

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh asks this for a query without signature (answered PK_OK) and again for
        # the signed request: a True here binds nothing (see auth_completed).
        #
        # Same work for every user name: the offered key's blob is compared with the stored
        # keys' blobs (base64-decoded, no key parsing), and an unknown or disabled user is
        # compared against one dummy blob, so the answer's timing does not tell whether a
        # user exists (it used to parse every stored key only for existing users).
        acct = await self._lookup(username)
        offered = key.public_data
        blobs = [_key_blob(k.key) for k in acct.keys] if acct is not None else [_DUMMY_BLOB]
        ok = False
        for blob in blobs:
            ok |= secrets.compare_digest(blob, offered)
        ok = ok and acct is not None
        if ok and not self.service.config.legacy_algorithms:
            # No SHA-1 user signatures: asyncssh verifies the signed request with this same key
            # object (SSHKey.verify checks the signature's algorithm against all_sig_algorithms),
            # so narrowing that set on the instance refuses ssh-rsa (SHA-1) signatures.
            allowed = {alg.encode() for alg in USER_SIG_ALGS}
            key.all_sig_algorithms = {alg for alg in key.all_sig_algorithms if alg in allowed}
            if not key.all_sig_algorithms:  # ssh-dss: SHA-1 only
                ok = False
        return self._result(username, "publickey", acct, ok, query=True)

    def auth_completed(self) -> None:
        """Bind the account of the user name asyncssh authenticated, and nothing else."""
        assert self.conn is not None
        username = self.conn.get_extra_info("username") or ""
        validated = self._validated.get(username)
        self._validated.clear()
        if validated is None or validated[0].name != username:
            log.error("authentication completed for %s without a validated account; disconnecting",
                      esc(username))
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, "authentication error")
            return
        acct, method = validated
        self._leave_admission()  # authenticated: no longer counts against MaxStartups
        self.username = username
        self.account = acct
        self.auth_rev = acct.auth_rev
        self.touch()
        self.login_time = time.time()
        metrics.session_started()
        if method == "publickey":
            audit.event("login", self, method="publickey", result="ok")

    # -- channels ------------------------------------------------------------------------------

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[Any], _ChannelSession] | bool:
        """A new channel: refused while stopping, and only for an account that still holds.

        asyncssh wants the answer synchronously, so the account is re-read by the channel itself
        (`recheck`, awaited before its session starts): no request of a channel is served
        between a change and the watcher's tick.
        """
        if self.service.stopping or self.ended is not None or self.account is None:
            return False
        limits = self.service.config
        if self.channels >= limits.max_channels_per_connection:
            audit.event("channel refused", self, reason="max-channels-per-connection",
                        limit=limits.max_channels_per_connection)
            return False
        if self.service.user_channels.get(self.username, 0) >= limits.max_sessions_per_user:
            audit.event("channel refused", self, reason="max-sessions-per-user", limit=limits.max_sessions_per_user)
            return False
        self.touch()
        self.channels += 1
        self.service.user_channels[self.username] = self.service.user_channels.get(self.username, 0) + 1
        assert self.conn is not None  # set by connection_made, before any channel
        window, max_pktsize = channel_sizes(str(self.conn.get_extra_info("client_version") or ""))
        return self.conn.create_server_channel(window=window, max_pktsize=max_pktsize), _ChannelSession(self)

    def channel_closed(self) -> None:
        self.channels -= 1
        n = self.service.user_channels.get(self.username, 0) - 1
        if n > 0:
            self.service.user_channels[self.username] = n
        else:
            self.service.user_channels.pop(self.username, None)

    async def recheck(self) -> Account | None:
        """Re-read the account and its permission rules for a new channel (in the store's read
        thread); None: refuse it. Without its rules no channel may start: a store error refuses,
        never defaults to '*'."""
        username = self.username

        def read(store: AccountStore) -> tuple[Account | None, dict[str, frozenset[str]], list[FolderMount]]:
            acct = store.get_user(username)
            if acct is None:
                return None, {}, []
            # Read after the account, so rules newer than acct.perm_rev are only ever reloaded again.
            rules = store.permissions(username)
            mounts = []
            for m in store.mounts(username):
                folder = store.get_folder(m.folder)
                if folder is not None:
                    mounts.append(FolderMount(m.vpath, m.folder, folder.path, folder_ledger(m.folder), m.perms))
            return acct, rules, mounts

        try:
            with metrics.store_timer("channel"):
                acct, rules, self.mounts = await self.service.store_worker.read(read)
        except AccountError as exc:
            log.error("accounts store error: %s", exc)
            return None
        reason = self.stale_reason(None if acct is None else (acct.disabled, acct.auth_rev))
        if reason is not None:
            self.end(reason)
            return None
        assert acct is not None
        self.perm_rules = PermissionRules(acct.perm_rev, rules)
        return acct

    async def new_session(self) -> UserSession | None:
        """A channel's session, on the account as re-read now (None: the login no longer holds)."""
        acct = await self.recheck()
        if acct is None or self.ended is not None:
            return None
        assert acct.name == self.username
        self.account = acct  # a home, quota or permission change applies to each new channel
        session = UserSession(acct.name, acct.home, self.service.quotas.ledger(acct.name), self.peer,
                              on_close=self._session_closed, conn_id=self.cid, permissions=self.perm_rules,
                              own_uploads=self.own_uploads,
                              upload_mode=acct.upload_mode or self.service.config.upload_mode,
                              hooks=self.service.hooks, mounts=self.mounts, ledger_of=self.service.quotas.ledger)
        self.service.sessions.add(session)
        self.sessions.add(session)
        return session

    def _session_closed(self, session: UserSession) -> None:
        self.service.sessions.discard(session)
        self.sessions.discard(session)


# A client that hangs up saying so (a user cancelling a prompt, a client out of methods) is not an error.
_POLITE_DISCONNECTS = {asyncssh.DISC_BY_APPLICATION, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                       asyncssh.DISC_AUTH_CANCELLED_BY_USER, asyncssh.DISC_CONNECTION_LOST}

_DUMMY_BLOB = asyncssh.generate_private_key("ssh-ed25519").public_data


def _key_blob(line: str) -> bytes:
    """The key blob of one OpenSSH public key line ("type base64 [comment]"), b"" if unreadable."""
    try:
        return binascii.a2b_base64(line.split()[1])
    except (IndexError, binascii.Error):
        return b""


def _offered_host_keys(config: ServeConfig, host_keys: list[asyncssh.SSHKey]) -> list[asyncssh.SSHKeyPair]:
    """The host keys with the signature algorithms the policy allows (no SHA-1 ssh-rsa, no ECDSA).

    asyncssh derives the host-key algorithms it offers from each key pair's
    ``host_key_algorithms`` (an RSA key: rsa-sha2-*, ssh-rsa and ssh.com's SHA-2 names); there
    is no listen option for it, so the public key-pair objects are narrowed here.
    """
    allowed = HOST_KEY_ALGS + (LEGACY_HOST_KEY_ALGS if config.legacy_algorithms else [])
    pairs = []
    for pair in asyncssh.load_keypairs(host_keys):
        algs = [a for a in allowed if a.encode() in pair.host_key_algorithms]
        if algs:
            pair.host_key_algorithms = [a.encode() for a in algs]
            pairs.append(pair)
    return pairs


MAX_PACKET = 256 * 1024  # the largest SSH channel packet most clients may send (OpenSSH's limit)
WINDOW = 2 * 1024 * 1024  # the channel window most clients get: what OpenSSH's sshd gives them
PIPELINING_WINDOW = 8 * 1024 * 1024  # the window of clients that fill it efficiently (channel_sizes)
#: The largest channel packet pipelining clients may send: a whole 256 KiB WRITE with its SFTP header.
PIPELINING_MAX_PACKET = MAX_PACKET + 1024
#: Client software (the start of its version string's software part) that gets the PIPELINING_ sizes.
PIPELINING_CLIENTS = ("AsyncSSH_",)


def channel_sizes(client_version: str) -> tuple[int, int]:
    """The receive window and largest packet a session channel offers this client (its SSH
    version string).

    Why not one big window for everyone: OpenSSH's ssh client keeps whatever the window allows in
    its own output buffer while the socket is full, growing that buffer 32 KiB at a time (each
    growth a fresh allocation, a copy and a zeroing of the old one). Offered 8 MiB, 32 concurrent
    stock `sftp` uploads spent 5.3 CPU-s per GiB in the clients (1.8 with 2 MiB) and ran at half
    the speed; one upload was slower too (README, performance). With OpenSSH's own 2 MiB its
    buffers stay small. asyncssh-based clients (sshfiles-cli) pipeline 256 KiB writes and do use
    the room: 8 MiB moved 511 MB/s against 359 with 2 MiB.

    The packet: with OpenSSH's 256 KiB a 256 KiB WRITE (13 bytes of SFTP header more) travelled as
    two SSH packets, a full one and a 13-byte one, each decrypted, parsed and handed on by the
    per-packet Python code of both ends; PIPELINING_MAX_PACKET carries it in one. Stock clients
    keep MAX_PACKET (their writes are 32 KiB anyway).

    A speed choice, not a limit: any client may call itself AsyncSSH and get 8 MiB, which is what
    every client got before; what one session can make the server hold stays bounded by the seam's
    item 4a (REPLY_BUFFER_LIMIT plus one reply plus this window).
    """
    software = client_version.split("-", 2)[2] if client_version.count("-") >= 2 else ""
    if software.startswith(PIPELINING_CLIENTS):
        return PIPELINING_WINDOW, PIPELINING_MAX_PACKET
    return WINDOW, MAX_PACKET


def _server_options(config: ServeConfig, host_keys: list[asyncssh.SSHKey]) -> dict[str, Any]:
    legacy = config.legacy_algorithms
    return dict(
        server_host_keys=_offered_host_keys(config, host_keys),
        kex_algs=KEX_ALGS + (LEGACY_KEX_ALGS if legacy else []),
        encryption_algs=ENCRYPTION_ALGS,
        mac_algs=MAC_ALGS + (LEGACY_MAC_ALGS if legacy else []),
        signature_algs=USER_SIG_ALGS + (LEGACY_USER_SIG_ALGS if legacy else []),
        compression_algs=["none"],
        # The defaults; each session channel gets its window and packet size from channel_sizes
        # (by the client's software): asyncssh-based clients then send a 256 KiB SFTP write as one
        # SSH packet; OpenSSH's client stays at 32 KiB.
        window=WINDOW,
        max_pktsize=MAX_PACKET,
        line_editor=False,
        login_timeout=config.login_timeout,
        server_version="sshfiles",
        allow_scp=True,
    )


def _apply_limits(config: ServeConfig) -> None:
    """The per-session resource limits of the serve settings, into the modules that enforce them."""
    set_handle_limits(config.max_handles_per_session, config.max_handles_per_user)
    hashing.configure(config.hash_workers, config.hash_per_user_active, config.hash_per_user_waiting,
                      config.max_hash_bytes)
    SshfilesSFTPHandler.reply_buffer_limit = config.reply_buffer_limit


class _SocketAcceptor:
    """The listener when asyncssh's own (``asyncssh.listen``) will not do: balancers send PROXY
    headers (``--proxy-protocol-from``), or the socket is shared by workers that balance their
    load (worker_balance.py).

    proxy_protocol.ProxyListener (PROXY headers) or worker_balance.Listener accepts from the raw
    socket; each connection then runs as one ``asyncssh.listen`` accepted would (the seam's
    ``serve_accepted``: the options shared, the handler its own), with a handler that sees the
    client's real address, so admission, bans and logs use it.
    """

    def __init__(self, options: asyncssh.SSHServerConnectionOptions, service: SshfilesService,
                 sock: socket.socket, load: WorkerLoad | None) -> None:
        self._options = options
        self._service = service
        self._load = load
        self._listener: ProxyListener | Listener
        if service.config.proxy_protocol_from:
            self._listener = ProxyListener(sock, service.config.proxy_protocol_from, self._run, self._refused, load)
        else:
            self._listener = Listener(sock, self._run, load)

    async def _run(self, sock: socket.socket, source: Any) -> None:
        proxied = (str(source[0]), int(source[1])) if self._service.config.proxy_protocol_from else None

        def handler() -> _ConnectionHandler:
            if self._load is not None:  # from now on the service counts it
                self._load.handed(sock)
            return _ConnectionHandler(self._service, proxied)

        try:
            await serve_accepted(sock, self._options, handler)
        except OSError:  # the peer was gone before the connection could be set up
            sock.close()

    def _refused(self, peer: tuple[str, int], reason: str) -> None:
        self._service.refused(source_key(peer[0]), f"{peer[0]}:{peer[1]}", reason)

    def update(self, **kwargs: Any) -> None:
        """New connection options (SIGHUP: host keys, algorithms) for connections accepted from now
        on, as ``SSHAcceptor.update`` does; live ones keep theirs."""
        self._options = asyncssh.SSHServerConnectionOptions(options=self._options, **kwargs)

    def close(self) -> None:
        self._listener.close()

    async def wait_closed(self) -> None:
        await self._listener.wait_closed()


async def start_server(config: ServeConfig, service: SshfilesService | None = None,
                       sock: socket.socket | None = None,
                       load: WorkerLoad | None = None) -> tuple[asyncssh.SSHAcceptor | _SocketAcceptor,
                                                                SshfilesService]:
    """Start listening (on `sock` if given; `load`: the socket is shared by workers that balance
    their connections, worker_balance.py)."""
    if not openat2_available():
        raise RuntimeError("this kernel lacks openat2 (Linux >= 5.6), which the jail requires")
    install_speedups_from_env(os.environ.get("SSHFILES_NO_SPEEDUPS"))  # a benchmark lever
    keep_freed_memory(os.environ.get(MALLOC_DEFAULTS_ENV))  # packet buffers reused, not refaulted
    if not compiled_chacha_built():
        log.warning("chacha20-poly1305 (what OpenSSH clients use) runs on the slower Python path: the "
                    "compiled helper sshfiles._chachapoly was not built (pip needs a C compiler for it)")
    _apply_limits(config)
    service = service or SshfilesService(config)
    host_keys = ensure_host_keys(config.keys_dir)
    opts = _server_options(config, host_keys)
    if config.proxy_protocol_from or load is not None:
        service.load = load
        if load is not None:  # --max-startups for the server as a whole, not per worker
            service.admission.share(load.startups_elsewhere, load.publish_startups)
        return _SocketAcceptor(await asyncssh.SSHServerConnectionOptions.construct(**opts), service,
                               sock if sock is not None else _listening_socket(config), load), service
    if sock is not None:
        acceptor = await asyncssh.listen(sock=sock, server_factory=lambda: _ConnectionHandler(service), **opts)
    else:
        acceptor = await asyncssh.listen(config.host, config.port, server_factory=lambda: _ConnectionHandler(service),
                                         reuse_address=True, **opts)
    return acceptor, service


def configure_logging(config: ServeConfig | None = None) -> None:
    """Our log is the product's log (stderr or --log-file, text or JSON: audit.configure);
    asyncssh's per-packet chatter stays at warnings."""
    audit.configure(config.log_format if config else "text", config.log_file if config else "")


def _listening_socket(config: ServeConfig) -> socket.socket:
    """The listening socket on config.host and config.port, bound in the parent before any worker
    exists (a privileged port is bound once). With ``--workers N`` every worker accepts from it
    (worker_balance.py says how they share the connections): it outlives any worker, so what waits
    in its backlog when a worker dies is taken by the others, not lost."""
    infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


HEALTH_STORE_TIMEOUT = 1.0  # /healthz: a store that cannot begin a write within this long is unhealthy


class _Health:
    """``/healthz``: healthy while the listener accepts, `alive` has no complaint (workers running,
    not stopping) and the store can take a write. Runs in the metrics HTTP threads, on its own store
    connection (never the event loop's), one probe at a time."""

    def __init__(self, config: ServeConfig, sock: socket.socket, alive: Callable[[], str | None]) -> None:
        self._sock = sock
        self._alive = alive
        self._store = open_store(config.store, accounts_dir=config.accounts_dir, busy_timeout=HEALTH_STORE_TIMEOUT)
        self._lock = threading.Lock()

    def __call__(self) -> str | None:
        try:
            if not self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return "not listening"
        except OSError:
            return "not listening"
        problem = self._alive()
        if problem is not None:
            return problem
        with self._lock:
            try:
                self._store.check()
            except AccountError as exc:
                return str(exc)
        return None


def _start_metrics(config: ServeConfig, sock: socket.socket, alive: Callable[[], str | None]) -> None:
    """Serve /metrics and /healthz (metrics.serve) and say where (port 0 picks a free one)."""
    listen = metrics.parse_listen(config.metrics_listen)
    assert listen is not None
    try:
        _, port = metrics.serve(listen[0], listen[1], _Health(config, sock, alive))
    except OSError as exc:  # one line (the CLI's RuntimeError path), not the SSH port's message
        raise RuntimeError(f"cannot listen for metrics on {config.metrics_listen}: {exc.strerror or exc}") from None
    log.info("metrics listening on %s port %d (/metrics, /healthz)", listen[0], port)


#: Settings a SIGHUP cannot change (the listening socket, the process count, where the state lives):
#: a changed value is reported and ignored until the next start.
RESTART_ONLY = ("host", "port", "workers", "accounts_dir", "homes_dir", "metrics_listen")

#: Re-reads the settings the way `serve` read them at start (flags, environment, the TOML file again).
Reloader = Callable[[], ServeConfig]


def _shown(value: object) -> str:
    return esc(str(value)) if value != "" else '""'


def _reopen_log() -> str:
    """Reopen the log file (logrotate moved it away); a few words for the SIGHUP line ("" on stderr)."""
    try:
        return "log file reopened" if audit.reopen() else ""
    except OSError as exc:
        return f"cannot reopen the log file: {exc.strerror or exc}"


def _read_reload(reload: Reloader) -> tuple[ServeConfig, list[asyncssh.SSHKey]]:
    """In a thread: the new settings and the host keys they name (file reads, maybe key generation)."""
    config = reload()
    return config, ensure_host_keys(config.keys_dir)


async def _reload(service: SshfilesService, acceptor: asyncssh.SSHAcceptor | _SocketAcceptor,
                  reload: Reloader | None,
                  host_keys: list[asyncssh.SSHKey]) -> list[asyncssh.SSHKey]:
    """SIGHUP in a serving process: reload settings and host keys without touching live sessions.

    Everything read from disk is read in a thread; a bad new config (or unreadable host keys) keeps
    the running one. Logs one line saying what changed. Returns the host keys now offered.
    """
    reopened = _reopen_log()
    if reload is None:
        log.info("SIGHUP: %s", reopened or "nothing to reload")
        return host_keys
    try:
        new, new_keys = await asyncio.to_thread(_read_reload, reload)
    except (ConfigError, OSError, ValueError, asyncssh.KeyImportError) as exc:
        log.error("SIGHUP: config not reloaded, keeping the running one: %s", " ".join(str(exc).split()))
        return host_keys
    changes, ignored = service.apply_config(new)
    old_fps = sorted(k.get_fingerprint("sha256") for k in host_keys)
    new_fps = sorted(k.get_fingerprint("sha256") for k in new_keys)
    if old_fps != new_fps:
        changes.append("host keys " + ", ".join(k.get_fingerprint("sha256") for k in new_keys))
    config = service.config
    acceptor.update(**_server_options(config, new_keys))  # new connections only; live ones keep theirs
    try:
        audit.configure(config.log_format, config.log_file)
    except OSError as exc:
        changes.append(f"log settings not applied ({exc.strerror or exc})")
    parts = [("reloaded: " + "; ".join(changes)) if changes else "config unchanged"]
    if reopened:
        parts.append(reopened)
    if ignored:
        parts.append("needs a restart, not applied: " + ", ".join(ignored))
    log.info("SIGHUP: %s", "; ".join(parts))
    return new_keys


async def _serve(config: ServeConfig, sock: socket.socket, worker: WorkerLoad | None = None,
                 reload: Reloader | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain (`SshfilesService.shutdown`); a second signal cuts.

    A worker drains on SIGTERM and cuts on FORCE_SIGNAL, which only its parent
    sends (for the admin's second signal): a SIGTERM sent to the whole process
    group (systemd's default) reaches a worker twice, from the sender and
    forwarded by the parent, and must not count as a second signal.
    """
    acceptor, service = await start_server(config, sock=sock, load=worker)
    if config.metrics_listen:
        metrics.enable()
        if worker is None:
            try:
                _start_metrics(config, sock, lambda: "stopping" if service.stopping else None)
            except RuntimeError:
                acceptor.close()
                service.close()
                raise
    lag = asyncio.create_task(metrics.watch_loop_lag())
    stop = asyncio.Event()
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def _on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not stop.is_set():
            log.info("%s: stopping", name)
            if worker is None:
                notify("STOPPING=1", f"STATUS=stopping: transfers may finish for {config.grace:g} s")
            stop.set()
            if signum != FORCE_SIGNAL:
                return
        if not force.is_set() and (signum == FORCE_SIGNAL or not worker):
            log.info("%s: stopping now, cutting transfers", name)
            force.set()

    for sig in ((signal.SIGTERM, FORCE_SIGNAL) if worker is not None else (signal.SIGINT, signal.SIGTERM)):
        loop.add_signal_handler(sig, _on_signal, sig)
    host_keys = ensure_host_keys(config.keys_dir)
    reloading: list[asyncio.Task[None]] = []

    async def _do_reload() -> None:
        nonlocal host_keys
        try:
            host_keys = await _reload(service, acceptor, reload, host_keys)
        except Exception:
            log.exception("SIGHUP: reload failed; the running config stays")

    def _on_hangup() -> None:
        reloading[:] = [t for t in reloading if not t.done()]
        if not reloading:  # one reload at a time; a SIGHUP during one is covered by it
            reloading.append(asyncio.create_task(_do_reload()))

    loop.add_signal_handler(signal.SIGHUP, _on_hangup)
    if _early_hangups:
        _early_hangups.clear()
        _on_hangup()
    if worker is None:
        notify("READY=1", f"STATUS=listening on {config.host} port {sock.getsockname()[1]}",
               f"MAINPID={os.getpid()}")
    watcher = asyncio.create_task(service.watch())
    reclaims = asyncio.create_task(service.quotas.serve_reclaims())
    try:
        await stop.wait()
    finally:
        acceptor.close()
        try:
            await service.shutdown(force)
        finally:
            watcher.cancel()
            reclaims.cancel()
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(acceptor.wait_closed(), 2)  # 3.12+ waits for connections: bounded
            with contextlib.suppress(Exception):  # settle what is open; close() copes with what is not
                await asyncio.wait_for(service.quotas.drain(), CLEANUP_TIMEOUT)
            service.close()


def _event_loop_policy() -> None:
    try:
        import uvloop  # optional extra: pip install 'sshfiles[fast]'
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


_early_hangups: list[int] = []  # SIGHUPs a new worker got before it could reload (see _run_worker)
_PR_SET_PDEATHSIG = 1
FORCE_SIGNAL = signal.SIGUSR1  # parent -> worker: the admin signalled twice, stop now
# Blocked across fork (see _spawn); SIGHUP too, or a new worker could run the parent's forwarding handler.
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _die_with_parent(parent: int) -> None:
    """In a new worker: get SIGTERM when the parent dies, and exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot ask to die with the parent: %s", exc)
    if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
        os._exit(0)


def _run_worker(config: ServeConfig, sock: socket.socket, parent: int, load: WorkerLoad,
                reload: Reloader | None = None) -> None:
    """The body of a forked worker, accepting from `sock` (shared by all workers) and publishing
    its connections in `load`, its slot of the workers' table; never returns.  A crash logs its
    traceback and exits 1."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which forwards SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)  # the supervisor's pipe (asyncio sets its own)
        for fd in _supervisor_wake_fds:
            os.close(fd)
        # A SIGHUP before _serve installs its handler (a worker just started) is kept, not lost.
        signal.signal(signal.SIGHUP, lambda _signum, _frame: _early_hangups.append(1))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        _die_with_parent(parent)
        metrics.close_inherited_server()
        asyncio.run(_serve(config, sock, worker=load, reload=reload))
        code = 0
    except BaseException:
        log.exception("worker %d crashed", os.getpid())
    finally:
        logging.shutdown()
        os._exit(code)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {name}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


def _reconcile(config: ServeConfig) -> list[str]:
    """Drop dead processes' reservations and rescan their users (quota.reconcile_dead_owners)."""
    store = open_config_store(config)
    try:
        return reconcile_dead_owners(store)
    finally:
        store.close()


#: The supervisor's signal wake-up pipe (read end, write end): a forked worker closes both.
_supervisor_wake_fds: list[int] = []


def _reap(wake: int, timeout: float | None) -> tuple[int, int]:
    """The next ended child as (pid, status), or (0, 0) once a signal has come or `timeout` passed.

    Not a blocking `os.wait()`: a stop signal that lands after the interpreter's last check for
    signals and before the wait begins has its handler run only when the wait returns, that is when
    some worker happens to end (seen: a SIGTERM right after READY=1 ignored until the next one,
    2 runs in 30). The signal's byte in the wake-up pipe makes the select return at once instead.
    Raises ChildProcessError when there is no child and nothing to wait for (`timeout` None); with
    a timeout (a replacement is due), it waits for that or a signal.
    """
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        if timeout is None:
            raise
        pid, status = 0, 0
    if pid:
        return pid, status
    select.select([wake], [], [], timeout)
    with contextlib.suppress(BlockingIOError):
        os.read(wake, 4096)
    return 0, 0


def _supervise(config: ServeConfig, sock: socket.socket, reload: Reloader | None = None) -> None:
    """The parent of `--workers N`: fork, reap, log, reconcile, replace; forward stop signals.

    Every worker accepts from `sock`; worker i publishes its load in slot i of a table shared with
    the others (worker_balance.py), which the parent marks absent when the worker dies; a
    replacement takes the dead worker's slot.

    It blocks in os.wait for any child and replaces a dead worker after a backoff
    that grows while workers die young, so one that crashes at start does not spin.
    On SIGTERM/SIGINT it forwards SIGTERM (FORCE_SIGNAL for a second signal, which
    makes the workers stop at once); a timer SIGKILLs workers still alive grace +
    WORKER_STOP_EXTRA seconds after the first signal, so the wait is bounded.
    """
    parent = os.getpid()
    # Everything imported so far is inherited by every worker through copy-on-write pages; the
    # cyclic GC of a worker would write to each of those objects' headers on its passes and so
    # copy every page into the worker. Frozen objects are left out of the GC's passes (they are
    # module-level and live as long as the process anyway), so they stay shared.
    gc.collect()
    gc.freeze()
    children: dict[int, tuple[float, int]] = {}  # pid -> (start time (monotonic), slot)
    table = LoadTable(config.workers)
    startups = LoadTable(config.workers)
    signals: list[int] = []
    respawn_at: list[tuple[float, int]] = []     # (due time, slot) of replacements not yet forked
    delay = 0.0

    def _spawn(slot: int) -> None:
        # Stop signals stay blocked across fork: the child must not run the parent's handlers
        # (they would signal its siblings) before it has installed its own.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _run_worker(config, sock, parent, WorkerLoad(table, slot, startups), reload)
            children[pid] = (time.monotonic(), slot)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _on_signal(signum: int, _frame: object) -> None:
        if not signals:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(children))
            notify("STOPPING=1", f"STATUS=stopping {len(children)} workers")
            signal.setitimer(signal.ITIMER_REAL, config.grace + WORKER_STOP_EXTRA)
            # New connections are refused from now on instead of waiting in the backlog for the whole
            # grace (every worker holds a copy of the socket: closing ours would not stop it listening).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        signals.append(signum)
        for child in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM if len(signals) == 1 else FORCE_SIGNAL)

    def _on_deadline(_signum: int, _frame: object) -> None:
        for child in list(children):
            log.warning("worker %d did not stop in time; killing it", child)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)

    def _on_hangup_parent(_signum: int, _frame: object) -> None:
        """Reopen (and re-set) its own log, then forward: each worker reloads and logs for itself."""
        reopened = _reopen_log()
        try:
            new = reload() if reload is not None else None
            if new is not None:
                audit.configure(new.log_format, new.log_file)
            log.info("SIGHUP: %sforwarding to %d workers", f"{reopened}; " if reopened else "", len(children))
        except (ConfigError, OSError) as exc:
            log.error("SIGHUP: config not reloaded, keeping the running one: %s", " ".join(str(exc).split()))
        for child in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGHUP)

    # Every signal with a handler also writes a byte to this pipe (SIGCHLD gets a handler for that
    # alone), so _reap's select wakes for it even when it came just before the select began.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _supervisor_wake_fds[:] = [wake_r, wake_w]
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    signal.signal(signal.SIGALRM, _on_deadline)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if config.metrics_listen:
        _start_metrics(config, sock, lambda: None if children else "no worker running")
    for slot in range(config.workers):
        _spawn(slot)
    # Only now: a SIGHUP while the workers were being forked went to run_server's handler (kept in
    # _early_hangups) instead of being forwarded to the workers forked so far only, which left the
    # later ones on the old config (a test caught it: "forwarding to 1 workers" of 2).
    signal.signal(signal.SIGHUP, _on_hangup_parent)
    if _early_hangups:  # a SIGHUP between the announcement and here (run_server) is answered now that
        _early_hangups.clear()  # the workers exist: each reloads (and logs) once it can (_run_worker)
        _on_hangup_parent(signal.SIGHUP, None)
    notify("READY=1", f"STATUS=listening on {config.host} port {sock.getsockname()[1]} with {config.workers} "
           "workers", f"MAINPID={parent}")
    while True:
        if signals:
            respawn_at.clear()
        if not children and not respawn_at:
            break
        now = time.monotonic()
        while respawn_at and respawn_at[0][0] <= now:
            _spawn(respawn_at.pop(0)[1])
        try:
            # until a child ends, a signal comes, or a replacement is due
            pid, status = _reap(wake_r, max(0.0, respawn_at[0][0] - now) if respawn_at else None)
        except ChildProcessError:
            break
        if pid == 0:
            continue
        child = children.pop(pid, None)
        if child is None:
            continue
        started, slot = child
        table.set(slot, ABSENT)  # the other workers stop leaving new connections to it
        startups.set(slot, ABSENT)  # its unauthenticated connections ended with it
        metrics.mark_dead(pid)
        how = _describe_status(status)
        if signals:
            log.info("worker %d %s", pid, how)
        else:
            log.error("worker %d %s; replacing it", pid, how)
        try:
            repaired = _reconcile(config)
        except AccountError as exc:
            log.error("could not reconcile the quota ledger after worker %d: %s", pid, exc)
        else:
            if repaired:
                log.info("quota usage rescanned after worker %d ended: %s", pid, ", ".join(repaired))
        if not signals:
            lived = time.monotonic() - started
            delay = 0.0 if lived >= RESPAWN_STABLE else min(RESPAWN_MAX_DELAY, max(1.0, delay * 2))
            respawn_at.append((time.monotonic() + delay, slot))
            respawn_at.sort()
    signal.setitimer(signal.ITIMER_REAL, 0)


def _status_path(path: str) -> str:
    """A path as `sshfiles status` lists it among ", "-separated transfers: quoted when it holds a space,
    a comma, a quote or a backslash, so a file name cannot pass for another transfer."""
    if not any(c in path for c in ' ,"\\'):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _clean_upload_temporaries(store: AccountStore, config: ServeConfig) -> None:
    """Before anything listens: remove what atomic uploads of a previous run left (atomic.py), keep
    atomic-resume partials younger than atomic.PARTIAL_MAX_AGE, and rescan the users concerned."""
    users = [(a.name, a.home, a.upload_mode or config.upload_mode) for a in store.list_users()]
    for name in cleanup_homes(u for u in users if u[2] != "standard"):
        before, after = rescan_user(store, name)
        log.info("removed upload temporaries of %s left by an earlier run: usage %d -> %d bytes",
                 esc(name), before, after)
    # Shared folders hold the uploads of every user mounting them, in whatever mode each uses: random
    # temporaries go, partials younger than PARTIAL_MAX_AGE stay (an atomic-resume user may continue one).
    folders = [(folder_ledger(f.name), f.path, "atomic-resume") for f in store.list_folders()]
    for key in cleanup_homes(folders):
        before, after = rescan_user(store, key)
        log.info("removed upload temporaries in folder %s left by an earlier run: usage %d -> %d bytes",
                 esc(folder_of_ledger(key) or key), before, after)


def run_server(config: ServeConfig, announce: Callable[[str], None] = print, reload: Reloader | None = None) -> None:
    """Run `sshfiles serve` until SIGINT/SIGTERM, in `config.workers` processes; SIGHUP calls `reload`
    for the new settings (see `_reload`)."""
    configure_logging(config)
    os.umask(0o022)
    if not openat2_available():
        raise RuntimeError("this kernel lacks openat2 (Linux >= 5.6), which the jail requires")
    if os.geteuid() == 0:
        log.warning("running as root: better run sshfiles as a dedicated unprivileged service user "
                    "that owns only the keys, accounts and homes directories")
    store = open_config_store(config)
    repaired = reconcile_dead_owners(store)
    if repaired:
        announce(f"quota usage rescanned after an unclean stop: {', '.join(repaired)}")
    _clean_upload_temporaries(store, config)
    store.close()
    offered = {p.public_data for p in _offered_host_keys(config, ensure_host_keys(config.keys_dir))}
    for key in ensure_host_keys(config.keys_dir):
        note = "" if key.public_data in offered else " (not offered; see --legacy-algorithms)"
        announce(f"host key {key.get_algorithm()} {key.get_fingerprint('sha256')}{note}")
    # Anyone may send SIGHUP once the port is announced: kept until the serving code can answer it
    # (_serve, _supervise), instead of its default action, which would end the server.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: _early_hangups.append(1))
    sock = _listening_socket(config)
    port = sock.getsockname()[1]
    _event_loop_policy()
    if config.workers == 1:
        announce(f"sshfiles listening on {config.host} port {port}")
        asyncio.run(_serve(config, sock, reload=reload))
        announce("sshfiles stopped")
        return
    announce(f"sshfiles listening on {config.host} port {port} with {config.workers} workers")
    multiproc_dir = None
    if config.metrics_listen:
        # Before the first fork and before prometheus_client is imported (metrics.py's docstring).
        multiproc_dir = tempfile.mkdtemp(prefix="sshfiles-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    try:
        _supervise(config, sock, reload)
    finally:
        if multiproc_dir is not None:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
        sock.close()
    announce("sshfiles stopped")
