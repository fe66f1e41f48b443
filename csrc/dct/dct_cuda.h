// Launchers of the DCT-family CUDA kernels (dct_kernels_cuda.cu), shared with the torch-facing wrappers
// (dct_cuda.cpp). Plain C++: no torch or ATen types cross this boundary.
//
// Every launcher takes raw pointers, sizes and strides (in elements, int64), enqueues its kernel(s) on
// `stream` of the current device, and returns nullptr on success or a static, NUL-terminated error
// message (a cudaGetErrorString text or a literal) that the caller turns into an exception. Shapes are
// validated by the caller. "acc" below is float, or double for kFloat64 data.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/cuda_types.h"

namespace ktk_dct_cuda {

using ktk_cuda::DType;
using ktk_cuda::Tensor4;

// Bytes of global scratch (acc elements) that dct_basis2d needs for these shapes on the current device:
// 0 when the planes and both bases fit in shared memory (the fused single-pass kernel), otherwise the
// intermediate product of the two-pass tiled fallback.
const char* dct_basis2d_workspace(DType dtype, const Tensor4& x, const Tensor4& out, int64_t* bytes);

// out[n,c] = left @ x[n,c] @ right^T; left (Ho, H) and right (Wo, W) contiguous acc; `workspace` holds
// at least the bytes dct_basis2d_workspace asked for (may be null when that was 0).
const char* dct_basis2d(DType dtype, const Tensor4& x, const void* left, const void* right, const Tensor4& out,
                        void* workspace, int64_t workspace_bytes, cudaStream_t stream);

// out[n,h,w] = (1/C) sum_c |x[n,c,h,w]|^p; out is (N, H, W) contiguous acc. C >= 1.
const char* channel_power_mean(DType dtype, const Tensor4& x, double p, void* out, cudaStream_t stream);

// grad_x = (p/C) |x|^(p-1) sign(x) grad_map[n,h,w]; grad_map (N, H, W) contiguous acc. C >= 1.
const char* channel_power_mean_backward(DType dtype, const Tensor4& x, const void* grad_map, double p,
                                        const Tensor4& grad_x, cudaStream_t stream);

}  // namespace ktk_dct_cuda
