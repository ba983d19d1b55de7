"""Host test of the Inception op's CUDA dispatch arithmetic (no GPU needed).

tests/cpp/test_inception_slices.cpp replays the CUDA path of
csrc/ops/inception_dwconv/cuda/inception_dwconv.cu on the host (depthwise convolutions
addressed only through the channel-slice views' strides, the identity channels through a
cudaMemcpy2D emulation, all from ops/inception_dwconv/slices.h) and compares with the
Inception convolution from logical indices, both layouts, 300 shapes. It is built with the
system C++ compiler and run once plainly and once under AddressSanitizer + UBSan, in the
background by tests/cpp_harness.py.
"""
import pytest

from cpp_harness import check


@pytest.mark.cpp_program("inception_slices")
def test_inception_cuda_dispatch_arithmetic():
    check("inception_slices")


@pytest.mark.cpp_program("inception_slices_sanitized")
def test_inception_cuda_dispatch_arithmetic_sanitized():
    check("inception_slices_sanitized")
