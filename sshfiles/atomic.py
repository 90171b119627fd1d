"""Atomic uploads: the names, the bookkeeping and the start-up cleanup of upload temporaries.

Why: automation that watches an upload directory must never pick up a half-written file.  In
the atomic modes a file opened for writing as a new or replaced file is written under a
temporary name in the same directory and renamed onto its name when the handle closes
successfully; until then the name shows the old file (or nothing).  The temporary lives in
the same directory so the rename is one atomic ``rename(2)`` on one filesystem, and so its
bytes and its entry are charged to the same owner as the final file would be.

Temporaries are named ``.sshfiles-upload-...`` (`RESERVED_PREFIX`): the jail hides that
prefix from clients (no lookup, listing, create or rename can reach it), so a client can
neither see an upload in progress nor forge or clobber one.  Two forms:

* ``.sshfiles-upload-t<16 hex>-<name>`` -- mode ``atomic``: a fresh random name per upload
  (two concurrent uploads of one name each write their own; the last to close wins).  A failed
  or interrupted upload removes it.  Left over by a crash, it is removed at the next start.
* ``.sshfiles-upload-p-<name>`` -- mode ``atomic-resume``: one *partial* per target name, kept
  after a failed or interrupted upload so that a re-opened upload continues it.  While no
  file exists under the name, the name stands for its partial for this user's stat and opens
  (what resuming clients do: stat for the size, open without TRUNC, write from there).
  Partials older than `PARTIAL_MAX_AGE` are removed at the next start.

Names too long to take the prefix use a hash of the name instead (``...p-h<sha256>``).

This module only names and books; `session.UserSession` opens, renames and charges.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MODES", "PARTIAL_MAX_AGE", "RESERVED_PREFIX", "ServerPath", "Upload", "claim", "cleanup_home",
           "cleanup_homes", "parse_mode", "partial_path", "split_name", "temp_path", "unclaim"]

log = logging.getLogger("sshfiles.atomic")

#: Names the server keeps for itself (upload temporaries): invisible to clients (jail.py hides them).
RESERVED_PREFIX = ".sshfiles-upload-"


class ServerPath(bytes):
    """A virtual path the server built itself (a temporary's name): the one kind of path that may
    name a reserved entry in the jail.  Client paths arrive as plain ``bytes``/``str``, never as one."""

MODES = ("standard", "atomic", "atomic-resume")

#: A resumable partial not touched for this long (seconds) is removed at the next `serve` start.
PARTIAL_MAX_AGE = 7 * 86400

_PREFIX = RESERVED_PREFIX.encode()
_RANDOM = _PREFIX + b"t"
_PARTIAL = _PREFIX + b"p-"
_NAME_MAX = 255


def parse_mode(text: str) -> str:
    """An upload mode by name, or ``ValueError`` listing the valid ones."""
    if text not in MODES:
        raise ValueError(f"expected one of {', '.join(MODES)}, got {text!r}")
    return text


def split_name(path: bytes | str) -> tuple[bytes, bytes] | None:
    """A client path as (directory part, last name), lexically; None if it does not name a file
    (empty, '.', '..', a trailing slash) or has a reserved component: such paths take the standard
    route and its errors (for a reserved name: no such file)."""
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else bytes(path)
    if not raw or raw.endswith(b"/") or b"/" + _PREFIX in b"/" + raw:
        return None  # (a client path naming a reserved entry anywhere never leads to a ServerPath)
    head, _, name = raw.rpartition(b"/")
    if name in (b"", b".", b".."):
        return None
    return (head + b"/" if head or raw.startswith(b"/") else b""), name


def _fit(prefix: bytes, name: bytes) -> bytes:
    if len(prefix) + len(name) <= _NAME_MAX:
        return prefix + name
    return prefix + b"h" + hashlib.sha256(name).hexdigest().encode()


def temp_path(path: bytes | str) -> ServerPath | None:
    """A fresh random temporary next to `path` (mode atomic), or None if `path` names no file."""
    parts = split_name(path)
    if parts is None:
        return None
    head, name = parts
    return ServerPath(head + _fit(_RANDOM + secrets.token_hex(8).encode() + b"-", name))


def partial_path(path: bytes | str, owner: str = "") -> ServerPath | None:
    """The one resumable partial of `path` (mode atomic-resume), or None if `path` names no file.

    `owner` (a user name; given in shared folders, where several users upload into one directory)
    makes the partial that user's alone (``...p-u<16 hex>-<name>``): another user's unfinished upload
    must never stand for the name, be read, be continued or block an upload of theirs."""
    parts = split_name(path)
    if parts is None:
        return None
    head, name = parts
    prefix = _PARTIAL
    if owner:
        prefix += b"u" + hashlib.sha256(owner.encode("utf-8", "surrogateescape")).hexdigest()[:16].encode() + b"-"
    return ServerPath(head + _fit(prefix, name))


@dataclass
class Upload:
    """An upload in progress under a temporary name (on its `session.FileHandle`)."""

    temp: ServerPath        # the temporary, as the server names it
    target: bytes | str     # the client's path, renamed onto at a successful close
    resumable: bool         # atomic-resume: kept when the upload fails
    exclusive: bool         # opened with O_EXCL: the final rename must not replace anything
    key: tuple[int, int]    # (st_dev, st_ino) of the temporary


#: Resumable partials some handle of this process is writing: a second writer of the same partial
#: is refused (its writes would interleave).  Random temporaries never need it.
_writing: set[tuple[int, int]] = set()


def claim(key: tuple[int, int]) -> bool:
    """Take a partial for one writer in this process; False if another handle already writes it."""
    if key in _writing:
        return False
    _writing.add(key)
    return True


def unclaim(key: tuple[int, int]) -> None:
    _writing.discard(key)


def cleanup_home(home: str, mode: str, now: float | None = None, max_age: float = PARTIAL_MAX_AGE) -> int:
    """Remove the temporaries a previous run left in `home`; returns how many were removed.

    Runs at `serve` start, before anything listens, so no upload can be in progress.  Random
    temporaries (mode atomic) are never resumable: always removed.  Partials are kept for a user
    in mode atomic-resume unless older than `max_age`, removed otherwise.  The walk never follows
    symlinks.  The caller rescans the user's usage when anything was removed.
    """
    now = time.time() if now is None else now
    removed = 0
    for dirpath, _dirs, files in os.walk(home, followlinks=False):
        for name in files:
            raw = os.fsencode(name)
            if not raw.startswith(_PREFIX):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue
                keep = raw.startswith(_PARTIAL) and mode == "atomic-resume" and now - st.st_mtime < max_age
                if not keep:
                    os.unlink(path)
                    removed += 1
            except OSError as exc:
                log.warning("cannot remove the upload temporary %s: %s", path, exc.strerror or exc)
    return removed


def cleanup_homes(users: Iterable[tuple[str, str, str]]) -> list[str]:
    """`cleanup_home` for every (name, home, effective mode); the names of users whose homes changed."""
    changed = []
    for name, home, mode in users:
        if os.path.isdir(home) and cleanup_home(home, mode):
            changed.append(name)
    return changed
