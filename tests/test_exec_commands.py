"""sshfiles.exec_commands over a real SSH exec channel of a real `sshfiles serve`.

Covers what rclone 1.60 sends (shell-type probe, bare md5sum/sha1sum probes, backslash-escaped paths),
coreutils' output format, jail-relative error messages and the refusal of everything else.
"""

from __future__ import annotations

import asyncio
import hashlib
from types import SimpleNamespace

import asyncssh
import pytest

from sshfiles.exec_commands import CommandRefused, parse_command


@pytest.fixture()
def mini(server):
    user = server.add_user("hasher")
    return SimpleNamespace(host=server.host, port=server.port, user=user.name, password=user.password,
                           home=user.home)


def run(srv, command: str, stdin: str | None = None) -> asyncssh.SSHCompletedProcess:
    async def go():
        async with asyncssh.connect(srv.host, srv.port, username=srv.user, password=srv.password,
                                    known_hosts=None, client_keys=None) as conn:
            if stdin:
                return await conn.run(command, input=stdin, check=False)
            return await conn.run(command, stdin=asyncssh.DEVNULL, check=False)  # EOF at once, as Go does
    return asyncio.run(go())


def test_rclone_probes(mini):
    r = run(mini, "echo ${ShellId}%ComSpec%")
    assert (r.exit_status, r.stdout) == (0, "%ComSpec%\n")       # -> rclone picks "unix"
    r = run(mini, "md5sum")
    assert r.stdout == "d41d8cd98f00b204e9800998ecf8427e  -\n"     # rclone's expected empty hash
    r = run(mini, "sha1sum")
    assert r.stdout.split()[0] == "da39a3ee5e6b4b0d3255bfef95601890afd80709"
    r = run(mini, "sha256sum", stdin="hello\n")
    assert r.stdout.split()[0] == hashlib.sha256(b"hello\n").hexdigest()


def test_sums_paths_and_errors(mini):
    d = mini.home / "a dir"
    d.mkdir()
    (d / "f'1.txt").write_bytes(b"one")
    (mini.home / "back\\slash").write_bytes(b"two")
    r = run(mini, r"md5sum /a\ dir/f\'1.txt")                       # rclone's escaping style
    assert r.stdout == f"{hashlib.md5(b'one').hexdigest()}  /a dir/f'1.txt\n"
    r = run(mini, "sha256sum 'back\\slash' /missing '/a dir'")
    assert r.exit_status == 1
    assert r.stdout == f"\\{hashlib.sha256(b'two').hexdigest()}  back\\\\slash\n"  # coreutils escape
    assert r.stderr == ("sha256sum: /missing: No such file or directory\n"
                        "sha256sum: /a dir: Is a directory\n")
    assert str(mini.home) not in r.stderr


@pytest.mark.parametrize("command", ["ls", "cat /etc/passwd", "md5sum a; rm -rf /", "md5sum a | sh",
                                     "md5sum $(id)", "md5sum `id`", "md5sum > x", "md5sum 'unbalanced"])
def test_refused(mini, command):
    r = run(mini, command)
    assert r.exit_status == 1 and r.stdout == ""
    assert r.stderr.startswith("sshfiles: command not allowed") and r.stderr.count("\n") == 1


def test_noops(mini):
    assert run(mini, "pwd").stdout == "/\n"
    assert run(mini, "cd /x").exit_status == 0


def test_parse_command():
    assert parse_command(r"sha1sum /a\ b 'c d' \"e\"") == ["sha1sum", "/a b", "c d", '"e"']
    with pytest.raises(CommandRefused):
        parse_command("a && b")
