"""``dpmove bench net``: one-sided writes between two processes, per transport.

The bench starts a target process itself; for two hosts run ``--role target --listen 0.0.0.0``
there and ``--role initiator --peer-metadata FILE`` here. The target allocates one region
(``--region-size``), exposes it and waits; the initiator writes batches of ``batch`` entries of
``bs`` bytes into it for ``--duration`` seconds per case, keeping ``--depth`` requests in flight,
and walks through ``--span`` bytes of both regions so that neither side is cache-resident.

Per case: GB/s (1e9 bytes/s), entries/s, and avg/p99 in us of
  prepare     building the (N, 3) entries array with dpmove.entries() (one-by-one: slicing out
              one row),
  post        the time spent inside ``Peer.write()`` until it returns,
  completion  ``write()`` returning -> the bench sees the request done (with ``--depth 1`` this
              is exact; with more, a request that finished while the bench was posting the next
              one is seen a little late).
``memcpy`` is single-threaded ``numpy.copyto`` of ``bs`` blocks between two regions in the
initiator, measured in the same run: a table per block size first, then again beside every shm
case over the same span, paired run by run with alternating order (``ratio`` is the median of
the per-pair shm/memcpy ratios), since a shared host's memory bandwidth drifts. Under 64 KiB
Python's per-call cost, not memory, bounds that memcpy figure.

For blocks in ``--one-by-one`` (default 4 KiB) each batch is also posted one entry per
``write()`` call, beside the batched case, so the batching gain is visible.

``--compare mooncake`` runs Mooncake Transfer Engine's tcp transport (PyPI
``mooncake-transfer-engine-non-cuda``, not a dependency of dpmove; it needs Debian's
``libibverbs1``) next to every dpmove tcp case at the same block size, batch and span, paired run
by run with alternating order (``--repeat`` pairs): ``ratio`` is the median of the per-pair
dpmove/mooncake GB/s ratios. Mooncake runs ``batch_transfer_sync_write`` (one batch at a time,
at most 1024 entries per call), the call its vLLM connector uses; its asynchronous batches with
more than one in flight overflowed its tcp lane queue at 4 KiB x 1024 here and stalled 30 s.

``--transport verbs`` needs an RDMA device on both hosts and dpmove built with rdma-core
headers; where it cannot connect the case is skipped with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..engine import Engine, entries
from .common import Table, dump_json, fmt_size, median, parse_list, parse_size

TRANSPORTS = ("shm", "tcp", "verbs")
READY = "dpmove-bench-net-target "
MAX_BATCH = 1024
MOONCAKE_MAX_BATCH = 1024  # Mooncake's tcp transport refuses larger batch calls


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "net",
        help="one-sided writes between two processes (shm, tcp, verbs), optionally against Mooncake",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--role", choices=("local", "target", "initiator"), default="local",
                   help="local (default): start the target process here and run against it; target: expose a region "
                        "and wait (two hosts); initiator: run against the target described by --peer-metadata")
    p.add_argument("--peer-metadata", metavar="FILE",
                   help="initiator: the file the target wrote (--metadata-out), or a file holding the line it printed")
    p.add_argument("--metadata-out", metavar="FILE", help="target: also write its metadata and handle (JSON, hex) to FILE")
    p.add_argument("--listen", default="127.0.0.1",
                   help="target: address its tcp listener (and Mooncake's) binds to; 0.0.0.0 for two hosts (default 127.0.0.1)")
    p.add_argument("--transport", default="shm,tcp", help=f"comma list of {', '.join(TRANSPORTS)} (default shm,tcp)")
    p.add_argument("--bs", default="4k,64k,256k,1m,4m,64m", help="comma list of block sizes (default 4k,64k,256k,1m,4m,64m)")
    p.add_argument("--batch", default="1,64,1024",
                   help=f"comma list of entries per request, 1-{MAX_BATCH} (default 1,64,1024); clipped so that bs*batch "
                        "fits in --region-size")
    p.add_argument("--one-by-one", default="4k", metavar="BS",
                   help="block sizes whose batches are also posted one entry per write() call (default 4k; 'none': off)")
    p.add_argument("--duration", type=float, default=1.0, help="seconds per case and run (default 1.0)")
    p.add_argument("--repeat", type=int, default=1, help="runs per case, each paired with its memcpy (shm) or Mooncake (tcp) run; medians are reported (default 1)")
    p.add_argument("--depth", type=int, default=2, help="requests (or one-by-one groups) kept in flight (default 2)")
    p.add_argument("--streams", type=int, default=1, help="tcp connections per peer, 1-16 (default 1)")
    p.add_argument("--region-size", default="1g", help="bytes of the target region and of the initiator's source (default 1g)")
    p.add_argument("--span", default="256m", help="bytes each case walks through, at least one request (default 256m)")
    p.add_argument("--timing", action="store_true",
                   help="write with timing=True and report the per-entry latency the core measures (Request.latency_ns) "
                        "in the JSON; costs a clock read per entry")
    p.add_argument("--notify", action="store_true", help="attach an 8-byte notification to every request (the target drains them)")
    p.add_argument("--compare", choices=("mooncake",), help="also run Mooncake Transfer Engine's tcp transport beside dpmove's tcp")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-", help="write results as JSON to PATH (or stdout)")
    p.add_argument("--stdin-lifetime", action="store_true", help=argparse.SUPPRESS)  # target: exit at EOF on stdin
    p.set_defaults(func=main, _parser=p)


# --- arguments -------------------------------------------------------------------------------

class Plan:
    """Validated settings; bad ones call parser.error() (exit status 2, message on stderr)."""

    def __init__(self, args: argparse.Namespace) -> None:
        err = args._parser.error
        try:
            self.transports = parse_list(args.transport)
            self.bss = parse_list(args.bs, parse_size)
            try:
                self.batches = parse_list(args.batch, int)
            except ValueError:
                raise ValueError(f"--batch: not a list of integers: {args.batch!r}") from None
            obo = str(args.one_by_one).strip().lower()
            self.one_by_one = set() if obo in ("", "none", "off", "0") else set(parse_list(args.one_by_one, parse_size))
            self.region_size = parse_size(args.region_size)
            self.span = parse_size(args.span)
        except ValueError as exc:
            err(str(exc))
        bad = [t for t in self.transports if t not in TRANSPORTS]
        if bad or not self.transports:
            err(f"--transport {args.transport!r}: choose from {', '.join(TRANSPORTS)}")
        if not self.bss:
            err("--bs: no block size given")
        if not self.batches or any(b < 1 or b > MAX_BATCH for b in self.batches):
            err(f"--batch {args.batch!r}: every batch must be in 1..{MAX_BATCH}")
        if args.role == "local" and any(bs > self.region_size for bs in self.bss):
            err(f"--bs: {fmt_size(max(self.bss))} does not fit in --region-size {fmt_size(self.region_size)}")
        if not (args.duration > 0):
            err(f"--duration must be > 0, got {args.duration}")
        if args.repeat < 1:
            err(f"--repeat must be >= 1, got {args.repeat}")
        if args.depth < 1 or args.depth > 64:
            err(f"--depth must be in 1..64, got {args.depth}")
        if args.streams < 1 or args.streams > 16:
            err(f"--streams must be in 1..16, got {args.streams}")
        if args.role == "initiator" and not args.peer_metadata:
            err("--role initiator needs --peer-metadata FILE (what the target printed or wrote with --metadata-out)")
        if args.role != "initiator" and args.peer_metadata:
            err("--peer-metadata is for --role initiator")
        if args.compare == "mooncake":
            why = mooncake_missing()
            if why:
                err(f"--compare mooncake: {why}")
            if "tcp" not in self.transports:
                err("--compare mooncake compares tcp: add tcp to --transport")
        self.args = args

    def cells(self, region_size: int) -> List[Tuple[int, int]]:
        """(bs, batch) pairs, each batch clipped to the region and deduplicated, in order."""
        out: List[Tuple[int, int]] = []
        for bs in self.bss:
            for b in self.batches:
                b = max(1, min(b, region_size // bs))
                if (bs, b) not in out:
                    out.append((bs, b))
        return out


def mooncake_missing() -> Optional[str]:
    """None when mooncake.engine imports, else why not (and how to get it)."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        importlib.import_module("mooncake.engine")
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError from a missing libibverbs
        return (f"mooncake.engine is not importable ({type(exc).__name__}: {exc}); install it with "
                "'pip install mooncake-transfer-engine-non-cuda' (Debian: apt-get install libibverbs1); "
                "dpmove does not install it")
    return None


# --- target ----------------------------------------------------------------------------------

def run_target(args: argparse.Namespace, plan: Plan) -> int:
    eng = Engine(num_workers=1, listen_host=args.listen, name="bench-net-target")
    region = eng.alloc(plan.region_size)
    handle = eng.expose(region)
    info: Dict[str, Any] = {
        "version": 1, "pid": os.getpid(), "host": platform.node(), "region_size": plan.region_size,
        "metadata": eng.metadata().hex(), "handle": handle.to_bytes().hex(),
    }
    te = None
    if args.compare == "mooncake":
        te, session = mooncake_engine(args.listen if args.listen not in ("0.0.0.0", "::") else platform.node())
        if te.register_memory(region.address, region.nbytes) != 0:
            raise OSError("Mooncake register_memory of the target region failed")
        info["mooncake"] = {"session": session, "addr": region.address}
    line = READY + json.dumps(info)
    if args.metadata_out:
        with open(args.metadata_out, "w") as f:
            f.write(json.dumps(info, indent=1) + "\n")
    print(line, flush=True)
    if not args.stdin_lifetime:
        print(f"# target ready: {fmt_size(plan.region_size)} exposed; Ctrl-C or SIGTERM ends it", file=sys.stderr, flush=True)

    stop = threading.Event()
    notes = [0]

    def drain() -> None:
        while not stop.is_set():
            if eng.next_notification(timeout_s=0.2) is not None:
                notes[0] += 1

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    try:
        if args.stdin_lifetime:
            sys.stdin.read()
        else:
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    stop.set()
    th.join(1.0)
    st = eng.net_stats()
    print(f"# target: {st.get('bytes_received', 0)} bytes received, {st.get('requests_completed', 0)} requests, "
          f"{notes[0]} notifications drained, {st.get('writes_refused', 0)} writes refused", file=sys.stderr, flush=True)
    del te
    eng.close()
    return 0


def mooncake_engine(hostname: str) -> Tuple[Any, str]:
    """A Mooncake TransferEngine on its tcp transport, P2P handshake (no metadata server)."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # else it logs every batch at INFO
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    # initialize() prints glog banners and a harmless "Local segment descriptor not found" on
    # stderr: keep them out of the table, show them only when it fails.
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            rc = te.initialize(hostname, "P2PHANDSHAKE", "tcp", "")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if rc != 0:
            log.seek(0)
            raise OSError(f"Mooncake TransferEngine.initialize({hostname!r}, 'P2PHANDSHAKE', 'tcp', '') failed: "
                          + log.read().decode(errors="replace")[-2000:])
    return te, f"{hostname}:{te.get_rpc_port()}"


def read_target_info(text: str) -> Dict[str, Any]:
    text = text.strip()
    for ln in text.splitlines():
        if ln.startswith(READY):
            text = ln[len(READY):]
            break
    try:
        info = json.loads(text)
        bytes.fromhex(info["metadata"])
        bytes.fromhex(info["handle"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a dpmove bench net target description ({exc}); use the file --metadata-out wrote "
                         f"or the '{READY.strip()}' line the target printed") from None
    return info


def spawn_target(args: argparse.Namespace, plan: Plan) -> Tuple[subprocess.Popen, Dict[str, Any]]:
    cmd = [sys.executable, "-m", "dpmove", "bench", "net", "--role", "target", "--stdin-lifetime",
           "--region-size", str(plan.region_size), "--listen", args.listen]
    if args.compare:
        cmd += ["--compare", args.compare]
    env = dict(os.environ, MC_LOG_LEVEL=os.environ.get("MC_LOG_LEVEL", "ERROR"))
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith(READY):
        proc.kill()
        proc.wait()
        raise OSError(f"the target process did not start (exit status {proc.returncode}); its output: {line.strip()!r}")
    return proc, read_target_info(line)


# --- measurements ----------------------------------------------------------------------------

def _stats(ns: List[int]) -> Tuple[float, float]:
    if not ns:
        return float("nan"), float("nan")
    a = np.asarray(ns, dtype=np.float64)
    return float(a.mean()) / 1e3, float(np.percentile(a, 99)) / 1e3


def _span_for(footprint: int, span: int, region: int) -> int:
    s = max(footprint, min(span, region))
    return s - s % footprint


def measure_memcpy(src: Any, dst: Any, bs: int, span: int, duration: float) -> Dict[str, Any]:
    """Single-thread numpy.copyto of bs blocks from src to dst, walking `span` bytes."""
    s, d = src.numpy(), dst.numpy()
    span = _span_for(bs, span, min(s.size, d.size))
    pairs = [(d[o:o + bs], s[o:o + bs]) for o in range(0, span, bs)]
    np.copyto(d[:span], s[:span])  # warm: fault every page in
    copy = np.copyto
    nbytes = 0
    t0 = time.perf_counter()
    end = t0 + duration
    while True:
        for dv, sv in pairs:
            copy(dv, sv)
        nbytes += span
        if time.perf_counter() >= end:
            break
    el = time.perf_counter() - t0
    return {"bs": bs, "gbps": nbytes / el / 1e9, "bytes": nbytes, "seconds": el, "span": span}


def run_dpmove(peer: Any, src: Any, handle: Any, bs: int, batch: int, one_by_one: bool, duration: float, depth: int,
               span: int, notify: bool, timing: bool = False) -> Dict[str, Any]:
    fp = bs * batch
    span = _span_for(fp, span, min(handle.size, src.nbytes))
    nbase = span // fp
    offs = np.arange(batch, dtype=np.int64) * bs
    note = b"benchnet" if notify else None
    write = peer.write
    clock = time.perf_counter_ns
    for k in range(min(nbase, 4)):  # warm-up: connection, mapping, first pages
        write(src, handle, entries(k * fp + offs, k * fp + offs, bs), notify=note).result()
    prep: List[int] = []
    post: List[int] = []
    comp: List[int] = []
    lat: List[np.ndarray] = []
    inflight: deque = deque()
    nbytes = nent = nreq = k = 0
    t_start = clock()
    t_end = t_start + int(duration * 1e9)
    while True:
        if clock() < t_end:
            base = (k % nbase) * fp
            k += 1
            group = []
            if not one_by_one:
                t0 = clock()
                b = entries(base + offs, base + offs, bs)
                t1 = clock()
                r = write(src, handle, b, notify=note, timing=timing)
                t2 = clock()
                prep.append(t1 - t0)
                post.append(t2 - t1)
                group.append((r, t2))
            else:
                b = entries(base + offs, base + offs, bs)
                for i in range(batch):
                    t0 = clock()
                    e = b[i:i + 1]
                    t1 = clock()
                    r = write(src, handle, e, notify=note if i == batch - 1 else None, timing=timing)
                    t2 = clock()
                    prep.append(t1 - t0)
                    post.append(t2 - t1)
                    group.append((r, t2))
            inflight.append(group)
            if len(inflight) < depth:
                continue
        elif not inflight:
            break
        for r, t_posted in inflight.popleft():
            nbytes += r.result()
            comp.append(clock() - t_posted)
            nent += len(r)
            nreq += 1
            if timing:
                lat.append(r.latency_ns)
    el = (clock() - t_start) / 1e9
    res = _summary(nbytes, nent, nreq, el, prep, post, comp)
    if timing:  # the core's own per-entry time, first submission to completion
        ent_lat = np.concatenate(lat) if lat else np.empty(0)
        res["entry_latency_avg_us"], res["entry_latency_p99_us"] = _stats(ent_lat[ent_lat >= 0].tolist())
    res["span"] = span
    return res


def _summary(nbytes: int, nent: int, nreq: int, el: float, prep: List[int], post: List[int], comp: List[int]) -> Dict[str, Any]:
    res = {"gbps": nbytes / el / 1e9, "entries_per_s": nent / el, "requests_per_s": nreq / el,
           "bytes": nbytes, "entries": nent, "requests": nreq, "seconds": el}
    for name, xs in (("prepare", prep), ("post", post), ("completion", comp)):
        res[f"{name}_avg_us"], res[f"{name}_p99_us"] = _stats(xs)
    return res


class Mooncake:
    """Mooncake Transfer Engine (tcp) in the initiator, writing into the target's region."""

    def __init__(self, info: Dict[str, Any], src: Any, hostname: str) -> None:
        self.te, _ = mooncake_engine(hostname)
        if self.te.register_memory(src.address, src.nbytes) != 0:
            raise OSError("Mooncake register_memory of the source region failed")
        self.session = info["mooncake"]["session"]
        self.dst = int(info["mooncake"]["addr"])
        self.src = src.address
        self.src_size = src.nbytes

    def run(self, bs: int, batch: int, duration: float, span: int, region: int) -> Dict[str, Any]:
        fp = bs * batch
        span = _span_for(fp, span, min(region, self.src_size))
        nbase = span // fp
        offs = [i * bs for i in range(batch)]
        te, session, sa, da = self.te, self.session, self.src, self.dst

        def one(base: int) -> None:
            for lo in range(0, batch, MOONCAKE_MAX_BATCH):
                part = offs[lo:lo + MOONCAKE_MAX_BATCH]
                if te.batch_transfer_sync_write(session, [sa + base + o for o in part], [da + base + o for o in part],
                                                [bs] * len(part)) != 0:
                    raise OSError(f"Mooncake batch_transfer_sync_write to {session} failed ({fmt_size(bs)} x {batch})")

        for k in range(min(nbase, 4)):
            one(k * fp)
        clock = time.perf_counter_ns
        prep: List[int] = []
        post: List[int] = []
        nbytes = nent = nreq = k = 0
        t_start = clock()
        t_end = t_start + int(duration * 1e9)
        while clock() < t_end:
            base = (k % nbase) * fp
            k += 1
            for lo in range(0, batch, MOONCAKE_MAX_BATCH):
                t0 = clock()
                part = offs[lo:lo + MOONCAKE_MAX_BATCH]
                s = [sa + base + o for o in part]
                d = [da + base + o for o in part]
                n = [bs] * len(part)
                t1 = clock()
                rc = te.batch_transfer_sync_write(session, s, d, n)
                t2 = clock()
                if rc != 0:
                    raise OSError(f"Mooncake batch_transfer_sync_write to {session} failed ({fmt_size(bs)} x {batch})")
                prep.append(t1 - t0)
                post.append(t2 - t1)
                nbytes += bs * len(part)
                nent += len(part)
                nreq += 1
        el = (clock() - t_start) / 1e9
        # A sync call returns when the batch is done: its whole time is "post", completion is 0.
        res = _summary(nbytes, nent, nreq, el, prep, post, [0] * len(post))
        res["span"] = span
        return res


# --- driver ----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    plan = Plan(args)
    if args.role == "target":
        return run_target(args, plan)
    proc = None
    try:
        if args.role == "initiator":
            with open(args.peer_metadata) as f:
                info = read_target_info(f.read())
            if args.compare == "mooncake" and "mooncake" not in info:
                args._parser.error("--compare mooncake: the target was not started with --compare mooncake")
        else:
            proc, info = spawn_target(args, plan)
        return run_initiator(args, plan, info)
    finally:
        if proc is not None:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_initiator(args: argparse.Namespace, plan: Plan, info: Dict[str, Any]) -> int:
    from ..net import RemoteRegion

    metadata = bytes.fromhex(info["metadata"])
    handle = RemoteRegion.from_bytes(bytes.fromhex(info["handle"]))
    region = handle.size
    if any(bs > region for bs in plan.bss):
        raise ValueError(f"--bs {fmt_size(max(plan.bss))} does not fit in the target's region of {fmt_size(region)}")
    cells = plan.cells(region)
    span_cap = min(plan.span, region)
    # with --json - the JSON owns stdout: the tables go to stderr
    tout = sys.stderr if args.json == "-" else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=tout, flush=True)

    load0 = os.getloadavg()
    eng = Engine(num_workers=1, name="bench-net-initiator")
    src = eng.alloc(region)
    src.numpy()[:] = 0x5A  # materialise every page; the content does not matter to any transport here
    from .. import __version__

    meta = {"dpmove": __version__, "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(), "role": args.role,
            "target_pid": info.get("pid"), "target_host": info.get("host"), "region_size": region, "span": span_cap,
            "duration_s": args.duration, "repeat": args.repeat, "depth": args.depth, "streams": args.streams,
            "notify": args.notify, "timing": args.timing, "compare": args.compare,
            "units": {"gbps": "1e9 bytes/s", "latency": "us; prepare = building entries, post = inside write(), "
                                                        "completion = write() return -> request seen done"}}
    out: Dict[str, Any] = {"meta": meta, "memcpy": [], "cases": [], "skipped": []}

    # memcpy ceiling, same process, same span, per block size
    dst = eng.alloc(max([span_cap] + [_span_for(bs * b, plan.span, region) for bs, b in cells]))
    mt = Table([("memcpy (1 thread)", 18, ""), ("GB/s", 8, ".3f"), ("span", 8, "")], out=tout)
    say(f"# memcpy ceiling: numpy.copyto of bs blocks between two regions, 1 thread, {args.duration:g} s each"
        + ("; under 64 KiB Python's per-call cost bounds it" if min(plan.bss) < 65536 else ""))
    memcpy: Dict[int, float] = {}
    for bs in plan.bss:
        runs = [measure_memcpy(src, dst, bs, span_cap, args.duration) for _ in range(args.repeat)]
        m = {"bs": bs, "gbps": median(r["gbps"] for r in runs), "span": runs[0]["span"], "runs": runs}
        memcpy[bs] = m["gbps"]
        out["memcpy"].append(m)
        mt.row([f"memcpy {fmt_size(bs)}", m["gbps"], fmt_size(m["span"])])
    cpy = dst if "shm" in plan.transports else None  # paired memcpy beside every shm case
    if cpy is None:
        dst.close()
    del dst

    mc = None
    if args.compare == "mooncake":
        mc = Mooncake(info, src, "127.0.0.1" if args.role == "local" else platform.node())

    cols = [("case", 30, ""), ("GB/s", 7, ".3f"), ("entries/s", 10, ".0f"),
            ("prep avg", 8, ".2f"), ("prep p99", 8, ".2f"), ("post avg", 8, ".2f"), ("post p99", 8, ".2f"),
            ("cmpl avg", 9, ".1f"), ("cmpl p99", 9, ".1f"), ("vs", 8, ""), ("vs GB/s", 8, ".3f"), ("ratio", 6, ".3f")]
    say(f"\n# dpmove one-sided writes, {args.duration:g} s per case, depth {args.depth}, latency in us; vs: memcpy "
        "beside each shm case, or Mooncake tcp (--compare mooncake); ratio = median of the paired dpmove/vs ratios")
    table = Table(cols, out=tout)
    for t in plan.transports:
        try:
            peer = eng.connect(metadata, transport=t, streams=args.streams if t == "tcp" else 1)
        except (OSError, ValueError, RuntimeError) as exc:
            msg = f"{type(exc).__name__}: {exc}"
            print(f"# {t}: skipped: {msg}", file=sys.stderr, flush=True)
            out["skipped"].append({"transport": t, "reason": msg})
            continue
        # touch every page of the target region once, so no case pays for first-touch faults
        step = min(64 << 20, region)
        n = region // step
        peer.write(src, handle, entries(np.arange(n) * step, np.arange(n) * step, step), timeout_s=None).result()
        for bs, batch in cells:
            modes = [False] + ([True] if bs in plan.one_by_one and batch > 1 else [])
            for obo in modes:
                name = f"{t}{'x' + str(args.streams) if t == 'tcp' and args.streams > 1 else ''} {fmt_size(bs)} x{batch}" \
                       + (" 1-by-1" if obo else "")
                # the reference runs beside each dpmove run, alternating which goes first: mooncake
                # for tcp (--compare mooncake), memcpy over the same span for shm
                ref = "mooncake" if mc is not None and t == "tcp" and not obo else "memcpy" if t == "shm" else None
                runs, mruns, ratios = [], [], []
                for rep in range(args.repeat):
                    order = ("dpmove", "ref") if rep % 2 == 0 else ("ref", "dpmove")
                    got: Dict[str, Dict[str, Any]] = {}
                    for who in order:
                        if who == "dpmove":
                            got[who] = run_dpmove(peer, src, handle, bs, batch, obo, args.duration, args.depth,
                                                  plan.span, args.notify, args.timing)
                        elif ref == "mooncake":
                            got[who] = mc.run(bs, batch, args.duration, plan.span, region)
                        elif ref == "memcpy":
                            got[who] = measure_memcpy(src, cpy, bs, _span_for(bs * batch, plan.span, region), args.duration)
                    runs.append(got["dpmove"])
                    if ref:
                        mruns.append(got["ref"])
                        ratios.append(got["dpmove"]["gbps"] / got["ref"]["gbps"] if got["ref"]["gbps"] else float("nan"))
                res: Dict[str, Any] = {"case": name, "transport": t, "bs": bs, "batch": batch,
                                       "mode": "one-by-one" if obo else "batched", "streams": args.streams if t == "tcp" else 1}
                for key in runs[0]:
                    if key != "span":
                        res[key] = median(r[key] for r in runs)
                res["span"] = runs[0]["span"]
                res["runs"] = runs
                vs, vs_gbps, ratio = "-", float("nan"), float("nan")
                if ref == "memcpy":
                    vs, vs_gbps, ratio = "memcpy", median(r["gbps"] for r in mruns), median(ratios)
                    res["memcpy_gbps"], res["memcpy_ratio"], res["memcpy_runs"], res["ratios"] = vs_gbps, ratio, mruns, ratios
                if ref == "mooncake":
                    vs, vs_gbps, ratio = "mooncake", median(r["gbps"] for r in mruns), median(ratios)
                    res["mooncake"] = {k2: median(r[k2] for r in mruns) for k2 in mruns[0] if k2 != "span"}
                    res["mooncake"]["runs"] = mruns
                    res["mooncake_gbps"], res["mooncake_ratio"], res["ratios"] = vs_gbps, ratio, ratios
                out["cases"].append(res)
                table.row([name, res["gbps"], res["entries_per_s"], res["prepare_avg_us"], res["prepare_p99_us"],
                           res["post_avg_us"], res["post_p99_us"], res["completion_avg_us"], res["completion_p99_us"],
                           vs, vs_gbps, ratio])
        peer.close()
    gains = batching_gains(out["cases"])
    if gains:
        out["batching_gain"] = gains
        say("\n# batching gain: entries/s batched / the same batches posted one entry per write() call")
        for g in gains:
            say(f"{g['case']:<30}  {g['batched_entries_per_s']:>12.0f}  {g['one_by_one_entries_per_s']:>12.0f}  {g['gain']:>7.1f}x")
    meta["loadavg"] = {"start": load0, "end": os.getloadavg()}  # a busy host explains low figures
    if args.json:
        dump_json(out, args.json)
    sys.stdout.flush()
    if cpy is not None:
        cpy.close()
    src.close()
    eng.close()
    if not out["cases"]:
        print("dpmove bench net: no transport could be used (see the skipped reasons above)", file=sys.stderr)
        return 1
    return 0


def batching_gains(cases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    by = {(c["transport"], c["bs"], c["batch"], c["mode"]): c for c in cases}
    out = []
    for (t, bs, b, mode), c in by.items():
        o = by.get((t, bs, b, "one-by-one"))
        if mode == "batched" and o:
            out.append({"case": f"{t} {fmt_size(bs)} x{b}", "batched_entries_per_s": c["entries_per_s"],
                        "one_by_one_entries_per_s": o["entries_per_s"],
                        "gain": c["entries_per_s"] / o["entries_per_s"] if o["entries_per_s"] else float("nan")})
    return out
