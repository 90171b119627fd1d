"""Prometheus metrics and ``/healthz`` (``--metrics-listen HOST:PORT``), with prometheus_client.

Why this shape:
- Off by default, and then free: nothing here imports prometheus_client or touches a metric until
  `enable` runs, so every hook is one ``if _m is None`` check.
- Counted from the audit events (`observe`, called by audit.event): logins, bans, quota refusals and
  transfer bytes are exactly what the audit log says, counted in one place. Transfer bytes are added
  when the transfer's handle closes (never per packet), so they match the ``transfer`` event's ``bytes``.
- ``--workers N``: prometheus_client's multiprocess mode. The supervisor makes a private directory and
  exports PROMETHEUS_MULTIPROC_DIR before forking (prometheus_client chooses its value storage when it is
  first imported, which is why the import is deferred); each worker writes its metrics to its own files
  there, and the supervisor alone serves HTTP, summing them (`MultiProcessCollector`): counters are the
  sum over every worker that ever ran (a replaced worker's counts stay), the gauges of live workers are
  summed (active sessions and transfers) or maxed (event-loop lag). With one process it serves its own
  registry from a thread.
- The HTTP server is a thread (prometheus_client's WSGI server), so a scrape never runs on the event
  loop, and neither does the store probe of ``/healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["close_inherited_server", "enable", "mark_dead", "observe", "parse_listen", "serve", "session_ended",
           "session_started", "store_timer", "transfer_ended", "transfer_started", "watch_loop_lag"]

#: How often the event-loop lag probe wakes up (seconds).
LAG_INTERVAL = 0.5


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.logins = Counter("sshfiles_logins", "Authentication attempts by method and result "
                              "(ok, failed, refused, busy, abandoned).", ["method", "result"])
        self.sessions = Gauge("sshfiles_sessions_active", "Authenticated connections open now.",
                              multiprocess_mode="livesum")
        self.transfers = Gauge("sshfiles_transfers_active", "File handles open now (transfers in progress).",
                               multiprocess_mode="livesum")
        self.transfer_bytes = Counter("sshfiles_transfer_bytes", "Bytes of finished transfers (counted when the "
                                      "handle closes), by direction (upload, download).", ["direction"])
        self.transfers_done = Counter("sshfiles_transfers", "Finished transfers by direction and result "
                                      "(ok, quota, interrupted, failed).", ["direction", "result"])
        self.quota_refusals = Counter("sshfiles_quota_refusals", "Operations refused by a byte or entries quota.")
        self.bans = Counter("sshfiles_bans", "Sources banned by this server.")
        self.loop_lag = Gauge("sshfiles_event_loop_lag_seconds", "How late the event loop last woke a "
                              f"{LAG_INTERVAL:g} s timer (worst live worker).", multiprocess_mode="livemax")
        self.store_seconds = Histogram("sshfiles_store_seconds", "Accounts store call latency by call "
                                       "(login, channel: account reads; watch: the session watcher; bans: the "
                                       "ban sync; sessions: status rows; check: the healthz probe).", ["op"],
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                5, 10, 30))


_m: _Metrics | None = None


def enable() -> None:
    """Create this process's metrics (in a worker: after the fork, with PROMETHEUS_MULTIPROC_DIR set)."""
    global _m
    if _m is None:
        _m = _Metrics()


def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:9122`` for IPv6) -> (host, port); "" -> None; ValueError if malformed."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port, 10)
    except ValueError:
        raise ValueError(f"expected HOST:PORT with a numeric port, got {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {number}")
    return host, number


# -- hooks (no-ops unless enabled) ----------------------------------------------------------------

def observe(name: str, fields: dict[str, Any]) -> None:
    """Count one audit event (audit.event calls this for every event)."""
    m = _m
    if m is None:
        return
    result = str(fields.get("result", ""))
    if name == "login":
        m.logins.labels(str(fields.get("method", "")), result).inc()
    elif name == "banned":
        m.bans.inc()
    elif name == "transfer":
        direction = str(fields.get("direction", ""))
        nbytes = fields.get("bytes")
        if isinstance(nbytes, int) and nbytes > 0:
            m.transfer_bytes.labels(direction).inc(nbytes)
        m.transfers_done.labels(direction, "failed" if result.startswith("failed") else result).inc()
    if result == "quota":
        m.quota_refusals.inc()


def session_started() -> None:
    if _m is not None:
        _m.sessions.inc()


def session_ended() -> None:
    if _m is not None:
        _m.sessions.dec()


def transfer_started() -> None:
    if _m is not None:
        _m.transfers.inc()


def transfer_ended() -> None:
    if _m is not None:
        _m.transfers.dec()


@contextlib.contextmanager
def store_timer(op: str) -> Iterator[None]:
    """Time a store call (in whatever thread it runs); failures are timed too."""
    if _m is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        _m.store_seconds.labels(op).observe(time.perf_counter() - start)


async def watch_loop_lag() -> None:
    """Until cancelled: how late a LAG_INTERVAL timer fires is how long the loop was held."""
    if _m is None:
        return
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(LAG_INTERVAL)
        _m.loop_lag.set(max(0.0, loop.time() - start - LAG_INTERVAL))


# -- HTTP -----------------------------------------------------------------------------------------

def serve(host: str, port: int, health: Callable[[], str | None]) -> tuple[Any, int]:
    """Serve ``/metrics`` (also ``/``) and ``/healthz`` from a daemon thread; returns (server, port).

    `health` runs in the HTTP thread and returns None when healthy, else the reason (503). In
    multiprocess mode the metrics of every worker are summed from PROMETHEUS_MULTIPROC_DIR.
    """
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/healthz":
            with store_timer("check"):
                problem = health()
            status = "200 OK" if problem is None else "503 Service Unavailable"
            body = b"ok\n" if problem is None else f"unhealthy: {problem}\n".encode()
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not log lines
            pass

    server_class: type[ThreadingWSGIServer] = ThreadingWSGIServer
    if ":" in host:
        class _V6(ThreadingWSGIServer):
            address_family = socket.AF_INET6
        server_class = _V6
    global _httpd
    _httpd = make_server(host, port, app, server_class, handler_class=_Quiet)
    thread = threading.Thread(target=_httpd.serve_forever, name="sshfiles-metrics", daemon=True)
    thread.start()
    return _httpd, _httpd.server_port


_httpd: Any = None


def close_inherited_server() -> None:
    """In a forked worker: close the supervisor's HTTP socket (only the supervisor serves it)."""
    global _httpd
    if _httpd is not None:
        with contextlib.suppress(OSError):
            _httpd.socket.close()
        _httpd = None


def mark_dead(pid: int) -> None:
    """A worker ended: drop its live gauges (multiprocess mode; its counters stay in the sums)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
