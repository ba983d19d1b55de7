"""InceptionNeXt models (fastvis.models.inception_next) against timm with the same weights.

Oracle: timm's own MetaNeXt (a declared test dependency) with *every* parameter and
BatchNorm buffer randomised (timm's init has zero biases, unit BatchNorm statistics and
gamma = 1e-6, which would hide most mistakes), loaded strictly into the fastvis model.

Tolerance of the float32 comparisons: max |fastvis - timm| <= 1e-4 * max |timm| per tensor
(the brief's bound, the same as the ConvNeXt tests'). Both sides compute in float32 in
different orders: fastvis' depthwise kernels, the 1x1 convolutions as matrix products on
the NHWC view, the eval-mode BatchNorm folded into fc1 and the layer scale folded into fc2.
Dot products of length <= 4C = 3072 err by ~sqrt(L) u ~ 3e-6 relative; measured end to end
~1e-6. A semantic mistake (a misplaced BatchNorm, a wrong split order, a wrong band
orientation, a missing gamma, a wrong drop-path factor) moves outputs by 1e-2 or more.
"""
from __future__ import annotations

import copy
import functools
import math
import sys
import zlib

import pytest
import torch
import torch.nn as nn

import timm  # a declared test dependency
from timm.models.inception_next import InceptionDWConv2d as TimmInceptionDWConv2d
from timm.models.inception_next import MetaNeXt as TimmMetaNeXt

import fastvis
import fastvis.nn
from fastvis.models import inception_next as inc

NAMES = ["inception_next_atto", "inception_next_base", "inception_next_small", "inception_next_tiny"]
REL = 1e-4  # see the module docstring


# --------------------------------------------------------------------------- helpers


def _gen(tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))


def _randn(*shape, tag: str) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(tag))


def _is_norm_weight(name: str) -> bool:
    return (name.endswith("norm.weight") or name in ("stem.1.weight", "stem_1.weight")
            or name.endswith("downsample.0.weight"))


@torch.no_grad()
def randomize_(model: nn.Module, tag: str) -> nn.Module:
    """Every parameter and BatchNorm buffer random: norm weights 1 + N(0, 0.2^2), other
    vectors (biases, gamma) N(0, 0.2^2), weights N(0, 1/fan_in); running means N(0, 0.2^2),
    running variances U(0.5, 1.5), num_batches_tracked a random count."""
    g = _gen(tag)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            base = 1.0 if _is_norm_weight(name) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.2 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
        elif name.endswith("num_batches_tracked"):
            b.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
        else:
            raise AssertionError(f"randomize_: unexpected buffer {name}")
    return model


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, what: str, rel: float = REL) -> None:
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    err = (got.detach().double() - ref.detach().double()).abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, the comparison would be vacuous"
    assert err <= rel * scale, f"{what}: max |diff| {err:.3g} > {rel:g} * max|ref| ({scale:.3g})"


def timm_random(name: str, tag: str, **kw) -> nn.Module:
    """timm's model with every parameter and buffer randomised (built on the meta device:
    timm's own init would be overwritten anyway)."""
    tm = timm.create_model(name, pretrained=False, device="meta", **kw).to_empty(device="cpu")
    return randomize_(tm, tag)


_PAIRS = {}


def pair(name: str):
    """(timm model, fastvis model), eval mode, same random weights; built once per name.
    Tests that change a model work on copies."""
    if name not in _PAIRS:
        tm = timm_random(name, "weights/" + name).eval()
        fm = fastvis.create_model(name).eval()
        fm.load_state_dict(tm.state_dict(), strict=True)
        _PAIRS[name] = (tm, fm)
    return _PAIRS[name]


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The oracle (timm) and the PyTorch parts run on one torch thread: on a shared,
    oversubscribed machine OpenMP spin-waiting makes them several times slower with more
    (and fastvis' pool follows torch's thread count, so its one-thread path is what runs).
    Nothing here is timed."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _zero_in_train_mode(model: nn.Module) -> set:
    """Parameters whose gradient is exactly zero in training mode: per-channel constants
    added right before a batch-statistics BatchNorm, which subtracts them again (the stem
    convolution's bias, the token mixers' biases, and the fc2 bias of a stage's last block,
    which feeds the next stage's downsampling BatchNorm through the residual stream)."""
    names = {"stem.0.bias"}
    for i, stage in enumerate(model.stages):
        for j in range(len(stage.blocks)):
            names |= {f"stages.{i}.blocks.{j}.token_mixer.dwconv_{b}.bias" for b in ("hw", "w", "h")}
        if i + 1 < len(model.stages) and isinstance(model.stages[i + 1].downsample, nn.Sequential):
            names.add(f"stages.{i}.blocks.{len(stage.blocks) - 1}.mlp.fc2.bias")
    return names


def _compare_step(tm, fm, x, w, what, compare_buffers):
    """One forward + backward of (logits * w).sum() on both models: logits, the input
    gradient, every parameter gradient and (train mode) the updated BatchNorm buffers.

    In training mode the gradients listed by :func:`_zero_in_train_mode` are 0 in exact
    arithmetic, so both sides hold rounding noise and a relative comparison is meaningless;
    for them both must instead be below REL times the same layer's weight gradient (an
    implementation that, e.g., normalised with running statistics in training mode would
    give them values of the weight gradients' order)."""
    zero = _zero_in_train_mode(tm) if tm.training else set()
    outs, grads = [], []
    for model in (tm, fm):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (y * w).sum().backward()
        outs.append(y)
        grads.append({"input": xi.grad, **{k: p.grad for k, p in model.named_parameters()}})
    assert_close_scaled(outs[1], outs[0], f"{what} logits")
    assert outs[0].std() > 0.1, "the random weights should give logits of order 1"
    ref, got = grads
    assert set(got) == set(ref)
    assert zero <= set(ref)
    for k in ref:
        assert got[k] is not None, f"{what}: no gradient reached {k}"
        if k in zero:
            scale = ref[k[: -len("bias")] + "weight"].abs().max().item()
            for side, g in (("timm", ref[k]), ("fastvis", got[k])):
                assert g.abs().max().item() <= REL * scale, (
                    f"{what} grad {k} ({side}): {g.abs().max().item():.3g} should be ~0 "
                    f"(<= {REL:g} * {scale:.3g}, the weight gradient's scale)")
        else:
            assert_close_scaled(got[k], ref[k], f"{what} grad {k}")
    if compare_buffers:
        fb = dict(fm.named_buffers())
        n = 0
        for k, b in tm.named_buffers():
            if k.endswith("num_batches_tracked"):
                assert torch.equal(fb[k], b), k
            else:
                assert_close_scaled(fb[k], b, f"{what} buffer {k}")
            n += 1
        assert n == len(fb) > 0


# --------------------------------------------------------------------------- registry and errors


def test_registered_names_are_timms():
    assert fastvis.list_models("inception_next*") == NAMES
    assert sorted(timm.list_models("inception_next*")) == NAMES
    assert fastvis.models.is_model("inception_next_base.sail_in1k_384")


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model 'inception_next_tinny'.*inception_next_tiny"):
        fastvis.create_model("inception_next_tinny")
    m = fastvis.create_model("inception_next_atto").eval()
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\), got \(1, 1, 64, 64\)"):
        m(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        m(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="smaller than the network's total stride 32"):
        m(torch.zeros(1, 3, 64, 16))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        m([[1.0]])
    m1 = fastvis.create_model("inception_next_atto", in_chans=1, device="meta")
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\), got \(1, 3, 64, 64\)"):
        m1(torch.zeros(1, 3, 64, 64, device="meta"))
    for kw, pattern in [
        (dict(output_stride=12), "output_stride"),
        (dict(global_pool="max"), "global_pool"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(mlp_ratios=(4, 4)), "one entry per stage"),
        (dict(token_mixers=functools.partial(fastvis.nn.InceptionDWConv2d, band_kernel_size=8)), "odd"),
        (dict(token_mixers=functools.partial(fastvis.nn.InceptionDWConv2d, branch_ratio=0.4)), "gc"),
        (dict(token_mixers=functools.partial(fastvis.nn.InceptionDWConv2d, branch_ratio=0.01)), "gc"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            fastvis.create_model("inception_next_atto", device="meta", **kw)
    with pytest.raises(ValueError, match="out of range"):
        fastvis.create_model("inception_next_atto", features_only=True, out_indices=(4,), device="meta")
    with pytest.raises(TypeError):
        fastvis.create_model("inception_next_atto", no_such_argument=1)
    with pytest.raises(NotImplementedError, match="checkpointing"):
        m.set_grad_checkpointing(True)


# --------------------------------------------------------------------------- keys and state dicts


@pytest.mark.parametrize("name", NAMES)
def test_keys_shapes_and_cfg_match_timm(name):
    tm = timm.create_model(name, pretrained=False, device="meta")
    fm = fastvis.create_model(name, device="meta")
    assert _shapes(fm.state_dict()) == _shapes(tm.state_dict())
    fm.load_state_dict(tm.state_dict(), strict=True)
    for key in ("input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "num_classes",
                "first_conv", "classifier", "hf_hub_id", "tag"):
        assert fm.pretrained_cfg[key] == tm.pretrained_cfg[key], key
    assert fm.num_features == tm.num_features and fm.head_hidden_size == tm.head_hidden_size
    assert fm.feature_info.channels() == [d["num_chs"] for d in tm.feature_info]
    assert fm.feature_info.reduction() == [d["reduction"] for d in tm.feature_info]


def test_pretrained_cfg_of_the_384_tag(tmp_path, monkeypatch):
    # (fastvis' registry hands the tag to the model only with pretrained=True: it selects
    # the weights; see create_model)
    tm = timm.create_model("inception_next_base.sail_in1k_384", pretrained=False, device="meta")
    cfg = inc._pretrained_cfg("inception_next_base", "sail_in1k_384", 3, 1000)
    for key in ("input_size", "pool_size", "crop_pct", "hf_hub_id", "tag"):
        assert cfg[key] == tm.pretrained_cfg[key], key
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(fastvis.models.PretrainedWeightsNotFound) as e:
        fastvis.create_model("inception_next_base.sail_in1k_384", pretrained=True, device="meta")
    assert "models--timm--inception_next_base.sail_in1k_384" in str(e.value)
    assert "inceptionnext_base_384.pth" in str(e.value)


def test_state_dict_round_trip_strict():
    tm, fm = pair("inception_next_atto")
    fsd, tsd = fm.state_dict(), tm.state_dict()
    assert list(fsd) == list(tsd)  # same keys in the same order
    for k, v in tsd.items():
        assert torch.equal(fsd[k], v), k
    # and back: fastvis' state dict loads strictly into a fresh timm model
    back = timm.create_model("inception_next_atto", device="meta").to_empty(device="cpu")
    back.load_state_dict(fsd, strict=True)
    for k, v in back.state_dict().items():
        assert torch.equal(v, tsd[k]), k
    # a state dict with an unknown key is not silently accepted
    with pytest.raises(RuntimeError, match="extra"):
        fastvis.create_model("inception_next_atto").load_state_dict(
            inc.checkpoint_filter_fn(dict(tsd, extra=torch.zeros(1)), fm), strict=True)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["inception_next_atto", "inception_next_tiny"])
def test_logits_gradients_and_bn_stats_match_timm(name, mode, layout):
    tm0, fm0 = pair(name)
    tm, fm = copy.deepcopy(tm0).train(mode == "train"), copy.deepcopy(fm0).train(mode == "train")
    x = _layout(_randn(2, 3, 64, 64, tag="x/" + name), layout)
    w = _randn(2, 1000, tag="w/" + name)
    _compare_step(tm, fm, x, w, f"{name} {mode} {layout}", compare_buffers=mode == "train")


def _custom_pair(tag: str):
    """A 3-stage config away from every registered one: other kernel sizes and branch
    ratios per stage (identity groups of other widths than the branches), other MLP
    ratios, no layer scale in one case, another in_chans and num_classes."""
    def mixers(cls):
        return [functools.partial(cls, square_kernel_size=5, band_kernel_size=7, branch_ratio=0.25),
                functools.partial(cls, square_kernel_size=3, band_kernel_size=5, branch_ratio=0.125),
                functools.partial(cls, square_kernel_size=7, band_kernel_size=3, branch_ratio=1 / 3)]
    kw = dict(in_chans=2, num_classes=11, depths=(1, 2, 1), dims=(24, 48, 72), mlp_ratios=(2, 3, 1.5),
              ls_init_value=None if tag == "nols" else 0.5)
    tm = randomize_(TimmMetaNeXt(token_mixers=mixers(TimmInceptionDWConv2d), **kw), "custom/" + tag)
    fm = inc.MetaNeXt(token_mixers=mixers(fastvis.nn.InceptionDWConv2d), **kw)
    fm.load_state_dict(tm.state_dict(), strict=True)
    return tm, fm


@pytest.mark.parametrize("tag", ["ls", "nols"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_custom_config_matches_timm(tag, mode):
    tm, fm = _custom_pair(tag)
    tm.train(mode == "train")
    fm.train(mode == "train")
    assert (fm.stages[0].blocks[0].gamma is None) == (tag == "nols")
    assert fm.stages[1].blocks[0].token_mixer.split_indexes == (30, 6, 6, 6)
    assert fm.stages[2].blocks[0].token_mixer.dwconv_w.weight.shape == (24, 1, 1, 3)
    x = _layout(_randn(3, 2, 40, 48, tag="x/custom"), "channels_last" if tag == "ls" else "nchw")
    w = _randn(3, 11, tag="w/custom")
    _compare_step(tm, fm, x, w, f"custom {tag} {mode}", compare_buffers=mode == "train")


@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_stride_matches_timm(output_stride):
    tm = timm_random("inception_next_atto", f"os{output_stride}", output_stride=output_stride).eval()
    fm = fastvis.create_model("inception_next_atto", output_stride=output_stride).eval()
    fm.load_state_dict(tm.state_dict(), strict=True)
    assert fm.feature_info.reduction() == [d["reduction"] for d in tm.feature_info]
    assert fm.feature_info.reduction()[-1] == output_stride
    assert fm.stages[3].blocks[0].token_mixer.dilation == 32 // output_stride
    x = _randn(2, 3, 32, 48, tag="x/os")
    with torch.no_grad():
        feat, ref_feat = fm.forward_features(x), tm.forward_features(x)
        assert feat.shape == (2, 320, 32 // output_stride, 48 // output_stride)
        assert_close_scaled(feat, ref_feat, f"output_stride {output_stride} features")
        assert_close_scaled(fm.forward_head(feat), tm.forward_head(ref_feat), f"output_stride {output_stride} logits")


def test_forward_head_pre_logits():
    tm, fm = pair("inception_next_atto")
    x = _randn(2, 3, 64, 64, tag="x/pre")
    with torch.no_grad():
        feat = fm.forward_features(x)
        pre = fm.forward_head(feat, pre_logits=True)
        ref_pre = tm.forward_head(tm.forward_features(x), pre_logits=True)
        logits = fm(x)
        from_pre = fm.head.fc2(pre)  # as the model's call, in inference (fastvis.nn.Linear's kernel)
    assert pre.shape == (2, 3 * 320) == (2, fm.head_hidden_size)
    assert_close_scaled(pre, ref_pre, "pre_logits")
    torch.testing.assert_close(from_pre, logits, rtol=0, atol=0)


def test_channels_last_end_to_end():
    tm, fm = pair("inception_next_atto")
    x = _randn(2, 3, 64, 64, tag="x/cl")
    seen = []

    def hook(mod, args, out):
        seen.append((args[0].is_contiguous(memory_format=torch.channels_last),
                     out.is_contiguous(memory_format=torch.channels_last)))

    hooks = [m.register_forward_hook(hook) for m in fm.modules()
             if isinstance(m, (fastvis.nn.MetaNeXtBlock, fastvis.nn.InceptionDWConv2d))]
    try:
        with torch.no_grad():
            y = fm(x)  # NCHW input
            y_cl = fm(x.contiguous(memory_format=torch.channels_last))
            feat = fm.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    # Every block is seen (3 forwards); the token mixers only when the block runs its
    # modules (in eval inference the block is one fused metanext_block call).
    assert 3 * sum(fm.depths) <= len(seen) <= 3 * 2 * sum(fm.depths)
    assert all(a and b for a, b in seen), "every block and token mixer must take and give channels_last"
    assert feat.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, y_cl)
    # a model converted with .to(memory_format=channels_last) computes the same
    fm2 = copy.deepcopy(fm).to(memory_format=torch.channels_last)
    assert fm2.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close_scaled(fm2(x.contiguous(memory_format=torch.channels_last)), y, "channels_last model", rel=1e-6)
        assert_close_scaled(y, tm(x), "vs timm")


def test_use_reference_gives_the_same_result(monkeypatch):
    _, fm = pair("inception_next_atto")
    x = _randn(2, 3, 64, 64, tag="x/ref")
    import fastvis.ops.inception_dwconv as idw

    calls = []
    real = idw.inception_depthwise_conv2d_reference
    monkeypatch.setattr(idw, "inception_depthwise_conv2d_reference",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        y = fm(x)
        assert not calls
        with fastvis.use_reference():
            y_ref = fm(x)
    assert not fastvis.reference_enabled()
    assert len(calls) == sum(fm.depths)  # every token mixer ran the reference
    assert_close_scaled(y, y_ref, "kernels vs use_reference()")


# --------------------------------------------------------------------------- BatchNorm folding


@pytest.mark.parametrize("engine", ["fused", "unfused"])
def test_eval_bn_folding_is_used_and_never_stale(engine, monkeypatch):
    """Both eval paths: the fused blocks, and the unfused ones (the core's mixer, then
    fastvis.ops.mlp on oneDNN) that run where the core's GEMM is narrower than oneDNN's
    (fastvis.ops.mlp.mlp_path); each folds the BatchNorm and never serves a stale fold."""
    mlp_mod = sys.modules["fastvis.ops.mlp"]
    if engine == "unfused" and not mlp_mod._ONEDNN:
        pytest.skip("PyTorch without oneDNN: the blocks always run fused")
    monkeypatch.setattr(mlp_mod, "_CORE_GEMM_WIDE", engine == "fused")
    fused_calls = []
    op = sys.modules["fastvis.ops.metanext_block"]._mn_fwd
    real = op.fastvis_impl
    monkeypatch.setattr(op, "fastvis_impl", lambda *a, **k: (fused_calls.append(1), real(*a, **k))[1])
    chain = fastvis._C.metanext_block_forward_chain
    monkeypatch.setattr(fastvis._C, "metanext_block_forward_chain",
                        lambda *a: (fused_calls.append(1), chain(*a))[1])
    tm0, fm0 = pair("inception_next_atto")
    tm, fm = copy.deepcopy(tm0), copy.deepcopy(fm0)
    x = _randn(2, 3, 64, 64, tag="x/fold")
    norm_calls = []
    for blk in (b for s in fm.stages for b in s.blocks):
        blk.norm.register_forward_hook(lambda *a: norm_calls.append(1))
    with torch.no_grad():
        y = fm(x)
        assert not norm_calls, "eval mode must fold the block BatchNorm into fc1"
        assert bool(fused_calls) == (engine == "fused")
        assert_close_scaled(y, tm(x), "folded")
        # folding off: the BatchNorm runs, same result
        for blk in (b for s in fm.stages for b in s.blocks):
            blk.fold_bn = False
        assert_close_scaled(fm(x), y, "unfolded vs folded", rel=1e-5)
        assert len(norm_calls) == sum(fm.depths)
        for blk in (b for s in fm.stages for b in s.blocks):
            blk.fold_bn = True
        # change every block's BatchNorm (statistics and affine) in both models: the
        # folded weights follow (they are recomputed, not cached)
        for model in (tm, fm):
            for s in model.stages:
                for blk in s.blocks:
                    blk.norm.running_var.mul_(3.0)
                    blk.norm.running_mean.add_(0.5)
                    blk.norm.weight.mul_(-1.0)
        y2, ref2 = fm(x), tm(x)
    assert_close_scaled(y2, ref2, "after changing the BatchNorms")
    assert (y2 - y).abs().max() > 1e-2 * y.abs().max()
    # train mode runs the BatchNorm itself (batch statistics, running-stat updates)
    norm_calls.clear()
    fm.train()
    fm(x)
    assert len(norm_calls) == sum(fm.depths)


# --------------------------------------------------------------------------- drop path


def test_drop_path_matches_timm_in_train_mode():
    tm = timm_random("inception_next_atto", "dp", drop_path_rate=0.5).train()
    fm = fastvis.create_model("inception_next_atto", drop_path_rate=0.5).train()
    fm.load_state_dict(tm.state_dict(), strict=True)
    t_rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in tm.stages for b in s.blocks]
    assert [b.drop_path for s in fm.stages for b in s.blocks] == t_rates
    x = _randn(4, 3, 32, 32, tag="x/dp")
    torch.manual_seed(1234)
    ref = tm(x)
    torch.manual_seed(1234)
    got = fm(x)
    assert_close_scaled(got, ref, "train mode with drop_path 0.5")
    fm2 = fastvis.create_model("inception_next_atto").train()
    fm2.load_state_dict(tm.state_dict(), strict=True)
    assert (fm2(x) - got).abs().max() > 1e-2  # the drops did change the output


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, -1)])
def test_features_only_matches_timm(out_indices):
    name = "inception_next_atto"
    tfe = timm_random(name, "f/" + str(out_indices), features_only=True, out_indices=out_indices).eval()
    ffe = fastvis.create_model(name, features_only=True, out_indices=out_indices).eval()
    # timm's FeatureListNet names (stem_0, stages_1) map onto the module paths
    ffe.load_state_dict(inc.checkpoint_filter_fn(tfe.state_dict(), ffe), strict=True)
    assert ffe.feature_info.channels() == tfe.feature_info.channels()
    assert ffe.feature_info.reduction() == tfe.feature_info.reduction()
    assert ffe.feature_info.module_name() == tfe.feature_info.module_name()
    assert len(ffe.stages) == 4 and ffe.head is None
    x = _randn(2, 3, 32, 64, tag="x/f")
    with torch.no_grad():
        got, ref = ffe(x), tfe(x)
    assert isinstance(got, list) and len(got) == len(ref) == len(out_indices)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.is_contiguous(memory_format=torch.channels_last)
        assert_close_scaled(g, r, f"feature {i}")
    with pytest.raises(RuntimeError, match="feature extractor"):
        ffe.forward_head(got[-1])
    short = fastvis.create_model(name, features_only=True, out_indices=(1,), device="meta")
    assert len(short.stages) == 2 and short.feature_info.channels() == [80]


# --------------------------------------------------------------------------- head


def test_headless_and_reset_classifier_match_timm():
    tm0, fm0 = pair("inception_next_atto")
    x = _randn(2, 3, 32, 32, tag="x/head")
    tm, fm = copy.deepcopy(tm0), copy.deepcopy(fm0)
    for model in (tm, fm):
        model.reset_classifier(0)
    with torch.no_grad():
        assert fm(x).shape == (2, 960)  # timm: the head's pre-logits MLP stays
        assert_close_scaled(fm(x), tm(x), "num_classes=0")
        fm.reset_classifier(5)
        assert fm(x).shape == (2, 5) and fm.get_classifier().weight.shape == (5, 960)
        assert fm.num_classes == 5 and fm.pretrained_cfg["num_classes"] == 5
        for model in (tm, fm):
            model.reset_classifier(0, reset_other=True)
        assert fm(x).shape == (2, 320) and fm.head_hidden_size == 320 == tm.head_hidden_size
        assert_close_scaled(fm(x), tm(x), "reset_other")
    assert fm.default_cfg is fm.pretrained_cfg
    assert fastvis.create_model("inception_next_atto", drop_rate=0.3, device="meta").head.drop.p == 0.3
    assert fastvis.create_model("inception_next_atto", num_classes=0, device="meta").head.fc2.__class__ is nn.Identity


# --------------------------------------------------------------------------- pretrained


def test_pretrained_from_local_files_only(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    tm, _ = pair("inception_next_atto")
    sd = {k: v.contiguous() for k, v in tm.state_dict().items()}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # nothing anywhere: a clear error naming where it looked, nothing downloaded
    with pytest.raises(fastvis.models.PretrainedWeightsNotFound, match=r"never downloads.*pretrained_path") as e:
        fastvis.create_model("inception_next_atto", pretrained=True)
    assert str(tmp_path / "hf" / "models--timm--inception_next_atto.sail_in1k") in str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "inceptionnext_atto.pth") in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        fastvis.create_model("inception_next_atto", pretrained_path=str(tmp_path / "missing.pth"))

    # an explicit file (official-style {'model': ...} wrapper), another classifier size and in_chans
    path = tmp_path / "weights.pth"
    torch.save({"model": sd}, str(path))
    m = fastvis.create_model("inception_next_atto", pretrained_path=str(path), num_classes=10, in_chans=1)
    msd = m.state_dict()
    for k, v in sd.items():
        if k.startswith("head.fc2."):
            assert msd[k].shape[0] == 10  # another classifier size: left freshly initialised
        elif k == "stem.0.weight":
            torch.testing.assert_close(msd[k], v.sum(dim=1, keepdim=True))  # timm's in_chans=1 rule
        else:
            assert torch.equal(msd[k], v), k
    assert m.pretrained_cfg["file"] == str(path)

    # the Hugging Face hub cache under timm's repository name
    snap = tmp_path / "hf" / "models--timm--inception_next_atto.sail_in1k" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    save_file(sd, str(snap / "model.safetensors"))
    m2 = fastvis.create_model("inception_next_atto", pretrained=True).eval()
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in sd.items())
    x = _randn(1, 3, 64, 64, tag="x/pre")
    with torch.no_grad():
        assert_close_scaled(m2(x), tm(x), "pretrained model")

    # the torch.hub cache under the official release's file name, as a feature extractor
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(sd, str(ckpt / "inceptionnext_atto.pth"))
    m3 = fastvis.create_model("inception_next_atto", pretrained=True, features_only=True, out_indices=(2,))
    assert torch.equal(m3.stages[2].blocks[0].gamma, sd["stages.2.blocks.0.gamma"])


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("c, sq, band, ratio, dil", [
    (40, 3, 9, 0.25, 1), (96, 3, 11, 0.125, 1), (30, 5, 7, 1 / 3, 2), (17, 1, 3, 0.2, 3)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inception_dwconv_matches_timm(c, sq, band, ratio, dil, layout):
    t = TimmInceptionDWConv2d(c, square_kernel_size=sq, band_kernel_size=band, branch_ratio=ratio, dilation=dil)
    f = fastvis.nn.InceptionDWConv2d(c, square_kernel_size=sq, band_kernel_size=band, branch_ratio=ratio,
                                     dilation=dil)
    randomize_(t, f"idw{c}")
    assert _shapes(f.state_dict()) == _shapes(t.state_dict())
    f.load_state_dict(t.state_dict(), strict=True)
    assert f.split_indexes == t.split_indexes
    x = _layout(_randn(2, c, 13, 11, tag=f"x/idw{c}"), layout)
    w = _randn(2, c, 13, 11, tag=f"w/idw{c}")
    outs, grads = [], []
    for m in (t, f):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * w).sum().backward()
        outs.append(y)
        grads.append({"input": xi.grad, **{k: p.grad for k, p in m.named_parameters()}})
    assert_close_scaled(outs[1], outs[0], "output")
    if layout == "channels_last":
        assert outs[1].is_contiguous(memory_format=torch.channels_last)
    # the identity group passes through untouched
    i = f.split_indexes[0]
    assert torch.equal(outs[1][:, :i], x[:, :i])
    for k in grads[0]:
        assert_close_scaled(grads[1][k], grads[0][k], f"grad {k}")
    with pytest.raises(ValueError, match=rf"\(N, {c}, H, W\)"):
        f(torch.zeros(1, c + 1, 8, 8))


def test_metanext_block_defaults_and_errors():
    b = fastvis.nn.MetaNeXtBlock(32)
    assert torch.equal(b.gamma, torch.full((32,), 1e-6)) and b.mlp.fc1.weight.shape == (128, 32, 1, 1)
    assert isinstance(b.token_mixer, fastvis.nn.InceptionDWConv2d) and b.token_mixer.split_indexes == (20, 4, 4, 4)
    assert fastvis.nn.MetaNeXtBlock(32, ls_init_value=None).gamma is None
    assert fastvis.nn.MetaNeXtBlock(32, ls_init_value=0).gamma is None  # timm: falsy -> none
    with pytest.raises(ValueError, match="drop_path"):
        fastvis.nn.MetaNeXtBlock(32, drop_path=2.0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        fastvis.nn.MetaNeXtBlock(32, mlp_ratio=0)
    with pytest.raises(ValueError, match="odd"):
        fastvis.nn.InceptionDWConv2d(32, square_kernel_size=4)
    with pytest.raises(ValueError, match="dilation"):
        fastvis.nn.InceptionDWConv2d(32, dilation=0)


def test_block_drop_path_follows_the_trainer_hook():
    """MetaNeXtBlock takes its stochastic-depth draws through drop_path_scale, so the
    trainer's drop_path_source decides them (rank-invariant distributed runs)."""
    from fastvis.nn.convnext import drop_path_source

    blk = randomize_(fastvis.nn.MetaNeXtBlock(16, drop_path=0.5, ls_init_value=0.5), "blk/dp")
    evaluated = copy.deepcopy(blk).eval()
    nodrop = copy.deepcopy(blk).train()
    nodrop.drop_path = 0.0
    x = _randn(4, 16, 9, 9, tag="x/blkdp")
    with torch.no_grad():
        branch = evaluated(x) - x
        ref = nodrop(x) - x  # training mode (batch statistics), nothing dropped
        with drop_path_source(lambda n, keep: torch.tensor([0.0, 1.0, 0.0, 1.0])):
            r = blk.train()(x) - x
            assert torch.equal(evaluated(x) - x, branch)  # eval mode ignores the source
    assert torch.equal(r[0], torch.zeros_like(r[0])) and torch.equal(r[2], torch.zeros_like(r[2]))
    # kept samples are scaled by 1 / keep = 2
    assert ref[1::2].abs().max() > 0
    torch.testing.assert_close(r[1::2], 2 * ref[1::2], rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_eval_stage_runs_its_blocks_in_one_core_call(monkeypatch):
    """Eval inference: each stage's MetaNeXt blocks go to the core in one
    metanext_block_forward_chain call (a stage of one block: the single call), with the
    bits of block-by-block calls; a forward hook on a block keeps the per-block path."""
    from fastvis import _C
    torch.manual_seed(0)
    m = fastvis.create_model("inception_next_atto").eval()
    for mod in m.modules():  # running statistics that are not the identity
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    chains = []
    real = _C.metanext_block_forward_chain
    monkeypatch.setattr(_C, "metanext_block_forward_chain",
                        lambda x, blocks, ys: (chains.append(len(blocks)), real(x, blocks, ys))[1])
    depths = [len(s.blocks) for s in m.stages]
    # The fused blocks (not the unfused eval path of a core GEMM narrower than oneDNN's).
    monkeypatch.setattr(sys.modules["fastvis.ops.mlp"], "_CORE_GEMM_WIDE", True)
    with torch.no_grad():
        y = m(x)
        assert chains == [d for d in depths if d > 1]
        seen = []
        h = m.stages[2].blocks[1].register_forward_hook(lambda mod, i, o: seen.append(1))
        y_hooked = m(x)
        h.remove()
        assert seen == [1]
        with fastvis.use_reference(True):
            ref = m(x)
    assert torch.equal(y, y_hooked)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
