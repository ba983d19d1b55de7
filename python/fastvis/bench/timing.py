"""Wall-clock timing for the benchmarks.

Candidates that are compared with each other are timed *interleaved*: after warming up and
calibrating every candidate, each round times one block of calls of every candidate, in an
order that rotates from round to round. Slow drifts of a shared machine (another process
starting, frequency changes, thermal throttling) then hit all candidates alike instead of
whichever happened to be measured last, so the ratios between them stay meaningful even
when the absolute times do not.

A block runs the callable ``number`` times back to back (``number`` is chosen so a block
lasts at least ``min_block_time``), and the time per call of that block is one sample. We
report the median of the samples (robust to the odd preempted block) and the minimum (the
least disturbed block).

Only the standard library is used here; synchronising an asynchronous device (CUDA) is the
caller's business through the ``sync`` argument.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

__all__ = ["Stats", "Timer", "time_block", "calibrate", "measure", "measure_interleaved"]


@dataclass
class Stats:
    """Per-call times of one candidate, in seconds."""

    samples: List[float] = field(default_factory=list)  # one per block, seconds per call
    number: int = 1  # calls per block
    warmup: int = 0  # untimed calls made before the blocks

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else math.nan

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else math.nan

    @property
    def repeats(self) -> int:
        return len(self.samples)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(median=self.median, min=self.min, max=self.max, mean=self.mean,
                 repeats=self.repeats)
        return d


class Timer:
    """``with Timer() as t: ...`` then ``t.elapsed`` (seconds, perf_counter)."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.elapsed = math.nan
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self.start


def time_block(fn: Callable[[], object], number: int,
               sync: Optional[Callable[[], None]] = None) -> float:
    """Seconds per call of ``number`` back-to-back calls of ``fn`` (GC paused meanwhile)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if sync is not None:
            sync()
        t1 = time.perf_counter()
    finally:
        if gc_was_enabled:
            gc.enable()
    return (t1 - t0) / number


def calibrate(fn: Callable[[], object], min_block_time: float,
              sync: Optional[Callable[[], None]] = None, max_number: int = 1_000_000) -> int:
    """The number of calls that makes one block last at least ``min_block_time`` seconds."""
    return _calibrate(fn, min_block_time, sync, max_number)[0]


def _calibrate(fn, min_block_time, sync, max_number=1_000_000):
    """(number, seconds the last block of `number` calls took)."""
    number = 1
    while True:
        t = time_block(fn, number, sync) * number
        if t >= min_block_time or number >= max_number:
            return number, t
        if t <= 0:
            number *= 10
        else:
            # Aim 20% above the target so that the next try usually succeeds.
            number = max(number + 1, math.ceil(number * 1.2 * min_block_time / t))
        number = min(number, max_number)


DEFAULT_SETTLE = 0.02  # seconds; see measure_interleaved


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 3,
    repeat: int = 10,
    min_block_time: float = 0.01,
    max_time: Optional[float] = None,
    min_repeat: int = 3,
    max_warmup_time: float = 1.0,
    sync: Optional[Callable[[], None]] = None,
    settle: float = DEFAULT_SETTLE,
) -> Dict[str, Stats]:
    """Times several candidates against each other, interleaved round by round.

    warmup:          untimed calls per candidate before calibration (after the first call,
                     warming up stops once ``max_warmup_time`` seconds were spent on that
                     candidate; calibration itself makes untimed calls too).
    repeat:          timed blocks (samples) per candidate.
    min_block_time:  a block lasts at least this long (short calls are repeated in a block).
    max_time:        if set, a candidate whose blocks are slow gets fewer samples, so that its
                     timed blocks take about ``max_time`` seconds, but never fewer than
                     ``min_repeat`` (nor more than ``repeat``).
    settle:          before each timed block, every candidate runs untimed for about this
                     many seconds, and at least one call, so the block measures it in its
                     own steady state (as a program calling it back to back sees it) rather
                     than in the wake of the previous candidate. On 2 cores that wake
                     matters: PyTorch's OpenMP workers keep spinning for ~10 ms after a
                     parallel ATen op (libgomp's default wait policy) and slowed the next
                     fastvis block by up to 2x; a candidate's sleeping thread pool costs its
                     first call a wake-up; the previous candidate's data has evicted this
                     one's from the caches. Even for whole-model calls of ~130 ms the first
                     call after the other model was 8-14 % slower than the next one (convnext_tiny
                     at N=1, fastvis and timm alike). 0 turns settling off.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    names = list(fns)
    stats: Dict[str, Stats] = {}
    want: Dict[str, int] = {}
    per_call: Dict[str, float] = {}
    for name in names:
        fn = fns[name]
        done = 0
        t_start = time.perf_counter()
        while done < warmup and (done == 0 or time.perf_counter() - t_start < max_warmup_time):
            fn()
            done += 1
        if sync is not None:
            sync()
        number, block = _calibrate(fn, min_block_time, sync)
        stats[name] = Stats(number=number, warmup=done)
        per_call[name] = block / number
        # Samples: `repeat`, cut down for slow candidates when a time budget is set.
        n = repeat
        if max_time is not None and block > 0:
            n = min(repeat, max(min(min_repeat, repeat), int(max_time // block)))
        want[name] = max(1, n)

    rounds = max(want.values()) if want else 0
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate the order every round
            st = stats[name]
            if st.repeats < want[name]:
                if settle > 0:
                    t_end = time.perf_counter() + settle
                    fns[name]()
                    while time.perf_counter() < t_end:
                        fns[name]()
                    if sync is not None:
                        sync()
                st.samples.append(time_block(fns[name], st.number, sync))
    return stats


def measure(fn: Callable[[], object], **kwargs) -> Stats:
    """Times one callable (see :func:`measure_interleaved` for the keyword arguments)."""
    return measure_interleaved({"fn": fn}, **kwargs)["fn"]


def gemm_line() -> str:
    """Which GEMM the fused blocks use in this process and which kernels the core's OpenBLAS
    loaded (the two decide the models' figures: fastvis._cpu), for a benchmark's header."""
    import fastvis
    from fastvis import _C

    info = fastvis.build_info()
    own = "on" if _C.own_gemm_active() else "off"
    return (f"fused blocks' GEMM: {_C.sgemm_provider()}, the core's own AVX-512 kernels "
            f"{own}; core OpenBLAS: {info.get('openblas', '?')}")


def core_sgemm_rate(reps: int = 5):
    """(GFLOP/s of one thread, name): the fused blocks' GEMM on 256x1536x384 as they call it
    (the own AVX-512 kernel's untransposed product where it is active, else the BLAS /
    provider), the per-thread ceiling the benchmarks compare with."""
    from fastvis import _C

    own = _C.own_gemm_active()
    return _C.blas_sgemm_gflops(256, 1536, 384, reps, nn=own), core_sgemm_name()


def core_sgemm_name() -> str:
    """The GEMM :func:`core_sgemm_rate` measures, for table captions."""
    from fastvis import _C

    return "own AVX-512 kernel" if _C.own_gemm_active() else f"{_C.sgemm_provider()}"
