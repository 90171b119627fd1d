"""A bare asyncssh SFTP server with the same command line as sshfiles.

Used by ``scripts/bench.py`` as a baseline ("bare" in ``--servers``) and as a
stand-in while the real server is not available.  It has no jail beyond
asyncssh's ``chroot`` path mapping, no quota, no per-file logging: it shows
what asyncssh gives out of the box.

    python scripts/_bench_standin.py --keys-dir K --accounts-dir A --homes-dir H \
        user add NAME --password-stdin [--quota SIZE] [--key PUBKEY_FILE]
    python scripts/_bench_standin.py --keys-dir K --accounts-dir A --homes-dir H \
        serve --host 127.0.0.1 --port P [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import asyncssh


def _users_file(accounts_dir: str) -> Path:
    return Path(accounts_dir) / "standin-users.json"


def _load_users(accounts_dir: str) -> dict:
    path = _users_file(accounts_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def user_add(args: argparse.Namespace) -> int:
    from argon2 import PasswordHasher

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    users = _load_users(args.accounts_dir)
    entry = {"password": PasswordHasher().hash(password) if password else None, "keys": []}
    if args.key:
        entry["keys"].append(Path(args.key).read_text().strip())
    users[args.name] = entry
    os.makedirs(args.accounts_dir, exist_ok=True)
    _users_file(args.accounts_dir).write_text(json.dumps(users))
    os.makedirs(Path(args.homes_dir) / args.name, exist_ok=True)
    return 0


class _Server(asyncssh.SSHServer):
    def __init__(self, users: dict, hasher, pool=None) -> None:
        self._users = users
        self._hasher = hasher
        self._pool = pool
        self._user: dict | None = None

    def begin_auth(self, username: str) -> bool:
        self._user = self._users.get(username)
        if self._user is None:
            return True
        keys = self._user.get("keys") or []
        if keys:
            self._conn.set_authorized_keys(asyncssh.import_authorized_keys("\n".join(keys)))
        return True

    def connection_made(self, conn) -> None:
        self._conn = conn

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        if not self._user or not self._user.get("password"):
            return False
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._hasher.verify, self._user["password"], password)
        except Exception:
            return False


def _coalesce_transport_writes() -> None:
    """Experiment (SSHFILES_BENCH_STANDIN_COALESCE=1): one socket send per loop pass, not per SSH packet.

    asyncssh writes every SSH packet to the transport separately, so a 256 KiB SFTP read reply to
    a client with a 32 KiB max packet costs 8 send() calls (and 8 wake-ups of the peer).  This
    patch queues packets and flushes them with one write from ``call_soon``.  A lever to measure,
    not production code: it is only used by the bench's bare stand-in."""
    from asyncssh.connection import SSHConnection

    def _flush(self) -> None:
        buf = self._bench_wbuf
        data = b"".join(buf) if len(buf) > 1 else buf[0]
        buf.clear()
        if self._transport:
            try:
                self._transport.write(data)
            except ConnectionError:
                pass

    def _send(self, data: bytes) -> None:
        buf = self.__dict__.setdefault("_bench_wbuf", [])
        if not buf:
            self._loop.call_soon(_flush, self)
        buf.append(data)

    orig_force_close = SSHConnection._force_close

    def _force_close(self, exc) -> None:
        if self.__dict__.get("_bench_wbuf"):
            _flush(self)
        orig_force_close(self, exc)

    SSHConnection._send = _send
    SSHConnection._force_close = _force_close


def serve(args: argparse.Namespace) -> int:
    from argon2 import PasswordHasher

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if os.environ.get("SSHFILES_BENCH_STANDIN_COALESCE") == "1":
        _coalesce_transport_writes()
    if os.environ.get("SSHFILES_BENCH_STANDIN_LIMITS"):  # e.g. 262144: advertise smaller read/write sizes
        from asyncssh import sftp as _sftp
        n = int(os.environ["SSHFILES_BENCH_STANDIN_LIMITS"])
        _sftp.MAX_SFTP_READ_LEN = _sftp.MAX_SFTP_WRITE_LEN = n
        _sftp.MAX_SFTP_PACKET_LEN = n + 1024
    keys_dir = Path(args.keys_dir)
    keys_dir.mkdir(parents=True, exist_ok=True)
    host_key_path = keys_dir / "standin_host_ed25519"
    if not host_key_path.exists():
        asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(host_key_path))
    users = _load_users(args.accounts_dir)
    hasher = PasswordHasher()
    extra = json.loads(os.environ.get("SSHFILES_BENCH_STANDIN_OPTS") or "{}")
    for env, opt in (("SSHFILES_BENCH_STANDIN_PKT", "max_pktsize"), ("SSHFILES_BENCH_STANDIN_WINDOW", "window")):
        if os.environ.get(env):
            extra[opt] = int(os.environ[env])
    pool = None
    if os.environ.get("SSHFILES_BENCH_STANDIN_NICE") or os.environ.get("SSHFILES_BENCH_STANDIN_POOL"):
        # lever: argon2 in POOL (default 1) worker threads at nice +NICE (default 0); the lane
        # threads libargon2 starts inherit the nice value of the thread that starts them
        import concurrent.futures
        import threading

        nice = int(os.environ.get("SSHFILES_BENCH_STANDIN_NICE") or 0)
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=int(os.environ.get("SSHFILES_BENCH_STANDIN_POOL") or 1),
            initializer=lambda: os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice))
    homes = Path(args.homes_dir).resolve()

    def sftp_factory(chan):
        home = homes / chan.get_extra_info("username")
        return asyncssh.SFTPServer(chan, chroot=str(home).encode())

    async def main() -> None:
        server = await asyncssh.listen(
            args.host, args.port, server_host_keys=[str(host_key_path)],
            server_factory=lambda: _Server(users, hasher, pool), sftp_factory=sftp_factory,
            allow_scp=True, **extra)
        print(f"standin: listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
        await server.wait_closed()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys-dir", required=True)
    parser.add_argument("--accounts-dir", required=True)
    parser.add_argument("--homes-dir", required=True)
    sub = parser.add_subparsers(dest="cmd", required=True)
    user = sub.add_parser("user").add_subparsers(dest="user_cmd", required=True)
    add = user.add_parser("add")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true")
    add.add_argument("--quota")
    add.add_argument("--key")
    srv = sub.add_parser("serve")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.cmd == "user":
        return user_add(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
