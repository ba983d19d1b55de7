"""GPU tests of the CUDA depthwise-convolution backend (csrc/ops/depthwise_conv/cuda/dwconv.cu).

Every test is marked ``cuda`` and skipped without a CUDA device: no machine of this
project has had one, so these tests have never run. They compare
``fastvis.ops.depthwise_conv2d`` on CUDA (float32 / float16 / bfloat16, NHWC and NCHW,
forward and all gradients through autograd) with the same op on the CPU in float64,
evaluated on the same (already rounded) inputs, and check that the weight gradient
is bit-identical run to run.

The shapes are chosen to reach every kernel the CUDA backend ships: the tiled
forward kernel, the stride-1 backward input (forward with the flipped kernel), the
stride-2 gather, the tiled weight gradient with several kernel-row chunks, and the
direct (global-memory) fallbacks that huge dilations force.
"""
from __future__ import annotations

import math

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

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance per dtype: float32 accumulation of up to a few thousand terms,
# then one rounding to the output dtype (float16: 2^-11, bfloat16: 2^-8).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (C, H, W, kernel, stride, padding, dilation, bias): each reaches a different path.
CASES = [
    pytest.param(8, 13, 11, 3, 1, 1, 1, True, id="3x3"),
    pytest.param(16, 14, 14, 7, 1, 3, 1, True, id="7x7"),
    pytest.param(40, 7, 7, 7, 1, "valid", 1, True, id="7x7-valid-C40"),
    pytest.param(5, 17, 19, (5, 3), (2, 1), (2, 1), 1, False, id="5x3-s2x1"),
    pytest.param(33, 9, 10, 3, 2, 2, 2, True, id="3x3-s2-d2-C33"),
    pytest.param(3, 31, 29, 13, 1, "same", 1, True, id="13x13-same"),
    pytest.param(4, 12, 12, 4, 1, "same", 1, True, id="4x4-same-asym"),
    pytest.param(6, 23, 17, (1, 15), 1, (0, 7), 1, True, id="band-1x15"),
    pytest.param(6, 17, 23, (15, 1), 2, (7, 0), 1, False, id="band-15x1-s2"),
    pytest.param(5, 16, 15, 3, (1, 2), (2, 0, 1, 2), (2, 1), True, id="asym-pad-s1x2"),
    pytest.param(2, 40, 40, 31, 2, 15, 1, True, id="31x31-s2"),
    pytest.param(2, 36, 40, 51, 1, 25, 1, True, id="51x51"),
    pytest.param(3, 11, 9, 15, 1, 280, 40, True, id="15x15-d40-direct"),
    pytest.param(2, 9, 12, 5, 2, (4, 3, 8, 0), (1, 4), False, id="5x5-s2-d1x4-asym"),
]


def _make(n, c, h, w, kernel, dtype, channels_last, bias, seed):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(c, 1, kh, kw, generator=g) / math.sqrt(kh * kw)
    b = torch.randn(c, generator=g) if bias else None
    gy_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    # Round to the dtype under test first, so the float64 reference sees the same inputs.
    x, wt = x.to(dtype), wt.to(dtype)
    b = None if b is None else b.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, wt, b, gy_seed


def _ref_inputs(x, wt, b, channels_last):
    xr = x.detach().cpu().double()
    if channels_last:
        xr = xr.contiguous(memory_format=torch.channels_last)
    return xr, wt.detach().cpu().double(), None if b is None else b.detach().cpu().double()


def _assert_close(got, want, dtype, what):
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().item() + 1e-6
    tol = TOL[dtype]
    err = (got - want).abs()
    bound = tol * (want.abs() + scale)
    bad = err > bound
    assert not bad.any(), (
        f"{what} ({dtype}): {int(bad.sum())} of {bad.numel()} elements off; max error "
        f"{err.max().item():.3g} (scale {scale:.3g}, rel tol {tol})"
    )


def _run(x, wt, b, kw_args, gy_seed, dtype):
    """Forward + backward through autograd; returns y and the gradients."""
    x = x.detach().requires_grad_(True)
    wt = wt.detach().requires_grad_(True)
    b = None if b is None else b.detach().requires_grad_(True)
    y = fastvis.ops.depthwise_conv2d(x, wt, b, **kw_args)
    g = torch.Generator().manual_seed(gy_seed)
    gy = torch.randn(y.shape, generator=g).to(dtype=y.dtype).to(y.device)
    y.backward(gy)
    return y, x.grad, wt.grad, (None if b is None else b.grad)


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("c,h,w,kernel,stride,padding,dilation,bias", CASES)
def test_forward_and_gradients_match_cpu(c, h, w, kernel, stride, padding, dilation, bias, dtype, channels_last):
    n = 2
    x, wt, b, gy_seed = _make(n, c, h, w, kernel, dtype, channels_last, bias, seed=c * 1000 + h * 10 + w)
    kw_args = dict(stride=stride, padding=padding, dilation=dilation)

    y, gx, gw, gb = _run(x.cuda(), wt.cuda(), None if b is None else b.cuda(), kw_args, gy_seed, dtype)
    torch.cuda.synchronize()
    assert y.device.type == "cuda" and y.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), "the output must keep the input's memory format"

    xr, wr, br = _ref_inputs(x, wt, b, channels_last)
    y_ref, gx_ref, gw_ref, gb_ref = _run(xr, wr, br, kw_args, gy_seed, torch.float64)

    _assert_close(y, y_ref, dtype, "forward")
    _assert_close(gx, gx_ref, dtype, "grad_input")
    _assert_close(gw, gw_ref, dtype, "grad_weight")
    if bias:
        _assert_close(gb, gb_ref, dtype, "grad_bias")


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_weight_gradient_is_deterministic(dtype, channels_last):
    # Large enough for several reduction chunks and kernel-row chunks.
    x, wt, b, gy_seed = _make(4, 24, 37, 41, 13, dtype, channels_last, True, seed=7)
    kw_args = dict(stride=1, padding=6, dilation=1)
    runs = [_run(x.cuda(), wt.cuda(), b.cuda(), kw_args, gy_seed, dtype) for _ in range(3)]
    torch.cuda.synchronize()
    for y, gx, gw, gb in runs[1:]:
        assert torch.equal(y, runs[0][0])
        assert torch.equal(gx, runs[0][1])
        assert torch.equal(gw, runs[0][2]), "grad_weight differs between runs"
        assert torch.equal(gb, runs[0][3]), "grad_bias differs between runs"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_strided_weight_and_side_stream(dtype):
    # A weight with non-standard strides (a permuted view) and a non-default stream.
    c, k = 12, 5
    x, _, b, gy_seed = _make(2, c, 19, 21, k, dtype, True, True, seed=11)
    w_store = (torch.randn(k, k, 1, c) / k).to(dtype)
    wt = w_store.permute(3, 2, 0, 1)  # (C, 1, kh, kw) with strides (1, ., k*c, c)
    assert not wt.is_contiguous()
    kw_args = dict(stride=1, padding=2, dilation=1)
    side = torch.cuda.Stream()
    xc, wc, bc = x.cuda(), wt.cuda(), b.cuda()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y, gx, gw, gb = _run(xc, wc, bc, kw_args, gy_seed, dtype)
    side.synchronize()
    xr, wr, br = _ref_inputs(x, wt, b, True)
    y_ref, gx_ref, gw_ref, gb_ref = _run(xr, wr, br, kw_args, gy_seed, torch.float64)
    _assert_close(y, y_ref, dtype, "forward")
    _assert_close(gx, gx_ref, dtype, "grad_input")
    _assert_close(gw, gw_ref, dtype, "grad_weight")
    _assert_close(gb, gb_ref, dtype, "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_large_batch_many_channels(dtype):
    # Many blocks and channel groups (partial last group: C = 200), a realistic stage shape.
    x, wt, b, gy_seed = _make(8, 200, 28, 28, 7, dtype, True, True, seed=3)
    kw_args = dict(stride=1, padding=3, dilation=1)
    y, gx, gw, gb = _run(x.cuda(), wt.cuda(), b.cuda(), kw_args, gy_seed, dtype)
    torch.cuda.synchronize()
    xr, wr, br = _ref_inputs(x, wt, b, True)
    y_ref, gx_ref, gw_ref, gb_ref = _run(xr, wr, br, kw_args, gy_seed, torch.float64)
    _assert_close(y, y_ref, dtype, "forward")
    _assert_close(gx, gx_ref, dtype, "grad_input")
    _assert_close(gw, gw_ref, dtype, "grad_weight")
    _assert_close(gb, gb_ref, dtype, "grad_bias")


def test_inputs_are_not_modified():
    x, wt, b, gy_seed = _make(2, 8, 10, 10, 3, torch.float32, True, True, seed=5)
    xc, wc, bc = x.cuda(), wt.cuda(), b.cuda()
    x0, w0, b0 = xc.clone(), wc.clone(), bc.clone()
    _run(xc, wc, bc, dict(stride=2, padding=1, dilation=1), gy_seed, torch.float32)
    torch.cuda.synchronize()
    assert torch.equal(xc, x0) and torch.equal(wc, w0) and torch.equal(bc, b0)
