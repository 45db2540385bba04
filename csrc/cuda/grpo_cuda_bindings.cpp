// grpo_cuda_bindings.cpp — the pybind11 module grpo_fast._C_cuda.
//
// Python (grpo_fast/backends/_native.py) hands over raw device pointers (tensor.data_ptr()), sizes,
// strides (in elements) and option codes as the keyword arguments of csrc/common/grpo_bindings.h
// (the CPU extension's too), plus the device, the CUDA stream handle
// (torch.cuda.current_stream().cuda_stream) and the fused loss's workspace; nothing here knows about
// torch, so one build serves every torch version. Every argument is required and unknown names are
// rejected. Built by the host compiler; the kernels are in grpo_cuda_kernels.cu.
#include "grpo_bindings.h"  // pybind11, the keyword parser and the argument structs (csrc/common)

#include <stdexcept>
#include <string>

#include "grpo_cuda.h"

namespace py = pybind11;
using namespace grpo_fast;
using namespace grpo_fast::cuda;
using bindings::Kw;

namespace {

constexpr const char* kModule = "grpo_fast._C_cuda";

// What grpo_bindings.h's def_kernel_calls runs: the CUDA-only keywords (device and stream, and the
// fused loss's workspace), then the launchers of grpo_cuda_kernels.cu (which check their arguments).
struct CudaCalls {
  static Context context(Kw& kw, bool fused) {
    Context c;
    if (fused) {
      c.scratch = kw.ptr<float>("scratch");
      c.scratch_floats = kw.get<int64_t>("scratch_floats");
    }
    c.device = kw.get<int32_t>("device");
    c.stream = kw.ptr<void>("stream");
    return c;
  }
  static void fused_loss(const LossArgs& a, const Context& c) { cuda::fused_loss(a, c); }
  static void logprobs_fwd(const LogprobArgs& a, const Context& c) { cuda::token_logprobs(a, c); }
  static void logprobs_bwd(const LogprobGradArgs& a, const Context& c) { cuda::logprobs_backward(a, c); }
};

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

  bindings::def_kernel_calls<CudaCalls>(m, kModule);

  m.def(
      "token_terms",
      [](py::kwargs kwargs) {
        Kw kw(kwargs, kModule);
        const LossParams p = bindings::loss_params(kw);
        const int64_t n = kw.get<int64_t>("n");
        const float* logp = kw.ptr<const float>("logp");
        const float* ref = kw.ptr<const float>("ref");
        const float* adv = kw.ptr<const float>("adv");
        const float* isr = kw.ptr<const float>("isr");
        const float* ratio = kw.ptr<const float>("ratio");
        float* out = kw.ptr<float>("out");
        const bool on_device = kw.get<bool>("on_device");
        const Context c = CudaCalls::context(kw, false);
        kw.done();
        if (!logp || !ref || !adv || !isr || !ratio || !out) throw py::value_error("token_terms: every array is required");
        py::gil_scoped_release release;
        if (on_device) token_terms_device(p, n, logp, ref, adv, isr, ratio, out, c.device, c.stream);
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
