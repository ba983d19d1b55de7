"""``TrainConfig``: every setting of a training run, in one dataclass.

A config is *resolved* before a run (:meth:`TrainConfig.resolved`): settings left at
``None`` ("the dataset's default") are filled in from the dataset (image size, number of
classes, normalisation, flip probability), the global batch is checked against the world
size and the gradient accumulation, and what is inconsistent raises :class:`ConfigError`
(one line, shown as such by ``fastvis train``). The resolved config is what the output
directory records (``config.json``, and ``config.yaml`` when PyYAML is installed) and what
every checkpoint carries.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["TrainConfig", "ConfigError", "load_config_file"]


class ConfigError(ValueError):
    """An invalid or inconsistent training setting (one line, no traceback in the CLI)."""


_DATASETS = ("digits", "folder", "synthetic", "custom")  # custom: datasets given to the Trainer
_OPTIMIZERS = ("adamw", "sgd")
_AMP = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    # ---- model
    model: str = "convnext_atto"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to create_model
    drop_path: float = 0.0
    pretrained: bool = False

    # ---- data
    dataset: str = "digits"          # digits | folder | synthetic (| custom: datasets given to Trainer)
    data_dir: Optional[str] = None   # folder: root with train/ and val/ class folders
    img_size: Optional[int] = None   # None: the dataset's (digits: 32)
    num_classes: Optional[int] = None  # None: the dataset's
    synthetic_size: int = 1024       # synthetic: images in the train split (val: a quarter)
    workers: int = 0                 # DataLoader worker processes (0: the main process)
    scale: Optional[Tuple[float, float]] = None  # random resized crop area range; None: (0.08, 1), digits (0.35, 1)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop aspect range
    hflip: Optional[float] = None    # None: 0.5, but 0 for digits (a mirrored digit is not one)
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    crop_pct: float = 0.875          # folder validation: resize to img_size / crop_pct, centre crop
    mixup: float = 0.0               # mixup alpha (0: off)
    cutmix: float = 0.0              # cutmix alpha (0: off)
    mix_prob: float = 1.0            # probability that a batch is mixed at all
    switch_prob: float = 0.5         # with both on: probability of cutmix instead of mixup
    label_smoothing: float = 0.0

    # ---- optimisation
    epochs: int = 15
    batch_size: int = 64             # the GLOBAL batch (over ranks and accumulation steps)
    accum_steps: int = 1
    opt: str = "adamw"
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    momentum: float = 0.9            # SGD momentum
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW
    nesterov: bool = True            # SGD
    layer_decay: Optional[float] = None  # layer-wise lr decay (ConvNeXt stage/block structure)
    clip_grad: Optional[float] = None    # max global grad norm
    sam_rho: Optional[float] = None      # SAM (Foret et al.) neighbourhood size; None: off
    sam_adaptive: bool = False           # ASAM (Kwon et al.): perturbation scaled by |w|
    ema_decay: Optional[float] = None    # model EMA decay per optimizer step; None: off
    ema_warmup: bool = True              # decay min(ema_decay, (1 + n) / (10 + n))

    # ---- execution
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    amp: str = "none"                # none | bf16 | fp16 (fp16: CUDA only, with a GradScaler)
    channels_last: bool = True
    compile: bool = False
    threads: Optional[int] = None    # torch (and fastvis) threads per process
    seed: int = 0

    # ---- output
    output: str = "runs/train"
    log_every: int = 10              # steps between metrics records
    ckpt_every_steps: Optional[int] = None  # also checkpoint mid-epoch every N steps
    keep_last: int = 2
    eval_every: int = 1              # epochs between validations (and the last epoch)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (tests, smoke runs)
    plot: bool = True
    quiet: bool = False

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                if isinstance(v, list) and f.name in ("scale", "ratio", "mean", "std", "betas"):
                    v = tuple(v)
                kw[f.name] = v
        return cls(**kw)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ resolution

    def resolved(self, world_size: int = 1, dataset_defaults: Optional[Dict[str, Any]] = None) -> "TrainConfig":
        """A copy with the dataset defaults filled in and every setting checked."""
        c = dataclasses.replace(self, model_kwargs=dict(self.model_kwargs))
        dd = dataset_defaults or {}
        if c.dataset not in _DATASETS:
            raise ConfigError(f"dataset must be one of {', '.join(_DATASETS)}, got {c.dataset!r}")
        if c.dataset == "folder" and not c.data_dir:
            raise ConfigError("dataset 'folder' needs a data directory (--data DIR)")
        for name in ("img_size", "num_classes", "hflip", "mean", "std", "scale"):
            if getattr(c, name) is None and name in dd:
                setattr(c, name, dd[name])
        if c.hflip is None:
            c.hflip = 0.5
        if c.scale is None:
            c.scale = (0.08, 1.0)
        if c.mean is None:
            c.mean = (0.485, 0.456, 0.406)
        if c.std is None:
            c.std = (0.229, 0.224, 0.225)
        c.mean, c.std = tuple(float(v) for v in c.mean), tuple(float(v) for v in c.std)
        c.scale, c.ratio, c.betas = tuple(c.scale), tuple(c.ratio), tuple(c.betas)
        _check(c, world_size)
        return c

    # ------------------------------------------------------------------ derived

    def micro_batch(self, world_size: int) -> int:
        """Images per forward pass on one rank."""
        return self.batch_size // (world_size * self.accum_steps)

    def save(self, directory: str) -> List[str]:
        """Writes ``config.json`` (and ``config.yaml`` if PyYAML is installed) into directory;
        returns the paths written."""
        from .checkpoint import atomic_write_bytes

        d = self.to_dict()
        paths = [os.path.join(directory, "config.json")]
        atomic_write_bytes(paths[0], (json.dumps(d, indent=2, sort_keys=False) + "\n").encode())
        try:
            import yaml  # optional
        except ImportError:
            return paths
        paths.append(os.path.join(directory, "config.yaml"))
        atomic_write_bytes(paths[1], yaml.safe_dump(d, sort_keys=False).encode())
        return paths


def load_config_file(path: str) -> Dict[str, Any]:
    """A config dict from a JSON or YAML file (YAML needs PyYAML)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or give a .json file") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(d).__name__}")
    return d


def _check(c: TrainConfig, world_size: int) -> None:
    def pos_int(name):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")

    def prob(name):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {v!r}")

    def nonneg(name):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")

    for n in ("epochs", "batch_size", "accum_steps", "img_size", "num_classes", "log_every",
              "keep_last", "eval_every", "synthetic_size"):
        pos_int(n)
    for n in ("drop_path", "hflip", "mix_prob", "switch_prob", "label_smoothing"):
        prob(n)
    for n in ("mixup", "cutmix", "lr", "min_lr", "warmup_epochs", "warmup_lr", "weight_decay", "momentum"):
        nonneg(n)
    if c.lr <= 0:
        raise ConfigError(f"lr must be > 0, got {c.lr!r}")
    if c.workers < 0:
        raise ConfigError(f"workers must be >= 0, got {c.workers}")
    for n in ("ckpt_every_steps", "max_steps", "threads"):
        v = getattr(c, n)
        if v is not None:
            pos_int(n)
    if c.opt not in _OPTIMIZERS:
        raise ConfigError(f"opt must be one of {', '.join(_OPTIMIZERS)}, got {c.opt!r}")
    if c.amp not in _AMP:
        raise ConfigError(f"amp must be one of {', '.join(_AMP)}, got {c.amp!r}")
    if c.layer_decay is not None and not (0.0 < c.layer_decay <= 1.0):
        raise ConfigError(f"layer_decay must be in (0, 1], got {c.layer_decay!r}")
    if c.clip_grad is not None and not c.clip_grad > 0:
        raise ConfigError(f"clip_grad must be > 0, got {c.clip_grad!r}")
    if c.sam_rho is not None and not c.sam_rho > 0:
        raise ConfigError(f"sam_rho must be > 0, got {c.sam_rho!r}")
    if c.ema_decay is not None and not (0.0 < c.ema_decay < 1.0):
        raise ConfigError(f"ema_decay must be in (0, 1), got {c.ema_decay!r}")
    if c.sam_rho is not None and c.amp == "fp16":
        raise ConfigError("SAM with fp16 AMP (a dynamic loss scale between its two passes) is not supported; use amp bf16 or none")
    for n in ("scale", "ratio", "betas"):
        if len(getattr(c, n)) != 2:
            raise ConfigError(f"{n} needs two values, got {getattr(c, n)}")
    for n in ("scale", "ratio"):
        lo, hi = getattr(c, n)
        if not (0 < lo <= hi) or (n == "scale" and hi > 1):
            raise ConfigError(f"{n} must be a range 0 < lo <= hi{' <= 1' if n == 'scale' else ''}, got {getattr(c, n)}")
    if len(c.mean) != 3 or len(c.std) != 3 or any(s <= 0 for s in c.std):
        raise ConfigError(f"mean and std need 3 values (std > 0), got {c.mean} and {c.std}")
    if not 0 < c.crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {c.crop_pct}")
    if not isinstance(c.model_kwargs, dict):
        raise ConfigError(f"model_kwargs must be a mapping, got {type(c.model_kwargs).__name__}")
    per = world_size * c.accum_steps
    if c.batch_size % per:
        raise ConfigError(
            f"the global batch ({c.batch_size}) must be a multiple of world size x accumulation steps "
            f"({world_size} x {c.accum_steps} = {per})")
    if (c.mixup > 0 or c.cutmix > 0) and c.micro_batch(world_size) % 2:
        raise ConfigError(
            f"mixup/cutmix pair neighbouring images (0-1, 2-3, ...) of each forward batch, which must "
            f"therefore be even; got {c.micro_batch(world_size)} = {c.batch_size} / "
            f"({world_size} ranks x {c.accum_steps} accumulation steps)")
