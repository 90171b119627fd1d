"""Shared (virtual) folders: where a user's virtual path leads, and the rules that apply there.

Pure Python with no I/O: the session (session.py) owns one child session per mount (its own jail
on the folder's directory, the folder's ledger, these rules) and asks this module which one a path
belongs to.  Routing is on the lexically normalised path (`jail.normalize`): a mount is a name in the
user's tree, not a directory on disk, so no symlink in the home can lead into a folder, and inside a
folder the folder's own jail (openat2, RESOLVE_IN_ROOT) keeps every symlink and ``..`` in it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from .permissions import PermissionRules

__all__ = ["FolderMount", "ancestor_names", "holds_mount", "mount_rules", "route"]

T = TypeVar("T")


@dataclass(frozen=True)
class FolderMount:
    """One mount as a session opens it: the folder's host directory, its ledger key, the user's perms."""

    vpath: str        # normalised, never "/"
    folder: str
    path: str         # host directory (the folder's jail root)
    ledger: str       # stores.folder_ledger(folder)
    perms: frozenset[str]


def route(mounts: Mapping[str, T], npath: str) -> tuple[T, str] | None:
    """(the mount's value, the path inside the folder) for a normalised virtual path under a mount."""
    for vpath, value in mounts.items():
        if npath == vpath:
            return value, "/"
        if npath.startswith(vpath + "/"):
            return value, npath[len(vpath):]
    return None


def holds_mount(mounts: Iterable[str], npath: str) -> bool:
    """Whether `npath` is a mount point or a directory above one (removing or renaming it would
    take a mount with it, so the session refuses)."""
    prefix = "/" if npath == "/" else npath + "/"
    return any(vpath == npath or vpath.startswith(prefix) for vpath in mounts)


def ancestor_names(mounts: Iterable[str], npath: str) -> dict[str, str | None]:
    """The names a listing of directory `npath` shows for mounts below it: name -> the mount's
    vpath when the mount itself is that entry, None when the entry is a directory on the way to one."""
    prefix = "/" if npath == "/" else npath + "/"
    out: dict[str, str | None] = {}
    for vpath in mounts:
        if vpath.startswith(prefix):
            rest = vpath[len(prefix):]
            name = rest.split("/", 1)[0]
            if name == rest:
                out[name] = vpath
            else:
                out.setdefault(name, None)
    return out


def mount_rules(user_rules: PermissionRules, vpath: str, perms: frozenset[str]) -> PermissionRules:
    """The rules inside a mount, in the folder's own paths ("/" = the mount point): the mount's
    perms act as a rule at `vpath` would, and the user's rules below `vpath` still override them."""
    rules: dict[str, frozenset[str]] = {"/": perms}
    prefix = vpath + "/"
    for path, p in user_rules.rules.items():
        if path.startswith(prefix):
            rules[posixpath.normpath("/" + path[len(prefix):])] = p
    return PermissionRules(user_rules.rev, rules)
