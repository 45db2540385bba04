"""The calls into the two native extensions, grpo_fast._C_cpu and grpo_fast._C_cuda, built once.

Both take the same keyword arguments, the fields of csrc/common/grpo_args.h (named as
``KernelConfig`` and ``validation.LossInputs`` name them), filled by the one parser of
csrc/common/grpo_bindings.h; each extension adds its own execution keywords (``context`` below: CPU
``nthreads``; CUDA ``device``, ``stream`` and, for the fused loss, ``scratch``/``scratch_floats``).
No torch type crosses the boundary: pointers are ``tensor.data_ptr()`` integers (host or device
memory), sizes and strides count elements, so one build works with any torch version. Outputs are
allocated here on the logits' device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._config import NUM_STATS, KernelConfig

# Logit storage dtype codes (csrc/common/grpo_args.h: enum DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _check_side(name: str, t: Optional[torch.Tensor], device: torch.device) -> None:
    # validation.py hands over contiguous float32 tensors on the logits' device; the kernels read them by raw pointer.
    assert t is None or (t.device == device and t.dtype == torch.float32 and t.is_contiguous()), name


def logits_kwargs(logits: torch.Tensor) -> dict:
    """LogitsView: (B, T, V) with stride(-1) == 1, any B/T strides."""
    assert logits.dim() == 3 and logits.stride(-1) == 1, "validation.py hands over stride(-1) == 1 logits"
    B, T, V = logits.shape
    return dict(logits=logits.data_ptr(), dtype=DTYPE_CODES[logits.dtype], B=B, T=T, V=V,
                stride_b=logits.stride(0), stride_t=logits.stride(1))


def params_kwargs(cfg: KernelConfig) -> dict:
    """LossParams (grpo_math.h): KernelConfig's fields of the same names."""
    return dict(
        family=cfg.family, kl_estimator=cfg.kl_estimator, level=cfg.level, has_delta=cfg.has_delta,
        bias_correction_kl=cfg.bias_correction_kl, temperature=cfg.temperature, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, delta=cfg.delta, beta=cfg.beta, sapo_temp_pos=cfg.sapo_temp_pos,
        sapo_temp_neg=cfg.sapo_temp_neg, log_ratio_clamp=cfg.log_ratio_clamp, dual_clip_c=cfg.dual_clip_c,
        is_lo=cfg.is_bounds[0], is_hi=cfg.is_bounds[1],
    )


def _grad_kwargs(grad: Optional[torch.Tensor], logits: torch.Tensor) -> dict:
    if grad is not None:
        assert grad.shape == logits.shape and grad.dtype == logits.dtype and grad.stride(-1) == 1
    return dict(grad=ptr(grad), grad_stride_b=grad.stride(0) if grad is not None else 0,
                grad_stride_t=grad.stride(1) if grad is not None else 0)


def _tau_kwargs(temperature, device: torch.device) -> dict:
    """A float, or (B, T) float32 contiguous per-token temperatures."""
    if isinstance(temperature, torch.Tensor):
        _check_side("temperature", temperature, device)
        return dict(temperature=1.0, tau_rows=temperature.data_ptr())
    return dict(temperature=float(temperature), tau_rows=0)


def fused_loss(ext, inp, grad: Optional[torch.Tensor], **context):
    """One fused pass (the contract: grpo_fast/backends/__init__.py) through ``ext.fused_loss``.

    Args:
        inp: validation.LossInputs — logits (B, T, V) fp32/bf16/fp16 with stride(-1) == 1 and any B/T
            strides; ids (B, T) int64; mask, weight (B, T) f32; advantages (B,)|(B, T) or rewards (B,);
            old/ref (B, T) or None; isr (B,)|(B, T) or None; cfg: KernelConfig; entropy_weight (B, T) or
            None (the entropy bonus).
        grad: None, or (B, T, V) of the logits' dtype, stride(-1) == 1 — possibly the logits themselves
            (inplace): receives ∂loss/∂logits for grad_output = 1.
        context: the extension's execution keywords.

    Returns:
        stats (NUM_STATS,) float32 of sums (_config.STAT_*), logp (B, T) float32.
    """
    logits, cfg = inp.logits, inp.cfg
    B, T, _ = logits.shape
    dev = logits.device
    assert inp.ids.dtype == torch.int64 and inp.ids.is_contiguous() and inp.ids.device == dev
    for name in ("mask", "weight", "advantages", "rewards", "old_logp", "ref_logp", "isr", "entropy_weight"):
        _check_side(name, getattr(inp, name), dev)
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    stats = torch.empty((NUM_STATS,), dtype=torch.float32, device=dev)
    adv, isr = inp.advantages, inp.isr
    ext.fused_loss(
        **logits_kwargs(logits), **_grad_kwargs(grad, logits),
        ids=inp.ids.data_ptr(), mask=inp.mask.data_ptr(), weight=inp.weight.data_ptr(),
        advantages=ptr(adv), adv_per_token=adv is not None and adv.dim() == 2,
        rewards=ptr(inp.rewards), group_size=cfg.group_size, scale_rewards=cfg.scale_rewards, adv_eps=cfg.adv_eps,
        old_logp=ptr(inp.old_logp), ref_logp=ptr(inp.ref_logp) if cfg.beta != 0.0 else 0,
        isr=ptr(isr), isr_per_token=isr is not None and isr.dim() == 2,
        **params_kwargs(cfg),
        logp=logp.data_ptr(), stats=stats.data_ptr(), entropy_weight=ptr(inp.entropy_weight), **context,
    )
    return stats, logp


def token_logprobs(ext, logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool,
                   mask: Optional[torch.Tensor] = None, **context):
    """Per-token log-probs (B, T) float32 [and entropies (B, T) float32, else None], no gradient.

    logits: (B, T, V) fp32/bf16/fp16 with stride(-1) == 1 (any B/T strides); ids (B, T) integer;
    mask: (B, T) float32 contiguous or None: a masked (0) row is not read, its outputs are 0.
    """
    B, T, _ = logits.shape
    dev = logits.device
    ids = ids.to(torch.int64).contiguous()
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    entropy = torch.empty((B, T), dtype=torch.float32, device=dev) if return_entropy else None
    _check_side("mask", mask, dev)
    ext.token_logprobs(**logits_kwargs(logits), ids=ids.data_ptr(), mask=ptr(mask), temperature=float(temperature),
                       logp=logp.data_ptr(), entropy=ptr(entropy), **context)
    return logp, entropy


def logprobs_forward(ext, logits: torch.Tensor, ids: torch.Tensor, temperature, return_entropy: bool,
                     mask: Optional[torch.Tensor] = None, **context):
    """Forward of grpo_fast.logprobs: (logp, entropy | None, lse); logp and entropy (B, T) float32, lse
    (B, T, 2) float32 in two parts (max x, log Σ exp(x − max)) (see grpo_fast/logprobs.py).

    ids: (B, T) int64 contiguous; temperature: a float > 0, or (B, T) float32 contiguous per-token
    temperatures; mask: (B, T) float32 contiguous or None: a masked (0) row is not read, its logp,
    entropy and lse parts are 0.
    """
    B, T, _ = logits.shape
    dev = logits.device
    assert ids.dtype == torch.int64 and ids.is_contiguous()
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    lse = torch.empty((B, T, 2), dtype=torch.float32, device=dev)
    entropy = torch.empty((B, T), dtype=torch.float32, device=dev) if return_entropy else None
    _check_side("mask", mask, dev)
    ext.logprobs_fwd(**logits_kwargs(logits), ids=ids.data_ptr(), mask=ptr(mask), **_tau_kwargs(temperature, dev),
                     logp=logp.data_ptr(), entropy=ptr(entropy), lse=lse.data_ptr(), **context)
    return logp, entropy, lse


def logprobs_backward(ext, logits: torch.Tensor, ids: torch.Tensor, temperature, lse: torch.Tensor,
                      entropy: Optional[torch.Tensor], g_logp: Optional[torch.Tensor],
                      g_entropy: Optional[torch.Tensor], grad: torch.Tensor, **context) -> None:
    """Backward of grpo_fast.logprobs: grad (B, T, V) ← ∂L/∂logits from the upstream gradients.

    grad_j = (g_logp·(1[j = y] − p_j) − g_entropy·p_j·(log p_j + H)) / τ, log p = (x − lse[..., 0]) − lse[..., 1]
    with x = logits/τ and lse (B, T, 2) float32 contiguous from logprobs_forward.
    g_logp / g_entropy: (B, T) float32 contiguous or None (zero); entropy is needed with g_entropy.
    grad: (B, T, V) of the logits' dtype, stride(-1) == 1 (may be the logits themselves).
    """
    dev = logits.device
    for name, t in (("lse", lse), ("entropy", entropy), ("g_logp", g_logp), ("g_entropy", g_entropy)):
        _check_side(name, t, dev)
    assert g_entropy is None or entropy is not None
    assert lse.shape == (*logits.shape[:2], 2), "lse: (B, T, 2) (max x, ln Σ exp(x − max)) from logprobs_forward"
    ext.logprobs_bwd(**logits_kwargs(logits), **_grad_kwargs(grad, logits), ids=ids.data_ptr(),
                     **_tau_kwargs(temperature, dev), lse=lse.data_ptr(), entropy=ptr(entropy), g_logp=ptr(g_logp),
                     g_entropy=ptr(g_entropy), **context)
