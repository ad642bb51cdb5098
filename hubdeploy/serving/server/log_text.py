"""Client-controlled text made safe for one log line.

A request path is URL-decoded before it reaches the app, so `GET /x%0aphase:%20ready` would
put a line of the client's choosing into the log (and `%1b[...` a terminal escape). Every
client-controlled string a log line carries goes through `printable` first.
"""
from __future__ import annotations

import re

# C0/C1 controls (newline, CR, ESC...), DEL, the backslash (so that escapes stay unambiguous),
# Unicode line/paragraph separators and the invisible direction/format marks
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\\\\\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    if c == "\\":
        return "\\\\"
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, limit: int = 300) -> str:
    """`text` with control and line-breaking characters escaped (`\\x0a`), cut at `limit` characters."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return _UNSAFE.sub(_escape, text)
