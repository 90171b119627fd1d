"""The transfer engine: pipelined put/get with verified automatic resume and end-to-end sha256.

Why it decides resume by hashing instead of trusting sizes: a partial file's size says nothing about
its content (it may be another file, or tampered), and a killed transfer that pipelined its writes
can leave holes just below its size. So before resuming we ask the server for per-block digests of
the remote partial (``check-file-handle`` with a block size), hash the same blocks locally, and
resume from the first block that differs:

* every block equal            -> send only the bytes after the partial;
* first difference near the end (within what was in flight when the transfer died)
                                -> resume from that block: holes from pipelined writes;
* first difference further back -> the prefix is not ours: warn and restart from zero.

After every transfer both sides' sha256 are compared (the server's from ``check-file``); a mismatch is
an error (exit 7). All functions here are library calls the CLI and the tests use directly.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import stat as statmod
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import asyncssh

from sshfiles import checkfile
from sshfiles.asyncssh_seam import extended_request, request_read, request_write
from sshfiles.fileio import pwrite_all
from sshfiles.hashing import hash_fd_range

from .errors import EXIT_NOT_FOUND, EXIT_QUOTA, ClientError, VerifyError, from_sftp_error, local_errors
from .progress import Progress, QuietProgress, Timer, human

#: Bytes per WRITE/READ request and requests in flight per file: 256 KiB x 32 = 8 MiB in flight,
#: enough to fill a fast link; asyncssh's own defaults (16 KiB x 128) are tuned for compatibility.
CHUNK_SIZE = 256 * 1024
MAX_REQUESTS = 32
#: New requests go out once this fraction of MAX_REQUESTS has been answered (see ``_copy_range``).
REFILL_FRACTION = 4
#: Resume comparison: at most this many block digests per check-file request.
MAX_BLOCKS_PER_REQUEST = 4096
MIN_COMPARE_BLOCK = 256 * 1024
VERIFY_ALGORITHM = "sha256"


@dataclass
class TransferOptions:
    """Knobs the CLI exposes (--resume/--no-resume, --no-verify) plus the pipelining tuning."""

    resume: bool = True
    verify: bool = True
    chunk_size: int = CHUNK_SIZE
    max_requests: int = MAX_REQUESTS


@dataclass
class TransferResult:
    """What happened to one file; the CLI turns it into the summary line."""

    direction: str          # "put" or "get"
    source: str
    dest: str
    size: int
    resumed_from: int = 0
    sent: int = 0
    restarted: bool = False
    verified: bool | None = None
    seconds: float = 0.0
    connections: int = 1   # SSH connections that moved the bytes (multiconn.py)

    def summary(self) -> str:
        rate = human(self.sent / self.seconds) + "/s" if self.seconds else "-"
        moved = "sent" if self.direction == "put" else "received"
        parts = [f"{self.direction} {self.source} -> {self.dest}: {human(self.size)}",
                 f"{moved} {human(self.sent)} in {self.seconds:.1f}s ({rate})"]
        if self.connections > 1:
            parts.append(f"over {self.connections} connections")
        if self.resumed_from and self.connections > 1:  # ranges with holes: no single resume offset
            parts.append(f"resumed, {human(self.resumed_from)} already in place")
        elif self.resumed_from:
            parts.append(f"resumed at {human(self.resumed_from)}")
        if self.restarted:
            parts.append("restarted (partial did not match)")
        if self.verified:
            parts.append("sha256 verified")
        elif self.verified is None:
            parts.append("not verified")
        return ", ".join(parts)


# --------------------------------------------------------------------------- check-file (client side)

async def check_file(sftp: asyncssh.SFTPClient, target: bytes, *, by_handle: bool,
                     algorithms: str = VERIFY_ALGORITHM, offset: int = 0, length: int = 0,
                     block_size: int = 0) -> tuple[str, list[bytes]]:
    """Send check-file-handle/-name and return (algorithm used, digests).

    The wire format is ``sshfiles.checkfile`` (the server's own codec); asyncssh has no public call
    for a raw extended request, so it goes through ``asyncssh_seam.extended_request``.
    """
    name = checkfile.CHECK_FILE_HANDLE if by_handle else checkfile.CHECK_FILE_NAME
    body = await extended_request(sftp, name, checkfile.encode_request(target, algorithms, offset, length,
                                                                       block_size))
    try:
        return checkfile.decode_reply(body)
    except checkfile.MalformedReply as exc:
        raise ClientError(str(exc)) from None


async def remote_hash(sftp: asyncssh.SFTPClient, path: str, algorithm: str = VERIFY_ALGORITHM) -> str:
    """Hex digest of a whole remote file, computed by the server.

    By handle; where the file may not be opened for reading (an upload into a drop box), by name: the
    server hashes the files a connection uploaded itself even where it may not download."""
    try:
        try:
            async with sftp.open(path, "rb") as f:
                alg, digests = await check_file(sftp, f.handle, by_handle=True, algorithms=algorithm)
        except asyncssh.SFTPPermissionDenied:
            alg, digests = await check_file(sftp, path.encode("utf-8", "surrogateescape"), by_handle=False,
                                            algorithms=algorithm)
    except asyncssh.SFTPError as exc:
        raise from_sftp_error(exc, path) from None
    if alg != algorithm:
        raise ClientError(f"{path}: server does not offer {algorithm}")
    return digests[0].hex()


async def verify_upload(sftp: asyncssh.SFTPClient, remote: str, ours: Awaitable[str]) -> None:
    """The server's sha256 of an uploaded file against the local one (`ours`, often a hash already
    running beside the transfer); VerifyError if they differ. One place for both upload paths
    (one connection here, several in multiconn.py)."""
    theirs = await remote_hash(sftp, remote)
    mine = await ours
    if theirs != mine:
        raise VerifyError(f"{remote}: verification failed: server sha256 {theirs} != local {mine}")


async def local_hash(path: str, algorithm: str = VERIFY_ALGORITHM) -> str:
    def run() -> str:
        fd = os.open(path, os.O_RDONLY)
        try:
            return hash_fd_range(fd, algorithm)[0].hex()
        finally:
            os.close(fd)

    return await asyncio.to_thread(run)


# --------------------------------------------------------------------------- resume decision

def compare_block_size(size: int) -> int:
    """Block size for comparing a partial of ``size`` bytes in one check-file reply."""
    block = max(MIN_COMPARE_BLOCK, -(-size // MAX_BLOCKS_PER_REQUEST))
    return -(-block // 65536) * 65536


def resume_point(local: list[bytes], remote: list[bytes], block: int, partial: int,
                 in_flight: int) -> tuple[int, bool]:
    """Where to restart, from the per-block digests of the first ``partial`` bytes on both sides.

    Returns (offset, restarted). ``in_flight`` is how many bytes a killed transfer can have had
    outstanding: differences within that distance of the partial's end are holes left by pipelined
    writes, so we resume at the first differing block; an earlier difference means the partial is
    not a prefix of our file, so we restart at 0.
    """
    for i, (a, b) in enumerate(zip(local, remote, strict=False)):  # unequal lengths: checked below
        if a != b:
            start = i * block
            if start and partial - start <= in_flight + block:
                return start, False
            return 0, True  # nothing of the partial is usable: say so, it is a restart
    if len(local) != len(remote):
        return 0, True
    return partial, False


def _local_block_digests(path: str, length: int, block: int) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_fd_range(fd, VERIFY_ALGORITHM, 0, length, block)
    finally:
        os.close(fd)


async def _decide_resume(sftp: asyncssh.SFTPClient, remote_handle: bytes, local_path: str,
                         partial: int, opts: TransferOptions) -> tuple[int, bool]:
    block = compare_block_size(partial)
    local_task = asyncio.create_task(asyncio.to_thread(_local_block_digests, local_path, partial, block))
    try:
        _, remote = await check_file(sftp, remote_handle, by_handle=True, algorithms=VERIFY_ALGORITHM,
                                     offset=0, length=partial, block_size=block)
    except asyncssh.SFTPOpUnsupported:
        await local_task
        return 0, True  # cannot prove the prefix: restart rather than risk a corrupt file
    local = await local_task
    return resume_point(local, remote, block, partial, opts.chunk_size * opts.max_requests)


# --------------------------------------------------------------------------- pipelined copy

ReadAt = Callable[[int, int], Awaitable[bytes]]
WriteAt = Callable[[int, bytes], Awaitable[None]]


async def _copy_range(read_at: ReadAt, write_at: WriteAt, start: int, end: int,
                      opts: TransferOptions, on_bytes: Callable[[int], None]) -> None:
    """Copy [start, end) with up to ``max_requests`` chunks in flight; fail fast on the first error."""

    async def one(off: int, n: int) -> None:
        data = await read_at(off, n)
        if len(data) != n:
            raise ClientError("source file changed size during the transfer")
        await write_at(off, data)
        on_bytes(n)

    pending: set[asyncio.Future] = set()
    off = start
    # Requests are topped up in batches, not one per reply: the batch leaves in one socket write
    # (the seam's coalesced sends), where one write per request cost the client and the server a
    # system call and a wake-up each; at least 3/4 of the requests stay in flight meanwhile.
    batch = max(1, opts.max_requests // REFILL_FRACTION)
    try:
        while off < end or pending:
            if opts.max_requests - len(pending) >= batch:
                while off < end and len(pending) < opts.max_requests:
                    n = min(opts.chunk_size, end - off)
                    pending.add(asyncio.ensure_future(one(off, n)))
                    off += n
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            errors = [exc for t in done if (exc := t.exception()) is not None]  # retrieve them all
            if errors:
                raise errors[0]
    finally:
        # On an error, and also when the caller cancels this copy (``--connections K``: another
        # connection failed), no request may outlive it: each is cancelled and its outcome
        # retrieved, so none writes after the copy ended or dies as "exception never retrieved".
        for p in pending:
            p.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


# --------------------------------------------------------------------------- put / get of one file

def remote_reader(sftp: asyncssh.SFTPClient, handle: bytes) -> ReadAt:
    """``read_at`` for a remote file: one READ per chunk, repeated if the server returns less
    (a short read is not EOF), fewer bytes only at EOF (``_copy_range`` calls that a size change)."""
    async def read_at(off: int, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            try:
                data = await request_read(sftp, handle, off, n)
            except asyncssh.SFTPEOFError:
                break
            parts.append(data)
            off += len(data)
            n -= len(data)
        return b"".join(parts)
    return read_at


class LocalFile:
    """``read_at``/``write_at`` for a local file, off the event loop: one thread per file does the
    ``pread``s and ``pwrite``s in the order they are asked for.

    Why: a download's ``pwrite`` into the page cache (0.3 s of kernel time per GiB in the pieces
    of ``fileio.pwrite_all``, several times that when the kernel throttles dirty pages) and an
    upload's ``pread`` ran on the event loop, which then neither read the socket nor encrypted or
    decrypted packets meanwhile; py-spy put a quarter of a 1 GiB download's client time and an
    eighth of an upload's there. In a thread (both calls release the GIL) they overlap with the
    loop's work. ``close`` waits for the calls still queued, so the descriptor is never closed under a pending one."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sshfiles-file")

    async def read_at(self, off: int, n: int) -> bytes:
        with local_errors(self._path):
            return await asyncio.get_running_loop().run_in_executor(self._pool, os.pread, self._fd, n, off)

    async def write_at(self, off: int, data: bytes) -> None:
        with local_errors(self._path):
            await asyncio.get_running_loop().run_in_executor(self._pool, pwrite_all, self._fd, data, off)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _fit_chunk(opts: TransferOptions, server_max: int) -> TransferOptions:
    """Chunks no larger than the server accepts in one request (limits@openssh.com)."""
    if server_max and opts.chunk_size > server_max:
        return TransferOptions(opts.resume, opts.verify, server_max, opts.max_requests)
    return opts


async def _remote_size(sftp: asyncssh.SFTPClient, path: str) -> int | None:
    """The remote file's size, or None if it is absent or the server will not say (a drop box that
    may not be listed answers PERMISSION_DENIED for every name: upload from zero, and the open tells
    whether the name is taken)."""
    try:
        attrs = await sftp.stat(path)
    except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied):
        return None
    if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
        raise ClientError(f"{path}: is a directory")
    return attrs.size or 0


async def put_file(sftp: asyncssh.SFTPClient, local: str, remote: str, opts: TransferOptions,
                   progress: Progress | None = None) -> TransferResult:
    """Upload one file, resuming a matching remote partial and verifying the result."""
    progress = progress or QuietProgress()
    timer = Timer()
    with local_errors(local):
        fd = os.open(local, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if statmod.S_ISDIR(os.fstat(fd).st_mode):
            raise ClientError(f"{local}: is a directory (use -r)")
        result = TransferResult("put", local, remote, size)
        local_sum = asyncio.create_task(local_hash(local)) if opts.verify else None
        try:
            existing = await _remote_size(sftp, remote)
            start = 0
            if opts.resume and existing:
                if existing > size:
                    result.restarted = True
                else:
                    async with sftp.open(remote, "rb") as rf:
                        start, result.restarted = await _decide_resume(sftp, rf.handle, local,
                                                                       existing, opts)
                if result.restarted:
                    progress.warn(f"{remote}: remote partial ({human(existing)}) does not match "
                                  f"{local}; restarting from zero")
            result.resumed_from = start
            task = progress.start_file(posixpath.basename(remote) or remote, size, start)
            # One WRITE request per chunk (not SFTPClientFile.write, which fans out into tasks of
            # its own that asyncssh leaves unretrieved when a quota error cancels the copy).
            opts = _fit_chunk(opts, sftp.limits.max_write_len)
            local_file = LocalFile(fd, local)
            try:
                async with sftp.open(remote, "r+b" if start else "wb") as rf:
                    async def write_at(off: int, data: bytes) -> None:
                        await request_write(sftp, rf.handle, off, data)

                    def advance(n: int) -> None:
                        result.sent += n
                        task.advance(n)

                    await _copy_range(local_file.read_at, write_at, start, size, opts, advance)
            finally:
                local_file.close()
                task.close()
            result.seconds = timer.elapsed()
            if local_sum is not None:
                await verify_upload(sftp, remote, local_sum)
                result.verified = True
            return result
        except asyncssh.SFTPError as exc:
            raise await upload_error(sftp, remote, exc) from None
        finally:
            if local_sum is not None and not local_sum.done():
                local_sum.cancel()
    finally:
        os.close(fd)


async def upload_error(sftp: asyncssh.SFTPClient, remote: str, exc: asyncssh.SFTPError) -> ClientError:
    """An upload's SFTP error as its one line; a quota refusal names the partial it leaves."""
    err = from_sftp_error(exc, remote)
    if err.exit_code == EXIT_QUOTA:
        err = await _with_partial_note(sftp, remote, err)
    return err


async def _with_partial_note(sftp: asyncssh.SFTPClient, remote: str, err: ClientError) -> ClientError:
    """A refused upload keeps what was written (so the same ``put`` resumes once there is room) and
    that partial counts against the quota: say so, with its size, rather than leave it unnoticed."""
    try:
        partial = (await sftp.stat(remote)).size or 0
    except (asyncssh.SFTPError, OSError, asyncssh.Error):
        return err
    if not partial:
        return err
    return ClientError(f"{err.message}; the partial file ({human(partial)}) stays on the server and counts "
                       f"against the quota: run the same put to resume once there is room, or remove it",
                       err.exit_code)


async def get_file(sftp: asyncssh.SFTPClient, remote: str, local: str, opts: TransferOptions,
                   progress: Progress | None = None) -> TransferResult:
    """Download one file, resuming a matching local partial and verifying the result."""
    progress = progress or QuietProgress()
    timer = Timer()
    try:
        async with sftp.open(remote, "rb") as rf:
            attrs = await rf.stat()
            if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                raise ClientError(f"{remote}: is a directory (use -r)")
            size = attrs.size or 0
            result = TransferResult("get", remote, local, size)
            with local_errors(local):
                fd = os.open(local, os.O_RDWR | os.O_CREAT, 0o644)
            local_file = LocalFile(fd, local)
            try:
                existing = os.fstat(fd).st_size
                start = 0
                if opts.resume and existing:
                    if existing > size:
                        result.restarted = True
                    else:
                        start, result.restarted = await _decide_resume(sftp, rf.handle, local,
                                                                       existing, opts)
                    if result.restarted:
                        progress.warn(f"{local}: local partial ({human(existing)}) does not match "
                                      f"{remote}; restarting from zero")
                if start == 0:
                    with local_errors(local):
                        os.ftruncate(fd, 0)
                result.resumed_from = start
                task = progress.start_file(os.path.basename(local) or local, size, start)
                try:
                    # One READ request per chunk, see put_file.
                    opts = _fit_chunk(opts, sftp.limits.max_read_len)

                    read_at = remote_reader(sftp, rf.handle)

                    def advance(n: int) -> None:
                        result.sent += n
                        task.advance(n)

                    await _copy_range(read_at, local_file.write_at, start, size, opts, advance)
                    with local_errors(local):
                        os.ftruncate(fd, size)
                finally:
                    task.close()
            finally:
                local_file.close()
                os.close(fd)
            result.seconds = timer.elapsed()
            if opts.verify:
                _, digests = await check_file(sftp, rf.handle, by_handle=True)
                theirs = digests[0].hex()
                ours = await local_hash(local)
                if theirs != ours:
                    raise VerifyError(f"{local}: verification failed: local sha256 {ours} "
                                      f"!= server {theirs}")
                result.verified = True
            return result
    except asyncssh.SFTPError as exc:
        raise from_sftp_error(exc, remote) from None


# --------------------------------------------------------------------------- trees and many files

@dataclass
class Job:
    """One file to move: put (local -> remote) or get (remote -> local)."""

    source: str
    dest: str
    size: int


async def _remote_kind(sftp: asyncssh.SFTPClient, path: str) -> int | None:
    """The remote path's SFTP file type, or None when it does not exist."""
    try:
        return (await sftp.stat(path)).type
    except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied):
        return None  # (a name the server will not stat, in a drop box: nothing we could put into)
    except asyncssh.SFTPError as exc:
        raise from_sftp_error(exc, path) from None


def _not_a_dir(dest: str, exists: bool, several: bool) -> ClientError:
    """The error when a destination must be a directory and is not (OpenSSH's wording, exit 5)."""
    if exists:
        return ClientError(f"{dest}: Not a directory", EXIT_NOT_FOUND)
    why = "several sources need a directory" if several else "a trailing / names a directory"
    return ClientError(f"{dest}: No such file or directory ({why}; --mkdir creates it)", EXIT_NOT_FOUND)


async def plan_put(sftp: asyncssh.SFTPClient, sources: list[str], dest: str,
                   recursive: bool, mkdir: bool = False) -> list[Job]:
    """Expand local sources into per-file jobs, creating remote directories for trees.

    Like cp/scp: with several sources, or when ``dest`` is an existing directory, each source lands
    inside ``dest`` under its own name; otherwise ``dest`` is the new name of the single source. A
    ``dest`` ending in ``/`` must be a directory, as for OpenSSH's sftp and scp: if it does not exist
    that is an error (exit 5), not a file named like it, unless ``mkdir`` asks to create it.
    """
    kind = await _remote_kind(sftp, dest.rstrip("/") or "/")  # "file/" is ENOTDIR: ask about "file"
    must_be_dir = len(sources) > 1 or dest.endswith("/")
    if must_be_dir and kind != asyncssh.FILEXFER_TYPE_DIRECTORY:
        if not mkdir or kind is not None:
            raise _not_a_dir(dest, kind is not None, len(sources) > 1)
        try:
            await sftp.makedirs(dest, exist_ok=True)
        except asyncssh.SFTPError as exc:
            raise from_sftp_error(exc, dest) from None
        kind = asyncssh.FILEXFER_TYPE_DIRECTORY
    into_dir = kind == asyncssh.FILEXFER_TYPE_DIRECTORY
    jobs: list[Job] = []
    for src in sources:
        name = os.path.basename(os.path.normpath(src))
        target = posixpath.normpath(posixpath.join(dest, name) if into_dir else dest)
        if os.path.isdir(src):
            if not recursive:
                raise ClientError(f"{src}: is a directory (use -r)")
            for root, dirs, files in os.walk(src):
                dirs.sort()
                rel = os.path.relpath(root, src)
                rdir = target if rel == "." else posixpath.join(target, *rel.split(os.sep))
                try:
                    await sftp.makedirs(rdir, exist_ok=True)
                except asyncssh.SFTPError as exc:
                    raise from_sftp_error(exc, rdir) from None
                for f in sorted(files):
                    p = os.path.join(root, f)
                    jobs.append(Job(p, posixpath.join(rdir, f), os.path.getsize(p)))
        elif os.path.exists(src):
            jobs.append(Job(src, target, os.path.getsize(src)))
        else:
            raise ClientError(f"{src}: No such file or directory", 5)
    return jobs


async def plan_get(sftp: asyncssh.SFTPClient, sources: list[str], dest: str,
                   recursive: bool, mkdir: bool = False) -> list[Job]:
    """Expand remote sources into per-file jobs, creating local directories for trees.

    The same rule as ``plan_put`` for the local ``dest``: with several sources or a trailing ``/``
    it must be a directory, created only with ``mkdir``.
    """
    must_be_dir = len(sources) > 1 or dest.endswith(("/", os.sep))
    if must_be_dir and not os.path.isdir(dest):
        if not mkdir or os.path.lexists(dest):
            raise _not_a_dir(dest, os.path.lexists(dest), len(sources) > 1)
        with local_errors(dest):
            os.makedirs(dest, exist_ok=True)
    into_dir = os.path.isdir(dest)
    jobs: list[Job] = []

    async def walk(rpath: str, lpath: str) -> None:
        os.makedirs(lpath, exist_ok=True)
        for entry in sorted(await sftp.readdir(rpath), key=lambda e: e.filename):
            name = cast(str, entry.filename)  # readdir of a str path yields str names
            if name in (".", ".."):
                continue
            child = posixpath.join(rpath, name)
            if entry.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                await walk(child, os.path.join(lpath, name))
            elif entry.attrs.type == asyncssh.FILEXFER_TYPE_REGULAR:
                jobs.append(Job(child, os.path.join(lpath, name), entry.attrs.size or 0))

    for src in sources:
        try:
            attrs = await sftp.stat(src)
        except asyncssh.SFTPError as exc:
            raise from_sftp_error(exc, src) from None
        name = posixpath.basename(posixpath.normpath(src)) or "root"
        target = os.path.join(dest, name) if into_dir else dest
        if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
            if not recursive:
                raise ClientError(f"{src}: is a directory (use -r)")
            try:
                await walk(src, target)
            except asyncssh.SFTPError as exc:
                raise from_sftp_error(exc, src) from None
        else:
            jobs.append(Job(src, target, attrs.size or 0))
    return jobs


#: put_file/get_file's signature: (sftp, source, dest, options, progress) -> result.
Mover = Callable[[asyncssh.SFTPClient, str, str, TransferOptions, Progress], Awaitable[TransferResult]]


async def run_jobs(sftp: asyncssh.SFTPClient, jobs: list[Job], direction: str,
                   opts: TransferOptions, progress: Progress, parallel: int = 1,
                   put: Mover | None = None, get: Mover | None = None) -> list[ClientError]:
    """Run jobs with up to ``parallel`` files at once; report each; return the errors (keep going).

    ``put``/``get`` replace the one-connection movers (``--connections K`` passes multiconn's)."""
    put_fn: Mover = put or put_file
    get_fn: Mover = get or get_file
    progress.set_overall(sum(j.size for j in jobs), len(jobs))
    sem = asyncio.Semaphore(max(1, parallel))
    errors: list[ClientError] = []

    async def one(job: Job) -> None:
        async with sem:
            try:
                if direction == "put":
                    res = await put_fn(sftp, job.source, job.dest, opts, progress)
                else:
                    res = await get_fn(sftp, job.source, job.dest, opts, progress)
                progress.done(res.summary())
            except ClientError as exc:
                errors.append(exc)
                if exc.exit_code == 6:  # quota: every further upload would fail the same way
                    raise

    tasks = [asyncio.ensure_future(one(j)) for j in jobs]
    try:
        await asyncio.gather(*tasks)
    except ClientError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        progress.close()
    return errors
