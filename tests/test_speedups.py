"""The faster chacha20-poly1305 must be the same wire format as asyncssh's (OpenSSH's) construction."""

from __future__ import annotations

import os

from asyncssh.crypto.chacha import ChachaCipher

from sshfiles.asyncssh_seam import FastChachaCipher


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
