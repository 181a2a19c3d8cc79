"""``rhbatch report DIR``: one self-contained HTML page about a run.

The page (default ``DIR/report.html``) holds:

- a summary: rows per state, coins spent, task time (median, p90 of ``taskCostTime``), throughput
  (finished rows per hour between the first submit and the last finish), downloads per state, the
  run's source manifest;
- for a run on several keys, each key's rows by outcome, coins, money and why it was retired
  (``report_keys``);
- a contact sheet: thumbnails of the downloaded outputs laid out along two input columns (``x``
  across, ``y`` down). By default these are the two bound input columns with the most distinct
  values (the one with fewer values goes across); with one varying column, or axes too wide to
  draw, the rows are shown as a plain grid in input order. A row without a downloaded image shows a
  placeholder with its status. Each thumbnail is captioned with its row number and id and with
  the values of the (at most three) input columns that tell apart the rows drawn in one cell: the
  sheet's third axis, such as the seed of a prompt x cfg sheet;
- failure triage: FAILED, CANCELLED and SUBMIT_UNKNOWN rows grouped by
  ``(status, error_code, failedReason.node_id, failedReason.exception_type)``, each group with how
  its rows spread over the input columns that vary in the run ("all 12 failures have
  5.width = 2048") and a table of its first rows with their error text.

Self-contained: inline CSS, no script, no external stylesheet, font or image; thumbnails are
base64 data URIs made with Pillow from the files in ``DIR/files/``, and a Content-Security-Policy
meta tag forbids loading anything else. Links to the full files are relative to the page (``files/...``
when the page sits in ``DIR``), so they open wherever the run directory is copied. Every piece of
user text is HTML-escaped. The run is read with a read-only connection, so a report can be built
while the run is still going.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline._files import atomic_write, entry_in
from pipeline.errors import StorageError, UsageError, code_name
from pipeline.safetext import escape_controls
from pipeline.store import FAILED, STATES, SUBMIT_UNKNOWN, RunPaths, RunStore

THUMB_PX = 160
THUMB_JPEG_QUALITY = 82
MAX_THUMBS = 1500  # thumbnails on one page; beyond this the sheet says how many were left out
MAX_X_VALUES = 40  # more distinct x values than this: a plain grid instead of a table
MAX_PER_CELL = 6  # rows sharing one (x, y) cell that are drawn; the rest are counted
DISTINCT_CAP = 5000  # distinct values tracked per column (a unique prompt per row is not an axis)
MAX_GROUPS = 200  # failure groups tracked; the rest are counted in the last line
TRIAGE_ROWS = 10  # example rows listed per failure group
MAX_LISTED_VALUES = 5
MAX_LABELS = 3  # varying columns (beyond the axes) named under each thumbnail
TEXT_CAP = 600  # characters of an error text shown in a table cell
THUMB_WORKERS = min(8, os.cpu_count() or 1)

PROBLEM_STATES = (FAILED, "CANCELLED", SUBMIT_UNKNOWN)
IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"})
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: Any) -> str:
    """``value`` as HTML text: markup escaped, and every control character but the line breaks and
    tabs a ``<pre>`` or a tooltip shows written as a visible escape (``\\x1b``), so an escape
    sequence from the service shows as text, never as a raw byte in the page."""
    text = "" if value is None else str(value)
    if _HTML_CONTROLS.search(text):
        text = _HTML_CONTROLS.sub(lambda m: escape_controls(m.group()), text)
    return html.escape(text, quote=True)


# Control characters that are not whitespace HTML shows (HTML forbids most of them in a page).
_HTML_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def shown(value: Any) -> str:
    """An input value as a person reads it: text as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def value_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def cut_words(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, cut after a whole word when one ends in the last
    third of the room (a single long word, a path or a URL is cut where it must), then "…"."""
    if len(text) <= limit:
        return text
    room = max(limit - 1, 0)
    head = text[:room]
    space = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    if space >= room * 2 // 3 and not text[room].isspace():
        head = head[:space]
    return head.rstrip() + "…"


def _cut(text: str, limit: int = TEXT_CAP) -> str:
    return cut_words(text, limit)


@dataclass
class ColumnStats:
    """Distinct values of one input column, in first-seen order, with row counts."""

    counts: Counter[str] = field(default_factory=Counter)
    values: dict[str, Any] = field(default_factory=dict)
    overflow: bool = False  # more than DISTINCT_CAP distinct values: not tracked further

    def add(self, value: Any) -> None:
        if self.overflow:
            return
        key = value_key(value)
        if key not in self.values:
            if len(self.values) >= DISTINCT_CAP:
                self.overflow = True
                self.values.clear()
                self.counts.clear()
                return
            self.values[key] = value
        self.counts[key] += 1

    @property
    def distinct(self) -> int:
        return DISTINCT_CAP + 1 if self.overflow else len(self.values)

    def ordered(self) -> list[str]:
        """Numbers in numeric order, anything else in the order the manifest gave."""
        keys = list(self.values)
        if keys and all(isinstance(self.values[k], int | float) and not isinstance(self.values[k], bool)
                        for k in keys):
            keys.sort(key=lambda k: self.values[k])
        return keys


@dataclass
class FailureGroup:
    status: str
    code: int | None
    node_id: str | None
    node_name: str | None
    exception_type: str | None
    count: int = 0
    message: str = ""
    spread: dict[str, Counter[str]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunFacts:
    total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    coins: float = 0.0
    task_times: list[float] = field(default_factory=list)
    first_submit: float | None = None
    last_finish: float | None = None
    finished: int = 0
    workflows: Counter[str] = field(default_factory=Counter)
    columns: dict[str, ColumnStats] = field(default_factory=dict)
    groups: dict[tuple[Any, ...], FailureGroup] = field(default_factory=dict)
    other_failures: int = 0


@dataclass
class Cell:
    """One row drawn on the contact sheet."""

    number: int
    row_id: str
    status: str
    task_id: str | None
    inputs: dict[str, Any]
    error: str | None
    thumb: str | None = None  # data URI
    href: str | None = None  # relative link to the full file
    file_note: str = ""


# -- reading the run ----------------------------------------------------------------------------


def _failure_key(row: Any, reason: Any) -> tuple[Any, ...]:
    reason = reason if isinstance(reason, dict) else {}
    node = reason.get("node_id")
    return (row["status"], row["error_code"], None if node is None else str(node),
            reason.get("exception_type"))


def _collect(store: RunStore, columns: list[str]) -> RunFacts:
    facts = RunFacts()
    facts.columns = {c: ColumnStats() for c in columns}
    for row in store.iter_rows():
        facts.total += 1
        status = row["status"]
        facts.counts[status] = facts.counts.get(status, 0) + 1
        facts.workflows[row["workflow_id"]] += 1
        if row["coins"] is not None:
            facts.coins += float(row["coins"])
        if row["task_cost_s"] is not None:
            facts.task_times.append(float(row["task_cost_s"]))
        if row["submitted_at"] is not None:
            facts.first_submit = min(facts.first_submit or row["submitted_at"], row["submitted_at"])
        if row["finished_at"] is not None and status in ("SUCCESS", FAILED):
            facts.finished += 1
            facts.last_finish = max(facts.last_finish or row["finished_at"], row["finished_at"])
        inputs = json.loads(row["inputs"] or "{}")
        for column, stats in facts.columns.items():
            stats.add(inputs.get(column))
        if status in PROBLEM_STATES:
            _add_failure(facts, row, inputs, columns)
    return facts


def _add_failure(facts: RunFacts, row: Any, inputs: dict[str, Any], columns: list[str]) -> None:
    reason = json.loads(row["failed_reason"]) if row["failed_reason"] else None
    key = _failure_key(row, reason)
    group = facts.groups.get(key)
    if group is None:
        if len(facts.groups) >= MAX_GROUPS:
            facts.other_failures += 1
            return
        info = reason if isinstance(reason, dict) else {}
        group = FailureGroup(key[0], key[1], key[2], info.get("node_name"), key[3])
        facts.groups[key] = group
    group.count += 1
    info = reason if isinstance(reason, dict) else {}
    message = str(info.get("exception_message") or row["error"] or "")
    if not group.message and message:
        group.message = message
    for column in columns:
        counter = group.spread.setdefault(column, Counter())
        if len(counter) < DISTINCT_CAP:
            counter[value_key(inputs.get(column))] += 1
    if len(group.rows) < TRIAGE_ROWS:
        group.rows.append({
            "number": row["number"], "row_id": row["row_id"], "task_id": row["task_id"],
            "inputs": inputs, "error": row["error"] or "",
            "exception": str(info.get("exception_message") or ""),
        })


def _bound_columns(store: RunStore, columns: list[str]) -> list[str]:
    bound = store.get_meta("bound")
    names = list(bound) if isinstance(bound, dict | list) else []
    chosen = [c for c in columns if c in names] if names else []
    return chosen or columns


def choose_axes(facts: RunFacts, candidates: Sequence[str], x: str | None, y: str | None,
                columns: Sequence[str]) -> tuple[str | None, str | None]:
    """The contact sheet's axes: the user's, else the two varying candidates with most values."""
    for name, flag in ((x, "--x"), (y, "--y")):
        if name is not None and name not in facts.columns:
            raise UsageError(
                f"{flag} {name!r} is not an input column of this run: choose from "
                f"{', '.join(columns) or '(none)'}"
            )
    if x is not None and x == y:
        raise UsageError(f"--x and --y are both {x!r}: choose two different columns")
    varying = [c for c in candidates if facts.columns[c].distinct > 1 and c not in (x, y)]
    order = {c: i for i, c in enumerate(columns)}
    varying.sort(key=lambda c: (-facts.columns[c].distinct, order.get(c, 0)))
    if x is None and y is None:
        top = sorted(varying[:2], key=lambda c: (facts.columns[c].distinct, order.get(c, 0)))
        return (top[0] if top else None), (top[1] if len(top) > 1 else None)
    if x is None:
        x = varying[0] if varying else None
    elif y is None:
        y = varying[0] if varying else None
    return x, y


# -- thumbnails ---------------------------------------------------------------------------------


def thumbnail(path: Path, size: int) -> str | None:
    """A data URI of a thumbnail at most ``size`` px on its long side, or None if not an image."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.draft("RGB", (size * 2, size * 2))
                image.seek(0)
                image.thumbnail((size, size))
                alpha = image.mode in ("RGBA", "LA", "PA") or (
                    image.mode == "P" and "transparency" in image.info)
                buf = io.BytesIO()
                if alpha:
                    image.convert("RGBA").save(buf, "PNG", optimize=True)
                    mime = "image/png"
                else:
                    image.convert("RGB").save(buf, "JPEG", quality=THUMB_JPEG_QUALITY)
                    mime = "image/jpeg"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        return None
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _attach_files(store: RunStore, cells: dict[int, Cell], out_dir: Path, thumb_px: int) -> int:
    """Give each drawn row its first downloaded file: a relative link and, for images, a thumb."""
    files_dir = store.run_dir / RunPaths.FILES
    jobs: list[tuple[Cell, Path]] = []
    for idx, cell in cells.items():
        for f in store.files_for(idx):
            if f["status"] != "DOWNLOADED" or not f["path"]:
                cell.file_note = cell.file_note or f"file {str(f['status']).lower()}"
                continue
            path = store.run_dir / f["path"]
            if not entry_in(path, files_dir) or path.is_symlink() or not path.is_file():
                cell.file_note = "downloaded file missing"
                continue
            rel = os.path.relpath(path, out_dir)
            cell.href = quote(rel.replace(os.sep, "/"))
            ext = path.suffix.lower().lstrip(".")
            cell.file_note = "" if ext in IMAGE_EXTS else ext.upper()
            jobs.append((cell, path))
            break
        else:
            if not cell.file_note and cell.status == "SUCCESS":
                cell.file_note = "not downloaded"
    with ThreadPoolExecutor(max_workers=THUMB_WORKERS) as pool:
        thumbs = list(pool.map(lambda job: thumbnail(job[1], thumb_px), jobs))
    made = 0
    for (cell, _path), thumb in zip(jobs, thumbs, strict=True):
        cell.thumb = thumb
        made += thumb is not None
    return made


def _flat_reason(facts: RunFacts, x: str | None, y: str | None) -> str:
    """Why the sheet cannot be a table along ``x``/``y`` (empty: it can)."""
    if x is None:
        return "no input column varies between rows" if facts.total > 1 else ""
    if facts.columns[x].distinct > MAX_X_VALUES:
        return f"{x} has more than {MAX_X_VALUES} values, too many to lay out across"
    if y is not None and facts.columns[y].overflow:
        return f"{y} has more than {DISTINCT_CAP:,} values, too many to lay out down"
    return ""


def _cells(store: RunStore, x: str | None, y: str | None, facts: RunFacts
           ) -> tuple[dict[int, Cell], dict[tuple[str, str], list[int]], list[str], list[str], int]:
    """Rows placed on the sheet (at most MAX_THUMBS), and the grid positions for axes."""
    xs = facts.columns[x].ordered() if x else []
    ys = facts.columns[y].ordered() if y else [""]
    cells: dict[int, Cell] = {}
    grid: dict[tuple[str, str], list[int]] = {}
    left_out = 0
    for row in store.iter_rows():
        inputs = json.loads(row["inputs"] or "{}")
        pos = (value_key(inputs.get(x)) if x else "", value_key(inputs.get(y)) if y else "")
        slot = grid.setdefault(pos, [])
        if len(cells) >= MAX_THUMBS or (x and len(slot) >= MAX_PER_CELL):
            left_out += 1
            slot.append(-1)  # counted, not drawn
            continue
        cells[row["idx"]] = Cell(row["number"], row["row_id"], row["status"], row["task_id"],
                                 inputs, row["error"])
        slot.append(row["idx"])
    return cells, grid, xs, ys, left_out


def _cell_axes(cells: dict[int, Cell], grid: dict[tuple[str, str], list[int]],
               candidates: Sequence[str]) -> list[str]:
    """The input columns that tell apart the thumbnails drawn in one cell of the sheet (the axes
    it does not lay out, such as the seed of a cfg x prompt sheet), at most MAX_LABELS. A column
    that varies only from cell to cell (a sampler zipped with the cfg down the sheet) is left out:
    the cell's position says it already."""
    found: list[str] = []
    for column in candidates:
        for slot in grid.values():
            if len({value_key(cells[i].inputs.get(column)) for i in slot if i >= 0}) > 1:
                found.append(column)
                break
        if len(found) >= MAX_LABELS:
            break
    return found


# -- rendering ---------------------------------------------------------------------------------


STYLE = """
:root{--fg:#1d2330;--muted:#667085;--line:#d9dee8;--bg:#f6f7fb;--card:#fff;--ok:#1a7f37;
--bad:#c62828;--warn:#b26a00;--live:#2457c5}
*{box-sizing:border-box}
body{margin:0;padding:24px 32px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px}h3{font-size:15px;margin:0 0 6px}
.muted{color:var(--muted)}.note{color:var(--muted);font-size:12.5px;margin:4px 0 10px}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start;margin-top:16px}
.row h3{margin:0 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;min-width:140px}
.card .v{font-size:20px;font-weight:600}.card .k{color:var(--muted);font-size:12px}
table{border-collapse:collapse;background:var(--card)}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f7;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.sheet-wrap{overflow:auto;max-width:100%;border:1px solid var(--line);border-radius:8px;
background:var(--card)}
table.sheet th{position:sticky;top:0;z-index:1;max-width:220px;font-weight:500;font-size:12px;
overflow-wrap:break-word}
table.sheet th.yh{position:sticky;left:0;z-index:2;background:#eef1f7;min-width:3em}
table.sheet td{padding:4px;text-align:center}
.cellrow{display:flex;flex-wrap:wrap;gap:4px;justify-content:center}
.flat{display:flex;flex-wrap:wrap;gap:8px;padding:8px}
.thumb{display:flex;flex-direction:column;align-items:center;text-decoration:none;color:inherit}
.thumb img{display:block;border-radius:4px;background:#eee;max-width:100%}
.ph{display:flex;flex-direction:column;align-items:center;justify-content:center;border-radius:4px;
border:1px dashed var(--line);font-size:11.5px;color:var(--muted);text-align:center;padding:4px;
background:repeating-linear-gradient(45deg,#fafbfd,#fafbfd 6px,#f1f3f8 6px,#f1f3f8 12px)}
.ph b{font-size:12px}
.s-SUCCESS{color:var(--ok)}.s-FAILED,.s-CANCELLED{color:var(--bad)}.s-SUBMIT_UNKNOWN{color:var(--warn)}
.s-QUEUED,.s-RUNNING,.s-SUBMITTING,.s-PENDING{color:var(--live)}
.cap{font-size:11px;color:var(--muted);max-width:160px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.cap.lab{color:var(--fg)}
.group{background:var(--card);border:1px solid var(--line);border-left:4px solid var(--bad);
border-radius:8px;padding:12px 16px;margin:12px 0}
.group ul{margin:6px 0 10px;padding-left:20px}
.group pre,td pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px}
.hl{font-weight:600}
code{background:#eef1f7;padding:0 4px;border-radius:3px}
"""


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _p90(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def _iso(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "n/a"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _card(value: str, label: str) -> str:
    return f'<div class="card"><div class="v">{esc(value)}</div><div class="k">{esc(label)}</div></div>'


def _amount(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"


def _billing_html(spending: Any) -> str:
    """Coins and money billed by how the tasks ended; tasks whose cost was never reported."""
    rows = [(status, spending.by_status.get(status)) for status in ("SUCCESS", FAILED, "CANCELLED")]
    rows = [(status, b) for status, b in rows if b and b["tasks"]]
    money = spending.money or spending.third_party_money
    parts = ['<div><h3>Billed by outcome</h3><table><tr><th>outcome</th><th>coins</th>']
    if money:
        parts.append("<th>money</th><th>third-party money</th>")
    parts.append("</tr>")
    for status, bucket in rows:
        parts.append(f'<tr><td class="s-{esc(status)}">{esc(status)}</td>'
                     f'<td class="num">{_amount(bucket["coins"])}</td>')
        if money:
            parts.append(f'<td class="num">{_amount(bucket["money"])}</td>'
                         f'<td class="num">{_amount(bucket["third_party_money"])}</td>')
        parts.append("</tr>")
    parts.append("</table>")
    if spending.unpriced:
        parts.append(f'<p class="note">{spending.unpriced:,} task(s) ran without a reported cost: '
                     "shown as unknown, not counted as 0.</p>")
    parts.append("</div>")
    return "".join(parts)


def _summary_html(store: RunStore, facts: RunFacts, file_counts: dict[str, int]) -> str:
    spending = store.spending()
    median = statistics.median(facts.task_times) if facts.task_times else None
    span = None
    if facts.first_submit is not None and facts.last_finish is not None:
        span = facts.last_finish - facts.first_submit
    rate = f"{facts.finished / (span / 3600):,.1f}" if span and span > 0 else "n/a"
    ok = facts.counts.get("SUCCESS", 0)
    parts = [
        '<section id="summary"><div class="cards">',
        _card(f"{facts.total:,}", "rows"),
        _card(f"{ok:,}", "succeeded"),
        _card(f"{sum(facts.counts.get(s, 0) for s in PROBLEM_STATES):,}", "failed / cancelled / unknown"),
        _card(_amount(spending.coins), "coins spent"),
        _card(_fmt_s(median), "median task time"),
        _card(_fmt_s(_p90(facts.task_times)), "p90 task time"),
        _card(rate, "rows finished per hour"),
        _card(f"{file_counts.get('DOWNLOADED', 0):,}", "files downloaded"),
        '</div><div class="row"><div><h3>Rows per state</h3><table><tr>',
        "".join(f"<th>{esc(s)}</th>" for s in facts.counts if facts.counts[s] or s in ("SUCCESS", FAILED)),
        "</tr><tr>",
        "".join(f'<td class="num s-{esc(s)}">{facts.counts[s]:,}</td>'
                for s in facts.counts if facts.counts[s] or s in ("SUCCESS", FAILED)),
        "</tr></table></div>",
    ]
    parts.append(_billing_html(spending))
    if file_counts:
        parts.append('<div><h3>Output files</h3><table><tr>')
        parts.append("".join(f"<th>{esc(s)}</th>" for s in file_counts))
        parts.append("</tr><tr>")
        parts.append("".join(f'<td class="num">{n:,}</td>' for n in file_counts.values()))
        parts.append("</tr></table></div>")
    details = [
        ("source", store.get_meta("manifest_source") or "n/a"),
        ("run directory", str(store.run_dir)),
        ("created", _iso(store.get_meta("created_at"))),
        ("first submit", _iso(facts.first_submit)),
        ("last finish", _iso(facts.last_finish)),
        ("workflows", ", ".join(f"{w} ({n:,} rows)" for w, n in facts.workflows.most_common(5))),
    ]
    parts.append("<div><h3>Run</h3><table>")
    parts.extend(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in details)
    parts.append("</table></div></div>")
    if file_counts.get("EXPIRED"):
        parts.append('<p class="note">EXPIRED files outlived RunningHub\'s ~24 h URL lifetime; '
                     "rhbatch never regenerates a task to recover a file.</p>")
    pending = sum(n for s, n in file_counts.items() if s not in ("DOWNLOADED", "EXPIRED"))
    if ok and (pending or not file_counts):
        parts.append(f'<p class="note">Run <code>rhbatch download {esc(store.run_dir)}</code> to fetch '
                     "the outputs that are not on disk yet (URLs last about 24 h).</p>")
    parts.append("</section>")
    return "".join(parts)


def _inputs_text(inputs: dict[str, Any], columns: Iterable[str]) -> str:
    return "\n".join(f"{c} = {_cut(shown(inputs.get(c)), 300)}" for c in columns if c in inputs)


def _cell_html(cell: Cell, columns: Sequence[str], thumb_px: int,
               labels: Sequence[str] = ()) -> str:
    """One thumbnail (or placeholder) with its row number and id, and under them the values of
    ``labels``: the varying input columns that the sheet's axes do not show (the third axis)."""
    title = "\n".join(filter(None, [
        f"row {cell.number} · {cell.row_id}",
        _inputs_text(cell.inputs, columns),
        f"status: {cell.status}",
        f"taskId: {cell.task_id}" if cell.task_id else "",
        f"error: {_cut(cell.error, 300)}" if cell.error else "",
    ]))
    box = f"width:{thumb_px}px;height:{thumb_px}px"
    if cell.thumb:
        inner = f'<img src="{cell.thumb}" alt="row {cell.number}" style="max-height:{thumb_px}px">'
    else:
        note = cell.file_note or ("" if cell.status == "SUCCESS" else "no output")
        inner = (f'<div class="ph" style="{box}"><b class="s-{esc(cell.status)}">{esc(cell.status)}</b>'
                 f"<span>{esc(note)}</span></div>")
    caption = f'<div class="cap">#{cell.number} {esc(cell.row_id)}</div>'
    shown_labels = [f"{c} = {_cut(shown(cell.inputs.get(c)), 40)}" for c in labels
                    if c in cell.inputs]
    if shown_labels:
        caption += f'<div class="cap lab">{esc(" · ".join(shown_labels))}</div>'
    if cell.href:
        return f'<a class="thumb" href="{esc(cell.href)}" title="{esc(title)}">{inner}{caption}</a>'
    return f'<div class="thumb" title="{esc(title)}">{inner}{caption}</div>'


def _sheet_html(x: str | None, y: str | None, facts: RunFacts, cells: dict[int, Cell],
                grid: dict[tuple[str, str], list[int]], xs: list[str], ys: list[str], left_out: int,
                columns: Sequence[str], thumb_px: int, link_base: str, flat_reason: str,
                labels: Sequence[str] = ()) -> str:
    parts = ['<section id="sheet"><h2>Contact sheet</h2>']
    note = (f"Links open the full files; they are relative to this page ({esc(link_base)}), so keep "
            "the page next to the run's <code>files/</code> folder. Hover a thumbnail for the row's "
            "inputs, status and task id.")
    if x:
        title = f"<b>{esc(x)}</b> across" + (f", <b>{esc(y)}</b> down" if y else "")
        parts.append(f'<p class="note">{title}. {note}</p><div class="sheet-wrap"><table class="sheet">')
        parts.append(f'<tr><th class="yh">{esc(y or "")}</th>')
        parts.extend(f'<th title="{esc(shown(facts.columns[x].values[k]))}">'
                     f"{esc(_cut(shown(facts.columns[x].values[k]), 120))}</th>" for k in xs)
        parts.append("</tr>")
        y_values = facts.columns[y].values if y else {"": ""}
        for ky in ys:
            if not any(i >= 0 for kx in xs for i in grid.get((kx, ky), [])):
                continue
            label = shown(y_values[ky]) if y else ""
            parts.append(f'<tr><th class="yh" title="{esc(label)}">{esc(_cut(label, 120))}</th>')
            for kx in xs:
                slot = grid.get((kx, ky), [])
                drawn = [_cell_html(cells[i], columns, thumb_px, labels) for i in slot if i >= 0]
                more = sum(1 for i in slot if i < 0)
                extra = f'<div class="note">+{more} more</div>' if more else ""
                parts.append(f'<td><div class="cellrow">{"".join(drawn)}</div>{extra}</td>')
            parts.append("</tr>")
        parts.append("</table></div>")
    else:
        why = f"{esc(flat_reason)}: " if flat_reason else ""
        parts.append(f'<p class="note">{why}rows in input order. {note}</p><div class="sheet-wrap flat">')
        parts.extend(_cell_html(cells[i], columns, thumb_px, labels) for i in sorted(cells))
        parts.append("</div>")
    if left_out:
        parts.append(f'<p class="note">{left_out:,} more rows are not drawn (the sheet shows at most '
                     f"{MAX_THUMBS:,} thumbnails and {MAX_PER_CELL} per cell); choose other axes with "
                     "<code>--x</code> / <code>--y</code>.</p>")
    parts.append("</section>")
    return "".join(parts)


def _spread_lines(group: FailureGroup, facts: RunFacts, varying: Sequence[str]) -> list[str]:
    lines: list[tuple[int, str]] = []
    failures = "failure" if group.count == 1 else "failures"
    for column in varying:
        counter = group.spread.get(column)
        stats = facts.columns[column]
        if not counter:
            continue
        if len(counter) == 1:
            key = next(iter(counter))
            value = shown(json.loads(key))
            total = stats.counts.get(key)
            share = f" ({total:,} of {facts.total:,} rows have that value)" if total else ""
            subject = f"all {group.count:,} {failures} have" if group.count > 1 else "the failure has"
            lines.append((0, f'<li class="hl">{subject} {esc(column)} = {esc(_cut(value, 200))}'
                             f'<span class="muted">{esc(share)}</span></li>'))
        elif len(counter) <= MAX_LISTED_VALUES:
            listed = ", ".join(
                f"{esc(_cut(shown(json.loads(k)), 80))} ×{n}"
                + (f" <span class=\"muted\">(of {stats.counts[k]:,})</span>" if stats.counts.get(k) else "")
                for k, n in counter.most_common()
            )
            lines.append((1, f"<li>{esc(column)}: {listed}</li>"))
        else:
            lines.append((2, f'<li class="muted">{esc(column)}: spread over {len(counter):,} values</li>'))
    return [text for _, text in sorted(lines, key=lambda item: item[0])]


def _triage_html(facts: RunFacts, varying: Sequence[str], columns: Sequence[str]) -> str:
    parts = ['<section id="triage"><h2>Failure triage</h2>']
    groups = sorted(facts.groups.values(), key=lambda g: -g.count)
    if not groups:
        parts.append('<p class="muted">No failed, cancelled or unknown rows.</p></section>')
        return "".join(parts)
    total = sum(g.count for g in groups) + facts.other_failures
    parts.append(f'<p class="note">{total:,} rows grouped by status, error code, failing node and '
                 "exception type; each group shows how its rows spread over the input columns that "
                 "vary in this run.</p>")
    parts.append("<table><tr><th>rows</th><th>status</th><th>code</th><th>node</th>"
                 "<th>exception</th><th>message</th></tr>")
    for n, g in enumerate(groups):
        node = "" if g.node_id is None else g.node_id + (f" ({g.node_name})" if g.node_name else "")
        code = "" if g.code is None else f"{g.code} {code_name(g.code)}"
        parts.append(
            f'<tr><td class="num"><a href="#g{n}">{g.count:,}</a></td><td class="s-{esc(g.status)}">'
            f"{esc(g.status)}</td><td>{esc(code)}</td><td>{esc(node)}</td>"
            f"<td>{esc(g.exception_type or '')}</td><td>{esc(_cut(g.message, 200))}</td></tr>"
        )
    parts.append("</table>")
    if facts.other_failures:
        parts.append(f'<p class="note">{facts.other_failures:,} more rows fall in further groups '
                     f"(only the first {MAX_GROUPS} groups are kept).</p>")
    for n, g in enumerate(groups):
        heading = " · ".join(filter(None, [
            g.status,
            f"code {g.code} {code_name(g.code)}" if g.code is not None else "",
            f"node {g.node_id}" + (f" ({g.node_name})" if g.node_name else "") if g.node_id else "",
            g.exception_type or "",
        ]))
        parts.append(f'<div class="group" id="g{n}"><h3>{g.count:,} × {esc(heading)}</h3>')
        if g.message:
            parts.append(f"<pre>{esc(_cut(g.message))}</pre>")
        spread = _spread_lines(g, facts, varying) if g.count > 1 else []
        if spread:
            parts.append("<ul>" + "".join(spread) + "</ul>")
        parts.append("<table><tr><th>row</th><th>row_id</th><th>taskId</th><th>inputs</th>"
                     "<th>error</th></tr>")
        for r in g.rows:
            error = r["error"] + (f"\n{r['exception']}" if r["exception"] and r["exception"] not in r["error"]
                                  else "")
            inputs = _inputs_text(r["inputs"], varying or columns)
            parts.append(
                f'<tr><td class="num">{r["number"]}</td><td>{esc(r["row_id"])}</td>'
                f'<td>{esc(r["task_id"] or "")}</td><td><pre>{esc(inputs)}</pre></td>'
                f"<td><pre>{esc(_cut(error))}</pre></td></tr>"
            )
        parts.append("</table>")
        if g.count > len(g.rows):
            parts.append(f'<p class="note">first {len(g.rows)} of {g.count:,} rows shown.</p>')
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def _write_atomic(target: Path, text: str) -> None:
    try:
        atomic_write(target, text, chmod=0o644)
    except OSError as exc:
        raise StorageError(f"Cannot write {target}: {exc.strerror or exc}: free disk space or fix "
                           "permissions, then run `rhbatch report` again") from None


def render(store: RunStore, *, x: str | None, y: str | None, out: Path, thumb_px: int) -> str:
    """The report page for ``store`` as text (``out`` is where it will live, for relative links)."""
    from pipeline.report_keys import keys_section  # it reads status, which imports this module

    columns = list(store.get_meta("columns") or [])
    if not columns:
        first = next(store.iter_rows(batch=1), None)
        columns = list(json.loads(first["inputs"] or "{}")) if first is not None else []
    facts = _collect(store, columns)
    x, y = choose_axes(facts, _bound_columns(store, columns), x, y, columns)
    flat_reason = _flat_reason(facts, x, y)
    if flat_reason:
        x = y = None
    cells, grid, xs, ys, left_out = _cells(store, x, y, facts)
    thumbs = _attach_files(store, cells, out.parent, thumb_px)
    file_counts = store.file_counts()
    varying = [c for c in columns if facts.columns[c].distinct > 1]
    link_base = os.path.relpath(store.run_dir / RunPaths.FILES, out.parent).replace(os.sep, "/") + "/"
    title = f"rhbatch report: {store.run_dir.name}"
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>",
        f'<body data-thumbnails="{thumbs}"><h1>{esc(title)}</h1>',
        f'<p class="muted">Generated {esc(_iso(time.time()))} from {esc(store.run_dir)} · '
        f'<a href="#sheet">contact sheet</a> · <a href="#triage">failure triage</a></p>',
        _summary_html(store, facts, file_counts),
        keys_section(store),
        _sheet_html(x, y, facts, cells, grid, xs, ys, left_out, columns, thumb_px, link_base,
                    flat_reason, _cell_axes(cells, grid, [c for c in varying if c not in (x, y)])),
        _triage_html(facts, varying, columns),
        "</body></html>\n",
    ])


def build_report(run_dir: str | Path, *, x: str | None = None, y: str | None = None,
                 out: Path | None = None, thumb_px: int = THUMB_PX) -> Path:
    """Write the run's HTML report (default ``DIR/report.html``) and return its path."""
    if thumb_px < 16 or thumb_px > 1024:
        raise UsageError(f"thumbnail size {thumb_px} px is out of range: use 16 to 1024")
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else RunPaths(run_dir).report
    store = RunStore.open(run_dir, readonly=True)
    try:
        text = render(store, x=x, y=y, out=target.absolute(), thumb_px=thumb_px)
    finally:
        store.close()
    _write_atomic(target, text)
    return target
