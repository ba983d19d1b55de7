// fastvis: the fused ConvNeXt block (op family 3).
//
//     y = x + drop_scale[n] * gamma * fc2(GRN?(GELU(fc1(LayerNorm_C(dwconv_kxk(x))))))
//
// on a logical (N, C, H, W) activation stored channels-last (NHWC). dwconv: depthwise
// k x k, k odd (1..31), stride 1, "same" zero padding, optional bias. LayerNorm over
// channels (biased variance, eps inside the square root), optional affine. fc1: hidden x C
// (nn.Linear layout) + optional bias; fc2: C x hidden + optional bias. GELU exact (erf)
// or the tanh approximation. gamma (C) and drop_scale (N) optional. With grn_weight and
// grn_bias (hidden), the ConvNeXt-V2 Global Response Normalization of the hidden
// activations h (per image): G_j = ||h_:j||_2 over the pixels, Nx_j = G_j / (mean_k G_k +
// grn_eps), GRN(h) = h + grn_bias + grn_weight * h * Nx.
//
// Inference-only variants (forward; the backward refuses them, and so does CUDA): without
// the LayerNorm (params.layer_norm = false) and with a squeeze-and-excitation step before
// fc1 (se_* weights; an extra statistics pass over the tiles for the channel means). With
// these the op also runs UniRepLKNet's block in its eval/deploy form (BatchNorms folded).
//
// GRN needs a reduction over the whole image between fc1 and fc2, so those blocks take
// more passes over the tiles, each recomputing the block from x (nothing is stored):
// forward = statistics pass + output pass; backward = statistics pass, a pass for the
// reductions GRN's gradient needs (sum over pixels of dGRN_out * h), and the gradient pass.
//
// CPU: the block runs tile by tile over rows of the image: each tile is convolved
// from the input rows it needs, normalised, sent through fc1 -> GELU -> fc2 (OpenBLAS
// GEMMs on the tile) and written out with the residual; the hidden activations never
// leave the cache. The backward pass recomputes the block from x tile by tile (nothing
// but x is saved) and reduces every parameter gradient in a fixed, shape-determined
// order (bit-identical for any thread count).
//
// float32, float64 and bfloat16 (float32 inside: the tile's intermediates, GEMMs and
// accumulations; parameters may be any of the three, converted once per call).
//
// CUDA (when built with it and the CUTLASS/CuTe headers; see
// ops/convnext_block/cuda/README.md): float16 and bfloat16 only, the GEMMs on tensor cores
// with float32 accumulation (float32 inputs are refused: cast them, e.g. under autocast).
// Same semantics, deterministic reductions; `stream` is a cudaStream_t. Compiled and its
// index arithmetic host-tested, but NOT yet run on a GPU.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fastvis/tensor.h"

namespace fastvis {

// Parameters; pointers may be null where the parameter is optional.
struct ConvNeXtBlockWeights {
  const TensorView* dw_weight = nullptr;    // (C, 1, k, k) required
  const TensorView* dw_bias = nullptr;      // (C)
  const TensorView* norm_weight = nullptr;  // (C)
  const TensorView* norm_bias = nullptr;    // (C)
  const TensorView* fc1_weight = nullptr;   // (hidden, C) required
  const TensorView* fc1_bias = nullptr;     // (hidden)
  const TensorView* fc2_weight = nullptr;   // (C, hidden) required
  const TensorView* fc2_bias = nullptr;     // (C)
  const TensorView* gamma = nullptr;        // (C) layer scale
  const TensorView* drop_scale = nullptr;   // (N) per-sample stochastic-depth factor
  const TensorView* grn_weight = nullptr;   // (hidden) ConvNeXt-V2 GRN, with grn_bias
  const TensorView* grn_bias = nullptr;     // (hidden)
  // Squeeze-and-excitation between the norm and fc1 (UniRepLKNet): with m the per-image
  // channel means of z = LayerNorm?(dwconv(x)), z *= sigmoid(up(relu(down(m)))). down:
  // (Cr, C) + bias (Cr), up: (C, Cr) + bias (C); biases optional. Forward only.
  const TensorView* se_down_weight = nullptr;
  const TensorView* se_down_bias = nullptr;
  const TensorView* se_up_weight = nullptr;
  const TensorView* se_up_bias = nullptr;
};

struct ConvNeXtBlockParams {
  double eps = 1e-6;       // LayerNorm epsilon
  bool gelu_tanh = false;  // the tanh approximation of GELU instead of erf
  double grn_eps = 1e-6;   // GRN epsilon (added to the mean of the norms)
  // false: no LayerNorm (blocks whose norm is an eval-mode BatchNorm fold it into the
  // depthwise conv instead; norm_weight / norm_bias must then be absent). Forward only.
  bool layer_norm = true;
};

// Gradients to compute; null = not wanted. Each has the shape of its parameter (grad_x:
// x's shape, NHWC); parameter gradients must be contiguous.
struct ConvNeXtBlockGrads {
  const TensorView* x = nullptr;
  const TensorView* dw_weight = nullptr;
  const TensorView* dw_bias = nullptr;
  const TensorView* norm_weight = nullptr;
  const TensorView* norm_bias = nullptr;
  const TensorView* fc1_weight = nullptr;
  const TensorView* fc1_bias = nullptr;
  const TensorView* fc2_weight = nullptr;
  const TensorView* fc2_bias = nullptr;
  const TensorView* gamma = nullptr;
  const TensorView* grn_weight = nullptr;
  const TensorView* grn_bias = nullptr;
};

struct ConvNeXtBlockShape {
  int64_t n = 0, c = 0, h = 0, w = 0, k = 0, hidden = 0;
};

// Validates x, the weights and params (throws fastvis::Error) and returns the sizes.
ConvNeXtBlockShape convnext_block_shape(const TensorView& x, const ConvNeXtBlockWeights& w,
                                        const ConvNeXtBlockParams& p);

size_t convnext_block_forward_scratch_bytes(const TensorView& x, const ConvNeXtBlockWeights& w,
                                            const ConvNeXtBlockParams& p);
// grn_stats (CPU, GRN blocks only, optional): GRN's statistics kept from the forward for
// the backward, as in fastvis/mlp.h: per image row the sums over the row's pixels of the
// squared hidden activations, a contiguous [N][H][hidden] tensor in the accumulation type
// (float32; float64 for float64 tensors). The forward writes them; the backward given them
// skips the statistics pass that recomputes them (the mixer, LayerNorm, fc1 and GELU of
// every tile). Bitwise the same results either way.
void convnext_block_forward(const TensorView& x, const ConvNeXtBlockWeights& w,
                            const ConvNeXtBlockParams& p, const TensorView& y, void* scratch,
                            size_t scratch_bytes, void* stream = nullptr,
                            const TensorView* grn_stats = nullptr);

// GRN blocks (here, fastvis/mlp.h) keep per-pixel hidden-sized values between their passes
// over the tiles when these fit in this many bytes of scratch (default 40 MB): the
// forward the statistics pass's activations (the output pass then skips the mixer and
// fc1), the backward the statistics pass's GRN-output gradients and fc1 pre-activations
// (two GEMMs a tile fewer in the gradient pass). Larger values trade scratch for time; 0
// recomputes everything. Results are bitwise the same either way. Process-wide; a scratch
// size queried before a change is stale after it.
void set_grn_store_bytes(size_t bytes);
size_t grn_store_bytes();

size_t convnext_block_backward_scratch_bytes(const TensorView& x, const ConvNeXtBlockWeights& w,
                                             const ConvNeXtBlockParams& p);
void convnext_block_backward(const TensorView& grad_y, const TensorView& x,
                             const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& p,
                             const ConvNeXtBlockGrads& grads, void* scratch,
                             size_t scratch_bytes, void* stream = nullptr,
                             const TensorView* grn_stats = nullptr);

}  // namespace fastvis
