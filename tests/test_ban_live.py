"""`sshfiles ban add ADDR` also ends the source's logged-in sessions, on every worker, within about a second.

Before, an administrator's ban only refused new connections and ended unauthenticated ones: a user
already logged in from the banned source kept working until they left. A real `sshfiles serve
--workers 2`, sessions from 127.0.0.2 spread over the workers, a bystander from 127.0.0.3.
"""

from __future__ import annotations

import asyncio
import time

import asyncssh

BANNED = "127.0.0.2"
BYSTANDER = "127.0.0.3"


def test_an_admin_ban_ends_live_sessions_from_the_source_on_every_worker(workers_server):
    server = workers_server
    user = server.add_user("nat")
    calm = server.add_user("calm")

    async def go() -> tuple[float, bool]:
        conns = [await server.connect(user, local_addr=(BANNED, 0)) for _ in range(4)]
        clients = [await c.start_sftp_client() for c in conns]
        async with server.sftp(calm, local_addr=(BYSTANDER, 0)) as other:
            for sftp in clients:
                await sftp.stat(".")
            await asyncio.to_thread(server.cli, "ban", "add", BANNED, "--for", "1h")
            t0 = time.monotonic()  # the ban is in the store: every worker's watcher sees it at its next tick
            await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in conns)), 10)
            took = time.monotonic() - t0
            await other.stat(".")                             # another source is untouched
            for c in conns:
                c.close()
            try:
                async with server.connect(user, local_addr=(BANNED, 0), login_timeout=5):
                    refused = False
            except (OSError, asyncssh.Error):
                refused = True
        return took, refused

    took, refused = asyncio.run(asyncio.wait_for(go(), 60))
    assert took < 3.0, f"the banned source's sessions lasted {took:.1f} s after the ban"
    assert refused
    log = server.log()
    assert log.count("banned by the administrator") == 4, log[-3000:]
