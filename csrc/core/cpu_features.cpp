#include "core/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace fastvis {
namespace cpu {

static Isa detect() {
  // The cap FASTVIS_CPU_ISA asks for (unset or unknown: no cap).
  Isa cap = Isa::Avx512;
  if (const char* force = std::getenv("FASTVIS_CPU_ISA")) {
    if (std::strcmp(force, "generic") == 0) cap = Isa::Generic;
    else if (std::strcmp(force, "avx2") == 0) cap = Isa::Avx2;
  }
  (void)cap;
#if (defined(FV_HAVE_ISA_AVX2) || defined(FV_HAVE_ISA_AVX512)) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
#endif
#if defined(FV_HAVE_ISA_AVX512) && (defined(__x86_64__) || defined(__i386__))
  if (cap >= Isa::Avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    return Isa::Avx512;
#endif
#if defined(FV_HAVE_ISA_AVX2) && (defined(__x86_64__) || defined(__i386__))
  if (cap >= Isa::Avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Generic;
}

Isa selected_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* selected_isa_name() {
  switch (selected_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

int vector_bytes() { return selected_isa() == Isa::Avx512 ? 64 : 32; }

}  // namespace cpu
}  // namespace fastvis
