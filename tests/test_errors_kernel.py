"""Errors from the kernel, reported per entry, and the fallback when io_uring is refused.

- ENOSPC: a 1 MiB tmpfs, filled up; entries that overwrite existing blocks succeed, entries
  that need new blocks fail with -ENOSPC.
- Block-device write errors: a loop device whose backing file sits on a full tmpfs; entries
  over backed ranges succeed, the others fail with the errno os.pwrite gets there (ENOSPC on
  Linux >= 6.x, whose loop driver passes the backing file's error through; EIO on older ones).
- EIO: ext4 on a loop device, shut down with EXT4_IOC_SHUTDOWN: every read and write fails
  with EIO. Per-entry EIO on read: a loop device backed by a file on that shut-down ext4;
  entries whose pages are cached succeed, the others fail with -EIO.
- seccomp: a subprocess whose filter makes io_uring_setup fail must fall back to the thread
  pool, say why, and still move data.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import mmap
import os
import platform
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import dpmove
from conftest import (
    ext4_on_loop,
    fill_filesystem,
    finished,
    loop_device,
    mounted,
    rand_bytes,
    read_file,
    write_file,
)

KIB = 1024
CHUNK = 64 * KIB
S = dpmove.RequestState

# _IOR('X', 125, __u32); flag 2 = EXT4_GOING_FLAGS_NOLOGFLUSH
EXT4_IOC_SHUTDOWN = (2 << 30) | (4 << 16) | (ord("X") << 8) | 125
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def shutdown_ext4(mountpoint: Path) -> None:
    fd = os.open(mountpoint, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


def os_errno(call) -> int:
    try:
        call()
    except OSError as e:
        return e.errno
    return 0


def mixed_layout(rng, n_ok: int, n_bad: int, ok_base: int, bad_base: int):
    """Entries of CHUNK bytes: n_ok at ok_base + k*CHUNK, n_bad at bad_base + k*CHUNK, in a
    random order, each to its own region slot. Returns (entries, is_ok mask)."""
    fo = np.concatenate([ok_base + np.arange(n_ok) * CHUNK, bad_base + np.arange(n_bad) * CHUNK])
    ok = np.concatenate([np.ones(n_ok, bool), np.zeros(n_bad, bool)])
    order = rng.permutation(n_ok + n_bad)
    fo, ok = fo[order], ok[order]
    ro = rng.permutation(n_ok + n_bad) * CHUNK
    return dpmove.entries(fo, ro, CHUNK), ok


def check_mixed(req, ok: np.ndarray, err: int, path) -> None:
    assert finished(req) == S.FAILED
    st, nbytes = req.status, req.bytes
    np.testing.assert_array_equal(st, np.where(ok, 0, -err))
    np.testing.assert_array_equal(nbytes, np.where(ok, CHUNK, 0))
    with pytest.raises(dpmove.TransferError) as info:
        req.result(timeout_s=10)
    e = info.value
    assert e.errno == err and e.filename == str(path)
    assert errno.errorcode[err] in str(e) and f"{(~ok).sum()} of {ok.size} entries failed" in str(e)


# --- ENOSPC ----------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("direct", [True, False])
def test_enospc_per_entry(make_engine, rng, direct: bool) -> None:
    eng = make_engine(track=False)
    with mounted("tmpfs", "size=1m") as where:
        if direct and dpmove._core.probe_direct(str(where)).get("direct") != "yes":
            pytest.skip("tmpfs refuses O_DIRECT on this kernel (it accepts it since Linux 6.6)")
        path = where / "f.bin"
        half = 512 * KIB
        old = rand_bytes(rng, half)
        write_file(path, old)
        fill_filesystem(where)
        fd = os.open(path, os.O_RDWR)
        try:
            ref = os_errno(lambda: os.pwrite(fd, b"\0" * CHUNK, half))
        finally:
            os.close(fd)
        assert ref == errno.ENOSPC

        f = eng.open(path, "r+", direct=direct)
        assert f.direct is direct  # tmpfs accepts O_DIRECT (Linux >= 6.6)
        ent, ok = mixed_layout(rng, 8, 8, 0, half)
        region = eng.alloc(16 * CHUNK)
        src = region.numpy()
        src[:] = rand_bytes(rng, src.size)
        req = eng.write(f, region, ent)
        check_mixed(req, ok, errno.ENOSPC, path)
        assert req.duplicate_finishes == 0

        expect = old.copy()
        for (fo, ro, ln), good in zip(ent, ok):
            if good:
                expect[fo : fo + ln] = src[ro : ro + ln]
        np.testing.assert_array_equal(read_file(path), expect)  # nothing written past 512 KiB

        # An entry that straddles the end of the allocated blocks: a short write, then ENOSPC
        # for the rest - exactly what os.pwrite does.
        straddle = src[: 2 * CHUNK]
        fd = os.open(path, os.O_RDWR)
        try:
            ref_bytes = os.pwrite(fd, straddle.tobytes(), half - CHUNK)
            ref_err = os_errno(lambda: os.pwrite(fd, straddle[ref_bytes:].tobytes(), half - CHUNK + ref_bytes))
            os.pwrite(fd, expect[half - CHUNK :].tobytes(), half - CHUNK)  # undo
        finally:
            os.close(fd)
        assert (ref_bytes, ref_err) == (CHUNK, errno.ENOSPC)
        np.testing.assert_array_equal(read_file(path), expect)
        req = eng.write(f, region, [(half - CHUNK, 0, 2 * CHUNK)])
        assert finished(req) == S.FAILED
        assert req.status.tolist() == [-ref_err] and req.bytes.tolist() == [ref_bytes]
        expect[half - CHUNK :] = straddle[:CHUNK]
        np.testing.assert_array_equal(read_file(path), expect)
        del req, f, region, src
        gc.collect()
    assert eng.stats()["stale_completions"] == 0


@pytest.mark.root
@pytest.mark.timeout(120, method="thread")
def test_block_device_write_errors_per_entry(make_engine, rng) -> None:
    eng = make_engine(track=False)
    with mounted("tmpfs", "size=1m") as where:
        backing = where / "disk.img"
        backed = 512 * KIB
        write_file(backing, rand_bytes(rng, backed))
        os.truncate(backing, 8 << 20)  # the rest is a hole: writing there needs new tmpfs pages
        fill_filesystem(where)
        with loop_device(backing) as dev:
            fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
            m = mmap.mmap(-1, CHUNK)
            try:
                ref = os_errno(lambda: os.pwritev(fd, [m], 2 << 20))
            finally:
                m.close()
                os.close(fd)
            assert ref in (errno.ENOSPC, errno.EIO), errno.errorcode.get(ref, ref)

            f = eng.open(dev, "r+", direct=True)
            assert f.direct
            ent, ok = mixed_layout(rng, 8, 8, 0, 1 << 20)
            region = eng.alloc(16 * CHUNK)
            src = region.numpy()
            src[:] = rand_bytes(rng, src.size)
            req = eng.write(f, region, ent)
            check_mixed(req, ok, ref, dev)

            fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
            m = mmap.mmap(-1, backed)
            try:
                assert os.preadv(fd, [m], 0) == backed
                on_dev = np.frombuffer(m, np.uint8).copy()
            finally:
                m.close()
                os.close(fd)
            for (fo, ro, ln), good in zip(ent, ok):
                if good:
                    np.testing.assert_array_equal(on_dev[fo : fo + ln], src[ro : ro + ln])
            del req, f, region, src
            gc.collect()
    assert eng.stats()["stale_completions"] == 0


# --- EIO -------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("direct", [True, False])
def test_eio_after_filesystem_shutdown(make_engine, tmp_path: Path, rng, direct: bool) -> None:
    eng = make_engine(track=False)
    with ext4_on_loop(tmp_path) as (mnt, _dev):
        path = mnt / "f.bin"
        data = rand_bytes(rng, 16 * CHUNK)
        write_file(path, data)
        os.sync()
        f = eng.open(path, "r+", direct=direct)
        assert f.direct is direct
        ref_fd = os.open(path, os.O_RDWR)
        region = eng.alloc(16 * CHUNK)
        buf = region.numpy()
        poison = rand_bytes(rng, buf.size)
        buf[:] = poison
        ent = dpmove.entries(rng.permutation(16) * CHUNK, rng.permutation(16) * CHUNK, CHUNK)

        shutdown_ext4(mnt)
        try:
            assert os_errno(lambda: os.pread(ref_fd, CHUNK, 0)) == errno.EIO
            assert os_errno(lambda: os.pwrite(ref_fd, b"x" * CHUNK, 0)) == errno.EIO
        finally:
            os.close(ref_fd)

        for op in ("write", "read"):
            req = getattr(eng, op)(f, region, ent)
            assert finished(req) == S.FAILED
            assert req.status.tolist() == [-errno.EIO] * 16
            assert req.bytes.tolist() == [0] * 16
            with pytest.raises(dpmove.TransferError) as info:
                req.result(timeout_s=10)
            assert info.value.errno == errno.EIO and info.value.filename == str(path)
            assert "EIO" in str(info.value) and "16 of 16 entries failed" in str(info.value)
            assert req.duplicate_finishes == 0
        np.testing.assert_array_equal(buf, poison)  # a failed read leaves the buffer alone

        assert os_errno(lambda: os.open(path, os.O_RDONLY)) == errno.EIO
        with pytest.raises(dpmove.Error) as info:
            eng.open(path, "r")
        assert info.value.errno == errno.EIO and info.value.filename == str(path)
        del req, f, region, buf
        gc.collect()
    assert eng.stats()["stale_completions"] == 0


@pytest.mark.root
@pytest.mark.timeout(120, method="thread")
def test_eio_per_entry_on_read(make_engine, tmp_path: Path, rng) -> None:
    """A loop device backed by a file on a shut-down ext4: cached pages still read, the others
    fail with EIO, entry by entry."""
    eng = make_engine(track=False)
    with ext4_on_loop(tmp_path) as (mnt, _dev):
        inner = mnt / "inner.img"
        write_file(inner, rand_bytes(rng, 32 * CHUNK))
        os.sync()
        with loop_device(inner) as dev:
            # The block device's page cache is dropped at its last close: keep `fd` open.
            fd = os.open(dev, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what we read
                cached = rng.permutation(16)[:7]
                ref = {int(k): np.frombuffer(os.pread(fd, CHUNK, int(k) * 2 * CHUNK), np.uint8) for k in cached}
                shutdown_ext4(mnt)
                uncached = sorted(set(range(16)) - set(ref))
                assert os_errno(lambda: os.pread(fd, CHUNK, uncached[0] * 2 * CHUNK)) == errno.EIO

                f = eng.open(dev, "r", direct=False)
                slots = rng.permutation(16)
                ent = dpmove.entries(slots * 2 * CHUNK, np.arange(16) * CHUNK, CHUNK)
                ok = np.isin(slots, cached)
                region = eng.alloc(16 * CHUNK)
                buf = region.numpy()
                poison = rand_bytes(rng, buf.size)
                buf[:] = poison
                req = eng.read(f, region, ent)
                check_mixed(req, ok, errno.EIO, dev)
                for i, k in enumerate(slots):
                    got = buf[i * CHUNK : (i + 1) * CHUNK]
                    want = ref[int(k)] if ok[i] else poison[i * CHUNK : (i + 1) * CHUNK]
                    np.testing.assert_array_equal(got, want)
                del req, f, region, buf
                gc.collect()
            finally:
                os.close(fd)
    assert eng.stats()["stale_completions"] == 0


# --- seccomp ---------------------------------------------------------------------------------

# (AUDIT_ARCH_*, __NR_io_uring_setup) per machine; 425 on every architecture with io_uring.
SECCOMP_ARCH = {"x86_64": (0xC000003E, 425), "aarch64": (0xC00000B7, 425)}

SECCOMP_CHILD = textwrap.dedent(
    r"""
    import ctypes, errno, json, os, struct, sys
    audit_arch, nr, err, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    # seccomp BPF, by hand: struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}.
    LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
    RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
    prog = [
        (LD_W_ABS, 0, 0, 4),            # A = seccomp_data.arch
        (JEQ_K, 1, 0, audit_arch),      # native ABI? check the number : allow
        (RET_K, 0, 0, RET_ALLOW),
        (LD_W_ABS, 0, 0, 0),            # A = seccomp_data.nr
        (JEQ_K, 0, 1, nr),              # io_uring_setup? fail it : allow
        (RET_K, 0, 0, RET_ERRNO | err),
        (RET_K, 0, 0, RET_ALLOW),
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, ctypes.get_errno()
    assert libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) == 0, ctypes.get_errno()

    params = ctypes.create_string_buffer(120)  # struct io_uring_params
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(nr), ctypes.c_uint(4), params)
    raw_errno = ctypes.get_errno()
    assert rc == -1 and raw_errno == err, (rc, raw_errno)

    import numpy as np
    import dpmove

    out = {}
    eng = dpmove.Engine()
    out["backend"], out["reason"] = eng.backend, eng.backend_reason
    info = dpmove.info()
    out["uring"], out["active"] = info["backends"]["io_uring"], info["active"]["backend"]
    data = np.random.default_rng(int(sys.argv[5])).integers(0, 256, 1 << 20, dtype=np.uint8)
    f = eng.open(path, "w+", direct=False)
    eng.write(f, data, [(0, 0, data.size)]).result(timeout_s=30)
    with open(path, "rb") as fh:
        out["written_ok"] = fh.read() == data.tobytes()
    back = np.zeros_like(data)
    eng.read(f, back, [(4096, 0, data.size - 4096)]).result(timeout_s=30)
    out["read_ok"] = bool((back[: data.size - 4096] == data[4096:]).all())
    try:
        dpmove.Engine(backend="io_uring")
        out["forced"] = None
    except dpmove.Error as e:
        out["forced"] = [type(e).__name__, e.errno, str(e)]
    eng.close()
    print(json.dumps(out), flush=True)
    # The command line, under the same filter (it survives exec).
    os.execv(sys.executable, [sys.executable, "-m", "dpmove", "info", "--json"])
    """
)


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("errname", ["EPERM", "ENOSYS"])
def test_seccomp_refusing_io_uring_falls_back(tmp_path: Path, rng, errname: str) -> None:
    machine = platform.machine()
    if machine not in SECCOMP_ARCH:
        pytest.skip(f"no seccomp audit-arch / syscall-number table for {machine}")
    audit_arch, nr = SECCOMP_ARCH[machine]
    err = getattr(errno, errname)
    env = {k: v for k, v in os.environ.items() if k != "DPMOVE_BACKEND"}
    p = subprocess.run(
        [sys.executable, "-c", SECCOMP_CHILD, str(audit_arch), str(nr), str(err), str(tmp_path / "f.bin"),
         str(int(rng.integers(0, 2**31)))],
        capture_output=True, text=True, timeout=100, env=env,
    )
    assert p.returncode == 0, p.stderr
    first, _, rest = p.stdout.partition("\n")
    got = json.loads(first)
    assert got["backend"] == "threadpool"
    assert got["reason"].startswith("fallback: ") and "io_uring_setup" in got["reason"] and errname in got["reason"]
    assert got["uring"]["compiled"] == "yes" and got["uring"]["usable"] == "no"
    assert "io_uring_setup" in got["uring"]["reason"] and errname in got["uring"]["reason"]
    assert got["active"] == "threadpool"
    assert got["written_ok"] and got["read_ok"]
    name, code, msg = got["forced"]
    assert name == "Error" and code == errno.ENOTSUP
    assert "io_uring_setup" in msg and errname in msg
    cli = json.loads(rest)
    assert cli["active"]["backend"] == "threadpool" and errname in cli["active"]["reason"]
    assert cli["backends"]["io_uring"]["usable"] == "no"


MEMLOCK_CHECK = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import dpmove
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
    eng = dpmove.Engine("io_uring")
    big = eng.alloc(16 << 20)
    small = eng.alloc(64 << 10)
    data = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
    f = eng.open(sys.argv[1], "w+", direct=False)
    big.numpy()[: data.size] = data
    # control: the top QoS level, whose entries go to the kernel whole (one op each); lower
    # classes are cut into 128 KiB operations.
    eng.write(f, big, [(0, 0, data.size)], traffic_class="control").result()
    eng.read(f, small, [(4096, 0, 65536)], traffic_class="control").result()
    ok = bool((small.numpy() == data[4096 : 4096 + 65536]).all())
    print(json.dumps({"big": [big.registered, big.registration_error], "small": [small.registered, small.registration_error],
                      "ok": ok, "stats": eng.stats()}))
    eng.close()
    """
)


@pytest.mark.root
def test_memlock_limit_makes_registration_fail_per_region(tmp_path: Path) -> None:
    """Without CAP_IPC_LOCK, fixed buffers count against RLIMIT_MEMLOCK: a region over the limit
    stays unregistered with the reason, works anyway, and smaller regions still register."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop CAP_IPC_LOCK")
    out = subprocess.run(["setpriv", "--bounding-set=-ipc_lock", sys.executable, "-c", MEMLOCK_CHECK, str(tmp_path / "m.bin")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["big"][0] is False and "ENOMEM" in got["big"][1]
    assert got["small"] == [True, ""]
    assert got["ok"]
    assert got["stats"]["fixed_buffer_ops"] == 1  # the read into `small`; the write from `big` was unregistered
    assert got["stats"]["ops_submitted"] == 2
