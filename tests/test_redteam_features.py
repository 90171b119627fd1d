"""Red team of permissions, shared folders, atomic uploads and hooks: each test is an attack as a hostile
logged-in user makes it against a real `sshfiles serve`, asserting the refusal and that nothing else
suffered (the files on disk, the ledger).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import asyncssh
import pytest
from conftest import ServerHandle, make_server
from test_folders import assert_folder_ledger_matches_disk
from test_permissions import seed, snapshot
from test_quota import assert_ledger_matches_disk, ledger


async def _error(coro: object) -> tuple[int, str]:
    """(SFTP status code, reason) of a request that must fail."""
    with pytest.raises(asyncssh.SFTPError) as info:
        await coro  # type: ignore[misc]
    return info.value.code, info.value.reason


def test_drop_box_does_not_tell_which_names_exist_through_dotdot(server: ServerHandle) -> None:
    """`stat /drop/NAME/..` used to answer "Not a directory" for an existing file and "No such file" for a
    missing one (the path fails to resolve, and the lexical fallback named `/drop`'s parent, where `list`
    holds): a silent existence probe of a drop box. The same through lstat and exec sha256sum."""
    user = server.add_user("prober", password=None, key=True)
    seed(server, user, {"drop/secret.txt": b"customer data\n", "drop/sub/x": b"x", "pub/readme": b"r"})
    server.cli("user", "perm", "set", "prober", "/drop", "upload")
    before = snapshot(user.home)

    async def go() -> None:
        async with server.connect(user) as conn, conn.start_sftp_client() as sftp:
            for probe in ("/drop/{}/..", "/drop/{}/../..", "/drop/{}/../sub", "/pub/../drop/{}/.."):
                present = await _error(sftp.stat(probe.format("secret.txt")))
                missing = await _error(sftp.stat(probe.format("nothing.txt")))
                assert present == missing, probe
                assert present[0] == asyncssh.FX_PERMISSION_DENIED, probe
                present = await _error(sftp.lstat(probe.format("secret.txt")))
                missing = await _error(sftp.lstat(probe.format("nothing.txt")))
                assert present == missing, probe
            # a subdirectory still answers (clients cd into it), and so does the drop box itself
            assert (await sftp.stat("/drop/sub/..")).permissions == (await sftp.stat("/drop")).permissions
            present_hash = await conn.run("sha256sum /drop/secret.txt/..")
            missing_hash = await conn.run("sha256sum /drop/nothing.txt/..")
            assert str(present_hash.stderr).replace("secret", "nothing") == missing_hash.stderr
            assert present_hash.exit_status == missing_hash.exit_status == 1
            assert "no download permission in /drop" in str(present_hash.stderr)
    asyncio.run(asyncio.wait_for(go(), 60))
    assert snapshot(user.home) == before


@pytest.mark.parametrize("mode", ["atomic", "atomic-resume"])
def test_a_failed_atomic_upload_does_not_make_another_users_file_ones_own(server: ServerHandle, mode: str) -> None:
    """A drop-box folder shared by two customers, uploads atomic. Mallory opens /drop/invoice.pdf (a
    guessed name) and waits; Carol uploads hers under that name; Mallory's close fails ("File exists").
    Her connection used to remember the name as her own upload from the open on, so `stat` and
    `sha256sum` then answered for Carol's file: its size and hash, in a folder Mallory may not list or
    read. Only a completed upload is one's own."""
    mallory = server.add_user("mallory", password=None, key=True)
    carol = server.add_user("carol", password=None, key=True)
    server.cli("folder", "add", "inbox")
    for name in ("mallory", "carol"):
        server.cli("user", "folder", "add", name, "inbox", "/drop", "--perms", "upload")
    server.cli("user", "upload-mode", "mallory", mode)  # (carol's in place: a partial would be shared)
    inbox = server.homes_dir.parent / "folders" / "inbox"
    secret = b"carol's invoice\n"

    async def go() -> None:
        async with server.connect(mallory) as conn, conn.start_sftp_client() as sftp:
            f = await sftp.open("/drop/invoice.pdf", "wb")
            await f.write(b"decoy")
            async with server.connect(carol) as c2, c2.start_sftp_client() as carol_sftp:
                async with carol_sftp.open("/drop/invoice.pdf", "wb") as g:
                    await g.write(secret)
            with pytest.raises(asyncssh.SFTPError, match="File exists"):
                await f.close()
            code, _ = await _error(sftp.stat("/drop/invoice.pdf"))
            assert code == asyncssh.FX_PERMISSION_DENIED
            res = await conn.run("sha256sum /drop/invoice.pdf")
            assert res.exit_status == 1 and hashlib.sha256(secret).hexdigest() not in str(res.stdout)
            assert "no download permission in /drop" in str(res.stderr)
            # her own, completed upload still answers on this connection
            async with sftp.open("/drop/mine.pdf", "wb") as h:
                await h.write(b"mine")
            assert (await sftp.stat("/drop/mine.pdf")).size == 4
    asyncio.run(asyncio.wait_for(go(), 60))
    assert (inbox / "invoice.pdf").read_bytes() == secret


def test_a_removed_or_renamed_own_upload_does_not_stay_ones_own(server: ServerHandle) -> None:
    """A drop-box folder where customers may also delete and rename their mistakes (upload,delete,rename;
    no list, no download). Mallory uploads /drop/a.csv and /drop/b.csv, removes the first and renames the
    second away; Carol then uploads her own a.csv and b.csv. Mallory's connection used to keep answering
    `stat` and `sha256sum` for those names: Carol's files' sizes and hashes."""
    mallory = server.add_user("mallory", password=None, key=True)
    carol = server.add_user("carol", password=None, key=True)
    server.cli("folder", "add", "inbox")
    for name in ("mallory", "carol"):
        server.cli("user", "folder", "add", name, "inbox", "/drop", "--perms", "upload,delete,rename")
    inbox = server.homes_dir.parent / "folders" / "inbox"

    async def go() -> None:
        async with server.connect(mallory) as conn, conn.start_sftp_client() as sftp:
            for name in ("a.csv", "b.csv"):
                async with sftp.open(f"/drop/{name}", "wb") as f:
                    await f.write(b"mallory")
                assert (await sftp.stat(f"/drop/{name}")).size == 7   # her own upload answers
            await sftp.remove("/drop/a.csv")
            await sftp.rename("/drop/b.csv", "/drop/b2.csv")
            assert (await sftp.stat("/drop/b2.csv")).size == 7       # ... and still does under its new name
            async with server.connect(carol) as c2, c2.start_sftp_client() as carol_sftp:
                for name in ("a.csv", "b.csv"):
                    async with carol_sftp.open(f"/drop/{name}", "wb") as g:
                        await g.write(b"carol's data")
            for name in ("a.csv", "b.csv"):
                code, _ = await _error(sftp.stat(f"/drop/{name}"))
                assert code == asyncssh.FX_PERMISSION_DENIED
                res = await conn.run(f"sha256sum /drop/{name}")
                assert res.exit_status == 1 and "no download permission in /drop" in str(res.stderr)
    asyncio.run(asyncio.wait_for(go(), 60))
    assert (inbox / "a.csv").read_bytes() == (inbox / "b.csv").read_bytes() == b"carol's data"
    assert (inbox / "b2.csv").read_bytes() == b"mallory"


def test_a_partial_in_a_shared_folder_is_its_uploaders_only(server: ServerHandle) -> None:
    """Team folder, both users in mode atomic-resume. Alice's upload breaks off and leaves its partial.
    Partials were one per name, so for Bob the name stood for Alice's unfinished upload: `stat` showed
    its size, a read returned its bytes (an upload nobody published), a resume appended Bob's tail to
    Alice's head, and while Alice wrote it Bob's uploads of that name were refused as "in progress".
    Each user's partial is their own: Bob sees no file, uploads his own; Alice can still resume hers."""
    alice = server.add_user("alice", password=None, key=True)
    bob = server.add_user("bob", password=None, key=True)
    server.cli("folder", "add", "team")
    for name in ("alice", "bob"):
        server.cli("user", "folder", "add", name, "team", "/team")
        server.cli("user", "upload-mode", name, "atomic-resume")
    folder = server.homes_dir.parent / "folders" / "team"

    async def go() -> None:
        conn = await server.connect(alice).__aenter__()
        sftp = await conn.start_sftp_client()
        f = await sftp.open("/team/r.bin", "wb")
        await f.write(b"A" * 1000)
        conn.abort()  # the connection drops mid-upload: the partial stays for a resume
        for _ in range(100):
            if [p.stat().st_size for p in folder.iterdir()] == [1000]:
                break
            await asyncio.sleep(0.05)
        async with server.connect(bob) as c2, c2.start_sftp_client() as bob_sftp:
            assert (await _error(bob_sftp.stat("/team/r.bin")))[0] == asyncssh.FX_NO_SUCH_FILE
            assert (await _error(bob_sftp.open("/team/r.bin", "rb")))[0] == asyncssh.FX_NO_SUCH_FILE
            async with server.connect(alice) as c3, c3.start_sftp_client() as alice_sftp:
                assert (await alice_sftp.stat("/team/r.bin")).size == 1000  # hers to resume
                held = await alice_sftp.open("/team/r.bin", "ab")           # reput: continue it
                async with bob_sftp.open("/team/r.bin", "wb") as g:        # not "in progress" for Bob
                    await g.write(b"bob's own")
                await held.write(b"B" * 10)
                await held.close()                                           # Alice's completes last
        assert (folder / "r.bin").read_bytes() == b"A" * 1000 + b"B" * 10
    asyncio.run(asyncio.wait_for(go(), 60))
    assert [p.name for p in folder.iterdir()] == ["r.bin"]
    assert_folder_ledger_matches_disk(server, "team", folder)


def test_an_own_upload_moved_away_by_a_hook_does_not_answer_for_the_next_one(tmp_path: Path,
                                                                              host_keys_dir: Path) -> None:
    """The README's hook moves every completed upload out of the drop box. Mallory uploads invoice.pdf and
    keeps her connection; the hook moves it; Carol uploads her invoice.pdf. Mallory's connection knew the
    name as her upload, so `stat` and `sha256sum` answered for Carol's file. What a connection remembers
    is the file it created (device and inode), not the name."""
    mover = tmp_path / "mover.sh"
    processing = tmp_path / "processing"
    processing.mkdir()
    mover.write_text(f'#!/bin/sh\n[ "$SSHFILES_USER" = mallory ] || exit 0\n'  # (carol's stays)
                     f'mv -- "$SSHFILES_HOST_PATH" {processing}/"$SSHFILES_USER-$SSHFILES_BYTES"\n')
    mover.chmod(0o755)
    server = make_server(tmp_path, host_keys_dir, ("--on-upload", str(mover)))
    mallory = server.add_user("mallory", password=None, key=True)
    carol = server.add_user("carol", password=None, key=True)
    server.cli("folder", "add", "inbox")
    for name in ("mallory", "carol"):
        server.cli("user", "folder", "add", name, "inbox", "/drop", "--perms", "upload")
    inbox = server.homes_dir.parent / "folders" / "inbox"
    secret = b"carol's invoice, 1234.56 EUR\n"

    async def moved(name: str) -> None:
        for _ in range(200):
            if (processing / name).exists():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the hook did not move {name}")

    async def go() -> None:
        async with server.connect(mallory) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("/drop/invoice.pdf", "wb") as f:
                await f.write(b"mallory")
            await moved("mallory-7")
            async with server.connect(carol) as c2, c2.start_sftp_client() as carol_sftp:
                async with carol_sftp.open("/drop/invoice.pdf", "wb") as g:
                    await g.write(secret)
            assert (await _error(sftp.stat("/drop/invoice.pdf")))[0] == asyncssh.FX_PERMISSION_DENIED
            res = await conn.run("sha256sum /drop/invoice.pdf")
            assert res.exit_status == 1 and "no download permission in /drop" in str(res.stderr)
    server.start()
    try:
        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        server.stop()
    assert (inbox / "invoice.pdf").read_bytes() == secret


def test_status_does_not_show_a_transfer_forged_by_a_file_name(server: ServerHandle) -> None:
    """`sshfiles status` lists transfers as "upload PATH SIZE, ...": a file named
    "a 1 KiB, download /srv/secret.db" showed the admin a download that is not happening. A path with a
    space, a comma or a quote is shown quoted."""
    user = server.add_user("forger")
    name = '/a 1 KiB, download /srv/secret".db'

    async def go() -> None:
        async with server.connect(user) as conn, conn.start_sftp_client() as sftp:
            await sftp.mkdir("/a 1 KiB, download ")
            await sftp.mkdir("/a 1 KiB, download /srv")
            f = await sftp.open(name, "wb")
            await f.write(b"x" * 2048)
            doing = ""
            for _ in range(100):
                rows = [json.loads(line) for line in server.cli("status", "--json").stdout.splitlines()]
                if rows and (doing := rows[0]["doing"]):
                    break
                await asyncio.sleep(0.1)
            assert doing == 'upload "/a 1 KiB, download /srv/secret\\\\".db" 2.0 KiB'
            assert "download" not in doing.replace(name.replace('"', '\\\\"'), "")
            await f.close()
    asyncio.run(asyncio.wait_for(go(), 60))


def test_hostile_file_names_reach_a_hook_only_as_data(tmp_path: Path, host_keys_dir: Path) -> None:
    """Names built to inject: shell metacharacters, a leading '-', '=', a newline forging a log line.
    A hook gets them only in its environment, byte for byte, never in its argv or through a shell; the
    hook's log line (which echoes the path and the hook's output) holds them escaped on one line."""
    from test_hooks import events_of, recorder, wait_events

    cmd, events = recorder(tmp_path)
    server = make_server(tmp_path, host_keys_dir, ("--on-upload", cmd, "--on-rename", cmd))
    user = server.add_user("inject")
    pwned = tmp_path / "pwned"
    names = ["-rf", f"$(touch {pwned.name})", "`id`;x", "a=b SSHFILES_USER=root",
             "x\nsshfiles.hooks: hook event=upload user=root path=shadow result=ok"]

    async def go() -> None:
        async with server.connect(user) as conn, conn.start_sftp_client() as sftp:
            for name in names:
                async with sftp.open(name, "wb") as f:
                    await f.write(b"data")
            await sftp.rename(names[0], "--target=-x")
    server.start()
    try:
        asyncio.run(asyncio.wait_for(go(), 60))
        got = wait_events(events, len(names) + 1)
    finally:
        server.stop()
    uploads = [e for e in got if e["SSHFILES_EVENT"] == "upload"]
    assert sorted(e["SSHFILES_PATH"] for e in uploads) == sorted("/" + n for n in names)
    assert all(e["SSHFILES_USER"] == "inject" for e in got)
    (ren,) = (e for e in got if e["SSHFILES_EVENT"] == "rename")
    assert (ren["SSHFILES_PATH"], ren["SSHFILES_TARGET"]) == ("/-rf", "/--target=-x")
    assert not pwned.exists() and not (tmp_path / "id").exists() and len(events_of(events)) == len(got)
    hook_lines = [line for line in server.log().splitlines() if " sshfiles.hooks[" in line]
    assert len(hook_lines) == len(names) + 1
    assert not any(line.lstrip().startswith("sshfiles.hooks: hook event=upload user=root")
                   for line in server.log().splitlines())


def test_chtimes_in_a_drop_box_touches_only_ones_own_uploads(server: ServerHandle) -> None:
    """The README grants `chtimes` in a drop box for rclone's modtime. With it, setstat of times on any
    name used to succeed for a present file and fail "No such file" for a missing one (an existence
    probe), and to change the times of files the user never uploaded; chmod alike. Where the user may
    not list, setstat of a name applies to the connection's own uploads only."""
    user = server.add_user("rcl", password=None, key=True)
    seed(server, user, {"drop/secret.txt": b"someone else's\n"})
    server.cli("user", "perm", "set", "rcl", "/drop", "upload,chtimes,chmod")
    secret = user.home / "drop" / "secret.txt"
    before = secret.stat()

    async def go() -> None:
        async with server.connect(user) as conn, conn.start_sftp_client() as sftp:
            for attrs in (asyncssh.SFTPAttrs(atime=1000, mtime=1000), asyncssh.SFTPAttrs(permissions=0o600)):
                present = await _error(sftp.setstat("/drop/secret.txt", attrs))
                missing = await _error(sftp.setstat("/drop/nothing.txt", attrs))
                assert present == missing and present[0] == asyncssh.FX_PERMISSION_DENIED
            async with sftp.open("/drop/mine.txt", "wb") as f:   # rclone: upload, then set its modtime
                await f.write(b"mine")
            await sftp.utime("/drop/mine.txt", (1000, 1000))
            assert (await sftp.stat("/drop/mine.txt")).mtime == 1000
    asyncio.run(asyncio.wait_for(go(), 60))
    after = secret.stat()
    assert (after.st_mtime, after.st_mode) == (before.st_mtime, before.st_mode)


def test_a_broken_resumable_upload_can_be_removed_to_free_the_quota(server: ServerHandle) -> None:
    """Mode atomic-resume, a 100 KiB quota. An upload breaks off at 60 KiB: its partial is charged, and
    `stat` of the name shows it, but `rm` of the name answered "No such file": invisible, unremovable,
    the user's quota stayed full (the start-up cleanup keeps partials for 7 days). Removing the name
    removes its partial, as stat and opens already see it."""
    user = server.add_user("resumer", password=None, key=True, quota="100K")
    server.cli("user", "upload-mode", "resumer", "atomic-resume")

    async def go() -> None:
        conn = await server.connect(user).__aenter__()
        sftp = await conn.start_sftp_client()
        f = await sftp.open("/big.iso", "wb")
        await f.write(b"b" * 60 * 1024)
        conn.abort()
        for _ in range(100):
            if [p.stat().st_size for p in user.home.iterdir()] == [60 * 1024] and ledger(server, user.name) == 61440:
                break
            await asyncio.sleep(0.05)
        async with server.connect(user) as c2, c2.start_sftp_client() as sftp2:
            assert (await sftp2.stat("/big.iso")).size == 60 * 1024
            with pytest.raises(asyncssh.SFTPError):
                async with sftp2.open("/other.bin", "wb") as g:
                    await g.write(b"o" * 60 * 1024)           # the quota is full of the partial
            await sftp2.remove("/big.iso")                    # give up the broken upload
            assert (await _error(sftp2.stat("/big.iso")))[0] == asyncssh.FX_NO_SUCH_FILE
            async with sftp2.open("/other.bin", "wb") as g:
                await g.write(b"o" * 60 * 1024)
    asyncio.run(asyncio.wait_for(go(), 60))
    assert sorted(p.name for p in user.home.iterdir()) == ["other.bin"]
    assert_ledger_matches_disk(server, user)
