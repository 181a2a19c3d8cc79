"""Small deterministic PNG images for simulated outputs.

The pixels are a function of a seed string only (the simulator passes workflowId + canonical
nodeInfoList + output node), so the same inputs always give the same bytes and any changed value
gives a different picture. Written with zlib + struct: no Pillow on the hot path.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from functools import lru_cache

IMAGE_SIZE_PX = 64


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@lru_cache(maxsize=256)
def render_png(seed: str, text: str = "", size: int = IMAGE_SIZE_PX) -> bytes:
    """An RGB ``size`` x ``size`` PNG whose pixels depend only on ``seed``.

    ``text`` (if any) goes into a ``tEXt`` chunk named ``prompt`` like ComfyUI's metadata.
    """
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    c0 = digest[0:3]
    c1 = digest[3:6]
    block = 4 + digest[6] % 13  # checker size in pixels
    shift = digest[7]
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")  # filter type 0
        for x in range(size):
            checker = ((x + shift) // block + y // block) & 1
            base = c0 if checker else c1
            row += bytes(((v + x * 2 + y * 3) & 0xFF) for v in base)
        rows.append(bytes(row))
    raw = b"".join(rows)
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    parts = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header)]
    if text:
        parts.append(_chunk(b"tEXt", b"prompt\x00" + text.encode("latin-1", "replace")))
    parts.append(_chunk(b"IDAT", zlib.compress(raw, 6)))
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)
