"""Stock clients against a real `sshfiles serve` (issue 2, "Stock clients must just work").

Each client gets its own test: OpenSSH sftp/scp, PuTTY psftp/pscp, lftp, curl (libssh2), rclone
(Go pkg/sftp), paramiko, asyncssh and sshfs.  Every test compares file bytes by hash, checks exit
codes, and where a resume is claimed it proves it with the byte count the server logged for that
transfer.  Nothing is mocked; all traffic goes to the fixture's server on 127.0.0.1.

Every subprocess runs in its own session with a timeout; on timeout the whole process group (the
client and any ssh it spawned) is killed, so no test leaves a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerHandle, User

MiB = 1024 * 1024


# -- helpers ----------------------------------------------------------------------------------------

def need(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (CI installs them; see README)")


def run(cmd: list[str], *, input: str | bytes | None = None, timeout: float = 60, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a client in its own process group; on timeout kill the whole group and fail."""
    text = not isinstance(input, bytes)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[0]} timed out after {timeout}s\nstdout: {out}\nstderr: {err}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing the client spawned may outlive it
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"{res.args[0]} exited {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    return res


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def transfers(server: ServerHandle, vpath: str) -> list[tuple[str, int, str]]:
    """(direction, bytes, result) of each logged transfer of the user-visible path, oldest first."""
    pat = re.compile(r"transfer user=\S+ source=\S+ path=(\S+) direction=(\w+) bytes=(\d+) seconds=\S+ "
                     r"result=(.*?)(?: conn=\w+)?$")
    out = []
    for line in server.log().splitlines():
        m = pat.search(line)
        if m and m.group(1) == vpath:
            out.append((m.group(2), int(m.group(3)), m.group(4).strip()))
    return out


def wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def host_fingerprint(server: ServerHandle, kind: str = "ed25519") -> str:
    """'SHA256:…' of a host key, as `ssh-keygen -lf` prints it."""
    res = ok(run(["ssh-keygen", "-lf", str(server.keys_dir / f"ssh_host_{kind}_key.pub")], timeout=20))
    return res.stdout.split()[1]


def known_hosts(server: ServerHandle, path: Path) -> Path:
    lines = []
    for kind in ("ed25519", "ecdsa", "rsa"):
        alg, blob = (server.keys_dir / f"ssh_host_{kind}_key.pub").read_text().split()[:2]
        lines.append(f"[{server.host}]:{server.port} {alg} {blob}\n")
    path.write_text("".join(lines))
    return path


def sftp_ok(server: ServerHandle, user: User, commands: str, cwd: Path) -> str:
    res = server.sftp_batch(user, commands, cwd=cwd)
    assert res.returncode == 0, f"sftp batch failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


# -- OpenSSH sftp -----------------------------------------------------------------------------------

def test_openssh_sftp_batch_basics(server: ServerHandle, tmp_path: Path) -> None:
    need("sftp", "sshpass")
    user = server.add_user("olive", quota="10MiB")
    local = tmp_path / "local"
    big = make_file(local / "big.bin", 3 * MiB + 4321)
    small = make_file(local / "small.txt", 1000)

    out = sftp_ok(server, user, "\n".join([
        "pwd", "mkdir docs", "cd docs", "pwd", "put big.bin", "put small.txt", "ls", "ls -l",
        "rename small.txt renamed.txt", "get big.bin big.back", "get renamed.txt renamed.back",
        "put small.txt over.txt", "rename renamed.txt over.txt",  # posix-rename: replaces the target
        "cd /", "df", "df -h", ""]), cwd=local)
    assert "Remote working directory: /\n" in out
    assert "Remote working directory: /docs\n" in out
    assert (user.home / "docs" / "big.bin").read_bytes() == big.read_bytes()
    assert sha(local / "big.back") == sha(big)
    assert sha(local / "renamed.back") == sha(small)
    assert not (user.home / "docs" / "small.txt").exists()
    assert not (user.home / "docs" / "renamed.txt").exists()
    assert sha(user.home / "docs" / "over.txt") == sha(small)
    # ls -l prints the server's longname: the account's name, never a host uid lookup.
    longs = [ln for ln in out.splitlines() if ln.startswith("-rw")]
    assert any(ln.endswith(" big.bin") for ln in longs), out
    for ln in longs:
        fields = ln.split()
        assert fields[2] == "olive" and fields[3] == "olive", ln
    assert any(ln.split()[4] == str(big.stat().st_size) for ln in longs if ln.endswith(" big.bin")), out
    # df shows the quota as the filesystem: 10 MiB = 10240 KiB, 10.0M with -h.
    assert re.search(r"^\s+10240\s+\d+\s+\d+", out, re.M), out
    assert re.search(r"^\s+10\.0M", out, re.M), out

    sftp_ok(server, user, "rm /docs/big.bin\nrm /docs/over.txt\nrmdir /docs\nls -la /\n", cwd=local)
    assert list(user.home.iterdir()) == []

    # A missing path fails the batch with the client's "not found" (NO_SUCH_FILE), exit 1.
    res = server.sftp_batch(user, "get /nope.bin\n", cwd=local)
    assert res.returncode == 1
    assert "not found" in res.stderr, res.stderr
    assert not (local / "nope.bin").exists()


def test_openssh_sftp_resume_and_preserve(server: ServerHandle, tmp_path: Path) -> None:
    need("sftp", "sshpass")
    user = server.add_user("rhea")
    local = tmp_path / "local"
    full = make_file(local / "full.bin", 2 * MiB + 999)
    data = full.read_bytes()
    (local / "head.bin").write_bytes(data[:700_000])
    (local / "partial.bin").write_bytes(data[:1_234_567])
    keep = make_file(local / "keep.txt", 5000)
    os.chmod(keep, 0o640)
    os.utime(keep, (1_500_000_000, 1_600_000_000))

    sftp_ok(server, user, "\n".join([
        "put head.bin up.bin",          # the remote partial, through the server (ledger stays exact)
        "reput full.bin up.bin",        # resume the upload
        "put full.bin down.bin",
        "reget down.bin partial.bin",   # resume the download into the local partial
        "put -p keep.txt kept.txt",     # preserve mtime and mode
        "get -p kept.txt kept.back",
        ""]), cwd=local)
    assert sha(user.home / "up.bin") == sha(full)
    assert sha(local / "partial.bin") == sha(full)
    # Proof of resumption: the second upload and the download sent only the missing tail.
    assert [t[:2] for t in transfers(server, "/up.bin")] == [("upload", 700_000), ("upload", len(data) - 700_000)]
    assert ("download", len(data) - 1_234_567) in [t[:2] for t in transfers(server, "/down.bin")]
    st = (user.home / "kept.txt").stat()
    assert int(st.st_mtime) == 1_600_000_000
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert sha(user.home / "kept.txt") == sha(keep)
    back = (local / "kept.back").stat()
    assert int(back.st_mtime) == 1_600_000_000 and stat.S_IMODE(back.st_mode) == 0o640


def test_openssh_sftp_ls_l_single_file_owner(server: ServerHandle, tmp_path: Path) -> None:
    need("sftp", "sshpass")
    user = server.add_user("gwen")
    local = tmp_path / "local"
    make_file(local / "f.bin", 10)
    out = sftp_ok(server, user, "put f.bin\nls -l f.bin\nls -l *.bin\n", cwd=local)
    longs = [ln.split() for ln in out.splitlines() if ln.startswith("-rw")]
    assert len(longs) == 2, out
    for fields in longs:
        assert fields[2:4] == ["gwen", "gwen"], out


# -- OpenSSH scp ------------------------------------------------------------------------------------

def _scp_roundtrip(server: ServerHandle, user: User, tmp_path: Path, mode: list[str]) -> None:
    local = tmp_path / "local"
    src = make_file(local / "scp.bin", 2 * MiB + 17)
    os.chmod(src, 0o600)
    os.utime(src, (1_500_000_000, 1_550_000_000))
    target = f"{user.name}@{server.host}"
    up = server.openssh("scp", user, [*mode, "-p", str(src), f"{target}:/scp.bin"])
    assert up.returncode == 0, f"scp upload exited {up.returncode}: {up.stderr}"
    assert sha(user.home / "scp.bin") == sha(src)
    st = (user.home / "scp.bin").stat()
    assert int(st.st_mtime) == 1_550_000_000 and stat.S_IMODE(st.st_mode) == 0o600
    down = server.openssh("scp", user, [*mode, f"{target}:/scp.bin", str(local / "back.bin")])
    assert down.returncode == 0, f"scp download exited {down.returncode}: {down.stderr}"
    assert sha(local / "back.bin") == sha(src)
    missing = server.openssh("scp", user, [*mode, f"{target}:/nope.bin", str(local / "nope.bin")])
    assert missing.returncode != 0 and not (local / "nope.bin").exists()


def test_openssh_scp_sftp_mode(server: ServerHandle, tmp_path: Path) -> None:
    need("scp", "sshpass")
    _scp_roundtrip(server, server.add_user("sara"), tmp_path, [])


def test_openssh_scp_legacy_mode(server: ServerHandle, tmp_path: Path) -> None:
    need("scp")
    _scp_roundtrip(server, server.add_user("lena", key=True), tmp_path, ["-O"])


# -- PuTTY psftp / pscp -----------------------------------------------------------------------------

def _putty_args(server: ServerHandle, user: User) -> list[str]:
    # PuTTY 0.78 accepts the "SHA256:<base64>" form ssh-keygen -l prints; it negotiates ed25519 first.
    return ["-batch", "-P", str(server.port), "-pw", user.password or "", "-hostkey", host_fingerprint(server)]


def test_putty_psftp(server: ServerHandle, tmp_path: Path) -> None:
    need("psftp", "ssh-keygen")
    user = server.add_user("pat")
    local = tmp_path / "local"
    big = make_file(local / "big.bin", 3 * MiB + 5)
    data = big.read_bytes()
    (local / "head.bin").write_bytes(data[:1_000_000])
    (local / "part.bin").write_bytes(data[:333_333])
    script = local / "script.txt"
    script.write_text("\n".join([
        "pwd", "mkdir dir", "cd dir", "pwd", "put big.bin", "put head.bin resumed.bin", "reput big.bin resumed.bin",
        "get big.bin back.bin", "reget big.bin part.bin", "ls", "mv big.bin moved.bin", "rm resumed.bin",
        "cd /", "quit", ""]))
    res = ok(run(["psftp", *_putty_args(server, user), "-b", str(script), f"{user.name}@{server.host}"],
                 cwd=local))
    assert "Remote directory is /dir" in res.stdout, res.stdout
    assert sha(user.home / "dir" / "moved.bin") == sha(big)
    assert not (user.home / "dir" / "resumed.bin").exists()
    assert sha(local / "back.bin") == sha(big)
    assert sha(local / "part.bin") == sha(big)
    assert [t[:2] for t in transfers(server, "/dir/resumed.bin")] == [("upload", 1_000_000),
                                                                      ("upload", len(data) - 1_000_000)]
    longs = [ln.split() for ln in res.stdout.splitlines() if ln.startswith("-rw")]
    assert longs and all(f[2:4] == ["pat", "pat"] for f in longs), res.stdout

    script.write_text("rm /dir/moved.bin\nrmdir /dir\n")
    ok(run(["psftp", *_putty_args(server, user), "-b", str(script), f"{user.name}@{server.host}"], cwd=local))
    assert list(user.home.iterdir()) == []


def test_putty_pscp(server: ServerHandle, tmp_path: Path) -> None:
    need("pscp", "ssh-keygen")
    user = server.add_user("paul")
    local = tmp_path / "local"
    src = make_file(local / "src.bin", 2 * MiB + 3)
    for proto in ("-sftp", "-scp"):
        name = f"p{proto}.bin"
        ok(run(["pscp", proto, "-q", *_putty_args(server, user), str(src), f"{user.name}@{server.host}:/{name}"]))
        assert sha(user.home / name) == sha(src)
        ok(run(["pscp", proto, "-q", *_putty_args(server, user), f"{user.name}@{server.host}:/{name}", str(local / f"back{proto}.bin")]))
        assert sha(local / f"back{proto}.bin") == sha(src)
    # A wrong host key is refused before any password is sent.
    bad = ["-hostkey", "SHA256:" + "A" * 43]
    res = run(["pscp", "-q", "-batch", "-P", str(server.port), "-pw", "x", *bad, str(src), f"{user.name}@{server.host}:/nope.bin"])
    assert res.returncode != 0 and not (user.home / "nope.bin").exists()


# -- lftp -------------------------------------------------------------------------------------------

def test_lftp(server: ServerHandle, tmp_path: Path) -> None:
    need("lftp", "ssh")
    user = server.add_user("liam")
    local = tmp_path / "local"
    big = make_file(local / "big.bin", 3 * MiB + 77)
    data = big.read_bytes()
    (local / "head.bin").write_bytes(data[:1_100_000])
    (local / "part.bin").write_bytes(data[:400_000])
    connect = ("ssh -a -x -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "
               "-o PubkeyAuthentication=no")
    commands = "; ".join([
        f'set sftp:connect-program "{connect}"', "set net:max-retries 1", "set net:timeout 20",
        "set cmd:fail-exit yes",
        "mkdir d", "cd d", "put big.bin", "put head.bin -o resumed.bin", "put -c big.bin -o resumed.bin",
        "get big.bin -o back.bin", "get -c big.bin -o part.bin", "mv big.bin moved.bin", "cls -l",
        "rm resumed.bin", "quit"])
    res = ok(run(["lftp", "-u", f"{user.name},{user.password}", "-p", str(server.port), "-e", commands,
                  f"sftp://{server.host}"], cwd=local, timeout=90))
    assert sha(user.home / "d" / "moved.bin") == sha(big)
    assert not (user.home / "d" / "resumed.bin").exists()
    assert sha(local / "back.bin") == sha(big)
    assert sha(local / "part.bin") == sha(big)
    assert [t[:2] for t in transfers(server, "/d/resumed.bin")] == [("upload", 1_100_000),
                                                                    ("upload", len(data) - 1_100_000)]
    assert ("download", len(data) - 400_000) in [t[:2] for t in transfers(server, "/d/big.bin")]
    assert re.search(r"liam\s+liam\s+%d .*moved\.bin" % len(data), res.stdout), res.stdout


# -- curl (libssh2) ---------------------------------------------------------------------------------

def test_curl(server: ServerHandle, tmp_path: Path) -> None:
    need("curl", "ssh-keygen")
    user = server.add_user("cora")
    local = tmp_path / "local"
    big = make_file(local / "big.bin", 3 * MiB + 11)
    data = big.read_bytes()
    (local / "head.bin").write_bytes(data[:900_000])
    (local / "part.bin").write_bytes(data[:250_000])
    # The ECDSA host key is only offered with --legacy-algorithms (ssh-audit fails NIST curves), so
    # libssh2 1.10 negotiates ed25519; --hostpubsha256 wants padded base64.
    fp = host_fingerprint(server, "ed25519").removeprefix("SHA256:") + "="
    base = f"sftp://{server.host}:{server.port}"
    env = dict(os.environ, HOME=str(tmp_path))  # no ~/.ssh/known_hosts of the machine's user

    def curl(*args: str) -> subprocess.CompletedProcess:
        return run(["curl", "-sS", "--hostpubsha256", fp, "-u", f"{user.name}:{user.password}", *args],
                   env=env, cwd=local)

    ok(curl("--ftp-create-dirs", "-T", "big.bin", f"{base}/sub/big.bin"))
    assert sha(user.home / "sub" / "big.bin") == sha(big)
    ok(curl("-o", "back.bin", f"{base}/sub/big.bin"))
    assert sha(local / "back.bin") == sha(big)
    # resumed upload (-C - asks the size, then appends) and resumed download
    ok(curl("-T", "head.bin", f"{base}/resumed.bin"))
    ok(curl("-C", "-", "-T", "big.bin", f"{base}/resumed.bin"))
    assert sha(user.home / "resumed.bin") == sha(big)
    assert [t[:2] for t in transfers(server, "/resumed.bin")][-1] == ("upload", len(data) - 900_000)
    ok(curl("-C", "-", "-o", "part.bin", f"{base}/sub/big.bin"))
    assert sha(local / "part.bin") == sha(big)
    # quote commands: rename, mkdir, rm, rmdir.  (libssh2 sends a plain SFTPv3 RENAME, which, as with
    # OpenSSH's sftp-server, does not replace an existing target; no posix-rename from curl.)
    ok(curl("-Q", "rename /sub/big.bin /moved.bin", "-Q", "mkdir /empty", f"{base}/"))
    assert sorted(p.name for p in user.home.iterdir()) == ["empty", "moved.bin", "resumed.bin", "sub"]
    assert sha(user.home / "moved.bin") == sha(big)
    listing = ok(curl("-l", f"{base}/")).stdout.split()
    assert {"moved.bin", "resumed.bin", "sub", "empty"} <= set(listing)
    ok(curl("-Q", "rm /moved.bin", "-Q", "rm /resumed.bin", "-Q", "rmdir /empty", "-Q", "rmdir /sub", f"{base}/"))
    assert list(user.home.iterdir()) == []
    # a missing file: curl 78 (CURLE_REMOTE_FILE_NOT_FOUND), i.e. the server said NO_SUCH_FILE
    res = curl("-o", "nope.bin", f"{base}/nope.bin")
    assert res.returncode == 78, res.stderr
    assert not (local / "nope.bin").exists()


# -- rclone (Go pkg/sftp) ---------------------------------------------------------------------------

def test_rclone(server: ServerHandle, tmp_path: Path) -> None:
    need("rclone")
    user = server.add_user("rory")
    up = tmp_path / "up"
    # Sizes around and well over 32 KiB: rclone 1.60's WRITE packets carry trailing bytes
    # ("Unexpected data at end of packet" from a bare asyncssh server).
    files = {"big.bin": 3 * MiB + 123, "mid.bin": 100_000, "k40.bin": 40 * 1024 + 1, "tiny.txt": 10,
             "sub/nested.bin": 1 * MiB + 1}
    for name, size in files.items():
        make_file(up / name, size)
    os.utime(up / "big.bin", (1_500_000_000, 1_600_000_000))
    obscured = ok(run(["rclone", "obscure", user.password or ""], timeout=30)).stdout.strip()
    cfg = tmp_path / "rclone.conf"
    cfg.write_text("")
    env = dict(os.environ, RCLONE_CONFIG=str(cfg), RCLONE_SFTP_HOST=server.host, RCLONE_SFTP_PORT=str(server.port),
               RCLONE_SFTP_USER=user.name, RCLONE_SFTP_PASS=obscured,
               RCLONE_SFTP_KNOWN_HOSTS_FILE=str(known_hosts(server, tmp_path / "known_hosts")),
               HOME=str(tmp_path))

    def rclone(*args: str) -> subprocess.CompletedProcess:
        return run(["rclone", "--retries", "1", "--low-level-retries", "1", *args], env=env, timeout=120)

    ok(rclone("copy", str(up), ":sftp:data"))
    for name in files:
        assert sha(user.home / "data" / name) == sha(up / name), name
    assert int((user.home / "data" / "big.bin").stat().st_mtime) == 1_600_000_000  # setstat mtime honoured
    down = tmp_path / "down"
    ok(rclone("copy", ":sftp:data", str(down)))
    for name in files:
        assert sha(down / name) == sha(up / name), name

    # Hashes through the server's exec md5sum: a listing (commands preset, because rclone 1.60 races
    # its own lazy hash-command detection against the listing and reports "hash unsupported" for the
    # first files otherwise) ...
    listing = ok(rclone("md5sum", ":sftp,md5sum_command=md5sum,sha1sum_command=sha1sum:data")).stdout
    assert dict(reversed(ln.split("  ", 1)) for ln in listing.splitlines()) == {
        name: hashlib.md5((up / name).read_bytes()).hexdigest() for name in files}

    # ... and `check` with auto-detection, which must see a same-size change in one file.
    async def tamper() -> None:
        async with server.sftp(user) as sftp, sftp.open("/data/mid.bin", "r+b") as f:
            await f.write(b"\0\1\2", 5000)
    asyncio.run(tamper())
    res = rclone("check", "-v", str(up), ":sftp:data")
    assert "Using md5 for hash comparisons" in res.stderr, res.stderr
    assert f"{len(files) - 1} matching files" in res.stderr, res.stderr
    assert res.returncode != 0 and "1 differences found" in res.stderr, res.stderr


# -- paramiko ---------------------------------------------------------------------------------------

def test_paramiko(server: ServerHandle, tmp_path: Path) -> None:
    paramiko = pytest.importorskip("paramiko")
    from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY

    user = server.add_user("pia", quota="20MiB")
    src = make_file(tmp_path / "src.bin", 2 * MiB + 9)
    other = make_file(tmp_path / "other.bin", 1234)
    transport = paramiko.Transport((server.host, server.port))
    try:
        transport.connect(username=user.name, password=user.password)
        offered = transport.get_remote_server_key()
        expected = {tuple(p.read_text().split()[:2]) for p in server.keys_dir.glob("*.pub")}
        assert (offered.get_name(), offered.get_base64()) in expected
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp.normalize(".") == "/"
        sftp.mkdir("/d")
        sftp.put(str(src), "/d/a.bin")
        sftp.put(str(other), "/d/b.bin")
        assert sorted(sftp.listdir("/d")) == ["a.bin", "b.bin"]
        longs = {a.filename: a.longname for a in sftp.listdir_attr("/d")}
        assert longs["a.bin"].split()[2:4] == ["pia", "pia"], longs
        assert sftp.stat("/d/a.bin").st_size == src.stat().st_size
        with pytest.raises(FileNotFoundError):
            sftp.stat("/d/missing")
        # plain SFTPv3 rename refuses to replace; posix-rename@openssh.com replaces
        with pytest.raises(OSError):
            sftp.rename("/d/b.bin", "/d/a.bin")
        sftp.rename("/d/b.bin", "/d/c.bin")
        sftp.posix_rename("/d/c.bin", "/d/a.bin")
        assert sorted(sftp.listdir("/d")) == ["a.bin"]
        sftp.get("/d/a.bin", str(tmp_path / "back.bin"))
        assert sha(tmp_path / "back.bin") == sha(other)
        sftp.utime("/d/a.bin", (1_400_000_000, 1_450_000_000))
        sftp.chmod("/d/a.bin", 0o604)
        st = sftp.stat("/d/a.bin")
        assert st.st_mtime == 1_450_000_000 and stat.S_IMODE(st.st_mode) == 0o604
        # statvfs@openssh.com (paramiko has no public call for it): the quota as the filesystem
        kind, msg = sftp._request(CMD_EXTENDED, "statvfs@openssh.com", "/")
        assert kind == CMD_EXTENDED_REPLY
        _bsize, frsize, blocks, bfree, _bavail = (msg.get_int64() for _ in range(5))
        assert blocks * frsize == 20 * MiB
        assert (blocks - bfree) * frsize == other.stat().st_size
        sftp.remove("/d/a.bin")
        sftp.rmdir("/d")
        assert sftp.listdir("/") == []
        sftp.close()
    finally:
        transport.close()
    assert list(user.home.iterdir()) == []


# -- asyncssh ---------------------------------------------------------------------------------------

def test_asyncssh(server: ServerHandle, tmp_path: Path) -> None:
    user = server.add_user("asha", key=True, password=None)
    src = make_file(tmp_path / "src.bin", 3 * MiB + 1)

    async def session() -> None:
        async with server.sftp(user) as sftp:
            await sftp.put(str(src), "/a.bin")
            await sftp.get("/a.bin", str(tmp_path / "back.bin"))
            await sftp.put(str(src), "/b.bin")
            await sftp.posix_rename("/b.bin", "/a.bin")
            names = [n for n in await sftp.readdir("/") if n.filename not in (".", "..")]
            assert [n.filename for n in names] == ["a.bin"]
            assert names[0].longname.split()[2:4] == ["asha", "asha"]
            assert (await sftp.statvfs("/")).bsize > 0
            with pytest.raises(Exception) as exc:
                await sftp.stat("/missing")
            assert getattr(exc.value, "code", None) == 2  # FX_NO_SUCH_FILE
            await sftp.remove("/a.bin")
    asyncio.run(session())
    assert sha(tmp_path / "back.bin") == sha(src)
    assert list(user.home.iterdir()) == []


# -- sshfs ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def sshfs_mount(server: ServerHandle, user: User, mnt: Path) -> Iterator[Path]:
    if not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("FUSE is not available here (/dev/fuse missing or not accessible)")
    assert user.key_path is not None
    mnt.mkdir()
    opts = ",".join([f"IdentityFile={user.key_path}", "IdentitiesOnly=yes", "BatchMode=yes",
                     "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"])
    # -f: stay in the foreground so this test owns (and always ends) the process.
    proc = subprocess.Popen(["sshfs", "-f", "-p", str(server.port), "-o", opts,
                             f"{user.name}@{server.host}:/", str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if not wait_for(lambda: os.path.ismount(mnt) or proc.poll() is not None, 15) or not os.path.ismount(mnt):
            err = proc.stderr.read() if proc.poll() is not None else ""
            if "fuse" in err.lower() and ("device" in err.lower() or "permitted" in err.lower()):
                pytest.skip(f"FUSE mount not permitted in this sandbox: {err.strip()}")
            raise AssertionError(f"sshfs did not mount: {err}")
        yield mnt
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3" if shutil.which("fusermount3") else "fusermount", "-u", str(mnt)],
                           capture_output=True, timeout=20)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


def test_sshfs(server: ServerHandle, tmp_path: Path) -> None:
    need("sshfs", "ssh")
    user = server.add_user("sven", key=True, password=None, quota="50MiB")
    src = make_file(tmp_path / "src.bin", 3 * MiB + 5)
    with sshfs_mount(server, user, tmp_path / "mnt") as mnt:
        (mnt / "dir").mkdir()
        shutil.copyfile(src, mnt / "dir" / "a.bin")
        assert sha(user.home / "dir" / "a.bin") == sha(src)
        assert sha(mnt / "dir" / "a.bin") == sha(src)
        (mnt / "dir" / "a.bin").rename(mnt / "dir" / "b.bin")
        assert os.listdir(mnt / "dir") == ["b.bin"]
        os.utime(mnt / "dir" / "b.bin", (1_300_000_000, 1_350_000_000))
        assert int((user.home / "dir" / "b.bin").stat().st_mtime) == 1_350_000_000
        vfs = os.statvfs(mnt)
        assert vfs.f_blocks * vfs.f_frsize == 50 * MiB  # df on the mount shows the quota
        with pytest.raises(FileNotFoundError):
            (mnt / "missing").stat()
        (mnt / "dir" / "b.bin").unlink()
        (mnt / "dir").rmdir()
        assert os.listdir(mnt) == []
    assert list(user.home.iterdir()) == []
