"""The SSH layer's policy: modern algorithms only, strict key exchange, host keys on disk, a clear log."""

from __future__ import annotations

import asyncio
import re
import stat

import asyncssh
import pytest


@pytest.mark.parametrize("opts", [
    {"encryption_algs": ["aes128-cbc", "3des-cbc"]},
    {"mac_algs": ["hmac-sha1", "hmac-md5"], "encryption_algs": ["aes128-ctr"]},
    {"kex_algs": ["diffie-hellman-group1-sha1", "diffie-hellman-group14-sha1"]},
])
def test_weak_algorithms_are_not_negotiable(server, opts):
    user = server.add_user("alice")

    async def attempt() -> None:
        async with server.connect(user, **opts):
            pass

    # the client sees the failed negotiation, or the server hanging up on it first
    with pytest.raises((asyncssh.KeyExchangeFailed, asyncssh.ConnectionLost)):
        asyncio.run(attempt())
    assert "login user=alice" not in server.log()


def test_strict_kex_is_negotiated_and_modern_cipher_chosen(server):
    user = server.add_user("alice")

    async def check() -> tuple[bool, str]:
        async with server.connect(user) as conn:
            return conn._strict_kex, conn.get_extra_info("send_cipher")

    strict, cipher = asyncio.run(check())
    assert strict  # kex-strict-s-v00@openssh.com: the Terrapin countermeasure
    assert cipher in ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com")


def test_host_keys_are_private_and_logged_with_fingerprints(server):
    log = server.log()
    for name, alg in (("ssh_host_ed25519_key", "ssh-ed25519"), ("ssh_host_ecdsa_key", "ecdsa-sha2-nistp256"),
                      ("ssh_host_rsa_key", "ssh-rsa")):
        assert stat.S_IMODE((server.keys_dir / name).stat().st_mode) == 0o600
        fp = asyncssh.read_private_key(str(server.keys_dir / name)).get_fingerprint("sha256")
        assert f"host key {alg} {fp}" in log


def test_log_records_logins_and_transfers_with_user_visible_paths(server):
    user = server.add_user("alice")

    async def work() -> None:
        async with server.sftp(user) as sftp:
            await sftp.mkdir("docs")
            async with sftp.open("docs/a.txt", "wb") as f:
                await f.write(b"x" * 1234)
            async with sftp.open("docs/a.txt", "rb") as f:
                await f.read()

    asyncio.run(work())
    bad = user.__class__(user.name, "wrong", user.home)
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(_connect(server, bad))
    log = server.log()
    assert re.search(r"login user=alice source=127\.0\.0\.1:\d+ method=password result=ok", log)
    assert re.search(r"login user=alice source=127\.0\.0\.1:\d+ method=password result=failed", log)
    assert re.search(r"transfer user=alice source=\S+ path=/docs/a\.txt direction=upload bytes=1234 seconds=[\d.]+ result=ok",
                     log)
    assert re.search(r"transfer user=alice source=\S+ path=/docs/a\.txt direction=download bytes=1234 ", log)
    assert str(user.home) not in log.split("listening on")[1]  # user-visible paths only
    assert "wrong" not in log


async def _connect(server, user) -> None:
    async with server.connect(user):
        pass


def test_shell_and_other_commands_get_a_clear_refusal(server):
    user = server.add_user("alice")
    res = server.openssh("ssh", user, ["-T", f"alice@{server.host}"], input="")
    assert res.returncode != 0 and "SFTP only" in res.stderr
    res = server.openssh("ssh", user, [f"alice@{server.host}", "rm -rf /"])
    assert res.returncode == 1 and "not allowed" in res.stderr
