"""Text from outside (the service, manifests) made safe to show and to store.

Whatever RunningHub answers can reach a terminal, a log line or a results file. A carriage return
can overwrite what a terminal shows, an escape sequence can retitle or clear it, and a newline in a
task id can forge a log line. :func:`escape_controls` writes every control character as a visible
escape (``\\n``, ``\\x1b``), and :func:`clip` bounds stored text with a marker saying how much was
cut, so an oversized message never fills the run state.
"""

from __future__ import annotations

import re
from typing import Any

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
CLIP_MARKER = "... [{n} more characters cut by rhbatch]"


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: Any) -> str:
    """``text`` as a string with every control character written as a visible escape."""
    out = str(text)
    return _CONTROLS.sub(_escape, out) if _CONTROLS.search(out) else out


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (marker included when it is cut)."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - len(CLIP_MARKER) - 8)
    return text[:keep] + CLIP_MARKER.format(n=len(text) - keep)


def clean_text(text: Any, limit: int) -> str:
    """Service text fit for a message or a log line: controls escaped, then clipped."""
    return clip(escape_controls(text), limit)


def amount(value: float | None) -> str:
    """Coins or money for people: 1,000,000,000 and 12.5, never 1e+09; None is "unknown"."""
    if value is None:
        return "unknown"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def number(value: float) -> str:
    """A number as a flag takes it: 1000000000 and 12.5, never 1e+09 nor 1,000."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")
