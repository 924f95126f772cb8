"""`dpmove bench ssd` end to end on a small file: every mode runs and reports sane numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpmove", "bench", "ssd", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(300)
def test_bench_ssd_compare_with_fio(tmp_path: Path) -> None:
    if shutil.which("fio") is None:
        pytest.fail("fio is not installed (Debian: apt-get install fio); .ci/run installs it")
    out = tmp_path / "r.json"
    p = bench("--dir", str(tmp_path), "--size", "16m", "--bs", "64k,1m", "--qd", "1,4", "--rw", "randread,read",
              "--runtime", "0.1", "--fio", "--json", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert lines[0].split()[:2] == ["case", "GB/s"] and "dpmove/fio" in lines[0]
    assert len(lines) == 1 + 8
    res = json.loads(out.read_text())
    assert res["meta"]["direct"] is True
    assert [c["case"] for c in res["cases"]][:2] == ["randread 64KiB qd1", "randread 64KiB qd4"]
    for c in res["cases"]:
        assert c["gbps"] > 0 and c["fio_gbps"] > 0 and c["iops"] > 0
        assert 0 < c["p50_us"] <= c["p99_us"]
        assert c["ratio"] == pytest.approx(c["runs"][0]["gbps"] / c["fio_runs"][0]["gbps"])
        assert c["runs"][0]["bytes"] == c["runs"][0]["ios"] * c["bs"]
    assert not (tmp_path / "dpmove-bench.dat").exists(), "the bench removes the file it created"


@pytest.mark.timeout(300)
def test_bench_ssd_kv_writes_and_submit_cost(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    p = bench("--dir", str(tmp_path), "--size", "32m", "--kv", "deepseek-v3.2", "--qd", "2", "--runtime", "0.1",
              "--json", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    (case,) = json.loads(out.read_text())["cases"]
    assert case["rw"] == "randread" and case["bs"] == 3_080_192  # 3,076,352 B Full Block padded to 4 KiB
    assert "Full Block = 3076352 B" in p.stdout

    p = bench("--dir", str(tmp_path), "--size", "8m", "--rw", "write,randwrite", "--bs", "128k", "--qd", "2",
              "--runtime", "0.1", "--buffered", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "write 128KiB qd2" in p.stdout and "randwrite 128KiB qd2" in p.stdout

    p = bench("--dir", str(tmp_path), "--size", "8m", "--submit-cost", "--json", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["submit_cost"]
    assert [r["entries"] for r in rows] == [1, 16, 256, 4096, 65536]
    assert all(r["us_per_entry"] > 0 for r in rows)


def test_bench_ssd_refuses_to_overwrite_a_users_file(tmp_path: Path) -> None:
    f = tmp_path / "precious.bin"
    f.write_bytes(b"x" * (1 << 20))
    p = bench("--file", str(f), "--size", "1m", "--rw", "write", "--bs", "4k", "--qd", "1", cwd=tmp_path)
    assert p.returncode != 0 and "--overwrite" in p.stderr
    assert f.read_bytes() == b"x" * (1 << 20)
    p = bench("--file", str(f), "--size", "1m", "--rw", "randread", "--bs", "64k", "--qd", "9", "--runtime", "0.05",
              "--buffered", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f.exists(), "a user's file is never removed"


def test_bench_ssd_bad_arguments(tmp_path: Path) -> None:
    p = bench("--rw", "sideways", cwd=tmp_path)
    assert p.returncode != 0 and "unknown --rw" in p.stderr
    p = bench("--bs", "12q", cwd=tmp_path)
    assert p.returncode == 2 and "not a size" in p.stderr and "Traceback" not in p.stderr
    p = bench("--kv", "gpt-9", "--dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2 and "unknown model" in p.stderr and "Traceback" not in p.stderr
    p = bench("--file", str(tmp_path / "missing.bin"), "--size", "1m", "--bs", "64k", "--qd", "1", "--runtime", "0.05",
              "--rw", "read", cwd=tmp_path)
    assert p.returncode == 0, "a missing --file is created and filled"
    p = bench("--dir", str(tmp_path / "no" / "such" / "dir"), "--size", "1m", cwd=tmp_path)
    assert p.returncode == 2 and "No such file or directory" in p.stderr and "Traceback" not in p.stderr
