// Schemas of the internal kernels (namespace ktkernels_C) and the Python module that loads them.
//
// These ops are building blocks, not the public API: ktkernels/<family>/op.py defines the public
// torch.library ops (ktkernels::*) with fake impls and autograd, and calls these for the cpu and
// cuda backends. They write into preallocated outputs so that Python owns shapes and memory formats.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module: importing ktkernels._C runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "ktkernels C++/CUDA kernels; the ops live in torch.ops.ktkernels_C", -1, nullptr, nullptr, nullptr, nullptr,
      nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ktkernels_C, m) {
  // out[n,c,i,j] = sum_u sum_v row_w[i,u] * col_w[j,v] * x[n,c,row_idx[i,u],col_idx[j,v]]
  // Blur-pool forward (tables = R) and backward (tables = R^T) alike; see blurpool/geometry.py.
  m.def(
      "blur_gather_(Tensor x, Tensor row_idx, Tensor row_w, Tensor col_idx, Tensor col_w, "
      "Tensor(a!) out) -> ()");
  // The same gather over the stride-1 max map m[r,c] = max_{a,b<kmax} x[r+a-pmax, c+b-pmax],
  // which is never stored; codes[r,c] = a*kmax+b of the element picked (uint8, every r,c written).
  m.def(
      "max_blur_forward_(Tensor x, int kmax, int pmax, int stride_h, int stride_w, Tensor row_idx, "
      "Tensor row_w, Tensor col_idx, Tensor col_w, Tensor(a!) out, Tensor(b!) codes) -> ()");
  // grad_input[p,q] = sum_{a,b} [codes[r,c] == a*kmax+b] * gm[r,c],  r = p-a+pmax, c = q-b+pmax,
  // with gm = the gather of grad over the adjoint tables (the blur's gradient on the max map).
  m.def(
      "max_blur_backward_(Tensor grad, Tensor codes, int kmax, int pmax, Tensor row_idx, "
      "Tensor row_w, Tensor col_idx, Tensor col_w, Tensor(a!) grad_input) -> ()");
  // out[n,c] = left @ x[n,c] @ right^T for every plane: the separable 2-D DCT with (truncated) basis rows
  // left (H_out, H) and right (W_out, W), and with the transposed bases its backward. left and right are
  // float32 (float64 for float64 x), contiguous; accumulation in float32 (float64).
  m.def("dct_basis2d_(Tensor x, Tensor left, Tensor right, Tensor(a!) out) -> ()");
  // out[n,h,w] = (1/C) sum_c |x[n,c,h,w]|^p; out is (N, H, W) contiguous float32 (float64 for float64 x).
  m.def("channel_power_mean_(Tensor x, float p, Tensor(a!) out) -> ()");
  // grad_x[n,c,h,w] = (p/C) |x|^(p-1) sign(x) grad_map[n,h,w], with sign(0) = 0; grad_map as out above.
  m.def("channel_power_mean_backward_(Tensor x, Tensor grad_map, float p, Tensor(a!) grad_x) -> ()");
}
