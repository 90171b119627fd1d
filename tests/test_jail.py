"""Adversarial tests of the jail: every way out we know of, tried as an attacker would.

Each test asserts both the refusal (or confinement) and that the file outside
the home is unchanged and was never read.  Symlinks the attacker cannot
create through SFTP (creation is refused) are planted on the host side, as
an admin restoring a backup or a pre-existing tree would leave them.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import asyncssh
import paramiko
import pytest

SECRET = "TOP SECRET host data\n"


def assert_untouched(outside: Path) -> None:
    assert outside.read_text() == SECRET
    assert stat.S_IMODE(outside.stat().st_mode) != 0o777


def escape_paths(server, outside: Path) -> list[str]:
    """Spellings of the outside file from inside a home at homes/<user>."""
    return [
        "../secret.txt", "../../secret.txt", "/../secret.txt", "/../../secret.txt",
        "../../../../../../../../" + str(outside).lstrip("/"), str(outside),
        "sub/../../secret.txt", "./../secret.txt", "//..//..//secret.txt",
    ]


async def _errors_of(coro) -> str | None:
    try:
        await coro
    except asyncssh.SFTPError as exc:
        return exc.reason
    return None


def test_dotdot_and_absolute_paths_cannot_read_outside(server, outside):
    user = server.add_user("mallory")

    async def attack() -> list[str]:
        reasons = []
        async with server.sftp(user) as sftp:
            for path in escape_paths(server, outside):
                for op in (sftp.stat, sftp.lstat, sftp.listdir):
                    reason = await _errors_of(op(path))
                    assert reason is not None, f"{op.__name__}({path}) succeeded"
                    reasons.append(reason)
                try:
                    async with sftp.open(path, "rb") as f:
                        data = await f.read()
                    pytest.fail(f"opened {path}: {data[:20]!r}")
                except asyncssh.SFTPNoSuchFile as exc:
                    reasons.append(exc.reason)
            # directories above the home look like the home itself, listing nothing of the host
            for path in ("..", "/..", "../..", "/../../.."):
                assert await sftp.realpath(path) == "/"
                names = set(await sftp.listdir(path))
                assert names == {".", ".."}
        return reasons

    reasons = asyncio.run(attack())
    for r in reasons:
        assert str(server.root) not in r and "secret" not in r.lower()
    assert_untouched(outside)


def test_writes_through_dotdot_land_inside_the_home(server, outside):
    user = server.add_user("mallory")
    home = user.home

    async def attack() -> None:
        async with server.sftp(user) as sftp:
            for i, path in enumerate(escape_paths(server, outside)):
                try:
                    async with sftp.open(path, "wb") as f:
                        await f.write(b"pwned %d" % i)
                except asyncssh.SFTPError:
                    pass  # refused is fine too
                for op in (sftp.remove, lambda p: sftp.chmod(p, 0o777), lambda p: sftp.truncate(p, 0),
                           lambda p: sftp.rename(p, "stolen"), lambda p: sftp.utime(p, (0, 0))):
                    try:
                        await op(path)
                    except asyncssh.SFTPError:
                        pass
            await sftp.mkdir("../escaped_dir")

    before = sorted(os.listdir(server.root))
    asyncio.run(attack())
    assert_untouched(outside)
    assert sorted(os.listdir(server.root)) == before
    for dirpath, _, files in os.walk(server.root):
        if Path(dirpath).is_relative_to(server.homes_dir):
            continue
        for name in files:
            assert b"pwned" not in (Path(dirpath) / name).read_bytes()
    # whatever was created landed in the home
    assert (home / "escaped_dir").is_dir()


def test_users_cannot_reach_each_other(server):
    alice = server.add_user("alice")
    bob = server.add_user("bob")
    (alice.home / "diary.txt").write_text("alice's secret")

    async def attack() -> None:
        async with server.sftp(bob) as sftp:
            for path in ("../alice/diary.txt", "/../alice/diary.txt", str(alice.home / "diary.txt"),
                         "/alice/diary.txt", "../../homes/alice/diary.txt"):
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await sftp.stat(path)
            assert "alice" not in await sftp.listdir("/..")

    asyncio.run(attack())
    assert (alice.home / "diary.txt").read_text() == "alice's secret"


def test_symlink_creation_is_refused_by_every_client(server, outside):
    user = server.add_user("mallory")

    async def attack() -> None:
        async with server.sftp(user) as sftp:
            for target in (str(outside), "../secret.txt", "/etc/passwd", "inside.txt"):
                with pytest.raises(asyncssh.SFTPOpUnsupported, match="not supported"):
                    await sftp.symlink(target, "link")
            with pytest.raises(asyncssh.SFTPError):
                await sftp.lstat("link")

    asyncio.run(attack())
    # OpenSSH's `ln -s` (SYMLINK, OpenSSH argument order)
    res = server.sftp_batch(user, f"ln -s {outside} link2\n")
    assert res.returncode != 0
    # paramiko
    t = paramiko.Transport(("127.0.0.1", server.port))
    t.connect(username=user.name, password=user.password)
    try:
        sftp = paramiko.SFTPClient.from_transport(t)
        with pytest.raises(IOError):
            sftp.symlink(str(outside), "link3")
    finally:
        t.close()
    assert not any(p.is_symlink() for p in user.home.iterdir())
    assert_untouched(outside)


def test_hard_links_are_refused(server, outside):
    user = server.add_user("mallory")
    (user.home / "mine.txt").write_text("mine")

    async def attack() -> None:
        async with server.sftp(user) as sftp:
            for src in ("../secret.txt", str(outside), "mine.txt"):
                with pytest.raises(asyncssh.SFTPError):
                    await sftp.link(src, "hl")
    asyncio.run(attack())
    res = server.sftp_batch(user, "ln mine.txt hl2\n")
    assert res.returncode != 0
    assert sorted(p.name for p in user.home.iterdir()) == ["mine.txt"]
    assert outside.stat().st_nlink == 1
    assert_untouched(outside)


def test_planted_symlinks_resolve_inside_the_home(server, outside):
    """Absolute and relative links that point outside on the host point inside for the user."""
    user = server.add_user("mallory")
    home = user.home
    (home / "sub").mkdir()
    os.symlink(str(outside), home / "abs")                      # absolute host path
    os.symlink("../secret.txt", home / "rel")                   # relative, leaves the home
    os.symlink("../../secret.txt", home / "sub" / "rel2")       # relative from a subdirectory
    os.symlink("/proc/self/root/" + str(outside).lstrip("/"), home / "magic")  # magic link
    os.symlink(str(outside.parent), home / "dirlink")           # a directory outside

    async def attack() -> None:
        async with server.sftp(user) as sftp:
            names = ("abs", "rel", "sub/rel2", "magic", "dirlink/secret.txt")
            for name in names:
                with pytest.raises(asyncssh.SFTPError):
                    async with sftp.open(name, "rb") as f:
                        await f.read()
            for name in names:
                try:  # creating through a dangling link: refused, or created inside the home
                    async with sftp.open(name, "wb") as f:
                        await f.write(b"x")
                except asyncssh.SFTPError:
                    pass
            for name in names:  # what the links now reach is what the user wrote, never the host file
                try:
                    async with sftp.open(name, "rb") as f:
                        assert await f.read() == b"x"
                except asyncssh.SFTPError:
                    pass
            with pytest.raises(asyncssh.SFTPError):
                await sftp.listdir("dirlink")
            # readlink shows the link text, realpath never a host path
            for name in ("abs", "rel", "dirlink"):
                real = await sftp.realpath(name)
                assert not real.startswith(str(server.root))

    # the writes through dangling links may create files, but only inside the home
    asyncio.run(attack())
    assert_untouched(outside)


def test_symlink_moved_up_after_creation_stays_confined(server, outside):
    """A relative link that pointed inside points outside on the host once moved up: still confined."""
    user = server.add_user("mallory")
    home = user.home
    (home / "a" / "b").mkdir(parents=True)
    (home / "target.txt").write_text("inside")
    decoy = server.root / "target.txt"   # where ../../target.txt from the home lands on the host
    decoy.write_text(SECRET)
    os.symlink("../../target.txt", home / "a" / "b" / "link")  # inside when created

    async def attack() -> list[bytes]:
        got = []
        async with server.sftp(user) as sftp:
            async with sftp.open("a/b/link", "rb") as f:
                assert await f.read() == b"inside"
            await sftp.rename("a/b/link", "link")   # moved up: on the host it now reaches the decoy
            await sftp.rename("a", "x")             # and the directory it came from moved too
            for path in ("link", "x/../link", "/link"):
                try:
                    async with sftp.open(path, "rb") as f:
                        got.append(await f.read())
                except asyncssh.SFTPError:
                    pass
            try:
                async with sftp.open("link", "r+b") as f:
                    await f.write(b"overwrite")
            except asyncssh.SFTPError:
                pass
        return got

    got = asyncio.run(attack())
    assert got and all(data in (b"inside",) for data in got)
    assert decoy.read_text() == SECRET
    assert_untouched(outside)


def test_directory_swapped_for_symlink_between_operations(server, outside):
    """Two sessions race: one keeps swapping a directory with a planted outside-pointing link."""
    user = server.add_user("mallory")
    home = user.home
    (home / "d").mkdir()
    os.symlink(str(outside.parent), home / "evil")  # planted: a directory link pointing at the host dir

    async def swapper(sftp: asyncssh.SFTPClient, rounds: int) -> None:
        for _ in range(rounds):
            await sftp.rename("d", "d_real")
            await sftp.rename("evil", "d")
            await sftp.rename("d", "evil")
            await sftp.rename("d_real", "d")

    async def victim(sftp: asyncssh.SFTPClient, rounds: int) -> list[bytes]:
        seen = []
        for i in range(rounds):
            for op in ("read", "write", "remove", "chmod"):
                try:
                    if op == "read":
                        async with sftp.open("d/secret.txt", "rb") as f:
                            seen.append(await f.read())
                    elif op == "write":
                        async with sftp.open("d/secret.txt", "wb") as f:
                            await f.write(b"overwritten %d" % i)
                    elif op == "remove":
                        await sftp.remove("d/secret.txt")
                    else:
                        await sftp.chmod("d/secret.txt", 0o777)
                except asyncssh.SFTPError:
                    pass
        return seen

    async def race() -> list[bytes]:
        async with server.sftp(user) as s1, server.sftp(user) as s2:
            _, seen = await asyncio.gather(swapper(s1, 60), victim(s2, 60))
            return seen

    seen = asyncio.run(race())
    assert all(b"TOP SECRET" not in data for data in seen)
    assert_untouched(outside)


def test_fifo_and_special_files_never_block(server):
    user = server.add_user("mallory")
    os.mkfifo(user.home / "pipe")

    async def attack() -> None:
        async with server.sftp(user) as sftp:
            for mode in ("rb", "wb"):
                with pytest.raises(asyncssh.SFTPError):
                    async with sftp.open("pipe", mode) as f:
                        await f.read()

    asyncio.run(asyncio.wait_for(attack(), 20))


def test_realpath_and_errors_never_show_host_paths(server, outside):
    user = server.add_user("mallory")

    async def probe() -> list[str]:
        texts = []
        async with server.sftp(user) as sftp:
            for p in (".", "..", "/", "nope/../..", "a/b/../../.."):
                texts.append(await sftp.realpath(p))
            # a host path typed by the client names a (missing) path inside the home
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp.stat(str(server.root))
            for op in (sftp.remove, sftp.rmdir, sftp.listdir, sftp.stat, sftp.readlink):
                texts.append(await _errors_of(op("missing/x")) or "")
            texts.append(await _errors_of(sftp.mkdir("/")) or "")
            texts.append(await _errors_of(sftp.rmdir("/")) or "")
        return texts

    texts = asyncio.run(probe())
    assert texts[0] == "/" and texts[1] == "/" and texts[2] == "/"
    for t in texts:
        assert str(server.root) not in t and str(user.home) not in t


def test_exec_hash_cannot_read_outside(server, outside):
    user = server.add_user("mallory")
    res = server.openssh("ssh", user, [f"{user.name}@127.0.0.1", "sha256sum ../secret.txt"])
    assert res.returncode != 0
    assert "TOP SECRET" not in res.stdout and str(server.root) not in res.stderr
    res = server.openssh("ssh", user, [f"{user.name}@127.0.0.1", f"sha256sum {outside}"])
    assert res.returncode != 0
    assert_untouched(outside)


def test_openssh_sftp_cannot_get_outside(server, outside, tmp_path):
    user = server.add_user("mallory")
    dest = tmp_path / "dl"
    dest.mkdir()
    res = server.sftp_batch(user, f"get ../secret.txt\nget {outside}\n", cwd=dest)
    assert res.returncode != 0
    assert list(dest.iterdir()) == []
    res = server.sftp_batch(user, "cd ..\npwd\nls\n", cwd=dest)
    assert "Remote working directory: /" in res.stdout
    assert "secret" not in res.stdout and "homes" not in res.stdout
    assert_untouched(outside)
