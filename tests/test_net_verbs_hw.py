"""The verbs transport on a real RDMA device, between two processes.

Skipped, with the reason libibverbs gives, where no device is usable (no RDMA NIC, no
ib_uverbs, libibverbs1 missing). Device and GID choice follow the transport's environment
variables: DPMOVE_VERBS_DEVICE ("mlx5_0" or "mlx5_0:1"), DPMOVE_VERBS_GID_INDEX (RoCE v2
usually needs the index of the IPv4-mapped v2 GID), DPMOVE_TEST_VERBS_HOST (the address the
receiver listens on for the control connection; default 127.0.0.1).

Two receivers:
  - a dpmove Engine in a child process (the transport's own responder);
  - where rdma-core's Python bindings (pyverbs) import, an independent responder written here
    with pyverbs that speaks the verbs control protocol (see cpp/src/net_verbs.cc) from the
    wire description alone, registers its own buffer and reports a SHA-256 of what landed.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import struct
import subprocess
import sys
import textwrap
from typing import List, Optional, Tuple

import numpy as np
import pytest

import dpmove
from dpmove import _core

HOST = os.environ.get("DPMOVE_TEST_VERBS_HOST", "127.0.0.1")
SIZE = 16 << 20


def real_device() -> Tuple[bool, str]:
    if not hasattr(_core, "_verbs_set_provider"):
        return False, "dpmove was built without the verbs transport (no <infiniband/verbs.h>)"
    if os.environ.get("DPMOVE_VERBS") == "fake":
        return False, "DPMOVE_VERBS=fake selects the software HCA"
    prev = _core._verbs_provider()
    _core._verbs_set_provider("real")
    try:
        return _core.verbs_usable()
    finally:
        _core._verbs_set_provider("fake" if prev == "fake" else "real")


USABLE, WHY = real_device()
needs_device = pytest.mark.skipif(not USABLE, reason=f"no usable RDMA device: {WHY}")
pytestmark = [pytest.mark.rdma, pytest.mark.timeout(180)]


@pytest.fixture
def real_provider():
    prev = _core._verbs_provider()
    _core._verbs_set_provider("real")
    yield
    _core._verbs_set_provider("fake" if prev == "fake" else "real")


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("DPMOVE_VERBS", None)
    return env


def payload(seed: int) -> Tuple[np.ndarray, np.ndarray, bytes]:
    """Source bytes, entries (N, 3) and the SHA-256 of a zeroed SIZE-byte receiver after them."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, SIZE, dtype=np.uint8)
    n = 300
    lens = rng.integers(1, 40_000, n)
    slot = SIZE // n
    remote = np.arange(n) * slot + rng.integers(0, slot - lens + 1)
    local = rng.integers(0, SIZE - lens + 1)
    ent = np.stack([remote, local, lens], axis=1).astype(np.int64)
    expect = np.zeros(SIZE, dtype=np.uint8)
    for r, l, k in ent:
        expect[r : r + k] = src[l : l + k]
    return src, ent, hashlib.sha256(expect.tobytes()).digest()


RX_DPMOVE = textwrap.dedent(
    """
    import hashlib, sys
    import dpmove
    eng = dpmove.Engine(listen_host=sys.argv[1], name="hw-rx")
    r = eng.alloc(int(sys.argv[2]))
    h = eng.expose(r, writable=True)
    print(eng.metadata().hex(), h.to_bytes().hex(), flush=True)
    n = eng.next_notification(timeout_s=120)
    print(n.data.hex() if n else "none", hashlib.sha256(memoryview(r)).hexdigest(), flush=True)
    eng.close()
    """
)


@needs_device
def test_two_processes_real_device(real_provider) -> None:
    src_bytes, ent, digest = payload(1)
    rx = subprocess.Popen([sys.executable, "-c", RX_DPMOVE, HOST, str(SIZE)], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        md_hex, h_hex = rx.stdout.readline().split()
        tx = dpmove.Engine(name="hw-tx")
        src = tx.alloc(SIZE)
        np.frombuffer(src, dtype=np.uint8)[:] = src_bytes
        peer = tx.connect(bytes.fromhex(md_hex), transport="verbs", chain=32, signal_every=16)
        assert peer.transport == "verbs"
        req = peer.write(src, dpmove.RemoteRegion.from_bytes(bytes.fromhex(h_hex)), ent, notify=b"hw", timeout_s=30)
        req.wait()
        req.check()
        note_hex, got = rx.stdout.readline().split()
        assert bytes.fromhex(note_hex) == b"hw"
        assert got == digest.hex()
        st = peer.stats()
        assert st["post_calls"] == -(-st["wrs_posted"] // 32)
        peer.close()
        tx.close()
        assert rx.wait(30) == 0
    finally:
        rx.kill()


# ---- an independent receiver built on pyverbs ---------------------------------------------------

# Wire constants, restated from net_wire.h / net_verbs.cc rather than imported, so a change on
# one side shows up here.
FRAME = struct.Struct("<IHHIIQQQQ")  # magic, type, flags, key, aux, req, offset, length, extra
MAGIC = 0x464D5044
QPWIRE = struct.Struct("<IIHBB16sI")  # qpn, psn, lid, mtu, link_layer, gid, reserved
CHUNK = struct.Struct("<QQQII")  # offset, length, addr, rkey, reserved


def encode_metadata(engine_id: bytes, host: str, port: int, name: str) -> bytes:
    """Engine metadata (version 1 TLVs) naming a tcp endpoint, written from the format alone."""

    def tlv(t: int, v: bytes) -> bytes:
        return struct.pack("<HH", t, len(v)) + v

    body = b"".join(
        [
            tlv(1, engine_id),
            tlv(2, secrets.token_bytes(16)),  # another "host": the writer never picks shm
            tlv(3, struct.pack("<Q", 0)),
            tlv(4, struct.pack("<I", os.getpid())),
            tlv(5, struct.pack("<I", os.getuid())),
            tlv(6, socket.gethostname().encode()[:255]),
            tlv(7, name.encode()),
            tlv(8, struct.pack("<BBH", 4, 0, port) + socket.inet_aton(host)),
        ]
    )
    head = b"DPMVMETA" + struct.pack("<HHI", 1, 0, 16 + len(body))
    return head + body


def encode_handle(engine_id: bytes, key: int, size: int) -> bytes:
    return b"DPMH" + struct.pack("<HHIIQ", 1, 1, key, 0, size) + engine_id + struct.pack("<Q", 0)


def test_independent_peer_encodings_parse() -> None:
    """The pyverbs receiver's metadata and handle bytes are what dpmove accepts (no device needed)."""
    eid = secrets.token_bytes(16)
    md = dpmove.parse_metadata(encode_metadata(eid, "127.0.0.1", 4711, "pyverbs-rx"))
    assert md["engine_id"] == eid.hex() and md["name"] == "pyverbs-rx"
    assert "127.0.0.1:4711" in str(md["tcp"])
    h = dpmove.RemoteRegion.from_bytes(encode_handle(eid, 7, SIZE))
    assert h.key == 7 and h.size == SIZE and h.writable


RX_PYVERBS = textwrap.dedent(
    r"""
    import hashlib, os, select, socket, struct, sys
    import pyverbs.enums as e
    from pyverbs.addr import AHAttr, GID, GlobalRoute
    from pyverbs.cq import CQ
    from pyverbs.device import Context, get_device_list
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import RecvWR

    FRAME = struct.Struct("<IHHIIQQQQ"); MAGIC = 0x464D5044
    QPWIRE = struct.Struct("<IIHBB16sI"); CHUNK = struct.Struct("<QQQII")
    host, size = sys.argv[1], int(sys.argv[2])
    want = os.environ.get("DPMOVE_VERBS_DEVICE", "")
    want_dev, _, want_port = want.partition(":")
    port = int(want_port or 1)
    gid_index = int(os.environ.get("DPMOVE_VERBS_GID_INDEX", "0"))
    devs = [d for d in get_device_list() if not want_dev or d.name.decode() == want_dev]
    ctx = Context(name=devs[0].name.decode())
    pattr = ctx.query_port(port)
    gid = ctx.query_gid(port, gid_index)
    gid_bytes = bytes.fromhex(gid.gid.replace(":", ""))
    eth = pattr.link_layer == e.IBV_LINK_LAYER_ETHERNET
    pd = PD(ctx)
    mr = MR(pd, size, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
    mr.write(b"\0" * size, size)
    cq = CQ(ctx, 4096)
    ls = socket.socket(); ls.bind((host, 0)); ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept()

    def recv_exact(n):
        b = b""
        while len(b) < n:
            x = c.recv(n - len(b))
            if not x:
                sys.exit("sender closed the control connection")
            b += x
        return b

    def recv_frame():
        f = FRAME.unpack(recv_exact(FRAME.size))
        assert f[0] == MAGIC
        return f, recv_exact(f[7])

    def send_frame(typ, key=0, aux=0, req=0, offset=0, flags=0, extra=0, trailer=b""):
        c.sendall(FRAME.pack(MAGIC, typ, flags, key, aux, req, offset, len(trailer), extra) + trailer)

    f, body = recv_frame()
    assert f[1] == 1 and f[3] == 4, f  # HELLO on Channel::kVerbs
    send_frame(2)  # HELLO_OK
    qps, by_qpn, notes, arrived = {}, {}, {}, set()
    psn = 0x4242
    while True:
        r, _, _ = select.select([c], [], [], 0.001)
        if r:
            f, t = recv_frame()
            op = f[3]
            if op == 1:
                tc = f[4]
                qpn, rpsn, lid, mtu, _ll, rgid, _ = QPWIRE.unpack(t)
                cap = QPCap(max_send_wr=1, max_recv_wr=256, max_send_sge=1, max_recv_sge=1)
                qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap))
                a = QPAttr()
                a.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
                a.port_num = port
                a.pkey_index = 0
                qp.to_init(a)
                for _ in range(256):
                    qp.post_recv(RecvWR(wr_id=tc, num_sge=0))
                a.path_mtu = min(pattr.active_mtu, mtu)
                a.dest_qp_num = qpn
                a.rq_psn = rpsn
                a.max_dest_rd_atomic = 1
                a.min_rnr_timer = 12
                dg = GID(); dg.gid = ":".join(rgid.hex()[i:i + 4] for i in range(0, 32, 4))
                gr = GlobalRoute(dgid=dg, sgid_index=gid_index, hop_limit=64, traffic_class=tc << 5)
                a.ah_attr = AHAttr(dlid=lid, sl=tc, port_num=port, is_global=1 if eth else 0, grh=gr)
                qp.to_rtr(a)
                a.sq_psn = psn; a.timeout = 14; a.retry_cnt = 7; a.rnr_retry = 7; a.max_rd_atomic = 1
                qp.to_rts(a)
                qps[tc] = qp; by_qpn[qp.qp_num] = qp
                mine = QPWIRE.pack(qp.qp_num, psn, pattr.lid, pattr.active_mtu, pattr.link_layer, gid_bytes, 0)
                send_frame(10, key=1, aux=tc, req=f[5], trailer=mine)
            elif op == 2:
                send_frame(10, key=2, req=f[5], offset=size, aux=1, flags=1, trailer=CHUNK.pack(0, size, mr.buf, mr.rkey, 0))
            elif op == 3:
                notes[f[4]] = t
            else:
                sys.exit("unknown op %d" % op)
        n, wcs = cq.poll(16)
        for wc in wcs[:n]:
            if wc.status != e.IBV_WC_SUCCESS:
                sys.exit("receive completion failed: status %d" % wc.status)
            if wc.opcode == e.IBV_WC_RECV_RDMA_WITH_IMM:
                arrived.add(socket.ntohl(wc.imm_data))
            by_qpn[wc.qp_num].post_recv(RecvWR(wr_id=wc.wr_id, num_sge=0))
        done = arrived & set(notes)
        if done:
            imm = done.pop()
            print(notes[imm].hex(), hashlib.sha256(mr.read(size, 0)).hexdigest(), flush=True)
            break
    """
)


def pyverbs_python() -> Optional[str]:
    for exe in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(exe) and subprocess.run([exe, "-c", "import pyverbs.device"], capture_output=True).returncode == 0:
            return exe
    return None


@needs_device
def test_pyverbs_peer_checks_what_landed(real_provider) -> None:
    exe = pyverbs_python()
    if exe is None:
        pytest.skip("pyverbs (Debian python3-pyverbs) is not importable")
    src_bytes, ent, digest = payload(2)
    rx = subprocess.Popen([exe, "-c", RX_PYVERBS, HOST, str(SIZE)], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        port = int(rx.stdout.readline())
        eid = secrets.token_bytes(16)
        tx = dpmove.Engine(name="hw-tx")
        src = tx.alloc(SIZE)
        np.frombuffer(src, dtype=np.uint8)[:] = src_bytes
        peer = tx.connect(encode_metadata(eid, HOST, port, "pyverbs-rx"), transport="verbs")
        h = dpmove.RemoteRegion.from_bytes(encode_handle(eid, 1, SIZE))
        req = peer.write(src, h, ent, notify=b"pyverbs", timeout_s=30, traffic_class="control")
        req.wait()
        req.check()
        note_hex, got = rx.stdout.readline().split()
        assert bytes.fromhex(note_hex) == b"pyverbs"
        assert got == digest.hex()
        peer.close()
        tx.close()
        assert rx.wait(30) == 0
    finally:
        rx.kill()
