// Schemas of the internal kernels (namespace ktkernels_C) and the Python module that loads them.
//
// These ops are building blocks, not the public API: ktkernels/<family>/op.py defines the public
// torch.library ops (ktkernels::*) with fake impls and autograd, and calls these for the cpu and
// cuda backends. They write into preallocated outputs so that Python owns shapes and memory formats.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/cpu_isa.h"

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
  // which is never stored; codes[r,c] = a*kmax+b of the element picked (uint8, every r,c written), or with
  // codes None (no backward to come) no codes at all.
  m.def(
      "max_blur_forward_(Tensor x, int kmax, int pmax, int stride_h, int stride_w, Tensor row_idx, "
      "Tensor row_w, Tensor col_idx, Tensor col_w, Tensor(a!) out, Tensor(b!)? codes) -> ()");
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

  // --- losses family (ktkernels/losses) ---
  // Pixel/global transfer loss, forward statistics. s, t: (N, C, H, W), same shape and dtype, any strides;
  // basis: (J, H*W) contiguous acc (J may be 0). sq: (N, C) acc, sq[n,c] = sum_hw (s - t)^2;
  // proj: (2, N, C, J) acc, proj[0|1,n,c,j] = sum_hw basis[j, h*W+w] * (s|t)[n,c,h,w].
  m.def("transfer_stats_(Tensor s, Tensor t, Tensor basis, Tensor(a!) sq, Tensor(b!) proj) -> ()");
  // Its gradient: grad[n,c,h,w] = pixel_coef[0] * (s - t) + sum_j coef[n,c,j] * basis[j, h*W+w], written in
  // grad's dtype (= s's) and strides. pixel_coef: (1,) acc (a device scalar: no host sync); coef: (N, C, J) acc.
  m.def(
      "transfer_grad_(Tensor s, Tensor t, Tensor basis, Tensor pixel_coef, Tensor coef, Tensor(a!) grad) -> ()");
  // Attention-map distance per sample: maps (N, H, W) contiguous acc; kind 0 at_code, 1 at_paper, 2 dct_a,
  // 3 dct_b, 4 dct (ktkernels/losses/reference.py: attention_map_distance); left (2, H, H) and right (2, W, W)
  // acc tables of the transform R = L0 Z R0^T - L1 Z R1^T (kinds 2..4). dist: (N,) acc.
  m.def(
      "attention_map_distance_(Tensor map_s, Tensor map_t, int kind, Tensor left, Tensor right, "
      "Tensor(a!) dist) -> ()");
  // Its gradient with respect to map_s: grad_map_s[n] = grad_dist[n] * d dist[n] / d map_s[n] (N, H, W) acc.
  // The distance is symmetric, so the teacher's gradient is the same call with the maps swapped.
  m.def(
      "attention_map_distance_backward_(Tensor map_s, Tensor map_t, Tensor grad_dist, int kind, Tensor left, "
      "Tensor right, Tensor(a!) grad_map_s) -> ()");
  // Soft targets at temperature T > 0: s, t (N, K) logits, same dtype, unit stride along K. rows (N, 3) acc:
  // [KL(softmax(t/T) || softmax(s/T)), logsumexp(s/T), logsumexp(t/T)] per row.
  m.def("soft_target_forward_(Tensor s, Tensor t, float temperature, Tensor(a!) rows) -> ()");
  // Its gradient, g = grad_rows[n] (N,) acc: grad_s = g/T (p_s - p_t); grad_t = g/T p_t (log p_t - log p_s - kl).
  // grad_s / grad_t are (N, K) contiguous in s's dtype; an empty (numel 0) one is skipped.
  m.def(
      "soft_target_backward_(Tensor s, Tensor t, float temperature, Tensor rows, Tensor grad_rows, "
      "Tensor(a!) grad_s, Tensor(b!) grad_t) -> ()");

  // Which build of the C++ CPU kernels runs: "avx2" (the AVX2+FMA clones) or "default" (the x86-64 baseline;
  // ATEN_CPU_CAPABILITY=default or a CPU without AVX2). Read once per process, as ATen reads its own.
  m.def("cpu_capability() -> str", [] { return std::string(ktk_cpu::use_avx2() ? "avx2" : "default"); });
}
