// CUDA kernels of the pixel/global transfer loss (no torch headers here; see transfer_cuda.h).
//
// All kernels use 256 threads per block and accumulate in float (double for float64 data).
//
// 1. transfer_stats: per plane (n, c), sq = sum_hw (s - t)^2 and proj[0|1, j] = sum_hw basis[j, hw] s|t, one
//    pass over s and t. Each thread accumulates 1 + 2*JB values in registers (JB basis rows per launch: 0, 1, 4
//    or 16; more rows take several chunks along grid z, each re-reading s and t). The basis rows are read with
//    the same index by all the threads of a plane or position (broadcast, cached). Two mappings, picked from the
//    strides:
//    - planar (a spatial stride of s is the smallest): a group of G threads (32..256, by plane size) per plane,
//      256/G planes per block; the group walks the plane's positions in memory order (w fastest, or h fastest
//      when H has the smaller stride), so a warp's loads are contiguous. Warp butterfly sums, then the group's
//      warps in order through shared memory.
//    - channels-inner (s.stride(1) is the smallest, e.g. channels_last; C >= 8): a block per (n, tile of CT
//      channels), CT in {32, 16, 8} threads along the channels (coalesced: a warp reads 32/CT positions of CT
//      contiguous channels, whole 32-byte sectors for CT >= 8) and 256/CT rows of threads along the positions.
//      The rows are summed by shuffles within a warp and then warp by warp through shared memory, in order.
//    When the planes alone make too few blocks (fewer than kTargetBlocks), the positions are also split over
//    grid y: each split writes its partial sums to a workspace, and a finalize kernel adds the splits in order.
//    Everything is deterministic: fixed assignment of positions to threads, fixed reduction trees, no atomics,
//    and a plan that depends on the shapes and strides only.
//
// 2. transfer_grad: elementwise, one thread per grad element (grid-stride) in grad's memory order (channels
//    fastest for channels-inner grad, w fastest otherwise): grad = pc (s - t) + sum_j coef[n,c,j] basis[j,hw],
//    pc read from device memory once per thread, rounded once to grad's dtype.
#include "transfer_cuda.h"

#include "../common/cuda_device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace ktk_losses_cuda {
namespace {

using namespace ktk_cuda;  // dtype helpers, ldg, ceil_div, layout helpers (csrc/common/cuda_device.cuh)

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTargetBlocks = 1024;  // blocks below which the positions are split (about 8 per SM)
constexpr int kMaxSplits = 256;
constexpr int kMinChannels = 8;  // smallest channel count that takes the channels-inner mapping

// ------------------------------------------------------------------------------------------------
// 1. transfer_stats

struct StatsArgs {
  const void* s;
  const void* t;
  const void* basis;  // (J, HW) acc
  void* sq;           // (NC) acc
  void* proj;         // (2, NC, J) acc
  void* ws;           // splits > 1: (splits, NC, 1 + 2J) acc partials
  int64_t ss0, ss1, ss2, ss3;
  int64_t ts0, ts1, ts2, ts3;
  int64_t C, NC;
  int64_t ctiles;  // channels: channel tiles per image
  int H, W, HW, J;
  int chunk;   // positions per split
  int splits;  // splits of the positions (grid y)
  int group;   // planar: threads per plane
  int hfast;   // planar: positions walked h fastest
  int ct;      // channels: threads along C
};

// Value v of plane p: 0 -> sq, 1 + j -> proj[0, p, j], 1 + J + j -> proj[1, p, j]; or, with several splits,
// the workspace entry of split `split`.
template <typename A>
__device__ __forceinline__ void emit(const StatsArgs& a, int split, int64_t p, int v, A x) {
  if (a.splits > 1) {
    static_cast<A*>(a.ws)[(static_cast<int64_t>(split) * a.NC + p) * (1 + 2 * a.J) + v] = x;
  } else if (v == 0) {
    static_cast<A*>(a.sq)[p] = x;
  } else if (v <= a.J) {
    static_cast<A*>(a.proj)[p * a.J + (v - 1)] = x;
  } else {
    static_cast<A*>(a.proj)[(a.NC + p) * a.J + (v - 1 - a.J)] = x;
  }
}

// Writes a thread's 1 + 2*JB block-local values of plane p for basis rows j0 .. j0 + JB - 1 (those below J);
// sq only from the first chunk of rows.
template <int JB, typename A>
__device__ __forceinline__ void emit_values(const StatsArgs& a, int split, int64_t p, int j0, const A* v) {
  if (j0 == 0) emit(a, split, p, 0, v[0]);
#pragma unroll
  for (int j = 0; j < JB; ++j) {
    if (j0 + j < a.J) {
      emit(a, split, p, 1 + j0 + j, v[1 + j]);
      emit(a, split, p, 1 + a.J + j0 + j, v[1 + JB + j]);
    }
  }
}

// v[0] += (s - t)^2, v[1 + j] += b_j s, v[1 + JB + j] += b_j t with b_j = basis[row_j, hw]; the rows past J are
// clamped to J - 1 (read, never written).
template <int JB, typename A>
__device__ __forceinline__ void accumulate(A* v, A sv, A tv, const A* basis, int j0, int J, int HW, int hw) {
  const A d = sv - tv;
  v[0] += d * d;
#pragma unroll
  for (int j = 0; j < JB; ++j) {
    const int row = j0 + j < J ? j0 + j : J - 1;
    const A b = ldg(basis + static_cast<int64_t>(row) * HW + hw);
    v[1 + j] += b * sv;
    v[1 + JB + j] += b * tv;
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename T, int JB>
__global__ void __launch_bounds__(kThreads) stats_planar_kernel(const StatsArgs a) {
  using A = acc_t<T>;
  constexpr int V = 1 + 2 * JB;
  __shared__ A red[kWarps * V];
  const int G = a.group;
  const int g = threadIdx.x / G, r = threadIdx.x % G;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + g;
  const int split = blockIdx.y, j0 = blockIdx.z * JB;
  A v[V];
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = A(0);
  if (p < a.NC) {
    const int64_t n = p / a.C, c = p - n * a.C;
    const T* sp = static_cast<const T*>(a.s) + n * a.ss0 + c * a.ss1;
    const T* tp = static_cast<const T*>(a.t) + n * a.ts0 + c * a.ts1;
    const A* basis = static_cast<const A*>(a.basis);
    const int q0 = split * a.chunk;
    const int q1 = a.HW - q0 < a.chunk ? a.HW : q0 + a.chunk;
    for (int q = q0 + r; q < q1; q += G) {
      int h, w;
      if (a.hfast) {
        w = q / a.H;
        h = q - w * a.H;
      } else {
        h = q / a.W;
        w = q - h * a.W;
      }
      const A sv = to_acc(ldg(sp + h * a.ss2 + w * a.ss3));
      const A tv = to_acc(ldg(tp + h * a.ts2 + w * a.ts3));
      accumulate<JB>(v, sv, tv, basis, j0, a.J, a.HW, h * a.W + w);
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = warp_sum(v[i]);
  if (G > 32) {  // G is uniform over the block: every thread takes the same branch
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < V; ++i) red[warp * V + i] = v[i];
    }
    __syncthreads();
    if (r == 0) {
      const int w0 = warp, nw = G / 32;  // thread r == 0 is lane 0 of the group's first warp
#pragma unroll
      for (int i = 0; i < V; ++i) {
        A x = red[w0 * V + i];
        for (int k = 1; k < nw; ++k) x += red[(w0 + k) * V + i];
        v[i] = x;
      }
    }
  }
  if (r == 0 && p < a.NC) emit_values<JB>(a, split, p, j0, v);
}

template <typename T, int JB>
__global__ void __launch_bounds__(kThreads) stats_channels_kernel(const StatsArgs a) {
  using A = acc_t<T>;
  constexpr int V = 1 + 2 * JB;
  __shared__ A red[kWarps][32];
  const int CT = a.ct, R = kThreads / CT;
  const int tx = threadIdx.x % CT, ty = threadIdx.x / CT;
  const int64_t n = blockIdx.x / a.ctiles;
  const int64_t c = (blockIdx.x - n * a.ctiles) * CT + tx;
  const int split = blockIdx.y, j0 = blockIdx.z * JB;
  A v[V];
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = A(0);
  if (c < a.C) {
    const T* sp = static_cast<const T*>(a.s) + n * a.ss0 + c * a.ss1;
    const T* tp = static_cast<const T*>(a.t) + n * a.ts0 + c * a.ts1;
    const A* basis = static_cast<const A*>(a.basis);
    const int q0 = split * a.chunk;
    const int q1 = a.HW - q0 < a.chunk ? a.HW : q0 + a.chunk;
    for (int q = q0 + ty; q < q1; q += R) {
      const int h = q / a.W, w = q - h * a.W;
      const A sv = to_acc(ldg(sp + h * a.ss2 + w * a.ss3));
      const A tv = to_acc(ldg(tp + h * a.ts2 + w * a.ts3));
      accumulate<JB>(v, sv, tv, basis, j0, a.J, a.HW, q);
    }
  }
  // Rows within a warp (lanes of one channel are CT apart), then the warps in order, one value at a time.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = CT; off < 32; off *= 2) {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (lane < CT) red[warp][lane] = v[i];
    __syncthreads();
    if (threadIdx.x < CT) {  // row 0: lanes 0..CT-1 of warp 0, tx == threadIdx.x
      A x = red[0][tx];
      for (int k = 1; k < kWarps; ++k) x += red[k][tx];
      v[i] = x;
    }
    __syncthreads();
  }
  if (ty == 0 && c < a.C) emit_values<JB>(a, split, n * a.C + c, j0, v);
}

// Adds the splits' partials in split order: one thread per (plane, value).
template <typename A>
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(const StatsArgs a) {
  const int V = 1 + 2 * a.J;
  const int64_t total = a.NC * V;
  const A* ws = static_cast<const A*>(a.ws);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    A x = ws[e];
    for (int sp = 1; sp < a.splits; ++sp) x += ws[sp * total + e];
    const int64_t p = e / V;
    const int v = static_cast<int>(e - p * V);
    if (v == 0) {
      static_cast<A*>(a.sq)[p] = x;
    } else if (v <= a.J) {
      static_cast<A*>(a.proj)[p * a.J + (v - 1)] = x;
    } else {
      static_cast<A*>(a.proj)[(a.NC + p) * a.J + (v - 1 - a.J)] = x;
    }
  }
}

// The launch plan, shared by the workspace query and the launch.
struct StatsPlan {
  bool channels;
  int jb, jchunks;
  int group, hfast;  // planar
  int ct;            // channels
  int64_t ctiles;
  int64_t blocks;  // grid x
  int splits, chunk;
  int64_t ws_bytes;
};

int64_t abs64(int64_t v) { return v < 0 ? -v : v; }

const char* plan_stats(int acc_size, const Tensor4& s, const Tensor4& t, int64_t J, StatsPlan* p) {
  const int64_t N = s.size[0], C = s.size[1], H = s.size[2], W = s.size[3], HW = H * W, NC = N * C;
  // Positions are int in the kernels, with room for the loop's last step past the end.
  if (HW >= (int64_t(1) << 30) || J > INT_MAX / 4) return "transfer_stats: plane or basis too large";
  p->jb = J == 0 ? 0 : (J == 1 ? 1 : (J <= 4 ? 4 : 16));
  p->jchunks = p->jb == 0 ? 1 : static_cast<int>(ceil_div<int64_t>(J, p->jb));
  if (p->jchunks > 65535) return "transfer_stats: too many basis rows";
  p->channels = C >= kMinChannels && channels_inner(s, t);
  int64_t min_split;  // fewest positions per split: at least a few per thread
  if (p->channels) {
    p->ct = 32;
    while (p->ct > 8 && N * ceil_div<int64_t>(C, p->ct) * p->jchunks < kTargetBlocks) p->ct /= 2;
    p->ctiles = ceil_div<int64_t>(C, p->ct);
    p->blocks = N * p->ctiles;
    p->group = 0;
    p->hfast = 0;
    min_split = 4 * (kThreads / p->ct);
  } else {
    p->group = 32;
    while (p->group < kThreads && p->group * 8 <= HW) p->group *= 2;
    p->blocks = ceil_div<int64_t>(NC, kThreads / p->group);
    // Walk h fastest when H's stride is the smaller one (e.g. transposed planes), so loads stay contiguous.
    p->hfast = H > 1 && W > 1 && abs64(s.stride[2]) < abs64(s.stride[3]) ? 1 : 0;
    p->ct = 0;
    p->ctiles = 0;
    min_split = 4 * p->group;
  }
  if (p->blocks > INT_MAX) return "transfer_stats: tensor too large for the grid";
  int64_t splits = 1;
  const int64_t base = p->blocks * p->jchunks;
  if (base < kTargetBlocks) {
    splits = ceil_div<int64_t>(kTargetBlocks, base);
    const int64_t most = HW / min_split > 1 ? HW / min_split : 1;
    splits = splits < most ? splits : most;
    splits = splits < kMaxSplits ? splits : kMaxSplits;
  }
  p->chunk = static_cast<int>(ceil_div<int64_t>(HW, splits));
  p->splits = static_cast<int>(ceil_div<int64_t>(HW, p->chunk));
  p->ws_bytes = p->splits > 1 ? static_cast<int64_t>(p->splits) * NC * (1 + 2 * J) * acc_size : 0;
  return nullptr;
}

template <typename T, int JB>
void launch_stats_jb(const StatsArgs& a, const StatsPlan& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.blocks), static_cast<unsigned>(p.splits),
                  static_cast<unsigned>(p.jchunks));
  if (p.channels) {
    stats_channels_kernel<T, JB><<<grid, kThreads, 0, stream>>>(a);
  } else {
    stats_planar_kernel<T, JB><<<grid, kThreads, 0, stream>>>(a);
  }
}

template <typename T>
const char* launch_stats(const Tensor4& s, const Tensor4& t, const void* basis, int64_t J, void* sq, void* proj,
                         void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  using A = acc_t<T>;
  StatsPlan p;
  if (const char* err = plan_stats(static_cast<int>(sizeof(A)), s, t, J, &p)) return err;
  if (p.ws_bytes > 0 && (workspace == nullptr || workspace_bytes < p.ws_bytes)) {
    return "transfer_stats: workspace missing or too small";
  }
  StatsArgs a{};
  a.s = s.data;
  a.t = t.data;
  a.basis = basis;
  a.sq = sq;
  a.proj = proj;
  a.ws = workspace;
  a.ss0 = s.stride[0];
  a.ss1 = s.stride[1];
  a.ss2 = s.stride[2];
  a.ss3 = s.stride[3];
  a.ts0 = t.stride[0];
  a.ts1 = t.stride[1];
  a.ts2 = t.stride[2];
  a.ts3 = t.stride[3];
  a.C = s.size[1];
  a.NC = s.size[0] * s.size[1];
  a.ctiles = p.ctiles;
  a.H = static_cast<int>(s.size[2]);
  a.W = static_cast<int>(s.size[3]);
  a.HW = a.H * a.W;
  a.J = static_cast<int>(J);
  a.chunk = p.chunk;
  a.splits = p.splits;
  a.group = p.group;
  a.hfast = p.hfast;
  a.ct = p.ct;
  switch (p.jb) {
    case 0:
      launch_stats_jb<T, 0>(a, p, stream);
      break;
    case 1:
      launch_stats_jb<T, 1>(a, p, stream);
      break;
    case 4:
      launch_stats_jb<T, 4>(a, p, stream);
      break;
    default:
      launch_stats_jb<T, 16>(a, p, stream);
      break;
  }
  if (p.splits > 1) {
    int64_t blocks = ceil_div<int64_t>(a.NC * (1 + 2 * J), kThreads);
    blocks = blocks < (int64_t(1) << 16) ? blocks : (int64_t(1) << 16);  // grid-stride beyond
    stats_finalize_kernel<A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  }
  return last_error();
}

// ------------------------------------------------------------------------------------------------
// 2. transfer_grad

struct GradArgs {
  const void* s;
  const void* t;
  void* g;
  const void* basis;  // (J, HW) acc
  const void* pc;     // (1,) acc, on the device
  const void* coef;   // (NC, J) acc
  int64_t ss0, ss1, ss2, ss3;
  int64_t ts0, ts1, ts2, ts3;
  int64_t gs0, gs1, gs2, gs3;
  int64_t C, H, W;
  int J;
};

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) grad_kernel(const GradArgs a, const I total, const int lf) {
  using A = acc_t<T>;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  const I C = static_cast<I>(a.C), H = static_cast<I>(a.H), W = static_cast<I>(a.W);
  const T* s = static_cast<const T*>(a.s);
  const T* t = static_cast<const T*>(a.t);
  T* g = static_cast<T*>(a.g);
  const A* basis = static_cast<const A*>(a.basis);
  const A* coef = static_cast<const A*>(a.coef);
  const A pc = ldg(static_cast<const A*>(a.pc));
  const int64_t HW = a.H * a.W;
  for (I e = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    I n, c, h, w;
    unflatten_nchw(e, lf != 0, C, H, W, n, c, h, w);
    const int64_t n64 = static_cast<int64_t>(n), c64 = static_cast<int64_t>(c);
    const int64_t h64 = static_cast<int64_t>(h), w64 = static_cast<int64_t>(w);
    const A sv = to_acc(ldg(s + n64 * a.ss0 + c64 * a.ss1 + h64 * a.ss2 + w64 * a.ss3));
    const A tv = to_acc(ldg(t + n64 * a.ts0 + c64 * a.ts1 + h64 * a.ts2 + w64 * a.ts3));
    A v = pc * (sv - tv);
    const A* cr = coef + (n64 * a.C + c64) * a.J;
    const A* br = basis + h64 * a.W + w64;
    for (int j = 0; j < a.J; ++j) v += ldg(cr + j) * ldg(br + j * HW);
    g[n64 * a.gs0 + c64 * a.gs1 + h64 * a.gs2 + w64 * a.gs3] = from_acc<T>(v);
  }
}

template <typename T>
const char* launch_grad(const Tensor4& s, const Tensor4& t, const void* basis, int64_t J, const void* pixel_coef,
                        const void* coef, const Tensor4& grad, cudaStream_t stream) {
  if (J > INT_MAX) return "transfer_grad: too many basis rows";
  GradArgs a{};
  a.s = s.data;
  a.t = t.data;
  a.g = grad.data;
  a.basis = basis;
  a.pc = pixel_coef;
  a.coef = coef;
  a.ss0 = s.stride[0];
  a.ss1 = s.stride[1];
  a.ss2 = s.stride[2];
  a.ss3 = s.stride[3];
  a.ts0 = t.stride[0];
  a.ts1 = t.stride[1];
  a.ts2 = t.stride[2];
  a.ts3 = t.stride[3];
  a.gs0 = grad.stride[0];
  a.gs1 = grad.stride[1];
  a.gs2 = grad.stride[2];
  a.gs3 = grad.stride[3];
  a.C = s.size[1];
  a.H = s.size[2];
  a.W = s.size[3];
  a.J = static_cast<int>(J);
  const int lf = a.C > 1 && channels_inner(grad, s) ? 1 : 0;
  const int64_t total = s.size[0] * s.size[1] * s.size[2] * s.size[3];
  int64_t blocks = ceil_div<int64_t>(total, kThreads);
  blocks = blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20);  // grid-stride beyond
  if (total < (int64_t(1) << 31) - kThreads * 2) {
    grad_kernel<T, uint32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a, static_cast<uint32_t>(total), lf);
  } else {
    grad_kernel<T, uint64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a, static_cast<uint64_t>(total), lf);
  }
  return last_error();
}

bool any_zero(const Tensor4& x) {
  for (int d = 0; d < 4; ++d) {
    if (x.size[d] == 0) return true;
  }
  return false;
}

int acc_size_of(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

}  // namespace

// ------------------------------------------------------------------------------------------------
// public launchers

const char* transfer_stats_workspace(DType dtype, const Tensor4& s, const Tensor4& t, int64_t J, int64_t* bytes) {
  *bytes = 0;
  if (any_zero(s)) return nullptr;
  StatsPlan p;
  if (const char* err = plan_stats(acc_size_of(dtype), s, t, J, &p)) return err;
  *bytes = p.ws_bytes;
  return nullptr;
}

const char* transfer_stats(DType dtype, const Tensor4& s, const Tensor4& t, const void* basis, int64_t J, void* sq,
                           void* proj, void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  if (s.size[0] == 0 || s.size[1] == 0) return nullptr;
  if (s.size[2] == 0 || s.size[3] == 0) return "transfer_stats: empty planes (the caller zero-fills)";
  switch (dtype) {
    case DType::kFloat32:
      return launch_stats<float>(s, t, basis, J, sq, proj, workspace, workspace_bytes, stream);
    case DType::kFloat16:
      return launch_stats<__half>(s, t, basis, J, sq, proj, workspace, workspace_bytes, stream);
    case DType::kBFloat16:
      return launch_stats<__nv_bfloat16>(s, t, basis, J, sq, proj, workspace, workspace_bytes, stream);
    case DType::kFloat64:
      return launch_stats<double>(s, t, basis, J, sq, proj, workspace, workspace_bytes, stream);
  }
  return "transfer_stats: unsupported dtype";
}

const char* transfer_grad(DType dtype, const Tensor4& s, const Tensor4& t, const void* basis, int64_t J,
                          const void* pixel_coef, const void* coef, const Tensor4& grad, cudaStream_t stream) {
  if (any_zero(grad)) return nullptr;
  switch (dtype) {
    case DType::kFloat32:
      return launch_grad<float>(s, t, basis, J, pixel_coef, coef, grad, stream);
    case DType::kFloat16:
      return launch_grad<__half>(s, t, basis, J, pixel_coef, coef, grad, stream);
    case DType::kBFloat16:
      return launch_grad<__nv_bfloat16>(s, t, basis, J, pixel_coef, coef, grad, stream);
    case DType::kFloat64:
      return launch_grad<double>(s, t, basis, J, pixel_coef, coef, grad, stream);
  }
  return "transfer_grad: unsupported dtype";
}

}  // namespace ktk_losses_cuda
