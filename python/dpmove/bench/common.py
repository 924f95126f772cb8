"""Shared pieces of the benchmarks: size parsing, percentiles, aligned tables, JSON."""

from __future__ import annotations

import json
import re
import statistics
import sys
from typing import Any, Iterable, List, Sequence

import numpy as np

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'64k' / '64KiB' -> 65536, '2m' -> 2 MiB, '3MB' -> 3e6. Bare k/m/g are binary (fio style)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64k, 2MiB, 1g)")
    v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if v <= 0 or v != int(v):
        raise ValueError(f"size must be a positive whole number of bytes: {text!r}")
    return int(v)


def parse_list(text: str, conv=str) -> List[Any]:
    return [conv(x) for x in str(text).split(",") if x.strip()]


def fmt_size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return f"{n}B"


def percentiles_us(lat_ns: np.ndarray) -> tuple:
    """(p50, p99) in microseconds of the non-negative samples; NaN when there are none."""
    lat = lat_ns[lat_ns >= 0]
    if lat.size == 0:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(lat, [50, 99])
    return float(p50) / 1e3, float(p99) / 1e3


def median(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


class Table:
    """Prints one aligned row per case as soon as it is known (stdout, flushed)."""

    def __init__(self, columns: Sequence[tuple], out=sys.stdout):
        self.columns = columns  # (header, width, format)
        self.out = out
        self.header_done = False

    def _line(self, cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, (_, w, _)) in enumerate(zip(cells, self.columns)))

    def row(self, values: Sequence[Any]) -> None:
        if not self.header_done:
            print(self._line([h for h, _, _ in self.columns]), file=self.out)
            self.header_done = True
        cells = []
        for v, (_, _, f) in zip(values, self.columns):
            if isinstance(v, float) and v != v:
                cells.append("-")
            else:
                cells.append(format(v, f) if f else str(v))
        print(self._line(cells), file=self.out, flush=True)


def dump_json(obj: Any, path: str) -> None:
    text = json.dumps(obj, indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
