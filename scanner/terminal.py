"""Text from a guest or a QMP peer, made safe for a terminal.

VM names, QMP error descriptions and HMP text are chosen by whoever runs the VM (and,
through the guest's memory, by the guest). Printed raw, `\\x1b[2J` clears the operator's
screen and worse sequences can retitle or redraw it. Everything kscan prints for a
human goes through `printable`: control characters (C0, DEL, C1) and bidirectional or
zero-width format characters become visible escapes. JSON output needs nothing more:
JSON escapes C0 control characters itself.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

#: A line for a human is cut here (an error message from a peer can be megabytes).
MAX_CHARS = 2000


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, keep_newlines: bool = False, limit: int = MAX_CHARS) -> str:
    """`text` with every control/format character escaped; newlines kept if asked."""
    s = str(text)
    if limit and len(s) > limit:
        s = s[:limit] + f"... [{len(s) - limit} more characters]"
    out = []
    for ch in s:
        if (ch == "\n" and keep_newlines) or ch.isprintable():
            out.append(ch)
        elif unicodedata.category(ch) in ("Zs",):
            out.append(" ")
        else:
            out.append(_escape(ch))
    return "".join(out)
