"""Disk full: the client gets a clear error, stored bytes stay intact, the ledger stays true."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncssh
import pytest

from sshfiles.stores.sqlite import SQLiteAccountStore


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs (needs root, as on CI); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_gives_clear_error_and_keeps_stored_bytes(server, small_fs):
    home = small_fs / "dora"
    server.cli("user", "add", "dora", "--home", str(home), "--password-stdin", input="pw-dora-123\n")

    class U:
        name, password, key_path = "dora", "pw-dora-123", None

    async def fill() -> str:
        async with server.sftp(U) as sftp:
            async with sftp.open("keep.txt", "wb") as f:
                await f.write(b"k" * 1000)
            try:
                async with sftp.open("big.bin", "wb") as f:
                    for i in range(32):
                        await f.write(b"x" * 65536, i * 65536)
            except asyncssh.SFTPError as exc:
                return exc.reason
        return "no error"

    reason = asyncio.run(fill())
    assert "No space left on device" in reason
    assert str(small_fs) not in reason
    assert (home / "keep.txt").read_bytes() == b"k" * 1000
    on_disk = sum(p.stat().st_size for p in home.iterdir() if p.is_file())
    store = SQLiteAccountStore(server.accounts_dir)
    assert store.charged("dora") == on_disk
    # the server still serves the user once space is freed
    async def after() -> None:
        async with server.sftp(U) as sftp:
            await sftp.remove("big.bin")
            async with sftp.open("small.txt", "wb") as f:
                await f.write(b"fits")
    asyncio.run(after())
    assert (home / "small.txt").read_bytes() == b"fits"
