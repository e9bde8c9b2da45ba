"""Text that came from someone else (a node's error reason, a detail), made safe to log and record.

A node's free text is untrusted: a 5 MB reason with a newline in it once forged a line of the
coordinator's log. `printable` bounds it and escapes every control character, so one reason is always one
short line.
"""

from __future__ import annotations

MAX_CHARS = 300
"""Characters of untrusted text kept; the rest is dropped and its length noted."""


def printable(text: object, limit: int = MAX_CHARS) -> str:
    """`text` as one bounded line: control characters (newlines, escapes, NUL) backslash-escaped."""
    raw = str(text)
    head = raw[:limit]
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in head)
    if len(raw) > limit:
        out += f"... ({len(raw) - limit} more characters)"
    return out
