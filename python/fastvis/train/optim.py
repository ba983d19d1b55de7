"""Optimizers: parameter groups (weight decay, layer-wise lr decay), the warmup + cosine
schedule, and SAM.

**Weight decay** applies to weights of two or more dimensions only: biases, norm
weights, layer scales (``gamma``) and GRN vectors (all 1-D) get none (timm's rule).

**Layer-wise lr decay** (BEiT, used by ConvNeXt fine-tuning) for a ConvNeXt-style
module (``stem``, ``stages[i].downsample``, ``stages[i].blocks[j]``, anything else = the
head): the stem is layer 0, the blocks are layers 1..B in order, a stage's downsampling
layer belongs with that stage's first block, and the head (``norm_pre``, ``head``, ...) is
layer B + 1. Layer ``l`` gets ``lr_scale = layer_decay ** (B + 1 - l)``: the head trains at
the full rate, the stem at ``layer_decay ** (B + 1)`` of it.

**Schedule**: per optimizer step ``t`` (0-based; the rate used *by* step t),
``warmup_lr + (lr - warmup_lr) * t / W`` for ``t < W`` warm-up steps, then
``min_lr + (lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2`` up to ``T`` steps; each
group's rate is that times its ``lr_scale``.

**SAM** (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", 2021): with gradient g at w, ``e = rho * g / ||g||`` (ASAM: ``e = rho *
w^2 g / ||w g||``), the gradient is taken again at ``w + e`` and the base optimizer steps
from w with that gradient.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["layer_ids", "param_groups", "build_optimizer", "WarmupCosine", "SAM", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
                "DistributedDataParallel", "DataParallel"):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def layer_ids(model: nn.Module) -> Tuple[Dict[str, int], int]:
    """(parameter name -> layer id, number of layers incl. stem and head) for a
    ConvNeXt-style model; ``ValueError`` for other structures."""
    stages = getattr(model, "stages", None)
    if not hasattr(model, "stem") or stages is None:
        raise ValueError(
            f"layer-wise lr decay needs a ConvNeXt-style model (stem, stages[i].blocks[j]); "
            f"{type(model).__name__} has no {'stem' if not hasattr(model, 'stem') else 'stages'}")
    first_block: Dict[int, int] = {}
    block_id: Dict[Tuple[int, int], int] = {}
    n = 0
    for i, stage in enumerate(stages):
        blocks = getattr(stage, "blocks", None)
        if blocks is None:
            raise ValueError(f"layer-wise lr decay: stages[{i}] of {type(model).__name__} has no blocks")
        for j in range(len(blocks)):
            n += 1
            block_id[(i, j)] = n
            first_block.setdefault(i, n)
    head = n + 1
    ids = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "stem":
            ids[name] = 0
        elif parts[0] == "stages" and len(parts) > 2 and parts[1].isdigit():
            i = int(parts[1])
            if parts[2] == "blocks" and len(parts) > 3 and parts[3].isdigit():
                ids[name] = block_id[(i, int(parts[3]))]
            else:  # downsample and any other stage-level parameter
                ids[name] = first_block.get(i, head)
        else:
            ids[name] = head
    return ids, head + 1


def _no_decay(name: str, p: torch.Tensor, skip: Iterable[str]) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or name in skip


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: decay / no-decay (and per layer with ``layer_decay``);
    each group has ``weight_decay``, ``lr_scale`` and ``names`` (for inspection).
    ``model.no_weight_decay()`` (timm's hook), when present, adds names to the no-decay set."""
    skip = set()
    if hasattr(model, "no_weight_decay"):
        try:
            skip = set(model.no_weight_decay())
        except Exception:
            skip = set()
    if layer_decay is not None and layer_decay < 1.0:
        ids, num_layers = layer_ids(model)
    else:
        ids, num_layers = None, 1
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        nd = _no_decay(name, p, skip)
        lid = ids[name] if ids is not None else 0
        key = (lid, nd)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - lid) if ids is not None else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if nd else weight_decay,
                           "lr_scale": scale, "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, Nesterov) over :func:`param_groups`, wrapped in :class:`SAM`
    when ``cfg.sam_rho`` is set."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    if cfg.opt == "adamw":
        base = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    elif cfg.opt == "sgd":
        base = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.opt!r}")
    if cfg.sam_rho is not None:
        return SAM(base, rho=cfg.sam_rho, adaptive=cfg.sam_adaptive)
    return base


class WarmupCosine:
    """Linear warm-up then cosine decay, per optimizer step (see the module docstring).
    ``step()`` advances; :meth:`lr_at` gives the rate of any step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int = 0,
                 warmup_lr: float = 0.0, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.lr, self.total, self.warmup = float(lr), max(1, int(total_steps)), max(0, int(warmup_steps))
        self.warmup_lr, self.min_lr = float(warmup_lr), float(min_lr)
        self.last_step = 0
        self._apply()

    def lr_at(self, t: int) -> float:
        if t < self.warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * t / self.warmup
        span = max(1, self.total - self.warmup)
        frac = min(1.0, (t - self.warmup) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * frac))

    def _apply(self) -> None:
        base = self.lr_at(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = base * g.get("lr_scale", 1.0)

    @property
    def current_lr(self) -> float:
        return self.lr_at(self.last_step)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step, "lr": self.lr, "total": self.total, "warmup": self.warmup,
                "warmup_lr": self.warmup_lr, "min_lr": self.min_lr}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.last_step = int(sd["last_step"])
        self._apply()


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around a base optimizer (shares its parameter groups
    and state). Use either ``step(closure)`` (the closure zeroes nothing, runs forward and
    backward and returns the loss; it is called twice) or, as the trainer does,
    ``first_step()`` / recompute gradients / ``second_step()``."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False):
        if not rho > 0:
            raise ValueError(f"SAM: rho must be > 0, got {rho!r}")
        self.base_optimizer = base_optimizer
        self.rho, self.adaptive = float(rho), bool(adaptive)
        # share the base optimizer's groups and state (the Optimizer base class is only used
        # for its helpers; param_groups / state / defaults are the base's)
        self.param_groups = base_optimizer.param_groups
        self.defaults = dict(base_optimizer.defaults, rho=self.rho, adaptive=self.adaptive)
        self.state = base_optimizer.state
        self._perturbation: Dict[torch.Tensor, torch.Tensor] = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    def _params(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    yield p

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        norms = [((p.abs() if self.adaptive else 1.0) * p.grad).norm(2) for p in self._params()]
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(norms), 2)

    @torch.no_grad()
    def first_step(self) -> None:
        """w <- w + e(w): climbs to the (approximate) worst point of the rho-ball."""
        scale = self.rho / (self.grad_norm() + 1e-12)
        self._perturbation = {}
        for p in self._params():
            e = (p * p if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e)
            self._perturbation[p] = e

    @torch.no_grad()
    def second_step(self) -> None:
        """w <- w - e(w), then the base optimizer's step with the gradient taken at w + e."""
        for p, e in self._perturbation.items():
            p.sub_(e)
        self._perturbation = {}
        self.base_optimizer.step()

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        if closure is None:
            raise RuntimeError("SAM.step needs a closure (forward + backward); or call first_step/second_step")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        self.zero_grad()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
