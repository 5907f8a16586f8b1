// Run-time choice of the vector build (vec_table.h) and the FMA peak probe.
#include <ATen/Version.h>

#include <algorithm>
#include <atomic>
#include <ctime>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "vec_table.h"

namespace mmcore {
namespace vec {

// ATen's capability string: "AVX512", "AVX2", "NO AVX" / "DEFAULT" (x86), "DEFAULT" / "SVE256"
// (aarch64), "VSX", "ZVECTOR".  ATen has already checked that the CPU runs it.
const Table& vec() {
  static const Table* t = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" && table_avx512() != nullptr) return table_avx512();
    if ((cap == "AVX512" || cap == "AVX2") && table_avx2() != nullptr) return table_avx2();
    return table_default();
  }();
  return *t;
}

const Table& widest() {
  static const Table* t = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();  // (libgcc / compiler-rt also check that the OS saves the registers)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        table_avx512() != nullptr)
      return table_avx512();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        table_avx2() != nullptr)
      return table_avx2();
#endif
    return table_default();
  }();
  return *t;
}

// CPU time of the calling thread (seconds), or -1 where there is no per-thread clock.
double thread_cpu_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return ts.tv_sec + 1e-9 * ts.tv_nsec;
#endif
  return -1.0;
}

// GFLOP/s of `threads` threads each running t.fma_chains (2 flops per lane per FMA), best of
// seven runs of about 20 ms; the threads start together.  Each thread's rate is taken over its
// own CPU time, so time the OS gave to other processes (a shared machine) does not lower the
// peak; with more threads than hardware threads (or no per-thread clock) the wall clock from
// the common start to the last finish is used instead.
double fma_peak_gflops(const Table& t, int64_t threads) {
  using clock = std::chrono::steady_clock;
  auto secs = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  volatile float sink = 0.f;
  int64_t iters = 1 << 14;
  for (;;) {  // calibrate on one thread
    const auto t0 = clock::now();
    sink = sink + t.fma_chains(iters);
    if (secs(t0, clock::now()) > 0.02 || iters > (int64_t(1) << 34)) break;
    iters *= 2;
  }
  const double flops = 2.0 * iters * t.chains * t.lanes;  // per thread
  const bool per_thread_clock =
      thread_cpu_seconds() >= 0 &&
      threads <= static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  double best = 0.0;
  for (int rep = 0; rep < 7; ++rep) {
    std::atomic<int64_t> ready{0};
    std::atomic<bool> go{false};
    std::vector<float> out(threads, 0.f);
    std::vector<double> cpu(threads, 0.0);
    std::vector<std::thread> pool;
    for (int64_t i = 0; i < threads; ++i)
      pool.emplace_back([&, i] {
        ready.fetch_add(1);
        while (!go.load()) std::this_thread::yield();
        const double c0 = thread_cpu_seconds();
        out[i] = t.fma_chains(iters);
        cpu[i] = thread_cpu_seconds() - c0;
      });
    while (ready.load() < threads) std::this_thread::yield();
    const auto t0 = clock::now();
    go.store(true);
    for (auto& th : pool) th.join();
    double rate = flops * threads / secs(t0, clock::now());
    if (per_thread_clock) {
      double sum = 0.0;
      for (double c : cpu) sum += c > 0 ? flops / c : 0.0;
      rate = std::max(rate, sum);
    }
    best = std::max(best, rate / 1e9);
    for (float x : out) sink = sink + x;
  }
  return best;
}

}  // namespace vec
}  // namespace mmcore
