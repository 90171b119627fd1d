"""The audit log: one call per state-changing operation, one line (or JSON object) per event.

Why one small API: a sysadmin follows one user through the log (``grep conn=ID`` or ``jq 'select(.user
== "alice")'``), which only works if every event carries the same fields under the same names, whichever
layer emits it. So session.py (the policy layer: mkdir, rmdir, remove, rename, setstat, refusals,
transfers) and server.py (logins, exec commands, bans) call `event`, and so will permissions and hooks.

Every event has ``event`` (its name), ``user``, ``source`` (``address:port``) and ``conn`` (the
connection id) when known, the event's own fields in the order given, and usually ``result``: ``ok``,
``denied`` (permissions), ``quota``, ``interrupted`` (transfers the connection ended) or ``failed:
REASON``; refusals add ``error`` (the message the client got). Paths are virtual (as the user sees
them), never host paths.

In text format an event is ``NAME user=U source=S field=value ... conn=C`` with every client-supplied
value passed through `logsafe.esc` (nothing can forge a field or a line); in JSON format
(`JsonFormatter`) the same fields are keys of one object per line. The JSON field names are part of the
interface (README "Logs and audit").
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys
import threading
from typing import Any, Protocol

from . import metrics
from .logsafe import LogSafeFormatter, esc

__all__ = ["Actor", "JsonFormatter", "ReopenableFileHandler", "configure", "event", "reopen"]

log = logging.getLogger("sshfiles.audit")

#: Text format of every record (the fail2ban filter in contrib/ relies on it).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class Actor(Protocol):
    """Who did it: a `UserSession`, or anything with the same three attributes."""

    @property
    def username(self) -> str: ...

    @property
    def peer(self) -> str: ...

    @property
    def conn_id(self) -> str: ...


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return esc(value)


def _json_value(value: object) -> object:
    """Numbers stay numbers; text is escaped like the text format but never quoted (JSON quotes it)."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    return esc(value, quote=False)


def event(name: str, who: Actor | None = None, /, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one audit event.

    `who` supplies ``user``, ``source`` and ``conn`` (explicit keyword arguments win, and a None value
    leaves the field out); the other keyword arguments follow in their order, values raw: they are
    escaped here, once, for the format in use.
    """
    ordered: dict[str, object] = {}
    user = fields.pop("user", who.username if who is not None else None)
    source = fields.pop("source", who.peer if who is not None else None)
    conn = fields.pop("conn", who.conn_id if who is not None else None)
    if user is not None:
        ordered["user"] = user
    if source is not None:
        ordered["source"] = source
    ordered.update((k, v) for k, v in fields.items() if v is not None)
    if conn is not None:
        ordered["conn"] = conn
    metrics.observe(name, ordered)
    if not log.isEnabledFor(level):
        return
    log.log(level, _Line(name, ordered), extra={"audit": {"event": name, **ordered}})


class _Line:
    """An event's text line, built only if a text formatter asks (JSON output never does)."""

    __slots__ = ("fields", "name")

    def __init__(self, name: str, fields: dict[str, object]) -> None:
        self.name, self.fields = name, fields

    def __str__(self) -> str:
        return " ".join([self.name, *(f"{k}={_text(v)}" for k, v in self.fields.items())])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC ISO 8601), ``level``, ``logger``, ``pid``, then the
    audit event's fields, or ``msg`` for other records (tracebacks in ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            out.update((k, _json_value(v)) for k, v in fields.items())
        else:
            out["msg"] = esc(record.getMessage(), quote=False)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True)


class ReopenableFileHandler(logging.StreamHandler):
    """Appends to a file; `reopen` (on SIGHUP) starts a new file at the same path, for logrotate.

    Opened with O_APPEND, so the workers of ``--workers N`` (each with its own handler on the same
    path) never overwrite each other's lines.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> Any:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1)

    def reopen(self) -> None:
        new = self._open()  # first: a failure leaves the old file in use
        self.acquire()
        try:
            old = self.setStream(new)
        finally:
            self.release()
        if old is not None:
            old.close()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
        finally:
            self.release()
        super().close()


_lock = threading.Lock()


def _our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_sshfiles", False)]


def configure(log_format: str = "text", log_file: str = "") -> None:
    """Install (or replace) the one handler of the process: stderr or `log_file`, text or JSON.

    Called at start and again on SIGHUP with possibly new settings; our lines escape every client
    value themselves, `LogSafeFormatter` catches what a library logs raw.
    """
    handler: logging.Handler = ReopenableFileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else LogSafeFormatter(TEXT_FORMAT))
    handler._sshfiles = True  # type: ignore[attr-defined]
    handler._sshfiles_key = (log_format, log_file)  # type: ignore[attr-defined]
    root = logging.getLogger()
    with _lock:
        old = _our_handlers()
        if old and all(getattr(h, "_sshfiles_key", None) == (log_format, log_file) for h in old):
            handler.close()
            return
        root.addHandler(handler)
        for h in old:
            root.removeHandler(h)
            if isinstance(h, ReopenableFileHandler):
                h.close()
    root.setLevel(logging.INFO)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def reopen() -> bool:
    """Reopen the log file (logrotate moved it away); False when logging to stderr (nothing to do)."""
    done = False
    for h in _our_handlers():
        if isinstance(h, ReopenableFileHandler):
            h.reopen()
            done = True
    return done
