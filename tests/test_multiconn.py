"""``sshfiles-cli put/get --connections K``: one file over K SSH connections to a ``--workers 2`` server.

Black-box: the real server (``workers_server``), the real client as a subprocess (SIGKILLed mid-way
like an interrupted run), bytes counted by test_client's loopback proxy. A killed K-connection
transfer leaves K partly written ranges with holes between them; the re-run must send only what is
missing (whole-file block comparison), then verify the whole file.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_client import Cli, CountingProxy, kill_when, make_file, no_traceback, sha256
from test_quota import assert_ledger_matches_disk

MiB = 1024 * 1024
SIZE = 40 * MiB + 12345  # not a multiple of the block: the last range is short


@pytest.fixture
def mcli(workers_server, tmp_path):
    user = workers_server.add_user("alice", quota="1GiB")
    work = tmp_path / "work"
    work.mkdir()
    return Cli(workers_server, user, work)


def holes_below_data(partial: Path, src: Path, block: int = 256 * 1024) -> bool:
    """True if some block of ``partial`` differs from ``src`` while a later one already matches: the
    ranges of a killed K-connection transfer, which a prefix-only resume could not use."""
    a, b = partial.read_bytes(), src.read_bytes()
    same = [a[i:i + block] == b[i:i + block] for i in range(0, len(b), block)]
    return any(not same[i] and any(same[i + 1:]) for i in range(len(same)))


def logins(server, name: str) -> int:
    return len(re.findall(rf"login .*user={name}\b.*result=ok", server.log()))


def test_put_and_get_over_three_connections(mcli):
    src = make_file(mcli.tmp / "big.bin", SIZE)
    before = logins(mcli.server, "alice")
    res = mcli.run("put", "--connections", "3", "big.bin")
    assert res.returncode == 0, res.stderr
    no_traceback(res)
    assert "over 3 connections" in res.stderr and "sha256 verified" in res.stderr, res.stderr
    assert sha256(mcli.user.home / "big.bin") == sha256(src)
    assert logins(mcli.server, "alice") - before == 3, mcli.server.log()

    res = mcli.run("get", "-c", "3", "big.bin", "back.bin")
    assert res.returncode == 0, res.stderr
    assert "over 3 connections" in res.stderr and "sha256 verified" in res.stderr, res.stderr
    assert sha256(mcli.tmp / "back.bin") == sha256(src)
    assert logins(mcli.server, "alice") - before == 6
    assert_ledger_matches_disk(mcli.server, mcli.user)


def test_replacing_a_file_uses_every_connection(mcli):
    """Standard mode: a put over a larger or unwanted file truncates it, and all K connections write."""
    src = make_file(mcli.tmp / "big.bin", SIZE)
    make_file(mcli.tmp / "old.bin", SIZE + 3 * MiB, seed=2)
    for what in (["old.bin", "big.bin"], ["big.bin", "big.bin"], ["--no-resume", "big.bin", "big.bin"]):
        res = mcli.run("put", "-c", "3", *what)
        assert res.returncode == 0, (what, res.stderr)
        assert "over 3 connections" in res.stderr and "sha256 verified" in res.stderr, (what, res.stderr)
        assert ("warning" in res.stderr) == (what[0] == "big.bin"), res.stderr  # only the restart warns
    assert sha256(mcli.user.home / "big.bin") == sha256(src)
    assert_ledger_matches_disk(mcli.server, mcli.user)


def test_shell_commands_take_connections(mcli):
    src = make_file(mcli.tmp / "big.bin", SIZE)
    res = mcli.run("shell", input="put -c 3 big.bin up.bin\nget -c 3 up.bin back.bin\n")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("over 3 connections") == 2, res.stderr
    assert sha256(mcli.user.home / "up.bin") == sha256(src) == sha256(mcli.tmp / "back.bin")


def test_small_file_uses_one_connection(mcli):
    make_file(mcli.tmp / "small.bin", 600 * 1024)  # under 3 blocks of 256 KiB
    before = logins(mcli.server, "alice")
    res = mcli.run("put", "-c", "3", "small.bin")
    assert res.returncode == 0, res.stderr
    assert "connections" not in res.stderr and "sha256 verified" in res.stderr
    assert logins(mcli.server, "alice") - before == 1


def test_errors_stay_one_line(mcli):
    assert mcli.run("ls").returncode == 0  # records the host key: its first-use line is not an error
    res = mcli.run("get", "-c", "3", "nope.bin")
    assert res.returncode == 5
    assert res.stderr.strip() == "sshfiles-cli: nope.bin: No such file or directory"
    res = mcli.run("put", "-c", "99", "x")
    assert res.returncode == 2 and "Traceback" not in res.stderr


@pytest.mark.slow
def test_upload_killed_then_resumed_sends_only_the_holes(mcli):
    src = make_file(mcli.tmp / "big.bin", SIZE)
    proxy = CountingProxy(mcli.server.port, delay=0.01)
    try:
        proc = mcli.spawn("put", "-c", "3", "big.bin", port=proxy.port)
        kill_when(proc, lambda: proxy.up > SIZE * 0.4)
        target = mcli.user.home / "big.bin"
        assert holes_below_data(target, src)

        proxy.reset()
        proxy.delay = 0
        res = mcli.run("put", "-c", "3", "big.bin", port=proxy.port)
        assert res.returncode == 0, res.stderr
        no_traceback(res)
        assert "resumed" in res.stderr and "warning" not in res.stderr, res.stderr
        assert "sha256 verified" in res.stderr
        assert sha256(target) == sha256(src)
        assert proxy.up < SIZE * 0.8, (proxy.up, SIZE)
    finally:
        proxy.close()
    assert_ledger_matches_disk(mcli.server, mcli.user)


@pytest.mark.slow
def test_download_killed_then_resumed_receives_only_the_holes(mcli):
    make_file(mcli.user.home / "big.bin", SIZE)
    mcli.server.cli("quota", "scan", "alice")  # a file the server did not write: count it
    proxy = CountingProxy(mcli.server.port, delay=0.01)
    try:
        proc = mcli.spawn("get", "-c", "3", "big.bin", "local.bin", port=proxy.port)
        kill_when(proc, lambda: proxy.down > SIZE * 0.4)
        local = mcli.tmp / "local.bin"
        assert holes_below_data(local, mcli.user.home / "big.bin")

        proxy.reset()
        proxy.delay = 0
        res = mcli.run("get", "-c", "3", "big.bin", "local.bin", port=proxy.port)
        assert res.returncode == 0, res.stderr
        no_traceback(res)
        assert "resumed" in res.stderr and "warning" not in res.stderr, res.stderr
        assert sha256(local) == sha256(mcli.user.home / "big.bin")
        assert proxy.down < SIZE * 0.8, (proxy.down, SIZE)
    finally:
        proxy.close()


@pytest.mark.parametrize("mode", ["atomic", "atomic-resume"])
def test_atomic_upload_modes_stay_whole(mcli, mode):
    """In the atomic modes a truncating open writes a hidden temporary, which the other connections
    cannot open by name: the upload must still land whole (on fewer connections), never split
    between the temporary and the old file."""
    mcli.server.cli("user", "upload-mode", "alice", mode)
    src = make_file(mcli.tmp / "big.bin", SIZE)
    old = make_file(mcli.tmp / "old.bin", SIZE + 3 * MiB, seed=2)  # larger: a put must truncate it
    for what in (["old.bin", "big.bin"], ["big.bin", "big.bin"], ["--no-resume", "big.bin", "big.bin"]):
        res = mcli.run("put", "-c", "3", *what)
        assert res.returncode == 0, (what, res.stderr)
        no_traceback(res)
        assert "sha256 verified" in res.stderr
    assert sha256(mcli.user.home / "big.bin") == sha256(src)
    assert sorted(p.name for p in mcli.user.home.iterdir()) == ["big.bin"]
    assert_ledger_matches_disk(mcli.server, mcli.user)
    assert old.exists()


def test_quota_refusal_is_one_line_then_resumes(workers_server, tmp_path):
    """Over quota on any connection: exit 6, one line naming the kept partial; after the quota is
    raised the same command continues it, and the ledger equals a scan."""
    user = workers_server.add_user("bob", quota="10MiB")
    work = tmp_path / "w"
    work.mkdir()
    c = Cli(workers_server, user, work)
    src = make_file(work / "big.bin", 16 * MiB)
    res = c.run("put", "-c", "3", "big.bin")
    assert res.returncode == 6, res.stderr
    no_traceback(res)
    err = [line for line in res.stderr.strip().splitlines() if "trusted on first use" not in line]
    assert len(err) == 1 and "quota" in err[0].lower() and "partial file" in err[0], res.stderr
    assert_ledger_matches_disk(workers_server, user)

    workers_server.cli("user", "quota", "bob", "64MiB")
    res = c.run("put", "-c", "3", "big.bin")
    assert res.returncode == 0, res.stderr
    assert "resumed" in res.stderr and "sha256 verified" in res.stderr, res.stderr
    assert sha256(user.home / "big.bin") == sha256(src)
    assert_ledger_matches_disk(workers_server, user)


def test_a_prompted_password_is_asked_once(mcli):
    """On a terminal without $SSHFILES_PASSWORD the password is prompted for once, not per connection."""
    make_file(mcli.tmp / "big.bin", SIZE)
    env = {k: v for k, v in mcli.env.items() if k != "SSHFILES_PASSWORD"}
    cmd = " ".join(shlex.quote(a) for a in mcli.argv("put", "-c", "3", "big.bin"))
    proc = subprocess.Popen(["script", "-qec", cmd, "/dev/null"], env=env, cwd=mcli.tmp,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(4096), b"")))
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while b"password:" not in b"".join(chunks):  # typed before the prompt, getpass would flush it
            assert time.monotonic() < deadline and proc.poll() is None, b"".join(chunks)
            time.sleep(0.05)
        time.sleep(0.2)  # getpass has turned echo off and flushed by now
        proc.stdin.write((mcli.user.password + "\n").encode())
        proc.stdin.flush()
        assert proc.wait(120) == 0, b"".join(chunks)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    out = b"".join(chunks).decode(errors="replace")
    assert out.count("'s password:") == 1, out
    assert "over 3 connections" in out and "sha256 verified" in out, out


def test_default_connections_are_two_for_a_large_download_and_one_otherwise(mcli):
    """``--connections auto`` is the default: a download of AUTO_MIN_SIZE or more moves over
    AUTO_CONNECTIONS connections (one more login); an upload, and a smaller download, over the
    first connection alone; all verified. A bad value is one usage line."""
    from sshfiles.client.multiconn import AUTO_CONNECTIONS, AUTO_MIN_SIZE

    assert AUTO_CONNECTIONS == 2
    big = make_file(mcli.tmp / "big.bin", AUTO_MIN_SIZE + 12345)
    small = make_file(mcli.tmp / "small.bin", SIZE, seed=3)
    before = logins(mcli.server, "alice")
    res = mcli.run("put", "big.bin", "small.bin", ".")
    assert res.returncode == 0, res.stderr
    no_traceback(res)
    puts = [line for line in res.stderr.splitlines() if line.startswith("put ")]
    assert len(puts) == 2 and all("verified" in p and " over " not in p for p in puts), res.stderr
    assert logins(mcli.server, "alice") - before == 1, mcli.server.log()
    assert sha256(mcli.user.home / "big.bin") == sha256(big)
    assert sha256(mcli.user.home / "small.bin") == sha256(small)

    (mcli.tmp / "back").mkdir()
    res = mcli.run("get", "big.bin", "small.bin", "back")
    assert res.returncode == 0, res.stderr
    lines = {line.split(" ", 2)[1]: line for line in res.stderr.splitlines() if line.startswith("get ")}
    assert "over 2 connections" in lines["big.bin"] and "sha256 verified" in lines["big.bin"], res.stderr
    assert " over " not in lines["small.bin"] and "sha256 verified" in lines["small.bin"], res.stderr
    assert sha256(mcli.tmp / "back" / "big.bin") == sha256(big)
    assert sha256(mcli.tmp / "back" / "small.bin") == sha256(small)
    assert logins(mcli.server, "alice") - before == 1 + 2

    res = mcli.run("put", "-c", "many", "small.bin")
    assert res.returncode == 2 and "neither auto nor a count from 1 to 8" in res.stderr, res.stderr
    no_traceback(res)
