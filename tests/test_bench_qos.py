"""`dpmove bench qos` on tiny settings: every phase of both paths runs, the JSON holds together
(goodput = bytes / seconds, leakage in [0, 1], Jain in (0, 1], utilization and kv_share from
the goodputs, QoS counters agree with the bench's own), data is verified, and the storage file
is created, reused or refused as documented. No performance figure is asserted."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from dpmove.bench import qos
from dpmove.cli import main as cli_main

TINY = {"duration": 0.15, "repeats": 2, "ctl_rate": 400.0, "kv_size": 1 << 20, "kv_depth": 2, "file_size": 16 << 20}
CLI_TINY = ["--duration", "0.1", "--repeats", "1", "--kv-size", "1m", "--kv-depth", "2", "--file-size", "8m"]


def check_class(path: str, cls: str, m: dict, opts: qos.Options) -> None:
    assert m["ops"] > 0 and m["seconds"] > 0
    assert m["goodput_bps"] == pytest.approx(m["bytes"] / m["seconds"], rel=1e-12)
    assert 0 < m["p50_us"] <= m["p99_us"]
    if cls == qos.CTL:
        assert m["seconds"] >= opts.duration
        assert m["ops"] * min(opts.ctl_sizes) <= m["bytes"] <= m["ops"] * max(opts.ctl_sizes)
        assert 0 <= m["slo_attainment"] <= 1
    else:
        assert m["bytes"] == m["ops"] * opts.kv_size
        assert "slo_attainment" not in m
    # storage checks every read; shm compares the last writes of each class after the phase
    assert m["verified"] == (m["ops"] if path == "storage" else min(m["ops"], qos.SHM_CHECKS))


def check_repeat(path: str, rep: dict, opts: qos.Options) -> None:
    assert sorted(rep["order"]) == sorted(qos.PHASES) and set(rep["phases"]) == set(qos.PHASES)
    ph = rep["phases"]
    for name, p in ph.items():
        assert p["qos"] is (not name.endswith("_fifo"))
        assert tuple(p["classes"]) == qos.PHASE_CLASSES[name]
        for cls, m in p["classes"].items():
            check_class(path, cls, m, opts)
            # the engine's per-class counters saw exactly the bench's transfers
            assert p["qos_stats"][cls]["ops"] == m["ops"] and p["qos_stats"][cls]["bytes"] == m["bytes"]
        for cls in set(qos.PHASE_CLASSES["mixed_qos"]) - set(p["classes"]):
            assert p["qos_stats"][cls]["ops"] == 0
    iso = ph["ctl_isolated"]["classes"][qos.CTL]
    assert rep["slo_us"] == pytest.approx(qos.AUTO_SLO_FACTOR * iso["p99_us"])
    assert iso["slo_attainment"] >= 0.95  # the SLO is 1.25 x this phase's own p99
    cap = ph["kv_isolated_fifo"]["classes"][qos.KV]["goodput_bps"]
    assert set(rep["mixed"]) == set(qos.MIXED)
    for name, mx in rep["mixed"].items():
        ctl, kv = ph[name]["classes"][qos.CTL], ph[name]["classes"][qos.KV]
        assert mx["ctl_p99_ratio"] == pytest.approx(ctl["p99_us"] / iso["p99_us"])
        assert 0 <= mx["ctl_leakage"] <= 1 and 0 <= mx["kv_leakage"] <= 1
        assert mx["ctl_leakage"] == pytest.approx(max(0.0, 1 - ctl["goodput_bps"] / iso["goodput_bps"]))
        assert mx["kv_leakage"] == pytest.approx(max(0.0, 1 - kv["goodput_bps"] / cap))
        assert 0 < mx["jain"] <= 1
        assert mx["utilization"] == pytest.approx((ctl["goodput_bps"] + kv["goodput_bps"]) / cap)
        assert mx["kv_share"] == pytest.approx(kv["goodput_bps"] / (cap - ctl["goodput_bps"]))


@pytest.mark.timeout(120)
def test_bench_qos_both_paths(tmp_path: Path) -> None:
    opts = qos.Options(dir=str(tmp_path), **TINY)
    threads, interval = threading.active_count(), sys.getswitchinterval()
    out = io.StringIO()
    res = qos.run(opts, out)
    assert threading.active_count() == threads, "the bench joins its threads"
    assert sys.getswitchinterval() == interval, "the switch interval is restored"
    assert not list(tmp_path.iterdir()), "the default file is removed"
    json.dumps(res, allow_nan=False)  # plain, finite JSON

    cfg = res["config"]
    assert cfg["duration"] == opts.duration and cfg["slo_us"] == "auto"
    assert isinstance(cfg["host"]["o_direct"], bool) and "control" in cfg["qos"]["classes"]
    assert set(res["paths"]) == set(qos.PATHS)
    for path, r in res["paths"].items():
        assert [rep["repeat"] for rep in r["repeats"]] == [0, 1]
        assert r["repeats"][0]["order"] != r["repeats"][1]["order"], "the phase order rotates"
        for rep in r["repeats"]:
            check_repeat(path, rep, opts)
        med = r["median"]
        assert med["slo_us"] == pytest.approx(np.median([rep["slo_us"] for rep in r["repeats"]]))
        assert set(med["phases"]) == set(qos.PHASES) and set(med["mixed"]) == set(qos.MIXED)
        for name in qos.MIXED:
            assert set(r["targets"][name]) == set(qos.TARGETS)
            assert all(isinstance(t["met"], bool) for t in r["targets"][name].values())
    # per path: a header, a row per phase and class, a row per mixed phase, the targets line
    text = out.getvalue()
    for path in qos.PATHS:
        block = [ln.split() for ln in text[text.index(f"# {path}:"):text.index(f"{path} targets:")].splitlines()]
        assert [ln[:2] for ln in block if len(ln) > 1 and ln[1] in (qos.CTL, qos.KV)] == \
            [[p, c] for p in qos.PHASES for c in qos.PHASE_CLASSES[p]]
        assert [ln[0] for ln in block if len(ln) == 4 and ln[0] in qos.MIXED] == list(qos.MIXED)


@pytest.mark.timeout(120)
def test_bench_qos_cli_file_reuse_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "qos.dat"
    out = tmp_path / "qos.json"
    args = ["bench", "qos", "--paths", "storage", "--file", str(data), *CLI_TINY, "--json", str(out)]
    assert cli_main(args) == 0
    assert data.stat().st_size == 8 << 20, "a missing --file is created and kept"
    first = data.stat().st_mtime_ns
    res = json.loads(out.read_text())
    assert list(res["paths"]) == ["storage"] and res["config"]["host"]["file"] == str(data)
    assert "storage targets:" in capsys.readouterr().out

    assert cli_main(args) == 0
    assert data.stat().st_mtime_ns == first, "an existing pattern file is reused, not rewritten"

    data.write_bytes(bytes(8 << 20))  # the right size, not the bench's content
    assert cli_main(args) == 2
    assert "not a 8388608-byte file written by this bench" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_bench_qos_bad_data_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A file whose probed words hold the pattern but whose reads do not fails verification."""
    size = 8 << 20
    data = tmp_path / "bad.dat"
    qos.write_pattern(str(data), size)
    with open(data, "r+b") as f:
        for lo, hi in ((8, size // 2), (size // 2 + 8, size - 8)):
            os.pwrite(f.fileno(), bytes(hi - lo), lo)
    assert qos.holds_pattern(str(data), size)
    with pytest.raises(qos.VerificationError, match="storage control: read of"):
        qos.run(qos.Options(paths=("storage",), file=str(data), **{**TINY, "file_size": size}), io.StringIO())
    args = ["bench", "qos", "--paths", "storage", "--file", str(data), *CLI_TINY]
    assert cli_main(args) == 1
    assert "data verification failed" in capsys.readouterr().err
