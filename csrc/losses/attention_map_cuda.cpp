// Torch-facing wrappers of the attention-map distance CUDA kernels: argument checks, device guard, current
// stream, then the plain-C++ launchers of attention_map_kernels_cuda.cu. Registered for the CUDA dispatch key
// of the internal ops declared in csrc/registration.cpp.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/cuda_torch.h"
#include "attention_map_checks.h"
#include "attention_map_cuda.h"

namespace {

using ktk_cuda::dtype_of;
namespace ka = ktk_attention_map_cuda;
namespace kc = ktk_attention_map_checks;

// The contract (attention_map_checks.h) plus the CUDA kernels' size limit: the DCT-KD kinds keep the maps in
// shared memory (attention_map_cuda.h); Python sends larger maps to the reference.
void check_cuda(const char* op, const at::Tensor& map_s, int64_t kind) {
  TORCH_CHECK(map_s.is_cuda(), op, ": map_s must be a CUDA tensor, got ", map_s.device());
  if (kc::uses_tables(kind) && map_s.dim() == 3) {
    TORCH_CHECK(map_s.size(1) <= ka::kMaxTransformSide && map_s.size(2) <= ka::kMaxTransformSide, op,
                ": the CUDA kernels of kinds 2..4 (dct_a, dct_b, dct) take maps up to ", ka::kMaxTransformSide,
                " x ", ka::kMaxTransformSide, ", got ", map_s.size(1), " x ", map_s.size(2));
  }
}

void raise_if(const char* err, const char* op) { TORCH_CHECK(err == nullptr, op, " (CUDA): ", err); }

void attention_map_distance_cuda(const at::Tensor& map_s, const at::Tensor& map_t, int64_t kind,
                                 const at::Tensor& left, const at::Tensor& right, const at::Tensor& dist) {
  const char* op = "ktkernels_C::attention_map_distance_";
  kc::check_distance(op, map_s, map_t, kind, left, right, dist);
  check_cuda(op, map_s, kind);
  if (map_s.size(0) == 0) return;

  const c10::cuda::CUDAGuard guard(map_s.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool tables = kc::uses_tables(kind);
  raise_if(ka::attention_map_distance(dtype_of(map_s, op), static_cast<int>(kind), map_s.size(0), map_s.size(1),
                                      map_s.size(2), map_s.const_data_ptr(), map_t.const_data_ptr(),
                                      tables ? left.const_data_ptr() : nullptr,
                                      tables ? right.const_data_ptr() : nullptr, dist.mutable_data_ptr(), stream),
           op);
}

void attention_map_distance_backward_cuda(const at::Tensor& map_s, const at::Tensor& map_t,
                                          const at::Tensor& grad_dist, int64_t kind, const at::Tensor& left,
                                          const at::Tensor& right, const at::Tensor& grad_map_s) {
  const char* op = "ktkernels_C::attention_map_distance_backward_";
  kc::check_distance_backward(op, map_s, map_t, grad_dist, kind, left, right, grad_map_s);
  check_cuda(op, map_s, kind);
  if (map_s.size(0) == 0) return;

  const c10::cuda::CUDAGuard guard(map_s.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool tables = kc::uses_tables(kind);
  raise_if(ka::attention_map_distance_backward(
               dtype_of(map_s, op), static_cast<int>(kind), map_s.size(0), map_s.size(1), map_s.size(2),
               map_s.const_data_ptr(), map_t.const_data_ptr(), grad_dist.const_data_ptr(), grad_dist.stride(0),
               tables ? left.const_data_ptr() : nullptr, tables ? right.const_data_ptr() : nullptr,
               grad_map_s.mutable_data_ptr(), stream),
           op);
}

}  // namespace

TORCH_LIBRARY_IMPL(ktkernels_C, CUDA, m) {
  m.impl("attention_map_distance_", &attention_map_distance_cuda);
  m.impl("attention_map_distance_backward_", &attention_map_distance_backward_cuda);
}
