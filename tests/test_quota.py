"""Adversarial quota tests against a real `sshfiles serve`: every way around the quota we know of.

Each scenario attacks one path that can change a user's usage (write at any
offset, truncate, setstat, rename over, copy-data, hard links, SCP, several
sessions racing, a crash mid-upload, an admin copying files in by hand) and
then checks the one invariant that matters: the ledger in the accounts store
equals a fresh scan of the home, computed here by the test itself (os.walk +
lstat, apparent sizes of regular files), and `sshfiles user list` shows it.

Quotas are a few KiB so every scenario runs in a second or two.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
from pathlib import Path

import asyncssh
import pytest
from asyncssh.packet import String
from click.testing import CliRunner

from sshfiles.cli import main as cli_main
from sshfiles.stores.sqlite import SQLiteAccountStore
from sshfiles.units import format_size

KiB = 1024
QUOTA_MSG = re.compile(r"quota exceeded: [\d.]+ (?:B|KiB|MiB|GiB|TiB) used of [\d.]+ (?:B|KiB|MiB|GiB|TiB)")


# -- the invariant ------------------------------------------------------------------


def disk_usage(home: Path) -> int:
    """Apparent size of the regular files below `home`, each inode once; symlinks and dirs count zero."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(home):  # never follows symlinks
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def ledger(server, name: str) -> int:
    """What the store charges the user: settled usage plus live reservations."""
    store = SQLiteAccountStore(server.accounts_dir)
    try:
        return store.charged(name)
    finally:
        store.close()


def user_row(server, name: str) -> dict[str, str]:
    """NAME's row of `sshfiles user list` (the real CLI code, run in-process: no interpreter start-up)."""
    res = CliRunner().invoke(cli_main, ["--keys-dir", str(server.keys_dir), "--accounts-dir",
                                        str(server.accounts_dir), "--homes-dir", str(server.homes_dir),
                                        "user", "list"])
    assert res.exit_code == 0, res.output
    out = res.output.splitlines()
    header = re.split(r"\s{2,}", out[0].strip())
    for line in out[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == name:
            return dict(zip(header, cells, strict=False))
    raise AssertionError(f"{name} missing from `sshfiles user list`:\n" + "\n".join(out))


def assert_ledger_matches_disk(server, user, timeout: float = 5.0) -> int:
    """The ledger equals a fresh scan of the home (after the server settled the last session)."""
    deadline = time.monotonic() + timeout
    while True:
        disk = disk_usage(user.home)
        charged = ledger(server, user.name)
        if charged == disk:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"ledger of {user.name} says {charged} bytes, the disk holds {disk}")
        time.sleep(0.05)
    row = user_row(server, user.name)
    assert row["USED"] == format_size(disk), row
    return disk


def add_user(server, name: str, quota: str):
    """A key-only account (no argon2 on each login keeps the many sessions here fast)."""
    return server.add_user(name, password=None, quota=quota, key=True)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def refused(coro) -> asyncssh.SFTPError:
    """Await an SFTP request that must be refused for quota; returns the error."""
    with pytest.raises(asyncssh.SFTPError) as info:
        await coro
    assert QUOTA_MSG.search(info.value.reason), info.value.reason
    return info.value


async def put(sftp, path: str, data: bytes) -> None:
    async with sftp.open(path, "wb") as f:
        await f.write(data)


def seed(server, user, files: dict[str, bytes]) -> None:
    async def go():
        async with server.sftp(user) as sftp:
            for name, data in files.items():
                await put(sftp, name, data)
    run(go())


def local_file(server, name: str, size: int) -> Path:
    path = server.root / "local" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


# -- writes at any offset -----------------------------------------------------------------


def test_sparse_write_at_1tib_is_refused_whole(server):
    user = add_user(server, "sparse", quota="64KiB")
    seed(server, user, {"f": b"a" * 1000})

    async def attack():
        async with server.sftp(user) as sftp:
            async with sftp.open("f", "r+b") as f:
                await refused(f.write(b"x" * 10, 2**40))
                await refused(f.write(b"x", 2**63))
                await refused(f.write(b"x", 64 * KiB))        # ends one byte past the quota
                assert (await f.stat()).size == 1000
            async with sftp.open("new", "wb") as f:
                await refused(f.write(b"x" * 10, 2**40))
            assert (await sftp.stat("new")).size == 0
    run(attack())
    assert (user.home / "f").read_bytes() == b"a" * 1000
    assert (user.home / "new").stat().st_size == 0
    assert assert_ledger_matches_disk(server, user) == 1000


def test_sparse_write_is_charged_for_the_extent_it_creates(server):
    user = add_user(server, "hole", quota="64KiB")

    async def attack():
        async with server.sftp(user) as sftp:
            async with sftp.open("holey", "wb") as f:
                await f.write(b"z", 64 * KiB - 1)              # one byte sent, the whole quota used
            async with sftp.open("other", "wb") as f:
                await refused(f.write(b"y"))
            assert (await sftp.statvfs("/")).bavail == 0
    run(attack())
    assert (user.home / "holey").stat().st_size == 64 * KiB
    assert (user.home / "other").stat().st_size == 0
    assert assert_ledger_matches_disk(server, user) == 64 * KiB


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_exact_boundary_single_write(server, delta):
    quota = 64 * KiB
    user = add_user(server, "edge", quota=str(quota))
    n = quota + delta
    data = os.urandom(n)

    async def attack():
        async with server.sftp(user) as sftp, sftp.open("f", "wb") as f:
            if n <= quota:
                await f.write(data)
            else:
                await refused(f.write(data))
    run(attack())
    got = (user.home / "f").read_bytes()
    assert got == (data if n <= quota else b""), "a refused write must write nothing"
    assert assert_ledger_matches_disk(server, user) == len(got)


def test_exact_boundary_across_files_and_appends(server):
    quota = 64 * KiB
    user = add_user(server, "edge2", quota=str(quota))

    async def attack():
        async with server.sftp(user) as sftp:
            await put(sftp, "a", b"a" * (quota - 1))
            async with sftp.open("b", "ab") as f:
                await f.write(b"b")                           # exactly at the quota now
                await refused(f.write(b"b"))
            async with sftp.open("a", "r+b") as f:
                await f.write(b"A" * 100, 0)                   # overwriting in place costs nothing
                await refused(f.write(b"A", quota - 1))        # one byte past the end
            async with sftp.open("c", "wb") as f:               # creating an empty file is free
                await refused(f.write(b"c"))
            st = await sftp.statvfs("/")
            assert (st.blocks - st.bfree) * st.frsize == quota and st.bavail == 0
    run(attack())
    assert (user.home / "b").read_bytes() == b"b"
    assert (user.home / "a").read_bytes() == b"A" * 100 + b"a" * (quota - 101)
    assert assert_ledger_matches_disk(server, user) == quota


def test_write_needs_a_write_handle(server):
    user = add_user(server, "rdonly", quota="64KiB")
    seed(server, user, {"f": b"data"})

    async def attack():
        async with server.sftp(user) as sftp, sftp.open("f", "rb") as f:
            with pytest.raises(asyncssh.SFTPError):
                await f.write(b"x" * 100_000, 0)
            with pytest.raises(asyncssh.SFTPError):
                await f.truncate(1 << 30)
    run(attack())
    assert (user.home / "f").read_bytes() == b"data"
    assert_ledger_matches_disk(server, user)


# -- several sessions at once -----------------------------------------------------------------


def test_concurrent_sessions_race_for_the_last_bytes(server):
    quota = 64 * KiB
    user = add_user(server, "racer", quota=str(quota))
    seed(server, user, {"base": b"0" * (quota - 1000)})
    sessions = 8

    async def attack():
        go = asyncio.Event()
        ready = asyncio.Semaphore(0)

        async def one(i: int) -> bool:
            async with server.sftp(user) as sftp, sftp.open(f"r{i}", "wb") as f:
                ready.release()
                await go.wait()
                try:
                    await f.write(bytes([65 + i]) * 1000)
                    return True
                except asyncssh.SFTPError as exc:
                    assert QUOTA_MSG.search(exc.reason), exc.reason
                    return False

        tasks = [asyncio.create_task(one(i)) for i in range(sessions)]
        for _ in range(sessions):  # every session logged in, with its handle open
            await ready.acquire()
        go.set()
        return await asyncio.gather(*tasks)
    results = run(attack())
    assert sum(results) == 1, f"exactly one session may get the last 1000 bytes, got {results}"
    assert assert_ledger_matches_disk(server, user) == quota


def test_concurrent_uploads_never_exceed_the_quota_together(server):
    quota = 256 * KiB
    chunk = 4 * KiB
    user = add_user(server, "flood", quota=str(quota))

    async def uploader(i: int) -> int:
        written = 0
        async with server.sftp(user) as sftp, sftp.open(f"up{i}", "wb") as f:
            for off in range(0, 96 * KiB, chunk):
                try:
                    await f.write(os.urandom(chunk), off)
                except asyncssh.SFTPError as exc:
                    assert QUOTA_MSG.search(exc.reason), exc.reason
                    break
                written += chunk
                await asyncio.sleep(0)
        return written

    async def attack():
        return await asyncio.gather(*(uploader(i) for i in range(6)))
    written = run(attack())
    assert sum(written) == quota, f"accepted {written}: over the quota, or a false refusal within one process"
    for i, n in enumerate(written):
        assert (user.home / f"up{i}").stat().st_size == n
    assert assert_ledger_matches_disk(server, user) == quota


# -- size changes: setstat, fsetstat, truncate on open -------------------------------------------


def test_setstat_and_fsetstat_grow_and_shrink(server):
    quota = 64 * KiB
    user = add_user(server, "sizer", quota=str(quota))
    seed(server, user, {"f": b"x" * 100, "g": b""})

    async def attack():
        async with server.sftp(user) as sftp:
            await sftp.truncate("f", 32 * KiB)                       # setstat grow: charged
            assert (await sftp.statvfs("/")).bavail == quota - 32 * KiB
            await refused(sftp.truncate("g", 2**40))                  # setstat at 1 TiB
            await refused(sftp.setstat("g", asyncssh.SFTPAttrs(size=quota - 32 * KiB + 1)))
            async with sftp.open("g", "r+b") as f:
                await f.truncate(quota - 32 * KiB)                      # fsetstat grow to exactly full
                await refused(f.truncate(quota - 32 * KiB + 1))
                await refused(f.write(b"!", quota - 32 * KiB))
                await f.truncate(10)                                    # fsetstat shrink: credited
                await f.write(b"y" * 100, 10)
            await sftp.truncate("f", 5)                                 # setstat shrink: credited
            await sftp.truncate("f", 5)                                 # no change, no charge
    run(attack())
    assert (user.home / "f").read_bytes() == b"x" * 5
    assert (user.home / "g").read_bytes() == b"\0" * 10 + b"y" * 100
    assert assert_ledger_matches_disk(server, user) == 115


def test_lsetstat_size_grow_is_charged(server):
    user = add_user(server, "lsizer", quota="16KiB")
    seed(server, user, {"f": b""})

    async def attack():
        async with server.sftp(user) as sftp:
            await refused(sftp.setstat("f", asyncssh.SFTPAttrs(size=2**40), follow_symlinks=False))
            await sftp.setstat("f", asyncssh.SFTPAttrs(size=4 * KiB), follow_symlinks=False)
    run(attack())
    assert (user.home / "f").stat().st_size == 4 * KiB
    assert_ledger_matches_disk(server, user)


def test_open_with_trunc_frees_the_space(server):
    quota = 64 * KiB
    user = add_user(server, "trunc", quota=str(quota))
    seed(server, user, {"f": b"a" * quota})

    async def attack():
        async with server.sftp(user) as sftp:
            async with sftp.open("g", "wb") as f:
                await refused(f.write(b"g"))
            async with sftp.open("f", "wb") as f:                     # WRITE|CREAT|TRUNC
                assert (await f.stat()).size == 0
                await f.write(b"b" * (quota - 1))
            await put(sftp, "g", b"g")
            async with sftp.open("g", "ab") as f:
                await refused(f.write(b"g"))
    run(attack())
    assert (user.home / "f").read_bytes() == b"b" * (quota - 1)
    assert assert_ledger_matches_disk(server, user) == quota


def test_trunc_while_another_session_writes_the_same_file(server):
    quota = 64 * KiB
    user = add_user(server, "trunc2", quota=str(quota))

    async def attack():
        async with server.sftp(user) as s1, server.sftp(user) as s2, s1.open("f", "wb") as f1:
            await f1.write(b"1" * (48 * KiB))
            async with s2.open("f", "wb") as f2:                 # truncates under f1
                await f2.write(b"2" * 100)
            # f1 writes again at its old offsets: the regrowth must be charged again
            await f1.write(b"1" * (48 * KiB), 0)
            await refused(f1.write(b"1" * (16 * KiB + 1), 48 * KiB))
    run(attack())
    assert (user.home / "f").stat().st_size == 48 * KiB
    assert assert_ledger_matches_disk(server, user) == 48 * KiB


# -- names: remove, rename over, hard links ------------------------------------------------------


def test_posix_rename_over_existing_frees_the_target(server):
    quota = 64 * KiB
    user = add_user(server, "renamer", quota=str(quota))
    seed(server, user, {"a": b"a" * (16 * KiB), "b": b"b" * (48 * KiB)})

    async def attack():
        async with server.sftp(user) as sftp:
            await refused(put(sftp, "c", b"c"))
            await sftp.posix_rename("a", "b")                         # b's 48 KiB leave the disk
            await put(sftp, "c", b"c" * (48 * KiB))
            await refused(put(sftp, "d", b"d"))
    run(attack())
    assert (user.home / "b").read_bytes() == b"a" * (16 * KiB)
    assert not (user.home / "a").exists()
    assert assert_ledger_matches_disk(server, user) == quota


def test_classic_rename_over_existing_is_refused(server):
    user = add_user(server, "renamer2", quota="64KiB")
    seed(server, user, {"a": b"a" * 1000, "b": b"b" * 2000})

    async def attack():
        async with server.sftp(user) as sftp:
            with pytest.raises(asyncssh.SFTPError):
                await sftp.rename("a", "b")
            await sftp.rename("a", "c")
    run(attack())
    assert (user.home / "b").read_bytes() == b"b" * 2000
    assert (user.home / "c").read_bytes() == b"a" * 1000
    assert assert_ledger_matches_disk(server, user) == 3000


def test_posix_rename_of_a_file_onto_itself_changes_nothing(server):
    quota = 64 * KiB
    user = add_user(server, "selfren", quota=str(quota))
    seed(server, user, {"a": b"a" * (48 * KiB)})

    async def attack():
        async with server.sftp(user) as sftp:
            for _ in range(4):
                await sftp.posix_rename("a", "a")                      # rename(2): a no-op
                await sftp.posix_rename("a", "/./a")
            # had each no-op been credited, 48 KiB more would now fit
            await refused(put(sftp, "b", b"b" * (48 * KiB)))
    run(attack())
    assert (user.home / "a").stat().st_size == 48 * KiB
    assert disk_usage(user.home) <= quota
    assert_ledger_matches_disk(server, user)


def test_rename_over_a_file_open_in_another_session(server):
    quota = 64 * KiB
    user = add_user(server, "renopen", quota=str(quota))
    seed(server, user, {"a": b"a" * (8 * KiB), "b": b"b" * (32 * KiB)})

    async def attack():
        async with server.sftp(user) as s1, server.sftp(user) as s2:
            async with s1.open("b", "r+b") as fb:
                await fb.write(b"B" * (8 * KiB), 32 * KiB)             # b grows to 40 KiB while open
                await s2.posix_rename("a", "b")                        # b unlinked but still open in s1
                await s2.remove("b")
                await fb.write(b"B" * (8 * KiB), 40 * KiB)             # still charged while it exists
            # b's inode is gone now: its 48 KiB are free again
            await put(s2, "c", b"c" * quota)
    run(attack())
    assert assert_ledger_matches_disk(server, user) == quota


def test_remove_is_always_allowed_and_credited(server):
    user = add_user(server, "remover", quota="64KiB")
    seed(server, user, {"a": b"a" * (20 * KiB)})

    async def attack():
        async with server.sftp(user) as sftp:
            await sftp.mkdir("d")
            await put(sftp, "d/b", b"b" * (44 * KiB))
            await refused(put(sftp, "d/c", b"c"))
            await sftp.remove("d/b")
            await put(sftp, "d/c", b"c" * (44 * KiB))
            with pytest.raises(asyncssh.SFTPError):
                await sftp.remove("d/missing")
    run(attack())
    assert assert_ledger_matches_disk(server, user) == 64 * KiB


def test_hard_links_are_refused(server):
    user = add_user(server, "linker", quota="64KiB")
    seed(server, user, {"a": b"a" * (40 * KiB)})

    async def attack():
        async with server.sftp(user) as sftp:
            with pytest.raises(asyncssh.SFTPError):
                await sftp.link("a", "b")
            # sent raw anyway, as a hostile client would
            with pytest.raises(asyncssh.SFTPError):
                await sftp._handler._make_request(b"hardlink@openssh.com", String(b"a"), String(b"b"))
    run(attack())
    assert sorted(os.listdir(user.home)) == ["a"]
    assert (user.home / "a").stat().st_nlink == 1
    res = server.sftp_batch(user, "ln a c\n")
    assert res.returncode != 0
    assert sorted(os.listdir(user.home)) == ["a"]
    assert assert_ledger_matches_disk(server, user) == 40 * KiB


# -- copy-data ---------------------------------------------------------------------------------


def test_copy_data_is_charged(server):
    quota = 64 * KiB
    user = add_user(server, "copier", quota=str(quota))
    src = os.urandom(24 * KiB)
    seed(server, user, {"src": src})

    async def attack():
        async with server.sftp(user) as sftp:
            assert sftp.supports_remote_copy
            await sftp.copy("src", "dup1", remote_only=True)           # 48 KiB used
            with pytest.raises(asyncssh.SFTPError) as info:
                await sftp.copy("src", "dup2", remote_only=True)       # 24 KiB more do not fit
            assert QUOTA_MSG.search(info.value.reason), info.value.reason
            async with sftp.open("src", "rb") as s, sftp.open("far", "wb") as d:
                await refused(sftp.remote_copy(s, d, dst_offset=2**40))
                await refused(sftp.remote_copy(s, d, src_length=1, dst_offset=quota))
                await sftp.remote_copy(s, d, src_length=16 * KiB)     # exactly full
            async with sftp.open("far", "r+b") as d:                    # copy a file onto its own end
                await refused(sftp.remote_copy(d, d, dst_offset=16 * KiB))
    run(attack())
    assert (user.home / "dup1").read_bytes() == src
    assert (user.home / "dup2").stat().st_size == 0
    assert (user.home / "far").read_bytes() == src[:16 * KiB]
    assert assert_ledger_matches_disk(server, user) == quota


# -- stock clients: scp, OpenSSH sftp put/reput/df -----------------------------------------------


@pytest.mark.parametrize("mode", ["sftp", "legacy"])
def test_scp_upload_over_quota_fails_and_keeps_stored_data(server, mode):
    quota = 64 * KiB
    user = add_user(server, "scpuser", quota=str(quota))
    keep = os.urandom(40 * KiB)
    seed(server, user, {"keep": keep})
    big = local_file(server, "big.bin", 100 * KiB)
    small = local_file(server, "small.bin", 24 * KiB)
    flags = ["-O"] if mode == "legacy" else []

    res = server.openssh("scp", user, [*flags, str(big), f"{user.name}@{server.host}:big.bin"])
    assert res.returncode != 0, res
    assert re.search(r"quota exceeded|Failure", res.stderr), res.stderr   # failed for the quota, not by chance
    assert (user.home / "keep").read_bytes() == keep
    assert disk_usage(user.home) <= quota
    assert_ledger_matches_disk(server, user)

    res = server.openssh("scp", user, [*flags, str(small), f"{user.name}@{server.host}:big.bin"])
    assert res.returncode == 0, res.stderr                        # overwriting the partial upload fits
    assert (user.home / "big.bin").read_bytes() == small.read_bytes()
    assert (user.home / "keep").read_bytes() == keep
    assert assert_ledger_matches_disk(server, user) == quota


def test_scp_sftp_mode_success_exits_zero(server):
    user = add_user(server, "scpok", quota="64KiB")
    small = local_file(server, "small.bin", 24 * KiB)
    res = server.openssh("scp", user, [str(small), f"{user.name}@{server.host}:small.bin"])
    assert (user.home / "small.bin").read_bytes() == small.read_bytes()
    assert assert_ledger_matches_disk(server, user) == 24 * KiB
    assert res.returncode == 0, res.stderr


def test_openssh_sftp_put_over_quota_reports_failure(server):
    user = add_user(server, "putter", quota="64KiB")
    big = local_file(server, "big.bin", 100 * KiB)
    res = server.sftp_batch(user, f"put {big} big.bin\n")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert disk_usage(user.home) <= 64 * KiB
    assert_ledger_matches_disk(server, user)
    assert QUOTA_MSG.search(out), f"OpenSSH sftp does not show why the upload failed:\n{out}"


def test_openssh_sftp_put_failure_status(server):
    """The part of the above that holds whatever the message: failure reported, nothing else harmed."""
    user = add_user(server, "putter2", quota="64KiB")
    seed(server, user, {"keep": b"k" * (10 * KiB)})
    big = local_file(server, "big.bin", 100 * KiB)
    res = server.sftp_batch(user, f"put {big} big.bin\n")
    assert res.returncode != 0
    assert re.search(r"(?i)fail|quota", res.stdout + res.stderr), res
    assert (user.home / "keep").read_bytes() == b"k" * (10 * KiB)
    assert assert_ledger_matches_disk(server, user) <= 64 * KiB


def test_reput_completes_after_freeing_space(server):
    quota = 64 * KiB
    user = add_user(server, "resumer", quota=str(quota))
    seed(server, user, {"filler": b"f" * (32 * KiB)})
    src = local_file(server, "data.bin", 56 * KiB)
    data = src.read_bytes()

    def sftp_b(commands: str):
        # -B 16384: 16 KiB write requests (else OpenSSH sends 256 KiB ones and the first is refused whole)
        return server.openssh("sftp", user, ["-B", "16384", "-b", "-", f"{user.name}@{server.host}"],
                              input=commands)

    res = sftp_b(f"put {src} data.bin\n")
    assert res.returncode != 0
    partial = (user.home / "data.bin").read_bytes()
    assert len(partial) == 32 * KiB, "every write that fitted was kept, none that did not"
    assert data.startswith(partial), "a refused upload must keep exactly the accepted prefix"
    assert_ledger_matches_disk(server, user)

    res = sftp_b(f"rm filler\nreput {src} data.bin\n")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (user.home / "data.bin").read_bytes() == data
    assert assert_ledger_matches_disk(server, user) == len(data)


def _parse_scaled(text: str) -> int:
    """OpenSSH's `df -h` cell: fmt_scaled() plus "B" ('0BB', '512BB', '8.0KB', '1.5MB'; powers of 1024)."""
    m = re.fullmatch(r"([\d.]+)([BKMGTPE])B", text)
    assert m, text
    return round(float(m.group(1)) * 1024 ** "BKMGTPE".index(m.group(2)))


def test_openssh_df_shows_the_quota(server):
    quota = 4 * 1024 * KiB
    user = add_user(server, "dfuser", quota="4MiB")
    seed(server, user, {"f": b"x" * (1024 * KiB)})

    res = server.sftp_batch(user, "df -h /\ndf /\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    i = next(n for n, line in enumerate(lines) if "Size" in line and "Avail" in line and "Inodes" not in line)
    size, used, avail = (_parse_scaled(v) for v in lines[i + 1].split()[:3])
    assert (size, used, avail) == (quota, 1024 * KiB, quota - 1024 * KiB), lines[i:i + 2]
    j = next(n for n, line in enumerate(lines) if n > i + 1 and "Size" in line)
    size_k, used_k, avail_k = (int(v) for v in lines[j + 1].split()[:3])
    assert (size_k, used_k, avail_k) == (4096, 1024, 3072), lines[j:j + 2]
    assert_ledger_matches_disk(server, user)


def test_statvfs_matches_quota_and_usage(server):
    quota = 64 * KiB
    user = add_user(server, "vfs", quota=str(quota))

    async def check():
        async with server.sftp(user) as sftp:
            for size in (0, 1000, 64 * KiB):
                await put(sftp, "f", b"v" * size)
                for st in (await sftp.statvfs("/"), await sftp.statvfs("f")):
                    assert st.blocks * st.frsize == quota
                    assert (st.blocks - st.bfree) * st.frsize == size
                    assert st.bavail * st.frsize == quota - size
                async with sftp.open("f", "rb") as f:
                    st = await f.statvfs()
                    assert (st.blocks * st.frsize, st.bavail * st.frsize) == (quota, quota - size)
    run(check())
    assert assert_ledger_matches_disk(server, user) == quota


def test_user_list_shows_used_and_quota(server):
    user = add_user(server, "lister", quota="64KiB")
    other = add_user(server, "other", quota="unlimited")
    seed(server, user, {"f": b"x" * (16 * KiB)})
    seed(server, other, {"g": b"y" * 3000})
    row = user_row(server, user.name)
    assert (row["QUOTA"], row["USED"]) == ("64.0 KiB", "16.0 KiB")
    row = user_row(server, other.name)
    assert (row["QUOTA"], row["USED"]) == ("unlimited", "2.9 KiB")
    assert_ledger_matches_disk(server, user)
    assert_ledger_matches_disk(server, other)


# -- admin changes: quota lowered, files copied in by hand ---------------------------------------


def test_quota_lowered_below_usage(server):
    user = add_user(server, "shrunk", quota="64KiB")
    seed(server, user, {"a": b"a" * (20 * KiB), "b": b"b" * (20 * KiB), "c": b"c" * (20 * KiB)})
    res = server.cli("user", "quota", user.name, "30KiB")
    assert "above it" in res.stdout
    assert user_row(server, user.name)["QUOTA"] == "30.0 KiB"

    async def attack():
        async with server.sftp(user) as sftp:
            await refused(put(sftp, "new", b"n"))
            async with sftp.open("a", "ab") as f:
                await refused(f.write(b"a"))
            await refused(sftp.truncate("b", 20 * KiB + 1))
            await sftp.truncate("b", 10 * KiB)                        # shrinking is always allowed
            await sftp.remove("c")                                     # so is removing: 30 KiB used
            await refused(put(sftp, "new", b"n"))
            await sftp.remove("b")                                     # 20 KiB used
            st = await sftp.statvfs("/")
            assert (st.blocks, st.bavail) == (30 * KiB, 10 * KiB)
            await put(sftp, "new", b"n" * (10 * KiB))                   # allowed again, up to exactly 30
            await refused(put(sftp, "more", b"m"))
    run(attack())
    assert assert_ledger_matches_disk(server, user) == 30 * KiB


def test_quota_lowered_live_during_an_open_upload(server):
    user = add_user(server, "livecut", quota="1MiB")

    async def attack():
        async with server.sftp(user) as sftp, sftp.open("f", "wb") as f:
            await f.write(b"x" * (16 * KiB))
            server.cli("user", "quota", user.name, "16KiB")
            # the handle's reserved chunk must not outlive a lower quota
            await refused(f.write(b"x" * (16 * KiB), 16 * KiB))
    run(attack())
    assert assert_ledger_matches_disk(server, user) == 16 * KiB


def test_quota_scan_repairs_drift_after_a_manual_copy(server):
    user = add_user(server, "drift", quota="64KiB")
    seed(server, user, {"a": b"a" * (8 * KiB)})
    (user.home / "sub").mkdir()
    (user.home / "sub" / "manual.bin").write_bytes(b"m" * (40 * KiB))  # an admin copying in by hand
    os.symlink("sub/manual.bin", user.home / "link")                     # symlinks count zero
    assert ledger(server, user.name) == 8 * KiB

    res = server.cli("quota", "scan", user.name)
    assert "48.0 KiB used (was 8.0 KiB)" in res.stdout, res.stdout
    assert assert_ledger_matches_disk(server, user) == 48 * KiB
    res = server.cli("quota", "scan")
    assert "drift: 48.0 KiB used (unchanged)" in res.stdout, res.stdout

    async def attack():
        async with server.sftp(user) as sftp:
            await refused(put(sftp, "b", b"b" * (16 * KiB + 1)))
            await put(sftp, "b", b"b" * (16 * KiB))
    run(attack())
    assert assert_ledger_matches_disk(server, user) == 64 * KiB


# -- crashes and disconnects ---------------------------------------------------------------------


def test_disconnect_without_close_settles(server):
    user = add_user(server, "dropper", quota="64KiB")

    async def attack():
        conn = await server.connect(user)
        sftp = await conn.start_sftp_client()
        f = await sftp.open("f", "wb")
        await f.write(b"d" * (20 * KiB))
        assert ledger(server, user.name) > 20 * KiB      # a chunk reserved beyond what was written
        conn.abort()                                       # no CLOSE, no channel close
    run(attack())
    assert assert_ledger_matches_disk(server, user) == 20 * KiB


def test_sigkill_mid_upload_reconciles_on_restart(server):
    quota = 1024 * KiB
    user = add_user(server, "crasher", quota="1MiB")
    seed(server, user, {"done": b"d" * (100 * KiB)})

    async def upload_and_crash():
        conn = await server.connect(user)
        sftp = await conn.start_sftp_client()
        f = await sftp.open("partial", "wb")
        for off in range(0, 320 * KiB, 32 * KiB):
            await f.write(os.urandom(32 * KiB), off)
        # mid-upload: the store holds this process's reservation, beyond the bytes on disk
        assert ledger(server, user.name) > disk_usage(user.home)
        server.kill()
        conn.abort()
    run(upload_and_crash())
    on_disk = disk_usage(user.home)
    assert on_disk == 100 * KiB + 320 * KiB
    assert ledger(server, user.name) != on_disk        # the dead process's reservation is still there

    # ServerHandle.start() waits for "listening on" in an appended log and would find the old line:
    # start the new process on a fresh log so the test really waits for it
    server.log_path.rename(server.root / "server-before-kill.log")
    server.start()
    assert "quota usage rescanned after an unclean stop: crasher" in server.log(), server.log()
    assert assert_ledger_matches_disk(server, user) == on_disk

    async def fill():
        async with server.sftp(user) as sftp:
            await refused(put(sftp, "rest", b"r" * (quota - on_disk + 1)))
            await put(sftp, "rest", b"r" * (quota - on_disk))
    run(fill())
    assert assert_ledger_matches_disk(server, user) == quota


# -- several server processes sharing the store (--workers) ---------------------------------------


async def sftp_on_two_workers(server, user):
    """Two SFTP clients whose connections were accepted by different worker processes."""
    by_pid: dict[str, asyncssh.SSHClientConnection] = {}
    spare = []
    for i in range(30):
        # each attempt from its own loopback address: the server's per-source connection rate limit
        # would (rightly) refuse 30 quick connections from one source
        source = f"127.0.0.{10 + i}"
        conn = await server.connect(user, local_addr=(source, 0))
        port = conn.get_extra_info("sockname")[1]
        pid = None
        for _ in range(100):
            m = re.search(rf"\[(\d+)\]: login user={user.name} source={re.escape(source)}:{port} ", server.log())
            if m:
                pid = m.group(1)
                break
            await asyncio.sleep(0.02)
        assert pid, f"no login line for port {port}"
        if pid in by_pid:
            spare.append(conn)
        else:
            by_pid[pid] = conn
        if len(by_pid) == 2:
            break
    for conn in spare:
        conn.close()
    if len(by_pid) < 2:
        pytest.skip("the kernel gave every connection to one worker")
    a, b = by_pid.values()
    return a, b, await a.start_sftp_client(), await b.start_sftp_client()


def test_workers_racing_for_the_last_bytes_never_exceed_the_quota(workers_server):
    server = workers_server
    quota = 64 * KiB
    user = add_user(server, "wrace", quota=str(quota))
    seed(server, user, {"base": b"0" * (quota - 1000)})

    async def attack():
        ca, cb, sa, sb = await sftp_on_two_workers(server, user)
        async with ca, cb:
            fa, fb = await sa.open("a", "wb"), await sb.open("b", "wb")
            results = await asyncio.gather(fa.write(b"a" * 1000), fb.write(b"b" * 1000), return_exceptions=True)
            await fa.close()
            await fb.close()
        return results
    results = run(attack())
    assert sum(not isinstance(r, Exception) for r in results) <= 1, results
    assert assert_ledger_matches_disk(server, user) <= quota


def test_workers_refuse_only_when_the_quota_is_really_full(workers_server):
    """Another worker's unused reservation never refuses a write that fits: worker A's session writes
    a little and keeps its file open (A holds a pool of the user's quota), worker B's session then
    writes exactly up to the quota and succeeds; one byte more is refused, in either worker."""
    server = workers_server
    quota = 1024 * KiB
    user = add_user(server, "wexact", quota=str(quota))

    async def attack():
        ca, cb, sa, sb = await sftp_on_two_workers(server, user)
        async with ca, cb, sa.open("a", "wb") as fa:
            await fa.write(b"a" * KiB)                                  # A reserves ahead of its writes
            async with sb.open("b", "wb") as fb:
                await fb.write(b"b" * (quota - KiB))                    # fits: exactly the rest
                await refused(fb.write(b"b", quota - KiB))
            await refused(fa.write(b"a", KiB))
            await refused(put(sb, "c", b"c"))
    run(attack())
    assert assert_ledger_matches_disk(server, user) == quota


def test_workers_remove_while_open_in_another_process(workers_server):
    server = workers_server
    user = add_user(server, "wremove", quota="64KiB")
    seed(server, user, {"base": b"0" * (20 * KiB)})

    async def attack():
        ca, cb, sa, sb = await sftp_on_two_workers(server, user)
        async with ca, cb, sa.open("f", "wb") as f:
            await f.write(b"f" * (32 * KiB))
            await sb.remove("f")                                  # the other process unlinks it
    run(attack())
    assert assert_ledger_matches_disk(server, user) == 20 * KiB


def test_workers_trunc_while_open_in_another_process(workers_server):
    server = workers_server
    quota = 64 * KiB
    user = add_user(server, "wtrunc", quota=str(quota))

    async def attack():
        ca, cb, sa, sb = await sftp_on_two_workers(server, user)
        async with ca, cb:
            async with sa.open("f", "wb") as f:
                await f.write(b"1" * (48 * KiB))
                async with sb.open("f", "wb"):                         # the other process truncates it
                    pass
                await f.write(b"1" * (48 * KiB), 0)                    # regrowth must be charged again
            await refused(put(sb, "g", b"g" * (16 * KiB + 1)))
    run(attack())
    assert assert_ledger_matches_disk(server, user) == 48 * KiB
