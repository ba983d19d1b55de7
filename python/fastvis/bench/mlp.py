"""fastvis bench mlp: fastvis.ops.mlp against the same MLP in PyTorch.

The token MLP of a block, ``fc2(GRN?(GELU(fc1(x))))`` on (N, H, W, C) tokens with hidden
= 4C: UniRepLKNet's (with GRN, the default; stage shapes of UniRepLKNet-T, C = 80/160/320/640
at 56/28/14/7) or InceptionNeXt's / ConvNeXt's (``--no-grn``). Times in the same run,
interleaved:

* fastvis: ``fastvis.ops.mlp`` (its tiled path keeps fc1's input only, its torch-GEMM
  path fc1's input and output; which one runs: ``fastvis.ops.mlp`` docstring);
* eager: ``fastvis.ops.mlp_reference`` (F.linear, F.gelu, the GRN formula, F.linear) in
  PyTorch eager mode, what the module-by-module block runs;
* compile: that reference under ``torch.compile`` (inductor).

Passes: a training step (forward + backward w.r.t. the tokens and every parameter) and
inference (forward under ``torch.no_grad``; the op runs the same GEMMs, so expect parity
there). Also reported: the activation memory autograd keeps (bytes of the saved tensors,
parameters excluded), fastvis against eager. Ratios are eager/fastvis and compile/fastvis
(> 1: fastvis is faster), from the medians of interleaved blocks.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List

from . import print_table
from .block import (_saved_bytes, _stage, add_measure_arguments, add_output_arguments,
                    add_shape_arguments, pass_fn)
from .timing import measure_interleaved

HELP = "fastvis.ops.mlp (fc1, GELU, GRN, fc2 with little activation memory) vs PyTorch"

DEFAULT_STAGES = ["80x56", "160x28", "320x14", "640x7"]
DEFAULT_BATCH = [1, 8]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to measure")
    add_shape_arguments(g, "token shapes", DEFAULT_STAGES, DEFAULT_BATCH)
    g.add_argument("--no-grn", action="store_true", help="no GRN (InceptionNeXt's / ConvNeXt's MLP)")
    g.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    g.add_argument("--no-inference", action="store_true", help="training step only")
    add_measure_arguments(p, "one small shape, batch 1, few repeats")
    add_output_arguments(p, json_option=False)


def run(args: argparse.Namespace) -> int:
    import torch

    import fastvis
    from ..cli import CommandError
    from ..ops.mlp import mlp, mlp_reference

    if fastvis.reference_enabled():
        raise CommandError("fastvis.use_reference() is on: the benchmark would time the reference")
    stages = args.stages or [_stage(s) for s in DEFAULT_STAGES]
    batches = args.batch or DEFAULT_BATCH
    repeat, max_time, warmup = args.repeat, args.max_time, args.warmup
    if args.quick:
        stages, batches, repeat, max_time, warmup = [(16, 8)], [1], 3, 0.2, 1
    threads = args.threads or torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    fastvis.set_num_threads(threads)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    passes = ["training"] + ([] if args.no_inference else ["inference"])
    rows: Dict[str, List[List[str]]] = {p_: [] for p_ in passes}
    failed = False
    from ..ops.mlp import mlp_path
    try:
        for c, hw in stages:
            hid = 4 * c
            gen = torch.Generator().manual_seed(0)

            def r(*shape, std=1.0):
                return (torch.randn(*shape, generator=gen) * std).requires_grad_()

            params = dict(fc1_weight=r(hid, c, std=c ** -0.5), fc1_bias=r(hid, std=0.1),
                          fc2_weight=r(c, hid, std=hid ** -0.5), fc2_bias=None if not args.no_grn else r(c, std=0.1),
                          grn_weight=None if args.no_grn else r(hid, std=0.1),
                          grn_bias=None if args.no_grn else r(hid, std=0.1))
            plist = [t for t in params.values() if t is not None]

            def call(fn, inp, params=params):
                return fn(inp, params["fc1_weight"], params["fc1_bias"], params["fc2_weight"],
                          params["fc2_bias"], grn_weight=params["grn_weight"], grn_bias=params["grn_bias"])

            cands: Dict[str, Callable] = {"fastvis": lambda inp: call(mlp, inp),
                                          "eager": lambda inp: call(mlp_reference, inp)}
            if not args.no_compile:
                cands["compile"] = torch.compile(lambda inp: call(mlp_reference, inp), dynamic=False)
            for n in batches:
                x = torch.randn(n, hw, hw, c, generator=gen)
                xg = x.clone().requires_grad_()
                for pas in passes:
                    fns = {name: pass_fn(f, pas, x, xg, plist) for name, f in cands.items()}
                    say(f"  C={c} {hw}x{hw} N={n} {pas}: timing {', '.join(fns)}")
                    st = measure_interleaved(fns, warmup=warmup, repeat=repeat, max_time=max_time)
                    ms = {k: s.median * 1e3 for k, s in st.items()}
                    f = ms["fastvis"]
                    with torch.no_grad():
                        a, b = cands["fastvis"](x).double(), cands["eager"](x).double()
                        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    path = mlp_path(x, params["fc1_weight"], params["fc2_weight"], params["grn_weight"])
                    row = [f"{c}", f"{hw}x{hw}", f"{n}", path, f"{f:.2f}", f"{ms['eager']:.2f}",
                           f"{ms['eager'] / f:.2f}x"]
                    if "compile" in ms:
                        row += [f"{ms['compile']:.2f}", f"{ms['compile'] / f:.2f}x"]
                    if pas == "training":
                        fe = _saved_bytes(lambda: cands["fastvis"](xg), plist)
                        ee = _saved_bytes(lambda: cands["eager"](xg), plist)
                        row += [f"{fe:.1f}", f"{ee:.1f}", f"{fe / ee:.2f}"]
                    rows[pas].append(row + [f"{err:.1e}"])
    except KeyboardInterrupt:
        say("interrupted: reporting the measurements done so far")
        failed = True
    finally:
        torch.set_num_threads(old_threads)
        fastvis.set_num_threads(0)
    kind = "fc1, GELU, fc2" if args.no_grn else "fc1, GELU, GRN, fc2"
    print(f"fastvis {fastvis.__version__}, torch {torch.__version__}, {threads} thread(s), float32, "
          f"token MLP ({kind}), hidden = 4C")
    from .timing import gemm_line
    names = {"tiled": "the core's tiled MLP (fastvis/mlp.h)",
             "onednn": "torch GEMMs on oneDNN 1x1 convolutions", "mm": "torch GEMMs (F.linear / mm)"}
    print(f"fastvis path per shape (fastvis.ops.mlp.mlp_path): {', '.join(f'{k}: {v}' for k, v in names.items())}; "
          f"{gemm_line()}")
    for pas in passes:
        header = ["C", "HxW", "N", "fastvis path", "fastvis ms", "eager ms", "eager/fastvis"]
        if not args.no_compile:
            header += ["compile ms", "compile/fastvis"]
        if pas == "training":
            header += ["saved MB fastvis", "saved MB eager", "saved ratio"]
        header += ["rel err"]
        print()
        title = "training step (forward + backward)" if pas == "training" else "inference"
        print_table(f"Token MLP, {title}, median of interleaved blocks", header, rows[pas],
                    fmt=args.format, n_left=4)
    return 130 if failed else 0
