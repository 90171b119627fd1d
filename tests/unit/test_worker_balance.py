"""worker_balance: the workers' shared load table and the accept that leaves connections to lighter workers.

Real listening sockets on loopback; the "other worker" is the table slot a test sets, or a forked
process writing its own slot.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from sshfiles import worker_balance
from sshfiles.worker_balance import ABSENT, DEFER_MAX, LoadTable, WorkerLoad, accept_balanced


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def test_a_slot_written_by_a_forked_worker_is_seen_by_the_parent() -> None:
    table = LoadTable(3)
    assert table.values() == [ABSENT, ABSENT, ABSENT]  # no worker has started
    pid = os.fork()
    if pid == 0:
        WorkerLoad(table, 1).holding(7)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert table.values() == [ABSENT, 7, ABSENT]


def test_a_worker_counts_pending_and_held_connections_and_withdraws() -> None:
    table = LoadTable(2)
    load = WorkerLoad(table, 0)
    a, b = socket.socket(), socket.socket()
    try:
        load.accepted(a)
        load.accepted(b)
        assert table.get(0) == 2
        load.handed(a)
        load.handed(a)  # the handler's factory and the task's end both report it: counted once
        load.holding(1)
        assert table.get(0) == 2  # b still pending + a held
        load.handed(b)
        assert table.get(0) == 1
        load.withdraw()
        assert table.get(0) == ABSENT
        load.holding(0)  # its connections end while it drains: it stays out of the sharing
        assert table.get(0) == ABSENT
    finally:
        a.close()
        b.close()


def test_only_a_live_worker_holding_fewer_counts_as_lighter() -> None:
    table = LoadTable(3)
    load = WorkerLoad(table, 0)
    load.holding(2)
    assert not load.lighter_elsewhere()  # the others are absent
    table.set(1, 2)
    assert not load.lighter_elsewhere()  # equal is not lighter
    table.set(2, 1)
    assert load.lighter_elsewhere()
    table.set(2, ABSENT)  # that worker died
    assert not load.lighter_elsewhere()


def test_a_heavier_worker_leaves_a_connection_to_a_lighter_one_that_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The heavier worker's accept is still waiting after the lighter one took the connection
    (the deferral made long, so that a slow machine cannot turn this into a race)."""
    monkeypatch.setattr(worker_balance, "DEFER_MAX", 60.0)

    async def scenario() -> None:
        sock = _listener()
        table = LoadTable(2)
        heavy, light = WorkerLoad(table, 0), WorkerLoad(table, 1)
        heavy.holding(3)
        client = socket.create_connection(sock.getsockname())
        try:
            heavy_accept = asyncio.ensure_future(accept_balanced(sock, heavy))
            await asyncio.sleep(0.2)
            assert not heavy_accept.done()
            conn, _ = await asyncio.wait_for(accept_balanced(sock, light), 5)
            conn.close()
            assert table.values() == [3, 1]
            await asyncio.sleep(0.2)
            assert not heavy_accept.done()  # nothing is waiting any more: no accept, no error
            heavy_accept.cancel()
        finally:
            client.close()
            sock.close()

    asyncio.run(scenario())


def test_a_connection_no_lighter_worker_takes_is_taken_after_the_deferral() -> None:
    """The lighter worker is stopped or stuck: the connection does not wait for it forever."""

    async def scenario() -> None:
        sock = _listener()
        table = LoadTable(2)
        heavy = WorkerLoad(table, 0)
        heavy.holding(3)
        table.set(1, 0)  # a live worker that never accepts
        client = socket.create_connection(sock.getsockname())
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            conn, _ = await asyncio.wait_for(accept_balanced(sock, heavy), 5)
            conn.close()
            assert loop.time() - started >= DEFER_MAX
            assert table.get(0) == 4
        finally:
            client.close()
            sock.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("others", [[ABSENT], [5]])
def test_with_no_lighter_worker_a_connection_is_taken_at_once(others: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """No deferral: with DEFER_MAX made a minute, a deferring accept would time out below."""
    monkeypatch.setattr(worker_balance, "DEFER_MAX", 60.0)

    async def scenario() -> None:
        sock = _listener()
        table = LoadTable(1 + len(others))
        for slot, n in enumerate(others, 1):
            table.set(slot, n)
        load = WorkerLoad(table, 0)
        client = socket.create_connection(sock.getsockname())
        try:
            conn, peer = await asyncio.wait_for(accept_balanced(sock, load), 30)
            assert peer == client.getsockname()
            assert not conn.getblocking()
            conn.close()
        finally:
            client.close()
            sock.close()

    asyncio.run(scenario())


def test_a_lighter_worker_that_let_a_connection_wait_is_not_waited_for_until_it_moves() -> None:
    table = LoadTable(3)
    load = WorkerLoad(table, 0)
    load.holding(5)
    table.set(1, 2)  # stopped: never accepts, its number never moves
    table.set(2, 7)
    assert load.lighter_elsewhere()
    load.stalled()  # a connection waited DEFER_MAX for it
    assert not load.lighter_elsewhere()
    table.set(1, 3)  # it accepted one: it runs again
    assert load.lighter_elsewhere()
    table.set(2, 1)  # a lighter worker that has not stalled counts at once
    load.stalled()
    assert not load.lighter_elsewhere()
    table.set(2, ABSENT)
    table.set(2, 0)  # a replacement in that slot starts at 0: a new number, waited for again
    assert load.lighter_elsewhere()
