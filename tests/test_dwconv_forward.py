"""Depthwise convolution forward (CPU) against a float64 F.conv2d oracle.

Covers the fast path (fastvis.ops.depthwise_conv2d and the low-level
fastvis._C.dwconv_forward), the scalar C++ reference (_C.dwconv_forward_reference)
and the pure-PyTorch reference (fastvis.ops.depthwise_conv2d_reference /
fastvis.use_reference). Tolerances are defined and justified in conftest.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import fastvis
import fastvis.ops
from conftest import (ConvCfg, check_forward, conv_configs, kernel_sizes, make_inputs, sweep,
                      unambiguous_layout)

_C = fastvis._C


def run_op(x, w, b, cfg: ConvCfg):
    return fastvis.ops.depthwise_conv2d(x, w, b, stride=cfg.stride_arg, padding=cfg.padding,
                                        dilation=cfg.dilation_arg)


def alloc_like_output(x, w, cfg: ConvCfg):
    shape = tuple(_C.dwconv_output_shape(x, w, cfg.stride, cfg.pads, cfg.dilation))
    return torch.empty(shape, dtype=x.dtype, memory_format=cfg.memory_format)


def check_layout(y, x, cfg: ConvCfg):
    if unambiguous_layout(x):
        assert y.is_contiguous(memory_format=cfg.memory_format), (
            f"output strides {y.stride()} do not keep the input layout {cfg.layout}; {cfg.short()}")


# --------------------------------------------------------------------------- the oracle itself


@sweep(40)
@given(cfg=conv_configs(max_c=6))
def test_oracle_padding_semantics_match_torch(cfg):
    """Sanity check of the test oracle: explicit F.pad == conv2d's own padding argument."""
    x, w, b = make_inputs(cfg)
    x, w = x.double(), w.double()
    b = None if b is None else b.double()
    ours = F.conv2d(F.pad(x, (cfg.pads[2], cfg.pads[3], cfg.pads[0], cfg.pads[1])), w, b,
                    stride=cfg.stride, dilation=cfg.dilation, groups=cfg.c)
    p = cfg.padding
    if isinstance(p, tuple) and len(p) == 4:
        return  # conv2d has no per-side padding
    torch_y = F.conv2d(x, w, b, stride=cfg.stride, padding=p, dilation=cfg.dilation, groups=cfg.c)
    assert torch.equal(ours, torch_y), cfg.short()
    assert ours.shape[2:] == cfg.out_hw


# --------------------------------------------------------------------------- fast path sweeps


@sweep(60)
@given(cfg=conv_configs(dtypes=(torch.float32,)))
def test_forward_float32(cfg):
    x, w, b = make_inputs(cfg)
    y = run_op(x, w, b, cfg)
    check_forward(y, x, w, b, cfg)
    check_layout(y, x, cfg)


@sweep(40)
@given(cfg=conv_configs(dtypes=(torch.float64,)))
def test_forward_float64(cfg):
    x, w, b = make_inputs(cfg)
    y = run_op(x, w, b, cfg)
    check_forward(y, x, w, b, cfg)
    check_layout(y, x, cfg)


@sweep(40)
@given(cfg=conv_configs(dtypes=(torch.bfloat16,)))
def test_forward_bfloat16(cfg):
    x, w, b = make_inputs(cfg)
    y = run_op(x, w, b, cfg)
    check_forward(y, x, w, b, cfg)
    check_layout(y, x, cfg)


@st.composite
def direct_path_configs(draw):
    """Problems the direct (unpacked) forward path serves: at most 15 taps and C a whole
    number of 32-byte vectors (8 floats / 4 doubles); every stride, dilation and padding.
    Its edge columns, interior pixel blocks of 6 / 3 / 1 and row ranges are all hit by
    widths up to 20."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    cfg = draw(conv_configs(dtypes=(dtype,), max_k=15, max_c=1))
    assume(cfg.kh * cfg.kw <= 15)
    vec = 4 if dtype == torch.float64 else 8
    return dataclasses.replace(cfg, c=vec * draw(st.integers(1, 6)))


@sweep(60)
@given(cfg=direct_path_configs())
def test_forward_direct_path(cfg):
    x, w, b = make_inputs(cfg)
    y = run_op(x, w, b, cfg)
    check_forward(y, x, w, b, cfg)
    check_layout(y, x, cfg)


@sweep(30)
@given(cfg=conv_configs(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_forward_lowlevel_fast_path(cfg):
    """_C.dwconv_forward writes into a caller-allocated output (scratch allocated by the binding)."""
    x, w, b = make_inputs(cfg)
    shape = tuple(_C.dwconv_output_shape(x, w, cfg.stride, cfg.pads, cfg.dilation))
    assert shape == (cfg.n, cfg.c) + cfg.out_hw, cfg.short()
    y = alloc_like_output(x, w, cfg).fill_(float("nan"))
    _C.dwconv_forward(x, w, b, y, cfg.stride, cfg.pads, cfg.dilation)
    check_forward(y, x, w, b, cfg)


@sweep(40)
@given(cfg=conv_configs(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_forward_cpp_scalar_reference(cfg):
    x, w, b = make_inputs(cfg)
    y = alloc_like_output(x, w, cfg).fill_(float("nan"))
    _C.dwconv_forward_reference(x, w, b, y, cfg.stride, cfg.pads, cfg.dilation)
    check_forward(y, x, w, b, cfg, name="y (C++ reference)")


@sweep(20)
@given(cfg=conv_configs(dtypes=(torch.float32, torch.float64)))
def test_forward_python_reference(cfg):
    x, w, b = make_inputs(cfg)
    y = fastvis.ops.depthwise_conv2d_reference(x, w, b, cfg.stride_arg, cfg.padding,
                                               cfg.dilation_arg)
    check_forward(y, x, w, b, cfg, name="y (pure-PyTorch reference)")


def test_use_reference_context_and_switch():
    cfg = ConvCfg(n=2, c=5, h=9, w=8, kh=3, kw=5, stride=(2, 1), dilation=(1, 2),
                  padding=(1, 0, 3, 2), layout="nhwc")
    x, w, b = make_inputs(cfg)
    fast = run_op(x, w, b, cfg)
    with fastvis.use_reference():
        y_ctx = run_op(x, w, b, cfg)
    check_forward(y_ctx, x, w, b, cfg, name="y (use_reference context)")
    try:
        fastvis.use_reference(True)
        y_on = run_op(x, w, b, cfg)
    finally:
        fastvis.use_reference(False)
    check_forward(y_on, x, w, b, cfg, name="y (use_reference(True))")
    y_off = run_op(x, w, b, cfg)
    assert torch.equal(y_off, fast), "fast path result changed after use_reference(False)"


# --------------------------------------------------------------------------- large kernels


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("k,c,hw", [(13, 17, (13, 20)), (31, 5, (9, 16)), (51, 3, (7, 12))])
def test_forward_large_kernels_same(k, c, hw, layout):
    cfg = ConvCfg(n=2, c=c, h=hw[0], w=hw[1], kh=k, kw=k, padding="same", layout=layout)
    x, w, b = make_inputs(cfg)
    check_forward(run_op(x, w, b, cfg), x, w, b, cfg)


@pytest.mark.parametrize("k,c,hw,dtype", [
    (31, 100, (40, 37), torch.float32), (13, 70, (30, 29), torch.float32),
    ((51, 24), 24, (12, 130), torch.float32), ((51, 24), 24, (12, 130), torch.bfloat16),
    ((51, 15), 40, (5, 125), torch.float64),
])
def test_forward_large_kernels_ring_of_rows(k, c, hw, dtype):
    """Several images, channel blocks (with a tail) and one-row tiles: each tile of a
    channel block packs only the rows its predecessor did not, in a ring of rows. The
    51-row kernels run kernel row outermost (use_window_rows, on AVX2 and AVX-512) over
    segments of 56 pixels: rows of 130 and 125 pixels take two whole segments and a
    partial one."""
    kh, kw = k if isinstance(k, tuple) else (k, k)
    cfg = ConvCfg(n=2, c=c, h=hw[0], w=hw[1], kh=kh, kw=kw, padding="same", layout="nhwc",
                  dtype=dtype)
    x, w, b = make_inputs(cfg)
    check_forward(run_op(x, w, b, cfg), x, w, b, cfg)


@pytest.mark.parametrize("kh,kw,stride,dilation,padding,hw", [
    (13, 13, (2, 2), (1, 1), 6, (20, 17)),
    (31, 31, (2, 1), (1, 1), (15, 15, 15, 20), (5, 20)),
    (51, 51, (1, 1), (1, 1), "valid", (51, 53)),
    (1, 31, (1, 1), (1, 1), "same", (6, 20)),
    (31, 1, (2, 2), (1, 1), (15, 15, 0, 0), (19, 4)),
    (1, 51, (1, 2), (1, 1), (0, 25), (3, 20)),
    (13, 13, (1, 1), (2, 2), "same", (11, 14)),
    (63, 1, (1, 1), (1, 1), "same", (20, 3)),
    (1, 63, (1, 1), (1, 1), (0, 0, 62, 0), (2, 5)),
])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_forward_large_kernels_mixed(kh, kw, stride, dilation, padding, hw, layout):
    cfg = ConvCfg(n=1, c=9, h=hw[0], w=hw[1], kh=kh, kw=kw, stride=stride, dilation=dilation,
                  padding=padding, layout=layout)
    x, w, b = make_inputs(cfg)
    y = run_op(x, w, b, cfg)
    check_forward(y, x, w, b, cfg)
    yr = alloc_like_output(x, w, cfg)
    _C.dwconv_forward_reference(x, w, b, yr, cfg.stride, cfg.pads, cfg.dilation)
    check_forward(yr, x, w, b, cfg, name="y (C++ reference)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_forward_56x56_c32(layout, dtype):
    cfg = ConvCfg(n=2, c=32, h=56, w=56, kh=7, kw=7, padding="same", layout=layout, dtype=dtype)
    x, w, b = make_inputs(cfg)
    y = run_op(x, w, b, cfg)
    check_forward(y, x, w, b, cfg)
    check_layout(y, x, cfg)


def test_forward_output_exactly_one_pixel():
    cfg = ConvCfg(n=2, c=19, h=7, w=9, kh=7, kw=5, dilation=(1, 2), padding="valid")
    assert cfg.out_hw == (1, 1)
    x, w, b = make_inputs(cfg)
    check_forward(run_op(x, w, b, cfg), x, w, b, cfg)


def test_forward_bias_none_equals_zero_bias():
    cfg = ConvCfg(n=2, c=12, h=10, w=11, kh=5, kw=5, padding=2, layout="nhwc")
    x, w, _ = make_inputs(cfg)
    a = run_op(x, w, None, cfg)
    b0 = run_op(x, w, torch.zeros(cfg.c), cfg)
    torch.testing.assert_close(a, b0, rtol=0, atol=0)


def test_forward_int_and_pair_arguments_agree():
    x = torch.randn(1, 6, 12, 12)
    w = torch.randn(6, 1, 3, 3)
    a = fastvis.ops.depthwise_conv2d(x, w, None, stride=2, padding=1, dilation=2)
    b = fastvis.ops.depthwise_conv2d(x, w, None, stride=(2, 2), padding=(1, 1), dilation=(2, 2))
    c = fastvis.ops.depthwise_conv2d(x, w, None, stride=(2, 2), padding=(1, 1, 1, 1),
                                     dilation=(2, 2))
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_forward_same_even_kernel_matches_torch_same():
    x = torch.randn(2, 7, 10, 9, dtype=torch.float64)
    w = torch.randn(7, 1, 4, 6, dtype=torch.float64)
    y = fastvis.ops.depthwise_conv2d(x, w, None, padding="same", dilation=(1, 3))
    ref = F.conv2d(x, w, None, padding="same", dilation=(1, 3), groups=7)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_output_memory_format_is_preserved(dtype, stride):
    x = torch.randn(2, 8, 9, 10).to(dtype)
    w = torch.randn(8, 1, 3, 3).to(dtype)
    y = fastvis.ops.depthwise_conv2d(x, w, None, stride=stride, padding=1)
    assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last), y.stride()
    xc = x.contiguous(memory_format=torch.channels_last)
    yc = fastvis.ops.depthwise_conv2d(xc, w, None, stride=stride, padding=1)
    assert yc.is_contiguous(memory_format=torch.channels_last) and not yc.is_contiguous(), yc.stride()
    cfg = ConvCfg(n=2, c=8, h=9, w=10, kh=3, kw=3, stride=(stride, stride), padding=1,
                  bias=False, dtype=dtype)
    check_forward(y, x, w, None, cfg)
    check_forward(yc, xc, w, None, cfg)


def _non_dense_variants():
    """(description, builder) of logical (2, 6, 11, 10) inputs that are neither NCHW nor NHWC dense."""
    return [
        ("spatial slice of NCHW", lambda: torch.randn(2, 6, 23, 12)[:, :, 1::2, 1:11]),
        ("channel slice of NHWC", lambda: torch.randn(2, 9, 11, 10)
         .contiguous(memory_format=torch.channels_last)[:, 2:8]),
        ("H/W transposed storage", lambda: torch.randn(2, 6, 10, 11).transpose(2, 3)),
        ("N/C permuted storage", lambda: torch.randn(6, 2, 11, 10).permute(1, 0, 2, 3)),
        ("batch broadcast (stride 0)", lambda: torch.randn(1, 6, 11, 10).expand(2, 6, 11, 10)),
        ("step-2 channel slice of NCHW", lambda: torch.randn(2, 12, 11, 10)[:, ::2]),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("variant", range(len(_non_dense_variants())),
                         ids=[d for d, _ in _non_dense_variants()])
def test_forward_non_dense_input(variant, dtype):
    desc, build = _non_dense_variants()[variant]
    x = build().to(dtype)
    assert x.shape == (2, 6, 11, 10)
    cfg = ConvCfg(n=2, c=6, h=11, w=10, kh=3, kw=5, stride=(1, 2), padding=(1, 2), dtype=dtype)
    w = torch.randn(6, 1, 3, 5).to(dtype)
    b = torch.randn(6).to(dtype)
    y = run_op(x, w, b, cfg)
    check_forward(y, x, w, b, cfg, name=f"y ({desc})")
    assert y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last), (
        f"output of a non-dense input should be dense, strides {y.stride()}")


def test_forward_non_contiguous_weight_and_bias():
    cfg = ConvCfg(n=2, c=10, h=12, w=13, kh=5, kw=3, padding=(2, 1), layout="nhwc")
    x, _, _ = make_inputs(cfg)
    w = torch.randn(10, 1, 3, 5).transpose(2, 3)  # (10,1,5,3) with transposed strides
    b = torch.randn(20)[::2]
    assert not w.is_contiguous() and not b.is_contiguous()
    check_forward(run_op(x, w, b, cfg), x, w, b, cfg)
    # The low-level entry points take any weight strides too.
    y = alloc_like_output(x, w, cfg)
    _C.dwconv_forward(x, w, b, y, cfg.stride, cfg.pads, cfg.dilation)
    check_forward(y, x, w, b, cfg, name="y (_C.dwconv_forward)")


# --------------------------------------------------------------------------- thread count


def test_forward_independent_of_thread_count():
    cfg = ConvCfg(n=2, c=24, h=20, w=20, kh=7, kw=7, padding="same", layout="nhwc")
    x, w, b = make_inputs(cfg)
    old = fastvis.get_num_threads()
    try:
        fastvis.set_num_threads(1)
        y1 = run_op(x, w, b, cfg)
        fastvis.set_num_threads(2)
        y2 = run_op(x, w, b, cfg)
    finally:
        fastvis.set_num_threads(0)  # back to following torch
    check_forward(y1, x, w, b, cfg)
    assert torch.equal(y1, y2), "forward result depends on the thread count"


@sweep(15)
@given(ks=kernel_sizes(max_k=7), c=st.integers(1, 20))
def test_forward_kernel_shapes_batch1_fp64(ks, c):
    """Every kernel shape 1..7 x 1..7 at 'same' padding on an odd image, float64 (tight)."""
    cfg = ConvCfg(n=1, c=c, h=13, w=11, kh=ks[0], kw=ks[1], padding="same", dtype=torch.float64)
    x, w, b = make_inputs(cfg)
    check_forward(run_op(x, w, b, cfg), x, w, b, cfg)


def test_concurrent_calls_from_python_threads():
    """The binding releases the GIL: concurrent calls into the core's one thread pool
    from several Python threads must neither hang nor mix up results."""
    import threading

    cfgs = [ConvCfg(n=2, c=16 + i, h=18, w=17, kh=3 + 2 * (i % 3), kw=3 + 2 * (i % 3),
                    padding="same", layout="nhwc" if i % 2 else "nchw") for i in range(4)]
    data = [make_inputs(cfg) for cfg in cfgs]
    expected = [run_op(*d, cfg) for d, cfg in zip(data, cfgs)]
    errors, mismatches = [], []

    def worker(i):
        try:
            for _ in range(25):
                y = run_op(*data[i], cfgs[i])
                if not torch.equal(y, expected[i]):
                    mismatches.append(i)
                    return
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "concurrent calls hung (> 120 s)"
    assert not errors, errors
    assert not mismatches, f"results differ under concurrency for configs {mismatches}"
    for (x, w, b), cfg, y in zip(data, cfgs, expected):
        check_forward(y, x, w, b, cfg)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_under_no_grad_and_inference_mode(mode):
    cfg = ConvCfg(n=2, c=8, h=10, w=10, kh=5, kw=5, padding=2, layout="nhwc")
    x, w, b = make_inputs(cfg)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        y = run_op(x, w.requires_grad_(True), b, cfg)
    assert not y.requires_grad
    check_forward(y, x, w, b, cfg)


# Stride 1 along the row, horizontal dilation 1: the register-window kernels (kernel rows
# in chunks of 7 columns, then kw % 7; blocks of 10 / 9 / 7 pixels, then 4, 2, 1). Widths
# 1..23 leave every remainder; C = 8 / 24 take the direct path when kh * kw <= 15, C = 12
# and 20 the packed one with a masked channel tail.
@pytest.mark.parametrize("kw", [2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 21])
@pytest.mark.parametrize("kh,c,dil_h", [(1, 8, 1), (3, 12, 1), (2, 24, 2), (5, 20, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_register_window(kw, kh, c, dil_h, dtype):
    for w_in in (1, 5, 11, 23):
        cfg = ConvCfg(n=2, c=c, h=6, w=w_in, kh=kh, kw=kw, dilation=(dil_h, 1), padding="same",
                      layout="nhwc", dtype=dtype)
        x, w, b = make_inputs(cfg)
        y = run_op(x, w, b, cfg)
        check_forward(y, x, w, b, cfg)


# The packed forward keeps each thread's packed input rows in a ring and packs only the
# rows a tile does not share with the thread's previous tile: tall images (many tiles per
# image), vertical stride and dilation (tiles overlapping by other amounts), 1-3 threads
# (other runs of tiles per thread), several images (a run crossing to the next image).
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("kh,kw,stride,dilation", [(7, 7, (1, 1), (1, 1)), (5, 3, (2, 1), (1, 1)),
                                                   (3, 5, (1, 1), (2, 1)), (9, 9, (2, 2), (1, 1))])
def test_forward_packed_row_reuse(threads, kh, kw, stride, dilation):
    cfg = ConvCfg(n=3, c=40, h=45, w=17, kh=kh, kw=kw, stride=stride, dilation=dilation,
                  padding=(kh // 2 * dilation[0], kw // 2), layout="nhwc")
    fastvis.set_num_threads(threads)
    try:
        x, w, b = make_inputs(cfg)
        y = run_op(x, w, b, cfg)
    finally:
        fastvis.set_num_threads(0)  # back to following torch
    check_forward(y, x, w, b, cfg)


# k x 1 kernels in row bands (stride 1 and dilation 1 down the column, no horizontal
# padding or stride, C a whole number of vectors: each output row a weighted sum of kh
# input rows, bands of 4-8 rows). Heights below kh, at kh, a band and a bit, several bands;
# padding apart, asymmetric, and up to kh - 1 (rows that read a single input row);
# kh up to 63; C of one and several vectors of the widest path (16 floats, 8 doubles),
# and C that is not (the other paths); 1-3 threads (a thread's rows starting inside a
# band or an image). Horizontal stride 2 takes the tap-list path.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("kh,pads,sw,dtype", [
    (11, (5, 5, 0, 0), 1, torch.float32), (2, (0, 1, 0, 0), 1, torch.float32),
    (7, (2, 6, 0, 0), 2, torch.float32), (15, (7, 7, 0, 0), 1, torch.bfloat16),
    (9, (0, 0, 0, 0), 1, torch.float64), (3, (1, 1, 0, 0), 2, torch.float64),
    (5, (4, 3, 0, 0), 1, torch.float32), (31, (15, 15, 0, 0), 1, torch.float32),
    (63, (31, 31, 0, 0), 1, torch.float64), (3, (2, 0, 0, 0), 1, torch.float32),
    # 7, 9, 11 on AVX-512: bands of 8 rows, weights in registers (row_band_regw)
    (7, (3, 3, 0, 0), 1, torch.bfloat16), (11, (10, 0, 0, 0), 1, torch.float64),
    (9, (4, 4, 0, 0), 1, torch.float32),
])
def test_forward_row_band(threads, kh, pads, sw, dtype):
    vec = 8 if dtype == torch.float64 else 16
    fastvis.set_num_threads(threads)
    try:
        short = max(1, kh - min(3, pads[0] + pads[1]))  # the padded input still holds the kernel
        for h, c in ((short, 3 * vec), (kh, vec), (kh + 5, 2 * vec), (29, vec),
                     (61, 5 * vec), (13, 12)):
            cfg = ConvCfg(n=2, c=c, h=h, w=7, kh=kh, kw=1, stride=(1, sw), dilation=(1, 3),
                          padding=pads, layout="nhwc", dtype=dtype)
            x, w, b = make_inputs(cfg)
            y = run_op(x, w, b, cfg)
            check_forward(y, x, w, b, cfg)
    finally:
        fastvis.set_num_threads(0)  # back to following torch


# Square 3x3 / 5x5 / 7x7 kernels at stride 1 and dilation 1 with C a whole number of vectors
# take the direct path in groups of output rows on AVX-512 (3 rows for 3x3 and 5x5, 2 for
# 7x7; blocks of 6 / 4 / 6 pixels, then 4, 2, 1), the image's top and bottom rows and a
# thread's last rows one at a time. Heights from one output row to several groups and a
# remainder, zero / "same" / asymmetric / kernel - 1 paddings (rows and columns that read
# only part of the kernel), widths leaving no interior column up to several blocks; 1-3
# threads (a thread's rows starting inside a group). On other instruction sets the same
# shapes run the one-row paths, checked all the same.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("k,pads,dtype", [
    (3, (1, 1, 1, 1), torch.float32), (3, (0, 0, 0, 0), torch.float64),
    (3, (2, 0, 1, 2), torch.bfloat16), (5, (2, 2, 2, 2), torch.float32),
    (5, (4, 1, 0, 3), torch.float32), (7, (3, 3, 3, 3), torch.float32),
    (7, (6, 0, 2, 5), torch.float64), (7, (0, 0, 6, 0), torch.bfloat16),
])
def test_forward_row_groups(threads, k, pads, dtype):
    vec = 8 if dtype == torch.float64 else 16
    # the least height / width the padding leaves room for the kernel in
    hmin, wmin = max(1, k - pads[0] - pads[1]), max(1, k - pads[2] - pads[3])
    _check_nhwc_shapes(threads, k, k, pads, dtype,
                       ((2, hmin, 9, vec), (1, hmin + 1, wmin, 2 * vec), (3, 11, 13, vec),
                        (2, 29, 30, 3 * vec), (1, 17, 56, 8 * vec), (2, 9, 7, 12)))


def _check_nhwc_shapes(threads, kh, kw, pads, dtype, shapes):
    """The forward of NHWC problems (n, h, w, c) against the oracle on `threads` threads."""
    fastvis.set_num_threads(threads)
    try:
        for n, h, w, c in shapes:
            cfg = ConvCfg(n=n, c=c, h=h, w=w, kh=kh, kw=kw, padding=pads, layout="nhwc", dtype=dtype)
            x, wt, b = make_inputs(cfg)
            y = run_op(x, wt, b, cfg)
            check_forward(y, x, wt, b, cfg)
    finally:
        fastvis.set_num_threads(0)  # back to following torch


def test_forward_row_groups_channel_slice():
    """The Inception op runs its square branch on a channel slice of the NHWC input (pixel
    pitch > channels): 16 channels of 128, a whole vector, take the row groups."""
    g, c, h, w = 16, 128, 13, 20
    x = torch.randn(2, c, h, w).to(memory_format=torch.channels_last)
    hw_w, hw_b = torch.randn(g, 1, 3, 3), torch.randn(g)
    w_w, w_b = torch.randn(g, 1, 1, 11), torch.randn(g)
    h_w, h_b = torch.randn(g, 1, 11, 1), torch.randn(g)
    y = fastvis.ops.inception_depthwise_conv2d(x, hw_w, hw_b, w_w, w_b, h_w, h_b)
    ref = F.conv2d(x[:, c - 3 * g:c - 2 * g].double(), hw_w.double(), hw_b.double(), padding=1, groups=g)
    torch.testing.assert_close(y[:, c - 3 * g:c - 2 * g].double(), ref, rtol=1e-5, atol=1e-5)


# Packed tiles of kernels 7 to ~30 columns wide at stride 1 and dilation 1 run their output
# rows in pairs on AVX-512 (pair_pixels: chunks of 7 columns then kw % 7, blocks of 7 / 4 /
# 2 / 1 pixels, masked stores for a channel tail); rows whose kernel reaches outside the
# image, and a tile's odd last row, one at a time. Tall images (several tiles per image),
# asymmetric and zero paddings, C with and without a tail, 1-3 threads.
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kh,kw,pads,dtype", [
    (13, 13, (6, 6, 6, 6), torch.float32), (9, 9, (0, 0, 0, 0), torch.float32),
    (11, 8, (10, 0, 3, 4), torch.float64), (15, 15, (7, 7, 7, 7), torch.bfloat16),
    (13, 21, (2, 9, 10, 10), torch.float32), (2, 9, (1, 0, 4, 4), torch.float32),
])
def test_forward_tile_row_pairs(threads, kh, kw, pads, dtype):
    vec = 8 if dtype == torch.float64 else 16
    _check_nhwc_shapes(threads, kh, kw, pads, dtype,
                       ((2, 45, 17, 2 * vec + 8), (1, kh + 2, kw + 5, 8 * vec), (3, 30, 56, vec)))
