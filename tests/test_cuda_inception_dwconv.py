"""GPU tests of the Inception depthwise op on CUDA (csrc/ops/inception_dwconv/cuda/).

Every test is marked ``cuda`` and skipped without a CUDA device: no machine of this
project has had one, so these tests have NEVER RUN. They compare
``fastvis.ops.inception_depthwise_conv2d`` on CUDA (float32 / float16 / bfloat16, NHWC and
NCHW, forward and all gradients through autograd) with the same op on the CPU in float64
on the same (already rounded) inputs, and check that the weight gradients are
bit-identical run to run.
"""
from __future__ import annotations

import pytest
import torch

try:
    import fastvis
    import fastvis.ops
except Exception:  # pragma: no cover - reported by the CPU tests
    fastvis = None


def _cuda_ok() -> bool:
    if not torch.cuda.is_available() or fastvis is None:
        return False
    try:
        return bool(fastvis.cuda_available())
    except Exception:
        return False


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _cuda_ok(), reason="no CUDA device")]

# float32 accumulation of at most N*H*W terms (weight gradients) or k*k taps, then one
# rounding to the output dtype (float16: 2^-11, bfloat16: 2^-8), relative to the largest value.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CASES = [
    pytest.param(2, 96, 12, 14, 14, 3, 11, 1, id="inceptionnext-96"),
    pytest.param(1, 40, 10, 17, 13, 3, 9, 1, id="atto-ratio-1/4"),
    pytest.param(2, 30, 8, 9, 11, 5, 7, 2, id="dilated"),
    pytest.param(3, 9, 3, 1, 1, 3, 11, 1, id="1x1-no-identity"),
]


def _inputs(n, c, g, h, w, k, kb, dtype, layout):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=fmt)
    ps = [torch.randn(g, 1, k, k).to(dtype), torch.randn(g).to(dtype), torch.randn(g, 1, 1, kb).to(dtype),
          torch.randn(g).to(dtype), torch.randn(g, 1, kb, 1).to(dtype), torch.randn(g).to(dtype)]
    gy = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=fmt)
    return x, ps, gy


def _run(x, ps, gy, d):
    x = x.detach().requires_grad_(True)
    ps = [p.detach().requires_grad_(True) for p in ps]
    y = fastvis.ops.inception_depthwise_conv2d(x, *ps, dilation=d)
    return [y.detach()] + list(torch.autograd.grad(y, [x] + ps, gy))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c,g,h,w,k,kb,d", CASES)
def test_cuda_matches_cpu_float64(n, c, g, h, w, k, kb, d, dtype, layout):
    x, ps, gy = _inputs(n, c, g, h, w, k, kb, dtype, layout)
    got = _run(x.cuda(), [p.cuda() for p in ps], gy.cuda(), d)
    ref = _run(x.double(), [p.double() for p in ps], gy.double(), d)
    names = ["y", "grad_x", "grad_hw_weight", "grad_hw_bias", "grad_w_weight", "grad_w_bias",
             "grad_h_weight", "grad_h_bias"]
    assert got[0].is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    cid = c - 3 * g
    assert torch.equal(got[0][:, :cid].cpu(), x[:, :cid]), "identity channels of y"
    assert torch.equal(got[1][:, :cid].cpu(), gy[:, :cid]), "identity channels of grad_x"
    for a, r, name in zip(got, ref, names):
        assert a.dtype == dtype and a.shape == r.shape, name
        err = (a.cpu().double() - r).abs().max().item()
        scale = max(r.abs().max().item(), 1e-30)
        assert err <= TOL[dtype] * scale, f"{name}: max |diff| {err:.3g} > {TOL[dtype]:g} * {scale:.3g}"


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_cuda_weight_grads_deterministic(layout):
    x, ps, gy = _inputs(2, 96, 12, 14, 14, 3, 11, torch.float32, layout)
    x, ps, gy = x.cuda(), [p.cuda() for p in ps], gy.cuda()
    a = _run(x, ps, gy, 1)
    b = _run(x, ps, gy, 1)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"output {i} differs between two runs"


def test_cuda_bias_only_gradient():
    x, ps, gy = _inputs(2, 24, 6, 9, 9, 3, 11, torch.float32, "nhwc")
    xc = x.cuda()
    pc = [p.cuda() for p in ps]
    pc[1].requires_grad_(True)
    y = fastvis.ops.inception_depthwise_conv2d(xc, *pc)
    (gb,) = torch.autograd.grad(y, [pc[1]], gy.cuda())
    expected = gy[:, 6:12].double().sum(dim=(0, 2, 3))
    torch.testing.assert_close(gb.cpu().double(), expected, rtol=2e-5, atol=1e-4)
