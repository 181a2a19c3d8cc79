"""Expand a sweep spec (axes combined by ``product`` and ``zip``) into a manifest file, streaming.

A sweep spec is a small YAML or JSON file that describes many manifest rows at once.
``rhbatch sweep SPEC -o MANIFEST`` expands it into a CSV, JSONL or Parquet manifest that
``rhbatch run`` takes as is. The format is fixed by ``schemas/sweep.schema.json`` (JSON Schema
draft 2020-12); this module checks it with messages that name the JSON path of the problem and how
to fix it.

Spec format
===========
::

    version: 1                           # optional; the only version so far
    description: "cfg x sampler study"   # optional free text
    workflowId: "1904136902449209346"    # required (an unquoted YAML number is accepted too)
    bindings:                            # name -> NODE.FIELD (split at the first ".")
      prompt: "6.text"
      cfg: "3.cfg"
      sampler: "3.sampler_name"
      seed: "3.seed"
      steps: "3.steps"
    constants:                           # one value, the same in every row
      steps: 20
      study: "cfg-sampler"               # listed under metadata: a column that is not sent
    metadata: [study]                    # names kept as columns, never sent
    axes:                                # one axis node: the combination tree
      product:
        - prompt: {file: prompts.txt}
        - zip:
            - cfg: [5.0, 7.0]
            - sampler: [euler, dpmpp_2m]
    derive_seed: seed                    # or {name: seed, salt: "take-2"}
    allow_duplicates: false              # optional, default false

Top-level keys: ``workflowId`` and ``axes`` are required; ``version``, ``description``,
``bindings``, ``constants``, ``derive_seed``, ``allow_duplicates`` and ``metadata`` are optional;
any other key is an error.

Axis nodes
----------
An axis node is a mapping with exactly one key:

``product: [node, node, ...]``
    The Cartesian product of its members, in ``itertools.product`` order: the **last** member
    varies fastest. Nested products flatten (``product: [a, {product: [b, c]}]`` = ``[a, b, c]``).
``zip: [node, node, ...]``
    Members advance together; all must have the same length (a mismatch is an error naming them).
``NAME: source``
    A leaf axis called ``NAME``. Sources:

    * a list of values: ``cfg: [5.0, 7.5]``;
    * one value (a constant axis of length 1): ``steps: 20``;
    * ``{range: [start, stop]}`` or ``{range: [start, stop, step]}``: integers, half-open like
      Python's ``range`` (``{range: [0, 1000]}`` is 0..999); ``step`` may be negative, not 0;
    * ``{linspace: [a, b, n]}``: ``n`` evenly spaced floats from ``a`` to ``b`` inclusive,
      rounded to 12 significant digits so ``7.5`` is ``7.5`` and not ``7.499999999999999``;
    * ``{file: path}``: one value per non-empty line of a UTF-8 text file (lines end at a newline
      only, not at U+2028 or a form feed inside a prompt; they are stripped of surrounding
      whitespace; blank lines are skipped);
    * ``{file: path.csv, column: name}``: one value per data row of a CSV column (empty cells are
      kept as ``""``, so columns of one CSV zip together row by row).

    ``file`` paths are relative to the spec file. File values are strings unless the source says
    ``type: integer`` or ``type: number``.

Nodes nest to any depth. Every name appears exactly once in the whole spec (axes, constants and
``derive_seed`` together).

Values and types
----------------
Values are strings, integers, floats or booleans (not null, lists or mappings), and keep their
types in the manifest: a seed stays an integer, a cfg a float. All values of one name share one
type, except that integers and floats mix into floats (``cfg: [5, 7.5]`` gives ``5.0`` and
``7.5``). Integers must fit in 64 bits (Parquet's int64). Note that YAML reads unquoted
``yes``/``no``/``on``/``off`` as booleans: quote them when you mean text.

Names, bindings and columns
---------------------------
``bindings`` maps a name to the node input ``NODE.FIELD`` it feeds. A name that itself contains a
``.`` (``"6.text": [a cat, a dog]``) is bound to itself. Every binding must name an axis or a
constant, and two names may not feed the same input. A node id is digits, optionally
``:``-separated (``6``, ``57:35``): the manifest sends only such ``NODE.FIELD`` columns. Every
other name must be listed under ``metadata: [name, ...]``: it becomes a plain column that is not
sent to RunningHub (a label, a take number). A name that is neither bound nor listed is an error
naming it and both fixes, since an axis that feeds no node varies nothing RunningHub sees (unless
no name is bound at all: then the spec is refused for sending nothing). Names hold no
control characters. ``row_id``, ``workflowId``, ``nodeInfoList``, ``product`` and ``zip`` are
reserved, and so are the names a manifest reads as task options (``options``, ``instanceType``,
``usePersonalQueue``, ``addMetadata``, ``retainSeconds``, ``webhookUrl``, ``webappId``).

Each output row has, in this order:

1. ``row_id``;
2. ``workflowId``;
3. one column per bound name, named ``NODE.FIELD``, in the order of ``bindings`` (then self-bound
   dotted names in spec order: axes tree, then constants, then the derived seed);
4. one column per unbound name, in spec order (axes tree, then constants).

Rows come in a deterministic order: the order of the axis tree.

Row ids
-------
``row_id`` is ``"s"`` + the first 16 hex digits of the SHA-256 of the canonical JSON (keys
sorted, separators ``","`` and ``":"``, UTF-8, not ASCII-escaped) of
``{"workflowId": ..., NODE.FIELD: value, ...}`` over the **bound** columns only. So a row's id
depends on what is sent to RunningHub and on nothing else: it is identical across re-expansions
and is unchanged when axes are reordered, nested differently, renamed (same ``NODE.FIELD``), read
from another file, or when metadata columns are added or removed.

Derived seeds
-------------
``derive_seed: NAME`` (or ``{name: NAME, salt: TEXT}``) adds a column ``NAME``, which must be bound,
whose value is derived from the rest of the row: the first 4 bytes (big-endian) of
``sha256("rhbatch-seed\\0" + salt + "\\0" + canonical JSON of the row's other bound values)``, an
integer in ``[0, 2**32)``. The same spec gives the same seeds, different rows get unrelated seeds,
and changing ``salt`` re-rolls every seed reproducibly. A derived seed takes part in the row id.

Duplicates
----------
Two rows with the same bound values would be the same task paid for twice. By construction they
can only arise from repeated values, so the spec is rejected, naming the axis and the value, when
a leaf axis that is combined by ``product`` holds the same value twice, when a ``zip`` yields the
same tuple twice, or when an unbound axis with several values is combined by ``product`` (it would
repeat every row). ``allow_duplicates: true`` keeps them: the second and later occurrences of the
same bound values get ids suffixed ``-2``, ``-3``, ... and, with ``derive_seed``, their own seeds.
(Counting occurrences then keeps an 8-byte key per distinct row in memory.)

Output files
============
The format follows the extension: ``.csv`` (UTF-8, ``\\n`` line ends, booleans as ``true``/
``false``, floats in their shortest round-trip form), ``.jsonl`` (one JSON object per line) or
``.parquet`` (written in batches of :data:`PARQUET_BATCH_ROWS` with a schema fixed up front).
The file is written to a temporary file in the same directory and moved into place with
``os.replace``, so a reader sees the old file or the whole new one. Re-expanding a spec gives a
byte-identical CSV or JSONL file and a Parquet file with identical rows. Expansion streams: memory
does not grow with the number of rows (except as noted under Duplicates).

What is written passes ``rhbatch validate`` as it is: before writing, every distinct value is put
to the manifest loader itself, and a value it would refuse in the chosen format is a spec error
naming the axis or constant (a seed outside ComfyUI's range, a string for a whole-number input,
a value over 1 MiB; in a CSV also text starting with ``=``, which reads as a spreadsheet formula,
and an empty string in a bound column, which reads as a missing value: ``.jsonl`` and
``.parquet`` keep both). ``workflowId`` must be digits, not 0. Files named ``@path`` are checked by
validate and run, against the manifest's directory. The repeated rows of a spec with
``allow_duplicates: true`` and no ``derive_seed`` are the same request twice, so validate and run
keep them only with ``--allow-duplicates`` too: paying twice is agreed to where it happens.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import difflib
import hashlib
import io
import itertools
import json
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any

import jsonschema
import yaml

from pipeline._files import atomic_open
from pipeline.errors import InputError, SchemaError, StorageError, SweepError
from pipeline.manifest import (
    COLUMN_TARGET_RE,
    EXAMPLE_WORKFLOW_ID,
    OPTION_FIELDS,
    WORKFLOW_ID_RE,
    bundled_schema,
    column_problems,
    read_file_bytes,
)
from pipeline.safetext import escape_controls

__all__ = [
    "DEFAULT_MAX_ROWS",
    "PARQUET_BATCH_ROWS",
    "SweepResult",
    "count_rows",
    "expand_sweep",
    "iter_rows",
    "load_spec",
]

DEFAULT_MAX_ROWS = 100_000
PARQUET_BATCH_ROWS = 50_000
PROGRESS_EVERY_ROWS = 10_000  # CSV/JSONL rows between progress callbacks
# A product re-walks every member but the first for each value of the first; members up to this
# many rows are held in memory for that (fast), larger ones are re-generated instead.
MATERIALIZE_MAX_ROWS = 250_000
LINSPACE_SIGNIFICANT_DIGITS = 12

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

FORMATS = (".csv", ".jsonl", ".parquet")
TOP_KEYS = (
    "version",
    "description",
    "workflowId",
    "bindings",
    "constants",
    "axes",
    "derive_seed",
    "allow_duplicates",
    "metadata",
)
COMBINATORS = ("product", "zip")
RESERVED_NAMES = ("row_id", "workflowId", "nodeInfoList", *COMBINATORS)
# Columns a manifest reads as task options, never as metadata: a sweep writes none of them.
OPTION_NAMES = ("options", *OPTION_FIELDS)
SOURCE_KINDS = ("range", "linspace", "file")
FILE_TYPES = ("string", "integer", "number")

_SCHEMA_FILE = "sweep.schema.json"

Scalar = str | int | float | bool
PathParts = tuple[str | int, ...]


@dataclass(frozen=True)
class SweepResult:
    """What :func:`expand_sweep` wrote."""

    path: Path
    rows: int
    columns: list[str]


# --------------------------------------------------------------------------------------------------
# Problems and paths


def _fmt_path(parts: PathParts) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


@dataclass
class _Ctx:
    source: str
    base_dir: Path
    problems: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: PathParts, message: str) -> None:
        # Control characters in names and values are shown escaped (\\x00), never raw.
        self.problems.append((escape_controls(_fmt_path(path)), escape_controls(message)))

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        lines = [f"{p}: {m}" if p else m for p, m in self.problems]
        if len(lines) == 1:
            raise SweepError(f"{self.source}: {lines[0]}")
        shown = "\n".join(f"  {line}" for line in lines)
        raise SweepError(f"{self.source}: {len(lines)} problems:\n{shown}")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({value!r}); quote it to make it a string"


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if _is_scalar(value) else repr(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) and not (
        isinstance(value, float) and not math.isfinite(value)
    )


def _suggest(key: str, allowed: Sequence[str]) -> str:
    if key.rstrip("s") in ("seed", "seed_derive") and "derive_seed" in allowed:
        return " (did you mean 'derive_seed'?)"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_keys(ctx: _Ctx, path: PathParts, obj: dict[str, Any], allowed: Sequence[str]) -> None:
    for key in obj:
        if key not in allowed:
            ctx.add(
                (*path, key),
                f"unknown key '{key}'{_suggest(str(key), allowed)}; allowed keys here: {', '.join(allowed)}",
            )


# --------------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one silently."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}; keep one of them", key_node.start_mark
            )
        with contextlib.suppress(TypeError):
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}; keep one of them")
        out[key] = value
    return out


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read a sweep spec (YAML, or JSON for ``.json``), check it fully and return it as a dict.

    Relative ``file`` paths in the returned dict are made absolute (resolved against the spec's
    directory), so the dict can be handed to :func:`count_rows` and :func:`iter_rows` from anywhere.
    Raises :class:`SweepError` naming the file, the JSON path of each problem and its fix.
    """
    spec, plan = _load(path)
    return _absolutize_files(spec, plan)


def _load(path: str | Path) -> tuple[dict[str, Any], _Plan]:
    spec_path = Path(path)
    source = str(path)
    try:
        text = _read_text(spec_path, "sweep spec", "utf-8")
    except FileNotFoundError as exc:
        raise SweepError(f"{source}: sweep spec not found; check the path") from exc
    except UnicodeDecodeError as exc:
        raise SweepError(f"{source}: not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    except OSError as exc:
        raise SweepError(f"{source}: cannot read the sweep spec: {exc.strerror}") from exc
    except InputError as exc:  # a directory, a device, a FIFO
        raise SweepError(str(exc)) from None
    spec: Any
    if spec_path.suffix.lower() == ".json":
        try:
            spec = json.loads(text, object_pairs_hook=_json_pairs)
        except json.JSONDecodeError as exc:
            raise SweepError(
                f"{source}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"
            ) from exc
        except ValueError as exc:
            raise SweepError(f"{source}: invalid JSON: {exc}") from exc
    else:
        try:
            spec = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
            raise SweepError(f"{source}: {where}invalid YAML: {exc.problem or exc}") from exc
        except yaml.YAMLError as exc:
            raise SweepError(f"{source}: invalid YAML: {exc}") from exc
    plan = _compile(spec, source=source, base_dir=spec_path.resolve().parent)
    return spec, plan


def _read_text(path: Path, what: str, encoding: str) -> str:
    """A regular file's text with newlines as ``read_text`` gives them (``\\r\\n`` and ``\\r`` read as
    ``\\n``). Raises FileNotFoundError, OSError, UnicodeDecodeError, or InputError for a directory, a
    device or a FIFO, which are refused without blocking."""
    path.stat()  # not found: FileNotFoundError, as it is
    text = read_file_bytes(path, what).decode(encoding)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _absolutize_files(spec: dict[str, Any], plan: _Plan) -> dict[str, Any]:
    result = copy.deepcopy(spec)
    for leaf in _leaves(plan.root):
        if leaf.origin:
            node: Any = result
            for part in leaf.path:
                node = node[part]
            node["file"] = str(plan.base_dir / leaf.origin)
    return result


@cache
def _schema() -> dict[str, Any]:
    try:
        candidate = bundled_schema(_SCHEMA_FILE)
    except SchemaError as exc:
        raise SweepError(str(exc)) from None
    schema: dict[str, Any] = json.loads(candidate.read_text(encoding="utf-8"))
    return schema


def _schema_check(ctx: _Ctx, spec: Any) -> None:
    """The JSON Schema is the published contract; the walk above gives the better messages, so this
    only reports what the walk let through (it should be nothing)."""
    validator = jsonschema.Draft202012Validator(_schema())
    for error in sorted(validator.iter_errors(spec), key=lambda e: str(list(e.absolute_path))):
        ctx.add(tuple(error.absolute_path), f"does not match the sweep schema: {error.message}")


# --------------------------------------------------------------------------------------------------
# The compiled plan


@dataclass
class _Leaf:
    name: str
    path: PathParts
    values: Sequence[Scalar]  # a list, or a range (lazy)
    origin: str = ""  # the file the values came from, if any
    lines: list[int] | None = None  # the file line of each value, for messages
    source: str = "list"  # list, value, range, linspace or file: where a value is, for messages

    def where(self, i: int) -> tuple[PathParts, str]:
        """The spec path of value ``i``, and a note naming its file line."""
        if self.source == "list":
            return (*self.path, i), ""
        if self.source == "file":
            return (*self.path, "file"), f" ({self.origin} line {self.lines[i] if self.lines else '?'})"
        return self.path, ""  # one value, or a range / linspace (whose path names it)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def length(self) -> int:
        return len(self.values)

    def iter(self) -> Iterator[tuple[Any, ...]]:
        return ((v,) for v in self.values)


@dataclass
class _Zip:
    path: PathParts
    children: list[_Node]
    names: tuple[str, ...] = ()
    length: int = 0

    def iter(self) -> Iterator[tuple[Any, ...]]:
        for parts in zip(*(c.iter() for c in self.children), strict=True):
            yield sum(parts, ())


@dataclass
class _Product:
    path: PathParts
    children: list[_Node]
    names: tuple[str, ...] = ()
    length: int = 0

    def iter(self) -> Iterator[tuple[Any, ...]]:
        return _iter_product(self.children)


_Node = _Leaf | _Zip | _Product


def _iter_product(children: Sequence[_Node]) -> Iterator[tuple[Any, ...]]:
    head, tails = children[0], children[1:]
    if not tails:
        yield from head.iter()
    elif all(c.length <= MATERIALIZE_MAX_ROWS for c in tails):
        held = [tuple(c.iter()) for c in tails]
        for h in head.iter():
            for combo in itertools.product(*held):
                yield sum(combo, h)
    else:
        for h in head.iter():
            for t in _iter_product(tails):
                yield h + t


@dataclass
class _Plan:
    source: str
    base_dir: Path
    workflow_id: str
    root: _Node
    axis_names: tuple[str, ...]
    constants: dict[str, Scalar]
    column_of: dict[str, str]  # bound name -> NODE.FIELD
    seed_name: str | None
    seed_salt: str
    allow_duplicates: bool
    unique: bool  # no two rows share their bound values
    columns: list[str]
    column_types: dict[str, type]

    @property
    def length(self) -> int:
        return self.root.length


def _compile(spec: Any, *, source: str, base_dir: Path) -> _Plan:
    """The plan of a sweep spec, every problem in it reported at once (in spec order)."""
    ctx = _Ctx(source=source, base_dir=base_dir)
    if not isinstance(spec, dict):
        ctx.add((), f"a sweep spec is a mapping with workflowId and axes, got {_type_name(spec)}")
        ctx.raise_if_any()
    workflow_id, allow_duplicates = _compile_top(ctx, spec)
    names = _Names(ctx)
    root: _Node | None = None
    if "axes" in spec:
        root = _compile_node(ctx, spec["axes"], ("axes",), names.define, in_zip=False)
    constants = _compile_constants(ctx, spec, names)
    seed_name, seed_salt = _compile_seed(ctx, spec, names)
    column_of, raw_bindings = _compile_bindings(ctx, spec, names, seed_name)
    _check_unsent(ctx, spec, names.paths, column_of, {seed_name, *raw_bindings})

    ctx.raise_if_any()
    assert root is not None
    name_types = _name_types(ctx, root, constants, seed_name)

    # Duplicates
    unique = _check_unique(ctx, root, set(column_of), report=not allow_duplicates)
    ctx.raise_if_any()
    columns, column_types = _columns(root, constants, seed_name, raw_bindings, column_of, name_types)

    _schema_check(ctx, spec)
    ctx.raise_if_any()

    return _Plan(
        source=source,
        base_dir=base_dir,
        workflow_id=workflow_id,
        root=root,
        axis_names=root.names,
        constants=constants,
        column_of=column_of,
        seed_name=seed_name,
        seed_salt=seed_salt,
        allow_duplicates=allow_duplicates,
        unique=unique,
        columns=columns,
        column_types=column_types,
    )


def _compile_top(ctx: _Ctx, spec: dict[str, Any]) -> tuple[str, bool]:
    """The top-level keys but the names: the workflow id (``""`` when wrong) and allow_duplicates."""
    _unknown_keys(ctx, (), spec, TOP_KEYS)
    for key in ("workflowId", "axes"):
        if key not in spec:
            example = (
                'workflowId: "1904136902449209346"'
                if key == "workflowId"
                else ("axes: {product: [{prompt: [a cat, a dog]}, {seed: {range: [0, 4]}}]}")
            )
            ctx.add((), f"missing required key '{key}'; add e.g. {example}")

    if "version" in spec and (spec["version"] != 1 or isinstance(spec["version"], bool)):
        ctx.add(("version",), f"unsupported version {_show(spec['version'])}; use version: 1")
    if "description" in spec and not isinstance(spec["description"], str):
        ctx.add(("description",), f"expected a string, got {_type_name(spec['description'])}")

    workflow_id = ""
    if "workflowId" in spec:
        wf = spec["workflowId"]
        if isinstance(wf, int) and not isinstance(wf, bool) and wf >= 0:
            workflow_id = str(wf)
        elif isinstance(wf, str) and wf.strip():
            workflow_id = wf.strip()
        else:
            ctx.add(
                ("workflowId",),
                f"expected the workflow id as a string, got {_type_name(wf)}; "
                'write e.g. workflowId: "1904136902449209346"',
            )
        if workflow_id and not WORKFLOW_ID_RE.fullmatch(workflow_id):
            # the manifest would refuse it in every row
            ctx.add(
                ("workflowId",),
                f"{_show(wf)} is not a workflow id; use the digits from the workflow's URL, "
                f'e.g. workflowId: "{EXAMPLE_WORKFLOW_ID}" (not 0)',
            )
            workflow_id = ""

    allow_duplicates = spec.get("allow_duplicates", False)
    if not isinstance(allow_duplicates, bool):
        ctx.add(
            ("allow_duplicates",),
            f"expected true or false, got {_type_name(allow_duplicates)}",
        )
        allow_duplicates = False

    return workflow_id, allow_duplicates


class _Names:
    """Where every name (axis, constant, derived seed) is defined, to report one defined twice."""

    def __init__(self, ctx: _Ctx):
        self.ctx = ctx
        self.paths: dict[str, PathParts] = {}

    def define(self, name: Any, path: PathParts) -> bool:
        """Record ``name`` as defined at ``path``; False (and a problem) when it cannot be a name."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            self.ctx.add(
                path,
                f"invalid name {_show(name)}; names are non-empty strings without surrounding spaces",
            )
            return False
        if escape_controls(name) != name:
            self.ctx.add(
                path,
                f"the name {_show(name)} holds a control character; names become column "
                "names in the manifest: use letters, digits and punctuation only",
            )
            return False
        if name in RESERVED_NAMES:
            self.ctx.add(path, f"'{name}' is reserved; choose another name")
            return False
        if name in OPTION_NAMES:
            self.ctx.add(
                path,
                f"'{name}' is reserved: a manifest reads a column '{name}' as a task option, "
                "not as metadata; choose another name (task options are flags of rhbatch run, "
                "e.g. --instance-type)",
            )
            return False
        if "." in name and not _valid_target(name):
            self.ctx.add(
                path,
                f"'{name}' has a '.' but is not NODE.FIELD; write NODE.FIELD "
                "(e.g. 6.text) or use a name without '.'",
            )
            return False
        if "." in name and not COLUMN_TARGET_RE.fullmatch(name):
            self.ctx.add(path, _node_id_message(name))
            return False
        if name in self.paths:
            self.ctx.add(
                path,
                f"'{name}' is already defined at {_fmt_path(self.paths[name]) or 'top'}; "
                "each name can appear once: rename one of them",
            )
            return False
        self.paths[name] = path
        return True



def _compile_constants(ctx: _Ctx, spec: dict[str, Any], names: _Names) -> dict[str, Scalar]:
    constants: dict[str, Scalar] = {}
    raw_constants = spec.get("constants", {})
    if not isinstance(raw_constants, dict):
        got = _type_name(raw_constants)
        ctx.add(("constants",), f"expected a mapping of name: value, got {got}")
    else:
        for name, value in raw_constants.items():
            path: PathParts = ("constants", name)
            if not names.define(name, path):
                continue
            if not _is_scalar(value):
                hint = "; to vary it, move it to axes" if isinstance(value, list) else ""
                got = _type_name(value)
                ctx.add(path, f"a constant is one string, number or boolean, got {got}{hint}")
                continue
            if _int_out_of_range(value):
                ctx.add(path, f"{value} does not fit in 64 bits; use a value below 2**63")
                continue
            constants[name] = value

    return constants


def _compile_seed(ctx: _Ctx, spec: dict[str, Any], names: _Names) -> tuple[str | None, str]:
    """``derive_seed``: the name of the derived seed (None without one) and its salt."""
    seed_name: str | None = None
    seed_salt = ""
    if "derive_seed" in spec:
        raw = spec["derive_seed"]
        if isinstance(raw, str):
            if names.define(raw, ("derive_seed",)):
                seed_name = raw
        elif isinstance(raw, dict):
            _unknown_keys(ctx, ("derive_seed",), raw, ("name", "salt"))
            if "name" not in raw:
                ctx.add(("derive_seed",), "missing 'name'; write derive_seed: {name: seed}")
            elif names.define(raw["name"], ("derive_seed", "name")):
                seed_name = raw["name"]
            salt = raw.get("salt", "")
            if isinstance(salt, str):
                seed_salt = salt
            else:
                ctx.add(("derive_seed", "salt"), f"expected a string, got {_type_name(salt)}")
        else:
            ctx.add(
                ("derive_seed",),
                f"expected a name or {{name, salt}}, got {_type_name(raw)}; write e.g. derive_seed: seed",
            )

    return seed_name, seed_salt


def _compile_bindings(ctx: _Ctx, spec: dict[str, Any], names: _Names, seed_name: str | None
                      ) -> tuple[dict[str, str], dict[Any, Any]]:
    """Name -> NODE.FIELD for every bound name (``bindings``, then self-bound dotted names), and
    the ``bindings`` as written."""
    defined = names.paths
    column_of: dict[str, str] = {}
    raw_bindings = spec.get("bindings", {})
    bound_by: dict[str, str] = {}  # NODE.FIELD -> name
    if not isinstance(raw_bindings, dict):
        ctx.add(("bindings",), f"expected a mapping of name: NODE.FIELD, got {_type_name(raw_bindings)}")
        raw_bindings = {}
    for name, target in raw_bindings.items():
        path: PathParts = ("bindings", name)
        if not isinstance(target, str) or not _valid_target(target):
            shown = _show(target) if _is_scalar(target) else _type_name(target)
            ctx.add(
                path,
                f"{shown} is not NODE.FIELD; write the node id, a '.', and the input "
                f'name, e.g. {name}: "3.{name}"',
            )
            continue
        if not COLUMN_TARGET_RE.fullmatch(target) or escape_controls(target) != target:
            ctx.add(path, _node_id_message(target))
            continue
        if "." in str(name):
            ctx.add(
                path,
                f"'{name}' is already a NODE.FIELD column; remove this binding or rename the axis",
            )
            continue
        if name not in defined:
            ctx.add(
                path,
                f"'{name}' names no axis or constant; add an axis or constant called "
                f"'{name}', or remove the binding",
            )
            continue
        if target in bound_by:
            ctx.add(
                path,
                f"{target} is already fed by '{bound_by[target]}'; a node input takes "
                "one value per row: bind one name to it",
            )
            continue
        bound_by[target] = name
        column_of[name] = target
    for name, path in defined.items():
        if "." in name:
            if name in bound_by:
                ctx.add(path, f"{name} is also fed by '{bound_by[name]}' in bindings; keep one of them")
                continue
            bound_by[name] = name
            column_of[name] = name
    if seed_name is not None and seed_name not in column_of and seed_name in defined:
        ctx.add(
            ("derive_seed",),
            f"'{seed_name}' is not bound to a node input; add bindings: "
            f'{{{seed_name}: "NODE.seed"}} (e.g. "3.seed")',
        )
    return column_of, raw_bindings


def _name_types(ctx: _Ctx, root: _Node, constants: dict[str, Scalar], seed_name: str | None
                ) -> dict[str, type]:
    """The one type of each name's values (ints and floats mix into floats)."""
    name_types: dict[str, type] = {}
    for leaf in _leaves(root):
        t = _unify_leaf_types(ctx, leaf)
        if t is not None:
            name_types[leaf.name] = t
    for name, value in constants.items():
        name_types[name] = type(value)
    if seed_name is not None:
        name_types[seed_name] = int

    return name_types


def _columns(root: _Node, constants: dict[str, Scalar], seed_name: str | None,
             raw_bindings: dict[Any, Any], column_of: dict[str, str], name_types: dict[str, type]
             ) -> tuple[list[str], dict[str, type]]:
    """The output columns and their types: row_id, workflowId, the bound names (bindings order,
    then self-bound in spec order), then the unbound names."""
    column_types: dict[str, type] = {"row_id": str, "workflowId": str}
    ordered_names = [*_names_in_order(root), *constants, *([seed_name] if seed_name else [])]
    bound_names = [n for n in raw_bindings if n in column_of]
    bound_names += [n for n in ordered_names if n in column_of and n not in bound_names]
    unbound_names = [n for n in ordered_names if n not in column_of]
    columns = ["row_id", "workflowId"]
    for name in bound_names:
        columns.append(column_of[name])
        column_types[column_of[name]] = name_types[name]
    for name in unbound_names:
        columns.append(name)
        column_types[name] = name_types[name]

    return columns, column_types


def _check_unsent(ctx: _Ctx, spec: dict[str, Any], defined: dict[str, PathParts],
                  column_of: dict[str, str], reported: set[Any]) -> None:
    """Every axis and constant is sent, or is listed under ``metadata`` as a column kept unsent:
    an axis that feeds no node would vary nothing that RunningHub sees. Names in ``reported``
    (the derived seed, names with a binding) have their own message when they are not bound."""
    raw = spec.get("metadata", [])
    declared: dict[str, None] = {}
    if not isinstance(raw, list):
        ctx.add(("metadata",), f"expected a list of names, got {_type_name(raw)}; write e.g. "
                "metadata: [study]")
        return  # which names were meant to be kept unsent is not known
    for i, name in enumerate(raw):
        path: PathParts = ("metadata", i)
        if not isinstance(name, str) or name not in defined:
            shown = _show(name) if _is_scalar(name) else _type_name(name)
            ctx.add(path, f"{shown} names no axis or constant; list the names to keep as columns "
                    "that are not sent, or remove it")
        elif name in column_of:
            ctx.add(path, f"'{name}' is bound to {column_of[name]}, so it is sent; remove it from "
                    "metadata, or remove its binding")
        elif name in declared:
            ctx.add(path, f"'{name}' is listed twice; keep one")
        declared[name] = None
    if not column_of:
        return  # nothing is sent at all: the manifest check says so, with the fix
    faulty = [p for p, _ in ctx.problems]  # names with a problem of their own are not repeated
    for name, path in defined.items():
        if name in column_of or name in declared or name in reported or "." in name:
            continue
        where = escape_controls(_fmt_path(path))
        if any(p == where or p.startswith((f"{where}.", f"{where}[")) for p in faulty):
            continue
        ctx.add(
            path,
            f"'{name}' is neither bound to a node input nor listed under metadata, so its values "
            f"would never be sent; bind it (bindings: {{{name}: \"NODE.FIELD\"}}; rhbatch inspect "
            f"lists the workflow's inputs), or add metadata: [{name}] to keep it as a column "
            "that is not sent",
        )


def _valid_target(target: str) -> bool:
    node, dot, fieldname = target.partition(".")
    return bool(dot and node.strip() and fieldname.strip()) and target == target.strip()


def _node_id_message(target: str) -> str:
    # The sweep writes each bound name as a column NODE.FIELD, and a manifest sends such a column
    # only when its node id is digits (6, 57:35): any other column is metadata, silently not sent.
    node = target.partition(".")[0]
    return (
        f"{_show(target)}: the node id {_show(node)} is not digits (like 6 or 57:35), so the manifest "
        "would keep this column as metadata and never send it; use the node's id from the "
        "workflow's API JSON (rhbatch inspect lists them)"
    )


def _int_out_of_range(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and not (INT64_MIN <= value <= INT64_MAX)


def _leaves(node: _Node) -> Iterator[_Leaf]:
    if isinstance(node, _Leaf):
        yield node
    else:
        for child in node.children:
            yield from _leaves(child)


def _names_in_order(node: _Node) -> list[str]:
    return [leaf.name for leaf in _leaves(node)]


def _compile_node(
    ctx: _Ctx,
    raw: Any,
    path: PathParts,
    define: Callable[[Any, PathParts], bool],
    *,
    in_zip: bool,
) -> _Node | None:
    example = "{cfg: [5, 7]}, {product: [...]} or {zip: [...]}"
    if not isinstance(raw, dict):
        ctx.add(path, f"an axis is a mapping with one key, such as {example}; got {_type_name(raw)}")
        return None
    if len(raw) != 1:
        if not raw:
            ctx.add(path, f"empty axis; write one key, such as {example}")
        else:
            keys = ", ".join(str(k) for k in raw)
            ctx.add(
                path,
                f"an axis has exactly one key, got {len(raw)} ({keys}); to combine "
                "them write product: [{a: ...}, {b: ...}] or zip: [{a: ...}, {b: ...}]",
            )
        return None
    ((key, value),) = raw.items()
    if key in COMBINATORS:
        return _compile_combinator(ctx, key, value, (*path, key), define)
    leaf_path = (*path, key)
    if not define(key, leaf_path):
        return None
    return _compile_leaf(ctx, key, value, leaf_path)


def _compile_combinator(
    ctx: _Ctx,
    kind: str,
    value: Any,
    path: PathParts,
    define: Callable[[Any, PathParts], bool],
) -> _Node | None:
    if not isinstance(value, list):
        ctx.add(
            path,
            f"expected a list of axes, got {_type_name(value)}; write {kind}: [{{a: [1, 2]}}, {{b: [x, y]}}]",
        )
        return None
    if not value:
        ctx.add(path, f"empty {kind}; list at least one axis")
        return None
    children: list[_Node] = []
    ok = True
    for i, item in enumerate(value):
        child = _compile_node(ctx, item, (*path, i), define, in_zip=kind == "zip")
        if child is None:
            ok = False
        else:
            children.append(child)
    if not ok:
        return None
    names = tuple(n for c in children for n in c.names)
    if kind == "product":
        flat: list[_Node] = []
        for c in children:
            flat.extend(c.children if isinstance(c, _Product) else [c])
        length = math.prod(c.length for c in flat)
        return _Product(path=path, children=flat, names=names, length=length)
    lengths = {c.length for c in children}
    if len(lengths) > 1:
        shown = ", ".join(f"{_describe(c)}: {c.length}" for c in children)
        ctx.add(
            path,
            f"zip members have different lengths ({shown}); give every member the "
            "same number of values, or use product",
        )
        return None
    return _Zip(path=path, children=children, names=names, length=children[0].length)


def _describe(node: _Node) -> str:
    if isinstance(node, _Leaf):
        return node.name
    kind = "product" if isinstance(node, _Product) else "zip"
    return f"{kind} of {'/'.join(node.names)}"


def _compile_leaf(ctx: _Ctx, name: str, raw: Any, path: PathParts) -> _Leaf | None:
    if isinstance(raw, list):
        if not raw:
            ctx.add(path, "empty axis; give at least one value")
            return None
        ok = True
        for i, value in enumerate(raw):
            if not _is_scalar(value):
                ctx.add((*path, i), f"values are strings, numbers or booleans, got {_type_name(value)}")
                ok = False
            elif _int_out_of_range(value):
                ctx.add((*path, i), f"{value} does not fit in 64 bits; use a value below 2**63")
                ok = False
        return _Leaf(name, path, list(raw)) if ok else None
    if isinstance(raw, dict):
        kinds = [k for k in SOURCE_KINDS if k in raw]
        if len(kinds) != 1:
            got = f"got {', '.join(kinds)}" if kinds else f"got keys {', '.join(map(str, raw))}"
            ctx.add(
                path,
                f"an axis source has exactly one of range, linspace or file ({got}); "
                "e.g. {range: [0, 10]}, {linspace: [5.0, 9.0, 5]} or "
                "{file: prompts.txt}",
            )
            return None
        kind = kinds[0]
        if kind == "range":
            _unknown_keys(ctx, path, raw, ("range",))
            return _compile_range(ctx, name, raw["range"], (*path, "range"))
        if kind == "linspace":
            _unknown_keys(ctx, path, raw, ("linspace",))
            return _compile_linspace(ctx, name, raw["linspace"], (*path, "linspace"))
        _unknown_keys(ctx, path, raw, ("file", "column", "type"))
        return _compile_file(ctx, name, raw, path)
    if raw is None:
        ctx.add(
            path,
            "no values (null); give a list, one value, {range: ...}, {linspace: ...} or {file: ...}",
        )
        return None
    if not _is_scalar(raw):
        ctx.add(path, f"expected values, got {_type_name(raw)}")
        return None
    if _int_out_of_range(raw):
        ctx.add(path, f"{raw} does not fit in 64 bits; use a value below 2**63")
        return None
    return _Leaf(name, path, [raw], source="value")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _compile_range(ctx: _Ctx, name: str, raw: Any, path: PathParts) -> _Leaf | None:
    if not (isinstance(raw, list) and len(raw) in (2, 3) and all(_is_int(v) for v in raw)):
        ctx.add(
            path,
            f"expected [start, stop] or [start, stop, step] of integers, got "
            f"{_show(raw)}; for floats use {{linspace: [a, b, n]}}",
        )
        return None
    start, stop, step = (*raw, 1) if len(raw) == 2 else raw
    if step == 0:
        ctx.add(path, "step is 0; use a positive step (or a negative one with start > stop)")
        return None
    values = range(start, stop, step)
    if not values:
        hint = "stop must be greater than start" if step > 0 else "stop must be less than start"
        ctx.add(path, f"range({start}, {stop}, {step}) is empty; {hint} (stop is excluded)")
        return None
    if _int_out_of_range(values[0]) or _int_out_of_range(values[-1]):
        ctx.add(path, "values do not fit in 64 bits; keep them within ±2**63")
        return None
    return _Leaf(name, path, values, source="range")


def _compile_linspace(ctx: _Ctx, name: str, raw: Any, path: PathParts) -> _Leaf | None:
    ok = (
        isinstance(raw, list)
        and len(raw) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw[:2])
        and all(math.isfinite(v) for v in raw[:2])
        and _is_int(raw[2])
    )
    if not ok:
        ctx.add(path, f"expected [a, b, n] (two numbers and a count), got {_show(raw)}")
        return None
    a, b, n = float(raw[0]), float(raw[1]), raw[2]
    if n < 1:
        ctx.add(path, f"n is {n}; give at least 1 value")
        return None
    if n == 1:
        return _Leaf(name, path, [a], source="linspace")
    digits = LINSPACE_SIGNIFICANT_DIGITS
    values = [float(f"{a + (b - a) * i / (n - 1):.{digits}g}") for i in range(n)]
    values[0], values[-1] = a, b
    return _Leaf(name, path, values, source="linspace")


def _compile_file(ctx: _Ctx, name: str, raw: dict[str, Any], path: PathParts) -> _Leaf | None:
    rel = raw["file"]
    if not isinstance(rel, str) or not rel:
        ctx.add((*path, "file"), f"expected a file path, got {_type_name(rel)}")
        return None
    column = raw.get("column")
    if column is not None and not isinstance(column, str):
        ctx.add((*path, "column"), f"expected a CSV column name, got {_type_name(column)}")
        return None
    vtype = raw.get("type", "string")
    if vtype not in FILE_TYPES:
        ctx.add((*path, "type"), f"unknown type {_show(vtype)}; use one of {', '.join(FILE_TYPES)}")
        return None
    file_path = ctx.base_dir / rel
    try:
        text = _read_text(file_path, "values", "utf-8-sig")
    except InputError as exc:  # a directory, a device, a FIFO
        ctx.add((*path, "file"), str(exc))
        return None
    except FileNotFoundError:
        ctx.add(
            (*path, "file"),
            f"{rel} not found (looked for {file_path}); file paths are relative to the spec file",
        )
        return None
    except UnicodeDecodeError as exc:
        ctx.add((*path, "file"), f"{rel} is not UTF-8 text ({exc.reason}); save it as UTF-8")
        return None
    except OSError as exc:
        ctx.add((*path, "file"), f"cannot read {rel}: {exc.strerror}")
        return None

    # (value, line number) pairs, line numbers 1-based as editors count.
    raw_values: list[tuple[str, int]] = []
    # Lines end at "\n" only: U+2028, U+0085, \x0c and the other breaks str.splitlines() knows are
    # text inside a value (a prompt pasted from a web page may hold them).
    if column is None:
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                raw_values.append((line.strip(), lineno))
        if not raw_values:
            ctx.add((*path, "file"), f"{rel} has no values (no non-empty lines); add one value per line")
            return None
    else:
        reader = csv.reader(io.StringIO(text, newline=""))  # quoted cells may span lines
        header = next(reader, None)
        if not header:
            ctx.add(
                (*path, "file"),
                f"{rel} is empty; a CSV needs a header row naming '{column}' and data rows",
            )
            return None
        if column not in header:
            ctx.add((*path, "column"), f"no column '{column}' in {rel} (columns: {', '.join(header)})")
            return None
        idx = header.index(column)
        for record in reader:
            if not record:
                continue  # blank line
            lineno = reader.line_num
            if idx >= len(record):
                ctx.add(
                    (*path, "file"),
                    f"{rel} line {lineno} has {len(record)} fields, "
                    f"fewer than the header's {len(header)}; fix the row",
                )
                return None
            raw_values.append((record[idx], lineno))
        if not raw_values:
            ctx.add((*path, "file"), f"{rel} has a header but no data rows; add rows")
            return None

    values: list[Scalar] = []
    for text_value, lineno in raw_values:
        if vtype == "string":
            values.append(text_value)
            continue
        try:
            number: Scalar = int(text_value) if vtype == "integer" else float(text_value)
        except ValueError:
            ctx.add(
                (*path, "file"),
                f"{rel} line {lineno}: {_show(text_value)} is not "
                f"{'an integer' if vtype == 'integer' else 'a number'}; "
                "fix the value or drop the type",
            )
            return None
        if isinstance(number, float) and not math.isfinite(number):
            ctx.add((*path, "file"), f"{rel} line {lineno}: {text_value} is not a finite number")
            return None
        if _int_out_of_range(number):
            ctx.add((*path, "file"), f"{rel} line {lineno}: {number} does not fit in 64 bits")
            return None
        values.append(number)
    return _Leaf(
        name, path, values, origin=rel, lines=[lineno for _, lineno in raw_values], source="file"
    )


def _unify_leaf_types(ctx: _Ctx, leaf: _Leaf) -> type | None:
    if isinstance(leaf.values, range):
        return int
    kinds = {type(v) for v in leaf.values}
    if len(kinds) == 1:
        return kinds.pop()
    if kinds == {int, float}:
        leaf.values = [float(v) for v in leaf.values]
        return float
    shown = " and ".join(sorted(_TYPE_WORDS[t] for t in kinds))
    hint = ""
    if bool in kinds and str in kinds:
        hint = " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote them)"
    elif str in kinds:
        hint = " (quote the numbers to make them all strings)"
    ctx.add(leaf.path, f"values mix {shown}; a column has one type{hint}")
    return None


_TYPE_WORDS = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}


def _value_key(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _where(leaf: _Leaf, first: int, second: int) -> str:
    if leaf.lines is not None:
        return f"{leaf.origin} lines {leaf.lines[first]} and {leaf.lines[second]}"
    return f"items {first} and {second}"


def _check_unique(ctx: _Ctx, node: _Node, bound: set[str], *, report: bool) -> bool:
    """Whether the rows of ``node`` (a product member or the root) differ in their bound values.

    Reports the cause when ``report`` is true. Members of a zip may repeat values; only the zip's
    tuples must be distinct.
    """
    if isinstance(node, _Product):
        results = [_check_unique(ctx, c, bound, report=report) for c in node.children]
        return all(results)
    if isinstance(node, _Leaf):
        return _leaf_unique(ctx, node, bound, report=report)
    # A zip is distinct as soon as one member is; otherwise compare its tuples.
    if any(_unique_quiet(c, bound) for c in node.children):
        return True
    bound_idx = [i for i, n in enumerate(node.names) if n in bound]
    seen: dict[str, int] = {}
    for i, values in enumerate(node.iter()):
        key = _value_key([values[j] for j in bound_idx])
        if key in seen:
            if report:
                if not bound_idx:
                    ctx.add(
                        node.path,
                        f"none of {', '.join(node.names)} is bound, so this zip "
                        f"of {node.length} rows repeats every row; bind one of "
                        "them, or set allow_duplicates: true",
                    )
                else:
                    shown = ", ".join(f"{node.names[j]}={_show(values[j])}" for j in bound_idx)
                    ctx.add(
                        node.path,
                        f"rows {seen[key]} and {i} of this zip have the same "
                        f"values ({shown}), which would submit the same task "
                        "twice; remove one, or set allow_duplicates: true",
                    )
            return False
        seen[key] = i
    return True


def _unique_quiet(node: _Node, bound: set[str]) -> bool:
    if isinstance(node, _Leaf):
        return node.name in bound and (
            isinstance(node.values, range) or len({_value_key(v) for v in node.values}) == len(node.values)
        )
    if isinstance(node, _Product):
        return all(_unique_quiet(c, bound) for c in node.children)
    return any(_unique_quiet(c, bound) for c in node.children)


def _leaf_unique(ctx: _Ctx, leaf: _Leaf, bound: set[str], *, report: bool) -> bool:
    if leaf.length <= 1 or isinstance(leaf.values, range):
        return True
    if leaf.name not in bound:
        if report:
            ctx.add(
                leaf.path,
                f"'{leaf.name}' is not bound to a node input, so its {leaf.length} "
                "values would repeat every row unchanged; bind it (bindings: "
                f"{{{leaf.name}: NODE.FIELD}}), zip it with a bound axis, or set "
                "allow_duplicates: true",
            )
        return False
    seen: dict[str, int] = {}
    for i, value in enumerate(leaf.values):
        key = _value_key(value)
        if key in seen:
            if report:
                ctx.add(
                    leaf.path,
                    f"duplicate value {_show(value)} ({_where(leaf, seen[key], i)}); remove one, or set "
                    "allow_duplicates: true",
                )
            return False
        seen[key] = i
    return True


# --------------------------------------------------------------------------------------------------
# Rows


def _plan_for(spec: dict[str, Any], base_dir: str | Path | None) -> _Plan:
    return _compile(spec, source="sweep spec", base_dir=Path(base_dir) if base_dir else Path.cwd())


def count_rows(spec: dict[str, Any], *, base_dir: str | Path | None = None) -> int:
    """The exact number of rows ``spec`` expands to, computed from the axis lengths (no expansion).

    ``spec`` is checked like :func:`load_spec` does; relative ``file`` paths are resolved against
    ``base_dir`` (default: the current directory; :func:`load_spec` already made them absolute).
    """
    return _plan_for(spec, base_dir).length


def iter_rows(spec: dict[str, Any], *, base_dir: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """Lazily yield the manifest rows of ``spec`` (a dict per row, keys in column order)."""
    plan = _plan_for(spec, base_dir)
    columns = plan.columns
    return (dict(zip(columns, row, strict=True)) for row in _iter_tuples(plan))


def _value_encoder(t: type) -> Callable[[Any], str]:
    """How ``json.dumps`` writes one value of type ``t`` (every column has exactly one type)."""
    if t is bool:
        return lambda v: "true" if v else "false"
    if t is int:
        return int.__repr__
    if t is float:
        return float.__repr__  # json.dumps writes finite floats with repr; we have no others
    return json.encoder.encode_basestring  # type: ignore[no-any-return]  # ensure_ascii=False


def _object_encoder(
    keys: Sequence[str],
    slots: Sequence[int],
    types: Sequence[type],
    fixed: dict[int, Any],
    *,
    item_sep: str,
    key_sep: str,
) -> Callable[[Sequence[Any]], str]:
    """A function writing ``{keys[i]: row[slots[i]]}`` exactly as ``json.dumps`` with
    ``ensure_ascii=False`` and these separators would (keys in the order given), but several times
    faster: values in ``fixed`` slots are encoded once, the rest by a per-type encoder."""
    encode_key = json.encoder.encode_basestring
    parts: list[tuple[str, Callable[[Any], str], int]] = []
    literal = "{"
    for i, (key, slot, t) in enumerate(zip(keys, slots, types, strict=True)):
        literal += (item_sep if i else "") + encode_key(key) + key_sep
        if slot in fixed:
            literal += _value_encoder(t)(fixed[slot])
        else:
            parts.append((literal, _value_encoder(t), slot))
            literal = ""
    end = literal + "}"

    def encode(row: Sequence[Any]) -> str:
        return "".join([lit + enc(row[slot]) for lit, enc, slot in parts]) + end

    return encode


def _getter(indices: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    if not indices:
        return lambda _row: ()
    if len(indices) == 1:
        i = indices[0]
        return lambda row: (row[i],)
    return operator.itemgetter(*indices)  # type: ignore[return-value]


def _iter_tuples(plan: _Plan) -> Iterator[tuple[Any, ...]]:
    """Rows as tuples aligned with ``plan.columns`` (the hot path: no per-row dicts)."""
    # Every row is first laid out as: axis values..., constants..., workflowId, [seed].
    slots: dict[str, int] = {name: i for i, name in enumerate(plan.axis_names)}
    for name in plan.constants:
        slots[name] = len(slots)
    wf_slot = len(slots)
    tail: tuple[Any, ...] = (*plan.constants.values(), plan.workflow_id)
    fixed = dict(enumerate(tail, start=len(plan.axis_names)))
    seed_slot = wf_slot + 1 if plan.seed_name else None
    if plan.seed_name:
        slots[plan.seed_name] = wf_slot + 1

    column_slot = {"workflowId": wf_slot}
    for name, slot in slots.items():
        column_slot[plan.column_of.get(name, name)] = slot
    out = _getter([column_slot[c] for c in plan.columns[1:]])

    def canonical(keys: list[str]) -> Callable[[Sequence[Any]], str]:
        # Keys sorted, so this is json.dumps(..., sort_keys=True, separators=(",", ":")).
        return _object_encoder(
            keys,
            [column_slot[k] for k in keys],
            [plan.column_types[k] for k in keys],
            fixed,
            item_sep=",",
            key_sep=":",
        )

    id_keys = sorted(["workflowId", *plan.column_of.values()])
    id_json = canonical(id_keys)
    seed_col = plan.column_of.get(plan.seed_name) if plan.seed_name else None
    base_json = canonical([k for k in id_keys if k != seed_col])
    salt = f"rhbatch-seed\0{plan.seed_salt}\0".encode()
    track = plan.allow_duplicates and not plan.unique
    seen: dict[bytes, int] = {}
    sha256 = hashlib.sha256

    for values in plan.root.iter():
        row = values + tail
        occurrence = 1
        if seed_slot is not None:
            base = base_json(row).encode()
            if track:
                key = sha256(base).digest()[:8]
                occurrence = seen[key] = seen.get(key, 0) + 1
            if occurrence > 1:
                base += f"#{occurrence}".encode()
            row += (int.from_bytes(sha256(salt + base).digest()[:4], "big"),)
        digest = sha256(id_json(row).encode()).digest()
        if track and seed_slot is None:
            key = digest[:8]
            occurrence = seen[key] = seen.get(key, 0) + 1
        row_id = "s" + digest.hex()[:16]
        if occurrence > 1:
            row_id += f"-{occurrence}"
        yield (row_id, *out(row))


CSV_ONLY_HINT = "; or write the sweep to .jsonl or .parquet, which keep the value as it is"


def _check_written_values(plan: _Plan, fmt: str) -> None:
    """Refuse, naming the axis or constant, any value that ``rhbatch validate`` would refuse in the
    manifest written as ``fmt``.

    Why refuse rather than rewrite: the fix belongs in the spec, and a refused spec writes nothing,
    while a written manifest that its own validate refuses row by row helps nobody. Rewriting could
    not be right either: a CSV has no way to say that ``=1+1`` is text rather than a formula saved
    by a spreadsheet, and a seed outside ComfyUI's range has no correct replacement. The loader
    itself (:func:`pipeline.manifest.column_problems`) judges each distinct value once, so the two
    cannot disagree. Left to validate and run: files named ``@path``, which are resolved against
    the manifest's directory when it is run and may be put in place after the expansion.
    """
    entries: list[tuple[str, list[Any], list[tuple[PathParts, str]]]] = []  # column, values, where
    for leaf in _leaves(plan.root):
        if isinstance(leaf.values, range):  # integers in order: the ends are the extremes
            picks = sorted({0, len(leaf.values) - 1})
        else:
            first: dict[tuple[type, Any], int] = {}
            for i, value in enumerate(leaf.values):
                first.setdefault((type(value), value), i)
            picks = list(first.values())
        entries.append((plan.column_of.get(leaf.name, leaf.name), [leaf.values[i] for i in picks],
                        [leaf.where(i) for i in picks]))
    for name, value in plan.constants.items():
        entries.append((plan.column_of.get(name, name), [value], [(("constants", name), "")]))
    if plan.seed_name:
        entries.append((plan.column_of[plan.seed_name], [0, 2**32 - 1], [(("derive_seed",), "")] * 2))
    columns = [(column, values) for column, values, _ in entries]
    where = {column: places for column, _, places in entries}

    def refused(text: bool) -> dict[tuple[str | None, int | None], Any]:
        out: dict[tuple[str | None, int | None], Any] = {}
        for problem in column_problems(columns, text=text):
            places = where.get(problem.column or "")
            i = None if places is None or problem.row is None else problem.row - 1
            out.setdefault((problem.column if i is not None else None, i), problem)
        return out

    typed = refused(text=False)
    csv_only = {k: p for k, p in refused(text=True).items() if k not in typed} if fmt == ".csv" else {}
    ctx = _Ctx(source=plan.source, base_dir=plan.base_dir)
    for found, hint in ((typed, ""), (csv_only, CSV_ONLY_HINT)):
        for (column, index), problem in found.items():
            if column is None or index is None:
                ctx.add((), f"rhbatch validate would refuse the {fmt} manifest: {problem}{hint}")
                continue
            path, note = where[column][index]
            ctx.add(
                path,
                f"rhbatch validate would refuse this value{note} in the {fmt} manifest "
                f'(column "{column}": {problem.message}){hint}',
            )
    ctx.raise_if_any()


def _fixed_columns(plan: _Plan) -> dict[int, Any]:
    """Output column index -> value, for the columns that are the same in every row."""
    fixed: dict[str, Any] = {"workflowId": plan.workflow_id}
    for name, value in plan.constants.items():
        fixed[plan.column_of.get(name, name)] = value
    return {i: fixed[c] for i, c in enumerate(plan.columns) if c in fixed}


# --------------------------------------------------------------------------------------------------
# Writing


def expand_sweep(
    spec_path: str | Path,
    out: str | Path,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SweepResult:
    """Expand the spec at ``spec_path`` into ``out`` (``.csv``, ``.jsonl`` or ``.parquet``).

    Refuses, writing nothing, when the sweep has more than ``max_rows`` rows and ``force`` is
    false (:class:`SweepError` naming the count and the fix). The file is written atomically;
    a failed write raises :class:`StorageError` and leaves any previous ``out`` untouched.
    ``progress`` is called with the number of rows written so far, every
    :data:`PROGRESS_EVERY_ROWS` rows (CSV, JSONL) or Parquet batch, and at the end.
    """
    out_path = Path(out)
    fmt = out_path.suffix.lower()
    if fmt not in FORMATS:
        raise SweepError(
            f"{out}: unknown manifest format '{out_path.suffix or '(no extension)'}'; "
            f"name the output .csv, .jsonl or .parquet"
        )
    _, plan = _load(spec_path)
    _check_written_values(plan, fmt)
    rows = plan.length
    if rows > max_rows and not force:
        raise SweepError(
            f"{spec_path}: the sweep expands to {rows:,} rows, more than the limit of "
            f"{max_rows:,}; pass --max-rows {rows} (or --yes) to write them"
        )

    writers: dict[str, Callable[[_Plan, IO[Any], Callable[[int], None]], int]] = {
        ".csv": _write_csv, ".jsonl": _write_jsonl, ".parquet": _write_parquet}
    writer = writers[fmt]
    try:
        with atomic_open(out_path, "wb" if fmt == ".parquet" else "w", newline="") as fh:
            written = writer(plan, fh, progress or (lambda _n: None))
    except OSError as exc:
        raise StorageError(f"{out}: cannot write the manifest: {exc.strerror or exc}") from exc
    return SweepResult(path=out_path, rows=written, columns=list(plan.columns))


def _chunks(plan: _Plan) -> Iterator[list[tuple[Any, ...]]]:
    rows = _iter_tuples(plan)
    while chunk := list(itertools.islice(rows, PROGRESS_EVERY_ROWS)):
        yield chunk


def _write_csv(plan: _Plan, fh: IO[str], progress: Callable[[int], None]) -> int:
    bool_cols = [i for i, c in enumerate(plan.columns) if plan.column_types[c] is bool]

    def bools_as_text(row: tuple[Any, ...]) -> list[Any]:
        cells = list(row)
        for i in bool_cols:
            cells[i] = "true" if cells[i] else "false"
        return cells

    n = 0
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(plan.columns)
    for chunk in _chunks(plan):
        writer.writerows(map(bools_as_text, chunk) if bool_cols else chunk)
        n += len(chunk)
        progress(n)
    return n


def _write_jsonl(plan: _Plan, fh: IO[str], progress: Callable[[int], None]) -> int:
    columns = plan.columns
    # Same text as json.dumps(row, ensure_ascii=False), keys in column order.
    line = _object_encoder(
        columns,
        range(len(columns)),
        [plan.column_types[c] for c in columns],
        _fixed_columns(plan),
        item_sep=", ",
        key_sep=": ",
    )
    n = 0
    for chunk in _chunks(plan):
        fh.write("\n".join(map(line, chunk)) + "\n")
        n += len(chunk)
        progress(n)
    return n


def _write_parquet(plan: _Plan, fh: IO[bytes], progress: Callable[[int], None]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_type = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    schema = pa.schema([pa.field(c, arrow_type[plan.column_types[c]]) for c in plan.columns])
    n = 0
    with pq.ParquetWriter(fh, schema) as writer:  # leaves fh open, for atomic_open to finish
        rows = _iter_tuples(plan)
        while batch := list(itertools.islice(rows, PARQUET_BATCH_ROWS)):
            arrays = [
                pa.array(col, type=schema.field(i).type) for i, col in enumerate(zip(*batch, strict=True))
            ]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            n += len(batch)
            progress(n)
    return n
