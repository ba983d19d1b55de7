// Internal: the depthwise family's CPU plumbing that other families reuse (the
// Inception depthwise op runs the depthwise kernels on channel slices): scratch
// carving, weight packing, the per-ISA kernel table and the fixed-order reduction of
// the weight-gradient partial sums.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/scratch.h"
#include "fastvis/tensor.h"
#include "ops/depthwise_conv/cpu_kernels.h"

namespace fastvis {
namespace dwconv {

// Scratch carving and accumulator sizes: the core's (core/scratch.h).
using core::acc_size;
using core::align64;
using core::ScratchCarver;

// weight (C, 1, kh, kw) or (C, kh, kw), any strides, storage dtype -> [kh][kw][cp] in the
// accumulation type, zero-filled past C; flip: rotated by 180 degrees (the stride-1
// input gradient).
void pack_weight(const TensorView& w, int64_t c, int64_t kh, int64_t kw, int64_t cp, bool flip,
                 void* out);
// bias (C) -> cp accumulators, zero-filled past C.
void pack_bias(const TensorView& b, int64_t c, int64_t cp, void* out);

// The kernels of the ISA chosen at run time (core/cpu_features).
struct Kernels {
  void (*forward)(DType, const Geom&, const void*, const void*, const void*, void*, void*, int);
  void (*forward_rows)(DType, const Geom&, const void*, const void*, const void*, void*, void*,
                       int64_t, int64_t, int64_t);
  void (*backward_input_gather)(DType, const Geom&, const void*, const void*, void*);
  void (*backward_weight_partials)(DType, const Geom&, const WgradPlan&, const void*, const void*,
                                   void*, void*, int);
};
const Kernels& kernels();

// grad_weight (shape (g.c, 1, kh, kw) or (g.c, kh, kw), any strides) and grad_bias (either
// may be null) from the partial sums of backward_weight_partials: summed over the row chunks in
// chunk order (bit-identical for any thread count), written in their dtypes.
void reduce_weight_partials(DType dt, const Geom& g, const WgradPlan& plan, const void* partial,
                            const TensorView* grad_weight, const TensorView* grad_bias);

}  // namespace dwconv
}  // namespace fastvis
