// CPU kernels of the blur-pool family (OpenMP through at::parallel_for).
//
// All three ops apply one separable gather
//     out[n,c,i,j] = sum_u sum_v row_w[i,u] * col_w[j,v] * src[n,c,row_idx[i,u],col_idx[j,v]]
// to a source that is the input itself (blur_gather_), the stride-1 max map of the input
// (max_blur_forward_) or the gradient (max_blur_backward_, which then routes the blurred gradient
// on the max map back through the argmax codes).
//
// Every output row i is computed in two passes over a thread-local buffer:
//   1. vertical:   tmp[q] = sum_u row_w[i,u] * src[row_idx[i,u], q]      (contiguous, vectorises)
//   2. horizontal: out[i,j] = sum_v col_w[j,v] * tmp[col_idx[j,v]]
// There are two layouts of the work, picked from the strides:
//   * planar   (any strides): one task per (n, c, i); a source row is the W-vector of a plane.
//     The horizontal pass runs the periodic interior of the table (a forward table repeats with
//     period 1 and step `stride`, an adjoint table with period `stride` and step 1) as a
//     vectorised stencil and gathers only the few border columns.
//   * channels (channel stride 1, i.e. channels_last): one task per (n, channel block, i); a
//     source row is a (W, Cb) block and every inner loop runs over contiguous channels.
// Taps with weight 0 (zero padding) are dropped when the tables are compacted, so a non-finite
// value at index 0 never leaks into a padded output. In the horizontal pass the padded slots of a
// compacted row point at an extra zero element of tmp.
//
// The max map and the blurred gradient are never materialised in full: their rows are produced on
// demand into a small per-thread LRU row cache. Argmax codes are written by exactly one task per
// max-map row (the first output row that reads it, within the thread that owns that task), and
// max-map rows that no output reads are covered by a separate codes-only pass. The backward is a
// pure gather (one writer per grad_input element), hence deterministic.
//
// Speed: the work functions also have AVX2+FMA clones chosen at run time (csrc/common/cpu_isa.h), fp16
// elements convert through code that vectorises (csrc/common/cpu_convert.h), and large fresh outputs get
// transparent huge pages before their first touch (see advise_huge_pages).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common/cpu_convert.h"
#include "../common/cpu_isa.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ktkernels {
namespace blurpool_cpu {
namespace {

using ktk_cpu::from_acc;
using ktk_cpu::to_acc;

// torch.max_pool2d's selection rule, scanning a window in row-major order from its first in-range
// element: a later element wins when it is larger or NaN (so ties keep the first, NaN propagates).
template <typename acc_t>
inline bool takes_max(acc_t v, acc_t best) {
  return (v > best) | (v != v);
}

// Folds one window element into n contiguous running maxima and their codes. Branch-free selects,
// so the loop vectorises.
template <typename scalar_t, typename acc_t, typename code_t>
inline void fold_window_element(const scalar_t* __restrict src, int64_t n, code_t cv, acc_t* __restrict best,
                                code_t* __restrict code) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = to_acc<acc_t>(src[j]);
    const bool take = takes_max(v, best[j]);
    best[j] = take ? v : best[j];
    code[j] = take ? cv : code[j];
  }
}

using at::Tensor;

// Largest number of non-zero taps in one row of a table (the Python tables have at most 7).
constexpr int kMaxTaps = 64;
// Size budget (bytes) of the per-thread row buffer in the channels layout.
constexpr int64_t kChannelsBufferBytes = 256 * 1024;

// ------------------------------------------------------------------------------------------------
// Tables
// ------------------------------------------------------------------------------------------------

// A 1-D table with its zero-weight taps removed. Row r keeps count[r] taps, left-aligned in a row
// of `width` slots; the unused slots hold index `pad_index` and weight 0.
template <typename acc_t>
struct Table {
  int64_t rows = 0;
  int width = 1;
  std::vector<int32_t> idx;
  std::vector<acc_t> w;
  std::vector<int32_t> count;

  // Periodic run for the planar horizontal pass: rows j = per_begin + P*m + f (f < P, m < per_periods)
  // are idx = per_base + D*m + per_off[f][v], w = per_w[f][v] (v < per_count[f]; rows of max(per_count) slots). A forward
  // table is periodic with P = 1, D = stride; an adjoint table with P = stride, D = 1. per_periods == 0: none.
  // The counts can be less than width, and differ between the phases f:
  //   * reflection at a border merges taps, so an adjoint table of an odd size has a border row with one tap more
  //     than the interior (111 columns: 3 taps there, 2 inside);
  //   * an odd filter at stride 2 feeds even and odd input positions from different numbers of outputs (k3: 1, 2).
  int64_t per_begin = 0, per_periods = 0, per_base = 0;
  int per_P = 1, per_D = 1;
  int per_count[2] = {1, 1};
  std::vector<int32_t> per_off;
  std::vector<acc_t> per_w;
};

// Periods (P, D) and widths K for which the planar horizontal pass has a compiled fast path: the
// forward and adjoint tables of strides 1 and 2 (others, e.g. stride 3 or 4, take the plain gather;
// every extra case costs compile time).
constexpr int kMaxPeriod = 2;
inline bool periodic_supported(int P, int D, const int* counts) {
  if (P == 1) return D >= 1 && D <= 2 && counts[0] <= 7;
  // Adjoint tables of stride 2: even filters give equal counts, odd ones counts one apart (k3: 1 and 2).
  return P == 2 && D == 1 && counts[0] <= 4 && counts[1] <= 4 && std::abs(counts[0] - counts[1]) <= 1;
}

// Finds the longest periodic run (each phase's rows with one tap count and a repeating stencil); prefers the
// smallest period.
template <typename acc_t>
void find_periodic_run(Table<acc_t>& t) {
  const int W = t.width;
  const int64_t rows = t.rows;
  // Rows a and b have the same non-zero tap count, weights and tap offsets (relative to their first tap).
  auto same_stencil = [&](int64_t a, int64_t b) {
    const int k = t.count[a];
    if (k == 0 || t.count[b] != k) return false;
    for (int v = 0; v < k; ++v) {
      if (t.w[a * W + v] != t.w[b * W + v]) return false;
      if (t.idx[a * W + v] - t.idx[a * W] != t.idx[b * W + v] - t.idx[b * W]) return false;
    }
    return true;
  };
  auto shift = [&](int64_t a, int64_t b) { return static_cast<int64_t>(t.idx[b * W]) - t.idx[a * W]; };
  int64_t best_len = 0;
  for (int P = 1; P <= kMaxPeriod; ++P) {
    for (int64_t j0 = 0; j0 + 2 * P <= rows;) {
      int counts[2] = {t.count[j0], P > 1 ? t.count[j0 + 1] : 0};
      if (!same_stencil(j0, j0 + P)) {
        ++j0;
        continue;
      }
      const int64_t D = shift(j0, j0 + P);
      if (!periodic_supported(P, static_cast<int>(D), counts)) {
        ++j0;
        continue;
      }
      // Each row is compared with the one a period before: every row of a phase has that phase's count.
      int64_t j1 = j0 + P + 1;
      while (j1 < rows && same_stencil(j1 - P, j1) && shift(j1 - P, j1) == D) ++j1;
      const int64_t periods = (j1 - j0) / P;
      if (periods >= 2 && P * periods > best_len) {
        best_len = P * periods;
        t.per_begin = j0;
        t.per_periods = periods;
        t.per_base = t.idx[j0 * W];
        t.per_P = P;
        t.per_D = static_cast<int>(D);
        t.per_count[0] = counts[0];
        t.per_count[1] = P > 1 ? counts[1] : counts[0];
      }
      j0 = std::max(j0 + 1, j1 - P);
    }
  }
  if (best_len >= 4) {
    const int P = t.per_P;
    const int K = std::max(t.per_count[0], t.per_count[1]);
    t.per_off.assign(static_cast<size_t>(P * K), 0);
    t.per_w.assign(static_cast<size_t>(P * K), acc_t(0));
    for (int f = 0; f < P; ++f) {
      for (int v = 0; v < t.per_count[f]; ++v) {
        t.per_off[f * K + v] = static_cast<int32_t>(t.idx[(t.per_begin + f) * W + v] - t.per_base);
        t.per_w[f * K + v] = t.w[(t.per_begin + f) * W + v];
      }
    }
  } else {
    t.per_periods = 0;
  }
}

template <typename acc_t>
Table<acc_t> compact_table(const Tensor& idx_t, const Tensor& w_t, int64_t src_size, int32_t pad_index,
                           const char* name) {
  const Tensor idx_c = idx_t.contiguous();
  const Tensor w_c = w_t.contiguous();
  const int64_t rows = idx_c.size(0);
  const int64_t k = idx_c.size(1);
  const int32_t* ip = idx_c.data_ptr<int32_t>();
  const float* wp = w_c.data_ptr<float>();

  Table<acc_t> t;
  t.rows = rows;
  t.count.assign(static_cast<size_t>(rows), 0);
  int width = 0;
  for (int64_t r = 0; r < rows; ++r) {
    int cnt = 0;
    for (int64_t u = 0; u < k; ++u) {
      if (wp[r * k + u] != 0.0f) {
        const int32_t id = ip[r * k + u];
        TORCH_CHECK(id >= 0 && id < src_size, name, ": index ", id, " at (", r, ", ", u,
                    ") is out of range for a source axis of size ", src_size);
        ++cnt;
      }
    }
    t.count[static_cast<size_t>(r)] = cnt;
    width = std::max(width, cnt);
  }
  TORCH_CHECK(width <= kMaxTaps, name, ": at most ", kMaxTaps, " non-zero taps per row are supported, got ",
              width);
  t.width = std::max(width, 1);
  t.idx.assign(static_cast<size_t>(rows * t.width), pad_index);
  t.w.assign(static_cast<size_t>(rows * t.width), acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    int s = 0;
    for (int64_t u = 0; u < k; ++u) {
      if (wp[r * k + u] != 0.0f) {
        t.idx[static_cast<size_t>(r * t.width + s)] = ip[r * k + u];
        t.w[static_cast<size_t>(r * t.width + s)] = static_cast<acc_t>(wp[r * k + u]);
        ++s;
      }
    }
  }

  find_periodic_run(t);
  return t;
}

// The first row of `t` that reads source row r, for every r < src_rows, or -1 if none does.
template <typename acc_t>
std::vector<int64_t> first_reader(const Table<acc_t>& t, int64_t src_rows) {
  std::vector<int64_t> owner(static_cast<size_t>(std::max<int64_t>(src_rows, 0)), -1);
  for (int64_t i = t.rows - 1; i >= 0; --i) {
    for (int u = 0; u < t.count[i]; ++u) owner[t.idx[i * t.width + u]] = i;
  }
  return owner;
}

// ------------------------------------------------------------------------------------------------
// Vertical pass: tmp[q] = sum_u w[u] * rows[u][q * stride]
// ------------------------------------------------------------------------------------------------

template <int K, typename in_t, typename acc_t>
inline void vpass_fixed(const in_t* const* rows, const acc_t* w, int64_t len, acc_t* __restrict tmp) {
  if constexpr (K == 0) {
    std::fill(tmp, tmp + len, acc_t(0));
  } else {
    const in_t* rp[K];
    acc_t wk[K];
    for (int u = 0; u < K; ++u) {
      rp[u] = rows[u];
      wk[u] = w[u];
    }
#pragma GCC ivdep
    for (int64_t q = 0; q < len; ++q) {
      acc_t s = wk[0] * to_acc<acc_t>(rp[0][q]);
      for (int u = 1; u < K; ++u) s += wk[u] * to_acc<acc_t>(rp[u][q]);
      tmp[q] = s;
    }
  }
}

template <typename in_t, typename acc_t>
inline void vpass_any(const in_t* const* rows, const acc_t* w, int k, int64_t len, int64_t stride,
                      acc_t* __restrict tmp) {
  if (k == 0) {
    std::fill(tmp, tmp + len, acc_t(0));
    return;
  }
  {
    const in_t* r = rows[0];
    const acc_t wu = w[0];
    for (int64_t q = 0; q < len; ++q) tmp[q] = wu * to_acc<acc_t>(r[q * stride]);
  }
  for (int u = 1; u < k; ++u) {
    const in_t* r = rows[u];
    const acc_t wu = w[u];
    for (int64_t q = 0; q < len; ++q) tmp[q] += wu * to_acc<acc_t>(r[q * stride]);
  }
}

// One vector of `len` elements (unit stride when stride == 1).
template <typename in_t, typename acc_t>
inline void vpass(const in_t* const* rows, const acc_t* w, int k, int64_t len, int64_t stride, acc_t* tmp) {
  if (stride == 1) {
    switch (k) {
      case 0: return vpass_fixed<0>(rows, w, len, tmp);
      case 1: return vpass_fixed<1>(rows, w, len, tmp);
      case 2: return vpass_fixed<2>(rows, w, len, tmp);
      case 3: return vpass_fixed<3>(rows, w, len, tmp);
      case 4: return vpass_fixed<4>(rows, w, len, tmp);
      case 5: return vpass_fixed<5>(rows, w, len, tmp);
      case 6: return vpass_fixed<6>(rows, w, len, tmp);
      case 7: return vpass_fixed<7>(rows, w, len, tmp);
      default: break;
    }
  }
  vpass_any(rows, w, k, len, stride, tmp);
}

// A (width, cb) block: tmp[q * tstride + c] = sum_u w[u] * rows[u][q * row_stride + c], c < cb.
template <int K, typename in_t, typename acc_t>
inline void vpass_block_fixed(const in_t* const* rows, const acc_t* w, int64_t width, int64_t row_stride,
                              int64_t cb, acc_t* tmp, int64_t tstride) {
  const in_t* rq[K > 0 ? K : 1];
  for (int64_t q = 0; q < width; ++q) {
    for (int u = 0; u < K; ++u) rq[u] = rows[u] + q * row_stride;
    vpass_fixed<K>(rq, w, cb, tmp + q * tstride);
  }
}

template <typename in_t, typename acc_t>
inline void vpass_block(const in_t* const* rows, const acc_t* w, int k, int64_t width, int64_t row_stride,
                        int64_t cstride, int64_t cb, acc_t* tmp, int64_t tstride) {
  if (cstride == 1 && row_stride == cb && tstride == cb) {  // whole rows are contiguous: one long vector
    return vpass(rows, w, k, width * cb, 1, tmp);
  }
  if (cstride == 1) {
    switch (k) {
      case 0: return vpass_block_fixed<0>(rows, w, width, row_stride, cb, tmp, tstride);
      case 1: return vpass_block_fixed<1>(rows, w, width, row_stride, cb, tmp, tstride);
      case 2: return vpass_block_fixed<2>(rows, w, width, row_stride, cb, tmp, tstride);
      case 3: return vpass_block_fixed<3>(rows, w, width, row_stride, cb, tmp, tstride);
      case 4: return vpass_block_fixed<4>(rows, w, width, row_stride, cb, tmp, tstride);
      case 5: return vpass_block_fixed<5>(rows, w, width, row_stride, cb, tmp, tstride);
      case 6: return vpass_block_fixed<6>(rows, w, width, row_stride, cb, tmp, tstride);
      case 7: return vpass_block_fixed<7>(rows, w, width, row_stride, cb, tmp, tstride);
      default: break;
    }
  }
  const in_t* rq[kMaxTaps];
  for (int64_t q = 0; q < width; ++q) {
    for (int u = 0; u < k; ++u) rq[u] = rows[u] + q * row_stride;
    vpass_any(rq, w, k, cb, cstride, tmp + q * tstride);
  }
}

// ------------------------------------------------------------------------------------------------
// Horizontal pass
// ------------------------------------------------------------------------------------------------

// Planar gather over rows [j0, j1) of the table: out[j * ostride] = sum_v w[j,v] * tmp[idx[j,v]].
template <int K, typename acc_t, typename out_t>
inline void hpass_gather_fixed(const acc_t* tmp, const int32_t* idx, const acc_t* w, int64_t j0, int64_t j1,
                               out_t* out, int64_t ostride) {
  for (int64_t j = j0; j < j1; ++j) {
    const int32_t* ij = idx + j * K;
    const acc_t* wj = w + j * K;
    acc_t s = wj[0] * tmp[ij[0]];
    for (int v = 1; v < K; ++v) s += wj[v] * tmp[ij[v]];
    out[j * ostride] = from_acc<out_t>(s);
  }
}

template <typename acc_t, typename out_t>
inline void hpass_gather_any(const acc_t* tmp, const int32_t* idx, const acc_t* w, int k, int64_t j0, int64_t j1,
                             out_t* out, int64_t ostride) {
  for (int64_t j = j0; j < j1; ++j) {
    const int32_t* ij = idx + j * k;
    const acc_t* wj = w + j * k;
    acc_t s = wj[0] * tmp[ij[0]];
    for (int v = 1; v < k; ++v) s += wj[v] * tmp[ij[v]];
    out[j * ostride] = from_acc<out_t>(s);
  }
}

// Periodic run: out[P*m + f] = sum_{v < K_f} w[f][v] * src[D*m + off[f][v]], m < nm, f < P, with K_0 = K0 and
// K_1 = K1 (P = 2); off and w have rows of max(K0, K1) slots.
template <int P, int D, int K0, int K1, typename acc_t>
inline void hpass_periodic_fixed(const acc_t* src, const int32_t* off, const acc_t* w, int64_t nm,
                                 acc_t* __restrict out) {
  constexpr int KW = K0 > K1 ? K0 : K1;
  constexpr int KF[2] = {K0, K1};
  int32_t o[P][KW] = {};
  acc_t wk[P][KW] = {};
  for (int f = 0; f < P; ++f) {
    for (int v = 0; v < KF[f]; ++v) {
      o[f][v] = off[f * KW + v];
      wk[f][v] = w[f * KW + v];
    }
  }
#pragma GCC ivdep
  for (int64_t m = 0; m < nm; ++m) {
    for (int f = 0; f < P; ++f) {
      acc_t s = wk[f][0] * src[D * m + o[f][0]];
      for (int v = 1; v < KF[f]; ++v) s += wk[f][v] * src[D * m + o[f][v]];
      out[P * m + f] = s;
    }
  }
}

template <int D, typename acc_t>
inline void hpass_periodic_p1(const acc_t* src, const Table<acc_t>& t, acc_t* out) {
  const int32_t* off = t.per_off.data();
  const acc_t* w = t.per_w.data();
  const int64_t nm = t.per_periods;
  switch (t.per_count[0]) {
    case 1: return hpass_periodic_fixed<1, D, 1, 1>(src, off, w, nm, out);
    case 2: return hpass_periodic_fixed<1, D, 2, 2>(src, off, w, nm, out);
    case 3: return hpass_periodic_fixed<1, D, 3, 3>(src, off, w, nm, out);
    case 4: return hpass_periodic_fixed<1, D, 4, 4>(src, off, w, nm, out);
    case 5: return hpass_periodic_fixed<1, D, 5, 5>(src, off, w, nm, out);
    case 6: return hpass_periodic_fixed<1, D, 6, 6>(src, off, w, nm, out);
    case 7: return hpass_periodic_fixed<1, D, 7, 7>(src, off, w, nm, out);
    default: break;
  }
  TORCH_INTERNAL_ASSERT(false, "blurpool_cpu: unsupported periodic run");
}

// P = 2, D = 1 (adjoint tables of stride 2): the phase counts periodic_supported admits.
template <typename acc_t>
inline void hpass_periodic_p2(const acc_t* src, const Table<acc_t>& t, acc_t* out) {
  const int32_t* off = t.per_off.data();
  const acc_t* w = t.per_w.data();
  const int64_t nm = t.per_periods;
  switch (t.per_count[0] * 8 + t.per_count[1]) {
    case 1 * 8 + 1: return hpass_periodic_fixed<2, 1, 1, 1>(src, off, w, nm, out);
    case 2 * 8 + 2: return hpass_periodic_fixed<2, 1, 2, 2>(src, off, w, nm, out);
    case 3 * 8 + 3: return hpass_periodic_fixed<2, 1, 3, 3>(src, off, w, nm, out);
    case 4 * 8 + 4: return hpass_periodic_fixed<2, 1, 4, 4>(src, off, w, nm, out);
    case 1 * 8 + 2: return hpass_periodic_fixed<2, 1, 1, 2>(src, off, w, nm, out);
    case 2 * 8 + 1: return hpass_periodic_fixed<2, 1, 2, 1>(src, off, w, nm, out);
    case 2 * 8 + 3: return hpass_periodic_fixed<2, 1, 2, 3>(src, off, w, nm, out);
    case 3 * 8 + 2: return hpass_periodic_fixed<2, 1, 3, 2>(src, off, w, nm, out);
    case 3 * 8 + 4: return hpass_periodic_fixed<2, 1, 3, 4>(src, off, w, nm, out);
    case 4 * 8 + 3: return hpass_periodic_fixed<2, 1, 4, 3>(src, off, w, nm, out);
    default: break;
  }
  TORCH_INTERNAL_ASSERT(false, "blurpool_cpu: unsupported periodic run");
}

// Writes rows [per_begin, per_begin + P * per_periods) of the horizontal pass into out (unit stride).
template <typename acc_t>
inline void hpass_periodic(const acc_t* tmp, const Table<acc_t>& t, acc_t* out) {
  const acc_t* src = tmp + t.per_base;
  acc_t* o = out + t.per_begin;
  switch (t.per_P) {
    case 1:
      switch (t.per_D) {
        case 1: return hpass_periodic_p1<1>(src, t, o);
        case 2: return hpass_periodic_p1<2>(src, t, o);
        default: break;
      }
      break;
    case 2: return hpass_periodic_p2(src, t, o);
    default: break;
  }
  TORCH_INTERNAL_ASSERT(false, "blurpool_cpu: unsupported periodic run");
}

template <typename acc_t, typename out_t>
inline void hpass_gather(const acc_t* tmp, const Table<acc_t>& t, int64_t j0, int64_t j1, out_t* out,
                         int64_t ostride) {
  if (j0 >= j1) return;
  const int32_t* idx = t.idx.data();
  const acc_t* w = t.w.data();
  switch (t.width) {
    case 1: return hpass_gather_fixed<1>(tmp, idx, w, j0, j1, out, ostride);
    case 2: return hpass_gather_fixed<2>(tmp, idx, w, j0, j1, out, ostride);
    case 3: return hpass_gather_fixed<3>(tmp, idx, w, j0, j1, out, ostride);
    case 4: return hpass_gather_fixed<4>(tmp, idx, w, j0, j1, out, ostride);
    case 5: return hpass_gather_fixed<5>(tmp, idx, w, j0, j1, out, ostride);
    case 6: return hpass_gather_fixed<6>(tmp, idx, w, j0, j1, out, ostride);
    case 7: return hpass_gather_fixed<7>(tmp, idx, w, j0, j1, out, ostride);
    default: return hpass_gather_any(tmp, idx, w, t.width, j0, j1, out, ostride);
  }
}

// Planar horizontal pass of one row: out[j * ostride] for j < t.rows. tmp[zero slot] must be 0.
// The periodic run is computed into a unit-stride acc_t row: out itself when it is one, else
// rowbuf (t.rows elements), which is then converted and stored with the output's stride.
template <typename acc_t, typename out_t>
inline void hpass_planar(const acc_t* tmp, const Table<acc_t>& t, out_t* out, int64_t ostride, acc_t* rowbuf) {
  if (t.per_periods == 0) {
    hpass_gather(tmp, t, 0, t.rows, out, ostride);
    return;
  }
  const int64_t jb = t.per_begin, je = t.per_begin + t.per_P * t.per_periods;
  if constexpr (std::is_same_v<out_t, acc_t>) {
    if (ostride == 1) {
      hpass_periodic(tmp, t, out);
      hpass_gather(tmp, t, 0, jb, out, ostride);
      hpass_gather(tmp, t, je, t.rows, out, ostride);
      return;
    }
  }
  hpass_periodic(tmp, t, rowbuf);
  if (ostride == 1) {
    for (int64_t j = jb; j < je; ++j) out[j] = from_acc<out_t>(rowbuf[j]);
  } else {
    for (int64_t j = jb; j < je; ++j) out[j * ostride] = from_acc<out_t>(rowbuf[j]);
  }
  hpass_gather(tmp, t, 0, jb, out, ostride);
  hpass_gather(tmp, t, je, t.rows, out, ostride);
}

// Channels horizontal pass of one row: out[j * osw + c * osc] = sum_v w[j,v] * tmp[sidx[j,v] + c],
// c < cb, where sidx = idx * tstride (precomputed).
template <int K, typename acc_t, typename out_t>
inline void hpass_channels_fixed(const acc_t* tmp, const int64_t* sidx, const acc_t* w, int64_t nj, int64_t cb,
                                 out_t* out, int64_t osw, int64_t osc) {
  for (int64_t j = 0; j < nj; ++j) {
    const acc_t* p[K];
    acc_t wk[K];
    for (int v = 0; v < K; ++v) {
      p[v] = tmp + sidx[j * K + v];
      wk[v] = w[j * K + v];
    }
    out_t* o = out + j * osw;
    if (osc == 1) {
#pragma GCC ivdep
      for (int64_t c = 0; c < cb; ++c) {
        acc_t s = wk[0] * p[0][c];
        for (int v = 1; v < K; ++v) s += wk[v] * p[v][c];
        o[c] = from_acc<out_t>(s);
      }
    } else {
      for (int64_t c = 0; c < cb; ++c) {
        acc_t s = wk[0] * p[0][c];
        for (int v = 1; v < K; ++v) s += wk[v] * p[v][c];
        o[c * osc] = from_acc<out_t>(s);
      }
    }
  }
}

template <typename acc_t, typename out_t>
inline void hpass_channels_any(const acc_t* tmp, const int64_t* sidx, const acc_t* w, int k, int64_t nj,
                               int64_t cb, out_t* out, int64_t osw, int64_t osc, acc_t* acc) {
  for (int64_t j = 0; j < nj; ++j) {
    for (int64_t c = 0; c < cb; ++c) acc[c] = w[j * k] * tmp[sidx[j * k] + c];
    for (int v = 1; v < k; ++v) {
      const acc_t* p = tmp + sidx[j * k + v];
      const acc_t wv = w[j * k + v];
      for (int64_t c = 0; c < cb; ++c) acc[c] += wv * p[c];
    }
    out_t* o = out + j * osw;
    for (int64_t c = 0; c < cb; ++c) o[c * osc] = from_acc<out_t>(acc[c]);
  }
}

template <typename acc_t, typename out_t>
inline void hpass_channels(const acc_t* tmp, const Table<acc_t>& t, const int64_t* sidx, int64_t cb, out_t* out,
                           int64_t osw, int64_t osc, acc_t* acc) {
  const acc_t* w = t.w.data();
  const int64_t nj = t.rows;
  switch (t.width) {
    case 1: return hpass_channels_fixed<1>(tmp, sidx, w, nj, cb, out, osw, osc);
    case 2: return hpass_channels_fixed<2>(tmp, sidx, w, nj, cb, out, osw, osc);
    case 3: return hpass_channels_fixed<3>(tmp, sidx, w, nj, cb, out, osw, osc);
    case 4: return hpass_channels_fixed<4>(tmp, sidx, w, nj, cb, out, osw, osc);
    case 5: return hpass_channels_fixed<5>(tmp, sidx, w, nj, cb, out, osw, osc);
    case 6: return hpass_channels_fixed<6>(tmp, sidx, w, nj, cb, out, osw, osc);
    case 7: return hpass_channels_fixed<7>(tmp, sidx, w, nj, cb, out, osw, osc);
    default: return hpass_channels_any(tmp, sidx, w, t.width, nj, cb, out, osw, osc, acc);
  }
}

// ------------------------------------------------------------------------------------------------
// One blurred output row from an arbitrary source of rows
// ------------------------------------------------------------------------------------------------

// Planar: `row_ptr(r)` returns the W-vector of source row r (element stride in_stride).
// tmp holds src_w + 1 + ct.rows elements, tmp[src_w] == 0 (the rest is scratch for the horizontal
// pass). Output: out[j * ostride], j < ct.rows.
template <typename in_t, typename acc_t, typename out_t, typename RowPtr>
inline void blur_row_planar(RowPtr&& row_ptr, int64_t in_stride, int64_t src_w, const Table<acc_t>& rt, int64_t i,
                            const Table<acc_t>& ct, acc_t* tmp, out_t* out, int64_t ostride) {
  const int k = rt.count[i];
  const int32_t* ri = rt.idx.data() + i * rt.width;
  const in_t* rows[kMaxTaps] = {};
  for (int u = 0; u < k; ++u) rows[u] = row_ptr(static_cast<int64_t>(ri[u]));
  vpass(rows, rt.w.data() + i * rt.width, k, src_w, in_stride, tmp);
  hpass_planar(tmp, ct, out, ostride, tmp + src_w + 1);
}

// Channels: `row_ptr(r)` returns the (src_w, cb) block of source row r: element (q, c) at
// q * in_stride + c * in_cstride. tmp holds (src_w + 1) * tstride elements, the last tstride zero.
template <typename in_t, typename acc_t, typename out_t, typename RowPtr>
inline void blur_row_channels(RowPtr&& row_ptr, int64_t in_stride, int64_t in_cstride, int64_t src_w, int64_t cb,
                              const Table<acc_t>& rt, int64_t i, const Table<acc_t>& ct, const int64_t* sidx,
                              acc_t* tmp, int64_t tstride, out_t* out, int64_t osw, int64_t osc, acc_t* acc) {
  const int k = rt.count[i];
  const int32_t* ri = rt.idx.data() + i * rt.width;
  const in_t* rows[kMaxTaps] = {};
  for (int u = 0; u < k; ++u) rows[u] = row_ptr(static_cast<int64_t>(ri[u]));
  vpass_block(rows, rt.w.data() + i * rt.width, k, src_w, in_stride, in_cstride, cb, tmp, tstride);
  hpass_channels(tmp, ct, sidx, cb, out, osw, osc, acc);
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

// A tiny LRU cache of computed source rows, keyed by an int64. With at least (taps per task + 1)
// slots, the rows fetched for the current task are never evicted while it runs.
template <typename acc_t>
struct RowCache {
  int64_t row_len;
  int slots;
  std::vector<acc_t> buf;
  std::vector<int64_t> keys;
  std::vector<int64_t> stamps;
  int64_t clock = 0;

  RowCache(int64_t row_len_, int slots_)
      : row_len(row_len_),
        slots(slots_),
        buf(static_cast<size_t>(std::max<int64_t>(row_len_, 1) * slots_)),
        keys(static_cast<size_t>(slots_), -1),
        stamps(static_cast<size_t>(slots_), -1) {}

  template <typename Fill>
  acc_t* get(int64_t key, Fill&& fill) {
    ++clock;
    int victim = 0;
    for (int s = 0; s < slots; ++s) {
      if (keys[s] == key) {
        stamps[s] = clock;
        return buf.data() + s * row_len;
      }
      if (stamps[s] < stamps[victim]) victim = s;
    }
    keys[victim] = key;
    stamps[victim] = clock;
    acc_t* p = buf.data() + victim * row_len;
    fill(p);
    return p;
  }
};

// Channel block of the channels layout: the whole C when the row buffers fit the budget, otherwise
// the fewest near-equal blocks (multiples of 16) that fit; more blocks when there would be too few
// tasks to keep every thread busy. elem_size: bytes per (position, channel) of all row buffers.
int64_t channel_block(int64_t C, int64_t width, int64_t elem_size, int64_t outer_tasks) {
  const int64_t budget = kChannelsBufferBytes;
  const int64_t per_c = (width + 1) * elem_size;
  const int64_t threads = at::get_num_threads();
  int64_t nblk = std::max<int64_t>(1, (C * per_c + budget - 1) / budget);
  while (outer_tasks * nblk < 4 * threads && (C + nblk) / (nblk + 1) >= 16) ++nblk;
  int64_t cb = (C + nblk - 1) / nblk;
  if (cb < C) cb = std::min(C, (cb + 15) / 16 * 16);
  return cb;
}

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1));
}

// The channels layout is used when the big tensor of a gather (src or dst) has contiguous channels
// and the other one does not contradict it (a plane-contiguous partner keeps the planar layout).
bool use_channels_layout(const Tensor& src, const Tensor& dst) {
  if (src.size(1) <= 1) return false;
  if (src.stride(1) == 1) return true;
  return dst.stride(1) == 1 && src.stride(3) != 1;
}

template <typename acc_t>
std::vector<int64_t> scaled_index(const Table<acc_t>& t, int64_t scale) {
  std::vector<int64_t> s(t.idx.size());
  for (size_t e = 0; e < s.size(); ++e) s[e] = static_cast<int64_t>(t.idx[e]) * scale;
  return s;
}

// ------------------------------------------------------------------------------------------------
// Instruction-set variants and page advice
// ------------------------------------------------------------------------------------------------

// The work functions have AVX2+FMA clones for every dtype (csrc/common/cpu_isa.h).

// Outputs are usually fresh allocations that these kernels touch first. On Linux, advising
// transparent huge pages for a large output before that first touch replaces thousands of 4 KiB
// page faults by a few 2 MiB ones, which is most of the cost of writing a fresh 50 MB gradient in
// a VM. Only whole 2 MiB pages inside the tensor's own extent are advised. KTK_CPU_HUGEPAGES=0
// turns this off.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* e = std::getenv("KTK_CPU_HUGEPAGES");
    return !(e != nullptr && std::strcmp(e, "0") == 0);
  }();
  if (!enabled) return;
  int64_t extent = 1;  // elements from the first to the last one, inclusive
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0 || t.stride(d) < 0) return;
    extent += (t.size(d) - 1) * t.stride(d);
  }
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = static_cast<uintptr_t>(extent) * static_cast<uintptr_t>(t.element_size());
  if (bytes < 8 * kHuge) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (first + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (first + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// ------------------------------------------------------------------------------------------------
// blur_gather_
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct GatherArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  int64_t C, W, Ho, Wo;
  int64_t sN, sC, sH, sW;
  int64_t oN, oC, oH, oW;
  const Table<acc_t>* rt;
  const Table<acc_t>* ct;
  int64_t cb_max, nblk;    // channels layout: channel block and blocks per image
  const int64_t* sidx;     // channels layout: col indices scaled by cb_max
};

// Tasks (n, c, i).
template <typename scalar_t>
void gather_planar_chunk(const GatherArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> tmp(static_cast<size_t>(a.W + 1 + a.Wo), acc_t(0));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t i = t % a.Ho;
    const int64_t p = t / a.Ho;
    const int64_t c = p % a.C, n = p / a.C;
    const scalar_t* base = a.x + n * a.sN + c * a.sC;
    const int64_t sH = a.sH;
    blur_row_planar<scalar_t>([&](int64_t r) { return base + r * sH; }, a.sW, a.W, *a.rt, i, *a.ct, tmp.data(),
                              a.out + n * a.oN + c * a.oC + i * a.oH, a.oW);
  }
}

// Tasks (n, channel block, i).
template <typename scalar_t>
void gather_channels_chunk(const GatherArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cb_max = a.cb_max;
  std::vector<acc_t> tmp(static_cast<size_t>((a.W + 1) * cb_max), acc_t(0));
  std::vector<acc_t> acc(static_cast<size_t>(cb_max));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t i = t % a.Ho;
    const int64_t nb = t / a.Ho;
    const int64_t b = nb % a.nblk, n = nb / a.nblk;
    const int64_t c0 = b * cb_max, cb = std::min(cb_max, a.C - c0);
    const scalar_t* base = a.x + n * a.sN + c0 * a.sC;
    const int64_t sH = a.sH;
    blur_row_channels<scalar_t>([&](int64_t r) { return base + r * sH; }, a.sW, a.sC, a.W, cb, *a.rt, i, *a.ct,
                                a.sidx, tmp.data(), cb_max, a.out + n * a.oN + c0 * a.oC + i * a.oH, a.oW, a.oC,
                                acc.data());
  }
}

KTK_DEFINE_RUNNER(gather_planar_chunk, GatherArgs)
KTK_DEFINE_RUNNER(gather_channels_chunk, GatherArgs)

template <typename scalar_t>
void blur_gather_kernel(const Tensor& x, const Tensor& row_idx, const Tensor& row_w, const Tensor& col_idx,
                        const Tensor& col_w, const Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = out.size(2), Wo = out.size(3);
  const Table<acc_t> rt = compact_table<acc_t>(row_idx, row_w, H, 0, "blur_gather_: row table");
  const Table<acc_t> ct = compact_table<acc_t>(col_idx, col_w, W, static_cast<int32_t>(W), "blur_gather_: col table");
  if (out.numel() == 0) return;
  advise_huge_pages(out);

  GatherArgs<scalar_t> a{x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), C, W, Ho, Wo,
                         x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                         out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                         &rt, &ct, 1, 1, nullptr};
  if (use_channels_layout(x, out)) {
    a.cb_max = channel_block(C, W, sizeof(acc_t), N * Ho);
    a.nblk = (C + a.cb_max - 1) / a.cb_max;
    const std::vector<int64_t> sidx = scaled_index(ct, a.cb_max);
    a.sidx = sidx.data();
    const int64_t work = (W * rt.width + Wo * ct.width) * a.cb_max;
    at::parallel_for(0, N * a.nblk * Ho, grain_for(work),
                     [&](int64_t begin, int64_t end) { gather_channels_chunk_run<scalar_t>(a, begin, end); });
  } else {
    const int64_t work = W * rt.width + Wo * ct.width;
    at::parallel_for(0, N * C * Ho, grain_for(work),
                     [&](int64_t begin, int64_t end) { gather_planar_chunk_run<scalar_t>(a, begin, end); });
  }
}

// ------------------------------------------------------------------------------------------------
// Max map rows
// ------------------------------------------------------------------------------------------------

// One pass over n running maxima whose whole KMAX x KMAX window is in range: element j's window element (a, b)
// is src[a * sH + b * sW + j] (planar: j a column, sW = 1; channels: j a channel, sW the column stride). Each max
// and its code are formed in registers, as the passes of fold_window_element would form them, instead of
// re-reading and re-writing both once per window element. KMAX is a compile-time constant so the window unrolls
// and the j loop vectorises; blocks of kBlock elements, the last one shifted left to end at n (the elements it
// repeats get the same values again), so no scalar tail runs once n >= kBlock.
template <int KMAX, bool kCodes, typename scalar_t, typename acc_t, typename code_t>
inline void max_window_scan(const scalar_t* __restrict src, int64_t sH, int64_t sW, int64_t n, acc_t* __restrict best,
                            code_t* __restrict code) {
  constexpr int64_t kBlock = 16;
  auto block = [&](int64_t j0, int64_t len) {
    // No run-time alias checks: with 9 window rows and 2 outputs there are more than GCC versions a loop for
    // (10), and the kmax-3 channels_last scan then ran scalar, 11x slower.
#pragma GCC ivdep
    for (int64_t j = j0; j < j0 + len; ++j) {
      acc_t b = to_acc<acc_t>(src[j]);
      code_t cv = code_t(0);
      // One flat loop, fully unrolled before the vectoriser runs (two nested ones were not, for bf16).
#pragma GCC unroll 16
      for (int e = 1; e < KMAX * KMAX; ++e) {
        const acc_t v = to_acc<acc_t>(src[(e / KMAX) * sH + (e % KMAX) * sW + j]);
        const bool take = takes_max(v, b);
        b = take ? v : b;
        if constexpr (kCodes) cv = take ? static_cast<code_t>(e) : cv;
      }
      best[j] = b;
      if constexpr (kCodes) code[j] = cv;
    }
  };
  if (n < kBlock) return block(0, n);
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) block(std::min(j0, n - kBlock), kBlock);
}

// max_window_scan for a run-time kmax of 2 or 3 (the stems' windows); false for other sizes.
template <typename scalar_t, typename acc_t, typename code_t>
inline bool max_window_scan_any(int kmax, bool with_codes, const scalar_t* src, int64_t sH, int64_t sW, int64_t n,
                                acc_t* best, code_t* code) {
  if (kmax == 2) {
    with_codes ? max_window_scan<2, true>(src, sH, sW, n, best, code)
               : max_window_scan<2, false>(src, sH, sW, n, best, code);
    return true;
  }
  if (kmax == 3) {
    with_codes ? max_window_scan<3, true>(src, sH, sW, n, best, code)
               : max_window_scan<3, false>(src, sH, sW, n, best, code);
    return true;
  }
  return false;
}

// Planar: m[c'] = max over the window of max-map element (r, c'), c' < Wm, for the plane at xp.
// codes (if not null) receives a*kmax+b at codes[c' * code_stride]. code_tmp: Wm scratch elements.
// Columns whose window lies inside the row run as a vectorised scan (unit stride); the others, and
// every column when the row is strided, take the scalar scan.
template <typename scalar_t, typename acc_t>
void max_row_planar(const scalar_t* xp, int64_t sH, int64_t sW, int64_t H, int64_t W, int kmax, int pmax, int64_t r,
                    int64_t Wm, acc_t* m, uint8_t* codes, int64_t code_stride, acc_t* code_tmp) {
  const int a_lo = static_cast<int>(std::max<int64_t>(0, pmax - r));
  const int a_hi = static_cast<int>(std::min<int64_t>(kmax, H + pmax - r));
  auto scalar_column = [&](int64_t c) {
    const int b_lo = static_cast<int>(std::max<int64_t>(0, pmax - c));
    const int b_hi = static_cast<int>(std::min<int64_t>(kmax, W + pmax - c));
    // Offset of window element (0, 0); only in-range elements (a, b) are ever addressed.
    const int64_t win = (r - pmax) * sH + (c - pmax) * sW;
    acc_t best = to_acc<acc_t>(xp[win + a_lo * sH + b_lo * sW]);
    int code = a_lo * kmax + b_lo;
    for (int a = a_lo; a < a_hi; ++a) {
      for (int b = (a == a_lo ? b_lo + 1 : b_lo); b < b_hi; ++b) {
        const acc_t v = to_acc<acc_t>(xp[win + a * sH + b * sW]);
        if (takes_max(v, best)) {
          best = v;
          code = a * kmax + b;
        }
      }
    }
    m[c] = best;
    if (codes) codes[c * code_stride] = static_cast<uint8_t>(code);
  };
  // Interior columns: c - pmax >= 0 and c - pmax + kmax - 1 < W.
  const int64_t c_lo = std::min<int64_t>(pmax, Wm);
  const int64_t c_hi = std::max<int64_t>(c_lo, std::min<int64_t>(Wm, W + pmax - kmax + 1));
  if (sW != 1) {
    for (int64_t c = 0; c < Wm; ++c) scalar_column(c);
    return;
  }
  for (int64_t c = 0; c < c_lo; ++c) scalar_column(c);
  const int64_t n = c_hi - c_lo;
  const int64_t base = (r - pmax) * sH + (c_lo - pmax);
  const bool full_window = a_lo == 0 && a_hi == kmax;
  if (n > 0 && full_window &&
      max_window_scan_any(kmax, codes != nullptr, xp + base, sH, int64_t(1), n, m + c_lo, code_tmp + c_lo)) {
    if (codes) {
      uint8_t* cp = codes + c_lo * code_stride;
      for (int64_t j = 0; j < n; ++j) cp[j * code_stride] = static_cast<uint8_t>(code_tmp[c_lo + j]);
    }
  } else if (n > 0) {
    acc_t* __restrict best = m + c_lo;
    acc_t* __restrict code = code_tmp + c_lo;
    {
      const scalar_t* src = xp + (base + a_lo * sH);
      const acc_t c0 = static_cast<acc_t>(a_lo * kmax);
      for (int64_t j = 0; j < n; ++j) {
        best[j] = to_acc<acc_t>(src[j]);
        code[j] = c0;
      }
    }
    for (int a = a_lo; a < a_hi; ++a) {
      for (int b = (a == a_lo ? 1 : 0); b < kmax; ++b) {
        fold_window_element(xp + (base + a * sH + b), n, static_cast<acc_t>(a * kmax + b), best, code);
      }
    }
    if (codes) {
      uint8_t* cp = codes + c_lo * code_stride;
      for (int64_t j = 0; j < n; ++j) cp[j * code_stride] = static_cast<uint8_t>(code[j]);
    }
  }
  for (int64_t c = c_hi; c < Wm; ++c) scalar_column(c);
}

// Channels: m[c' * tstride + c] for c' < Wm, c < cb; xp points at channel c0 of image n (unit
// channel stride). codes (if not null) receives code at codes[c' * code_sw + c * code_sc].
template <typename scalar_t, typename acc_t>
void max_row_channels(const scalar_t* xp, int64_t sH, int64_t sW, int64_t H, int64_t W, int kmax, int pmax,
                      int64_t r, int64_t Wm, int64_t cb, acc_t* m, int64_t tstride, uint8_t* codes, int64_t code_sw,
                      int64_t code_sc, acc_t* code_buf) {
  const int a_lo = static_cast<int>(std::max<int64_t>(0, pmax - r));
  const int a_hi = static_cast<int>(std::min<int64_t>(kmax, H + pmax - r));
  for (int64_t c = 0; c < Wm; ++c) {
    const int b_lo = static_cast<int>(std::max<int64_t>(0, pmax - c));
    const int b_hi = static_cast<int>(std::min<int64_t>(kmax, W + pmax - c));
    const int64_t win = (r - pmax) * sH + (c - pmax) * sW;  // offset of window element (0, 0)
    acc_t* __restrict best = m + c * tstride;
    acc_t* __restrict code = code_buf;
    const bool full_window = a_lo == 0 && a_hi == kmax && b_lo == 0 && b_hi == kmax;
    if (!full_window || !max_window_scan_any(kmax, codes != nullptr, xp + win, sH, sW, cb, best, code)) {
      const scalar_t* src = xp + (win + a_lo * sH + b_lo * sW);
      const acc_t c0 = static_cast<acc_t>(a_lo * kmax + b_lo);
      for (int64_t ch = 0; ch < cb; ++ch) {
        best[ch] = to_acc<acc_t>(src[ch]);
        code[ch] = c0;
      }
      for (int a = a_lo; a < a_hi; ++a) {
        for (int b = (a == a_lo ? b_lo + 1 : b_lo); b < b_hi; ++b) {
          fold_window_element(xp + (win + a * sH + b * sW), cb, static_cast<acc_t>(a * kmax + b), best, code);
        }
      }
    }
    if (codes) {
      uint8_t* cp = codes + c * code_sw;
      for (int64_t ch = 0; ch < cb; ++ch) cp[ch * code_sc] = static_cast<uint8_t>(code[ch]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// max_blur_forward_
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct MaxFwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  uint8_t* codes;
  int64_t C, H, W, Hm, Wm, Ho, Wo;
  int kmax, pmax;
  int64_t sN, sC, sH, sW;
  int64_t oN, oC, oH, oW;
  int64_t kN, kC, kH, kW;
  const Table<acc_t>* rt;
  const Table<acc_t>* ct;
  const int64_t* owner;    // first output row reading each max-map row, or -1
  const int64_t* orphans;  // max-map rows no output row reads
  int64_t n_orphans;
  int64_t cb_max, nblk;
  const int64_t* sidx;
};

// Tasks (n, c, i); max-map rows of plane (n, c) come from a per-chunk row cache. A chunk writes the
// codes of a max-map row iff it holds the row's owner task (the first task that reads it).
template <typename scalar_t>
void maxfwd_planar_chunk(const MaxFwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> tmp(static_cast<size_t>(a.Wm + 1 + a.Wo), acc_t(0));
  std::vector<acc_t> code_tmp(static_cast<size_t>(a.Wm));
  RowCache<acc_t> cache(a.Wm, a.rt->width + 1);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t i = t % a.Ho;
    const int64_t p = t / a.Ho;
    const int64_t c = p % a.C, n = p / a.C;
    const scalar_t* base = a.x + n * a.sN + c * a.sC;
    auto row_ptr = [&](int64_t r) -> const acc_t* {
      return cache.get(p * a.Hm + r, [&](acc_t* m) {
        const int64_t owner_task = p * a.Ho + a.owner[r];
        uint8_t* cp = (a.codes && owner_task >= begin && owner_task < end) ? a.codes + n * a.kN + c * a.kC + r * a.kH
                                                                          : nullptr;
        max_row_planar(base, a.sH, a.sW, a.H, a.W, a.kmax, a.pmax, r, a.Wm, m, cp, a.kW, code_tmp.data());
      });
    };
    blur_row_planar<acc_t>(row_ptr, 1, a.Wm, *a.rt, i, *a.ct, tmp.data(), a.out + n * a.oN + c * a.oC + i * a.oH,
                           a.oW);
  }
}

// Tasks (n, channel block, i); same ownership rule per channel block.
template <typename scalar_t>
void maxfwd_channels_chunk(const MaxFwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cb_max = a.cb_max;
  std::vector<acc_t> tmp(static_cast<size_t>((a.Wm + 1) * cb_max), acc_t(0));
  std::vector<acc_t> acc(static_cast<size_t>(cb_max));
  std::vector<acc_t> code_buf(static_cast<size_t>(cb_max));
  RowCache<acc_t> cache(a.Wm * cb_max, a.rt->width + 1);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t i = t % a.Ho;
    const int64_t nb = t / a.Ho;
    const int64_t b = nb % a.nblk, n = nb / a.nblk;
    const int64_t c0 = b * cb_max, cb = std::min(cb_max, a.C - c0);
    const scalar_t* base = a.x + n * a.sN + c0 * a.sC;
    auto row_ptr = [&](int64_t r) -> const acc_t* {
      return cache.get(nb * a.Hm + r, [&](acc_t* m) {
        const int64_t owner_task = nb * a.Ho + a.owner[r];
        uint8_t* cp = (a.codes && owner_task >= begin && owner_task < end) ? a.codes + n * a.kN + c0 * a.kC + r * a.kH
                                                                          : nullptr;
        max_row_channels(base, a.sH, a.sW, a.H, a.W, a.kmax, a.pmax, r, a.Wm, cb, m, cb_max, cp, a.kW, a.kC,
                         code_buf.data());
      });
    };
    blur_row_channels<acc_t>(row_ptr, cb_max, int64_t(1), a.Wm, cb, *a.rt, i, *a.ct, a.sidx, tmp.data(), cb_max,
                             a.out + n * a.oN + c0 * a.oC + i * a.oH, a.oW, a.oC, acc.data());
  }
}

// Codes of the max-map rows that no output row reads. Tasks (n, c, orphan).
template <typename scalar_t>
void maxcodes_planar_chunk(const MaxFwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> m(static_cast<size_t>(a.Wm));
  std::vector<acc_t> code_tmp(static_cast<size_t>(a.Wm));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t r = a.orphans[t % a.n_orphans];
    const int64_t p = t / a.n_orphans;
    const int64_t c = p % a.C, n = p / a.C;
    max_row_planar(a.x + n * a.sN + c * a.sC, a.sH, a.sW, a.H, a.W, a.kmax, a.pmax, r, a.Wm, m.data(),
                   a.codes + n * a.kN + c * a.kC + r * a.kH, a.kW, code_tmp.data());
  }
}

// Tasks (n, channel block, orphan).
template <typename scalar_t>
void maxcodes_channels_chunk(const MaxFwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cb_max = a.cb_max;
  std::vector<acc_t> m(static_cast<size_t>(a.Wm * cb_max));
  std::vector<acc_t> code_buf(static_cast<size_t>(cb_max));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t r = a.orphans[t % a.n_orphans];
    const int64_t nb = t / a.n_orphans;
    const int64_t b = nb % a.nblk, n = nb / a.nblk;
    const int64_t c0 = b * cb_max, cb = std::min(cb_max, a.C - c0);
    max_row_channels(a.x + n * a.sN + c0 * a.sC, a.sH, a.sW, a.H, a.W, a.kmax, a.pmax, r, a.Wm, cb, m.data(),
                     cb_max, a.codes + n * a.kN + c0 * a.kC + r * a.kH, a.kW, a.kC, code_buf.data());
  }
}

KTK_DEFINE_RUNNER(maxfwd_planar_chunk, MaxFwdArgs)
KTK_DEFINE_RUNNER(maxfwd_channels_chunk, MaxFwdArgs)
KTK_DEFINE_RUNNER(maxcodes_planar_chunk, MaxFwdArgs)
KTK_DEFINE_RUNNER(maxcodes_channels_chunk, MaxFwdArgs)

// (Hm, Wm): the max map's size. codes undefined: no backward to come, so no codes are formed or written (and the
// rows no output reads are not visited).
template <typename scalar_t>
void max_blur_forward_kernel(const Tensor& x, int kmax, int pmax, int64_t Hm, int64_t Wm, const Tensor& row_idx,
                             const Tensor& row_w, const Tensor& col_idx, const Tensor& col_w, const Tensor& out,
                             const Tensor& codes) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool with_codes = codes.defined();
  const int64_t Ho = out.size(2), Wo = out.size(3);
  const Table<acc_t> rt = compact_table<acc_t>(row_idx, row_w, Hm, 0, "max_blur_forward_: row table");
  const Table<acc_t> ct =
      compact_table<acc_t>(col_idx, col_w, Wm, static_cast<int32_t>(Wm), "max_blur_forward_: col table");
  if (N == 0 || C == 0) return;
  if (Hm == 0 || Wm == 0) {
    // Empty max map: only all-zero tables pass the checks above, so the blur is 0.
    if (out.numel() > 0) out.zero_();
    return;
  }
  advise_huge_pages(out);
  if (with_codes) advise_huge_pages(codes);

  const std::vector<int64_t> owner = first_reader(rt, Hm);
  std::vector<int64_t> orphans;  // max-map rows no output reads: only their codes are wanted
  if (with_codes) {
    for (int64_t r = 0; r < Hm; ++r) {
      if (owner[r] < 0) orphans.push_back(r);
    }
  }
  MaxFwdArgs<scalar_t> a{x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         with_codes ? codes.data_ptr<uint8_t>() : nullptr,
                         C, H, W, Hm, Wm, Ho, Wo, kmax, pmax,
                         x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                         out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                         with_codes ? codes.stride(0) : 0, with_codes ? codes.stride(1) : 0,
                         with_codes ? codes.stride(2) : 0, with_codes ? codes.stride(3) : 0,
                         &rt, &ct, owner.data(), orphans.data(), static_cast<int64_t>(orphans.size()),
                         1, 1, nullptr};
  const int64_t window = static_cast<int64_t>(kmax) * kmax;
  if (C > 1 && a.sC == 1) {  // max_row_channels reads unit-stride channels
    a.cb_max = channel_block(C, Wm, sizeof(acc_t) * (rt.width + 2), N * std::max<int64_t>(Ho, 1));
    a.nblk = (C + a.cb_max - 1) / a.cb_max;
    const std::vector<int64_t> sidx = scaled_index(ct, a.cb_max);
    a.sidx = sidx.data();
    if (Ho > 0) {
      const int64_t work = (Wm * (rt.width + window) + Wo * ct.width) * a.cb_max;
      at::parallel_for(0, N * a.nblk * Ho, grain_for(work),
                       [&](int64_t begin, int64_t end) { maxfwd_channels_chunk_run<scalar_t>(a, begin, end); });
    }
    if (a.n_orphans > 0) {
      at::parallel_for(0, N * a.nblk * a.n_orphans, grain_for(Wm * window * a.cb_max),
                       [&](int64_t begin, int64_t end) { maxcodes_channels_chunk_run<scalar_t>(a, begin, end); });
    }
  } else {
    if (Ho > 0) {
      const int64_t work = Wm * (rt.width + window) + Wo * ct.width;
      at::parallel_for(0, N * C * Ho, grain_for(work),
                       [&](int64_t begin, int64_t end) { maxfwd_planar_chunk_run<scalar_t>(a, begin, end); });
    }
    if (a.n_orphans > 0) {
      at::parallel_for(0, N * C * a.n_orphans, grain_for(Wm * window),
                       [&](int64_t begin, int64_t end) { maxcodes_planar_chunk_run<scalar_t>(a, begin, end); });
    }
  }
}

// ------------------------------------------------------------------------------------------------
// max_blur_backward_
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct MaxBwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g;
  const uint8_t* codes;
  scalar_t* gi;
  int64_t C, Hg, Wg, Hm, Wm, H, W;
  int kmax, pmax;
  int64_t gN, gC, gH, gW;
  int64_t kN, kC, kH, kW;
  int64_t iN, iC, iH, iW;
  const Table<acc_t>* rt;  // adjoint tables on the max-map grid
  const Table<acc_t>* ct;
  int64_t cb_max, nblk;
  const int64_t* sidx;
};

// One planar input row's interior columns [q_lo, q_hi) of the max-blur backward, for kmax = KMAX:
// s[q] = sum over window elements e = (ra, rb) of gm[ra][q + pmax - rb] where that max-map element's code is e.
// rows[ra] holds gm in [0, Wm) and the codes, as acc_t, in [Wm, 2 Wm). One pass with the window unrolled: the
// earlier pass per window element re-read and re-wrote s kmax^2 times.
// The sum is t0 + t1 + ... + 0, in e order, which equals the border columns' 0 + t0 + t1 + ... bit for bit (the
// trailing + 0 turns an all -0 sum into +0). GCC vectorises this form only: with the 0 first, or with one
// running sum, it keeps the selects as branches ("control flow in loop").
template <int KMAX, typename acc_t>
inline void route_window_scan(const acc_t* const* rows, int64_t Wm, int pmax, int64_t q_lo, int64_t q_hi,
                              acc_t* __restrict s) {
  const acc_t* gm[KMAX];
  for (int ra = 0; ra < KMAX; ++ra) gm[ra] = rows[ra] + pmax;
#pragma GCC ivdep
  for (int64_t q = q_lo; q < q_hi; ++q) {
    acc_t term[KMAX * KMAX];
#pragma GCC unroll 16
    for (int e = 0; e < KMAX * KMAX; ++e) {
      const acc_t* g = gm[e / KMAX] + q - e % KMAX;
      term[e] = (g[Wm] == static_cast<acc_t>(e)) ? g[0] : acc_t(0);
    }
    acc_t acc = term[0];
#pragma GCC unroll 16
    for (int e = 1; e < KMAX * KMAX; ++e) acc += term[e];
    s[q] = acc + acc_t(0);
  }
}

// Tasks (n, c, input row p). A cached max-map row r holds gm (the blurred gradient on the max map)
// in [0, Wm) and the codes, as acc_t, in [Wm, 2 Wm). A window row outside the max map reads
// `outside`, whose codes (-1) match no window element. Input columns whose kmax windows all lie
// inside the max map run as a vectorised select-and-add; the border columns are scalar.
template <typename scalar_t>
void maxbwd_planar_chunk(const MaxBwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int kmax = a.kmax, pmax = a.pmax;
  const int64_t Wm = a.Wm, W = a.W;
  std::vector<acc_t> tmp(static_cast<size_t>(a.Wg + 1 + Wm), acc_t(0));
  std::vector<acc_t> srow(static_cast<size_t>(W));
  std::vector<acc_t> outside(static_cast<size_t>(2 * Wm), acc_t(0));
  std::fill(outside.begin() + Wm, outside.end(), acc_t(-1));
  RowCache<acc_t> cache(2 * Wm, kmax + 1);
  const acc_t* rows[8];
  // Interior input columns q: 0 <= q - b + pmax < Wm for every b < kmax.
  const int64_t q_lo = std::min<int64_t>(W, std::max<int64_t>(0, kmax - 1 - pmax));
  const int64_t q_hi = std::max<int64_t>(q_lo, std::min<int64_t>(W, Wm - pmax));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t p = t % a.H;
    const int64_t pl = t / a.H;
    const int64_t c = pl % a.C, n = pl / a.C;
    const scalar_t* gbase = a.g + n * a.gN + c * a.gC;
    const uint8_t* kbase = a.codes + n * a.kN + c * a.kC;
    for (int ra = 0; ra < kmax; ++ra) {
      const int64_t r = p - ra + pmax;
      if (r < 0 || r >= a.Hm) {
        rows[ra] = outside.data();
        continue;
      }
      rows[ra] = cache.get(pl * a.Hm + r, [&](acc_t* row) {
        const int64_t gH = a.gH;
        blur_row_planar<scalar_t>([&](int64_t rr) { return gbase + rr * gH; }, a.gW, a.Wg, *a.rt, r, *a.ct,
                                  tmp.data(), row, int64_t(1));
        const uint8_t* kr = kbase + r * a.kH;
        acc_t* rc = row + Wm;
        if (a.kW == 1) {
          for (int64_t cc = 0; cc < Wm; ++cc) rc[cc] = static_cast<acc_t>(kr[cc]);
        } else {
          for (int64_t cc = 0; cc < Wm; ++cc) rc[cc] = static_cast<acc_t>(kr[cc * a.kW]);
        }
      });
    }
    acc_t* __restrict s = srow.data();
    auto scalar_column = [&](int64_t q) {
      acc_t acc = acc_t(0);
      for (int ra = 0; ra < kmax; ++ra) {
        for (int rb = 0; rb < kmax; ++rb) {
          const int64_t cc = q - rb + pmax;
          if (cc < 0 || cc >= Wm) continue;
          if (rows[ra][Wm + cc] == static_cast<acc_t>(ra * kmax + rb)) acc += rows[ra][cc];
        }
      }
      s[q] = acc;
    };
    for (int64_t q = 0; q < q_lo; ++q) scalar_column(q);
    if (kmax == 2) {
      route_window_scan<2>(rows, Wm, pmax, q_lo, q_hi, s);
    } else if (kmax == 3) {
      route_window_scan<3>(rows, Wm, pmax, q_lo, q_hi, s);
    } else {
      for (int64_t q = q_lo; q < q_hi; ++q) s[q] = acc_t(0);
      for (int ra = 0; ra < kmax; ++ra) {
        for (int rb = 0; rb < kmax; ++rb) {
          const acc_t want = static_cast<acc_t>(ra * kmax + rb);
          const acc_t* g = rows[ra];
          const acc_t* k = rows[ra] + Wm;
          const int64_t off = pmax - rb;
          for (int64_t q = q_lo; q < q_hi; ++q) s[q] += (k[q + off] == want) ? g[q + off] : acc_t(0);
        }
      }
    }
    for (int64_t q = q_hi; q < W; ++q) scalar_column(q);
    scalar_t* orow = a.gi + n * a.iN + c * a.iC + p * a.iH;
    if (a.iW == 1) {
      for (int64_t q = 0; q < W; ++q) orow[q] = from_acc<scalar_t>(s[q]);
    } else {
      for (int64_t q = 0; q < W; ++q) orow[q * a.iW] = from_acc<scalar_t>(s[q]);
    }
  }
}

// Tasks (n, channel block, input row p).
template <typename scalar_t>
void maxbwd_channels_chunk(const MaxBwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int kmax = a.kmax, pmax = a.pmax;
  const int64_t cb_max = a.cb_max;
  std::vector<acc_t> tmp(static_cast<size_t>((a.Wg + 1) * cb_max), acc_t(0));
  std::vector<acc_t> acc(static_cast<size_t>(cb_max));
  RowCache<acc_t> cache(a.Wm * cb_max, kmax + 1);
  const acc_t* gm_rows[8];
  const uint8_t* code_rows[8];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t p = t % a.H;
    const int64_t nb = t / a.H;
    const int64_t b = nb % a.nblk, n = nb / a.nblk;
    const int64_t c0 = b * cb_max, cb = std::min(cb_max, a.C - c0);
    const scalar_t* gbase = a.g + n * a.gN + c0 * a.gC;
    for (int ra = 0; ra < kmax; ++ra) {
      const int64_t r = p - ra + pmax;
      if (r < 0 || r >= a.Hm) {
        gm_rows[ra] = nullptr;
        continue;
      }
      gm_rows[ra] = cache.get(nb * a.Hm + r, [&](acc_t* gm) {
        const int64_t gH = a.gH;
        blur_row_channels<scalar_t>([&](int64_t rr) { return gbase + rr * gH; }, a.gW, a.gC, a.Wg, cb, *a.rt, r,
                                    *a.ct, a.sidx, tmp.data(), cb_max, gm, cb_max, int64_t(1), acc.data());
      });
      code_rows[ra] = a.codes + n * a.kN + c0 * a.kC + r * a.kH;
    }
    scalar_t* orow = a.gi + n * a.iN + c0 * a.iC + p * a.iH;
    const int64_t kC = a.kC, iC = a.iC;
    for (int64_t q = 0; q < a.W; ++q) {
      for (int64_t ch = 0; ch < cb; ++ch) acc[ch] = acc_t(0);
      for (int ra = 0; ra < kmax; ++ra) {
        if (!gm_rows[ra]) continue;
        for (int rb = 0; rb < kmax; ++rb) {
          const int64_t cc = q - rb + pmax;
          if (cc < 0 || cc >= a.Wm) continue;
          const uint8_t want = static_cast<uint8_t>(ra * kmax + rb);
          const acc_t* gv = gm_rows[ra] + cc * cb_max;
          const uint8_t* kv = code_rows[ra] + cc * a.kW;
          if (kC == 1) {
            for (int64_t ch = 0; ch < cb; ++ch) acc[ch] += (kv[ch] == want) ? gv[ch] : acc_t(0);
          } else {
            for (int64_t ch = 0; ch < cb; ++ch) acc[ch] += (kv[ch * kC] == want) ? gv[ch] : acc_t(0);
          }
        }
      }
      scalar_t* o = orow + q * a.iW;
      if (iC == 1) {
        for (int64_t ch = 0; ch < cb; ++ch) o[ch] = from_acc<scalar_t>(acc[ch]);
      } else {
        for (int64_t ch = 0; ch < cb; ++ch) o[ch * iC] = from_acc<scalar_t>(acc[ch]);
      }
    }
  }
}

KTK_DEFINE_RUNNER(maxbwd_planar_chunk, MaxBwdArgs)
KTK_DEFINE_RUNNER(maxbwd_channels_chunk, MaxBwdArgs)

template <typename scalar_t>
void max_blur_backward_kernel(const Tensor& grad, const Tensor& codes, int kmax, int pmax, const Tensor& row_idx,
                              const Tensor& row_w, const Tensor& col_idx, const Tensor& col_w,
                              const Tensor& grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = grad.size(0), C = grad.size(1), Hg = grad.size(2), Wg = grad.size(3);
  const int64_t Hm = codes.size(2), Wm = codes.size(3);
  const int64_t H = grad_input.size(2), W = grad_input.size(3);
  const Table<acc_t> rt = compact_table<acc_t>(row_idx, row_w, Hg, 0, "max_blur_backward_: row table");
  const Table<acc_t> ct =
      compact_table<acc_t>(col_idx, col_w, Wg, static_cast<int32_t>(Wg), "max_blur_backward_: col table");
  if (grad_input.numel() == 0) return;
  if (Hm == 0 || Wm == 0) {
    grad_input.zero_();
    return;
  }
  advise_huge_pages(grad_input);

  MaxBwdArgs<scalar_t> a{grad.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), grad_input.data_ptr<scalar_t>(),
                         C, Hg, Wg, Hm, Wm, H, W, kmax, pmax,
                         grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
                         codes.stride(0), codes.stride(1), codes.stride(2), codes.stride(3),
                         grad_input.stride(0), grad_input.stride(1), grad_input.stride(2), grad_input.stride(3),
                         &rt, &ct, 1, 1, nullptr};
  const int64_t window = static_cast<int64_t>(kmax) * kmax;
  if (use_channels_layout(grad_input, grad)) {
    a.cb_max = channel_block(C, std::max(Wg, Wm), sizeof(acc_t) * (kmax + 2), N * H);
    a.nblk = (C + a.cb_max - 1) / a.cb_max;
    const std::vector<int64_t> sidx = scaled_index(ct, a.cb_max);
    a.sidx = sidx.data();
    const int64_t work = (W * window + Wm * ct.width + Wg * rt.width) * a.cb_max;
    at::parallel_for(0, N * a.nblk * H, grain_for(work),
                     [&](int64_t begin, int64_t end) { maxbwd_channels_chunk_run<scalar_t>(a, begin, end); });
  } else {
    const int64_t work = W * window + Wm * ct.width + Wg * rt.width;
    at::parallel_for(0, N * C * H, grain_for(work),
                     [&](int64_t begin, int64_t end) { maxbwd_planar_chunk_run<scalar_t>(a, begin, end); });
  }
}

// ------------------------------------------------------------------------------------------------
// Argument checks and op entry points
// ------------------------------------------------------------------------------------------------

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_table(const char* op, const char* name, const Tensor& idx, const Tensor& w, int64_t rows) {
  TORCH_CHECK(idx.device().is_cpu() && w.device().is_cpu(), op, ": ", name, " table must be on the CPU");
  TORCH_CHECK(idx.dim() == 2, op, ": ", name, "_idx must be 2-D (positions, taps), got ", idx.dim(), "-D");
  TORCH_CHECK(idx.scalar_type() == at::kInt, op, ": ", name, "_idx must be int32, got ", idx.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kFloat, op, ": ", name, "_w must be float32, got ", w.scalar_type());
  TORCH_CHECK(w.sizes() == idx.sizes(), op, ": ", name, "_w has shape ", w.sizes(), " but ", name, "_idx has ",
              idx.sizes());
  TORCH_CHECK(idx.size(0) == rows, op, ": ", name, " table has ", idx.size(0), " rows, expected ", rows);
}

void check_4d(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
}

void check_float_pair(const char* op, const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  TORCH_CHECK(is_supported_float(a.scalar_type()), op, ": ", an,
              " must be float32, float64, float16 or bfloat16, got ", a.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

// Outputs are written in parallel: no element may alias another one or an input.
void check_output(const Tensor& out, std::initializer_list<const Tensor*> inputs) {
  at::assert_no_internal_overlap(out);
  for (const Tensor* in : inputs) at::assert_no_overlap(out, *in);
}

// max_pool2d's windows must each hold an input element: an empty spatial axis leaves them padding only.
void check_max_input(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.size(2) >= 1 && t.size(3) >= 1, op, ": ", name, " must have non-empty spatial sizes, got ",
              t.sizes());
}

void check_kmax(const char* op, int64_t kmax, int64_t pmax) {
  TORCH_CHECK(kmax >= 1 && kmax <= 7, op, ": kmax must be in [1, 7], got ", kmax);
  TORCH_CHECK(pmax >= 0 && pmax <= kmax / 2, op, ": pmax must be in [0, kmax // 2], got ", pmax, " for kmax ", kmax);
}

void blur_gather_cpu(const Tensor& x, const Tensor& row_idx, const Tensor& row_w, const Tensor& col_idx,
                     const Tensor& col_w, const Tensor& out) {
  const char* op = "blur_gather_";
  check_4d(op, "x", x);
  check_4d(op, "out", out);
  check_float_pair(op, x, "x", out, "out");
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1), op, ": out has shape ", out.sizes(),
              " but x has shape ", x.sizes(), " (N and C must match)");
  check_table(op, "row", row_idx, row_w, out.size(2));
  check_table(op, "col", col_idx, col_w, out.size(3));
  check_output(out, {&x});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "blur_gather_cpu", [&] {
    blur_gather_kernel<scalar_t>(x, row_idx, row_w, col_idx, col_w, out);
  });
}

void max_blur_forward_cpu(const Tensor& x, int64_t kmax, int64_t pmax, int64_t stride_h, int64_t stride_w,
                          const Tensor& row_idx, const Tensor& row_w, const Tensor& col_idx, const Tensor& col_w,
                          const Tensor& out, const std::optional<Tensor>& maybe_codes) {
  (void)stride_h;  // only the GPU kernels use the strides (ownership of codes)
  (void)stride_w;
  const char* op = "max_blur_forward_";
  const Tensor codes = maybe_codes.value_or(Tensor());
  check_4d(op, "x", x);
  check_4d(op, "out", out);
  check_float_pair(op, x, "x", out, "out");
  check_kmax(op, kmax, pmax);
  check_max_input(op, "x", x);
  const int64_t hm = std::max<int64_t>(x.size(2) + 2 * pmax - kmax + 1, 0);
  const int64_t wm = std::max<int64_t>(x.size(3) + 2 * pmax - kmax + 1, 0);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1), op, ": out has shape ", out.sizes(),
              " but x has shape ", x.sizes(), " (N and C must match)");
  if (codes.defined()) {
    check_4d(op, "codes", codes);
    TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
    TORCH_CHECK(
        codes.size(0) == x.size(0) && codes.size(1) == x.size(1) && codes.size(2) == hm && codes.size(3) == wm, op,
        ": codes must have shape (", x.size(0), ", ", x.size(1), ", ", hm, ", ", wm, "), got ", codes.sizes());
    check_output(out, {&x, &codes});
    check_output(codes, {&x});
  } else {
    check_output(out, {&x});
  }
  check_table(op, "row", row_idx, row_w, out.size(2));
  check_table(op, "col", col_idx, col_w, out.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_blur_forward_cpu", [&] {
    max_blur_forward_kernel<scalar_t>(x, static_cast<int>(kmax), static_cast<int>(pmax), hm, wm, row_idx, row_w,
                                      col_idx, col_w, out, codes);
  });
}

void max_blur_backward_cpu(const Tensor& grad, const Tensor& codes, int64_t kmax, int64_t pmax,
                           const Tensor& row_idx, const Tensor& row_w, const Tensor& col_idx, const Tensor& col_w,
                           const Tensor& grad_input) {
  const char* op = "max_blur_backward_";
  check_4d(op, "grad", grad);
  check_4d(op, "codes", codes);
  check_4d(op, "grad_input", grad_input);
  check_float_pair(op, grad, "grad", grad_input, "grad_input");
  check_kmax(op, kmax, pmax);
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  check_max_input(op, "grad_input", grad_input);
  const int64_t hm = std::max<int64_t>(grad_input.size(2) + 2 * pmax - kmax + 1, 0);
  const int64_t wm = std::max<int64_t>(grad_input.size(3) + 2 * pmax - kmax + 1, 0);
  TORCH_CHECK(grad.size(0) == grad_input.size(0) && grad.size(1) == grad_input.size(1), op, ": grad has shape ",
              grad.sizes(), " but grad_input has shape ", grad_input.sizes(), " (N and C must match)");
  TORCH_CHECK(codes.size(0) == grad_input.size(0) && codes.size(1) == grad_input.size(1) && codes.size(2) == hm &&
                  codes.size(3) == wm,
              op, ": codes must have shape (", grad_input.size(0), ", ", grad_input.size(1), ", ", hm, ", ", wm,
              "), got ", codes.sizes());
  check_table(op, "row", row_idx, row_w, hm);
  check_table(op, "col", col_idx, col_w, wm);
  check_output(grad_input, {&grad, &codes});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "max_blur_backward_cpu", [&] {
    max_blur_backward_kernel<scalar_t>(grad, codes, static_cast<int>(kmax), static_cast<int>(pmax), row_idx, row_w,
                                       col_idx, col_w, grad_input);
  });
}

}  // namespace
}  // namespace blurpool_cpu
}  // namespace ktkernels

TORCH_LIBRARY_IMPL(ktkernels_C, CPU, m) {
  m.impl("blur_gather_", &ktkernels::blurpool_cpu::blur_gather_cpu);
  m.impl("max_blur_forward_", &ktkernels::blurpool_cpu::max_blur_forward_cpu);
  m.impl("max_blur_backward_", &ktkernels::blurpool_cpu::max_blur_backward_cpu);
}
