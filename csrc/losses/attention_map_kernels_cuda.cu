// CUDA kernels of the attention-map distance (no torch headers here; see attention_map_cuda.h). The math is
// that of attention_map_cpu.cpp (which documents it against ktkernels/losses/reference.py); the structure
// mirrors it, with one thread block (256 threads) per sample instead of one CPU task.
//
// AT kinds (0, 1): the maps stay in global memory; each pass is a block-strided loop plus a block sum
// (||A_s||^2 and ||A_t||^2, then sum (q_s - q_t)^2, then the backward's <g_q, A_s>). Any map size.
//
// DCT-KD kinds (2..4): shared memory holds four H x W buffers (Z, a product scratch T, R, and D_t / the
// gradient) and one H x H or W x W table, staged from global memory for each product. The forward of one
// map: the extremes of A (block reduction of (value, index) pairs that keeps the first index of a tie, as
// torch.min/max(dim) do), Z = (A - lo) / denc - mean, then
//     T = Z R0^T;  R = L0 T;  T = Z R1^T;  R -= L1 T
// (each product a shared-memory loop, one output element per thread and step; the table is staged
// transposed where that makes the threads of a warp read consecutive addresses), then the extremes of
// P = |R| or R. The teacher map runs first and leaves D_t in the fourth buffer, then the student's map,
// whose Z, R and extremes the backward reuses. The backward forms g_R in the D buffer (elementwise plus
// the min's and max's gradients at their indices) and applies the adjoint
//     T = g_R R0;  g_Z = L0^T T;  T = g_R R1;  g_Z -= L1^T T
// into the Z buffer, then the mean subtraction and the first normalisation's backward, writing grad_map_s.
//
// Deterministic: every reduction is a butterfly within warps plus the warps' partials added in a fixed
// order (every thread computes the same total); no atomics.
#include "attention_map_cuda.h"

#include "../common/cuda_device.cuh"

#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

namespace ktk_attention_map_cuda {
namespace {

using namespace ktk_cuda;  // last_error (csrc/common/cuda_device.cuh)

constexpr int kThreads = 256;  // every kernel's block size; the reductions assume exactly this
constexpr int kWarps = kThreads / 32;
constexpr int64_t kSmemDefault = 48 * 1024;  // shared memory per block (static + dynamic) without an opt-in
constexpr double kNormEps = 1e-12;           // the clamp of every normalising denominator (reference.py)

// ------------------------------------------------------------------------------------------------
// dtype helpers

__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }
__device__ __forceinline__ float abs_acc(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_acc(double v) { return fabs(v); }
__device__ __forceinline__ float tiny_of(float) { return FLT_MIN; }  // torch.finfo(dtype).tiny
__device__ __forceinline__ double tiny_of(double) { return DBL_MIN; }

template <typename T>
__device__ __forceinline__ T sign_of(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

// max(x, bound) as torch's clamp_min: a NaN stays NaN.
template <typename T>
__device__ __forceinline__ T clamp_min(T x, T bound) {
  return x < bound ? bound : x;
}

// The reference's _safe_sqrt: 0 for x <= 0, sqrt(max(x, tiny)) otherwise; NaN stays NaN (clamp_min keeps it).
template <typename T>
__device__ __forceinline__ T safe_sqrt(T x) {
  return x <= T(0) ? T(0) : sqrt_acc(clamp_min(x, tiny_of(x)));
}

// g times its derivative as autograd computes it: g / (2 sqrt(x)) where x >= tiny or x is NaN, else 0.
template <typename T>
__device__ __forceinline__ T safe_sqrt_grad(T x, T d, T g) {
  return x < tiny_of(x) ? T(0) : g / (T(2) * d);
}

// ------------------------------------------------------------------------------------------------
// Block reductions (blockDim.x == kThreads). Every thread returns the same result.

template <typename T>
struct Scratch {
  T v[2][kWarps];
  int i[2][kWarps];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  // Butterfly: every lane ends with the same sum (a + b == b + a in floating point).
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Two sums at once (one pair of barriers).
template <typename T>
__device__ void block_sum2(T& a, T& b, Scratch<T>& red) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red.v[0][warp] = a;
    red.v[1][warp] = b;
  }
  __syncthreads();
  a = red.v[0][0];
  b = red.v[1][0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    a += red.v[0][w];
    b += red.v[1][w];
  }
  __syncthreads();  // red is reused by the next reduction
}

template <typename T>
__device__ T block_sum(T a, Scratch<T>& red) {
  T b = T(0);
  block_sum2(a, b, red);
  return a;
}

// (value, index) orders of the extremes: the smaller index wins a tie, so the block's result is the first
// occurrence, whatever thread saw which elements.
template <typename T>
__device__ __forceinline__ bool lower(T v, int i, T bv, int bi) {
  return v < bv || (v == bv && i < bi);
}
template <typename T>
__device__ __forceinline__ bool higher(T v, int i, T bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

// Per-thread running extremes of the values f(i) it visits; sentinels (+-inf, INT_MAX) lose every tie.
template <typename T>
struct Extremes {
  T lo, hi;
  int ilo, ihi;
  __device__ void init() {
    lo = static_cast<T>(INFINITY);
    hi = -static_cast<T>(INFINITY);
    ilo = ihi = INT_MAX;
  }
  __device__ __forceinline__ void add(T v, int i) {
    if (lower(v, i, lo, ilo)) {
      lo = v;
      ilo = i;
    }
    if (higher(v, i, hi, ihi)) {
      hi = v;
      ihi = i;
    }
  }
};

template <typename T>
__device__ void block_extremes(Extremes<T>& e, Scratch<T>& red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T olo = __shfl_xor_sync(0xffffffffu, e.lo, off);
    const int oilo = __shfl_xor_sync(0xffffffffu, e.ilo, off);
    const T ohi = __shfl_xor_sync(0xffffffffu, e.hi, off);
    const int oihi = __shfl_xor_sync(0xffffffffu, e.ihi, off);
    if (lower(olo, oilo, e.lo, e.ilo)) {
      e.lo = olo;
      e.ilo = oilo;
    }
    if (higher(ohi, oihi, e.hi, e.ihi)) {
      e.hi = ohi;
      e.ihi = oihi;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red.v[0][warp] = e.lo;
    red.i[0][warp] = e.ilo;
    red.v[1][warp] = e.hi;
    red.i[1][warp] = e.ihi;
  }
  __syncthreads();
  e.lo = red.v[0][0];
  e.ilo = red.i[0][0];
  e.hi = red.v[1][0];
  e.ihi = red.i[1][0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    if (lower(red.v[0][w], red.i[0][w], e.lo, e.ilo)) {
      e.lo = red.v[0][w];
      e.ilo = red.i[0][w];
    }
    if (higher(red.v[1][w], red.i[1][w], e.hi, e.ihi)) {
      e.hi = red.v[1][w];
      e.ihi = red.i[1][w];
    }
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// Kinds 0 and 1: attention transfer

template <typename T>
struct Args {
  const T* s;      // (N, H, W)
  const T* t;      // (N, H, W)
  const T* left;   // (2, H, H): L0, L1
  const T* right;  // (2, W, W): R0, R1
  T* dist;         // forward: (N,)
  const T* gdist;  // backward: (N,), stride gstride
  int64_t gstride;
  T* grad;  // backward: (N, H, W)
  int64_t HW;
  int H, W, kind;
};

template <typename T, bool BACKWARD>
__global__ void __launch_bounds__(kThreads) at_kernel(Args<T> a) {
  __shared__ Scratch<T> red;
  const int64_t n = blockIdx.x, HW = a.HW;
  const T* s = a.s + n * HW;
  const T* t = a.t + n * HW;
  const T eps = static_cast<T>(kNormEps);
  T ss = T(0), tt = T(0);
  for (int64_t i = threadIdx.x; i < HW; i += kThreads) {
    ss += s[i] * s[i];
    tt += t[i] * t[i];
  }
  block_sum2(ss, tt, red);
  const T nrm_s = sqrt_acc(ss);
  const T c_s = clamp_min(nrm_s, eps), c_t = clamp_min(sqrt_acc(tt), eps);
  T part = T(0);
  for (int64_t i = threadIdx.x; i < HW; i += kThreads) {
    const T diff = s[i] / c_s - t[i] / c_t;
    part += diff * diff;
  }
  const T sq = block_sum(part, red);
  const T d = a.kind == 0 ? sq : safe_sqrt(sq);
  if (!BACKWARD) {
    if (threadIdx.x == 0) a.dist[n] = d;
    return;
  }
  // g_q = g_sq * 2 (q_s - q_t); q = A / c, c = max(||A||, eps): g_A = g_q / c + A * g_c / ||A|| (where
  // ||A|| >= eps) with g_c = -<g_q, A> / c^2.
  const T g = a.gdist[n * a.gstride];
  const T gsq = a.kind == 0 ? g : safe_sqrt_grad(sq, d, g);
  T coef = T(0);
  if (nrm_s >= eps) {  // block-uniform
    T dot = T(0);
    for (int64_t i = threadIdx.x; i < HW; i += kThreads) {
      dot += gsq * (T(2) * (s[i] / c_s - t[i] / c_t)) * s[i];
    }
    const T gc = -block_sum(dot, red) / (c_s * c_s);
    coef = gc / nrm_s;
  }
  T* grad = a.grad + n * HW;
  for (int64_t i = threadIdx.x; i < HW; i += kThreads) {
    const T gq = gsq * (T(2) * (s[i] / c_s - t[i] / c_t));
    grad[i] = gq / c_s + s[i] * coef;
  }
}

// ------------------------------------------------------------------------------------------------
// Kinds 2..4: DCT-KD

// One map's pipeline state (block-uniform): the normalisations of A and of P and their extremes' indices.
template <typename T>
struct MapState {
  T lo, den, denc;
  int ilo, ihi;
  T plo, pden, pdenc;
  int iplo, iphi;
};

// The shared-memory buffers: four H x W maps and one table.
template <typename T>
struct Bufs {
  T* z;    // Z; the backward's g_Z
  T* tmp;  // the products' intermediate
  T* r;    // R of the last map transformed
  T* d;    // D_t; the backward's g_D, then g_R
  T* tab;  // the staged table (H x H or W x W)
};

// dst (n x n) = src or src^T, from global into shared memory.
template <typename T>
__device__ void stage(T* dst, const T* __restrict__ src, int n, bool transpose) {
  for (int e = threadIdx.x; e < n * n; e += kThreads) {
    const int i = e / n, j = e - i * n;
    dst[e] = __ldg(src + (transpose ? j * n + i : e));
  }
}

// out (M x C) = a (M x K) @ b (K x C), or out -= that; all row-major in shared memory. Consecutive threads
// take consecutive j: they read consecutive b elements and (mostly) the same a element.
template <typename T>
__device__ void smem_matmul(int M, int K, int C, const T* a, const T* b, T* out, bool subtract) {
  for (int e = threadIdx.x; e < M * C; e += kThreads) {
    const int i = e / C, j = e - i * C;
    const T* ar = a + i * K;
    T acc = T(0);
    for (int k = 0; k < K; ++k) acc += ar[k] * b[k * C + j];
    out[e] = subtract ? out[e] - acc : acc;
  }
}

// P = |R| (dct_a) or R.
template <typename T>
__device__ __forceinline__ T p_of(int kind, T r) {
  return kind == 2 ? abs_acc(r) : r;
}

// D at element i of the map whose R is in b.r.
template <typename T>
__device__ __forceinline__ T coef_at(int kind, const T* r, const MapState<T>& st, int i) {
  return (p_of(kind, r[i]) - st.plo) / st.pdenc;
}

// The forward pipeline of map A (global): fills st, b.z (Z) and b.r (R); clobbers b.tmp and b.tab.
template <typename T>
__device__ void map_forward(const Args<T>& a, const T* __restrict__ A, const Bufs<T>& b, Scratch<T>& red,
                            MapState<T>& st) {
  const int H = a.H, W = a.W, HW = H * W, kind = a.kind;
  const T eps = static_cast<T>(kNormEps);
  Extremes<T> ex;
  ex.init();
  for (int i = threadIdx.x; i < HW; i += kThreads) ex.add(A[i], i);
  block_extremes(ex, red);
  st.lo = ex.lo;
  st.ilo = ex.ilo;
  st.ihi = ex.ihi;
  st.den = kind == 2 ? ex.hi : ex.hi - ex.lo;
  st.denc = clamp_min(st.den, eps);
  T part = T(0);
  for (int i = threadIdx.x; i < HW; i += kThreads) {
    const T v = (A[i] - st.lo) / st.denc;
    b.z[i] = v;
    part += v;
  }
  const T mean = block_sum(part, red) / static_cast<T>(HW);
  for (int i = threadIdx.x; i < HW; i += kThreads) b.z[i] -= mean;
  __syncthreads();
  // R = L0 (Z R0^T) - L1 (Z R1^T).
  const T* L0 = a.left;
  const T* L1 = a.left + H * H;
  const T* R0 = a.right;
  const T* R1 = a.right + W * W;
  stage(b.tab, R0, W, true);
  __syncthreads();
  smem_matmul(H, W, W, b.z, b.tab, b.tmp, false);
  __syncthreads();
  stage(b.tab, L0, H, false);
  __syncthreads();
  smem_matmul(H, H, W, b.tab, b.tmp, b.r, false);
  __syncthreads();
  stage(b.tab, R1, W, true);
  __syncthreads();
  smem_matmul(H, W, W, b.z, b.tab, b.tmp, false);
  __syncthreads();
  stage(b.tab, L1, H, false);
  __syncthreads();
  smem_matmul(H, H, W, b.tab, b.tmp, b.r, true);
  __syncthreads();
  ex.init();
  for (int i = threadIdx.x; i < HW; i += kThreads) ex.add(p_of(kind, b.r[i]), i);
  block_extremes(ex, red);
  st.plo = ex.lo;
  st.iplo = ex.ilo;
  st.iphi = ex.ihi;
  st.pden = kind == 2 ? ex.hi : ex.hi - ex.lo;
  st.pdenc = clamp_min(st.pden, eps);
}

template <typename T, bool BACKWARD>
__global__ void __launch_bounds__(kThreads) dct_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ Scratch<T> red;
  const int H = a.H, W = a.W, HW = H * W, kind = a.kind;
  const int64_t n = blockIdx.x;
  const T eps = static_cast<T>(kNormEps);
  T* base = reinterpret_cast<T*>(smem_raw);
  const Bufs<T> b{base, base + HW, base + 2 * HW, base + 3 * HW, base + 4 * HW};
  const T* s = a.s + n * HW;
  MapState<T> st;

  // Teacher first: D_t into b.d (each thread writes the elements it later reads), then the student.
  map_forward(a, a.t + n * HW, b, red, st);
  for (int i = threadIdx.x; i < HW; i += kThreads) b.d[i] = coef_at(kind, b.r, st, i);
  map_forward(a, s, b, red, st);
  T part = T(0);
  for (int i = threadIdx.x; i < HW; i += kThreads) {
    const T diff = coef_at(kind, b.r, st, i) - b.d[i];
    part += diff * diff;
  }
  const T S = block_sum(part, red);
  const T d = safe_sqrt(S);
  if (!BACKWARD) {
    if (threadIdx.x == 0) a.dist[n] = d;
    return;
  }

  T* grad = a.grad + n * HW;
  const T gS = safe_sqrt_grad(S, d, a.gdist[n * a.gstride]);
  if (gS == T(0)) {  // identical maps (or a zero grad_dist): nothing flows back; block-uniform
    for (int i = threadIdx.x; i < HW; i += kThreads) grad[i] = T(0);
    return;
  }
  // g_D = gS * 2 (D_s - D_t) into b.d; D = u / pdenc with u = P - plo.
  T su = T(0), sg = T(0);
  for (int i = threadIdx.x; i < HW; i += kThreads) {
    const T gd = gS * (T(2) * (coef_at(kind, b.r, st, i) - b.d[i]));
    b.d[i] = gd;
    su += gd * (p_of(kind, b.r[i]) - st.plo);
    sg += gd / st.pdenc;
  }
  block_sum2(su, sg, red);
  const T gpden = st.pden >= eps ? -su / (st.pdenc * st.pdenc) : T(0);
  const T gplo = kind == 2 ? -sg : -sg - gpden;
  // g_P = g_u + the min's and the max's gradients at their indices; g_R = g_P sign(R) for dct_a.
  for (int i = threadIdx.x; i < HW; i += kThreads) {
    T v = b.d[i] / st.pdenc;
    if (i == st.iplo) v += gplo;
    if (i == st.iphi) v += gpden;
    if (kind == 2) v *= sign_of(b.r[i]);
    b.d[i] = v;
  }
  __syncthreads();
  // g_Z = L0^T (g_R R0) - L1^T (g_R R1), into b.z.
  const T* L0 = a.left;
  const T* L1 = a.left + H * H;
  const T* R0 = a.right;
  const T* R1 = a.right + W * W;
  stage(b.tab, R0, W, false);
  __syncthreads();
  smem_matmul(H, W, W, b.d, b.tab, b.tmp, false);
  __syncthreads();
  stage(b.tab, L0, H, true);
  __syncthreads();
  smem_matmul(H, H, W, b.tab, b.tmp, b.z, false);
  __syncthreads();
  stage(b.tab, R1, W, false);
  __syncthreads();
  smem_matmul(H, W, W, b.d, b.tab, b.tmp, false);
  __syncthreads();
  stage(b.tab, L1, H, true);
  __syncthreads();
  smem_matmul(H, H, W, b.tab, b.tmp, b.z, true);
  __syncthreads();
  // Mean subtraction: g_Ahat = g_Z - mean(g_Z); then Ahat = (A - lo) / denc.
  part = T(0);
  for (int i = threadIdx.x; i < HW; i += kThreads) part += b.z[i];
  const T mean = block_sum(part, red) / static_cast<T>(HW);
  su = T(0);
  sg = T(0);
  for (int i = threadIdx.x; i < HW; i += kThreads) {
    const T gz = b.z[i] - mean;
    b.z[i] = gz;
    su += gz * (s[i] - st.lo);
    sg += gz / st.denc;
  }
  block_sum2(su, sg, red);
  const T gden = st.den >= eps ? -su / (st.denc * st.denc) : T(0);
  const T glo = kind == 2 ? -sg : -sg - gden;
  for (int i = threadIdx.x; i < HW; i += kThreads) {
    T v = b.z[i] / st.denc;
    if (i == st.ilo) v += glo;
    if (i == st.ihi) v += gden;
    grad[i] = v;
  }
}

// ------------------------------------------------------------------------------------------------
// Launch

template <typename T, bool BACKWARD>
const char* launch(const Args<T>& a, int64_t N, cudaStream_t stream) {
  if (N == 0) return nullptr;
  if (N > INT_MAX) return "attention_map_distance: too many samples for the grid";
  const unsigned blocks = static_cast<unsigned>(N);
  if (a.kind < 2) {
    at_kernel<T, BACKWARD><<<blocks, kThreads, 0, stream>>>(a);
    return last_error();
  }
  if (a.H > kMaxTransformSide || a.W > kMaxTransformSide) {
    return "attention_map_distance: the CUDA kernels of kinds dct_a, dct_b, dct take maps up to 64 x 64";
  }
  const int64_t side = a.H > a.W ? a.H : a.W;
  const int64_t smem = (4 * static_cast<int64_t>(a.H) * a.W + side * side) * static_cast<int64_t>(sizeof(T));
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  // The kernel's static Scratch counts against the same per-block limit as the dynamic buffer: without the opt-in
  // a launch may ask for 48 KiB minus it (a 32 x 64 fp32 map asks for 48 KiB exactly and failed to launch).
  const int64_t static_bytes = static_cast<int64_t>(sizeof(Scratch<T>));
  const int64_t dynamic_max = (optin > kSmemDefault ? optin : kSmemDefault) - static_bytes;
  if (smem > dynamic_max) return "attention_map_distance: the map does not fit in this device's shared memory";
  if (smem > kSmemDefault - static_bytes) {
    // The device's most, not this launch's size: the attribute belongs to the kernel, and two host threads
    // launching different sizes must not lower it under each other.
    e = cudaFuncSetAttribute(dct_kernel<T, BACKWARD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(dynamic_max));
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  dct_kernel<T, BACKWARD><<<blocks, kThreads, static_cast<size_t>(smem), stream>>>(a);
  return last_error();
}

template <typename T>
Args<T> make_args(int kind, int64_t H, int64_t W, const void* map_s, const void* map_t, const void* left,
                  const void* right) {
  Args<T> a{};
  a.s = static_cast<const T*>(map_s);
  a.t = static_cast<const T*>(map_t);
  a.left = static_cast<const T*>(left);
  a.right = static_cast<const T*>(right);
  a.HW = H * W;
  // Only the DCT-KD kinds index in int (H, W <= kMaxTransformSide there); the AT kinds use HW.
  a.H = static_cast<int>(H < INT_MAX ? H : INT_MAX);
  a.W = static_cast<int>(W < INT_MAX ? W : INT_MAX);
  a.kind = kind;
  return a;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// public launchers

const char* attention_map_distance(DType dtype, int kind, int64_t N, int64_t H, int64_t W, const void* map_s,
                                   const void* map_t, const void* left, const void* right, void* dist,
                                   cudaStream_t stream) {
  if (kind < 0 || kind > 4) return "attention_map_distance: kind must be in [0, 4]";
  if (H < 1 || W < 1) return "attention_map_distance: maps must have H, W >= 1";
  if (dtype == DType::kFloat32) {
    Args<float> a = make_args<float>(kind, H, W, map_s, map_t, left, right);
    a.dist = static_cast<float*>(dist);
    return launch<float, false>(a, N, stream);
  }
  if (dtype == DType::kFloat64) {
    Args<double> a = make_args<double>(kind, H, W, map_s, map_t, left, right);
    a.dist = static_cast<double*>(dist);
    return launch<double, false>(a, N, stream);
  }
  return "attention_map_distance: maps must be float32 or float64";
}

const char* attention_map_distance_backward(DType dtype, int kind, int64_t N, int64_t H, int64_t W,
                                            const void* map_s, const void* map_t, const void* grad_dist,
                                            int64_t grad_dist_stride, const void* left, const void* right,
                                            void* grad_map_s, cudaStream_t stream) {
  if (kind < 0 || kind > 4) return "attention_map_distance_backward: kind must be in [0, 4]";
  if (H < 1 || W < 1) return "attention_map_distance_backward: maps must have H, W >= 1";
  if (dtype == DType::kFloat32) {
    Args<float> a = make_args<float>(kind, H, W, map_s, map_t, left, right);
    a.gdist = static_cast<const float*>(grad_dist);
    a.gstride = grad_dist_stride;
    a.grad = static_cast<float*>(grad_map_s);
    return launch<float, true>(a, N, stream);
  }
  if (dtype == DType::kFloat64) {
    Args<double> a = make_args<double>(kind, H, W, map_s, map_t, left, right);
    a.gdist = static_cast<const double*>(grad_dist);
    a.gstride = grad_dist_stride;
    a.grad = static_cast<double*>(grad_map_s);
    return launch<double, true>(a, N, stream);
  }
  return "attention_map_distance_backward: maps must be float32 or float64";
}

}  // namespace ktk_attention_map_cuda
