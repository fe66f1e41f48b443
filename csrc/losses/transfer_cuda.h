// Launchers of the pixel/global transfer loss's CUDA kernels (transfer_kernels_cuda.cu), shared with the
// torch-facing wrappers (transfer_cuda.cpp). Plain C++: no torch or ATen types cross this boundary.
//
// Every launcher takes raw pointers, sizes and strides (in elements, int64), enqueues its kernel(s) on `stream`
// of the current device, and returns nullptr on success or a static, NUL-terminated error message that the
// caller turns into an exception. Shapes are validated by the caller (transfer_checks.h); H*W must fit in int32.
// "acc" below is float, or double for kFloat64 data; J is the number of basis rows (may be 0).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/cuda_types.h"

namespace ktk_losses_cuda {

using ktk_cuda::DType;
using ktk_cuda::Tensor4;

// Bytes of global scratch (acc elements) that transfer_stats needs for these shapes: 0 when every plane is
// reduced by one block, else the per-split partial sums of planes whose positions are split over several blocks.
// The plan depends on the shapes and strides only (not on the device), so results are reproducible anywhere.
const char* transfer_stats_workspace(DType dtype, const Tensor4& s, const Tensor4& t, int64_t J, int64_t* bytes);

// sq (N*C) acc: sum_hw (s - t)^2; proj (2, N*C, J) acc: sum_hw basis[j, hw] s|t; basis (J, H*W) contiguous acc.
// `workspace` holds at least the bytes transfer_stats_workspace asked for (may be null when that was 0).
// H*W > 0 and N*C > 0 (the caller zero-fills or skips).
const char* transfer_stats(DType dtype, const Tensor4& s, const Tensor4& t, const void* basis, int64_t J, void* sq,
                           void* proj, void* workspace, int64_t workspace_bytes, cudaStream_t stream);

// grad = pixel_coef[0] (s - t) + sum_j coef[n, c, j] basis[j, hw] in grad's dtype and strides; pixel_coef is a
// device pointer to one acc value, coef (N*C, J) contiguous acc.
const char* transfer_grad(DType dtype, const Tensor4& s, const Tensor4& t, const void* basis, int64_t J,
                          const void* pixel_coef, const void* coef, const Tensor4& grad, cudaStream_t stream);

}  // namespace ktk_losses_cuda
