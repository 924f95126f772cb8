"""Deadlines, cancellation, quiescence, close, and requests whose Python references are gone.

Slow I/O comes from a large O_DIRECT batch at queue depth 1 (tens of microseconds per entry,
seconds in all) and, on io_uring, from a read of an empty FIFO, which io_uring parks in the
kernel until data arrives (the thread pool's pread on a FIFO fails at once with ESPIPE, the
same as os.pread).
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

import dpmove
from conftest import aligned_array, assert_done, finished, rand_bytes, read_file, write_file

SLOTS = 1024
PAGE = 4096
ETIMEDOUT, ECANCELED = -errno.ETIMEDOUT, -errno.ECANCELED
S = dpmove.RequestState


class BigRead:
    """A 4 MiB file and a batch of O_DIRECT 4 KiB reads cycling over it (region slot k always
    receives file slot perm[k], so every finished entry leaves a known result). The batch is
    sized from a timed probe on the same engine so that it would take about `seconds`
    (50 000 to 1 000 000 entries): slow enough that a 10 ms head start never finishes it, on a
    disk as on tmpfs."""

    def __init__(self, eng, directory: Path, rng, alloc_region: bool = True, seconds: float = 2.0) -> None:
        self.path = directory / "big-read.bin"
        self.data = rand_bytes(rng, SLOTS * PAGE)
        write_file(self.path, self.data)
        self.f = eng.open(self.path, "r", direct=True)
        self.perm = rng.permutation(SLOTS)
        self.region = eng.alloc(SLOTS * PAGE) if alloc_region else None
        probe = self.batch(2000)
        t0 = time.monotonic()
        target = self.region if alloc_region else aligned_array(SLOTS * PAGE, PAGE)
        assert_done(eng.read(self.f, target, probe, timeout_s=60), probe[:, 2])
        per_entry = max(time.monotonic() - t0, 1e-6) / 2000
        self.n = int(np.clip(seconds / per_entry, 50_000, 1_000_000))
        self.ent = self.batch(self.n)

    def batch(self, n: int) -> np.ndarray:
        k = np.arange(n) % SLOTS
        return dpmove.entries(self.perm[k] * PAGE, k * PAGE, PAGE)

    def expected_slot(self, k: int) -> np.ndarray:
        return self.data[self.perm[k] * PAGE : (self.perm[k] + 1) * PAGE]

    def check_finished_entries(self, req, buf: np.ndarray) -> None:
        st, nbytes = req.status, req.bytes
        assert (nbytes[st == 0] == PAGE).all()
        assert (nbytes[st != 0] < PAGE).all()
        done_slots = np.unique(np.nonzero(st == 0)[0] % SLOTS)
        for k in done_slots:
            np.testing.assert_array_equal(buf[k * PAGE : (k + 1) * PAGE], self.expected_slot(k))


def assert_stays(buf: np.ndarray, rng, seconds: float = 0.2) -> None:
    """After quiescence nothing may write the buffer: poison it, wait, compare."""
    poison = rand_bytes(rng, buf.size)
    buf[:] = poison
    time.sleep(seconds)
    np.testing.assert_array_equal(buf, poison)


def make_fifo(eng, directory: Path):
    path = directory / "fifo"
    os.mkfifo(path)
    return path, eng.open(path, "r+", direct=False)  # O_RDWR: open does not wait for a writer


def fifo_pread_errno(path: Path) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            os.pread(fd, 1, 0)
        return info.value.errno
    finally:
        os.close(fd)


# --- deadlines -------------------------------------------------------------------------------


@pytest.mark.timeout(120, method="thread")
def test_deadline_expires(make_engine, direct_dir: Path, rng) -> None:
    eng = make_engine(queue_depth=1)
    big = BigRead(eng, direct_dir, rng)
    buf = big.region.numpy()
    buf[:] = rand_bytes(rng, buf.size)
    t0 = time.monotonic()
    req = eng.read(big.f, big.region, big.ent, timeout_s=0.005, timing=True)
    # Still queued, or already swept if this slow host passed the 5 ms deadline meanwhile.
    assert req.status[-1] in (dpmove.ENTRY_PENDING, ETIMEDOUT)
    assert req.op == "read" and len(req) == req.num_entries == big.n
    assert req.file.path == str(big.path) and req.region.nbytes == SLOTS * PAGE
    assert req.wait(60) == S.TIMED_OUT
    assert time.monotonic() - t0 < 2.0, "the deadline, not the end of the batch, must end wait()"
    with pytest.raises(dpmove.TimedOut) as info:
        req.result(timeout_s=10)
    err = info.value
    assert isinstance(err, TimeoutError) and isinstance(err, dpmove.Error)
    assert err.errno == errno.ETIMEDOUT and "missed its deadline" in str(err)
    assert req.wait_quiesced(30) and req.quiesced and req.in_flight == 0
    st = req.status
    assert set(np.unique(st).tolist()) <= {0, ETIMEDOUT, ECANCELED}, np.unique(st)
    never = (st == ETIMEDOUT) & (req.bytes == 0)
    assert never.sum() > big.n // 2  # most entries were never started
    assert eng.stats()["entries_started"] <= 2000 + big.n - never.sum()
    lat = req.latency_ns
    assert (lat[st == 0] > 0).all() and (lat[never] == -1).all()
    big.check_finished_entries(req, buf)
    started = eng.stats()["entries_started"]
    assert_stays(buf, rng)
    assert eng.stats()["entries_started"] == started, "entries started after the request quiesced"
    assert req.state == S.TIMED_OUT and req.duplicate_finishes == 0
    assert "timed_out" in repr(req)
    # The engine goes on serving.
    assert_done(eng.read(big.f, big.region, big.ent[:100]), big.ent[:100, 2])


@pytest.mark.timeout(60, method="thread")
def test_default_deadline_applies_without_waiting(make_engine, direct_dir: Path, rng) -> None:
    eng = make_engine(queue_depth=1, default_timeout_s=0.02)
    big = BigRead(eng, direct_dir, rng)
    now = time.monotonic_ns()
    req = eng.read(big.f, big.region, big.ent)
    assert abs(req.deadline_ns - (now + 20_000_000)) < 500_000_000
    time.sleep(0.3)
    assert req.poll() == S.TIMED_OUT and req.state == S.TIMED_OUT and req.done
    assert req.wait_quiesced(30)
    req2 = eng.read(big.f, big.region, big.ent[:10], timeout_s=None)  # None: the engine default
    assert abs(req2.deadline_ns - (time.monotonic_ns() + 20_000_000)) < 500_000_000
    finished(req2)


def test_no_deadline(make_engine, tmp_path: Path) -> None:
    eng = make_engine(default_timeout_s=None)
    path = tmp_path / "f.bin"
    write_file(path, np.arange(4096, dtype=np.uint8))
    f = eng.open(path, "r", direct=False)
    req = eng.read(f, np.zeros(4096, np.uint8), [(0, 0, 4096)])
    assert req.deadline_ns == 2**63 - 1
    assert_done(req, [4096])
    req = eng.read(f, np.zeros(4096, np.uint8), [(0, 0, 4096)], timeout_s=float("inf"))
    assert req.deadline_ns == 2**63 - 1
    assert_done(req, [4096])


@pytest.mark.timeout(60, method="thread")
def test_zero_timeout(make_engine, direct_dir: Path, rng) -> None:
    eng = make_engine(queue_depth=1)
    big = BigRead(eng, direct_dir, rng)
    req = eng.read(big.f, big.region, big.ent[:2000], timeout_s=0)
    assert req.wait(30) == S.TIMED_OUT
    with pytest.raises(dpmove.TimedOut):
        req.check()
    assert req.wait_quiesced(30)
    assert set(np.unique(req.status).tolist()) <= {0, ETIMEDOUT, ECANCELED}
    assert (req.status == ETIMEDOUT).sum() >= 2000 - eng.queue_depth * eng.num_workers


@pytest.mark.timeout(60, method="thread")
def test_fifo_read_deadline(make_engine, backend: str, tmp_path: Path, rng) -> None:
    eng = make_engine()
    path, f = make_fifo(eng, tmp_path)
    region = eng.alloc(PAGE)
    buf = region.numpy()
    poison = rand_bytes(rng, PAGE)
    buf[:] = poison
    req = eng.read(f, region, [(0, 0, PAGE)], timeout_s=0.2)
    state = req.wait(30)
    assert req.wait_quiesced(30)
    if backend == "threadpool":
        # pread on a FIFO fails at once with ESPIPE, exactly like os.pread.
        ref = fifo_pread_errno(path)
        assert ref == errno.ESPIPE
        assert state == S.FAILED and req.status.tolist() == [-ref]
        with pytest.raises(dpmove.TransferError) as info:
            req.result(timeout_s=1)
        assert info.value.errno == ref
    else:
        # io_uring waits for data in the kernel; at the deadline the read is cancelled there.
        assert state == S.TIMED_OUT
        assert req.status.tolist() == [ECANCELED] and req.bytes.tolist() == [0]
        assert eng.stats()["cancels_sent"] >= 1
        with pytest.raises(dpmove.TimedOut):
            req.result(timeout_s=1)
    np.testing.assert_array_equal(buf, poison)
    if backend == "io_uring":
        # The cancelled read consumed nothing: the next one gets exactly what is written.
        payload = rand_bytes(rng, PAGE)
        wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            assert os.write(wfd, payload.tobytes()) == PAGE
        finally:
            os.close(wfd)
        assert_done(eng.read(f, region, [(0, 0, PAGE)], timeout_s=10), [PAGE])
        np.testing.assert_array_equal(buf, payload)


# --- cancel ----------------------------------------------------------------------------------


@pytest.mark.timeout(120, method="thread")
def test_cancel_big_batch(make_engine, direct_dir: Path, rng) -> None:
    eng = make_engine(queue_depth=1)
    big = BigRead(eng, direct_dir, rng)
    buf = big.region.numpy()
    buf[:] = rand_bytes(rng, buf.size)
    req = eng.read(big.f, big.region, big.ent)
    time.sleep(0.01)
    assert req.cancel() is True
    assert req.state == S.CANCELLED
    assert req.cancel() is False
    with pytest.raises(dpmove.Cancelled) as info:
        req.result(timeout_s=10)
    assert info.value.errno == errno.ECANCELED and "cancelled" in str(info.value)
    assert isinstance(info.value, dpmove.Error)
    assert req.wait_quiesced(30) and req.in_flight == 0
    st = req.status
    assert set(np.unique(st).tolist()) <= {0, ECANCELED}, np.unique(st)
    assert ((st == ECANCELED) & (req.bytes == 0)).sum() > big.n // 2
    big.check_finished_entries(req, buf)
    started = eng.stats()["entries_started"]
    assert_stays(buf, rng)
    assert eng.stats()["entries_started"] == started, "entries started after the request quiesced"
    assert req.state == S.CANCELLED


def test_cancel_after_done_changes_nothing(engine, tmp_path: Path, rng) -> None:
    path = tmp_path / "f.bin"
    data = rand_bytes(rng, 10_000)
    write_file(path, data)
    f = engine.open(path, "r", direct=False)
    out = np.zeros(10_000, np.uint8)
    req = engine.read(f, out, [(0, 0, 10_000)])
    assert_done(req, [10_000])
    assert req.cancel() is False
    assert req.state == S.DONE and req.status.tolist() == [0]
    req.check()
    np.testing.assert_array_equal(out, data)


@pytest.mark.timeout(60, method="thread")
def test_cancel_blocked_fifo_read(make_engine, backend: str, tmp_path: Path, rng) -> None:
    eng = make_engine(default_timeout_s=None)
    path, f = make_fifo(eng, tmp_path)
    region = eng.alloc(PAGE)
    buf = region.numpy()
    poison = rand_bytes(rng, PAGE)
    buf[:] = poison
    req = eng.read(f, region, [(0, 0, PAGE)])
    if backend == "threadpool":
        assert req.wait(30) == S.FAILED and req.status.tolist() == [-errno.ESPIPE]
        assert req.cancel() is False and req.state == S.FAILED
    else:
        assert req.wait(0.3) == S.PENDING  # this wait timed out, not the request
        assert req.status.tolist() == [dpmove.ENTRY_RUNNING] and req.bytes.tolist() == [0]
        assert req.in_flight == 1 and not req.quiesced and not req.done
        assert req.wait_quiesced(0.05) is False
        with pytest.raises(ValueError, match="still pending"):
            req.check()
        with pytest.raises(ValueError, match="still pending"):
            req.result(timeout_s=0.05)
        assert req.cancel() is True
        assert req.state == S.CANCELLED
        assert req.wait_quiesced(10) and req.in_flight == 0
        assert req.status.tolist() == [ECANCELED]
        assert eng.stats()["cancels_sent"] >= 1
        with pytest.raises(dpmove.Cancelled):
            req.result(timeout_s=1)
    np.testing.assert_array_equal(buf, poison)


@pytest.mark.timeout(120, method="thread")
def test_cancel_races(make_engine, direct_dir: Path, rng) -> None:
    """Many small requests, some cancelled at once, some a little later, some left alone:
    every entry ends exactly once, finished reads hold the right bytes."""
    eng = make_engine(queue_depth=8)
    path = direct_dir / "races.bin"
    data = rand_bytes(rng, SLOTS * PAGE)
    write_file(path, data)
    f = eng.open(path, "r", direct=True)
    nreq, per = 120, 32
    region = eng.alloc(nreq * per * PAGE)
    buf = region.numpy()
    reqs = []
    for k in range(nreq):
        fo = rng.integers(0, SLOTS, per) * PAGE
        ro = (k * per + np.arange(per)) * PAGE
        ent = dpmove.entries(fo, ro, PAGE)
        req = eng.read(f, region, ent)
        cancelled = None
        if k % 3 == 0:
            cancelled = req.cancel()
        elif k % 3 == 1 and k % 2:
            time.sleep(0.0005)
            cancelled = req.cancel()
        reqs.append((req, ent, cancelled))
    for req, ent, cancelled in reqs:
        state = finished(req, 30)
        st = req.status
        # Only cancel() ends a request early here: it returned True exactly when it did.
        assert (state == S.CANCELLED) == bool(cancelled), (state, cancelled)
        if state == S.DONE:
            assert (st == 0).all()
        else:
            assert set(np.unique(st).tolist()) <= {0, ECANCELED}
        for (fo, ro, ln), s in zip(ent, st):
            if s == 0:
                np.testing.assert_array_equal(buf[ro : ro + ln], data[fo : fo + ln])
    assert sum(c is True for _, _, c in reqs) >= 5  # the races were exercised
    assert eng.stats()["stale_completions"] == 0


# --- close -----------------------------------------------------------------------------------


@pytest.mark.timeout(60, method="thread")
def test_engine_close_cancels_in_flight(make_engine, backend: str, direct_dir: Path, tmp_path: Path, rng) -> None:
    eng = make_engine(queue_depth=1, default_timeout_s=None)
    big = BigRead(eng, direct_dir, rng)
    buf = big.region.numpy()
    req = eng.read(big.f, big.region, big.ent)
    fifo_req = None
    if backend == "io_uring":
        _, ff = make_fifo(eng, tmp_path)
        fifo_req = eng.read(ff, eng.alloc(PAGE), [(0, 0, PAGE)])
    time.sleep(0.01)
    t0 = time.monotonic()
    eng.close(timeout_s=20)  # a ResourceWarning (stuck I/O) would fail the test
    assert time.monotonic() - t0 < 10
    assert eng.closed
    assert req.state == S.CANCELLED and req.quiesced and req.in_flight == 0
    assert set(np.unique(req.status).tolist()) <= {0, ECANCELED}
    with pytest.raises(dpmove.Cancelled):
        req.result(timeout_s=1)
    big.check_finished_entries(req, buf)
    assert_stays(buf, rng)
    if fifo_req is not None:
        assert fifo_req.state == S.CANCELLED and fifo_req.quiesced
        assert fifo_req.status.tolist() == [ECANCELED]
    with pytest.raises(ValueError, match="Engine is closed"):
        eng.read(big.f, big.region, big.ent[:1])


def test_engine_context_manager(backend: str, tmp_path: Path, rng) -> None:
    path = tmp_path / "cm.bin"
    data = rand_bytes(rng, 8192)
    with dpmove.Engine(backend) as eng:
        assert eng.backend == backend and not eng.closed
        f = eng.open(path, "w+", direct=False)
        assert_done(eng.write(f, data, [(0, 0, 8192)]), [8192])
    assert eng.closed
    np.testing.assert_array_equal(read_file(path), data)
    with pytest.raises(ValueError, match="Engine is closed"):
        eng.alloc(10)


@pytest.mark.timeout(120, method="thread")
def test_close_region_and_file_while_in_flight(make_engine, direct_dir: Path, rng) -> None:
    """Closing the Region and File stops new use only; running I/O finishes on valid memory."""
    eng = make_engine(queue_depth=4)
    n = 4096
    path = direct_dir / "closing.bin"
    data = rand_bytes(rng, n * PAGE)
    write_file(path, data)
    f = eng.open(path, "r", direct=True)
    region = eng.alloc(n * PAGE)
    view = region.numpy()  # keeps the memory reachable from Python after close
    perm = rng.permutation(n)
    ent = dpmove.entries(perm * PAGE, np.arange(n) * PAGE, PAGE)
    req = eng.read(f, region, ent)
    region.close()
    f.close()
    assert_done(req, ent[:, 2])
    np.testing.assert_array_equal(view.reshape(n, PAGE), data.reshape(n, PAGE)[perm])
    with pytest.raises(ValueError, match="is closed"):
        eng.read(f, eng.alloc(PAGE), [(0, 0, PAGE)])
    with pytest.raises(ValueError, match="Region is closed"):
        eng.read(eng.open(path, "r"), region, [(0, 0, PAGE)])


# --- dropped references ----------------------------------------------------------------------


@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("ending", ["complete", "engine_close"])
def test_dropped_request_keeps_buffer_alive(make_engine, backend: str, direct_dir: Path, tmp_path: Path, rng, ending) -> None:
    """With every Python reference to a request in flight (and to its buffer) gone, the buffer
    stays alive until the I/O ends, is then released, and the data lands where it should."""
    eng = make_engine(track=False, queue_depth=1, default_timeout_s=None)
    arr = aligned_array(SLOTS * PAGE, PAGE)
    raw = arr.base
    at = arr.ctypes.data - raw.ctypes.data
    arr[:] = 0
    alive = weakref.ref(arr)
    payload = rand_bytes(rng, PAGE)
    if backend == "io_uring":
        path, f = make_fifo(eng, tmp_path)
        ent = [(0, 0, PAGE)]
    else:
        big = BigRead(eng, direct_dir, rng, alloc_region=False)
        f, ent = big.f, big.ent
    region = eng.register(arr)
    req = eng.read(f, region, ent)
    del region, req, arr
    gc.collect()
    assert alive() is not None, "an in-flight request must keep its buffer alive"
    if ending == "engine_close":
        eng.close(timeout_s=20)
    elif backend == "io_uring":
        wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(wfd, payload.tobytes())
        finally:
            os.close(wfd)
    t_end = time.monotonic() + 30
    while alive() is not None and time.monotonic() < t_end:
        gc.collect()
        time.sleep(0.01)
    assert alive() is None, "the buffer must be released once its I/O ended"
    if ending == "complete":
        got = raw[at : at + SLOTS * PAGE]
        if backend == "io_uring":
            np.testing.assert_array_equal(got[:PAGE], payload)
        else:
            np.testing.assert_array_equal(got.reshape(SLOTS, PAGE), big.data.reshape(SLOTS, PAGE)[big.perm])
    assert eng.stats()["stale_completions"] == 0


@pytest.mark.timeout(120, method="thread")
def test_interpreter_exit_with_io_in_flight(backend: str, direct_dir: Path, tmp_path: Path) -> None:
    """A process that exits with a request in flight (no close) ends cleanly: the atexit hook
    cancels it and no buffer is released under a dying interpreter."""
    script = textwrap.dedent(
        f"""
        import os, numpy as np, dpmove
        eng = dpmove.Engine({backend!r}, queue_depth=1, default_timeout_s=None)
        arr = np.zeros(1 << 22, np.uint8)
        if {backend!r} == "io_uring":
            os.mkfifo({str(tmp_path / 'exit-fifo')!r})
            f = eng.open({str(tmp_path / 'exit-fifo')!r}, "r+", direct=False)
            req = eng.read(f, eng.register(arr), [(0, 0, 4096)])
        else:
            p = {str(direct_dir / 'exit.bin')!r}
            with open(p, "wb") as fh:
                fh.write(os.urandom(1 << 22))
            f = eng.open(p, "r", direct=False)
            n = 200_000
            k = np.arange(n) % 1024
            req = eng.read(f, eng.register(arr), dpmove.entries(k * 4096, k * 4096, 4096))
        assert req.state == dpmove.RequestState.PENDING
        print("submitted", flush=True)
        """
    )
    p = subprocess.run([sys.executable, "-X", "dev", "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "submitted"
    assert p.stderr == ""


@pytest.mark.timeout(60, method="thread")
def test_waiting_releases_the_gil(make_engine, direct_dir: Path, rng) -> None:
    """wait(), wait_quiesced() and result() block without the GIL: another Python thread keeps
    running meanwhile."""
    eng = make_engine(queue_depth=1, default_timeout_s=None)
    big = BigRead(eng, direct_dir, rng)
    req = eng.read(big.f, big.region, big.ent)
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        for call in (lambda: req.wait(0.2), lambda: req.wait_quiesced(0.2)):
            before = ticks[0]
            assert call() in (S.PENDING, False)
            assert ticks[0] - before > 1000, "the other thread did not run while we waited"
        before = ticks[0]
        with pytest.raises(ValueError, match="still pending"):
            req.result(timeout_s=0.2)
        assert ticks[0] - before > 1000
    finally:
        stop.set()
        t.join()
    req.cancel()
    assert req.wait_quiesced(30)


def test_request_context_manager_cancels_and_quiesces(make_engine, direct_dir, rng) -> None:
    """Leaving `with req:` early cancels the request and returns only once nothing runs; a
    request that already ended is left as it was."""
    eng = make_engine(queue_depth=1)
    path = direct_dir / "ctx.bin"
    f = eng.open(path, "w+", direct=True)
    n, bs = 20000, 4096
    f.truncate(n * bs)
    buf = eng.alloc(bs * 8)
    batch = dpmove.entries(np.arange(n) * bs, (np.arange(n) % 8) * bs, bs)
    with eng.read(f, buf, batch, timeout_s=None) as req:
        pass
    assert req.state in (dpmove.RequestState.CANCELLED, dpmove.RequestState.DONE)
    assert req.quiesced and req.in_flight == 0
    if req.state == dpmove.RequestState.CANCELLED:
        assert (req.status == -errno.ECANCELED).any()
        with pytest.raises(dpmove.Cancelled):
            req.check()
    with eng.read(f, buf, batch[:4]) as done:
        done.wait()
    assert done.state == dpmove.RequestState.DONE
