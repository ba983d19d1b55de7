"""Build facts, thread control, the fused blocks' GEMM, and paths for native programs."""
from __future__ import annotations

import ctypes
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from . import _C, _cpu

_explicit_threads = False


def _sync_threads() -> None:
    """Follow torch.get_num_threads() unless the user set fastvis' count explicitly."""
    if not _explicit_threads:
        n = torch.get_num_threads()
        if n != _C.get_num_threads():
            _C.set_num_threads(n)


def set_num_threads(n: int) -> None:
    """Sets the number of threads of fastvis' CPU kernels (caller's thread included).

    By default fastvis uses ``torch.get_num_threads()`` and follows changes to it;
    after this call it keeps ``n``. Pass ``0`` to follow PyTorch again.
    """
    global _explicit_threads
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: expected an int, got {type(n).__name__}")
    if n == 0:
        _explicit_threads = False
        _sync_threads()
        return
    if n < 0:
        raise ValueError(f"set_num_threads: expected a thread count >= 1 (or 0 to follow torch), got {n}")
    _C.set_num_threads(n)
    _explicit_threads = True


def get_num_threads() -> int:
    """The number of threads fastvis' CPU kernels use."""
    _sync_threads()
    return _C.get_num_threads()


def cuda_available() -> bool:
    """True when the CUDA backend is compiled in and a CUDA device is usable."""
    return bool(_C.build_info()["cuda"]) and _C.cuda_device_count() > 0


def build_info() -> Dict[str, Any]:
    """What this build contains: CPU ISA paths, CUDA on/off and architectures, threads."""
    info = dict(_C.build_info())
    info["cuda_device_count"] = _C.cuda_device_count()
    info["num_threads"] = get_num_threads()
    info["torch"] = torch.__version__
    info["blas"] = _C.sgemm_provider()  # the fused blocks' float GEMM (see _select_blas)
    info["openblas"] = _C.blas_config()  # scipy-openblas32: double GEMMs, and float without MKL
    # The core's own AVX-512 kernels for the fused blocks' float products (and small-batch linears).
    info["own_gemm"] = bool(_C.own_gemm_active())
    info["cuda_status"] = (
        "compiled, never run on a GPU (unverified on hardware)" if info["cuda"] else "not built"
    )
    return info


_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def get_include() -> str:
    """Directory holding the public C++ headers (``#include <fastvis/fastvis.h>``)."""
    installed = os.path.join(_PKG_DIR, "include")
    if os.path.isdir(os.path.join(installed, "fastvis")):
        return installed
    # In-tree development build (PYTHONPATH=python): headers live in csrc/include.
    return os.path.normpath(os.path.join(_PKG_DIR, "..", "..", "csrc", "include"))


def get_library_dir() -> str:
    """Directory holding libfastvis_core.so, for native programs to link."""
    return os.path.join(_PKG_DIR, "lib")


# ---------------------------------------------------------------- the fused blocks' GEMM
#
# The fused blocks multiply cache-sized tiles with one single-threaded float GEMM per call.
# The core links OpenBLAS (scipy-openblas32) for that; when PyTorch's CPU library carries
# MKL (the x86 Linux wheels do, and export its Fortran ``sgemm_``), fastvis hands the core
# that sgemm instead, with ``mkl_set_num_threads_local`` (its C entry ``MKL_Set_Num_Threads_Local``)
# so each call stays on its thread:
# measured 1.0-1.5x OpenBLAS' rate on the blocks' tile shapes on an AVX-512 Xeon (bench/README,
# session 18). On AMD CPUs ``auto`` keeps OpenBLAS (loaded with its AVX-512 kernels where the
# CPU has them; MKL runs its AVX2 code there: fastvis._cpu, session 25).
# FASTVIS_BLAS=openblas keeps OpenBLAS; FASTVIS_BLAS=mkl asks for MKL (a warning
# if it is not found). The core checks a provider on small products before using it.

_BLAS_ENV = "FASTVIS_BLAS"
_BLAS_CHOICES = ("auto", "mkl", "openblas")
MKL_NAME = "MKL (PyTorch's libtorch_cpu)"


def _torch_mkl_symbols() -> Optional[Tuple[int, int]]:
    """Addresses of ``sgemm_`` and ``mkl_set_num_threads_local`` in the already loaded
    libtorch_cpu, or None (no MKL in this PyTorch, another platform, symbols not exported)."""
    try:
        if not torch.backends.mkl.is_available():
            return None
        path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
        lib = ctypes.CDLL(path, mode=mode)  # the copy torch loaded (RTLD_NOLOAD: never a second one)
        fn = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
        threads = ctypes.cast(lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value  # C interface (by value)
    except (OSError, AttributeError):
        return None
    return (fn, threads) if fn and threads else None


def _select_blas() -> str:
    """Install the fused blocks' float GEMM from FASTVIS_BLAS; returns the one in use."""
    choice = os.environ.get(_BLAS_ENV, "auto").strip().lower() or "auto"
    if choice not in _BLAS_CHOICES:
        warnings.warn(f"{_BLAS_ENV}={os.environ.get(_BLAS_ENV)!r} is not one of {', '.join(_BLAS_CHOICES)}; "
                      f"using 'auto'", RuntimeWarning, stacklevel=2)
        choice = "auto"
    if choice == "openblas" or (choice == "auto" and _cpu.prefer_openblas(_cpu.cpu_facts()[0])):
        _C.set_sgemm_provider(0)
        return _C.sgemm_provider()
    symbols = _torch_mkl_symbols()
    if symbols is None:
        if choice == "mkl":
            warnings.warn(f"{_BLAS_ENV}=mkl: this PyTorch build exports no MKL sgemm; the fused blocks "
                          f"use OpenBLAS", RuntimeWarning, stacklevel=2)
        return _C.sgemm_provider()
    try:
        _C.set_sgemm_provider(symbols[0], symbols[1], MKL_NAME)
    except RuntimeError as e:  # the core's check of the product failed: keep OpenBLAS
        warnings.warn(f"fastvis: PyTorch's MKL sgemm failed the core's check ({e}); the fused blocks "
                      f"use OpenBLAS", RuntimeWarning, stacklevel=2)
    return _C.sgemm_provider()


_select_blas()
