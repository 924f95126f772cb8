"""Block checksums: XXH3-64, natively and through the xxhash package, with the same values
(they are part of the block store's on-disk format)."""

from __future__ import annotations

import numpy as np
import pytest

from dpmove import _core
from dpmove.kv import checksum as ck

xxhash = pytest.importorskip("xxhash", reason="the xxhash package is in the test extra")


def test_known_value() -> None:
    # XXH3_64bits("abc"), seed 0: the reference value of the xxHash test vectors.
    assert ck.checksum(b"abc") == 0x78AF5F94892F3950


@pytest.mark.parametrize("n", [0, 1, 3, 16, 17, 128, 129, 240, 241, 4096, 3_076_352])
@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1])
def test_native_matches_package(n: int, seed: int) -> None:
    if not hasattr(_core, "checksum"):
        pytest.fail("this build has no native checksum: the CI build must find xxhash.h (libxxhash-dev)")
    a = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert _core.checksum(a, seed=seed) == xxhash.xxh3_64_intdigest(a.tobytes(), seed=seed)


def test_rows_match_slices() -> None:
    a = np.random.default_rng(7).integers(0, 256, 10_000, dtype=np.uint8)
    rows = np.array([[0, 10], [5, 0], [9_000, 1_000], [1, 4_095]])
    got = ck.checksum(a, rows, seed=99)
    assert got.dtype == np.uint64 and got.shape == (4,)
    assert [int(v) for v in got] == [xxhash.xxh3_64_intdigest(a[o:o + n].tobytes(), seed=99) for o, n in rows]


def test_one_seed_per_row() -> None:
    a = np.random.default_rng(8).integers(0, 256, 5_000, dtype=np.uint8)
    rows = np.array([[0, 100], [100, 4_000], [7, 0]])
    seeds = np.array([1, 2**64 - 1, 12345], dtype=np.uint64)
    got = ck.checksum(a, rows, seeds)
    assert [int(v) for v in got] == [xxhash.xxh3_64_intdigest(a[o:o + n].tobytes(), seed=int(sd))
                                     for (o, n), sd in zip(rows, seeds)]
    with pytest.raises(ValueError, match="one seed per row"):
        ck.checksum(a, rows, seeds[:2])


@pytest.mark.parametrize("rows", [[[0, 10_001]], [[-1, 2]], [[10_000, 1]], [[5, -1]]])
def test_rows_outside_the_buffer_are_refused(rows) -> None:
    a = np.zeros(10_000, dtype=np.uint8)
    with pytest.raises(ValueError, match="outside the 10000-byte buffer"):
        ck.checksum(a, np.array(rows))


def test_bad_row_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        ck.checksum(np.zeros(8, dtype=np.uint8), np.zeros((2, 3), dtype=np.int64))
