"""Build and run the host C++ test programs of tests/cpp, two at a time in the background.

The CUDA code's index math and kernel source are tested on the host by small C++ programs
(tests/cpp/*.cpp), each compiled with the system compiler and run once plainly and once
under AddressSanitizer + UndefinedBehaviorSanitizer. Each program is single-threaded, and
building plus running them all is about five minutes of one core's time, so the first
test that asks for a result starts every program this pytest session has collected, on
two worker threads (each job is one compiler process, then one run). The pytest process
waits only for the result it needs; the others finish while it waits or runs later tests.

A test marks the program it checks with ``@pytest.mark.cpp_program(name)`` (a name from
:data:`PROGRAMS`; conftest.py collects the marks, so only the selected tests' programs are
built) and calls :func:`check`. Nothing is cached across sessions: every session compiles
the current sources.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPP = ROOT / "tests" / "cpp"
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
TENSOR_CPP = ROOT / "csrc" / "core" / "tensor.cpp"
EMU_FLAGS = ["-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-I", str(ROOT / "csrc" / "include")]


def compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


def run_env() -> Dict[str, str]:
    env = dict(os.environ)
    # Leak checking needs ptrace, which some sandboxes forbid; leaks are not what these
    # programs test. UBSan prints a stack and fails on the first error.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=23"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=24"
    return env


def cute_include_flags() -> Optional[List[str]]:
    """-I flags for CuTe (nvidia-cutlass wheel or FASTVIS_CUTLASS_INCLUDE_DIR) and the CUDA
    headers it needs, or None when either is missing."""
    cutlass = os.environ.get("FASTVIS_CUTLASS_INCLUDE_DIR")
    if not cutlass:
        spec = importlib.util.find_spec("cutlass_library")
        if spec and spec.submodule_search_locations:
            cutlass = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    if not cutlass or not os.path.exists(os.path.join(cutlass, "cute", "atom", "mma_traits_sm80.hpp")):
        return None
    cuda_homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cuda_homes.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for home in cuda_homes:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            inc = os.path.join(home, "include")
            flags = ["-I", cutlass, "-I", inc]
            if os.path.isdir(os.path.join(inc, "cccl")):
                flags += ["-I", os.path.join(inc, "cccl")]
            return flags
    return None


@dataclasses.dataclass(frozen=True)
class Program:
    """One host test program: sources, extra compiler flags, run arguments."""

    sources: Sequence[Path]
    flags: Sequence[str] = ()
    args: Sequence[str] = ()
    sanitized: bool = False
    needs_cute: bool = False


_TILE = CPP / "test_dwconv_tile_math.cpp"
_BLOCK = CPP / "test_block_tile_math.cpp"
_EMU = CPP / "test_block_cuda_emu.cpp"
_INCEPTION = CPP / "test_inception_slices.cpp"
_WARN = ["-Wall", "-Wextra"]
_INC = ["-I", str(ROOT / "csrc" / "include")]

# The sanitized runs use each program's reduced sweep (--quick; every hand-picked shape is
# kept) so that ASan's slowdown stays affordable.
PROGRAMS: Dict[str, Program] = {
    "dwconv_tile_math": Program([_TILE], _WARN),
    "dwconv_tile_math_sanitized": Program([_TILE], SANITIZE, ["--quick"], sanitized=True),
    "block_tile_math": Program([_BLOCK], _WARN),
    "block_tile_math_sanitized": Program([_BLOCK], SANITIZE, ["--quick"], sanitized=True),
    "block_fragments_cute": Program([_BLOCK], ["-DFV_TEST_WITH_CUTE", "-Wno-deprecated-declarations"],
                                    ["--quick"], needs_cute=True),
    "block_cuda_emu": Program([_EMU, TENSOR_CPP], [*_WARN, *EMU_FLAGS]),
    # -O1 (not the emulation's -O2) under the sanitizers
    "block_cuda_emu_sanitized": Program([_EMU, TENSOR_CPP], [*SANITIZE, *[f for f in EMU_FLAGS if f != "-O2"]],
                                        ["--quick"], sanitized=True),
    "inception_slices": Program([_INCEPTION, TENSOR_CPP], [*_WARN, *_INC]),
    "inception_slices_sanitized": Program([_INCEPTION, TENSOR_CPP], [*_WARN, *_INC, *SANITIZE], sanitized=True),
}

# Longest first, so the two workers finish together (measured: the emulation programs take
# 1-2.5 minutes each, the others well under a minute).
_ORDER = ["block_cuda_emu_sanitized", "block_cuda_emu", "dwconv_tile_math_sanitized", "block_tile_math_sanitized",
          "dwconv_tile_math", "block_tile_math", "inception_slices_sanitized", "inception_slices",
          "block_fragments_cute"]
assert sorted(_ORDER) == sorted(PROGRAMS)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclasses.dataclass
class Outcome:
    name: str
    skipped: Optional[str] = None  # reason, when the program could not be built here
    build_error: Optional[str] = None
    returncode: int = 0
    stdout: str = ""
    stderr: str = ""


class _Runner:
    def __init__(self) -> None:
        self._lock = threading.RLock()  # result() holds it while the sanitizer probe compiles
        self._futures: Dict[str, Future] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self._tmp = Path(tempfile.mkdtemp(prefix="fastvis-cpp-"))
        self._sanitizers = False
        self.wanted: Optional[List[str]] = None  # the collected tests' programs (conftest)
        self._procs: set = set()
        self._closed = False
        atexit.register(shutil.rmtree, self._tmp, True)

    def _spawn(self, cmd: List[str], timeout: int, env=None) -> subprocess.CompletedProcess:
        """subprocess.run, but tracked, so shutdown() can stop what is still running."""
        with self._lock:
            if self._closed:
                return subprocess.CompletedProcess(cmd, -1, "", "not run: the test session ended")
            # Own process group: stopping it stops the compiler's own children too (cc1plus).
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    start_new_session=True)
            self._procs.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            err += f"\n(killed after {timeout} s)"
        finally:
            with self._lock:
                self._procs.discard(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def shutdown(self) -> None:
        """End of the session: drop the programs not started, stop the running ones."""
        with self._lock:
            self._closed = True
            procs = list(self._procs)
            pool = self._pool
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            _kill_group(proc)

    def _compile(self, cxx: str, sources: Iterable[Path], flags: Sequence[str], exe: Path):
        cmd = [cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), *flags, *map(str, sources), "-o", str(exe)]
        return self._spawn(cmd, timeout=900)

    def _sanitizers_work(self, cxx: str) -> bool:
        probe = self._tmp / "probe.cpp"
        probe.write_text("#include <vector>\nint main() { std::vector<int> v(3, 1); return v[1] - 1; }\n")
        exe = self._tmp / "probe"
        if self._compile(cxx, [probe], SANITIZE, exe).returncode != 0:
            return False
        try:
            return subprocess.run([str(exe)], capture_output=True, timeout=60, env=run_env()).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _job(self, name: str) -> Outcome:
        prog = PROGRAMS[name]
        cxx = compiler()
        if cxx is None:
            return Outcome(name, skipped="no C++ compiler (c++/g++/clang++) on PATH")
        flags = list(prog.flags)
        if prog.needs_cute:
            cute = cute_include_flags()
            if cute is None:
                return Outcome(name, skipped="CUTLASS/CuTe or CUDA headers not found "
                                             "(pip install --no-deps nvidia-cutlass)")
            flags += cute
        if prog.sanitized and not self._sanitizers:
            return Outcome(name, skipped="the C++ compiler cannot build and run AddressSanitizer/UBSan "
                                         "programs here")
        exe = self._tmp / name
        built = self._compile(cxx, prog.sources, flags, exe)
        if built.returncode != 0:
            return Outcome(name, build_error=built.stderr[-6000:])
        run = self._spawn([str(exe), *prog.args], timeout=1800, env=run_env())
        return Outcome(name, returncode=run.returncode, stdout=run.stdout, stderr=run.stderr)

    def result(self, name: str) -> Outcome:
        if name not in PROGRAMS:
            raise KeyError(f"unknown host test program {name!r}; known: {sorted(PROGRAMS)}")
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastvis-cpp")
                cxx = compiler()
                self._sanitizers = bool(cxx) and self._sanitizers_work(cxx)
                wanted = set(self.wanted if self.wanted is not None else PROGRAMS) | {name}
                for n in _ORDER:
                    if n in wanted:
                        self._futures[n] = self._pool.submit(self._job, n)
            if name not in self._futures:
                self._futures[name] = self._pool.submit(self._job, name)
        return self._futures[name].result()


RUNNER = _Runner()


def result(name: str) -> Outcome:
    """The outcome of building and running host program ``name`` (blocks until it is done)."""
    return RUNNER.result(name)


def check(name: str) -> str:
    """Skip if ``name`` cannot be built here, fail on a build error, a non-zero exit, a
    failed case or a sanitizer report; return the program's stdout."""
    out = result(name)
    if out.skipped:
        pytest.skip(out.skipped)
    assert out.build_error is None, f"compiling {name} failed:\n{out.build_error}"
    report = f"stdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-6000:]}"
    assert out.returncode == 0, f"{name} failed (exit {out.returncode})\n{report}"
    # The summary line: "<k> passed, 0 failed" or "<k> cases, <m> checks, 0 failed", k > 0
    # (a program that checked nothing does not pass).
    assert re.search(r"(?m)\b[1-9]\d* (passed|cases), (\d+ checks, )?0 failed\b", out.stdout), report
    assert "runtime error" not in out.stderr, report
    assert "ERROR: AddressSanitizer" not in out.stderr, report
    return out.stdout
