"""sshfiles.malloc_tuning in a fresh interpreter each: a packet-sized buffer comes from the heap
(not a fresh mmap) once the tuning is applied, and freed heap stays with the process instead of
being trimmed, which glibc's defaults do (the module docstring has the measured cost)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sshfiles.malloc_tuning import DEFAULTS_ENV

_PROBE = r"""
import ctypes, json, os, sys
from sshfiles.malloc_tuning import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
applied = keep_freed_memory(os.environ.get(sys.argv[1]))
before = libc.mallinfo2()
held = [bytearray(256 * 1024) for _ in range(64)]      # 16 MiB of packet-sized buffers
during = libc.mallinfo2()
del held
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped_during": during.hblks - before.hblks, "heap_during": during.arena,
                  "heap_after": after.arena}))
"""


def _probe(defaults: bool) -> dict[str, int]:
    env = {DEFAULTS_ENV: "1"} if defaults else {}
    out = subprocess.run([sys.executable, "-c", _PROBE, DEFAULTS_ENV], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, **env}, timeout=60).stdout
    return json.loads(out)


def _has_mallinfo2() -> bool:
    import ctypes
    return hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_packet_buffers_come_from_the_heap_and_stay_after_free() -> None:
    tuned = _probe(defaults=False)
    assert tuned["applied"] is True
    assert tuned["mmapped_during"] == 0                      # no mmap per 256 KiB buffer
    assert tuned["heap_after"] >= 16 * 1024 * 1024            # the freed 16 MiB kept for the next packets


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_the_defaults_env_leaves_glibc_as_it_is() -> None:
    """The comparison the tuning is for: glibc's own settings mmap each 256 KiB buffer and give the
    memory back on free (so the test above would fail without the tuning)."""
    plain = _probe(defaults=True)
    assert plain["applied"] is False
    assert plain["mmapped_during"] >= 32
    assert plain["heap_after"] < 16 * 1024 * 1024
