"""Spreading connections over the ``--workers N`` processes by how many each already holds.

Why: the workers used to listen on one SO_REUSEPORT socket each, and the kernel hashed every
connection's addresses and ports to one of them. A hash spreads many connections evenly on
average but a few unevenly: 8 uploads on 2 workers landed 6 to 2 often enough that one worker ran
a whole core while the other idled (``scripts/bench.py``: the busiest worker did 71% of the work,
the machine was 83% busy). And a connection hashed to a worker that had died or stalled waited for
that worker, however idle the others were.

How: every worker accepts from the one listening socket the parent bound (so its backlog outlives
any worker), and publishes how many connections it holds in a `LoadTable`: one integer per worker
in anonymous shared memory mapped before the fork, written only by its owner (and by the parent,
which marks a dead worker's slot absent). A worker woken for a new connection leaves it to the
others for up to DEFER_MAX while some live worker holds fewer connections (`accept_balanced`);
the lighter worker, woken for the same connection, takes it. A lighter worker that does not take
it in time (stopped, or its event loop busy) does not hold it back: the heavier one takes it after
DEFER_MAX, and waits for that worker no more until its number changes (so a stuck worker costs one
DEFER_MAX, not one per connection). The numbers are a hint for spreading work, never a limit, so they need no lock.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import mmap
import select
import socket
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["ABSENT", "DEFER_MAX", "Listener", "LoadTable", "WorkerLoad", "accept_balanced", "poll_now", "readable"]

log = logging.getLogger(__name__)

ABSENT = -1          # a slot with no worker serving it (not started yet, stopping, or dead)
DEFER_STEP = 0.002   # seconds between looks, while a lighter worker may take the connection
DEFER_MAX = 0.1      # seconds a waiting connection is left to lighter workers before this one takes it

Address = Any  # what socket.accept() returns as the peer (a tuple whose form depends on the family)


class LoadTable:
    """How many connections each worker holds, shared by the parent and every forked worker."""

    def __init__(self, slots: int) -> None:
        # mmap(-1, ...) is MAP_SHARED | MAP_ANONYMOUS: the pages stay shared across fork
        self._mem = mmap.mmap(-1, 8 * slots)
        self._slots = memoryview(self._mem).cast("q")
        for slot in range(slots):
            self._slots[slot] = ABSENT

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, slot: int) -> int:
        return int(self._slots[slot])

    def set(self, slot: int, value: int) -> None:
        """Aligned 8-byte stores: a reader sees the old or the new number, never a mix."""
        self._slots[slot] = value

    def values(self) -> list[int]:
        return self._slots.tolist()


class WorkerLoad:
    """One worker's slot: what it publishes (connections accepted and not yet handed to asyncssh,
    plus the connections its service holds) and the comparison with the other workers."""

    def __init__(self, table: LoadTable, slot: int, startups: LoadTable | None = None) -> None:
        self.table = table
        self.slot = slot
        # the workers' unauthenticated connections, one slot each: --max-startups counts them all
        self.startups = startups if startups is not None else LoadTable(len(table))
        self._pending: set[socket.socket] = set()  # accepted, not yet handed on (then the service counts them)
        self.held = 0      # the service's connections, as last published
        self.withdrawn = False
        # slot -> the count a lighter worker showed when it let a connection wait DEFER_MAX: it is not
        # deferred to again until that number changes (it accepted, or a connection of it ended: it runs)
        self._stalled: dict[int, int] = {}
        self.table.set(slot, 0)

    @property
    def count(self) -> int:
        return len(self._pending) + self.held

    def _publish(self) -> None:
        if not self.withdrawn:  # a draining worker's connections still end: it stays absent
            self.table.set(self.slot, self.count)

    def accepted(self, conn: socket.socket) -> None:
        self._pending.add(conn)
        self._publish()

    def handed(self, conn: socket.socket) -> None:
        """`conn` reached the service's handler, or will never: no longer pending (idempotent)."""
        if conn in self._pending:
            self._pending.discard(conn)
            self._publish()

    def holding(self, connections: int) -> None:
        """The service's live connections changed (a handler began or ended)."""
        self.held = connections
        self._publish()

    def withdraw(self) -> None:
        """This worker accepts no more (it is stopping): the others stop leaving connections to it."""
        self.withdrawn = True
        self.table.set(self.slot, ABSENT)

    def publish_startups(self, total: int) -> None:
        """This worker's unauthenticated connections (defence.Admission.share)."""
        self.startups.set(self.slot, total)

    def startups_elsewhere(self) -> int:
        """The other live workers' unauthenticated connections."""
        return sum(n for slot, n in enumerate(self.startups.values()) if slot != self.slot and n > 0)

    def _lighter(self) -> list[tuple[int, int]]:
        mine = self.count
        return [(slot, n) for slot, n in enumerate(self.table.values()) if slot != self.slot and 0 <= n < mine]

    def lighter_elsewhere(self) -> bool:
        """Whether another live worker holds fewer connections than this one and is taking them (one
        that let a connection wait DEFER_MAX counts again once its number moves)."""
        lighter = self._lighter()
        for slot in [s for s, n in self._stalled.items() if self.table.get(s) != n]:
            del self._stalled[slot]
        return any(self._stalled.get(slot) != n for slot, n in lighter)

    def stalled(self) -> None:
        """A connection waited DEFER_MAX for the lighter workers: stop waiting for them until they
        move. Without this a stopped worker (or one whose loop is stuck) would make every other
        worker wait DEFER_MAX per connection: about 10 accepts a second for the whole server."""
        self._stalled.update(self._lighter())


def poll_now(sock: socket.socket, events: int) -> int:
    """The poll events of `sock` among `events` (plus POLLHUP/POLLERR) at this moment, without
    waiting (poll, not select: no limit on the descriptor's number)."""
    poller = select.poll()
    poller.register(sock, events)
    return sum(revents for _, revents in poller.poll(0))


def _waiting(sock: socket.socket) -> bool:
    """Whether a connection still waits in the listening socket's backlog."""
    return bool(poll_now(sock, select.POLLIN))


async def accept_balanced(sock: socket.socket, load: WorkerLoad) -> tuple[socket.socket, Address]:
    """The next connection for this worker from the listening socket all workers share: each
    one that arrives is left to lighter workers for up to DEFER_MAX (module docstring)."""
    loop = asyncio.get_running_loop()
    while True:
        await readable(sock)
        give_up_at = loop.time() + DEFER_MAX
        while load.lighter_elsewhere() and _waiting(sock):
            if loop.time() >= give_up_at:
                load.stalled()
                break
            await asyncio.sleep(DEFER_STEP)
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, InterruptedError):  # another worker took it
            continue
        conn.setblocking(False)
        load.accepted(conn)
        return conn, peer


class Listener:
    """An accept loop: `on_connection(sock, peer)` runs as a task for each connection, taken by
    `accept_balanced` when `load` is given (a socket shared by workers), else by the event loop's
    accept. The close()/wait_closed() pair of an asyncio server, so the caller stops it like
    asyncssh's acceptor; closing withdraws the worker from the table."""

    def __init__(self, sock: socket.socket,
                 on_connection: Callable[[socket.socket, Address], Coroutine[Any, Any, None]],
                 load: WorkerLoad | None = None) -> None:
        self._sock = sock
        self._load = load
        self._on_connection = on_connection
        self.tasks: set[asyncio.Task[None]] = set()  # one per connection until on_connection returns
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept(self) -> tuple[socket.socket, Address]:
        if self._load is not None:
            return await accept_balanced(self._sock, self._load)
        conn, peer = await asyncio.get_running_loop().sock_accept(self._sock)
        conn.setblocking(False)
        return conn, peer

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await self._accept()
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # the parent shut the listening socket: the server is stopping
                    return
                log.warning("accept failed: %s", exc.strerror or exc)  # EMFILE and friends: back off, not spin
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._on_connection(conn, peer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if self._load is not None:  # handed on by now, or never will be
                task.add_done_callback(functools.partial(_hand_over, self._load, conn))

    def close(self) -> None:
        if self._load is not None:
            self._load.withdraw()
        self._accepting.cancel()

    async def wait_closed(self) -> None:
        try:
            await self._accepting
        except asyncio.CancelledError:
            pass


def _hand_over(load: WorkerLoad, conn: socket.socket, _task: asyncio.Task[None]) -> None:
    load.handed(conn)


async def readable(conn: socket.socket) -> None:
    """Until `conn` has bytes to read, its peer closed it, or (a listening socket) a connection waits."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(conn.fileno(), _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
