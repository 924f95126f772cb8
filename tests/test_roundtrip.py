"""Round trips of random data, checked against plain os.pread / os.pwrite and numpy.

Writes go dpmove -> file and are read back with os.pread; reads go os.pwrite -> file -> dpmove.
The expected file / buffer is built with numpy from the entries, so bytes outside every entry
must be left exactly as they were.
"""

from __future__ import annotations

import gc
import os
import resource
import threading
import time
from typing import List
from pathlib import Path

import numpy as np
import pytest

import dpmove
from conftest import aligned_array, assert_done, rand_bytes, read_file, write_file

SIZES = [4 << 10, 64 << 10, 1 << 20]
ODD = 12345  # buffered only: O_DIRECT needs aligned lengths
CASES = [pytest.param(s, d, id=f"{s}-{'direct' if d else 'buffered'}") for s in SIZES for d in (True, False)]
CASES.append(pytest.param(ODD, False, id=f"{ODD}-buffered"))
BUFFERS = ["registered", "alloc_unregistered", "engine_unregistered"]


def layout(rng: np.random.Generator, n: int, size: int, align: int, direct: bool):
    """n non-overlapping entries of `size` bytes at permuted slots in the file and the region,
    with gaps between slots (aligned when direct). Returns (entries, file_size, region_size)."""
    gap = align if direct else int(rng.integers(1, 200))
    stride = size + gap
    fbase = 0 if direct else int(rng.integers(0, 4096))
    rbase = 0 if direct else int(rng.integers(0, 4096))
    fo = fbase + rng.permutation(n) * stride
    ro = rbase + rng.permutation(n) * stride
    return dpmove.entries(fo, ro, size), fbase + n * stride, rbase + n * stride


def apply(dst: np.ndarray, src: np.ndarray, ent: np.ndarray, into: str) -> np.ndarray:
    """numpy model of a batch: into='file' copies region bytes to file offsets, 'region' the reverse."""
    out = dst.copy()
    for fo, ro, ln in ent:
        if into == "file":
            out[fo : fo + ln] = src[ro : ro + ln]
        else:
            out[ro : ro + ln] = src[fo : fo + ln]
    return out


@pytest.mark.parametrize("buffers", BUFFERS)
@pytest.mark.parametrize("qd", [1, 16, 64])
@pytest.mark.parametrize("size,direct", CASES)
def test_roundtrip(make_engine, backend, tmp_path: Path, rng, size: int, direct: bool, qd: int, buffers: str) -> None:
    eng = make_engine(queue_depth=qd, register_buffers=buffers != "engine_unregistered")
    assert eng.queue_depth == qd
    n = int(np.clip((4 << 20) // size, 8, 256))
    path = tmp_path / "data.bin"
    f = eng.open(path, "w+", direct=direct)
    assert f.direct is direct, f.direct_reason
    if not direct:
        assert f.mem_align == 1 and f.offset_align == 1
    ent, fsize, rsize = layout(rng, n, size, f.alignment, direct)
    region = eng.alloc(rsize, register=buffers != "alloc_unregistered")
    timing = qd == 16

    # dpmove writes; os.pread is the reference reader.
    background = rand_bytes(rng, fsize)
    write_file(path, background)
    src = region.numpy()
    src[:] = rand_bytes(rng, rsize)
    req = eng.write(f, region, ent, timing=timing)
    assert_done(req, ent[:, 2])
    np.testing.assert_array_equal(read_file(path), apply(background, src, ent, "file"))

    # os.pwrite writes; dpmove reads into a poisoned region.
    fresh = rand_bytes(rng, fsize)
    write_file(path, fresh)
    poison = rand_bytes(rng, rsize)
    src[:] = poison
    req = eng.read(f, region, ent, timing=timing)
    assert_done(req, ent[:, 2])
    np.testing.assert_array_equal(src, apply(poison, fresh, ent, "region"))
    if timing:
        assert (req.latency_ns > 0).all()
    else:
        assert (req.latency_ns == -1).all()

    st = eng.stats()
    assert st["entries_started"] == 2 * n
    assert st["ops_submitted"] >= 2 * n
    assert st["stale_completions"] == 0
    if backend == "io_uring" and buffers == "registered":
        assert region.registered, region.registration_error
        assert st["fixed_buffer_ops"] == st["ops_submitted"]
        assert st["fixed_file_ops"] == st["ops_submitted"]
    else:
        assert not region.registered
        assert st["fixed_buffer_ops"] == 0
    if backend == "threadpool" and buffers == "registered":
        assert "EOPNOTSUPP" in region.registration_error
    if buffers != "registered":
        assert region.registration_error == ""


def direct_round_trip(eng, path: Path, n: int, size: int, rng) -> dpmove.Request:
    """Writes n random `size`-byte entries at permuted offsets over random file contents with
    O_DIRECT, checks the file against a NumPy model, reads them back into a poisoned region and
    checks that too. Returns the write request."""
    f = eng.open(path, "w+", direct=True)
    ent, fsize, rsize = layout(rng, n, size, f.alignment, True)
    region = eng.alloc(rsize)
    src = region.numpy()
    src[:] = rand_bytes(rng, rsize)
    background = rand_bytes(rng, fsize)
    write_file(path, background)
    wreq = eng.write(f, region, ent, timing=True)
    assert_done(wreq, ent[:, 2])
    on_disk = read_file(path)
    np.testing.assert_array_equal(on_disk, apply(background, src, ent, "file"))
    poison = rand_bytes(rng, rsize)
    src[:] = poison
    assert_done(eng.read(f, region, ent), ent[:, 2])
    np.testing.assert_array_equal(src, apply(poison, on_disk, ent, "region"))
    return wreq


def test_batch_larger_than_ring(make_engine, direct_dir: Path, rng) -> None:
    """5000 entries with queue_depth 8: split over the ring, never rejected."""
    eng = make_engine(queue_depth=8)
    direct_round_trip(eng, direct_dir / "big.bin", 5000, 4096, rng)
    assert eng.stats()["entries_started"] == 2 * 5000


@pytest.mark.parametrize("workers", [2, 3])
def test_split_across_workers(make_engine, direct_dir: Path, rng, workers: int) -> None:
    """Batches big enough to be split over several workers (rings / thread groups)."""
    eng = make_engine(num_workers=workers, queue_depth=16)
    assert eng.num_workers == workers
    wreq = direct_round_trip(eng, direct_dir / "split.bin", 3001, 8192, rng)
    assert (wreq.latency_ns > 0).all()


def test_random_layouts(engine, tmp_path: Path, rng) -> None:
    """Buffered I/O with arbitrary offsets and lengths (1 byte to 100 KB), random gaps."""
    path = tmp_path / "rand.bin"
    f = engine.open(path, "w+", direct=False)
    for _ in range(6):
        n = int(rng.integers(1, 200))
        lens = rng.integers(1, 100_000, n)
        fgaps, rgaps = rng.integers(0, 5000, n), rng.integers(0, 5000, n)
        order_f, order_r = rng.permutation(n), rng.permutation(n)
        fo = np.empty(n, np.int64)
        ro = np.empty(n, np.int64)
        fo[order_f] = np.cumsum(fgaps[order_f] + lens[order_f]) - lens[order_f]
        ro[order_r] = np.cumsum(rgaps[order_r] + lens[order_r]) - lens[order_r]
        ent = dpmove.entries(fo, ro, lens)
        fsize, rsize = int((fo + lens).max()) + 100, int((ro + lens).max()) + 100
        region = engine.alloc(rsize, register=bool(rng.integers(0, 2)))
        src = region.numpy()
        src[:] = rand_bytes(rng, rsize)
        background = rand_bytes(rng, fsize)
        write_file(path, background)
        assert_done(engine.write(f, region, ent), lens)
        on_disk = read_file(path)
        np.testing.assert_array_equal(on_disk, apply(background, src, ent, "file"))
        poison = rand_bytes(rng, rsize)
        src[:] = poison
        assert_done(engine.read(f, region, ent), lens)
        np.testing.assert_array_equal(src, apply(poison, on_disk, ent, "region"))
        region.close()


SOURCES = ["numpy_registered", "numpy_plain", "bytearray", "memoryview", "region_slice", "region_numpy_view"]


@pytest.mark.parametrize("kind", SOURCES)
def test_buffer_kinds(engine, tmp_path: Path, rng, kind: str) -> None:
    """Every accepted kind of host memory, buffered, against the os reference."""
    size = 50_000
    path = tmp_path / "kinds.bin"
    f = engine.open(path, "w+", direct=False)
    data = rand_bytes(rng, size)
    if kind == "numpy_registered":
        arr = data.copy()
        target, view = engine.register(arr), arr
    elif kind == "numpy_plain":
        arr = data.copy()
        target, view = arr, arr
    elif kind == "bytearray":
        ba = bytearray(data.tobytes())
        target, view = ba, np.frombuffer(ba, np.uint8)
    elif kind == "memoryview":
        ba = bytearray(data.tobytes())
        target, view = memoryview(ba), np.frombuffer(ba, np.uint8)
    elif kind == "region_slice":
        target = engine.alloc(size + 8192)[4096 : 4096 + size]  # the parent Region is dropped here
        gc.collect()
        view = target.numpy()
        view[:] = data
    else:
        region = engine.alloc(size)
        target, view = region, region.numpy()
        view[:] = data
    ent = [(7, 0, size - 10), (size, size - 10, 10)]  # file: [7, size-3) and [size, size+10)
    assert_done(engine.write(f, target, ent), [size - 10, 10])
    on_disk = read_file(path)
    assert on_disk.size == size + 10
    np.testing.assert_array_equal(on_disk[:7], 0)
    np.testing.assert_array_equal(on_disk[7 : size - 3], data[: size - 10])
    np.testing.assert_array_equal(on_disk[size:], data[size - 10 :])

    fresh = rand_bytes(rng, size + 10)
    write_file(path, fresh)
    assert_done(engine.read(f, target, ent), [size - 10, 10])
    np.testing.assert_array_equal(view[: size - 10], fresh[7 : size - 3])
    np.testing.assert_array_equal(view[size - 10 :], fresh[size:])


@pytest.mark.parametrize("kind", ["readonly_numpy", "bytes", "readonly_registered"])
def test_readonly_sources_can_be_written(engine, tmp_path: Path, rng, kind: str) -> None:
    data = rand_bytes(rng, 30_000)
    path = tmp_path / "ro.bin"
    f = engine.open(path, "w", direct=False)
    if kind == "bytes":
        src = data.tobytes()
    else:
        src = data.copy()
        src.flags.writeable = False
        if kind == "readonly_registered":
            src = engine.register(src)
            assert not src.writable
    assert_done(engine.write(f, src, [(0, 0, data.size)]), [data.size])
    np.testing.assert_array_equal(read_file(path), data)


def test_registered_numpy_direct(engine, backend: str, direct_dir: Path, rng) -> None:
    """A caller-owned, aligned numpy array registered once and used with O_DIRECT."""
    path = direct_dir / "np.bin"
    f = engine.open(path, "w+", direct=True)
    arr = aligned_array(1 << 20, 4096)
    assert arr.ctypes.data % f.mem_align == 0
    arr[:] = rand_bytes(rng, arr.size)
    region = engine.register(arr)
    ent = dpmove.entries(rng.permutation(16) * 65536, np.arange(16) * 65536, 65536)
    assert_done(engine.write(f, region, ent), ent[:, 2])
    np.testing.assert_array_equal(read_file(path), apply(np.zeros(1 << 20, np.uint8), arr, ent, "file"))
    expect = arr.copy()
    arr[:] = 0
    assert_done(engine.read(f, region, ent), ent[:, 2])
    np.testing.assert_array_equal(arr, expect)
    st = engine.stats()
    if backend == "io_uring":
        assert region.registered, region.registration_error
        assert st["fixed_buffer_ops"] == st["ops_submitted"] > 0
    else:
        assert st["fixed_buffer_ops"] == 0


def test_many_requests_in_flight(make_engine, direct_dir: Path, rng) -> None:
    """Many concurrent reads and writes on two files; completions must match their entries."""
    eng = make_engine(queue_depth=16)
    size, per = 4096, 64
    paths = [direct_dir / "a.bin", direct_dir / "b.bin"]
    files = [eng.open(p, "w+", direct=True) for p in paths]
    nreq = 40
    total = nreq * per * size
    originals = [rand_bytes(rng, total) for _ in paths]
    for p, d in zip(paths, originals):
        write_file(p, d)
    region = eng.alloc(2 * total)
    buf = region.numpy()
    buf[:] = rand_bytes(rng, buf.size)
    src = buf.copy()
    reqs = []
    for k in range(nreq):
        which, op = k % 2, ("read", "write")[(k // 2) % 2]
        base = k * per * size
        fo = base + rng.permutation(per) * size
        ro = which * total + base + np.arange(per) * size
        ent = dpmove.entries(fo, ro, size)
        reqs.append((getattr(eng, op)(files[which], region, ent), op, which, ent))
    for req, op, which, ent in reqs:
        assert_done(req, ent[:, 2])
    files_now = [read_file(p) for p in paths]
    for req, op, which, ent in reqs:
        for fo, ro, ln in ent:
            if op == "write":
                np.testing.assert_array_equal(files_now[which][fo : fo + ln], src[ro : ro + ln])
            else:
                np.testing.assert_array_equal(buf[ro : ro + ln], originals[which][fo : fo + ln])


ENTRY_FORMS = ["list_of_tuples", "single_row", "uint32", "big_endian_int64", "fortran_order", "entries_helper_broadcast"]


@pytest.mark.parametrize("form", ENTRY_FORMS)
def test_entry_forms(engine, tmp_path: Path, rng, form: str) -> None:
    """Every accepted spelling of a batch moves the same bytes as the int64 (N, 3) array."""
    path = tmp_path / "forms.bin"
    data = rand_bytes(rng, 1 << 16)
    write_file(path, data)
    f = engine.open(path, "r", direct=False)
    fo = rng.permutation(16)[:4] * 4096 + 3
    canon = dpmove.entries(fo, np.arange(4) * 1000, 1000)
    if form == "list_of_tuples":
        batch = [tuple(int(v) for v in row) for row in canon]
    elif form == "single_row":
        canon = canon[:1]
        batch = np.array(canon[0])
        assert batch.shape == (3,)
    elif form == "uint32":
        batch = canon.astype(np.uint32)
    elif form == "big_endian_int64":
        batch = canon.astype(">i8")
    elif form == "fortran_order":
        batch = np.asfortranarray(canon)
        assert not batch.flags.c_contiguous
    else:
        batch = dpmove.entries(fo, np.arange(4) * 1000, np.int16(1000))  # scalar broadcasts
    np.testing.assert_array_equal(dpmove.as_entries(batch), canon)
    out = np.zeros(4000, np.uint8)
    assert_done(engine.read(f, out, batch), canon[:, 2])
    expect = np.zeros(4000, np.uint8)
    for o, r, ln in canon:
        expect[r : r + ln] = data[o : o + ln]
    np.testing.assert_array_equal(out, expect)


def test_file_api_matches_os(engine, tmp_path: Path, rng) -> None:
    path = tmp_path / "api.bin"
    f = engine.open(path, "w+", direct=False)
    assert f.readable and f.writable and not f.closed
    assert f.size() == 0 == os.stat(path).st_size
    f.truncate(123_457)
    assert f.size() == 123_457 == os.stat(path).st_size
    f.allocate(0, 1 << 20)
    assert f.size() == 1 << 20 == os.stat(path).st_size
    assert os.stat(path).st_blocks * 512 >= 1 << 20
    data = rand_bytes(rng, 5000)
    assert_done(engine.write(f, data, [(1000, 0, 5000)]), [5000])
    f.sync()
    f.sync(data_only=False)
    np.testing.assert_array_equal(read_file(path)[1000:6000], data)
    f.truncate(3000)
    assert f.size() == 3000 == os.stat(path).st_size
    np.testing.assert_array_equal(read_file(path)[1000:], data[:2000])
    f.close()
    assert f.closed


def test_region_properties(engine, backend: str) -> None:
    r = engine.alloc(10_000)
    assert len(r) == r.nbytes == 10_000
    assert r.address % 4096 == 0
    assert r.writable and not r.closed and r.kind == "anonymous"
    assert (r.numpy() == 0).all()  # zeroed
    assert r.registered is (backend == "io_uring")
    s = r[100:300]
    assert len(s) == 200 and s.address == r.address + 100
    s.numpy()[:] = 7
    assert (r.numpy()[100:300] == 7).all() and r.numpy()[99] == 0 and r.numpy()[300] == 0
    f32 = r[:8000].numpy(np.float32)
    assert f32.dtype == np.float32 and f32.size == 2000
    mv = memoryview(r)
    assert mv.nbytes == 10_000 and not mv.readonly
    mv.release()
    r.close()
    assert r.closed and s.closed
    v = engine.alloc(100).numpy()  # the view keeps the region (and its memory) alive
    gc.collect()
    v[:] = 1
    assert (v == 1).all()


def test_registration_slots_run_out(engine, backend: str, tmp_path: Path, rng) -> None:
    """Registration is an optimisation: past the 1024 fixed-buffer slots a region works
    unregistered and says why; slots come back when regions are gone."""
    path = tmp_path / "slots.bin"
    data = rand_bytes(rng, 4096)
    write_file(path, data)
    f = engine.open(path, "r", direct=False)
    regions = [engine.alloc(4096) for _ in range(1030)]
    registered = [r.registered for r in regions]
    if backend == "io_uring":
        assert registered == [True] * 1024 + [False] * 6
        assert "ENOSPC" in regions[-1].registration_error
    else:
        assert not any(registered)
        assert all("EOPNOTSUPP" in r.registration_error for r in regions)
    for r in (regions[0], regions[-1]):
        before = engine.stats()["fixed_buffer_ops"]
        assert_done(engine.read(f, r, [(0, 0, 4096)]), [4096])
        np.testing.assert_array_equal(r.numpy(), data)
        assert engine.stats()["fixed_buffer_ops"] - before == int(r.registered)
    del regions[:10], r
    gc.collect()
    assert engine.alloc(4096).registered is (backend == "io_uring")


def test_file_slots_run_out(engine, backend: str, tmp_path: Path, rng) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1200
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        path = tmp_path / "many.bin"
        data = rand_bytes(rng, 8192)
        write_file(path, data)
        files = [engine.open(path, "r", direct=False) for _ in range(1030)]
        reg = [f.registered for f in files]
        assert reg == ([True] * 1024 + [False] * 6 if backend == "io_uring" else [False] * 1030)
        for f in (files[0], files[-1]):
            out = np.zeros(8192, np.uint8)
            before = engine.stats()["fixed_file_ops"]
            assert_done(engine.read(f, out, [(0, 0, 8192)]), [8192])
            np.testing.assert_array_equal(out, data)
            assert engine.stats()["fixed_file_ops"] - before == int(f.registered)
        del files, f
        gc.collect()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("how", ["open_register_false", "engine_register_files_false"])
def test_unregistered_file(make_engine, backend: str, direct_dir: Path, rng, how: str) -> None:
    eng = make_engine(register_files=how != "engine_register_files_false")
    path = direct_dir / "unreg.bin"
    data = rand_bytes(rng, 1 << 20)
    write_file(path, data)
    f = eng.open(path, "r", direct=True, register=how != "open_register_false")
    assert not f.registered
    region = eng.alloc(1 << 20)
    ent = dpmove.entries(rng.permutation(16) * 65536, np.arange(16) * 65536, 65536)
    assert_done(eng.read(f, region, ent), ent[:, 2])
    np.testing.assert_array_equal(region.numpy(), apply(np.zeros(1 << 20, np.uint8), data, ent, "region"))
    st = eng.stats()
    assert st["fixed_file_ops"] == 0
    assert st["fixed_buffer_ops"] == (st["ops_submitted"] if backend == "io_uring" else 0)


def test_hugepages(engine, tmp_path: Path, rng) -> None:
    """alloc(hugepages=True) works where 2 MiB pages are reserved, else raises dpmove.Error
    (ENOMEM) saying how to reserve them."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    free = int(meminfo.get("HugePages_Free", "0").split()[0])
    if free * 2 < 4:
        with pytest.raises(dpmove.Error, match="nr_hugepages") as info:
            engine.alloc(4 << 20, hugepages=True)
        assert info.value.errno == 12  # ENOMEM
        return
    region = engine.alloc(4 << 20, hugepages=True)
    assert region.kind == "hugetlb"
    path = tmp_path / "huge.bin"
    f = engine.open(path, "w+", direct=False)
    src = region.numpy()
    src[:] = rand_bytes(rng, src.size)
    assert_done(engine.write(f, region, [(0, 0, src.size)]), [src.size])
    np.testing.assert_array_equal(read_file(path), src)


@pytest.mark.timeout(120)
def test_concurrent_small_submits_never_strand(make_engine, tmp_path: Path, rng) -> None:
    """Many threads submitting single-entry requests back to back while the workers go idle and
    wake again: every request must end DONE with the right bytes (a submission the worker
    missed would end TIMED_OUT at its 20 s deadline instead)."""

    eng = make_engine(track=False, num_workers=2, queue_depth=4, default_timeout_s=20.0)
    data = rand_bytes(rng, 1 << 20)
    path = tmp_path / "small.bin"
    write_file(path, data)
    f = eng.open(path, "r", direct=False)
    nthreads, per = 4, 400
    failures: List[str] = []

    def worker(t: int) -> None:
        local = np.random.default_rng(t)
        out = np.zeros(4096, dtype=np.uint8)
        for k in range(per):
            off = int(local.integers(0, (1 << 20) - 4096))
            req = eng.read(f, out, [(off, 0, 4096)])
            if k % 7 == 0:
                time.sleep(0.0005)  # let the worker fall asleep now and then
            if req.wait(30) != dpmove.RequestState.DONE or not (out == data[off : off + 4096]).all():
                failures.append(f"thread {t} request {k}: {req.state} status {req.status}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures[:5]
    assert eng.stats()["entries_started"] == nthreads * per
