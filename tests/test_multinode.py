"""Several `sshfiles serve` nodes over one PostgreSQL store and one homes directory, HAProxy in front.

Three nodes on their own loopback ports share a fresh PostgreSQL schema (tests/conftest.py
pg_schema) and one homes directory; HAProxy (TCP mode, send-proxy-v2) balances over them, so
every node is started with --proxy-protocol-from 127.0.0.1 (HAProxy's address) and the tests
reach nodes directly from other loopback addresses. The node lease is 3 s so a killed node's
reservations come back within seconds.

What a user and an administrator of such a cluster rely on: an account made on one node works
on all; sessions on different nodes racing for a user's last bytes never store more than the
quota; a node that dies mid-upload gives its reservations back and the ledger equals a scan;
removing a user ends their sessions everywhere; a permission rule set through one node applies to
live sessions on another, `sshfiles status` lists every node's sessions and `sshfiles kick` ends them
all; a source banned through one node is refused by the others, which log the client's own address;
/healthz takes a node out while the shared store cannot take a write.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator

import asyncssh
import pytest
from conftest import HOST, ServerHandle, User, haproxy, make_server, pg_schema
from test_metrics import _get, _metrics_port
from test_quota import QUOTA_MSG, KiB, disk_usage

from sshfiles.stores import open_store

NODES = 3


class Cluster:
    def __init__(self, nodes: list[ServerHandle], url: str, balancer: int) -> None:
        self.nodes = nodes
        self.url = url
        self.balancer = balancer

    def charged(self, name: str) -> int:
        store = open_store(self.url)
        try:
            return store.charged(name)
        finally:
            store.close()

    def owners(self) -> list[str]:
        store = open_store(self.url)
        try:
            return store.owners()
        finally:
            store.close()

    def connect(self, node: int | None, user: User, source: str, **kw):
        """asyncssh connection from `source` to node `node` directly, or through HAProxy (None)."""
        port = self.balancer if node is None else self.nodes[node].port
        opts = dict(username=user.name, known_hosts=None, client_keys=[str(user.key_path)] if user.key_path else None,
                    password=user.password, local_addr=(source, 0))
        opts.update(kw)
        return asyncssh.connect(HOST, port, **opts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, host_keys_dir) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    homes = root / "homes"
    homes.mkdir()
    with pg_schema() as url:
        nodes = []
        for i in range(NODES):
            node = make_server(root / f"node{i}", host_keys_dir,
                               ("--node-lease", "3", "--proxy-protocol-from", "127.0.0.1/32", "--ban-threshold", "3",
                                "--metrics-listen", "127.0.0.1:0"))
            node.homes_dir = homes
            node.store = url
            nodes.append(node)
        try:
            for node in nodes:
                node.start()
            with haproxy(root, [n.port for n in nodes]) as port:
                yield Cluster(nodes, url, port)
        finally:
            for node in nodes:
                node.stop()


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        time.sleep(0.1)


def test_a_user_added_through_one_node_logs_in_on_every_node(cluster):
    alice = cluster.nodes[0].add_user("alice")

    async def everywhere() -> list[str]:
        out = []
        for node in [0, 1, 2, None, None, None]:
            async with cluster.connect(node, alice, "127.0.0.2") as conn:
                out.append((await conn.run("echo hi", check=True)).stdout)
        return out
    assert run(everywhere()) == ["hi\n"] * 6
    for node in cluster.nodes:  # round robin: every node served at least its direct login
        assert re.search(r"login user=alice source=127\.0\.0\.2:\d+ method=password result=ok", node.log())


def test_eight_sessions_on_three_nodes_race_for_the_last_1000_bytes(cluster):
    quota = 64 * KiB
    racer = cluster.nodes[1].add_user("racer", password=None, quota=quota, key=True)

    async def seed() -> None:
        async with cluster.connect(0, racer, "127.0.0.3") as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("base", "wb") as f:
                await f.write(b"0" * (quota - 1000))
    run(seed())
    sessions = 8

    async def attack() -> list[bool]:
        go = asyncio.Event()
        ready = asyncio.Semaphore(0)

        async def one(i: int) -> bool:
            async with cluster.connect(i % NODES, racer, f"127.0.0.{10 + i}") as conn, \
                    conn.start_sftp_client() as sftp, sftp.open(f"r{i}", "wb") as f:
                ready.release()
                await go.wait()
                try:
                    await f.write(bytes([65 + i]) * 1000)
                    return True
                except asyncssh.SFTPError as exc:
                    assert QUOTA_MSG.search(exc.reason), exc.reason
                    return False

        tasks = [asyncio.create_task(one(i)) for i in range(sessions)]
        for _ in range(sessions):
            await ready.acquire()
        go.set()
        return await asyncio.gather(*tasks)
    results = run(attack())
    assert sum(results) == 1, f"exactly one session may get the last 1000 bytes, got {results}"
    assert disk_usage(racer.home) == quota
    wait_for(lambda: cluster.charged("racer") == quota, what="ledger == disk == quota")


def test_removing_a_user_ends_their_sessions_on_every_node(cluster):
    bob = cluster.nodes[2].add_user("bob")

    async def sessions() -> None:
        conns = [await cluster.connect(n, bob, "127.0.0.4") for n in range(NODES)]
        try:
            for c in conns:
                await c.run("echo hi", check=True)
            cluster.nodes[0].cli("user", "remove", "bob")
            await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in conns)), 10)  # "within seconds"
        finally:
            for c in conns:
                c.close()
    run(sessions())
    for node in cluster.nodes:
        assert re.search(r'session ended user=bob source=127\.0\.0\.4:\d+ reason="account removed"', node.log())


def test_a_source_banned_through_one_node_is_refused_by_the_others(cluster):
    carol = cluster.nodes[0].add_user("carol")
    flooder = User("carol", "wrong-password", carol.home)

    async def flood() -> None:  # wrong passwords to node 0 until it bans the source (threshold 3)
        for _ in range(6):
            try:
                async with cluster.connect(0, flooder, "127.0.0.21"):
                    pass
            except (asyncssh.Error, OSError):
                pass
    run(flood())
    wait_for(lambda: "banned source=127.0.0.21" in cluster.nodes[0].log(), what="node 0 bans the flooder")

    def refused_by(node: int | None) -> bool:
        async def attempt() -> None:
            async with cluster.connect(node, carol, "127.0.0.21") as conn:
                await conn.run("true")
        try:
            run(attempt())
        except (asyncssh.Error, OSError):
            return True
        return False
    wait_for(lambda: refused_by(2), what="node 2 refusing the banned source")
    assert refused_by(2)  # (the first refusal may end a login in progress; this one is at admission)
    wait_for(lambda: refused_by(1) and refused_by(None), what="node 1 and the balancer refusing it")
    assert re.search(r"connection refused source=127\.0\.0\.21:\d+ reason=banned", cluster.nodes[2].log())
    assert "hi" in run(_echo(cluster, carol, None, "127.0.0.22"))  # a bystander behind the balancer still works


def test_a_permission_set_on_node_0_applies_on_node_1_and_kick_ends_the_user_everywhere(cluster):
    """An administrator on one node locks a user down; the user's session already open on another node
    obeys within seconds (perm_rev over the shared store). `sshfiles status` on any node lists every
    node's sessions, and `sshfiles kick` ends them all."""
    erin = cluster.nodes[0].add_user("erin")

    async def scenario() -> None:
        conns = [await cluster.connect(n, erin, "127.0.0.5") for n in range(NODES)]
        try:
            async with conns[1].start_sftp_client() as sftp:
                async with sftp.open("before.txt", "wb") as f:  # node 1: uploads allowed so far
                    await f.write(b"ok")
                await asyncio.to_thread(cluster.nodes[0].cli, "user", "perm", "set", "erin", "/", "list,download")
                deadline = time.monotonic() + 10
                while True:  # the same live session, no reconnect: refused once node 1 reloads the rules
                    try:
                        async with sftp.open("after.txt", "wb") as f:
                            await f.write(b"no")
                    except asyncssh.SFTPPermissionDenied:
                        break
                    try:
                        await sftp.remove("after.txt")
                    except asyncssh.SFTPPermissionDenied:
                        break  # the new rules arrived between the upload and its removal: applied too
                    assert time.monotonic() < deadline, "node 1 never applied the permission set on node 0"
                    await asyncio.sleep(0.2)
                assert [n.filename for n in await sftp.readdir(".") if n.filename == "before.txt"]  # still listable

                async def listed() -> int:
                    out = (await asyncio.to_thread(cluster.nodes[2].cli, "status", "--json")).stdout
                    return out.count('"user": "erin"')
                deadline = time.monotonic() + 10
                while await listed() != NODES:  # every node writes its rows to the shared store
                    assert time.monotonic() < deadline, "status on node 2 never listed erin's 3 sessions"
                    await asyncio.sleep(0.3)
                kicked = await asyncio.to_thread(cluster.nodes[0].cli, "kick", "erin")
                assert f"kicked erin: {NODES} sessions" in kicked.stdout, kicked.stdout
                await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in conns)), 10)
        finally:
            for c in conns:
                c.close()
    run(scenario())
    for node in cluster.nodes:
        assert re.search(r'session ended user=erin source=127\.0\.0\.5:\d+ reason="credentials changed"', node.log())
    assert re.search(r"permissions reloaded user=erin", cluster.nodes[1].log())


def test_a_nodes_sessions_dropped_under_it_are_listed_again_within_a_lease(cluster):
    """A node taken for dead during a database outage longer than its lease has its session rows
    dropped by another node (drop_owner); once back, its users must show in `sshfiles status` again
    even though its sessions did not change."""
    import psycopg

    frank = cluster.nodes[0].add_user("frank")

    def listed() -> bool:
        return '"user": "frank"' in cluster.nodes[0].cli("status", "--json").stdout

    async def session() -> None:
        async with cluster.connect(1, frank, "127.0.0.6") as conn:
            await conn.run("echo hi", check=True)
            await asyncio.to_thread(wait_for, listed, 10, "frank listed")
            with psycopg.connect(cluster.url, autocommit=True) as db:  # what the reclaiming node does
                db.execute("DELETE FROM sessions WHERE \"user\" = 'frank'")
            await asyncio.to_thread(wait_for, listed, 15, "frank listed again (node lease: 3 s)")
    run(session())


def test_healthz_is_503_while_the_shared_store_cannot_take_a_write(cluster):
    """A balancer's health check must take a node out while its database would refuse or stall a write,
    and answer within healthz's own 1 s bound (not the store's 5 s call timeout) so the check itself
    does not time out. Here another session holds an exclusive lock on the store's version table."""
    import psycopg

    port = _metrics_port(cluster.nodes[1])
    assert _get(port, "/healthz") == (200, "ok\n")
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with psycopg.connect(cluster.url) as conn:
            conn.execute("LOCK TABLE sshfiles_schema IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(3)  # 3 s: longer than healthz's bound, shorter than a store call's 5 s
    locker = threading.Thread(target=hold)
    locker.start()
    try:
        assert locked.wait(10)
        status, body = _get(port, "/healthz")
        assert status == 503 and "unhealthy" in body, body
        assert "sshfiles:sshfiles" not in body and "127.0.0.1/" not in body  # no DSN in the answer
    finally:
        release.set()
        locker.join(15)
    assert _get(port, "/healthz") == (200, "ok\n")


async def _echo(cluster: Cluster, user: User, node: int | None, source: str) -> str:
    async with cluster.connect(node, user, source) as conn:
        return (await conn.run("echo hi", check=True)).stdout or ""


def test_a_node_killed_mid_upload_has_its_reservations_reclaimed(cluster):
    """Last: it kills node 1 (and starts it again afterwards)."""
    dave = cluster.nodes[0].add_user("dave", password=None, quota=4 * 1024 * KiB, key=True)
    victim = cluster.nodes[1]

    async def upload_then_die() -> None:
        conn = await cluster.connect(1, dave, "127.0.0.30")
        sftp = await conn.start_sftp_client()
        f = await sftp.open("big", "wb")
        for off in range(0, 320 * KiB, 32 * KiB):
            await f.write(b"d" * (32 * KiB), off)  # acknowledged: on disk, charged to node 1's reservation
        assert cluster.charged("dave") > disk_usage(dave.home)  # node 1 holds a reservation beyond the bytes
        victim.kill()
        conn.abort()
    run(upload_then_die())
    assert cluster.owners()  # the dead node's rows are still there: only its lease can tell it is dead
    wait_for(lambda: cluster.charged("dave") == disk_usage(dave.home), timeout=20,
             what="dead node's reservation reclaimed, ledger == scan")
    assert disk_usage(dave.home) == 320 * KiB  # every acknowledged byte, counted once
    survivors = cluster.nodes[0].log() + cluster.nodes[2].log()
    assert "reservations of a dead server reclaimed; usage rescanned: dave" in survivors
    assert survivors.count("usage rescanned: dave") == 1  # rescanned once, by one node
    victim.start()
    assert "hi" in run(_echo(cluster, dave, 1, "127.0.0.31"))
