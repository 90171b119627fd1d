"""Hooks: the admin's command run after an upload, download, delete or rename completes.

Why this shape: a hook is the admin's code reacting to a user's action (move a finished upload
into processing, notify, scan), and it must never cost the user anything.  So:

* It runs only after the operation completed (the session fires it, session.py), with the facts
  in environment variables, never on a command line and never through a shell: the argv comes
  from ``shlex.split`` of the configured command, once, at start.
* `HookRunner.fire` only puts the event on a bounded queue (``put_nowait``) and returns: the event
  loop never waits for a hook.  `HOOK_WORKERS` threads take events off the queue and run each
  hook with a timeout (``--hook-timeout``); a hook still running then is killed with its whole
  process group.  A full queue (`HOOK_QUEUE` events waiting) drops the event with a log line
  (at most one per second, with the count): memory and threads stay bounded whatever the flood.
* The hook's output (stdout and stderr together) goes to the log, escaped and cut to
  `MAX_OUTPUT` bytes; the rest is read and thrown away so a chatty hook cannot block on its pipe.

Environment of a hook: ``PATH``, ``HOME``, ``LANG``, ``LC_ALL`` and ``TZ`` from the server's, plus
``SSHFILES_EVENT`` (upload, download, delete, rename), ``SSHFILES_USER``, ``SSHFILES_PATH`` (the
virtual path, ``/`` = the user's home), ``SSHFILES_HOST_PATH``, ``SSHFILES_TARGET`` and
``SSHFILES_HOST_TARGET`` (renames: the new name), ``SSHFILES_BYTES`` (bytes transferred by the
handle; 0 for delete and rename), ``SSHFILES_RESULT`` (``ok``: hooks fire only for operations that
completed) and ``SSHFILES_REMOTE_ADDR`` (the client's address:port).
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .logsafe import esc

__all__ = ["EVENTS", "HOOK_QUEUE", "HOOK_WORKERS", "MAX_OUTPUT", "HookEvent", "HookRunner", "parse_command"]

log = logging.getLogger("sshfiles.hooks")

EVENTS = ("upload", "download", "delete", "rename")
#: Hooks running at once per server process, and events that may wait for one.
HOOK_WORKERS = 4
HOOK_QUEUE = 256
#: Bytes of a hook's output that reach the log.
MAX_OUTPUT = 2048
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")


def parse_command(text: str) -> list[str]:
    """A hook command as argv (shell-like quoting, no shell); ``ValueError`` if it cannot be split."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot split {text!r} into arguments: {exc}") from None


@dataclass(frozen=True)
class HookEvent:
    """The facts of one completed operation."""

    event: str
    user: str
    path: str
    host_path: str
    nbytes: int
    remote_addr: str
    target: str = ""
    host_target: str = ""
    result: str = "ok"

    def env(self) -> dict[str, str]:
        env = {k: v for k in _PASSED_ENV if (v := os.environ.get(k)) is not None}
        env.update(SSHFILES_EVENT=self.event, SSHFILES_USER=self.user, SSHFILES_PATH=self.path,
                   SSHFILES_HOST_PATH=self.host_path, SSHFILES_BYTES=str(self.nbytes),
                   SSHFILES_RESULT=self.result, SSHFILES_REMOTE_ADDR=self.remote_addr)
        if self.event == "rename":
            env.update(SSHFILES_TARGET=self.target, SSHFILES_HOST_TARGET=self.host_target)
        return env


class HookRunner:
    """Runs the configured hooks off the event loop: a bounded queue and a bounded pool of threads."""

    def __init__(self, commands: Mapping[str, str], timeout: float, workers: int = HOOK_WORKERS,
                 queue_size: int = HOOK_QUEUE) -> None:
        self._argv = {event: argv for event, cmd in commands.items() if cmd and (argv := parse_command(cmd))}
        self.timeout = timeout
        self._workers = workers
        self._queue: queue.Queue[HookEvent | None] = queue.Queue(queue_size)
        self._threads: list[threading.Thread] = []
        self._dropped = 0
        self._drop_logged = 0.0

    def wants(self, event: str) -> bool:
        """Whether a hook is configured for `event` (the session gathers facts only then)."""
        return event in self._argv

    def fire(self, ev: HookEvent) -> bool:
        """Queue a hook run without waiting; False (and a log line) if the queue is full."""
        if ev.event not in self._argv:
            return False
        try:
            self._queue.put_nowait(ev)
        except queue.Full:
            self._dropped += 1
            now = time.monotonic()
            if now - self._drop_logged >= 1.0:
                log.warning("hook queue full (%d waiting): dropped %d %s event(s), latest user=%s path=%s",
                            self._queue.maxsize, self._dropped, ev.event, esc(ev.user), esc(ev.path))
                self._dropped = 0
                self._drop_logged = now
            return False
        if len(self._threads) < self._workers and self._queue.qsize() > 0:
            t = threading.Thread(target=self._work, name=f"sshfiles-hook-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
        return True

    def close(self, wait: float = 5.0) -> None:
        """At shutdown: drop the events still queued (logged with their count), let the workers finish the
        hooks they run for at most `wait` seconds in all; a hook still running then is left to finish."""
        dropped = 0
        while True:
            try:
                if self._queue.get_nowait() is not None:
                    dropped += 1
            except queue.Empty:
                break
        if dropped:
            log.warning("shutting down: %d queued hook run(s) dropped", dropped)
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)  # the queue was just emptied, and only the loop fills it
            except queue.Full:
                break
        deadline = time.monotonic() + wait
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while True:
            ev = self._queue.get()
            if ev is None:
                return
            try:
                self._run(self._argv[ev.event], ev)
            except Exception as exc:  # a hook must never take its worker down
                log.error("hook event=%s user=%s path=%s failed: %s", ev.event, esc(ev.user), esc(ev.path),
                          esc(exc))

    def _run(self, argv: list[str], ev: HookEvent) -> None:
        """Run one hook to its end or its timeout, keeping the first MAX_OUTPUT bytes of its output."""
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=ev.env(), close_fds=True, start_new_session=True, cwd="/")
        except OSError as exc:
            log.warning("hook event=%s user=%s path=%s result=cannot-start (%s)", ev.event, esc(ev.user),
                        esc(ev.path), esc(exc.strerror or exc))
            return
        assert proc.stdout is not None
        out = bytearray()
        killed = False
        deadline = started + self.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    killed = True
                    break
                if not sel.select(min(left, 1.0)):
                    continue  # (a hook that exited may have left a child holding the pipe: the deadline holds)
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                if len(out) < MAX_OUTPUT:
                    out += chunk[:MAX_OUTPUT - len(out)]
        if killed:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.stdout.close()
        try:
            status = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
            killed = True
        seconds = time.monotonic() - started
        if killed:
            result = f"killed after the {self.timeout:g} s timeout"
        elif status == 0:
            result = "ok"
        else:
            result = f"exit {status}" if status > 0 else f"signal {-status}"
        text = out.decode("utf-8", "replace").strip()
        level = logging.INFO if result == "ok" else logging.WARNING
        log.log(level, "hook event=%s user=%s path=%s result=%s seconds=%.3f%s", ev.event, esc(ev.user),
                esc(ev.path), result, seconds, f" output={esc(text)}" if text else "")
