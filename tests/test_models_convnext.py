"""ConvNeXt / ConvNeXt-V2 models (fastvis.models) against timm with the same weights.

Oracle: timm's own ConvNeXt (a declared test dependency, pyproject [test]) with *every*
parameter randomised (timm zero-initialises GRN and sets gamma to 1e-6, which would make
those terms invisible), loaded strictly into the fastvis model.

Tolerance of the float32 comparisons: max |fastvis - timm| <= 1e-4 * max |timm| per
tensor. Both sides compute in float32 (unit roundoff u = 6e-8) but in different orders
(fastvis' LayerNorm kernel, and soon the fused block kernel, against PyTorch's). One layer's
dot products of length L (at most 4C = 3072 here) err by about sqrt(L) * u ~ 3e-6 of
their scale in practice (L * u ~ 2e-4 worst case); the residual stream adds the errors
of up to 15 blocks (atto..tiny), i.e. ~5e-5. 1e-4 leaves about 2x over that estimate and
~50x over what the layer-by-layer reference measures today (~2e-6), while any semantic
mistake (a missing or misplaced gamma / GRN / LayerNorm term, a wrong reshape of a 1x1
weight, a wrong drop-path factor) moves outputs by 1e-2 or more.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn as nn

import timm  # a declared test dependency (pyproject.toml, extra "test")

import fastvis
import fastvis.nn
from fastvis.models import checkpoint_filter_fn

ALL_NAMES = sorted([
    "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
    "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
    "convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano", "convnextv2_tiny",
    "convnextv2_small", "convnextv2_base", "convnextv2_large", "convnextv2_huge",
])
PARITY_NAMES = [
    "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
    "convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano",
]
LARGE_NAMES = [n for n in ALL_NAMES if n not in PARITY_NAMES]
REL = 1e-4  # see the module docstring


# --------------------------------------------------------------------------- helpers


def _gen(tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))


def _randn(*shape, tag: str) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(tag))


def _is_norm_weight(name: str) -> bool:
    return (name.endswith("norm.weight") or name == "stem.1.weight" or name == "stem_1.weight"
            or name.endswith("downsample.0.weight"))


@torch.no_grad()
def randomize_(model: nn.Module, tag: str) -> nn.Module:
    """Every parameter random: LayerNorm weights 1 + N(0, 0.2^2), other vectors (biases,
    gamma, GRN weight/bias) N(0, 0.2^2), weight matrices / kernels N(0, 1/fan_in)."""
    g = _gen(tag)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            base = 1.0 if _is_norm_weight(name) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, what: str, rel: float = REL) -> None:
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    err = (got.detach().double() - ref.detach().double()).abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, the comparison would be vacuous"
    assert err <= rel * scale, f"{what}: max |diff| {err:.3g} > {rel:g} * max|ref| ({scale:.3g})"


def timm_random(name: str, tag: str, **kw) -> nn.Module:
    """timm's model with every parameter randomised (built on the meta device and
    materialised uninitialised: timm's own init would be overwritten anyway)."""
    tm = timm.create_model(name, pretrained=False, device="meta", **kw).to_empty(device="cpu")
    assert not list(tm.buffers()), "randomize_ covers parameters only"
    return randomize_(tm, tag)


_PAIRS = {}


def pair(name: str):
    """(timm model, fastvis model), eval mode, same random weights; built once per name."""
    if name not in _PAIRS:
        tm = timm_random(name, "weights/" + name).eval()
        fm = fastvis.create_model(name).eval()
        fm.load_state_dict(tm.state_dict(), strict=True)
        _PAIRS[name] = (tm, fm)
    return _PAIRS[name]


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


# --------------------------------------------------------------------------- registry


def test_list_models_names_and_patterns():
    assert fastvis.list_models("convnext*") == ALL_NAMES
    assert set(ALL_NAMES) <= set(fastvis.list_models())
    assert fastvis.list_models("convnextv2_*") == sorted(n for n in ALL_NAMES if n.startswith("convnextv2_"))
    assert fastvis.list_models("conv*atto") == ["convnext_atto", "convnextv2_atto"]
    assert fastvis.list_models(["*huge", "*xlarge"]) == ["convnext_xlarge", "convnextv2_huge"]
    assert fastvis.list_models("convnext_*", exclude="*o") == [
        "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "convnext_xlarge"]
    assert fastvis.list_models("resnet*") == []
    assert fastvis.models.is_model("convnext_atto.d2_in1k") and not fastvis.models.is_model("convnext")


def test_create_model_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'convnext_tinny'.*convnext_tiny"):
        fastvis.create_model("convnext_tinny")
    with pytest.raises(ValueError, match="unknown model 'zzz'"):
        fastvis.create_model("zzz")


def test_create_model_pretrained_without_file_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=r"never downloads.*pretrained_path") as e:
        fastvis.create_model("convnext_atto", pretrained=True)
    msg = str(e.value)
    assert str(tmp_path / "hf" / "models--timm--convnext_atto.d2_in1k") in msg  # where it looked
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "convnext_atto_d2-01bb0f51.pth") in msg
    with pytest.raises(FileNotFoundError, match="no such file"):
        fastvis.create_model("convnext_atto", pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="publishes no weights for convnextv2_small"):
        fastvis.create_model("convnextv2_small", pretrained=True, device="meta")


def test_create_model_bad_arguments():
    with pytest.raises(ValueError, match="out_indices is only meaningful"):
        fastvis.create_model("convnext_atto", out_indices=(1,))
    with pytest.raises(ValueError, match="odd"):
        fastvis.create_model("convnext_atto", kernel_sizes=4, device="meta")
    with pytest.raises(ValueError, match="out of range"):
        fastvis.create_model("convnext_atto", features_only=True, out_indices=(4,), device="meta")
    with pytest.raises(ValueError, match="drop_path_rate"):
        fastvis.create_model("convnext_atto", drop_path_rate=1.5, device="meta")
    with pytest.raises(TypeError):
        fastvis.create_model("convnext_atto", no_such_argument=1)
    m = fastvis.create_model("convnext_atto")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        m(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="smaller than the network's total stride 32"):
        m(torch.zeros(1, 3, 16, 64))


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("name", LARGE_NAMES)
def test_large_models_keys_match_timm_strictly(name):
    # Built on the meta device: no memory, no init cost; keys and shapes are all there is.
    tm = timm.create_model(name, pretrained=False, device="meta")
    fm = fastvis.create_model(name, device="meta")
    assert _shapes(fm.state_dict()) == _shapes(tm.state_dict())
    fm.load_state_dict(tm.state_dict(), strict=True)
    assert fm.pretrained_cfg["num_classes"] == 1000
    assert fm.pretrained_cfg["mean"] == tm.pretrained_cfg["mean"]
    assert fm.pretrained_cfg["input_size"] == tm.pretrained_cfg["input_size"]


@pytest.mark.parametrize("name", PARITY_NAMES)
def test_small_models_keys_and_values_load_strictly(name):
    tm, fm = pair(name)  # loads strictly
    fsd, tsd = fm.state_dict(), tm.state_dict()
    assert _shapes(fsd) == _shapes(tsd)
    for k, v in tsd.items():
        assert torch.equal(fsd[k], v), k
    # the storage form follows timm's conv_mlp choice for the variant
    assert fm.stages[0].blocks[0].use_conv_mlp == tm.stages[0].blocks[0].use_conv_mlp


def test_drop_path_rates_follow_timm():
    tm = timm.create_model("convnext_tiny", drop_path_rate=0.3, device="meta")
    fm = fastvis.create_model("convnext_tiny", drop_path_rate=0.3, device="meta")
    t_rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in tm.stages for b in s.blocks]
    f_rates = [b.drop_path for s in fm.stages for b in s.blocks]
    assert f_rates == t_rates and f_rates[0] == 0.0 and f_rates[-1] == pytest.approx(0.3)


def test_blocks_call_the_fused_op(monkeypatch):
    # The block body must be exactly one fused convnext_block kernel call per block, in
    # inference (the prepared-arguments path) and in training (the op with its autograd).
    import importlib

    op = importlib.import_module("fastvis.ops.convnext_block")._cb_fwd
    calls = []
    real = op.fastvis_impl

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "fastvis_impl", spy)
    from fastvis import _C
    chained = []
    real_chain = _C.convnext_block_forward_chain
    monkeypatch.setattr(_C, "convnext_block_forward_chain",
                        lambda x, blocks, ys: (chained.extend([None] * len(blocks)), real_chain(x, blocks, ys))[1])
    m = fastvis.create_model("convnextv2_atto").eval()
    with torch.no_grad():
        m(torch.zeros(1, 3, 32, 32))
    # eval: each stage's blocks in one chained core call (single-block stages: the op)
    assert len(calls) + len(chained) == sum(m.depths) == 12
    calls.clear()
    m.train()
    m(torch.zeros(2, 3, 32, 32)).sum().backward()
    assert len(calls) == 12


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", PARITY_NAMES)
def test_eval_output_matches_timm(name):
    tm, fm = pair(name)
    x = _randn(2, 3, 64, 64, tag="x/" + name)
    with torch.no_grad():
        ref_feat = tm.forward_features(x)
        feat = fm.forward_features(x)
        ref, out = tm.forward_head(ref_feat), fm.forward_head(feat)
    assert_close_scaled(feat, ref_feat, f"{name} forward_features")
    assert_close_scaled(out, ref, f"{name} logits")
    assert ref.std() > 0.1  # the random weights give logits of order 1, not a degenerate constant


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_nano"])
def test_forward_head_pre_logits(name):
    tm, fm = pair(name)
    x = _randn(2, 3, 64, 64, tag="x/" + name)
    with torch.no_grad():
        feat = fm.forward_features(x)
        pre = fm.forward_head(feat, pre_logits=True)
        ref_pre = tm.forward_head(tm.forward_features(x), pre_logits=True)
        logits = fm(x)
        # in the same mode as the model's call: inference runs fastvis.nn.Linear's own
        # kernel, training F.linear (equal within rounding, not bit for bit)
        from_pre = fm.head.fc(pre)
    assert pre.shape == (2, fm.num_features)
    assert_close_scaled(pre, ref_pre, "pre_logits")
    torch.testing.assert_close(from_pre, logits, rtol=0, atol=0)


def test_channels_last_input_and_model():
    tm, fm = pair("convnextv2_atto")
    x = _randn(2, 3, 64, 64, tag="x/cl")
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last))) for s in fm.stages for b in s.blocks]
    try:
        with torch.no_grad():
            y = fm(x)  # NCHW input
            y_cl = fm(x.contiguous(memory_format=torch.channels_last))
            feat = fm.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    assert seen and all(seen), "every block must receive channels_last activations"
    assert feat.is_contiguous(memory_format=torch.channels_last)
    # The input is converted to channels_last first, so both layouts compute the same thing.
    assert torch.equal(y, y_cl)
    # A model converted with .to(memory_format=channels_last) (4-D weights restrided,
    # 1x1 MLP kernels included) gives the same result.
    fm2 = fastvis.create_model("convnextv2_atto").eval()
    fm2.load_state_dict(tm.state_dict())
    fm2 = fm2.to(memory_format=torch.channels_last)
    assert fm2.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y2 = fm2(x.contiguous(memory_format=torch.channels_last))
    assert_close_scaled(y2, y, "channels_last model", rel=1e-6)
    with torch.no_grad():
        assert_close_scaled(y2, tm(x), "channels_last model vs timm")


def test_use_reference_gives_the_same_result():
    _, fm = pair("convnext_femto")
    x = _randn(2, 3, 64, 64, tag="x/ref")
    with torch.no_grad():
        y = fm(x)
        with fastvis.use_reference():
            y_ref = fm(x)
    assert not fastvis.reference_enabled()
    assert_close_scaled(y, y_ref, "kernels vs use_reference()")


@pytest.mark.parametrize("name, kw", [
    ("convnextv2_atto", dict(ls_init_value=1.0)),   # GRN + gamma, 1x1-conv storage
    ("convnext_atto", dict(conv_mlp=False)),        # gamma, Linear storage
])
def test_gradients_match_timm(name, kw):
    tm = timm_random(name, "grad/" + name, **kw).train()
    fm = fastvis.create_model(name, **kw).train()
    fm.load_state_dict(tm.state_dict(), strict=True)
    x = _randn(2, 3, 64, 32, tag="gx/" + name)  # non-square; the last stage is 2x1
    w = _randn(2, 1000, tag="gw/" + name)
    grads = []
    for model in (tm, fm):
        xi = x.clone().requires_grad_(True)
        (model(xi) * w).sum().backward()
        grads.append({"input": xi.grad, **{k: p.grad for k, p in model.named_parameters()}})
    ref, got = grads
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] is not None, f"no gradient reached {k}"
        assert_close_scaled(got[k], ref[k], f"{name} grad {k}")


# --------------------------------------------------------------------------- drop path


def test_drop_path_matches_timm_in_train_mode():
    # Same seed -> same per-sample Bernoulli draws as timm's DropPath, block by block.
    tm = timm_random("convnext_atto", "dp", drop_path_rate=0.5).train()
    fm = fastvis.create_model("convnext_atto", drop_path_rate=0.5).train()
    fm.load_state_dict(tm.state_dict(), strict=True)
    x = _randn(4, 3, 32, 32, tag="x/dp")
    torch.manual_seed(1234)
    ref = tm(x)
    torch.manual_seed(1234)
    got = fm(x)
    assert_close_scaled(got, ref, "train mode with drop_path 0.5")
    with torch.no_grad():
        assert (fm.eval()(x) - ref).abs().max() > 1e-2  # the drops did change the output


def test_drop_path_per_sample_statistics():
    """A block with drop_path p: each sample's residual branch is either dropped (exactly
    the input comes out) or kept and scaled by 1/keep; the kept count is Binomial(N, keep)
    and the expectation equals the eval-mode branch. Would fail if drop_scale were ignored
    (every branch kept, unscaled) or applied per batch or per element."""
    n, c, p = 512, 8, 0.3
    keep = 1.0 - p
    blk = fastvis.nn.ConvNeXtBlock(c, kernel_size=3, drop_path=p, ls_init_value=1.0)
    randomize_(blk, "blk")
    x = _randn(n, c, 4, 4, tag="x/blk")
    with torch.no_grad():
        branch = blk.eval()(x) - x            # eval: no dropping
        torch.manual_seed(99)
        r = blk.train()(x) - x
    b = branch.reshape(n, -1)
    r = r.reshape(n, -1)
    dropped = r.abs().amax(dim=1) == 0
    kept = ~dropped
    scale = b.abs().amax(dim=1, keepdim=True)
    assert bool((b.abs().amax(dim=1) > 0).all())
    # kept samples: exactly the branch times 1/keep (up to float rounding)
    assert ((r[kept] - b[kept] / keep).abs() <= 1e-5 * scale[kept]).all()
    # the kept count: Binomial(512, 0.7), mean 358.4, sd 10.4; 5 sd either way
    k = int(kept.sum())
    assert abs(k - n * keep) <= 5 * math.sqrt(n * keep * p), k
    # unbiased: the batch mean of the dropped/scaled branch estimates the branch mean;
    # each sample contributes b * B / keep with B ~ Bernoulli(keep), variance b^2 p / keep,
    # so the standard error of the mean is sqrt(sum b^2 * p / keep) / n; allow 6 of them.
    se = (b.pow(2).sum(dim=0) * p / keep).sqrt() / n
    assert ((r.mean(dim=0) - b.mean(dim=0)).abs() <= 6 * se).all()
    # eval mode and drop_path 0 never drop
    assert fastvis.nn.drop_path_scale(x, p, training=False) is None
    assert fastvis.nn.drop_path_scale(x, 0.0, training=True) is None
    all_dropped = fastvis.nn.drop_path_scale(x, 1.0, training=True)
    assert torch.equal(all_dropped, torch.zeros(n))


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize("name, out_indices", [
    ("convnext_atto", (0, 1, 2, 3)),
    ("convnextv2_nano", (1, 3)),
    ("convnext_femto", (0, 1)),
])
def test_features_only_matches_timm(name, out_indices):
    tfe = timm_random(name, "f/" + name, features_only=True, out_indices=out_indices).eval()
    ffe = fastvis.create_model(name, features_only=True, out_indices=out_indices).eval()
    # timm's FeatureListNet names (stem_0, stages_1) map onto the module paths
    ffe.load_state_dict(checkpoint_filter_fn(tfe.state_dict(), ffe), strict=True)
    assert ffe.feature_info.channels() == tfe.feature_info.channels()
    assert ffe.feature_info.reduction() == tfe.feature_info.reduction()
    assert ffe.feature_info.module_name() == tfe.feature_info.module_name()
    assert len(ffe.stages) == max(out_indices) + 1 and ffe.head is None
    x = _randn(2, 3, 32, 64, tag="x/f" + name)
    with torch.no_grad():
        got, ref = ffe(x), tfe(x)
    assert isinstance(got, list) and len(got) == len(ref) == len(out_indices)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_close_scaled(g, r, f"{name} feature {i}")
    with pytest.raises(RuntimeError, match="feature extractor"):
        ffe.forward_head(got[-1])


def test_features_only_negative_index_and_full_model_feature_info():
    fm = fastvis.create_model("convnext_atto", device="meta")
    assert fm.feature_info.channels() == [40, 80, 160, 320]
    assert fm.feature_info.reduction() == [4, 8, 16, 32]
    ffe = fastvis.create_model("convnext_atto", features_only=True, out_indices=(-1, -3), device="meta")
    assert ffe.out_indices == (1, 3) and ffe.feature_info.channels() == [80, 320]


# --------------------------------------------------------------------------- overrides


def test_overrides_match_timm():
    kw = dict(in_chans=1, kernel_sizes=(3, 5, 7, 9), patch_size=1, num_classes=7, ls_init_value=0.5)
    tm = timm_random("convnext_atto", "ovr", **kw).eval()
    fm = fastvis.create_model("convnext_atto", **kw).eval()
    fm.load_state_dict(tm.state_dict(), strict=True)
    assert fm.feature_info.reduction() == [1, 2, 4, 8]
    assert fm.stages[3].blocks[0].conv_dw.weight.shape == (320, 1, 9, 9)
    x = _randn(2, 1, 16, 16, tag="x/ovr")
    with torch.no_grad():
        y, ref = fm(x), tm(x)
    assert y.shape == (2, 7)
    assert_close_scaled(y, ref, "overrides")
    assert fm.pretrained_cfg["input_size"] == (1, 224, 224) and fm.pretrained_cfg["num_classes"] == 7


def test_patch_size_2_for_small_images():
    # fastvis: patch_size is the stem stride, stage 0 never downsamples (timm would add a
    # stride-2 downsample to stage 0 for patch_size 2; see ConvNeXt's docstring).
    fm = fastvis.create_model("convnext_atto", patch_size=2, num_classes=10).eval()
    assert fm.feature_info.reduction() == [2, 4, 8, 16]
    assert isinstance(fm.stages[0].downsample, nn.Identity)
    with torch.no_grad():
        feat = fm.forward_features(_randn(3, 3, 32, 32, tag="x/p2"))
        assert feat.shape == (3, 320, 2, 2)
        assert fm.forward_head(feat).shape == (3, 10)


def test_reset_classifier_and_headless():
    fm = fastvis.create_model("convnext_atto", num_classes=0).eval()
    x = _randn(2, 3, 32, 32, tag="x/head")
    with torch.no_grad():
        assert fm(x).shape == (2, 320)
        fm.reset_classifier(5)
        assert fm(x).shape == (2, 5)
    assert fm.num_classes == 5 and fm.pretrained_cfg["num_classes"] == 5
    assert fm.get_classifier().weight.shape == (5, 320)
    assert fm.default_cfg is fm.pretrained_cfg


def test_drop_rate_is_head_dropout():
    fm = fastvis.create_model("convnext_atto", drop_rate=0.5, device="meta")
    assert fm.head.drop.p == 0.5


# --------------------------------------------------------------------------- checkpoints


def _to_official(timm_sd):
    """The facebookresearch layout, written from its model definition independently of
    fastvis' mapping: explicit (timm suffix -> official suffix) pairs per block, and the
    stem / downsample / head renames."""
    block = {
        "conv_dw.weight": "dwconv.weight", "conv_dw.bias": "dwconv.bias",
        "norm.weight": "norm.weight", "norm.bias": "norm.bias",
        "mlp.fc1.weight": "pwconv1.weight", "mlp.fc1.bias": "pwconv1.bias",
        "mlp.fc2.weight": "pwconv2.weight", "mlp.fc2.bias": "pwconv2.bias",
        "mlp.grn.weight": "grn.gamma", "mlp.grn.bias": "grn.beta",
        "gamma": "gamma",
    }
    top = {
        "stem.0.weight": "downsample_layers.0.0.weight", "stem.0.bias": "downsample_layers.0.0.bias",
        "stem.1.weight": "downsample_layers.0.1.weight", "stem.1.bias": "downsample_layers.0.1.bias",
        "head.norm.weight": "norm.weight", "head.norm.bias": "norm.bias",
        "head.fc.weight": "head.weight", "head.fc.bias": "head.bias",
    }
    out = {}
    for k, v in timm_sd.items():
        if k in top:
            out[top[k]] = v
            continue
        parts = k.split(".")
        i = parts[1]
        if parts[2] == "downsample":  # stages.i.downsample.j.p -> downsample_layers.i.j.p
            out[f"downsample_layers.{i}.{parts[3]}.{parts[4]}"] = v
            continue
        assert parts[2] == "blocks", k
        j, suffix = parts[3], ".".join(parts[4:])
        name = block[suffix]
        if name in ("pwconv1.weight", "pwconv2.weight"):
            v = v.reshape(v.shape[0], v.shape[1])  # official: nn.Linear
        elif name.startswith("grn."):
            v = v.reshape(1, 1, 1, -1)  # official GRN parameters are (1, 1, 1, C)
        out[f"stages.{i}.{j}.{name}"] = v
    return out


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_checkpoint_filter_official_layout(name):
    tm, _ = pair(name)
    official = _to_official(tm.state_dict())
    # spot checks that the synthetic checkpoint has the official shapes
    assert official["stages.1.0.pwconv1.weight"].shape == (320, 80)
    assert official["downsample_layers.2.1.weight"].shape == (160, 80, 2, 2)
    if name.startswith("convnextv2"):
        assert official["stages.3.1.grn.gamma"].shape == (1, 1, 1, 1280)
        assert not any(k.endswith("gamma") and ".grn." not in k for k in official)
    else:
        assert official["stages.0.0.gamma"].shape == (40,)
    fm = fastvis.create_model(name).eval()
    fm.load_state_dict(checkpoint_filter_fn({"model": official}, fm), strict=True)
    fsd = fm.state_dict()
    for k, v in tm.state_dict().items():
        assert torch.equal(fsd[k], v), k
    # the same checkpoint in the Linear storage form (conv_mlp=False) also loads
    fl = fastvis.create_model(name, conv_mlp=False)
    fl.load_state_dict(checkpoint_filter_fn(official, fl), strict=True)
    assert torch.equal(fl.stages[1].blocks[0].mlp.fc1.weight, official["stages.1.0.pwconv1.weight"])


def test_checkpoint_filter_timm_wrappers_and_prefixes():
    tm, _ = pair("convnext_atto")
    sd = tm.state_dict()
    fm = fastvis.create_model("convnext_atto")
    for wrapped in ({"state_dict": {"module." + k: v for k, v in sd.items()}},
                    {"model": {"model." + k: v for k, v in sd.items()}},
                    dict(sd)):
        out = checkpoint_filter_fn(wrapped, fm)
        assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)
    # unknown keys are not silently dropped: a strict load names them
    bad = dict(sd, extra=torch.zeros(1))
    with pytest.raises(RuntimeError, match="extra"):
        fm.load_state_dict(checkpoint_filter_fn(bad, fm), strict=True)


def test_pretrained_from_files_and_caches(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    tm, _ = pair("convnextv2_atto")
    sd = {k: v.contiguous() for k, v in tm.state_dict().items()}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # Hugging Face hub cache, timm's repository and file names
    snap = tmp_path / "hf" / "models--timm--convnextv2_atto.fcmae_ft_in1k" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    save_file(sd, str(snap / "model.safetensors"))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    m = fastvis.create_model("convnextv2_atto", pretrained=True)
    msd = m.state_dict()
    assert all(torch.equal(msd[k], v) for k, v in sd.items())
    assert m.pretrained_cfg["file"].endswith("model.safetensors")
    # another tag is looked up under its own name
    with pytest.raises(FileNotFoundError, match="convnextv2_atto.other_tag"):
        fastvis.create_model("convnextv2_atto.other_tag", pretrained=True)

    # an official checkpoint file ({'model': ...}) through pretrained_path
    path = tmp_path / "convnextv2_atto_1k_224_ema.pt"
    torch.save({"model": _to_official(sd)}, str(path))
    m2 = fastvis.create_model("convnextv2_atto", pretrained_path=str(path), num_classes=10, in_chans=1)
    msd = m2.state_dict()
    for k, v in sd.items():
        if k.startswith("head.fc."):
            assert msd[k].shape[0] == 10  # another classifier size: left freshly initialised
        elif k == "stem.0.weight":
            torch.testing.assert_close(msd[k], v.sum(dim=1, keepdim=True))  # timm's in_chans=1 rule
        else:
            assert torch.equal(msd[k], v), k

    # the torch.hub cache, under the file name of timm's legacy URL
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(sd, str(ckpt / "convnextv2_atto_1k_224_ema.pt"))
    m3 = fastvis.create_model("convnextv2_atto", pretrained=True, features_only=True, out_indices=(2,))
    assert torch.equal(m3.stages[2].blocks[0].mlp.grn.weight, sd["stages.2.blocks.0.mlp.grn.weight"])
    assert len(m3.stages) == 3


# --------------------------------------------------------------------------- block


@pytest.mark.parametrize("conv_mlp, use_grn, ls, k", [
    (False, False, 1e-6, 7), (True, True, None, 5), (True, False, 0.5, 3), (False, True, 1.0, 9)])
def test_block_matches_timm_block(conv_mlp, use_grn, ls, k):
    from timm.models.convnext import ConvNeXtBlock as TimmBlock

    c = 24
    tb = randomize_(TimmBlock(c, kernel_size=k, conv_mlp=conv_mlp, use_grn=use_grn, ls_init_value=ls),
                    f"blk{k}").eval()
    fb = fastvis.nn.ConvNeXtBlock(c, kernel_size=k, conv_mlp=conv_mlp, use_grn=use_grn, ls_init_value=ls).eval()
    assert _shapes(fb.state_dict()) == _shapes(tb.state_dict())
    fb.load_state_dict(tb.state_dict(), strict=True)
    x = _randn(2, c, 9, 11, tag=f"x/blk{k}")
    with torch.no_grad():
        assert_close_scaled(fb(x) - x, tb(x) - x, "block residual branch")


def test_block_init_and_errors():
    b = fastvis.nn.ConvNeXtBlock(16, use_grn=True, ls_init_value=None)
    assert b.gamma is None and torch.equal(b.mlp.grn.weight, torch.zeros(64))
    assert torch.equal(b.norm.weight, torch.ones(16)) and torch.equal(b.mlp.fc1.bias, torch.zeros(64))
    assert 0.005 < b.mlp.fc1.weight.std() < 0.03  # trunc_normal(std=0.02)
    b1 = fastvis.nn.ConvNeXtBlock(16)
    assert torch.equal(b1.gamma, torch.full((16,), 1e-6)) and b1.mlp.grn is None
    with pytest.raises(ValueError, match="odd"):
        fastvis.nn.ConvNeXtBlock(16, kernel_size=4)
    with pytest.raises(ValueError, match="out_chs"):
        fastvis.nn.ConvNeXtBlock(16, out_chs=32)
    with pytest.raises(ValueError, match="drop_path"):
        fastvis.nn.ConvNeXtBlock(16, drop_path=-0.1)


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_block_inference_passes_a_kmajor_fc2_that_follows_the_parameter(monkeypatch, conv_mlp):
    """Eval with nothing needing gradients: the block hands the fused op fc2's weight
    k-major (strides (1, C), cached); an in-place change of the parameter reaches the next
    call; with gradients the parameter itself goes in (and gets its gradient)."""
    import importlib
    op = importlib.import_module("fastvis.ops.convnext_block")._cb_fwd
    seen = []
    real = op.fastvis_impl  # the fused kernel's entry (fc2_weight is its 8th argument)
    monkeypatch.setattr(op, "fastvis_impl", lambda *a, **k: (seen.append(a[7]), real(*a, **k))[1])
    torch.manual_seed(3)
    blk = fastvis.nn.ConvNeXtBlock(32, conv_mlp=conv_mlp, ls_init_value=0.5).eval()
    x = torch.randn(2, 32, 7, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y0 = blk(x)
        assert seen[-1].stride() == (1, 32)
        assert torch.equal(seen[-1], blk.mlp.fc2.weight.reshape(32, 128))
        blk.mlp.fc2.weight.mul_(-2.0)
        y1 = blk(x)
        assert torch.equal(seen[-1], blk.mlp.fc2.weight.reshape(32, 128))
        with fastvis.use_reference(True):
            ref = blk(x)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    blk(x).sum().backward()
    assert seen[-1].stride() == (128, 1) and blk.mlp.fc2.weight.grad is not None


def test_eval_stage_runs_its_blocks_in_one_core_call(monkeypatch):
    """Eval inference: each stage's ConvNeXt blocks go to the core in one
    convnext_block_forward_chain call, with the bits of block-by-block calls; a forward hook
    on a block (or on the stage's Sequential) keeps the per-block path, so the hook runs."""
    from fastvis import _C
    torch.manual_seed(0)
    m = fastvis.create_model("convnext_atto").eval()
    x = torch.randn(2, 3, 64, 64)
    chains = []
    real = _C.convnext_block_forward_chain
    monkeypatch.setattr(_C, "convnext_block_forward_chain",
                        lambda x, blocks, ys: (chains.append(len(blocks)), real(x, blocks, ys))[1])
    with torch.no_grad():
        y = m(x)
        assert chains == list(m.depths)
        seen = []
        h = m.stages[1].blocks[0].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
        y_hooked = m(x)
        h.remove()
        assert seen == [torch.Size([2, 80, 8, 8])]
        assert chains == list(m.depths) + [m.depths[0], m.depths[2], m.depths[3]]  # stage 1 per block
        with fastvis.use_reference(True):
            ref = m(x)
    assert torch.equal(y, y_hooked)
    assert_close_scaled(y, ref, "chained stages vs reference")


def test_block_chain_rejects_bad_arguments():
    from fastvis import _C
    from fastvis.ops.convnext_block import PreparedConvNeXtBlock, convnext_block_chain
    torch.manual_seed(1)
    blk = fastvis.nn.ConvNeXtBlock(16).eval()
    x = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    p = PreparedConvNeXtBlock(x, blk.conv_dw.weight, blk.conv_dw.bias, blk.norm.weight, blk.norm.bias,
                              blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight, blk.mlp.fc2.bias,
                              blk.gamma)
    with torch.no_grad():
        want = blk(blk(x))
        assert torch.equal(convnext_block_chain(x, [p, p]), want)
        assert torch.equal(convnext_block_chain(x.contiguous(), [p, p]), want.contiguous())
    entry = (list(p.core_ws), 1e-6, False, 1e-6)
    with pytest.raises(ValueError, match="one output per block"):
        _C.convnext_block_forward_chain(x, [entry, entry], [torch.empty_like(x)])
    with pytest.raises(ValueError, match="expected \\(weights, eps"):
        _C.convnext_block_forward_chain(x, [entry[:2]], [torch.empty_like(x)])
    with pytest.raises(ValueError, match="must not overlap x"):
        _C.convnext_block_forward_chain(x, [entry], [x])
