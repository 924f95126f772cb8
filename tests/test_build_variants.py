"""The build without liburing: the thread-pool backend must serve the whole API and
`dpmove info` must say why io_uring is absent. Builds a second wheel (about a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from build_support import wheel_in_bare_venv

CHECK = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import dpmove
    assert not dpmove._core.uring_compiled()
    info = dpmove.info()
    eng = dpmove.Engine()
    path = sys.argv[1]
    data = np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8)
    f = eng.open(path, "w+", direct=False)
    eng.write(f, eng.register(data), [(0, 0, data.size)]).result()
    out = np.zeros_like(data)
    eng.read(f, out, [(4096, 0, data.size - 4096)]).result()
    assert (out[: data.size - 4096] == data[4096:]).all()
    try:
        dpmove.Engine("io_uring")
        raise SystemExit("Engine('io_uring') should have raised")
    except dpmove.Error as e:
        forced = str(e)
    print(json.dumps({"backend": eng.backend, "reason": eng.backend_reason, "info": info["backends"]["io_uring"],
                      "forced": forced, "file": dpmove._core.__file__}))
    eng.close()
    """
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_build_without_liburing(tmp_path: Path) -> None:
    python, site = wheel_in_bare_venv(tmp_path, "DPMOVE_WITH_URING=OFF")
    env = {k: v for k, v in os.environ.items() if k not in ("DPMOVE_BACKEND", "PYTHONPATH")}
    out = subprocess.run([str(python), "-c", CHECK, str(tmp_path / "f.bin")], env=env, cwd=tmp_path,
                         check=True, capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site))
    assert got["backend"] == "threadpool"
    assert "built without liburing" in got["reason"]
    assert got["info"]["compiled"] == "no" and got["info"]["usable"] == "no"
    assert "built without liburing" in got["forced"]
