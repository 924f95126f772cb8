"""The build without liburing and without xxhash.h: the thread-pool backend must serve the whole
API and `dpmove info` must say why io_uring is absent; the block store must checksum through the
xxhash package, with the values the native build writes. Builds a second wheel (about a minute)."""

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
    # No native checksum: the store goes through the xxhash package (its directory is argv[2]).
    assert not hasattr(dpmove._core, "checksum")
    sys.path.append(sys.argv[2])
    from dpmove.kv import BlockStore, get_model
    from dpmove.kv.checksum import checksum, provider
    assert provider() == "xxhash", provider()
    assert checksum(b"abc") == 0x78AF5F94892F3950
    spec = get_model("tiny-odd")
    with BlockStore(os.path.join(os.path.dirname(path), "store"), spec, engine=eng) as st:
        ks = st.keys(np.arange(3 * spec.block_tokens))
        blocks = np.random.default_rng(3).integers(0, 256, (3, spec.full_block_bytes), dtype=np.uint8)
        st.put(ks, None, blocks, np.arange(3) * spec.full_block_bytes)
        assert (st.get(ks).reshape(3, -1) == blocks).all()
    print(json.dumps({"backend": eng.backend, "reason": eng.backend_reason, "info": info["backends"]["io_uring"],
                      "forced": forced, "file": dpmove._core.__file__}))
    eng.close()
    """
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_build_without_liburing_and_xxhash(tmp_path: Path) -> None:
    xxhash = pytest.importorskip("xxhash", reason="the xxhash package is in the test extra")
    python, site = wheel_in_bare_venv(tmp_path, "DPMOVE_WITH_URING=OFF", "DPMOVE_WITH_XXHASH=OFF")
    env = {k: v for k, v in os.environ.items() if k not in ("DPMOVE_BACKEND", "PYTHONPATH")}
    out = subprocess.run([str(python), "-c", CHECK, str(tmp_path / "f.bin"), str(Path(xxhash.__file__).parent.parent)], env=env, cwd=tmp_path,
                         check=True, capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site))
    assert got["backend"] == "threadpool"
    assert "built without liburing" in got["reason"]
    assert got["info"]["compiled"] == "no" and got["info"]["usable"] == "no"
    assert "built without liburing" in got["forced"]
