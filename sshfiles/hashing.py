"""Server-side hashing of file ranges: the SFTP ``check-file`` extension and ``*sum`` exec commands.

Why this module exists: verified resume needs the server to prove what bytes it holds without sending
them back. The client asks for per-block digests of a remote range (``check-file-handle`` with a block
size), compares them with the same range of its local file, and resumes from the first block that
differs. The same digests serve WinSCP's checksum command and the ``sha256sum``/``md5sum`` exec
commands that rclone relies on.

Everything here works on an already-opened file descriptor: the caller (the SFTP handler) resolves a
path or handle through the jail first, so this module never builds a host path and can be tested on
its own. Reads use ``os.pread`` so the descriptor's offset is never moved (the same fd may be serving
pipelined READs), and the blocking work always runs in a worker thread: hashing a large file must not
stall the event loop that serves every other session.

Wire format (draft-ietf-secsh-filexfer-extensions-00, section "check-file")::

    request:  byte   SSH_FXP_EXTENDED
              uint32 request-id
              string "check-file-handle" | "check-file-name"
              string handle | filename
              string hash-algorithm-list      (comma separated, preferred first)
              uint64 start-offset
              uint64 length                   (0 = to end of file)
              uint32 block-size               (0 = one hash over the range, else >= 256)

    reply:    byte   SSH_FXP_EXTENDED_REPLY
              uint32 request-id
              string hash-algorithm-used
              byte[] hash...                  (concatenated digests, one per block)

Servers advertise support with the extension pair ``("check-file", "<algorithm list>")`` in their
VERSION packet; WinSCP looks for exactly that name.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Protocol

import asyncssh
from asyncssh.packet import SSHPacket, String

__all__ = [
    "ALGORITHMS",
    "CHECK_FILE_EXTENSION",
    "MIN_BLOCK_SIZE",
    "MAX_REPLY_DIGEST_BYTES",
    "CheckFileRequest",
    "select_algorithm",
    "hash_fd_range",
    "hash_fd_range_async",
    "parse_check_file",
    "answer_check_file",
]

#: Read size for one pread: large enough to amortise the syscall, small enough to keep memory flat.
READ_CHUNK = 1 << 20

#: The draft forbids tiny blocks (a client could otherwise ask for one digest per byte).
MIN_BLOCK_SIZE = 256

#: Upper bound on the digests in one reply. SFTP packets are limited (OpenSSH: 256 KiB), so a
#: request that would produce more must be split into ranges by the client.
MAX_REPLY_DIGEST_BYTES = 192 * 1024


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class _CRC32:
    """CRC-32 in the draft's ``crc32`` form (4 bytes, big-endian); hashlib has no CRC."""

    digest_size = 4

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes, /) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def digest(self) -> bytes:
        return self._crc.to_bytes(4, "big")


def _hashlib_factory(name: str) -> Callable[[], _Hasher]:
    def make() -> _Hasher:
        return hashlib.new(name)

    return make


#: Algorithm name on the wire -> (constructor, digest size). Order is our own preference when a
#: caller has none; the client's list always wins in check-file.
ALGORITHMS: dict[str, tuple[Callable[[], _Hasher], int]] = {
    "sha256": (_hashlib_factory("sha256"), 32),
    "sha512": (_hashlib_factory("sha512"), 64),
    "sha384": (_hashlib_factory("sha384"), 48),
    "sha224": (_hashlib_factory("sha224"), 28),
    "sha1": (_hashlib_factory("sha1"), 20),
    "md5": (_hashlib_factory("md5"), 16),
    "crc32": (_CRC32, 4),
}

#: The extension pair to add to the SFTP server's VERSION extensions so clients (WinSCP) know.
CHECK_FILE_EXTENSION: tuple[bytes, bytes] = (b"check-file", ",".join(ALGORITHMS).encode("ascii"))


def _new_hasher(algorithm: str) -> _Hasher:
    try:
        factory, _ = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"unsupported hash algorithm: {algorithm}") from None
    return factory()


def select_algorithm(offered: list[str]) -> str:
    """Return the first algorithm in the client's preference list that we support.

    Raises ``asyncssh.SFTPOpUnsupported`` when there is none, which is the status the draft asks for.
    """
    for name in offered:
        name = name.strip().lower()
        if name in ALGORITHMS:
            return name
    raise asyncssh.SFTPOpUnsupported("No supported hash algorithm in: " + ",".join(offered))


def hash_fd_range(fd: int, algorithm: str, offset: int = 0, length: int = 0,
                  block_size: int = 0) -> list[bytes]:
    """Digest ``length`` bytes of ``fd`` from ``offset`` (0 = to EOF); blocking.

    With ``block_size`` 0 the result is one digest over the whole range (the digest of no data when the
    range is empty). Otherwise it is one digest per ``block_size`` bytes, the last possibly short, and
    an empty list for an empty range. Uses ``os.pread`` only, so the fd's file offset is untouched.
    """
    if offset < 0 or length < 0 or block_size < 0:
        raise ValueError("offset, length and block_size must not be negative")
    end = offset + length if length else None

    def read_span(pos: int, limit: int | None, hasher: _Hasher) -> int:
        """Feed bytes [pos, limit) (or to EOF) into hasher; return the position reached."""
        while limit is None or pos < limit:
            want = READ_CHUNK if limit is None else min(READ_CHUNK, limit - pos)
            data = os.pread(fd, want, pos)
            if not data:
                break
            hasher.update(data)
            pos += len(data)
        return pos

    if not block_size:
        hasher = _new_hasher(algorithm)
        read_span(offset, end, hasher)
        return [hasher.digest()]

    digests: list[bytes] = []
    pos = offset
    while end is None or pos < end:
        block_end = pos + block_size if end is None else min(pos + block_size, end)
        hasher = _new_hasher(algorithm)
        reached = read_span(pos, block_end, hasher)
        if reached == pos:
            break  # EOF exactly at a block boundary: no empty trailing digest
        digests.append(hasher.digest())
        if reached < block_end:
            break  # short block: EOF
        pos = reached
    return digests


async def hash_fd_range_async(fd: int, algorithm: str, offset: int = 0, length: int = 0,
                              block_size: int = 0) -> list[bytes]:
    """``hash_fd_range`` in a worker thread, so a large file never stalls the event loop."""
    return await asyncio.to_thread(hash_fd_range, fd, algorithm, offset, length, block_size)


@dataclass(frozen=True)
class CheckFileRequest:
    """A parsed ``check-file-handle`` / ``check-file-name`` request.

    ``target`` is the raw handle (by_handle) or the raw client path, still to be resolved by the
    caller through the jail; this module never interprets it.
    """

    target: bytes
    by_handle: bool
    algorithms: list[str]
    offset: int
    length: int
    block_size: int


def parse_check_file(packet: SSHPacket, by_handle: bool) -> CheckFileRequest:
    """Parse the body of a check-file request, positioned just after the extension name.

    asyncssh's server handler has already read the request id and the extension name when it calls
    an extended handler, so ``packet`` starts at the handle/filename string. A malformed packet raises
    ``asyncssh.packet.PacketDecodeError`` (asyncssh answers it with SSH_FX_BAD_MESSAGE).
    """
    target = packet.get_string()
    alg_list = packet.get_string().decode("ascii", errors="replace")
    offset = packet.get_uint64()
    length = packet.get_uint64()
    block_size = packet.get_uint32()
    packet.check_end()
    algorithms = [a.strip() for a in alg_list.split(",") if a.strip()]
    return CheckFileRequest(target, by_handle, algorithms, offset, length, block_size)


def _expected_blocks(fd: int, req: CheckFileRequest) -> int:
    size = os.fstat(fd).st_size
    start = min(req.offset, size)
    stop = size if not req.length else min(size, req.offset + req.length)
    span = max(0, stop - start)
    return -(-span // req.block_size)


async def answer_check_file(fd: int, req: CheckFileRequest) -> bytes:
    """Hash the requested range of ``fd`` and return the EXTENDED_REPLY body.

    The body is ``string algorithm-used`` followed by the concatenated digests; wrap it in
    ``sshfiles.sftp.ExtendedReply`` to return it from an asyncssh extended-request handler. Errors are SFTP errors
    so asyncssh turns them into the right status: no common algorithm -> OP_UNSUPPORTED, a block size
    under 256 -> INVALID_PARAMETER, a reply too big for one packet -> FAILURE (ask for a shorter range).
    """
    algorithm = select_algorithm(req.algorithms)
    if req.block_size:
        if req.block_size < MIN_BLOCK_SIZE:
            raise asyncssh.SFTPInvalidParameter(
                f"check-file block size must be 0 or at least {MIN_BLOCK_SIZE}")
        digest_size = ALGORITHMS[algorithm][1]
        blocks = await asyncio.to_thread(_expected_blocks, fd, req)
        if blocks * digest_size > MAX_REPLY_DIGEST_BYTES:
            raise asyncssh.SFTPFailure(
                f"check-file would return {blocks} digests; use a larger block size or a shorter range")
    digests = await hash_fd_range_async(fd, algorithm, req.offset, req.length, req.block_size)
    return String(algorithm) + b"".join(digests)

