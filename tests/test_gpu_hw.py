"""Host<->device copies on a real CUDA device (marker `gpu`; run with DPMOVE_GPU=cuda, e.g.
``bash bench/gpu_check.sh``). Skipped, with the driver's reason, where CUDA is not usable.

Every test uses Engine(gpu="cuda"). Device memory is dpmove's own (device_alloc) or an array
of CuPy (else torch) registered through ``__cuda_array_interface__`` or DLPack; results are
compared byte for byte with NumPy, destinations poisoned first, data random on every run.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import pytest

import dpmove
from dpmove import _core
from dpmove.kv.model import PRESETS, get_model
from conftest import TrackedEngine, aligned_array, assert_done, close_and_check, rand_bytes

pytestmark = pytest.mark.gpu

_CUDA = _core.cuda_status()
if not _CUDA["usable"]:
    print(f"test_gpu_hw: CUDA is not usable here: {_CUDA['reason']}")
    pytest.skip(f"needs a usable CUDA device (dpmove._core.cuda_status: {_CUDA['reason']})", allow_module_level=True)

S = dpmove.RequestState
DESCS_PER_TABLE = 4096


# --- array libraries -------------------------------------------------------------------------


class CupyLib:
    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self.cp = cupy

    def from_numpy(self, a: np.ndarray) -> Any:
        out = self.cp.asarray(a)
        self.sync()
        return out

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.cp.asnumpy(x)

    def strided(self, n: int) -> Any:
        return self.cp.zeros((n, n), dtype=self.cp.float32)[:, ::2]

    def sync(self) -> None:
        self.cp.cuda.runtime.deviceSynchronize()

    def malloc_free(self, n: int) -> int:
        p = self.cp.cuda.runtime.malloc(n)
        self.cp.cuda.runtime.free(p)
        return int(p)


class TorchLib:
    name = "torch"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("torch sees no CUDA device")
        self.torch = torch

    def from_numpy(self, a: np.ndarray) -> Any:
        out = self.torch.from_numpy(a.copy()).cuda()
        self.sync()
        return out

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.cpu().numpy()

    def strided(self, n: int) -> Any:
        return self.torch.zeros((n, n), dtype=self.torch.float32, device="cuda")[:, ::2]

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def malloc_free(self, n: int) -> Optional[int]:
        return None  # torch's caching allocator does not give memory back on free


def _load(cls) -> Any:
    try:
        return cls()
    except ImportError:
        return None


@pytest.fixture(scope="module")
def lib() -> Any:
    """CuPy if it imports, else torch with CUDA, else the test is skipped."""
    for cls in (CupyLib, TorchLib):
        got = _load(cls)
        if got is not None:
            return got
    pytest.skip("needs CuPy or torch with CUDA to make device arrays (neither imports)")


@pytest.fixture(scope="module")
def torch_lib() -> Any:
    got = _load(TorchLib)
    if got is None:
        pytest.skip("torch with CUDA is not importable")
    return got


class DLPackOnly:
    """Hides __cuda_array_interface__: register_device must take the DLPack path."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __dlpack__(self, max_version: Any = None, stream: Any = None) -> Any:
        try:
            return self.inner.__dlpack__(max_version=max_version) if max_version is not None else self.inner.__dlpack__()
        except TypeError:
            return self.inner.__dlpack__()

    def __dlpack_device__(self) -> Any:
        return self.inner.__dlpack_device__()


class Cai:
    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False), "version": 3}


# --- engine ----------------------------------------------------------------------------------


@pytest.fixture
def eng() -> Iterator[TrackedEngine]:
    e = TrackedEngine(gpu="cuda")
    info = e.gpu_info()
    assert info["provider"] == "cuda" and not info["emulated"] and info["devices"], info
    print(f"GPU: {info['devices'][0]}")
    yield e
    close_and_check([e])


def host(eng: dpmove.Engine, rng, n: int):
    r = eng.alloc(n)
    v = r.numpy()
    v[:] = rand_bytes(rng, n)
    assert r.pinned and r.pin_error == "", r.pin_error
    return r, v


def poison_device(eng: dpmove.Engine, rng, dev) -> np.ndarray:
    data = rand_bytes(rng, len(dev))
    src = eng.alloc(len(dev))
    src.numpy()[:] = data
    assert_done(eng.copy(dev, src, backend="cuda"), [len(dev)])
    return data


def device_image(eng: dpmove.Engine, rng, dev) -> np.ndarray:
    out, v = host(eng, rng, len(dev))
    assert_done(eng.copy(out, dev, backend="cuda"), [len(dev)])
    return v.copy()


def apply_rows(dst: np.ndarray, dst_off, src: np.ndarray, src_off, lengths) -> np.ndarray:
    out = dst.copy()
    for d, s, n in zip(np.asarray(dst_off).tolist(), np.asarray(src_off).tolist(), np.asarray(lengths).tolist()):
        out[d : d + n] = src[s : s + n]
    return out


def random_rows(rng, n: int, max_len: int, align: int) -> Dict[str, Any]:
    lengths = rng.integers(1, max_len + 1, n)
    if align > 1:
        lengths = (lengths + align - 1) // align * align

    def place() -> tuple:
        order = rng.permutation(n)
        slots = -(-lengths[order] // 16) * 16 if align > 1 else lengths[order]
        gaps = rng.integers(0, 8, n) * (align if align > 1 else 7)
        ends = np.cumsum(slots + gaps)
        off = np.empty(n, np.int64)
        off[order] = ends - slots
        return off, int(ends[-1]) + 64

    d, ds = place()
    h, hs = place()
    return {"dev_off": d, "host_off": h, "len": lengths.astype(np.int64), "dev_size": ds, "host_size": hs}


def round_trip(eng: dpmove.Engine, rng, dev, rows: Dict[str, Any], backend: str,
               view: Optional[Callable[[], np.ndarray]] = None) -> None:
    d, h, ln = rows["dev_off"], rows["host_off"], rows["len"]
    src, src_v = host(eng, rng, rows["host_size"])
    poison = poison_device(eng, rng, dev)
    assert_done(eng.copy(dev, src, np.stack([d, h, ln], 1), backend=backend), ln)
    expect_dev = apply_rows(poison, d, src_v, h, ln)
    if view is not None:
        np.testing.assert_array_equal(view(), expect_dev)
    back, back_v = host(eng, rng, rows["host_size"])
    expect_back = apply_rows(back_v, h, expect_dev, d, ln)
    assert_done(eng.copy(back, dev, np.stack([h, d, ln], 1), backend=backend), ln)
    np.testing.assert_array_equal(back_v, expect_back)
    np.testing.assert_array_equal(device_image(eng, rng, dev), expect_dev)


# --- tests -----------------------------------------------------------------------------------


def test_batched_kernel_loads(eng) -> None:
    assert eng.copy_backend_status("cuda") == ""
    assert eng.copy_backend_status("batched") == "", eng.copy_backend_status("batched")


def test_pinned_host_regions(eng, rng) -> None:
    r = eng.alloc(1 << 20)
    assert r.pinned and r.pin_error == "" and r.location == "host"
    a = aligned_array(1 << 16)
    reg = eng.register(a)
    assert reg.pinned and reg.pin_error == ""
    e2 = dpmove.Engine(gpu="cuda", pin_host=False)
    try:
        assert not e2.alloc(4096).pinned
    finally:
        e2.close()


@pytest.mark.parametrize("backend", ["cuda", "batched", "auto"])
@pytest.mark.parametrize("align", [1, 16])
def test_device_alloc_scattered_round_trip(eng, rng, backend: str, align: int) -> None:
    rows = random_rows(rng, int(rng.integers(100, 400)), 20000, align)
    dev = eng.device_alloc(rows["dev_size"])
    assert dev.location == "cuda" and dev.device == 0
    round_trip(eng, rng, dev, rows, backend)


@pytest.mark.parametrize("backend", ["cuda", "batched"])
def test_device_alloc_many_entries(eng, rng, backend: str) -> None:
    n = DESCS_PER_TABLE + 1000
    rows = random_rows(rng, n, 300, 1)
    dev = eng.device_alloc(rows["dev_size"])
    before = eng.copy_stats()[backend]
    round_trip(eng, rng, dev, rows, backend)
    st = eng.copy_stats()[backend]
    if backend == "batched":
        assert st["launches"] - before["launches"] >= 4, (before, st)  # 2 copies x 2 tables


@pytest.mark.parametrize("backend", ["cuda", "batched"])
def test_large_block(eng, rng, backend: str) -> None:
    n = 128 << 20
    dev = eng.device_alloc(n)
    src, src_v = host(eng, rng, n)
    t0 = time.monotonic()
    assert_done(eng.copy(dev, src, backend=backend), [n])
    t1 = time.monotonic()
    back, back_v = host(eng, rng, n)
    assert_done(eng.copy(back, dev, backend=backend), [n])
    t2 = time.monotonic()
    assert np.array_equal(back_v, src_v)
    print(f"128 MiB {backend}: h2d {n / (t1 - t0) / 1e9:.1f} GB/s, d2h {n / (t2 - t1) / 1e9:.1f} GB/s")


@pytest.mark.parametrize("backend", ["cuda", "batched", "auto"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_layer_blocks_scattered_in_host_memory(eng, rng, backend: str, preset: str) -> None:
    """One layer's Layer Blocks of several Full Blocks (host memory laid out as on storage)
    gathered into contiguous device memory and scattered back."""
    m = get_model(preset)
    blocks = 8 if m.full_block_bytes < (8 << 20) else 3
    stride = m.full_block_stride()
    lb = m.layer_block_bytes
    src, src_v = host(eng, rng, blocks * stride)
    dev = eng.device_alloc(blocks * m.num_layers * lb)
    poison = poison_device(eng, rng, dev)
    expect_dev = poison.copy()
    for layer in sorted({0, m.num_layers // 2, m.num_layers - 1}):
        rows = np.array([(layer * blocks * lb + b * lb, b * stride + m.layer_block_offset(layer), lb) for b in range(blocks)],
                        dtype=np.int64)
        assert_done(eng.copy(dev, src, rows, backend=backend), [lb] * blocks)
        expect_dev = apply_rows(expect_dev, rows[:, 0], src_v, rows[:, 1], rows[:, 2])
        np.testing.assert_array_equal(device_image(eng, rng, dev), expect_dev)
        back, back_v = host(eng, rng, blocks * stride)
        expect_back = apply_rows(back_v, rows[:, 1], expect_dev, rows[:, 0], rows[:, 2])
        assert_done(eng.copy(back, dev, rows[:, [1, 0, 2]], backend=backend), [lb] * blocks)
        np.testing.assert_array_equal(back_v, expect_back)


@pytest.mark.parametrize("backend", ["cuda", "batched"])
@pytest.mark.parametrize("via", ["cai", "dlpack"])
def test_register_array(eng, rng, lib, backend: str, via: str) -> None:
    n = 1 << 20
    init = rand_bytes(rng, n)
    arr = lib.from_numpy(init)
    obj = arr if via == "cai" else DLPackOnly(arr)
    if via == "cai":
        assert hasattr(arr, "__cuda_array_interface__")
    dev = eng.register_device(obj)
    assert dev.location == "cuda" and dev.device == 0 and len(dev) == n and dev.writable
    rows = random_rows(rng, 64, 8000, 1)
    # device side: one 16000-byte slot each, at a random place inside it
    rows["dev_off"] = np.arange(64, dtype=np.int64) * 16000 + rng.integers(0, 7000, 64)
    src, src_v = host(eng, rng, rows["host_size"])
    assert_done(eng.copy(dev, src, np.stack([rows["dev_off"], rows["host_off"], rows["len"]], 1), backend=backend),
                rows["len"])
    expect = apply_rows(init, rows["dev_off"], src_v, rows["host_off"], rows["len"])
    np.testing.assert_array_equal(lib.to_numpy(arr), expect)  # read back by the array library
    back, back_v = host(eng, rng, n)
    assert_done(eng.copy(back, dev, backend=backend), [n])
    np.testing.assert_array_equal(back_v, expect)


@pytest.mark.parametrize("via", ["cai", "dlpack"])
def test_register_torch_tensor(eng, rng, torch_lib, via: str) -> None:
    init = rand_bytes(rng, 65536)
    t = torch_lib.from_numpy(init)
    dev = eng.register_device(t if via == "cai" else DLPackOnly(t))
    assert len(dev) == 65536 and dev.location == "cuda"
    src, src_v = host(eng, rng, 65536)
    assert_done(eng.copy(dev, src, [(100, 7, 30000)]), [30000])
    expect = init.copy()
    expect[100:30100] = src_v[7:30007]
    np.testing.assert_array_equal(torch_lib.to_numpy(t), expect)


@pytest.mark.parametrize("via", ["cai", "dlpack"])
def test_strided_view_rejected(eng, lib, via: str) -> None:
    v = lib.strided(64)
    with pytest.raises(ValueError, match="strided"):
        eng.register_device(v if via == "cai" else DLPackOnly(v))


def test_host_arrays_rejected(eng, rng) -> None:
    with pytest.raises(ValueError, match=r"kDLCPU \(host memory\)"):
        eng.register_device(np.zeros(4096, np.uint8))
    h = eng.alloc(4096)
    with pytest.raises(ValueError, match="is host memory, not device memory"):
        eng.register_device(Cai(h.address, 4096))
    a = np.zeros(4096, np.uint8)  # never registered with CUDA
    with pytest.raises(ValueError, match="not memory the CUDA driver knows|host memory"):
        eng.register_device(Cai(a.ctypes.data, 4096))


def test_freed_device_memory_rejected(eng, rng, request) -> None:
    dev = eng.device_alloc(1 << 20)
    addr = dev.address
    dev.close()
    del dev
    gc.collect()
    with pytest.raises(ValueError, match=r"was the array freed\?"):
        eng.register_device(Cai(addr, 4096))
    try:
        lib = request.getfixturevalue("lib")
    except pytest.skip.Exception:
        return
    p = lib.malloc_free(1 << 20)
    if p is None:
        return
    with pytest.raises(ValueError, match=r"was the array freed\?"):
        eng.register_device(Cai(p, 4096))


def test_region_past_its_allocation_rejected(eng) -> None:
    dev = eng.device_alloc(1 << 20)
    with pytest.raises(ValueError, match="runs past the end of its allocation"):
        eng.register_device(Cai(dev.address + 4096, 1 << 20))
    inner = eng.register_device(Cai(dev.address + 4096, 4096))
    assert inner.location == "cuda" and len(inner) == 4096
