"""Per-packet cost fixes for asyncssh's transport: now in ``sshfiles.asyncssh_seam`` (item 3).

Kept as a re-export so ``speedups.install()`` keeps working for callers not yet moved to
``asyncssh_seam.install_speedups()``; remove once nothing imports it.
"""

from __future__ import annotations

from .asyncssh_seam import FastChachaCipher, FastChachaEncryption
from .asyncssh_seam import install_speedups as install

__all__ = ["FastChachaCipher", "FastChachaEncryption", "install"]
