"""``dpmove bench ssd``: file reads and writes through dpmove, optionally next to fio.

Each case keeps `qd` I/Os of `bs` bytes in flight on one worker (one ring) for `runtime`
seconds - the same thing fio does with ``ioengine=io_uring iodepth=qd numjobs=1`` - and
reports GB/s (1e9 bytes/s), IOPS and p50/p99 latency per I/O (submission to completion, us).
With ``--fio`` the same case runs under fio in the same invocation, paired run by run
(alternating which goes first), and ``dpmove/fio`` is the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import deque
from typing import Any, Dict, List, Optional

import numpy as np

from ..engine import Engine, entries
from ..kv.model import get_model
from .common import Table, dump_json, fmt_size, median, parse_list, parse_size, percentiles_us

RW_MODES = ("read", "randread", "write", "randwrite")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ssd",
        help="sequential/random reads and writes of a file (O_DIRECT), optionally against fio",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--file", help="file to test; default: dpmove-bench.dat in --dir, created and removed by the bench")
    p.add_argument("--dir", default=".", help="directory for the default test file (default: current directory)")
    p.add_argument("--size", default="1g", help="bytes of the file the I/O spans (default 1g); the file is filled with random data if smaller")
    p.add_argument("--rw", default="randread,read", help=f"comma list of {', '.join(RW_MODES)} (default randread,read)")
    p.add_argument("--bs", default="64k,512k,2m", help="comma list of block sizes (default 64k,512k,2m)")
    p.add_argument("--qd", default="1,16,64", help="comma list of queue depths (default 1,16,64)")
    p.add_argument("--runtime", type=float, default=1.0, help="seconds per case and run (default 1.0)")
    p.add_argument("--repeat", type=int, default=1, help="paired runs per case; medians are reported (default 1)")
    p.add_argument("--buffered", action="store_true", help="use the page cache instead of O_DIRECT")
    p.add_argument("--backend", default=None, help="dpmove backend: auto, io_uring, threadpool (default: auto / $DPMOVE_BACKEND)")
    p.add_argument("--fio", action="store_true", help="compare mode: run fio (ioengine=io_uring) on the same file and settings")
    p.add_argument("--fio-args", default="", help="extra fio arguments for the compare mode, e.g. '--fixedbufs=1 --registerfiles=1'")
    p.add_argument("--kv", metavar="MODEL", help="KV mode: random reads of whole Full Blocks of MODEL (deepseek-v3.2, ds-27b, qwen2.5-32b); replaces --bs")
    p.add_argument("--submit-cost", action="store_true", help="measure the Python submission cost per entry of batches of 4 KiB reads, then exit")
    p.add_argument("--overwrite", action="store_true", help="allow write cases on a --file that existed before")
    p.add_argument("--keep", action="store_true", help="keep the default test file afterwards")
    p.add_argument("--seed", type=int, default=1, help="random offsets seed (default 1)")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-", help="write results as JSON to PATH (or stdout)")
    p.set_defaults(func=main)


# --- the test file ---------------------------------------------------------------------------

def prepare_file(path: str, size: int, backend: Optional[str]) -> bool:
    """Makes `path` at least `size` bytes of random data (written with dpmove, O_DIRECT where
    possible, then fsync'd). Returns True when it had to write."""
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return False
    chunk = 8 << 20
    print(f"preparing {path}: writing {size / 1e9:.2f} GB of random data ...", file=sys.stderr, flush=True)
    rng = np.random.default_rng(12345)
    with Engine(backend, num_workers=1, queue_depth=8) as eng:
        f = eng.open(path, "rw", direct="auto")
        per = 8
        buf = eng.alloc(chunk * per)
        buf.numpy()[:] = rng.integers(0, 256, chunk * per, dtype=np.uint8)
        align = max(f.alignment, 1)
        total = -(-size // align) * align
        off = 0
        while off < total:
            n = min(per, -(-(total - off) // chunk))
            lens = np.minimum(chunk, total - off - np.arange(n) * chunk)
            eng.write(f, buf, entries(off + np.arange(n) * chunk, np.arange(n) * chunk, lens), timeout_s=None).result()
            off += int(lens.sum())
        f.sync(data_only=False)
        f.close()
    return True


# --- one dpmove run --------------------------------------------------------------------------

def run_dpmove(path: str, rw: str, bs: int, qd: int, span: int, runtime: float, direct: bool,
               backend: Optional[str], seed: int) -> Dict[str, Any]:
    write = rw.endswith("write")
    rand = rw.startswith("rand")
    nblocks = span // bs
    if nblocks < 1:
        raise ValueError(f"--size {span} is smaller than one block of {bs} bytes")
    # Requests of `chunk` entries, three outstanding, keep the ring full while Python makes the
    # next one; chunk grows until one request lasts >= 20 ms, so Python's per-request cost
    # (~20 us) stays far below the I/O time even at hundreds of thousands of IOPS.
    chunk = max(4 * qd, 32)
    nslots = qd  # one buffer per I/O in flight, like fio's io_units (reads overwrite them freely)
    rng = np.random.default_rng(seed)
    with Engine(backend, num_workers=1, queue_depth=qd) as eng:
        f = eng.open(path, "r+" if write else "r", direct=direct)
        buf = eng.alloc(nslots * bs)
        if write:
            buf.numpy()[:] = rng.integers(0, 256, nslots * bs, dtype=np.uint8)
        submit = eng.write if write else eng.read
        seq = [0]

        def batch(n: int) -> np.ndarray:
            if rand:
                blocks = rng.integers(0, nblocks, n)
            else:
                blocks = (seq[0] + np.arange(n)) % nblocks
                seq[0] = int(blocks[-1]) + 1
            return entries(blocks * bs, (np.arange(n) % nslots) * bs, bs)

        submit(f, buf, batch(chunk), timeout_s=None).result()  # warm-up: ring, registrations, device
        lat: List[np.ndarray] = []
        nbytes = nios = 0
        t0 = time.perf_counter()
        inflight = deque((submit(f, buf, batch(chunk), timeout_s=None, timing=True), time.perf_counter()) for _ in range(3))
        while inflight:
            r, t_sub = inflight.popleft()
            r.result()
            now = time.perf_counter()
            if now - t_sub < 0.02 * 3 and chunk < 65536:
                chunk *= 2
            if now - t0 < runtime:
                inflight.append((submit(f, buf, batch(chunk), timeout_s=None, timing=True), time.perf_counter()))
            lat.append(r.latency_ns)
            nbytes += r.bytes_done
            nios += len(r)
        elapsed = time.perf_counter() - t0
        stats = eng.stats()
        f.close()
    p50, p99 = percentiles_us(np.concatenate(lat))
    return {"gbps": nbytes / elapsed / 1e9, "iops": nios / elapsed, "p50_us": p50, "p99_us": p99,
            "bytes": nbytes, "ios": nios, "seconds": elapsed, "backend": eng.backend,
            "fixed_buffer_ops": stats["fixed_buffer_ops"], "ops": stats["ops_submitted"]}


# --- one fio run -----------------------------------------------------------------------------

def run_fio(path: str, rw: str, bs: int, qd: int, span: int, runtime: float, direct: bool, extra: str) -> Dict[str, Any]:
    cmd = ["fio", "--name=dpmove-compare", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
           "--ioengine=io_uring", f"--direct={int(direct)}", f"--size={(span // bs) * bs}", f"--runtime={runtime}",
           "--time_based=1", "--ramp_time=0", "--norandommap=1", "--randrepeat=0", "--invalidate=0",
           "--lat_percentiles=1", "--numjobs=1", "--output-format=json"] + extra.split()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    text = out.stdout[out.stdout.index("{"):]  # fio may print notes before the JSON
    job = json.loads(text)["jobs"][0]
    side = job["write" if rw.endswith("write") else "read"]
    pct = side.get("lat_ns", {}).get("percentile") or side.get("clat_ns", {}).get("percentile", {})
    elapsed = job.get("job_runtime", side.get("runtime", 0)) / 1e3
    return {"gbps": side["bw_bytes"] / 1e9, "iops": side["iops"],
            "p50_us": pct.get("50.000000", float("nan")) / 1e3, "p99_us": pct.get("99.000000", float("nan")) / 1e3,
            "bytes": side["io_bytes"], "ios": side["total_ios"], "seconds": elapsed}


# --- submission cost -------------------------------------------------------------------------

def submit_cost(path: str, backend: Optional[str], reps: int = 50) -> List[Dict[str, Any]]:
    """Median wall time of Engine.read() itself (validation, copy, hand-off; not the I/O) per
    entry, for batches of 4 KiB reads of a cached file."""
    rows = []
    bs = 4096
    with Engine(backend, num_workers=1, queue_depth=64) as eng:
        f = eng.open(path, "r", direct=False)
        nblocks = max(1, min(f.size(), 64 << 20) // bs)
        for n in (1, 16, 256, 4096, 65536):
            buf = eng.alloc(n * bs)
            rng = np.random.default_rng(n)
            batch = entries(rng.integers(0, nblocks, n) * bs, np.arange(n) * bs, bs)
            eng.read(f, buf, batch).result()  # warm: page cache, registration
            costs = []
            for _ in range(reps * 10 if n <= 16 else reps if n <= 4096 else max(5, reps // 10)):
                t0 = time.perf_counter_ns()
                r = eng.read(f, buf, batch)
                t1 = time.perf_counter_ns()
                r.result()
                costs.append((t1 - t0) / n)
            rows.append({"entries": n, "us_per_entry": median(costs) / 1e3, "us_per_call": median(costs) * n / 1e3})
            buf.close()
        f.close()
    return rows


# --- driver ----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    rws = parse_list(args.rw)
    for rw in rws:
        if rw not in RW_MODES:
            raise SystemExit(f"dpmove bench ssd: unknown --rw {rw!r}; choose from {', '.join(RW_MODES)}")
    qds = parse_list(args.qd, int)
    direct = not args.buffered
    if args.kv:
        spec = get_model(args.kv)
        bss = [spec.full_block_stride(4096)]
        if args.rw == "randread,read":
            rws = ["randread"]
    else:
        bss = parse_list(args.bs, parse_size)
    if args.fio and not shutil.which("fio"):
        raise SystemExit("dpmove bench ssd --fio: fio is not installed (Debian: apt-get install fio)")

    own_file = args.file is None
    path = args.file or os.path.join(args.dir, "dpmove-bench.dat")
    existed = os.path.exists(path)
    if any(rw.endswith("write") for rw in rws) and existed and not own_file and not args.overwrite:
        raise SystemExit(f"dpmove bench ssd: write cases would overwrite {path}; pass --overwrite")
    meta = {"host": platform.node(), "kernel": platform.release(), "file": os.path.abspath(path), "span_bytes": size,
            "direct": direct, "runtime_s": args.runtime, "repeat": args.repeat, "units": {"gbps": "1e9 bytes/s", "latency": "us, submission to completion"}}

    try:
        if args.submit_cost:
            prepare_file(path, min(size, 64 << 20), args.backend)
            rows = submit_cost(path, args.backend)
            t = Table([("batch", 8, "d"), ("us/entry", 9, ".3f"), ("us/call", 10, ".1f")])
            print("# Engine.read() cost from Python, 4 KiB entries, median; the I/O itself is not timed")
            for r in rows:
                t.row([r["entries"], r["us_per_entry"], r["us_per_call"]])
            if args.json:
                dump_json({"meta": meta, "submit_cost": rows}, args.json)
            return 0

        prepare_file(path, size, args.backend)
        if args.kv:
            print(f"# KV mode: {spec.name} Full Block = {spec.full_block_bytes} B "
                  f"({spec.num_layers} layers x {spec.block_tokens} tokens x {spec.bytes_per_token_per_layer} B), "
                  f"read as {bss[0]} B (padded to 4 KiB for O_DIRECT)")
        cols = [("case", 30, ""), ("GB/s", 7, ".3f"), ("IOPS", 9, ".0f"), ("p50 us", 9, ".1f"), ("p99 us", 9, ".1f")]
        if args.fio:
            cols += [("fio GB/s", 9, ".3f"), ("fio p50", 9, ".1f"), ("fio p99", 9, ".1f"), ("dpmove/fio", 10, ".3f")]
        table = Table(cols)
        results = []
        for rw in rws:
            for bs in bss:
                for qd in qds:
                    runs, fio_runs, ratios = [], [], []
                    for rep in range(args.repeat):
                        order = ("dpmove", "fio") if rep % 2 == 0 else ("fio", "dpmove")
                        got: Dict[str, Dict[str, Any]] = {}
                        for who in order:
                            if who == "dpmove":
                                got[who] = run_dpmove(path, rw, bs, qd, size, args.runtime, direct, args.backend, args.seed + rep)
                            elif args.fio:
                                got[who] = run_fio(path, rw, bs, qd, size, args.runtime, direct, args.fio_args)
                        runs.append(got["dpmove"])
                        if args.fio:
                            fio_runs.append(got["fio"])
                            ratios.append(got["dpmove"]["gbps"] / got["fio"]["gbps"] if got["fio"]["gbps"] else float("nan"))
                    name = f"{'kv:' + args.kv if args.kv else rw} {fmt_size(bs)} qd{qd}"
                    res = {"case": name, "rw": rw, "bs": bs, "qd": qd, "backend": runs[0]["backend"],
                           "gbps": median(r["gbps"] for r in runs), "iops": median(r["iops"] for r in runs),
                           "p50_us": median(r["p50_us"] for r in runs), "p99_us": median(r["p99_us"] for r in runs),
                           "runs": runs}
                    row = [name, res["gbps"], res["iops"], res["p50_us"], res["p99_us"]]
                    if args.fio:
                        res.update({"fio_gbps": median(r["gbps"] for r in fio_runs), "fio_p50_us": median(r["p50_us"] for r in fio_runs),
                                    "fio_p99_us": median(r["p99_us"] for r in fio_runs), "ratio": median(ratios),
                                    "fio_runs": fio_runs, "ratios": ratios})
                        row += [res["fio_gbps"], res["fio_p50_us"], res["fio_p99_us"], res["ratio"]]
                    table.row(row)
                    results.append(res)
        if args.json:
            dump_json({"meta": meta, "cases": results}, args.json)
        return 0
    finally:
        if own_file and not existed and not args.keep and os.path.exists(path):
            os.unlink(path)
