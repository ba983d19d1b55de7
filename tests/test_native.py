"""The core as a native library: headers and libfastvis_core.so shipped with the
package, and a C++ program (examples/native/dwconv_example.cpp) built against them
with no Python and no libtorch."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import fastvis

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "native" / "dwconv_example.cpp"
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def test_include_dir_has_public_headers():
    inc = Path(fastvis.get_include())
    assert inc.is_dir(), inc
    for h in ("fastvis.h", "depthwise_conv.h", "tensor.h", "error.h", "threading.h",
              "build_info.h"):
        assert (inc / "fastvis" / h).is_file(), f"{h} missing under {inc}/fastvis"


def test_public_headers_are_framework_free():
    inc = Path(fastvis.get_include()) / "fastvis"
    offenders = []
    for h in inc.rglob("*.h"):
        for line in h.read_text().splitlines():
            if re.match(r"\s*#\s*include\s*[<\"](torch|ATen|c10|pybind11|Python\.h)", line):
                offenders.append(f"{h.name}: {line.strip()}")
    assert not offenders, offenders


def test_library_dir_has_core_library():
    libdir = Path(fastvis.get_library_dir())
    assert libdir.is_dir(), libdir
    assert (libdir / "libfastvis_core.so").exists(), sorted(p.name for p in libdir.iterdir())


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
def test_native_example_builds_and_runs(tmp_path):
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    exe = tmp_path / "dwconv_example"
    inc, libdir = fastvis.get_include(), fastvis.get_library_dir()
    cmd = [CXX, "-std=c++17", "-O1", "-Wall", str(EXAMPLE), f"-I{inc}", f"-L{libdir}",
           "-lfastvis_core", f"-Wl,-rpath,{libdir}", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, f"compile failed: {' '.join(cmd)}\n{build.stderr}"
    # Run with a clean environment: no PYTHONPATH, no LD_LIBRARY_PATH (rpath must suffice).
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "PYTHONPATH")}
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, f"example failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    assert re.search(r"(?m)^ok\s*$", run.stdout), f"example did not print ok:\n{run.stdout}"


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
def test_native_errors_are_catchable(tmp_path):
    """A bad call through the C++ API throws fastvis::Error with the documented kind."""
    src = tmp_path / "bad_call.cpp"
    src.write_text(r'''
#include <cstdio>
#include <vector>
#include "fastvis/fastvis.h"
int main() {
  std::vector<float> x(1 * 3 * 5 * 5, 1.0f), w(3 * 1 * 3 * 3, 1.0f), y(1 * 3 * 5 * 5);
  auto xv = fastvis::make_view(x.data(), fastvis::DType::Float32, {1, 3, 5, 5});
  auto wv = fastvis::make_view(w.data(), fastvis::DType::Float32, {3, 1, 3, 3});
  auto yv = fastvis::make_view(y.data(), fastvis::DType::Float32, {1, 3, 5, 5});
  fastvis::DepthwiseConv2dParams p;
  p.stride_h = 3;  // unsupported
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  try {
    fastvis::depthwise_conv2d_forward(xv, wv, nullptr, yv, p, nullptr, 0);
  } catch (const fastvis::Error& e) {
    std::printf("%d %s\n", static_cast<int>(e.kind()), e.what());
    return e.kind() == fastvis::ErrorKind::Value ? 0 : 2;
  }
  return 1;
}
''')
    exe = tmp_path / "bad_call"
    inc, libdir = fastvis.get_include(), fastvis.get_library_dir()
    build = subprocess.run([CXX, "-std=c++17", str(src), f"-I{inc}", f"-L{libdir}",
                            "-lfastvis_core", f"-Wl,-rpath,{libdir}", "-o", str(exe)],
                           capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"rc={run.returncode}: {run.stdout}{run.stderr}"
    assert "stride" in run.stdout.lower(), run.stdout


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
def test_native_linear(tmp_path):
    """fastvis/linear.h from a native program: a few rows (the own kernel where AVX-512 is
    selected) and many rows (the split GEMM), against a double loop; a bad shape throws."""
    src = tmp_path / "linear.cpp"
    src.write_text(r'''
#include <cmath>
#include <cstdio>
#include <vector>
#include "fastvis/fastvis.h"
int check(int m, int n, int k) {
  std::vector<float> x(m * k), w(n * k), b(n), y(m * n);
  for (int i = 0; i < m * k; ++i) x[i] = std::sin(0.37f * i);
  for (int i = 0; i < n * k; ++i) w[i] = std::cos(0.11f * i);
  for (int i = 0; i < n; ++i) b[i] = 0.01f * i;
  auto xv = fastvis::make_view(x.data(), fastvis::DType::Float32, {m, k});
  auto wv = fastvis::make_view(w.data(), fastvis::DType::Float32, {n, k});
  auto bv = fastvis::make_view(b.data(), fastvis::DType::Float32, {n});
  auto yv = fastvis::make_view(y.data(), fastvis::DType::Float32, {m, n});
  fastvis::linear_forward(xv, wv, &bv, yv);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double ref = b[j], mag = std::fabs(b[j]);
      for (int p = 0; p < k; ++p) {
        ref += double(x[i * k + p]) * w[j * k + p];
        mag += std::fabs(double(x[i * k + p]) * w[j * k + p]);
      }
      if (std::fabs(y[i * n + j] - ref) > 1e-6 * (k + 1) * mag + 1e-30) {
        std::printf("mismatch m=%d n=%d k=%d at (%d, %d): %g vs %g\n", m, n, k, i, j, y[i * n + j], ref);
        return 1;
      }
    }
  return 0;
}
int main() {
  if (check(1, 300, 77) || check(5, 130, 64) || check(20, 70, 33)) return 1;
  std::vector<float> x(6), w(6), y(4);
  try {
    fastvis::linear_forward(fastvis::make_view(x.data(), fastvis::DType::Float32, {2, 3}),
                            fastvis::make_view(w.data(), fastvis::DType::Float32, {3, 2}), nullptr,
                            fastvis::make_view(y.data(), fastvis::DType::Float32, {2, 2}));
  } catch (const fastvis::Error& e) {
    std::printf("ok %s\n", e.what());
    return e.kind() == fastvis::ErrorKind::Value ? 0 : 2;
  }
  return 3;
}
''')
    exe = tmp_path / "linear"
    inc, libdir = fastvis.get_include(), fastvis.get_library_dir()
    build = subprocess.run([CXX, "-std=c++17", "-O1", str(src), f"-I{inc}", f"-L{libdir}",
                            "-lfastvis_core", f"-Wl,-rpath,{libdir}", "-o", str(exe)],
                           capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"rc={run.returncode}: {run.stdout}{run.stderr}"
    assert "weight must be" in run.stdout, run.stdout
