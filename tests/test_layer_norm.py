"""LayerNorm over channels (CPU): fastvis.ops.layer_norm_channels and fastvis.nn.LayerNorm2d.

Every result is compared with a float64 oracle built from F.layer_norm on the permuted
(NHWC) tensor -- timm's LayerNorm2d -- evaluated on exactly the values the kernel saw,
with per-element bounds |got - ref| <= rel_ref*|ref| + rel_mag*magnitude (conftest.py's
`tolerance`). The magnitudes follow a first-order error analysis of the two-pass
statistics in the accumulation type (u its unit roundoff), with
    r = 1/sqrt(var + eps),  m1 = mean_c |x|,  a = |x_hat| + m1 * r
(the computed mean errs by <= C*u*m1, which moves x_hat by <= C*u*m1*r; the variance
and rstd err relatively by <= C*u, which moves x_hat by <= C*u*|x_hat|):
    y:            |w| * a + |b|                                  reduction length C
    grad_x:       r * (|g| + mean_c|g| + a * mean_c(|g| * a)),    g = grad_y * w, length C
    grad_weight:  sum over pixels of |grad_y| * a                 length N*H*W
    grad_bias:    sum over pixels of |grad_y|                     length N*H*W
    mean: m1, rstd: r                                             length C
float32 allows max(1e-5, (L + 2) * 2^-24) of the magnitude, float64 1e-10, bfloat16 adds
2^-8 |ref| for the final rounding (see conftest.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import fastvis
import fastvis.nn
import fastvis.ops
from conftest import assert_within, single_threaded_torch, sweep

_C = fastvis._C
ln = fastvis.ops.layer_norm_channels
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class LNCfg:
    n: int
    c: int
    h: int
    w: int
    layout: str = "nhwc"  # "nhwc" (channels_last) or "nchw" (contiguous)
    dtype: torch.dtype = torch.float32
    weight: bool = True
    bias: bool = True
    eps: float = 1e-6
    offset: float = 0.0  # x = randn * scale + offset (tests the centring)
    scale: float = 1.0

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "nhwc" else torch.contiguous_format

    @property
    def pixels(self) -> int:
        return self.n * self.h * self.w

    def short(self) -> str:
        return (f"N={self.n} C={self.c} H={self.h} W={self.w} layout={self.layout} "
                f"dtype={str(self.dtype).replace('torch.', '')} weight={self.weight} "
                f"bias={self.bias} eps={self.eps} x=randn*{self.scale}+{self.offset}")


def make_inputs(cfg: LNCfg, requires_grad: bool = False):
    """x (cfg.layout), weight, bias (or None) of cfg.dtype; drawn in float32 and rounded
    once, so the float64 copies the oracle uses are exactly what the kernel reads."""
    x = (torch.randn(cfg.n, cfg.c, cfg.h, cfg.w) * cfg.scale + cfg.offset).to(cfg.dtype)
    x = x.contiguous(memory_format=cfg.memory_format)
    w = torch.randn(cfg.c).to(cfg.dtype) if cfg.weight else None
    b = torch.randn(cfg.c).to(cfg.dtype) if cfg.bias else None
    if requires_grad:
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(True)
    return x, w, b


def make_grad_output(cfg: LNCfg) -> torch.Tensor:
    gy = torch.randn(cfg.n, cfg.c, cfg.h, cfg.w).to(cfg.dtype)
    return gy.contiguous(memory_format=cfg.memory_format)


SPECIAL_C = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65, 96, 127, 128,
             129, 192, 200]


@st.composite
def ln_configs(draw, dtypes=ALL_DTYPES, layouts=("nchw", "nhwc"), max_n: int = 3):
    c = draw(st.one_of(st.integers(1, 200), st.sampled_from(SPECIAL_C)))
    size = draw(st.sampled_from(["tiny", "small", "small", "larger"]))
    if size == "tiny":
        h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    elif size == "small":
        h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    else:  # several NCHW pixel blocks with a partial one; several weight-gradient chunks
        h, w = draw(st.integers(13, 40)), draw(st.integers(13, 40))
    n = draw(st.sampled_from([1, 2, 3, 1, 2, 0][: 6 if max_n >= 3 else 4]))
    n = min(n, max_n)
    if size == "larger":
        n = min(n, max(1, 60000 // (c * h * w)))
    affine = draw(st.sampled_from(["both", "both", "none", "weight", "bias"]))
    return LNCfg(
        n=n, c=c, h=h, w=w, layout=draw(st.sampled_from(list(layouts))),
        dtype=draw(st.sampled_from(list(dtypes))),
        weight=affine in ("both", "weight"), bias=affine in ("both", "bias"),
        eps=draw(st.sampled_from([1e-6, 1e-6, 1e-5, 1e-3, 0.1])),
        offset=draw(st.sampled_from([0.0, 0.0, 2.5, -40.0])),
        scale=draw(st.sampled_from([1.0, 1.0, 0.01, 30.0, 0.0])),
    )


# --------------------------------------------------------------------------- oracle


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def _nchw(t):  # (N, H, W, C) -> (N, C, H, W)
    return t.permute(0, 3, 1, 2)


def oracle(x, w, b, eps, gy=None):
    """float64 references and magnitudes: dict name -> (ref, mag). Keys: y, mean, rstd
    and, with gy, x, weight, bias (the gradients of the given affine parameters)."""
    with single_threaded_torch():
        C = x.shape[1]
        xp = _f64(x).permute(0, 2, 3, 1)
        w64, b64 = _f64(w), _f64(b)
        mu = xp.mean(-1, keepdim=True)
        r = ((xp - mu).square().mean(-1, keepdim=True) + eps).rsqrt()
        m1 = xp.abs().mean(-1, keepdim=True)
        a = ((xp - mu) * r).abs() + m1 * r
        wa = torch.ones(C, dtype=torch.float64) if w is None else w64.abs()
        ba = torch.zeros(C, dtype=torch.float64) if b is None else b64.abs()
        out = {
            "y": (_nchw(F.layer_norm(xp, (C,), w64, b64, eps)), _nchw(wa * a + ba)),
            "mean": (mu.squeeze(-1), m1.squeeze(-1)),
            "rstd": (r.squeeze(-1), r.squeeze(-1)),
        }
        if gy is None:
            return out
        xr = xp.clone().requires_grad_(True)
        leaves = [xr] + [t.clone().requires_grad_(True) for t in (w64, b64) if t is not None]
        wr = leaves[1] if w is not None else None
        br = leaves[-1] if b is not None else None
        gyp = _f64(gy).permute(0, 2, 3, 1)
        grads = torch.autograd.grad(F.layer_norm(xr, (C,), wr, br, eps), leaves, gyp)
        gya = gyp.abs()
        ga = gya * wa
        gx_mag = r * (ga + ga.mean(-1, keepdim=True) + a * (ga * a).mean(-1, keepdim=True))
        out["x"] = (_nchw(grads[0]), _nchw(gx_mag))
        if w is not None:
            out["weight"] = (grads[1], (gya * a).sum(dim=(0, 1, 2)))
        if b is not None:
            out["bias"] = (grads[-1], gya.sum(dim=(0, 1, 2)))
        return out


def _lengths(cfg: LNCfg):
    return {"y": cfg.c, "mean": cfg.c, "rstd": cfg.c, "x": cfg.c, "weight": cfg.pixels,
            "bias": cfg.pixels}


def check(results: dict, refs: dict, cfg: LNCfg, prefix: str = "") -> None:
    """results: name -> tensor (names as in `oracle`)."""
    lens = _lengths(cfg)
    for key, got in results.items():
        ref, mag = refs[key]
        dtype = got.dtype if key in ("mean", "rstd") else cfg.dtype
        assert_within(prefix + key, got, ref, mag, dtype, lens[key], cfg.short())


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- forward


@sweep(200)
@given(cfg=ln_configs())
def test_forward_sweep(cfg):
    x, w, b = make_inputs(cfg)
    y = ln(x, w, b, eps=cfg.eps)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=cfg.memory_format), f"memory format lost; {cfg.short()}"
    y2, mean, rstd = torch.ops.fastvis.layer_norm_channels(x, w, b, cfg.eps)
    assert torch.equal(y, y2)
    assert mean.dtype == rstd.dtype == stats_dtype(cfg.dtype)
    assert mean.shape == rstd.shape == (cfg.n, cfg.h, cfg.w)
    check({"y": y, "mean": mean, "rstd": rstd}, oracle(x, w, b, cfg.eps), cfg)


# --------------------------------------------------------------------------- backward


def autograd_grads(cfg: LNCfg, fn=None):
    x, w, b = make_inputs(cfg, requires_grad=True)
    y = (fn or ln)(x, w, b, eps=cfg.eps)
    gy = make_grad_output(cfg)
    names = ["x"] + (["weight"] if w is not None else []) + (["bias"] if b is not None else [])
    leaves = [t for t in (x, w, b) if t is not None]
    grads = dict(zip(names, torch.autograd.grad(y, leaves, gy)))
    return grads, (x, w, b, gy)


@sweep(200)
@given(cfg=ln_configs())
def test_backward_sweep(cfg):
    grads, (x, w, b, gy) = autograd_grads(cfg)
    assert grads["x"].shape == x.shape
    check(grads, oracle(x, w, b, cfg.eps, gy), cfg, prefix="grad_")


@sweep(25)
@given(cfg=ln_configs(dtypes=(torch.float32, torch.float64)))
def test_python_reference_sweep(cfg):
    """The pure-PyTorch reference (fastvis.use_reference()) meets the same bounds."""
    with fastvis.use_reference():
        grads, (x, w, b, gy) = autograd_grads(cfg)
        y = ln(x.detach(), _f(w), _f(b), eps=cfg.eps)
    assert y.is_contiguous(memory_format=cfg.memory_format)
    refs = oracle(x, w, b, cfg.eps, gy)
    check({"y": y}, refs, cfg, prefix="reference ")
    check(grads, refs, cfg, prefix="reference grad_")


def _f(t):
    return None if t is None else t.detach()


# --------------------------------------------------------------------------- low level


def _nan_like(shape, cfg, fmt=None, dtype=None):
    t = torch.empty(shape, dtype=dtype or cfg.dtype)
    if fmt is not None:
        t = t.contiguous(memory_format=fmt)
    return t.fill_(float("nan"))


@sweep(60)
@given(cfg=ln_configs(), outs=st.sampled_from(["all", "x", "weight", "bias", "params"]),
       stats=st.booleans())
def test_lowlevel_fast_path_and_cpp_reference(cfg, outs, stats):
    """_C entry points (optional outputs left out) and the C++ scalar references."""
    x, w, b = make_inputs(cfg)
    gy = make_grad_output(cfg)
    refs = oracle(x, w, b, cfg.eps, gy)
    shape, fmt = tuple(x.shape), cfg.memory_format
    sshape, sdt = (cfg.n, cfg.h, cfg.w), stats_dtype(cfg.dtype)
    want = {"all": ("x", "weight", "bias"), "params": ("weight", "bias")}.get(outs, (outs,))
    for impl in ("fast", "reference"):
        y = _nan_like(shape, cfg, fmt)
        mean = _nan_like(sshape, cfg, dtype=sdt)
        rstd = _nan_like(sshape, cfg, dtype=sdt)
        gx = _nan_like(shape, cfg, fmt) if "x" in want else None
        gw = _nan_like((cfg.c,), cfg) if "weight" in want else None
        gb = _nan_like((cfg.c,), cfg) if "bias" in want else None
        ms = (mean, rstd) if stats else (None, None)
        if impl == "fast":
            _C.layer_norm_channels_forward(x, w, b, cfg.eps, y, *ms)
            if not stats:
                mean, rstd = (_nan_like(sshape, cfg, dtype=sdt) for _ in range(2))
                _C.layer_norm_channels_forward(x, w, b, cfg.eps, _nan_like(shape, cfg, fmt),
                                               mean, rstd)
            _C.layer_norm_channels_backward(gy, x, w, mean, rstd, gx, gw, gb)
        else:
            _C.layer_norm_channels_forward_reference(x, w, b, cfg.eps, y, *ms)
            _C.layer_norm_channels_backward_reference(gy, x, w, cfg.eps, gx, gw, gb)
        got = {"y": y}
        if stats or impl == "fast":
            got.update(mean=mean, rstd=rstd)
        refs_here = dict(refs)
        # Without a weight, grad_weight is the gradient of an all-ones weight.
        if gw is not None:
            got["weight"] = gw
            if w is None:
                refs_here["weight"] = oracle(x, torch.ones(cfg.c, dtype=cfg.dtype), b, cfg.eps,
                                             gy)["weight"]
        if gb is not None:
            got["bias"] = gb
            if b is None:
                refs_here["bias"] = oracle(x, w, torch.zeros(cfg.c, dtype=cfg.dtype), cfg.eps,
                                           gy)["bias"]
        if gx is not None:
            got["x"] = gx
        check(got, refs_here, cfg, prefix=f"_C {impl} ")


def test_cpp_reference_accepts_any_strides():
    cfg = LNCfg(n=2, c=5, h=4, w=6, dtype=torch.float64)
    base = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    x = base.permute(0, 2, 3, 1)  # neither NCHW nor NHWC dense
    w, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y = torch.empty(2, 5, 4, 6, dtype=torch.float64)
    _C.layer_norm_channels_forward_reference(x, w, b, cfg.eps, y)
    check({"y": y}, oracle(x, w, b, cfg.eps), cfg)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("affine", ["both", "none", "weight"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 9, 3, 2), (2, 1, 3, 3)])
def test_gradcheck_float64(shape, affine, layout):
    n, c, h, w = shape
    cfg = LNCfg(n=n, c=c, h=h, w=w, layout=layout, dtype=torch.float64,
                weight=affine in ("both", "weight"), bias=affine == "both", eps=1e-5)
    x, wt, b = make_inputs(cfg, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, wt, b: ln(x, wt, b, eps=cfg.eps), (x, wt, b),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_convnext_sized_problem(layout):
    """ConvNeXt-T stage 1: C=96 at 56x56 (several chunks, full NCHW blocks + a partial one)."""
    cfg = LNCfg(n=2, c=96, h=56, w=56, layout=layout)
    grads, (x, w, b, gy) = autograd_grads(cfg)
    refs = oracle(x, w, b, cfg.eps, gy)
    check(grads, refs, cfg, prefix="grad_")
    check({"y": ln(x.detach(), _f(w), _f(b))}, refs, cfg)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("nhw", [(0, 4, 3), (2, 0, 3), (1, 4, 0)])
def test_empty_batch_or_image(nhw, layout):
    cfg = LNCfg(n=nhw[0], c=5, h=nhw[1], w=nhw[2], layout=layout)
    x, w, b = make_inputs(cfg, requires_grad=True)
    y = ln(x, w, b)
    assert y.shape == x.shape
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.empty_like(y))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros(5)) and torch.equal(gb, torch.zeros(5))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_nan_in_x_propagates(layout):
    cfg = LNCfg(n=2, c=12, h=5, w=6, layout=layout)
    x, w, b = make_inputs(cfg)
    x = x.clone()
    x[1, 3, 2, 4] = float("nan")
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = ln(x, w, b)
    nan = torch.isnan(y)
    assert bool(nan[1, :, 2, 4].all()), "the NaN pixel's outputs must all be NaN"
    assert int(nan.sum()) == cfg.c, f"NaN leaked to other pixels: {int(nan.sum())} NaNs"
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), make_grad_output(cfg))
    assert bool(torch.isnan(gx[1, :, 2, 4]).all()) and int(torch.isnan(gx).sum()) == cfg.c
    assert bool(torch.isnan(gw).all()), "grad_weight sums over the NaN pixel"
    assert not bool(torch.isnan(gb).any()), "grad_bias does not depend on x"
    finite = ~nan
    refs = oracle(x, w, b, cfg.eps)
    assert_within("y (finite part)", y[finite], refs["y"][0][finite], refs["y"][1][finite],
                  cfg.dtype, cfg.c, cfg.short())


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_backward_from_sum_loss_broadcast_grad_output(layout):
    cfg = LNCfg(n=2, c=10, h=5, w=7, layout=layout)
    x, w, b = make_inputs(cfg, requires_grad=True)
    ln(x, w, b).sum().backward()
    gy = torch.ones(cfg.n, cfg.c, cfg.h, cfg.w)
    check({"x": x.grad, "weight": w.grad, "bias": b.grad}, oracle(x, w, b, cfg.eps, gy), cfg)


def test_non_dense_input_and_grad_output():
    cfg = LNCfg(n=2, c=6, h=7, w=5)
    base = torch.randn(2, 6, 5, 7, requires_grad=True)
    x = base.transpose(2, 3)  # non-dense logical NCHW: copied to contiguous
    w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    y = ln(x, w, b)
    gy = torch.randn(2, 6, 5, 7).transpose(2, 3)
    gbase, gw, gb = torch.autograd.grad(y, (base, w, b), gy)
    refs = oracle(x, w, b, cfg.eps, gy)
    check({"y": y, "x": gbase.transpose(2, 3), "weight": gw, "bias": gb}, refs, cfg)


@pytest.mark.parametrize("which", ["x", "weight", "bias", "weight+bias"])
def test_partial_requires_grad(which):
    cfg = LNCfg(n=2, c=20, h=6, w=5)
    x, w, b = make_inputs(cfg)
    leaves = {"x": x, "weight": w, "bias": b}
    names = which.split("+")
    for name in names:
        leaves[name].requires_grad_(True)
    gy = make_grad_output(cfg)
    g = torch.autograd.grad(ln(x, w, b), [leaves[n] for n in names], gy)
    check(dict(zip(names, g)), oracle(x, w, b, cfg.eps, gy), cfg)


def test_no_affine_equals_unit_affine():
    x = torch.randn(2, 17, 5, 4).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ln(x), ln(x, torch.ones(17), torch.zeros(17)))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_forward_independent_of_thread_count(layout):
    cfg = LNCfg(n=3, c=40, h=20, w=21, layout=layout)
    x, w, b = make_inputs(cfg)
    try:
        fastvis.set_num_threads(1)
        y1 = ln(x, w, b)
        fastvis.set_num_threads(2)
        y2 = ln(x, w, b)
    finally:
        fastvis.set_num_threads(0)
    assert torch.equal(y1, y2)


# --------------------------------------------------------------------------- determinism


def _param_grads(x, w, b, gy):
    xr, wr, br = (t.detach().requires_grad_(True) for t in (x, w, b))
    return torch.autograd.grad(ln(xr, wr, br), (xr, wr, br), gy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_weight_grad_deterministic_and_thread_count_independent(layout, dtype):
    cfg = LNCfg(n=3, c=40, h=23, w=20, layout=layout, dtype=dtype)
    x, w, b = make_inputs(cfg)
    gy = make_grad_output(cfg)
    old = fastvis.get_num_threads()
    try:
        fastvis.set_num_threads(2)
        runs = [_param_grads(x, w, b, gy) for _ in range(3)]
        fastvis.set_num_threads(1)
        single = _param_grads(x, w, b, gy)
    finally:
        fastvis.set_num_threads(0)  # back to following torch
    assert fastvis.get_num_threads() == old
    for i, run in enumerate(runs[1:], 1):
        for name, a, c in zip(("x", "weight", "bias"), run, runs[0]):
            assert torch.equal(a, c), f"grad_{name} differs between run 0 and run {i}"
    for name, a, c in zip(("x", "weight", "bias"), single, runs[0]):
        assert torch.equal(a, c), (
            f"grad_{name} with 1 thread != with 2 threads "
            f"(max |diff| {(a.double() - c.double()).abs().max().item():.3g})")
    check({"x": runs[0][0], "weight": runs[0][1], "bias": runs[0][2]},
          oracle(x, w, b, cfg.eps, gy), cfg)


# --------------------------------------------------------------------------- torch.compile


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = fastvis.nn.LayerNorm2d(c)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        y = torch.nn.functional.gelu(self.norm(x)) + x
        return fastvis.ops.layer_norm_channels(y * 2.0, eps=1e-5)


def _run(model, x):
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    grads = [x.grad] + [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return y.detach(), grads


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _Block(12)
    x = torch.randn(2, 12, 7, 6).contiguous(memory_format=torch.channels_last)
    y_e, g_e = _run(model, x)
    compiled = torch.compile(model, fullgraph=True)
    y_c, g_c = _run(compiled, x)
    y_c2, g_c2 = _run(compiled, x)
    assert y_c.is_contiguous(memory_format=torch.channels_last)
    # Same kernels; only the fused pointwise ops may round differently (a few float32 ulps).
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["x", "weight", "bias"], g_c, g_e):
        assert a is not None, f"compiled graph produced no gradient for {name}"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
    assert torch.equal(y_c, y_c2) and all(torch.equal(a, b) for a, b in zip(g_c, g_c2))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fake_kernel_matches_real(layout, dtype):
    cfg = LNCfg(n=2, c=6, h=5, w=7, layout=layout, dtype=dtype)
    x, w, b = make_inputs(cfg)
    real = torch.ops.fastvis.layer_norm_channels(x, w, b, 1e-6)
    with FakeTensorMode() as mode:
        fake = torch.ops.fastvis.layer_norm_channels(*(mode.from_tensor(t) for t in (x, w, b)),
                                                     1e-6)
    for r, f in zip(real, fake):
        assert tuple(f.shape) == tuple(r.shape) and f.dtype == r.dtype
        assert f.stride() == r.stride(), f"fake strides {f.stride()} != real {r.stride()}"


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_opcheck_custom_ops(layout):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(2, 5, 4, 3).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    op = torch.ops.fastvis.layer_norm_channels.default
    torch.library.opcheck(op, (x, w, b, 1e-6))
    torch.library.opcheck(op, (x, None, None, 1e-5))
    _, mean, rstd = op(x.detach(), w.detach(), b.detach(), 1e-6)
    gy = torch.randn(2, 5, 4, 3).contiguous(memory_format=fmt)
    torch.library.opcheck(torch.ops.fastvis.layer_norm_channels_backward.default,
                          (gy, x.detach(), w.detach(), mean, rstd, True, True, True))


# --------------------------------------------------------------------------- errors


def _x(dtype=torch.float32, c=4):
    return torch.randn(2, c, 5, 5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_input_is_type_error(dtype):
    x = torch.ones(1, 3, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=r"(?i)backend supports"):
        ln(x)


def test_float16_on_cpu_is_type_error():
    with pytest.raises(TypeError, match=r"(?i)float16 is CUDA-only"):
        ln(_x(torch.float16))


@pytest.mark.parametrize("xd,pd,which", [
    (torch.float32, torch.float64, "weight"), (torch.float64, torch.float32, "weight"),
    (torch.bfloat16, torch.float32, "bias"), (torch.float32, torch.bfloat16, "bias")])
def test_mixed_dtypes_are_type_errors(xd, pd, which):
    x = _x(xd)
    p = torch.randn(4).to(pd)
    kw = {which: p}
    with pytest.raises(TypeError, match=rf"{which}: expected dtype"):
        ln(x, **kw)


@pytest.mark.parametrize("shape", [(5,), (4, 1), (1, 4), (3,), ()])
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_wrong_parameter_shape_is_value_error(shape, which):
    with pytest.raises(ValueError, match=rf"{which}: expected shape \(4,\)"):
        ln(_x(), **{which: torch.randn(shape)})


@pytest.mark.parametrize("shape", [(2, 4, 5), (4, 5), (1, 2, 4, 5, 5)])
def test_not_4d_is_value_error(shape):
    with pytest.raises(ValueError, match=r"4-D \(N, C, H, W\)"):
        ln(torch.randn(shape))


def test_zero_channels_is_value_error():
    with pytest.raises(ValueError, match=r"at least one channel"):
        ln(torch.randn(2, 0, 3, 3))


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf"), -float("inf")])
def test_bad_eps_is_value_error(eps):
    with pytest.raises(ValueError, match=r"eps: expected a positive finite number"):
        ln(_x(), eps=eps)
    with pytest.raises(ValueError, match=r"eps"):
        _C.layer_norm_channels_forward(_x(), None, None, eps, torch.empty(2, 4, 5, 5))


@pytest.mark.parametrize("eps", [True, "1e-6", None, torch.tensor(1e-6)])
def test_eps_of_wrong_type_is_type_error(eps):
    with pytest.raises(TypeError, match=r"eps"):
        ln(_x(), eps=eps)


def test_mixed_devices_is_value_error():
    with pytest.raises(ValueError, match=r"meta.*cpu|cpu.*meta"):
        ln(_x(), torch.randn(4, device="meta"))


@pytest.mark.parametrize("case", ["dtype", "f16", "shape", "eps", "dim"])
def test_reference_mode_validates_like_fast_path(case):
    args = {"dtype": ((_x(), torch.randn(4, dtype=torch.float64)), {}, TypeError),
            "f16": ((_x(torch.float16),), {}, TypeError),
            "shape": ((_x(), torch.randn(3)), {}, ValueError),
            "eps": ((_x(),), {"eps": 0.0}, ValueError),
            "dim": ((torch.randn(4, 5, 5),), {}, ValueError)}[case]
    for mode in (False, True):
        with fastvis.use_reference(mode), pytest.raises(args[2]):
            ln(*args[0], **args[1])


def test_lowlevel_errors_name_the_argument():
    x = _x()
    y = torch.empty(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"^y: expected shape"):
        _C.layer_norm_channels_forward(x, None, None, 1e-6, torch.empty(2, 4, 5, 4))
    with pytest.raises(TypeError, match=r"^y: expected dtype"):
        _C.layer_norm_channels_forward(x, None, None, 1e-6, y.double())
    with pytest.raises(ValueError, match=r"same dense memory layout|one memory layout"):
        _C.layer_norm_channels_forward(x, None, None, 1e-6,
                                       y.contiguous(memory_format=torch.channels_last))
    with pytest.raises(TypeError, match=r"^mean: expected dtype float32"):
        _C.layer_norm_channels_forward(x, None, None, 1e-6, y, torch.empty(2, 5, 5,
                                                                           dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^rstd: expected shape \[2, 5, 5\]"):
        _C.layer_norm_channels_forward(x, None, None, 1e-6, y, None, torch.empty(2, 25))
    with pytest.raises(ValueError, match=r"^mean: must be contiguous"):
        _C.layer_norm_channels_forward(x, None, None, 1e-6, y, torch.empty(2, 5, 5).transpose(1, 2))
    with pytest.raises(ValueError, match=r"scratch"):
        _C.layer_norm_channels_forward(x, None, None, 1e-6, y, None, None,
                                       torch.empty(8, dtype=torch.uint8))
    m, r = torch.empty(2, 5, 5), torch.empty(2, 5, 5)
    _C.layer_norm_channels_forward(x, None, None, 1e-6, y, m, r)
    with pytest.raises(ValueError, match=r"^grad_weight: expected shape \[4\]"):
        _C.layer_norm_channels_backward(y, x, None, m, r, None, torch.empty(5), None)
    with pytest.raises(ValueError, match=r"^grad_y: expected shape"):
        _C.layer_norm_channels_backward(y[:1], x, None, m, r, None, None, None)
    with pytest.raises(TypeError, match=r"^rstd: expected dtype float32"):
        _C.layer_norm_channels_backward(y, x, None, m, r.double(), None, None, None)
    with pytest.raises(TypeError, match=r"float16 is CUDA-only"):
        _C.layer_norm_channels_forward(x.half(), None, None, 1e-6, y.half())


def test_error_then_success_leaves_no_state():
    with pytest.raises(ValueError):
        ln(_x(), eps=-1.0)
    cfg = LNCfg(n=2, c=4, h=5, w=5, layout="nchw")
    x, w, b = make_inputs(cfg)
    check({"y": ln(x, w, b)}, oracle(x, w, b, cfg.eps), cfg)


# --------------------------------------------------------------------------- nn module


class _TimmStyleLayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d's semantics, written here (timm is not a dependency)."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm2d_parameters_and_state_dict(affine):
    ref = _TimmStyleLayerNorm2d(24, affine=affine)
    ours = fastvis.nn.LayerNorm2d(24, affine=affine)
    assert isinstance(ours, nn.LayerNorm)
    assert ours.eps == 1e-6 and ours.normalized_shape == (24,)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    if affine:
        assert torch.equal(ours.weight, torch.ones(24)) and torch.equal(ours.bias, torch.zeros(24))
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    else:
        assert ours.weight is None and ours.bias is None
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    for layout in ("nchw", "nhwc"):
        cfg = LNCfg(n=2, c=24, h=6, w=5, layout=layout, weight=affine, bias=affine)
        x, _, _ = make_inputs(cfg, requires_grad=True)
        y = ours(x)
        assert y.is_contiguous(memory_format=cfg.memory_format)
        gy = make_grad_output(cfg)
        params = list(ours.parameters())
        g = torch.autograd.grad(y, [x] + params, gy)
        refs = oracle(x, ours.weight, ours.bias, ours.eps, gy)
        check({"y": y, "x": g[0], **({"weight": g[1], "bias": g[2]} if affine else {})},
              refs, cfg)
        torch.testing.assert_close(y, ref(x).contiguous(memory_format=cfg.memory_format),
                                   rtol=0, atol=2e-5)


def test_layernorm2d_custom_eps_and_bad_channels():
    m = fastvis.nn.LayerNorm2d(8, eps=1e-3)
    x = torch.randn(1, 8, 3, 3) * 0.01
    cfg = LNCfg(n=1, c=8, h=3, w=3, eps=1e-3, layout="nchw")
    check({"y": m(x)}, oracle(x, m.weight, m.bias, 1e-3), cfg)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_channels"):
            fastvis.nn.LayerNorm2d(bad)
    with pytest.raises(ValueError, match=r"weight: expected shape \(7,\)"):
        m(torch.randn(1, 7, 3, 3))


# --------------------------------------------------------------------------- both ISA paths


def test_generic_isa_path_matches_oracle(tmp_path):
    """The portable build of the kernels (FASTVIS_CPU_ISA=generic) in a subprocess."""
    out = tmp_path / "res.pt"
    code = textwrap.dedent(f"""
        import torch, fastvis
        assert fastvis.build_info()["cpu_isa_selected"] == "generic"
        torch.manual_seed(0)
        res = []
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            for fmt in (torch.contiguous_format, torch.channels_last):
                for (n, c, h, w) in [(2, 37, 9, 11), (1, 8, 20, 17), (3, 3, 2, 5)]:
                    x = torch.randn(n, c, h, w).to(dt).contiguous(memory_format=fmt)
                    wt, b = torch.randn(c).to(dt), torch.randn(c).to(dt)
                    gy = torch.randn(n, c, h, w).to(dt).contiguous(memory_format=fmt)
                    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, wt, b))
                    y = fastvis.ops.layer_norm_channels(xr, wr, br)
                    g = torch.autograd.grad(y, (xr, wr, br), gy)
                    res.append((x, wt, b, gy, y.detach(), g))
        torch.save(res, {str(out)!r})
    """)
    env = dict(os.environ, FASTVIS_CPU_ISA="generic")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for x, w, b, gy, y, (gx, gw, gb) in torch.load(out):
        n, c, h, wd = x.shape
        cfg = LNCfg(n=n, c=c, h=h, w=wd, dtype=x.dtype,
                    layout="nhwc" if x.is_contiguous(memory_format=torch.channels_last) and c > 1
                    else "nchw")
        check({"y": y, "x": gx, "weight": gw, "bias": gb}, oracle(x, w, b, 1e-6, gy), cfg,
              prefix="generic ")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_fall_back_to_reference_with_one_warning():
    x = torch.randn(2, 8, 4, 4, device="cuda")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = ln(x)
        y2 = ln(x)
    assert sum("layer_norm_channels" in str(r.message) for r in rec) == 1
    torch.testing.assert_close(y1, fastvis.ops.layer_norm_channels_reference(x))
    assert torch.equal(y1, y2)
