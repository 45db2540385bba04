// grpo_cuda_bindings.cpp — the pybind11 module grpo_fast._C_cuda.
//
// Python hands over raw device pointers (tensor.data_ptr()), sizes, strides (in elements), option
// codes and the CUDA stream handle (torch.cuda.current_stream().cuda_stream) as keyword arguments;
// nothing here knows about torch, so one build serves every torch version. Every argument is
// required and unknown names are rejected, so a typo on the Python side fails loudly instead of
// leaving a field at zero. Built by the host compiler; the kernels are in grpo_cuda_kernels.cu.
#include <pybind11/pybind11.h>

#include <set>
#include <stdexcept>
#include <string>

#include "grpo_cuda.h"

namespace py = pybind11;
using namespace grpo_fast;
using namespace grpo_fast::cuda;

namespace {

// --- strict keyword access ----------------------------------------------------------------------

class Kw {
 public:
  explicit Kw(const py::kwargs& kw) : kw_(kw) {}

  template <typename T>
  T get(const char* name) {
    if (!kw_.contains(name)) throw py::key_error(std::string("grpo_fast._C_cuda: missing argument ") + name);
    used_.insert(name);
    return kw_[name].cast<T>();
  }
  template <typename P>
  P* ptr(const char* name) {  // 0 / None -> nullptr
    if (!kw_.contains(name)) throw py::key_error(std::string("grpo_fast._C_cuda: missing argument ") + name);
    used_.insert(name);
    py::object o = kw_[name];
    if (o.is_none()) return nullptr;
    return reinterpret_cast<P*>(o.cast<uintptr_t>());
  }
  void done() const {
    for (auto item : kw_) {
      const std::string k = py::str(item.first);
      if (!used_.count(k)) throw py::type_error("grpo_fast._C_cuda: unexpected argument " + k);
    }
  }

 private:
  const py::kwargs& kw_;
  std::set<std::string> used_;
};

LogitsView logits_view(Kw& kw) {
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
LossParams loss_params(Kw& kw) {
  LossParams p{};
  p.family = kw.get<int32_t>("family");
  p.kl_estimator = kw.get<int32_t>("kl_estimator");
  p.level = kw.get<int32_t>("level");
  p.has_delta = kw.get<bool>("has_delta") ? 1 : 0;
  p.bias_correction_kl = kw.get<bool>("bias_correction_kl") ? 1 : 0;
  p.temperature = kw.get<float>("temperature");
  p.eps_low = kw.get<float>("eps_low");
  p.eps_high = kw.get<float>("eps_high");
  p.delta = kw.get<float>("delta");
  p.beta = kw.get<float>("beta");
  p.sapo_temp_pos = kw.get<float>("sapo_temp_pos");
  p.sapo_temp_neg = kw.get<float>("sapo_temp_neg");
  return p;
}

// The arguments of the log-prob forward (token_logprobs; logprobs_fwd also takes per-token
// temperatures and the lse output). Every keyword is consumed (kw.done()).
LogprobArgs logprob_args(Kw& kw, bool with_lse) {
  LogprobArgs a;
  a.logits = logits_view(kw);
  a.ids = kw.ptr<const int64_t>("ids");
  a.temperature = kw.get<double>("temperature");
  if (with_lse) {
    a.tau_rows = kw.ptr<const float>("tau_rows");
    a.lse = kw.ptr<float>("lse");
  }
  a.logp = kw.ptr<float>("logp");
  a.entropy = kw.ptr<float>("entropy");
  a.device = kw.get<int32_t>("device");
  a.stream = kw.ptr<void>("stream");
  kw.done();
  return a;
}

}  // namespace

// The module's name; the host-emulation test build (tests/test_cuda.py) names it differently.
#ifndef GF_CUDA_MODULE
#define GF_CUDA_MODULE _C_cuda
#endif

PYBIND11_MODULE(GF_CUDA_MODULE, m) {
  m.doc() = "grpo_fast CUDA kernels (csrc/cuda): fused GRPO loss + gradient, token log-probs. Raw pointers in, no torch ABI.";

  m.attr("NUM_STATS") = (int)NUM_STATS;
  m.attr("TERM_COLUMNS") = kTermCols;

  m.def(
      "fused_scratch_floats",
      [](int64_t B, int64_t T, int32_t level, bool has_rewards, bool want_grad) {
        return fused_scratch_floats(B, T, level, has_rewards, want_grad);
      },
      py::arg("B"), py::arg("T"), py::arg("level"), py::arg("has_rewards"), py::arg("want_grad"),
      "Float32 elements of device workspace fused_loss needs.");

  m.def(
      "fused_loss",
      [](py::kwargs kwargs) {
        Kw kw(kwargs);
        FusedArgs a;
        a.logits = logits_view(kw);
        a.grad = kw.ptr<void>("grad");
        a.grad_stride_b = kw.get<int64_t>("grad_stride_b");
        a.grad_stride_t = kw.get<int64_t>("grad_stride_t");
        a.ids = kw.ptr<const int64_t>("ids");
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
        a.scratch = kw.ptr<float>("scratch");
        a.scratch_floats = kw.get<int64_t>("scratch_floats");
        a.device = kw.get<int32_t>("device");
        a.stream = kw.ptr<void>("stream");
        kw.done();
        py::gil_scoped_release release;  // launches only, but a blocking launch must not hold the GIL
        fused_loss(a);
      },
      "The fused GRPO loss pass (grpo_fast/backends/cuda.py builds the keyword arguments).");

  m.def(
      "token_logprobs",
      [](py::kwargs kwargs) {
        Kw kw(kwargs);
        const LogprobArgs a = logprob_args(kw, false);
        py::gil_scoped_release release;
        token_logprobs(a);
      },
      "Per-token log-probs (and entropy) without gradient.");

  m.def(
      "logprobs_fwd",
      [](py::kwargs kwargs) {
        Kw kw(kwargs);
        const LogprobArgs a = logprob_args(kw, true);
        if (!a.lse) throw py::value_error("logprobs_fwd: lse is required");
        py::gil_scoped_release release;
        token_logprobs(a);
      },
      "grpo_fast.logprobs forward: per-token logp and (entropy != 0) entropy, (B, T) float32, and the lse "
      "in two parts (B, T, 2) float32 (max x, ln Σ exp(x − max)); "
      "tau_rows: per-token temperatures (B, T) float32 or 0.");

  m.def(
      "logprobs_bwd",
      [](py::kwargs kwargs) {
        Kw kw(kwargs);
        LogprobGradArgs a;
        a.logits = logits_view(kw);
        a.grad = kw.ptr<void>("grad");
        a.grad_stride_b = kw.get<int64_t>("grad_stride_b");
        a.grad_stride_t = kw.get<int64_t>("grad_stride_t");
        a.ids = kw.ptr<const int64_t>("ids");
        a.temperature = kw.get<double>("temperature");
        a.tau_rows = kw.ptr<const float>("tau_rows");
        a.lse = kw.ptr<const float>("lse");
        a.entropy = kw.ptr<const float>("entropy");
        a.g_logp = kw.ptr<const float>("g_logp");
        a.g_entropy = kw.ptr<const float>("g_entropy");
        a.device = kw.get<int32_t>("device");
        a.stream = kw.ptr<void>("stream");
        kw.done();
        py::gil_scoped_release release;
        logprobs_backward(a);
      },
      "grpo_fast.logprobs backward: grad (B, T, V) = (g_logp·(onehot − p) − g_entropy·p·(log p + H))/τ "
      "from the saved two-part lse (B, T, 2); g_logp / g_entropy (B, T) float32 or 0.");

  m.def(
      "token_terms",
      [](py::kwargs kwargs) {
        Kw kw(kwargs);
        const LossParams p = loss_params(kw);
        const int64_t n = kw.get<int64_t>("n");
        const float* logp = kw.ptr<const float>("logp");
        const float* ref = kw.ptr<const float>("ref");
        const float* adv = kw.ptr<const float>("adv");
        const float* isr = kw.ptr<const float>("isr");
        const float* ratio = kw.ptr<const float>("ratio");
        float* out = kw.ptr<float>("out");
        const bool on_device = kw.get<bool>("on_device");
        const int32_t device = kw.get<int32_t>("device");
        void* stream = kw.ptr<void>("stream");
        kw.done();
        if (!logp || !ref || !adv || !isr || !ratio || !out) throw py::value_error("token_terms: every array is required");
        py::gil_scoped_release release;
        if (on_device) token_terms_device(p, n, logp, ref, adv, isr, ratio, out, device, stream);
        else token_terms_host(p, n, logp, ref, adv, isr, ratio, out);
      },
      "grpo_math.h token_terms() on n float32 inputs -> out (n, TERM_COLUMNS): loss, kl, d_logp, d_ratio, "
      "clip_low, clip_high, cispo_clip. on_device=False runs the nvcc-compiled host side on CPU pointers.");

  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension was built with (e.g. 13000).");
  m.def(
      "device_count",
      []() {
        const char* why = nullptr;
        const int n = device_count(&why);
        return py::make_tuple(n, why ? py::object(py::str(why)) : py::object(py::none()));
      },
      "(number of visible CUDA devices, None or the runtime's reason when it is 0).");
}
