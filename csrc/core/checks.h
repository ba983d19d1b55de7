// Internal: argument checks shared by every op family.
#pragma once
#include "fastvis/tensor.h"

namespace fastvis {
namespace core {

// t must live on the CPU and have a dtype the CPU kernels serve (float32, float64, bfloat16).
void check_cpu(const TensorView& t, const char* name);
// The dense layouts a logical (N, C, H, W) tensor has: bit 0 NCHW, bit 1 NHWC (both for
// tensors with C == 1 or H == W == 1; none for other strides or ndim != 4).
int dense_layouts(const TensorView& t);

}  // namespace core
}  // namespace fastvis
