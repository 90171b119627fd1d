"""The per-session resource limits are serve settings (Hardening II, the rest of item 10..14's constants).

One test per family, a lowered value given as a flag and enforced by a real `sshfiles serve`:
handles (``--max-handles-per-session``, ``--max-handles-per-user``) and hashing (``--max-hash-bytes``).
"""

from __future__ import annotations

import asyncio

import asyncssh
import pytest


def test_lowered_handle_limits_from_the_flags_are_enforced(tmp_path, host_keys_dir):
    from conftest import make_server

    server = make_server(tmp_path, host_keys_dir, ("--max-handles-per-session", "3", "--max-handles-per-user", "4"))
    server.start()
    try:
        user = server.add_user("opener")
        for i in range(6):
            (user.home / f"f{i}").write_bytes(b"x")

        async def go() -> None:
            async with server.connect(user) as conn, conn.start_sftp_client() as one, \
                    conn.start_sftp_client() as two:
                held = [await one.open(f"f{i}", "rb") for i in range(3)]
                with pytest.raises(asyncssh.SFTPFailure, match=r"Too many open files \(3 per session\)"):
                    await one.open("f3", "rb")
                held.append(await two.open("f3", "rb"))          # the user's fourth, in another session
                with pytest.raises(asyncssh.SFTPFailure, match=r"Too many open files \(4 per user\)"):
                    await two.open("f4", "rb")
                for f in held:
                    await f.close()
                async with one.open("f5", "rb") as f:            # places are given back on close
                    assert await f.read() == b"x"

        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        server.stop()


def test_a_lowered_hash_cap_from_the_flag_is_enforced(tmp_path, host_keys_dir):
    from conftest import make_server

    server = make_server(tmp_path, host_keys_dir, ("--max-hash-bytes", str(1 << 20), "--hash-workers", "1"))
    server.start()
    try:
        user = server.add_user("hasher")
        (user.home / "big.bin").write_bytes(b"b" * ((1 << 20) + 1))
        (user.home / "small.bin").write_bytes(b"s" * 1000)

        async def go() -> asyncssh.SSHCompletedProcess:
            async with server.connect(user) as conn:
                return await conn.run("sha256sum big.bin small.bin", stdin=asyncssh.DEVNULL, check=False)

        r = asyncio.run(asyncio.wait_for(go(), 60))
        assert r.exit_status == 1
        assert r.stderr == "sha256sum: big.bin: file too large to hash here (limit 1 MiB)\n"
        assert r.stdout.endswith("  small.bin\n")
    finally:
        server.stop()
