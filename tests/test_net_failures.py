"""Failures of one-sided writes: misuse is refused before a byte moves, and a peer that dies,
stalls or restarts ends every request it holds - within the deadline, naming the peer, with no
notification for anything partial.

Peers that must die are other processes (test_net_support.RECEIVER / WRITER) so they can be
killed with SIGKILL or stopped with SIGSTOP.
"""

from __future__ import annotations

import errno
import hashlib
import signal
import time

import numpy as np
import pytest

import dpmove
from test_net_support import (  # noqa: F401 - fixtures
    TRANSPORTS,
    WRITER,
    children,
    finished,
    net_engines,
    pair,
    spawn_receiver,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)
INT64_MAX = 2**63 - 1
FAILED = dpmove.RequestState.FAILED
TIMED_OUT = dpmove.RequestState.TIMED_OUT


# --- refused before anything is sent ---------------------------------------------------------

SIZE = 65536 + 123  # receiver region
LSIZE = 32768 + 5  # writer region

OOB = [
    pytest.param((SIZE - 10, 0, 11), "outside remote", id="remote-tail"),
    pytest.param((SIZE + 1, 0, 0), "outside remote", id="remote-past-end-empty"),
    pytest.param((SIZE, 0, 1), "outside remote", id="remote-at-end"),
    pytest.param((0, LSIZE - 1, 2), "local region", id="local-tail"),
    pytest.param((0, LSIZE + 1, 0), "local region", id="local-past-end-empty"),
    pytest.param((-1, 0, 1), ">= 0", id="remote-negative"),
    pytest.param((0, -4096, 1), ">= 0", id="local-negative"),
    pytest.param((0, 0, -1), ">= 0", id="length-negative"),
    pytest.param((INT64_MAX, 0, 1), "outside remote", id="remote-int64-max"),
    pytest.param((16, 0, INT64_MAX), "local region", id="length-int64-max"),
    pytest.param((INT64_MAX - 8, 0, 16), "outside remote", id="remote-overflow"),
    pytest.param((0, INT64_MAX - 8, 16), "local region", id="local-overflow"),
    pytest.param((-(2**63), 0, 4), ">= 0", id="remote-int64-min"),
]


@pytest.mark.parametrize("tp", TRANSPORTS)
@pytest.mark.parametrize("bad, match", OOB)
def test_out_of_bounds_refused_before_sending(net_engines, rng, tp, bad, match):
    transport, streams = tp
    a, dst, h, b, p = pair(net_engines, transport, streams, size=SIZE)
    d = dst.numpy()
    d[:] = rng.integers(0, 256, SIZE, dtype=np.uint8)
    before = d.copy()
    src = b.alloc(LSIZE)
    src.numpy()[:] = rng.integers(0, 256, LSIZE, dtype=np.uint8)
    # Valid entries first: none of them may move either.
    batch = np.array([(0, 0, 4096), (8192, 100, 20000), bad, (SIZE - 1, 0, 1)], dtype=np.int64)
    stats0, pstats0 = a.net_stats(), p.stats()
    with pytest.raises(ValueError, match=match) as info:
        p.write(src, h, batch, notify=b"must not arrive")
    assert "entry 2" in str(info.value), info.value
    assert np.array_equal(d, before), "a refused request changed the receiver's memory"
    assert a.next_notification(timeout_s=0.2) is None
    st = a.net_stats()
    for k in ("bytes_received", "requests_completed", "requests_failed", "writes_refused"):
        assert st.get(k, 0) == stats0.get(k, 0), (k, st, stats0)
    assert p.stats().get("requests_posted", 0) == pstats0.get("requests_posted", 0)
    assert p.broken is None
    # Still usable.
    req = net_engines.write(p, src, h, [(1, 2, 3)], timeout_s=30)
    assert req.result(30) == 3
    assert np.array_equal(d[1:4], src.numpy()[2:5])


def test_unsigned_above_int64_refused(net_engines):
    a, dst, h, b, p = pair(net_engines, "tcp", size=4096)
    src = b.alloc(4096)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        p.write(src, h, np.array([[2**63, 0, 1]], dtype=np.uint64))
    with pytest.raises(ValueError):
        p.write(src, h, [[2**64 + 5, 0, 1]])
    with pytest.raises(TypeError):
        p.write(src, h, np.array([[0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        p.write(src, h, np.zeros((2, 4), np.int64))


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_misuse(net_engines, rng, tp):
    transport, streams = tp
    a, dst, h, b, p = pair(net_engines, transport, streams, size=SIZE)
    src = b.alloc(LSIZE)
    ok = [(0, 0, 16)]
    # A handle of another engine (same key space, other id).
    c = net_engines("other")
    hc = c.expose(c.alloc(SIZE))
    with pytest.raises(ValueError, match="engine"):
        p.write(src, hc, ok)
    # The same key with a forged engine id is refused, too.
    forged = h.to_bytes()[:24] + bytes(16) + h.to_bytes()[40:]
    with pytest.raises(ValueError, match="engine"):
        p.write(src, forged, ok)
    # Read-only exposure.
    ro = a.expose(a.alloc(4096), writable=False)
    assert not ro.writable
    with pytest.raises(ValueError, match="read-only"):
        p.write(src, ro, ok)
    # A read-only buffer cannot be exposed writable.
    with pytest.raises(ValueError, match="read-only"):
        a.expose(a.register(b"\0" * 4096), writable=True)
    # Notification size: 64 KiB allowed, one byte more refused; str refused.
    with pytest.raises(ValueError, match="65537"):
        p.write(src, h, ok, notify=b"x" * (64 * 1024 + 1))
    with pytest.raises(TypeError):
        p.write(src, h, ok, notify="text")
    big = bytes(rng.integers(0, 256, 64 * 1024, dtype=np.uint8))
    assert net_engines.write(p, src, h, ok, notify=big, timeout_s=30).result(30) == 16
    n = a.next_notification(timeout_s=10)
    assert n.data == big
    # Other arguments.
    with pytest.raises(ValueError, match="unknown traffic class 'gold'"):
        p.write(src, h, ok, traffic_class="gold")
    with pytest.raises(TypeError, match="traffic_class"):
        p.write(src, h, ok, traffic_class=4)
    with pytest.raises(TypeError, match="src"):
        p.write(np.zeros(16, np.uint8), h, ok)
    with pytest.raises(ValueError, match="handle"):
        p.write(src, b"garbage", ok)
    with pytest.raises(ValueError, match="timeout"):
        p.write(src, h, ok, timeout_s=-1)
    assert a.next_notification(timeout_s=0.1) is None
    assert p.broken is None


def test_connect_arguments(net_engines):
    a = net_engines("recv")
    b = net_engines("send")
    md = a.metadata()
    with pytest.raises(ValueError, match="transport"):
        b.connect(md, transport="udp")
    with pytest.raises(ValueError, match="streams"):
        b.connect(md, transport="tcp", streams=0)
    with pytest.raises(ValueError, match="streams"):
        b.connect(md, transport="tcp", streams=17)
    with pytest.raises(ValueError, match="timeout"):
        b.connect(md, transport="tcp", timeout_s=0)
    with pytest.raises(TypeError, match="bytes"):
        b.connect(md.hex())
    with pytest.raises(dpmove.UnsupportedOperation):
        b.connect(md, transport="verbs")
    assert a.net_stats().get("connections", 0) == 0
    # An engine connecting to itself works (loopback), and closed engines refuse.
    p = a.connect(md, transport="tcp")
    assert p.broken is None
    p.close()
    assert p.closed and p.broken
    with pytest.raises(ValueError, match="closed"):
        p.write(a.alloc(16), a.expose(a.alloc(16)), [(0, 0, 16)])
    b.close()
    with pytest.raises(ValueError, match="closed"):
        b.connect(md)


def warm(ne, p, b, hb) -> None:
    """One small write while the receiver runs (shm maps the region on first use)."""
    assert ne.write(p, b.alloc(4096), hb, [(0, 0, 4096)], timeout_s=30).result(30) == 4096


# --- the receiver dies -----------------------------------------------------------------------


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_receiver_killed_mid_batch(net_engines, children, tp):
    """SIGSTOP then SIGKILL of the receiving process while a 256 MiB batch is half sent (tcp) or
    copied but not acknowledged (shm): both requests fail naming the peer, well within their
    deadline; the peer stays broken until reconnect, which fails while the peer is gone."""
    transport, streams = tp
    size = 256 << 20
    child, md, hb = spawn_receiver(children, size, name="victim-recv")
    b = net_engines("send")
    p = b.connect(md, transport=transport, streams=streams)
    src = b.alloc(16 << 20)
    idx = np.arange(size // (1 << 20), dtype=np.int64) << 20
    batch = dpmove.entries(idx, idx % (16 << 20), 1 << 20)
    warm(net_engines, p, b, hb)
    child.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    r1 = net_engines.write(p, src, hb, batch, notify=b"1", timeout_s=20)
    r2 = net_engines.write(p, src, hb, batch[:4], notify=b"2", timeout_s=20)
    time.sleep(0.2)  # let the sender fill the socket buffers (not synchronisation: either way works)
    assert r1.state == dpmove.RequestState.PENDING
    child.signal(signal.SIGKILL)
    child.proc.wait(10)
    for r in (r1, r2):
        assert finished(r, 20) == FAILED, r
        with pytest.raises(dpmove.Error) as info:
            r.check()
        assert "victim-recv" in str(info.value), str(info.value)
        st = r.status
        assert (st < 0).all(), st
        assert r.bytes.sum() == 0
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"failing the requests took {elapsed:.1f} s"
    assert p.broken and "victim-recv" in p.broken, p.broken
    with pytest.raises(dpmove.Error, match="reconnect") as info:
        p.write(src, hb, batch[:1])
    assert info.value.errno == errno.ENOTCONN
    with pytest.raises(dpmove.Error) as info:
        p.reconnect()
    assert info.value.errno == errno.ECONNREFUSED, info.value
    assert "victim-recv" in str(info.value)
    with pytest.raises(dpmove.Error):
        b.connect(md, transport=transport)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_writer_killed_mid_batch(net_engines, children, transport):
    """SIGKILL of a writing process while its 4 GiB batch (1M x 4 KiB) is in progress: the receiver
    delivers no notification for it, counts it as not completed, and keeps serving others."""
    a = net_engines("recv")
    dsize = 64 << 20
    dst = a.alloc(dsize)
    h = a.expose(dst)
    md = a.metadata()
    w = children(
        "writer", WRITER, [md.hex(), h.to_bytes().hex(), transport, 4096, 1 << 20, 1 << 16, dsize]
    )
    assert w.line(60) == "ready"
    assert w.ask("write killed") == "posted"
    w.signal(signal.SIGKILL)
    w.proc.wait(10)
    # The receiver notices the connection end; then nothing for that request, ever.
    assert a.next_notification(timeout_s=1.0) is None, "notification of a partially written request"
    st = a.net_stats()
    assert st.get("requests_completed", 0) == 0, st
    assert st.get("notifications_delivered", 0) == 0, st
    # Another peer is served normally.
    b = net_engines("good")
    p = b.connect(md, transport=transport)
    src = b.alloc(8192)
    src.numpy()[:] = np.arange(8192) % 251
    r = net_engines.write(p, src, h, [(0, 0, 8192)], notify=b"good", timeout_s=30)
    assert r.result(30) == 8192
    n = a.next_notification(timeout_s=10)
    assert n is not None and n.data == b"good" and n.peer == "good"
    assert np.array_equal(dst.numpy()[:8192], src.numpy())
    assert a.next_notification(timeout_s=0.2) is None


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_peer_restart(net_engines, children, transport):
    """The receiver restarts on the same tcp port: the old metadata is refused with ESTALE (tcp)
    or connection refused (shm: the old engine's unix name is gone); new metadata and handle
    work; the old handle is refused by the new peer before anything is sent."""
    size = 1 << 20
    c1, md1, h1 = spawn_receiver(children, size, name="gen1")
    port = int(dpmove.parse_metadata(md1)["tcp"][0].rsplit(":", 1)[1])
    b = net_engines("send")
    p1 = b.connect(md1, transport=transport)
    src = b.alloc(size)
    src.numpy()[:] = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    assert net_engines.write(p1, src, h1, [(0, 0, size)], timeout_s=30).result(30) == size
    c1.signal(signal.SIGKILL)
    c1.proc.wait(10)
    # The old peer notices (no request needed): bounded polling.
    wait_for(lambda: p1.broken, 10, "the old peer to notice the receiver died")

    c2, md2, h2 = spawn_receiver(children, size, name="gen2", port=port)
    assert dpmove.parse_metadata(md2)["tcp"] == dpmove.parse_metadata(md1)["tcp"]
    with pytest.raises(dpmove.Error) as info:
        b.connect(md1, transport=transport)
    if transport == "tcp":
        assert info.value.errno == errno.ESTALE, info.value
        assert "restarted" in str(info.value)
    else:
        assert info.value.errno == errno.ECONNREFUSED, info.value
    with pytest.raises(dpmove.Error) as info:
        p1.reconnect()
    assert info.value.errno in (errno.ESTALE, errno.ECONNREFUSED)

    p2 = b.connect(md2, transport=transport)
    assert p2.transport == transport
    with pytest.raises(ValueError, match="stale"):
        p2.write(src, h1, [(0, 0, 16)])
    r = net_engines.write(p2, src, h2, [(0, 0, size)], notify=b"gen2", timeout_s=30)
    assert r.result(30) == size
    assert c2.ask(f"sha 0 {size}") == hashlib.sha256(src.numpy().tobytes()).hexdigest()
    got = c2.ask("note 5")
    assert '"data": "%s"' % b"gen2".hex() in got, got


# --- stalls, deadlines, cancel, close --------------------------------------------------------


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_deadline_while_receiver_stopped(net_engines, children, tp):
    """SIGSTOP of the receiver: a big tcp batch (or a small shm one) with a 1 s deadline ends
    TIMED_OUT within the deadline plus a margin, and quiesces."""
    transport, streams = tp
    size = 256 << 20 if transport == "tcp" else 1 << 20
    child, md, hb = spawn_receiver(children, size, name="stopped")
    b = net_engines("send")
    p = b.connect(md, transport=transport, streams=streams)
    src = b.alloc(min(size, 16 << 20))
    blk = 1 << 20 if transport == "tcp" else 4096
    idx = np.arange(size // blk, dtype=np.int64) * blk
    batch = dpmove.entries(idx, idx % len(src.numpy()), blk)
    warm(net_engines, p, b, hb)
    child.signal(signal.SIGSTOP)
    try:
        deadline = 1.0
        t0 = time.monotonic()
        r = net_engines.write(p, src, hb, batch, notify=b"late", timeout_s=deadline)
        state = r.wait(deadline + 5)
        t_end = time.monotonic() - t0
        assert state == TIMED_OUT, (state, r.status[:8])
        assert t_end < deadline + 1.0, f"ended {t_end:.2f} s after posting, deadline {deadline} s"
        assert r.wait_quiesced(5), "not quiesced"
        t_q = time.monotonic() - t0
        assert t_q < deadline + 2.0, f"quiesced {t_q:.2f} s after posting"
        st = r.status
        assert ((st == -errno.ETIMEDOUT) | (st == 0)).all() and (st == -errno.ETIMEDOUT).any(), np.unique(st)
        with pytest.raises(dpmove.TimedOut):
            r.check()
    finally:
        child.signal(signal.SIGCONT)
    # After SIGCONT the receiver must not deliver a notification for the timed-out request if
    # it was cut off (tcp reset the stalled stream); shm may finish it, since every byte landed.
    got = child.ask("note 1")
    if transport == "tcp":
        assert got == "null", got
        # The stalled stream was reset: broken until reconnect(), which works (same engine).
        assert p.broken and "stalled" in p.broken, p.broken
        with pytest.raises(dpmove.Error, match="reconnect"):
            p.write(src, hb, batch[:1])
        p.reconnect()
    assert p.broken is None
    s = src.numpy()
    s[:4096] = np.arange(4096) % 249
    r = net_engines.write(p, src, hb, [(0, 0, 4096)], notify=b"again", timeout_s=30)
    assert r.result(30) == 4096
    assert child.ask("sha 0 4096") == hashlib.sha256(s[:4096].tobytes()).hexdigest()
    assert b"again".hex() in child.ask("note 5")


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_cancel_running_request(net_engines, children, tp):
    transport, streams = tp
    size = 64 << 20
    child, md, hb = spawn_receiver(children, size, name="slow")
    b = net_engines("send")
    p = b.connect(md, transport=transport, streams=streams)
    src = b.alloc(size)
    warm(net_engines, p, b, hb)
    child.signal(signal.SIGSTOP)
    try:
        r = net_engines.write(p, src, hb, [(0, 0, size)], notify=b"cancelled", timeout_s=30)
        assert r.state == dpmove.RequestState.PENDING
        wait_for(lambda: r.in_flight > 0, 10, "the entry to be handed to the stream")  # running, not queued
        t0 = time.monotonic()
        r.cancel()
        assert r.wait(5) == dpmove.RequestState.CANCELLED
        assert r.wait_quiesced(5)
        assert time.monotonic() - t0 < 3
        assert r.status[0] == -errno.ECANCELED, r.status
        with pytest.raises(dpmove.Cancelled):
            r.result(timeout_s=1)
    finally:
        child.signal(signal.SIGCONT)


@pytest.mark.parametrize("tp", TRANSPORTS)
@pytest.mark.parametrize("what", ["peer", "engine"])
def test_close_with_requests_in_flight(net_engines, children, tp, what):
    transport, streams = tp
    size = 64 << 20
    child, md, hb = spawn_receiver(children, size, name="stuck")
    b = net_engines("send")
    p = b.connect(md, transport=transport, streams=streams)
    src = b.alloc(size)
    warm(net_engines, p, b, hb)
    child.signal(signal.SIGSTOP)
    try:
        reqs = [net_engines.write(p, src, hb, [(0, 0, size)], notify=b"x", timeout_s=60)]
        reqs += [net_engines.write(p, src, hb, [(k * 4096, 0, 4096)], timeout_s=60) for k in range(8)]
        t0 = time.monotonic()
        if what == "peer":
            p.close()
        else:
            b.close(timeout_s=10)
        for r in reqs:
            assert r.wait(5) == FAILED, r
            assert r.wait_quiesced(5), r
            st = r.status
            assert (st == -errno.ECONNABORTED).all(), np.unique(st)
        assert time.monotonic() - t0 < 5
        assert p.broken
        with pytest.raises((ValueError, dpmove.Error), match="closed"):
            p.write(src, hb, [(0, 0, 1)])
    finally:
        child.signal(signal.SIGCONT)


@pytest.mark.parametrize("tp", TRANSPORTS)
def test_receiver_engine_closed_with_requests_in_flight(net_engines, tp):
    """The receiving Engine closes (in this process) while 1 GiB of requests are queued to it:
    every request ends - done, or failed with an error naming the receiver - within bounds, and
    the writer's peer is broken afterwards."""
    transport, streams = tp
    a, dst, h, b, p = pair(net_engines, transport, streams, size=64 << 20)
    src = b.alloc(64 << 20)
    reqs = [net_engines.write(p, src, h, [(0, 0, 64 << 20)], notify=b"%d" % i, timeout_s=60) for i in range(16)]
    t0 = time.monotonic()
    a.close(timeout_s=10)
    for r in reqs:
        state = finished(r, 15)
        if state != dpmove.RequestState.DONE:
            assert state == FAILED, r
            assert (r.status < 0).all(), r.status
            with pytest.raises(dpmove.Error) as info:
                r.check()
            assert "'recv'" in str(info.value), str(info.value)
    assert time.monotonic() - t0 < 15
    assert any(r.state == FAILED for r in reqs), "all 1 GiB landed before close returned?"
    wait_for(lambda: p.broken, 10, "the writer to notice the receiver closed")
    assert "'recv'" in p.broken, p.broken
    with pytest.raises(dpmove.Error):
        p.reconnect()
