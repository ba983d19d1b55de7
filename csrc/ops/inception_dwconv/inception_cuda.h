// Internal: the CUDA entry points of the Inception depthwise op. Called by
// inception_dwconv.cpp after validation; only compiled when FASTVIS_WITH_CUDA.
#pragma once
#include <cstddef>

#include "fastvis/inception_dwconv.h"

namespace fastvis {
namespace incdw {
namespace cuda {

void forward(const TensorView& x, const InceptionDWConv2dWeights& w,
             const InceptionDWConv2dParams& p, const TensorView& y,
             const InceptionDWConv2dShape& s, void* stream);
size_t backward_scratch_bytes(const InceptionDWConv2dShape& s, const InceptionDWConv2dParams& p);
void backward(const TensorView& grad_y, const TensorView& x, const InceptionDWConv2dWeights& w,
              const InceptionDWConv2dParams& p, const InceptionDWConv2dGrads& grads,
              const InceptionDWConv2dShape& s, void* scratch, size_t scratch_bytes, void* stream);

}  // namespace cuda
}  // namespace incdw
}  // namespace fastvis
