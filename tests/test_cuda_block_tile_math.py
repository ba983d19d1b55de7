"""Host tests of the CUDA fused ConvNeXt block's index math (no GPU needed).

Compiles tests/cpp/test_block_tile_math.cpp -- which replays every index formula of
csrc/ops/convnext_block/block_tile_math.h over many odd shapes (coverage of pixels,
halos, outputs, shared-memory regions, K/N chunks, MMA fragments, grids, partial sums,
scratch) and emulates the kernels of csrc/ops/convnext_block/cuda/convnext_block.cu on
the host against a float64 reference of the block -- with the system C++ compiler and
runs it: plainly, under AddressSanitizer + UndefinedBehaviorSanitizer, and (when the
CUTLASS/CuTe and CUDA headers are installed) with the MMA fragment maps cross-checked
against CuTe's own MMA_Traits layouts.
"""
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cpp" / "test_block_tile_math.cpp"
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


def _env():
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=23"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=24"
    return env


def _compile(cxx, flags, source, exe):
    cmd = [cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), *flags, str(source), "-o", str(exe)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _build_and_run(tmp_path, flags, args=()):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/clang++) on PATH")
    exe = tmp_path / "test_block_tile_math"
    built = _compile(cxx, flags, SOURCE, exe)
    assert built.returncode == 0, f"compiling {SOURCE.name} failed:\n{built.stderr[-6000:]}"
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900, env=_env())
    report = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-6000:]}"
    assert run.returncode == 0, f"block tile-math test failed (exit {run.returncode})\n{report}"
    assert " 0 failed" in run.stdout, report
    assert "runtime error" not in run.stderr, report
    return run.stdout


def _sanitizers_work(cxx, tmp_path):
    probe = tmp_path / "probe.cpp"
    probe.write_text("#include <vector>\nint main() { std::vector<int> v(3, 1); return v[1] - 1; }\n")
    exe = tmp_path / "probe"
    if _compile(cxx, SANITIZE, probe, exe).returncode != 0:
        return False
    try:
        return subprocess.run([str(exe)], capture_output=True, timeout=60, env=_env()).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _cute_include_flags():
    """-I flags for CuTe (nvidia-cutlass wheel or FASTVIS_CUTLASS_INCLUDE_DIR) and the CUDA
    headers it needs, or None when either is missing."""
    cutlass = os.environ.get("FASTVIS_CUTLASS_INCLUDE_DIR")
    if not cutlass:
        spec = importlib.util.find_spec("cutlass_library")
        if spec and spec.submodule_search_locations:
            cutlass = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    if not cutlass or not os.path.exists(os.path.join(cutlass, "cute", "atom", "mma_traits_sm80.hpp")):
        return None
    cuda_homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cuda_homes.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for home in cuda_homes:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            inc = os.path.join(home, "include")
            flags = ["-I", cutlass, "-I", inc]
            if os.path.isdir(os.path.join(inc, "cccl")):
                flags += ["-I", os.path.join(inc, "cccl")]
            return flags
    return None


def test_block_tile_math(tmp_path):
    out = _build_and_run(tmp_path, ["-Wall", "-Wextra"])
    assert "passed" in out


def test_block_tile_math_sanitized(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/clang++) on PATH")
    if not _sanitizers_work(cxx, tmp_path):
        pytest.skip("the C++ compiler cannot build and run AddressSanitizer/UBSan programs here")
    # Reduced random sweep and emulation set (all hand-picked structure shapes are kept).
    out = _build_and_run(tmp_path, SANITIZE, ["--quick"])
    assert "passed" in out


def test_block_fragments_match_cute(tmp_path):
    flags = _cute_include_flags()
    if flags is None:
        pytest.skip("CUTLASS/CuTe or CUDA headers not found (pip install --no-deps nvidia-cutlass)")
    out = _build_and_run(tmp_path, ["-DFV_TEST_WITH_CUTE", "-Wno-deprecated-declarations", *flags], ["--quick"])
    assert "passed" in out
