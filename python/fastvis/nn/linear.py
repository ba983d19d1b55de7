"""``fastvis.nn.Linear``: ``nn.Linear`` whose small-batch inference runs the core's
streaming kernel (:func:`fastvis.ops.linear`)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same constructor, parameters, initialisation and state-dict keys, and
    an instance of it) whose forward is :func:`fastvis.ops.linear`: in inference on CPU
    float32 input of at most ``fastvis.ops.linear.FEW_ROWS`` rows the core reads the weight
    as a stream of dot products on both threads (the classifier heads at batch 1, whose
    weights arrive from DRAM); anything else is ``F.linear``. The models' classifier heads
    use it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
