"""Record a server with py-spy during a workload and summarise where the time goes.

    python scripts/_bench_profile.py summary PROFILE.txt [--top 25]

``PROFILE.txt`` is py-spy's ``--format raw`` output (collapsed stacks: ``frame;frame;... count``).
The summary lists the functions with the most samples at the top of the stack ("self"), the
ones present anywhere on the stack ("inclusive"), and self time grouped by source file, each as a
percentage of all samples.  ``scripts/bench.py --profile DIR`` uses ``Recorder`` and writes a raw
profile plus a ``-summary.txt`` per profiled transfer.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _parse(path: Path) -> tuple[list[tuple[list[str], int]], int]:
    stacks, total = [], 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        stacks.append((frames, int(count)))
        total += int(count)
    return stacks, total


def _file_of(frame: str) -> str:
    m = _FRAME.match(frame)
    return m.group("file") if m else frame


def _name_of(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    return f"{m.group('func')} ({m.group('file')})"


# Leaf frames of threads that are waiting, not working (py-spy cannot always tell): pool workers
# blocked on their queue, the event loop in epoll, the bench's reaper in waitpid.
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py)", "EpollSelector.select (selectors.py)",
               "wait (threading.py)", "main (_bench_reaper.py)", "select (selectors.py)")


# Coarse buckets for the leaf frame, first match wins: where a transfer's server time goes.
CATEGORIES = (
    ("cipher + MAC (per SSH packet)", ("crypto/chacha.py", "FastChacha", "cryptography/", "<frozen abc>", "crypto/cipher.py",
                                      "crypto/umac.py", "encryption.py", "hmac.py")),
    ("socket send/recv (syscalls, incl. loopback delivery)", ("_SelectorSocketTransport.write",
                                                             "_read_ready__data_received")),
    ("file I/O in the SFTP verbs (pread/pwrite)", ("JailedSFTPServer.read", "JailedSFTPServer.write")),
    ("SFTP protocol (asyncssh/sftp.py, sshfiles/sftp.py)", ("asyncssh/sftp.py", "sshfiles/sftp.py")),
    ("quota, jail, logging in sshfiles", ("sshfiles/",)),
    ("SSH packet/channel framing (asyncssh)", ("asyncssh/",)),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
)


def categorize(path: Path) -> str:
    stacks, _total_all = _parse(path)
    stacks = [(f, n) for f, n in stacks if f and _name_of(f[-1]) not in IDLE_LEAVES]
    total = sum(n for _, n in stacks) or 1
    counts: collections.Counter = collections.Counter()
    for frames, n in stacks:
        leaf = _name_of(frames[-1])
        for name, keys in CATEGORIES:
            if any(k in leaf for k in keys):
                counts[name] += n
                break
        else:
            counts["other"] += n
    out = [f"\n## busy time by category ({path.name})"]
    out += [f"{100 * n / total:6.1f}%  {name}" for name, n in counts.most_common()]
    return "\n".join(out) + "\n"


def summarize(path: Path, top: int = 25) -> str:
    stacks, total_all = _parse(path)
    idle = sum(n for frames, n in stacks if frames and _name_of(frames[-1]) in IDLE_LEAVES)
    stacks = [(f, n) for f, n in stacks if f and _name_of(f[-1]) not in IDLE_LEAVES]
    total = total_all - idle
    if not total:
        return f"{path.name}: no busy samples\n"
    self_t: collections.Counter = collections.Counter()
    incl_t: collections.Counter = collections.Counter()
    by_file: collections.Counter = collections.Counter()
    for frames, n in stacks:
        if not frames:
            continue
        leaf = frames[-1]
        self_t[_name_of(leaf)] += n
        by_file[_file_of(leaf)] += n
        for name in {_name_of(f) for f in frames}:
            incl_t[name] += n
    out = [f"{path.name}: {total} busy samples (percentages below), {idle} idle-wait samples dropped "
           f"({100 * idle / max(total_all, 1):.0f}% of {total_all})"]
    for title, counter in (("self (top of stack)", self_t), ("inclusive (anywhere on stack)", incl_t),
                           ("self by source file", by_file)):
        out.append(f"\n## {title}")
        for name, n in counter.most_common(top):
            out.append(f"{100 * n / total:6.1f}%  {name}")
    return "\n".join(out) + "\n" + categorize(path)


class Recorder:
    """py-spy record of a process tree for the duration of a ``with`` block."""

    def __init__(self, pid: int, raw_out: Path, rate: int = 200, native: bool = False,
                 gil: bool = False) -> None:
        self.pid, self.raw_out, self.rate, self.native, self.gil = pid, raw_out, rate, native, gil
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("py-spy") is not None

    def __enter__(self) -> Recorder:
        argv = ["py-spy", "record", "--pid", str(self.pid), "--subprocesses", "--format", "raw",
                "--function", "--rate", str(self.rate), "-o", str(self.raw_out)]
        if self.native:
            argv.append("--native")
        if self.gil:  # only samples holding the GIL: Python work, not syscalls or waiting for a CPU
            argv.append("--gil")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import time
        time.sleep(1.0)  # let py-spy attach before the workload starts
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.raw_out.exists():
            self.raw_out.with_name(self.raw_out.stem + "-summary.txt").write_text(summarize(self.raw_out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary")
    s.add_argument("profile")
    s.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    sys.stdout.write(summarize(Path(args.profile), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
