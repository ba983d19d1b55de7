"""fastvis bench model: whole-model inference, fastvis against timm, torch.compile and ONNX Runtime.

For each model name and batch size, builds the fastvis model (``fastvis.create_model``) and
timm's model of the same name with the *same weights* (fastvis' state dict loaded strictly
into timm's), and times, interleaved in the same run:

* fastvis: the fastvis model (fused blocks), channels_last input;
* timm eager: timm's model in PyTorch eager mode (its default NCHW layout);
* timm channels_last: the same with the model and input in channels_last;
* timm compile: timm's model under ``torch.compile`` (inductor);
* ONNX Runtime: timm's model exported with ``torch.onnx.export`` (dynamo exporter), run by
  ``onnxruntime`` on the CPU execution provider with the same thread count, its worker
  threads not spin-waiting between runs (spinning, they slowed the candidates timed after
  it; ONNX Runtime alone runs a few per cent faster with it).

Reported: images per second of each candidate and the ratios candidate-time / fastvis-time
(> 1: fastvis is faster), and the largest difference between fastvis' and timm's logits.
Then the machine's bound: the model's convolution and matrix-product FLOPs per image
(torch.utils.flop_counter) at the sgemm rate measured in the same run (the thread count x
one thread's sgemm of 256x1536x384 as the fused blocks call it: the core's own AVX-512 kernel where
it is active, else their BLAS; as ``fastvis bench block``), in images per
second, with fastvis' rate and twice the baseline's (the issues' inference target) as
fractions of it. Above 100 %: faster than every counted FLOP at the sgemm rate.
Then a training step (forward, backward, SGD step; train mode) of fastvis against timm
eager: images per second, and the activation memory the step keeps for its backward pass
(the bytes of the tensors autograd saves, parameters excluded); and the same bound for the
training step (3 x the forward's FLOPs: the forward, the input and the weight gradients),
with the bound as a multiple of the baseline's rate: the most any implementation could
gain over the baseline's training step at the sgemm rate.
timm, onnxruntime and onnxscript are optional (``pip install "fastvis[bench]"``); missing
ones are skipped with a note. Training throughput: ``fastvis bench train``.

Models timm does not have (UniRepLKNet, RepLKNet), or every model when timm is not
installed, are compared with **the same fastvis model under** ``fastvis.use_reference(True)``
instead ("reference": every fastvis op replaced by its PyTorch reference, i.e. plain
``F.conv2d`` depthwise convolutions, separate branch convolutions and BatchNorms, as the
official implementations compute), in their own tables. Models with a deploy form are also
timed re-parameterised (``fastvis.reparameterize`` of a copy: "fastvis deploy" and
"reference deploy"). The training step compares fastvis with the reference (train mode,
training form).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

from . import print_table
from .block import _pos_int, add_measure_arguments, add_output_arguments
from .timing import gemm_line, measure_interleaved

HELP = ("whole-model inference and training step: fastvis vs timm eager, torch.compile and ONNX Runtime "
        "(models timm lacks: vs their own PyTorch reference)")

DEFAULT_MODELS = ["convnext_atto", "convnext_tiny"]
DEFAULT_BATCH = [1, 8]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to measure")
    g.add_argument("--model", "--models", dest="models", nargs="+", default=None, metavar="NAME",
                   help=f"fastvis model names, comma or space separated "
                        f"(default: {','.join(DEFAULT_MODELS)})")
    g.add_argument("--batch", nargs="+", default=None, metavar="N",
                   help=f"batch sizes, comma or space separated "
                        f"(default: {','.join(map(str, DEFAULT_BATCH))})")
    g.add_argument("--size", type=_pos_int, default=224, help="input resolution (default: 224)")
    g.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    g.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    g.add_argument("--no-train", action="store_true", help="skip the training step")
    add_measure_arguments(p, "convnext_atto, batch 1, 64x64, few repeats (a smoke run)", max_time=3.0)
    add_output_arguments(p)


@dataclass
class Result:
    model: str
    batch: int
    size: int
    median_s: Dict[str, float] = field(default_factory=dict)
    min_s: Dict[str, float] = field(default_factory=dict)
    max_logit_diff: float = math.nan
    notes: Dict[str, str] = field(default_factory=dict)
    train_median_s: Dict[str, float] = field(default_factory=dict)
    saved_mb: Dict[str, float] = field(default_factory=dict)
    # "timm": timm's model of the same name; "reference": the same fastvis model under
    # fastvis.use_reference(True) (timm lacks the model, or is not installed).
    baseline: str = "timm"
    gflop_per_image: float = math.nan  # convolutions and matrix products (see _model_gflop)


def _model_gflop(model, size: int) -> float:
    """GFLOP per image of the model's convolutions and matrix products (2 per multiply-add,
    depthwise and grouped convolutions counted by their groups), as torch.utils.flop_counter
    counts them on the model under fastvis.use_reference(True) (PyTorch ops), at batch 1.
    Elementwise work (norms, activations, pooling) is not counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import fastvis

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), fastvis.use_reference(True), counter:
        model(torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last))
    return counter.get_total_flops() * 1e-9


# A training step's FLOPs per image, as a multiple of the forward's: the backward computes
# each layer's input gradient and weight gradient, each with the forward's multiply-adds.
# (The first layer's input gradient, which no one needs, is counted too; it is a 3-channel
# stem convolution's, well below 1 % of a model.) Work a method chooses to repeat, such as
# fastvis' recomputation in its fused backward passes, is not part of the task and not
# counted.
TRAIN_FLOP_FACTOR = 3


def _bound_rows(results: List[Result], sgemm: float, train: bool):
    """Rows of a bound table: per result with a FLOP count and a fastvis time, the images per
    second at the sgemm rate, fastvis' and the baseline's rates and their fractions of it."""
    rows = []
    for r in results:
        times = r.train_median_s if train else r.median_s
        if math.isnan(r.gflop_per_image) or "fastvis" not in times:
            continue
        base = "timm eager" if r.baseline == "timm" else "reference"
        gflop = r.gflop_per_image * (TRAIN_FLOP_FACTOR if train else 1)
        bound = sgemm / gflop  # img/s
        fr, br = r.batch / times["fastvis"], r.batch / times.get(base, math.nan)
        row = [r.model, str(r.batch), f"{gflop:.2f}", f"{bound:.1f}", f"{fr:.2f}",
               f"{100 * fr / bound:.0f}%", base, "-" if math.isnan(br) else f"{br:.2f}"]
        if train:  # the most a training step could gain over the baseline on this machine
            row += ["-" if math.isnan(br) else f"{100 * br / bound:.0f}%",
                    "-" if math.isnan(br) else f"{bound / br:.2f}x"]
        else:  # the issues' inference target is twice the baseline
            row += ["-" if math.isnan(br) else f"{100 * 2 * br / bound:.0f}%"]
        rows.append(row)
    return rows


def _print_bound_table(results: List[Result], sgemm: float, threads: int, fmt: str,
                       train: bool = False) -> None:
    """What the machine allows: every counted FLOP at the sgemm rate. Inference: against
    fastvis and twice the baseline (the issues' inference target). Training step: the FLOPs
    of a forward and a backward pass (TRAIN_FLOP_FACTOR x the forward's), against fastvis and
    the baseline, and the bound as a multiple of the baseline: the largest speed-up over it
    that this machine's sgemm rate leaves room for."""
    rows = _bound_rows(results, sgemm, train)
    if not rows:
        return
    head = ["model", "N", "GFLOP/img", "sgemm bound img/s", "fastvis img/s", "fastvis / bound",
            "baseline", "baseline img/s"]
    from .timing import core_sgemm_name
    rate = (f"{sgemm:.0f} GFLOP/s ({threads} x one thread's {core_sgemm_name()} sgemm of 256x1536x384, "
            f"measured at the start of this run)")
    print()
    if train:
        print_table(f"Training step against the machine's sgemm bound: {TRAIN_FLOP_FACTOR} x the forward's "
                    f"counted FLOPs (forward, input and weight gradients) at {rate}",
                    head + ["baseline / bound", "bound / baseline"], rows, fmt=fmt, n_left=2)
    else:
        print_table(f"Inference against the machine's sgemm bound: every counted FLOP at {rate}",
                    head + ["2 x baseline / bound"], rows, fmt=fmt, n_left=2)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _onnx_session(model, x, threads: int):
    import onnxruntime as ort
    import torch

    buf = io.BytesIO()
    with torch.no_grad():
        prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    buf.write(prog.model_proto.SerializeToString())
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # No spin-waiting of its worker threads after a run: they kept a core busy while the
    # next candidate ran (interleaved, inception_next_tiny at N=1 on 2 cores: fastvis 22.5 ->
    # 26.3 ms next to a spinning session). ONNX Runtime itself runs ~5 % slower so (21.4 ->
    # 22.4 ms there; bench/README.md, session 27).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    xn = x.numpy()
    return lambda: sess.run(None, {name: xn})


def _train_step(res: Result, fv, tm, x, xcl, warmup, repeat, max_time, say) -> None:
    """Times forward + backward + SGD step of fastvis' model and the baseline (timm's model,
    or without one the same fastvis model under ``fastvis.use_reference(True)``) in train
    mode, on copies of the models so the inference ones stay untouched, and records their
    saved activations."""
    import torch

    import fastvis

    from .block import _saved_bytes

    fns, saved = {}, {}
    cands = [("fastvis", fv, xcl, False)]
    if tm is not None:
        cands.append(("timm eager", tm, x, False))
    elif res.baseline == "reference":
        cands.append(("reference", fv, xcl, True))
    target = torch.randint(0, 1000, (x.shape[0],))
    for name, model, inp, use_ref in cands:
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
        nc = m.num_classes if hasattr(m, "num_classes") else 1000
        tgt = target % nc

        def step(m=m, opt=opt, inp=inp, tgt=tgt, use_ref=use_ref):
            with fastvis.use_reference(use_ref):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(m(inp), tgt)
                loss.backward()
                opt.step()

        fns[name] = step
        with fastvis.use_reference(use_ref):
            saved[name] = _saved_bytes(lambda m=m, inp=inp: m(inp), list(m.parameters()))
    say(f"  {res.model} N={res.batch}: timing the training step of {', '.join(fns)}")
    st = measure_interleaved(fns, warmup=warmup, repeat=repeat, max_time=max_time)
    for k, s_ in st.items():
        res.train_median_s[k] = s_.median
    res.saved_mb = saved


def _rate(r: Result, times: Dict[str, float], c: str) -> str:
    t = times.get(c, math.nan)
    return "-" if math.isnan(t) else f"{r.batch / t:.1f}"


def _ratio(times: Dict[str, float], num: str, den: str) -> str:
    a, b = times.get(num, math.nan), times.get(den, math.nan)
    return "-" if math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"


def _print_reference_tables(results: List[Result], fmt: str) -> None:
    """The tables of the models compared with their own PyTorch reference."""
    cands = ["fastvis", "reference", "fastvis deploy", "reference deploy"]
    rows = []
    for r in results:
        rows.append([r.model, str(r.batch), f"{r.size}"] + [_rate(r, r.median_s, c) for c in cands] +
                    [_ratio(r.median_s, "reference", "fastvis"),
                     _ratio(r.median_s, "reference deploy", "fastvis deploy"),
                     _ratio(r.median_s, "fastvis", "fastvis deploy"),
                     "-" if math.isnan(r.max_logit_diff) else f"{r.max_logit_diff:.1e}"])
    print()
    print_table("Model inference vs the same fastvis model under fastvis.use_reference(True) "
                "(PyTorch ops; no timm model of this name). deploy = after fastvis.reparameterize",
                ["model", "N", "size"] + [f"{c} img/s" for c in cands] +
                ["reference / fastvis", "reference deploy / fastvis deploy", "fastvis / fastvis deploy",
                 "max |logit diff| (fastvis vs reference)"], rows, fmt=fmt, n_left=3)
    trows = []
    for r in results:
        if not r.train_median_s:
            continue
        t, mb = r.train_median_s, r.saved_mb
        fm, em = mb.get("fastvis", math.nan), mb.get("reference", math.nan)
        trows.append([r.model, str(r.batch), f"{r.size}", _rate(r, t, "fastvis"), _rate(r, t, "reference"),
                      _ratio(t, "reference", "fastvis"), f"{fm:.1f}",
                      "-" if math.isnan(em) else f"{em:.1f}",
                      "-" if math.isnan(em) else f"{fm / em:.2f}"])
    if trows:
        print()
        print_table("Training step vs the PyTorch reference: forward + backward + SGD step, training form "
                    "(median of interleaved blocks)",
                    ["model", "N", "size", "fastvis img/s", "reference img/s", "reference / fastvis",
                     "activations MB fastvis", "activations MB reference", "memory ratio"],
                    trows, fmt=fmt, n_left=3)


def run(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    import fastvis
    from ..cli import CommandError

    if fastvis.reference_enabled():
        raise CommandError("fastvis.use_reference() is on: the benchmark would time the reference")
    models = [m for v in (args.models or DEFAULT_MODELS) for m in v.split(",") if m]
    try:
        batches = [int(b) for v in (args.batch or map(str, DEFAULT_BATCH)) for b in v.split(",") if b]
    except ValueError:
        raise CommandError(f"--batch: expected positive integers, got {args.batch}") from None
    if not batches or min(batches) < 1:
        raise CommandError(f"--batch: expected positive integers, got {args.batch}")
    size, repeat, max_time, warmup = args.size, args.repeat, args.max_time, args.warmup
    if args.quick:
        models, batches, size, repeat, max_time, warmup = ["convnext_atto"], [1], 64, 3, 0.5, 1
    known = set(fastvis.list_models())
    for m in models:
        if m not in known:
            raise CommandError(f"unknown model {m!r}; see fastvis.list_models()")
    try:
        import timm
    except ImportError:
        timm = None
    threads = args.threads or torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    fastvis.set_num_threads(threads)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    results: List[Result] = []
    interrupted = False
    from .timing import core_sgemm_rate
    sgemm = core_sgemm_rate()[0] * threads
    say(f"model: {len(models)} model(s) x {len(batches)} batch size(s), {size}x{size}, "
        f"{threads} thread(s)")
    try:
        for name in models:
            torch.manual_seed(0)
            fv = fastvis.create_model(name).eval().to(memory_format=torch.channels_last)
            tm = None
            note = ""
            if timm is None:
                note = "timm not installed: only fastvis timed"
            else:
                try:
                    tm = timm.create_model(name, pretrained=False).eval()
                    tm.load_state_dict(fv.state_dict(), strict=True)
                except Exception as e:
                    tm, note = None, f"timm model unavailable: {_one_line(e)}"
            flop_note = ""
            try:
                gflop = _model_gflop(fv, size)
            except Exception as e:  # reported as a note; the timing goes on
                gflop, flop_note = math.nan, _one_line(e)
            fv_deploy = None
            if tm is None and any(isinstance(m, fastvis.nn.Reparameterizable) for m in fv.modules()):
                fv_deploy = fastvis.reparameterize(copy.deepcopy(fv))
            for n in batches:
                res = Result(name, n, size, baseline="timm" if tm is not None else "reference",
                             gflop_per_image=gflop)
                if note:
                    res.notes["timm"] = note
                if flop_note:
                    res.notes["FLOP count"] = flop_note
                if res.baseline == "reference":
                    res.notes["baseline"] = ("compared with the same fastvis model under "
                                             "fastvis.use_reference(True) (PyTorch ops)")
                x = torch.randn(n, 3, size, size)
                xcl = x.contiguous(memory_format=torch.channels_last)
                fns: Dict[str, Callable] = {}

                def nograd(f):
                    def call():
                        with torch.no_grad():
                            return f()
                    return call

                def reference(f):
                    def call():
                        with torch.no_grad(), fastvis.use_reference(True):
                            return f()
                    return call

                fns["fastvis"] = nograd(lambda: fv(xcl))
                if tm is None:
                    fns["reference"] = reference(lambda: fv(xcl))
                    with torch.no_grad():
                        res.max_logit_diff = float((fv(xcl) - fns["reference"]()).abs().max())
                    if fv_deploy is not None:
                        fns["fastvis deploy"] = nograd(lambda: fv_deploy(xcl))
                        fns["reference deploy"] = reference(lambda: fv_deploy(xcl))
                else:
                    fns["timm eager"] = nograd(lambda: tm(x))
                    tcl = copy.deepcopy(tm).to(memory_format=torch.channels_last)
                    fns["timm channels_last"] = nograd(lambda: tcl(xcl))
                    with torch.no_grad():
                        res.max_logit_diff = float((fv(xcl) - tm(x)).abs().max())
                    if not args.no_compile:
                        say(f"  {name} N={n}: compiling timm's model")
                        try:
                            tc = torch.compile(tm, dynamic=False)
                            with torch.no_grad():
                                tc(x)
                            fns["timm compile"] = nograd(lambda: tc(x))
                        except Exception as e:
                            res.notes["timm compile"] = _one_line(e)
                    if not args.no_onnx:
                        say(f"  {name} N={n}: exporting timm's model to ONNX")
                        try:
                            with open(os.devnull, "w") as devnull, \
                                    contextlib.redirect_stdout(devnull), \
                                    contextlib.redirect_stderr(devnull):
                                fns["onnxruntime"] = _onnx_session(tm, x, threads)
                        except ImportError as e:
                            res.notes["onnxruntime"] = f"not installed ({e.name}): pip install \"fastvis[bench]\""
                        except Exception as e:
                            res.notes["onnxruntime"] = _one_line(e)
                say(f"  {name} N={n}: timing {', '.join(fns)}")
                st = measure_interleaved(fns, warmup=warmup, repeat=repeat, max_time=max_time)
                for k, s in st.items():
                    res.median_s[k] = s.median
                    res.min_s[k] = s.min
                if not args.no_train:
                    try:
                        _train_step(res, fv, tm, x, xcl, warmup, repeat, max_time, say)
                    except (RuntimeError, ValueError) as e:  # e.g. train-mode BatchNorm on 1 value per channel
                        res.train_median_s.clear()
                        res.notes["training step"] = _one_line(e)
                results.append(res)
    except KeyboardInterrupt:
        interrupted = True
        say(f"interrupted: reporting the {len(results)} measurement(s) done so far")
    finally:
        torch.set_num_threads(old_threads)
        fastvis.set_num_threads(0)

    cands = ["fastvis", "timm eager", "timm channels_last", "timm compile", "onnxruntime"]
    print(f"fastvis {fastvis.__version__}, torch {torch.__version__}, timm "
          f"{getattr(timm, '__version__', 'missing')}, {threads} thread(s), float32, inference")
    print(gemm_line())
    header = ["model", "N", "size"] + [f"{c} img/s" for c in cands] + \
             [f"{c} / fastvis" for c in cands[1:]] + ["max |logit diff|"]
    timm_results = [r for r in results if r.baseline == "timm"]
    ref_results = [r for r in results if r.baseline == "reference"]
    rows = []
    for r in timm_results:
        f = r.median_s.get("fastvis", math.nan)
        row = [r.model, str(r.batch), f"{r.size}"]
        for c in cands:
            t = r.median_s.get(c, math.nan)
            row.append("-" if math.isnan(t) else f"{r.batch / t:.1f}")
        for c in cands[1:]:
            t = r.median_s.get(c, math.nan)
            row.append("-" if math.isnan(t) else f"{t / f:.2f}x")
        row.append("-" if math.isnan(r.max_logit_diff) else f"{r.max_logit_diff:.1e}")
        rows.append(row)
    if rows:
        print()
        print_table("Model inference (median of interleaved blocks; ratios: time / fastvis time)",
                    header, rows, fmt=args.format, n_left=3)
    if ref_results:
        _print_reference_tables(ref_results, args.format)
    _print_bound_table(results, sgemm, threads, args.format)
    trows = []
    for r in timm_results:
        if not r.train_median_s:
            continue
        f = r.train_median_s.get("fastvis", math.nan)
        e = r.train_median_s.get("timm eager", math.nan)
        fm, em = r.saved_mb.get("fastvis", math.nan), r.saved_mb.get("timm eager", math.nan)
        trows.append([r.model, str(r.batch), f"{r.size}", f"{r.batch / f:.2f}",
                      "-" if math.isnan(e) else f"{r.batch / e:.2f}",
                      "-" if math.isnan(e) else f"{e / f:.2f}x", f"{fm:.1f}",
                      "-" if math.isnan(em) else f"{em:.1f}",
                      "-" if math.isnan(em) else f"{fm / em:.2f}"])
    if trows:
        print()
        print_table("Training step: forward + backward + SGD step (median of interleaved blocks)",
                    ["model", "N", "size", "fastvis img/s", "timm eager img/s",
                     "timm eager / fastvis", "activations MB fastvis", "activations MB timm",
                     "memory ratio"], trows, fmt=args.format, n_left=3)
    _print_bound_table(results, sgemm, threads, args.format, train=True)
    for r in results:
        for k, v in r.notes.items():
            print(f"  {r.model} N={r.batch}: {k}: {v}")
    if args.json:
        doc = {"benchmark": "model", "complete": not interrupted,
               "settings": {**vars(args), "models": models, "batch": batches, "size": size,
                            "threads": threads},
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "results": [r.__dict__ for r in results]}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2, default=str)
    return 130 if interrupted else 0
