// Internal: carving a caller's scratch buffer into aligned regions (every op family).
#pragma once
#include <cstddef>

#include "fastvis/error.h"
#include "fastvis/tensor.h"

namespace fastvis {
namespace core {

inline size_t align64(size_t b) { return (b + 63) & ~size_t(63); }
// Bytes of the accumulation type of a CPU dtype: double for float64, float otherwise.
inline size_t acc_size(DType dt) { return dt == DType::Float64 ? 8 : 4; }

// Hands out consecutive 64-byte-aligned regions of [base, base + bytes). A carver over a
// null base is a dry run that only measures (take() returns null): scratch queries run the same carving code as the entry points, so the
// two cannot disagree. Entry points check `scratch != nullptr` before carving.
class ScratchCarver {
 public:
  ScratchCarver(void* base, size_t bytes) : base_(static_cast<char*>(base)), bytes_(bytes) {}
  void* take(size_t b) {
    void* p = base_ ? base_ + used_ : nullptr;  // a dry run hands out nulls (no arithmetic on null)
    used_ += align64(b);
    FV_CHECK_VALUE(used_ <= bytes_ || base_ == nullptr, "scratch buffer too small: need at least ",
                   used_, " bytes, got ", bytes_);
    return p;
  }
  size_t used() const { return used_; }
  bool dry() const { return base_ == nullptr; }

 private:
  char* base_;
  size_t bytes_;
  size_t used_ = 0;
};

}  // namespace core
}  // namespace fastvis
