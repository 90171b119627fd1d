"""`--metrics-listen`: a scrape after real logins and transfers moved each counter by exactly what was done,
with one process and with `--workers 2`; `/healthz` says 503 while the store cannot be used.

Real server, real clients (asyncssh), real HTTP scrapes parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncssh
import pytest
from conftest import ServerHandle, make_server
from prometheus_client.parser import text_string_to_metric_families
from test_clients import wait_for
from test_quota_exact import lock_store

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _metrics_port(server: ServerHandle) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = re.findall(r"metrics listening on \S+ port (\d+)", server.log())
        if m:
            return int(m[-1])
        time.sleep(0.05)
    raise AssertionError(server.log())


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> Samples:
    status, text = _get(port, "/metrics")
    assert status == 200
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)



@pytest.fixture
def metrics_server(tmp_path: Path, host_keys_dir: Path):
    h = make_server(tmp_path, host_keys_dir, ("--metrics-listen", "127.0.0.1:0"))
    h.start()
    try:
        yield h
    finally:
        h.stop()


def test_counters_move_by_exactly_what_clients_did(metrics_server: ServerHandle) -> None:
    server = metrics_server
    port = _metrics_port(server)
    alice = server.add_user("alice")
    carol = server.add_user("carol", quota="10KiB")
    (server.homes_dir / "alice" / "down.bin").write_bytes(os.urandom(100_000))
    before = scrape(port)
    during: dict[str, Samples] = {}

    async def clients() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            async with server.connect(alice, password="wrong"):
                pass
        async with server.sftp(alice) as sftp:
            async with sftp.open("up.bin", "wb") as f:
                await f.write(os.urandom(123_456))
                during["open"] = await asyncio.to_thread(scrape, port)
            async with sftp.open("down.bin", "rb") as f:
                assert len(await f.read()) == 100_000
        async with server.sftp(carol) as sftp:
            async with sftp.open("big.bin", "wb") as f:
                with pytest.raises(asyncssh.SFTPFailure):
                    await f.write(b"y" * 20_000)

    asyncio.run(asyncio.wait_for(clients(), 60))
    assert value(during["open"], "sshfiles_sessions_active") == 1
    assert value(during["open"], "sshfiles_transfers_active") == 1
    assert wait_for(lambda: value(scrape(port), "sshfiles_sessions_active") == 0)
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sshfiles_logins_total", method="password", result="ok") == 2
    assert delta("sshfiles_logins_total", method="password", result="failed") == 1
    assert delta("sshfiles_transfer_bytes_total", direction="upload") == 123_456
    assert delta("sshfiles_transfer_bytes_total", direction="download") == 100_000
    assert delta("sshfiles_transfers_total", direction="upload", result="ok") == 1
    assert delta("sshfiles_transfers_total", direction="download", result="ok") == 1
    assert delta("sshfiles_transfers_total", direction="upload", result="quota") == 1
    assert delta("sshfiles_quota_refusals_total") == 1
    assert value(after, "sshfiles_transfers_active") == 0
    assert ("sshfiles_event_loop_lag_seconds", ()) in after
    assert ("sshfiles_bans_total", ()) in after
    # the watcher's ban sync asks the store every second: its latency is measured
    assert wait_for(lambda: value(scrape(port), "sshfiles_store_seconds_count", op="bans") >= 1, 5)
    assert value(after, "sshfiles_store_seconds_count", op="login") - \
        value(before, "sshfiles_store_seconds_count", op="login") == 3  # one account read per password check


def test_healthz_is_503_while_the_store_is_locked_or_gone(metrics_server: ServerHandle) -> None:
    server = metrics_server
    port = _metrics_port(server)
    assert _get(port, "/healthz") == (200, "ok\n")
    locker = lock_store(server.accounts_dir, 3.0)  # another process holds the write lock
    try:
        status, body = _get(port, "/healthz")
        assert status == 503 and "unhealthy" in body, body
    finally:
        locker.wait(10)
    assert _get(port, "/healthz")[0] == 200
    db = server.accounts_dir / "accounts.db"
    db.rename(db.with_suffix(".moved"))  # removed under the server
    try:
        status, body = _get(port, "/healthz")
        assert status == 503 and "missing" in body, body
        assert str(server.root) not in body  # no host path in the answer
    finally:
        db.with_suffix(".moved").rename(db)
    assert _get(port, "/healthz")[0] == 200


def test_workers_metrics_are_summed_by_the_supervisor(tmp_path: Path, host_keys_dir: Path) -> None:
    server = make_server(tmp_path, host_keys_dir, ("--workers", "2", "--metrics-listen", "127.0.0.1:0"))
    server.start()
    try:
        port = _metrics_port(server)
        users = [server.add_user(f"u{i}") for i in range(4)]
        before = scrape(port)

        async def one(i: int) -> None:
            # distinct loopback sources: the kernel spreads them over both workers
            async with server.sftp(users[i], local_addr=(f"127.0.0.{10 + i}", 0)) as sftp:
                async with sftp.open("f.bin", "wb") as f:
                    await f.write(b"z" * (1000 * (i + 1)))

        async def all_clients() -> None:
            await asyncio.gather(*(one(i) for i in range(4)))

        asyncio.run(asyncio.wait_for(all_clients(), 60))
        assert wait_for(lambda: value(scrape(port), "sshfiles_sessions_active") == 0)
        after = scrape(port)
        pids = set(re.findall(r"\[(\d+)\]: login user=u\d", server.log()))
        assert value(after, "sshfiles_transfer_bytes_total", direction="upload") - \
            value(before, "sshfiles_transfer_bytes_total", direction="upload") == 10_000
        assert value(after, "sshfiles_logins_total", method="password", result="ok") - \
            value(before, "sshfiles_logins_total", method="password", result="ok") == 4
        assert _get(port, "/healthz")[0] == 200
        assert len(pids) >= 1
    finally:
        server.stop()


def test_a_busy_metrics_port_is_one_line_exit_1(metrics_server: ServerHandle) -> None:
    port = _metrics_port(metrics_server)
    res = metrics_server.cli("serve", "--port", "0", "--metrics-listen", f"127.0.0.1:{port}", check=False)
    assert res.returncode == 1 and f"cannot listen for metrics on 127.0.0.1:{port}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
