"""dpmove.sim.report: tables carry the right numbers, markdown is well formed, JSON round-trips,
write_report writes PNGs for the sections with data and skips the rest, bad input names the key."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from dpmove.sim import report as rep

PNG = b"\x89PNG\r\n\x1a\n"


def result(policy, jct, p=2, d=4, mode="offline", rate=None, ttft=1.0, tpot=0.03, bins=4):
    n = p + d
    return {
        "mode": mode, "policy": policy, "model": "ds-660b", "p_nodes": p, "d_nodes": d, "gpus_per_node": 8,
        "agents": 64, "dataset": "64k", "seed": 0, "rate_aps": rate, "jct_s": jct, "turns": 640,
        "wall_s": 0.5, "events": 1000,
        "latency_s": {"ttft": {"mean": ttft, "p50": ttft * 0.8, "p90": ttft, "p99": ttft * 2},
                      "ttst": {"mean": 0.5, "p50": 0.4, "p90": 0.6, "p99": 0.9},
                      "tpot": {"mean": tpot, "p50": tpot * 0.9, "p90": tpot, "p99": tpot * 1.5}},
        "timeline": {"bin_s": 1.0, "t_s": [float(i) for i in range(bins)],
                     "snic_util": [[(i + j) % 5 / 5 for j in range(n)] for i in range(bins)],
                     "pe_gpu_util": [0.5] * bins, "de_gpu_util": [0.7] * bins},
        "snic_read_bytes": [1e9] * n, "snic_balance": 1.5 if policy == "basic" else 1.05,
        "pe_gpu_busy": 0.4, "de_gpu_busy": 0.8,
        "bounds": {"pd_ratio": p / d, "pd_min": 0.25, "pd_max": 1.0, "within": 0.25 <= p / d <= 1.0,
                   "io_bound_jct_s": 80.0, "compute_bound_jct_s": 60.0, "bound_jct_s": 80.0},
    }


OFFLINE = {"basic": 200.0, "layerwise": 160.0, "dualpath-nosched": 120.0, "dualpath": 100.0, "oracle": 90.0}


def full_report():
    online_pts = [result(pol, None, mode="online", rate=r, ttft=t, tpot=0.02 + 0.01 * r)
                  for pol, ts in (("basic", (1.0, 5.0)), ("dualpath", (0.8, 2.0))) for r, t in zip((1.0, 2.0), ts)]
    return {
        "offline": [result(p, j) for p, j in OFFLINE.items()],
        "ablation": [result(p, OFFLINE[p]) for p in ("dualpath", "basic", "dualpath-nosched", "layerwise")],
        "pd_sweep": [result("basic", 300.0, 1, 4), result("dualpath", 150.0, 1, 4),
                     result("basic", 200.0, 2, 4), result("dualpath", 100.0, 2, 4)],
        "online": {"points": online_pts, "max_rate": {"basic": 1.0, "dualpath": 2.5},
                   "slo": {"ttft_s": 4.0, "tpot_s": 0.05}},
        "scale": [result("dualpath", 110.0, 4, 8), result("dualpath", 100.0, 2, 4)],
        "validation": [{"check": "offline speedup", "paper": 1.87, "sim": 2.0, "ratio": 2.0 / 1.87,
                        "target": "within 20%", "ok": True}],
        "calibration": {"snic_gbps": {"value": 50.0, "unit": "GB/s", "source": "paper sec 5"}},
    }


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def cols(table):
    headers, rows = table
    return [dict(zip(headers, r)) for r in rows]


def test_offline_speedups():
    rows = {r["policy"]: r for r in cols(rep.offline_table(full_report()["offline"]))}
    assert list(rows) == ["basic", "layerwise", "dualpath-nosched", "dualpath", "oracle"]
    assert rows["dualpath"]["speedup vs basic"] == pytest.approx(2.0)
    assert rows["layerwise"]["speedup vs basic"] == pytest.approx(1.25)
    assert rows["dualpath"]["speedup vs oracle"] == pytest.approx(0.9)
    assert rows["basic"]["SNIC max/avg"] == 1.5
    # no oracle run: no oracle column; a missing JCT gives blanks, not a crash
    h, r = rep.offline_table([result("basic", 200.0), result("dualpath", None)])
    assert "speedup vs oracle" not in h and r[1][1:3] == [None, None]
    assert "2.00" in rep.format_table(*rep.offline_table(full_report()["offline"]))


def test_ablation_reductions_in_order():
    rows = cols(rep.ablation_table(full_report()["ablation"]))
    assert [r["policy"] for r in rows] == ["basic", "layerwise", "dualpath-nosched", "dualpath"]
    assert [r["reduction vs basic (%)"] for r in rows] == pytest.approx([0.0, 20.0, 40.0, 50.0])
    assert rows[0]["vs previous (%)"] is None
    assert rows[3]["vs previous (%)"] == pytest.approx(100 * (1 - 100 / 120))


def test_pd_sweep_online_scale_bounds():
    h, rows = rep.pd_sweep_table(full_report()["pd_sweep"])
    assert h == ["config", "P/D", "basic JCT (s)", "dualpath JCT (s)", "dualpath speedup"]
    assert rows == [["1P4D", 0.25, 300.0, 150.0, 2.0], ["2P4D", 0.5, 200.0, 100.0, 2.0]]

    on = full_report()["online"]
    rows = cols(rep.online_table(on))
    assert [(r["policy"], r["rate (agents/s)"]) for r in rows] == [("basic", 1.0), ("basic", 2.0),
                                                                 ("dualpath", 1.0), ("dualpath", 2.0)]
    assert [r["meets SLO"] for r in rows] == [True, False, True, True]  # basic at 2/s: TTFT p90 5 s > 4 s
    assert rows[3]["TPOT p90 (s)"] == pytest.approx(0.04) and rows[3]["TTFT p90 (s)"] == 2.0
    mr = cols(rep.max_rate_table(on))
    assert mr[1] == {"policy": "dualpath", "max rate (agents/s)": 2.5, "vs basic": 2.5}

    rows = cols(rep.scale_table(full_report()["scale"]))
    assert [r["GPUs"] for r in rows] == [48, 96]
    assert rows[1]["JCT / smallest"] == pytest.approx(1.1) and rows[0]["agents/s"] == pytest.approx(0.64)

    rows = cols(rep.bounds_table([result("dualpath", 100.0, 1, 8)]))
    assert rows[0]["sim/bound"] == pytest.approx(1.25) and rows[0]["within"] is False
    assert rows[0]["P/D range"] == "[0.250, 1.00]" and rows[0]["run"] == "dualpath @ 1P8D"


def test_online_slo_judgement():
    on = full_report()["online"]
    on["slo"]["tpot_s"] = 0.035  # TPOT p90 at 2/s is 0.04 s: now over for both policies
    assert [r["meets SLO"] for r in cols(rep.online_table(on))] == [True, False, True, False]
    on["slo"] = {"ttft_s": 4.0, "tpot_s": 0.05, "percentile": "p99"}  # p99: TTFT 2x, TPOT 1.5x the p90
    rows = cols(rep.online_table(on))
    assert "TTFT p99 (s)" in rows[0] and [r["meets SLO"] for r in rows] == [True, False, True, False]
    on["slo"] = {}
    assert all(r["meets SLO"] is None for r in cols(rep.online_table(on)))


def test_format_table_alignment():
    text = rep.format_table(["name", "x"], [["a", 1.5], ["bbbb", 10.25], ["c", None], ["d", float("nan")]])
    lines = text.splitlines()
    assert lines[0] == "name      x" and set(lines[1]) <= {"-", " "}
    assert lines[2] == "a      1.50" and lines[3] == "bbbb  10.25" and lines[4].endswith("  -")
    assert len({len(line) for line in lines}) == 1  # all rows the same width: right-aligned last column
    assert rep.format_table(["a", "b"], [[1, "x"]], align="lr").splitlines()[2] == "1  x"
    assert rep.format_table(["n"], [[True], [np.float32(0.5)], [np.int64(7)]]).split()[2:] == ["yes", "0.500", "7"]


def test_markdown_well_formed():
    md = rep.render_markdown(full_report())
    tables = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert tables
    # every table: same number of cells on each line, separator line after the header
    blocks, cur = [], []
    for ln in md.splitlines() + [""]:
        if ln.startswith("|"):
            cur.append(ln)
        elif cur:
            blocks.append(cur)
            cur = []
    for b in blocks:
        n = b[0].count("|")
        assert all(ln.count("|") - ln.count("\\|") == n for ln in b)
        assert set(b[1]) <= set("|-: ") and len(b) >= 3
    for title in ("Calibration", "Offline JCT", "Bounds (section 7)", "Ablation", "P/D ratio sweep",
                  "Online serving", "Scaling", "Validation against the paper"):
        assert f"## {title}" in md
    assert rep.to_markdown(["a|b"], [["x|y"]]).splitlines()[2] == "| x\\|y |"
    assert rep.to_markdown(["p", "v"], [["a", 1.0]]).splitlines()[1] == "|---|---:|"


def test_missing_sections_skipped():
    text = rep.render_text({"ablation": full_report()["ablation"]})
    assert "Ablation" in text and "Offline" not in text and "Online" not in text and "Bounds" not in text
    assert rep.render_text({}).strip().splitlines() == ["DualPath simulation report", "=" * 26]
    assert "Online" not in rep.render_markdown({"online": {"points": [], "max_rate": {}}, "offline": []})
    # bounds shown even without an offline section when swept results carry them
    assert "Bounds (section 7)" in rep.render_text({"pd_sweep": full_report()["pd_sweep"]})
    assert "Bounds (section 7)" in rep.render_text({"offline": [], "scale": full_report()["scale"]})


@pytest.mark.parametrize("section,key", [("offline", "jct_s"), ("ablation", "policy"), ("pd_sweep", "d_nodes"),
                                         ("scale", "agents"), ("offline", "turns")])
def test_missing_key_raises(section, key):
    r = full_report()
    r[section] = copy.deepcopy(r[section])
    del r[section][0][key]
    with pytest.raises(ValueError, match=repr(key)):
        rep.render_text(r)


def test_missing_nested_and_other_keys():
    r = full_report()
    del r["online"]["points"][0]["latency_s"]["tpot"]["p90"]
    with pytest.raises(ValueError, match="latency_s.tpot.p90"):
        rep.render_markdown(r)
    with pytest.raises(ValueError, match="bounds.pd_ratio"):
        rep.bounds_table([{k: v for k, v in result("basic", 1.0).items() if k != "bounds"}])
    # results without bounds are left out of the bounds section rather than failing the report
    r = full_report()
    for x in r["offline"] + r["pd_sweep"] + r["scale"]:
        del x["bounds"]
    assert "Bounds" not in rep.render_text(r)
    with pytest.raises(ValueError, match="'ok'"):
        rep.validation_table([{"check": "x", "paper": 1, "sim": 1, "ratio": 1, "target": "t"}])
    with pytest.raises(ValueError, match="'source'"):
        rep.calibration_table({"x": {"value": 1, "unit": "s"}})


def test_json_round_trip(tmp_path):
    r = full_report()
    r["offline"][0]["extra"] = {"nan": float("nan"), "inf": float("inf"), "np": np.float64(2.5),
                                "arr": np.arange(3), "i": np.int64(4), "t": (1, 2)}
    paths = rep.write_report(r, tmp_path / "out", plots=False)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["report.md", "report.json"]
    back = json.loads(read(tmp_path / "out" / "report.json"))
    assert back["offline"][0]["extra"] == {"nan": None, "inf": None, "np": 2.5, "arr": [0, 1, 2], "i": 4, "t": [1, 2]}
    del r["offline"][0]["extra"], back["offline"][0]["extra"]
    assert back == json.loads(json.dumps(r))
    assert back["online"]["max_rate"]["dualpath"] == 2.5 and back["offline"][3]["jct_s"] == 100.0
    md = read(tmp_path / "out" / "report.md")
    assert md.startswith("# DualPath") and "![" not in md


def test_write_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    paths = rep.write_report(full_report(), tmp_path)
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    for n in ("jct.png", "snic_balance.png", "ablation.png", "pd_sweep.png", "online.png", "util_3_dualpath.png"):
        assert n in names
    assert sum(n.startswith("util_") for n in names) == 5
    for p in paths:
        if p.endswith(".png"):
            assert read(p, "rb")[:8] == PNG
    md = read(tmp_path / "report.md")
    assert "![jct](jct.png)" in md

    only = rep.write_report({"validation": full_report()["validation"]}, tmp_path / "v")
    assert [p.rsplit("/", 1)[1] for p in only] == ["report.md", "report.json"]


def test_each_plot(tmp_path):
    pytest.importorskip("matplotlib")
    r = full_report()
    big = result("dualpath", 100.0, 8, 16, bins=3)  # many nodes: legend only per kind
    empty = result("basic", 1.0, bins=0)
    for path in (rep.plot_jct(r["offline"], tmp_path / "a.png"), rep.plot_util(big, tmp_path / "b.png"),
                 rep.plot_util(empty, tmp_path / "c.png"), rep.plot_snic_balance(r["offline"], tmp_path / "d.png"),
                 rep.plot_pd_sweep(r["pd_sweep"], tmp_path / "e.png"), rep.plot_online(r["online"], tmp_path / "f.png"),
                 rep.plot_ablation(r["ablation"], tmp_path / "sub" / "g.png")):
        assert read(path, "rb")[:8] == PNG


def test_import_without_matplotlib(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import dpmove.sim.report as r\n"
        "assert 'matplotlib' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    r.plot_jct([{'policy': 'basic', 'jct_s': 1.0}], 'x.png')\nexcept RuntimeError as e:\n"
        "    assert \"pip install 'dpmove[sim]'\" in str(e); print('ok')\n"
        "try:\n    r.write_report({'offline': []}, 'o', plots=True)\nexcept RuntimeError:\n    print('ok2')\n"
        "print(len(r.write_report({'ablation': [{'policy': 'basic', 'jct_s': 1.0}]}, 'o')))\n"
        "assert 'Plots skipped' in open('o/report.md').read()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "ok2", "2"]


def test_nan_cells():
    h, rows = rep.offline_table([result("basic", float("nan")), result("dualpath", 100.0)])
    assert rows[0][1] is None and rows[1][2] is None
    assert not any(isinstance(v, float) and math.isnan(v) for row in rows for v in row)
