"""fastvis.nn.DepthwiseConv2d as a drop-in for nn.Conv2d(C, C, k, groups=C)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastvis
import fastvis.nn
from conftest import ConvCfg, check_backward, check_forward

# (kernel_size, stride, padding, dilation) accepted by both modules.
CASES = [
    (7, 1, "same", 1),
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    (5, 2, 2, 2),
    ((1, 7), 1, (0, 3), 1),
    ((7, 1), 1, "same", 1),
    ((4, 4), 1, "same", 1),
    (3, (2, 1), "valid", (1, 2)),
    (13, 1, "same", 1),
]


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def make_pair(c, k, stride, padding, dilation, bias, dtype=torch.float32):
    ref = nn.Conv2d(c, c, k, stride=stride, padding=padding, dilation=dilation, groups=c,
                    bias=bias).to(dtype)
    ours = fastvis.nn.DepthwiseConv2d(c, k, stride=stride, padding=padding, dilation=dilation,
                                      bias=bias).to(dtype)
    return ref, ours


def cfg_of(c, k, stride, padding, dilation, bias, n, h, w, layout, dtype=torch.float32):
    kh, kw = _pair(k)
    return ConvCfg(n=n, c=c, h=h, w=w, kh=kh, kw=kw, stride=_pair(stride),
                   dilation=_pair(dilation), padding=padding, bias=bias, layout=layout,
                   dtype=dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parameters_and_state_dict_match_conv2d(case, bias):
    k, stride, padding, dilation = case
    ref, ours = make_pair(10, k, stride, padding, dilation, bias)
    kh, kw = _pair(k)
    assert ours.weight.shape == (10, 1, kh, kw)
    assert isinstance(ours.weight, nn.Parameter)
    if bias:
        assert ours.bias.shape == (10,) and isinstance(ours.bias, nn.Parameter)
    else:
        assert ours.bias is None
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    # Both directions of the state-dict interchange.
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.weight, ref.weight)
    ref2 = nn.Conv2d(10, 10, k, stride=stride, padding=padding, dilation=dilation, groups=10,
                     bias=bias)
    ref2.load_state_dict(ours.state_dict())
    assert torch.equal(ref2.weight, ours.weight)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_same_output_and_grads_as_conv2d_float64(case, layout):
    k, stride, padding, dilation = case
    ref, ours = make_pair(6, k, stride, padding, dilation, True, torch.float64)
    ours.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(2, 6, 15, 14, dtype=torch.float64).contiguous(memory_format=fmt)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y_ref = ref(x1)
    y = ours(x2)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y_ref)
    y_ref.backward(gy)
    y.backward(gy)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_module_float32_bfloat16_vs_oracle(case, dtype):
    k, stride, padding, dilation = case
    ours = fastvis.nn.DepthwiseConv2d(9, k, stride=stride, padding=padding, dilation=dilation)
    ours = ours.to(dtype)
    cfg = cfg_of(9, k, stride, padding, dilation, True, 2, 12, 11, "nhwc", dtype)
    x = torch.randn(2, 9, 12, 11).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = ours(x)
    check_forward(y, x, ours.weight, ours.bias, cfg)
    gy = torch.randn_like(y)
    y.backward(gy)
    check_backward({"x": x.grad, "weight": ours.weight.grad, "bias": ours.bias.grad},
                   x, ours.weight, ours.bias, gy, cfg)


def test_default_padding_is_same():
    m = fastvis.nn.DepthwiseConv2d(4, 5)
    x = torch.randn(1, 4, 9, 7)
    assert m(x).shape == x.shape
    assert m.bias is not None


def test_four_tuple_padding():
    m = fastvis.nn.DepthwiseConv2d(3, 3, padding=(0, 2, 1, 1), bias=False)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    y = m(x)
    cfg = ConvCfg(n=1, c=3, h=8, w=8, kh=3, kw=3, padding=(0, 2, 1, 1), bias=False)
    check_forward(y, x, m.weight, None, cfg)


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match=r"(?i)same"):
        fastvis.nn.DepthwiseConv2d(4, 3, stride=2, padding="same")(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"(?i)kernel"):
        fastvis.nn.DepthwiseConv2d(4, 64)(torch.randn(1, 4, 70, 70))


def test_repr_mentions_configuration():
    r = repr(fastvis.nn.DepthwiseConv2d(16, (1, 7), stride=(2, 1), padding=(0, 3), bias=False))
    assert "DepthwiseConv2d" in r
    assert "16" in r
    assert "7" in r
    r2 = repr(fastvis.nn.DepthwiseConv2d(8, 3, dilation=2))
    assert "dilation" in r2 and "2" in r2


def test_module_in_sequential_and_no_grad():
    model = nn.Sequential(fastvis.nn.DepthwiseConv2d(8, 7), nn.GELU(),
                          fastvis.nn.DepthwiseConv2d(8, 3, stride=2, padding=1))
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 8, 8, 8)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert not y.requires_grad


def test_model_to_channels_last_and_double():
    m = fastvis.nn.DepthwiseConv2d(5, 3).double()
    assert m.weight.dtype == torch.float64
    x = torch.randn(1, 5, 6, 6, dtype=torch.float64)
    ref = nn.functional.conv2d(x, m.weight, m.bias, padding=1, groups=5)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
