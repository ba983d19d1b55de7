"""UniRepLKNet blocks and RepLKNet ConvFFNs in eval mode run as one fused
fastvis.ops.dwconv_mlp_block call
(BatchNorms folded into the depthwise conv and fc2, layer scale into fc2): same outputs as
the module's own ops, for the training form and the deploy form, and the folded
parameters follow parameter updates."""
from __future__ import annotations

import pytest
import torch

import fastvis
import fastvis.nn.unireplknet as unimod


def _randomise(m: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.num_features, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.num_features, generator=g))
        for name, p in m.named_parameters():
            if name.endswith("gamma") or name.endswith("beta"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = unimod.dwconv_mlp_block

    def spy(*a, **k):
        calls.append(a)  # the positional arguments: a[5] is fc2's weight
        return real(*a, **k)
    monkeypatch.setattr(unimod, "dwconv_mlp_block", spy)
    return calls


@pytest.mark.parametrize("kernel_size", [0, 3, 5, 13])
def test_block_fused_equals_modules(kernel_size, counted):
    torch.manual_seed(1)
    blk = unimod.UniRepLKNetBlock(16, kernel_size).eval()
    _randomise(blk)
    x = torch.randn(2, 16, 11, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = blk(x)
        assert len(counted) == 1
        # fc2 (BN2 and the layer scale folded in) reaches the op k-major: (C, 4C), strides (1, C)
        assert counted[0][5].shape == (16, 64) and counted[0][5].stride() == (1, 16)
        with fastvis.use_reference(True):
            ref = blk(x)
        assert len(counted) == 1  # the reference path is the module's own ops
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # Deploy form: the same fused call, nothing to fold but the same numbers.
    fastvis.reparameterize(blk)
    with torch.no_grad():
        yd = blk(x)
    assert len(counted) == 2
    torch.testing.assert_close(yd, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_parameter_updates_invalidate_the_folded_cache():
    blk = unimod.UniRepLKNetBlock(16, 13).eval()
    _randomise(blk)
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y0 = blk(x)
        blk.norm.running_var.mul_(2.0)       # a buffer
        blk.pwconv2[0].weight.mul_(-1.0)     # a parameter
        y1 = blk(x)
        with fastvis.use_reference(True):
            ref = blk(x)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_gradients_and_training_use_the_modules(counted):
    blk = unimod.UniRepLKNetBlock(16, 5).eval()
    x = torch.randn(1, 16, 6, 6, requires_grad=True)
    blk(x).sum().backward()  # eval with grad: the module's ops (gradients reach every parameter)
    assert blk.pwconv1[1].weight.grad is not None and x.grad is not None
    blk.train()
    with torch.no_grad():
        blk(torch.randn(2, 16, 6, 6))
    assert counted == []


def test_model_fused_matches_reference():
    m = fastvis.create_model("unireplknet_a").eval()
    _randomise(m)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        with fastvis.use_reference(True):
            ref = m(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_replknet_convffn_fused_equals_modules(monkeypatch):
    import fastvis.nn.replk as replk
    calls = []
    real = replk.dwconv_mlp_block
    monkeypatch.setattr(replk, "dwconv_mlp_block", lambda *a, **k: (calls.append(a[5].stride()), real(*a, **k))[1])
    ffn = replk.ConvFFN(24, 96, 24).eval()
    _randomise(ffn)
    x = torch.randn(2, 24, 7, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = ffn(x)
        with fastvis.use_reference(True):
            ref = ffn(x)
    assert calls == [(1, 24)]  # one fused call, fc2 (24, 96) k-major
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_replknet_model_fused_matches_reference():
    m = fastvis.create_model("replknet_31b", num_classes=10).eval()
    _randomise(m)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        with fastvis.use_reference(True):
            ref = m(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("make", [
    lambda: fastvis.nn.DilatedReparamBlock(12, 13),
    lambda: fastvis.nn.DilatedReparamBlock(12, 7),
    lambda: fastvis.nn.ReparamLargeKernelConv(12, 13, 5),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_branches_run_the_fused_op(make, momentum, monkeypatch):
    """The training-form multi-branch conv + BN goes through fastvis.ops.dilated_reparam_conv
    and equals the modules composed by hand: output, gradients, running statistics and
    num_batches_tracked (momentum None = cumulative average, as nn.BatchNorm2d)."""
    import copy
    import fastvis.ops.dilated_reparam as dr
    calls = []
    real = dr.dilated_reparam_conv
    monkeypatch.setattr(dr, "dilated_reparam_conv", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    torch.manual_seed(2)
    m = make().train()
    for _, bn in m.branch_modules():
        bn.momentum = momentum
    ref = copy.deepcopy(m)
    for step in range(2):
        x = torch.randn(2, 12, 10, 9).contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y = m(xa)
        yr = sum(bn(conv(xb)) for conv, bn in ref.branch_modules())
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5 * float(yr.detach().abs().max()))
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5 * float(xb.grad.detach().abs().max()))
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * float(q.grad.abs().max()) + 1e-6, msg=n)
    for (n, b), (_, c) in zip(m.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["unireplknet_a", "inception_next_atto", "convnext_atto", "replknet_31b"])
def test_fold_cache_key_covers_every_parameter_and_buffer(name):
    """cached_fold keys on _state_tensors: the same tensors as parameters() + buffers(), for
    every submodule of the models that use it."""
    from fastvis.nn.reparam import _state_tensors
    m = fastvis.create_model(name)
    for sub in m.modules():
        want = list(sub.parameters()) + list(sub.buffers())
        got = _state_tensors(sub)
        assert {id(t) for t in got} == {id(t) for t in want} and len(got) == len(want)


@pytest.mark.parametrize("make", [
    lambda: (fastvis.nn.ConvNeXtBlock(32), 32),
    lambda: (fastvis.nn.MetaNeXtBlock(32), 32),
    lambda: (unimod.UniRepLKNetBlock(16, 5), 16),
], ids=["convnext", "metanext", "unireplknet"])
def test_eval_blocks_compile_fullgraph(make):
    """torch.compile(fullgraph=True) of an eval block under no_grad: the fused inference
    paths step aside while Dynamo traces (their fold caches key on data pointers, which it
    cannot trace; it raised 'Data pointer comparison' before) and the module path computes
    the same outputs."""
    torch.manual_seed(4)
    blk, c = make()
    blk.eval()
    _randomise(blk)
    x = torch.randn(2, c, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = blk(x)
        y = torch.compile(blk, fullgraph=True)(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
