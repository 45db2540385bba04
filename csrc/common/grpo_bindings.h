// grpo_bindings.h — the one binding style of both native extensions (grpo_fast._C_cpu, grpo_fast._C_cuda):
// keyword arguments mapped into the structs of grpo_args.h.
//
// Python (grpo_fast/backends/_native.py) hands over raw pointers (tensor.data_ptr()), sizes, strides
// (in elements) and option codes as keyword arguments with the field names of grpo_args.h; each
// extension adds its own execution keywords (CPU: nthreads; CUDA: device, stream, scratch). Every
// argument is required and unknown names are rejected, so a typo on the Python side fails loudly
// instead of leaving a field at zero. Included only by the extensions' pybind11 translation units
// (never by a kernel), so neither torch nor CUDA headers are needed here.
#pragma once

#include <pybind11/pybind11.h>

#include <set>
#include <stdexcept>
#include <string>

#include "grpo_args.h"

// Hidden, as pybind11's own namespace is (the parser holds pybind11 objects; a build without
// -fvisibility=hidden, such as the tests' host-emulation one, would warn otherwise).
#if defined(__GNUC__)
#define GF_BINDINGS_HIDDEN __attribute__((visibility("hidden")))
#else
#define GF_BINDINGS_HIDDEN
#endif

namespace grpo_fast {
namespace bindings GF_BINDINGS_HIDDEN {

namespace py = pybind11;

// Strict keyword access: get() / ptr() mark a name used, done() rejects any name left unused.
class Kw {
 public:
  Kw(const py::kwargs& kw, const char* module) : kw_(kw), module_(module) {}

  template <typename T>
  T get(const char* name) {
    return item(name).cast<T>();
  }
  template <typename P>
  P* ptr(const char* name) {  // 0 / None -> nullptr
    py::object o = item(name);
    if (o.is_none()) return nullptr;
    return reinterpret_cast<P*>(o.cast<uintptr_t>());
  }
  std::string module() const { return module_; }
  void done() const {
    for (auto it : kw_) {
      const std::string k = py::str(it.first);
      if (!used_.count(k)) throw py::type_error(std::string(module_) + ": unexpected argument " + k);
    }
  }

 private:
  py::object item(const char* name) {
    if (!kw_.contains(name)) throw py::key_error(std::string(module_) + ": missing argument " + name);
    used_.insert(name);
    return kw_[name];
  }
  const py::kwargs& kw_;
  const char* module_;
  std::set<std::string> used_;
};

inline LogitsView logits_view(Kw& kw) {
  LogitsView l;
  l.ptr = kw.ptr<const void>("logits");
  l.dtype = kw.get<int32_t>("dtype");
  l.B = kw.get<int64_t>("B");
  l.T = kw.get<int64_t>("T");
  l.V = kw.get<int64_t>("V");
  l.stride_b = kw.get<int64_t>("stride_b");
  l.stride_t = kw.get<int64_t>("stride_t");
  return l;
}

// The run-time options of grpo_math.h (KernelConfig's fields of the same names).
inline LossParams loss_params(Kw& kw) {
  LossParams p{};
  p.family = kw.get<int32_t>("family");
  p.kl_estimator = kw.get<int32_t>("kl_estimator");
  p.level = kw.get<int32_t>("level");
  p.has_delta = kw.get<bool>("has_delta") ? 1 : 0;
  p.bias_correction_kl = kw.get<bool>("bias_correction_kl") ? 1 : 0;
  p.temperature = (float)kw.get<double>("temperature");
  p.eps_low = (float)kw.get<double>("eps_low");
  p.eps_high = (float)kw.get<double>("eps_high");
  p.delta = (float)kw.get<double>("delta");
  p.beta = (float)kw.get<double>("beta");
  p.sapo_temp_pos = (float)kw.get<double>("sapo_temp_pos");
  p.sapo_temp_neg = (float)kw.get<double>("sapo_temp_neg");
  p.log_ratio_clamp = (float)kw.get<double>("log_ratio_clamp");
  p.dual_clip_c = (float)kw.get<double>("dual_clip_c");
  p.is_lo = (float)kw.get<double>("is_lo");
  p.is_hi = (float)kw.get<double>("is_hi");
  return p;
}

// What the two gradient-writing calls share: the logits, the gradient (pointer and B/T strides), the ids.
template <typename Args>
void logits_grad_ids(Kw& kw, Args& a) {
  a.logits = logits_view(kw);
  a.grad = kw.ptr<void>("grad");
  a.grad_stride_b = kw.get<int64_t>("grad_stride_b");
  a.grad_stride_t = kw.get<int64_t>("grad_stride_t");
  a.ids = kw.ptr<const int64_t>("ids");
}

inline LossArgs loss_args(Kw& kw) {
  LossArgs a;
  logits_grad_ids(kw, a);
  a.mask = kw.ptr<const float>("mask");
  a.weight = kw.ptr<const float>("weight");
  a.advantages = kw.ptr<const float>("advantages");
  a.adv_per_token = kw.get<bool>("adv_per_token");
  a.rewards = kw.ptr<const float>("rewards");
  a.group_size = kw.get<int64_t>("group_size");
  a.scale_rewards = kw.get<int32_t>("scale_rewards");
  a.adv_eps = kw.get<double>("adv_eps");
  a.old_logp = kw.ptr<const float>("old_logp");
  a.ref_logp = kw.ptr<const float>("ref_logp");
  a.isr = kw.ptr<const float>("isr");
  a.isr_per_token = kw.get<bool>("isr_per_token");
  a.params = loss_params(kw);
  a.temperature = kw.get<double>("temperature");
  a.logp = kw.ptr<float>("logp");
  a.stats = kw.ptr<float>("stats");
  a.entropy_weight = kw.ptr<const float>("entropy_weight");
  return a;
}

// token_logprobs (with_lse = false) and the forward of grpo_fast.logprobs (also per-token temperatures
// and the lse output).
inline LogprobArgs logprob_args(Kw& kw, bool with_lse) {
  LogprobArgs a;
  a.logits = logits_view(kw);
  a.ids = kw.ptr<const int64_t>("ids");
  a.mask = kw.ptr<const float>("mask");
  a.temperature = kw.get<double>("temperature");
  if (with_lse) {
    a.tau_rows = kw.ptr<const float>("tau_rows");
    a.lse = kw.ptr<float>("lse");
  }
  a.logp = kw.ptr<float>("logp");
  a.entropy = kw.ptr<float>("entropy");
  if (with_lse && !a.lse) throw py::value_error(kw.module() + ": logprobs_fwd: lse is required");
  return a;
}

inline LogprobGradArgs logprob_grad_args(Kw& kw) {
  LogprobGradArgs a;
  logits_grad_ids(kw, a);
  a.temperature = kw.get<double>("temperature");
  a.tau_rows = kw.ptr<const float>("tau_rows");
  a.lse = kw.ptr<const float>("lse");
  a.entropy = kw.ptr<const float>("entropy");
  a.g_logp = kw.ptr<const float>("g_logp");
  a.g_entropy = kw.ptr<const float>("g_entropy");
  return a;
}

// Docstrings of the functions def_kernel_calls defines.
constexpr const char* kFusedLossDoc =
    "The fused GRPO loss over logits (B, T, V): logp (B, T) f32, the stats sums (NUM_STATS,) f32 and, when "
    "grad != 0, d loss / d logits for grad_output = 1 (grpo_fast/backends/_native.py builds the keywords).";
constexpr const char* kTokenLogprobsDoc =
    "Per-token log-probs (B, T) f32 and, when entropy != 0, entropies (B, T) f32; mask (B, T) f32 or 0: a "
    "masked (0) row is not read and gets 0.";
constexpr const char* kLogprobsFwdDoc =
    "grpo_fast.logprobs forward: per-token logp and (entropy != 0) entropy, (B, T) f32, and the lse in two "
    "parts (B, T, 2) f32 (max x, ln Σ exp(x − max)); tau_rows: per-token temperatures (B, T) f32 or 0; mask "
    "(B, T) f32 or 0: a masked (0) row is not read, all its outputs 0.";
constexpr const char* kLogprobsBwdDoc =
    "grpo_fast.logprobs backward: grad (B, T, V) = (g_logp·(onehot − p) − g_entropy·p·(log p + H))/τ from the "
    "saved two-part lse (B, T, 2); g_logp / g_entropy (B, T) f32 or 0. grad may equal logits.";

// One call: the struct's keywords (parse), the extension's execution keywords, nothing else; then
// run(args, context) without the GIL.
template <typename Ext, typename Parse, typename Run>
void run_call(const py::kwargs& kwargs, const char* module, bool fused, Parse parse, Run run) {
  Kw kw(kwargs, module);
  const auto a = parse(kw);
  const auto c = Ext::context(kw, fused);
  kw.done();
  py::gil_scoped_release nogil;
  run(a, c);
}

// Defines fused_loss, token_logprobs, logprobs_fwd and logprobs_bwd on the module m, the same in both
// extensions: the keywords of grpo_args.h's structs, then the extension's own execution keywords,
// then (without the GIL) the extension's call. Ext provides
//   Context Ext::context(Kw&, bool fused)    reads its execution keywords (fused: those of fused_loss)
//   Ext::fused_loss(const LossArgs&, const Context&)
//   Ext::logprobs_fwd(const LogprobArgs&, const Context&)     (token_logprobs: tau_rows = lse = null)
//   Ext::logprobs_bwd(const LogprobGradArgs&, const Context&)
// each checking what Python promised (internal asserts: grpo_fast/validation.py checked the user's input).
template <typename Ext>
void def_kernel_calls(py::module_& m, const char* module) {
  m.def("fused_loss", [module](py::kwargs kw) { run_call<Ext>(kw, module, true, loss_args, Ext::fused_loss); },
        kFusedLossDoc);
  m.def(
      "token_logprobs",
      [module](py::kwargs kw) {
        run_call<Ext>(kw, module, false, [](Kw& k) { return logprob_args(k, false); }, Ext::logprobs_fwd);
      },
      kTokenLogprobsDoc);
  m.def(
      "logprobs_fwd",
      [module](py::kwargs kw) {
        run_call<Ext>(kw, module, false, [](Kw& k) { return logprob_args(k, true); }, Ext::logprobs_fwd);
      },
      kLogprobsFwdDoc);
  m.def("logprobs_bwd", [module](py::kwargs kw) { run_call<Ext>(kw, module, false, logprob_grad_args, Ext::logprobs_bwd); },
        kLogprobsBwdDoc);
}

}  // namespace bindings
}  // namespace grpo_fast
