"""XXH3-64 checksums of host bytes: natively (``dpmove._core.checksum``, GIL released) when the
module was built with xxhash.h, else through the ``xxhash`` Python package. Both compute the same
XXH3_64bits_withSeed values, which the block store keeps on disk."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .. import _core

__all__ = ["checksum", "provider"]

_native = getattr(_core, "checksum", None)


def provider() -> str:
    """``"native"``, ``"xxhash"`` (the Python package) or ``""`` when neither is available."""
    if _native is not None:
        return "native"
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return ""
    return "xxhash"


def checksum(buf: Any, rows: Optional[np.ndarray] = None, seed: Any = 0) -> Any:
    """XXH3-64 of the whole host buffer (an int), or of each (offset, length) row of an (N, 2)
    integer array (a uint64 array of N). `seed`: an int, or with rows one seed per row."""
    if _native is not None:
        return _native(buf, rows, seed)
    try:
        import xxhash
    except ImportError:
        raise RuntimeError("dpmove was built without xxhash.h and the xxhash package is not installed: "
                           "install libxxhash-dev and rebuild, or pip install xxhash") from None
    mv = memoryview(buf).cast("B")
    if rows is None:
        return xxhash.xxh3_64_intdigest(mv, seed=seed)
    r = np.asarray(rows, dtype=np.int64)
    if r.ndim != 2 or r.shape[1] != 2:
        raise ValueError("checksum: rows must be an integer array of shape (N, 2): offset, length in bytes")
    seeds = np.broadcast_to(np.asarray(seed, dtype=np.uint64), (r.shape[0],)) if np.ndim(seed) == 0 else np.asarray(seed)
    if seeds.shape != (r.shape[0],):
        raise ValueError(f"checksum: seed must be an int or a 1-D array of one seed per row ({r.shape[0]})")
    out = np.empty(r.shape[0], dtype=np.uint64)
    for i, (off, n) in enumerate(r):
        if off < 0 or n < 0 or off + n > len(mv):
            raise ValueError(f"checksum: row {i} (offset {off}, length {n}) lies outside the {len(mv)}-byte buffer")
        out[i] = xxhash.xxh3_64_intdigest(mv[off:off + n], seed=int(seeds[i]))
    return out
