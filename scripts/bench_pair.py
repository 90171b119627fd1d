#!/usr/bin/env python3
"""Paired A/B of sshfiles server configurations: server CPU per stock-sftp transfer.

``scripts/bench.py`` opens a fresh session per transfer and reads CPU in 10 ms ticks; on a shared
machine its per-repetition ratios between two variants swing by far more than a 5% lever. Here every
configuration runs as its own server, started once, with one logged-in stock ``sftp`` session each;
transfers are rotated between them (each always after another configuration, never after itself) and
each transfer's server CPU is the sum of its threads' run time (``/proc/PID/task/*/schedstat``, ns),
so load drifts hit all sides alike and the paired ratios are what to read.

    python scripts/bench_pair.py --size 64 --reps 30 off=3h,3i on=
    # LABEL=SWITCH: SWITCH is SSHFILES_NO_SPEEDUPS for that server (empty: every item on)

Loopback only; a benchmark, not a test (no test asserts on its numbers). Needs OpenSSH's sftp.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import make_server  # noqa: E402  (the tests' server launcher, reused)


def cpu_ns(pid: int) -> int:
    """Run time of all of a process's threads so far, in ns."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except OSError:  # a thread that just ended
            pass
    return total


class Side:
    """One server configuration with one logged-in stock sftp session."""

    def __init__(self, label: str, switch: str, size: int, root: Path, keys: Path) -> None:
        self.label = label
        tmp = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
        self.server = make_server(tmp, keys)
        user = self.server.add_user("pair", key=True)
        saved = os.environ.get("SSHFILES_NO_SPEEDUPS")
        os.environ["SSHFILES_NO_SPEEDUPS"] = switch
        try:
            self.server.start()
        finally:
            if saved is None:
                os.environ.pop("SSHFILES_NO_SPEEDUPS")
            else:
                os.environ["SSHFILES_NO_SPEEDUPS"] = saved
        (tmp / "src.bin").write_bytes(os.urandom(size))
        shutil.copy(tmp / "src.bin", user.home / "down.bin")
        assert user.key_path is not None
        cmd = ["sftp", "-P", str(self.server.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
               "-i", str(user.key_path), *self.server.ssh_opts(), f"{user.name}@127.0.0.1"]
        self.client = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, cwd=tmp, bufsize=0)
        self.marks = 0
        self.command("pwd")  # logged in before anything is measured
        assert self.server.proc is not None
        self.pid = self.server.proc.pid

    def command(self, line: str) -> None:
        """Run one sftp command and wait until it is done (an echoed mark follows it)."""
        assert self.client.stdin is not None and self.client.stdout is not None
        self.marks += 1
        mark = f"MARK{self.marks}\n".encode()
        self.client.stdin.write(f"{line}\n!echo MARK{self.marks}\n".encode())
        seen = b""
        while mark not in seen:
            chunk = os.read(self.client.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"sftp to {self.label} ended: {seen[-500:]!r}")
            seen = seen[-4096:] + chunk

    def transfer(self, direction: str) -> float:
        """Server CPU seconds of one put or get."""
        before = cpu_ns(self.pid)
        self.command("put src.bin up.bin" if direction == "upload" else "get down.bin back.bin")
        return (cpu_ns(self.pid) - before) / 1e9

    def close(self) -> None:
        assert self.client.stdin is not None
        self.client.stdin.close()
        self.client.wait(30)
        self.server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="MiB per transfer (default 64)")
    p.add_argument("--reps", type=int, default=20, help="transfers per side and direction (default 20)")
    p.add_argument("sides", nargs="+", metavar="LABEL=SWITCH")
    args = p.parse_args()
    if not shutil.which("sftp"):
        raise SystemExit("OpenSSH's sftp client is needed")
    size = args.size << 20
    root = Path(tempfile.mkdtemp(prefix="sshfiles-pair-"))
    keys = root / "hostkeys"
    subprocess.run([sys.executable, "-c", "from pathlib import Path; from sshfiles.server import ensure_host_keys;"
                    f"ensure_host_keys(Path({str(keys)!r}))"], check=True, timeout=120, cwd=REPO)
    sides = [Side(*spec.split("=", 1), size, root, keys) for spec in args.sides]
    try:
        for direction in ("upload", "download"):
            cpu: dict[str, list[float]] = {s.label: [] for s in sides}
            for _ in range(args.reps):
                for side in sides:
                    cpu[side.label].append(side.transfer(direction) / (size / 2**30))
            ref = sides[0].label
            for side in sides:
                v = cpu[side.label]
                ratios = [a / b for a, b in zip(v, cpu[ref], strict=True)]
                print(f"{direction:8s} {side.label:10s} CPU s/GiB median {statistics.median(v):.3f} "
                      f"min {min(v):.3f}  ratio to {ref}: median {statistics.median(ratios):.3f} "
                      f"({sum(r < 1 for r in ratios)}/{len(ratios)} below 1)", flush=True)
    finally:
        for side in sides:
            side.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
