"""InceptionNeXt-T's MetaNeXt block in eval inference, fused against unfused, at the model's stage
shapes: fastvis.ops.metanext_block with fc1 k-major (what the eval caches pass where the core's
own GEMM kernel is active) and row-major, against the unfused composition (the core's Inception
mixer, then fc1 / GELU / fc2 as oneDNN 1x1 convolutions, the residual). Median ms of repeated calls.

    PYTHONPATH=python python bench/metanext_split.py
    PYTHONPATH=python python bench/metanext_split.py --own off   # the BLAS for every product
"""
from __future__ import annotations

import argparse

from mlp_paths import _ms  # bench/ is the script directory: sys.path[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--own", choices=["auto", "on", "off"], default="auto")
    args = p.parse_args()
    import torch
    import torch.nn.functional as F

    import fastvis
    from fastvis import _C
    from fastvis.bench import pin_malloc
    from fastvis.bench.timing import gemm_line
    from fastvis.nn.reparam import kmajor
    from fastvis.ops import inception_depthwise_conv2d, metanext_block
    _C.set_own_gemm({"auto": -1, "on": 1, "off": 0}[args.own])
    print(pin_malloc())
    print(f"fastvis {fastvis.__version__}, {fastvis.get_num_threads()} thread(s); {gemm_line()}")
    print("| N | HxW | C | fused, fc1 k-major | fused, fc1 row-major | unfused (oneDNN) |")
    print("|:---|:---|:---|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    r = lambda *s, std=1.0: torch.randn(*s, generator=g) * std  # noqa: E731
    with torch.no_grad():
        for n in args.batch:
            for h, c in [(56, 96), (28, 192), (14, 384), (7, 768)]:
                gc, hid = c // 8, 4 * c
                x = r(n, c, h, h).contiguous(memory_format=torch.channels_last)
                mix = [r(gc, 1, 3, 3, std=0.3), r(gc), r(gc, 1, 1, 11, std=0.3), r(gc), r(gc, 1, 11, 1, std=0.3), r(gc)]
                w1, b1 = r(hid, c, std=c ** -0.5), r(hid)
                w2, b2, gam = r(c, hid, std=hid ** -0.5), r(c), torch.rand(c, generator=g)
                w1k, w2k = kmajor(w1), kmajor(w2)
                w1c, w2g, b2g = w1[:, :, None, None], (w2 * gam[:, None])[:, :, None, None], b2 * gam

                def split():
                    z = inception_depthwise_conv2d(x, *mix)
                    return torch.add(x, F.conv2d(F.gelu(F.conv2d(z, w1c, b1)), w2g, b2g))
                t = [_ms(lambda: metanext_block(x, *mix, w1k, b1, w2k, b2, gam), args.reps),
                     _ms(lambda: metanext_block(x, *mix, w1, b1, w2k, b2, gam), args.reps),
                     _ms(split, args.reps)]
                print(f"| {n} | {h}x{h} | {c} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} |", flush=True)
    _C.set_own_gemm(-1)


if __name__ == "__main__":
    main()
