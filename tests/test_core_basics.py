"""Package basics: version, build information, the thread pool setting, CUDA query."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import fastvis

REQUIRED_KEYS = {"version", "cpu_isa_compiled", "cpu_isa_selected", "cuda", "cuda_archs",
                 "num_threads", "threading"}


def _as_list(v):
    if isinstance(v, str):
        return [s for s in re.split(r"[,;\s]+", v) if s]
    return list(v)


def test_version():
    v = fastvis.__version__
    assert isinstance(v, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.+-]?\w[\w.+-]*)?", v), v
    assert fastvis.build_info()["version"] == v


def test_build_info_keys_and_values():
    info = fastvis.build_info()
    assert isinstance(info, dict)
    missing = REQUIRED_KEYS - set(info)
    assert not missing, f"build_info() lacks {sorted(missing)}"
    compiled = _as_list(info["cpu_isa_compiled"])
    assert compiled, "no CPU instruction-set path compiled"
    selected = info["cpu_isa_selected"]
    assert isinstance(selected, str) and selected
    assert selected in compiled, f"selected ISA {selected!r} not among compiled {compiled}"
    assert isinstance(info["cuda"], bool)
    archs = _as_list(info["cuda_archs"])
    if info["cuda"]:
        assert archs and all(re.fullmatch(r"\d+[a-z]?", a) for a in archs), archs
    else:
        assert archs == [], f"CUDA not compiled but cuda_archs={info['cuda_archs']!r}"
    assert info["num_threads"] == fastvis.get_num_threads()
    # The fused blocks' float GEMM (PyTorch's MKL or OpenBLAS, tests/test_blas.py); the
    # linked OpenBLAS (scipy-openblas32) as the library reports itself.
    assert info["blas"] in ("OpenBLAS", "MKL (PyTorch's libtorch_cpu)"), info["blas"]
    assert info["openblas"].startswith("OpenBLAS"), info["openblas"]
    # The own GEMM kernel: on by default wherever the AVX-512 path is selected.
    assert info["own_gemm"] == (selected == "avx512"), (info["own_gemm"], selected)
    # A snapshot: mutating it does not change the library.
    info["version"] = "x"
    assert fastvis.build_info()["version"] == fastvis.__version__


def test_threading_backend_is_named():
    assert fastvis.build_info()["threading"] in ("openmp", "pool")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_openmp_regions_share_pytorchs_runtime():
    """Built with OpenMP, the core binds to the libgomp PyTorch loaded (one runtime, one team
    of threads for both) instead of loading a second copy."""
    if fastvis.build_info()["threading"] != "openmp":
        pytest.skip("built without OpenMP: fastvis' own pool")
    x = torch.randn(2, 32, 24, 24).contiguous(memory_format=torch.channels_last)
    torch.nn.functional.conv2d(x, torch.randn(32, 32, 3, 3), padding=1)  # PyTorch's region
    fastvis.ops.depthwise_conv2d(x, torch.randn(32, 1, 7, 7), padding=3)  # ours
    with open("/proc/self/maps") as fh:
        gomp = {line.split()[-1] for line in fh if "libgomp" in line}
    assert len(gomp) <= 1, gomp


def _forked_child(expected, x, w, q):
    # No PyTorch computation here: PyTorch's own OpenMP regions would hang in a forked child.
    import numpy as np
    try:
        y = fastvis.ops.depthwise_conv2d(x, w, padding=3)
        q.put((fastvis.build_info()["threading"], bool(np.array_equal(y.numpy(), expected.numpy()))))
    except BaseException as e:  # reported to the parent
        q.put((repr(e), False))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method")
def test_forked_child_runs_parallel_kernels():
    """A child forked after the parent ran parallel regions computes the same result on two
    threads instead of hanging (GNU libgomp cannot start a region there: the core falls
    back to its own pool)."""
    import multiprocessing as mp

    old = fastvis.get_num_threads()
    fastvis.set_num_threads(2)
    try:
        x = torch.randn(2, 64, 40, 40).contiguous(memory_format=torch.channels_last)
        w = torch.randn(64, 1, 7, 7)
        expected = fastvis.ops.depthwise_conv2d(x, w, padding=3)  # the parent runs regions
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_forked_child, args=(expected, x, w, q))
        p.start()
        p.join(120)
        if p.is_alive():
            p.kill()
            pytest.fail("the forked child hung")
        backend, same = q.get(timeout=10)
        assert p.exitcode == 0 and same, backend
        assert backend == "pool"
        # The parent keeps its backend.
        assert fastvis.build_info()["threading"] in ("openmp", "pool")
        assert torch.equal(fastvis.ops.depthwise_conv2d(x, w, padding=3), expected)
    finally:
        fastvis.set_num_threads(0 if old == torch.get_num_threads() else old)

    old = fastvis.get_num_threads()
    assert isinstance(old, int) and old >= 1
    try:
        for n in (1, 2, 3, 1):
            fastvis.set_num_threads(n)
            assert fastvis.get_num_threads() == n
            assert fastvis.build_info()["num_threads"] == n
    finally:
        fastvis.set_num_threads(old)
    assert fastvis.get_num_threads() == old


def test_set_num_threads_zero_follows_torch_again():
    # Documented: 0 unpins fastvis' count, which then follows torch.get_num_threads().
    old_torch = torch.get_num_threads()
    try:
        fastvis.set_num_threads(1)
        torch.set_num_threads(2)
        assert fastvis.get_num_threads() == 1, "an explicit count must stay pinned"
        fastvis.set_num_threads(0)
        assert fastvis.get_num_threads() == 2
        torch.set_num_threads(1)
        assert fastvis.get_num_threads() == 1
    finally:
        torch.set_num_threads(old_torch)
        fastvis.set_num_threads(0)


@pytest.mark.parametrize("bad", [-1, -8])
def test_set_num_threads_rejects_non_positive(bad):
    old = fastvis.get_num_threads()
    with pytest.raises(ValueError, match=r"(?i)thread|positive|>= ?1|at least"):
        fastvis.set_num_threads(bad)
    assert fastvis.get_num_threads() == old, "a rejected value changed the thread count"


def test_default_threads_follow_torch():
    code = ("import torch; torch.set_num_threads(2); import fastvis; "
            "print(fastvis.get_num_threads(), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    ours, theirs = out.stdout.split()
    assert ours == theirs, f"fastvis starts with {ours} threads, torch has {theirs}"


def test_cuda_available_is_a_bool_and_false_without_gpu():
    avail = fastvis.cuda_available()
    assert isinstance(avail, bool)
    if not fastvis.build_info()["cuda"]:
        assert avail is False
    if not torch.cuda.is_available():
        assert avail is False


def test_import_has_no_side_effect_on_torch_threads():
    code = ("import torch; torch.set_num_threads(2); import fastvis; "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


def test_public_api_present():
    import fastvis.nn
    import fastvis.ops

    for name in ("set_num_threads", "get_num_threads", "build_info", "cuda_available",
                 "use_reference", "get_include", "get_library_dir", "__version__"):
        assert hasattr(fastvis, name), name
    assert callable(fastvis.ops.depthwise_conv2d)
    assert callable(fastvis.ops.depthwise_conv2d_reference)
    assert isinstance(fastvis.nn.DepthwiseConv2d, type)


def test_bindings_accept_dlpack_capsules_and_refuse_consumed_ones():
    """The ops hand the core DLPack capsules (torch.utils.dlpack.to_dlpack); a capsule works
    like the tensor, a consumed one is refused with a TypeError naming the argument."""
    from torch.utils.dlpack import to_dlpack

    from fastvis import _C

    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3)
    args = ([1, 1], [1, 1, 1, 1], [1, 1])
    assert list(_C.dwconv_output_shape(to_dlpack(x), to_dlpack(w), *args)) == \
        list(_C.dwconv_output_shape(x, w, *args))
    used = to_dlpack(x)
    torch.from_dlpack(used)  # consumes it
    with pytest.raises(TypeError, match=r"^x: not a valid 'dltensor'"):
        _C.dwconv_output_shape(used, w, *args)
