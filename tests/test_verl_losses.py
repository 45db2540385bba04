"""grpo_fast.verl_losses against verl's OWN functions (verl 0.9.1: core_algos.get_policy_loss_fn, agg_loss,
kl_penalty): loss, metrics and the gradient w.r.t. log_prob on random inputs, every loss × aggregation
mode × IS weights; and end to end, a verl loss on grpo_fast.logprobs' log-probs (the fused kernels)
against verl's loss on eager log_softmax log-probs, gradient w.r.t. the logits.

verl is an optional extra (`pip install --no-deps verl==0.9.1` + its light deps, see pyproject.toml's
`verl` extra); without it these tests skip.
"""
import math

import pytest
import torch

core_algos = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is not installed: pip install --no-deps verl==0.9.1 && pip install ray tensordict omegaconf codetiming "
           "(the 'verl' extra of pyproject.toml lists them)",
)
from verl.trainer.config import RolloutCorrectionConfig  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402

import grpo_fast  # noqa: E402
from grpo_fast import verl_losses as gv  # noqa: E402

LOSSES = sorted(gv.POLICY_LOSSES)


def test_every_verl_loss_is_covered():
    """Every loss verl registers is implemented here or refused with a reason (no silent gap)."""
    assert set(core_algos.POLICY_LOSS_REGISTRY) == set(gv.POLICY_LOSSES) | set(gv._NOT_SUPPORTED)


def _config(loss_mode="vanilla", global_info=None, rollout_correction=None, **kw):
    pl = dict(loss_mode=loss_mode, clip_cov_ratio=0.2, clip_cov_lb=0.05, clip_cov_ub=5.0, kl_cov_ratio=0.2,
              ppo_kl_coef=0.7, dro_beta=0.3)
    if rollout_correction is not None:
        pl["rollout_correction"] = RolloutCorrectionConfig(**rollout_correction)
    fields = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=1.0, tau_neg=1.05)
    fields.update(kw)
    return FSDPActorConfig(ppo_micro_batch_size_per_gpu=2, rollout_n=4, policy_loss=PolicyLossConfig(**pl),
                           global_batch_info=dict(global_info or {}), **fields)


def _inputs(seed, dtype=torch.float64, B=6, T=9, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(B, T, generator=g, dtype=dtype) - 0.01
    old = (logp + spread * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3)
    A = (2.0 * torch.randn(B, 1, generator=g, dtype=dtype)).expand(B, T).clone()
    A[0] = 0.0  # a row with zero advantage
    A[1] += 0.3 * torch.randn(T, generator=g, dtype=dtype)  # token-level advantages in one row
    lengths = torch.tensor([T, T - 2, 1, T - 4, 0, T - 1])[:B]  # a one-token row, an empty row
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    isw = 0.5 + torch.rand(B, T, generator=g, dtype=dtype)
    return logp, old, A, mask, isw


def _run(fn, logp, *args, seed=0, **kw):
    x = logp.clone().requires_grad_(True)
    torch.manual_seed(seed)  # clip_cov draws its tokens with the global generator
    loss, metrics = fn(args[0], x, *args[1:], **kw)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), metrics, (torch.zeros_like(x) if grad is None else grad)


def _close(a, b, rtol, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _compare(name, logp, old, A, mask, mode, config, isw, rtol):
    ours = _run(gv.get_policy_loss_fn(name), logp, old, A, mask, mode, config, isw)
    theirs = _run(core_algos.get_policy_loss_fn(name), logp, old, A, mask, mode, config, isw)
    _close(ours[0], theirs[0].to(ours[0].dtype), rtol)
    assert set(ours[1]) == set(theirs[1]), (name, sorted(ours[1]), sorted(theirs[1]))
    for k in theirs[1]:
        # verl forms some flags with .float() (float32) whatever the inputs: 1e-6 for the metrics
        assert math.isclose(ours[1][k], float(theirs[1][k]), rel_tol=max(rtol, 1e-6), abs_tol=1e-9), (name, k, ours[1][k], theirs[1][k])
    _close(ours[2], theirs[2], rtol)
    return ours


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", gv.AGG_MODES)
@pytest.mark.parametrize("with_is", [False, True])
def test_policy_loss_matches_verl(name, mode, with_is):
    for seed in range(3):
        logp, old, A, mask, isw = _inputs(seed)
        _compare(name, logp, old, A, mask, mode, _config(name), isw if with_is else None, rtol=1e-10)


@pytest.mark.parametrize("name", LOSSES)
def test_policy_loss_matches_verl_fp32_and_global_normalizers(name):
    """float32 inputs (1e-5) and verl's global batch info (dp_size, global token / row counts, scale factor)."""
    info = dict(dp_size=4, batch_num_tokens=123, global_batch_size=17, loss_scale_factor=50)
    for mode in gv.AGG_MODES:
        logp, old, A, mask, isw = _inputs(7, torch.float32)
        _compare(name, logp, old, A, mask, mode, _config(name, info), isw, rtol=1e-5)


@pytest.mark.parametrize("name", ["vanilla", "dppo_tv", "dppo_kl", "cispo", "gspo", "geo_mean", "sapo"])
def test_policy_loss_far_off_policy_and_options(name):
    """Large log-ratios (verl's ±20 / 10 clamps, dual clip, DPPO's truncation) and non-default bounds."""
    logp, old, A, mask, isw = _inputs(3, spread=8.0)
    cfg = _config(name, clip_ratio_low=0.1, clip_ratio_high=0.5, clip_ratio_c=1.5, tau_pos=2.0, tau_neg=3.0)
    _compare(name, logp, old, A, mask, "token-mean", cfg, isw, rtol=1e-10)
    cfg = _config(name, clip_ratio=0.3, clip_ratio_low=None, clip_ratio_high=None)  # both fall back to clip_ratio
    _compare(name, logp, old, A, mask, "seq-mean-token-mean", cfg, None, rtol=1e-10)


BYPASS_CASES = {
    "default_seq_is": dict(),
    "token_tis_reinforce": dict(rollout_is="token", rollout_is_threshold=1.5, loss_type="reinforce"),
    "seq_icepop_batchnorm": dict(rollout_is="sequence", rollout_is_threshold="0.3_3.0", rollout_is_batch_normalize=True),
    "token_icepop_batchnorm_reinforce": dict(rollout_is="token", rollout_is_threshold="0.7_1.4",
                                             rollout_is_batch_normalize=True, loss_type="reinforce"),
    "no_is_rs_token_k1": dict(rollout_is=None, rollout_rs="token_k1", rollout_rs_threshold="0.8_1.3"),
    "rs_k1_single_number": dict(rollout_is="token", rollout_rs="seq_mean_k1", rollout_rs_threshold=1.2,
                                loss_type="reinforce"),
    "rs_chain": dict(rollout_is="token", rollout_rs="token_k2,seq_sum_k3,seq_max_k2", rollout_rs_threshold="0.05,1.0,0.1"),
    "rs_seq_k1_k3": dict(rollout_is=None, rollout_rs="seq_sum_k1,seq_mean_k3,token_k3,seq_max_k3,seq_mean_k2,seq_sum_k2",
                         rollout_rs_threshold="0.5_2.0,0.05,0.3,0.2,0.04,0.3", loss_type="reinforce"),
}


@pytest.mark.parametrize("case", list(BYPASS_CASES))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_bypass_mode_matches_verl(case, mode):
    """bypass_mode's rollout correction: IS weights (token / sequence, TIS / IcePop, batch-normalized) and
    rejection sampling (every option kind), ppo_clip and reinforce: loss, every rollout_corr/* metric, gradient."""
    for seed in range(2):
        logp, old, A, mask, _ = _inputs(seed, spread=0.3)
        _compare("bypass_mode", logp, old, A, mask, mode, _config("bypass_mode", rollout_correction=BYPASS_CASES[case]),
                 None, rtol=1e-10)


def test_bypass_mode_rejects_and_weights():
    """The bypass cases are not vacuous: rejection sampling drops tokens and the IS weights are not all 1."""
    logp, old, A, mask, _ = _inputs(0, spread=0.3)
    _, m, _ = _run(gv.bypass_mode, logp, old, A, mask, "token-mean", _config("bypass_mode", rollout_correction=BYPASS_CASES["rs_chain"]))
    assert 0 < m["rollout_corr/rollout_rs_masked_fraction"] < 1 and m["rollout_corr/rollout_is_std"] > 0
    with pytest.raises(ValueError, match="rollout_rs"):
        _run(gv.bypass_mode, logp, old, A, mask, "token-mean",
             _config("bypass_mode", rollout_correction=dict(rollout_rs="token_k4", rollout_rs_threshold=1.0)))


def test_clip_cov_actually_drops_tokens():
    """The parity above is not vacuous for clip_cov / kl_cov: tokens are selected."""
    logp, old, A, mask, _ = _inputs(1)
    _, metrics, _ = _run(gv.clip_cov, logp, old, A, mask, "token-mean", _config("clip_cov"))
    assert metrics["actor/pg_clipfrac"] > 0
    base, _, _ = _run(gv.vanilla, logp, old, A, mask, "token-mean", _config("vanilla", clip_ratio_c=1e9))
    kl, _, _ = _run(gv.kl_cov, logp, old, A, mask, "token-mean", _config("kl_cov"))
    assert not torch.allclose(base, kl)


@pytest.mark.parametrize("mode", gv.AGG_MODES)
def test_agg_loss_matches_verl(mode):
    logp, old, A, mask, _ = _inputs(2)
    L = torch.randn_like(logp)
    # Masked entries are not read: verl's token modes ignore a NaN there (its seq modes do not; ours do).
    L[~mask] = float("nan") if mode.startswith("token") else 1e3
    for info in ({}, dict(dp_size=2, batch_num_tokens=40, global_batch_size=9, loss_scale_factor=13)):
        _close(gv.agg_loss(L, mask, mode, **info), core_algos.agg_loss(L, mask, mode, **info), 1e-12)
    with pytest.raises(ValueError):
        gv.agg_loss(L, mask, "seq-mean")


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+",
                                  "abs+", "k2+"])
def test_kl_penalty_matches_verl(kind):
    logp, ref, *_ = _inputs(4, spread=1.0)
    ref = ref.clone()
    ref[0, :3] = logp[0, :3] + torch.tensor([-30.0, 25.0, 12.0], dtype=ref.dtype)  # hits verl's clamps
    outs = []
    for fn in (gv.kl_penalty, core_algos.kl_penalty):
        x = logp.clone().requires_grad_(True)
        kl = fn(x, ref, kind)
        (grad,) = torch.autograd.grad((kl * torch.linspace(0.5, 2, kl.numel(), dtype=kl.dtype).view_as(kl)).sum(), x)
        outs.append((kl.detach(), grad))
    _close(outs[0][0], outs[1][0], 1e-12)
    _close(outs[0][1], outs[1][1], 1e-12)


def test_unsupported_are_refused():
    with pytest.raises(ValueError, match="unknown policy loss"):
        gv.get_policy_loss_fn("ppo")
    with pytest.raises(ValueError, match="full"):
        gv.kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "full")
    logp, old, A, mask, _ = _inputs(0)
    with pytest.raises(ValueError, match="dro_beta"):
        gv.dro(old, logp, A, mask, "token-mean", _config("dro").__class__(
            ppo_micro_batch_size_per_gpu=2, rollout_n=4, policy_loss=PolicyLossConfig(loss_mode="dro")))
    with pytest.raises(ValueError, match="dp_size"):
        gv.agg_loss(logp, mask, "token-mean", dp_size=2)


def _actor_loss(lib, name, logp, ent, old, ref, A, mask, cfg):
    """verl's actor objective (workers/utils/losses.py ppo_loss): policy loss − entropy_coeff·agg(entropy)
    + kl_loss_coef·agg(kl_penalty), each piece from ``lib``."""
    pg, metrics = lib.get_policy_loss_fn(name)(old, logp, A, mask, "token-mean", cfg, None)
    loss = pg - 0.01 * lib.agg_loss(ent, mask, "token-mean") + 0.05 * lib.agg_loss(lib.kl_penalty(logp, ref, "k3+"), mask, "token-mean")
    return loss, metrics


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64])
def test_trains_through_grpo_fast_logprobs(name, loss_dtype):
    """float32 logits → grpo_fast.logprobs (the fused CPU kernel, differentiable in logp and entropy) →
    this module's loss  ==  the same logits → eager log_softmax → verl's own loss: loss and logits
    gradient to 1e-5. The (B, T) loss math runs in float32, or in float64 (log-probs upcast) where
    float32 cancellation in the loss itself would dominate the comparison."""
    B, T, V, tau = 6, 9, 301, 0.8
    g = torch.Generator().manual_seed(11)
    logits = 2.0 * torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    _, _, A, mask, _ = _inputs(5, loss_dtype)
    with torch.no_grad():
        lp0 = torch.log_softmax(logits.double() / tau, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        old = (lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(loss_dtype)
        ref = (lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(loss_dtype)
    cfg = _config(name)

    z1 = logits.clone().requires_grad_(True)
    logp, ent = grpo_fast.logprobs(z1, ids, temperature=tau, return_entropy=True)  # backend auto: the CPU kernel
    torch.manual_seed(0)
    ours, _ = _actor_loss(gv, name, logp.to(loss_dtype), ent.to(loss_dtype), old, ref, A, mask, cfg)
    ours.backward()

    z2 = logits.clone().requires_grad_(True)
    lsm = torch.log_softmax(z2 / tau, -1)
    logp2 = lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ent2 = -(lsm.exp() * lsm).sum(-1)
    torch.manual_seed(0)
    theirs, _ = _actor_loss(core_algos, name, logp2.to(loss_dtype), ent2.to(loss_dtype), old, ref, A, mask, cfg)
    theirs.backward()

    _close(ours.detach(), theirs.detach(), 1e-5, atol=1e-7)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-5 * z2.grad.abs().max().item())
