// Torch side of the CUDA launch boundary, shared by the families' *_cuda.cpp wrappers: an at::Tensor to the
// DType tag and the Tensor4 view that the launchers in the .cu files take.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cuda_types.h"

namespace ktk_cuda {

inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16, float64)");
  return DType::kFloat32;
}

inline Tensor4 view4(const at::Tensor& t, void* data) {
  Tensor4 v;
  v.data = data;
  for (int d = 0; d < 4; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

inline Tensor4 in4(const at::Tensor& t) { return view4(t, const_cast<void*>(t.const_data_ptr())); }
inline Tensor4 out4(const at::Tensor& t) { return view4(t, t.mutable_data_ptr()); }

}  // namespace ktk_cuda
