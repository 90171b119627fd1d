"""Connecting: authentication and the known-hosts check (trust on first use, as OpenSSH does).

Why a file of our own (``~/.config/sshfiles/known_hosts`` by default) instead of ~/.ssh/known_hosts:
the client records keys without asking, on first use, and must never silently edit the user's
OpenSSH file. The format is OpenSSH's, so the file can be inspected or pre-seeded with
``ssh-keyscan``-style lines (``[host]:port keytype base64``).

Policy: a host with no entry is trusted on first use and its SHA256 fingerprint is printed; a host
with an entry must present exactly that key, otherwise the connection is refused with a "host key
changed" error (exit 4) and nothing is sent, just as OpenSSH refuses. To keep a legitimate key change
from looking like an attack, the negotiation is limited to the algorithms already recorded for the
host, so a server that also offers another key type is not mistaken for a changed one.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from .errors import EXIT_CONNECT, ClientError, HostKeyChanged

DEFAULT_KNOWN_HOSTS = Path("~/.config/sshfiles/known_hosts")
PASSWORD_ENV = "SSHFILES_PASSWORD"
#: The largest SSH channel packet this client accepts: a 256 KiB READ reply with its SFTP header.
MAX_PACKET = 256 * 1024 + 1024


def host_pattern(host: str, port: int) -> str:
    """The known_hosts name OpenSSH uses: bare host on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")


class KnownHosts:
    """Our known-hosts file: lookup, and append on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()

    def lookup(self, pattern: str) -> list[asyncssh.SSHKey]:
        """Keys recorded for this exact host pattern (no wildcards or hashed names: we write them)."""
        keys: list[asyncssh.SSHKey] = []
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return keys
        for line in lines:
            parts = line.strip().split()
            if len(parts) < 3 or parts[0].startswith("#"):
                continue
            if pattern in parts[0].split(","):
                try:
                    keys.append(asyncssh.import_public_key(f"{parts[1]} {parts[2]}"))
                except (asyncssh.KeyImportError, ValueError):
                    continue
        return keys

    def add(self, pattern: str, key: asyncssh.SSHKey) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = f"{pattern} {key.export_public_key('openssh').decode().strip()}\n"
        with open(self.path, "a", encoding="ascii") as f:
            f.write(line)


def _host_key_algs(keys: list[asyncssh.SSHKey]) -> list[str]:
    algs: list[str] = []
    for key in keys:
        alg = key.get_algorithm()
        if alg == "ssh-rsa":
            algs += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
        else:
            algs.append(alg)
    return list(dict.fromkeys(algs))


#: Host key algorithms asked for on first contact, in OpenSSH's client order (ed25519 first).
_PREFERRED_HOST_KEY_ALGS = ["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                            "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]


@dataclass
class ConnectOptions:
    """Everything needed to open a session; filled from the CLI's global options."""

    host: str = "127.0.0.1"
    port: int = 22
    user: str | None = None
    identities: list[str] = field(default_factory=list)
    password: str | None = None
    known_hosts: Path = DEFAULT_KNOWN_HOSTS
    connect_timeout: float = 20.0
    #: Called with a line to show the user (fingerprint on first use); stderr by default.
    notify: Callable[[str], None] = lambda line: print(line, file=sys.stderr)


class _Client(asyncssh.SSHClient):
    """Host-key policy and lazy password prompting."""

    def __init__(self, opts: ConnectOptions, known: KnownHosts, pattern: str,
                 recorded: list[asyncssh.SSHKey]) -> None:
        self._opts = opts
        self._known = known
        self._pattern = pattern
        self._recorded = recorded
        self.mismatch: asyncssh.SSHKey | None = None
        self._password_tries = 0
        self.prompted = False

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        if self._recorded:
            if any(key == k for k in self._recorded):
                return True
            self.mismatch = key
            return False
        self._known.add(self._pattern, key)
        self._opts.notify(f"sshfiles-cli: new host {self._pattern}: {key.get_algorithm()} key "
                          f"{fingerprint(key)} trusted on first use, recorded in {self._known.path}")
        return True

    def password_auth_requested(self) -> str | Awaitable[str | None] | None:
        self._password_tries += 1
        if self._opts.password is not None:
            return self._opts.password if self._password_tries == 1 else None
        if self._password_tries > 3 or not sys.stdin.isatty():
            return None
        self.prompted = True
        return self._prompt()

    async def _prompt(self) -> str:
        """Ask once per command: the answer is kept in the options, so the further connections of
        ``--connections K`` log in with it instead of prompting K times."""
        user = self._opts.user or getpass.getuser()
        typed = await asyncio.to_thread(getpass.getpass, f"{user}@{self._opts.host}'s password: ")
        self._opts.password = typed
        return typed

    def kbdint_auth_requested(self) -> str | None:
        return None  # sshfiles uses plain password auth; avoids double prompts


async def connect(opts: ConnectOptions) -> asyncssh.SSHClientConnection:
    """Open an authenticated SSH connection or raise ClientError with a one-line reason."""
    known = KnownHosts(opts.known_hosts)
    pattern = host_pattern(opts.host, opts.port)
    recorded = known.lookup(pattern)
    password = opts.password if opts.password is not None else os.environ.get(PASSWORD_ENV)
    opts.password = password
    client = _Client(opts, known, pattern, recorded)

    kwargs: dict = dict(
        username=opts.user or getpass.getuser(),
        port=opts.port,
        known_hosts=([], [], []),  # every key goes through validate_host_public_key
        client_factory=lambda: client,
        connect_timeout=opts.connect_timeout,
        config=[],  # ignore ~/.ssh/config: this tool's options are explicit
        # AES-GCM first: in asyncssh it costs about a quarter of chacha20-poly1305 per packet
        # (14 us vs 48-59 us per 32 KiB, measured); the server still decides among what we offer.
        encryption_algs=["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                         "aes128-ctr", "aes256-ctr"],
        # Big channel packets: a 256 KiB READ reply travels as one SSH packet, not eight (nor a full
        # one and a 13-byte one for its SFTP header): per-packet work is the client's main cost.
        window=8 * 1024 * 1024,
        max_pktsize=MAX_PACKET,
    )
    # First contact: ask for the key OpenSSH asks for first (ed25519), so the fingerprint recorded
    # here is the one `ssh`/`sftp` show and pin for the same server; a server without one still
    # gets the rest, in asyncssh's order.
    kwargs["server_host_key_algs"] = _host_key_algs(recorded) if recorded else _PREFERRED_HOST_KEY_ALGS
    if opts.identities:
        kwargs["client_keys"] = [os.path.expanduser(p) for p in opts.identities]
    try:
        return await asyncssh.connect(opts.host, **kwargs)
    except asyncssh.HostKeyNotVerifiable as exc:
        if client.mismatch is not None:
            raise HostKeyChanged(
                f"host key changed for {pattern}: server offered {fingerprint(client.mismatch)}, "
                f"{known.path} has {', '.join(fingerprint(k) for k in recorded)}; "
                f"refusing to connect (remove the line from {known.path} if the change is expected)"
            ) from None
        raise ClientError(f"cannot verify host key of {pattern}: {exc.reason}", EXIT_CONNECT) from None
    except asyncssh.PermissionDenied:
        hint = "" if (password or client.prompted or opts.identities) else \
            f" (set {PASSWORD_ENV}, run on a terminal to be prompted, or use -i KEY)"
        raise ClientError(f"permission denied for {kwargs['username']}@{pattern}{hint}",
                          EXIT_CONNECT) from None
    except asyncssh.DisconnectError as exc:
        raise ClientError(f"connection to {pattern} failed: {exc.reason}", EXIT_CONNECT) from None
    except (TimeoutError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ClientError(f"cannot connect to {pattern}: {reason}", EXIT_CONNECT) from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        raise ClientError(f"cannot load identity: {exc}", EXIT_CONNECT) from None
