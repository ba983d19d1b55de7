"""The GRN family's fused GELU prologue: ``global_response_norm(x, ..., activation="gelu")``
computes grn(gelu(x)) and its gradient with respect to x without storing gelu(x), and
``_C.global_response_norm_apply`` runs the second pass alone from stored norms.

Oracle: float64 ``F.gelu`` followed by the GRN formula (test_grn.timm_formula), and
torch.autograd through both, on exactly the values the kernel saw. Bounds: the float32
kernels evaluate GELU with an erfc approximation (absolute error of Phi below 1.5e-7) and
an own exp, so gelu(x) carries an absolute error up to ~2e-7 |x|, which GRN's per-image
norms then spread over the image (an error of a norm G moves every Nx of that image). The
check is therefore against each tensor's largest magnitude, not per element:
max |got - ref| <= tol * max(mag), with mag the GRN magnitudes of test_grn.oracle evaluated
with |x| in place of |gelu(x)| (|gelu(x)| <= |x|); tol = 2e-5 for float32 (~100x the GELU
error), 1e-10 for float64 (C library erfc / tanh), 2^-7 for bfloat16 (its rounding of x,
the output and the gradients). A wrong formula is off by O(1) of the magnitude. The
derivative itself is checked exactly by float64 gradcheck.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastvis
import fastvis.ops
from conftest import single_threaded_torch, sweep
from test_grn import GrnCfg, make_grad_output, make_inputs, timm_formula

_C = fastvis._C
grn = fastvis.ops.global_response_norm
ACTS = {"gelu": ("none", 1), "gelu_tanh": ("tanh", 2)}
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2.0 ** -7}


def act_oracle(x, w, b, eps, activation, gy):
    """float64 references and magnitudes: name -> (ref, mag) for y, norm, x, weight, bias."""
    approx = ACTS[activation][0]
    with single_threaded_torch():
        x64, w64, b64, gy64 = (t.detach().to(torch.float64) for t in (x, w, b, gy))
        leaves = [t.clone().requires_grad_(True) for t in (x64, w64, b64)]
        g = F.gelu(leaves[0], approximate=approx)
        y = timm_formula(g, leaves[1], leaves[2], eps)
        grads = torch.autograd.grad(y, leaves, gy64)
        g = g.detach()
        gnorm = torch.linalg.vector_norm(g, ord=2, dim=(2, 3), keepdim=True)
        d = gnorm.mean(dim=1, keepdim=True) + eps
        nx = gnorm / d
        xa, gya = x64.abs(), gy64.abs()
        wv, bv = w64.abs().view(1, -1, 1, 1), b64.abs().view(1, -1, 1, 1)
        xn = torch.linalg.vector_norm(x64, ord=2, dim=(2, 3), keepdim=True)
        dm = (gya * xa).sum(dim=(2, 3), keepdim=True)
        inv = torch.where(gnorm > 0, 1.0 / (d * gnorm), torch.zeros_like(gnorm))
        gx_mag = (gya * (1 + wv * nx) + xa * inv * (wv * dm + (wv * dm * nx).mean(1, keepdim=True))
                  + gya * wv * (xn + nx * xn.mean(1, keepdim=True)) / d)
        return {
            "y": (y.detach(), xa * (1 + wv * nx) + bv + xa * wv * (xn + nx * xn.mean(1, keepdim=True)) / d),
            "norm": (gnorm[:, :, 0, 0], xn[:, :, 0, 0]),
            "x": (grads[0], gx_mag),
            "weight": (grads[1], (nx * dm).sum(dim=(0, 2, 3)) + (dm * xn / d).sum(dim=(0, 2, 3))),
            "bias": (grads[2], gya.sum(dim=(0, 2, 3))),
        }


def check(results, refs, dtype, context):
    tol = TOL[dtype]
    for key, got in results.items():
        ref, mag = refs[key]
        assert tuple(got.shape) == tuple(ref.shape), (key, context)
        if ref.numel() == 0:
            continue
        err = (got.detach().to(torch.float64) - ref).abs().max().item()
        bound = tol * mag.max().item()
        assert err <= bound, f"{key}: max |diff| {err:.3g} > {bound:.3g} (tol {tol:g} x max magnitude); {context}"


@st.composite
def configs(draw):
    c = draw(st.one_of(st.integers(1, 70), st.sampled_from([7, 8, 9, 16, 17, 33, 64, 128])))
    h, w = draw(st.integers(1, 14)), draw(st.integers(1, 14))
    return GrnCfg(
        n=draw(st.sampled_from([1, 2, 3, 0])), c=c, h=h, w=w,
        layout=draw(st.sampled_from(["nchw", "nhwc"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16])),
        params=draw(st.sampled_from(["randn", "randn", "zeros"])),
        eps=draw(st.sampled_from([1e-6, 1e-3])),
        offset=draw(st.sampled_from([0.0, 0.0, 1.0, -1.5, -6.0])),
        scale=draw(st.sampled_from([1.0, 1.0, 3.0, 0.1])),
    ), draw(st.sampled_from(sorted(ACTS)))


@sweep(80)
@given(case=configs())
def test_forward_backward_sweep(case):
    cfg, activation = case
    x, w, b = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg)
    y = grn(x, w, b, eps=cfg.eps, activation=activation)
    assert y.dtype == cfg.dtype and y.is_contiguous(memory_format=cfg.memory_format)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    assert gx.is_contiguous(memory_format=cfg.memory_format)
    _, norm = torch.ops.fastvis.global_response_norm(x.detach(), w.detach(), b.detach(), cfg.eps,
                                                     ACTS[activation][1])
    refs = act_oracle(x, w, b, cfg.eps, activation, gy)
    context = f"{cfg.short()} activation={activation}"
    check({"y": y, "x": gx, "weight": gw, "bias": gb}, refs, cfg.dtype, context)
    check({"norm": norm}, refs, torch.float64 if cfg.dtype == torch.float64 else torch.float32, context)


@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gradcheck_float64(activation, layout):
    cfg = GrnCfg(n=2, c=5, h=3, w=4, layout=layout, dtype=torch.float64, eps=1e-5)
    x, w, b = make_inputs(cfg, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: grn(x, w, b, eps=cfg.eps, activation=activation),
                                    (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", [0, 1, 2])
def test_apply_from_stored_norms_equals_forward(act, layout, dtype):
    """Pass 2 alone from the forward's norms gives the forward's output bit for bit."""
    cfg = GrnCfg(n=2, c=19, h=9, w=7, layout=layout, dtype=dtype)
    x, w, b = make_inputs(cfg)
    y, norm = torch.ops.fastvis.global_response_norm(x, w, b, 1e-6, act)
    y2 = torch.full_like(y, float("nan"))
    _C.global_response_norm_apply(x, w, b, 1e-6, norm, y2, None, act)
    assert torch.equal(y, y2)


def test_no_activation_is_unchanged():
    cfg = GrnCfg(n=2, c=12, h=5, w=6)
    x, w, b = make_inputs(cfg)
    assert torch.equal(grn(x, w, b), grn(x, w, b, activation=None))
    assert not torch.equal(grn(x, w, b), grn(x, w, b, activation="gelu"))


def test_reference_mode_and_torch_compile():
    cfg = GrnCfg(n=2, c=12, h=5, w=6)
    x, w, b = make_inputs(cfg)
    y = grn(x, w, b, activation="gelu")
    with fastvis.use_reference():
        yr = grn(x, w, b, activation="gelu")
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    f = torch.compile(lambda x, w, b: grn(x, w, b, activation="gelu_tanh"), fullgraph=True)
    xr = x.clone().requires_grad_(True)
    yc = f(xr, w, b)
    (gc,) = torch.autograd.grad(yc.square().sum(), xr)
    xe = x.clone().requires_grad_(True)
    ye = grn(xe, w, b, activation="gelu_tanh")
    (ge,) = torch.autograd.grad(ye.square().sum(), xe)
    assert torch.equal(yc, ye) and torch.equal(gc, ge)


def test_opcheck_with_activation():
    x = torch.randn(2, 5, 4, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    op = torch.ops.fastvis.global_response_norm.default
    torch.library.opcheck(op, (x, w, b, 1e-6, 1))
    _, norm = op(x.detach(), w.detach(), b.detach(), 1e-6, 2)
    bwd = torch.ops.fastvis.global_response_norm_backward.default
    torch.library.opcheck(bwd, (torch.randn_like(x), x.detach(), w.detach(), norm, 1e-6, True, True, True, 2))


def test_bad_activation_is_refused():
    x, w, b = torch.randn(1, 3, 2, 2), torch.randn(3), torch.randn(3)
    for bad in ("relu", "GELU", 1, True):
        with pytest.raises(ValueError, match="activation"):
            grn(x, w, b, activation=bad)
    y, norm = torch.empty_like(x), torch.empty(1, 3)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="activation"):
            _C.global_response_norm_forward(x, w, b, 1e-6, y, norm, None, bad)
    with pytest.raises(ValueError, match="norm"):
        _C.global_response_norm_apply(x, w, b, 1e-6, torch.empty(2, 3), y, None, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", [0, 1, 2])
def test_backward_recomputes_the_forward_output(act, layout, dtype):
    """The backward's optional y: the forward output written in its reduction pass, bit
    for bit what global_response_norm_apply gives, with the gradients unchanged."""
    cfg = GrnCfg(n=3, c=21, h=6, w=5, layout=layout, dtype=dtype)
    x, w, b = make_inputs(cfg)
    gy = make_grad_output(cfg)
    y, norm = torch.ops.fastvis.global_response_norm(x, w, b, 1e-6, act)
    y_apply = torch.full_like(y, float("nan"))
    _C.global_response_norm_apply(x, w, b, 1e-6, norm, y_apply, None, act)
    grads = [torch.full_like(x, float("nan")), torch.empty(21, dtype=dtype), torch.empty(21, dtype=dtype)]
    _C.global_response_norm_backward(gy, x, w, norm, 1e-6, *grads, None, act)
    grads_y = [torch.full_like(t, float("nan")) for t in grads]
    y_bwd = torch.full_like(y, float("nan"))
    _C.global_response_norm_backward(gy, x, w, norm, 1e-6, *grads_y, None, act, b, y_bwd)
    assert torch.equal(y_bwd, y_apply)
    assert all(torch.equal(p, q) for p, q in zip(grads, grads_y))
    with pytest.raises(ValueError, match="bias"):
        _C.global_response_norm_backward(gy, x, w, norm, 1e-6, None, None, None, None, act, None, y_bwd)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("activation", sorted(ACTS))
def test_nan_stays_in_its_image(activation, layout):
    """A NaN in one image poisons that image (its norms, then every value) and nothing else:
    the other image's output and gradients are what the image gives alone, and the NaN
    pattern is the reference's."""
    cfg = GrnCfg(n=2, c=16, h=5, w=6, layout=layout)
    x, w, b = make_inputs(cfg)
    x = x.clone()
    x[0, 3, 2, 4] = float("nan")
    xg = x.detach().requires_grad_(True)
    y = grn(xg, w, b, activation=activation)
    (gx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    with fastvis.use_reference(True):
        xr = x.detach().requires_grad_(True)
        yr = grn(xr, w, b, activation=activation)
        (gxr,) = torch.autograd.grad(yr, xr, torch.ones_like(yr))
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
    assert torch.equal(torch.isnan(gx), torch.isnan(gxr)) and torch.isfinite(gx[1]).all()
    x1 = x[1:].detach().contiguous(memory_format=cfg.memory_format).requires_grad_(True)
    y1 = grn(x1, w, b, activation=activation)
    (g1,) = torch.autograd.grad(y1, x1, torch.ones_like(y1))
    assert torch.equal(y[1:], y1) and torch.equal(gx[1:], g1)


@pytest.mark.parametrize("activation", sorted(ACTS))
def test_gelu_accuracy_on_a_dense_grid(activation):
    """GELU itself, on 2 million points of [-10, 10] (with weight = bias = 0 GRN returns
    gelu(x) unchanged): every value within 3e-7 |x| of float64 GELU. The exact form
    evaluates erf(x / sqrt 2) by a rational approximation (core/gelu.h; measured 2.1e-7
    |x| at most), the tanh form by the own exp (1.9e-7 |x|); torch's float32 GELU is
    within 3.7e-7 |x| of float64 here. A wrong coefficient or clamp shows up at 1e-5 or
    more."""
    c = 16
    special = torch.tensor([0.0, 5.5437, -5.5437, 5.6, -5.6], dtype=torch.float64)  # zero, the clamp
    x = torch.cat([torch.linspace(-10.0, 10.0, 2_000_000 - special.numel(), dtype=torch.float64), special])
    assert x.numel() % c == 0
    x = x.float()
    xv = x.view(1, -1, 1, c)  # NHWC: C = 16 channels of whole vectors on every ISA
    z = torch.zeros(c)
    y = grn(xv.permute(0, 3, 1, 2), z, z, activation=activation).permute(0, 2, 3, 1).reshape(-1)
    ref = F.gelu(x.double(), approximate=ACTS[activation][0])
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all()
    assert (err <= 3e-7 * x.double().abs()).all(), float((err / x.double().abs().clamp_min(1e-30)).max())
