"""PROXY protocol behind a real HAProxy (TCP mode, send-proxy-v2): the server sees the client, not the balancer.

HAProxy connects from 127.0.0.1, the only configured balancer; clients reach it from other loopback
addresses. The log must name the real client, and a ban of that client must refuse it through the
balancer while another client behind the same balancer keeps working. A connection from the
balancer without a header, and a header from anyone else, are refused and logged.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time

import asyncssh
import pytest
from conftest import HOST, haproxy, make_server


@pytest.fixture
def proxied(tmp_path, host_keys_dir):
    h = make_server(tmp_path, host_keys_dir, ("--proxy-protocol-from", "127.0.0.1/32"))
    h.start()
    try:
        yield h
    finally:
        h.stop()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


async def login(port: int, user, source: str) -> str:
    async with asyncssh.connect(HOST, port, username=user.name, password=user.password, known_hosts=None,
                                client_keys=None, local_addr=(source, 0)) as conn:
        return (await conn.run("echo hi", check=True)).stdout or ""


def test_haproxy_send_proxy_v2_gives_the_real_source_to_logs_and_bans(proxied, tmp_path):
    alice = proxied.add_user("alice")
    with haproxy(tmp_path, [proxied.port]) as port:
        asyncio.run(login(port, alice, "127.0.0.5"))
        wait_for(lambda: re.search(r"login user=alice source=127\.0\.0\.5:\d+ method=password result=ok",
                                   proxied.log()))
        assert not re.search(r"login user=alice source=127\.0\.0\.1:", proxied.log())

        proxied.cli("ban", "add", "127.0.0.5", "--for", "1h")

        def refused() -> bool:  # the watcher picks store bans up within a second or two
            try:
                asyncio.run(login(port, alice, "127.0.0.5"))
            except (asyncssh.Error, OSError):
                return True
            return False
        wait_for(refused)  # the first refusal may end a login in progress ("source banned")
        assert refused()   # from now on the ban refuses at admission, before any cryptography
        wait_for(lambda: re.search(r"connection refused source=127\.0\.0\.5:\d+ reason=banned", proxied.log()))
        assert "hi" in asyncio.run(login(port, alice, "127.0.0.6"))  # the balancer itself is not banned
    # HAProxy's health checks (connect, close) ran all along: never refused, logged or scored.
    assert "source=127.0.0.1:" not in proxied.log() and "banned source=127.0.0.1" not in proxied.log()


def test_balancer_without_header_and_header_from_elsewhere_are_refused(proxied):
    alice = proxied.add_user("alice")

    async def direct(source: str) -> None:
        await login(proxied.port, alice, source)

    with pytest.raises((asyncssh.Error, OSError)):  # from the balancer's address, SSH without a header
        asyncio.run(direct("127.0.0.1"))
    wait_for(lambda: re.search(r"connection refused source=127\.0\.0\.1:\d+ reason=bad PROXY header from balancer",
                               proxied.log()))
    # A client that is not a balancer claims to be 127.0.0.9: refused, logged with its own address.
    with socket.create_connection((HOST, proxied.port), source_address=("127.0.0.7", 0)) as s:
        s.sendall(b"PROXY TCP4 127.0.0.9 127.0.0.1 1234 2222\r\nSSH-2.0-x\r\n")
        s.settimeout(10)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    wait_for(lambda: re.search(r"connection refused source=127\.0\.0\.7:\d+ reason=PROXY header from a source",
                               proxied.log()))
    assert "127.0.0.9" not in proxied.log()
    assert "hi" in asyncio.run(login(proxied.port, alice, "127.0.0.8"))  # plain SSH from a non-balancer works


def test_a_balancer_connection_closed_inside_its_header_is_refused_at_once(proxied):
    """Found by a red-team pass: a partial header followed by the balancer's FIN was polled every
    20 ms until the 5 s header timeout (500 of them cost each worker 1.6 CPU-s)."""
    started = time.monotonic()
    with socket.create_connection((HOST, proxied.port), source_address=("127.0.0.1", 0)) as s:
        s.sendall(b"PROXY TCP4 127.0.0.9")
        s.shutdown(socket.SHUT_WR)
        wait_for(lambda: re.search(r"connection refused source=127\.0\.0\.1:\d+ reason=bad PROXY header from "
                                   r"balancer: connection closed inside the header", proxied.log()), 10)
    assert time.monotonic() - started < 3  # well before the 5 s header timeout
