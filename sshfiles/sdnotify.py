"""systemd's readiness protocol (``Type=notify``), in a few lines instead of a dependency.

Why: with ``Type=notify`` systemd starts units ordered after sshfiles only once it really listens, and
``systemctl stop`` shows "deactivating" while it drains. The protocol is one datagram per message to
the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (``@name`` is the abstract namespace); without that
variable (not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify"]


def notify(*lines: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``STATUS=...`` lines; True if a notify socket took them.

    Never raises: a broken notify socket must not stop the server (systemd then times the start out).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False
    return True
