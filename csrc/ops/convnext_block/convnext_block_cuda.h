// Internal: the CUDA entry points of the fused ConvNeXt block (cuda/convnext_block.cu).
// Called by convnext_block.cpp for CUDA tensors; only compiled when FASTVIS_WITH_CUDA.
// These functions validate their arguments themselves (CUDA devices, float16/bfloat16
// activations) and throw fastvis::Error like the CPU entry points.
//
// COMPILED, NEVER RUN: no machine of this project has a GPU (see cuda/README.md).
#pragma once
#include <cstddef>

#include "fastvis/convnext_block.h"

namespace fastvis {
namespace cnblock {
namespace cuda {

size_t forward_scratch_bytes(const TensorView& x, const ConvNeXtBlockWeights& w,
                             const ConvNeXtBlockParams& p);
void forward(const TensorView& x, const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& p,
             const TensorView& y, void* scratch, size_t scratch_bytes, void* stream);
size_t backward_scratch_bytes(const TensorView& x, const ConvNeXtBlockWeights& w,
                              const ConvNeXtBlockParams& p);
void backward(const TensorView& grad_y, const TensorView& x, const ConvNeXtBlockWeights& w,
              const ConvNeXtBlockParams& p, const ConvNeXtBlockGrads& g, void* scratch,
              size_t scratch_bytes, void* stream);

}  // namespace cuda
}  // namespace cnblock
}  // namespace fastvis
