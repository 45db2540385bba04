// grpo_args.h — the arguments of the native kernels, once for the CPU (csrc/cpu) and CUDA (csrc/cuda)
// extensions: what to compute, with the field names of grpo_fast/_config.py (KernelConfig) and
// grpo_fast/validation.py (LossInputs). Where to compute it (CPU threads; a CUDA device, stream and
// workspace) is each extension's own, passed next to these.
//
// Plain C++ (no pybind11, no CUDA header), so nvcc and the host compiler both include it. Both
// extensions fill these structs from the same keyword arguments (grpo_bindings.h), which
// grpo_fast/backends/_native.py builds for both. Every pointer is a raw address handed over from
// Python (tensor.data_ptr(); host memory on CPU, device memory on CUDA) or null; every size and
// stride counts ELEMENTS.
#pragma once

#include <stdint.h>

#include "grpo_math.h"

namespace grpo_fast {

// Logit storage dtypes (grpo_fast/backends/_native.py: DTYPE_CODES).
enum DType : int32_t { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

// (B, T, V) logits with stride(-1) == 1 and free B/T strides (a slice of a bigger tensor is read in
// place, never copied).
struct LogitsView {
  const void* ptr = nullptr;
  int32_t dtype = DTYPE_F32;
  int64_t B = 0, T = 0, V = 0;
  int64_t stride_b = 0, stride_t = 0;
};

// The fused loss (the backend interface of grpo_fast/backends/__init__.py). (B, T) and (B,) side
// inputs are contiguous float32 (int64 for ids); adv_per_token / isr_per_token tell (B, T) from (B,).
struct LossArgs {
  LogitsView logits;
  void* grad = nullptr;  // (B, T, V) in the logits' dtype, or null: no gradient; may equal logits.ptr
  int64_t grad_stride_b = 0, grad_stride_t = 0;
  const int64_t* ids = nullptr;
  const float* mask = nullptr;
  const float* weight = nullptr;      // aggregation weight w = m·c_b: loss = Σ w·L
  const float* advantages = nullptr;  // null when rewards are given
  bool adv_per_token = false;
  const float* rewards = nullptr;     // (B,): advantages computed in the kernel from groups of G
  int64_t group_size = 0;
  int32_t scale_rewards = SCALE_GROUP;
  double adv_eps = 1e-4;
  const float* old_logp = nullptr;    // null: on-policy (r = 1, dr/dlogp = r)
  const float* ref_logp = nullptr;    // only read when params.beta != 0
  const float* isr = nullptr;         // null: 1
  bool isr_per_token = false;
  LossParams params{};
  double temperature = 1.0;           // τ unrounded (params.temperature is its float32 rounding)
  float* logp = nullptr;              // out (B, T) float32
  float* stats = nullptr;             // out (NUM_STATS,) float32 sums (grpo_math.h, enum Stat)
  // The entropy bonus (entropy_coef): (B, T) w_H = c·m/Σm, loss −= Σ w_H·H and each row's gradient adds
  // −w_H·∂H/∂z_j = w_H·p_j·(log p_j + H)/τ; null: off (validation.py: entropy_weights).
  const float* entropy_weight = nullptr;
};

// Per-token log-probs (and entropy when entropy != null), both (B, T) float32; with lse != null also
// each row's logsumexp of x = z/τ in two parts, (B, T, 2) float32: (max x, ln Σ exp(x − max)) (the
// forward of grpo_fast.logprobs, which keeps them for the backward; never added up). With mask != null
// ((B, T) float32, 0 = padding) a masked row is not read: its logp, entropy and both lse parts are 0.
struct LogprobArgs {
  LogitsView logits;
  const int64_t* ids = nullptr;
  const float* mask = nullptr;
  double temperature = 1.0;
  const float* tau_rows = nullptr;  // (B, T) per-token temperatures, or null: `temperature` everywhere
  float* logp = nullptr;
  float* entropy = nullptr;
  float* lse = nullptr;
};

// Backward of grpo_fast.logprobs: grad (B, T, V) in the logits' dtype (may equal logits.ptr) =
// (g_logp·(1[j = y] − p_j) − g_entropy·p_j·(log p_j + H))/τ with log p = (z/τ − lse[0]) − lse[1] (the
// forward's two parts, (B, T, 2)). g_logp and g_entropy are (B, T) float32 or null (zero); entropy is
// required with g_entropy.
struct LogprobGradArgs {
  LogitsView logits;
  void* grad = nullptr;
  int64_t grad_stride_b = 0, grad_stride_t = 0;
  const int64_t* ids = nullptr;
  double temperature = 1.0;
  const float* tau_rows = nullptr;
  const float* lse = nullptr;
  const float* entropy = nullptr;
  const float* g_logp = nullptr;
  const float* g_entropy = nullptr;
};

}  // namespace grpo_fast
