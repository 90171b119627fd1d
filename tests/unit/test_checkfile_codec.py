"""sshfiles.checkfile: the check-file wire codec both sides use, round-tripped without a server."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from sshfiles import checkfile
from sshfiles.asyncssh_seam import PacketDecodeError, SSHPacket
from sshfiles.checkfile import CheckFileRequest, MalformedReply, decode_reply, encode_reply, encode_request
from sshfiles.hashing import ALGORITHMS, hash_fd_range


def test_request_golden_bytes() -> None:
    """The exact bytes a client sends after the extension name (draft-ietf-secsh-filexfer-extensions-00)."""
    assert encode_request(b"h1", "sha256,md5", 1, 2, 256) == (
        b"\x00\x00\x00\x02h1" + b"\x00\x00\x00\x0asha256,md5" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big")
        + (256).to_bytes(4, "big"))


def test_reply_golden_bytes() -> None:
    assert encode_reply("md5", [b"A" * 16, b"B" * 16]) == b"\x00\x00\x00\x03md5" + b"A" * 16 + b"B" * 16


@pytest.mark.parametrize("by_handle", [True, False])
@pytest.mark.parametrize("algs", ["sha256", ["sha1", "md5"], "tiger, crc32 ,sha512"])
def test_request_round_trip(by_handle: bool, algs: str | list[str]) -> None:
    body = encode_request(b"/dir/\xfffile", algs, 2**40, 2**33 + 1, 2**20)
    req = checkfile.parse_check_file(SSHPacket(body), by_handle=by_handle)
    names = algs if isinstance(algs, list) else [a.strip() for a in algs.split(",")]
    assert req == CheckFileRequest(b"/dir/\xfffile", by_handle, names, 2**40, 2**33 + 1, 2**20)


def test_list_and_string_algorithms_encode_alike() -> None:
    assert encode_request(b"h", ["sha1", "md5"]) == encode_request(b"h", "sha1,md5")


def test_parse_rejects_trailing_and_truncated() -> None:
    body = encode_request(b"h", "md5")
    with pytest.raises(PacketDecodeError):
        checkfile.parse_check_file(SSHPacket(body + b"\0"), by_handle=True)
    with pytest.raises(PacketDecodeError):
        checkfile.parse_check_file(SSHPacket(body[:-1]), by_handle=True)


@pytest.mark.parametrize("alg", list(ALGORITHMS))
@pytest.mark.parametrize("count", [0, 1, 5])
def test_reply_round_trip(alg: str, count: int) -> None:
    digests = [os.urandom(ALGORITHMS[alg][1]) for _ in range(count)]
    assert decode_reply(encode_reply(alg, digests)) == (alg, digests)


@pytest.mark.parametrize("body", [encode_reply("sha256", [b"x" * 31]), encode_reply("tiger", [b"x" * 24]),
                                  encode_reply("sha1", [b"x" * 20]) + b"y"])
def test_malformed_reply(body: bytes) -> None:
    with pytest.raises(MalformedReply, match="malformed check-file reply"):
        decode_reply(body)


def test_truncated_reply() -> None:
    with pytest.raises(PacketDecodeError):
        decode_reply(b"\x00\x00\x00\x09sha")


@pytest.fixture
def data_fd(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(800_000)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def test_answer_decodes_to_the_hashes(data_fd: tuple[int, bytes]) -> None:
    """Server answer -> client decoder, as over the wire: the digests of the requested blocks."""
    fd, data = data_fd
    req = checkfile.parse_check_file(SSHPacket(encode_request(b"h", "tiger,sha256", 10, 200_000, 65536)), True)
    alg, digests = decode_reply(asyncio.run(checkfile.answer_check_file(fd, req)))
    span = data[10:200_010]
    assert alg == "sha256"
    assert digests == [hashlib.sha256(span[i:i + 65536]).digest() for i in range(0, len(span), 65536)]
    assert digests == hash_fd_range(fd, "sha256", 10, 200_000, 65536)


def test_answer_status_errors(data_fd: tuple[int, bytes]) -> None:
    fd, _ = data_fd

    def answer(algs: list[str], block: int) -> bytes:
        return asyncio.run(checkfile.answer_check_file(fd, CheckFileRequest(b"h", True, algs, 0, 0, block)))

    with pytest.raises(asyncssh.SFTPOpUnsupported, match="No supported hash algorithm"):
        answer(["tiger", "whirlpool"], 0)
    with pytest.raises(asyncssh.SFTPInvalidParameter):
        answer(["md5"], checkfile.MIN_BLOCK_SIZE - 1)
    assert answer(["md5"], checkfile.MIN_BLOCK_SIZE)  # the floor itself is fine: 3125 digests of 16 bytes
    with pytest.raises(asyncssh.SFTPFailure, match="digests"):
        # 800 kB in 256-byte blocks of sha512 (3125 x 64 bytes) is more than one reply may carry
        asyncio.run(checkfile.answer_check_file(
            fd, CheckFileRequest(b"h", True, ["sha512"], 0, 0, 256)))


def test_extension_advertises_every_algorithm() -> None:
    name, algs = checkfile.CHECK_FILE_EXTENSION
    assert name == b"check-file" and algs.decode().split(",") == list(ALGORITHMS)
