// Torch-facing wrappers of the blur-pool CUDA kernels: argument checks, device guard, current
// stream, then the plain-C++ launchers of blurpool_kernels_cuda.cu. Registered for the CUDA dispatch key of
// the internal ops declared in csrc/registration.cpp.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../common/cuda_torch.h"
#include "blurpool_cuda.h"

namespace {

using ktk_cuda::dtype_of;
using ktk_cuda::in4;
using ktk_cuda::out4;
namespace kc = ktk_blurpool_cuda;

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

void check_4d(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ", ref.device());
  for (int d = 2; d < 4; ++d) {
    TORCH_CHECK(t.size(d) <= kIntMax, op, ": ", name, " spatial size too large");
  }
}

void check_output(const at::Tensor& out, const char* name, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op, ": ", name,
              " has overlapping memory (expanded or strided onto itself)");
}

void check_table(const at::Tensor& idx, const at::Tensor& w, const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(idx.device() == x.device() && w.device() == x.device(), op, ": ", name, " tables must be on ",
              x.device());
  TORCH_CHECK(idx.scalar_type() == at::kInt, op, ": ", name, " index table must be int32");
  TORCH_CHECK(w.scalar_type() == at::kFloat, op, ": ", name, " weight table must be float32");
  TORCH_CHECK(idx.dim() == 2 && w.dim() == 2 && idx.sizes() == w.sizes(), op, ": ", name,
              " index and weight tables must be 2-D of the same shape");
  TORCH_CHECK(idx.is_contiguous() && w.is_contiguous(), op, ": ", name, " tables must be contiguous");
  TORCH_CHECK(idx.size(1) >= 1 && idx.size(1) <= 4096, op, ": ", name, " tables need 1..4096 taps per row");
  TORCH_CHECK(idx.size(0) <= kIntMax, op, ": ", name, " table too long");
}

kc::Table table_of(const at::Tensor& idx, const at::Tensor& w) {
  kc::Table tab;
  tab.idx = idx.const_data_ptr<int32_t>();
  tab.w = w.const_data_ptr<float>();
  tab.len = idx.size(0);
  tab.k = idx.size(1);
  return tab;
}

void raise_if(const char* err, const char* op) { TORCH_CHECK(err == nullptr, op, " (CUDA): ", err); }

void blur_gather_cuda(const at::Tensor& x, const at::Tensor& row_idx, const at::Tensor& row_w,
                      const at::Tensor& col_idx, const at::Tensor& col_w, const at::Tensor& out) {
  const char* op = "ktkernels_C::blur_gather_";
  check_4d(x, "x", x, op);
  check_4d(out, "out", x, op);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out dtype ", out.scalar_type(), " != x dtype ",
              x.scalar_type());
  const kc::DType dtype = dtype_of(x, op);
  check_table(row_idx, row_w, x, "row", op);
  check_table(col_idx, col_w, x, "col", op);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1), op, ": out must be (", x.size(0), ", ",
              x.size(1), ", H_out, W_out), got ", out.sizes());
  TORCH_CHECK(out.size(2) == row_idx.size(0) && out.size(3) == col_idx.size(0), op, ": out spatial size ",
              out.sizes(), " does not match the tables (", row_idx.size(0), ", ", col_idx.size(0), ")");
  check_output(out, "out", op);
  if (out.numel() == 0) return;
  at::assert_no_overlap(out, x);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(kc::blur_gather(dtype, in4(x), table_of(row_idx, row_w), table_of(col_idx, col_w), out4(out), stream),
           op);
}

void check_max_params(int64_t kmax, int64_t pmax, const char* op) {
  TORCH_CHECK(kmax >= 1 && kmax <= 3, op, ": kmax must be 1, 2 or 3, got ", kmax);
  TORCH_CHECK(pmax >= 0 && pmax <= kmax / 2, op, ": pmax must be in [0, kmax // 2], got ", pmax);
}

// max_pool2d's windows must each hold an input element: an empty spatial axis leaves them padding only.
void check_max_input(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.size(2) >= 1 && t.size(3) >= 1, op, ": ", name, " must have non-empty spatial sizes, got ",
              t.sizes());
}

void max_blur_forward_cuda(const at::Tensor& x, int64_t kmax, int64_t pmax, int64_t stride_h, int64_t stride_w,
                           const at::Tensor& row_idx, const at::Tensor& row_w, const at::Tensor& col_idx,
                           const at::Tensor& col_w, const at::Tensor& out, const std::optional<at::Tensor>& maybe_codes) {
  const char* op = "ktkernels_C::max_blur_forward_";
  const at::Tensor codes = maybe_codes.value_or(at::Tensor());  // undefined: no backward to come, no codes
  check_max_params(kmax, pmax, op);
  TORCH_CHECK(stride_h >= 1 && stride_w >= 1 && stride_h <= kIntMax && stride_w <= kIntMax, op,
              ": strides must be >= 1");
  check_4d(x, "x", x, op);
  check_4d(out, "out", x, op);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out dtype ", out.scalar_type(), " != x dtype ",
              x.scalar_type());
  check_max_input(x, "x", op);
  const kc::DType dtype = dtype_of(x, op);
  check_table(row_idx, row_w, x, "row", op);
  check_table(col_idx, col_w, x, "col", op);
  const int64_t hm = x.size(2) + 2 * pmax - kmax + 1;
  const int64_t wm = x.size(3) + 2 * pmax - kmax + 1;
  if (codes.defined()) {
    check_4d(codes, "codes", x, op);
    TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8");
    TORCH_CHECK(
        codes.size(0) == x.size(0) && codes.size(1) == x.size(1) && codes.size(2) == hm && codes.size(3) == wm, op,
        ": codes must be (", x.size(0), ", ", x.size(1), ", ", hm, ", ", wm, "), got ", codes.sizes());
  }
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1), op, ": out must be (", x.size(0), ", ",
              x.size(1), ", H_out, W_out), got ", out.sizes());
  TORCH_CHECK(out.size(2) == row_idx.size(0) && out.size(3) == col_idx.size(0), op, ": out spatial size ",
              out.sizes(), " does not match the tables (", row_idx.size(0), ", ", col_idx.size(0), ")");
  check_output(out, "out", op);
  if (codes.defined()) check_output(codes, "codes", op);
  if (out.numel() == 0) return;
  at::assert_no_overlap(out, x);
  ktk_cuda::Tensor4 codes4{nullptr, {x.size(0), x.size(1), hm, wm}, {0, 0, 0, 0}};  // sizes only: no stores
  if (codes.defined()) {
    at::assert_no_overlap(codes, x);
    at::assert_no_overlap(codes, out);
    codes4 = out4(codes);
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(kc::max_blur_forward(dtype, in4(x), static_cast<int>(kmax), static_cast<int>(pmax),
                                static_cast<int>(stride_h), static_cast<int>(stride_w), table_of(row_idx, row_w),
                                table_of(col_idx, col_w), out4(out), codes4, stream),
           op);
}

void max_blur_backward_cuda(const at::Tensor& grad, const at::Tensor& codes, int64_t kmax, int64_t pmax,
                            const at::Tensor& row_idx, const at::Tensor& row_w, const at::Tensor& col_idx,
                            const at::Tensor& col_w, const at::Tensor& grad_input) {
  const char* op = "ktkernels_C::max_blur_backward_";
  check_max_params(kmax, pmax, op);
  check_4d(grad_input, "grad_input", grad_input, op);
  check_4d(grad, "grad", grad_input, op);
  check_4d(codes, "codes", grad_input, op);
  TORCH_CHECK(grad.scalar_type() == grad_input.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
              " != grad_input dtype ", grad_input.scalar_type());
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8");
  check_max_input(grad_input, "grad_input", op);
  const kc::DType dtype = dtype_of(grad_input, op);
  check_table(row_idx, row_w, grad_input, "row", op);
  check_table(col_idx, col_w, grad_input, "col", op);
  const int64_t n = grad_input.size(0), c = grad_input.size(1);
  const int64_t hm = grad_input.size(2) + 2 * pmax - kmax + 1;
  const int64_t wm = grad_input.size(3) + 2 * pmax - kmax + 1;
  TORCH_CHECK(codes.size(0) == n && codes.size(1) == c && codes.size(2) == hm && codes.size(3) == wm, op,
              ": codes must be (", n, ", ", c, ", ", hm, ", ", wm, "), got ", codes.sizes());
  TORCH_CHECK(grad.size(0) == n && grad.size(1) == c, op, ": grad must be (", n, ", ", c, ", H_out, W_out), got ",
              grad.sizes());
  TORCH_CHECK(row_idx.size(0) == hm && col_idx.size(0) == wm, op,
              ": backward tables must be the adjoint tables on the max-map grid (", hm, ", ", wm, " rows), got (",
              row_idx.size(0), ", ", col_idx.size(0), ")");
  check_output(grad_input, "grad_input", op);
  if (grad_input.numel() == 0) return;
  at::assert_no_overlap(grad_input, grad);
  at::assert_no_overlap(grad_input, codes);

  const c10::cuda::CUDAGuard guard(grad_input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(kc::max_blur_backward(dtype, in4(grad), in4(codes), static_cast<int>(kmax), static_cast<int>(pmax),
                                 table_of(row_idx, row_w), table_of(col_idx, col_w), out4(grad_input), stream),
           op);
}

}  // namespace

TORCH_LIBRARY_IMPL(ktkernels_C, CUDA, m) {
  m.impl("blur_gather_", &blur_gather_cuda);
  m.impl("max_blur_forward_", &max_blur_forward_cuda);
  m.impl("max_blur_backward_", &max_blur_backward_cuda);
}
