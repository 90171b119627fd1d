"""An upload's CLOSE leaves the writeback of what it wrote to the kernel, as OpenSSH's server does.

Found in the benchmark (README, latest run): the server truncated every file opened with
SSH_FXF_TRUNC, a new one too; on ext4 an ftruncate to size 0 marks the file for a flush at its last
close ("auto_da_alloc"), so the CLOSE of a 1 GiB upload pushed the whole GiB to the disk on the
worker's event loop (1.1-1.3 s of the upload's 2.6-2.9 s, every session of the worker waiting). Seen
here with the kernel's own page-cache counters for the file (``cachestat``, Linux >= 6.5): right
after the CLOSE, its pages are still dirty, not already written back."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from tests.conftest import ServerHandle

_SYS_CACHESTAT = 451  # x86_64 and the other architectures with the generic syscall table
MiB = 1024 * 1024


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def cachestat(path: Path) -> _Stat | None:
    """The page-cache state of a whole file, or None where the kernel has no cachestat."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        rng, st = _Range(0, 0), _Stat()
        if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
                return None
            raise OSError(ctypes.get_errno(), "cachestat")
        return st
    finally:
        os.close(fd)


def test_closing_a_new_upload_does_not_flush_it_to_disk(server: ServerHandle, tmp_path: Path) -> None:
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("cachestat's syscall number is only known here for x86_64 and aarch64")
    user = server.add_user("lazy", password=None, key=True)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(64 * MiB))
    probe = server.homes_dir / user.name / "probe"
    probe.write_bytes(b"x")
    if cachestat(probe) is None:
        pytest.skip("this kernel has no cachestat (Linux >= 6.5)")
    res = server.sftp_batch(user, f"put {src} up.bin\n")  # OpenSSH's sftp opens with WRITE|CREAT|TRUNC
    assert res.returncode == 0, res.stderr
    st = cachestat(server.homes_dir / user.name / "up.bin")
    assert st is not None
    pages = 64 * MiB // os.sysconf("SC_PAGE_SIZE")
    # Left to the kernel: most pages still dirty (the flush at close had written them back or
    # had them in writeback; the kernel's own writeback waits 30 s for data this young).
    assert st.nr_dirty >= pages // 2, (st.nr_dirty, st.nr_writeback, st.nr_cache)
    assert (server.homes_dir / user.name / "up.bin").read_bytes() == src.read_bytes()
