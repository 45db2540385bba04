"""verl's policy losses, KL penalties and loss aggregation, on per-token log-probs.

verl (0.9.1) computes every actor loss from per-token tensors (B, T): ``log_prob`` of the current
policy, ``old_log_prob``, ``advantages``, ``response_mask`` and optional ``rollout_is_weights``. This
module provides the same functions under verl's names and signatures, so that ``log_prob`` can come
from grpo_fast's differentiable primitive and the loss trains through grpo_fast's kernels:

    logp, ent = grpo_fast.logprobs(logits, ids, temperature=τ, return_entropy=True, mask=response_mask)  # or fused_linear_logprobs
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
geo_mean, dro, cispo and bypass_mode (with its rollout correction: IS weights, rejection sampling and
the ``rollout_corr/*`` diagnostics of ``config.policy_loss.rollout_correction``) — every one verl
0.9.1 registers. Bad option values raise ``ValueError`` (verl asserts).
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch

__all__ = ["POLICY_LOSSES", "AGG_MODES", "KL_TYPES", "FUSED_LOSSES", "get_policy_loss_fn", "agg_loss", "agg_weights",
           "kl_penalty", "masked_mean", "fused_policy_loss", "fused_linear_policy_loss"]

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
    w = agg_weights(loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    return _masked_sum(loss_mat * w.to(loss_mat.dtype), loss_mask)


def agg_weights(loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1, batch_num_tokens=None,
                global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """The per-token weights w (B, T) float64 of ``agg_loss``: agg_loss(L) = Σ m·w·L (every mode is linear
    in L). The fused kernels take them as their aggregation weights (validation.aggregation_weights'
    role); ``agg_loss`` itself is Σ over the mask of w·L."""
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    m = loss_mask.to(torch.float64)

    def num(x):
        return torch.as_tensor(x, dtype=torch.float64, device=m.device)

    if loss_agg_mode in ("token-mean", "token-sum"):
        if loss_agg_mode == "token-sum":
            return m * dp_size
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("agg_loss: token-mean with dp_size > 1 needs batch_num_tokens (the global token count)")
            batch_num_tokens = m.sum()
        return m * (dp_size / num(batch_num_tokens))
    lengths = m.sum(-1, keepdim=True)
    # Σm + 1e-8 in the mask's own arithmetic, as verl forms it (an integer mask's count + 1e-8 is float32)
    per_row = (1.0 / (loss_mask.sum(-1, keepdim=True) + _EPS).to(torch.float64) if loss_agg_mode == "seq-mean-token-mean"
               else torch.ones_like(lengths))
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError(f"agg_loss: {loss_agg_mode} with dp_size > 1 needs global_batch_size (the global row count)")
        global_batch_size = (lengths > 0).sum()
    w = m * per_row * (dp_size / num(global_batch_size))
    if loss_agg_mode == "seq-mean-token-sum-norm":
        w = w / num(m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return w


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


# ---- bypass_mode: the rollout correction (verl's rollout_corr_helper) ------------------------------------
# In bypass mode old_log_prob is the rollout engine's log-prob; the correction compares the current policy
# (log_prob, detached) with it: s = log π − log π_rollout per token.

_RS_KINDS = {"token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
             "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3"}


def _item(x) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def _parse_is_threshold(spec):
    """rollout_is_threshold: a number (TIS: cap) or "lower_upper" (IcePop: zero outside) -> (upper, lower | None)."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a number or a 'lower_upper' string, got {spec!r}")
    lower = None
    try:
        if isinstance(spec, str):
            parts = spec.strip().split("_", 1)
            upper = float(parts[-1])
            lower = float(parts[0]) if len(parts) == 2 else None
        else:
            upper = float(spec)
    except ValueError as e:
        raise ValueError(f"invalid rollout_is_threshold {spec!r}") from e
    if upper <= 0 or (lower is not None and not 0 < lower <= upper):
        raise ValueError(f"rollout_is_threshold {spec!r}: bounds must be positive with lower <= upper")
    return upper, lower


def _parse_rs(rollout_rs, spec):
    """rollout_rs ("token_k1,seq_mean_k3", ...) and its thresholds -> [(kind, lower | None, upper)]."""
    if not isinstance(rollout_rs, str) or not rollout_rs.strip():
        raise ValueError("rollout_rs must be a non-empty string of comma-separated options")
    if spec is None:
        raise ValueError("rollout_rs_threshold must be provided when rollout_rs is set")
    kinds = list(dict.fromkeys(k.strip() for k in rollout_rs.split(",") if k.strip()))
    bad = [k for k in kinds if k not in _RS_KINDS]
    if bad:
        raise ValueError(f"rollout_rs option {bad[0]!r} is not one of {sorted(_RS_KINDS)}")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        specs = [str(spec)]
    elif isinstance(spec, str):
        specs = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        raise TypeError(f"rollout_rs_threshold must be a number or a string, got {spec!r}")
    if len(specs) not in (1, len(kinds)):
        raise ValueError(f"rollout_rs_threshold: give one threshold or one per rollout_rs option ({len(kinds)})")
    specs = specs * len(kinds) if len(specs) == 1 else specs
    out = []
    for kind, sp in zip(kinds, specs):
        try:
            if kind.endswith("k1"):  # a ratio range; a single number u means [1/u, u]
                lo, up = (float(x) for x in sp.split("_", 1)) if "_" in sp else (1.0 / float(sp), float(sp))
                if lo <= 0 or up <= 0 or lo > up:
                    raise ValueError
            else:
                if "_" in sp:
                    raise ValueError
                lo, up = None, float(sp)
                if up <= 0:
                    raise ValueError
        except ValueError as e:
            raise ValueError(f"rollout_rs_threshold {sp!r} is not valid for {kind!r} (k1: 'lower_upper' or one "
                             "positive number; k2/k3: one positive number)") from e
        out.append((kind, lo, up))
    return out


def _clamped_std(x, mask, lo, hi):
    if mask.sum() <= 1:
        return 0.0
    xc = x.clamp(min=lo, max=hi)
    return torch.sqrt((masked_mean(xc.square(), mask) - masked_mean(xc, mask).square()).clamp(min=0.0)).item()


def _is_weights(s, mask, level, spec, batch_normalize):
    """Truncated (TIS) or masked (IcePop) rollout IS weights (B, T), detached, and their diagnostics."""
    if level not in ("token", "sequence"):
        raise ValueError(f"rollout_is must be 'token', 'sequence' or None, got {level!r}")
    upper, lower = _parse_is_threshold(spec)
    m = {}
    if level == "token":
        log_w = s
        raw = torch.exp(s.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    else:
        log_w = _masked_sum(s, mask, -1).unsqueeze(-1)  # log of the product of the token ratios
        raw = torch.exp(log_w.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)).expand_as(s)
    raw = raw * mask
    if lower is None:
        w = raw.clamp(max=upper)
    else:
        w = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    lo_eff = 1.0 / upper if lower is None else lower
    if not mask.any():
        raise ValueError("response_mask must contain at least one valid token")
    m["rollout_is_mean"] = masked_mean(w, mask).item()
    if level == "sequence":
        m["rollout_is_max"] = torch.exp(log_w.max().clamp(max=_LOG_RATIO_CLAMP)).item()
        m["rollout_is_min"] = torch.exp(log_w.min()).item()
        m["rollout_is_ratio_fraction_high"] = (log_w > torch.log(torch.tensor(upper))).float().mean().item()
        m["rollout_is_ratio_fraction_low"] = (log_w < torch.log(torch.tensor(lo_eff))).float().mean().item()
    else:
        m["rollout_is_ratio_fraction_high"] = masked_mean((raw > upper).float(), mask).item()
        m["rollout_is_ratio_fraction_low"] = masked_mean((raw < lo_eff).float(), mask).item()
        m["rollout_is_max"] = w.masked_fill(~mask.bool(), float("-inf")).max().item()
        m["rollout_is_min"] = w.masked_fill(~mask.bool(), float("inf")).min().item()
    m["rollout_is_std"] = _clamped_std(w, mask, 0.0, upper)
    wc = w.clamp(min=0.0, max=upper)
    m["rollout_is_eff_sample_size"] = 1.0 / masked_mean((wc / (masked_mean(wc, mask) + _EPS)).square(), mask).item()
    row = masked_mean(w, mask, -1)
    m["rollout_is_seq_mean"] = row.mean().item()
    m["rollout_is_seq_std"] = row.std().item() if row.numel() > 1 else 0.0
    m["rollout_is_seq_max"] = row.max().item()
    m["rollout_is_seq_min"] = row.min().item()
    m["rollout_is_seq_max_deviation"] = (row - 1.0).abs().max().item()
    raw_row = masked_mean(raw, mask, -1)  # before truncation: a truncated mean can never exceed the cap
    m["rollout_is_seq_fraction_high"] = (raw_row > upper).float().mean().item()
    m["rollout_is_seq_fraction_low"] = (raw_row < lo_eff).float().mean().item()
    if lower is not None:
        m["rollout_is_oob_ratio"] = masked_mean(((raw < lower) | (raw > upper)).float(), mask).item()
    if batch_normalize:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError("rollout_is_batch_normalize across ranks (torch.distributed) is not supported by grpo_fast")
        if level == "token":
            mean = masked_mean(w, mask)
        else:
            rows = (mask.sum(-1) > 0).to(w.dtype)
            mean = (masked_mean(w, mask, -1) * rows).sum() / rows.sum().clamp_min(_EPS)
        if mean > _EPS:
            w = w / mean
            m["rollout_is_batch_norm_factor"] = mean.item()
        else:
            m["rollout_is_batch_norm_factor"] = 1.0
    return w, m


def _rejection(s, mask, rollout_rs, spec):
    """Rejection sampling: the mask with tokens / rows outside every option's trust region set to 0, and diagnostics."""
    options = _parse_rs(rollout_rs, spec)
    if s.shape[0] == 0:
        return mask, {}
    sc = s.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    per_token = {"k1": -sc, "k2": 0.5 * sc.square(), "k3": torch.exp(sc) - 1.0 - sc}
    mb = mask.bool()
    rows_valid = mask.sum(-1) > 0
    keep_all = torch.ones_like(s)
    m = {}
    for kind, lo, up in options:
        est = per_token[kind[-2:]]
        k1 = kind.endswith("k1")
        lo_t, up_t = (math.log(lo), math.log(up)) if k1 else (0.0, up)  # k1 bounds are on the log-ratio
        if kind.startswith("token"):
            stat, row_stat, level = est, None, "token"
        else:
            if kind.startswith("seq_sum"):
                row_stat = _masked_sum(est, mask, -1)
            elif kind.startswith("seq_mean"):
                row_stat = masked_mean(est, mask, -1)
            else:
                mx = est.masked_fill(~mb, float("-inf")).max(-1).values
                row_stat = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
            stat, level = row_stat.unsqueeze(-1).expand_as(s), "sequence"
        keep = ((stat >= lo_t) & (stat <= up_t)) if k1 else (stat <= up_t)
        keep_f = keep.to(s.dtype)
        keep_all = keep_all * keep_f
        m.update(_rs_metrics(f"rollout_rs_{kind}", stat, mask, rows_valid, level, row_stat, up_t, lo_t, k1))
        m[f"rollout_rs_{kind}_masked_fraction"] = masked_mean(1 - keep_f, mask).item()
        rv = rows_valid.float()
        row_kept = (~(~keep & mb)).all(-1).to(s.dtype)
        m[f"rollout_rs_{kind}_seq_masked_fraction"] = (((1.0 - row_kept) * rv).sum() / rv.sum()).item() if rv.sum() > 0 else 0.0
    m["rollout_rs_masked_fraction"] = masked_mean(1 - keep_all, mask).item()
    m["rollout_rs_seq_masked_fraction"] = (~((keep_all > 0.5) & mb) & mb).any(-1).float().mean().item()
    return (mask * keep_all).to(mask.dtype), m


def _rs_metrics(prefix, stat, mask, rows_valid, level, row_stat, upper, lower, use_lower):
    if not mask.any():
        raise ValueError("response_mask must contain at least one valid token")
    rows = (masked_mean(stat, mask, -1) if row_stat is None else row_stat)[rows_valid]
    seq = level == "sequence" and rows.numel() > 0
    m = {f"{prefix}_mean": masked_mean(stat, mask).item()}
    if seq:
        m[f"{prefix}_max"], m[f"{prefix}_min"] = rows.max().item(), rows.min().item()
        m[f"{prefix}_fraction_high"] = (rows > upper).float().mean().item()
        m[f"{prefix}_fraction_low"] = (rows < lower).float().mean().item() if use_lower else 0.0
    else:
        m[f"{prefix}_max"] = stat.masked_fill(~mask.bool(), float("-inf")).max().item()
        m[f"{prefix}_min"] = stat.masked_fill(~mask.bool(), float("inf")).min().item()
        m[f"{prefix}_fraction_high"] = masked_mean((stat > upper).float(), mask).item()
        m[f"{prefix}_fraction_low"] = masked_mean((stat < lower).float(), mask).item() if use_lower else 0.0
    m[f"{prefix}_std"] = _clamped_std(stat, mask, lower if use_lower else 0.0, upper)
    if rows.numel() > 0:
        m[f"{prefix}_seq_mean"] = rows.mean().item()
        m[f"{prefix}_seq_std"] = rows.std().item() if rows.numel() > 1 else 0.0
        m[f"{prefix}_seq_max"], m[f"{prefix}_seq_min"] = rows.max().item(), rows.min().item()
        m[f"{prefix}_seq_max_deviation"] = rows.abs().max().item()
        m[f"{prefix}_seq_fraction_high"] = (rows > upper).float().mean().item()
        if use_lower:
            m[f"{prefix}_seq_fraction_low"] = (rows < lower).float().mean().item()
    else:
        for k in ("seq_mean", "seq_std", "seq_max", "seq_min", "seq_max_deviation", "seq_fraction_high", "seq_fraction_low"):
            m[f"{prefix}_{k}"] = 0.0
    return m


def _offpolicy_metrics(logp, rollout, mask):
    """Policy-mismatch diagnostics: perplexities, KL (k1, k3), χ² of the token and sequence ratios."""
    if not mask.any():
        raise ValueError("response_mask must contain at least one valid token")
    row_train, row_roll = masked_mean(logp, mask, -1), masked_mean(rollout, mask, -1)
    s = logp - rollout
    diff = row_roll - row_train
    rho = torch.exp(s.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    row_s = _masked_sum(s, mask, -1).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return {
        "training_ppl": torch.exp(-row_train).mean().item(), "training_log_ppl": (-row_train).mean().item(),
        "kl": masked_mean(-s, mask).item(), "k3_kl": masked_mean(torch.exp(s) - s - 1, mask).item(),
        "rollout_ppl": torch.exp(-row_roll).mean().item(), "rollout_log_ppl": (-row_roll).mean().item(),
        "log_ppl_diff": diff.mean().item(), "log_ppl_abs_diff": diff.abs().mean().item(),
        "log_ppl_diff_max": diff.max().item(), "log_ppl_diff_min": diff.min().item(),
        "ppl_ratio": torch.exp(diff).mean().item(),
        "chi2_token": (masked_mean(rho.square(), mask) - 1.0).item(),
        "chi2_seq": (torch.exp(2.0 * row_s).mean() - 1.0).item(),
    }


def bypass_mode(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
    """Bypass mode (old_log_prob is the rollout engine's log-prob): the rollout correction of
    ``config.policy_loss.rollout_correction`` — IS weights (rollout_is token | sequence | None, TIS cap or
    IcePop range, optional batch normalization) and rejection sampling (rollout_rs) from
    s = sg(log π) − log π_rollout — then loss_type "ppo_clip" (vanilla on the rejection-masked tokens, no
    IS weights: the ratio already is π/π_rollout) or "reinforce" (−w·A·log π). The passed
    rollout_is_weights are ignored (computed here), as in verl. Metrics: the loss's, plus rollout_corr/*."""
    rc = _cfg(_cfg(config, "policy_loss"), "rollout_correction")
    if rc is None:
        raise ValueError("bypass_mode needs config.policy_loss.rollout_correction")
    loss_type = _cfg(rc, "loss_type", "ppo_clip")
    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"rollout_correction.loss_type must be 'ppo_clip' or 'reinforce', got {loss_type!r}")
    level, is_spec = _cfg(rc, "rollout_is"), _cfg(rc, "rollout_is_threshold", 2.0)
    if not response_mask.any():
        raise ValueError("response_mask must contain at least one valid token")
    if not (old_log_prob.shape == log_prob.shape == response_mask.shape):
        raise ValueError(f"bypass_mode: log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} must have one shape")
    corr = {}
    with torch.no_grad():
        s = log_prob.detach() - old_log_prob
        weights = None
        if level is not None and is_spec is not None:
            weights, m = _is_weights(s, response_mask, level, is_spec, bool(_cfg(rc, "rollout_is_batch_normalize", False)))
            corr.update(m)
        mask = response_mask.clone()
        if _cfg(rc, "rollout_rs") is not None:
            mask, m = _rejection(s, response_mask, _cfg(rc, "rollout_rs"), _cfg(rc, "rollout_rs_threshold"))
            corr.update(m)
        corr.update(_offpolicy_metrics(log_prob.detach(), old_log_prob, response_mask))
    if loss_type == "reinforce":
        pg = -advantages * log_prob * (1.0 if weights is None else weights)
        loss = _agg(pg, mask, loss_agg_mode, config)
        metrics = _metrics(ppo_kl=masked_mean(-(log_prob - old_log_prob), mask))
    else:
        loss, metrics = vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config, None)
    metrics.update({f"rollout_corr/{k}": _item(v) for k, v in corr.items()})
    return loss, metrics


# verl's loss_mode names, which are these functions' names (verl's namespace, not grpo_fast's LOSS_TABLE).
POLICY_LOSSES: dict[str, Callable] = {
    f.__name__: f for f in (vanilla, dppo_tv, dppo_kl, gspo, sapo, gpg, clip_cov, kl_cov, geo_mean, dro, cispo,
                            bypass_mode)
}
_NOT_SUPPORTED: dict = {}  # verl losses refused with a reason (none at present)


# ---- the fused single pass ------------------------------------------------------------------------------
# The token-level losses whose per-token math is a run-time parameterization of a kernel family
# (_config.LOSS_TABLE's families; docs/spec.md, "verl's policy losses"):
#   vanilla  clip family, log-ratio clamp ±20, dual clip at clip_ratio_c for A < 0
#   cispo    is_weight family, weight clamp(r, 1 − ε_low, 1 + ε_high), log-ratio clamp ±20
#   gpg      is_weight family, weight clamp(r, 1, 1) = 1 (on-policy: no old_log_prob read)
#   dro      gpg plus the KL term β·k2 with the old log-prob as the reference: β/2·s², β = dro_beta
#   sapo     soft_gate family, log-ratio clamp ±20, tau_pos / tau_neg
# (keyed by the functions: verl's mode names are read from them, as POLICY_LOSSES does)
FUSED_FAMILIES = {f.__name__: family for f, family in ((vanilla, "clip"), (cispo, "is_weight"), (gpg, "is_weight"),
                                                       (dro, "is_weight"), (sapo, "soft_gate"))}
FUSED_LOSSES = tuple(sorted(FUSED_FAMILIES))


def _fused_setup(loss_mode, config, temperature):
    """(GRPOOptions, extra KernelConfig fields, on-policy, old as the KL reference) of a fused loss mode."""
    from ._config import LOSS_TABLE
    from .options import GRPOOptions

    if not isinstance(loss_mode, str) or loss_mode not in FUSED_FAMILIES:
        if isinstance(loss_mode, str) and loss_mode in POLICY_LOSSES:
            raise ValueError(
                f"loss_mode {loss_mode!r} has no fused form (it needs batch statistics or a per-sequence ratio); "
                f"the fused ones are {list(FUSED_LOSSES)}. Compute it on the differentiable log-probs: "
                f"logp = grpo_fast.logprobs(logits, responses); "
                f"grpo_fast.verl_losses.get_policy_loss_fn({loss_mode!r})(old_log_prob, logp, advantages, response_mask, ...)")
        raise ValueError(f"unknown loss_mode {loss_mode!r}; the fused ones are {list(FUSED_LOSSES)}, verl's others "
                         f"{sorted(set(POLICY_LOSSES) - set(FUSED_FAMILIES))} run through get_policy_loss_fn")
    family, fn = FUSED_FAMILIES[loss_mode], POLICY_LOSSES[loss_mode]
    loss_type = next(name for name, t in LOSS_TABLE.items() if t.family == family)  # any of the family
    low, high = _clip_bounds(config)
    kw = dict(loss_type=loss_type, temperature=temperature)
    extra = dict(log_ratio_clamp=_LOG_RATIO_CLAMP)
    if fn is vanilla:
        c = _cfg(config, "clip_ratio_c", 3.0)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 1.0:
            raise ValueError(f"clip_ratio_c (dual-clip bound) must be a number > 1, got {c!r}")
        kw.update(epsilon_low=low, epsilon_high=high)
        extra["dual_clip_c"] = float(c)
    elif fn is cispo:
        kw.update(epsilon_low=low, epsilon_high=high)
        extra.update(is_lo=1.0 - low, is_hi=1.0 + high)
    elif fn is sapo:
        kw.update(sapo_temperature_pos=_cfg(config, "tau_pos", 1.0), sapo_temperature_neg=_cfg(config, "tau_neg", 1.05))
    else:  # gpg, dro: weight 1, no ratio
        extra = dict(is_lo=1.0, is_hi=1.0)
        if fn is dro:
            beta = _cfg(_cfg(config, "policy_loss"), "dro_beta")
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
                raise ValueError(f"policy_loss.dro_beta must be a positive value when using DRO, got {beta!r}")
            kw.update(beta=float(beta), kl_estimator="k2")
    return GRPOOptions(**kw), extra, fn in (gpg, dro), fn is dro


# grpo_fast's argument and option names in validation's messages -> verl's (the caller's) names
_VERL_NAME_OF = {"completion_ids": "responses", "completion_mask": "response_mask", "old_logp": "old_log_prob",
                 "ref_logp": "old_log_prob", "epsilon_low": "clip_ratio_low", "epsilon_high": "clip_ratio_high",
                 "sapo_temperature_pos": "tau_pos", "sapo_temperature_neg": "tau_neg"}
_VERL_NAMES = re.compile(r"\b(%s)\b" % "|".join(_VERL_NAME_OF))


class _KeepLogp:
    """A backend whose fused_loss also keeps the per-token log-probs it returns, in call order (the
    fused-linear loop calls it once per chunk of tokens), for verl's metrics."""

    def __init__(self, impl):
        self.impl, self.parts = impl, []

    def __getattr__(self, name):  # autograd, empty_grad, the other entry points: the backend's
        return getattr(self.impl, name)

    def fused_loss(self, inp, grad):
        stats, logp = self.impl.fused_loss(inp, grad)
        self.parts.append(logp.reshape(-1))
        return stats, logp

    def logp(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, T): the kept log-probs at their tokens; the loop walked the valid tokens only (mask != 0, in
        row-major order) when there were fewer parts than tokens, and a masked token gets 0 (as the kernels
        give a masked row)."""
        lp = torch.cat(self.parts)
        if lp.numel() == mask.numel():
            return lp.view(mask.shape)
        return torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter_(mask != 0, lp)


def _fused_inputs(logits, responses, old_log_prob, advantages, response_mask, loss_mode, loss_agg_mode, config,
                  rollout_is_weights, temperature):
    """Validated LossInputs of a fused verl loss (``logits`` may be a (B, T, V) stand-in), its aggregation
    mode and the rollout IS weights (B, T) float32 or None. The aggregation weights are verl's
    (agg_weights, with config.global_batch_info) times the IS weights; KernelConfig carries the mode's
    parameters (_fused_setup)."""
    import dataclasses

    from .validation import _float_tensor, validate_loss_args

    opts, extra, on_policy, old_as_ref = _fused_setup(loss_mode, config, temperature)
    agg_mode = "seq-mean-token-mean" if POLICY_LOSSES[loss_mode] is sapo else loss_agg_mode  # verl's sapo ignores it
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        # also when the kernels do not read it (gpg, dro): verl's metrics do
        if old_log_prob is None:
            raise ValueError("old_log_prob is required: a (B, T) tensor")
        _float_tensor("old_log_prob", old_log_prob, [tuple(logits.shape[:2])], logits.device)
    try:
        inp = validate_loss_args(logits, responses, advantages, old_logp=None if on_policy else old_log_prob,
                                 ref_logp=old_log_prob if old_as_ref else None, completion_mask=response_mask,
                                 options=opts)
    except (ValueError, TypeError) as e:  # the message names the arguments as the caller passed them
        raise type(e)(_VERL_NAMES.sub(lambda m: _VERL_NAME_OF[m.group(0)], str(e))) from e
    B, T = inp.mask.shape
    w = agg_weights(inp.mask, agg_mode, **dict(_cfg(config, "global_batch_info", None) or {}))
    isw = _float_tensor("rollout_is_weights", rollout_is_weights, [(B, T)], inp.mask.device)
    if isw is not None:
        w = w * isw
    w = torch.where(inp.mask != 0, w, torch.zeros_like(w)).to(torch.float32)
    inp = dataclasses.replace(inp, weight=w, cfg=dataclasses.replace(inp.cfg, **extra))
    return inp, agg_mode, isw


@torch.no_grad()
def _fused_metrics(loss_mode, inp, old_log_prob, logp, agg_mode, config, isw) -> dict:
    """verl's metrics of ``loss_mode``: its own function here, on the kernel's (B, T) log-probs."""
    B, T = inp.mask.shape
    A = inp.advantages if inp.advantages.dim() == 2 else inp.advantages.unsqueeze(1).expand(B, T)
    old = old_log_prob.detach().to(device=logp.device, dtype=torch.float32)
    return POLICY_LOSSES[loss_mode](old, logp.detach(), A, inp.mask, agg_mode, config, isw)[1]


def fused_policy_loss(logits, responses, old_log_prob, advantages, response_mask, loss_mode="vanilla",
                      loss_agg_mode="token-mean", config=None, rollout_is_weights=None, *, temperature=1.0,
                      inplace=False, loss_scale=1.0, backend="auto"):
    """verl's policy loss ``loss_mode`` from the logits in grpo_fast's fused single pass (one read of the
    logits, the gradient written in the forward), for the token-level losses ``FUSED_LOSSES``: vanilla,
    cispo, gpg, dro, sapo. The same loss and gradient as ``get_policy_loss_fn(loss_mode)`` on
    ``grpo_fast.logprobs(logits, responses, temperature=temperature)``, and verl's metrics.

    Args:
        logits: (B, T, V) float32 | bfloat16 | float16, the response positions' logits (shifted:
            ``logits[b, t]`` scores ``responses[b, t]``).
        responses: (B, T) int64 | int32 token ids.
        old_log_prob, advantages, response_mask, rollout_is_weights: (B, T) as verl passes them
            (advantages may also be (B,)). rollout_is_weights (constants) multiply the per-token loss.
        loss_mode, loss_agg_mode, config: verl's names (``config``: verl's ActorConfig or anything with
            its fields: clip_ratio(_low/_high/_c), tau_pos/neg, policy_loss.dro_beta, global_batch_info).
        temperature, inplace, loss_scale, backend: as in ``grpo_fast.grpo_loss``.

    Returns:
        (loss, metrics): a float32 scalar differentiable in ``logits``, and verl's metrics dict
        (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``; none for gpg), computed
        by the loss's own function here on the kernel's log-probs.

    Other verl losses (gspo, geo_mean, clip_cov, kl_cov, dppo_*, bypass_mode) raise a ValueError that
    points to ``get_policy_loss_fn`` on ``grpo_fast.logprobs``' differentiable log-probs.
    """
    from . import _autograd as _ag
    from . import backends as _backends
    from .api import _FusedGRPOLoss, _self_overlapping
    from .reference import per_token_loss, token_logprobs_reference
    from .validation import check_backend

    backend = check_backend(backend)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    loss_scale = _ag.check_loss_scale(loss_scale)
    inp, agg_mode, isw = _fused_inputs(logits, responses, old_log_prob, advantages, response_mask, loss_mode,
                                       loss_agg_mode, config, rollout_is_weights, temperature)
    impl = _backends.resolve(backend, inp.logits.device)
    if impl.autograd:  # the eager reference (double backward works); a masked row never reaches the softmax
        valid = inp.mask != 0
        z = torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        logp = torch.where(valid, token_logprobs_reference(z, inp.ids, inp.cfg.temperature), 0.0)
        L, _, _ = per_token_loss(logp, inp.mask, inp.advantages, inp.options, old_logp=inp.old_logp,
                                 ref_logp=inp.ref_logp, cfg=inp.cfg)
        loss = (inp.weight.to(L.dtype) * torch.where(valid, L, 0.0)).sum().float()
        logp = logp.detach().float()
    else:
        need_grad = logits.requires_grad and torch.is_grad_enabled()
        inplace = inplace and need_grad and not _self_overlapping(inp.logits)
        _ag.fold_scale(inp, loss_scale)
        keeper = _KeepLogp(impl)
        loss, _ = _FusedGRPOLoss.apply(logits, inp, keeper, inplace, need_grad, loss_scale)
        logp = keeper.logp(inp.mask)
    return loss, _fused_metrics(loss_mode, inp, old_log_prob, logp, agg_mode, config, isw)


def fused_linear_policy_loss(hidden, weight, responses, old_log_prob, advantages, response_mask, loss_mode="vanilla",
                             loss_agg_mode="token-mean", config=None, rollout_is_weights=None, *, bias=None,
                             temperature=1.0, logit_scale=1.0, logit_softcap=None, chunk_size=None, loss_scale=1.0,
                             backend="auto"):
    """``fused_policy_loss`` of ``logits = softcap(logit_scale · (hidden · weightᵀ + bias))`` without the
    logits: the chunked loop of ``grpo_fast.fused_linear_grpo_loss`` (hidden (B, T, H), weight (V, H),
    bias (V,) or None; the same options), the verl loss in its fused kernels. Returns (loss, metrics)
    with gradients for hidden, weight and bias."""
    from . import _autograd as _ag
    from . import backends as _backends
    from .fused_linear import _check_chunk_size, _check_linear, _check_transform, _compute_dtype, _linear_loss
    from .fused_linear import _standin_logits, _Transform
    from .validation import check_backend

    backend = check_backend(backend)
    loss_scale = _ag.check_loss_scale(loss_scale)
    cdtype, autocast = _compute_dtype(hidden)
    B, T, H, V = _check_linear(hidden, weight, bias, mixed_ok=autocast)
    scale, cap = _check_transform(logit_scale, logit_softcap, temperature)
    chunk = _check_chunk_size(chunk_size)
    inp, agg_mode, isw = _fused_inputs(_standin_logits(B, T, V, cdtype, hidden.device), responses, old_log_prob,
                                       advantages, response_mask, loss_mode, loss_agg_mode, config,
                                       rollout_is_weights, temperature)
    keeper = _KeepLogp(_backends.resolve(backend, hidden.device))
    loss, _ = _linear_loss(hidden, weight, bias, inp, keeper, _Transform(scale, cap), chunk, cdtype, loss_scale)
    return loss, _fused_metrics(loss_mode, inp, old_log_prob, keeper.logp(inp.mask), agg_mode, config, isw)

def get_policy_loss_fn(name: str) -> Callable:
    """The policy loss verl registers under ``name`` (``POLICY_LOSSES``); ValueError for any other."""
    if name in POLICY_LOSSES:
        return POLICY_LOSSES[name]
    if name in _NOT_SUPPORTED:
        raise ValueError(f"policy loss {name!r} is not supported by grpo_fast: {_NOT_SUPPORTED[name]}")
    raise ValueError(f"unknown policy loss {name!r}; grpo_fast implements {sorted(POLICY_LOSSES)}")
