"""Make client-supplied text safe to put in a log line.

Why: file names, user names, exec command lines and error texts that carry
them come from the network.  Written raw, a newline in a file name forges a
whole log line (``login user=victim ... result=ok``), and ESC or C1 bytes
reach the terminal of the admin who runs ``tail -f``.  Every log line that
holds a client-supplied value passes it through `esc` first; `LogSafeFormatter`
is a last line of defence for anything a library logs on its own.

The escaping is reversible and readable: backslash becomes ``\\\\``, the usual
``\\n``, ``\\r``, ``\\t``, other control characters (C0, DEL, C1) become ``\\xNN``,
undecodable bytes (``bytes`` input, or ``str`` carrying surrogate escapes)
become ``\\xNN`` too.  A value that then holds a space, a double quote or an
``=`` is wrapped in double quotes (``"`` inside becomes ``\\"``), so a file named
``a result=ok`` cannot pass for another field of a ``key=value`` line either.
"""

from __future__ import annotations

import logging
import re

__all__ = ["LogSafeFormatter", "esc"]

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 controls, DEL, C1 controls, lone surrogates (undecodable bytes under surrogateescape),
# and the Unicode line/paragraph separators some terminals and viewers treat as newlines.
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NEEDS_QUOTES = re.compile('[ "=]')


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte carried by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def esc(value: object, quote: bool = True) -> str:
    """`value` as one printable, unambiguous log token (see the module docstring).

    ``quote=False`` skips the double quotes, for formats that delimit values themselves (JSON)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    if _UNSAFE.search(text) is not None:  # most values are plain: no copy for them
        text = _UNSAFE.sub(_escape_char, text)
    if quote and (not text or _NEEDS_QUOTES.search(text)):
        text = '"' + text.replace('"', '\\"') + '"'
    return text


class LogSafeFormatter(logging.Formatter):
    """Escapes control characters left in a record's message (never its traceback).

    Our own lines already pass client text through `esc`, so they hold none; this
    catches text another library (asyncssh) logs on its own.  Backslashes are left
    alone here, so an already escaped value is not escaped twice.
    """

    _CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = self._CONTROL.sub(_escape_char, record.message)
        return super().formatMessage(record)
