"""The eager fast paths (ops/_bridge.py: call_op / eager_kind).

In eager mode a fastvis op skips its torch.library custom op (the dispatch costs ~60-100
us a call): in inference it calls its implementation directly, in training an
autograd.Function made of the op's own implementation, setup_context and backward. These
tests check that both give the op's results and step aside whenever the dispatcher has
work to do: torch.compile, fake tensors, dispatch and function modes, the profiler,
tracing, tensor-list ops."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastvis
import fastvis.ops
from fastvis.ops import _bridge


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 9, 9, generator=g).to(memory_format=torch.channels_last)
    w = torch.randn(16, 1, 3, 3, generator=g)
    b = torch.randn(16, generator=g)
    return [t.requires_grad_(requires_grad) for t in (x, w, b)]


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _count_impl_calls(monkeypatch, op):
    calls = []
    impl = op.fastvis_impl

    def counting(*a):
        calls.append(1)
        return impl(*a)

    monkeypatch.setattr(op, "fastvis_impl", counting)
    return calls


def test_no_grad_inference_skips_the_dispatcher(monkeypatch):
    mod = importlib.import_module("fastvis.ops.depthwise_conv")
    monkeypatch.setattr(mod, "_CHECKED", {})  # a first call: through call_op
    calls = _count_impl_calls(monkeypatch, mod._dwconv_fwd)
    x, w, b = _inputs()
    with torch.no_grad():
        y = fastvis.ops.depthwise_conv2d(x, w, b, padding=1)
    assert calls == [1]
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=16)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_depthwise_repeat_calls_take_the_checked_fast_path(monkeypatch):
    """depthwise_conv2d remembers argument shapes that passed its checks; a later no-grad
    CPU call with the same ones runs the core directly (neither the checks nor call_op),
    with the same bits, and every case the fast path must not serve still goes the long
    way (autograd, reference mode, autocast, non-dense or unhashable arguments)."""
    mod = importlib.import_module("fastvis.ops.depthwise_conv")
    monkeypatch.setattr(mod, "_CHECKED", {})
    calls = _count_impl_calls(monkeypatch, mod._dwconv_fwd)
    x, w, b = _inputs()
    xn = x.contiguous()
    wp = torch.nn.Parameter(w.clone())  # requires grad; plain under no_grad
    with torch.no_grad():
        first = [mod.depthwise_conv2d(x, w, b, padding=1), mod.depthwise_conv2d(xn, wp, None, stride=2, padding=1)]
        assert calls == [1, 1]
        again = [mod.depthwise_conv2d(x, w, b, padding=1), mod.depthwise_conv2d(xn, wp, None, stride=2, padding=1)]
        assert calls == [1, 1]  # the fast path: no implementation call
        for a, g in zip(first, again):
            assert torch.equal(a, g) and a.stride() == g.stride()
        assert again[0].is_contiguous(memory_format=torch.channels_last) and again[1].is_contiguous()
        assert tuple(again[1].shape) == (2, 16, 5, 5)
        # Lists are unhashable: the general path each time.
        mod.depthwise_conv2d(x, w, b, padding=[1, 1])
        mod.depthwise_conv2d(x, w, b, padding=[1, 1])
        assert calls == [1, 1, 1, 1]
        # A layout the core does not take in place (copied first by the general path).
        xs = x.permute(0, 1, 3, 2)
        torch.testing.assert_close(mod.depthwise_conv2d(xs, w, b, padding=1),
                                   F.conv2d(xs, w, b, padding=1, groups=16), rtol=1e-5, atol=1e-5)
        assert len(calls) == 5
        with fastvis.use_reference():
            mod.depthwise_conv2d(x, w, b, padding=1)
        assert len(calls) == 5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert mod.depthwise_conv2d(x, w, b, padding=1).dtype == torch.bfloat16
        assert len(calls) == 6
    y = mod.depthwise_conv2d(x.requires_grad_(), w, b, padding=1)  # autograd records
    assert len(calls) == 7 and y.grad_fn is not None
    # A bad argument is still refused after the same shapes passed.
    with torch.no_grad(), pytest.raises(TypeError):
        mod.depthwise_conv2d(x.detach().double(), w, b, padding=1)


def test_autograd_uses_the_eager_function(monkeypatch):
    """Grad mode on, inputs requiring grad: the op's eager autograd.Function runs the same
    implementation, and its backward calls the backward op's implementation directly."""
    mod = importlib.import_module("fastvis.ops.depthwise_conv")
    calls = _count_impl_calls(monkeypatch, mod._dwconv_fwd)
    bwd_calls = _count_impl_calls(monkeypatch, mod._dwconv_bwd)
    x, w, b = _inputs(requires_grad=True)
    y = fastvis.ops.depthwise_conv2d(x, w, b, padding=1)
    assert calls == [1] and type(y.grad_fn).__name__ == "Eager_fastvis_depthwise_conv2dBackward"
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), gy)
    assert bwd_calls == [1]
    # The same through the dispatcher (a dispatch mode forces it) and against PyTorch.
    with _Recorder() as rec:
        y2 = fastvis.ops.depthwise_conv2d(x, w, b, padding=1)
        want = torch.autograd.grad(y2, (x, w, b), gy)
    assert calls == [1] and any("fastvis.depthwise_conv2d" in o for o in rec.ops)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=0, atol=0)
    ref = torch.autograd.grad(F.conv2d(x, w, b, padding=1, groups=16), (x, w, b), gy)
    for g_, r_ in zip(got, ref):
        torch.testing.assert_close(g_, r_, rtol=1e-4, atol=1e-4)
    # Only x requires grad: the Function's needs_input_grad leaves the weight gradient out.
    w.requires_grad_(False), b.requires_grad_(False)
    (gx,) = torch.autograd.grad(fastvis.ops.depthwise_conv2d(x, w, b, padding=1), (x,), gy)
    torch.testing.assert_close(gx, got[0], rtol=0, atol=0)


def test_eager_function_is_once_differentiable():
    x, w, b = _inputs(requires_grad=True)
    y = fastvis.ops.depthwise_conv2d(x, w, b, padding=1)
    (gx,) = torch.autograd.grad(y.square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|marked with @once_differentiable"):
        gx.sum().backward()


def test_saved_tensor_hooks_see_the_eager_function():
    """Activation-memory accounting (fastvis bench) hooks save_for_backward: the eager
    Function saves through autograd like the op does."""
    x, w, b = _inputs(requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastvis.ops.depthwise_conv2d(x, w, b, padding=1).sum().backward()
    assert any(t.shape == x.shape for t in saved)


def test_tensor_list_ops_keep_the_dispatcher_in_training(monkeypatch):
    """A Function sees no tensor inside a list argument: ops taking Tensor[] (the dilated
    re-param op) have no eager Function and dispatch when autograd records."""
    mod = importlib.import_module("fastvis.ops.dilated_reparam")
    assert not hasattr(mod._train_fwd, "fastvis_function")
    assert hasattr(importlib.import_module("fastvis.ops.convnext_block")._cb_fwd, "fastvis_function")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_tracing_goes_through_the_op():
    x, w, b = _inputs()
    f = lambda x: fastvis.ops.depthwise_conv2d(x, w, b, padding=1)  # noqa: E731
    with torch.no_grad():
        traced = torch.jit.trace(f, (x,), check_trace=False)
    assert "fastvis::depthwise_conv2d" in str(traced.graph)
    x2 = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x2), f(x2))


def test_dispatch_mode_sees_the_op_under_no_grad():
    x, w, b = _inputs()
    rec = _Recorder()
    with torch.no_grad(), rec:
        fastvis.ops.depthwise_conv2d(x, w, b, padding=1)
    assert any("fastvis.depthwise_conv2d" in o for o in rec.ops), rec.ops


def test_function_mode_disables_the_fast_path(monkeypatch):
    mod = importlib.import_module("fastvis.ops.depthwise_conv")
    calls = _count_impl_calls(monkeypatch, mod._dwconv_fwd)

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, w, b = _inputs()
    with torch.no_grad(), Passthrough():
        assert not _bridge.eager_direct_ok(x)
        fastvis.ops.depthwise_conv2d(x, w, b, padding=1)
    assert calls == []


def test_fake_tensors_use_the_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 16, 9, 9).to(memory_format=torch.channels_last)
        w = torch.empty(16, 1, 3, 3)
        with torch.no_grad():
            y = fastvis.ops.depthwise_conv2d(x, w, None, stride=2, padding=1)
    assert tuple(y.shape) == (2, 16, 5, 5)


def test_profiler_records_the_op():
    x, w, b = _inputs()
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fastvis.ops.depthwise_conv2d(x, w, b, padding=1)
    names = [e.name for e in prof.events()]
    assert any("fastvis::depthwise_conv2d" in n for n in names), sorted(set(names))[:20]


def test_compile_fullgraph_under_no_grad():
    x, w, b = _inputs()
    f = torch.compile(lambda x: fastvis.ops.depthwise_conv2d(x, w, b, padding=1), fullgraph=True,
                      backend="eager")
    with torch.no_grad():
        y = f(x)
        torch.testing.assert_close(y, fastvis.ops.depthwise_conv2d(x, w, b, padding=1))


def test_subclass_inputs_are_not_unwrapped():
    class Sub(torch.Tensor):
        pass

    x, w, b = _inputs()
    assert _bridge.eager_direct_ok(x, w, None)
    assert not _bridge.eager_direct_ok(x.as_subclass(Sub), w)
    with torch.no_grad():
        assert _bridge.eager_direct_ok(x.requires_grad_(), w)
    assert not _bridge.eager_direct_ok(x, w)  # grad mode on and x requires grad
    assert _bridge.eager_kind(x, w) == _bridge._AUTOGRAD
    assert _bridge.eager_kind(x.as_subclass(Sub), w) == _bridge._DISPATCH


def test_module_parameters_take_the_fast_path(monkeypatch):
    """A module passes its nn.Parameters to the ops: in no-grad inference they are plain
    tensors to the dispatcher, so a whole model's blocks skip it (they did not: every
    ConvNeXt block of a model paid the custom-op dispatch)."""
    with torch.no_grad():
        assert _bridge.eager_direct_ok(torch.nn.Parameter(torch.ones(2)))
    mod = importlib.import_module("fastvis.ops.convnext_block")
    calls = _count_impl_calls(monkeypatch, mod._cb_fwd)
    blk = fastvis.nn.ConvNeXtBlock(16, kernel_size=7, ls_init_value=0.5).eval()
    x = torch.randn(1, 16, 6, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = blk(x)
        with fastvis.use_reference():
            ref = blk(x)
    assert calls == [1]
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    y = blk(x)  # grad mode on, parameters requiring grad: the op's eager autograd Function
    assert calls == [1, 1] and type(y.grad_fn).__name__.startswith("Eager_fastvis_convnext_block")


@pytest.mark.parametrize("op", ["convnext_block", "layer_norm", "grn", "inception", "metanext",
                                "dwconv_mlp"])
def test_every_forward_op_uses_the_fast_path_in_inference(monkeypatch, op):
    """Each public wrapper routes through call_op: in no-grad eager mode its implementation
    runs directly, and the result equals the PyTorch reference."""
    mod = lambda name: importlib.import_module("fastvis.ops." + name)  # noqa: E731 (the package
    cb, grn, inc, ln, mn = (mod(n) for n in  # re-exports functions under the module names)
                            ("convnext_block", "grn", "inception_dwconv", "layer_norm", "metanext_block"))
    g = torch.Generator().manual_seed(1)
    c, hid = 16, 32
    x = torch.randn(2, c, 8, 8, generator=g).to(memory_format=torch.channels_last)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    if op == "convnext_block":
        target = cb._cb_fwd
        args = (x, r(c, 1, 7, 7), r(c), 1 + r(c), r(c), r(hid, c), r(hid), r(c, hid), r(c))
        run = lambda: fastvis.ops.convnext_block(*args)  # noqa: E731
        ref = lambda: fastvis.ops.convnext_block_reference(*args)  # noqa: E731
    elif op == "layer_norm":
        target = ln._ln_fwd
        args = (x, 1 + r(c), r(c))
        run = lambda: fastvis.ops.layer_norm_channels(*args)  # noqa: E731
        ref = lambda: fastvis.ops.layer_norm_channels_reference(*args)  # noqa: E731
    elif op == "grn":
        target = grn._grn_fwd
        args = (x, r(c), r(c))
        run = lambda: fastvis.ops.global_response_norm(*args)  # noqa: E731
        ref = lambda: fastvis.ops.global_response_norm_reference(*args)  # noqa: E731
    elif op == "inception":
        target = inc._inc_fwd
        args = (x, r(2, 1, 3, 3), r(2), r(2, 1, 1, 5), r(2), r(2, 1, 5, 1), r(2))
        run = lambda: fastvis.ops.inception_depthwise_conv2d(*args)  # noqa: E731
        ref = lambda: fastvis.ops.inception_depthwise_conv2d_reference(*args)  # noqa: E731
    elif op == "metanext":
        target = mn._mn_fwd
        args = (x, r(2, 1, 3, 3), r(2), r(2, 1, 1, 5), r(2), r(2, 1, 5, 1), r(2),
                r(hid, c), r(hid), r(c, hid), r(c))
        run = lambda: fastvis.ops.metanext_block(*args)  # noqa: E731
        ref = lambda: fastvis.ops.metanext_block_reference(*args)  # noqa: E731
    else:
        target = cb._dmb_fwd
        args = (x, r(c, 1, 5, 5), r(c), r(hid, c), r(hid), r(c, hid), r(c))
        run = lambda: fastvis.ops.dwconv_mlp_block(*args, layer_norm=False)  # noqa: E731
        ref = lambda: fastvis.ops.dwconv_mlp_block_reference(*args, layer_norm=False)  # noqa: E731
    calls = _count_impl_calls(monkeypatch, target)
    with torch.no_grad():
        y = run()
        want = ref()
    assert calls == [1], op
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
