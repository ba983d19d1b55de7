"""Bad inputs to depthwise convolution raise the documented exception with a helpful
message (never a crash or a hang); documented edge cases (empty batch, NaN) work."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastvis
import fastvis.ops
from conftest import ConvCfg, check_backward, check_forward, make_inputs

_C = fastvis._C
dwconv = fastvis.ops.depthwise_conv2d


def _xw(c=4, h=8, w=8, k=3, dtype=torch.float32):
    return torch.randn(2, c, h, w, dtype=dtype), torch.randn(c, 1, k, k, dtype=dtype)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_input_dtype_is_type_error(dtype):
    x = torch.ones(1, 3, 6, 6, dtype=dtype)
    w = torch.ones(3, 1, 3, 3, dtype=dtype)
    with pytest.raises(TypeError, match=r"(?i)dtype|int|uint8|bool"):
        dwconv(x, w)


def test_float16_on_cpu_is_type_error():
    x, w = _xw(dtype=torch.float16)
    with pytest.raises(TypeError, match=r"(?i)float16|half"):
        dwconv(x, w, padding=1)


@pytest.mark.parametrize("xd,wd", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                   (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_weight_dtype_mismatch_is_type_error(xd, wd):
    x = torch.randn(1, 3, 6, 6, dtype=xd)
    w = torch.randn(3, 1, 3, 3, dtype=wd)
    with pytest.raises(TypeError, match=r"(?i)dtype|weight"):
        dwconv(x, w)


def test_bias_dtype_mismatch_is_type_error():
    x, w = _xw()
    with pytest.raises(TypeError, match=r"(?i)dtype|bias"):
        dwconv(x, w, torch.randn(4, dtype=torch.float64))


def test_complex_input_is_type_error():
    x = torch.randn(1, 2, 5, 5, dtype=torch.complex64)
    w = torch.randn(2, 1, 3, 3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"(?i)dtype|complex"):
        dwconv(x, w)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("which", ["weight", "bias", "x"])
def test_mixed_devices_names_the_devices(which):
    x, w = _xw()
    b = torch.randn(4)
    if which == "weight":
        w = w.to("meta")
    elif which == "bias":
        b = b.to("meta")
    else:
        x = x.to("meta")
    with pytest.raises((ValueError, RuntimeError)) as info:
        dwconv(x, w, b, padding=1)
    msg = str(info.value).lower()
    assert "meta" in msg and "cpu" in msg, f"message does not name both devices: {info.value}"


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 1, 4, 8, 8), (8, 8)])
def test_input_must_be_4d(shape):
    x = torch.randn(*shape)
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match=r"(?i)4-?d|dim|shape"):
        dwconv(x, w)


@pytest.mark.parametrize("wshape,desc", [
    ((4, 2, 3, 3), "weight (C, 2, k, k): groups mismatch"),
    ((8, 1, 3, 3), "weight (2C, 1, k, k): groups mismatch"),
    ((3, 1, 3, 3), "weight with C-1 channels"),
    ((4, 1, 3), "3-D weight (C, 1, k)"),
    ((4, 1, 3, 3, 1), "5-D weight"),
    ((1, 1, 3, 3), "weight with one channel for C=4"),
])
def test_weight_shape_errors(wshape, desc):
    x, _ = _xw(c=4)
    with pytest.raises(ValueError, match=r"(?i)weight"):
        dwconv(x, torch.randn(*wshape), padding=1)


@pytest.mark.parametrize("bshape", [(5,), (3,), (4, 1), ()])
def test_bias_shape_errors(bshape):
    x, w = _xw(c=4)
    with pytest.raises(ValueError, match=r"(?i)bias"):
        dwconv(x, w, torch.randn(bshape), padding=1)


@pytest.mark.parametrize("k", [(64, 64), (64, 1), (1, 64), (0, 3)])
def test_kernel_size_out_of_range(k):
    x = torch.randn(1, 1, 64, 64)
    w = torch.randn(1, 1, *k)
    with pytest.raises(ValueError, match=r"(?i)kernel|weight"):
        dwconv(x, w)


def test_kernel_63_is_accepted():
    cfg = ConvCfg(n=1, c=2, h=63, w=4, kh=63, kw=3, padding=(0, 1))
    x, w, b = make_inputs(cfg)
    check_forward(dwconv(x, w, b, padding=(0, 1)), x, w, b, cfg)


def test_zero_channels_is_value_error():
    x = torch.randn(2, 0, 8, 8)
    w = torch.randn(0, 1, 3, 3)
    with pytest.raises(ValueError, match=r"(?i)channel|\bC\b|empty|zero|0"):
        dwconv(x, w, padding=1)


@pytest.mark.parametrize("h,w,k,padding,dilation", [
    (2, 8, 3, 0, 1),        # H smaller than the kernel
    (8, 2, 3, "valid", 1),  # W smaller than the kernel
    (4, 8, 3, 0, 2),        # dilated kernel (5) larger than H
    (3, 3, 7, (1, 1), 1),   # too small even with padding
    (0, 8, 3, 1, 1),        # empty image
])
def test_image_too_small_for_kernel(h, w, k, padding, dilation):
    x = torch.randn(1, 3, h, w)
    wt = torch.randn(3, 1, k, k)
    with pytest.raises(ValueError, match=r"(?i)small|kernel|size|output|empty|input"):
        dwconv(x, wt, padding=padding, dilation=dilation)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("stride", [0, -1, 3, (1, 0), (2, 3), (1, -2)])
def test_bad_stride(stride):
    x, w = _xw()
    with pytest.raises(ValueError, match=r"(?i)stride"):
        dwconv(x, w, stride=stride, padding=1)


@pytest.mark.parametrize("dilation", [0, -1, (1, 0), (-2, 1)])
def test_bad_dilation(dilation):
    x, w = _xw()
    with pytest.raises(ValueError, match=r"(?i)dilation"):
        dwconv(x, w, dilation=dilation, padding=1)


@pytest.mark.parametrize("padding", [
    3,              # > dilation*(k-1) = 2 for k=3
    (3, 0),
    (0, 3),
    (0, 3, 0, 0),   # bottom too large
    (0, 0, 0, 3),   # right too large
    -1,
    (1, -1),
    (0, 0, -1, 0),
])
def test_bad_padding(padding):
    x, w = _xw(k=3)
    with pytest.raises(ValueError, match=r"(?i)pad"):
        dwconv(x, w, padding=padding)


def test_padding_limit_scales_with_dilation():
    x, w = _xw(k=3, h=10, w=10)
    # dilation 2 -> limit 4: 4 fine, 5 not.
    cfg = ConvCfg(n=2, c=4, h=10, w=10, kh=3, kw=3, dilation=(2, 2), padding=4, bias=False)
    check_forward(dwconv(x, w, None, padding=4, dilation=2), x, w, None, cfg)
    with pytest.raises(ValueError, match=r"(?i)pad"):
        dwconv(x, w, padding=5, dilation=2)


@pytest.mark.parametrize("padding", ["full", "", (1, 1, 1)])
def test_unknown_padding_spec(padding):
    x, w = _xw()
    with pytest.raises(ValueError, match=r"(?i)pad"):
        dwconv(x, w, padding=padding)


@pytest.mark.parametrize("stride", [2, (2, 1), (1, 2)])
def test_same_padding_requires_stride_1(stride):
    x, w = _xw()
    with pytest.raises(ValueError, match=r"(?i)same"):
        dwconv(x, w, stride=stride, padding="same")


# --------------------------------------------------------------------------- edge cases that work


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_empty_batch_forward_and_backward(layout):
    cfg = ConvCfg(n=0, c=5, h=9, w=8, kh=3, kw=3, stride=(2, 1), padding=1, layout=layout)
    x, w, b = make_inputs(cfg, requires_grad=True)
    y = dwconv(x, w, b, stride=(2, 1), padding=1)
    assert y.shape == (0, 5) + cfg.out_hw
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.empty_like(y))
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


def test_nan_input_propagates_nan():
    cfg = ConvCfg(n=1, c=3, h=9, w=9, kh=3, kw=3, padding=1, layout="nhwc")
    x, w, b = make_inputs(cfg)
    x = x.clone()
    x[0, 1, 4, 4] = float("nan")
    y = dwconv(x, w, b, padding=1)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=3)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), (
        f"NaN pattern differs: got NaN at {torch.isnan(y).nonzero().tolist()}, "
        f"expected at {torch.isnan(ref).nonzero().tolist()}")
    assert int(torch.isnan(y).sum()) == 9
    finite = ~torch.isnan(ref)
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=0, atol=1e-4)


def test_inf_weight_propagates():
    x, w = _xw(c=2, k=3)
    w = w.clone()
    w[1, 0, 1, 1] = math.inf
    y = dwconv(x, w, padding=1)
    ref = F.conv2d(x.double(), w.double(), padding=1, groups=2)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref))
    assert torch.isfinite(y[:, 0]).all()


@pytest.mark.parametrize("case", ["padding too large", "kernel 64", "float16", "4-tuple pad too large"])
def test_reference_mode_validates_like_fast_path(case):
    """fastvis.use_reference() swaps the implementation, not the op's contract: the
    documented errors are raised in reference mode too."""
    x, w = _xw(c=4, h=70, w=70, k=3)
    kwargs = {"padding": 1}
    exc = ValueError
    if case == "padding too large":
        kwargs = {"padding": 3}
    elif case == "4-tuple pad too large":
        kwargs = {"padding": (0, 0, 3, 0)}
    elif case == "kernel 64":
        w = torch.randn(4, 1, 64, 64)
        kwargs = {"padding": 0}
    elif case == "float16":
        x, w, exc = x.half(), w.half(), TypeError
    with pytest.raises(exc):  # the fast path
        dwconv(x, w, **kwargs)
    with fastvis.use_reference():
        with pytest.raises(exc):
            dwconv(x, w, **kwargs)


def test_errors_also_raised_when_grad_enabled():
    x, w = _xw()
    x.requires_grad_(True)
    w.requires_grad_(True)
    with pytest.raises(ValueError, match=r"(?i)stride"):
        dwconv(x, w, stride=3, padding=1)


# --------------------------------------------------------------------------- low level (_C)


def _ll_args():
    x = torch.randn(2, 16, 12, 12)
    w = torch.randn(16, 1, 3, 3)
    return x, w, (1, 1), (1, 1, 1, 1), (1, 1)


@pytest.mark.parametrize("yshape", [(2, 16, 12, 11), (2, 15, 12, 12), (1, 16, 12, 12),
                                    (2, 16, 12, 12, 1)])
def test_lowlevel_output_wrong_shape(yshape):
    x, w, s, p, d = _ll_args()
    y = torch.empty(*yshape)
    with pytest.raises(ValueError, match=r"(?i)\by\b|out|shape"):
        _C.dwconv_forward(x, w, None, y, s, p, d)


def test_lowlevel_output_wrong_layout():
    x, w, s, p, d = _ll_args()
    xc = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty(2, 16, 12, 12)  # NCHW for an NHWC input
    with pytest.raises(ValueError, match=r"(?i)layout|\by\b|out|channels|nhwc|nchw"):
        _C.dwconv_forward(xc, w, None, y, s, p, d)
    y2 = torch.empty(2, 16, 12, 12, memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"(?i)layout|\by\b|out|channels|nhwc|nchw"):
        _C.dwconv_forward(x, w, None, y2, s, p, d)
    y3 = torch.empty(2, 16, 12, 24)[..., ::2]  # not dense at all
    with pytest.raises(ValueError, match=r"(?i)layout|\by\b|out|dense|stride|contig"):
        _C.dwconv_forward(x, w, None, y3, s, p, d)


def test_lowlevel_output_wrong_dtype():
    x, w, s, p, d = _ll_args()
    y = torch.empty(2, 16, 12, 12, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"(?i)dtype|\by\b|out"):
        _C.dwconv_forward(x, w, None, y, s, p, d)


def test_lowlevel_grad_x_wrong_shape_and_grad_w_wrong_shape():
    x, w, s, p, d = _ll_args()
    gy = torch.randn(2, 16, 12, 12)
    with pytest.raises(ValueError, match=r"(?i)grad|shape"):
        _C.dwconv_backward_input(gy, w, torch.empty(2, 16, 12, 13), s, p, d)
    with pytest.raises(ValueError, match=r"(?i)grad|shape|weight"):
        _C.dwconv_backward_weight(gy, x, torch.empty(16, 1, 3, 4), None, s, p, d)
    with pytest.raises(ValueError, match=r"(?i)grad|shape|bias"):
        _C.dwconv_backward_weight(gy, x, torch.empty(16, 1, 3, 3), torch.empty(15), s, p, d)


@pytest.mark.parametrize("bad", [
    dict(stride=(0, 1)), dict(stride=(3, 1)), dict(dilation=(0, 1)),
    dict(padding=(3, 0, 0, 0)), dict(padding=(0, 0, 0, 3)), dict(padding=(-1, 0, 0, 0)),
])
def test_lowlevel_bad_params(bad):
    x, w, s, p, d = _ll_args()
    args = dict(stride=s, padding=p, dilation=d)
    args.update(bad)
    key = next(iter(bad))
    pattern = {"stride": "stride", "dilation": "dilation", "padding": "pad"}[key]
    y = torch.empty(2, 16, 12, 12)
    with pytest.raises(ValueError, match=f"(?i){pattern}"):
        _C.dwconv_forward(x, w, None, y, args["stride"], args["padding"], args["dilation"])
    with pytest.raises(ValueError, match=f"(?i){pattern}"):
        _C.dwconv_output_shape(x, w, args["stride"], args["padding"], args["dilation"])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_lowlevel_scratch_too_small(layout):
    """A scratch buffer smaller than the core asks for is rejected, never overrun."""
    x, w, s, p, d = _ll_args()
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    need = _C.dwconv_forward_scratch_bytes(x, w, s, p, d)
    # The CPU core always needs scratch (at least the packed weights), so "too small" exists.
    assert isinstance(need, int) and need > 0
    y = torch.empty(2, 16, 12, 12, memory_format=fmt)
    scratch = torch.empty(need - 1, dtype=torch.uint8)
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)scratch"):
        _C.dwconv_forward(x, w, None, y, s, p, d, scratch)
    # and exactly `need` bytes are enough
    _C.dwconv_forward(x, w, None, y, s, p, d, torch.empty(need, dtype=torch.uint8))
    cfg = ConvCfg(n=2, c=16, h=12, w=12, kh=3, kw=3, padding=1, bias=False, layout=layout)
    check_forward(y, x, w, None, cfg)


def test_lowlevel_backward_scratch_too_small():
    x, w, s, p, d = _ll_args()  # NCHW: the NHWC-native fast paths need scratch to transpose
    gy = torch.randn(2, 16, 12, 12)
    checked = 0
    for fn_need, call in [
        (lambda: _C.dwconv_backward_input_scratch_bytes(gy, w, torch.empty_like(x), s, p, d),
         lambda sc: _C.dwconv_backward_input(gy, w, torch.empty_like(x), s, p, d, sc)),
        (lambda: _C.dwconv_backward_weight_scratch_bytes(gy, x, torch.empty_like(w), s, p, d),
         lambda sc: _C.dwconv_backward_weight(gy, x, torch.empty_like(w), None, s, p, d, sc)),
    ]:
        need = fn_need()
        assert need > 0, "the CPU backward entry points always need scratch (packed weights/partials)"
        with pytest.raises((ValueError, RuntimeError), match=r"(?i)scratch"):
            call(torch.empty(need - 1, dtype=torch.uint8))
        checked += 1
    assert checked == 2


def test_lowlevel_errors_name_the_argument():
    x, w, s, p, d = _ll_args()
    with pytest.raises(TypeError, match=r"(?i)weight|dtype"):
        _C.dwconv_forward(x, w.double(), None, torch.empty(2, 16, 12, 12), s, p, d)
    with pytest.raises(ValueError, match=r"(?i)weight"):
        _C.dwconv_forward(x, torch.randn(8, 1, 3, 3), None, torch.empty(2, 16, 12, 12), s, p, d)
    with pytest.raises(ValueError, match=r"(?i)bias"):
        _C.dwconv_forward(x, w, torch.randn(3), torch.empty(2, 16, 12, 12), s, p, d)
    with pytest.raises(TypeError, match=r"(?i)float16|half|dtype"):
        _C.dwconv_forward(x.half(), w.half(), None, torch.empty(2, 16, 12, 12).half(), s, p, d)


def test_lowlevel_reference_rejects_bad_arguments_too():
    x, w, s, p, d = _ll_args()
    with pytest.raises(ValueError, match=r"(?i)\by\b|out|shape"):
        _C.dwconv_forward_reference(x, w, None, torch.empty(2, 16, 12, 11), s, p, d)
    with pytest.raises(ValueError, match=r"(?i)stride"):
        _C.dwconv_forward_reference(x, w, None, torch.empty(2, 16, 12, 12), (0, 1), p, d)


def test_error_then_success_leaves_no_state():
    """After a rejected call the next valid call still gives the right answer."""
    cfg = ConvCfg(n=2, c=7, h=10, w=10, kh=5, kw=5, padding=2, layout="nhwc")
    x, w, b = make_inputs(cfg, requires_grad=True)
    with pytest.raises(ValueError):
        dwconv(x, w, b, padding=9)
    y = dwconv(x, w, b, padding=2)
    check_forward(y, x, w, b, cfg)
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, w, b), gy)
    check_backward({"x": g[0], "weight": g[1], "bias": g[2]}, x, w, b, gy, cfg)
