"""verl's fused log-prob/entropy head, by grpo_fast's kernels.

verl computes the actor's per-token log-probs and entropies from the last hidden states and the LM
head with ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (its "fused kernels"
option). This module provides the same call, so that an actor can swap the import:

    - from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
    + from grpo_fast.integrations.verl import linear_cross_entropy

It does not import verl. The implementation is ``grpo_fast.fused_linear_logprobs`` (chunked: the
(N, V) logits are never held; backward recomputes each chunk's logits), on the best backend for the
tensors' device. verl's ``dist_process_group`` (the LM head split along V over a tensor-parallel
group: ``weight`` is this rank's (V_r, H) rows, in rank order) is ``fused_linear_logprobs``' ``group``
(grpo_fast/vocab_parallel.py): the outputs are the whole vocabulary's on every rank, ∂hidden is
all-reduced over the group and ∂weight stays this rank's rows.

verl's policy losses themselves (vanilla, gspo, cispo, ..., agg_loss, kl_penalty) on these
log-probs are in ``grpo_fast.verl_losses``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..logprobs import fused_linear_logprobs

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: Optional[object] = None,
):
    """verl's contract: per-token ``(logprobs, entropy)`` of ``labels`` under softmax(hidden·weightᵀ / τ).

    Args:
        hidden: (N, H) (or (..., H), flattened) float32 | bfloat16 | float16.
        weight: (V, H), the LM head.
        labels: (N,) (or the leading shape of hidden) int64 | int32 in [0, V).
        temperature: a float > 0 (or a per-token tensor of labels' shape).
        reduction: "none" only (what verl's actor uses); anything else raises ValueError.
        dist_process_group: None, or the ProcessGroup over which the vocabulary is split (weight is
            this rank's shard; hidden and labels are the same on every rank).

    Returns:
        (logprobs, entropy): float32 of labels' shape, differentiable in hidden and weight.
    """
    if reduction != "none":
        raise ValueError(f'reduction must be "none" (per-token logprobs and entropy), got {reduction!r}')
    if isinstance(hidden, torch.Tensor) and hidden.dim() > 3:
        lead = hidden.shape[:-1]
        logp, ent = fused_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                          temperature=temperature, return_entropy=True, group=dist_process_group)
        return logp.view(lead), ent.view(lead)
    logp, ent = fused_linear_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True,
                                      group=dist_process_group)
    return logp, ent
