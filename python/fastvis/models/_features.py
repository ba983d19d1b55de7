"""Feature-extraction helpers shared by the model families (timm's conventions)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["FeatureInfo", "normalize_out_indices"]


def normalize_out_indices(out_indices, num_stages: int) -> Tuple[int, ...]:
    """Stage indices in ascending order; negative ones count from the end (timm's rule).
    Empty, repeated, out-of-range or non-int entries are errors."""
    if isinstance(out_indices, int) and not isinstance(out_indices, bool):
        out_indices = (out_indices,)
    try:
        items = list(out_indices)
    except TypeError:
        raise TypeError(f"out_indices: expected a sequence of stage indices, got {out_indices!r}") from None
    if not items:
        raise ValueError("out_indices: expected at least one stage index, got an empty sequence")
    norm = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"out_indices: expected ints, got {i!r} in {out_indices!r}")
        if not -num_stages <= i < num_stages:
            raise ValueError(f"out_indices: {i} is out of range for {num_stages} stages "
                             f"(valid: {-num_stages}..{num_stages - 1})")
        norm.append(i % num_stages)
    if len(set(norm)) != len(norm):
        raise ValueError(f"out_indices: repeated stage in {out_indices!r}")
    return tuple(sorted(norm))


class FeatureInfo(list):
    """A list of per-stage dicts (``num_chs``, ``reduction``, ``module``), like timm's
    ``model.feature_info``, with the accessors of timm's ``FeatureInfo`` restricted to
    ``out_indices`` (every stage by default): ``channels()``, ``reduction()``,
    ``module_name()``."""

    def __init__(self, stages: Sequence[Dict], out_indices: Optional[Sequence[int]] = None):
        super().__init__(dict(s) for s in stages)
        self.out_indices = tuple(range(len(self))) if out_indices is None else tuple(out_indices)

    def get(self, key: str, idx: Optional[int] = None):
        if idx is None:
            return [self[i][key] for i in self.out_indices]
        return self[self.out_indices[idx]][key]

    def channels(self, idx: Optional[int] = None) -> List[int]:
        return self.get("num_chs", idx)

    def reduction(self, idx: Optional[int] = None) -> List[int]:
        return self.get("reduction", idx)

    def module_name(self, idx: Optional[int] = None) -> List[str]:
        return self.get("module", idx)
