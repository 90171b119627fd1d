"""Atomic uploads (`--upload-mode atomic|atomic-resume`, atomic.py), against a real `sshfiles serve`.

Each test uploads the way a user's client does (OpenSSH sftp, paramiko, asyncssh, sshfiles-cli) and
looks from another session, the way automation watching the directory would: mid-upload the name
shows the old file (or nothing), listings never show the temporary, and after every test the ledger
equals a scan of the home.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import paramiko
import pytest
from conftest import ServerHandle, User, make_server
from test_quota import assert_ledger_matches_disk, run
from test_quota_exact import assert_entries_match_disk

PREFIX = ".sshfiles-upload-"


@contextlib.contextmanager
def serving(tmp_path: Path, host_keys_dir: Path, *args: str) -> Iterator[ServerHandle]:
    h = make_server(tmp_path, host_keys_dir, tuple(args))
    h.start()
    try:
        yield h
    finally:
        h.stop()


def temporaries(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob(PREFIX + "*"))


def assert_exact(server: ServerHandle, user: User) -> None:
    assert_ledger_matches_disk(server, user)
    assert_entries_match_disk(server, user)


def paramiko_client(server: ServerHandle, user: User) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    sock = socket.create_connection((server.host, server.port))
    t = paramiko.Transport(sock)
    t.connect(username=user.name, pkey=paramiko.Ed25519Key.from_private_key_file(str(user.key_path)))
    return t, paramiko.SFTPClient.from_transport(t)


def interrupted_paramiko_upload(server: ServerHandle, user: User, path: str, data: bytes) -> None:
    """Write `data` to `path` and vanish without closing the file (the connection just drops)."""
    t, sftp = paramiko_client(server, user)
    f = sftp.open(path, "wb")
    f.set_pipelined(False)
    f.write(data)
    f.flush()
    sftp.stat("/")  # a round trip: every write before it has been handled
    t.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    t.close()


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


# -- atomic -----------------------------------------------------------------------------------


def test_atomic_upload_is_invisible_to_another_session_until_it_closes(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir, "--upload-mode", "atomic") as server:
        user = server.add_user("ada", password=None, quota="10MiB", key=True)
        old, new = b"old report\n" * 100, b"NEW" * 100_000

        async def scenario() -> None:
            async with server.sftp(user) as writer, server.sftp(user) as watcher:
                async with writer.open("report.csv", "wb") as f:
                    await f.write(old)
                async with writer.open("report.csv", "wb") as f:      # replace it, atomically
                    await f.write(new[:150_000])
                    # mid-upload: the other session sees the old file, and no temporary anywhere
                    assert (await watcher.stat("report.csv")).size == len(old)
                    async with watcher.open("report.csv", "rb") as r:
                        assert await r.read() == old
                    assert sorted(await watcher.listdir(".")) == [".", "..", "report.csv"]
                    assert temporaries(user.home), "the upload is written under a temporary name"
                    await f.write(new[150_000:], 150_000)
                async with watcher.open("report.csv", "rb") as r:
                    assert await r.read() == new
                async with writer.open("fresh.bin", "wb") as f:        # a new file: absent until done
                    await f.write(b"x" * 1000)
                    with pytest.raises(asyncssh.SFTPNoSuchFile):
                        await watcher.stat("fresh.bin")
                assert (await watcher.stat("fresh.bin")).size == 1000

        run(scenario())
        assert temporaries(user.home) == []
        assert (user.home / "report.csv").read_bytes() == new
        assert_exact(server, user)


def test_atomic_openssh_put_and_an_interrupted_paramiko_upload(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir, "--upload-mode", "atomic") as server:
        user = server.add_user("bob", password=None, quota="10MiB", key=True)
        local = tmp_path / "data.bin"
        local.write_bytes(os.urandom(700_000))
        res = server.sftp_batch(user, f"put {local} data.bin\nput {local} data.bin\n")
        assert res.returncode == 0, res.stderr
        assert (user.home / "data.bin").read_bytes() == local.read_bytes()

        interrupted_paramiko_upload(server, user, "data.bin", b"partial" * 10_000)
        interrupted_paramiko_upload(server, user, "never.bin", b"partial" * 10_000)
        wait_for(lambda: "result=interrupted" in server.log() and not temporaries(user.home))
        # the interrupted replacement changed nothing; the interrupted new file does not exist
        assert (user.home / "data.bin").read_bytes() == local.read_bytes()
        assert not (user.home / "never.bin").exists()
        assert_exact(server, user)


def test_reserved_names_cannot_be_seen_created_or_reached(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir, "--upload-mode", "atomic") as server:
        user = server.add_user("eve", password=None, quota="10MiB", key=True)
        planted = user.home / (PREFIX + "t0123456789abcdef-x")  # as if an upload were in progress
        planted.write_bytes(b"in progress")
        (user.home / "d").mkdir()

        async def attack() -> None:
            async with server.sftp(user) as sftp:
                assert PREFIX + "t0123456789abcdef-x" not in await sftp.listdir(".")
                for path in (planted.name, "/" + planted.name, "d/../" + planted.name):
                    with pytest.raises(asyncssh.SFTPNoSuchFile):
                        await sftp.stat(path)
                    with pytest.raises(asyncssh.SFTPNoSuchFile):
                        await sftp.open(path, "rb")
                    with pytest.raises(asyncssh.SFTPNoSuchFile):
                        await sftp.open(path, "wb")
                    with pytest.raises(asyncssh.SFTPNoSuchFile):
                        await sftp.remove(path)
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await sftp.open(PREFIX + "mine", "wb")
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await sftp.mkdir("d/" + PREFIX + "dir")
                async with sftp.open("ok.txt", "wb") as f:
                    await f.write(b"ok")
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await sftp.posix_rename("ok.txt", planted.name)
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await sftp.rename("ok.txt", "d/" + PREFIX + "p-ok.txt")

        run(attack())
        assert planted.read_bytes() == b"in progress"
        assert sorted(p.name for p in user.home.iterdir()) == sorted([planted.name, "d", "ok.txt"])


def test_per_user_mode_from_the_store_applies_to_new_sessions(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir) as server:  # the server's default stays standard
        user = server.add_user("cid", password=None, quota="10MiB", key=True)
        res = server.cli("user", "upload-mode", "cid", "atomik", check=False)
        assert res.returncode == 1 and "expected one of standard, atomic, atomic-resume" in res.stderr
        assert server.cli("user", "upload-mode", "cid").stdout.startswith("default")
        server.cli("user", "upload-mode", "cid", "atomic")
        assert server.cli("user", "upload-mode", "cid").stdout == "atomic\n"

        async def upload_and_peek() -> bool:
            async with server.sftp(user) as sftp:
                async with sftp.open("a.bin", "wb") as f:
                    await f.write(b"a" * 10)
                    return bool(temporaries(user.home))

        assert run(upload_and_peek()) is True
        server.cli("user", "upload-mode", "cid", "default")
        assert run(upload_and_peek()) is False
        assert_exact(server, user)


# -- atomic-resume ----------------------------------------------------------------------------


def test_atomic_resume_keeps_the_partial_and_sshfiles_cli_resumes_it(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir, "--upload-mode", "atomic-resume") as server:
        user = server.add_user("dan", quota="10MiB")
        local = tmp_path / "big.iso"
        local.write_bytes(os.urandom(2_000_000))
        # the first attempt dies after 600 kB (paramiko, password login)
        sock = socket.create_connection((server.host, server.port))
        t = paramiko.Transport(sock)
        t.connect(username=user.name, password=user.password)
        sftp = paramiko.SFTPClient.from_transport(t)
        f = sftp.open("big.iso", "wb")
        f.write(local.read_bytes()[:600_000])
        f.flush()
        sftp.stat("/")
        sock.shutdown(socket.SHUT_RDWR)
        t.close()
        wait_for(lambda: "result=interrupted" in server.log())
        assert temporaries(user.home) == [PREFIX + "p-big.iso"]
        assert not (user.home / "big.iso").exists()

        async def peek() -> None:
            async with server.sftp(user) as other:
                assert "big.iso" not in await other.listdir(".")
                assert (await other.stat("big.iso")).size == 600_000  # what a resuming client needs

        run(peek())
        assert_exact(server, user)
        env = dict(os.environ, SSHFILES_PASSWORD=user.password or "", PYTHONPATH=str(Path(__file__).parents[1]))
        res = subprocess.run([sys.executable, "-m", "sshfiles.client.cli", "--host", server.host, "--port", str(server.port),
                              "-u", user.name, "--known-hosts", str(tmp_path / "kh"), "put", str(local), "big.iso"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0, res.stderr + res.stdout
        assert "resumed at" in res.stdout + res.stderr
        assert (user.home / "big.iso").read_bytes() == local.read_bytes()
        assert temporaries(user.home) == []
        assert_exact(server, user)


def test_atomic_resume_with_openssh_reput(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir, "--upload-mode", "atomic-resume") as server:
        user = server.add_user("fay", password=None, quota="10MiB", key=True)
        local = tmp_path / "video.mp4"
        local.write_bytes(os.urandom(1_500_000))
        interrupted_paramiko_upload(server, user, "video.mp4", local.read_bytes()[:500_000])
        wait_for(lambda: "result=interrupted" in server.log())
        assert (user.home / (PREFIX + "p-video.mp4")).stat().st_size == 500_000
        res = server.sftp_batch(user, f"reput {local} video.mp4\n")
        assert res.returncode == 0, res.stderr
        assert (user.home / "video.mp4").read_bytes() == local.read_bytes()
        assert temporaries(user.home) == []
        assert_exact(server, user)


def test_restart_removes_atomic_temporaries_and_keeps_recent_partials(tmp_path, host_keys_dir):
    h = make_server(tmp_path, host_keys_dir, ("--upload-mode", "atomic-resume"))
    h.start()
    try:
        resumer = h.add_user("gil", password=None, quota="10MiB", key=True)
        strict = h.add_user("hal", password=None, quota="10MiB", key=True)
        h.cli("user", "upload-mode", "hal", "atomic")
        interrupted_paramiko_upload(h, resumer, "keep.bin", b"k" * 50_000)
        wait_for(lambda: "result=interrupted" in h.log())
        h.kill()  # a crash: hal's upload in progress is left behind as a temporary
        (strict.home / (PREFIX + "t00112233445566778-lost.bin")).write_bytes(b"l" * 30_000)
        (resumer.home / "sub").mkdir()
        stale = resumer.home / "sub" / (PREFIX + "p-stale.bin")
        stale.write_bytes(b"s" * 20_000)
        os.utime(stale, (time.time() - 8 * 86400,) * 2)
        h.cli("quota", "scan")  # the ledger counts them now, as it would have while they were written
        h.start()
        assert temporaries(resumer.home) == [PREFIX + "p-keep.bin"]
        assert temporaries(strict.home) == []
        assert "removed upload temporaries of hal" in h.log()
        assert_exact(h, resumer)
        assert_exact(h, strict)
    finally:
        h.stop()


def test_atomic_replacement_near_the_quota_needs_room_for_both(tmp_path, host_keys_dir):
    """While the replacement is written, the old file still exists: both are charged, as on disk."""
    with serving(tmp_path, host_keys_dir, "--upload-mode", "atomic") as server:
        user = server.add_user("ivy", password=None, quota="100KiB", key=True)

        async def scenario() -> None:
            async with server.sftp(user) as sftp:
                async with sftp.open("f.bin", "wb") as f:
                    await f.write(b"a" * 60_000)
                with pytest.raises(asyncssh.SFTPError, match="quota exceeded"):
                    async with sftp.open("f.bin", "wb") as f:
                        await f.write(b"b" * 60_000)
                async with sftp.open("f.bin", "rb") as f:
                    assert await f.read() == b"a" * 60_000  # the failed replacement changed nothing
                async with sftp.open("f.bin", "wb") as f:
                    await f.write(b"c" * 30_000)

        run(scenario())
        assert (user.home / "f.bin").read_bytes() == b"c" * 30_000
        assert temporaries(user.home) == []
        assert_exact(server, user)


@pytest.mark.parametrize("mode", ["atomic", "atomic-resume"])
@pytest.mark.parametrize("protocol", ["scp", "sftp"])
def test_an_interrupted_scp_upload_never_appears_under_its_name(tmp_path, host_keys_dir, mode, protocol):
    """OpenSSH scp killed mid-file: with -O (asyncssh's SCP server) replacing a file, and in its default
    SFTP mode creating one (that mode writes an existing file in place: see the README)."""
    with serving(tmp_path, host_keys_dir, "--upload-mode", mode) as server:
        user = server.add_user("kim", password=None, quota="100MiB", key=True)
        (user.home / "movie.bin").write_bytes(b"old")
        server.cli("quota", "scan", user.name)
        local = tmp_path / "movie.bin"
        local.write_bytes(os.urandom(8_000_000))
        target = "movie.bin" if protocol == "scp" else "new.bin"
        cmd = ["scp", "-P", str(server.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
               "-i", str(user.key_path), "-l", "2000", *server.ssh_opts(), str(local),
               f"{user.name}@{server.host}:{target}"]
        if protocol == "scp":
            cmd.insert(1, "-O")  # the classic SCP protocol, not SFTP
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: any(p.stat().st_size > 100_000 for p in user.home.glob(PREFIX + "*")), 20)
        finally:
            proc.kill()
            proc.wait()
        wait_for(lambda: "result=interrupted" in server.log())
        assert (user.home / "movie.bin").read_bytes() == b"old"
        assert not (user.home / "new.bin").exists()
        assert len(temporaries(user.home)) == (1 if mode == "atomic-resume" else 0)
        assert_exact(server, user)


def test_two_resumable_uploads_of_one_name_at_once_are_refused(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir, "--upload-mode", "atomic-resume") as server:
        user = server.add_user("lou", password=None, quota="10MiB", key=True)

        async def scenario() -> None:
            async with server.sftp(user) as one, server.sftp(user) as two:
                async with one.open("same.bin", "wb") as f:
                    await f.write(b"1" * 1000)
                    with pytest.raises(asyncssh.SFTPError, match="Another upload of this file is in progress"):
                        await two.open("same.bin", "wb")
                async with two.open("same.bin", "wb") as f:  # once the first is done, a new one may start
                    await f.write(b"2" * 10)

        run(scenario())
        assert (user.home / "same.bin").read_bytes() == b"2" * 10
        assert_exact(server, user)


def test_atomic_resume_with_lftp_put_continue(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir, "--upload-mode", "atomic-resume") as server:
        user = server.add_user("max", quota="10MiB", key=True)  # a password for lftp, a key for paramiko
        local = tmp_path / "local"
        local.mkdir()
        (local / "log.tar").write_bytes(os.urandom(1_200_000))
        data = (local / "log.tar").read_bytes()
        interrupted_paramiko_upload(server, user, "log.tar", data[:700_000])
        wait_for(lambda: "result=interrupted" in server.log())
        connect = ("ssh -a -x -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "
                   "-o PubkeyAuthentication=no")
        commands = "; ".join([f'set sftp:connect-program "{connect}"', "set net:max-retries 1",
                              "set cmd:fail-exit yes", "put -c log.tar", "quit"])
        res = subprocess.run(["lftp", "-u", f"{user.name},{user.password}", "-p", str(server.port), "-e", commands,
                              f"sftp://{server.host}"], cwd=local, capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stderr
        assert (user.home / "log.tar").read_bytes() == data
        assert temporaries(user.home) == []
        assert re.search(r"path=/log\.tar direction=upload bytes=500000 .*result=ok", server.log()), server.log()
        assert_exact(server, user)


@pytest.mark.parametrize("mode", ["standard", "atomic", "atomic-resume"])
def test_what_another_session_sees_during_an_openssh_sftp_put(tmp_path, host_keys_dir, mode):
    """OpenSSH `sftp put` replacing a file, slowed down (-l): another session looks while it runs."""
    with serving(tmp_path, host_keys_dir, "--upload-mode", mode) as server:
        user = server.add_user("ned", password=None, quota="20MiB", key=True)
        old = b"old contract\n" * 1000
        (user.home / "contract.pdf").write_bytes(old)
        server.cli("quota", "scan", user.name)
        local = tmp_path / "contract.pdf"
        local.write_bytes(os.urandom(3_000_000))
        cmd = ["sftp", "-P", str(server.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
               "-i", str(user.key_path), "-l", "8000", *server.ssh_opts(), "-b", "-", f"{user.name}@{server.host}"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdin is not None
        proc.stdin.write(f"put {local} contract.pdf\n")
        proc.stdin.close()
        try:
            def written() -> int:
                return max((p.stat().st_size for p in user.home.iterdir() if p.name != "contract.pdf" or
                            mode == "standard"), default=0)
            wait_for(lambda: written() > 200_000, 30)

            async def peek() -> tuple[int, list[str]]:
                async with server.sftp(user) as other:
                    return (await other.stat("contract.pdf")).size or 0, sorted(await other.listdir("."))

            size, listing = run(peek())
            assert listing == [".", "..", "contract.pdf"]
            if mode == "standard":
                assert size != len(old)  # the half-written file, under its name
            else:
                assert size == len(old)  # the old file until the upload completes
                assert (user.home / "contract.pdf").read_bytes() == old
        finally:
            assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        assert (user.home / "contract.pdf").read_bytes() == local.read_bytes()
        assert temporaries(user.home) == []
        assert_exact(server, user)


def test_workers_rename_each_upload_once_and_stay_exact(tmp_path, host_keys_dir):
    """With --workers 2 every connection may land on either process: each upload is renamed into place
    once, by the process that took it, its hook runs once, and the ledger (shared through the store)
    stays exact."""
    lines = tmp_path / "uploads.txt"
    hook = shlex.join(["sh", "-c", f'echo "$SSHFILES_PATH" >> {shlex.quote(str(lines))}'])
    with serving(tmp_path, host_keys_dir, "--workers", "2", "--upload-mode", "atomic", "--on-upload", hook) as server:
        user = server.add_user("ola", password=None, quota="10MiB", key=True)

        async def one(i: int) -> None:
            async with server.sftp(user, local_addr=(f"127.0.0.{10 + i}", 0)) as sftp:
                async with sftp.open("shared.bin", "wb") as f:  # all replace one name
                    await f.write(bytes([65 + i]) * (10_000 * (i + 1)))
                async with sftp.open(f"own{i}.bin", "wb") as f:
                    await f.write(b"o" * 5000)

        async def many() -> None:
            await asyncio.gather(*(one(i) for i in range(6)))

        run(many())
        assert temporaries(user.home) == []
        data = (user.home / "shared.bin").read_bytes()
        assert len(set(data)) == 1 and len(data) == 10_000 * (data[0] - 64)  # one whole upload, not a mix
        wait_for(lambda: lines.exists() and len(lines.read_text().splitlines()) >= 12)
        time.sleep(0.5)
        assert sorted(lines.read_text().splitlines()) == sorted(["/shared.bin"] * 6 + [f"/own{i}.bin" for i in range(6)])
        assert_exact(server, user)
