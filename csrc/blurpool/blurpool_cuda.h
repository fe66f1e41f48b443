// Launchers of the blur-pool CUDA kernels (blurpool_kernels_cuda.cu), shared with the torch-facing
// wrappers (blurpool_cuda.cpp). Plain C++: no torch or ATen types cross this boundary.
//
// Every launcher takes raw pointers, sizes and strides (in elements, int64), enqueues its kernel(s)
// on `stream` of the current device, and returns nullptr on success or a static, NUL-terminated
// error message (a cudaGetErrorString text or a literal) that the caller turns into an exception.
// Shapes are validated by the caller; the launchers only refuse what the kernels cannot index.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/cuda_types.h"

namespace ktk_blurpool_cuda {

using ktk_cuda::DType;
using ktk_cuda::Tensor4;

// One axis' gather table: `len` rows of `k` (index int32, weight float32) pairs, contiguous.
struct Table {
  const int32_t* idx;
  const float* w;
  int64_t len;
  int64_t k;
};

// out[n,c,i,j] = sum_u sum_v rows.w[i,u] * cols.w[j,v] * x[n,c,rows.idx[i,u],cols.idx[j,v]]
const char* blur_gather(DType dtype, const Tensor4& x, const Table& rows, const Table& cols, const Tensor4& out,
                        cudaStream_t stream);

// out = gather (forward tables) of the stride-1 max map m of x; codes (uint8, N x C x Hm x Wm)
// receive a*kmax+b of every picked element, each written exactly once.
const char* max_blur_forward(DType dtype, const Tensor4& x, int kmax, int pmax, int stride_h, int stride_w,
                             const Table& rows, const Table& cols, const Tensor4& out, const Tensor4& codes,
                             cudaStream_t stream);

// grad_input = routing, through codes, of gm = gather (adjoint tables on the max-map grid) of grad.
const char* max_blur_backward(DType dtype, const Tensor4& grad, const Tensor4& codes, int kmax, int pmax,
                              const Table& rows, const Table& cols, const Tensor4& grad_input,
                              cudaStream_t stream);

}  // namespace ktk_blurpool_cuda
