// CPU kernels of the pixel/global transfer loss (OpenMP through at::parallel_for).
//
// transfer_stats_: per plane (n, c), sq = sum_hw (s - t)^2 and the J projections sum_hw basis[j, hw] s|t,
// in one pass over s and t (converted to the accumulation type as they are read). Two layouts of the work,
// picked from the strides:
//   * planar (any strides): tasks (plane, segment of at most kSegment positions). A task loads its segment of
//     s and t into contiguous buffers, then reduces d^2 with kLanes running partial sums and the basis rows four
//     at a time with vector accumulators (contiguous basis rows; s and t loaded once per four rows). Planes of
//     several segments add their segments' partials in order afterwards, so the result does not depend on the
//     thread count.
//   * channels (channel stride smallest, e.g. channels_last; C >= kMinChannels): tasks (n, block of channels);
//     runs of one vector of channels (8 floats, 4 doubles) walk all positions with their sums in vector registers
//     (sq and two basis rows per pass; more rows take more passes, which re-read s and t from cache). Blocks of
//     kInner positions are summed apart and then added, which keeps the rounding error of long planes near that
//     of pairwise summation.
// transfer_grad_: grad = pixel_coef (s - t) + sum_j coef[n,c,j] basis[j,hw], elementwise, computed in acc and
// rounded once: planar tasks (plane, segment) with the basis rows as contiguous vectors, or, for channels-inner
// grad, tasks (n, h) with the coefficients transposed to (J, C) so the inner loops run along the channels.
//
// All reductions have a fixed order (deterministic). The work functions have AVX2+FMA clones chosen at run time
// (csrc/common/cpu_isa.h; ATEN_CPU_CAPABILITY=default forces the baseline).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/cpu_convert.h"
#include "../common/cpu_isa.h"
#include "transfer_checks.h"

namespace ktkernels {
namespace losses_cpu {
namespace {

using ktk_cpu::from_acc;
using ktk_cpu::to_acc;

using at::Tensor;

// Positions per planar task (the thread-local buffers hold a segment of s and t).
constexpr int64_t kSegment = 4096;
// Running partial sums of the planar reductions.
constexpr int kLanes = 16;
// Smallest channel count that takes the channels layout (shorter inner loops lose to planar).
constexpr int64_t kMinChannels = 8;
// Largest channel block of the channels layout, and the positions summed apart before joining the totals.
constexpr int64_t kMaxChannelBlock = 64;
constexpr int64_t kInner = 64;

int64_t grain_for(int64_t work_per_task) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1)); }

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

// sum_q f(q) with kLanes partial sums over the whole groups of kLanes (lane q % kLanes), a fixed tree over the
// lanes, then the tail in order. The lanes are only ever indexed by constants, so they live in registers.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t len, F&& f) {
  acc_t part[kLanes];
  for (int k = 0; k < kLanes; ++k) part[k] = acc_t(0);
  int64_t q = 0;
  for (; q + kLanes <= len; q += kLanes) {
    for (int k = 0; k < kLanes; ++k) part[k] += f(q + k);
  }
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int k = 0; k < w; ++k) part[k] += part[k + w];
  }
  acc_t sum = part[0];
  for (; q < len; ++q) sum += f(q);
  return sum;
}

// sum_q (a[q] - b[q])^2.
template <typename acc_t>
inline acc_t lane_sqdiff(const acc_t* __restrict a, const acc_t* __restrict b, int64_t len) {
  return lane_sum<acc_t>(len, [&](int64_t q) {
    const acc_t d = a[q] - b[q];
    return d * d;
  });
}

// Vector width in elements of the widest clone (AVX2: 8 floats, 4 doubles).
template <typename acc_t>
constexpr int64_t kVec = 32 / static_cast<int64_t>(sizeof(acc_t));

// A 32-byte vector of acc_t (GCC/Clang vector extension) that may alias acc_t and needs only element alignment,
// as in dct_cpu.cpp: one ymm register in the AVX2 clones, two xmm registers in the baseline build. Loaded and
// stored by dereferencing in place (no vector-returning helpers: their ABI differs between the clones).
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

// The sum of a vector's lanes, in a fixed tree.
template <typename acc_t>
inline acc_t hsum(const typename Vec32<acc_t>::type& v) {
  constexpr int64_t L = kVec<acc_t>;
  acc_t e[L];
  std::memcpy(e, &v, sizeof(e));
  for (int64_t w = L / 2; w >= 1; w /= 2) {
    for (int64_t k = 0; k < w; ++k) e[k] += e[k + w];
  }
  return e[0];
}

// A plane's spatial strides; positions q = h*W + w.
struct Plane {
  int64_t sH, sW;
};

// Calls f(offset of q0 in the plane, step, run, index of q0 in the segment) for the runs of positions
// [q0, q0 + len) that are one strided axis: the whole segment when the (h, w) map merges into one axis, else
// pieces of rows.
template <typename F>
inline void for_runs(const Plane& p, int64_t H, int64_t W, int64_t q0, int64_t len, F&& f) {
  if (H == 1 || W == 1 || p.sH == W * p.sW) {
    const int64_t step = W == 1 ? p.sH : p.sW;
    f(q0 * step, step, len, int64_t(0));
    return;
  }
  int64_t q = q0;
  const int64_t q1 = q0 + len;
  while (q < q1) {
    const int64_t h = q / W, w = q - h * W;
    const int64_t run = std::min(W - w, q1 - q);
    f(h * p.sH + w * p.sW, p.sW, run, q - q0);
    q += run;
  }
}

template <typename scalar_t, typename acc_t>
inline void load_segment(const scalar_t* base, const Plane& p, int64_t H, int64_t W, int64_t q0, int64_t len,
                         acc_t* __restrict dst) {
  for_runs(p, H, W, q0, len, [&](int64_t off, int64_t step, int64_t run, int64_t at) {
    const scalar_t* __restrict src = base + off;
    acc_t* __restrict d = dst + at;
    if (step == 1) {
      for (int64_t i = 0; i < run; ++i) d[i] = to_acc<acc_t>(src[i]);
    } else {
      for (int64_t i = 0; i < run; ++i) d[i] = to_acc<acc_t>(src[i * step]);
    }
  });
}

template <typename scalar_t, typename acc_t>
inline void store_segment(scalar_t* base, const Plane& p, int64_t H, int64_t W, int64_t q0, int64_t len,
                          const acc_t* __restrict src) {
  for_runs(p, H, W, q0, len, [&](int64_t off, int64_t step, int64_t run, int64_t at) {
    scalar_t* __restrict d = base + off;
    const acc_t* __restrict v = src + at;
    if (step == 1) {
      for (int64_t i = 0; i < run; ++i) d[i] = from_acc<scalar_t>(v[i]);
    } else {
      for (int64_t i = 0; i < run; ++i) d[i * step] = from_acc<scalar_t>(v[i]);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// transfer_stats_
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct StatsArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* s;
  const scalar_t* t;
  const acc_t* basis;  // (J, HW)
  acc_t* sq;           // (N*C)
  acc_t* proj;         // (2, N*C, J)
  acc_t* part;         // planar, segs > 1: (N*C, segs, 1 + 2J) partials
  int64_t C, H, W, HW, J, NC;
  int64_t sN, sC, sH, sW;
  int64_t tN, tC, tH, tW;
  int64_t segs;      // planar: segments per plane
  int64_t cb, nblk;  // channels: channel block and blocks per image
};

// Value v of plane p: 0 -> sq, 1 + j -> proj[0, p, j], 1 + J + j -> proj[1, p, j].
template <typename acc_t>
inline void store_value(acc_t* sq, acc_t* proj, int64_t NC, int64_t J, int64_t p, int64_t v, acc_t x) {
  if (v == 0) {
    sq[p] = x;
  } else if (v <= J) {
    proj[p * J + (v - 1)] = x;
  } else {
    proj[(NC + p) * J + (v - 1 - J)] = x;
  }
}

// ps[r] = sum_q rows[r][q] xs[q] and pt[r] = sum_q rows[r][q] xt[q] for R basis rows in one pass over a
// segment: 2R vector accumulators (lane q % L), each summed over its lanes in a fixed tree, then the tail.
template <int R, typename acc_t>
inline void dot_rows(const acc_t* const* rows, const acc_t* __restrict xs, const acc_t* __restrict xt, int64_t len,
                     acc_t* ps, acc_t* pt) {
  using V = typename Vec32<acc_t>::type;
  constexpr int64_t L = kVec<acc_t>;
  V as[R], at[R];
  for (int r = 0; r < R; ++r) as[r] = at[r] = V{};
  int64_t q = 0;
  for (; q + L <= len; q += L) {
    const V s = *reinterpret_cast<const V*>(xs + q), t = *reinterpret_cast<const V*>(xt + q);
    for (int r = 0; r < R; ++r) {
      const V b = *reinterpret_cast<const V*>(rows[r] + q);
      as[r] += b * s;
      at[r] += b * t;
    }
  }
  for (int r = 0; r < R; ++r) {
    acc_t x = hsum<acc_t>(as[r]), y = hsum<acc_t>(at[r]);
    for (int64_t i = q; i < len; ++i) {
      x += rows[r][i] * xs[i];
      y += rows[r][i] * xt[i];
    }
    ps[r] = x;
    pt[r] = y;
  }
}

template <typename scalar_t>
void stats_planar_chunk(const StatsArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t seg_len = std::min(a.HW, kSegment), J = a.J, V = 1 + 2 * J;
  std::vector<acc_t> xs(static_cast<size_t>(seg_len)), xt(static_cast<size_t>(seg_len));
  const Plane ps{a.sH, a.sW}, pt{a.tH, a.tW};
  for (int64_t task = begin; task < end; ++task) {
    const int64_t seg = task % a.segs, p = task / a.segs;
    const int64_t n = p / a.C, c = p % a.C;
    const int64_t q0 = seg * kSegment, len = std::min(kSegment, a.HW - q0);
    load_segment(a.s + n * a.sN + c * a.sC, ps, a.H, a.W, q0, len, xs.data());
    load_segment(a.t + n * a.tN + c * a.tC, pt, a.H, a.W, q0, len, xt.data());
    auto put = [&](int64_t v, acc_t x) {
      if (a.segs == 1) {
        store_value(a.sq, a.proj, a.NC, J, p, v, x);
      } else {
        a.part[(p * a.segs + seg) * V + v] = x;
      }
    };
    put(0, lane_sqdiff(xs.data(), xt.data(), len));
    // Basis rows four at a time (the segment's s and t are loaded once for the four), then one at a time.
    const acc_t* rows[4];
    acc_t out_s[4], out_t[4];
    int64_t j = 0;
    for (; j < J; j += 4) {
      const int64_t R = std::min<int64_t>(4, J - j);
      for (int64_t r = 0; r < R; ++r) rows[r] = a.basis + (j + r) * a.HW + q0;
      if (R == 4) {
        dot_rows<4>(rows, xs.data(), xt.data(), len, out_s, out_t);
      } else {
        for (int64_t r = 0; r < R; ++r) dot_rows<1>(rows + r, xs.data(), xt.data(), len, out_s + r, out_t + r);
      }
      for (int64_t r = 0; r < R; ++r) {
        put(1 + j + r, out_s[r]);
        put(1 + J + j + r, out_t[r]);
      }
    }
  }
}

// One pass of the channels layout over all positions for a run of nch <= L channels (at sp, tp): per channel
// (vector lane), sum (s - t)^2 (when SQ) and the sums for R basis rows from j0. Running sums over blocks of
// kInner positions are added to the totals; everything stays in vector registers. Totals to tot[v * L + lane],
// v = 0 for sq, 1 + r and 1 + R + r for the rows.
template <int R, bool SQ, typename scalar_t>
inline void channels_pass(const StatsArgs<scalar_t>& a, const scalar_t* sp, const scalar_t* tp, int64_t nch,
                          int64_t j0, at::opmath_type<scalar_t>* tot) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec32<acc_t>::type;
  constexpr int64_t L = kVec<acc_t>;
  constexpr int RR = R > 0 ? R : 1;
  V run_sq = V{}, tot_sq = V{};
  V run_s[RR], run_t[RR], tot_s[RR], tot_t[RR];
  for (int r = 0; r < RR; ++r) run_s[r] = run_t[r] = tot_s[r] = tot_t[r] = V{};
  alignas(32) acc_t bs[L], bt[L];  // converted channels, zero past nch
  for (int64_t k = 0; k < L; ++k) bs[k] = bt[k] = acc_t(0);
  // direct: L contiguous channels, loaded as one vector (float) or widened in registers (bf16, fp16); otherwise
  // converted one by one through bs/bt.
  const bool direct = nch == L && a.sC == 1 && a.tC == 1;
  const acc_t* basis = a.basis + j0 * a.HW;
  int64_t q = 0;
  for (int64_t h = 0; h < a.H; ++h) {
    for (int64_t w = 0; w < a.W; ++w) {
      const scalar_t* __restrict sv = sp + h * a.sH + w * a.sW;
      const scalar_t* __restrict tv = tp + h * a.tH + w * a.tW;
      V s = V{}, t = V{};
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (direct) {
          s = *reinterpret_cast<const V*>(sv);
          t = *reinterpret_cast<const V*>(tv);
        }
      } else if (direct) {  // bf16, fp16: eight channels widened in registers, exactly (cpu_convert.h)
        const ktk_cpu::F32x8 ws = ktk_cpu::widen8(sv), wt = ktk_cpu::widen8(tv);
        std::memcpy(&s, &ws, sizeof(s));
        std::memcpy(&t, &wt, sizeof(t));
      }
      if (!direct) {
        for (int64_t k = 0; k < nch; ++k) {
          bs[k] = to_acc<acc_t>(sv[k * a.sC]);
          bt[k] = to_acc<acc_t>(tv[k * a.tC]);
        }
        s = *reinterpret_cast<const V*>(bs);
        t = *reinterpret_cast<const V*>(bt);
      }
      if constexpr (SQ) {
        const V d = s - t;
        run_sq += d * d;
      }
      for (int r = 0; r < R; ++r) {
        const acc_t b = basis[r * a.HW + q];
        run_s[r] += b * s;
        run_t[r] += b * t;
      }
      ++q;
      if (q % kInner == 0 || q == a.HW) {
        tot_sq += run_sq;
        run_sq = V{};
        for (int r = 0; r < R; ++r) {
          tot_s[r] += run_s[r];
          tot_t[r] += run_t[r];
          run_s[r] = run_t[r] = V{};
        }
      }
    }
  }
  *reinterpret_cast<V*>(tot) = tot_sq;
  for (int r = 0; r < R; ++r) {
    *reinterpret_cast<V*>(tot + (1 + r) * L) = tot_s[r];
    *reinterpret_cast<V*>(tot + (1 + R + r) * L) = tot_t[r];
  }
}

template <typename scalar_t>
void stats_channels_chunk(const StatsArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = kVec<acc_t>;
  const int64_t J = a.J;
  alignas(32) acc_t tot[5 * L];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task % a.nblk, n = task / a.nblk;
    const int64_t c0 = b * a.cb, cb = std::min(a.cb, a.C - c0);
    // Runs of L channels; for each, a pass with sq and the first (up to) two basis rows, then passes of two rows.
    for (int64_t ch0 = 0; ch0 < cb; ch0 += L) {
      const int64_t nch = std::min(L, cb - ch0), p0 = n * a.C + c0 + ch0;
      const scalar_t* sp = a.s + n * a.sN + (c0 + ch0) * a.sC;
      const scalar_t* tp = a.t + n * a.tN + (c0 + ch0) * a.tC;
      int64_t j = 0;
      do {
        const int64_t R = std::min<int64_t>(2, J - j);
        if (j == 0) {
          if (R == 2) {
            channels_pass<2, true>(a, sp, tp, nch, j, tot);
          } else if (R == 1) {
            channels_pass<1, true>(a, sp, tp, nch, j, tot);
          } else {
            channels_pass<0, true>(a, sp, tp, nch, j, tot);
          }
          for (int64_t k = 0; k < nch; ++k) a.sq[p0 + k] = tot[k];
        } else if (R == 2) {
          channels_pass<2, false>(a, sp, tp, nch, j, tot);
        } else {
          channels_pass<1, false>(a, sp, tp, nch, j, tot);
        }
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t k = 0; k < nch; ++k) {
            a.proj[(p0 + k) * J + j + r] = tot[(1 + r) * L + k];
            a.proj[(a.NC + p0 + k) * J + j + r] = tot[(1 + R + r) * L + k];
          }
        }
        j += R;
      } while (j < J);
    }
  }
}

KTK_DEFINE_RUNNER(stats_planar_chunk, StatsArgs)
KTK_DEFINE_RUNNER(stats_channels_chunk, StatsArgs)

// Channel block of the channels layouts: up to kMaxChannelBlock channels, halved (down to 16) while there would
// be fewer than 4 tasks per thread; then balanced over the blocks (a multiple of 8 unless it is all of C).
int64_t channel_block(int64_t C, int64_t outer_tasks) {
  const int64_t threads = at::get_num_threads();
  int64_t cb = std::min(C, kMaxChannelBlock);
  while (cb > 16 && outer_tasks * ((C + cb - 1) / cb) < 4 * threads) cb /= 2;
  const int64_t nblk = (C + cb - 1) / cb;
  cb = (C + nblk - 1) / nblk;
  if (cb < C) cb = std::min(C, (cb + 7) / 8 * 8);
  return cb;
}

template <typename scalar_t>
void transfer_stats_kernel(const Tensor& s, const Tensor& t, const Tensor& basis, const Tensor& sq,
                           const Tensor& proj) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3), J = basis.size(0);
  if (N * C == 0) return;
  if (H * W == 0) {  // empty sums
    sq.zero_();
    proj.zero_();
    return;
  }
  StatsArgs<scalar_t> a{};
  a.s = s.const_data_ptr<scalar_t>();
  a.t = t.const_data_ptr<scalar_t>();
  a.basis = basis.const_data_ptr<acc_t>();
  a.sq = sq.mutable_data_ptr<acc_t>();
  a.proj = proj.mutable_data_ptr<acc_t>();
  a.C = C;
  a.H = H;
  a.W = W;
  a.HW = H * W;
  a.J = J;
  a.NC = N * C;
  a.sN = s.stride(0);
  a.sC = s.stride(1);
  a.sH = s.stride(2);
  a.sW = s.stride(3);
  a.tN = t.stride(0);
  a.tC = t.stride(1);
  a.tH = t.stride(2);
  a.tW = t.stride(3);
  const int64_t V = 1 + 2 * J;
  if (C >= kMinChannels && channels_inner(s, t)) {
    a.cb = channel_block(C, N);
    a.nblk = (C + a.cb - 1) / a.cb;
    at::parallel_for(0, N * a.nblk, grain_for(a.HW * a.cb * (1 + J)),
                     [&](int64_t begin, int64_t end) { stats_channels_chunk_run<scalar_t>(a, begin, end); });
    return;
  }
  a.segs = (a.HW + kSegment - 1) / kSegment;
  std::vector<acc_t> part;
  if (a.segs > 1) {
    part.resize(static_cast<size_t>(a.NC * a.segs * V));
    a.part = part.data();
  }
  at::parallel_for(0, a.NC * a.segs, grain_for(std::min(a.HW, kSegment) * (1 + J)),
                   [&](int64_t begin, int64_t end) { stats_planar_chunk_run<scalar_t>(a, begin, end); });
  if (a.segs > 1) {
    // Segments of a plane joined in order: the same sums whatever the threads did.
    at::parallel_for(0, a.NC, grain_for(a.segs * V), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t v = 0; v < V; ++v) {
          acc_t x = acc_t(0);
          for (int64_t seg = 0; seg < a.segs; ++seg) x += a.part[(p * a.segs + seg) * V + v];
          store_value(a.sq, a.proj, a.NC, J, p, v, x);
        }
      }
    });
  }
}

// ------------------------------------------------------------------------------------------------
// transfer_grad_
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct GradArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* s;
  const scalar_t* t;
  scalar_t* g;
  const acc_t* basis;  // (J, HW)
  const acc_t* coef;   // (N*C, J)
  acc_t pc;
  int64_t C, H, W, HW, J;
  int64_t sN, sC, sH, sW;
  int64_t tN, tC, tH, tW;
  int64_t gN, gC, gH, gW;
  int64_t segs;  // planar: segments per plane
};

template <typename scalar_t>
void grad_planar_chunk(const GradArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t seg_len = std::min(a.HW, kSegment), J = a.J;
  std::vector<acc_t> xs(static_cast<size_t>(seg_len)), xt(static_cast<size_t>(seg_len));
  const Plane ps{a.sH, a.sW}, pt{a.tH, a.tW}, pg{a.gH, a.gW};
  for (int64_t task = begin; task < end; ++task) {
    const int64_t seg = task % a.segs, p = task / a.segs;
    const int64_t n = p / a.C, c = p % a.C;
    const int64_t q0 = seg * kSegment, len = std::min(kSegment, a.HW - q0);
    load_segment(a.s + n * a.sN + c * a.sC, ps, a.H, a.W, q0, len, xs.data());
    load_segment(a.t + n * a.tN + c * a.tC, pt, a.H, a.W, q0, len, xt.data());
    acc_t* __restrict v = xs.data();
    const acc_t* __restrict u = xt.data();
    for (int64_t q = 0; q < len; ++q) v[q] = a.pc * (v[q] - u[q]);
    // Basis rows four at a time (one load and store of v per four rows), then one at a time.
    const acc_t* cp = a.coef + p * J;
    int64_t j = 0;
    for (; j + 4 <= J; j += 4) {
      const acc_t c0 = cp[j], c1 = cp[j + 1], c2 = cp[j + 2], c3 = cp[j + 3];
      const acc_t* __restrict b0 = a.basis + j * a.HW + q0;
      const acc_t* __restrict b1 = b0 + a.HW;
      const acc_t* __restrict b2 = b1 + a.HW;
      const acc_t* __restrict b3 = b2 + a.HW;
      for (int64_t q = 0; q < len; ++q) v[q] += c0 * b0[q] + c1 * b1[q] + c2 * b2[q] + c3 * b3[q];
    }
    for (; j < J; ++j) {
      const acc_t cj = cp[j];
      const acc_t* __restrict b = a.basis + j * a.HW + q0;
      for (int64_t q = 0; q < len; ++q) v[q] += cj * b[q];
    }
    store_segment(a.g + n * a.gN + c * a.gC, pg, a.H, a.W, q0, len, v);
  }
}

// Tasks (n, h); the coefficients of image n transposed to (J, C) once per image a task meets.
template <typename scalar_t>
void grad_channels_chunk(const GradArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.C, J = a.J;
  std::vector<acc_t> buf(static_cast<size_t>((J + 2) * C));
  acc_t* coef_t = buf.data();
  acc_t* v = coef_t + J * C;
  acc_t* u = v + C;
  int64_t cur_n = -1;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % a.H, n = task / a.H;
    if (n != cur_n) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j < J; ++j) coef_t[j * C + c] = a.coef[(n * C + c) * J + j];
      }
      cur_n = n;
    }
    for (int64_t w = 0; w < a.W; ++w) {
      const scalar_t* __restrict sv = a.s + n * a.sN + h * a.sH + w * a.sW;
      const scalar_t* __restrict tv = a.t + n * a.tN + h * a.tH + w * a.tW;
      scalar_t* __restrict gv = a.g + n * a.gN + h * a.gH + w * a.gW;
      if (a.sC == 1 && a.tC == 1) {
        for (int64_t c = 0; c < C; ++c) {
          v[c] = to_acc<acc_t>(sv[c]);
          u[c] = to_acc<acc_t>(tv[c]);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          v[c] = to_acc<acc_t>(sv[c * a.sC]);
          u[c] = to_acc<acc_t>(tv[c * a.tC]);
        }
      }
      {
        acc_t* __restrict vr = v;
        const acc_t* __restrict ur = u;
        for (int64_t c = 0; c < C; ++c) vr[c] = a.pc * (vr[c] - ur[c]);
      }
      const int64_t q = h * a.W + w;
      int64_t j = 0;
      for (; j + 4 <= J; j += 4) {  // four rows per pass over v, as in the planar loop
        const acc_t* bq = a.basis + j * a.HW + q;
        const acc_t b0 = bq[0], b1 = bq[a.HW], b2 = bq[2 * a.HW], b3 = bq[3 * a.HW];
        const acc_t* __restrict c0 = coef_t + j * C;
        const acc_t* __restrict c1 = c0 + C;
        const acc_t* __restrict c2 = c1 + C;
        const acc_t* __restrict c3 = c2 + C;
        acc_t* __restrict vr = v;
        for (int64_t c = 0; c < C; ++c) vr[c] += c0[c] * b0 + c1[c] * b1 + c2[c] * b2 + c3[c] * b3;
      }
      for (; j < J; ++j) {
        const acc_t bj = a.basis[j * a.HW + q];
        const acc_t* __restrict cj = coef_t + j * C;
        acc_t* __restrict vr = v;
        for (int64_t c = 0; c < C; ++c) vr[c] += cj[c] * bj;
      }
      if (a.gC == 1) {
        for (int64_t c = 0; c < C; ++c) gv[c] = from_acc<scalar_t>(v[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) gv[c * a.gC] = from_acc<scalar_t>(v[c]);
      }
    }
  }
}

KTK_DEFINE_RUNNER(grad_planar_chunk, GradArgs)
KTK_DEFINE_RUNNER(grad_channels_chunk, GradArgs)

template <typename scalar_t>
void transfer_grad_kernel(const Tensor& s, const Tensor& t, const Tensor& basis, const Tensor& pixel_coef,
                          const Tensor& coef, const Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  if (grad.numel() == 0) return;
  const int64_t N = s.size(0), C = s.size(1), H = s.size(2), W = s.size(3), J = basis.size(0);
  GradArgs<scalar_t> a{};
  a.s = s.const_data_ptr<scalar_t>();
  a.t = t.const_data_ptr<scalar_t>();
  a.g = grad.mutable_data_ptr<scalar_t>();
  a.basis = basis.const_data_ptr<acc_t>();
  a.coef = coef.const_data_ptr<acc_t>();
  a.pc = pixel_coef.const_data_ptr<acc_t>()[0];
  a.C = C;
  a.H = H;
  a.W = W;
  a.HW = H * W;
  a.J = J;
  a.sN = s.stride(0);
  a.sC = s.stride(1);
  a.sH = s.stride(2);
  a.sW = s.stride(3);
  a.tN = t.stride(0);
  a.tC = t.stride(1);
  a.tH = t.stride(2);
  a.tW = t.stride(3);
  a.gN = grad.stride(0);
  a.gC = grad.stride(1);
  a.gH = grad.stride(2);
  a.gW = grad.stride(3);
  if (C >= kMinChannels && channels_inner(grad, s)) {
    at::parallel_for(0, N * H, grain_for(W * C * (1 + J)),
                     [&](int64_t begin, int64_t end) { grad_channels_chunk_run<scalar_t>(a, begin, end); });
    return;
  }
  a.segs = (a.HW + kSegment - 1) / kSegment;
  at::parallel_for(0, N * C * a.segs, grain_for(std::min(a.HW, kSegment) * (1 + J)),
                   [&](int64_t begin, int64_t end) { grad_planar_chunk_run<scalar_t>(a, begin, end); });
}

// ------------------------------------------------------------------------------------------------
// Argument checks and op entry points
// ------------------------------------------------------------------------------------------------

void check_cpu(const char* op, const Tensor& s) {
  TORCH_CHECK(s.device().is_cpu(), op, ": s must be a CPU tensor, got ", s.device());
}

void transfer_stats_cpu(const Tensor& s, const Tensor& t, const Tensor& basis, const Tensor& sq, const Tensor& proj) {
  const char* op = "transfer_stats_";
  check_cpu(op, s);
  ktk_losses_checks::check_transfer_stats(op, s, t, basis, sq, proj);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "transfer_stats_cpu",
                                  [&] { transfer_stats_kernel<scalar_t>(s, t, basis, sq, proj); });
}

void transfer_grad_cpu(const Tensor& s, const Tensor& t, const Tensor& basis, const Tensor& pixel_coef,
                       const Tensor& coef, const Tensor& grad) {
  const char* op = "transfer_grad_";
  check_cpu(op, s);
  ktk_losses_checks::check_transfer_grad(op, s, t, basis, pixel_coef, coef, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "transfer_grad_cpu",
                                  [&] { transfer_grad_kernel<scalar_t>(s, t, basis, pixel_coef, coef, grad); });
}

}  // namespace
}  // namespace losses_cpu
}  // namespace ktkernels

TORCH_LIBRARY_IMPL(ktkernels_C, CPU, m) {
  m.impl("transfer_stats_", &ktkernels::losses_cpu::transfer_stats_cpu);
  m.impl("transfer_grad_", &ktkernels::losses_cpu::transfer_grad_cpu);
}
