"""sshfiles-cli's cipher choice: AES-GCM with sshfiles, and still a working client for a server that
offers only chacha20-poly1305 (as an OpenSSH server configured so would).

Why it matters: the cli offers AES-GCM first because asyncssh's AES-GCM costs a fraction of its
chacha20-poly1305 per packet, and the cli process runs the seam's speed-ups (items 3a-3j) on its
own side; the server still decides, so a server that does not offer GCM must get chacha20 from the
same client, speed-ups and all.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

import asyncssh
from test_client import ROOT

from sshfiles.client.connect import ConnectOptions, connect

CLI = [sys.executable, "-m", "sshfiles.client.cli"]
CHACHA = "chacha20-poly1305@openssh.com"


def test_cli_negotiates_aes_gcm_with_sshfiles(server, tmp_path):
    user = server.add_user("gcm")

    async def run() -> tuple[str, str]:
        opts = ConnectOptions(host=server.host, port=server.port, user=user.name, password=user.password,
                              known_hosts=tmp_path / "known_hosts", notify=lambda line: None)
        conn = await connect(opts)
        try:
            return conn.get_extra_info("send_cipher"), conn.get_extra_info("recv_cipher")
        finally:
            conn.close()
            await conn.wait_closed()

    assert asyncio.run(run()) == ("aes128-gcm@openssh.com", "aes128-gcm@openssh.com")


class _ChachaOnlyServer(asyncssh.SSHServer):
    """A password-only SFTP server whose connections record the cipher they negotiated."""

    password = ""
    ciphers: list[tuple[str, str]] = []

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        ok = password == self.password
        if ok:
            self.ciphers.append((self._conn.get_extra_info("recv_cipher"), self._conn.get_extra_info("send_cipher")))
        return ok


def test_cli_moves_files_with_a_server_offering_only_chacha20(tmp_path: Path) -> None:
    """Put and get (odd size: packets end mid-read) through the cli process against an asyncssh
    server restricted to chacha20-poly1305: the cli falls back to it, its speed-ups included."""
    root = tmp_path / "root"
    root.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 4321)
    (work / "up.bin").write_bytes(data)
    _ChachaOnlyServer.password = "s3cret-chacha"
    _ChachaOnlyServer.ciphers = []

    async def run() -> list[tuple[int, str]]:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        acceptor = await asyncssh.listen(
            "127.0.0.1", 0, server_factory=_ChachaOnlyServer, server_host_keys=[host_key],
            encryption_algs=[CHACHA], sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(root)))
        port = acceptor.sockets[0].getsockname()[1]
        env = dict(os.environ, SSHFILES_PASSWORD=_ChachaOnlyServer.password, PYTHONPATH=str(ROOT))
        env.pop("SSHFILES_NO_SPEEDUPS", None)
        results = []
        try:
            for args in (["put", "--no-verify", "--no-resume", "up.bin", "/up.bin"],
                         ["get", "--no-verify", "--no-resume", "/up.bin", "down.bin"]):
                proc = await asyncio.create_subprocess_exec(
                    *CLI, "--host", "127.0.0.1", "--port", str(port), "-u", "anyone", "--known-hosts",
                    str(tmp_path / "known_hosts"), "-q", *args, cwd=work, env=env,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                _, err = await asyncio.wait_for(proc.communicate(), 120)
                results.append((proc.returncode or 0, err.decode()))
        finally:
            acceptor.close()
            await acceptor.wait_closed()
        return results

    for code, err in asyncio.run(run()):
        assert code == 0, err
        assert "Traceback" not in err
    assert _ChachaOnlyServer.ciphers == [(CHACHA, CHACHA)] * 2
    digest = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256((root / "up.bin").read_bytes()).hexdigest() == digest
    assert hashlib.sha256((work / "down.bin").read_bytes()).hexdigest() == digest
