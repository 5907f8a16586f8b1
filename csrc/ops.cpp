// mmcore._C: the TORCH_LIBRARY of the C++ / CUDA kernels.
//
// The library `mmcore_C` is created here; each op's kernels add their schemas with
// TORCH_LIBRARY_FRAGMENT and their CPU / CUDA implementations with TORCH_LIBRARY_IMPL in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, so each op lives in its own files.
// Python reaches them as torch.ops.mmcore_C.<name>; mmcore/ops/backends/<op>.py wraps them.
#ifndef MMCORE_NO_PYTHON
#include <torch/extension.h>
#endif
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/common.h"
#include "cpu/vec_table.h"

namespace mmcore {

// The vector build mmcore's CPU kernels run (csrc/cpu/vec_table.h): the one of ATen's CPU
// capability (ATEN_CPU_CAPABILITY=avx2 moves both): "avx512", "avx2", "default" or "neon".
std::string cpu_capability() { return vec::vec().isa; }

// The widest vector build this CPU can run, whatever ATen chose.
std::string cpu_isa() { return vec::widest().isa; }

// fp32 FMA peak of the widest build on `threads` threads: (isa, vector bits, GFLOP/s).
std::tuple<std::string, int64_t, double> fma_peak(int64_t threads) {
  TORCH_CHECK(threads >= 1 && threads <= 4096, "threads: must lie in [1, 4096], got ", threads);
  const vec::Table& t = vec::widest();
  return {t.isa, t.vector_bits, vec::fma_peak_gflops(t, threads)};
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
  m.def("cpu_isa() -> str", &mmcore::cpu_isa);
  m.def("fma_peak(int threads) -> (str, int, float)", &mmcore::fma_peak);
  m.def("num_threads() -> int", &mmcore::num_threads);
  m.def("with_cuda() -> bool", &mmcore::with_cuda);
}

// Python imports mmcore._C as a module: give it one (the ops register on load).  A plain C++
// program (tests/cross/) builds with -DMMCORE_NO_PYTHON and calls the ops through the dispatcher.
#ifndef MMCORE_NO_PYTHON
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("cpu_capability", &mmcore::cpu_capability);
  mod.def("with_cuda", &mmcore::with_cuda);
}
#endif
