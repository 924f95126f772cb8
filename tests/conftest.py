"""Shared fixtures for the dpmove test suite.

Every I/O test runs on both backends through the `backend` fixture. Engines come from
`make_engine` / `engine`, which record every request they submit; at teardown each engine is
closed and must have reported no stale completion, and every recorded request must be
quiesced with no duplicate finish. Random data comes from `rng`, seeded per test from one
run seed printed in the report header (rerun with DPMOVE_TEST_SEED=<seed> to reproduce).

Mount helpers (tmpfs, ramfs, ext4 on a loop device) need root; tests that use them are
marked `root` and skipped with that reason when not run as root.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import numpy as np
import pytest

import dpmove

BACKENDS = ["io_uring", "threadpool"]
RUN_SEED = int(os.environ.get("DPMOVE_TEST_SEED") or secrets.randbits(32))


@functools.lru_cache(maxsize=None)
def uring_status() -> tuple:
    u = dpmove.info()["backends"]["io_uring"]
    return u["usable"] == "yes", u.get("reason", "")


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_report_header(config: pytest.Config) -> List[str]:
    usable, why = uring_status()
    return [
        f"dpmove {dpmove.__version__}: io_uring usable={usable} ({why}); root={is_root()}",
        f"random data: DPMOVE_TEST_SEED={RUN_SEED}",
    ]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and not is_root():
        pytest.skip("needs root: mounts a tmpfs/ramfs or sets up a loop device")
    if item.get_closest_marker("uring"):
        usable, why = uring_status()
        if not usable:
            pytest.skip(f"io_uring is not usable on this host: {why}")


# --- random data -----------------------------------------------------------------------------


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    seed = (RUN_SEED ^ zlib.crc32(request.node.nodeid.encode())) & 0xFFFFFFFF
    print(f"rng seed {seed} (DPMOVE_TEST_SEED={RUN_SEED}, test {request.node.nodeid})")
    return np.random.default_rng(seed)


def rand_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=np.uint8)


# --- engines ---------------------------------------------------------------------------------


class TrackedEngine(dpmove.Engine):
    """dpmove.Engine that keeps every request it submitted (for the teardown checks)."""

    def __init__(self, *args: Any, track: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: Optional[list] = [] if track else None

    def read(self, *args: Any, **kwargs: Any) -> dpmove.Request:
        req = super().read(*args, **kwargs)
        if self.requests is not None:
            self.requests.append(req)
        return req

    def write(self, *args: Any, **kwargs: Any) -> dpmove.Request:
        req = super().write(*args, **kwargs)
        if self.requests is not None:
            self.requests.append(req)
        return req

    def copy(self, *args: Any, **kwargs: Any) -> dpmove.Request:
        req = super().copy(*args, **kwargs)
        if self.requests is not None:
            self.requests.append(req)
        return req


def close_and_check(made: "List[TrackedEngine]") -> None:
    """Closes every engine (a ResourceWarning - I/O or copies still running - fails the test)
    and checks that each request it made ended: quiesced, terminal, no duplicate finish, no
    entry left pending or running. Raises the first failure after closing them all."""
    errors = []
    for eng in made:
        try:
            eng.close(timeout_s=30)
            st = eng.stats()
            assert st["stale_completions"] == 0, st
            for req in eng.requests or []:
                assert req.wait_quiesced(30), f"{req} not quiesced after engine close"
                assert req.state != dpmove.RequestState.PENDING
                assert req.duplicate_finishes == 0, req
                status = req.status
                assert not np.isin(status, [dpmove.ENTRY_PENDING, dpmove.ENTRY_RUNNING]).any(), (req, status)
        except Exception as exc:  # keep closing the others; report the first failure
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "io_uring":
        usable, why = uring_status()
        if not usable:
            pytest.skip(f"io_uring is not usable on this host: {why}")
    return request.param


@pytest.fixture
def make_engine(backend: str) -> Iterator[Callable[..., TrackedEngine]]:
    """Factory: make_engine(track=True, **Engine options) on the test's backend."""
    made: List[TrackedEngine] = []

    def make(track: bool = True, **kwargs: Any) -> TrackedEngine:
        eng = TrackedEngine(backend, track=track, **kwargs)
        assert eng.backend == backend, eng.backend_reason
        made.append(eng)
        return eng

    yield make
    close_and_check(made)


@pytest.fixture
def engine(make_engine: Callable[..., TrackedEngine]) -> TrackedEngine:
    return make_engine()


# --- requests --------------------------------------------------------------------------------


def finished(req: dpmove.Request, timeout_s: float = 60.0) -> dpmove.RequestState:
    """Waits (bounded) until the request is terminal and quiesced; returns its state."""
    state = req.wait(timeout_s)
    assert state != dpmove.RequestState.PENDING, f"{req} still pending after {timeout_s} s"
    assert req.wait_quiesced(timeout_s), f"{req} not quiesced after {timeout_s} s"
    assert req.duplicate_finishes == 0
    return state


def assert_done(req: dpmove.Request, lengths: Any, timeout_s: float = 60.0) -> None:
    lengths = np.asarray(lengths, dtype=np.int64)
    assert req.result(timeout_s=timeout_s) == int(lengths.sum())
    assert finished(req) == dpmove.RequestState.DONE
    assert (req.status == 0).all(), req.status
    np.testing.assert_array_equal(req.bytes, lengths)


# --- files -----------------------------------------------------------------------------------


def write_file(path: Path, data: np.ndarray) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
    finally:
        os.close(fd)


def read_file(path: Path) -> np.ndarray:
    """The whole file through plain os.pread (the reference reader)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out = bytearray()
        while len(out) < size:
            chunk = os.pread(fd, size - len(out), len(out))
            if not chunk:
                break
            out += chunk
    finally:
        os.close(fd)
    return np.frombuffer(bytes(out), dtype=np.uint8)


def aligned_array(nbytes: int, align: int = 4096) -> np.ndarray:
    """A writable numpy uint8 array of nbytes whose data address is a multiple of align."""
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    skip = (-raw.ctypes.data) % align
    out = raw[skip : skip + nbytes]
    assert out.ctypes.data % align == 0 and out.flags.c_contiguous
    return out


def direct_pread(path: Path, nbytes: int, offset: int, init: np.ndarray) -> np.ndarray:
    """Reference O_DIRECT read: os.preadv on an O_DIRECT descriptor into page-aligned memory
    that first holds `init` (nbytes). Returns what the kernel left in that memory."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    m = mmap.mmap(-1, max(nbytes, 1))
    try:
        buf = np.frombuffer(m, dtype=np.uint8)[:nbytes]
        buf[:] = init
        os.preadv(fd, [memoryview(m)[:nbytes]], offset)
        out = buf.copy()
        del buf
        return out
    finally:
        m.close()
        os.close(fd)


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    """tmp_path, provided O_DIRECT works there."""
    probe = dpmove._core.probe_direct(str(tmp_path))
    if probe.get("direct") != "yes":
        pytest.skip(f"O_DIRECT not available under {tmp_path}: {probe.get('reason')}")
    return tmp_path


# --- mounts (root) ---------------------------------------------------------------------------


def run(cmd: List[str]) -> str:
    exe = shutil.which(cmd[0])
    assert exe, f"{cmd[0]} not found: install it (see the test requirements)"
    p = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}"
    return p.stdout


@contextlib.contextmanager
def mounted(fstype: str, options: str = "", source: Optional[str] = None) -> Iterator[Path]:
    """Mounts `fstype` on a fresh temporary directory; unmounts and removes it afterwards."""
    where = Path(tempfile.mkdtemp(prefix=f"dpmove-{fstype}-"))
    cmd = ["mount", "-t", fstype]
    if options:
        cmd += ["-o", options]
    cmd += [source or fstype, str(where)]
    try:
        run(cmd)
    except BaseException:
        where.rmdir()
        raise
    clean_exit = False
    try:
        yield where
        clean_exit = True
    finally:
        # A file the kernel is still releasing (e.g. a ring's fixed-file slot) can make the
        # first attempts fail with EBUSY; after that, unmount lazily rather than leak it.
        for _ in range(20):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
                busy = False
                break
            time.sleep(0.1)
        else:
            busy = True
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        where.rmdir()
        if clean_exit and busy:
            raise AssertionError(f"{fstype} on {where} stayed busy: a descriptor was not released")


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    dev = run(["losetup", "-f", "--show", str(backing)]).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@contextlib.contextmanager
def ext4_on_loop(workdir: Path, size_mib: int = 64) -> Iterator[tuple]:
    """A fresh ext4 filesystem on a loop device backed by a sparse file in `workdir`.
    Yields (mountpoint, device); unmounts and detaches afterwards."""
    img = workdir / "ext4.img"
    with open(img, "wb") as fh:
        fh.truncate(size_mib << 20)
    run(["mkfs.ext4", "-q", "-F", str(img)])
    try:
        with loop_device(img) as dev, mounted("ext4", source=dev) as where:
            yield where, dev
    finally:
        img.unlink()


def fill_filesystem(directory: Path) -> None:
    """Writes a filler file until the filesystem has no free block left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    chunk = b"\xff" * 4096
    try:
        while True:
            os.write(fd, chunk)  # the last one may be short; the one after raises
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
