"""UniRepLKNet and RepLKNet (fastvis.models), their modules and fastvis.reparameterize.

Oracles:
* the official key layouts, written below as data (names and shapes per block, read off
  the official ``unireplknet.py`` / ``replknet.py``; no official code is imported), and the
  parameter counts the papers report;
* the training form itself: ``fastvis.reparameterize`` must give the same outputs in eval
  mode, with every parameter and BatchNorm statistic randomised (fresh models have
  BN = identity, zero GRN and layer scale 1e-6, which would hide fusion mistakes);
* an explicit PyTorch formula of the Dilated Reparam Block (F.conv2d + F.batch_norm per
  branch), and the PyTorch references of the fastvis ops (``fastvis.use_reference``).

Tolerance of the float32 comparisons: max |a - b| <= 1e-5 * max |b|. The deploy form sums
the branch kernels before convolving (and folds BN / layer scale into the weights), so the
two forms round differently: per output a dot product of at most 13*13 (31*31 for RepLKNet)
taps, ~sqrt(L) * 6e-8 relative each, through up to 36 blocks in the residual stream
(measured: ~5e-7 relative). A wrong fusion (a BN statistic, a branch, the GRN bias
projection, the layer scale, a kernel off-centre by one tap) moves outputs by 1e-2 or more.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastvis
import fastvis.nn
from fastvis.models import PretrainedWeightsNotFound
from fastvis.models.replknet import load_checkpoint as load_replknet
from fastvis.models.unireplknet import load_checkpoint as load_unireplknet
from fastvis.nn.reparam import dilate_kernel, pad_kernel_to

REL = 1e-5  # see the module docstring

# --------------------------------------------------------------------------- facts (data)

# From the official unireplknet.py: dims / depths per variant; DilatedReparamBlock's table
# (large kernel -> branch kernel sizes and dilations); default kernel sizes per depths.
UNI_VARIANTS = {
    "unireplknet_a": ((40, 80, 160, 320), (2, 2, 6, 2)),
    "unireplknet_f": ((48, 96, 192, 384), (2, 2, 6, 2)),
    "unireplknet_p": ((64, 128, 256, 512), (2, 2, 6, 2)),
    "unireplknet_n": ((80, 160, 320, 640), (2, 2, 8, 2)),
    "unireplknet_t": ((80, 160, 320, 640), (3, 3, 18, 3)),
    "unireplknet_s": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "unireplknet_b": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "unireplknet_l": ((192, 384, 768, 1536), (3, 3, 27, 3)),
    "unireplknet_xl": ((256, 512, 1024, 2048), (3, 3, 27, 3)),
}
DIL_TABLE = {
    17: ([5, 9, 3, 3, 3], [1, 2, 4, 5, 7]),
    15: ([5, 7, 3, 3, 3], [1, 2, 3, 5, 7]),
    13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]),
    11: ([5, 5, 3, 3, 3], [1, 2, 3, 4, 5]),
    9: ([5, 5, 3, 3], [1, 2, 3, 4]),
    7: ([5, 3, 3], [1, 2, 3]),
    5: ([3, 3], [1, 2]),
}
UNI_KERNELS = {
    (2, 2, 6, 2): [[3] * 2, [13] * 2, [13] * 6, [13] * 2],
    (2, 2, 8, 2): [[3] * 2, [13] * 2, [13] * 8, [13] * 2],
    (3, 3, 18, 3): [[3] * 3, [13] * 3, [13, 3] * 9, [13] * 3],
    (3, 3, 27, 3): [[3] * 3, [13] * 3, [13, 3, 3] * 9, [13] * 3],
}
# From the official replknet.py (create_RepLKNet31B / 31L / XL).
REP_VARIANTS = {
    "replknet_31b": dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                         channels=(128, 256, 512, 1024), small_kernel=5, dw_ratio=1),
    "replknet_31l": dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                         channels=(192, 384, 768, 1536), small_kernel=5, dw_ratio=1),
    "replknet_xl": dict(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2),
                        channels=(256, 512, 1024, 2048), small_kernel=None, dw_ratio=1.5),
}
# Parameter counts in the papers (millions, as printed; deploy form).
PAPER_PARAMS_M = {
    "unireplknet_a": 4.4, "unireplknet_f": 6.2, "unireplknet_p": 10.7, "unireplknet_n": 18.3,
    "unireplknet_t": 31, "unireplknet_s": 56, "unireplknet_b": 98, "unireplknet_l": 218,
    "unireplknet_xl": 386, "replknet_31b": 79, "replknet_31l": 172, "replknet_xl": 335,
}
ALL_NAMES = sorted(list(UNI_VARIANTS) + list(REP_VARIANTS))

BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _bn(prefix, c):
    return {f"{prefix}.{n}": (() if n == "num_batches_tracked" else (c,)) for n in BN}


def uni_block_keys(p, c, k, deploy):
    """The official UniRepLKNetBlock's state-dict entries (name -> shape), dim c, kernel k."""
    f = 4 * c
    d = {}
    if k >= 7:
        d[f"{p}.dwconv.lk_origin.weight"] = (c, 1, k, k)
        if deploy:
            d[f"{p}.dwconv.lk_origin.bias"] = (c,)
        else:
            d.update(_bn(f"{p}.dwconv.origin_bn", c))
            for kk, r in zip(*DIL_TABLE[k]):
                d[f"{p}.dwconv.dil_conv_k{kk}_{r}.weight"] = (c, 1, kk, kk)
                d.update(_bn(f"{p}.dwconv.dil_bn_k{kk}_{r}", c))
    else:
        d[f"{p}.dwconv.weight"] = (c, 1, k, k)
        if deploy:
            d[f"{p}.dwconv.bias"] = (c,)
    if not deploy:
        d.update(_bn(f"{p}.norm", c))
    d.update({f"{p}.se.down.weight": (c // 4, c, 1, 1), f"{p}.se.down.bias": (c // 4,),
              f"{p}.se.up.weight": (c, c // 4, 1, 1), f"{p}.se.up.bias": (c,),
              f"{p}.pwconv1.1.weight": (f, c), f"{p}.pwconv1.1.bias": (f,),
              f"{p}.act.1.gamma": (1, 1, 1, f), f"{p}.pwconv2.0.weight": (c, f)})
    if deploy:
        d[f"{p}.pwconv2.0.bias"] = (c,)
    else:
        d[f"{p}.act.1.beta"] = (1, 1, 1, f)
        d.update(_bn(f"{p}.pwconv2.2", c))
        d[f"{p}.gamma"] = (c,)
    return d


def uni_keys(dims, depths, deploy, in_chans=3, num_classes=1000, kernels=None):
    kernels = kernels or UNI_KERNELS[tuple(depths)]
    d = {"downsample_layers.0.0.weight": (dims[0] // 2, in_chans, 3, 3), "downsample_layers.0.0.bias": (dims[0] // 2,),
         "downsample_layers.0.1.weight": (dims[0] // 2,), "downsample_layers.0.1.bias": (dims[0] // 2,),
         "downsample_layers.0.3.weight": (dims[0], dims[0] // 2, 3, 3), "downsample_layers.0.3.bias": (dims[0],),
         "downsample_layers.0.4.weight": (dims[0],), "downsample_layers.0.4.bias": (dims[0],)}
    for i in range(1, len(dims)):
        d.update({f"downsample_layers.{i}.0.weight": (dims[i], dims[i - 1], 3, 3),
                  f"downsample_layers.{i}.0.bias": (dims[i],),
                  f"downsample_layers.{i}.1.weight": (dims[i],), f"downsample_layers.{i}.1.bias": (dims[i],)})
    for i, n in enumerate(depths):
        for j in range(n):
            d.update(uni_block_keys(f"stages.{i}.{j}", dims[i], kernels[i][j], deploy))
    d.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],),
              "head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)})
    return d


def _convbn(p, cin, cout, k, dw=False):
    return {f"{p}.conv.weight": (cout, 1 if dw else cin, k, k), **_bn(f"{p}.bn", cout)}


def rep_keys(large_kernel_sizes, layers, channels, small_kernel, dw_ratio, deploy, in_chans=3, num_classes=1000):
    """The official RepLKNet's state-dict entries (name -> shape)."""
    c0 = channels[0]
    d = {**_convbn("stem.0", in_chans, c0, 3), **_convbn("stem.1", c0, c0, 3, dw=True),
         **_convbn("stem.2", c0, c0, 1), **_convbn("stem.3", c0, c0, 3, dw=True)}
    for i, (k, n, c) in enumerate(zip(large_kernel_sizes, layers, channels)):
        dw = int(c * dw_ratio)
        for j in range(n):
            p = f"stages.{i}.blocks.{2 * j}"
            d.update(_bn(f"{p}.prelkb_bn", c))
            d.update(_convbn(f"{p}.pw1", c, dw, 1))
            d.update(_convbn(f"{p}.pw2", dw, c, 1))
            if deploy:
                d[f"{p}.large_kernel.lkb_reparam.weight"] = (dw, 1, k, k)
                d[f"{p}.large_kernel.lkb_reparam.bias"] = (dw,)
            else:
                d.update(_convbn(f"{p}.large_kernel.lkb_origin", dw, dw, k, dw=True))
                if small_kernel is not None:
                    d.update(_convbn(f"{p}.large_kernel.small_conv", dw, dw, small_kernel, dw=True))
            p = f"stages.{i}.blocks.{2 * j + 1}"
            d.update(_bn(f"{p}.preffn_bn", c))
            d.update(_convbn(f"{p}.pw1", c, 4 * c, 1))
            d.update(_convbn(f"{p}.pw2", 4 * c, c, 1))
        if i < len(layers) - 1:
            d.update(_convbn(f"transitions.{i}.0", c, channels[i + 1], 1))
            d.update(_convbn(f"transitions.{i}.1", channels[i + 1], channels[i + 1], 3, dw=True))
    d.update(_bn("norm", channels[-1]))
    d.update({"head.weight": (num_classes, channels[-1]), "head.bias": (num_classes,)})
    return d


def expected_keys(name, deploy):
    if name in UNI_VARIANTS:
        dims, depths = UNI_VARIANTS[name]
        return uni_keys(dims, depths, deploy)
    return rep_keys(**REP_VARIANTS[name], deploy=deploy)


# Small configurations with the real structures (kernel tables, every block type).
UNI_SMALL = dict(dims=(8, 16, 24, 32), depths=(2, 2, 3, 2),
                 kernel_sizes=((3, 5), (7, 9), (11, 13, 15), (17, 0)))
UNI_SMALL_DEEP = dict(dims=(8, 8, 16, 16), depths=(3, 3, 27, 3))  # S/B/L/XL's default kernel table
REP_SMALL = dict(large_kernel_sizes=(31, 29, 27, 13), layers=(1, 1, 2, 1), channels=(8, 16, 16, 24),
                 small_kernel=5)
REP_SMALL_XL = dict(large_kernel_sizes=(27, 27, 27, 13), layers=(1, 1, 2, 1), channels=(8, 8, 16, 16),
                    small_kernel=None, dw_ratio=1.5)


# --------------------------------------------------------------------------- helpers


def _gen(tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@torch.no_grad()
def randomize_(model: nn.Module, tag: str) -> nn.Module:
    """Every parameter and BN statistic random, at scales that keep a deep net's activations
    O(1): weights ~ N(0, 1/fan_in), norm weights ~ U(0.5, 1.5), biases ~ N(0, 0.1), running
    variances ~ U(0.5, 2), GRN gamma/beta ~ N(0, 0.5), layer scales ~ U(0.3, 1)."""
    g = _gen(tag)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(".gamma") and p.dim() == 1:  # layer scale
            p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
        elif leaf in ("gamma", "beta"):  # GRN
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif leaf == "weight" and p.dim() == 1:  # BN / LN
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif leaf == "bias":
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=g) * 1.5 + 0.5)
    return model


def random_state_dict(keys, tag):
    """A state dict with the given names and shapes, random values (BN variances > 0)."""
    g = _gen(tag)
    sd = {}
    for k, s in keys.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(s, generator=g) + 0.5
        elif k.endswith(".gamma") and len(s) == 1:
            sd[k] = torch.rand(s, generator=g) * 0.7 + 0.3
        else:
            fan_in = max(1, math.prod(s[1:])) if len(s) > 1 else 1
            sd[k] = torch.randn(s, generator=g) / math.sqrt(fan_in) if len(s) > 1 else torch.randn(s, generator=g) * 0.3
        if k.endswith(".weight") and len(s) == 1:
            sd[k] = sd[k].abs() + 0.5
    return sd


def assert_close_scaled(got, ref, what, rel=REL):
    scale = ref.abs().max().item()
    assert scale > 1e-3, f"{what}: reference output is degenerate (max {scale})"
    err = (got - ref).abs().max().item()
    assert err <= rel * scale, f"{what}: max |diff| {err:.3e} > {rel} * {scale:.3e}"


def _x(n, c, s, tag):
    return torch.randn(n, c, s, s, generator=_gen(tag))


# --------------------------------------------------------------------------- registry, layout


def test_registered_names():
    assert fastvis.list_models("unireplknet_*") == sorted(UNI_VARIANTS)
    assert fastvis.list_models("replknet_*") == sorted(REP_VARIANTS)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_official_key_layout_training_and_deploy(name):
    """Every registered model (on the meta device: no memory, no init) has exactly the
    official keys and shapes, in both forms."""
    for deploy in (False, True):
        m = fastvis.create_model(name, device="meta", deploy=deploy)
        assert shapes(m.state_dict()) == expected_keys(name, deploy), (name, deploy)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_parameter_counts_match_the_papers(name):
    m = fastvis.create_model(name, device="meta", deploy=True)
    count = sum(p.numel() for p in m.parameters()) / 1e6
    paper = PAPER_PARAMS_M[name]
    unit = 0.1 if paper < 20 else 1.0  # the papers print one decimal below 20M
    assert abs(count - paper) <= 0.6 * unit, (name, count, paper)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_reparameterize_gives_the_deploy_layout(name):
    """fastvis.reparameterize of the training form has exactly create_model(deploy=True)'s
    keys and shapes (meta device: the fusion arithmetic runs on shapes only)."""
    m = fastvis.create_model(name, device="meta")
    assert not m.deploy
    assert fastvis.reparameterize(m) is m
    assert m.deploy
    assert shapes(m.state_dict()) == shapes(fastvis.create_model(name, device="meta", deploy=True).state_dict())


# --------------------------------------------------------------------------- equivalence


def _check_reparam(model, x, what, deploy_twin=None):
    model.eval()
    with torch.no_grad():
        ref = model(x)
        fastvis.reparameterize(model)
        got = model(x)
    assert_close_scaled(got, ref, what)
    if deploy_twin is not None:  # the reparameterized state dict is a valid deploy-form one
        deploy_twin.load_state_dict(model.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(deploy_twin.eval()(x), got)
    return ref


def test_reparam_equivalence_unireplknet_a():
    m = randomize_(fastvis.create_model("unireplknet_a"), "uni-a")
    twin = fastvis.create_model("unireplknet_a", deploy=True)
    x = _x(2, 3, 32, "x-uni-a").contiguous(memory_format=torch.channels_last)
    _check_reparam(m, x, "unireplknet_a", twin)


@pytest.mark.parametrize("cfg", [UNI_SMALL, UNI_SMALL_DEEP], ids=["all-kernels", "sblxl-table"])
def test_reparam_equivalence_unireplknet_small(cfg):
    m = randomize_(fastvis.models.UniRepLKNet(num_classes=10, **cfg), f"uni-{cfg['depths']}")
    twin = fastvis.models.UniRepLKNet(num_classes=10, deploy=True, **cfg)
    _check_reparam(m, _x(2, 3, 64, "x-uni-small"), f"UniRepLKNet{cfg}", twin)


@pytest.mark.parametrize("cfg", [REP_SMALL, REP_SMALL_XL], ids=["31x31+5x5", "xl-no-small"])
def test_reparam_equivalence_replknet_small(cfg):
    m = randomize_(fastvis.models.RepLKNet(num_classes=10, **cfg), f"rep-{cfg['channels']}")
    twin = fastvis.models.RepLKNet(num_classes=10, deploy=True, **cfg)
    _check_reparam(m, _x(2, 3, 64, "x-rep-small"), f"RepLKNet{cfg}", twin)


@pytest.mark.parametrize("k", sorted(DIL_TABLE))
def test_dilated_block_against_explicit_formula(k):
    """Training form == sum over branches of F.batch_norm(F.conv2d(dilated)) (eval and
    train mode), and the deploy form == one F.conv2d with the merged kernel."""
    c = 6
    blk = randomize_(fastvis.nn.DilatedReparamBlock(c, k), f"drb{k}")
    x = _x(2, c, 23, f"x-drb{k}")

    def formula(training):
        pairs = [(blk.lk_origin.weight, 1, blk.origin_bn)]
        for kk, r in zip(*DIL_TABLE[k]):
            pairs.append((getattr(blk, f"dil_conv_k{kk}_{r}").weight, r, getattr(blk, f"dil_bn_k{kk}_{r}")))
        out = 0
        for w, r, bn in pairs:
            y = F.conv2d(x, w, None, 1, r * (w.shape[-1] - 1) // 2, r, groups=c)
            out = out + F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias,
                                     training, 0.0, bn.eps)
        return out

    assert [getattr(blk, f"dil_conv_k{kk}_{r}").dilation for kk, r in zip(*DIL_TABLE[k])] == \
        [(r, r) for r in DIL_TABLE[k][1]]
    with torch.no_grad():
        blk.train()
        assert_close_scaled(blk(x), formula(True), f"k={k} train")
        blk.eval()
        ref = formula(False)
        assert_close_scaled(blk(x), ref, f"k={k} eval")
        blk.reparameterize()
        assert sorted(dict(blk.named_parameters())) == ["lk_origin.bias", "lk_origin.weight"]
        merged = F.conv2d(x, blk.lk_origin.weight, blk.lk_origin.bias, 1, k // 2, 1, groups=c)
        assert_close_scaled(merged, ref, f"k={k} merged kernel")


def _bn_eval(y, bn):
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _grn_formula(x, gamma, beta):  # the official GRN on (N, H, W, C)
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    return (gamma * nx + 1) * x + (0 if beta is None else beta)


@pytest.mark.parametrize("k", [13, 3])
def test_unireplknet_block_against_the_official_formula(k):
    """The block's training form (eval mode) against its formula written with plain torch
    ops: dwconv (branches) -> BN -> SE -> Linear -> GELU -> GRN -> Linear -> BN -> gamma,
    plus the input; and the GRN against the official one directly."""
    c = 8
    blk = randomize_(fastvis.nn.UniRepLKNetBlock(c, k), f"blk{k}").eval()
    x = _x(2, c, 11, f"x-blk{k}")
    with torch.no_grad():
        if k >= 7:
            y = _bn_eval(F.conv2d(x, blk.dwconv.lk_origin.weight, None, 1, k // 2, 1, c), blk.dwconv.origin_bn)
            for kk, r in zip(*DIL_TABLE[k]):
                conv = getattr(blk.dwconv, f"dil_conv_k{kk}_{r}")
                y = y + _bn_eval(F.conv2d(x, conv.weight, None, 1, r * (kk - 1) // 2, r, c),
                                 getattr(blk.dwconv, f"dil_bn_k{kk}_{r}"))
        else:
            y = F.conv2d(x, blk.dwconv.weight, None, 1, k // 2, 1, c)
        y = _bn_eval(y, blk.norm)
        s = F.adaptive_avg_pool2d(y, 1)
        s = torch.sigmoid(F.conv2d(F.relu(F.conv2d(s, blk.se.down.weight, blk.se.down.bias)),
                                   blk.se.up.weight, blk.se.up.bias))
        y = (y * s).permute(0, 2, 3, 1)
        y = F.linear(y, blk.pwconv1[1].weight, blk.pwconv1[1].bias)
        y = _grn_formula(F.gelu(y), blk.act[1].gamma, blk.act[1].beta)
        y = F.linear(y, blk.pwconv2[0].weight).permute(0, 3, 1, 2)
        ref = x + _bn_eval(y, blk.pwconv2[2]) * blk.gamma.view(1, -1, 1, 1)
        assert_close_scaled(blk(x), ref, f"UniRepLKNetBlock k={k}")
        h = torch.randn(2, 5, 6, 32, generator=_gen("grn"))
        grn = randomize_(fastvis.nn.UniRepLKNetGRN(32), "grn")
        assert_close_scaled(grn(h), _grn_formula(h, grn.gamma, grn.beta), "GRN")


def test_replknet_blocks_against_the_official_formula():
    c, d = 8, 12
    blk = randomize_(fastvis.nn.RepLKBlock(c, d, 13, 5), "rlk").eval()
    ffn = randomize_(fastvis.nn.ConvFFN(c, 4 * c, c), "ffn").eval()
    x = _x(2, c, 15, "x-rlk")

    def convbn(t, m, stride=1, pad=0, groups=1):
        return _bn_eval(F.conv2d(t, m.conv.weight, None, stride, pad, 1, groups), m.bn)

    with torch.no_grad():
        y = F.relu(convbn(_bn_eval(x, blk.prelkb_bn), blk.pw1))
        lk = blk.large_kernel
        y = F.relu(convbn(y, lk.lkb_origin, pad=6, groups=d) + convbn(y, lk.small_conv, pad=2, groups=d))
        assert_close_scaled(blk(x), x + convbn(y, blk.pw2), "RepLKBlock")
        y = convbn(F.gelu(convbn(_bn_eval(x, ffn.preffn_bn), ffn.pw1)), ffn.pw2)
        assert_close_scaled(ffn(x), x + y, "ConvFFN")


def test_kernel_expansion_helpers():
    w = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    d = dilate_kernel(w, 2)
    assert d.shape == (1, 1, 5, 5)
    assert torch.equal(d[0, 0, ::2, ::2], w[0, 0])
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[::2, ::2] = False
    assert torch.all(d[0, 0][mask] == 0)
    p = pad_kernel_to(d, 9)
    assert p.shape == (1, 1, 9, 9) and torch.equal(p[0, 0, 2:7, 2:7], d[0, 0]) and p.sum() == d.sum()
    with pytest.raises(ValueError, match="odd square kernel"):
        pad_kernel_to(torch.zeros(1, 1, 4, 4), 9)
    with pytest.raises(ValueError, match="odd square kernel"):
        pad_kernel_to(torch.zeros(1, 1, 11, 11), 9)


def test_replk_block_small_kernel_is_centred():
    """The merged RepLKNet kernel: the small kernel lands at the centre of the large one."""
    m = fastvis.nn.ReparamLargeKernelConv(4, 7, 3).eval()
    with torch.no_grad():
        for bn in (m.lkb_origin.bn, m.small_conv.bn):  # identity BNs (eps aside)
            bn.running_var.fill_(1 - bn.eps)
        m.lkb_origin.conv.weight.zero_()
        m.small_conv.conv.weight.copy_(torch.arange(36.0).view(4, 1, 3, 3))
        m.small_conv.bn.bias.fill_(0.5)
        w, b = m.get_equivalent_kernel_bias()
    assert [c for c, _ in m.branch_modules()] == [m.lkb_origin.conv, m.small_conv.conv]
    assert torch.allclose(w[:, :, 2:5, 2:5], m.small_conv.conv.weight)
    assert w.abs().sum() == w[:, :, 2:5, 2:5].abs().sum()
    assert torch.allclose(b, torch.full((4,), 0.5))


# --------------------------------------------------------------------------- state dicts


def test_unireplknet_official_training_and_deploy_state_dicts():
    """A training-form official state dict loads strictly; reparameterize() gives exactly the
    deploy keys; the official deploy-form state dict loads strictly into deploy=True and
    into a training-form model through load_checkpoint (which switches it to deploy)."""
    keys = expected_keys("unireplknet_a", False)
    sd = random_state_dict(keys, "sd-uni-a")
    m = fastvis.create_model("unireplknet_a")
    m.load_state_dict(sd, strict=True)
    m2 = load_unireplknet(fastvis.create_model("unireplknet_a"), {"model": {"module." + k: v for k, v in sd.items()}})
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in sd.items())
    fastvis.reparameterize(m)
    deploy = fastvis.create_model("unireplknet_a", deploy=True)
    assert list(m.state_dict()) == list(deploy.state_dict())
    assert shapes(m.state_dict()) == expected_keys("unireplknet_a", True)
    dsd = m.state_dict()
    deploy.load_state_dict(dsd, strict=True)
    fresh = load_unireplknet(fastvis.create_model("unireplknet_a"), dsd)
    assert fresh.deploy and all(torch.equal(fresh.state_dict()[k], v) for k, v in dsd.items())
    with pytest.raises(ValueError, match="training-form checkpoint"):
        load_unireplknet(fastvis.create_model("unireplknet_a", deploy=True), sd)


def test_replknet_official_training_and_deploy_state_dicts():
    keys = rep_keys(**REP_SMALL, dw_ratio=1, deploy=False, num_classes=10)
    sd = random_state_dict(keys, "sd-rep")
    m = fastvis.models.RepLKNet(num_classes=10, **REP_SMALL)
    m.load_state_dict(sd, strict=True)
    x = _x(1, 3, 64, "x-rep-sd")
    m.eval()
    with torch.no_grad():
        ref = m(x)
    fastvis.reparameterize(m)
    deploy = fastvis.models.RepLKNet(num_classes=10, deploy=True, **REP_SMALL).eval()
    assert list(m.state_dict()) == list(deploy.state_dict())
    assert shapes(m.state_dict()) == rep_keys(**REP_SMALL, dw_ratio=1, deploy=True, num_classes=10)
    deploy.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert_close_scaled(deploy(x), ref, "RepLKNet deploy from the official training state dict")
    fresh = load_replknet(fastvis.models.RepLKNet(num_classes=10, **REP_SMALL), {"state_dict": m.state_dict()})
    assert fresh.deploy
    with pytest.raises(ValueError, match="training-form checkpoint"):
        load_replknet(fastvis.models.RepLKNet(num_classes=10, deploy=True, **REP_SMALL), sd)


def test_pretrained_from_local_files_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(PretrainedWeightsNotFound, match="never downloads"):
        fastvis.create_model("unireplknet_a", pretrained=True)
    with pytest.raises(PretrainedWeightsNotFound, match="never downloads"):
        fastvis.create_model("replknet_xl", pretrained=True)
    src = randomize_(fastvis.create_model("unireplknet_a", num_classes=7), "pre")
    # the official file name in the torch.hub cache is found
    ckdir = tmp_path / "torch" / "hub" / "checkpoints"
    ckdir.mkdir(parents=True)
    torch.save({"model": src.state_dict()}, ckdir / "unireplknet_a_in1k_224_acc77.03.pth")
    m = fastvis.create_model("unireplknet_a", pretrained=True, num_classes=7)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in src.state_dict().items())
    # another classifier size leaves the head fresh, as timm does
    m = fastvis.create_model("unireplknet_a", pretrained=True, num_classes=5)
    assert m.head.weight.shape == (5, 320)


# --------------------------------------------------------------------------- behaviour


def test_gradients_flow_and_match_the_reference():
    """Training form: in train mode every parameter gets a finite gradient; in eval mode
    (BN with running statistics: no parameter has a structurally zero gradient, and batch
    statistics of a 2-image batch at 1x1 resolution do not make the comparison
    ill-conditioned) every gradient is non-zero and equals the one through the PyTorch
    references of the fastvis ops, to 1e-4 of each parameter's largest gradient entry (the
    two paths sum a depthwise weight gradient over up to N*H*W = 2048 products in
    different orders, ~sqrt(2048) * 6e-8 ~ 3e-6 relative, compounded through the layers
    below; a wrong gradient is off by O(1))."""
    for cls, cfg in ((fastvis.models.UniRepLKNet, UNI_SMALL), (fastvis.models.RepLKNet, REP_SMALL)):
        m = randomize_(cls(num_classes=10, **cfg), f"grad-{cls.__name__}")
        with torch.no_grad():  # no dead SE ReLU (2 hidden units at 8 channels), else a zero gradient is right
            for mod in m.modules():
                if isinstance(mod, fastvis.nn.SEBlock):
                    mod.down.bias.fill_(2.0)
        x = _x(2, 3, 32, "x-grad")
        m.train()
        m(x).square().mean().backward()
        for n, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (cls.__name__, n)
        m.eval()
        grads = []
        for ref in (False, True):
            m.zero_grad(set_to_none=True)
            with fastvis.use_reference(ref):
                m(x).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        for n, p in m.named_parameters():
            g, gr = grads[0][n], grads[1][n]
            assert torch.isfinite(g).all() and g.abs().max() > 0, (cls.__name__, n)
            assert (g - gr).abs().max() <= 1e-4 * gr.abs().max(), (cls.__name__, n)


def test_channels_last_input_reference_and_head_split():
    m = randomize_(fastvis.models.UniRepLKNet(num_classes=10, **UNI_SMALL), "cl").eval()
    r = randomize_(fastvis.models.RepLKNet(num_classes=10, **REP_SMALL), "cl-rep").eval()
    x = _x(2, 3, 32, "x-cl")
    with torch.no_grad():
        for model in (m, r):
            y = model(x)
            assert y.shape == (2, 10)
            assert_close_scaled(model(x.contiguous(memory_format=torch.channels_last)), y, "channels_last")
            with fastvis.use_reference():
                assert_close_scaled(model(x), y, "use_reference")
            f = model.forward_features(x)
            assert f.shape == (2, model.num_features, 1, 1)
            assert torch.equal(model.forward_head(f), y)
            assert model.forward_head(f, pre_logits=True).shape == (2, model.num_features)


def test_features_only():
    m = fastvis.create_model("unireplknet_a", features_only=True, out_indices=(1, 3)).eval()
    outs = m(_x(1, 3, 32, "x-feat"))
    assert [tuple(o.shape) for o in outs] == [(1, 80, 4, 4), (1, 320, 1, 1)]
    assert m.feature_info.channels() == [80, 320] and m.feature_info.reduction() == [8, 32]
    r = fastvis.models.RepLKNet(features_only=True, out_indices=(0, 1), **REP_SMALL).eval()
    outs = r(_x(1, 3, 64, "x-feat"))
    assert [tuple(o.shape) for o in outs] == [(1, 8, 16, 16), (1, 16, 8, 8)]
    assert len(r.stages) == 2 and len(r.transitions) == 1


def test_drop_path_in_train_mode_only():
    m = randomize_(fastvis.models.UniRepLKNet(num_classes=10, drop_path_rate=0.5, **UNI_SMALL), "dp")
    x = _x(4, 3, 32, "x-dp")
    with torch.no_grad():
        m.eval()
        a, b = m(x), m(x)
        assert torch.equal(a, b)
        m.train()
        torch.manual_seed(0)
        c = m(x)
        torch.manual_seed(1)
        d = m(x)
    assert not torch.allclose(c, d)
    blocks = [b for b in m.modules() if isinstance(b, fastvis.nn.UniRepLKNetBlock)]
    assert blocks[0].drop_path == 0.0 and blocks[-1].drop_path == pytest.approx(0.5)


def test_reparameterize_leaves_other_models_unchanged_and_is_idempotent():
    cn = fastvis.create_model("convnext_atto")
    before = {k: v.clone() for k, v in cn.state_dict().items()}
    assert fastvis.reparameterize(cn) is cn
    after = cn.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    m = fastvis.models.RepLKNet(num_classes=10, **REP_SMALL)
    fastvis.reparameterize(m)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    fastvis.reparameterize(m)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items()) and list(m.state_dict()) == list(sd)
    with pytest.raises(TypeError, match="nn.Module"):
        fastvis.reparameterize("model")


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match=r"kernel_size must be one of \[5, 7, 9, 11, 13, 15, 17\]"):
        fastvis.nn.DilatedReparamBlock(8, 19)
    with pytest.raises(ValueError, match="kernel_size must be one of"):
        fastvis.nn.DilatedReparamBlock(8, 3)
    with pytest.raises(ValueError, match="kernel_size must be one of"):
        fastvis.nn.UniRepLKNetBlock(8, 4)
    with pytest.raises(ValueError, match="dim must be an int >= 4"):
        fastvis.nn.UniRepLKNetBlock(2, 3)
    with pytest.raises(ValueError, match="no default kernel sizes for depths"):
        fastvis.models.UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="one size per block"):
        fastvis.models.UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_sizes=((3,), (3,), (3, 3), (3,)))
    with pytest.raises(ValueError, match=r"small_kernel \(7\) cannot be larger"):
        fastvis.nn.ReparamLargeKernelConv(8, 5, 7)
    with pytest.raises(ValueError, match="odd int"):
        fastvis.nn.ReparamLargeKernelConv(8, 30, 5)
    with pytest.raises(ValueError, match="odd ints"):
        fastvis.models.RepLKNet(large_kernel_sizes=(31, 28, 27, 13))
    with pytest.raises(ValueError, match="cannot be larger"):
        fastvis.models.RepLKNet(large_kernel_sizes=(31, 29, 27, 3), device="meta")
    m = fastvis.models.RepLKNet(num_classes=10, **REP_SMALL)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        m(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="smaller than the network's total stride 32"):
        m(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="drop_path_rate"):
        fastvis.create_model("unireplknet_a", drop_path_rate=1.5, device="meta")
    with pytest.raises(ValueError, match=r"expected an \(N, H, W, 16\) input"):
        fastvis.nn.UniRepLKNetGRN(16)(torch.randn(1, 16, 4, 4))


def test_create_model_overrides():
    m = fastvis.create_model("unireplknet_a", num_classes=0, in_chans=1, device="meta")
    assert shapes(m.state_dict()) == {k: v for k, v in uni_keys((40, 80, 160, 320), (2, 2, 6, 2), False,
                                                                 in_chans=1, num_classes=0).items()
                                      if not k.startswith("head.")}
    m = fastvis.create_model("replknet_31b", num_classes=21841, deploy=True, device="meta")
    assert m.head.weight.shape == (21841, 1024) and m.deploy


def test_bench_model_uses_the_reference_when_timm_lacks_the_model(tmp_path, capsys):
    """`fastvis bench model --model unireplknet_a`: timm has no such model, so fastvis is
    compared with itself under fastvis.use_reference(True), training and deploy forms,
    inference and the training step (timings not checked)."""
    import json

    from fastvis import cli
    from fastvis.bench import model as bench_model

    out = tmp_path / "b.json"
    args = cli.build_parser().parse_args([
        "bench", "model", "--model", "unireplknet_a", "--batch", "1", "--size", "64", "--repeat", "1",
        "--warmup", "0", "--max-time", "0.01", "--threads", "1", "--no-compile", "--no-onnx", "--format", "text", "-q",
        "--json", str(out)])
    assert bench_model.run(args) == 0
    text = capsys.readouterr().out
    assert "fastvis.use_reference(True)" in text and "Training step vs the PyTorch reference" in text
    assert "against the machine's sgemm bound" in text
    assert "Training step against the machine's sgemm bound" in text
    (res,) = json.loads(out.read_text())["results"]
    assert res["baseline"] == "reference"
    assert res["gflop_per_image"] == pytest.approx(bench_model._model_gflop(fastvis.create_model("unireplknet_a"), 64))
    assert set(res["median_s"]) == {"fastvis", "reference", "fastvis deploy", "reference deploy"}
    assert set(res["train_median_s"]) == {"fastvis", "reference"}
    assert 0 <= res["max_logit_diff"] < 1e-3
    assert not fastvis.reference_enabled()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_block_layer_scale_folded_into_bn2_in_training(momentum):
    """Training mode: the block computes gamma * BN2(fc2 output) as one BatchNorm with scaled
    affine parameters, and BN1 + SE as one fastvis.ops.batch_norm_se. Output, every
    gradient (gamma, BN2's weight and bias included), both BatchNorms' running statistics
    and batch counts equal the official composition (BN1, SE, ..., BN2 then the layer scale,
    what fastvis.use_reference() runs), for momentum 0.1 and None (cumulative)."""
    import copy

    torch.manual_seed(7)
    blk = fastvis.nn.UniRepLKNetBlock(16, 3).train()
    with torch.no_grad():
        blk.gamma.uniform_(0.5, 1.5)
        bn2 = blk.pwconv2[2]
        bn2.weight.uniform_(0.5, 1.5), bn2.bias.normal_(), bn2.running_mean.normal_()
        bn2.momentum = momentum
    ref = copy.deepcopy(blk)
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    gy = torch.randn(2, 16, 8, 8)
    outs = []
    for model, use_ref in ((blk, False), (ref, True)):
        for _ in range(2):  # two steps: the running statistics and the batch count move twice
            model.zero_grad(set_to_none=True)
            with fastvis.use_reference(use_ref):
                y = model(x)
            y.backward(gy)
        outs.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (y, g), (yr, gr) = outs
    assert_close_scaled(y, yr, "output")
    top = max(t.abs().max() for t in gr.values())
    for n in g:
        if n == "act.1.beta":
            # GRN's bias shifts every pixel of a channel alike; through fc2 that is a per-channel
            # constant, which BN2's batch statistics remove: its true gradient is zero, both
            # sides hold rounding noise only
            assert g[n].abs().max() <= 1e-5 * top and gr[n].abs().max() <= 1e-5 * top
            continue
        assert (g[n] - gr[n]).abs().max() <= 1e-4 * gr[n].abs().max(), n
    assert g["gamma"].abs().max() > 0 and g["pwconv2.2.weight"].abs().max() > 0
    # BN2 (folded with the layer scale) and BN1 (fused with SE: fastvis.ops.batch_norm_se)
    for b, br in ((blk.pwconv2[2], ref.pwconv2[2]), (blk.norm, ref.norm)):
        assert int(b.num_batches_tracked) == int(br.num_batches_tracked) == 2
        torch.testing.assert_close(b.running_mean, br.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.running_var, br.running_var, rtol=1e-5, atol=1e-6)
