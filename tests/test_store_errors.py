"""A store that fails (here: locked by another process) never shows a client its host path or internals.

Hardening II, item 15: "a 35 s lock then failed requests with the store's host path in the message".
A real server with a short busy timeout, a real SQLite lock held by another process, real SFTP and
exec clients; the reply a user sees must be one generic line, and everyone works again after.
"""

from __future__ import annotations

import asyncio

import asyncssh
from test_quota_exact import lock_store

KiB = 1024


def assert_generic(message: str, server) -> None:
    for leak in ("/tmp", str(server.root), "accounts.db", "sqlite", "Traceback"):
        assert leak not in message, f"{leak!r} leaks in {message!r}"
    assert message.strip() and "\n" not in message.strip(), repr(message)


def test_a_locked_store_fails_requests_without_host_paths(tmp_path, host_keys_dir, monkeypatch):
    from conftest import make_server

    monkeypatch.setenv("SSHFILES_STORE_BUSY_TIMEOUT", "0.3")
    server = make_server(tmp_path, host_keys_dir)
    server.start()
    try:
        user = server.add_user("lockedout", quota="1MiB")
        bystander = server.add_user("later", quota="1MiB")

        async def go():
            failures: list[str] = []
            async with server.sftp(user) as sftp:
                locker = lock_store(server.accounts_dir, 3.0)
                try:
                    for attempt in range(3):
                        try:
                            await sftp.mkdir(f"d{attempt}")            # charges an entry
                        except asyncssh.SFTPError as exc:
                            failures.append(exc.reason)
                        try:
                            async with sftp.open(f"f{attempt}", "wb") as f:   # needs a reservation
                                await f.write(b"x" * (64 * KiB))
                        except asyncssh.SFTPError as exc:
                            failures.append(exc.reason)
                finally:
                    locker.wait(15)
                await sftp.mkdir("after")                      # works again once the lock is gone
            async with server.sftp(bystander) as other:
                async with other.open("fine", "wb") as f:
                    await f.write(b"y" * KiB)
                assert (await other.stat("fine")).size == KiB
            return failures

        failures = asyncio.run(go())
        assert failures, "with the store locked past its busy timeout some request must fail"
        for message in failures:
            assert_generic(message, server)
            assert "accounts store is busy" in message, message
    finally:
        server.stop()


def test_store_error_messages_are_generic_in_process(tmp_path):
    """The store's own exceptions: generic text, the path only in `detail` (for the admin's log)."""
    import sqlite3

    import pytest

    from sshfiles.stores import StoreCorrupt
    from sshfiles.stores.sqlite import SQLiteAccountStore

    store = SQLiteAccountStore(tmp_path, busy_timeout=0.1)
    store.add_user("u1", str(tmp_path / "home"), None, None)
    locker = sqlite3.connect(tmp_path / "accounts.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreCorrupt) as err:
            store.adjust_used("u1", 10)
        assert str(err.value) == "the accounts store is busy; try again later"
        assert str(tmp_path) in err.value.detail  # type: ignore[attr-defined]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    store.adjust_used("u1", 10)
    store.close()
