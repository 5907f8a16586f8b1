// lora_linear on the CPU: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, forward and backward (frozen base).
//
// Normalised operands (mmcore/ops/lora_linear.py): x (M, K), weight (N, K), bias (N,) | None,
// lora_a (A, r, K), lora_b (A, N, r), scaling (A,) fp32, adapter_ids (M,) int64 | None
// (None: every row uses adapter 0; -1: base only).  bf16 / fp16 are converted to fp32 once
// (this CPU class has no fast half arithmetic) and the result is converted back.
//
// The base GEMM dominates (2·M·N·K flops against 2·M·r·(N + K) for the LoRA term), so the
// kernels lean on ATen's blocked, multi-threaded GEMM and shape the LoRA term to add as
// little as possible on top of it.  Measured variants for one adapter (README, "LoRA kernels"):
//   0 two-pass : y = addmm(b, x, Wᵀ); y += s·(x Aᵀ) Bᵀ          (one more pass over y)
//   1 aug-K    : y = addmm(b, [x, s·x Aᵀ], [W, B]ᵀ)              (K + r columns, two copies)
//   2 merged   : y = addmm(b, x, (W + s·B A)ᵀ)                   (2·N·r·K flops, one W copy)
// merged costs a W-sized temporary and 2·N·r·K flops, so it can only win for many rows;
// two-pass is the default below 4096 rows (see merge_pays).
// A per-output-column scale (lora_linear_fwd_scaled, DoRA's magnitude / norm) is applied in
// fp32 after the low-rank term: y = c ⊙ (x Wᵀ + LoRA) + b, one pass over the fp32 result
// before the conversion to x's dtype; it can also return the bracket (for d c).
// The weight may be (N, K) with a contiguous last dim or the transposed view of a contiguous
// (K, N) matrix (transformers' Conv1D): ATen's GEMMs read either layout without a copy.
// Multi-adapter: one base GEMM over all rows, then per adapter its rows (grouped by a
// counting sort of the ids, O(M)) get s·(x_g Aᵀ) Bᵀ added row by row on the vector build of
// ATen's CPU capability (add_rows, vec_table.h), or, for a big
// group, the group's rows are computed with the merged weight and replace the base rows.
#include <ATen/Parallel.h>

#include <vector>

#include "common.h"
#include "vec_table.h"

namespace mmcore {
namespace {

at::Tensor f32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

void check_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                    const at::Tensor& lora_b, const at::Tensor& scaling) {
  check_cpu_lastdim(x, "x");
  MMCORE_CHECK_ARG(weight.device().is_cpu(), "weight", "must be a CPU tensor");
  MMCORE_CHECK_ARG(weight.dim() != 2 || weight.numel() == 0 || weight.size(1) <= 1 ||
                       weight.stride(1) == 1 || weight.size(0) <= 1 || weight.stride(0) == 1,
                   "weight", "must have a contiguous last dim or be a transposed contiguous "
                   "(K, N) matrix");
  check_cpu_lastdim(lora_a, "lora_a");
  check_cpu_lastdim(lora_b, "lora_b");
  MMCORE_CHECK_ARG(x.dim() == 2, "x", "must be (M, K)");
  MMCORE_CHECK_ARG(weight.dim() == 2 && weight.size(1) == x.size(1), "weight",
                   "must be (N, K) with x's K");
  MMCORE_CHECK_ARG(lora_a.dim() == 3 && lora_a.size(2) == x.size(1), "lora_a",
                   "must be (A, r, K) with x's K");
  MMCORE_CHECK_ARG(lora_b.dim() == 3 && lora_b.size(0) == lora_a.size(0) &&
                       lora_b.size(1) == weight.size(0) && lora_b.size(2) == lora_a.size(1),
                   "lora_b", "must be (A, N, r) matching lora_a (A, r, K) and weight (N, K)");
  MMCORE_CHECK_ARG(scaling.dim() == 1 && scaling.size(0) == lora_a.size(0), "scaling",
                   "must be (A,)");
  auto dt = x.scalar_type();
  MMCORE_CHECK_ARG(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "x",
                   "must be float32, bfloat16 or float16");
  MMCORE_CHECK_ARG(weight.scalar_type() == dt && lora_a.scalar_type() == dt &&
                       lora_b.scalar_type() == dt, "weight/lora_a/lora_b", "must have x's dtype");
}

// adapter_ids None means adapter 0 for every row: there must be one.
void check_adapter0(const at::Tensor& lora_a, const c10::optional<at::Tensor>& ids) {
  MMCORE_CHECK_ARG(lora_a.size(0) > 0 || (ids.has_value() && ids->defined()), "lora_a",
                   "holds A = 0 adapters, but adapter_ids=None means adapter 0 for every row");
}

// Rows of each adapter, in order: groups[a] = row indices with id a (a in [0, A)).
std::vector<std::vector<int64_t>> group_rows(const at::Tensor& ids_in, int64_t A, int64_t M) {
  MMCORE_CHECK_ARG(ids_in.dim() == 1 && ids_in.size(0) == M, "adapter_ids", "must be (M,)");
  MMCORE_CHECK_ARG(ids_in.device().is_cpu(), "adapter_ids", "must be a CPU tensor");
  auto ids = ids_in.to(at::kLong).contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  std::vector<int64_t> count(A, 0);
  for (int64_t m = 0; m < M; ++m) {
    int64_t a = p[m];
    TORCH_CHECK(a >= -1 && a < A, "adapter_ids: values must lie in [-1, ", A, ") (A = ", A,
                " adapters), got ", a, " at row ", m);
    if (a >= 0) ++count[a];
  }
  std::vector<std::vector<int64_t>> g(A);
  for (int64_t a = 0; a < A; ++a) g[a].reserve(count[a]);
  for (int64_t m = 0; m < M; ++m)
    if (p[m] >= 0) g[p[m]].push_back(m);
  return g;
}

at::Tensor index_tensor(const std::vector<int64_t>& rows) {
  return at::from_blob(const_cast<int64_t*>(rows.data()), {(int64_t)rows.size()},
                       at::TensorOptions().dtype(at::kLong))
      .clone();
}

// y[rows[i]] += a · x[i] for every i: a group's low-rank update (y (M, N), x (m, N), fp32,
// contiguous; rows distinct), on the vector build of ATen's CPU capability, rows in parallel.
void add_rows(at::Tensor& y, const std::vector<int64_t>& rows, const at::Tensor& x, double a) {
  TORCH_INTERNAL_ASSERT(y.is_contiguous() && x.is_contiguous() && y.scalar_type() == at::kFloat &&
                        x.scalar_type() == at::kFloat && x.size(0) == (int64_t)rows.size());
  const int64_t n = y.size(1);
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const vec::Table& t = vec::vec();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, n));
  at::parallel_for(0, static_cast<int64_t>(rows.size()), grain, [&](int64_t i0, int64_t i1) {
    t.rows_axpy(yp, n, rows.data() + i0, xp + i0 * n, n, i1 - i0, n, static_cast<float>(a));
  });
}

// W + s·B A  (N, K) fp32: the merged weight of one adapter.
at::Tensor merged(const at::Tensor& w, const at::Tensor& b, const at::Tensor& a, double s) {
  return at::addmm(w, b, a, /*beta=*/1, /*alpha=*/s);
}

// at::linear, i.e. exactly what F.linear runs (the floor the benchmarks compare with; at small
// M it measured a few per cent faster than addmm(bias, x, wᵀ) on this CPU)
at::Tensor base_mm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return at::linear(x, w, bias);
}

// merging pays once the rows outnumber the rank well (its cost is r/M of the GEMM)
// Idle 2-core measurement (768x3072, r=16, fp32): two-pass beat merged at every M from 64 to
// 1024 (8.4 vs 12.9 ms at 64, 14.4 vs 17.5 at 128) and tied at 2048; merge only for more rows.
bool merge_pays(int64_t m, int64_t r) { return m >= 4096 && m >= 8 * r; }

// One adapter, every row: the variants of the header comment.
at::Tensor single(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& a, const at::Tensor& b, double s, int64_t variant) {
  if (variant == 2) return base_mm(x, merged(w, b, a, s), bias);
  if (variant == 1) {
    auto xa = at::mm(x, a.t()).mul_(s);                      // (M, r)
    auto xaug = at::cat({x, xa}, 1);                          // (M, K + r)
    auto waug = at::cat({w, b}, 1);                           // (N, K + r)
    return base_mm(xaug, waug, bias);
  }
  auto y = base_mm(x, w, bias);
  auto xa = at::mm(x, a.t());                                 // (M, r)
  y.addmm_(xa, b.t(), /*beta=*/1, /*alpha=*/s);
  return y;
}

// -> y (M, N) fp32 (x's dtype converted by the callers)
at::Tensor fwd_f32(const at::Tensor& x_, const at::Tensor& weight_,
                    const c10::optional<at::Tensor>& bias_, const at::Tensor& lora_a_,
                    const at::Tensor& lora_b_, const at::Tensor& scaling_,
                    const c10::optional<at::Tensor>& ids, int64_t variant) {
  check_operands(x_, weight_, lora_a_, lora_b_, scaling_);
  check_adapter0(lora_a_, ids);
  const int64_t M = x_.size(0), N = weight_.size(0), A = lora_a_.size(0), r = lora_a_.size(1);
  auto x = f32(x_), w = f32(weight_), la = f32(lora_a_), lb = f32(lora_b_);
  c10::optional<at::Tensor> bias;
  if (bias_.has_value() && bias_->defined()) {
    MMCORE_CHECK_ARG(bias_->dim() == 1 && bias_->size(0) == N, "bias", "must be (N,)");
    bias = f32(*bias_);
  }
  auto sc = scaling_.to(at::kFloat).contiguous();
  const float* s = sc.data_ptr<float>();
  at::Tensor y;
  if (M == 0) {
    y = at::empty({0, N}, x.options());
  } else if (!ids.has_value() || !ids->defined()) {
    if (variant < 0) variant = merge_pays(M, r) ? 2 : 0;
    y = single(x, w, bias, la[0], lb[0], s[0], variant);
  } else {
    auto groups = group_rows(*ids, A, M);
    int64_t whole = -1;  // an adapter that owns every row: the single-adapter path
    for (int64_t a = 0; a < A; ++a)
      if ((int64_t)groups[a].size() == M) whole = a;
    if (whole >= 0) {
      return single(x, w, bias, la[whole], lb[whole], s[whole], merge_pays(M, r) ? 2 : 0);
    }
    y = base_mm(x, w, bias);
    for (int64_t a = 0; a < A; ++a) {
      const auto& rows = groups[a];
      const int64_t m = rows.size();
      if (m == 0) continue;
      auto idx = index_tensor(rows);
      auto xg = x.index_select(0, idx);                                  // (m, K)
      if (merge_pays(m, r)) {
        y.index_copy_(0, idx, base_mm(xg, merged(w, lb[a], la[a], s[a]), bias));
      } else {
        auto t = at::mm(xg, la[a].t());                                  // (m, r)
        add_rows(y, rows, at::mm(t, lb[a].t()), s[a]);
      }
    }
  }
  return y;
}

at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t : t.to(dt);
}

at::Tensor fwd_impl(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                    const at::Tensor& lora_b, const at::Tensor& scaling,
                    const c10::optional<at::Tensor>& ids, int64_t variant) {
  return to_dtype(fwd_f32(x, weight, bias, lora_a, lora_b, scaling, ids, variant),
                  x.scalar_type());
}

}  // namespace

at::Tensor lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, const at::Tensor& scaling,
                           const c10::optional<at::Tensor>& adapter_ids) {
  return fwd_impl(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, -1);
}

// y = c ⊙ (x Wᵀ + LoRA) + b with col_scale c (N,); with want_pre also the bracket (else an
// empty tensor), both in x's dtype.
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_scaled(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const c10::optional<at::Tensor>& adapter_ids, const at::Tensor& col_scale, bool want_pre) {
  const int64_t N = weight.size(0);
  MMCORE_CHECK_ARG(col_scale.dim() == 1 && col_scale.size(0) == N && col_scale.device().is_cpu(),
                   "col_scale", "must be a CPU tensor of shape (N,)");
  if (bias.has_value() && bias->defined())
    MMCORE_CHECK_ARG(bias->dim() == 1 && bias->size(0) == N, "bias", "must be (N,)");
  auto pre = fwd_f32(x, weight, c10::nullopt, lora_a, lora_b, scaling, adapter_ids, -1);
  auto c = f32(col_scale);
  auto y = (bias.has_value() && bias->defined()) ? at::addcmul(f32(*bias), pre, c)
                                                 : at::mul(pre, c);
  const auto dt = x.scalar_type();
  return {to_dtype(y, dt), want_pre ? to_dtype(pre, dt) : x.new_empty({0})};
}

// Single adapter, a forced variant (0 two-pass, 1 aug-K, 2 merged): for the benchmark.
at::Tensor lora_linear_fwd_variant(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& lora_a, const at::Tensor& lora_b,
                                   const at::Tensor& scaling, int64_t variant) {
  MMCORE_CHECK_ARG(variant >= 0 && variant <= 2, "variant", "must be 0, 1 or 2");
  return fwd_impl(x, weight, bias, lora_a, lora_b, scaling, c10::nullopt, variant);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(
    const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& weight_,
    const at::Tensor& lora_a_, const at::Tensor& lora_b_, const at::Tensor& scaling_,
    const c10::optional<at::Tensor>& ids, bool need_dx, bool need_da, bool need_db) {
  check_operands(x_, weight_, lora_a_, lora_b_, scaling_);
  check_adapter0(lora_a_, ids);
  check_cpu_lastdim(dy_, "dy");
  const int64_t M = x_.size(0), N = weight_.size(0), A = lora_a_.size(0), r = lora_a_.size(1);
  MMCORE_CHECK_ARG(dy_.dim() == 2 && dy_.size(0) == M && dy_.size(1) == N, "dy", "must be (M, N)");
  auto dy = f32(dy_), x = f32(x_), w = f32(weight_), la = f32(lora_a_), lb = f32(lora_b_);
  auto sc = scaling_.to(at::kFloat).contiguous();
  const float* s = sc.data_ptr<float>();
  at::Tensor dx, da, db;
  if (need_da) da = at::zeros(lora_a_.sizes(), x.options());
  if (need_db) db = at::zeros(lora_b_.sizes(), x.options());
  const bool multi = ids.has_value() && ids->defined();
  if (!multi) {
    at::Tensor t;                                                       // dy B (M, r)
    if (need_da || (need_dx && !merge_pays(M, r))) t = at::mm(dy, lb[0]);
    if (need_dx) {
      if (merge_pays(M, r)) {
        dx = at::mm(dy, merged(w, lb[0], la[0], s[0]));
      } else {
        dx = at::mm(dy, w);
        dx.addmm_(t, la[0], 1, s[0]);
      }
    }
    if (need_da) { auto d = da[0]; at::mm_out(d, t.t(), x).mul_(s[0]); }
    if (need_db) { auto d = db[0]; at::mm_out(d, dy.t(), at::mm(x, la[0].t())).mul_(s[0]); }
  } else {
    auto groups = group_rows(*ids, A, M);
    if (need_dx) dx = at::mm(dy, w);
    for (int64_t a = 0; a < A; ++a) {
      const auto& rows = groups[a];
      if (rows.empty()) continue;
      auto idx = index_tensor(rows);
      auto dyg = dy.index_select(0, idx), xg = x.index_select(0, idx);
      auto t = at::mm(dyg, lb[a]);                                       // (m, r)
      if (need_dx) add_rows(dx, rows, at::mm(t, la[a]), s[a]);
      if (need_da) { auto d = da[a]; at::mm_out(d, t.t(), xg).mul_(s[a]); }
      if (need_db) {
        auto d = db[a];
        at::mm_out(d, dyg.t(), at::mm(xg, la[a].t())).mul_(s[a]);
      }
    }
  }
  auto cast = [](const at::Tensor& t, at::ScalarType dt) {
    return t.scalar_type() == dt ? t : t.to(dt);
  };
  auto none = x_.new_empty({0});
  return {need_dx ? cast(dx, x_.scalar_type()) : none,
          need_da ? cast(da, lora_a_.scalar_type()) : none,
          need_db ? cast(db, lora_b_.scalar_type()) : none};
}

}  // namespace mmcore

TORCH_LIBRARY_FRAGMENT(mmcore_C, m) {
  m.def("lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "Tensor scaling, Tensor? adapter_ids) -> Tensor");
  m.def("lora_linear_fwd_scaled(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
        "Tensor lora_b, Tensor scaling, Tensor? adapter_ids, Tensor col_scale, bool want_pre) "
        "-> (Tensor, Tensor)");
  m.def("lora_linear_fwd_variant(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
        "Tensor lora_b, Tensor scaling, int variant) -> Tensor");
  m.def("lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "Tensor scaling, Tensor? adapter_ids, bool need_dx, bool need_da, bool need_db) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmcore_C, CPU, m) {
  m.impl("lora_linear_fwd", &mmcore::lora_linear_fwd);
  m.impl("lora_linear_fwd_scaled", &mmcore::lora_linear_fwd_scaled);
  m.impl("lora_linear_fwd_variant", &mmcore::lora_linear_fwd_variant);
  m.impl("lora_linear_bwd", &mmcore::lora_linear_bwd);
}
