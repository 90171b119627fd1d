"""The faster chacha20-poly1305 and AES-GCM must be the same wire format as asyncssh's (OpenSSH's)
constructions."""

from __future__ import annotations

import os

import pytest
from asyncssh.crypto.chacha import ChachaCipher
from asyncssh.crypto.cipher import GCMCipher

from sshfiles.asyncssh_seam import FastChachaCipher, FastGCMCipher


def test_same_bytes_as_asyncssh_for_many_sizes():
    for size in (0, 1, 15, 63, 64, 65, 1000, 32768 + 17, 262144):
        key = os.urandom(64)
        header, data, nonce = os.urandom(4), os.urandom(size), os.urandom(8)
        ref, fast = ChachaCipher(key), FastChachaCipher(key)
        packet, tag = ref.encrypt_and_sign(header, data, nonce)
        assert fast.encrypt_and_sign(header, data, nonce) == (packet, tag)
        assert fast.decrypt_header(packet[:4], nonce) == header
        assert fast.verify_and_decrypt(packet[:4], packet[4:], nonce, tag) == data
        cut = 4 + size // 3
        assert fast.verify_and_decrypt_parts(packet[:4], (packet[4:cut], packet[cut:]), nonce, tag) == data
        # and asyncssh accepts what we produce
        assert ref.verify_and_decrypt(packet[:4], packet[4:], nonce, tag) == data


def test_tampering_is_detected():
    key = os.urandom(64)
    fast = FastChachaCipher(key)
    packet, tag = fast.encrypt_and_sign(b"\0\0\0\x10", b"sixteen bytes!!!", bytes(8))
    flipped = bytearray(packet)
    flipped[7] ^= 1
    assert fast.verify_and_decrypt(bytes(flipped[:4]), bytes(flipped[4:]), bytes(8), tag) is None
    assert fast.verify_and_decrypt(packet[:4], packet[4:], (1).to_bytes(8, "big"), tag) is None
    assert fast.verify_and_decrypt(packet[:4], packet[4:], bytes(8), bytes(16)) is None


@pytest.mark.parametrize("name,key_size", [("aes128-gcm", 16), ("aes256-gcm", 32)])
def test_gcm_same_bytes_as_asyncssh_packet_after_packet(name, key_size):
    """Item 3h: each packet's ciphertext and tag equal asyncssh's, across many packets (the nonce's
    invocation counter, started near its 64-bit wrap), whole or in pieces, and each side decrypts
    the other's packets."""
    key = os.urandom(key_size)
    iv = os.urandom(4) + (2**64 - 3).to_bytes(8, "big")
    ref_send, fast_send = GCMCipher(name, key, iv), FastGCMCipher(key, iv)
    ref_recv, fast_recv = GCMCipher(name, key, iv), FastGCMCipher(key, iv)
    for size in (16, 32, 1008, 32768 + 16, 262144 + 32, 16):
        header, data = size.to_bytes(4, "big"), os.urandom(size)
        packet, tag = ref_send.encrypt_and_sign(header, data)
        cut = size // 3
        pieces = fast_send.encrypt_and_sign_parts(header, [data[:cut], data[cut:]], b"")
        assert b"".join(pieces) == packet + tag
        assert [len(p) for p in pieces] == [4, cut, size - cut, 16]
        assert fast_recv.verify_and_decrypt_parts(header, (packet[4:4 + cut], packet[4 + cut:]), tag) == data
        assert ref_recv.verify_and_decrypt(header, packet[4:], tag) == data


def test_gcm_tampering_is_detected():
    key, iv = os.urandom(16), os.urandom(12)
    packet, tag = FastGCMCipher(key, iv).encrypt_and_sign(b"\0\0\0\x10", b"sixteen bytes!!!")
    flipped = bytearray(packet)
    flipped[7] ^= 1
    assert FastGCMCipher(key, iv).verify_and_decrypt(bytes(flipped[:4]), bytes(flipped[4:]), tag) is None
    assert FastGCMCipher(key, iv).verify_and_decrypt(b"\0\0\0\x11", packet[4:], tag) is None  # header is AAD
    assert FastGCMCipher(key, iv).verify_and_decrypt(packet[:4], packet[4:], bytes(16)) is None
    receiver = FastGCMCipher(key, iv)
    receiver.verify_and_decrypt(packet[:4], packet[4:], tag)
    assert receiver.verify_and_decrypt(packet[:4], packet[4:], tag) is None  # a replay: next nonce


def test_server_offers_no_cbc_so_dropping_the_cbc_ignore_countermeasure_is_safe():
    from sshfiles.server import ENCRYPTION_ALGS

    assert not [alg for alg in ENCRYPTION_ALGS if "cbc" in alg]


def test_no_ignore_packets_between_data_packets(server):
    """With the speed-ups, a download is data packets only: count the packets the client receives."""
    import asyncio

    user = server.add_user("speedy")
    size = 4 << 20
    (user.home / "f.bin").write_bytes(os.urandom(size))

    async def run() -> int:
        async with server.connect(user) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("f.bin", "rb") as f:
                start = conn._recv_seq
                assert len(await f.read()) == size
                return conn._recv_seq - start

    received = asyncio.run(run())
    data_packets = size // 32768  # asyncssh's client accepts packets of at most 32 KiB
    # one packet per 32 KiB of data plus a little SFTP framing; asyncssh alone sends twice as many
    assert data_packets <= received < data_packets * 1.25, received


def test_packet_logging_still_works_when_asked_for(caplog):
    """The skip applies only when asyncssh would have dropped the packet log line anyway."""
    import logging

    import asyncssh
    from asyncssh.logging import logger as ssh_logger
    from asyncssh.packet import SSHPacketLogger

    from sshfiles import asyncssh_seam as speedups

    class Probe(SSHPacketLogger):
        _handler_names = {94: "MSG_CHANNEL_DATA"}

        @property
        def logger(self):
            return ssh_logger

    # Only this one replacement, and undone after: the test process's own asyncssh clients stay stock.
    original = SSHPacketLogger._log_packet
    SSHPacketLogger._log_packet = speedups._log_packet_if_enabled
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            asyncssh.set_debug_level(1)
            Probe().log_sent_packet(94, 7, b"payload")
            assert not [r for r in caplog.records if "MSG_CHANNEL_DATA" in r.getMessage()]
            asyncssh.set_debug_level(3)
            Probe().log_sent_packet(94, 7, b"payload")
            assert [r for r in caplog.records if "Sent MSG_CHANNEL_DATA (94), 7 bytes" in r.getMessage()]
    finally:
        asyncssh.set_debug_level(1)
        SSHPacketLogger._log_packet = original


def test_unjoined_packet_encryption_is_the_same_bytes_as_asyncssh():
    """Item 3f encrypts a packet's pieces one after the other: same ciphertext and tag as the whole."""
    for sizes in ((2,), (2, 4, 32772, 9), (6, 262148, 4), (1, 1, 1, 1), (2, 0, 5)):
        key = os.urandom(64)
        parts = [os.urandom(n) for n in sizes]
        header, nonce = os.urandom(4), os.urandom(8)
        packet, tag = ChachaCipher(key).encrypt_and_sign(header, b"".join(parts), nonce)
        pieces = FastChachaCipher(key).encrypt_and_sign_parts(header, parts, nonce)
        assert b"".join(pieces) == packet + tag
        assert [len(p) for p in pieces] == [4, *sizes, 16]


def test_public_cipher_path_is_the_same_bytes(monkeypatch):
    """The direct context (item 3d) must equal cryptography's public Cipher path, which is the fallback."""
    from sshfiles import asyncssh_seam as seam

    key, nonce, data = os.urandom(32), os.urandom(16), os.urandom(1000)
    assert seam._chacha20(key, nonce).update(data) == seam._chacha20_public(key, nonce).update(data)
    # Our own fallback in place of the direct context (no SSH layer is replaced): same bytes.
    monkeypatch.setattr(seam, "_chacha20", seam._chacha20_public)
    key64, header, body, seq = os.urandom(64), os.urandom(4), os.urandom(40000), os.urandom(8)
    assert FastChachaCipher(key64).encrypt_and_sign(header, body, seq) == \
        ChachaCipher(key64).encrypt_and_sign(header, body, seq)


def test_speedup_switch_names_items_or_all():
    from sshfiles.asyncssh_seam import SPEEDUP_ITEMS, speedups_disabled

    assert speedups_disabled(None) == frozenset() == speedups_disabled("")
    assert speedups_disabled("1") == frozenset(SPEEDUP_ITEMS)
    assert speedups_disabled("3e, 3f") == {"3e", "3f"}
    assert speedups_disabled("3e,bogus") == frozenset(SPEEDUP_ITEMS)  # unknown: everything off


@pytest.mark.parametrize("switch", ["", "3e", "3f", "3g", "3h", "1"],
                         ids=["all-on", "no-3e", "no-3f", "no-3g", "no-3h", "pure-asyncssh"])
def test_transfers_are_byte_identical_with_each_speedup_setting(switch, tmp_path, host_keys_dir, monkeypatch):
    """Stock OpenSSH sftp (32 KiB packets, chacha20-poly1305, and aes128-gcm for item 3h) and asyncssh's
    client (256 KiB packets, its default cipher and aes256-gcm) up and down, with all speed-ups,
    without the packet-sized input (3e) or the unjoined send path (3f), without the batched replies
    (3g) or the GCM shim (3h), and with none (the pure asyncssh path stays covered); odd sizes so
    packets end mid-read."""
    import asyncio
    import hashlib
    import shutil

    from tests.conftest import make_server

    if not shutil.which("sftp"):
        pytest.skip("OpenSSH sftp client not installed")
    if switch:
        monkeypatch.setenv("SSHFILES_NO_SPEEDUPS", switch)
    else:
        monkeypatch.delenv("SSHFILES_NO_SPEEDUPS", raising=False)
    server = make_server(tmp_path, host_keys_dir)
    server.start()
    try:
        user = server.add_user("bytes", key=True)
        local = tmp_path / "local"
        local.mkdir()
        sizes = {"a.bin": 5 * 1024 * 1024 + 12345, "b.bin": 32768 * 3 + 1, "c.bin": 7}
        for name, size in sizes.items():
            (local / name).write_bytes(os.urandom(size))
        puts = "".join(f"put {n}\n" for n in sizes)
        gets = "".join(f"get {n} back-{n}\n" for n in sizes)
        res = server.sftp_batch(user, puts + gets, cwd=local)
        assert res.returncode == 0, res.stderr
        gcm = "".join(f"put {local / n} gcm-{n}\nget gcm-{n} {local / f'gcm-{n}'}\n" for n in sizes)
        res = server.openssh("sftp", user, ["-c", "aes128-gcm@openssh.com", "-b", "-",
                                            f"{user.name}@{server.host}"], input=gcm)
        assert res.returncode == 0, res.stderr

        async def with_asyncssh() -> None:
            # a key exchange every MiB: the server's packets cross several rekeys mid-transfer
            async with server.sftp(user, rekey_bytes=1 << 20) as sftp:
                await sftp.put(str(local / "a.bin"), "d.bin")
                await sftp.get("d.bin", str(local / "back-d.bin"))
            async with server.sftp(user, rekey_bytes=1 << 20, encryption_algs=["aes256-gcm@openssh.com"]) as sftp:
                await sftp.put(str(local / "a.bin"), "e.bin")
                await sftp.get("e.bin", str(local / "back-e.bin"))

        asyncio.run(with_asyncssh())
        digest = {n: hashlib.sha256((local / n).read_bytes()).hexdigest() for n in sizes}
        for name in sizes:
            assert hashlib.sha256((user.home / name).read_bytes()).hexdigest() == digest[name]
            assert hashlib.sha256((local / f"back-{name}").read_bytes()).hexdigest() == digest[name]
        assert hashlib.sha256((user.home / "d.bin").read_bytes()).hexdigest() == digest["a.bin"]
        assert hashlib.sha256((local / "back-d.bin").read_bytes()).hexdigest() == digest["a.bin"]
        assert hashlib.sha256((user.home / "e.bin").read_bytes()).hexdigest() == digest["a.bin"]
        assert hashlib.sha256((local / "back-e.bin").read_bytes()).hexdigest() == digest["a.bin"]
        for name in sizes:
            assert hashlib.sha256((user.home / f"gcm-{name}").read_bytes()).hexdigest() == digest[name]
            assert hashlib.sha256((local / f"gcm-{name}").read_bytes()).hexdigest() == digest[name]
    finally:
        server.stop()
