"""The fused MetaNeXt block (InceptionNeXt, inference, CPU): fastvis.ops.metanext_block.

    y = x + drop_scale[n] * gamma * fc2(GELU(fc1(inception_mixer(x))))

Every result is compared with a float64 oracle written here from plain torch ops (split,
three grouped F.conv2d with "same" padding, cat, F.linear, F.gelu, layer scale, drop
scale, residual), evaluated on exactly the values the kernel saw (inputs drawn in float32
and rounded once to the test dtype, so their float64 copies are exact).

Tolerances
----------
Per element |got - ref| <= rtol * mag (+ bf16 rounding), `mag` from a first-order forward
error analysis: mixer m1 = |x| on identity channels, conv(|x|, |w|) + |b| on the branches;
fc1 mh = m1 |W1|^T + |b1|; GELU mg = 1.13 * mh (max |gelu'| = 1.1290); fc2 mo = mg |W2|^T
+ |b2|; y: |x| + |ds * gamma| * mo. rtol = 4 * sqrt(L) * u (Higham & Mary's probabilistic
bound, lambda = 4) with L = ks*ks + kb + C + hidden + 16 the longest chain of dependent
roundings (mixer taps, the two GEMM reductions, pointwise steps and the GELU/exp
approximations), u = 2^-24 (float32; bfloat16 also computes in float32) or 2^-53
(float64, floored at 1e-12: the oracle errs by the same order). bfloat16 output is rounded
once to 8 significant bits: + 2 * 2^-8 * |ref|.
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

mb = fastvis.ops.metanext_block


def _make(N, C, H, W, g, ks, kb, hidden, dtype, *, bias=True, gamma=True, drop=False,
          nchw=False):
    def r(*s, scale=1.0):
        return (torch.randn(*s) * scale).to(dtype)
    x = r(N, C, H, W)
    if not nchw:
        x = x.contiguous(memory_format=torch.channels_last)
    p = dict(
        hw_weight=r(g, 1, ks, ks, scale=0.5), hw_bias=r(g) if bias else None,
        w_weight=r(g, 1, 1, kb, scale=0.5), w_bias=r(g) if bias else None,
        h_weight=r(g, 1, kb, 1, scale=0.5), h_bias=r(g) if bias else None,
        fc1_weight=r(hidden, C, scale=C ** -0.5), fc1_bias=r(hidden) if bias else None,
        fc2_weight=r(C, hidden, scale=hidden ** -0.5), fc2_bias=r(C) if bias else None,
        gamma=r(C) if gamma else None,
        drop_scale=(torch.tensor([0.0, 1.25, 2.0, 1.0][:N] * (N // 4 + 1))[:N].to(dtype)
                    if drop else None),
    )
    return x, p


def _oracle(x, p, dilation, approximate, absolute=False):
    """float64 oracle; with absolute=True, the magnitude bound (every map on |.|)."""
    d = {k: (None if v is None else v.double()) for k, v in p.items()}
    x = x.double()
    if absolute:
        d = {k: (None if v is None else v.abs()) for k, v in d.items()}
        x = x.abs()
    C, g = x.shape[1], d["hw_weight"].shape[0]
    ks, kb = d["hw_weight"].shape[-1], d["w_weight"].shape[-1]
    xi, xa, xb, xc = torch.split(x, (C - 3 * g, g, g, g), dim=1)
    t = torch.cat((
        xi,
        F.conv2d(xa, d["hw_weight"], d["hw_bias"], padding=(ks - 1) * dilation // 2, dilation=dilation, groups=g),
        F.conv2d(xb, d["w_weight"], d["w_bias"], padding=(0, (kb - 1) * dilation // 2), dilation=dilation, groups=g),
        F.conv2d(xc, d["h_weight"], d["h_bias"], padding=((kb - 1) * dilation // 2, 0), dilation=dilation, groups=g),
    ), 1).permute(0, 2, 3, 1)
    h = F.linear(t, d["fc1_weight"], d["fc1_bias"])
    h = 1.13 * h if absolute else F.gelu(h, approximate=approximate)
    o = F.linear(h, d["fc2_weight"], d["fc2_bias"])
    if d["gamma"] is not None:
        o = o * d["gamma"]
    if d["drop_scale"] is not None:
        o = o * d["drop_scale"].view(-1, 1, 1, 1)
    return x + o.permute(0, 3, 1, 2)


def _check(y, x, p, dilation=1, approximate="none"):
    with single_threaded_torch():
        ref = _oracle(x, p, dilation, approximate)
        mag = _oracle(x, p, dilation, approximate, absolute=True)
    C, hidden = x.shape[1], p["fc1_weight"].shape[0]
    ks, kb = p["hw_weight"].shape[-1], p["w_weight"].shape[-1]
    L = ks * ks + kb + C + hidden + 16
    u = 2.0 ** -53 if x.dtype == torch.float64 else 2.0 ** -24
    rtol = max(4 * math.sqrt(L) * u, 1e-12 if x.dtype == torch.float64 else 0.0)
    tol = rtol * mag
    if x.dtype == torch.bfloat16:
        tol = tol + 2 * 2.0 ** -8 * ref.abs()
    err = (y.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {err.numel()} elements off; worst excess "
                           f"{float((err - tol).max()):.3g} (max err {float(err.max()):.3g})")
    assert y.shape == x.shape and y.dtype == x.dtype
    want_cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if want_cl:
        assert y.is_contiguous(memory_format=torch.channels_last)
    elif x.dim() == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
        assert y.is_contiguous()


def _run(x, p, **kw):
    with torch.no_grad():
        return mb(x, **p, **kw)


@sweep(40)
@given(
    N=st.integers(1, 3), C=st.integers(3, 40), H=st.integers(1, 15), W=st.integers(1, 15),
    gfrac=st.floats(0.05, 1 / 3), ks=st.sampled_from([1, 3, 5]), kb=st.sampled_from([1, 3, 7, 9, 11]),
    hidden=st.integers(1, 70), dilation=st.integers(1, 3), dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(), gamma=st.booleans(), drop=st.booleans(), nchw=st.booleans(),
    approximate=st.sampled_from(["none", "tanh"]),
)
def test_forward_sweep(N, C, H, W, gfrac, ks, kb, hidden, dilation, dtype, bias, gamma, drop,
                       nchw, approximate):
    g = max(1, min(C // 3, int(C * gfrac)))
    x, p = _make(N, C, H, W, g, ks, kb, hidden, dtype, bias=bias, gamma=gamma, drop=drop, nchw=nchw)
    _check(_run(x, p, dilation=dilation, approximate=approximate), x, p, dilation, approximate)


@pytest.mark.parametrize("C,H,W,g,ks,kb,hidden,N", [
    (96, 56, 56, 12, 3, 11, 384, 1),   # inception_next_tiny stage 1 (many tiles)
    (40, 16, 16, 10, 3, 9, 160, 2),    # atto-like: branch ratio 1/4, band 9
    (24, 7, 9, 8, 3, 11, 96, 4),       # C == 3g: no identity channels; band longer than H/W
])
def test_model_shapes(C, H, W, g, ks, kb, hidden, N):
    x, p = _make(N, C, H, W, g, ks, kb, hidden, torch.float32, drop=True)
    _check(_run(x, p), x, p)


def test_bfloat16():
    x, p = _make(2, 32, 12, 10, 4, 3, 11, 128, torch.bfloat16)
    _check(_run(x, p), x, p)


def test_thread_count_independent():
    x, p = _make(2, 48, 20, 20, 6, 3, 11, 192, torch.float32)
    old = fastvis.get_num_threads()
    try:
        fastvis.set_num_threads(1)
        y1 = _run(x, p)
        fastvis.set_num_threads(2)
        y2 = _run(x, p)
    finally:
        fastvis.set_num_threads(old)
    assert torch.equal(y1, y2)


def test_reference_matches_oracle_and_gradients_use_it():
    """With gradients needed the op runs its (differentiable) reference: same values as the
    fused kernel, and gradients equal to the oracle's."""
    x, p = _make(2, 24, 8, 9, 4, 3, 7, 48, torch.float64)
    fused = _run(x, p)
    xs = x.clone().requires_grad_(True)
    ps = {k: (None if v is None else v.clone().requires_grad_(k != "drop_scale")) for k, v in p.items()}
    y = mb(xs, **ps)
    torch.testing.assert_close(y, fused, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    y.backward(gy)
    xo = x.clone().requires_grad_(True)
    po = {k: (None if v is None else v.clone().requires_grad_(k != "drop_scale")) for k, v in p.items()}
    _oracle(xo, po, 1, "none").backward(gy)
    torch.testing.assert_close(xs.grad, xo.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ps["fc1_weight"].grad, po["fc1_weight"].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ps["hw_weight"].grad, po["hw_weight"].grad, rtol=1e-10, atol=1e-12)


def test_fold_affine_into_fc1_equals_batchnorm_then_linear():
    torch.manual_seed(3)
    C, hidden = 12, 20
    bn = torch.nn.BatchNorm2d(C).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    fc1 = torch.nn.Linear(C, hidden).double()
    z = torch.randn(2, C, 5, 6, dtype=torch.float64)
    ref = fc1(bn(z).permute(0, 2, 3, 1))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    w, b = fastvis.ops.fold_affine_into_fc1(scale, shift, fc1.weight, fc1.bias)
    torch.testing.assert_close(F.linear(z.permute(0, 2, 3, 1), w, b), ref, rtol=1e-12, atol=1e-12)


def test_empty_batch_and_compile():
    x, p = _make(1, 16, 6, 6, 2, 3, 5, 32, torch.float32)
    e = x[:0]
    assert _run(e, p).shape == e.shape
    f = torch.compile(lambda x: mb(x, **p), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(f(x), _run(x, p), rtol=0, atol=0)


def test_use_reference():
    x, p = _make(1, 16, 6, 6, 2, 3, 5, 32, torch.float32)
    with fastvis.use_reference(True):
        y = _run(x, p)
    _check(y, x, p)


def test_bad_input():
    x, p = _make(1, 12, 6, 6, 2, 3, 5, 16, torch.float32)
    with pytest.raises(ValueError, match=r"1 <= 3g <= C"):
        q = dict(p, hw_weight=torch.randn(5, 1, 3, 3), hw_bias=None, w_weight=torch.randn(5, 1, 1, 5),
                 w_bias=None, h_weight=torch.randn(5, 1, 5, 1), h_bias=None)
        _run(x, q)
    with pytest.raises(ValueError, match=r"hw_weight: expected \(g, 1, ks, ks\) with ks odd"):
        _run(x, dict(p, hw_weight=torch.randn(2, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"h_weight: expected \(2, 1, 5, 1\)"):
        _run(x, dict(p, h_weight=torch.randn(2, 1, 3, 1)))
    with pytest.raises(ValueError, match=r"w_weight: expected"):
        _run(x, dict(p, w_weight=torch.randn(2, 1, 1, 4)))
    with pytest.raises(ValueError, match=r"fc1_weight: expected \(hidden, 12\)"):
        _run(x, dict(p, fc1_weight=torch.randn(16, 11)))
    with pytest.raises(ValueError, match=r"fc2_weight: expected \(12, 16\)"):
        _run(x, dict(p, fc2_weight=torch.randn(12, 15)))
    with pytest.raises(TypeError, match=r"fc1_bias: expected dtype"):
        _run(x, dict(p, fc1_bias=p["fc1_bias"].double()))
    with pytest.raises(TypeError, match=r"backend supports"):
        _run(x.to(torch.float16), p)
    with pytest.raises(ValueError, match=r"dilation"):
        _run(x, p, dilation=0)
    with pytest.raises(ValueError, match=r"approximate"):
        _run(x, p, approximate="fast")
    with pytest.raises(ValueError, match=r"4-D"):
        _run(x[0], p)
    with pytest.raises(TypeError, match=r"fc2_weight: a tensor is required"):
        _run(x, dict(p, fc2_weight=None))
    # The core refuses on its own too (native callers have no Python checks).
    with pytest.raises(ValueError, match=r"3g <= C"):
        fastvis._C.metanext_block_forward_scratch_bytes(
            x, [torch.randn(5, 1, 3, 3), None, torch.randn(5, 1, 1, 5), None, torch.randn(5, 1, 5, 1),
                None, p["fc1_weight"], None, p["fc2_weight"], None, None, None], 1, False)


def test_metanext_module_uses_the_fused_op_in_inference(monkeypatch):
    """fastvis.nn.MetaNeXtBlock in eval mode with nothing needing gradients is one fused
    call; its output equals the block's own modules (BatchNorm folded or not)."""
    import importlib
    import fastvis.nn.metanext as mn
    op = importlib.import_module("fastvis.ops.metanext_block")._mn_fwd
    # The fused path (not the unfused one of a core GEMM narrower than oneDNN's, mlp_path).
    monkeypatch.setattr(importlib.import_module("fastvis.ops.mlp"), "_CORE_GEMM_WIDE", True)
    calls = []
    real = op.fastvis_impl  # the fused kernel's entry, however the module reaches it
    monkeypatch.setattr(op, "fastvis_impl", lambda *a, **k: (calls.append(a[9].stride()), real(*a, **k))[1])
    torch.manual_seed(5)
    blk = mn.MetaNeXtBlock(32, ls_init_value=0.5).eval()
    with torch.no_grad():
        blk.norm.running_mean.normal_()
        blk.norm.running_var.uniform_(0.5, 2.0)
        blk.norm.weight.normal_()
        blk.norm.bias.normal_()
    x = torch.randn(2, 32, 10, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = blk(x)
        assert calls == [(1, 32)]  # one fused call, fc2's weight (32, 128) passed k-major
        blk.fold_bn = False  # the modules: BatchNorm, the MLP, gamma
        ref = blk(x)
        assert len(calls) == 1
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # The cached k-major fc2 follows in-place changes of the parameter.
    with torch.no_grad():
        blk.mlp.fc2.weight.mul_(-2.0)
        blk.fold_bn = True
        y2 = blk(x)
        blk.fold_bn = False
        ref2 = blk(x)
    assert len(calls) == 2 and not torch.allclose(y2, y)
    torch.testing.assert_close(y2, ref2, rtol=1e-5, atol=1e-5 * float(ref2.abs().max()))
    blk.fold_bn = True
    blk(x).sum().backward()  # gradients needed: the modules run, gradients reach the BatchNorm
    assert len(calls) == 2 and blk.norm.weight.grad is not None


@pytest.mark.parametrize("nchw", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepared_arguments_match_the_op(nchw, dtype):
    """metanext_block_prepared (the eval module's path: arguments checked once) gives the
    op's bits and x's memory format; reference mode and inputs it was not prepared for go
    through the op (and its errors)."""
    from fastvis.ops.metanext_block import PreparedMetaNeXtBlock, metanext_block_prepared
    torch.manual_seed(11)
    x, p = _make(2, 24, 9, 8, 3, 3, 11, 40, dtype, nchw=nchw)
    p.pop("drop_scale")
    prep = PreparedMetaNeXtBlock(x, *p.values(), dilation=1, approximate="tanh")
    with torch.no_grad():
        want = mb(x, **p, approximate="tanh")
        got = metanext_block_prepared(x, prep)
        assert torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)
        with fastvis.use_reference(True):
            assert torch.equal(metanext_block_prepared(x, prep), mb(x, **p, approximate="tanh"))
        with pytest.raises(ValueError, match=r"fc1_weight: expected"):
            metanext_block_prepared(torch.randn(1, 25, 4, 4, dtype=dtype), prep)
    with pytest.raises(ValueError, match=r"fc2_weight: expected"):
        PreparedMetaNeXtBlock(x, *dict(p, fc2_weight=torch.randn(24, 39, dtype=dtype)).values())
