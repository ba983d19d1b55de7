// Internal: run-time selection of the CPU instruction-set path.
#pragma once

namespace fastvis {
namespace cpu {

enum class Isa : int { Generic = 0, Avx2 = 1 };

// The best compiled path this CPU supports; FASTVIS_CPU_ISA=generic forces the
// baseline (for testing both paths on one machine).
Isa selected_isa();
const char* selected_isa_name();

}  // namespace cpu
}  // namespace fastvis
