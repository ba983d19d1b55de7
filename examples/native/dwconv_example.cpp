// A native program using the fastvis core directly: no Python, no libtorch.
//   c++ -std=c++17 dwconv_example.cpp -I$(python -c 'import fastvis; print(fastvis.get_include())') \
//       -L$(python -c 'import fastvis; print(fastvis.get_library_dir())') -lfastvis_core \
//       -Wl,-rpath,$(python -c 'import fastvis; print(fastvis.get_library_dir())')
#include <fastvis/fastvis.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <new>
#include <vector>

// 64-byte-aligned scratch memory (what the core's entry points want).
struct AlignedFree {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t(64)); }
};
using Scratch = std::unique_ptr<void, AlignedFree>;

int main() {
  using namespace fastvis;
  const int64_t N = 2, C = 19, H = 13, W = 11, K = 5;
  DepthwiseConv2dParams p;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = K / 2;

  // NHWC storage of a logical (N, C, H, W) tensor; weights (C, 1, K, K).
  std::vector<float> x(N * H * W * C), w(C * K * K), b(C), y(N * H * W * C);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * i);
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::cos(0.11f * i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = 0.5f - 0.1f * i;

  TensorView xv = make_nhwc_view(x.data(), DType::Float32, N, C, H, W);
  TensorView yv = make_nhwc_view(y.data(), DType::Float32, N, C, H, W);
  TensorView wv = make_view(w.data(), DType::Float32, {C, 1, K, K});
  TensorView bv = make_view(b.data(), DType::Float32, {C});

  try {
    set_num_threads(2);
    // Scratch: at least the queried size, 64-byte aligned (a misaligned buffer works but
    // makes the packed tiles' vector loads straddle cache lines).
    const size_t need = depthwise_conv2d_forward_scratch_bytes(xv, wv, p);
    Scratch scratch(::operator new(need ? need : 1, std::align_val_t(64)));
    depthwise_conv2d_forward(xv, wv, &bv, yv, p, scratch.get(), need);
  } catch (const Error& e) {
    std::fprintf(stderr, "fastvis error: %s\n", e.what());
    return 1;
  }

  // Check against a naive loop.
  double max_err = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t ww = 0; ww < W; ++ww)
        for (int64_t c = 0; c < C; ++c) {
          double acc = b[c];
          for (int64_t i = 0; i < K; ++i)
            for (int64_t j = 0; j < K; ++j) {
              const int64_t ih = h - K / 2 + i, iw = ww - K / 2 + j;
              if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
              acc += double(x[((n * H + ih) * W + iw) * C + c]) * w[(c * K + i) * K + j];
            }
          max_err = std::fmax(max_err, std::fabs(acc - y[((n * H + h) * W + ww) * C + c]));
        }
  // A bad argument is reported as an error, not a crash.
  bool refused = false;
  try {
    DepthwiseConv2dParams bad = p;
    bad.stride_h = 3;
    depthwise_conv2d_forward(xv, wv, &bv, yv, bad, nullptr, 0);
  } catch (const Error& e) {
    refused = e.kind() == ErrorKind::Value;
  }
  std::printf("max abs error %.3g, bad stride refused: %s\n", max_err, refused ? "yes" : "no");
  if (max_err > 1e-4 || !refused) return 1;
  std::printf("ok\n");
  return 0;
}
