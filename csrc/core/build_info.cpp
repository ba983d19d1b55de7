#include "fastvis/build_info.h"

#include <string>

#include "core/cpu_features.h"

#if defined(FASTVIS_WITH_CUDA)
#include <cuda_runtime.h>
#endif

#ifndef FV_ISA_LIST
#define FV_ISA_LIST "generic"
#endif
#ifndef FV_VERSION
#define FV_VERSION "0.0.0"
#endif

namespace fastvis {

std::string cpu_isa_compiled() { return FV_ISA_LIST; }
std::string cpu_isa_selected() { return cpu::selected_isa_name(); }

bool cuda_compiled() {
#if defined(FASTVIS_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

std::string cuda_archs() {
#if defined(FASTVIS_WITH_CUDA) && defined(FV_CUDA_ARCHS)
  return FV_CUDA_ARCHS;
#else
  return "";
#endif
}

int cuda_device_count() {
#if defined(FASTVIS_WITH_CUDA)
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver/device" error
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

bool cuda_device_available() { return cuda_device_count() > 0; }

const char* version() { return FV_VERSION; }

}  // namespace fastvis
