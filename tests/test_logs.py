"""The server log cannot be forged or used against the admin's terminal by client-supplied text.

Real clients send file names with a newline followed by a whole fake log line,
with terminal escape sequences, an exec command with a newline, and login
attempts with user names holding a newline and ESC (sent raw by paramiko,
below asyncssh's client-side checks).  The log must hold each value once,
escaped and readable, and no forged line and no raw ESC byte.
"""

from __future__ import annotations

import asyncio
import re
import socket

import paramiko
import pytest
from conftest import ServerHandle

FORGED = "login user=victim source=1.2.3.4 method=password result=ok"
# every line the server writes: a logging record, or one of `sshfiles serve`'s announcements
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+\[\d+\]: |host key |sshfiles listening on "
                  r"|connect with: |created the first account|\(manage accounts|sshfiles stopped"
                  r"|(config|host keys|accounts|homes): )")


def _raw_login_attempt(server: ServerHandle, username: str) -> None:
    """A password login for `username` sent byte for byte as given (paramiko does not check names)."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=10)
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            transport.auth_password(username, "whatever")
    finally:
        transport.close()


def test_client_text_cannot_forge_log_lines_or_reach_the_terminal(server: ServerHandle) -> None:
    user = server.add_user("alice", password=None, key=True)
    bystander = server.add_user("bob", password=None, key=True)
    newline_name = "x\n" + FORGED
    esc_name = "\x1b[31mred\x1b[0m"

    async def clients() -> tuple[list[str], bytes]:
        async with server.sftp(bystander) as by_sftp:
            async with server.connect(user) as conn:
                async with conn.start_sftp_client() as sftp:
                    for name in (newline_name, esc_name):
                        async with sftp.open(name, "wb") as f:
                            await f.write(b"payload")
                    names = sorted(await sftp.listdir("."))
                await conn.run(f"sha256sum 'y\n{FORGED}'")  # an exec command with a newline
            async with by_sftp.open("b.txt", "wb") as f:
                await f.write(b"bystander")
            async with by_sftp.open("b.txt", "rb") as f:
                return names, await f.read()

    names, by_data = asyncio.run(asyncio.wait_for(clients(), 60))
    assert newline_name in names and esc_name in names  # the files really exist under those names
    for bad in ("eve\n" + FORGED, "eve\x1b[2J\x1b[31m", "eve victim source=1.2.3.4 method=password result=ok"):
        _raw_login_attempt(server, bad)
    assert by_data == b"bystander"
    # the bystander's session and a fresh login still work after all of it
    asyncio.run(asyncio.wait_for(_stat(server, bystander), 30))

    raw = server.log_path.read_bytes()
    assert b"\x1b" not in raw
    log = raw.decode()
    for line in log.splitlines():
        assert LINE.match(line), f"a line the server did not write: {line!r}"
    assert not re.search(r"^login user=victim", log, re.MULTILINE)
    assert not re.search(r"login user=victim source=1\.2\.3\.4 method=password result=ok", log.replace(
        r"\n" + FORGED, ""))
    # the values are there, escaped and readable
    assert re.search(r'transfer user=alice source=\S+ path="/x\\n' + re.escape(FORGED) + r'" direction=upload bytes=7 ', log), log
    assert re.search(r"transfer user=alice source=\S+ path=/\\x1b\[31mred\\x1b\[0m direction=upload bytes=7 ", log), log
    assert re.search(r'exec user=alice source=\S+ command="sha256sum \'y\\n' + re.escape(FORGED) + '\'"', log), log
    assert re.search(r'login user="eve victim source=1\.2\.3\.4 method=password result=ok" source=127\.0\.0\.1:\d+ '
                     r"method=password result=failed", log), log


async def _stat(server: ServerHandle, user: object) -> None:
    async with server.sftp(user) as sftp:
        await sftp.stat(".")


def test_logsafe_escapes_every_unsafe_character() -> None:
    from sshfiles.logsafe import esc

    assert esc("plain/path.txt") == "plain/path.txt"
    assert esc("a\nb\rc\td") == r"a\nb\rc\td"
    assert esc("\x1b[31m\x7f\x85\x9b") == r"\x1b[31m\x7f\x85\x9b"
    assert esc("back\\slash") == r"back\\slash"
    assert esc(b"\xff\xfeok") == r"\xff\xfeok"
    assert esc("undecodable\udcff") == r"undecodable\xff"
    assert esc("line\u2028sep") == r"line\u2028sep"
    assert esc('a b="c"') == r'"a b=\"c\""'
    assert esc("") == '""'
    assert esc("é ü") == '"é ü"'  # printable non-ASCII stays readable



def test_every_line_of_a_connection_carries_its_id(server):
    """Login, transfer and logout of one connection share one conn=ID, another connection has another."""
    import asyncio as _asyncio
    import re as _re
    import time as _time

    alice = server.add_user("connid")

    async def two_sessions() -> None:
        for _ in range(2):
            async with server.sftp(alice) as sftp, sftp.open("f.txt", "wb") as f:
                await f.write(b"data")
    _asyncio.run(two_sessions())
    deadline = _time.monotonic() + 5
    while _time.monotonic() < deadline and server.log().count("logout user=connid") < 2:
        _time.sleep(0.05)
    log = server.log()
    logins = _re.findall(r"login user=connid source=\S+ method=password result=ok conn=(\w+)", log)
    transfers = _re.findall(r"transfer user=connid source=\S+ path=/f\.txt direction=upload bytes=4 .* conn=(\w+)", log)
    logouts = _re.findall(r"logout user=connid source=\S+ conn=(\w+)", log)
    assert len(logins) == 2 and logins[0] != logins[1], log
    assert transfers == logins and logouts == logins, log
