"""Runs transfer graphs (``dpmove.kv.graph``) on engines, streaming, and records what ran when.

One ``GraphExecutor`` binds the two sides of a prefill:

- the PE: its Engine (with a GPU: device regions hold the layer buffers), its block store (for
  PE-read loads into the PE host staging buffer) and a Peer to the DE engine (returns: PE GPU
  -> DE host KV buffer);
- the DE: its Engine (the request's host KV buffers live there, exposed to the PE), its block
  store (DE-read loads straight into the KV buffer) and a Peer to the PE engine (DE-read puts:
  DE host -> PE GPU).

``run(graphs, compute)`` executes a PE batch: several requests in FIFO order. Every node whose
dependencies are done is submitted at once as an asynchronous request (``store.read``,
``Engine.copy``, ``Peer.write``); compute nodes run on one compute thread (one GPU), strictly in
request order, then layer order. The caller's thread dispatches. It learns of completions
without spinning: each in-flight operation is watched by a waiter thread blocked in its
``wait()`` (GIL released), which wakes the dispatcher when it ends, as the compute thread does
after each call; the dispatcher also re-polls every ``poll_interval_s`` as a safety net.

Streaming and where overlap comes from:

- Within a request, layer ``l + 1``'s move (h2d or put) runs while layer ``l`` computes
  (double-buffered GPU layer buffers, see the graph). A request cannot overlap its own loads
  with its compute: layer 0 needs layer 0 of every hit block, and a load brings whole Full
  Blocks, so every load of a request ends before its first compute starts.
- Across requests, request ``r + 1``'s loads run while request ``r`` computes: up to
  ``max_active_requests`` requests are *active* (admitted, GPU layer buffers assigned) at a
  time, and a PE-read request is admitted only when its staging slots fit in the staging budget.
  With a budget for two requests, the storage reads of the next request hide behind the compute
  of the current one; that is how a stream of requests reaches total ~ max(I/O, compute).
- Loads go to storage in FIFO order, at most ``max_inflight_loads`` load nodes in flight per
  read side: a later request's reads queue behind an earlier one's instead of sharing the
  device with them, so the first request starts computing after its own reads, not after both.

Memory:

- PE host staging (PE-read): one region of at most ``staging_budget_bytes``, cut into slots of
  ``pe_store.slot_bytes`` (the store reads one Full Block, padded, per slot). A request holds
  ``hit_blocks`` slots from admission until its last h2d is done. A request needing more slots
  than the whole budget raises ValueError before anything runs, naming the minimum budget.
- PE GPU: one device region (``pe_engine.device_alloc``), ``max_active_requests`` partitions of
  ``num_gpu_buffers x layer stride`` bytes (layer stride: ``total_tokens x
  bytes_per_token_per_layer`` rounded up to 512 B). Layer buffer ``k`` of a request is at
  ``partition + k x layer stride``: ``[total_tokens, bytes_per_token_per_layer]`` contiguous, hit
  tokens then new tokens. Exposed to the DE engine for puts.
- DE host KV buffer, per request: ``total_blocks x de_block_stride`` bytes, block ``b`` at
  ``b x de_block_stride`` in Full Block layout (Layer Block ``l`` at ``+ l x
  layer_block_bytes``). ``de_block_stride`` is the DE store's ``slot_bytes`` (DE-read loads
  land there), else ``spec.full_block_stride()``. Caller-supplied (``de_buffers=``) or
  allocated on the DE engine; exposed for the run, returned in ``RunResult``.

Transports: returns read PE device memory and DE-read puts write PE device memory; only the
verbs transport moves device memory (shm and tcp read and write with the CPU), so both peers
must be verbs peers: anything else raises ValueError naming the transport.

Failures: the first failure (a submit that raises, a request that fails or times out, a compute
that raises) stops dispatch; everything in flight is cancelled where it can be and waited for
(``wait_quiesced`` where the handle has it, else ``wait``; store reads then get ``result()`` so
the store verifies and releases what it pinned), the compute thread finishes its current call and
skips the rest, and ``ExecutionError`` is raised, naming the request and node, with the original
exception as ``__cause__`` and the timeline so far. Compute calls are not bounded by
``timeout_s``; an operation still running after ``timeout_s`` is named in the message, and the
executor then drops its staging and GPU memory so a later run does not share it.

Timeline: every node gets one event (request, node, kind, side, lane, start and end in
``time.perf_counter_ns`` ns). A transfer starts just before its submit call and ends when the
dispatcher sees it done (woken by its waiter thread); a compute starts and ends on the compute
thread. A node is submitted only after every dependency was seen done, so its start
is never before its dependencies' ends. ``Timeline.to_chrome_trace()`` gives Chrome trace JSON.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np

from ..net import parse_metadata
from .graph import TransferGraph

__all__ = [
    "ComputeContext",
    "ExecutionError",
    "GraphExecutor",
    "RunResult",
    "Timeline",
    "TimelineEvent",
]

GPU_LAYER_ALIGN = 512  # bytes: layer buffers start at multiples of this inside a partition
TRANSFER_KINDS = ("load", "h2d", "put", "return")
DEFAULT_TRAFFIC_CLASSES: Dict[str, Optional[str]] = {"load": "kv_load", "h2d": "kv_load", "put": "kv_load",
                                                     "return": "kv_load"}
LANE_OF_KIND = {"load": "storage", "h2d": "h2d", "put": "put", "compute": "compute", "return": "return"}
_SIDE_PID = {"pe": 1, "de": 2}


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


# --- timeline ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineEvent:
    """What one node did: request index in the batch, node id and name, kind, issuing side,
    lane (``"storage.0"``, ``"compute.0"``, ...: concurrent operations of one kind on one side get
    separate lanes), start and end (``time.perf_counter_ns``), payload bytes, and whether it
    succeeded."""

    request: int
    node: int
    name: str
    kind: str
    side: str
    layer: Optional[int]
    lane: str
    start_ns: int
    end_ns: int
    nbytes: int
    ok: bool = True

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class Timeline:
    """The events of one run, in the order they ended; ``t0_ns`` is the run's start."""

    def __init__(self, t0_ns: int, events: Optional[List[TimelineEvent]] = None) -> None:
        self.t0_ns = t0_ns
        self.events: List[TimelineEvent] = list(events or [])

    def __len__(self) -> int:
        return len(self.events)

    def event(self, request: int, node: int) -> TimelineEvent:
        """The event of node `node` of request `request`; KeyError when it did not run."""
        for e in self.events:
            if e.request == request and e.node == node:
                return e
        raise KeyError(f"no event for request {request} node {node}")

    def of(self, request: Optional[int] = None, kind: Optional[str] = None) -> List[TimelineEvent]:
        """Events filtered by request and / or kind, sorted by start."""
        return sorted((e for e in self.events if (request is None or e.request == request)
                       and (kind is None or e.kind == kind)), key=lambda e: e.start_ns)

    def busy_ns(self, kind: str) -> int:
        """Time during which at least one node of `kind` ran (union of intervals), ns."""
        spans = sorted((e.start_ns, e.end_ns) for e in self.events if e.kind == kind)
        total, cur_s, cur_e = 0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return total

    def to_chrome_trace(self) -> Dict[str, Any]:
        """Chrome trace event format (chrome://tracing, Perfetto): one complete event (``ph``
        ``"X"``) per node, ``ts`` / ``dur`` in microseconds from the run's start, ``pid`` per side
        (1 PE, 2 DE), ``tid`` per lane; plus ``"M"`` metadata events naming processes and lanes."""
        tids: Dict[Tuple[str, str], int] = {}
        out: List[Dict[str, Any]] = []
        for side, pid in _SIDE_PID.items():
            out.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": side.upper()}})
        for e in sorted(self.events, key=lambda e: e.start_ns):
            key = (e.side, e.lane)
            if key not in tids:
                tids[key] = len([k for k in tids if k[0] == e.side]) + 1
                out.append({"name": "thread_name", "ph": "M", "pid": _SIDE_PID[e.side], "tid": tids[key],
                            "args": {"name": e.lane}})
            out.append({
                "name": f"r{e.request} {e.name}", "cat": e.kind, "ph": "X",
                "ts": (e.start_ns - self.t0_ns) / 1e3, "dur": max(e.end_ns - e.start_ns, 0) / 1e3,
                "pid": _SIDE_PID[e.side], "tid": tids[key],
                "args": {"request": e.request, "node": e.node, "layer": e.layer, "bytes": e.nbytes, "ok": e.ok},
            })
        return {"traceEvents": out, "displayTimeUnit": "ms"}

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes ``to_chrome_trace()`` as JSON to `path`."""
        with open(path, "w") as f:
            json.dump(self.to_chrome_trace(), f)


# --- results and errors --------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeContext:
    """What a compute call gets. The layer buffer is ``region[offset : offset + hit_bytes +
    new_bytes]`` on the PE engine's device: ``[total_tokens, bytes_per_token_per_layer]``, the hit
    tokens' KV of `layer` first (already moved there), then room for the new tokens' KV, which the
    compute must write (``region`` is device memory: use ``engine.copy``)."""

    request: int
    layer: int
    graph: TransferGraph
    engine: Any
    region: Any
    offset: int
    hit_bytes: int
    new_bytes: int

    @property
    def nbytes(self) -> int:
        return self.hit_bytes + self.new_bytes


class ExecutionError(RuntimeError):
    """A run failed: ``request`` (index in the batch) and ``node`` (the graph Node, or None when
    the failure belongs to no node) say where; ``__cause__`` is the original exception;
    ``timeline`` holds the events up to the failure (the failed node's with ``ok=False``)."""

    def __init__(self, message: str, request: Optional[int], node: Any, timeline: Timeline) -> None:
        super().__init__(message)
        self.request = request
        self.node = node
        self.timeline = timeline


@dataclass(frozen=True)
class RunResult:
    """A finished run: per request its DE host KV buffer (a Region on the DE engine) and block
    stride, the timeline, and the wall time of the whole run in ns."""

    graphs: Tuple[TransferGraph, ...]
    de_buffers: Tuple[Any, ...]
    de_block_strides: Tuple[int, ...]
    timeline: Timeline
    wall_ns: int

    def kv_bytes(self, request: int) -> np.ndarray:
        """The DE KV buffer of `request` as a uint8 NumPy view (total_blocks x stride bytes)."""
        g = self.graphs[request]
        return self.de_buffers[request].numpy()[: g.total_blocks * self.de_block_strides[request]]

    def layer_kv(self, request: int, layer: int) -> np.ndarray:
        """`layer`'s KV of every token of `request`, gathered from its DE buffer:
        a ``[total_tokens, bytes_per_token_per_layer]`` uint8 copy."""
        g = self.graphs[request]
        spec = g.spec
        buf = self.kv_bytes(request)
        stride = self.de_block_strides[request]
        base = spec.layer_block_offset(layer)
        parts = [buf[b * stride + base: b * stride + base + g.block_tokens_of(b) * spec.bytes_per_token_per_layer]
                 for b in range(g.total_blocks)]
        return np.concatenate(parts).reshape(g.total_tokens, spec.bytes_per_token_per_layer)


# --- the executor --------------------------------------------------------------------------------


class _Req:
    """Run state of one request."""

    def __init__(self, index: int, graph: TransferGraph, de_buf: Any, de_stride: int) -> None:
        self.index = index
        self.graph = graph
        self.de_buf = de_buf
        self.de_stride = de_stride
        self.de_handle: Any = None
        self.slots: Optional[np.ndarray] = None  # staging slot of each hit block (PE-read)
        self.part: Optional[int] = None  # GPU partition
        self.layer_stride = _round_up(graph.layer_bytes, GPU_LAYER_ALIGN)
        self.admitted = False
        n = len(graph.nodes)
        self.dependents = graph.dependents()
        # Deps still to see done. A compute node does not count its earlier layers' computes:
        # the compute thread runs them in order before it, so it may be queued behind them.
        self.blocking = [0] * n
        for node in graph.nodes:
            for d in node.deps:
                if not (node.kind == "compute" and graph.nodes[d].kind == "compute"):
                    self.blocking[node.id] += 1
        self.nodes_left = n
        self.moves_left = len(graph.nodes_of(graph.move_kind))
        self.computes = [nd.id for nd in graph.nodes if nd.kind == "compute"]


class _Op:
    __slots__ = ("handle", "lane", "node", "req", "start_ns")

    def __init__(self, req: _Req, node: Any, handle: Any, start_ns: int, lane: str) -> None:
        self.req = req
        self.node = node
        self.handle = handle
        self.start_ns = start_ns
        self.lane = lane


class _Waiters:
    """Threads that block in ``handle.wait()`` (GIL released) for in-flight operations and set
    `wake` when one ends, so the dispatcher sleeps on one Event instead of polling. One thread
    per operation in flight at the peak, reused; stopped by ``stop()``."""

    def __init__(self, wake: threading.Event, timeout_s: float) -> None:
        self.wake = wake
        self.timeout_s = timeout_s
        self.q: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0
        self.threads: List[threading.Thread] = []

    def watch(self, handle: Any) -> None:
        with self.lock:
            spawn = self.idle == 0
            if not spawn:
                self.idle -= 1
        if spawn:
            t = threading.Thread(target=self._loop, name=f"dpmove-kv-waiter-{len(self.threads)}", daemon=True)
            self.threads.append(t)
            t.start()
        self.q.put(handle)

    def _loop(self) -> None:
        while True:
            h = self.q.get()
            if h is None:
                return
            # Bounded: every operation has its own deadline; the bound only guards a store whose
            # read never ends. A wait that raises still wakes the dispatcher, which reads the outcome.
            with contextlib.suppress(Exception):
                h.wait(self.timeout_s)
            self.wake.set()
            with self.lock:
                self.idle += 1

    def stop(self, timeout_s: float) -> None:
        for _ in self.threads:
            self.q.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(deadline - time.monotonic(), 0.0))


class _Failure(Exception):
    """Internal: carries where a failure happened up to run()."""

    def __init__(self, req: Optional[_Req], node: Any, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.req = req
        self.node = node
        self.cause = cause


class GraphExecutor:
    """Executes transfer graphs on a PE and a DE engine; see the module docstring.

    pe_engine: the PE's dpmove.Engine (needs a GPU, real or ``gpu="emulated"``).
    de_engine: the DE's Engine (host KV buffers).
    pe_to_de: a verbs Peer from pe_engine to de_engine (returns).
    de_to_pe: a verbs Peer from de_engine to pe_engine (DE-read requests with hit blocks).
    pe_store / de_store: block stores bound to pe_engine / de_engine: ``spec``, ``slot_bytes``,
    ``read(keys, region, region_offsets, traffic_class=, timeout_s=)`` returning an object with
    ``done``, ``wait(timeout_s) -> bool``, ``result()`` (raises on failure) and optionally
    ``cancel()``; needed for requests with hit blocks read on that side.
    staging_budget_bytes: PE host staging for PE-read loads, bytes (>= 0).
    max_active_requests: requests admitted at once (>= 1; each holds a GPU partition).
    max_inflight_loads: load nodes (store.read calls) in flight per read side, issued in request
    order (>= 1).
    copy_backend: the ``Engine.copy`` backend of h2d moves.
    traffic_classes: per transfer kind (``load``, ``h2d``, ``put``, ``return``) the QoS class
    (default ``kv_load``; None: the engine's default class).
    timeout_s: the deadline of every transfer, seconds.
    poll_interval_s: the longest the dispatcher sleeps without a wake-up before it polls
    everything in flight again (a safety net: waiter threads wake it when an operation ends).
    device: the GPU index on the PE.
    """

    def __init__(
        self,
        pe_engine: Any,
        de_engine: Any,
        *,
        pe_to_de: Any,
        de_to_pe: Any = None,
        pe_store: Any = None,
        de_store: Any = None,
        staging_budget_bytes: int = 0,
        max_active_requests: int = 2,
        max_inflight_loads: int = 8,
        copy_backend: str = "auto",
        traffic_classes: Optional[Mapping[str, Optional[str]]] = None,
        timeout_s: float = 60.0,
        poll_interval_s: float = 5e-3,
        device: int = 0,
    ) -> None:
        for name, eng in (("pe_engine", pe_engine), ("de_engine", de_engine)):
            if eng is None or not all(hasattr(eng, a) for a in ("alloc", "expose", "metadata", "copy")):
                raise TypeError(f"{name} must be a dpmove.Engine, got {type(eng).__name__}")
        if pe_engine.gpu_info().get("provider") == "off":
            raise ValueError("pe_engine has no GPU (gpu='off'); the PE's layer buffers are device memory: "
                             "use gpu='auto', 'cuda' or 'emulated'")
        self._check_peer("pe_to_de", pe_to_de, de_engine, "returns read PE device memory", required=True)
        self._check_peer("de_to_pe", de_to_pe, pe_engine, "DE-read puts write PE device memory", required=False)
        for name, store in (("pe_store", pe_store), ("de_store", de_store)):
            if store is not None:
                if not all(hasattr(store, a) for a in ("spec", "slot_bytes", "read")):
                    raise TypeError(f"{name} must be a block store (spec, slot_bytes, read), got "
                                    f"{type(store).__name__}")
                if store.slot_bytes < store.spec.full_block_bytes:
                    raise ValueError(f"{name}.slot_bytes ({store.slot_bytes} B) is smaller than a Full Block "
                                     f"({store.spec.full_block_bytes} B)")
        self.staging_budget_bytes = self._int_arg("staging_budget_bytes", staging_budget_bytes, 0)
        self.max_active_requests = self._int_arg("max_active_requests", max_active_requests, 1)
        self.max_inflight_loads = self._int_arg("max_inflight_loads", max_inflight_loads, 1)
        self.device = self._int_arg("device", device, 0)
        for name, v in (("timeout_s", timeout_s), ("poll_interval_s", poll_interval_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if not isinstance(copy_backend, str):
            raise TypeError(f"copy_backend must be a str, got {type(copy_backend).__name__}")
        classes = dict(DEFAULT_TRAFFIC_CLASSES)
        if traffic_classes is not None:
            unknown = set(traffic_classes) - set(TRANSFER_KINDS)
            if unknown:
                raise ValueError(f"traffic_classes: unknown kind(s) {sorted(unknown)}; known: "
                                 f"{', '.join(TRANSFER_KINDS)}")
            classes.update(traffic_classes)
        self.pe_engine = pe_engine
        self.de_engine = de_engine
        self.pe_to_de = pe_to_de
        self.de_to_pe = de_to_pe
        self.pe_store = pe_store
        self.de_store = de_store
        self.copy_backend = copy_backend
        self.traffic_classes = classes
        self.timeout_s = float(timeout_s)
        self.poll_interval_s = float(poll_interval_s)
        self._staging: Any = None
        self._gpu: Any = None
        self._gpu_handle: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def _int_arg(name: str, v: Any, minimum: int) -> int:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if v < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {int(v)}")
        return int(v)

    @staticmethod
    def _check_peer(name: str, peer: Any, target: Any, why: str, required: bool) -> None:
        if peer is None:
            if required:
                raise ValueError(f"{name} is required: {why}")
            return
        if not hasattr(peer, "write") or not hasattr(peer, "transport"):
            raise TypeError(f"{name} must be a dpmove.Peer, got {type(peer).__name__}")
        if peer.transport != "verbs":
            raise ValueError(f"{name} uses the {peer.transport!r} transport, but {why}, which only 'verbs' can move "
                             f"(shm and tcp copy with the CPU); connect with transport='verbs'")
        want = parse_metadata(target.metadata())["engine_id"]
        got = peer.remote.get("engine_id")
        if got != want:
            raise ValueError(f"{name} is connected to engine {peer.remote.get('name')!r} ({got}), not to the engine it "
                             f"must write to ({want})")

    # --- geometry ----------------------------------------------------------------------------
    def de_block_stride(self, graph: TransferGraph) -> int:
        """Bytes between blocks in the DE KV buffer of `graph`: the DE store's slot_bytes when
        there is a DE store of this model, else ``spec.full_block_stride()``."""
        if self.de_store is not None and self.de_store.spec == graph.spec:
            return int(self.de_store.slot_bytes)
        return graph.spec.full_block_stride()

    def de_buffer_bytes(self, graph: TransferGraph) -> int:
        """Size a DE KV buffer for `graph` needs: total_blocks x de_block_stride."""
        return graph.total_blocks * self.de_block_stride(graph)

    def staging_bytes_needed(self, graph: TransferGraph) -> int:
        """PE host staging `graph` holds while active: hit_blocks x pe_store.slot_bytes
        (PE-read), else 0."""
        if graph.read_side != "pe" or graph.hit_blocks == 0:
            return 0
        if self.pe_store is None:
            raise ValueError("a PE-read request with hit blocks needs pe_store")
        return graph.hit_blocks * int(self.pe_store.slot_bytes)

    @staticmethod
    def gpu_bytes(graph: TransferGraph) -> int:
        """PE device memory one active request of `graph` uses: num_gpu_buffers layer buffers."""
        return graph.num_gpu_buffers * _round_up(graph.layer_bytes, GPU_LAYER_ALIGN)

    # --- validation --------------------------------------------------------------------------
    def _validate(self, graphs: Sequence[TransferGraph], de_buffers: Optional[Sequence[Any]]) -> None:
        for i, g in enumerate(graphs):
            if not isinstance(g, TransferGraph):
                raise TypeError(f"graphs[{i}] must be a TransferGraph (dpmove.kv.graph.build_graph), got "
                                f"{type(g).__name__}")
            if g.hit_blocks == 0:
                continue
            if g.hit_keys is None:
                raise ValueError(f"request {i}: its graph was built from a block count; the executor needs the hit "
                                 "block keys (build_graph(spec, keys, ...))")
            store, sname = (self.pe_store, "pe_store") if g.read_side == "pe" else (self.de_store, "de_store")
            if store is None:
                raise ValueError(f"request {i} is {g.read_side.upper()}-read with {g.hit_blocks} hit blocks: the "
                                 f"executor needs {sname}")
            if store.spec != g.spec:
                raise ValueError(f"request {i}: graph model {g.spec} differs from {sname}.spec {store.spec}")
            if g.read_side == "de" and self.de_to_pe is None:
                raise ValueError(f"request {i} is DE-read with hit blocks: the executor needs de_to_pe (a verbs Peer "
                                 "from the DE engine to the PE engine)")
            need = self.staging_bytes_needed(g)
            if need > self.staging_budget_bytes:
                raise ValueError(
                    f"request {i} (PE-read, {g.hit_blocks} hit blocks x {self.pe_store.slot_bytes} B slots) needs "
                    f"{need} B of PE host staging, more than staging_budget_bytes ({self.staging_budget_bytes} B): "
                    f"the budget must be at least {need} B")
        if de_buffers is not None:
            if len(de_buffers) != len(graphs):
                raise ValueError(f"de_buffers: expected one per graph ({len(graphs)}), got {len(de_buffers)}")
            for i, (g, b) in enumerate(zip(graphs, de_buffers)):
                if getattr(b, "location", None) != "host":
                    raise ValueError(f"de_buffers[{i}] must be a host Region of the DE engine (Engine.alloc), "
                                     f"got {b!r}")
                if len(b) < self.de_buffer_bytes(g):
                    raise ValueError(f"de_buffers[{i}] holds {len(b)} B; request {i} needs {self.de_buffer_bytes(g)} B "
                                     f"({g.total_blocks} blocks x {self.de_block_stride(g)} B)")

    # --- memory ------------------------------------------------------------------------------
    def _prepare_memory(self, graphs: Sequence[TransferGraph]) -> Tuple[int, int]:
        """Allocates (or reuses) staging and the GPU pool; returns (staging slots, partition bytes)."""
        num_slots = 0
        if self.pe_store is not None:
            slot = int(self.pe_store.slot_bytes)
            want = sum(self.staging_bytes_needed(g) for g in graphs)
            num_slots = min(self.staging_budget_bytes, want) // slot
            if num_slots and (self._staging is None or len(self._staging) < num_slots * slot):
                self._staging = None
                self._staging = self.pe_engine.alloc(num_slots * slot)
        part = max(self.gpu_bytes(g) for g in graphs)
        num_parts = min(self.max_active_requests, len(graphs))
        if self._gpu is None or len(self._gpu) < part * num_parts:
            self._release_gpu()
            self._gpu = self.pe_engine.device_alloc(part * num_parts, device=self.device)
        if self._gpu_handle is None and any(g.read_side == "de" and g.hit_blocks for g in graphs):
            self._gpu_handle = self.pe_engine.expose(self._gpu, writable=True)
        return num_slots, part

    def _release_gpu(self) -> None:
        if self._gpu_handle is not None:
            self.pe_engine.unexpose(self._gpu_handle)
            self._gpu_handle = None
        self._gpu = None

    def close(self) -> None:
        """Drops the staging buffer and the GPU pool (unexposing it). Idempotent."""
        with self._lock:
            self._release_gpu()
            self._staging = None

    def __enter__(self) -> "GraphExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- run ---------------------------------------------------------------------------------
    def run(
        self,
        graphs: Union[TransferGraph, Sequence[TransferGraph]],
        compute: Callable[[ComputeContext], Any],
        *,
        de_buffers: Optional[Sequence[Any]] = None,
    ) -> RunResult:
        """Runs a PE batch (one graph per request, FIFO) to the end; see the module docstring.

        compute(ctx) is called once per request and layer, on the compute thread, in request
        then layer order; it must write the new tokens' KV into the layer buffer before it
        returns. de_buffers: one host Region per graph on the DE engine, at least
        ``de_buffer_bytes(graph)`` bytes (None: allocated here, zeroed). Raises ValueError /
        TypeError before anything runs for bad input, ExecutionError when a node fails.
        """
        if isinstance(graphs, TransferGraph):
            graphs = [graphs]
        graphs = list(graphs)
        if not graphs:
            raise ValueError("graphs is empty: expected at least one TransferGraph")
        if not callable(compute):
            raise TypeError(f"compute must be callable as compute(ctx), got {type(compute).__name__}")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("GraphExecutor.run is already running (one run at a time)")
        try:
            self._validate(graphs, de_buffers)
            return _Run(self, graphs, compute, de_buffers).execute()
        finally:
            self._lock.release()


class _Run:
    """One execution of a batch; owns the dispatch loop and the compute thread."""

    def __init__(self, ex: GraphExecutor, graphs: List[TransferGraph], compute: Callable[[ComputeContext], Any],
                 de_buffers: Optional[Sequence[Any]]) -> None:
        self.ex = ex
        self.compute_fn = compute
        self.num_slots, self.part_bytes = ex._prepare_memory(graphs)
        self.free_slots: List[int] = list(range(self.num_slots))
        self.free_parts: List[int] = list(range(min(ex.max_active_requests, len(graphs))))
        self.reqs: List[_Req] = []
        for i, g in enumerate(graphs):
            buf = de_buffers[i] if de_buffers is not None else ex.de_engine.alloc(ex.de_buffer_bytes(g))
            self.reqs.append(_Req(i, g, buf, ex.de_block_stride(g)))
        self.compute_order: List[Tuple[_Req, int]] = [(r, nid) for r in self.reqs for nid in r.computes]
        self.compute_cursor = 0
        self.next_admit = 0
        self.ready: List[Tuple[int, int]] = []  # heap of (request index, node id): moves and returns
        # Loads per read side, FIFO (request order, then block order), and how many are in flight.
        self.loads: Dict[str, Deque[Tuple[_Req, Any]]] = {"pe": deque(), "de": deque()}
        self.loads_inflight: Dict[str, int] = {"pe": 0, "de": 0}
        self.inflight: List[_Op] = []
        self.computing = 0  # compute nodes queued or running
        self.lanes: Dict[Tuple[str, str], List[bool]] = {}
        self.t0 = time.perf_counter_ns()
        self.timeline = Timeline(self.t0)
        self.compute_q: "queue.Queue[Optional[Tuple[_Req, Any, ComputeContext]]]" = queue.Queue()
        self.compute_done: Deque[Tuple[_Req, Any, int, int, Optional[BaseException]]] = deque()
        self.wake = threading.Event()
        self.abort = threading.Event()
        self.thread = threading.Thread(target=self._compute_loop, name="dpmove-kv-compute", daemon=True)
        self.waiters = _Waiters(self.wake, ex.timeout_s + 1.0)

    # --- the compute thread --------------------------------------------------------------------
    def _compute_loop(self) -> None:
        while True:
            item = self.compute_q.get()
            if item is None:
                return
            req, node, ctx = item
            if self.abort.is_set():
                continue
            start = time.perf_counter_ns()
            exc: Optional[BaseException] = None
            try:
                self.compute_fn(ctx)
            except BaseException as e:  # noqa: BLE001 - handed to the dispatcher, which raises it
                exc = e
                self.abort.set()
            self.compute_done.append((req, node, start, time.perf_counter_ns(), exc))
            self.wake.set()

    # --- lanes -------------------------------------------------------------------------------
    def _take_lane(self, side: str, kind: str) -> str:
        base = LANE_OF_KIND[kind]
        busy = self.lanes.setdefault((side, base), [])
        for i, b in enumerate(busy):
            if not b:
                busy[i] = True
                return f"{base}.{i}"
        busy.append(True)
        return f"{base}.{len(busy) - 1}"

    def _free_lane(self, side: str, lane: str) -> None:
        base, idx = lane.rsplit(".", 1)
        self.lanes[(side, base)][int(idx)] = False

    # --- admission and completion --------------------------------------------------------------
    def _admit(self) -> bool:
        progressed = False
        while self.next_admit < len(self.reqs) and self.free_parts:
            r = self.reqs[self.next_admit]
            g = r.graph
            need = g.hit_blocks if g.read_side == "pe" else 0
            if need > len(self.free_slots):
                break
            if need:
                r.slots = np.array(self.free_slots[:need], dtype=np.int64)
                del self.free_slots[:need]
            r.part = self.free_parts.pop(0)
            r.de_handle = self.ex.de_engine.expose(r.de_buf, writable=True)
            r.admitted = True
            self.next_admit += 1
            for node in g.nodes:
                if node.kind == "load":
                    self.loads[node.side].append((r, node))
                elif r.blocking[node.id] == 0 and node.kind != "compute":
                    heapq.heappush(self.ready, (r.index, node.id))
            progressed = True
        return progressed

    def _complete(self, r: _Req, node: Any) -> None:
        if node.kind == "load":
            self.loads_inflight[node.side] -= 1
        r.nodes_left -= 1
        for d in r.dependents[node.id]:
            dep = r.graph.nodes[d]
            if dep.kind == "compute" and node.kind == "compute":
                continue  # not counted: ordered by the compute thread
            r.blocking[d] -= 1
            if r.blocking[d] == 0 and dep.kind != "compute":
                heapq.heappush(self.ready, (r.index, d))
        if node.kind == r.graph.move_kind:
            r.moves_left -= 1
            if r.moves_left == 0 and r.slots is not None:
                self.free_slots.extend(int(s) for s in r.slots)
                self.free_slots.sort()
                r.slots = None
        if r.nodes_left == 0:
            self.ex.de_engine.unexpose(r.de_handle)
            r.de_handle = None
            self.free_parts.append(r.part)
            self.free_parts.sort()

    def _record(self, r: _Req, node: Any, lane: str, start: int, end: int, ok: bool) -> None:
        self.timeline.events.append(TimelineEvent(r.index, node.id, node.name, node.kind, node.side, node.layer, lane,
                                                  start, end, node.nbytes, ok))

    # --- submission ----------------------------------------------------------------------------
    def _gpu_offset(self, r: _Req, buffer: int) -> int:
        return r.part * self.part_bytes + buffer * r.layer_stride

    def _submit(self, r: _Req, node: Any) -> Any:
        ex = self.ex
        g = r.graph
        spec = g.spec
        lb = spec.layer_block_bytes
        tc = ex.traffic_classes
        if node.kind == "load":
            blocks = np.arange(node.first_block, node.end_block, dtype=np.int64)
            keys = list(g.hit_keys[node.first_block:node.end_block])
            if g.read_side == "pe":
                offsets = r.slots[blocks] * int(ex.pe_store.slot_bytes)
                return ex.pe_store.read(keys, ex._staging, offsets, traffic_class=tc["load"], timeout_s=ex.timeout_s)
            return ex.de_store.read(keys, r.de_buf, blocks * r.de_stride, traffic_class=tc["load"],
                                    timeout_s=ex.timeout_s)
        layer_off = spec.layer_block_offset(node.layer)
        gpu_base = self._gpu_offset(r, node.buffer)
        if node.kind == "h2d":
            i = np.arange(g.hit_blocks, dtype=np.int64)
            rows = np.stack([gpu_base + i * lb, r.slots * int(ex.pe_store.slot_bytes) + layer_off,
                             np.full_like(i, lb)], axis=1)
            return ex.pe_engine.copy(ex._gpu, ex._staging, rows, backend=ex.copy_backend, timeout_s=ex.timeout_s,
                                     traffic_class=tc["h2d"])
        if node.kind == "put":
            i = np.arange(g.hit_blocks, dtype=np.int64)
            rows = np.stack([gpu_base + i * lb, i * r.de_stride + layer_off, np.full_like(i, lb)], axis=1)
            return ex.de_to_pe.write(r.de_buf, ex._gpu_handle, rows, timeout_s=ex.timeout_s, traffic_class=tc["put"])
        if node.kind == "return":
            b = np.arange(node.first_block, node.end_block, dtype=np.int64)
            lengths = np.full_like(b, lb)
            if node.end_block == g.total_blocks:
                lengths[-1] = g.last_block_tokens * spec.bytes_per_token_per_layer
            rows = np.stack([b * r.de_stride + layer_off, gpu_base + b * lb, lengths], axis=1)
            return ex.pe_to_de.write(ex._gpu, r.de_handle, rows, timeout_s=ex.timeout_s, traffic_class=tc["return"])
        raise AssertionError(f"not a transfer node: {node.kind}")

    def _start(self, r: _Req, node: Any) -> None:
        lane = self._take_lane(node.side, node.kind)
        start = time.perf_counter_ns()
        try:
            handle = self._submit(r, node)
        except BaseException as e:
            self._record(r, node, lane, start, time.perf_counter_ns(), False)
            raise _Failure(r, node, e) from e
        self.inflight.append(_Op(r, node, handle, start, lane))
        self.waiters.watch(handle)

    def _dispatch(self) -> bool:
        progressed = False
        while self.ready:
            ri, nid = heapq.heappop(self.ready)
            r = self.reqs[ri]
            self._start(r, r.graph.nodes[nid])
            progressed = True
        for side, q in self.loads.items():
            while q and self.loads_inflight[side] < self.ex.max_inflight_loads:
                r, node = q.popleft()
                self.loads_inflight[side] += 1
                self._start(r, node)
                progressed = True
        while self.compute_cursor < len(self.compute_order):
            r, nid = self.compute_order[self.compute_cursor]
            if not r.admitted or r.blocking[nid]:
                break
            node = r.graph.nodes[nid]
            ctx = ComputeContext(request=r.index, layer=node.layer, graph=r.graph, engine=self.ex.pe_engine,
                                 region=self.ex._gpu, offset=self._gpu_offset(r, node.buffer),
                                 hit_bytes=r.graph.hit_layer_bytes, new_bytes=r.graph.new_layer_bytes)
            self.compute_q.put((r, node, ctx))
            self.computing += 1
            self.compute_cursor += 1
            progressed = True
        return progressed

    def _reap(self) -> bool:
        progressed = False
        while self.compute_done:
            r, node, start, end, exc = self.compute_done.popleft()
            self.computing -= 1
            self._record(r, node, "compute.0", start, end, exc is None)
            if exc is not None:
                raise _Failure(r, node, exc) from exc
            self._complete(r, node)
            progressed = True
        still: List[_Op] = []
        for i, op in enumerate(self.inflight):
            if not op.handle.done:
                still.append(op)
                continue
            end = time.perf_counter_ns()
            self._free_lane(op.node.side, op.lane)
            try:
                op.handle.result()
            except BaseException as e:
                self._record(op.req, op.node, op.lane, op.start_ns, end, False)
                self.inflight = still + self.inflight[i + 1:]
                raise _Failure(op.req, op.node, e) from e
            self._record(op.req, op.node, op.lane, op.start_ns, end, True)
            self._complete(op.req, op.node)
            progressed = True
        self.inflight = still
        return progressed

    # --- the loop ------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        self.thread.start()
        try:
            while True:
                self.wake.clear()
                progressed = self._reap()
                progressed |= self._admit()
                progressed |= self._dispatch()
                if all(r.nodes_left == 0 for r in self.reqs):
                    break
                if progressed:
                    continue
                if self.inflight or self.computing:
                    self.wake.wait(self.ex.poll_interval_s)
                else:
                    raise _Failure(None, None, RuntimeError(
                        f"executor stalled: nothing in flight, {len(self.reqs) - self.next_admit} request(s) not "
                        f"admitted ({len(self.free_slots)} staging slots free)"))
        except BaseException as e:
            self._drain()
            if self.inflight or self.thread.is_alive():
                # Something may still write into staging or the GPU pool: the next run gets
                # fresh memory (these are freed once nothing uses them).
                self.ex._staging = None
                with contextlib.suppress(Exception):
                    self.ex._release_gpu()
            if isinstance(e, _Failure):
                where = "run" if e.req is None else f"request {e.req.index}"
                what = "" if e.node is None else f" node {e.node.id} {e.node.name} ({e.node.side})"
                leftover = self._leftover()
                raise ExecutionError(f"{where}{what} failed: {type(e.cause).__name__}: {e.cause}{leftover}",
                                     None if e.req is None else e.req.index, e.node, self.timeline) from e.cause
            raise
        wall = time.perf_counter_ns() - self.t0
        self._stop_compute_thread(self.ex.timeout_s)
        self.waiters.stop(self.ex.timeout_s)
        return RunResult(graphs=tuple(r.graph for r in self.reqs), de_buffers=tuple(r.de_buf for r in self.reqs),
                         de_block_strides=tuple(r.de_stride for r in self.reqs), timeline=self.timeline, wall_ns=wall)

    def _stop_compute_thread(self, timeout_s: float) -> None:
        self.compute_q.put(None)
        self.thread.join(timeout_s)

    def _drain(self) -> None:
        """After a failure: cancel and wait for everything in flight, let each store read finish
        its own bookkeeping (``result()``: verification, releasing the blocks it pinned; its
        outcome is dropped), stop the compute thread and the waiters, unexpose the requests' DE
        buffers. Never raises."""
        self.abort.set()
        deadline = time.monotonic() + self.ex.timeout_s
        for op in self.inflight:
            cancel = getattr(op.handle, "cancel", None)
            if cancel is not None:
                with contextlib.suppress(Exception):  # best effort; the wait below bounds it
                    cancel()
        still = []
        for op in self.inflight:
            h = op.handle
            left = max(deadline - time.monotonic(), 0.0)
            try:
                quiesce = getattr(h, "wait_quiesced", None)
                ended = quiesce(left) if quiesce is not None else (h.wait(left) or h.done)
            except Exception:  # noqa: BLE001 - a wait that raises counts as not ended
                ended = bool(getattr(h, "done", False))
            if not ended:
                still.append(op)
                continue
            with contextlib.suppress(Exception):  # the run already failed for another reason
                h.result()
        self.inflight = still
        self._stop_compute_thread(max(deadline - time.monotonic(), 0.0))
        self.waiters.stop(max(deadline - time.monotonic(), 0.0))
        for r in self.reqs:
            if r.de_handle is not None:
                with contextlib.suppress(Exception):
                    self.ex.de_engine.unexpose(r.de_handle)
                r.de_handle = None

    def _leftover(self) -> str:
        parts = []
        if self.inflight:
            parts.append(f"{len(self.inflight)} operation(s) still in flight after {self.ex.timeout_s} s: "
                         + ", ".join(f"r{op.req.index} {op.node.name}" for op in self.inflight[:8]))
        if self.thread.is_alive():
            parts.append("the compute thread is still in a compute call")
        return "" if not parts else "; " + "; ".join(parts)
