// grpo_cuda.h — the host-side interface between the pybind11 bindings (grpo_cuda_bindings.cpp, built
// by the host C++ compiler) and the CUDA kernels (grpo_cuda_kernels.cu, built by nvcc).
//
// Plain C++ only: no CUDA and no pybind11 header is included here, so the bindings compile without
// the CUDA toolkit's headers and the kernels compile without Python's. Every pointer is a raw device
// pointer handed over from Python (tensor.data_ptr()); every size and stride counts ELEMENTS.
// Errors are thrown as std::runtime_error (a CUDA failure, with cudaGetErrorString) or
// std::invalid_argument (an internal shape assert); pybind11 turns them into RuntimeError/ValueError.
#pragma once

#include <stdint.h>

#include "grpo_math.h"

namespace grpo_fast {
namespace cuda {

// Logit dtypes (grpo_fast/backends/cuda.py builds the same integers from torch dtypes).
enum DType : int32_t { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

// (B, T, V) logits with stride(-1) == 1 and free B/T strides (a slice of a bigger tensor is read in
// place, never copied).
struct LogitsView {
  const void* ptr = nullptr;
  int32_t dtype = DTYPE_F32;
  int64_t B = 0, T = 0, V = 0;
  int64_t stride_b = 0, stride_t = 0;
};

// Everything one fused loss call needs (the backend interface of grpo_fast/backends/__init__.py).
// (B, T) and (B,) side inputs are contiguous float32 (int64 for ids); "per_token" tells (B, T) from
// (B,) for the advantages and the importance-sampling ratio.
struct FusedArgs {
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
  float* scratch = nullptr;           // device float32 workspace of fused_scratch_floats() floats
  int64_t scratch_floats = 0;
  int32_t device = 0;
  void* stream = nullptr;             // cudaStream_t (torch.cuda.current_stream().cuda_stream)
};

// Float32 workspace fused_loss needs, so the caller allocates it with its own (caching) allocator.
int64_t fused_scratch_floats(int64_t B, int64_t T, int32_t level, bool has_rewards, bool want_grad);

// The fused loss pass: stats, logp and (when grad != null) ∂loss/∂logits for grad_output = 1.
// Asynchronous on `stream`, like any kernel launch.
void fused_loss(const FusedArgs& a);

// Per-token log-probs (and entropy when entropy != null), both (B, T) float32; with lse != null also
// each row's logsumexp of x = z/τ in two parts, (B, T, 2) float32: shift = max x and ln Σ exp(x − shift)
// (the forward of grpo_fast.logprobs, which keeps them for backward; never added up).
struct LogprobArgs {
  LogitsView logits;
  const int64_t* ids = nullptr;
  double temperature = 1.0;
  const float* tau_rows = nullptr;  // (B, T) per-token temperatures, or null: `temperature` everywhere
  float* logp = nullptr;
  float* entropy = nullptr;
  float* lse = nullptr;
  int32_t device = 0;
  void* stream = nullptr;
};
void token_logprobs(const LogprobArgs& a);

// Backward of grpo_fast.logprobs: grad (B, T, V) in the logits' dtype (may equal logits.ptr) =
// (g_logp·(1[j = y] − p_j) − g_entropy·p_j·(log p_j + H))/τ with log p = (z/τ − lse[0]) − lse[1] (the
// forward's two parts, (B, T, 2)). g_logp and
// g_entropy are (B, T) float32 or null (zero); entropy is required with g_entropy.
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
  int32_t device = 0;
  void* stream = nullptr;
};
void logprobs_backward(const LogprobGradArgs& a);

// token_terms() of grpo_math.h evaluated on n inputs, to check that the header compiled by nvcc
// gives the numbers the CPU build gives. out is (n, 7): loss, kl, d_logp, d_ratio, clip_low,
// clip_high, cispo_clip. The host variant runs the nvcc-compiled __host__ side on CPU pointers; the
// device variant launches a kernel on device pointers.
constexpr int kTermCols = 7;
void token_terms_host(const LossParams& p, int64_t n, const float* logp, const float* ref, const float* adv,
                      const float* isr, const float* ratio, float* out);
void token_terms_device(const LossParams& p, int64_t n, const float* logp, const float* ref, const float* adv,
                        const float* isr, const float* ratio, float* out, int32_t device, void* stream);

// Runtime facts for `grpo-fast info` and the tests: the CUDA runtime version this was built with,
// and the number of visible devices (0, with the reason, when there is no driver or no GPU).
int32_t runtime_version();
int32_t device_count(const char** why_not);

}  // namespace cuda
}  // namespace grpo_fast
