// The plain-C++ types every family's CUDA launchers take: no torch or ATen type crosses into a .cu file
// (faster builds), so tensors travel as a dtype tag and a 4-D strided view.
#pragma once

#include <cstdint>

namespace ktk_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// A 4-D (N, C, H, W) strided view, sizes and strides in elements. `data` is const for inputs (cast inside).
struct Tensor4 {
  void* data;
  int64_t size[4];
  int64_t stride[4];
};

}  // namespace ktk_cuda
