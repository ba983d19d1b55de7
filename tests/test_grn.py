"""Global Response Normalization (CPU): fastvis.ops.global_response_norm and
fastvis.nn.GlobalResponseNorm.

Every result is compared with a float64 oracle -- timm's GlobalResponseNorm formula
(torch.linalg.vector_norm over H, W; Nx = G / (mean_c G + eps); y = x + b + w * x * Nx)
and torch.autograd on it -- evaluated on exactly the values the kernel saw, with
per-element bounds |got - ref| <= rel_ref*|ref| + rel_mag*magnitude (conftest.py's
`tolerance`, which allows (L + 2) * u of the magnitude for a result of "length" L).
The magnitudes and lengths follow a first-order error analysis of the kernels in the
accumulation type (u its unit roundoff; HW pixels per image, C channels, N images):
    G = sqrt(sum_p x^2):   relative error <= (HW/2 + 1) u              mag G,        L = HW
    d = mean_c G + eps:    relative error <= (HW/2 + C + 2) u
    Nx = G / d:            relative error <= (HW + C + 4) u
    y = x * (1 + w Nx) + b:                              mag |x| + |b| + |w x| Nx,    L = HW + C + 6
    grad_bias = sum_{n,p} gy:                            mag sum |gy|,                L = N*HW
    grad_weight = sum_n Nx D, D = sum_p gy x:            mag sum_n Nx sum_p |gy x|,   L = 2HW + C + N + 4
    grad_x = gy (1 + w Nx) + x (E - Kbar) / (d G),  E = w D,  Kbar = mean_c E Nx:
        mag |gy| (1 + |w| Nx) + |x| / (d G) * (|w| Dm + mean_c |w| Dm Nx),  Dm = sum_p |gy x|,
        L = 3 (HW + C) + 11
float32 allows max(1e-5, (L + 2) * 2^-24) of the magnitude, float64 1e-10, bfloat16 adds
2^-8 |ref| for the final rounding (see conftest.py).
"""
from __future__ import annotations

import dataclasses
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
grn = fastvis.ops.global_response_norm
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class GrnCfg:
    n: int
    c: int
    h: int
    w: int
    layout: str = "nhwc"  # "nhwc" (channels_last) or "nchw" (contiguous)
    dtype: torch.dtype = torch.float32
    params: str = "randn"  # "randn", or "zeros" (timm's initialisation: the identity)
    eps: float = 1e-6
    offset: float = 0.0  # x = randn * scale + offset
    scale: float = 1.0

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "nhwc" else torch.contiguous_format

    @property
    def hw(self) -> int:
        return self.h * self.w

    def short(self) -> str:
        return (f"N={self.n} C={self.c} H={self.h} W={self.w} layout={self.layout} "
                f"dtype={str(self.dtype).replace('torch.', '')} params={self.params} "
                f"eps={self.eps} x=randn*{self.scale}+{self.offset}")


def make_inputs(cfg: GrnCfg, requires_grad: bool = False):
    """x (cfg.layout), weight, bias of cfg.dtype; drawn in float32 and rounded once, so
    the float64 copies the oracle uses are exactly what the kernel reads."""
    x = (torch.randn(cfg.n, cfg.c, cfg.h, cfg.w) * cfg.scale + cfg.offset).to(cfg.dtype)
    x = x.contiguous(memory_format=cfg.memory_format)
    if cfg.params == "zeros":
        w, b = torch.zeros(cfg.c, dtype=cfg.dtype), torch.zeros(cfg.c, dtype=cfg.dtype)
    else:
        w, b = torch.randn(cfg.c).to(cfg.dtype), torch.randn(cfg.c).to(cfg.dtype)
    if requires_grad:
        for t in (x, w, b):
            t.requires_grad_(True)
    return x, w, b


def make_grad_output(cfg: GrnCfg) -> torch.Tensor:
    gy = torch.randn(cfg.n, cfg.c, cfg.h, cfg.w).to(cfg.dtype)
    return gy.contiguous(memory_format=cfg.memory_format)


SPECIAL_C = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 63, 64, 65, 127, 128, 129, 192]


@st.composite
def grn_configs(draw, dtypes=ALL_DTYPES, layouts=("nchw", "nhwc")):
    c = draw(st.one_of(st.integers(1, 200), st.sampled_from(SPECIAL_C)))
    size = draw(st.sampled_from(["tiny", "small", "small", "larger"]))
    if size == "tiny":
        h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    elif size == "small":
        h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    else:  # several pass-1 chunks per image, long NCHW runs with tails
        h, w = draw(st.integers(13, 40)), draw(st.integers(13, 40))
    n = draw(st.sampled_from([1, 2, 3, 1, 2, 0]))
    if size == "larger":
        n = min(n, max(1, 60000 // (c * h * w)))
    return GrnCfg(
        n=n, c=c, h=h, w=w, layout=draw(st.sampled_from(list(layouts))),
        dtype=draw(st.sampled_from(list(dtypes))),
        params=draw(st.sampled_from(["randn", "randn", "randn", "zeros"])),
        eps=draw(st.sampled_from([1e-6, 1e-6, 1e-5, 1e-3, 0.1])),
        offset=draw(st.sampled_from([0.0, 0.0, 2.5, -40.0])),
        scale=draw(st.sampled_from([1.0, 1.0, 0.01, 30.0, 0.0])),
    )


# --------------------------------------------------------------------------- oracle


def _f64(t):
    return t.detach().to(torch.float64)


def timm_formula(x, weight, bias, eps):
    """GlobalResponseNorm on an (N, C, H, W) tensor, written from the paper/timm formula."""
    g = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), keepdim=True)
    nx = g / (g.mean(dim=1, keepdim=True) + eps)
    return x + bias.view(1, -1, 1, 1) + weight.view(1, -1, 1, 1) * (x * nx)


def oracle(x, w, b, eps, gy=None):
    """float64 references and magnitudes: dict name -> (ref, mag). Keys: y, norm and,
    with gy, x, weight, bias (the gradients)."""
    with single_threaded_torch():
        x64, w64, b64 = _f64(x), _f64(w), _f64(b)
        C = x.shape[1]
        g = torch.linalg.vector_norm(x64, ord=2, dim=(2, 3), keepdim=True)
        d = g.mean(dim=1, keepdim=True) + eps
        nx = g / d
        wv, bv = w64.view(1, -1, 1, 1), b64.view(1, -1, 1, 1)
        xa = x64.abs()
        out = {
            "y": (timm_formula(x64, w64, b64, eps), xa + bv.abs() + wv.abs() * xa * nx),
            "norm": (g[:, :, 0, 0], g[:, :, 0, 0]),
        }
        if gy is None:
            return out
        leaves = [t.clone().requires_grad_(True) for t in (x64, w64, b64)]
        gy64 = _f64(gy)
        grads = torch.autograd.grad(timm_formula(*leaves, eps), leaves, gy64)
        gya = gy64.abs()
        dm = (gya * xa).sum(dim=(2, 3), keepdim=True)
        wdm = wv.abs() * dm
        inv = torch.where(g > 0, 1.0 / (d * g), torch.zeros_like(g))
        gx_mag = gya * (1 + wv.abs() * nx) + xa * inv * (wdm + (wdm * nx).mean(1, keepdim=True))
        out["x"] = (grads[0], gx_mag)
        out["weight"] = (grads[1], (nx * dm).sum(dim=(0, 2, 3)))
        out["bias"] = (grads[2], gya.sum(dim=(0, 2, 3)))
        assert C == w.shape[0]
        return out


def _lengths(cfg: GrnCfg):
    hw, c, n = cfg.hw, cfg.c, cfg.n
    return {"y": hw + c + 6, "norm": hw, "x": 3 * (hw + c) + 11,
            "weight": 2 * hw + c + n + 4, "bias": n * hw}


def check(results: dict, refs: dict, cfg: GrnCfg, prefix: str = "") -> None:
    """results: name -> tensor (names as in `oracle`)."""
    lens = _lengths(cfg)
    for key, got in results.items():
        ref, mag = refs[key]
        dtype = got.dtype if key == "norm" else cfg.dtype
        assert_within(prefix + key, got, ref, mag, dtype, lens[key], cfg.short())


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- forward


@sweep(100)
@given(cfg=grn_configs())
def test_forward_sweep(cfg):
    x, w, b = make_inputs(cfg)
    y = grn(x, w, b, eps=cfg.eps)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=cfg.memory_format), f"memory format lost; {cfg.short()}"
    y2, norm = torch.ops.fastvis.global_response_norm(x, w, b, cfg.eps)
    assert torch.equal(y, y2)
    assert norm.dtype == stats_dtype(cfg.dtype) and norm.shape == (cfg.n, cfg.c)
    check({"y": y, "norm": norm}, oracle(x, w, b, cfg.eps), cfg)


# --------------------------------------------------------------------------- backward


def autograd_grads(cfg: GrnCfg, fn=None):
    x, w, b = make_inputs(cfg, requires_grad=True)
    y = (fn or grn)(x, w, b, eps=cfg.eps)
    gy = make_grad_output(cfg)
    grads = dict(zip(("x", "weight", "bias"), torch.autograd.grad(y, (x, w, b), gy)))
    return grads, (x, w, b, gy)


@sweep(100)
@given(cfg=grn_configs())
def test_backward_sweep(cfg):
    grads, (x, w, b, gy) = autograd_grads(cfg)
    assert grads["x"].shape == x.shape
    assert grads["x"].is_contiguous(memory_format=cfg.memory_format)
    check(grads, oracle(x, w, b, cfg.eps, gy), cfg, prefix="grad_")


@sweep(25)
@given(cfg=grn_configs(dtypes=(torch.float32, torch.float64)))
def test_python_reference_sweep(cfg):
    """The pure-PyTorch reference (fastvis.use_reference()) meets the same bounds."""
    with fastvis.use_reference():
        grads, (x, w, b, gy) = autograd_grads(cfg)
        y = grn(x.detach(), w.detach(), b.detach(), eps=cfg.eps)
    assert y.is_contiguous(memory_format=cfg.memory_format)
    refs = oracle(x, w, b, cfg.eps, gy)
    check({"y": y}, refs, cfg, prefix="reference ")
    check(grads, refs, cfg, prefix="reference grad_")


# --------------------------------------------------------------------------- low level


def _nan_like(shape, cfg, fmt=None, dtype=None):
    t = torch.empty(shape, dtype=dtype or cfg.dtype)
    if fmt is not None:
        t = t.contiguous(memory_format=fmt)
    return t.fill_(float("nan"))


@sweep(50)
@given(cfg=grn_configs(), outs=st.sampled_from(["all", "x", "weight", "bias", "params"]),
       with_norm=st.booleans())
def test_lowlevel_fast_path_and_cpp_reference(cfg, outs, with_norm):
    """_C entry points (optional outputs left out) and the C++ scalar references, writing
    into NaN-filled outputs (every element must be written)."""
    x, w, b = make_inputs(cfg)
    gy = make_grad_output(cfg)
    refs = oracle(x, w, b, cfg.eps, gy)
    shape, fmt = tuple(x.shape), cfg.memory_format
    nshape, sdt = (cfg.n, cfg.c), stats_dtype(cfg.dtype)
    want = {"all": ("x", "weight", "bias"), "params": ("weight", "bias")}.get(outs, (outs,))
    for impl in ("fast", "reference"):
        y = _nan_like(shape, cfg, fmt)
        norm = _nan_like(nshape, cfg, dtype=sdt) if with_norm else None
        gx = _nan_like(shape, cfg, fmt) if "x" in want else None
        gw = _nan_like((cfg.c,), cfg) if "weight" in want else None
        gb = _nan_like((cfg.c,), cfg) if "bias" in want else None
        if impl == "fast":
            _C.global_response_norm_forward(x, w, b, cfg.eps, y, norm)
            saved = norm
            if saved is None:
                saved = _nan_like(nshape, cfg, dtype=sdt)
                _C.global_response_norm_forward(x, w, b, cfg.eps, _nan_like(shape, cfg, fmt), saved)
            _C.global_response_norm_backward(gy, x, w, saved, cfg.eps, gx, gw, gb)
        else:
            _C.global_response_norm_forward_reference(x, w, b, cfg.eps, y, norm)
            _C.global_response_norm_backward_reference(gy, x, w, cfg.eps, gx, gw, gb)
        got = {"y": y}
        for key, t in (("norm", norm), ("x", gx), ("weight", gw), ("bias", gb)):
            if t is not None:
                got[key] = t
        check(got, refs, cfg, prefix=f"_C {impl} ")


def test_cpp_reference_accepts_any_strides():
    cfg = GrnCfg(n=2, c=5, h=4, w=6, dtype=torch.float64)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64).permute(0, 2, 3, 1)  # dense in neither
    w, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    gy = torch.randn(2, 4, 6, 5, dtype=torch.float64).permute(0, 3, 1, 2)
    y = torch.empty(2, 5, 4, 6, dtype=torch.float64)
    gx = torch.empty(2, 5, 6, 4, dtype=torch.float64).transpose(2, 3)
    gw, gb = torch.empty(10, dtype=torch.float64)[::2], torch.empty(5, dtype=torch.float64)
    _C.global_response_norm_forward_reference(x, w, b, cfg.eps, y)
    _C.global_response_norm_backward_reference(gy, x, w, cfg.eps, gx, gw, gb)
    check({"y": y, "x": gx, "weight": gw, "bias": gb}, oracle(x, w, b, cfg.eps, gy), cfg)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 9, 3, 2), (2, 1, 3, 3), (3, 4, 1, 1)])
def test_gradcheck_float64(shape, layout):
    n, c, h, w = shape
    cfg = GrnCfg(n=n, c=c, h=h, w=w, layout=layout, dtype=torch.float64, eps=1e-5)
    x, wt, b = make_inputs(cfg, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, wt, b: grn(x, wt, b, eps=cfg.eps), (x, wt, b),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_convnextv2_sized_problem(layout):
    """ConvNeXt-V2-T stage 1 MLP: C=384 at 56x56 (64 pass-1 chunks in NHWC, the most
    there are; 12 in NCHW)."""
    cfg = GrnCfg(n=1, c=384, h=56, w=56, layout=layout)
    grads, (x, w, b, gy) = autograd_grads(cfg)
    refs = oracle(x, w, b, cfg.eps, gy)
    check(grads, refs, cfg, prefix="grad_")
    check({"y": grn(x.detach(), w.detach(), b.detach())}, refs, cfg)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("nhw", [(0, 4, 3), (2, 0, 3), (1, 4, 0)])
def test_empty_batch_or_image(nhw, layout):
    cfg = GrnCfg(n=nhw[0], c=5, h=nhw[1], w=nhw[2], layout=layout)
    x, w, b = make_inputs(cfg, requires_grad=True)
    y, norm = torch.ops.fastvis.global_response_norm(x, w, b, 1e-6)
    assert y.shape == x.shape
    assert torch.equal(norm, torch.zeros(cfg.n, 5)), "the norm of an empty image is 0"
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.empty_like(y))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros(5)) and torch.equal(gb, torch.zeros(5))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_zero_parameters_are_the_identity(layout, dtype):
    """timm initialises weight and bias to zero: the layer is then exactly the identity."""
    cfg = GrnCfg(n=2, c=33, h=7, w=9, layout=layout, dtype=dtype, params="zeros")
    x, w, b = make_inputs(cfg, requires_grad=True)
    y = grn(x, w, b)
    assert torch.equal(y, x.detach())
    gy = make_grad_output(cfg)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    assert torch.equal(gx, gy), "with weight = 0, grad_x is grad_y"
    check({"weight": gw, "bias": gb}, oracle(x, w, b, cfg.eps, gy), cfg, prefix="grad_")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_all_zero_channel(layout):
    """A channel with G = 0: Nx = 0 there, and its input gradient is grad_y (torch's norm
    has gradient 0 at 0, which the kernel follows)."""
    cfg = GrnCfg(n=2, c=12, h=5, w=6, layout=layout, dtype=torch.float64)
    x, w, b = make_inputs(cfg)
    x = x.clone()
    x[1, 4] = 0.0
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y, norm = torch.ops.fastvis.global_response_norm(x, w, b, 1e-6)
    assert norm[1, 4].item() == 0.0
    gy = make_grad_output(cfg)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    assert torch.equal(gx[1, 4], gy[1, 4])
    check({"y": y, "x": gx, "weight": gw, "bias": gb}, oracle(x, w, b, cfg.eps, gy), cfg)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_nan_in_x_propagates_to_its_image_only(layout):
    cfg = GrnCfg(n=2, c=12, h=5, w=6, layout=layout)
    x, w, b = make_inputs(cfg)
    x = x.clone()
    x[1, 3, 2, 4] = float("nan")
    y = grn(x, w, b)
    # The NaN enters G[1, 3], hence the mean over image 1's channels and all of its Nx.
    assert bool(torch.isnan(y[1]).all()), "image 1 must be all NaN"
    assert not bool(torch.isnan(y[0]).any()), "NaN leaked into image 0"
    refs = oracle(x[:1], w, b, cfg.eps)
    assert_within("y (image 0)", y[:1], refs["y"][0], refs["y"][1], cfg.dtype,
                  _lengths(cfg)["y"], cfg.short())


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_backward_from_sum_loss_broadcast_grad_output(layout):
    cfg = GrnCfg(n=2, c=10, h=5, w=7, layout=layout)
    x, w, b = make_inputs(cfg, requires_grad=True)
    grn(x, w, b).sum().backward()
    gy = torch.ones(cfg.n, cfg.c, cfg.h, cfg.w)
    check({"x": x.grad, "weight": w.grad, "bias": b.grad}, oracle(x, w, b, cfg.eps, gy), cfg)


def test_non_dense_input_and_grad_output():
    cfg = GrnCfg(n=2, c=6, h=7, w=5)
    base = torch.randn(2, 6, 5, 7, requires_grad=True)
    x = base.transpose(2, 3)  # non-dense logical NCHW: copied to contiguous
    w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    y = grn(x, w, b)
    gy = torch.randn(2, 6, 5, 7).transpose(2, 3)
    gbase, gw, gb = torch.autograd.grad(y, (base, w, b), gy)
    refs = oracle(x, w, b, cfg.eps, gy)
    check({"y": y, "x": gbase.transpose(2, 3), "weight": gw, "bias": gb}, refs, cfg)


@pytest.mark.parametrize("which", ["x", "weight", "bias", "weight+bias"])
def test_partial_requires_grad(which):
    cfg = GrnCfg(n=2, c=20, h=6, w=5)
    x, w, b = make_inputs(cfg)
    leaves = {"x": x, "weight": w, "bias": b}
    names = which.split("+")
    for name in names:
        leaves[name].requires_grad_(True)
    gy = make_grad_output(cfg)
    g = torch.autograd.grad(grn(x, w, b), [leaves[n] for n in names], gy)
    check(dict(zip(names, g)), oracle(x, w, b, cfg.eps, gy), cfg)


# --------------------------------------------------------------------------- determinism


def _all_grads(x, w, b, gy):
    xr, wr, br = (t.detach().requires_grad_(True) for t in (x, w, b))
    y, norm = torch.ops.fastvis.global_response_norm(xr, wr, br, 1e-6)
    return (y.detach(), norm) + torch.autograd.grad(y, (xr, wr, br), gy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("nhw", [(1, 48, 45), (3, 24, 22)])
def test_deterministic_and_thread_count_independent(nhw, layout, dtype):
    """Forward (norms) and all gradients: bit-identical run to run and for 1, 2, 3 threads
    (6 and 2 pass-1 chunks per image in both layouts, see grn::reduction_chunks)."""
    cfg = GrnCfg(n=nhw[0], c=40, h=nhw[1], w=nhw[2], layout=layout, dtype=dtype)
    x, w, b = make_inputs(cfg)
    gy = make_grad_output(cfg)
    names = ("y", "norm", "grad_x", "grad_weight", "grad_bias")
    old = fastvis.get_num_threads()
    try:
        fastvis.set_num_threads(2)
        runs = [_all_grads(x, w, b, gy) for _ in range(3)]
        others = {}
        for t in (1, 3):
            fastvis.set_num_threads(t)
            others[t] = _all_grads(x, w, b, gy)
    finally:
        fastvis.set_num_threads(0)  # back to following torch
    assert fastvis.get_num_threads() == old
    for i, run in enumerate(runs[1:], 1):
        for name, a, c in zip(names, run, runs[0]):
            assert torch.equal(a, c), f"{name} differs between run 0 and run {i}"
    for t, run in others.items():
        for name, a, c in zip(names, run, runs[0]):
            assert torch.equal(a, c), (
                f"{name} with {t} threads != with 2 threads "
                f"(max |diff| {(a.double() - c.double()).abs().max().item():.3g})")
    check(dict(zip(("y", "norm", "x", "weight", "bias"), runs[0])),
          oracle(x, w, b, cfg.eps, gy), cfg)


# --------------------------------------------------------------------------- torch.compile


class _Block(nn.Module):
    """The module on an (N, H, W, C) tensor (as in ConvNeXt-V2's MLP), a pointwise op,
    and the functional op on the permuted (channels_last) view."""

    def __init__(self, c):
        super().__init__()
        self.grn = fastvis.nn.GlobalResponseNorm(c, channels_last=True)
        self.weight2 = nn.Parameter(torch.randn(c))
        self.bias2 = nn.Parameter(torch.randn(c))
        with torch.no_grad():
            self.grn.weight.normal_()
            self.grn.bias.normal_()

    def forward(self, x):
        y = F.gelu(self.grn(x)) + x
        z = fastvis.ops.global_response_norm((y * 2.0).permute(0, 3, 1, 2), self.weight2,
                                             self.bias2, eps=1e-5)
        return z.permute(0, 2, 3, 1)


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
    x = torch.randn(2, 6, 7, 12)  # (N, H, W, C)
    y_e, g_e = _run(model, x)
    compiled = torch.compile(model, fullgraph=True)
    y_c, g_c = _run(compiled, x)
    y_c2, g_c2 = _run(compiled, x)
    assert y_c.is_contiguous()
    names = ["x"] + [n for n, _ in model.named_parameters()]
    # Same kernels; only the fused pointwise ops may round differently (a few float32 ulps).
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(names, g_c, g_e):
        assert a is not None, f"compiled graph produced no gradient for {name}"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
    assert torch.equal(y_c, y_c2) and all(torch.equal(a, b) for a, b in zip(g_c, g_c2))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fake_kernel_matches_real(layout, dtype):
    cfg = GrnCfg(n=2, c=6, h=5, w=7, layout=layout, dtype=dtype)
    x, w, b = make_inputs(cfg)
    gy = make_grad_output(cfg)
    real = torch.ops.fastvis.global_response_norm(x, w, b, 1e-6, 0)
    real_b = torch.ops.fastvis.global_response_norm_backward(gy, x, w, real[1], 1e-6,
                                                             True, True, False, 0)
    with FakeTensorMode() as mode:
        fx, fw, fb, fgy = (mode.from_tensor(t) for t in (x, w, b, gy))
        fake = torch.ops.fastvis.global_response_norm(fx, fw, fb, 1e-6, 0)
        fake_b = torch.ops.fastvis.global_response_norm_backward(
            fgy, fx, fw, mode.from_tensor(real[1]), 1e-6, True, True, False, 0)
    for r, f in zip(real + real_b, fake + fake_b):
        assert tuple(f.shape) == tuple(r.shape) and f.dtype == r.dtype
        assert f.stride() == r.stride(), f"fake strides {f.stride()} != real {r.stride()}"


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_opcheck_custom_ops(layout):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(2, 5, 4, 3).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    op = torch.ops.fastvis.global_response_norm.default
    torch.library.opcheck(op, (x, w, b, 1e-6))
    torch.library.opcheck(op, (x, w.detach(), b, 1e-3))
    _, norm = op(x.detach(), w.detach(), b.detach(), 1e-6)
    gy = torch.randn(2, 5, 4, 3).contiguous(memory_format=fmt)
    bwd = torch.ops.fastvis.global_response_norm_backward.default
    torch.library.opcheck(bwd, (gy, x.detach(), w.detach(), norm, 1e-6, True, True, True))
    torch.library.opcheck(bwd, (gy, x.detach(), w.detach(), norm, 1e-6, False, True, False))


# --------------------------------------------------------------------------- errors


def _x(dtype=torch.float32, c=4):
    return torch.randn(2, c, 5, 5).to(dtype)


def _p(dtype=torch.float32, c=4):
    return torch.randn(c).to(dtype), torch.randn(c).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_input_is_type_error(dtype):
    x = torch.ones(1, 4, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=r"(?i)backend supports"):
        grn(x, *_p())


def test_float16_on_cpu_is_type_error():
    with pytest.raises(TypeError, match=r"(?i)float16 is CUDA-only"):
        grn(_x(torch.float16), *_p(torch.float16))


@pytest.mark.parametrize("xd,pd,which", [
    (torch.float32, torch.float64, "weight"), (torch.float64, torch.float32, "weight"),
    (torch.bfloat16, torch.float32, "bias"), (torch.float32, torch.bfloat16, "bias")])
def test_mixed_dtypes_are_type_errors(xd, pd, which):
    x = _x(xd)
    w, b = _p(xd)
    args = {"weight": w, "bias": b}
    args[which] = args[which].to(pd)
    with pytest.raises(TypeError, match=rf"{which}: expected dtype"):
        grn(x, **args)


@pytest.mark.parametrize("shape", [(5,), (4, 1), (1, 4), (3,), (), (1, 4, 1, 1)])
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_wrong_parameter_shape_is_value_error(shape, which):
    args = dict(zip(("weight", "bias"), _p()))
    args[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"{which}: expected shape \(4,\)"):
        grn(_x(), **args)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_missing_parameter_is_type_error(which):
    args = dict(zip(("weight", "bias"), _p()))
    args[which] = None
    with pytest.raises(TypeError, match=rf"{which}: expected a torch.Tensor"):
        grn(_x(), **args)


@pytest.mark.parametrize("shape", [(2, 4, 5), (4, 5), (1, 2, 4, 5, 5)])
def test_not_4d_is_value_error(shape):
    with pytest.raises(ValueError, match=r"4-D \(N, C, H, W\)"):
        grn(torch.randn(shape), *_p())


def test_zero_channels_is_value_error():
    with pytest.raises(ValueError, match=r"at least one channel"):
        grn(torch.randn(2, 0, 3, 3), torch.randn(0), torch.randn(0))
    with pytest.raises(ValueError, match=r"at least one channel"):
        _C.global_response_norm_forward(torch.randn(2, 0, 3, 3), torch.randn(0), torch.randn(0),
                                        1e-6, torch.empty(2, 0, 3, 3))


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf"), -float("inf")])
def test_bad_eps_is_value_error(eps):
    with pytest.raises(ValueError, match=r"eps: expected a positive finite number"):
        grn(_x(), *_p(), eps=eps)
    with pytest.raises(ValueError, match=r"^eps: expected a positive finite number"):
        _C.global_response_norm_forward(_x(), *_p(), eps, torch.empty(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"^eps: expected a positive finite number"):
        _C.global_response_norm_backward(_x(), _x(), _p()[0], torch.zeros(2, 4), eps, None,
                                         torch.empty(4), None)


@pytest.mark.parametrize("eps", [True, "1e-6", None, torch.tensor(1e-6)])
def test_eps_of_wrong_type_is_type_error(eps):
    with pytest.raises(TypeError, match=r"eps"):
        grn(_x(), *_p(), eps=eps)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_mixed_devices_is_value_error(which):
    args = dict(zip(("weight", "bias"), _p()))
    args[which] = torch.randn(4, device="meta")
    with pytest.raises(ValueError, match=rf"{which} is on meta but x is on cpu"):
        grn(_x(), **args)


@pytest.mark.parametrize("case", ["dtype", "f16", "shape", "eps", "dim", "none"])
def test_reference_mode_validates_like_fast_path(case):
    w, b = _p()
    args = {"dtype": ((_x(), w.double(), b), {}, TypeError),
            "f16": ((_x(torch.float16), w.half(), b.half()), {}, TypeError),
            "shape": ((_x(), torch.randn(3), b), {}, ValueError),
            "eps": ((_x(), w, b), {"eps": 0.0}, ValueError),
            "dim": ((torch.randn(4, 5, 5), w, b), {}, ValueError),
            "none": ((_x(), w, None), {}, TypeError)}[case]
    for mode in (False, True):
        with fastvis.use_reference(mode), pytest.raises(args[2]):
            grn(*args[0], **args[1])


def test_lowlevel_errors_name_the_argument():
    x = _x()
    w, b = _p()
    y = torch.empty(2, 4, 5, 5)
    fwd, bwd = _C.global_response_norm_forward, _C.global_response_norm_backward
    with pytest.raises(ValueError, match=r"^y: expected shape \[2, 4, 5, 5\]"):
        fwd(x, w, b, 1e-6, torch.empty(2, 4, 5, 4))
    with pytest.raises(TypeError, match=r"^y: expected dtype float32"):
        fwd(x, w, b, 1e-6, y.double())
    with pytest.raises(ValueError, match=r"one memory layout"):
        fwd(x, w, b, 1e-6, y.contiguous(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match=r"^weight: expected shape \[4\]"):
        fwd(x, torch.randn(5), b, 1e-6, y)
    with pytest.raises(TypeError, match=r"^bias: expected dtype float32"):
        fwd(x, w, b.double(), 1e-6, y)
    with pytest.raises(TypeError, match=r"^norm: expected dtype float32"):
        fwd(x, w, b, 1e-6, y, torch.empty(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^norm: expected dtype float64 for float64"):
        fwd(x.double(), w.double(), b.double(), 1e-6, y.double(), torch.empty(2, 4))
    with pytest.raises(ValueError, match=r"^norm: expected shape \[2, 4\]"):
        fwd(x, w, b, 1e-6, y, torch.empty(2, 4, 1))
    with pytest.raises(ValueError, match=r"^norm: must be contiguous"):
        fwd(x, w, b, 1e-6, y, torch.empty(4, 2).t())
    with pytest.raises(ValueError, match=r"scratch"):
        fwd(x, w, b, 1e-6, y, None, torch.empty(8, dtype=torch.uint8))
    norm = torch.empty(2, 4)
    fwd(x, w, b, 1e-6, y, norm)
    with pytest.raises(ValueError, match=r"^grad_weight: expected shape \[4\]"):
        bwd(y, x, w, norm, 1e-6, None, torch.empty(5), None)
    with pytest.raises(ValueError, match=r"^grad_y: expected shape"):
        bwd(y[:1], x, w, norm, 1e-6, None, None, None)
    with pytest.raises(TypeError, match=r"^grad_x: expected dtype float32"):
        bwd(y, x, w, norm, 1e-6, y.double(), None, None)
    with pytest.raises(TypeError, match=r"^norm: expected dtype float32"):
        bwd(y, x, w, norm.double(), 1e-6, None, None, None)
    with pytest.raises(ValueError, match=r"^norm: expected shape \[2, 4\]"):
        bwd(y, x, w, norm[:1], 1e-6, None, None, None)
    with pytest.raises(ValueError, match=r"scratch"):
        bwd(y, x, w, norm, 1e-6, y.clone(), None, None, torch.empty(8, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"float16 is CUDA-only"):
        fwd(x.half(), w.half(), b.half(), 1e-6, y.half())
    with pytest.raises(ValueError, match=r"^x: expected a 4-D"):
        fwd(x[0], w, b, 1e-6, y[0])


def test_error_then_success_leaves_no_state():
    with pytest.raises(ValueError):
        grn(_x(), *_p(), eps=-1.0)
    cfg = GrnCfg(n=2, c=4, h=5, w=5, layout="nchw")
    x, w, b = make_inputs(cfg)
    check({"y": grn(x, w, b)}, oracle(x, w, b, cfg.eps), cfg)


# --------------------------------------------------------------------------- nn module


class _TimmStyleGRN(nn.Module):
    """timm.layers.GlobalResponseNorm's semantics, written here (timm is not a
    dependency): channels_last=True means an (N, H, W, C) tensor. param_shape "vector"
    stores the parameters as (C,) (older timm), "broadcast" as 4-D (newer timm)."""

    def __init__(self, dim, eps=1e-6, channels_last=True, param_shape="vector"):
        super().__init__()
        self.eps = eps
        self.spatial = (1, 2) if channels_last else (2, 3)
        self.channel = 3 if channels_last else 1
        self.view = (1, 1, 1, dim) if channels_last else (1, dim, 1, 1)
        shape = (dim,) if param_shape == "vector" else self.view
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=self.spatial, keepdim=True)
        nx = g / (g.mean(dim=self.channel, keepdim=True) + self.eps)
        return self.bias.view(self.view) + (self.weight.view(self.view) * nx + 1) * x


@pytest.mark.parametrize("param_shape", ["vector", "broadcast"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_matches_timm_formula_and_loads_its_state_dict(channels_last, param_shape):
    c = 24
    ref = _TimmStyleGRN(c, channels_last=channels_last, param_shape=param_shape)
    ours = fastvis.nn.GlobalResponseNorm(c, channels_last=channels_last)
    assert ours.eps == 1e-6 and ours.channels_last == channels_last
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert torch.equal(ours.weight, torch.zeros(c)) and torch.equal(ours.bias, torch.zeros(c))
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    assert ours.weight.shape == (c,)
    assert torch.equal(ours.weight, ref.weight.detach().reshape(c))
    assert torch.equal(ours.bias, ref.bias.detach().reshape(c))
    layouts = ("nhwc",) if channels_last else ("nchw", "nhwc")
    for layout in layouts:
        cfg = GrnCfg(n=2, c=c, h=6, w=5, layout=layout)
        x, _, _ = make_inputs(cfg)  # logical (N, C, H, W)
        xin = x.permute(0, 2, 3, 1).contiguous() if channels_last else x
        xin = xin.detach().requires_grad_(True)
        y = ours(xin)
        assert y.shape == xin.shape
        if channels_last:
            assert y.is_contiguous(), "an (N, H, W, C) input must give a contiguous (N, H, W, C) output"
        else:
            assert y.is_contiguous(memory_format=cfg.memory_format)
        gy_in = torch.randn(xin.shape)
        gx, gw, gb = torch.autograd.grad(y, (xin, ours.weight, ours.bias), gy_in)
        to_nchw = (lambda t: t.permute(0, 3, 1, 2)) if channels_last else (lambda t: t)
        refs = oracle(to_nchw(xin), ours.weight, ours.bias, ours.eps, to_nchw(gy_in))
        check({"y": to_nchw(y), "x": to_nchw(gx), "weight": gw, "bias": gb}, refs, cfg)
        torch.testing.assert_close(y, ref(xin))


def test_module_channels_last_is_zero_copy(monkeypatch):
    """An (N, H, W, C) input reaches the core as the same memory (a permuted view)."""
    seen = []
    real = _C.global_response_norm_forward

    def spy(x, *args):
        if not isinstance(x, torch.Tensor):  # the op passes DLPack capsules
            x = torch.utils.dlpack.from_dlpack(x)
        seen.append(x.data_ptr())
        return real(x, *args)

    monkeypatch.setattr(_C, "global_response_norm_forward", spy)
    m = fastvis.nn.GlobalResponseNorm(16, channels_last=True)
    x = torch.randn(2, 5, 7, 16)
    m(x)
    assert seen == [x.data_ptr()]


def test_module_custom_eps_and_bad_arguments():
    m = fastvis.nn.GlobalResponseNorm(8, eps=1e-3, channels_last=False)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(1, 8, 3, 3) * 0.01
    cfg = GrnCfg(n=1, c=8, h=3, w=3, eps=1e-3, layout="nchw")
    check({"y": m(x)}, oracle(x, m.weight, m.bias, 1e-3), cfg)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="dim"):
            fastvis.nn.GlobalResponseNorm(bad)
    with pytest.raises(ValueError, match=r"weight: expected shape \(7,\)"):
        m(torch.randn(1, 7, 3, 3))
    nhwc = fastvis.nn.GlobalResponseNorm(8, channels_last=True)
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\)"):
        nhwc(torch.randn(1, 8, 5, 3))  # an NCHW tensor given to an NHWC module
    with pytest.raises(ValueError, match=r"4-D \(N, H, W, C\)"):
        nhwc(torch.randn(5, 8))


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
                for (n, c, h, w) in [(2, 37, 9, 11), (1, 8, 40, 37), (3, 3, 2, 5)]:
                    x = torch.randn(n, c, h, w).to(dt).contiguous(memory_format=fmt)
                    wt, b = torch.randn(c).to(dt), torch.randn(c).to(dt)
                    gy = torch.randn(n, c, h, w).to(dt).contiguous(memory_format=fmt)
                    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, wt, b))
                    y = fastvis.ops.global_response_norm(xr, wr, br)
                    g = torch.autograd.grad(y, (xr, wr, br), gy)
                    res.append((x, wt, b, gy, y.detach(), g))
        torch.save(res, {str(out)!r})
    """)
    env = dict(os.environ, FASTVIS_CPU_ISA="generic")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = torch.load(out)
    assert len(results) == 18
    for x, w, b, gy, y, (gx, gw, gb) in results:
        n, c, h, wd = x.shape
        cfg = GrnCfg(n=n, c=c, h=h, w=wd, dtype=x.dtype,
                     layout="nhwc" if x.is_contiguous(memory_format=torch.channels_last) and c > 1
                     else "nchw")
        check({"y": y, "x": gx, "weight": gw, "bias": gb}, oracle(x, w, b, 1e-6, gy), cfg,
              prefix="generic ")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_fall_back_to_reference_with_one_warning():
    x = torch.randn(2, 8, 4, 4, device="cuda")
    w, b = torch.randn(8, device="cuda"), torch.randn(8, device="cuda")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = grn(x, w, b)
        y2 = grn(x, w, b)
    assert sum("global_response_norm" in str(r.message) for r in rec) == 1
    torch.testing.assert_close(y1, fastvis.ops.global_response_norm_reference(x, w, b))
    assert torch.equal(y1, y2)
