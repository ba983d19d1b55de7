// Internal: run-time selection of the CPU instruction-set path.
#pragma once

namespace fastvis {
namespace cpu {

enum class Isa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

// The best compiled path this CPU supports. FASTVIS_CPU_ISA=generic|avx2|avx512 caps it
// (for testing every path on one machine; a path the CPU or the build lacks is never
// chosen, the best one below it is).
Isa selected_isa();
const char* selected_isa_name();

// The SIMD vector width of the selected path in bytes (64 for AVX-512, else 32): what
// plans and scratch sizes computed outside the per-ISA files must agree on with the
// kernels (simd.h's FV_VEC_BYTES of the path that runs).
int vector_bytes();

}  // namespace cpu
}  // namespace fastvis
