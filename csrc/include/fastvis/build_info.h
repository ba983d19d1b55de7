// fastvis: what this build of the core contains.
#pragma once
#include <string>

namespace fastvis {

// The CPU instruction-set paths compiled in, e.g. "generic,avx2".
std::string cpu_isa_compiled();
// The CPU path selected at run time on this machine, e.g. "avx2".
std::string cpu_isa_selected();
bool cuda_compiled();
// CUDA architectures compiled for, e.g. "80;90" (empty without CUDA).
std::string cuda_archs();
// True when CUDA is compiled in and a device is present and usable.
bool cuda_device_available();
int cuda_device_count();
const char* version();

}  // namespace fastvis
