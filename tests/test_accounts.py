"""Accounts, authentication and the admin CLI, against a real server and the real store."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time

import asyncssh
import paramiko
import pytest
from argon2 import PasswordHasher
from conftest import make_server


async def _login(server, user, **kw) -> bool:
    try:
        async with server.connect(user, **kw):
            return True
    except asyncssh.PermissionDenied:
        return False


def login(server, user, **kw) -> bool:
    return asyncio.run(_login(server, user, **kw))


# -- quick start ------------------------------------------------------------------


def test_first_start_creates_keys_and_an_account_stock_sftp_can_use(tmp_path):
    """The README's quick start: `sshfiles serve` in an empty directory."""
    proc = subprocess.Popen([sys.executable, "-m", "sshfiles", "serve", "--port", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "connect with:" in line:  # the first account is created once the port is bound
                break
        text = "".join(lines)
        password = re.search(r"user sftpuser, password (\S+)", text).group(1)
        port = re.search(r"listening on 127\.0\.0\.1 port (\d+)", text).group(1)
        assert re.search(r"host key ssh-ed25519 SHA256:", text)
        for name in ("ssh_host_ed25519_key", "ssh_host_ecdsa_key", "ssh_host_rsa_key"):
            assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600
        (tmp_path / "up.txt").write_text("quick start")
        res = subprocess.run(
            ["sshpass", "-e", "sftp", "-P", port, "-o", "BatchMode=no", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no", "-b", "-",
             "sftpuser@127.0.0.1"], input="put up.txt\nls\n", capture_output=True, text=True, timeout=60,
            env=dict(os.environ, SSHPASS=password), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "homes" / "sftpuser" / "up.txt").read_text() == "quick start"
        # the printed password is nowhere on disk
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


# -- passwords ---------------------------------------------------------------------


def test_password_is_stored_as_argon2id_only(server):
    user = server.add_user("alice")
    db = (server.accounts_dir / "accounts.db").read_bytes()
    assert user.password.encode() not in db
    row = sqlite3.connect(server.accounts_dir / "accounts.db").execute(
        "SELECT password_hash FROM users WHERE name='alice'").fetchone()
    assert row[0].startswith("$argon2id$")
    assert login(server, user)
    assert user.password not in server.log()


def test_wrong_password_and_unknown_user_look_the_same(server):
    user = server.add_user("alice")

    async def attempt(name: str, password: str) -> str:
        try:
            async with asyncssh.connect(server.host, server.port, username=name, password=password,
                                        known_hosts=None, client_keys=None):
                return "ok"
        except asyncssh.PermissionDenied as exc:
            return exc.reason.replace(name, "NAME")  # the client names the user it tried

    wrong = asyncio.run(attempt("alice", "not-the-password"))
    unknown = asyncio.run(attempt("nobody", "whatever"))
    invalid = asyncio.run(attempt("../../etc", "whatever"))
    assert wrong == unknown == invalid
    log = server.log()
    assert "login user=alice" in log and "result=failed" in log
    assert login(server, user)


def test_rehash_on_login_when_parameters_change(server):
    user = server.add_user("alice")
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash(user.password)
    db = sqlite3.connect(server.accounts_dir / "accounts.db")
    with db:
        db.execute("UPDATE users SET password_hash=? WHERE name='alice'", (weak,))
    assert login(server, user)
    stored = db.execute("SELECT password_hash FROM users WHERE name='alice'").fetchone()[0]
    assert stored != weak and "m=65536,t=3,p=4" in stored
    assert login(server, user)


def test_bounded_auth_attempts_per_connection(server):
    server.add_user("alice")
    tries = []

    class Guesser(asyncssh.SSHClient):
        def password_auth_requested(self) -> str:
            tries.append(1)
            return f"guess-{len(tries)}"

        def kbdint_auth_requested(self):
            return None

    async def brute() -> None:
        with pytest.raises((asyncssh.DisconnectError, asyncssh.PermissionDenied, ConnectionError)):
            conn, _ = await asyncssh.create_connection(Guesser, server.host, server.port, username="alice",
                                                       known_hosts=None, client_keys=None)
            conn.close()

    asyncio.run(asyncio.wait_for(brute(), 60))
    assert len(tries) <= 7


def test_login_grace_time_drops_silent_connections(tmp_path, host_keys_dir):
    srv = make_server(tmp_path, host_keys_dir, extra_args=("--login-timeout", "1"))
    srv.start()
    try:
        with socket.create_connection((srv.host, srv.port), timeout=15) as s:
            s.recv(256)  # the server's version banner
            start = time.monotonic()
            while s.recv(4096):  # we never answer; the server must hang up
                pass
            assert time.monotonic() - start < 14
    finally:
        srv.stop()


# -- keys ---------------------------------------------------------------------------


def test_public_key_login_and_live_key_changes(server, tmp_path):
    user = server.add_user("kim", password=None, key=True)
    assert login(server, user)
    res = server.openssh("sftp", user, ["-b", "-", f"kim@{server.host}"], input="pwd\n")
    assert res.returncode == 0 and "Remote working directory: /" in res.stdout
    fp = server.cli("user", "key", "list", "kim").stdout.split()[0]
    assert fp.startswith("SHA256:")
    server.cli("user", "key", "remove", "kim", fp)
    assert not login(server, user)  # no restart needed
    server.cli("user", "key", "add", "kim", str(user.key_path) + ".pub")
    assert login(server, user)


def test_other_key_types_are_accepted(server, tmp_path):
    for alg in ("ssh-rsa", "ecdsa-sha2-nistp256"):
        key = asyncssh.generate_private_key(alg)
        path = tmp_path / f"k_{alg}"
        key.write_private_key(str(path))
        key.write_public_key(str(path) + ".pub")
        name = "u" + alg.replace("-", "")[:10]
        server.cli("user", "add", name, "--key", str(path) + ".pub")
        assert asyncio.run(_login(server, type("U", (), {"name": name, "password": None, "key_path": path})()))


# -- live account changes ------------------------------------------------------------


def test_live_password_change_and_removal(server):
    user = server.add_user("alice")
    assert login(server, user)
    server.cli("user", "passwd", "alice", "--password-stdin", input="new-secret-123\n")
    assert not login(server, user)
    user.password = "new-secret-123"
    assert login(server, user)
    server.cli("user", "remove", "alice")
    assert not login(server, user)
    assert user.home.is_dir()  # kept without --purge-home
    late = server.add_user("late")  # added while running
    assert login(server, late)


def test_paramiko_password_login_and_listing(server):
    user = server.add_user("pat")
    (user.home / "a.txt").write_text("a")
    t = paramiko.Transport((server.host, server.port))
    try:
        t.connect(username="pat", password=user.password)
        sftp = paramiko.SFTPClient.from_transport(t)
        assert sftp.listdir(".") == ["a.txt"]
        assert sftp.normalize(".") == "/"
    finally:
        t.close()
    with pytest.raises(paramiko.AuthenticationException):
        t = paramiko.Transport((server.host, server.port))
        try:
            t.connect(username="pat", password="wrong")
        finally:
            t.close()


# -- admin CLI -----------------------------------------------------------------------


def test_cli_user_lifecycle(server, tmp_path):
    server.cli("user", "add", "bob", "--quota", "500MiB", "--password-stdin", input="pw-bob-1\n")
    server.cli("user", "add", "carol", "--quota", "2GiB", "--password-stdin", input="pw-carol-1\n")
    (server.homes_dir / "bob" / "f").write_bytes(b"x" * 1000)
    server.cli("quota", "scan", "bob")
    out = server.cli("user", "list").stdout
    bob = next(line for line in out.splitlines() if line.startswith("bob "))
    assert "password" in bob and "500.0 MiB" in bob and "1000 B" in bob
    assert "2.0 GiB" in out
    server.cli("user", "quota", "bob", "unlimited")
    assert "unlimited" in next(l for l in server.cli("user", "list").stdout.splitlines() if l.startswith("bob "))
    server.cli("user", "remove", "carol", "--purge-home")
    assert not (server.homes_dir / "carol").exists()
    custom = tmp_path / "custom-home"
    server.cli("user", "add", "dave", "--home", str(custom), "--password-stdin", input="pw-dave-1\n")
    assert custom.is_dir()
    assert str(custom) in server.cli("user", "list").stdout


@pytest.mark.parametrize("args,stdin,message", [
    (["user", "add", "../evil"], "pw\n", "invalid user name"),
    (["user", "add", "-rf"], "pw\n", None),
    (["user", "add", "a/b", "--password-stdin"], "pw\n", "invalid user name"),
    (["user", "add", "a\\b", "--password-stdin"], "pw\n", "invalid user name"),
    (["user", "add", "bell\x07", "--password-stdin"], "pw\n", "invalid user name"),
    (["user", "add", "..", "--password-stdin"], "pw\n", "invalid user name"),
    (["user", "add", "ok", "--quota", "12 parsecs", "--password-stdin"], "pw\n", "invalid size"),
    (["user", "add", "ok", "--key", "/nonexistent.pub"], None, "cannot read key file"),
    (["user", "add", "ok", "--password-stdin"], "\n", "empty password"),
    (["user", "passwd", "ghost", "--password-stdin"], "pw\n", "no such user"),
    (["user", "remove", "ghost"], None, "no such user"),
    (["user", "quota", "ghost", "1GiB"], None, "no such user"),
    (["user", "key", "list", "ghost"], None, "no such user"),
    (["user", "key", "remove", "alice", "SHA256:nope"], None, "has no key"),
    (["quota", "scan", "ghost"], None, "no such user"),
])
def test_cli_errors_are_one_line_without_traceback(server, args, stdin, message):
    server.add_user("alice")
    res = server.cli(*args, input=stdin, check=False)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    if message:
        assert len(lines) == 1 and message in lines[0], res.stderr


def test_cli_rejects_malformed_key_file(server, tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-ed25519 AAAAnotbase64!!! comment\n")
    res = server.cli("user", "add", "kim", "--key", str(bad), check=False)
    assert res.returncode == 1 and "is not a public key file" in res.stderr and "Traceback" not in res.stderr
    assert "kim" not in server.cli("user", "list").stdout


def test_cli_duplicate_user(server):
    server.add_user("alice")
    res = server.cli("user", "add", "alice", "--password-stdin", input="pw2\n", check=False)
    assert res.returncode == 1 and "already exists" in res.stderr


def test_corrupt_store_gives_clear_error_and_server_keeps_running(server):
    user = server.add_user("alice")
    db = server.accounts_dir / "accounts.db"
    original = db.read_bytes()
    # the CLI on a garbage store in another directory
    other = server.root / "broken"
    other.mkdir()
    (other / "accounts.db").write_bytes(b"this is not a database" * 100)
    res = subprocess.run([sys.executable, "-m", "sshfiles", "--accounts-dir", str(other), "user", "list"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "corrupt" in res.stderr and "Traceback" not in res.stderr
    # the live store is untouched and the server still serves
    assert login(server, user)
    assert db.read_bytes()[:100] == original[:100]


def test_client_vanishing_mid_upload_keeps_server_serving(server, tmp_path):
    user = server.add_user("alice")
    other = server.add_user("bob")
    script = tmp_path / "uploader.py"
    script.write_text(f"""
import asyncio, asyncssh, os, sys
async def main():
    async with asyncssh.connect('127.0.0.1', {server.port}, username='alice', password={user.password!r},
                                known_hosts=None, client_keys=None) as c:
        async with c.start_sftp_client() as s:
            async with s.open('partial.bin', 'wb') as f:
                for i in range(10000):
                    await f.write(bytes([i % 256]) * 65536, i * 65536)
                    if i == 20:
                        print('started', flush=True)
asyncio.run(main())
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    proc.kill()
    proc.wait(10)
    assert login(server, other)  # the server keeps serving others

    async def check() -> None:
        for _ in range(50):  # the server notices the dead connection and closes the handle
            if "path=/partial.bin direction=upload" in server.log():
                break
            await asyncio.sleep(0.1)
    asyncio.run(check())
    data = (user.home / "partial.bin").read_bytes()
    assert len(data) >= 21 * 65536 and len(data) % 65536 == 0
    for i in range(len(data) // 65536):
        assert data[i * 65536:(i + 1) * 65536] == bytes([i % 256]) * 65536
    from sshfiles.stores.sqlite import SQLiteAccountStore
    store = SQLiteAccountStore(server.accounts_dir)
    assert store.charged("alice") == len(data)


def test_toml_config_and_environment_set_state_locations(tmp_path):
    cfg = tmp_path / "sshfiles.toml"
    cfg.write_text(f'accounts_dir = "{tmp_path / "acc"}"\nhomes_dir = "{tmp_path / "h"}"\n')
    base = [sys.executable, "-m", "sshfiles", "--config", str(cfg)]
    res = subprocess.run([*base, "user", "add", "zed", "--password-stdin"], input="pw-zed-1\n",
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "acc" / "accounts.db").exists() and (tmp_path / "h" / "zed").is_dir()
    # a flag overrides the file; the environment variable works as the flag does
    env = dict(os.environ, SSHFILES_ACCOUNTS_DIR=str(tmp_path / "acc2"))
    res = subprocess.run([sys.executable, "-m", "sshfiles", "user", "list"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    # a read-only command never creates a store (issue 13 item 5): it says where it looked
    assert res.returncode == 1 and f"no store at {tmp_path / 'acc2' / 'accounts.db'}" in res.stderr
    assert "zed" not in res.stdout and not (tmp_path / "acc2").exists()
    res = subprocess.run([*base, "--accounts-dir", str(tmp_path / "acc2"), "user", "list"],
                         capture_output=True, text=True, timeout=60)
    assert "zed" not in res.stdout and res.returncode == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1\n")
    res = subprocess.run([sys.executable, "-m", "sshfiles", "--config", str(bad), "user", "list"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "not valid TOML" in res.stderr and "Traceback" not in res.stderr
