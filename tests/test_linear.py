"""The linear op (fastvis/linear.h, fastvis.ops.linear, fastvis.nn.Linear): the core's
_C.linear_forward against a float64 product of the same values (per element, the dot
product bound gamma_{k+1} (|x| |W|^T + |b|), u = 2^-24 for float32 and 2^-53 for float64),
the Python op against F.linear and its routing, and bad input."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvis
from conftest import each_gemm_engine
from fastvis import _C
from fastvis.ops.linear import FEW_ROWS, linear

linear_mod = importlib.import_module("fastvis.ops.linear")  # fastvis.ops.linear is the function

OWN = _C.own_gemm_available()


def _strided(rows, cols, pad, gen, dtype):
    return torch.randn(rows, cols + pad, generator=gen, dtype=dtype)[:, :cols]


def _check_core(m, n, k, pads, with_bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = _strided(m, k, pads[0], g, dtype)
    w = _strided(n, k, pads[1], g, dtype)
    b = torch.randn(2 * n, generator=g, dtype=dtype)[::2] if with_bias else None  # strided bias
    y = torch.full((m, n + pads[2]), float("nan"), dtype=dtype)[:, :n]  # y is never read
    _C.linear_forward(x, w, b, y)
    ref = x.double() @ w.double().t() + (b.double() if with_bias else 0.0)
    mag = x.double().abs() @ w.double().abs().t() + (b.double().abs() if with_bias else 0.0)
    u = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -53
    kk = k + 1
    bound = kk * u / (1 - kk * u) * mag + 1e-300
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all(), "an output was not written"
    assert (err <= bound).all(), f"m={m} n={n} k={k}: max err / bound {float((err / bound).max()):.3g}"


@settings(max_examples=120, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 300), k=st.integers(0, 700),
       pads=st.tuples(st.integers(0, 3), st.integers(0, 17), st.integers(0, 5)),
       with_bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2 ** 16))
def test_core_sweep(m, n, k, pads, with_bias, dtype, seed):
    """Both sides of the few-rows limit (m <= 8: 64-column blocks, the own dot-product
    kernel for float32; more rows: the split GEMM), k = 0 (y = bias), row strides."""
    each_gemm_engine(lambda: _check_core(m, n, k, pads, with_bias, dtype, seed))


@pytest.mark.parametrize("m,n,k", [(1, 2304, 768), (1, 1000, 2304), (8, 1000, 768), (3, 65, 17), (9, 130, 33)])
def test_core_head_shapes(gemm_engine, m, n, k):
    _check_core(m, n, k, (0, 0, 0), True, torch.float32, m + n + k)
    _check_core(m, n, k, (1, 5, 2), False, torch.float32, m * n + k)


def test_core_independent_of_threads():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 768, generator=g), torch.randn(1000, 768, generator=g), torch.randn(1000, generator=g)
    outs = []
    for t in (1, 2):
        fastvis.set_num_threads(t)
        try:
            y = torch.empty(2, 1000)
            _C.linear_forward(x, w, b, y)
            outs.append(y)
        finally:
            fastvis.set_num_threads(0)
    assert torch.equal(outs[0], outs[1])


def test_core_bad_input():
    x, w, b, y = torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        _C.linear_forward(x.bfloat16(), w.bfloat16(), None, y.bfloat16())
    with pytest.raises(TypeError, match="weight has dtype float64"):
        _C.linear_forward(x, w.double(), None, y)
    with pytest.raises(TypeError, match="bias has dtype"):
        _C.linear_forward(x, w, b.double(), y)
    with pytest.raises(ValueError, match="weight must be"):
        _C.linear_forward(x, torch.zeros(3, 5), None, y)
    with pytest.raises(ValueError, match="y must be"):
        _C.linear_forward(x, w, None, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="bias must be 1-D"):
        _C.linear_forward(x, w, torch.zeros(4), y)
    with pytest.raises(ValueError, match="x must be 2-D"):
        _C.linear_forward(torch.zeros(1, 2, 4), w, None, y)
    with pytest.raises(ValueError, match="unit stride"):
        _C.linear_forward(torch.zeros(4, 2).t(), w, None, y)
    with pytest.raises(ValueError, match="rows overlap"):
        _C.linear_forward(x, torch.zeros(1, 4).expand(3, 4), None, y)
    # empty sizes: nothing to do, no error
    _C.linear_forward(torch.zeros(0, 4), w, b, torch.zeros(0, 3))
    _C.linear_forward(torch.zeros(2, 4), torch.zeros(0, 4), None, torch.zeros(2, 0))


# ------------------------------------------------------------------ fastvis.ops.linear


def _calls_core(monkeypatch):
    calls = []
    real = _C.linear_forward

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(linear_mod._C, "linear_forward", spy)
    return calls


@pytest.mark.parametrize("shape", [(1, 768), (8, 768), (2, 3, 768), (768,)])
def test_op_inference_matches_f_linear(monkeypatch, shape):
    calls = _calls_core(monkeypatch)
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(*shape, generator=g), torch.randn(500, 768, generator=g), torch.randn(500, generator=g)
    with torch.inference_mode():
        y = linear(x, w, b)
        y0 = linear(x, w)
    assert y.shape == F.linear(x, w, b).shape
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y0, F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert len(calls) == (2 if OWN else 0)


def test_op_routes_everything_else_to_f_linear(monkeypatch):
    calls = _calls_core(monkeypatch)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 32, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    x = torch.randn(FEW_ROWS + 1, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))  # too many rows
        linear(x[:2].double(), w.double(), b.double())  # float64
        with fastvis.use_reference(True):
            linear(x[:2], w, b)
    # training: PyTorch's op, gradients reach the parameters
    y = linear(x[:2], w, b)
    y.sum().backward()
    assert w.grad is not None and b.grad is not None
    assert calls == []


def test_op_bad_input_is_pytorchs():
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            linear(torch.zeros(1, 5), torch.zeros(3, 4))


def test_nn_linear_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 10)
    m = fastvis.nn.Linear(64, 10)
    assert isinstance(m, torch.nn.Linear)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert m.state_dict().keys() == ref.state_dict().keys()


def test_model_heads_use_it():
    for name in ("convnext_atto", "inception_next_atto"):
        model = fastvis.create_model(name)
        assert any(type(mod) is fastvis.nn.Linear for mod in model.modules()), name
