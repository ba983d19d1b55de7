"""Host tests of the CUDA depthwise-conv tile math (no GPU needed).

Compiles tests/cpp/test_dwconv_tile_math.cpp -- which emulates every CUDA kernel of
csrc/ops/depthwise_conv/cuda/dwconv.cu on the host through the same
csrc/ops/depthwise_conv/tile_math.h functions and compares with a naive
convolution -- with the system C++ compiler and runs it, once plainly and once
under AddressSanitizer + UndefinedBehaviorSanitizer.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cpp" / "test_dwconv_tile_math.cpp"
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
    # Leak checking needs ptrace, which some sandboxes forbid; leaks are not what
    # this test is about. UBSan prints a stack and fails on the first error.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=23"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=24"
    return env


def _compile(cxx, flags, source, exe):
    cmd = [cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), *flags, str(source), "-o", str(exe)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _build_and_run(tmp_path, flags, args=()):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/clang++) on PATH")
    exe = tmp_path / "test_dwconv_tile_math"
    built = _compile(cxx, flags, SOURCE, exe)
    assert built.returncode == 0, f"compiling {SOURCE.name} failed:\n{built.stderr[-6000:]}"
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, env=_env())
    report = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-6000:]}"
    assert run.returncode == 0, f"tile-math test failed (exit {run.returncode})\n{report}"
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


def test_tile_math_emulation(tmp_path):
    out = _build_and_run(tmp_path, ["-Wall", "-Wextra"])
    assert "passed" in out


def test_tile_math_emulation_sanitized(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++/g++/clang++) on PATH")
    if not _sanitizers_work(cxx, tmp_path):
        pytest.skip("the C++ compiler cannot build and run AddressSanitizer/UBSan programs here")
    # The sanitized run uses the reduced random sweep (all hand-picked shapes are kept)
    # so both tests together stay well under a minute.
    out = _build_and_run(tmp_path, SANITIZE, ["--quick"])
    assert "passed" in out
