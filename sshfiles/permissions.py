"""Per-user, per-directory permissions: the vocabulary, parsing and the one lookup rule.

Pure Python with no I/O, so the store (to validate what it keeps), the CLI (to parse what an admin
types) and the session (to decide) share one definition, and the rules have fast unit tests.

The vocabulary is SFTPGo's, so admins can carry their configurations over: ``list``, ``download``,
``upload``, ``overwrite``, ``delete``, ``rename``, ``create_dirs``, ``chmod``, ``chtimes`` and ``*``
for all of them.  A user's rules map virtual directories ("/" is the home) to permission sets; a
directory's rule governs the entries inside it and everything below, until a deeper rule overrides
it (the deeper rule replaces, it does not add).  A user without rules has ``*`` everywhere, which is
what sshfiles did before permissions existed.  Deleting and renaming do not distinguish files from
directories: no client workflow we know needs it, and one flag each is easier to audit.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "ALL",
    "PERMISSIONS",
    "PRESETS",
    "PermissionRules",
    "allowed",
    "effective",
    "format_perms",
    "governs",
    "normalize_rule_path",
    "parse_perms",
]

#: Every permission, in the order `format_perms` writes them.
PERMISSIONS: tuple[str, ...] = ("list", "download", "upload", "overwrite", "delete", "rename", "create_dirs",
                                "chmod", "chtimes")
ALL = "*"
_ALL_SET = frozenset({ALL})
#: What `user add --read-only` / `--upload-only` set on "/".
PRESETS: dict[str, frozenset[str]] = {
    "read-only": frozenset({"list", "download"}),
    "upload-only": frozenset({"upload"}),
}

Rules = Mapping[str, frozenset[str]]


def parse_perms(text: str | Iterable[str]) -> frozenset[str]:
    """``"list,download"`` (or an iterable of words) -> a permission set; ValueError names a bad word.

    ``*`` anywhere means everything; ``none`` alone (or an empty iterable) means nothing: a rule that
    closes a directory.
    """
    words = text.split(",") if isinstance(text, str) else list(text)
    items = {w.strip().lower() for w in words if w.strip()}
    if not items and not isinstance(text, str):
        return frozenset()
    if not items:
        raise ValueError("no permissions given: use a comma-separated list of "
                         f"{', '.join(PERMISSIONS)}, '*' for all, or 'none'")
    if items == {"none"}:
        return frozenset()
    unknown = sorted(items - set(PERMISSIONS) - {ALL})
    if unknown:
        raise ValueError(f"unknown permission {unknown[0]!r}: use {', '.join(PERMISSIONS)}, '*' for all, "
                         "or 'none'")
    return _ALL_SET if ALL in items else frozenset(items)


def format_perms(perms: Iterable[str]) -> str:
    """The canonical text of a permission set ("*", "none", or the words in vocabulary order)."""
    perms = set(perms)
    if ALL in perms:
        return ALL
    return ",".join(p for p in PERMISSIONS if p in perms) or "none"


def normalize_rule_path(path: str) -> str:
    """A rule's directory as stored: absolute, no ``.`` or empty parts, no trailing slash.

    ``..`` is refused rather than resolved: a rule must say plainly which directory it is about.
    """
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError("invalid path: give a directory inside the home, e.g. / or /uploads")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise ValueError(f"invalid path {path!r}: '..' is not allowed in a permission path")
    return "/" + "/".join(parts)


def _governing(rules: Rules, directory: str) -> str | None:
    """The deepest rule path at or above `directory` (a normalised virtual path), if any."""
    d = directory
    while True:
        if d in rules:
            return d
        if d == "/":
            return None
        d = posixpath.dirname(d)


def effective(rules: Rules, directory: str) -> frozenset[str]:
    """The permissions that apply inside `directory` (a normalised virtual path)."""
    at = _governing(rules, directory)
    return _ALL_SET if at is None else rules[at]


def allowed(rules: Rules, directory: str, perm: str) -> bool:
    """Whether `perm` is granted inside `directory`: by its own rule or the nearest one above."""
    perms = effective(rules, directory)
    return ALL in perms or perm in perms


def governs(rules: Rules, path: str) -> bool:
    """Whether some rule is about `path` or a directory below it (moving `path` would move that rule's
    meaning onto other files, so the session refuses to rename such a directory)."""
    if path == "/":
        return bool(rules)
    prefix = path + "/"
    return any(r == path or r.startswith(prefix) for r in rules)


@dataclass
class PermissionRules:
    """One user's rules as a server process holds them, with the store's revision they came from.

    A session reads `rules` at every operation; the server's watcher replaces them (one assignment,
    on the event loop) when the store's revision changes, so a change applies at the next operation.
    """

    rev: int = 0
    rules: dict[str, frozenset[str]] = field(default_factory=dict)
    #: False for a user with ``*`` everywhere: the session then skips every check (decided once here,
    #: not per operation; the rules are never changed in place, only replaced).
    restricted: bool = field(init=False)

    def __post_init__(self) -> None:
        self.restricted = any(ALL not in p for p in self.rules.values())
