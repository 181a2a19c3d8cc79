"""The report's "Keys" section: for a run on several keys, each key's rows by outcome, what it
was billed and why it was retired (a run on one key has no such section)."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.report import esc
from pipeline.safetext import amount
from pipeline.status import KeyRow, key_breakdown
from pipeline.store import RunStore

KEY_COLUMNS = (("done", ("SUCCESS",)), ("failed", ("FAILED", "CANCELLED")),
               ("unknown", ("SUBMIT_UNKNOWN",)), ("live", ("SUBMITTING", "QUEUED", "RUNNING")))


def keys_html(keys: Sequence[KeyRow]) -> str:
    """The section as HTML (every label and reason escaped); empty for fewer than two keys."""
    if len(keys) < 2:
        return ""
    money = any(k.money for k in keys)
    head = ["key", *(name for name, _ in KEY_COLUMNS), "coins", *(["money"] * money), "retired"]
    parts = ['<section id="keys"><h2>Keys</h2><table><tr>',
             "".join(f"<th>{esc(h)}</th>" for h in head), "</tr>"]
    for key in keys:
        cells = [f'<td class="num">{key.count(*states):,}</td>' for _, states in KEY_COLUMNS]
        cells.append(f'<td class="num">{esc(amount(key.coins))}</td>')
        if money:
            cells.append(f'<td class="num">{esc(amount(key.money))}</td>')
        cells.append(f'<td class="s-FAILED">{esc(key.retired)}</td>' if key.retired else "<td>-</td>")
        parts.append(f'<tr><td title="{esc(key.fingerprint)}">{esc(key.label)}</td>'
                     f'{"".join(cells)}</tr>')
    parts.append("</table>")
    unpriced = sum(k.unpriced for k in keys)
    if unpriced:
        parts.append(f'<p class="note">{unpriced:,} task(s) ran without a reported cost: shown as '
                     "unknown, not counted as 0.</p>")
    parts.append("</section>")
    return "".join(parts)


def keys_section(store: RunStore) -> str:
    """:func:`keys_html` of the run in ``store``."""
    return keys_html(key_breakdown(store))
