// Device-side helpers shared by the families' CUDA kernels (.cu files only): the accumulation type and
// conversions, read-only loads, and the host-side launch helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda_types.h"

namespace ktk_cuda {

// float for fp32/fp16/bf16 data, double for fp64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ T ldg(const T* p) {
  return __ldg(p);
}

template <typename I>
__host__ __device__ __forceinline__ I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

// (n, c, h, w) of the e-th element of an (N, C, H, W) tensor walked in memory order: channels fastest for a
// channels_last walk, else w fastest (NCHW). The elementwise kernels use it to match their output's layout.
template <typename I>
__device__ __forceinline__ void unflatten_nchw(I e, bool channels_last, I C, I H, I W, I& n, I& c, I& h, I& w) {
  if (channels_last) {
    c = e % C;
    I q = e / C;
    w = q % W;
    q /= W;
    h = q % H;
    n = q / H;
  } else {
    w = e % W;
    I q = e / W;
    h = q % H;
    q /= H;
    c = q % C;
    n = q / C;
  }
}

inline const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// +1 when dimension 1 (C) has the smallest |stride|, -1 when a spatial one does, 0 on a tie (stride-0
// broadcasts, all sizes 1). Size-1 dimensions do not count.
inline int layout_vote(const Tensor4& t) {
  auto eff = [&](int d) {
    const int64_t s = t.stride[d] < 0 ? -t.stride[d] : t.stride[d];
    return t.size[d] == 1 ? INT64_MAX : s;
  };
  const int64_t s1 = eff(1);
  const int64_t sp = eff(2) < eff(3) ? eff(2) : eff(3);
  return s1 < sp ? 1 : (sp < s1 ? -1 : 0);
}

// Whether the kernels should run channels-innermost: `first` decides, `second` breaks a tie.
inline bool channels_inner(const Tensor4& first, const Tensor4& second) {
  const int v = layout_vote(first);
  return (v != 0 ? v : layout_vote(second)) > 0;
}

}  // namespace ktk_cuda
