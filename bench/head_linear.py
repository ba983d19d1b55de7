"""Classifier-head products at small batch: fastvis.ops.linear (the core's few-rows kernel)
against F.linear, with the weight cold (the caches flushed by a 96 MB pass before every
call, as a whole-model forward leaves them: the backbone's weights evict the head's) and
warm (the same call repeated). Median ms of repeated calls in one process.

    PYTHONPATH=python python bench/head_linear.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastvis.ops import linear
from mlp_paths import _ms  # bench/ is the script directory: sys.path[0]

# (name, N, K): the heads of the models fastvis builds
SHAPES = [
    ("inception_next_tiny fc1", 2304, 768),
    ("inception_next_tiny fc2", 1000, 2304),
    ("convnext_tiny / unireplknet_t fc", 1000, 768),
    ("convnext_base fc", 1000, 1024),
]


def _cold(fn, junk, reps):
    ts = []
    for _ in range(reps):
        junk.add_(1.0)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    torch.manual_seed(0)
    junk = torch.empty(96 * 1024 * 1024 // 4)
    print(f"{torch.get_num_threads()} thread(s); ms per call, median of {a.reps}\n")
    print("| head | N | rows | weight MB | fastvis cold | F.linear cold | ratio | fastvis warm | F.linear warm | ratio |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, n, k in SHAPES:
            w, b = torch.randn(n, k), torch.randn(n)
            for m in a.batch:
                x = torch.randn(m, k)
                torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-3)
                fv, pt = (lambda: linear(x, w, b)), (lambda: F.linear(x, w, b))
                fc, pc = _cold(fv, junk, a.reps), _cold(pt, junk, a.reps)
                fw, pw = _ms(fv, 4 * a.reps), _ms(pt, 4 * a.reps)
                print(f"| {name} | {n} | {m} | {n * k * 4 / 2 ** 20:.1f} | {fc:.3f} | {pc:.3f} | {pc / fc:.2f}x "
                      f"| {fw:.3f} | {pw:.3f} | {pw / fw:.2f}x |")


if __name__ == "__main__":
    main()
