// grpo_cpu.cpp — grpo_fast._C_cpu: the fused GRPO loss, token log-probs, and the forward / backward
// of grpo_fast.logprobs (differentiable log-probs and entropy) on CPU.
//
// What it fuses: for every token row (b, t) of the logits (B, T, V), one read of the V logits from
// memory gives the log-sum-exp, the target log-prob and the entropy; the per-token loss, KL and
// clip flags follow (csrc/common/grpo_math.h: token_terms), and the row's gradient
// dz_j = g·(1[j = y] − p_j)/τ is written while the row is still in cache. Memory traffic: read the
// logits once, write the gradient once (sequence-level ratios read the logits a second time: every
// token's log-prob is needed before any gradient).
//
// How it is built: setup.py compiles this one file with -O3 -fopenmp (pybind11, no torch headers:
// the module takes raw data pointers, sizes, strides and dtype codes as keyword arguments from
// grpo_fast/backends/_native.py, the same ones as grpo_fast._C_cuda (csrc/common/grpo_bindings.h),
// so one build serves every torch version). The per-row kernels (row_kernels.h) are compiled three
// times — AVX-512, AVX2+FMA+F16C, portable — and the best one the CPU supports is chosen at import.
//
// Determinism: rows are split over OpenMP threads, but every per-token result is computed by one
// thread from that row alone and stored in a per-token array; the sums are then taken sequentially
// in double in token order. Results are bitwise identical for any thread count.

#include "grpo_bindings.h"  // pybind11 (first: Python.h) and the argument structs (grpo_args.h)

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
// GRPO_FAST_NO_X86_SIMD builds only the portable path on x86 too (what an aarch64 build compiles).
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(GRPO_FAST_NO_X86_SIMD)
#define GF_X86 1
// GCC 12 flags the deliberately undefined pass-through operand of its own AVX-512 intrinsics
// (_mm512_undefined_ps) once they are inlined; the warning points into the header, so silence it there.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "grpo_math.h"
#include "dtype.h"
#include "exp_poly.h"

namespace py = pybind11;

namespace grpo_fast {
namespace cpu {

// What row_stats learns about one token row (x = z/τ).
struct RowStats {
  float xmax;     // max_j x_j
  float sum;      // S = Σ_j e^(x_j − xmax), so lse = xmax + log S
  float log_s;    // log S, formed without losing the small terms of a peaked row (row_stats_impl)
  float logp;     // x_y − lse
  float entropy;  // lse − Σ_j p_j x_j
};

// One instruction set's row kernels, indexed by DType.
struct RowKernels {
  const char* name;
  RowStats (*stats[3])(const void* zrow, int64_t V, float inv_tau, int64_t y, const void* next);
  // stream: non-temporal stores (the destination is not in cache; row_kernels.h, put)
  void (*grad[3])(const void* zrow, void* grow, int64_t V, float inv_tau, float nxmax, float c, bool stream);
  RowStats (*stats_keep[3])(const void* zrow, int64_t V, float inv_tau, int64_t y, float* ebuf, const void* next);
  void (*grad_kept[3])(const float* ebuf, void* grow, int64_t V, float c, bool stream);
  void (*grad_lp[3])(const void* zrow, void* grow, int64_t V, float inv_tau, float xmax, float log_s, float a,
                     float b, bool stream);
  void (*exp)(const float* x, float* y, int64_t n);
  void (*zero)(void* p, int64_t bytes);  // streaming zeros: a gradient row whose logits were not read
  void (*grad_kept_lp[3])(const float* ebuf, const void* zrow, void* grow, int64_t V, float inv_tau, float xmax,
                          float inv_s, float log_s, float a, float b, bool stream);
  void (*bf16)(const float* x, uint16_t* y, int64_t n);  // the vector fp32 -> bf16 stores' conversion (tests)
};

// ---- the row kernels, once per instruction set ----------------------------------------------------
namespace generic {
#define ISA_NAME "generic"
#include "simd_generic.h"
#include "row_kernels.h"
#undef ISA_NAME
}  // namespace generic

#if defined(GF_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
#define ISA_NAME "avx2"
#include "simd_avx2.h"
#include "row_kernels.h"
#undef ISA_NAME
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
namespace avx512 {
#define ISA_NAME "avx512"
#include "simd_avx512.h"
#include "row_kernels.h"
#undef ISA_NAME
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// AVX-512 with AVX512_BF16 (AMD Zen 4 and later, Intel Cooper Lake / Sapphire Rapids and later): the same
// kernels, bf16 stores in one conversion instruction (simd_avx512.h, to_16bit). Compilers older than
// GCC 11 / clang 12 (the target and its __builtin_cpu_supports name) get the three paths above only.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define GF_HAS_AVX512_BF16 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif
namespace avx512bf16 {
#define ISA_NAME "avx512bf16"
#define GF_AVX512_BF16 1
#include "simd_avx512.h"
#include "row_kernels.h"
#undef GF_AVX512_BF16
#undef ISA_NAME
}  // namespace avx512bf16
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // AVX512_BF16 target
#endif  // GF_X86

// ---- run-time choice of the instruction set ------------------------------------------------------
static bool isa_supported(const std::string& name) {
  if (name == "generic") return true;
#if defined(GF_X86)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx2") return avx2;  // every AVX2 CPU has F16C
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (name == "avx512") return avx512;
#if defined(GF_HAS_AVX512_BF16)
  if (name == "avx512bf16") return avx512 && __builtin_cpu_supports("avx512bf16");
#endif
#endif
  return false;
}

// Every path, widest first.
static const char* const kIsas[] = {"avx512bf16", "avx512", "avx2", "generic"};

static const RowKernels* kernels_by_name(const std::string& name) {
#if defined(GF_X86)
#if defined(GF_HAS_AVX512_BF16)
  if (name == "avx512bf16") return &avx512bf16::kernels;
#endif
  if (name == "avx512") return &avx512::kernels;
  if (name == "avx2") return &avx2::kernels;
#endif
  if (name == "generic") return &generic::kernels;
  return nullptr;
}

static const RowKernels* best_kernels() {
  // GRPO_FAST_CPU_ISA=avx512|avx2|generic forces a narrower path (debugging, comparing paths).
  const char* env = getenv("GRPO_FAST_CPU_ISA");
  if (env && *env && isa_supported(env) && kernels_by_name(env)) return kernels_by_name(env);
  for (const char* name : kIsas)
    if (isa_supported(name) && kernels_by_name(name)) return kernels_by_name(name);
  return &generic::kernels;
}

static std::atomic<const RowKernels*> g_kernels{best_kernels()};

static inline int64_t elem_size(int32_t dtype) { return dtype == DTYPE_F32 ? 4 : 2; }

// ---- the fused loss --------------------------------------------------------------------------------
enum : uint8_t { FLAG_LOW = 1, FLAG_HIGH = 2, FLAG_CISPO = 4 };
static inline uint8_t pack_flags(const TokenTerms& tt) {
  return (uint8_t)((tt.clip_low ? FLAG_LOW : 0) | (tt.clip_high ? FLAG_HIGH : 0) | (tt.cispo_clip ? FLAG_CISPO : 0));
}

// Tokens per OpenMP work item: about 16k logits, so tiny vocabularies do not pay per-row overhead.
static inline int64_t chunk_tokens(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

// grow[y] = v in the row's dtype: the target entry, rewritten after the row kernel.
static inline void store_entry(int32_t dtype, void* grow, int64_t y, float v) {
  char* gy = static_cast<char*>(grow) + y * elem_size(dtype);
  if (dtype == DTYPE_F32) *reinterpret_cast<float*>(gy) = v;
  else if (dtype == DTYPE_BF16) *reinterpret_cast<uint16_t*>(gy) = f32_to_bf16(v);
  else *reinterpret_cast<uint16_t*>(gy) = f32_to_f16(v);
}

// The row a thread most likely sweeps after row n (rows are handed out `chunk` at a time in order, so
// about nthreads·chunk rows ahead once its chunk is done; a wrong guess only warms another core's row),
// for the prefetch of row_stats; N when there is none.
static inline int64_t likely_next_row(int64_t n, int64_t N, int64_t chunk, int nthreads) {
  const int64_t nn = n + (chunk > 1 && (n + 1) % chunk != 0 ? 1 : nthreads * chunk - chunk + 1);
  return nn < N ? nn : N;
}

// One row's ∂L/∂z_j = [gl·(1[j = y] − p_j) − gh·p_j·(log p_j + H)] / τ from the upstream gradients
// gl = ∂L/∂logp and gh = ∂L/∂H, with log p_j = (x_j − xmax) − log_s (the two lse parts) and lpy = log p_y
// formed the same way: the backward of grpo_fast.logprobs, and the fused loss's rows with an entropy
// bonus. One read of the row (grad_lp), then the target entry. grow may equal zrow (lpy is known).
// ebuf (may be null): the row's e^(x − max) kept by stats_keep, with S their sum; then p_j = e_j/S and no
// exp is recomputed (grad_kept_lp).
static inline void write_row_grad_lp(const RowKernels& K, int32_t dtype, const void* zrow, void* grow, int64_t V,
                                     int64_t y, float inv_tau, float xmax, float log_s, float lpy, float gl, float gh,
                                     float H, const float* ebuf = nullptr, float sum = 0.f) {
  const float bb = -gh * inv_tau, aa = -(gl + gh * H) * inv_tau;
  const bool stream = grow != zrow;
  if (ebuf) K.grad_kept_lp[dtype](ebuf, zrow, grow, V, inv_tau, xmax, 1.f / sum, log_s, aa, bb, stream);
  else K.grad_lp[dtype](zrow, grow, V, inv_tau, xmax, log_s, aa, bb, stream);
  // Target: gl·(1 − p_y)/τ with 1 − p_y = −expm1(log p_y) (accurate when p_y is near 1), plus the
  // entropy term p_y·bb·(log p_y + H).
  const float py = expf(lpy);
  float vy = gl * inv_tau * -expm1f(lpy);
  if (gh != 0.f && py > 0.f) vy += py * bb * (lpy + H);
  store_entry(dtype, grow, y, vy);
}

// Writes ∂loss/∂z of one row given g = ∂loss/∂logp (already including the aggregation weight) and
// gh = ∂loss/∂H (the entropy bonus, −w_H; 0 without it) with H the row's entropy.
// ebuf: the row's e^(x − max) kept by stats_keep, or null (then they are recomputed from the logits).
// row_cached: the row was just read (token level, pass 1); else (sequence level, pass 2) it is not in
// cache, and a zero row is written with streaming stores even in place.
static inline void write_row_grad(const RowKernels& K, int32_t dtype, const void* zrow, const float* ebuf, void* grow,
                                  int64_t V, int64_t y, float inv_tau, float xmax, float sum, float logp, float g,
                                  float gh, float H, bool row_cached) {
  if (gh != 0.f) {  // the entropy bonus: the log-prob backward's row math, from the kept exps when there are
    write_row_grad_lp(K, dtype, zrow, grow, V, y, inv_tau, xmax, logf(sum), logp, g, gh, H, ebuf, sum);
    return;
  }
  // A separate gradient buffer is not in cache: streaming stores. In place, the row was just read.
  const bool stream = grow != zrow;
  if (g == 0.f) {  // masked, clipped or zero-advantage token: the whole row is 0 (no exp needed)
    if (stream || !row_cached) K.zero(grow, V * elem_size(dtype));
    else memset(grow, 0, (size_t)(V * elem_size(dtype)));
    return;
  }
  const float gt = g * inv_tau;
  if (ebuf) K.grad_kept[dtype](ebuf, grow, V, -gt / sum, stream);  // −(g/τ)·p_j
  else K.grad[dtype](zrow, grow, V, inv_tau, -xmax, -gt / sum, stream);
  // Target: (g/τ)·(1 − p_y), with 1 − p_y = −expm1(logp) accurate even when p_y is close to 1.
  store_entry(dtype, grow, y, gt * -expm1f(logp));
}

static void fused_loss_impl(const LossArgs& a, int nthreads) {
  const RowKernels& K = *g_kernels.load();
  const LogitsView& L = a.logits;
  const int64_t B = L.B, T = L.T, V = L.V, N = B * T;
  const int32_t dtype = L.dtype;
  const LossParams& P = a.params;
  const float inv_tau = (float)(1.0 / (double)P.temperature);
  const bool seq = P.level == SEQUENCE;

  // Advantages from rewards: one value per row, computed here (no (B, T) tensor anywhere).
  std::vector<float> adv_rows;
  const float* adv = a.advantages;
  bool adv_per_token = a.adv_per_token;
  if (a.rewards) {
    adv_rows.resize((size_t)B);
    const int64_t G = a.group_size;
    const double bstd = a.scale_rewards == SCALE_BATCH ? unbiased_std(a.rewards, B) : 0.0;
    for (int64_t k = 0; k < B / G; ++k)
      group_advantages_of_group(a.rewards, k, G, a.scale_rewards, a.adv_eps, bstd, adv_rows.data());
    adv = adv_rows.data();
    adv_per_token = false;
  }
  auto A_at = [&](int64_t b, int64_t n) { return adv_per_token ? adv[n] : adv[b]; };
  auto isr_at = [&](int64_t b, int64_t n) { return a.isr ? (a.isr_per_token ? a.isr[n] : a.isr[b]) : 1.f; };
  auto ref_at = [&](int64_t n) { return P.beta != 0.f ? a.ref_logp[n] : 0.f; };
  auto zrow_at = [&](int64_t b, int64_t t) {
    return static_cast<const char*>(L.ptr) + (b * L.stride_b + t * L.stride_t) * elem_size(dtype);
  };
  auto grow_at = [&](int64_t b, int64_t t) {
    return static_cast<char*>(a.grad) + (b * a.grad_stride_b + t * a.grad_stride_t) * elem_size(dtype);
  };

  // Per-token results (B·T floats each; the only allocations besides the caller's gradient).
  std::vector<float> ent((size_t)N), loss((size_t)N), kl((size_t)N);
  std::vector<uint8_t> flags((size_t)N);
  std::vector<float> xmax, ssum, gtok;
  if (seq) { xmax.resize((size_t)N); ssum.resize((size_t)N); gtok.resize((size_t)N); }
  float* logp = a.logp;
  const int64_t chunk = chunk_tokens(V);

  // Pass 1 (token level: the only pass): row statistics, per-token terms, gradient.
  const bool keep = a.grad && !seq;  // the gradient follows right away: keep the row's exps
#if defined(_OPENMP)
#pragma omp parallel num_threads(nthreads)
#endif
  {
    // Per-thread fp32 scratch row of e^(x − max) (V floats, stays in L2 next to the row).
    std::vector<float> ebuf(keep ? (size_t)V : 0);
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, chunk)
#endif
    for (int64_t n = 0; n < N; ++n) {
      const int64_t b = n / T, t = n % T;
      if (a.mask[n] == 0.f) {
        // A masked (padding) row is not read: log-prob, entropy and terms 0, a zero gradient row
        // (a NaN in it does not reach the loss). Sequence level skips it in its sums too.
        logp[n] = 0.f;
        ent[n] = 0.f;
        loss[n] = 0.f;
        kl[n] = 0.f;
        flags[n] = 0;
        if (seq) { xmax[n] = 0.f; ssum[n] = 1.f; }
        else if (a.grad) K.zero(grow_at(b, t), V * elem_size(dtype));  // not in cache, in place or not
        continue;
      }
      const void* zrow = zrow_at(b, t);
      const int64_t nn = likely_next_row(n, N, chunk, nthreads);  // prefetched during this row's exp pass
      const void* next = (nn < N && a.mask[nn] != 0.f) ? zrow_at(nn / T, nn % T) : nullptr;
      const RowStats rs = keep ? K.stats_keep[dtype](zrow, V, inv_tau, a.ids[n], ebuf.data(), next)
                               : K.stats[dtype](zrow, V, inv_tau, a.ids[n], next);
      logp[n] = rs.logp;
      ent[n] = rs.entropy;
      if (seq) {
        xmax[n] = rs.xmax;
        ssum[n] = rs.sum;
        continue;
      }
      const float old = a.old_logp ? a.old_logp[n] : rs.logp;  // on-policy: r = 1 exactly, dr/dlogp = r still
      const float r = expf(rs.logp - old);
      const TokenTerms tt = token_terms(P, rs.logp, ref_at(n), A_at(b, n), isr_at(b, n), r);
      loss[n] = tt.loss;
      kl[n] = tt.kl;
      flags[n] = pack_flags(tt);
      if (a.grad) {
        const float g = a.weight[n] * (tt.d_logp + r * tt.d_ratio);
        write_row_grad(K, dtype, zrow, ebuf.data(), grow_at(b, t), V, a.ids[n], inv_tau, rs.xmax, rs.sum, rs.logp, g,
                       a.entropy_weight ? -a.entropy_weight[n] : 0.f, rs.entropy, /*row_cached=*/true);
      }
    }
  }

  if (seq) {
    // GSPO: r_b = exp(Σ_t m(logp − old) / max(Σ_t m, 1)); dr_b/dlogp[t] = r_b·m[t]/max(Σm, 1), so
    // g[t] = w·d_logp + r_b·m[t]/max(Σm, 1)·Σ_t' w·d_ratio. Cheap (B·T scalars): no need for threads.
    for (int64_t b = 0; b < B; ++b) {
      double msum = 0.0, lr = 0.0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t n = b * T + t;
        const double old = a.old_logp ? (double)a.old_logp[n] : (double)logp[n];
        if (a.mask[n] == 0.f) continue;  // skipped, not multiplied by 0
        msum += a.mask[n];
        lr += (double)a.mask[n] * ((double)logp[n] - old);
      }
      const double den = std::max(msum, 1.0);
      const float r = (float)exp(lr / den);
      double sr = 0.0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t n = b * T + t;
        const bool valid = a.mask[n] != 0.f;
        const TokenTerms tt = token_terms(P, valid ? logp[n] : 0.f, valid ? ref_at(n) : 0.f, A_at(b, n), isr_at(b, n), r);
        flags[n] = pack_flags(tt);  // the row's flags (count_flags may count a masked token's)
        loss[n] = valid ? tt.loss : 0.f;
        kl[n] = valid ? tt.kl : 0.f;
        if (!valid) { gtok[n] = 0.f; continue; }
        sr += (double)a.weight[n] * (double)tt.d_ratio;
        gtok[n] = a.weight[n] * tt.d_logp;
      }
      const double coef = (double)r / den * sr;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t n = b * T + t;
        if (a.mask[n] != 0.f) gtok[n] = (float)((double)gtok[n] + (double)a.mask[n] * coef);
      }
    }
    // Pass 2: reread each row (now that its g is known) and write its gradient.
    if (a.grad) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads)
#endif
      for (int64_t n = 0; n < N; ++n) {
        const int64_t b = n / T, t = n % T;
        // pass 1 swept every row since: this one is not in cache (a zero row gets streaming stores)
        write_row_grad(K, dtype, zrow_at(b, t), nullptr, grow_at(b, t), V, a.ids[n], inv_tau, xmax[n], ssum[n], logp[n],
                       gtok[n], a.entropy_weight ? -a.entropy_weight[n] : 0.f, ent[n], /*row_cached=*/false);
      }
    }
  }

  // Sums, sequentially in double in token order: the same bits for any thread count.
  double s[NUM_STATS] = {0.0};
  for (int64_t b = 0, n = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t, ++n) {
      const double m = a.mask[n];
      s[STAT_LOSS] += (double)a.weight[n] * (double)loss[n];
      if (a.entropy_weight) s[STAT_LOSS] -= (double)a.entropy_weight[n] * (double)ent[n];  // the entropy bonus
      s[STAT_ENTROPY] += m * (double)ent[n];
      s[STAT_KL] += m * (double)kl[n];
      const uint8_t f = flags[n];
      count_flags(s, f & FLAG_LOW, f & FLAG_HIGH, f & FLAG_CISPO, flag_weight(P.level, adv_per_token, t, a.mask[n]));
    }
  }
  for (int i = 0; i < NUM_STATS; ++i) a.stats[i] = (float)s[i];
}

// ---- differentiable log-probs and entropy (grpo_fast.logprobs) ----------------------------------------
// Forward: the row statistics of token_logprobs plus the lse in two parts per token, lse[2n] = max x and
// lse[2n + 1] = log S (S = Σ e^(x − max)), which is all the backward needs to form
// p_j = e^((x_j − max) − log S) without a reduction. The parts are never added: x_j − (max + log S)
// would lose an ulp of |x| (~1e-3 at logits near ±1e4) to cancellation. tau: per-token temperatures
// (N,) or null (then tau0 for every token); lse may be null (token_logprobs). A masked row (mask != null,
// mask[n] == 0: padding) is not read: logp, entropy and both lse parts 0 (the backward is then given zero
// upstream gradients for it and writes a zero row, again without reading it).
static void logprobs_fwd_impl(const LogprobArgs& a, int nthreads) {
  const RowKernels& K = *g_kernels.load();
  const LogitsView& L = a.logits;
  const int64_t T = L.T, V = L.V, N = L.B * T, chunk = chunk_tokens(V);
  const float tau0 = (float)a.temperature;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads)
#endif
  for (int64_t n = 0; n < N; ++n) {
    if (a.mask && a.mask[n] == 0.f) {
      a.logp[n] = 0.f;
      if (a.lse) a.lse[2 * n] = a.lse[2 * n + 1] = 0.f;
      if (a.entropy) a.entropy[n] = 0.f;
      continue;
    }
    const int64_t b = n / T, t = n % T;
    const void* zrow = static_cast<const char*>(L.ptr) + (b * L.stride_b + t * L.stride_t) * elem_size(L.dtype);
    const float inv_tau = (float)(1.0 / (double)(a.tau_rows ? a.tau_rows[n] : tau0));
    const int64_t nn = likely_next_row(n, N, chunk, nthreads);  // prefetched during this row's exp pass
    const bool fetch = nn < N && !(a.mask && a.mask[nn] == 0.f);  // a masked row is not read: not prefetched
    const void* next = fetch ? static_cast<const char*>(L.ptr) +
                                   ((nn / T) * L.stride_b + (nn % T) * L.stride_t) * elem_size(L.dtype)
                             : nullptr;
    const RowStats rs = K.stats[L.dtype](zrow, V, inv_tau, a.ids[n], next);
    a.logp[n] = rs.logp;
    if (a.lse) {
      a.lse[2 * n] = rs.xmax;
      a.lse[2 * n + 1] = rs.log_s;  // the log S that rs.logp and rs.entropy were formed with
    }
    if (a.entropy) a.entropy[n] = rs.entropy;
  }
}

// Backward: with x = z/τ, log p_j = (x_j − max) − log S (the forward's two parts), upstream gradients gl = ∂L/∂logp and gh = ∂L/∂H
// (either may be null: zero),
//   ∂L/∂z_j = [gl·(1[j = y] − p_j) − gh·p_j·(log p_j + H)] / τ
// (∂H/∂x_j = −p_j·(log p_j + H)). One read of the row, one write of its gradient. A token whose two
// upstream gradients are 0 (padding that the loss masked out) gets a zero row without its logits
// being read.
static void logprobs_bwd_impl(const LogprobGradArgs& a, int nthreads) {
  const RowKernels& K = *g_kernels.load();
  const LogitsView& L = a.logits;
  const int32_t dtype = L.dtype;
  const int64_t T = L.T, V = L.V, N = L.B * T, chunk = chunk_tokens(V), es = elem_size(dtype);
  const float tau0 = (float)a.temperature;
  (void)nthreads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads)
#endif
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = n / T, t = n % T;
    const char* zrow = static_cast<const char*>(L.ptr) + (b * L.stride_b + t * L.stride_t) * es;
    char* grow = static_cast<char*>(a.grad) + (b * a.grad_stride_b + t * a.grad_stride_t) * es;
    const float g_l = a.g_logp ? a.g_logp[n] : 0.f, g_h = a.g_entropy ? a.g_entropy[n] : 0.f;
    if (g_l == 0.f && g_h == 0.f) {
      K.zero(grow, V * es);  // the row is not read: streaming zeros, in place or not
      continue;
    }
    const float inv_tau = (float)(1.0 / (double)(a.tau_rows ? a.tau_rows[n] : tau0));
    const float H = g_h != 0.f ? a.entropy[n] : 0.f;
    // The target logit is read first: grow may be the logits themselves.
    const int64_t y = a.ids[n];
    float zy;
    if (dtype == DTYPE_F32) zy = *reinterpret_cast<const float*>(zrow + y * es);
    else if (dtype == DTYPE_BF16) zy = bf16_to_f32(*reinterpret_cast<const uint16_t*>(zrow + y * es));
    else zy = f16_to_f32(*reinterpret_cast<const uint16_t*>(zrow + y * es));
    const float xmax = a.lse[2 * n], log_s = a.lse[2 * n + 1];
    const float lpy = (zy * inv_tau - xmax) - log_s;  // -ffp-contract=off: x_y rounded first, as vshift does
    write_row_grad_lp(K, dtype, zrow, grow, V, y, inv_tau, xmax, log_s, lpy, g_l, g_h, H);
  }
}

template <class T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

constexpr const char* kModule = "grpo_fast._C_cpu";

static void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string(kModule) + ": " + what);
}

static void check_logits(const LogitsView& l) {
  check(l.ptr != nullptr, "null pointer");
  check(l.dtype >= DTYPE_F32 && l.dtype <= DTYPE_F16, "dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
  check(l.B > 0 && l.T > 0 && l.V > 0, "B, T, V must be > 0");
}

// What grpo_bindings.h's def_kernel_calls runs: the internal asserts (grpo_fast/validation.py has
// checked the user's arguments), then the kernels on `nthreads` OpenMP threads.
struct CpuCalls {
  static int context(bindings::Kw& kw, bool /*fused*/) { return std::max(1, kw.get<int>("nthreads")); }

  static void fused_loss(const LossArgs& a, int nthreads) {
    const LogitsView& l = a.logits;
    check_logits(l);
    check(a.ids && a.mask && a.weight && a.logp && a.stats, "null pointer");
    check((a.advantages != nullptr) != (a.rewards != nullptr), "exactly one of advantages and rewards");
    check(!a.rewards || (a.group_size >= 2 && l.B % a.group_size == 0), "group_size must divide B and be >= 2");
    check(a.params.beta == 0.f || a.ref_logp, "ref_logp is required when beta != 0");
    check(a.params.level == TOKEN || a.params.level == SEQUENCE, "level must be 0 or 1");
    check(a.temperature > 0.0, "temperature must be > 0");
    fused_loss_impl(a, nthreads);
  }

  static void logprobs_fwd(const LogprobArgs& a, int nthreads) {
    check_logits(a.logits);
    check(a.ids && a.logp, "null pointer");
    check(a.tau_rows || a.temperature > 0.0, "temperature must be > 0");
    logprobs_fwd_impl(a, nthreads);
  }

  static void logprobs_bwd(const LogprobGradArgs& a, int nthreads) {
    check_logits(a.logits);
    check(a.grad && a.ids && a.lse, "null pointer");
    check(!a.g_entropy || a.entropy, "the entropy gradient needs the saved entropy");
    check(a.tau_rows || a.temperature > 0.0, "temperature must be > 0");
    logprobs_bwd_impl(a, nthreads);
  }
};

}  // namespace cpu
}  // namespace grpo_fast

// ---- Python bindings ---------------------------------------------------------------------------------
PYBIND11_MODULE(_C_cpu, m) {
  using namespace grpo_fast;
  using namespace grpo_fast::cpu;
  m.doc() = "grpo_fast CPU kernels (raw pointers from grpo_fast/backends/cpu.py; no torch ABI)";

  // One binding style with grpo_fast._C_cuda (csrc/common/grpo_bindings.h): the keywords of
  // grpo_args.h's structs, plus nthreads (torch.get_num_threads()).
  bindings::def_kernel_calls<CpuCalls>(m, kModule);

  m.def("isa", []() { return std::string(g_kernels.load()->name); },
        "The instruction set the row kernels use now: 'avx512bf16', 'avx512', 'avx2' or 'generic'.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        const RowKernels* k = kernels_by_name(name);
        if (!k || !isa_supported(name)) throw std::invalid_argument("instruction set '" + name + "' is not available on this CPU/build");
        const std::string prev = g_kernels.load()->name;
        g_kernels.store(k);
        return prev;
      },
      py::arg("name"),
      "Switch the row kernels to 'avx512bf16', 'avx512', 'avx2' or 'generic' (tests); returns the previous one.");
  m.def(
      "supported_isas",
      []() {
        py::list out;
        for (const char* name : kIsas)
          if (kernels_by_name(name) && isa_supported(name)) out.append(name);
        return out;
      },
      "The instruction sets this CPU and build can run, widest first.");
  m.def(
      "vexp",
      [](uintptr_t x, uintptr_t y, int64_t n) { g_kernels.load()->exp(ptr<const float>(x), ptr<float>(y), n); },
      py::arg("x"), py::arg("y"), py::arg("n"), "y = e^x for n floats with the active vectorized exp (tests).");
  m.def(
      "to_bf16",
      [](uintptr_t x, uintptr_t y, int64_t n) { g_kernels.load()->bf16(ptr<const float>(x), ptr<uint16_t>(y), n); },
      py::arg("x"), py::arg("y"), py::arg("n"),
      "y = bf16 of n floats with the active path's vector conversion, the gradient stores' (tests).");
}
