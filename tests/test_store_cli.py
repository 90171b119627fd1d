"""`sshfiles store copy` and `sshfiles store migrate`, as an administrator moving to PostgreSQL meets them.

A real server on the SQLite store takes uploads; it is stopped, the store is copied to PostgreSQL
with the CLI, and the same server started on the copy must know every account, key, ban and byte of
usage: the user's remaining quota is exactly what it was, to the byte.
"""

from __future__ import annotations

import asyncio

import asyncssh
import pytest
from conftest import pg_schema

from sshfiles.stores import open_store


def test_copy_sqlite_to_postgresql_keeps_every_byte_of_ledger(server):
    alice = server.add_user("alice", quota=10_000, key=True)
    bob = server.add_user("bob", quota=5_000)
    server.cli("user", "disable", "bob")
    server.cli("ban", "add", "192.0.2.7", "--for", "1h")
    server.cli("user", "perm", "set", "alice", "/ro", "list,download")
    server.cli("user", "upload-mode", "bob", "atomic")

    async def upload() -> None:
        async with server.sftp(alice) as sftp:
            async with sftp.open("a.bin", "wb") as f:
                await f.write(b"x" * 6_789)
            await sftp.mkdir("d")
            await sftp.mkdir("ro")
    asyncio.run(upload())
    server.stop()
    before = server.cli("user", "list").stdout
    rules_before = server.cli("user", "perm", "list", "alice").stdout
    assert "/ro\tlist,download" in rules_before, rules_before
    assert "6.6 KiB" in before or "6789" in before, before

    with pg_schema() as url:
        res = server.cli("store", "copy", f"sqlite:{server.accounts_dir}", url)
        assert "copied 3 accounts and 1 bans" in res.stdout  # sftpuser (first start), alice, bob
        again = server.cli("store", "copy", f"sqlite:{server.accounts_dir}", url, check=False)
        assert again.returncode != 0 and "not empty" in again.stderr and "Traceback" not in again.stderr
        server.store = url
        assert server.cli("user", "list").stdout == before
        assert "192.0.2.7" in server.cli("ban", "list").stdout
        assert server.cli("user", "perm", "list", "alice").stdout == rules_before
        copied = open_store(url)
        try:
            assert copied.require_user("bob").upload_mode == "atomic"
            assert copied.require_user("alice").upload_mode is None
        finally:
            copied.close()
        migrate = server.cli("store", "migrate")
        assert "current" in migrate.stdout
        server.start()
        try:
            async def use() -> None:
                async with server.sftp(alice) as sftp:  # key and password both copied
                    with pytest.raises(asyncssh.SFTPPermissionDenied):  # the rule came along
                        async with sftp.open("ro/x.bin", "wb") as f:
                            await f.write(b"w")
                    async with sftp.open("b.bin", "wb") as f:
                        await f.write(b"y" * (10_000 - 6_789))  # exactly the rest of the quota
                    with pytest.raises(asyncssh.SFTPError, match="quota"):
                        async with sftp.open("c.bin", "wb") as f:
                            await f.write(b"z")
                with pytest.raises(asyncssh.PermissionDenied):
                    async with server.connect(bob):
                        pass
            asyncio.run(use())
            assert "10000 B" in server.cli("user", "list").stdout or "9.8 KiB" in server.cli("user", "list").stdout
        finally:
            server.stop()
            server.store = None


def test_store_url_with_a_password_is_never_echoed_on_errors(server):
    res = server.cli("--store", "postgresql://sshfiles:s3cret-pw@127.0.0.1:1/nowhere", "user", "list", check=False)
    assert res.returncode != 0 and "s3cret-pw" not in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = server.cli("--store", "mysql://root:s3cret-pw@db/x", "user", "list", check=False)
    assert res.returncode == 2 and "s3cret-pw" not in res.stderr and "expected postgresql://" in res.stderr


def test_serve_refuses_an_unknown_schema_with_one_line(server):
    import psycopg
    server.stop()
    with pg_schema() as url:
        server.store = url
        try:
            server.cli("user", "list")  # creates the schema
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE sshfiles_schema SET version = 99")
            res = server.cli("serve", "--port", "0", check=False)
            assert res.returncode == 1 and "schema v99, unknown to this version" in res.stderr, res.stderr
            # serve first prints where its state is (config, keys, accounts, homes); the error is one line
            errors = [line for line in res.stderr.strip().splitlines()
                      if not line.startswith(("config: ", "host keys: ", "accounts: ", "homes: "))]
            assert len(errors) == 1 and ":sshfiles@" not in res.stderr, res.stderr
        finally:
            server.store = None
