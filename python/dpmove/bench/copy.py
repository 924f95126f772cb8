"""``dpmove bench copy``: host <-> device copies through ``Engine.copy``, per copy backend.

For each direction (h2d, d2h), copy backend and block size, one request of many blocks is
repeated: blocks packed back to back on the device, in a shuffled order of ``bs``-byte slots on
the host (a gather / scatter, like KV blocks). Model rows do the same with one Layer Block
(64 tokens of one layer) of each ``--models`` preset, ``--blocks`` of them per request, host
slots padded to 4 KiB like a KV pool; presets with the same Layer Block size share a row.

Per row (medians over the timed iterations; one verified warm-up iteration first):
  GB/s        bytes of the request / (Engine.copy() call -> Request.wait() returns), 1e9 bytes/s
  % ceil      GB/s as a share of the ceiling: one 64 MiB copy with backend cuda, per direction,
              measured in the same run
  py us/copy  time inside Engine.copy() per block (Python, validation, the backend's submit)
  core us/copy  the backend's own submit time per copy (copy_stats() submit_ns / copies:
              driver calls; batched counts one copy per block, one launch per table)
  p50/p99 us  per-block time from submission to completion (Request.latency_ns, timing=True),
              pooled over the timed iterations

Data: the host source holds random bytes; the destination is poisoned before the warm-up
iteration (``--verify-all``: before every iteration) and compared with numpy afterwards through
a single whole-span copy; any mismatch ends the bench with exit status 1.

Under the emulated GPU (no CUDA device, or ``--gpu emulated``) device memory is host memory:
every figure is a host memcpy timing, labelled so, never a GPU measurement, and the default
sizes and time budget shrink to keep the run short.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..engine import Engine, entries
from ..kv.model import PRESETS, get_model
from .common import Table, dump_json, fmt_size, median, parse_list, parse_size, percentiles_us

DIRECTIONS = ("h2d", "d2h")
BACKENDS = ("cuda", "batched", "cnic")
POISON = 0xA5
HOST_ALIGN = 4096  # bytes: host slot stride of a Layer Block is rounded up to this
EMULATED_BANNER = "EMULATED GPU (no CUDA device): host memcpy timings, not GPU measurements"
# Defaults per provider: (block-row bytes per request, model-row bytes per request, seconds per row, iterations)
DEFAULTS = {"cuda": (256 << 20, 64 << 20, 0.5, 20), "emulated": (16 << 20, 16 << 20, 0.1, 5)}
MAX_MODEL_BLOCKS = 1024


class DataMismatch(RuntimeError):
    """A copy's destination differs from what the batch says it should hold."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "copy",
        help="host<->device copies per copy backend (cuda, batched, cnic): GB/s, submit cost, latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gpu", choices=("auto", "cuda", "emulated"), default="auto",
                   help="auto (default): CUDA when a device is visible, else the emulated GPU; cuda: fail without one")
    p.add_argument("--device", type=int, default=0, help="device index (default 0)")
    p.add_argument("--backends", default="cuda,batched,cnic",
                   help=f"comma list of {', '.join(BACKENDS)} (default: all); unusable ones are skipped with the reason")
    p.add_argument("--dirs", default="h2d,d2h", help="comma list of h2d, d2h (default both)")
    p.add_argument("--sizes", default="4k,64k,1m,16m,64m", help="comma list of block sizes (default 4k,64k,1m,16m,64m)")
    p.add_argument("--models", default="default",
                   help="comma list of model presets whose Layer Blocks get rows (default: every preset but tiny; "
                        f"'none': no model rows); known: {', '.join(PRESETS)}")
    p.add_argument("--blocks", type=int, default=None,
                   help=f"Layer Blocks per model-row request (default: what fits in --model-total, at most {MAX_MODEL_BLOCKS})")
    p.add_argument("--total", default=None,
                   help="bytes per block-row request, at least one block (default 256m on a GPU, 16m emulated)")
    p.add_argument("--model-total", default=None, help="bytes per model-row request when --blocks is not given (default 64m on a GPU, 16m emulated)")
    p.add_argument("--ceiling-size", default="64m", help="bytes of the single-copy ceiling (default 64m)")
    p.add_argument("--iters", type=int, default=None, help="most timed iterations per row (default 20 on a GPU, 5 emulated)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time budget per row; at least min(3, --iters) iterations run (default 0.5 on a GPU, 0.1 emulated)")
    p.add_argument("--verify-all", action="store_true", help="poison and verify every iteration, not only the warm-up")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each request in seconds (default 60)")
    p.add_argument("--seed", type=int, default=1, help="random data and slot order seed (default 1)")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-", help="write results as JSON to PATH (or stdout)")
    p.set_defaults(func=main, _parser=p)


# --- arguments -------------------------------------------------------------------------------

class Plan:
    """Validated settings; bad ones call parser.error() (exit status 2, message on stderr)."""

    def __init__(self, args: argparse.Namespace) -> None:
        err = args._parser.error
        try:
            self.sizes = parse_list(args.sizes, parse_size)
            self.total = parse_size(args.total) if args.total is not None else None
            self.model_total = parse_size(args.model_total) if args.model_total is not None else None
            self.ceiling_size = parse_size(args.ceiling_size)
        except ValueError as exc:
            err(str(exc))
        self.backends = parse_list(args.backends)
        if not self.backends or any(b not in BACKENDS for b in self.backends):
            err(f"--backends {args.backends!r}: choose from {', '.join(BACKENDS)}")
        self.dirs = parse_list(args.dirs)
        if not self.dirs or any(d not in DIRECTIONS for d in self.dirs):
            err(f"--dirs {args.dirs!r}: choose from {', '.join(DIRECTIONS)}")
        names = str(args.models).strip().lower()
        if names == "default":
            names = ",".join(n for n in PRESETS if not n.startswith("tiny"))
        self.models: List[Any] = []
        if names not in ("", "none"):
            try:
                self.models = [get_model(n) for n in parse_list(names)]
            except ValueError as exc:
                err(f"--models: {exc}")
        if not self.sizes and not self.models:
            err("--sizes and --models: nothing to measure")
        if args.blocks is not None and not 1 <= args.blocks <= 1 << 20:
            err(f"--blocks must be in 1..{1 << 20}, got {args.blocks}")
        if args.iters is not None and args.iters < 1:
            err(f"--iters must be >= 1, got {args.iters}")
        if args.seconds is not None and not args.seconds > 0:
            err(f"--seconds must be > 0, got {args.seconds}")
        if not args.timeout > 0:
            err(f"--timeout must be > 0, got {args.timeout}")
        if args.device < 0:
            err(f"--device must be >= 0, got {args.device}")

    def finish(self, args: argparse.Namespace, emulated: bool) -> None:
        """Fills the provider-dependent defaults."""
        total, model_total, seconds, iters = DEFAULTS["emulated" if emulated else "cuda"]
        self.total = self.total or total
        self.model_total = self.model_total or model_total
        self.seconds = args.seconds if args.seconds is not None else seconds
        self.iters = args.iters if args.iters is not None else iters
        # Presets with one Layer Block size give identical rows: one row names them all.
        by_size: Dict[int, List[str]] = {}
        for m in self.models:
            by_size.setdefault(m.layer_block_bytes, [])
            if m.name not in by_size[m.layer_block_bytes]:
                by_size[m.layer_block_bytes].append(m.name)
        self.layer_blocks: List[Tuple[str, int, int]] = []  # (label, block bytes, blocks per request)
        for lb, ns in by_size.items():
            n = args.blocks or max(1, min(MAX_MODEL_BLOCKS, self.model_total // lb))
            self.layer_blocks.append(("+".join(ns), lb, n))


# --- layouts ---------------------------------------------------------------------------------

class Layout:
    """`n` blocks of `length` bytes: packed on the device (block i at i*length), in slot perm[i]
    of `stride`-byte slots on the host."""

    def __init__(self, n: int, length: int, stride: int, rng: np.random.Generator) -> None:
        self.n, self.length, self.stride = n, length, stride
        self.perm = rng.permutation(n) if n > 1 else np.zeros(1, dtype=np.int64)
        self.dev_span = n * length
        self.host_span = n * stride
        self.dev_off = np.arange(n, dtype=np.int64) * length
        self.host_off = self.perm.astype(np.int64) * stride

    @property
    def nbytes(self) -> int:
        return self.n * self.length

    def batch(self, direction: str) -> np.ndarray:
        """Engine.copy rows (dst_offset, src_offset, length)."""
        if direction == "h2d":
            return entries(self.dev_off, self.host_off, self.length)
        return entries(self.host_off, self.dev_off, self.length)

    def host_view(self, a: np.ndarray) -> np.ndarray:
        """(n, length) view of the host bytes, row i = block i."""
        return a[:self.host_span].reshape(self.n, self.stride)[self.perm, :self.length]


class Bench:
    """One engine, one device region and two host regions, sized for the largest row.

    `src` (host) holds random bytes for the whole run. The device holds src[:dev_span] whenever
    a d2h row starts (fill_device); h2d rows overwrite it and verify through a readback into
    `dst`.
    """

    def __init__(self, eng: Engine, device: int, dev_bytes: int, host_bytes: int, seed: int, timeout: float,
                 helper: str) -> None:
        self.eng = eng
        self.timeout = timeout
        self.helper = helper  # copy backend that fills / reads back whole spans for verification
        self.dev = eng.device_alloc(dev_bytes, device=device)
        self.src = eng.alloc(host_bytes)
        self.dst = eng.alloc(host_bytes)
        self.src_a = np.asarray(self.src)
        self.dst_a = np.asarray(self.dst)
        self.src_a[:] = np.frombuffer(np.random.default_rng(seed).bytes(host_bytes), dtype=np.uint8)
        self.unpinned = [name for name, r in (("src", self.src), ("dst", self.dst)) if not r.pinned]

    def close(self) -> None:
        for r in (self.dev, self.src, self.dst):
            r.close()

    def _whole(self, direction: str, nbytes: int) -> None:
        """Copies host[0:nbytes] <-> device[0:nbytes] in one entry with the helper backend."""
        if direction == "h2d":
            r = self.eng.copy(self.dev, self.dst, [(0, 0, nbytes)], backend=self.helper, timeout_s=self.timeout)
        else:
            r = self.eng.copy(self.dst, self.dev, [(0, 0, nbytes)], backend=self.helper, timeout_s=self.timeout)
        r.result()

    def fill_device(self, nbytes: int) -> None:
        """Device[0:nbytes] = src[0:nbytes]."""
        self.eng.copy(self.dev, self.src, [(0, 0, nbytes)], backend=self.helper, timeout_s=self.timeout).result()

    def prepare(self, direction: str, lay: Layout) -> None:
        """Poisons the destination span of the next copy."""
        if direction == "h2d":
            self.dst_a[:lay.dev_span] = POISON
            self._whole("h2d", lay.dev_span)
        else:
            self.dst_a[:lay.host_span] = POISON

    def verify(self, direction: str, lay: Layout, what: str) -> None:
        """Raises DataMismatch unless the destination holds the blocks and poison elsewhere."""
        if direction == "h2d":
            self._whole("d2h", lay.dev_span)  # device span -> dst[0:dev_span]
            got = self.dst_a[:lay.dev_span]
            want = np.full(lay.dev_span, POISON, dtype=np.uint8)
            want.reshape(lay.n, lay.length)[:] = lay.host_view(self.src_a)
        else:
            got = self.dst_a[:lay.host_span]
            want = np.full(lay.host_span, POISON, dtype=np.uint8)
            want.reshape(lay.n, lay.stride)[lay.perm, :lay.length] = self.src_a[:lay.dev_span].reshape(lay.n, lay.length)
        bad = np.flatnonzero(got != want)
        if bad.size:
            first = int(bad[0])
            side = "device" if direction == "h2d" else "host"
            if direction == "h2d":
                blk = first // lay.length
            else:
                slot = first // lay.stride
                hit = np.flatnonzero(lay.perm == slot)
                blk = int(hit[0]) if hit.size and first % lay.stride < lay.length else -1
            raise DataMismatch(
                f"{what}: {bad.size} of {got.size} destination bytes wrong; first at {side} offset {first} "
                f"(block {blk if blk >= 0 else 'none: padding'}): got {int(got[first]):#04x}, want {int(want[first]):#04x}")

    def run(self, direction: str, backend: str, lay: Layout, iters: int, seconds: float, verify_all: bool,
            what: str) -> Dict[str, Any]:
        """One verified warm-up, then timed iterations until `iters` or `seconds` (at least
        min(3, iters)). Returns the row's figures."""
        if direction == "d2h":
            self.fill_device(lay.dev_span)
        dst, src = (self.dev, self.src) if direction == "h2d" else (self.dst, self.dev)
        batch = lay.batch(direction)
        stat_key = backend

        def one(timed: bool) -> Optional[Dict[str, Any]]:
            s0 = self.eng.copy_stats().get(stat_key)
            clock = time.perf_counter_ns
            t0 = clock()
            req = self.eng.copy(dst, src, batch, backend=backend, timeout_s=self.timeout, timing=timed)
            t1 = clock()
            req.wait()
            t2 = clock()
            req.check()
            s1 = self.eng.copy_stats().get(stat_key)
            if not timed:
                return None
            copies = s1["copies"] - s0["copies"] if s0 is not None and s1 is not None else 0
            sub_ns = s1["submit_ns"] - s0["submit_ns"] if s0 is not None and s1 is not None else 0
            return {"seconds": (t2 - t0) / 1e9, "gbps": lay.nbytes / (t2 - t0), "py_submit_us": (t1 - t0) / lay.n / 1e3,
                    "core_submit_us": sub_ns / copies / 1e3 if copies else float("nan"), "copies": copies,
                    "launches": (s1["launches"] - s0["launches"]) if s0 is not None and s1 is not None else 0,
                    "lat": req.latency_ns}

        self.prepare(direction, lay)
        one(False)
        self.verify(direction, lay, f"{what} (warm-up)")
        runs: List[Dict[str, Any]] = []
        verified = 1
        t_end = time.perf_counter() + seconds
        while len(runs) < iters and (len(runs) < min(3, iters) or time.perf_counter() < t_end):
            if verify_all:
                self.prepare(direction, lay)
            runs.append(one(True))
            if verify_all:
                self.verify(direction, lay, f"{what} (iteration {len(runs)})")
                verified += 1
        lat = np.concatenate([r.pop("lat") for r in runs])
        p50, p99 = percentiles_us(lat)
        return {"gbps": median(r["gbps"] for r in runs), "py_submit_us": median(r["py_submit_us"] for r in runs),
                "core_submit_us": median(r["core_submit_us"] for r in runs), "p50_us": p50, "p99_us": p99,
                "request_us": median(r["seconds"] * 1e6 for r in runs), "iterations": len(runs),
                "verified_iterations": verified, "copies_per_request": runs[0]["copies"],
                "launches_per_request": runs[0]["launches"], "runs": runs}


# --- driver ----------------------------------------------------------------------------------

def _jsonable(x: Any) -> Any:
    """NaN -> None, recursively, so the JSON is strict."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def main(args: argparse.Namespace) -> int:
    plan = Plan(args)
    tout = sys.stderr if args.json == "-" else sys.stdout  # with --json - the JSON owns stdout

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    eng = Engine(gpu=args.gpu, pin_host=True, name="bench-copy")
    try:
        return _run(args, plan, eng, note, tout)
    except DataMismatch as exc:
        print(f"dpmove bench copy: DATA MISMATCH: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        eng.close()


def _run(args: argparse.Namespace, plan: Plan, eng: Engine, note: Any, tout: Any) -> int:
    from .. import __version__

    gi = eng.gpu_info()
    emulated = bool(gi.get("emulated")) or gi.get("provider") != "cuda"
    if gi.get("provider") == "off":
        raise ValueError(f"no GPU provider: {gi.get('reason')}")
    devs = gi.get("devices") or []
    if args.device >= len(devs):
        raise ValueError(f"--device {args.device}: the {gi.get('provider')} provider has {len(devs)} device(s)")
    plan.finish(args, emulated)
    if emulated:
        note(f"# {EMULATED_BANNER} ({gi.get('reason')})")

    usable: List[str] = []
    skipped: List[Dict[str, str]] = []
    for b in plan.backends:
        why = eng.copy_backend_status(b, args.device)
        if why:
            note(f"# {b}: skipped: {why}")
            skipped.append({"backend": b, "reason": why})
        else:
            usable.append(b)
    cuda_why = eng.copy_backend_status("cuda", args.device)
    helper = "cuda" if not cuda_why else "batched" if not eng.copy_backend_status("batched", args.device) else ""
    if not helper:
        raise ValueError(f"neither the cuda nor the batched copy backend works here (cuda: {cuda_why}); nothing to measure or verify with")

    rng = np.random.default_rng(args.seed)
    layouts: List[Tuple[str, Dict[str, Any], Layout]] = []  # (label, row fields, layout)
    for bs in plan.sizes:
        n = max(1, plan.total // bs)
        layouts.append((f"{fmt_size(bs)} x{n}", {"kind": "block"}, Layout(n, bs, bs, rng)))
    for label, lb, n in plan.layer_blocks:
        stride = -(-lb // HOST_ALIGN) * HOST_ALIGN
        layouts.append((f"LB {label} {lb}B x{n}", {"kind": "layer_block", "models": label.split("+")},
                        Layout(n, lb, stride, rng)))
    ceil_lay = Layout(1, plan.ceiling_size, plan.ceiling_size, rng)
    dev_bytes = max([ceil_lay.dev_span] + [lay.dev_span for _, _, lay in layouts])
    host_bytes = max([dev_bytes, ceil_lay.host_span] + [lay.host_span for _, _, lay in layouts])

    host = {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "loadavg_start": os.getloadavg()}
    meta = {"dpmove": __version__, **host, "gpu": args.gpu, "device": args.device, "emulated": emulated,
            "sizes": plan.sizes, "total_bytes": plan.total, "model_total_bytes": plan.model_total,
            "ceiling_bytes": plan.ceiling_size, "iters": plan.iters, "seconds_per_row": plan.seconds,
            "verify_all": args.verify_all, "seed": args.seed, "device_bytes": dev_bytes, "host_bytes": host_bytes,
            "units": {"gbps": "1e9 bytes/s", "py_submit_us": "us inside Engine.copy() per block",
                      "core_submit_us": "us of backend submit (copy_stats submit_ns) per copy",
                      "p50_us/p99_us": "us per block, submission to completion (Request.latency_ns)",
                      "pct_ceiling": "% of the ceiling's GB/s, same direction"}}
    note(f"# allocating {fmt_size(dev_bytes) if dev_bytes % 1024 == 0 else dev_bytes} device + 2 x {host_bytes} B pinned host")
    bench = Bench(eng, args.device, dev_bytes, host_bytes, args.seed, args.timeout, helper)
    try:
        if bench.unpinned:
            note(f"# host regions not pinned ({', '.join(bench.unpinned)}): {bench.src.pin_error or bench.dst.pin_error}")
        # The ceiling runs before and after the rows; its figure is the median over both, so a
        # drift of the host's memory bandwidth during the run moves it less.
        ceiling: Dict[str, Any] = {d: {"gbps": float("nan"), "reason": f"cuda backend unusable: {cuda_why}"} for d in plan.dirs}
        ceil_runs: Dict[str, List[Dict[str, Any]]] = {d: [] for d in plan.dirs}

        def measure_ceiling(when: str) -> None:
            for d in plan.dirs:
                if cuda_why:
                    continue
                note(f"# ceiling {d} ({when}): one {fmt_size(plan.ceiling_size)} copy, backend cuda")
                ceil_runs[d].append(bench.run(d, "cuda", ceil_lay, max(plan.iters, 5), plan.seconds, args.verify_all,
                                              f"ceiling {d} ({when})"))

        measure_ceiling("before the rows")

        rows: List[Dict[str, Any]] = []
        for d in plan.dirs:
            for b in usable:
                for label, fields, lay in layouts:
                    case = f"{d} {b} {label}"
                    note(f"# {case}")
                    r = bench.run(d, b, lay, plan.iters, plan.seconds, args.verify_all, case)
                    rows.append({"case": case, "direction": d, "backend": b, **fields, "block_bytes": lay.length,
                                 "blocks": lay.n, "host_stride": lay.stride, "bytes": lay.nbytes, **r})
        measure_ceiling("after the rows")
    finally:
        bench.close()
    for d in plan.dirs:
        if ceil_runs[d]:
            runs = [r for c in ceil_runs[d] for r in c["runs"]]
            ceiling[d] = {"gbps": median(r["gbps"] for r in runs), "bytes": plan.ceiling_size, "backend": "cuda",
                          "iterations": len(runs), "before_gbps": ceil_runs[d][0]["gbps"], "after_gbps": ceil_runs[d][-1]["gbps"],
                          "p50_us": median(c["p50_us"] for c in ceil_runs[d]), "p99_us": max(c["p99_us"] for c in ceil_runs[d]),
                          "runs": runs}
    for r in rows:
        cg = ceiling[r["direction"]]["gbps"]
        r["pct_ceiling"] = 100.0 * r["gbps"] / cg if cg == cg and cg > 0 else float("nan")
    meta["loadavg_end"] = os.getloadavg()

    def say(text: str = "") -> None:
        print(text, file=tout, flush=True)

    say()
    if emulated:
        say(f"!!! {EMULATED_BANNER} !!!")
        say(f"# provider: {gi.get('provider')} ({gi.get('reason')}); device {args.device}: {devs[args.device].get('name')}")
    else:
        dev = devs[args.device]
        say(f"# GPU {args.device}: {dev.get('name')} (compute capability {dev.get('compute_capability')}), provider {gi.get('provider')}")
    for s in skipped:
        say(f"# {s['backend']}: skipped: {s['reason']}")
    what = "host memcpy (emulated)" if emulated else "pinned host"
    for d in plan.dirs:
        c = ceiling[d]
        if c["gbps"] == c["gbps"]:
            say(f"# ceiling {d}: {c['gbps']:.2f} GB/s, one {fmt_size(plan.ceiling_size)} copy, backend cuda, {what}, "
                f"median of {c['iterations']} (before the rows {c['before_gbps']:.2f}, after {c['after_gbps']:.2f})")
        else:
            say(f"# ceiling {d}: - ({c['reason']})")
    say("# GB/s: 1e9 B/s, median of the timed iterations; us/copy: submit cost per block (py: Engine.copy(), "
        "core: backend submit_ns); p50/p99: per-block submission -> completion, us; every row's first iteration verified")
    table = Table([("case" + (" [EMULATED]" if emulated else ""), 48, ""), ("GB/s", 8, ".2f"), ("% ceil", 7, ".1f"),
                   ("py us/copy", 10, ".2f"), ("core us/copy", 12, ".2f"), ("p50 us", 9, ".1f"), ("p99 us", 9, ".1f")],
                  out=tout)
    for r in rows:
        table.row([r["case"], r["gbps"], r["pct_ceiling"], r["py_submit_us"], r["core_submit_us"], r["p50_us"], r["p99_us"]])
    if args.json:
        dump_json(_jsonable({"meta": meta, "emulated": emulated, "gpu_info": gi, "ceiling": ceiling,
                             "skipped": skipped, "rows": rows}), args.json)
    if not rows:
        print("dpmove bench copy: no copy backend could be used (see the skipped reasons above)", file=sys.stderr)
        return 1
    return 0
