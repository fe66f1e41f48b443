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
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "soft_target_checks.h"

namespace ktkernels {
namespace losses_cpu {
namespace {

using at::Tensor;

constexpr int kLanes = 8;

int64_t grain_for(int64_t work_per_task) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1)); }

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
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, N, grain_for(8 * K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t* r = out + 3 * n;
      if (K == 0) {
        r[0] = acc_t(0);
        r[1] = neg_inf;
        r[2] = neg_inf;
        continue;
      }
      const scalar_t* __restrict sr = sp + n * sN;
      const scalar_t* __restrict tr = tp + n * tN;
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
        ws[l] += ea > acc_t(0) ? ea * (a - b) : acc_t(0);  // p_t = 0 adds 0, even for a = -inf (0 log 0 = 0)
      }
      for (int w = kLanes / 2; w >= 1; w /= 2) {
        for (int l = 0; l < w; ++l) {
          ss[l] += ss[l + w];
          st[l] += st[l + w];
          ws[l] += ws[l + w];
        }
      }
      const acc_t log_ss = std::log(ss[0]), log_st = std::log(st[0]);
      r[0] = ws[0] / st[0] - log_st + log_ss;
      r[1] = ms + log_ss;
      r[2] = mt + log_st;
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
  at::parallel_for(0, N, grain_for(4 * K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const acc_t kl = rp[3 * n], lse_s = rp[3 * n + 1], lse_t = rp[3 * n + 2];
      const acc_t g = gp[n] / T;
      const scalar_t* __restrict sr = sp + n * sN;
      const scalar_t* __restrict tr = tp + n * tN;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t lps = static_cast<acc_t>(sr[k]) / T - lse_s;
        const acc_t lpt = static_cast<acc_t>(tr[k]) / T - lse_t;
        const acc_t pt = std::exp(lpt);
        if (want_s) gsp[n * K + k] = static_cast<scalar_t>(g * (std::exp(lps) - pt));
        if (want_t) gtp[n * K + k] = static_cast<scalar_t>(pt > acc_t(0) ? g * pt * (lpt - lps - kl) : acc_t(0));
      }
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
