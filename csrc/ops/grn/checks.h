// Internal: argument checks shared by the global_response_norm entry points and references.
#pragma once
#include <cstdint>

#include "fastvis/grn.h"

namespace fastvis {
namespace grn {

// t must be an activation of x's shape, dtype and device.
void check_activation(const TensorView& t, const TensorView& x, const GrnShape& s,
                      const char* name);
// t must be a 1-D tensor of s.c elements with x's dtype and device.
void check_channel_vector(const TensorView& t, const TensorView& x, const GrnShape& s,
                          const char* name);
// t must be a dense row-major (N, C) tensor of the statistics dtype on x's device.
void check_norm(const TensorView& t, const TensorView& x, const GrnShape& s, const char* name);
// The layout all the given activations are dense in, NHWC preferred; throws if none.
Layout common_layout(const TensorView* const* ts, int count);

}  // namespace grn
}  // namespace fastvis
