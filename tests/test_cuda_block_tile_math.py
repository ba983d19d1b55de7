"""Host tests of the CUDA fused ConvNeXt block (no GPU needed).

* tests/cpp/test_block_tile_math.cpp replays every index formula of
  csrc/ops/convnext_block/block_tile_math.h over many odd shapes (coverage of pixels,
  halos, outputs, shared-memory regions, K/N chunks, MMA fragments, grids, partial sums,
  scratch) and emulates the kernels' data flow against a float64 reference of the block;
  it runs plainly, under AddressSanitizer + UndefinedBehaviorSanitizer, and (when the
  CUTLASS/CuTe and CUDA headers are installed) with the MMA fragment maps cross-checked
  against CuTe's own MMA_Traits layouts.
* tests/cpp/test_block_cuda_emu.cpp compiles the kernels' own source
  (csrc/ops/convnext_block/cuda/convnext_block_kernels.cuh) with the host compiler over an
  emulation of the CUDA built-ins it uses (tests/cpp/cuda_host_emu.h: fibers as threads,
  barriers with deadlock detection, warp shuffles, the tensor-core MMA atoms, exact
  float16/bfloat16 rounding) and compares forward, D and the parameter gradients with the
  float64 reference; plainly (every shape in fp16 and bf16) and under ASan + UBSan (the
  first three shapes, one dtype each: the two 2-byte types take the same memory accesses).
  ASan prints a notice about makecontext/swapcontext (the emulated threads); it reports no
  error on these runs.

The programs are built and run in the background by tests/cpp_harness.py.
"""
import pytest

from cpp_harness import check


@pytest.mark.cpp_program("block_tile_math")
def test_block_tile_math():
    check("block_tile_math")


@pytest.mark.cpp_program("block_tile_math_sanitized")
def test_block_tile_math_sanitized():
    check("block_tile_math_sanitized")


@pytest.mark.cpp_program("block_fragments_cute")
def test_block_fragments_match_cute():
    check("block_fragments_cute")


@pytest.mark.cpp_program("block_cuda_emu")
def test_kernel_source_on_emulated_cuda():
    check("block_cuda_emu")


@pytest.mark.cpp_program("block_cuda_emu_sanitized")
def test_kernel_source_on_emulated_cuda_sanitized():
    check("block_cuda_emu_sanitized")
