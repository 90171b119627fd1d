"""The audit log, as an admin meets it: follow one user's every change, in text or JSON, rotate the file,
and let fail2ban read failed logins (README "Logs and audit").

A real server, real clients (asyncssh, paramiko, OpenSSH sftp); the log file is read as logrotate and
fail2ban would read it.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import signal
import socket
from pathlib import Path

import asyncssh
import paramiko
import pytest
from conftest import ServerHandle, make_server
from test_clients import wait_for

ROOT = Path(__file__).resolve().parents[1]
FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "sshfiles.conf"



async def _user_session(server: ServerHandle, user, quota_user) -> None:
    """Every kind of change, allowed and refused, by one user; a quota refusal by another."""
    async with server.sftp(user) as sftp:
        await sftp.mkdir("d")
        async with sftp.open("d/a.txt", "wb") as f:
            await f.write(b"x" * 1000)
        await sftp.chmod("d/a.txt", 0o444)
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.open("d/a.txt", "wb")            # a permission refusal
        await sftp.chmod("d/a.txt", 0o644)
        await sftp.setstat("d/a.txt", asyncssh.SFTPAttrs(size=10))
        await sftp.rename("d/a.txt", "d/b.txt")
        with pytest.raises(asyncssh.SFTPOpUnsupported):
            await sftp.symlink("d/b.txt", "d/link")     # refused by policy
        async with sftp.open("d/b.txt", "rb") as f:
            assert await f.read() == b"x" * 10
        await sftp.remove("d/b.txt")
        await sftp.rmdir("d")
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.rmdir("nope")
    async with server.sftp(quota_user) as sftp:
        async with sftp.open("big.bin", "wb") as f:
            with pytest.raises(asyncssh.SFTPFailure):
                await f.write(b"y" * 20_000)            # over the 10 KiB quota: refused whole


def _json_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_json_audit_log_follows_one_user_and_holds_no_host_path(tmp_path: Path, host_keys_dir: Path) -> None:
    log_file = tmp_path / "audit.jsonl"
    server = make_server(tmp_path, host_keys_dir, ("--log-format", "json", "--log-file", str(log_file)))
    server.start()
    try:
        alice = server.add_user("alice")
        carol = server.add_user("carol", quota="10KiB")
        asyncio.run(asyncio.wait_for(_user_session(server, alice, carol), 60))
        assert wait_for(lambda: any(e.get("event") == "transfer" and e.get("user") == "carol"
                                 for e in _json_events(log_file)))
    finally:
        server.stop()
    events = _json_events(log_file)
    audit_text = json.dumps([e for e in events if "event" in e])
    assert str(tmp_path) not in audit_text  # virtual paths only (the admin's start-up lines may name dirs)
    for e in events:  # stable envelope on every line
        assert {"ts", "level", "logger", "pid"} <= e.keys()
        assert "event" in e or "msg" in e
    mine = [e for e in events if e.get("user") == "alice" and "event" in e]
    login = next(e for e in mine if e["event"] == "login")
    conn = login["conn"]
    assert login["method"] == "password" and login["result"] == "ok"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", login["source"])
    seq = [(e["event"], e.get("path"), e["result"]) for e in mine if e["event"] not in ("login", "logout")]
    assert seq == [
        ("mkdir", "/d", "ok"),
        ("transfer", "/d/a.txt", "ok"),
        ("setstat", "/d/a.txt", "ok"),
        ("open", "/d/a.txt", "denied"),
        ("setstat", "/d/a.txt", "ok"),
        ("setstat", "/d/a.txt", "ok"),
        ("rename", "/d/a.txt", "ok"),
        ("symlink", "/d/link", "denied"),
        ("transfer", "/d/b.txt", "ok"),
        ("remove", "/d/b.txt", "ok"),
        ("rmdir", "/d", "ok"),
        ("rmdir", "/nope", "failed: No such file or directory"),
    ], seq
    assert all(e["conn"] == conn and e["source"] == login["source"] for e in mine)
    assert mine[-1]["event"] == "logout"  # the connection followed to its end
    by = {(e["event"], e.get("path"), e.get("mode"), e.get("size")): e for e in mine}
    assert ("setstat", "/d/a.txt", "0444", None) in by          # what changed
    assert ("setstat", "/d/a.txt", None, 10) in by
    upload = next(e for e in mine if e["event"] == "transfer" and e["path"] == "/d/a.txt")
    assert upload["direction"] == "upload" and upload["bytes"] == 1000
    assert next(e for e in mine if e["event"] == "rename")["to"] == "/d/b.txt"
    assert "Permission denied" in next(e for e in mine if e["event"] == "open")["error"]
    refused = [e for e in events if e.get("user") == "carol" and e.get("event") == "transfer"]
    assert len(refused) == 1 and refused[0]["result"] == "quota" and "quota exceeded" in refused[0]["error"]
    assert refused[0]["bytes"] == 0


def test_text_audit_lines_and_client_text_escaped(server: ServerHandle) -> None:
    user = server.add_user("bob")

    async def go() -> None:
        async with server.sftp(user) as sftp:
            await sftp.mkdir("new\nlogin user=x result=ok")
            await sftp.rename("new\nlogin user=x result=ok", "plain")
            await sftp.rmdir("plain")

    asyncio.run(asyncio.wait_for(go(), 60))
    assert wait_for(lambda: "rmdir user=bob" in server.log())
    log = server.log()
    assert re.search(r'INFO sshfiles\.audit\[\d+\]: mkdir user=bob source=127\.0\.0\.1:\d+ '
                     r'path="/new\\nlogin user=x result=ok" mode=0777 result=ok conn=\w+$', log, re.M), log
    assert re.search(r'rename user=bob source=\S+ path="/new\\nlogin user=x result=ok" to=/plain result=ok conn=\w+$',
                     log, re.M), log
    assert not re.search(r"^login user=x", log, re.M)


def test_log_file_is_reopened_on_sighup(tmp_path: Path, host_keys_dir: Path) -> None:
    """logrotate's way: move the file away, SIGHUP, and the next lines land in a new file."""
    log_file = tmp_path / "sshfiles.log"
    server = make_server(tmp_path, host_keys_dir, ("--log-file", str(log_file), "--workers", "2"))
    server.start()
    try:
        user = server.add_user("rot")

        async def login() -> None:
            async with server.connect(user):
                pass

        asyncio.run(login())
        assert wait_for(lambda: "login user=rot" in log_file.read_text())
        rotated = tmp_path / "sshfiles.log.1"
        os.rename(log_file, rotated)
        asyncio.run(login())  # still written to the moved file until the signal
        assert wait_for(lambda: rotated.read_text().count("login user=rot") == 2)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGHUP)  # the supervisor forwards it to its workers
        assert wait_for(lambda: log_file.exists() and log_file.read_text().count("log file reopened") >= 3)  # parent + 2 workers
        for _ in range(4):  # connections spread over both workers
            asyncio.run(login())
        assert wait_for(lambda: log_file.read_text().count("login user=rot") == 4)
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert rotated.read_text().count("login user=rot") == 2


def _fail2ban_regexes() -> list[re.Pattern[str]]:
    """The filter's failregex lines, with fail2ban's <HOST> as a named group (its IPv4/IPv6/name form)."""
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(FILTER)
    lines = [ln.strip() for ln in cp["Definition"]["failregex"].splitlines() if ln.strip()]
    host = r"(?:::f{4,6}:)?(?P<host>[\w\-.^_]*\w|\[?[0-9a-fA-F:]+\]?)"
    return [re.compile(ln.replace("<HOST>", host)) for ln in lines]


def _fail2ban_hosts(log: str) -> list[str]:
    """What fail2ban would count: it cuts the date off each line, then searches every failregex."""
    out = []
    regexes = _fail2ban_regexes()
    for line in log.splitlines():
        rest = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d+)?", "", line)
        for rx in regexes:
            m = rx.search(rest)
            if m:
                out.append(m.group("host"))
                break
    return out


def test_fail2ban_filter_matches_real_failed_logins_only(server: ServerHandle) -> None:
    server.add_user("alice", password="right-password")
    forged = "x source=10.9.9.9:22 method=password result=failed conn=abcd"

    def attempt(source: str, username: str, password: str) -> None:
        sock = socket.create_connection((server.host, server.port), timeout=10, source_address=(source, 0))
        t = paramiko.Transport(sock)
        try:
            t.start_client(timeout=10)
            try:
                t.auth_password(username, password)
            except paramiko.AuthenticationException:
                pass
        finally:
            t.close()

    attempt("127.0.0.2", "alice", "wrong")
    attempt("127.0.0.3", "nosuchuser", "wrong")
    attempt("127.0.0.4", forged, "wrong")
    attempt("127.0.0.5", "alice", "right-password")
    assert wait_for(lambda: server.log().count("login user=") >= 4)
    hosts = _fail2ban_hosts(server.log())
    assert sorted(hosts) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"], hosts
    assert "10.9.9.9" not in hosts


def test_bad_log_settings_are_one_line_errors(server: ServerHandle, tmp_path: Path) -> None:
    res = server.cli("serve", "--port", "0", "--log-format", "xml", check=False)
    assert res.returncode == 2 and "--log-format" in res.stderr and "Traceback" not in res.stderr
    res = server.cli("serve", "--port", "0", "--log-file", str(tmp_path / "no" / "such" / "dir.log"), check=False)
    assert res.returncode == 1 and "cannot open log file" in res.stderr and "Traceback" not in res.stderr
