"""``dpmove bench qos``: a latency-critical class against saturating KV traffic, QoS on and off.

Per path (``storage``: O_DIRECT reads of one file; ``shm``: one-sided writes between two
engines of this process) and per repeat, four phases of ``--duration`` seconds each, every one
on fresh engines so that the QoS counters are the phase's own:

  ctl_isolated  control alone (QoS on)
  kv_isolated   kv_load alone (QoS on): what the QoS windows leave KV when control is idle
  kv_isolated_fifo  kv_load alone, QoS off: its goodput is the path's capacity
  mixed_qos     both, QosConfig.from_env() - the defaults unless DPMOVE_QOS(_FILE) says otherwise
  mixed_fifo    both, QosConfig(enabled=False): every path one FIFO, the baseline

control: ``--ctl-sizes`` transfers (size drawn uniformly per op) with Poisson arrivals at
``--ctl-rate`` ops/s, issued by one thread at depth 1 (an op due while the previous one is
still running is issued as soon as it ends; none is issued after the phase's end). kv_load:
``--kv-size`` transfers, ``--kv-depth`` in flight, one thread waiting on the oldest and
resubmitting. Each repeat uses one random schedule (arrival times, sizes, offsets) for all its
phases, so phases differ only in what the path does with it; the phase order rotates between
repeats so drift hits every phase alike. With the default QoS configuration, on storage KV
reads reach the device in 128 KiB pieces with at most 512 KiB in flight while control is
active; over shm (two copy streams) stream 0 is kept for control. The capacity is what KV
alone gets with QoS off, so what those windows cost KV shows in kv_share rather than lowering
the bar.

Per phase and class: ops, bytes, seconds, goodput = bytes / seconds (bytes/s; control's
seconds are at least ``--duration``, KV's run to its last completion), p50/p99 latency in us
(``time.perf_counter_ns`` just before submit to just after the wait returns), and for control
the SLO attainment: the fraction of ops with latency <= the SLO (``--slo-us``, or by default
1.25 x the isolated control p99 of the same repeat). Per mixed phase: ctl_p99_ratio = p99 /
isolated p99; ctl_leakage = max(0, 1 - goodput / isolated goodput); kv_leakage = the same
against the capacity; kv_share = KV goodput / (capacity - control goodput), the part of what
control leaves that KV gets; Jain's fairness index over goodput / weight of the two classes
(with control demand-limited far below its weighted share this mostly reflects that demand);
utilization = (control + KV goodput) / capacity. The printed tables and the ``median`` in
the JSON are medians over the repeats of each per-repeat metric; the summary compares them
with the targets: control p99 <= 1.25 x isolated, control leakage <= 5 %, kv_share >= 90 %.

Data is verified, and a mismatch is an error: the storage file holds, in every 8-byte word,
its own file offset XOR a constant, so three words of every read are checked; over shm the
last writes of each class are compared byte for byte with their source after the phase.
Python's thread switch interval is set to 0.5 ms while the bench runs (then restored), so the
hand-off of the GIL between the two issuing threads does not dominate control latency.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Callable, TextIO

import numpy as np

from ..engine import Engine
from ..qos import QosConfig
from .common import Table, dump_json, fmt_size, parse_list, parse_size, percentiles_us

PATHS = ("storage", "shm")
PHASES = ("ctl_isolated", "kv_isolated", "kv_isolated_fifo", "mixed_qos", "mixed_fifo")
MIXED = ("mixed_qos", "mixed_fifo")
CTL, KV = "control", "kv_load"
WARM = "bulk"  # class of the warm-up transfers, kept out of the bench's own counters
PHASE_CLASSES = {"ctl_isolated": (CTL,), "kv_isolated": (KV,), "kv_isolated_fifo": (KV,), "mixed_qos": (CTL, KV),
                 "mixed_fifo": (CTL, KV)}
TARGETS = {"ctl_p99_ratio": ("<=", 1.25), "ctl_leakage": ("<=", 0.05), "kv_share": (">=", 0.90)}
AUTO_SLO_FACTOR = 1.25
MAGIC = 0x5EED_0000_0000_0000  # file word = offset ^ MAGIC: never 0, unique per offset
ALIGN = 4096
TIMEOUT_S = 30.0
SHM_STREAMS = 2
SHM_CTL_SPAN = 16 << 20
SHM_SHIFT = ALIGN  # shm writes land SHM_SHIFT bytes further in the target than in the source
SHM_CHECKS = 8  # last writes per class compared after a shm phase
SWITCH_INTERVAL_S = 0.0005
KV_TARGETS = 8192  # KV offsets drawn per repeat, cycled


class VerificationError(RuntimeError):
    """Data moved by the bench is not what it should be."""


# --- options ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Options:
    paths: tuple[str, ...] = PATHS
    duration: float = 3.0
    repeats: int = 3
    ctl_sizes: tuple[int, ...] = (4 << 10, 16 << 10, 64 << 10)
    ctl_rate: float = 200.0
    slo_us: float | None = None  # None: auto
    kv_size: int = 4 << 20
    kv_depth: int = 4
    file: str | None = None
    dir: str | None = None  # None: the system temp directory
    file_size: int = 1 << 30
    seed: int = 1

    def validate(self) -> Options:
        if not self.paths or any(p not in PATHS for p in self.paths):
            raise ValueError(f"--paths {','.join(self.paths)!r}: choose from {', '.join(PATHS)}")
        if not self.duration > 0 or self.repeats < 1:
            raise ValueError("--duration must be > 0 and --repeats >= 1")
        if not self.ctl_sizes or not self.ctl_rate > 0 or self.kv_depth < 1:
            raise ValueError("--ctl-sizes must not be empty, --ctl-rate must be > 0 and --kv-depth >= 1")
        if self.slo_us is not None and not self.slo_us > 0:
            raise ValueError(f"--slo-us must be > 0 or 'auto', got {self.slo_us}")
        for what, n in [("--ctl-sizes", s) for s in self.ctl_sizes] + [("--kv-size", self.kv_size)]:
            if n % ALIGN:
                raise ValueError(f"{what}: {n} bytes is not a multiple of {ALIGN} (O_DIRECT)")
        if max(self.ctl_sizes) > SHM_CTL_SPAN:
            raise ValueError(f"--ctl-sizes: at most {fmt_size(SHM_CTL_SPAN)}")
        if "storage" in self.paths and (self.file_size % ALIGN or self.file_size < max(self.kv_size, *self.ctl_sizes)):
            raise ValueError(f"--file-size must be a multiple of {ALIGN} and hold one transfer of each class")
        return self

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["slo_us"] = "auto" if self.slo_us is None else self.slo_us
        return d


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "qos",
        help="a latency-critical class against saturating KV traffic, QoS on vs one FIFO (storage, shm)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of storage, shm (default storage,shm)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per phase (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the four phases; medians are reported (default 3)")
    p.add_argument("--ctl-sizes", default="4k,16k,64k", help="control transfer sizes, one drawn per op (default 4k,16k,64k)")
    p.add_argument("--ctl-rate", type=float, default=200.0, help="control ops/s, Poisson arrivals (default 200)")
    p.add_argument("--slo-us", default="auto",
                   help=f"control latency SLO in us (default auto: {AUTO_SLO_FACTOR} x the isolated control p99 of the same repeat)")
    p.add_argument("--kv-size", default="4m", help="bytes per KV transfer (default 4m)")
    p.add_argument("--kv-depth", type=int, default=4, help="KV transfers in flight (default 4)")
    p.add_argument("--file", help="storage: file to read; created with the bench's pattern if missing (and kept), "
                                  "reused if it holds it; default: a temporary file in --dir, removed afterwards")
    p.add_argument("--dir", help="directory of the default file (default: the system temp directory)")
    p.add_argument("--file-size", default="1g", help="bytes of the storage file (default 1g)")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-", help="write results as JSON to PATH ('-': stdout)")
    p.set_defaults(func=main)


def options_from_args(args: argparse.Namespace) -> Options:
    slo = None if str(args.slo_us).strip().lower() == "auto" else float(args.slo_us)
    return Options(paths=tuple(parse_list(args.paths)), duration=args.duration, repeats=args.repeats,
                   ctl_sizes=tuple(parse_list(args.ctl_sizes, parse_size)), ctl_rate=args.ctl_rate, slo_us=slo,
                   kv_size=parse_size(args.kv_size), kv_depth=args.kv_depth, file=args.file, dir=args.dir,
                   file_size=parse_size(args.file_size)).validate()


# --- the storage file ------------------------------------------------------------------------

def pattern(offset: int, nbytes: int) -> np.ndarray:
    """The words of file (or source) bytes [offset, offset + nbytes): each its offset ^ MAGIC."""
    return (np.arange(offset, offset + nbytes, 8, dtype=np.uint64)) ^ np.uint64(MAGIC)


def write_pattern(path: str, size: int) -> None:
    print(f"# preparing {path}: writing {size / 1e9:.2f} GB", file=sys.stderr, flush=True)
    chunk = 8 << 20
    with open(path, "wb") as f:
        f.writelines(memoryview(pattern(off, min(chunk, size - off))) for off in range(0, size, chunk))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def holds_pattern(path: str, size: int) -> bool:
    if os.path.getsize(path) != size:
        return False
    with open(path, "rb") as f:
        for off in (0, (size // 2) & ~7, size - 8):
            if np.frombuffer(os.pread(f.fileno(), 8, off), np.uint64)[0] != pattern(off, 8)[0]:
                return False
    return True


@contextlib.contextmanager
def bench_file(opts: Options) -> Iterator[str]:
    """The storage file, holding the pattern. The default one is temporary; a --file that is
    missing is created and kept (the next run reuses it); one that exists must hold it."""
    if opts.file is None:
        fd, path = tempfile.mkstemp(prefix="dpmove-bench-qos-", suffix=".dat", dir=opts.dir)
        os.close(fd)
    else:
        path = opts.file
    try:
        if opts.file is None or not os.path.exists(path):
            try:
                write_pattern(path, opts.file_size)
            except BaseException:
                os.unlink(path)
                raise
        elif not holds_pattern(path, opts.file_size):
            raise ValueError(f"--file {path} exists but is not a {opts.file_size}-byte file written by this bench; "
                             "remove it or name another")
        yield path
    finally:
        if opts.file is None and os.path.exists(path):
            os.unlink(path)


# --- what one path does ----------------------------------------------------------------------

class Rig:
    """One phase's engines and buffers on one path: submits a transfer of a class to a target
    offset within that class's span, and verifies what landed. `verified` counts checked ops."""

    span: dict[str, int]

    def __init__(self) -> None:
        self.verified = {CTL: 0, KV: 0}

    def submit(self, cls: str, k: int, target: int, n: int) -> Any:
        raise NotImplementedError

    def done(self, cls: str, k: int, target: int, n: int) -> None:
        """Called after op `k` of `cls` completed (from the thread that issued it)."""

    def finish(self) -> None:
        """Called after the phase; raises VerificationError."""

    def qos_stats(self) -> dict[str, Any]:
        raise NotImplementedError


class StorageRig(Rig):
    """Reads of the pattern file: control into one slot, KV into --kv-depth slots after it."""

    def __init__(self, eng: Engine, f: Any, opts: Options) -> None:
        super().__init__()
        self.eng, self.file, self.kv_size, self.depth = eng, f, opts.kv_size, opts.kv_depth
        self.kv_base = max(opts.ctl_sizes)
        self.buf = eng.alloc(self.kv_base + opts.kv_depth * opts.kv_size)
        self.words = self.buf.numpy().view(np.uint64)
        self.span = {CTL: opts.file_size, KV: opts.file_size}

    def _slot(self, cls: str, k: int) -> int:
        return 0 if cls == CTL else self.kv_base + (k % self.depth) * self.kv_size

    def submit(self, cls: str, k: int, target: int, n: int) -> Any:
        return self.eng.read(self.file, self.buf, [(target, self._slot(cls, k), n)], timeout_s=TIMEOUT_S, traffic_class=cls)

    def done(self, cls: str, k: int, target: int, n: int) -> None:
        slot = self._slot(cls, k)
        at = np.array([0, (n // 2) & ~7, n - 8], dtype=np.int64)
        got = self.words[(slot + at) // 8]
        want = (at.astype(np.uint64) + np.uint64(target)) ^ np.uint64(MAGIC)
        bad = np.flatnonzero(got != want)
        if bad.size:
            i = int(bad[0])
            raise VerificationError(f"storage {cls}: read of {n} B at file offset {target}: word at +{int(at[i])} is "
                                    f"{int(got[i]):#x}, expected {int(want[i]):#x}")
        self.verified[cls] += 1

    def warm_up(self) -> None:
        self.eng.read(self.file, self.buf, [(0, 0, self.buf.nbytes)], timeout_s=TIMEOUT_S, traffic_class=WARM).result()

    def qos_stats(self) -> dict[str, Any]:
        st = self.eng.qos_stats()["storage"]
        return {CTL: st[CTL], KV: st[KV]}


class ShmRig(Rig):
    """One-sided writes tx -> rx over shm: control within the first SHM_CTL_SPAN bytes of the
    source, KV in the span after it; each lands SHM_SHIFT bytes further in the target."""

    def __init__(self, tx: Engine, peer: Any, src: Any, dst: Any, handle: Any, opts: Options) -> None:
        super().__init__()
        self.tx, self.peer, self.src, self.dst, self.handle = tx, peer, src, dst, handle
        self.span = {CTL: SHM_CTL_SPAN, KV: src.nbytes - SHM_CTL_SPAN}
        self.recent: dict[str, collections.deque[tuple[int, int]]] = {c: collections.deque(maxlen=SHM_CHECKS) for c in (CTL, KV)}

    def _local(self, cls: str, target: int) -> int:
        return target if cls == CTL else SHM_CTL_SPAN + target

    def submit(self, cls: str, k: int, target: int, n: int) -> Any:
        local = self._local(cls, target)
        return self.peer.write(self.src, self.handle, [(local + SHM_SHIFT, local, n)], timeout_s=TIMEOUT_S,
                               traffic_class=cls)

    def done(self, cls: str, k: int, target: int, n: int) -> None:
        self.recent[cls].append((self._local(cls, target), n))

    def finish(self) -> None:
        src, dst = self.src.numpy(), self.dst.numpy()
        for cls, ops in self.recent.items():
            for local, n in ops:
                if not np.array_equal(dst[local + SHM_SHIFT:local + SHM_SHIFT + n], src[local:local + n]):
                    raise VerificationError(f"shm {cls}: the write of {n} B from source offset {local} did not land intact")
                self.verified[cls] += 1

    def qos_stats(self) -> dict[str, Any]:
        st = self.tx.qos_stats()["net"]
        return {CTL: st[CTL], KV: st[KV]}


@contextlib.contextmanager
def storage_rig(path: str, cfg: QosConfig, opts: Options) -> Iterator[StorageRig]:
    with Engine(qos=cfg, name="bench-qos-storage") as eng:
        f = eng.open(path, "r", direct="auto")
        try:
            rig = StorageRig(eng, f, opts)
            rig.warm_up()
            yield rig
        finally:
            f.close()


@contextlib.contextmanager
def shm_rig(cfg: QosConfig, opts: Options) -> Iterator[ShmRig]:
    kv_span = max(64 << 20, 4 * opts.kv_depth * opts.kv_size)  # beyond the caches
    size = SHM_CTL_SPAN + kv_span
    with Engine(qos=cfg, name="bench-qos-rx") as rx, Engine(qos=cfg, name="bench-qos-tx") as tx:
        dst = rx.alloc(size + SHM_SHIFT)
        src = tx.alloc(size)
        src.numpy().view(np.uint64)[:] = pattern(0, size)
        handle = rx.expose(dst, writable=True)
        peer = tx.connect(rx.metadata(), transport="shm", streams=SHM_STREAMS)
        try:
            # map every target page into the sender once, then clear the target for the checks
            peer.write(src, handle, [(SHM_SHIFT, 0, size)], timeout_s=TIMEOUT_S, traffic_class=WARM).result()
            dst.numpy()[:] = 0
            yield ShmRig(tx, peer, src, dst, handle, opts)
        finally:
            peer.close()


# --- the workload ----------------------------------------------------------------------------

@dataclasses.dataclass
class Schedule:
    """One repeat's workload, the same for all its phases (offsets are fractions of a span)."""

    arrivals_ns: np.ndarray  # control: due time of each op after the phase start
    ctl_sizes: np.ndarray
    ctl_where: np.ndarray  # in [0, 1)
    kv_where: np.ndarray  # in [0, 1), cycled

    @classmethod
    def draw(cls, opts: Options, repeat: int) -> Schedule:
        rng = np.random.default_rng([opts.seed, repeat])
        gaps = rng.exponential(1.0 / opts.ctl_rate, int(opts.ctl_rate * opts.duration * 2 + 100))
        arrivals = np.cumsum(gaps)
        while arrivals[-1] < opts.duration:
            arrivals = np.concatenate([arrivals, arrivals[-1] + np.cumsum(rng.exponential(1.0 / opts.ctl_rate, 1000))])
        arrivals = arrivals[arrivals < opts.duration]
        return cls(arrivals_ns=(arrivals * 1e9).astype(np.int64),
                   ctl_sizes=rng.choice(np.asarray(opts.ctl_sizes, dtype=np.int64), arrivals.size),
                   ctl_where=rng.random(arrivals.size), kv_where=rng.random(KV_TARGETS))


def aligned_target(where: float, span: int, n: int) -> int:
    return int(where * ((span - n) // ALIGN + 1)) * ALIGN


@dataclasses.dataclass
class ClassRun:
    """What one class did in one phase: completed ops, their bytes and latencies."""

    bytes: int
    seconds: float
    lat_ns: np.ndarray


def run_control(rig: Rig, sched: Schedule, t0: int, duration: float, stop: threading.Event) -> ClassRun:
    clock = time.perf_counter_ns
    end = t0 + int(duration * 1e9)
    lat: list[int] = []
    nbytes = 0
    last = t0
    for k in range(sched.arrivals_ns.size):
        due = t0 + int(sched.arrivals_ns[k])
        now = clock()
        if max(due, now) >= end or stop.is_set():
            break
        if due > now:
            time.sleep((due - now) / 1e9)
        n = int(sched.ctl_sizes[k])
        target = aligned_target(float(sched.ctl_where[k]), rig.span[CTL], n)
        t_sub = clock()
        req = rig.submit(CTL, k, target, n)
        req.wait()
        last = clock()
        req.check()
        rig.done(CTL, k, target, n)
        lat.append(last - t_sub)
        nbytes += n
    return ClassRun(nbytes, max(duration, (last - t0) / 1e9), np.asarray(lat, dtype=np.int64))


def run_kv(rig: Rig, sched: Schedule, opts: Options, t0: int, stop: threading.Event) -> ClassRun:
    clock = time.perf_counter_ns
    end = t0 + int(opts.duration * 1e9)
    n = opts.kv_size
    inflight: collections.deque[tuple[int, int, int, Any]] = collections.deque()
    lat: list[int] = []
    nbytes = 0
    last = t0
    k = 0

    def submit() -> None:
        nonlocal k
        target = aligned_target(float(sched.kv_where[k % sched.kv_where.size]), rig.span[KV], n)
        inflight.append((k, target, clock(), rig.submit(KV, k, target, n)))
        k += 1

    while clock() < t0:
        time.sleep((t0 - clock()) / 1e9)
    for _ in range(opts.kv_depth):
        submit()
    while inflight:
        i, target, t_sub, req = inflight.popleft()
        req.wait()
        last = clock()
        req.check()
        rig.done(KV, i, target, n)
        lat.append(last - t_sub)
        nbytes += n
        if last < end and not stop.is_set():
            submit()
    return ClassRun(nbytes, (last - t0) / 1e9, np.asarray(lat, dtype=np.int64))


def run_threads(jobs: dict[str, Callable[[threading.Event], ClassRun]]) -> dict[str, ClassRun]:
    """Runs each job in its own thread and joins them all; the first failure stops the others
    and is raised."""
    stop = threading.Event()
    results: dict[str, ClassRun] = {}
    errors: list[BaseException] = []

    def body(name: str, job: Callable[[threading.Event], ClassRun]) -> None:
        try:
            results[name] = job(stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=body, args=item, name=f"bench-qos-{item[0]}") for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@dataclasses.dataclass
class PhaseRun:
    classes: dict[str, ClassRun]
    qos_stats: dict[str, Any]
    verified: dict[str, int]


def run_phase(path: str, phase: str, opts: Options, sched: Schedule, file: str | None) -> PhaseRun:
    # The operator's configuration (DPMOVE_QOS / DPMOVE_QOS_FILE over the defaults); the FIFO
    # phases switch arbitration off and change nothing else.
    cfg = QosConfig.from_env()
    cfg.enabled = cfg.enabled and not phase.endswith("_fifo")
    rig_cm = storage_rig(file, cfg, opts) if path == "storage" else shm_rig(cfg, opts)
    with rig_cm as rig:
        t0 = time.perf_counter_ns() + 5_000_000  # both threads ready before the phase starts
        jobs: dict[str, Callable[[threading.Event], ClassRun]] = {}
        if CTL in PHASE_CLASSES[phase]:
            jobs[CTL] = lambda stop: run_control(rig, sched, t0, opts.duration, stop)
        if KV in PHASE_CLASSES[phase]:
            jobs[KV] = lambda stop: run_kv(rig, sched, opts, t0, stop)
        done = run_threads(jobs)
        rig.finish()
        return PhaseRun({c: done[c] for c in PHASE_CLASSES[phase]}, rig.qos_stats(), dict(rig.verified))


# --- metrics ---------------------------------------------------------------------------------

def jain(xs: Sequence[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n sum x^2), in (0, 1]; 1 when all are equal."""
    sq = sum(x * x for x in xs)
    return sum(xs) ** 2 / (len(xs) * sq) if sq > 0 else float("nan")


def class_metrics(cls: str, run: ClassRun, verified: int, slo_us: float) -> dict[str, Any]:
    p50, p99 = percentiles_us(run.lat_ns)
    m = {"ops": int(run.lat_ns.size), "bytes": run.bytes, "seconds": run.seconds, "goodput_bps": run.bytes / run.seconds,
         "p50_us": p50, "p99_us": p99, "verified": verified}
    if cls == CTL:
        m["slo_attainment"] = float(np.mean(run.lat_ns <= slo_us * 1e3)) if run.lat_ns.size else float("nan")
    return m


def mixed_metrics(phases: dict[str, dict[str, Any]], weights: dict[str, int]) -> dict[str, dict[str, float]]:
    iso = phases["ctl_isolated"]["classes"][CTL]
    # The path's capacity as KV alone gets it with no QoS shaping: the windows' own cost counts
    # against kv_share instead of lowering the bar.
    capacity = phases["kv_isolated_fifo"]["classes"][KV]["goodput_bps"]
    out = {}
    for phase in MIXED:
        ctl, kv = phases[phase]["classes"][CTL], phases[phase]["classes"][KV]
        out[phase] = {
            "ctl_p99_ratio": ctl["p99_us"] / iso["p99_us"],
            "ctl_leakage": max(0.0, 1.0 - ctl["goodput_bps"] / iso["goodput_bps"]),
            "kv_leakage": max(0.0, 1.0 - kv["goodput_bps"] / capacity),
            "kv_share": kv["goodput_bps"] / (capacity - ctl["goodput_bps"]),
            "jain": jain([ctl["goodput_bps"] / weights[CTL], kv["goodput_bps"] / weights[KV]]),
            "utilization": (ctl["goodput_bps"] + kv["goodput_bps"]) / capacity,
        }
    return out


def run_repeat(path: str, repeat: int, opts: Options, file: str | None) -> dict[str, Any]:
    sched = Schedule.draw(opts, repeat)
    order = PHASES[repeat % len(PHASES):] + PHASES[:repeat % len(PHASES)]
    runs = {phase: run_phase(path, phase, opts, sched, file) for phase in order}
    iso_p99 = percentiles_us(runs["ctl_isolated"].classes[CTL].lat_ns)[1]
    slo_us = opts.slo_us if opts.slo_us is not None else AUTO_SLO_FACTOR * iso_p99
    phases = {}
    for phase in PHASES:
        r = runs[phase]
        phases[phase] = {"qos": not phase.endswith("_fifo"),
                         "classes": {c: class_metrics(c, run, r.verified[c], slo_us) for c, run in r.classes.items()},
                         "qos_stats": r.qos_stats}
    weights = {c: QosConfig.from_env().classes[c].weight for c in (CTL, KV)}
    return {"repeat": repeat, "order": list(order), "slo_us": slo_us, "phases": phases,
            "mixed": mixed_metrics(phases, weights)}


def median_tree(items: list[Any]) -> Any:
    """Element-wise median of equally shaped nested dicts of numbers (other leaves: the first)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: median_tree([it[k] for it in items]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        xs = [x for x in items if not math.isnan(x)]
        return statistics.median(xs) if xs else float("nan")
    return first


def judge(mixed: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for phase in MIXED:
        out[phase] = {}
        for key, (op, bound) in TARGETS.items():
            v = mixed[phase][key]
            out[phase][key] = {"value": v, "target": f"{op} {bound}", "met": bool(v <= bound if op == "<=" else v >= bound)}
    return out


# --- output ----------------------------------------------------------------------------------

def _fmt_target(key: str, v: float) -> str:
    return f"{v:.2f}x" if key == "ctl_p99_ratio" else f"{v * 100:.1f}%"


def print_path(path: str, res: dict[str, Any], opts: Options, out: TextIO) -> None:
    med = res["median"]
    if opts.slo_us is None:
        slo = f"auto = {AUTO_SLO_FACTOR:g} x isolated control p99 per repeat, median {med['slo_us']:.1f} us"
    else:
        slo = f"{opts.slo_us:g} us"
    print(f"\n# {path}: medians of {opts.repeats} repeats x {opts.duration:g} s per phase; MB/s = 1e6 bytes/s; "
          f"latency us; SLO {slo}", file=out)
    t = Table([("phase", 16, ""), ("class", 8, ""), ("ops", 6, ".0f"), ("MB/s", 8, ".1f"), ("p50 us", 8, ".1f"),
               ("p99 us", 8, ".1f"), ("SLO %", 6, ".1f"), ("p99 x", 6, ".2f"), ("leak %", 6, ".1f")], out=out)
    nan = float("nan")
    for phase in PHASES:
        for cls, m in med["phases"][phase]["classes"].items():
            mx = med["mixed"].get(phase, {})
            ratio = mx.get("ctl_p99_ratio", nan) if cls == CTL else nan
            leak = mx.get("ctl_leakage" if cls == CTL else "kv_leakage", nan) * 100
            t.row([phase, cls, m["ops"], m["goodput_bps"] / 1e6, m["p50_us"], m["p99_us"],
                   m.get("slo_attainment", nan) * 100, ratio, leak])
    t = Table([("mixed", 12, ""), ("kv_share %", 10, ".1f"), ("Jain", 6, ".3f"), ("util %", 7, ".1f")], out=out)
    for phase in MIXED:
        mx = med["mixed"][phase]
        t.row([phase, mx["kv_share"] * 100, mx["jain"], mx["utilization"] * 100])
    parts = []
    for key, (op, bound) in TARGETS.items():
        cells = [f"{ph.split('_')[1]} {_fmt_target(key, res['targets'][ph][key]['value'])} "
                 f"{'PASS' if res['targets'][ph][key]['met'] else 'MISS'}" for ph in MIXED]
        parts.append(f"{key} {op} {_fmt_target(key, bound)}: " + ", ".join(cells))
    print(f"{path} targets: " + "; ".join(parts), file=out, flush=True)


def host_facts(opts: Options, file: str | None) -> dict[str, Any]:
    from .. import __version__

    facts: dict[str, Any] = {"dpmove": __version__, "host": platform.node(), "kernel": platform.release(),
                             "cpus": os.cpu_count(), "switch_interval_s": SWITCH_INTERVAL_S}
    if file is not None:
        with Engine(qos=QosConfig.from_env(), name="bench-qos-probe") as eng:
            f = eng.open(file, "r", direct="auto")
            facts.update(backend=eng.backend, file=os.path.abspath(file), o_direct=bool(f.direct),
                         o_direct_reason=f.direct_reason)
            f.close()
    return facts


def run(opts: Options, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Runs the bench, prints a table per path to `out`, and returns the results (JSON-able)."""
    opts.validate()
    result: dict[str, Any] = {"config": opts.as_dict(), "paths": {}}
    saved = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        with contextlib.ExitStack() as stack:
            file = stack.enter_context(bench_file(opts)) if "storage" in opts.paths else None
            facts = host_facts(opts, file)
            result["config"].update(qos=dataclasses.asdict(QosConfig.from_env()), host=facts,
                                    units={"goodput_bps": "bytes/s", "latency": "us, submit to wait returned",
                                           "slo_attainment": "fraction", "leakage": "fraction"})
            if file is not None and not facts["o_direct"]:
                print(f"# storage: O_DIRECT is not available ({facts['o_direct_reason']}): reads go through the "
                      "page cache, so the storage figures are not the device's", file=out, flush=True)
            for path in opts.paths:
                repeats = [run_repeat(path, r, opts, file) for r in range(opts.repeats)]
                med = median_tree([{k: r[k] for k in ("slo_us", "phases", "mixed")} for r in repeats])
                res = {"repeats": repeats, "median": med, "targets": judge(med["mixed"])}
                result["paths"][path] = res
                print_path(path, res, opts, out)
    finally:
        sys.setswitchinterval(saved)
    return result


def main(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    out = sys.stderr if args.json == "-" else sys.stdout  # the JSON owns stdout
    try:
        result = run(opts, out)
    except VerificationError as exc:
        print(f"dpmove bench qos: data verification failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        dump_json(result, args.json)
    return 0
