"""Load and validate a manifest into rows ready to submit. Nothing is sent from here: no network I/O.

A manifest is a table of rows: a CSV/TSV, JSON, JSONL or Parquet file (:mod:`.read` gives the
formats). Each row becomes a :class:`Row` with a workflow id, the ``nodeInfoList`` it sends, its
task options and its input columns; :func:`load_manifest` reads, types, binds and validates every
row and reports every problem at once. The stages have a module each:

- :mod:`.read`: the file readers, into a table of columns;
- :mod:`.cells`: columns as codes into distinct values, and CSV cell typing;
- :mod:`.build`: bindings, workflow ids, options, nodeInfoList items, row ids and duplicates;
- :mod:`.schema` and :mod:`.judge`: the row schema, and applying it per distinct value;
- :mod:`.content`: canonical content, content keys, derived ids and the fingerprint;
- :mod:`.rows`: :class:`Row`, and :class:`Manifest` whose rows are made when read;
- :mod:`.problems`: problems by kind, and how values show in messages;
- :mod:`.arrow`: pyarrow arrays made without pyarrow's pandas import.

A loaded manifest keeps its columns, not one Python object per row: :attr:`Manifest.rows` makes
each :class:`Row` as it is read. Code that needs only the workflow ids or the text values the rows
send asks :func:`workflow_ids` and :func:`text_inputs`, which read the columns (once per distinct
value) instead of making a million rows.

An output manifest written by rhbatch (``results.jsonl`` / ``.csv`` / ``.parquet``: it has a
``nodeInfoList`` and a ``status`` or ``taskId`` column) loads back as a manifest: each row sends
exactly the recorded ``workflowId``, ``nodeInfoList`` and ``options`` under the recorded ``row_id``;
``inputs`` / ``inputs.*`` come back as metadata and every result field is ignored.

Types: JSON, JSONL and Parquet values keep their types. A CSV column is read as the type its schema
property declares (``properties`` or ``patternProperties``; for a ``--bind`` column, the one
declared for its ``NODE.FIELD``): ``string`` keeps the text as is (``"42"`` stays text),
``integer`` accepts whole numbers and also ``7.0`` (read as 7, as JSON Schema counts 7.0 as an
integer; ``12.5`` is an error), ``number`` reads a float, ``boolean`` reads true/false (any case).
Undeclared columns are inferred over the whole column: every non-empty cell an integer literal (no
leading zeros, except ``0``) -> int; every cell a number -> float; every cell true/false -> bool;
else text, byte for byte (no stripping; a leading ``=`` is just text). An integer-declared JSON
float with no fraction is sent as an int. An empty cell (CSV) or a null/missing key (JSON) is
``None``; in a bound column that is an error unless ``defaults`` gives the value. Cells are limited
to 1 MiB of UTF-8.

Validation: every row, as the object ``{row_id, workflowId, nodeInfoList, <options the row sets>,
<input columns>}``, must satisfy ``schemas/manifest.schema.json`` or the ``--schema`` that replaces
it. rhbatch also enforces, whatever the schema: ``workflowId`` is digits and not 0, ``row_id`` is
unique and matches ``[A-Za-z0-9._:-]{1,128}``, every nodeInfoList item has nodeId, fieldName and a
scalar fieldValue, and no two rows send the same request (``allow_duplicates`` keeps them, with
derived ids suffixed ``-2``, ``-3``...). Integers sent as ``seed`` / ``noise_seed`` are 0 to
2**64-1 (ComfyUI's seed range); any other integer, sent or not, fits in a signed 64 bits.
NaN and infinity are refused in every node input (CSV ``nan`` / ``inf`` in a number column, JSON
``NaN`` / ``Infinity``): strict JSON cannot carry them; a NaN in a metadata column of a JSON or
Parquet file reads as empty (pandas' missing value). Column names may not hold control characters
(a NUL, ESC, U+2028, ...), and every message shows such characters escaped (``\\x00``).

Every problem is reported together in one :class:`ManifestProblems` (a ManifestError), grouped by
kind: binding problems, then value problems; each kind lists its first
:data:`PROBLEMS_SHOWN_PER_KIND` and counts the rest. A problem in one row or column does not hide
the others: the schema is checked for every value that could be read, and the error carries the
rows whose workflow id is valid (with their readable node inputs) so that the checks made after
loading (preflight against the workflow, input files) report in the same pass. Two rows are
duplicates only when both requests are complete and identical: a row with a missing or unreadable
node input, workflow id, nodeInfoList or options is never called a duplicate of another.

Loading leaves the process as it found it: the cyclic garbage collector, paused while the rows are
built, and :mod:`csv`'s field size limit, raised while a CSV file is read, are restored when loading
ends, whether it succeeds or not.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, ManifestError, Problem
from pipeline.manifest.build import (
    COLUMN_TARGET_RE,
    EXAMPLE_WORKFLOW_ID,
    OPTION_FIELDS,
    OPTION_TYPES,
    RESULT_FIELDS,
    ROW_ID_RE,
    SPECIAL_COLUMNS,
    TARGET_RE,
    WORKFLOW_ID_RE,
    _Builder,
    _nothing_sent,
    parse_binding,
)
from pipeline.manifest.cells import (
    BOOL_TEXT,
    INT64_RANGE,
    INT_RE,
    MAX_CELL_BYTES,
    MAX_INT_DIGITS,
    NONFINITE_RE,
    NUMBER_RE,
    SEED_FIELDS,
    SEED_RANGE,
    Cells,
)
from pipeline.manifest.content import content_key
from pipeline.manifest.judge import validate_columns
from pipeline.manifest.problems import (
    MAX_PROBLEMS_KEPT,
    PROBLEMS_SHOWN_PER_KIND,
    SHOWN_VALUE_CHARS,
    ManifestProblems,
    ProblemGroup,
)
from pipeline.manifest.read import (
    CSV_CHUNK_ROWS,
    CSV_FIELD_LIMIT_CHARS,
    JSON_TOP_KEYS,
    MAX_JSON_DEPTH,
    _read,
    _Table,
    check_manifest_path,
    read_file_bytes,
)
from pipeline.manifest.rows import Manifest, Row, Rows, make_row, text_inputs, workflow_ids
from pipeline.manifest.schema import (
    ANNOTATION_KEYS,
    DECOMPOSABLE_ROOT_KEYS,
    SCHEMA_FILE,
    _load_schema,
    _Rules,
    bundled_schema,
    default_schema_path,
)

__all__ = [
    "ANNOTATION_KEYS", "BOOL_TEXT", "COLUMN_TARGET_RE", "CSV_CHUNK_ROWS", "CSV_FIELD_LIMIT_CHARS",
    "DECOMPOSABLE_ROOT_KEYS", "EXAMPLE_WORKFLOW_ID", "INT64_RANGE", "INT_RE", "JSON_TOP_KEYS",
    "MAX_CELL_BYTES", "MAX_INT_DIGITS", "MAX_JSON_DEPTH", "MAX_PROBLEMS_KEPT", "NONFINITE_RE",
    "NUMBER_RE", "OPTION_FIELDS", "OPTION_TYPES", "PROBLEMS_SHOWN_PER_KIND", "RESULT_FIELDS",
    "ROW_ID_RE", "SCHEMA_FILE", "SEED_FIELDS", "SEED_RANGE", "SHOWN_VALUE_CHARS", "SPECIAL_COLUMNS",
    "TARGET_RE", "WORKFLOW_ID_RE", "Manifest", "ManifestProblems", "ProblemGroup", "Row", "Rows",
    "bundled_schema", "check_manifest_path", "column_problems", "content_key", "default_schema_path",
    "load_manifest", "make_row", "parse_binding", "read_file_bytes", "text_inputs", "workflow_ids",
]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off until the block ends, then as it was."""
    # Many new dicts and tuples and no reference cycles: the cyclic collector would rescan them
    # over and over (it doubles the load time of a large JSON manifest), so it waits until the end.
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def load_manifest(
    path: str | Path,
    *,
    binds: Sequence[str] = (),
    workflow_id: str | None = None,
    schema_path: str | Path | None = None,
    allow_duplicates: bool = False,
) -> Manifest:
    """Read, type, bind and validate every row of ``path``.

    Raises InputError for a bad ``--bind`` / ``--workflow-id`` or an unreadable file, SchemaError
    for a bad schema, and ManifestError listing every problem in the manifest at once: a
    :class:`ManifestProblems` whose ``manifest``, once the file could be read as rows, holds every
    row with a valid workflow id, without its unreadable node inputs, for the checks that follow
    (:func:`pipeline.prepare.load_and_prepare` adds theirs to the same error).
    """
    path = Path(path)
    source = str(path)
    parsed = [parse_binding(text) for text in binds]
    if workflow_id is not None:
        workflow_id = str(workflow_id).strip()
        if not WORKFLOW_ID_RE.fullmatch(workflow_id):
            raise InputError(f"--workflow-id {workflow_id!r} is not a workflow id: use the digits from "
                             f"the workflow's URL, e.g. {EXAMPLE_WORKFLOW_ID}")
    schema, schema_file = _load_schema(schema_path)
    rules = _Rules(schema, schema_file)
    check_manifest_path(path)
    with _collector_paused():
        table = _read(path, source)
        return _Builder(source, table, rules, parsed, workflow_id, allow_duplicates).build()


def column_problems(columns: Sequence[tuple[str, Sequence[Any]]], *, text: bool) -> list[Problem]:
    """What :func:`load_manifest` (default schema, no ``--bind``) would say about these columns'
    values, for code that writes manifests (``rhbatch sweep``) and must write only what loads.

    Each column is ``(name, values)``: its distinct values, at least one. A problem's ``row`` is the
    1-based position of the value in its column (``None`` for the manifest as a whole, e.g. no
    column sends a node input). With ``text`` each value is read back as the CSV cell :mod:`csv`
    writes for it (``str(value)``, booleans as ``true`` / ``false``) and typed as a CSV column is;
    without it values keep their types (JSONL, Parquet). Like the loader, schema rules are
    judged only once the values read back cleanly.
    """
    def cell(value: Any) -> Any:
        if not text:
            return value
        return "true" if value is True else "false" if value is False else str(value)

    names = [name for name, _ in columns]
    cells = [[cell(value) for value in values] for _, values in columns]
    table = _Table(names, [Cells.of_texts(c) if text else Cells.of_rows(c) for c in cells],
                   max(map(len, cells), default=0), text)
    builder = _Builder("manifest", table, _Rules(*_load_schema(None)), [], None, True)
    try:
        typed, node_defaults, _ = builder.layout()
        if not any(c.target for c in typed) and not node_defaults:
            builder.problems.add(None, None, _nothing_sent(names))
        if not builder.problems and not builder.binding:
            validate_columns(builder.rules, builder.problems, typed)
    except ManifestError as exc:
        return list(exc.problems)
    return list(ManifestProblems("manifest", [builder.binding.group(),
                                              builder.problems.group()]).problems)
