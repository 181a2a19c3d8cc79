"""pyarrow arrays made from numpy and bytes only: converting Python objects (``pa.array``,
``pa.scalar``, ``Array.to_numpy``) makes pyarrow import pandas, which costs a third of a second of
every ``rhbatch validate``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def strings(texts: Sequence[str | bytes]) -> Any:
    """``texts`` (``bytes`` as UTF-8) as an Arrow string array."""
    encoded = [t if isinstance(t, bytes) else t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    if offsets[-1] < 2**31:
        kind, offsets = pa.string(), offsets.astype(np.int32)
    else:
        kind = pa.large_string()
    return pa.Array.from_buffers(kind, len(encoded), [None, pa.py_buffer(offsets),
                                                      pa.py_buffer(b"".join(encoded))])


def string(text: str) -> Any:
    """``text`` as an Arrow string scalar."""
    return strings([text])[0]


def int32s(values: np.ndarray) -> Any:
    """A numpy integer array as an Arrow int32 array."""
    data = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(data), [None, pa.py_buffer(data)])


def int64(value: int) -> Any:
    """``value`` as an Arrow int64 scalar."""
    data = np.array([value], dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), 1, [None, pa.py_buffer(data)])[0]


def null(kind: Any) -> Any:
    """The null scalar of Arrow type ``kind``."""
    return pa.nulls(1, kind)[0]


def to_numpy(array: Any, dtype: Any) -> np.ndarray:
    """A null-free Arrow array of a fixed-width type (booleans as 0/1) as a numpy view."""
    if pa.types.is_boolean(array.type):
        return to_numpy(pc.cast(array, pa.uint8()), np.uint8).astype(bool)
    return np.frombuffer(array.buffers()[1], dtype=dtype)[array.offset:array.offset + len(array)]
