#!/usr/bin/env python3
"""One-command check of dpmove on a machine with an NVIDIA GPU (``bash bench/gpu_check.sh``).

Steps, each a subprocess with its own time limit inside one overall budget (default 470 s):
  1 build   a fresh venv (--system-site-packages) in a temporary directory, dpmove built from
            this checkout and installed into it offline (pip --no-build-isolation --no-deps
            --no-index), with the nvcc-built batched kernel (DPMOVE_WITH_CUDA_KERNEL=ON) when
            nvcc is on PATH or in /usr/local/cuda/bin, else AUTO
  2 info    nvidia-smi -L, python -m dpmove info, the Engine's gpu_info()
  3 tests   python -m pytest -q -m gpu over the test files that use the gpu marker (DPMOVE_GPU=cuda)
  4 bench   python -m dpmove bench copy --gpu cuda --json OUT/copy.json
Steps 3 and 4 run whatever happened to the other one; without a build neither can. Exit status
0 when every step passed, else 1. Logs and copy.json go to $OUT (default ./gpu_check_out); the
summary is printed, then the bench's table last.

``--emulated``: no build; steps 2-4 with this interpreter against the emulated GPU
(DPMOVE_GPU=emulated, bench --gpu emulated), nvidia-smi optional, and pytest's exit status 5
(no gpu-marked test collected) counts as passed. A smoke test of this script, not of a GPU.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
# Seconds: the most each step may take, and what is kept back for the bench while earlier steps run.
LIMITS = {"venv": 60, "build": 330, "nvidia-smi": 20, "info": 60, "gpu_info": 60, "tests": 150, "bench": 180}
BENCH_RESERVE = 120


class Runner:
    def __init__(self, out: Path, budget: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget
        self.results: List[Dict[str, object]] = []

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: List[str], env: Dict[str, str], limit: float, ok_codes=(0,),
            log_name: Optional[str] = None, echo: bool = True) -> Dict[str, object]:
        """Runs `cmd` (cwd: the checkout) for at most `limit` seconds, output to OUT/<name>.log and,
        with `echo`, to stdout as it comes. Returns the step's record (also kept for the summary)."""
        log = self.out / (log_name or f"{name}.log")
        limit = max(1.0, min(limit, self.remaining()))
        print(f"\n=== {name}: {' '.join(cmd)}  (limit {limit:.0f} s, log {log})", flush=True)
        t0 = time.monotonic()
        rec: Dict[str, object] = {"step": name, "cmd": cmd, "log": str(log)}
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                f.write(f"cannot start: {exc}\n")
                rec.update(rc=None, ok=False, seconds=0.0, note=f"cannot start: {exc}")
                print(f"--- {name}: cannot start: {exc}", flush=True)
                self.results.append(rec)
                return rec
            timed_out = False
            assert p.stdout is not None
            fd = p.stdout.fileno()
            dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            end = t0 + limit
            while True:  # raw reads: a partial line without its newline cannot block past the limit
                left = end - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                if not sel.select(timeout=min(left, 1.0)):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                text = dec.decode(chunk)
                f.write(text)
                if echo:
                    sys.stdout.write(text)
                    sys.stdout.flush()
            sel.close()
            if timed_out:
                os.killpg(p.pid, signal.SIGTERM)  # the step's own process group (start_new_session)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                f.write(f"\n*** timed out after {limit:.0f} s\n")
            else:
                p.wait()
            p.stdout.close()
        secs = time.monotonic() - t0
        ok = not timed_out and p.returncode in ok_codes
        note = f"timed out after {limit:.0f} s" if timed_out else f"exit {p.returncode}"
        rec.update(rc=None if timed_out else p.returncode, ok=ok, seconds=secs, note=note)
        print(f"--- {name}: {'ok' if ok else 'FAILED'} ({note}, {secs:.1f} s)", flush=True)
        self.results.append(rec)
        return rec

    def skip(self, name: str, why: str, ok: bool = False) -> None:
        print(f"\n=== {name}: skipped: {why}", flush=True)
        self.results.append({"step": name, "ok": ok, "rc": None, "seconds": 0.0, "note": f"skipped: {why}", "log": "-"})


def find_nvcc() -> Optional[str]:
    for c in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if c and os.access(c, os.X_OK):
            return c
    return None


def gpu_test_files() -> List[str]:
    """Test files that use the gpu marker: only they are collected, so unrelated test modules
    (and their optional imports) cannot break the GPU run; tests/ when none is found."""
    pat = re.compile(r"mark\.gpu\b")
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if pat.search(p.read_text(errors="replace")))
    return files or ["tests/"]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emulated", action="store_true", help="no build; steps 2-4 with this interpreter on the emulated GPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_check_out"),
                    help="directory for logs and copy.json (default $OUT, else ./gpu_check_out)")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for all steps together (default 470)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter that makes the venv, or (--emulated) whose dpmove runs (default: this one)")
    ap.add_argument("--keep-venv", action="store_true", help="keep the temporary venv and build directory")
    ap.add_argument("--bench-args", default="", help="extra arguments for dpmove bench copy")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if out == (REPO / "gpu_check_out").resolve() and not (out / ".gitignore").exists():
        (out / ".gitignore").write_text("*\n")  # logs, not sources: keep them out of git status
    r = Runner(out, args.budget)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["DPMOVE_GPU"] = "emulated" if args.emulated else "cuda"
    print(f"dpmove gpu_check: checkout {REPO}, out {out}, mode {'emulated' if args.emulated else 'cuda'}, "
          f"budget {args.budget:.0f} s", flush=True)

    tmp: Optional[str] = None
    py = args.python  # --emulated: the interpreter whose dpmove is checked
    built = True
    try:
        # 1 build
        if args.emulated:
            r.skip("build", "--emulated: the current interpreter's dpmove", ok=True)
        else:
            tmp = tempfile.mkdtemp(prefix="dpmove-gpu-check-")
            venv = Path(tmp) / "venv"
            rec = r.run("venv", [args.python, "-m", "venv", "--system-site-packages", str(venv)], env, LIMITS["venv"])
            if not rec["ok"]:  # no ensurepip (Debian without python3-venv): the system pip serves the venv
                shutil.rmtree(venv, ignore_errors=True)
                r.results.remove(rec)
                rec = r.run("venv", [args.python, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                            env, LIMITS["venv"], log_name="venv-without-pip.log")
            py = str(venv / "bin" / "python")
            nvcc = find_nvcc()
            benv = dict(env)
            benv["CMAKE_BUILD_PARALLEL_LEVEL"] = str(os.cpu_count() or 4)
            kernel = "ON" if nvcc else "AUTO"
            if nvcc:
                benv["PATH"] = os.path.dirname(nvcc) + os.pathsep + benv.get("PATH", "")
                benv.setdefault("CUDACXX", nvcc)
            benv["DPMOVE_WITH_CUDA_KERNEL"] = kernel
            print(f"nvcc: {nvcc or 'not found (the batched kernel comes from NVRTC at run time)'}", flush=True)
            if rec["ok"]:
                rec = r.run("build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                                      "-C", f"build-dir={Path(tmp) / 'build'}",
                                      "-C", f"cmake.define.DPMOVE_WITH_CUDA_KERNEL={kernel}", str(REPO)],
                            benv, min(LIMITS["build"], r.remaining() - BENCH_RESERVE - 60))
            built = bool(rec["ok"])
            if rec["step"] == "venv" and not built:
                r.skip("build", "no venv")

        # 2 info
        if shutil.which("nvidia-smi"):
            r.run("nvidia-smi", ["nvidia-smi", "-L"], env, LIMITS["nvidia-smi"])
        elif args.emulated:
            r.skip("nvidia-smi", "not installed (--emulated: not needed)", ok=True)
        else:
            r.skip("nvidia-smi", "not on PATH")
        if built:
            r.run("info", [py, "-m", "dpmove", "info"], env, LIMITS["info"])
            r.run("gpu_info", [py, "-c", "import dpmove, json; e = dpmove.Engine(); "
                               "print('dpmove', dpmove.__version__, 'from', dpmove.__file__); "
                               "print(json.dumps(e.gpu_info(), indent=2)); "
                               "print({b: e.copy_backend_status(b) or 'usable' for b in ('cuda', 'batched', 'cnic')})"],
                  env, LIMITS["gpu_info"])

            # 3 tests
            files = gpu_test_files()
            extra: List[str] = []
            probe = subprocess.run([py, "-c", "import pytest_timeout"], cwd=REPO, env=env, capture_output=True)
            if probe.returncode != 0:
                # pyproject sets `timeout` under --strict-config and tests use @pytest.mark.timeout
                # under --strict-markers: without pytest-timeout both are errors, so its addopts
                # are replaced and the two warnings ignored (the tests then run without timeouts).
                print("note: pytest-timeout is not installed: running pytest without timeouts", flush=True)
                extra = ["-o", "addopts=", "-ra", "-W", "ignore::pytest.PytestConfigWarning",
                         "-W", "ignore::pytest.PytestUnknownMarkWarning"]
            markers = subprocess.run([py, "-m", "pytest", *extra, "--markers"], cwd=REPO, env=env, capture_output=True,
                                     text=True, timeout=60)
            if "@pytest.mark.gpu:" not in markers.stdout and args.emulated:
                # --strict-markers refuses `-m gpu` until the marker is registered: no gpu tests yet
                r.skip("tests", "the gpu marker is not registered in pyproject.toml (no gpu tests yet)", ok=True)
            else:
                r.run("tests", [py, "-m", "pytest", *extra, "-q", "-m", "gpu", *files], env,
                      min(LIMITS["tests"], r.remaining() - BENCH_RESERVE), ok_codes=(0, 5) if args.emulated else (0,))

            # 4 bench
            gpu = "emulated" if args.emulated else "cuda"
            r.run("bench", [py, "-m", "dpmove", "bench", "copy", "--gpu", gpu, "--json", str(out / "copy.json"),
                            *args.bench_args.split()], env, LIMITS["bench"])
        else:
            for s in ("info", "tests", "bench"):
                r.skip(s, "dpmove was not built")
    finally:
        if tmp and not args.keep_venv:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp:
            print(f"venv kept: {tmp}", flush=True)

    print("\n=== summary", flush=True)
    for rec in r.results:
        print(f"{rec['step']:<11} {'ok' if rec['ok'] else 'FAILED':<7} {rec['seconds']:7.1f} s  {rec['note']:<28} {rec['log']}")
    failed = [str(rec["step"]) for rec in r.results if not rec["ok"]]
    print(f"result: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}; logs in {out}")
    bench = [rec for rec in r.results if rec["step"] == "bench" and rec["log"] != "-"]
    if bench:
        text = Path(str(bench[0]["log"])).read_text(errors="replace").rstrip("\n").splitlines()
        # The bench ends with a blank line, then its header lines and the table; a bench that
        # stopped early has none: its last lines instead.
        blanks = [i for i, line in enumerate(text) if not line.strip()]
        tail = text[blanks[-1] + 1:] if blanks and bench[0]["rc"] == 0 else text[-25:]
        print("\n=== dpmove bench copy" + ("" if bench[0]["rc"] == 0 else f" ({bench[0]['note']}; last lines of its log)"))
        print("\n".join(tail), flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
