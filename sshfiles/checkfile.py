"""The SFTP ``check-file`` extension: its wire codec, shared by the server handler and the client.

Why one module for both sides: the server (``sftp.SshfilesSFTPHandler``) parses requests and encodes
replies, the client (``client/transfer.py``) encodes requests and decodes replies, and the two must
agree byte for byte. With one codec a change to the format is made once and the round trip is
unit-tested without a server. The hashing itself is ``sshfiles.hashing`` (no SSH in it); this module
adds the wire format and the protocol's rules (block-size floor, reply-size cap, SFTP status errors).

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

The functions here handle the part after the extension name (requests) and after the request id
(replies): asyncssh frames the rest on both sides. Servers advertise support with the extension pair
``CHECK_FILE_EXTENSION`` in their VERSION packet; WinSCP looks for exactly that name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import asyncssh

from .asyncssh_seam import SSHPacket, String, UInt32, UInt64
from .hashing import (
    ALGORITHMS,
    HashBusy,
    HashCancelled,
    HashTooLarge,
    UnsupportedAlgorithm,
    block_count,
    digest_size,
    hash_fd_range_async,
    select_algorithm,
)

__all__ = [
    "CHECK_FILE_EXTENSION",
    "CHECK_FILE_HANDLE",
    "CHECK_FILE_NAME",
    "MAX_REPLY_DIGEST_BYTES",
    "MIN_BLOCK_SIZE",
    "CheckFileRequest",
    "MalformedReply",
    "answer_check_file",
    "decode_reply",
    "encode_reply",
    "encode_request",
    "parse_check_file",
]

#: Extension names of the two request forms.
CHECK_FILE_HANDLE = b"check-file-handle"
CHECK_FILE_NAME = b"check-file-name"

#: The draft forbids tiny blocks (a client could otherwise ask for one digest per byte).
MIN_BLOCK_SIZE = 256

#: Upper bound on the digests in one reply. SFTP packets are limited (OpenSSH: 256 KiB), so a
#: request that would produce more must be split into ranges by the client.
MAX_REPLY_DIGEST_BYTES = 192 * 1024

#: The extension pair to add to the SFTP server's VERSION extensions so clients (WinSCP) know.
CHECK_FILE_EXTENSION: tuple[bytes, bytes] = (b"check-file", ",".join(ALGORITHMS).encode("ascii"))


class MalformedReply(ValueError):
    """A check-file reply whose digests cannot be split by the algorithm it names."""


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


def encode_request(target: bytes, algorithms: str | Sequence[str], offset: int = 0, length: int = 0,
                   block_size: int = 0) -> bytes:
    """The request body after the extension name: what a client sends for a check-file request.

    ``algorithms`` is the comma-separated preference list as sent, or a sequence of names to join.
    """
    algs = algorithms if isinstance(algorithms, str) else ",".join(algorithms)
    return String(target) + String(algs) + UInt64(offset) + UInt64(length) + UInt32(block_size)


def parse_check_file(packet: SSHPacket, by_handle: bool) -> CheckFileRequest:
    """Parse the body of a check-file request, positioned just after the extension name.

    asyncssh's server handler has already read the request id and the extension name when it calls
    an extended handler, so ``packet`` starts at the handle/filename string. A malformed packet raises
    ``PacketDecodeError`` (re-exported by ``asyncssh_seam``; asyncssh answers it with SSH_FX_BAD_MESSAGE).
    """
    target = packet.get_string()
    alg_list = packet.get_string().decode("ascii", errors="replace")
    offset = packet.get_uint64()
    length = packet.get_uint64()
    block_size = packet.get_uint32()
    packet.check_end()
    algorithms = [a.strip() for a in alg_list.split(",") if a.strip()]
    return CheckFileRequest(target, by_handle, algorithms, offset, length, block_size)


def encode_reply(algorithm: str, digests: Sequence[bytes]) -> bytes:
    """The EXTENDED_REPLY body: ``string algorithm-used`` then the concatenated digests."""
    return String(algorithm) + b"".join(digests)


def decode_reply(body: bytes) -> tuple[str, list[bytes]]:
    """Split an EXTENDED_REPLY body into (algorithm used, digests).

    Raises ``MalformedReply`` when the algorithm is unknown to us or the digest bytes are not a whole
    number of its digests (we could not tell where one block's digest ends). A truncated algorithm
    string raises ``PacketDecodeError`` (see ``asyncssh_seam``), as asyncssh's own decoders do.
    """
    packet = SSHPacket(body)
    alg = packet.get_string().decode("ascii")
    blob = packet.get_remaining_payload()
    size = digest_size(alg)
    if not size or len(blob) % size:
        raise MalformedReply(f"server sent a malformed check-file reply ({alg}, {len(blob)} bytes)")
    return alg, [blob[i:i + size] for i in range(0, len(blob), size)]


async def answer_check_file(fd: int, req: CheckFileRequest, *, owner: str = "",
                            closed: Awaitable[object] | None = None) -> bytes:
    """Hash the requested range of ``fd`` and return the EXTENDED_REPLY body (see ``encode_reply``).

    Wrap it in ``sshfiles.sftp.ExtendedReply`` to return it from an asyncssh extended-request handler.
    Errors are SFTP errors so asyncssh turns them into the right status: no common algorithm ->
    OP_UNSUPPORTED, a block size under 256 -> INVALID_PARAMETER, a reply too big for one packet or a
    range over ``hashing.MAX_HASH_BYTES`` (holes count) -> FAILURE (ask for a shorter range), too many
    hash requests of this user waiting -> FAILURE.

    ``owner`` (the user name) picks the fairness queue and ``closed`` (the channel's
    ``wait_closed()``) stops the hash when the client leaves (the SFTP adapter passes both; without
    them a request shares the anonymous fairness queue and is stopped only by cancellation). The
    coroutine returns or
    raises only once the hashing thread has stopped, so the caller may close ``fd`` afterwards.
    """
    try:
        algorithm = select_algorithm(req.algorithms)
    except UnsupportedAlgorithm as exc:
        raise asyncssh.SFTPOpUnsupported(str(exc)) from None
    if req.block_size:
        if req.block_size < MIN_BLOCK_SIZE:
            raise asyncssh.SFTPInvalidParameter(
                f"check-file block size must be 0 or at least {MIN_BLOCK_SIZE}")
        blocks = await asyncio.to_thread(block_count, fd, req.offset, req.length, req.block_size)
        if blocks * digest_size(algorithm) > MAX_REPLY_DIGEST_BYTES:
            raise asyncssh.SFTPFailure(
                f"check-file would return {blocks} digests; use a larger block size or a shorter range")
    watch = asyncio.ensure_future(closed) if closed is not None else None
    try:
        digests = await hash_fd_range_async(fd, algorithm, req.offset, req.length, req.block_size,
                                            owner=owner or "", closed=watch)
    except HashTooLarge as exc:
        raise asyncssh.SFTPFailure(f"check-file: {exc}; ask for a shorter range") from None
    except HashBusy as exc:
        raise asyncssh.SFTPFailure(f"check-file: {exc}") from None
    except HashCancelled:
        raise asyncssh.SFTPFailure("check-file: cancelled") from None
    finally:
        if watch is not None:
            watch.cancel()
    return encode_reply(algorithm, digests)
