"""Host tests of the CUDA depthwise-conv tile math (no GPU needed).

tests/cpp/test_dwconv_tile_math.cpp emulates every CUDA kernel of
csrc/ops/depthwise_conv/cuda/dwconv.cu on the host through the same
csrc/ops/depthwise_conv/tile_math.h functions and compares with a naive convolution. It is
built with the system C++ compiler and run once plainly and once under AddressSanitizer +
UndefinedBehaviorSanitizer (the reduced random sweep; all hand-picked shapes are kept), in
the background by tests/cpp_harness.py.
"""
import pytest

from cpp_harness import check


@pytest.mark.cpp_program("dwconv_tile_math")
def test_tile_math_emulation():
    check("dwconv_tile_math")


@pytest.mark.cpp_program("dwconv_tile_math_sanitized")
def test_tile_math_emulation_sanitized():
    check("dwconv_tile_math_sanitized")
