"""Where a batch-N inference forward goes, part by part: stem, each stage's downsampling
layer and blocks, head -- fastvis against timm eager (same weights, channels_last,
``torch.inference_mode``), median ms of repeated calls in one process. With ``--gaps`` it
also times the fused core calls from inside fastvis' forward and prints the time spent
between them (Python, dispatch, allocation: what the per-call work costs at batch 1).

    PYTHONPATH=python python bench/stage_times.py --model convnext_tiny --batch 1 --gaps
"""
from __future__ import annotations

import argparse
import time


def _median_ms(fn, arg, reps):
    for _ in range(3):
        fn(arg)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(arg)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def parts(model, x, reps):
    import torch
    out = [("stem", _median_ms(model.stem, x, reps))]
    with torch.inference_mode():
        h = model.stem(x)
        for i, s in enumerate(model.stages):
            # the blocks: the whole stage (as the model runs it) minus its downsampling
            ds = _median_ms(s.downsample, h, reps)
            out.append((f"downsample {i}", ds))
            out.append((f"blocks {i}", _median_ms(s, h, reps) - ds))
            h = s(h)
        out.append(("head", _median_ms(model.forward_head, h, reps)))
        out.append(("whole forward", _median_ms(model, x, reps)))
    return out


def gaps(model, x, reps):
    """(total, in core, between) ms of the fastest of `reps` forwards, timing the fused
    core entry points from inside."""
    from fastvis import _C
    names = [n for n in ("convnext_block_forward", "convnext_block_forward_chain",
                         "metanext_block_forward", "metanext_block_forward_chain",
                         "patch_conv2d_forward", "dwconv_mlp_block_forward") if hasattr(_C, n)]
    real = {n: getattr(_C, n) for n in names}
    stamps = []

    def wrap(f):
        def g(*a, **k):
            stamps.append(time.perf_counter())
            r = f(*a, **k)
            stamps.append(time.perf_counter())
            return r
        return g

    best = None
    try:
        for n in names:
            setattr(_C, n, wrap(real[n]))
        for _ in range(3):
            model(x)
        for _ in range(reps):
            stamps.clear()
            t0 = time.perf_counter()
            model(x)
            t1 = time.perf_counter()
            inside = sum(stamps[i + 1] - stamps[i] for i in range(0, len(stamps), 2))
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, inside, len(stamps) // 2)
    finally:
        for n in names:
            setattr(_C, n, real[n])
    total, inside, calls = best
    return total * 1e3, inside * 1e3, (total - inside) * 1e3, calls


def main() -> None:
    import timm
    import torch

    import fastvis
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnext_tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--gaps", action="store_true", help="also time the gaps between core calls")
    a = ap.parse_args()
    torch.manual_seed(0)
    fm = fastvis.create_model(a.model).eval().to(memory_format=torch.channels_last)
    tm = timm.create_model(a.model).eval().to(memory_format=torch.channels_last)
    tm.load_state_dict(fm.state_dict())
    x = torch.randn(a.batch, 3, 224, 224).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        f, t = parts(fm, x, a.reps), parts(tm, x, a.reps)
    print(f"{a.model}, N={a.batch}, median ms of {a.reps} calls each\n")
    print("| part | fastvis | timm eager |\n|:---|---:|---:|")
    for (name, fv), (_, tv) in zip(f, t):
        print(f"| {name} | {fv:.2f} | {tv:.2f} |")
    if a.gaps:
        with torch.inference_mode():
            total, inside, between, calls = gaps(fm, x, a.reps)
        print(f"\nfastvis forward {total:.2f} ms: {calls} core calls {inside:.2f} ms, "
              f"between them {between:.2f} ms")


if __name__ == "__main__":
    main()
