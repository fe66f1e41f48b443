// Element conversions of the CPU kernels: load as the accumulation type (to_acc), store back (from_acc).
//
// Why not static_cast: without F16C at compile time (setup.py builds for the x86-64 baseline, and the AVX2
// clones of cpu_isa.h do not assume F16C), c10::Half converts through code that GCC 12 does not vectorise
// ("control flow in loop"), so every fp16 element took a scalar, branchy detour: fp16 blur pooling ran 3.6x and
// max-blur 20x slower than bf16 (benchmarks/NOTES.md, "fp16 on the CPU"). The fp16 conversions below are the
// same IEEE maths written as integer masks, which vectorise in both builds. They are exact and bit-identical to
// the F16C instructions with round-to-nearest-even: checked once over all 2^16 halves and all 2^32 floats
// against vcvtph2ps / vcvtps2ph; tests/test_blurpool.py keeps the fp16 edge cases (subnormals, ties, overflow,
// inf, NaN) under test through the ops. Every other dtype keeps static_cast.
//
// Use them in loops the compiler vectorises (blur pool, DCT, channel power, transfer statistics), or eight lanes
// at once (widen8). In scalar code c10's branches predict well and are cheaper: the soft-target rows,
// converted lane by lane with half_bits_to_float, got 1.3x slower.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// The helpers below also take and return 32-byte GCC vectors. They are inline and never cross a call boundary, so
// GCC's note that such returns change the ABI without AVX (in the baseline build) does not apply; it is silenced
// for the files that include this header, as it is emitted where the helpers are inlined.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ktk_cpu {

// All-ones when cond holds, else 0: a select the vectoriser turns into a blend.
inline uint32_t mask_if(bool cond) {
  return 0u - static_cast<uint32_t>(cond);
}

template <typename U>
inline U select_bits(U mask, U if_set, U otherwise) {
  return (if_set & mask) | (otherwise & ~mask);
}

// Eight lanes at once, for the kernels that hold a row's values in GCC vectors (transfer statistics, soft target).
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef int32_t I32x8 __attribute__((vector_size(32)));
typedef float F32x8 __attribute__((vector_size(32)));

inline U32x8 mask_if(I32x8 cond) {  // a vector comparison gives -1 / 0 per lane
  return reinterpret_cast<U32x8>(cond);
}

// The bits of float(em) * 2^-24, em < 2^15.
inline uint32_t scaled_subnormal_bits(uint32_t em) {
  return __builtin_bit_cast(uint32_t, static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
}
inline U32x8 scaled_subnormal_bits(U32x8 em) {
  return reinterpret_cast<U32x8>(__builtin_convertvector(reinterpret_cast<I32x8>(em), F32x8) * 0x1p-24f);
}

// IEEE binary16 bits (zero-extended to 32) -> float bits, for U = uint32_t or U32x8. Normal numbers rebias the
// exponent (127 - 15 = 112 = 0x38000000 >> 23), inf/NaN rebias twice more to reach exponent 255 (and NaNs get
// the quiet bit, as vcvtph2ps sets it), subnormals are their integer mantissa times 2^-24.
template <typename U>
inline U half_to_float_bits(U h) {
  const U em = h & 0x7fffu;  // exponent and mantissa
  const U rebiased = (em << 13) + 0x38000000u + (mask_if(em >= 0x7c00u) & 0x38000000u);
  const U magnitude = select_bits(mask_if(em < 0x0400u), scaled_subnormal_bits(em), rebiased);
  const U quiet = mask_if(em > 0x7c00u) & 0x00400000u;
  return magnitude | quiet | ((h & 0x8000u) << 16);
}

inline float half_bits_to_float(uint16_t h) {
  return __builtin_bit_cast(float, half_to_float_bits<uint32_t>(h));
}

// Eight contiguous bf16 or fp16 values widened to floats in registers, exactly as to_acc widens each one
// (a bf16 is the high half of a float's bits).
template <typename scalar_t>
inline F32x8 widen8(const scalar_t* p) {
  static_assert(std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>);
  U16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const U32x8 bits = __builtin_convertvector(h, U32x8);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return reinterpret_cast<F32x8>(bits << 16);
  } else {
    return reinterpret_cast<F32x8>(half_to_float_bits(bits));
  }
}

// float -> IEEE binary16 bits, rounding to nearest even. Normal results: drop 13 mantissa bits with the
// round-half-even increment. Results below 2^-14: adding 0.5f (ulp 2^-24, the fp16 subnormal step) makes the
// float adder do the rounding. |f| >= 65520 rounds to inf; NaNs keep their top payload bits and become quiet.
inline uint16_t float_to_half_bits(float f) {
  const uint32_t w = __builtin_bit_cast(uint32_t, f);
  const uint32_t a = w & 0x7fffffffu;
  const uint32_t r = a - 0x38000000u;
  const uint32_t normal = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;
  const uint32_t tiny = __builtin_bit_cast(uint32_t, __builtin_bit_cast(float, a) + 0.5f) - 0x3f000000u;
  uint32_t h = select_bits(mask_if(a < 0x38800000u), tiny, normal);
  h = select_bits(mask_if(a >= 0x477ff000u), 0x7c00u, h);
  h = select_bits(mask_if(a > 0x7f800000u), 0x7e00u | ((a >> 13) & 0x03ffu), h);
  return static_cast<uint16_t>(h | ((w >> 16) & 0x8000u));
}

template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    return half_bits_to_float(v.x);
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    return c10::Half(float_to_half_bits(v), c10::Half::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

}  // namespace ktk_cpu
