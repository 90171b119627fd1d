"""Keep freed packet-sized buffers in the process instead of handing them back to the kernel.

Why: every SSH packet of a transfer allocates a few buffers of up to 256 KiB (the received packet,
its plaintext, a READ reply) and frees them a moment later. glibc's defaults give such memory back
at once: blocks above its mmap threshold (128 KiB at start) are munmapped on free, and the top of
the heap is trimmed when more than twice the threshold is free. The next packet then faults fresh
pages in, which the kernel zeroes; on a VM whose balloon reports free pages to the host, the host
must also supply each page again. Measured on the project's 2-core Firecracker VM, one 1 GiB
upload from sshfiles-cli: the server worker spent 3.2-4.1 CPU-s (the plaintext and packet copies
profiled at 40% of its time) with glibc's defaults and 1.23-1.26 s with the settings below; the
upload took 3.9-4.2 s against 2.0-2.1 s (OpenSSH sftp to OpenSSH: 2.4-3.7 s in the same minutes).

The settings: blocks up to MMAP_THRESHOLD come from the heap, and up to TRIM_THRESHOLD of free
heap top is kept. What is kept is at most what the process used at its peak, which the per-session
bounds already limit (README "Limits"); an idle server holds no more than before.
"""

from __future__ import annotations

import ctypes

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Set to any non-empty value, glibc's defaults stay (a benchmark lever: scripts/bench.py --variant).
DEFAULTS_ENV = "SSHFILES_MALLOC_DEFAULTS"
#: Allocations below this come from the heap (a 256 KiB packet and the joins of several).
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the heap's top kept for the next packets instead of trimmed.
TRIM_THRESHOLD = 64 * 1024 * 1024


def keep_freed_memory(defaults: str | None = None) -> bool:
    """Apply the thresholds above to this process's glibc malloc (children forked later inherit
    them), unless ``defaults`` (DEFAULTS_ENV's value) is non-empty. Returns False where nothing was
    changed, also where there is no glibc ``mallopt`` (musl, other systems): only slower there."""
    if defaults:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
