"""Training throughput: a fastvis ConvNeXt against the same timm model, one training step.

Both models are built with the same settings (``--model``, classes, drop path,
channels_last input) and hold the same weights (timm's state dict keys are fastvis'). A
step is what ``fastvis train`` does per batch: forward in training mode, cross entropy,
backward, AdamW step (weight decay on >= 2-D weights), zero_grad. The two candidates are
timed interleaved (``fastvis.bench.timing``) on the same fixed batch; reported: median ms
per step, images per second and the ratio timm / fastvis (> 1: fastvis is faster). Before
timing, the eval-mode logits of the two models on the batch are compared (relative max
error).

timm is eager PyTorch (no torch.compile): the issue's comparison. fastvis needs nothing
but itself; timm must be installed (``pip install timm``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HELP = "a training step of a fastvis ConvNeXt vs the same timm model (img/s, ratio)"


def _pos_int(v):
    i = int(v)
    if i < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return i


def _pos_float(v):
    f = float(v)
    if not f > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return f


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import table_format_choices

    p.add_argument("--model", nargs="+", default=["convnext_atto"],
                   help="fastvis/timm ConvNeXt names (default: convnext_atto)")
    p.add_argument("--batch", type=_pos_int, default=32, help="images per step (default 32)")
    p.add_argument("--img-size", type=_pos_int, default=224, help="input size (default 224)")
    p.add_argument("--num-classes", type=_pos_int, default=1000)
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the last block (default 0.1)")
    p.add_argument("--threads", type=_pos_int, default=None, help="threads (default: torch.get_num_threads())")
    p.add_argument("--warmup", type=_pos_int, default=2, help="untimed steps per candidate (default 2)")
    p.add_argument("--repeat", type=_pos_int, default=5, help="timed blocks per candidate (default 5)")
    p.add_argument("--max-time", type=_pos_float, default=20.0,
                   help="seconds of timed blocks per candidate, at least 3 blocks (default 20)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 4, 64x64, 3 blocks")
    p.add_argument("--json", default=None, metavar="PATH", help="also save the results as JSON")
    p.add_argument("--format", choices=table_format_choices(), default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")


def _step_fn(model, opt, x, y):
    import torch.nn.functional as F

    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run(args: argparse.Namespace) -> int:
    import torch

    import fastvis
    from ..cli import CommandError
    from ..train.optim import param_groups
    from . import print_table
    from .timing import measure_interleaved

    try:
        import timm
    except ImportError:
        raise CommandError("fastvis bench train compares with timm: pip install timm") from None
    if fastvis.reference_enabled():
        raise CommandError("fastvis.use_reference() is on: the benchmark would time the reference")
    batch, size, repeat, max_time, warmup = args.batch, args.img_size, args.repeat, args.max_time, args.warmup
    if args.quick:
        batch, size, repeat, max_time, warmup = 4, 64, 3, 1.0, 1
    for name in args.model:
        if not fastvis.models.is_model(name):
            try:
                fastvis.models.model_entrypoint(name)
            except ValueError as e:
                raise CommandError(str(e)) from None
    threads = args.threads or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    results = []
    try:
        for name in args.model:
            say(f"train: {name}, batch {batch}, {size}x{size}, {threads} thread(s)")
            torch.manual_seed(0)
            fv = fastvis.create_model(name, num_classes=args.num_classes, drop_path_rate=args.drop_path)
            try:
                tm = timm.create_model(name, num_classes=args.num_classes, drop_path_rate=args.drop_path)
            except Exception as e:
                raise CommandError(f"timm cannot build {name}: {e}") from None
            tm.load_state_dict(fv.state_dict())
            fv = fv.to(memory_format=torch.channels_last).train()
            tm = tm.to(memory_format=torch.channels_last).train()
            g = torch.Generator().manual_seed(1)
            x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, args.num_classes, (batch,), generator=g)
            with torch.no_grad():
                a = fv.eval()(x).double()
                b = tm.eval()(x).double()
            err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            fv.train(), tm.train()
            fns = {}
            for label, m in (("fastvis", fv), ("timm", tm)):
                opt = torch.optim.AdamW(param_groups(m, 0.05), lr=1e-4)
                fns[label] = _step_fn(m, opt, x, y)
            st = measure_interleaved(fns, warmup=warmup, repeat=repeat, max_time=max_time)
            r = {"model": name, "batch": batch, "img_size": size, "rel_err": err}
            for label, s in st.items():
                r[f"{label}_ms"] = s.median * 1e3
                r[f"{label}_min_ms"] = s.min * 1e3
                r[f"{label}_img_s"] = batch / s.median
                r[f"{label}_samples"] = s.repeats
            r["ratio"] = r["timm_ms"] / r["fastvis_ms"]
            results.append(r)
    finally:
        torch.set_num_threads(old)

    print(f"fastvis {fastvis.__version__}, timm {timm.__version__}, torch {torch.__version__}, {threads} thread(s), "
          f"float32, channels_last, drop path {args.drop_path:g}, AdamW")
    rows = [[r["model"], f"{r['batch']}", f"{r['img_size']}", f"{r['fastvis_ms']:.0f}", f"{r['timm_ms']:.0f}",
             f"{r['fastvis_img_s']:.1f}", f"{r['timm_img_s']:.1f}", f"{r['ratio']:.2f}x", f"{r['rel_err']:.1e}"]
            for r in results]
    print()
    print_table("Training step (forward, loss, backward, AdamW step; median of interleaved blocks)",
                ["model", "batch", "size", "fastvis ms", "timm ms", "fastvis img/s", "timm img/s", "timm/fastvis",
                 "logits rel err"], rows, fmt=args.format, n_left=1)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"benchmark": "train", "settings": vars(args), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "threads": threads, "results": results}, fh, indent=2, default=str)
    return 0
