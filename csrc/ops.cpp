// mmcore._C: the TORCH_LIBRARY of the C++ / CUDA kernels.
//
// The library `mmcore_C` is created here; each op's kernels add their schemas with
// TORCH_LIBRARY_FRAGMENT and their CPU / CUDA implementations with TORCH_LIBRARY_IMPL in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, so each op lives in its own files.
// Python reaches them as torch.ops.mmcore_C.<name>; mmcore/ops/backends/<op>.py wraps them.
#include <torch/extension.h>

#include "cpu/common.h"

namespace mmcore {

// Which vector ISA this CPU offers at run time (the build itself targets the baseline).
std::string cpu_capability() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  return "sse2";
#else
  return "generic";
#endif
}

int64_t num_threads() { return at::get_num_threads(); }

bool with_cuda() {
#ifdef MMCORE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace mmcore

TORCH_LIBRARY(mmcore_C, m) {
  m.def("cpu_capability() -> str", &mmcore::cpu_capability);
  m.def("num_threads() -> int", &mmcore::num_threads);
  m.def("with_cuda() -> bool", &mmcore::with_cuda);
}

// Python imports mmcore._C as a module: give it one (the ops register on load).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("cpu_capability", &mmcore::cpu_capability);
  mod.def("with_cuda", &mmcore::with_cuda);
}
