"""The fused blocks' float GEMM, one thread: the core's own AVX-512 kernel (core/cpu_kernels_gemm.cpp)
against the BLAS (OpenBLAS, or the provider fastvis installed), on the blocks' tile shapes, through
_C.sgemm (core::gemm as the blocks call it). Best GFLOP/s of repeated calls on the same data
(cache-warm operands: the kernels' own rate, not the blocks').

    PYTHONPATH=python python bench/gemm_rates.py
    FASTVIS_OPENBLAS_CORETYPE=SkylakeX PYTHONPATH=python python bench/gemm_rates.py

NN: C = A B (B stored [k][n]: a k-major weight); TN: C = A^T B (the weight gradients, k = the
tile's pixels); NT: C = A B^T (a row-major weight: the BLAS only, for comparison).
"""
from __future__ import annotations

import argparse
import time

SHAPES = [  # (form, m, n, k)
    ("NN", 256, 1536, 384), ("NN", 256, 384, 1536), ("NN", 196, 1280, 320), ("NN", 49, 3072, 768),
    ("NN", 49, 768, 3072), ("NN", 98, 768, 3072), ("NN", 3136, 384, 96), ("NN", 256, 96, 384),
    ("TN", 384, 1536, 256), ("TN", 1536, 384, 256), ("TN", 96, 384, 256), ("TN", 768, 3072, 49),
    ("TN", 3072, 768, 98),
]


def rate(form, m, n, k, reps):
    import torch

    from fastvis import _C
    g = torch.Generator().manual_seed(0)
    ta, tb = form[0] == "T", form[1] == "T"
    a = torch.randn(*((k, m) if ta else (m, k)), generator=g)
    b = torch.randn(*((n, k) if tb else (k, n)), generator=g)
    c = torch.zeros(m, n)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        _C.sgemm(ta, tb, a, b, c, 1.0, 0.0)
        best = max(best, 2.0 * m * n * k / (time.perf_counter() - t0) * 1e-9)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    import torch

    import fastvis
    from fastvis import _C
    from fastvis.bench.timing import gemm_line
    torch.set_num_threads(1)
    fastvis.set_num_threads(1)
    print(f"fastvis {fastvis.__version__}, one thread; {gemm_line()}")
    own = _C.own_gemm_available()
    print("| form | m | n | k | BLAS GFLOP/s | own kernel GFLOP/s | own / BLAS |")
    print("|:---|---:|---:|---:|---:|---:|---:|")
    try:
        for form, m, n, k in SHAPES:
            _C.set_own_gemm(0)
            blas = rate(form, m, n, k, args.reps)
            if own:
                _C.set_own_gemm(1)
                mine = rate(form, m, n, k, args.reps)
                print(f"| {form} | {m} | {n} | {k} | {blas:.0f} | {mine:.0f} | {mine / blas:.2f} |")
            else:
                print(f"| {form} | {m} | {n} | {k} | {blas:.0f} | - | - |")
    finally:
        _C.set_own_gemm(-1)


if __name__ == "__main__":
    main()
