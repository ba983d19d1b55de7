"""fastvis.ops.mlp: fc2(GRN?(GELU(fc1(x)))) on (N, H, W, C) tokens, on each of its CPU
paths: the core's tiled MLP (fastvis/mlp.h: saves only x, recomputes fc1 in the backward)
and the torch-GEMM path (saves x and fc1's output), the latter with its products as oneDNN
1x1 convolutions and as ``F.linear`` / ``mm``. Tests that depend on the path run on all
three (``force_path``).

Oracle: fastvis.ops.mlp_reference (F.linear, F.gelu, the GRN formula, F.linear) in float64
on exactly the values the op saw, and torch.autograd through it. The op's GEMMs are
torch's (or the core's); its GELU / GRN are the core's GRN family (its own tests bound them per element,
tests/test_grn*.py). Here: max |got - ref| <= tol * max(mag) per tensor, with mag for y the
same composition evaluated on absolute values (|x|, |W|, |b|; GELU and GRN replaced by
their magnitude bounds |h| and |h| (1 + |w| Nx) + |b|) and for a gradient its own largest
entry times the forward's cancellation factor max(mag y) / max |y|; tol 2e-5 for float32
(K <= 160 terms a GEMM, plus the GELU error of test_grn_gelu), 1e-10 for float64, 2^-6 for
bfloat16. A wrong formula is off by O(1) of the magnitude; the derivative formulas are
also checked exactly by float64 gradcheck.
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastvis
import fastvis.ops
from conftest import single_threaded_torch, sweep

mlp, mlp_reference = fastvis.ops.mlp, fastvis.ops.mlp_reference
MLP_MODULE = sys.modules["fastvis.ops.mlp"]  # the module (fastvis.ops.mlp is the function)
PATHS = ("tiled", "gemm", "mm")


@contextlib.contextmanager
def force_path(path: str):
    """Run fastvis.ops.mlp on one CPU path: "tiled" (the core's tiled MLP wherever it
    applies, GRN included), "gemm" (the torch-GEMM path as it runs here: its products as
    oneDNN 1x1 convolutions where PyTorch has oneDNN, for float32 / bfloat16) or "mm" (the
    torch-GEMM path on ``F.linear`` / ``mm``)."""
    real = MLP_MODULE._tiled_serves, MLP_MODULE._ONEDNN
    if path == "tiled":
        def serves(x, w1, w2, gw):
            return w2.shape[0] == x.shape[-1]
    else:
        def serves(x, w1, w2, gw):
            return False
    MLP_MODULE._tiled_serves = serves
    if path == "mm":
        MLP_MODULE._ONEDNN = False
    try:
        yield
    finally:
        MLP_MODULE._tiled_serves, MLP_MODULE._ONEDNN = real


TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2.0 ** -6}
NAMES = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "grn_weight", "grn_bias")


def make(n, h, w, c, hidden, cout, dtype=torch.float32, grn=True, bias1=True, bias2=True,
         grn_bias=True, x_offset=0.0):
    g = torch.Generator().manual_seed(n * 1000 + h * 100 + w * 10 + c + hidden + cout)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    t = dict(x=(torch.randn(n, h, w, c, generator=g) + x_offset).to(dtype),
             fc1_weight=r(hidden, c, std=c ** -0.5), fc1_bias=r(hidden) if bias1 else None,
             fc2_weight=r(cout, hidden, std=hidden ** -0.5), fc2_bias=r(cout) if bias2 else None,
             grn_weight=r(hidden) if grn else None, grn_bias=r(hidden) if (grn and grn_bias) else None)
    return t


def call(fn, t, approximate="none"):
    return fn(t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"],
              grn_weight=t["grn_weight"], grn_bias=t["grn_bias"], approximate=approximate)


def oracle(t, gy, approximate):
    """float64 (ref, mag) for y and every gradient."""
    with single_threaded_torch():
        leaves = {k: (None if v is None else v.detach().double().requires_grad_(True)) for k, v in t.items()}
        y = call(mlp_reference, leaves, approximate)
        present = [k for k in NAMES if leaves[k] is not None]
        grads = dict(zip(present, torch.autograd.grad(y, [leaves[k] for k in present], gy.double())))
        a = {k: (None if v is None else v.detach().double().abs()) for k, v in t.items()}
        # Magnitudes: the same computation on absolute values, GELU -> |h|, GRN -> upper bound.
        h = F.linear(a["x"], a["fc1_weight"], a["fc1_bias"])
        if a["grn_weight"] is not None:
            g = torch.linalg.vector_norm(h, dim=(1, 2), keepdim=True)
            hr = torch.linalg.vector_norm(F.gelu(F.linear(leaves["x"].detach(), leaves["fc1_weight"].detach(),
                                                          None if leaves["fc1_bias"] is None else leaves["fc1_bias"].detach()),
                                                 approximate=approximate), dim=(1, 2), keepdim=True)
            nx = g / (hr.mean(-1, keepdim=True) + 1e-6)
            h = h * (1 + a["grn_weight"] * nx) + (0 if a["grn_bias"] is None else a["grn_bias"])
        y_mag = F.linear(h, a["fc2_weight"], a["fc2_bias"])
        out = {"y": (y.detach(), y_mag)}
        # Gradients: each against its own largest entry times the forward's cancellation
        # factor kappa = max(mag y) / max |y| (>= 1): the chain rule forms the same products
        # as the forward, transposed, so the same cancellation bounds their rounding.
        kappa = float(y_mag.max() / y.detach().abs().max().clamp_min(1e-300)) if y.numel() else 1.0
        for k in present:
            ref = grads[k].detach()
            out[k] = (ref, torch.full_like(ref, float(ref.abs().max()) * max(kappa, 1.0) if ref.numel() else 0.0))
        return out


def check(got: dict, refs: dict, dtype, context: str):
    tol = TOL[dtype]
    for k, v in got.items():
        ref, mag = refs[k]
        assert v is not None, f"{k}: no gradient; {context}"
        assert tuple(v.shape) == tuple(ref.shape) and v.dtype == dtype, (k, v.shape, v.dtype, context)
        if ref.numel() == 0:
            continue
        err = (v.detach().double() - ref).abs().max().item()
        bound = tol * mag.max().item()
        assert err <= bound, f"{k}: max |diff| {err:.3g} > {bound:.3g}; {context}"


@st.composite
def cases(draw):
    c = draw(st.sampled_from([1, 3, 8, 16, 17, 40]))
    hidden = draw(st.sampled_from([4, 8, 13, 32, 64, 160]))
    return dict(n=draw(st.sampled_from([1, 2, 3, 0])), h=draw(st.integers(1, 9)), w=draw(st.integers(1, 9)),
                c=c, hidden=hidden, cout=draw(st.sampled_from([c, 5])),
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16])),
                grn=draw(st.booleans()), bias1=draw(st.booleans()), bias2=draw(st.booleans()),
                grn_bias=draw(st.booleans()), x_offset=draw(st.sampled_from([0.0, -1.0]))), \
        draw(st.sampled_from(["none", "tanh"])), draw(st.sampled_from(PATHS))


@sweep(80)
@given(case=cases())
def test_forward_backward_sweep(case):
    kw, approximate, path = case
    t = make(**kw)
    leaves = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in t.items()}
    with force_path(path):
        y = call(mlp, leaves, approximate)
        assert y.shape == (kw["n"], kw["h"], kw["w"], kw["cout"]) and y.is_contiguous()
        gy = torch.randn(y.shape).to(kw["dtype"])
        present = [k for k in NAMES if leaves[k] is not None]
        grads = dict(zip(present, torch.autograd.grad(y, [leaves[k] for k in present], gy)))
    check({"y": y, **grads}, oracle(t, gy, approximate), kw["dtype"],
          f"{kw} approximate={approximate} path={path}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grn", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_float64(grn, approximate, path):
    t = make(2, 3, 2, 3, 6, 3, dtype=torch.float64, grn=grn)
    present = [k for k in NAMES if t[k] is not None]

    def f(*args):
        d = dict(t, **dict(zip(present, args)))
        return call(mlp, d, approximate)
    with force_path(path):
        assert torch.autograd.gradcheck(f, [t[k].clone().requires_grad_(True) for k in present])


@pytest.mark.parametrize("grn", [False, True])
def test_tiled_path_is_taken_and_thread_invariant(grn):
    """With C_out == C the tiled op runs (fastvis::mlp_tiled in the graph, only x saved);
    its outputs and gradients are bitwise the same for 1 and 2 threads (the tile plan and
    the reduction order depend on the shape only), over several tiles and partial-sum runs."""
    t = make(3, 17, 20, 24, 96, 24, grn=grn)
    gy = torch.randn(3, 17, 20, 24)
    results = []
    old = fastvis.get_num_threads()
    try:
        for nt in (1, 2):
            fastvis.set_num_threads(nt)
            leaves = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in t.items()}
            with force_path("tiled"):
                y = call(mlp, leaves)
            assert "mlp_tiled" in str(y.grad_fn.name())
            present = [k for k in NAMES if leaves[k] is not None]
            results.append([y] + list(torch.autograd.grad(y, [leaves[k] for k in present], gy)))
    finally:
        fastvis.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    check(dict(zip(["y"] + [k for k in NAMES if t[k] is not None], results[0])),
          oracle(t, gy, "none"), torch.float32, f"grn={grn}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_grn_store_budget_changes_no_bit(dtype):
    """The tiled path with GRN keeps hidden-sized values between its passes within
    fastvis._C.set_grn_store_bytes' budget; nothing kept, dz only and everything give
    bitwise the same outputs and gradients."""
    from fastvis import _C
    t = make(2, 11, 13, 16, 64, 16, dtype=dtype, grn=True)
    gy = torch.randn(2, 11, 13, 16).to(dtype)
    hb = 2 * 11 * 13 * 64 * 4
    default = _C.grn_store_bytes()
    results = []
    try:
        for cap in (0, hb, default):
            _C.set_grn_store_bytes(cap)
            leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
            with force_path("tiled"):
                y = call(mlp, leaves)
            results.append([y] + list(torch.autograd.grad(y, [leaves[k] for k in NAMES], gy)))
    finally:
        _C.set_grn_store_bytes(default)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_default_path_choice():
    """mlp_path names what the op runs, and follows the rules of _tiled_serves: C_out != C
    the torch-GEMM path; a wide engine (own GEMM / AVX-512 BLAS) tiled except large hidden
    widths at enough pixels; a narrow one oneDNN for GRN and for small hidden activations;
    float64 (no oneDNN) tiled without GRN."""
    def runs(t):
        leaves = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in t.items()}
        name = str(call(mlp, leaves).grad_fn.name())
        path = MLP_MODULE.mlp_path(leaves["x"], leaves["fc1_weight"], leaves["fc2_weight"],
                                   leaves["grn_weight"])
        assert ("mlp_tiled" in name) == (path == "tiled"), (name, path)
        return path

    onednn = "onednn" if MLP_MODULE._onednn_serves(torch.zeros(1)) else "mm"
    assert runs(make(1, 3, 3, 8, 16, 5, grn=False)) == onednn
    assert runs(make(1, 3, 3, 8, 16, 8, grn=False, dtype=torch.float64)) == "tiled"
    real = MLP_MODULE._CORE_GEMM_WIDE
    path = MLP_MODULE.mlp_path
    try:
        for wide in (True, False):
            MLP_MODULE._CORE_GEMM_WIDE = wide
            for grn in (False, True):
                want = "tiled" if (wide or (not grn and onednn == "mm")) else onednn
                assert runs(make(1, 3, 3, 8, 16, 8, grn=grn)) == want, (wide, grn)
        if onednn == "onednn":  # the thresholds, on shapes alone
            z = torch.empty
            MLP_MODULE._CORE_GEMM_WIDE = True
            assert path(z(1, 32, 32, 8), z(1024, 8), z(8, 1024)) == "onednn"  # 1024 pixels
            assert path(z(1, 31, 32, 8), z(1024, 8), z(8, 1024)) == "tiled"   # 992
            assert path(z(1, 32, 32, 8), z(1000, 8), z(8, 1000)) == "tiled"
            MLP_MODULE._CORE_GEMM_WIDE = False
            w1, w2 = z(384, 96), z(96, 384)
            assert path(z(4, 56, 56, 96), w1, w2) == "onednn"  # 19.3 MB of hidden activation
            assert path(z(8, 56, 56, 96), w1, w2) == "tiled"   # 38.5 MB
            assert path(z(8, 56, 56, 96), w1, w2, z(384)) == "onednn"
    finally:
        MLP_MODULE._CORE_GEMM_WIDE = real


def _saved_bytes(fn, params):
    skip = {p.data_ptr() for p in params}
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        key = (t.data_ptr(), tuple(t.shape))
        if t.data_ptr() not in skip and key not in seen and t.numel() > 0:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grn", [True, False])
def test_saved_activations(grn, path):
    """What autograd keeps: the tiled path x only (C values a pixel) plus, with GRN, its
    (N, H, hidden) row sums; the torch-GEMM path x and h (C + hidden) plus GRN's (N,
    hidden) norms; the reference (eager PyTorch) keeps GELU's output and GRN's output as
    well."""
    n, h, w, c, hidden = 2, 6, 5, 8, 32
    t = {k: (None if v is None else v.requires_grad_(True)) for k, v in make(n, h, w, c, hidden, c, grn=grn).items()}
    params = [v for k, v in t.items() if v is not None and k != "x"]
    with force_path(path):
        got = _saved_bytes(lambda: call(mlp, t), params)
    px = n * h * w
    if path == "tiled":
        want = 4 * (px * c + (n * h * hidden if grn else 0))
    else:
        want = 4 * (px * (c + hidden) + (n * hidden if grn else 0))
    assert got == want
    ref = _saved_bytes(lambda: call(mlp_reference, t), params)
    assert ref >= 4 * px * (c + 2 * hidden) and got < 0.7 * ref


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("which", ["x", "fc1_weight", "fc2_weight", "grn_weight", "grn_bias", "fc1_bias"])
def test_partial_requires_grad(which, path):
    t = make(2, 4, 3, 8, 16, 8)
    full = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    gy = torch.randn(2, 4, 3, 8)
    with force_path(path):
        y = call(mlp, full)
        g_all = dict(zip(NAMES, torch.autograd.grad(y, [full[k] for k in NAMES], gy)))
        part = {k: (v.clone().requires_grad_(True) if k == which else v.clone()) for k, v in t.items()}
        (g,) = torch.autograd.grad(call(mlp, part), part[which], gy)
    assert torch.equal(g, g_all[which])


def test_non_contiguous_tokens_and_channels_last_view():
    t = make(2, 5, 4, 8, 16, 8)
    x_cl = t["x"].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    assert x_cl.is_contiguous()
    x_nc = t["x"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # from NCHW: not contiguous
    assert not x_nc.is_contiguous()
    y1 = call(mlp, dict(t, x=x_cl))
    y2 = call(mlp, dict(t, x=x_nc))
    assert torch.equal(y1, y2)


def test_reference_mode_bf16_autocast_and_no_grad():
    t = make(2, 4, 4, 8, 32, 8)
    y = call(mlp, t)
    with fastvis.use_reference():
        yr = call(mlp, t)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(call(mlp, t), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = call(mlp, t)
    assert yb.dtype == torch.bfloat16
    # bfloat16 rounds x, the weights, h, GRN's output and y (2^-9 relative each, five
    # times): 2^-6 of the largest output leaves ~4x margin (measured: ~2.6e-3).
    assert (yb.float() - y).abs().max() <= 2 ** -6 * y.abs().max()


def test_torch_compile_fullgraph_and_opcheck():
    t = {k: v.requires_grad_(True) for k, v in make(2, 4, 3, 8, 16, 8).items()}
    torch._dynamo.reset()
    f = torch.compile(lambda d: call(mlp, d, "tanh"), fullgraph=True)
    yc = f(t)
    gc = torch.autograd.grad(yc.square().sum(), [t[k] for k in NAMES])
    ye = call(mlp, t, "tanh")
    ge = torch.autograd.grad(ye.square().sum(), [t[k] for k in NAMES])
    torch.testing.assert_close(yc, ye)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)
    args = (t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"], t["grn_weight"],
            t["grn_bias"], 1e-6, 1)
    torch.library.opcheck(torch.ops.fastvis.mlp.default, args)
    torch.library.opcheck(torch.ops.fastvis.mlp.default, args[:5] + (None, None, 1e-6, 2))
    torch.library.opcheck(torch.ops.fastvis.mlp_tiled.default, args)
    torch.library.opcheck(torch.ops.fastvis.mlp_tiled.default, args[:5] + (None, None, 1e-6, 2))


def test_core_tiled_mlp_refuses_bad_input():
    """The core's entry points (fastvis/mlp.h) check what the Python layer would not send."""
    from fastvis import _C
    t = make(1, 4, 3, 8, 16, 8, grn=False)
    x = t["x"].permute(0, 3, 1, 2)  # the NHWC-dense logical NCHW view
    ws = [t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"], None, None]
    y = torch.empty_like(t["x"]).permute(0, 3, 1, 2)
    _C.mlp_forward(x, ws, False, 1e-6, y)
    torch.testing.assert_close(y.permute(0, 2, 3, 1), call(mlp_reference, t), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels-last"):
        _C.mlp_forward(x.contiguous(), ws, False, 1e-6, y)
    with pytest.raises(ValueError, match="must not overlap"):
        _C.mlp_forward(x, ws, False, 1e-6, x)
    with pytest.raises(ValueError, match="fc2_weight"):
        _C.mlp_forward(x, ws[:2] + [torch.randn(5, 16)] + ws[3:], False, 1e-6, y)
    with pytest.raises(ValueError, match="grn_weight and grn_bias"):
        _C.mlp_forward(x, ws[:4] + [torch.ones(16), None], False, 1e-6, y)
    with pytest.raises(ValueError, match="scratch buffer too small|scratch"):
        _C.mlp_forward(x, ws, False, 1e-6, y, torch.empty(8, dtype=torch.uint8))
    gy = torch.randn_like(t["x"]).permute(0, 3, 1, 2)
    grads = [gy, None, None, None, None, None, None]
    with pytest.raises(ValueError, match="must not overlap"):
        _C.mlp_backward(gy, x, ws, False, 1e-6, grads)
    with pytest.raises(ValueError, match="no GRN"):
        _C.mlp_backward(gy, x, ws, False, 1e-6, [None] * 5 + [torch.empty(16), None])
    with pytest.raises(ValueError, match="grad_fc1_weight"):
        _C.mlp_backward(gy, x, ws, False, 1e-6, [None, torch.empty(16, 9)] + [None] * 5)
    with pytest.raises(ValueError, match="no GRN"):
        _C.mlp_forward(x, ws, False, 1e-6, y, None, torch.empty(1, 4, 16))
    wg = ws[:4] + [torch.ones(16), torch.zeros(16)]
    with pytest.raises(TypeError, match="accumulation type"):
        _C.mlp_forward(x, wg, False, 1e-6, y, None, torch.empty(1, 4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[1, 4, 16\]"):
        _C.mlp_backward(gy, x, wg, False, 1e-6, [None] * 7, None, torch.empty(1, 3, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_core_grn_stats_from_the_forward_change_no_bit(dtype):
    """mlp_backward given the forward's GRN row sums skips recomputing them: bitwise the
    same gradients as without them, and the sums are GRN's (sum over a row of gelu(fc1)^2)."""
    from fastvis import _C
    t = make(2, 7, 6, 16, 48, 16, dtype=dtype, grn=True)
    x = t["x"].permute(0, 3, 1, 2)
    ws = [t[k] for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "grn_weight", "grn_bias")]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stats = torch.empty(2, 7, 48, dtype=acc)
    y = torch.empty_like(t["x"])
    _C.mlp_forward(x, ws, False, 1e-6, y.permute(0, 3, 1, 2), None, stats)
    g = F.gelu(F.linear(t["x"].to(acc), t["fc1_weight"].to(acc), t["fc1_bias"].to(acc)))
    torch.testing.assert_close(stats, g.square().sum(2), rtol=1e-4 if acc == torch.float32 else 1e-12,
                               atol=1e-5 if acc == torch.float32 else 1e-12)
    gy = torch.randn_like(t["x"]).permute(0, 3, 1, 2)
    out = []
    for s in (None, stats):
        gs = [torch.empty_like(t["x"]).permute(0, 3, 1, 2)] + [torch.empty_like(w) for w in ws]
        _C.mlp_backward(gy, x, ws, False, 1e-6, gs, None, s)
        out.append(gs)
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_bad_input_is_refused():
    t = make(1, 3, 3, 4, 8, 4)
    bad = [
        (dict(x=t["x"][0]), ValueError, "N, H, W, C"),
        (dict(fc1_weight=torch.randn(8, 5)), ValueError, "fc1_weight"),
        (dict(fc2_weight=torch.randn(4, 7)), ValueError, "fc2_weight"),
        (dict(fc1_bias=torch.randn(7)), ValueError, "fc1_bias"),
        (dict(grn_weight=torch.randn(3)), ValueError, "grn_weight"),
        (dict(grn_weight=None), ValueError, "grn_bias given without grn_weight"),
        (dict(fc2_weight=t["fc2_weight"].double()), TypeError, "dtype"),
        (dict(x=t["x"].to(torch.int32)), TypeError, "backend supports"),
        (dict(fc1_weight=None), TypeError, "fc1_weight"),
    ]
    for change, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            call(mlp, dict(t, **change))
    with pytest.raises(ValueError, match="approximate"):
        call(mlp, t, approximate="fast")
    with pytest.raises(ValueError, match="grn_eps"):
        mlp(t["x"], t["fc1_weight"], None, t["fc2_weight"], grn_weight=t["grn_weight"], grn_eps=0.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grn", [False, True])
def test_interleaved_graphs_do_not_share_temporaries(grn, path):
    """The op's hidden-sized temporaries come from per-thread workspaces (_bridge.workspace):
    two graphs interleaved (forward A, forward B, backward B, backward A, of different
    sizes) get exactly the gradients each gets alone."""
    torch.manual_seed(11)

    def make(n, h):
        x = torch.randn(n, h, h, 8, requires_grad=True)
        ps = [torch.randn(32, 8) * 0.3, torch.randn(32), torch.randn(8, 32) * 0.3, torch.randn(8)]
        ps = [p.requires_grad_() for p in ps]
        g = dict(grn_weight=torch.randn(32, requires_grad=True), grn_bias=torch.randn(32, requires_grad=True)) if grn else {}
        return x, ps, g, torch.randn(n, h, h, 8)

    def leaves(case):
        x, ps, g, _ = case
        return [x, *ps, *g.values()]

    a, b = make(2, 6), make(3, 9)
    with force_path(path):
        _interleave(a, b, leaves)


def _interleave(a, b, leaves):
    alone = []
    for x, ps, g, gy in (a, b):
        alone.append(torch.autograd.grad(fastvis.ops.mlp(x, *ps, **g), leaves((x, ps, g, gy)), gy))
    ya = fastvis.ops.mlp(a[0], *a[1], **a[2])
    yb = fastvis.ops.mlp(b[0], *b[1], **b[2])
    gb = torch.autograd.grad(yb, leaves(b), b[3])
    ga = torch.autograd.grad(ya, leaves(a), a[3])
    for got, want in ((ga, alone[0]), (gb, alone[1])):
        for u, v in zip(got, want):
            assert torch.equal(u, v)


def test_workspace_buffers():
    from fastvis.ops._bridge import workspace
    t1 = workspace("test.a", (4, 5), torch.float32, torch.device("cpu"))
    t2 = workspace("test.b", (4, 5), torch.float32, torch.device("cpu"))
    assert t1.shape == (4, 5) and t1.dtype == torch.float32 and t1.is_contiguous()
    assert t1.data_ptr() != t2.data_ptr()  # distinct keys, distinct memory
    again = workspace("test.a", (2, 3), torch.float64, torch.device("cpu"))
    assert again.data_ptr() == t1.data_ptr()  # the same key reuses its buffer
    big = workspace("test.a", (65 << 20,), torch.uint8, torch.device("cpu"))
    assert big.numel() == 65 << 20 and big.data_ptr() != t1.data_ptr()  # above the cap: fresh
