#include "core/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace fastvis {
namespace cpu {

static Isa detect() {
  const char* force = std::getenv("FASTVIS_CPU_ISA");
  if (force != nullptr && std::strcmp(force, "generic") == 0) return Isa::Generic;
#if defined(FV_HAVE_ISA_AVX2) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Generic;
}

Isa selected_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* selected_isa_name() { return selected_isa() == Isa::Avx2 ? "avx2" : "generic"; }

}  // namespace cpu
}  // namespace fastvis
