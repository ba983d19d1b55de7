"""GPU tests of the CUDA fused ConvNeXt block (csrc/ops/convnext_block/cuda/convnext_block.cu).

Every test is marked ``cuda`` and skipped without a CUDA device: no machine of this
project has had one, so these tests have NEVER RUN. They compare
``fastvis.ops.convnext_block`` on CUDA (float16 / bfloat16; forward and every gradient
through autograd) with the CPU fused op in float64 evaluated on the same (already
rounded) inputs, check GRN, drop_scale, the tanh GELU, absent optional parameters,
side streams, autocast, that results are bit-identical run to run, and that float32
CUDA inputs are refused by the core (the Python op falls back to the reference).

The shapes reach every path of the kernels: the fused forward with the normalised tile
resident in shared memory (C <= 256) and the streamed one (C > 256), one and several
output-column chunks (C > 128), several hidden chunks and a hidden size that is not a
multiple of 64, partial tiles, images smaller than the kernel, 31x31 kernels.

Tolerances: normwise, max |got - ref| <= tol * max |ref|, tol = 5e-3 (float16) / 3e-2
(bfloat16). The host emulation of this very kernel source (tests/cpp/test_block_cuda_emu.cpp,
with the 16-bit rounding of the GEMM operands modelled) stays below 8e-4 / 7e-3 on these and
other shapes; the tolerances have not been validated on hardware.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

try:
    import fastvis
    import fastvis.ops
    from fastvis import _C
except Exception:  # pragma: no cover - reported by the CPU tests
    fastvis = None


def _cuda_ok() -> bool:
    if not torch.cuda.is_available() or fastvis is None:
        return False
    try:
        return bool(fastvis.cuda_available())
    except Exception:
        return False


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _cuda_ok(), reason="no CUDA device")]

DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
NAMES = ("dw_weight", "dw_bias", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias",
         "fc2_weight", "fc2_bias", "gamma", "grn_weight", "grn_bias")


def _make(n, c, h, w, k, hidden, dtype, seed, *, grn=False, drop=True, optional=True):
    """CPU tensors already rounded to dtype (so the float64 oracle sees the same values)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=g)).to(dtype)

    p = {
        "x": r(n, c, h, w).contiguous(memory_format=torch.channels_last),
        "dw_weight": r(c, 1, k, k, scale=1.0 / k),
        "dw_bias": r(c, scale=0.3) if optional else None,
        "norm_weight": r(c, scale=0.2, mean=1.0) if optional else None,
        "norm_bias": r(c, scale=0.2) if optional else None,
        "fc1_weight": r(hidden, c, scale=1.0 / math.sqrt(c)),
        "fc1_bias": r(hidden, scale=0.2) if optional else None,
        "fc2_weight": r(c, hidden, scale=1.0 / math.sqrt(hidden)),
        "fc2_bias": r(c, scale=0.2) if optional else None,
        "gamma": r(c, scale=0.3, mean=1.0) if optional else None,
        "grn_weight": r(hidden, scale=0.5) if grn else None,
        "grn_bias": r(hidden, scale=0.2) if grn else None,
    }
    p["drop_scale"] = (torch.tensor([0.0 if i % 3 == 1 else 1.25 for i in range(n)])
                       if drop else None)
    p["gy"] = r(n, c, h, w).contiguous(memory_format=torch.channels_last)
    return p


def _run(p, device, dtype, approximate="none", grads=True):
    """y and the gradients of x and every parameter present, through autograd."""
    t = {}
    for key, v in p.items():
        if v is None or key == "gy":
            continue
        v = v.to(device=device, dtype=dtype if key != "drop_scale" else torch.float32)
        if key == "x":
            v = v.contiguous(memory_format=torch.channels_last)
        if grads and key != "drop_scale":
            v.requires_grad_(True)
        t[key] = v
    y = fastvis.ops.convnext_block(
        t["x"], t["dw_weight"], t.get("dw_bias"), t.get("norm_weight"), t.get("norm_bias"),
        t["fc1_weight"], t.get("fc1_bias"), t["fc2_weight"], t.get("fc2_bias"), t.get("gamma"),
        t.get("drop_scale"), grn_weight=t.get("grn_weight"), grn_bias=t.get("grn_bias"),
        approximate=approximate)
    out = {"y": y}
    if grads:
        gy = p["gy"].to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        y.backward(gy)
        out["grad_x"] = t["x"].grad
        for key in NAMES:
            if key in t:
                out["grad_" + key] = t[key].grad
    return out


def _oracle(p, approximate="none"):
    """The CPU fused op in float64 on the same values."""
    return _run(p, "cpu", torch.float64, approximate)


def _assert_close(got, want, dtype, what, tol_scale=1.0):
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item()
    tol = TOL[dtype] * tol_scale
    assert err <= tol * scale, f"{what} ({dtype}): max error {err:.3g} > {tol} * max|ref| ({scale:.3g})"


def _compare(p, dtype, approximate="none"):
    got = _run(p, "cuda", dtype, approximate)
    torch.cuda.synchronize()
    want = _oracle(p, approximate)
    assert got["y"].dtype == dtype and got["y"].device.type == "cuda"
    assert got["y"].is_contiguous(memory_format=torch.channels_last)
    assert set(got) == set(want)
    for key in want:
        _assert_close(got[key], want[key], dtype, key)
    return got


# (N, C, H, W, k, hidden): each reaches a different path.
CASES = [
    pytest.param(2, 24, 9, 9, 7, 96, id="small-C24-resident"),
    pytest.param(2, 96, 14, 14, 7, 384, id="convnext-stage1-like"),
    pytest.param(1, 130, 6, 7, 3, 200, id="C130-two-column-chunks-hidden200"),
    pytest.param(1, 300, 5, 6, 3, 260, id="C300-streamed-three-column-chunks"),
    pytest.param(2, 16, 7, 9, 31, 40, id="k31-image-smaller-than-kernel"),
    pytest.param(3, 5, 1, 1, 7, 7, id="1x1-image-odd-C"),
    pytest.param(1, 33, 17, 3, 5, 65, id="tall-thin-C33"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n,c,h,w,k,hidden", CASES)
def test_forward_and_gradients_match_cpu(n, c, h, w, k, hidden, dtype):
    p = _make(n, c, h, w, k, hidden, dtype, seed=c * 131 + h * 7 + k)
    _compare(p, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n,c,h,w,k,hidden", [
    pytest.param(2, 24, 9, 9, 7, 96, id="resident"),
    pytest.param(2, 300, 4, 5, 3, 130, id="streamed"),
])
def test_grn(n, c, h, w, k, hidden, dtype):
    p = _make(n, c, h, w, k, hidden, dtype, seed=5, grn=True)
    _compare(p, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_tanh_gelu_without_optional_parameters(dtype):
    p = _make(2, 40, 8, 8, 5, 160, dtype, seed=9, optional=False, drop=False)
    _compare(p, dtype, approximate="tanh")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_drop_scale_zero_sample_gets_identity(dtype):
    p = _make(3, 24, 6, 6, 3, 96, dtype, seed=11)
    got = _run(p, "cuda", dtype)
    torch.cuda.synchronize()
    # sample 1 has drop_scale 0: y = x and grad_x = grad_y there
    assert torch.equal(got["y"][1].cpu(), p["x"][1])
    assert torch.equal(got["grad_x"][1].cpu(), p["gy"][1])


@pytest.mark.parametrize("grn", [False, True], ids=["v1", "grn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_deterministic(dtype, grn):
    p = _make(4, 130, 12, 11, 7, 300, dtype, seed=3, grn=grn)
    runs = [_run(p, "cuda", dtype) for _ in range(3)]
    torch.cuda.synchronize()
    for r in runs[1:]:
        for key in runs[0]:
            assert torch.equal(r[key], runs[0][key]), f"{key} differs between runs"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_side_stream(dtype):
    p = _make(2, 48, 10, 10, 7, 192, dtype, seed=13)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _run(p, "cuda", dtype)
    side.synchronize()
    want = _oracle(p)
    for key in want:
        _assert_close(got[key], want[key], dtype, key)


def test_autocast_runs_the_core_in_half():
    p = _make(2, 32, 8, 8, 7, 128, torch.float32, seed=17)
    t = {k: (v.cuda() if v is not None else None) for k, v in p.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the reference would warn
        with torch.autocast("cuda", dtype=torch.float16):
            y = fastvis.ops.convnext_block(
                t["x"], t["dw_weight"], t["dw_bias"], t["norm_weight"], t["norm_bias"],
                t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"], t["gamma"],
                t["drop_scale"])
    assert y.dtype == torch.float16


def test_float32_is_refused_by_the_core():
    p = _make(1, 8, 4, 4, 3, 16, torch.float32, seed=19)
    x = p["x"].cuda()
    ws = [None if p[k] is None else p[k].cuda() for k in NAMES[:9]] + [None, None, None]
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        _C.convnext_block_forward_scratch_bytes(x, ws, 1e-6, False)


def test_inputs_are_not_modified():
    dtype = torch.bfloat16
    p = _make(2, 24, 7, 7, 7, 96, dtype, seed=23, grn=True)
    cuda = {k: (v.cuda() if v is not None else None) for k, v in p.items()}
    before = {k: v.clone() for k, v in cuda.items() if v is not None}
    got = _run({k: v for k, v in cuda.items()}, "cuda", dtype)
    torch.cuda.synchronize()
    assert got["y"] is not None
    for k, v in before.items():
        assert torch.equal(cuda[k], v), f"{k} was modified"
