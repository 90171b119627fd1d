"""Shared (virtual) folders (issue 11) through a real `sshfiles serve` and stock clients.

A team folder mounted into two users' trees (one may write, one may only read), driven with OpenSSH
sftp/scp/ssh, paramiko and asyncssh: what one uploads the other lists and downloads, the reader cannot
write, both homes' quotas stay untouched and the folder's ledger equals a scan of its directory; two
users racing for a folder's last bytes; a symlink an admin planted in a folder; renames across a
mount; `df` inside a folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

import asyncssh
import paramiko
import pytest
from conftest import ServerHandle, User, make_server
from test_clients import make_file, need, ok
from test_quota import ledger

from sshfiles.atomic import RESERVED_PREFIX as PREFIX
from sshfiles.quota import scan_usage
from sshfiles.stores import folder_ledger
from sshfiles.stores.sqlite import SQLiteAccountStore

KiB = 1024


def folder_state(server: ServerHandle, name: str) -> tuple[int, int]:
    """(charged bytes, entries) of a folder's ledger, as the store holds them."""
    store = SQLiteAccountStore(server.accounts_dir)
    try:
        return store.charged(folder_ledger(name)), store.entries_state(folder_ledger(name))[2]
    finally:
        store.close()


def team(server: ServerHandle, quota: str = "1M") -> tuple[User, User, Path]:
    """alice (rw) and bob (read-only) with the folder 'team' at /shared/team; returns its host dir."""
    alice = server.add_user("alice")
    bob = server.add_user("bob")
    out = ok(server.cli("folder", "add", "team", "--quota", quota)).stdout
    assert "added folder team" in out
    path = server.homes_dir.parent / "folders" / "team"
    assert path.is_dir()
    server.cli("user", "folder", "add", "alice", "team", "/shared/team")
    server.cli("user", "folder", "add", "bob", "team", "/shared/team", "--perms", "list,download")
    return alice, bob, path


def paramiko_client(server: ServerHandle, user: User) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    transport = paramiko.Transport((server.host, server.port))
    transport.connect(username=user.name, password=user.password)
    sftp = paramiko.SFTPClient.from_transport(transport)
    assert sftp is not None
    return transport, sftp


def assert_folder_ledger_matches_disk(server: ServerHandle, name: str, path: Path) -> None:
    usage = scan_usage(path)
    for _ in range(100):  # settlements reach the store a moment after the close is answered
        if folder_state(server, name) == (usage.bytes, usage.entries):
            return
        asyncio.run(asyncio.sleep(0.05))
    assert folder_state(server, name) == (usage.bytes, usage.entries)


def test_cli_manages_folders_and_mounts(server: ServerHandle, tmp_path: Path) -> None:
    server.add_user("alice")
    custom = tmp_path / "elsewhere" / "reports"
    custom.mkdir(parents=True)
    (custom / "existing.txt").write_bytes(b"x" * 100)
    ok(server.cli("folder", "add", "reports", "--path", str(custom), "--files", "10"))
    ok(server.cli("folder", "add", "team"))
    listing = ok(server.cli("folder", "list")).stdout.splitlines()
    assert listing[0].split()[:4] == ["NAME", "QUOTA", "USED", "FILES"]
    reports = next(line for line in listing if line.startswith("reports"))
    assert "100 B" in reports and "1/10" in reports and str(custom) in reports  # adopted and scanned
    assert "unlimited" in next(line for line in listing if line.startswith("team"))
    assert server.cli("folder", "add", "team", check=False).returncode == 1
    ok(server.cli("user", "folder", "add", "alice", "reports", "/shared/reports", "--perms", "list,download"))
    bad = server.cli("user", "folder", "add", "alice", "team", "/shared/reports/sub", check=False)
    assert bad.returncode == 1 and "overlap" in bad.stderr and "Traceback" not in bad.stderr
    bad = server.cli("user", "folder", "add", "alice", "team", "/t", "--perms", "fly", check=False)
    assert bad.returncode == 1 and "unknown permission" in bad.stderr
    assert ok(server.cli("user", "folder", "list", "alice")).stdout == "/shared/reports\treports\tlist,download\n"
    ok(server.cli("user", "folder", "remove", "alice", "/shared/reports/"))
    assert ok(server.cli("user", "folder", "list", "alice")).stdout == ""
    ok(server.cli("folder", "remove", "reports"))
    assert (custom / "existing.txt").exists()  # the files stay
    assert "reports" not in ok(server.cli("folder", "list")).stdout


def test_team_folder_shared_between_a_writer_and_a_reader(server: ServerHandle, tmp_path: Path) -> None:
    need("sftp", "scp", "sshpass")
    alice, bob, folder = team(server)
    report = make_file(tmp_path / "report.bin", 150 * KiB)
    digest = hashlib.sha256(report.read_bytes()).hexdigest()
    # alice uploads with OpenSSH sftp and scp; the mount shows as a directory in its parent's listing
    res = ok(server.sftp_batch(alice, f"ls /shared\nput {report} /shared/team/report.bin\nmkdir /shared/team/sub\n"
                                      "ls -l /shared/team\n", cwd=tmp_path))
    assert "team" in res.stdout and "report.bin" in res.stdout
    ok(server.openssh("scp", alice, [str(report), f"alice@{server.host}:/shared/team/sub/copy.bin"]))
    assert (folder / "report.bin").read_bytes() == report.read_bytes()
    assert (folder / "sub" / "copy.bin").exists()
    assert not any(alice.home.iterdir())  # nothing landed in the home
    # bob lists and downloads it (sftp, scp, and an exec hash as rclone checks it)
    down = tmp_path / "down"
    down.mkdir()
    res = ok(server.sftp_batch(bob, "cd /shared/team\nls\nget report.bin\n", cwd=down))
    assert "report.bin" in res.stdout and (down / "report.bin").read_bytes() == report.read_bytes()
    ok(server.openssh("scp", bob, [f"bob@{server.host}:/shared/team/sub/copy.bin", str(down / "copy.bin")]))
    assert (down / "copy.bin").read_bytes() == report.read_bytes()
    res = ok(server.openssh("ssh", bob, [f"bob@{server.host}", "sha256sum /shared/team/report.bin"]))
    assert res.stdout == f"{digest}  /shared/team/report.bin\n"
    before = sorted((p.relative_to(folder), p.stat().st_size) for p in folder.rglob("*"))
    # bob may not write in any way: each verb fails cleanly and changes nothing
    for cmd in [f"put {report} /shared/team/bob.bin", "rm /shared/team/report.bin", "mkdir /shared/team/b",
                "rename /shared/team/report.bin /shared/team/r2.bin", "chmod 600 /shared/team/report.bin"]:
        res = server.sftp_batch(bob, cmd + "\n", cwd=tmp_path)
        assert res.returncode != 0 and "Permission denied" in res.stderr, (cmd, res.stderr)
    res = server.openssh("scp", bob, [str(report), f"bob@{server.host}:/shared/team/scp.bin"])
    assert res.returncode != 0
    transport, sftp = paramiko_client(server, bob)
    try:
        with pytest.raises(PermissionError):
            sftp.open("/shared/team/report.bin", "r+")
        assert sorted(sftp.listdir("/shared/team")) == ["report.bin", "sub"]
    finally:
        transport.close()
    assert sorted((p.relative_to(folder), p.stat().st_size) for p in folder.rglob("*")) == before
    # the bytes are the folder's: both homes' ledgers untouched, the folder's equals a scan of it
    assert ledger(server, "alice") == 0 and ledger(server, "bob") == 0
    assert_folder_ledger_matches_disk(server, "team", folder)
    assert folder_state(server, "team") == (300 * KiB, 3)
    log = server.log()
    assert "path=/shared/team/report.bin direction=upload" in log  # the log names the user's path


def test_two_users_racing_for_a_folders_last_bytes_never_over_admit(workers_server: ServerHandle) -> None:
    server = workers_server
    alice = server.add_user("alice")
    bob = server.add_user("bob")
    server.cli("folder", "add", "team", "--quota", "256K")
    folder = server.homes_dir.parent / "folders" / "team"
    for u in (alice, bob):
        server.cli("user", "folder", "add", u.name, "team", "/team")
    chunk = b"z" * (16 * KiB)

    async def fill(user: User, tag: str) -> int:
        """Write 16 KiB pieces into several files until the folder's quota refuses; bytes written."""
        written = 0
        async with server.sftp(user) as sftp:
            for i in range(4):
                async with sftp.open(f"/team/{tag}{i}.bin", "wb") as f:
                    for _ in range(8):
                        try:
                            await f.write(chunk)
                        except asyncssh.SFTPError:
                            return written
                        written += len(chunk)
        return written

    async def race() -> list[int]:
        return list(await asyncio.gather(fill(alice, "a"), fill(bob, "b")))

    wins = asyncio.run(race())
    usage = scan_usage(folder)
    assert usage.bytes == sum(wins) <= 256 * KiB  # never over-admitted, every admitted byte is on disk
    # the other worker's unused reservation may still hold a last piece when one is refused (as for a
    # user's quota across workers): never more than one piece short
    assert usage.bytes >= 256 * KiB - 2 * len(chunk)
    assert_folder_ledger_matches_disk(server, "team", folder)
    assert ledger(server, "alice") == 0 and ledger(server, "bob") == 0


def test_admin_symlink_inside_a_folder_is_not_followed_out(server: ServerHandle, outside: Path,
                                                           tmp_path: Path) -> None:
    alice, _bob, folder = team(server)
    os.symlink(outside, folder / "escape")
    os.symlink("../../../../../..", folder / "up")
    transport, sftp = paramiko_client(server, alice)
    try:
        for path in ["/shared/team/escape", "/shared/team/up/" + outside.name,
                     "/shared/team/../../" + outside.name, "/shared/team/up/homes/bob"]:
            try:
                with sftp.open(path, "r") as f:
                    data = f.read()
            except OSError:
                continue
            assert outside.read_bytes() not in data, path
        # a `..` or an absolute symlink inside the folder resolves inside the folder
        assert sftp.normalize("/shared/team/up") == "/shared/team"
        with sftp.open("/shared/team/up/inside.txt", "w") as f:
            f.write(b"stays in the folder")
    finally:
        transport.close()
    assert (folder / "inside.txt").read_bytes() == b"stays in the folder"
    assert outside.read_text() == "TOP SECRET host data\n"


def test_rename_across_a_mount_is_refused_and_the_mount_point_stays(server: ServerHandle, tmp_path: Path) -> None:
    alice, _bob, folder = team(server)
    server.cli("folder", "add", "other")
    server.cli("user", "folder", "add", "alice", "other", "/other")
    (alice.home / "mine.txt").write_bytes(b"home file")
    (folder / "theirs.txt").write_bytes(b"folder file")
    server.cli("quota", "scan", "alice")
    assert ok(server.cli("folder", "scan", "team")).stdout == "team: 11 B used (was 0 B)\n"
    transport, sftp = paramiko_client(server, alice)
    try:
        for old, new in [("/mine.txt", "/shared/team/mine.txt"), ("/shared/team/theirs.txt", "/theirs.txt"),
                         ("/shared/team/theirs.txt", "/other/theirs.txt")]:
            with pytest.raises(OSError, match="cannot move between a folder and the home; copy instead"):
                sftp.rename(old, new)
            with pytest.raises(OSError, match="cannot move between a folder and the home"):
                sftp.posix_rename(old, new)
        for op, args in [(sftp.rename, ("/shared/team", "/x")), (sftp.rename, ("/shared", "/x")),
                         (sftp.rmdir, ("/shared/team",)), (sftp.rmdir, ("/shared",)),
                         (sftp.remove, ("/shared/team",)), (sftp.chmod, ("/shared/team", 0o700))]:
            with pytest.raises(PermissionError, match="mount point"):
                op(*args)
        with pytest.raises(PermissionError, match="mount point"):
            sftp.rename("/mine.txt", "/shared/team")
        # inside one tree renames work as ever
        sftp.rename("/shared/team/theirs.txt", "/shared/team/renamed.txt")
        assert sorted(sftp.listdir("/")) == ["mine.txt", "other", "shared"]
        assert sftp.stat("/shared").st_mode is not None and sftp.normalize("/shared/team/.") == "/shared/team"
    finally:
        transport.close()
    assert (alice.home / "mine.txt").read_bytes() == b"home file"
    assert (folder / "renamed.txt").read_bytes() == b"folder file"
    assert_folder_ledger_matches_disk(server, "team", folder)
    assert ledger(server, "alice") == len(b"home file")


def test_df_inside_a_folder_shows_the_folders_quota(server: ServerHandle, tmp_path: Path) -> None:
    need("sftp", "sshpass")
    alice = server.add_user("alice", quota=str(10 * 1024 * KiB))
    server.cli("folder", "add", "team", "--quota", str(2 * 1024 * KiB))
    server.cli("user", "folder", "add", "alice", "team", "/shared/team")
    make_file(tmp_path / "half.bin", 1024 * KiB)
    ok(server.sftp_batch(alice, f"put {tmp_path / 'half.bin'} /shared/team/half.bin\n", cwd=tmp_path))

    async def vfs() -> tuple[asyncssh.SFTPVFSAttrs, asyncssh.SFTPVFSAttrs]:
        async with server.sftp(alice) as sftp:
            return await sftp.statvfs("/"), await sftp.statvfs("/shared/team/half.bin")

    home, shared = asyncio.run(vfs())
    assert home.blocks * home.frsize == 10 * 1024 * KiB and home.bfree == home.blocks
    assert shared.blocks * shared.frsize == 2 * 1024 * KiB and shared.bfree * shared.frsize == 1024 * KiB
    res = ok(server.sftp_batch(alice, "cd /shared/team\ndf\n", cwd=tmp_path))
    # OpenSSH prints KiB: Size Used Avail (root) %Capacity
    assert res.stdout.split("\n")[-2].split()[:3] == ["2048", "1024", "1024"], res.stdout


def test_atomic_upload_into_a_folder_and_a_crash_mid_upload(tmp_path: Path, host_keys_dir: Path) -> None:
    """An atomic upload into a folder is invisible to the other user until it completes; a server killed
    mid-upload leaves a temporary that the next start removes, and the folder's ledger equals its disk."""
    server = make_server(tmp_path, host_keys_dir, ("--upload-mode", "atomic", "--workers", "2"))
    alice = server.add_user("alice")
    bob = server.add_user("bob")
    server.cli("folder", "add", "team", "--quota", "1M")
    folder = server.homes_dir.parent / "folders" / "team"
    server.cli("user", "folder", "add", "alice", "team", "/shared/team")
    server.cli("user", "folder", "add", "bob", "team", "/shared/team", "--perms", "list,download")
    server.start()
    try:
        async def upload_seen_only_when_done() -> None:
            async with server.sftp(alice) as a, server.sftp(bob) as b:
                async with a.open("/shared/team/done.bin", "wb") as f:
                    await f.write(b"d" * 50_000)
                    assert sorted(await b.listdir("/shared/team")) == [".", ".."]
                assert "done.bin" in await b.listdir("/shared/team")
                f = await a.open("/shared/team/broken.bin", "wb")
                await f.write(b"b" * 70_000)  # never closed: the server dies under it
                assert [p.name for p in folder.iterdir() if p.name.startswith(PREFIX)]  # the temporary
                server.kill()

        with contextlib.suppress(OSError, asyncssh.Error):
            asyncio.run(upload_seen_only_when_done())
        assert [p.name for p in folder.iterdir() if p.name.startswith(PREFIX)]  # left behind by the crash
        server.start()
        assert not [p.name for p in folder.iterdir() if p.name.startswith(PREFIX)]
        assert sorted(p.name for p in folder.iterdir()) == ["done.bin"]
        assert_folder_ledger_matches_disk(server, "team", folder)
        assert folder_state(server, "team") == (50_000, 1)
        assert ledger(server, "alice") == 0
    finally:
        server.stop()


def test_hooks_name_the_users_path_in_a_folder(tmp_path: Path, host_keys_dir: Path) -> None:
    from test_hooks import recorder, wait_events

    cmd, events = recorder(tmp_path)
    server = make_server(tmp_path, host_keys_dir, ("--on-upload", cmd, "--on-rename", cmd))
    alice = server.add_user("alice")
    server.cli("folder", "add", "team")
    folder = (server.homes_dir.parent / "folders" / "team").resolve()
    server.cli("user", "folder", "add", "alice", "team", "/shared/team")
    server.start()
    try:
        transport, sftp = paramiko_client(server, alice)
        try:
            with sftp.open("/shared/team/x.bin", "w") as f:
                f.write(b"x" * 1234)
            wait_events(events, 1)
            sftp.rename("/shared/team/x.bin", "/shared/team/y.bin")
        finally:
            transport.close()
        up, ren = wait_events(events, 2)
        assert (up["SSHFILES_EVENT"], up["SSHFILES_PATH"], up["SSHFILES_HOST_PATH"], up["SSHFILES_BYTES"]) == (
            "upload", "/shared/team/x.bin", f"{folder}/x.bin", "1234")
        assert (ren["SSHFILES_PATH"], ren["SSHFILES_TARGET"], ren["SSHFILES_HOST_TARGET"]) == (
            "/shared/team/x.bin", "/shared/team/y.bin", f"{folder}/y.bin")
    finally:
        server.stop()


def test_check_file_and_copy_data_work_across_the_mount(server: ServerHandle) -> None:
    """check-file (by name and by handle) hashes a folder's file; copy-data from the home into a folder
    charges the folder, and from a folder into the home the user; a reader cannot copy into the folder."""
    from sshfiles.client.transfer import check_file

    alice, bob, folder = team(server)
    data = os.urandom(70_000)
    (alice.home / "src.bin").write_bytes(data)
    server.cli("quota", "scan", "alice")

    async def run() -> None:
        async with server.sftp(alice) as sftp:
            await sftp.remote_copy("/src.bin", "/shared/team/copy.bin")
            alg, [digest] = await check_file(sftp, b"/shared/team/copy.bin", by_handle=False, algorithms="sha256")
            assert (alg, digest) == ("sha256", hashlib.sha256(data).digest())
            async with sftp.open("/shared/team/copy.bin", "rb") as f:
                _, [again] = await check_file(sftp, f.handle, by_handle=True, algorithms="sha256")
            assert again == digest
            await sftp.remote_copy("/shared/team/copy.bin", "/back.bin")
        async with server.sftp(bob) as sftp:
            _, [seen] = await check_file(sftp, b"/shared/team/copy.bin", by_handle=False, algorithms="sha256")
            assert seen == digest
            with pytest.raises(asyncssh.SFTPError):
                await sftp.remote_copy("/shared/team/copy.bin", "/shared/team/bob.bin")

    asyncio.run(run())
    assert (folder / "copy.bin").read_bytes() == data == (alice.home / "back.bin").read_bytes()
    assert not (folder / "bob.bin").exists()
    assert_folder_ledger_matches_disk(server, "team", folder)
    assert folder_state(server, "team") == (70_000, 1)
    assert ledger(server, "alice") == 140_000 and ledger(server, "bob") == 0


def test_drop_box_folder_answers_only_for_the_connections_own_uploads(server: ServerHandle) -> None:
    """A folder mounted upload-only: the uploader cannot list it, but may check its own upload's size
    and hash on the same connection (clients do; rclone over an exec channel); another connection may not."""
    alice = server.add_user("alice")
    server.cli("folder", "add", "inbox")
    server.cli("user", "folder", "add", "alice", "inbox", "/drop", "--perms", "upload")
    data = b"report" * 1000

    async def run() -> None:
        async with server.connect(alice) as conn:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open("/drop/r.txt", "wb") as f:
                    await f.write(data)
                assert (await sftp.stat("/drop/r.txt")).size == len(data)
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    await sftp.listdir("/drop")
            res = await conn.run("sha256sum /drop/r.txt")
            assert res.stdout == f"{hashlib.sha256(data).hexdigest()}  /drop/r.txt\n", res.stderr
        async with server.connect(alice) as conn:
            res = await conn.run("sha256sum /drop/r.txt")
            assert res.exit_status != 0 and "Permission denied" in str(res.stderr)
            async with conn.start_sftp_client() as sftp:
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    await sftp.stat("/drop/r.txt")

    asyncio.run(run())
