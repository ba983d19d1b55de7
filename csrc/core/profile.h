// Internal: an opt-in phase profiler for the fused kernels' tile loops. Off by default
// (one relaxed atomic load per phase); when on, every thread adds the wall time of each
// phase it runs to a process-wide total. fastvis._C.profile_* switch, read and reset it;
// `fastvis bench block --profile` prints where a block's time goes.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>

namespace fastvis {
namespace prof {

enum Phase : int {
  kDwconv = 0, kLayerNorm, kFc1, kGelu, kGrn, kFc2, kOutput,     // forward pieces
  kGradOut, kWgrad, kDgrad, kGeluBwd, kLayerNormBwd, kStoreD,     // backward tile pieces
  kGrnStats, kDwconvBwd, kReduce,                                 // whole-op pieces
  kNumPhases
};
const char* phase_name(int p);

bool enabled();
void set_enabled(bool on);
void add(int phase, int64_t ns);
int64_t total_ns(int phase);
int64_t calls(int phase);
void reset();

// Adds the scope's wall time to `phase` when profiling is on.
class Scope {
 public:
  explicit Scope(int phase) : phase_(enabled() ? phase : -1) {
    if (phase_ >= 0) t0_ = std::chrono::steady_clock::now();
  }
  ~Scope() {
    if (phase_ >= 0)
      add(phase_, std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now() - t0_).count());
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  int phase_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace prof
}  // namespace fastvis
