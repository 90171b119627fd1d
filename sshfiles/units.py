"""Byte sizes as people write them (``500MiB``, ``2GB``, ``unlimited``) and as we print them."""

from __future__ import annotations

import re

__all__ = ["UNLIMITED_WORDS", "format_size", "parse_size"]

UNLIMITED_WORDS = ("unlimited", "none", "off")
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int | None:
    """Bytes for a size; None means unlimited.  Raises ValueError with a readable message."""
    word = text.strip().lower()
    if word in UNLIMITED_WORDS:
        return None
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {text!r}: use bytes or a unit such as 500MiB, 2GiB, 10GB, or 'unlimited'")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
