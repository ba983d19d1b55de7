// Internal: argument checks shared by every op family.
#pragma once
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {
namespace core {

// t must live on the CPU and have a dtype the CPU kernels serve (float32, float64, bfloat16).
void check_cpu(const TensorView& t, const char* name);
// The dense layouts a logical (N, C, H, W) tensor has: bit 0 NCHW, bit 1 NHWC (both for
// tensors with C == 1 or H == W == 1; none for other strides or ndim != 4).
int dense_layouts(const TensorView& t);

// The (N, C, H, W) sizes of an activation tensor after the checks every family shares:
// 4-D, floating point, no negative size, at least one channel, each size below 2^31.
struct NchwDims {
  int64_t n, c, h, w;
};
NchwDims activation_dims(const TensorView& x, const char* name);

// The layout all `count` activations are dense in, NHWC preferred (NHWC when all are
// empty: nothing is read or written); throws naming `op` when they share none.
Layout common_dense_layout(const TensorView* const* ts, int count, const char* op);

// t must be an (n, c, h, w) tensor of x's dtype and device, with data unless empty: an
// output or gradient on the grid of an op's input x (layouts are each op's own check).
void check_activation_like(const TensorView& t, const TensorView& x, int64_t n, int64_t c,
                           int64_t h, int64_t w, const char* name);

// t must be a dense row-major tensor of shape want[0..ndim), dtype `dtype`, on x's device,
// with data. `what` says what it holds, for the message (e.g. "one value per pixel").
void check_row_major(const TensorView& t, const TensorView& x, const int64_t* want, int ndim,
                     DType dtype, const char* name, const char* what);

}  // namespace core
}  // namespace fastvis
