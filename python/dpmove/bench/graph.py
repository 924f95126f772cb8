"""``dpmove bench graph``: does the transfer-graph executor overlap I/O with compute?

A stream of ``--requests`` prefill requests of ``--model``, each with ``--hit-blocks`` cached
Full Blocks (distinct blocks, read from one flat file of Full Blocks under ``--dir``, O_DIRECT
where the filesystem allows it) and ``--new-tokens`` new tokens, runs through
``dpmove.kv.executor.GraphExecutor`` on two engines in this process (PE with a GPU - the
emulated one without CUDA - and DE, verbs peers both ways: the in-process fake HCA without an
RDMA device). The compute step of every layer is a calibrated sleep.

Per read side (``--sides``) and mode (``--modes``: layerwise, or basic = every layer moved
before the first compute), medians over ``--repeat`` paired repeats after a warm-up run:

  io s       the whole stream with a compute step that does nothing (loads, moves, returns)
  compute s  the compute steps alone: ``requests x layers`` calibrated sleeps back to back
  total s    the whole stream with the sleeps
  fill ms    of total: from the start to the first compute (the first request's loads, which
             nothing can hide: its layer 0 needs every one of its blocks)
  ratio      total / max(io, compute), per repeat (the three runs of a repeat back to back),
             median, min and max: 1.0 is perfect overlap; the target is <= 1.15

The sleep per layer is ``--layer-ms``, or (default) ``--compute-ratio`` x the measured io time
spread over every layer of every request (measured on two more io-only runs), so compute and
I/O are balanced (compute ratio 1.0: the hardest case for overlap). Staging holds
``--staging-requests`` requests' blocks and ``--max-active`` requests are admitted at once, so
request r + 1 loads while request r computes. Under the emulated GPU and the fake HCA every copy
and write is a host memcpy on the same CPUs as everything else: the figures say whether the
schedule overlaps, not what a GPU or a NIC would reach.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import _core
from ..engine import Engine, entries
from ..kv.executor import GraphExecutor
from ..kv.graph import build_graph
from ..kv.model import PRESETS, ModelSpec, get_model
from .common import Table, dump_json, median, parse_list

EMULATED_BANNER = "EMULATED GPU (no CUDA device): host memcpy timings, not GPU measurements"
FAKE_VERBS_BANNER = "FAKE HCA (no RDMA device): verbs writes are in-process memcpy"
MODES = ("layerwise", "basic")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "graph",
        help="transfer-graph executor: I/O time, compute time, overlapped total and their ratio",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="ds-27b", help=f"model preset (default ds-27b); known: {', '.join(PRESETS)}")
    p.add_argument("--requests", type=int, default=16, help="requests in the stream (default 16)")
    p.add_argument("--hit-blocks", type=int, default=32, help="cached Full Blocks per request (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--sides", default="pe,de", help="comma list of read sides pe, de (default both)")
    p.add_argument("--modes", default="layerwise", help="comma list of layerwise, basic (default layerwise)")
    p.add_argument("--layer-ms", type=float, default=None, help="compute sleep per layer in ms (default: calibrated)")
    p.add_argument("--compute-ratio", type=float, default=1.0,
                   help="without --layer-ms: total compute / measured io time (default 1.0: balanced)")
    p.add_argument("--staging-requests", type=int, default=2, help="PE staging budget in requests' blocks (default 2)")
    p.add_argument("--max-active", type=int, default=2, help="requests admitted at once (default 2)")
    p.add_argument("--gpu-buffers", type=int, default=2, help="GPU layer buffers, layerwise (default 2)")
    p.add_argument("--load-group", type=int, default=4, help="blocks per storage read request (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per figure (default 3)")
    p.add_argument("--gpu", choices=("auto", "cuda", "emulated"), default="auto", help="PE GPU (default auto)")
    p.add_argument("--verbs", choices=("auto", "real", "fake"), default="auto",
                   help="auto (default): an RDMA device when one is usable, else the in-process fake HCA")
    p.add_argument("--dir", default=None, help="where the block file goes (default: the system temp dir)")
    p.add_argument("--direct", choices=("auto", "on", "off"), default="auto", help="O_DIRECT reads (default auto)")
    p.add_argument("--seed", type=int, default=1, help="block data and key order seed (default 1)")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-", help="write results as JSON to PATH (or stdout)")
    p.add_argument("--trace", metavar="PATH", help="Chrome trace of the last overlapped run of the first row")
    p.set_defaults(func=main)


class FlatFileStore:
    """The block-store interface over one flat file of Full Blocks, ``slot_bytes`` apart (the
    Full Block padded to 4 KiB): ``read(keys, region, region_offsets)`` is one ``Engine.read`` of
    whole slots. The bench's store; it verifies nothing."""

    class _Read:
        def __init__(self, req: Any) -> None:
            self.req = req

        @property
        def done(self) -> bool:
            return self.req.done

        def wait(self, timeout_s: Optional[float] = None) -> bool:
            return self.req.wait(timeout_s) != _core.RequestState.PENDING

        def result(self) -> None:
            self.req.result()

        def cancel(self) -> bool:
            return self.req.cancel()

        def wait_quiesced(self, timeout_s: Optional[float] = None) -> bool:
            return self.req.wait_quiesced(timeout_s)

    def __init__(self, engine: Engine, spec: ModelSpec, path: str, keys: Sequence[bytes], direct: Any) -> None:
        self.spec = spec
        self.slot_bytes = spec.full_block_stride()
        self.engine = engine
        self.index = {k: i for i, k in enumerate(keys)}
        self.file = engine.open(path, "r", direct=direct)

    def read(self, keys: Sequence[bytes], region: Any, region_offsets: np.ndarray, *,
             traffic_class: Optional[str] = None, timeout_s: Optional[float] = None) -> "FlatFileStore._Read":
        idx = np.fromiter((self.index[k] for k in keys), dtype=np.int64, count=len(keys))
        rows = entries(idx * self.slot_bytes, np.asarray(region_offsets, dtype=np.int64), self.slot_bytes)
        return self._Read(self.engine.read(self.file, region, rows, timeout_s=timeout_s, traffic_class=traffic_class))


def _sleep_overshoot_s() -> float:
    """Median time.sleep() overshoot for 1 ms sleeps here."""
    xs = []
    for _ in range(20):
        t = time.perf_counter()
        time.sleep(1e-3)
        xs.append(time.perf_counter() - t - 1e-3)
    return max(statistics.median(xs), 0.0)


def calibrated_sleep(seconds: float, overshoot_s: float) -> Callable[[Any], None]:
    """A compute step that sleeps `seconds` (time.sleep of seconds - overshoot: GIL released)."""
    target = max(seconds - overshoot_s, 0.0)

    def compute(ctx: Any) -> None:
        time.sleep(target)
    return compute


def _noop(ctx: Any) -> None:
    return None


def _measure(ex: GraphExecutor, graphs: list, bufs: list, args: argparse.Namespace, spec: ModelSpec,
             overshoot: float) -> Dict[str, Any]:
    """Runs the three figures `args.repeat` times, paired (io-only, compute-only, overlapped in
    each repeat, so a disk that drifts between runs moves all three alike). Returns the per-repeat
    lists (seconds), the per-repeat ratios, the sleep per layer and the last overlapped result."""
    ex.run(graphs, _noop, de_buffers=bufs)  # warm-up: page faults, registrations, connections
    calib = [ex.run(graphs, _noop, de_buffers=bufs).wall_ns / 1e9 for _ in range(2)]
    layer_s = (args.layer_ms / 1e3 if args.layer_ms is not None
               else args.compute_ratio * median(calib) / (args.requests * spec.num_layers))
    compute = calibrated_sleep(layer_s, overshoot)
    out: Dict[str, Any] = {"layer_s": layer_s, "io": [], "compute": [], "total": [], "fill": [], "ratio": []}
    for _ in range(args.repeat):
        io_s = ex.run(graphs, _noop, de_buffers=bufs).wall_ns / 1e9
        t = time.perf_counter()
        for _ in range(args.requests * spec.num_layers):
            compute(None)
        compute_s = time.perf_counter() - t
        res = ex.run(graphs, compute, de_buffers=bufs)
        total_s = res.wall_ns / 1e9
        first = min(e.start_ns for e in res.timeline.events if e.kind == "compute")
        out["io"].append(io_s)
        out["compute"].append(compute_s)
        out["total"].append(total_s)
        out["fill"].append((first - res.timeline.t0_ns) / 1e9)
        out["ratio"].append(total_s / max(io_s, compute_s))
        out["last"] = res
    return out


def _make_block_file(path: str, spec: ModelSpec, num_blocks: int, rng: np.random.Generator) -> None:
    stride = spec.full_block_stride()
    with open(path, "wb") as f:
        chunk = np.zeros(stride, dtype=np.uint8)
        for _ in range(num_blocks):
            chunk[: spec.full_block_bytes] = rng.integers(0, 256, spec.full_block_bytes, dtype=np.uint8)
            f.write(chunk.tobytes())


def _check(args: argparse.Namespace) -> Optional[str]:
    for name in ("requests", "hit_blocks", "new_tokens", "staging_requests", "max_active", "gpu_buffers", "load_group",
                 "repeat"):
        v = getattr(args, name)
        if v < (0 if name == "hit_blocks" else 1):
            return f"--{name.replace('_', '-')} must be >= {0 if name == 'hit_blocks' else 1}, got {v}"
    if args.layer_ms is not None and not args.layer_ms > 0:
        return f"--layer-ms must be > 0, got {args.layer_ms}"
    if not args.compute_ratio > 0:
        return f"--compute-ratio must be > 0, got {args.compute_ratio}"
    for s in parse_list(args.sides):
        if s not in ("pe", "de"):
            return f"--sides: unknown side {s!r} (pe, de)"
    for m in parse_list(args.modes):
        if m not in MODES:
            return f"--modes: unknown mode {m!r} ({', '.join(MODES)})"
    return None


def main(args: argparse.Namespace) -> int:
    err = _check(args)
    if err:
        print(f"dpmove bench graph: error: {err}", file=sys.stderr)
        return 2
    spec = get_model(args.model)
    sides = parse_list(args.sides)
    modes = parse_list(args.modes)
    verbs_ok, verbs_why = _core.verbs_usable()
    use_fake = args.verbs == "fake" or (args.verbs == "auto" and not verbs_ok)
    if args.verbs == "real" and not verbs_ok:
        print(f"dpmove bench graph: error: no usable RDMA device: {verbs_why}", file=sys.stderr)
        return 2
    prev_provider = _core._verbs_provider()
    if use_fake:
        _core._verbs_set_provider("fake")
    direct = {"auto": "auto", "on": True, "off": False}[args.direct]
    rng = np.random.default_rng(args.seed)
    workdir = tempfile.mkdtemp(prefix="dpmove-bench-graph-", dir=args.dir)
    engines: List[Engine] = []
    try:
        path = os.path.join(workdir, "blocks")
        num_blocks = args.requests * args.hit_blocks
        _make_block_file(path, spec, max(num_blocks, 1), rng)
        keys = [f"b{i}".encode() for i in range(max(num_blocks, 1))]
        order = rng.permutation(num_blocks)
        hb = args.hit_blocks
        req_keys = [[keys[j] for j in order[r * hb:(r + 1) * hb]] for r in range(args.requests)]
        pe = Engine(gpu=args.gpu, name="bench-pe")
        de = Engine(gpu=args.gpu, name="bench-de")
        engines += [pe, de]
        emulated = bool(pe.gpu_info()["emulated"])
        pe_to_de = pe.connect(de.metadata(), transport="verbs")
        de_to_pe = de.connect(pe.metadata(), transport="verbs")
        pe_store = FlatFileStore(pe, spec, path, keys, direct)
        de_store = FlatFileStore(de, spec, path, keys, direct)
        overshoot = _sleep_overshoot_s()
        if emulated:
            print(f"# {EMULATED_BANNER}", file=sys.stderr)
        if use_fake:
            print(f"# {FAKE_VERBS_BANNER}", file=sys.stderr)
        print(f"# {spec.name}: {args.requests} requests x ({args.hit_blocks} hit blocks of {spec.full_block_bytes} B + "
              f"{args.new_tokens} new tokens), {spec.num_layers} layers; staging {args.staging_requests} requests, "
              f"{args.max_active} active; O_DIRECT {pe_store.file.direct}; sleep overshoot {overshoot * 1e6:.0f} us "
              f"(compensated); medians of {args.repeat}", file=sys.stderr)
        table = Table([("side", 5, ""), ("mode", 10, ""), ("GB loaded", 10, ".3f"), ("layer ms", 9, ".3f"),
                       ("io s", 8, ".3f"), ("compute s", 10, ".3f"), ("total s", 8, ".3f"), ("fill ms", 8, ".1f"),
                       ("ratio", 7, ".3f"), ("min", 6, ".3f"), ("max", 6, ".3f"), ("load GB/s", 10, ".3f")],
                      out=sys.stdout)
        rows: List[Dict[str, Any]] = []
        trace_done = False
        for side in sides:
            for mode in modes:
                layerwise = mode == "layerwise"
                graphs = [build_graph(spec, k, args.new_tokens, side, layerwise=layerwise, load_group=args.load_group,
                                      gpu_layer_buffers=args.gpu_buffers if layerwise else None) for k in req_keys]
                ex = GraphExecutor(pe, de, pe_to_de=pe_to_de, de_to_pe=de_to_pe, pe_store=pe_store, de_store=de_store,
                                   staging_budget_bytes=args.staging_requests * hb * pe_store.slot_bytes,
                                   max_active_requests=args.max_active)
                with ex:
                    m = _measure(ex, graphs, [de.alloc(ex.de_buffer_bytes(g)) for g in graphs], args, spec, overshoot)
                if args.trace and not trace_done:
                    m["last"].timeline.save(args.trace)
                    trace_done = True
                loaded = args.requests * args.hit_blocks * spec.full_block_bytes
                row = {"side": side, "mode": mode, "bytes_loaded": loaded, "layer_s": m["layer_s"],
                       "io_s": median(m["io"]), "compute_s": median(m["compute"]), "total_s": median(m["total"]),
                       "fill_s": median(m["fill"]), "ratio": median(m["ratio"]),
                       "load_gbps": loaded / median(m["io"]) / 1e9, "io_runs_s": m["io"],
                       "compute_runs_s": m["compute"], "total_runs_s": m["total"], "fill_runs_s": m["fill"],
                       "ratio_runs": m["ratio"]}
                rows.append(row)
                table.row([side, mode, loaded / 1e9, m["layer_s"] * 1e3, row["io_s"], row["compute_s"], row["total_s"],
                           row["fill_s"] * 1e3, row["ratio"], min(m["ratio"]), max(m["ratio"]), row["load_gbps"]])
        if args.json:
            dump_json({"model": spec.name, "requests": args.requests, "hit_blocks": args.hit_blocks,
                       "new_tokens": args.new_tokens, "emulated_gpu": emulated, "verbs": "fake" if use_fake else "real",
                       "direct": bool(pe_store.file.direct), "sleep_overshoot_s": overshoot,
                       "staging_requests": args.staging_requests, "max_active": args.max_active, "rows": rows},
                      args.json)
        pe_to_de.close()
        de_to_pe.close()
        return 0
    finally:
        for e in engines:
            e.close()
        if use_fake:
            _core._verbs_set_provider("fake" if prev_provider == "fake" else "real")
        shutil.rmtree(workdir, ignore_errors=True)
