"""Red team of permissions, shared folders, atomic uploads and hooks: each test is an attack as a hostile
logged-in user makes it against a real `sshfiles serve`, asserting the refusal and that nothing else
suffered (the files on disk, the ledger).
"""

from __future__ import annotations

import asyncio

import asyncssh
import pytest
from conftest import ServerHandle
from test_permissions import seed, snapshot


async def _error(coro: object) -> tuple[int, str]:
    """(SFTP status code, reason) of a request that must fail."""
    with pytest.raises(asyncssh.SFTPError) as info:
        await coro  # type: ignore[misc]
    return info.value.code, info.value.reason


def test_drop_box_does_not_tell_which_names_exist_through_dotdot(server: ServerHandle) -> None:
    """`stat /drop/NAME/..` used to answer "Not a directory" for an existing file and "No such file" for a
    missing one (the path fails to resolve, and the lexical fallback named `/drop`'s parent, where `list`
    holds): a silent existence probe of a drop box. The same through lstat and exec sha256sum."""
    user = server.add_user("prober", password=None, key=True)
    seed(server, user, {"drop/secret.txt": b"customer data\n", "drop/sub/x": b"x", "pub/readme": b"r"})
    server.cli("user", "perm", "set", "prober", "/drop", "upload")
    before = snapshot(user.home)

    async def go() -> None:
        async with server.connect(user) as conn, conn.start_sftp_client() as sftp:
            for probe in ("/drop/{}/..", "/drop/{}/../..", "/drop/{}/../sub", "/pub/../drop/{}/.."):
                present = await _error(sftp.stat(probe.format("secret.txt")))
                missing = await _error(sftp.stat(probe.format("nothing.txt")))
                assert present == missing, probe
                assert present[0] == asyncssh.FX_PERMISSION_DENIED, probe
                present = await _error(sftp.lstat(probe.format("secret.txt")))
                missing = await _error(sftp.lstat(probe.format("nothing.txt")))
                assert present == missing, probe
            # a subdirectory still answers (clients cd into it), and so does the drop box itself
            assert (await sftp.stat("/drop/sub/..")).permissions == (await sftp.stat("/drop")).permissions
            present_hash = await conn.run("sha256sum /drop/secret.txt/..")
            missing_hash = await conn.run("sha256sum /drop/nothing.txt/..")
            assert str(present_hash.stderr).replace("secret", "nothing") == missing_hash.stderr
            assert present_hash.exit_status == missing_hash.exit_status == 1
            assert "no download permission in /drop" in str(present_hash.stderr)
    asyncio.run(asyncio.wait_for(go(), 60))
    assert snapshot(user.home) == before
