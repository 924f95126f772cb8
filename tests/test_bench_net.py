"""`dpmove bench net` end to end on tiny settings: both roles, shm and tcp, JSON and table sanity,
and clear refusals of bad arguments. The Mooncake comparison runs only where `mooncake.engine`
imports (PyPI mooncake-transfer-engine-non-cuda, not a dependency); elsewhere the test checks
that asking for it is refused with an install hint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dpmove.bench.net import mooncake_missing
from dpmove.cli import main as cli_main

TINY = ["--bs", "4k,64k", "--batch", "1,16", "--duration", "0.05", "--region-size", "8m", "--span", "1m"]


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpmove", "bench", "net", *args], capture_output=True, text=True,
                          timeout=timeout)


def check_case(c: dict) -> None:
    assert c["gbps"] > 0 and c["entries"] > 0 and c["requests"] > 0 and c["seconds"] > 0
    assert c["bytes"] == c["entries"] * c["bs"]
    # entries/s and GB/s describe the same bytes
    assert c["entries_per_s"] == pytest.approx(c["gbps"] * 1e9 / c["bs"], rel=1e-6)
    for k in ("prepare", "post", "completion"):
        assert c[f"{k}_avg_us"] >= 0 and c[f"{k}_p99_us"] >= 0, k  # NaN fails too
    assert c["entries"] == c["requests"] * (c["batch"] if c["mode"] == "batched" else 1)


@pytest.mark.timeout(120)
def test_bench_net_local_shm_and_tcp(tmp_path: Path) -> None:
    out = tmp_path / "net.json"
    p = bench("--transport", "shm,tcp", *TINY, "--one-by-one", "4k", "--notify", "--json", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["meta"]["region_size"] == 8 << 20 and res["meta"]["role"] == "local"
    assert [m["bs"] for m in res["memcpy"]] == [4096, 65536]
    assert all(m["gbps"] > 0 for m in res["memcpy"])
    names = [c["case"] for c in res["cases"]]
    assert names == ["shm 4KiB x1", "shm 4KiB x16", "shm 4KiB x16 1-by-1", "shm 64KiB x1", "shm 64KiB x16",
                     "tcp 4KiB x1", "tcp 4KiB x16", "tcp 4KiB x16 1-by-1", "tcp 64KiB x1", "tcp 64KiB x16"]
    for c in res["cases"]:
        check_case(c)
        if c["transport"] == "shm":  # paired memcpy beside every shm case
            assert c["memcpy_gbps"] > 0 and len(c["ratios"]) == 1
            assert c["memcpy_ratio"] == pytest.approx(c["gbps"] / c["memcpy_gbps"])
        else:
            assert "memcpy_ratio" not in c
    gains = {g["case"]: g for g in res["batching_gain"]}
    assert set(gains) == {"shm 4KiB x16", "tcp 4KiB x16"} and all(g["gain"] > 0 for g in gains.values())
    # the table: memcpy rows, then one row per case, then the batching gains
    assert "memcpy 4KiB" in p.stdout and "memcpy 64KiB" in p.stdout
    header = next(line for line in p.stdout.splitlines() if line.startswith("case"))
    for col in ("GB/s", "entries/s", "prep avg", "post p99", "cmpl p99", "ratio"):
        assert col in header
    for name in names:
        assert any(line.startswith(name + " ") for line in p.stdout.splitlines()), name
    assert "notifications drained" in p.stderr  # the target's summary at exit


@pytest.mark.timeout(120)
def test_bench_net_two_roles(tmp_path: Path) -> None:
    """--role target writes its description; --role initiator runs against it over tcp."""
    desc = tmp_path / "target.json"
    tgt = subprocess.Popen([sys.executable, "-m", "dpmove", "bench", "net", "--role", "target", "--region-size", "4m",
                            "--metadata-out", str(desc)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = tgt.stdout.readline()
        assert line.startswith("dpmove-bench-net-target {"), line
        info = json.loads(desc.read_text())
        assert info["region_size"] == 4 << 20 and bytes.fromhex(info["metadata"]) and bytes.fromhex(info["handle"])
        # the initiator accepts the file, or the printed line
        (tmp_path / "line.txt").write_text("noise\n" + line)
        for src, out in ((desc, tmp_path / "i.json"), (tmp_path / "line.txt", "-")):
            p = bench("--role", "initiator", "--peer-metadata", str(src), "--transport", "tcp", "--bs", "64k",
                      "--batch", "1,1024", "--duration", "0.05", "--json", str(out))
            assert p.returncode == 0, p.stderr
            # --json -: the JSON alone on stdout, the tables on stderr
            res = json.loads(p.stdout if out == "-" else out.read_text())
            assert res["meta"]["region_size"] == 4 << 20
            # 64 KiB x 1024 does not fit in 4 MiB: clipped to 64 entries
            assert [(c["bs"], c["batch"]) for c in res["cases"]] == [(65536, 1), (65536, 64)]
            for c in res["cases"]:
                check_case(c)
    finally:
        tgt.send_signal(signal.SIGTERM)
        try:
            _, err = tgt.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            tgt.kill()
            raise
    assert tgt.returncode == 0, err
    assert "bytes received" in err


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "every batch must be in 1..1024"),
    (["--batch", "2048"], "every batch must be in 1..1024"),
    (["--batch", "x"], "--batch: not a list of integers"),
    (["--transport", "shm,udp"], "choose from shm, tcp, verbs"),
    (["--bs", "4q"], "not a size"),
    (["--bs", "2g"], "does not fit in --region-size"),
    (["--duration", "0"], "--duration must be > 0"),
    (["--streams", "17"], "--streams must be in 1..16"),
    (["--depth", "0"], "--depth must be in 1..64"),
    (["--role", "initiator"], "needs --peer-metadata"),
    (["--peer-metadata", "x.json"], "is for --role initiator"),
    (["--compare", "nccl"], "invalid choice"),
])
def test_bench_net_bad_arguments(args: list, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "net", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "dpmove bench net: error:" in err and message in err, err


def test_bench_net_bad_peer_metadata(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{\"metadata\": \"zz\"}")
    p = bench("--role", "initiator", "--peer-metadata", str(bad), "--transport", "tcp")
    assert p.returncode == 2 and "not a dpmove bench net target description" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.timeout(120)
def test_bench_net_compare_mooncake(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    why = mooncake_missing()
    if why:  # absent (the usual CI case): asking for it is refused, with the install hint
        with pytest.raises(SystemExit) as e:
            cli_main(["bench", "net", "--transport", "tcp", "--compare", "mooncake"])
        assert e.value.code == 2
        assert "mooncake-transfer-engine-non-cuda" in capsys.readouterr().err
        return
    out = tmp_path / "mc.json"
    p = bench("--transport", "tcp", "--bs", "64k", "--batch", "16", "--duration", "0.05", "--repeat", "2",
              "--region-size", "8m", "--span", "1m", "--compare", "mooncake", "--json", str(out))
    assert p.returncode == 0, p.stderr
    (c,) = json.loads(out.read_text())["cases"]
    check_case(c)
    assert c["mooncake_gbps"] > 0 and len(c["ratios"]) == 2 and c["mooncake_ratio"] > 0
    assert "mooncake" in p.stdout
