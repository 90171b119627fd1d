"""Per-user, per-directory permissions (issue 11) through a real `sshfiles serve` and stock clients.

A read-only user, an upload-only drop box, per-directory overrides and a change made while a session is
open, each driven the way a user meets it: OpenSSH sftp/scp/ssh, PuTTY psftp, lftp, rclone, paramiko and
asyncssh. Every refusal must change nothing: the files on disk and the quota ledger are compared before
and after.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import asyncssh
import pytest
from conftest import ServerHandle, User
from test_clients import _putty_args, known_hosts, make_file, need, ok, run
from test_quota import ledger, sftp_on_two_workers, user_row

KiB = 1024


def snapshot(home: Path) -> dict[str, str]:
    """Every entry below a home with its content hash (directories as 'dir')."""
    out = {}
    for p in sorted(home.rglob("*")):
        out[str(p.relative_to(home))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def seed(server: ServerHandle, user: User, files: dict[str, bytes]) -> None:
    """Files put in the home by the admin, then counted by the real `quota scan`."""
    for name, data in files.items():
        path = user.home / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    server.cli("quota", "scan", user.name)


def lftp(server: ServerHandle, user: User, commands: list[str], cwd: Path) -> object:
    connect = ("ssh -a -x -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "
               "-o PubkeyAuthentication=no")
    script = "; ".join([f'set sftp:connect-program "{connect}"', "set net:max-retries 1", "set net:timeout 20",
                        "set cmd:fail-exit yes", *commands, "quit"])
    return run(["lftp", "-u", f"{user.name},{user.password}", "-p", str(server.port), "-e", script,
                f"sftp://{server.host}"], cwd=cwd, timeout=90)


def psftp(server: ServerHandle, user: User, commands: list[str], cwd: Path) -> object:
    script = cwd / "script.psftp"
    script.write_text("\n".join([*commands, "quit", ""]))
    return run(["psftp", *_putty_args(server, user), "-b", str(script), f"{user.name}@{server.host}"], cwd=cwd)


def test_read_only_user_lists_and_gets_and_every_write_verb_fails_cleanly(server: ServerHandle,
                                                                            tmp_path: Path) -> None:
    need("sftp", "sshpass", "psftp", "ssh-keygen")
    paramiko = pytest.importorskip("paramiko")
    res = server.cli("user", "add", "reader", "--read-only", "--password-stdin", input="pw-reader-1\n")
    assert "read-only" in res.stdout
    user = User("reader", "pw-reader-1", server.homes_dir / "reader")
    seed(server, user, {"docs/report.txt": b"quarterly numbers\n", "big.bin": os.urandom(300 * KiB)})
    assert user_row(server, "reader")["PERMS"] == "read-only"
    assert server.cli("user", "perm", "list", "reader").stdout == "/\tlist,download\n"
    before, charged, files = snapshot(user.home), ledger(server, "reader"), user_row(server, "reader")["FILES"]
    local = tmp_path / "local"
    make_file(local / "up.txt", 1000)

    # OpenSSH sftp: list and get work; each write verb is refused (the '-' keeps the batch going).
    res = server.sftp_batch(user, "\n".join([
        "ls -l", "cd docs", "get report.txt", "cd /", "get big.bin",
        "-put up.txt", "-put up.txt docs/report.txt", "-reput up.txt big.bin", "-rm big.bin", "-mkdir new",
        "-rmdir docs", "-rename big.bin moved.bin", "-chmod 600 big.bin", "df", ""]), cwd=local)
    assert res.returncode == 0, res.stderr
    assert (local / "report.txt").read_bytes() == b"quarterly numbers\n"
    assert (local / "big.bin").read_bytes() == (user.home / "big.bin").read_bytes()
    for line in ('dest open "/up.txt": Permission denied', 'dest open "/docs/report.txt": Permission denied',
                 "remote delete /big.bin: Permission denied", 'remote mkdir "/new": Permission denied',
                 'remote rmdir "/docs": Permission denied', 'remote rename "/big.bin" to "/moved.bin": Permission denied',
                 'remote setstat "/big.bin": Permission denied'):
        assert line in res.stderr, res.stderr

    # PuTTY psftp: a refused put ends its batch with an error, and says why.
    res = psftp(server, user, ["put up.txt"], local)
    assert res.returncode != 0 and "permission" in (res.stdout + res.stderr).lower()
    ok(psftp(server, user, ["ls", "get docs/report.txt psftp.txt"], local))
    assert (local / "psftp.txt").read_bytes() == b"quarterly numbers\n"

    # paramiko: each refusal is PERMISSION_DENIED (errno 13) with a one-line reason.
    transport = paramiko.Transport((server.host, server.port))
    try:
        transport.connect(username=user.name, password=user.password)
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sorted(sftp.listdir("/")) == ["big.bin", "docs"]
        for call in (lambda: sftp.open("/x.txt", "w"), lambda: sftp.open("/big.bin", "a"),
                     lambda: sftp.open("/big.bin", "r+"), lambda: sftp.remove("/big.bin"),
                     lambda: sftp.mkdir("/d"), lambda: sftp.posix_rename("/big.bin", "/b"),
                     lambda: sftp.truncate("/big.bin", 0), lambda: sftp.utime("/big.bin", (1, 1))):
            with pytest.raises(PermissionError) as info:
                call()
            assert "no " in str(info.value) and "permission" in str(info.value)
        with sftp.open("/big.bin", "r") as f:
            assert f.read(10) == (user.home / "big.bin").read_bytes()[:10]
    finally:
        transport.close()

    # Nothing changed: the files, the ledger, the entry count.
    assert snapshot(user.home) == before
    assert ledger(server, "reader") == charged and user_row(server, "reader")["FILES"] == files


def test_upload_only_drop_box_takes_uploads_and_gives_nothing_back(server: ServerHandle, tmp_path: Path) -> None:
    need("sftp", "scp", "ssh", "sshpass", "lftp", "psftp", "rclone", "ssh-keygen")
    server.cli("user", "add", "dropper", "--upload-only", "--password-stdin", input="pw-dropper-1\n")
    user = User("dropper", "pw-dropper-1", server.homes_dir / "dropper")
    seed(server, user, {"earlier.txt": b"someone's earlier upload\n"})
    local = tmp_path / "local"
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "f.txt"):
        make_file(local / name, 20 * KiB)

    # OpenSSH sftp: put (sftp stats the target first: refused quietly, then it uploads), then every
    # way of reading, listing, overwriting, resuming or deleting fails; a retry under a new name works.
    res = server.sftp_batch(user, "\n".join([
        "put a.txt", "-ls", "-get a.txt back.txt", "-get earlier.txt", "-put b.txt a.txt", "-put b.txt earlier.txt",
        "-reput a.txt", "-rm a.txt", "-rm earlier.txt", "-mkdir sub", "-rename a.txt z.txt", "put b.txt a-2.txt",
        ""]), cwd=local)
    assert res.returncode == 0, res.stderr
    assert 'remote readdir("/"): Permission denied' in res.stderr, res.stderr
    assert 'dest open "/a.txt": Permission denied' in res.stderr
    assert "remote delete /earlier.txt: Permission denied" in res.stderr
    assert not (local / "back.txt").exists() and not (local / "earlier.txt").exists()
    assert (user.home / "a.txt").read_bytes() == (local / "a.txt").read_bytes()
    assert (user.home / "a-2.txt").read_bytes() == (local / "b.txt").read_bytes()
    assert (user.home / "earlier.txt").read_bytes() == b"someone's earlier upload\n"

    # OpenSSH scp, SFTP mode and the legacy SCP protocol, both into the drop box; never back out.
    ok(server.openssh("scp", user, [str(local / "c.txt"), f"{user.name}@{server.host}:/"]))
    ok(server.openssh("scp", user, ["-O", str(local / "d.txt"), f"{user.name}@{server.host}:/"]))
    res = server.openssh("scp", user, ["-O", str(local / "d.txt"), f"{user.name}@{server.host}:/"])
    assert res.returncode != 0 and "no overwrite permission" in res.stderr, res.stderr
    for args in ([], ["-O"]):
        res = server.openssh("scp", user, [*args, f"{user.name}@{server.host}:/earlier.txt", str(local / "x.txt")])
        assert res.returncode != 0 and not (local / "x.txt").exists()
    # The exec hash commands obey the same rule (what a hash tells is what a download tells).
    res = server.openssh("ssh", user, [f"{user.name}@{server.host}", "sha256sum", "earlier.txt"])
    assert res.returncode != 0 and "no download permission" in res.stderr and "earlier" not in res.stdout

    # lftp and psftp upload; lftp's second put of the same name is an overwrite: refused.
    ok(lftp(server, user, ["put e.txt"], local))
    res = lftp(server, user, ["put e.txt"], local)
    assert res.returncode != 0 and "overwrite" in res.stderr, res.stderr
    ok(psftp(server, user, ["put f.txt"], local))

    # rclone: without listing the destination, without setting times (no chtimes), it uploads and
    # verifies its own upload (size by stat, md5sum over exec) on the same connection.
    obscured = ok(run(["rclone", "obscure", user.password or ""], timeout=30)).stdout.strip()
    cfg = tmp_path / "rclone.conf"
    cfg.write_text("")
    env = dict(os.environ, RCLONE_CONFIG=str(cfg), RCLONE_SFTP_HOST=server.host, RCLONE_SFTP_PORT=str(server.port),
               RCLONE_SFTP_USER=user.name, RCLONE_SFTP_PASS=obscured,
               RCLONE_SFTP_KNOWN_HOSTS_FILE=str(known_hosts(server, tmp_path / "known_hosts")), HOME=str(tmp_path))
    up = tmp_path / "rclone-up"
    make_file(up / "r.bin", 100 * KiB)
    ok(run(["rclone", "--retries", "1", "--low-level-retries", "1", "copy", "--no-traverse", "--no-check-dest",
            "--sftp-set-modtime=false", str(up), ":sftp:/"], env=env, timeout=120))
    assert (user.home / "r.bin").read_bytes() == (up / "r.bin").read_bytes()

    assert sorted(p.name for p in user.home.iterdir()) == ["a-2.txt", "a.txt", "c.txt", "d.txt", "e.txt",
                                                          "earlier.txt", "f.txt", "r.bin"]
    assert ledger(server, user.name) == sum(p.stat().st_size for p in user.home.iterdir())


def test_per_directory_rules_apply_to_sftp_scp_and_hash_commands(server: ServerHandle, tmp_path: Path) -> None:
    need("scp", "ssh")
    user = server.add_user("mixed", password=None, key=True)
    seed(server, user, {"pub/doc.txt": b"public\n", "drop/in.txt": b"dropped\n", "own/mine.txt": b"mine\n"})
    server.cli("user", "perm", "set", "mixed", "/pub", "list,download")
    server.cli("user", "perm", "set", "mixed", "/drop/", "upload")
    assert server.cli("user", "perm", "list", "mixed").stdout == "/\t*\t(default)\n/drop\tupload\n/pub\tlist,download\n"
    assert user_row(server, "mixed")["PERMS"] == "2 rules"
    digest = hashlib.sha256(b"public\n").hexdigest()

    async def go() -> None:
        async with server.connect(user) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("/own/new.txt", "wb") as f:      # '*' where no rule says otherwise
                await f.write(b"x")
            await sftp.remove("/own/mine.txt")
            assert await sftp.listdir("/pub") is not None
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="no upload permission in /pub"):
                await sftp.open("/pub/new.txt", "wb")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.rename("/own/new.txt", "/pub/new.txt")   # rename needs rights on both sides
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="own permission rules"):
                await sftp.rename("/pub", "/public")                # the rule would no longer hold its files
            # `..` and `.` do not change which rule applies
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.open("/own/../pub/./doc.txt", "ab")
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="no list permission in /drop"):
                await sftp.listdir("/drop")
            # In the drop box a present and a missing name look the same to stat and realpath
            missing = await sftp_error(sftp.stat("/drop/nothing.txt"))
            present = await sftp_error(sftp.stat("/drop/in.txt"))
            assert (missing.code, missing.reason) == (present.code, present.reason)
            assert await sftp.realpath("/drop/in.txt/..") == "/drop"
            async with sftp.open("/drop/new.txt", "wb") as f:
                await f.write(b"new")
            assert (await sftp.stat("/drop/new.txt")).size == 3   # its own upload answers
            res = await conn.run("sha256sum /pub/doc.txt /drop/in.txt")
            assert res.stdout == f"{digest}  /pub/doc.txt\n"
            assert "no download permission in /drop" in str(res.stderr) and res.exit_status == 1
    asyncio.run(asyncio.wait_for(go(), 60))

    # OpenSSH scp (SFTP mode and legacy SCP) gets the same answers as SFTP.
    local = tmp_path / "local"
    make_file(local / "s.txt", 100)
    for args in ([], ["-O"]):
        res = server.openssh("scp", user, [*args, str(local / "s.txt"), f"{user.name}@{server.host}:/pub/s.txt"])
        assert res.returncode != 0 and not (user.home / "pub" / "s.txt").exists(), res.stderr
        ok(server.openssh("scp", user, [*args, f"{user.name}@{server.host}:/pub/doc.txt", str(local / "doc.txt")]))
        assert (local / "doc.txt").read_bytes() == b"public\n"
        (local / "doc.txt").unlink()
    assert (user.home / "drop" / "in.txt").read_bytes() == b"dropped\n"


async def sftp_error(coro: object) -> asyncssh.SFTPError:
    with pytest.raises(asyncssh.SFTPError) as info:
        await coro  # type: ignore[misc]
    return info.value


def test_a_permission_change_applies_to_open_sessions_on_every_worker(workers_server: ServerHandle) -> None:
    server = workers_server
    user = server.add_user("changing", password=None, key=True)

    async def refused_within(make: object, seconds: float = 2.5) -> float:
        """Retry an operation until the server refuses it for permission; returns how long it took."""
        t0 = time.monotonic()
        while True:
            try:
                await make()  # type: ignore[operator]
            except asyncssh.SFTPPermissionDenied:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < seconds, "the permission change did not apply in time"
            await asyncio.sleep(0.05)

    async def go() -> None:
        ca, cb, sa, sb = await sftp_on_two_workers(server, user)
        async with ca, cb:
            f = await sa.open("/up.bin", "wb")
            await f.write(b"a" * KiB, 0)
            await asyncio.to_thread(server.cli, "user", "perm", "set", user.name, "/", "list,download")
            n = 0

            async def write_more() -> None:
                nonlocal n
                n += 1
                await f.write(b"b" * KiB, n * KiB)

            async def mkdir_b() -> None:
                await sb.mkdir(f"/d{time.monotonic_ns()}")
                await asyncio.sleep(0)

            await refused_within(write_more)   # the open upload on worker A, at its next WRITE
            await refused_within(mkdir_b)      # a new request on worker B
            await f.close()
            assert await sb.listdir("/")       # still may list and read
            await asyncio.to_thread(server.cli, "user", "perm", "unset", user.name, "/")
            t0 = time.monotonic()
            while True:  # and back: '*' again within the same time
                try:
                    await sb.mkdir("/again")
                    break
                except asyncssh.SFTPPermissionDenied:
                    assert time.monotonic() - t0 < 2.5
                    await asyncio.sleep(0.05)
    asyncio.run(asyncio.wait_for(go(), 60))
    assert "permissions reloaded user=changing" in server.log()


def test_sshfiles_cli_puts_and_verifies_into_a_drop_box(server: ServerHandle, tmp_path: Path) -> None:
    from test_client import Cli

    server.cli("user", "add", "clidrop", "--upload-only", "--password-stdin", input="pw-clidrop-1\n")
    user = User("clidrop", "pw-clidrop-1", server.homes_dir / "clidrop")
    work = tmp_path / "work"
    make_file(work / "report.bin", 300 * KiB)
    cli = Cli(server, user, work)
    res = cli.run("put", "report.bin", "/")
    assert res.returncode == 0 and "sha256 verified" in res.stdout + res.stderr, res.stderr
    assert (user.home / "report.bin").read_bytes() == (work / "report.bin").read_bytes()
    res = cli.run("put", "report.bin", "/")          # the name is taken: no overwrite, exit 5
    assert res.returncode == 5 and "no overwrite permission" in res.stderr, res.stderr
    res = cli.run("get", "/report.bin", "back.bin")
    assert res.returncode == 5 and not (work / "back.bin").exists(), res.stderr


def test_perm_cli_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sshfiles.cli import main as cli_main

    base = ["--accounts-dir", str(tmp_path / "acc"), "--homes-dir", str(tmp_path / "homes"),
            "--keys-dir", str(tmp_path / "keys")]
    runner = CliRunner()
    assert runner.invoke(cli_main, [*base, "user", "add", "u", "--password-stdin"], input="pw-u-1\n").exit_code == 0
    for args, message in ((["set", "u", "/a", "list,fly"], "unknown permission 'fly'"),
                          (["set", "u", "/a/../b", "list"], "'..' is not allowed"),
                          (["set", "nobody", "/", "list"], "no such user: nobody"),
                          (["unset", "u", "/a"], "has no permission rule for /a"),
                          (["list", "nobody"], "no such user: nobody")):
        res = runner.invoke(cli_main, [*base, "user", "perm", *args])
        assert res.exit_code == 1 and message in res.output and res.output.count("\n") == 1, res.output
    res = runner.invoke(cli_main, [*base, "user", "add", "v", "--read-only", "--upload-only", "--password-stdin"],
                        input="pw-v-1\n")
    assert res.exit_code == 2 and "exclude each other" in res.output
    assert runner.invoke(cli_main, [*base, "user", "perm", "list", "v"]).exit_code == 1  # not created
