"""``dpmove bench store``: random Full Block reads through the block store vs raw reads.

Fills a store of MODEL's Full Blocks (``--size`` bytes of slots), then for each queue depth
runs, paired and alternating which goes first:

- ``store``: ``BlockStore.read`` of random keys, ``qd`` blocks in flight on one worker (one
  ring), each block looked up in the index, pinned while read, verified (trailer, key and
  XXH3-64 of the data) and unpinned;
- ``raw``: ``dpmove bench ssd`` KV mode on the store's own segment file: random O_DIRECT reads
  of the same slot size at the same depth, with no index and no verification.

``store/raw`` is the median of the per-pair GB/s ratios: what the index, pins and checksums
cost. Bytes count whole slots (the Full Block padded to 4 KiB with its trailer), as the raw
reads do.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import deque
from typing import Any, Dict, List, Optional

import numpy as np

from ..engine import Engine
from ..kv.model import PRESETS, get_model
from ..kv.store import BlockStore
from .common import Table, dump_json, median, parse_list, parse_size
from .ssd import run_dpmove


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "store",
        help="random Full Block reads through the block store (index, pins, checksums) vs raw reads of the same file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kv", default="deepseek-v3.2", metavar="MODEL",
                   help=f"model geometry: {', '.join(n for n in PRESETS)} (default deepseek-v3.2)")
    p.add_argument("--dir", default=".", help="where the store directory is made (default: current directory)")
    p.add_argument("--store", help="use this existing or new store directory and keep it (default: a temporary one, removed)")
    p.add_argument("--size", default="1g", help="bytes of blocks in the store (default 1g)")
    p.add_argument("--qd", default="1,16,64", help="comma list of queue depths in blocks (default 1,16,64)")
    p.add_argument("--runtime", type=float, default=1.0, help="seconds per case and run (default 1.0)")
    p.add_argument("--repeat", type=int, default=3, help="paired runs per case; medians are reported (default 3)")
    p.add_argument("--backend", default=None, help="dpmove backend: auto, io_uring, threadpool (default: auto / $DPMOVE_BACKEND)")
    p.add_argument("--seed", type=int, default=1, help="random keys seed (default 1)")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-", help="write results as JSON to PATH (or stdout)")
    p.set_defaults(func=main)


def fill(store: BlockStore, nblocks: int, seed: int) -> List[bytes]:
    """Puts `nblocks` blocks of random bytes as chains of 64 blocks; returns their keys."""
    spec = store.spec
    rng = np.random.default_rng(seed)
    have = len(store)
    keys: List[bytes] = []
    per = 16
    buf = store.engine.alloc(per * store.slot_bytes)
    bv = buf.numpy()
    try:
        chain = 0
        while len(keys) < nblocks:
            toks = rng.integers(0, 1 << 31, 64 * spec.block_tokens)
            ks = store.keys(toks)[: nblocks - len(keys)]
            for i in range(0, len(ks), per):
                part = ks[i:i + per]
                bv[:] = rng.integers(0, 256, bv.size, dtype=np.uint8)
                parent = ks[i - 1] if i else None
                store.put(part, parent, buf, np.arange(len(part), dtype=np.int64) * store.slot_bytes, timeout_s=None)
            keys.extend(ks)
            chain += 1
            if have == 0:
                print(f"\rfilling the store: {len(keys)}/{nblocks} blocks", end="", file=sys.stderr, flush=True)
        print("", file=sys.stderr)
    finally:
        buf.close()
    return keys


def run_store(store_dir: str, model: str, keys: List[bytes], qd: int, runtime: float, backend: Optional[str],
              seed: int) -> Dict[str, Any]:
    """Random BlockStore reads with `qd` blocks in flight on one ring: requests of max(qd, 4)
    blocks, three outstanding (the engine queues what exceeds the depth), so the ring stays full
    while Python verifies the previous request. Each outstanding request owns its third of the
    destination buffer: a block must not be overwritten before it is verified."""
    rng = np.random.default_rng(seed)
    spec = get_model(model)
    with Engine(backend, num_workers=1, queue_depth=qd) as eng, BlockStore(store_dir, spec, engine=eng) as store:
        sb = store.slot_bytes
        chunk = max(qd, 4)
        buf = eng.alloc(3 * chunk * sb)
        turn = [0]

        def submit():
            ks = [keys[i] for i in rng.integers(0, len(keys), chunk)]
            offs = (turn[0] % 3) * chunk * sb + np.arange(chunk, dtype=np.int64) * sb
            turn[0] += 1
            return store.read(ks, buf, offs)

        submit().result()  # warm-up: ring, registrations, index pages
        turn[0] = 0
        nbytes = nblocks = 0
        t0 = time.perf_counter()
        inflight = deque(submit() for _ in range(3))
        while inflight:
            r = inflight.popleft()
            r.result()  # waits, verifies, unpins; raises on any corrupt block
            if time.perf_counter() - t0 < runtime:
                inflight.append(submit())
            nbytes += chunk * sb
            nblocks += chunk
        elapsed = time.perf_counter() - t0
        buf.close()
    return {"gbps": nbytes / elapsed / 1e9, "blocks_per_s": nblocks / elapsed, "bytes": nbytes, "seconds": elapsed}


def main(args: argparse.Namespace) -> int:
    spec = get_model(args.kv)
    qds = parse_list(args.qd, int)
    if any(q <= 0 for q in qds):
        raise ValueError("--qd values must be positive")
    size = parse_size(args.size)
    own = args.store is None
    root = args.store or tempfile.mkdtemp(prefix="dpmove-bench-store-", dir=args.dir)
    try:
        with BlockStore(root, spec, capacity_bytes=max(size, 1) * 2) as store:
            nblocks = max(1, size // store.slot_bytes)
            if len(store) < nblocks:
                fill(store, nblocks - len(store), args.seed)
            import sqlite3

            db = sqlite3.connect(os.path.join(root, "index.sqlite"))
            keys = [r[0] for r in db.execute("SELECT key FROM blocks WHERE state=1")]
            segs = db.execute("SELECT id, slots FROM segments ORDER BY id").fetchall()
            db.close()
            sb = store.slot_bytes
            seg_path = os.path.join(root, "segments", f"seg-{segs[0][0]:06d}")
            span = segs[0][1] * sb
        print(f"# store: {len(keys)} blocks of {spec.name} ({spec.full_block_bytes} B Full Block, {sb} B slots) in {root}")
        print(f"# raw: bench ssd KV-mode reads ({sb} B, O_DIRECT, random) of {seg_path} ({span / 1e9:.2f} GB); "
              f"store reads span all {len(segs)} segment(s)")
        t = Table([("case", 26, ""), ("store GB/s", 10, ".3f"), ("raw GB/s", 9, ".3f"), ("store/raw", 9, ".3f"),
                   ("blocks/s", 9, ".0f")])
        results = []
        for qd in qds:
            st_runs, raw_runs, ratios = [], [], []
            for rep in range(args.repeat):
                got: Dict[str, Dict[str, Any]] = {}
                for who in (("store", "raw") if rep % 2 == 0 else ("raw", "store")):
                    if who == "store":
                        got[who] = run_store(root, args.kv, keys, qd, args.runtime, args.backend, args.seed + rep)
                    else:
                        got[who] = run_dpmove(seg_path, "randread", sb, qd, span, args.runtime, True, args.backend, args.seed + rep)
                st_runs.append(got["store"])
                raw_runs.append(got["raw"])
                ratios.append(got["store"]["gbps"] / got["raw"]["gbps"] if got["raw"]["gbps"] else float("nan"))
            res = {"case": f"kv:{args.kv} qd{qd}", "qd": qd, "slot_bytes": sb,
                   "store_gbps": median(r["gbps"] for r in st_runs), "raw_gbps": median(r["gbps"] for r in raw_runs),
                   "ratio": median(ratios), "ratios": ratios,
                   "blocks_per_s": median(r["blocks_per_s"] for r in st_runs), "store_runs": st_runs, "raw_runs": raw_runs}
            t.row([res["case"], res["store_gbps"], res["raw_gbps"], res["ratio"], res["blocks_per_s"]])
            results.append(res)
        if args.json:
            dump_json({"meta": {"host": platform.node(), "kernel": platform.release(), "store": root, "model": args.kv,
                                "blocks": len(keys), "runtime_s": args.runtime, "repeat": args.repeat,
                                "units": {"gbps": "1e9 bytes/s of slots"}}, "cases": results}, args.json)
        return 0
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
