"""Per-layer timings of the stem / downsampling convolutions in training, fastvis against PyTorch.

For UniRepLKNet's 3x3 stride-2 layers and InceptionNeXt's 4x4 / 2x2 patch layers (channels
and input sizes of the -T models at 224x224), medians of calls interleaved pair by pair, in
ms:

* forward: the core's patch gather + GEMM (``fastvis.ops.patch_conv2d`` in inference) and
  PyTorch's (oneDNN) convolution;
* weight gradient: the core's ``patch_conv2d_backward_weight`` and PyTorch's
  ``convolution_backward`` for the weight and bias;
* input gradient: PyTorch's ``convolution_backward`` for the input (what fastvis uses);
* forward + backward: ``fastvis.ops.patch_conv2d`` with gradients (PyTorch's forward and
  input gradient, the core's weight gradient; for the RGB stems, Cin*kh*kw < 64, PyTorch's
  convolution whole, the same code as the other column) against ``F.conv2d``.

Run from the repository root after the dev build:

    PYTHONPATH=python python bench/patch_conv_layers.py --batch 8
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastvis import _C
from fastvis.ops import patch_conv2d
from fastvis.ops._bridge import dl, scratch

# (Cin, Cout, input size, kernel, stride, padding)
LAYERS = [(3, 40, 224, 3, 2, 1), (40, 80, 112, 3, 2, 1), (80, 160, 56, 3, 2, 1), (160, 320, 28, 3, 2, 1),
          (320, 640, 14, 3, 2, 1), (3, 96, 224, 4, 4, 0), (96, 192, 56, 2, 2, 0), (192, 384, 28, 2, 2, 0),
          (384, 768, 14, 2, 2, 0)]


def interleaved(fns, repeat):
    for f in fns:
        f()
        f()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=8)
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"N={a.batch}, {torch.get_num_threads()} threads, medians of {a.repeat}, ms")
    print("layer | fwd core | fwd torch | wgrad core | wgrad torch | dgrad torch | fwd+bwd fastvis | fwd+bwd torch | ratio")
    for ci, co, h, k, s, pad in LAYERS:
        x = torch.randn(a.batch, ci, h, h).to(memory_format=torch.channels_last)
        w, b = torch.randn(co, ci, k, k), torch.randn(co)
        g = torch.randn_like(F.conv2d(x, w, b, s, pad)).contiguous(memory_format=torch.channels_last)
        gw, gb = torch.empty_like(w), torch.empty(co)
        sc = scratch(_C.patch_conv2d_backward_weight_scratch_bytes(dl(x), dl(w), [s, s], [pad, pad]), x.device)
        xg = x.clone().requires_grad_(ci != 3)
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        ins = [t for t in (xg, wg, bg) if t.requires_grad]

        def fwd_core():
            with torch.no_grad():
                patch_conv2d(x, w, b, s, pad)

        def fwd_torch():
            with torch.no_grad():
                F.conv2d(x, w, b, s, pad)

        def wgrad_core():
            _C.patch_conv2d_backward_weight(dl(g), dl(x), dl(w), dl(gw), dl(gb), dl(sc), [s, s], [pad, pad])

        def wgrad_torch():
            torch.ops.aten.convolution_backward(g, x, w, [co], [s, s], [pad, pad], [1, 1], False, [0, 0], 1,
                                                [False, True, True])

        def dgrad_torch():
            torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1,
                                                [True, False, False])

        def train_fastvis():
            torch.autograd.grad(patch_conv2d(xg, wg, bg, s, pad), ins, g)

        def train_torch():
            torch.autograd.grad(F.conv2d(xg, wg, bg, s, pad), ins, g)

        # pairs interleaved with each other only: oneDNN's primitive cache makes a convolution
        # slower right after a differently configured one (seen: the same F.conv2d training
        # call 12 vs 18 ms depending on what ran before it)
        t = (interleaved([fwd_core, fwd_torch], a.repeat) + interleaved([wgrad_core, wgrad_torch], a.repeat)
             + interleaved([dgrad_torch], a.repeat) + interleaved([train_fastvis, train_torch], a.repeat))
        print(f"{k}x{k} s{s}, {ci} -> {co}, {h} | " + " | ".join(f"{v:.2f}" for v in t) + f" | {t[6] / t[5]:.2f}x")


if __name__ == "__main__":
    main()
