// grpo_cuda.h — the host-side interface between the pybind11 bindings (grpo_cuda_bindings.cpp, built
// by the host C++ compiler) and the CUDA kernels (grpo_cuda_kernels.cu, built by nvcc).
//
// Plain C++ only: no CUDA and no pybind11 header is included here, so the bindings compile without
// the CUDA toolkit's headers and the kernels compile without Python's. The argument structs are
// csrc/common/grpo_args.h (the CPU extension's too); every pointer is a raw device pointer handed
// over from Python (tensor.data_ptr()); every size and stride counts ELEMENTS.
// Errors are thrown as std::runtime_error (a CUDA failure, with cudaGetErrorString) or
// std::invalid_argument (an internal shape assert); pybind11 turns them into RuntimeError/ValueError.
#pragma once

#include <stdint.h>

#include "grpo_args.h"  // LossArgs, LogprobArgs, LogprobGradArgs: shared with the CPU extension
#include "grpo_math.h"

namespace grpo_fast {
namespace cuda {

// Where a call runs (the CUDA-only keywords next to grpo_args.h's): the tensors' device, the stream
// (torch.cuda.current_stream().cuda_stream) and, for fused_loss, a device float32 workspace of
// fused_scratch_floats() floats that the caller allocates with its own (caching) allocator.
struct Context {
  int32_t device = 0;
  void* stream = nullptr;  // cudaStream_t
  float* scratch = nullptr;
  int64_t scratch_floats = 0;
};

int64_t fused_scratch_floats(int64_t B, int64_t T, int32_t level, bool has_rewards, bool want_grad);

// The fused loss pass: stats, logp and (when grad != null) ∂loss/∂logits for grad_output = 1.
// Asynchronous on the context's stream, like any kernel launch.
void fused_loss(const LossArgs& a, const Context& c);

// Per-token log-probs [entropy] [lse in two parts] (grpo_args.h: LogprobArgs).
void token_logprobs(const LogprobArgs& a, const Context& c);

// Backward of grpo_fast.logprobs (grpo_args.h: LogprobGradArgs).
void logprobs_backward(const LogprobGradArgs& a, const Context& c);

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
