// CPU kernels of the DCT family (OpenMP through at::parallel_for).
//
// dct_basis2d_: out[n,c] = left @ x[n,c] @ right^T for every plane, a separable 2-D transform with
// dense basis matrices (the DCT and its adjoint, possibly truncated or zero-padded). Each task loads
// its input into a thread-local buffer (converted to the accumulation type, read through any
// strides), runs the two products as small row-major GEMMs, and stores the result through the
// output's strides. The cheaper of the two product orders is picked from the sizes:
//     W first: T = X @ R^T (H x Wo), then O = L @ T      cost H*Wo*(W + Ho)
//     H first: U = L @ X   (Ho x W), then O = U @ R^T    cost Ho*W*(H + Wo)
// Two layouts of the work, picked from the strides:
//   * planar   (any strides): one task per plane (n, c); X is H x W.
//   * channels (channel stride smallest, e.g. channels_last; C >= 8): one task per (n, block of cb
//     channels); X is H x (W x cb) with the channels innermost, so the loads, the stores and the
//     inner loops of both products run along contiguous channels, and the products along H are a
//     single GEMM over rows of W*cb (or Wo*cb) values.
// The GEMM is a register-tiled outer-product kernel (6 rows x 16 floats of accumulators, GCC vector
// extensions); the buffers' rows are padded to whole vectors, so it has no column tails.
//
// channel_power_mean_: out[n,h,w] = mean_c |x[n,c,h,w]|^p, in one pass: planar inputs accumulate
// rows of positions across c (vectorised over positions), channels-inner inputs reduce along the
// contiguous C axis with 16 partial sums (vectorised; fixed order, deterministic).
// channel_power_mean_backward_: grad_x = (p/C) |x|^(p-1) sign(x) grad_map, elementwise.
// p = 1 and 2 are special-cased; other (half-)integer exponents up to 15.5 use square-and-multiply
// (and one sqrt), any other p std::pow.
//
// As in the blur-pool kernels, the work functions also have AVX2+FMA clones chosen at run time
// (ATEN_CPU_CAPABILITY=default forces the baseline).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/cpu_convert.h"
#include "../common/cpu_isa.h"
#include "dct_checks.h"

namespace ktkernels {
namespace dct_cpu {
namespace {

using ktk_cpu::from_acc;
using ktk_cpu::to_acc;

using at::Tensor;

// Size budget (bytes) of the per-task buffers of the channels layout.
constexpr int64_t kChannelsBufferBytes = 256 * 1024;
// Smallest channel count that takes the channels layout (shorter inner loops lose to planar).
constexpr int64_t kMinChannelsLayout = 8;
// Positions per task of the planar power mean.
constexpr int64_t kPowerSegment = 1024;
// Smallest channel count for which the power mean and its backward run along C (channels-inner
// tensors); fewer channels take the planar loops, with strided positions.
constexpr int64_t kMinChannelsReduce = 16;

// Instruction-set variants (csrc/common/cpu_isa.h): every dtype is cloned for the GEMM-bound
// dct_basis2d_ (the products run in float whatever the storage), float and double for the memory-bound
// power means (the half-type conversions dominate there).

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1));
}

// +1 when dimension 1 (C) has the smallest stride, -1 when a spatial one does, 0 on a tie.
// Size-1 dimensions do not count.
int layout_vote(const Tensor& t) {
  auto eff = [&](int64_t d) { return t.size(d) == 1 ? INT64_MAX : std::abs(t.stride(d)); };
  const int64_t s1 = eff(1);
  const int64_t sp = std::min(eff(2), eff(3));
  return s1 < sp ? 1 : (sp < s1 ? -1 : 0);
}

bool channels_inner(const Tensor& first, const Tensor& second) {
  const int v = layout_vote(first);
  return (v != 0 ? v : layout_vote(second)) > 0;
}

// ------------------------------------------------------------------------------------------------
// Small row-major GEMM: c[i*ldc + j] = sum_k a[i*lda + k] * b[k*ldb + j], i < M, j < N (overwrites c)
// ------------------------------------------------------------------------------------------------

// Vector width in elements of the widest clone (AVX2: 8 floats, 4 doubles). Every buffer that is a B
// or C operand has its rows padded to a multiple of it, so the GEMMs never have a column tail.
template <typename acc_t>
constexpr int64_t kVec = 32 / static_cast<int64_t>(sizeof(acc_t));

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A 32-byte vector of acc_t (GCC/Clang vector extension) that may alias acc_t and needs only element
// alignment, so it loads and stores straight from the buffers. The AVX2 clones map it to one ymm
// register, the baseline build to two xmm registers.
template <typename acc_t>
struct Vec32;
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32), aligned(4), may_alias));
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32), aligned(8), may_alias));
};

// One MR x (NV vectors) tile of c; its accumulators stay in registers over the whole K loop, each
// B vector is loaded once per k and reused for the MR rows (an outer-product update).
template <int MR, int NV, typename acc_t>
inline void gemm_tile(int64_t K, const acc_t* __restrict a, int64_t lda, const acc_t* __restrict b, int64_t ldb,
                      acc_t* __restrict c, int64_t ldc) {
  using V = typename Vec32<acc_t>::type;
  constexpr int64_t L = kVec<acc_t>;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* bk = b + k * ldb;
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const V*>(bk + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const acc_t av = a[r * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(c + r * ldc + v * L) = acc[r][v];
  }
}

// Rows [0, M) of one column panel (NV vectors wide): 6-row tiles, then 4, 2, 1 for the rest.
template <int NV, typename acc_t>
inline void gemm_panel(int64_t M, int64_t K, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t* c,
                       int64_t ldc) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) gemm_tile<6, NV>(K, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
  if (i + 4 <= M) {
    gemm_tile<4, NV>(K, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
    i += 4;
  }
  if (i + 2 <= M) {
    gemm_tile<2, NV>(K, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
    i += 2;
  }
  if (i < M) gemm_tile<1, NV>(K, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
}

// N must be a multiple of kVec<acc_t> (the padded row length). Column panels outermost, so that a
// panel of b (K x 16 floats) stays in L1 while every row tile of a streams past it.
template <typename acc_t>
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                    acc_t* c, int64_t ldc) {
  constexpr int64_t L = kVec<acc_t>;
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L) gemm_panel<2>(M, K, a, lda, b + j, ldb, c + j, ldc);
  if (j < N) gemm_panel<1>(M, K, a, lda, b + j, ldb, c + j, ldc);
}

// ------------------------------------------------------------------------------------------------
// dct_basis2d_
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct BasisArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  const acc_t* L;   // (Ho, H)
  const acc_t* R;   // (Wo, W)
  const acc_t* RT;  // (W, Wop): R transposed, columns zero-padded to Wop
  int64_t C, H, W, Ho, Wo;
  int64_t sN, sC, sH, sW;
  int64_t oN, oC, oH, oW;
  bool w_first;
  int64_t cb_max, nblk;  // channels layout: channel block and blocks per image
};

// Tasks: planes p = n*C + c. Buffers hold rows padded to Wp / Wop; padded columns only ever feed
// padded columns (every GEMM column depends on its own B column), which are never stored.
template <typename scalar_t>
void basis_planar_chunk(const BasisArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, W = a.W, Ho = a.Ho, Wo = a.Wo;
  const int64_t Wp = round_up(W, kVec<acc_t>), Wop = round_up(Wo, kVec<acc_t>);
  std::vector<acc_t> xb(static_cast<size_t>(H * Wp), acc_t(0));
  std::vector<acc_t> mid(static_cast<size_t>(a.w_first ? H * Wop : Ho * Wp), acc_t(0));
  std::vector<acc_t> ob(static_cast<size_t>(Ho * Wop), acc_t(0));
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / a.C, c = p % a.C;
    const scalar_t* xp = a.x + n * a.sN + c * a.sC;
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t* xr = xp + h * a.sH;
      acc_t* d = xb.data() + h * Wp;
      if (a.sW == 1) {
        for (int64_t w = 0; w < W; ++w) d[w] = to_acc<acc_t>(xr[w]);
      } else {
        for (int64_t w = 0; w < W; ++w) d[w] = to_acc<acc_t>(xr[w * a.sW]);
      }
    }
    if (a.w_first) {
      gemm_nn(H, Wop, W, xb.data(), Wp, a.RT, Wop, mid.data(), Wop);
      gemm_nn(Ho, Wop, H, a.L, H, mid.data(), Wop, ob.data(), Wop);
    } else {
      gemm_nn(Ho, Wp, H, a.L, H, xb.data(), Wp, mid.data(), Wp);
      gemm_nn(Ho, Wop, W, mid.data(), Wp, a.RT, Wop, ob.data(), Wop);
    }
    scalar_t* op = a.out + n * a.oN + c * a.oC;
    for (int64_t i = 0; i < Ho; ++i) {
      scalar_t* orow = op + i * a.oH;
      const acc_t* s = ob.data() + i * Wop;
      if (a.oW == 1) {
        for (int64_t j = 0; j < Wo; ++j) orow[j] = from_acc<scalar_t>(s[j]);
      } else {
        for (int64_t j = 0; j < Wo; ++j) orow[j * a.oW] = from_acc<scalar_t>(s[j]);
      }
    }
  }
}

// Tasks: (n, channel block). Buffers hold (position, channel) with the channels innermost, padded to
// cbp; channels never mix, so padded channels only feed padded channels.
template <typename scalar_t>
void basis_channels_chunk(const BasisArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, W = a.W, Ho = a.Ho, Wo = a.Wo;
  const int64_t cbp_max = round_up(a.cb_max, kVec<acc_t>);
  std::vector<acc_t> xb(static_cast<size_t>(H * W * cbp_max), acc_t(0));
  std::vector<acc_t> mid(static_cast<size_t>((a.w_first ? H * Wo : Ho * W) * cbp_max), acc_t(0));
  std::vector<acc_t> ob(static_cast<size_t>(Ho * Wo * cbp_max), acc_t(0));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t % a.nblk, n = t / a.nblk;
    const int64_t c0 = b * a.cb_max, cb = std::min(a.cb_max, a.C - c0);
    const int64_t cbp = round_up(cb, kVec<acc_t>);
    const scalar_t* xp = a.x + n * a.sN + c0 * a.sC;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const scalar_t* xv = xp + h * a.sH + w * a.sW;
        acc_t* d = xb.data() + (h * W + w) * cbp;
        if (a.sC == 1) {
          for (int64_t ch = 0; ch < cb; ++ch) d[ch] = to_acc<acc_t>(xv[ch]);
        } else {
          for (int64_t ch = 0; ch < cb; ++ch) d[ch] = to_acc<acc_t>(xv[ch * a.sC]);
        }
      }
    }
    if (a.w_first) {
      for (int64_t h = 0; h < H; ++h) {
        gemm_nn(Wo, cbp, W, a.R, W, xb.data() + h * W * cbp, cbp, mid.data() + h * Wo * cbp, cbp);
      }
      gemm_nn(Ho, Wo * cbp, H, a.L, H, mid.data(), Wo * cbp, ob.data(), Wo * cbp);
    } else {
      gemm_nn(Ho, W * cbp, H, a.L, H, xb.data(), W * cbp, mid.data(), W * cbp);
      for (int64_t i = 0; i < Ho; ++i) {
        gemm_nn(Wo, cbp, W, a.R, W, mid.data() + i * W * cbp, cbp, ob.data() + i * Wo * cbp, cbp);
      }
    }
    scalar_t* op = a.out + n * a.oN + c0 * a.oC;
    for (int64_t i = 0; i < Ho; ++i) {
      for (int64_t j = 0; j < Wo; ++j) {
        scalar_t* ov = op + i * a.oH + j * a.oW;
        const acc_t* s = ob.data() + (i * Wo + j) * cbp;
        if (a.oC == 1) {
          for (int64_t ch = 0; ch < cb; ++ch) ov[ch] = from_acc<scalar_t>(s[ch]);
        } else {
          for (int64_t ch = 0; ch < cb; ++ch) ov[ch * a.oC] = from_acc<scalar_t>(s[ch]);
        }
      }
    }
  }
}

KTK_DEFINE_RUNNER(basis_planar_chunk, BasisArgs)
KTK_DEFINE_RUNNER(basis_channels_chunk, BasisArgs)

// Channel block of the channels layout: as many channels (a multiple of 8) as fit the buffer budget,
// fewer when there would be too few tasks to keep every thread busy; then balanced over the blocks.
int64_t basis_channel_block(int64_t C, int64_t per_channel_bytes, int64_t outer_tasks) {
  const int64_t threads = at::get_num_threads();
  int64_t cb = std::max<int64_t>(kMinChannelsLayout, kChannelsBufferBytes / std::max<int64_t>(per_channel_bytes, 1));
  cb = std::min(C, cb / 8 * 8);
  int64_t nblk = (C + cb - 1) / cb;
  while (outer_tasks * nblk < 4 * threads && (C + nblk) / (nblk + 1) >= 16) ++nblk;
  cb = (C + nblk - 1) / nblk;
  if (cb < C) cb = std::min(C, (cb + 7) / 8 * 8);
  return cb;
}

template <typename scalar_t>
void dct_basis2d_kernel(const Tensor& x, const Tensor& left, const Tensor& right, const Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = out.size(2), Wo = out.size(3);
  if (out.numel() == 0) return;
  if (H == 0 || W == 0) {
    out.zero_();
    return;
  }
  const acc_t* R = right.const_data_ptr<acc_t>();
  const int64_t Wop = round_up(Wo, kVec<acc_t>);
  std::vector<acc_t> rt(static_cast<size_t>(W * Wop), acc_t(0));
  for (int64_t j = 0; j < Wo; ++j) {
    for (int64_t w = 0; w < W; ++w) rt[static_cast<size_t>(w * Wop + j)] = R[j * W + w];
  }
  const int64_t cost_w_first = H * Wo * (W + Ho);
  const int64_t cost_h_first = Ho * W * (H + Wo);
  BasisArgs<scalar_t> a{x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), left.const_data_ptr<acc_t>(),
                        R, rt.data(), C, H, W, Ho, Wo,
                        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                        cost_w_first <= cost_h_first, 1, 1};
  const int64_t work = std::min(cost_w_first, cost_h_first) + H * W + Ho * Wo;
  if (C >= kMinChannelsLayout && channels_inner(x, out)) {
    const int64_t per_c = (H * W + (a.w_first ? H * Wo : Ho * W) + Ho * Wo) * static_cast<int64_t>(sizeof(acc_t));
    a.cb_max = basis_channel_block(C, per_c, N);
    a.nblk = (C + a.cb_max - 1) / a.cb_max;
    at::parallel_for(0, N * a.nblk, grain_for(work * a.cb_max),
                     [&](int64_t begin, int64_t end) { basis_channels_chunk_run<scalar_t>(a, begin, end); });
  } else {
    at::parallel_for(0, N * C, grain_for(work),
                     [&](int64_t begin, int64_t end) { basis_planar_chunk_run<scalar_t>(a, begin, end); });
  }
}

// ------------------------------------------------------------------------------------------------
// channel_power_mean_ and its backward
// ------------------------------------------------------------------------------------------------

// a^e for a >= 0 and e = k + HALF/2 (k < 16) without pow: square-and-multiply with selects on the
// (task-uniform) bits of k, which vectorises, then a sqrt for a half (scalar: errno). a^0 = 1 as pow.
template <bool HALF, typename acc_t>
inline acc_t pow_small(acc_t a, int k) {
  acc_t r = (k & 1) ? a : acc_t(1);
  const acc_t a2 = a * a;
  r = (k & 2) ? r * a2 : r;
  const acc_t a4 = a2 * a2;
  r = (k & 4) ? r * a4 : r;
  const acc_t a8 = a4 * a4;
  r = (k & 8) ? r * a8 : r;
  if constexpr (HALF) {
    return r * std::sqrt(a);
  } else {
    return r;
  }
}

// Whether pow_small covers the exponent e.
inline bool is_small_exponent(double e) { return e >= 0.0 && e <= 15.5 && 2.0 * e == std::floor(2.0 * e); }

// Power modes: 1 -> |v|, 2 -> v*v, 3 and 4 -> pow_small(|v|) (integer, half-integer), 0 -> |v|^p.
template <int MODE, typename acc_t>
inline acc_t power_of(acc_t v, acc_t p, int k) {
  if constexpr (MODE == 1) {
    return std::abs(v);
  } else if constexpr (MODE == 2) {
    return v * v;
  } else if constexpr (MODE == 3 || MODE == 4) {
    return pow_small<MODE == 4>(std::abs(v), k);
  } else {
    return std::pow(std::abs(v), p);
  }
}

// sign(v) as torch.sign: 0 at 0 and at NaN. Branch-free, vectorises.
template <typename acc_t>
inline acc_t sign_of(acc_t v) {
  return static_cast<acc_t>(v > acc_t(0)) - static_cast<acc_t>(v < acc_t(0));
}

// d|v|^p / dv without the factor p: 1 -> sign(v), 2 -> v (the 2 is in the scale),
// 3, 4 and 0 -> |v|^(p-1) sign(v) (p - 1 = k or k + 1/2 in modes 3 and 4).
template <int MODE, typename acc_t>
inline acc_t power_slope(acc_t v, acc_t pm1, int k) {
  if constexpr (MODE == 1) {
    return sign_of(v);
  } else if constexpr (MODE == 2) {
    return v;
  } else if constexpr (MODE == 3 || MODE == 4) {
    // p - 1 > 0 here, so |v|^(p-1) is 0 at 0 and copysign is sign(v) * |v|^(p-1) without branches.
    return std::copysign(pow_small<MODE == 4>(std::abs(v), k), v);
  } else {
    return std::pow(std::abs(v), pm1) * sign_of(v);
  }
}

template <typename scalar_t>
struct PowerArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  acc_t* out;        // forward: (N, H, W) contiguous
  const acc_t* g;    // backward: grad_map (N, H, W) contiguous
  scalar_t* gx;      // backward: grad_x
  int64_t C, H, W;
  int64_t sN, sC, sH, sW;
  int64_t gN, gC, gH, gW;       // grad_x strides
  acc_t p;                      // forward: p; backward: p - 1
  acc_t scale;                  // forward: 1 / C; backward: p / C
  int64_t rows, row_len, segs;  // planar loops: position rows per image, their length, segments per row
  int64_t step, gstep;          // planar loops: x's and grad_x's strides along a row of positions
  int mode;                     // 1: p == 1, 2: p == 2, 3 / 4: small (half-)integer exponent, 0: other p
  int k;                        // modes 3 / 4: the exponent (p, or p - 1 in the backward) is k (+ 1/2)
};

// Forward, planar: tasks (n, position row r, segment). A row is one spatial row (row_len = W), or the
// whole H*W map when H and W merge into one strided axis (row_len = H*W).
template <typename scalar_t, int MODE>
void power_planar_chunk_mode(const PowerArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t seg = t % a.segs;
    const int64_t nr = t / a.segs;
    const int64_t r = nr % a.rows, n = nr / a.rows;
    const int64_t q0 = seg * kPowerSegment, len = std::min(kPowerSegment, a.row_len - q0);
    acc_t* __restrict o = a.out + n * a.H * a.W + r * a.row_len + q0;
    const scalar_t* xp = a.x + n * a.sN + r * a.sH + q0 * a.step;
    std::fill(o, o + len, acc_t(0));
    for (int64_t c = 0; c < a.C; ++c) {
      const scalar_t* __restrict xr = xp + c * a.sC;
      if (a.step == 1) {
        for (int64_t q = 0; q < len; ++q) o[q] += power_of<MODE>(to_acc<acc_t>(xr[q]), a.p, a.k);
      } else {
        for (int64_t q = 0; q < len; ++q) o[q] += power_of<MODE>(to_acc<acc_t>(xr[q * a.step]), a.p, a.k);
      }
    }
    for (int64_t q = 0; q < len; ++q) o[q] *= a.scale;
  }
}

// Forward, channels-inner: tasks (n, h); every position reduces along C.
template <typename scalar_t, int MODE>
void power_channels_chunk_mode(const PowerArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanes = 16;
  constexpr int64_t kChunk = 256;
  const int64_t C = a.C;
  alignas(32) acc_t tmp[kChunk];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t h = t % a.H, n = t / a.H;
    acc_t* o = a.out + (n * a.H + h) * a.W;
    for (int64_t w = 0; w < a.W; ++w) {
      const scalar_t* xv = a.x + n * a.sN + h * a.sH + w * a.sW;
      acc_t part[kLanes];
      for (int k = 0; k < kLanes; ++k) part[k] = acc_t(0);
      // Powers of a chunk of channels into tmp (one simple loop each: both vectorise), then kLanes
      // running partial sums over tmp; zero padding completes the last group of kLanes.
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t len = std::min(kChunk, C - c0);
        const scalar_t* xc = xv + c0 * a.sC;
        if (a.sC == 1) {
          for (int64_t q = 0; q < len; ++q) tmp[q] = power_of<MODE>(to_acc<acc_t>(xc[q]), a.p, a.k);
        } else {
          for (int64_t q = 0; q < len; ++q) tmp[q] = power_of<MODE>(to_acc<acc_t>(xc[q * a.sC]), a.p, a.k);
        }
        const int64_t lenp = (len + kLanes - 1) / kLanes * kLanes;
        for (int64_t q = len; q < lenp; ++q) tmp[q] = acc_t(0);
        for (int64_t q = 0; q < lenp; q += kLanes) {
          for (int k = 0; k < kLanes; ++k) part[k] += tmp[q + k];
        }
      }
      for (int k = kLanes / 2; k >= 1; k /= 2) {
        for (int l = 0; l < k; ++l) part[l] += part[l + k];
      }
      o[w] = part[0] * a.scale;
    }
  }
}

// Backward, planar: tasks (n, c, position row r, segment), the rows as in the planar forward (the
// whole map when both x and grad_x let H and W merge into one strided axis).
template <typename scalar_t, int MODE>
void power_bwd_planar_chunk_mode(const PowerArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = a.scale, pm1 = a.p;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t seg = t % a.segs;
    const int64_t ncr = t / a.segs;
    const int64_t r = ncr % a.rows;
    const int64_t nc = ncr / a.rows;
    const int64_t c = nc % a.C, n = nc / a.C;
    const int64_t q0 = seg * kPowerSegment, len = std::min(kPowerSegment, a.row_len - q0);
    const scalar_t* __restrict xr = a.x + n * a.sN + c * a.sC + r * a.sH + q0 * a.step;
    const acc_t* __restrict gr = a.g + n * a.H * a.W + r * a.row_len + q0;
    scalar_t* __restrict o = a.gx + n * a.gN + c * a.gC + r * a.gH + q0 * a.gstep;
    if (a.step == 1 && a.gstep == 1) {
      for (int64_t q = 0; q < len; ++q) {
        o[q] = from_acc<scalar_t>(s * power_slope<MODE>(to_acc<acc_t>(xr[q]), pm1, a.k) * gr[q]);
      }
    } else {
      for (int64_t q = 0; q < len; ++q) {
        const acc_t v = to_acc<acc_t>(xr[q * a.step]);
        o[q * a.gstep] = from_acc<scalar_t>(s * power_slope<MODE>(v, pm1, a.k) * gr[q]);
      }
    }
  }
}

// Backward, channels-inner: tasks (n, h); every position scales a contiguous run of C.
template <typename scalar_t, int MODE>
void power_bwd_channels_chunk_mode(const PowerArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t pm1 = a.p;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t h = t % a.H, n = t / a.H;
    const acc_t* gr = a.g + (n * a.H + h) * a.W;
    for (int64_t w = 0; w < a.W; ++w) {
      const scalar_t* __restrict xv = a.x + n * a.sN + h * a.sH + w * a.sW;
      scalar_t* __restrict o = a.gx + n * a.gN + h * a.gH + w * a.gW;
      const acc_t gs = a.scale * gr[w];
      if (a.sC == 1 && a.gC == 1) {
        for (int64_t c = 0; c < a.C; ++c) {
          o[c] = from_acc<scalar_t>(power_slope<MODE>(to_acc<acc_t>(xv[c]), pm1, a.k) * gs);
        }
      } else {
        for (int64_t c = 0; c < a.C; ++c) {
          o[c * a.gC] = from_acc<scalar_t>(power_slope<MODE>(to_acc<acc_t>(xv[c * a.sC]), pm1, a.k) * gs);
        }
      }
    }
  }
}

// MODE as a run-time switch inside one chunk function, so that each gets a single AVX2 clone.
#define KTK_DCT_MODE_SWITCH(NAME)                                                  \
  template <typename scalar_t>                                                     \
  void NAME(const PowerArgs<scalar_t>& a, int64_t begin, int64_t end) {            \
    if (a.mode == 1) return NAME##_mode<scalar_t, 1>(a, begin, end);               \
    if (a.mode == 2) return NAME##_mode<scalar_t, 2>(a, begin, end);               \
    if (a.mode == 3) return NAME##_mode<scalar_t, 3>(a, begin, end);               \
    if (a.mode == 4) return NAME##_mode<scalar_t, 4>(a, begin, end);               \
    return NAME##_mode<scalar_t, 0>(a, begin, end);                                \
  }

KTK_DCT_MODE_SWITCH(power_planar_chunk)
KTK_DCT_MODE_SWITCH(power_channels_chunk)
KTK_DCT_MODE_SWITCH(power_bwd_planar_chunk)
KTK_DCT_MODE_SWITCH(power_bwd_channels_chunk)
#undef KTK_DCT_MODE_SWITCH

KTK_DEFINE_RUNNER(power_planar_chunk, PowerArgs)
KTK_DEFINE_RUNNER(power_channels_chunk, PowerArgs)
KTK_DEFINE_RUNNER(power_bwd_planar_chunk, PowerArgs)
KTK_DEFINE_RUNNER(power_bwd_channels_chunk, PowerArgs)

// Mode for the exponent p of the forward; the backward's |x|^(p-1) takes mode 3 when p - 1 is small.
template <typename scalar_t>
void set_power_mode(PowerArgs<scalar_t>& a, double p, double e) {
  a.mode = p == 1.0 ? 1 : (p == 2.0 ? 2 : (is_small_exponent(e) ? (e == std::floor(e) ? 3 : 4) : 0));
  a.k = a.mode >= 3 ? static_cast<int>(std::floor(e)) : 0;
}

template <typename scalar_t>
PowerArgs<scalar_t> power_args(const Tensor& x, double p) {
  using acc_t = at::opmath_type<scalar_t>;
  PowerArgs<scalar_t> a{};
  a.x = x.const_data_ptr<scalar_t>();
  a.C = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  a.sN = x.stride(0);
  a.sC = x.stride(1);
  a.sH = x.stride(2);
  a.sW = x.stride(3);
  a.p = static_cast<acc_t>(p);
  return a;
}

// The planar loops' rows of positions: the whole (h, w) map as one strided axis when the spatial
// strides of x and of the other tensor (oH, oW: grad_x, or the contiguous map) allow it, else the
// rows h; then their segments of at most kPowerSegment positions.
template <typename scalar_t>
void set_position_rows(PowerArgs<scalar_t>& a, int64_t oH, int64_t oW) {
  const int64_t H = a.H, W = a.W;
  if (H == 1 || W == 1 || (a.sH == W * a.sW && oH == W * oW)) {
    a.rows = 1;
    a.row_len = H * W;
    a.step = W == 1 ? a.sH : a.sW;
    a.gstep = W == 1 ? oH : oW;
  } else {
    a.rows = H;
    a.row_len = W;
    a.step = a.sW;
    a.gstep = oW;
  }
  a.segs = (a.row_len + kPowerSegment - 1) / kPowerSegment;
}

template <typename scalar_t>
void channel_power_mean_kernel(const Tensor& x, double p, const Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  if (out.numel() == 0) return;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  PowerArgs<scalar_t> a = power_args<scalar_t>(x, p);
  set_power_mode(a, p, p);
  a.out = out.mutable_data_ptr<acc_t>();
  a.scale = acc_t(1) / static_cast<acc_t>(C);
  const int64_t cost = a.mode == 0 ? 8 : 1;
  if (C >= kMinChannelsReduce && layout_vote(x) > 0) {
    at::parallel_for(0, N * H, grain_for(C * W * cost),
                     [&](int64_t begin, int64_t end) { power_channels_chunk_run<scalar_t>(a, begin, end); });
    return;
  }
  set_position_rows(a, W, 1);
  const int64_t seg_len = std::min(a.row_len, kPowerSegment);
  at::parallel_for(0, N * a.rows * a.segs, grain_for(C * seg_len * cost),
                   [&](int64_t begin, int64_t end) { power_planar_chunk_run<scalar_t>(a, begin, end); });
}

template <typename scalar_t>
void channel_power_mean_backward_kernel(const Tensor& x, const Tensor& grad_map, double p, const Tensor& grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  if (grad_x.numel() == 0) return;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  PowerArgs<scalar_t> a = power_args<scalar_t>(x, p);
  set_power_mode(a, p, p - 1.0);
  a.g = grad_map.const_data_ptr<acc_t>();
  a.gx = grad_x.mutable_data_ptr<scalar_t>();
  a.gN = grad_x.stride(0);
  a.gC = grad_x.stride(1);
  a.gH = grad_x.stride(2);
  a.gW = grad_x.stride(3);
  a.scale = static_cast<acc_t>(p) / static_cast<acc_t>(C);
  a.p = static_cast<acc_t>(p - 1.0);
  const int64_t cost = a.mode == 0 ? 8 : 1;
  if (C >= kMinChannelsReduce && channels_inner(grad_x, x)) {
    at::parallel_for(0, N * H, grain_for(C * W * cost),
                     [&](int64_t begin, int64_t end) { power_bwd_channels_chunk_run<scalar_t>(a, begin, end); });
    return;
  }
  set_position_rows(a, a.gH, a.gW);
  at::parallel_for(0, N * C * a.rows * a.segs, grain_for(std::min(a.row_len, kPowerSegment) * cost),
                   [&](int64_t begin, int64_t end) { power_bwd_planar_chunk_run<scalar_t>(a, begin, end); });
}

// ------------------------------------------------------------------------------------------------
// Argument checks and op entry points
// ------------------------------------------------------------------------------------------------

void check_cpu(const char* op, const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
}

void dct_basis2d_cpu(const Tensor& x, const Tensor& left, const Tensor& right, const Tensor& out) {
  const char* op = "dct_basis2d_";
  check_cpu(op, x);
  ktk_dct_checks::check_basis2d(op, x, left, right, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dct_basis2d_cpu",
                                  [&] { dct_basis2d_kernel<scalar_t>(x, left, right, out); });
}

void channel_power_mean_cpu(const Tensor& x, double p, const Tensor& out) {
  const char* op = "channel_power_mean_";
  check_cpu(op, x);
  ktk_dct_checks::check_power_mean(op, x, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_power_mean_cpu",
                                  [&] { channel_power_mean_kernel<scalar_t>(x, p, out); });
}

void channel_power_mean_backward_cpu(const Tensor& x, const Tensor& grad_map, double p, const Tensor& grad_x) {
  const char* op = "channel_power_mean_backward_";
  check_cpu(op, x);
  ktk_dct_checks::check_power_mean_backward(op, x, grad_map, grad_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_power_mean_backward_cpu",
                                  [&] { channel_power_mean_backward_kernel<scalar_t>(x, grad_map, p, grad_x); });
}

}  // namespace
}  // namespace dct_cpu
}  // namespace ktkernels

TORCH_LIBRARY_IMPL(ktkernels_C, CPU, m) {
  m.impl("dct_basis2d_", &ktkernels::dct_cpu::dct_basis2d_cpu);
  m.impl("channel_power_mean_", &ktkernels::dct_cpu::channel_power_mean_cpu);
  m.impl("channel_power_mean_backward_", &ktkernels::dct_cpu::channel_power_mean_backward_cpu);
}
