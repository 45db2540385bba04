"""torch.library custom ops, so that a training step calling grpo_loss compiles with fullgraph=True.

Eager calls go through api._FusedGRPOLoss (the gradient buffer is reused in place, no copy when
grad_output == 1). Under torch.compile the kernels are opaque custom ops with fake (meta)
implementations and a registered autograd formula; the compiled backward scales the precomputed
gradient out of place (one extra pass over it, which the compiler may fuse with what follows).

Value checks that read tensor data (ids in [0, V), finite rewards) cannot be traced, so under
compile they run inside ``grpo_fast::check_values`` — still before any kernel, at run time.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._autograd import check_first_order, second_order_message
from ._config import NUM_STATS, KernelConfig

_CFG_FIELDS = [f.name for f in dataclasses.fields(KernelConfig)]


def pack_config(cfg: KernelConfig) -> List[float]:
    """KernelConfig as a flat float list (custom ops take no dataclasses); ints round-trip exactly."""
    return [float(getattr(cfg, n)) for n in _CFG_FIELDS]


def unpack_config(vals: List[float]) -> KernelConfig:
    kw = {}
    for f, v in zip(dataclasses.fields(KernelConfig), vals):
        kw[f.name] = bool(v) if f.type in ("bool", bool) else int(v) if f.type in ("int", int) else float(v)
    return KernelConfig(**kw)


@torch.library.custom_op("grpo_fast::check_values", mutates_args=())
def check_values(ids: Tensor, vocab: int, mask: Tensor, rewards: Optional[Tensor], advantages: Optional[Tensor]) -> Tensor:
    """Raises ValueError on out-of-range ids, non-finite rewards/advantages or mask values other
    than 0/1; returns the mask."""
    from .validation import check_token_values

    check_token_values(ids, vocab, rewards, advantages, mask=mask)
    return mask.clone()


@check_values.register_fake
def _(ids, vocab, mask, rewards, advantages):
    return torch.empty_like(mask)


@torch.library.custom_op("grpo_fast::fused_loss", mutates_args=())
def fused_loss(
    logits: Tensor, ids: Tensor, mask: Tensor, weight: Tensor, advantages: Optional[Tensor],
    rewards: Optional[Tensor], old_logp: Optional[Tensor], ref_logp: Optional[Tensor], isr: Optional[Tensor],
    cfg: List[float], backend: str, need_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """(stats (NUM_STATS,) float32 sums, grad (B, T, V) in the logits' dtype, or (0,) without grad)."""
    from . import backends
    from .validation import LossInputs

    impl = backends.resolve(backend, logits.device)
    inp = LossInputs(logits=logits, ids=ids, mask=mask, advantages=advantages, rewards=rewards, old_logp=old_logp,
                     ref_logp=ref_logp, isr=isr, weight=weight, cfg=unpack_config(cfg), loss_type="", kl_estimator="",
                     level="", scale_rewards="", epsilon_high=0.0, delta=None, max_completion_length=0,
                     num_items_in_batch=None)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_grad else None
    stats, _ = impl.fused_loss(inp, grad)
    return stats, grad if grad is not None else logits.new_empty(0)


@fused_loss.register_fake
def _(logits, ids, mask, weight, advantages, rewards, old_logp, ref_logp, isr, cfg, backend, need_grad):
    stats = logits.new_empty(NUM_STATS, dtype=torch.float32)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else logits.new_empty(0)
    return stats, grad


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_stats, _grad_grad):
    # No second order (the saved gradient has no graph): a create_graph backward raises instead of
    # silently dropping the Hessian term (torch.compile refuses double backward anyway).
    check_first_order(_SECOND_ORDER)
    # Out of place from the saved gradient: a retained graph (retain_graph=True) can run this again.
    (grad,) = ctx.saved_tensors
    dlogits = (grad * grad_stats[0]).to(grad.dtype) if grad.numel() else None
    return (dlogits,) + (None,) * 11


_SECOND_ORDER = second_order_message(
    "grpo_loss", 'use backend="torch" (the eager reference, plain autograd) for a loss that needs them')


fused_loss.register_autograd(_backward, setup_context=_setup_context)
