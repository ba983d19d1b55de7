"""Host tests of the CUDA fused ConvNeXt block (no GPU needed).

* tests/cpp/test_block_tile_math.cpp replays every index formula of
  csrc/ops/convnext_block/block_tile_math.h over many odd shapes (coverage of pixels,
  halos, outputs, shared-memory regions, K/N chunks, MMA fragments, grids, partial sums,
  scratch) and emulates the kernels' data flow against a float64 reference of the block;
  it runs plainly, under AddressSanitizer + UndefinedBehaviorSanitizer, and (when the
  CUTLASS/CuTe and CUDA headers are installed) with the MMA fragment maps cross-checked
  against CuTe's own MMA_Traits layouts.
* tests/cpp/test_block_cuda_emu.cpp compiles the kernels' own source
  (csrc/ops/convnext_block/cuda/convnext_block_kernels.cuh) with the host compiler over an
  emulation of the CUDA built-ins it uses (tests/cpp/cuda_host_emu.h: fibers as threads,
  barriers with deadlock detection, warp shuffles, the tensor-core MMA atoms, exact
  float16/bfloat16 rounding) and compares forward, D and the parameter gradients with the
  float64 reference; plainly and under ASan + UBSan.
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


EMU_SOURCE = ROOT / "tests" / "cpp" / "test_block_cuda_emu.cpp"
EMU_FLAGS = ["-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-I", str(ROOT / "csrc" / "include"),
             str(ROOT / "csrc" / "core" / "tensor.cpp")]


def _compile(cxx, flags, source, exe):
    cmd = [cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), *flags, str(source), "-o", str(exe)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _build_and_run(tmp_path, flags, args=(), source=SOURCE):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/clang++) on PATH")
    exe = tmp_path / source.stem
    built = _compile(cxx, flags, source, exe)
    assert built.returncode == 0, f"compiling {source.name} failed:\n{built.stderr[-6000:]}"
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=1800, env=_env())
    report = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-6000:]}"
    assert run.returncode == 0, f"{source.name} failed (exit {run.returncode})\n{report}"
    assert " 0 failed" in run.stdout, report
    assert "runtime error" not in run.stderr, report
    assert "ERROR: AddressSanitizer" not in run.stderr, report
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


def test_kernel_source_on_emulated_cuda(tmp_path):
    out = _build_and_run(tmp_path, ["-Wall", "-Wextra", *EMU_FLAGS], source=EMU_SOURCE)
    assert "passed" in out


def test_kernel_source_on_emulated_cuda_sanitized(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/clang++) on PATH")
    if not _sanitizers_work(cxx, tmp_path):
        pytest.skip("the C++ compiler cannot build and run AddressSanitizer/UBSan programs here")
    # ASan prints a notice about makecontext/swapcontext (the emulated threads); it reports
    # no error on these runs.
    flags = [*SANITIZE, *[f for f in EMU_FLAGS if f != "-O2"]]
    out = _build_and_run(tmp_path, flags, ["--quick"], source=EMU_SOURCE)
    assert "passed" in out
