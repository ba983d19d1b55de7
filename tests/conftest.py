"""Shared pytest configuration and helpers for the fastvis test-suite.

* Every test starts from a fixed torch seed (derived from the test's node id, so
  tests do not depend on the order they run in).
* Hypothesis profiles: "ci" (the default) is derandomized, so a CI run is exactly
  reproducible, and has no deadline (the first call of a kernel can be slow);
  "dev" explores with fresh random examples. Select with HYPOTHESIS_PROFILE=dev;
  scale the example counts of the sweeps with FASTVIS_HYPOTHESIS_SCALE.
  No health check is suppressed and nothing here skips or xfails anything.

The helpers below (the float64 oracle, the error bounds and the hypothesis
strategies of the depthwise-convolution tests) are imported by the test modules
with ``from conftest import ...``; they deliberately do not import fastvis so that
an import failure of the package shows up as a failure of the tests that need it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import zlib
from typing import Optional, Tuple, Union

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, settings
from hypothesis import strategies as st

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Each sweep states its example count for the default (CI) run; a longer local or
# nightly run multiplies them, e.g. FASTVIS_HYPOTHESIS_SCALE=20.
EXAMPLES_SCALE = float(os.environ.get("FASTVIS_HYPOTHESIS_SCALE", "1"))


def sweep(max_examples: int):
    """@settings for a property sweep of max_examples (scaled) examples."""
    return settings(max_examples=max(1, int(round(max_examples * EXAMPLES_SCALE))))


def pytest_collection_finish(session):
    """Tell tests/cpp_harness.py which host C++ programs the selected tests check (after
    -k / -m deselection), so its background builds start only those."""
    import cpp_harness

    cpp_harness.RUNNER.wanted = [m.args[0] for item in session.items for m in item.iter_markers("cpp_program")]


def pytest_sessionfinish(session, exitstatus):
    """An interrupted or -x session does not wait for host C++ programs it no longer needs."""
    import cpp_harness

    cpp_harness.RUNNER.shutdown()


@pytest.fixture(autouse=True)
def _seed_torch(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


# --------------------------------------------------------------------------- configs

PadSpec = Union[str, int, Tuple[int, int], Tuple[int, int, int, int]]


@dataclasses.dataclass(frozen=True)
class ConvCfg:
    """One depthwise-convolution problem: shapes, parameters, layout, dtype."""

    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    stride: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    padding: PadSpec = 0  # what is passed to fastvis.ops.depthwise_conv2d
    bias: bool = True
    layout: str = "nchw"  # "nchw" (contiguous) or "nhwc" (channels_last)
    dtype: torch.dtype = torch.float32
    int_stride: bool = False  # pass stride as an int (only if sh == sw)
    int_dilation: bool = False

    # The explicit (top, bottom, left, right) padding this config means, computed
    # independently of fastvis from the documented semantics.
    @property
    def pads(self) -> Tuple[int, int, int, int]:
        p = self.padding
        if p == "valid":
            return (0, 0, 0, 0)
        if p == "same":
            th = self.dilation[0] * (self.kh - 1)
            tw = self.dilation[1] * (self.kw - 1)
            # PyTorch puts the odd extra pixel at the bottom / right.
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        if isinstance(p, int):
            return (p, p, p, p)
        if len(p) == 2:
            return (p[0], p[0], p[1], p[1])
        return tuple(p)

    @property
    def out_hw(self) -> Tuple[int, int]:
        pt, pb, pl, pr = self.pads
        oh = (self.h + pt + pb - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        ow = (self.w + pl + pr - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        return oh, ow

    @property
    def stride_arg(self):
        return self.stride[0] if self.int_stride else tuple(self.stride)

    @property
    def dilation_arg(self):
        return self.dilation[0] if self.int_dilation else tuple(self.dilation)

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "nhwc" else torch.contiguous_format

    def short(self) -> str:
        return (
            f"N={self.n} C={self.c} H={self.h} W={self.w} k=({self.kh},{self.kw}) "
            f"stride={self.stride} dilation={self.dilation} padding={self.padding!r} "
            f"(pads t,b,l,r={self.pads}) bias={self.bias} layout={self.layout} "
            f"dtype={str(self.dtype).replace('torch.', '')}"
        )


def make_inputs(cfg: ConvCfg, requires_grad: bool = False):
    """x (in cfg.layout), weight (C,1,kh,kw) and bias (or None), all of cfg.dtype.

    Values are drawn in float32 and rounded once to the test dtype, so the float64
    copies used by the oracle are exactly the values the kernel sees.
    """
    x = torch.randn(cfg.n, cfg.c, cfg.h, cfg.w).to(cfg.dtype)
    x = x.contiguous(memory_format=cfg.memory_format)
    w = torch.randn(cfg.c, 1, cfg.kh, cfg.kw).to(cfg.dtype)
    b = torch.randn(cfg.c).to(cfg.dtype) if cfg.bias else None
    if requires_grad:
        x.requires_grad_(True)
        w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    return x, w, b


def make_grad_output(cfg: ConvCfg) -> torch.Tensor:
    oh, ow = cfg.out_hw
    gy = torch.randn(cfg.n, cfg.c, oh, ow).to(cfg.dtype)
    return gy.contiguous(memory_format=cfg.memory_format)


# --------------------------------------------------------------------------- oracle


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64)


@contextlib.contextmanager
def single_threaded_torch():
    """Run the (tiny) oracle convolutions on one torch thread.

    They gain nothing from threads, and OpenMP spin-waiting makes them up to 1000x
    slower when the machine is oversubscribed (e.g. a build running next to the tests).
    This does not touch fastvis's own thread pool.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def oracle_conv(x, w, b, cfg: ConvCfg) -> torch.Tensor:
    """F.conv2d(groups=C) with the padding applied explicitly by F.pad (any dtype)."""
    pt, pb, pl, pr = cfg.pads
    xp = F.pad(x, (pl, pr, pt, pb))
    return F.conv2d(xp, w, b, stride=cfg.stride, dilation=cfg.dilation, groups=x.shape[1])


def oracle_forward(x, w, b, cfg: ConvCfg):
    """(reference output, magnitude) in float64.

    magnitude = conv(|x|, |w|) + |b| bounds every partial sum of the output element,
    which is what floating-point summation error is proportional to.
    """
    x64, w64, b64 = _f64(x), _f64(w), _f64(b)
    with single_threaded_torch():
        ref = oracle_conv(x64, w64, b64, cfg)
        mag = oracle_conv(x64.abs(), w64.abs(), None if b64 is None else b64.abs(), cfg)
    return ref, mag


def oracle_backward(x, w, b, gy, cfg: ConvCfg):
    """Reference gradients and their magnitudes in float64: dict name -> (ref, mag)."""
    with single_threaded_torch():
        return _oracle_backward(x, w, b, gy, cfg)


def _oracle_backward(x, w, b, gy, cfg: ConvCfg):
    x64 = _f64(x).requires_grad_(True)
    w64 = _f64(w).requires_grad_(True)
    b64 = None if b is None else _f64(b).requires_grad_(True)
    gy64 = _f64(gy)
    y = oracle_conv(x64, w64, b64, cfg)
    inputs = (x64, w64) + ((b64,) if b64 is not None else ())
    grads = torch.autograd.grad(y, inputs, gy64)
    # Magnitudes: the same (linear) maps applied to absolute values.
    gya = gy64.abs()
    xg = _f64(x).requires_grad_(True)
    (gx_mag,) = torch.autograd.grad(oracle_conv(xg, _f64(w).abs(), None, cfg), (xg,), gya)
    wg = _f64(w).requires_grad_(True)
    (gw_mag,) = torch.autograd.grad(oracle_conv(_f64(x).abs(), wg, None, cfg), (wg,), gya)
    out = {"x": (grads[0], gx_mag), "weight": (grads[1], gw_mag)}
    if b64 is not None:
        out["bias"] = (grads[2], gya.sum(dim=(0, 2, 3)))
    return out


# --------------------------------------------------------------------------- tolerances
#
# All comparisons are against a float64 oracle evaluated on exactly the values the
# kernel saw, and use a per-element bound
#
#     |result - ref| <= rel_ref * |ref| + rel_mag * magnitude
#
# where magnitude is the sum of the absolute values of the terms of that element
# (conv(|x|,|w|)+|b| for the output, the analogous sums for the gradients).
#
# * float32 (float32 accumulation): the classical worst-case bound of a length-L
#   dot product in any summation order, FMA or not, is gamma_L = L*u/(1-L*u) times
#   the magnitude, u = 2^-24. We allow (L + 2) * u (one more for the bias and one
#   for the final store), but never less than 1e-5 (the customary float32
#   tolerance, leaving room for e.g. a pre-scaled weight layout). L = kh*kw for
#   the output and grad_x, L = N*OH*OW for grad_weight and grad_bias.
# * float64: the same bound with u = 2^-53 is below 1e-12 for every size used
#   here; we use a flat 1e-10 of the magnitude (the oracle has error of the same
#   order as the kernel, so some headroom is needed, and 1e-10 still catches any
#   lost or extra term).
# * bfloat16 (inputs bf16-exact, float32 accumulation, one rounding to bf16 at
#   the end): round-to-nearest to bf16 (8 significant bits) errs by at most half
#   an ulp, 2^-8 * |value|; we allow exactly that, 2^-8 * |ref|, plus the float32
#   accumulation bound above, twice (it also enters the rounded value). There is no
#   extra margin: a kernel that rounds any other way than to nearest fails.

U32 = 2.0 ** -24


def tolerance(dtype: torch.dtype, reduction_len: int) -> Tuple[float, float]:
    """(rel_ref, rel_mag) for a result of `dtype` that sums `reduction_len` terms."""
    acc32 = max(1e-5, (reduction_len + 2) * U32)
    if dtype == torch.float64:
        return 0.0, 1e-10
    if dtype == torch.float32:
        return 0.0, acc32
    if dtype == torch.bfloat16:
        return 2.0 ** -8, 2 * acc32
    raise AssertionError(f"no tolerance for {dtype}")


def assert_within(name: str, got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor,
                  dtype: torch.dtype, reduction_len: int, context: str = "") -> None:
    """Element-wise |got - ref| <= rel_ref*|ref| + rel_mag*mag, with a precise report."""
    assert tuple(got.shape) == tuple(ref.shape), (
        f"{name}: shape {tuple(got.shape)} != expected {tuple(ref.shape)}; {context}")
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}; {context}"
    rel_ref, rel_mag = tolerance(dtype, reduction_len)
    g = got.detach().to(torch.float64)
    err = (g - ref).abs()
    bound = rel_ref * ref.abs() + rel_mag * mag
    bad = ~(err <= bound)  # also catches NaN
    if bool(bad.any()):
        ratio = torch.where(bound > 0, err / bound, torch.full_like(err, math.inf))
        ratio = torch.where(torch.isnan(err), torch.full_like(err, math.inf), ratio)
        idx = int(torch.argmax(torch.where(bad, ratio, torch.zeros_like(ratio))))
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), g.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{g.numel()} elements out of tolerance "
            f"(rel_ref={rel_ref:.3g}, rel_mag={rel_mag:.3g}, reduction length {reduction_len}); "
            f"worst at {pos}: got {g[pos].item()!r}, expected {ref[pos].item()!r}, "
            f"|diff|={err[pos].item():.3g}, bound={bound[pos].item():.3g}, "
            f"magnitude={mag[pos].item():.3g}; max |diff| overall {err.nan_to_num(math.inf).max().item():.3g}; "
            f"{context}")


def check_forward(y, x, w, b, cfg: ConvCfg, name: str = "y") -> None:
    ref, mag = oracle_forward(x, w, b, cfg)
    assert_within(name, y, ref, mag, cfg.dtype, cfg.kh * cfg.kw, cfg.short())


def check_backward(grads: dict, x, w, b, gy, cfg: ConvCfg, prefix: str = "grad_") -> None:
    """grads: {"x": gx, "weight": gw, "bias": gb (optional)}."""
    refs = oracle_backward(x, w, b, gy, cfg)
    oh, ow = cfg.out_hw
    lens = {"x": cfg.kh * cfg.kw, "weight": cfg.n * oh * ow, "bias": cfg.n * oh * ow}
    for key, got in grads.items():
        ref, mag = refs[key]
        if key == "weight":
            got = got.reshape(ref.shape)
        assert_within(prefix + key, got, ref, mag, cfg.dtype, lens[key], cfg.short())


# --------------------------------------------------------------------------- strategies


def pad_limits(cfg_k: Tuple[int, int], dil: Tuple[int, int]) -> Tuple[int, int]:
    return dil[0] * (cfg_k[0] - 1), dil[1] * (cfg_k[1] - 1)


@st.composite
def kernel_sizes(draw, max_k: int = 11):
    kind = draw(st.sampled_from(["square_odd", "square_any", "band_h", "band_w", "rect"]))
    if kind == "square_odd":
        k = draw(st.sampled_from([k for k in (1, 3, 5, 7, 9, 11, 13) if k <= max_k]))
        return k, k
    if kind == "square_any":
        k = draw(st.integers(1, max_k))
        return k, k
    if kind == "band_h":  # 1 x k
        return 1, draw(st.integers(2, max_k))
    if kind == "band_w":  # k x 1
        return draw(st.integers(2, max_k)), 1
    return draw(st.integers(1, max_k)), draw(st.integers(1, max_k))


@st.composite
def conv_configs(draw, dtypes=(torch.float32,), max_hw: int = 20, max_c: int = 40,
                 max_k: int = 11, max_n: int = 3, layouts=("nchw", "nhwc")):
    """Random valid problems (output at least 1x1) within the documented limits."""
    kh, kw = draw(kernel_sizes(max_k=max_k))
    # Stride 1 and "same" padding (the common case in real networks) are weighted up.
    sh = draw(st.sampled_from([1, 2, 1]))
    sw = draw(st.sampled_from([1, 2, 1]))

    # Keep the dilated kernel within what a max_hw image plus padding can hold.
    def dil(k):
        top = 3 if k == 1 else max(1, min(3, (max_hw - 1) // (k - 1)))
        return draw(st.integers(1, top))

    dh, dw = dil(kh), dil(kw)
    lim_h, lim_w = pad_limits((kh, kw), (dh, dw))

    kinds = ["valid", "int", "pair", "quad"] + (["same"] * 3 if (sh, sw) == (1, 1) else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "valid" or kind == "same":
        padding = kind
    elif kind == "int":
        padding = draw(st.integers(0, min(lim_h, lim_w)))
    elif kind == "pair":
        padding = (draw(st.integers(0, lim_h)), draw(st.integers(0, lim_w)))
    else:
        padding = (draw(st.integers(0, lim_h)), draw(st.integers(0, lim_h)),
                   draw(st.integers(0, lim_w)), draw(st.integers(0, lim_w)))

    proto = ConvCfg(n=1, c=1, h=1, w=1, kh=kh, kw=kw, stride=(sh, sw), dilation=(dh, dw),
                    padding=padding)
    pt, pb, pl, pr = proto.pads
    min_h = max(1, dh * (kh - 1) + 1 - pt - pb)
    min_w = max(1, dw * (kw - 1) + 1 - pl - pr)
    assume(min_h <= max_hw and min_w <= max_hw)
    h = draw(st.integers(min_h, max_hw))
    w = draw(st.integers(min_w, max_hw))
    # Channel counts around the SIMD widths (8 / 16 floats) are drawn more often.
    special = [c for c in (7, 8, 9, 15, 16, 17, 24, 31, 32, 33) if c <= max_c]
    c = draw(st.one_of(st.integers(1, max_c), st.sampled_from(special))
             if special else st.integers(1, max_c))
    return ConvCfg(
        n=draw(st.integers(1, max_n)), c=c, h=h, w=w, kh=kh, kw=kw, stride=(sh, sw),
        dilation=(dh, dw), padding=padding, bias=draw(st.booleans()),
        layout=draw(st.sampled_from(list(layouts)[::-1])), dtype=draw(st.sampled_from(list(dtypes))),
        int_stride=sh == sw and draw(st.booleans()),
        int_dilation=dh == dw and draw(st.booleans()),
    )


def unambiguous_layout(t: torch.Tensor) -> bool:
    """True when t is dense in exactly one of NCHW / channels_last."""
    return t.is_contiguous() != t.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------ the core's GEMM engines


@pytest.fixture(params=["own", "blas"])
def gemm_engine(request):
    """The core's float GEMM forced to the own AVX-512 kernels ("own"; skipped where they
    are not available) or to the BLAS ("blas"), back to automatic afterwards."""
    from fastvis import _C
    if request.param == "own" and not _C.own_gemm_available():
        pytest.skip("no AVX-512 path here: the own kernel is not available")
    _C.set_own_gemm(1 if request.param == "own" else 0)
    yield request.param
    _C.set_own_gemm(-1)


def each_gemm_engine(check) -> None:
    """check() with the own kernels forced on (where available), then with the BLAS; for
    hypothesis tests, which cannot take a parametrised fixture."""
    from fastvis import _C
    for mode in ([1, 0] if _C.own_gemm_available() else [0]):
        _C.set_own_gemm(mode)
        try:
            check()
        finally:
            _C.set_own_gemm(-1)
