"""Build facts, thread control and paths for native programs."""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from . import _C

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
    info["blas"] = _C.blas_config()  # OpenBLAS (scipy-openblas32), single-threaded in the pool
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
