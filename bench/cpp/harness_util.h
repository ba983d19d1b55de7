// Timing helpers shared by the C++ harnesses in bench/cpp (header only; each harness is
// built with one g++ command line, see its first comment).
#pragma once
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <vector>

namespace fastvis_bench {

inline double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A 64-byte-aligned scratch buffer, as the core's entry points want it (fastvis headers:
// a misaligned one makes the packed tiles' vector loads straddle cache lines; a
// std::vector<char> is only 16-byte aligned and made a 13x13 forward ~1.5x slower).
class Scratch {
 public:
  explicit Scratch(size_t bytes)
      : n_(bytes), p_(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64)), std::free) {}
  char* data() { return p_.get(); }
  size_t size() const { return n_; }

 private:
  size_t n_;
  std::unique_ptr<char, void (*)(void*)> p_;
};

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace fastvis_bench
