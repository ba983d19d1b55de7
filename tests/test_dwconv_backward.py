"""Depthwise convolution backward (CPU): gradients of x, weight and bias.

Fast path through autograd (fastvis.ops.depthwise_conv2d), the low-level
_C.dwconv_backward_input / _C.dwconv_backward_weight and the scalar C++ references,
all against float64 F.conv2d autograd; gradcheck on small float64 problems;
determinism of the weight gradient. Tolerances: see conftest.py (the weight and
bias gradients reduce over N*OH*OW terms and their bound scales with that).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given

import fastvis
import fastvis.ops
from conftest import (ConvCfg, check_backward, check_forward, conv_configs, make_grad_output,
                      make_inputs, sweep)

_C = fastvis._C


def run_op(x, w, b, cfg: ConvCfg):
    return fastvis.ops.depthwise_conv2d(x, w, b, stride=cfg.stride_arg, padding=cfg.padding,
                                        dilation=cfg.dilation_arg)


def autograd_grads(cfg: ConvCfg):
    x, w, b = make_inputs(cfg, requires_grad=True)
    y = run_op(x, w, b, cfg)
    gy = make_grad_output(cfg)
    inputs = (x, w) + ((b,) if b is not None else ())
    grads = torch.autograd.grad(y, inputs, gy)
    out = {"x": grads[0], "weight": grads[1]}
    if b is not None:
        out["bias"] = grads[2]
    return out, (x, w, b, gy)


def check_backward_thread_invariant(cfg: ConvCfg) -> None:
    """Gradients through the op against the float64 oracle, and bitwise equal from 1 and 3
    threads (the weight gradient's row chunks are a function of the shape)."""
    x, w, b = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg)
    runs = []
    for threads in (1, 3):
        fastvis.set_num_threads(threads)
        try:
            runs.append(torch.autograd.grad(run_op(x, w, b, cfg), (x, w, b), gy))
        finally:
            fastvis.set_num_threads(0)
    grads = dict(zip(("x", "weight", "bias"), runs[0]))
    check_backward(grads, x, w, b, gy, cfg)
    for key, a, a3 in zip(grads, runs[0], runs[1]):
        assert torch.equal(a, a3), (key, cfg.short())


def check_grad_shapes(grads, x, w, b):
    assert grads["x"].shape == x.shape
    assert grads["weight"].shape == w.shape
    if b is not None:
        assert grads["bias"].shape == b.shape


# --------------------------------------------------------------------------- autograd sweeps


@sweep(60)
@given(cfg=conv_configs(dtypes=(torch.float32,)))
def test_backward_float32(cfg):
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_grad_shapes(grads, x, w, b)
    check_backward(grads, x, w, b, gy, cfg)


@sweep(40)
@given(cfg=conv_configs(dtypes=(torch.float64,)))
def test_backward_float64(cfg):
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)


@sweep(40)
@given(cfg=conv_configs(dtypes=(torch.bfloat16,)))
def test_backward_bfloat16(cfg):
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)


# --------------------------------------------------------------------------- low level


def _alloc(shape, cfg: ConvCfg, fill=float("nan")):
    return torch.empty(shape, dtype=cfg.dtype, memory_format=cfg.memory_format).fill_(fill)


def lowlevel_grads(cfg: ConvCfg, reference: bool):
    x, w, b = make_inputs(cfg)
    gy = make_grad_output(cfg)
    gx = _alloc(x.shape, cfg)
    gw = torch.full(w.shape, float("nan"), dtype=cfg.dtype)
    gb = torch.full((cfg.c,), float("nan"), dtype=cfg.dtype) if b is not None else None
    args = (cfg.stride, cfg.pads, cfg.dilation)
    if reference:
        _C.dwconv_backward_input_reference(gy, w, gx, *args)
        _C.dwconv_backward_weight_reference(gy, x, gw, gb, *args)
    else:
        _C.dwconv_backward_input(gy, w, gx, *args)
        _C.dwconv_backward_weight(gy, x, gw, gb, *args)
    grads = {"x": gx, "weight": gw}
    if gb is not None:
        grads["bias"] = gb
    return grads, (x, w, b, gy)


@sweep(40)
@given(cfg=conv_configs(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_backward_cpp_scalar_reference(cfg):
    grads, (x, w, b, gy) = lowlevel_grads(cfg, reference=True)
    check_backward(grads, x, w, b, gy, cfg, prefix="reference grad_")


@sweep(30)
@given(cfg=conv_configs(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_backward_lowlevel_fast_path(cfg):
    grads, (x, w, b, gy) = lowlevel_grads(cfg, reference=False)
    check_backward(grads, x, w, b, gy, cfg, prefix="_C grad_")


@sweep(20)
@given(cfg=conv_configs(dtypes=(torch.float32, torch.float64)))
def test_backward_python_reference(cfg):
    x, w, b = make_inputs(cfg, requires_grad=True)
    y = fastvis.ops.depthwise_conv2d_reference(x, w, b, cfg.stride_arg, cfg.padding,
                                               cfg.dilation_arg)
    gy = make_grad_output(cfg)
    inputs = (x, w) + ((b,) if b is not None else ())
    g = torch.autograd.grad(y, inputs, gy)
    grads = {"x": g[0], "weight": g[1], **({"bias": g[2]} if b is not None else {})}
    check_backward(grads, x, w, b, gy, cfg, prefix="pure-PyTorch reference grad_")


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("kh,kw,stride,dilation,padding,hw", [
    (3, 3, (2, 2), (1, 1), 1, (7, 6)),
    (3, 3, (1, 1), (2, 2), "same", (6, 7)),
    (4, 3, (2, 1), (1, 2), (2, 0, 1, 3), (7, 5)),
    (1, 5, (1, 2), (1, 1), (0, 0, 3, 1), (3, 9)),
    (2, 2, (1, 1), (3, 1), "same", (5, 4)),
])
def test_gradcheck_float64(kh, kw, stride, dilation, padding, hw, layout):
    cfg = ConvCfg(n=2, c=3, h=hw[0], w=hw[1], kh=kh, kw=kw, stride=stride, dilation=dilation,
                  padding=padding, layout=layout, dtype=torch.float64)
    x, w, b = make_inputs(cfg, requires_grad=True)

    def fn(x, w, b):
        return run_op(x, w, b, cfg)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("k,c,hw,padding,stride", [
    (13, 17, (13, 20), "same", (1, 1)),
    (31, 5, (9, 16), "same", (1, 1)),
    (51, 3, (7, 12), "same", (1, 1)),
    (31, 4, (16, 12), (15, 15, 7, 30), (2, 2)),
    (51, 2, (20, 6), (25, 25, 50, 0), (1, 2)),
])
def test_backward_large_kernels(k, c, hw, padding, stride, layout):
    cfg = ConvCfg(n=2, c=c, h=hw[0], w=hw[1], kh=k, kw=k, padding=padding, stride=stride,
                  layout=layout)
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)


@pytest.mark.parametrize("k,c,hw,stride,dilation", [
    (31, 100, (37, 33), (1, 1), (1, 1)),
    (13, 70, (37, 29), (2, 2), (1, 1)),
    (9, 40, (37, 30), (1, 1), (2, 2)),
])
def test_backward_large_kernels_ring_of_rows(k, c, hw, stride, dilation):
    """Three images in weight-gradient row chunks that cross image boundaries, several
    channel blocks with a tail, tiles of few rows: each tile packs only the input rows its
    predecessor in the chunk did not, into a ring of rows (and the forward likewise)."""
    pad = (k - 1) * dilation[0] // 2
    cfg = ConvCfg(n=3, c=c, h=hw[0], w=hw[1], kh=k, kw=k, padding=(pad, pad, pad, pad),
                  stride=stride, dilation=dilation, layout="nhwc")
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kh,kw", [(3, 14), (5, 17), (31, 31), (7, 13)])
def test_register_window_blocks(kh, kw, dtype):
    """The register-window kernels' pixel blocks, each on whole and partial channel
    vectors: 28 output columns run every block size of the widest window (14, 7, 4, 2, 1
    with AVX-512's 14-pixel blocks for rows of >= 14 columns; 7, 4, 2, 1 otherwise), 40
    channels are whole vectors on AVX2 and 32 + a masked 8 on AVX-512; forward and both
    gradients (the input gradient runs the same windows on the flipped kernel)."""
    cfg = ConvCfg(n=1, c=40, h=6, w=28, kh=kh, kw=kw, padding="same", layout="nhwc", dtype=dtype)
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)
    check_forward(run_op(x, w, b, cfg), x, w, b, cfg)


@pytest.mark.parametrize("kh,kw,stride,dilation", [
    (5, 5, 1, 1), (5, 5, 2, 1), (5, 5, 1, 2), (1, 21, 1, 1), (21, 1, 1, 1), (3, 7, 1, 1),
    (5, 3, 1, 1), (1, 25, 1, 1), (25, 1, 1, 1)])
def test_direct_path_up_to_25_taps(kh, kw, stride, dilation):
    """Kernels of 16 to 25 taps run the direct (unpacked) path on AVX-512 and the packed
    tiles on the other paths (cpu_kernels.h, direct_max_taps): 32 channels (whole vectors
    on every path), every output column class (left edge, interior blocks of 6 / 3 / 1,
    right edge) over 23 columns, forward and both gradients against float64."""
    cfg = ConvCfg(n=2, c=32, h=9, w=23, kh=kh, kw=kw, stride=(stride, stride), dilation=(dilation, dilation),
                  padding="same" if stride == 1 else (kh // 2, kw // 2), layout="nhwc")
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)
    check_forward(run_op(x, w, b, cfg), x, w, b, cfg)


@pytest.mark.parametrize("kh,kw", [(1, 31), (31, 1), (1, 51), (51, 1)])
def test_backward_band_kernels(kh, kw):
    cfg = ConvCfg(n=2, c=6, h=11, w=14, kh=kh, kw=kw, padding="same", layout="nhwc")
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)


# k x 1 kernels take row bands (stride 1 and dilation 1 down the column, C a whole number
# of vectors) for the input gradient (the forward's row bands, flipped kernel) and the
# weight gradient (blocks of taps x grad_y rows read in place, zero rows outside the image
# and past a row chunk). As the forward test: short images, asymmetric padding, kh up to 63
# (several tap blocks), C of one and several vectors of the widest path and one that is
# not; gradients from 1 and 3 threads must be bitwise equal (the row chunks are a function
# of the shape).
@pytest.mark.parametrize("kh,pads,dtype", [
    (11, (5, 5, 0, 0), torch.float32), (2, (0, 1, 0, 0), torch.float32),
    (15, (7, 7, 0, 0), torch.bfloat16), (9, (0, 0, 0, 0), torch.float64),
    (5, (4, 3, 0, 0), torch.float32), (31, (15, 15, 0, 0), torch.float32),
    (63, (31, 31, 0, 0), torch.float64), (3, (2, 0, 0, 0), torch.float32),
])
def test_backward_row_band(kh, pads, dtype):
    vec = 8 if dtype == torch.float64 else 16
    short = max(1, kh - min(3, pads[0] + pads[1]))
    for n, h, c in ((2, short, 3 * vec), (1, kh, vec), (3, kh + 5, 2 * vec), (2, 29, vec),
                    (2, 61, 5 * vec), (2, 13, 12)):
        check_backward_thread_invariant(
            ConvCfg(n=n, c=c, h=h, w=7, kh=kh, kw=1, padding=pads, layout="nhwc", dtype=dtype))


# The k x 1 weight gradient walks a band's rows in memory order, in strips of a row's
# vectors whose band rows fit ~384 KB: rows of 40 (72 for bfloat16) pixels x 128 channels
# are longer than one strip, so a row is split across strips (and across the 16-wide
# vectors of a pixel, on the AVX-512 path). Several tap blocks (31 taps), image boundaries
# inside a row chunk (3 images of 11 rows).
@pytest.mark.parametrize("kh,n,h,w,dtype", [
    (11, 2, 20, 40, torch.float32), (31, 3, 11, 40, torch.float32),
    (11, 1, 12, 72, torch.bfloat16), (13, 2, 9, 40, torch.float64),
])
def test_backward_kx1_band_strips(kh, n, h, w, dtype):
    cfg = ConvCfg(n=n, c=128, h=h, w=w, kh=kh, kw=1, padding="same", layout="nhwc", dtype=dtype)
    grads, (x, w_, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w_, b, gy, cfg)


# Kernels up to 5x5 at stride 1 and dilation 1 (C a whole number of vectors) take the same
# row-order weight gradient as the k x 1 bands, with kernel columns that pass a row's left
# or right end checked per pixel: paddings of zero (the output narrower than the input),
# "same", asymmetric and as wide as allowed (kernel - 1); rows of 72 pixels x 128 channels
# (576 vectors in float32, 1152 in float64: longer than one strip of 438-512 on the AVX-512
# path; the bfloat16 case's strip of 877 holds its row), image boundaries inside a row chunk (3 images of 7 rows), several blocks of kernel
# rows (5 rows: 3 + 2, 2 + 2 + 1 on AVX2); gradients from 1 and 3 threads bitwise equal.
@pytest.mark.parametrize("kh,kw,pads,dtype", [
    (3, 3, (1, 1, 1, 1), torch.float32), (3, 3, (0, 0, 0, 0), torch.float32),
    (5, 5, (2, 2, 2, 2), torch.float32), (2, 2, (1, 0, 0, 1), torch.float32),
    (1, 3, (0, 0, 2, 1), torch.float32), (5, 3, (1, 3, 2, 0), torch.float64),
    (3, 5, (2, 2, 4, 1), torch.bfloat16), (4, 4, (3, 0, 1, 2), torch.float32),
])
def test_backward_small_kernels_row_order(kh, kw, pads, dtype):
    vec = 8 if dtype == torch.float64 else 16
    for n, h, w, c in ((3, 7, 9, 2 * vec), (1, 11, 72, 128), (2, 6, 5, vec)):
        check_backward_thread_invariant(
            ConvCfg(n=n, c=c, h=h, w=w, kh=kh, kw=kw, padding=pads, layout="nhwc", dtype=dtype))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_backward_56x56_c32(layout):
    cfg = ConvCfg(n=2, c=32, h=56, w=56, kh=7, kw=7, padding="same", layout=layout)
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_backward_from_sum_loss_broadcast_grad_output(layout):
    """y.sum().backward() hands the op an expanded (all-zero-strides) grad_output."""
    cfg = ConvCfg(n=2, c=10, h=9, w=12, kh=5, kw=3, stride=(2, 1), padding=(2, 1), layout=layout)
    x, w, b = make_inputs(cfg, requires_grad=True)
    run_op(x, w, b, cfg).sum().backward()
    gy = torch.ones((cfg.n, cfg.c) + cfg.out_hw)
    check_backward({"x": x.grad, "weight": w.grad, "bias": b.grad}, x, w, b, gy, cfg)


def test_backward_non_dense_grad_output():
    cfg = ConvCfg(n=2, c=8, h=10, w=10, kh=3, kw=3, padding=1, layout="nhwc")
    x, w, b = make_inputs(cfg, requires_grad=True)
    y = run_op(x, w, b, cfg)
    gy = torch.randn(2, 8, 10, 10).transpose(2, 3)  # neither NCHW nor NHWC dense
    g = torch.autograd.grad(y, (x, w, b), gy)
    check_backward({"x": g[0], "weight": g[1], "bias": g[2]}, x, w, b, gy, cfg)


def test_backward_non_dense_input():
    cfg = ConvCfg(n=2, c=6, h=11, w=10, kh=3, kw=5, stride=(2, 1), padding=(1, 2))
    base = torch.randn(2, 6, 10, 11, requires_grad=True)
    x = base.transpose(2, 3)  # non-dense logical NCHW
    w = torch.randn(6, 1, 3, 5, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    y = run_op(x, w, b, cfg)
    gy = make_grad_output(cfg)
    gbase, gw, gb = torch.autograd.grad(y, (base, w, b), gy)
    check_backward({"x": gbase.transpose(2, 3), "weight": gw, "bias": gb}, x, w, b, gy, cfg)


@pytest.mark.parametrize("which", ["x", "weight", "bias", "x+bias"])
def test_backward_partial_requires_grad(which):
    cfg = ConvCfg(n=2, c=9, h=8, w=9, kh=3, kw=3, padding=1, layout="nhwc")
    x, w, b = make_inputs(cfg)
    leaves = {"x": x, "weight": w, "bias": b}
    names = which.split("+")
    for n in names:
        leaves[n].requires_grad_(True)
    y = run_op(x, w, b, cfg)
    gy = make_grad_output(cfg)
    g = torch.autograd.grad(y, [leaves[n] for n in names], gy)
    check_backward(dict(zip(names, g)), x, w, b, gy, cfg)


def test_backward_without_bias_and_grad_accumulation():
    cfg = ConvCfg(n=1, c=5, h=7, w=7, kh=3, kw=3, padding=1, bias=False)
    x, w, _ = make_inputs(cfg, requires_grad=True)
    gy = make_grad_output(cfg)
    for _ in range(2):
        run_op(x, w, None, cfg).backward(gy)
    check_backward({"x": x.grad / 2, "weight": w.grad / 2}, x, w, None, gy, cfg)


# --------------------------------------------------------------------------- determinism


def _weight_grads(cfg, x, w, b, gy):
    xr, wr, br = (t.detach().requires_grad_(True) for t in (x, w, b))
    y = run_op(xr, wr, br, cfg)
    gw, gb = torch.autograd.grad(y, (wr, br), gy)
    return gw, gb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_weight_grad_deterministic_and_thread_count_independent(layout, dtype):
    cfg = ConvCfg(n=3, c=40, h=20, w=20, kh=7, kw=7, padding="same", layout=layout, dtype=dtype)
    x, w, b = make_inputs(cfg)
    gy = make_grad_output(cfg)
    old = fastvis.get_num_threads()
    try:
        fastvis.set_num_threads(2)
        runs = [_weight_grads(cfg, x, w, b, gy) for _ in range(3)]
        fastvis.set_num_threads(1)
        single = _weight_grads(cfg, x, w, b, gy)
        # Low level too.
        gw_ll = torch.empty_like(w)
        gb_ll = torch.empty_like(b)
        _C.dwconv_backward_weight(gy, x, gw_ll, gb_ll, cfg.stride, cfg.pads, cfg.dilation)
        fastvis.set_num_threads(2)
        gw_ll2 = torch.empty_like(w)
        gb_ll2 = torch.empty_like(b)
        _C.dwconv_backward_weight(gy, x, gw_ll2, gb_ll2, cfg.stride, cfg.pads, cfg.dilation)
    finally:
        fastvis.set_num_threads(0)  # back to following torch
    assert fastvis.get_num_threads() == old
    for i, (gw, gb) in enumerate(runs[1:], 1):
        assert torch.equal(gw, runs[0][0]), f"grad_weight differs between run 0 and run {i}"
        assert torch.equal(gb, runs[0][1]), f"grad_bias differs between run 0 and run {i}"
    diff = (single[0].double() - runs[0][0].double()).abs().max().item()
    assert torch.equal(single[0], runs[0][0]), (
        f"grad_weight with 1 thread != with 2 threads (max |diff| {diff:.3g})")
    assert torch.equal(single[1], runs[0][1]), "grad_bias with 1 thread != with 2 threads"
    assert torch.equal(gw_ll, gw_ll2) and torch.equal(gb_ll, gb_ll2), (
        "_C.dwconv_backward_weight depends on the thread count")
    check_backward({"weight": runs[0][0], "bias": runs[0][1]}, x, w, b, gy, cfg)


# The weight gradient's register window (stride 1 and dilation 1 along the row: taps in
# chunks of at most 7, outputs in blocks of 7 then one by one), and the input gradient
# through the forward window with the flipped kernel.
@pytest.mark.parametrize("kw", [2, 3, 5, 7, 8, 13, 14, 15])
@pytest.mark.parametrize("kh,c,w_in", [(1, 8, 5), (3, 12, 13), (7, 20, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backward_register_window(kw, kh, c, w_in, dtype):
    cfg = ConvCfg(n=2, c=c, h=9, w=w_in, kh=kh, kw=kw, padding="same", layout="nhwc", dtype=dtype)
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)


# The stride-1 input gradient of a k x 1 band runs the forward's row bands (see
# test_dwconv_forward.test_forward_row_band) on the flipped kernel; C of two AVX2 vectors
# (one vector of the AVX-512 path, or half of one for float32).
@pytest.mark.parametrize("kh,padding", [(11, "same"), (4, (3, 0)), (7, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_kx1_bands(kh, padding, dtype):
    vec = 4 if dtype == torch.float64 else 8
    cfg = ConvCfg(n=2, c=2 * vec, h=40, w=6, kh=kh, kw=1, padding=padding, layout="nhwc", dtype=dtype)
    grads, (x, w, b, gy) = autograd_grads(cfg)
    check_backward(grads, x, w, b, gy, cfg)
