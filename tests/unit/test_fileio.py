"""sshfiles.fileio.pwrite_all on real files: all bytes land at the offset, in pieces of at most
PWRITE_PIECE per system call (the page cache's cheap folio size, see the module docstring)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from sshfiles import fileio
from sshfiles.fileio import PWRITE_PIECE, pwrite_all


def _recording(monkeypatch: pytest.MonkeyPatch, cap: int | None = None) -> list[int]:
    """Record the size of every pwrite (the real one still writes); ``cap`` makes each call write
    at most that many bytes, as a short pwrite does."""
    sizes: list[int] = []
    real: Callable[[int, memoryview, int], int] = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        sizes.append(len(data))
        return real(fd, data[:cap] if cap is not None else data, offset)

    monkeypatch.setattr(fileio.os, "pwrite", pwrite)
    return sizes


@pytest.mark.parametrize("size", [0, 1, PWRITE_PIECE - 1, PWRITE_PIECE, PWRITE_PIECE + 1, 256 * 1024 + 17])
def test_every_byte_lands_at_the_offset_in_bounded_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    sizes = _recording(monkeypatch)
    fd = os.open(path, os.O_WRONLY)
    try:
        pwrite_all(fd, data, 5)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 5 + data + (b"x" * (5 - size) if size < 5 else b"")
    assert max(sizes, default=0) <= PWRITE_PIECE
    assert sum(sizes) == size and len(sizes) == -(-size // PWRITE_PIECE)


def test_a_short_write_is_continued_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * PWRITE_PIECE)
    sizes = _recording(monkeypatch, cap=1000)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        pwrite_all(fd, memoryview(data), 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert len(sizes) == -(-len(data) // 1000)


def test_a_write_that_makes_no_progress_raises_instead_of_looping(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _recording(monkeypatch, cap=0)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="no progress"):
            pwrite_all(fd, b"abc", 0)
    finally:
        os.close(fd)
