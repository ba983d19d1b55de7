"""The fused Inception depthwise convolution (CPU): fastvis.ops.inception_depthwise_conv2d.

Oracle: timm's composition (torch.split -> three depthwise F.conv2d -> torch.cat) in
float64 on exactly the values the kernel saw. Identity channels must be exact copies
(forward: of x; grad_x: of grad_y); each branch slice is held to the bound of
conftest.py (|got - ref| <= rel_ref*|ref| + rel_mag*magnitude, magnitude = the same linear
map applied to absolute values) with the reduction length of that branch: kh*kw / kbw /
kbh taps for the output and grad_x, N*H*W for the weight and bias gradients. bfloat16:
inputs bf16-exact, float32 accumulation, one rounding: 2^-8 of the value plus twice the
float32 accumulation bound (see conftest.tolerance; nothing is widened here).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import fastvis
import fastvis.ops
from conftest import assert_within, single_threaded_torch, sweep

_C = fastvis._C
op = fastvis.ops.inception_depthwise_conv2d
ref_op = fastvis.ops.inception_depthwise_conv2d_reference

NAMES = ("x", "hw_weight", "hw_bias", "w_weight", "w_bias", "h_weight", "h_bias")


@dataclasses.dataclass(frozen=True)
class IncCfg:
    n: int
    c: int
    g: int
    h: int
    w: int
    k: Tuple[int, int] = (3, 3)  # square branch (kh, kw)
    kbw: int = 11
    kbh: int = 11
    dilation: int = 1
    bias: Tuple[bool, bool, bool] = (True, True, True)
    layout: str = "nhwc"
    dtype: torch.dtype = torch.float32

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "nhwc" else torch.contiguous_format

    def short(self) -> str:
        return (f"N={self.n} C={self.c} g={self.g} {self.h}x{self.w} k={self.k} kbw={self.kbw} "
                f"kbh={self.kbh} d={self.dilation} bias={self.bias} {self.layout} "
                f"{str(self.dtype).replace('torch.', '')}")


def make_inputs(cfg: IncCfg, requires_grad: bool = False):
    """x and the six parameters (None for absent biases), values rounded once to cfg.dtype."""
    def r(*shape):
        t = torch.randn(*shape).to(cfg.dtype)
        return t.requires_grad_(True) if requires_grad else t

    x = torch.randn(cfg.n, cfg.c, cfg.h, cfg.w).to(cfg.dtype).contiguous(memory_format=cfg.memory_format)
    if requires_grad:
        x.requires_grad_(True)
    g = cfg.g
    params = [r(g, 1, *cfg.k), r(g) if cfg.bias[0] else None,
              r(g, 1, 1, cfg.kbw), r(g) if cfg.bias[1] else None,
              r(g, 1, cfg.kbh, 1), r(g) if cfg.bias[2] else None]
    return x, params


def make_grad_output(cfg: IncCfg) -> torch.Tensor:
    return torch.randn(cfg.n, cfg.c, cfg.h, cfg.w).to(cfg.dtype).contiguous(memory_format=cfg.memory_format)


# --------------------------------------------------------------------------- oracle


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64)


def _branches(cfg: IncCfg):
    """(channel slice, taps) of the square, 1 x kbw and kbh x 1 branches."""
    c, g = cfg.c, cfg.g
    return [(slice(c - 3 * g, c - 2 * g), cfg.k[0] * cfg.k[1]), (slice(c - 2 * g, c - g), cfg.kbw),
            (slice(c - g, c), cfg.kbh)]


def check_forward(y, x, params, cfg: IncCfg, name="y"):
    assert tuple(y.shape) == tuple(x.shape), f"{name}: shape {tuple(y.shape)}; {cfg.short()}"
    assert y.dtype == cfg.dtype
    if y.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) != x.is_contiguous():
        assert y.is_contiguous(memory_format=cfg.memory_format), f"{name}: not in x's layout; {cfg.short()}"
    cid = cfg.c - 3 * cfg.g
    assert torch.equal(y[:, :cid], x[:, :cid].detach()), f"{name}: identity channels are not x's; {cfg.short()}"
    p64 = [_f64(p) for p in params]
    with single_threaded_torch():
        ref = ref_op(_f64(x), *p64, dilation=cfg.dilation)
        mag = ref_op(_f64(x).abs(), *[None if p is None else p.abs() for p in p64], dilation=cfg.dilation)
    for (sl, taps), bname in zip(_branches(cfg), ("square", "band 1xk", "band kx1")):
        assert_within(f"{name}[{bname}]", y[:, sl], ref[:, sl], mag[:, sl], cfg.dtype, taps, cfg.short())


def oracle_grads(x, params, gy, cfg: IncCfg):
    """{name: (ref, magnitude)} in float64 for x and the present parameters."""
    with single_threaded_torch():
        x64 = _f64(x).requires_grad_(True)
        p64 = [None if p is None else _f64(p).requires_grad_(True) for p in params]
        y = ref_op(x64, *p64, dilation=cfg.dilation)
        leaves = [x64] + [p for p in p64 if p is not None]
        grads = torch.autograd.grad(y, leaves, _f64(gy))
        # Magnitudes: the same linear maps on absolute values.
        gya = _f64(gy).abs()
        xa = _f64(x).requires_grad_(True)
        (gx_mag,) = torch.autograd.grad(
            ref_op(xa, *[None if p is None else _f64(p).abs() for p in params], dilation=cfg.dilation), (xa,), gya)
        wa = [None if p is None else _f64(p).requires_grad_(True) for p in params]
        ya = ref_op(_f64(x).abs(), *wa, dilation=cfg.dilation)
        present = [p for p in wa if p is not None]
        mags = torch.autograd.grad(ya, present, gya)
    out = {"x": (grads[0], gx_mag)}
    it, itm = iter(grads[1:]), iter(mags)
    for name, p in zip(NAMES[1:], params):
        if p is not None:
            out[name] = (next(it), next(itm))  # bias magnitude: the sum of |gy| over its slice
    return out


def check_backward(grads: dict, x, params, gy, cfg: IncCfg, prefix="grad_"):
    refs = oracle_grads(x, params, gy, cfg)
    red = cfg.n * cfg.h * cfg.w
    for name, got in grads.items():
        ref, mag = refs[name]
        if name == "x":
            cid = cfg.c - 3 * cfg.g
            assert torch.equal(got[:, :cid], gy[:, :cid].to(got.dtype)), (
                f"{prefix}x: identity channels are not grad_y's; {cfg.short()}")
            for (sl, taps), bname in zip(_branches(cfg), ("square", "band 1xk", "band kx1")):
                assert_within(f"{prefix}x[{bname}]", got[:, sl], ref[:, sl], mag[:, sl], cfg.dtype, taps,
                              cfg.short())
        else:
            assert_within(prefix + name, got, ref, mag, cfg.dtype, red, cfg.short())


def autograd_grads(cfg: IncCfg):
    x, params = make_inputs(cfg, requires_grad=True)
    y = op(x, *params, dilation=cfg.dilation)
    gy = make_grad_output(cfg)
    names = ["x"] + [nm for nm, p in zip(NAMES[1:], params) if p is not None]
    leaves = [x] + [p for p in params if p is not None]
    g = torch.autograd.grad(y, leaves, gy)
    return dict(zip(names, g)), (x, params, gy, y)


# --------------------------------------------------------------------------- strategies


@st.composite
def inc_configs(draw, dtypes=(torch.float32,), max_hw=16, layouts=("nhwc", "nchw")):
    d = draw(st.sampled_from([1, 1, 1, 2, 3]))

    def odd_or_even_with_even_d(choices_odd):
        if d % 2 == 0 and draw(st.integers(0, 3)) == 0:
            return draw(st.sampled_from([2, 4, 6]))  # d*(k-1) even: allowed
        return draw(st.sampled_from(choices_odd))

    kind = draw(st.sampled_from(["inceptionnext", "atto", "square", "rect"]))
    if kind == "inceptionnext":
        k, kbw, kbh = (3, 3), 11, 11
    elif kind == "atto":
        k, kbw, kbh = (3, 3), 9, 9
    elif kind == "square":
        s = odd_or_even_with_even_d([1, 3, 5, 7])
        k = (s, s)
        kbw = kbh = odd_or_even_with_even_d([1, 3, 5, 7, 9, 11, 13])
    else:  # independent extents (the op allows them)
        k = (odd_or_even_with_even_d([1, 3, 5]), odd_or_even_with_even_d([1, 3, 5, 7]))
        kbw = odd_or_even_with_even_d([3, 5, 7, 9, 11, 15])
        kbh = odd_or_even_with_even_d([3, 5, 7, 9, 11, 15])
    # g around the channel blocks (16 floats / 8 doubles) and InceptionNeXt's ratios.
    g = draw(st.one_of(st.integers(1, 20), st.sampled_from([4, 8, 12, 16, 17, 24])))
    cid = draw(st.one_of(st.just(0), st.integers(0, 24), st.just(5 * g)))  # 5g: ratio 1/8
    h = draw(st.integers(1, max_hw))
    w = draw(st.integers(1, max_hw))
    return IncCfg(n=draw(st.integers(1, 3)), c=cid + 3 * g, g=g, h=h, w=w, k=k, kbw=kbw, kbh=kbh,
                  dilation=d, bias=(draw(st.booleans()), draw(st.booleans()), draw(st.booleans())),
                  layout=draw(st.sampled_from(list(layouts))), dtype=draw(st.sampled_from(list(dtypes))))


# --------------------------------------------------------------------------- forward sweeps


@sweep(50)
@given(cfg=inc_configs(dtypes=(torch.float32,)))
def test_forward_float32(cfg):
    x, params = make_inputs(cfg)
    check_forward(op(x, *params, dilation=cfg.dilation), x, params, cfg)


@sweep(25)
@given(cfg=inc_configs(dtypes=(torch.float64,)))
def test_forward_float64(cfg):
    x, params = make_inputs(cfg)
    check_forward(op(x, *params, dilation=cfg.dilation), x, params, cfg)


@sweep(25)
@given(cfg=inc_configs(dtypes=(torch.bfloat16,)))
def test_forward_bfloat16(cfg):
    x, params = make_inputs(cfg)
    check_forward(op(x, *params, dilation=cfg.dilation), x, params, cfg)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("c,hw,band,ratio", [
    (96, 56, 11, 1 / 8),   # InceptionNeXt-tiny stage 1 (N=1)
    (192, 28, 11, 1 / 8),
    (384, 14, 11, 1 / 8),
    (768, 7, 11, 1 / 8),
    (40, 32, 9, 1 / 4),    # atto: band 9, ratio 1/4
])
def test_forward_inceptionnext_shapes(c, hw, band, ratio, layout):
    cfg = IncCfg(n=1 if c < 768 else 2, c=c, g=int(c * ratio), h=hw, w=hw, kbw=band, kbh=band,
                 layout=layout)
    x, params = make_inputs(cfg)
    check_forward(op(x, *params), x, params, cfg)


# --------------------------------------------------------------------------- backward sweeps


@sweep(40)
@given(cfg=inc_configs(dtypes=(torch.float32,)))
def test_backward_float32(cfg):
    grads, (x, params, gy, _) = autograd_grads(cfg)
    check_backward(grads, x, params, gy, cfg)


@sweep(20)
@given(cfg=inc_configs(dtypes=(torch.float64,)))
def test_backward_float64(cfg):
    grads, (x, params, gy, _) = autograd_grads(cfg)
    check_backward(grads, x, params, gy, cfg)


@sweep(20)
@given(cfg=inc_configs(dtypes=(torch.bfloat16,)))
def test_backward_bfloat16(cfg):
    grads, (x, params, gy, _) = autograd_grads(cfg)
    check_backward(grads, x, params, gy, cfg)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_backward_inceptionnext_stage_shape(layout):
    cfg = IncCfg(n=2, c=96, g=12, h=28, w=28, layout=layout)
    grads, (x, params, gy, _) = autograd_grads(cfg)
    check_backward(grads, x, params, gy, cfg)


# --------------------------------------------------------------------------- low level


@sweep(20)
@given(cfg=inc_configs(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_lowlevel_writes_every_element(cfg):
    """_C calls into NaN-filled outputs: every element of y and of each gradient is written."""
    x, params = make_inputs(cfg)
    gy = make_grad_output(cfg)
    y = torch.full_like(x, float("nan"))
    _C.inception_dwconv_forward(x, params, cfg.dilation, y)
    check_forward(y, x, params, cfg, name="_C y")
    weights = [params[0], None, params[2], None, params[4], None]
    gx = torch.full_like(x, float("nan"))
    gs = [torch.full(p.shape if p is not None else (cfg.g,), float("nan"), dtype=cfg.dtype)
          for p in params]
    _C.inception_dwconv_backward(gy, x, weights, cfg.dilation, [gx] + gs)
    grads = {"x": gx}
    for name, p, gt in zip(NAMES[1:], params, gs):
        if p is not None:
            grads[name] = gt
    check_backward(grads, x, params, gy, cfg, prefix="_C grad_")


@pytest.mark.parametrize("want", [("x",), ("hw_weight",), ("w_bias",), ("h_weight", "h_bias"),
                                  ("x", "w_weight")])
def test_backward_partial_requests(want):
    """Only the requested gradients are computed; the others are left untouched."""
    cfg = IncCfg(n=2, c=30, g=6, h=9, w=11, layout="nhwc")
    x, params = make_inputs(cfg)
    gy = make_grad_output(cfg)
    sentinel = 12345.0
    gx = torch.full_like(x, sentinel)
    gs = [torch.full(p.shape, sentinel, dtype=cfg.dtype) for p in params]
    ptrs = [gx] + gs
    _C.inception_dwconv_backward(gy, x, params, 1, [t if n in want else None for n, t in zip(NAMES, ptrs)])
    check_backward({n: t for n, t in zip(NAMES, ptrs) if n in want}, x, params, gy, cfg)
    for n, t in zip(NAMES, ptrs):
        if n not in want:
            assert bool((t == sentinel).all()), f"{n} was written although not requested"


@pytest.mark.parametrize("which", ["x", "hw_weight", "w_bias", "x+h_weight"])
def test_autograd_partial_requires_grad(which):
    cfg = IncCfg(n=2, c=20, g=4, h=8, w=9, k=(5, 5), kbw=7, kbh=7, layout="nchw")
    x, params = make_inputs(cfg)
    leaves = dict(zip(NAMES, [x] + params))
    names = which.split("+")
    for n in names:
        leaves[n].requires_grad_(True)
    y = op(x, *params)
    gy = make_grad_output(cfg)
    g = torch.autograd.grad(y, [leaves[n] for n in names], gy)
    check_backward(dict(zip(names, g)), x, params, gy, cfg)


def test_non_dense_input_and_grad_output():
    cfg = IncCfg(n=2, c=16, g=4, h=9, w=7, layout="nchw")
    base = torch.randn(2, 16, 7, 9, requires_grad=True)
    x = base.transpose(2, 3)  # neither NCHW- nor NHWC-dense
    _, params = make_inputs(cfg, requires_grad=True)
    y = op(x, *params)
    gy = torch.randn(2, 16, 7, 9).transpose(2, 3)
    g = torch.autograd.grad(y, [base] + params, gy)
    check_forward(y, x, params, cfg)
    grads = {"x": g[0].transpose(2, 3), **{n: t for n, t in zip(NAMES[1:], g[1:])}}
    check_backward(grads, x, params, gy, cfg)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_sum_loss_broadcast_grad_output(layout):
    """y.sum().backward() hands the op an expanded (all-zero-strides) grad_output."""
    cfg = IncCfg(n=2, c=24, g=6, h=10, w=12, layout=layout)
    x, params = make_inputs(cfg, requires_grad=True)
    op(x, *params).sum().backward()
    gy = torch.ones(x.shape)
    grads = {"x": x.grad, **{n: p.grad for n, p in zip(NAMES[1:], params)}}
    check_backward(grads, x, params, gy, cfg)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_empty_batch(layout):
    cfg = IncCfg(n=0, c=24, g=6, h=10, w=12, layout=layout)
    x, params = make_inputs(cfg, requires_grad=True)
    y = op(x, *params)
    assert y.shape == x.shape
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_h_w_1_and_three_g_equals_c():
    """No identity channels, a 1x1 image (dense in both layouts)."""
    for layout in ("nhwc", "nchw"):
        cfg = IncCfg(n=2, c=9, g=3, h=1, w=1, layout=layout)
        grads, (x, params, gy, y) = autograd_grads(cfg)
        check_forward(y, x, params, cfg)
        check_backward(grads, x, params, gy, cfg)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("k,kb,d,bias", [
    ((3, 3), 5, 1, (True, True, True)),
    ((3, 3), 3, 2, (False, True, False)),
    ((1, 3), 7, 1, (True, False, True)),
    ((2, 2), 4, 2, (True, True, True)),  # even kernels with an even dilation
])
def test_gradcheck_float64(k, kb, d, bias, layout):
    cfg = IncCfg(n=1, c=10, g=3, h=6, w=5, k=k, kbw=kb, kbh=kb, dilation=d, bias=bias, layout=layout,
                 dtype=torch.float64)
    x, params = make_inputs(cfg, requires_grad=True)
    present = [i for i, p in enumerate(params) if p is not None]

    def fn(x, *ps):
        full = list(params)
        for i, p in zip(present, ps):
            full[i] = p
        return op(x, *full, dilation=d)

    assert torch.autograd.gradcheck(fn, (x, *[params[i] for i in present]), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_deterministic_and_thread_count_independent(layout, dtype):
    cfg = IncCfg(n=3, c=96, g=12, h=20, w=20, layout=layout, dtype=dtype)
    x, params = make_inputs(cfg)
    gy = make_grad_output(cfg)

    def run():
        xr = x.detach().requires_grad_(True)
        pr = [p.detach().requires_grad_(True) for p in params]
        y = op(xr, *pr)
        return [y.detach()] + list(torch.autograd.grad(y, [xr] + pr, gy))

    try:
        fastvis.set_num_threads(2)
        two = [run() for _ in range(2)]
        fastvis.set_num_threads(1)
        one = run()
    finally:
        fastvis.set_num_threads(0)
    labels = ("y",) + tuple("grad_" + n for n in NAMES)
    for a, b, c_, name in zip(two[0], two[1], one, labels):
        assert torch.equal(a, b), f"{name} differs between two runs with 2 threads"
        assert torch.equal(a, c_), f"{name} with 1 thread != with 2 threads"
    check_backward({n: t for n, t in zip(NAMES, two[0][1:])}, x, params, gy, cfg)


# --------------------------------------------------------------------------- torch.compile


class Mixer(nn.Module):
    """The token mixer between two pointwise ops, as in an InceptionNeXt block."""

    def __init__(self, c=32, g=4):
        super().__init__()
        self.hw_w = nn.Parameter(torch.randn(g, 1, 3, 3) * 0.3)
        self.hw_b = nn.Parameter(torch.randn(g))
        self.w_w = nn.Parameter(torch.randn(g, 1, 1, 11) * 0.3)
        self.w_b = nn.Parameter(torch.randn(g))
        self.h_w = nn.Parameter(torch.randn(g, 1, 11, 1) * 0.3)
        self.h_b = nn.Parameter(torch.randn(g))

    def forward(self, x):
        y = fastvis.ops.inception_depthwise_conv2d(x * 0.5, self.hw_w, self.hw_b, self.w_w, self.w_b,
                                                   self.h_w, self.h_b)
        return torch.nn.functional.gelu(y) + x


def _run(model, x):
    x = x.detach().requires_grad_(True)
    y = model(x)
    gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    y.backward(gy)
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return y.detach(), grads


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = Mixer()
    x = torch.randn(2, 32, 13, 12).contiguous(memory_format=torch.channels_last)
    y_e, g_e = _run(model, x)
    compiled = torch.compile(model, fullgraph=True)
    y_c, g_c = _run(compiled, x)
    y_c2, _ = _run(compiled, x)  # same shapes: reuses the graph
    # Same fastvis kernels on both sides; only inductor's fused pointwise ops (x * 0.5,
    # GELU, the residual and their gradients) round differently: a few float32 ulps of
    # values of order 10, amplified by at most the 9..11-tap sums downstream.
    for a, b, name in zip([y_c] + g_c, [y_e] + g_e, ["y", "grad_x"] + [n for n, _ in model.named_parameters()]):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert torch.equal(y_c, y_c2)


def test_fake_kernel_shapes_and_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 24, 7, 9).contiguous(memory_format=torch.channels_last)
        ps = [torch.empty(6, 1, 3, 3), torch.empty(6), torch.empty(6, 1, 1, 11), None,
              torch.empty(6, 1, 11, 1), torch.empty(6)]
        y = torch.ops.fastvis.inception_depthwise_conv2d(x, *ps, 1)
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
        gr = torch.ops.fastvis.inception_depthwise_conv2d_backward(
            y, x, ps[0], ps[2], ps[4], 1, [True, True, False, True, True, False, True])
        assert [tuple(t.shape) for t in gr] == [(2, 24, 7, 9), (6, 1, 3, 3), (0,), (6, 1, 1, 11),
                                                (6,), (0,), (6,)]


# --------------------------------------------------------------------------- reference, autocast


def test_use_reference_runs_the_composition():
    cfg = IncCfg(n=2, c=20, g=4, h=7, w=8)
    x, params = make_inputs(cfg)
    with fastvis.use_reference():
        y = op(x, *params)
    assert torch.equal(y, ref_op(x, *params))
    check_forward(y, x, params, cfg)


def test_reference_matches_timm_module():
    timm_inc = pytest.importorskip("timm.models.inception_next")
    m = timm_inc.InceptionDWConv2d(64, band_kernel_size=9, branch_ratio=0.25, dilation=1).double()
    x = torch.randn(2, 64, 9, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ps = [m.dwconv_hw.weight, m.dwconv_hw.bias, m.dwconv_w.weight, m.dwconv_w.bias, m.dwconv_h.weight,
          m.dwconv_h.bias]
    with torch.no_grad():
        y = op(x, *ps)
        expected = m(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert torch.equal(ref_op(x, *ps), expected)


def test_timm_dilated_module_matches():
    timm_inc = pytest.importorskip("timm.models.inception_next")
    m = timm_inc.InceptionDWConv2d(48, dilation=2).double()
    x = torch.randn(1, 48, 12, 11, dtype=torch.float64)
    ps = [m.dwconv_hw.weight, m.dwconv_hw.bias, m.dwconv_w.weight, m.dwconv_w.bias, m.dwconv_h.weight,
          m.dwconv_h.bias]
    with torch.no_grad():
        torch.testing.assert_close(op(x, *ps, dilation=2), m(x), rtol=0, atol=1e-12)


def test_autocast_bfloat16_follows_conv2d():
    cfg = IncCfg(n=2, c=32, g=4, h=9, w=9, dtype=torch.float32)
    x, params = make_inputs(cfg, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x, *params)
    assert y.dtype == torch.bfloat16
    bf = IncCfg(**{**dataclasses.asdict(cfg), "dtype": torch.bfloat16})
    xb = x.detach().to(torch.bfloat16)
    pb = [p.detach().to(torch.bfloat16) for p in params]
    check_forward(y, xb, pb, bf)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


# --------------------------------------------------------------------------- bad input


def _ok(**over):
    x = over.pop("x", torch.randn(2, 24, 8, 8))
    g = 4
    ps = dict(hw_weight=torch.randn(g, 1, 3, 3), hw_bias=torch.randn(g), w_weight=torch.randn(g, 1, 1, 11),
              w_bias=torch.randn(g), h_weight=torch.randn(g, 1, 11, 1), h_bias=torch.randn(g))
    ps.update(over)
    d = ps.pop("dilation", 1)
    return x, ps, d


BAD = [
    (dict(x=torch.randn(2, 24, 8, 8).half()), TypeError, "float16 is CUDA-only"),
    (dict(x=torch.randint(0, 3, (2, 24, 8, 8))), TypeError, "supports float32"),
    (dict(hw_weight=torch.randn(4, 1, 3, 3, dtype=torch.float64)), TypeError, "hw_weight: expected dtype"),
    (dict(h_bias=torch.randn(4).bfloat16()), TypeError, "h_bias: expected dtype"),
    (dict(hw_weight=torch.randn(5, 1, 3, 3)), ValueError, "same number of channels g"),
    (dict(h_weight=torch.randn(3, 1, 11, 1)), ValueError, "same number of channels g"),
    (dict(w_weight=torch.randn(4, 1, 11, 1)), ValueError, "1 x k needs a (g, 1, 1, k)"),
    (dict(h_weight=torch.randn(4, 1, 1, 11)), ValueError, "k x 1 needs a (g, 1, k, 1)"),
    (dict(hw_weight=torch.randn(4, 2, 3, 3)), ValueError, "(g, 1, kh, kw)"),
    (dict(hw_weight=torch.randn(4, 3, 3)), ValueError, "(g, 1, kh, kw)"),
    (dict(x=torch.randn(2, 11, 8, 8)), ValueError, "3 * g = 12 channels"),
    (dict(hw_weight=torch.randn(4, 1, 4, 4)), ValueError, "no symmetric 'same' padding"),
    (dict(w_weight=torch.randn(4, 1, 1, 10)), ValueError, "no symmetric 'same' padding"),
    (dict(hw_weight=torch.randn(4, 1, 65, 65)), ValueError, "between 1 and 63"),
    (dict(dilation=0), ValueError, "dilation: expected a value in [1, 1024]"),
    (dict(dilation=True), TypeError, "dilation: expected an int"),
    (dict(dilation=1.0), TypeError, "dilation: expected an int"),
    (dict(w_bias=torch.randn(5)), ValueError, "w_bias: expected shape (4,)"),
    (dict(x=torch.randn(24, 8, 8)), ValueError, "4-D"),
    (dict(x=torch.randn(2, 24, 0, 8)), ValueError, "spatial size must be positive"),
    (dict(hw_weight=torch.randn(0, 1, 3, 3), w_weight=torch.randn(0, 1, 1, 11),
          h_weight=torch.randn(0, 1, 11, 1), hw_bias=None, w_bias=None, h_bias=None),
     ValueError, "at least one channel per branch"),
    (dict(hw_bias=torch.randn(4, device="meta")), ValueError, "hw_bias is on meta but x is on cpu"),
    (dict(hw_weight=[[1.0]]), TypeError, "hw_weight: expected a torch.Tensor"),
]


@pytest.mark.parametrize("reference", [False, True], ids=["fastvis", "use_reference"])
@pytest.mark.parametrize("over,exc,msg", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input(over, exc, msg, reference):
    x, ps, d = _ok(**over)
    with fastvis.use_reference(reference), pytest.raises(exc) as ei:
        op(x, ps["hw_weight"], ps["hw_bias"], ps["w_weight"], ps["w_bias"], ps["h_weight"], ps["h_bias"],
           dilation=d)
    assert msg in str(ei.value), str(ei.value)


# The core checks the same rules on its own (native callers, the bindings).
CORE_BAD = [
    (dict(x=torch.randn(2, 11, 8, 8)), ValueError, "3 * g = 12 channels"),
    (dict(hw_weight=torch.randn(5, 1, 3, 3)), ValueError, "same number of channels g"),
    (dict(hw_weight=torch.randn(4, 1, 4, 4)), ValueError, "no symmetric 'same' padding"),
    (dict(w_weight=torch.randn(4, 1, 11, 1)), ValueError, "1 x k needs a (g, 1, 1, k)"),
    (dict(hw_weight=torch.randn(4, 1, 3, 3, dtype=torch.float64)), TypeError, "hw_weight: expected dtype"),
    (dict(x=torch.randn(2, 24, 8, 8).half()), TypeError, ""),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(w_bias=torch.randn(5)), ValueError, "w_bias: expected shape [4]"),
]


@pytest.mark.parametrize("over,exc,msg", CORE_BAD, ids=[f"core_bad{i}" for i in range(len(CORE_BAD))])
def test_core_rejects(over, exc, msg):
    x, ps, d = _ok(**over)
    ws = [ps[k] for k in ("hw_weight", "hw_bias", "w_weight", "w_bias", "h_weight", "h_bias")]
    y = torch.empty_like(x)
    with pytest.raises(exc) as ei:
        _C.inception_dwconv_forward(x, ws, d, y)
    assert msg in str(ei.value), str(ei.value)


def test_core_rejects_output_and_gradient_mismatches():
    x, ps, _ = _ok()
    ws = [ps[k] for k in ("hw_weight", "hw_bias", "w_weight", "w_bias", "h_weight", "h_bias")]
    with pytest.raises(ValueError, match="same dense memory layout"):
        _C.inception_dwconv_forward(x, ws, 1, torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="expected shape"):
        _C.inception_dwconv_forward(x, ws, 1, torch.empty(2, 24, 8, 7))
    with pytest.raises(TypeError, match="dtype"):
        _C.inception_dwconv_forward(x, ws, 1, torch.empty_like(x, dtype=torch.float64))
    with pytest.raises(ValueError, match="required"):
        _C.inception_dwconv_forward(x, [None] + ws[1:], 1, torch.empty_like(x))
    with pytest.raises(ValueError, match="scratch"):
        _C.inception_dwconv_forward(x, ws, 1, torch.empty_like(x), scratch=torch.empty(16, dtype=torch.uint8))
    gy = torch.randn_like(x)
    with pytest.raises(ValueError, match="grad_hw_weight: expected the shape"):
        _C.inception_dwconv_backward(gy, x, ws, 1, [None, torch.empty(4, 1, 5, 5)] + [None] * 5)
    with pytest.raises(ValueError, match="grad_bias"):
        _C.inception_dwconv_backward(gy, x, ws, 1, [None, None, torch.empty(3)] + [None] * 4)
    with pytest.raises(ValueError, match="grads: expected 7 entries"):
        _C.inception_dwconv_backward(gy, x, ws, 1, [None] * 6)


def test_meta_device_runs_the_reference_without_warning():
    x = torch.empty(2, 24, 8, 8, device="meta")
    ps = [torch.empty(4, 1, 3, 3, device="meta"), None, torch.empty(4, 1, 1, 11, device="meta"), None,
          torch.empty(4, 1, 11, 1, device="meta"), None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = op(x, *ps)
    assert y.shape == x.shape and y.device.type == "meta"


def test_checks_catch_small_errors():
    """The oracle checks above fail on a single wrong element (one ulp-scale error in a
    branch, any change in an identity channel, a swapped branch order)."""
    cfg = IncCfg(n=1, c=20, g=4, h=6, w=6)
    x, params = make_inputs(cfg)
    y = op(x, *params)
    for c in (0, 8, 12, 19):  # identity, square, band 1xk, band kx1
        bad = y.clone()
        bad[0, c, 3, 2] += 1e-3 * (1 + bad[0, c, 3, 2].abs())
        with pytest.raises(AssertionError):
            check_forward(bad, x, params, cfg)
    swapped = torch.cat([y[:, :8], y[:, 12:16], y[:, 8:12], y[:, 16:]], 1)
    with pytest.raises(AssertionError):
        check_forward(swapped, x, params, cfg)


# --------------------------------------------------------------------------- bench


def test_bench_dwconv_op_inception_runs(tmp_path, capsys):
    """`fastvis bench dwconv --op inception` runs a tiny case end to end and checks fastvis
    against eager PyTorch (timings are not looked at)."""
    import json

    from fastvis import cli

    out = tmp_path / "inc.json"
    code = cli.main(["bench", "dwconv", "--op", "inception", "--quick", "--no-compile", "--batch", "1",
                     "--channels", "24", "--size", "9", "--repeat", "1", "--warmup", "0", "--format", "text",
                     "-q", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "Inception depthwise conv" in text and "3x3+1x11+11x1 g=3" in text
    assert "match PyTorch" in text
    doc = json.loads(out.read_text())
    assert doc["settings"]["op"] == "inception"
    assert [r["pass"] for r in doc["results"]] == ["fwd", "fwd+bwd"]
    assert all(r["check"]["ok"] for r in doc["results"])
    assert set(doc["results"][0]["times"]) == {"fastvis", "eager_nchw", "eager_cl"}


def test_channels_last_needs_no_activation_sized_scratch():
    """NHWC runs in place: the scratch (packed weights, per-thread tile buffers bounded by
    cache budgets, weight-gradient partials) stops growing with the batch and stays far
    below the activation."""
    ws = [torch.empty(12, 1, 3, 3), torch.empty(12), torch.empty(12, 1, 1, 11), torch.empty(12),
          torch.empty(12, 1, 11, 1), torch.empty(12)]
    sizes = {}
    for n in (8, 32):
        x = torch.empty(n, 96, 56, 56).contiguous(memory_format=torch.channels_last)
        sizes[n] = (_C.inception_dwconv_forward_scratch_bytes(x, ws, 1),
                    _C.inception_dwconv_backward_scratch_bytes(x, ws, 1))
    assert sizes[8] == sizes[32]
    act = 8 * 96 * 56 * 56 * 4
    assert max(sizes[8]) < act / 8, (sizes, act)
