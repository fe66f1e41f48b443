// The argument contract of the DCT family's internal ops, shared by the CPU (dct_cpu.cpp) and CUDA
// (dct_cuda.cpp) wrappers: shapes, dtypes, devices and aliasing. Each wrapper adds only its device check.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace ktk_dct_checks {

// float32, or float64 for float64 data: the dtype of the bases and of the power-mean maps.
inline at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_4d(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected ", x.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
}

inline void check_data(const char* op, const at::Tensor& x) {
  check_4d(op, "x", x, x);
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", t);
}

inline void check_acc_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected ", x.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == acc_dtype_of(x.scalar_type()), op, ": ", name, " must be ",
              acc_dtype_of(x.scalar_type()), " for ", x.scalar_type(), " x, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_output(const char* op, const char* name, const at::Tensor& out, const at::Tensor& in) {
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op, ": ", name,
              " has overlapping memory (expanded or strided onto itself)");
  at::assert_no_overlap(out, in);
}

// dct_basis2d_(x, left, right, out): out[n,c] = left @ x[n,c] @ right^T.
inline void check_basis2d(const char* op, const at::Tensor& x, const at::Tensor& left, const at::Tensor& right,
                          const at::Tensor& out) {
  check_data(op, x);
  check_4d(op, "out", out, x);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out dtype ", out.scalar_type(), " != x dtype ",
              x.scalar_type());
  check_acc_tensor(op, "left", left, x, 2);
  check_acc_tensor(op, "right", right, x, 2);
  TORCH_CHECK(left.size(1) == x.size(2), op, ": left must be (H_out, ", x.size(2), "), got ", left.sizes());
  TORCH_CHECK(right.size(1) == x.size(3), op, ": right must be (W_out, ", x.size(3), "), got ", right.sizes());
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1) && out.size(2) == left.size(0) &&
                  out.size(3) == right.size(0),
              op, ": out must be (", x.size(0), ", ", x.size(1), ", ", left.size(0), ", ", right.size(0), "), got ",
              out.sizes());
  check_output(op, "out", out, x);
  at::assert_no_overlap(out, left);
  at::assert_no_overlap(out, right);
}

// channel_power_mean_(x, p, out): out[n,h,w] = mean_c |x|^p.
inline void check_power_mean(const char* op, const at::Tensor& x, const at::Tensor& out) {
  check_data(op, x);
  check_acc_tensor(op, "out", out, x, 3);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(2) && out.size(2) == x.size(3), op,
              ": out must be (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ", out.sizes());
  TORCH_CHECK(x.size(1) >= 1 || out.numel() == 0, op, ": x needs at least one channel");
  check_output(op, "out", out, x);
}

// channel_power_mean_backward_(x, grad_map, p, grad_x).
inline void check_power_mean_backward(const char* op, const at::Tensor& x, const at::Tensor& grad_map,
                                      const at::Tensor& grad_x) {
  check_data(op, x);
  check_acc_tensor(op, "grad_map", grad_map, x, 3);
  check_4d(op, "grad_x", grad_x, x);
  TORCH_CHECK(grad_x.scalar_type() == x.scalar_type(), op, ": grad_x dtype ", grad_x.scalar_type(),
              " != x dtype ", x.scalar_type());
  TORCH_CHECK(grad_x.sizes() == x.sizes(), op, ": grad_x must have x's shape ", x.sizes(), ", got ",
              grad_x.sizes());
  TORCH_CHECK(grad_map.size(0) == x.size(0) && grad_map.size(1) == x.size(2) && grad_map.size(2) == x.size(3), op,
              ": grad_map must be (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ", grad_map.sizes());
  check_output(op, "grad_x", grad_x, x);
  at::assert_no_overlap(grad_x, grad_map);
}

}  // namespace ktk_dct_checks
