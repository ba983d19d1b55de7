"""The core's float GEMM as the fused blocks call it (core::gemm, through _C.sgemm): the own
AVX-512 kernel (core/cpu_kernels_gemm.cpp) where it applies, forced on and off, against a
float64 product of the same float32 values.

Bound: the float32 result of a k-term dot product, in any summation order with or without
fused multiply-adds, differs from the exact one by at most gamma_k * sum |a_i b_i|,
gamma_k = k u / (1 - k u), u = 2^-24 (Higham, Accuracy and Stability, 3.1); with beta C as
one more term (and beta's own product), gamma_{k+2} (|A||B| + |beta C|). The bound is checked per element, so a wrong element (a skipped k
block, a masked tail written or read wrongly, C read where beta is 0) shows at any size.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import each_gemm_engine
from fastvis import _C

U = 2.0 ** -24
OWN = _C.own_gemm_available()


def _strided(rows, cols, pad, gen, fill=None):
    """A (rows, cols) float32 view with row stride cols + pad."""
    base = torch.randn(rows, cols + pad, generator=gen) if fill is None else torch.full((rows, cols + pad), fill)
    return base[:, :cols]


def _check(ta, tb, m, n, k, pads, beta, seed):
    g = torch.Generator().manual_seed(seed)
    a = _strided(k, m, pads[0], g) if ta else _strided(m, k, pads[0], g)
    b = _strided(n, k, pads[1], g) if tb else _strided(k, n, pads[1], g)
    c0 = _strided(m, n, pads[2], g)
    # beta 0: C must not be read (BLAS semantics), so it starts as NaN.
    c = _strided(m, n, pads[2], g, fill=float("nan")) if beta == 0 else c0.clone()
    _C.sgemm(ta, tb, a, b, c, 1.0, beta)
    A = (a.t() if ta else a).double()
    B = (b.t() if tb else b).double()
    ref = A @ B + (beta * c0.double() if beta != 0 else 0.0)
    mag = A.abs() @ B.abs()
    kk = k + 2
    gamma = kk * U / (1 - kk * U)
    bound = gamma * (mag + (abs(beta) * c0.double().abs() if beta != 0 else 0.0)) + 1e-30
    err = (c.double() - ref).abs()
    assert torch.isfinite(c).all(), "non-finite output (C read with beta 0, or a tail not written)"
    assert (err <= bound).all(), (
        f"ta={ta} tb={tb} m={m} n={n} k={k} beta={beta}: max err / bound "
        f"{float((err / bound).max()):.3g}")


@settings(max_examples=150, deadline=None)
@given(ta=st.booleans(), m=st.integers(1, 20), n=st.integers(1, 150), k=st.integers(1, 600),
       pads=st.tuples(st.integers(0, 3), st.integers(0, 17), st.integers(0, 5)),
       beta=st.sampled_from([0.0, 1.0, 0.5]), seed=st.integers(0, 2 ** 16))
def test_xn_sweep(ta, m, n, k, pads, beta, seed):
    """gemm(N, N) and gemm(T, N): the own kernel's two forms, and the BLAS."""
    each_gemm_engine(lambda: _check(ta, False, m, n, k, pads, beta, seed))


@settings(max_examples=150, deadline=None)
@given(m=st.one_of(st.integers(1, 10), st.integers(11, 40)), n=st.integers(1, 150),
       k=st.integers(0, 800),
       pads=st.tuples(st.integers(0, 3), st.integers(0, 17), st.integers(0, 5)),
       beta=st.sampled_from([0.0, 1.0, 0.5]), seed=st.integers(0, 2 ** 16))
def test_nt_sweep(m, n, k, pads, beta, seed):
    """gemm(N, T): the own few-rows kernel (m <= kFewRows = 8: dot products) and, above it,
    the packed-panel kernel (B^T's panels transposed 16 x 16 at a time, partial blocks by
    element: n and k of every remainder mod 16 and 64, k past one KC block of 256), k = 0
    included (C = beta C); and the BLAS."""
    each_gemm_engine(lambda: _check(False, True, m, n, k, pads, beta, seed))


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m,n,k", [(256, 1536, 384), (49, 768, 3072), (6, 64, 256), (7, 65, 257), (1, 1, 1)])
def test_block_shapes(gemm_engine, ta, tb, m, n, k):
    _check(ta, tb, m, n, k, (0, 0, 0), 0.0, m + n + k)
    _check(ta, tb, m, n, k, (1, 3, 2), 1.0, m * n + k)


def test_own_gemm_modes_and_errors():
    assert _C.own_gemm_active() == OWN  # default (-1): on wherever available
    with pytest.raises(ValueError, match="expected -1"):
        _C.set_own_gemm(2)
    if not OWN:
        with pytest.raises(ValueError, match="AVX-512"):
            _C.set_own_gemm(1)
    _C.set_own_gemm(0)
    assert not _C.own_gemm_active()
    _C.set_own_gemm(-1)
    assert _C.own_gemm_active() == OWN
    a, b = torch.zeros(3, 4), torch.zeros(5, 6)
    with pytest.raises(ValueError, match="do not chain"):
        _C.sgemm(False, False, a, b, torch.zeros(3, 6))
    with pytest.raises(TypeError, match="float32"):
        _C.sgemm(False, False, a.double(), torch.zeros(4, 6), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="unit column stride"):
        _C.sgemm(False, False, torch.zeros(4, 3).t(), torch.zeros(4, 6), torch.zeros(3, 6))
