"""Modes and privilege ("Hardening I", item 1), against a real `sshfiles serve` with real clients.

* No client can store a setuid, setgid or sticky bit, by any route: open attrs, setstat,
  fsetstat, mkdir, `scp -p` (SCP and SFTP protocol), OpenSSH sftp, PuTTY psftp, paramiko.
* The attack that motivated it (a root-run server, a setuid copy of `id` uploaded to a home the
  user had opened to the world) gives a local unprivileged account nothing.
* The home root's mode is not the user's to change.
* A mode the user set is honoured even though the server runs as root here: a read-only file is
  not overwritten, a read-only directory gains or loses no entry.
* Homes directory and home modes after `user add` and after a start with bad pre-existing modes.
* The same rules with the server running as an unprivileged account (the kernel enforces the
  owner bits there; the jail only strips the special bits).

The tests run as root (the server fixture then runs as root too).  Local unprivileged actions
run as uid 65534 through `setpriv`; no account is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import paramiko
import pytest
from asyncssh import SFTPAttrs
from conftest import ServerHandle, User, have, make_server

SPECIAL = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests drive a root-run server and setpriv")


# -- helpers ----------------------------------------------------------------------------------------

def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_plain(path: Path) -> None:
    """No setuid/setgid/sticky bit, and the owner can still read it (and enter it, for a directory)."""
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    assert mode & SPECIAL == 0, f"{path} has mode {mode:04o}"
    need = stat.S_IRUSR | (stat.S_IXUSR if stat.S_ISDIR(st.st_mode) else 0)
    assert mode & need == need, f"{path} has mode {mode:04o}"


def run(cmd: list[str], *, input: str | None = None, timeout: float = 60, cwd: Path | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """A client in its own process group, killed whole on timeout or when done."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[0]} timed out\nstdout: {out}\nstderr: {err}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def as_nobody(cmd: list[str], cwd: Path = Path("/")) -> subprocess.CompletedProcess:
    """Run CMD as uid/gid 65534 with no capabilities.  Through `sh`: setpriv keeps root's capabilities
    until its own execve, so the program it executes directly is looked up with them."""
    return run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-c", 'exec "$@"',
                "sh", *cmd], cwd=cwd, timeout=20)


def scp(server: ServerHandle, user: User, args: list[str]) -> subprocess.CompletedProcess:
    return server.openssh("scp", user, args)


def denied(exc_info: pytest.ExceptionInfo) -> None:
    assert isinstance(exc_info.value, asyncssh.SFTPPermissionDenied), exc_info.value


@dataclass
class Bystander:
    """Another user whose home must come out of every test exactly as it went in."""

    user: User
    snapshot: dict[str, tuple[int, bytes]]

    @classmethod
    def create(cls, server: ServerHandle) -> Bystander:
        user = server.add_user("bystander")
        (user.home / "sub").mkdir(mode=0o750)
        (user.home / "keep.txt").write_text("bystander's file\n")
        os.chmod(user.home / "keep.txt", 0o640)
        return cls(user, cls._take(user.home))

    @staticmethod
    def _take(home: Path) -> dict[str, tuple[int, bytes]]:
        snap = {".": (os.lstat(home).st_mode, b"")}
        for p in sorted(home.rglob("*")):
            st = os.lstat(p)
            snap[str(p.relative_to(home))] = (st.st_mode, p.read_bytes() if p.is_file() else b"")
        return snap

    def check(self) -> None:
        assert self._take(self.user.home) == self.snapshot


@pytest.fixture
def bystander(server: ServerHandle) -> Iterator[Bystander]:
    b = Bystander.create(server)
    yield b
    b.check()


def host_fingerprint(server: ServerHandle) -> str:
    res = run(["ssh-keygen", "-lf", str(server.keys_dir / "ssh_host_ed25519_key.pub")], timeout=20)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()[1]


# -- no special bits, by any route ------------------------------------------------------------------

def test_open_attrs_cannot_create_setuid_setgid_or_sticky_files(server, bystander):
    user = server.add_user("alice")

    async def upload() -> None:
        async with server.sftp(user) as sftp:
            for name, perms in (("suid", 0o4755), ("sgid", 0o2755), ("all", 0o7777), ("sticky", 0o1644),
                                ("none", 0o000)):
                async with sftp.open(name, "w", attrs=SFTPAttrs(permissions=perms)) as f:
                    await f.write("payload")

    asyncio.run(upload())
    for name in ("suid", "sgid", "all", "sticky", "none"):
        assert_plain(user.home / name)
        assert (user.home / name).read_text() == "payload"
    assert mode_of(user.home / "suid") == 0o755   # only the special bit went
    assert mode_of(user.home / "none") == 0o400   # the owner's read bit is always kept


def test_setstat_and_fsetstat_cannot_set_special_bits(server, bystander):
    user = server.add_user("alice")
    (user.home / "f").write_text("x")
    (user.home / "d").mkdir()

    async def chmods() -> None:
        async with server.sftp(user) as sftp:
            for mode in (0o6777, 0o1777, 0o4755, 0o2750):
                await sftp.chmod("f", mode)
                assert_plain(user.home / "f")
                assert mode_of(user.home / "f") == mode & 0o777
                await sftp.chmod("d", mode)
                assert_plain(user.home / "d")
                await sftp.setstat("f", SFTPAttrs(permissions=mode))
                assert_plain(user.home / "f")
                async with sftp.open("f", "r+") as fh:   # fsetstat on a handle
                    await fh.chmod(mode)
                assert_plain(user.home / "f")
            await sftp.chmod("f", 0o000)
            await sftp.chmod("d", 0o000)

    asyncio.run(chmods())
    assert mode_of(user.home / "f") == 0o400
    assert mode_of(user.home / "d") == 0o500
    assert (user.home / "f").read_text() == "x"


def test_mkdir_cannot_create_special_directories(server, bystander):
    user = server.add_user("alice")
    sgid = user.home / "restored"   # an admin-restored setgid directory: children must not inherit it
    sgid.mkdir()
    os.chmod(sgid, 0o2755)

    async def mkdirs() -> None:
        async with server.sftp(user) as sftp:
            await sftp.mkdir("g", attrs=SFTPAttrs(permissions=0o2777))
            await sftp.mkdir("t", attrs=SFTPAttrs(permissions=0o1777))
            await sftp.mkdir("z", attrs=SFTPAttrs(permissions=0o000))
            await sftp.mkdir("restored/child")

    asyncio.run(mkdirs())
    for name in ("g", "t", "z", "restored/child"):
        assert_plain(user.home / name)
    assert mode_of(user.home / "z") == 0o500


@pytest.mark.parametrize("protocol", ["-O", "-s"], ids=["scp-protocol", "sftp-protocol"])
def test_scp_preserve_strips_special_bits(server, bystander, tmp_path, protocol):
    user = server.add_user("alice")
    src = tmp_path / "src"
    src.mkdir()
    tool = src / "tool"
    shutil.copyfile("/usr/bin/id", tool)
    os.chmod(tool, 0o4755)
    tree = src / "tree"
    tree.mkdir()
    (tree / "inner").write_text("in")
    os.chmod(tree / "inner", 0o6750)
    os.chmod(tree, 0o3775)
    res = scp(server, user, [protocol, "-p", str(tool), f"{user.name}@127.0.0.1:/tool"])
    assert res.returncode == 0, res.stderr
    res = scp(server, user, [protocol, "-p", "-r", str(tree), f"{user.name}@127.0.0.1:/"])
    assert res.returncode == 0, res.stderr
    for name in ("tool", "tree", "tree/inner"):
        assert_plain(user.home / name)
    assert mode_of(user.home / "tool") == 0o755
    assert (user.home / "tool").read_bytes() == tool.read_bytes()


def test_openssh_sftp_paramiko_and_psftp_chmod_strip_special_bits(server, bystander, tmp_path):
    user = server.add_user("alice")
    for name in ("a", "b", "c", "d"):
        (user.home / name).write_text(name)
    local = tmp_path / "local"
    local.mkdir()
    (local / "up").write_text("up")
    os.chmod(local / "up", 0o4755)
    res = server.sftp_batch(user, "chmod 4755 a\nchmod 7777 b\nput -p up\n", cwd=local)
    assert res.returncode == 0, res.stderr
    t = paramiko.Transport(("127.0.0.1", server.port))
    t.connect(username=user.name, password=user.password)
    try:
        paramiko.SFTPClient.from_transport(t).chmod("c", 0o6755)
    finally:
        t.close()
    checked = ["a", "b", "c", "up"]
    if have("psftp") and have("ssh-keygen"):
        script = tmp_path / "psftp.txt"
        script.write_text("chmod 4755 d\nchmod u+s,g+s,+t d\nmkdir e\nchmod 3777 e\n")
        res = run(["psftp", "-batch", "-P", str(server.port), "-pw", user.password or "", "-hostkey",
                   host_fingerprint(server), "-b", str(script), f"{user.name}@127.0.0.1"])
        assert res.returncode == 0, res.stdout + res.stderr
        checked += ["d", "e"]
    for name in checked:
        assert_plain(user.home / name)


# -- the attack -------------------------------------------------------------------------------------

@pytest.fixture
def public_server(host_keys_dir: Path) -> Iterator[ServerHandle]:
    """A root-run server whose state directory is world-traversable (like /srv/sshfiles), with the
    homes directory created by sshfiles itself, so only sshfiles' own modes stand between a home
    and the local accounts."""
    base = Path(tempfile.mkdtemp(prefix="sshfiles-modes-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        root = base / "srv"
        root.mkdir(mode=0o755)
        shutil.copytree(host_keys_dir, root / "keys")
        h = ServerHandle(root=root, keys_dir=root / "keys", accounts_dir=root / "accounts",
                         homes_dir=root / "homes")
        h.start()
        try:
            yield h
        finally:
            h.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_uploaded_setuid_binary_gives_a_local_account_nothing(public_server):
    server = public_server
    user = server.add_user("mallory")
    by = Bystander.create(server)
    payload = Path("/usr/bin/id").read_bytes()

    async def attack() -> Exception | None:
        async with server.sftp(user) as sftp:
            try:                                   # open the home to the world
                await sftp.chmod("/", 0o755)
                refusal = None
            except asyncssh.SFTPError as exc:
                refusal = exc
            async with sftp.open("id", "wb", attrs=SFTPAttrs(permissions=0o4755)) as f:
                await f.write(payload)
            await sftp.chmod("id", 0o4755)
            await sftp.chmod("id", 0o6755)
        return refusal

    refusal = asyncio.run(attack())
    stored = user.home / "id"
    assert stored.read_bytes() == payload
    # from its place in the home: never euid 0; in fact the local account cannot even reach it
    res = as_nobody([str(stored), "-u"])
    assert res.stdout.strip() != "0", "a local account got euid 0"
    assert res.returncode != 0, (res.stdout, res.stderr)
    assert isinstance(refusal, asyncssh.SFTPPermissionDenied), refusal
    assert_plain(stored)
    res = as_nobody(["ls", str(server.homes_dir)])
    assert res.returncode != 0, res.stdout
    # from a path it can reach, with the stored mode: it runs, as itself
    reach = server.root.parent / "reach"
    reach.mkdir(mode=0o755)
    shutil.copy2(stored, reach / "id")      # copies the stored mode bits, owner root as on the server
    assert mode_of(reach / "id") == mode_of(stored)
    res = as_nobody([str(reach / "id"), "-u"])
    assert res.returncode == 0 and res.stdout.strip() == str(NOBODY), (res.stdout, res.stderr)
    by.check()


# -- the home root is not the user's to change ------------------------------------------------------

def test_home_root_mode_cannot_be_changed(server, bystander, tmp_path):
    user = server.add_user("alice")
    (user.home / "sub").mkdir()
    before = mode_of(user.home)

    async def attempts() -> None:
        async with server.sftp(user) as sftp:
            for path in ("/", ".", "", "/..", "sub/..", "../..", "//"):
                with pytest.raises(asyncssh.SFTPError) as exc:
                    await sftp.chmod(path, 0o777)
                denied(exc)
                assert "home" in exc.value.reason
                with pytest.raises(asyncssh.SFTPError) as exc:
                    await sftp.setstat(path, SFTPAttrs(permissions=0o4777))
                denied(exc)
            await sftp.utime("/", (1_000_000_000, 1_000_000_000))   # times are still the user's
            await sftp.chmod("sub", 0o750)                          # and so is everything below the root

    asyncio.run(attempts())
    assert mode_of(user.home) == before == 0o700
    assert os.stat(user.home).st_mtime == 1_000_000_000
    assert mode_of(user.home / "sub") == 0o750
    res = server.sftp_batch(user, "chmod 777 .\n", cwd=tmp_path)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    res = server.sftp_batch(user, "chmod 777 /\n", cwd=tmp_path)
    assert res.returncode != 0
    assert mode_of(user.home) == 0o700


# -- the user's own modes are honoured by a root-run server -----------------------------------------

def test_read_only_file_is_not_overwritten(server, bystander, tmp_path):
    user = server.add_user("alice")
    (user.home / "ro.txt").write_text("original\n")
    (tmp_path / "ro.txt").write_text("replacement\n")

    async def chmod(mode: int) -> None:
        async with server.sftp(user) as sftp:
            await sftp.chmod("ro.txt", mode)

    async def overwrite_attempts() -> None:
        async with server.sftp(user) as sftp:
            for mode in ("w", "a", "r+", "wb"):
                with pytest.raises(asyncssh.SFTPError) as exc:
                    async with sftp.open("ro.txt", mode) as f:
                        await f.write("overwritten")
                denied(exc)
                assert "read-only" in exc.value.reason   # the jail's refusal: root ignores the bit
            with pytest.raises(asyncssh.SFTPError) as exc:   # setstat size
                await sftp.truncate("ro.txt", 0)
            denied(exc)
            async with sftp.open("ro.txt", "r") as f:       # reading is still fine
                assert await f.read() == "original\n"

    asyncio.run(chmod(0o444))   # WinSCP's "read-only"
    asyncio.run(overwrite_attempts())
    res = server.sftp_batch(user, "put ro.txt\n", cwd=tmp_path)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    assert (user.home / "ro.txt").read_text() == "original\n"
    assert mode_of(user.home / "ro.txt") == 0o444
    # made writable again by its owner: the same upload works
    asyncio.run(chmod(0o644))
    res = server.sftp_batch(user, "put ro.txt\n", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (user.home / "ro.txt").read_text() == "replacement\n"


def test_read_only_directory_gains_and_loses_nothing(server, bystander, tmp_path):
    user = server.add_user("alice")
    d = user.home / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (user.home / "outside.txt").write_text("o")
    (user.home / "movable").mkdir()
    (tmp_path / "new.txt").write_text("new")

    def listing() -> dict[str, bytes]:
        return {str(p.relative_to(user.home)): (p.read_bytes() if p.is_file() else b"")
                for p in sorted(user.home.rglob("*"))}

    async def chmod(mode: int) -> None:
        async with server.sftp(user) as sftp:
            await sftp.chmod("d", mode)

    asyncio.run(chmod(0o555))
    before = listing()

    async def attempts() -> None:
        async with server.sftp(user) as sftp:
            ops = [lambda: sftp.mkdir("d/x"), lambda: sftp.remove("d/a.txt"), lambda: sftp.rmdir("d/sub"),
                   lambda: sftp.rename("d/a.txt", "d/b.txt"), lambda: sftp.rename("d/a.txt", "a.txt"),
                   lambda: sftp.rename("outside.txt", "d/outside.txt"),
                   lambda: sftp.posix_rename("outside.txt", "d/a.txt"), lambda: sftp.rename("d/sub", "sub2")]
            for op in ops:
                with pytest.raises(asyncssh.SFTPError) as exc:
                    await op()
                denied(exc)
            with pytest.raises(asyncssh.SFTPError) as exc:
                async with sftp.open("d/new.txt", "w") as f:
                    await f.write("x")
            denied(exc)

    async def move_read_only_dir() -> None:
        """Moving a directory to another parent rewrites its '..': it needs write on the directory
        itself, as the kernel wants; within the same parent it does not."""
        async with server.sftp(user) as sftp:
            await sftp.mkdir("target")
            await sftp.chmod("movable", 0o555)
            with pytest.raises(asyncssh.SFTPError) as exc:
                await sftp.rename("movable", "target/movable")
            denied(exc)
            await sftp.rename("movable", "movable2")
            await sftp.chmod("movable2", 0o755)
            await sftp.rename("movable2", "target/movable")

    asyncio.run(attempts())
    for cmd in ("put new.txt d/new.txt", "mkdir d/y", "rm d/a.txt", "rename d/a.txt d/c.txt", "rmdir d/sub"):
        res = server.sftp_batch(user, cmd + "\n", cwd=tmp_path)
        assert res.returncode != 0, cmd
        assert "Permission denied" in res.stderr, (cmd, res.stderr)
    assert listing() == before
    assert mode_of(d) == 0o555
    asyncio.run(move_read_only_dir())
    assert (user.home / "target" / "movable").is_dir()
    # writable again: everything works
    asyncio.run(chmod(0o755))
    res = server.sftp_batch(user, "put new.txt d/new.txt\nmkdir d/y\nrm d/a.txt\nrmdir d/sub\n", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in d.iterdir()) == ["new.txt", "y"]


# -- homes ------------------------------------------------------------------------------------------

def test_user_add_creates_private_homes(tmp_path):
    fresh = ServerHandle(root=tmp_path, keys_dir=tmp_path / "keys", accounts_dir=tmp_path / "accounts",
                         homes_dir=tmp_path / "state" / "homes")
    alice = fresh.add_user("alice")
    assert mode_of(fresh.homes_dir) == 0o700
    assert mode_of(alice.home) == 0o700
    # an existing world-listable homes directory gives others nothing any more
    os.chmod(fresh.homes_dir, 0o777)
    bob = fresh.add_user("bob")
    assert mode_of(fresh.homes_dir) == 0o700
    assert mode_of(bob.home) == 0o700
    assert mode_of(alice.home) == 0o700


def test_start_corrects_bad_home_modes(tmp_path, host_keys_dir):
    server = make_server(tmp_path, host_keys_dir)
    alice = server.add_user("alice")
    bob = server.add_user("bob")
    carol = server.add_user("carol")
    os.chmod(alice.home, 0o777)      # opened to the world by an older version
    os.chmod(carol.home, 0o4770)     # setuid and group write
    os.chmod(server.homes_dir, 0o777)
    server.start()
    try:
        assert mode_of(alice.home) == 0o755
        assert mode_of(carol.home) == 0o750
        assert mode_of(bob.home) == 0o700           # the bystander: untouched, nothing logged
        assert mode_of(server.homes_dir) == 0o700
        log = server.log()
        lines = [line for line in log.splitlines() if "mode" in line and "corrected" in line]
        assert len(lines) == 3, log
        assert any(str(alice.home) in line and "0777" in line for line in lines)
        assert any(str(carol.home) in line and "4770" in line for line in lines)
        assert any(str(server.homes_dir) in line for line in lines)
        assert not any(str(bob.home) in line for line in lines)

        async def login() -> None:   # the corrected homes still serve
            async with server.sftp(alice) as sftp, sftp.open("f", "w") as f:
                await f.write("ok")

        asyncio.run(login())
        assert (alice.home / "f").read_text() == "ok"
    finally:
        server.stop()
    # a second start finds nothing to correct
    offset = len(server.log())
    server.start()
    try:
        assert "corrected" not in server.log()[offset:]
    finally:
        server.stop()


# -- the same rules on a server running as an unprivileged account ----------------------------------

@dataclass
class UnprivilegedServer(ServerHandle):
    """`sshfiles` run as uid 65534 (no account is created).  This interpreter lives under /root
    (mode 0700 here), so each run bind-mounts it onto a world-readable directory in a private mount
    namespace (`unshare -m`, gone with the process) and drops to the uid with `setpriv`."""

    pybind: Path = Path("/nonexistent")

    def python_cmd(self) -> list[str]:
        """This interpreter, run as uid 65534 from the worktree (so the worktree's sshfiles runs)."""
        prefix = Path(sys.base_prefix).resolve()
        python = self.pybind / Path(sys.executable).resolve().relative_to(prefix)
        inner = ["env", f"LD_LIBRARY_PATH={self.pybind / 'lib'}", "setpriv", f"--reuid={NOBODY}",
                 f"--regid={NOBODY}", "--clear-groups", str(python)]
        script = (f"mount --bind {shlex.quote(str(prefix))} {shlex.quote(str(self.pybind))}"
                  f' && cd {shlex.quote(str(REPO))} && exec "$@"')
        return ["unshare", "-m", "sh", "-c", script, "sh", *inner]

    def base_cmd(self) -> list[str]:
        return [*self.python_cmd(), "-m", "sshfiles", "--keys-dir", str(self.keys_dir), "--accounts-dir", str(self.accounts_dir), "--homes-dir", str(self.homes_dir)]


@pytest.fixture
def unprivileged_server(host_keys_dir: Path) -> Iterator[UnprivilegedServer]:
    if not (have("unshare") and have("setpriv")):
        pytest.skip("needs unshare and setpriv")
    base = Path(tempfile.mkdtemp(prefix="sshfiles-unpriv-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        (base / "py").mkdir(mode=0o755)
        state = base / "state"
        state.mkdir(mode=0o700)
        shutil.copytree(host_keys_dir, state / "keys")
        for p in [state, *state.rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
        h = UnprivilegedServer(root=state, keys_dir=state / "keys", accounts_dir=state / "accounts",
                               homes_dir=state / "homes", pybind=base / "py")
        probe = run([*h.python_cmd(), "-c", "import os, asyncssh; print(os.geteuid())"], timeout=30)
        if probe.returncode != 0 or probe.stdout.strip() != str(NOBODY):
            pytest.skip(f"cannot run the server as uid {NOBODY} here: {probe.stderr.strip()[-300:]}")
        h.start()
        try:
            yield h
        finally:
            h.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unprivileged_server_same_rules(unprivileged_server, tmp_path):
    server = unprivileged_server
    user = server.add_user("alice")
    by = Bystander.create(server)
    assert os.stat(user.home).st_uid == NOBODY
    assert mode_of(server.homes_dir) == 0o700 and mode_of(user.home) == 0o700
    (tmp_path / "ro.txt").write_text("replacement\n")

    async def session() -> None:
        async with server.sftp(user) as sftp:
            async with sftp.open("suid", "w", attrs=SFTPAttrs(permissions=0o6777)) as f:
                await f.write("x")
            await sftp.mkdir("d", attrs=SFTPAttrs(permissions=0o3777))
            await sftp.chmod("suid", 0o4755)
            with pytest.raises(asyncssh.SFTPError) as exc:
                await sftp.chmod("/", 0o777)
            denied(exc)
            async with sftp.open("ro.txt", "w") as f:
                await f.write("original\n")
            await sftp.chmod("ro.txt", 0o444)
            with pytest.raises(asyncssh.SFTPError) as exc:
                async with sftp.open("ro.txt", "w") as f:
                    await f.write("overwritten")
            denied(exc)
            assert "read-only" not in exc.value.reason   # the kernel's refusal: the jail leaves it to it
            await sftp.chmod("d", 0o555)
            with pytest.raises(asyncssh.SFTPError) as exc:
                await sftp.mkdir("d/x")
            denied(exc)
            await sftp.chmod("d", 0o000)        # the owner keeps r-x on a directory
            assert await sftp.listdir("d") is not None

    asyncio.run(session())
    for name in ("suid", "d"):
        assert_plain(user.home / name)
        assert os.stat(user.home / name).st_uid == NOBODY
    assert mode_of(user.home / "d") == 0o500
    assert mode_of(user.home) == 0o700
    res = server.sftp_batch(user, "put ro.txt\n", cwd=tmp_path)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    assert (user.home / "ro.txt").read_text() == "original\n"
    by.check()
