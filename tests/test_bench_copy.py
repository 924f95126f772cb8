"""`dpmove bench copy` on the emulated GPU with tiny settings: the banner, the table, the JSON,
the data check catching a wrong copy, and clear refusals of bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dpmove
from dpmove.bench import copy as bench_copy
from dpmove.cli import main as cli_main

BANNER = "EMULATED GPU (no CUDA device): host memcpy timings, not GPU measurements"
TINY = ["--gpu", "emulated", "--sizes", "4k,64k", "--total", "256k", "--models", "tiny,qwen2.5-32b", "--blocks", "8",
        "--ceiling-size", "1m", "--iters", "2", "--seconds", "0.01"]


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpmove", "bench", "copy", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(180)
def test_bench_copy_emulated(tmp_path: Path) -> None:
    out = tmp_path / "copy.json"
    p = bench(*TINY, "--verify-all", "--json", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["emulated"] is True and res["meta"]["emulated"] is True
    assert res["gpu_info"]["provider"] == "emulated"
    assert res["meta"]["host"] and res["meta"]["cpus"] >= 1

    with dpmove.Engine(gpu="emulated") as eng:
        usable = [b for b in ("cuda", "batched", "cnic") if not eng.copy_backend_status(b)]
    skipped = {s["backend"]: s["reason"] for s in res["skipped"]}
    assert set(usable) | set(skipped) == {"cuda", "batched", "cnic"} and not set(usable) & set(skipped)
    assert all(skipped.values())
    assert "cuda" in usable and "batched" in usable

    for d in ("h2d", "d2h"):
        c = res["ceiling"][d]
        assert c["gbps"] > 0 and c["bytes"] == 1 << 20 and c["backend"] == "cuda" and c["iterations"] >= 2 * 2

    rows = res["rows"]
    # per direction x usable backend: 4 KiB and 64 KiB blocks, then one row per Layer Block size
    want = [(d, b, n) for d in ("h2d", "d2h") for b in usable
            for n in ("4KiB x64", "64KiB x4", "LB tiny 1024B x8", "LB qwen2.5-32b 262144B x8")]
    assert [(r["direction"], r["backend"], r["case"].split(" ", 2)[2]) for r in rows] == want
    for r in rows:
        assert r["gbps"] > 0 and r["pct_ceiling"] > 0
        assert r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"]
        assert r["py_submit_us"] > 0
        if r["backend"] in ("cuda", "batched"):  # the backends copy_stats() reports
            assert r["core_submit_us"] > 0
        assert r["iterations"] == 2 and r["verified_iterations"] == 3  # warm-up + --verify-all
        assert r["bytes"] == r["blocks"] * r["block_bytes"]
        assert r["copies_per_request"] == r["blocks"]
        if r["kind"] == "layer_block":
            assert r["host_stride"] % 4096 == 0 and r["host_stride"] >= r["block_bytes"]
        if r["backend"] == "batched":
            assert r["launches_per_request"] >= 1

    # the banner comes before the table, and the table is last
    lines = p.stdout.rstrip("\n").splitlines()
    banner = next(i for i, line in enumerate(lines) if BANNER in line)
    header = next(i for i, line in enumerate(lines) if line.startswith("case"))
    assert banner < header and "[EMULATED]" in lines[header]
    for col in ("GB/s", "% ceil", "py us/copy", "core us/copy", "p50 us", "p99 us"):
        assert col in lines[header]
    assert [line.split()[0:2] for line in lines[header + 1:]] == [r["case"].split()[0:2] for r in rows]
    assert "ceiling h2d:" in p.stdout and "ceiling d2h:" in p.stdout
    assert BANNER in p.stderr  # said at the start as well


@pytest.mark.timeout(120)
def test_bench_copy_json_stdout_and_one_backend() -> None:
    p = bench(*TINY, "--backends", "batched", "--dirs", "d2h", "--models", "none", "--json", "-")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)  # the JSON alone on stdout; the table went to stderr
    assert [r["case"] for r in res["rows"]] == ["d2h batched 4KiB x64", "d2h batched 64KiB x4"]
    assert list(res["ceiling"]) == ["d2h"]
    assert BANNER in p.stderr and "d2h batched 4KiB x64" in p.stderr


@pytest.mark.timeout(120)
def test_bench_copy_catches_wrong_data(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A batch whose host side points one block off must fail the run (exit 1), naming the row."""
    real = bench_copy.Layout.batch

    def off_by_one(self: bench_copy.Layout, direction: str) -> np.ndarray:
        b = real(self, direction).copy()
        if self.n > 1:
            col = 1 if direction == "h2d" else 0  # the host offset column
            b[:, col] = np.roll(b[:, col], 1)
        return b

    monkeypatch.setattr(bench_copy.Layout, "batch", off_by_one)
    rc = cli_main(["bench", "copy", *TINY, "--models", "none", "--backends", "cuda", "--dirs", "h2d"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "DATA MISMATCH: h2d cuda 4KiB x64 (warm-up)" in err and "destination bytes wrong" in err


@pytest.mark.parametrize("args, message", [
    (["--sizes", "0"], "size must be a positive whole number"),
    (["--sizes", "4q"], "not a size"),
    (["--backends", "nope"], "--backends 'nope': choose from cuda, batched, cnic"),
    (["--dirs", "up"], "--dirs 'up': choose from h2d, d2h"),
    (["--models", "gpt-9"], "unknown model 'gpt-9'"),
    (["--sizes", "", "--models", "none"], "nothing to measure"),
    (["--blocks", "0"], "--blocks must be in"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--seconds", "0"], "--seconds must be > 0"),
    (["--gpu", "tpu"], "invalid choice"),
])
def test_bench_copy_bad_arguments(args: list, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "copy", "--gpu", "emulated", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_copy_bad_option_subprocess() -> None:
    """The same refusal from the command line: non-zero exit, the reason on stderr, no traceback."""
    p = bench("--gpu", "emulated", "--backends", "nope")
    assert p.returncode == 2
    assert "choose from cuda, batched, cnic" in p.stderr and "Traceback" not in p.stderr


def test_bench_copy_bad_device() -> None:
    rc = cli_main(["bench", "copy", "--gpu", "emulated", "--device", "99", "--sizes", "4k", "--models", "none"])
    assert rc == 2
