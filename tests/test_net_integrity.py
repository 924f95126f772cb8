"""One-sided writes land exactly the bytes asked for, and notifications follow the data.

Every test runs over tcp (1 and 4 streams) and shm. Payloads are random (the `rng` fixture,
reproducible from the run seed); the expected receiver memory is built with NumPy from the
same batch and compared with the whole exposed region, so a byte written where it should not
be fails as surely as a byte missing.
"""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest

import dpmove
from test_net_support import TRANSPORTS, drain_notifications, finished, net_engines, pair  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def layout(rng: np.random.Generator, lengths: np.ndarray, dst_size: int, src_size: int):
    """Non-overlapping remote offsets (random gaps, random order) and random local offsets."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(lengths))
    slack = dst_size - int(lengths.sum())
    assert slack >= 0
    gaps = np.sort(rng.integers(0, slack + 1, len(lengths)))
    gaps = np.diff(np.concatenate([[0], gaps]))
    remote = np.empty(len(lengths), dtype=np.int64)
    at = 0
    for i, k in enumerate(order):
        at += int(gaps[i])
        remote[k] = at
        at += int(lengths[k])
    assert at <= dst_size
    local = rng.integers(0, src_size - lengths + 1, dtype=np.int64)
    return dpmove.entries(remote, local, lengths)


def expected(dst_before: np.ndarray, src: np.ndarray, batch: np.ndarray) -> np.ndarray:
    out = dst_before.copy()
    for r, l, n in batch:
        out[r : r + n] = src[l : l + n]
    return out


def fill(rng: np.random.Generator, region) -> np.ndarray:
    a = region.numpy()
    a[:] = np.frombuffer(rng.bytes(len(a)), dtype=np.uint8)
    return a


def roundtrip(ne, rng, transport, streams, lengths, dst_size, src_size, notify=b"done"):
    a, dst, h, b, p = pair(ne, transport, streams, size=dst_size)
    src = b.alloc(src_size)
    s = fill(rng, src)
    batch = layout(rng, lengths, dst_size, src_size)
    req = ne.write(p, src, h, batch, notify=notify, timeout_s=60)
    assert req.result(timeout_s=60) == int(batch[:, 2].sum())
    assert finished(req) == dpmove.RequestState.DONE
    assert (req.status == 0).all()
    np.testing.assert_array_equal(req.bytes, batch[:, 2])
    n = a.next_notification(timeout_s=10)
    assert n is not None and n.data == notify
    got = dst.numpy()
    want = expected(np.zeros(dst_size, np.uint8), s, batch)
    assert np.array_equal(got, want), f"first mismatch at {int(np.argmax(got != want))}"
    assert a.next_notification(timeout_s=0) is None
    return a, b, p


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_sizes_not_page_multiples(net_engines, rng, tp):
    transport, streams = tp
    lengths = np.array([1, 3, 511, 4095, 4097, 8191, 65537, 131071, 1 << 20 | 13, 3 << 20 | 4093], dtype=np.int64)
    lengths = np.concatenate([lengths, rng.integers(1, 300000, 40)])
    roundtrip(net_engines, rng, transport, streams, lengths, dst_size=(16 << 20) + 777, src_size=(4 << 20) + 4099)


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_many_tiny_entries(net_engines, rng, tp):
    transport, streams = tp
    lengths = rng.integers(1, 65, 10000)
    a, b, p = roundtrip(net_engines, rng, transport, streams, lengths, dst_size=(1 << 20) + 5, src_size=65536 + 3)
    assert p.stats()["entries_posted"] == 10000


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_one_huge_entry(net_engines, rng, tp):
    transport, streams = tp
    size = 256 << 20
    a, dst, h, b, p = pair(net_engines, transport, streams, size=size)
    src = b.alloc(size)
    s = fill(rng, src)
    req = net_engines.write(p, src, h, [(0, 0, size)], notify=b"huge", timeout_s=60)
    assert req.result(timeout_s=60) == size
    assert a.next_notification(timeout_s=10).data == b"huge"
    assert np.array_equal(dst.numpy(), s)
    if transport == "tcp":
        assert a.net_stats()["bytes_received"] >= size


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_zero_length_entries(net_engines, rng, tp):
    transport, streams = tp
    size = 100003
    a, dst, h, b, p = pair(net_engines, transport, streams, size=size)
    src = b.alloc(size)
    s = fill(rng, src)
    batch = np.array(
        [(0, 0, 0), (10, 5, 100), (size, size, 0), (500, 7, 0), (2000, 3000, 4097), (size - 1, 0, 1), (size, 0, 0)],
        dtype=np.int64,
    )
    req = net_engines.write(p, src, h, batch, notify=b"z", timeout_s=30)
    assert req.result(timeout_s=30) == 100 + 4097 + 1
    assert (req.status == 0).all(), req.status
    np.testing.assert_array_equal(req.bytes, batch[:, 2])
    assert a.next_notification(timeout_s=10).data == b"z"
    assert np.array_equal(dst.numpy(), expected(np.zeros(size, np.uint8), s, batch))
    # A request made only of empty entries completes, and its notification still comes once.
    req = net_engines.write(p, src, h, [(0, 0, 0), (size, size, 0)], notify=b"empty", timeout_s=30)
    assert req.result(timeout_s=30) == 0
    assert finished(req) == dpmove.RequestState.DONE
    assert a.next_notification(timeout_s=10).data == b"empty"
    assert a.next_notification(timeout_s=0.1) is None


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_numpy_buffer_as_source(net_engines, rng, tp):
    transport, streams = tp
    size = (2 << 20) + 1234
    a, dst, h, b, p = pair(net_engines, transport, streams, size=size)
    arr = np.frombuffer(rng.bytes(size), dtype=np.uint8).copy()
    src = b.register(arr)
    batch = layout(rng, rng.integers(1, 100000, 20), size, size)
    req = net_engines.write(p, src, h, batch, timeout_s=30)
    assert req.result(timeout_s=30) == int(batch[:, 2].sum())
    assert np.array_equal(dst.numpy(), expected(np.zeros(size, np.uint8), arr, batch))
    # A read-only buffer is fine as a source too.
    ro = np.frombuffer(rng.bytes(4096), dtype=np.uint8)
    assert not ro.flags.writeable
    req = net_engines.write(p, b.register(ro), h, [(size - 4096, 0, 4096)], timeout_s=30)
    assert req.result(timeout_s=30) == 4096
    assert np.array_equal(dst.numpy()[size - 4096 :], ro)


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_numpy_buffer_as_destination(net_engines, rng, tp):
    transport, streams = tp
    a = net_engines("recv")
    b = net_engines("send")
    size = 300001
    arr = np.zeros(size, dtype=np.uint8)
    dst = a.register(arr)
    h = a.expose(dst, writable=True)
    assert h.writable and not h.shareable
    p = b.connect(a.metadata(), transport=transport, streams=streams)
    src = b.alloc(size)
    s = fill(rng, src)
    batch = layout(rng, rng.integers(1, 25000, 12), size, size)
    before = a.net_stats()
    if transport == "shm":
        with pytest.raises(dpmove.UnsupportedOperation, match=r"Python buffer.*(alloc|tcp)") as info:
            p.write(src, h, batch, notify=b"x")
        assert info.value.errno == errno.EOPNOTSUPP
        assert not arr.any(), "a refused shm write changed the buffer"
        assert a.net_stats().get("bytes_received", 0) == before.get("bytes_received", 0)
        assert a.next_notification(timeout_s=0.1) is None
        assert p.broken is None  # the peer still works for a shareable region
        dst2 = a.alloc(4096)
        h2 = a.expose(dst2)
        assert net_engines.write(p, src, h2, [(0, 0, 4096)], timeout_s=30).result(30) == 4096
        assert np.array_equal(dst2.numpy(), s[:4096])
        # auto picks shm on this host, so it refuses the same way.
        pa = b.connect(a.metadata())
        assert pa.transport == "shm"
        with pytest.raises(dpmove.UnsupportedOperation):
            pa.write(src, h, batch)
        return
    req = net_engines.write(p, src, h, batch, notify=b"np", timeout_s=30)
    assert req.result(timeout_s=30) == int(batch[:, 2].sum())
    assert a.next_notification(timeout_s=10).data == b"np"
    assert np.array_equal(arr, expected(np.zeros(size, np.uint8), s, batch))


# --- notifications ---------------------------------------------------------------------------


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_notifications_once_in_order_after_data(net_engines, rng, tp):
    """Each notification comes once; on one stream in request order; and when it comes, the
    request's bytes are already readable in the receiver's memory."""
    transport, streams = tp
    nreq, slot = 96, 48 * 1024 + 17
    size = nreq * slot
    a, dst, h, b, p = pair(net_engines, transport, streams, size=size)
    src = b.alloc(size)
    s = fill(rng, src)
    got = dst.numpy()
    reqs = []
    for i in range(nreq):
        reqs.append(net_engines.write(p, src, h, [(i * slot, i * slot, slot)], notify=b"n%d" % i, timeout_s=60))
    seen = []
    for _ in range(nreq):
        n = a.next_notification(timeout_s=30)
        assert n is not None, f"only {len(seen)} of {nreq} notifications arrived"
        i = int(n.data[1:])
        # The data must be visible the moment the notification is.
        assert np.array_equal(got[i * slot : (i + 1) * slot], s[i * slot : (i + 1) * slot]), f"request {i} not visible"
        assert n.peer == "send"
        seen.append((i, n.request))
    assert a.next_notification(timeout_s=0.2) is None, "a notification came twice"
    assert sorted(i for i, _ in seen) == list(range(nreq))
    if streams == 1:
        assert [i for i, _ in seen] == list(range(nreq)), "notifications out of order on one stream"
        assert [r for _, r in seen] == sorted(r for _, r in seen)
    assert len({r for _, r in seen}) == nreq
    for r in reqs:
        assert r.result(timeout_s=30) == slot
    st = a.net_stats()
    assert st["notifications_delivered"] == nreq and st["requests_completed"] == nreq, st


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_notifications_for_split_requests(net_engines, rng, tp):
    """Large multi-entry requests (split over streams on tcp4): one notification each, after all
    pieces of the request landed."""
    transport, streams = tp
    nreq, per, blk = 6, 8, 300 * 1024 + 3
    size = nreq * per * blk
    a, dst, h, b, p = pair(net_engines, transport, streams, size=size)
    src = b.alloc(size)
    s = fill(rng, src)
    got = dst.numpy()
    for i in range(nreq):
        offs = (i * per + np.arange(per)) * blk
        net_engines.write(p, src, h, dpmove.entries(offs[::-1], offs[::-1], blk), notify=b"%d" % i, timeout_s=60)
    seen = []
    for _ in range(nreq):
        n = a.next_notification(timeout_s=30)
        assert n is not None
        i = int(n.data)
        lo, hi = i * per * blk, (i + 1) * per * blk
        assert np.array_equal(got[lo:hi], s[lo:hi]), f"request {i} notified before all its bytes landed"
        seen.append(i)
    assert sorted(seen) == list(range(nreq))
    if streams == 1:
        assert seen == list(range(nreq))
    assert a.next_notification(timeout_s=0.2) is None


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_refused_entry_suppresses_notification(net_engines, rng, tp):
    """A write into a region the receiver unexposed is refused per entry (-ENOENT); a request
    with such an entry never gets its notification, even when its other entries landed."""
    transport, streams = tp
    a, dst, h, b, p = pair(net_engines, transport, streams, size=1 << 16)
    other = a.alloc(1 << 16)
    h2 = a.expose(other)
    src = b.alloc(1 << 16)
    s = fill(rng, src)
    # Both regions are known to the writer (shm maps them on first use).
    for hh in (h, h2):
        assert net_engines.write(p, src, hh, [(0, 0, 16)], notify=b"warm", timeout_s=30).result(30) == 16
        assert a.next_notification(timeout_s=10).data == b"warm"
    other_before = other.numpy().copy()
    assert a.unexpose(h2) is True
    refused0 = a.net_stats().get("writes_refused", 0)

    req = net_engines.write(p, src, h2, [(100, 0, 1000), (5000, 10, 3)], notify=b"never", timeout_s=30)
    assert finished(req) == dpmove.RequestState.FAILED
    np.testing.assert_array_equal(req.status, [-errno.ENOENT, -errno.ENOENT])
    np.testing.assert_array_equal(req.bytes, [0, 0])
    with pytest.raises(dpmove.TransferError) as info:
        req.result(timeout_s=1)
    assert info.value.errno == errno.ENOENT
    if transport == "tcp":  # the bytes never reached the unexposed region
        assert np.array_equal(other.numpy(), other_before)
    assert a.net_stats()["writes_refused"] == refused0 + 2

    # The same request may not half-succeed silently: a refused entry on another region is
    # enough to suppress it (here: the handle of a region that was never exposed at all).
    bogus = dpmove.RemoteRegion.from_bytes(
        h.to_bytes()[:8] + ((h.key + 12345) & 0xFFFFFFFF).to_bytes(4, "little") + h.to_bytes()[12:]
    )
    if transport == "tcp":
        req = net_engines.write(p, src, bogus, [(0, 0, 64)], notify=b"never2", timeout_s=30)
        assert finished(req) == dpmove.RequestState.FAILED
        np.testing.assert_array_equal(req.status, [-errno.ENOENT])
    else:  # shm must map it first, which the receiver refuses before anything is copied
        with pytest.raises(dpmove.Error) as info:
            p.write(src, bogus, [(0, 0, 64)], notify=b"never2", timeout_s=30)
        assert info.value.errno == errno.ENOENT

    assert a.next_notification(timeout_s=0.3) is None, "notification delivered for a refused request"
    # The peer keeps working.
    assert p.broken is None
    req = net_engines.write(p, src, h, [(0, 0, 1 << 16)], notify=b"after", timeout_s=30)
    assert req.result(30) == 1 << 16
    assert a.next_notification(timeout_s=10).data == b"after"
    assert np.array_equal(dst.numpy(), s)


def test_shm_unexposed_before_mapping_raises(net_engines, rng):
    a, dst, h, b, p = pair(net_engines, "shm", 1, size=4096)
    src = b.alloc(4096)
    a.unexpose(h)
    with pytest.raises(dpmove.Error, match="no such region") as info:
        p.write(src, h, [(0, 0, 4096)], notify=b"x")
    assert info.value.errno == errno.ENOENT
    assert a.next_notification(timeout_s=0.1) is None


# --- concurrency -----------------------------------------------------------------------------


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_threads_on_one_peer(net_engines, rng, tp):
    transport, streams = tp
    nthreads, per_thread, blk = 4, 25, 20000 + 7
    size = nthreads * per_thread * blk
    a, dst, h, b, p = pair(net_engines, transport, streams, size=size)
    src = b.alloc(size)
    s = fill(rng, src)
    errors = []
    results = {}

    def worker(t: int) -> None:
        try:
            reqs = []
            for j in range(per_thread):
                k = t * per_thread + j
                # two entries per request, the second half first
                half = blk // 2
                batch = [(k * blk + half, k * blk + half, blk - half), (k * blk, k * blk, half)]
                reqs.append(net_engines.write(p, src, h, batch, notify=b"%d" % k, timeout_s=60))
            results[t] = [r.result(timeout_s=60) for r in reqs]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for t in th:
        t.start()
    for t in th:
        t.join(120)
    assert not errors, errors
    assert all(results[t] == [blk] * per_thread for t in range(nthreads))
    notes = [a.next_notification(timeout_s=10) for _ in range(nthreads * per_thread)]
    assert all(n is not None for n in notes)
    assert sorted(int(n.data) for n in notes) == list(range(nthreads * per_thread))
    assert a.next_notification(timeout_s=0.2) is None
    assert np.array_equal(dst.numpy(), s)


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_several_peers_into_one_receiver(net_engines, rng, tp):
    transport, streams = tp
    npeers, per_peer, blk = 4, 20, 30000 + 1
    size = npeers * per_peer * blk
    a = net_engines("recv")
    dst = a.alloc(size)
    h = a.expose(dst)
    md = a.metadata()
    writers = []
    expect = np.zeros(size, np.uint8)
    for k in range(npeers):
        e = net_engines(f"w{k}")
        p = e.connect(md, transport=transport, streams=streams)
        src = e.alloc(per_peer * blk)
        sv = fill(rng, src)
        expect[k * per_peer * blk : (k + 1) * per_peer * blk] = sv
        writers.append((e, p, src))
    errors = []

    def worker(k: int) -> None:
        try:
            e, p, src = writers[k]
            reqs = [
                net_engines.write(
                    p, src, h, [((k * per_peer + j) * blk, j * blk, blk)], notify=b"%d:%d" % (k, j), timeout_s=60
                )
                for j in range(per_peer)
            ]
            for r in reqs:
                assert r.result(timeout_s=60) == blk
        except BaseException as ex:  # noqa: BLE001
            errors.append(ex)

    th = [threading.Thread(target=worker, args=(k,)) for k in range(npeers)]
    for t in th:
        t.start()
    for t in th:
        t.join(120)
    assert not errors, errors
    notes = drain_notifications(a, 1.0)
    assert len(notes) == npeers * per_peer, len(notes)
    by_peer = {}
    for n in notes:
        k, j = map(int, n.data.split(b":"))
        assert n.peer == f"w{k}"
        by_peer.setdefault(k, []).append(j)
    for k in range(npeers):
        if streams == 1:
            assert by_peer[k] == list(range(per_peer)), (k, by_peer[k])
        else:
            assert sorted(by_peer[k]) == list(range(per_peer))
    assert len({n.sender for n in notes}) == npeers
    assert np.array_equal(dst.numpy(), expect)


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_unexpose_during_transfer(net_engines, rng, tp):
    """The receiver unexposes the region while a large batch is in flight: whatever the race
    gives, the request is DONE with its notification, or FAILED with every non-zero status
    -ENOENT and no notification; entries that were refused over tcp left their bytes alone."""
    transport, streams = tp
    blk, count = 256 * 1024, 512  # 128 MiB
    size = blk * count
    a, dst, h, b, p = pair(net_engines, transport, streams, size=size)
    src = b.alloc(16 << 20)
    s = fill(rng, src)
    idx = np.arange(count, dtype=np.int64) * blk
    req = net_engines.write(p, src, h, dpmove.entries(idx, idx % (16 << 20), blk), notify=b"maybe", timeout_s=60)
    a.unexpose(h)
    state = finished(req)
    st = req.status
    n = a.next_notification(timeout_s=1.0)
    if state == dpmove.RequestState.DONE:
        assert (st == 0).all()
        assert n is not None and n.data == b"maybe"
    else:
        assert state == dpmove.RequestState.FAILED
        assert set(np.unique(st)) <= {0, -errno.ENOENT}, np.unique(st)
        assert n is None, "notification for a request with refused entries"
        if transport == "tcp":
            got = dst.numpy()
            for k in np.flatnonzero(st != 0)[:64]:
                assert not got[idx[k] : idx[k] + blk].any(), f"refused entry {k} changed the region"
    for k in np.flatnonzero(st == 0)[:64]:
        assert np.array_equal(dst.numpy()[idx[k] : idx[k] + blk], s[idx[k] % (16 << 20) :][:blk])
    assert a.next_notification(timeout_s=0.1) is None
