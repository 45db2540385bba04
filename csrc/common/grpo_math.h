// grpo_math.h — the per-token GRPO math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) backends.
//
// Header-only, no dependencies. Every function is GF_HD (host + device under nvcc, plain inline
// otherwise), so the CPU tests exercise exactly the code the CUDA kernels run.
//
// What lives here: everything that happens to one token *after* its log-prob is known — the
// importance ratio, the per-token loss of every TRL loss type, the KL estimators, the clip flags, and
// the two partial derivatives the gradient needs — plus the per-row aggregation weight and the
// group-relative advantage. What does not: the pass over the V logits (online logsumexp), which each
// backend writes in its own idiom (SIMD on CPU, warps on CUDA).
//
// The formulas are docs/spec.md (in the repository root); grpo_fast/reference.py is the same math in eager PyTorch.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline
#endif

namespace grpo_fast {

// Codes shared with grpo_fast/_config.py (the Python side builds the same integers).
// The kernels see a loss type only through its per-token formula (LOSS_TABLE's family): loss types
// of one family differ only in their aggregation, which the per-token weights from Python carry.
enum LossFamily : int32_t { CLIP = 0, IS_WEIGHT = 1, SOFT_GATE = 2 };
enum KlEstimator : int32_t { K3 = 0, K1 = 1, K2 = 2 };
enum Level : int32_t { TOKEN = 0, SEQUENCE = 1 };
enum ScaleRewards : int32_t { SCALE_NONE = 0, SCALE_GROUP = 1, SCALE_BATCH = 2 };

// Indices of the stats vector every backend returns (grpo_fast/_config.py: STAT_*). All entries are
// SUMS, so chunks of tokens add up: [Σ w·loss, Σ m·entropy, Σ m·kl, #low, #high, #region, #cispo].
// How the flags are counted is count_flags() below. Python divides.
enum Stat : int32_t {
  STAT_LOSS = 0, STAT_ENTROPY = 1, STAT_KL = 2, STAT_CLIP_LOW = 3, STAT_CLIP_HIGH = 4,
  STAT_CLIP_REGION = 5, STAT_CISPO_CLIP = 6, NUM_STATS = 8
};

// Run-time options. Floats are run-time values on every backend (never compile-time), so a new
// epsilon or beta never recompiles a kernel.
struct LossParams {
  int32_t family;              // LossFamily
  int32_t kl_estimator;        // KlEstimator
  int32_t level;               // Level
  int32_t has_delta;           // 1: two-sided clipping with r1 = min(r, delta)
  int32_t bias_correction_kl;  // 1: kl *= r
  float temperature;
  float eps_low, eps_high, delta;
  float beta;                  // 0 disables the KL term (ref may then be absent)
  float sapo_temp_pos, sapo_temp_neg;
  // verl's per-token forms (grpo_fast/verl_losses.py: fused_policy_loss), generalizing the families:
  float log_ratio_clamp;  // > 0: r = exp(clamp(s, ±c)), no gradient through r where the clamp is active; 0: off
  float dual_clip_c;      // > 0 (CLIP): for A < 0 the loss is at most −A·c (verl's dual clip); 0: off
  float is_lo, is_hi;     // IS_WEIGHT: the weight is clamp(r, is_lo, is_hi) (TRL cispo [0, εh], verl cispo
                          // [1−εl, 1+εh], gpg and dro [1, 1])
};

// What one token contributes, before aggregation. The caller multiplies by the token's aggregation
// weight w = m·c_b, computed once in Python (grpo_fast/validation.py: aggregation_weights).
//   loss     = isr * L + beta * kl
//   d_logp   = ∂loss/∂logp with r held fixed        (cispo's logp factor, the KL term)
//   d_ratio  = ∂loss/∂r    with logp held fixed     (every ratio-dependent term)
// At token level dr/dlogp = r, so g = w * (d_logp + r * d_ratio). At sequence level r is the row's
// ratio and dr/dlogp[t] = r * m[t] / max(Σm, 1): the row's Σ w·d_ratio is needed first (two passes).
struct TokenTerms {
  float loss;
  float kl;        // after the bias correction (the value that enters the loss and the kl metric)
  float d_logp;
  float d_ratio;
  bool clip_low, clip_high, cispo_clip;
};

GF_HD float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// min / max that return NaN when either operand is NaN, as torch.min / torch.clamp do (fminf and
// fmaxf return the other operand, which would turn a NaN logit into a finite loss).
GF_HD float min_nan(float a, float b) { return (a != a || a < b) ? a : b; }
GF_HD float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// logp: this token's log-prob; ref: reference log-prob (ignored when beta == 0); A: advantage;
// isr: importance-sampling correction of the rollout engine (1 when absent); r: the ratio
// (exp(logp - old) at token level, the row's exp(s) at sequence level).
GF_HD TokenTerms token_terms(const LossParams& p, float logp, float ref, float A, float isr, float r) {
  TokenTerms o;
  float L = 0.f, dL_dr = 0.f, dL_dlogp = 0.f;
  o.clip_low = o.clip_high = o.cispo_clip = false;
  // verl's log-ratio clamp: r = exp(clamp(s, ±c)) = clamp(r, e^−c, e^c); where it is active (strictly
  // outside, as torch.clamp passes the gradient at the bounds) r is a constant: no gradient through it.
  float dr_pass = 1.f;
  if (p.log_ratio_clamp > 0.f) {
    const float rmax = expf(p.log_ratio_clamp), rmin = expf(-p.log_ratio_clamp);
    if (r > rmax) { r = rmax; dr_pass = 0.f; }
    else if (r < rmin) { r = rmin; dr_pass = 0.f; }
  }
  if (p.family == CLIP) {
    // L = -min(r1·A, r2·A), r2 = clamp(r, 1-εl, 1+εh), r1 = min(r, δ) or r.
    // The derivative follows torch: min() splits a tie half/half, clamp passes the gradient on
    // [lo, hi] inclusive, so this equals autograd through the reference.
    const float lo = 1.f - p.eps_low, hi = 1.f + p.eps_high;
    const float r2 = min_nan(max_nan(r, lo), hi);
    const float r1 = p.has_delta ? min_nan(r, p.delta) : r;
    const float d1 = (!p.has_delta || r <= p.delta) ? 1.f : 0.f;  // dr1/dr
    const float d2 = (r >= lo && r <= hi) ? 1.f : 0.f;             // dr2/dr
    const float v1 = r1 * A, v2 = r2 * A;
    float dmin_dr;
    if (v1 < v2) dmin_dr = A * d1;
    else if (v2 < v1) dmin_dr = A * d2;
    else if (v1 == v2) dmin_dr = 0.5f * A * (d1 + d2);
    else dmin_dr = v1 + v2;  // a NaN operand: NaN, as autograd gives
    L = -min_nan(v1, v2);
    dL_dr = -dmin_dr;
    if (p.dual_clip_c > 0.f && A < 0.f) {
      // verl's dual clip: min(L, −A·c); torch.minimum splits a tie half/half, the cap has no r in it
      const float cap = -A * p.dual_clip_c;
      if (L > cap) { L = cap; dL_dr = 0.f; }
      else if (L == cap) dL_dr *= 0.5f;
    }
    o.clip_low = (r < lo) && (A < 0.f);
    o.clip_high = (r > hi) && (A > 0.f);
  } else if (p.family == IS_WEIGHT) {
    // L = -stopgrad(clamp(r, lo, hi))·A·logp: no gradient through the ratio.
    const float c = min_nan(max_nan(r, p.is_lo), p.is_hi);
    L = -c * A * logp;
    dL_dlogp = -c * A;
    o.cispo_clip = (r > p.is_hi) && (A > 0.f);
  } else {  // SOFT_GATE (SAPO): L = -(4/τs)·σ(τs(r-1))·A,  dL/dr = -4·σ(1-σ)·A
    const float ts = A > 0.f ? p.sapo_temp_pos : p.sapo_temp_neg;
    const float s = sigmoidf_(ts * (r - 1.f));
    L = -(4.f / ts) * s * A;
    dL_dr = -4.f * s * (1.f - s) * A;
  }
  o.loss = isr * L;
  o.d_ratio = isr * dL_dr;
  o.d_logp = isr * dL_dlogp;
  o.kl = 0.f;
  if (p.beta != 0.f) {
    // d = ref - logp. k3 = e^d - d - 1 (DeepSeekMath / TRL / verl low_var_kl), k1 = -d, k2 = d²/2.
    const float d = ref - logp;
    float kl, dkl;  // dkl = ∂kl/∂logp
    if (p.kl_estimator == K3) { const float ed = expf(d); kl = ed - d - 1.f; dkl = 1.f - ed; }
    else if (p.kl_estimator == K1) { kl = -d; dkl = 1.f; }
    else { kl = 0.5f * d * d; dkl = -d; }
    if (p.bias_correction_kl) {
      o.d_ratio += p.beta * kl;  // ∂(r·kl)/∂r
      kl *= r;
      dkl *= r;
    }
    o.kl = kl;
    o.loss += p.beta * kl;
    o.d_logp += p.beta * dkl;
  }
  o.d_ratio *= dr_pass;
  return o;
}

// The clip-flag rule, for every C++/CUDA kernel (reference.py: flag_counts is the same rule in eager
// PyTorch): the flags of token t count with weight m (per valid token), except at sequence level with a
// per-row advantage, where the ratio and the advantage are the row's, so its flags are the row's and
// count once per row, masked or not (reference.py's masked_mean of a (B, 1) tensor is a mean over
// rows): weight 1 on the row's first token, 0 on the others. A caller with the row's first token
// masked still evaluates its terms (the flags depend only on r and A). acc[STAT_CLIP_*] += weight·flag.
GF_HD float flag_weight(int32_t level, bool adv_per_token, int64_t t, float m) {
  return (level == SEQUENCE && !adv_per_token) ? (t == 0 ? 1.f : 0.f) : m;
}

template <typename Acc>
GF_HD void count_flags(Acc* acc, bool clip_low, bool clip_high, bool cispo_clip, float weight) {
  acc[STAT_CLIP_LOW] += clip_low ? weight : 0.f;
  acc[STAT_CLIP_HIGH] += clip_high ? weight : 0.f;
  acc[STAT_CLIP_REGION] += (clip_low || clip_high) ? weight : 0.f;
  acc[STAT_CISPO_CLIP] += cispo_clip ? weight : 0.f;
}

// Group-relative advantages of rows [k·G, (k+1)·G) from their rewards (float64 statistics).
// A group whose rewards are all equal gets exactly 0 (never NaN, never a rounding residue).
// batch_std is the unbiased std of all B rewards (only read for SCALE_BATCH).
GF_HD void group_advantages_of_group(const float* rewards, int64_t k, int64_t G, int32_t scale,
                                     double adv_eps, double batch_std, float* out) {
  const float* r = rewards + k * G;
  double mean = 0.0, mn = r[0], mx = r[0];
  for (int64_t i = 0; i < G; ++i) { mean += r[i]; mn = fmin(mn, (double)r[i]); mx = fmax(mx, (double)r[i]); }
  mean /= (double)G;
  double var = 0.0;
  for (int64_t i = 0; i < G; ++i) { const double d = r[i] - mean; var += d * d; }
  const double std = sqrt(var / (double)(G - 1));
  double denom = 1.0;
  if (scale == SCALE_GROUP) denom = std + adv_eps;
  else if (scale == SCALE_BATCH) denom = batch_std + adv_eps;
  for (int64_t i = 0; i < G; ++i)
    out[k * G + i] = (mn == mx) ? 0.f : (float)(((double)r[i] - mean) / denom);
}

// Unbiased std of n rewards (float64), for scale_rewards="batch".
GF_HD double unbiased_std(const float* x, int64_t n) {
  double mean = 0.0;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= (double)n;
  double var = 0.0;
  for (int64_t i = 0; i < n; ++i) { const double d = x[i] - mean; var += d * d; }
  return sqrt(var / (double)(n - 1));
}

}  // namespace grpo_fast
