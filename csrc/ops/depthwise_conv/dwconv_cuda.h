// Internal: the CUDA entry points of the depthwise-conv family. Called by
// depthwise_conv.cpp after validation; only compiled when FASTVIS_WITH_CUDA.
// All tensors are CUDA tensors on one device, validated, with the layouts in `s`.
#pragma once
#include <cstddef>

#include "fastvis/depthwise_conv.h"

namespace fastvis {
namespace dwconv {
namespace cuda {

void forward(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& y,
             const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p, void* stream);
void backward_input(const TensorView& gy, const TensorView& w, const TensorView& gx,
                    const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p, void* stream);
size_t backward_weight_scratch_bytes(const DepthwiseConv2dShape& s, const DepthwiseConv2dParams& p);
void backward_weight(const TensorView& gy, const TensorView& x, const TensorView& gw,
                     const TensorView* gb, const DepthwiseConv2dShape& s,
                     const DepthwiseConv2dParams& p, void* scratch, size_t scratch_bytes,
                     void* stream);

}  // namespace cuda
}  // namespace dwconv
}  // namespace fastvis
