// fastvis: the CUDA backend of the fused ConvNeXt block (forward and backward), float16
// and bfloat16 activations, float32 accumulation, the GEMMs on tensor cores (mma.sync
// m16n8k16 through CuTe's SM80_16x8x16_F32{F16F16,BF16BF16}F32_TN atoms). This file: the
// argument checks, the plan, the CUDA launcher, the depthwise backward on D (through the
// depthwise family) and the entry points of ../convnext_block_cuda.h. The kernels and the
// launch sequences are in convnext_block_kernels.cuh; all index, tile, fragment and
// shared-memory arithmetic in ../block_tile_math.h. See README.md beside this file.
//
// COMPILED, NEVER RUN ON A GPU: no machine of this project has one. The kernels compile
// for sm_80 and sm_90, their index math is tested on the host and their source runs on
// the host over emulated CUDA built-ins (tests/cpp/test_block_cuda_emu.cpp), but they have
// not executed on a device; tests/test_cuda_convnext_block.py is the first thing to run
// on a machine with one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "core/checks.h"
#include "fastvis/depthwise_conv.h"
#include "fastvis/error.h"
#include "ops/convnext_block/block_tile_math.h"
#include "ops/convnext_block/convnext_block_cuda.h"
#include "ops/depthwise_conv/dwconv_cuda.h"

#if defined(FASTVIS_WITH_CUTLASS)
#include <cute/arch/mma_sm80.hpp>

#include "ops/convnext_block/cuda/convnext_block_kernels.cuh"
#endif

#define FV_CNB_CUDA_CHECK(expr)                                                               \
  do {                                                                                        \
    const cudaError_t fv_err_ = (expr);                                                       \
    FV_CHECK_RUNTIME(fv_err_ == cudaSuccess, "fastvis convnext_block (CUDA): ", #expr,        \
                     " failed: ", cudaGetErrorName(fv_err_), ": ", cudaGetErrorString(fv_err_)); \
  } while (0)

namespace fastvis {
namespace cnblock {
namespace cuda {
namespace {

namespace tl = ::fastvis::cnblock::tiles;

// ------------------------------------------------------------------ host-side checks
bool is_nhwc(const TensorView& t) { return (core::dense_layouts(t) & 2) != 0; }

void check_on(const TensorView& t, const TensorView& x, const char* name) {
  FV_CHECK_VALUE(t.device == x.device, "convnext_block: ", name, " is on ", device_name(t.device),
                 " but x is on ", device_name(x.device), "; all tensors must be on the same device");
  FV_CHECK_VALUE(t.data != nullptr || t.numel() == 0, name, ": null data pointer");
}

void check_param(const TensorView* t, const TensorView& x, std::initializer_list<int64_t> shape,
                 const char* name, bool required) {
  if (!t) {
    FV_CHECK_TYPE(!required, name, ": required, got none");
    return;
  }
  check_on(*t, x, name);
  FV_CHECK_TYPE(t->dtype == x.dtype, name, ": expected dtype ", dtype_name(x.dtype),
                " (the input's), got ", dtype_name(t->dtype));
  bool ok = t->ndim == static_cast<int>(shape.size());
  int d = 0;
  for (int64_t v : shape) ok = ok && t->shape[d++] == v;
  if (!ok) {
    std::string want = "[";
    d = 0;
    for (int64_t v : shape) want += (d++ ? ", " : "") + std::to_string(v);
    detail::throw_error(ErrorKind::Value, name, ": expected shape ", want, "], got ", t->describe());
  }
}

// The CUDA counterpart of convnext_block_shape (same rules; CUDA tensors, float16 or
// bfloat16 activations: the GEMMs run on tensor cores with float32 accumulation, and
// float32 inputs are refused rather than silently computed at lower precision).
tl::Shape validate(const TensorView& x, const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& p) {
  const core::NchwDims d = core::activation_dims(x, "x");
  FV_CHECK_VALUE(x.device.type == DeviceType::CUDA, "x: expected a CUDA tensor, got ", x.describe());
  FV_CHECK_TYPE(x.dtype == DType::Float16 || x.dtype == DType::BFloat16,
                "x: the fused ConvNeXt block on CUDA supports float16 and bfloat16 (tensor-core "
                "GEMMs with float32 accumulation), got ", dtype_name(x.dtype),
                "; cast to float16/bfloat16 (e.g. under torch.autocast) or run on the CPU");
  FV_CHECK_VALUE(is_nhwc(x), "x: the fused ConvNeXt block needs a channels-last (NHWC) dense "
                 "tensor, got ", x.describe(), " with other strides");
  FV_CHECK_VALUE(x.data != nullptr || x.numel() == 0, "x: null data pointer");
  FV_CHECK_VALUE(std::isfinite(p.eps) && p.eps > 0, "eps: expected a positive finite number, got ",
                 p.eps);
  FV_CHECK_TYPE(w.dw_weight != nullptr, "dw_weight: required, got none");
  FV_CHECK_VALUE(w.dw_weight->ndim == 4, "dw_weight: expected shape [", d.c, ", 1, k, k], got ",
                 w.dw_weight->describe());
  check_param(w.dw_weight, x, {d.c, 1, w.dw_weight->shape[2], w.dw_weight->shape[3]}, "dw_weight",
              true);
  const int64_t k = w.dw_weight->shape[2];
  FV_CHECK_VALUE(k == w.dw_weight->shape[3] && k % 2 == 1 && k >= 1 && k <= tl::kMaxK,
                 "dw_weight: expected a square odd kernel of size 1..31, got ", k, "x",
                 w.dw_weight->shape[3]);
  FV_CHECK_TYPE(w.fc1_weight != nullptr, "fc1_weight: required, got none");
  FV_CHECK_VALUE(w.fc1_weight->ndim == 2 && w.fc1_weight->shape[1] == d.c &&
                     w.fc1_weight->shape[0] >= 1,
                 "fc1_weight: expected shape [hidden, ", d.c, "], got ", w.fc1_weight->describe());
  const int64_t hidden = w.fc1_weight->shape[0];
  check_param(w.fc1_weight, x, {hidden, d.c}, "fc1_weight", true);
  check_param(w.fc2_weight, x, {d.c, hidden}, "fc2_weight", true);
  check_param(w.dw_bias, x, {d.c}, "dw_bias", false);
  check_param(w.norm_weight, x, {d.c}, "norm_weight", false);
  check_param(w.norm_bias, x, {d.c}, "norm_bias", false);
  check_param(w.fc1_bias, x, {hidden}, "fc1_bias", false);
  check_param(w.fc2_bias, x, {d.c}, "fc2_bias", false);
  check_param(w.gamma, x, {d.c}, "gamma", false);
  check_param(w.grn_weight, x, {hidden}, "grn_weight", false);
  check_param(w.grn_bias, x, {hidden}, "grn_bias", false);
  FV_CHECK_VALUE((w.grn_weight == nullptr) == (w.grn_bias == nullptr),
                 "grn_weight and grn_bias: give both (ConvNeXt-V2 GRN) or neither");
  FV_CHECK_VALUE(std::isfinite(p.grn_eps) && p.grn_eps > 0,
                 "grn_eps: expected a positive finite number, got ", p.grn_eps);
  if (w.drop_scale) {
    check_on(*w.drop_scale, x, "drop_scale");
    FV_CHECK_TYPE(w.drop_scale->dtype == DType::Float32 || w.drop_scale->dtype == DType::Float64 ||
                      w.drop_scale->dtype == DType::Float16 ||
                      w.drop_scale->dtype == DType::BFloat16,
                  "drop_scale: expected a floating-point tensor, got ",
                  dtype_name(w.drop_scale->dtype));
    FV_CHECK_VALUE(w.drop_scale->ndim == 1 && w.drop_scale->shape[0] == d.n,
                   "drop_scale: expected shape [", d.n, "] (one factor per sample), got ",
                   w.drop_scale->describe());
  }
  // Index limits of the kernels (tile and slot arithmetic in 32 bits, packed weights
  // addressed in 32 bits per row).
  FV_CHECK_VALUE(d.h < (int64_t(1) << 30) && d.w < (int64_t(1) << 30) && d.c < (int64_t(1) << 24) &&
                     hidden < (int64_t(1) << 24) &&
                     tl::padded_c(d.c) * tl::padded_h(hidden) < (int64_t(1) << 31),
                 "convnext_block (CUDA): shape too large (C = ", d.c, ", hidden = ", hidden,
                 ", H x W = ", d.h, " x ", d.w, ")");
  return tl::Shape{d.n, d.c, d.h, d.w, k, hidden};
}

tl::Plan plan_of(const tl::Shape& s) {
  bool ok = false;
  const tl::Plan p = tl::make_plan(s, &ok);
  FV_CHECK_RUNTIME(ok, "convnext_block (CUDA): no shared-memory layout fits ", tl::kSmemBudget,
                   " bytes for C = ", s.c, ", hidden = ", s.hidden, ", k = ", s.k);
  FV_CHECK_VALUE(p.tg.ntiles <= int64_t(INT_MAX),
                 "convnext_block (CUDA): too many tiles (", p.tg.ntiles, ")");
  return p;
}

DepthwiseConv2dShape dw_shape(const tl::Shape& s) {
  DepthwiseConv2dShape d;
  d.n = s.n;
  d.c = s.c;
  d.h = s.h;
  d.w = s.w;
  d.kh = d.kw = s.k;
  d.oh = s.h;
  d.ow = s.w;
  d.layout = Layout::NHWC;
  return d;
}
DepthwiseConv2dParams dw_params(int64_t k) {
  DepthwiseConv2dParams dp;
  dp.pad_top = dp.pad_bottom = dp.pad_left = dp.pad_right = k / 2;
  return dp;
}

// Makes `dev` current for the scope of a call.
class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    FV_CNB_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != dev) {
      FV_CNB_CUDA_CHECK(cudaSetDevice(dev));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

size_t dw_wgrad_scratch(const tl::Shape& s) {
  return dwconv::cuda::backward_weight_scratch_bytes(dw_shape(s), dw_params(s.k));
}

#if defined(FASTVIS_WITH_CUTLASS)

// Runs a kernel on the call's stream (opting in to more than 48 KB of shared memory).
struct CudaLaunch {
  cudaStream_t stream;
  template <class Kernel, class Args>
  void operator()(Kernel kernel, dim3 grid, size_t smem, const Args& args) const {
    if (grid.x == 0 || grid.y == 0) return;
    if (smem > 48 * 1024) {
      int dev = 0, optin = 0;
      FV_CNB_CUDA_CHECK(cudaGetDevice(&dev));
      FV_CNB_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
      FV_CHECK_RUNTIME(size_t(optin) >= smem, "convnext_block (CUDA): a kernel needs ", smem,
                       " bytes of shared memory per block; this device offers ", optin,
                       " (sm_80 or newer is required)");
      FV_CNB_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    }
    kernel<<<grid, dim3(tl::kThreads), smem, stream>>>(args);
    FV_CNB_CUDA_CHECK(cudaGetLastError());
  }
};

// The backward: the tile kernels up to D, then the depthwise convolution's backward on D
// through the depthwise family's CUDA kernels, and the residual.
template <class Tr>
void backward_all(const CudaLaunch& launch, const tl::Plan& p, const tl::BwdScratch& bs,
                  const tl::Shape& s, const TensorView& gy, const TensorView& x,
                  const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& prm,
                  const ConvNeXtBlockGrads& g, void* base, size_t dw_bytes) {
  uint16_t* d = run_backward<Tr>(launch, p, bs, gy, x, w, prm, g, base);
  const TensorView dv = make_nhwc_view(d, x.dtype, s.n, s.c, s.h, s.w, x.device);
  const DepthwiseConv2dShape dsh = dw_shape(s);
  const DepthwiseConv2dParams dp = dw_params(s.k);
  if (g.dw_weight || g.dw_bias) {
    TensorView tmp;
    const TensorView* gw = g.dw_weight;
    if (!gw) {  // only the bias gradient is wanted: a scratch weight gradient
      tmp = make_view(at<void>(base, bs.gdw_tmp), DType::Float32, {s.c, 1, s.k, s.k}, x.device);
      gw = &tmp;
    }
    dwconv::cuda::backward_weight(dv, x, *gw, g.dw_bias, dsh, dp, at<void>(base, bs.dw_scratch),
                                  dw_bytes, launch.stream);
  }
  if (g.x) {
    dwconv::cuda::backward_input(dv, *w.dw_weight, *g.x, dsh, dp, launch.stream);
    ResidualArgs r{static_cast<uint16_t*>(g.x->data), static_cast<const uint16_t*>(gy.data),
                   s.n * s.h * s.w * s.c};
    launch(cnb_residual<Tr>, dim3(unsigned(grid_for(r.n))), 0, r);
  }
}

#else  // FASTVIS_WITH_CUTLASS

[[noreturn]] void no_cutlass() {
  detail::throw_error(ErrorKind::Runtime,
                      "convnext_block (CUDA): this build of fastvis has a CUDA backend but was "
                      "compiled without the CUTLASS/CuTe headers the fused block needs "
                      "(pip install --no-deps nvidia-cutlass, then rebuild; see "
                      "FASTVIS_CUTLASS_INCLUDE_DIR)");
}

#endif  // FASTVIS_WITH_CUTLASS

void check_scratch(void* scratch, size_t bytes, size_t need) {
  FV_CHECK_VALUE(bytes >= need && (scratch != nullptr || need == 0),
                 "scratch buffer too small: need at least ", need, " bytes, got ", bytes);
  FV_CHECK_VALUE(reinterpret_cast<uintptr_t>(scratch) % tl::kScratchAlign == 0,
                 "scratch: the CUDA fused block needs a ", tl::kScratchAlign,
                 "-byte aligned buffer (torch allocations are)");
}

void check_act(const TensorView& t, const TensorView& x, const tl::Shape& s, const char* name) {
  check_on(t, x, name);
  FV_CHECK_VALUE(t.ndim == 4 && t.shape[0] == s.n && t.shape[1] == s.c && t.shape[2] == s.h &&
                     t.shape[3] == s.w && t.dtype == x.dtype && is_nhwc(t),
                 name, ": expected a channels-last ", dtype_name(x.dtype), " tensor of x's shape, got ",
                 t.describe());
}

void check_grad(const TensorView* g, const TensorView& x, std::initializer_list<int64_t> shape,
                const char* name) {
  if (!g) return;
  check_param(g, x, shape, name, true);
  FV_CHECK_VALUE(g->is_contiguous(), name, ": must be contiguous, got ", g->describe());
}

}  // namespace

// ------------------------------------------------------------------ entry points
size_t forward_scratch_bytes(const TensorView& x, const ConvNeXtBlockWeights& w,
                             const ConvNeXtBlockParams& p) {
  const tl::Shape s = validate(x, w, p);
  if (s.n * s.h * s.w == 0) return 0;
  return tl::carve_forward(plan_of(s), w.grn_weight != nullptr).total;
}

void forward(const TensorView& x, const ConvNeXtBlockWeights& w, const ConvNeXtBlockParams& p,
             const TensorView& y, void* scratch, size_t scratch_bytes, void* stream) {
  const tl::Shape s = validate(x, w, p);
  check_act(y, x, s, "y");
  if (s.n * s.h * s.w == 0) return;
  const tl::Plan pl = plan_of(s);
  const tl::FwdScratch fs = tl::carve_forward(pl, w.grn_weight != nullptr);
  check_scratch(scratch, scratch_bytes, fs.total);
#if defined(FASTVIS_WITH_CUTLASS)
  DeviceGuard guard(x.device.index);
  if (x.dtype == DType::Float16)
    run_forward<F16>(CudaLaunch{static_cast<cudaStream_t>(stream)}, pl, fs, x, w, p, y, scratch);
  else
    run_forward<BF16>(CudaLaunch{static_cast<cudaStream_t>(stream)}, pl, fs, x, w, p, y, scratch);
#else
  (void)stream;
  no_cutlass();
#endif
}

size_t backward_scratch_bytes(const TensorView& x, const ConvNeXtBlockWeights& w,
                              const ConvNeXtBlockParams& p) {
  const tl::Shape s = validate(x, w, p);
  if (s.n * s.h * s.w == 0) return 0;
  DeviceGuard guard(x.device.index);
  return tl::carve_backward(plan_of(s), w.grn_weight != nullptr, dw_wgrad_scratch(s)).total;
}

void backward(const TensorView& grad_y, const TensorView& x, const ConvNeXtBlockWeights& w,
              const ConvNeXtBlockParams& p, const ConvNeXtBlockGrads& g, void* scratch,
              size_t scratch_bytes, void* stream) {
  const tl::Shape s = validate(x, w, p);
  const int64_t C = s.c, Hd = s.hidden, k = s.k;
  check_act(grad_y, x, s, "grad_y");
  if (g.x) check_act(*g.x, x, s, "grad_x");
  check_grad(g.dw_weight, x, {C, 1, k, k}, "grad_dw_weight");
  check_grad(g.dw_bias, x, {C}, "grad_dw_bias");
  check_grad(g.norm_weight, x, {C}, "grad_norm_weight");
  check_grad(g.norm_bias, x, {C}, "grad_norm_bias");
  check_grad(g.fc1_weight, x, {Hd, C}, "grad_fc1_weight");
  check_grad(g.fc1_bias, x, {Hd}, "grad_fc1_bias");
  check_grad(g.fc2_weight, x, {C, Hd}, "grad_fc2_weight");
  check_grad(g.fc2_bias, x, {C}, "grad_fc2_bias");
  check_grad(g.gamma, x, {C}, "grad_gamma");
  check_grad(g.grn_weight, x, {Hd}, "grad_grn_weight");
  check_grad(g.grn_bias, x, {Hd}, "grad_grn_bias");
  FV_CHECK_VALUE(w.grn_weight || (!g.grn_weight && !g.grn_bias),
                 "grad_grn_weight / grad_grn_bias: the block has no GRN");
  DeviceGuard guard(x.device.index);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (s.n * s.h * s.w == 0) {  // nothing flows: zero parameter gradients
    for (const TensorView* t : {g.dw_weight, g.dw_bias, g.norm_weight, g.norm_bias, g.fc1_weight,
                                g.fc1_bias, g.fc2_weight, g.fc2_bias, g.gamma, g.grn_weight,
                                g.grn_bias})
      if (t && t->numel() > 0)
        FV_CNB_CUDA_CHECK(cudaMemsetAsync(t->data, 0, size_t(t->numel()) * t->itemsize(), st));
    return;
  }
  const tl::Plan pl = plan_of(s);
  const size_t dw_bytes = dw_wgrad_scratch(s);
  const tl::BwdScratch bs = tl::carve_backward(pl, w.grn_weight != nullptr, dw_bytes);
  check_scratch(scratch, scratch_bytes, bs.total);
#if defined(FASTVIS_WITH_CUTLASS)
  if (x.dtype == DType::Float16)
    backward_all<F16>(CudaLaunch{st}, pl, bs, s, grad_y, x, w, p, g, scratch, dw_bytes);
  else
    backward_all<BF16>(CudaLaunch{st}, pl, bs, s, grad_y, x, w, p, g, scratch, dw_bytes);
#else
  (void)st;
  no_cutlass();
#endif
}

}  // namespace cuda
}  // namespace cnblock
}  // namespace fastvis
