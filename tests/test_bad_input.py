"""Bad input: every case has one defined outcome, and a rejected request changes nothing.

A `Victim` is a file and a region filled with random bytes; after a rejected submission both
must be byte-for-byte what they were, nothing may have been queued (engine counters), and the
engine must still serve a valid request.
"""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import numpy as np
import pytest

import dpmove
from conftest import aligned_array, assert_done, direct_pread, finished, mounted, rand_bytes, read_file, write_file

INT64_MAX = 2**63 - 1
SIZE = 1 << 18


class Victim:
    def __init__(self, eng, path: Path, rng, direct: bool, mode: str = "r+") -> None:
        self.eng, self.path = eng, path
        self.file_data = rand_bytes(rng, SIZE)
        write_file(path, self.file_data)
        self.f = eng.open(path, mode, direct=direct)
        assert self.f.direct is direct
        self.region = eng.alloc(SIZE)
        self.buf = self.region.numpy()
        self.buf[:] = rand_bytes(rng, SIZE)
        self.buf_data = self.buf.copy()
        self.stats0 = eng.stats()

    def submit(self, op: str, batch, region=None, **kw):
        return getattr(self.eng, op)(self.f, self.region if region is None else region, batch, **kw)

    def untouched(self) -> None:
        np.testing.assert_array_equal(read_file(self.path), self.file_data)
        np.testing.assert_array_equal(self.buf, self.buf_data)
        st = self.eng.stats()
        for k in ("entries_started", "ops_submitted", "requests_submitted"):
            assert st[k] == self.stats0[k], (k, st, self.stats0)

    def still_works(self) -> None:
        """A valid read right after (into scratch memory, so the victim stays as it was)."""
        if not self.f.readable:
            return
        scratch = self.eng.alloc(8192)
        req = self.eng.read(self.f, scratch, [(8192, 4096, 4096), (0, 0, 4096)])
        assert_done(req, [4096, 4096])
        got = scratch.numpy()
        np.testing.assert_array_equal(got[:4096], self.file_data[:4096])
        np.testing.assert_array_equal(got[4096:], self.file_data[8192:12288])
        self.stats0 = self.eng.stats()


@pytest.fixture
def victim(engine, direct_dir: Path, rng):
    def make(direct: bool = True, mode: str = "r+") -> Victim:
        return Victim(engine, direct_dir / f"victim-{direct}-{mode}.bin", rng, direct, mode)

    return make


def rejected(v: Victim, op: str, batch, exc, match: str, region=None):
    with pytest.raises(exc, match=match) as info:
        v.submit(op, batch, region)
    v.untouched()
    v.still_works()
    return info.value


OPS = ["read", "write"]


# --- O_DIRECT alignment ----------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_direct_misaligned_file_offset(victim, op: str) -> None:
    v = victim(direct=True)
    a = v.f.offset_align
    assert a > 1 and 4096 % a == 0
    batch = [(0, 0, 4096), (4096, 4096, 4096), (8192 + a // 2, 8192, 4096)]
    err = rejected(v, op, batch, ValueError, rf"entry 2 .*multiples of {a} bytes")
    assert "O_DIRECT" in str(err)


@pytest.mark.parametrize("op", OPS)
def test_direct_misaligned_length(victim, op: str) -> None:
    v = victim(direct=True)
    a = v.f.offset_align
    batch = [(0, 0, 4096), (8192, 8192, 4096 + a // 2)]
    rejected(v, op, batch, ValueError, rf"entry 1 .*multiples of {a} bytes")


@pytest.mark.parametrize("op", OPS)
def test_direct_misaligned_memory(victim, op: str) -> None:
    v = victim(direct=True)
    m = v.f.mem_align
    if m == 1:
        pytest.skip("this filesystem reports no memory alignment for O_DIRECT (mem_align == 1)")
    batch = [(0, 0, 4096), (4096, 4096 + m // 2, 4096)]
    rejected(v, op, batch, ValueError, rf"entry 1 .*memory address to be a multiple of {m} bytes")
    # The same through a region that itself starts off the boundary.
    rejected(v, op, [(0, 0, 4096)], ValueError, rf"multiple of {m} bytes", region=v.region[1:])


@pytest.mark.parametrize("op", OPS)
def test_direct_misaligned_numpy_buffer(victim, op: str) -> None:
    v = victim(direct=True)
    m = v.f.mem_align
    if m == 1:
        pytest.skip("this filesystem reports no memory alignment for O_DIRECT (mem_align == 1)")
    arr = aligned_array(8192 + m, m)[1 : 8192 + 1]
    keep = arr.copy()
    rejected(v, op, [(0, 0, 4096)], ValueError, rf"multiple of {m} bytes", region=arr)
    np.testing.assert_array_equal(arr, keep)


def test_buffered_file_accepts_unaligned(engine, tmp_path: Path, rng) -> None:
    """The contrast: without O_DIRECT the same unaligned entries are valid and exact."""
    path = tmp_path / "buffered.bin"
    data = rand_bytes(rng, 20_000)
    write_file(path, data)
    f = engine.open(path, "r", direct=False)
    arr = aligned_array(10_000, 4096)[1:]
    assert_done(engine.read(f, arr, [(8192 + 256, 3, 4096 + 100)]), [4196])
    np.testing.assert_array_equal(arr[3 : 3 + 4196], data[8448 : 8448 + 4196])


# --- offsets and lengths ---------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("column,value,match", [
    (0, -4096, "offsets must be >= 0"),
    (1, -1, "offsets must be >= 0"),
    (2, -4096, "length must be > 0"),
    (2, 0, "length must be > 0"),
])
def test_negative_and_zero(victim, op: str, column: int, value: int, match: str) -> None:
    v = victim(direct=True)
    bad = [8192, 8192, 4096]
    bad[column] = value
    rejected(v, op, [(0, 0, 4096), tuple(bad)], ValueError, rf"entry 1 .*{match}")


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fo,ln", [(2**63 - 4096, 8192), (2**63 - 4096, 4096), (INT64_MAX, 1), (4096, INT64_MAX - 4095)])
def test_overflowing_offsets(victim, op: str, direct: bool, fo: int, ln: int) -> None:
    v = victim(direct=direct)
    # Overflow is checked before alignment, so the message is the same either way.
    rejected(v, op, [(0, 0, 4096), (fo, 0, ln)], ValueError, r"entry 1 .*file_offset \+ length overflows")


@pytest.mark.parametrize("op", OPS)
def test_largest_valid_offset_matches_os(engine, tmp_path: Path, op: str) -> None:
    """file_offset + length == 2**63 - 1 passes validation; the kernel's answer per entry must
    be what os.pread / os.pwrite get at the same offset."""
    off = INT64_MAX - 1
    ref_path, path = tmp_path / "ref.bin", tmp_path / "dp.bin"
    write_file(ref_path, np.arange(100, dtype=np.uint8))
    write_file(path, np.arange(100, dtype=np.uint8))
    fd = os.open(ref_path, os.O_RDWR)
    try:
        ref = os.pread(fd, 1, off) if op == "read" else os.pwrite(fd, b"x", off)
        ref_errno = 0
    except OSError as e:
        ref, ref_errno = None, e.errno
    finally:
        os.close(fd)
    f = engine.open(path, "r+", direct=False)
    buf = np.full(1, 0x5A, np.uint8)
    req = getattr(engine, op)(f, buf, [(off, 0, 1)])
    finished(req)
    if ref_errno:
        assert req.state == dpmove.RequestState.FAILED
        assert req.status.tolist() == [-ref_errno] and req.bytes.tolist() == [0]
        with pytest.raises(dpmove.TransferError) as info:
            req.result(timeout_s=10)
        assert info.value.errno == ref_errno
    elif op == "read":
        assert ref == b""  # beyond the filesystem's largest file: end of file
        assert req.state == dpmove.RequestState.FAILED
        assert req.status.tolist() == [dpmove.ENTRY_SHORT] and req.bytes.tolist() == [0]
    else:
        assert ref == 1
        assert_done(req, [1])
    assert buf[0] == 0x5A
    assert os.stat(path).st_size == os.stat(ref_path).st_size
    os.truncate(path, 100)
    os.truncate(ref_path, 100)
    np.testing.assert_array_equal(read_file(path), np.arange(100, dtype=np.uint8))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch", [
    pytest.param(np.array([[2**63, 0, 4096]], dtype=np.uint64), id="uint64-offset"),
    pytest.param(np.array([[0, 0, 2**64 - 1]], dtype=np.uint64), id="uint64-length"),
    pytest.param([[2**63, 0, 4096]], id="pyint-2**63"),
    pytest.param([[0, 2**64, 4096]], id="pyint-2**64"),
    pytest.param([[-(2**63) - 1, 0, 4096]], id="pyint-below-int64"),
])
def test_values_outside_int64(victim, op: str, batch) -> None:
    v = victim(direct=True)
    rejected(v, op, batch, ValueError, r"2\*\*63-1")


def test_entries_helper_rejects(engine) -> None:
    with pytest.raises(ValueError, match=r"2\*\*63-1"):
        dpmove.entries(np.uint64(2**63), 0, 4096)
    with pytest.raises(ValueError, match=r"2\*\*63-1"):
        dpmove.entries([0, 2**63], 0, 4096)
    with pytest.raises(ValueError, match=r"2\*\*63-1"):
        dpmove.entries(0, 0, [4096, 2**64])
    with pytest.raises(TypeError, match="integers"):
        dpmove.entries(0, 0, 4096.0)
    with pytest.raises(TypeError, match="integers"):
        dpmove.entries([0.0, 1.0], 0, 4096)
    with pytest.raises(ValueError):  # columns that do not broadcast
        dpmove.entries([0, 1], [0, 1, 2], 4096)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch", [
    pytest.param(np.array([[0, 0, 4096]], dtype=np.float64), id="float64"),
    pytest.param([[0.0, 0, 4096]], id="pyfloat"),
    pytest.param([[0, 0, 4096.5]], id="pyfloat-fraction"),
    pytest.param(np.array([[True, False, True]]), id="bool"),
    pytest.param("0 0 4096", id="str"),
    pytest.param([[0, 0, None]], id="None"),
])
def test_non_integer_entries(victim, op: str, batch) -> None:
    v = victim(direct=True)
    rejected(v, op, batch, TypeError, "must be integers")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(2, 2), (2, 4), (2, 3, 1), (1, 1, 3), (3, 1), (4,), (0, 2)])
def test_wrong_shape(victim, op: str, shape) -> None:
    v = victim(direct=True)
    batch = np.zeros(shape, dtype=np.int64)
    batch[...] = 4096
    rejected(v, op, batch, ValueError, r"shape \(N, 3\)")


# --- end of file -----------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
def test_read_past_end_of_file(engine, direct_dir: Path, rng, direct: bool) -> None:
    """Reads that reach end of file: FAILED, status ENTRY_SHORT, bytes up to EOF; the buffer
    holds exactly what the same read through os.pread(v) leaves in it."""
    path = direct_dir / "short.bin"
    size = 10_000
    data = rand_bytes(rng, size)
    write_file(path, data)
    f = engine.open(path, "r", direct=direct)
    ent = np.array([(0, 0, 16384), (16384, 16384, 4096), (8192, 32768, 8192), (4096, 49152, 4096)], np.int64)
    region = engine.alloc(65536)
    buf = region.numpy()
    poison = rand_bytes(rng, buf.size)
    buf[:] = poison
    req = engine.read(f, region, ent)
    assert finished(req) == dpmove.RequestState.FAILED
    assert req.status.tolist() == [dpmove.ENTRY_SHORT, dpmove.ENTRY_SHORT, dpmove.ENTRY_SHORT, 0]
    assert req.bytes.tolist() == [10_000, 0, 1808, 4096]
    assert req.num_failed == 3 and req.bytes_done == 10_000 + 1808 + 4096
    with pytest.raises(dpmove.TransferError) as info:
        req.result(timeout_s=10)
    err = info.value
    assert isinstance(err, dpmove.Error) and isinstance(err, OSError)
    assert err.errno == errno.ENODATA and err.filename == str(path)
    assert "short read" in str(err) and "entry 0" in str(err)
    with pytest.raises(dpmove.TransferError):
        req.check()

    expect = poison.copy()
    for fo, ro, ln in ent:
        if direct:  # the kernel may fill the part of an O_DIRECT read past EOF; compare with it
            expect[ro : ro + ln] = direct_pread(path, int(ln), int(fo), poison[ro : ro + ln])
        else:
            got = data[fo : fo + ln]
            expect[ro : ro + got.size] = got
    np.testing.assert_array_equal(buf, expect)
    if not direct:  # buffered: nothing past EOF was touched
        np.testing.assert_array_equal(buf[10_000:16384], poison[10_000:16384])
        np.testing.assert_array_equal(buf[16384:20480], poison[16384:20480])


# --- regions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("entry", [(0, SIZE - 4096, 8192), (0, SIZE + 4096, 4096), (0, 0, SIZE + 4096), (0, 2**62, 4096)])
def test_region_too_small(victim, op: str, entry) -> None:
    v = victim(direct=True)
    rejected(v, op, [(0, 0, 4096), entry], ValueError, rf"entry 1 .*does not fit in the region of {SIZE} bytes")


@pytest.mark.parametrize("op", OPS)
def test_region_slice_too_small(victim, op: str) -> None:
    v = victim(direct=True)
    rejected(v, op, [(0, 0, 8192)], ValueError, "does not fit in the region of 4096 bytes", region=v.region[4096:8192])


@pytest.mark.parametrize("direct", [True, False])
def test_read_into_readonly(victim, direct: bool) -> None:
    v = victim(direct=direct)
    arr = aligned_array(8192, 4096)
    arr[:] = 7
    arr.flags.writeable = False
    rejected(v, "read", [(0, 0, 4096)], ValueError, "read-only", region=arr)
    ro_region = v.eng.register(arr)
    assert not ro_region.writable
    rejected(v, "read", [(0, 0, 4096)], ValueError, "read-only", region=ro_region)
    rejected(v, "read", [(0, 0, 4096)], ValueError, "read-only", region=bytes(8192))
    assert (arr == 7).all()


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous(victim, op: str) -> None:
    v = victim(direct=False)
    arr = np.zeros(16384, np.uint8)
    keep = arr.copy()
    rejected(v, op, [(0, 0, 100)], ValueError, "C-contiguous", region=arr[::2])
    rejected(v, op, [(0, 0, 100)], ValueError, "C-contiguous", region=np.zeros((64, 64), np.uint8, order="F"))
    with pytest.raises(ValueError, match="C-contiguous"):
        v.eng.register(arr[::2])
    np.testing.assert_array_equal(arr, keep)


def test_closed_region(victim) -> None:
    v = victim(direct=True)
    r = v.eng.alloc(8192)
    s = r[0:4096]
    r.close()
    assert r.closed and s.closed
    for op in OPS:
        rejected(v, op, [(0, 0, 4096)], ValueError, "Region is closed", region=r)
        rejected(v, op, [(0, 0, 4096)], ValueError, "parent region is closed", region=s)
    with pytest.raises(ValueError, match="closed"):
        r.numpy()
    with pytest.raises(ValueError, match="closed"):
        r[0:10]
    with pytest.raises(BufferError) as info:
        memoryview(r)
    assert isinstance(info.value.__cause__, ValueError) and "closed" in str(info.value.__cause__)
    r.close()  # idempotent


def test_closing_a_slice_leaves_the_parent(victim) -> None:
    v = victim(direct=True)
    s = v.region[0:8192]
    s.close()
    assert s.closed and not v.region.closed
    rejected(v, "read", [(0, 0, 4096)], ValueError, "Region is closed", region=s)


def test_closed_file(victim) -> None:
    v = victim(direct=True)
    v.f.close()
    assert v.f.closed
    for op in OPS:
        with pytest.raises(ValueError, match="is closed"):
            v.submit(op, [(0, 0, 4096)])
    for call in (v.f.size, v.f.sync, v.f.fileno, lambda: v.f.truncate(0), lambda: v.f.allocate(0, 4096)):
        with pytest.raises(ValueError, match="is closed"):
            call()
    v.f.close()  # idempotent
    np.testing.assert_array_equal(read_file(v.path), v.file_data)
    np.testing.assert_array_equal(v.buf, v.buf_data)


def test_closed_engine(make_engine, tmp_path: Path) -> None:
    eng = make_engine()
    path = tmp_path / "e.bin"
    write_file(path, np.arange(8192, dtype=np.uint8))
    f = eng.open(path, "r+", direct=False)
    region = eng.alloc(8192)
    buf = region.numpy()
    buf[:] = 3
    eng.close()
    assert eng.closed and "closed" in repr(eng)
    for call in (
        lambda: eng.read(f, region, [(0, 0, 4096)]),
        lambda: eng.write(f, region, [(0, 0, 4096)]),
        lambda: eng.read(f, np.zeros(4096, np.uint8), [(0, 0, 4096)]),
        lambda: eng.alloc(4096),
        lambda: eng.open(path, "r"),
        lambda: eng.register(np.zeros(10, np.uint8)),
    ):
        with pytest.raises(ValueError, match="Engine is closed"):
            call()
    eng.close()  # idempotent
    assert (buf == 3).all()
    np.testing.assert_array_equal(read_file(path), np.arange(8192, dtype=np.uint8))


# --- empty batch -----------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch", [
    pytest.param([], id="list"),
    pytest.param(np.empty((0, 3), np.int64), id="int64"),
    pytest.param(np.empty((0, 3), np.uint32), id="uint32"),
    pytest.param(dpmove.entries([], [], []), id="entries"),
])
def test_empty_batch(victim, op: str, batch) -> None:
    v = victim(direct=True)
    req = v.submit(op, batch)
    assert req.state == dpmove.RequestState.DONE and req.done and req.quiesced
    assert len(req) == 0 and req.num_entries == 0
    assert req.wait(0) == dpmove.RequestState.DONE
    assert req.result(timeout_s=0) == 0
    assert req.status.shape == (0,) and req.bytes.shape == (0,) and req.latency_ns.shape == (0,)
    assert req.cancel() is False and req.state == dpmove.RequestState.DONE
    np.testing.assert_array_equal(read_file(v.path), v.file_data)
    np.testing.assert_array_equal(v.buf, v.buf_data)
    assert v.eng.stats()["entries_started"] == v.stats0["entries_started"]


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
def test_write_to_readonly_file(victim, direct: bool) -> None:
    v = victim(direct=direct, mode="r")
    fd = os.open(v.path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ref:
            os.pwrite(fd, b"x" * 4096, 0)
    finally:
        os.close(fd)
    err = rejected(v, "write", [(0, 0, 4096)], dpmove.UnsupportedOperation, "read-only")
    assert err.errno == ref.value.errno == errno.EBADF
    assert isinstance(err, ValueError) and isinstance(err, dpmove.Error) and isinstance(err, OSError)
    for call in (lambda: v.f.truncate(0), lambda: v.f.allocate(0, 4096)):
        with pytest.raises(dpmove.UnsupportedOperation) as info:
            call()
        assert info.value.errno == errno.EBADF
    np.testing.assert_array_equal(read_file(v.path), v.file_data)


def test_read_from_writeonly_file(engine, tmp_path: Path) -> None:
    path = tmp_path / "wo.bin"
    f = engine.open(path, "w", direct=False)
    assert f.writable and not f.readable
    buf = np.full(100, 9, np.uint8)
    with pytest.raises(dpmove.UnsupportedOperation, match="write-only") as info:
        engine.read(f, buf, [(0, 0, 100)])
    assert info.value.errno == errno.EBADF and isinstance(info.value, ValueError)
    assert (buf == 9).all()


@pytest.mark.parametrize("mode", ["r", "r+"])
@pytest.mark.parametrize("direct", [True, False, "auto"])
def test_missing_path(engine, tmp_path: Path, mode: str, direct) -> None:
    path = tmp_path / "missing.bin"
    with pytest.raises(dpmove.NotFound) as info:
        engine.open(path, mode, direct=direct)
    err = info.value
    assert err.errno == errno.ENOENT and err.filename == str(path)
    assert isinstance(err, FileNotFoundError) and isinstance(err, dpmove.Error)
    assert not path.exists()


@pytest.mark.parametrize("mode", ["w", "w+", "rw"])
def test_missing_directory(engine, tmp_path: Path, mode: str) -> None:
    path = tmp_path / "no-such-dir" / "f.bin"
    with pytest.raises(dpmove.NotFound) as info:
        engine.open(path, mode)
    assert info.value.errno == errno.ENOENT and info.value.filename == str(path)


def test_directory_path(engine, tmp_path: Path) -> None:
    for mode in ("r", "r+"):
        with pytest.raises(dpmove.Error) as info:
            engine.open(tmp_path, mode)
        assert info.value.errno == errno.EISDIR and info.value.filename == str(tmp_path)


def test_direct_refused_by_procfs(engine) -> None:
    """procfs refuses O_DIRECT (EINVAL): direct=True raises, 'auto' falls back and says so."""
    path = "/proc/self/cmdline"
    with pytest.raises(dpmove.Error) as info:
        engine.open(path, "r", direct=True)
    assert info.value.errno == errno.EINVAL and "direct I/O" in str(info.value)
    f = engine.open(path, "r", direct="auto")
    assert f.direct is False and "refused O_DIRECT" in f.direct_reason
    assert f.mem_align == 1 and f.offset_align == 1
    with open(path, "rb") as fh:
        ref = fh.read()
    buf = np.zeros(len(ref), np.uint8)
    assert_done(engine.read(f, buf, [(0, 0, len(ref))]), [len(ref)])
    assert buf.tobytes() == ref


@pytest.mark.root
@pytest.mark.timeout(60, method="thread")
def test_direct_refused_by_ramfs(make_engine, rng) -> None:
    """ramfs refuses O_DIRECT. (tmpfs accepts it since Linux 6.6, so it cannot serve here.)"""
    engine = make_engine(track=False)  # keeps no request, so no descriptor outlives the mount
    with mounted("ramfs") as where:
        path = where / "f.bin"
        data = rand_bytes(rng, 30_000)
        write_file(path, data)
        for mode in ("r", "r+", "w+"):
            with pytest.raises(dpmove.Error) as info:
                engine.open(path, mode, direct=True)
            assert info.value.errno == errno.EINVAL and info.value.filename == str(path)
        np.testing.assert_array_equal(read_file(path), data)  # the refused "w+" did not truncate
        f = engine.open(path, "r+", direct="auto")
        assert f.direct is False and "refused O_DIRECT" in f.direct_reason
        src = rand_bytes(rng, 5000)
        assert_done(engine.write(f, src, [(123, 0, 5000)]), [5000])
        expect = data.copy()
        expect[123:5123] = src
        np.testing.assert_array_equal(read_file(path), expect)
        f.close()
        del f
        gc.collect()
    assert engine.stats()["stale_completions"] == 0


# --- other misuse ----------------------------------------------------------------------------


def test_bad_open_arguments(engine, tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    for mode in ("a", "rb", "", "x"):
        with pytest.raises(ValueError, match="mode must be"):
            engine.open(path, mode)
    for direct in ("yes", 1, 0.5, None.__class__):
        with pytest.raises(ValueError, match="direct must be"):
            engine.open(path, "w", direct=direct)
    assert not path.exists()


@pytest.mark.parametrize("kwargs,match", [
    ({"backend": "spdk"}, "backend must be"),
    ({"queue_depth": 0}, "queue_depth"),
    ({"queue_depth": 5000}, "queue_depth"),
    ({"num_workers": 0}, "num_workers"),
    ({"num_workers": 1000}, "num_workers"),
    ({"default_timeout_s": -1.0}, "default_timeout_s"),
    ({"default_timeout_s": float("nan")}, "default_timeout_s"),
])
def test_bad_engine_arguments(backend: str, kwargs, match: str) -> None:
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(ValueError, match=match):
        dpmove.Engine(**kwargs)


def test_bad_call_arguments(victim) -> None:
    v = victim(direct=True)
    with pytest.raises(ValueError, match="timeout_s"):
        v.submit("read", [(0, 0, 4096)], timeout_s=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        v.submit("read", [(0, 0, 4096)], timeout_s=float("nan"))
    with pytest.raises(TypeError, match="Region or a writable buffer"):
        v.submit("read", [(0, 0, 4096)], region=12345)
    with pytest.raises(TypeError):
        v.eng.read(None, v.region, [(0, 0, 4096)])
    with pytest.raises(TypeError):
        v.eng.read(str(v.path), v.region, [(0, 0, 4096)])
    v.untouched()
    req = v.submit("read", [(0, 0, 4096)])
    with pytest.raises(ValueError, match="timeout_s"):
        req.wait(-1)
    with pytest.raises(ValueError, match="timeout_s"):
        req.result(timeout_s=-0.5)
    with pytest.raises(ValueError, match="timeout_s"):
        req.wait_quiesced(float("nan"))
    assert_done(req, [4096])


def test_bad_region_arguments(engine) -> None:
    with pytest.raises(ValueError, match="size must be > 0"):
        engine.alloc(0)
    with pytest.raises(ValueError, match="empty"):
        engine.register(bytearray())
    with pytest.raises(TypeError, match="buffer"):
        engine.register(12345)
    r = engine.alloc(10)
    with pytest.raises(ValueError, match="step 1"):
        r[::2]
    with pytest.raises(ValueError, match="does not fit"):
        r.slice(5, 6)
    with pytest.raises(ValueError, match="whole number"):
        r.numpy(np.float64)
    assert len(r[5:100]) == 5 and len(r[20:30]) == 0  # Python slice clamping


def test_objects_of_another_engine(make_engine, backend: str, tmp_path: Path, rng) -> None:
    """Registered slot numbers are per engine: a File or Region registered by engine A is
    refused by engine B (it would name B's file or buffer in that slot); unregistered ones can
    be shared and move the right bytes."""
    ea, eb = make_engine(), make_engine()
    pa, pb = tmp_path / "a.bin", tmp_path / "b.bin"
    da, db = rand_bytes(rng, 8192), rand_bytes(rng, 8192)
    write_file(pa, da)
    write_file(pb, db)
    fa = ea.open(pa, "r", direct=False)
    fb = eb.open(pb, "r", direct=False)  # both take the first slot of their engine
    ra = ea.alloc(8192)
    out = np.full(8192, 0x33, np.uint8)
    assert fa.registered is fb.registered is ra.registered is (backend == "io_uring")
    if backend == "io_uring":
        with pytest.raises(ValueError, match="another Engine"):
            eb.read(fa, out, [(0, 0, 8192)])
        with pytest.raises(ValueError, match="another Engine"):
            eb.read(fb, ra, [(0, 0, 8192)])
        assert (out == 0x33).all() and (ra.numpy() == 0).all()
    else:
        assert_done(eb.read(fa, out, [(0, 0, 8192)]), [8192])
        np.testing.assert_array_equal(out, da)
    fa2 = ea.open(pa, "r", direct=False, register=False)
    ra2 = ea.alloc(8192, register=False)
    assert_done(eb.read(fa2, ra2, [(0, 0, 8192)]), [8192])
    np.testing.assert_array_equal(ra2.numpy(), da)
    assert_done(eb.read(fb, ra2, [(0, 0, 8192)]), [8192])
    np.testing.assert_array_equal(ra2.numpy(), db)
