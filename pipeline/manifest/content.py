"""What a row sends, as canonical JSON text: its content key, derived id and the manifest fingerprint.

A row's canonical content is the JSON text (keys sorted, separators ``,`` and ``:``, UTF-8, not
ASCII-escaped) of ``[workflowId, [[nodeId, fieldName, fieldValue], ...], options]`` with the node
inputs sorted by (nodeId, fieldName). Its sha256 is the row's content key; a row without a
``row_id`` column is called ``"r" + key[:16 hex]``, which is stable across runs and column order.
:attr:`Manifest.fingerprint <pipeline.manifest.Manifest>` is the sha256 over every row's
``row_id + TAB + content + LF`` in order: it identifies "the same run".

For a manifest whose node inputs all come from columns, the content of every row is assembled by
pyarrow from each column's canonical fragment per distinct value; only the sha256 of each row is
taken one row at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

_ENC = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                        allow_nan=False).encode
_encode_text = json.encoder.encode_basestring  # type: ignore[attr-defined]
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
DIGEST_BYTES = 32
ID_PREFIX_BYTES = 8  # a derived id is "r" + the first 8 bytes of the content key, in hex


def _enc_scalar(value: Any) -> str:
    """JSON of a scalar, exactly as ``_ENC`` writes it, without the pure-Python encoder."""
    cls = value.__class__
    if cls is str:
        return _encode_text(value)
    if cls is bool:
        return "true" if value else "false"
    if cls is int:
        return int.__repr__(value)
    if cls is float and math.isfinite(value):
        return float.__repr__(value)
    return _ENC(value)


def _canonical_item(node: str, name: str, value: Any) -> str:
    return f"[{_encode_text(node)},{_encode_text(name)},{_enc_scalar(value)}]"


def _fragment(node: str, name: str, value: Any) -> str:
    """``_canonical_item``, or ``"null"`` for a value already reported as unreadable."""
    try:
        return _canonical_item(node, name, value)
    except (TypeError, ValueError):
        return "null"


def _content_text(workflow_id: str, fragments: Iterable[str], options: dict[str, Any]) -> str:
    """Canonical JSON of [workflowId, sorted [nodeId, fieldName, fieldValue] triples, options]."""
    return f"[{_ENC(workflow_id)},[{','.join(fragments)}],{_ENC(options)}]"


def content_key(workflow_id: str, node_info_list: Iterable[dict[str, Any]],
                options: dict[str, Any] | None = None) -> str:
    """sha256 hex of a row's canonical content; ``"r" + content_key(...)[:16]`` is its derived id."""
    triples = sorted(([str(i["nodeId"]), str(i["fieldName"]), i["fieldValue"]] for i in node_info_list),
                     key=lambda t: (t[0], t[1]))
    text = _content_text(workflow_id, (_ENC(t) for t in triples), options or {})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _options_text(options: dict[str, Any]) -> str:
    return _ENC(options) if options else "{}"


# -- many rows at once ----------------------------------------------------------------------------


def join_pieces(pieces: Sequence[Any]) -> Any:
    """Row by row, the concatenation of ``pieces``: Arrow string arrays of one value per row, and
    ``str`` constants the same in every row (at least one piece is an array)."""
    import pyarrow.compute as pc

    from pipeline.manifest import arrow

    merged: list[Any] = []
    for piece in pieces:  # adjacent constants as one: fewer pieces to join in every row
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    args = [arrow.string(p) if isinstance(p, str) else p for p in merged]
    return pc.binary_join_element_wise(*args, arrow.string(""))


def join_rows(pieces: Sequence[bytes | list[bytes]], n: int) -> list[bytes]:
    """Row by row, the concatenation of ``pieces``: lists of one text per row, and ``bytes``
    constants the same in every row."""
    merged: list[bytes | list[bytes]] = []
    for piece in pieces:  # adjacent constants as one: fewer pieces to join in every row
        if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += piece
        else:
            merged.append(piece)
    columns = [itertools.repeat(p, n) if isinstance(p, bytes) else p for p in merged]
    return list(map(b"".join, zip(*columns, strict=True)))


def digests_of(texts: list[bytes]) -> bytes:
    """The sha256 of each text, concatenated: 32 bytes per row."""
    sha = hashlib.sha256
    return b"".join([sha(b).digest() for b in texts])


def derived_ids(digests: bytes) -> np.ndarray:
    """``"r" + digest[:8].hex()`` for each 32-byte digest, as a numpy array of 17-byte strings."""
    prefix = np.frombuffer(digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES)[:, :ID_PREFIX_BYTES]
    out = np.empty((prefix.shape[0], 1 + 2 * ID_PREFIX_BYTES), dtype=np.uint8)
    out[:, 0] = ord("r")
    out[:, 1::2] = _HEX[prefix >> 4]
    out[:, 2::2] = _HEX[prefix & 15]
    return out.view(f"S{1 + 2 * ID_PREFIX_BYTES}").ravel()


def fingerprint_update(fingerprint: Any, ids: Any, texts: Any) -> None:
    """Add ``row_id TAB content LF`` of each row (Arrow string arrays) to ``fingerprint``."""
    import pyarrow as pa

    lines = join_pieces([ids, "\t", texts, "\n"]).cast(pa.binary())
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
    start, stop = int(offsets[lines.offset]), int(offsets[lines.offset + len(lines)])
    fingerprint.update(memoryview(lines.buffers()[2])[start:stop])


def first_seen(digests: bytes, rows: np.ndarray) -> list[tuple[int, int]]:
    """``(row, earlier)`` for each of ``rows`` (0-based, ascending) whose digest an earlier one of
    ``rows`` has, ``earlier`` being the first of them; in row order."""
    if len(rows) < 2:
        return []
    table = np.frombuffer(digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    keys = np.frombuffer(digests, dtype=np.uint64)[::DIGEST_BYTES // 8][rows]  # the first 8 bytes
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    candidates = rows[counts[inverse] > 1]
    first: dict[bytes, int] = {}
    out = []
    for row in candidates.tolist():
        earlier = first.setdefault(table[row].tobytes(), row)
        if earlier != row:
            out.append((row, earlier))
    return out
