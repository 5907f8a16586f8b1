// The oracle subset of mmcore's C++ CPU kernels, as a plain C++ program (no Python): built
// for aarch64 by tests/cross/aarch64.sh and run under qemu-user, so the NEON build of
// csrc/cpu/vec_kernels.h is checked where no ARM machine is at hand.  Builds natively too.
//
// Each case calls an op through the dispatcher (torch.ops.mmcore_C.<op>) on random inputs and
// compares it with a naive float64 computation (the oracle), with the project's tolerance rule
// (tests/kit.py): max|out - oracle| <= k * max|base - oracle| + 1e-5 + 4 * eps * max|oracle|,
// k = 2 (3 for gradients), where base is the same naive computation in the input's dtype.
// Prints one line per check and exits 1 if any fails.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0, checks = 0;

double max_abs(const at::Tensor& t) { return t.numel() ? t.abs().max().item<double>() : 0.0; }

void check(const std::string& name, const at::Tensor& out, const at::Tensor& oracle,
           const at::Tensor& base, bool grad) {
  const at::Tensor o = out.to(at::kDouble), r = oracle.to(at::kDouble), b = base.to(at::kDouble);
  const double err = max_abs(o - r), berr = max_abs(b - r), rmax = max_abs(r);
  const double eps = out.scalar_type() == at::kBFloat16 ? 0.0078125
                     : out.scalar_type() == at::kHalf   ? 0.0009765625
                                                        : 1.1920928955078125e-07;
  const double tol = (grad ? 3 : 2) * berr + 1e-5 + 4 * eps * rmax;
  const bool ok = !at::isnan(o).any().item<bool>() && err <= tol;
  ++checks;
  if (!ok) ++failures;
  std::printf("%-4s %-44s err %.3e  tol %.3e  (base err %.3e)\n", ok ? "ok" : "FAIL",
              name.c_str(), err, tol, berr);
}

// allowed(i, j) of docs/design.md for one sample (Lq rows, Lk keys): (Lq, Lk) bool
at::Tensor window_mask(int64_t Lq, int64_t Lk, int64_t left, int64_t right, bool causal,
                       int64_t G) {
  auto i = at::arange(Lq, at::kLong).unsqueeze(1), j = at::arange(Lk, at::kLong).unsqueeze(0);
  auto p = i + (Lk - Lq);
  if (causal) right = 0;
  auto lo = left < 0 ? at::ones({Lq, Lk}, at::kBool) : (j >= p - left);
  auto hi = right < 0 ? at::ones({Lq, Lk}, at::kBool) : (j <= p + right);
  auto glob = (j < G).logical_or(p < G);
  if (causal) glob = glob.logical_and(j <= p);
  return lo.logical_and(hi).logical_or(glob);
}

// Naive masked attention of one sample, q (H, Lq, D), k/v (Hkv, Lk, D), any float dtype;
// softcap c > 0: scores capped to c * tanh(s / c) before the mask.
at::Tensor naive(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& mask, double scale, double softcap) {
  const int64_t g = q.size(0) / k.size(0);
  auto kk = k.repeat_interleave(g, 0), vv = v.repeat_interleave(g, 0);
  auto s = at::matmul(q, kk.transpose(1, 2)).mul(scale);
  if (softcap > 0) s = s.div(softcap).tanh().mul(softcap);
  s = s.masked_fill(mask.logical_not(), -INFINITY);
  auto p = at::softmax(s, -1).nan_to_num(0.0);  // rows with no key: 0
  return at::matmul(p, vv);
}

// Reference output of the whole batch (padded rows 0), in q's dtype, with autograd.
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::vector<int64_t>& Lq, const std::vector<int64_t>& Lk,
                     int64_t left, int64_t right, bool causal, int64_t G, double scale,
                     double softcap, const at::Tensor& key_mask) {
  std::vector<at::Tensor> outs;
  for (int64_t b = 0; b < q.size(0); ++b) {
    auto out = at::zeros({q.size(1), q.size(2), q.size(3)}, q.options().requires_grad(false));
    if (Lq[b] > 0 && Lk[b] > 0) {
      auto m = window_mask(Lq[b], Lk[b], left, right, causal, G);
      if (key_mask.defined()) m = m.logical_and(key_mask[b].narrow(0, 0, Lk[b]).unsqueeze(0));
      auto o = naive(q[b].narrow(1, 0, Lq[b]), k[b].narrow(1, 0, Lk[b]),
                     v[b].narrow(1, 0, Lk[b]), m, scale, softcap);
      out = at::cat({o, at::zeros({q.size(1), q.size(2) - Lq[b], q.size(3)}, q.options())}, 1);
    }
    outs.push_back(out);
  }
  return at::stack(outs);
}

using Fwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, int64_t, int64_t,
                                               bool, int64_t, double, double,
                                               const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, double,
                                               const std::optional<at::Tensor>&);
using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    int64_t, int64_t, bool, int64_t, double, double, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    const std::optional<at::Tensor>&);
using CFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const std::optional<at::Tensor>&,
                                                const std::optional<at::Tensor>&, double,
                                                double, double,
                                                const std::optional<at::Tensor>&);
using CBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    double, double, const std::optional<at::Tensor>&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// One attention case: window (cross = false) or cross attention (left = right = -1, G = 0).
void attention_case(const std::string& label, bool cross, at::ScalarType dt, int64_t B,
                    int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, int64_t left,
                    int64_t right, bool causal, int64_t G, std::vector<int64_t> Lq,
                    std::vector<int64_t> Lk, bool bwd, double softcap = 0.0,
                    bool holes = false) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  // holes: a key_mask (B, Sk) masking every 5th key (no row loses all its keys: the naive
  // oracle's gradient of an empty row is NaN; tests/test_cpu_masks.py covers those rows)
  at::Tensor km;
  if (holes) {
    auto j = at::arange(Sk, at::kLong);
    km = (j.remainder(5) != 2).unsqueeze(0).expand({B, Sk}).contiguous();
  }
  const std::optional<at::Tensor> kmo = holes ? std::optional<at::Tensor>(km) : std::nullopt;
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto q64 = at::randn({B, Hq, Sq, D}, f64), k64 = at::randn({B, Hkv, Sk, D}, f64);
  auto v64 = at::randn({B, Hkv, Sk, D}, f64), do64 = at::randn({B, Hq, Sq, D}, f64);
  auto q = q64.to(dt), k = k64.to(dt), v = v64.to(dt), dout = do64.to(dt);
  q64 = q.to(at::kDouble), k64 = k.to(at::kDouble), v64 = v.to(at::kDouble);  // same inputs
  do64 = dout.to(at::kDouble);
  auto sq = at::tensor(Lq, at::kLong), sk = at::tensor(Lk, at::kLong);
  at::Tensor out, lse;
  if (cross)
    std::tie(out, lse) = op<CFwd>("mmcore_C::cross_attention_fwd").call(q, k, v, sq, sk, scale, softcap, 0.0, std::nullopt);
  else
    std::tie(out, lse) = op<Fwd>("mmcore_C::window_attention_fwd")
                             .call(q, k, v, sq, sk, left, right, causal, G, scale, softcap,
                                   std::nullopt, std::nullopt, kmo, 0.0, std::nullopt);
  auto run_ref = [&](at::ScalarType t, bool grad) {
    auto a = (t == at::kDouble ? q64 : q).clone().requires_grad_(grad);
    auto b = (t == at::kDouble ? k64 : k).clone().requires_grad_(grad);
    auto c = (t == at::kDouble ? v64 : v).clone().requires_grad_(grad);
    auto o = reference(a, b, c, Lq, Lk, left, right, causal, G, scale, softcap, km);
    std::vector<at::Tensor> res{o.detach()};
    if (grad) {
      auto g = torch::autograd::grad({o}, {a, b, c}, {t == at::kDouble ? do64 : dout});
      res.insert(res.end(), g.begin(), g.end());
    }
    return res;
  };
  // base: the naive computation in fp32 for fp32 inputs; for 16-bit inputs in fp32 from the
  // 16-bit values, rounded to the dtype (what a correct 16-bit kernel returns at best)
  auto oracle = run_ref(at::kDouble, bwd);
  auto base32 = [&] {
    auto a = q.to(at::kFloat).requires_grad_(bwd), b = k.to(at::kFloat).requires_grad_(bwd);
    auto c = v.to(at::kFloat).requires_grad_(bwd);
    auto o = reference(a, b, c, Lq, Lk, left, right, causal, G, scale, softcap, km);
    std::vector<at::Tensor> res{o.detach().to(dt)};
    if (bwd) {
      auto g = torch::autograd::grad({o}, {a, b, c}, {dout.to(at::kFloat)});
      for (auto& x : g) res.push_back(x.to(dt));
    }
    return res;
  }();
  check(label + " out", out, oracle[0], base32[0], false);
  if (!bwd) return;
  at::Tensor dq, dk, dv;
  if (cross)
    std::tie(dq, dk, dv) = op<CBwd>("mmcore_C::cross_attention_bwd")
                               .call(dout, q, k, v, out, lse, sq, sk, scale, softcap, 0.0,
                                     std::nullopt);
  else
    std::tie(dq, dk, dv) = op<Bwd>("mmcore_C::window_attention_bwd")
                               .call(dout, q, k, v, out, lse, sq, sk, left, right, causal, G, scale,
                                     softcap, std::nullopt, std::nullopt, kmo, 0.0, std::nullopt);
  check(label + " dq", dq, oracle[1], base32[1], true);
  check(label + " dk", dk, oracle[2], base32[2], true);
  check(label + " dv", dv, oracle[3], base32[3], true);
}

using LFwd = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&);

// LoRA: y = x W^T + b + s_a (x A_a^T) B_a^T per row's adapter a (-1: base only).
void lora_case(at::ScalarType dt) {
  const int64_t M = 67, K = 48, N = 40, A = 3, r = 4;
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto x = at::randn({M, K}, f64).to(dt), w = at::randn({N, K}, f64).to(dt);
  auto bias = at::randn({N}, f64).to(dt), la = at::randn({A, r, K}, f64).to(dt);
  auto lb = at::randn({A, N, r}, f64).to(dt);
  auto sc = at::tensor(std::vector<float>{0.5f, 2.0f, 1.25f});
  auto ids = at::randint(-1, A, {M}, at::kLong);
  auto y = op<LFwd>("mmcore_C::lora_linear_fwd").call(x, w, bias, la, lb, sc, ids);
  auto ref = [&](at::ScalarType t) {
    auto X = x.to(t), W = w.to(t), Bi = bias.to(t), LA = la.to(t), LB = lb.to(t);
    auto out = at::addmm(Bi, X, W.t());
    for (int64_t m = 0; m < M; ++m) {
      const int64_t a = ids[m].item<int64_t>();
      if (a < 0) continue;
      out[m] += sc[a].item<double>() * at::mv(LB[a], at::mv(LA[a], X[m]));
    }
    return out;
  };
  check(std::string("lora_linear fwd ") + c10::toString(dt), y, ref(at::kDouble),
        ref(at::kFloat).to(dt), false);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto t0 = std::chrono::steady_clock::now();
  const char* gemm = std::getenv("MMCORE_CPU_GEMM");
  std::printf("mmcore vector build: %s (cpu_isa %s), ATen capability %s, MMCORE_CPU_GEMM=%s\n",
              op<std::string()>("mmcore_C::cpu_capability").call().c_str(),
              op<std::string()>("mmcore_C::cpu_isa").call().c_str(),
              at::get_cpu_capability().c_str(), gemm ? gemm : "(default)");
  attention_case("window fp32 w=(37,21) G=3 GQA lengths", false, at::kFloat, 2, 4, 2, 300, 300,
                 32, 37, 21, false, 3, {300, 170}, {300, 211}, true);
  attention_case("window fp32 causal w=(64,0)", false, at::kFloat, 1, 2, 2, 257, 257, 64, 64,
                 0, true, 0, {257}, {257}, true);
  attention_case("window fp32 Sk=1300 (two key chunks)", false, at::kFloat, 1, 1, 1, 70, 1300,
                 16, -1, -1, false, 0, {70}, {1300}, true);
  attention_case("window bf16 w=(50,50)", false, at::kBFloat16, 1, 2, 1, 200, 200, 64, 50, 50,
                 false, 0, {200}, {200}, true);
  attention_case("window fp16 w=(31,9) G=2", false, at::kHalf, 1, 2, 2, 150, 150, 32, 31, 9,
                 false, 2, {150}, {150}, false);
  attention_case("cross fp32 GQA lengths", true, at::kFloat, 2, 4, 2, 200, 77, 32, -1, -1, false,
                 0, {200, 113}, {77, 40}, true);
  attention_case("cross bf16", true, at::kBFloat16, 1, 2, 2, 100, 50, 64, -1, -1, false, 0, {100},
                 {50}, true);
  attention_case("window fp32 softcap 2 + key_mask holes, causal w=(40,0)", false, at::kFloat,
                 1, 2, 1, 190, 190, 32, 40, 0, true, 0, {190}, {190}, true, 2.0, true);
  attention_case("window bf16 softcap 4 + key_mask, lengths", false, at::kBFloat16, 2, 2, 2, 120,
                 120, 64, -1, -1, false, 0, {120, 77}, {120, 90}, true, 4.0, true);
  attention_case("cross fp32 softcap 3", true, at::kFloat, 1, 2, 1, 90, 60, 32, -1, -1, false, 0,
                 {90}, {60}, true, 3.0);
  lora_case(at::kFloat);
  lora_case(at::kBFloat16);
  auto peak = op<std::tuple<std::string, int64_t, double>(int64_t)>("mmcore_C::fma_peak").call(1);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("fma_peak(1): %s %lld-bit %.2f GFLOP/s (emulated: not a hardware figure)\n",
              std::get<0>(peak).c_str(), static_cast<long long>(std::get<1>(peak)),
              std::get<2>(peak));
  std::printf("%d of %d checks passed in %.1f s\n", checks - failures, checks, secs);
  return failures == 0 ? 0 : 1;
}
