"""fastvis.ops.batch_norm_se: training-mode BatchNorm followed by squeeze-and-excitation as
one autograd function (UniRepLKNet's norm + SE), against the composition of PyTorch's
modules (nn.BatchNorm2d, then the SE block's pooling, linears, ReLU, sigmoid and scale).

Oracle and bounds: in float64 the two agree to rounding (1e-12 of each tensor's largest
value); in float32 to 1e-5 of it (both sum up to N*H*W = 1e3-1e4 products per channel in
different orders; a wrong term in the derivation is off by O(1)). Running statistics and
the batch count are compared after two steps, for momentum 0.1 and None.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvis
from fastvis.nn.unireplknet import SEBlock
from fastvis.ops.batch_norm_se import batch_norm_se, batch_norm_se_reference
from conftest import sweep


def _modules(c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    bn, se = torch.nn.BatchNorm2d(c).to(dtype), SEBlock(c, max(1, c // 4)).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=dtype))
        for p in se.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        se.down.bias.add_(1.0)  # most SE hidden units active: their gradients are checked
    return bn, se


def _run(bn, se, x, gz, fused):
    x = x.detach().clone().requires_grad_(True)
    if fused:
        factor = bn.momentum
        bn.num_batches_tracked.add_(1)
        if factor is None:
            factor = 1.0 / float(bn.num_batches_tracked)
        z = batch_norm_se(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, factor, bn.eps,
                          se.down.weight.flatten(1), se.down.bias, se.up.weight.flatten(1), se.up.bias)
    else:
        z = se(bn(x))
    params = [x, bn.weight, bn.bias, se.down.weight, se.down.bias, se.up.weight, se.up.bias]
    return z, torch.autograd.grad(z, params, gz)


def _check(n, c, h, w, dtype, channels_last, momentum, seed=0):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    bn, se = _modules(c, dtype, seed)
    bn.momentum = momentum
    bn_r, se_r = copy.deepcopy(bn), copy.deepcopy(se)
    g = torch.Generator().manual_seed(seed + 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(2):
        x = (torch.randn(n, c, h, w, generator=g, dtype=dtype) * 2 + 3).contiguous(memory_format=fmt)
        gz = torch.randn(n, c, h, w, generator=g, dtype=dtype)
        z, grads = _run(bn, se, x, gz, True)
        zr, grads_r = _run(bn_r, se_r, x, gz, False)
        assert z.is_contiguous(memory_format=fmt)
        assert (z - zr).abs().max() <= tol * zr.abs().max()
        # The input gradient is a sum of terms of size |gamma / sigma| |gz| |xhat| that cancel
        # where few pixels share a channel (at N*H*W = 2 it is ~eps/var of them): bounded
        # relative to that scale, not to its own size.
        xd = x.double()
        var = xd.var(dim=(0, 2, 3), unbiased=False)
        xhat = (xd - xd.mean(dim=(0, 2, 3), keepdim=True)) / (var + bn.eps).sqrt().view(1, -1, 1, 1)
        x_scale = float((bn.weight.detach().double().abs() / (var + bn.eps).sqrt()).max() * gz.abs().max()
                        * (1 + xhat.abs().max()))
        for name, a, b in zip(["x", "bn.weight", "bn.bias", "down.weight", "down.bias", "up.weight", "up.bias"],
                              grads, grads_r):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            scale = max(float(b.abs().max()), x_scale if name == "x" else 1e-30)
            assert (a - b).abs().max() <= tol * scale, (name, step)
    assert int(bn.num_batches_tracked) == int(bn_r.num_batches_tracked) == 2
    torch.testing.assert_close(bn.running_mean, bn_r.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(bn.running_var, bn_r.running_var, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_the_modules(dtype, channels_last, momentum):
    _check(3, 16, 7, 9, dtype, channels_last, momentum)


@sweep(40)
@given(n=st.integers(1, 4), c=st.integers(1, 40), h=st.integers(1, 9), w=st.integers(1, 9),
       channels_last=st.booleans(), seed=st.integers(0, 1000))
def test_shape_sweep_float64(n, c, h, w, channels_last, seed):
    if n * h * w <= 1:
        return
    _check(n, c, h, w, torch.float64, channels_last, 0.1, seed)


def test_gradcheck_float64():
    bn, se = _modules(6, torch.float64, 3)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [bn.weight, bn.bias, se.down.weight.flatten(1), se.down.bias, se.up.weight.flatten(1), se.up.bias]
    params = [p.detach().clone().requires_grad_(True) for p in params]
    fn = (lambda x, gw, gb, wd, bd, wu, bu: batch_norm_se(x, None, None, gw, gb, 0.1, 1e-5, wd, bd, wu, bu))
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_variance_of_an_offset_input_is_accurate():
    """Mean 1000, standard deviation 1: the statistics are two-pass per image, so float32
    keeps the variance to ~1e-6 relative (E[x^2] - E[x]^2 would lose it entirely)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, 16, 16, generator=g) + 1000.0
    rm, rv = torch.zeros(8), torch.ones(8)
    w, b = torch.ones(8), torch.zeros(8)
    wd, bd, wu, bu = torch.zeros(2, 8), torch.zeros(2), torch.zeros(8, 2), torch.full((8,), 50.0)  # s = 1
    batch_norm_se(x, rm, rv, w, b, 1.0, 1e-5, wd, bd, wu, bu)
    ref = x.double().var(dim=(0, 2, 3), unbiased=True)
    assert ((rv.double() - ref).abs() / ref).max() < 1e-5


def test_reference_function_matches_modules():
    bn, se = _modules(8, torch.float64, 1)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    zr = se(copy.deepcopy(bn)(x))
    z = batch_norm_se_reference(x, None, None, bn.weight, bn.bias, 0.1, bn.eps, se.down.weight.flatten(1),
                                se.down.bias, se.up.weight.flatten(1), se.up.bias)
    torch.testing.assert_close(z, zr, rtol=1e-12, atol=1e-12)


def test_bad_input_is_refused():
    bn, se = _modules(4, torch.float32, 0)
    args = (bn.weight, bn.bias, 0.1, 1e-5, se.down.weight.flatten(1), se.down.bias, se.up.weight.flatten(1),
            se.up.bias)
    with pytest.raises(ValueError, match="4D"):
        batch_norm_se(torch.randn(4, 3, 3), None, None, *args)
    with pytest.raises(TypeError, match="float32 or float64"):
        batch_norm_se(torch.randn(2, 4, 3, 3).bfloat16(), None, None, *args)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_se(torch.randn(1, 4, 1, 1), None, None, *args)


def test_unireplknet_block_uses_it_in_training_only():
    """The block's training path calls it (BN1's running statistics move as the module's
    would; test_models_replk compares the whole block with the reference composition); in
    eval mode, under fastvis.use_reference() and for bfloat16 the modules run."""
    blk = fastvis.nn.UniRepLKNetBlock(16, 3).train()
    calls = []
    import fastvis.nn.unireplknet as mod
    real = mod.batch_norm_se

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    mod.batch_norm_se = spy
    try:
        x = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
        blk(x)
        assert len(calls) == 1
        with fastvis.use_reference(True):
            blk(x)
        blk.eval()
        blk(x)
        assert len(calls) == 1
    finally:
        mod.batch_norm_se = real
