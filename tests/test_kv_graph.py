"""Transfer graphs (dpmove.kv.graph) and their executor (dpmove.kv.executor).

Graphs are checked node by node for both read paths, layerwise and not; the executor runs on
two in-process engines with the emulated GPU and the verbs transport against the fake HCA, over
a test double of the block store (Full Blocks in a flat file, read with Engine.read). Results
are compared with a plain reference: the blocks read with os.pread, the same compute function
applied layer by layer with NumPy, the DE KV buffer assembled by hand. Overlap is checked
structurally on the timeline with generous sleeps, never by asserting speed.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pytest

import dpmove
from dpmove import _core
from dpmove.kv import ModelSpec, get_model
from dpmove.kv.executor import ExecutionError, GraphExecutor, RunResult
from dpmove.kv.graph import Node, TransferGraph, build_graph

from conftest import TrackedEngine, close_and_check, rand_bytes

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not hasattr(_core, "_verbs_fake_reset"), reason="dpmove was built without the verbs transport"),
]

TINY = get_model("tiny")          # 2 layers x 256 B, 4-token blocks: LB 1 KiB, FB 2 KiB
ODD = get_model("tiny-odd")       # 3 layers x 100 B, 5-token blocks: LB 500 B, FB 1500 B
DS27 = get_model("ds-27b")        # 30 layers x 788 B, 64-token blocks: LB 50,432 B, FB 1,512,960 B
DEEP = ModelSpec("deep8", num_layers=8, bytes_per_token_per_layer=128, block_tokens=4)


def keys_for(n: int, tag: str = "k") -> List[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


# --- graphs: node by node ------------------------------------------------------------------------


def N(id, kind, side, layer, buffer, blocks, nbytes, deps) -> Node:  # table shorthand
    return Node(id, kind, side, layer, buffer, blocks[0], blocks[1], nbytes, tuple(deps))


def test_graph_pe_read_node_by_node() -> None:
    # tiny-odd: 3 hit blocks (15 tokens) + 7 new = 22 tokens, 5 blocks, the last one 2 tokens;
    # loads in groups of 2; two GPU layer buffers, so layer 2 reuses layer 0's buffer.
    g = build_graph(ODD, keys_for(3), 7, "pe", load_group=2)
    assert (g.hit_blocks, g.hit_tokens, g.total_tokens, g.total_blocks, g.last_block_tokens) == (3, 15, 22, 5, 2)
    assert (g.layer_bytes, g.hit_layer_bytes, g.new_layer_bytes, g.num_gpu_buffers) == (2200, 1500, 700, 2)
    assert g.move_kind == "h2d" and g.hit_keys == tuple(keys_for(3))
    assert list(g.nodes) == [
        N(0, "load", "pe", None, None, (0, 2), 3000, ()),
        N(1, "load", "pe", None, None, (2, 3), 1500, ()),
        N(2, "h2d", "pe", 0, 0, (0, 3), 1500, (0, 1)),
        N(3, "compute", "pe", 0, 0, (0, 5), 700, (2,)),
        N(4, "return", "pe", 0, 0, (0, 5), 2200, (3,)),
        N(5, "h2d", "pe", 1, 1, (0, 3), 1500, (0, 1)),
        N(6, "compute", "pe", 1, 1, (0, 5), 700, (3, 5)),
        N(7, "return", "pe", 1, 1, (0, 5), 2200, (6,)),
        N(8, "h2d", "pe", 2, 0, (0, 3), 1500, (0, 1, 3, 4)),   # buffer 0 again: after compute[L0] and return[L0]
        N(9, "compute", "pe", 2, 0, (0, 5), 700, (6, 8)),
        N(10, "return", "pe", 2, 0, (0, 5), 2200, (9,)),
    ]
    assert g.bytes_by_kind() == {"load": 4500, "h2d": 4500, "put": 0, "compute": 2100, "return": 6600}
    assert [n.name for n in g.nodes_of("load")] == ["load[0:2]", "load[2:3]"]
    assert g.node("h2d", 2).id == 8 and g.node("return", 1).name == "return[L1]"
    assert g.dependents()[3] == (4, 6, 8)


def test_graph_de_read_node_by_node() -> None:
    g = build_graph(ODD, keys_for(3), 7, "de", load_group=2)
    assert g.move_kind == "put"
    assert list(g.nodes) == [
        N(0, "load", "de", None, None, (0, 2), 3000, ()),
        N(1, "load", "de", None, None, (2, 3), 1500, ()),
        N(2, "put", "de", 0, 0, (0, 3), 1500, (0, 1)),
        N(3, "compute", "pe", 0, 0, (0, 5), 700, (2,)),
        N(4, "return", "pe", 0, 0, (3, 5), 700, (3,)),        # only the new tokens' blocks go back
        N(5, "put", "de", 1, 1, (0, 3), 1500, (0, 1)),
        N(6, "compute", "pe", 1, 1, (0, 5), 700, (3, 5)),
        N(7, "return", "pe", 1, 1, (3, 5), 700, (6,)),
        N(8, "put", "de", 2, 0, (0, 3), 1500, (0, 1, 3, 4)),
        N(9, "compute", "pe", 2, 0, (0, 5), 700, (6, 8)),
        N(10, "return", "pe", 2, 0, (3, 5), 700, (9,)),
    ]
    assert g.bytes_by_kind() == {"load": 4500, "h2d": 0, "put": 4500, "compute": 2100, "return": 2100}


def test_graph_non_layerwise_node_by_node() -> None:
    # Basic: one buffer per layer, every layer moved before the first compute.
    g = build_graph(ODD, 2, 5, "pe", layerwise=False)
    assert g.num_gpu_buffers == 3 and g.hit_keys is None and g.total_blocks == 3
    assert list(g.nodes) == [
        N(0, "load", "pe", None, None, (0, 2), 3000, ()),
        N(1, "h2d", "pe", 0, 0, (0, 2), 1000, (0,)),
        N(2, "h2d", "pe", 1, 1, (0, 2), 1000, (0,)),
        N(3, "h2d", "pe", 2, 2, (0, 2), 1000, (0,)),
        N(4, "compute", "pe", 0, 0, (0, 3), 500, (1, 2, 3)),
        N(5, "return", "pe", 0, 0, (0, 3), 1500, (4,)),
        N(6, "compute", "pe", 1, 1, (0, 3), 500, (2, 4)),
        N(7, "return", "pe", 1, 1, (0, 3), 1500, (6,)),
        N(8, "compute", "pe", 2, 2, (0, 3), 500, (3, 6)),
        N(9, "return", "pe", 2, 2, (0, 3), 1500, (8,)),
    ]
    assert build_graph(ODD, 2, 5, "pe", layerwise=False, gpu_layer_buffers=3).nodes == g.nodes
    assert build_graph(ODD, 2, 5, "pe", layerwise=False, gpu_layer_buffers=7).num_gpu_buffers == 3


def test_graph_cold_request_and_single_buffer() -> None:
    # No hit blocks: no load, no move; the compute of layer l reuses the buffer of l - 2.
    g = build_graph(ODD, 0, 5, "de")
    assert (g.total_blocks, g.last_block_tokens) == (1, 5)
    assert list(g.nodes) == [
        N(0, "compute", "pe", 0, 0, (0, 1), 500, ()),
        N(1, "return", "pe", 0, 0, (0, 1), 500, (0,)),
        N(2, "compute", "pe", 1, 1, (0, 1), 500, (0,)),
        N(3, "return", "pe", 1, 1, (0, 1), 500, (2,)),
        N(4, "compute", "pe", 2, 0, (0, 1), 500, (0, 1, 2)),
        N(5, "return", "pe", 2, 0, (0, 1), 500, (4,)),
    ]
    with pytest.raises(KeyError, match="no put node for layer 0"):
        g.node("put", 0)
    # One buffer: each move waits for the previous layer's compute and return (no overlap).
    g1 = build_graph(TINY, 1, 1, "pe", gpu_layer_buffers=1)
    assert [(n.name, n.buffer, n.deps) for n in g1.nodes] == [
        ("load[0:1]", None, ()), ("h2d[L0]", 0, (0,)), ("compute[L0]", 0, (1,)), ("return[L0]", 0, (2,)),
        ("h2d[L1]", 0, (0, 2, 3)), ("compute[L1]", 0, (2, 4)), ("return[L1]", 0, (5,))]
    assert build_graph(TINY, 1, 1, "pe", gpu_layer_buffers=9).num_gpu_buffers == 2  # clamped to num_layers


@pytest.mark.parametrize("spec", [TINY, ODD, DEEP, DS27], ids=lambda s: s.name)
@pytest.mark.parametrize("side", ["pe", "de"])
@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("hits,new,group,bufs", [(0, 1, 16, 2), (1, 3, 1, 1), (17, 64, 16, 2), (40, 130, 7, 3)])
def test_graph_invariants(spec: ModelSpec, side: str, layerwise: bool, hits: int, new: int, group: int,
                          bufs: int) -> None:
    g = build_graph(spec, hits, new, side, layerwise=layerwise, load_group=group,
                    gpu_layer_buffers=bufs if layerwise else None)
    L, bt, bpt = spec.num_layers, spec.block_tokens, spec.bytes_per_token_per_layer
    assert all(n.id == i and all(d < i for d in n.deps) for i, n in enumerate(g.nodes))  # topological
    loads = g.nodes_of("load")
    assert [(n.first_block, n.end_block) for n in loads] == [(b, min(b + group, hits)) for b in range(0, hits, group)]
    move = g.move_kind
    other = "put" if move == "h2d" else "h2d"
    assert not g.nodes_of(other)
    assert len(g.nodes_of(move)) == (L if hits else 0)
    assert len(g.nodes_of("compute")) == len(g.nodes_of("return")) == L
    load_ids = {n.id for n in loads}
    for m in g.nodes_of(move):
        assert load_ids <= set(m.deps) and m.nbytes == hits * spec.layer_block_bytes and m.side == side
    total = hits * bt + new
    assert g.total_blocks == -(-total // bt)
    for layer in range(L):
        c, r = g.node("compute", layer), g.node("return", layer)
        assert c.buffer == r.buffer == layer % g.num_gpu_buffers
        assert r.deps == (c.id,)
        assert r.nbytes == (total if side == "pe" else new) * bpt
        assert (r.first_block, r.end_block) == (0 if side == "pe" else hits, g.total_blocks)
        if layer:
            assert g.node("compute", layer - 1).id in c.deps
        first = g.node(move, layer) if hits else c
        prev = layer - g.num_gpu_buffers
        if prev >= 0:  # buffer reuse edges, explicit
            assert {g.node("compute", prev).id, g.node("return", prev).id} <= set(first.deps)
        if not layerwise and hits and layer == 0:
            assert {m.id for m in g.nodes_of(move)} <= set(c.deps)
    assert g.num_gpu_buffers == (min(bufs, L) if layerwise else L)
    assert sum(n.nbytes for n in loads) == hits * spec.full_block_bytes
    d = json.loads(json.dumps(g.to_dict()))
    assert len(d["nodes"]) == len(g) and d["bytes"] == g.bytes_by_kind()
    assert len(g.describe().splitlines()) == len(g) + 1


BAD_GRAPHS = [
    (lambda: build_graph("tiny", 1, 1, "pe"), TypeError, "spec must be a dpmove.kv.ModelSpec"),
    (lambda: build_graph(TINY, -1, 1, "pe"), ValueError, "hit_blocks must be >= 0, got -1"),
    (lambda: build_graph(TINY, 1.0, 1, "pe"), TypeError, "hit_blocks must be a block count"),
    (lambda: build_graph(TINY, True, 1, "pe"), TypeError, "hit_blocks must be a block count .*got bool"),
    (lambda: build_graph(TINY, b"key", 1, "pe"), TypeError, "hit_blocks is one key"),
    (lambda: build_graph(TINY, "abc", 1, "pe"), TypeError, "got a str"),
    (lambda: build_graph(TINY, [b"a", 3], 1, "pe"), TypeError, r"hit_blocks\[1\] must be a bytes key"),
    (lambda: build_graph(TINY, 1, 0, "pe"), ValueError, "new_tokens .* must be >= 1, got 0"),
    (lambda: build_graph(TINY, 1, -5, "pe"), ValueError, "new_tokens .* must be >= 1, got -5"),
    (lambda: build_graph(TINY, 1, 2.5, "pe"), TypeError, "new_tokens .* must be an int"),
    (lambda: build_graph(TINY, 1, 1, "both"), ValueError, "unknown read side 'both'"),
    (lambda: build_graph(TINY, 1, 1, None), TypeError, "read_side must be 'pe' or 'de'"),
    (lambda: build_graph(TINY, 1, 1, "pe", layerwise=1), TypeError, "layerwise must be a bool"),
    (lambda: build_graph(TINY, 1, 1, "pe", gpu_layer_buffers=0), ValueError, "gpu_layer_buffers must be >= 1, got 0"),
    (lambda: build_graph(TINY, 1, 1, "pe", gpu_layer_buffers=-1), ValueError, "gpu_layer_buffers must be >= 1"),
    (lambda: build_graph(ODD, 1, 1, "pe", layerwise=False, gpu_layer_buffers=2), ValueError,
     r"gpu_layer_buffers must be None or >= num_layers \(3\), got 2"),
    (lambda: build_graph(TINY, 1, 1, "pe", load_group=0), ValueError, "load_group must be >= 1, got 0"),
    (lambda: build_graph(TINY, 1, 1, "pe", load_group=None), TypeError, "load_group must be an int"),
    (lambda: build_graph(TINY, 1, 1, "pe").nodes_of("copy"), ValueError, "unknown node kind 'copy'"),
    (lambda: build_graph(TINY, 1, 1, "pe").block_tokens_of(2), ValueError, r"block must be in \[0, 2\)"),
]


@pytest.mark.parametrize("fn,exc,match", BAD_GRAPHS, ids=[b[2][:40] for b in BAD_GRAPHS])
def test_graph_bad_input(fn: Callable[[], Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        fn()


def test_graph_numpy_ints_accepted() -> None:
    g = build_graph(TINY, np.int64(2), np.int32(3), "de", load_group=np.uint8(1))
    assert (g.hit_blocks, g.new_tokens, g.load_group) == (2, 3, 1) and isinstance(g.hit_blocks, int)


# --- the store test double -----------------------------------------------------------------------


class FlatBlockRead:
    """The store's BlockRead interface over one engine Request."""

    def __init__(self, req: dpmove.Request) -> None:
        self.req = req

    @property
    def done(self) -> bool:
        return self.req.done

    def wait(self, timeout_s: Optional[float] = None) -> bool:
        return self.req.wait(timeout_s) != dpmove.RequestState.PENDING

    def result(self) -> None:
        self.req.result()


class FlatStore:
    """Test double of the block store: block i of `keys` is the Full Block at i x slot_bytes of
    one flat file (zero padding up to the slot); read() issues one Engine.read of whole slots.
    `raise_on` keys make read() raise at submission (a store that refuses)."""

    def __init__(self, engine: dpmove.Engine, spec: ModelSpec, path: Path, keys: Sequence[bytes],
                 raise_on: Sequence[bytes] = ()) -> None:
        self.spec = spec
        self.slot_bytes = spec.full_block_stride()
        self.engine = engine
        self.index = {k: i for i, k in enumerate(keys)}
        self.file = engine.open(path, "r", direct="auto")
        self.raise_on = set(raise_on)
        self.reads: List[FlatBlockRead] = []

    def read(self, keys: Sequence[bytes], region: Any, region_offsets: np.ndarray, *,
             traffic_class: Optional[str] = None, timeout_s: Optional[float] = None) -> FlatBlockRead:
        bad = [k for k in keys if k in self.raise_on]
        if bad:
            raise dpmove.NotFound(2, f"block {bad[0]!r}: injected store failure")
        idx = np.array([self.index[k] for k in keys], dtype=np.int64)
        rows = dpmove.entries(idx * self.slot_bytes, np.asarray(region_offsets, dtype=np.int64), self.slot_bytes)
        r = FlatBlockRead(self.engine.read(self.file, region, rows, timeout_s=timeout_s, traffic_class=traffic_class))
        self.reads.append(r)
        return r


class BlockFile:
    """`num_blocks` random Full Blocks of `spec` at full_block_stride() in one file."""

    def __init__(self, path: Path, spec: ModelSpec, num_blocks: int, rng: np.random.Generator, tag: str) -> None:
        self.path, self.spec = path, spec
        self.keys = keys_for(num_blocks, tag)
        stride = spec.full_block_stride()
        data = np.zeros(num_blocks * stride, dtype=np.uint8)
        for i in range(num_blocks):
            data[i * stride: i * stride + spec.full_block_bytes] = rand_bytes(rng, spec.full_block_bytes)
        path.write_bytes(data.tobytes())

    def pread_block(self, key: bytes) -> np.ndarray:
        """Reference: a Full Block by plain os.pread, shaped [layers, block_tokens, bpt]."""
        i = self.keys.index(key)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, self.spec.full_block_bytes, i * self.spec.full_block_stride())
        finally:
            os.close(fd)
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.spec.full_block_shape)


# --- compute and reference -------------------------------------------------------------------------


def derive_new(hit: np.ndarray, layer: int, new_tokens: int, bpt: int) -> np.ndarray:
    """The new tokens' KV of `layer`: a deterministic function of every hit byte and the layer,
    [new_tokens, bpt] uint8."""
    seed = zlib.crc32(np.ascontiguousarray(hit).tobytes())
    return np.random.default_rng([seed, layer, new_tokens]).integers(0, 256, (new_tokens, bpt), dtype=np.uint8)


def kv_compute(ctx) -> None:
    """The test's compute step: reads the hit KV of the layer buffer (d2h), derives the new KV
    with NumPy, writes it after the hit part (h2d)."""
    bpt = ctx.graph.spec.bytes_per_token_per_layer
    hit = np.zeros(ctx.hit_bytes, dtype=np.uint8)
    if ctx.hit_bytes:
        ctx.engine.copy(hit, ctx.region, [(0, ctx.offset, ctx.hit_bytes)]).result(timeout_s=30)
    new = derive_new(hit.reshape(-1, bpt), ctx.layer, ctx.graph.new_tokens, bpt)
    ctx.engine.copy(ctx.region, new.reshape(-1), [(ctx.offset + ctx.hit_bytes, 0, ctx.new_bytes)]).result(timeout_s=30)


def reference_buffer(g: TransferGraph, files: BlockFile, stride: int) -> np.ndarray:
    """The DE KV buffer the plain way: every layer's hit KV from os.pread, new KV from
    derive_new, laid out as Full Blocks `stride` bytes apart (zeros elsewhere, as the double's
    padding and a fresh allocation hold)."""
    spec = g.spec
    bt, bpt, lb = spec.block_tokens, spec.bytes_per_token_per_layer, spec.layer_block_bytes
    blocks = [files.pread_block(k) for k in (g.hit_keys or ())]
    out = np.zeros(g.total_blocks * stride, dtype=np.uint8)
    for layer in range(spec.num_layers):
        hit = (np.concatenate([b[layer] for b in blocks]) if blocks else np.zeros((0, bpt), np.uint8))
        kv = np.concatenate([hit, derive_new(hit, layer, g.new_tokens, bpt)])
        for b in range(g.total_blocks):
            n = min(bt, g.total_tokens - b * bt)
            at = b * stride + layer * lb
            out[at: at + n * bpt] = kv[b * bt: b * bt + n].reshape(-1)
    return out


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_hca() -> Iterator[None]:
    prev = _core._verbs_provider()
    _core._verbs_set_provider("fake")
    _core._verbs_fake_reset()
    yield
    _core._verbs_fake_reset()
    _core._verbs_set_provider("fake" if prev == "fake" else "real")


class TrackingPeer:
    """A Peer that keeps every request it wrote (checked quiesced at teardown)."""

    def __init__(self, peer: dpmove.Peer) -> None:
        self.peer = peer
        self.requests: List[dpmove.Request] = []
        self.transport = peer.transport
        self.remote = peer.remote

    def write(self, *args: Any, **kwargs: Any) -> dpmove.Request:
        req = self.peer.write(*args, **kwargs)
        self.requests.append(req)
        return req


class Sides:
    """A PE and a DE engine (emulated GPU), verbs peers both ways, stores over block files."""

    def __init__(self, tmp_path: Path, rng: np.random.Generator, made: List[TrackedEngine],
                 peers: List[TrackingPeer]) -> None:
        self.tmp_path, self.rng = tmp_path, rng
        self.pe = TrackedEngine("auto", gpu="emulated", name="pe")
        self.de = TrackedEngine("auto", gpu="emulated", name="de")
        made += [self.pe, self.de]
        self.pe_to_de = TrackingPeer(self.pe.connect(self.de.metadata(), transport="verbs"))
        self.de_to_pe = TrackingPeer(self.de.connect(self.pe.metadata(), transport="verbs"))
        peers += [self.pe_to_de, self.de_to_pe]
        self.files: Dict[str, BlockFile] = {}

    def blocks(self, spec: ModelSpec, n: int) -> BlockFile:
        if spec.name not in self.files:
            self.files[spec.name] = BlockFile(self.tmp_path / f"{spec.name}.blocks", spec, n, self.rng, spec.name)
        return self.files[spec.name]

    def executor(self, spec: ModelSpec, num_blocks: int = 64, raise_on: Sequence[bytes] = (),
                 path: Optional[Path] = None, **kw: Any) -> GraphExecutor:
        f = self.blocks(spec, num_blocks)
        p = path or f.path
        pe_store = FlatStore(self.pe, spec, p, f.keys, raise_on)
        de_store = FlatStore(self.de, spec, p, f.keys, raise_on)
        kw.setdefault("staging_budget_bytes", 64 * pe_store.slot_bytes)
        return GraphExecutor(self.pe, self.de, pe_to_de=self.pe_to_de, de_to_pe=self.de_to_pe, pe_store=pe_store,
                             de_store=de_store, timeout_s=30, **kw)


@pytest.fixture
def sides(fake_hca: None, tmp_path: Path, rng: np.random.Generator) -> Iterator[Sides]:
    made: List[TrackedEngine] = []
    peers: List[TrackingPeer] = []
    s = Sides(tmp_path, rng, made, peers)
    yield s
    for p in peers:
        for req in p.requests:
            assert req.wait_quiesced(30), f"{req} not quiesced"
            assert req.duplicate_finishes == 0
            assert not np.isin(req.status, [dpmove.ENTRY_PENDING, dpmove.ENTRY_RUNNING]).any(), req.status
        p.peer.close()
    close_and_check(made)


def check_against_reference(res: RunResult, sides: Sides) -> None:
    for i, g in enumerate(res.graphs):
        want = reference_buffer(g, sides.files[g.spec.name], res.de_block_strides[i])
        got = res.kv_bytes(i)
        assert got.shape == want.shape
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0])
            raise AssertionError(f"request {i} ({g.read_side}-read, {g.hit_blocks} hits, {g.new_tokens} new): DE "
                                 f"buffer differs first at byte {bad} (block {bad // res.de_block_strides[i]})")
        for layer in (0, g.spec.num_layers - 1):
            assert res.layer_kv(i, layer).shape == (g.total_tokens, g.spec.bytes_per_token_per_layer)


def check_timeline(res: RunResult) -> None:
    tl = res.timeline
    assert len(tl) == sum(len(g) for g in res.graphs)
    for i, g in enumerate(res.graphs):
        for n in g.nodes:
            e = tl.event(i, n.id)
            assert e.ok and e.kind == n.kind and e.side == n.side and e.layer == n.layer
            assert tl.t0_ns <= e.start_ns <= e.end_ns
            for d in n.deps:
                assert e.start_ns >= tl.event(i, d).end_ns, (i, n.name, g.nodes[d].name)


# --- the executor against the reference ------------------------------------------------------------


# (spec, [(hit blocks, new tokens)] per request: cold, partial last block, more blocks than a load group)
CASES = {
    "tiny": (TINY, [(3, 5), (0, 2), (18, 4), (1, 1)]),
    "tiny-odd": (ODD, [(2, 7), (0, 13), (17, 5)]),
    "ds-27b": (DS27, [(2, 70), (0, 64), (1, 1)]),
}


@pytest.mark.parametrize("model", list(CASES))
@pytest.mark.parametrize("side", ["pe", "de", "mixed"])
@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "basic"])
def test_executor_matches_reference(sides: Sides, model: str, side: str, layerwise: bool) -> None:
    spec, reqs = CASES[model]
    f = sides.blocks(spec, 40)
    graphs = []
    for i, (hits, new) in enumerate(reqs):
        s = side if side != "mixed" else ("pe", "de")[i % 2]
        keys = list(np.random.default_rng(i).permutation(len(f.keys))[:hits])
        graphs.append(build_graph(spec, [f.keys[k] for k in keys], new, s, layerwise=layerwise, load_group=8))
    with sides.executor(spec) as ex:
        res = ex.run(graphs, kv_compute)
    check_against_reference(res, sides)
    check_timeline(res)


def test_executor_caller_buffers_and_reuse(sides: Sides) -> None:
    f = sides.blocks(ODD, 20)
    graphs = [build_graph(ODD, f.keys[:4], 6, "de"), build_graph(ODD, f.keys[4:9], 3, "pe", gpu_layer_buffers=1)]
    with sides.executor(ODD, max_active_requests=1) as ex:
        bufs = [sides.de.alloc(ex.de_buffer_bytes(g) + 4096) for g in graphs]
        res = ex.run(graphs, kv_compute, de_buffers=bufs)
        assert res.de_buffers[0] is bufs[0] and res.de_buffers[1] is bufs[1]
        check_against_reference(res, sides)
        assert not sides.de.exposed()  # the run's exposures are gone
        again = ex.run(graphs[::-1], kv_compute)  # the executor is reusable
    check_against_reference(again, sides)


def test_staging_budget(sides: Sides) -> None:
    f = sides.blocks(TINY, 30)
    slot = TINY.full_block_stride()
    graphs = [build_graph(TINY, f.keys[i * 5:(i + 1) * 5], 3, "pe", load_group=2) for i in range(4)]
    too_small = rf"request 0 \(PE-read, 5 hit blocks x {slot} B slots\) needs {5 * slot} B .*at least {5 * slot} B"
    with sides.executor(TINY, staging_budget_bytes=5 * slot - 1) as ex, pytest.raises(ValueError, match=too_small):
        ex.run(graphs, kv_compute)
    # Room for exactly one request's blocks: request r + 1 loads only after request r's last h2d.
    with sides.executor(TINY, staging_budget_bytes=5 * slot + slot - 1, max_active_requests=4) as ex:
        assert ex.staging_bytes_needed(graphs[0]) == 5 * slot
        res = ex.run(graphs, kv_compute)
    check_against_reference(res, sides)
    tl = res.timeline
    for r in range(1, 4):
        first_load = min(e.start_ns for e in tl.of(r, "load"))
        last_h2d = max(e.end_ns for e in tl.of(r - 1, "h2d"))
        assert first_load >= last_h2d
    # DE-read needs no PE staging at all.
    with sides.executor(TINY, staging_budget_bytes=0) as ex:
        res = ex.run([build_graph(TINY, f.keys[:5], 2, "de")], kv_compute)
    check_against_reference(res, sides)


def sleep_compute(seconds: float) -> Callable[[Any], None]:
    def compute(ctx) -> None:
        kv_compute(ctx)
        time.sleep(seconds)
    return compute


def test_overlap_is_structural(sides: Sides) -> None:
    """With a 30 ms compute per layer: the move of layer l + 1 starts before compute[l] ends, and
    request 2 (admitted when request 0 ends) loads while request 1 still computes."""
    f = sides.blocks(DEEP, 30)
    graphs = [build_graph(DEEP, f.keys[i * 6:(i + 1) * 6], 4, side) for i, side in enumerate(["pe", "de", "pe"])]
    with sides.executor(DEEP, staging_budget_bytes=12 * DEEP.full_block_stride(), max_active_requests=2) as ex:
        res = ex.run(graphs, sleep_compute(0.03))
    check_against_reference(res, sides)
    check_timeline(res)
    tl = res.timeline
    for r, g in enumerate(graphs):
        for layer in range(DEEP.num_layers - 1):
            move = tl.event(r, g.node(g.move_kind, layer + 1).id)
            comp = tl.event(r, g.node("compute", layer).id)
            assert move.start_ns < comp.end_ns, (r, layer)
    last_compute_1 = tl.event(1, graphs[1].node("compute", DEEP.num_layers - 1).id)
    assert min(e.start_ns for e in tl.of(2, "load")) < last_compute_1.end_ns
    assert min(e.start_ns for e in tl.of(1, "load")) < tl.event(0, graphs[0].node("compute", 0).id).end_ns
    # computes ran one at a time, in request then layer order
    comps = tl.of(kind="compute")
    assert [(e.request, e.layer) for e in comps] == [(r, layer) for r in range(3) for layer in range(DEEP.num_layers)]
    assert all(a.end_ns <= b.start_ns for a, b in zip(comps, comps[1:]))


def test_basic_moves_everything_before_compute(sides: Sides) -> None:
    f = sides.blocks(DEEP, 10)
    g = build_graph(DEEP, f.keys[:3], 2, "pe", layerwise=False)
    with sides.executor(DEEP) as ex:
        res = ex.run(g, sleep_compute(0.005))
    check_against_reference(res, sides)
    c0 = res.timeline.event(0, g.node("compute", 0).id)
    assert all(e.end_ns <= c0.start_ns for e in res.timeline.of(0, "h2d"))


def test_chrome_trace(sides: Sides, tmp_path: Path) -> None:
    f = sides.blocks(ODD, 10)
    graphs = [build_graph(ODD, f.keys[:3], 4, "pe", load_group=1), build_graph(ODD, f.keys[3:5], 9, "de")]
    with sides.executor(ODD) as ex:
        res = ex.run(graphs, kv_compute)
    path = tmp_path / "trace.json"
    res.timeline.save(path)
    trace = json.loads(path.read_text())
    assert trace == json.loads(json.dumps(res.timeline.to_chrome_trace()))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(graphs[0]) + len(graphs[1])
    names = {(e["args"]["request"], e["args"]["node"]) for e in xs}
    assert names == {(i, n.id) for i, g in enumerate(graphs) for n in g.nodes}
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert procs == {1: "PE", 2: "DE"}
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    by_id = {(e["args"]["request"], e["args"]["node"]): e for e in xs}
    for i, g in enumerate(graphs):
        for n in g.nodes:
            e = by_id[(i, n.id)]
            assert e["ts"] >= 0 and e["dur"] >= 0 and e["cat"] == n.kind and e["name"] == f"r{i} {n.name}"
            assert e["pid"] == (1 if n.side == "pe" else 2)
            assert lanes[(e["pid"], e["tid"])].split(".")[0] == {"load": "storage"}.get(n.kind, n.kind)
            for d in n.deps:
                dep = by_id[(i, d)]
                assert e["ts"] >= dep["ts"] + dep["dur"] - 1e-3  # float rounding of us
    assert res.timeline.busy_ns("compute") > 0 and res.wall_ns >= res.timeline.busy_ns("load")


# --- failures ------------------------------------------------------------------------------------


def assert_nothing_in_flight(sides: Sides, ex: GraphExecutor) -> None:
    for store in (ex.pe_store, ex.de_store):
        for r in store.reads:
            assert r.req.wait_quiesced(0), r.req
    for p in (sides.pe_to_de, sides.de_to_pe):
        for req in p.requests:
            assert req.quiesced, req
    for eng in (sides.pe, sides.de):
        for req in eng.requests:
            assert req.quiesced, req


@pytest.mark.parametrize("side", ["pe", "de"])
def test_failing_load_at_submit(sides: Sides, side: str) -> None:
    f = sides.blocks(ODD, 20)
    graphs = [build_graph(ODD, f.keys[:3], 4, side), build_graph(ODD, f.keys[3:8], 4, side, load_group=2)]
    with sides.executor(ODD, raise_on=[f.keys[6]]) as ex:
        why = rf"request 1 node 1 load\[2:4\] \({side}\) failed: NotFound: .*injected"
        with pytest.raises(ExecutionError, match=why) as info:
            ex.run(graphs, sleep_compute(0.01))
        assert_nothing_in_flight(sides, ex)
    err = info.value
    assert isinstance(err.__cause__, dpmove.NotFound) and err.request == 1 and err.node.kind == "load"
    failed = [e for e in err.timeline.events if not e.ok]
    assert [(e.request, e.node) for e in failed] == [(1, 1)]
    assert not sides.de.exposed()


@pytest.mark.parametrize("side", ["pe", "de"])
def test_failing_load_corrupt_block(sides: Sides, side: str, tmp_path: Path) -> None:
    # A block file cut inside block 5: the engine's read of that block ends short (ENODATA).
    f = sides.blocks(TINY, 10)
    cut = tmp_path / "cut.blocks"
    cut.write_bytes(f.path.read_bytes()[: 5 * TINY.full_block_stride() + 100])
    graphs = [build_graph(TINY, f.keys[:2], 3, side), build_graph(TINY, f.keys[4:6], 3, side, load_group=1)]
    with sides.executor(TINY, path=cut) as ex:
        with pytest.raises(ExecutionError, match=r"request 1 node 1 load\[1:2\] .* failed: TransferError") as info:
            ex.run(graphs, sleep_compute(0.02))
        assert_nothing_in_flight(sides, ex)
    assert isinstance(info.value.__cause__, dpmove.TransferError)


def test_failing_compute(sides: Sides) -> None:
    f = sides.blocks(DEEP, 20)
    graphs = [build_graph(DEEP, f.keys[:4], 3, "de"), build_graph(DEEP, f.keys[4:8], 3, "pe")]
    calls: List[tuple] = []

    def compute(ctx) -> None:
        calls.append((ctx.request, ctx.layer))
        if (ctx.request, ctx.layer) == (0, 2):
            raise ZeroDivisionError("model blew up")
        kv_compute(ctx)

    with sides.executor(DEEP) as ex:
        with pytest.raises(ExecutionError, match=r"request 0 node \d+ compute\[L2\] \(pe\) failed: ZeroDivisionError: "
                                                 "model blew up") as info:
            ex.run(graphs, compute)
        assert_nothing_in_flight(sides, ex)
        assert calls == [(0, 0), (0, 1), (0, 2)]  # nothing ran after the failure
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        assert info.value.node.name == "compute[L2]"
        res = ex.run(graphs, kv_compute)  # usable after a failed run
    check_against_reference(res, sides)


def test_failing_peer_write_is_named(sides: Sides) -> None:
    # The DE buffer's exposure revoked under the run: the return write is refused (ENOENT).
    f = sides.blocks(TINY, 10)
    g = build_graph(TINY, f.keys[:2], 3, "pe")

    def compute(ctx) -> None:
        kv_compute(ctx)
        if ctx.layer == 0:
            for h in sides.de.exposed():
                sides.de.unexpose(h)

    with sides.executor(TINY) as ex:
        with pytest.raises(ExecutionError, match=r"request 0 node \d+ return\[L\d\] \(pe\) failed") as info:
            ex.run(g, compute)
        assert_nothing_in_flight(sides, ex)
    assert isinstance(info.value.__cause__, dpmove.NotFound)
    assert "no region is exposed under key" in str(info.value)


@pytest.mark.parametrize("side", ["pe", "de"])
def test_with_block_store(sides: Sides, side: str, tmp_path: Path, rng: np.random.Generator) -> None:
    """The real BlockStore (one object per side over one directory) behind the executor: KV
    equal to the reference; then every stored block corrupted on disk: the store's verification
    fails the first load seen, the run ends naming it, with BlockCorrupt as the cause."""
    store = pytest.importorskip("dpmove.kv.store")
    spec = ODD
    root = tmp_path / "store"
    with store.BlockStore(root, spec, engine=sides.pe) as pe_store, \
            store.BlockStore(root, spec, engine=sides.de) as de_store:
        keys = store.chain_keys(np.arange(spec.block_tokens * 8), spec.block_tokens)
        data = rand_bytes(rng, 8 * spec.full_block_bytes).reshape(8, *spec.full_block_shape)
        src = sides.pe.alloc(8 * pe_store.slot_bytes)
        for i in range(8):
            src.numpy()[i * pe_store.slot_bytes: i * pe_store.slot_bytes + spec.full_block_bytes] = data[i].reshape(-1)
        assert (pe_store.put(keys, None, src, np.arange(8) * pe_store.slot_bytes) == store.PUT_STORED).all()
        ex = GraphExecutor(sides.pe, sides.de, pe_to_de=sides.pe_to_de, de_to_pe=sides.de_to_pe, pe_store=pe_store,
                           de_store=de_store, staging_budget_bytes=16 * pe_store.slot_bytes, timeout_s=30)
        graphs = [build_graph(spec, keys[:5], 7, side, load_group=2), build_graph(spec, keys, 2, side, load_group=3)]
        res = ex.run(graphs, kv_compute)
        bpt = spec.bytes_per_token_per_layer
        for i, g in enumerate(graphs):
            assert res.de_block_strides[i] == de_store.slot_bytes
            for layer in range(spec.num_layers):
                hit = data[:g.hit_blocks, layer].reshape(-1, bpt)
                want = np.concatenate([hit, derive_new(hit, layer, g.new_tokens, bpt)])
                assert np.array_equal(res.layer_kv(i, layer), want), (i, layer)
        check_timeline(res)

        seg = root / "segments" / "seg-000000"
        raw = bytearray(seg.read_bytes())
        for slot in range(len(raw) // pe_store.slot_bytes):
            raw[slot * pe_store.slot_bytes + 7] ^= 0xFF
        seg.write_bytes(bytes(raw))
        why = rf"request \d node \d+ load\[\d+:\d+\] \({side}\) failed: BlockCorrupt"
        with pytest.raises(ExecutionError, match=why):
            ex.run(graphs, kv_compute)
        ex.close()


# --- bad input and refusals --------------------------------------------------------------------------


def test_executor_bad_input(sides: Sides) -> None:
    f = sides.blocks(TINY, 10)
    g = build_graph(TINY, f.keys[:2], 3, "pe")
    with sides.executor(TINY) as ex:
        cases = [
            (lambda: ex.run([], kv_compute), ValueError, "graphs is empty"),
            (lambda: ex.run([g, "x"], kv_compute), TypeError, r"graphs\[1\] must be a TransferGraph"),
            (lambda: ex.run(g, None), TypeError, "compute must be callable"),
            (lambda: ex.run(build_graph(TINY, 2, 3, "pe"), kv_compute), ValueError, "built from a block count"),
            (lambda: ex.run(build_graph(ODD, [b"a"], 3, "de"), kv_compute), ValueError, "differs from de_store.spec"),
            (lambda: ex.run(g, kv_compute, de_buffers=[]), ValueError, r"expected one per graph \(1\), got 0"),
            (lambda: ex.run(g, kv_compute, de_buffers=[sides.de.alloc(100)]), ValueError,
             rf"holds 100 B; request 0 needs {3 * TINY.full_block_stride()} B"),
            (lambda: ex.run(g, kv_compute, de_buffers=[sides.de.device_alloc(1 << 20)]), ValueError,
             "must be a host Region"),
        ]
        for fn, exc, match in cases:
            with pytest.raises(exc, match=match):
                fn()
        assert ex.run(build_graph(TINY, 0, 3, "pe"), kv_compute).graphs[0].total_blocks == 1  # cold needs no keys
    ctor = {"pe_to_de": sides.pe_to_de}
    for kw, exc, match in [
        ({"staging_budget_bytes": -1}, ValueError, "staging_budget_bytes must be >= 0"),
        ({"staging_budget_bytes": 1.5}, TypeError, "staging_budget_bytes must be an int"),
        ({"max_active_requests": 0}, ValueError, "max_active_requests must be >= 1"),
        ({"timeout_s": 0}, ValueError, "timeout_s must be a positive number"),
        ({"poll_interval_s": -1}, ValueError, "poll_interval_s must be a positive number"),
        ({"traffic_classes": {"copy": "bulk"}}, ValueError, r"unknown kind\(s\) \['copy'\]"),
        ({"pe_store": object()}, TypeError, "pe_store must be a block store"),
        ({"pe_to_de": None}, ValueError, "pe_to_de is required"),
        ({"pe_to_de": sides.de_to_pe}, ValueError, "pe_to_de is connected to engine 'pe'"),
    ]:
        with pytest.raises(exc, match=match):
            GraphExecutor(sides.pe, sides.de, **{**ctor, **kw})
    with pytest.raises(TypeError, match="pe_engine must be a dpmove.Engine"):
        GraphExecutor("pe", sides.de, **ctor)
    # No DE store / no de_to_pe for a DE-read request with hits; no PE store for PE-read.
    ex = GraphExecutor(sides.pe, sides.de, pe_to_de=sides.pe_to_de)
    with pytest.raises(ValueError, match="DE-read with 2 hit blocks: the executor needs de_store"):
        ex.run(build_graph(TINY, f.keys[:2], 1, "de"), kv_compute)
    with pytest.raises(ValueError, match="PE-read with 2 hit blocks: the executor needs pe_store"):
        ex.run(build_graph(TINY, f.keys[:2], 1, "pe"), kv_compute)
    ex2 = GraphExecutor(sides.pe, sides.de, pe_to_de=sides.pe_to_de, de_store=FlatStore(sides.de, TINY, f.path, f.keys))
    with pytest.raises(ValueError, match="needs de_to_pe"):
        ex2.run(build_graph(TINY, f.keys[:2], 1, "de"), kv_compute)


def test_non_verbs_transports_refused(sides: Sides) -> None:
    for transport in ("tcp", "shm"):
        why = f"pe_to_de uses the '{transport}' transport, but returns read PE device memory, which only 'verbs'"
        with sides.pe.connect(sides.de.metadata(), transport=transport) as p, pytest.raises(ValueError, match=why):
            GraphExecutor(sides.pe, sides.de, pe_to_de=p)
    why = "de_to_pe uses the 'tcp' transport, but DE-read puts write PE device memory"
    with sides.de.connect(sides.pe.metadata(), transport="tcp") as p, pytest.raises(ValueError, match=why):
        GraphExecutor(sides.pe, sides.de, pe_to_de=sides.pe_to_de, de_to_pe=p)


def test_pe_without_gpu_refused(fake_hca: None) -> None:
    made = [TrackedEngine("auto", gpu="off", name="pe"), TrackedEngine("auto", gpu="emulated", name="de")]
    try:
        peer = made[0].connect(made[1].metadata(), transport="verbs")
        with pytest.raises(ValueError, match=r"pe_engine has no GPU \(gpu='off'\)"):
            GraphExecutor(made[0], made[1], pe_to_de=peer)
        peer.close()
    finally:
        close_and_check(made)


# --- the benchmark -------------------------------------------------------------------------------------


def test_bench_graph_smoke(fake_hca: None, tmp_path: Path) -> None:
    from dpmove.bench import graph as bench_graph
    from dpmove.cli import main as cli_main

    out = tmp_path / "graph.json"
    trace = tmp_path / "trace.json"
    rc = cli_main(["bench", "graph", "--model", "tiny", "--requests", "3", "--hit-blocks", "4", "--new-tokens", "5",
                   "--layer-ms", "2", "--sides", "pe,de", "--modes", "layerwise,basic", "--repeat", "1",
                   "--dir", str(tmp_path), "--json", str(out), "--trace", str(trace)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(r["side"], r["mode"]) for r in res["rows"]] == [("pe", "layerwise"), ("pe", "basic"), ("de", "layerwise"),
                                                           ("de", "basic")]
    for r in res["rows"]:
        assert r["io_s"] > 0 and r["compute_s"] > 0 and r["total_s"] > 0
        assert r["ratio_runs"] == [pytest.approx(t / max(i, c)) for i, c, t in
                                   zip(r["io_runs_s"], r["compute_runs_s"], r["total_runs_s"])]
        assert 0 < r["fill_s"] < r["total_s"]
    assert res["emulated_gpu"] is True and res["verbs"] in ("fake", "real")
    assert any(e["ph"] == "X" for e in json.loads(trace.read_text())["traceEvents"])
    assert bench_graph.EMULATED_BANNER
    assert cli_main(["bench", "graph", "--requests", "0"]) == 2
