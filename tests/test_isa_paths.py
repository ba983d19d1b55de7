"""Every compiled CPU path, not only the one this machine selects.

The kernels are compiled once per instruction set (generic, avx2, avx512: 32- or 64-byte
vectors) and core/cpu_features.cpp runs the best one the CPU supports. The rest of the
suite tests that one; here the kernel test modules run again in a subprocess for each
other compiled path the CPU can execute, capped with FASTVIS_CPU_ISA, with the hypothesis
sweeps scaled down (FASTVIS_HYPOTHESIS_SCALE) to keep the time reasonable. Plans and
scratch sizes computed outside the per-ISA files depend on the selected vector width
(cpu::vector_bytes()), so a mismatch between them and a path's kernels fails here.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastvis

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["generic", "avx2", "avx512"]
COMPILED = [s.strip() for s in str(fastvis.build_info()["cpu_isa_compiled"]).split(",")]
SELECTED = fastvis.build_info()["cpu_isa_selected"]

# The modules whose ops run per-ISA kernels (depthwise convolution, the fused blocks,
# LayerNorm, GRN, the MLP's GRN prologue, the multi-branch depthwise ops).
MODULES = [
    "test_dwconv_forward.py", "test_dwconv_backward.py", "test_convnext_block.py",
    "test_dwconv_mlp_block.py", "test_metanext_block.py", "test_layer_norm.py", "test_grn.py",
    "test_grn_gelu.py", "test_mlp.py", "test_dilated_reparam.py", "test_inception_dwconv.py",
]


def _other_paths():
    if SELECTED not in ORDER:
        return []
    below = ORDER[:ORDER.index(SELECTED)]  # a cap can only lower the path
    return [isa for isa in below if isa in COMPILED]


def _run(isa: str, code_or_args, timeout: int):
    env = dict(os.environ, FASTVIS_CPU_ISA=isa, FASTVIS_HYPOTHESIS_SCALE="0.25")
    return subprocess.run([sys.executable, *code_or_args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cap_selects_each_compiled_path():
    for isa in _other_paths() + [SELECTED]:
        proc = _run(isa, ["-c", "import fastvis; print(fastvis.build_info()['cpu_isa_selected'])"],
                    timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == isa


def test_unknown_cap_is_ignored():
    proc = _run("sse9", ["-c", "import fastvis; print(fastvis.build_info()['cpu_isa_selected'])"],
                timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == SELECTED


@pytest.mark.parametrize("isa", [pytest.param(i, id=i) for i in ORDER])
def test_kernel_modules_on_path(isa):
    if isa not in _other_paths():
        pytest.skip(f"{isa}: not compiled, not runnable on this CPU, or already the selected "
                    f"path ({SELECTED}) that the rest of the suite tests")
    # The modules' own subprocess tests of the generic path are left to the main run.
    args = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not isa_path",
            *[os.path.join(HERE, m) for m in MODULES]]
    proc = _run(isa, args, timeout=1500)
    tail = "\n".join(proc.stdout.splitlines()[-30:])
    assert proc.returncode == 0, f"FASTVIS_CPU_ISA={isa}:\n{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail
