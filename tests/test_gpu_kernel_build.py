"""The batched copy kernel (cpp/cuda/batched_copy.cu) as the module embeds it: its source is
compiled here with NVRTC (from the nvidia-cuda-nvrtc-cu12 wheel of the `test` extra), so the
kernel is checked to build on hosts without a GPU or a CUDA toolkit. libnvrtc is loaded once
per process, at the first compile: the module fixture points DPMOVE_NVRTC at the wheel's
library before anything in this module compiles."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dpmove import _core

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["compute_80", "compute_90"]


def wheel_libnvrtc() -> Path:
    """libnvrtc.so.12 of the installed nvidia-cuda-nvrtc-cu12 wheel (nvidia.cuda_nvrtc may be a
    namespace package: searched through its __path__)."""
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("the test extra provides NVRTC (nvidia-cuda-nvrtc-cu12) on Linux x86_64 only")
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    except ModuleNotFoundError:
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        lib = Path(root) / "lib" / "libnvrtc.so.12"
        if lib.is_file():
            return lib
    pytest.fail("NVRTC from nvidia-cuda-nvrtc-cu12 is not installed (looked in "
                f"{roots or 'no nvidia.cuda_nvrtc package'}); install the test extra: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def nvrtc() -> Iterator[Path]:
    lib = wheel_libnvrtc()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPMOVE_NVRTC", str(lib))
        status = _core._nvrtc_status()
        if not status.startswith("not loaded yet"):
            assert status.startswith("loaded "), f"libnvrtc was loaded before this module could choose it: {status}"
        yield lib


@pytest.fixture(scope="module")
def ptx(nvrtc: Path) -> dict[str, str]:
    return {arch: _core._nvrtc_compile_batched(arch) for arch in ARCHS}


def entry_params(text: str) -> list:
    m = re.search(r"\.visible\s+\.entry\s+dpmove_batched_copy\s*\(([^)]*)\)", text)
    assert m, "PTX declares no .entry dpmove_batched_copy"
    return re.findall(r"\.param\s+\.(\w+)\s+(\w+)", m.group(1))


def test_nvrtc_loaded_from_wheel(nvrtc: Path, ptx: dict[str, str]) -> None:
    status = _core._nvrtc_status()
    assert status.startswith("loaded "), status
    assert "NVRTC 12." in status, status


@pytest.mark.parametrize("arch", ARCHS)
def test_ptx_entry(ptx: dict[str, str], arch: str) -> None:
    text = ptx[arch]
    assert re.search(rf"^\.target\s+sm_{arch.split('_')[1]}\b", text, re.MULTILINE), text[:400]
    # extern "C": the unmangled name the backend looks up; (descs, n, chunk_bytes).
    assert [t for t, _ in entry_params(text)] == ["u64", "u32", "u32"]
    # __launch_bounds__(kBatchedThreads)
    assert re.search(r"\.maxntid\s+256,\s*1,\s*1", text), "no .maxntid 256 (launch bounds)"


@pytest.mark.parametrize("arch", ARCHS)
def test_ptx_moves_16_byte_vectors(ptx: dict[str, str], arch: str) -> None:
    text = ptx[arch]
    # Aligned spans: one 16-byte load and store per unit (NVRTC 12 emits ld.v4.u32 / st.v4.u32,
    # generic addressing: the pointers come from the descriptors, not from kernel parameters).
    assert re.search(r"\bld(\.global)?(\.nc)?\.v4\.[bu]32\b", text), "no 16-byte vector load"
    assert re.search(r"\bst(\.global)?\.v4\.[bu]32\b", text), "no 16-byte vector store"
    # Unaligned spans fall back to bytes.
    assert re.search(r"\bld(\.global)?\.u8\b", text) and re.search(r"\bst(\.global)?\.u8\b", text)
    # No 4-byte scalar copy loop (what a Vec16 without alignas(16) compiles to).
    assert not re.search(r"\bld(\.global)?\.u32\s+%r\d+,\s*\[%rd\d+\+12\]", text)


def test_ptx_assembles_without_spills(ptx: dict[str, str]) -> None:
    ptxas = shutil.which("ptxas") or shutil.which("ptxas", path="/usr/local/cuda/bin")
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not found: PTX not assembled")
    for arch, text in ptx.items():
        out = subprocess.run([ptxas, f"-arch=sm_{arch.split('_')[1]}", "-v", "-o", os.devnull, "-"],
                             input=text, capture_output=True, text=True, check=False)
        if out.returncode != 0 and "Unsupported .version" in out.stderr:
            pytest.skip(f"{ptxas} is older than the wheel's NVRTC: {out.stderr.strip()}")
        assert out.returncode == 0, out.stderr
        assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", out.stderr), out.stderr
        regs = int(re.search(r"Used (\d+) registers", out.stderr).group(1))
        # 256 threads x 8 CTAs per SM fit the register file at <= 32 registers.
        assert regs <= 32, out.stderr


def test_bad_arch_raises_with_nvrtc_log(nvrtc: Path) -> None:
    with pytest.raises(ValueError) as info:
        _core._nvrtc_compile_batched("compute_1")
    msg = str(info.value)
    assert "NVRTC_ERROR_INVALID_OPTION" in msg, msg
    assert "--gpu-architecture=compute_1" in msg, msg
    assert "invalid value for --gpu-architecture" in msg, msg  # NVRTC's log


def test_concurrent_compiles_agree(nvrtc: Path, ptx: dict[str, str]) -> None:
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(_core._nvrtc_compile_batched, ["compute_90"] * 4))
    assert got == [ptx["compute_90"]] * 4


def test_source_is_header_then_kernel() -> None:
    """The embedded source is this checkout's header and kernel, self-contained."""
    src = _core._batched_source()
    header = (ROOT / "cpp/include/dpmove/batched_copy.h").read_text()
    kernel = (ROOT / "cpp/cuda/batched_copy.cu").read_text()
    expect = (
        '#line 1 "dpmove/batched_copy.h"\n' + header.replace("#pragma once", "")
        + '\n#line 1 "batched_copy.cu"\n' + kernel.replace('#include "dpmove/batched_copy.h"', "")
    )
    assert src == expect, "embedded kernel source is stale: rebuild the module"
    assert not re.search(r"^\s*#\s*include", src, re.MULTILINE)


def test_fatbin_present_or_explained() -> None:
    size, missing = _core._batched_fatbin_size(), _core._batched_fatbin_missing()
    if size:
        assert missing == ""
    else:
        assert missing, "no fatbin and no reason"


def test_missing_library_is_unsupported(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import errno, dpmove
        try:
            dpmove._core._nvrtc_compile_batched("compute_90")
        except dpmove.UnsupportedOperation as e:
            assert e.errno == errno.ENOENT, e
            print(e)
        else:
            raise SystemExit("compiled without libnvrtc")
        print(dpmove._core._nvrtc_status())
        """
    )
    env = dict(os.environ, DPMOVE_NVRTC=str(tmp_path / "libnvrtc-missing.so.12"))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    err, status = out.stdout.strip().splitlines()
    assert "libnvrtc-missing.so.12" in err and "nvidia-cuda-nvrtc-cu12" in err, err
    assert status.startswith("unusable: libnvrtc could not be loaded"), status
