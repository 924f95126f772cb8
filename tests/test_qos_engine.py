"""QoS end to end: traffic classes on real file I/O (both backends) and shm writes.

What is checked is behaviour that cannot flake on a loaded machine: bytes land where a plain
reference (os.pread, NumPy) says, counters add up, a rate limit can only slow a class down
(lower bounds on elapsed time), a class queued behind its rate limit never holds up another,
and every request ends - queued ones included - on deadline, cancel and close. Timing
targets live in `dpmove bench qos`.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest

import dpmove
from dpmove.qos import PathLimits, QosConfig

from conftest import finished, rand_bytes, write_file
from test_net_support import NetEngines, net_engines, wait_for  # noqa: F401 (fixture)

KiB, MiB = 1 << 10, 1 << 20


def cfg(**rates) -> QosConfig:
    """Default classes; rates: class -> (bytes/s, burst bytes)."""
    c = QosConfig()
    for name, (rate, burst) in rates.items():
        c.classes[name].rate = rate
        c.classes[name].burst = burst
    return c


@pytest.fixture
def data_file(tmp_path: Path, rng: np.random.Generator):
    data = rand_bytes(rng, 8 * MiB)
    path = tmp_path / "kv.bin"
    write_file(path, data)
    return path, data


def pread(path: Path, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


# --- storage ---------------------------------------------------------------------------------


def test_every_class_reads_right_bytes_and_is_counted(make_engine, data_file, rng) -> None:
    path, data = data_file
    eng = make_engine()
    f = eng.open(path, "r")
    region = eng.alloc(8 * MiB)
    sizes = {"control": 4 * KiB, "kv_load": 1 * MiB, "kv_store": 192 * KiB, "bulk": 3 * MiB + 4096}
    expect_bytes = {}
    off = 0
    for cls, n in sizes.items():
        foff = int(rng.integers(0, (8 * MiB - n) // 4096)) * 4096
        req = eng.read(f, region, [(foff, off, n)], traffic_class=cls)
        assert finished(req) == dpmove.RequestState.DONE
        assert bytes(region.numpy()[off : off + n]) == pread(path, foff, n)
        expect_bytes[cls] = n
        off += n
    # No class named: the configuration's default (bulk).
    req = eng.read(f, region, [(0, 0, 4096)])
    assert finished(req) == dpmove.RequestState.DONE
    expect_bytes["bulk"] += 4096
    st = eng.qos_stats()["storage"]
    for cls, n in expect_bytes.items():
        assert st[cls]["bytes"] == n, (cls, st[cls])
        assert st[cls]["inflight_bytes"] == 0 and st[cls]["queued_ops"] == 0 and st[cls]["queued_bytes"] == 0
    assert eng.qos_stats()["net"]["control"]["bytes"] == 0
    assert "qos" in eng.stats()


def test_low_levels_go_to_the_kernel_in_chunks_while_the_top_level_is_active(make_engine, data_file) -> None:
    """While control is active (in flight, or seen within reserve_idle_ms) a lower class's
    entry is read in low_chunk pieces (default 128 KiB), one after another in the same slot;
    control's own entries go whole, and so do KV's once control has been idle that long.
    The bytes are the same every way."""
    path, data = data_file
    c = QosConfig()
    c.paths["storage"].reserve_idle_ms = 60_000  # "recently active" for the whole test
    eng = make_engine(qos=c)
    f = eng.open(path, "r")
    region = eng.alloc(4 * MiB)
    before = eng.stats()["ops_submitted"]
    req = eng.read(f, region, [(0, 2 * MiB, 2 * MiB)], traffic_class="control")
    assert finished(req) == dpmove.RequestState.DONE
    mid = eng.stats()["ops_submitted"]
    assert mid - before == 1
    req = eng.read(f, region, [(4096, 0, 2 * MiB)], traffic_class="kv_load")
    assert finished(req) == dpmove.RequestState.DONE
    assert eng.stats()["ops_submitted"] - mid == 16
    assert eng.stats()["resubmits"] == 0  # a piece is not a retry
    np.testing.assert_array_equal(region.numpy()[: 2 * MiB], data[4096 : 4096 + 2 * MiB])
    np.testing.assert_array_equal(region.numpy()[2 * MiB :], data[: 2 * MiB])

    c.paths["storage"].reserve_idle_ms = 1  # control idle after 1 ms: KV goes whole
    eng = make_engine(qos=c)
    f = eng.open(path, "r")
    region = eng.alloc(4 * MiB)
    assert finished(eng.read(f, region, [(0, 0, 4096)], traffic_class="control")) == dpmove.RequestState.DONE
    time.sleep(0.05)
    before = eng.stats()["ops_submitted"]
    req = eng.read(f, region, [(8192, 0, 2 * MiB)], traffic_class="kv_load")
    assert finished(req) == dpmove.RequestState.DONE
    assert eng.stats()["ops_submitted"] - before == 1
    np.testing.assert_array_equal(region.numpy()[: 2 * MiB], data[8192 : 8192 + 2 * MiB])


def test_rate_limit_caps_a_class_and_counts_throttled_time(make_engine, data_file) -> None:
    """kv_load at 8 MiB/s with a 1 MiB bucket: 6 MiB cannot finish in less than (6-1)/8 s."""
    path, data = data_file
    eng = make_engine(qos=cfg(kv_load=(8 * MiB, 1 * MiB)))
    f = eng.open(path, "r")
    region = eng.alloc(6 * MiB)
    ent = dpmove.entries(np.arange(24) * 256 * KiB, np.arange(24) * 256 * KiB, 256 * KiB)
    t0 = time.monotonic()
    req = eng.read(f, region, ent, traffic_class="kv_load")
    assert finished(req) == dpmove.RequestState.DONE
    elapsed = time.monotonic() - t0
    assert elapsed >= 5 / 8 * 0.95, elapsed
    np.testing.assert_array_equal(region.numpy(), data[: 6 * MiB])
    st = eng.qos_stats()["storage"]["kv_load"]
    assert st["throttled_ns"] > 0.3e9, st
    assert st["wait_max_ns"] > 0.3e9 and st["wait_p99_ns"] >= st["wait_p50_ns"], st


def test_a_throttled_class_never_holds_up_another(make_engine, data_file) -> None:
    """kv_load is queued behind a 1 MiB/s limit for seconds; control and kv_store reads
    submitted after it finish at once (work-conserving), and kv_load is still going."""
    path, data = data_file
    eng = make_engine(qos=cfg(kv_load=(1 * MiB, 64 * KiB)))
    f = eng.open(path, "r")
    region = eng.alloc(8 * MiB)
    slow = eng.read(f, region, dpmove.entries(np.arange(16) * 64 * KiB, np.arange(16) * 64 * KiB, 64 * KiB),
                    traffic_class="kv_load", timeout_s=60)
    wait_for(lambda: eng.qos_stats()["storage"]["kv_load"]["queued_ops"] > 0, 10, "kv_load to queue")
    for cls in ("control", "kv_store", "bulk"):
        req = eng.read(f, region, [(4 * MiB, 4 * MiB, 512 * KiB)], traffic_class=cls)
        assert req.wait(10) == dpmove.RequestState.DONE, cls
    assert slow.state == dpmove.RequestState.PENDING
    slow.cancel()
    assert slow.wait_quiesced(10)


def test_a_request_queued_in_the_gate_ends_at_its_deadline(make_engine, data_file) -> None:
    """Nobody waits on it: the gate applies the deadline of what it holds. The entries that
    never started end -ETIMEDOUT and leave the queue without being charged to the bucket."""
    path, _ = data_file
    eng = make_engine(qos=cfg(kv_load=(64 * KiB, 64 * KiB)))
    f = eng.open(path, "r")
    region = eng.alloc(4 * MiB)
    req = eng.read(f, region, dpmove.entries(np.arange(8) * 64 * KiB, np.arange(8) * 64 * KiB, 64 * KiB),
                   traffic_class="kv_load", timeout_s=0.3)
    st = wait_for(lambda: eng.qos_stats()["storage"]["kv_load"]["queued_ops"] == 0 and eng.qos_stats(), 10,
                  "the gate to drop the timed-out request")
    assert req.wait(0) == dpmove.RequestState.TIMED_OUT
    assert req.wait_quiesced(5)
    status = req.status
    assert status[0] == 0 and (status[1:] == -110).all(), status  # the burst let the first one go
    assert st["storage"]["kv_load"]["queued_bytes"] == 0 and st["storage"]["kv_load"]["inflight_bytes"] == 0


def test_cancel_takes_queued_work_out_of_the_gate(make_engine, data_file) -> None:
    path, data = data_file
    eng = make_engine(qos=cfg(kv_load=(256 * KiB, 256 * KiB)))
    f = eng.open(path, "r")
    region = eng.alloc(8 * MiB)
    big = eng.read(f, region, dpmove.entries(np.arange(32) * 256 * KiB, np.arange(32) * 256 * KiB, 256 * KiB),
                   traffic_class="kv_load")
    wait_for(lambda: eng.qos_stats()["storage"]["kv_load"]["queued_ops"] > 0, 10, "kv_load to queue")
    assert big.cancel()
    assert big.wait_quiesced(10)
    st = eng.qos_stats()["storage"]["kv_load"]
    assert st["queued_ops"] == 0 and st["queued_bytes"] == 0 and st["inflight_bytes"] == 0, st
    assert set(big.status.tolist()) <= {0, -125}  # ECANCELED
    # The bucket was not charged for what never went: the next read fits in it again soon.
    t0 = time.monotonic()
    req = eng.read(f, region, [(0, 0, 256 * KiB)], traffic_class="kv_load")
    assert req.wait(10) == dpmove.RequestState.DONE
    assert time.monotonic() - t0 < 5
    np.testing.assert_array_equal(region.numpy()[: 256 * KiB], data[: 256 * KiB])


def test_close_cancels_what_waits_in_the_gate(make_engine, data_file) -> None:
    path, _ = data_file
    eng = make_engine(qos=cfg(kv_load=(64 * KiB, 64 * KiB)))
    f = eng.open(path, "r")
    region = eng.alloc(4 * MiB)
    reqs = [eng.read(f, region, [(i * 64 * KiB, i * 64 * KiB, 64 * KiB)], traffic_class="kv_load") for i in range(8)]
    eng.close()
    for r in reqs:
        assert r.wait_quiesced(10)
    assert {r.state for r in reqs} <= {dpmove.RequestState.DONE, dpmove.RequestState.CANCELLED}
    assert sum(r.state == dpmove.RequestState.CANCELLED for r in reqs) >= 6


def test_qos_off_is_one_fifo_without_limits(make_engine, data_file) -> None:
    """enabled=False: rate limits and windows do not apply, entries go whole; classes are still
    counted and nothing is ever reported as waiting."""
    path, data = data_file
    c = cfg(kv_load=(64 * KiB, 64 * KiB))
    c.enabled = False
    eng = make_engine(qos=c)
    f = eng.open(path, "r")
    region = eng.alloc(8 * MiB)
    before = eng.stats()["ops_submitted"]
    t0 = time.monotonic()
    req = eng.read(f, region, [(0, 0, 8 * MiB)], traffic_class="kv_load")
    assert finished(req) == dpmove.RequestState.DONE
    assert time.monotonic() - t0 < 30  # at 64 KiB/s it would take 2 minutes
    assert eng.stats()["ops_submitted"] - before == 1
    np.testing.assert_array_equal(region.numpy(), data)
    st = eng.qos_stats()["storage"]["kv_load"]
    assert st["bytes"] == 8 * MiB and st["ops"] == 1 and st["wait_max_ns"] == 0 and st["throttled_ns"] == 0


def test_small_windows_under_concurrency_lose_nothing(make_engine, data_file) -> None:
    """Tiny windows and chunks, four classes, four threads: every request ends DONE with the
    file's bytes, and the windows are empty afterwards."""
    path, data = data_file
    c = QosConfig()
    c.paths["storage"] = PathLimits(inflight=256 * KiB, low_inflight=64 * KiB, low_chunk=8 * KiB)
    c.quantum_bytes = 16 * KiB
    eng = make_engine(qos=c)
    f = eng.open(path, "r")
    classes = list(c.classes)
    errors: List[BaseException] = []

    def worker(t: int) -> None:
        r = np.random.default_rng(t)
        region = eng.alloc(1 * MiB)
        try:
            for _ in range(30):
                n = int(r.integers(1, 20))
                lens = r.integers(1, 16, n) * 4096
                loc = np.concatenate([[0], np.cumsum(lens)[:-1]])
                foff = r.integers(0, (8 * MiB - 64 * KiB) // 4096, n) * 4096
                req = eng.read(f, region, dpmove.entries(foff, loc, lens), traffic_class=classes[int(r.integers(4))])
                assert req.wait(60) == dpmove.RequestState.DONE, req
                for a, b, ln in zip(foff, loc, lens):
                    np.testing.assert_array_equal(region.numpy()[b : b + ln], data[a : a + ln])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[0]
    st = eng.qos_stats()["storage"]
    assert all(v["inflight_bytes"] == 0 and v["queued_ops"] == 0 for v in st.values()), st
    assert sum(v["ops"] for v in st.values()) > 0


# --- shm -------------------------------------------------------------------------------------


def shm_pair(ne: NetEngines, qos: QosConfig, size: int = 8 * MiB, streams: int = 2):
    rx = ne("rx", qos=qos)
    tx = ne("tx", qos=qos)
    dst = rx.alloc(size)
    h = rx.expose(dst, writable=True)
    peer = tx.connect(rx.metadata(), transport="shm", streams=streams)
    src = tx.alloc(size)
    return tx, src, peer, h, dst


def test_shm_writes_per_class_land_and_are_counted(net_engines, rng) -> None:  # noqa: F811
    tx, src, peer, h, dst = shm_pair(net_engines, QosConfig())
    src.numpy()[:] = rand_bytes(rng, 8 * MiB)
    sizes = {"control": 16 * KiB, "kv_load": 2 * MiB, "kv_store": 1 * MiB, "bulk": 100}
    off = 0
    for cls, n in sizes.items():
        req = net_engines.write(peer, src, h, [(off, off, n)], traffic_class=cls, notify=cls.encode())
        assert req.wait(30) == dpmove.RequestState.DONE, req
        off += n
    np.testing.assert_array_equal(dst.numpy()[:off], src.numpy()[:off])
    st = tx.qos_stats()["net"]
    for cls, n in sizes.items():
        assert st[cls]["bytes"] == n and st[cls]["ops"] == 1 and st[cls]["inflight_bytes"] == 0, (cls, st[cls])


def test_shm_control_passes_a_throttled_kv_class(net_engines, rng) -> None:  # noqa: F811
    """kv_load writes wait behind a 1 MiB/s limit in the net gate; control writes posted after
    them land at once, on the stream kept for the top level."""
    tx, src, peer, h, dst = shm_pair(net_engines, cfg(kv_load=(1 * MiB, 256 * KiB)))
    src.numpy()[:] = rand_bytes(rng, 8 * MiB)
    kv = [net_engines.write(peer, src, h, [(i * MiB, i * MiB, MiB)], traffic_class="kv_load", timeout_s=60)
          for i in range(4)]
    wait_for(lambda: tx.qos_stats()["net"]["kv_load"]["queued_ops"] > 0, 10, "kv_load to queue")
    for i in range(10):
        off = 6 * MiB + i * 64 * KiB
        req = net_engines.write(peer, src, h, [(off, off, 64 * KiB)], traffic_class="control")
        assert req.wait(10) == dpmove.RequestState.DONE
    np.testing.assert_array_equal(dst.numpy()[6 * MiB : 6 * MiB + 640 * KiB], src.numpy()[6 * MiB : 6 * MiB + 640 * KiB])
    assert any(r.state == dpmove.RequestState.PENDING for r in kv)
    for r in kv:
        r.cancel()


def test_shm_rate_limit_is_a_lower_bound_on_time(net_engines, rng) -> None:  # noqa: F811
    tx, src, peer, h, dst = shm_pair(net_engines, cfg(bulk=(4 * MiB, 512 * KiB)))
    src.numpy()[:] = rand_bytes(rng, 8 * MiB)
    t0 = time.monotonic()
    reqs = [net_engines.write(peer, src, h, [(i * 512 * KiB, i * 512 * KiB, 512 * KiB)], traffic_class="bulk")
            for i in range(8)]
    for r in reqs:
        assert r.wait(30) == dpmove.RequestState.DONE
    assert time.monotonic() - t0 >= (4 - 0.5) / 4 * 0.95
    np.testing.assert_array_equal(dst.numpy()[: 4 * MiB], src.numpy()[: 4 * MiB])


# --- configuration errors --------------------------------------------------------------------


def test_bad_classes_and_configurations_are_refused(make_engine, data_file) -> None:
    path, _ = data_file
    eng = make_engine()
    f = eng.open(path, "r")
    region = eng.alloc(MiB)
    with pytest.raises(ValueError, match=r"unknown traffic class 'gold'.*\['control', 'kv_load', 'kv_store', 'bulk'\]"):
        eng.read(f, region, [(0, 0, 4096)], traffic_class="gold")
    with pytest.raises(TypeError, match="traffic_class must be a class name"):
        eng.read(f, region, [(0, 0, 4096)], traffic_class=1)
    with pytest.raises(TypeError, match="qos must be a dpmove.QosConfig"):
        dpmove.Engine(qos={"classes": {}})
    c = QosConfig()
    for i in range(4):
        c.classes[f"x{i}"] = dpmove.TrafficClass(f"x{i}", ib_sl=2 + i)
    with pytest.raises(ValueError, match="at most 4"):
        dpmove.Engine(qos=c)
    c = QosConfig()
    c.paths["storage"].low_chunk = 5000
    with pytest.raises(ValueError, match="multiple of 4096"):
        dpmove.Engine(qos=c)
    c = QosConfig()
    c.paths["disk"] = PathLimits()
    with pytest.raises(ValueError, match="storage.*net"):
        dpmove.Engine(qos=c)
    # The engine keeps its own copy: changing the caller's object later changes nothing.
    c = QosConfig()
    e2 = make_engine(qos=c)
    c.classes["kv_load"].rate = 1
    assert e2.qos.classes["kv_load"].rate == 0


def test_environment_sets_paths_and_switches_qos_off() -> None:
    c = QosConfig.from_env({"DPMOVE_QOS": "paths.storage.low_inflight=2 MiB;paths.net.inflight=1e9;enabled=0"})
    assert c.paths["storage"].low_inflight == 2 * MiB and c.paths["net"].inflight == 10**9 and c.enabled is False
    with pytest.raises(ValueError, match="paths.<storage|net>"):
        QosConfig.from_env({"DPMOVE_QOS": "paths.storage=3"})
    with pytest.raises(ValueError, match="unknown path 'disk'"):
        QosConfig.from_env({"DPMOVE_QOS": "paths.disk.inflight=3"})
    with pytest.raises(ValueError, match="enabled must be true or false"):
        QosConfig.from_env({"DPMOVE_QOS": "enabled=maybe"})
    with pytest.raises(ValueError, match="paths must be a table"):
        QosConfig.from_env({"DPMOVE_QOS": "paths=1"})


def test_a_path_rate_limits_one_path_only(net_engines, data_file, rng) -> None:  # noqa: F811
    """paths.storage.rates caps kv_load storage reads (a slower storage NIC) while kv_load
    writes over shm stay unlimited; the class's own rate would cap both."""
    path, data = data_file
    c = QosConfig.from_env({"DPMOVE_QOS": "paths.storage.rates.kv_load.rate=4MiB;paths.storage.rates.kv_load.burst=512KiB"})
    assert c.paths["storage"].rates == {"kv_load": {"rate": 4.0 * MiB, "burst": 512 * KiB}} and c.classes["kv_load"].rate == 0
    tx, src, peer, h, dst = shm_pair(net_engines, c)
    f = tx.open(path, "r")
    t0 = time.monotonic()
    req = tx.read(f, src, dpmove.entries(np.arange(8) * 256 * KiB, np.arange(8) * 256 * KiB, 256 * KiB),
                  traffic_class="kv_load")
    assert finished(req) == dpmove.RequestState.DONE
    assert time.monotonic() - t0 >= (2 - 0.5) / 4 * 0.95
    np.testing.assert_array_equal(src.numpy()[: 2 * MiB], data[: 2 * MiB])
    assert tx.qos_stats()["storage"]["kv_load"]["throttled_ns"] > 0
    req = net_engines.write(peer, src, h, [(0, 0, 8 * MiB)], traffic_class="kv_load")
    assert req.wait(30) == dpmove.RequestState.DONE
    assert tx.qos_stats()["net"]["kv_load"]["throttled_ns"] == 0
    np.testing.assert_array_equal(dst.numpy(), src.numpy())
    with pytest.raises(ValueError, match="not a declared class"):
        QosConfig.from_env({"DPMOVE_QOS": "paths.net.rates.gold.rate=1"})
    with pytest.raises(ValueError, match="rate and/or burst only"):
        QosConfig().update({"paths": {"net": {"rates": {"bulk": {"weight": 2}}}}})


def _nice_threads() -> int:
    """Threads of this process running at nice 10 (field 19 of /proc/<pid>/task/<tid>/stat)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        n += fields[16] == "10"
    return n


@pytest.mark.parametrize("enabled", [True, False])
def test_bulk_stream_threads_yield_the_cpu_only_with_qos_on(net_engines, rng, enabled) -> None:  # noqa: F811
    """streams=3 with QoS on: three bulk streams whose threads run at nice 10, and one more,
    the urgent lane. QoS off: three streams, no lane, no nice; writes land either way."""
    c = QosConfig(enabled=enabled)
    before = _nice_threads()
    tx, src, peer, h, dst = shm_pair(net_engines, c, streams=3)
    assert _nice_threads() - before == (3 if enabled else 0)
    assert peer.stats()["streams"] == (4 if enabled else 3)
    src.numpy()[:] = rand_bytes(rng, 8 * MiB)
    reqs = [net_engines.write(peer, src, h, [(0, 0, 4 * MiB)], traffic_class="kv_load"),
            net_engines.write(peer, src, h, [(4 * MiB, 4 * MiB, 4 * MiB)], traffic_class="control")]
    for r in reqs:
        assert r.wait(30) == dpmove.RequestState.DONE
    np.testing.assert_array_equal(dst.numpy(), src.numpy())
    peer.close()
    assert _nice_threads() == before


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_puts_of_one_thread_keep_their_order_through_a_full_window(net_engines, transport) -> None:  # noqa: F811
    """A 32 KiB window keeps most of 3000 puts queued, so the caller's thread and the gate's
    thread both dispatch; the receiver must still see the notifications in request order."""
    c = QosConfig()
    c.paths["net"] = PathLimits(low_inflight=32 * KiB, reserve_idle_ms=0)
    rx = net_engines("rx", qos=c)
    tx = net_engines("tx", qos=c)
    dst = rx.alloc(4 * MiB)
    h = rx.expose(dst, writable=True)
    peer = tx.connect(rx.metadata(), transport=transport, streams=1)
    src = tx.alloc(4 * MiB)
    n = 3000
    # Whether a put waits depends on the transport draining slower than Python submits; on a
    # loaded host shm can keep up for a whole burst. Every burst must arrive in order, and up to
    # five bursts are sent until one has had puts held back by the window.
    for _burst in range(5):
        for i in range(n):
            off = (i % 512) * 4 * KiB
            net_engines.write(peer, src, h, [(off, off, 4 * KiB)], notify=b"%d" % i, traffic_class="kv_load",
                              timeout_s=60)
        got = []
        while len(got) < n:
            note = rx.next_notification(timeout_s=30)
            assert note is not None, f"only {len(got)} of {n} notifications"
            got.append(int(note.data))
        assert got == list(range(n))
        if tx.qos_stats()["net"]["kv_load"]["wait_max_ns"] > 0:
            break
    assert tx.qos_stats()["net"]["kv_load"]["wait_max_ns"] > 0  # the window did hold puts back


def test_counters_after_close_and_after_purge(make_engine, data_file) -> None:
    """close() leaves no queued work in the counters; a class emptied by cancel stops being
    counted as throttled (time with nothing queued is not throttled time)."""
    path, _ = data_file
    eng = make_engine(qos=cfg(bulk=(1 * MiB, 64 * KiB)))
    f = eng.open(path, "r")
    region = eng.alloc(4 * MiB)
    slow = eng.read(f, region, dpmove.entries(np.arange(8) * 64 * KiB, np.arange(8) * 64 * KiB, 64 * KiB),
                    traffic_class="bulk")
    wait_for(lambda: eng.qos_stats()["storage"]["bulk"]["queued_ops"] > 0, 10, "bulk to queue")
    time.sleep(0.05)
    slow.cancel()
    assert slow.wait_quiesced(10)
    throttled = eng.qos_stats()["storage"]["bulk"]["throttled_ns"]
    time.sleep(0.5)
    req = eng.read(f, region, [(0, 0, 4096)], traffic_class="bulk")
    assert req.wait(10) == dpmove.RequestState.DONE
    assert eng.qos_stats()["storage"]["bulk"]["throttled_ns"] - throttled < 0.3e9
    queued = [eng.read(f, region, [(i * 64 * KiB, 0, 64 * KiB)], traffic_class="bulk") for i in range(8)]
    wait_for(lambda: eng.qos_stats()["storage"]["bulk"]["queued_ops"] > 0, 10, "bulk to queue")
    eng.close()
    assert all(r.wait_quiesced(10) for r in queued)
    st = eng.qos_stats()["storage"]["bulk"]
    assert st["queued_ops"] == 0 and st["queued_bytes"] == 0, st
