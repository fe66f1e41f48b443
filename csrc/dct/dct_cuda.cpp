// Torch-facing wrappers of the DCT-family CUDA kernels: argument checks, device guard, current stream,
// the fallback's scratch buffer, then the plain-C++ launchers of dct_kernels_cuda.cu. Registered for the
// CUDA dispatch key of the internal ops declared in csrc/registration.cpp.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "dct_cuda.h"

namespace {

namespace kd = ktk_dct_cuda;

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

kd::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kd::DType::kFloat32;
    case at::kHalf:
      return kd::DType::kFloat16;
    case at::kBFloat16:
      return kd::DType::kBFloat16;
    case at::kDouble:
      return kd::DType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16, float64)");
  return kd::DType::kFloat32;
}

// float32, or float64 for float64 data.
at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_on(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ", ref.device());
}

void check_4d(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* op) {
  check_on(t, name, ref, op);
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(t.size(2) <= kIntMax && t.size(3) <= kIntMax, op, ": ", name, " spatial size too large");
}

void check_acc_tensor(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t dim, const char* op) {
  check_on(t, name, x, op);
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == acc_dtype_of(x.scalar_type()), op, ": ", name, " must be ",
              acc_dtype_of(x.scalar_type()), " for ", x.scalar_type(), " x, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_output(const at::Tensor& out, const char* name, const at::Tensor& in, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op, ": ", name,
              " has overlapping memory (expanded or strided onto itself)");
  at::assert_no_overlap(out, in);
}

kd::Tensor4 view4(const at::Tensor& t, void* data) {
  kd::Tensor4 v;
  v.data = data;
  for (int d = 0; d < 4; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

kd::Tensor4 in4(const at::Tensor& t) { return view4(t, const_cast<void*>(t.const_data_ptr())); }
kd::Tensor4 out4(const at::Tensor& t) { return view4(t, t.mutable_data_ptr()); }

void raise_if(const char* err, const char* op) { TORCH_CHECK(err == nullptr, op, " (CUDA): ", err); }

void dct_basis2d_cuda(const at::Tensor& x, const at::Tensor& left, const at::Tensor& right, const at::Tensor& out) {
  const char* op = "ktkernels_C::dct_basis2d_";
  check_4d(x, "x", x, op);
  check_4d(out, "out", x, op);
  const kd::DType dtype = dtype_of(x, op);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out dtype ", out.scalar_type(), " != x dtype ",
              x.scalar_type());
  check_acc_tensor(left, "left", x, 2, op);
  check_acc_tensor(right, "right", x, 2, op);
  TORCH_CHECK(left.size(1) == x.size(2), op, ": left must be (H_out, ", x.size(2), "), got ", left.sizes());
  TORCH_CHECK(right.size(1) == x.size(3), op, ": right must be (W_out, ", x.size(3), "), got ", right.sizes());
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1) && out.size(2) == left.size(0) &&
                  out.size(3) == right.size(0),
              op, ": out must be (", x.size(0), ", ", x.size(1), ", ", left.size(0), ", ", right.size(0), "), got ",
              out.sizes());
  check_output(out, "out", x, op);
  if (out.numel() == 0) return;
  at::assert_no_overlap(out, left);
  at::assert_no_overlap(out, right);
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
  check_4d(x, "x", x, op);
  const kd::DType dtype = dtype_of(x, op);
  check_acc_tensor(out, "out", x, 3, op);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(2) && out.size(2) == x.size(3), op,
              ": out must be (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ", out.sizes());
  check_output(out, "out", x, op);
  if (out.numel() == 0) return;
  TORCH_CHECK(x.size(1) >= 1, op, ": x needs at least one channel");

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(kd::channel_power_mean(dtype, in4(x), p, out.mutable_data_ptr(), stream), op);
}

void channel_power_mean_backward_cuda(const at::Tensor& x, const at::Tensor& grad_map, double p,
                                      const at::Tensor& grad_x) {
  const char* op = "ktkernels_C::channel_power_mean_backward_";
  check_4d(x, "x", x, op);
  check_4d(grad_x, "grad_x", x, op);
  const kd::DType dtype = dtype_of(x, op);
  TORCH_CHECK(grad_x.scalar_type() == x.scalar_type(), op, ": grad_x dtype ", grad_x.scalar_type(),
              " != x dtype ", x.scalar_type());
  TORCH_CHECK(grad_x.sizes() == x.sizes(), op, ": grad_x must have x's shape ", x.sizes(), ", got ",
              grad_x.sizes());
  check_acc_tensor(grad_map, "grad_map", x, 3, op);
  TORCH_CHECK(grad_map.size(0) == x.size(0) && grad_map.size(1) == x.size(2) && grad_map.size(2) == x.size(3), op,
              ": grad_map must be (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ", grad_map.sizes());
  check_output(grad_x, "grad_x", x, op);
  if (grad_x.numel() == 0) return;
  at::assert_no_overlap(grad_x, grad_map);

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
