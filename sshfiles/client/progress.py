"""Progress reporting: tqdm bars on a terminal, one line per file otherwise, nothing with --quiet.

Why three modes: a person at a terminal wants live bars (bytes, rate, ETA, and an overall bar when
several files move); a log or a pipe wants one stable line per file it can grep; a script wants silence
and the exit code. The transfer engine only calls the ``Progress`` interface, so it never cares which.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import IO, Any, Protocol

from tqdm import tqdm


def human(n: float) -> str:
    """Bytes in binary units, short: 0 B, 512 B, 1.5 KiB, 10.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class FileTask(Protocol):
    def advance(self, n: int) -> None: ...
    def reset(self, initial: int) -> None: ...
    def close(self) -> None: ...


class Progress(Protocol):
    """What the transfer engine reports to."""

    def start_file(self, label: str, total: int, initial: int) -> FileTask: ...
    def done(self, line: str) -> None: ...
    def warn(self, line: str) -> None: ...
    def set_overall(self, total_bytes: int, files: int) -> None: ...
    def close(self) -> None: ...


class _NullTask:
    def advance(self, n: int) -> None:
        pass

    def reset(self, initial: int) -> None:
        pass

    def close(self) -> None:
        pass


class QuietProgress:
    """--quiet: warnings and results are suppressed; errors still reach stderr via the CLI."""

    def start_file(self, label: str, total: int, initial: int) -> FileTask:
        return _NullTask()

    def done(self, line: str) -> None:
        pass

    def warn(self, line: str) -> None:
        pass

    def set_overall(self, total_bytes: int, files: int) -> None:
        pass

    def close(self) -> None:
        pass


class PlainProgress(QuietProgress):
    """Not a terminal: one summary line per finished file, warnings on their own line."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr

    def done(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def warn(self, line: str) -> None:
        print(f"warning: {line}", file=self.stream, flush=True)


class _Bar(tqdm):
    """A tqdm bar whose sizes and rate are in the summaries' binary units (``human``).

    tqdm scales the count by ``unit_divisor`` but the rate always by 1000, so its own fields read
    "12.0MiB/28.0MiB, 52.4MB/s" on one line; the bar format uses the fields added here instead.
    """

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        d = super().format_dict
        elapsed = d.get("elapsed") or 0
        rate = d.get("rate") or ((d["n"] - d.get("initial", 0)) / elapsed if elapsed else None)
        d["h_n"] = human(d["n"])
        d["h_total"] = human(d["total"]) if d.get("total") is not None else "?"
        d["h_rate"] = f"{human(rate)}/s" if rate else "? B/s"
        return d


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {h_n}/{h_total} [{elapsed}<{remaining}, {h_rate}]"


class _BarTask:
    def __init__(self, owner: TtyProgress, bar: tqdm) -> None:
        self._owner = owner
        self._bar = bar

    def advance(self, n: int) -> None:
        with self._owner.lock:
            self._bar.update(n)
            if self._owner.overall is not None:
                self._owner.overall.update(n)

    def reset(self, initial: int) -> None:
        with self._owner.lock:
            if self._owner.overall is not None:
                self._owner.overall.update(initial - self._bar.n)
            self._bar.n = initial
            self._bar.refresh()

    def close(self) -> None:
        with self._owner.lock:
            self._bar.close()


class TtyProgress:
    """Terminal: a tqdm bar per file (bytes, rate, ETA) and an overall bar for several files."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.overall: tqdm | None = None

    def _columns(self) -> int:
        # A pty nobody sized (script(1) without a terminal, CI) reports 0x0, and tqdm then hides
        # every bar as "off screen"; fall back to 80x24.
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return 0

    def _bar(self, label: str, total: int, initial: int, position: int | None = None) -> tqdm:
        sized = self._columns() > 0
        return _Bar(total=total, initial=initial, desc=label, unit="B", unit_scale=True,
                    unit_divisor=1024, file=self.stream, leave=False, dynamic_ncols=sized,
                    bar_format=BAR_FORMAT,
                    ncols=None if sized else 80, nrows=None if sized else 24,
                    mininterval=0.1, position=position)

    def set_overall(self, total_bytes: int, files: int) -> None:
        if files > 1 and self.overall is None:
            self.overall = self._bar(f"total ({files} files)", total_bytes, 0, position=0)

    def start_file(self, label: str, total: int, initial: int) -> FileTask:
        with self.lock:
            if self.overall is not None and initial:
                self.overall.update(initial)
            if len(label) > 40:
                label = "…" + label[-39:]
            return _BarTask(self, self._bar(label, total, initial))

    def done(self, line: str) -> None:
        with self.lock:
            tqdm.write(line, file=self.stream)

    def warn(self, line: str) -> None:
        with self.lock:
            tqdm.write(f"warning: {line}", file=self.stream)

    def close(self) -> None:
        if self.overall is not None:
            self.overall.close()
            self.overall = None


def make_progress(quiet: bool, stream: IO[str] | None = None) -> Progress:
    """Pick the mode: quiet, bars when the stream is a terminal, else plain lines."""
    stream = stream or sys.stderr
    if quiet:
        return QuietProgress()
    if stream.isatty():
        return TtyProgress(stream)
    return PlainProgress(stream)


class Timer:
    """Wall time of one transfer, for the summary line's rate."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-6)
