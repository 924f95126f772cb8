"""tcp between network namespaces: the receiver runs in its own namespace (`ip netns` + a veth
pair), listening on its veth address; the writer in the root namespace connects with `auto`,
which must pick tcp (abstract unix sockets do not cross namespaces), and the bytes must land.

Needs root and iproute2; skipped only when `ip` is missing or namespace creation is refused
with EPERM (the reason is in the skip message).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import subprocess

import numpy as np
import pytest

import dpmove
from test_net_support import children, net_engines, spawn_receiver  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def sh(*cmd: str, ns: str | None = None) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns(request):
    """(namespace name, receiver address inside it, root-side address)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    tag = secrets.token_hex(3)
    ns, va, vb = f"dpmove-{tag}", f"dpa{tag}", f"dpb{tag}"
    net = 10 + secrets.randbelow(240)
    outer, inner = f"10.213.{net}.1", f"10.213.{net}.2"
    r = sh("ip", "netns", "add", ns)
    if r.returncode != 0:
        if "Operation not permitted" in r.stderr or "EPERM" in r.stderr:
            pytest.skip(f"cannot create a network namespace here (EPERM): {r.stderr.strip()}")
        raise AssertionError(f"ip netns add {ns} failed: {r.stderr}")

    def cleanup():
        sh("ip", "netns", "del", ns)
        sh("ip", "link", "del", va)  # gone with the namespace normally

    request.addfinalizer(cleanup)
    for cmd, where in [
        (["ip", "link", "add", va, "type", "veth", "peer", "name", vb], None),
        (["ip", "link", "set", vb, "netns", ns], None),
        (["ip", "addr", "add", f"{outer}/24", "dev", va], None),
        (["ip", "link", "set", va, "up"], None),
        (["ip", "addr", "add", f"{inner}/24", "dev", vb], ns),
        (["ip", "link", "set", vb, "up"], ns),
        (["ip", "link", "set", "lo", "up"], ns),
    ]:
        r = sh(*cmd, ns=where)
        assert r.returncode == 0, f"{' '.join(cmd)} (netns {where}) failed: {r.stderr}"
    return ns, inner, outer


@pytest.mark.parametrize("streams", [1, 4])
def test_tcp_across_namespaces(net_engines, children, netns, streams):
    ns, inner, outer = netns
    size = (48 << 20) + 12345
    child, md, hb = spawn_receiver(children, size, host=inner, name="in-netns", prefix=["ip", "netns", "exec", ns])
    d = dpmove.parse_metadata(md)
    assert d["tcp"] == [f"{inner}:{d['tcp'][0].rsplit(':', 1)[1]}"], d
    assert d["netns"] != os.stat("/proc/self/ns/net").st_ino
    b = net_engines("root-ns")
    with pytest.raises(dpmove.UnsupportedOperation, match="namespace") as info:
        b.connect(md, transport="shm")
    assert info.value.errno == errno.EXDEV
    p = b.connect(md, streams=streams)  # auto
    assert p.transport == "tcp", p
    rng = np.random.default_rng(streams)
    src = b.alloc(size)
    s = src.numpy()
    s[:] = np.frombuffer(rng.bytes(size), dtype=np.uint8)
    # Scattered, odd-sized entries covering the region exactly once, in shuffled order.
    cuts = np.unique(np.concatenate([[0, size], rng.integers(1, size, 300)]))
    starts, lens = cuts[:-1], np.diff(cuts)
    perm = rng.permutation(len(starts))
    batch = dpmove.entries(starts[perm], starts[perm], lens[perm])
    r = net_engines.write(p, src, hb, batch, notify=b"across", timeout_s=60)
    assert r.result(timeout_s=60) == size
    assert (r.status == 0).all()
    note = child.ask("note 10")
    assert b"across".hex() in note and "root-ns" in note, note
    assert child.ask(f"sha 0 {size}") == hashlib.sha256(s.tobytes()).hexdigest()
    # A second write of different bytes to part of it, then the whole region checked again.
    s[1000:5000] ^= 0xFF
    r = net_engines.write(p, src, hb, [(1000, 1000, 4000)], timeout_s=30)
    assert r.result(30) == 4000
    assert child.ask(f"sha 0 {size}") == hashlib.sha256(s.tobytes()).hexdigest()
    assert child.ask("note 0.2") == "null"
    stats = child.ask("stats")
    counts = json.loads(stats)
    assert counts["writes_refused"] == 0 and counts["protocol_errors"] == 0, counts


def test_unreachable_listener_is_reported(net_engines, children, netns):
    """A receiver that listens on loopback inside the namespace advertises only 127.0.0.1,
    which from the root namespace is not it: the connect fails (refused or stale), it does not
    reach some other engine."""
    ns, inner, outer = netns
    child, md, hb = spawn_receiver(children, 4096, host="127.0.0.1", name="ns-loopback", prefix=["ip", "netns", "exec", ns])
    b = net_engines("root-ns")
    with pytest.raises(dpmove.Error) as info:
        b.connect(md, timeout_s=2)
    assert info.value.errno in (errno.ECONNREFUSED, errno.ESTALE, errno.ETIMEDOUT), info.value
    assert "ns-loopback" in str(info.value)
