"""Every compiled CPU path, not only the one this machine selects.

The kernels are compiled once per instruction set (generic, avx2, avx512: 32- or 64-byte
vectors) and core/cpu_features.cpp runs the best one the CPU supports. The rest of the
suite tests that one; here the kernel test modules run again in a subprocess for each
other compiled path the CPU can execute, capped with FASTVIS_CPU_ISA, with the hypothesis
sweeps scaled down (FASTVIS_HYPOTHESIS_SCALE) to keep the time reasonable; the paths'
subprocesses run at the same time, one thread each. Plans and
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
    code = "import fastvis; print(fastvis.build_info()['cpu_isa_selected'])"
    procs = {isa: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=dict(os.environ, FASTVIS_CPU_ISA=isa))
             for isa in _other_paths() + [SELECTED]}
    for isa, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == isa


def test_unknown_cap_is_ignored():
    proc = _run("sse9", ["-c", "import fastvis; print(fastvis.build_info()['cpu_isa_selected'])"],
                timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == SELECTED


# Tests whose code does not depend on the instruction set (torch.compile graph capture,
# opcheck's schema and fake-kernel checks, the bench commands, timm's own modules) run in
# the main run only.
NOT_PER_ISA = "not isa_path and not compile and not opcheck and not bench and not timm"


class _Runs:
    """The per-path runs, started together on first use: each is one pytest process with
    one thread (OMP_NUM_THREADS=1; the thread-count tests set their own counts), so the
    paths' runs share the machine's cores instead of queueing (most of these tests are
    small problems that one thread runs as fast as two)."""

    def __init__(self):
        self.procs = {}

    def start(self):
        if self.procs:
            return
        args = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", NOT_PER_ISA,
                *[os.path.join(HERE, m) for m in MODULES]]
        for isa in _other_paths():
            env = dict(os.environ, FASTVIS_CPU_ISA=isa, FASTVIS_HYPOTHESIS_SCALE="0.25", OMP_NUM_THREADS="1")
            self.procs[isa] = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True)

    def wait(self, isa, timeout):
        self.start()
        proc = self.procs[isa]
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"FASTVIS_CPU_ISA={isa}: timed out after {timeout} s\n{out[-3000:]}")
        return proc.returncode, out, err


_RUNS = _Runs()


@pytest.fixture(scope="module")
def isa_runs():
    yield _RUNS
    for proc in _RUNS.procs.values():  # a failed or interrupted module leaves none running
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("isa", [pytest.param(i, id=i) for i in ORDER])
def test_kernel_modules_on_path(isa, isa_runs):
    if isa not in _other_paths():
        pytest.skip(f"{isa}: not compiled, not runnable on this CPU, or already the selected "
                    f"path ({SELECTED}) that the rest of the suite tests")
    returncode, out, err = isa_runs.wait(isa, timeout=1500)
    tail = "\n".join(out.splitlines()[-30:])
    assert returncode == 0, f"FASTVIS_CPU_ISA={isa}:\n{tail}\n{err[-2000:]}"
    assert " passed" in tail
