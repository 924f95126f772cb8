"""Regressions found by review: lock order against the GIL, shm mappings after unexpose."""

from __future__ import annotations

import errno
import signal
import threading
import time

import numpy as np
import pytest

import dpmove
from test_net_support import children, net_engines, pair, spawn_receiver  # noqa: F401 (fixtures)


@pytest.mark.timeout(120)
def test_reconnect_while_another_thread_polls_with_buffers_in_flight(net_engines, children):  # noqa: F811
    """reconnect() shuts the old transport down (joining its threads); its last thread drops the
    last reference to requests whose sources are registered numpy buffers, whose release needs
    the GIL. Another thread meanwhile holds the GIL and asks the peer for its state. Neither may
    wait for the other: reconnect must return (here: fail to reach a stopped receiver) and the
    polling thread must keep running."""
    child, md, hb = spawn_receiver(children, 64 << 20, name="stopped")
    b = net_engines("send")
    p = b.connect(md, transport="tcp", timeout_s=2)
    child.signal(signal.SIGSTOP)
    try:
        reqs = []
        for _ in range(4):
            buf = np.ones(16 << 20, np.uint8)
            reqs.append(p.write(b.register(buf), hb, [(0, 0, 16 << 20)], timeout_s=60))
            del buf
        time.sleep(0.3)
        stop = threading.Event()
        polls = [0]

        def spin() -> None:
            while not stop.is_set():
                _ = p.broken, p.transport, p.stats()
                polls[0] += 1

        t = threading.Thread(target=spin, daemon=True)
        t.start()
        t0 = time.monotonic()
        with pytest.raises(dpmove.Error) as info:
            p.reconnect()  # the receiver is stopped: the handshake times out after 2 s
        assert info.value.errno == errno.ETIMEDOUT, info.value
        assert time.monotonic() - t0 < 30
        before = polls[0]
        time.sleep(0.2)
        assert polls[0] > before, "the polling thread is stuck"
        stop.set()
        t.join(10)
        assert not t.is_alive()
        for r in reqs:
            assert r.wait_quiesced(10)
            assert r.state == dpmove.RequestState.FAILED
            assert (r.status == -errno.ECONNABORTED).all(), r.status
    finally:
        child.signal(signal.SIGCONT)


def test_shm_mapping_dropped_after_unexpose(net_engines):  # noqa: F811
    """shm writers copy straight into the receiver's memory, so unexpose() cannot stop a copy
    already under way or the next one from a writer that mapped the region: that write fails
    with -ENOENT (no notification) and the writer drops its mapping. Every later write is
    refused before any byte moves."""
    a, dst, h, b, p = pair(net_engines, "shm", 1, size=1 << 16)
    src = b.alloc(1 << 16)
    src.numpy()[:] = 0x11
    assert p.write(src, h, [(0, 0, 4096)], timeout_s=10).result(10) == 4096
    a.unexpose(h)
    r = p.write(src, h, [(0, 0, 4096)], notify=b"x", timeout_s=10)
    r.wait(10)
    assert r.state == dpmove.RequestState.FAILED and r.status[0] == -errno.ENOENT
    dst.numpy()[:] = 0  # the receiver reuses the memory
    src.numpy()[:] = 0xEE
    with pytest.raises(dpmove.Error) as info:
        p.write(src, h, [(0, 0, 4096)], notify=b"y", timeout_s=10)
    assert info.value.errno == errno.ENOENT
    assert not dst.numpy().any(), "a write after the refusal reached the reused memory"
    assert a.next_notification(timeout_s=0.2) is None
