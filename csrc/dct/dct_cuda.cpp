// Torch-facing wrappers of the DCT-family CUDA kernels: argument checks, device guard, current stream,
// the fallback's scratch buffer, then the plain-C++ launchers of dct_kernels_cuda.cu. Registered for the
// CUDA dispatch key of the internal ops declared in csrc/registration.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../common/cuda_torch.h"
#include "dct_checks.h"
#include "dct_cuda.h"

namespace {

using ktk_cuda::dtype_of;
using ktk_cuda::in4;
using ktk_cuda::out4;
namespace kd = ktk_dct_cuda;

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

// The contract (dct_checks.h) plus what the launchers index in 32 bits.
void check_cuda(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() != 4 || (x.size(2) <= kIntMax && x.size(3) <= kIntMax), op, ": x spatial size too large");
}

void raise_if(const char* err, const char* op) { TORCH_CHECK(err == nullptr, op, " (CUDA): ", err); }

void dct_basis2d_cuda(const at::Tensor& x, const at::Tensor& left, const at::Tensor& right, const at::Tensor& out) {
  const char* op = "ktkernels_C::dct_basis2d_";
  check_cuda(op, x);
  ktk_dct_checks::check_basis2d(op, x, left, right, out);
  TORCH_CHECK(out.size(2) <= kIntMax && out.size(3) <= kIntMax, op, ": out spatial size too large");
  const kd::DType dtype = dtype_of(x, op);
  if (out.numel() == 0) return;
  if (x.size(2) == 0 || x.size(3) == 0) {  // empty sums
    out.zero_();
    return;
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const kd::Tensor4 xv = in4(x), ov = out4(out);
  int64_t ws_bytes = 0;
  raise_if(kd::dct_basis2d_workspace(dtype, xv, ov, &ws_bytes), op);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  raise_if(kd::dct_basis2d(dtype, xv, left.const_data_ptr(), right.const_data_ptr(), ov,
                           ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr, ws_bytes, stream),
           op);
}

void channel_power_mean_cuda(const at::Tensor& x, double p, const at::Tensor& out) {
  const char* op = "ktkernels_C::channel_power_mean_";
  check_cuda(op, x);
  ktk_dct_checks::check_power_mean(op, x, out);
  const kd::DType dtype = dtype_of(x, op);
  if (out.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(kd::channel_power_mean(dtype, in4(x), p, out.mutable_data_ptr(), stream), op);
}

void channel_power_mean_backward_cuda(const at::Tensor& x, const at::Tensor& grad_map, double p,
                                      const at::Tensor& grad_x) {
  const char* op = "ktkernels_C::channel_power_mean_backward_";
  check_cuda(op, x);
  ktk_dct_checks::check_power_mean_backward(op, x, grad_map, grad_x);
  const kd::DType dtype = dtype_of(x, op);
  if (grad_x.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(kd::channel_power_mean_backward(dtype, in4(x), grad_map.const_data_ptr(), p, out4(grad_x), stream), op);
}

}  // namespace

TORCH_LIBRARY_IMPL(ktkernels_C, CUDA, m) {
  m.impl("dct_basis2d_", &dct_basis2d_cuda);
  m.impl("channel_power_mean_", &channel_power_mean_cuda);
  m.impl("channel_power_mean_backward_", &channel_power_mean_backward_cuda);
}
