"""torch.compile(fullgraph=True) through the depthwise-convolution custom op, and its
fake (meta) kernel. One compilation for the whole module (module-scoped fixture) so
the file stays well under a minute on two cores."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fastvis
import fastvis.ops
from conftest import ConvCfg, check_forward, make_inputs


class Block(nn.Module):
    """Two depthwise convolutions (7x7 'same', then a strided dilated 3x3) and pointwise ops."""

    def __init__(self, c):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(c, 1, 7, 7) * 0.1)
        self.b1 = nn.Parameter(torch.randn(c))
        self.w2 = nn.Parameter(torch.randn(c, 1, 3, 3) * 0.3)

    def forward(self, x):
        y = fastvis.ops.depthwise_conv2d(x, self.w1, self.b1, padding="same")
        y = torch.nn.functional.gelu(y) + x
        return fastvis.ops.depthwise_conv2d(y, self.w2, None, stride=2, padding=(2, 1, 2, 1),
                                            dilation=2)


def _run(model, x):
    x = x.detach().requires_grad_(True)
    y = model(x)
    gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    y.backward(gy)
    grads = [x.grad] + [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return y.detach(), grads


@pytest.fixture(scope="module")
def compiled_results():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block(12)
    x = torch.randn(2, 12, 14, 13).contiguous(memory_format=torch.channels_last)
    eager = _run(model, x)
    compiled = torch.compile(model, fullgraph=True)
    first = _run(compiled, x)
    second = _run(compiled, x)  # same shapes: must reuse the graph
    return x, eager, first, second


def test_compile_fullgraph_matches_eager(compiled_results):
    x, (y_e, g_e), (y_c, g_c), _ = compiled_results
    # Same kernels on both sides; the only difference allowed is the rounding of the
    # fused pointwise ops (float32, a few ulps).
    assert y_c.shape == y_e.shape
    assert y_c.is_contiguous(memory_format=torch.channels_last) == y_e.is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    names = ["x", "w1", "b1", "w2"]
    for name, a, b in zip(names, g_c, g_e):
        assert a is not None, f"compiled graph produced no gradient for {name}"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_compile_second_call_identical(compiled_results):
    _, _, (y1, g1), (y2, g2) = compiled_results
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("cfg_kw", [
    dict(kh=7, kw=7, padding="same"),
    dict(kh=3, kw=5, stride=(2, 1), dilation=(1, 2), padding=(1, 0, 3, 2)),
    dict(kh=4, kw=4, padding="same", dilation=(2, 1)),
    dict(kh=1, kw=9, stride=(2, 2), padding="valid"),
])
def test_fake_kernel_shape_and_layout(cfg_kw, layout):
    """Under FakeTensorMode (what torch.compile traces with) the op reports the real
    output's shape, dtype and strides without running the kernel."""
    cfg = ConvCfg(n=2, c=6, h=11, w=12, layout=layout, **cfg_kw)
    x, w, b = make_inputs(cfg)
    real = fastvis.ops.depthwise_conv2d(x, w, b, stride=cfg.stride, padding=cfg.padding,
                                        dilation=cfg.dilation)
    check_forward(real, x, w, b, cfg)
    with FakeTensorMode() as mode:
        fx, fw, fb = (mode.from_tensor(t) for t in (x, w, b))
        fake = fastvis.ops.depthwise_conv2d(fx, fw, fb, stride=cfg.stride, padding=cfg.padding,
                                            dilation=cfg.dilation)
    assert tuple(fake.shape) == tuple(real.shape)
    assert fake.dtype == real.dtype
    assert fake.stride() == real.stride(), (
        f"fake kernel strides {fake.stride()} != real strides {real.stride()} ({layout})")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_opcheck_custom_ops(layout):
    """torch.library.opcheck: schema, fake kernels (incl. strides) and autograd
    registration of the custom ops behind fastvis.ops.depthwise_conv2d agree."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(2, 5, 8, 9).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(5, 1, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    s, p, d = [2, 1], [1, 0, 1, 1], [1, 2]
    torch.library.opcheck(torch.ops.fastvis.depthwise_conv2d.default, (x, w, b, s, p, d))
    torch.library.opcheck(torch.ops.fastvis.depthwise_conv2d.default, (x, w, None, s, p, d))
    oh, ow = (8 + 1 - 3) // 2 + 1, (9 + 2 - 2 * 2 - 1) // 1 + 1
    gy = torch.randn(2, 5, oh, ow).contiguous(memory_format=fmt)
    torch.library.opcheck(torch.ops.fastvis.depthwise_conv2d_backward.default,
                          (gy, x.detach(), w.detach(), s, p, d, True, True, True))
