"""Image transforms on tensors, mixup / cutmix and the soft-target loss.

No torchvision: images are (C, H, W) tensors (uint8 0..255 or float 0..1) and every random
draw takes an explicit ``torch.Generator`` (or ``numpy.random.Generator``), so that the
trainer can derive each draw from (seed, epoch, position in the global batch): the same
image gets the same augmentation whatever the number of ranks, and a resumed run repeats
exactly what an uninterrupted one would have done.

* :func:`random_resized_crop_params` / :func:`resized_crop`: torchvision's
  ``RandomResizedCrop`` algorithm (10 tries at a random area fraction in ``scale`` and a
  log-uniform aspect ratio in ``ratio``, else a centre crop clamped to the ratio range),
  resized with bilinear interpolation and antialiasing.
* :class:`TrainTransform` (crop, flip, normalise) and :class:`EvalTransform` (resize the
  short side to ``img_size / crop_pct``, centre crop, normalise).
* :class:`Mixer`: mixup (Zhang et al.) and cutmix (Yun et al.) with label smoothing, one
  mixing coefficient per batch, as timm's ``Mixup(mode="batch")``. **Partners are
  neighbouring pairs** (0 with 1, 2 with 3, ...) of the (shuffled) batch, where timm mixes a
  batch with its reverse: with an even per-rank batch no pair crosses a rank boundary, so a
  distributed run mixes exactly the images a single process would.
* :func:`soft_target_cross_entropy`: ``mean_n sum_c -t[n, c] log softmax(x)[n, c]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "to_float", "random_resized_crop_params", "resized_crop", "resize_short_side", "center_crop",
    "normalize", "TrainTransform", "EvalTransform", "MixParams", "Mixer", "one_hot_smooth",
    "soft_target_cross_entropy",
]


def to_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1; float images are returned as float32."""
    if img.dtype == torch.uint8:
        return img.to(torch.float32).div_(255.0)
    return img.to(torch.float32)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def random_resized_crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                               g: torch.Generator) -> Tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) by torchvision's RandomResizedCrop.get_params rule."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    # fallback: centre crop with the ratio clamped to the range
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(img: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def resized_crop(img: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """Crops (C, H, W) float ``img`` and resizes the crop to size x size (bilinear, antialiased)."""
    return _resize(img[:, top:top + h, left:left + w], (size, size))


def resize_short_side(img: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    if h <= w:
        nh, nw = size, max(1, int(round(w * size / h)))
    else:
        nh, nw = max(1, int(round(h * size / w))), size
    return _resize(img, (nh, nw))


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    if h < size or w < size:
        img = resize_short_side(img, size)
        h, w = img.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top:top + size, left:left + size]


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
    return (img - m) / s


@dataclass
class TrainTransform:
    """Random resized crop to img_size, horizontal flip with probability ``hflip``,
    normalisation. ``__call__(img, g)`` draws from generator ``g`` only."""

    img_size: int
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)

    def __call__(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        img = to_float(img)
        top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], self.scale, self.ratio, g)
        img = resized_crop(img, top, left, h, w, self.img_size)
        flip = float(torch.rand((), generator=g, dtype=torch.float64)) < self.hflip
        if flip:
            img = img.flip(-1)
        return normalize(img, self.mean, self.std).contiguous()


@dataclass
class EvalTransform:
    """Resize the short side to ``img_size / crop_pct`` and centre-crop img_size (images
    already img_size x img_size pass unchanged), normalise."""

    img_size: int
    crop_pct: float = 0.875
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)

    def __call__(self, img: torch.Tensor, g: Optional[torch.Generator] = None) -> torch.Tensor:
        img = to_float(img)
        if tuple(img.shape[-2:]) != (self.img_size, self.img_size):
            img = resize_short_side(img, int(math.floor(self.img_size / self.crop_pct)))
            img = center_crop(img, self.img_size)
        return normalize(img, self.mean, self.std).contiguous()


# ----------------------------------------------------------------------------- mixing


def one_hot_smooth(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """timm's smoothed one-hot: ``1 - smoothing + smoothing / K`` on the class,
    ``smoothing / K`` elsewhere (float32)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((target.shape[0], num_classes), off, dtype=torch.float32, device=target.device)
    return out.scatter_(1, target.long().view(-1, 1), on)


@dataclass
class MixParams:
    """One batch's mixing: ``kind`` "none" | "mixup" | "cutmix", ``lam`` the weight of each
    image itself (after cutmix: 1 - box area / image area), ``box`` (y0, y1, x0, x1) for
    cutmix."""

    kind: str = "none"
    lam: float = 1.0
    box: Optional[Tuple[int, int, int, int]] = None


def pair_partner(n: int, device=None) -> torch.Tensor:
    """Index of each image's mixing partner: 0<->1, 2<->3, ... (an odd last image mixes with
    itself)."""
    idx = torch.arange(n, device=device) ^ 1
    if n % 2:
        idx[-1] = n - 1
    return idx


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """timm's ``rand_bbox``: a box of sides H*sqrt(1-lam), W*sqrt(1-lam) centred at a uniform
    random pixel, clipped to the image; (y0, y1, x0, x1)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy = int(rng.integers(0, height))
    cx = int(rng.integers(0, width))
    y0, y1 = int(np.clip(cy - ch // 2, 0, height)), int(np.clip(cy + ch // 2, 0, height))
    x0, x1 = int(np.clip(cx - cw // 2, 0, width)), int(np.clip(cx + cw // 2, 0, width))
    return y0, y1, x0, x1


class Mixer:
    """Mixup / cutmix with label smoothing (timm's ``Mixup``, batch mode, neighbour pairs).

    ``draw(rng, H, W)`` decides one batch's mixing from a numpy Generator; ``apply(x, y,
    params)`` returns the mixed images and the soft targets. Without mixup and cutmix
    (alphas 0) the targets are just the smoothed one-hot vectors.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.0):
        self.num_classes = int(num_classes)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self, rng: np.random.Generator, height: int, width: int) -> MixParams:
        if not self.active:
            return MixParams()
        if float(rng.random()) >= self.prob:
            return MixParams()
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = float(rng.random()) < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return MixParams("mixup", lam)
        box = cutmix_box(height, width, lam, rng)
        y0, y1, x0, x1 = box
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return MixParams("cutmix", lam, box)

    def apply(self, x: torch.Tensor, target: torch.Tensor, params: MixParams) -> Tuple[torch.Tensor, torch.Tensor]:
        t = one_hot_smooth(target, self.num_classes, self.label_smoothing).to(x.device)
        if params.kind == "none":
            return x, t
        p = pair_partner(x.shape[0], x.device)
        lam = params.lam
        if params.kind == "mixup":
            x = x * lam + x[p] * (1.0 - lam)
        else:
            y0, y1, x0, x1 = params.box
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x[p][:, :, y0:y1, x0:x1]
        return x, t * lam + t[p] * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy with probability targets, averaged over the batch (float32 maths)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
