"""The PROXY protocol header parser (proxy_protocol.py): what a balancer sends, and what an attacker might.

Headers are built here byte by byte from the spec (haproxy.org proxy-protocol.txt), not by the
code under test.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from sshfiles.proxy_protocol import (
    MAX_HEADER,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    looks_like_proxy_header,
    parse_proxy_header,
)

SSH = b"SSH-2.0-OpenSSH_9.2\r\n"


def v2(command: int, family: int, body: bytes, transport: int = 1) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family << 4 | transport]) + struct.pack("!H", len(body)) + body


def tcp4(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 2222) -> bytes:
    return ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)


def tcp6(src: str, sport: int, dst: str = "::1", dport: int = 2222) -> bytes:
    return ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)


def test_v1_tcp4_and_tcp6_name_the_client_and_leave_the_ssh_bytes() -> None:
    line = b"PROXY TCP4 127.0.0.5 127.0.0.1 40001 2222\r\n"
    assert parse_proxy_header(line + SSH) == ProxyHeader(len(line), ("127.0.0.5", 40001))
    line6 = b"PROXY TCP6 2001:db8::7 ::1 40002 2222\r\n"
    assert parse_proxy_header(line6 + SSH) == ProxyHeader(len(line6), ("2001:db8::7", 40002))
    unknown = b"PROXY UNKNOWN\r\n"
    assert parse_proxy_header(unknown + SSH) == ProxyHeader(len(unknown), None)


def test_v2_tcp4_tcp6_local_and_tlvs() -> None:
    h4 = v2(1, 1, tcp4("127.0.0.5", 40001))
    assert parse_proxy_header(h4 + SSH) == ProxyHeader(28, ("127.0.0.5", 40001))
    h6 = v2(1, 2, tcp6("2001:db8::7", 40002))
    assert parse_proxy_header(h6 + SSH) == ProxyHeader(52, ("2001:db8::7", 40002))
    mapped = v2(1, 2, tcp6("::ffff:192.0.2.9", 40003))  # an IPv4 client on a dual-stack balancer
    assert parse_proxy_header(mapped) == ProxyHeader(52, ("192.0.2.9", 40003))
    local = v2(0, 0, b"", transport=0)  # a health check of the balancer's own
    assert parse_proxy_header(local + SSH) == ProxyHeader(16, None)
    tlv = tcp4("127.0.0.6", 1) + b"\x04\x00\x03abc"  # a TLV (NOOP) after the addresses: skipped whole
    assert parse_proxy_header(v2(1, 1, tlv) + SSH) == ProxyHeader(16 + len(tlv), ("127.0.0.6", 1))


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 127.0.0.5 127.0.0.1 40001 2222\r\n",
    v2(1, 1, tcp4("127.0.0.5", 40001)),
    v2(1, 2, tcp6("2001:db8::7", 40002)),
])
def test_truncated_headers_ask_for_more_bytes(header: bytes) -> None:
    for cut in range(1, len(header)):
        assert parse_proxy_header(header[:cut]) is None, cut


@pytest.mark.parametrize("data, why", [
    (SSH, "no PROXY header"),
    (b"GET / HTTP/1.1\r\n", "no PROXY header"),
    (b"PROXY TCP4 127.0.0.5 127.0.0.1 40001\r\n", "malformed"),
    (b"PROXY TCP4 ::1 127.0.0.1 40001 2222\r\n", "malformed"),
    (b"PROXY TCP4 127.0.0.5 127.0.0.1 70000 2222\r\n", "port"),
    (b"PROXY TCP4 127.0.0.5 127.0.0.1 +1 2222\r\n", "port"),
    (b"PROXY UDP4 127.0.0.5 127.0.0.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 127.0.0.5 127.0.0.1 1 2\xff\r\n", "ASCII"),
    (b"PROXY TCP4 " + b"1" * 120, "too long"),                      # oversized v1, no CRLF in 107 bytes
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_HEADER), "too long"),  # oversized v2
    (v2(1, 1, b"\x7f\x00\x00\x05"), "truncated"),                   # TCP4 with 4 address bytes
    (v2(1, 2, tcp4("127.0.0.5", 1)), "truncated"),                  # TCP6 with 12 address bytes
    (v2(1, 1, tcp4("127.0.0.5", 1), transport=2), "datagram"),
    (v2(2, 1, tcp4("127.0.0.5", 1)), "command"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + tcp4("127.0.0.5", 1), "version"),
    (v2(1, 3, b"\x00" * 216), "family"),                            # AF_UNIX: no client address for a ban
])
def test_invalid_or_oversized_headers_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProxyError, match=why):
        parse_proxy_header(data)


def test_a_clients_own_header_is_recognised_but_ssh_is_not() -> None:
    assert looks_like_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert looks_like_proxy_header(V2_SIGNATURE[:8])
    assert not looks_like_proxy_header(SSH) and not looks_like_proxy_header(b"SSH-") and not looks_like_proxy_header(b"")
