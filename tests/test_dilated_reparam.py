"""Fused multi-branch depthwise conv + BatchNorm (CPU): fastvis.ops.dilated_reparam_conv.

The oracle is the float64 composition sum_b F.batch_norm(F.conv2d(x, w_b, ..., d_b,
groups=C), ...) and torch.autograd on it, evaluated on exactly the values the kernel saw
(inputs drawn in float32 and rounded once to the tested dtype). Comparisons are
per element, |got - ref| <= rel_ref*|ref| + rel_mag*mag (conftest's `tolerance`:
(L + 2) u of the magnitude, at least 1e-5 in float32; 1e-10 in float64; bfloat16 adds
2^-8 |ref| for the final rounding), with magnitudes from a first-order error analysis
of what the kernels compute in the accumulation type (u its unit roundoff). Notation:
branch b, za_b = conv_b(|x|; |w_b|) (bounds every partial sum of z_b), mu_b, sigma_b the
batch statistics, xh_b = (z_b - mu_b) / sigma_b, s_b = gamma_b / sigma_b, M = N*H*W,
E = merged kernel size, K = the largest k_b^2.

  y (merged conv, K rounded once, plus the statistics' error: delta mu_b <= K u mean za_b,
    delta sigma_b / sigma_b <= K u mean(|xh_b| za_b) / sigma_b):
      mag = sum_b |s_b| (za_b + |mu_b| + mean za_b + |xh_b| mean(|xh_b| za_b)) + |beta_b|,
      L = 2 E^2 + 1
  grad beta_b = sum g:                                   mag sum |g|,            L = M
  grad gamma_b = (sum_t w_b[t] G[t] - mu_b sum g) / sigma_b, G the E x E weight gradient
      of g against x:  mag_gamma_b = sum |g| (|xh_b| + (za_b + |mu_b|) / sigma_b),  L = M + E^2
  dz_b = s_b g + u_b + v_b z_b (r_b = u_b + v_b z_b computed as one convolution):
      mag_dz_b = |s_b| (|g| + mean|g| + (|xh_b| + (za_b + |mu_b|) / sigma_b) mag_gamma_b / M)
  grad x = sum_b conv_b^T(dz_b):   mag sum_b conv_b^T(mag_dz_b; |w_b|),      L = M + 2 E^2 + 4
  grad w_b = corr(dz_b, x):        mag corr(mag_dz_b, |x|),                   L = 2 M + E^2
Running statistics: running <- (1 - m) running + m * batch (unbiased variance), compared
with F.batch_norm's own update in float64 (statistics error as above, L = 2 K).
Inputs have healthy variance (BN divides by sigma): x ~ N(0, 1), gamma in [0.5, 1.5].
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import zlib
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastvis
import fastvis.ops
from conftest import assert_within, single_threaded_torch, sweep

_C = fastvis._C
op = fastvis.ops.dilated_reparam_conv
EPS = 1e-5

TABLES = {
    "unireplknet_k13": ((13, 5, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    "unireplknet_k17": ((17, 5, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)),
    "small_5_3": ((5, 3), (1, 2)),
    "replknet_31_5": ((31, 5), (1, 1)),
}


@dataclasses.dataclass(frozen=True)
class Cfg:
    n: int
    c: int
    h: int
    w: int
    ks: Tuple[int, ...]
    ds: Tuple[int, ...]
    layout: str = "nhwc"
    dtype: torch.dtype = torch.float32
    momentum: float = 0.1

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "nhwc" else torch.contiguous_format

    @property
    def extent(self) -> int:
        return self.ds[0] * (self.ks[0] - 1) + 1

    def short(self) -> str:
        return (f"N={self.n} C={self.c} H={self.h} W={self.w} ks={self.ks} ds={self.ds} "
                f"layout={self.layout} dtype={str(self.dtype).replace('torch.', '')}")


def make_inputs(cfg: Cfg, requires_grad: bool = False):
    dt = cfg.dtype
    x = torch.randn(cfg.n, cfg.c, cfg.h, cfg.w).to(dt).contiguous(memory_format=cfg.memory_format)
    ws = [(torch.randn(cfg.c, 1, k, k) / k).to(dt) for k in cfg.ks]
    gs = [(torch.rand(cfg.c) + 0.5).to(dt) for _ in cfg.ks]
    bs = [torch.randn(cfg.c).to(dt) for _ in cfg.ks]
    rms = [torch.randn(cfg.c) * 0.1 for _ in cfg.ks]
    rvs = [torch.rand(cfg.c) + 0.5 for _ in cfg.ks]
    if requires_grad:
        for t in [x, *ws, *gs, *bs]:
            t.requires_grad_(True)
    return x, ws, gs, bs, rms, rvs


def _f64(t):
    return t.detach().to(torch.float64)


def _conv(x, w, d):
    k = w.shape[-1]
    return F.conv2d(x, w, None, 1, d * (k - 1) // 2, d, groups=x.shape[1])


def oracle(cfg: Cfg, x, ws, gs, bs, rms, rvs, training: bool, gy=None):
    """float64 references and magnitudes: dict name -> (ref, mag, L). Keys: y, running_mean_b,
    running_var_b and, with gy, x, weight_b, gamma_b, beta_b."""
    with single_threaded_torch():
        x64 = _f64(x)
        ws64, gs64, bs64 = [_f64(w) for w in ws], [_f64(g) for g in gs], [_f64(b) for b in bs]
        leaves = [t.clone().requires_grad_(True) for t in [x64, *ws64, *gs64, *bs64]]
        nb = len(ws)
        lx, lw, lg, lb = leaves[0], leaves[1:1 + nb], leaves[1 + nb:1 + 2 * nb], leaves[1 + 2 * nb:]
        rm64 = [_f64(r).clone() for r in rms]
        rv64 = [_f64(r).clone() for r in rvs]
        y = 0
        for w, d, g, b, rm, rv in zip(lw, cfg.ds, lg, lb, rm64, rv64):
            y = y + F.batch_norm(_conv(lx, w, d), rm, rv, g, b, training, cfg.momentum, EPS)
        M = cfg.n * cfg.h * cfg.w
        E2 = cfg.extent ** 2
        K = max(k * k for k in cfg.ks)
        xa = x64.abs()
        mag_y = 0
        info = []
        for b_, (w, d, g, b, rm_in, rv_in) in enumerate(zip(ws64, cfg.ds, gs64, bs64, rms, rvs)):
            z = _conv(x64, w, d)
            za = _conv(xa, w.abs(), d)
            if training:
                mu = z.mean((0, 2, 3), keepdim=True)
                sigma = torch.sqrt(z.var((0, 2, 3), unbiased=False, keepdim=True) + EPS)
            else:
                mu = _f64(rm_in).view(1, -1, 1, 1)
                sigma = torch.sqrt(_f64(rv_in).view(1, -1, 1, 1) + EPS)
            xh = (z - mu) / sigma
            s = g.view(1, -1, 1, 1).abs() / sigma
            mza = za.mean((0, 2, 3), keepdim=True)
            term = za + mu.abs() + mza
            if training:
                term = term + xh.abs() * (xh.abs() * za).mean((0, 2, 3), keepdim=True)
            mag_y = mag_y + s * term + b.abs().view(1, -1, 1, 1)
            info.append((w, d, z, za, mu, sigma, xh, s))
        out = {"y": (y.detach(), mag_y, 2 * E2 + 1)}
        if training:
            m = cfg.momentum
            for b_, (w, d, z, za, mu, sigma, xh, s) in enumerate(info):
                mza = za.mean((0, 2, 3))
                # the update's own roundings (old value and batch value) + the statistics' error
                out[f"running_mean{b_}"] = (
                    rm64[b_], (1 - m) * _f64(rms[b_]).abs() + m * (mu.flatten().abs() + mza), 2 * K)
                var_u = (sigma.flatten() ** 2 - EPS) * M / (M - 1)
                out[f"running_var{b_}"] = (
                    rv64[b_], (1 - m) * _f64(rvs[b_]).abs()
                    + m * (var_u + M / (M - 1) * 2 * (xh.abs() * za).mean((0, 2, 3)) * sigma.flatten()),
                    2 * K)
        if gy is None:
            return out
        gy64 = _f64(gy)
        grads = torch.autograd.grad(y, leaves, gy64)
        ga = gy64.abs()
        mag_beta = ga.sum((0, 2, 3))
        mag_x = 0
        for b_, (w, d, z, za, mu, sigma, xh, s) in enumerate(info):
            k = w.shape[-1]
            p = d * (k - 1) // 2
            if training:
                mag_gamma = (ga * (xh.abs() + (za + mu.abs()) / sigma)).sum((0, 2, 3), keepdim=True)
                mag_dz = s * (ga + ga.mean((0, 2, 3), keepdim=True)
                              + (xh.abs() + (za + mu.abs()) / sigma) * mag_gamma / M)
            else:  # eval: merged-kernel convolution of g (K rounded once)
                mag_gamma = (ga * (xh.abs() + (za + mu.abs()) / sigma)).sum((0, 2, 3), keepdim=True)
                mag_dz = s * ga
            mag_x = mag_x + F.conv_transpose2d(mag_dz, w.abs(), None, 1, p, 0, cfg.c, d)
            mag_w = torch.nn.grad.conv2d_weight(xa, w.shape, mag_dz, 1, p, d, cfg.c)
            out[f"weight{b_}"] = (grads[1 + b_], mag_w, 2 * M + E2)
            out[f"gamma{b_}"] = (grads[1 + nb + b_], mag_gamma.flatten(), M + E2)
            out[f"beta{b_}"] = (grads[1 + 2 * nb + b_], mag_beta, M)
        out["x"] = (grads[0], mag_x, M + 2 * E2 + 4)
        return out


def check(results: dict, refs: dict, cfg: Cfg, prefix: str = "") -> None:
    for key, got in results.items():
        ref, mag, length = refs[key]
        dtype = got.dtype if key.startswith("running") else cfg.dtype
        assert_within(prefix + key, got, ref, mag, dtype, length, cfg.short())


def run(cfg: Cfg, training: bool, backward: bool = True, fn=None):
    """Runs the op (or fn) with autograd; returns (results dict, inputs, gy)."""
    x, ws, gs, bs, rms, rvs = make_inputs(cfg, requires_grad=backward)
    rms_in, rvs_in = [r.clone() for r in rms], [r.clone() for r in rvs]
    y = (fn or op)(x, ws, list(cfg.ds), gs, bs, rms, rvs, training, cfg.momentum, EPS)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=cfg.memory_format), f"memory format lost; {cfg.short()}"
    res = {"y": y.detach()}
    if training:
        for i in range(len(cfg.ks)):
            res[f"running_mean{i}"] = rms[i]
            res[f"running_var{i}"] = rvs[i]
    else:
        for i in range(len(cfg.ks)):
            assert torch.equal(rms[i], rms_in[i]) and torch.equal(rvs[i], rvs_in[i]), "eval changed stats"
    gy = None
    if backward:
        gy = torch.randn(x.shape).to(cfg.dtype).contiguous(memory_format=cfg.memory_format)
        grads = torch.autograd.grad(y, [x, *ws, *gs, *bs], gy)
        nb = len(cfg.ks)
        assert grads[0].is_contiguous(memory_format=cfg.memory_format)
        res["x"] = grads[0]
        for i in range(nb):
            res[f"weight{i}"] = grads[1 + i]
            res[f"gamma{i}"] = grads[1 + nb + i]
            res[f"beta{i}"] = grads[1 + 2 * nb + i]
    return res, (x, ws, gs, bs, rms_in, rvs_in), gy


def run_and_check(cfg: Cfg, training: bool, backward: bool = True):
    res, inputs, gy = run(cfg, training, backward)
    check(res, oracle(cfg, *inputs, training, gy), cfg, prefix="train " if training else "eval ")


# --------------------------------------------------------------------------- the branch tables


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("table", list(TABLES))
def test_branch_tables(table, training, layout):
    ks, ds = TABLES[table]
    h, w = (9, 8) if ks[0] >= 31 else (11, 10)
    run_and_check(Cfg(n=2, c=19, h=h, w=w, ks=ks, ds=ds, layout=layout), training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64_tables(training):
    ks, ds = TABLES["unireplknet_k13"]
    run_and_check(Cfg(n=2, c=5, h=9, w=7, ks=ks, ds=ds, dtype=torch.float64), training)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_bfloat16_training(layout):
    ks, ds = TABLES["small_5_3"]
    run_and_check(Cfg(n=2, c=17, h=8, w=9, ks=ks, ds=ds, layout=layout, dtype=torch.bfloat16), True)


def test_larger_shape_many_tiles():
    """Several statistics tiles per image and several weight-gradient row chunks."""
    ks, ds = TABLES["unireplknet_k13"]
    run_and_check(Cfg(n=2, c=40, h=30, w=28, ks=ks, ds=ds), True)


# --------------------------------------------------------------------------- sweep


@st.composite
def configs(draw):
    k0 = draw(st.sampled_from([1, 3, 5, 7, 9, 11]))
    d0 = draw(st.integers(1, 3))
    ext0 = d0 * (k0 - 1) + 1
    ks, ds = [k0], [d0]
    for _ in range(draw(st.integers(0, 4))):
        k = draw(st.sampled_from([1, 3, 5, 7]))
        dmax = (ext0 - 1) // (k - 1) if k > 1 else 3
        if dmax < 1:
            continue
        ks.append(k)
        ds.append(draw(st.integers(1, min(dmax, 5))))
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    if n * h * w < 2:
        w = 2
    return Cfg(n=n, c=draw(st.integers(1, 40)), h=h, w=w, ks=tuple(ks), ds=tuple(ds),
               layout=draw(st.sampled_from(["nhwc", "nchw"])),
               dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16])),
               momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.37])))


@sweep(30)
@given(cfg=configs(), training=st.booleans())
def test_sweep(cfg, training):
    torch.manual_seed(zlib.crc32(repr((cfg, training)).encode()))  # inputs a function of the example
    run_and_check(cfg, training)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_gradcheck_float64(layout):
    cfg = Cfg(n=2, c=3, h=5, w=4, ks=(5, 3, 1), ds=(1, 2, 1), layout=layout, dtype=torch.float64)
    x, ws, gs, bs, rms, rvs = make_inputs(cfg, requires_grad=True)
    nb = len(ws)

    def f(x, *params):
        return op(x, list(params[:nb]), list(cfg.ds), list(params[nb:2 * nb]), list(params[2 * nb:]),
                  rms, rvs, True, 0.1, EPS)

    assert torch.autograd.gradcheck(f, (x, *ws, *gs, *bs), eps=1e-6, atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------- determinism


def test_deterministic_and_thread_count_independent():
    ks, ds = TABLES["unireplknet_k13"]
    cfg = Cfg(n=2, c=40, h=26, w=24, ks=ks, ds=ds)
    outs = []
    try:
        for threads in (1, 2, 2):
            fastvis.set_num_threads(threads)
            torch.manual_seed(1)
            res, _, _ = run(cfg, True)
            outs.append(res)
    finally:
        fastvis.set_num_threads(0)
    for other in outs[1:]:
        for key, t in outs[0].items():
            assert torch.equal(t, other[key]), f"{key} differs between runs / thread counts"


# --------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph():
    ks, ds = TABLES["small_5_3"]
    cfg = Cfg(n=2, c=6, h=7, w=6, ks=ks, ds=ds)
    torch._dynamo.reset()
    compiled = torch.compile(op, fullgraph=True)
    for training in (True, False):
        torch.manual_seed(3)
        eager, _, _ = run(cfg, training)
        torch.manual_seed(3)
        comp, _, _ = run(cfg, training, fn=compiled)
        if training:
            for key, t in eager.items():
                if key.startswith("running_"):
                    # The running-statistics update around the op is compiled arithmetic
                    # (inductor may contract (1 - m) * r + m * mean into an FMA): last bits.
                    torch.testing.assert_close(comp[key], t, rtol=1e-6, atol=1e-7,
                                               msg=lambda m: f"{key}: {m}")
                else:  # the fused op is opaque to the compiler: bit-identical
                    torch.testing.assert_close(comp[key], t, rtol=0, atol=0,
                                               msg=lambda m: f"{key}: {m}")
        else:  # the merge is compiled (inductor may fuse and reorder it): the oracle's bounds
            torch.manual_seed(3)
            res, inputs, gy = run(cfg, training, fn=compiled)
            check(res, oracle(cfg, *inputs, training, gy), cfg, prefix="compiled eval ")


def test_custom_op_opcheck():
    ks, ds = TABLES["small_5_3"]
    cfg = Cfg(n=2, c=4, h=5, w=6, ks=ks, ds=ds)
    x, ws, gs, bs, _, _ = make_inputs(cfg, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvis.dilated_reparam_train.default,
                          (x, ws, list(ds), gs, bs, EPS))


# --------------------------------------------------------------------------- other paths


def test_python_reference_matches_composition():
    cfg = Cfg(n=2, c=5, h=6, w=7, ks=(5, 3), ds=(1, 2))
    with fastvis.use_reference():
        run_and_check(cfg, True)


def test_generic_isa_path(tmp_path):
    """The portable build of the kernels (FASTVIS_CPU_ISA=generic) in a subprocess."""
    out = tmp_path / "res.pt"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch, fastvis
        from test_dilated_reparam import Cfg, run, TABLES
        assert fastvis.build_info()["cpu_isa_selected"] == "generic"
        res = []
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            for layout in ("nhwc", "nchw"):
                cfg = Cfg(n=2, c=19, h=9, w=8, ks=TABLES["unireplknet_k13"][0],
                          ds=TABLES["unireplknet_k13"][1], layout=layout, dtype=dt)
                torch.manual_seed(5)
                r, inputs, gy = run(cfg, True)
                res.append((cfg, r, inputs, gy))
        torch.save(res, {str(out)!r})
    """)
    env = dict(os.environ, FASTVIS_CPU_ISA="generic")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = torch.load(out, weights_only=False)
    assert len(results) == 6
    for cfg, r, inputs, gy in results:
        check(r, oracle(cfg, *inputs, True, gy), cfg, prefix="generic ")


# --------------------------------------------------------------------------- bad input


def _good():
    cfg = Cfg(n=2, c=4, h=5, w=5, ks=(5, 3), ds=(1, 2))
    x, ws, gs, bs, rms, rvs = make_inputs(cfg)
    return dict(x=x, weights=ws, dilations=[1, 2], bn_weights=gs, bn_biases=bs, running_means=rms,
                running_vars=rvs, training=True)


def _call(**kw):
    return op(**kw)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.update(x=a["x"][:, :3]), ValueError, "C = 3"),
    (lambda a: a.update(weights=[a["weights"][0], torch.randn(4, 1, 4, 4)]), ValueError, "odd"),
    (lambda a: a.update(weights=[a["weights"][0], torch.randn(4, 1, 3, 5)]), ValueError, "square"),
    (lambda a: a.update(dilations=[1, 3]), ValueError, "larger than the first"),
    (lambda a: a.update(dilations=[1, 0]), ValueError, "dilations"),
    (lambda a: a.update(weights=[a["weights"][0], a["weights"][1].double()]), TypeError, "dtype"),
    (lambda a: a.update(bn_weights=[a["bn_weights"][0], a["bn_weights"][1].double()]), TypeError, "dtype"),
    (lambda a: a.update(bn_biases=[a["bn_biases"][0], torch.randn(5)]), ValueError, "shape"),
    (lambda a: a.update(x=a["x"].to(torch.float16)), TypeError, "float16"),
    (lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "int32"),
    (lambda a: a.update(weights=[a["weights"][0], a["weights"][1].to("meta")]), ValueError, "device"),
    (lambda a: a.update(running_means=None), ValueError, "running"),
    (lambda a: a.update(running_vars=[a["running_vars"][0]]), ValueError, "entries"),
    (lambda a: a.update(x=a["x"][:0]), ValueError, "empty batch"),
    (lambda a: a.update(x=a["x"][:1, :, :1, :1]), ValueError, "more than 1 value per channel"),
    (lambda a: a.update(momentum=None), ValueError, "momentum=None"),
    (lambda a: a.update(eps=0.0), ValueError, "eps"),
    (lambda a: a.update(weights=[torch.randn(4, 1, 67, 67), torch.randn(4, 1, 3, 3)]), ValueError, "exceeds 63"),
    (lambda a: a.update(x=a["x"][0]), ValueError, "4-D"),
])
def test_bad_input(mutate, exc, match):
    a = _good()
    mutate(a)
    with pytest.raises(exc, match=match):
        _call(**a)


def test_bad_input_same_errors_on_reference_path():
    a = _good()
    a["dilations"] = [1, 3]
    with fastvis.use_reference(), pytest.raises(ValueError, match="larger than the first"):
        _call(**a)


def test_core_rejects_bad_input_directly():
    """The C++ checks (reached without the Python validation)."""
    a = _good()
    x, ws, gs, bs = a["x"], a["weights"], a["bn_weights"], a["bn_biases"]
    y = torch.empty_like(x)
    st_ = torch.empty(2, 4)
    with pytest.raises(ValueError, match="exceeds the first branch"):
        _C.dilated_reparam_forward(x, ws, [1, 3], gs, bs, EPS, y, st_, st_.clone())
    with pytest.raises(ValueError, match="odd size"):
        _C.dilated_reparam_forward(x, [ws[0], torch.randn(4, 1, 2, 2)], [1, 1], gs, bs, EPS, y, st_, st_.clone())
    with pytest.raises(ValueError, match="N\\*H\\*W > 1"):
        x1 = x[:1, :, :1, :1].contiguous()
        _C.dilated_reparam_forward(x1, ws, [1, 2], gs, bs, EPS, torch.empty_like(x1), st_, st_.clone())
    with pytest.raises(TypeError, match="float32 or float64"):
        xb = x.bfloat16()
        _C.dilated_reparam_backward_scratch_bytes(xb, [w.bfloat16() for w in ws], [1, 2],
                                                  [g.bfloat16() for g in gs], [b.bfloat16() for b in bs])
    with pytest.raises(ValueError, match="mean: expected shape"):
        _C.dilated_reparam_forward(x, ws, [1, 2], gs, bs, EPS, y, torch.empty(3, 4), st_)


@pytest.mark.parametrize("which", ["x", "weights", "bn", "weights+bn"])
def test_partial_gradients_equal_full(which):
    """Asking for a subset of the gradients (others not requiring grad) gives exactly the
    values of the full backward (the core skips the unneeded passes)."""
    cfg = Cfg(n=2, c=7, h=8, w=9, ks=(7, 3, 3), ds=(1, 2, 3), layout="nchw")
    torch.manual_seed(11)
    full, (x, ws, gs, bs, rms, rvs), gy = run(cfg, True)
    nb = len(ws)
    args = [t.detach().clone() for t in [x, *ws, *gs, *bs]]
    idx = {"x": [0], "weights": list(range(1, 1 + nb)), "bn": list(range(1 + nb, 1 + 3 * nb)),
           "weights+bn": list(range(1, 1 + 3 * nb))}[which]
    for i in idx:
        args[i].requires_grad_(True)
    y = op(args[0], args[1:1 + nb], list(cfg.ds), args[1 + nb:1 + 2 * nb], args[1 + 2 * nb:], rms, rvs, True)
    grads = torch.autograd.grad(y, [args[i] for i in idx], gy)
    names = ["x"] + [f"weight{i}" for i in range(nb)] + [f"gamma{i}" for i in range(nb)] + \
        [f"beta{i}" for i in range(nb)]
    for i, g in zip(idx, grads):
        assert torch.equal(g, full[names[i]]), names[i]


def test_autocast_bfloat16_is_the_bfloat16_op():
    """Under CPU autocast (bfloat16) the op runs on bfloat16 casts of x and every parameter:
    bit-identical to calling it on those casts, with gradients reaching the float32 leaves."""
    cfg = Cfg(n=2, c=6, h=7, w=6, ks=(5, 3), ds=(1, 2))
    x, ws, gs, bs, rms, rvs = make_inputs(cfg, requires_grad=True)
    rms2, rvs2 = [r.clone() for r in rms], [r.clone() for r in rvs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x, ws, list(cfg.ds), gs, bs, rms, rvs, True)
    assert y.dtype == torch.bfloat16
    leaves = [x, *ws, *gs, *bs]
    casts = [t.detach().bfloat16().requires_grad_(True) for t in leaves]
    nb = len(ws)
    y2 = op(casts[0], casts[1:1 + nb], list(cfg.ds), casts[1 + nb:1 + 2 * nb], casts[1 + 2 * nb:], rms2, rvs2, True)
    assert torch.equal(y, y2)
    for a, b in zip(rms + rvs, rms2 + rvs2):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # eval: the same merge as for bf16 inputs
        ye = op(x, ws, list(cfg.ds), gs, bs, rms, rvs, False)
    ye2 = op(casts[0], casts[1:1 + nb], list(cfg.ds), casts[1 + nb:1 + 2 * nb], casts[1 + 2 * nb:], rms2, rvs2,
             False)
    assert ye.dtype == torch.bfloat16 and torch.equal(ye, ye2)
    gy = torch.randn(y.shape).bfloat16()
    g1 = torch.autograd.grad(y, leaves, gy)
    g2 = torch.autograd.grad(y2, casts, gy)
    for a, b in zip(g1, g2):
        assert a.dtype == torch.float32
        assert torch.equal(a, b.float())


# --------------------------------------------------------------------------- benchmark smoke


def test_bench_dwconv_dilated_reparam_runs():
    """`fastvis bench dwconv --dilated-reparam` runs (tiny: one shape, one repeat, no compile)
    and checks fastvis against eager PyTorch; timings are not looked at."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastvis.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-m", "fastvis", "bench", "dwconv", "--dilated-reparam", "--quick",
                        "--no-compile", "--repeat", "1", "--warmup", "0", "--format", "text"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for text in ("train fwd", "train fwd+bwd", "eval fwd", "fastvis (CL)", "eager NCHW", "max rel err",
                 "640", "7x7"):
        assert text in r.stdout, r.stdout
    assert " !" not in r.stdout
