"""verl's policy losses, KL penalties and loss aggregation, on per-token log-probs.

verl (0.9.1) computes every actor loss from per-token tensors (B, T): ``log_prob`` of the current
policy, ``old_log_prob``, ``advantages``, ``response_mask`` and optional ``rollout_is_weights``. This
module provides the same functions under verl's names and signatures, so that ``log_prob`` can come
from grpo_fast's differentiable primitive and the loss trains through grpo_fast's kernels:

    logp, ent = grpo_fast.logprobs(logits, ids, temperature=τ, return_entropy=True)   # or fused_linear_logprobs
    loss, metrics = grpo_fast.verl_losses.get_policy_loss_fn("vanilla")(
        old_log_prob, logp, advantages, response_mask, "token-mean", actor_config)
    loss.backward()     # one fused backward over the logits (or the hidden states and the LM head)

Every function returns what verl's does: ``(loss, metrics)`` with a scalar loss and a dict of Python
floats under verl's metric names (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``).
``config`` is verl's ``ActorConfig`` (or anything with the same fields, attribute or mapping access):
``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``, ``tau_pos``, ``tau_neg``,
``policy_loss`` (``clip_cov_*``, ``kl_cov_ratio``, ``ppo_kl_coef``, ``dro_beta``) and
``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor``, the global normalizers of ``agg_loss``). The math is in docs/spec.md
("verl's policy losses"); it is written here once and tested against verl's own functions
(tests/test_verl_losses.py). This module does not import verl.

Policy losses (``POLICY_LOSSES``): vanilla, dppo_tv, dppo_kl, gspo, sapo, gpg, clip_cov, kl_cov,
geo_mean, dro, cispo — every one verl 0.9.1 registers except ``bypass_mode`` (its rollout-correction
machinery is not reproduced: ``get_policy_loss_fn("bypass_mode")`` raises ``ValueError``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["POLICY_LOSSES", "AGG_MODES", "KL_TYPES", "get_policy_loss_fn", "agg_loss", "kl_penalty",
           "masked_mean"]

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's names of the KL estimators; a trailing "+" (e.g. "k3+") is the straight-through variant.
KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")

_LOG_RATIO_CLAMP = 20.0  # verl clamps log(π/π_old) to ±20 before exp in vanilla, dppo_*, sapo, cispo
_GSPO_LOG_RATIO_MAX = 10.0  # and GSPO's token-level log-ratio to at most 10
_EPS = 1e-8  # verl's masked_mean denominator guard


# ---- small pieces ------------------------------------------------------------------------------------


def _cfg(obj, name: str, default=None):
    """A field of a verl config: attribute or mapping access, ``default`` when absent."""
    if obj is None:
        return default
    if hasattr(obj, "get") and not isinstance(obj, torch.Tensor):
        try:
            return obj.get(name, default)
        except TypeError:
            pass
    return getattr(obj, name, default)


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ over the mask; entries outside it are not read (a NaN there does not reach the sum)."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)) * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ m·x / (Σ m + 1e-8), verl's masked mean."""
    return _masked_sum(x, mask, dim) / ((mask.sum() if dim is None else mask.sum(dim)) + _EPS)


def _clip_bounds(config):
    base = _cfg(config, "clip_ratio", 0.2)
    low, high = _cfg(config, "clip_ratio_low"), _cfg(config, "clip_ratio_high")
    return (base if low is None else low), (base if high is None else high)


def _log_ratio(log_prob, old_log_prob, clamp: bool):
    s = log_prob - old_log_prob
    return s.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP) if clamp else s


def _ppo_clip(ratio, A, low, high):
    """PPO's pessimistic per-token loss max(−A·r, −A·clip(r, 1−low, 1+high)) and the flag
    "the clipped term is the larger" (verl's pg_clipfrac)."""
    unclipped = -A * ratio
    clipped = -A * ratio.clamp(1 - low, 1 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _apply_is(pg, rollout_is_weights):
    return pg if rollout_is_weights is None else pg * rollout_is_weights


def _metrics(**values) -> dict:
    return {f"actor/{k}": (v.detach().item() if isinstance(v, torch.Tensor) else float(v)) for k, v in values.items()}


# ---- aggregation -------------------------------------------------------------------------------------


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """A (B, T) per-token loss to a scalar, as verl's ``agg_loss``.

    token-mean                Σ m·L / N · dp            (N = batch_num_tokens, default Σ m of this call)
    token-sum                 Σ m·L · dp
    seq-mean-token-sum        Σ_rows (Σ_t m·L) / S · dp  (S = global_batch_size, default: rows with a token)
    seq-mean-token-mean       Σ_rows (Σ_t m·L / (Σ_t m + 1e-8)) / S · dp
    seq-mean-token-sum-norm   seq-mean-token-sum / loss_scale_factor (default T)

    With dp_size > 1 the global normalizer (batch_num_tokens or global_batch_size) is required: each
    rank's loss is then its share of the global mean, and DP's gradient averaging gives the global one.
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("agg_loss: token-mean with dp_size > 1 needs batch_num_tokens (the global token count)")
            batch_num_tokens = loss_mask.sum()
        return _masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return _masked_sum(loss_mat, loss_mask) * dp_size
    lengths = loss_mask.sum(-1)
    row_total = _masked_sum(loss_mat, loss_mask, -1)
    per_row = row_total / (lengths + _EPS) if loss_agg_mode == "seq-mean-token-mean" else row_total
    has_tokens = (lengths > 0).to(per_row.dtype)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError(f"agg_loss: {loss_agg_mode} with dp_size > 1 needs global_batch_size (the global row count)")
        global_batch_size = has_tokens.sum()
    loss = _masked_sum(per_row, has_tokens) / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _agg(pg, mask, mode, config):
    return agg_loss(pg, mask, mode, **dict(_cfg(config, "global_batch_info", None) or {}))


# ---- KL penalty --------------------------------------------------------------------------------------


def _kl_value(logp, ref, kind):
    if kind in ("kl", "k1"):
        return logp - ref
    if kind == "abs":
        return (logp - ref).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (logp - ref).square()
    if kind in ("low_var_kl", "k3"):
        d = (ref - logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)  # verl's clamps, for stability
    raise ValueError(f"kl_penalty: unknown estimator {kind!r}; verl's names are {KL_TYPES}, each optionally "
                     "with '+' (straight-through k2 gradient); 'full' needs the whole distribution and is not supported")


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """Per-token KL estimate (B, T) of π vs π_ref as verl names them (d = ref − logp):

    kl | k1: −d;  abs: |d|;  mse | k2: d²/2;  low_var_kl | k3: clamp(e^c − c − 1, ±10) with c = clamp(d, ±20).
    A trailing "+" (k1+, k3+, ...) keeps the value but takes the gradient of k2 (straight-through:
    k2's gradient is the unbiased one of the KL).
    """
    straight = kl_penalty.endswith("+")
    base = kl_penalty[:-1] if straight else kl_penalty
    value = _kl_value(logprob, ref_logprob, base)
    if not straight or base in ("mse", "k2"):
        return value
    k2 = 0.5 * (logprob - ref_logprob).square()
    return k2 - k2.detach() + value.detach()


# ---- the policy losses -------------------------------------------------------------------------------
# Each: (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
# -> (loss, metrics). s = log π − log π_old, r = exp(s); A, m, w: advantages, mask, rollout IS weights.


def vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
            rollout_is_weights=None):
    """Dual-clip PPO: r from s clamped to ±20; L = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)), and for
    A < 0 additionally capped at −A·c (c = clip_ratio_c > 1)."""
    low, high = _clip_bounds(config)
    c = _cfg(config, "clip_ratio_c", 3.0)
    if not c > 1.0:
        raise ValueError(f"clip_ratio_c (dual-clip bound) must be > 1, got {c}")
    s = _log_ratio(log_prob, old_log_prob, clamp=True)
    pg, clipped = _ppo_clip(torch.exp(s), advantages, low, high)
    cap = -advantages * c
    dual = (advantages < 0) & (pg > cap)
    pg = torch.where(advantages < 0, torch.minimum(pg, cap), pg)
    loss = _agg(_apply_is(pg, rollout_is_weights), response_mask, loss_agg_mode, config)
    return loss, _metrics(pg_clipfrac=masked_mean(clipped.float(), response_mask), ppo_kl=masked_mean(-s, response_mask),
                          pg_clipfrac_lower=masked_mean(dual.float(), response_mask))


def _dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, kind):
    """DPPO-Binary (TV or KL): a REINFORCE term −A·sg(min(r, c))·log π on the tokens inside the
    divergence trust region (a stop-gradient 0/1 mask), c = clip_ratio_c (truncated IS)."""
    low, high = _clip_bounds(config)
    c = _cfg(config, "clip_ratio_c", 20.0)
    s = _log_ratio(log_prob, old_log_prob, clamp=True)
    ratio = torch.exp(s)
    with torch.no_grad():
        p, p_old = torch.exp(log_prob), torch.exp(old_log_prob)
        if kind == "tv":
            keep_pos, keep_neg = (p - p_old) <= high, (p - p_old) >= -low
        else:  # binary KL of the Bernoulli (token, not token) between old and new
            bkl = p_old * (old_log_prob - log_prob) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            keep_pos, keep_neg = (bkl <= high) | (p <= p_old), (bkl <= low) | (p >= p_old)
        valid = torch.where(advantages > 0, keep_pos, keep_neg).to(log_prob.dtype)
        weight = ratio.clamp(max=c)
    pg = -advantages * weight * log_prob * valid
    loss = _agg(_apply_is(pg, rollout_is_weights), response_mask, loss_agg_mode, config)
    return loss, _metrics(pg_clipfrac=masked_mean(1.0 - valid, response_mask), ppo_kl=masked_mean(-s, response_mask),
                          pg_clipfrac_lower=masked_mean((ratio > c).float() * valid, response_mask))


def dppo_tv(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
            rollout_is_weights=None):
    """DPPO-Binary-TV: trust region π − π_old ≤ ε_high (A > 0), ≥ −ε_low (A ≤ 0)."""
    return _dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, "tv")


def dppo_kl(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
            rollout_is_weights=None):
    """DPPO-Binary-KL: trust region binary-KL(π_old‖π) ≤ ε (or the probability moved the safe way)."""
    return _dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, "kl")


def gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean", config=None,
         rollout_is_weights=None):
    """GSPO: per token, log r = sg(row mean of s) + log π − sg(log π), at most 10; then PPO's clip."""
    low, high = _clip_bounds(config)
    s = log_prob - old_log_prob
    row_s = _masked_sum(s, response_mask, -1) / response_mask.sum(-1).clamp(min=1)
    log_r = (log_prob - log_prob.detach() + row_s.detach().unsqueeze(-1)).clamp(max=_GSPO_LOG_RATIO_MAX)
    pg, clipped = _ppo_clip(torch.exp(log_r), advantages, low, high)
    loss = _agg(_apply_is(pg, rollout_is_weights), response_mask, loss_agg_mode, config)
    return loss, _metrics(pg_clipfrac=masked_mean(clipped.float(), response_mask), ppo_kl=masked_mean(-s, response_mask),
                          pg_clipfrac_lower=0.0)


def sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean", config=None,
         rollout_is_weights=None):
    """SAPO: L = −(4/τ)·sigmoid(τ(r − 1))·A, τ = tau_pos if A > 0 else tau_neg; always aggregated
    seq-mean-token-mean (verl ignores loss_agg_mode here, and so does this)."""
    s = _log_ratio(log_prob, old_log_prob, clamp=True)
    A = advantages
    tau = torch.where(A > 0, torch.as_tensor(_cfg(config, "tau_pos", 1.0), dtype=A.dtype, device=A.device),
                      torch.as_tensor(_cfg(config, "tau_neg", 1.05), dtype=A.dtype, device=A.device))
    pg = -(4.0 / tau) * torch.sigmoid(tau * (torch.exp(s) - 1.0)) * A
    loss = _agg(_apply_is(pg, rollout_is_weights), response_mask, "seq-mean-token-mean", config)
    return loss, _metrics(pg_clipfrac=0.0, ppo_kl=masked_mean(-s, response_mask), pg_clipfrac_lower=0.0)


def gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
        rollout_is_weights=None):
    """GPG: plain policy gradient L = −A·log π (no ratio, no metrics)."""
    pg = -log_prob * advantages
    return _agg(_apply_is(pg, rollout_is_weights), response_mask, loss_agg_mode, config), {}


def clip_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
             rollout_is_weights=None):
    """Clip-Cov: PPO's clipped loss, with the gradient of a random few tokens removed (multiplied by 0):
    max(1, ⌊clip_cov_ratio·Σm⌋) tokens drawn (torch.randperm, the global generator, as verl) among the
    valid, unclipped tokens whose centred covariance (A − Ā)(log π − mean log π) lies in (lb, ub)."""
    pl = _cfg(config, "policy_loss")
    ratio_k, lb, ub = (_cfg(pl, name) for name in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"))
    ratio_k, lb, ub = (d if v is None else v for v, d in ((ratio_k, 0.0002), (lb, 1.0), (ub, 5.0)))
    if not ratio_k > 0:
        raise ValueError(f"policy_loss.clip_cov_ratio must be > 0, got {ratio_k}")
    low, high = _clip_bounds(config)
    s = log_prob - old_log_prob
    pg, clipped = _ppo_clip(torch.exp(s), advantages, low, high)
    valid = response_mask > 0
    with torch.no_grad():
        cov = (advantages - masked_mean(advantages, response_mask)) * (log_prob - masked_mean(log_prob, response_mask))
        candidates = torch.nonzero(valid & ~clipped & (cov > lb) & (cov < ub))
        keep = torch.ones_like(advantages)
        if len(candidates) > 0:
            n = max(int(ratio_k * response_mask.sum().item()), 1)
            chosen = candidates[torch.randperm(len(candidates))[:min(n, len(candidates))]]
            keep[chosen[:, 0], chosen[:, 1]] = 0
    pg = pg * keep
    loss = _agg(_apply_is(pg, rollout_is_weights), response_mask, loss_agg_mode, config)
    return loss, _metrics(pg_clipfrac=masked_mean((keep == 0).float(), response_mask), ppo_kl=masked_mean(-s, response_mask))


def kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
           rollout_is_weights=None):
    """KL-Cov: L = −A·r, plus ppo_kl_coef·|s| on the max(1, ⌊kl_cov_ratio·n⌋) valid tokens of largest
    centred covariance (A − Ā)(log π − mean log π) (n valid tokens)."""
    pl = _cfg(config, "policy_loss")
    ratio_k, coef = _cfg(pl, "kl_cov_ratio"), _cfg(pl, "ppo_kl_coef")
    ratio_k, coef = (0.0002 if ratio_k is None else ratio_k), (1.0 if coef is None else coef)
    if not ratio_k > 0:
        raise ValueError(f"policy_loss.kl_cov_ratio must be > 0, got {ratio_k}")
    s = log_prob - old_log_prob
    ratio = torch.exp(s)
    valid = response_mask > 0
    penalized = torch.zeros_like(valid)
    with torch.no_grad():
        flat = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        if flat.numel() > 0:
            a, lp = advantages[valid].reshape(-1).cpu(), log_prob[valid].reshape(-1).cpu()
            cov = (a - a.mean()) * (lp - lp.mean())
            top = torch.topk(cov, max(1, int(cov.numel() * ratio_k)), largest=True).indices
            penalized.view(-1)[flat[top.to(flat.device)]] = True
    pg = -advantages * ratio + torch.where(penalized, coef * s.abs(), torch.zeros_like(s))
    loss = _agg(_apply_is(pg, rollout_is_weights), response_mask, loss_agg_mode, config)
    return loss, _metrics(ppo_kl=masked_mean(s.abs(), response_mask))


def geo_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
             rollout_is_weights=None):
    """GMPO: per row, ρ = exp(mean_t ŝ) with ŝ the log-ratio clipped to [−ε_low, ε_high] on the side
    that limits the update (A > 0: from above, A < 0: from below), L_row = −Ā_row·ρ·w̄_row (Ā the
    row's mean advantage, w̄ the geometric mean of the IS weights); loss = mean over rows
    (loss_agg_mode is ignored, as in verl)."""
    low, high = _clip_bounds(config)
    s = log_prob - old_log_prob
    sgn = torch.sign(advantages)
    s_clip = s.clamp(-low, high)
    s_hat = sgn * torch.minimum(sgn * s, sgn * s_clip)
    n = response_mask.sum(-1) + _EPS
    rho = torch.exp((s_hat * response_mask).sum(-1) / n)
    A_row = (advantages * response_mask).sum(-1) / n
    pg = -A_row * rho
    if rollout_is_weights is not None:
        pg = pg * torch.exp((torch.log(rollout_is_weights + 1e-10) * response_mask).sum(-1) / n)
    clipped = s != s_clip
    return pg.mean(), _metrics(pg_clipfrac=masked_mean((clipped & (advantages > 0)).float(), response_mask),
                               ppo_kl=masked_mean(-s, response_mask),
                               pg_clipfrac_lower=masked_mean((clipped & (advantages < 0)).float(), response_mask))


def dro(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
        rollout_is_weights=None):
    """DRO: L = −(A·log π − (β/2)·s²), β = policy_loss.dro_beta > 0."""
    beta = _cfg(_cfg(config, "policy_loss"), "dro_beta")
    if beta is None or not beta > 0:
        raise ValueError(f"policy_loss.dro_beta must be a positive value when using DRO, got {beta}")
    s = log_prob - old_log_prob
    pg = -(log_prob * advantages - 0.5 * beta * s.square())
    loss = _agg(_apply_is(pg, rollout_is_weights), response_mask, loss_agg_mode, config)
    return loss, _metrics(ppo_kl=masked_mean(-s, response_mask))


def cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
          rollout_is_weights=None):
    """CISPO (verl's form): L = −sg(clip(r, 1−ε_low, 1+ε_high))·A·log π, s clamped to ±20. (TRL's cispo
    caps from above only, at the raw value epsilon_high.)"""
    low, high = _clip_bounds(config)
    s = _log_ratio(log_prob, old_log_prob, clamp=True)
    ratio = torch.exp(s)
    weight = ratio.clamp(1 - low, 1 + high).detach()
    pg = -weight * advantages * log_prob
    loss = _agg(_apply_is(pg, rollout_is_weights), response_mask, loss_agg_mode, config)
    return loss, _metrics(pg_clipfrac=masked_mean((ratio != weight).float(), response_mask),
                          ppo_kl=masked_mean(-s, response_mask), pg_clipfrac_lower=0.0)


# verl's loss_mode names, which are these functions' names (verl's namespace, not grpo_fast's LOSS_TABLE).
POLICY_LOSSES: dict[str, Callable] = {
    f.__name__: f for f in (vanilla, dppo_tv, dppo_kl, gspo, sapo, gpg, clip_cov, kl_cov, geo_mean, dro, cispo)
}
_NOT_SUPPORTED = {
    "bypass_mode": "its rollout correction (IS weights, rejection sampling and their ~40 diagnostics) is not "
                   "reproduced by grpo_fast; compute rollout_is_weights yourself and use 'vanilla'",
}


def get_policy_loss_fn(name: str) -> Callable:
    """The policy loss verl registers under ``name`` (``POLICY_LOSSES``); ValueError for any other."""
    if name in POLICY_LOSSES:
        return POLICY_LOSSES[name]
    if name in _NOT_SUPPORTED:
        raise ValueError(f"policy loss {name!r} is not supported by grpo_fast: {_NOT_SUPPORTED[name]}")
    raise ValueError(f"unknown policy loss {name!r}; grpo_fast implements {sorted(POLICY_LOSSES)}")
