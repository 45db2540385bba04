// exp_poly.h — the constants of the vectorized expf every SIMD path uses, and its scalar twin.
//
//   e^x = 2^n · e^r,  n = round(x·log2 e),  r = x − n·ln2 ∈ [−ln2/2, ln2/2]
//
// r is formed in two FMA steps with ln2 split in a short high part (n·LN2_HI exact for every n used)
// and a low correction (Cody & Waite), then e^r = 1 + (r + r²·q(r)) with q a degree-4 polynomial
// fitted to the relative error of e^r on [−ln2/2, ln2/2] (max 3e-9 in exact arithmetic; ~1 ulp
// after fp32 rounding). Adding the 1 last keeps r's low bits. Inputs below ln(FLT_MIN) give exactly
// 0 — in particular −inf (a banned logit) gives 0, never NaN —, inputs above 88 give +inf (the
// kernels only pass x − max ≤ 0, so the last 0.7 before fp32 overflow do not matter) and NaN stays NaN.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

namespace grpo_fast {
namespace cpu {

constexpr float EXP_LOG2E = 1.44269504088896341f;
constexpr float EXP_LN2_HI = 0.693359375f;       // 355/512, 9 significant bits: n·LN2_HI is exact
constexpr float EXP_LN2_LO = -2.12194440e-4f;    // ln 2 − LN2_HI
constexpr float EXP_MIN_X = -87.3365447504f;     // ln(FLT_MIN): below, the result is flushed to 0
constexpr float EXP_MAX_X = 88.0f;               // above, +inf (true overflow is at 88.72; keeps n <= 127)
constexpr float EXP_C2 = 4.999999404e-01f;
constexpr float EXP_C3 = 1.666652113e-01f;
constexpr float EXP_C4 = 4.166838899e-02f;
constexpr float EXP_C5 = 8.368710056e-03f;
constexpr float EXP_C6 = 1.381461043e-03f;

// Scalar version of the same algorithm (portable path, and reference for the tests' exp check).
inline float expf_poly(float x) {
  if (x < EXP_MIN_X) return 0.f;  // false for NaN: NaN goes on and stays NaN
  if (x > EXP_MAX_X) return INFINITY;
  const float xc = x;
  const float n = rintf(xc * EXP_LOG2E);
  float r = fmaf(-n, EXP_LN2_HI, xc);
  r = fmaf(-n, EXP_LN2_LO, r);
  float q = fmaf(EXP_C6, r, EXP_C5);
  q = fmaf(q, r, EXP_C4);
  q = fmaf(q, r, EXP_C3);
  q = fmaf(q, r, EXP_C2);
  const float p = fmaf(q, r * r, r) + 1.f;
  if (x != x) return x;
  // 2^n built in the exponent field: n lies in [-126, 127] on [EXP_MIN_X, EXP_MAX_X].
  const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace cpu
}  // namespace grpo_fast
