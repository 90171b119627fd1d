"""Unit tests for sshfiles.hashing: range hashing and the check-file wire format (no server needed)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib

import asyncssh
import pytest
from asyncssh.packet import SSHPacket, String, UInt32, UInt64

from sshfiles import checkfile as hashing  # CHECK_FILE_EXTENSION moved with the check-file codec
from sshfiles.checkfile import CheckFileRequest, answer_check_file, parse_check_file
from sshfiles.hashing import hash_fd_range, hash_fd_range_async


@pytest.fixture()
def data_fd(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 777)  # spans several read chunks, odd tail
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


@pytest.mark.parametrize("alg", ["md5", "sha1", "sha224", "sha256", "sha384", "sha512"])
def test_whole_file_matches_hashlib(data_fd, alg):
    fd, data = data_fd
    assert hash_fd_range(fd, alg) == [hashlib.new(alg, data).digest()]


def test_crc32_is_big_endian_zlib(data_fd):
    fd, data = data_fd
    assert hash_fd_range(fd, "crc32") == [zlib.crc32(data).to_bytes(4, "big")]


@pytest.mark.parametrize("offset,length", [(0, 1), (1, 0), (1000, 5000), (2**20 - 3, 2**20 + 9),
                                           (len(b"") + 3 * 2**20, 0)])
def test_ranges(data_fd, offset, length):
    fd, data = data_fd
    want = data[offset:offset + length] if length else data[offset:]
    assert hash_fd_range(fd, "sha256", offset, length) == [hashlib.sha256(want).digest()]


def test_range_past_eof_is_empty_digest(data_fd):
    fd, data = data_fd
    assert hash_fd_range(fd, "md5", len(data) + 10, 100) == [hashlib.md5(b"").digest()]
    assert hash_fd_range(fd, "md5", len(data) + 10, 100, 4096) == []


@pytest.mark.parametrize("offset,length,block", [(0, 0, 65536), (0, 0, 1 << 20), (10, 100000, 4096),
                                                 (0, 3 * 2**20, 2**20), (5, 0, 999999)])
def test_block_digests(data_fd, offset, length, block):
    fd, data = data_fd
    span = data[offset:offset + length] if length else data[offset:]
    want = [hashlib.sha1(span[i:i + block]).digest() for i in range(0, len(span), block)]
    assert hash_fd_range(fd, "sha1", offset, length, block) == want


def test_fd_offset_untouched(data_fd):
    fd, _ = data_fd
    os.lseek(fd, 12345, os.SEEK_SET)
    hash_fd_range(fd, "sha256", 0, 0, 4096)
    assert os.lseek(fd, 0, os.SEEK_CUR) == 12345


def test_async_runs_off_loop(data_fd):
    """The loop keeps ticking while a large hash runs: the work is in a thread."""
    fd, data = data_fd

    async def main():
        ticks = 0
        stop = False

        async def ticker():
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        for _ in range(5):
            result = await hash_fd_range_async(fd, "sha512")
        stop = True
        await task
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result == [hashlib.sha512(data).digest()]
    assert ticks > 5


def test_unknown_algorithm():
    with pytest.raises(ValueError):
        hash_fd_range(0, "whirlpool")


def _request(target: bytes, algs: str, offset: int, length: int, block: int) -> bytes:
    return String(target) + String(algs) + UInt64(offset) + UInt64(length) + UInt32(block)


def test_parse_check_file_name():
    pkt = SSHPacket(_request(b"/dir/f.bin", "sha256,md5", 4096, 8192, 1024))
    req = parse_check_file(pkt, by_handle=False)
    assert req == CheckFileRequest(b"/dir/f.bin", False, ["sha256", "md5"], 4096, 8192, 1024)


def test_parse_check_file_handle_after_name():
    """As asyncssh delivers it: request id and extension name already consumed."""
    raw = UInt32(7) + String(b"check-file-handle") + _request(b"\x00\x00\x00\x05", "sha1", 0, 0, 0)
    pkt = SSHPacket(raw)
    assert pkt.get_uint32() == 7 and pkt.get_string() == b"check-file-handle"
    req = parse_check_file(pkt, by_handle=True)
    assert req.target == b"\x00\x00\x00\x05" and req.by_handle and req.algorithms == ["sha1"]


def test_parse_rejects_trailing_and_truncated():
    from asyncssh.packet import PacketDecodeError

    with pytest.raises(PacketDecodeError):
        parse_check_file(SSHPacket(_request(b"x", "md5", 0, 0, 0) + b"junk"), False)
    with pytest.raises(PacketDecodeError):
        parse_check_file(SSHPacket(_request(b"x", "md5", 0, 0, 0)[:-2]), False)


def _decode_reply(body: bytes) -> tuple[str, bytes]:
    pkt = SSHPacket(body)
    alg = pkt.get_string().decode()
    return alg, pkt.get_remaining_payload()


def test_answer_picks_first_supported(data_fd):
    fd, data = data_fd
    req = CheckFileRequest(b"h", True, ["tiger", "md5", "sha256"], 0, 0, 0)
    alg, digests = _decode_reply(asyncio.run(answer_check_file(fd, req)))
    assert alg == "md5" and digests == hashlib.md5(data).digest()


def test_answer_blocks_and_range(data_fd):
    fd, data = data_fd
    req = CheckFileRequest(b"h", True, ["sha256"], 100, 300000, 65536)
    alg, digests = _decode_reply(asyncio.run(answer_check_file(fd, req)))
    span = data[100:300100]
    assert alg == "sha256"
    assert digests == b"".join(hashlib.sha256(span[i:i + 65536]).digest()
                               for i in range(0, len(span), 65536))


def test_answer_errors(data_fd):
    fd, _ = data_fd
    with pytest.raises(asyncssh.SFTPOpUnsupported):
        asyncio.run(answer_check_file(fd, CheckFileRequest(b"h", True, ["tiger"], 0, 0, 0)))
    with pytest.raises(asyncssh.SFTPInvalidParameter):
        asyncio.run(answer_check_file(fd, CheckFileRequest(b"h", True, ["md5"], 0, 0, 16)))
    with pytest.raises(asyncssh.SFTPFailure):  # 3 MiB / 256 * 64 bytes > one packet
        asyncio.run(answer_check_file(fd, CheckFileRequest(b"h", True, ["sha512"], 0, 0, 256)))


def test_reply_adapter_and_extension():
    from sshfiles.sftp import ExtendedReply

    assert ExtendedReply(b"abc").encode(3) == b"abc"
    name, algs = hashing.CHECK_FILE_EXTENSION
    assert name == b"check-file" and b"sha256" in algs.split(b",") and b"md5" in algs.split(b",")
