"""The eager PyTorch reference: docs/spec.md in code, the oracle every backend is tested against.

Written to be read, not to be fast. Memory traffic of the eager path (N = B·T tokens, V vocab),
which is what the fused kernels avoid:

    x = logits / τ                 read NV, write NV         (plus an upcast copy for bf16/fp16)
    t = x - max(x)                 read 2NV, write NV        (the shifted form: no cancellation at large |x|)
    log Σ exp(t)                   read NV, write NV
    entropy = log Σ exp(t) - Σ p·t read NV, write NV (p), read 2NV
    backward                       write NV (softmax), read/write NV several times

Called with float64 logits it computes in float64 (the tests' oracle); otherwise it accumulates in
float32 whatever the logits' dtype, as docs/spec.md asks, and autograd returns the gradient in the
logits' own dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._config import LOSS_TABLE, KernelConfig
from .options import GRPOOptions, LossTensors, with_options


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_advantages_reference(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", adv_eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (B,) from rewards (B,): rows [k·G, (k+1)·G) form group k.

    Statistics in float64; a group of equal rewards gets exactly 0.
    """
    r = rewards.detach().to(torch.float64).view(-1, group_size)  # (B/G, G)
    mean = r.mean(dim=1, keepdim=True)
    centered = r - mean
    if scale_rewards == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + adv_eps)  # unbiased std (TRL, DeepSeekMath)
    elif scale_rewards == "batch":
        centered = centered / (r.reshape(-1).std() + adv_eps)
    elif scale_rewards != "none":  # "none" is Dr. GRPO: no division by a std
        raise ValueError(f"scale_rewards must be 'none', 'group' or 'batch', got {scale_rewards!r}")
    equal = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    centered = torch.where(equal, torch.zeros_like(centered), centered)
    out_dtype = rewards.dtype if rewards.dtype == torch.float64 else torch.float32
    return centered.reshape(-1).to(out_dtype)


def token_logprobs_reference(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0, *, return_entropy: bool = False):
    """logp[b, t] = log softmax(logits[b, t] / τ)[ids[b, t]] (and the entropy of that softmax).

    Differentiable in ``logits`` (the public ``token_logprobs`` is not; it is for old/ref log-probs).

    Computed in the shifted form, from t = x − max(x) (exact where x is near its max):
    logp = t_y − log Σ exp(t), entropy = log Σ exp(t) − Σ p·t. Forming x − lse or lse − Σ p·x from
    values of size 1e4 would lose one float32 ulp of 1e4 (~1e-3) to cancellation; softmax is
    shift-invariant, so logits that share a large offset are an ordinary distribution and get
    float32 accuracy. The max is a constant for autograd (its derivative cancels exactly).

    Non-finite logits: −inf entries (banned tokens) get p = 0; a row containing NaN or +inf gives
    NaN log-prob and entropy (+inf − +inf), as every kernel backend does.
    """
    x = logits.to(_acc_dtype(logits)) / temperature
    mx = x.detach().amax(dim=-1, keepdim=True)
    # A row of only −inf: shift by 0 (as torch.logsumexp does), its log-prob is then NaN anyway.
    mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
    t = x - mx
    log_s = torch.log(torch.exp(t).sum(-1))  # t <= 0 and the max entry is 0: no overflow, S >= 1
    logp = t.gather(-1, completion_ids.long().unsqueeze(-1)).squeeze(-1) - log_s
    if not return_entropy:
        return logp
    with torch.no_grad():
        p = torch.exp(t - log_s.unsqueeze(-1))
        # p·t with p = 0 for banned (-inf) entries: 0·(-inf) would be NaN, the term is 0.
        pt = torch.where(p > 0, p * t, torch.zeros_like(t))
        entropy = log_s - pt.sum(-1)
    return logp, entropy


def logprobs_reference(logits: torch.Tensor, ids: torch.Tensor, temperature=1.0, *, return_entropy: bool = False):
    """The oracle of ``grpo_fast.logprobs``: (logp, entropy | None), differentiable through BOTH.

    logits (..., V) with ids (...): (B, T, V) and (B, T), or (N, V) and (N,). ``temperature`` is a
    float or a tensor of the ids' shape (one τ per token). Unlike ``token_logprobs_reference`` (whose
    entropy is a metric, computed without a graph), the entropy carries a gradient:
    ∂H/∂x_j = −p_j·(log p_j + H).
    """
    acc = _acc_dtype(logits)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(acc).unsqueeze(-1)
    x = logits.to(acc) / temperature
    # The shifted form of token_logprobs_reference: t = x − max(x) (a constant for autograd, its
    # derivative cancels), log p = t − log Σ exp(t); never x − lse, which loses an ulp of |x| (~1e-3
    # at logits near ±1e4) in the log-probs, the entropy and both gradients.
    mx = x.detach().amax(dim=-1, keepdim=True)
    mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)  # a row of only −inf: NaN anyway
    t = x - mx
    log_s = torch.logsumexp(t, dim=-1)
    logp = t.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1) - log_s
    if not return_entropy:
        return logp, None
    p = torch.exp(t - log_s.unsqueeze(-1))
    # p·t with p = 0 for banned (-inf) entries: 0·(-inf) would be NaN, the term is 0. The zero goes
    # into t (not into the product), so that autograd never forms 0·(-inf) either.
    entropy = log_s - (p * torch.where(p > 0, t, torch.zeros_like(t))).sum(-1)
    return logp, entropy


def kl_estimate(ref: torch.Tensor, logp: torch.Tensor, estimator: str) -> torch.Tensor:
    d = ref - logp
    if estimator == "k3":  # unbiased, always >= 0 (Schulman's k3; DeepSeekMath, TRL, verl low_var_kl)
        return torch.exp(d) - d - 1
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    raise ValueError(f"kl_estimator must be 'k3', 'k1' or 'k2', got {estimator!r}")


def importance_ratio(logp: torch.Tensor, mask: torch.Tensor, level: str, old_logp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r = exp(s): (B, T) at token level, (B, 1) at sequence level (GSPO: s the row's masked mean log-ratio).

    ``old_logp=None`` is on-policy: old = logp.detach(), so r = 1 but dr/dlogp = 1.
    """
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    log_ratio = logp - old
    if level == "token":
        return torch.exp(log_ratio)
    # where, not a product: a masked token's terms are skipped, not multiplied by 0
    s = torch.where(mask != 0, log_ratio, torch.zeros_like(log_ratio)).sum(-1, keepdim=True)
    return torch.exp(s / mask.sum(-1, keepdim=True).clamp(min=1.0))


def aggregate(L: torch.Tensor, mask: torch.Tensor, aggregation: str, *, max_completion_length=None, num_items_in_batch=None) -> torch.Tensor:
    """The loss from the per-token ``L`` (B, T) by one of ``LossType.aggregation`` (docs/spec.md, "Aggregation")."""
    B, T = mask.shape
    if aggregation == "row_mean":
        return ((L * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if aggregation == "batch_token_mean":
        return (L * mask).sum() / mask.sum().clamp(min=1.0)
    if aggregation == "fixed_length":
        return (L * mask).sum() / (B * (T if max_completion_length is None else max_completion_length))
    if aggregation == "global_token_mean":
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch), dtype=L.dtype)
        return (L * mask).sum() / n.clamp(min=1.0)
    if aggregation == "row_sum_mean":  # luspo: sequence-length-weighted sum per row, mean over rows
        return (L * mask).sum(-1).mean()
    raise ValueError(f"unknown aggregation {aggregation!r}")


def per_token_loss(logp: torch.Tensor, mask: torch.Tensor, A: torch.Tensor, o: GRPOOptions, *,
                   old_logp: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                   importance_sampling_ratio: Optional[torch.Tensor] = None, cfg: Optional[KernelConfig] = None):
    """The per-token loss ``L`` (B, T) of docs/spec.md before aggregation, with the ratio ``r`` ((B, T),
    or (B, 1) at sequence level) and the KL term (B, T) (None when beta = 0).

    Differentiable in ``logp``; ``mask``, ``A`` ((B,) or (B, T)), old/ref and the IS ratio are
    constants. Used by the reference and by the fused-linear path's torch code. ``cfg`` (the kernels'
    KernelConfig) adds verl's generalizations of the families (grpo_fast/verl_losses.py:
    fused_policy_loss): the log-ratio clamp, the dual clip and the is_weight bounds; None: TRL's forms.
    """
    acc = logp.dtype
    eps_high = o.epsilon_low if o.epsilon_high is None else o.epsilon_high
    A = A.to(acc)
    A = A.unsqueeze(1) if A.dim() == 1 else A  # (B, 1) broadcasts over T

    r = importance_ratio(logp, mask, o.importance_sampling_level, old_logp)
    if cfg is not None and cfg.log_ratio_clamp > 0:  # verl: exp(clamp(s, ±c)), no gradient where clamped
        r = torch.clamp(r, math.exp(-cfg.log_ratio_clamp), math.exp(cfg.log_ratio_clamp))

    family = LOSS_TABLE[o.loss_type].family
    if family == "clip":
        r2 = torch.clamp(r, 1 - o.epsilon_low, 1 + eps_high)
        r1 = torch.clamp(r, max=o.delta) if o.delta is not None else r  # two-sided clipping (INTELLECT-2)
        L = -torch.min(r1 * A, r2 * A)
        if cfg is not None and cfg.dual_clip_c > 0:  # verl's dual clip: for A < 0 at most −A·c
            L = torch.where(A < 0, torch.minimum(L, -A * cfg.dual_clip_c), L)
    elif family == "is_weight":  # MiniMax-M1: clipped, stop-gradient IS weight on the log-prob
        w = torch.clamp(r, max=eps_high) if cfg is None else torch.clamp(r, *cfg.is_bounds)
        L = -w.detach() * A * logp
    else:  # soft_gate (SAPO): a sigmoid gate instead of a hard clip
        tau = torch.where(A > 0, torch.full_like(A, o.sapo_temperature_pos), torch.full_like(A, o.sapo_temperature_neg))
        L = -(4.0 / tau) * torch.sigmoid(tau * (r - 1)) * A
    L = L.expand(logp.shape) if L.shape[1] == 1 else L

    if importance_sampling_ratio is not None:  # rollout-engine (vLLM) correction
        isr = importance_sampling_ratio.to(acc)
        L = L * (isr.unsqueeze(1) if isr.dim() == 1 else isr)
    kl = None
    if o.beta != 0.0:
        kl = kl_estimate(ref_logp.to(acc), logp, o.kl_estimator)
        if o.use_bias_correction_kl:
            kl = kl * r
        L = L + o.beta * kl
    return L, r, kl


def row_level_flags(importance_sampling_level: str, advantages: Optional[torch.Tensor]) -> bool:
    """Whether the clip flags are one per row (and averaged over the B rows, as TRL does) rather than
    one per valid token: at sequence level with a per-row advantage, where ratio and advantage are the
    row's. Decided by the options and the advantage's rank, never by the shape of a chunk (at T = 1 a
    token-level (B, 1) is still tokens). Rewards give per-row advantages."""
    return importance_sampling_level == "sequence" and (advantages is None or advantages.dim() == 1)


def flag_counts(r: torch.Tensor, A: torch.Tensor, mask: torch.Tensor, o: GRPOOptions, rows: bool) -> dict:
    """The clip-flag metrics of the loss type as SUMS (float32): flags of valid tokens, or of rows
    when ``rows`` (``row_level_flags``). Divide by the token or row count for the metric."""
    eps_high = o.epsilon_low if o.epsilon_high is None else o.epsilon_high
    A = A.unsqueeze(1) if A.dim() == 1 else A
    family = LOSS_TABLE[o.loss_type].family
    flags = {}
    with torch.no_grad():
        if family == "clip":
            low, high = (r < 1 - o.epsilon_low) & (A < 0), (r > 1 + eps_high) & (A > 0)
            flags = {"clip_ratio_low": low, "clip_ratio_high": high, "clip_ratio": low | high}
        elif family == "is_weight":
            flags = {"cispo_clip_ratio": (r > eps_high) & (A > 0)}
        out = {}
        for name, f in flags.items():
            f = f.to(torch.float32)
            out[name] = f.sum() if rows else (f.expand(mask.shape) * mask).sum()
    return out


@with_options
def grpo_loss_reference(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: Optional[torch.Tensor] = None,
    **kwargs,  # the per-call tensors (options.LossTensors: rewards, old_logp, …) and the loss options
):
    """The GRPO loss of docs/spec.md, eagerly. Returns ``(loss, metrics)``; no argument checking
    beyond the option names (``grpo_fast.GRPOOptions``).

    Masked rows (mask 0) do not count: their logits are replaced by zeros before the softmax, so a
    NaN or inf in a masked row does not reach the loss and the row's gradient is exactly 0 (as with
    every kernel backend, which does not read such rows at all; Liger and flash-attn's losses behave
    so too). A NaN or +inf logit in a
    valid row makes its log-prob NaN and so the loss NaN.
    """
    (rewards, old_logp, ref_logp, completion_mask, importance_sampling_ratio,
     num_items_in_batch) = LossTensors.pop(kwargs)
    o = GRPOOptions.from_kwargs("grpo_loss_reference", kwargs)
    B, T, _ = logits.shape
    acc = _acc_dtype(logits)
    mask = torch.ones((B, T), dtype=acc, device=logits.device) if completion_mask is None else completion_mask.to(acc)

    # Per-token log-probs (differentiable) and entropy (a metric) of the valid rows: a masked row's
    # logits are replaced by zeros first (where, not a product: static shapes for torch.compile),
    # its log-prob and entropy are 0, and where's backward gives its logits an exact 0 gradient.
    valid = mask != 0
    z = torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    if o.entropy_coef != 0.0:  # the entropy bonus differentiates the entropy too
        logp, entropy = logprobs_reference(z, completion_ids, o.temperature, return_entropy=True)
    else:
        logp, entropy = token_logprobs_reference(z, completion_ids, o.temperature, return_entropy=True)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    if advantages is None:
        advantages = group_advantages_reference(rewards, o.group_size, o.scale_rewards, o.adv_eps)
    L, r, kl = per_token_loss(logp, mask, advantages, o, old_logp=old_logp, ref_logp=ref_logp,
                              importance_sampling_ratio=importance_sampling_ratio)

    loss = aggregate(L, mask, LOSS_TABLE[o.loss_type].aggregation, max_completion_length=o.max_completion_length,
                     num_items_in_batch=num_items_in_batch)
    if o.entropy_coef != 0.0:  # TRL's entropy bonus: c times the mean entropy of this call's valid tokens
        loss = loss - o.entropy_coef * (entropy * mask).sum() / mask.sum().clamp(min=1.0)

    # Metrics: masked means over valid tokens; clip flags over rows where they are the row's.
    n_tok = mask.sum().clamp(min=1.0)
    rows = row_level_flags(o.importance_sampling_level, advantages)
    metrics = {"entropy": ((entropy.detach() * mask).sum() / n_tok).float()}
    if kl is not None:
        metrics["kl"] = ((kl.detach() * mask).sum() / n_tok).float()
    for name, count in flag_counts(r, advantages.to(acc), mask, o, rows).items():
        metrics[name] = (count.to(acc) / (B if rows else n_tok)).float()
    return loss.float() if acc == torch.float32 else loss, metrics
