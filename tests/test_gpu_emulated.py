"""Host<->device copies on the emulated GPU (Engine(gpu="emulated")).

The emulated GPU keeps device memory in host pages and runs streams as worker threads, with the
batched kernel's span walk on the CPU, so these tests drive the same descriptor building,
chunking, completion and error paths as a real device. A `__cuda_array_interface__` pointer into
memory the emulated provider never handed out (a numpy buffer) is accepted as device memory:
`FakeCudaArray` builds such "CuPy" arrays, so the device side can be poisoned and inspected
directly in NumPy. Every expected result comes from plain NumPy slicing.

`_emulated_gpu_stall` / `_emulated_gpu_inject` are process-wide: the autouse fixture turns
both off before and after every test.
"""

from __future__ import annotations

import math
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import pytest

import dpmove
from dpmove import _core
from conftest import TrackedEngine, aligned_array, assert_done, close_and_check, finished, rand_bytes, write_file

S = dpmove.RequestState
COPY_BACKENDS = ["cuda", "batched", "auto"]
DESCS_PER_TABLE = 4096  # descriptors per batched launch (cpp/include/dpmove/copy.h)
EIO = 5


# --- helpers ---------------------------------------------------------------------------------


class FakeCudaArray:
    """A stand-in for a CuPy array: ``__cuda_array_interface__`` over a numpy buffer."""

    def __init__(self, host: np.ndarray, *, readonly: bool = False, address: Optional[int] = None,
                 nbytes: Optional[int] = None) -> None:
        self.host = host  # keeps the memory alive as long as the "array"
        n = host.nbytes if nbytes is None else nbytes
        self.__cuda_array_interface__ = {
            "shape": (n,),
            "typestr": "|u1",
            "data": (host.ctypes.data if address is None else address, readonly),
            "strides": None,
            "version": 3,
        }


class FakeDeviceArena:
    """Memory for FakeCudaArray buffers: slices of one buffer allocated when this module is
    imported, before any test frees emulated device memory. (The emulated GPU remembers freed
    device ranges and refuses pointers into them as "freed?", also once the OS has handed that
    address range to unrelated host memory, so a fresh numpy buffer could be refused depending
    on what ran before.)"""

    def __init__(self, size: int) -> None:
        self.buf = aligned_array(size, 4096)
        self.pos = 0
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self.lock:
            start = self.pos
            self.pos = start + -(-nbytes // 4096) * 4096
            assert self.pos <= len(self.buf), "FakeDeviceArena exhausted: make it larger"
        out = self.buf[start : start + nbytes]
        out[:] = 0xEE
        return out

    def reset(self) -> None:
        with self.lock:
            self.pos = 0


ARENA = FakeDeviceArena(160 << 20)


def device_buffer(nbytes: int) -> np.ndarray:
    """A 4096-aligned numpy buffer to stand for device memory (FakeCudaArray)."""
    return ARENA.take(nbytes)


@pytest.fixture(autouse=True)
def emulated_controls() -> Iterator[None]:
    _core._emulated_gpu_stall(False)
    _core._emulated_gpu_inject(0)
    ARENA.reset()
    yield
    _core._emulated_gpu_stall(False)
    _core._emulated_gpu_inject(0)


@pytest.fixture
def make_engine() -> Iterator[Callable[..., TrackedEngine]]:
    made: List[TrackedEngine] = []

    def make(**kwargs: Any) -> TrackedEngine:
        kwargs.setdefault("gpu", "emulated")
        eng = TrackedEngine(**kwargs)
        if kwargs["gpu"] == "emulated":
            info = eng.gpu_info()
            assert info["provider"] == "emulated" and info["emulated"], info
            assert [d["index"] for d in info["devices"]] == [0, 1], info
        made.append(eng)
        return eng

    yield make
    close_and_check(made)


@pytest.fixture
def eng(make_engine: Callable[..., TrackedEngine]) -> TrackedEngine:
    return make_engine()


def layout(rng: np.random.Generator, lengths: np.ndarray, align: int, max_gap: int) -> "tuple[np.ndarray, int]":
    """Non-overlapping offsets for `lengths`, placed in a random order with random gaps; every
    offset a multiple of `align`. Returns (offsets, bytes spanned)."""
    n = len(lengths)
    order = rng.permutation(n)
    gaps = rng.integers(0, max_gap // align + 1, n) * align
    slots = -(-lengths[order] // align) * align
    ends = np.cumsum(gaps + slots)
    offsets = np.empty(n, dtype=np.int64)
    offsets[order] = ends - slots
    span = int(ends[-1]) + int(rng.integers(0, 4)) * align if n else align
    return offsets, span


def scattered_rows(rng: np.random.Generator, n: int, mode: str, max_len: int = 5000) -> Dict[str, Any]:
    """n blocks: independent random layouts on the device and on the host side.

    mode "bytes": unaligned offsets and lengths (the kernel's byte path); "vec16": every offset
    and length a multiple of 16 (the 16-byte vector path); "vec16_tail": 16-byte aligned
    offsets, lengths that are not (vectors, then a byte tail); "mixed": all of them in one batch."""
    align = 16 if mode in ("vec16", "vec16_tail") else 1
    lengths = rng.integers(1, max_len + 1, n)
    if mode == "vec16":
        lengths = (lengths + 15) // 16 * 16
    elif mode == "mixed":
        lengths[: n // 2] = (lengths[: n // 2] + 15) // 16 * 16
        rng.shuffle(lengths)
    # a few blocks longer than one 16 KiB kernel chunk (several CTAs walk them)
    if n >= 8:
        big = rng.choice(n, size=max(1, n // 16), replace=False)
        lengths[big] = rng.integers(16384, 50000, len(big))
        if mode == "vec16":
            lengths[big] = lengths[big] // 16 * 16
    if mode in ("bytes", "vec16_tail"):
        lengths[lengths % 16 == 0] += 1
    lengths = lengths.astype(np.int64)
    dev_off, dev_size = layout(rng, lengths, align, 64 if align == 1 else 256)
    host_off, host_size = layout(rng, lengths, align, 64 if align == 1 else 256)
    if mode == "bytes":
        assert (dev_off % 16 != 0).any() and (lengths % 16 != 0).all()
    if mode == "vec16":
        assert not ((dev_off | host_off | lengths) % 16).any()
    if mode == "vec16_tail":
        assert not ((dev_off | host_off) % 16).any() and (lengths % 16 != 0).all()
    return {"dev_off": dev_off, "host_off": host_off, "len": lengths, "dev_size": dev_size, "host_size": host_size}


def apply_rows(dst: np.ndarray, dst_off: np.ndarray, src: np.ndarray, src_off: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The reference: dst with every row's bytes copied from src (NumPy slicing)."""
    out = dst.copy()
    for d, s, n in zip(dst_off.tolist(), src_off.tolist(), lengths.tolist()):
        out[d : d + n] = src[s : s + n]
    return out


def stats_delta(eng: dpmove.Engine, before: dict) -> dict:
    now = eng.copy_stats()
    return {b: {k: now[b][k] - before[b][k] for k in now[b]} for b in now}


def wait_copy_bytes(eng: dpmove.Engine, before: dict, expect: int, timeout_s: float = 5.0) -> dict:
    """copy_stats after the completion thread counted `expect` bytes (it counts them just after
    finishing the entries, so a read right after result() may not show them yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        d = stats_delta(eng, before)
        got = d["cuda"]["bytes"] + d["batched"]["bytes"]
        if got >= expect or time.monotonic() > deadline:
            assert got == expect, d
            return d
        time.sleep(0.001)


def check_stats(delta: dict, backend: str, n: int, nbytes: int) -> None:
    other = {"cuda": "batched", "batched": "cuda"}
    used = backend
    if backend == "auto":
        used = "batched" if delta["batched"]["copies"] else "cuda"
    d, o = delta[used], delta[other[used]]
    assert d["copies"] == n, delta
    assert d["bytes"] == nbytes, delta
    assert d["errors"] == 0 and o["errors"] == 0, delta
    assert o["copies"] == 0 and o["bytes"] == 0 and o["launches"] == 0, delta
    assert d["runs"] >= 1, delta
    if used == "batched":
        assert d["launches"] >= math.ceil(n / DESCS_PER_TABLE), delta
        assert d["launches"] <= n, delta
        assert d["pageable"] == 0, delta
    else:
        assert d["launches"] == 0, delta


def host_region(eng: dpmove.Engine, rng: np.random.Generator, n: int) -> "tuple[Any, np.ndarray]":
    r = eng.alloc(n)
    v = r.numpy()
    v[:] = rand_bytes(rng, n)
    assert r.pinned, r.pin_error
    return r, v


def counted_copy(eng: dpmove.Engine, dst, src, backend: str = "cuda") -> None:
    """A whole-region copy that must end DONE, and whose bytes the stats have counted (so a
    later stats snapshot does not see them arrive)."""
    before = eng.copy_stats()
    assert_done(eng.copy(dst, src, backend=backend), [len(src)])
    wait_copy_bytes(eng, before, len(src))


def dev_image(eng: dpmove.Engine, dev, rng) -> np.ndarray:
    """The whole device region, read back through a poisoned host region (cuda backend)."""
    out, v = host_region(eng, rng, len(dev))
    counted_copy(eng, out, dev)
    return v.copy()


def fill_device(eng: dpmove.Engine, dev, data: np.ndarray, view: Optional[np.ndarray], counted: bool = True) -> None:
    """Sets the device region's bytes (through the view, or by a copy). counted=False for
    copies that run alongside others (the stats are per engine)."""
    if view is not None:
        view[:] = data
        return
    src = eng.alloc(len(dev))
    src.numpy()[:] = data
    if counted:
        counted_copy(eng, dev, src)
    else:
        assert_done(eng.copy(dev, src, backend="cuda"), [len(dev)])


def round_trip(eng: dpmove.Engine, rng: np.random.Generator, dev, view: Optional[np.ndarray], rows: Dict[str, Any],
               backend: str, **copy_kw: Any) -> None:
    """H2D rows into a poisoned device region, then D2H the same rows into a poisoned host
    region at other offsets; both compared byte for byte with NumPy."""
    dev_off, host_off, lengths = rows["dev_off"], rows["host_off"], rows["len"]
    n, total = len(lengths), int(lengths.sum())
    src, src_v = host_region(eng, rng, rows["host_size"])
    src_data = src_v.copy()
    poison = rand_bytes(rng, len(dev))
    fill_device(eng, dev, poison, view)

    before = eng.copy_stats()
    req = eng.copy(dev, src, np.stack([dev_off, host_off, lengths], axis=1), backend=backend, **copy_kw)
    assert_done(req, lengths)
    check_stats(wait_copy_bytes(eng, before, total), backend, n, total)
    expect_dev = apply_rows(poison, dev_off, src_data, host_off, lengths)
    np.testing.assert_array_equal(src_v, src_data)  # the source is untouched
    if view is not None:
        np.testing.assert_array_equal(view, expect_dev)

    back, back_v = host_region(eng, rng, rows["host_size"])
    expect_back = apply_rows(back_v, host_off, expect_dev, dev_off, lengths)
    before = eng.copy_stats()
    req = eng.copy(back, dev, np.stack([host_off, dev_off, lengths], axis=1), backend=backend, **copy_kw)
    assert_done(req, lengths)
    check_stats(wait_copy_bytes(eng, before, total), backend, n, total)
    np.testing.assert_array_equal(back_v, expect_back)
    if view is None:  # nothing landed outside the rows on the device
        np.testing.assert_array_equal(dev_image(eng, dev, rng), expect_dev)
    else:
        np.testing.assert_array_equal(view, expect_dev)


def make_device(eng: dpmove.Engine, kind: str, nbytes: int, device: int = 0) -> "tuple[Any, Optional[np.ndarray]]":
    """(region, numpy view or None): device_alloc'd memory, or a FakeCudaArray's numpy buffer."""
    if kind == "device_alloc":
        r = eng.device_alloc(nbytes, device=device)
        assert r.location == "emulated" and r.device == device and len(r) == nbytes
        return r, None
    buf = device_buffer(nbytes)
    r = eng.register_device(FakeCudaArray(buf), device=device)
    assert r.location == "emulated" and r.device == device and len(r) == nbytes and r.writable
    assert r.address == buf.ctypes.data
    return r, buf


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["device_alloc", "registered"])
@pytest.mark.parametrize("mode", ["bytes", "vec16", "vec16_tail", "mixed"])
@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_scattered_blocks_round_trip(eng, rng, backend: str, mode: str, memory: str) -> None:
    rows = scattered_rows(rng, int(rng.integers(40, 200)), mode)
    dev, view = make_device(eng, memory, rows["dev_size"])
    round_trip(eng, rng, dev, view, rows, backend)


@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_auto_picks_one_backend_per_request(eng, rng, backend: str) -> None:
    """A request runs on exactly one backend; auto's choice is one of the two."""
    rows = scattered_rows(rng, 8, "mixed")
    dev, _ = make_device(eng, "device_alloc", rows["dev_size"])
    src, _ = host_region(eng, rng, rows["host_size"])
    before = eng.copy_stats()
    req = eng.copy(dev, src, np.stack([rows["dev_off"], rows["host_off"], rows["len"]], axis=1), backend=backend)
    assert_done(req, rows["len"])
    d = wait_copy_bytes(eng, before, int(rows["len"].sum()))
    assert (d["cuda"]["copies"] == 0) != (d["batched"]["copies"] == 0), d
    if backend != "auto":
        assert d[backend]["copies"] == 8, d


@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_one_large_block(eng, rng, backend: str) -> None:
    n = 64 << 20
    dev = eng.device_alloc(n)
    src, src_v = host_region(eng, rng, n)
    data = src_v.copy()
    fill_device(eng, dev, rand_bytes(rng, n), None)
    before = eng.copy_stats()
    t0 = time.monotonic()
    assert_done(eng.copy(dev, src, backend=backend), [n])  # batch=None: all of src to dev
    h2d_s = time.monotonic() - t0
    check_stats(wait_copy_bytes(eng, before, n), backend, 1, n)
    back, back_v = host_region(eng, rng, n)
    before = eng.copy_stats()
    t0 = time.monotonic()
    assert_done(eng.copy(back, dev, backend=backend), [n])
    d2h_s = time.monotonic() - t0
    check_stats(wait_copy_bytes(eng, before, n), backend, 1, n)
    assert np.array_equal(back_v, data), "64 MiB round trip differs"
    print(f"64 MiB {backend}: h2d {h2d_s:.3f} s, d2h {d2h_s:.3f} s (emulated)")

    # an unaligned slice of it: device [7, 7 + L) <- host [1, 1 + L)
    L = n - 4099
    poison = rand_bytes(rng, n)
    fill_device(eng, dev, poison, None)
    src_v[:] = rand_bytes(rng, n)
    assert_done(eng.copy(dev, src, [(7, 1, L)], backend=backend), [L])
    expect = poison.copy()
    expect[7 : 7 + L] = src_v[1 : 1 + L]
    np.testing.assert_array_equal(dev_image(eng, dev, rng), expect)


@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_more_entries_than_one_descriptor_table(eng, rng, backend: str) -> None:
    n = 2 * DESCS_PER_TABLE + int(rng.integers(1, 600))
    rows = scattered_rows(rng, n, "mixed", max_len=96)
    dev, view = make_device(eng, "registered", rows["dev_size"])
    tables0 = eng.copy_stats()["batched"]["desc_tables"]
    round_trip(eng, rng, dev, view, rows, backend)
    st = eng.copy_stats()["batched"]
    if st["copies"]:
        assert st["launches"] >= 2 * math.ceil(n / DESCS_PER_TABLE), st
        assert st["desc_tables"] - tables0 >= math.ceil(n / DESCS_PER_TABLE), st


@pytest.mark.parametrize("memory", ["device_alloc", "registered"])
@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_device_1(eng, rng, backend: str, memory: str) -> None:
    rows = scattered_rows(rng, 64, "mixed")
    dev, view = make_device(eng, memory, rows["dev_size"], device=1)
    assert dev.device == 1
    round_trip(eng, rng, dev, view, rows, backend)


def test_concurrent_requests_from_threads(eng, rng) -> None:
    seeds = rng.integers(0, 2**63, 4)
    errors: List[BaseException] = []
    barrier = threading.Barrier(len(seeds))

    def worker(k: int, seed: int) -> None:
        try:
            r = np.random.default_rng(seed)
            barrier.wait(10)
            for i in range(12):
                backend = COPY_BACKENDS[(k + i) % 3]
                rows = scattered_rows(r, int(r.integers(1, 80)), ["bytes", "vec16", "vec16_tail", "mixed"][i % 4], max_len=3000)
                dev, view = make_device(eng, ["device_alloc", "registered"][i % 2], rows["dev_size"], device=(k + i) % 2)
                src, src_v = host_region(eng, r, rows["host_size"])
                poison = rand_bytes(r, len(dev))
                fill_device(eng, dev, poison, view, counted=False)
                rq = eng.copy(dev, src, np.stack([rows["dev_off"], rows["host_off"], rows["len"]], axis=1), backend=backend)
                assert_done(rq, rows["len"])
                expect_dev = apply_rows(poison, rows["dev_off"], src_v, rows["host_off"], rows["len"])
                back, back_v = host_region(eng, r, rows["host_size"])
                expect_back = apply_rows(back_v, rows["host_off"], expect_dev, rows["dev_off"], rows["len"])
                rq = eng.copy(back, dev, np.stack([rows["host_off"], rows["dev_off"], rows["len"]], axis=1), backend=backend)
                assert_done(rq, rows["len"])
                np.testing.assert_array_equal(back_v, expect_back, err_msg=f"thread {k} iteration {i} {backend}")
                if view is not None:
                    np.testing.assert_array_equal(view, expect_dev, err_msg=f"thread {k} iteration {i} {backend}")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k, int(s))) for k, s in enumerate(seeds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a copy thread did not finish in 120 s"
    if errors:
        raise errors[0]


def test_timing_records_latency(eng, rng) -> None:
    dev = eng.device_alloc(8192)
    src, _ = host_region(eng, rng, 8192)
    for backend in ("cuda", "batched"):
        req = eng.copy(dev, src, [(0, 0, 4096), (4096, 4096, 4096)], backend=backend, timing=True)
        assert_done(req, [4096, 4096])
        assert (req.latency_ns > 0).all(), req.latency_ns
        req = eng.copy(dev, src, [(0, 0, 4096), (4096, 4096, 4096)], backend=backend)
        assert_done(req, [4096, 4096])
        assert (req.latency_ns == -1).all(), req.latency_ns


def test_unpinned_host_memory_with_cuda_backend(make_engine, rng) -> None:
    eng = make_engine(pin_host=False)
    src, src_v = host_region_unpinned(eng, rng, 20000)
    dev = eng.device_alloc(20000)
    before = eng.copy_stats()
    assert_done(eng.copy(dev, src, [(3, 5, 19000)], backend="cuda"), [19000])
    back = np.full(20000, 0xA5, np.uint8)
    assert_done(eng.copy(back, dev, [(11, 3, 19000)], backend="cuda"), [19000])
    expect = np.full(20000, 0xA5, np.uint8)
    expect[11 : 11 + 19000] = src_v[5 : 5 + 19000]
    np.testing.assert_array_equal(back, expect)
    d = wait_copy_bytes(eng, before, 38000)
    assert d["cuda"]["copies"] == 2 and d["cuda"]["pageable"] == 2, d
    # auto never picks the kernel for memory the device cannot address
    before = eng.copy_stats()
    req = eng.copy(dev, src, [(i * 100, i * 100, 100) for i in range(16)], backend="auto")
    assert_done(req, [100] * 16)
    d = wait_copy_bytes(eng, before, 1600)
    assert d["batched"]["copies"] == 0 and d["cuda"]["copies"] == 16, d


def host_region_unpinned(eng, rng, n):
    r = eng.alloc(n)
    assert not r.pinned and r.pin_error == ""
    v = r.numpy()
    v[:] = rand_bytes(rng, n)
    return r, v


# --- misuse ----------------------------------------------------------------------------------


def rejected(eng: dpmove.Engine, fn: Callable[[], Any], exc, match: str, *watch: np.ndarray):
    """fn raises exc matching `match`, queues no copy and leaves the watched arrays as they were."""
    keep = [w.copy() for w in watch]
    before = eng.copy_stats()
    with pytest.raises(exc, match=match) as info:
        fn()
    d = stats_delta(eng, before)
    assert all(v == 0 for b in d.values() for k, v in b.items() if k != "submit_ns"), d
    for w, k in zip(watch, keep):
        np.testing.assert_array_equal(w, k)
    return info.value


def test_numpy_array_via_dlpack_is_host_memory(eng) -> None:
    a = np.zeros(4096, np.uint8)
    assert a.__dlpack_device__()[0] == 1  # kDLCPU
    with pytest.raises(ValueError, match=r"kDLCPU \(host memory\).*Engine\.register"):
        eng.register_device(a)


def test_cai_into_dpmove_host_region_rejected(eng) -> None:
    h = eng.alloc(8192)
    assert h.pinned
    with pytest.raises(ValueError, match="is host memory, not device memory"):
        eng.register_device(FakeCudaArray(h.numpy()))
    with pytest.raises(ValueError, match="is host memory, not device memory"):
        eng.register_device(FakeCudaArray(h.numpy()[100:200]))


def test_not_an_array(eng) -> None:
    with pytest.raises(TypeError, match="__cuda_array_interface__ or __dlpack__"):
        eng.register_device(b"bytes")


def test_two_host_regions(eng, rng) -> None:
    a, av = host_region(eng, rng, 4096)
    b, bv = host_region(eng, rng, 4096)
    rejected(eng, lambda: eng.copy(a, b), ValueError, "two host regions", av, bv)
    rejected(eng, lambda: eng.copy(av, bv), ValueError, "two host regions", av, bv)


def test_two_device_regions(eng, rng) -> None:
    a, av = make_device(eng, "registered", 4096)
    b = eng.device_alloc(4096)
    av[:] = rand_bytes(rng, 4096)
    rejected(eng, lambda: eng.copy(a, b), ValueError, "two device regions", av)
    rejected(eng, lambda: eng.copy(b, a), ValueError, "two device regions", av)


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_batch_none_needs_equal_sizes(eng, rng, direction: str) -> None:
    dev, view = make_device(eng, "registered", 8192)
    view[:] = rand_bytes(rng, 8192)
    h, hv = host_region(eng, rng, 8191)
    args = (dev, h) if direction == "h2d" else (h, dev)
    rejected(eng, lambda: eng.copy(*args), ValueError, r"sizes differ \(dst \d+ bytes, src \d+ bytes\)", view, hv)


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
@pytest.mark.parametrize("side", ["device", "host"])
@pytest.mark.parametrize("how", ["past_end", "huge_length", "offset_at_end"])
def test_rows_out_of_range(eng, rng, direction: str, side: str, how: str) -> None:
    dev, view = make_device(eng, "registered", 8192)
    view[:] = rand_bytes(rng, 8192)
    h, hv = host_region(eng, rng, 10000)
    size = 8192 if side == "device" else 10000
    bad = {"past_end": (size - 100, 101), "huge_length": (0, 2**62), "offset_at_end": (size, 1)}[how]
    dev_off, host_off, length = (bad[0], 0, bad[1]) if side == "device" else (0, bad[0], bad[1])
    good = (0, 0, 16)
    if direction == "h2d":
        call = lambda: eng.copy(dev, h, [good, (dev_off, host_off, length)])  # noqa: E731
    else:
        call = lambda: eng.copy(h, dev, [good, (host_off, dev_off, length)])  # noqa: E731
    # a length past both regions is reported for the device side (checked first)
    where = "device" if how == "huge_length" else side
    size = 8192 if where == "device" else 10000
    rejected(eng, call, ValueError, rf"entry 1 .*does not fit in the {where} region of {size} bytes", view, hv)


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
@pytest.mark.parametrize("column,value,match", [
    (0, -1, "offsets must be >= 0"),
    (1, -4096, "offsets must be >= 0"),
    (2, 0, "length must be > 0"),
    (2, -16, "length must be > 0"),
])
def test_negative_offsets_and_zero_length(eng, rng, direction: str, column: int, value: int, match: str) -> None:
    dev, view = make_device(eng, "registered", 8192)
    view[:] = rand_bytes(rng, 8192)
    h, hv = host_region(eng, rng, 8192)
    row = [16, 32, 64]
    row[column] = value
    dst, src = (dev, h) if direction == "h2d" else (h, dev)
    rejected(eng, lambda: eng.copy(dst, src, [(0, 0, 8), tuple(row)]), ValueError, rf"entry 1 .*{match}", view, hv)


def test_read_only_device_region_is_no_h2d_destination(eng, rng) -> None:
    buf = device_buffer(8192)
    buf[:] = rand_bytes(rng, 8192)
    for dev in (eng.register_device(FakeCudaArray(buf), readonly=True),
                eng.register_device(FakeCudaArray(buf, readonly=True))):
        assert not dev.writable
        h, hv = host_region(eng, rng, 8192)
        rejected(eng, lambda: eng.copy(dev, h), ValueError, "device region is read-only", buf, hv)
        # still a valid source
        assert_done(eng.copy(h, dev, [(1, 2, 8000)]), [8000])
        np.testing.assert_array_equal(hv[1:8001], buf[2:8002])


def test_read_only_host_buffer_is_no_d2h_destination(eng, rng) -> None:
    dev, view = make_device(eng, "registered", 4096)
    view[:] = rand_bytes(rng, 4096)
    ro = rand_bytes(rng, 4096)
    ro.flags.writeable = False
    rejected(eng, lambda: eng.copy(ro, dev), ValueError, "host region is read-only", ro, view)
    rejected(eng, lambda: eng.copy(eng.register(ro), dev), ValueError, "host region is read-only", ro, view)
    # as a source it is fine
    assert_done(eng.copy(dev, ro), [4096])
    np.testing.assert_array_equal(view, ro)


def test_file_io_with_a_device_region(eng, rng, tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = rand_bytes(rng, 8192)
    write_file(path, data)
    f = eng.open(path, "r+", direct=False)
    dev, view = make_device(eng, "registered", 8192)
    view[:] = rand_bytes(rng, 8192)
    keep = view.copy()
    with pytest.raises(ValueError, match="read: the region is device memory"):
        eng.read(f, dev, [(0, 0, 4096)])
    with pytest.raises(ValueError, match="write: the region is device memory"):
        eng.write(f, dev, [(0, 0, 4096)])
    np.testing.assert_array_equal(view, keep)
    with open(path, "rb") as fh:
        assert fh.read() == data.tobytes()


@pytest.mark.parametrize("memory", ["device_alloc", "registered"])
def test_host_views_of_device_memory_refused(eng, memory: str) -> None:
    dev, _ = make_device(eng, memory, 4096)
    with pytest.raises(TypeError, match="device memory .*copy it to a host region with Engine.copy"):
        dev.numpy()

    def chain(e: BaseException) -> str:
        parts = []
        while e is not None:
            parts.append(str(e))
            e = e.__cause__ or e.__context__
        return " <- ".join(parts)

    for view in (memoryview, np.asarray, lambda r: np.frombuffer(r, np.uint8)):
        with pytest.raises((TypeError, BufferError)) as info:
            view(dev)
        assert "the region is device memory" in chain(info.value), (view, chain(info.value))


def test_gpu_off(make_engine, rng) -> None:
    eng = make_engine(gpu="off")
    info = eng.gpu_info()
    assert info["provider"] == "off" and not info["emulated"] and info["devices"] == []
    with pytest.raises(dpmove.UnsupportedOperation, match=r"no GPU \(gpu='off'\)"):
        eng.device_alloc(4096)
    with pytest.raises(dpmove.UnsupportedOperation, match=r"no GPU \(gpu='off'\)"):
        eng.register_device(FakeCudaArray(device_buffer(4096)))
    for b in ("cuda", "batched", "cnic"):
        assert "no GPU" in eng.copy_backend_status(b)
    h = eng.alloc(4096)
    assert not h.pinned


def test_batched_needs_pinned_host_memory(make_engine, rng) -> None:
    eng = make_engine(pin_host=False)
    dev, view = make_device(eng, "registered", 4096)
    view[:] = rand_bytes(rng, 4096)
    h, hv = host_region_unpinned(eng, rng, 4096)
    err = rejected(eng, lambda: eng.copy(dev, h, backend="batched"), ValueError, "backend 'batched': the host region is not pinned", view, hv)
    assert "pin_host=False" in str(err) and "backend='cuda'" in str(err)
    rejected(eng, lambda: eng.copy(hv, dev, backend="batched"), ValueError, "not pinned", view, hv)
    assert eng.copy_backend_status("batched") == ""  # the kernel itself is fine


@pytest.mark.parametrize("name", ["nope", "CUDA", ""])
def test_unknown_backend(eng, rng, name: str) -> None:
    dev, view = make_device(eng, "registered", 4096)
    h, hv = host_region(eng, rng, 4096)
    why = eng.copy_backend_status(name)
    assert f"unknown copy backend '{name}'" in why
    rejected(eng, lambda: eng.copy(dev, h, backend=name), dpmove.UnsupportedOperation,
             f"backend '{name}': unknown copy backend", view, hv)


def test_unusable_backend_raises_naming_it(eng, rng) -> None:
    dev, view = make_device(eng, "registered", 4096)
    h, hv = host_region(eng, rng, 4096)
    cases = [("cnic", 0), ("batched", 7), ("cuda", 7)]
    checked = 0
    for backend, device in cases:
        why = eng.copy_backend_status(backend, device)
        if not why:
            continue
        checked += 1
        if device == 0:
            err = rejected(eng, lambda: eng.copy(dev, h, backend=backend), dpmove.UnsupportedOperation,
                           f"with backend '{backend}'", view, hv)
            assert why in str(err)
    assert eng.copy_backend_status("cuda", 7) == "no device 7"
    assert checked >= 2


def test_device_arguments(eng) -> None:
    with pytest.raises(ValueError, match=r"device 2 does not exist: 2 emulated device\(s\)"):
        eng.device_alloc(4096, device=2)
    with pytest.raises(ValueError, match="device -1 does not exist"):
        eng.device_alloc(4096, device=-1)
    with pytest.raises(ValueError, match="size must be > 0"):
        eng.device_alloc(0)
    with pytest.raises(ValueError, match="device 5 does not exist"):
        eng.register_device(FakeCudaArray(device_buffer(4096)), device=5)


def test_closed_engine(make_engine, rng) -> None:
    eng = make_engine()
    dev, view = make_device(eng, "registered", 4096)
    h, hv = host_region(eng, rng, 4096)
    eng.close()
    with pytest.raises(ValueError, match="Engine is closed"):
        eng.copy(dev, h)
    with pytest.raises(ValueError, match="Engine is closed"):
        eng.copy(hv, dev)
    with pytest.raises(ValueError, match="Engine is closed"):
        eng.device_alloc(4096)
    with pytest.raises(ValueError, match="Engine is closed"):
        eng.register_device(FakeCudaArray(device_buffer(4096)))


def test_closed_region(eng, rng) -> None:
    dev = eng.device_alloc(4096)
    h, hv = host_region(eng, rng, 4096)
    dev.close()
    rejected(eng, lambda: eng.copy(dev, h), ValueError, "Region is closed", hv)
    dev2 = eng.device_alloc(4096)
    h.close()
    with pytest.raises(ValueError, match="Region is closed"):
        eng.copy(dev2, h)


def test_freed_device_memory_rejected(eng, rng) -> None:
    import gc

    dev = eng.device_alloc(1 << 16)
    addr = dev.address
    src, _ = host_region(eng, rng, 1 << 16)
    req = eng.copy(dev, src)
    assert_done(req, [1 << 16])
    dev.close()
    del dev, req
    gc.collect()
    eng.requests.clear()  # the request held the region; it is gone now
    for off, n in ((0, 4096), (12288, 100)):
        with pytest.raises(ValueError, match=r"not memory the CUDA driver knows .*was the array freed\?"):
            eng.register_device(FakeCudaArray(np.zeros(1, np.uint8), address=addr + off, nbytes=n))


def test_region_past_end_of_device_allocation(eng) -> None:
    dev = eng.device_alloc(8192)
    with pytest.raises(ValueError, match="runs past the end of its allocation"):
        eng.register_device(FakeCudaArray(np.zeros(1, np.uint8), address=dev.address + 4096, nbytes=8192))
    inner = eng.register_device(FakeCudaArray(np.zeros(1, np.uint8), address=dev.address + 4096, nbytes=4096))
    assert inner.device == 0 and len(inner) == 4096
    with pytest.raises(ValueError, match="is on device 0, not device 1"):
        eng.register_device(FakeCudaArray(np.zeros(1, np.uint8), address=dev.address, nbytes=4096), device=1)


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cuda", "batched"])
def test_injected_device_error_fails_only_that_run(eng, rng, backend: str) -> None:
    rows = scattered_rows(rng, 12, "mixed", max_len=2000)
    batch = np.stack([rows["dev_off"], rows["host_off"], rows["len"]], axis=1)
    dev, view = make_device(eng, "registered", rows["dev_size"])
    src, src_v = host_region(eng, rng, rows["host_size"])

    # a clean run before
    before = eng.copy_stats()
    assert_done(eng.copy(dev, src, batch, backend=backend), rows["len"])
    wait_copy_bytes(eng, before, int(rows["len"].sum()))
    before = eng.copy_stats()
    # the failing run: one of its operations (cuda: one per row; batched: the launch) fails
    nth = int(rng.integers(1, 13)) if backend == "cuda" else 1
    _core._emulated_gpu_inject(nth)
    ops0 = _core._emulated_gpu_ops()
    req = eng.copy(dev, src, batch, backend=backend)
    assert finished(req) == S.FAILED
    assert _core._emulated_gpu_ops() - ops0 == (12 if backend == "cuda" else 1)
    np.testing.assert_array_equal(req.status, np.full(12, -EIO))
    np.testing.assert_array_equal(req.bytes, np.zeros(12))
    assert req.num_failed == 12 and req.bytes_done == 0
    with pytest.raises(dpmove.TransferError, match="CUDA_ERROR_ILLEGAL_ADDRESS") as info:
        req.check()
    assert info.value.errno == EIO
    assert f"{backend} copies: device reported" in str(info.value)
    with pytest.raises(dpmove.TransferError, match="12 of 12 entries failed"):
        req.result(timeout_s=5)
    d = stats_delta(eng, before)
    deadline = time.monotonic() + 5
    while d[backend]["errors"] < 12 and time.monotonic() < deadline:
        time.sleep(0.001)
        d = stats_delta(eng, before)
    assert d[backend]["errors"] == 12 and d[backend]["bytes"] == 0, d

    # not sticky: the runs after it succeed, with the right data
    for _ in range(3):
        poison = rand_bytes(rng, len(view))
        view[:] = poison
        src_v[:] = rand_bytes(rng, len(src_v))
        assert_done(eng.copy(dev, src, batch, backend=backend), rows["len"])
        np.testing.assert_array_equal(view, apply_rows(poison, rows["dev_off"], src_v, rows["host_off"], rows["len"]))


@pytest.mark.parametrize("backend", ["cuda", "batched"])
def test_injected_error_does_not_leak_into_later_concurrent_runs(eng, rng, backend: str) -> None:
    """After one failed run, later runs queued together (so a stream needs a second
    completion event) must not report that old failure."""
    dev, view = make_device(eng, "registered", 1 << 16)
    src, src_v = host_region(eng, rng, 1 << 16)
    _core._emulated_gpu_inject(1)
    req = eng.copy(dev, src, [(0, 0, 4096)], backend=backend)
    assert finished(req) == S.FAILED
    poison = rand_bytes(rng, 1 << 16)
    view[:] = poison
    _core._emulated_gpu_stall(True)
    try:
        later = [eng.copy(dev, src, [(i * 4096, 8192 + i * 4096, 4096)], backend=backend) for i in range(6)]
    finally:
        _core._emulated_gpu_stall(False)
    states = [finished(r) for r in later]
    assert states == [S.DONE] * 6, [(r, r.status.tolist()) for r in later]
    expect = poison.copy()
    expect[: 6 * 4096] = src_v[8192 : 8192 + 6 * 4096]
    np.testing.assert_array_equal(view, expect)


@pytest.mark.parametrize("backend", ["cuda", "batched"])
def test_deadline_while_stalled(eng, rng, backend: str) -> None:
    rows = scattered_rows(rng, 10, "mixed", max_len=3000)
    batch = np.stack([rows["dev_off"], rows["host_off"], rows["len"]], axis=1)
    dev, view = make_device(eng, "registered", rows["dev_size"])
    src, src_v = host_region(eng, rng, rows["host_size"])
    poison = rand_bytes(rng, len(view))
    view[:] = poison
    _core._emulated_gpu_stall(True)
    try:
        req = eng.copy(dev, src, batch, backend=backend, timeout_s=0.2)
        assert req.wait(10) == S.TIMED_OUT
        # the copies sit on a stream: they cannot be recalled, so the buffers are not free
        assert not req.quiesced and req.in_flight == 10
        assert not req.wait_quiesced(0.05)
        np.testing.assert_array_equal(req.status, np.full(10, dpmove.ENTRY_RUNNING))
        with pytest.raises(dpmove.TimedOut, match="10 still running"):
            req.check()
        np.testing.assert_array_equal(view, poison)  # nothing ran
    finally:
        _core._emulated_gpu_stall(False)
    assert req.wait_quiesced(10)
    assert req.state == S.TIMED_OUT and req.in_flight == 0
    st, nb = req.status, req.bytes
    assert not np.isin(st, [dpmove.ENTRY_PENDING, dpmove.ENTRY_RUNNING]).any(), st
    assert ((st == 0) | (st < 0)).all(), st
    np.testing.assert_array_equal(nb[st == 0], rows["len"][st == 0])
    done = st == 0
    expect = apply_rows(poison, rows["dev_off"][done], src_v, rows["host_off"][done], rows["len"][done])
    # rows that ended in error may or may not have landed; the others must have
    for d, h, n, ok in zip(rows["dev_off"], rows["host_off"], rows["len"], done):
        if ok:
            np.testing.assert_array_equal(view[d : d + n], src_v[h : h + n])
    if done.all():
        np.testing.assert_array_equal(view, expect)


@pytest.mark.parametrize("backend", ["cuda", "batched"])
def test_cancel_while_stalled(eng, rng, backend: str) -> None:
    dev, view = make_device(eng, "registered", 1 << 16)
    src, src_v = host_region(eng, rng, 1 << 16)
    poison = rand_bytes(rng, 1 << 16)
    view[:] = poison
    batch = [(i * 5000 + 3, i * 4000 + 1, 3000) for i in range(8)]
    _core._emulated_gpu_stall(True)
    try:
        req = eng.copy(dev, src, batch, backend=backend)
        assert req.cancel() is True
        assert req.state == S.CANCELLED
        assert not req.quiesced and req.in_flight == 8
        with pytest.raises(dpmove.Cancelled, match="8 still running"):
            req.check()
        assert req.cancel() is False
        np.testing.assert_array_equal(view, poison)
    finally:
        _core._emulated_gpu_stall(False)
    assert req.wait_quiesced(10)
    assert req.state == S.CANCELLED
    st = req.status
    assert not np.isin(st, [dpmove.ENTRY_PENDING, dpmove.ENTRY_RUNNING]).any(), st
    assert ((st == 0) | (st < 0)).all(), st
    for (d, h, n), s in zip(batch, st.tolist()):
        if s == 0:
            np.testing.assert_array_equal(view[d : d + n], src_v[h : h + n])


def test_request_context_manager_waits_for_the_device(eng, rng) -> None:
    dev, view = make_device(eng, "registered", 8192)
    src, src_v = host_region(eng, rng, 8192)
    _core._emulated_gpu_stall(True)
    try:
        req = eng.copy(dev, src, backend="cuda")
        unstall = threading.Timer(0.3, _core._emulated_gpu_stall, args=(False,))
        unstall.start()
        with req:
            pass  # leaving cancels and waits until the device let go of the buffers
        unstall.join()
    finally:
        _core._emulated_gpu_stall(False)
    assert req.quiesced and req.in_flight == 0
    assert req.state == S.CANCELLED


@pytest.mark.parametrize("backend", ["cuda", "batched"])
def test_close_while_stalled_leaks_instead_of_freeing(rng, backend: str) -> None:
    eng = dpmove.Engine(gpu="emulated", default_timeout_s=None)
    dev, view = make_device(eng, "registered", 1 << 16)
    src, src_v = host_region(eng, rng, 1 << 16)
    poison = rand_bytes(rng, 1 << 16)
    view[:] = poison
    _core._emulated_gpu_stall(True)
    try:
        req = eng.copy(dev, src, [(0, 0, 4096), (8192, 4096, 4096), (20000, 9, 3)], backend=backend)
        t0 = time.monotonic()
        with pytest.warns(ResourceWarning, match=r"(\d+) entries still running after 0.2 s") as rec:
            eng.close(timeout_s=0.2)
        assert time.monotonic() - t0 < 5
        stuck = int(re.search(r"(\d+) entries still running", str(rec[0].message)).group(1))
        assert stuck == 3
        assert eng.closed
        assert not req.quiesced
        np.testing.assert_array_equal(view, poison)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eng.close(timeout_s=0.2)  # idempotent: nothing more to report
    finally:
        _core._emulated_gpu_stall(False)
    # the leaked stream still runs the copies once the device moves again
    deadline = time.monotonic() + 10
    while not np.array_equal(view[20000:20003], src_v[9:12]) and time.monotonic() < deadline:
        time.sleep(0.01)
    np.testing.assert_array_equal(view[:4096], src_v[:4096])
    np.testing.assert_array_equal(view[8192:12288], src_v[4096:8192])
    np.testing.assert_array_equal(view[20000:20003], src_v[9:12])


@pytest.mark.parametrize("backend", ["cuda", "batched"])
def test_request_of_leaked_copies_still_ends(rng, backend: str) -> None:
    """Engine.close "cancels what is in flight": a copy request caught by close with its copies
    queued on a stalled device must still reach a terminal, quiesced state once the device ran
    them (else wait() without a deadline and `with req:` hang forever)."""
    eng = dpmove.Engine(gpu="emulated", default_timeout_s=None)
    dev, view = make_device(eng, "registered", 1 << 16)
    src, _ = host_region(eng, rng, 1 << 16)
    _core._emulated_gpu_stall(True)
    try:
        req = eng.copy(dev, src, [(0, 0, 4096), (4096, 4096, 4096)], backend=backend)
        with pytest.warns(ResourceWarning, match="entries still running"):
            eng.close(timeout_s=0.2)
    finally:
        _core._emulated_gpu_stall(False)
    assert req.wait_quiesced(10), f"{req}: status {req.status.tolist()} in_flight {req.in_flight} 10 s after the device ran the copies"
    assert req.state in (S.CANCELLED, S.DONE), req
    assert not np.isin(req.status, [dpmove.ENTRY_PENDING, dpmove.ENTRY_RUNNING]).any(), req.status


# --- QoS -------------------------------------------------------------------------------------


def test_copies_are_counted_per_traffic_class(eng, rng) -> None:
    dev = eng.device_alloc(1 << 20)
    src, _ = host_region(eng, rng, 1 << 20)
    q0 = eng.qos_stats()["copy"]
    assert {"control", "kv_load", "kv_store", "bulk"} <= set(q0)
    sent = {"kv_load": 0, "control": 0, "bulk": 0}
    for cls, backend, rows in [
        ("kv_load", "batched", [(i * 50432, i * 50432, 50432) for i in range(5)]),
        ("control", "cuda", [(0, 7, 1000)]),
        ("kv_load", "cuda", [(100, 0, 300), (5000, 9000, 12345)]),
        (None, "batched", [(0, 0, 4096), (8192, 8192, 4096)]),
    ]:
        req = eng.copy(dev, src, rows, backend=backend, traffic_class=cls)
        assert_done(req, [r[2] for r in rows])
        sent[cls or "bulk"] += sum(r[2] for r in rows)
        back = np.zeros(1 << 20, np.uint8)
        req = eng.copy(back, dev, [(r[1], r[0], r[2]) for r in rows], backend=backend, traffic_class=cls)
        assert_done(req, [r[2] for r in rows])
        sent[cls or "bulk"] += sum(r[2] for r in rows)
    q = eng.qos_stats()["copy"]
    for cls, n in sent.items():
        assert q[cls]["bytes"] - q0[cls]["bytes"] == n, (cls, q[cls], q0[cls])
        assert q[cls]["ops"] > q0[cls]["ops"], (cls, q[cls])
    assert q["kv_store"]["bytes"] == q0["kv_store"]["bytes"]
    # the storage and net paths saw none of it
    s = eng.qos_stats()
    assert all(c["bytes"] == 0 for c in s["storage"].values()) and all(c["bytes"] == 0 for c in s["net"].values())


def test_unknown_traffic_class(eng, rng) -> None:
    dev, view = make_device(eng, "registered", 4096)
    h, hv = host_region(eng, rng, 4096)
    rejected(eng, lambda: eng.copy(dev, h, traffic_class="kv_lod"), ValueError, "unknown traffic class 'kv_lod'", view, hv)
    rejected(eng, lambda: eng.copy(hv, dev, traffic_class=3), TypeError, "traffic_class must be a class name", view, hv)
