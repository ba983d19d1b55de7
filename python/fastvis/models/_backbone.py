"""What the staged backbones of the zoo share: argument checks, the input check, feature
extraction (timm's ``features_only``) bookkeeping."""
from __future__ import annotations

import numbers
from typing import List, Sequence, Tuple

import torch

from ._features import FeatureInfo, normalize_out_indices

__all__ = ["positive_int", "probability", "StagedBackbone"]


def positive_int(family: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{family}: {name} must be a positive int, got {v!r}")
    return int(v)


def probability(family: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{family}: {name} must be a number in [0, 1], got {v!r}")
    return float(v)


class StagedBackbone:
    """Mixin for models with ``stages`` (and ``stem``), ``in_chans``, ``feature_info``,
    ``features_only`` and ``out_indices``. ``_family`` names the model in messages."""

    _family = "model"

    def _num_stages_kept(self) -> int:
        return len(self.stages)

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._family}: expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{self._family}: expected input of shape (N, {self.in_chans}, H, W), "
                             f"got {tuple(x.shape)}")
        reduction = self.feature_info[self._num_stages_kept() - 1]["reduction"]
        h, w = x.shape[-2:]
        if h < reduction or w < reduction:
            raise ValueError(f"{self._family}: input {h}x{w} is smaller than the network's total "
                             f"stride {reduction}")

    def _check_not_features(self, what: str) -> None:
        if self.features_only:
            raise RuntimeError(f"{what}: this {self._family} is a feature extractor "
                               "(features_only=True) and has no head")

    def _forward_feature_list(self, x: torch.Tensor) -> List[torch.Tensor]:
        """stem, then the stages, keeping the outputs of ``out_indices`` (channels_last)."""
        self._check_input(x)
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                out.append(x)
        return out

    def _features_plan(self, out_indices: Sequence[int]) -> Tuple[List[int], int]:
        """(normalised out_indices, number of stages to keep) for ``as_features``."""
        if self.features_only:
            raise RuntimeError("as_features: the model is already a feature extractor")
        idx = normalize_out_indices(out_indices, len(self.stages))
        return idx, max(idx) + 1

    def _become_features(self, idx: List[int], keep: int):
        """The bookkeeping that ends every ``as_features``; returns the model."""
        self.num_classes = 0
        self.features_only = True
        self.out_indices = idx
        self.feature_info = FeatureInfo(list(self.feature_info)[:keep], idx)
        return self
