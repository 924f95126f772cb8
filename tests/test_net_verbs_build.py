"""The verbs transport is optional twice over: at build time (<infiniband/verbs.h>) and at run
time (libibverbs.so.1 is opened with dlopen, never linked). `import dpmove` must work, and
say why verbs is unusable, in every combination."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpmove import _core
from build_support import wheel_in_bare_venv

HAVE_VERBS = hasattr(_core, "_verbs_set_provider")

CHECK = textwrap.dedent(
    """
    import json, sys
    import dpmove
    ok, why = dpmove._core.verbs_usable()
    rx, tx = dpmove.Engine(), dpmove.Engine()
    try:
        tx.connect(rx.metadata(), transport="verbs")
        err = None
    except dpmove.UnsupportedOperation as e:
        err = str(e)
    # tcp still works in the same process.
    src, dst = tx.alloc(4096), rx.alloc(4096)
    p = tx.connect(rx.metadata(), transport="tcp")
    p.write(src, rx.expose(dst), [(0, 0, 4096)], timeout_s=10).result()
    print(json.dumps({"ok": ok, "why": why, "err": err, "hooks": hasattr(dpmove._core, "_verbs_set_provider"),
                      "file": dpmove._core.__file__}))
    tx.close(); rx.close()
    """
)


def run_check(python: str, env: dict, cwd: Path) -> dict:
    out = subprocess.run([python, "-c", CHECK], env=env, cwd=cwd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAVE_VERBS, reason="built without the verbs transport")
def test_module_does_not_link_libibverbs() -> None:
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    dyn = subprocess.run([readelf, "-d", _core.__file__], check=True, capture_output=True, text=True).stdout
    needed = [line for line in dyn.splitlines() if "(NEEDED)" in line]
    assert needed, dyn
    assert not any("ibverbs" in line for line in needed), needed


@pytest.mark.skipif(not HAVE_VERBS, reason="built without the verbs transport")
def test_import_without_libibverbs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DPMOVE_VERBS"}
    env["DPMOVE_LIBIBVERBS"] = "libdpmove-test-missing.so.1"
    got = run_check(sys.executable, env, tmp_path)
    assert got["ok"] is False
    assert got["why"].startswith("libibverbs: libdpmove-test-missing.so.1 could not be loaded"), got["why"]
    assert got["err"] and "could not be loaded" in got["err"], got["err"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_build_without_verbs(tmp_path: Path) -> None:
    python, site = wheel_in_bare_venv(tmp_path, "DPMOVE_WITH_VERBS=OFF")
    env = {k: v for k, v in os.environ.items() if k not in ("DPMOVE_VERBS", "PYTHONPATH")}
    got = run_check(str(python), env, tmp_path)
    assert got["file"].startswith(str(site))
    assert got["ok"] is False and "built without rdma-core headers" in got["why"]
    assert got["err"] and "libibverbs-dev" in got["err"]
    assert got["hooks"] is False
