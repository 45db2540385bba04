"""The eager PyTorch reference: SPEC.md in code, the oracle every backend is tested against.

Written to be read, not to be fast. Memory traffic of the eager path (N = B·T tokens, V vocab),
which is what the fused kernels avoid:

    x = logits / τ                 read NV, write NV         (plus an upcast copy for bf16/fp16)
    t = x - max(x)                 read 2NV, write NV        (the shifted form: no cancellation at large |x|)
    log Σ exp(t)                   read NV, write NV
    entropy = log Σ exp(t) - Σ p·t read NV, write NV (p), read 2NV
    backward                       write NV (softmax), read/write NV several times

Called with float64 logits it computes in float64 (the tests' oracle); otherwise it accumulates in
float32 whatever the logits' dtype, as SPEC.md asks, and autograd returns the gradient in the
logits' own dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._config import CLIP_FAMILY


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
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1) - lse
    if not return_entropy:
        return logp, None
    p = torch.exp(x - lse.unsqueeze(-1))
    # p·x with p = 0 for banned (-inf) entries: 0·(-inf) would be NaN, the term is 0. The zero goes
    # into x (not into the product), so that autograd never forms 0·(-inf) either.
    entropy = lse - (p * torch.where(p > 0, x, torch.zeros_like(x))).sum(-1)
    return logp, entropy


def _kl(ref: torch.Tensor, logp: torch.Tensor, estimator: str) -> torch.Tensor:
    d = ref - logp
    if estimator == "k3":  # unbiased, always >= 0 (Schulman's k3; DeepSeekMath, TRL, verl low_var_kl)
        return torch.exp(d) - d - 1
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    raise ValueError(f"kl_estimator must be 'k3', 'k1' or 'k2', got {estimator!r}")


def grpo_loss_reference(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: Optional[torch.Tensor] = None,
    *,
    rewards: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    scale_rewards: str = "group",
    adv_eps: float = 1e-4,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    completion_mask: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    use_bias_correction_kl: bool = False,
):
    """The GRPO loss of SPEC.md, eagerly. Returns ``(loss, metrics)``; no argument checking.

    A NaN or +inf logit makes its row's log-prob NaN and so the loss NaN, also when the row is
    masked (the mask multiplies, it does not select), as every kernel backend does.
    """
    B, T, _ = logits.shape
    acc = _acc_dtype(logits)
    if epsilon_high is None:
        epsilon_high = epsilon_low

    # Per-token log-probs (differentiable) and entropy (a metric).
    logp, entropy = token_logprobs_reference(logits, completion_ids, temperature, return_entropy=True)

    mask = torch.ones((B, T), dtype=acc, device=logits.device) if completion_mask is None else completion_mask.to(acc)
    if advantages is None:
        advantages = group_advantages_reference(rewards, group_size, scale_rewards, adv_eps)
    A = advantages.to(acc)
    A = A.unsqueeze(1) if A.dim() == 1 else A  # (B, 1) broadcasts over T

    # Importance ratio: per token, or one per sequence (GSPO).
    old = logp.detach() if old_logp is None else old_logp.to(acc)  # on-policy: r = 1, dr/dlogp = 1
    log_ratio = logp - old
    if importance_sampling_level == "token":
        s = log_ratio
    else:
        s = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    r = torch.exp(s)

    # Per-token loss.
    if loss_type in CLIP_FAMILY:
        r2 = torch.clamp(r, 1 - epsilon_low, 1 + epsilon_high)
        r1 = torch.clamp(r, max=delta) if delta is not None else r  # two-sided clipping (INTELLECT-2)
        L = -torch.min(r1 * A, r2 * A)
    elif loss_type == "cispo":  # MiniMax-M1: clipped, stop-gradient IS weight on the log-prob
        L = -torch.clamp(r, max=epsilon_high).detach() * A * logp
    elif loss_type == "sapo":  # soft adaptive gate instead of a hard clip
        tau = torch.where(A > 0, torch.full_like(A, sapo_temperature_pos), torch.full_like(A, sapo_temperature_neg))
        L = -(4.0 / tau) * torch.sigmoid(tau * (r - 1)) * A
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    L = L.expand(B, T) if L.shape[1] == 1 else L

    if importance_sampling_ratio is not None:  # rollout-engine (vLLM) correction
        isr = importance_sampling_ratio.to(acc)
        L = L * (isr.unsqueeze(1) if isr.dim() == 1 else isr)
    kl = None
    if beta != 0.0:
        kl = _kl(ref_logp.to(acc), logp, kl_estimator)
        if use_bias_correction_kl:
            kl = kl * r
        L = L + beta * kl

    # Aggregation.
    row_len = mask.sum(-1).clamp(min=1.0)
    if loss_type in ("grpo", "sapo"):
        loss = ((L * mask).sum(-1) / row_len).mean()
    elif loss_type == "bnpo":
        loss = (L * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        mcl = T if max_completion_length is None else max_completion_length
        loss = (L * mask).sum() / (B * mcl)
    elif loss_type in ("dapo", "cispo"):
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch), dtype=acc)
        loss = (L * mask).sum() / n.clamp(min=1.0)
    else:  # luspo: sequence-length-weighted sum per row, mean over rows
        loss = (L * mask).sum(-1).mean()

    # Metrics: masked means over valid tokens. At sequence level with a per-row advantage the clip
    # flags are the row's (ratio and advantage are one value per row): averaged over the B rows, as
    # TRL does. Decided by the options, not by shape: at T = 1 a token-level (B, 1) is still tokens.
    row_level = importance_sampling_level == "sequence" and advantages.dim() == 1

    def masked_mean(x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        x = x.detach().to(acc)
        if rows:
            return x.mean().float()
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).float()

    metrics = {"entropy": masked_mean(entropy)}
    if kl is not None:
        metrics["kl"] = masked_mean(kl)
    if loss_type in CLIP_FAMILY:
        low = (r < 1 - epsilon_low) & (A < 0)
        high = (r > 1 + epsilon_high) & (A > 0)
        metrics["clip_ratio_low"] = masked_mean(low, row_level)
        metrics["clip_ratio_high"] = masked_mean(high, row_level)
        metrics["clip_ratio"] = masked_mean(low | high, row_level)
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = masked_mean((r > epsilon_high) & (A > 0), row_level)
    return loss.float() if acc == torch.float32 else loss, metrics
