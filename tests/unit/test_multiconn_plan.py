"""Range and resume planning of ``--connections K`` (client/multiconn.py), on real block digests."""

from __future__ import annotations

import os
from pathlib import Path

from sshfiles.client.multiconn import blocks_to_send, bytes_in, split_ranges
from sshfiles.hashing import hash_fd_range

B = 100  # block size of the stand-in digests


def d(*tags: int) -> list[bytes]:
    """Stand-in digests: equal tags are equal blocks."""
    return [bytes([t]) * 32 for t in tags]


def test_fresh_file_is_k_ranges_covering_it_once() -> None:
    size = 10 * B + 7
    ranges = split_ranges(blocks_to_send([], [], B, 0, size), B, size, 3)
    assert ranges == [(0, 4 * B), (4 * B, 8 * B), (8 * B, size)]
    assert bytes_in(ranges) == size


def test_every_range_is_block_aligned() -> None:
    size = 97 * B + 1
    for k in range(1, 9):
        ranges = split_ranges(range(98), B, size, k)
        assert len(ranges) <= k
        assert all(s % B == 0 for s, _ in ranges) and all(e % B == 0 or e == size for _, e in ranges)
        assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]]  # contiguous, no overlap


def test_holes_between_ranges_are_all_that_is_sent() -> None:
    # three connections killed mid-way: blocks 0-1, 4-5 and 8 landed; 2-3, 6-7 and 9 did not
    local = d(*range(10))
    remote = d(0, 1, 0, 0, 4, 5, 0, 0, 8)  # the partial ends inside block 9: 9 digests
    assert blocks_to_send(local, remote, B, 9 * B, 10 * B) == [2, 3, 6, 7, 9]
    assert split_ranges([2, 3, 6, 7, 9], B, 10 * B, 3) == [(2 * B, 4 * B), (6 * B, 8 * B), (9 * B, 10 * B)]


def test_a_short_last_digest_is_not_a_whole_block() -> None:
    # partial of 250 bytes: block 2's digest covers 50 bytes only; equal, yet the block is missing
    assert blocks_to_send(d(1, 2, 3), d(1, 2, 3), B, 250, 300) == [2]
    assert blocks_to_send(d(1, 2, 3), d(1, 2, 3), B, 300, 300) == []


def test_a_short_file_end_is_a_whole_block() -> None:
    assert blocks_to_send(d(1, 2, 3), d(1, 2, 3), B, 250, 250) == []


def test_foreign_partial_sends_everything() -> None:
    assert blocks_to_send(d(1, 2, 3), d(7, 8, 9), B, 300, 300) == [0, 1, 2]


def test_long_runs_are_cut_for_the_connections() -> None:
    # one hole of 9 blocks and k=3: three ranges, so every connection works on it
    assert split_ranges(range(1, 10), B, 10 * B, 3) == [(B, 4 * B), (4 * B, 7 * B), (7 * B, 10 * B)]


def test_real_partial_with_holes(tmp_path: Path) -> None:
    block = 64 * 1024
    data = os.urandom(8 * block + 123)
    src, part = tmp_path / "src", tmp_path / "part"
    src.write_bytes(data)
    with open(part, "wb") as f:  # ranges [0, 2) and [4, 6) landed, with holes (zeros) between
        for i in (0, 1, 4, 5):
            f.seek(i * block)
            f.write(data[i * block:(i + 1) * block])
    partial = part.stat().st_size

    def digests(p: Path) -> list[bytes]:
        fd = os.open(p, os.O_RDONLY)
        try:
            return hash_fd_range(fd, "sha256", 0, partial, block)
        finally:
            os.close(fd)

    todo = blocks_to_send(digests(src), digests(part), block, partial, len(data))
    assert todo == [2, 3, 6, 7, 8]
    with open(part, "r+b") as f:  # sending exactly those ranges completes the file
        for start, end in split_ranges(todo, block, len(data), 3):
            f.seek(start)
            f.write(data[start:end])
    assert part.read_bytes() == data
