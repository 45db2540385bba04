"""torch.library custom ops, so that a training step calling grpo_loss compiles with fullgraph=True.

Eager calls go through api._FusedGRPOLoss (the gradient buffer is reused in place, no copy when
grad_output == 1). Under torch.compile the kernels are opaque custom ops with fake (meta)
implementations and a registered autograd formula; the compiled backward scales the precomputed
gradient out of place (one extra pass over it, which the compiler may fuse with what follows).

Value checks that read tensor data (ids in [0, V), finite rewards) cannot be traced, nor can those
of a number that changes between calls (dynamo makes it symbolic), so under compile they run inside
``grpo_fast::check_values`` — still before any kernel, at run time.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._autograd import check_first_order, second_order_message
from ._config import LOSS_TYPES, NUM_STATS, KernelConfig

_FIELDS = dataclasses.fields(KernelConfig)
# The integer codes pick code paths (a change recompiles anyway); the float options may change every
# call (num_items_in_batch with gradient accumulation, a beta or temperature schedule).
_CODE_FIELDS = [f.name for f in _FIELDS if f.type in ("int", "bool", int, bool)]
_NUMBER_FIELDS = [f.name for f in _FIELDS if f.name not in _CODE_FIELDS]
_LOSS_TYPE_NAMES = {code: name for name, code in LOSS_TYPES.items()}


def pack_config(cfg: KernelConfig) -> Tuple[List[int], Tensor]:
    """KernelConfig as custom-op arguments (custom ops take no dataclasses): the codes as ints, the
    float options as a float64 CPU tensor. A float that changes between compiled calls is symbolic;
    as an element of a float list it would be specialized (one recompile per value, then dynamo's
    recompile limit); inside a tensor it is data. ``ones·x`` rather than ``torch.tensor(x)``: dynamo
    keeps a symbolic x a graph input in the former only."""
    one = torch.ones((), dtype=torch.float64)
    return [int(getattr(cfg, n)) for n in _CODE_FIELDS], torch.stack([one * getattr(cfg, n) for n in _NUMBER_FIELDS])


def unpack_config(codes: List[int], numbers: Tensor) -> KernelConfig:
    kw = dict(zip(_NUMBER_FIELDS, numbers.tolist()))
    for f, v in zip(_CODE_FIELDS, codes):
        kw[f] = bool(v) if KernelConfig.__dataclass_fields__[f].type in ("bool", bool) else int(v)
    return KernelConfig(**kw)


@torch.library.custom_op("grpo_fast::check_values", mutates_args=())
def check_values(ids: Tensor, vocab: int, mask: Tensor, rewards: Optional[Tensor], advantages: Optional[Tensor],
                 codes: List[int], numbers: Tensor, num_items: Optional[Tensor]) -> Tensor:
    """Raises ValueError on out-of-range ids, non-finite rewards/advantages, mask values other than
    0/1, or a bad value of a
    numeric option (``codes, numbers``: pack_config's; ``num_items``: num_items_in_batch as a 0-d
    tensor, or None); returns the mask."""
    from .validation import check_number_values, check_token_values

    cfg = unpack_config(codes, numbers)
    check_number_values(
        _LOSS_TYPE_NAMES[cfg.loss_type], temperature=cfg.temperature, epsilon_low=cfg.eps_low,
        epsilon_high=cfg.eps_high, delta=cfg.delta if cfg.has_delta else None, beta=cfg.beta, adv_eps=cfg.adv_eps,
        sapo_temperature_pos=cfg.sapo_temp_pos, sapo_temperature_neg=cfg.sapo_temp_neg,
        num_items_in_batch=None if num_items is None else float(num_items.item()))
    check_token_values(ids, vocab, rewards, advantages, mask=mask)
    return mask.clone()


@check_values.register_fake
def _(ids, vocab, mask, rewards, advantages, codes, numbers, num_items):
    return torch.empty_like(mask)


@torch.library.custom_op("grpo_fast::fused_loss", mutates_args=())
def fused_loss(
    logits: Tensor, ids: Tensor, mask: Tensor, weight: Tensor, advantages: Optional[Tensor],
    rewards: Optional[Tensor], old_logp: Optional[Tensor], ref_logp: Optional[Tensor], isr: Optional[Tensor],
    codes: List[int], numbers: Tensor, backend: str, need_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """(stats (NUM_STATS,) float32 sums, grad (B, T, V) in the logits' dtype, or (0,) without grad)."""
    from . import backends
    from .validation import LossInputs

    impl = backends.resolve(backend, logits.device)
    inp = LossInputs(logits=logits, ids=ids, mask=mask, advantages=advantages, rewards=rewards, old_logp=old_logp,
                     ref_logp=ref_logp, isr=isr, weight=weight, cfg=unpack_config(codes, numbers), loss_type="", kl_estimator="",
                     level="", scale_rewards="", epsilon_high=0.0, delta=None, max_completion_length=0,
                     num_items_in_batch=None)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_grad else None
    stats, _ = impl.fused_loss(inp, grad)
    return stats, grad if grad is not None else logits.new_empty(0)


@fused_loss.register_fake
def _(logits, ids, mask, weight, advantages, rewards, old_logp, ref_logp, isr, codes, numbers, backend, need_grad):
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
    return (dlogits,) + (None,) * 12


_SECOND_ORDER = second_order_message(
    "grpo_loss", 'use backend="torch" (the eager reference, plain autograd) for a loss that needs them')


fused_loss.register_autograd(_backward, setup_context=_setup_context)
