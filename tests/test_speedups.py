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
    """Item 3j: each packet's ciphertext and tag equal asyncssh's, across many packets (the nonce's
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


@pytest.mark.parametrize("switch", ["", "3e", "3f", "3g", "3h", "3i", "3j", "3k", "1"],
                         ids=["all-on", "no-3e", "no-3f", "no-3g", "no-3h", "no-3i", "no-3j", "no-3k", "pure-asyncssh"])
def test_transfers_are_byte_identical_with_each_speedup_setting(switch, tmp_path, host_keys_dir, monkeypatch):
    """Stock OpenSSH sftp (32 KiB packets, chacha20-poly1305, and aes128-gcm for item 3j) and asyncssh's
    client (256 KiB packets, its default cipher and aes256-gcm) up and down, with all speed-ups,
    without the packet-sized input (3e) or the unjoined send path (3f), without the batched replies
    (3g), without the zero-copy SFTP requests (3h) or the channel data views (3i), without the GCM
    shim (3j), without the compiled chacha20-poly1305 (3k: item 3d's Python path), and with none (the
    pure asyncssh path stays covered); odd sizes so packets end mid-read."""
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


def _sftp_packet(pkttype: int, *fields: bytes) -> bytes:
    body = bytes((pkttype,)) + b"".join(fields)
    return len(body).to_bytes(4, "big") + body


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _string(b: bytes) -> bytes:
    return _u32(len(b)) + b


@pytest.mark.parametrize("switch", ["", "3h", "3i"], ids=["zero-copy", "asyncssh-reader", "bytes-chunks"])
def test_sftp_requests_cut_anywhere_by_the_client_arrive_whole(switch, tmp_path, host_keys_dir, monkeypatch):
    """Item 3h reads SFTP requests straight out of the channel's received chunks: a hostile or odd
    client may cut its byte stream anywhere (inside a length word, inside a header, a request over
    many channel messages, several requests in one message, a huge length). Every cut must give
    the same file and replies as asyncssh's own reader, and a length over asyncssh's maximum ends
    the session as before."""
    import asyncio
    import hashlib
    import random

    from tests.conftest import make_server

    if switch:
        monkeypatch.setenv("SSHFILES_NO_SPEEDUPS", switch)
    else:
        monkeypatch.delenv("SSHFILES_NO_SPEEDUPS", raising=False)
    server = make_server(tmp_path, host_keys_dir)
    server.start()
    try:
        user = server.add_user("cutter", key=True)
        rng = random.Random(14)
        expected = bytearray()
        writes = []
        for _ in range(40):
            piece = rng.randbytes(rng.choice([0, 1, 7, 4096, 32768, 70000, 200000]))
            writes.append((len(expected), piece))
            expected += piece

        async def read_reply(reader) -> tuple[int, bytes]:
            length = int.from_bytes(await reader.readexactly(4), "big")
            body = await reader.readexactly(length)
            return body[0], body[1:]

        async def run() -> None:
            async with server.connect(user) as conn:
                writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)
                writer.write(_sftp_packet(1, _u32(3)))  # INIT
                assert (await read_reply(reader))[0] == 2  # VERSION
                open_flags = 0x02 | 0x08 | 0x10  # WRITE | CREAT | TRUNC
                writer.write(_sftp_packet(3, _u32(1), _string(b"cut.bin"), _u32(open_flags), _u32(0)))
                kind, body = await read_reply(reader)
                assert kind == 102, body  # HANDLE
                handle = body[4 + 4:]
                stream = b"".join(_sftp_packet(6, _u32(100 + i), _string(handle), off.to_bytes(8, "big"),
                                               _string(data)) for i, (off, data) in enumerate(writes))
                # cuts: inside the first length word, a header, single bytes, big and small pieces
                pos = 0
                for size in [2, 1, 5, 3, 1, 1, 40000, 9, 100000, 32768]:
                    writer.write(stream[pos:pos + size])
                    pos += size
                    await asyncio.sleep(0)
                while pos < len(stream):
                    size = rng.choice([1, 3, 17, 1000, 32768, 32797, 65536, 300000])
                    writer.write(stream[pos:pos + size])
                    pos += size
                for i in range(len(writes)):
                    kind, body = await read_reply(reader)
                    assert kind == 101 and body[:4] == _u32(100 + i) and body[4:8] == _u32(0), body
                writer.write(_sftp_packet(4, _u32(2), _string(handle)))  # CLOSE
                kind, body = await read_reply(reader)
                assert kind == 101 and body[4:8] == _u32(0), body
                # a request longer than asyncssh's maximum: the session ends, as with asyncssh's reader
                writer.write(_u32(64 * 1024 * 1024) + b"\x06")
                with pytest.raises(asyncio.IncompleteReadError):
                    await asyncio.wait_for(read_reply(reader), 10)

        asyncio.run(run())
        got = (user.home / "cut.bin").read_bytes()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(bytes(expected)).hexdigest()
    finally:
        server.stop()


@pytest.mark.parametrize("switch", ["", "3h"], ids=["zero-copy", "asyncssh-reader"])
def test_eof_in_the_middle_of_a_request_keeps_the_whole_requests_before_it(switch, tmp_path, host_keys_dir,
                                                                          monkeypatch):
    """A client that stops (EOF) halfway through a WRITE: the complete WRITEs before it are
    answered and on disk, the half request is dropped, and the session ends (item 3h's reader hands
    EOF to asyncssh's, which raises it)."""
    import asyncio

    from tests.conftest import make_server

    if switch:
        monkeypatch.setenv("SSHFILES_NO_SPEEDUPS", switch)
    else:
        monkeypatch.delenv("SSHFILES_NO_SPEEDUPS", raising=False)
    server = make_server(tmp_path, host_keys_dir)
    server.start()
    try:
        user = server.add_user("halfway", key=True)

        async def read_reply(reader) -> tuple[int, bytes]:
            length = int.from_bytes(await reader.readexactly(4), "big")
            body = await reader.readexactly(length)
            return body[0], body[1:]

        async def run() -> None:
            async with server.connect(user) as conn:
                writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)
                writer.write(_sftp_packet(1, _u32(3)))
                assert (await read_reply(reader))[0] == 2
                writer.write(_sftp_packet(3, _u32(1), _string(b"half.bin"), _u32(0x02 | 0x08 | 0x10), _u32(0)))
                kind, body = await read_reply(reader)
                assert kind == 102, body
                handle = body[8:]
                whole = _sftp_packet(6, _u32(7), _string(handle), (0).to_bytes(8, "big"), _string(b"A" * 50000))
                cut = _sftp_packet(6, _u32(8), _string(handle), (50000).to_bytes(8, "big"), _string(b"B" * 50000))
                writer.write(whole + cut[:30000])
                kind, body = await read_reply(reader)
                assert kind == 101 and body[:8] == _u32(7) + _u32(0), body
                writer.write_eof()
                await asyncio.wait_for(writer.channel.wait_closed(), 10)

        asyncio.run(run())
        assert (user.home / "half.bin").read_bytes() == b"A" * 50000
    finally:
        server.stop()


@pytest.mark.parametrize("pkttype, size, level, view", [
    (94, 32768, 1, True),  # channel data: a view of the decrypted packet (item 3i)
    (94, 100, 1, False),  # small data packets stay bytes
    (98, 32768, 1, False),  # any other message (here a channel request) stays bytes
    (94, 32768, 3, False),  # packet logging on: bytes, as asyncssh's logger expects
])
def test_channel_data_views_decrypt_to_the_same_bytes(monkeypatch, pkttype, size, level, view):
    """Item 3i returns a decrypted MSG_CHANNEL_DATA packet as a view; its bytes are asyncssh's own."""
    from asyncssh.encryption import ChachaEncryption
    from asyncssh.logging import SSHLogger

    from sshfiles import asyncssh_seam as seam

    monkeypatch.setattr(seam, "_channel_data_views", True)
    monkeypatch.setattr(SSHLogger, "_debug_level", level)
    key = os.urandom(64)
    payload = bytes((pkttype,)) + os.urandom(size)
    padlen = -(4 + 1 + len(payload)) % 8 + 8
    plain = bytes((padlen,)) + payload + os.urandom(padlen)
    header = len(plain).to_bytes(4, "big")
    seq = 77
    packet, mac = ChachaCipher(key).encrypt_and_sign(header, plain, seq.to_bytes(8, "big"))
    first, rest = packet[:8], packet[8:]
    ours = seam.FastChachaEncryption.new("chacha20-poly1305@openssh.com", key, b"").decrypt_packet(
        seq, first, rest, 4, mac)
    theirs = ChachaEncryption.new("chacha20-poly1305@openssh.com", key, b"").decrypt_packet(seq, first, rest, 4, mac)
    assert isinstance(ours, memoryview) is view
    assert bytes(ours) == theirs == plain
    tampered = mac[:-1] + bytes((mac[-1] ^ 1,))
    assert seam.FastChachaEncryption.new("chacha20-poly1305@openssh.com", key, b"").decrypt_packet(
        seq, first, rest, 4, tampered) is None


def test_compiled_chacha_is_built_where_a_compiler_is():
    """Item 3k is optional (no compiler: item 3d's Python path), but a machine with a C compiler must
    have built it: a silent build failure would otherwise leave every chacha20 packet on the slow path."""
    import shutil

    from sshfiles import asyncssh_seam as seam

    if seam._chachapoly is None:
        assert not (shutil.which("cc") or shutil.which("gcc")), (
            "a C compiler is installed but sshfiles._chachapoly was not built: pip install -e . (setup.py)")
        pytest.skip("no C compiler: the compiled helper is not built here")


@pytest.mark.parametrize("size", [0, 1, 13, 100, 4096, 32768 + 100, 262144 + 16])
def test_compiled_chacha_same_bytes_as_asyncssh(size):
    """Item 3k: every packet sealed by the compiled helper is asyncssh's (OpenSSH's) construction
    byte for byte, whole or in parts, for sequence numbers up to the 32-bit wrap and past it; it
    opens asyncssh's packets and refuses a wrong tag, a changed length or a changed byte."""
    from sshfiles import asyncssh_seam as seam

    if seam._chachapoly is None:
        pytest.skip("the compiled helper is not built here (see the test above)")
    key = os.urandom(64)
    ref, ours = ChachaCipher(key), seam.CompiledChachaCipher(key)
    data = os.urandom(size)
    header = len(data).to_bytes(4, "big")
    cut = size // 3
    for seq in (0, 1, 2**32 - 1, 2**32, 2**64 - 1):
        nonce = seq.to_bytes(8, "big")
        packet, tag = ref.encrypt_and_sign(header, data, nonce)
        assert ours.encrypt_and_sign_parts(header, [data[:cut], data[cut:]], nonce) == [packet + tag]
        assert ours.encrypt_and_sign(header, data, nonce) == (packet, tag)
        assert ours.decrypt_header(packet[:4], nonce) == header
        assert ours.verify_and_decrypt_parts(packet[:4], (packet[4:4 + cut], memoryview(packet)[4 + cut:]),
                                             nonce, tag) == data
        assert ours.verify_and_decrypt(packet[:4], packet[4:], nonce, tag) == data
        assert ours.verify_and_decrypt(packet[:4], packet[4:], nonce, tag[:-1] + bytes((tag[-1] ^ 1,))) is None
        assert ours.verify_and_decrypt(bytes((packet[0] ^ 1,)) + packet[1:4], packet[4:], nonce, tag) is None
        if size:
            flipped = bytes((packet[4] ^ 0x80,)) + packet[5:]
            assert ours.verify_and_decrypt(packet[:4], flipped, nonce, tag) is None
        assert ref.verify_and_decrypt(packet[:4], packet[4:], nonce, tag) == data
    with pytest.raises(ValueError):
        seam.CompiledChachaCipher(key[:32])
