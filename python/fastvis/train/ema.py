"""Model EMA: an exponential moving average of the weights (timm's ``ModelEmaV2`` rule).

After every optimizer step, ``ema = decay * ema + (1 - decay) * model`` for floating-point
parameters and buffers (integer buffers are copied), with ``decay = min(ema_decay, (1 + n)
/ (10 + n))`` after n updates when ``warmup`` is on, so early averages are not dominated by
the random initialisation.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = model.state_dict()
        for name, e in self.module.state_dict().items():
            m = src[name].detach()
            if e.is_floating_point():
                e.lerp_(m.to(e.dtype), 1.0 - d)
            else:
                e.copy_(m)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def ema_state(self) -> Dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_ema_state(self, st: Dict[str, Any]) -> None:
        self.module.load_state_dict(st["module"])
        self.num_updates = int(st["num_updates"])
