// The argument contract of the attention-map distance ops, shared by the CPU (attention_map_cpu.cpp) and CUDA
// (attention_map_cuda.cpp) wrappers: shapes, dtypes, devices, contiguity and aliasing. Each wrapper adds only
// its device check (and the CUDA one its size limit).
//
//   attention_map_distance_(map_s, map_t, kind, left, right, dist)
//   attention_map_distance_backward_(map_s, map_t, grad_dist, kind, left, right, grad_map_s)
//
// map_s, map_t: (N, H, W) contiguous, float32 or float64 (the accumulation dtype), same shape, dtype, device;
// H, W >= 1 (N may be 0). kind: 0 at_code, 1 at_paper, 2 dct_a, 3 dct_b, 4 dct (ktkernels/losses/basis.py:
// MAP_KINDS). left (2, H, H) and right (2, W, W): contiguous tables of the maps' dtype and device, read only
// for kinds 2..4 (the AT kinds ignore them: Python passes (2, 0, 0) placeholders). dist: (N,) contiguous.
// grad_dist: (N,), any stride. grad_map_s: (N, H, W) contiguous.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace ktk_attention_map_checks {

constexpr int64_t kNumKinds = 5;

// Kinds 2..4 transform the maps with the tables; 0 and 1 only normalise them.
inline bool uses_tables(int64_t kind) { return kind >= 2; }

inline void check_maps(const char* op, const at::Tensor& map_s, const at::Tensor& map_t, int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind < kNumKinds, op, ": kind must be in [0, ", kNumKinds - 1,
              "] (at_code, at_paper, dct_a, dct_b, dct), got ", kind);
  TORCH_CHECK(map_s.dim() == 3, op, ": map_s must be 3-D (N, H, W), got ", map_s.dim(), "-D");
  const at::ScalarType t = map_s.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble, op, ": map_s must be float32 or float64, got ", t);
  TORCH_CHECK(map_s.size(1) >= 1 && map_s.size(2) >= 1, op, ": maps must have H, W >= 1, got ", map_s.sizes());
  TORCH_CHECK(map_s.is_contiguous(), op, ": map_s must be contiguous");
  TORCH_CHECK(map_t.device() == map_s.device(), op, ": map_t is on ", map_t.device(), ", expected ",
              map_s.device());
  TORCH_CHECK(map_t.scalar_type() == t, op, ": map_t dtype ", map_t.scalar_type(), " != map_s dtype ", t);
  TORCH_CHECK(map_t.sizes() == map_s.sizes(), op, ": map_t must have map_s's shape ", map_s.sizes(), ", got ",
              map_t.sizes());
  TORCH_CHECK(map_t.is_contiguous(), op, ": map_t must be contiguous");
}

// A tensor of the maps' dtype and device, with `dim` dimensions.
inline void check_like_maps(const char* op, const char* name, const at::Tensor& x, const at::Tensor& map_s,
                            int64_t dim) {
  TORCH_CHECK(x.device() == map_s.device(), op, ": ", name, " is on ", x.device(), ", expected ", map_s.device());
  TORCH_CHECK(x.scalar_type() == map_s.scalar_type(), op, ": ", name, " must be ", map_s.scalar_type(),
              " (the maps' dtype), got ", x.scalar_type());
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", x.dim(), "-D");
}

inline void check_tables(const char* op, const at::Tensor& map_s, int64_t kind, const at::Tensor& left,
                         const at::Tensor& right) {
  if (!uses_tables(kind)) return;
  const int64_t H = map_s.size(1), W = map_s.size(2);
  check_like_maps(op, "left", left, map_s, 3);
  check_like_maps(op, "right", right, map_s, 3);
  TORCH_CHECK(left.size(0) == 2 && left.size(1) == H && left.size(2) == H, op, ": left must be (2, ", H, ", ", H,
              "), got ", left.sizes());
  TORCH_CHECK(right.size(0) == 2 && right.size(1) == W && right.size(2) == W, op, ": right must be (2, ", W, ", ",
              W, "), got ", right.sizes());
  TORCH_CHECK(left.is_contiguous() && right.is_contiguous(), op, ": left and right must be contiguous");
}

// An output must not overlap itself nor any input (inputs: the maps, the tables when read, grad_dist).
inline void check_output(const char* op, const char* name, const at::Tensor& out, const at::Tensor& map_s,
                         const at::Tensor& map_t, int64_t kind, const at::Tensor& left, const at::Tensor& right) {
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op, ": ", name,
              " has overlapping memory (expanded or strided onto itself)");
  at::assert_no_overlap(out, map_s);
  at::assert_no_overlap(out, map_t);
  if (uses_tables(kind)) {
    at::assert_no_overlap(out, left);
    at::assert_no_overlap(out, right);
  }
}

// attention_map_distance_: dist[n] = distance between map_s[n] and map_t[n].
inline void check_distance(const char* op, const at::Tensor& map_s, const at::Tensor& map_t, int64_t kind,
                           const at::Tensor& left, const at::Tensor& right, const at::Tensor& dist) {
  check_maps(op, map_s, map_t, kind);
  check_tables(op, map_s, kind, left, right);
  check_like_maps(op, "dist", dist, map_s, 1);
  TORCH_CHECK(dist.size(0) == map_s.size(0), op, ": dist must be (", map_s.size(0), ",), got ", dist.sizes());
  TORCH_CHECK(dist.is_contiguous(), op, ": dist must be contiguous");
  check_output(op, "dist", dist, map_s, map_t, kind, left, right);
}

// attention_map_distance_backward_: grad_map_s[n] = grad_dist[n] * d dist[n] / d map_s[n].
inline void check_distance_backward(const char* op, const at::Tensor& map_s, const at::Tensor& map_t,
                                    const at::Tensor& grad_dist, int64_t kind, const at::Tensor& left,
                                    const at::Tensor& right, const at::Tensor& grad_map_s) {
  check_maps(op, map_s, map_t, kind);
  check_tables(op, map_s, kind, left, right);
  check_like_maps(op, "grad_dist", grad_dist, map_s, 1);
  TORCH_CHECK(grad_dist.size(0) == map_s.size(0), op, ": grad_dist must be (", map_s.size(0), ",), got ",
              grad_dist.sizes());
  check_like_maps(op, "grad_map_s", grad_map_s, map_s, 3);
  TORCH_CHECK(grad_map_s.sizes() == map_s.sizes(), op, ": grad_map_s must have map_s's shape ", map_s.sizes(),
              ", got ", grad_map_s.sizes());
  TORCH_CHECK(grad_map_s.is_contiguous(), op, ": grad_map_s must be contiguous");
  check_output(op, "grad_map_s", grad_map_s, map_s, map_t, kind, left, right);
  at::assert_no_overlap(grad_map_s, grad_dist);
}

}  // namespace ktk_attention_map_checks
