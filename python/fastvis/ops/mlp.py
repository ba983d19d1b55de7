"""The pointwise MLP of the vision blocks, trained with little activation memory:
``fastvis.ops.mlp``.

    y = fc2(GRN?(GELU(fc1(x))))

on channels-last tokens ``x`` of shape (N, H, W, C) (the ``x.permute(0, 2, 3, 1)`` view
of a channels_last activation), fc1 / fc2 as ``nn.Linear`` weights (hidden, C) and
(C_out, hidden), GELU exact or tanh-approximated, and optionally the ConvNeXt-V2 / UniRepLKNet
Global Response Normalization on the hidden activations (per image, hence the 4-D input).

Two CPU paths, the same results within rounding:

- **Tiled** (where fc2 maps back to C; the choice is :func:`mlp_path`): the core's tiled MLP
  (``fastvis/mlp.h``), the fused blocks' tile engine without a mixer. Tiles of image rows go
  through fc1 -> GELU (-> GRN) -> fc2 as the core's GEMMs in cache; autograd keeps x only (C
  values a pixel against eager PyTorch's C + 2 hidden, 9C for hidden = 4C); the backward
  recomputes fc1 per tile (5 GEMMs a tile instead of 4, all on cache-resident tiles) and
  reduces the parameter gradients in a fixed order (bit-identical for any thread count).
  With GRN it takes a statistics pass in the forward (its (N, H, hidden) row sums are
  saved for the backward) and one more in the backward (one more GEMM a tile). Chosen
  where the engine's products run at the CPU's full width (the core's own AVX-512 GEMM,
  or an AVX-512 BLAS: :func:`core_gemm_wide`) except for hidden widths of 1024 and more
  at 1024 pixels or more (measured 1.08x slower there than oneDNN's products; likely
  because tiles of 256+ pixels then hold over 1 MB of hidden activations each), and, where the
  engine is narrower than oneDNN, without GRN for large hidden activations only
  (``_tiled_serves`` has the measurements).
- **Torch GEMMs** (C_out != C, and the rest): autograd keeps ``x`` and the
  hidden pre-activation ``h = fc1(x)`` (plus GRN's (N, hidden) norms), C + hidden values
  per pixel; the backward recomputes GELU's output (and GRN's, from the saved norms, in one
  pass over h) instead of reading it back, then runs the same four GEMMs as eager PyTorch.
  The GEMMs are torch's: 1x1 convolutions of the tokens' channels_last views where
  PyTorch has oneDNN (float32, bfloat16; oneDNN runs AVX-512 kernels wherever the CPU has
  them, MKL's ``F.linear`` runs AVX2 code on AMD CPUs), else ``F.linear`` / ``mm``; GELU + GRN
  forward and backward are the core's GRN family with its fused GELU prologue
  (:func:`fastvis.ops.global_response_norm` with ``activation="gelu"``); without GRN,
  torch's ``gelu`` and ``gelu_backward``.

Other devices run the reference.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _C, _cpu
from .._reference import reference_enabled
from .._runtime import _sync_threads
from ._bridge import (autocast_cast, autocast_dtype, call_op, dl, forward_op, register_autograd,
                      scratch_arg_sized, workspace)
from ._checks import CPU_DTYPES, CUDA_DTYPES, check_eps, check_param_tensors, cpu_core_serves
from .grn import global_response_norm_reference

_APPROX = {"none": 1, "tanh": 2}  # approximate -> the core's GrnActivation value


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """The logical (N, C, H, W) view of dense (N, H, W, C) tokens (channels_last strides)."""
    return t.permute(0, 3, 1, 2)


def _gelu_name(act: int) -> str:
    return "tanh" if act == 2 else "none"


# ---------------------------------------------------------------- the torch path's GEMMs
#
# The torch-GEMM path runs its four products as 1x1 convolutions of the tokens' channels_last
# (N, C, H, W) views where PyTorch has oneDNN (float32, bfloat16): oneDNN picks its kernels by
# the CPU's instruction set, while ``F.linear`` / ``mm`` go to MKL, which on AMD CPUs runs
# its AVX2 code. Measured on a Zen 5 (2 threads, UniRepLKNet-T's MLP shapes, N=8): 1x1
# convolution forward 360-510 GFLOP/s, input gradient 420-505, weight gradient 180-440,
# against 180-235 for ``F.linear`` / ``mm`` (bench/README.md, session 27). Elsewhere, and
# for float64, ``F.linear`` / ``mm``.

_ONEDNN = bool(torch.backends.mkldnn.is_available())
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_serves(x: torch.Tensor) -> bool:
    """Whether the torch-GEMM path's products run as oneDNN 1x1 convolutions for x."""
    return _ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) channels_last -> dense (N, H, W, C) tokens (a copy only if the strides
    came back otherwise)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _pointwise(t: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(t, w, b)`` on (N, H, W, C) tokens: a oneDNN 1x1 convolution where it
    serves (:func:`_onednn_serves`)."""
    if _onednn_serves(t):
        return _tokens(F.conv2d(_nchw(t), w[:, :, None, None], b))
    return F.linear(t, w, b)


def _pointwise_grads(gy: torch.Tensor, t: torch.Tensor, w: torch.Tensor, mask):
    """The gradients (input tokens, weight, bias) of ``_pointwise(t, w, b)`` for output
    gradient gy, those ``mask`` asks for (None elsewhere), by oneDNN's convolution backward.
    Only the weight gradient reads t's values."""
    mask = [bool(m) for m in mask]
    gi, gw, gb = torch.ops.aten.convolution_backward(
        _nchw(gy), _nchw(t), w[:, :, None, None], [w.shape[0]] if mask[2] else None, [1, 1], [0, 0],
        [1, 1], False, [0, 0], 1, mask)
    return (_tokens(gi) if mask[0] else None, gw.view(w.shape) if mask[1] else None,
            gb if mask[2] else None)


# ---------------------------------------------------------------- custom ops


@forward_op("fastvis::mlp")
def _mlp_fwd(
    x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
    grn_weight: Optional[torch.Tensor], grn_bias: Optional[torch.Tensor], grn_eps: float,
    act: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, norm): the output, fc1's output (saved for the backward) and GRN's (N,
    hidden) norms (an empty tensor without GRN)."""
    _sync_threads()
    x = x.detach().contiguous()
    w1, w2 = fc1_weight.detach(), fc2_weight.detach()
    b1 = None if fc1_bias is None else fc1_bias.detach()
    b2 = None if fc2_bias is None else fc2_bias.detach()
    h = _pointwise(x, w1, b1)
    if grn_weight is not None:
        a = workspace("mlp.a", h.shape, h.dtype, h.device)  # fc2's input, used here only
        norm = torch.empty(h.shape[0], h.shape[-1], dtype=_stats_dtype(h.dtype), device=h.device)
        gb = grn_bias.detach() if grn_bias is not None else torch.zeros_like(grn_weight)
        nbytes = lambda: _C.global_response_norm_forward_scratch_bytes(_nchw(h))
        _C.global_response_norm_forward(dl(_nchw(h)), dl(grn_weight.detach()), dl(gb), grn_eps,
                                        dl(_nchw(a)), dl(norm), scratch_arg_sized(h.device, nbytes), act)
    else:
        a = F.gelu(h, approximate=_gelu_name(act))
        norm = h.new_empty(0)
    return _pointwise(a, w2, b2), h, norm


@_mlp_fwd.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias, grn_eps, act):
    hidden, cout = fc1_weight.shape[0], fc2_weight.shape[0]
    h = x.new_empty((*x.shape[:-1], hidden))
    norm = (x.new_empty((x.shape[0], hidden), dtype=_stats_dtype(x.dtype)) if grn_weight is not None
            else x.new_empty(0))
    return x.new_empty((*x.shape[:-1], cout)), h, norm


@forward_op("fastvis::mlp_backward")
def _mlp_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, h: torch.Tensor, norm: torch.Tensor,
    fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, grn_weight: Optional[torch.Tensor],
    grn_bias: Optional[torch.Tensor], grn_eps: float, act: int, needs: List[bool],
) -> List[torch.Tensor]:
    """Gradients [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias];
    an empty tensor where ``needs`` is False."""
    _sync_threads()
    gy = grad_y.detach().contiguous()
    x, h = x.detach(), h.detach()
    w1, w2 = fc1_weight.detach(), fc2_weight.detach()
    hidden, cin, cout = w1.shape[0], w1.shape[1], w2.shape[0]
    gy2, x2 = gy.reshape(-1, cout), x.reshape(-1, cin)
    empty = x.new_empty(0)  # placeholder only: every returned empty is its own tensor
    n_x, n_w1, n_b1, n_w2, n_b2, n_gw, n_gb = needs
    grn = grn_weight is not None
    gw = grn_weight.detach() if grn else None
    need_dh = n_x or n_w1 or n_b1 or n_gw or n_gb
    out_x = out_w1 = out_b1 = out_w2 = empty
    outs_grn = [empty, empty]
    # fc2's weight gradient needs the hidden activation a = GRN?(GELU(h)) again: with GRN
    # the core's backward writes it in its reduction pass (from the saved norms), without
    # GRN torch's gelu recomputes it.
    # The hidden-sized temporaries (a, da, dh) never leave this call: per-thread workspaces.
    a = workspace("mlp.a", h.shape, h.dtype, h.device) if (n_w2 and grn) else None
    dh = None
    onednn = _onednn_serves(x)
    if need_dh or a is not None:
        if onednn:
            da = _pointwise_grads(gy, h, w2, (True, False, False))[0]
        elif grn:
            da = torch.mm(gy2, w2, out=workspace("mlp.da", (gy2.shape[0], hidden), gy2.dtype, h.device)).view(h.shape)
        else:
            da = torch.mm(gy2, w2).view(h.shape)
        if grn:
            dh = workspace("mlp.dh", h.shape, h.dtype, h.device) if (n_x or n_w1 or n_b1) else None
            ggw = torch.empty(hidden, dtype=h.dtype, device=h.device) if n_gw else None
            ggb = torch.empty(hidden, dtype=h.dtype, device=h.device) if n_gb else None
            gb = grn_bias.detach() if grn_bias is not None else torch.zeros_like(gw)
            nbytes = lambda: _C.global_response_norm_backward_scratch_bytes(_nchw(h))
            _C.global_response_norm_backward(dl(_nchw(da)), dl(_nchw(h)), dl(gw), dl(norm.detach()),
                                             grn_eps, dl(None if dh is None else _nchw(dh)), dl(ggw),
                                             dl(ggb), scratch_arg_sized(h.device, nbytes), act, dl(gb),
                                             dl(None if a is None else _nchw(a)))
            outs_grn = [empty if ggw is None else ggw, empty if ggb is None else ggb]
        elif need_dh:
            dh = torch.ops.aten.gelu_backward(da, h, approximate=_gelu_name(act))
        del da
    if n_w2 and a is None:
        a = F.gelu(h, approximate=_gelu_name(act))
    if onednn:
        if n_w2 or n_b2:
            _, gw2, gb2 = _pointwise_grads(gy, a if n_w2 else h, w2, (False, n_w2, n_b2))
            out_w2 = gw2 if n_w2 else empty
            out_b2 = gb2 if n_b2 else empty
        else:
            out_b2 = empty
        a = None
        if dh is not None and (n_x or n_w1 or n_b1):
            gx, gw1, gb1 = _pointwise_grads(dh, x, w1, (n_x, n_w1, n_b1))
            out_x = gx if n_x else empty
            out_w1 = gw1 if n_w1 else empty
            out_b1 = gb1 if n_b1 else empty
    else:
        if n_w2:
            out_w2 = torch.mm(gy2.t(), a.reshape(-1, hidden))
        a = None
        out_b2 = gy2.sum(0) if n_b2 else empty
        if dh is not None:
            dh2 = dh.reshape(-1, hidden)
            if n_w1:
                out_w1 = torch.mm(dh2.t(), x2)
            if n_b1:
                out_b1 = dh2.sum(0)
            if n_x:
                out_x = torch.mm(dh2, w1).view(*x.shape)
    outs = [out_x, out_w1, out_b1, out_w2, out_b2, *outs_grn]
    return [o if o is not empty else x.new_empty(0) for o in outs]


@_mlp_bwd.register_fake
def _(grad_y, x, h, norm, fc1_weight, fc2_weight, grn_weight, grn_bias, grn_eps, act, needs):
    hidden = fc1_weight.shape[0]
    shapes = [x.shape, fc1_weight.shape, (hidden,), fc2_weight.shape, (fc2_weight.shape[0],),
              (hidden,), (hidden,)]
    return [x.new_empty(s) if need else x.new_empty(0) for s, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias, grn_eps, act = inputs
    _, h, norm = output
    ctx.save_for_backward(x, h, norm, fc1_weight, fc2_weight, grn_weight, grn_bias)
    ctx.has = (fc1_bias is not None, fc2_bias is not None, grn_weight is not None,
               grn_bias is not None)
    ctx.grn_eps = grn_eps
    ctx.act = act
    ctx.mark_non_differentiable(h, norm)
    # No zero tensors for the outputs no loss uses (h is hidden-sized: autograd would fill
    # one per block and step; 32 ms of a UniRepLKNet-T training step at N=8).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_h, _grad_norm):
    if grad_y is None:  # y does not reach the loss (only h or norm would, and they carry none)
        return (None,) * 9
    x, h, norm, w1, w2, gw, gb = ctx.saved_tensors
    has_b1, has_b2, has_gw, has_gb = ctx.has
    ni = ctx.needs_input_grad
    needs = [bool(ni[0]), bool(ni[1]), bool(ni[2]) and has_b1, bool(ni[3]), bool(ni[4]) and has_b2,
             bool(ni[5]) and has_gw, bool(ni[6]) and has_gb]
    if not any(needs):
        return (None,) * 9
    outs = call_op(_mlp_bwd, grad_y, x, h, norm, w1, w2, gw, gb, ctx.grn_eps, ctx.act, needs)
    grads = [o if need else None for o, need in zip(outs, needs)]
    return (*grads, None, None)


register_autograd(_mlp_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- tiled custom ops
#
# The core's tiled MLP (fastvis/mlp.h): the fused blocks' tile engine without a mixer.
# Autograd keeps x only (and with GRN its (N, H, hidden) row sums, so the backward skips a
# statistics pass); the backward recomputes fc1 tile by tile in cache.


def _tiled_weights(fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias):
    """The core's weight list (fastvis/mlp.h), detached; GRN without a bias gets zeros (the
    core takes GRN's two parameters together)."""
    if grn_weight is not None and grn_bias is None:
        grn_bias = torch.zeros_like(grn_weight)
    return [None if t is None else t.detach() for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                         grn_weight, grn_bias)]


# The core's tiled MLP is CPU-only (mlp_shape refuses other devices) and the op runs only
# where cpu_core_serves: scratch is the bindings' per-thread buffer (None).


@forward_op("fastvis::mlp_tiled")
def _tiled_fwd(
    x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
    grn_weight: Optional[torch.Tensor], grn_bias: Optional[torch.Tensor], grn_eps: float,
    act: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, stats): the output and, with GRN, its per-image-row sums of the squared hidden
    activations (N, H, hidden) in the accumulation type (an empty tensor without GRN)."""
    _sync_threads()
    x = x.detach().contiguous()
    ws = _tiled_weights(fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias)
    y = torch.empty_like(x)
    stats = (torch.empty(x.shape[0], x.shape[1], fc1_weight.shape[0], dtype=_stats_dtype(x.dtype),
                         device=x.device) if grn_weight is not None else x.new_empty(0))
    _C.mlp_forward(dl(_nchw(x)), [dl(t) for t in ws], act == 2, grn_eps, dl(_nchw(y)), None,
                   dl(stats) if grn_weight is not None else None)
    return y, stats


@_tiled_fwd.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias, grn_eps, act):
    stats = (x.new_empty((x.shape[0], x.shape[1], fc1_weight.shape[0]), dtype=_stats_dtype(x.dtype))
             if grn_weight is not None else x.new_empty(0))
    return x.new_empty(x.shape), stats


@forward_op("fastvis::mlp_tiled_backward")
def _tiled_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
    grn_weight: Optional[torch.Tensor], grn_bias: Optional[torch.Tensor], grn_eps: float,
    act: int, needs: List[bool],
) -> List[torch.Tensor]:
    """Gradients [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias];
    an empty tensor where ``needs`` is False (or the parameter is absent)."""
    _sync_threads()
    gy = grad_y.detach().contiguous()
    x = x.detach().contiguous()
    ws = _tiled_weights(fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias)
    like = [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias]
    outs = [torch.empty(t.shape, dtype=x.dtype, device=x.device) if (t is not None and need)
            else x.new_empty(0) for t, need in zip(like, needs)]
    grads = [o if (t is not None and need) else None for o, t, need in zip(outs, like, needs)]
    if grads[0] is not None:
        grads[0] = _nchw(grads[0])
    _C.mlp_backward(dl(_nchw(gy)), dl(_nchw(x)), [dl(t) for t in ws], act == 2, grn_eps,
                    [dl(t) for t in grads], None, dl(stats.detach()) if stats.numel() else None)
    return outs


@_tiled_bwd.register_fake
def _(grad_y, x, stats, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias, grn_eps,
      act, needs):
    like = [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias]
    return [x.new_empty(t.shape) if (t is not None and need) else x.new_empty(0)
            for t, need in zip(like, needs)]


def _tiled_setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias, grn_eps, act = inputs
    _, stats = output
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias, stats)
    ctx.grn_eps = grn_eps
    ctx.act = act
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _tiled_backward(ctx, grad_y, _grad_stats):
    if grad_y is None:  # y does not reach the loss
        return (None,) * 9
    *saved, stats = ctx.saved_tensors
    ni = ctx.needs_input_grad
    needs = [bool(ni[i]) and saved[i] is not None for i in range(7)]
    if not any(needs):
        return (None,) * 9
    outs = call_op(_tiled_bwd, grad_y, saved[0], stats, *saved[1:], ctx.grn_eps, ctx.act, needs)
    return (*[o if need else None for o, need in zip(outs, needs)], None, None)


register_autograd(_tiled_fwd, _tiled_backward, _tiled_setup_context)


_AVX512_OPENBLAS = ("skylakex", "cooperlake", "sapphirerapids")


def _avx512_openblas_gemm() -> bool:
    """The core's float GEMM is OpenBLAS on AVX-512 kernels (fastvis._cpu, _runtime)."""
    return _C.sgemm_provider().lower().startswith("openblas") and any(
        k in _C.blas_config().lower() for k in _AVX512_OPENBLAS)


def _core_gemm_wide() -> bool:
    """The tile engine's products run at the CPU's full vector width: the core's own AVX-512
    GEMM kernel is active (core/blas.h: it serves all of the engine's float products), or
    the BLAS runs AVX-512 kernels (OpenBLAS' SkylakeX set, MKL on an Intel CPU), or the CPU
    has no AVX-512 (so nothing is wider)."""
    if _C.own_gemm_active() or _avx512_openblas_gemm():
        return True
    vendor, flags = _cpu.cpu_facts()
    return "avx512f" not in flags or (_C.sgemm_provider().lower().startswith("mkl") and vendor == "GenuineIntel")


# Decided once, at import (after fastvis._runtime installed the GEMM), so torch.compile
# traces constants. Tests and bench/mlp_paths.py override them.
_CORE_GEMM_WIDE = _core_gemm_wide()
# Where the engine is wide and oneDNN serves x, the torch-GEMM path on oneDNN from these
# hidden widths and pixel counts (the likely cause: the tiled MLP's tiles of 256+ pixels
# then hold over 1 MB of hidden activations each, several such buffers in the backward,
# beyond a 1 MB L2; not verified with counters). Measured on a Zen 5 (own GEMM kernels, 2
# threads, fwd + bwd, tiled time / oneDNN time, bench/mlp_paths.py), session 28, after the
# own kernel took over gemm(N, T) (session 27, before it, oneDNN won from 128 pixels:
# InceptionNeXt-T hidden 1536 1.21-1.22, UniRepLKNet-T 1280-2560 1.13-1.44):
# InceptionNeXt-T hidden 384-768 0.32-0.87, 1536 at 196 pixels 0.85 and at 1568 1.08, 3072
# at 49 pixels 0.53 and at 392 0.90; UniRepLKNet-T (GRN) hidden 320-640 0.78-0.87, 1280 at
# 196 pixels 1.03 and at 1568 1.08, 2560 at 49 pixels 0.73 and at 392 1.00. Training step,
# one process alternating 128 / 1024 pixels: inception_next_tiny N=1 109.4 -> 102.8 ms,
# N=8 level, unireplknet_t N=1 level.
_ONEDNN_MIN_HIDDEN = 1024
_ONEDNN_MIN_PIXELS = 1024
# Where the engine is narrower than oneDNN (the CPU has AVX-512, the core's GEMM does not
# use it): GRN takes oneDNN, and so does an MLP without GRN below this hidden activation
# size (N*H*W*hidden elements, in bytes of x's dtype): the torch-GEMM path streams that
# tensor through memory several times (fc1's output saved, GELU, GELU recomputed and its
# gradient, the products' inputs and outputs), the tiled one keeps it in cache. Measured on
# a Zen 5 (32 MB L3, OpenBLAS' Haswell kernels, tiled time / oneDNN time): InceptionNeXt-T
# at 9.6-19 MB of hidden activation 1.20-1.92x, at 38.5 MB 0.62-0.98x, at 77 MB 0.64x.
_TILED_MIN_HIDDEN_BYTES = 32 << 20


def core_gemm_wide() -> bool:
    """Whether the fused blocks' and the tiled MLP's products run at the CPU's full vector
    width (decided at import; see ``_core_gemm_wide``)."""
    return _CORE_GEMM_WIDE


def tiled_grn_preferred() -> bool:
    """Whether :func:`mlp` with GRN may run the core's tiled MLP: where its products run at
    the CPU's full width (:func:`core_gemm_wide`). GRN costs the tiled backward one GEMM a
    tile more than the torch-GEMM path (it recomputes fc1 instead of saving it)."""
    return _CORE_GEMM_WIDE


def mlp_path(x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
             grn_weight: Optional[torch.Tensor] = None) -> str:
    """The CPU path :func:`mlp` takes for these arguments: ``"tiled"`` (the core's tiled
    MLP), ``"onednn"`` (the torch-GEMM path, its products as oneDNN 1x1 convolutions) or
    ``"mm"`` (the torch-GEMM path on ``F.linear`` / ``mm``). x: (N, H, W, C) tokens."""
    if _tiled_serves(x, fc1_weight, fc2_weight, grn_weight):
        return "tiled"
    return "onednn" if _onednn_serves(x) else "mm"


def _tiled_serves(x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
                  grn_weight: Optional[torch.Tensor]) -> bool:
    """Whether :func:`mlp` runs the core's tiled MLP (CPU, checked by the caller): fc2 maps
    back to x's width, and
    - where oneDNN does not serve x: without GRN always, with GRN where the engine is wide;
    - where it does and the engine is wide: unless hidden >= ``_ONEDNN_MIN_HIDDEN`` at
      ``_ONEDNN_MIN_PIXELS`` pixels or more;
    - where it does and the engine is narrower: without GRN, for hidden activations of
      ``_TILED_MIN_HIDDEN_BYTES`` or more."""
    c = x.shape[-1]
    hidden = fc1_weight.shape[0]
    if fc2_weight.shape[0] != c or hidden * c >= 2 ** 31:
        return False
    pixels = x.numel() // max(c, 1)
    if not _onednn_serves(x):
        return grn_weight is None or _CORE_GEMM_WIDE
    if _CORE_GEMM_WIDE:
        return not (hidden >= _ONEDNN_MIN_HIDDEN and pixels >= _ONEDNN_MIN_PIXELS)
    if grn_weight is not None:
        return False
    return pixels * hidden * x.element_size() >= _TILED_MIN_HIDDEN_BYTES


# ---------------------------------------------------------------- public API


def mlp_reference(
    x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor] = None, *,
    grn_weight: Optional[torch.Tensor] = None, grn_bias: Optional[torch.Tensor] = None,
    grn_eps: float = 1e-6, approximate: str = "none",
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`mlp` (``F.linear``, ``F.gelu``, the GRN reference,
    ``F.linear``); differentiable, and what eager PyTorch would save for the backward."""
    h = F.gelu(F.linear(x, fc1_weight, fc1_bias), approximate=approximate)
    if grn_weight is not None:
        gb = grn_bias if grn_bias is not None else torch.zeros_like(grn_weight)
        h = global_response_norm_reference(_nchw(h), grn_weight, gb, grn_eps).permute(0, 2, 3, 1)
    return F.linear(h, fc2_weight, fc2_bias)


def _validate(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias, approximate):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mlp: x must be a torch.Tensor, got {type(x).__name__}")
    if approximate not in _APPROX:
        raise ValueError(f"approximate: expected 'none' (exact erf GELU) or 'tanh', got {approximate!r}")
    allowed = CUDA_DTYPES if x.device.type == "cuda" else CPU_DTYPES
    if x.dtype not in allowed and x.device.type != "meta":
        names = ", ".join(str(t).replace("torch.", "") for t in allowed)
        raise TypeError(f"x: the {x.device.type.upper()} backend supports {names}, got "
                        f"{str(x.dtype).replace('torch.', '')}")
    if x.dim() != 4:
        raise ValueError(f"mlp: expected (N, H, W, C) channels-last tokens, got shape {tuple(x.shape)}")
    c = x.shape[-1]
    named = dict(fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias,
                 grn_weight=grn_weight, grn_bias=grn_bias)
    check_param_tensors("mlp", x, named.items())
    for name in ("fc1_weight", "fc2_weight"):
        if named[name] is None:
            raise TypeError(f"{name}: a tensor is required, got None")
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != c or fc1_weight.shape[0] < 1:
        raise ValueError(f"fc1_weight: expected (hidden, {c}), got {tuple(fc1_weight.shape)}")
    hidden = fc1_weight.shape[0]
    if fc2_weight.dim() != 2 or fc2_weight.shape[1] != hidden or fc2_weight.shape[0] < 1:
        raise ValueError(f"fc2_weight: expected (C_out, {hidden}), got {tuple(fc2_weight.shape)}")
    for name, n in (("fc1_bias", hidden), ("fc2_bias", fc2_weight.shape[0]), ("grn_weight", hidden),
                    ("grn_bias", hidden)):
        t = named[name]
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    if grn_weight is None and grn_bias is not None:
        raise ValueError("grn_bias given without grn_weight")


def mlp(
    x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor] = None, *,
    grn_weight: Optional[torch.Tensor] = None, grn_bias: Optional[torch.Tensor] = None,
    grn_eps: float = 1e-6, approximate: str = "none",
) -> torch.Tensor:
    """``fc2(GRN?(GELU(fc1(x))))`` on (N, H, W, C) tokens, saving only x and fc1's output
    for the backward (see the module docstring).

    Args:
        x: (N, H, W, C); a dense (contiguous) tensor is used as is, other strides are
            copied. For a channels_last (N, C, H, W) activation pass
            ``x.permute(0, 2, 3, 1)`` (zero-copy) and permute the result back.
        fc1_weight, fc1_bias: (hidden, C), (hidden,) or None.
        fc2_weight, fc2_bias: (C_out, hidden), (C_out,) or None.
        grn_weight, grn_bias: (hidden,) each, or None (no GRN; ``grn_bias`` None with a
            weight means zero bias). GRN normalises over each image's H x W pixels.
        grn_eps: GRN's epsilon.
        approximate: ``"none"`` (exact GELU) or ``"tanh"``.

    Returns:
        (N, H, W, C_out), contiguous. CPU: float32, float64, bfloat16. Other devices run
        :func:`mlp_reference` (warned once). Under autocast everything runs in the
        autocast dtype.
    """
    ad = autocast_dtype(x)
    if ad is not None:
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias = autocast_cast(
            ad, [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias])
    _validate(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight, grn_bias, approximate)
    e = check_eps(grn_eps, "grn_eps")
    kw = dict(grn_weight=grn_weight, grn_bias=grn_bias, grn_eps=e, approximate=approximate)
    if reference_enabled() or not cpu_core_serves("mlp", x):
        return mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, **kw)
    if _tiled_serves(x, fc1_weight, fc2_weight, grn_weight):
        y, _ = call_op(_tiled_fwd, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight,
                       grn_bias, e, _APPROX[approximate])
        return y
    y, _, _ = call_op(_mlp_fwd, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, grn_weight,
                      grn_bias, e, _APPROX[approximate])
    return y
