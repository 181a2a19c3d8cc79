"""What is wrong with a manifest: problems collected by kind, and how values appear in messages.

Every problem is reported together in one :class:`ManifestProblems` (a ManifestError), grouped by
kind: binding problems (which column feeds which node input, bindings, defaults), then value
problems (cells, types, the schema, row ids, duplicates); each kind lists its first
:data:`PROBLEMS_SHOWN_PER_KIND` and counts the rest. Column names and messages show every control
character escaped (``\\x00``), so user text cannot hide in a message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.errors import (  # noqa: F401 (re-exported)
    InputError,
    ManifestError,
    ManifestProblems,
    Problem,
    ProblemGroup,
)
from pipeline.safetext import escape_controls

if TYPE_CHECKING:
    pass

# Problems listed per kind (binding, value, preflight, file); the rest of each kind are counted.
PROBLEMS_SHOWN_PER_KIND = 50
MAX_PROBLEMS_KEPT = PROBLEMS_SHOWN_PER_KIND
SHOWN_VALUE_CHARS = 60


class _Problems:
    """Collects problems of one kind; keeps the first MAX_PROBLEMS_KEPT and counts the rest.

    ``lines`` (CSV) is the line each data row starts on: a message about a row that does not start
    on line ``number + 1`` also gives its CSV line.
    """

    def __init__(self, source: str, lines: Sequence[int] | None = None, kind: str | None = None):
        self.source = source
        self.lines = lines
        self.kind = kind
        self.kept: list[Problem] = []
        self.seen: set[tuple[int | None, str | None, str]] = set()
        self.count = 0

    def add(self, row: int | None, column: str | None, message: str) -> None:
        key = (row, column, message)
        if key in self.seen:
            return
        self.count += 1
        if len(self.kept) < MAX_PROBLEMS_KEPT:
            self.seen.add(key)
            if row is not None and self.lines is not None and row <= len(self.lines) \
                    and self.lines[row - 1] != row + 1:
                message = f"{message} (CSV line {self.lines[row - 1]})"
            self.kept.append(_problem(row, column, message))

    def __bool__(self) -> bool:
        return self.count > 0

    def group(self) -> ProblemGroup:
        return ProblemGroup(self.kind, tuple(self.kept), self.count)

    def raise_if_any(self) -> None:
        if self.count:
            raise ManifestProblems(escape_controls(self.source), [self.group()])


def _problem(row: int | None, column: str | None, message: str) -> Problem:
    """A Problem whose column name and message show every control character escaped (``\\x00``),
    so user text with a NUL, an escape sequence or a line separator cannot hide in a message."""
    return Problem(row, None if column is None else escape_controls(column), escape_controls(message))


def _fail(source: str, message: str, row: int | None = None, column: str | None = None) -> ManifestError:
    return ManifestError(escape_controls(source), [_problem(row, column, message)])


def _has_controls(text: str) -> bool:
    """Whether ``text`` holds a character that messages show escaped (a NUL, ESC, U+2028, ...)."""
    return escape_controls(text) != text


def _show(value: Any) -> str:
    """A value as the user wrote it, cut to SHOWN_VALUE_CHARS."""
    if isinstance(value, str):
        if len(value) > SHOWN_VALUE_CHARS:
            return repr(value[: SHOWN_VALUE_CHARS - 3] + "...")
        return repr(value)
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."
