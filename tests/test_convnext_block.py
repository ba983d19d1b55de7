"""The fused ConvNeXt block (CPU): fastvis.ops.convnext_block.

    y = x + drop_scale[n] * gamma * fc2(GRN?(GELU(fc1(LayerNorm_C(dwconv_kxk(x))))))

Every result is compared with a float64 oracle written here from plain torch ops
(F.conv2d with groups=C and padding k//2, F.layer_norm over the channels of the permuted
NHWC tensor, F.linear, F.gelu, the layer scale, the per-sample drop scale and the
residual), evaluated on exactly the values the kernel saw (inputs are drawn in float32 and
rounded once to the test dtype, so their float64 copies are exact). It does not use
fastvis' own reference; test_reference_matches_oracle checks that one against it.

Tolerances
----------
Per element, |got - ref| <= rtol * (|ref| + mag)  (+ the bfloat16 terms below), where
`mag` comes from a first-order forward error analysis carried through the block by
`_magnitudes` (every linear map applied to absolute values; the non-linear steps use the
bounds of their derivatives):

* dwconv:    m1 = conv(|x|, |w|) + |b|                          (k*k terms)
* LayerNorm: with r = rstd, xh = x_hat, mb = mean_c m1, an input error e*m1 moves x_hat by
             e*(r*(m1 + mb) + |xh|*q), q = r*mean_c(|xh|*(m1 + mb)) (the relative error
             of rstd); a = |xh| + r*(m1 + mb) + |xh|*q, a2 = |nw|*a + |nb|.  This is
             what makes the bounds honest for ill-conditioned pixels (C = 1 or 2, or a
             variance close to eps), where LayerNorm amplifies its input's error by r.
* fc1:       mh = a2 |W1|^T + |b1|;  GELU: mg = 1.13*mh (max |gelu'| = 1.1290)
* fc2, out:  mo = mg |W2|^T + |b2|;  y: |x| + |ds*gamma|*mo
* backward:  the transposed maps on |grad_y|, GELU's backward with
             |gelu''| <= 0.80, LayerNorm's backward magnitude
             r*(|g| + mean|g| + a*mean(|g|*a))*(1 + q) (as in test_layer_norm.py, with the
             rstd error factor), then conv^T(|w|) for grad_x and conv_w(|x|) for the
             depthwise weight.
* A parameter gradient is a sum over the P = N*H*W pixels of per-pixel terms whose
  rounding errors are independent from pixel to pixel (and whose signs are random: every
  term is linear in the random grad_y), so its `mag` is the root-sum-square of the
  per-pixel term magnitudes (|ref| covers the partial sums of same-signed terms).

rtol = 4*sqrt(L)*u: the probabilistic bound of Higham & Mary (2019) for a computation
whose longest chain of dependent roundings has length L (lambda = 4 leaves a wide margin
over the ~1 sigma a random-rounding model predicts); u is the unit roundoff of the
accumulation type (2^-53 for float64, 2^-24 for float32 and bfloat16, whose kernel
computes in float32). L adds up the reduction lengths the value went through:
k*k (dwconv) + 3*C (LayerNorm mean, variance, fc1) + hidden (fc2) + 16 (pointwise steps
and the GELU/exp approximations, whose error is ~1.3 u) for y; the backward adds
2*hidden + 3*C + k*k + 16 per pixel, and the parameter gradients P. GRN adds 2*H*W +
2*hidden each way. For the sizes used here this gives, relative to `mag`:
float32 1e-6 ... 2e-5 (i.e. ~1e-5 of the output scale), float64 ~1e-14, which we floor at
1e-12 (the oracle, also float64, errs by the same order).

bfloat16 (inputs and grad_output bf16-exact, float32 inside the kernel): every result is
rounded once to bf16, 8 significant bits, so round-to-nearest errs by <= u_bf16*|value|,
u_bf16 = 2^-8; we allow 2*u_bf16*|ref| (~1 ulp; a factor 2 for margin) on top of the
float32 bound. In the backward pass the kernel also stores D = dL/d(dwconv output) as
bfloat16 and rounds the depthwise backward's output once more before adding grad_y, so
grad_x gets 2*u_bf16*|grad_x - grad_y| + 4*u_bf16*sqrt(conv^T(D^2, w^2)) and the
depthwise weight / bias gradients 4*u_bf16*sqrt(sum of (D*x)^2 resp. D^2) (the
independent roundings of D, root-sum-square as above). In all, a few bf16 ulps of the
output scale.

Shapes stay small (N <= 3, C <= 40, H, W <= 15) so the whole file runs in well under a
minute on two busy cores; one test runs the ConvNeXt-T stage-1 shape.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastvis
import fastvis.ops
from conftest import single_threaded_torch, sweep

_C = fastvis._C
op = fastvis.ops.convnext_block
reference = fastvis.ops.convnext_block_reference
# fastvis.ops.convnext_block is the function; the module of the same name:
_mod = importlib.import_module("fastvis.ops.convnext_block")

ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
PARAMS = ("dw_weight", "dw_bias", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias",
          "fc2_weight", "fc2_bias", "gamma")
OPTIONAL = ("dw_bias", "norm_weight", "norm_bias", "fc1_bias", "fc2_bias", "gamma")
LAMBDA = 4.0
GELU1 = 1.13  # max |gelu'(x)|: 1.12890 (erf), 1.12899 (tanh)
GELU2 = 0.80  # max |gelu''(x)|: 2*phi(0) = 0.79788 for both forms
BF16_U = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits): RN errs <= 2^-8 |v|

# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class BlockCfg:
    n: int
    c: int
    h: int
    w: int
    k: int = 7
    hidden: Optional[int] = None  # default 4*C
    layout: str = "nhwc"  # "nhwc" (channels_last) or "nchw" (contiguous)
    dtype: torch.dtype = torch.float32
    dw_bias: bool = True
    norm_weight: bool = True
    norm_bias: bool = True
    fc1_bias: bool = True
    fc2_bias: bool = True
    gamma: bool = True
    drop: str = "none"  # "none" | "ones" | "mixed" (1/keep, 0, ...: sample 0 kept) | "zeros"
    drop_dtype: Optional[torch.dtype] = None  # None: x's dtype
    drop_4d: bool = False  # drop_scale of shape (N, 1, 1, 1)
    approximate: str = "none"
    eps: float = 1e-6
    strided_params: bool = False  # non-contiguous parameter views
    grn: bool = False
    x_scale: float = 1.0

    @property
    def hd(self) -> int:
        return 4 * self.c if self.hidden is None else self.hidden

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "nhwc" else torch.contiguous_format

    @property
    def pixels(self) -> int:
        return self.n * self.h * self.w

    def short(self) -> str:
        opt = ",".join(o for o in OPTIONAL if getattr(self, o)) or "-"
        return (f"N={self.n} C={self.c} H={self.h} W={self.w} k={self.k} hidden={self.hd} "
                f"layout={self.layout} dtype={str(self.dtype).replace('torch.', '')} "
                f"params={opt} drop={self.drop}/{self.drop_dtype}/{'4d' if self.drop_4d else '1d'} "
                f"gelu={self.approximate} eps={self.eps} strided={self.strided_params} "
                f"grn={self.grn} x_scale={self.x_scale}")


def _rand(shape, scale, dtype, strided: bool, kind: str = "vec", offset: float = 0.0):
    """randn(shape) * scale + offset rounded once to dtype, optionally as a non-contiguous
    view (every other element of a vector, a transposed matrix, a permuted dw_weight)."""
    if not strided:
        return (torch.randn(shape) * scale + offset).to(dtype)
    if kind == "vec":
        return (torch.randn(shape[0] * 2) * scale + offset).to(dtype)[::2]
    if kind == "mat":
        return (torch.randn(shape[1], shape[0]) * scale + offset).to(dtype).t()
    c, _, k, _ = shape  # dw_weight (C, 1, k, k) stored as (k, k, 1, C)
    return (torch.randn(k, k, 1, c) * scale + offset).to(dtype).permute(3, 2, 0, 1)


def make_inputs(cfg: BlockCfg, requires_grad: bool = False):
    """(x, params, drop_scale, grn): x in cfg.layout; params a dict name -> tensor or None;
    grn a dict (grn_weight, grn_bias) or {}. Scales keep every stage O(1)."""
    dt, s = cfg.dtype, cfg.strided_params
    x = (torch.randn(cfg.n, cfg.c, cfg.h, cfg.w) * cfg.x_scale).to(dt)
    x = x.contiguous(memory_format=cfg.memory_format)
    p: Dict[str, Optional[torch.Tensor]] = {
        "dw_weight": _rand((cfg.c, 1, cfg.k, cfg.k), 1.0 / cfg.k, dt, s, "dw"),
        "dw_bias": _rand((cfg.c,), 0.5, dt, s) if cfg.dw_bias else None,
        "norm_weight": _rand((cfg.c,), 0.5, dt, s, offset=1.0) if cfg.norm_weight else None,
        "norm_bias": _rand((cfg.c,), 0.5, dt, s) if cfg.norm_bias else None,
        "fc1_weight": _rand((cfg.hd, cfg.c), 1.0 / math.sqrt(cfg.c), dt, s, "mat"),
        "fc1_bias": _rand((cfg.hd,), 0.5, dt, s) if cfg.fc1_bias else None,
        "fc2_weight": _rand((cfg.c, cfg.hd), 1.0 / math.sqrt(cfg.hd), dt, s, "mat"),
        "fc2_bias": _rand((cfg.c,), 0.5, dt, s) if cfg.fc2_bias else None,
        "gamma": _rand((cfg.c,), 1.0, dt, s) if cfg.gamma else None,
    }
    ds = None
    if cfg.drop != "none":
        vals = {"ones": [1.0], "zeros": [0.0], "mixed": [1.0 / 0.75, 0.0, 2.0, 1.0 / 0.9]}[cfg.drop]
        ds = torch.tensor([vals[i % len(vals)] for i in range(cfg.n)]).to(cfg.drop_dtype or dt)
        if cfg.drop_4d:
            ds = ds.reshape(cfg.n, 1, 1, 1)
    grn = {}
    if cfg.grn:
        grn = {"grn_weight": _rand((cfg.hd,), 0.5, dt, s), "grn_bias": _rand((cfg.hd,), 0.5, dt, s)}
    if requires_grad:
        x.requires_grad_(True)
        for t in list(p.values()) + list(grn.values()):
            if t is not None:
                t.requires_grad_(True)
    return x, p, ds, grn


def make_grad_output(cfg: BlockCfg) -> torch.Tensor:
    gy = torch.randn(cfg.n, cfg.c, cfg.h, cfg.w).to(cfg.dtype)
    return gy.contiguous(memory_format=cfg.memory_format)


def run(fn, x, p, ds, cfg: BlockCfg, grn=None, **kw):
    return fn(x, p["dw_weight"], p["dw_bias"], p["norm_weight"], p["norm_bias"], p["fc1_weight"],
              p["fc1_bias"], p["fc2_weight"], p["fc2_bias"], p["gamma"], ds, cfg.eps,
              approximate=cfg.approximate, **(grn or {}), **kw)


def leaves_of(x, p, grn=None):
    """name -> tensor for x and every given parameter that requires grad."""
    out = {"x": x} if x.requires_grad else {}
    out.update({k: v for k, v in p.items() if v is not None and v.requires_grad})
    out.update({k: v for k, v in (grn or {}).items() if v.requires_grad})
    return out


def op_grads(x, p, ds, cfg, gy, grn=None, fn=op):
    """(y, {name: grad}) of fn through autograd."""
    y = run(fn, x, p, ds, cfg, grn)
    lv = leaves_of(x, p, grn)
    g = torch.autograd.grad(y, list(lv.values()), gy)
    return y, dict(zip(lv.keys(), g))


# --------------------------------------------------------------------------- oracle


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def _oracle_grn(g, weight, bias, eps):
    """timm's GlobalResponseNorm on NHWC: gx = ||g||_2 over (H, W), nx = gx / (mean_c gx +
    eps), g + bias + weight * g * nx. (torch.linalg.vector_norm, like timm's torch.norm,
    takes the subgradient 0 where a channel is all zeros.)"""
    gx = torch.linalg.vector_norm(g, ord=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    return g + bias + weight * (g * nx)


def _oracle_forward(X, P, DS, eps, approximate, GRN, grn_eps):
    """The block in plain torch ops (X, P, DS, GRN float64); returns (y, t1)."""
    c, k = X.shape[1], P["dw_weight"].shape[-1]
    t1 = F.conv2d(X, P["dw_weight"], P["dw_bias"], padding=k // 2, groups=c)
    t = F.layer_norm(t1.permute(0, 2, 3, 1), (c,), P["norm_weight"], P["norm_bias"], eps)
    g = F.gelu(F.linear(t, P["fc1_weight"], P["fc1_bias"]), approximate=approximate)
    if GRN:
        g = _oracle_grn(g, GRN["grn_weight"], GRN["grn_bias"], grn_eps)
    o = F.linear(g, P["fc2_weight"], P["fc2_bias"])
    if P["gamma"] is not None:
        o = o * P["gamma"]
    if DS is not None:
        o = o * DS.reshape(-1, 1, 1, 1)
    return X + o.permute(0, 3, 1, 2), t1


class Ref:
    """A reference value with its error magnitude `mag`, chain length L and (bfloat16
    only) the extra bound of the kernel's intermediate bf16 roundings."""

    def __init__(self, ref, mag, length, bf16_extra=None):
        self.ref, self.mag, self.length, self.bf16_extra = ref, mag, length, bf16_extra


def oracle(x, p, ds, eps, approximate, gy=None, grn=None, grn_eps=1e-6) -> Dict[str, Ref]:
    """float64 references with error magnitudes: 'y' and, with gy, 'x' and the gradient of
    every given parameter (named as in PARAMS, plus grn_weight/grn_bias)."""
    with single_threaded_torch():
        return _oracle(x, p, ds, eps, approximate, gy, grn or {}, grn_eps)


def _oracle(x, p, ds, eps, approximate, gy, grn, grn_eps):
    X = _f64(x).contiguous()
    P = {k: _f64(v) for k, v in p.items()}
    DS = _f64(ds)
    GRN = {k: _f64(v) for k, v in grn.items()}
    names = ["x"] + [k for k in PARAMS if P[k] is not None] + list(GRN)
    leaves = {"x": X.clone().requires_grad_(True)}
    leaves.update({k: P[k].clone().requires_grad_(True) for k in PARAMS if P[k] is not None})
    leaves.update({k: v.clone().requires_grad_(True) for k, v in GRN.items()})
    PL = {k: leaves.get(k) for k in PARAMS}
    GL = {k: leaves[k] for k in GRN}
    y, t1 = _oracle_forward(leaves["x"], PL, DS, eps, approximate, GL, grn_eps)
    out = {}
    grads = D = None
    if gy is not None:
        *grads, D = torch.autograd.grad(y, [leaves[k] for k in names] + [t1], _f64(gy))
    mags = _magnitudes(X, P, DS, eps, approximate, GRN, grn_eps, t1.detach(),
                       None if gy is None else _f64(gy), D)
    out["y"] = Ref(y.detach(), *mags["y"])
    if gy is not None:
        for name, g in zip(names, grads):
            out[name] = Ref(g, *mags[name])
        # bfloat16: the kernel's bf16 copy of D and its rounded depthwise backward output
        k = P["dw_weight"].shape[-1]
        w2 = P["dw_weight"].square()
        out["x"].bf16_extra = (2 * BF16_U * (out["x"].ref - _f64(gy)).abs()
                               + LAMBDA * BF16_U * torch.nn.grad.conv2d_input(
                                   X.shape, w2, D.square(), padding=k // 2, groups=X.shape[1]).sqrt())
        out["dw_weight"].bf16_extra = LAMBDA * BF16_U * torch.nn.grad.conv2d_weight(
            X.square(), P["dw_weight"].shape, D.square(), padding=k // 2, groups=X.shape[1]).sqrt()
        if "dw_bias" in out:
            out["dw_bias"].bf16_extra = LAMBDA * BF16_U * D.square().sum(dim=(0, 2, 3)).sqrt()
    return out


def _magnitudes(X, P, DS, eps, approximate, GRN, grn_eps, t1, gy, D):
    """name -> (mag, L); see the module docstring. NHWC inside, NCHW out."""
    n, c, h, w = X.shape
    k = P["dw_weight"].shape[-1]
    hd = P["fc1_weight"].shape[0]
    pad = k // 2

    def absor(t, fill, size):
        return t.abs() if t is not None else torch.full((size,), fill, dtype=torch.float64)

    adw = P["dw_weight"].abs()
    anw, anb = absor(P["norm_weight"], 1.0, c), absor(P["norm_bias"], 0.0, c)
    aW1, ab1 = P["fc1_weight"].abs(), absor(P["fc1_bias"], 0.0, hd)
    aW2, ab2 = P["fc2_weight"].abs(), absor(P["fc2_bias"], 0.0, c)
    agam = absor(P["gamma"], 1.0, c)
    ads = (DS.abs().reshape(-1, 1, 1, 1) if DS is not None
           else torch.ones(n, 1, 1, 1, dtype=torch.float64))

    # forward
    m1 = F.conv2d(X.abs(), adw, None if P["dw_bias"] is None else P["dw_bias"].abs(),
                  padding=pad, groups=c).permute(0, 2, 3, 1)
    t = t1.permute(0, 2, 3, 1)
    mu = t.mean(-1, keepdim=True)
    r = ((t - mu).square().mean(-1, keepdim=True) + eps).rsqrt()
    axh = ((t - mu) * r).abs()
    mb = m1.mean(-1, keepdim=True)
    q = r * (axh * (m1 + mb)).mean(-1, keepdim=True)
    a = axh + r * (m1 + mb) + axh * q
    a2 = anw * a + anb
    mh = a2 @ aW1.T + ab1
    mg = GELU1 * mh
    L_fwd = k * k + 3 * c + hd + 16
    if GRN:
        hval = F.linear(F.layer_norm(t, (c,), P["norm_weight"], P["norm_bias"], eps),
                        P["fc1_weight"], P["fc1_bias"])
        gval = F.gelu(hval, approximate=approximate)
        gx = gval.square().sum(dim=(1, 2), keepdim=True).sqrt()
        Gm = gx.mean(-1, keepdim=True) + grn_eps
        nx = gx / Gm
        Mg = mg.square().sum(dim=(1, 2), keepdim=True).sqrt()
        mnx = nx + (Mg + nx * Mg.mean(-1, keepdim=True)) / Gm
        agw, agb = GRN["grn_weight"].abs(), GRN["grn_bias"].abs()
        mgr = mg + agb + agw * mg * (nx + mnx)
        L_fwd += 2 * h * w + 2 * hd
    else:
        mgr = mg
    mo = mgr @ aW2.T + ab2
    my = X.abs().permute(0, 2, 3, 1) + ads * agam * mo
    out = {"y": (my.permute(0, 3, 1, 2), L_fwd)}
    if gy is None:
        return out

    # backward
    L_pix = L_fwd + 2 * hd + 3 * c + k * k + 16 + (2 * h * w + 2 * hd if GRN else 0)
    L_sum = L_pix + n * h * w

    def rss(t, dims=(0, 1, 2)):  # root-sum-square over the pixels
        return t.square().sum(dim=dims).sqrt()

    def rss_mm(a_, b_):  # sqrt(sum_p a_p^T b_p^2) for (.., I) x (.., J) -> (I, J)
        return (a_.square().reshape(-1, a_.shape[-1]).T @ b_.square().reshape(-1, b_.shape[-1])).sqrt()

    G = gy.abs().permute(0, 2, 3, 1)
    Gs = G * ads
    mdo = Gs * agam
    if P["gamma"] is not None:
        out["gamma"] = (rss(Gs * mo), L_sum)
    if P["fc2_bias"] is not None:
        out["fc2_bias"] = (rss(mdo), L_sum)
    out["fc2_weight"] = (rss_mm(mdo, mgr), L_sum)
    mdy = mdo @ aW2
    if GRN:
        S = (mdy * agw * mg).sum(dim=(1, 2), keepdim=True)
        mdg = (mdy * (1 + agw * mnx)
               + mg / gx * (S / Gm + (S * Mg).sum(-1, keepdim=True) / (hd * Gm * Gm)))
        # g/gx is ill-conditioned where a channel's norm gx is tiny next to the magnitude
        # of its values, and undefined where the channel is all zeros (the norm's
        # subgradient): no useful bound there (a large finite one keeps 0 * mag = 0).
        mdg = torch.nan_to_num(mdg, nan=1e100, posinf=1e100).clamp(max=1e100)
        out["grn_weight"] = (rss(mdy * mg * mnx), L_sum)
        out["grn_bias"] = (rss(mdy), L_sum)
    else:
        mdg = mdy
    mda = mdg * (GELU1 + GELU2 * mh)
    if P["fc1_bias"] is not None:
        out["fc1_bias"] = (rss(mda), L_sum)
    out["fc1_weight"] = (rss_mm(mda, a2), L_sum)
    mdt2 = mda @ aW1
    if P["norm_weight"] is not None:
        out["norm_weight"] = (rss(mdt2 * a), L_sum)
    if P["norm_bias"] is not None:
        out["norm_bias"] = (rss(mdt2), L_sum)
    mgp = mdt2 * anw
    MD = (r * (mgp + mgp.mean(-1, keepdim=True) + a * (mgp * a).mean(-1, keepdim=True))
          * (1 + q)).permute(0, 3, 1, 2)
    if P["dw_bias"] is not None:
        out["dw_bias"] = (rss(MD, (0, 2, 3)), L_sum)
    out["dw_weight"] = (torch.nn.grad.conv2d_weight(X.square(), adw.shape, MD.square(),
                                                   padding=pad, groups=c).sqrt(), L_sum)
    out["x"] = (gy.abs() + torch.nn.grad.conv2d_input(X.shape, adw, MD, padding=pad, groups=c),
                L_pix)
    return out


# --------------------------------------------------------------------------- checks

U = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -24}


def rtol_for(dtype: torch.dtype, length: int) -> float:
    r = LAMBDA * math.sqrt(length) * U[dtype]
    return max(r, 1e-12) if dtype == torch.float64 else r


def assert_close_to(name: str, got: torch.Tensor, ref: Ref, dtype: torch.dtype,
                    context: str = "", rtol: Optional[float] = None, extra=None) -> None:
    """|got - ref| <= rtol*(|ref| + mag) [+ bf16 terms], element-wise, with a precise report."""
    assert tuple(got.shape) == tuple(ref.ref.shape), (
        f"{name}: shape {tuple(got.shape)} != expected {tuple(ref.ref.shape)}; {context}")
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}; {context}"
    rt = rtol_for(dtype, ref.length) if rtol is None else rtol
    g = got.detach().to(torch.float64)
    err = (g - ref.ref).abs()
    bound = rt * (ref.ref.abs() + ref.mag)
    if dtype == torch.bfloat16:
        bound = bound + 2 * BF16_U * ref.ref.abs()
        if ref.bf16_extra is not None:
            bound = bound + ref.bf16_extra
    if extra is not None:
        bound = bound + extra
    bad = ~(err <= bound)  # also catches NaN
    if bool(bad.any()):
        ratio = torch.where(bound > 0, err / bound, torch.full_like(err, math.inf))
        ratio = torch.where(torch.isnan(err), torch.full_like(err, math.inf), ratio)
        idx = int(torch.argmax(torch.where(bad, ratio, torch.zeros_like(ratio))))
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), g.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{g.numel()} elements out of tolerance (rtol={rt:.3g}, "
            f"L={ref.length}); worst at {pos}: got {g[pos].item()!r}, expected "
            f"{ref.ref[pos].item()!r}, |diff|={err[pos].item():.3g}, bound={bound[pos].item():.3g}, "
            f"mag={ref.mag[pos].item():.3g}; max |diff| {err.nan_to_num(math.inf).max().item():.3g}, "
            f"max |ref| {ref.ref.abs().max().item():.3g}; {context}")


def check(results: Dict[str, torch.Tensor], refs: Dict[str, Ref], cfg: BlockCfg,
          prefix: str = "") -> None:
    for key, got in results.items():
        name = key if key == "y" else f"grad_{key}"
        assert_close_to(prefix + name, got, refs[key], cfg.dtype, cfg.short())


# --------------------------------------------------------------------------- strategies

SPECIAL_C = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40]


@st.composite
def block_configs(draw, dtypes=ALL_DTYPES, layouts=("nhwc", "nchw"), grn=False):
    c = draw(st.one_of(st.integers(1, 40), st.sampled_from(SPECIAL_C)))
    k = draw(st.one_of(st.sampled_from([1, 3, 3, 5, 7, 7, 7, 9, 13]),
                       st.sampled_from([11, 15, 17, 19, 21, 23, 25, 27, 29, 31])))
    hidden = min(4 * c, draw(st.one_of(st.just(4 * c), st.integers(1, 4 * c),
                                       st.sampled_from([1, 8, 16, 17]))))
    drop = draw(st.sampled_from(["none", "none", "mixed", "zeros", "ones"]))
    return BlockCfg(
        n=draw(st.integers(1, 3)), c=c, h=draw(st.integers(1, 15)), w=draw(st.integers(1, 15)),
        k=k, hidden=hidden, layout=draw(st.sampled_from(list(layouts))),
        dtype=draw(st.sampled_from(list(dtypes))),
        **{o: draw(st.sampled_from([True, True, False])) for o in OPTIONAL},
        drop=drop, drop_dtype=draw(st.sampled_from([None, torch.float32, torch.bfloat16])),
        drop_4d=draw(st.booleans()), approximate=draw(st.sampled_from(["none", "tanh"])),
        eps=draw(st.sampled_from([1e-6, 1e-6, 1e-5, 1e-3])),
        strided_params=draw(st.sampled_from([False, False, True])), grn=grn,
        x_scale=draw(st.sampled_from([1.0, 1.0, 1.0, 0.05, 20.0])),
    )


# --------------------------------------------------------------------------- sweeps


@sweep(150)
@given(cfg=block_configs())
def test_forward_backward_sweep(cfg):
    """Forward and the gradients of x and of every given parameter vs the float64 oracle."""
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg)
    y, grads = op_grads(x, p, ds, cfg, gy)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=cfg.memory_format), f"memory format lost; {cfg.short()}"
    assert grads["x"].shape == x.shape
    with torch.no_grad():  # the inference call computes the same values
        y_ng = run(op, x, p, ds, cfg)
    assert torch.equal(y_ng, y.detach()), f"no_grad forward differs; {cfg.short()}"
    refs = oracle(x, p, ds, cfg.eps, cfg.approximate, gy)
    check({"y": y, **grads}, refs, cfg)


@sweep(20)
@given(cfg=block_configs(dtypes=(torch.float64, torch.float32)))
def test_reference_matches_oracle(cfg):
    """fastvis' own PyTorch reference (and the use_reference() path) meets the same bounds."""
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg)
    refs = oracle(x, p, ds, cfg.eps, cfg.approximate, gy)
    y, grads = op_grads(x, p, ds, cfg, gy, fn=reference)
    check({"y": y, **grads}, refs, cfg, prefix="reference ")
    with fastvis.use_reference():
        y2 = run(op, x, p, ds, cfg)
    assert torch.equal(y2, y), "use_reference() did not run the reference"


@pytest.mark.parametrize("c,hidden", [(4, 8), (3, 5), (1, 1), (8, 32), (16, 24), (24, 96)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hidden_not_4c(c, hidden, dtype):
    """Hidden widths other than 4*C (ConvNeXt's own ratio), over several tiles."""
    cfg = BlockCfg(n=2, c=c, h=9, w=7, k=3, hidden=hidden, dtype=dtype, drop="mixed")
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg)
    y, grads = op_grads(x, p, ds, cfg, gy)
    check({"y": y, **grads}, oracle(x, p, ds, cfg.eps, cfg.approximate, gy), cfg)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("shape,approximate,layout", [
    ((1, 3, 4, 4, 3, 5), "none", "nhwc"), ((1, 3, 4, 4, 3, 5), "tanh", "nhwc"),
    ((1, 3, 4, 4, 3, 5), "none", "nchw"), ((1, 3, 4, 4, 3, 5), "tanh", "nchw"),
    ((2, 5, 3, 2, 5, 7), "tanh", "nhwc"), ((2, 1, 3, 3, 1, 2), "none", "nchw")])
def test_gradcheck_float64(shape, approximate, layout):
    n, c, h, w, k, hd = shape
    cfg = BlockCfg(n=n, c=c, h=h, w=w, k=k, hidden=hd, layout=layout, dtype=torch.float64,
                   drop="mixed", approximate=approximate, eps=1e-5)
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    names = [k_ for k_ in PARAMS if p[k_] is not None]

    def f(x, *ps):
        return run(op, x, dict(p, **dict(zip(names, ps))), ds, cfg)

    assert torch.autograd.gradcheck(f, (x, *[p[k_] for k_ in names]), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_output_memory_format_follows_input(layout, dtype):
    cfg = BlockCfg(n=2, c=6, h=5, w=7, k=3, hidden=10, dtype=dtype,
                   layout="nhwc" if layout == "nhwc" else "nchw")
    x, p, ds, _ = make_inputs(cfg)
    if layout == "strided":  # neither NCHW- nor NHWC-dense: the output is NCHW
        x = torch.randn(2, 6, 7, 5).to(dtype).transpose(2, 3)
    x.requires_grad_(True)
    y = run(op, x, p, ds, cfg)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    assert y.dtype == dtype and y.shape == x.shape
    r = run(reference, x.detach(), p, ds, cfg)
    assert r.is_contiguous(memory_format=fmt) and r.stride() == y.stride()
    gy = make_grad_output(cfg)
    (gx,) = torch.autograd.grad(y, (x,), gy)
    assert gx.shape == x.shape and gx.dtype == dtype
    if layout != "strided":
        assert gx.is_contiguous(memory_format=fmt), "grad_x does not follow x's layout"
    check({"y": y, "x": gx}, oracle(x, p, ds, cfg.eps, cfg.approximate, gy), cfg)


# --------------------------------------------------------------------------- determinism


def _all_grads(x, p, ds, cfg, gy):
    x = x.detach().requires_grad_(True)
    p = {k: None if v is None else v.detach().requires_grad_(True) for k, v in p.items()}
    y, g = op_grads(x, p, ds, cfg, gy)
    return y.detach(), g


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", ["many_tiles", "one_tile"])
def test_deterministic_and_thread_count_independent(dtype, shape):
    # many_tiles: threads share the tiles; one_tile (a 7x7 image, 300 columns of hidden):
    # the plan has a single tile and splits every GEMM over the pool in column blocks.
    if shape == "many_tiles":
        cfg = BlockCfg(n=3, c=24, h=20, w=20, k=7, hidden=96, dtype=dtype, drop="mixed")
    else:
        cfg = BlockCfg(n=1, c=72, h=7, w=7, k=7, hidden=300, dtype=dtype, drop="mixed")
    x, p, ds, _ = make_inputs(cfg)
    gy = make_grad_output(cfg)
    old = fastvis.get_num_threads()
    try:
        fastvis.set_num_threads(2)
        runs = [_all_grads(x, p, ds, cfg, gy) for _ in range(3)]
        fastvis.set_num_threads(1)
        single = _all_grads(x, p, ds, cfg, gy)
    finally:
        fastvis.set_num_threads(0)  # back to following torch
    assert fastvis.get_num_threads() == old
    y0, g0 = runs[0]
    for i, (y, g) in enumerate(runs[1:] + [single], 1):
        what = f"run {i}" if i < len(runs) else "the 1-thread run"
        assert torch.equal(y, y0), f"y differs between run 0 (2 threads) and {what}"
        for name in g0:
            assert torch.equal(g[name], g0[name]), (
                f"grad_{name} differs between run 0 (2 threads) and {what} (max |diff| "
                f"{(g[name].double() - g0[name].double()).abs().max().item():.3g})")
    check({"y": y0, **g0}, oracle(x, p, ds, cfg.eps, cfg.approximate, gy), cfg)


# --------------------------------------------------------------------------- real size


def test_convnext_tiny_stage1_shape():
    """ConvNeXt-T stage 1 (C=96 at 56x56, k=7, hidden=384), float32, once."""
    cfg = BlockCfg(n=1, c=96, h=56, w=56, k=7, hidden=384, layout="nhwc", dtype=torch.float32)
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg)
    y, grads = op_grads(x, p, ds, cfg, gy)
    check({"y": y, **grads}, oracle(x, p, ds, cfg.eps, cfg.approximate, gy), cfg)


# --------------------------------------------------------------------------- torch.compile


def _fn(x, dw, dwb, nw, nb, w1, b1, w2, b2, gamma, ds):
    y = op(x * 1.5, dw, dwb, nw, nb, w1, b1, w2, b2, gamma, ds, 1e-6, approximate="tanh")
    return op(y, dw, None, nw, nb, w1, b1, w2, b2, None, None, 1e-5) * 2.0


def _run_fn(fn, x, p, ds, gy):
    x = x.detach().requires_grad_(True)
    ps = [None if p[k] is None else p[k].detach().requires_grad_(True) for k in PARAMS]
    y = fn(x, *ps, ds)
    lv = [x] + [t for t in ps if t is not None]
    return y.detach(), torch.autograd.grad(y, lv, gy)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_compile_fullgraph_matches_eager(layout):
    torch._dynamo.reset()
    cfg = BlockCfg(n=2, c=12, h=7, w=6, k=5, layout=layout, drop="mixed")
    x, p, ds, _ = make_inputs(cfg)
    gy = make_grad_output(cfg)
    y_e, g_e = _run_fn(_fn, x, p, ds, gy)
    compiled = torch.compile(_fn, fullgraph=True)
    y_c, g_c = _run_fn(compiled, x, p, ds, gy)
    y_c2, g_c2 = _run_fn(compiled, x, p, ds, gy)
    assert y_c.is_contiguous(memory_format=cfg.memory_format)
    # The same kernels on the same values; the pointwise ops around them (x*1.5: one
    # rounding; y*2: exact; and their gradients) round identically in Inductor and eager:
    # the results must be bit-identical.
    assert torch.equal(y_c, y_e), f"compiled y != eager (max {(y_c - y_e).abs().max().item():.3g})"
    names = ["x"] + [k for k in PARAMS if p[k] is not None]
    for name, a, b in zip(names, g_c, g_e):
        assert torch.equal(a, b), (
            f"compiled grad_{name} != eager (max {(a - b).abs().max().item():.3g})")
    assert torch.equal(y_c, y_c2) and all(torch.equal(a, b) for a, b in zip(g_c, g_c2))


def _schema_args(overload, values: dict, needs=None):
    """Positional arguments for a custom op overload, by schema name: `values` where
    given, the defaults of the public op for scalars, None for absent optional tensors."""
    out = []
    for a in overload._schema.arguments:
        if a.name in values:
            out.append(values[a.name])
        elif a.name == "needs":
            # one per differentiable input: every tensor but grad_y, the GRN stats, drop_scale
            n = sum("Tensor" in str(b.type) and b.name not in ("grad_y", "stats")
                    for b in overload._schema.arguments) - 1
            out.append([True] * n if needs is None else (needs * n)[:n])
        elif a.name == "tanh_gelu":
            out.append(False)
        elif a.name.endswith("eps"):
            out.append(1e-6)
        else:
            assert str(a.type).startswith("Optional"), f"no value for {a.name} ({a.type})"
            out.append(None)
    return tuple(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_custom_ops(dtype):
    cfg = BlockCfg(n=2, c=8, h=5, w=4, k=3, dtype=dtype, drop="mixed")
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    ds = ds.to(dtype)  # the public op hands the custom op a drop_scale in x's float type
    fwd = torch.ops.fastvis.convnext_block.default
    bwd = torch.ops.fastvis.convnext_block_backward.default
    full = {"x": x, "drop_scale": ds, **p}
    minimal = {"x": x, "dw_weight": p["dw_weight"], "fc1_weight": p["fc1_weight"],
               "fc2_weight": p["fc2_weight"], "tanh_gelu": True, "eps": 1e-5}
    torch.library.opcheck(fwd, _schema_args(fwd, full))
    torch.library.opcheck(fwd, _schema_args(fwd, minimal))
    grn = {"grn_weight": torch.randn(cfg.hd, dtype=dtype, requires_grad=True),
           "grn_bias": torch.randn(cfg.hd, dtype=dtype, requires_grad=True)}
    torch.library.opcheck(fwd, _schema_args(fwd, dict(full, **grn)))
    gy = make_grad_output(cfg)
    det = {k: v.detach() for k, v in full.items()}
    none = x.new_empty(0).detach()  # the forward's GRN statistics of a block without GRN
    torch.library.opcheck(bwd, _schema_args(bwd, dict(det, grad_y=gy, stats=none)))
    grn_d = {k: v.detach() for k, v in grn.items()}
    _, stats = fwd(*_schema_args(fwd, dict(det, **grn_d)))
    assert stats.shape == (cfg.n, cfg.h, cfg.hd)
    torch.library.opcheck(bwd, _schema_args(bwd, dict(det, grad_y=gy, stats=stats, **grn_d)))
    torch.library.opcheck(bwd, _schema_args(bwd, dict(det, grad_y=gy, stats=none, drop_scale=None,
                                                      tanh_gelu=True),
                                            needs=[False, True, False, True, True]))


# --------------------------------------------------------------------------- autocast


def test_bf16_autocast_runs_in_bf16_and_grads_reach_float32_params():
    cfg = BlockCfg(n=2, c=16, h=7, w=6, k=7, drop="mixed", drop_dtype=torch.float32)
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(op, x, p, ds, cfg)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert y.is_contiguous(memory_format=cfg.memory_format)
    y.backward(gy)
    leaves = {"x": x, **{k: v for k, v in p.items() if v is not None}}
    for name, t in leaves.items():
        assert t.grad is not None, f"no gradient reached the float32 {name}"
        assert t.grad.dtype == torch.float32 and t.grad.shape == t.shape, name
    # 1) Exactly the bf16 computation of the bf16-rounded inputs (autocast casts x and the
    #    parameters, drop_scale stays float32): the bfloat16 bounds of the sweeps.
    xb = x.detach().to(torch.bfloat16)
    pb = {k: None if v is None else v.detach().to(torch.bfloat16) for k, v in p.items()}
    refs = oracle(xb, pb, ds, cfg.eps, cfg.approximate, gy)
    bcfg = dataclasses.replace(cfg, dtype=torch.bfloat16)
    # The gradients of the float32 leaves are the bf16 gradients cast up (exactly).
    check({"y": y, **{k: t.grad.to(torch.bfloat16) for k, t in leaves.items()}}, refs, bcfg,
          prefix="autocast ")
    # 2) Close to the float32 result: rounding the inputs to bf16 perturbs each factor of
    #    every term by <= u_bf16 relatively, and a term of the block's expansion has at most
    #    ~8 rounded factors (x, w, b of the dwconv, LayerNorm affine, fc1, fc2, gamma; the
    #    LayerNorm amplification is in `mag`), so |y_bf16 - y_f32| <= 8*u_bf16*(|y| + mag)
    #    plus the final rounding 2*u_bf16*|y|.
    y32 = run(op, x.detach(), {k: None if v is None else v.detach() for k, v in p.items()}, ds, cfg)
    r32 = oracle(x, p, ds, cfg.eps, cfg.approximate)["y"]
    assert_close_to("autocast y vs float32 y", y, Ref(y32.double(), r32.mag, r32.length),
                    torch.bfloat16, cfg.short(), rtol=8 * BF16_U)


# --------------------------------------------------------------------------- autograd plumbing


def _count_calls(monkeypatch, attr):
    calls = []
    real = getattr(_mod, attr)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(_mod, attr, spy)
    return calls


@pytest.mark.parametrize("which", ["x", "fc1_weight", "dw_weight", "dw_bias", "gamma",
                                   "norm_weight+fc2_bias", "dw_bias+fc1_bias"])
def test_partial_requires_grad(which):
    cfg = BlockCfg(n=2, c=10, h=6, w=5, k=5, hidden=24, drop="mixed")
    x, p, ds, _ = make_inputs(cfg)
    names = which.split("+")
    leaves = {n: (x if n == "x" else p[n]).requires_grad_(True) for n in names}
    gy = make_grad_output(cfg)
    y = run(op, x, p, ds, cfg)
    g = dict(zip(names, torch.autograd.grad(y, list(leaves.values()), gy)))
    check(g, oracle(x, p, ds, cfg.eps, cfg.approximate, gy), cfg)


def test_no_grad_needed_means_no_backward_call(monkeypatch):
    cfg = BlockCfg(n=2, c=8, h=5, w=4, k=3, drop="mixed")
    x, p, ds, _ = make_inputs(cfg)
    bwd_calls = _count_calls(monkeypatch, "_cb_bwd")
    fwd_calls = _count_calls(monkeypatch, "_cb_fwd")
    y = run(op, x, p, ds, cfg)
    assert fwd_calls == [1]
    assert not y.requires_grad and y.grad_fn is None
    # drop_scale is a constant of the op (documented): requiring grad on it alone does not
    # make the output differentiable, and no backward runs.
    ds.requires_grad_(True)
    y = run(op, x, p, ds, cfg)
    assert not y.requires_grad and y.grad_fn is None
    assert bwd_calls == [], "the backward kernel ran although no gradient was needed"
    # And it does run once when something needs a gradient.
    p["gamma"].requires_grad_(True)
    torch.autograd.grad(run(op, x, p, ds, cfg).sum(), [p["gamma"]])
    assert bwd_calls == [1]


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_backward_with_non_contiguous_grad_output(layout):
    cfg = BlockCfg(n=2, c=12, h=6, w=7, k=5, layout=layout, drop="mixed")
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    lv = leaves_of(x, p)
    # 1) y.sum(): grad_output is a broadcast (stride-0) tensor of ones
    y = run(op, x, p, ds, cfg)
    g = dict(zip(lv, torch.autograd.grad(y.sum(), list(lv.values()))))
    check(g, oracle(x, p, ds, cfg.eps, cfg.approximate, torch.ones_like(y)), cfg, prefix="sum: ")
    # 2) a strided (non-dense) grad_output
    big = torch.randn(cfg.n, cfg.c, cfg.h, 2 * cfg.w)
    gy = big[..., ::2]
    assert not gy.is_contiguous() and not gy.is_contiguous(memory_format=torch.channels_last)
    y = run(op, x, p, ds, cfg)
    g = dict(zip(lv, torch.autograd.grad(y, list(lv.values()), gy)))
    check(g, oracle(x, p, ds, cfg.eps, cfg.approximate, gy), cfg, prefix="strided: ")
    # 3) through views of y: a slice and a permute
    y = run(op, x, p, ds, cfg)
    w_ = torch.randn(cfg.n, cfg.c, cfg.h - 2, cfg.w)
    loss = (y[:, :, 1:-1] * w_).sum() + y.permute(0, 2, 3, 1)[:, ::2].sum()
    g = dict(zip(lv, torch.autograd.grad(loss, list(lv.values()))))
    gy3 = torch.zeros(cfg.n, cfg.c, cfg.h, cfg.w)
    gy3[:, :, 1:-1] += w_
    gy3[:, :, ::2] += 1.0
    check(g, oracle(x, p, ds, cfg.eps, cfg.approximate, gy3), cfg, prefix="views: ")


# --------------------------------------------------------------------------- NaN / empty


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_nan_in_x_stays_in_its_sample(layout):
    """A NaN at x[1, c, i, j]: the depthwise conv spreads it to the k x k neighbourhood
    (Chebyshev distance <= k//2) of that channel, LayerNorm to all channels of those
    pixels, fc1/GELU/fc2 and the residual stay per pixel: y is NaN exactly on that
    neighbourhood of sample 1, all channels, and finite (and correct) elsewhere. Backward:
    D = dL/d(dwconv output) is NaN on the same pixels, the depthwise backward spreads it
    to distance 2*(k//2): grad_x is NaN there (sample 1, all channels) only. Every
    parameter gradient sums terms over the NaN pixels and is NaN, except fc2_bias (its
    terms grad_y*ds*gamma do not depend on x)."""
    cfg = BlockCfg(n=3, c=12, h=11, w=10, k=5, layout=layout)
    x, p, _, _ = make_inputs(cfg)
    x = x.clone()
    i, j, r = 4, 6, cfg.k // 2
    x[1, 3, i, j] = float("nan")
    x.requires_grad_(True)
    for t in p.values():
        t.requires_grad_(True)
    gy = make_grad_output(cfg)
    y, g = op_grads(x, p, None, cfg, gy)

    def region(rad):
        m = torch.zeros(cfg.n, cfg.c, cfg.h, cfg.w, dtype=torch.bool)
        m[1, :, max(0, i - rad): i + rad + 1, max(0, j - rad): j + rad + 1] = True
        return m

    refs = oracle(x, p, None, cfg.eps, cfg.approximate, gy)
    for name, got, rad in (("y", y, r), ("grad_x", g["x"], 2 * r)):
        key = "y" if name == "y" else "x"
        assert torch.equal(torch.isnan(refs[key].ref), region(rad)), "oracle NaN pattern"
        assert torch.equal(torch.isnan(got), region(rad)), (
            f"{name}: NaN at {int(torch.isnan(got).sum())} elements, expected exactly the "
            f"{int(region(rad).sum())} of sample 1 within distance {rad} of ({i}, {j})")
        fin = ~region(rad)
        assert_close_to(f"{name} (finite part)", got[fin],
                        Ref(refs[key].ref[fin], refs[key].mag[fin], refs[key].length),
                        cfg.dtype, cfg.short())
    for name in PARAMS:
        if name == "fc2_bias":
            check({name: g[name]}, refs, cfg)
        else:
            assert bool(torch.isnan(g[name]).all()), f"grad_{name} should be all NaN"


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("nhw", [(0, 4, 3), (2, 0, 3), (1, 4, 0)])
def test_empty_batch_or_image(nhw, layout):
    n, h, w = nhw
    cfg = BlockCfg(n=n, c=6, h=h, w=w, k=3, hidden=10, layout=layout, drop="mixed")
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    y = run(op, x, p, ds, cfg)
    assert y.shape == x.shape and y.numel() == 0 and y.dtype == x.dtype
    lv = leaves_of(x, p)
    g = dict(zip(lv, torch.autograd.grad(y, list(lv.values()), torch.empty_like(y))))
    assert g["x"].shape == x.shape
    for name in PARAMS:
        assert torch.equal(g[name], torch.zeros_like(p[name])), f"grad_{name} not zero"


# --------------------------------------------------------------------------- errors


def _args(dtype=torch.float32, c=4, hd=8, k=3, n=2):
    x = torch.randn(n, c, 5, 5).to(dtype)
    p = {"dw_weight": torch.randn(c, 1, k, k), "dw_bias": torch.randn(c),
         "norm_weight": torch.randn(c), "norm_bias": torch.randn(c),
         "fc1_weight": torch.randn(hd, c), "fc1_bias": torch.randn(hd),
         "fc2_weight": torch.randn(c, hd), "fc2_bias": torch.randn(c), "gamma": torch.randn(c)}
    return x, {k_: v.to(dtype) for k_, v in p.items()}


def _call(x, p, **kw):
    return op(x, **p, **kw)


def _raises(exc, *patterns, call):
    """call() raises exc whose message matches every regex in patterns; returns it."""
    with pytest.raises(exc) as ei:
        call()
    msg = str(ei.value)
    for pat in patterns:
        assert re.search(pat, msg), f"message {msg!r} does not match {pat!r}"
    return msg


@pytest.mark.parametrize("bad", [[[1.0]], None, 3.0, "x"])
def test_x_not_a_tensor_is_type_error(bad):
    _, p = _args()
    _raises(TypeError, r"\bx\b", r"torch\.Tensor", call=lambda: _call(bad, p))


@pytest.mark.parametrize("shape", [(2, 4, 5), (4, 5), (1, 2, 4, 5, 5)])
def test_not_4d_is_value_error_naming_x(shape):
    _, p = _args()
    _raises(ValueError, r"4-D", r"\bx\b", call=lambda: _call(torch.randn(shape), p))


def test_zero_channels_is_value_error():
    _, p = _args()
    _raises(ValueError, r"^x: ", r"at least one channel",
            call=lambda: _call(torch.randn(2, 0, 5, 5), p))


def test_float16_on_cpu_is_type_error():
    x, p = _args(torch.float16)
    _raises(TypeError, r"^x: ", r"float16 is CUDA-only", call=lambda: _call(x, p))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.complex64])
def test_non_float_input_is_type_error(dtype):
    _, p = _args()
    x = torch.ones(2, 4, 5, 5, dtype=dtype)
    _raises(TypeError, r"^x: ", r"backend supports", call=lambda: _call(x, p))


@pytest.mark.parametrize("name", PARAMS + ("grn_weight", "grn_bias"))
@pytest.mark.parametrize("xd,pd", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                   (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                   (torch.float32, torch.float16), (torch.float32, torch.int32)])
def test_dtype_mismatch_is_type_error(name, xd, pd):
    x, p = _args(xd)
    grn = {"grn_weight": torch.randn(8).to(xd), "grn_bias": torch.randn(8).to(xd)}
    if name in grn:
        grn[name] = grn[name].to(pd)
    else:
        p[name] = p[name].to(pd)
    _raises(TypeError, rf"^{name}: expected dtype", call=lambda: _call(x, p, **grn))


_BAD_SHAPES = {
    "dw_weight": [(5, 1, 3, 3), (4, 2, 3, 3), (4, 3, 3), (4, 1, 3), (1, 4, 3, 3), (4,)],
    "dw_bias": [(5,), (4, 1), (), (1, 4)],
    "norm_weight": [(3,), (4, 1), ()],
    "norm_bias": [(8,), (2, 2)],
    "fc1_weight": [(8, 5), (8,), (4, 8), (0, 4), (8, 4, 1)],
    "fc1_bias": [(4,), (9,), (8, 1)],
    "fc2_weight": [(4, 9), (8, 4), (4, 7), (4,), (4, 8, 1)],
    "fc2_bias": [(8,), (4, 1)],
    "gamma": [(1,), (4, 1, 1), (5,)],
    "grn_weight": [(4,), (1, 1, 1, 8), (9,)],
    "grn_bias": [(4,), (8, 1)],
}


@pytest.mark.parametrize("name,shape", [(k, s) for k, v in _BAD_SHAPES.items() for s in v])
def test_wrong_parameter_shape_is_value_error(name, shape):
    x, p = _args()
    grn = {"grn_weight": torch.randn(8), "grn_bias": torch.randn(8)}
    (grn if name in grn else p)[name] = torch.randn(shape)
    _raises(ValueError, rf"^{name}: expected shape", call=lambda: _call(x, p, **grn))


@pytest.mark.parametrize("kk", [(2, 2), (4, 4), (33, 33), (35, 35), (3, 5), (5, 3), (1, 3),
                                (0, 0)])
def test_bad_kernel_is_value_error(kk):
    x, p = _args()
    p["dw_weight"] = torch.randn(4, 1, *kk)
    _raises(ValueError, r"^dw_weight: expected a square odd kernel of size 1\.\.31",
            call=lambda: _call(x, p))


def test_largest_kernel_31_is_accepted():
    cfg = BlockCfg(n=1, c=3, h=4, w=5, k=31, hidden=12)
    x, p, ds, _ = make_inputs(cfg)
    check({"y": run(op, x, p, ds, cfg)}, oracle(x, p, ds, cfg.eps, cfg.approximate), cfg)


@pytest.mark.parametrize("given", ["grn_weight", "grn_bias"])
def test_grn_needs_both_parameters(given):
    x, p = _args()
    _raises(ValueError, r"grn_weight and grn_bias", call=lambda: _call(x, p, **{given: torch.randn(8)}))


@pytest.mark.parametrize("bad", [(3,), (1,), (2, 1), (1, 2), (2, 1, 1), (2, 1, 1, 1, 1), ()])
def test_drop_scale_of_wrong_shape_is_value_error(bad):
    x, p = _args()
    _raises(ValueError, r"^drop_scale: expected shape \(2,\)",
            call=lambda: _call(x, p, drop_scale=torch.ones(bad)))


@pytest.mark.parametrize("bad,exc", [([1.0, 1.0], TypeError),
                                     (torch.ones(2, dtype=torch.int64), TypeError),
                                     (torch.ones(2, dtype=torch.bool), TypeError)])
def test_drop_scale_of_wrong_type(bad, exc):
    x, p = _args()
    _raises(exc, r"^drop_scale: ", call=lambda: _call(x, p, drop_scale=bad))


@pytest.mark.parametrize("bad", ["foo", "Tanh", "erf", "", None])
def test_bad_approximate_is_value_error(bad):
    x, p = _args()
    _raises(ValueError, r"^approximate: ", call=lambda: _call(x, p, approximate=bad))


@pytest.mark.parametrize("arg", ["eps", "grn_eps"])
@pytest.mark.parametrize("bad", [0.0, -1e-6, float("nan"), float("inf"), -float("inf")])
def test_bad_eps_is_value_error(arg, bad):
    x, p = _args()
    _raises(ValueError, rf"^{arg}: expected a positive finite number",
            call=lambda: _call(x, p, **{arg: bad}))


@pytest.mark.parametrize("arg", ["eps", "grn_eps"])
@pytest.mark.parametrize("bad", [True, "1e-6", None, torch.tensor(1e-6), [1e-6]])
def test_eps_of_wrong_type_is_type_error(arg, bad):
    x, p = _args()
    _raises(TypeError, rf"^{arg}: ", call=lambda: _call(x, p, **{arg: bad}))


@pytest.mark.parametrize("name", PARAMS + ("drop_scale", "grn_weight"))
def test_parameter_on_another_device_is_value_error(name):
    x, p = _args()
    extra = {}
    if name == "drop_scale":
        extra["drop_scale"] = torch.ones(2, device="meta")
    elif name == "grn_weight":
        extra = {"grn_weight": torch.randn(8, device="meta"), "grn_bias": torch.randn(8)}
    else:
        p[name] = p[name].to("meta")
    _raises(ValueError, rf"\b{name} is on meta", r"\bx is on cpu", call=lambda: _call(x, p, **extra))


# One representative of every error class, for the reference-mode comparison.
_ERROR_CASES = {
    "not tensor": (lambda x, p: ("nope", p, {}), TypeError),
    "3-D": (lambda x, p: (x[0], p, {}), ValueError),
    "float16": (lambda x, p: (x.half(), {k: v.half() for k, v in p.items()}, {}), TypeError),
    "int": (lambda x, p: (x.int(), p, {}), TypeError),
    "dtype": (lambda x, p: (x, dict(p, fc1_bias=p["fc1_bias"].double()), {}), TypeError),
    "shape": (lambda x, p: (x, dict(p, gamma=torch.randn(5)), {}), ValueError),
    "even k": (lambda x, p: (x, dict(p, dw_weight=torch.randn(4, 1, 4, 4)), {}), ValueError),
    "hidden": (lambda x, p: (x, dict(p, fc2_weight=torch.randn(4, 9)), {}), ValueError),
    "grn": (lambda x, p: (x, p, {"grn_weight": torch.randn(8)}), ValueError),
    "drop": (lambda x, p: (x, p, {"drop_scale": torch.ones(3)}), ValueError),
    "approx": (lambda x, p: (x, p, {"approximate": "foo"}), ValueError),
    "eps": (lambda x, p: (x, p, {"eps": -1.0}), ValueError),
    "eps type": (lambda x, p: (x, p, {"eps": "small"}), TypeError),
    "meta": (lambda x, p: (x, dict(p, norm_bias=p["norm_bias"].to("meta")), {}), ValueError),
}


@pytest.mark.parametrize("case", list(_ERROR_CASES))
def test_reference_mode_validates_like_fast_path(case):
    make, exc = _ERROR_CASES[case]
    x, p = _args()
    xx, pp, kw = make(x, p)
    msgs = []
    for mode in (False, True):
        with fastvis.use_reference(mode):
            msgs.append(_raises(exc, call=lambda: _call(xx, pp, **kw)))
    assert msgs[0] == msgs[1], f"messages differ: fused {msgs[0]!r}, reference {msgs[1]!r}"
    assert not fastvis.reference_enabled()


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_use_reference_runs_the_reference(monkeypatch, layout):
    cfg = BlockCfg(n=2, c=8, h=5, w=6, k=3, layout=layout, drop="mixed", approximate="tanh")
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    fwd_calls = _count_calls(monkeypatch, "_cb_fwd")
    bwd_calls = _count_calls(monkeypatch, "_cb_bwd")
    gy = make_grad_output(cfg)
    with fastvis.use_reference():
        assert fastvis.reference_enabled()
        y, g = op_grads(x, p, ds, cfg, gy)
    assert not fastvis.reference_enabled()
    assert fwd_calls == [] and bwd_calls == [], "the fused kernel ran in reference mode"
    y_ref, g_ref = op_grads(x, p, ds, cfg, gy, fn=reference)
    assert torch.equal(y, y_ref) and all(torch.equal(g[k], g_ref[k]) for k in g)
    assert y.is_contiguous(memory_format=cfg.memory_format)
    y_fused = run(op, x, p, ds, cfg)
    assert fwd_calls == [1], "the fused kernel did not run after leaving reference mode"
    check({"y": y_fused}, oracle(x, p, ds, cfg.eps, cfg.approximate), cfg)


# --------------------------------------------------------------------------- GRN (V2)


@sweep(20)
@given(cfg=block_configs(grn=True))
def test_grn_block_matches_oracle(cfg):
    """ConvNeXt-V2 blocks (grn_weight/grn_bias): forward and every gradient, including the
    GRN parameters', vs the oracle with timm's GlobalResponseNorm. On CPU the fused kernel
    serves them (float32 inside, like the V1 block: the same bounds). Should the op run
    its PyTorch reference instead, in bfloat16 that rounds every intermediate tensor to
    bf16, and the bound becomes the probabilistic one for S roundings of relative size
    u_bf16: 4*sqrt(S)*u_bf16 of the magnitude, S = 20 steps forward, 48 with the backward."""
    x, p, ds, grn = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg)
    calls = []
    real = _mod._cb_fwd
    try:
        _mod._cb_fwd = lambda *a: calls.append(1) or real(*a)
        y, grads = op_grads(x, p, ds, cfg, gy, grn)
    finally:
        _mod._cb_fwd = real
    assert y.is_contiguous(memory_format=cfg.memory_format)
    assert set(grads) == set(leaves_of(x, p, grn))
    refs = oracle(x, p, ds, cfg.eps, cfg.approximate, gy, grn)
    for key, got in {"y": y, **grads}.items():
        rtol = None
        if cfg.dtype == torch.bfloat16 and not calls:
            rtol = LAMBDA * math.sqrt(20 if key == "y" else 48) * BF16_U
        assert_close_to(("GRN y" if key == "y" else f"GRN grad_{key}"), got, refs[key],
                        cfg.dtype, cfg.short(), rtol=rtol)


@pytest.mark.parametrize("budget", ["none", "dz", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grn_store_budget_changes_no_bit(budget, dtype):
    """GRN blocks keep hidden-sized values between their passes within a scratch budget
    (fastvis._C.set_grn_store_bytes): the forward's activations, the backward's dz (then
    also a). Outputs and gradients are bitwise the same with nothing kept, dz only, and
    everything, over several tiles and partial-sum runs."""
    from fastvis import _C
    cfg = BlockCfg(n=2, c=24, h=13, w=11, k=7, hidden=96, layout="nhwc", dtype=dtype, grn=True)
    hb = cfg.pixels * cfg.hd * (8 if dtype == torch.float64 else 4)
    torch.manual_seed(5)
    x, p, ds, grn = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg)
    default = _C.grn_store_bytes()
    results = {}
    try:
        for name, cap in (("none", 0), ("dz", hb), ("default", default)):
            _C.set_grn_store_bytes(cap)
            results[name] = op_grads(x, p, ds, cfg, gy, grn)
    finally:
        _C.set_grn_store_bytes(default)
    y0, g0 = results["none"]
    y1, g1 = results[budget]
    assert torch.equal(y0, y1)
    assert g0.keys() == g1.keys()
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grn_stats_from_the_forward_change_no_bit(dtype):
    """The core backward given the forward's GRN row sums (grn_stats) skips recomputing
    them: bitwise the same gradients as without them. The op saves them (a tiny (N, H,
    hidden) tensor) and passes them on; bad ones are refused."""
    from fastvis import _C
    cfg = BlockCfg(n=2, c=16, h=9, w=7, k=5, hidden=64, dtype=dtype, grn=True)
    torch.manual_seed(3)
    x, p, ds, grn = make_inputs(cfg)
    ws = [p["dw_weight"], p["dw_bias"], p["norm_weight"], p["norm_bias"], p["fc1_weight"],
          p["fc1_bias"], p["fc2_weight"], p["fc2_bias"], p["gamma"], None, grn["grn_weight"],
          grn["grn_bias"]]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stats = torch.empty(cfg.n, cfg.h, cfg.hd, dtype=acc)
    y = torch.empty_like(x)
    _C.convnext_block_forward(x, ws, cfg.eps, False, y, None, 1e-6, 0, True, stats)
    y0 = torch.empty_like(x)
    _C.convnext_block_forward(x, ws, cfg.eps, False, y0)
    assert torch.equal(y, y0)
    gy = make_grad_output(cfg)
    out = []
    for s in (None, stats):
        gs = [torch.empty_like(x)] + [None if t is None else torch.empty_like(t) for t in
                                      ws[:9] + ws[10:]]
        _C.convnext_block_backward(gy, x, ws, cfg.eps, False, gs, None, 1e-6, 0, s)
        out.append(gs)
    for a, b in zip(*out):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match=r"grn_stats: expected a contiguous \[2, 9, 64\]"):
        _C.convnext_block_forward(x, ws, cfg.eps, False, y, None, 1e-6, 0, True, stats[:, :8])
    with pytest.raises(ValueError, match="no GRN"):
        _C.convnext_block_forward(x, ws[:10] + [None, None], cfg.eps, False, y, None, 1e-6, 0,
                                  True, stats)
    # the op passes them on: its graph holds them, and its gradients equal the core's
    xl, pl_, _, gl = make_inputs(cfg, requires_grad=True)
    with torch.no_grad():
        xl.copy_(x)
        for d, src in ((pl_, p), (gl, grn)):
            for k in d:
                if d[k] is not None:
                    d[k].copy_(src[k])
    yo, go = op_grads(xl, pl_, None, cfg, gy, gl)
    assert torch.equal(yo, y)
    assert torch.equal(go["x"], out[1][0]) and torch.equal(go["fc1_weight"], out[1][5])


# --------------------------------------------------------------------------- k-major fc2


def _kmajor(t):
    """The same (C, hidden) values stored column by column: strides (1, C)."""
    return t.detach().t().contiguous().t().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("grn", [False, True])
@pytest.mark.parametrize("c,h,w", [(24, 9, 7), (40, 5, 5)])
def test_kmajor_fc2_weight_forward_and_gradients(dtype, grn, c, h, w):
    """fc2_weight with strides (1, C) (what the modules' eval caches pass): the forward
    multiplies it without a transpose, the backward works from a row-major copy; every
    output and gradient meets the float64 oracle's bounds and matches the row-major call."""
    cfg = BlockCfg(n=2, c=c, h=h, w=w, dtype=dtype, grn=grn, drop="mixed")
    x, p, ds, g = make_inputs(cfg, requires_grad=True)
    pk = dict(p, fc2_weight=_kmajor(p["fc2_weight"]))
    assert pk["fc2_weight"].stride() == (1, c) and torch.equal(pk["fc2_weight"], p["fc2_weight"])
    gy = make_grad_output(cfg)
    y, grads = op_grads(x, pk, ds, cfg, gy, g)
    assert grads["fc2_weight"].shape == (c, cfg.hd)
    refs = oracle(x, p, ds, cfg.eps, cfg.approximate, gy, g)
    for key, got in {"y": y, **grads}.items():
        assert_close_to("k-major " + ("y" if key == "y" else f"grad_{key}"), got, refs[key], dtype, cfg.short())
    y_row, grads_row = op_grads(x, p, ds, cfg, gy, g)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_row, **tol)
    for key in grads:
        torch.testing.assert_close(grads[key], grads_row[key], **tol, msg=lambda m: f"grad_{key}: {m}")
    with torch.no_grad():
        assert torch.equal(run(op, x, pk, ds, cfg, g), y.detach())


def test_kmajor_fc2_weight_is_read_in_place():
    """The forward's scratch holds no copy of a k-major float32 fc2 weight (the same size as
    for a row-major one), but does for a strided layout that is neither."""
    cfg = BlockCfg(n=1, c=32, h=6, w=6)
    x, p, ds, _ = make_inputs(cfg)
    ws_of = lambda w2: [p["dw_weight"], p["dw_bias"], p["norm_weight"], p["norm_bias"], p["fc1_weight"],
                        p["fc1_bias"], w2, p["fc2_bias"], p["gamma"], None, None, None]
    nb = lambda w2: _mod._C.convnext_block_forward_scratch_bytes(x.contiguous(memory_format=torch.channels_last),
                                                                  ws_of(w2), cfg.eps, False, 1e-6)
    w2 = p["fc2_weight"]
    other = torch.zeros(cfg.c, 2 * cfg.hd)[:, ::2]
    other.copy_(w2)
    assert nb(_kmajor(w2)) == nb(w2)
    assert nb(other) >= nb(w2) + 4 * cfg.c * cfg.hd


def test_grn_oracle_is_timm_global_response_norm():
    """The oracle's GRN against a transcription of timm's GlobalResponseNorm
    (channels_last: torch.norm over H, W; x + bias + weight * (x * Nx))."""
    h = torch.randn(2, 5, 4, 7, dtype=torch.float64)
    w, b = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    gx = torch.norm(h, p=2, dim=(1, 2), keepdim=True)
    timm = h + b + w * (h * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)))
    torch.testing.assert_close(_oracle_grn(h, w, b, 1e-6), timm, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- low level


class _Recorder:
    """Stands in for fastvis._C inside the op's module and records the calls, so the
    low-level tests call the entry points exactly as the Python layer does."""

    def __init__(self, real):
        self._real, self.calls = real, {}

    def __getattr__(self, name):
        f = getattr(self._real, name)
        if not callable(f):
            return f

        def wrap(*a, **k):
            self.calls.setdefault(name, []).append((a, k))
            return f(*a, **k)
        return wrap


def _recorded_calls(monkeypatch, cfg):
    """(forward args, backward args) of the _C calls the public op makes for cfg."""
    rec = _Recorder(_C)
    monkeypatch.setattr(_mod, "_C", rec)
    x, p, ds, _ = make_inputs(cfg, requires_grad=True)
    y = run(op, x, p, ds, cfg)
    torch.autograd.grad(y, list(leaves_of(x, p).values()), make_grad_output(cfg))
    monkeypatch.undo()
    (fa, fk), = rec.calls["convnext_block_forward"]
    (ba, bk), = rec.calls["convnext_block_backward"]
    assert not fk and not bk

    def det(a):  # autograd marks the op's returned y as requiring grad
        if type(a).__name__ == "PyCapsule":  # the ops hand DLPack capsules to the core
            return torch.from_dlpack(a).detach()
        if isinstance(a, torch.Tensor):
            return a.detach()
        return [det(t) for t in a] if isinstance(a, (list, tuple)) else a
    return det(fa), det(ba), (x, p, ds)


def test_lowlevel_scratch_too_small_is_value_error(monkeypatch):
    cfg = BlockCfg(n=2, c=8, h=5, w=6, k=3)
    fa, ba, (x, p, ds) = _recorded_calls(monkeypatch, cfg)
    # forward(x, weights, eps, tanh_gelu, y, scratch, ...), backward(grad_y, x, weights,
    # eps, tanh_gelu, grads, scratch, ...)
    # On the CPU the op passes scratch=None (the bindings keep a per-thread buffer).
    assert fa[5] is None and ba[6] is None
    need = _C.convnext_block_forward_scratch_bytes(fa[0], fa[1], fa[2], fa[3], fa[6])
    bneed = _C.convnext_block_backward_scratch_bytes(ba[1], ba[2], ba[3], ba[4], ba[7])
    assert need > 0 and bneed > 0
    for small in (0, 8, need - 1):
        args = fa[:5] + [torch.empty(small, dtype=torch.uint8)] + fa[6:]
        _raises(ValueError, r"scratch", call=lambda: _C.convnext_block_forward(*args))
    for small in (0, bneed - 1):
        args = ba[:6] + [torch.empty(small, dtype=torch.uint8)] + ba[6 + 1:]
        _raises(ValueError, r"scratch", call=lambda: _C.convnext_block_backward(*args))
    args = fa[:5] + [torch.empty(need, dtype=torch.float32)] + fa[6:]
    _raises(TypeError, r"scratch", call=lambda: _C.convnext_block_forward(*args))
    # exactly the size asked for works, and so does scratch=None (allocated inside)
    y1, y2 = torch.empty_like(fa[4]), torch.empty_like(fa[4])
    _C.convnext_block_forward(*fa[:4], y1, torch.empty(need, dtype=torch.uint8), *fa[6:])
    _C.convnext_block_forward(*fa[:4], y2, None, *fa[6:])
    assert torch.equal(y1, y2)
    check({"y": y1}, oracle(x, p, ds, cfg.eps, cfg.approximate), cfg, prefix="_C ")


def test_lowlevel_nchw_input_is_value_error(monkeypatch):
    cfg = BlockCfg(n=2, c=8, h=5, w=6, k=3)
    fa, ba, _ = _recorded_calls(monkeypatch, cfg)
    xl = fa[0]
    xn = xl.contiguous()
    assert not xn.is_contiguous(memory_format=torch.channels_last)
    _raises(ValueError, r"^x: ", r"channels-last",
            call=lambda: _C.convnext_block_forward(xn, *fa[1:]))
    _raises(ValueError, r"^x: ", r"channels-last",
            call=lambda: _C.convnext_block_forward_scratch_bytes(xn, fa[1], fa[2], fa[3]))
    _raises(ValueError, r"^y: ", r"channels-last",
            call=lambda: _C.convnext_block_forward(*fa[:4], fa[4].contiguous(), *fa[5:]))
    _raises(ValueError, r"^x: ", r"channels-last",
            call=lambda: _C.convnext_block_backward(ba[0], xn, *ba[2:]))
    _raises(ValueError, r"^grad_y: ", r"channels-last",
            call=lambda: _C.convnext_block_backward(ba[0].contiguous(), *ba[1:]))


# --------------------------------------------------------------------------- prepared arguments


@pytest.mark.parametrize("cfg", [
    BlockCfg(n=2, c=24, h=9, w=7),
    BlockCfg(n=1, c=40, h=5, w=6, layout="nchw", grn=True, approximate="tanh", gamma=False),
    BlockCfg(n=2, c=16, h=6, w=6, dtype=torch.float64, strided_params=True, k=5),
], ids=lambda c: c.short())
def test_prepared_arguments_match_the_op(cfg):
    """convnext_block_prepared (the eval modules' path: arguments checked once) gives the
    op's bits, keeps x's memory format, and falls back to the op itself (its reference
    here) in reference mode and for an input it was not prepared for."""
    from fastvis.ops.convnext_block import PreparedConvNeXtBlock, convnext_block_prepared
    x, p, _, grn = make_inputs(cfg)
    prep = PreparedConvNeXtBlock(x, *p.values(), cfg.eps, approximate=cfg.approximate, **grn)
    with torch.no_grad():
        want = run(fastvis.ops.convnext_block, x, p, None, cfg, grn)
        got = convnext_block_prepared(x, prep)
        assert torch.equal(got, want)
        assert got.is_contiguous(memory_format=cfg.memory_format)
        with fastvis.use_reference(True):
            ref = convnext_block_prepared(x, prep)
            assert torch.equal(ref, run(fastvis.ops.convnext_block, x, p, None, cfg, grn))
        with pytest.raises(ValueError, match=r"dw_weight: expected shape"):
            convnext_block_prepared(torch.randn(1, cfg.c + 1, 4, 4, dtype=cfg.dtype), prep)
        with pytest.raises(TypeError, match=r"dtype"):
            convnext_block_prepared(x.to(torch.bfloat16 if cfg.dtype != torch.bfloat16 else torch.float32), prep)


def test_prepared_arguments_are_checked_when_prepared():
    from fastvis.ops.convnext_block import PreparedConvNeXtBlock
    cfg = BlockCfg(n=1, c=8, h=4, w=4)
    x, p, _, _ = make_inputs(cfg)
    bad = dict(p, fc2_weight=torch.randn(8, 31))
    with pytest.raises(ValueError, match=r"fc2_weight: expected shape \(8, 32\)"):
        PreparedConvNeXtBlock(x, *bad.values())
    with pytest.raises(ValueError, match=r"eps"):
        PreparedConvNeXtBlock(x, *p.values(), -1.0)
