"""Hashing of file ranges on an open descriptor: the one hashing core of sshfiles.

Why this module exists: verified resume needs the server to prove what bytes it holds without sending
them back, and the client to hash the same blocks of its local file; the ``sha256sum``/``md5sum`` exec
commands that rclone relies on need whole-file digests. All of them are "digest this range of this fd,
whole or per block", so that lives here once, for the server and the client alike.

This module is pure hashing: no SSH, no SFTP, no asyncssh. The check-file wire format (requests,
replies, SFTP status errors) is ``sshfiles.checkfile``; it calls into this module.

Everything here works on an already-opened file descriptor: the caller resolves a path or handle
through the jail first, so this module never builds a host path and can be tested on its own. Reads
use ``os.pread`` so the descriptor's offset is never moved (the same fd may be serving pipelined
READs), and ``hash_fd_range_async`` runs the blocking work in a worker thread: hashing a large file
must not stall the event loop that serves every other session.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "ALGORITHMS",
    "READ_CHUNK",
    "UnsupportedAlgorithm",
    "block_count",
    "digest_size",
    "hash_fd_range",
    "hash_fd_range_async",
    "select_algorithm",
]

#: Read size for one pread: large enough to amortise the syscall, small enough to keep memory flat.
READ_CHUNK = 1 << 20



class UnsupportedAlgorithm(ValueError):
    """None of the requested algorithms is one we implement (check-file maps it to OP_UNSUPPORTED)."""


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


#: Algorithm name (as check-file and the ``*sum`` commands spell it) -> (constructor, digest size).
#: Order is our own preference when a caller has none; the client's list always wins in check-file.
ALGORITHMS: dict[str, tuple[Callable[[], _Hasher], int]] = {
    "sha256": (_hashlib_factory("sha256"), 32),
    "sha512": (_hashlib_factory("sha512"), 64),
    "sha384": (_hashlib_factory("sha384"), 48),
    "sha224": (_hashlib_factory("sha224"), 28),
    "sha1": (_hashlib_factory("sha1"), 20),
    "md5": (_hashlib_factory("md5"), 16),
    "crc32": (_CRC32, 4),
}

def _new_hasher(algorithm: str) -> _Hasher:
    try:
        factory, _ = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"unsupported hash algorithm: {algorithm}") from None
    return factory()


def digest_size(algorithm: str) -> int:
    """Bytes in one digest of ``algorithm``; 0 for an algorithm we do not know.

    A reply decoder uses it to split concatenated digests, and 0 lets it reject what it cannot split.
    """
    entry = ALGORITHMS.get(algorithm)
    return entry[1] if entry else 0


def select_algorithm(offered: list[str]) -> str:
    """Return the first algorithm in the caller's preference list that we support.

    Names are compared case-insensitively and stripped. Raises ``UnsupportedAlgorithm`` when there
    is none (check-file turns that into OP_UNSUPPORTED, the status the draft asks for).
    """
    for name in offered:
        name = name.strip().lower()
        if name in ALGORITHMS:
            return name
    raise UnsupportedAlgorithm("No supported hash algorithm in: " + ",".join(offered))


def block_count(fd: int, offset: int, length: int, block_size: int) -> int:
    """How many digests ``hash_fd_range(fd, _, offset, length, block_size)`` would return now.

    Computed from the file's current size without reading it, so a caller can refuse a request whose
    answer would be too large before doing any hashing. ``block_size`` must be positive.
    """
    size = os.fstat(fd).st_size
    start = min(offset, size)
    stop = size if not length else min(size, offset + length)
    span = max(0, stop - start)
    return -(-span // block_size)


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
