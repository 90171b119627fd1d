"""Per-session resource bounds ("Hardening II", items 10, 11, 12, 13, 16), against a real `sshfiles serve`.

Each test is an attacker and a bystander: the attacker floods one resource (bounded in count and
seconds), the bystander, another user on its own connection and its own event loop (a thread, so
the attacker's client work cannot slow it), does ``stat .`` in a loop, and the test asserts the
bystander never waited long and the server's memory stayed bounded:

* stall bound: ``WORST_WAIT`` (1 s) per bystander ``stat`` while the attack runs;
* memory bound: the server's peak RSS (``VmHWM`` of /proc/PID/status, reset through
  /proc/PID/clear_refs when the attack starts, so no sampling can miss a peak) may grow by at most
  ``RSS_GROWTH`` (64 MiB) over its RSS before the attack. Before the
  fixes these attacks grew it by 500 MiB (item 10) and 100 MiB per directory handle (item 12).

The attacker speaks raw SFTP where a stock client cannot make the attack (2000 pipelined READs
with the channel's reading paused, directory handles held open): `RawSFTP` is a plain
`asyncssh.SSHClientSession` on the ``sftp`` subsystem, public asyncssh API only.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from pathlib import Path

import asyncssh
import pytest
from test_quota import KiB, add_user, assert_ledger_matches_disk, put, run

from sshfiles.asyncssh_seam import REPLY_BUFFER_LIMIT, String, extended_request
from sshfiles.session import MAX_HANDLES_PER_SESSION, MAX_HANDLES_PER_USER
from sshfiles.sftp import MAX_PACKET

MiB = 1024 * KiB
WORST_WAIT = 1.0
RSS_GROWTH = 64 * MiB

FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ = 1, 2, 3, 4, 5
FXP_OPENDIR, FXP_READDIR = 11, 12
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME = 101, 102, 103, 104
FXF_READ = 1
FX_EOF, FX_FAILURE = 1, 4


# -- helpers -----------------------------------------------------------------------------------


def rss(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of process `pid` from /proc, in bytes (VmRSS now, VmHWM its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def reset_peak(pid: int) -> int:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0, /proc/PID/clear_refs) and return it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss(pid)


class Bystander:
    """Another user doing ``stat .`` in a loop on its own connection and event loop (a thread)."""

    def __init__(self, server, user) -> None:
        self.server, self.user = server, user
        self.waits: list[float] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def loop() -> None:
            async with self.server.sftp(self.user) as sftp:
                await sftp.stat(".")
                self._ready.set()
                while not self._stop.is_set():
                    t = time.monotonic()
                    await asyncio.wait_for(sftp.stat("."), 30)
                    self.waits.append(time.monotonic() - t)
                    await asyncio.sleep(0.02)
        try:
            asyncio.run(loop())
        except BaseException as exc:  # reported by stop()
            self._error = exc
            self._ready.set()

    def __enter__(self) -> Bystander:
        self._thread.start()
        assert self._ready.wait(30), "bystander could not log in"
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(40)

    def check(self, bound: float = WORST_WAIT) -> float:
        """The worst wait; fails if the bystander broke or waited `bound` seconds or longer."""
        self.__exit__()
        if self._error:
            raise AssertionError(f"bystander failed: {self._error!r}")
        assert len(self.waits) >= 3, f"bystander made only {len(self.waits)} requests"
        worst = max(self.waits)
        assert worst < bound, f"bystander's stat waited {worst:.2f} s (of {len(self.waits)} requests)"
        return worst


class RawSFTP(asyncssh.SSHClientSession):
    """A minimal SFTP v3 client over a session channel: send any packet, read replies by id.

    DATA replies are counted, not kept (a flood's replies would fill the test's own memory).
    """

    def __init__(self) -> None:
        self.chan: asyncssh.SSHClientChannel | None = None
        self.buf = bytearray()
        self.replies: dict[int, tuple[int, bytes]] = {}
        self.data_replies = 0
        self.version: bytes | None = None
        self.changed = asyncio.Event()
        self.next_id = 1
        self.closed = False

    def connection_made(self, chan) -> None:
        self.chan = chan

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.changed.set()

    def data_received(self, data, datatype) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            n = struct.unpack(">I", self.buf[:4])[0]
            if len(self.buf) < 4 + n:
                break
            pkt = bytes(self.buf[4:4 + n])
            del self.buf[:4 + n]
            if pkt[0] == FXP_VERSION:
                self.version = pkt
            else:
                (rid,) = struct.unpack(">I", pkt[1:5])
                if pkt[0] == FXP_DATA:
                    self.data_replies += 1
                    self.replies[rid] = (FXP_DATA, b"")
                else:
                    self.replies[rid] = (pkt[0], pkt[5:])
        self.changed.set()

    def send(self, pkttype: int, body: bytes) -> int:
        assert self.chan is not None
        rid = self.next_id
        self.next_id += 1
        payload = bytes([pkttype]) + struct.pack(">I", rid) + body
        self.chan.write(struct.pack(">I", len(payload)) + payload)
        return rid

    async def wait(self, pred, timeout: float = 30) -> None:
        async def until() -> None:
            while not pred():
                if self.closed:
                    raise AssertionError("channel closed")
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(until(), timeout)

    async def reply(self, rid: int, timeout: float = 30) -> tuple[int, bytes]:
        await self.wait(lambda: rid in self.replies, timeout)
        return self.replies.pop(rid)

    async def request(self, pkttype: int, body: bytes, timeout: float = 30) -> tuple[int, bytes]:
        return await self.reply(self.send(pkttype, body), timeout)

    async def handle(self, pkttype: int, body: bytes) -> bytes:
        kind, reply = await self.request(pkttype, body)
        assert kind == FXP_HANDLE, (kind, status_text(reply))
        (n,) = struct.unpack(">I", reply[:4])
        return reply[4:4 + n]


def status_text(body: bytes) -> str:
    code = struct.unpack(">I", body[:4])[0]
    n = struct.unpack(">I", body[4:8])[0]
    return f"{code}: {body[8:8 + n].decode(errors='replace')}"


async def raw_sftp(conn, window: int = 2 * MiB) -> RawSFTP:
    chan, session = await conn.create_session(RawSFTP, subsystem="sftp", encoding=None, window=window)
    chan.write(struct.pack(">IBI", 5, FXP_INIT, 3))
    await session.wait(lambda: session.version is not None)
    return session


async def limits(sftp) -> tuple[int, int, int, int]:
    """limits@openssh.com as the server sends it: max packet, read, write, open handles."""
    return struct.unpack(">QQQQ", await extended_request(sftp, b"limits@openssh.com", b""))


def fill_dir(path: Path, count: int) -> None:
    """`count` empty files with long-ish names, made directly on disk (the test is the admin here)."""
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(f"entry-{i:08d}-{'x' * 40}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


# -- 10. READ replies: back-pressure ----------------------------------------------------------


@pytest.mark.parametrize("how", ["window", "socket"])
def test_pipelined_reads_of_a_client_that_stops_reading_are_bounded(server, how):
    """``window``: the client stops consuming the channel (asyncssh's public ``pause_reading``): it
    sends no window adjust, the server's replies pile up in its channel buffer. ``socket``: the
    client opened a 1 GiB window and stops reading its TCP socket: the replies pile up in the
    server's transport buffer instead. This one reaches asyncssh's private ``_transport`` of the
    client's connection (the only way to stop an asyncssh client from reading its socket)."""
    attacker = add_user(server, "hoarder", quota="unlimited")
    bystander = add_user(server, "reader10", quota="1MiB")
    (attacker.home / "big").write_bytes(os.urandom(256 * KiB))
    pid = server.proc.pid
    reads = 2000

    async def attack() -> None:
        async with server.connect(attacker) as conn:
            sftp = await raw_sftp(conn, window=(1 << 30) if how == "socket" else 2 * MiB)
            handle = await sftp.handle(FXP_OPEN, String(b"big") + struct.pack(">II", FXF_READ, 0))
            base = reset_peak(pid)
            with Bystander(server, bystander) as watch:
                assert sftp.chan is not None
                if how == "window":
                    sftp.chan.pause_reading()   # the client stops reading: no window adjust any more
                else:
                    conn._transport.pause_reading()  # the client's socket is no longer read
                read = String(handle) + struct.pack(">QI", 0, 256 * KiB)
                for _ in range(reads):          # 2000 x 29 bytes sent, 500 MiB of replies asked for
                    sftp.send(FXP_READ, read)
                await asyncio.sleep(4)          # the server had all the time it needed to buffer them
                peak = rss(pid, "VmHWM")
                worst = watch.check()
            grew = peak - base
            print(f"\nitem 10 ({how}): {reads} READs of 256 KiB unread: server RSS peak +{grew / MiB:.1f} MiB "
                  f"(bound {RSS_GROWTH // MiB} MiB, reply buffer limit {REPLY_BUFFER_LIMIT // MiB} MiB), "
                  f"bystander worst stat {worst * 1000:.0f} ms")
            assert grew < RSS_GROWTH, f"server grew by {grew / MiB:.0f} MiB holding unread replies"
            # Back-pressure delays, never drops: once the client reads again, replies flow.
            if how == "window":
                sftp.chan.resume_reading()
            else:
                conn._transport.resume_reading()
            await sftp.wait(lambda: sftp.data_replies >= 100, timeout=30)
    run(attack(), timeout=90)


# -- 11. open handles: per session and per user ------------------------------------------------


def test_open_handles_are_bounded_per_session_and_per_user(server):
    attacker = add_user(server, "fdhog", quota="unlimited")
    bystander = add_user(server, "reader11", quota="1MiB")
    (attacker.home / "f").write_bytes(b"f")
    (attacker.home / "d").mkdir()
    (bystander.home / "g").write_bytes(b"g")
    per_session, per_user = MAX_HANDLES_PER_SESSION, MAX_HANDLES_PER_USER
    sessions_needed = per_user // per_session + 1

    async def open_all(sftp, count: int) -> tuple[list, list[str]]:
        results = await asyncio.gather(*(sftp.open("f", "rb") for _ in range(count)), return_exceptions=True)
        ok = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(e, asyncssh.SFTPFailure) for e in errors), errors[:3]
        return ok, [e.reason for e in errors]

    async def attack() -> None:
        async with server.sftp(attacker) as first:
            assert (await limits(first))[3] == per_session
            ok, errors = await open_all(first, per_session + 50)
            assert len(ok) == per_session, f"{len(ok)} handles opened in one session"
            assert len(errors) == 50 and all("Too many open files" in r for r in errors), errors[:3]
            # a directory handle is a handle too
            with pytest.raises(asyncssh.SFTPFailure, match="Too many open files"):
                await first.scandir("d").__anext__()
            await ok.pop().close()
            assert [n async for n in first.scandir("d")]             # the freed place serves a listing
            async with server.connect(attacker) as conn:
                others = [await conn.start_sftp_client() for _ in range(sessions_needed)]
                held = len(ok)
                for sftp in others:
                    more, errors = await open_all(sftp, per_session)
                    held += len(more)
                assert held == per_user, f"the user holds {held} handles across sessions"
                assert any("per user" in r for r in errors), errors[:3]
                # the bystander is not affected: logs in, opens, reads
                async with server.sftp(bystander) as victim:
                    async with victim.open("g", "rb") as g:
                        assert await g.read() == b"g"
                for sftp in others:
                    sftp.exit()
            # the sessions that ended gave their handles back: this one can open again
            await ok.pop().close()
            ok2, _ = await open_all(first, 1)
            assert len(ok2) == 1
    run(attack(), timeout=120)


# -- 12. opendir: entries streamed in batches --------------------------------------------------


def test_opendir_of_a_huge_directory_is_streamed(server):
    attacker = add_user(server, "lister", quota="unlimited")
    bystander = add_user(server, "reader12", quota="1MiB")
    count = 100_000
    fill_dir(attacker.home / "many", count)
    pid = server.proc.pid
    handles = 5

    async def attack() -> None:
        async with server.connect(attacker) as conn:
            sftp = await raw_sftp(conn)
            base = reset_peak(pid)
            with Bystander(server, bystander) as watch:
                t = time.monotonic()
                held = [await sftp.handle(FXP_OPENDIR, String(b"many")) for _ in range(handles)]
                opened = time.monotonic() - t
                for h in held:                  # one batch from each: the rest stays in the kernel
                    kind, _ = await sftp.request(FXP_READDIR, String(h))
                    assert kind == FXP_NAME
                await asyncio.sleep(1)
                peak = rss(pid, "VmHWM")
                worst = watch.check()
            grew = peak - base
            print(f"\nitem 12: {handles} opendir of {count} entries took {opened:.3f} s, server RSS peak "
                  f"+{grew / MiB:.1f} MiB, bystander worst stat {worst * 1000:.0f} ms")
            assert opened < WORST_WAIT * handles
            assert grew < RSS_GROWTH, f"server grew by {grew / MiB:.0f} MiB holding {handles} listings"
            for h in held:
                kind, body = await sftp.request(FXP_CLOSE, String(h))
                assert kind == FXP_STATUS and status_text(body).startswith("0:")
        # the listing is complete and exact (names, '.' and '..'), read batch by batch
        async with server.sftp(attacker) as client:
            names = await client.listdir("many")
            assert len(names) == count + 2 and len(set(names)) == count + 2
            assert {".", ".."} <= set(names)
    run(attack(), timeout=120)


def test_missing_directory_fails_at_opendir_and_closed_handles_are_given_back(server):
    user = add_user(server, "dircloser", quota="unlimited")
    (user.home / "d").mkdir()

    async def go() -> None:
        async with server.connect(user) as conn:
            sftp = await raw_sftp(conn)
            kind, body = await sftp.request(FXP_OPENDIR, String(b"nope"))
            assert kind == FXP_STATUS and status_text(body).startswith("2:")     # NO_SUCH_FILE
            # open and close more directory handles than a session may hold: each CLOSE gives its place back
            for _ in range(MAX_HANDLES_PER_SESSION + 10):
                h = await sftp.handle(FXP_OPENDIR, String(b"d"))
                kind, body = await sftp.request(FXP_CLOSE, String(h))
                assert kind == FXP_STATUS and status_text(body).startswith("0:"), status_text(body)
    run(go())
    assert "Traceback" not in server.log()


# -- 13. copy-data: chunked, off the loop -------------------------------------------------------


def test_copy_data_of_a_big_file_does_not_stall_other_users(server):
    attacker = add_user(server, "copier", quota=str(4096 * MiB))
    bystander = add_user(server, "reader13", quota="1MiB")
    size = 1024 * MiB
    with open(attacker.home / "src", "wb") as f:   # sparse: the copy writes real (zero) blocks
        f.truncate(size)
        f.seek(size - 4)
        f.write(b"tail")
    server.cli("quota", "scan", attacker.name)

    async def attack() -> None:
        async with server.sftp(attacker) as sftp:
            with Bystander(server, bystander) as watch:
                t = time.monotonic()
                # "x" (a new file), not "w": closing a file that was truncated and rewritten makes ext4
                # write it back at close (auto_da_alloc, ~0.3 s per GiB): a stall of CLOSE, not of the copy
                async with sftp.open("src", "rb") as src, sftp.open("dst", "xb") as dst:
                    await sftp.remote_copy(src, dst)
                took = time.monotonic() - t
                await asyncio.sleep(0.2)
                worst = watch.check(bound=0.25)   # 1 MiB steps: a step is milliseconds
            print(f"\nitem 13: copy-data of {size // MiB} MiB took {took:.2f} s, "
                  f"bystander worst stat {worst * 1000:.0f} ms over {len(watch.waits)} requests")
            assert (await sftp.stat("dst")).size == size
            async with sftp.open("dst", "rb") as dst:
                await dst.seek(size - 4)
                assert await dst.read() == b"tail"
    try:
        run(attack(), timeout=120)
    finally:
        assert_ledger_matches_disk(server, attacker, timeout=5)


def test_copy_data_is_exact_at_the_quota(server):
    quota = 3 * MiB + 100
    user = add_user(server, "copyquota", quota=str(quota))

    async def go() -> None:
        async with server.sftp(user) as sftp:
            await put(sftp, "a", b"a" * (2 * MiB))
            async with sftp.open("a", "rb") as src, sftp.open("b", "wb") as dst:
                with pytest.raises(asyncssh.SFTPError, match="quota exceeded"):
                    await sftp.remote_copy(src, dst)
            # the first chunk (1 MiB) fits, the second is refused whole: nothing partial is charged
            assert (await sftp.stat("b")).size == 1 * MiB
            async with sftp.open("a", "rb") as src, sftp.open("c", "wb") as dst:
                await sftp.remote_copy(src, dst, src_length=100)
            assert (await sftp.stat("c")).size == 100
    run(go())
    assert assert_ledger_matches_disk(server, user) == quota


# -- 16. users-groups-by-id: replies within the max packet -----------------------------------------


def test_users_groups_by_id_reply_never_exceeds_the_max_packet(server):
    user = add_user(server, "idflood", quota="1MiB")
    name = b"idflood"

    async def go() -> None:
        async with server.sftp(user) as sftp:
            assert (await limits(sftp))[0] == MAX_PACKET
            ids = struct.pack(">I", 0) * (1024 * KiB // 4)            # 1 MiB of uids: 2.4 MB of names
            with pytest.raises(asyncssh.SFTPFailure, match="maximum packet size"):
                await extended_request(sftp, b"users-groups-by-id@openssh.com", String(ids) + String(b""))
            # the largest request whose reply fits is answered, one more id is refused
            fits = (MAX_PACKET - 64 - 8) // (4 + len(name))
            reply = await extended_request(sftp, b"users-groups-by-id@openssh.com",
                                           String(struct.pack(">I", 1000) * fits) + String(b""))
            assert len(reply) <= MAX_PACKET
            with pytest.raises(asyncssh.SFTPFailure):
                await extended_request(sftp, b"users-groups-by-id@openssh.com",
                                       String(struct.pack(">I", 1000) * (fits + 1)) + String(b""))
            small = await extended_request(sftp, b"users-groups-by-id@openssh.com",
                                           String(struct.pack(">II", 0, 1)) + String(struct.pack(">I", 0)))
            assert small == String(String(name) * 2) + String(String(name))
            assert await sftp.stat(".")                              # the session goes on
    run(go())
