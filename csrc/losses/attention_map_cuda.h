// Launchers of the attention-map distance CUDA kernels (attention_map_kernels_cuda.cu), shared with the
// torch-facing wrappers (attention_map_cuda.cpp). Plain C++: no torch or ATen types cross this boundary.
//
// Every launcher takes raw pointers and sizes (in elements, int64), enqueues its kernel on `stream` of the
// current device, and returns nullptr on success or a static, NUL-terminated error message (a
// cudaGetErrorString text or a literal) that the caller turns into an exception. Shapes and the rest of the
// contract (attention_map_checks.h) are validated by the caller. dtype is kFloat32 or kFloat64: the maps,
// tables, dist and gradients all have it. One thread block per sample.
//
// Size limit: the DCT-KD kinds (2..4) keep four H x W maps and one table in shared memory, so they take
// H, W <= kMaxTransformSide (64: 80 KiB float32, 160 KiB float64, within the opt-in shared memory of
// A100 and H100); larger maps return an error (Python routes them to the reference). The AT kinds (0, 1)
// stream the maps from global memory and take any size.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/cuda_types.h"

namespace ktk_attention_map_cuda {

using ktk_cuda::DType;

constexpr int64_t kMaxTransformSide = 64;

// dist[n] = distance between map_s[n] and map_t[n]. map_s, map_t: (N, H, W) contiguous; left (2, H, H),
// right (2, W, W) contiguous (read for kinds 2..4 only); dist (N,) contiguous.
const char* attention_map_distance(DType dtype, int kind, int64_t N, int64_t H, int64_t W, const void* map_s,
                                   const void* map_t, const void* left, const void* right, void* dist,
                                   cudaStream_t stream);

// grad_map_s[n] = grad_dist[n * grad_dist_stride] * d dist[n] / d map_s[n]; grad_map_s (N, H, W) contiguous.
const char* attention_map_distance_backward(DType dtype, int kind, int64_t N, int64_t H, int64_t W,
                                            const void* map_s, const void* map_t, const void* grad_dist,
                                            int64_t grad_dist_stride, const void* left, const void* right,
                                            void* grad_map_s, cudaStream_t stream);

}  // namespace ktk_attention_map_cuda
