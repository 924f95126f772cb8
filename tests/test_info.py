"""`dpmove info` / `python -m dpmove info`: what is built, what works here, and O_DIRECT facts
for a path, checked against what an Engine and a File actually do on this host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dpmove
from conftest import uring_status


def dpmove_script() -> str:
    exe = Path(sys.executable).with_name("dpmove")
    found = str(exe) if exe.exists() else shutil.which("dpmove")
    assert found, "the `dpmove` console script is not installed next to this Python"
    return found


def run_cli(args, backend=None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DPMOVE_BACKEND"}
    if backend is not None:
        env["DPMOVE_BACKEND"] = backend
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    return p


def info_json(backend=None, path=None) -> dict:
    args = [sys.executable, "-m", "dpmove", "info", "--json"]
    if path is not None:
        args += ["--path", str(path)]
    return json.loads(run_cli(args, backend).stdout)


def test_info_module_json(backend: str, direct_dir: Path) -> None:
    d = info_json(backend, direct_dir)
    assert d["version"] == dpmove.__version__
    assert d["kernel"] == os.uname().release
    usable, _ = uring_status()
    assert d["backends"]["io_uring"]["compiled"] == "yes"
    assert d["backends"]["io_uring"]["usable"] == ("yes" if usable else "no")
    assert d["backends"]["threadpool"]["usable"] == "yes"
    active = d["active"]
    assert active["backend"] == backend
    assert active["reason"] == f"{backend} requested"
    with dpmove.Engine(backend) as eng:
        assert active["backend"] == eng.backend
        for k, v in eng.describe().items():
            assert active[k] == v, k
        f = eng.open(direct_dir / "probe.bin", "w+", direct=True)
        dio = d["direct_io"]
        assert dio["path"] == str(direct_dir) and dio["direct"] == "yes"
        assert int(dio["mem_align"]) == f.mem_align and int(dio["offset_align"]) == f.offset_align
        assert dio["fs"] != ""
    assert d["memlock"]["root"] == (os.geteuid() == 0)


def test_info_auto_picks_io_uring_where_usable(direct_dir: Path) -> None:
    d = info_json(None, direct_dir)
    usable, why = uring_status()
    assert d["active"]["backend"] == ("io_uring" if usable else "threadpool")
    assert d["active"]["backend"] == dpmove.Engine().backend
    if usable:
        assert d["active"]["reason"] == "io_uring usable here (auto)"
        assert d["backends"]["io_uring"]["reason"] == "ok"
    else:
        assert why and why in d["active"]["reason"]


def test_info_console_script_text(backend: str, direct_dir: Path) -> None:
    out = run_cli([dpmove_script(), "info", "--path", str(direct_dir)], backend).stdout
    lines = {ln.split()[0]: ln.split(None, 1)[1] if len(ln.split()) > 1 else "" for ln in out.splitlines() if ln.strip()}
    assert lines["version"] == dpmove.__version__
    assert lines["backend"] == backend  # the active backend
    with dpmove.Engine(backend) as eng:
        f = eng.open(direct_dir / "probe.bin", "w+", direct=True)
        assert lines["mem_align"] == str(f.mem_align)
        assert lines["offset_align"] == str(f.offset_align)
    assert lines["direct"] == "yes"
    assert "io_uring:" in out and "threadpool:" in out and "direct_io:" in out


def test_info_path_without_direct_io() -> None:
    d = dpmove.info("/proc/self/cmdline")["direct_io"]
    assert d["direct"] == "no" and "EINVAL" in d["reason"]
    assert "mem_align" not in d


def test_info_missing_path(tmp_path: Path) -> None:
    d = info_json(None, tmp_path / "nope")["direct_io"]
    assert d["direct"] == "no" and "ENOENT" in d["reason"]


def test_info_function_without_path() -> None:
    d = dpmove.info()
    assert "direct_io" not in d
    assert set(d["backends"]) == {"io_uring", "threadpool"}
    assert d["active"]["backend"] in ("io_uring", "threadpool")
    assert d["python"] and d["memlock"]["soft"]
