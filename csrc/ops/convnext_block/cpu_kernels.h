// Internal: the CPU kernels of the fused ConvNeXt block (NHWC), compiled once per
// instruction set like every cpu_kernels.cpp.
//
// Tiles are runs of `rt` consecutive rows of the N*H image rows (a tile may span two
// images; each image's part is convolved from that image's rows). A tile of P = rt*W
// pixels goes through dwconv (the depthwise family's tile kernel), LayerNorm (the
// LayerNorm family's row kernel), fc1 / fc2 (BLAS GEMMs on the tile) and GELU, in
// per-thread buffers, and only the block output is written.
#pragma once
#include <algorithm>
#include <cstdint>

#include "fastvis/tensor.h"
#include "ops/depthwise_conv/cpu_kernels.h"

namespace fastvis {
namespace cnblock {

// The token mixer in front of the MLP. Dwconv: one depthwise k x k conv over all C
// channels (ConvNeXt). Inception (InceptionNeXt's MetaNeXt block, forward only): channels
// [0, cid) pass through, then three depthwise branches of g channels each: ks x ks,
// 1 x kb and kb x 1, all at dilation `dil` with "same" padding. Identity: no mixer, the
// tile is x itself (the MLP op, fastvis/mlp.h: no norm, no residual).
struct Mixer {
  enum Kind { Dwconv = 0, Inception = 1, Identity = 2 } kind = Dwconv;
  int64_t cid = 0, g = 0, ks = 0, kb = 0, dil = 1;
  int64_t cpg = 0;  // channel stride of a branch's packed weights (g rounded up to a block)
};

struct Shape {
  int64_t n, c, h, w, k, hidden;
  int64_t cp;  // channel stride of the packed depthwise weights
  Mixer mix{};
};

// An inception branch b (0: ks x ks, 1: 1 x kb, 2: kb x 1): kernel rows/cols and the
// channel offset of its g channels.
inline void inception_branch(const Mixer& m, int b, int64_t& kh, int64_t& kw, int64_t& off) {
  kh = b == 1 ? 1 : (b == 0 ? m.ks : m.kb);
  kw = b == 2 ? 1 : (b == 0 ? m.ks : m.kb);
  off = m.cid + b * m.g;
}

struct Plan {
  int64_t rt;           // image rows per tile
  int64_t ntiles;       // ceil(N*H / rt)
  int64_t P;            // pixels of a full tile (rt * W)
  int64_t dw_elems;     // the depthwise tile kernel's buffer (accumulators)
  int64_t fwd_elems;    // per-thread forward buffers
  int64_t bwd_elems;    // per-thread backward buffers
  int64_t chunks;       // backward: partial-sum chunks (contiguous runs of tiles)
  bool split_gemm;      // one tile: each GEMM is split over the pool (core::gemm_split)
  int64_t partial_elems;  // stride between chunks' partials (partial_layout().total rounded up)
  // Inception mixer: the per-thread buffer (dw_elems) holds a dense input slice of one
  // branch's g channels, the branch's dense output, then the depthwise tile buffer.
  int64_t inc_slice_elems = 0, inc_out_elems = 0;
};

// The plan depends on the shape (and, for batch-1 images of 128..255 pixels, on whether
// the float GEMM is OpenBLAS), not on the thread count, so tiling, GEMM sizes and
// reduction order, hence results, are the same for any number of threads.
Plan plan(const Shape& s, int64_t acc_bytes);

// Parameters in the accumulation type A (float, or double for float64 activations).
// Absent optional parameters are packed as their neutral values (zeros/ones).
struct Packed {
  const void* dw;     // [k][k][cp]
  const void* dwb;    // [cp]
  const void* nw;     // [C]
  const void* nb;     // [C]
  const void* w1;     // [hidden][C] (null in a forward given w1t)
  // fc1's weight stored k-major, [C][hidden], or null: as w2t, for fc1's product without a
  // transposed weight (the core's own gemm(N, N), core/blas.h).
  const void* w1t = nullptr;
  const void* b1;     // [hidden]
  const void* w2;     // [C][hidden] (null in a forward given w2t)
  // fc2's weight stored k-major, [hidden][C] (a (C, hidden) tensor with strides (1, C)),
  // or null: the forward's fc2 then multiplies without transposing the weight, which MKL
  // and OpenBLAS run faster than the transposed product at the tiles' row counts.
  const void* w2t = nullptr;
  const void* b2;     // [C]
  const void* gamma;  // [C]
  const void* ds;     // [N]
  // GRN (all null without it): z = g * grn_f[n] + grn_b, grn_f[n][j] = 1 + w_j Nx[n][j];
  // backward: dg = dz * grn_f[n] + grn_u[n] * g (grn_u: d(loss)/dG / G, per image).
  const void* grn_f;  // [N][hidden]
  const void* grn_b;  // [hidden]
  const void* grn_u;  // [N][hidden]
  // Inception mixer (Shape::mix.kind == Inception): per branch [kh][kw][cpg] and [cpg].
  const void* mw[3];
  const void* mb[3];
  double eps;
  bool tanh;
  bool norm;  // LayerNorm between the mixer and fc1 (false: none; any affine is in fc1)
  // false: y = ds * gamma * (o + b2), x is not added (the MLP op); true: the residual block.
  bool residual = true;
  // Squeeze-and-excitation (UniRepLKNet): the mixer(+norm) output is scaled per image and
  // channel, z *= se_scale[n][c], before fc1 (null: no SE). Filled by the caller from the
  // se_stats pass.
  const void* se_scale;  // [N][C]
  // GRN forward (else null): the hidden activations g of every pixel, [N*H*W][hidden],
  // written by the statistics pass and read (GRN applied in place) by the output pass,
  // which then skips the mixer, SE and fc1. Null: the output pass recomputes them.
  void* hidden = nullptr;
  // GRN backward (else null): the statistics pass's fc1 pre-activations a (biased) and
  // GRN-output gradients dz = do W2 of every pixel, [N*H*W][hidden] each, read by the
  // gradient pass instead of recomputing them (one GEMM fewer per tile each; same bits).
  void* grn_a = nullptr;
  void* grn_dz = nullptr;
};

// Backward outputs of phase A (the tiles): D = d(loss)/d(dwconv output), NHWC in the
// activation dtype, and the per-chunk parameter partials (plan.chunks x partial_elems).
#define FV_CNBLOCK_KERNEL_DECLS                                                               \
  void forward(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const void* x,     \
               void* y, void* bufs, int nbufs);                                               \
  /* d: null when no gradient of the mixer output is wanted (the fc1 input-gradient */      \
  /* GEMM is then skipped; blocks with a LayerNorm always need it). */                        \
  /* w1_0 / w2_0: where run 0 writes its fc1 / fc2 weight-gradient sums (hidden x C and */ \
  /* C x hidden accumulators, dense) instead of its partial slots; null: the slots. */         \
  void backward_tiles(DType dt, const Shape& s, const Plan& pl, const Packed& pk,             \
                      const void* x, const void* gy, void* d, void* partials, void* w1_0,     \
                      void* w2_0, void* bufs, int nbufs, bool need_gamma);                    \
  /* GRN statistics, per image row r (global n*H + r): rowsq[r][j] = sum over the row's */  \
  /* pixels of g^2 (g = GELU(fc1(...))). */                                                  \
  void grn_forward_stats(DType dt, const Shape& s, const Plan& pl, const Packed& pk,         \
                         const void* x, void* rowsq, void* bufs, int nbufs);                 \
  /* rowt[r][j] = sum over the row of dz * g, rowdb[r][j] = sum of dz, with dz the */        \
  /* gradient at GRN's output (pk.grn_f must be set). */                                     \
  void grn_backward_stats(DType dt, const Shape& s, const Plan& pl, const Packed& pk,        \
                          const void* x, const void* gy, void* rowt, void* rowdb,            \
                          void* bufs, int nbufs);                                            \
  /* SE statistics, per image row r: rowsum[r][c] = sum over the row's pixels of the */     \
  /* mixer(+norm) output. */                                                                 \
  void se_stats(DType dt, const Shape& s, const Plan& pl, const Packed& pk, const void* x,   \
                void* rowsum, void* bufs, int nbufs);

namespace generic {
FV_CNBLOCK_KERNEL_DECLS
}
namespace avx2 {
FV_CNBLOCK_KERNEL_DECLS
}
namespace avx512 {
FV_CNBLOCK_KERNEL_DECLS
}

// Offsets inside one chunk's partial sums.
struct PartialLayout {
  int64_t w1, w2, b1, b2, nw, nb, gamma, total;
};
inline PartialLayout partial_layout(const Shape& s) {
  PartialLayout l;
  const int64_t hc = s.hidden * s.c;
  l.w1 = 0;
  l.w2 = hc;
  l.b1 = 2 * hc;
  l.b2 = l.b1 + s.hidden;
  l.nw = l.b2 + s.c;
  l.nb = l.nw + s.c;
  l.gamma = l.nb + s.c;
  l.total = l.gamma + s.c;
  return l;
}

// The depthwise problem of output rows [r0, r1) of one image for a "same"-padded kernel
// kh x kw at dilation dil over c channels: input rows [s0, s1) with the top padding that
// lines them up. x of that image starts at row s0.
inline dwconv::Geom same_tile_geom(int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                                   int64_t dil, int64_t cp, int64_t r0, int64_t r1,
                                   int64_t& s0) {
  const int64_t ph = (kh - 1) * dil / 2, pw = (kw - 1) * dil / 2;
  s0 = std::max<int64_t>(0, r0 - ph);
  const int64_t s1 = std::min<int64_t>(h, r1 + ph);
  return dwconv::Geom{1, c, s1 - s0, w, kh, kw, r1 - r0, w, 1, 1, ph - (r0 - s0), pw, dil, dil,
                      cp};
}
inline dwconv::Geom tile_geom(const Shape& s, int64_t r0, int64_t r1, int64_t& s0) {
  return same_tile_geom(s.c, s.h, s.w, s.k, s.k, 1, s.cp, r0, r1, s0);
}

}  // namespace cnblock
}  // namespace fastvis
