// mmcore_C::lora_sgmv_fwd and lora_sgmv_plan: schema, argument checks, the CUDA kernels
// (lora_sgmv.cu; CUDA builds only) and their CPU emulation (emulation.cpp).
//
//   lora_sgmv_fwd(x (M, K), weight (N, K), bias (N,)?, lora_a (A, r, K), lora_b (A, N, r),
//                 scaling (A,) fp32, adapter_ids (M,) int64?, ksplits) -> y (M, N)
//     y = x W^T + b (at::linear: cuBLAS on the GPU) + scaling[a] (x A_a^T) B_a^T per row,
//     a = adapter_ids[m] (-1 or out of range: base only; None: adapter 0 for every row).
//     An id outside [-1, A) is never an out-of-bounds read: the plan puts it in the base-only
//     slot, on every device (checking the ids would cost a device sync on the GPU);
//     mmcore.ops.lora_linear refuses such ids before they reach this op.
//     bf16 / fp16, K % 8 == 0, N even, r <= 128, A <= 4096.  ksplits 0 picks the K split.
//     Without ids and M > kSmallM the low-rank term is two cuBLAS GEMMs (the SGMV kernels
//     serve multi-adapter batches and single-adapter decode).
//   lora_sgmv_plan(adapter_ids (M,) int64, A) -> (perm (M,), seg (A+1,), tile_start (A+1,))
//     int32, the grouping of lora_sgmv_plan.h (GPU: one-block counting sort; CPU: stable).
#include <torch/library.h>

#include "cuda/args.h"
#include "cuda/emulation.h"

#ifdef MMCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mmcore {
namespace {

constexpr int64_t kSmallM = 64;  // single adapter: SGMV kernels up to this many rows

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_sgmv_plan(const at::Tensor& ids_in,
                                                               int64_t A) {
  MMCORE_ARG(ids_in.dim() == 1, "adapter_ids", "must be 1-D (M,), got shape ", ids_in.sizes());
  MMCORE_ARG(ids_in.scalar_type() == at::kLong || ids_in.scalar_type() == at::kInt,
             "adapter_ids", "must be int32 / int64, got ", ids_in.scalar_type());
  MMCORE_ARG(A >= 1 && A <= sgmv::kMaxAdapters, "lora_a", "adapters must be in [1, ",
             sgmv::kMaxAdapters, "], got ", A);
  const int64_t M = ids_in.size(0);
  MMCORE_ARG(M < (int64_t(1) << 31), "x", "rows must be < 2^31, got ", M);
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const auto i32 = ids.options().dtype(at::kInt);
  at::Tensor perm = at::empty({M}, i32), seg = at::empty({A + 1}, i32),
             tiles = at::empty({A + 1}, i32);
  if (!ids.is_cuda()) {
    emulation::sgmv_plan(ids.data_ptr<int64_t>(), M, A, perm.data_ptr<int32_t>(),
                         seg.data_ptr<int32_t>(), tiles.data_ptr<int32_t>());
    return {perm, seg, tiles};
  }
#ifdef MMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(ids.device());
  const char* err = cuda::sgmv_plan(ids.data_ptr<int64_t>(), M, A, perm.data_ptr<int32_t>(),
                                    seg.data_ptr<int32_t>(), tiles.data_ptr<int32_t>(),
                                    c10::cuda::getCurrentCUDAStream(ids.get_device()).stream());
  TORCH_CHECK(err == nullptr, "lora_sgmv_plan: CUDA launch failed: ", err);
  return {perm, seg, tiles};
#else
  TORCH_CHECK(false, "lora_sgmv_plan: mmcore._C was built without CUDA kernels");
#endif
}

at::Tensor lora_sgmv_fwd(const at::Tensor& x_in, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& lora_a_in,
                         const at::Tensor& lora_b_in, const at::Tensor& scaling_in,
                         const std::optional<at::Tensor>& adapter_ids, int64_t ksplits) {
  MMCORE_ARG(x_in.dim() == 2, "x", "must be 2-D (M, K), got shape ", x_in.sizes());
  cuda_args::check_half(x_in, "x");
  MMCORE_ARG(weight.dim() == 2 && weight.size(1) == x_in.size(1), "weight",
             "must have shape (N, ", x_in.size(1), "), got ", weight.sizes());
  cuda_args::check_same(weight, "weight", x_in, "x");
  if (bias) cuda_args::check_same(*bias, "bias", x_in, "x");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight.size(0);
  MMCORE_ARG(lora_a_in.dim() == 3 && lora_a_in.size(2) == K, "lora_a",
             "must have shape (A, r, ", K, "), got ", lora_a_in.sizes());
  const int64_t A = lora_a_in.size(0), r = lora_a_in.size(1);
  MMCORE_ARG(lora_b_in.dim() == 3 && lora_b_in.size(0) == A && lora_b_in.size(1) == N &&
                 lora_b_in.size(2) == r,
             "lora_b", "must have shape (", A, ", ", N, ", ", r, "), got ", lora_b_in.sizes());
  cuda_args::check_same(lora_a_in, "lora_a", x_in, "x");
  cuda_args::check_same(lora_b_in, "lora_b", x_in, "x");
  MMCORE_ARG(scaling_in.numel() == A && scaling_in.device() == x_in.device(), "scaling",
             "must be a (", A, ",) tensor on ", x_in.device(), ", got shape ",
             scaling_in.sizes(), " on ", scaling_in.device());
  MMCORE_ARG(K % 8 == 0, "x", "K must be a multiple of 8 for the CUDA kernels, got ", K);
  MMCORE_ARG(N % 2 == 0, "weight", "N must be even for the CUDA kernels, got ", N);
  MMCORE_ARG(r >= 1 && r <= sgmv::kMaxRank, "lora_a", "rank must be in [1, ", sgmv::kMaxRank,
             "], got ", r);
  MMCORE_ARG(ksplits >= 0 && ksplits <= sgmv::kMaxKSplits, "ksplits", "must be in [0, ",
             sgmv::kMaxKSplits, "], got ", ksplits);
  if (adapter_ids)
    MMCORE_ARG(adapter_ids->dim() == 1 && adapter_ids->size(0) == M, "adapter_ids",
               "must have shape (", M, ",), got ", adapter_ids->sizes());

  const at::Tensor x = cuda_args::aligned16(x_in);
  at::Tensor y = at::linear(x, weight, bias).contiguous();  // (M, N) base: cuBLAS on the GPU
  if (M == 0) return y;
  const at::Tensor scaling = scaling_in.reshape({A}).to(at::kFloat).contiguous();
  const at::Tensor lora_a = lora_a_in.contiguous(), lora_b = lora_b_in.contiguous();
  if (!adapter_ids && M > kSmallM) {  // one adapter, many rows: cuBLAS GEMMs
    const at::Tensor t = at::matmul(x, lora_a[0].t()).mul_(scaling[0]);  // (M, r)
    return y.addmm_(t, lora_b[0].t());
  }

  sgmv::Params p;
  at::Tensor perm, seg, tiles;
  if (adapter_ids) {
    std::tie(perm, seg, tiles) = lora_sgmv_plan(*adapter_ids, A);
    p.plan.perm = perm.data_ptr<int32_t>();
    p.plan.seg = seg.data_ptr<int32_t>();
    p.plan.tile_start = tiles.data_ptr<int32_t>();
    p.plan.num_adapters = A;
  }
  p.x = x.data_ptr();
  p.lora_a = lora_a.data_ptr();
  p.lora_b = lora_b.data_ptr();
  p.scaling = scaling.data_ptr<float>();
  p.y = y.data_ptr();
  p.M = M;
  p.K = K;
  p.N = N;
  p.r = r;
  p.sx = x.stride(0);
  p.sy = y.stride(0);
  p.r_pad = sgmv::padded_rank(r);
  const int64_t tiles_max = adapter_ids ? sgmv::max_tiles(M, A) : cdiv(M, sgmv::kBlockM);
  p.ksplits = ksplits ? int(ksplits) : sgmv::num_ksplits(tiles_max, K, cuda_args::sm_count(x, 8));
  at::Tensor t = at::empty({p.ksplits, M, p.r_pad}, x.options().dtype(at::kFloat));
  p.t = t.data_ptr<float>();

  if (!x.is_cuda()) {
    emulation::sgmv(p, x.scalar_type());
    return y;
  }
#ifdef MMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device());
  MMCORE_ARG(major >= 8, "x", "the CUDA SGMV kernels need sm_80 or newer (bf16 MMA)");
  const char* err =
      cuda::sgmv(p, x.scalar_type() == at::kBFloat16 ? cuda::DType::kBF16 : cuda::DType::kF16,
                 c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err == nullptr, "lora_sgmv_fwd: CUDA launch failed: ", err);
  return y;
#else
  TORCH_CHECK(false, "lora_sgmv_fwd: mmcore._C was built without CUDA kernels");
#endif
}

}  // namespace
}  // namespace mmcore

TORCH_LIBRARY_FRAGMENT(mmcore_C, m) {
  m.def(
      "lora_sgmv_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor scaling, Tensor? adapter_ids, int ksplits) -> Tensor");
  m.def("lora_sgmv_plan(Tensor adapter_ids, int num_adapters) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmcore_C, CPU, m) {
  m.impl("lora_sgmv_fwd", &mmcore::lora_sgmv_fwd);
  m.impl("lora_sgmv_plan", &mmcore::lora_sgmv_plan);
}

#ifdef MMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(mmcore_C, CUDA, m) {
  m.impl("lora_sgmv_fwd", &mmcore::lora_sgmv_fwd);
  m.impl("lora_sgmv_plan", &mmcore::lora_sgmv_plan);
}
#endif
