// CPU kernels of the attention-map distance (OpenMP through at::parallel_for, one task per sample).
//
// attention_map_distance_: dist[n] between the (H, W) maps map_s[n] and map_t[n], the spec being
// attention_map_distance in ktkernels/losses/reference.py:
//   kinds 0 / 1 (AT): q = A / max(||A||_2, 1e-12); d = sum (q_s - q_t)^2 (at_code) or its square root
//     (at_paper, gradient 0 at d = 0).
//   kinds 2..4 (DCT-KD): per map, Ahat = (A - min A) / clamp(max A, 1e-12) (dct_a) or
//     / clamp(max A - min A, 1e-12) (dct_b, dct); Z = Ahat - mean Ahat; R = L0 Z R0^T - L1 Z R1^T (the
//     tables: cos/sin for Re FFT2, or the DCT-II and zeros); P = |R| (dct_a) or R; D = the same min-max
//     normalisation of P; d = ||D_s - D_t||_2 (gradient 0 at d = 0).
// attention_map_distance_backward_: grad_map_s[n] = grad_dist[n] * d d[n] / d map_s[n], the gradient that
// autograd gives for the reference: min/max route theirs to the first index (row-major) of the extreme,
// clamp_min passes it iff the unclamped value >= the bound, sign(0) = 0, and the transform's adjoint is
// g_Z = L0^T g_R R0 - L1^T g_R R1.
//
// Each task reruns the forward pipeline of both maps (it is cheap next to the feature maps that produced
// them) and keeps Z, R and the extremes' indices of the student map for the backward. The transforms are
// row-major products written as row updates (out[i, :] += a[i, k] * b[k, :]) that the compiler vectorises;
// the right tables are also kept transposed so that the forward's Z R^T is such a product too. Sums use
// eight partial sums in a fixed order: deterministic, and about sqrt(8) times tighter than one running sum.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "attention_map_checks.h"

namespace ktkernels {
namespace attention_map_cpu {
namespace {

using at::Tensor;

// The clamp of every normalising denominator (reference.py: NORM_EPS).
constexpr double kNormEps = 1e-12;

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1));
}

// sum_{i < n} f(i) with eight partial sums, combined pairwise.
template <typename T, typename F>
inline T sum_of(int64_t n, F f) {
  constexpr int kLanes = 8;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) part[k] += f(i + k);
  }
  for (int k = 0; i < n; ++i, ++k) part[k] += f(i);
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int k = 0; k < w; ++k) part[k] += part[k + w];
  }
  return part[0];
}

// The smallest and largest of f(0..n-1) and the first index of each (strict comparisons keep the first).
template <typename T, typename F>
inline void extremes(int64_t n, F f, T& lo, int64_t& ilo, T& hi, int64_t& ihi) {
  lo = hi = f(0);
  ilo = ihi = 0;
  for (int64_t i = 1; i < n; ++i) {
    const T v = f(i);
    if (v < lo) {
      lo = v;
      ilo = i;
    }
    if (v > hi) {
      hi = v;
      ihi = i;
    }
  }
}

template <typename T>
inline T sign_of(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

// sqrt with the reference's guard (_safe_sqrt): 0 for x <= 0, and sqrt(max(x, tiny)) otherwise, so NaN stays NaN
// (std::max returns its first argument when they compare false): a NaN feature must show in the loss.
template <typename T>
inline T safe_sqrt(T x) {
  return x <= T(0) ? T(0) : std::sqrt(std::max(x, std::numeric_limits<T>::min()));
}

// d safe_sqrt / dx times g, as autograd computes it: g / (2 sqrt(x)) where x >= tiny (clamp_min passes the
// gradient there) or x is NaN, else 0.
template <typename T>
inline T safe_sqrt_grad(T x, T d, T g) {
  return x < std::numeric_limits<T>::min() ? T(0) : g / (T(2) * d);
}

template <typename T>
struct Args {
  const T* s;   // (N, H, W)
  const T* t;   // (N, H, W)
  const T* L0;  // (H, H)
  const T* L1;
  const T* R0;  // (W, W)
  const T* R1;
  const T* R0T;  // R0 transposed
  const T* R1T;
  T* dist;          // forward: (N,)
  const T* gdist;   // backward: (N,), stride gstride
  int64_t gstride;
  T* grad;  // backward: (N, H, W)
  int64_t N, H, W;
  int kind;
};

// ------------------------------------------------------------------------------------------------
// Kinds 0 and 1: attention transfer
// ------------------------------------------------------------------------------------------------

template <typename T>
struct AtSample {
  T nrm_s, c_s, c_t, sq, d;
};

template <typename T>
AtSample<T> at_forward(const Args<T>& a, const T* s, const T* t) {
  const int64_t HW = a.H * a.W;
  const T eps = static_cast<T>(kNormEps);
  AtSample<T> r;
  r.nrm_s = std::sqrt(sum_of<T>(HW, [&](int64_t i) { return s[i] * s[i]; }));
  const T nrm_t = std::sqrt(sum_of<T>(HW, [&](int64_t i) { return t[i] * t[i]; }));
  r.c_s = std::max(r.nrm_s, eps);
  r.c_t = std::max(nrm_t, eps);
  r.sq = sum_of<T>(HW, [&](int64_t i) {
    const T diff = s[i] / r.c_s - t[i] / r.c_t;
    return diff * diff;
  });
  r.d = a.kind == 0 ? r.sq : safe_sqrt(r.sq);
  return r;
}

template <typename T>
void at_backward(const Args<T>& a, const T* s, const T* t, T g, T* grad) {
  const int64_t HW = a.H * a.W;
  const AtSample<T> f = at_forward(a, s, t);
  // g_sq = d d / d sq times g; then g_q = g_sq * 2 (q_s - q_t).
  const T gsq = a.kind == 0 ? g : safe_sqrt_grad(f.sq, f.d, g);
  auto gq = [&](int64_t i) { return gsq * (T(2) * (s[i] / f.c_s - t[i] / f.c_t)); };
  // q = A / c with c = max(||A||, eps): g_A = g_q / c, plus, where ||A|| >= eps, A * g_c / ||A|| with
  // g_c = -<g_q, A> / c^2.
  T coef = T(0);
  if (f.nrm_s >= static_cast<T>(kNormEps)) {
    const T gc = -sum_of<T>(HW, [&](int64_t i) { return gq(i) * s[i]; }) / (f.c_s * f.c_s);
    coef = gc / f.nrm_s;
  }
  for (int64_t i = 0; i < HW; ++i) grad[i] = gq(i) / f.c_s + s[i] * coef;
}

// ------------------------------------------------------------------------------------------------
// Kinds 2..4: DCT-KD
// ------------------------------------------------------------------------------------------------

// One map's pipeline state: the normalisation of A and of P, with the extremes' first indices.
template <typename T>
struct MapState {
  T lo, den, denc;
  int64_t ilo, ihi;
  T plo, pden, pdenc;
  int64_t iplo, iphi;
};

// Per-task buffers (H*W each).
template <typename T>
struct Work {
  std::vector<T> z, tmp, r, r1, d_t;
  explicit Work(int64_t hw)
      : z(static_cast<size_t>(hw)), tmp(static_cast<size_t>(hw)), r(static_cast<size_t>(hw)),
        r1(static_cast<size_t>(hw)), d_t(static_cast<size_t>(hw)) {}
};

// out (M x C) = a (M x K) @ b (K x C), all row-major, as row updates.
template <typename T>
void matmul(int64_t M, int64_t K, int64_t C, const T* a, const T* b, T* out) {
  std::fill(out, out + M * C, T(0));
  for (int64_t i = 0; i < M; ++i) {
    T* __restrict o = out + i * C;
    for (int64_t k = 0; k < K; ++k) {
      const T aik = a[i * K + k];
      const T* __restrict bk = b + k * C;
      for (int64_t j = 0; j < C; ++j) o[j] += aik * bk[j];
    }
  }
}

// out (M x C) = a^T @ b with a (K x M) and b (K x C) row-major.
template <typename T>
void matmul_tn(int64_t M, int64_t K, int64_t C, const T* a, const T* b, T* out) {
  std::fill(out, out + M * C, T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict bk = b + k * C;
    for (int64_t i = 0; i < M; ++i) {
      const T aki = a[k * M + i];
      T* __restrict o = out + i * C;
      for (int64_t j = 0; j < C; ++j) o[j] += aki * bk[j];
    }
  }
}

// P = |R| (dct_a) or R.
template <typename T>
inline T p_of(int kind, T r) {
  return kind == 2 ? std::abs(r) : r;
}

// The forward pipeline of map A: fills st, w.z (Z) and w.r (R); clobbers w.tmp and w.r1.
template <typename T>
void map_forward(const Args<T>& a, const T* A, Work<T>& w, MapState<T>& st) {
  const int64_t H = a.H, W = a.W, HW = H * W;
  const int kind = a.kind;
  const T eps = static_cast<T>(kNormEps);
  T hi;
  extremes<T>(HW, [&](int64_t i) { return A[i]; }, st.lo, st.ilo, hi, st.ihi);
  st.den = kind == 2 ? hi : hi - st.lo;
  st.denc = std::max(st.den, eps);
  T* z = w.z.data();
  for (int64_t i = 0; i < HW; ++i) z[i] = (A[i] - st.lo) / st.denc;
  const T mean = sum_of<T>(HW, [&](int64_t i) { return z[i]; }) / static_cast<T>(HW);
  for (int64_t i = 0; i < HW; ++i) z[i] -= mean;
  // R = L0 (Z R0^T) - L1 (Z R1^T).
  matmul(H, W, W, z, a.R0T, w.tmp.data());
  matmul(H, H, W, a.L0, w.tmp.data(), w.r.data());
  matmul(H, W, W, z, a.R1T, w.tmp.data());
  matmul(H, H, W, a.L1, w.tmp.data(), w.r1.data());
  T* r = w.r.data();
  for (int64_t i = 0; i < HW; ++i) r[i] -= w.r1[i];
  T phi;
  extremes<T>(HW, [&](int64_t i) { return p_of(kind, r[i]); }, st.plo, st.iplo, phi, st.iphi);
  st.pden = kind == 2 ? phi : phi - st.plo;
  st.pdenc = std::max(st.pden, eps);
}

// D of the map whose R is in w.r.
template <typename T>
inline T coef_at(int kind, const T* r, const MapState<T>& st, int64_t i) {
  return (p_of(kind, r[i]) - st.plo) / st.pdenc;
}

// Forward of both maps: the teacher's D into w.d_t, then the student's pipeline (left in w), and
// S = sum (D_s - D_t)^2.
template <typename T>
T dct_sum_sq(const Args<T>& a, const T* s, const T* t, Work<T>& w, MapState<T>& st) {
  const int64_t HW = a.H * a.W;
  map_forward(a, t, w, st);
  for (int64_t i = 0; i < HW; ++i) w.d_t[i] = coef_at(a.kind, w.r.data(), st, i);
  map_forward(a, s, w, st);
  const T* r = w.r.data();
  const T* dt = w.d_t.data();
  return sum_of<T>(HW, [&](int64_t i) {
    const T diff = coef_at(a.kind, r, st, i) - dt[i];
    return diff * diff;
  });
}

template <typename T>
void dct_backward(const Args<T>& a, const T* s, const T* t, T g, Work<T>& w, T* grad) {
  const int64_t H = a.H, W = a.W, HW = H * W;
  const int kind = a.kind;
  const T eps = static_cast<T>(kNormEps);
  MapState<T> st;
  const T S = dct_sum_sq(a, s, t, w, st);
  const T gS = safe_sqrt_grad(S, safe_sqrt(S), g);
  if (gS == T(0)) {  // identical maps (or a zero grad_dist): nothing flows back
    std::fill(grad, grad + HW, T(0));
    return;
  }
  const T* r = w.r.data();
  // g_D = gS * 2 (D_s - D_t), kept in d_t. D = u / pdenc with u = P - plo.
  T* gd = w.d_t.data();
  for (int64_t i = 0; i < HW; ++i) gd[i] = gS * (T(2) * (coef_at(kind, r, st, i) - gd[i]));
  const T gpdenc = -sum_of<T>(HW, [&](int64_t i) { return gd[i] * (p_of(kind, r[i]) - st.plo); }) /
                   (st.pdenc * st.pdenc);
  const T gpden = st.pden >= eps ? gpdenc : T(0);
  const T sum_gu = sum_of<T>(HW, [&](int64_t i) { return gd[i] / st.pdenc; });
  const T gplo = kind == 2 ? -sum_gu : -sum_gu - gpden;
  // g_P = g_u + the min's and the max's gradients at their indices; g_R = g_P sign(R) for dct_a.
  for (int64_t i = 0; i < HW; ++i) gd[i] /= st.pdenc;
  gd[st.iplo] += gplo;
  gd[st.iphi] += gpden;
  if (kind == 2) {
    for (int64_t i = 0; i < HW; ++i) gd[i] *= sign_of(r[i]);
  }
  // g_Z = L0^T (g_R R0) - L1^T (g_R R1), into z.
  T* gz = w.z.data();
  T* tmp = w.tmp.data();
  T* r1 = w.r1.data();
  matmul(H, W, W, gd, a.R0, tmp);
  matmul_tn(H, H, W, a.L0, tmp, gz);
  matmul(H, W, W, gd, a.R1, tmp);
  matmul_tn(H, H, W, a.L1, tmp, r1);
  for (int64_t i = 0; i < HW; ++i) gz[i] -= r1[i];
  // Mean subtraction: g_Ahat = g_Z - mean(g_Z). Ahat = (A - lo) / denc.
  const T mean = sum_of<T>(HW, [&](int64_t i) { return gz[i]; }) / static_cast<T>(HW);
  for (int64_t i = 0; i < HW; ++i) gz[i] -= mean;
  const T gdenc = -sum_of<T>(HW, [&](int64_t i) { return gz[i] * (s[i] - st.lo); }) / (st.denc * st.denc);
  const T gden = st.den >= eps ? gdenc : T(0);
  const T sum_ga = sum_of<T>(HW, [&](int64_t i) { return gz[i] / st.denc; });
  const T glo = kind == 2 ? -sum_ga : -sum_ga - gden;
  for (int64_t i = 0; i < HW; ++i) grad[i] = gz[i] / st.denc;
  grad[st.ilo] += glo;
  grad[st.ihi] += gden;
}

// ------------------------------------------------------------------------------------------------
// Drivers
// ------------------------------------------------------------------------------------------------

// Cost of one sample, for the parallel grain.
int64_t sample_cost(int kind, int64_t H, int64_t W) {
  return kind < 2 ? 4 * H * W : 4 * H * W * (H + W) + 16 * H * W;
}

template <typename T>
std::vector<T> transposed(const T* m, int64_t n) {
  std::vector<T> out(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) out[j * n + i] = m[i * n + j];
  }
  return out;
}

template <typename T>
void run(const Tensor& map_s, const Tensor& map_t, int64_t kind, const Tensor& left, const Tensor& right,
         const Tensor* dist, const Tensor* grad_dist, const Tensor* grad) {
  Args<T> a{};
  a.N = map_s.size(0);
  a.H = map_s.size(1);
  a.W = map_s.size(2);
  a.kind = static_cast<int>(kind);
  if (a.N == 0) return;
  a.s = map_s.const_data_ptr<T>();
  a.t = map_t.const_data_ptr<T>();
  std::vector<T> r0t, r1t;
  if (kind >= 2) {
    const T* L = left.const_data_ptr<T>();
    const T* R = right.const_data_ptr<T>();
    a.L0 = L;
    a.L1 = L + a.H * a.H;
    a.R0 = R;
    a.R1 = R + a.W * a.W;
    r0t = transposed(a.R0, a.W);
    r1t = transposed(a.R1, a.W);
    a.R0T = r0t.data();
    a.R1T = r1t.data();
  }
  const int64_t HW = a.H * a.W;
  if (dist != nullptr) a.dist = dist->mutable_data_ptr<T>();
  if (grad != nullptr) {
    a.gdist = grad_dist->const_data_ptr<T>();
    a.gstride = grad_dist->stride(0);
    a.grad = grad->mutable_data_ptr<T>();
  }
  const bool backward = grad != nullptr;
  at::parallel_for(0, a.N, grain_for(sample_cost(a.kind, a.H, a.W)), [&](int64_t begin, int64_t end) {
    std::unique_ptr<Work<T>> w;
    if (a.kind >= 2) w = std::make_unique<Work<T>>(HW);
    for (int64_t n = begin; n < end; ++n) {
      const T* s = a.s + n * HW;
      const T* t = a.t + n * HW;
      if (!backward) {
        if (a.kind < 2) {
          a.dist[n] = at_forward(a, s, t).d;
        } else {
          MapState<T> st;
          a.dist[n] = safe_sqrt(dct_sum_sq(a, s, t, *w, st));
        }
      } else {
        const T g = a.gdist[n * a.gstride];
        if (a.kind < 2) {
          at_backward(a, s, t, g, a.grad + n * HW);
        } else {
          dct_backward(a, s, t, g, *w, a.grad + n * HW);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Op entry points
// ------------------------------------------------------------------------------------------------

void check_cpu(const char* op, const Tensor& map_s) {
  TORCH_CHECK(map_s.device().is_cpu(), op, ": map_s must be a CPU tensor, got ", map_s.device());
}

void attention_map_distance_cpu(const Tensor& map_s, const Tensor& map_t, int64_t kind, const Tensor& left,
                                const Tensor& right, const Tensor& dist) {
  const char* op = "attention_map_distance_";
  check_cpu(op, map_s);
  ktk_attention_map_checks::check_distance(op, map_s, map_t, kind, left, right, dist);
  AT_DISPATCH_FLOATING_TYPES(map_s.scalar_type(), "attention_map_distance_cpu",
                             [&] { run<scalar_t>(map_s, map_t, kind, left, right, &dist, nullptr, nullptr); });
}

void attention_map_distance_backward_cpu(const Tensor& map_s, const Tensor& map_t, const Tensor& grad_dist,
                                         int64_t kind, const Tensor& left, const Tensor& right,
                                         const Tensor& grad_map_s) {
  const char* op = "attention_map_distance_backward_";
  check_cpu(op, map_s);
  ktk_attention_map_checks::check_distance_backward(op, map_s, map_t, grad_dist, kind, left, right, grad_map_s);
  AT_DISPATCH_FLOATING_TYPES(map_s.scalar_type(), "attention_map_distance_backward_cpu", [&] {
    run<scalar_t>(map_s, map_t, kind, left, right, nullptr, &grad_dist, &grad_map_s);
  });
}

}  // namespace
}  // namespace attention_map_cpu
}  // namespace ktkernels

TORCH_LIBRARY_IMPL(ktkernels_C, CPU, m) {
  m.impl("attention_map_distance_", &ktkernels::attention_map_cpu::attention_map_distance_cpu);
  m.impl("attention_map_distance_backward_", &ktkernels::attention_map_cpu::attention_map_distance_backward_cpu);
}
