"""fastvis bench block: the fused ConvNeXt block against the same block in PyTorch.

For each stage shape of a ConvNeXt (default: ConvNeXt-T's four stages, C = 96/192/384/768
at 56/28/14/7 pixels for a 224x224 image, kernel 7, hidden = 4C, layer scale on), times
in the same run, interleaved:

* fastvis: ``fastvis.ops.convnext_block`` (one fused op, forward and backward);
* eager: the block as timm computes it (``convnext_block_reference``: conv2d,
  permute, layer_norm, linear, GELU, linear, scale, residual) in PyTorch eager mode;
* compile: that PyTorch block under ``torch.compile`` (inductor).

Passes: inference (forward under ``torch.no_grad``) and a training step (forward +
backward w.r.t. the input and every parameter). Also reported: the activation memory a
training step keeps for the backward pass (bytes of the tensors autograd saves, minus the
parameters), fastvis against eager.

Ratios are eager/fastvis and compile/fastvis (> 1: fastvis is faster), from the medians of
interleaved blocks; only ratios from one run are meaningful on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

from . import print_table, table_format_choices
from .timing import gemm_line, measure_interleaved

HELP = "the fused ConvNeXt block vs the same block in PyTorch eager and torch.compile"

# (channels, spatial size) of ConvNeXt-T's stages at 224x224.
DEFAULT_STAGES = ["96x56", "192x28", "384x14", "768x7"]
DEFAULT_BATCH = [1, 8]


def _stage(s: str) -> Tuple[int, int]:
    try:
        c, hw = s.lower().split("x")
        c, hw = int(c), int(hw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxS (channels x spatial size), got {s!r}") from None
    if c < 1 or hw < 1:
        raise argparse.ArgumentTypeError(f"channels and size must be positive, got {s!r}")
    return c, hw


def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _pos_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def add_measure_arguments(p: argparse.ArgumentParser, quick_help: str, max_time: float = 2.0) -> None:
    """The "how to measure" options of the benchmarks built on measure_interleaved (block,
    mlp, model)."""
    g = p.add_argument_group("how to measure")
    g.add_argument("--threads", type=_pos_int, default=None,
                   help="threads for every candidate, fastvis and PyTorch alike "
                        "(default: torch.get_num_threads())")
    g.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate (default: 2)")
    g.add_argument("--repeat", type=_pos_int, default=7, help="timed blocks per candidate (default: 7)")
    g.add_argument("--max-time", type=_pos_float, default=max_time,
                   help=f"seconds of timed blocks per candidate and case, at least 3 blocks "
                        f"(default: {max_time:g})")
    g.add_argument("--quick", action="store_true", help=quick_help)


def add_shape_arguments(g, what: str, stages: List[str], batches: List[int]) -> None:
    """--stages and --batch of the op-level benchmarks (block, mlp), into group g."""
    g.add_argument("--stages", nargs="+", type=_stage, metavar="CxS", default=None,
                   help=f"{what}, channels x spatial size (default: {' '.join(stages)})")
    g.add_argument("--batch", nargs="+", type=_pos_int, metavar="N", default=None,
                   help=f"batch sizes (default: {' '.join(map(str, batches))})")


def add_output_arguments(p: argparse.ArgumentParser, json_option: bool = True) -> None:
    g = p.add_argument_group("output")
    if json_option:
        g.add_argument("--json", default=None, metavar="PATH", help="also save all samples as JSON")
    g.add_argument("--format", choices=table_format_choices(), default="auto")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to measure")
    add_shape_arguments(g, "stage shapes", DEFAULT_STAGES, DEFAULT_BATCH)
    g.add_argument("--kernel", type=int, default=7, help="depthwise kernel size, odd (default: 7)")
    g.add_argument("--v2", action="store_true", help="ConvNeXt-V2 blocks (GRN, no layer scale)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    g.add_argument("--no-backward", action="store_true", help="inference only")
    g.add_argument("--profile", action="store_true",
                   help="also print where fastvis' time goes: wall time per phase of the tile "
                        "loop (dwconv, LayerNorm, fc1, GELU, fc2, ...), summed over threads")
    add_measure_arguments(p, "one small stage, batch 1, few repeats")
    add_output_arguments(p)


@dataclass
class Result:
    c: int
    hw: int
    n: int
    pass_: str
    median_ms: Dict[str, float] = field(default_factory=dict)
    min_ms: Dict[str, float] = field(default_factory=dict)
    saved_mb: Dict[str, float] = field(default_factory=dict)
    max_err: float = math.nan
    errors: Dict[str, str] = field(default_factory=dict)
    gflop: float = math.nan  # model FLOPs of one call (training: 3x the forward)
    profile: Dict[str, Tuple[float, int]] = field(default_factory=dict)


def _params(c: int, k: int, v2: bool, dtype):
    import torch

    hid = 4 * c
    g = torch.Generator().manual_seed(0)

    def r(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    p = dict(dw_weight=r(c, 1, k, k, std=0.1), dw_bias=r(c, std=0.1), norm_weight=1 + r(c, std=0.1),
             norm_bias=r(c, std=0.1), fc1_weight=r(hid, c, std=c ** -0.5), fc1_bias=r(hid, std=0.1),
             fc2_weight=r(c, hid, std=hid ** -0.5), fc2_bias=r(c, std=0.1))
    if v2:
        p.update(grn_weight=r(hid, std=0.1), grn_bias=r(hid, std=0.1))
    else:
        p["gamma"] = r(c, std=0.1)
    return {k_: v.requires_grad_() for k_, v in p.items()}


def pass_fn(f, pas: str, x, xg, params):
    """The timed callable of one pass of candidate f: "inference" runs f(x) under no_grad,
    "training" runs f(xg) and the gradients of xg and params (the same for every candidate,
    so each one's own backward is timed)."""
    import torch

    if pas == "inference":
        def call():
            with torch.no_grad():
                return f(x)
    else:
        def call():
            y = f(xg)
            return torch.autograd.grad(y, [xg] + list(params), torch.ones_like(y))
    return call


def _saved_bytes(fn, params) -> float:
    """MB of the tensors autograd saves for the backward of fn(), parameters excluded."""
    import torch

    skip = {t.data_ptr() for t in params}
    seen = set()
    total = 0

    def pack(t):
        nonlocal total
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.data_ptr() not in skip and key not in seen and t.numel() > 0:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    return total / 2 ** 20


def run(args: argparse.Namespace) -> int:
    import torch

    import fastvis
    from ..cli import CommandError
    from ..ops.convnext_block import convnext_block, convnext_block_reference

    if fastvis.reference_enabled():
        raise CommandError("fastvis.use_reference() is on: the benchmark would time the reference")
    if args.kernel < 1 or args.kernel % 2 == 0 or args.kernel > 31:
        raise CommandError(f"--kernel: expected an odd size 1..31, got {args.kernel}")
    stages = args.stages or [_stage(s) for s in DEFAULT_STAGES]
    batches = args.batch or DEFAULT_BATCH
    repeat, max_time, warmup = args.repeat, args.max_time, args.warmup
    if args.quick:
        stages, batches, repeat, max_time, warmup = [(32, 14)], [1], 3, 0.3, 1
    dtype = getattr(torch, args.dtype)
    threads = args.threads or torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    fastvis.set_num_threads(threads)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    passes = ["inference"] + ([] if args.no_backward else ["training"])
    results: List[Result] = []
    from .timing import core_sgemm_name, core_sgemm_rate
    sgemm = core_sgemm_rate()[0] * threads
    say(f"block: {len(stages)} stage(s) x {len(batches)} batch size(s) x {len(passes)} pass(es), "
        f"{args.dtype}, {threads} thread(s)")
    interrupted = False
    try:
        for (c, hw) in stages:
            params = _params(c, args.kernel, args.v2, dtype)
            plist = list(params.values())
            for n in batches:
                x = torch.randn(n, c, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
                xg = x.clone().requires_grad_()

                def fused(inp):
                    return convnext_block(inp, **params)

                def eager(inp):
                    return convnext_block_reference(inp, **params)

                cands: Dict[str, Callable] = {"fastvis": fused, "eager": eager}
                if not args.no_compile:
                    cands["compile"] = torch.compile(eager, dynamic=False)
                for pas in passes:
                    res = Result(c, hw, n, pas)
                    fns = {}
                    for name, f in cands.items():
                        call = pass_fn(f, pas, x, xg, plist)
                        try:
                            call()
                            fns[name] = call
                        except Exception as e:  # report, keep going
                            res.errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    with torch.no_grad():
                        a = fused(x).double()
                        b = eager(x).double()
                        res.max_err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    say(f"  C={c} {hw}x{hw} N={n} {pas}: timing {', '.join(fns)}")
                    st = measure_interleaved(fns, warmup=warmup, repeat=repeat, max_time=max_time)
                    for name, s in st.items():
                        res.median_ms[name] = s.median * 1e3
                        res.min_ms[name] = s.min * 1e3
                    hid = 4 * c
                    fwd_flop = n * hw * hw * (4.0 * c * hid + 2.0 * args.kernel ** 2 * c)
                    res.gflop = (fwd_flop if pas == "inference" else 3 * fwd_flop) * 1e-9
                    if args.profile and "fastvis" in fns:
                        from .. import _C
                        _C.profile_reset()
                        _C.profile_enable(True)
                        try:
                            for _ in range(3):
                                fns["fastvis"]()
                        finally:
                            _C.profile_enable(False)
                        res.profile = {k_: (v[0] / 3, v[1] // 3) for k_, v in _C.profile_read().items()}
                    if pas == "training":
                        for name, f in (("fastvis", fused), ("eager", eager)):
                            res.saved_mb[name] = _saved_bytes(lambda f=f: f(xg), plist)
                    results.append(res)
    except KeyboardInterrupt:
        interrupted = True
        say(f"interrupted: reporting the {len(results)} measurement(s) done so far")
    finally:
        torch.set_num_threads(old_threads)
        fastvis.set_num_threads(0)

    print(f"fastvis {fastvis.__version__}, torch {torch.__version__}, {threads} thread(s), "
          f"{args.dtype}, kernel {args.kernel}, {'ConvNeXt-V2 (GRN)' if args.v2 else 'ConvNeXt (layer scale)'} blocks")
    print(gemm_line())
    print(f"sgemm ceiling: {sgemm:.0f} GFLOP/s ({threads} x one thread's {core_sgemm_name()} sgemm of "
          f"256x1536x384, measured in this run); GFLOP/s below count model FLOPs "
          f"(4*C*hidden + 2*k^2*C per pixel, training 3x)")
    for pas in passes:
        rows = []
        for r in results:
            if r.pass_ != pas:
                continue
            f = r.median_ms.get("fastvis", math.nan)
            gf = r.gflop / (f * 1e-3)
            row = [f"{r.c}", f"{r.hw}x{r.hw}", f"{r.n}", f"{f:.2f}", f"{gf:.1f}",
                   f"{100 * gf / sgemm:.0f}%",
                   f"{r.median_ms.get('eager', math.nan):.2f}",
                   f"{r.median_ms.get('eager', math.nan) / f:.2f}x"]
            if not args.no_compile:
                row += [f"{r.median_ms.get('compile', math.nan):.2f}",
                        f"{r.median_ms.get('compile', math.nan) / f:.2f}x"]
            if pas == "training":
                fe, ee = r.saved_mb.get("fastvis", math.nan), r.saved_mb.get("eager", math.nan)
                row += [f"{fe:.1f}", f"{ee:.1f}", f"{fe / ee:.2f}"]
            row += [f"{r.max_err:.1e}"]
            rows.append(row)
        header = ["C", "HxW", "N", "fastvis ms", "GFLOP/s", "of sgemm", "eager ms",
                  "eager/fastvis"]
        if not args.no_compile:
            header += ["compile ms", "compile/fastvis"]
        if pas == "training":
            header += ["saved MB fastvis", "saved MB eager", "saved ratio"]
        header += ["rel err"]
        print()
        print_table(f"ConvNeXt block, {pas} (median of interleaved blocks)", header, rows,
                    fmt=args.format, n_left=3)
    if args.profile:
        for pas in passes:
            phases = []
            for r in results:
                for k_ in r.profile:
                    if r.pass_ == pas and k_ not in phases:
                        phases.append(k_)
            rows = []
            for r in results:
                if r.pass_ != pas or not r.profile:
                    continue
                tot = sum(v[0] for v in r.profile.values())
                rows.append([f"{r.c}", f"{r.hw}x{r.hw}", f"{r.n}", f"{tot * 1e3:.1f}"] +
                            [f"{100 * r.profile[k_][0] / tot:.0f}%" if k_ in r.profile else "-"
                             for k_ in phases])
            print()
            print_table(f"Where fastvis' time goes, {pas}: thread-ms per call and share per phase",
                        ["C", "HxW", "N", "thread-ms"] + phases, rows, fmt=args.format, n_left=3)
    errs = [(r, k, v) for r in results for k, v in r.errors.items()]
    for r, k, v in errs:
        print(f"  C={r.c} N={r.n} {r.pass_}: {k} failed: {v}")
    if args.json:
        doc = {"benchmark": "block", "complete": not interrupted, "settings": vars(args) | {
            "stages": stages, "batch": batches}, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "results": [r.__dict__ for r in results]}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2, default=str)
    if interrupted:
        return 130
    return 1 if any(k == "fastvis" for _, k, _ in errs) else 0
