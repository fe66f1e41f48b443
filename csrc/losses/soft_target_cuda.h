// Launchers of the soft-target CUDA kernels (soft_target_kernels_cuda.cu), shared with the torch-facing wrappers
// (soft_target_cuda.cpp). Plain C++: no torch or ATen types cross this boundary.
//
// The logits s, t are (N, K) with unit stride along K and any row strides (in elements). Every launcher enqueues
// its kernel on `stream` of the current device and returns nullptr on success or a static, NUL-terminated error
// message. Shapes are validated by the caller (soft_target_checks.h). "acc" is float, or double for kFloat64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/cuda_types.h"

namespace ktk_losses_cuda {

using ktk_cuda::DType;

// A logits matrix: its data and row stride (the stride along K is 1).
struct Logits {
  const void* data;
  int64_t row_stride;
};

// rows (N, 3) contiguous acc: [KL(softmax(t/T) || softmax(s/T)), logsumexp(s/T), logsumexp(t/T)] per row.
const char* soft_target_forward(DType dtype, const Logits& s, const Logits& t, int64_t N, int64_t K,
                                double temperature, void* rows, cudaStream_t stream);

// grad_s = g/T (p_s - p_t), grad_t = g/T p_t (log p_t - log p_s - kl) with g = grad_rows[n] (N,) acc and the
// forward's rows; grad_s / grad_t (N, K) contiguous in the logits' dtype, each skipped when null.
const char* soft_target_backward(DType dtype, const Logits& s, const Logits& t, int64_t N, int64_t K,
                                 double temperature, const void* rows, const void* grad_rows, void* grad_s,
                                 void* grad_t, cudaStream_t stream);

}  // namespace ktk_losses_cuda
