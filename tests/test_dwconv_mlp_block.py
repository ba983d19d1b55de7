"""The inference forms of the fused depthwise-conv + MLP block: fastvis.ops.dwconv_mlp_block.

    y = x + drop_scale[n] * gamma * fc2(GRN?(GELU(fc1(SE?(LayerNorm?(dwconv(x)))))))

The forms convnext_block cannot train: no LayerNorm (an eval BatchNorm folded into the
depthwise conv) and the SE step (UniRepLKNet's block in eval/deploy form). Results are
compared with a float64 oracle written here from plain torch ops, on exactly the values
the kernel saw (inputs drawn in float32 and rounded once to the test dtype).

Tolerances: |got - ref| <= rtol * mag (+ bf16 rounding). `mag` propagates absolute values
through every linear map (conv on |x|, |w|; |W1|, |W2|; GELU by its max slope 1.13; the SE
scale by its upper bound 1; GRN's factor by 1 + |w| Nx with Nx the oracle's; LayerNorm, when
present, by |x_hat| + r (m1 + mean m1), as test_convnext_block derives). rtol = 4 sqrt(L) u
(Higham & Mary, lambda = 4) with L = k*k + 3C + 2 hidden + H*W + Cr + 16: the conv taps,
the LayerNorm and fc1 reductions over C, fc2 and GRN over hidden, the SE and GRN spatial
means over H*W, the SE MLP, and the pointwise steps and exp/erf approximations; u = 2^-24
(float32; bfloat16 computes in float32) or 2^-53 floored at 1e-12 (float64). bfloat16 adds
one rounding of the output, 2 * 2^-8 |ref|.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastvis
from conftest import single_threaded_torch, sweep

op = fastvis.ops.dwconv_mlp_block


def _make(N, C, H, W, k, hidden, dtype, *, ln, se, grn, gamma=True, drop=False, nchw=False):
    def r(*s, scale=1.0):
        return (torch.randn(*s) * scale).to(dtype)
    x = r(N, C, H, W)
    if not nchw:
        x = x.contiguous(memory_format=torch.channels_last)
    cr = max(1, C // 4)
    p = dict(dw_weight=r(C, 1, k, k, scale=1.0 / k), dw_bias=r(C), fc1_weight=r(hidden, C, scale=C ** -0.5),
             fc1_bias=r(hidden), fc2_weight=r(C, hidden, scale=hidden ** -0.5), fc2_bias=r(C))
    kw = dict(layer_norm=ln)
    if ln:
        kw.update(norm_weight=(1 + 0.3 * torch.randn(C)).to(dtype), norm_bias=r(C, scale=0.3))
    if se:
        kw.update(se_down_weight=r(cr, C, scale=C ** -0.5), se_down_bias=r(cr, scale=0.3),
                  se_up_weight=r(C, cr, scale=cr ** -0.5), se_up_bias=r(C, scale=0.3))
    if grn:
        kw.update(grn_weight=r(hidden, scale=0.5), grn_bias=r(hidden, scale=0.3) if grn == "bias" else None)
    if gamma:
        kw["gamma"] = r(C)
    if drop:
        kw["drop_scale"] = torch.tensor([0.0, 1.25, 2.0, 1.0] * N)[:N].to(dtype)
    return x, p, kw


def _oracle(x, p, kw, eps=1e-6, approximate="none"):
    """float64 oracle and the magnitude bound `mag` (see the module docstring)."""
    d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in {**p, **kw}.items()}
    x = x.double()
    C, k = x.shape[1], d["dw_weight"].shape[-1]
    t = F.conv2d(x, d["dw_weight"], d["dw_bias"], padding=k // 2, groups=C).permute(0, 2, 3, 1)
    m = F.conv2d(x.abs(), d["dw_weight"].abs(), d["dw_bias"].abs(), padding=k // 2, groups=C).permute(0, 2, 3, 1)
    if d["layer_norm"]:
        mu = t.mean(-1, keepdim=True)
        rs = 1.0 / torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + eps)
        xh = (t - mu) * rs
        a = xh.abs() + rs * (m + m.mean(-1, keepdim=True))
        nw, nb = d.get("norm_weight"), d.get("norm_bias")
        t = xh * (nw if nw is not None else 1) + (nb if nb is not None else 0)
        m = a * (nw.abs() if nw is not None else 1) + (nb.abs() if nb is not None else 0)
    if d.get("se_down_weight") is not None:
        s = torch.sigmoid(F.linear(F.relu(F.linear(t.mean((1, 2)), d["se_down_weight"], d["se_down_bias"])),
                                   d["se_up_weight"], d["se_up_bias"]))
        t = t * s[:, None, None, :]
    h = F.gelu(F.linear(t, d["fc1_weight"], d["fc1_bias"]), approximate=approximate)
    mh = 1.13 * F.linear(m, d["fc1_weight"].abs(), d["fc1_bias"].abs())
    if d.get("grn_weight") is not None:
        gx = torch.linalg.vector_norm(h, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(-1, keepdim=True) + 1e-6)
        gb = d.get("grn_bias")
        h = h + (gb if gb is not None else 0) + d["grn_weight"] * h * nx
        mh = mh * (1 + d["grn_weight"].abs() * nx) + (gb.abs() if gb is not None else 0)
    o = F.linear(h, d["fc2_weight"], d["fc2_bias"])
    mo = F.linear(mh, d["fc2_weight"].abs(), d["fc2_bias"].abs())
    sc = 1.0
    if d.get("gamma") is not None:
        sc = d["gamma"]
    o, mo = o * sc, mo * (sc.abs() if isinstance(sc, torch.Tensor) else 1)
    if d.get("drop_scale") is not None:
        ds = d["drop_scale"].view(-1, 1, 1, 1)
        o, mo = o * ds, mo * ds.abs()
    return x + o.permute(0, 3, 1, 2), x.abs() + mo.permute(0, 3, 1, 2)


def _check(y, x, p, kw, approximate="none"):
    with single_threaded_torch():
        ref, mag = _oracle(x, p, kw, approximate=approximate)
    N, C, H, W = x.shape
    hidden, k = p["fc1_weight"].shape[0], p["dw_weight"].shape[-1]
    L = k * k + 3 * C + 2 * hidden + H * W + max(1, C // 4) + 16
    u = 2.0 ** -53 if x.dtype == torch.float64 else 2.0 ** -24
    rtol = max(4 * math.sqrt(L) * u, 1e-12 if x.dtype == torch.float64 else 0.0)
    tol = rtol * mag
    if x.dtype == torch.bfloat16:
        tol = tol + 2 * 2.0 ** -8 * ref.abs()
    err = (y.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {err.numel()} off; worst excess "
                           f"{float((err - tol).max()):.3g}, max err {float(err.max()):.3g}")
    assert y.dtype == x.dtype and y.shape == x.shape


def _run(x, p, kw, **extra):
    with torch.no_grad():
        return op(x, *p.values(), **kw, **extra)


@sweep(40)
@given(N=st.integers(1, 3), C=st.integers(1, 40), H=st.integers(1, 14), W=st.integers(1, 14),
       k=st.sampled_from([1, 3, 5, 7, 13]), hidden=st.integers(1, 80), ln=st.booleans(),
       se=st.booleans(), grn=st.sampled_from([None, "nobias", "bias"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), gamma=st.booleans(),
       drop=st.booleans(), nchw=st.booleans(), approximate=st.sampled_from(["none", "tanh"]))
def test_forward_sweep(N, C, H, W, k, hidden, ln, se, grn, dtype, gamma, drop, nchw, approximate):
    if ln and C < 3:
        ln = False  # LayerNorm over 1-2 channels is ill-conditioned (tested in test_convnext_block)
    x, p, kw = _make(N, C, H, W, k, hidden, dtype, ln=ln, se=se, grn=grn, gamma=gamma, drop=drop, nchw=nchw)
    y = _run(x, p, kw, approximate=approximate)
    _check(y, x, p, kw, approximate)
    if nchw and H * W > 1 and C > 1:
        assert y.is_contiguous()


@pytest.mark.parametrize("N,C,H,k", [(1, 80, 56, 13), (2, 160, 28, 3), (1, 640, 7, 13)])
def test_unireplknet_shapes(N, C, H, k):
    """UniRepLKNet-T eval blocks: no LayerNorm, SE, GRN without bias."""
    x, p, kw = _make(N, C, H, H, k, 4 * C, torch.float32, ln=False, se=True, grn="nobias", gamma=False)
    _check(_run(x, p, kw), x, p, kw)


@pytest.mark.parametrize("se", [False, True])
def test_grn_above_the_hidden_store_cap(se):
    """GRN blocks keep the statistics pass's hidden activations for the output pass up to
    40 MiB (kGrnStoreBytes in convnext_block.cpp) and recompute them above: N*H*W*hidden
    float32 values of 2 * 410 * 410 * 64 * 4 B = 86 MB here, the recompute path."""
    x, p, kw = _make(2, 16, 410, 410, 3, 64, torch.float32, ln=False, se=se, grn="bias", gamma=True)
    assert 2 * 410 * 410 * 64 * 4 > 40 << 20
    _check(_run(x, p, kw), x, p, kw)


def test_bfloat16_and_threads():
    x, p, kw = _make(2, 32, 12, 10, 7, 128, torch.bfloat16, ln=False, se=True, grn="nobias")
    _check(_run(x, p, kw), x, p, kw)
    x, p, kw = _make(2, 48, 20, 20, 13, 192, torch.float32, ln=False, se=True, grn="bias")
    old = fastvis.get_num_threads()
    try:
        fastvis.set_num_threads(1)
        y1 = _run(x, p, kw)
        fastvis.set_num_threads(2)
        y2 = _run(x, p, kw)
    finally:
        fastvis.set_num_threads(old)
    assert torch.equal(y1, y2)


def test_matches_convnext_block_when_it_is_one():
    """With a LayerNorm and no SE the inference form is the ConvNeXt block: same bits."""
    x, p, kw = _make(2, 24, 9, 9, 7, 96, torch.float32, ln=True, se=False, grn="bias")
    a = _run(x, p, kw)
    with torch.no_grad():
        b = fastvis.ops.convnext_block(x, p["dw_weight"], p["dw_bias"], kw["norm_weight"], kw["norm_bias"],
                                       p["fc1_weight"], p["fc1_bias"], p["fc2_weight"], p["fc2_bias"],
                                       kw["gamma"], grn_weight=kw["grn_weight"], grn_bias=kw["grn_bias"])
    assert torch.equal(a, b)


def test_gradients_run_the_reference():
    x, p, kw = _make(2, 16, 6, 7, 5, 32, torch.float64, ln=False, se=True, grn="nobias")
    fused = _run(x, p, kw)
    xs = x.clone().requires_grad_(True)
    y = op(xs, *p.values(), **kw)
    torch.testing.assert_close(y, fused, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert xs.grad is not None and torch.isfinite(xs.grad).all()


def test_compile_and_empty():
    x, p, kw = _make(1, 16, 6, 6, 3, 32, torch.float32, ln=False, se=True, grn="nobias")
    f = torch.compile(lambda t: op(t, *p.values(), **kw), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(f(x), _run(x, p, kw), rtol=0, atol=0)
    assert _run(x[:0], p, kw).shape == (0, 16, 6, 6)


def test_bad_input():
    x, p, kw = _make(1, 16, 6, 6, 3, 32, torch.float32, ln=False, se=True, grn=None)
    with pytest.raises(ValueError, match="layer_norm=False"):
        _run(x, p, dict(kw, norm_weight=torch.ones(16)))
    with pytest.raises(ValueError, match="se_down_weight and se_up_weight"):
        _run(x, p, dict(kw, se_up_weight=None))
    with pytest.raises(ValueError, match=r"se_down_weight: expected shape \[Cr, 16\]"):
        _run(x, p, dict(kw, se_down_weight=torch.randn(4, 15)))
    with pytest.raises(ValueError, match=r"se_up_weight: expected shape \[16, 4\]"):
        _run(x, p, dict(kw, se_up_weight=torch.randn(16, 3)))
    with pytest.raises(ValueError, match=r"dw_weight: expected \(16, 1, k, k\)"):
        _run(x, dict(p, dw_weight=torch.randn(16, 1, 4, 4)), kw)
    with pytest.raises(TypeError, match=r"se_up_bias: expected dtype"):
        _run(x, p, dict(kw, se_up_bias=kw["se_up_bias"].double()))
    with pytest.raises(ValueError, match="approximate"):
        _run(x, p, kw, approximate="fast")
    with pytest.raises(ValueError, match=r"fc2_weight: expected \(16, 32\)"):
        _run(x, dict(p, fc2_weight=torch.randn(16, 31)), kw)
    with pytest.raises(ValueError, match=r"fc1_bias: expected shape \(32,\)"):
        _run(x, dict(p, fc1_bias=torch.randn(31)), kw)
    # The reference path (gradients needed) refuses the same inputs the same way.
    with pytest.raises(ValueError, match=r"fc2_weight: expected \(16, 32\)"):
        op(x.clone().requires_grad_(True), *dict(p, fc2_weight=torch.randn(16, 31)).values(), **kw)
    # The core refuses the backward of these forms (native callers).
    with pytest.raises(ValueError, match="no backward"):
        fastvis._C.convnext_block_backward_scratch_bytes(
            x, [p["dw_weight"], None, None, None, p["fc1_weight"], None, p["fc2_weight"], None,
                None, None, None, None, kw["se_down_weight"], None, kw["se_up_weight"], None],
            1e-6, False)
