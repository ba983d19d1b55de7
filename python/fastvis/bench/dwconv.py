"""Depthwise conv2d: fastvis against PyTorch eager and torch.compile, in the same run.

For each shape and kernel (square k x k and bands 1 x k / k x 1), "same" padding, stride 1:

  forward          y = conv(x, w) + b                         (under torch.no_grad())
  forward+backward y = conv(x, w) + b, then grads of x, w and b (torch.autograd.grad)

of these candidates, all on the same data:

  fastvis       fastvis.ops.depthwise_conv2d on a channels_last input (its native layout)
  eager NCHW    torch.nn.functional.conv2d(groups=C) on a contiguous NCHW input
  eager CL      the same on a channels_last input
  compile       torch.compile(fullgraph=True, dynamic=False) of that F.conv2d, per layout

The candidates of one case are timed interleaved (see fastvis.bench.timing): times are the
median over blocks (the minimum is reported too), and the speed-ups are
PyTorch median / fastvis median, against the faster eager layout and the faster compiled
layout. Absolute CPU times on a shared machine are noise; the ratios are the result.
GFLOP/s counts 2*N*C*OH*OW*kh*kw flops for the forward and three times that for
forward+backward. fastvis's outputs and gradients are checked against eager PyTorch once
per case; a mismatch is flagged in the table and fails the command.

``--dilated-reparam`` measures instead the fused multi-branch depthwise conv + BatchNorm
(fastvis.ops.dilated_reparam_conv: UniRepLKNet's dilated re-param block, k=13 branch table)
at unireplknet_t's stage shapes, against the separate F.conv2d + F.batch_norm per branch
(eager NCHW / channels_last, and torch.compile of that), in training mode (forward, and
forward + backward of x, the weights, gammas and betas) and eval mode (forward).
With ``--op inception``: InceptionNeXt's token mixer (timm's InceptionDWConv2d: identity |
3x3 | 1x11 | 11x1 on channel groups of g = C/8), at InceptionNeXt-tiny's stage shapes
(C = 96, 192, 384, 768 at 56, 28, 14, 7; batch 1 and 8) unless --channels / --size are
given. Candidates: fastvis.ops.inception_depthwise_conv2d (one fused op, channels_last),
eager PyTorch's split + three depthwise F.conv2d + cat (NCHW and channels_last) and
torch.compile of that composition.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import print_table, table_format_choices
from .timing import Stats, Timer, measure_interleaved

HELP = "depthwise conv2d (k x k and band kernels) vs PyTorch eager and torch.compile"

DEFAULT_KERNELS = "3,5,7,13,31,51,1x11,11x1"
DEFAULT_BATCH = "8,1"
DEFAULT_CHANNELS = "128"
DEFAULT_SIZE = "56"
DEFAULT_WARMUP = 3
DEFAULT_REPEAT = 10
DEFAULT_MAX_TIME = 10.0  # seconds of timed blocks per candidate and case, at most
DEFAULT_BLOCK_TIME = 0.01  # seconds: short calls are repeated until a block is this long

# --quick: a tiny run, for smoke tests (explicit options still win).
QUICK_KERNELS = "3,7,1x11"
QUICK_BATCH = "1"
QUICK_WARMUP = 1
QUICK_REPEAT = 3
QUICK_MAX_TIME = 0.5
QUICK_BLOCK_TIME = 0.001

# --op inception: InceptionNeXt-tiny's stages (C x size) and its mixer's defaults.
INCEPTION_STAGES = "96x56,192x28,384x14,768x7"
INCEPTION_BATCH = "1,8"
INCEPTION_SQUARE, INCEPTION_BAND, INCEPTION_RATIO = 3, 11, 1 / 8

PASSES = ("fwd", "fwd+bwd")
PASS_TITLES = {"fwd": "Forward", "fwd+bwd": "Forward + backward (grads of x, weight, bias)"}
PASS_FLOP_FACTOR = {"fwd": 1, "fwd+bwd": 3}

# Candidates: key -> label. The keys are also the keys of the JSON output.
FASTVIS = "fastvis"
CORE = "fastvis_core"  # --core: the kernel alone, forward only
EAGER = {"nchw": "eager_nchw", "channels_last": "eager_cl"}
COMPILED = {"nchw": "compile_nchw", "channels_last": "compile_cl"}
LABELS = {
    FASTVIS: "fastvis (CL)",
    CORE: "fastvis core",
    "eager_nchw": "eager NCHW",
    "eager_cl": "eager CL",
    "compile_nchw": "compile NCHW",
    "compile_cl": "compile CL",
}

# Relative error (max |a - b| / max |b|) above which fastvis is reported as wrong.
# The reference is eager PyTorch in float32 on the same (for bfloat16: rounded) data.
CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


# --------------------------------------------------------------------------- arguments


def _split(values) -> List[str]:
    if isinstance(values, str):
        values = [values]
    return [tok for v in values for tok in v.replace(",", " ").split()]


def parse_kernels(values) -> List[Tuple[int, int]]:
    """"3,5,1x11" (or a list of such strings) -> [(3, 3), (5, 5), (1, 11)]."""
    out = []
    for tok in _split(values):
        parts = tok.lower().split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            dims = []
        if len(dims) not in (1, 2) or min(dims) < 1:
            raise argparse.ArgumentTypeError(
                f"invalid kernel size {tok!r}: expected K or KHxKW with positive integers, "
                f"e.g. 7 or 1x11")
        out.append((dims[0], dims[-1]))
    if not out:
        raise argparse.ArgumentTypeError("no kernel sizes given")
    return out


def parse_positive_ints(values, what: str) -> List[int]:
    out = []
    for tok in _split(values):
        try:
            v = int(tok)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"invalid {what} {tok!r}: expected a positive integer")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError(f"no {what} given")
    return out


def parse_sizes(values) -> List[Tuple[int, int]]:
    """"56,28x32" -> [(56, 56), (28, 32)] (height x width)."""
    out = []
    for tok in _split(values):
        parts = tok.lower().split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            dims = []
        if len(dims) not in (1, 2) or min(dims) < 1:
            raise argparse.ArgumentTypeError(
                f"invalid size {tok!r}: expected S or HxW with positive integers, e.g. 56 or 28x32")
        out.append((dims[0], dims[-1]))
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def _type(fn, *extra):
    """An argparse `type` from a parser of comma lists (argparse reports its error text)."""

    def convert(s):
        return fn(s, *extra)

    convert.__name__ = getattr(fn, "__name__", "value")
    return convert


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"invalid value {s!r}: expected an integer >= 0")
    return v


def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"invalid value {s!r}: expected a positive integer")
    return v


def _pos_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"invalid value {s!r}: expected a positive number")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to measure")
    g.add_argument("--op", choices=("dwconv", "inception"), default="dwconv",
                   help="dwconv: depthwise_conv2d per kernel size (default); inception: the "
                        "fused Inception depthwise op (InceptionNeXt-tiny stage shapes, "
                        f"{INCEPTION_STAGES}, batch {INCEPTION_BATCH}; --kernels is ignored)")
    g.add_argument("--kernels", nargs="+", type=_type(parse_kernels), metavar="K",
                   help=f"kernel sizes, K (square) or KHxKW, comma or space separated "
                        f"(default: {DEFAULT_KERNELS}; with --quick: {QUICK_KERNELS})")
    g.add_argument("--batch", nargs="+", type=_type(parse_positive_ints, "batch size"),
                   metavar="N", help=f"batch sizes (default: {DEFAULT_BATCH}; "
                                     f"with --quick: {QUICK_BATCH})")
    g.add_argument("--channels", nargs="+", type=_type(parse_positive_ints, "channel count"),
                   metavar="C", help=f"channel counts (default: {DEFAULT_CHANNELS})")
    g.add_argument("--size", nargs="+", type=_type(parse_sizes), metavar="HxW",
                   help=f"spatial sizes, S or HxW (default: {DEFAULT_SIZE})")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="data type (default: float32)")
    g.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    g.add_argument("--compile-layout", choices=("both", "nchw", "channels_last"),
                   default="both", help="input layouts to torch.compile (default: both)")
    g.add_argument("--no-backward", action="store_true",
                   help="measure the forward pass only")
    g.add_argument("--core", action="store_true",
                   help="also time the forward kernel alone: fastvis._C.dwconv_forward into an "
                        "output and scratch allocated once, no Python op around it (a 'core ms' "
                        "column; the difference to 'fastvis ms' is per-call overhead and the "
                        "fresh output's cold cache lines)")
    g.add_argument("--dilated-reparam", action="store_true",
                   help="measure the fused multi-branch conv + BatchNorm op (UniRepLKNet k=13 "
                        "branches at unireplknet_t stage shapes) instead of the plain "
                        "convolution; --batch, --dtype float32, --no-compile, --no-backward "
                        "and the timing options apply")

    g = p.add_argument_group("how to measure")
    g.add_argument("--threads", type=_pos_int, default=None, metavar="N",
                   help="threads for fastvis and PyTorch alike "
                        "(default: torch.get_num_threads())")
    g.add_argument("--warmup", type=_nonneg_int, default=None, metavar="N",
                   help=f"untimed calls per candidate before timing (default: {DEFAULT_WARMUP}; "
                        f"with --quick: {QUICK_WARMUP})")
    g.add_argument("--repeat", type=_pos_int, default=None, metavar="N",
                   help=f"timed blocks per candidate; the median is reported, and the min "
                        f"(default: {DEFAULT_REPEAT}; with --quick: {QUICK_REPEAT})")
    g.add_argument("--max-time", type=_pos_float, default=None, metavar="SECONDS",
                   help=f"a slow candidate gets fewer blocks (at least 3) so that its timed "
                        f"blocks take about this long per case (default: {DEFAULT_MAX_TIME:g})")
    g.add_argument("--quick", action="store_true",
                   help="a tiny, fast run for smoke tests: few repeats and a subset of cases")

    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", default=None,
                   help="also save the settings, environment and all samples as JSON")
    g.add_argument("--format", choices=table_format_choices(), default="auto",
                   help="table format: auto (rich if installed, else text), rich, text, "
                        "markdown (default: auto)")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress messages on stderr")


# ------------------------------------------------------------------------------ settings


@dataclass
class Settings:
    kernels: List[Tuple[int, int]]
    batch: List[int]
    channels: List[int]
    sizes: List[Tuple[int, int]]
    dtype: str = "float32"
    passes: Tuple[str, ...] = PASSES
    compile_layouts: Tuple[str, ...] = ("nchw", "channels_last")  # empty: no torch.compile
    threads: int = 1
    warmup: int = DEFAULT_WARMUP
    repeat: int = DEFAULT_REPEAT
    max_time: float = DEFAULT_MAX_TIME
    min_block_time: float = DEFAULT_BLOCK_TIME
    seed: int = 0
    op: str = "dwconv"
    core: bool = False  # also time the forward kernel alone (CORE)
    stages: List[Tuple[int, int]] = field(default_factory=list)  # inception: (C, size) pairs

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        def flat(v):
            return [x for group in v for x in group]

        q = args.quick
        op = getattr(args, "op", "dwconv")
        if op == "inception":
            batch = [x for group in args.batch for x in group] if args.batch else parse_positive_ints(
                INCEPTION_BATCH, "batch size")
            if args.channels or args.size:
                chans = [x for group in args.channels for x in group] if args.channels else [96]
                sizes_ = [x for group in args.size for x in group] if args.size else [(56, 56)]
                stages = [(c, hw) for hw in sizes_ for c in chans]
            else:
                stages = [(c, (hw, hw)) for c, hw in
                          (tuple(int(v) for v in t.split("x")) for t in INCEPTION_STAGES.split(","))]
        kernels = flat(args.kernels) if args.kernels else parse_kernels(
            QUICK_KERNELS if q else DEFAULT_KERNELS)
        batch = flat(args.batch) if args.batch else parse_positive_ints(
            QUICK_BATCH if q else DEFAULT_BATCH, "batch size")
        channels = flat(args.channels) if args.channels else parse_positive_ints(
            DEFAULT_CHANNELS, "channel count")
        sizes = flat(args.size) if args.size else parse_sizes(DEFAULT_SIZE)
        if args.no_compile:
            layouts: Tuple[str, ...] = ()
        elif args.compile_layout == "both":
            layouts = ("nchw", "channels_last")
        else:
            layouts = (args.compile_layout,)

        def pick(v, normal, quick):
            return v if v is not None else (quick if q else normal)

        if op == "inception":
            if getattr(args, "core", False):
                raise ValueError("--core applies to the plain depthwise convolution, not --op inception")
            return cls(
                kernels=[(INCEPTION_SQUARE, INCEPTION_BAND)], batch=batch,
                channels=sorted({c for c, _ in stages}), sizes=sorted({hw for _, hw in stages}),
                dtype=args.dtype, passes=("fwd",) if args.no_backward else PASSES,
                compile_layouts=layouts,
                threads=args.threads if args.threads is not None else torch.get_num_threads(),
                warmup=pick(args.warmup, DEFAULT_WARMUP, QUICK_WARMUP),
                repeat=pick(args.repeat, DEFAULT_REPEAT, QUICK_REPEAT),
                max_time=pick(args.max_time, DEFAULT_MAX_TIME, QUICK_MAX_TIME),
                min_block_time=QUICK_BLOCK_TIME if q else DEFAULT_BLOCK_TIME,
                op=op, stages=[(c, hw) for c, hw in stages],
            )
        return cls(
            kernels=kernels, batch=batch, channels=channels, sizes=sizes, dtype=args.dtype,
            passes=("fwd",) if args.no_backward else PASSES,
            compile_layouts=layouts,
            threads=args.threads if args.threads is not None else torch.get_num_threads(),
            warmup=pick(args.warmup, DEFAULT_WARMUP, QUICK_WARMUP),
            repeat=pick(args.repeat, DEFAULT_REPEAT, QUICK_REPEAT),
            max_time=pick(args.max_time, DEFAULT_MAX_TIME, QUICK_MAX_TIME),
            min_block_time=QUICK_BLOCK_TIME if q else DEFAULT_BLOCK_TIME,
            core=bool(getattr(args, "core", False)),
        )

    def cases(self) -> List["Case"]:
        if self.op == "inception":
            return [Case(n, c, h, w, INCEPTION_SQUARE, INCEPTION_BAND, op="inception",
                         g=int(c * INCEPTION_RATIO))
                    for (c, (h, w)) in self.stages for n in self.batch]
        return [Case(n, c, h, w, kh, kw)
                for (h, w) in self.sizes for c in self.channels for n in self.batch
                for (kh, kw) in self.kernels]

    def to_dict(self) -> dict:
        if self.op == "inception":
            return {
                "op": "inception", "stages": [f"C={c} {h}x{w}" for c, (h, w) in self.stages],
                "square": INCEPTION_SQUARE, "band": INCEPTION_BAND, "branch_ratio": INCEPTION_RATIO,
                "batch": self.batch, "dtype": self.dtype, "passes": list(self.passes),
                "fastvis_layout": "channels_last", "compile_layouts": list(self.compile_layouts),
                "threads": self.threads, "warmup": self.warmup, "repeat": self.repeat,
                "max_time": self.max_time, "min_block_time": self.min_block_time, "seed": self.seed,
            }
        return {
            "kernels": [f"{kh}x{kw}" for kh, kw in self.kernels],
            "batch": self.batch, "channels": self.channels,
            "sizes": [f"{h}x{w}" for h, w in self.sizes],
            "dtype": self.dtype, "passes": list(self.passes),
            "padding": "same", "stride": 1, "dilation": 1, "bias": True,
            "fastvis_layout": "channels_last",
            "compile_layouts": list(self.compile_layouts),
            "threads": self.threads, "warmup": self.warmup, "repeat": self.repeat,
            "max_time": self.max_time, "min_block_time": self.min_block_time,
            "seed": self.seed, "core": self.core,
        }


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    op: str = "dwconv"  # "inception": kh = square kernel, kw = band length
    g: int = 0          # inception: channels per branch

    @property
    def shape(self) -> str:
        return f"N={self.n} C={self.c} {self.h}x{self.w}"

    @property
    def kernel(self) -> str:
        if self.op == "inception":
            return f"{self.kh}x{self.kh}+1x{self.kw}+{self.kw}x1 g={self.g}"
        return f"{self.kh}x{self.kw}"

    def flops(self, pass_: str) -> float:
        if self.op == "inception":  # three depthwise branches of g channels
            taps = self.kh * self.kh + 2 * self.kw
            return 2.0 * self.n * self.g * self.h * self.w * taps * PASS_FLOP_FACTOR[pass_]
        # "same" padding, stride 1: the output is as large as the input.
        return 2.0 * self.n * self.c * self.h * self.w * self.kh * self.kw * PASS_FLOP_FACTOR[pass_]


@dataclass
class Result:
    case: Case
    pass_: str
    stats: Dict[str, Stats] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)
    first_call_seconds: Dict[str, float] = field(default_factory=dict)  # compile time incl.
    max_rel_err: Optional[float] = None
    check_ok: Optional[bool] = None

    def median(self, key: str) -> float:
        st = self.stats.get(key)
        return st.median if st is not None and st.samples else math.nan

    def best(self, keys: Sequence[str]) -> Tuple[Optional[str], float]:
        got = [(self.median(k), k) for k in keys if not math.isnan(self.median(k))]
        if not got:
            return None, math.nan
        t, k = min(got)
        return k, t

    def speedup(self, keys: Sequence[str]) -> float:
        _, t = self.best(keys)
        f = self.median(FASTVIS)
        return t / f if f > 0 and not math.isnan(t) else math.nan

    @property
    def speedup_vs_eager(self) -> float:
        return self.speedup(list(EAGER.values()))

    @property
    def speedup_vs_compile(self) -> float:
        return self.speedup(list(COMPILED.values()))

    @property
    def gflops(self) -> float:
        f = self.median(FASTVIS)
        return self.case.flops(self.pass_) / f / 1e9 if f > 0 else math.nan

    def to_dict(self) -> dict:
        c = self.case
        best_eager, _ = self.best(list(EAGER.values()))
        best_compiled, _ = self.best(list(COMPILED.values()))
        return {
            "n": c.n, "c": c.c, "h": c.h, "w": c.w, "kh": c.kh, "kw": c.kw,
            "pass": self.pass_, "flops": c.flops(self.pass_),
            "times": {k: st.to_dict() for k, st in self.stats.items()},
            "errors": dict(self.errors),
            "first_call_seconds": dict(self.first_call_seconds),
            "best_eager": best_eager, "best_compiled": best_compiled,
            "speedup_vs_eager": _none_if_nan(self.speedup_vs_eager),
            "speedup_vs_compile": _none_if_nan(self.speedup_vs_compile),
            "fastvis_gflops": _none_if_nan(self.gflops),
            "check": {"max_rel_err": self.max_rel_err, "ok": self.check_ok},
        }


def _none_if_nan(v: float) -> Optional[float]:
    return None if v is None or math.isnan(v) else v


# ---------------------------------------------------------------------------- measuring


def _torch_conv(x, w, b):
    return F.conv2d(x, w, b, stride=1, padding="same", dilation=1, groups=x.shape[1])


def _reference(x, w, b, gy, backward: bool) -> tuple:
    """Eager PyTorch in float32, NCHW: (y,) or (y, grad_x, grad_w, grad_b)."""
    x, w, b = (t.detach().float().contiguous().requires_grad_(backward) for t in (x, w, b))
    with torch.set_grad_enabled(backward):
        y = _torch_conv(x, w, b)
        if not backward:
            return (y,)
        return (y,) + torch.autograd.grad(y, (x, w, b), gy.float().contiguous())


def _rel_err(a, b) -> float:
    a = a.detach().double()
    b = b.detach().double()
    if a.shape != b.shape:
        return math.inf
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    return err / scale if scale > 0 else err


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _quiet_same_padding_warning():
    # PyTorch warns that "same" padding with an even kernel copies the input; that copy is
    # part of what PyTorch costs, and the warning would repeat for every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*padding='same'.*")
        yield


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            el = time.perf_counter() - self.t0
            print(f"[{el:7.1f}s] {msg}", file=sys.stderr, flush=True)


def run_case(case: Case, s: Settings, dw: Callable, progress: Callable[[str], None],
             label: str = "", results: Optional[List[Result]] = None) -> List[Result]:
    """Measures one case (every pass, every candidate): one Result per pass, each appended
    to ``results`` as soon as it is complete (so an interrupt keeps the finished ones)."""
    dtype = getattr(torch, s.dtype)
    gen = torch.Generator().manual_seed(s.seed)
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen).to(dtype)
    w = (torch.randn(case.c, 1, case.kh, case.kw, generator=gen)
         / math.sqrt(case.kh * case.kw)).to(dtype)
    b = torch.randn(case.c, generator=gen).to(dtype)
    gy = torch.randn(case.n, case.c, case.h, case.w, generator=gen).to(dtype)
    cl = torch.channels_last
    inputs = {"nchw": x.contiguous(), "channels_last": x.contiguous(memory_format=cl)}
    grads_out = {"nchw": gy.contiguous(), "channels_last": gy.contiguous(memory_format=cl)}

    # (function, layout) per candidate.
    cands: Dict[str, Tuple[Callable, str]] = {
        FASTVIS: (lambda x_, w_, b_: dw(x_, w_, b_, stride=1, padding="same"), "channels_last"),
        EAGER["nchw"]: (_torch_conv, "nchw"),
        EAGER["channels_last"]: (_torch_conv, "channels_last"),
    }
    if s.compile_layouts:
        torch._dynamo.reset()  # fresh compile cache: each case compiles for its own shapes
        for layout in s.compile_layouts:
            cands[COMPILED[layout]] = (
                torch.compile(_torch_conv, fullgraph=True, dynamic=False), layout)

    results = [] if results is None else results
    for pass_ in s.passes:
        res = Result(case, pass_)
        tag = f"{label}{case.shape} k={case.kernel} {pass_}"
        backward = pass_ == "fwd+bwd"
        calls: Dict[str, Callable[[], object]] = {}
        outputs: Dict[str, object] = {}
        w_ = w.detach().requires_grad_(backward)
        b_ = b.detach().requires_grad_(backward)
        for key, (fn, layout) in cands.items():
            x_ = inputs[layout].detach().requires_grad_(backward)
            if backward:
                gy_ = grads_out[layout]

                def call(fn=fn, x_=x_, gy_=gy_):
                    y = fn(x_, w_, b_)
                    return (y,) + torch.autograd.grad(y, (x_, w_, b_), gy_)
            else:
                def call(fn=fn, x_=x_):
                    return fn(x_, w_, b_)
            # First call: catches failures, compiles torch.compile candidates, gives the
            # values for the correctness check.
            if key in COMPILED.values():
                progress(f"{tag}: compiling {LABELS[key]}")
            try:
                with torch.set_grad_enabled(backward), Timer() as t:
                    out = call()
            except Exception as e:  # reported in the table, the run goes on
                res.errors[key] = _one_line(e)
                progress(f"{tag}: {LABELS[key]} failed: {res.errors[key]}")
                continue
            res.first_call_seconds[key] = t.elapsed
            outputs[key] = out if isinstance(out, tuple) else (out,)
            calls[key] = call
        if s.core and not backward and FASTVIS in calls:
            try:
                calls[CORE] = _core_forward_call(inputs["channels_last"], w, b, case)
                if not torch.equal(calls[CORE](), outputs[FASTVIS][0]):
                    raise RuntimeError("the core call's output differs from the op's")
            except Exception as e:  # reported in the table, the run goes on
                calls.pop(CORE, None)
                res.errors[CORE] = _one_line(e)
                progress(f"{tag}: {LABELS[CORE]} failed: {res.errors[CORE]}")

        # Check fastvis against eager PyTorch in float32 (NCHW) on the same, rounded, data.
        ref = outputs.get(EAGER["nchw"]) if dtype == torch.float32 else None
        if FASTVIS in outputs and ref is None:
            try:
                ref = _reference(x, w, b, gy, backward)
            except Exception as e:
                progress(f"{tag}: no reference to check against: {_one_line(e)}")
        if FASTVIS in outputs and ref is not None:
            errs = [_rel_err(a, r) for a, r in zip(outputs[FASTVIS], ref)]
            if len(outputs[FASTVIS]) != len(ref):
                errs.append(math.inf)
            res.max_rel_err = max(errs)
            res.check_ok = res.max_rel_err <= CHECK_TOLERANCE[s.dtype]
            if not res.check_ok:
                progress(f"{tag}: WARNING fastvis differs from PyTorch "
                         f"(max relative error {res.max_rel_err:.3g})")
        outputs.clear()

        progress(f"{tag}: timing {', '.join(LABELS[k] for k in calls)}")
        with torch.set_grad_enabled(backward):
            res.stats = measure_interleaved(
                calls, warmup=s.warmup, repeat=s.repeat, min_block_time=s.min_block_time,
                max_time=s.max_time)
        results.append(res)
        if FASTVIS in res.stats:
            msg = f"fastvis {_fmt_ms(res.median(FASTVIS))} ms"
            if not math.isnan(res.speedup_vs_eager):
                msg += f", {_fmt_ratio(res.speedup_vs_eager)} vs eager"
            if not math.isnan(res.speedup_vs_compile):
                msg += f", {_fmt_ratio(res.speedup_vs_compile)} vs compile"
            progress(f"{tag}: {msg}")
    return results


def _core_forward_call(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, case: "Case") -> Callable:
    """A call of the core's forward kernel on x (channels_last) with padding "same", into an
    output and scratch allocated here once: what fastvis' op costs without its Python layer
    and without a fresh output."""
    from .. import _C
    from ..ops._bridge import dl
    from ..ops.depthwise_conv import normalize_conv_args

    stride, pads, dil = normalize_conv_args((case.kh, case.kw), 1, "same", 1)
    y = torch.empty_like(x)
    nbytes = _C.dwconv_forward_scratch_bytes(x, w, stride, pads, dil)
    scratch = torch.empty(max(int(nbytes), 1), dtype=torch.uint8)
    args = (dl(x), dl(w), dl(b), dl(y), stride, pads, dil, dl(scratch), 0)

    def call():
        _C.dwconv_forward(*args)
        return y
    return call


def _eager_inception(x, hw_w, hw_b, w_w, w_b, h_w, h_b):
    """timm's InceptionDWConv2d.forward: split, three depthwise F.conv2d, cat."""
    g, c = hw_w.shape[0], x.shape[1]
    kh, kb = hw_w.shape[-1], w_w.shape[-1]
    x_id, x_hw, x_w, x_h = torch.split(x, (c - 3 * g, g, g, g), dim=1)
    return torch.cat((x_id,
                      F.conv2d(x_hw, hw_w, hw_b, padding=kh // 2, groups=g),
                      F.conv2d(x_w, w_w, w_b, padding=(0, kb // 2), groups=g),
                      F.conv2d(x_h, h_w, h_b, padding=(kb // 2, 0), groups=g)), dim=1)


def run_inception_case(case: Case, s: Settings, op: Callable, progress: Callable[[str], None],
                       label: str = "", results: Optional[List[Result]] = None) -> List[Result]:
    """As run_case, for the Inception depthwise op (candidates take x and six parameters)."""
    dtype = getattr(torch, s.dtype)
    gen = torch.Generator().manual_seed(s.seed)
    g, k, kb = case.g, case.kh, case.kw
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen).to(dtype)
    params = [(torch.randn(g, 1, k, k, generator=gen) / k).to(dtype),
              torch.randn(g, generator=gen).to(dtype),
              (torch.randn(g, 1, 1, kb, generator=gen) / math.sqrt(kb)).to(dtype),
              torch.randn(g, generator=gen).to(dtype),
              (torch.randn(g, 1, kb, 1, generator=gen) / math.sqrt(kb)).to(dtype),
              torch.randn(g, generator=gen).to(dtype)]
    gy = torch.randn(case.n, case.c, case.h, case.w, generator=gen).to(dtype)
    cl = torch.channels_last
    inputs = {"nchw": x.contiguous(), "channels_last": x.contiguous(memory_format=cl)}
    grads_out = {"nchw": gy.contiguous(), "channels_last": gy.contiguous(memory_format=cl)}
    cands: Dict[str, Tuple[Callable, str]] = {
        FASTVIS: (op, "channels_last"),
        EAGER["nchw"]: (_eager_inception, "nchw"),
        EAGER["channels_last"]: (_eager_inception, "channels_last"),
    }
    if s.compile_layouts:
        torch._dynamo.reset()
        for layout in s.compile_layouts:
            cands[COMPILED[layout]] = (
                torch.compile(_eager_inception, fullgraph=True, dynamic=False), layout)

    results = [] if results is None else results
    for pass_ in s.passes:
        res = Result(case, pass_)
        tag = f"{label}{case.shape} {case.kernel} {pass_}"
        backward = pass_ == "fwd+bwd"
        calls: Dict[str, Callable[[], object]] = {}
        outputs: Dict[str, object] = {}
        ps = [p.detach().requires_grad_(backward) for p in params]
        for key, (fn, layout) in cands.items():
            x_ = inputs[layout].detach().requires_grad_(backward)
            if backward:
                gy_ = grads_out[layout]

                def call(fn=fn, x_=x_, gy_=gy_):
                    y = fn(x_, *ps)
                    return (y,) + torch.autograd.grad(y, [x_] + ps, gy_)
            else:
                def call(fn=fn, x_=x_):
                    return fn(x_, *ps)
            if key in COMPILED.values():
                progress(f"{tag}: compiling {LABELS[key]}")
            try:
                with torch.set_grad_enabled(backward), Timer() as t:
                    out = call()
            except Exception as e:
                res.errors[key] = _one_line(e)
                progress(f"{tag}: {LABELS[key]} failed: {res.errors[key]}")
                continue
            res.first_call_seconds[key] = t.elapsed
            outputs[key] = out if isinstance(out, tuple) else (out,)
            calls[key] = call

        # Check fastvis against eager PyTorch in float32 (NCHW) on the same, rounded, data.
        ref = outputs.get(EAGER["nchw"]) if dtype == torch.float32 else None
        if FASTVIS in outputs and ref is None:
            try:
                xr = x.detach().float().requires_grad_(backward)
                pr = [p.detach().float().requires_grad_(backward) for p in params]
                with torch.set_grad_enabled(backward):
                    y = _eager_inception(xr, *pr)
                    ref = (y,) + (torch.autograd.grad(y, [xr] + pr, gy.float()) if backward else ())
            except Exception as e:
                progress(f"{tag}: no reference to check against: {_one_line(e)}")
        if FASTVIS in outputs and ref is not None:
            errs = [_rel_err(a, r) for a, r in zip(outputs[FASTVIS], ref)]
            if len(outputs[FASTVIS]) != len(ref):
                errs.append(math.inf)
            res.max_rel_err = max(errs)
            res.check_ok = res.max_rel_err <= CHECK_TOLERANCE[s.dtype]
            if not res.check_ok:
                progress(f"{tag}: WARNING fastvis differs from PyTorch "
                         f"(max relative error {res.max_rel_err:.3g})")
        outputs.clear()

        progress(f"{tag}: timing {', '.join(LABELS[k] for k in calls)}")
        with torch.set_grad_enabled(backward):
            res.stats = measure_interleaved(
                calls, warmup=s.warmup, repeat=s.repeat, min_block_time=s.min_block_time,
                max_time=s.max_time)
        results.append(res)
        if FASTVIS in res.stats:
            msg = f"fastvis {_fmt_ms(res.median(FASTVIS))} ms"
            if not math.isnan(res.speedup_vs_eager):
                msg += f", {_fmt_ratio(res.speedup_vs_eager)} vs eager"
            if not math.isnan(res.speedup_vs_compile):
                msg += f", {_fmt_ratio(res.speedup_vs_compile)} vs compile"
            progress(f"{tag}: {msg}")
    return results


def benchmark(s: Settings, dw: Callable, progress: Callable[[str], None],
              results: Optional[List[Result]] = None) -> List[Result]:
    """Runs every case of ``s``; appends to ``results`` as it goes (kept on interrupt)."""
    results = [] if results is None else results
    cases = s.cases()
    if s.compile_layouts:
        progress("loading torch.compile (the first compilation also takes a while)")
        import torch._dynamo  # noqa: F401
        import torch._inductor  # noqa: F401
    with _quiet_same_padding_warning():
        for i, case in enumerate(cases, 1):
            runner = run_inception_case if case.op == "inception" else run_case
            runner(case, s, dw, progress, label=f"[{i}/{len(cases)}] ", results=results)
    return results


# ------------------------------------------------------------------------------ reporting


def _fmt_ms(t: float) -> str:
    if t is None or math.isnan(t):
        return "-"
    v = t * 1e3
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


def _fmt_ratio(r: float) -> str:
    return "-" if r is None or math.isnan(r) else f"{r:.2f}x"


def _fmt_gflops(g: float) -> str:
    if g is None or math.isnan(g):
        return "-"
    return f"{g:.1f}" if g >= 10 else f"{g:.2f}"


def _cell(res: Result, key: str) -> str:
    if key in res.errors:
        return "error"
    return _fmt_ms(res.median(key))


def tables(results: List[Result], s: Settings) -> List[Tuple[str, List[str], List[List[str]]]]:
    """(title, header, rows) per pass."""
    compiled_keys = [COMPILED[l] for l in s.compile_layouts]
    header = ["N", "C", "HxW", "kernel", "fastvis ms", "fastvis min"]
    header += ["core ms"] if s.core else []
    header += ["eager NCHW", "eager CL"]
    if compiled_keys:
        header += ["compile NCHW" if k == "compile_nchw" else "compile CL"
                   for k in compiled_keys]
    header += ["vs eager"] + (["vs compile"] if compiled_keys else []) + ["fastvis GFLOP/s"]
    out = []
    for pass_ in s.passes:
        rows = []
        for r in results:
            if r.pass_ != pass_:
                continue
            c = r.case
            fv = _cell(r, FASTVIS)
            if r.check_ok is False:
                fv += " !"  # wrong result: see the footnote
            st = r.stats.get(FASTVIS)
            row = [str(c.n), str(c.c), f"{c.h}x{c.w}", c.kernel, fv,
                   _fmt_ms(st.min) if st is not None and st.samples else "-"]
            if s.core:
                row += [_cell(r, CORE) if (CORE in r.stats or CORE in r.errors) else "-"]
            row += [_cell(r, EAGER["nchw"]), _cell(r, EAGER["channels_last"])]
            row += [_cell(r, k) for k in compiled_keys]
            row += [_fmt_ratio(r.speedup_vs_eager)]
            if compiled_keys:
                row += [_fmt_ratio(r.speedup_vs_compile)]
            row += [_fmt_gflops(r.gflops)]
            rows.append(row)
        if rows:
            out.append((PASS_TITLES[pass_], header, rows))
    return out


def preamble(s: Settings, env: dict) -> List[str]:
    if s.op == "inception":
        first = (f"Inception depthwise conv (InceptionNeXt token mixer: identity | "
                 f"{INCEPTION_SQUARE}x{INCEPTION_SQUARE} | 1x{INCEPTION_BAND} | {INCEPTION_BAND}x1, "
                 f"g = C/{round(1 / INCEPTION_RATIO)}), with biases, {s.dtype}; fastvis "
                 f"(one fused op) on channels_last input vs split + 3 F.conv2d + cat; "
                 f"{s.threads} thread(s) for fastvis and PyTorch.")
    else:
        first = None
    lines = [
        f"Depthwise conv2d, padding 'same', stride 1, with bias, {s.dtype}; "
        f"fastvis on channels_last input; {s.threads} thread(s) for fastvis and PyTorch.",
        f"torch {env.get('torch', '?')}, fastvis {env.get('fastvis', '?')}, "
        f"CPU: {env.get('cpu', '?')} ({env.get('logical_cpus', '?')} logical CPUs).",
        f"Times in ms per call: median of up to {s.repeat} interleaved blocks "
        f"(each >= {s.min_block_time * 1e3:g} ms of back-to-back calls) after {s.warmup} "
        f"warm-up call(s); 'fastvis min' is the fastest block.",
    ]
    if first is not None:
        lines[0] = first
    return lines


def footnotes(results: List[Result], s: Settings) -> List[str]:
    lines = [
        "vs eager / vs compile: PyTorch median / fastvis median against the faster eager "
        "layout / the faster compiled layout (> 1: fastvis is faster).",
        "GFLOP/s: 2*N*C*OH*OW*kh*kw flops for the forward pass, 3x that for forward+backward."
        if s.op != "inception" else
        "GFLOP/s: 2*N*g*H*W*(k*k + 2*kb) flops (the three branches) for the forward pass, "
        "3x that for forward+backward.",
    ]
    if s.compile_layouts:
        lines.append(
            "compile: torch.compile(F.conv2d, fullgraph=True, dynamic=False). On CPU, "
            "inductor calls the same ATen convolution kernels as eager (extern kernels), so "
            "it differs from eager only by overhead and any copies it adds around them."
            + (" For --op inception it compiles the whole split + convs + cat composition."
               if s.op == "inception" else ""))
    else:
        lines.append("torch.compile was not measured (--no-compile).")
    checked = [r for r in results if r.max_rel_err is not None]
    bad = [r for r in checked if not r.check_ok]
    if checked:
        worst = max(r.max_rel_err for r in checked)
        if bad:
            lines.append(f"! fastvis's result differs from PyTorch's in {len(bad)} case(s) "
                         f"(max relative error {worst:.3g} > {CHECK_TOLERANCE[s.dtype]:g}): "
                         f"those times are not comparable.")
        else:
            lines.append(f"Checked: fastvis's outputs and gradients match PyTorch's "
                         f"(max relative error {worst:.2g}).")
    errors = sorted({(LABELS[k], e) for r in results for k, e in r.errors.items()})
    for who, e in errors:
        lines.append(f"error: {who}: {e}")
    return lines


def environment() -> dict:
    import fastvis

    from ..cli import _version, runtime_info

    env = runtime_info()
    env["fastvis"] = _version()
    try:
        info = fastvis.build_info()
        env["fastvis_build"] = info if isinstance(info, dict) else str(info)
    except Exception as e:
        env["fastvis_build"] = f"unavailable: {_one_line(e)}"
    env["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    env["torch_config"] = {"mkldnn": bool(torch.backends.mkldnn.is_available())}
    return env


def _json_safe(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def save_json(path: str, s: Settings, env: dict, results: List[Result], complete: bool) -> None:
    doc = {
        "benchmark": "dwconv" if s.op == "dwconv" else "dwconv --op inception",
        "complete": complete,
        "settings": s.to_dict(),
        "environment": env,
        "results": [r.to_dict() for r in results],
    }
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_safe(doc), f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------- run


def _set_threads(n: int, progress) -> Callable[[], None]:
    """Sets fastvis's and PyTorch's thread counts; returns a function restoring them."""
    import fastvis

    old_torch = torch.get_num_threads()
    torch.set_num_threads(n)
    get_fv = getattr(fastvis, "get_num_threads", None)
    set_fv = getattr(fastvis, "set_num_threads", None)
    old_fv = get_fv() if callable(get_fv) else None
    if callable(set_fv):
        set_fv(n)
    else:
        progress("WARNING: fastvis.set_num_threads is missing; fastvis runs with its default "
                 "thread count")

    def restore():
        torch.set_num_threads(old_torch)
        if callable(set_fv) and old_fv is not None:
            # fastvis follows torch's count unless set explicitly; 0 means "follow torch".
            set_fv(0 if old_fv == old_torch else old_fv)

    return restore


def _load_op(name: str = "depthwise_conv2d") -> Callable:
    from ..cli import CommandError

    try:
        from .. import ops
    except Exception as e:
        raise CommandError(f"cannot import fastvis.ops: {_one_line(e)}") from e
    dw = getattr(ops, name, None)
    if not callable(dw):
        raise CommandError(f"fastvis.ops.{name} is not available in this build")
    return dw


def run(args: argparse.Namespace) -> int:
    from ..cli import CommandError

    try:
        s = Settings.from_args(args)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if getattr(args, "dilated_reparam", False):
        return run_reparam(args, s)
    if args.format == "rich":
        try:
            import rich  # noqa: F401
        except ImportError:
            raise CommandError("--format rich needs the 'rich' package "
                               "(pip install rich, or the fastvis[bench] extra)") from None
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        if os.path.exists(d) and not os.path.isdir(d):
            raise CommandError(f"--json {args.json}: {d} is not a directory")
    dw = _load_op("inception_depthwise_conv2d" if s.op == "inception" else "depthwise_conv2d")
    import fastvis

    if getattr(fastvis, "reference_enabled", lambda: False)():
        raise CommandError("fastvis.use_reference() is on: the benchmark would time the "
                           "pure-PyTorch reference instead of fastvis's kernels")
    progress = _Progress(args.quiet)
    restore = _set_threads(s.threads, progress)
    env = environment()

    results: List[Result] = []
    interrupted = False
    n_cases = len(s.cases())
    progress(f"{'dwconv' if s.op == 'dwconv' else 'inception'}: {n_cases} case(s) x {len(s.passes)} pass(es), {s.dtype}, "
             f"{s.threads} thread(s)")
    try:
        benchmark(s, dw, progress, results)
    except KeyboardInterrupt:
        interrupted = True
        progress(f"interrupted: reporting the {len(results)} measurement(s) done so far")
    finally:
        restore()

    for line in preamble(s, env):
        print(line)
    for title, header, rows in tables(results, s):
        print()
        print_table(title, header, rows, fmt=args.format, n_left=4)
    print()
    for line in footnotes(results, s):
        print(line)
    if args.json:
        save_json(args.json, s, env, results, complete=not interrupted)
        progress(f"saved {args.json}")
    sys.stdout.flush()

    if interrupted:
        return 130
    bad = sum(FASTVIS in r.errors or r.check_ok is False for r in results)
    if bad:
        print(f"fastvis bench dwconv: fastvis failed or gave wrong results in {bad} "
              f"measurement(s), see the table", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------ --dilated-reparam


# UniRepLKNet's k=13 dilated re-param branches, and unireplknet_t's stages that use them
# (dims 80/160/320/640 at 224x224 input: stage 1 at 28x28, stage 2 at 14x14, stage 3 at 7x7).
REPARAM_KERNELS = (13, 5, 7, 3, 3, 3)
REPARAM_DILATIONS = (1, 1, 2, 3, 4, 5)
REPARAM_SHAPES = ((160, 28, 28), (320, 14, 14), (640, 7, 7))
REPARAM_PASSES = ("train fwd", "train fwd+bwd", "eval fwd")
REPARAM_LABELS = {FASTVIS: "fastvis (CL)", "eager_nchw": "eager NCHW", "eager_cl": "eager CL",
                  "compile_cl": "compile CL"}


def _separate(x, ws, ds, gs, bs, rms, rvs, training):
    """The unfused composition: per branch F.conv2d then F.batch_norm, summed."""
    y = None
    for w, d, g, b, rm, rv in zip(ws, ds, gs, bs, rms, rvs):
        k = w.shape[-1]
        t = F.batch_norm(F.conv2d(x, w, None, 1, d * (k - 1) // 2, d, groups=x.shape[1]),
                         rm, rv, g, b, training, 0.1, 1e-5)
        y = t if y is None else y + t
    return y


def run_reparam(args: argparse.Namespace, s: Settings) -> int:
    from ..cli import CommandError
    import fastvis
    from ..ops import dilated_reparam_conv

    if s.dtype != "float32":
        raise CommandError("--dilated-reparam measures float32 only")
    if args.json:
        raise CommandError("--json is not supported with --dilated-reparam (the table is the output)")
    if getattr(fastvis, "reference_enabled", lambda: False)():
        raise CommandError("fastvis.use_reference() is on: the benchmark would time the "
                           "pure-PyTorch reference instead of fastvis's kernels")
    progress = _Progress(args.quiet)
    restore = _set_threads(s.threads, progress)
    batches = s.batch if args.batch else ([1] if args.quick else [8])
    shapes = REPARAM_SHAPES[-1:] if args.quick else REPARAM_SHAPES
    passes = ("train fwd", "eval fwd") if args.no_backward else REPARAM_PASSES
    rows, bad = [], 0
    ks, ds = list(REPARAM_KERNELS), list(REPARAM_DILATIONS)
    try:
        for n in batches:
            for (c, h, w) in shapes:
                gen = torch.Generator().manual_seed(s.seed)
                x = torch.randn(n, c, h, w, generator=gen)
                ws = [torch.randn(c, 1, k, k, generator=gen) / k for k in ks]
                gs = [torch.rand(c, generator=gen) + 0.5 for _ in ks]
                bs = [torch.randn(c, generator=gen) for _ in ks]
                gy = torch.randn(n, c, h, w, generator=gen)
                stats = [(torch.zeros(c), torch.ones(c)) for _ in ks]
                rms, rvs = [a for a, _ in stats], [b for _, b in stats]
                xs = {"nchw": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last)}
                cands = {FASTVIS: (dilated_reparam_conv, "channels_last"),
                         "eager_nchw": (_separate, "nchw"), "eager_cl": (_separate, "channels_last")}
                if s.compile_layouts:
                    torch._dynamo.reset()
                    cands["compile_cl"] = (torch.compile(_separate, fullgraph=True, dynamic=False),
                                           "channels_last")
                for pass_ in passes:
                    training, backward = pass_.startswith("train"), pass_.endswith("bwd")
                    tag = f"N={n} C={c} {h}x{w} {pass_}"
                    calls, outs, errors = {}, {}, {}
                    params = [t.detach().requires_grad_(backward) for t in ws + gs + bs]
                    pw, pg, pb = params[:len(ks)], params[len(ks):2 * len(ks)], params[2 * len(ks):]
                    for key, (fn, layout) in cands.items():
                        x_ = xs[layout].detach().requires_grad_(backward)
                        gy_ = gy.contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                            else torch.contiguous_format)

                        def call(fn=fn, x_=x_, gy_=gy_):
                            with torch.set_grad_enabled(backward):
                                y = fn(x_, pw, ds, pg, pb, rms, rvs, training)
                                if not backward:
                                    return (y,)
                                return (y,) + torch.autograd.grad(y, [x_] + params, gy_)
                        if key == "compile_cl":
                            progress(f"{tag}: compiling")
                        try:
                            outs[key] = call()
                        except Exception as e:
                            errors[key] = _one_line(e)
                            progress(f"{tag}: {REPARAM_LABELS[key]} failed: {errors[key]}")
                            continue
                        calls[key] = call
                    err = None
                    if FASTVIS in outs and "eager_nchw" in outs:
                        err = max(_rel_err(a, b) for a, b in zip(outs[FASTVIS], outs["eager_nchw"]))
                    ok = err is not None and err <= CHECK_TOLERANCE["float32"]
                    bad += (not ok)
                    progress(f"{tag}: timing {', '.join(REPARAM_LABELS[k] for k in calls)}")
                    st = measure_interleaved(calls, warmup=s.warmup, repeat=s.repeat,
                                             min_block_time=s.min_block_time, max_time=s.max_time)
                    med = {k: v.median for k, v in st.items()}
                    f = med.get(FASTVIS, math.nan)
                    eager = min((med.get(k, math.nan) for k in ("eager_nchw", "eager_cl")), default=math.nan)
                    comp = med.get("compile_cl", math.nan)
                    row = [str(n), str(c), f"{h}x{w}", pass_]
                    row += [("error" if k in errors else _fmt_ms(med.get(k, math.nan))) + (" !" if k == FASTVIS and not ok else "")
                            for k in REPARAM_LABELS if k in cands]
                    row += [_fmt_ratio(eager / f if f > 0 else math.nan)]
                    if s.compile_layouts:
                        row += [_fmt_ratio(comp / f if f > 0 else math.nan)]
                    row += ["-" if err is None else f"{err:.2g}"]
                    rows.append(row)
    except KeyboardInterrupt:
        progress("interrupted")
    finally:
        restore()
    header = ["N", "C", "HxW", "pass"] + [REPARAM_LABELS[k] for k in REPARAM_LABELS
                                          if k != "compile_cl" or s.compile_layouts]
    header += ["vs eager"] + (["vs compile"] if s.compile_layouts else []) + ["max rel err"]
    print(f"Fused multi-branch depthwise conv + BatchNorm (UniRepLKNet k=13 branches "
          f"{ks} at dilations {ds}), float32, {s.threads} thread(s); times in ms "
          f"(median of interleaved blocks).")
    print()
    print_table("dilated re-param: fastvis fused op vs separate convs + BNs", header, rows,
                fmt=args.format, n_left=4)
    print()
    print("vs eager / vs compile: PyTorch median / fastvis median (> 1: fastvis is faster); "
          "compile: torch.compile(fullgraph=True) of the separate convs + BNs on channels_last. "
          "max rel err: fastvis vs eager NCHW (outputs and every gradient).")
    if bad:
        print(f"fastvis bench dwconv --dilated-reparam: wrong results in {bad} measurement(s)",
              file=sys.stderr)
        return 1
    return 0
