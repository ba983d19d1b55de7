// Internal: argument checks shared by the layer_norm_channels entry points and references.
#pragma once
#include <cstdint>

#include "fastvis/layer_norm.h"

namespace fastvis {
namespace layernorm {

// t must be an activation of x's shape, dtype and device, dense in a layout x has.
void check_activation(const TensorView& t, const TensorView& x, const LayerNormShape& s,
                      const char* name);
// t must be a 1-D tensor of s.c elements with x's dtype and device.
void check_channel_vector(const TensorView& t, const TensorView& x, const LayerNormShape& s,
                          const char* name);
// t must be a dense row-major (N, H, W) tensor of the statistics dtype on x's device.
void check_stats(const TensorView& t, const TensorView& x, const LayerNormShape& s,
                 const char* name);
// The layout all the given activations are dense in, NHWC preferred; throws if none.
Layout common_layout(const TensorView* const* ts, int count);

}  // namespace layernorm
}  // namespace fastvis
