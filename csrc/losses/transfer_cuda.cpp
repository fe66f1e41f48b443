// Torch-facing wrappers of the transfer loss's CUDA kernels: argument checks (transfer_checks.h), device guard,
// current stream, the split reduction's scratch buffer, then the plain-C++ launchers of
// transfer_kernels_cuda.cu. Registered for the CUDA dispatch key of the internal ops declared in
// csrc/registration.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/cuda_torch.h"
#include "transfer_checks.h"
#include "transfer_cuda.h"

namespace {

using ktk_cuda::dtype_of;
using ktk_cuda::in4;
using ktk_cuda::out4;
namespace kl = ktk_losses_cuda;

// The contract (transfer_checks.h) plus what the launchers index in 32 bits.
void check_cuda(const char* op, const at::Tensor& s) {
  TORCH_CHECK(s.is_cuda(), op, ": s must be a CUDA tensor, got ", s.device());
  TORCH_CHECK(s.dim() != 4 || s.size(2) * s.size(3) < (int64_t(1) << 30), op, ": s spatial size too large");
}

void raise_if(const char* err, const char* op) { TORCH_CHECK(err == nullptr, op, " (CUDA): ", err); }

void transfer_stats_cuda(const at::Tensor& s, const at::Tensor& t, const at::Tensor& basis, const at::Tensor& sq,
                         const at::Tensor& proj) {
  const char* op = "ktkernels_C::transfer_stats_";
  check_cuda(op, s);
  ktk_losses_checks::check_transfer_stats(op, s, t, basis, sq, proj);
  const kl::DType dtype = dtype_of(s, op);
  if (s.size(0) * s.size(1) == 0) return;
  if (s.size(2) * s.size(3) == 0) {  // empty sums
    sq.zero_();
    proj.zero_();
    return;
  }

  const c10::cuda::CUDAGuard guard(s.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const kl::Tensor4 sv = in4(s), tv = in4(t);
  const int64_t J = basis.size(0);
  int64_t ws_bytes = 0;
  raise_if(kl::transfer_stats_workspace(dtype, sv, tv, J, &ws_bytes), op);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({ws_bytes}, s.options().dtype(at::kByte));
  raise_if(kl::transfer_stats(dtype, sv, tv, basis.const_data_ptr(), J, sq.mutable_data_ptr(), proj.mutable_data_ptr(),
                              ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr, ws_bytes, stream),
           op);
}

void transfer_grad_cuda(const at::Tensor& s, const at::Tensor& t, const at::Tensor& basis,
                        const at::Tensor& pixel_coef, const at::Tensor& coef, const at::Tensor& grad) {
  const char* op = "ktkernels_C::transfer_grad_";
  check_cuda(op, s);
  ktk_losses_checks::check_transfer_grad(op, s, t, basis, pixel_coef, coef, grad);
  const kl::DType dtype = dtype_of(s, op);
  if (grad.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(s.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(kl::transfer_grad(dtype, in4(s), in4(t), basis.const_data_ptr(), basis.size(0), pixel_coef.const_data_ptr(),
                             coef.const_data_ptr(), out4(grad), stream),
           op);
}

}  // namespace

TORCH_LIBRARY_IMPL(ktkernels_C, CUDA, m) {
  m.impl("transfer_stats_", &transfer_stats_cuda);
  m.impl("transfer_grad_", &transfer_grad_cuda);
}
