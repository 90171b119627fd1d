"""sshfiles.hashing on real descriptors: pure hashing, no SSH anywhere."""

from __future__ import annotations

import ast
import hashlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import sshfiles.hashing
from sshfiles.hashing import (
    ALGORITHMS,
    READ_CHUNK,
    UnsupportedAlgorithm,
    block_count,
    digest_size,
    hash_fd_range,
    select_algorithm,
)


def test_hashing_imports_no_ssh() -> None:
    """hashing.py is the pure core: the SFTP wire format lives in checkfile.py."""
    tree = ast.parse(Path(sshfiles.hashing.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "asyncio", "hashlib", "os", "zlib", "collections", "concurrent", "typing"}, imported


def open_bytes(tmp_path: Path, data: bytes, name: str = "f.bin") -> int:
    path = tmp_path / name
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    descriptor = open_bytes(tmp_path, bytes(range(256)) * 8 + b"tail")  # 2052 bytes
    yield descriptor
    os.close(descriptor)


def test_select_algorithm() -> None:
    assert select_algorithm(["tiger", " SHA256 ", "md5"]) == "sha256"
    assert select_algorithm(["crc32"]) == "crc32"
    with pytest.raises(UnsupportedAlgorithm, match="tiger,whirlpool"):
        select_algorithm(["tiger", "whirlpool"])
    with pytest.raises(ValueError):  # UnsupportedAlgorithm is a ValueError: no SSH type leaks out
        select_algorithm([])


def test_digest_sizes_match_the_hashes() -> None:
    for name, (factory, size) in ALGORITHMS.items():
        hasher = factory()
        hasher.update(b"x")
        assert len(hasher.digest()) == size == digest_size(name)
    assert digest_size("tiger") == 0


def test_empty_file(tmp_path: Path) -> None:
    descriptor = open_bytes(tmp_path, b"")
    try:
        assert hash_fd_range(descriptor, "sha256") == [hashlib.sha256(b"").digest()]
        assert hash_fd_range(descriptor, "sha256", block_size=256) == []
        assert block_count(descriptor, 0, 0, 256) == 0
    finally:
        os.close(descriptor)


@pytest.mark.parametrize("offset,length,block", [(0, 0, 256), (0, 0, 2052), (0, 0, 4096), (1, 0, 256),
                                                 (0, 2048, 256), (100, 1000, 300), (2052, 0, 256),
                                                 (5000, 10, 256), (2000, 100, 256), (0, 1, 256)])
def test_block_count_matches_the_digests(fd: int, offset: int, length: int, block: int) -> None:
    assert block_count(fd, offset, length, block) == len(hash_fd_range(fd, "md5", offset, length, block))


def test_blocks_are_the_hashes_of_the_slices(fd: int) -> None:
    data = bytes(range(256)) * 8 + b"tail"
    assert hash_fd_range(fd, "crc32", 0, 0, 1000) == [zlib.crc32(data[i:i + 1000]).to_bytes(4, "big")
                                                      for i in (0, 1000, 2000)]


def test_negative_arguments_refused(fd: int) -> None:
    for args in ((-1, 0, 0), (0, -1, 0), (0, 0, -1)):
        with pytest.raises(ValueError):
            hash_fd_range(fd, "md5", *args)


def test_sparse_file_hashes_as_zeros(tmp_path: Path) -> None:
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(READ_CHUNK + 10)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        assert hash_fd_range(descriptor, "sha1") == [hashlib.sha1(bytes(READ_CHUNK + 10)).digest()]
    finally:
        os.close(descriptor)


def test_write_only_descriptor_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"data")
    descriptor = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(OSError):
            hash_fd_range(descriptor, "md5")
    finally:
        os.close(descriptor)
