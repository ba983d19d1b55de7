"""Patch convolution (stride == kernel) against F.conv2d in float64, bad input, the
fallbacks, and PatchConv2d as an nn.Conv2d drop-in."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import fastvis
from fastvis.nn import PatchConv2d
from fastvis.ops import patch_conv2d
from conftest import sweep

_C = fastvis._C


@st.composite
def problems(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if draw(st.booleans()):  # stride == kernel, no padding: the patch convolution proper
        stride, padding = None, (0, 0)
    else:  # any stride and zero padding: overlapping (or gapped) patches
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = (draw(st.integers(0, kh)), draw(st.integers(0, kw)))
    # rows/columns that do not fill a patch included; images smaller than the kernel
    # where the padding makes up for it
    h = draw(st.integers(max(1, kh - 2 * padding[0]), 3 * kh + 2))
    w = draw(st.integers(max(1, kw - 2 * padding[1]), 3 * kw + 2))
    return dict(n=draw(st.integers(1, 3)), cin=draw(st.integers(1, 20)), cout=draw(st.integers(1, 24)),
                kh=kh, kw=kw, h=h, w=w, layout=draw(st.sampled_from(["nchw", "nhwc", "view"])),
                wlayout=draw(st.sampled_from(["contiguous", "channels_last", "kmajor", "transposed"])),
                stride=stride, padding=padding,
                bias=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.float64])))


def make(p, seed=0):
    g = torch.Generator().manual_seed(seed)
    if p["layout"] == "view":  # a channel slice of a wider channels_last tensor: neither dense layout
        big = torch.randn(p["n"], p["cin"] + 3, p["h"], p["w"], generator=g, dtype=p["dtype"])
        x = big.to(memory_format=torch.channels_last)[:, 1:1 + p["cin"]]
    else:
        x = torch.randn(p["n"], p["cin"], p["h"], p["w"], generator=g, dtype=p["dtype"])
        if p["layout"] == "nhwc":
            x = x.to(memory_format=torch.channels_last)
    w = torch.randn(p["cout"], p["cin"], p["kh"], p["kw"], generator=g, dtype=p["dtype"])
    wl = p.get("wlayout", "contiguous")
    if wl == "channels_last":  # as Module.to(memory_format=torch.channels_last) leaves it
        w = w.to(memory_format=torch.channels_last)
    elif wl == "kmajor":  # (kh, kw, Cin, Cout) in memory, as the inference caches pass it
        w = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    elif wl == "transposed":  # neither dense layout (unless a size is 1): the op copies it
        w = w.transpose(2, 3).contiguous().transpose(2, 3)
    b = torch.randn(p["cout"], generator=g, dtype=p["dtype"]) if p["bias"] else None
    return x, w, b


@sweep(60)
@given(p=problems())
def test_forward_matches_conv2d(p):
    x, w, b = make(p)
    with torch.no_grad():
        y = patch_conv2d(x, w, b, p["stride"], p["padding"])
    stride = p["stride"] or (p["kh"], p["kw"])
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride=stride,
                   padding=p["padding"])
    assert y.shape == ref.shape and y.dtype == p["dtype"]
    assert y.is_contiguous(memory_format=torch.channels_last)
    # fp32: K = cin*kh*kw <= 320 products of O(1) values accumulated in float32
    tol = 1e-12 if p["dtype"] == torch.float64 else 2e-5
    scale = ref.abs().max().clamp_min(1.0)
    assert ((y.double() - ref).abs().max() / scale) <= tol, p


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 96, 56, 56, 192, 2), (1, 384, 14, 14, 768, 2), (2, 3, 64, 64, 96, 4),
                                   (1, 768, 2, 2, 16, 2)])
@pytest.mark.parametrize("wlayout", ["contiguous", "kmajor"])
def test_model_shapes_and_thread_counts(shape, threads, wlayout):
    """The stem / downsampling shapes (many tiles, few tiles with the GEMM split over the
    pool, one tile) with the parameter's layout and the inference caches' k-major one, each
    thread count agreeing with one thread."""
    n, cin, h, wd, cout, k = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, cin, h, wd, generator=g).to(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, generator=g) * 0.05
    if wlayout == "kmajor":
        w = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    b = torch.randn(cout, generator=g)
    old = fastvis.get_num_threads()
    try:
        fastvis.set_num_threads(1)
        with torch.no_grad():
            y1 = patch_conv2d(x, w, b)
        fastvis.set_num_threads(threads)
        with torch.no_grad():
            y = patch_conv2d(x, w, b)
    finally:
        fastvis.set_num_threads(0 if old == torch.get_num_threads() else old)
    ref = F.conv2d(x.double(), w.double(), b.double(), stride=k)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y1, rtol=0, atol=1e-5)


_P = dict(n=2, h=7, w=6, stride=(2, 2), padding=(1, 1), bias=True, dtype=torch.float32)


@sweep(40)
@given(p=problems(), needs=st.sampled_from(["all", "x", "weight", "bias", "weight+bias"]))
# both training paths, whatever the sweep draws: the core's weight gradient (Cin*kh*kw >= 64)
# and PyTorch's whole convolution (an RGB-stem-like 3x2x2 patch), NCHW and NHWC inputs
@example(p=dict(_P, cin=8, cout=5, kh=3, kw=3, layout="nchw", wlayout="contiguous"), needs="all")
@example(p=dict(_P, cin=8, cout=5, kh=3, kw=3, layout="view", wlayout="channels_last"), needs="weight")
@example(p=dict(_P, cin=3, cout=5, kh=2, kw=2, layout="nchw", wlayout="contiguous"), needs="all")
@example(p=dict(_P, cin=3, cout=5, kh=2, kw=2, layout="nhwc", wlayout="contiguous"), needs="weight+bias")
def test_gradients_match_conv2d(p, needs):
    """Training: the output and input gradient (PyTorch's convolution) and the weight / bias
    gradients (the core's gather + GEMM when Cin*kh*kw >= 64, else PyTorch's) against
    F.conv2d's in float64, for any stride, padding, layout of x and of the weight, and any
    subset of the gradients; the core's path returns channels_last as in inference."""
    x, w, b = make(p, seed=3)
    want = {"all": "xwb", "x": "x", "weight": "w", "bias": "b", "weight+bias": "wb"}[needs]
    if b is None:
        want = want.replace("b", "") or "x"
    ts = {"x": x, "w": w, "b": b}
    for k in want:
        ts[k].requires_grad_(True)
    st_ = p["stride"] or (p["kh"], p["kw"])
    y = patch_conv2d(x, w, b, p["stride"], p["padding"])
    if p["cin"] * p["kh"] * p["kw"] >= 64:
        assert y.is_contiguous(memory_format=torch.channels_last)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=y.dtype)
    got = torch.autograd.grad(y, [ts[k] for k in want], gy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    ref_t = {"x": xd, "w": wd, "b": bd}
    yr = F.conv2d(xd, wd, bd, stride=st_, padding=p["padding"])
    ref = torch.autograd.grad(yr, [ref_t[k] for k in want], gy.double())
    tol = 1e-10 if p["dtype"] == torch.float64 else 1e-4
    torch.testing.assert_close(y.double(), yr.detach(), rtol=tol, atol=tol * max(1.0, yr.abs().max().item()))
    for k, g, r in zip(want, got, ref):
        assert g.shape == ts[k].shape and g.dtype == p["dtype"], k
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * scale, msg=lambda m: f"{k}: {m}")


def test_gradcheck_float64():
    # Cin*kh*kw = 66 >= 64: the core's weight gradient
    x, w, b = make(dict(n=2, cin=11, cout=7, kh=3, kw=2, h=6, w=7, layout="nhwc", bias=True,
                        stride=(2, 1), padding=(1, 1), dtype=torch.float64))
    for t in (x, w, b):
        t.requires_grad_(True)
    y = patch_conv2d(x, w, b, (2, 1), (1, 1))
    assert y.grad_fn is not None
    assert torch.autograd.gradcheck(lambda x, w, b: patch_conv2d(x, w, b, (2, 1), (1, 1)), (x, w, b))


@pytest.mark.parametrize("wlayout", ["contiguous", "kmajor"])
def test_weight_gradient_runs_in_the_core_and_is_thread_count_independent(monkeypatch, wlayout):
    """The weight / bias gradients come from the core (a spy sees the call), and do not
    depend on the thread count (the pixel chunks and the GEMM's column split are functions
    of the shape): bitwise equal with 1 and 2 threads. A k-major weight gets its gradient
    computed in its own memory order too."""
    calls = []
    real = _C.patch_conv2d_backward_weight
    monkeypatch.setattr(_C, "patch_conv2d_backward_weight", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    torch.manual_seed(5)
    x = torch.randn(3, 24, 40, 36).to(memory_format=torch.channels_last)
    w = torch.randn(48, 24, 3, 3)
    if wlayout == "kmajor":
        w = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    w.requires_grad_()
    b = torch.randn(48, requires_grad=True)
    gy = torch.randn(3, 48, 20, 18)
    grads = []
    try:
        for n in (1, 2):
            fastvis.set_num_threads(n)
            y = patch_conv2d(x, w, b, 2, 1)
            grads.append(torch.autograd.grad(y, (w, b), gy))
    finally:
        fastvis.set_num_threads(0)
    assert len(calls) == 2
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)
    ref = torch.autograd.grad(F.conv2d(x, w, b, stride=2, padding=1), (w, b), gy)
    for g, r in zip(grads[0], ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-3)


def test_fused_norm_gradients_use_pytorch():
    """With a fused LayerNorm the op has no backward of its own: patch_conv2d differentiates
    through the reference, and calling the custom op directly with gradients says so."""
    x, w, b = make(dict(n=2, cin=4, cout=6, kh=2, kw=2, h=6, w=6, layout="nhwc", bias=True,
                        dtype=torch.float64))
    nw = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, nw: patch_conv2d(x, w, b, norm="after", norm_weight=nw), (w, nw))
    with pytest.raises(RuntimeError, match="no backward with a fused LayerNorm"):
        torch.ops.fastvis.patch_conv2d(x, w, b, [2, 2], [0, 0], 2, nw, None, 1e-6).sum().backward()


def test_core_weight_gradient_rejects_bad_input():
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 2, 2)
    gy = torch.randn(2, 6, 4, 4).to(memory_format=torch.channels_last)
    gw, gb = torch.empty_like(w), torch.empty(6)
    call = _C.patch_conv2d_backward_weight
    with pytest.raises(ValueError, match="grad_y: must be dense channels_last"):
        call(gy.contiguous(), x, w, gw, gb, None, [2, 2], [0, 0])
    with pytest.raises(ValueError, match="grad_y: expected shape"):
        call(gy[:, :5], x, w, gw, gb, None, [2, 2], [0, 0])
    with pytest.raises(ValueError, match="grad_weight: expected the weight's shape and strides"):
        call(gy, x, w, gw.to(memory_format=torch.channels_last), gb, None, [2, 2], [0, 0])
    with pytest.raises(ValueError, match="grad_bias"):
        call(gy, x, w, gw, torch.empty(5), None, [2, 2], [0, 0])
    with pytest.raises(TypeError, match="grad_y: expected dtype"):
        call(gy.double(), x, w, gw, gb, None, [2, 2], [0, 0])
    with pytest.raises(ValueError, match="scratch: need"):
        call(gy, x, w, gw, gb, torch.empty(8, dtype=torch.uint8), [2, 2], [0, 0])
    call(gy, x, w, gw, gb, None, [2, 2], [0, 0])  # the binding allocates scratch when given none
    ref = torch.ops.aten.convolution_backward(gy, x, w, [6], [2, 2], [0, 0], [1, 1], False, [0, 0], 1,
                                              [False, True, True])
    torch.testing.assert_close(gw, ref[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, ref[2], rtol=1e-5, atol=1e-4)
    # an empty batch: zero gradients
    x0, gy0 = x[:0], gy[:0]
    gw.fill_(1), gb.fill_(1)
    call(gy0, x0, w, gw, gb, None, [2, 2], [0, 0])
    assert not gw.any() and not gb.any()


def test_compile_fullgraph_training():
    x = torch.randn(2, 4, 9, 8).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    f = torch.compile(lambda x, w, b: patch_conv2d(x, w, b, 2, 1), fullgraph=True, backend="eager")
    got = torch.autograd.grad(f(x, w, b).square().sum(), (x, w, b))
    ref = torch.autograd.grad(F.conv2d(x, w, b, stride=2, padding=1).square().sum(), (x, w, b))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_custom_op_opcheck():
    x = torch.randn(2, 4, 7, 6).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvis.patch_conv2d.default, (x, w, b, [2, 2], [1, 1], 0, None, None, 1e-6))
    # the backward op: its fake kernel's layouts must be the real ones for any input layout
    # (a channels_last weight gave a contiguous fake and a channels_last real gradient once)
    gy = torch.randn(2, 5, 4, 3)
    for xl, wl in ((torch.contiguous_format, torch.channels_last), (torch.channels_last, torch.contiguous_format)):
        xx, ww = x.detach().contiguous(memory_format=xl), w.detach().contiguous(memory_format=wl)
        torch.library.opcheck(torch.ops.fastvis.patch_conv2d_backward.default,
                              (gy, xx, ww, [2, 2], [1, 1], True, True, True))
        for need in ((True, False, False), (False, True, False), (False, False, True)):
            torch.library.opcheck(torch.ops.fastvis.patch_conv2d_backward.default, (gy, xx, ww, [2, 2], [1, 1], *need))


def test_other_dtypes_and_reference_switch():
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    w = torch.randn(6, 4, 2, 2, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(patch_conv2d(x, w), F.conv2d(x, w, stride=2))
        x32, w32 = x.float(), w.float()
        with fastvis.use_reference():
            r = patch_conv2d(x32, w32)
        torch.testing.assert_close(patch_conv2d(x32, w32), r, rtol=1e-5, atol=1e-5)


def test_bad_input():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="input channels"):
        patch_conv2d(x, torch.randn(6, 3, 2, 2))
    with pytest.raises(TypeError, match="dtype"):
        patch_conv2d(x, torch.randn(6, 4, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than"):
        patch_conv2d(x, torch.randn(6, 4, 9, 2))
    with pytest.raises(ValueError, match="bias"):
        patch_conv2d(x, torch.randn(6, 4, 2, 2), torch.randn(5))
    with pytest.raises(ValueError, match="4-D"):
        patch_conv2d(x[0], torch.randn(6, 4, 2, 2))
    # the core's own checks, called directly
    w = torch.randn(6, 4, 2, 2)
    y = torch.empty(1, 6, 4, 4)  # NCHW: the core writes channels_last only
    with pytest.raises(ValueError, match="channels_last"):
        _C.patch_conv2d_forward(x, w, None, y)
    with pytest.raises(ValueError, match="contiguous"):
        _C.patch_conv2d_forward(x, w.transpose(2, 3), None, y.to(memory_format=torch.channels_last))
    with pytest.raises(TypeError, match="float32 and float64"):
        _C.patch_conv2d_forward(x.bfloat16(), w.bfloat16(), None, y.bfloat16())


@pytest.mark.parametrize("x_layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("w_layout", ["contiguous", "channels_last", "kmajor"])
def test_dense_weights_are_used_in_place(x_layout, w_layout):
    """The three dense weight layouts go to the core as they are: no per-call copy (which cost
    more than the convolution for ConvNeXt's downsampling layers in a channels_last model,
    and ran on PyTorch's OpenMP team whose spinning workers then slowed the next blocks)."""
    p = dict(n=1, cin=16, cout=24, kh=2, kw=2, h=8, w=8, layout=x_layout, wlayout=w_layout,
             bias=True, dtype=torch.float32)
    x, w, b = make(p, seed=5)
    with torch.no_grad(), torch.profiler.profile() as prof:
        y = patch_conv2d(x, w, b)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::clone", "aten::copy_", "aten::contiguous"}, names
    ref = F.conv2d(x.double(), w.double(), b.double(), stride=2)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 3, 224, 224, 40), (1, 40, 112, 112, 80), (2, 80, 56, 56, 160),
                                   (1, 320, 14, 14, 640), (1, 5, 7, 9, 6)])
def test_strided_padded_model_shapes(shape, threads):
    """UniRepLKNet's 3x3 stride-2 padding-1 stem and downsampling layers (channels_last
    weights, as in a channels_last model), and an odd-sized image."""
    n, cin, h, wd, cout = shape
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, cin, h, wd, generator=g).to(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 3, 3, generator=g) * 0.05).to(memory_format=torch.channels_last)
    b = torch.randn(cout, generator=g)
    old = fastvis.get_num_threads()
    try:
        fastvis.set_num_threads(threads)
        with torch.no_grad():
            y = patch_conv2d(x, w, b, 2, 1)
    finally:
        fastvis.set_num_threads(0 if old == torch.get_num_threads() else old)
    ref = F.conv2d(x.double(), w.double(), b.double(), stride=2, padding=1)
    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_stride_padding_errors():
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="stride must be positive"):
        patch_conv2d(x, w, None, 0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        patch_conv2d(x, w, None, 1, -1)
    with pytest.raises(TypeError, match="pair of ints"):
        patch_conv2d(x, w, None, (1, 2, 3))
    with pytest.raises(TypeError, match="pair of ints"):
        patch_conv2d(x, w, None, 1, "same")
    with pytest.raises(ValueError, match="smaller than"):
        patch_conv2d(torch.randn(1, 4, 1, 8), torch.randn(6, 4, 4, 3), None, 1, 1)
    y = torch.empty(1, 6, 4, 4).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="stride: must be positive"):
        _C.patch_conv2d_forward(x, w, None, y, None, [-1, 1], [0, 0])
    with pytest.raises(ValueError, match="padding: must be in"):
        _C.patch_conv2d_forward(x, w, None, y, None, [2, 2], [0, -2])
    with pytest.raises(ValueError, match="two values"):
        _C.patch_conv2d_forward(x, w, None, y, None, [2], [0, 0])
    with pytest.raises(ValueError, match="expected shape"):  # y of the wrong size
        _C.patch_conv2d_forward(x, w, None, y, None, [2, 2], [0, 0])  # 3x3 output
    with pytest.raises(TypeError, match="padding"):
        PatchConv2d(4, 6, 3, stride=1, padding="same")
    with pytest.raises(ValueError, match="cannot be folded"):
        fastvis.nn.PatchConvBN(torch.nn.BatchNorm2d(4), PatchConv2d(4, 6, 3, stride=2, padding=1))


def test_module_inference_uses_a_cached_kmajor_weight(monkeypatch):
    """PatchConv2d in inference passes its weight k-major ((kh, kw, Cin, Cout) in memory,
    cached until the parameter changes in place); the output equals F.conv2d's."""
    import fastvis.nn.patch_conv as mod
    seen = []
    real = mod.patch_conv2d
    monkeypatch.setattr(mod, "patch_conv2d", lambda x, w, *a, **k: (seen.append(w), real(x, w, *a, **k))[1])
    torch.manual_seed(4)
    m = PatchConv2d(12, 20, 2).eval()
    x = torch.randn(2, 12, 8, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, stride=2), rtol=1e-5, atol=1e-5)
        assert seen[-1].permute(2, 3, 1, 0).is_contiguous() and not seen[-1].is_contiguous()
        first = seen[-1]
        m(x)
        assert seen[-1] is first  # cached
        m.weight.add_(1.0)
        torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, stride=2), rtol=1e-5, atol=1e-5)
        assert seen[-1] is not first
    m.train()
    m(x)
    assert seen[-1] is m.weight  # training: the parameter itself


def test_strided_module_in_inference_and_training():
    torch.manual_seed(2)
    m = PatchConv2d(8, 12, 3, stride=2, padding=1).to(memory_format=torch.channels_last)
    ref = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 11, 10)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    y = m(x)  # training: the op with its backward, gradients flow
    y.sum().backward()
    assert m.weight.grad is not None and y.is_contiguous(memory_format=torch.channels_last)
    ref(x).sum().backward()
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


def test_empty_batch():
    with torch.no_grad():
        y = patch_conv2d(torch.randn(0, 4, 8, 8), torch.randn(6, 4, 2, 2))
    assert y.shape == (0, 6, 4, 4)


def test_module_is_a_conv2d_drop_in():
    torch.manual_seed(0)
    m = PatchConv2d(3, 8, 4)
    ref = torch.nn.Conv2d(3, 8, 4, stride=4)
    assert isinstance(m, torch.nn.Conv2d) and m.stride == (4, 4)
    ref.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y = m(x)  # training path (parameters require grad): the op with its backward, channels_last out
    assert y.grad_fn is not None and y.is_contiguous(memory_format=torch.channels_last)


def test_autocast_follows_conv2d():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(6, 4, 2, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = patch_conv2d(x, w)
        ref = F.conv2d(x, w, stride=2)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("bn_first", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_bn_fold(bn_first, affine):
    """PatchConvBN in eval mode equals its two modules run one after the other, and the
    cached fold follows changes of the BatchNorm statistics."""
    from fastvis.nn import PatchConvBN
    torch.manual_seed(0)
    conv = PatchConv2d(6, 10, 2)
    bn = torch.nn.BatchNorm2d(6 if bn_first else 10, affine=affine)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    m = PatchConvBN(bn, conv) if bn_first else PatchConvBN(conv, bn)
    m.eval()
    x = torch.randn(2, 6, 9, 8)
    seq = torch.nn.Sequential(*m)  # the same modules, unfused
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, seq(x), rtol=1e-5, atol=1e-5)
        bn.running_mean.add_(0.5)  # in-place change: the fold is recomputed
        torch.testing.assert_close(m(x), seq(x), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert list(m.state_dict()) == list(seq.state_dict())
    m.train()  # training: the modules themselves (batch statistics)
    torch.testing.assert_close(m(x), seq(x))


def test_conv_bn_refuses_other_modules():
    from fastvis.nn import PatchConvBN
    with pytest.raises(TypeError):
        PatchConvBN(torch.nn.Conv2d(3, 4, 2, stride=2), torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="features"):
        PatchConvBN(PatchConv2d(3, 4, 2), torch.nn.BatchNorm2d(3))


def test_compile_fullgraph_inference():
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 2, 2)
    b = torch.randn(6)
    f = torch.compile(lambda x: patch_conv2d(x, w, b), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(f(x), F.conv2d(x, w, b, stride=2), rtol=1e-5, atol=1e-5)


@st.composite
def norm_problems(draw):
    p = draw(problems())
    p["norm"] = draw(st.sampled_from(["before", "after"]))
    p["affine"] = draw(st.sampled_from(["both", "weight", "none"]))
    p["eps"] = draw(st.sampled_from([1e-6, 1e-3]))
    return p


@sweep(40)
@given(p=norm_problems())
def test_fused_layer_norm_matches_layer_norm_and_conv2d(p):
    """norm="before" = conv(pad(LayerNorm2d(x))), norm="after" = LayerNorm2d(conv(x)), against
    the float64 composition of F.layer_norm and F.conv2d."""
    from fastvis.ops import layer_norm_channels_reference
    x, w, b = make(p, seed=7)
    g = torch.Generator().manual_seed(8)
    n = p["cin"] if p["norm"] == "before" else p["cout"]
    nw = 1 + 0.5 * torch.randn(n, generator=g, dtype=p["dtype"]) if p["affine"] != "none" else None
    nb = torch.randn(n, generator=g, dtype=p["dtype"]) if p["affine"] == "both" else None
    with torch.no_grad():
        y = patch_conv2d(x, w, b, p["stride"], p["padding"], norm=p["norm"], norm_weight=nw,
                         norm_bias=nb, norm_eps=p["eps"])
    d = lambda t: None if t is None else t.double()  # noqa: E731
    stride = p["stride"] or (p["kh"], p["kw"])
    xr = x.double()
    if p["norm"] == "before":
        xr = layer_norm_channels_reference(xr, d(nw), d(nb), p["eps"])
    ref = F.conv2d(xr, w.double(), d(b), stride=stride, padding=p["padding"])
    if p["norm"] == "after":
        ref = layer_norm_channels_reference(ref, d(nw), d(nb), p["eps"])
    assert y.shape == ref.shape
    # fp32: a LayerNorm (normalised values O(1), rstd up to 1/sqrt(eps) on constant pixels
    # -- but then the centred values are ~0) around a K <= 320 term dot product
    tol = 1e-10 if p["dtype"] == torch.float64 else 5e-5
    scale = ref.abs().max().clamp_min(1.0)
    assert ((y.double() - ref).abs().max() / scale) <= tol, p


def test_fused_layer_norm_errors():
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(6, 4, 2, 2)
    with pytest.raises(ValueError, match="norm must be"):
        patch_conv2d(x, w, norm="middle")
    with pytest.raises(ValueError, match="norm='none'"):
        patch_conv2d(x, w, norm_weight=torch.ones(4))
    with pytest.raises(ValueError, match=r"expected shape \(4,\)"):
        patch_conv2d(x, w, norm="before", norm_weight=torch.ones(6))
    with pytest.raises(ValueError, match=r"expected shape \(6,\)"):
        patch_conv2d(x, w, norm="after", norm_bias=torch.ones(4))
    with pytest.raises(ValueError, match="norm_eps"):
        patch_conv2d(x, w, norm="after", norm_eps=0.0)
    with pytest.raises(TypeError, match="dtype"):
        patch_conv2d(x, w, norm="after", norm_weight=torch.ones(6, dtype=torch.float64))
    y = torch.empty(1, 6, 4, 4).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="norm_weight"):  # the core's own check
        _C.patch_conv2d_forward(x, w, None, y, None, [0, 0], [0, 0], 1, torch.ones(6), None, 1e-6)
    with pytest.raises(ValueError, match="without a norm"):
        _C.patch_conv2d_forward(x, w, None, y, None, [0, 0], [0, 0], 0, torch.ones(4), None, 1e-6)
    with pytest.raises(ValueError, match="norm_eps"):
        _C.patch_conv2d_forward(x, w, None, y, None, [0, 0], [0, 0], 2, None, None, float("nan"))
    with pytest.raises(ValueError, match="norm: expected"):
        _C.patch_conv2d_forward(x, w, None, y, None, [0, 0], [0, 0], 3, None, None, 1e-6)


@pytest.mark.parametrize("ln_first", [False, True])
def test_patch_conv_ln_module(ln_first):
    """PatchConvLN (ConvNeXt's stem / downsampling layers): the fused inference call equals
    the two modules; training and reference mode run the modules; keys stay 0.* / 1.*."""
    from fastvis.nn import LayerNorm2d, PatchConvLN
    torch.manual_seed(3)
    conv = PatchConv2d(8, 16, 2)
    ln = LayerNorm2d(8 if ln_first else 16)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3)
        ln.bias.normal_()
    m = PatchConvLN(ln, conv) if ln_first else PatchConvLN(conv, ln)
    assert set(m.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    x = torch.randn(2, 8, 10, 12).to(memory_format=torch.channels_last)
    m.eval()
    with torch.no_grad():
        y = m(x)
        ref = torch.nn.Sequential.forward(m, x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        conv.weight.mul_(-0.5)  # in place: the cached k-major weight follows
        torch.testing.assert_close(m(x), torch.nn.Sequential.forward(m, x), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    m.train()
    y2 = m(x)
    y2.sum().backward()
    assert conv.weight.grad is not None and ln.weight.grad is not None
    with pytest.raises(TypeError, match="PatchConv2d and a LayerNorm2d"):
        PatchConvLN(conv, torch.nn.ReLU())
    with pytest.raises(ValueError, match="channels"):
        PatchConvLN(conv, LayerNorm2d(8))
