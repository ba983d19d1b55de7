"""fastvis: fast kernels for modern vision backbones.

A framework-free C++ core (CPU, and CUDA when built with it) under a PyTorch
layer: custom ops with autograd and torch.compile support, ``nn`` modules with
timm-compatible parameter names, a model zoo (``fastvis.create_model``) and
benchmarks.
"""
from __future__ import annotations

from . import _cpu

# The core's OpenBLAS picks its kernels while it loads (with the core): see fastvis._cpu.
_coretype_set = _cpu.set_coretype_for_load()
try:
    from . import _C  # noqa: F401
except ImportError as _e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "fastvis: the compiled core (fastvis._C) could not be imported. Install the package "
        "with `pip install .` (or build it in place with CMake, see ARCHITECTURE.md). "
        f"Original error: {_e}"
    ) from _e
finally:
    _cpu.restore_coretype(_coretype_set)  # the process' environment as it was

__version__ = _C.version()

from ._runtime import (  # noqa: E402
    build_info,
    cuda_available,
    get_include,
    get_library_dir,
    get_num_threads,
    set_num_threads,
)
from ._reference import reference_enabled, use_reference  # noqa: E402
from . import ops  # noqa: E402
from . import nn  # noqa: E402
from . import models  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .nn.reparam import reparameterize  # noqa: E402
from . import train  # noqa: E402

__all__ = [
    "__version__",
    "build_info",
    "cuda_available",
    "get_include",
    "get_library_dir",
    "get_num_threads",
    "set_num_threads",
    "use_reference",
    "reference_enabled",
    "ops",
    "nn",
    "models",
    "train",
    "create_model",
    "list_models",
    "reparameterize",
]
