"""backend="torch": the eager reference (grpo_fast/reference.py) behind the kernel contract.

The public functions differentiate this backend through torch autograd (``Backend.autograd``):
``grpo_loss`` and ``grpo_fast.logprobs`` call the reference itself, so a create_graph backward
(second order) works. The chunk loops of the fused-linear paths (``fused_linear_grpo_loss``,
``fused_linear_logprobs``, ``fused_linear_token_logprobs``) call the entry points below on one chunk
of logits at a time, like any backend, so their float32 temporaries (upcast, softmax, …) stay
chunk-sized. ``fused_loss`` gets its gradient by autograd on the chunk; ``logprobs_forward`` /
``logprobs_backward`` are the two-part-lse formulas of grpo_fast/logprobs.py in eager torch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._config import STAT_ENTROPY
from ..reference import group_advantages_reference, logprobs_reference, token_logprobs_reference

DEVICE_TYPES = None  # any device torch computes on


def unavailable_reason() -> Optional[str]:
    return None


def fused_loss(inp, grad: Optional[torch.Tensor]):
    """The contract's fused_loss by autograd on the reference's formulas (one chunk: memory is the chunk's)."""
    from ..fused_linear import _loss_from_logp

    z = inp.logits.detach()
    with torch.enable_grad():
        z.requires_grad_(grad is not None)
        # Valid rows only (docs/spec.md): a masked row's logits are replaced by zeros before the softmax,
        # so a NaN or inf there reaches neither the loss, nor the metrics, nor the gradient (its row is 0).
        valid = (inp.mask != 0).unsqueeze(-1)
        zv = torch.where(valid, z, torch.zeros((), dtype=z.dtype))
        if inp.entropy_weight is None:
            logp, entropy = token_logprobs_reference(zv, inp.ids, inp.cfg.temperature, return_entropy=True)
        else:  # the entropy bonus: the entropy with its gradient
            logp, entropy = logprobs_reference(zv, inp.ids, inp.cfg.temperature, return_entropy=True)
        A = inp.advantages
        if A is None:
            A = group_advantages_reference(inp.rewards, inp.cfg.group_size, inp.scale_rewards, inp.cfg.adv_eps)
        loss, stats = _loss_from_logp(logp, inp.mask, inp.weight, A, inp.old_logp, inp.ref_logp, inp.isr, inp,
                                      entropy, inp.entropy_weight)
        stats[STAT_ENTROPY] = (entropy.detach() * inp.mask).sum()
        if grad is not None:
            (g,) = torch.autograd.grad(loss, z)
            grad.copy_(g)  # after autograd is done reading z: grad may alias the logits
    return stats, logp.detach()


def _masked(logits, mask):
    """The logits with a masked row (mask == 0) replaced by zeros before any softmax: whatever it holds
    (NaN, inf) reaches nothing; its outputs are then set to 0 (``_zero_masked``)."""
    if mask is None:
        return logits
    return torch.where((mask != 0).unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))


def _zero_masked(mask, *outs):
    if mask is None:
        return outs
    keep = mask != 0
    return tuple(None if o is None else torch.where(keep if o.dim() == keep.dim() else keep.unsqueeze(-1), o,
                                                    torch.zeros_like(o)) for o in outs)


def token_logprobs(logits, ids, temperature, return_entropy, mask=None):
    out = token_logprobs_reference(_masked(logits, mask), ids, temperature, return_entropy=return_entropy)
    logp, entropy = (out[0].float(), out[1].float()) if return_entropy else (out.float(), None)
    return _zero_masked(mask, logp, entropy)


def _x(logits, temperature):
    tau = temperature.unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    return logits.float() / tau


def logprobs_forward(logits, ids, temperature, return_entropy, mask=None):
    x = _x(_masked(logits, mask), temperature)
    shift = x.amax(-1, keepdim=True)
    shift = torch.where(shift == float("-inf"), torch.zeros_like(shift), shift)
    t = x - shift
    del x
    log_d = torch.logsumexp(t, -1)
    logp = t.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - log_d
    entropy = None
    if return_entropy:
        p = torch.exp(t - log_d.unsqueeze(-1))
        entropy = log_d - (p * torch.where(p > 0, t, torch.zeros_like(t))).sum(-1)
    return _zero_masked(mask, logp, entropy, torch.stack((shift.squeeze(-1), log_d), -1))


def logprobs_backward(logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad):
    tau = temperature.unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    t = (_x(logits, temperature) - lse[..., :1]) - lse[..., 1:]  # log p = (x − shift) − log_d
    p = torch.exp(t)
    d = torch.zeros_like(t)
    if g_entropy is not None:
        d -= g_entropy.unsqueeze(-1) * p * (torch.where(p > 0, t, torch.zeros_like(t)) + entropy.unsqueeze(-1))
    if g_logp is not None:
        d -= g_logp.unsqueeze(-1) * p
        d.scatter_add_(-1, ids.unsqueeze(-1), g_logp.unsqueeze(-1))
    # as the kernels: a token without upstream gradient (masked padding) gets a zero row whatever its logits
    live = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for g in (g_logp, g_entropy):
        if g is not None:
            live |= g != 0
    grad.copy_(torch.where(live.unsqueeze(-1), d / tau, torch.zeros((), dtype=d.dtype, device=d.device)))
