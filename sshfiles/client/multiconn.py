"""One large file over K SSH connections at once (``sshfiles-cli put/get --connections K``).

Why: one SSH connection is one server event loop, so one stream is bounded by one core (the cipher
and framing work per packet is the cost, see README "Performance"). A server with ``--workers N``
spreads connections over its processes, so K connections moving disjoint byte ranges of one file
use up to K cores on each side.

How it stays correct:

* the file is cut into the blocks of the resume comparison (``transfer.compare_block_size`` of the
  whole file, so one check-file reply holds every block digest); each range is whole blocks;
* resume is a *whole-file* block comparison, not a prefix: K connections killed mid-way leave K
  partly written ranges with holes between them, so every block of the partial is compared (server
  digests by ``check-file-handle``, local digests by ``hashing.hash_fd_range``) and only the blocks
  that differ or lie beyond the partial are sent;
* the result is verified as a single-connection transfer is: the server's sha256 of the whole file
  against the local one.

Work is a queue of ranges that every connection pulls from, so a connection that cannot be opened
(a per-user session limit, an atomic upload mode whose name does not exist until the upload ends)
costs speed, never correctness: the primary connection alone can finish the file. Files smaller than
K blocks use one connection (``transfer.put_file``/``get_file``, unchanged).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import stat as statmod
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextlib import AsyncExitStack
from typing import Any

import asyncssh

from sshfiles.asyncssh_seam import request_write

from .connect import ConnectOptions, connect
from .errors import VerifyError, from_sftp_error, local_errors
from .progress import Progress, QuietProgress, Timer, human
from .transfer import (
    VERIFY_ALGORITHM,
    LocalFile,
    TransferOptions,
    TransferResult,
    _copy_range,
    _fit_chunk,
    _local_block_digests,
    _remote_size,
    check_file,
    compare_block_size,
    get_file,
    local_hash,
    put_file,
    remote_reader,
    upload_error,
    verify_upload,
)

#: Upper bound of ``--connections``: each one is a login, a server session and 8 MiB in flight, and
#: they arrive together: 8 stays inside the server's default per-source burst and unauthenticated
#: limits (10 each), whose refusals would count towards a ban of the client's own address.
MAX_CONNECTIONS = 8
#: ``--connections auto`` (the default): this many connections to download a file of at least
#: AUTO_MIN_SIZE bytes; one below, and one for uploads. Measured on 2 cores (README "Issue 14,
#: lever 5"): a second connection downloaded 1 GiB up to twice as fast with 1 server worker and
#: spent less client CPU per GiB, a fourth was no better than a second, and for uploads a second
#: connection was as often slower as faster. Below 128 MiB the gain (a fraction of a second) is
#: not worth the extra login (with a password: one more argon2id verification on the server).
AUTO_CONNECTIONS = 2
AUTO_MIN_SIZE = 128 * 1024 * 1024


# --------------------------------------------------------------------------- planning (pure)

def blocks_to_send(local: list[bytes], remote: list[bytes], block: int, partial: int, size: int) -> list[int]:
    """Indexes of the blocks of a ``size``-byte file that the destination still needs.

    ``local``/``remote`` are both sides' digests of the destination partial's first ``partial``
    bytes in ``block``-sized blocks. A block is in place only if its digests agree *and* it lies
    wholly inside the partial (the last, short digest of an unaligned partial covers only part of
    its block). Holes anywhere count as missing: this is not a prefix test.
    """
    nblocks = -(-size // block)
    have = {i for i, (a, b) in enumerate(zip(local, remote, strict=False))
            if a == b and min((i + 1) * block, size) <= partial}
    return [i for i in range(nblocks) if i not in have]


def split_ranges(blocks: Iterable[int], block: int, size: int, k: int) -> list[tuple[int, int]]:
    """The missing blocks as byte ranges [start, end): runs of adjacent blocks, each at most
    ceil(missing / k) blocks long, so a fresh file is exactly ``k`` ranges (one per connection) and
    a resumed one spreads its holes over the connections too."""
    todo = list(blocks)
    if not todo:
        return []
    per = -(-len(todo) // max(1, k))
    ranges: list[tuple[int, int]] = []
    first = prev = todo[0]
    for i in todo[1:]:
        if i != prev + 1 or i - first >= per:
            ranges.append((first * block, min((prev + 1) * block, size)))
            first = i
        prev = i
    ranges.append((first * block, min((prev + 1) * block, size)))
    return ranges


def bytes_in(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(end - start for start, end in ranges)


# --------------------------------------------------------------------------- the connections

class ConnectionPool:
    """The command's own connection plus up to K-1 more, opened on first need and reused for every
    file of the command (``-j`` files share them: SFTP multiplexes requests on one channel)."""

    def __init__(self, opts: ConnectOptions, primary: asyncssh.SFTPClient, connections: int,
                 progress: Progress | None = None, min_size: int = 0) -> None:
        self.opts = opts
        self.primary = primary
        self.connections = max(1, min(connections, MAX_CONNECTIONS))
        #: files under this many bytes go over the primary connection alone (``--connections auto``)
        self.min_size = min_size
        self.progress = progress or QuietProgress()
        self._extra: list[tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]] | None = None
        self._lock = asyncio.Lock()

    async def _open_one(self) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        conn = await connect(self.opts)
        try:
            return conn, await conn.start_sftp_client()
        except BaseException:
            conn.close()
            raise

    async def clients(self) -> list[asyncssh.SFTPClient]:
        """[primary, extra...]: the extra ones that could be opened (a refusal is one warning)."""
        async with self._lock:
            if self._extra is None:
                opened = await asyncio.gather(*(self._open_one() for _ in range(self.connections - 1)),
                                              return_exceptions=True)
                self._extra = [r for r in opened if isinstance(r, tuple)]
                failed = [r for r in opened if isinstance(r, BaseException)]
                for r in failed:
                    if not isinstance(r, Exception):
                        raise r  # cancellation, KeyboardInterrupt: not a refusal
                if failed:
                    why = failed[0]
                    reason = why.reason if isinstance(why, asyncssh.Error) else str(why)
                    self.progress.warn(f"opened {len(self._extra) + 1} of {self.connections} connections "
                                       f"({reason}); continuing with those")
        return [self.primary, *(sftp for _, sftp in self._extra)]

    async def close(self) -> None:
        for conn, sftp in self._extra or []:
            sftp.exit()
            conn.close()
        for conn, _ in self._extra or []:
            try:
                await conn.wait_closed()
            except Exception:  # closing never masks the command's own result
                pass
        self._extra = []


# --------------------------------------------------------------------------- running the ranges

async def _all_or_first_error(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run the connections' workers together; the first error cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [exc for t in done if (exc := t.exception()) is not None]
        if errors:
            raise errors[0]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


ReadAt = Callable[[int, int], Awaitable[bytes]]
WriteAt = Callable[[int, bytes], Awaitable[None]]


async def _pull(pieces: deque[tuple[int, int]], read_at: ReadAt, write_at: WriteAt, opts: TransferOptions,
                advance: Callable[[int], None]) -> None:
    """One connection's loop: take the next range until none is left."""
    while pieces:
        start, end = pieces.popleft()
        await _copy_range(read_at, write_at, start, end, opts, advance)


async def _open_extra(sftp: asyncssh.SFTPClient, path: str, mode: str) -> asyncssh.SFTPClientFile | None:
    """A further connection's handle on the file, or None when that connection cannot open it."""
    try:
        return await sftp.open(path, mode)
    except asyncssh.SFTPError:
        return None


def _make_advance(result: TransferResult, task: Any) -> Callable[[int], None]:
    def advance(n: int) -> None:
        result.sent += n
        task.advance(n)
    return advance


async def _plan(sftp: asyncssh.SFTPClient, handle: bytes, local: str, partial: int, size: int,
                block: int) -> list[int]:
    """The blocks still to move, from both sides' digests of the destination partial."""
    if not partial:
        return list(range(-(-size // block)))
    local_task = asyncio.create_task(asyncio.to_thread(_local_block_digests, local, partial, block))
    try:
        _, remote = await check_file(sftp, handle, by_handle=True, algorithms=VERIFY_ALGORITHM,
                                     offset=0, length=partial, block_size=block)
    except asyncssh.SFTPOpUnsupported:
        remote = []  # nothing provable: send every block
    local_digests = await local_task
    return blocks_to_send(local_digests, remote, block, partial, size)


async def _pieces(sftp: asyncssh.SFTPClient, handle: bytes, local: str, partial: int | None, block: int,
                  k: int, result: TransferResult) -> deque[tuple[int, int]]:
    """The ranges still to move (planned from the destination's ``partial`` bytes), recorded in
    ``result`` as what is already in place."""
    size = result.size
    todo = await _plan(sftp, handle, local, partial or 0, size, block)
    pieces = deque(split_ranges(todo, block, size, k))
    result.resumed_from = size - bytes_in(pieces)
    return pieces


def _ranged_size(path_size: int | None, pool: ConnectionPool) -> int | None:
    """The block size to use, or None when the file is too small for the pool's connections."""
    k = pool.connections
    if path_size is None or k <= 1 or path_size < pool.min_size:
        return None
    block = compare_block_size(path_size)
    return block if path_size >= k * block else None


async def _same_file(f: asyncssh.SFTPClientFile, existing: int) -> bool:
    """Whether a further connection's handle reached the file the primary just truncated.

    In the atomic upload modes a truncating open writes a hidden temporary while the name keeps
    the old file until the upload ends; a further ``r+b`` open of the name then gets the *old* file.
    Only the truncation tells them apart: the primary's file is empty, the old one is not (an old
    empty file cannot be told from it: then the primary goes alone)."""
    if not existing:
        return False
    try:
        return (await f.stat()).size == 0
    except asyncssh.SFTPError:
        return False


async def _close_quietly(f: asyncssh.SFTPClientFile) -> asyncssh.SFTPError | None:
    try:
        await f.close()
    except asyncssh.SFTPError as exc:
        return exc
    return None


async def put_file_ranged(pool: ConnectionPool, sftp: asyncssh.SFTPClient, local: str, remote: str,
                          opts: TransferOptions, progress: Progress | None = None) -> TransferResult:
    """``transfer.put_file`` over the pool's connections, for a file of at least K blocks.

    The primary connection opens (and creates or truncates) the file first; the others open it
    without truncating and are used only if they reach that same file (see ``_same_file``; in the
    atomic modes a fresh upload's temporary has no name yet, so they cannot open it at all). The
    primary's handle is closed first, so in atomic-resume it is the one that publishes the partial;
    a further handle's close error after that is judged by the whole-file sha256, which runs then
    even with ``--no-verify``.
    """
    try:
        st = os.stat(local)
        size: int | None = st.st_size if statmod.S_ISREG(st.st_mode) else None
    except OSError:
        size = None  # put_file reports it, one line
    block = _ranged_size(size, pool)
    if size is None or block is None:
        return await put_file(sftp, local, remote, opts, progress)
    progress = progress or QuietProgress()
    timer = Timer()
    result = TransferResult("put", local, remote, size)
    with local_errors(local):
        fd = os.open(local, os.O_RDONLY)
    local_file = LocalFile(fd, local)
    # hashed while the bytes move; with --no-verify only if a further handle's close failed (below)
    local_sum = asyncio.create_task(local_hash(local)) if opts.verify else None
    try:
        clients = await pool.clients()
        existing = await _remote_size(sftp, remote)
        resume = bool(opts.resume and existing and existing <= size)
        first = await sftp.open(remote, "r+b" if resume else "wb")
        extras: list[tuple[asyncssh.SFTPClient, asyncssh.SFTPClientFile]] = []
        close_errors: list[asyncssh.SFTPError] = []
        failed = True
        try:
            pieces = await _pieces(sftp, first.handle, local, existing if resume else 0, block, len(clients),
                                   result)
            if opts.resume and existing and not result.resumed_from:  # (a larger file: also a restart)
                result.restarted = True
                progress.warn(f"{remote}: remote partial ({human(existing)}) does not match {local}; "
                              f"restarting from zero")
            for c in clients[1:]:
                f = await _open_extra(c, remote, "r+b")
                if f is not None and (existing is None or resume or await _same_file(f, existing)):
                    extras.append((c, f))
                elif f is not None:
                    await _close_quietly(f)
            result.connections = 1 + len(extras)
            fitted = _fit_chunk(opts, sftp.limits.max_write_len)
            task = progress.start_file(posixpath.basename(remote) or remote, size, result.resumed_from)
            advance = _make_advance(result, task)

            def writer(c: asyncssh.SFTPClient, h: bytes) -> WriteAt:
                async def write_at(off: int, data: bytes) -> None:
                    await request_write(c, h, off, data)
                return write_at

            try:
                await _all_or_first_error([_pull(pieces, local_file.read_at, writer(c, f.handle), fitted, advance)
                                           for c, f in [(sftp, first), *extras]])
            finally:
                task.close()
            failed = False
        finally:
            primary_error = await _close_quietly(first)
            for _, f in extras:
                if (cerr := await _close_quietly(f)) is not None:
                    close_errors.append(cerr)
            if primary_error is not None and not failed:
                raise primary_error
        result.seconds = timer.elapsed()
        if opts.verify or close_errors:
            try:
                await verify_upload(sftp, remote, local_sum or local_hash(local))
            except VerifyError:
                if close_errors:  # an extra connection's failed close explains the difference
                    raise close_errors[0] from None
                raise
            result.verified = True if opts.verify else None
        return result
    except asyncssh.SFTPError as exc:
        raise await upload_error(sftp, remote, exc) from None
    finally:
        if local_sum is not None and not local_sum.done():
            local_sum.cancel()
        local_file.close()
        os.close(fd)


async def get_file_ranged(pool: ConnectionPool, sftp: asyncssh.SFTPClient, remote: str, local: str,
                          opts: TransferOptions, progress: Progress | None = None) -> TransferResult:
    """``transfer.get_file`` over the pool's connections, for a file of at least K blocks."""
    try:
        attrs = await sftp.stat(remote)
        size: int | None = attrs.size if attrs.type == asyncssh.FILEXFER_TYPE_REGULAR else None
    except asyncssh.SFTPError:
        size = None  # get_file reports it, one line
    block = _ranged_size(size, pool)
    if size is None or block is None:
        return await get_file(sftp, remote, local, opts, progress)
    progress = progress or QuietProgress()
    timer = Timer()
    result = TransferResult("get", remote, local, size)
    try:
        clients = await pool.clients()
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(await sftp.open(remote, "rb"))
            with local_errors(local):
                fd = os.open(local, os.O_RDWR | os.O_CREAT, 0o644)
            stack.callback(os.close, fd)
            local_file = LocalFile(fd, local)
            stack.callback(local_file.close)  # (callbacks run last-in first-out: before the close of fd)
            existing = os.fstat(fd).st_size
            resume = bool(opts.resume and existing and existing <= size)
            if not resume:
                with local_errors(local):
                    os.ftruncate(fd, 0)
            pieces = await _pieces(sftp, first.handle, local, existing if resume else 0, block, len(clients),
                                   result)
            if opts.resume and existing and not result.resumed_from:
                result.restarted = True
                progress.warn(f"{local}: local partial ({human(existing)}) does not match {remote}; "
                              f"restarting from zero")
            handles = [first.handle]
            for c in clients[1:]:
                f = await _open_extra(c, remote, "rb")
                if f is not None:
                    await stack.enter_async_context(f)
                handles.append(f.handle if f is not None else b"")
            used = [(c, h) for c, h in zip(clients, handles, strict=True) if h]
            result.connections = len(used)
            fitted = _fit_chunk(opts, sftp.limits.max_read_len)
            task = progress.start_file(os.path.basename(local) or local, size, result.resumed_from)
            advance = _make_advance(result, task)

            try:
                await _all_or_first_error([_pull(pieces, remote_reader(c, h), local_file.write_at, fitted, advance)
                                           for c, h in used])
                with local_errors(local):
                    os.ftruncate(fd, size)
            finally:
                task.close()
            result.seconds = timer.elapsed()
            if opts.verify:
                _, digests = await check_file(sftp, first.handle, by_handle=True)
                theirs = digests[0].hex()
                ours = await local_hash(local)
                if theirs != ours:
                    raise VerifyError(f"{local}: verification failed: local sha256 {ours} != server {theirs}")
                result.verified = True
        return result
    except asyncssh.SFTPError as exc:
        raise from_sftp_error(exc, remote) from None
