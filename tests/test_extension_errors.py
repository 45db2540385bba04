"""Errors inside the compiled extensions surface as Python exceptions with their message, never a crash."""
import pytest

from grpo_fast.backends import cpu as cpu_backend

try:
    from grpo_fast import _C_cuda
except ImportError:  # not built (no nvcc)
    _C_cuda = None


@pytest.mark.skipif(cpu_backend._C_cpu is None, reason="the CPU extension is not built")
def test_cpu_allocation_failure_is_a_python_exception():
    # B·T = 2^60 tokens: the kernel's per-token arrays cannot be allocated. Arguments are checked and
    # the arrays allocated before any tensor memory is read, so dummy non-null addresses are safe.
    dummy = 4096
    with pytest.raises((MemoryError, ValueError)):
        cpu_backend._C_cpu.fused_loss(
            logits=dummy, dtype=0, B=2**40, T=2**20, V=8, stride_b=0, stride_t=0, grad=0, grad_stride_b=0,
            grad_stride_t=0, ids=dummy, mask=dummy, weight=dummy, advantages=dummy, adv_per_token=False, rewards=0,
            group_size=0, scale_rewards=1, adv_eps=1e-4, old_logp=0, ref_logp=0, isr=0, isr_per_token=False,
            family=0, kl_estimator=0, level=0, has_delta=False, bias_correction_kl=False, temperature=1.0,
            eps_low=0.2, eps_high=0.2, delta=0.0, beta=0.0, sapo_temp_pos=1.0, sapo_temp_neg=1.05,
            log_ratio_clamp=float("inf"), dual_clip_c=0.0, is_lo=0.0, is_hi=0.2, entropy_weight=0, logp=dummy,
            stats=dummy, nthreads=1)


@pytest.mark.skipif(cpu_backend._C_cpu is None, reason="the CPU extension is not built")
def test_cpu_bad_arguments_are_python_exceptions():
    with pytest.raises(ValueError, match="grpo_fast._C_cpu: temperature must be > 0"):
        cpu_backend._C_cpu.token_logprobs(logits=4096, dtype=0, B=1, T=1, V=8, stride_b=8, stride_t=8, ids=4096,
                                          mask=0, temperature=0.0, logp=4096, entropy=0, nthreads=1)


@pytest.mark.skipif(_C_cuda is None, reason="the CUDA extension is not built (no nvcc at install time)")
def test_cuda_error_is_a_python_exception_with_the_cuda_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the call below would succeed on real memory")
    # No device here: the first CUDA call fails; the extension must raise, naming the CUDA error.
    with pytest.raises(RuntimeError, match="CUDA"):
        _C_cuda.token_logprobs(logits=4096, dtype=0, B=1, T=1, V=8, stride_b=8, stride_t=8, ids=4096,
                               mask=0, temperature=1.0, logp=4096, entropy=0, device=0, stream=0)


@pytest.mark.skipif(cpu_backend._C_cpu is None, reason="the CPU extension is not built")
def test_cpu_keywords_are_strict():
    # One binding style with _C_cuda (csrc/common/grpo_bindings.h): a missing or misspelt keyword
    # fails loudly instead of leaving a field at zero.
    kw = dict(logits=4096, dtype=0, B=1, T=1, V=8, stride_b=8, stride_t=8, ids=4096, mask=0, temperature=1.0,
              logp=4096, entropy=0, nthreads=1)
    with pytest.raises(KeyError, match="grpo_fast._C_cpu: missing argument nthreads"):
        cpu_backend._C_cpu.token_logprobs(**{k: v for k, v in kw.items() if k != "nthreads"})
    with pytest.raises(TypeError, match="grpo_fast._C_cpu: unexpected argument lse"):
        cpu_backend._C_cpu.token_logprobs(**kw, lse=0)  # token_logprobs takes no lse (logprobs_fwd does)
    with pytest.raises(ValueError, match="grpo_fast._C_cpu: logprobs_fwd: lse is required"):
        cpu_backend._C_cpu.logprobs_fwd(**kw, tau_rows=0, lse=0)
