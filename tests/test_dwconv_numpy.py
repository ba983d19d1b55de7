"""The low-level _C entry points on NumPy arrays (through DLPack), both layouts,
against the float64 torch oracle. Outputs are caller-allocated and written in place."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvis
from conftest import ConvCfg, check_backward, check_forward, conv_configs, sweep

_C = fastvis._C

NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def np_activation(n, c, h, w, dtype, layout, rng=None, fill=None):
    """A logical (N, C, H, W) array: C-contiguous NCHW, or an NHWC array transposed."""
    if layout == "nhwc":
        shape = (n, h, w, c)
    else:
        shape = (n, c, h, w)
    if fill is None:
        a = rng.standard_normal(shape).astype(dtype)
    else:
        a = np.full(shape, fill, dtype=dtype)
    return a.transpose(0, 3, 1, 2) if layout == "nhwc" else a


def t(a):
    """A torch view (copy-free) of a NumPy array, for the oracle only."""
    return None if a is None else torch.from_numpy(a)


def np_inputs(cfg: ConvCfg, rng):
    dt = NP_DTYPES[cfg.dtype]
    x = np_activation(cfg.n, cfg.c, cfg.h, cfg.w, dt, cfg.layout, rng)
    w = rng.standard_normal((cfg.c, 1, cfg.kh, cfg.kw)).astype(dt)
    b = rng.standard_normal(cfg.c).astype(dt) if cfg.bias else None
    return x, w, b


@sweep(40)
@given(cfg=conv_configs(dtypes=(torch.float32, torch.float64), max_c=24),
       seed=st.integers(0, 2**31 - 1), reference=st.booleans())
def test_numpy_forward(cfg, seed, reference):
    rng = np.random.default_rng(seed)
    x, w, b = np_inputs(cfg, rng)
    shape = tuple(_C.dwconv_output_shape(x, w, cfg.stride, cfg.pads, cfg.dilation))
    assert shape == (cfg.n, cfg.c) + cfg.out_hw, cfg.short()
    y = np_activation(*shape, NP_DTYPES[cfg.dtype], cfg.layout, fill=np.nan)
    fn = _C.dwconv_forward_reference if reference else _C.dwconv_forward
    fn(x, w, b, y, cfg.stride, cfg.pads, cfg.dilation)
    check_forward(t(y), t(x), t(w), t(b), cfg,
                  name="y (numpy, C++ reference)" if reference else "y (numpy)")


@sweep(30)
@given(cfg=conv_configs(dtypes=(torch.float32, torch.float64), max_c=24),
       seed=st.integers(0, 2**31 - 1), reference=st.booleans())
def test_numpy_backward(cfg, seed, reference):
    rng = np.random.default_rng(seed)
    dt = NP_DTYPES[cfg.dtype]
    x, w, b = np_inputs(cfg, rng)
    oh, ow = cfg.out_hw
    gy = np_activation(cfg.n, cfg.c, oh, ow, dt, cfg.layout, rng)
    gx = np_activation(cfg.n, cfg.c, cfg.h, cfg.w, dt, cfg.layout, fill=np.nan)
    gw = np.full(w.shape, np.nan, dtype=dt)
    gb = np.full(cfg.c, np.nan, dtype=dt) if cfg.bias else None
    args = (cfg.stride, cfg.pads, cfg.dilation)
    if reference:
        _C.dwconv_backward_input_reference(gy, w, gx, *args)
        _C.dwconv_backward_weight_reference(gy, x, gw, gb, *args)
    else:
        _C.dwconv_backward_input(gy, w, gx, *args)
        _C.dwconv_backward_weight(gy, x, gw, gb, *args)
    grads = {"x": t(gx), "weight": t(gw)}
    if gb is not None:
        grads["bias"] = t(gb)
    check_backward(grads, t(x), t(w), t(b), t(gy), cfg, prefix="numpy grad_")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_numpy_matches_torch_bitwise(layout):
    """Same data through NumPy and torch gives the identical result (same kernel)."""
    rng = np.random.default_rng(0)
    cfg = ConvCfg(n=2, c=19, h=15, w=13, kh=5, kw=5, stride=(2, 1), padding=(2, 2),
                  layout=layout)
    x, w, b = np_inputs(cfg, rng)
    y = np_activation(cfg.n, cfg.c, *cfg.out_hw, np.float32, layout, fill=np.nan)
    _C.dwconv_forward(x, w, b, y, cfg.stride, cfg.pads, cfg.dilation)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    xt = torch.from_numpy(x).clone(memory_format=fmt)
    yt = torch.empty(y.shape, memory_format=fmt)
    _C.dwconv_forward(xt, torch.from_numpy(w).clone(), torch.from_numpy(b).clone(), yt,
                      cfg.stride, cfg.pads, cfg.dilation)
    assert np.array_equal(y, yt.numpy())


def test_numpy_output_written_in_place_only():
    """The core writes the output view, not past it: a larger buffer's margins survive."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 6, 6)).astype(np.float32)
    w = rng.standard_normal((5, 1, 3, 3)).astype(np.float32)
    buf = np.full((1, 7, 6, 6), 123.0, dtype=np.float32)
    y = buf[:, 1:6]  # C-contiguous NCHW view in the middle of a larger buffer
    assert y.flags["C_CONTIGUOUS"]
    _C.dwconv_forward(x, w, None, y, (1, 1), (1, 1, 1, 1), (1, 1))
    assert np.all(buf[:, 0] == 123.0) and np.all(buf[:, 6] == 123.0)
    cfg = ConvCfg(n=1, c=5, h=6, w=6, kh=3, kw=3, padding=1, bias=False)
    check_forward(t(y.copy()), t(x), t(w), None, cfg)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8])
def test_numpy_integer_dtype_is_type_error(dtype):
    x = np.ones((1, 3, 6, 6), dtype=dtype)
    w = np.ones((3, 1, 3, 3), dtype=dtype)
    y = np.zeros((1, 3, 6, 6), dtype=dtype)
    with pytest.raises(TypeError, match=r"(?i)dtype|int|uint8"):
        _C.dwconv_forward(x, w, None, y, (1, 1), (1, 1, 1, 1), (1, 1))


def test_numpy_float16_is_type_error_on_cpu():
    x = np.ones((1, 3, 6, 6), dtype=np.float16)
    w = np.ones((3, 1, 3, 3), dtype=np.float16)
    y = np.zeros((1, 3, 6, 6), dtype=np.float16)
    with pytest.raises(TypeError, match=r"(?i)float16|half|dtype"):
        _C.dwconv_forward(x, w, None, y, (1, 1), (1, 1, 1, 1), (1, 1))


def test_numpy_mixed_dtypes_is_type_error():
    x = np.ones((1, 3, 6, 6), dtype=np.float32)
    w = np.ones((3, 1, 3, 3), dtype=np.float64)
    y = np.zeros((1, 3, 6, 6), dtype=np.float32)
    with pytest.raises(TypeError, match=r"(?i)dtype|weight"):
        _C.dwconv_forward(x, w, None, y, (1, 1), (1, 1, 1, 1), (1, 1))


def test_numpy_wrong_output_shape_is_value_error():
    x = np.ones((1, 3, 6, 6), dtype=np.float32)
    w = np.ones((3, 1, 3, 3), dtype=np.float32)
    y = np.zeros((1, 3, 5, 6), dtype=np.float32)
    with pytest.raises(ValueError, match=r"(?i)\by\b|out|shape"):
        _C.dwconv_forward(x, w, None, y, (1, 1), (1, 1, 1, 1), (1, 1))


def test_numpy_non_array_argument_is_type_error():
    w = np.ones((3, 1, 3, 3), dtype=np.float32)
    y = np.zeros((1, 3, 6, 6), dtype=np.float32)
    with pytest.raises(TypeError):
        _C.dwconv_forward([[1.0]], w, None, y, (1, 1), (1, 1, 1, 1), (1, 1))
