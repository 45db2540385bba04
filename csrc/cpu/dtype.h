// dtype.h — scalar fp32 <-> bf16 / fp16 conversions and the dtype tags the CPU kernels dispatch on.
//
// Portable C++ (no intrinsics): used for row tails, the target element of each row and by the
// portable SIMD path. Rounding is round-to-nearest-even, as torch's .to(bfloat16/float16), so a
// gradient written here equals torch's rounding of the same fp32 value.
#pragma once

#include <stdint.h>
#include <string.h>

#include "grpo_args.h"  // enum DType: the codes grpo_fast/backends/_native.py passes

namespace grpo_fast {
namespace cpu {

// Tags: the kernels are templated on the storage type of the logits / gradient.
struct F32 { using T = float; static constexpr int code = DTYPE_F32; };
struct BF16 { using T = uint16_t; static constexpr int code = DTYPE_BF16; };
struct F16 { using T = uint16_t; static constexpr int code = DTYPE_F16; };

inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// bf16 is the top half of an fp32.
inline float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);               // round half to even
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m · 2^-24 is exact in fp32
    const float v = (float)m * 5.9604644775390625e-08f;
    return f32_from_bits(sign | f32_bits(v));
  }
  if (e == 31) return f32_from_bits(sign | 0x7f800000u | (m << 13));  // inf / NaN
  return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));         // rebias 15 -> 127
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (a >= 0x47800000u) return sign | 0x7c00u;  // |f| >= 2^16 (or inf): overflows to inf
  const int e = (int)(a >> 23) - 127;
  if (e >= -14) {  // a normal half: keep 10 of the 23 mantissa bits, round the other 13 to even
    const uint32_t m = a & 0x7fffffu;
    uint32_t h = ((uint32_t)(e + 15) << 10) | (m >> 13);
    const uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // a carry may round up to inf: right
    return sign | (uint16_t)h;
  }
  if (e < -25) return sign;  // below half the smallest subnormal (2^-24): rounds to ±0
  // Subnormal half: the value in units of 2^-24 is the 24-bit significand shifted right by -(e+1).
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const int shift = -(e + 1);  // 14 .. 24
  uint32_t h = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) h += 1;
  return sign | (uint16_t)h;
}

inline float to_f32(F32, float v) { return v; }
inline float to_f32(BF16, uint16_t v) { return bf16_to_f32(v); }
inline float to_f32(F16, uint16_t v) { return f16_to_f32(v); }
inline float from_f32(F32, float v) { return v; }
inline uint16_t from_f32(BF16, float v) { return f32_to_bf16(v); }
inline uint16_t from_f32(F16, float v) { return f32_to_f16(v); }

}  // namespace cpu
}  // namespace grpo_fast
