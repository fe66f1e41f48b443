// CUDA kernels of the soft-target loss (no torch headers here; see soft_target_cuda.h).
//
// 1. soft_target_forward: a group of G threads (32..256, by K) per row, 256/G rows per block. With z/T computed
//    in acc as z / T (IEEE division, as the CPU kernel), two passes over the row (the second from cache):
//      pass 1: the maxima m_s, m_t of s/T and t/T (max(z)/T: division by T > 0 is monotone);
//      pass 2: with a = t/T - m_t <= 0 and b = s/T - m_s <= 0: S_t = sum e^a, S_s = sum e^b, W = sum e^a (a - b);
//    lse_s = m_s + log S_s, lse_t = m_t + log S_t, kl = W / S_t - log S_t + log S_s (no clamp). Every exponent is
//    <= 0 and every difference is of shifted logits, so |z| up to ~1e30 (float32) overflows nowhere. K = 0 gives
//    [0, -inf, -inf]. Group reductions: warp butterflies, then the group's warps in order (deterministic).
// 2. soft_target_backward: elementwise (grid-stride over N*K), with log p = z/T - lse from the saved rows:
//    grad_s = g/T (p_s - p_t), grad_t = g/T p_t (log p_t - log p_s - kl).
#include "soft_target_cuda.h"

#include "../common/cuda_device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace ktk_losses_cuda {
namespace {

using namespace ktk_cuda;  // dtype helpers, ldg, ceil_div (csrc/common/cuda_device.cuh)

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

struct SoftArgs {
  const void* s;
  const void* t;
  int64_t s_row, t_row;  // row strides
  int64_t N;
  int K;
  int group;  // forward: threads per row
  double T;
  void* rows;             // (N, 3) acc
  const void* grad_rows;  // (N,) acc
  void* gs;               // (N, K) or null
  void* gt;               // (N, K) or null
};

// Sum (MAX = false) or maximum (MAX = true) over the G threads of a group; every thread gets the result. G is
// uniform over the block, so the barriers are reached by all threads.
template <bool MAX, typename A>
__device__ __forceinline__ A group_reduce(A x, int G, A* red) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) {
    const A y = __shfl_xor_sync(0xffffffffu, x, off);
    x = MAX ? max_acc(x, y) : x + y;
  }
  if (G > 32) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();  // red may still be read by a previous reduction
    if (lane == 0) red[warp] = x;
    __syncthreads();
    const int w0 = (threadIdx.x / G) * (G / 32);
    x = red[w0];
    for (int k = 1; k < G / 32; ++k) x = MAX ? max_acc(x, red[w0 + k]) : x + red[w0 + k];
  }
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) soft_forward_kernel(const SoftArgs a) {
  using A = acc_t<T>;
  __shared__ A red[kWarps];
  const int G = a.group, K = a.K;
  const int r = threadIdx.x % G;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
  const bool valid = n < a.N;
  const T* sr = static_cast<const T*>(a.s) + (valid ? n * a.s_row : 0);
  const T* tr = static_cast<const T*>(a.t) + (valid ? n * a.t_row : 0);
  const A Tm = static_cast<A>(a.T);
  A ms = -INFINITY, mt = -INFINITY;
  if (valid) {
    for (int k = r; k < K; k += G) {
      ms = max_acc(ms, to_acc(ldg(sr + k)));
      mt = max_acc(mt, to_acc(ldg(tr + k)));
    }
  }
  ms = group_reduce<true>(ms, G, red) / Tm;
  mt = group_reduce<true>(mt, G, red) / Tm;
  A ss = A(0), st = A(0), w = A(0);
  if (valid) {
    for (int k = r; k < K; k += G) {
      const A ta = to_acc(ldg(tr + k)) / Tm - mt;
      const A sb = to_acc(ldg(sr + k)) / Tm - ms;
      const A ea = exp_acc(ta);
      st += ea;
      ss += exp_acc(sb);
      w += ea == A(0) ? A(0) : ea * (ta - sb);  // p_t = 0 adds 0, even for ta = -inf (0 log 0 = 0); NaN stays
    }
  }
  ss = group_reduce<false>(ss, G, red);
  st = group_reduce<false>(st, G, red);
  w = group_reduce<false>(w, G, red);
  if (!valid || r != 0) return;
  A* out = static_cast<A*>(a.rows) + 3 * n;
  if (K == 0) {
    out[0] = A(0);
    out[1] = -INFINITY;
    out[2] = -INFINITY;
    return;
  }
  const A log_ss = log_acc(ss), log_st = log_acc(st);
  out[0] = w / st - log_st + log_ss;
  out[1] = ms + log_ss;
  out[2] = mt + log_st;
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) soft_backward_kernel(const SoftArgs a, const I total) {
  using A = acc_t<T>;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  const I K = static_cast<I>(a.K);
  const T* s = static_cast<const T*>(a.s);
  const T* t = static_cast<const T*>(a.t);
  const A* rows = static_cast<const A*>(a.rows);
  const A* grad_rows = static_cast<const A*>(a.grad_rows);
  T* gs = static_cast<T*>(a.gs);
  T* gt = static_cast<T*>(a.gt);
  const A Tm = static_cast<A>(a.T);
  for (I e = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const I n = e / K, k = e - n * K;
    const int64_t n64 = static_cast<int64_t>(n), k64 = static_cast<int64_t>(k);
    const A kl = ldg(rows + 3 * n64), lse_s = ldg(rows + 3 * n64 + 1), lse_t = ldg(rows + 3 * n64 + 2);
    const A g = ldg(grad_rows + n64) / Tm;
    const A lps = to_acc(ldg(s + n64 * a.s_row + k64)) / Tm - lse_s;
    const A lpt = to_acc(ldg(t + n64 * a.t_row + k64)) / Tm - lse_t;
    const A pt = exp_acc(lpt);
    if (gs != nullptr) gs[n64 * a.K + k64] = from_acc<T>(g * (exp_acc(lps) - pt));
    if (gt != nullptr) gt[n64 * a.K + k64] = from_acc<T>(pt == A(0) ? A(0) : g * pt * (lpt - lps - kl));
  }
}

SoftArgs soft_args(const Logits& s, const Logits& t, int64_t N, int64_t K, double temperature) {
  SoftArgs a{};
  a.s = s.data;
  a.t = t.data;
  a.s_row = s.row_stride;
  a.t_row = t.row_stride;
  a.N = N;
  a.K = static_cast<int>(K);
  a.T = temperature;
  return a;
}

template <typename T>
const char* launch_forward(SoftArgs a, void* rows, cudaStream_t stream) {
  a.rows = rows;
  // A few elements per thread: G = 256 for rows of 1000 classes, one warp for rows up to 255.
  a.group = 32;
  while (a.group < kThreads && a.group * 4 <= a.K) a.group *= 2;
  const int64_t blocks = ceil_div<int64_t>(a.N, kThreads / a.group);
  if (blocks > INT_MAX) return "soft_target_forward: too many rows for the grid";
  soft_forward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return last_error();
}

template <typename T>
const char* launch_backward(SoftArgs a, const void* rows, const void* grad_rows, void* gs, void* gt,
                            cudaStream_t stream) {
  a.rows = const_cast<void*>(rows);
  a.grad_rows = grad_rows;
  a.gs = gs;
  a.gt = gt;
  const int64_t total = a.N * a.K;
  int64_t blocks = ceil_div<int64_t>(total, kThreads);
  blocks = blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20);  // grid-stride beyond
  if (total < (int64_t(1) << 31) - kThreads * 2) {
    soft_backward_kernel<T, uint32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a, static_cast<uint32_t>(total));
  } else {
    soft_backward_kernel<T, uint64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a, static_cast<uint64_t>(total));
  }
  return last_error();
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// public launchers

const char* soft_target_forward(DType dtype, const Logits& s, const Logits& t, int64_t N, int64_t K,
                                double temperature, void* rows, cudaStream_t stream) {
  if (N == 0) return nullptr;
  if (K > INT_MAX - kThreads) return "soft_target_forward: too many classes";
  const SoftArgs a = soft_args(s, t, N, K, temperature);
  switch (dtype) {
    case DType::kFloat32:
      return launch_forward<float>(a, rows, stream);
    case DType::kFloat16:
      return launch_forward<__half>(a, rows, stream);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(a, rows, stream);
    case DType::kFloat64:
      return launch_forward<double>(a, rows, stream);
  }
  return "soft_target_forward: unsupported dtype";
}

const char* soft_target_backward(DType dtype, const Logits& s, const Logits& t, int64_t N, int64_t K,
                                 double temperature, const void* rows, const void* grad_rows, void* grad_s,
                                 void* grad_t, cudaStream_t stream) {
  if (N == 0 || K == 0 || (grad_s == nullptr && grad_t == nullptr)) return nullptr;
  if (K > INT_MAX - kThreads) return "soft_target_backward: too many classes";
  const SoftArgs a = soft_args(s, t, N, K, temperature);
  switch (dtype) {
    case DType::kFloat32:
      return launch_backward<float>(a, rows, grad_rows, grad_s, grad_t, stream);
    case DType::kFloat16:
      return launch_backward<__half>(a, rows, grad_rows, grad_s, grad_t, stream);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(a, rows, grad_rows, grad_s, grad_t, stream);
    case DType::kFloat64:
      return launch_backward<double>(a, rows, grad_rows, grad_s, grad_t, stream);
  }
  return "soft_target_backward: unsupported dtype";
}

}  // namespace ktk_losses_cuda
