"""``fastvis train`` and ``fastvis validate``: argument parsing and error reporting around
:class:`fastvis.train.Trainer`.

Every option of ``fastvis train`` is a :class:`TrainConfig` field (``--batch-size`` ->
``batch_size``); only the options given on the command line override the defaults (or the
``--config`` file, or, with ``--resume``, the checkpoint's config). Expected failures (bad
settings, data, checkpoints, an unknown model) become a :class:`fastvis.cli.CommandError`:
one line, exit code 1.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Any, Dict, Optional

__all__ = ["train_add_arguments", "train_run", "validate_add_arguments", "validate_run"]

S = argparse.SUPPRESS


def _model_arg(text: str):
    """KEY=VALUE with VALUE a Python literal (numbers, tuples, lists, None, True) or a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    k = k.strip()
    if not k.isidentifier():
        raise argparse.ArgumentTypeError(f"invalid keyword {k!r} in {text!r}")
    try:
        val = ast.literal_eval(v)
    except (ValueError, SyntaxError):
        val = v
    return k, val


def _pair(name):
    def parse(text):
        parts = [p for p in text.replace(",", " ").split() if p]
        try:
            vals = tuple(float(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected numbers, got {text!r}") from None
        return vals

    return parse


def _add_model_options(g) -> None:
    g.add_argument("--model", default=S, help="a fastvis.create_model name (default: convnext_atto)")
    g.add_argument("--model-arg", dest="model_kwargs", action="append", type=_model_arg, default=S,
                   metavar="KEY=VALUE", help="keyword for create_model, repeatable, e.g. --model-arg patch_size=2")


def train_add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a model on the built-in digits (default), an image folder or synthetic data. "
                     "Every option maps to a TrainConfig field; see README.md 'Training'.")
    p.add_argument("--config", default=S, metavar="FILE", help="a JSON or YAML file of settings (options override it)")
    p.add_argument("--resume", nargs="?", const="auto", default=S, metavar="PATH",
                   help="continue a run: its checkpoint file or run directory (default: the --output directory)")
    g = p.add_argument_group("model")
    _add_model_options(g)
    g.add_argument("--pretrained", action="store_true", default=S, help="start from locally cached weights")
    g.add_argument("--drop-path", type=float, default=S, help="stochastic depth of the last block (default 0)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["digits", "folder", "synthetic"], default=S,
                   help="digits (sklearn, built in; default), folder (--data DIR) or synthetic")
    g.add_argument("--data", dest="data_dir", default=S, metavar="DIR",
                   help="image folder root with train/<class>/ and val/<class>/ (implies --dataset folder)")
    g.add_argument("--img-size", type=int, default=S)
    g.add_argument("--num-classes", type=int, default=S)
    g.add_argument("--synthetic-size", type=int, default=S, help="images in the synthetic train split")
    g.add_argument("--workers", type=int, default=S, help="data loader processes (default 0)")
    g.add_argument("--scale", type=_pair("--scale"), default=S, metavar="LO,HI", help="random resized crop area range")
    g.add_argument("--ratio", type=_pair("--ratio"), default=S, metavar="LO,HI", help="random resized crop aspect range")
    g.add_argument("--hflip", type=float, default=S, help="horizontal flip probability")
    g.add_argument("--mean", type=_pair("--mean"), default=S, metavar="R,G,B")
    g.add_argument("--std", type=_pair("--std"), default=S, metavar="R,G,B")
    g.add_argument("--crop-pct", type=float, default=S)
    g.add_argument("--mixup", type=float, default=S, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=S, help="cutmix alpha (0: off)")
    g.add_argument("--mix-prob", type=float, default=S)
    g.add_argument("--switch-prob", type=float, default=S)
    g.add_argument("--smoothing", dest="label_smoothing", type=float, default=S, help="label smoothing")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S)
    g.add_argument("--batch-size", type=int, default=S, help="global batch (all processes, all accumulation steps)")
    g.add_argument("--accum-steps", type=int, default=S, help="gradient accumulation steps")
    g.add_argument("--opt", choices=["adamw", "sgd"], default=S)
    g.add_argument("--lr", type=float, default=S)
    g.add_argument("--min-lr", type=float, default=S)
    g.add_argument("--warmup-epochs", type=float, default=S)
    g.add_argument("--warmup-lr", type=float, default=S)
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--momentum", type=float, default=S, help="SGD momentum")
    g.add_argument("--layer-decay", type=float, default=S, help="layer-wise lr decay, e.g. 0.8")
    g.add_argument("--clip-grad", type=float, default=S, help="max global gradient norm")
    g.add_argument("--sam", dest="sam_rho", type=float, default=S, metavar="RHO", help="SAM with this rho (e.g. 0.05)")
    g.add_argument("--sam-adaptive", action="store_true", default=S, help="ASAM (perturbation scaled by |w|)")
    g.add_argument("--ema", dest="ema_decay", type=float, default=S, metavar="DECAY", help="model EMA, e.g. 0.999")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=S, help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default=S, help="autocast dtype (bf16 on the CPU)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=S)
    g.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    g.add_argument("--threads", type=int, default=S, help="threads per process")
    g.add_argument("--seed", type=int, default=S)
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", default=S, metavar="DIR", help="run directory (default runs/train)")
    g.add_argument("--log-every", type=int, default=S, help="steps between metrics records (default 10)")
    g.add_argument("--ckpt-every-steps", type=int, default=S, help="also checkpoint every N steps")
    g.add_argument("--keep-last", type=int, default=S, help="numbered checkpoints kept (default 2) besides best.pt")
    g.add_argument("--eval-every", type=int, default=S, help="epochs between validations")
    g.add_argument("--max-steps", type=int, default=S, help="stop after N optimizer steps")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=S)
    g.add_argument("-q", "--quiet", action="store_true", default=S, help="plain log lines instead of progress bars")


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    from .config import TrainConfig
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {k: v for k, v in vars(args).items() if k in names}
    if "model_kwargs" in out:
        out["model_kwargs"] = dict(out["model_kwargs"])
    if "data_dir" in out and "dataset" not in out:
        out["dataset"] = "folder"
    return out


def _errors():
    from ..models import PretrainedWeightsNotFound
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .trainer import TrainingError

    return (ConfigError, DataError, CheckpointError, TrainingError, PretrainedWeightsNotFound)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [l for l in text.splitlines() if l.strip()]
    # a DataLoader worker re-raises "Caught X in DataLoader worker ... Original Traceback ... X: msg"
    if len(lines) > 1 and "DataLoader worker" in lines[0]:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def train_run(args: argparse.Namespace) -> int:
    from ..cli import CommandError
    from .checkpoint import load_checkpoint_file
    from .config import TrainConfig, load_config_file
    from .distributed import shutdown_distributed
    from .trainer import Trainer

    errors = _errors()
    try:
        over = _overrides(args)
        resume = getattr(args, "resume", None)
        preloaded = None
        if resume is not None:
            base = TrainConfig.from_dict(load_config_file(args.config)) if hasattr(args, "config") else TrainConfig()
            out_dir = over.get("output", base.output)
            trainer_probe = None
            path = os.path.join(out_dir, "checkpoints") if resume == "auto" else resume
            from .checkpoint import CheckpointManager, CheckpointError

            if os.path.isdir(path):
                sub = os.path.join(path, "checkpoints")
                found = CheckpointManager(sub if os.path.isdir(sub) else path, clean=False).latest()
                if found is None:
                    raise CheckpointError(f"--resume: no checkpoint in {path}")
            elif resume == "auto":
                raise CheckpointError(f"--resume: no checkpoint in {path} (is --output the run's directory?)")
            else:
                found = (path, load_checkpoint_file(path))
            st = found[1]
            if not isinstance(st, dict) or "config" not in st:
                raise CheckpointError(f"{found[0]} is not a fastvis training checkpoint")
            cfgd = dict(st["config"])
            if str(cfgd.get("model", "")).startswith("custom:") or cfgd.get("dataset") == "custom":
                raise CheckpointError(f"{found[0]} was trained on a user model or datasets given to the Python "
                                      "API; resume it with the Python API")
            cfgd.update(over)
            if "output" not in over and resume != "auto":
                cfgd["output"] = os.path.dirname(os.path.dirname(os.path.abspath(found[0])))
            cfg = TrainConfig.from_dict(cfgd)
            preloaded = found
        else:
            d = load_config_file(args.config) if hasattr(args, "config") else {}
            d.update(over)
            cfg = TrainConfig.from_dict(d)
        try:
            trainer = Trainer(cfg)
        except ValueError as e:
            if isinstance(e, errors):
                raise
            # create_model's unknown name / bad keyword, model constructor checks
            raise CommandError(f"cannot build model {cfg.model!r}: {_one_line(e)}") from None
        except TypeError as e:
            raise CommandError(f"cannot build model {cfg.model!r}: {_one_line(e)}") from None
        try:
            summary = trainer.fit(resume=preloaded)
        finally:
            shutdown_distributed()
    except errors as e:
        raise CommandError(_one_line(e)) from None
    except RuntimeError as e:
        if "DataLoader worker" in str(e):
            raise CommandError(_one_line(e)) from None
        raise
    if trainer.is_main:
        m, s = divmod(int(summary["wall_time_s"]), 60)
        line = (f"done: {summary['steps']} steps ({summary['epochs_done']} epochs) in {m}:{s:02d}")
        if "val_top1" in summary:
            line += (f"; validation top-1 {summary['val_top1']:.2f}%, top-5 {summary['val_top5']:.2f}%, "
                     f"loss {summary['val_loss']:.4f} (best top-1 {summary['best_val_top1']:.2f}%)")
        line += f"; outputs in {summary['output']}"
        print(line, flush=True)
    return 0


# ------------------------------------------------------------------------ validate


def validate_add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Evaluate a checkpoint on a validation set: prints top-1, top-5 and the loss. A training "
                     "checkpoint brings its model settings and data; a plain state dict needs --model.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a fastvis train checkpoint or a state dict file")
    _add_model_options(p)
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--dataset", choices=["digits", "folder", "synthetic"], default=S)
    p.add_argument("--data", dest="data_dir", default=S, metavar="DIR", help="image folder root (its val/ split)")
    p.add_argument("--img-size", type=int, default=S)
    p.add_argument("--num-classes", type=int, default=S)
    p.add_argument("--batch-size", type=int, default=S)
    p.add_argument("--device", default=S)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default=S)
    p.add_argument("--threads", type=int, default=S)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def validate_run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import CommandError
    from ..models import is_model
    from .checkpoint import CheckpointError, FORMAT, load_checkpoint_file
    from .config import TrainConfig
    from .data import ImageFolderDataset, build_datasets, dataset_defaults
    from .trainer import _device, build_model, evaluate_model, load_model_weights
    from .transforms import EvalTransform

    errors = _errors()
    try:
        st = load_checkpoint_file(args.checkpoint)
        over = _overrides(args)
        trained = isinstance(st, dict) and st.get("format") == FORMAT
        if trained:
            d = dict(st["config"])
            ck_model = d.get("model")
            if "model" in over and over["model"] != ck_model:
                raise CheckpointError(
                    f"{args.checkpoint} is a checkpoint of {ck_model}, not of {over['model']} (another architecture)")
            if str(ck_model).startswith("custom:"):
                raise CheckpointError(f"{args.checkpoint} holds a user model ({ck_model}); evaluate it with the Python API")
            for k in ("dataset", "data_dir", "img_size", "num_classes", "batch_size", "device", "amp", "threads"):
                if k in over:
                    d[k] = over[k]
            if "model_kwargs" in over:
                d["model_kwargs"] = dict(d.get("model_kwargs", {}), **over["model_kwargs"])
            if "data_dir" in over and "dataset" not in over:
                d["dataset"] = "folder"
            cfg = TrainConfig.from_dict(d)
            weights = st["model"]
            if args.ema:
                if not st.get("ema"):
                    raise CheckpointError(f"{args.checkpoint} has no EMA weights (trained without --ema)")
                weights = st["ema"]["module"]
            classes = st.get("classes") or None
        else:
            if "model" not in over:
                raise CheckpointError(f"{args.checkpoint} is not a fastvis training checkpoint; say which model it "
                                      "holds with --model")
            if args.ema:
                raise CheckpointError("--ema needs a fastvis training checkpoint")
            cfg = TrainConfig.from_dict({k: v for k, v in over.items()})
            weights = st
            classes = None
        if not is_model(cfg.model):
            from ..models import model_entrypoint

            try:
                model_entrypoint(cfg.model)
            except ValueError as e:
                raise CommandError(_one_line(e)) from None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.dataset == "folder":
            if not cfg.data_dir:
                raise CommandError("--dataset folder needs --data DIR")
            if classes is None and os.path.isdir(os.path.join(cfg.data_dir, "train")):
                classes = ImageFolderDataset(cfg.data_dir, "train").classes
            val = ImageFolderDataset(cfg.data_dir, "val", classes=classes)
            dd = dict(dataset_defaults("folder"), num_classes=len(val.classes))
            cfg = cfg.resolved(1, dd)
        else:
            cfg = cfg.resolved(1, dataset_defaults(cfg.dataset))
            val = build_datasets(cfg)[1]
        try:
            model = build_model(cfg.replace(pretrained=False, drop_path=0.0))
        except (ValueError, TypeError) as e:
            raise CommandError(f"cannot build model {cfg.model!r}: {_one_line(e)}") from None
        if not trained:
            from ..models.convnext import ConvNeXt, checkpoint_filter_fn

            if isinstance(model, ConvNeXt) and isinstance(weights, dict):
                weights = checkpoint_filter_fn(weights, model)
            if not isinstance(weights, dict):
                raise CheckpointError(f"{args.checkpoint} does not hold a state dict")
        load_model_weights(model, weights, args.checkpoint)
        device = _device(cfg.device)
        model = model.to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        res = evaluate_model(model, val, EvalTransform(cfg.img_size, cfg.crop_pct, cfg.mean, cfg.std),
                             getattr(args, "batch_size", None) or 64, device, cfg.num_classes, cfg.channels_last, amp)
    except errors as e:
        raise CommandError(_one_line(e)) from None
    res = dict(res, model=cfg.model, checkpoint=args.checkpoint, dataset=cfg.dataset, ema=bool(args.ema))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"top-1 {res['val_top1']:.2f}%  top-5 {res['val_top5']:.2f}%  loss {res['val_loss']:.4f}  "
              f"({res['val_images']} {cfg.dataset} validation images, {cfg.model}{' EMA' if args.ema else ''}, "
              f"{args.checkpoint})")
    return 0
