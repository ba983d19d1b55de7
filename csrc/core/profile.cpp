#include "core/profile.h"

namespace fastvis {
namespace prof {
namespace {
std::atomic<bool> g_on{false};
std::atomic<int64_t> g_ns[kNumPhases];
std::atomic<int64_t> g_calls[kNumPhases];
}  // namespace

const char* phase_name(int p) {
  static const char* names[kNumPhases] = {
      "dwconv", "layernorm", "fc1", "gelu", "grn", "fc2", "output",
      "grad_out", "wgrad_gemms", "dgrad_gemms", "gelu_bwd", "layernorm_bwd", "store_d",
      "grn_stats", "dwconv_bwd", "reduce"};
  return (p >= 0 && p < kNumPhases) ? names[p] : "?";
}
bool enabled() { return g_on.load(std::memory_order_relaxed); }
void set_enabled(bool on) { g_on.store(on); }
void add(int phase, int64_t ns) {
  g_ns[phase].fetch_add(ns, std::memory_order_relaxed);
  g_calls[phase].fetch_add(1, std::memory_order_relaxed);
}
int64_t total_ns(int phase) { return g_ns[phase].load(); }
int64_t calls(int phase) { return g_calls[phase].load(); }
void reset() {
  for (int i = 0; i < kNumPhases; ++i) {
    g_ns[i].store(0);
    g_calls[i].store(0);
  }
}

}  // namespace prof
}  // namespace fastvis
