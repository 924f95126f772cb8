"""Human reports of ``dpmove sim`` results: aligned text / markdown tables, PNG plots, JSON.

Input contract (all times in seconds, sizes in bytes). One *result* is the dict one simulation
run returns (keys: mode, policy, model, p_nodes, d_nodes, gpus_per_node, agents, dataset, seed,
rate_aps, jct_s, turns, wall_s, events, latency_s, timeline, snic_read_bytes, snic_balance,
pe_gpu_busy, de_gpu_busy, bounds). A *report* is a dict whose keys are all optional:
  offline     [result]   one experiment, several policies
  ablation    [result]   basic, layerwise, dualpath-nosched, dualpath
  pd_sweep    [result]   (p_nodes, d_nodes) x policy
  online      {"points": [result], "max_rate": {policy: aps}, "slo": {"ttft_s", "tpot_s"}}
  scale       [result]   one policy, several cluster sizes
  validation  [{"check", "paper", "sim", "ratio", "target", "ok"}]
  calibration {name: {"value", "unit", "source"}}
Table builders return ``(headers, rows)`` of raw values (numbers, str, bool, None); only
``format_table`` / ``to_markdown`` turn them into text (None / NaN -> "-", bool -> yes/no).
A result missing a key a table needs raises ValueError naming the key (dotted for nested ones).
Speedup vs X is ``jct_X / jct`` (> 1: faster than X); reduction vs basic is ``1 - jct/jct_basic``
in percent. matplotlib is imported only inside the plot functions (no pyplot, so no global
backend state and no figure to leak); without it they raise RuntimeError.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

POLICY_ORDER = ["basic", "layerwise", "dualpath-nosched", "dualpath", "oracle"]
SECTIONS = ["calibration", "offline", "bounds", "ablation", "pd_sweep", "online", "scale", "validation"]
_INSTALL = "plotting needs matplotlib: pip install 'dpmove[sim]'"
Table = Tuple[List[str], List[List[Any]]]


# ---------------------------------------------------------------- values and validation
def _plain(v: Any) -> Any:
    """numpy scalar -> Python scalar (duck-typed, numpy is not imported here)."""
    return v.item() if hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "ndim", 0) == 0 else v


def _isnum(v: Any) -> bool:
    v = _plain(v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any) -> Optional[float]:
    """A finite float, or None for None / NaN / inf."""
    v = _plain(v)
    return float(v) if _isnum(v) and math.isfinite(v) else None


def _cell(v: Any) -> str:
    v = _plain(v)
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        a = abs(v)
        return "0.00" if a == 0 else f"{v:.0f}" if a >= 1000 else f"{v:.2f}" if a >= 1 else f"{v:#.3g}"
    return str(v)


def _get(r: Any, key: str) -> Any:
    """r[key] with a dotted path for nested keys; ValueError naming the key when absent."""
    cur = r
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            who = r.get("policy", "?") if isinstance(r, dict) else type(r).__name__
            raise ValueError(f"simulation result (policy {who!r}) is missing required key {key!r}")
        cur = cur[part]
    return cur


def _need(results: Sequence[Any], *keys: str) -> None:
    for r in results:
        for k in keys:
            _get(r, k)


def _porder(p: str) -> int:
    return POLICY_ORDER.index(p) if p in POLICY_ORDER else len(POLICY_ORDER)


def _by_policy(results: Sequence[dict]) -> List[dict]:
    return sorted(results, key=lambda r: _porder(r["policy"]))  # stable for unknown policies


def _ratio(a: Any, b: Any) -> Optional[float]:
    a, b = _num(a), _num(b)
    return a / b if a is not None and b else None


def _cfg(r: dict) -> str:
    return f"{r['p_nodes']}P{r['d_nodes']}D"


def _jct_of(results: Sequence[dict], policy: str) -> Optional[float]:
    return next((_num(r["jct_s"]) for r in results if r["policy"] == policy), None)


# ---------------------------------------------------------------- text tables
def _numcol(rows: Sequence[Sequence[Any]], i: int) -> bool:
    """A column is numeric when it has a number and nothing but numbers and blanks (None / NaN)."""
    vals = [_plain(r[i]) for r in rows if _plain(r[i]) is not None]
    return bool(vals) and all(_isnum(v) for v in vals)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[Sequence[str]] = None) -> str:
    """Aligned plain text; align is 'l'/'r' per column (e.g. "lrr"), default: numeric columns right."""
    cells = [[_cell(v) for v in row] for row in rows]
    align = list(align) if align is not None else ["r" if _numcol(rows, i) else "l" for i in range(len(headers))]
    w = [max([len(str(h))] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    line = lambda cs: "  ".join(c.rjust(w[i]) if align[i] == "r" else c.ljust(w[i]) for i, c in enumerate(cs)).rstrip()
    return "\n".join([line([str(h) for h in headers]), "  ".join("-" * x for x in w)] + [line(c) for c in cells])


def to_markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """GitHub-flavoured markdown table; numeric columns right aligned, '|' escaped."""
    esc = lambda s: str(s).replace("|", "\\|")
    num = [_numcol(rows, i) for i in range(len(headers))]
    out = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---:" if x else "---" for x in num) + "|"]
    out += ["| " + " | ".join(esc(_cell(v)) for v in row) + " |" for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- table builders
def offline_table(results: Sequence[dict]) -> Table:
    """One row per policy: JCT, speedup vs basic and (when an oracle run is present) vs oracle."""
    _need(results, "policy", "jct_s", "turns", "snic_balance", "pe_gpu_busy", "de_gpu_busy")
    base, orc = _jct_of(results, "basic"), _jct_of(results, "oracle")
    headers = ["policy", "JCT (s)", "speedup vs basic"] + (["speedup vs oracle"] if orc else []) + \
              ["turns", "SNIC max/avg", "PE GPU busy", "DE GPU busy"]
    rows = []
    for r in _by_policy(results):
        row = [r["policy"], _num(r["jct_s"]), _ratio(base, r["jct_s"])] + ([_ratio(orc, r["jct_s"])] if orc else [])
        rows.append(row + [r["turns"], r["snic_balance"], r["pe_gpu_busy"], r["de_gpu_busy"]])
    return headers, rows


def ablation_table(results: Sequence[dict]) -> Table:
    """Policies in ablation order: JCT, % reduction vs basic and vs the previous step."""
    _need(results, "policy", "jct_s")
    def red(j: Optional[float], ref: Optional[float]) -> Optional[float]:
        return 100.0 * (1.0 - j / ref) if j is not None and ref else None

    base, prev, rows = _jct_of(results, "basic"), None, []
    for r in _by_policy(results):
        j = _num(r["jct_s"])
        rows.append([r["policy"], j, red(j, base), red(j, prev)])
        prev = j
    return ["policy", "JCT (s)", "reduction vs basic (%)", "vs previous (%)"], rows


def pd_sweep_table(results: Sequence[dict]) -> Table:
    """One row per (p_nodes, d_nodes): JCT per policy, and basic/dualpath speedup when both ran."""
    _need(results, "policy", "jct_s", "p_nodes", "d_nodes")
    pols = sorted({r["policy"] for r in results}, key=lambda p: (_porder(p), p))
    cfgs = sorted({(r["p_nodes"], r["d_nodes"]) for r in results}, key=lambda c: (c[0] / c[1] if c[1] else math.inf, c))
    jct = {(r["p_nodes"], r["d_nodes"], r["policy"]): _num(r["jct_s"]) for r in results}
    sp = "basic" in pols and "dualpath" in pols
    rows = []
    for p, d in cfgs:
        row = [f"{p}P{d}D", p / d if d else None] + [jct.get((p, d, pol)) for pol in pols]
        rows.append(row + ([_ratio(jct.get((p, d, "basic")), jct.get((p, d, "dualpath")))] if sp else []))
    return ["config", "P/D"] + [f"{p} JCT (s)" for p in pols] + (["dualpath speedup"] if sp else []), rows


def _slo_pct(online: dict) -> str:
    return online.get("slo", {}).get("percentile", "p90")


def online_table(online: dict) -> Table:
    """One row per (policy, rate): TTFT / TTST / TPOT percentiles and whether the SLO holds."""
    pts, slo, pc = online.get("points", []), online.get("slo") or {}, _slo_pct(online)
    _need(pts, "policy", "rate_aps", "latency_s.ttft." + pc, "latency_s.ttft.p50", "latency_s.ttst.p90",
          "latency_s.tpot." + pc, "latency_s.tpot.p50")
    rows = []
    for r in sorted(pts, key=lambda r: (_porder(r["policy"]), r["policy"], _num(r["rate_aps"]) or 0.0)):
        lat = r["latency_s"]
        ttft, tpot = _num(lat["ttft"][pc]), _num(lat["tpot"][pc])
        ok = None
        if "ttft_s" in slo and "tpot_s" in slo and ttft is not None and tpot is not None:
            ok = ttft <= slo["ttft_s"] and tpot <= slo["tpot_s"]
        rows.append([r["policy"], r["rate_aps"], lat["ttft"]["p50"], lat["ttft"][pc], lat["ttst"]["p90"],
                     lat["tpot"]["p50"], lat["tpot"][pc], ok])
    return ["policy", "rate (agents/s)", "TTFT p50 (s)", f"TTFT {pc} (s)", "TTST p90 (s)", "TPOT p50 (s)",
            f"TPOT {pc} (s)", "meets SLO"], rows


def max_rate_table(online: dict) -> Table:
    """Highest arrival rate meeting the SLO per policy, and its gain over basic."""
    mr = online.get("max_rate") or {}
    base = _num(mr.get("basic"))
    rows = [[p, _num(v), _ratio(v, base)] for p, v in sorted(mr.items(), key=lambda kv: (_porder(kv[0]), kv[0]))]
    return ["policy", "max rate (agents/s)", "vs basic"], rows


def scale_table(results: Sequence[dict]) -> Table:
    """One row per cluster size (by GPU count): JCT, JCT relative to the smallest, agents/s."""
    _need(results, "policy", "jct_s", "p_nodes", "d_nodes", "gpus_per_node", "agents")
    rs = sorted(results, key=lambda r: ((r["p_nodes"] + r["d_nodes"]) * r["gpus_per_node"], r["agents"]))
    first = _num(rs[0]["jct_s"]) if rs else None
    rows = [[r["policy"], _cfg(r), (r["p_nodes"] + r["d_nodes"]) * r["gpus_per_node"], r["agents"], _num(r["jct_s"]),
             _ratio(r["jct_s"], first), _ratio(r["agents"], r["jct_s"])] for r in rs]
    return ["policy", "config", "GPUs", "agents", "JCT (s)", "JCT / smallest", "agents/s"], rows


def validation_table(rows: Sequence[dict]) -> Table:
    _need(rows, "check", "paper", "sim", "ratio", "target", "ok")
    return ["check", "paper", "sim", "sim/paper", "target", "ok"], \
        [[v["check"], v["paper"], v["sim"], v["ratio"], v["target"], v["ok"]] for v in rows]


def calibration_table(cal: Dict[str, dict]) -> Table:
    for name, v in cal.items():
        for k in ("value", "unit", "source"):
            if not isinstance(v, dict) or k not in v:
                raise ValueError(f"calibration entry {name!r} is missing required key {k!r}")
    return ["parameter", "value", "unit", "source"], [[n, v["value"], v["unit"], v["source"]] for n, v in cal.items()]


def bounds_table(results: Sequence[dict]) -> Table:
    """Section-7 bound next to the simulated JCT, and whether P/D lies within [pd_min, pd_max]."""
    keys = ("pd_ratio", "pd_min", "pd_max", "within", "io_bound_jct_s", "compute_bound_jct_s", "bound_jct_s")
    _need(results, "policy", "jct_s", "p_nodes", "d_nodes", *("bounds." + k for k in keys))
    rows = []
    for r in results:
        b = r["bounds"]
        rows.append([f"{r['policy']} @ {_cfg(r)}", b["io_bound_jct_s"], b["compute_bound_jct_s"], b["bound_jct_s"],
                     _num(r["jct_s"]), _ratio(r["jct_s"], b["bound_jct_s"]), b["pd_ratio"],
                     f"[{_cell(b['pd_min'])}, {_cell(b['pd_max'])}]", b["within"]])
    return ["run", "IO bound (s)", "compute bound (s)", "bound (s)", "simulated (s)", "sim/bound", "P/D",
            "P/D range", "within"], rows


# ---------------------------------------------------------------- rendering
def _context(results: Sequence[dict]) -> str:
    if not results or not isinstance(results[0], dict):
        return ""
    r = results[0]
    parts = [f"model {r['model']}" if "model" in r else "",
             f"{_cfg(r)} x {r['gpus_per_node']} GPUs" if {"p_nodes", "d_nodes", "gpus_per_node"} <= r.keys() else "",
             f"{r['agents']} agents" if "agents" in r else "", f"dataset {r['dataset']}" if "dataset" in r else "",
             f"seed {r['seed']}" if "seed" in r else ""]
    return ", ".join(p for p in parts if p)


_BUILDERS = {"calibration": ("Calibration", calibration_table), "offline": ("Offline JCT", offline_table),
             "ablation": ("Ablation", ablation_table), "pd_sweep": ("P/D ratio sweep", pd_sweep_table),
             "scale": ("Scaling", scale_table), "validation": ("Validation against the paper", validation_table)}


def _bound_results(report: dict) -> List[dict]:
    """Results of offline, pd_sweep and scale that carry bounds, one per (policy, cluster, workload)."""
    seen, out = set(), []
    for r in (r for k in ("offline", "pd_sweep", "scale") for r in report.get(k) or []):
        key = tuple(str(r.get(k)) for k in ("policy", "p_nodes", "d_nodes", "gpus_per_node", "agents", "dataset"))
        if isinstance(r, dict) and "bounds" in r and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _sections(report: dict) -> List[Tuple[str, str, List[Table]]]:
    """(title, context line, tables) for every present, non-empty section, in SECTIONS order."""
    out = []
    bres = _bound_results(report)
    for key in SECTIONS:
        data = report.get(key)
        if key == "bounds" and bres:
            out.append(("Bounds (section 7)", "", [bounds_table(bres)]))
        if not data or (key == "online" and not data.get("points") and not data.get("max_rate")):
            continue
        if key == "online":
            slo, pc = data.get("slo") or {}, _slo_pct(data)
            ctx = f"SLO: TTFT {pc} <= {slo['ttft_s']} s, TPOT {pc} <= {slo['tpot_s']} s" \
                if {"ttft_s", "tpot_s"} <= slo.keys() else ""
            tables = [online_table(data)] + ([max_rate_table(data)] if data.get("max_rate") else [])
            out.append(("Online serving", ctx, tables))
        elif key in _BUILDERS:
            title, build = _BUILDERS[key]
            out.append((title, _context(data) if key in ("offline", "ablation") else "", [build(data)]))
    return out


def render_text(report: dict) -> str:
    parts = ["DualPath simulation report", "=" * 26]
    for title, ctx, tables in _sections(report):
        parts += ["", title, "-" * len(title)] + ([ctx] if ctx else [])
        parts.append("\n\n".join(format_table(h, rows) for h, rows in tables))
    return "\n".join(parts) + "\n"


def render_markdown(report: dict) -> str:
    parts = ["# DualPath simulation report"]
    for title, ctx, tables in _sections(report):
        parts += ["", f"## {title}", ""] + ([ctx, ""] if ctx else [])
        parts.append("\n\n".join(to_markdown(h, rows) for h, rows in tables))
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- plots
def _figure(nrows: int = 1, figsize=(7, 4), sharex=False):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError(_INSTALL) from e
    fig = Figure(figsize=figsize, layout="constrained")  # no pyplot: Agg canvas on savefig, nothing global
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, list(axes)


def _save(fig, path) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return str(path)


def _bars(ax, labels, values, notes, ylabel, title):
    vals = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(range(len(labels)), vals, color=[f"C{_porder(l) % 10}" for l in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for b, note in zip(bars, notes):
        if note:
            ax.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)


def plot_jct(results: Sequence[dict], path) -> str:
    """Bars of JCT per policy, annotated with the speedup vs basic."""
    _need(results, "policy", "jct_s")
    rs, base = _by_policy(results), _jct_of(results, "basic")
    fig, (ax,) = _figure()
    sp = [_ratio(base, r["jct_s"]) for r in rs]
    _bars(ax, [r["policy"] for r in rs], [_num(r["jct_s"]) for r in rs], [f"x{s:.2f}" if s else "" for s in sp],
          "JCT (s)", "Offline JCT (speedup vs basic)\n" + _context(rs))
    return _save(fig, path)


def plot_ablation(results: Sequence[dict], path) -> str:
    """Bars of JCT in ablation order, annotated with the % reduction vs basic."""
    h, rows = ablation_table(results)
    fig, (ax,) = _figure()
    _bars(ax, [r[0] for r in rows], [r[1] for r in rows], [f"{-r[2]:+.1f}%" if r[2] else "" for r in rows],
          "JCT (s)", "Ablation (reduction vs basic)")
    return _save(fig, path)


def plot_snic_balance(results: Sequence[dict], path) -> str:
    """Storage NIC read imbalance (max/avg bytes over reading nodes) per policy; 1.0 is perfect."""
    _need(results, "policy", "snic_balance")
    rs = _by_policy(results)
    fig, (ax,) = _figure()
    _bars(ax, [r["policy"] for r in rs], [_num(r["snic_balance"]) for r in rs],
          [_cell(r["snic_balance"]) for r in rs], "max / avg SNIC read bytes", "Storage NIC balance")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    return _save(fig, path)


def plot_util(result: dict, path) -> str:
    """Top: storage NIC utilization per node over time (PE solid, DE dashed); bottom: PE/DE GPU utilization."""
    for k in ("p_nodes", "timeline.t_s", "timeline.snic_util", "timeline.pe_gpu_util", "timeline.de_gpu_util"):
        _get(result, k)
    tl, p = result["timeline"], result["p_nodes"]
    fig, (a1, a2) = _figure(2, figsize=(8, 6), sharex=True)
    nodes = list(zip(*tl["snic_util"])) if tl["snic_util"] else []
    few = len(nodes) <= 8
    for i, ys in enumerate(nodes):
        pe = i < p
        lab = (f"PE{i}" if pe else f"DE{i - p}") if few else ("PE nodes" if i == 0 else "DE nodes" if i == p else None)
        a1.step(tl["t_s"][:len(ys)], ys, where="post", ls="-" if pe else "--", lw=1, color=f"C{i % 10}" if few else
                ("C0" if pe else "C1"), alpha=1 if few else 0.35, label=lab)
    for lo, hi, ls, lab in ((0, p, "-", "PE mean"), (p, len(nodes), "--", "DE mean")):
        if not few and hi > lo:  # many nodes: faint per-node lines plus the mean of each kind
            mean = [sum(row[lo:hi]) / (hi - lo) for row in tl["snic_util"]]
            a1.step(tl["t_s"][:len(mean)], mean, where="post", ls=ls, lw=2, color="k", label=lab)
    a1.set_ylabel("storage NIC util")
    a1.set_ylim(0, 1.05)
    a1.set_title(f"{result.get('policy', '')} {_context([result])}".strip(), fontsize=9)
    a2.step(tl["t_s"][:len(tl["pe_gpu_util"])], tl["pe_gpu_util"], where="post", label="PE GPUs")
    a2.step(tl["t_s"][:len(tl["de_gpu_util"])], tl["de_gpu_util"], where="post", ls="--", label="DE GPUs")
    a2.set_ylabel("GPU util")
    a2.set_ylim(0, 1.05)
    a2.set_xlabel("time (s)")
    for a in (a1, a2):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7, ncol=4, loc="lower right")
    return _save(fig, path)


def plot_pd_sweep(results: Sequence[dict], path) -> str:
    """Grouped bars: JCT per P/D config, one bar per policy."""
    h, rows = pd_sweep_table(results)
    pols = [x[: -len(" JCT (s)")] for x in h if x.endswith(" JCT (s)")]
    fig, (ax,) = _figure(figsize=(max(6, 1.2 * len(rows) + 2), 4))
    w = 0.8 / max(1, len(pols))
    for j, pol in enumerate(pols):
        ax.bar([i + (j - (len(pols) - 1) / 2) * w for i in range(len(rows))], [r[2 + j] or 0.0 for r in rows], w,
               label=pol, color=f"C{_porder(pol) % 10}")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylabel("JCT (s)")
    ax.set_title("P/D ratio sweep")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_online(online: dict, path) -> str:
    """TTFT and TPOT (SLO percentile) vs arrival rate per policy, with the SLO as dotted lines."""
    h, rows = online_table(online)
    slo, pc = online.get("slo") or {}, _slo_pct(online)
    fig, (a1, a2) = _figure(2, figsize=(7, 6), sharex=True)
    for pol in dict.fromkeys(r[0] for r in rows):
        pts = [r for r in rows if r[0] == pol]
        kw = dict(marker="o", label=pol, color=f"C{_porder(pol) % 10}")
        a1.plot([r[1] for r in pts], [_num(r[3]) for r in pts], **kw)
        a2.plot([r[1] for r in pts], [_num(r[6]) for r in pts], **kw)
    for a, key, lab in ((a1, "ttft_s", f"TTFT {pc} (s)"), (a2, "tpot_s", f"TPOT {pc} (s)")):
        if key in slo:
            a.axhline(slo[key], color="k", ls=":", lw=1, label="SLO")
        a.set_ylabel(lab)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    a2.set_xlabel("arrival rate (agents/s)")
    return _save(fig, path)


# ---------------------------------------------------------------- files
def _jsonable(o: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists, keys -> str."""
    if hasattr(o, "tolist") and hasattr(o, "dtype"):
        o = o.tolist()
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _have_mpl() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def write_report(report: dict, out_dir, plots: Optional[bool] = None) -> List[str]:
    """Write report.md, report.json and every plot with data into out_dir; return the paths.

    plots: True -> required (RuntimeError without matplotlib), False -> none, None -> when available.
    """
    if plots and not _have_mpl():
        raise RuntimeError(_INSTALL)
    os.makedirs(out_dir, exist_ok=True)
    p = lambda name: os.path.join(out_dir, name)
    md = render_markdown(report)  # validates everything before any file is written
    jobs = []
    off = report.get("offline") or []
    if off:
        jobs += [("jct.png", plot_jct, off), ("snic_balance.png", plot_snic_balance, off)]
        jobs += [(f"util_{i}_{re.sub(r'[^A-Za-z0-9_.-]', '_', str(r['policy']))}.png", plot_util, r)
                 for i, r in enumerate(_by_policy(off)) if (r.get("timeline") or {}).get("t_s")]
    if report.get("ablation"):
        jobs.append(("ablation.png", plot_ablation, report["ablation"]))
    if report.get("pd_sweep"):
        jobs.append(("pd_sweep.png", plot_pd_sweep, report["pd_sweep"]))
    if (report.get("online") or {}).get("points"):
        jobs.append(("online.png", plot_online, report["online"]))
    paths = [p("report.md"), p("report.json")]
    with open(p("report.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=2, allow_nan=False)
        f.write("\n")
    if plots is None and jobs and not _have_mpl():
        md += f"\n_Plots skipped: {_INSTALL}_\n"
    jobs = [] if plots is False or not _have_mpl() else jobs
    pngs = [fn(data, p(name)) for name, fn, data in jobs]
    if pngs:
        md += "\n## Plots\n\n" + "\n".join(f"![{os.path.basename(x)[:-4]}]({os.path.basename(x)})" for x in pngs) + "\n"
    with open(p("report.md"), "w") as f:
        f.write(md)
    return paths + pngs
