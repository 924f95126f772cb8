"""register_device's parsing of GPU array descriptions: DLPack capsules and
``__cuda_array_interface__`` dicts.

Capsules are built here with ctypes (DLManagedTensor / DLManagedTensorVersioned laid out as in
dlpack.h, PyCapsule_New through ctypes.pythonapi) over numpy buffers, and claim kDLCUDA: the
emulated GPU accepts a pointer it never handed out as device memory, so what a region covers is
checked by copying into it and reading the numpy buffer. Every rejection must leave a capsule
either unconsumed (its name still "dltensor...") or consumed with its deleter called once.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pytest

import dpmove
from dpmove import _core
from conftest import aligned_array, assert_done, rand_bytes

kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged = 1, 2, 3, 13
kDLInt, kDLUInt, kDLFloat = 0, 1, 2
READ_ONLY = 1


# --- DLPack through ctypes -------------------------------------------------------------------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


DELETER_V = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensorVersioned))
DLManagedTensorVersioned._fields_ = [
    ("version", DLPackVersion),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", DELETER_V),
    ("flags", ctypes.c_uint64),
    ("dl_tensor", DLTensor),
]

_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_PyCapsule_GetName = ctypes.pythonapi.PyCapsule_GetName
_PyCapsule_GetName.restype = ctypes.c_char_p
_PyCapsule_GetName.argtypes = [ctypes.py_object]
# Capsule names must outlive the capsules: module constants.
NAME = b"dltensor"
NAME_V = b"dltensor_versioned"


def capsule_name(cap: Any) -> str:
    return _PyCapsule_GetName(cap).decode()


def dtype_of(dt: np.dtype) -> DLDataType:
    code = {"i": kDLInt, "u": kDLUInt, "f": kDLFloat}[dt.kind]
    return DLDataType(code, dt.itemsize * 8, 1)


class FakeDLPackArray:
    """A GPU-array stand-in exporting one DLPack capsule over `host` (a numpy array).

    shape / strides (elements) / byte_offset / device default to what `host` is;
    `versioned` builds a DLManagedTensorVersioned. `deleted` counts deleter calls and
    `deleted_ptr` records the pointer it got."""

    def __init__(self, host: np.ndarray, *, device_type: int = kDLCUDA, device_id: int = 0,
                 shape: Optional[Sequence[int]] = None, strides: Optional[Sequence[int]] = None,
                 byte_offset: int = 0, data: Optional[int] = None, dtype: Optional[DLDataType] = None,
                 versioned: bool = False, major: int = 1, minor: int = 0, flags: int = 0,
                 report_device: Optional[tuple] = ("same",)) -> None:
        self.host = host
        self.versioned = versioned
        self.deleted = 0
        self.deleted_ptr: List[int] = []
        self.deleted_event = threading.Event()
        shape = list(host.shape if shape is None else shape)
        self._shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self._strides = None if strides is None else (ctypes.c_int64 * max(len(strides), 1))(*strides)
        t = DLTensor()
        t.data = host.ctypes.data if data is None else data
        t.device = DLDevice(device_type, device_id)
        t.ndim = len(shape)
        t.dtype = dtype if dtype is not None else dtype_of(host.dtype)
        t.shape = self._shape
        t.strides = self._strides if self._strides is not None else ctypes.POINTER(ctypes.c_int64)()
        t.byte_offset = byte_offset
        if versioned:
            self._deleter = DELETER_V(self._on_delete)
            m = DLManagedTensorVersioned()
            m.version = DLPackVersion(major, minor)
            m.flags = flags
        else:
            self._deleter = DELETER(self._on_delete)
            m = DLManagedTensor()
        m.dl_tensor = t
        m.manager_ctx = None
        m.deleter = self._deleter
        self.managed = m
        self.address = ctypes.addressof(m)
        self.capsule = _PyCapsule_New(self.address, NAME_V if versioned else NAME, None)
        self._dev = (device_type, device_id) if report_device == ("same",) else report_device
        self.max_version_asked: List[Any] = []

    def _on_delete(self, ptr) -> None:
        self.deleted += 1
        self.deleted_ptr.append(ctypes.cast(ptr, ctypes.c_void_p).value)
        self.deleted_event.set()

    def __dlpack__(self, max_version: Any = None, stream: Any = None) -> Any:
        self.max_version_asked.append(max_version)
        return self.capsule

    def __dlpack_device__(self) -> tuple:
        return self._dev

    def consumed(self) -> bool:
        name = capsule_name(self.capsule)
        assert name in ("dltensor", "dltensor_versioned", "used_dltensor", "used_dltensor_versioned"), name
        return name.startswith("used_")


class NoDeviceQuery:
    """Like FakeDLPackArray but without __dlpack_device__ (the capsule's own device field decides)."""

    def __init__(self, inner: FakeDLPackArray) -> None:
        self.inner = inner

    def __dlpack__(self, max_version: Any = None, stream: Any = None) -> Any:
        return self.inner.__dlpack__(max_version, stream)


def wait_deleted(arr: FakeDLPackArray, timeout_s: float = 5.0) -> None:
    """The deleter runs with the GIL, possibly as a pending call: let the interpreter run."""
    deadline = time.monotonic() + timeout_s
    while not arr.deleted and time.monotonic() < deadline:
        gc.collect()
        arr.deleted_event.wait(0.01)
    assert arr.deleted == 1, arr.deleted
    assert arr.deleted_ptr == [arr.address]


# --- CAI -------------------------------------------------------------------------------------


class FakeCai:
    def __init__(self, cai: Any, owner: Any = None) -> None:
        self.__cuda_array_interface__ = cai
        self.owner = owner


def cai_of(host: np.ndarray, **override: Any) -> Dict[str, Any]:
    d = {"shape": host.shape, "typestr": host.dtype.str, "data": (host.ctypes.data, False), "strides": None,
         "version": 3}
    d.update(override)
    return d


# --- fixtures --------------------------------------------------------------------------------


class Arena:
    """Fake device memory: slices of a buffer allocated at import, before any test frees
    emulated device memory (whose address ranges the emulated GPU keeps refusing as freed)."""

    def __init__(self, size: int) -> None:
        self.buf = aligned_array(size, 4096)
        self.pos = 0

    def take(self, nbytes: int, dtype: Any = np.uint8, shape: Optional[Sequence[int]] = None) -> np.ndarray:
        start, self.pos = self.pos, self.pos + -(-nbytes // 4096) * 4096 + 4096
        assert self.pos <= len(self.buf), "Arena exhausted"
        out = self.buf[start : start + nbytes].view(dtype)
        return out.reshape(shape) if shape is not None else out


ARENA = Arena(64 << 20)


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    _core._emulated_gpu_stall(False)
    ARENA.pos = 0
    yield


@pytest.fixture
def eng() -> Iterator[dpmove.Engine]:
    e = dpmove.Engine(gpu="emulated")
    assert e.gpu_info()["provider"] == "emulated"
    yield e
    e.close(timeout_s=30)


def filled(rng, nbytes: int, dtype: Any = np.uint8, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Arena memory of nbytes random bytes, as dtype / shape."""
    raw = ARENA.take(nbytes)
    raw[:] = rand_bytes(rng, nbytes)
    a = raw.view(dtype)
    return a.reshape(shape) if shape is not None else a


def covers(eng: dpmove.Engine, rng, region, mem: np.ndarray, start: int, nbytes: int) -> None:
    """`region` is exactly mem's bytes [start, start + nbytes): a whole-region H2D lands there and
    nowhere else, and a D2H reads them back."""
    raw = mem.reshape(-1).view(np.uint8)
    assert len(region) == nbytes
    before = raw.copy()
    src = eng.alloc(nbytes)
    src.numpy()[:] = rand_bytes(rng, nbytes)
    assert_done(eng.copy(region, src), [nbytes])
    expect = before.copy()
    expect[start : start + nbytes] = src.numpy()
    np.testing.assert_array_equal(raw, expect)
    back = eng.alloc(nbytes)
    back.numpy()[:] = rand_bytes(rng, nbytes)
    assert_done(eng.copy(back, region), [nbytes])
    np.testing.assert_array_equal(back.numpy(), src.numpy())


# --- DLPack: accepted ------------------------------------------------------------------------


@pytest.mark.parametrize("versioned", [False, True])
@pytest.mark.parametrize("dtype,shape", [
    (np.uint8, (4096,)),
    (np.int16, (3000,)),
    (np.float32, (17, 33)),
    (np.int16, (2, 3, 5)),
    (np.float32, ()),
])
def test_dlpack_contiguous(eng, rng, versioned: bool, dtype, shape) -> None:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    mem = filled(rng, nbytes, dtype, shape)
    arr = FakeDLPackArray(mem, versioned=versioned)
    r = eng.register_device(arr)
    assert arr.consumed()
    assert r.location == "emulated" and r.device == 0 and r.writable
    assert r.nbytes == nbytes and r.address == mem.ctypes.data
    assert len(arr.max_version_asked) == 1 and tuple(arr.max_version_asked[0])[0] == 1, arr.max_version_asked
    covers(eng, rng, r, mem, 0, nbytes)
    assert arr.deleted == 0  # still in use


@pytest.mark.parametrize("versioned", [False, True])
def test_dlpack_byte_offset(eng, rng, versioned: bool) -> None:
    mem = filled(rng, 8192)
    arr = FakeDLPackArray(mem, shape=(1000,), byte_offset=1234, versioned=versioned)
    r = eng.register_device(arr)
    assert r.address == mem.ctypes.data + 1234 and len(r) == 1000
    covers(eng, rng, r, mem, 1234, 1000)


@pytest.mark.parametrize("strides", [(8, 1), (16, 2, 1)])
def test_dlpack_explicit_c_strides(eng, rng, strides) -> None:
    shape = (4, 8) if len(strides) == 2 else (3, 8, 2)
    mem = filled(rng, 2 * int(np.prod(shape)), np.int16, shape)
    arr = FakeDLPackArray(mem, strides=strides)
    r = eng.register_device(arr)
    covers(eng, rng, r, mem, 0, mem.nbytes)


def test_dlpack_size_one_dims_with_odd_strides(eng, rng) -> None:
    mem = filled(rng, 4 * 8, np.float32, (1, 8, 1))
    arr = FakeDLPackArray(mem, strides=(12345, 1, 999))
    r = eng.register_device(arr)
    covers(eng, rng, r, mem, 0, 32)


def test_dlpack_device_id(eng, rng) -> None:
    mem = filled(rng, 4096)
    r = eng.register_device(FakeDLPackArray(mem, device_id=1))
    assert r.device == 1
    r = eng.register_device(FakeDLPackArray(ARENA.take(4096), device_id=1), device=1)
    assert r.device == 1


def test_dlpack_read_only_flag(eng, rng) -> None:
    mem = filled(rng, 4096)
    arr = FakeDLPackArray(mem, versioned=True, flags=READ_ONLY)
    r = eng.register_device(arr)
    assert not r.writable
    h = eng.alloc(4096)
    with pytest.raises(ValueError, match="device region is read-only"):
        eng.copy(r, h)
    assert_done(eng.copy(h, r), [4096])  # a source is fine
    np.testing.assert_array_equal(h.numpy(), mem)

    arr = FakeDLPackArray(filled(rng, 4096), versioned=True, flags=READ_ONLY)
    with pytest.raises(ValueError, match=r"read-only \(DLPack READ_ONLY flag\)"):
        eng.register_device(arr, readonly=False)
    assert not arr.consumed() and arr.deleted == 0

    # readonly=True makes a writable tensor a source only
    r = eng.register_device(FakeDLPackArray(filled(rng, 4096), versioned=True), readonly=True)
    assert not r.writable
    r = eng.register_device(FakeDLPackArray(filled(rng, 4096)), readonly=True)
    assert not r.writable


@pytest.mark.parametrize("versioned", [False, True])
def test_dlpack_deleter_called_once_after_last_use(eng, rng, versioned: bool) -> None:
    mem = filled(rng, 1 << 16)
    arr = FakeDLPackArray(mem, versioned=versioned)
    r = eng.register_device(arr)
    h = eng.alloc(1 << 16)
    req = eng.copy(r, h, [(0, 0, 4096), (8192, 100, 5000)])
    assert_done(req, [4096, 5000])
    del r
    gc.collect()
    assert arr.deleted == 0  # the request still holds the region
    del req
    gc.collect()
    wait_deleted(arr)
    # once only, also after more collections and engine activity
    gc.collect()
    eng.register_device(FakeDLPackArray(ARENA.take(4096)))
    assert arr.deleted == 1


def test_dlpack_deleter_runs_when_region_closed_and_dropped(eng, rng) -> None:
    arr = FakeDLPackArray(filled(rng, 4096))
    r = eng.register_device(arr)
    r.close()
    del r
    wait_deleted(arr)


def test_dlpack_deleter_runs_when_engine_closes_first() -> None:
    eng = dpmove.Engine(gpu="emulated")
    arr = FakeDLPackArray(ARENA.take(4096))
    r = eng.register_device(arr)
    eng.close()
    del r
    wait_deleted(arr)


# --- DLPack: rejected ------------------------------------------------------------------------


def rejected(eng, obj, match: str, exc=ValueError, **kw) -> None:
    """register_device(obj) raises; the capsule is then unconsumed, or consumed and deleted
    exactly once (never consumed and leaked, never deleted twice)."""
    arr = obj if isinstance(obj, FakeDLPackArray) else obj.inner
    with pytest.raises(exc, match=match):
        eng.register_device(obj, **kw)
    gc.collect()
    if arr.consumed():
        wait_deleted(arr)
    else:
        assert arr.deleted == 0


@pytest.mark.parametrize("versioned", [False, True])
@pytest.mark.parametrize("shape,strides", [((4, 8), (16, 1)), ((4, 8), (1, 4)), ((8,), (2,)), ((2, 2, 4), (8, 4, 2))])
def test_dlpack_strided_rejected(eng, rng, versioned: bool, shape, strides) -> None:
    mem = filled(rng, 4 * 64, np.float32)
    arr = FakeDLPackArray(mem, shape=shape, strides=strides, versioned=versioned)
    rejected(eng, arr, r"expected a C-contiguous tensor; this one is strided")


def test_dlpack_capsule_already_consumed(eng, rng) -> None:
    arr = FakeDLPackArray(filled(rng, 4096))
    r = eng.register_device(arr)
    assert capsule_name(arr.capsule) == "used_dltensor"
    with pytest.raises(ValueError, match=r"got 'used_dltensor': it was already consumed"):
        eng.register_device(arr)
    assert arr.deleted == 0  # the first region still owns it
    del r
    wait_deleted(arr)

    arr = FakeDLPackArray(filled(rng, 4096), versioned=True)
    eng.register_device(arr)
    with pytest.raises(ValueError, match=r"got 'used_dltensor_versioned': it was already consumed"):
        eng.register_device(arr)


def test_dlpack_not_a_capsule(eng) -> None:
    class Bad:
        def __dlpack__(self, max_version=None, stream=None):
            return _PyCapsule_New(ctypes.addressof(_DUMMY), b"something_else", None)

        def __dlpack_device__(self):
            return (kDLCUDA, 0)

    with pytest.raises(ValueError, match=r"expected an unused DLPack capsule .*got 'something_else'"):
        eng.register_device(Bad())


_DUMMY = ctypes.c_int64(0)


@pytest.mark.parametrize("device_type,what", [
    (kDLCPU, r"kDLCPU \(host memory\); register host memory with Engine.register"),
    (kDLCUDAHost, r"kDLCUDAHost \(pinned host memory\); register host memory"),
    (kDLCUDAManaged, "kDLCUDAManaged"),
    (7, "device type 7"),
])
@pytest.mark.parametrize("query", ["dlpack_device", "capsule_only"])
def test_dlpack_wrong_device_type(eng, rng, device_type: int, what: str, query: str) -> None:
    arr = FakeDLPackArray(filled(rng, 4096), device_type=device_type,
                          report_device=("same",) if query == "dlpack_device" else None)
    obj = arr if query == "dlpack_device" else NoDeviceQuery(arr)
    rejected(eng, obj, rf"expected device memory \(DLPack kDLCUDA\), got {what}")
    if query == "dlpack_device":
        assert arr.max_version_asked == []  # refused before asking for a capsule


def test_dlpack_device_query_and_capsule_disagree(eng, rng) -> None:
    """__dlpack_device__ says kDLCUDA but the capsule says kDLCPU: the capsule is what counts."""
    arr = FakeDLPackArray(filled(rng, 4096), device_type=kDLCPU, report_device=(kDLCUDA, 0))
    rejected(eng, arr, r"got kDLCPU")


def test_dlpack_device_id_mismatch(eng, rng) -> None:
    arr = FakeDLPackArray(filled(rng, 4096), device_id=1)
    rejected(eng, arr, r"the tensor is on device 1, not device 0", device=0)
    arr = FakeDLPackArray(filled(rng, 4096), device_id=0)
    rejected(eng, arr, r"the tensor is on device 0, not device 1", device=1)


def test_dlpack_device_that_does_not_exist(eng, rng) -> None:
    arr = FakeDLPackArray(filled(rng, 4096), device_id=5)
    rejected(eng, arr, r"device 5 does not exist")


@pytest.mark.parametrize("major", [2, 7])
def test_dlpack_unknown_major_version(eng, rng, major: int) -> None:
    arr = FakeDLPackArray(filled(rng, 4096), versioned=True, major=major)
    rejected(eng, arr, rf"DLPack capsule of version {major}\.x; dpmove reads 0\.x and 1\.x")


def test_dlpack_sub_byte_dtype(eng, rng) -> None:
    arr = FakeDLPackArray(filled(rng, 4096), dtype=DLDataType(kDLInt, 4, 1))
    rejected(eng, arr, r"sub-byte element type \(4 bits\)")


def test_dlpack_negative_dim_and_empty(eng, rng) -> None:
    rejected(eng, FakeDLPackArray(filled(rng, 4096), shape=(4, -1)), "negative dimension")
    rejected(eng, FakeDLPackArray(filled(rng, 4096), shape=(0,)), r"empty \(0 bytes\)")
    rejected(eng, FakeDLPackArray(filled(rng, 4096), shape=(16, 0, 3)), r"empty \(0 bytes\)")


def test_dlpack_null_data(eng) -> None:
    arr = FakeDLPackArray(ARENA.take(4096), data=0)
    rejected(eng, arr, "data pointer is NULL")


def test_dlpack_into_dpmove_host_region(eng) -> None:
    h = eng.alloc(4096)
    arr = FakeDLPackArray(h.numpy())
    rejected(eng, arr, "is host memory, not device memory")


def test_dlpack_gpu_off() -> None:
    eng = dpmove.Engine(gpu="off")
    try:
        arr = FakeDLPackArray(ARENA.take(4096))
        rejected(eng, arr, r"no GPU \(gpu='off'\)", exc=dpmove.UnsupportedOperation)
    finally:
        eng.close()


# --- __cuda_array_interface__ ----------------------------------------------------------------


@pytest.mark.parametrize("typestr,shape", [
    ("|u1", (4096,)),
    ("|i1", (7, 9)),
    ("<i2", (1000,)),
    ("<u2", (10, 10)),
    ("<f4", (33, 3)),
    ("<i8", (5,)),
    ("<f8", (2, 3, 4)),
    ("<c8", (9,)),
    ("|b1", (100,)),
    ("<f2", (65,)),
])
def test_cai_typestrs(eng, rng, typestr: str, shape) -> None:
    dt = np.dtype(typestr)
    nbytes = int(np.prod(shape)) * dt.itemsize
    mem = filled(rng, nbytes)
    r = eng.register_device(FakeCai(cai_of(mem, typestr=typestr, shape=shape)))
    assert r.location == "emulated" and len(r) == nbytes and r.writable
    covers(eng, rng, r, mem, 0, nbytes)


def test_cai_scalar_shape(eng, rng) -> None:
    """shape () is one element (a 0-d array)."""
    mem = filled(rng, 8)
    r = eng.register_device(FakeCai(cai_of(mem, typestr="<f8", shape=())))
    assert len(r) == 8


@pytest.mark.parametrize("strides", [None, (24, 4), [24, 4]])
def test_cai_c_strides(eng, rng, strides) -> None:
    mem = filled(rng, 5 * 6 * 4)
    r = eng.register_device(FakeCai(cai_of(mem, typestr="<f4", shape=(5, 6), strides=strides)))
    covers(eng, rng, r, mem, 0, 120)


def test_cai_size_one_dims_with_odd_strides(eng, rng) -> None:
    mem = filled(rng, 4 * 6)
    r = eng.register_device(FakeCai(cai_of(mem, typestr="<f4", shape=(1, 6, 1), strides=(7, 4, 1000))))
    covers(eng, rng, r, mem, 0, 24)


@pytest.mark.parametrize("shape,strides", [((5, 6), (48, 4)), ((5, 6), (4, 20)), ((30,), (8,)), ((2, 3), (12, 2))])
def test_cai_strided_rejected(eng, rng, shape, strides) -> None:
    mem = filled(rng, 1024)
    with pytest.raises(ValueError, match=r"expected a C-contiguous array; this one is strided"):
        eng.register_device(FakeCai(cai_of(mem, typestr="<f4", shape=shape, strides=strides)))


def test_cai_pointer_into_the_middle(eng, rng) -> None:
    mem = filled(rng, 1 << 16)
    for off, n in ((1, 100), (4096, 4096), (12345, 20000), ((1 << 16) - 3, 3)):
        r = eng.register_device(FakeCai(cai_of(mem, shape=(n,), data=(mem.ctypes.data + off, False))))
        assert r.address == mem.ctypes.data + off
        covers(eng, rng, r, mem, off, n)


def test_cai_readonly(eng, rng) -> None:
    mem = filled(rng, 4096)
    keep = mem.copy()
    r = eng.register_device(FakeCai(cai_of(mem, data=(mem.ctypes.data, True))))
    assert not r.writable
    h = eng.alloc(4096)
    h.numpy()[:] = rand_bytes(rng, 4096)
    with pytest.raises(ValueError, match="device region is read-only"):
        eng.copy(r, h)
    np.testing.assert_array_equal(mem, keep)
    assert_done(eng.copy(h, r), [4096])
    np.testing.assert_array_equal(h.numpy(), keep)
    with pytest.raises(ValueError, match=r"read-only \(__cuda_array_interface__ data\[1\] is True\)"):
        eng.register_device(FakeCai(cai_of(mem, data=(mem.ctypes.data, True))), readonly=False)
    r = eng.register_device(FakeCai(cai_of(mem)), readonly=True)
    assert not r.writable
    r = eng.register_device(FakeCai(cai_of(mem)), readonly=False)
    assert r.writable


def test_cai_keeps_the_owner_alive(eng, rng) -> None:
    import weakref

    mem = filled(rng, 4096)
    obj = FakeCai(cai_of(mem))
    ref = weakref.ref(obj)
    r = eng.register_device(obj)
    del obj
    gc.collect()
    assert ref() is not None  # the region references the array
    del r
    deadline = time.monotonic() + 5
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert ref() is None


PTR = object()  # stands for a valid data pointer in the cases below


@pytest.mark.parametrize("cai,match", [
    ({"shape": (16,), "typestr": "|u1", "data": (None, False), "mask": [1] * 16}, "mask is not supported"),
    ({"shape": (16,), "typestr": "|u1", "data": (0, False)}, "data pointer is NULL"),
    ({"shape": (16,), "typestr": "|u1", "data": (None, False)}, "data pointer is NULL"),
    ({"typestr": "|u1", "data": (PTR, False)}, "lacks a valid shape / typestr / data"),
    ({"shape": (16,), "data": (PTR, False)}, "lacks a valid shape / typestr / data"),
    ({"shape": (16,), "typestr": "|u1"}, "lacks a valid shape / typestr / data"),
    ({"shape": ("x",), "typestr": "|u1", "data": (PTR, False)}, "lacks a valid shape / typestr / data"),
    ({"shape": (16,), "typestr": "|u1", "data": 12345}, r"data must be \(pointer, read_only\)"),
    ({"shape": (16,), "typestr": "|u1", "data": (PTR, False, 3)}, r"data must be \(pointer, read_only\)"),
    ({"shape": (16,), "typestr": "nope", "data": (PTR, False)}, "typestr 'nope' is not a dtype"),
    ({"shape": (0,), "typestr": "|u1", "data": (PTR, False)}, r"empty \(0 bytes\)"),
    ({"shape": (4, 0), "typestr": "<f4", "data": (PTR, False)}, r"empty \(0 bytes\)"),
    ({"shape": (-4,), "typestr": "|u1", "data": (PTR, False)}, "negative dimension"),
])
def test_cai_rejected(eng, cai, match: str) -> None:
    mem = ARENA.take(64)
    cai = dict(cai)
    if isinstance(cai.get("data"), tuple):  # a real pointer where the case has PTR
        cai["data"] = tuple(mem.ctypes.data if x is PTR else x for x in cai["data"])
    with pytest.raises(ValueError, match=match):
        eng.register_device(FakeCai(cai, owner=mem))


def test_cai_not_a_dict(eng) -> None:
    with pytest.raises(ValueError, match="must be a dict, got list"):
        eng.register_device(FakeCai([("shape", (4,))]))


def test_cai_preferred_over_dlpack(eng, rng) -> None:
    """An object with both interfaces (CuPy) is read through __cuda_array_interface__; its
    DLPack capsule is not consumed."""
    mem = filled(rng, 4096)
    arr = FakeDLPackArray(mem)
    arr.__cuda_array_interface__ = cai_of(mem)
    r = eng.register_device(arr)
    assert len(r) == 4096 and not arr.consumed() and arr.max_version_asked == []
