// CUDA kernels of the DCT family (no torch headers here; see dct_cuda.h).
//
// All kernels use 256 threads per block and accumulate in float (double for float64 data).
//
// 1. dct_basis2d: out[n,c] = L @ x[n,c] @ R^T with dense bases L (Ho, H) and R (Wo, W).
//    Fused path (one pass over x and out): a block owns S planes. It copies L and R^T into shared
//    memory, loads its S planes once (converted to the accumulation type), computes the intermediate
//    product of every plane into shared memory, then the final product, which it stores straight to
//    global memory. The cheaper product order is picked from the sizes:
//        W first: M = X @ R^T (H x Wo), out = L @ M       cost H*Wo*(W + Ho)
//        H first: M = L @ X   (Ho x W), out = M @ R^T     cost Ho*W*(H + Wo)
//    Both products run from shared memory with register tiles (up to 4 x 4 outputs per thread, so
//    each k step loads 8 values for 16 FMAs). Two mappings, picked from the strides:
//    - planar (a spatial stride of x is the smallest): S consecutive planes p = n*C + c, stored plane
//      by plane; threads run along the innermost spatial axis (coalesced loads and stores; in every
//      product one operand is a broadcast and the other is read at consecutive addresses).
//    - channels-inner (x.stride(1) is the smallest, e.g. channels_last): the planes are S consecutive
//      channels of one image, interleaved in shared memory ([position][channel]); threads run along
//      the channels, so every global load and store of a warp is one contiguous run of channels.
//    S is chosen so that a block has about a thousand elements of work, there are enough blocks for
//    the GPU, and the shared memory (L, R^T, S planes and S intermediates) fits in ~96 KiB, or, for a
//    single plane, in the device's opt-in maximum (227 KiB on H100: square float32 planes up to
//    120 x 120 with untruncated bases, 85 x 85 in float64; 163 KiB on A100: 102 and 72).
//    Fallback (one plane and both bases do not fit): the two products as two launches of a tiled
//    (32 x 32, K steps of 32) batched GEMM through a global scratch buffer holding the intermediate
//    (the caller allocates it, see dct_basis2d_workspace).
//
// 2. channel_power_mean: out[n,h,w] = (1/C) sum_c |x|^p, one pass over x, coalesced in both layouts:
//    - position kernel: threads run along the positions (w fastest) and the C loop is split over Y
//      thread rows (Y = 8 for C >= 8) whose partial sums are added in shared memory in a fixed order.
//      Used for planar x, and for channels-inner x with C < 32 (the positions of a warp are then a
//      short contiguous run).
//    - warp kernel (channels-inner x, C >= 32): one warp per position reduces along the contiguous C
//      axis (lane-strided loads, butterfly shuffle).
//    Both are deterministic: fixed summation order, no atomics.
//
// 3. channel_power_mean_backward: elementwise, one thread per grad_x element in the memory order of
//    grad_x (channels fastest for channels-inner, w fastest otherwise).
//
// p == 1 (|x|, sign x) and p == 2 (x*x, 2x) are compiled without pow.
#include "dct_cuda.h"

#include "../common/cuda_device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>

namespace ktk_dct_cuda {
namespace {

using namespace ktk_cuda;  // dtype helpers, ldg, ceil_div, launch helpers (csrc/common/cuda_device.cuh)

constexpr int kThreads = 256;
constexpr int64_t kSmemDefault = 48 * 1024;   // dynamic smem per block without an opt-in
constexpr int64_t kSmemTarget = 96 * 1024;    // preferred ceiling (two blocks per SM on Hopper/Ampere)
constexpr int kMaxPlanes = 32;                // planes per block, fused dct_basis2d
constexpr int kTile = 32;                     // tile edge of the fallback GEMM
constexpr int64_t kWorkspaceCap = int64_t(256) << 20;  // fallback scratch: planes are done in chunks

// ------------------------------------------------------------------------------------------------
// dtype helpers
__device__ __forceinline__ float abs_acc(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_acc(double v) { return fabs(v); }
__device__ __forceinline__ float pow_acc(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double pow_acc(double a, double b) { return pow(a, b); }

bool any_zero(const Tensor4& t) {
  for (int d = 0; d < 4; ++d) {
    if (t.size[d] == 0) return true;
  }
  return false;
}

// ------------------------------------------------------------------------------------------------
// 1. dct_basis2d, fused path

struct BasisArgs {
  const void* x;
  void* out;
  const void* L;  // (Ho, H) acc
  const void* R;  // (Wo, W) acc
  int64_t xs0, xs1, xs2, xs3;
  int64_t os0, os1, os2, os3;
  int64_t C, NC;
  int64_t chunks;  // channels-inner: channel groups per image
  int H, W, Ho, Wo;
  int S;           // planes per block
  int lane_fast;   // 1: channels-inner mapping
  int w_first;     // 1: M = X @ R^T first
};

// Decomposes a work item e of a (planes x rows x cols) grid: planes fastest when lane_fast (they are
// the interleaved channels), cols fastest otherwise.
__device__ __forceinline__ void decompose3(int e, bool lane_fast, int planes, int rows, int cols, int& s, int& i,
                                           int& j) {
  if (lane_fast) {
    s = e % planes;
    const int q = e / planes;
    j = q % cols;
    i = q / cols;
  } else {
    j = e % cols;
    const int q = e / cols;
    i = q % rows;
    s = q / rows;
  }
}

// Offset of element (s, i, j) of a per-plane (rows x cols) shared-memory matrix: interleaved
// [i][j][s] (S planes) when lane_fast, else plane by plane [s][i][j].
__device__ __forceinline__ int smem_at(bool lane_fast, int S, int rows, int cols, int s, int i, int j) {
  return lane_fast ? (i * cols + j) * S + s : (s * rows + i) * cols + j;
}

// Shared-memory matrices of the fused kernel, as (pointer to element (s, i, j), step along i, step
// along j). PlaneMat: one rows x cols matrix per plane (layout of smem_at); SharedMat: one matrix
// for every plane (a basis), row-major.
template <typename A>
struct PlaneMat {
  A* p;
  int rows, cols, S;
  bool lf;
  __device__ __forceinline__ A* ptr(int s, int i, int j) const { return p + smem_at(lf, S, rows, cols, s, i, j); }
  __device__ __forceinline__ int step_i() const { return lf ? cols * S : cols; }
  __device__ __forceinline__ int step_j() const { return lf ? S : 1; }
};

template <typename A>
struct SharedMat {
  const A* p;
  int cols;
  __device__ __forceinline__ const A* ptr(int, int i, int j) const { return p + i * cols + j; }
  __device__ __forceinline__ int step_i() const { return cols; }
  __device__ __forceinline__ int step_j() const { return 1; }
};

// Stores of a product: into a per-plane shared-memory matrix, or into the output planes in global memory.
template <typename A>
struct StoreSmem {
  PlaneMat<A> m;
  __device__ __forceinline__ void operator()(int s, int i, int j, A v) const { *m.ptr(s, i, j) = v; }
};

template <typename T>
struct StoreGlobal {
  T* out;
  const int64_t* obase;
  int64_t os2, os3;
  __device__ __forceinline__ void operator()(int s, int i, int j, acc_t<T> v) const {
    out[obase[s] + i * os2 + j * os3] = from_acc<T>(v);
  }
};

// c[s] (M x N) = a[s] (M x K) @ b[s] (K x N) for the Sv planes of the block. Each thread computes a
// TxT register tile: rows it + r*ti and columns jt + c*tj (r, c < T; ti, tj the tile counts), so
// each k step loads T values of a and T of b for T*T FMAs, and the threads of a warp, which run
// along jt (or along the planes when lf), read consecutive shared-memory words. Indices past the
// edge are clamped for the loads (in bounds) and skipped for the stores.
template <int T, typename A, typename MA, typename MB, typename Store>
__device__ __forceinline__ void product_tiles(const MA& a, const MB& b, int M, int N, int K, int Sv, bool lf,
                                              const Store& store) {
  const int ti = ceil_div(M, T), tj = ceil_div(N, T);
  const int astep = a.step_j(), bstep = b.step_i();
  for (int e = threadIdx.x; e < Sv * ti * tj; e += blockDim.x) {
    int s, it, jt;
    decompose3(e, lf, Sv, ti, tj, s, it, jt);
    const A* ap[T];
    const A* bp[T];
    A acc[T][T];
#pragma unroll
    for (int r = 0; r < T; ++r) {
      const int i = it + r * ti, j = jt + r * tj;
      ap[r] = a.ptr(s, i < M ? i : M - 1, 0);
      bp[r] = b.ptr(s, 0, j < N ? j : N - 1);
#pragma unroll
      for (int c = 0; c < T; ++c) acc[r][c] = A(0);
    }
    for (int k = 0; k < K; ++k) {
      A av[T], bv[T];
#pragma unroll
      for (int r = 0; r < T; ++r) {
        av[r] = ap[r][k * astep];
        bv[r] = bp[r][k * bstep];
      }
#pragma unroll
      for (int r = 0; r < T; ++r) {
#pragma unroll
        for (int c = 0; c < T; ++c) acc[r][c] += av[r] * bv[c];
      }
    }
#pragma unroll
    for (int r = 0; r < T; ++r) {
      const int i = it + r * ti;
#pragma unroll
      for (int c = 0; c < T; ++c) {
        const int j = jt + c * tj;
        if (i < M && j < N) store(s, i, j, acc[r][c]);
      }
    }
  }
}

// The largest tile (4, 2 or 1) that still gives every thread of the block an item.
template <typename A, typename MA, typename MB, typename Store>
__device__ __forceinline__ void product(const MA& a, const MB& b, int M, int N, int K, int Sv, bool lf,
                                        const Store& store) {
  const int threads = static_cast<int>(blockDim.x);
  if (Sv * ceil_div(M, 4) * ceil_div(N, 4) >= threads) {
    product_tiles<4, A>(a, b, M, N, K, Sv, lf, store);
  } else if (Sv * ceil_div(M, 2) * ceil_div(N, 2) >= threads) {
    product_tiles<2, A>(a, b, M, N, K, Sv, lf, store);
  } else {
    product_tiles<1, A>(a, b, M, N, K, Sv, lf, store);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dct_basis_fused_kernel(const BasisArgs a) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int S = a.S;
  const bool lf = a.lane_fast != 0;
  const int H = a.H, W = a.W, Ho = a.Ho, Wo = a.Wo;
  int64_t* xbase = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* obase = xbase + S;
  A* Ls = reinterpret_cast<A*>(obase + S);  // [Ho][H]
  A* Rt = Ls + Ho * H;                      // [W][Wo] (R transposed)
  A* Xs = Rt + W * Wo;                      // S planes of H x W
  A* Ms = Xs + S * H * W;                   // S intermediates: H x Wo (W first) or Ho x W

  // The planes of this block: S consecutive planes, or S consecutive channels of one image.
  int64_t n0, c0;
  int Sv;
  if (lf) {
    n0 = static_cast<int64_t>(blockIdx.x) / a.chunks;
    c0 = (static_cast<int64_t>(blockIdx.x) - n0 * a.chunks) * S;
    Sv = static_cast<int>(a.C - c0 < S ? a.C - c0 : S);
  } else {
    const int64_t p0 = static_cast<int64_t>(blockIdx.x) * S;
    n0 = p0 / a.C;
    c0 = p0 - n0 * a.C;
    Sv = static_cast<int>(a.NC - p0 < S ? a.NC - p0 : S);
  }
  for (int s = threadIdx.x; s < Sv; s += blockDim.x) {
    int64_t n = n0, c = c0 + s;
    if (!lf) {  // consecutive planes may cross into the next images
      n += c / a.C;
      c %= a.C;
    }
    xbase[s] = n * a.xs0 + c * a.xs1;
    obase[s] = n * a.os0 + c * a.os1;
  }
  const A* L = static_cast<const A*>(a.L);
  const A* R = static_cast<const A*>(a.R);
  for (int e = threadIdx.x; e < Ho * H; e += blockDim.x) Ls[e] = L[e];
  for (int e = threadIdx.x; e < Wo * W; e += blockDim.x) {
    const int j = e / W, w = e - j * W;
    Rt[w * Wo + j] = R[e];
  }
  __syncthreads();

  const T* x = static_cast<const T*>(a.x);
  for (int e = threadIdx.x; e < Sv * H * W; e += blockDim.x) {
    int s, h, w;
    decompose3(e, lf, Sv, H, W, s, h, w);
    Xs[smem_at(lf, S, H, W, s, h, w)] = to_acc(x[xbase[s] + h * a.xs2 + w * a.xs3]);
  }
  __syncthreads();

  const PlaneMat<A> X{Xs, H, W, S, lf};
  const SharedMat<A> Lm{Ls, H}, Rm{Rt, Wo};
  const StoreGlobal<T> to_out{static_cast<T*>(a.out), obase, a.os2, a.os3};
  if (a.w_first) {
    const PlaneMat<A> M{Ms, H, Wo, S, lf};
    product<A>(X, Rm, H, Wo, W, Sv, lf, StoreSmem<A>{M});  // M = X @ R^T
    __syncthreads();
    product<A>(Lm, M, Ho, Wo, H, Sv, lf, to_out);  // out = L @ M
  } else {
    const PlaneMat<A> M{Ms, Ho, W, S, lf};
    product<A>(Lm, X, Ho, W, H, Sv, lf, StoreSmem<A>{M});  // M = L @ X
    __syncthreads();
    product<A>(M, Rm, Ho, Wo, W, Sv, lf, to_out);  // out = M @ R^T
  }
}

// ------------------------------------------------------------------------------------------------
// 1. dct_basis2d, fallback: batched tiled GEMM  c[b][i][j] = sum_k a[b][i][k] * b[b][k][j]
//    for the planes b in [b0, b0 + batches). Element (b, i, k) of an operand lives at
//    p + (b / C) * sn + (b % C) * sc + (b - b0) * sl + i * si + k * sk: tensors address a plane by
//    (n, c), the scratch buffer by its index in the chunk (sl).

struct GemmOperand {
  const void* p;
  int64_t sn, sc, sl, si, sk;
};

struct GemmArgs {
  GemmOperand a, b;
  void* c;
  int64_t cn, cc, cl, ci, cj;
  int64_t C, b0;
  int M, N, K;
  int tiles_m, tiles_n;
};

template <typename TA, typename TB, typename TC, typename A>
__global__ void __launch_bounds__(kThreads) batched_gemm_kernel(const GemmArgs g) {
  __shared__ A As[kTile][kTile + 1];
  __shared__ A Bs[kTile][kTile + 1];
  constexpr int kRows = kThreads / kTile;  // 8 thread rows, each computing kTile / kRows outputs
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  int64_t blk = blockIdx.x;
  const int tn = static_cast<int>(blk % g.tiles_n);
  blk /= g.tiles_n;
  const int tm = static_cast<int>(blk % g.tiles_m);
  const int64_t local = blk / g.tiles_m;
  const int64_t batch = g.b0 + local;
  const int64_t bn = batch / g.C, bc = batch - bn * g.C;
  const TA* ap = static_cast<const TA*>(g.a.p) + bn * g.a.sn + bc * g.a.sc + local * g.a.sl;
  const TB* bp = static_cast<const TB*>(g.b.p) + bn * g.b.sn + bc * g.b.sc + local * g.b.sl;
  const int i0 = tm * kTile, j0 = tn * kTile;
  A acc[kTile / kRows];
#pragma unroll
  for (int r = 0; r < kTile / kRows; ++r) acc[r] = A(0);
  for (int k0 = 0; k0 < g.K; k0 += kTile) {
#pragma unroll
    for (int r = 0; r < kTile / kRows; ++r) {
      const int ii = ty + kRows * r;
      const int i = i0 + ii, k = k0 + tx;
      As[ii][tx] = (i < g.M && k < g.K) ? static_cast<A>(to_acc(ap[i * g.a.si + k * g.a.sk])) : A(0);
      const int kk = k0 + ii, j = j0 + tx;
      Bs[ii][tx] = (kk < g.K && j < g.N) ? static_cast<A>(to_acc(bp[kk * g.b.si + j * g.b.sk])) : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const A bv = Bs[kk][tx];
#pragma unroll
      for (int r = 0; r < kTile / kRows; ++r) acc[r] += As[ty + kRows * r][kk] * bv;
    }
    __syncthreads();
  }
  TC* cp = static_cast<TC*>(g.c) + bn * g.cn + bc * g.cc + local * g.cl;
  const int j = j0 + tx;
  if (j >= g.N) return;
#pragma unroll
  for (int r = 0; r < kTile / kRows; ++r) {
    const int i = i0 + ty + kRows * r;
    if (i < g.M) cp[i * g.ci + j * g.cj] = from_acc<TC>(acc[r]);
  }
}

template <typename TA, typename TB, typename TC, typename A>
const char* launch_gemm(GemmArgs g, int64_t batches, cudaStream_t stream) {
  g.tiles_m = static_cast<int>(ceil_div<int64_t>(g.M, kTile));
  g.tiles_n = static_cast<int>(ceil_div<int64_t>(g.N, kTile));
  const int64_t blocks = batches * g.tiles_m * g.tiles_n;
  if (blocks > INT_MAX) return "dct_basis2d: tensor too large for the grid";
  batched_gemm_kernel<TA, TB, TC, A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(g);
  return last_error();
}

// ------------------------------------------------------------------------------------------------
// 1. dct_basis2d, planning (the workspace query and the launch make the same plan)

struct BasisPlan {
  bool fused;
  bool w_first;
  bool lane_fast;
  int S;
  int64_t smem;      // fused: dynamic smem bytes
  int64_t smem_max;  // the most this device lets a block have (what the opt-in sets)
  int64_t chunk;     // fallback: planes per pair of GEMM launches
  int64_t ws_bytes;  // fallback: scratch bytes (chunk intermediates)
};

const char* plan_basis(int acc_size, const Tensor4& x, const Tensor4& out, BasisPlan* plan) {
  int dev = 0, optin = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  const int64_t N = x.size[0], C = x.size[1], H = x.size[2], W = x.size[3];
  const int64_t Ho = out.size[2], Wo = out.size[3];
  const int64_t NC = N * C;
  BasisPlan p;
  p.w_first = H * Wo * (W + Ho) <= Ho * W * (H + Wo);
  p.lane_fast = C > 1 && channels_inner(x, out);
  const int64_t mid = p.w_first ? H * Wo : Ho * W;
  const int64_t fixed = (Ho * H + W * Wo) * acc_size;
  const int64_t per_plane = (H * W + mid) * acc_size + 2 * static_cast<int64_t>(sizeof(int64_t));
  const int64_t smem_max = optin > kSmemDefault ? optin : kSmemDefault;
  auto fit = [&](int64_t budget) { return budget > fixed ? (budget - fixed) / per_plane : 0; };
  int64_t S;
  if (p.lane_fast) {
    S = C < kMaxPlanes ? C : kMaxPlanes;
  } else {
    const int64_t big = std::max(std::max(H * W, mid), Ho * Wo);
    S = ceil_div<int64_t>(1024, big);
    S = S > kMaxPlanes ? kMaxPlanes : S;
    S = S < NC ? S : NC;
    while (S > 1 && ceil_div<int64_t>(NC, S) < 2 * static_cast<int64_t>(sms)) S = (S + 1) / 2;
  }
  const int64_t target = kSmemTarget < smem_max ? kSmemTarget : smem_max;
  int64_t fits = fit(target);
  if (fits < 1) fits = fit(smem_max);
  S = S < fits ? S : fits;
  // Whatever fits in shared memory also indexes in int32 inside the kernel (Ho * Wo < 2^30).
  p.fused = S >= 1;
  p.S = static_cast<int>(S);
  p.smem = p.fused ? fixed + S * per_plane : 0;
  p.smem_max = smem_max;
  p.chunk = p.fused ? 0 : std::max<int64_t>(1, std::min<int64_t>(NC, kWorkspaceCap / (mid * acc_size)));
  p.ws_bytes = p.chunk * mid * acc_size;
  *plan = p;
  return nullptr;
}

template <typename T>
const char* launch_basis(const Tensor4& x, const void* left, const void* right, const Tensor4& out, void* workspace,
                         int64_t workspace_bytes, cudaStream_t stream) {
  using A = acc_t<T>;
  BasisPlan p;
  if (const char* err = plan_basis(static_cast<int>(sizeof(A)), x, out, &p)) return err;
  const int64_t N = x.size[0], C = x.size[1], H = x.size[2], W = x.size[3];
  const int64_t Ho = out.size[2], Wo = out.size[3];
  if (p.fused) {
    BasisArgs a;
    a.x = x.data;
    a.out = out.data;
    a.L = left;
    a.R = right;
    a.xs0 = x.stride[0];
    a.xs1 = x.stride[1];
    a.xs2 = x.stride[2];
    a.xs3 = x.stride[3];
    a.os0 = out.stride[0];
    a.os1 = out.stride[1];
    a.os2 = out.stride[2];
    a.os3 = out.stride[3];
    a.C = C;
    a.NC = N * C;
    a.H = static_cast<int>(H);
    a.W = static_cast<int>(W);
    a.Ho = static_cast<int>(Ho);
    a.Wo = static_cast<int>(Wo);
    a.S = p.S;
    a.lane_fast = p.lane_fast ? 1 : 0;
    a.w_first = p.w_first ? 1 : 0;
    a.chunks = ceil_div<int64_t>(C, p.S);
    const int64_t blocks = p.lane_fast ? N * a.chunks : ceil_div<int64_t>(N * C, p.S);
    if (blocks > INT_MAX) return "dct_basis2d: tensor too large for the grid";
    if (p.smem > kSmemDefault) {
      // The device's most, not this launch's size: the attribute belongs to the kernel, and two host threads
      // launching different sizes must not lower it under each other. (The kernel has no static shared memory.)
      const cudaError_t e = cudaFuncSetAttribute(dct_basis_fused_kernel<T>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(p.smem_max));
      if (e != cudaSuccess) return cudaGetErrorString(e);
    }
    dct_basis_fused_kernel<T><<<static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(p.smem), stream>>>(a);
    return last_error();
  }

  if (workspace == nullptr || workspace_bytes < p.ws_bytes) return "dct_basis2d: workspace too small";
  const int64_t NC = N * C;
  // The scratch holds the intermediate M of `chunk` planes, plane b of the chunk at (b - b0) * mid.
  GemmArgs g1{}, g2{};
  g1.C = g2.C = C;
  const GemmOperand xop{x.data, x.stride[0], x.stride[1], 0, x.stride[2], x.stride[3]};
  const GemmOperand lop{left, 0, 0, 0, H, 1};             // L (Ho x H)
  const GemmOperand rtop{right, 0, 0, 0, 1, W};           // R^T (W x Wo)
  const int64_t mid = p.w_first ? H * Wo : Ho * W;
  const int64_t mcols = p.w_first ? Wo : W;
  const GemmOperand mop{workspace, 0, 0, mid, mcols, 1};  // M (H x Wo or Ho x W)
  g1.c = workspace;
  g1.cl = mid;
  g1.ci = mcols;
  g1.cj = 1;
  g2.c = out.data;
  g2.cn = out.stride[0];
  g2.cc = out.stride[1];
  g2.ci = out.stride[2];
  g2.cj = out.stride[3];
  g2.M = static_cast<int>(Ho);
  g2.N = static_cast<int>(Wo);
  if (p.w_first) {  // M = X @ R^T, out = L @ M
    g1.a = xop;
    g1.b = rtop;
    g1.M = static_cast<int>(H);
    g1.N = static_cast<int>(Wo);
    g1.K = static_cast<int>(W);
    g2.a = lop;
    g2.b = mop;
    g2.K = static_cast<int>(H);
  } else {  // M = L @ X, out = M @ R^T
    g1.a = lop;
    g1.b = xop;
    g1.M = static_cast<int>(Ho);
    g1.N = static_cast<int>(W);
    g1.K = static_cast<int>(H);
    g2.a = mop;
    g2.b = rtop;
    g2.K = static_cast<int>(W);
  }
  for (int64_t b0 = 0; b0 < NC; b0 += p.chunk) {
    const int64_t batches = std::min(p.chunk, NC - b0);
    g1.b0 = g2.b0 = b0;
    const char* err = p.w_first ? launch_gemm<T, A, A, A>(g1, batches, stream)
                                : launch_gemm<A, T, A, A>(g1, batches, stream);
    if (err == nullptr) err = launch_gemm<A, A, T, A>(g2, batches, stream);
    if (err != nullptr) return err;
  }
  return nullptr;
}

// ------------------------------------------------------------------------------------------------
// 2. channel_power_mean and 3. its backward

// MODE: 1 -> |v|, 2 -> v*v, 0 -> |v|^p.
template <int MODE, typename A>
__device__ __forceinline__ A power_of(A v, A p) {
  if constexpr (MODE == 1) {
    return abs_acc(v);
  } else if constexpr (MODE == 2) {
    return v * v;
  } else {
    return pow_acc(abs_acc(v), p);
  }
}

// sign(v) as torch.sign: 0 at 0 and at NaN.
template <typename A>
__device__ __forceinline__ A sign_of(A v) {
  return static_cast<A>(v > A(0)) - static_cast<A>(v < A(0));
}

// The slope of |v|^p without its factor p (kept in the scale): sign(v), v (p = 2), |v|^(p-1) sign(v).
template <int MODE, typename A>
__device__ __forceinline__ A power_slope(A v, A pm1) {
  if constexpr (MODE == 1) {
    return sign_of(v);
  } else if constexpr (MODE == 2) {
    return v;
  } else {
    return pow_acc(abs_acc(v), pm1) * sign_of(v);
  }
}

struct PowerArgs {
  const void* x;
  void* out;          // forward: (N, H, W) acc
  const void* g;      // backward: grad_map (N, H, W) acc
  void* gx;           // backward: grad_x
  int64_t xs0, xs1, xs2, xs3;
  int64_t gs0, gs1, gs2, gs3;
  int64_t C, H, W;
  int64_t positions;  // N * H * W
  double p;           // forward: p; backward: p - 1
  double scale;       // forward: 1 / C; backward: p / C
};

// Position kernel: block = (PX positions) x (Y channel rows), PX * Y = kThreads.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) power_mean_pos_kernel(const PowerArgs a) {
  using A = acc_t<T>;
  __shared__ A part[kThreads];
  const int PX = blockDim.x, Y = blockDim.y;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * PX + threadIdx.x;
  A acc = A(0);
  if (pos < a.positions) {
    const int64_t hw = a.H * a.W;
    const int64_t n = pos / hw, q = pos - n * hw;
    const int64_t h = q / a.W, w = q - h * a.W;
    const T* xp = static_cast<const T*>(a.x) + n * a.xs0 + h * a.xs2 + w * a.xs3;
    const A pp = static_cast<A>(a.p);
    for (int64_t c = threadIdx.y; c < a.C; c += Y) acc += power_of<MODE>(to_acc(xp[c * a.xs1]), pp);
  }
  part[threadIdx.y * PX + threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || pos >= a.positions) return;
  A s = part[threadIdx.x];
  for (int y = 1; y < Y; ++y) s += part[y * PX + threadIdx.x];
  static_cast<A*>(a.out)[pos] = s * static_cast<A>(a.scale);
}

// Warp kernel: one warp per position, lanes along C.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) power_mean_warp_kernel(const PowerArgs a) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % 32;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (pos >= a.positions) return;  // whole warps leave together
  const int64_t hw = a.H * a.W;
  const int64_t n = pos / hw, q = pos - n * hw;
  const int64_t h = q / a.W, w = q - h * a.W;
  const T* xp = static_cast<const T*>(a.x) + n * a.xs0 + h * a.xs2 + w * a.xs3;
  const A pp = static_cast<A>(a.p);
  A acc = A(0);
  for (int64_t c = lane; c < a.C; c += 32) acc += power_of<MODE>(to_acc(xp[c * a.xs1]), pp);
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) static_cast<A*>(a.out)[pos] = acc * static_cast<A>(a.scale);
}

template <typename T, int MODE, typename I>
__global__ void __launch_bounds__(kThreads) power_mean_bwd_kernel(const PowerArgs a, const I total, const int lf) {
  using A = acc_t<T>;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  const I C = static_cast<I>(a.C), H = static_cast<I>(a.H), W = static_cast<I>(a.W);
  const T* x = static_cast<const T*>(a.x);
  const A* g = static_cast<const A*>(a.g);
  T* gx = static_cast<T*>(a.gx);
  const A pm1 = static_cast<A>(a.p), scale = static_cast<A>(a.scale);
  for (I e = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    I n, c, h, w;
    unflatten_nchw(e, lf != 0, C, H, W, n, c, h, w);
    const int64_t n64 = static_cast<int64_t>(n), c64 = static_cast<int64_t>(c);
    const int64_t h64 = static_cast<int64_t>(h), w64 = static_cast<int64_t>(w);
    const A v = to_acc(x[n64 * a.xs0 + c64 * a.xs1 + h64 * a.xs2 + w64 * a.xs3]);
    const A gv = g[(n64 * a.H + h64) * a.W + w64];
    gx[n64 * a.gs0 + c64 * a.gs1 + h64 * a.gs2 + w64 * a.gs3] = from_acc<T>(scale * power_slope<MODE>(v, pm1) * gv);
  }
}

PowerArgs power_args(const Tensor4& x, double p) {
  PowerArgs a{};
  a.x = x.data;
  a.xs0 = x.stride[0];
  a.xs1 = x.stride[1];
  a.xs2 = x.stride[2];
  a.xs3 = x.stride[3];
  a.C = x.size[1];
  a.H = x.size[2];
  a.W = x.size[3];
  a.positions = x.size[0] * x.size[2] * x.size[3];
  a.p = p;
  return a;
}

template <typename T, int MODE>
const char* launch_power_mean(const PowerArgs& a, bool warp_per_position, cudaStream_t stream) {
  if (warp_per_position) {
    const int64_t blocks = ceil_div<int64_t>(a.positions, kThreads / 32);
    if (blocks > INT_MAX) return "channel_power_mean: tensor too large for the grid";
    power_mean_warp_kernel<T, MODE><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    const int Y = a.C >= 8 ? 8 : (a.C >= 4 ? 4 : (a.C >= 2 ? 2 : 1));
    const int PX = kThreads / Y;
    const int64_t blocks = ceil_div<int64_t>(a.positions, PX);
    if (blocks > INT_MAX) return "channel_power_mean: tensor too large for the grid";
    power_mean_pos_kernel<T, MODE><<<static_cast<unsigned>(blocks), dim3(PX, Y), 0, stream>>>(a);
  }
  return last_error();
}

template <typename T>
const char* power_mean_by_mode(const Tensor4& x, double p, void* out, cudaStream_t stream) {
  PowerArgs a = power_args(x, p);
  a.out = out;
  a.scale = 1.0 / static_cast<double>(a.C);
  const bool warp = a.C >= 32 && layout_vote(x) > 0;
  if (p == 1.0) return launch_power_mean<T, 1>(a, warp, stream);
  if (p == 2.0) return launch_power_mean<T, 2>(a, warp, stream);
  return launch_power_mean<T, 0>(a, warp, stream);
}

template <typename T, int MODE>
const char* launch_power_bwd(const PowerArgs& a, int64_t total, int lf, cudaStream_t stream) {
  int64_t blocks = ceil_div<int64_t>(total, kThreads);
  blocks = blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20);  // grid-stride beyond
  if (total < (int64_t(1) << 31) - kThreads * 2) {
    power_mean_bwd_kernel<T, MODE, uint32_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, static_cast<uint32_t>(total), lf);
  } else {
    power_mean_bwd_kernel<T, MODE, uint64_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, static_cast<uint64_t>(total), lf);
  }
  return last_error();
}

template <typename T>
const char* power_bwd_by_mode(const Tensor4& x, const void* grad_map, double p, const Tensor4& gx,
                              cudaStream_t stream) {
  PowerArgs a = power_args(x, p - 1.0);
  a.g = grad_map;
  a.gx = gx.data;
  a.gs0 = gx.stride[0];
  a.gs1 = gx.stride[1];
  a.gs2 = gx.stride[2];
  a.gs3 = gx.stride[3];
  a.scale = p / static_cast<double>(a.C);
  const int lf = a.C > 1 && channels_inner(gx, x) ? 1 : 0;
  const int64_t total = x.size[0] * x.size[1] * x.size[2] * x.size[3];
  if (p == 1.0) return launch_power_bwd<T, 1>(a, total, lf, stream);
  if (p == 2.0) return launch_power_bwd<T, 2>(a, total, lf, stream);
  return launch_power_bwd<T, 0>(a, total, lf, stream);
}

int acc_size_of(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

}  // namespace

// ------------------------------------------------------------------------------------------------
// public launchers

const char* dct_basis2d_workspace(DType dtype, const Tensor4& x, const Tensor4& out, int64_t* bytes) {
  *bytes = 0;
  if (any_zero(out) || x.size[2] == 0 || x.size[3] == 0) return nullptr;
  BasisPlan p;
  if (const char* err = plan_basis(acc_size_of(dtype), x, out, &p)) return err;
  *bytes = p.ws_bytes;
  return nullptr;
}

const char* dct_basis2d(DType dtype, const Tensor4& x, const void* left, const void* right, const Tensor4& out,
                        void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  if (any_zero(out)) return nullptr;
  if (x.size[2] == 0 || x.size[3] == 0) return "dct_basis2d: empty planes (the caller zero-fills)";
  switch (dtype) {
    case DType::kFloat32:
      return launch_basis<float>(x, left, right, out, workspace, workspace_bytes, stream);
    case DType::kFloat16:
      return launch_basis<__half>(x, left, right, out, workspace, workspace_bytes, stream);
    case DType::kBFloat16:
      return launch_basis<__nv_bfloat16>(x, left, right, out, workspace, workspace_bytes, stream);
    case DType::kFloat64:
      return launch_basis<double>(x, left, right, out, workspace, workspace_bytes, stream);
  }
  return "dct_basis2d: unsupported dtype";
}

const char* channel_power_mean(DType dtype, const Tensor4& x, double p, void* out, cudaStream_t stream) {
  if (x.size[0] == 0 || x.size[2] == 0 || x.size[3] == 0) return nullptr;
  if (x.size[1] < 1) return "channel_power_mean: x needs at least one channel";
  switch (dtype) {
    case DType::kFloat32:
      return power_mean_by_mode<float>(x, p, out, stream);
    case DType::kFloat16:
      return power_mean_by_mode<__half>(x, p, out, stream);
    case DType::kBFloat16:
      return power_mean_by_mode<__nv_bfloat16>(x, p, out, stream);
    case DType::kFloat64:
      return power_mean_by_mode<double>(x, p, out, stream);
  }
  return "channel_power_mean: unsupported dtype";
}

const char* channel_power_mean_backward(DType dtype, const Tensor4& x, const void* grad_map, double p,
                                        const Tensor4& grad_x, cudaStream_t stream) {
  if (any_zero(grad_x)) return nullptr;
  switch (dtype) {
    case DType::kFloat32:
      return power_bwd_by_mode<float>(x, grad_map, p, grad_x, stream);
    case DType::kFloat16:
      return power_bwd_by_mode<__half>(x, grad_map, p, grad_x, stream);
    case DType::kBFloat16:
      return power_bwd_by_mode<__nv_bfloat16>(x, grad_map, p, grad_x, stream);
    case DType::kFloat64:
      return power_bwd_by_mode<double>(x, grad_map, p, grad_x, stream);
  }
  return "channel_power_mean_backward: unsupported dtype";
}

}  // namespace ktk_dct_cuda
