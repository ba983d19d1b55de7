"""The token MLP's CPU paths, forced, side by side: fastvis.ops.mlp on the core's tiled
MLP (fastvis/mlp.h) and on its torch-GEMM path, the latter with its products as oneDNN 1x1
convolutions ("oneDNN", where PyTorch has oneDNN) and as ``F.linear`` / ``mm`` ("mm"),
forward + backward through autograd, at a model's stage shapes, in one process (the best
of the rounds' median ms, the paths alternating per round). With ``--core`` also the tiled MLP's core calls alone (own scratch, no
autograd); with ``--convnext-v2`` instead the fused ConvNeXt-V2 block's core backward with
and without the forward's saved GRN row sums (7x7 dwconv, hidden = 4C).

    PYTHONPATH=python python bench/mlp_paths.py --model inception_next --batch 8 --core
    PYTHONPATH=python python bench/mlp_paths.py --model unireplknet --batch 1 8 --grn
    PYTHONPATH=python python bench/mlp_paths.py --convnext-v2 --batch 8

Prefix FASTVIS_OPENBLAS_CORETYPE=SkylakeX for OpenBLAS' AVX-512 kernels on AMD CPUs.
Malloc thresholds are pinned as in `fastvis bench` unless --malloc system.
"""
from __future__ import annotations

import argparse
import sys
import time

STAGES = {"inception_next": [(56, 96), (28, 192), (14, 384), (7, 768)],
          "unireplknet": [(56, 80), (28, 160), (14, 320), (7, 640)]}


def _ms(fn, reps):
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def mlp_paths(model, batches, grn, core, reps, rounds):
    import torch

    from fastvis import _C
    mod = sys.modules["fastvis.ops.mlp"]
    real, onednn = mod._tiled_serves, mod._ONEDNN
    for n in batches:
        for h, c in STAGES[model]:
            hid = 4 * c
            g = torch.Generator().manual_seed(0)
            r = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).requires_grad_()  # noqa: E731
            x = r(n, h, h, c)
            ps = [r(hid, c, std=c ** -0.5), r(hid, std=0.1), r(c, hid, std=hid ** -0.5), r(c, std=0.1)]
            gp = dict(grn_weight=r(hid, std=0.5), grn_bias=r(hid, std=0.1)) if grn else {}
            gy = torch.randn(n, h, h, c, generator=g)

            def step():
                mod.mlp(x, *ps, **gp).backward(gy)
            names = ["tiled", "oneDNN", "mm"] if onednn else ["tiled", "mm"]
            times = {name: [] for name in names}
            for _ in range(rounds):
                for name in names:
                    mod._tiled_serves = (lambda *a: a[2].shape[0] == a[0].shape[-1]) if name == "tiled" \
                        else (lambda *a: False)
                    mod._ONEDNN = name == "oneDNN"
                    times[name].append(_ms(step, reps))
            mod._tiled_serves, mod._ONEDNN = real, onednn
            best = {name: min(ts) for name, ts in times.items()}
            line = f"N={n} {h}x{h} C={c}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in best.items())
            line += " (tiled/" + ", tiled/".join(f"{k} {best['tiled'] / best[k]:.2f}" for k in names[1:]) + ")"
            if core:
                with torch.no_grad():
                    ws = [p.detach() for p in ps] + ([gp["grn_weight"].detach(), gp["grn_bias"].detach()]
                                                     if grn else [None, None])
                    xn = x.detach().permute(0, 3, 1, 2)
                    y = torch.empty(n, h, h, c).permute(0, 3, 1, 2)
                    stats = torch.empty(n, h, hid) if grn else None
                    gs = [torch.empty(n, h, h, c).permute(0, 3, 1, 2)] + [
                        None if w is None else torch.empty_like(w) for w in ws]
                    gyn = gy.permute(0, 3, 1, 2)
                    sf = torch.empty(_C.mlp_forward_scratch_bytes(xn, ws, False, 1e-6), dtype=torch.uint8)
                    sb = torch.empty(_C.mlp_backward_scratch_bytes(xn, ws, False, 1e-6), dtype=torch.uint8)
                    f = _ms(lambda: _C.mlp_forward(xn, ws, False, 1e-6, y, sf, stats), reps)
                    b = _ms(lambda: _C.mlp_backward(gyn, xn, ws, False, 1e-6, gs, sb, stats), reps)
                line += f"; core calls fwd {f:.2f} + bwd {b:.2f} = {f + b:.2f} ms"
            print(line, flush=True)


def convnext_v2(batches, reps):
    import torch

    from fastvis import _C
    for n in batches:
        for h, c in STAGES["inception_next"]:
            hd = 4 * c
            g = torch.Generator().manual_seed(0)
            r = lambda *s, std=1.0: torch.randn(*s, generator=g) * std  # noqa: E731
            x = r(n, c, h, h).contiguous(memory_format=torch.channels_last)
            ws = [r(c, 1, 7, 7, std=0.1), r(c), torch.ones(c), torch.zeros(c), r(hd, c, std=c ** -0.5),
                  r(hd, std=0.1), r(c, hd, std=hd ** -0.5), r(c, std=0.1), None, None, r(hd, std=0.3),
                  r(hd, std=0.1)]
            stats, y = torch.empty(n, h, hd), torch.empty_like(x)
            _C.convnext_block_forward(x, ws, 1e-6, False, y, None, 1e-6, 0, True, stats)
            gy = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
            gs = [torch.empty_like(x)] + [None if t is None else torch.empty_like(t) for t in ws[:9] + ws[10:]]
            a = _ms(lambda: _C.convnext_block_backward(gy, x, ws, 1e-6, False, gs, None, 1e-6, 0, None), reps)
            b = _ms(lambda: _C.convnext_block_backward(gy, x, ws, 1e-6, False, gs, None, 1e-6, 0, stats), reps)
            print(f"N={n} {h}x{h} C={c}: backward recomputing the GRN sums {a:.2f} ms, "
                  f"with the saved ones {b:.2f} ms ({a / b:.2f}x)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(STAGES), default="inception_next")
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--grn", action="store_true", help="with GRN (UniRepLKNet's MLP)")
    p.add_argument("--core", action="store_true", help="also time the tiled MLP's core calls")
    p.add_argument("--convnext-v2", action="store_true", help="the ConvNeXt-V2 block backward instead")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--malloc", choices=["pinned", "system"], default="pinned")
    a = p.parse_args()
    import fastvis
    from fastvis.bench import pin_malloc
    from fastvis.bench.timing import gemm_line
    if a.malloc == "pinned":
        print(pin_malloc())
    print(f"fastvis {fastvis.__version__}, {fastvis.get_num_threads()} thread(s); {gemm_line()}")
    if a.convnext_v2:
        convnext_v2(a.batch, a.reps)
    else:
        mlp_paths(a.model, a.batch, a.grn, a.core, a.reps, a.rounds)


if __name__ == "__main__":
    main()
