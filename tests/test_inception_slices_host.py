"""Host test of the Inception op's CUDA dispatch arithmetic (no GPU needed).

Compiles tests/cpp/test_inception_slices.cpp -- which replays the CUDA path of
csrc/ops/inception_dwconv/cuda/inception_dwconv.cu on the host (depthwise convolutions
addressed only through the channel-slice views' strides, the identity channels through a
cudaMemcpy2D emulation, all from ops/inception_dwconv/slices.h) and compares with the
Inception convolution from logical indices, both layouts, 300 shapes -- with the system C++
compiler and runs it, once plainly and once under AddressSanitizer + UBSan.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests" / "cpp" / "test_inception_slices.cpp", ROOT / "csrc" / "core" / "tensor.cpp"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _run(tmp_path, flags):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/clang++) on PATH")
    exe = tmp_path / "test_inception_slices"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-I", str(ROOT / "csrc"), "-I",
           str(ROOT / "csrc" / "include"), *flags, *map(str, SOURCES), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and flags:
        pytest.skip(f"sanitizers unavailable: {built.stderr[-500:]}")
    assert built.returncode == 0, built.stderr[-6000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:exitcode=23",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=24")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    report = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    assert run.returncode == 0, report
    assert " 0 failed" in run.stdout and "runtime error" not in run.stderr, report


def test_inception_cuda_dispatch_arithmetic(tmp_path):
    _run(tmp_path, [])


def test_inception_cuda_dispatch_arithmetic_sanitized(tmp_path):
    _run(tmp_path, SANITIZE)
