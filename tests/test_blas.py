"""The fused blocks' float GEMM: PyTorch's MKL when its CPU library exports one (except on
AMD CPUs), OpenBLAS otherwise or with FASTVIS_BLAS=openblas (fastvis/_runtime.py,
fastvis/_cpu.py, core/blas.cpp), and the kernels the core's OpenBLAS loads with.

The rest of the suite runs the blocks on the default choice; here the choice itself, the
core's check of a provider, and the block ops again on OpenBLAS in a subprocess."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

import fastvis
from fastvis import _C, _cpu
from fastvis._runtime import MKL_NAME, _torch_mkl_symbols

HERE = os.path.dirname(os.path.abspath(__file__))


def _blas_in_subprocess(value):
    env = dict(os.environ)
    env.pop("FASTVIS_BLAS", None)
    if value is not None:
        env["FASTVIS_BLAS"] = value
    proc = subprocess.run([sys.executable, "-c", "import fastvis; print(fastvis.build_info()['blas'])"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), proc.stderr


def test_default_is_torch_mkl_when_exported_except_on_amd():
    symbols = _torch_mkl_symbols()
    name, _ = _blas_in_subprocess(None)
    amd = _cpu.prefer_openblas(_cpu.cpu_facts()[0])
    assert name == (MKL_NAME if symbols is not None and not amd else "OpenBLAS")
    assert fastvis.build_info()["openblas"].startswith("OpenBLAS")


AVX512 = frozenset(_cpu.AVX512_FLAGS) | {"avx2", "fma"}


@pytest.mark.parametrize("vendor,flags,env,want", [
    ("AuthenticAMD", AVX512, {}, "SKYLAKEX"),
    ("AuthenticAMD", frozenset({"avx2", "fma"}), {}, None),            # Zen 2/3: OpenBLAS decides
    ("AuthenticAMD", AVX512 - {"avx512bw"}, {}, None),                 # SkylakeX kernels need all five
    ("GenuineIntel", AVX512, {}, None),                                # OpenBLAS detects Intel itself
    ("AuthenticAMD", AVX512, {"OPENBLAS_CORETYPE": "Haswell"}, None),  # the user's choice stands
    ("AuthenticAMD", AVX512, {"FASTVIS_CPU_ISA": "avx2"}, None),       # capped below AVX-512
    ("AuthenticAMD", AVX512, {"OPENBLAS_CORETYPE": "Haswell", "FASTVIS_OPENBLAS_CORETYPE": "skylakex"},
     "SKYLAKEX"),                                                      # fastvis' own override
    ("GenuineIntel", frozenset({"avx2"}), {"FASTVIS_OPENBLAS_CORETYPE": "SkylakeX"}, None),  # no AVX-512
    ("GenuineIntel", frozenset({"avx2"}), {"FASTVIS_OPENBLAS_CORETYPE": "haswell"}, "HASWELL"),
    ("AuthenticAMD", AVX512, {"FASTVIS_OPENBLAS_CORETYPE": "auto", "OPENBLAS_CORETYPE": "Zen"}, None),
    ("", frozenset(), {}, None),                                       # no /proc/cpuinfo
])
def test_openblas_coretype_decision(vendor, flags, env, want):
    assert _cpu.openblas_coretype(vendor, flags, env) == want


def test_cpu_facts_reads_the_first_processor(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n\n"
                 "processor\t: 1\nvendor_id\t: GenuineIntel\nflags\t\t: fpu\n")
    assert _cpu.cpu_facts(str(f)) == ("AuthenticAMD", frozenset({"fpu", "avx2", "avx512f"}))
    assert _cpu.cpu_facts(str(tmp_path / "missing")) == ("", frozenset())
    assert _cpu.prefer_openblas("AuthenticAMD") and not _cpu.prefer_openblas("GenuineIntel")


def test_import_sets_the_coretype_for_the_core_only():
    """FASTVIS_OPENBLAS_CORETYPE reaches the core's OpenBLAS (its config names the kernels)
    and the process' OPENBLAS_CORETYPE is as it was after the import."""
    if not all(f in _cpu.cpu_facts()[1] for f in _cpu.AVX512_FLAGS):
        pytest.skip("needs a CPU with AVX-512 (OpenBLAS' SkylakeX kernels)")
    code = ("import os, fastvis; print(fastvis.build_info()['openblas']); "
            "print(os.environ.get('OPENBLAS_CORETYPE'))")
    for before, want in (("Haswell", "Haswell"), (None, "None")):
        env = dict(os.environ, FASTVIS_OPENBLAS_CORETYPE="SkylakeX")
        env.pop("OPENBLAS_CORETYPE", None)
        if before is not None:
            env["OPENBLAS_CORETYPE"] = before
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        config, after = proc.stdout.split("\n")[:2]
        assert "SkylakeX" in config and after == want, proc.stdout


def test_env_selects_openblas_and_unknown_values_warn():
    assert _blas_in_subprocess("openblas")[0] == "OpenBLAS"
    name, err = _blas_in_subprocess("atlas")
    assert "FASTVIS_BLAS='atlas' is not one of auto, mkl, openblas" in err
    assert name == _blas_in_subprocess(None)[0]


_SGEMM = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)


def test_a_wrong_provider_is_refused_and_the_previous_one_kept():
    before = _C.sgemm_provider()

    @_SGEMM
    def does_nothing(*args):  # leaves C untouched: beta * C + alpha * A B is not computed
        return None

    addr = ctypes.cast(does_nothing, ctypes.c_void_p).value
    with pytest.raises(RuntimeError, match="computed a wrong product"):
        _C.set_sgemm_provider(addr, 0, "broken")
    assert _C.sgemm_provider() == before


def test_a_provider_computing_the_right_product_is_installed_and_used():
    """A plain-Python column-major sgemm as the provider: it passes the check, the fused
    block's result with it matches OpenBLAS', and the previous provider is restored."""
    import numpy as np
    import torch

    calls = []

    @_SGEMM
    def sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        rd = lambda p, t: ctypes.cast(p, ctypes.POINTER(t)).contents.value  # noqa: E731
        ta_, tb_ = chr(rd(ta, ctypes.c_char)[0]), chr(rd(tb, ctypes.c_char)[0])
        M, N, K = rd(m, ctypes.c_int), rd(n, ctypes.c_int), rd(k, ctypes.c_int)
        LDA, LDB, LDC = rd(lda, ctypes.c_int), rd(ldb, ctypes.c_int), rd(ldc, ctypes.c_int)
        al, be = rd(alpha, ctypes.c_float), rd(beta, ctypes.c_float)

        def mat(p, ld, rows, cols):  # column-major rows x cols with leading dimension ld
            buf = (ctypes.c_float * (ld * (cols - 1) + rows)).from_address(p)
            return np.ctypeslib.as_array(buf)

        A = mat(a, LDA, *((M, K) if ta_ == "N" else (K, M)))
        B = mat(b, LDB, *((K, N) if tb_ == "N" else (N, K)))
        C = mat(c, LDC, M, N)
        col = lambda v, ld, r, cc: np.lib.stride_tricks.as_strided(  # noqa: E731
            v, (r, cc), (4, 4 * ld))
        Am = col(A, LDA, *((M, K) if ta_ == "N" else (K, M)))
        Bm = col(B, LDB, *((K, N) if tb_ == "N" else (N, K)))
        Cm = col(C, LDC, M, N)
        Am = Am if ta_ == "N" else Am.T
        Bm = Bm if tb_ == "N" else Bm.T
        Cm[...] = al * (Am.astype(np.float64) @ Bm.astype(np.float64)) + (be * Cm if be != 0 else 0)
        calls.append((M, N, K))

    before = _C.sgemm_provider()
    x = torch.randn(2, 24, 9, 9).contiguous(memory_format=torch.channels_last)
    args = (torch.randn(24, 1, 7, 7), torch.randn(24), torch.rand(24) + 0.5, torch.randn(24),
            torch.randn(96, 24) * 0.2, torch.randn(96), torch.randn(24, 96) * 0.2, torch.randn(24))
    with torch.no_grad():
        want = fastvis.ops.convnext_block(x, *args)
    symbols = _torch_mkl_symbols()
    # One thread: the Python callback then runs on this thread only (no pool thread waits for
    # the GIL while this one waits for the pool).
    fastvis.set_num_threads(1)
    # The core's own AVX-512 kernels, where active, serve every product the block makes:
    # off here, so the products reach the provider.
    _C.set_own_gemm(0)
    try:
        _C.set_sgemm_provider(ctypes.cast(sgemm, ctypes.c_void_p).value, 0, "numpy sgemm")
        assert _C.sgemm_provider() == "numpy sgemm"
        n_checked = len(calls)
        with torch.no_grad():
            got = fastvis.ops.convnext_block(x, *args)
        assert len(calls) > n_checked  # the block's GEMMs went through the provider
    finally:
        _C.set_own_gemm(-1)
        fastvis.set_num_threads(0)
        if before == MKL_NAME and symbols is not None:
            _C.set_sgemm_provider(symbols[0], symbols[1], MKL_NAME)
        else:
            _C.set_sgemm_provider(0)
    assert _C.sgemm_provider() == before
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_block_ops_on_the_other_blas():
    """The fused blocks' test modules again on the GEMM the main run does not use (OpenBLAS
    where the default is MKL, MKL where it is OpenBLAS: AMD CPUs); sweeps scaled down,
    BLAS-independent tests (torch.compile, opcheck, bench, timm, the ISA-path subprocesses)
    left to the main run."""
    other = "openblas" if _C.sgemm_provider() != "OpenBLAS" else "mkl"
    if other == "mkl" and _torch_mkl_symbols() is None:
        pytest.skip("the main run uses OpenBLAS and this PyTorch exports no MKL sgemm")
    env = dict(os.environ, FASTVIS_BLAS=other, FASTVIS_HYPOTHESIS_SCALE="0.25")
    args = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
            "not compile and not opcheck and not bench and not timm and not isa_path",
            *[os.path.join(HERE, m) for m in ("test_convnext_block.py", "test_dwconv_mlp_block.py",
                                              "test_metanext_block.py", "test_patch_conv.py")]]
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join(proc.stdout.splitlines()[-20:])
    assert proc.returncode == 0, f"{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail
