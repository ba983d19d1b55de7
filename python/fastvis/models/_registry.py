"""The model registry: ``register_model``, ``create_model``, ``list_models``.

Model families register *entry points*, functions named after the model
(``convnext_tiny(pretrained=False, **kwargs)``) that build it, as timm does.
``create_model`` looks the name up, applies the common keyword arguments and calls the
entry point; the family's builder does the rest (weights, ``features_only``).
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "is_model", "model_entrypoint", "split_model_name"]

_entrypoints: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers ``fn`` under its ``__name__`` as a model entry point.

    The entry point takes ``pretrained`` and keyword arguments and returns the model.
    Registering a name twice is an error (it would silently replace a model)."""
    if not callable(fn):
        raise TypeError(f"register_model: expected a function, got {type(fn).__name__}")
    name = fn.__name__
    if name in _entrypoints and _entrypoints[name] is not fn:
        raise ValueError(f"register_model: a model named {name!r} is already registered")
    _entrypoints[name] = fn
    return fn


def list_models(pattern: Union[str, Sequence[str]] = "*", exclude: Union[str, Sequence[str], None] = None) -> List[str]:
    """Sorted names of the registered models matching ``pattern`` (shell-style
    wildcards, :mod:`fnmatch`; a list of patterns matches any of them), minus those
    matching ``exclude``."""
    pats = [pattern] if isinstance(pattern, str) else list(pattern)
    excl: Iterable[str] = [] if exclude is None else ([exclude] if isinstance(exclude, str) else list(exclude))
    names = [n for n in _entrypoints if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in excl)]
    return sorted(names)


def split_model_name(name: str):
    """``"convnext_atto.d2_in1k"`` -> ``("convnext_atto", "d2_in1k")``; no tag -> ``(name, None)``."""
    arch, sep, tag = name.partition(".")
    return arch, (tag if sep else None)


def is_model(name: str) -> bool:
    return isinstance(name, str) and split_model_name(name)[0] in _entrypoints


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The entry point of ``name`` (a tag after a dot is ignored); a ``ValueError`` naming
    the closest registered names if there is none."""
    if not isinstance(name, str):
        raise TypeError(f"model name: expected a str, got {type(name).__name__}")
    arch = split_model_name(name)[0]
    if arch in _entrypoints:
        return _entrypoints[arch]
    close = difflib.get_close_matches(arch, list(_entrypoints), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown model {name!r}{hint} (fastvis.list_models() lists the {len(_entrypoints)} "
        "registered models)")


def create_model(
    model_name: str,
    pretrained: bool = False,
    pretrained_path: Optional[str] = None,
    num_classes: Optional[int] = None,
    drop_path_rate: Optional[float] = None,
    features_only: bool = False,
    out_indices: Optional[Sequence[int]] = None,
    **kwargs,
) -> nn.Module:
    """Builds a registered model, timm-style.

    Args:
        model_name: a registered name (``fastvis.list_models()``), optionally with a
            pretrained tag after a dot (``"convnext_atto.d2_in1k"``); the tag only chooses
            which cached weights ``pretrained=True`` looks for.
        pretrained: load weights. fastvis **never downloads**: the weights come from
            ``pretrained_path`` or from a local cache (the Hugging Face hub cache and
            ``$TORCH_HOME/hub/checkpoints``, under timm's file names); a clear error
            says where it looked if nothing is found.
        pretrained_path: a local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file
            (timm or official layout); giving one implies ``pretrained=True``.
        num_classes: classifier size (default: the model's, 1000); 0 removes the
            classifier. With pretrained weights of another size the classifier is left
            freshly initialised.
        drop_path_rate: stochastic-depth rate of the last block (linear from 0).
        features_only: return a feature extractor whose forward gives a list of stage
            outputs (timm's ``FeatureListNet`` outputs), selected by ``out_indices``.
        **kwargs: passed to the model constructor (e.g. ``in_chans``, ``drop_rate``,
            ``ls_init_value``, ``head_init_scale``, ``kernel_sizes``, ``patch_size``).
    """
    entry = model_entrypoint(model_name)
    _, tag = split_model_name(model_name)
    if out_indices is not None and not features_only:
        raise ValueError("create_model: out_indices is only meaningful with features_only=True")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if features_only:
        kwargs["features_only"] = True
        if out_indices is not None:
            kwargs["out_indices"] = out_indices
    if pretrained_path is not None:
        pretrained = True
    if pretrained:
        kwargs["pretrained_path"] = pretrained_path
        kwargs["pretrained_tag"] = tag
    return entry(pretrained=bool(pretrained), **kwargs)
