"""``dpmove sim``: simulate a PD-disaggregated cluster running agent trajectories.

  dpmove sim offline   n agents start together; job completion time per policy
  dpmove sim online    Poisson agent arrivals; TTFT / TTST / TPOT, or --search the highest
                       rate that meets the SLO (TTFT <= 4 s, TPOT <= 50 ms)
  dpmove sim sweep     offline JCT over several P/D configurations
  dpmove sim validate  every figure of the paper this model reproduces, with the verdicts
  dpmove sim trace     write a synthetic trace as JSONL, or print a trace file's statistics

Defaults: DeepSeek-V3.2 (ds-660b) on 2P4D (2 prefill and 4 decode nodes of 8 GPUs), the 64K
dataset. Independent simulations run on one process per CPU (--jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import List, Tuple

from ..scheduler import POLICIES


def _pd(s: str) -> Tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[pP]\s*(\d+)\s*[dD]\s*", s)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise argparse.ArgumentTypeError(f"expected a P/D configuration like 2P4D, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def _policies(s: str) -> List[str]:
    out = [p.strip() for p in s.split(",") if p.strip()]
    bad = [p for p in out if p not in POLICIES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown policy {bad or s!r}: expected a comma list of {', '.join(POLICIES)}")
    return out


def _positive(kind):
    def parse(s: str):
        v = kind(s)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
        return v
    return parse


def _common(p: argparse.ArgumentParser, policies: str, model: str = "ds-660b") -> None:
    p.add_argument("--model", default=model, help=f"ds-660b, ds-27b or qwen2.5-32b (default {model})")
    p.add_argument("--dataset", default="64k", choices=("32k", "48k", "64k"), help="Table 2 dataset (default 64k)")
    p.add_argument("--trace", metavar="JSONL",
                   help="replay this trace file instead of generating one (online: arriving agent i follows "
                        "trajectory i, the file tiled as needed)")
    p.add_argument("--policies", type=_policies, default=_policies(policies),
                   help=f"comma list of {', '.join(POLICIES)} (default {policies})")
    p.add_argument("--seed", type=int, default=0, help="trace and arrival seed (default 0)")
    p.add_argument("--dram-gb", type=_positive(float), default=None,
                   help="host DRAM per node, GB (default: the model's deployment, 80 DeepSeek / 320 Qwen)")
    p.add_argument("--jobs", type=_positive(int), default=None, help="parallel simulations (default: CPUs)")
    p.add_argument("--out", metavar="DIR", help="write report.md, report.json and plots here")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(sub) -> None:
    p = sub.add_parser("sim", help="discrete-event model of a PD-disaggregated cluster (DualPath)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ssub = p.add_subparsers(dest="sim", required=True)

    o = ssub.add_parser("offline", help="n agents start together; JCT per policy")
    o.add_argument("--pd", type=_pd, default=(2, 4), help="P/D nodes, e.g. 2P4D (default)")
    o.add_argument("--agents", type=_positive(int), default=None,
                   help="agents (default 1024; with --trace: the file's trajectories, tiled to this many)")
    _common(o, "basic,dualpath,oracle")
    o.set_defaults(func=_offline)

    n = ssub.add_parser("online", help="Poisson arrivals: latencies, or --search the SLO rate")
    n.add_argument("--pd", type=_pd, default=(2, 4), help="P/D nodes, e.g. 2P4D (default)")
    n.add_argument("--rate", type=_positive(float), default=0.2, help="agents per second (default 0.2)")
    n.add_argument("--duration", type=_positive(float), default=7200.0, help="arrival window, s (default 7200)")
    n.add_argument("--warmup", type=float, default=2400.0, help="turns arriving before this are not measured (2400)")
    n.add_argument("--search", action="store_true", help="bisect for the highest rate meeting the SLO")
    _common(n, "basic,dualpath")
    n.set_defaults(func=_online)

    w = ssub.add_parser("sweep", help="offline JCT over P/D configurations")
    w.add_argument("--pd", type=lambda s: [_pd(x) for x in s.split(",")], default=[(1, 1), (2, 1), (1, 2)],
                   help="comma list of P/D configurations (default 1P1D,2P1D,1P2D)")
    w.add_argument("--agents", type=_positive(int), default=None,
                   help="agents (default 512; with --trace: the file's trajectories, tiled to this many)")
    _common(w, "basic,dualpath", model="ds-27b")
    w.set_defaults(func=_sweep)

    v = ssub.add_parser("validate", help="the paper's figures, simulated, with verdicts")
    v.add_argument("--quick", action="store_true",
                   help="smaller runs (512 / 1024 agents, no paper-scale run, no online search): minutes")
    v.add_argument("--no-scale", action="store_true", help="skip the 48P96D paper-scale run (~10 minutes)")
    v.add_argument("--no-online", action="store_true", help="skip the online SLO-rate search")
    v.add_argument("--jobs", type=_positive(int), default=None, help="parallel simulations (default: CPUs)")
    v.add_argument("--out", metavar="DIR", help="write report.md, report.json and plots here")
    v.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_validate)

    t = ssub.add_parser("trace", help="generate a trace (JSONL) or print a trace file's statistics")
    t.add_argument("--dataset", default="64k", choices=("32k", "48k", "64k"))
    t.add_argument("--agents", type=_positive(int), default=500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--think", type=float, default=0.0, help="mean think time between turns, s (default 0)")
    t.add_argument("--out", metavar="JSONL", help="write the generated trace here")
    t.add_argument("--stats", metavar="JSONL", help="print this file's statistics next to the dataset's")
    t.set_defaults(func=_trace)


def _load_trace(args, default_agents: int):
    """The --trace file (tiled or cut to --agents when given), else a generated trace."""
    from .trace import generate, load_jsonl

    if args.trace:
        tr = load_jsonl(args.trace)
        return tr.tile(args.agents) if args.agents and args.agents != tr.num_agents else tr
    return generate(args.dataset, args.agents or default_agents, seed=args.seed)


def _cluster_kw(args) -> dict:
    """run_* keyword arguments common to every subcommand: the cluster (when --dram-gb is
    given) and the dataset label (the trace file's name when one is replayed)."""
    from .hardware import ClusterSpec, get_compute_model

    kw = {"dataset": args.dataset}
    if args.trace:
        kw["dataset"] = os.path.basename(args.trace)
    if args.dram_gb is not None:
        get_compute_model(args.model)  # a bad --model fails here with the list of known ones
        kw["cluster"] = ClusterSpec(dram_bytes=args.dram_gb * 1e9)
    return kw


def _emit(args, report: dict) -> int:
    from .report import render_text, write_report

    if args.out:
        paths = write_report(report, args.out)
        print(f"wrote {len(paths)} files to {args.out}", file=sys.stderr)
    if args.json:
        from .report import _jsonable

        print(json.dumps(_jsonable(report), indent=2))
    else:
        print(render_text(report))
    return 0


def _offline(args) -> int:
    from .experiments import run_many, run_offline

    tr = _load_trace(args, 1024)
    p, d = args.pd
    jobs = [(run_offline, dict(model=args.model, p_nodes=p, d_nodes=d, policy=pol, seed=args.seed, trace=tr,
                               agents=tr.num_agents, **_cluster_kw(args),
                               progress=not args.no_progress and len(args.policies) == 1))
            for pol in args.policies]
    res = run_many(jobs, args.jobs, progress=not args.no_progress)
    return _emit(args, {"offline": res})


def _online(args) -> int:
    from .experiments import SLO_TPOT_S, SLO_TTFT_S, _max_rate_job, meets_slo, run_many, run_online

    p, d = args.pd
    kw = dict(model=args.model, p_nodes=p, d_nodes=d, seed=args.seed, duration_s=args.duration,
              warmup_s=args.warmup, **_cluster_kw(args))
    if args.trace:
        from .trace import load_jsonl

        kw["trace"] = load_jsonl(args.trace)
    slo = {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S, "percentile": "mean"}
    if args.search:
        outs = run_many([(_max_rate_job, dict(policy=pol, **kw)) for pol in args.policies], args.jobs,
                        progress=not args.no_progress)
        pts = [r for o in outs for r in o["points"]]
        return _emit(args, {"online": {"points": pts, "slo": slo,
                                       "max_rate": {pol: o["rate_aps"] for pol, o in zip(args.policies, outs)}}})
    res = run_many([(run_online, dict(policy=pol, rate_aps=args.rate, **kw)) for pol in args.policies], args.jobs,
                   progress=not args.no_progress)
    for r in res:
        r["slo_ok"] = meets_slo(r)
    return _emit(args, {"online": {"points": res, "slo": slo}})


def _sweep(args) -> int:
    from .experiments import run_many, run_offline

    tr = _load_trace(args, 512)
    jobs = [(run_offline, dict(model=args.model, p_nodes=p, d_nodes=d, policy=pol, seed=args.seed, trace=tr,
                               agents=tr.num_agents, **_cluster_kw(args)))
            for p, d in args.pd for pol in args.policies]
    return _emit(args, {"pd_sweep": run_many(jobs, args.jobs, progress=not args.no_progress)})


def _validate(args) -> int:
    from .experiments import validate

    log = (lambda s: print(s, file=sys.stderr, flush=True))
    if args.quick:
        rep = validate(agents=(512, 1024), scale=False, online=False, workers=args.jobs,
                       progress=not args.no_progress, log=log, sweep_agents=256)
    else:
        rep = validate(scale=not args.no_scale, online=not args.no_online, workers=args.jobs,
                       progress=not args.no_progress, log=log)
    rc = _emit(args, rep)
    missed = [r["check"] for r in rep["validation"] if not r["ok"]]
    if missed:
        print(f"{len(missed)} of {len(rep['validation'])} checks outside their target", file=sys.stderr)
    return rc


def _trace(args) -> int:
    from .trace import DATASETS, compare, generate, load_jsonl, save_jsonl

    if args.stats:
        tr = load_jsonl(args.stats)
    else:
        tr = generate(args.dataset, args.agents, seed=args.seed, think_s=args.think)
        if args.out:
            save_jsonl(tr, args.out)
            print(f"wrote {tr.num_agents} trajectories, {tr.num_turns} turns to {args.out}", file=sys.stderr)
    from .report import format_table

    cmp = compare(tr, DATASETS[args.dataset])
    rows = [[k, v["table"], v["trace"], v["ratio"]] for k, v in cmp.items()]
    print(f"{tr.num_agents} trajectories, {tr.num_turns} turns; Table 2 dataset {args.dataset}")
    print(format_table(["column", "table", "trace", "ratio"], rows))
    st = tr.stats()
    print(f"hit rate {100 * st['hit_rate']:.2f} %, longest context {st['max_context']} tokens")
    return 0
