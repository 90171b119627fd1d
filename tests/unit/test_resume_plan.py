"""The client's resume decision (client/transfer.py), on real block digests of real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sshfiles import checkfile
from sshfiles.client.transfer import (
    CHUNK_SIZE,
    MAX_BLOCKS_PER_REQUEST,
    MAX_REQUESTS,
    MIN_COMPARE_BLOCK,
    compare_block_size,
    resume_point,
)
from sshfiles.hashing import digest_size, hash_fd_range

IN_FLIGHT = CHUNK_SIZE * MAX_REQUESTS  # what the default options allow outstanding


@pytest.mark.parametrize("size", [0, 1, MIN_COMPARE_BLOCK, 2**30, 2**30 + 1, 10 * 2**30, 2**40 + 12345, 2**50])
def test_compare_block_size(size: int) -> None:
    block = compare_block_size(size)
    assert block >= MIN_COMPARE_BLOCK and block % 65536 == 0
    blocks = -(-size // block)
    assert blocks <= MAX_BLOCKS_PER_REQUEST
    # one check-file reply always holds them: the server refuses more than MAX_REPLY_DIGEST_BYTES
    assert blocks * digest_size("sha256") <= checkfile.MAX_REPLY_DIGEST_BYTES


def test_compare_block_size_is_the_smallest_that_fits() -> None:
    assert compare_block_size(100) == MIN_COMPARE_BLOCK
    size = MAX_BLOCKS_PER_REQUEST * MIN_COMPARE_BLOCK + 1  # one byte too many for the minimum block
    assert compare_block_size(size) == MIN_COMPARE_BLOCK + 65536


def d(*tags: int) -> list[bytes]:
    """Stand-in digests: equal tags are equal blocks."""
    return [bytes([t]) * 32 for t in tags]


def test_all_blocks_equal_resumes_at_the_partial_end() -> None:
    assert resume_point(d(1, 2, 3), d(1, 2, 3), 100, 250, 1000) == (250, False)


def test_nothing_to_compare() -> None:
    assert resume_point([], [], 100, 0, 1000) == (0, False)


def test_first_block_differs_restarts() -> None:
    assert resume_point(d(1, 2), d(9, 2), 100, 200, 10**9) == (0, True)


def test_difference_within_in_flight_resumes_at_that_block() -> None:
    # blocks of 100, partial 1000: block 8 starts at 800, 200 from the end <= in_flight + block
    assert resume_point(d(*range(10)), d(*range(8), 0, 0), 100, 1000, 100) == (800, False)


def test_difference_further_back_restarts() -> None:
    assert resume_point(d(*range(10)), d(*range(5), 0, 0, 0, 0, 0), 100, 1000, 100) == (0, True)


def test_in_flight_boundary() -> None:
    # first difference at 700: 300 from the end; allowed iff 300 <= in_flight + 100
    local, remote = d(*range(10)), d(*range(7), 0, 0, 0)
    assert resume_point(local, remote, 100, 1000, 200) == (700, False)
    assert resume_point(local, remote, 100, 1000, 199) == (0, True)


def test_different_block_counts_restart() -> None:
    assert resume_point(d(1, 2, 3), d(1, 2), 100, 300, 1000) == (0, True)


def _digests(path: Path, length: int, block: int) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_fd_range(fd, "sha256", 0, length, block)
    finally:
        os.close(fd)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * MIN_COMPARE_BLOCK + 1000)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


def plan(source: Path, partial: Path) -> tuple[int, bool]:
    """What _decide_resume does, minus the network: both sides' digests of the partial's length."""
    size = partial.stat().st_size
    block = compare_block_size(size)
    return resume_point(_digests(source, size, block), _digests(partial, size, block), block, size, IN_FLIGHT)


def test_real_prefix_resumes_at_its_end(source: tuple[Path, bytes], tmp_path: Path) -> None:
    path, data = source
    partial = tmp_path / "partial.bin"
    partial.write_bytes(data[:2 * MIN_COMPARE_BLOCK + 5])
    assert plan(path, partial) == (2 * MIN_COMPARE_BLOCK + 5, False)


def test_hole_from_pipelined_writes_resumes_at_the_hole(source: tuple[Path, bytes], tmp_path: Path) -> None:
    path, data = source
    partial = tmp_path / "partial.bin"
    hole = 2 * MIN_COMPARE_BLOCK + 100  # a write that never landed, below later ones that did
    partial.write_bytes(data[:hole] + bytes(4096) + data[hole + 4096:3 * MIN_COMPARE_BLOCK])
    assert plan(path, partial) == (2 * MIN_COMPARE_BLOCK, False)


def test_foreign_partial_restarts(source: tuple[Path, bytes], tmp_path: Path) -> None:
    path, data = source
    partial = tmp_path / "partial.bin"
    partial.write_bytes(b"x" + data[1:MIN_COMPARE_BLOCK * 2])
    assert plan(path, partial) == (0, True)
