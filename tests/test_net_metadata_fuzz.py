"""Untrusted bytes: metadata blobs, region handles and raw frames on the receiver's tcp port.

Whatever arrives, the answer is an exception with a message (ValueError / TypeError /
dpmove.Error) or a refusal on the wire - never a crash, a hang, or a byte written where the
receiver did not allow it. The raw-socket tests speak the wire format of
cpp/include/dpmove/net_wire.h (48-byte little-endian Frame, 96-byte HelloBody).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dpmove

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
REFUSED = (ValueError, TypeError, dpmove.Error)


@pytest.fixture(scope="module")
def world():
    """A receiver with an exposed region and a writer; shared by the fuzz tests of this file."""
    a = dpmove.Engine(name="fuzz-recv")
    b = dpmove.Engine(name="fuzz-send")
    dst = a.alloc(1 << 16)
    h = a.expose(dst)
    md = a.metadata()
    yield a, b, dst, h, md
    b.close()
    a.close()


def check_refused(fn, *args, **kw):
    """fn must either succeed or raise one of REFUSED with a non-empty message."""
    try:
        return fn(*args, **kw)
    except REFUSED as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return None


# --- metadata --------------------------------------------------------------------------------


def tlv(t: int, v: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HH", t, len(v) if length is None else length) + v


def blob(fields: bytes, total: int | None = None, version: int = 1) -> bytes:
    n = 16 + len(fields)
    return b"DPMVMETA" + struct.pack("<HHI", version, 0, n if total is None else total) + fields


def fields_of(md: bytes):
    out, off = [], 16
    while off < len(md):
        t, n = struct.unpack_from("<HH", md, off)
        out.append((t, md[off + 4 : off + 4 + n]))
        off += 4 + n
    return out


def test_valid_metadata_roundtrip(world):
    a, b, dst, h, md = world
    d = dpmove.parse_metadata(md)
    assert d["name"] == "fuzz-recv" and d["pid"] == os.getpid() and d["tcp"]
    # Rebuilt from its own fields, it parses the same; unknown fields are skipped.
    assert dpmove.parse_metadata(blob(b"".join(tlv(t, v) for t, v in fields_of(md)))) == d
    assert dpmove.parse_metadata(blob(b"".join(tlv(t, v) for t, v in fields_of(md)) + tlv(999, b"future"))) == d


def test_every_truncation(world):
    a, b, dst, h, md = world
    for n in range(len(md)):
        with pytest.raises(ValueError, match="metadata") as info:
            dpmove.parse_metadata(md[:n])
        assert str(info.value)
        with pytest.raises(ValueError):
            b.connect(md[:n], timeout_s=1)
    # A truncation whose header length was patched to match is refused for the cut field.
    for n in range(17, len(md)):
        cut = bytearray(md[:n])
        cut[12:16] = struct.pack("<I", n)
        check_refused(dpmove.parse_metadata, bytes(cut))


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(world, data):
    a, b, dst, h, md = world
    with pytest.raises(ValueError, match="metadata"):
        dpmove.parse_metadata(data)
    with pytest.raises(ValueError):
        b.connect(data, timeout_s=0.5)


@FUZZ
@given(st.data())
def test_single_byte_mutation(world, data):
    a, b, dst, h, md = world
    i = data.draw(st.integers(0, len(md) - 1), label="index")
    v = data.draw(st.integers(0, 255).filter(lambda x: x != md[i]), label="byte")
    m = bytearray(md)
    m[i] = v
    d = check_refused(dpmove.parse_metadata, bytes(m))
    if d is None:
        return
    assert isinstance(d, dict)
    # Parsed: connecting (tcp, short timeout) either works or fails with an error - in time.
    t0 = time.monotonic()
    p = check_refused(b.connect, bytes(m), transport="tcp", timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    if p is not None:
        p.close()


HOSTILE = [
    pytest.param(blob(tlv(1, b"\0" * 16, 0xFFFF)), "claims", id="len-ffff"),
    pytest.param(blob(tlv(1, b"\0" * 16, 17)), "claims", id="len-one-past-end"),
    pytest.param(blob(tlv(1, b"\0" * 15)), "engine id", id="engine-id-short"),
    pytest.param(blob(tlv(1, b"\0" * 16) + b"\x02\x00"), "cut off", id="field-header-cut"),
    pytest.param(blob(tlv(8, b"\x04\x00\x01\x00")), "IPv4 endpoint is 4 bytes", id="tcp-4-bytes"),
    pytest.param(blob(tlv(8, b"\x04\x00\x01\x00" + b"\x7f\0\0\x01" + b"\0" * 12)), "IPv4", id="ipv4-long"),
    pytest.param(blob(tlv(8, b"\x05\x00\x01\x00\x7f\0\0\x01")), "family", id="tcp-family-5"),
    pytest.param(blob(tlv(8, b"\x04\x00\x00\x00\x7f\0\0\x01")), "port 0", id="tcp-port-0"),
    pytest.param(blob(tlv(10, b"\x01" * 19)), "verbs", id="verbs-short"),
    pytest.param(blob(tlv(7, b"a" * 256)), "at most", id="name-too-long"),
    pytest.param(blob(tlv(7, b"ev\nil")), "control", id="name-control-byte"),
    pytest.param(blob(tlv(9, b"")), "unix", id="unix-empty"),
    pytest.param(blob(tlv(9, b"x" * 101)), "unix", id="unix-too-long"),
    pytest.param(blob(b"", total=10), "header says 10 bytes", id="total-short"),
    pytest.param(blob(tlv(2, b"\0" * 16), total=0xFFFFFFFF), "header says", id="total-huge"),
    pytest.param(blob(tlv(2, b"\0" * 16), version=2), "version", id="version-2"),
    pytest.param(blob(tlv(2, b"\0" * 16) + tlv(9, b"sock")), "engine id", id="no-engine-id"),
    pytest.param(blob(tlv(1, b"\1" * 16) + tlv(9, b"sock")), "host id", id="no-boot-id"),
    pytest.param(blob(tlv(1, b"\1" * 16) + tlv(2, b"\2" * 16)), "endpoint", id="no-endpoint"),
    pytest.param(
        blob(tlv(1, b"\1" * 16) + tlv(2, b"\2" * 16) + tlv(8, b"\x04\x00\x01\x00\x7f\0\0\x01") * 17), "16", id="17-tcp"
    ),
    pytest.param(
        blob(tlv(1, b"\1" * 16) + tlv(2, b"\2" * 16) + tlv(9, b"s") + tlv(100, b"\0" * 0xFFFF) * 2),
        "larger than",
        id="over-64k",
    ),
]


@pytest.mark.parametrize("md, match", HOSTILE)
def test_hostile_tlv(world, md, match):
    a, b, dst, h, good = world
    with pytest.raises(ValueError, match=match) as info:
        dpmove.parse_metadata(md)
    assert "invalid dpmove metadata" in str(info.value)
    with pytest.raises(ValueError):
        b.connect(md, timeout_s=0.5)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.binary(max_size=40), st.one_of(st.none(), st.integers(0, 0xFFFF))),
        max_size=12,
    ),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
def test_random_tlv_streams(world, fields, total):
    a, b, dst, h, md = world
    body = b"".join(tlv(t, v, n) for t, v, n in fields)
    m = blob(body, total)
    d = check_refused(dpmove.parse_metadata, m)
    if d is not None:
        p = check_refused(b.connect, m, transport="tcp", timeout_s=0.5)
        if p is not None:
            p.close()


def test_metadata_types(world):
    a, b, dst, h, md = world
    for bad in (None, 5, md.hex(), [1, 2]):
        with pytest.raises(TypeError):
            dpmove.parse_metadata(bad)
    assert dpmove.parse_metadata(bytearray(md)) == dpmove.parse_metadata(memoryview(md))


# --- handles ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=100))
def test_handle_random_bytes(world, data):
    a, b, dst, h, md = world
    try:
        r = dpmove.RemoteRegion.from_bytes(data)
    except ValueError as e:
        assert "remote handle" in str(e)
        return
    assert len(data) == 48 and data[:4] == b"DPMH"
    assert r.to_bytes()[:24] == data[:24]


@FUZZ
@given(st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=16))
def test_forged_handles_never_write_outside(world, flags, key, size, engine):
    """A well-formed handle with arbitrary fields: the writer's checks or the receiver's refuse
    anything outside the real exposure, and nothing lands outside [0, real size)."""
    a, b, dst, h, md = world
    if engine[0] & 1:  # half of them name the real engine
        engine = bytes.fromhex(h.engine_id)
    if key & 1:
        key = h.key
    raw = b"DPMH" + struct.pack("<HHII", 1, flags, key, 0) + struct.pack("<Q", size) + engine + bytes(8)
    fh = dpmove.RemoteRegion.from_bytes(raw)
    assert (fh.key, fh.size, fh.writable) == (key, size, bool(flags & 1))
    p = _tcp_peer(world)
    src = _src(world)
    real = h.size
    off = min(size, real + 100) - 16 if size >= 16 else 0
    d = dst.numpy()
    before = d.copy()
    try:
        r = p.write(src, fh, [(off, 0, min(16, size))], notify=b"forged", timeout_s=10)
    except REFUSED:
        assert np.array_equal(d, before)
        return
    r.wait(10)
    inside = key == h.key and engine == bytes.fromhex(h.engine_id) and off + min(16, size) <= real
    if inside:
        assert r.state == dpmove.RequestState.DONE, r.status
        assert a.next_notification(timeout_s=5).data == b"forged"
    else:
        assert r.state == dpmove.RequestState.FAILED, (r.state, r.status)
        assert r.status[0] in (-errno.ENOENT, -errno.ERANGE, -errno.EACCES), r.status
        assert np.array_equal(d, before)
        assert a.next_notification(timeout_s=0) is None


_cache: dict = {}


def _tcp_peer(world):
    a, b, dst, h, md = world
    p = _cache.get(("peer", id(b)))
    if p is None or p.broken:
        p = _cache[("peer", id(b))] = b.connect(md, transport="tcp")
    return p


def _src(world):
    a, b, dst, h, md = world
    s = _cache.get(("src", id(b)))
    if s is None:
        s = _cache[("src", id(b))] = b.alloc(4096)
        s.numpy()[:] = 0x5A
    return s


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_forged_handle_bigger_than_region(transport):
    """The writer believes a forged size; the receiver must still refuse past the real end."""
    with dpmove.Engine(name="r") as a, dpmove.Engine(name="w") as b:
        dst = a.alloc(8192)
        h = a.expose(dst)
        raw = bytearray(h.to_bytes())
        raw[16:24] = struct.pack("<Q", 1 << 30)
        fake = dpmove.RemoteRegion.from_bytes(bytes(raw))
        p = b.connect(a.metadata(), transport=transport)
        src = b.alloc(1 << 16)
        src.numpy()[:] = 0xEE
        if transport == "shm":
            with pytest.raises(dpmove.Error, match="handle says") as info:
                p.write(src, fake, [(8192, 0, 4096)], notify=b"no")
            assert info.value.errno == errno.EPROTO
        else:
            r = p.write(src, fake, [(0, 0, 16), (8192, 0, 4096), (4096, 0, 1 << 16)], notify=b"no", timeout_s=10)
            r.wait(10)
            assert r.state == dpmove.RequestState.FAILED
            np.testing.assert_array_equal(r.status, [0, -errno.ERANGE, -errno.ERANGE])
            assert (dst.numpy()[16:] == 0).all()
            assert a.net_stats()["writes_refused"] == 2
        assert a.next_notification(timeout_s=0.2) is None


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_forged_writable_flag_on_read_only_exposure(transport):
    """A handle of a read-only exposure with the writable bit set by the writer: the receiver
    refuses (-EACCES) and the region keeps its bytes, on tcp and on shm."""
    with dpmove.Engine(name="r") as a, dpmove.Engine(name="w") as b:
        dst = a.alloc(8192)
        dst.numpy()[:] = 0x11
        h = a.expose(dst, writable=False)
        assert not h.writable
        raw = bytearray(h.to_bytes())
        raw[6:8] = struct.pack("<H", struct.unpack("<H", raw[6:8])[0] | 1)
        fake = dpmove.RemoteRegion.from_bytes(bytes(raw))
        assert fake.writable
        p = b.connect(a.metadata(), transport=transport)
        src = b.alloc(8192)
        src.numpy()[:] = 0xEE
        try:
            r = p.write(src, fake, [(0, 0, 8192)], notify=b"no", timeout_s=10)
        except dpmove.Error as e:
            assert e.errno in (errno.EACCES, errno.EPERM), e
        else:
            r.wait(10)
            assert r.state == dpmove.RequestState.FAILED, r
            np.testing.assert_array_equal(r.status, [-errno.EACCES])
        assert (dst.numpy() == 0x11).all(), "a read-only exposure was written"
        assert a.next_notification(timeout_s=0.2) is None


# --- raw frames on the receiver's tcp port ---------------------------------------------------

FRAME = struct.Struct("<IHHIIQQQQ")  # magic type flags key aux req offset length extra
MAGIC = 0x464D5044
HELLO, HELLO_OK, ERROR, WRITE, END, ACK = 1, 2, 3, 4, 5, 6
END_NOTIFY, END_PRIMARY = 1, 4


def frame(type_, flags=0, key=0, aux=0, req=0, offset=0, length=0, extra=0, magic=MAGIC) -> bytes:
    return FRAME.pack(magic, type_, flags, key, aux, req, offset, length, extra)


def hello_body(server_id: bytes, client_id: bytes = b"\x42" * 16, name: bytes = b"raw") -> bytes:
    return server_id + client_id + name.ljust(64, b"\0")


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def read_frame(s: socket.socket):
    head = recv_exact(s, 48)
    if len(head) < 48:
        return None, b""
    f = FRAME.unpack(head)
    return f, recv_exact(s, f[7]) if 0 < f[7] < (1 << 24) else b""


class Raw:
    def __init__(self, md: bytes) -> None:
        d = dpmove.parse_metadata(md)
        host, port = d["tcp"][0].rsplit(":", 1)
        self.server = bytes.fromhex(d["engine_id"])
        self.s = socket.create_connection((host, int(port)), timeout=10)

    def hello(self, server=None, channel=1, stream=0, session=0x1234, streams=1):
        body = hello_body(self.server if server is None else server)
        self.s.sendall(frame(HELLO, key=channel, aux=stream, req=session, offset=streams, length=len(body)) + body)
        return read_frame(self.s)

    def closed_by_peer(self) -> bool:
        """True once the receiver closed the connection (EOF or reset) within the socket timeout."""
        try:
            while self.s.recv(1 << 16) != b"":
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.s.close()


@pytest.fixture
def raw_world():
    a = dpmove.Engine(name="raw-recv")
    b = dpmove.Engine(name="good")
    dst = a.alloc(1 << 16)
    rng = np.random.default_rng(1)
    dst.numpy()[:] = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    h = a.expose(dst)
    md = a.metadata()
    yield a, b, dst, h, md
    b.close()
    a.close()


def still_serves(a, b, dst, h, md, tag: bytes) -> None:
    p = b.connect(md, transport="tcp")
    src = b.alloc(4096)
    src.numpy()[:] = np.arange(4096) % 253
    r = p.write(src, h, [(4096, 0, 4096)], notify=tag, timeout_s=10)
    assert r.result(10) == 4096
    n = a.next_notification(timeout_s=5)
    assert n is not None and n.data == tag, n
    assert np.array_equal(dst.numpy()[4096:8192], src.numpy())
    p.close()


def test_raw_garbage(raw_world):
    a, b, dst, h, md = raw_world
    before = dst.numpy().copy()
    for junk in (b"", b"\0" * 47, os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n" * 10, frame(HELLO, length=96, magic=0)):
        r = Raw(md)
        r.s.sendall(junk)
        r.s.shutdown(socket.SHUT_WR)
        assert r.closed_by_peer()
        r.close()
    assert np.array_equal(dst.numpy(), before)
    assert a.net_stats().get("refused_connections", 0) >= 4, a.net_stats()
    still_serves(a, b, dst, h, md, b"after-garbage")


def test_raw_hello_refusals(raw_world):
    a, b, dst, h, md = raw_world
    before = dst.numpy().copy()
    cases = [
        (dict(server=b"\x99" * 16), errno.ESTALE, "restarted"),
        (dict(channel=2), errno.EPROTO, "unix"),  # shm data over tcp
        (dict(channel=3), errno.EPROTO, "unix"),  # shm control over tcp
        (dict(channel=77), errno.EPROTONOSUPPORT, "channel"),
        (dict(streams=0), errno.EPROTO, "stream"),
        (dict(streams=18), errno.EPROTO, "stream"),  # 16 asked for + the urgent lane is the most
        (dict(stream=3, streams=2), errno.EPROTO, "stream"),
    ]
    for kw, err, msg in cases:
        r = Raw(md)
        f, trailer = r.hello(**kw)
        assert f is not None and f[1] == ERROR, (kw, f)
        assert f[4] == err, (kw, f[4], trailer)
        assert msg in trailer.decode(), (kw, trailer)
        assert r.closed_by_peer()
        r.close()
    assert np.array_equal(dst.numpy(), before)
    still_serves(a, b, dst, h, md, b"after-hello")


def test_raw_write_outside_bounds(raw_world):
    """A sender that skips the local checks: the receiver refuses every write outside the
    exposure (past the end, unknown key), drains its payload, acks the failures and delivers no
    notification; the same connection then writes inside and that one lands."""
    a, b, dst, h, md = raw_world
    d = dst.numpy()
    before = d.copy()
    r = Raw(md)
    f, _ = r.hello(session=0xABCDEF)
    assert f[1] == HELLO_OK, f
    size = h.size
    payload = b"\xEE" * 100
    note = b"forged"
    writes = [
        (h.key, size - 10, payload),  # crosses the end
        (h.key, size, payload),  # starts at the end
        (h.key, 2**64 - 50, payload),  # offset + length wraps around
        (h.key ^ 0x40000000, 0, payload),  # unknown key
    ]
    msg = b""
    for i, (key, off, pl) in enumerate(writes):
        msg += frame(WRITE, key=key, aux=i, req=1, offset=off, length=len(pl)) + pl
    msg += frame(END, flags=END_PRIMARY | END_NOTIFY, req=1, aux=len(writes), offset=1, key=len(writes), length=len(note), extra=len(note)) + note
    r.s.sendall(msg)
    f, trailer = read_frame(r.s)
    assert f is not None and f[1] == ACK and f[5] == 1, f
    assert f[8] == 0, "the ACK says a notification was delivered"
    fails = dict(struct.iter_unpack("<Ii", trailer))
    assert fails == {0: -errno.ERANGE, 1: -errno.ERANGE, 2: -errno.ERANGE, 3: -errno.ENOENT}, fails
    assert np.array_equal(d, before), "the receiver wrote outside its exposure"
    assert a.next_notification(timeout_s=0.2) is None
    assert a.net_stats()["writes_refused"] == 4
    # Same connection, a write inside: lands and notifies.
    msg = frame(WRITE, key=h.key, aux=0, req=2, offset=size - 100, length=100) + payload
    msg += frame(END, flags=END_PRIMARY | END_NOTIFY, req=2, aux=1, offset=1, key=1, length=2, extra=2) + b"ok"
    r.s.sendall(msg)
    f, trailer = read_frame(r.s)
    assert f[1] == ACK and f[5] == 2 and f[4] == 0 and f[8] == 1, f
    assert a.next_notification(timeout_s=5).data == b"ok"
    assert d[size - 100 :].tobytes() == payload
    assert np.array_equal(d[: size - 100], before[: size - 100])
    r.close()
    still_serves(a, b, dst, h, md, b"after-oob")


@pytest.mark.parametrize(
    "bad, what",
    [
        (frame(99, req=1), "frame type"),
        (frame(ACK, req=1), "frame type"),
        (frame(WRITE, req=1, magic=0xDEADBEEF), "magic"),
        (frame(END, req=1, aux=0, offset=1, key=0, length=1 << 40, extra=0), "trailer"),
        (frame(END, req=1, aux=0, offset=1, key=0, flags=END_NOTIFY, length=70000, extra=70000), "trailer"),
        (frame(END, req=1, aux=5, offset=1, key=5, length=0), "entry count"),
        (frame(END, req=1, flags=2, aux=0, offset=1, key=0, length=0), "extents"),
        # A request claiming more streams than the session has could never complete: it would
        # pin its notification in the receiver for the life of the connection.
        (frame(END, req=1, flags=4 | END_NOTIFY, aux=0, offset=16, key=0, length=8, extra=8) + b"x" * 8, "exceeds"),
        (frame(END, req=1, aux=0, offset=0, key=0, length=0), "exceeds"),
    ],
)
def test_raw_protocol_violations(raw_world, bad, what):
    a, b, dst, h, md = raw_world
    before = dst.numpy().copy()
    r = Raw(md)
    f, _ = r.hello()
    assert f[1] == HELLO_OK
    r.s.sendall(bad)
    f, trailer = read_frame(r.s)
    assert f is not None and f[1] == ERROR and f[4] == errno.EPROTO, (f, trailer)
    assert what in trailer.decode(), trailer
    assert r.closed_by_peer()
    r.close()
    assert a.net_stats()["protocol_errors"] == 1
    assert np.array_equal(dst.numpy(), before)
    assert a.next_notification(timeout_s=0.1) is None
    still_serves(a, b, dst, h, md, b"after-violation")


def test_raw_half_request_then_close(raw_world):
    """A two-stream request whose second stream drops before its END: the first stream's END
    (with the notification) must not be acked as complete nor notified; and a huge announced
    payload that never comes does not block other peers."""
    a, b, dst, h, md = raw_world
    s0, s1 = Raw(md), Raw(md)
    assert s0.hello(session=7, stream=0, streams=2)[0][1] == HELLO_OK
    assert s1.hello(session=7, stream=1, streams=2)[0][1] == HELLO_OK
    s0.s.sendall(
        frame(WRITE, key=h.key, aux=0, req=1, offset=0, length=16)
        + b"\1" * 16
        + frame(END, flags=END_PRIMARY | END_NOTIFY, req=1, aux=1, offset=2, key=2, length=4, extra=4)
        + b"half"
    )
    s1.s.sendall(frame(WRITE, key=h.key, aux=1, req=1, offset=16, length=16) + b"\2" * 16)
    s1.close()  # no END on stream 1
    big = Raw(md)
    assert big.hello(session=99)[0][1] == HELLO_OK
    big.s.sendall(frame(WRITE, key=h.key, aux=0, req=1, offset=0, length=2**62))  # payload never sent
    still_serves(a, b, dst, h, md, b"meanwhile")
    assert a.next_notification(timeout_s=0.3) is None, "notification of a request one stream never finished"
    s0.s.settimeout(0.5)
    f, _ = read_frame_or_none(s0.s)
    assert f is None or f[1] != ACK or f[4] > 0, f"a half request was acked as complete: {f}"
    s0.close()
    big.close()
    assert a.next_notification(timeout_s=0.2) is None
    still_serves(a, b, dst, h, md, b"after")


def read_frame_or_none(s: socket.socket):
    try:
        return read_frame(s)
    except (socket.timeout, ConnectionResetError):
        return None, b""
