"""The CUDA C++ backend: grpo_fast._C_cuda (csrc/cuda), hand-written kernels taking raw pointers.

One thread block per token row: 16-byte loads, online logsumexp (warp shuffles, then shared
memory), fp32 math for fp32/bf16/fp16 logits, and the gradient written in the same kernel while the
row is in L2. The per-token GRPO math is csrc/common/grpo_math.h, shared with the CPU backend.
The extension is built by setup.py when nvcc is found (GRPO_FAST_CUDA=auto|0|1) and links the CUDA
runtime statically; it takes the stream from ``torch.cuda.current_stream()``, so it orders with
torch's own work like any torch op.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._config import NUM_STATS, KernelConfig

DEVICE_TYPES = ("cuda",)

try:
    from .. import _C_cuda
    _IMPORT_ERROR = None
except ImportError as e:  # not built: no nvcc at install time, or GRPO_FAST_CUDA=0
    _C_cuda = None
    _IMPORT_ERROR = e

# Logit dtype codes of csrc/cuda/grpo_cuda.h (enum DType).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def unavailable_reason() -> Optional[str]:
    """None when the CUDA backend can run, else why not and how to fix it."""
    if _C_cuda is None:
        return (f"the CUDA extension grpo_fast._C_cuda is not built ({_IMPORT_ERROR}); build it with nvcc on "
                "PATH or CUDA_HOME set: `GRPO_FAST_CUDA=1 pip install .` (or `python setup.py build_ext --inplace`)")
    if not torch.cuda.is_available():
        return ("no CUDA device is available (torch.cuda.is_available() is False): the cuda backend needs CUDA "
                "tensors on an NVIDIA GPU with a CUDA build of torch")
    return None


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _params(cfg: KernelConfig) -> dict:
    """KernelConfig -> the LossParams keyword arguments of _C_cuda (grpo_math.h)."""
    return dict(
        family=cfg.family, kl_estimator=cfg.kl_estimator, level=cfg.level, has_delta=cfg.has_delta,
        bias_correction_kl=cfg.bias_correction_kl, temperature=cfg.temperature, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, delta=cfg.delta, beta=cfg.beta, sapo_temp_pos=cfg.sapo_temp_pos,
        sapo_temp_neg=cfg.sapo_temp_neg,
    )


def _logits_kwargs(logits: torch.Tensor) -> dict:
    assert logits.dim() == 3 and logits.stride(-1) == 1, "validation.py hands over stride(-1) == 1 logits"
    B, T, V = logits.shape
    return dict(logits=logits.data_ptr(), dtype=_DTYPE_CODES[logits.dtype], B=B, T=T, V=V,
                stride_b=logits.stride(0), stride_t=logits.stride(1))


def _device_and_stream(t: torch.Tensor):
    dev = t.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(dev).cuda_stream


def fused_loss(inp, grad: Optional[torch.Tensor]):
    """The fused pass (see the backend interface in grpo_fast/backends/__init__.py).

    Args:
        inp: validation.LossInputs with (B, T, V) CUDA logits, stride(-1) == 1.
        grad: None, or (B, T, V) in the logits' dtype (may be inp.logits itself: inplace).
    Returns:
        stats: (NUM_STATS,) float32 sums; logp: (B, T) float32.
    """
    with torch.cuda.device(inp.logits.device):
        return fused_loss_with(_C_cuda, inp, grad, *_device_and_stream(inp.logits))


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool):
    """(logp (B, T) float32, entropy (B, T) float32 or None) without gradient; ids (B, T) integer."""
    with torch.cuda.device(logits.device):
        return token_logprobs_with(_C_cuda, logits, ids, temperature, return_entropy, *_device_and_stream(logits))


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, temperature, return_entropy: bool):
    """Forward of grpo_fast.logprobs: (logp, entropy | None, lse): (B, T) float32, lse (B, T, 2) float32 in
    two parts (see grpo_fast/logprobs.py)."""
    with torch.cuda.device(logits.device):
        return logprobs_forward_with(_C_cuda, logits, ids, temperature, return_entropy, *_device_and_stream(logits))


def logprobs_backward(logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad) -> None:
    """Backward of grpo_fast.logprobs: grad (B, T, V) ← (g_logp·(onehot − p) − g_entropy·p·(log p + H))/τ."""
    with torch.cuda.device(logits.device):
        logprobs_backward_with(_C_cuda, logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad,
                               *_device_and_stream(logits))


# The calls themselves, with the extension module, device index and stream given explicitly (the
# tests run them on the host-emulation build of the same kernels too).


def _tau_kwargs(temperature) -> dict:
    """A float, or (B, T) float32 contiguous per-token temperatures."""
    if isinstance(temperature, torch.Tensor):
        assert temperature.dtype == torch.float32 and temperature.is_contiguous()
        return dict(temperature=1.0, tau_rows=temperature.data_ptr())
    return dict(temperature=float(temperature), tau_rows=0)


def logprobs_forward_with(ext, logits, ids, temperature, return_entropy: bool, device: int, stream: int):
    B, T, _ = logits.shape
    dev = logits.device
    assert ids.dtype == torch.int64 and ids.is_contiguous()
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    lse = torch.empty((B, T, 2), dtype=torch.float32, device=dev)  # (max x, ln Σ exp(x − max))
    entropy = torch.empty((B, T), dtype=torch.float32, device=dev) if return_entropy else None
    ext.logprobs_fwd(**_logits_kwargs(logits), ids=ids.data_ptr(), **_tau_kwargs(temperature), logp=logp.data_ptr(),
                     entropy=_ptr(entropy), lse=lse.data_ptr(), device=device, stream=stream)
    return logp, entropy, lse


def logprobs_backward_with(ext, logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad,
                           device: int, stream: int) -> None:
    assert grad.shape == logits.shape and grad.dtype == logits.dtype and grad.stride(-1) == 1
    assert lse.shape == (*logits.shape[:2], 2), "lse: (B, T, 2) (max x, ln Σ exp(x − max)) from logprobs_forward"
    for t in (lse, entropy, g_logp, g_entropy):
        assert t is None or (t.dtype == torch.float32 and t.is_contiguous())
    ext.logprobs_bwd(**_logits_kwargs(logits), grad=grad.data_ptr(), grad_stride_b=grad.stride(0),
                     grad_stride_t=grad.stride(1), ids=ids.data_ptr(), **_tau_kwargs(temperature), lse=lse.data_ptr(),
                     entropy=_ptr(entropy), g_logp=_ptr(g_logp), g_entropy=_ptr(g_entropy), device=device,
                     stream=stream)


def fused_loss_with(ext, inp, grad: Optional[torch.Tensor], device: int, stream: int):
    logits, cfg = inp.logits, inp.cfg
    B, T, _ = logits.shape
    dev = logits.device
    if grad is not None:
        assert grad.shape == logits.shape and grad.dtype == logits.dtype and grad.stride(-1) == 1
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    stats = torch.empty((NUM_STATS,), dtype=torch.float32, device=dev)
    n_scratch = ext.fused_scratch_floats(B, T, cfg.level, inp.rewards is not None, grad is not None)
    scratch = torch.empty((n_scratch,), dtype=torch.float32, device=dev)
    ext.fused_loss(
        **_logits_kwargs(logits),
        grad=_ptr(grad), grad_stride_b=grad.stride(0) if grad is not None else 0,
        grad_stride_t=grad.stride(1) if grad is not None else 0,
        ids=inp.ids.data_ptr(), mask=inp.mask.data_ptr(), weight=inp.weight.data_ptr(),
        advantages=_ptr(inp.advantages),
        adv_per_token=inp.advantages is not None and inp.advantages.dim() == 2,
        rewards=_ptr(inp.rewards), group_size=cfg.group_size, scale_rewards=cfg.scale_rewards,
        adv_eps=cfg.adv_eps, old_logp=_ptr(inp.old_logp),
        ref_logp=_ptr(inp.ref_logp) if cfg.beta != 0.0 else 0,
        isr=_ptr(inp.isr), isr_per_token=inp.isr is not None and inp.isr.dim() == 2,
        **_params(cfg),
        logp=logp.data_ptr(), stats=stats.data_ptr(), scratch=scratch.data_ptr(), scratch_floats=n_scratch,
        device=device, stream=stream,
    )
    return stats, logp


def token_logprobs_with(ext, logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool,
                        device: int, stream: int):
    B, T, _ = logits.shape
    dev = logits.device
    ids = ids.to(torch.int64).contiguous()
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    entropy = torch.empty((B, T), dtype=torch.float32, device=dev) if return_entropy else None
    ext.token_logprobs(
        **_logits_kwargs(logits), ids=ids.data_ptr(), temperature=float(temperature),
        logp=logp.data_ptr(), entropy=_ptr(entropy), device=device, stream=stream,
    )
    return logp, entropy


def token_terms(cfg: KernelConfig, logp, ref, adv, isr, ratio, *, on_device: bool, ext=None) -> torch.Tensor:
    """grpo_math.h token_terms() as compiled by nvcc, on 1-D float32 tensors of equal length n.

    on_device=False runs the header's host side (CPU tensors), True its device side (CUDA tensors).
    Returns (n, 7) float32: loss, kl, d_logp, d_ratio, clip_low, clip_high, cispo_clip.
    """
    ext = ext or _C_cuda
    ts = [t.detach().to(torch.float32).contiguous() for t in (logp, ref, adv, isr, ratio)]
    n = ts[0].numel()
    dev = ts[0].device
    out = torch.empty((n, ext.TERM_COLUMNS), dtype=torch.float32, device=dev)
    device, stream = _device_and_stream(ts[0]) if on_device else (0, 0)
    ext.token_terms(
        **_params(cfg), n=n, logp=ts[0].data_ptr(), ref=ts[1].data_ptr(), adv=ts[2].data_ptr(),
        isr=ts[3].data_ptr(), ratio=ts[4].data_ptr(), out=out.data_ptr(), on_device=on_device,
        device=device, stream=stream,
    )
    return out
