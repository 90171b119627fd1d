"""The PROXY protocol (HAProxy's, v1 text and v2 binary) on the listener: the client's real address.

Why: behind a TCP load balancer every connection comes from the balancer, so logs, bans and
per-source limits (defence.py) would all see one address.  A balancer configured with
``send-proxy`` / ``send-proxy-v2`` starts each connection with a header naming the client.
The header is read here, from the raw socket, before asyncssh sees a byte and before
admission: the address it names is what admission, bans and logs see.

Trust is by the connecting address only (``--proxy-protocol-from``): from a configured
balancer the header is required, and a missing, malformed, truncated or oversized one
refuses the connection; from anywhere else a header is refused (a client cannot choose its
own source by sending one).

Spec: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import select
import socket
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .defence import parse_cidrs
from .worker_balance import Listener, WorkerLoad, poll_now, readable

__all__ = ["MAX_HEADER", "V2_SIGNATURE", "ProxyError", "ProxyHeader", "ProxyListener", "looks_like_proxy_header",
           "parse_proxy_header"]

log = logging.getLogger(__name__)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107             # the spec's longest v1 line, CRLF included
MAX_HEADER = 16 + 512     # v2: addresses (at most 216 for AF_UNIX) plus room for the TLVs balancers add
HEADER_TIMEOUT = 5.0      # seconds a balancer's connection has to deliver its header
FIRST_BYTES_WAIT = 0.5    # seconds to wait for another client's first bytes (to spot a forged header)

Address = tuple[str, int]


class ProxyError(ValueError):
    """Not a valid PROXY header; the message says why, in a form fit for the log."""


class _ClosedEmpty(ProxyError):
    """The balancer closed without sending a byte: a TCP health check (HAProxy's plain `check`)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header: its length in bytes, and the client's address (None: LOCAL / UNKNOWN,
    a connection of the balancer's own, e.g. a health check)."""

    length: int
    source: Address | None


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse a header at the start of `data`; None if more bytes are needed to decide.

    Raises ProxyError for anything that is not a valid v1 or v2 header (including a header
    longer than MAX_HEADER, or a v1 line longer than the spec's 107 bytes).
    """
    if not data:
        return None
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        return _parse_v2(data) if len(data) >= 16 else None
    if b"PROXY "[:len(data)] == data[:6]:
        return _parse_v1(data)
    raise ProxyError("no PROXY header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX:
            raise ProxyError("PROXY v1 line too long")
        return None
    try:
        words = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 line is not ASCII") from None
    length = end + 2
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return ProxyHeader(length, None)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed PROXY v1 line")
    _, proto, src, dst, sport, dport = words
    want = ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    try:
        addr = want(src)
        want(dst)
        ports = [int(p, 10) for p in (sport, dport)]
    except ValueError:
        raise ProxyError("malformed PROXY v1 address or port") from None
    if any(not (0 <= p <= 65535) or str(p) != s for p, s in zip(ports, (sport, dport), strict=True)):
        raise ProxyError("malformed PROXY v1 port")
    return ProxyHeader(length, (str(addr), ports[0]))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    ver_cmd, fam, size = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyError("unsupported PROXY v2 version")
    length = 16 + size
    if length > MAX_HEADER:
        raise ProxyError(f"PROXY v2 header too long ({length} bytes)")
    if len(data) < length:
        return None
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection; the addresses (if any) are ignored
        return ProxyHeader(length, None)
    if command != 1:
        raise ProxyError("unknown PROXY v2 command")
    family, transport = fam >> 4, fam & 0x0F
    if transport not in (0, 1):  # UNSPEC or STREAM: a datagram header on a TCP listener is nonsense
        raise ProxyError("PROXY v2 header for a datagram transport")
    body = data[16:length]
    if family == 1:
        if size < 12:
            raise ProxyError("PROXY v2 TCP4 addresses truncated")
        src4, _dst4, sport4, _dport4 = struct.unpack_from("!4s4sHH", body)
        return ProxyHeader(length, (str(ipaddress.IPv4Address(src4)), sport4))
    if family == 2:
        if size < 36:
            raise ProxyError("PROXY v2 TCP6 addresses truncated")
        src6, _dst6, sport6, _dport6 = struct.unpack_from("!16s16sHH", body)
        addr6 = ipaddress.IPv6Address(src6)
        mapped = addr6.ipv4_mapped
        return ProxyHeader(length, (str(mapped or addr6), sport6))
    if family == 0:  # UNSPEC with PROXY: the balancer does not know the source
        return ProxyHeader(length, None)
    raise ProxyError("unsupported PROXY v2 address family")


def looks_like_proxy_header(data: bytes) -> bool:
    """Whether `data` (the first bytes a client sent, at least 4 of them) begins a PROXY header.
    An SSH client's first bytes are "SSH-", which neither version's start can be."""
    return data.startswith(b"PROXY ") or (len(data) >= 4 and V2_SIGNATURE.startswith(data[:12]))


class ProxyListener:
    """Accepts on a listening socket, resolves each connection's real source, hands it on.

    `on_connection(sock, source)` gets every admitted connection (a connected, non-blocking
    socket positioned after the header) with the client's address: the header's for a
    balancer, the socket's own peer otherwise.  It has the close()/wait_closed() pair of an
    asyncio server so the caller stops it like asyncssh's acceptor.
    """

    def __init__(self, sock: socket.socket, balancers: str,
                 on_connection: Callable[[socket.socket, Address], Coroutine[Any, Any, None]],
                 on_refused: Callable[[Address, str], None], load: WorkerLoad | None = None) -> None:
        self._balancers = parse_cidrs(balancers)
        self._on_connection = on_connection
        self._on_refused = on_refused
        # `load`: the socket is shared by workers (worker_balance.py)
        self._listener = Listener(sock, self._admit, load)

    def is_balancer(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._balancers)

    async def _admit(self, conn: socket.socket, accepted_from: Any) -> None:
        peer: Address = (str(accepted_from[0]), int(accepted_from[1]))
        try:
            if self.is_balancer(peer[0]):
                try:
                    source = await asyncio.wait_for(self._read_header(conn), HEADER_TIMEOUT)
                except _ClosedEmpty:  # a connect-only health check: nothing to refuse or log
                    conn.close()
                    return
                except (ProxyError, OSError) as exc:
                    self._refuse(conn, peer, f"bad PROXY header from balancer: {exc}")
                    return
                except TimeoutError:
                    self._refuse(conn, peer, "no PROXY header from balancer in time")
                    return
                if source is None and await _closes_silently(conn):
                    conn.close()  # a health check with a LOCAL header (HAProxy `check` on a send-proxy server)
                    return
                peer = source or peer
            else:
                # An SSH client sends its version line as soon as it connects (RFC 4253 4.2), so its
                # first bytes are here within moments: a forged header is refused before asyncssh
                # sees it. A client that waits for the server's line first costs only FIRST_BYTES_WAIT.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(readable(conn), FIRST_BYTES_WAIT)
                try:
                    first = conn.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    first = b""
                except OSError:
                    conn.close()
                    return
                if looks_like_proxy_header(first):
                    self._refuse(conn, peer, "PROXY header from a source that is not a configured balancer")
                    return
            await self._on_connection(conn, peer)
        except asyncio.CancelledError:
            conn.close()
            raise

    def _refuse(self, conn: socket.socket, peer: Address, reason: str) -> None:
        self._on_refused(peer, reason)
        with contextlib.suppress(OSError):
            conn.close()

    @staticmethod
    async def _read_header(conn: socket.socket) -> Address | None:
        """Peek until a whole header is there, then consume exactly it (the SSH bytes after it
        stay in the socket for asyncssh)."""
        while True:
            await readable(conn)
            data = conn.recv(MAX_HEADER, socket.MSG_PEEK)
            if not data:
                raise _ClosedEmpty("connection closed before the header")
            header = parse_proxy_header(data)
            if header is not None:
                got = conn.recv(header.length)
                if len(got) != header.length:  # pragma: no cover - peeked bytes are there
                    raise ProxyError("header vanished while reading it")
                return header.source
            if len(data) >= MAX_HEADER:
                raise ProxyError("header too long")
            if _peer_done(conn):  # nothing more will come (otherwise it polled until HEADER_TIMEOUT)
                raise ProxyError("connection closed inside the header")
            await asyncio.sleep(0.02)  # a header split over segments: the rest is in flight

    def close(self) -> None:
        self._listener.close()
        for task in list(self._listener.tasks):  # connections still in their header: never handed on
            task.cancel()

    async def wait_closed(self) -> None:
        await self._listener.wait_closed()



def _peer_done(conn: socket.socket) -> bool:
    """Whether the peer has shut its side (FIN or reset) though unread bytes remain."""
    return bool(poll_now(conn, select.POLLRDHUP) & (select.POLLRDHUP | select.POLLHUP | select.POLLERR))


async def _closes_silently(conn: socket.socket) -> bool:
    """Whether the peer closes (or resets) without a byte within FIRST_BYTES_WAIT; an SSH client
    would have sent its version line by then (RFC 4253 4.2)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(readable(conn), FIRST_BYTES_WAIT)
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset
        return True
