"""Run a server under a child subreaper so its whole process tree can be measured and stopped.

    python scripts/_bench_reaper.py -- COMMAND [ARGS...]

Used by ``scripts/bench.py``.  This process marks itself as a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so any process the server leaves behind (sshd's
privilege-separated children, forked workers whose parent died) is re-parented
here instead of to init.  Every descendant that exits is reaped by a process in
this tree, so its CPU time lands in this tree's ``cutime``/``cstime``, and the
bench's "server CPU" (sum of utime+stime+cutime+cstime over the live tree rooted
here) loses nothing.

On SIGTERM/SIGINT/SIGHUP it forwards SIGTERM to every descendant, waits up to
five seconds, then SIGKILLs what is left; it exits once it has no children.
When the main command exits on its own, the rest of the tree is stopped too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_tree(sig: int) -> None:
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        print("reaper: PR_SET_CHILD_SUBREAPER unavailable; orphans go to init", file=sys.stderr)

    def on_signal(signum, frame):
        signal_tree(signal.SIGTERM)
        signal.alarm(5)

    def on_alarm(signum, frame):
        signal_tree(signal.SIGKILL)
        signal.alarm(1)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)

    main_pid = os.fork()
    if main_pid == 0:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)

    status = 0
    while True:
        try:
            pid, wstatus = os.waitpid(-1, 0)  # blocks; retried after signal handlers (PEP 475)
        except ChildProcessError:
            break
        if pid == main_pid:
            status = os.waitstatus_to_exitcode(wstatus)
            on_signal(signal.SIGTERM, None)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
