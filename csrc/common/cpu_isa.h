// Run-time instruction-set variants of the CPU kernels, shared by the families' *_cpu.cpp files.
//
// setup.py compiles for the x86-64 baseline (SSE2). A work function can also be compiled for AVX2+FMA:
// KTK_DEFINE_RUNNER makes a clone with the target attribute and `flatten` (everything it calls is inlined
// into it and compiled for AVX2) and a CHUNK_run dispatcher that picks the clone when the CPU has AVX2 and
// FMA. ATEN_CPU_CAPABILITY=default forces the baseline, as it does for ATen's own kernels.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#define KTK_X86_CLONES 1
#else
#define KTK_X86_CLONES 0
#endif

namespace ktk_cpu {

inline bool use_avx2() {
  static const bool ok = [] {
#if KTK_X86_CLONES
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return ok;
}

}  // namespace ktk_cpu

// Defines CHUNK_run<scalar_t>(args, begin, end): CHUNK<scalar_t>, or its AVX2+FMA clone. Every dtype gets a
// clone. Until 2026-12-07 fp16/bf16 kept the baseline build in the blur-pool and channel-power kernels, on the
// guess that their conversions dominate. Measured, the clones vectorise the conversions and run 1.5-5.7x faster
// (benchmarks/NOTES.md, "bf16 on the CPU").
#if KTK_X86_CLONES
#define KTK_DEFINE_RUNNER(CHUNK, ARGS)                                                                   \
  template <typename scalar_t>                                                                           \
  __attribute__((target("avx2,fma"), flatten)) void CHUNK##_avx2(const ARGS<scalar_t>& a, int64_t begin, \
                                                                  int64_t end) {                         \
    CHUNK<scalar_t>(a, begin, end);                                                                      \
  }                                                                                                      \
  template <typename scalar_t>                                                                           \
  void CHUNK##_run(const ARGS<scalar_t>& a, int64_t begin, int64_t end) {                                \
    if (::ktk_cpu::use_avx2()) return CHUNK##_avx2<scalar_t>(a, begin, end);                             \
    CHUNK<scalar_t>(a, begin, end);                                                                      \
  }
#else
#define KTK_DEFINE_RUNNER(CHUNK, ARGS)                                    \
  template <typename scalar_t>                                            \
  void CHUNK##_run(const ARGS<scalar_t>& a, int64_t begin, int64_t end) { \
    CHUNK<scalar_t>(a, begin, end);                                       \
  }
#endif
