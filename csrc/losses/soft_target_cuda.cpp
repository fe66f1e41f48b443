// Torch-facing wrappers of the soft-target CUDA kernels: argument checks (soft_target_checks.h), device guard,
// current stream, then the plain-C++ launchers of soft_target_kernels_cuda.cu. Registered for the CUDA dispatch
// key of the internal ops declared in csrc/registration.cpp.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../common/cuda_torch.h"
#include "soft_target_checks.h"
#include "soft_target_cuda.h"

namespace {

using ktk_cuda::dtype_of;
namespace kl = ktk_losses_cuda;

// The contract (soft_target_checks.h) plus what the launchers index in 32 bits.
void check_cuda(const char* op, const at::Tensor& s) {
  TORCH_CHECK(s.is_cuda(), op, ": s must be a CUDA tensor, got ", s.device());
  TORCH_CHECK(s.dim() != 2 || s.size(1) <= std::numeric_limits<int32_t>::max() - 1024, op,
              ": too many classes");
}

void raise_if(const char* err, const char* op) { TORCH_CHECK(err == nullptr, op, " (CUDA): ", err); }

kl::Logits logits_of(const at::Tensor& x) { return kl::Logits{x.const_data_ptr(), x.stride(0)}; }

void soft_target_forward_cuda(const at::Tensor& s, const at::Tensor& t, double temperature, const at::Tensor& rows) {
  const char* op = "ktkernels_C::soft_target_forward_";
  check_cuda(op, s);
  ktk_losses_checks::check_soft_target_forward(op, s, t, temperature, rows);
  const kl::DType dtype = dtype_of(s, op);
  if (s.size(0) == 0) return;

  const c10::cuda::CUDAGuard guard(s.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(kl::soft_target_forward(dtype, logits_of(s), logits_of(t), s.size(0), s.size(1), temperature,
                                   rows.mutable_data_ptr(), stream),
           op);
}

void soft_target_backward_cuda(const at::Tensor& s, const at::Tensor& t, double temperature, const at::Tensor& rows,
                               const at::Tensor& grad_rows, const at::Tensor& grad_s, const at::Tensor& grad_t) {
  const char* op = "ktkernels_C::soft_target_backward_";
  check_cuda(op, s);
  ktk_losses_checks::check_soft_target_backward(op, s, t, temperature, rows, grad_rows, grad_s, grad_t);
  const kl::DType dtype = dtype_of(s, op);
  const bool want_s = grad_s.numel() > 0, want_t = grad_t.numel() > 0;
  if (s.numel() == 0 || !(want_s || want_t)) return;

  const c10::cuda::CUDAGuard guard(s.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(kl::soft_target_backward(dtype, logits_of(s), logits_of(t), s.size(0), s.size(1), temperature,
                                    rows.const_data_ptr(), grad_rows.const_data_ptr(),
                                    want_s ? grad_s.mutable_data_ptr() : nullptr,
                                    want_t ? grad_t.mutable_data_ptr() : nullptr, stream),
           op);
}

}  // namespace

TORCH_LIBRARY_IMPL(ktkernels_C, CUDA, m) {
  m.impl("soft_target_forward_", &soft_target_forward_cuda);
  m.impl("soft_target_backward_", &soft_target_backward_cuda);
}
