"""Shared plumbing between torch tensors and the core: scratch, streams, layouts."""
from __future__ import annotations

import threading

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

from .. import _C


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x (4-D) is dense in channels_last (NHWC) order: the core's native layout."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def dense_for_core(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is NHWC- or NCHW-dense (zero copy), else a contiguous copy."""
    if x.dim() != 4 or is_channels_last(x) or x.is_contiguous():
        return x
    return x.contiguous()


def like_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t in ref's memory format (channels_last if ref is channels_last-dense)."""
    fmt = torch.channels_last if is_channels_last(ref) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def empty_like_layout(shape, ref: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(ref) else torch.contiguous_format
    return torch.empty(shape, dtype=ref.dtype, device=ref.device, memory_format=fmt)


_tls = threading.local()
# Keep at most this much CPU scratch per Python thread. A ConvNeXt-T training step needs up
# to ~40 MB (the weight-gradient partial sums of its 768-channel blocks at N=8); a fresh
# buffer of that size cost its page faults on every call (on these VMs ~10 ms per 20 MB).
_CPU_SCRATCH_KEEP = 64 << 20


def scratch(nbytes: int, device: torch.device) -> torch.Tensor:
    """Scratch memory for one core call.

    CUDA: torch's caching allocator. CPU: torch has no caching allocator, and a fresh
    multi-megabyte buffer costs page faults on every call, so each Python thread keeps
    one grow-only buffer (up to 64 MiB) that successive calls reuse. Core calls are
    synchronous, so a thread never uses its buffer twice at once.
    """
    nbytes = max(int(nbytes), 0)
    if device.type != "cpu" or nbytes > _CPU_SCRATCH_KEEP:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf = getattr(_tls, "cpu_scratch", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
        _tls.cpu_scratch = buf
    return buf[:nbytes]


def workspace(key: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised dense tensor for a temporary that never leaves one op call (it is
    not returned, saved for the backward or aliased by anything returned), from a per-thread
    grow-only buffer per ``key`` on the CPU (each buffer up to 64 MiB, like ``scratch``),
    so that successive calls reuse pages instead of faulting fresh ones in: the MLP's
    hidden-sized temporaries were ~1 GB of fresh memory per UniRepLKNet-T training step at
    N=8. Distinct keys for temporaries alive at the same time. Other devices, or more
    than the cap: a fresh tensor."""
    numel = 1
    for d in shape:
        numel *= int(d)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes > _CPU_SCRATCH_KEEP:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_tls, "workspaces", None)
    if bufs is None:
        bufs = _tls.workspaces = {}
    buf = bufs.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = bufs[key] = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    return buf[:nbytes].view(dtype).view(shape)


_scratch_sizes: dict = {}


def memoised_size(key: tuple, compute) -> int:
    """``compute()`` (a core scratch-size query), remembered under ``key``: every op's
    memo, in one bounded dict. The key must name the op and hold everything the size
    depends on (shapes, strides, dtypes, arguments, the core's thread count). The core
    checks each buffer against its own query, so a wrong key is an error, not an overrun."""
    n = _scratch_sizes.get(key)
    if n is None:
        if len(_scratch_sizes) > 512:
            _scratch_sizes.clear()
        n = _scratch_sizes[key] = compute()
    return n


def scratch_bytes(kind: str, query, key_tensors, *args) -> int:
    """Memoised core scratch-size query; the size depends on shapes, strides, dtypes, the
    arguments and the core's thread count only."""
    key = (kind, _C.get_num_threads(), *(tuple(a) if isinstance(a, list) else a for a in args),
           *((tuple(t.shape), t.stride(), t.dtype, t.device.type) for t in key_tensors))
    return memoised_size(key, lambda: query(*key_tensors, *args))


def scratch_arg_sized(device: torch.device, nbytes, export: bool = True):
    """The scratch argument of a core call on ``device``: None on the CPU (the bindings then
    use a per-thread buffer of their own, up to 64 MiB, which spares a size query, a slice
    and a DLPack export per call: ~20 us of a 3x3 depthwise call's ~70 us of overhead),
    else a buffer of ``nbytes()`` bytes from :func:`scratch` (``nbytes`` is called only
    then). export=False: the buffer itself, for bindings that take tensors, not capsules."""
    if device.type == "cpu":
        return None
    buf = scratch(nbytes(), device)
    return dl(buf) if export else buf


def scratch_arg(x: torch.Tensor, kind: str, query, key_tensors, *args):
    """:func:`scratch_arg_sized` with the size from the memoised ``query`` (scratch_bytes)."""
    return scratch_arg_sized(x.device, lambda: scratch_bytes(kind, query, key_tensors, *args))


def stream_of(x: torch.Tensor) -> int:
    if x.device.type == "cuda":
        return torch.cuda.current_stream(x.device).cuda_stream
    return 0


def autocast_dtype(x) -> "torch.dtype | None":
    """The autocast dtype for x's device when autocast is on there (CPU or CUDA), else None."""
    if not isinstance(x, torch.Tensor):
        return None
    dev = x.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def autocast_cast(dtype, tensors):
    """tensors with every floating-point one cast to dtype (None entries kept); dtype None:
    unchanged. The casts are differentiable, so gradients reach the original tensors."""
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype)
            else t for t in tensors]


def _dispatch_intercepted() -> bool:
    """True when something may intercept a dispatcher call: a torch dispatch or function
    mode (FakeTensorMode, make_fx's proxy mode, FlopCounterMode, ...), a functorch
    transform (vmap, grad), the autograd profiler recording op events, or the TorchScript
    tracer. Unknown (a torch without these internal queries): assume intercepted."""
    try:
        return bool(torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                    or torch._C._are_functorch_transforms_active() or torch.autograd._profiler_enabled()
                    or torch._C._get_tracing_state() is not None)
    except AttributeError:  # pragma: no cover - depends on the torch release
        return True


# nn.Parameter is a plain tensor to the dispatcher (it disables __torch_function__), and
# a module's own parameters are what most op calls pass.
_PLAIN = (torch.Tensor, torch.nn.Parameter)

# What call_op may do instead of dispatching (eager_kind).
_DISPATCH, _DIRECT, _AUTOGRAD = 0, 1, 2


def eager_kind(*tensors) -> int:
    """How call_op may run an op on these tensors. _DISPATCH: through its torch.library
    custom op (torch.compile, tracing, a tensor subclass such as FakeTensor or DTensor, a
    dispatch or function mode, the profiler). Otherwise eager mode on plain tensors
    (nn.Parameter counts as plain): _DIRECT when there is no autograd graph to record
    (grad mode off or no input requiring grad), _AUTOGRAD when there is."""
    if torch.compiler.is_compiling():
        return _DISPATCH
    grad = torch.is_grad_enabled()
    needs_grad = False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN:
            return _DISPATCH
        needs_grad = needs_grad or (grad and t.requires_grad)
    if _dispatch_intercepted():
        return _DISPATCH
    return _AUTOGRAD if needs_grad else _DIRECT


def eager_direct_ok(*tensors) -> bool:
    """True when calling an op's Python implementation directly is indistinguishable from
    calling its torch.library custom op: eager mode, plain tensors, no autograd graph to
    record and nothing intercepting dispatch (see eager_kind). The custom-op dispatch
    itself costs ~60-100 us a call on these machines, as much as a small kernel."""
    return eager_kind(*tensors) == _DIRECT


def forward_op(name: str):
    """Decorator: fn as the torch.library custom op `name` (no mutated arguments), with fn
    kept as ``op.fastvis_impl`` for :func:`call_op`. Used for the backward ops too."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.fastvis_impl = fn
        return op
    return wrap


def _has_tensor_lists(op) -> bool:
    """True when op takes Tensor[] (or Tensor?[]) arguments, or when that cannot be told."""
    try:
        from torch._library.utils import is_tensorlist_like_type
        return any(is_tensorlist_like_type(a.type) for a in op._opoverload._schema.arguments)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the torch release
        return True


def register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, and the same pair as
    a plain ``torch.autograd.Function`` (``op.fastvis_function``) for call_op's eager
    training path. That Function is what torch.library builds under the dispatcher, minus
    the dispatch: its forward runs the op's implementation then setup_context, its
    backward is `backward` (once differentiable, like the op: the backward ops register no
    autograd of their own, so a second derivative raises an error either way). Ops with
    tensor-list arguments get no such Function and keep the dispatcher in training."""
    op.register_autograd(backward, setup_context=setup_context)
    if _has_tensor_lists(op):  # a Function sees no tensor inside a list: such ops dispatch
        return

    def forward(ctx, *args):
        out = op.fastvis_impl(*args)  # looked up per call, so a test's spy sees it
        setup_context(ctx, args, out)
        return out

    name = f"Eager_{getattr(op, '_namespace', 'fastvis')}_{op._name}"
    op.fastvis_function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(torch.autograd.function.once_differentiable(backward)),
    })


def _tensors(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _tensors(a)
        elif isinstance(a, torch.Tensor):
            yield a


def call_op(op, *args):
    """op(*args) through the dispatcher, or the same without it (~60-100 us less per call
    in inference, ~0.1 ms per forward and backward in training) when :func:`eager_kind`
    says the dispatcher has nothing else to do: the implementation directly, or, when
    autograd must record the call, the op's eager autograd Function (register_autograd)."""
    impl = getattr(op, "fastvis_impl", None)  # None: op was wrapped (e.g. a test's spy)
    if impl is not None:
        kind = eager_kind(*_tensors(args))
        if kind == _DIRECT:
            return impl(*args)
        fn = getattr(op, "fastvis_function", None)
        if kind == _AUTOGRAD and fn is not None:
            return fn.apply(*args)
    return op(*args)


def dl(t):
    """t as a DLPack capsule for the core (None stays None): the bindings accept capsules,
    which torch makes ~20x faster than the protocol's __dlpack__/__dlpack_device__ calls.
    t must not require grad (pass detached tensors)."""
    return None if t is None else _to_dlpack(t)


def prepared_direct(x, p) -> bool:
    """True when a prepared block ``p`` (an op's arguments checked once: ``c``, ``dtype``,
    ``device``) may run its kernel on x directly: a plain CPU tensor of the prepared dtype
    and channel count, no reference mode, no autocast, nothing for the dispatcher to do."""
    from .._reference import reference_enabled
    return (type(x) is torch.Tensor and x.dtype == p.dtype and x.device.type == "cpu"
            and x.device == p.device and x.dim() == 4 and x.shape[1] == p.c
            and not reference_enabled() and autocast_dtype(x) is None and eager_direct_ok(x))


def run_prepared_chain(x, blocks, direct, one, call_chain, entry):
    """Prepared blocks (objects with ``c``, ``dtype``, ``device``) applied one after the
    other. One core call ``call_chain(x, [entry(p) ...], ys)`` when ``direct(x, blocks[0])``
    holds and every block takes what the one before gives (same channels, dtype, device):
    block i reads block i-1's output, two channels_last buffers take turns. Otherwise
    ``one(x, p)`` block after block. The result keeps x's memory format."""
    blocks = list(blocks)
    if not blocks:
        return x
    p0 = blocks[0]
    if len(blocks) == 1 or not direct(x, p0) or any(
            p.c != p0.c or p.dtype != p0.dtype or p.device != p0.device for p in blocks):
        for p in blocks:
            x = one(x, p)
        return x
    from .._runtime import _sync_threads
    _sync_threads()
    xin = x.detach().contiguous(memory_format=torch.channels_last)
    bufs = [torch.empty_like(xin, memory_format=torch.channels_last) for _ in range(2)]
    ys = [bufs[i % 2] for i in range(len(blocks))]
    call_chain(dl(xin), [entry(p) for p in blocks], [dl(y) for y in ys])
    y = ys[-1]
    if not x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous()
    return y
