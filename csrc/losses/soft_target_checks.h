// The argument contract of the soft-target internal ops (soft_target_forward_, soft_target_backward_), shared
// by the CPU (soft_target_cpu.cpp) and CUDA (soft_target_cuda.cpp) wrappers. Each wrapper adds only its device
// check.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "transfer_checks.h"

namespace ktk_losses_checks {

// s, t: (N, K) logits of one dtype, unit stride along K (any row stride); T > 0 and finite.
inline void check_logits(const char* op, const at::Tensor& s, const at::Tensor& t, double temperature) {
  check_pair(op, s, t, 2, "(N, K)");
  TORCH_CHECK(s.size(1) <= 1 || s.stride(1) == 1, op, ": s must have unit stride along K, got ", s.strides());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": t must have unit stride along K, got ", t.strides());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op, ": temperature must be finite and > 0, got ",
              temperature);
}

// soft_target_forward_(s, t, T, rows): rows (N, 3) acc.
inline void check_soft_target_forward(const char* op, const at::Tensor& s, const at::Tensor& t, double temperature,
                                      const at::Tensor& rows) {
  check_logits(op, s, t, temperature);
  check_acc(op, "rows", rows, s, {s.size(0), 3});
  check_output(op, "rows", rows, {&s, &t});
}

// A gradient output of the backward: skipped when empty, else (N, K) contiguous in the logits' dtype.
inline void check_logit_grad(const char* op, const char* name, const at::Tensor& g, const at::Tensor& s) {
  if (g.numel() == 0) return;
  TORCH_CHECK(g.device() == s.device(), op, ": ", name, " is on ", g.device(), ", expected ", s.device());
  TORCH_CHECK(g.scalar_type() == s.scalar_type(), op, ": ", name, " dtype ", g.scalar_type(), " != s dtype ",
              s.scalar_type());
  TORCH_CHECK(g.sizes() == s.sizes(), op, ": ", name, " must have s's shape ", s.sizes(), " (or be empty), got ",
              g.sizes());
  TORCH_CHECK(g.is_contiguous(), op, ": ", name, " must be contiguous");
}

// soft_target_backward_(s, t, T, rows, grad_rows, grad_s, grad_t): rows (N, 3) acc, grad_rows (N,) acc.
inline void check_soft_target_backward(const char* op, const at::Tensor& s, const at::Tensor& t, double temperature,
                                       const at::Tensor& rows, const at::Tensor& grad_rows, const at::Tensor& grad_s,
                                       const at::Tensor& grad_t) {
  check_logits(op, s, t, temperature);
  check_acc(op, "rows", rows, s, {s.size(0), 3});
  check_acc(op, "grad_rows", grad_rows, s, {s.size(0)});
  check_logit_grad(op, "grad_s", grad_s, s);
  check_logit_grad(op, "grad_t", grad_t, s);
  check_output(op, "grad_s", grad_s, {&s, &t, &rows, &grad_rows, &grad_t});
  check_output(op, "grad_t", grad_t, {&s, &t, &rows, &grad_rows});
}

}  // namespace ktk_losses_checks
