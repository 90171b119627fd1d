"""Issue 13, items 1-10: what a new user meets first, each as that user would meet it.

Real `sshfiles serve` (conftest's ServerHandle), the real `sshfiles-cli` and `sshfiles` commands in
subprocesses, stock OpenSSH and paramiko where a comparison with another client is the point.
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import paramiko
import pytest
from conftest import ServerHandle, User, make_server
from test_client import Cli, CountingProxy, make_file, no_traceback
from test_disk_full import small_fs  # noqa: F401 - a fixture

MiB = 1024 * 1024


@pytest.fixture
def alice(server: ServerHandle, tmp_path: Path) -> Cli:
    user = server.add_user("alice", quota="1GiB")
    work = tmp_path / "work"
    work.mkdir()
    return Cli(server, user, work)


def wait_for(h: ServerHandle, text: str, count: int = 1, timeout: float = 30) -> None:
    """Until the server's output holds ``text`` ``count`` times (start() returns at "listening on")."""
    deadline = time.monotonic() + timeout
    while h.log().count(text) < count:
        assert time.monotonic() < deadline, h.log()
        time.sleep(0.05)


def errors(res: subprocess.CompletedProcess) -> list[str]:
    """stderr without the first-contact host key note."""
    return [line for line in res.stderr.splitlines() if "trusted on first use" not in line]


# --------------------------------------------------------------------------- 1: trailing / is a directory

def test_put_to_a_missing_directory_fails_instead_of_creating_a_file(alice: Cli) -> None:
    make_file(alice.tmp / "big.iso", 300 * 1024)
    res = alice.run("put", "big.iso", "backups/")  # the README's first example, fresh account
    assert res.returncode == 5, res.stderr
    assert errors(res) == ["sshfiles-cli: backups/: No such file or directory (a trailing / names a directory; "
                           "--mkdir creates it)"]
    assert not (alice.user.home / "backups").exists()

    (alice.user.home / "afile").write_bytes(b"x")
    res = alice.run("put", "big.iso", "afile/")
    assert res.returncode == 5 and errors(res) == ["sshfiles-cli: afile/: Not a directory"], res.stderr

    res = alice.run("put", "--mkdir", "big.iso", "backups/")
    assert res.returncode == 0, res.stderr
    assert (alice.user.home / "backups" / "big.iso").stat().st_size == 300 * 1024

    # the same inside the shell, whose paths are relative to its working directory
    res = alice.run("shell", input="mkdir d\ncd d\nput big.iso sub/\nput --mkdir big.iso sub2/\n")
    assert res.returncode == 5 and "sub/: No such file or directory" in res.stderr, res.stderr
    assert not (alice.user.home / "d" / "sub").exists()
    res = alice.run("shell", input="cd d\nput --mkdir big.iso sub2/\n")
    assert res.returncode == 0, res.stderr
    assert (alice.user.home / "d" / "sub2" / "big.iso").is_file()

    # get into a local path with a trailing /
    res = alice.run("get", "backups/big.iso", "restore/")
    assert res.returncode == 5 and "restore/: No such file or directory" in res.stderr, res.stderr
    assert not (alice.tmp / "restore").exists()
    res = alice.run("get", "--mkdir", "backups/big.iso", "restore/")
    assert res.returncode == 0 and (alice.tmp / "restore" / "big.iso").is_file(), res.stderr


# --------------------------------------------------------------------------- 2: failures are one line

def test_server_stopped_mid_download_and_upload_is_one_line(alice: Cli) -> None:
    size = 64 * MiB
    make_file(alice.user.home / "big.bin", size)
    alice.server.cli("quota", "scan", "alice")
    proxy = CountingProxy(alice.server.port, delay=0.002)
    try:
        proc = alice.spawn("get", "big.bin", "local.bin", port=proxy.port)
        local = alice.tmp / "local.bin"
        for _ in range(3000):
            if local.exists() and local.stat().st_size > 2 * MiB:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.01)
        alice.server.kill()  # the server stops mid-download
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        lines = [line for line in err.splitlines() if line and "trusted on first use" not in line]
        assert len(lines) == 1 and lines[0].startswith("sshfiles-cli: connection lost"), err
        assert "Traceback" not in err
    finally:
        proxy.close()

    # connection refused, now that nothing listens
    res = alice.run("put", "local.bin")
    assert res.returncode == 3 and len(errors(res)) == 1 and "cannot connect" in res.stderr, res.stderr
    no_traceback(res)


def test_local_disk_full_during_get_is_one_line(alice: Cli, small_fs: Path) -> None:  # noqa: F811
    make_file(alice.user.home / "big.bin", 3 * MiB)
    alice.server.cli("quota", "scan", "alice")
    res = alice.run("get", "big.bin", str(small_fs / "big.bin"))
    assert res.returncode == 6, res.stderr
    assert errors(res) == [f"sshfiles-cli: {small_fs / 'big.bin'}: No space left on device"], res.stderr


# --------------------------------------------------------------------------- 4: first account once listening

def test_first_account_is_created_only_once_the_port_is_bound(tmp_path: Path, host_keys_dir: Path) -> None:
    h = make_server(tmp_path, host_keys_dir)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        # state flags after the command name (item 8), port taken by someone else
        res = subprocess.run([sys.executable, "-m", "sshfiles", "serve", "--port", str(busy.getsockname()[1]),
                              "--keys-dir", str(h.keys_dir), "--accounts-dir", str(h.accounts_dir),
                              "--homes-dir", str(h.homes_dir)], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
    finally:
        busy.close()
    assert res.returncode == 1 and "Address already in use" in res.stderr, res.stderr
    assert "created the first account" not in res.stdout + res.stderr
    assert f"host keys: {h.keys_dir}" in res.stderr  # the flag after `serve` was used
    assert "sftpuser" not in h.cli("user", "list").stdout

    h.start()
    try:
        wait_for(h, "connect with: ")  # the password comes after the listening line
        log = h.log()
        shown = re.findall(r"user sftpuser, password (\S+)", log)
        assert len(shown) == 1, log
        assert "connect with: sftp -P" in log
        h.restart()
        wait_for(h, "connect with: ", count=2)
        user = User("sftpuser", shown[0], h.homes_dir / "sftpuser")

        async def login() -> None:
            async with h.connect(user):
                pass
        asyncio.run(login())
    finally:
        h.stop()
    assert len(re.findall(r"created the first account", h.log())) == 1


# --------------------------------------------------------------------------- 5: discoverable config

def _sshfiles(*args: str, cwd: Path, env: dict[str, str], input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sshfiles", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env, input=input)


def test_config_is_found_and_its_paths_are_relative_to_it(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path / "home"))
    for var in ("SSHFILES_CONFIG", "SSHFILES_ACCOUNTS_DIR", "SSHFILES_HOMES_DIR", "SSHFILES_KEYS_DIR"):
        env.pop(var, None)
    if Path("/etc/sshfiles/config.toml").exists():
        pytest.skip("this machine has /etc/sshfiles/config.toml")
    project = tmp_path / "project"
    project.mkdir()
    (project / "sshfiles.toml").write_text('accounts_dir = "state/accounts"\nhomes_dir = "state/homes"\n')
    res = _sshfiles("user", "add", "zed", "--password-stdin", cwd=project, env=env, input="pw-zed-123\n")
    assert res.returncode == 0, res.stderr
    assert (project / "state" / "accounts" / "accounts.db").is_file()

    # elsewhere, with no config: a read-only command creates nothing and says where it looked
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (["user", "list"], ["ban", "list"], ["user", "key", "list", "zed"]):
        res = _sshfiles(*args, cwd=elsewhere, env=env)
        assert res.returncode == 1, res
        assert res.stderr.strip() == (f"Error: no store at {elsewhere / 'accounts' / 'accounts.db'}; run `sshfiles "
                                      f"serve` or `sshfiles user add` first, or name the existing one "
                                      f"(--accounts-dir, or a config file)"), res.stderr
        assert list(elsewhere.iterdir()) == []

    # the per-user config file, with paths relative to it, works from any directory
    xdg = tmp_path / "xdg" / "sshfiles"
    xdg.mkdir(parents=True)
    (xdg / "config.toml").write_text(f'accounts_dir = "{os.path.relpath(project / "state/accounts", xdg)}"\n')
    res = _sshfiles("user", "list", "-v", cwd=elsewhere, env=env)
    assert res.returncode == 0, res.stderr
    assert f"# config: {xdg / 'config.toml'}" in res.stdout
    assert f"# accounts: {xdg}/" in res.stdout  # relative to the file, not to the current directory
    assert re.search(r"^zed ", res.stdout, re.M)
    assert list(elsewhere.iterdir()) == []


def test_serve_prints_its_state_paths(server: ServerHandle) -> None:
    log = server.log()
    for line in (f"host keys: {server.keys_dir}", f"accounts: {server.accounts_dir}", f"homes: {server.homes_dir}",
                 "config: "):
        assert line in log, log


# --------------------------------------------------------------------------- 6: IPv6 connect hint

def test_ipv6_connect_hint_is_bracketed(tmp_path: Path, host_keys_dir: Path) -> None:
    h = make_server(tmp_path, host_keys_dir)
    h.host = "::1"
    h.start()
    try:
        wait_for(h, "connect with: ")
    finally:
        h.stop()
    assert re.search(r"connect with: sftp -P \d+ USER@\[::1\]$", h.log(), re.M), h.log()


# --------------------------------------------------------------------------- 7: the shell

def test_shell_script_stops_at_first_failure_with_its_status(alice: Cli) -> None:
    res = alice.run("shell", input="mkdir before\ncd nosuchdir\nmkdir after\n")
    assert res.returncode == 5, res.stderr
    assert errors(res) == ["sshfiles-cli: nosuchdir: No such file or directory"]
    assert (alice.user.home / "before").is_dir() and not (alice.user.home / "after").exists()

    res = alice.run("shell", input="ls -h\nhelp\nmkdir -h\nput -h\n")
    assert res.returncode == 0, res.stderr
    assert "Usage: ls [OPTIONS] [PATH]" in res.stdout and "--mkdir" in res.stdout
    # every option `help` shows is one the command accepts
    help_text = res.stdout[res.stdout.index("Commands"):]
    for cmd, opt in (("ls", "-l"), ("put", "-r"), ("put", "-j"), ("get", "--mkdir"), ("mkdir", "-p"),
                     ("rm", "-r"), ("hash", "-a")):
        assert re.search(rf"\b{cmd} (\[[^]]*\] )*\[{re.escape(opt)}\b", help_text), (cmd, opt)
        assert opt in alice.run(cmd, "-h").stdout


def _read_until(fd: int, needle: bytes, seen: bytearray, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, bytes(seen)
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break


def test_shell_has_line_editing_and_history_on_a_terminal(alice: Cli) -> None:
    """On a terminal: Up recalls "mkdir one", Backspace removes the "e", "2" makes "mkdir on2". Without
    readline the escape sequence itself would become part of the line."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(alice.argv("shell"), env=alice.env, cwd=alice.tmp, stdin=terminal, stdout=terminal,
                            stderr=terminal, start_new_session=True)
    os.close(terminal)
    seen = bytearray()
    try:
        for keys in (b"mkdir one\r", b"\x1b[A\x7f2\r", b"exit\r"):
            _read_until(controller, b"> ", seen)
            del seen[:]
            os.write(controller, keys)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(controller)
    assert (alice.user.home / "one").is_dir()
    assert (alice.user.home / "on2").is_dir(), sorted(p.name for p in alice.user.home.iterdir())


# --------------------------------------------------------------------------- 8: versions, -h, no terminal

def test_version_help_and_no_terminal_password(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    res = subprocess.run([sys.executable, "-m", "sshfiles.client.cli", "--version"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0 and re.match(r"sshfiles-cli, version \S+", res.stdout), res
    res = subprocess.run([sys.executable, "-m", "sshfiles", "-h"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Usage:" in res.stdout
    res = subprocess.run([sys.executable, "-m", "sshfiles", "--accounts-dir", str(tmp_path / "a"), "--homes-dir",
                          str(tmp_path / "h"), "user", "add", "newbie"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == ("Error: no terminal to read a password from: use --password-stdin "
                                  "(or --key FILE for a key-only account)")
    assert "Warning" not in res.stderr and "Aborted" not in res.stderr


# --------------------------------------------------------------------------- 9: host key, links, units, quota

def test_client_pins_the_same_host_key_as_openssh(alice: Cli, tmp_path: Path) -> None:
    res = alice.run("ls")
    assert res.returncode == 0, res.stderr
    ours = alice.known_hosts.read_text().split()
    assert ours[1] == "ssh-ed25519"
    announced = re.search(r"host key ssh-ed25519 (SHA256:\S+)", alice.server.log())
    assert announced and f"ssh-ed25519 key {announced.group(1)} trusted" in res.stderr

    theirs = tmp_path / "openssh_known_hosts"
    env = dict(os.environ, SSHPASS=alice.user.password or "")
    done = subprocess.run(["sshpass", "-e", "sftp", "-P", str(alice.server.port), "-o", "BatchMode=no",
                           "-o", "PubkeyAuthentication=no", "-o", "StrictHostKeyChecking=accept-new",
                           "-o", f"UserKnownHostsFile={theirs}", "-b", "-", f"alice@{alice.server.host}"],
                          input="pwd\n", capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    pinned = [line.split() for line in theirs.read_text().splitlines() if line.strip()]
    assert [(p[1], p[2]) for p in pinned] == [(ours[1], ours[2])]


def test_link_counts_units_and_refused_upload_partial(alice: Cli, server: ServerHandle, tmp_path: Path) -> None:
    (alice.user.home / "d" / "sub").mkdir(parents=True)
    (alice.user.home / "f").write_bytes(b"12345")
    os.link(alice.user.home / "f", alice.user.home / "g")
    res = alice.run("ls", "-l")
    assert re.search(r"^d\S+ +3 .* d$", res.stdout, re.M), res.stdout
    assert re.search(r"^-\S+ +2 +5 .* f$", res.stdout, re.M), res.stdout
    # other clients read the same longname (OpenSSH 9 formats its own, with "?", as against sshd)
    transport = paramiko.Transport((server.host, server.port))
    try:
        transport.connect(username="alice", password=alice.user.password)
        client = paramiko.SFTPClient.from_transport(transport)
        assert client is not None
        longnames = {a.filename: a.longname for a in client.listdir_attr(".")}
    finally:
        transport.close()
    assert longnames["d"].split()[1] == "3" and longnames["g"].split()[1] == "2"

    make_file(alice.tmp / "u.bin", 3 * MiB)
    res = alice.run("put", "u.bin")
    assert re.search(r"put u\.bin -> u\.bin: 3\.0 MiB, sent 3\.0 MiB in [\d.]+s \([\d.]+ [KMG]iB/s\)", res.stderr)
    res = alice.run("get", "u.bin", "back.bin")
    assert re.search(r"get u\.bin -> back\.bin: 3\.0 MiB, received 3\.0 MiB in [\d.]+s \([\d.]+ [KMG]iB/s\)",
                     res.stderr), res.stderr

    server.cli("user", "quota", "alice", "5MiB")
    make_file(alice.tmp / "big.bin", 8 * MiB, seed=3)
    res = alice.run("put", "big.bin")
    assert res.returncode == 6, res.stderr
    [line] = errors(res)
    partial = (alice.user.home / "big.bin").stat().st_size
    assert partial > 0 and "the partial file (" in line and "stays on the server and counts against the quota" in line
    assert "run the same put to resume" in line


# --------------------------------------------------------------------------- 10: statvfs for WinSCP

def test_statvfs_block_size_equals_fragment_size(alice: Cli) -> None:
    async def go() -> asyncssh.SFTPVFSAttrs:
        async with alice.server.sftp(alice.user) as sftp:
            return await sftp.statvfs(".")
    v = asyncio.run(go())
    assert v.bsize == v.frsize
    # what WinSCP computes (f_bsize x f_blocks): the 1 GiB quota, not 256 TiB
    assert v.bsize * v.blocks == 1024 ** 3
    assert v.bsize * v.bavail <= 1024 ** 3
