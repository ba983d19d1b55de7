"""Loading weights from local files only: fastvis never downloads anything.

``find_cached_weights`` looks where timm (``huggingface_hub``) and ``torch.hub`` would
have put a model's file; ``load_state_dict_file`` reads a ``.pth`` / ``.pt`` / ``.bin``
(``torch.load`` with ``weights_only=True``) or ``.safetensors`` file;
``load_pretrained`` runs the family's ``checkpoint_filter_fn`` and loads the result
strictly, adapting only the classifier (another ``num_classes``) and the first
convolution (another ``in_chans``), as timm does.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["find_cached_weights", "load_state_dict_file", "load_pretrained", "PretrainedWeightsNotFound"]

_HF_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsNotFound(FileNotFoundError):
    """``pretrained=True`` and no local weights file: nothing is ever downloaded."""


def _hf_hub_cache() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(hf_home, "hub")


def _hf_snapshot_files(repo_id: str) -> Tuple[str, List[str]]:
    """(the repository's cache folder, candidate files in it: the ``main`` snapshot's
    first, then any other snapshot's)."""
    folder = os.path.join(_hf_hub_cache(), "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(folder, "snapshots")
    revs: List[str] = []
    ref = os.path.join(folder, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            revs.append(f.read().strip())
    if os.path.isdir(snapshots):
        others = [r for r in os.listdir(snapshots) if r not in revs]
        others.sort(key=lambda r: os.path.getmtime(os.path.join(snapshots, r)), reverse=True)
        revs += others
    return folder, [os.path.join(snapshots, r, f) for r in revs for f in _HF_FILES]


def find_cached_weights(cfg: Mapping) -> Tuple[Optional[str], List[str]]:
    """The first existing local file for a pretrained config (keys ``hf_hub_id`` and
    ``file_name``), and every place looked at (for the error message)."""
    looked: List[str] = []
    if cfg.get("hf_hub_id"):
        folder, files = _hf_snapshot_files(cfg["hf_hub_id"])
        looked.append(os.path.join(folder, "snapshots", "*", "{" + ",".join(_HF_FILES) + "}"))
        for path in files:
            if os.path.isfile(path):
                return path, looked
    if cfg.get("file_name"):
        path = os.path.join(torch.hub.get_dir(), "checkpoints", cfg["file_name"])
        looked.append(path)
        if os.path.isfile(path):
            return path, looked
    return None, looked


def load_state_dict_file(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Reads a checkpoint file onto the CPU: ``.safetensors`` with the ``safetensors``
    package, anything else with ``torch.load(weights_only=True)`` (tensors and plain
    containers only; no code in the file runs)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_path: no such file: {path!r}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"reading {path!r} needs the 'safetensors' package (pip install safetensors)") from e
        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"could not read {path!r} with torch.load(weights_only=True): {e}. If the file is a "
            "trusted training checkpoint with non-tensor objects, load it yourself "
            "(torch.load(path, weights_only=False)) and pass the state dict to "
            "fastvis.models.load_checkpoint(model, state_dict)") from e


def _adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """timm's rule for a pretrained first convolution with another input-channel count:
    1 channel sums the RGB kernels; more repeats them, scaled by 3 / in_chans."""
    src = weight.shape[1]
    if in_chans == src:
        return weight
    w = weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // src)
        out = w.repeat(1, reps, 1, 1)[:, :in_chans] * (src / in_chans)
    return out.to(weight.dtype)


def load_pretrained(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    filter_fn: Optional[Callable[[Mapping[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None,
    first_conv: Optional[str] = None,
    classifier: Optional[str] = None,
) -> None:
    """Loads ``state_dict`` (after ``filter_fn``) strictly into ``model``. Allowed
    differences, handled as timm does: the first convolution's input channels (adapted)
    and the classifier's size (left at the model's fresh initialisation)."""
    sd = dict(filter_fn(state_dict, model) if filter_fn is not None else state_dict)
    own = model.state_dict()
    if first_conv and first_conv + ".weight" in sd and first_conv + ".weight" in own:
        key = first_conv + ".weight"
        if sd[key].dim() == 4 and sd[key].shape[1] != own[key].shape[1]:
            sd[key] = _adapt_first_conv(sd[key], own[key].shape[1])
    allowed_missing = set()
    if classifier:
        for suffix in (".weight", ".bias"):
            key = classifier + suffix
            if key in sd and (key not in own or tuple(sd[key].shape) != tuple(own[key].shape)):
                del sd[key]
                if key in own:
                    allowed_missing.add(key)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        raise RuntimeError(
            f"pretrained weights do not match {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}")
