"""Experiments of ``dpmove sim``: offline JCT, online SLO-rate search, the section-7 bounds,
and the validation suite against the paper's numbers (DUALPATH.md section 8).

Every function returns JSON-able dicts in the shape ``dpmove.sim.report`` renders.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import scheduler as sched
from .cluster import SimConfig, Simulation, turn_tokens
from .hardware import ClusterSpec, ComputeModel, calibration_table, get_compute_model
from .trace import Trace, generate

__all__ = ["run_offline", "run_online", "run_many", "max_rate", "bounds", "validate", "SLO_TTFT_S", "SLO_TPOT_S",
           "ABLATION", "PAPER"]

SLO_TTFT_S = 4.0
SLO_TPOT_S = 0.050
ABLATION = ("basic", "layerwise", "dualpath-nosched", "dualpath")

# The paper's figures (DUALPATH.md section 8).
PAPER = {
    "offline_speedup": 1.87,
    "ablation_reduction_pct": {"layerwise": 17.21, "dualpath-nosched": 38.19, "dualpath": 45.62},
    "online_rate_ratio_ds660b": 2.25,
    "scale_jct_s": (3167.0, 3201.0),
}


def _pct(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99), "n": int(x.size)}


def bounds(trace: Trace, model: ComputeModel, cluster: ClusterSpec, policy: sched.Policy) -> dict:
    """Bottleneck-free lower bounds on JCT next to the section-7 P/D range.

    io_bound: all stored bytes read through the storage NICs that may read (PE nodes only
    without dual path); compute_bound: all prefill compute spread over every PE GPU."""
    hit, new = turn_tokens(trace, model)
    read_bytes = float(hit.sum()) * model.bytes_per_token
    readers = cluster.p_nodes + (cluster.d_nodes if policy.dual_path else 0)
    io = 0.0 if policy.free_io else read_bytes / (readers * cluster.snic_read_Bps)
    # Every chunk split of a turn computes the same FLOPs as the whole turn at once.
    comp = float(model.prefill_s(new.astype(np.float64), hit).sum()) / (cluster.p_nodes * cluster.gpus_per_node)
    lo, hi = cluster.pd_bounds()
    pd = cluster.p_nodes / cluster.d_nodes
    return {"pd_ratio": pd, "pd_min": lo, "pd_max": hi, "within": bool(lo <= pd <= hi),
            "io_bound_jct_s": io, "compute_bound_jct_s": comp, "bound_jct_s": max(io, comp),
            "read_bytes": read_bytes}


def _latency(sim: Simulation, sel: np.ndarray) -> dict:
    return {"ttft": _pct((sim.t_first - sim.t_arrive)[sel]), "ttst": _pct((sim.t_second - sim.t_arrive)[sel]),
            "tpot": _pct(sim.tpot[sel])}


def _result(sim: Simulation, cfg: SimConfig, mode: str, dataset: str, seed: int, wall_s: float,
            rate_aps: Optional[float], window: Optional[tuple]) -> dict:
    c, m = cfg.cluster, cfg.model
    if window is None:
        sel = np.ones(sim.trace.num_turns, dtype=bool)
    else:
        sel = (sim.t_arrive >= window[0]) & (sim.t_arrive < window[1])
    jct = float(np.nanmax(sim.t_done)) if sim.trace.num_turns else 0.0
    nb = max(1, int(math.ceil(jct / cfg.bin_s)))
    snic = sim.snic_busy.util(nb)
    pe = sim.pe_gpu_busy.util(nb).mean(axis=1)
    de = sim.de_gpu_busy.util(nb).mean(axis=1)
    readers = sim.read_bytes[: c.p_nodes + (c.d_nodes if cfg.policy.dual_path else 0)]
    bal = float(readers.max() / readers.mean()) if readers.size and readers.mean() > 0 else 1.0
    return {
        "mode": mode, "policy": cfg.policy.name, "model": m.name,
        "p_nodes": c.p_nodes, "d_nodes": c.d_nodes, "gpus_per_node": c.gpus_per_node,
        "agents": sim.trace.num_agents, "dataset": dataset, "seed": seed,
        "rate_aps": rate_aps, "jct_s": jct if mode == "offline" else None,
        "turns": int(sim.trace.num_turns), "wall_s": wall_s, "events": int(sim.events),
        "latency_s": _latency(sim, sel),
        "timeline": {"bin_s": cfg.bin_s, "t_s": (np.arange(nb) * cfg.bin_s).tolist(),
                     "snic_util": snic.round(4).tolist(), "pe_gpu_util": pe.round(4).tolist(),
                     "de_gpu_util": de.round(4).tolist()},
        "snic_read_bytes": sim.read_bytes.tolist(), "snic_balance": bal,
        "pe_gpu_busy": float(sim.pe_gpu_busy.total() / (jct * c.p_nodes * c.gpus_per_node)) if jct else 0.0,
        "de_gpu_busy": float(sim.de_gpu_busy.total() / (jct * c.d_nodes * c.gpus_per_node)) if jct else 0.0,
        "bounds": bounds(sim.trace, m, c, cfg.policy),
        # Online: the last third of the window alone. Agents wait for their own turns, so an
        # overloaded cluster first shows as latency that keeps growing, not as a lost request.
        "latency_tail_s": None if window is None else _latency(
            sim, (sim.t_arrive >= window[1] - (window[1] - window[0]) / 3) & (sim.t_arrive < window[1])),
    }


def _progress_bar(total: int, desc: str, enabled: bool):
    """(callback, close) for a tqdm bar over finished turns; no-ops when disabled or absent."""
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        return None, lambda: None
    bar = tqdm(total=total, desc=desc, unit="turn", leave=False, mininterval=0.5)

    def cb(done: int) -> None:
        bar.update(done - bar.n)

    return cb, bar.close


def run_offline(model: str = "ds-660b", p_nodes: int = 2, d_nodes: int = 4, policy: str = "dualpath",
                agents: int = 1024, dataset: str = "64k", seed: int = 0, trace: Optional[Trace] = None,
                cluster: Optional[ClusterSpec] = None, progress: bool = False, bin_s: float = 10.0) -> dict:
    """All agents start at t=0; JCT is when the last turn of the last agent ends."""
    cm = get_compute_model(model)
    cl = (cluster or ClusterSpec(dram_bytes=cm.host_dram_bytes)).with_nodes(p_nodes, d_nodes)
    tr = trace if trace is not None else generate(dataset, agents, seed=seed)
    cfg = SimConfig(cluster=cl, model=cm, policy=sched.get_policy(policy), bin_s=bin_s)
    cb, close = _progress_bar(tr.num_turns, f"{policy} {p_nodes}P{d_nodes}D", progress)
    t0 = time.perf_counter()
    try:
        sim = Simulation(cfg, tr, progress=cb).run()
    finally:
        close()
    return _result(sim, cfg, "offline", dataset, seed, time.perf_counter() - t0, None, None)


def run_online(model: str = "ds-660b", p_nodes: int = 2, d_nodes: int = 4, policy: str = "dualpath",
               rate_aps: float = 0.2, duration_s: float = 7200.0, warmup_s: float = 2400.0,
               dataset: str = "64k", seed: int = 0, cluster: Optional[ClusterSpec] = None,
               progress: bool = False, bin_s: float = 10.0, trace: Optional[Trace] = None) -> dict:
    """Agents arrive as a Poisson process of `rate_aps` for `duration_s`; latencies count the
    turns that arrive in [warmup_s, duration_s) (steady state, before arrivals stop)."""
    if not rate_aps > 0:
        raise ValueError(f"rate_aps must be > 0, got {rate_aps}")
    if not 0 <= warmup_s < duration_s:
        raise ValueError(f"need 0 <= warmup_s < duration_s, got {warmup_s}, {duration_s}")
    rng = np.random.default_rng(seed + 7919)
    gaps = rng.exponential(1.0 / rate_aps, size=int(rate_aps * duration_s * 1.5) + 16)
    starts = np.cumsum(gaps)
    starts = starts[starts < duration_s]
    if len(starts) == 0:
        starts = np.zeros(1)
    # Arriving agent i follows trajectory i of the trace (a trace file is tiled or cut to fit).
    tr = generate(dataset, len(starts), seed=seed) if trace is None else trace.tile(len(starts))
    cm = get_compute_model(model)
    cl = (cluster or ClusterSpec(dram_bytes=cm.host_dram_bytes)).with_nodes(p_nodes, d_nodes)
    cfg = SimConfig(cluster=cl, model=cm, policy=sched.get_policy(policy), bin_s=bin_s)
    cb, close = _progress_bar(tr.num_turns, f"{policy} {rate_aps:.3g} agents/s", progress)
    t0 = time.perf_counter()
    try:
        sim = Simulation(cfg, tr, start_s=starts, progress=cb).run()
    finally:
        close()
    return _result(sim, cfg, "online", dataset, seed, time.perf_counter() - t0, rate_aps, (warmup_s, duration_s))


def _call(job):
    fn, kw = job
    return fn(**kw)


def run_many(jobs: Sequence[tuple], workers: Optional[int] = None, progress: bool = False) -> List[dict]:
    """Run independent simulations [(function, kwargs)] on `workers` processes (default: one
    per CPU), results in job order. One worker runs them in this process."""
    import os

    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers <= 1:
        return [_call(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    bar, close = _progress_bar(len(jobs), "simulations", progress)
    out: List[Optional[dict]] = [None] * len(jobs)
    # fork: workers inherit the imported modules; each job is self-contained.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
        futs = {ex.submit(_call, j): i for i, j in enumerate(jobs)}
        from concurrent.futures import as_completed

        done = 0
        try:
            for f in as_completed(futs):
                out[futs[f]] = f.result()
                done += 1
                if bar:
                    bar(done)
        except BaseException:
            for f in futs:  # fail now, not after every other job has run
                f.cancel()
            raise
        finally:
            close()
    return out  # type: ignore[return-value]


def meets_slo(res: dict, stat: str = "mean") -> bool:
    """TTFT <= 4 s and TPOT <= 50 ms on `stat`, over the measured window and over its last
    third (a cluster past its capacity meets the SLO early in the window, then drifts off)."""
    for key in ("latency_s", "latency_tail_s"):
        lat = res.get(key)
        if lat is None or (key == "latency_tail_s" and not lat["ttft"]["n"]):
            continue  # no tail window (offline), or no turn arrived in it
        ttft, tpot = lat["ttft"][stat], lat["tpot"][stat]
        if ttft is None or tpot is None or ttft > SLO_TTFT_S or tpot > SLO_TPOT_S:
            return False
    return True


def max_rate(policy: str, lo: float = 0.02, hi: float = 1.0, iters: int = 7, stat: str = "mean",
             on_point: Optional[Callable[[dict], None]] = None, **kw) -> dict:
    """Highest arrival rate (agents/s) meeting the SLO (TTFT <= 4 s and TPOT <= 50 ms on
    `stat`, see meets_slo), by bisection on a log scale between lo and hi (hi doubled until it
    misses). Returns {"rate_aps": 0 when even lo misses, "points": every run}."""
    if not 0 < lo < hi:
        raise ValueError(f"max_rate needs 0 < lo < hi agents/s, got lo={lo}, hi={hi}")
    points: List[dict] = []

    def ok(rate: float) -> bool:
        r = run_online(policy=policy, rate_aps=rate, **kw)
        r["slo_ok"] = meets_slo(r, stat)
        points.append(r)
        if on_point:
            on_point(r)
        return r["slo_ok"]

    if not ok(lo):
        return {"rate_aps": 0.0, "points": points}
    for _ in range(8):  # hi must miss the SLO: double it until it does
        if not ok(hi):
            break
        lo, hi = hi, 2 * hi
    else:
        return {"rate_aps": lo, "points": points}
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return {"rate_aps": lo, "points": points}


def _max_rate_job(**kw) -> dict:
    return max_rate(**kw)


def validate(agents: Sequence[int] = (1024, 2048), scale: bool = True, online: bool = True,
             workers: Optional[int] = None, progress: bool = False,
             log: Callable[[str], None] = lambda s: None, sweep_agents: int = 512,
             scale_agents: int = 2000, scale_factor: int = 24) -> dict:
    """Runs every validation experiment of the issue and returns a report dict (see
    ``report``) whose "validation" rows compare each figure with the paper's."""
    rep: Dict[str, object] = {"offline": [], "ablation": [], "pd_sweep": [], "scale": [], "validation": []}
    rows: List[dict] = rep["validation"]  # type: ignore[assignment]

    def row(check: str, paper: float, sim: float, target: str, ok: bool) -> None:
        rows.append({"check": check, "paper": paper, "sim": sim,
                     "ratio": (sim / paper) if paper else None, "target": target, "ok": bool(ok)})
        log(f"{'ok  ' if ok else 'MISS'} {check}: paper {paper:.4g}, simulated {sim:.4g} ({target})")

    pols = ("basic", "layerwise", "dualpath-nosched", "dualpath", "oracle")
    jobs = [(run_offline, dict(model="ds-660b", p_nodes=2, d_nodes=4, policy=pol, agents=n, dataset="64k"))
            for n in agents for pol in pols]
    jobs += [(run_offline, dict(model="ds-27b", p_nodes=p, d_nodes=d, policy=pol, agents=sweep_agents, dataset="64k"))
             for p, d in ((1, 1), (2, 1), (1, 2)) for pol in ("basic", "dualpath")]
    if online:
        jobs += [(_max_rate_job, dict(policy=pol, model="ds-660b", p_nodes=2, d_nodes=4)) for pol in ("basic", "dualpath")]
    log(f"running {len(jobs)} simulations")
    out = run_many(jobs, workers, progress)
    k = 0
    for n in agents:
        res = {}
        for pol in pols:
            res[pol] = out[k]
            k += 1
            log(f"ds-660b 2P4D {n} agents {pol}: JCT {res[pol]['jct_s']:.0f} s ({res[pol]['wall_s']:.1f} s wall)")
        rep["offline"].extend(res[p] for p in ("basic", "dualpath", "oracle"))  # type: ignore[union-attr]
        sp = res["basic"]["jct_s"] / res["dualpath"]["jct_s"]
        row(f"DS-660B 2P4D 64K, {n} agents: JCT Basic / DualPath", PAPER["offline_speedup"], sp,
            "within +-15 %", abs(sp / PAPER["offline_speedup"] - 1) <= 0.15)
        orc = res["dualpath"]["jct_s"] / res["oracle"]["jct_s"]
        row(f"DS-660B 2P4D 64K, {n} agents: JCT DualPath / Oracle", 1.0, orc, "<= 1.15", orc <= 1.15)
        if n == max(agents):
            rep["ablation"] = [res[p] for p in ABLATION]
            base = res["basic"]["jct_s"]
            prev = 0.0
            for pol, paper in PAPER["ablation_reduction_pct"].items():
                red = 100.0 * (1 - res[pol]["jct_s"] / base)
                row(f"ablation, {n} agents: JCT reduction (%) with +{pol}", paper, red,
                    "within +-8 points, increasing", abs(red - paper) <= 8 and red > prev)
                prev = red
    jct = {}
    for p, d in ((1, 1), (2, 1), (1, 2)):
        for pol in ("basic", "dualpath"):
            r = out[k]
            k += 1
            rep["pd_sweep"].append(r)  # type: ignore[union-attr]
            jct[(pol, p, d)] = r["jct_s"]
            log(f"ds-27b {p}P{d}D {pol}: JCT {r['jct_s']:.0f} s")
    for name, a, b in (("Basic 1P1D / Basic 1P2D", ("basic", 1, 1), ("basic", 1, 2)),
                       ("DualPath 1P1D / Basic 2P1D", ("dualpath", 1, 1), ("basic", 2, 1)),
                       ("DualPath 2P1D / DualPath 1P2D", ("dualpath", 2, 1), ("dualpath", 1, 2))):
        ratio = jct[a] / jct[b]
        row(f"DS-27B P/D sweep, {sweep_agents} agents: JCT {name}", 1.0, ratio, "within 10 %", abs(ratio - 1) <= 0.10)
    if online:
        mr, pts = {}, []
        for pol in ("basic", "dualpath"):
            o = out[k]
            k += 1
            mr[pol] = o["rate_aps"]
            pts.extend(o["points"])
            for r in o["points"]:
                lat = r["latency_s"]
                log(f"online {pol} {r['rate_aps']:.3f} agents/s: TTFT {lat['ttft']['mean']:.2f} s, "
                    f"TPOT {1e3 * lat['tpot']['mean']:.1f} ms: {'meets' if r['slo_ok'] else 'misses'} the SLO")
        rep["online"] = {"points": pts, "max_rate": mr,
                         "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S, "percentile": "mean"}}
        ratio = mr["dualpath"] / mr["basic"] if mr["basic"] else float("inf")
        row("online DS-660B 2P4D 64K: max agents/s DualPath / Basic", PAPER["online_rate_ratio_ds660b"], ratio,
            "within +-20 %", abs(ratio / PAPER["online_rate_ratio_ds660b"] - 1) <= 0.20)
    if scale:
        f = scale_factor
        small = run_offline("ds-660b", 2, 4, "dualpath", agents=scale_agents, progress=progress, bin_s=30.0)
        big = run_offline("ds-660b", 2 * f, 4 * f, "dualpath", agents=scale_agents * f, progress=progress, bin_s=30.0)
        rep["scale"] = [small, big]
        ratio = big["jct_s"] / small["jct_s"]
        row(f"scale: JCT {2 * f}P{4 * f}D {scale_agents * f} agents / 2P4D {scale_agents} agents",
            PAPER["scale_jct_s"][1] / PAPER["scale_jct_s"][0], ratio, "within 5 % of 1", abs(ratio - 1) <= 0.05)
    rep["calibration"] = calibration_table(get_compute_model("ds-660b"), ClusterSpec())
    return rep
