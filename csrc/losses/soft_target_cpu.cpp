// CPU kernels of the soft-target loss (OpenMP through at::parallel_for over rows).
//
// soft_target_forward_: per row, with z/T computed in acc (float, double for float64 logits) as z / T,
//   pass 1: the maxima m_s, m_t of s/T and t/T (max(z)/T: division by T > 0 is monotone, so it is the max of z/T);
//   pass 2: with a = t/T - m_t <= 0 and b = s/T - m_s <= 0,
//           S_t = sum e^a, S_s = sum e^b, W = sum e^a (a - b)   (kLanes partial sums, fixed order);
//   lse_s = m_s + log S_s, lse_t = m_t + log S_t, kl = W / S_t - log S_t + log S_s.
// Every exponent is <= 0 and every difference a - b is of two shifted logits, so huge logits (|z| ~ 1e30 in
// float32) give no overflow and no inf - inf; kl is kept exact (no clamp at 0). An empty row (K = 0) gives
// [0, -inf, -inf], as logsumexp and the sum over no classes do.
// soft_target_backward_: elementwise from the saved rows, with log p = z/T - lse (z/T computed as in the
// forward, so that the argmax of a one-hot row gives log p_t - log p_s - kl = 0 exactly):
//   grad_s = g/T (p_s - p_t),  grad_t = g/T p_t (log p_t - log p_s - kl).
// Speed: the exponentials dominate (two per class, forward and backward). For float math on an AVX2+FMA CPU the
// rows run eight classes at a time with Sleef's expf (1 ulp; the one ATen's own vectorised CPU kernels call,
// exported by libtorch_cpu); elsewhere (float64, no AVX2, ATEN_CPU_CAPABILITY=default, no Sleef) through
// std::exp. Both keep class k in lane k % 8 and sum the lanes in the same tree, so they differ only in the
// rounding of e^x.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../common/cpu_convert.h"
#include "../common/cpu_isa.h"
#include "soft_target_checks.h"

namespace ktkernels {
namespace losses_cpu {
namespace {

using at::Tensor;

constexpr int kLanes = 8;

int64_t grain_for(int64_t work_per_task) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1)); }

// Sums the kLanes partial sums in place (fixed tree); the total ends in v[0].
template <typename acc_t>
void sum_lanes(acc_t* v) {
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) v[l] += v[l + w];
  }
}

// r = [kl, lse_s, lse_t] from the lane sums of pass 2 and the shifts.
template <typename acc_t>
void finish_row(acc_t* ss, acc_t* st, acc_t* ws, acc_t ms, acc_t mt, acc_t* r) {
  sum_lanes(ss);
  sum_lanes(st);
  sum_lanes(ws);
  const acc_t log_ss = std::log(ss[0]), log_st = std::log(st[0]);
  r[0] = ws[0] / st[0] - log_st + log_ss;
  r[1] = ms + log_ss;
  r[2] = mt + log_st;
}

template <typename scalar_t, typename acc_t>
void forward_row(const scalar_t* __restrict sr, const scalar_t* __restrict tr, int64_t K, acc_t T, acc_t* r) {
  acc_t ms = static_cast<acc_t>(sr[0]), mt = static_cast<acc_t>(tr[0]);
  for (int64_t k = 1; k < K; ++k) {
    ms = std::max(ms, static_cast<acc_t>(sr[k]));
    mt = std::max(mt, static_cast<acc_t>(tr[k]));
  }
  ms /= T;
  mt /= T;
  acc_t ss[kLanes], st[kLanes], ws[kLanes];
  for (int l = 0; l < kLanes; ++l) ss[l] = st[l] = ws[l] = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    const int l = static_cast<int>(k % kLanes);
    const acc_t a = static_cast<acc_t>(tr[k]) / T - mt;
    const acc_t b = static_cast<acc_t>(sr[k]) / T - ms;
    const acc_t ea = std::exp(a);
    st[l] += ea;
    ss[l] += std::exp(b);
    ws[l] += ea == acc_t(0) ? acc_t(0) : ea * (a - b);  // p_t = 0 adds 0, even for a = -inf (0 log 0 = 0); NaN stays
  }
  finish_row(ss, st, ws, ms, mt, r);
}

template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* __restrict sr, const scalar_t* __restrict tr, int64_t K, acc_t T, const acc_t* saved,
                  acc_t g, scalar_t* __restrict gs, scalar_t* __restrict gt) {
  const acc_t kl = saved[0], lse_s = saved[1], lse_t = saved[2];
  for (int64_t k = 0; k < K; ++k) {
    const acc_t lps = static_cast<acc_t>(sr[k]) / T - lse_s;
    const acc_t lpt = static_cast<acc_t>(tr[k]) / T - lse_t;
    const acc_t pt = std::exp(lpt);
    if (gs) gs[k] = static_cast<scalar_t>(g * (std::exp(lps) - pt));
    if (gt) gt[k] = static_cast<scalar_t>(pt == acc_t(0) ? acc_t(0) : g * pt * (lpt - lps - kl));
  }
}

#if KTK_X86_CLONES
// The same two rows, eight classes per instruction. Every step is the scalar one's IEEE operation (no FMA
// contraction), in the same order per lane; only e^x is Sleef's.
#define KTK_AVX2 __attribute__((target("avx2,fma")))

// Weak: a libtorch_cpu without the symbol leaves it null, and the rows keep the scalar path (use_sleef_avx2).
extern "C" __attribute__((weak)) KTK_AVX2 __m256 Sleef_expf8_u10(__m256);

bool use_sleef_avx2() { return ktk_cpu::use_avx2() && Sleef_expf8_u10 != nullptr; }

// Eight values from p as float: the first n of them, the rest `fill` (n < 8: a row's last classes). Eight bf16 or
// fp16 values widen in registers (cpu_convert.h: no F16C assumed, ktk_cpu::use_avx2 checks AVX2 and FMA only); a
// short tail goes through c10's scalar conversion, whose branches are cheaper one lane at a time.
template <typename scalar_t>
KTK_AVX2 inline __m256 load8(const scalar_t* p, int n = kLanes, float fill = 0.f) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == kLanes) return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (n == kLanes) return reinterpret_cast<__m256>(ktk_cpu::widen8(p));
  }
  alignas(32) float v[kLanes];
  for (int l = 0; l < kLanes; ++l) v[l] = l < n ? static_cast<float>(p[l]) : fill;
  return _mm256_load_ps(v);
}

// The first n of eight floats to p, rounded to scalar_t as static_cast does.
template <typename scalar_t>
KTK_AVX2 inline void store8(scalar_t* p, __m256 v, int n = kLanes) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == kLanes) return _mm256_storeu_ps(p, v);
  }
  alignas(32) float f[kLanes];
  _mm256_store_ps(f, v);
  for (int l = 0; l < n; ++l) p[l] = static_cast<scalar_t>(f[l]);
}

KTK_AVX2 inline float max_lanes(__m256 v) {
  alignas(32) float f[kLanes];
  _mm256_store_ps(f, v);
  float m = f[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, f[l]);
  return m;
}

// Lanes where v == 0 give 0, the others x (the scalar `v == 0 ? 0 : x`; NaN v keeps x, so a NaN row stays NaN).
KTK_AVX2 inline __m256 zero_where_zero(__m256 v, __m256 x) {
  return _mm256_andnot_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_EQ_OQ), x);
}

template <typename scalar_t>
KTK_AVX2 void forward_row_avx2(const scalar_t* sr, const scalar_t* tr, int64_t K, float T, float* r) {
  // Pass 1. Lane maxima in any order give the row's maximum (up to the sign of a zero, which changes no later
  // value); a NaN anywhere makes pass 2 NaN whatever the maximum.
  const float s0 = static_cast<float>(sr[0]), t0 = static_cast<float>(tr[0]);
  __m256 vms = _mm256_set1_ps(s0), vmt = _mm256_set1_ps(t0);
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, K - k0));
    vms = _mm256_max_ps(vms, load8(sr + k0, n, s0));
    vmt = _mm256_max_ps(vmt, load8(tr + k0, n, t0));
  }
  const float ms = max_lanes(vms) / T, mt = max_lanes(vmt) / T;
  // Pass 2
  const __m256 vT = _mm256_set1_ps(T);
  vms = _mm256_set1_ps(ms);
  vmt = _mm256_set1_ps(mt);
  __m256 vss = _mm256_setzero_ps(), vst = _mm256_setzero_ps(), vws = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, K - k0));
    const __m256 a = _mm256_sub_ps(_mm256_div_ps(load8(tr + k0, n), vT), vmt);
    const __m256 b = _mm256_sub_ps(_mm256_div_ps(load8(sr + k0, n), vT), vms);
    __m256 ea = Sleef_expf8_u10(a), eb = Sleef_expf8_u10(b);
    if (n < kLanes) {  // lanes past the row add nothing
      const __m256 in = _mm256_cmp_ps(_mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_ps(n), _CMP_LT_OQ);
      ea = _mm256_and_ps(in, ea);
      eb = _mm256_and_ps(in, eb);
    }
    vst = _mm256_add_ps(vst, ea);
    vss = _mm256_add_ps(vss, eb);
    vws = _mm256_add_ps(vws, zero_where_zero(ea, _mm256_mul_ps(ea, _mm256_sub_ps(a, b))));
  }
  alignas(32) float ss[kLanes], st[kLanes], ws[kLanes];
  _mm256_store_ps(ss, vss);
  _mm256_store_ps(st, vst);
  _mm256_store_ps(ws, vws);
  finish_row(ss, st, ws, ms, mt, r);
}

template <typename scalar_t>
KTK_AVX2 void backward_row_avx2(const scalar_t* sr, const scalar_t* tr, int64_t K, float T, const float* saved,
                                float g, scalar_t* gs, scalar_t* gt) {
  const __m256 vT = _mm256_set1_ps(T), vg = _mm256_set1_ps(g), kl = _mm256_set1_ps(saved[0]);
  const __m256 lse_s = _mm256_set1_ps(saved[1]), lse_t = _mm256_set1_ps(saved[2]);
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, K - k0));
    const __m256 lps = _mm256_sub_ps(_mm256_div_ps(load8(sr + k0, n), vT), lse_s);
    const __m256 lpt = _mm256_sub_ps(_mm256_div_ps(load8(tr + k0, n), vT), lse_t);
    const __m256 pt = Sleef_expf8_u10(lpt);
    if (gs) store8(gs + k0, _mm256_mul_ps(vg, _mm256_sub_ps(Sleef_expf8_u10(lps), pt)), n);
    if (gt) {
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(vg, pt), _mm256_sub_ps(_mm256_sub_ps(lpt, lps), kl));
      store8(gt + k0, zero_where_zero(pt, v), n);
    }
  }
}
#undef KTK_AVX2
#endif

// Whether a row of scalar_t takes the AVX2 path: float math (float, half, bfloat16) on a CPU and a torch with it.
template <typename scalar_t>
bool rows_in_avx2() {
#if KTK_X86_CLONES
  if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) return use_sleef_avx2();
#endif
  return false;
}

template <typename scalar_t>
void soft_target_forward_kernel(const Tensor& s, const Tensor& t, double temperature, const Tensor& rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.size(0), K = s.size(1);
  if (N == 0) return;
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const int64_t sN = s.stride(0), tN = t.stride(0);
  acc_t* out = rows.mutable_data_ptr<acc_t>();
  const acc_t T = static_cast<acc_t>(temperature);
  const bool avx2 = rows_in_avx2<scalar_t>();
  at::parallel_for(0, N, grain_for(8 * K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t* r = out + 3 * n;
      if (K == 0) {
        r[0] = acc_t(0);
        r[1] = r[2] = -std::numeric_limits<acc_t>::infinity();
        continue;
      }
#if KTK_X86_CLONES
      if constexpr (std::is_same_v<acc_t, float>) {
        if (avx2) {
          forward_row_avx2(sp + n * sN, tp + n * tN, K, T, r);
          continue;
        }
      }
#endif
      forward_row(sp + n * sN, tp + n * tN, K, T, r);
    }
  });
}

template <typename scalar_t>
void soft_target_backward_kernel(const Tensor& s, const Tensor& t, double temperature, const Tensor& rows,
                                 const Tensor& grad_rows, const Tensor& grad_s, const Tensor& grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.size(0), K = s.size(1);
  const bool want_s = grad_s.numel() > 0, want_t = grad_t.numel() > 0;
  if (N * K == 0 || !(want_s || want_t)) return;
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const int64_t sN = s.stride(0), tN = t.stride(0);
  const acc_t* rp = rows.const_data_ptr<acc_t>();
  const acc_t* gp = grad_rows.const_data_ptr<acc_t>();
  scalar_t* gsp = want_s ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gtp = want_t ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t T = static_cast<acc_t>(temperature);
  const bool avx2 = rows_in_avx2<scalar_t>();
  at::parallel_for(0, N, grain_for(4 * K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* gs = gsp ? gsp + n * K : nullptr;
      scalar_t* gt = gtp ? gtp + n * K : nullptr;
#if KTK_X86_CLONES
      if constexpr (std::is_same_v<acc_t, float>) {
        if (avx2) {
          backward_row_avx2(sp + n * sN, tp + n * tN, K, T, rp + 3 * n, gp[n] / T, gs, gt);
          continue;
        }
      }
#endif
      backward_row(sp + n * sN, tp + n * tN, K, T, rp + 3 * n, gp[n] / T, gs, gt);
    }
  });
}

void check_cpu(const char* op, const Tensor& s) {
  TORCH_CHECK(s.device().is_cpu(), op, ": s must be a CPU tensor, got ", s.device());
}

void soft_target_forward_cpu(const Tensor& s, const Tensor& t, double temperature, const Tensor& rows) {
  const char* op = "soft_target_forward_";
  check_cpu(op, s);
  ktk_losses_checks::check_soft_target_forward(op, s, t, temperature, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "soft_target_forward_cpu",
                                  [&] { soft_target_forward_kernel<scalar_t>(s, t, temperature, rows); });
}

void soft_target_backward_cpu(const Tensor& s, const Tensor& t, double temperature, const Tensor& rows,
                              const Tensor& grad_rows, const Tensor& grad_s, const Tensor& grad_t) {
  const char* op = "soft_target_backward_";
  check_cpu(op, s);
  ktk_losses_checks::check_soft_target_backward(op, s, t, temperature, rows, grad_rows, grad_s, grad_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "soft_target_backward_cpu", [&] {
    soft_target_backward_kernel<scalar_t>(s, t, temperature, rows, grad_rows, grad_s, grad_t);
  });
}

}  // namespace
}  // namespace losses_cpu
}  // namespace ktkernels

TORCH_LIBRARY_IMPL(ktkernels_C, CPU, m) {
  m.impl("soft_target_forward_", &ktkernels::losses_cpu::soft_target_forward_cpu);
  m.impl("soft_target_backward_", &ktkernels::losses_cpu::soft_target_backward_cpu);
}
