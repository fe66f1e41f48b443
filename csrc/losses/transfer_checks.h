// The argument contract of the pixel/global transfer loss's internal ops (transfer_stats_, transfer_grad_),
// shared by the CPU (transfer_cpu.cpp) and CUDA (transfer_cuda.cpp) wrappers: shapes, dtypes, devices,
// contiguity of the acc tensors and aliasing. Each wrapper adds only its device check. The helpers at the top
// are shared with the soft-target contract (soft_target_checks.h).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

namespace ktk_losses_checks {

// float32, or float64 for float64 data: the dtype of the bases, coefficients and statistics.
inline at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// s and t: `dim`-D floating data of one dtype, shape and device.
inline void check_pair(const char* op, const at::Tensor& s, const at::Tensor& t, int64_t dim, const char* dims) {
  TORCH_CHECK(s.dim() == dim, op, ": s must be ", dim, "-D ", dims, ", got ", s.dim(), "-D");
  const at::ScalarType d = s.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, op,
              ": s must be float32, float64, float16 or bfloat16, got ", d);
  TORCH_CHECK(t.device() == s.device(), op, ": t is on ", t.device(), ", expected ", s.device());
  TORCH_CHECK(t.scalar_type() == d, op, ": t dtype ", t.scalar_type(), " != s dtype ", d);
  TORCH_CHECK(t.sizes() == s.sizes(), op, ": t must have s's shape ", s.sizes(), ", got ", t.sizes());
}

// An acc tensor (float32, float64 for float64 s) of the given shape, contiguous, on s's device.
inline void check_acc(const char* op, const char* name, const at::Tensor& a, const at::Tensor& s,
                      std::initializer_list<int64_t> sizes) {
  TORCH_CHECK(a.device() == s.device(), op, ": ", name, " is on ", a.device(), ", expected ", s.device());
  TORCH_CHECK(a.scalar_type() == acc_dtype_of(s.scalar_type()), op, ": ", name, " must be ",
              acc_dtype_of(s.scalar_type()), " for ", s.scalar_type(), " data, got ", a.scalar_type());
  TORCH_CHECK(a.sizes() == at::IntArrayRef(sizes), op, ": ", name, " must be ", at::IntArrayRef(sizes), ", got ",
              a.sizes());
  TORCH_CHECK(a.is_contiguous(), op, ": ", name, " must be contiguous");
}

// An output: no element written twice, no memory shared with any input (or other output).
inline void check_output(const char* op, const char* name, const at::Tensor& out,
                         std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op, ": ", name,
              " has overlapping memory (expanded or strided onto itself)");
  for (const at::Tensor* o : others) at::assert_no_overlap(out, *o);
}

// basis (J, H*W) acc contiguous for (N, C, H, W) s; returns J.
inline int64_t check_basis(const char* op, const at::Tensor& s, const at::Tensor& basis) {
  TORCH_CHECK(basis.dim() == 2, op, ": basis must be 2-D (J, H*W), got ", basis.dim(), "-D");
  check_acc(op, "basis", basis, s, {basis.size(0), s.size(2) * s.size(3)});
  return basis.size(0);
}

// transfer_stats_(s, t, basis, sq, proj): sq (N, C), proj (2, N, C, J).
inline void check_transfer_stats(const char* op, const at::Tensor& s, const at::Tensor& t, const at::Tensor& basis,
                                 const at::Tensor& sq, const at::Tensor& proj) {
  check_pair(op, s, t, 4, "(N, C, H, W)");
  const int64_t J = check_basis(op, s, basis);
  const int64_t N = s.size(0), C = s.size(1);
  check_acc(op, "sq", sq, s, {N, C});
  check_acc(op, "proj", proj, s, {2, N, C, J});
  check_output(op, "sq", sq, {&s, &t, &basis, &proj});
  check_output(op, "proj", proj, {&s, &t, &basis});
}

// transfer_grad_(s, t, basis, pixel_coef, coef, grad): pixel_coef (1,), coef (N, C, J), grad like s (any strides).
inline void check_transfer_grad(const char* op, const at::Tensor& s, const at::Tensor& t, const at::Tensor& basis,
                                const at::Tensor& pixel_coef, const at::Tensor& coef, const at::Tensor& grad) {
  check_pair(op, s, t, 4, "(N, C, H, W)");
  const int64_t J = check_basis(op, s, basis);
  check_acc(op, "pixel_coef", pixel_coef, s, {1});
  check_acc(op, "coef", coef, s, {s.size(0), s.size(1), J});
  TORCH_CHECK(grad.device() == s.device(), op, ": grad is on ", grad.device(), ", expected ", s.device());
  TORCH_CHECK(grad.scalar_type() == s.scalar_type(), op, ": grad dtype ", grad.scalar_type(), " != s dtype ",
              s.scalar_type());
  TORCH_CHECK(grad.sizes() == s.sizes(), op, ": grad must have s's shape ", s.sizes(), ", got ", grad.sizes());
  check_output(op, "grad", grad, {&s, &t, &basis, &pixel_coef, &coef});
}

}  // namespace ktk_losses_checks
