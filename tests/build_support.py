"""Helper shared by the build-variant tests (this module holds no tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def wheel_in_bare_venv(tmp_path: Path, *cmake_defines: str) -> Tuple[Path, Path]:
    """Builds a dpmove wheel from this checkout with the given CMake defines (e.g.
    "DPMOVE_WITH_URING=OFF"), installs it into tmp_path/site and makes a venv that sees only
    that wheel and numpy, so the dpmove under test (an editable install, say) cannot shadow
    it. Returns (the venv's python, the site directory the wheel went to)."""
    wheel_dir, site, build = tmp_path / "wheel", tmp_path / "site", tmp_path / "build"
    defines = [arg for d in cmake_defines for arg in ("-C", f"cmake.define.{d}")]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), *defines,
         "-C", f"build-dir={build}", str(ROOT)],
        check=True,
    )
    (wheel,) = wheel_dir.glob("dpmove-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv_site,) = venv.glob("lib/python*/site-packages")
    (venv_site / "deps.pth").write_text(f"{site}\n{Path(np.__file__).parent.parent}\n")
    return venv / "bin" / "python", site
