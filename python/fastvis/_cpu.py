"""CPU facts fastvis acts on before its compiled core is loaded (this module must not import
``fastvis._C``): which OpenBLAS kernels the core's OpenBLAS should use, and which BLAS the
fused blocks should multiply with.

Why: the core links OpenBLAS (scipy-openblas32, a ``DYNAMIC_ARCH`` build), which picks its
kernels from the CPU when it is loaded; on an AMD Zen 5 it picked its AVX2 ``Haswell``
kernels although the CPU runs AVX-512, and PyTorch's MKL, the fused blocks' default GEMM
on x86 Linux, runs its AVX2 code on AMD CPUs as well. Measured on that machine (session 25,
two threads, eval inference, ms per batch): convnext_tiny N=1 / N=8 and inception_next_tiny
N=1 took 54 / 380 / 50 ms with MKL, 51 / 345 / 48 with OpenBLAS' Haswell kernels and 31 /
196 / 30 with its SkylakeX (AVX-512) kernels. OpenBLAS reads ``OPENBLAS_CORETYPE`` once,
while it loads, so fastvis sets it for the import of its core only. (That machine's
environment set ``OPENBLAS_CORETYPE=Haswell`` for every process; fastvis leaves a user's
setting alone, and ``FASTVIS_OPENBLAS_CORETYPE`` overrides it for fastvis' copy only.)
"""
from __future__ import annotations

import os
from typing import FrozenSet, Mapping, Optional, Tuple

# What OpenBLAS' SkylakeX kernels need.
AVX512_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
AVX512_CORES = ("SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS")
CORETYPE_ENV = "OPENBLAS_CORETYPE"
FASTVIS_CORETYPE_ENV = "FASTVIS_OPENBLAS_CORETYPE"


def cpu_facts(path: str = "/proc/cpuinfo") -> Tuple[str, FrozenSet[str]]:
    """(vendor id, CPU flags) of the first processor in ``path``; ("", {}) where there is
    no such file (not Linux) or it says nothing of them."""
    vendor, flags = "", frozenset()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if vendor and flags:
                    break
    except OSError:
        pass
    return vendor, flags


def openblas_coretype(vendor: str, flags: FrozenSet[str], environ: Mapping[str, str]) -> Optional[str]:
    """The ``OPENBLAS_CORETYPE`` to load the core's OpenBLAS with, or None to leave it as it is.

    ``FASTVIS_OPENBLAS_CORETYPE`` (fastvis' own copy of OpenBLAS only) names the kernels
    outright (``auto``, the default, decides as below; an AVX-512 kernel set is refused on a
    CPU without AVX-512). Otherwise a user's ``OPENBLAS_CORETYPE`` is left alone, and so is a
    cap below AVX-512 (``FASTVIS_CPU_ISA``); on an AMD CPU with AVX-512 the answer is
    SkylakeX (OpenBLAS' own detection picks the AVX-512 kernels on Intel CPUs)."""
    has_avx512 = all(f in flags for f in AVX512_FLAGS)
    forced = environ.get(FASTVIS_CORETYPE_ENV, "").strip().upper()
    if forced and forced != "AUTO":
        if forced in AVX512_CORES and not has_avx512:
            return None
        return forced
    if CORETYPE_ENV in environ:
        return None
    if environ.get("FASTVIS_CPU_ISA", "").strip().lower() in ("generic", "avx2"):
        return None
    if vendor != "AuthenticAMD" or not has_avx512:
        return None
    return "SKYLAKEX"


def prefer_openblas(vendor: str) -> bool:
    """Whether ``FASTVIS_BLAS=auto`` keeps OpenBLAS rather than PyTorch's MKL: on AMD CPUs,
    where MKL runs its AVX2 code (measured above); MKL elsewhere, where it was measured
    1.0-1.5x OpenBLAS on an AVX-512 Xeon (session 18)."""
    return vendor == "AuthenticAMD"


def set_coretype_for_load() -> Optional[Tuple[str, Optional[str]]]:
    """Sets ``OPENBLAS_CORETYPE`` from :func:`openblas_coretype` for this machine; returns
    (what it set, the value before or None) for :func:`restore_coretype` once the core is
    loaded, or None when it set nothing."""
    vendor, flags = cpu_facts()
    core = openblas_coretype(vendor, flags, os.environ)
    if core is None:
        return None
    before = os.environ.get(CORETYPE_ENV)
    os.environ[CORETYPE_ENV] = core
    return core, before


def restore_coretype(token: Optional[Tuple[str, Optional[str]]]) -> None:
    """Puts ``OPENBLAS_CORETYPE`` back as :func:`set_coretype_for_load` found it."""
    if token is None:
        return
    if token[1] is None:
        os.environ.pop(CORETYPE_ENV, None)
    else:
        os.environ[CORETYPE_ENV] = token[1]
