// CUDA kernels of the blur-pool family (no torch headers here; see blurpool_cuda.h).
//
// Three kernels, all 256 threads per block, all accumulating in float (double for float64):
//
// 1. blur_gather: out[n,c,i,j] = sum_u sum_v rw[i,u] cw[j,v] x[n,c,ri[i,u],ci[j,v]], a direct gather
//    whose k*k taps are served by L1/L2 (neighbouring outputs share them). One thread computes
//    kGatherOpt (4) vertically adjacent outputs (i0..i0+3, j) of one plane: the column table of j
//    is loaded once into registers and the overlapping input rows of the 4 outputs hit L1 within
//    the thread. Two index mappings, picked from the strides:
//    - planar (a spatial stride of x is the smallest): flat thread index -> (plane n*C+c, row group,
//      j) with j fastest, so a warp reads along W and small maps (7x7) still fill every block.
//    - channels-inner (x.stride(1) is the smallest, e.g. channels_last): block = (bx channels) x
//      (by positions); lanes run along C, so every tap of a warp is one contiguous load; the by
//      positions of a block are consecutive j (then row groups), sharing input columns in L1.
//
// 2. max_blur_forward and 3. max_blur_backward: shared-memory tiles. A block owns a tile of the
//    output grid (th x tw positions) for P "lanes" (consecutive planes p = n*C + c). Lane-fast
//    ordering (channels-inner tensors: P = 32 lanes = 32 channels, smem [row][col][lane]) or
//    column-fast ordering (planar tensors: P planes, smem [lane][row][col]) keeps global accesses
//    coalesced and smem accesses conflict-light. Work inside a block is split into "items" = (lane,
//    column, segment of consecutive rows) so that each thread walks down a column.
//
//    forward:  phase 0  lane base offsets and the tile's table rows -> smem; the bounding box of the
//                       table indices with non-zero weight (the max-map rows/cols the blur needs),
//                       united with the max-map positions whose codes this tile owns, is the region.
//              phase 1  every region element of the max map m is computed ONCE (separable sliding
//                       window down a column: one x row of kmax loads per element), stored in smem
//                       (exactly, in the input dtype: m is an element of x) and, if owned, its code
//                       is stored to global memory (each code written exactly once grid-wide).
//              phase 2  the blur gathers m from smem with the column table in registers.
//              A block whose region does not fit the smem capacity (only possible with tables that
//              are not blur-pool tables) computes its owned codes in phase 1 and evaluates every
//              tap's max directly from global memory in phase 2 (same results, slower).
//    backward: tile over grad_input; region = the max-map positions (r,c) that can route to the tile
//              (tile + kmax-1 halo, exact). phase 1 computes gm = adjoint gather of grad for region
//              elements whose code points into the tile and stores gm and the code in smem; phase 2
//              sums, for every grad_input element, the (at most kmax^2) gm whose code picks it, in a
//              fixed order: deterministic, no atomics, every element written.
//
// Zero-weight taps are skipped (never multiplied), which also matches the reference's zero padding
// when the data hold inf/NaN, and lets zero-weight taps carry any in-range index.
// Index maths: 64-bit plane bases and strides; 32-bit flat thread indices unless the launch is huge.
#include "blurpool_cuda.h"

#include "../common/cuda_device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

namespace ktk_blurpool_cuda {
namespace {

using namespace ktk_cuda;  // dtype helpers, ldg, ceil_div, launch helpers (csrc/common/cuda_device.cuh)

constexpr int kThreads = 256;                   // threads per block, every kernel
constexpr int64_t kSmemLimit = 48 * 1024;        // dynamic smem per block without an opt-in
constexpr int kGatherOpt = 4;                    // outputs per thread in blur_gather
constexpr int kMaxLanes = 32;                    // planes per block in the tiled kernels

// ------------------------------------------------------------------------------------------------
// dtype helpers
// torch.max_pool2d's rule: v replaces the current best when v > best or v is NaN.
template <typename T>
__device__ __forceinline__ bool takes(T v, T best) {
  const auto fv = to_acc(v);
  return fv > to_acc(best) || fv != fv;
}

// Splits `rows` rows over `cols` column workers so that about blockDim.x items exist:
// items = cols * nseg, each walking `seglen` consecutive rows.
__device__ __forceinline__ void split_rows(int rows, int cols, int& seglen, int& nseg) {
  int n = static_cast<int>(blockDim.x) / (cols > 0 ? cols : 1);
  n = n > rows ? rows : n;
  n = n < 1 ? 1 : n;
  seglen = ceil_div(rows, n);
  nseg = ceil_div(rows, seglen);
}

// Decomposes a work item index into (lane, column, segment).
__device__ __forceinline__ void decompose_item(int e, bool lane_fast, int lanes, int cols, int nseg, int& lane,
                                               int& col, int& seg) {
  if (lane_fast) {
    lane = e % lanes;
    const int q = e / lanes;
    col = q % cols;
    seg = q / cols;
  } else {
    col = e % cols;
    const int q = e / cols;
    seg = q % nseg;
    lane = q / nseg;
  }
}

// ------------------------------------------------------------------------------------------------
// 1. blur_gather

struct GatherArgs {
  const void* x;
  void* out;
  int64_t xs0, xs1, xs2, xs3;
  int64_t os0, os1, os2, os3;
  int64_t C;
  int Ho, Wo;
  const int32_t* ridx;
  const float* rw;
  int KH;
  const int32_t* cidx;
  const float* cw;
  int KW;
};

// The column taps of one output column j: offsets (index * stride) and weights in registers when
// KW <= MAXKW, read from the (L1-resident) global table when MAXKW == 0.
template <typename T, int MAXKW>
struct GlobalColumnTaps {
  using A = acc_t<T>;
  static constexpr int kRegs = MAXKW > 0 ? MAXKW : 1;
  int64_t off[kRegs];
  float w[kRegs];
  const int32_t* idx_row;
  const float* w_row;
  int k;
  int64_t stride;

  __device__ __forceinline__ void load(const int32_t* cidx, const float* cw, int KW, int j, int64_t sxw) {
    idx_row = cidx + static_cast<int64_t>(j) * KW;
    w_row = cw + static_cast<int64_t>(j) * KW;
    k = KW;
    stride = sxw;
    if constexpr (MAXKW > 0) {
#pragma unroll
      for (int v = 0; v < MAXKW; ++v) {
        const bool in = v < KW;
        w[v] = in ? __ldg(w_row + v) : 0.f;
        off[v] = in ? static_cast<int64_t>(__ldg(idx_row + v)) * sxw : 0;
      }
    }
  }

  // sum_v w[v] * xrow[idx[v] * stride], skipping zero weights.
  __device__ __forceinline__ A sum(const T* __restrict__ xrow) const {
    A s = A(0);
    if constexpr (MAXKW > 0) {
#pragma unroll
      for (int v = 0; v < MAXKW; ++v) {
        if (w[v] != 0.f) s += A(w[v]) * to_acc(ldg(xrow + off[v]));
      }
    } else {
      for (int v = 0; v < k; ++v) {
        const float wv = __ldg(w_row + v);
        if (wv != 0.f) s += A(wv) * to_acc(ldg(xrow + static_cast<int64_t>(__ldg(idx_row + v)) * stride));
      }
    }
    return s;
  }
};

// One thread's work: out[n, c, i0 .. i0+kGatherOpt-1, j] (rows < Ho) of the plane at xp; ob is the
// output offset of (n, c, 0, j). The kGatherOpt rows share the column taps (registers), and their
// input rows overlap (stride < filter), so those loads hit L1 within the thread.
template <typename T, int MAXKW>
__device__ __forceinline__ void gather_rows(const GatherArgs& a, const T* __restrict__ xp, T* __restrict__ out,
                                            int64_t ob, int i0, int j) {
  using A = acc_t<T>;
  constexpr int OPT = kGatherOpt;
  GlobalColumnTaps<T, MAXKW> col;
  col.load(a.cidx, a.cw, a.KW, j, a.xs3);
  int64_t trow[OPT];
  A acc[OPT];
#pragma unroll
  for (int k = 0; k < OPT; ++k) {
    const int i = i0 + k < a.Ho ? i0 + k : a.Ho - 1;  // rows past Ho recompute the last row and store nothing
    trow[k] = static_cast<int64_t>(i) * a.KH;
    acc[k] = A(0);
  }
  for (int u = 0; u < a.KH; ++u) {
#pragma unroll
    for (int k = 0; k < OPT; ++k) {
      const float wr = __ldg(a.rw + trow[k] + u);
      if (wr != 0.f) {
        const int64_t roff = static_cast<int64_t>(__ldg(a.ridx + trow[k] + u)) * a.xs2;
        acc[k] += A(wr) * col.sum(xp + roff);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < OPT; ++k) {
    if (i0 + k < a.Ho) out[ob + static_cast<int64_t>(i0 + k) * a.os2] = from_acc<T>(acc[k]);
  }
}

// Planar mapping: flat thread index t -> (plane = n*C + c, row group, j), j fastest.
template <typename T, int MAXKW, typename IndexT>
__global__ void __launch_bounds__(kThreads)
    blur_gather_planar_kernel(const GatherArgs a, const IndexT total, const int row_groups) {
  const IndexT t = IndexT(blockIdx.x) * IndexT(blockDim.x) + IndexT(threadIdx.x);
  if (t >= total) return;
  const IndexT wo = IndexT(a.Wo);
  const IndexT q = t / wo;
  const int j = static_cast<int>(t - q * wo);
  const IndexT plane = q / IndexT(row_groups);
  const int ig = static_cast<int>(q - plane * IndexT(row_groups));
  const IndexT n = plane / IndexT(a.C);
  const int64_t c = static_cast<int64_t>(plane - n * IndexT(a.C));
  const T* xp = static_cast<const T*>(a.x) + static_cast<int64_t>(n) * a.xs0 + c * a.xs1;
  const int64_t ob = static_cast<int64_t>(n) * a.os0 + c * a.os1 + static_cast<int64_t>(j) * a.os3;
  gather_rows<T, MAXKW>(a, xp, static_cast<T*>(a.out), ob, ig * kGatherOpt, j);
}

// Channels-inner mapping: threadIdx.x = channel within a chunk of blockDim.x channels,
// (blockIdx.x / cchunks) * blockDim.y + threadIdx.y = item -> (n, row group, j), j fastest.
template <typename T, int MAXKW, typename IndexT>
__global__ void __launch_bounds__(kThreads)
    blur_gather_cl_kernel(const GatherArgs a, const IndexT items, const int row_groups, const IndexT cchunks) {
  const IndexT b = IndexT(blockIdx.x);
  const IndexT chunk = b % cchunks;
  const IndexT pos_block = b / cchunks;
  const int64_t c = static_cast<int64_t>(chunk) * blockDim.x + threadIdx.x;
  const IndexT item = pos_block * IndexT(blockDim.y) + IndexT(threadIdx.y);
  if (c >= a.C || item >= items) return;
  const IndexT wo = IndexT(a.Wo);
  const int j = static_cast<int>(item % wo);
  const IndexT rest = item / wo;
  const int ig = static_cast<int>(rest % IndexT(row_groups));
  const IndexT n = rest / IndexT(row_groups);
  const T* xp = static_cast<const T*>(a.x) + static_cast<int64_t>(n) * a.xs0 + c * a.xs1;
  const int64_t ob = static_cast<int64_t>(n) * a.os0 + c * a.os1 + static_cast<int64_t>(j) * a.os3;
  gather_rows<T, MAXKW>(a, xp, static_cast<T*>(a.out), ob, ig * kGatherOpt, j);
}

// ------------------------------------------------------------------------------------------------
// Shared-memory layout of the tiled kernels (host and device compute it identically).
struct TileSmem {
  int64_t bases;   // 3 * P int64 lane base offsets
  int64_t tile;    // value tile: P * cap_h * cap_w elements of tile_bytes
  int64_t codes;   // code tile: P * cap_h * cap_w bytes (backward), or empty
  int64_t rt_idx;  // row table (rt_n int32 + rt_n float)
  int64_t rt_w;
  int64_t ct_idx;  // column table (ct_n int32 + ct_n float)
  int64_t ct_w;
  int64_t range;   // 4 ints
  int64_t total;
};

__host__ __device__ __forceinline__ int64_t align16(int64_t v) { return (v + 15) / 16 * 16; }

__host__ __device__ __forceinline__ TileSmem tile_smem(int64_t P, int64_t tile_elems, int64_t tile_bytes,
                                                       int64_t code_bytes, int64_t rt_n, int64_t ct_n) {
  TileSmem s;
  int64_t o = 0;
  s.bases = o;
  o += align16(3 * P * 8);
  s.tile = o;
  o += align16(tile_elems * tile_bytes);
  s.codes = o;
  o += align16(tile_elems * code_bytes);
  s.rt_idx = o;
  o += align16(rt_n * 4);
  s.rt_w = o;
  o += align16(rt_n * 4);
  s.ct_idx = o;
  o += align16(ct_n * 4);
  s.ct_w = o;
  o += align16(ct_n * 4);
  s.range = o;
  o += 16;
  s.total = o;
  return s;
}

// Column taps of a tiled kernel, from the smem table row `row` (KW entries): weights and offsets
// (index - base) * stride in registers when KW <= MAXKW, else read from smem at every use.
template <int MAXKW>
struct SmemColumnTaps {
  static constexpr int kRegs = MAXKW > 0 ? MAXKW : 1;
  int64_t off[kRegs];
  float w[kRegs];
  const int* ti;
  const float* tw;
  int k;
  int base;
  int64_t stride;

  __device__ __forceinline__ void load(const int* cti, const float* ctw, int KW, int row, int base_, int64_t stride_) {
    ti = cti + row * KW;
    tw = ctw + row * KW;
    k = KW;
    base = base_;
    stride = stride_;
    if constexpr (MAXKW > 0) {
#pragma unroll
      for (int v = 0; v < MAXKW; ++v) {
        const bool in = v < KW;
        w[v] = in ? tw[v] : 0.f;
        off[v] = in ? static_cast<int64_t>(ti[v] - base) * stride : 0;
      }
    }
  }
  __device__ __forceinline__ int count() const { return MAXKW > 0 ? MAXKW : k; }
  __device__ __forceinline__ float weight(int v) const {
    if constexpr (MAXKW > 0) {
      return w[v];
    } else {
      return tw[v];
    }
  }
  __device__ __forceinline__ int64_t offset(int v) const {
    if constexpr (MAXKW > 0) {
      return off[v];
    } else {
      return static_cast<int64_t>(ti[v] - base) * stride;
    }
  }
};

// ------------------------------------------------------------------------------------------------
// 2. max_blur_forward

struct MaxFwdArgs {
  const void* x;
  void* out;
  uint8_t* codes;
  int64_t xs0, xs1, xs2, xs3;
  int64_t os0, os1, os2, os3;
  int64_t cs0, cs1, cs2, cs3;
  int64_t C, NC;
  int H, W, Hm, Wm, Ho, Wo;
  int pmax, sh, sw;
  const int32_t* ridx;
  const float* rw;
  int KH;
  const int32_t* cidx;
  const float* cw;
  int KW;
  int P, th, tw, cap_h, cap_w, tiles_h, tiles_w;
  int lane_fast;
};

// Max over the in-range columns of one x row of a window (scan b ascending, torch's rule).
// Returns false when the row is outside x (or no column is in range).
template <typename T, int KMAX>
__device__ __forceinline__ bool row_max(const T* xl, int xr, int H, int64_t xs2, const int64_t (&xcoff)[KMAX],
                                        const bool (&xcok)[KMAX], T& v, int& b_out) {
  if (xr < 0 || xr >= H) return false;
  const T* row = xl + static_cast<int64_t>(xr) * xs2;
  bool found = false;
#pragma unroll
  for (int b = 0; b < KMAX; ++b) {
    if (xcok[b]) {
      const T val = ldg(row + xcoff[b]);
      if (!found || takes(val, v)) {
        v = val;
        b_out = b;
        found = true;
      }
    }
  }
  return found;
}

// m[r,c] straight from global memory (the fallback path).
template <typename T, int KMAX>
__device__ __forceinline__ T window_max(const T* xl, int r, int c, int pmax, int H, int W, int64_t xs2,
                                        int64_t xs3) {
  T best = T();
  bool found = false;
#pragma unroll
  for (int a = 0; a < KMAX; ++a) {
    const int xr = r + a - pmax;
    if (xr < 0 || xr >= H) continue;
#pragma unroll
    for (int b = 0; b < KMAX; ++b) {
      const int xc = c + b - pmax;
      if (xc < 0 || xc >= W) continue;
      const T val = ldg(xl + static_cast<int64_t>(xr) * xs2 + static_cast<int64_t>(xc) * xs3);
      if (!found || takes(val, best)) {
        best = val;
        found = true;
      }
    }
  }
  return best;
}

template <typename T, int KMAX, int MAXKW>
__global__ void __launch_bounds__(kThreads) max_blur_fwd_kernel(const MaxFwdArgs a) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const TileSmem L = tile_smem(a.P, static_cast<int64_t>(a.P) * a.cap_h * a.cap_w, sizeof(T), 0,
                               static_cast<int64_t>(a.th) * a.KH, static_cast<int64_t>(a.tw) * a.KW);
  int64_t* xbase = reinterpret_cast<int64_t*>(smem + L.bases);
  int64_t* obase = xbase + a.P;
  int64_t* cbase = obase + a.P;
  T* mt = reinterpret_cast<T*>(smem + L.tile);
  int* rti = reinterpret_cast<int*>(smem + L.rt_idx);
  float* rtw = reinterpret_cast<float*>(smem + L.rt_w);
  int* cti = reinterpret_cast<int*>(smem + L.ct_idx);
  float* ctw = reinterpret_cast<float*>(smem + L.ct_w);
  int* rng = reinterpret_cast<int*>(smem + L.range);

  const int tid = threadIdx.x;
  const int nthr = blockDim.x;
  int blk = blockIdx.x;
  const int tj = blk % a.tiles_w;
  blk /= a.tiles_w;
  const int ti = blk % a.tiles_h;
  blk /= a.tiles_h;
  const int64_t p0 = static_cast<int64_t>(blk) * a.P;
  const int nP = static_cast<int>(a.NC - p0 < a.P ? a.NC - p0 : a.P);
  const int i0 = ti * a.th;
  const int nI = min(a.th, a.Ho - i0);
  const int j0 = tj * a.tw;
  const int nJ = min(a.tw, a.Wo - j0);

  // ---- phase 0: lane bases, table rows of the tile, bounding box of the non-zero taps
  if (tid < nP) {
    const int64_t p = p0 + tid;
    const int64_t n = p / a.C;
    const int64_t c = p - n * a.C;
    xbase[tid] = n * a.xs0 + c * a.xs1;
    obase[tid] = n * a.os0 + c * a.os1;
    cbase[tid] = n * a.cs0 + c * a.cs1;
  }
  if (tid < 4) rng[tid] = (tid & 1) ? INT_MIN : INT_MAX;  // row lo, row hi, col lo, col hi
  __syncthreads();
  {
    int lo = INT_MAX, hi = INT_MIN;
    const int64_t src = static_cast<int64_t>(i0) * a.KH;
    for (int e = tid; e < nI * a.KH; e += nthr) {
      const int id = __ldg(a.ridx + src + e);
      const float w = __ldg(a.rw + src + e);
      rti[e] = id;
      rtw[e] = w;
      if (w != 0.f) {
        lo = min(lo, id);
        hi = max(hi, id);
      }
    }
    if (lo <= hi) {
      atomicMin(rng + 0, lo);
      atomicMax(rng + 1, hi);
    }
    lo = INT_MAX;
    hi = INT_MIN;
    const int64_t csrc = static_cast<int64_t>(j0) * a.KW;
    for (int e = tid; e < nJ * a.KW; e += nthr) {
      const int id = __ldg(a.cidx + csrc + e);
      const float w = __ldg(a.cw + csrc + e);
      cti[e] = id;
      ctw[e] = w;
      if (w != 0.f) {
        lo = min(lo, id);
        hi = max(hi, id);
      }
    }
    if (lo <= hi) {
      atomicMin(rng + 2, lo);
      atomicMax(rng + 3, hi);
    }
  }
  __syncthreads();

  // Codes owned by this tile: rows [sh*i0, sh*(i0+nI)), the last tile row extending to Hm; same for columns.
  const int64_t hm = a.Hm, wm = a.Wm;
  const int own_r0 = static_cast<int>(min(static_cast<int64_t>(a.sh) * i0, hm));
  const int own_r1 = i0 + nI == a.Ho ? a.Hm : static_cast<int>(min(static_cast<int64_t>(a.sh) * (i0 + nI), hm));
  const int own_c0 = static_cast<int>(min(static_cast<int64_t>(a.sw) * j0, wm));
  const int own_c1 = j0 + nJ == a.Wo ? a.Wm : static_cast<int>(min(static_cast<int64_t>(a.sw) * (j0 + nJ), wm));
  int64_t R0 = rng[0], R1 = static_cast<int64_t>(rng[1]) + 1;  // empty when R0 >= R1
  int64_t C0 = rng[2], C1 = static_cast<int64_t>(rng[3]) + 1;
  // Without codes (a forward with no backward to come) the region is only what the blur reads:
  // the owned max-map rows and columns that no tap weights are neither needed nor computed.
  const bool with_codes = a.codes != nullptr;
  if (with_codes && own_r0 < own_r1) {
    R0 = min(R0, static_cast<int64_t>(own_r0));
    R1 = max(R1, static_cast<int64_t>(own_r1));
  }
  if (with_codes && own_c0 < own_c1) {
    C0 = min(C0, static_cast<int64_t>(own_c0));
    C1 = max(C1, static_cast<int64_t>(own_c1));
  }
  const int rh = R0 < R1 ? static_cast<int>(R1 - R0) : 0;
  const int cw_ = C0 < C1 ? static_cast<int>(C1 - C0) : 0;
  const bool tiled = rh <= a.cap_h && cw_ <= a.cap_w;  // block-uniform
  // Phase-1 region: the whole box when tiled, else only the owned codes (none without codes: the
  // fallback's phase 2 recomputes every max it reads from x).
  const int r0 = tiled ? static_cast<int>(R0 < R1 ? R0 : 0) : own_r0;
  const int nr = tiled ? rh : (with_codes ? own_r1 - own_r0 : 0);
  const int c0 = tiled ? static_cast<int>(C0 < C1 ? C0 : 0) : own_c0;
  const int nc = tiled ? cw_ : (with_codes ? own_c1 - own_c0 : 0);
  const bool lane_fast = a.lane_fast != 0;
  // smem tile strides: [row][col][lane] (lane-fast) or [lane][row][col].
  const int ls = lane_fast ? 1 : a.cap_h * a.cap_w;
  const int rs = lane_fast ? a.cap_w * a.P : a.cap_w;
  const int cs = lane_fast ? a.P : 1;

  const T* __restrict__ x = static_cast<const T*>(a.x);

  // ---- phase 1: m (and the owned codes) of the region, each element once
  if (nr > 0 && nc > 0) {
    int seglen, nseg;
    split_rows(nr, nP * nc, seglen, nseg);
    const int items = nP * nc * nseg;
    for (int e = tid; e < items; e += nthr) {
      int lane, mc, sg;
      decompose_item(e, lane_fast, nP, nc, nseg, lane, mc, sg);
      const int c = c0 + mc;
      const int rb = r0 + sg * seglen;
      const int re = min(rb + seglen, r0 + nr);
      const T* xl = x + xbase[lane];
      int64_t xcoff[KMAX];
      bool xcok[KMAX];
#pragma unroll
      for (int b = 0; b < KMAX; ++b) {
        const int xc = c + b - a.pmax;
        xcok[b] = xc >= 0 && xc < a.W;
        xcoff[b] = xcok[b] ? static_cast<int64_t>(xc) * a.xs3 : 0;
      }
      // Sliding window down the column: slot s holds the row max of x row (r - pmax + s).
      T hv[KMAX];
      int hb[KMAX];
      bool hk[KMAX];
#pragma unroll
      for (int s = 0; s < KMAX; ++s) {
        hv[s] = T();
        hb[s] = 0;
        hk[s] = false;
      }
#pragma unroll
      for (int s = 0; s < KMAX - 1; ++s) {
        hk[s] = row_max<T, KMAX>(xl, rb - a.pmax + s, a.H, a.xs2, xcoff, xcok, hv[s], hb[s]);
      }
      const bool own_c = c >= own_c0 && c < own_c1;
      uint8_t* code_col = with_codes ? a.codes + cbase[lane] + static_cast<int64_t>(c) * a.cs3 : nullptr;
      T* m_col = mt + lane * ls + mc * cs;
      for (int r = rb; r < re; ++r) {
        hk[KMAX - 1] = row_max<T, KMAX>(xl, r - a.pmax + KMAX - 1, a.H, a.xs2, xcoff, xcok, hv[KMAX - 1], hb[KMAX - 1]);
        // Combining the row winners a = 0..KMAX-1 with the same rule equals the a-then-b scan.
        T best = hv[0];
        int code = 0;
        bool found = false;
#pragma unroll
        for (int s = 0; s < KMAX; ++s) {
          if (hk[s] && (!found || takes(hv[s], best))) {
            best = hv[s];
            code = s * KMAX + hb[s];
            found = true;
          }
        }
        if (tiled) m_col[(r - r0) * rs] = best;
        if (code_col && own_c && r >= own_r0 && r < own_r1) {
          code_col[static_cast<int64_t>(r) * a.cs2] = static_cast<uint8_t>(code);
        }
#pragma unroll
        for (int s = 0; s < KMAX - 1; ++s) {
          hv[s] = hv[s + 1];
          hb[s] = hb[s + 1];
          hk[s] = hk[s + 1];
        }
      }
    }
  }
  __syncthreads();

  // ---- phase 2: the blur of m over the tile's outputs
  T* __restrict__ out = static_cast<T*>(a.out);
  if (nI > 0 && nJ > 0) {
    int seglen, nseg;
    split_rows(nI, nP * nJ, seglen, nseg);
    const int items = nP * nJ * nseg;
    for (int e = tid; e < items; e += nthr) {
      int lane, oj, sg;
      decompose_item(e, lane_fast, nP, nJ, nseg, lane, oj, sg);
      const int ib = sg * seglen;
      const int ie = min(ib + seglen, nI);
      SmemColumnTaps<MAXKW> col;
      // tiled: smem offsets of the columns; fallback: the raw m column indices.
      col.load(cti, ctw, a.KW, oj, tiled ? c0 : 0, tiled ? cs : 1);
      const T* m_lane = mt + lane * ls;
      const T* xl = x + xbase[lane];
      const int64_t ob = obase[lane] + static_cast<int64_t>(j0 + oj) * a.os3;
      for (int oi = ib; oi < ie; ++oi) {
        A acc = A(0);
        for (int u = 0; u < a.KH; ++u) {
          const float wr = rtw[oi * a.KH + u];
          if (wr == 0.f) continue;
          const int ri = rti[oi * a.KH + u];
          A s = A(0);
          if (tiled) {
            const T* m_row = m_lane + (ri - r0) * rs;
#pragma unroll
            for (int v = 0; v < col.count(); ++v) {
              const float wv = col.weight(v);
              if (wv != 0.f) s += A(wv) * to_acc(m_row[col.offset(v)]);
            }
          } else {
            for (int v = 0; v < col.count(); ++v) {
              const float wv = col.weight(v);
              if (wv != 0.f) {
                const int ci = static_cast<int>(col.offset(v));
                s += A(wv) * to_acc(window_max<T, KMAX>(xl, ri, ci, a.pmax, a.H, a.W, a.xs2, a.xs3));
              }
            }
          }
          acc += A(wr) * s;
        }
        out[ob + static_cast<int64_t>(i0 + oi) * a.os2] = from_acc<T>(acc);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 3. max_blur_backward

struct MaxBwdArgs {
  const void* grad;
  const uint8_t* codes;
  void* gi;
  int64_t gs0, gs1, gs2, gs3;
  int64_t cs0, cs1, cs2, cs3;
  int64_t is0, is1, is2, is3;
  int64_t C, NC;
  int H, W, Hm, Wm;
  int pmax;
  const int32_t* ridx;
  const float* rw;
  int KH;
  const int32_t* cidx;
  const float* cw;
  int KW;
  int P, th, tw, cap_h, cap_w, tiles_h, tiles_w;
  int lane_fast;
};

constexpr uint8_t kNoRoute = 0xFF;  // smem code of a region element that routes outside the tile

template <typename T, int KMAX, int MAXKW>
__global__ void __launch_bounds__(kThreads) max_blur_bwd_kernel(const MaxBwdArgs a) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const TileSmem L = tile_smem(a.P, static_cast<int64_t>(a.P) * a.cap_h * a.cap_w, sizeof(A), 1,
                               static_cast<int64_t>(a.cap_h) * a.KH, static_cast<int64_t>(a.cap_w) * a.KW);
  int64_t* gbase = reinterpret_cast<int64_t*>(smem + L.bases);
  int64_t* cbase = gbase + a.P;
  int64_t* ibase = cbase + a.P;
  A* gmt = reinterpret_cast<A*>(smem + L.tile);
  uint8_t* ct = reinterpret_cast<uint8_t*>(smem + L.codes);
  int* rti = reinterpret_cast<int*>(smem + L.rt_idx);
  float* rtw = reinterpret_cast<float*>(smem + L.rt_w);
  int* cti = reinterpret_cast<int*>(smem + L.ct_idx);
  float* ctw = reinterpret_cast<float*>(smem + L.ct_w);

  const int tid = threadIdx.x;
  const int nthr = blockDim.x;
  int blk = blockIdx.x;
  const int tj = blk % a.tiles_w;
  blk /= a.tiles_w;
  const int ti = blk % a.tiles_h;
  blk /= a.tiles_h;
  const int64_t p0 = static_cast<int64_t>(blk) * a.P;
  const int nP = static_cast<int>(a.NC - p0 < a.P ? a.NC - p0 : a.P);
  const int i0 = ti * a.th;  // grad_input rows [i0, i0 + nI)
  const int nI = min(a.th, a.H - i0);
  const int j0 = tj * a.tw;
  const int nJ = min(a.tw, a.W - j0);
  // Max-map positions that can route into the tile: r = p - a + pmax, a in [0, KMAX).
  const int R0 = max(0, i0 + a.pmax - (KMAX - 1));
  const int R1 = min(a.Hm, i0 + nI + a.pmax);
  const int C0 = max(0, j0 + a.pmax - (KMAX - 1));
  const int C1 = min(a.Wm, j0 + nJ + a.pmax);
  const int nr = max(0, R1 - R0);
  const int nc = max(0, C1 - C0);
  const bool lane_fast = a.lane_fast != 0;
  const int ls = lane_fast ? 1 : a.cap_h * a.cap_w;
  const int rs = lane_fast ? a.cap_w * a.P : a.cap_w;
  const int cs = lane_fast ? a.P : 1;

  // ---- phase 0: lane bases and the region's table rows
  if (tid < nP) {
    const int64_t p = p0 + tid;
    const int64_t n = p / a.C;
    const int64_t c = p - n * a.C;
    gbase[tid] = n * a.gs0 + c * a.gs1;
    cbase[tid] = n * a.cs0 + c * a.cs1;
    ibase[tid] = n * a.is0 + c * a.is1;
  }
  {
    const int64_t src = static_cast<int64_t>(R0) * a.KH;
    for (int e = tid; e < nr * a.KH; e += nthr) {
      rti[e] = __ldg(a.ridx + src + e);
      rtw[e] = __ldg(a.rw + src + e);
    }
    const int64_t csrc = static_cast<int64_t>(C0) * a.KW;
    for (int e = tid; e < nc * a.KW; e += nthr) {
      cti[e] = __ldg(a.cidx + csrc + e);
      ctw[e] = __ldg(a.cw + csrc + e);
    }
  }
  __syncthreads();

  // ---- phase 1: codes of the region, and gm where the code routes into the tile
  const T* __restrict__ grad = static_cast<const T*>(a.grad);
  if (nr > 0 && nc > 0) {
    int seglen, nseg;
    split_rows(nr, nP * nc, seglen, nseg);
    const int items = nP * nc * nseg;
    for (int e = tid; e < items; e += nthr) {
      int lane, mc, sg;
      decompose_item(e, lane_fast, nP, nc, nseg, lane, mc, sg);
      const int c = C0 + mc;
      const int rb = sg * seglen;  // relative to R0
      const int re = min(rb + seglen, nr);
      SmemColumnTaps<MAXKW> col;
      col.load(cti, ctw, a.KW, mc, 0, a.gs3);  // offsets = grad column index * gs3
      const T* g_lane = grad + gbase[lane];
      const uint8_t* code_col = a.codes + cbase[lane] + static_cast<int64_t>(c) * a.cs3;
      const int sidx_col = lane * ls + mc * cs;
      for (int rr = rb; rr < re; ++rr) {
        const int r = R0 + rr;
        uint8_t code = code_col[static_cast<int64_t>(r) * a.cs2];
        bool routes = code < KMAX * KMAX;
        if (routes) {
          const int p = r + code / KMAX - a.pmax;
          const int q = c + code % KMAX - a.pmax;
          routes = p >= i0 && p < i0 + nI && q >= j0 && q < j0 + nJ;
        }
        const int sidx = sidx_col + rr * rs;
        if (routes) {
          A acc = A(0);
          for (int u = 0; u < a.KH; ++u) {
            const float wr = rtw[rr * a.KH + u];
            if (wr == 0.f) continue;
            const T* g_row = g_lane + static_cast<int64_t>(rti[rr * a.KH + u]) * a.gs2;
            A s = A(0);
#pragma unroll
            for (int v = 0; v < col.count(); ++v) {
              const float wv = col.weight(v);
              if (wv != 0.f) s += A(wv) * to_acc(ldg(g_row + col.offset(v)));
            }
            acc += A(wr) * s;
          }
          gmt[sidx] = acc;
        } else {
          code = kNoRoute;
        }
        ct[sidx] = code;
      }
    }
  }
  __syncthreads();

  // ---- phase 2: grad_input[p,q] = sum over (a,b), in order, of gm[p-a+pmax, q-b+pmax] picked by its code
  T* __restrict__ gi = static_cast<T*>(a.gi);
  if (nI > 0 && nJ > 0) {
    int seglen, nseg;
    split_rows(nI, nP * nJ, seglen, nseg);
    const int items = nP * nJ * nseg;
    for (int e = tid; e < items; e += nthr) {
      int lane, oq, sg;
      decompose_item(e, lane_fast, nP, nJ, nseg, lane, oq, sg);
      const int q = j0 + oq;
      const int pb = i0 + sg * seglen;
      const int pe = min(pb + seglen, i0 + nI);
      const int64_t ob = ibase[lane] + static_cast<int64_t>(q) * a.is3;
      const int s_lane = lane * ls;
      for (int p = pb; p < pe; ++p) {
        A acc = A(0);
#pragma unroll
        for (int aa = 0; aa < KMAX; ++aa) {
          const int r = p - aa + a.pmax;
          if (r < R0 || r >= R1) continue;
#pragma unroll
          for (int b = 0; b < KMAX; ++b) {
            const int c = q - b + a.pmax;
            if (c < C0 || c >= C1) continue;
            const int sidx = s_lane + (r - R0) * rs + (c - C0) * cs;
            if (ct[sidx] == aa * KMAX + b) acc += gmt[sidx];
          }
        }
        gi[ob + static_cast<int64_t>(p) * a.is2] = from_acc<T>(acc);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// host side

template <typename T, int MAXKW>
const char* launch_gather(const Tensor4& x, const Table& rows, const Table& cols, const Tensor4& out,
                          cudaStream_t stream) {
  GatherArgs a;
  a.x = x.data;
  a.out = out.data;
  a.xs0 = x.stride[0];
  a.xs1 = x.stride[1];
  a.xs2 = x.stride[2];
  a.xs3 = x.stride[3];
  a.os0 = out.stride[0];
  a.os1 = out.stride[1];
  a.os2 = out.stride[2];
  a.os3 = out.stride[3];
  const int64_t N = out.size[0], C = out.size[1], Ho = out.size[2], Wo = out.size[3];
  a.C = C;
  a.Ho = static_cast<int>(Ho);
  a.Wo = static_cast<int>(Wo);
  a.ridx = rows.idx;
  a.rw = rows.w;
  a.KH = static_cast<int>(rows.k);
  a.cidx = cols.idx;
  a.cw = cols.w;
  a.KW = static_cast<int>(cols.k);
  constexpr int64_t kU32 = int64_t(1) << 32;

  if (channels_inner(x, out)) {
    int bx = 1;
    while (bx < 32 && bx < C) bx *= 2;
    const int by = kThreads / bx;
    const int64_t row_groups = ceil_div<int64_t>(Ho, kGatherOpt);
    const int64_t items = N * row_groups * Wo;
    const int64_t cchunks = ceil_div<int64_t>(C, bx);
    const int64_t blocks = cchunks * ceil_div<int64_t>(items, by);
    if (blocks > INT_MAX) return "blur_gather: tensor too large for the grid";
    const dim3 block(bx, by);
    if (items + kThreads < kU32 && blocks < kU32) {
      blur_gather_cl_kernel<T, MAXKW, uint32_t><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
          a, static_cast<uint32_t>(items), static_cast<int>(row_groups), static_cast<uint32_t>(cchunks));
    } else {
      blur_gather_cl_kernel<T, MAXKW, uint64_t><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
          a, static_cast<uint64_t>(items), static_cast<int>(row_groups), static_cast<uint64_t>(cchunks));
    }
  } else {
    const int64_t row_groups = ceil_div<int64_t>(Ho, kGatherOpt);
    const int64_t total = N * C * row_groups * Wo;
    const int64_t blocks = ceil_div<int64_t>(total, kThreads);
    if (blocks > INT_MAX) return "blur_gather: tensor too large for the grid";
    if (total + kThreads < kU32) {
      blur_gather_planar_kernel<T, MAXKW, uint32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          a, static_cast<uint32_t>(total), static_cast<int>(row_groups));
    } else {
      blur_gather_planar_kernel<T, MAXKW, uint64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          a, static_cast<uint64_t>(total), static_cast<int>(row_groups));
    }
  }
  return last_error();
}

template <typename T>
const char* gather_by_k(const Tensor4& x, const Table& rows, const Table& cols, const Tensor4& out,
                        cudaStream_t stream) {
  if (cols.k <= 4) return launch_gather<T, 4>(x, rows, cols, out, stream);
  if (cols.k <= 8) return launch_gather<T, 8>(x, rows, cols, out, stream);
  return launch_gather<T, 0>(x, rows, cols, out, stream);
}

struct TileChoice {
  int P, th, tw;
};

// Tile of the (Ho, Wo) grid handled by one block, and its lane count, shrunk until smem fits.
// Lane-fast: 32 lanes (channels) x up to 8x8 positions. Planar: up to 32 columns, ~512 positions
// (several planes per block when the map is small).
template <typename SmemFn>
TileChoice choose_tile(bool lane_fast, int64_t NC, int64_t Ho, int64_t Wo, SmemFn smem_bytes) {
  TileChoice t;
  if (lane_fast) {
    t.P = static_cast<int>(NC < kMaxLanes ? NC : kMaxLanes);
    t.th = static_cast<int>(Ho < 8 ? Ho : 8);
    t.tw = static_cast<int>(Wo < 8 ? Wo : 8);
  } else {
    t.tw = static_cast<int>(ceil_div<int64_t>(Wo, ceil_div<int64_t>(Wo, 32)));
    const int64_t thmax = 512 / t.tw > 1 ? 512 / t.tw : 1;
    t.th = static_cast<int>(ceil_div<int64_t>(Ho, ceil_div<int64_t>(Ho, thmax)));
    int64_t P = 512 / (static_cast<int64_t>(t.th) * t.tw);
    P = P < 1 ? 1 : (P > kMaxLanes ? kMaxLanes : P);
    t.P = static_cast<int>(P < NC ? P : NC);
  }
  t.th = static_cast<int>(ceil_div<int64_t>(Ho, ceil_div<int64_t>(Ho, t.th)));  // balance the tiles
  t.tw = static_cast<int>(ceil_div<int64_t>(Wo, ceil_div<int64_t>(Wo, t.tw)));
  while (smem_bytes(t) > kSmemLimit) {
    if (!lane_fast && t.P > 1) {
      t.P = (t.P + 1) / 2;
    } else if (t.th >= t.tw && t.th > 1) {
      t.th = (t.th + 1) / 2;
    } else if (t.tw > 1) {
      t.tw = (t.tw + 1) / 2;
    } else if (t.P > 1) {
      t.P = (t.P + 1) / 2;
    } else {
      break;
    }
  }
  return t;
}

template <typename T, int KMAX, int MAXKW>
const char* launch_max_fwd(const Tensor4& x, int pmax, int sh, int sw, const Table& rows, const Table& cols,
                           const Tensor4& out, const Tensor4& codes, cudaStream_t stream) {
  MaxFwdArgs a;
  a.x = x.data;
  a.out = out.data;
  a.codes = static_cast<uint8_t*>(codes.data);
  a.xs0 = x.stride[0];
  a.xs1 = x.stride[1];
  a.xs2 = x.stride[2];
  a.xs3 = x.stride[3];
  a.os0 = out.stride[0];
  a.os1 = out.stride[1];
  a.os2 = out.stride[2];
  a.os3 = out.stride[3];
  a.cs0 = codes.stride[0];
  a.cs1 = codes.stride[1];
  a.cs2 = codes.stride[2];
  a.cs3 = codes.stride[3];
  a.C = x.size[1];
  a.NC = x.size[0] * x.size[1];
  a.H = static_cast<int>(x.size[2]);
  a.W = static_cast<int>(x.size[3]);
  a.Hm = static_cast<int>(codes.size[2]);
  a.Wm = static_cast<int>(codes.size[3]);
  a.Ho = static_cast<int>(out.size[2]);
  a.Wo = static_cast<int>(out.size[3]);
  a.pmax = pmax;
  a.sh = sh;
  a.sw = sw;
  a.ridx = rows.idx;
  a.rw = rows.w;
  a.KH = static_cast<int>(rows.k);
  a.cidx = cols.idx;
  a.cw = cols.w;
  a.KW = static_cast<int>(cols.k);
  a.lane_fast = channels_inner(x, out) ? 1 : 0;

  // m-tile capacity for a th x tw output tile: s*(th-1) + k rows are needed by blur-pool tables,
  // plus room for the owned codes of the last tile; larger boxes take the fallback path.
  auto caps = [&](const TileChoice& t, int64_t& ch, int64_t& cw) {
    ch = static_cast<int64_t>(sh) * t.th + a.KH + 2;
    cw = static_cast<int64_t>(sw) * t.tw + a.KW + 2;
    ch = ch < a.Hm ? ch : a.Hm;
    cw = cw < a.Wm ? cw : a.Wm;
  };
  auto smem_of = [&](const TileChoice& t, int64_t ch, int64_t cw) {
    return tile_smem(t.P, t.P * ch * cw, sizeof(T), 0, static_cast<int64_t>(t.th) * a.KH,
                     static_cast<int64_t>(t.tw) * a.KW)
        .total;
  };
  const TileChoice t = choose_tile(a.lane_fast != 0, a.NC, a.Ho, a.Wo, [&](const TileChoice& c) {
    int64_t ch, cw;
    caps(c, ch, cw);
    return smem_of(c, ch, cw);
  });
  int64_t ch, cw;
  caps(t, ch, cw);
  if (smem_of(t, ch, cw) > kSmemLimit) ch = cw = 0;  // no m tile: every block takes the fallback path
  const int64_t smem = smem_of(t, ch, cw);
  if (smem > kSmemLimit) return "max_blur_forward: gather tables too wide for shared memory";
  a.P = t.P;
  a.th = t.th;
  a.tw = t.tw;
  a.cap_h = static_cast<int>(ch);
  a.cap_w = static_cast<int>(cw);
  a.tiles_h = static_cast<int>(ceil_div<int64_t>(a.Ho, t.th));
  a.tiles_w = static_cast<int>(ceil_div<int64_t>(a.Wo, t.tw));
  const int64_t blocks = ceil_div<int64_t>(a.NC, t.P) * a.tiles_h * a.tiles_w;
  if (blocks > INT_MAX) return "max_blur_forward: tensor too large for the grid";
  max_blur_fwd_kernel<T, KMAX, MAXKW>
      <<<static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(smem), stream>>>(a);
  return last_error();
}

template <typename T, int KMAX>
const char* max_fwd_by_k(const Tensor4& x, int pmax, int sh, int sw, const Table& rows, const Table& cols,
                         const Tensor4& out, const Tensor4& codes, cudaStream_t stream) {
  if (cols.k <= 4) return launch_max_fwd<T, KMAX, 4>(x, pmax, sh, sw, rows, cols, out, codes, stream);
  if (cols.k <= 8) return launch_max_fwd<T, KMAX, 8>(x, pmax, sh, sw, rows, cols, out, codes, stream);
  return launch_max_fwd<T, KMAX, 0>(x, pmax, sh, sw, rows, cols, out, codes, stream);
}

template <typename T>
const char* max_fwd_by_kmax(const Tensor4& x, int kmax, int pmax, int sh, int sw, const Table& rows,
                            const Table& cols, const Tensor4& out, const Tensor4& codes, cudaStream_t stream) {
  switch (kmax) {
    case 1:
      return max_fwd_by_k<T, 1>(x, pmax, sh, sw, rows, cols, out, codes, stream);
    case 2:
      return max_fwd_by_k<T, 2>(x, pmax, sh, sw, rows, cols, out, codes, stream);
    case 3:
      return max_fwd_by_k<T, 3>(x, pmax, sh, sw, rows, cols, out, codes, stream);
    default:
      return "max_blur_forward: kmax must be 1, 2 or 3";
  }
}

template <typename T, int KMAX, int MAXKW>
const char* launch_max_bwd(const Tensor4& grad, const Tensor4& codes, int pmax, const Table& rows,
                           const Table& cols, const Tensor4& gi, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  MaxBwdArgs a;
  a.grad = grad.data;
  a.codes = static_cast<const uint8_t*>(codes.data);
  a.gi = gi.data;
  a.gs0 = grad.stride[0];
  a.gs1 = grad.stride[1];
  a.gs2 = grad.stride[2];
  a.gs3 = grad.stride[3];
  a.cs0 = codes.stride[0];
  a.cs1 = codes.stride[1];
  a.cs2 = codes.stride[2];
  a.cs3 = codes.stride[3];
  a.is0 = gi.stride[0];
  a.is1 = gi.stride[1];
  a.is2 = gi.stride[2];
  a.is3 = gi.stride[3];
  a.C = gi.size[1];
  a.NC = gi.size[0] * gi.size[1];
  a.H = static_cast<int>(gi.size[2]);
  a.W = static_cast<int>(gi.size[3]);
  a.Hm = static_cast<int>(codes.size[2]);
  a.Wm = static_cast<int>(codes.size[3]);
  a.pmax = pmax;
  a.ridx = rows.idx;
  a.rw = rows.w;
  a.KH = static_cast<int>(rows.k);
  a.cidx = cols.idx;
  a.cw = cols.w;
  a.KW = static_cast<int>(cols.k);
  a.lane_fast = channels_inner(gi, codes) ? 1 : 0;

  auto smem_of = [&](const TileChoice& t) {
    const int64_t ch = t.th + KMAX - 1, cw = t.tw + KMAX - 1;
    return tile_smem(t.P, t.P * ch * cw, sizeof(A), 1, ch * a.KH, cw * a.KW).total;
  };
  const TileChoice t = choose_tile(a.lane_fast != 0, a.NC, a.H, a.W, smem_of);
  const int64_t smem = smem_of(t);
  if (smem > kSmemLimit) return "max_blur_backward: gather tables too wide for shared memory";
  a.P = t.P;
  a.th = t.th;
  a.tw = t.tw;
  a.cap_h = t.th + KMAX - 1;
  a.cap_w = t.tw + KMAX - 1;
  a.tiles_h = static_cast<int>(ceil_div<int64_t>(a.H, t.th));
  a.tiles_w = static_cast<int>(ceil_div<int64_t>(a.W, t.tw));
  const int64_t blocks = ceil_div<int64_t>(a.NC, t.P) * a.tiles_h * a.tiles_w;
  if (blocks > INT_MAX) return "max_blur_backward: tensor too large for the grid";
  max_blur_bwd_kernel<T, KMAX, MAXKW>
      <<<static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(smem), stream>>>(a);
  return last_error();
}

template <typename T, int KMAX>
const char* max_bwd_by_k(const Tensor4& grad, const Tensor4& codes, int pmax, const Table& rows, const Table& cols,
                         const Tensor4& gi, cudaStream_t stream) {
  if (cols.k <= 4) return launch_max_bwd<T, KMAX, 4>(grad, codes, pmax, rows, cols, gi, stream);
  if (cols.k <= 8) return launch_max_bwd<T, KMAX, 8>(grad, codes, pmax, rows, cols, gi, stream);
  return launch_max_bwd<T, KMAX, 0>(grad, codes, pmax, rows, cols, gi, stream);
}

template <typename T>
const char* max_bwd_by_kmax(const Tensor4& grad, const Tensor4& codes, int kmax, int pmax, const Table& rows,
                            const Table& cols, const Tensor4& gi, cudaStream_t stream) {
  switch (kmax) {
    case 1:
      return max_bwd_by_k<T, 1>(grad, codes, pmax, rows, cols, gi, stream);
    case 2:
      return max_bwd_by_k<T, 2>(grad, codes, pmax, rows, cols, gi, stream);
    case 3:
      return max_bwd_by_k<T, 3>(grad, codes, pmax, rows, cols, gi, stream);
    default:
      return "max_blur_backward: kmax must be 1, 2 or 3";
  }
}

bool any_zero(const Tensor4& t) {
  for (int d = 0; d < 4; ++d) {
    if (t.size[d] == 0) return true;
  }
  return false;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// public launchers

const char* blur_gather(DType dtype, const Tensor4& x, const Table& rows, const Table& cols, const Tensor4& out,
                        cudaStream_t stream) {
  if (any_zero(out)) return nullptr;
  if (rows.k < 1 || cols.k < 1) return "blur_gather: tables need at least one tap";
  switch (dtype) {
    case DType::kFloat32:
      return gather_by_k<float>(x, rows, cols, out, stream);
    case DType::kFloat16:
      return gather_by_k<__half>(x, rows, cols, out, stream);
    case DType::kBFloat16:
      return gather_by_k<__nv_bfloat16>(x, rows, cols, out, stream);
    case DType::kFloat64:
      return gather_by_k<double>(x, rows, cols, out, stream);
  }
  return "blur_gather: unsupported dtype";
}

const char* max_blur_forward(DType dtype, const Tensor4& x, int kmax, int pmax, int stride_h, int stride_w,
                             const Table& rows, const Table& cols, const Tensor4& out, const Tensor4& codes,
                             cudaStream_t stream) {
  if (any_zero(out)) return nullptr;
  if (rows.k < 1 || cols.k < 1) return "max_blur_forward: tables need at least one tap";
  if (stride_h < 1 || stride_w < 1) return "max_blur_forward: strides must be >= 1";
  switch (dtype) {
    case DType::kFloat32:
      return max_fwd_by_kmax<float>(x, kmax, pmax, stride_h, stride_w, rows, cols, out, codes, stream);
    case DType::kFloat16:
      return max_fwd_by_kmax<__half>(x, kmax, pmax, stride_h, stride_w, rows, cols, out, codes, stream);
    case DType::kBFloat16:
      return max_fwd_by_kmax<__nv_bfloat16>(x, kmax, pmax, stride_h, stride_w, rows, cols, out, codes, stream);
    case DType::kFloat64:
      return max_fwd_by_kmax<double>(x, kmax, pmax, stride_h, stride_w, rows, cols, out, codes, stream);
  }
  return "max_blur_forward: unsupported dtype";
}

const char* max_blur_backward(DType dtype, const Tensor4& grad, const Tensor4& codes, int kmax, int pmax,
                              const Table& rows, const Table& cols, const Tensor4& grad_input,
                              cudaStream_t stream) {
  if (any_zero(grad_input)) return nullptr;
  if (rows.k < 1 || cols.k < 1) return "max_blur_backward: tables need at least one tap";
  switch (dtype) {
    case DType::kFloat32:
      return max_bwd_by_kmax<float>(grad, codes, kmax, pmax, rows, cols, grad_input, stream);
    case DType::kFloat16:
      return max_bwd_by_kmax<__half>(grad, codes, kmax, pmax, rows, cols, grad_input, stream);
    case DType::kBFloat16:
      return max_bwd_by_kmax<__nv_bfloat16>(grad, codes, kmax, pmax, rows, cols, grad_input, stream);
    case DType::kFloat64:
      return max_bwd_by_kmax<double>(grad, codes, kmax, pmax, rows, cols, grad_input, stream);
  }
  return "max_blur_backward: unsupported dtype";
}

}  // namespace ktk_blurpool_cuda
