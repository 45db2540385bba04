"""verl's token-level policy losses in the fused single pass (grpo_fast.verl_losses.fused_policy_loss).

(a) Every backend against the float64 oracle: the loss, verl's metrics and the gradient w.r.t. the
    logits equal ``verl_losses.get_policy_loss_fn(mode)`` (itself tested against verl's code in
    tests/test_verl_losses.py) on float64 log_softmax log-probs, for every fused mode × aggregation mode
    (slow backends: each mode with two aggregation modes by default), on inputs with ratios far outside
    the clip range, |log-ratio| > 20, A = 0, masked tokens and rows, −inf logits and rollout IS weights.
(b) Parity with verl's OWN functions (skipped without verl): fp32, 1e-5 relative, every backend (slow
    backends: one aggregation mode per loss mode by default).
(c) Bad input: unknown and primitive-only modes, bad config values, each named.
"""
from __future__ import annotations

import math

import pytest
import torch

from grpo_fast import verl_losses as gv

from backends_fixture import full_matrix

MODES = list(gv.FUSED_LOSSES)
AGGS = list(gv.AGG_MODES)
CONFIG = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=0.9, tau_neg=1.2,
              policy_loss=dict(dro_beta=0.3))
GLOBAL = dict(dp_size=2, batch_num_tokens=37, global_batch_size=7, loss_scale_factor=5.0)


def _inputs(seed=0, B=5, T=7, V=41, dtype=torch.float32):
    """Logits with −inf entries, old log-probs giving ratios inside and far outside every clip range
    (|s| > 20 on two tokens), per-token advantages with an A = 0 row, a ragged mask with a fully masked
    row (NaN logits there must not matter), rollout IS weights."""
    g = torch.Generator().manual_seed(seed)
    z = (2.0 * torch.randn(B, T, V, generator=g)).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    banned = torch.rand(B, T, V, generator=g) < 0.2
    banned.scatter_(-1, y.unsqueeze(-1), False)  # the sampled token is never banned
    z = z.masked_fill(banned, float("-inf"))
    lp = torch.log_softmax(z.double(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    old = (lp + 1.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    old[0, 0], old[0, 1], old[2, 2] = lp[0, 0] + 25.0, lp[0, 1] - 30.0, lp[2, 2] - 21.0
    A = torch.randn(B, T, generator=g)
    A[1] = 0.0
    lengths = torch.tensor([T, T, T - 3, 0, 1])[:B]
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    z[3] = float("nan")  # the fully masked row
    isw = 0.5 + torch.rand(B, T, generator=g)
    return z, y, old, A, mask, isw


def _oracle(mode, agg, z, y, old, A, mask, isw, config, temperature=1.0):
    """verl_losses' own function on float64 log_softmax log-probs: (loss, metrics, d loss / d logits)."""
    valid = mask.unsqueeze(-1)
    z64 = torch.where(valid, z.double(), torch.zeros((), dtype=torch.float64)).requires_grad_(True)
    lp = torch.log_softmax(z64 / temperature, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    loss, metrics = gv.get_policy_loss_fn(mode)(old.double(), lp, A.double(), mask, agg, config,
                                                None if isw is None else isw.double())
    (g,) = torch.autograd.grad(loss, z64)
    return loss.detach(), metrics, g


def _check(backend, mode, agg, *, dtype=torch.float32, config=CONFIG, use_isw=True, temperature=1.0, seed=0):
    z, y, old, A, mask, isw = _inputs(seed, dtype=dtype)
    isw = isw if use_isw else None
    want_loss, want_m, want_g = _oracle(mode, agg, z, y, old, A, mask, isw, config, temperature)
    x = backend.put(z).requires_grad_(True)
    loss, metrics = gv.fused_policy_loss(x, backend.put(y), backend.put(old), backend.put(A), backend.put(mask), mode,
                                         agg, config, backend.put(isw), temperature=temperature, backend=backend.name)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isclose(loss.item(), want_loss.item(), rel_tol=1e-5, abs_tol=1e-6), (loss.item(), want_loss.item())
    assert set(metrics) == set(want_m)
    n_tok = int(mask.sum())
    for k, v in want_m.items():
        # a clip flag may sit on the other side of a boundary in float32: one token of the count
        tol = 1.0 / n_tok + 1e-6 if "clipfrac" in k else 1e-5 * max(1.0, abs(v))
        assert abs(metrics[k] - v) <= tol, (k, metrics[k], v)
    g = x.grad.detach().cpu().double()
    assert x.grad.dtype == dtype and torch.all(g[3] == 0)  # a masked row: exactly 0 (its NaN never read)
    scale = want_g.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-5 * scale)
    else:  # one rounding of each gradient entry to the dtype, plus float32 accumulation
        err = (g - want_g).abs()
        assert bool((err <= torch.finfo(dtype).eps * want_g.abs() + 1e-4 * scale).all()), err.max().item()


def _kept(backend, mode, agg) -> bool:
    """On slow backends each mode runs with two aggregation modes (every mode and every aggregation covered)."""
    i, j = MODES.index(mode), AGGS.index(agg)
    return not backend.slow or full_matrix() or j in (i % len(AGGS), (i + 2) % len(AGGS))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mode", MODES)
def test_fused_matches_float64_oracle(backend, mode, agg):
    if not _kept(backend, mode, agg):
        pytest.skip(f"{backend.id} is slow: two aggregation modes per loss mode; GRPO_FAST_FULL_MATRIX=1 runs all")
    config = dict(CONFIG, global_batch_info=GLOBAL) if AGGS.index(agg) % 2 else CONFIG
    _check(backend, mode, agg, config=config)


@pytest.mark.parametrize("mode", MODES)
def test_fused_bf16_temperature_no_isw(backend, mode):
    if backend.slow and not full_matrix() and mode not in ("vanilla", "dro"):
        pytest.skip(f"{backend.id} is slow: vanilla and dro by default")
    _check(backend, mode, "token-mean", dtype=torch.bfloat16, use_isw=False, temperature=0.7, seed=1)


def test_dual_clip_and_clamp_cases_are_hit():
    """The inputs reach the branches the fused forms add: the dual clip, the ±20 clamp, both clip sides."""
    z, y, old, A, mask, _ = _inputs()
    lp = torch.log_softmax(z.double(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    s = (lp - old.double())[mask]
    r, a = torch.exp(s), A.double()[mask]
    assert (s.abs() > 20).sum() >= 3
    assert ((a < 0) & (r > CONFIG["clip_ratio_c"]) & (s.abs() < 20)).any()  # dual clip, gradient 0
    assert ((a > 0) & (r > 1.28)).any() and ((a < 0) & (r < 0.8)).any()
    assert ((r > 0.8) & (r < 1.28)).any()


def test_loss_scale_inplace_and_grad_output():
    """inplace=True, loss_scale and a backward with another grad_output give the same gradient."""
    z, y, old, A, mask, isw = _inputs()
    z[3] = 0.0
    args = (y, old, A, mask, "vanilla", "seq-mean-token-mean", CONFIG, isw)
    x0 = z.clone().requires_grad_(True)
    loss0, _ = gv.fused_policy_loss(x0, *args, backend="cpu")
    loss0.backward()
    leaf = z.clone().requires_grad_(True)
    x1 = leaf * 1.0
    loss1, _ = gv.fused_policy_loss(x1, *args, backend="cpu", inplace=True, loss_scale=0.25)
    (0.5 * loss1).backward()
    assert loss1.item() == loss0.item()
    torch.testing.assert_close(leaf.grad, 0.5 * x0.grad, rtol=1e-6, atol=1e-9)


# ---- (b) parity with verl's own functions ----------------------------------------------------------


@pytest.fixture(scope="module")
def verl():
    core_algos = pytest.importorskip(
        "verl.trainer.ppo.core_algos",
        reason="verl is not installed: pip install --no-deps verl==0.9.1 && pip install ray tensordict omegaconf "
               "codetiming (the 'verl' extra of pyproject.toml lists them)")
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    def config(mode, global_info):
        return FSDPActorConfig(ppo_micro_batch_size_per_gpu=2, rollout_n=4, clip_ratio_low=0.2, clip_ratio_high=0.28,
                               clip_ratio_c=3.0, tau_pos=0.9, tau_neg=1.2, global_batch_info=dict(global_info),
                               policy_loss=PolicyLossConfig(loss_mode=mode, dro_beta=0.3))
    return core_algos, config


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mode", MODES)
def test_fused_matches_verl(verl, backend, mode, agg):
    if backend.slow and not full_matrix() and AGGS.index(agg) != MODES.index(mode) % len(AGGS):
        pytest.skip(f"{backend.id} is slow: one aggregation mode per loss mode; GRPO_FAST_FULL_MATRIX=1 runs all")
    core_algos, make_config = verl
    for global_info in ({}, GLOBAL):
        config = make_config(mode, global_info)
        z, y, old, A, mask, isw = _inputs(seed=2)
        z[3] = 0.0  # verl's eager path would carry a NaN row into its masked sums' gradient
        x = z.clone().requires_grad_(True)
        lp = torch.log_softmax(x, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        want, want_m = core_algos.get_policy_loss_fn(mode)(old, lp, A, mask, agg, config, isw)
        (want_g,) = torch.autograd.grad(want, x)
        x2 = backend.put(z).requires_grad_(True)
        loss, metrics = gv.fused_policy_loss(x2, *backend.put((y, old, A, mask)), mode, agg, config, backend.put(isw),
                                             backend=backend.name)
        loss.backward()
        assert math.isclose(loss.item(), want.item(), rel_tol=1e-5, abs_tol=1e-6), (mode, agg, loss.item(), want.item())
        assert set(metrics) == set(want_m)
        for k, v in want_m.items():
            v = float(v)
            tol = 1.0 / int(mask.sum()) + 1e-6 if "clipfrac" in k else 1e-5 * max(1.0, abs(v))
            assert abs(metrics[k] - v) <= tol, (mode, k, metrics[k], v)
        torch.testing.assert_close(x2.grad.cpu(), want_g, rtol=1e-5, atol=1e-5 * want_g.abs().max().item())


# ---- (c) bad input ---------------------------------------------------------------------------------------


def _call(**over):
    z, y, old, A, mask, isw = _inputs()
    kw = dict(logits=z, responses=y, old_log_prob=old, advantages=A, response_mask=mask, loss_mode="vanilla",
              loss_agg_mode="token-mean", config=CONFIG, rollout_is_weights=isw, backend="cpu")
    kw.update(over)
    return gv.fused_policy_loss(**kw)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"unknown loss_mode 'ppo'.*'cispo', 'dro', 'gpg', 'sapo', 'vanilla'"):
        _call(loss_mode="ppo")
    for mode in ("gspo", "geo_mean", "clip_cov", "kl_cov", "dppo_tv", "bypass_mode"):
        with pytest.raises(ValueError, match=rf"loss_mode '{mode}' has no fused form.*get_policy_loss_fn"):
            _call(loss_mode=mode)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        _call(loss_agg_mode="mean")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        _call(config=dict(CONFIG, clip_ratio_c=1.0))
    with pytest.raises(ValueError, match="dro_beta"):
        _call(loss_mode="dro", config=dict(CONFIG, policy_loss={}))
    with pytest.raises(ValueError, match="clip_ratio_low must lie in"):
        _call(config=dict(CONFIG, clip_ratio_low=1.5))
    with pytest.raises(ValueError, match="tau_pos and tau_neg must be > 0"):
        _call(loss_mode="sapo", config=dict(CONFIG, tau_neg=-1.0))
    with pytest.raises(ValueError, match="rollout_is_weights must have shape"):
        _call(rollout_is_weights=torch.ones(5))
    with pytest.raises(ValueError, match="old_log_prob must have shape"):
        _call(loss_mode="gpg", old_log_prob=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="batch_num_tokens"):
        _call(config=dict(CONFIG, global_batch_info=dict(dp_size=2)))
    with pytest.raises(ValueError, match="response_mask must hold only 0 and 1"):
        _call(response_mask=torch.full((5, 7), 0.5))
    with pytest.raises(ValueError, match=r"advantages must have shape \(5,\) or \(5, 7\)"):
        _call(advantages=torch.zeros(5, 6))
    with pytest.raises(ValueError, match="responses must lie in"):
        _call(responses=torch.full((5, 7), 41))


def test_agg_weights_equal_agg_loss():
    """agg_weights are agg_loss's linear form (the kernels' aggregation weights)."""
    _, _, _, _, mask, isw = _inputs()
    L = torch.randn(mask.shape, dtype=torch.float64)
    for agg in AGGS:
        for info in ({}, GLOBAL):
            w = gv.agg_weights(mask, agg, **info)
            assert math.isclose((w * L * mask).sum().item(), gv.agg_loss(L, mask, agg, **info).item(), rel_tol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_matches_float64_oracle(backend, mode):
    """fused_linear_policy_loss (chunks of 8 tokens, a softcap): loss, metrics and the gradients of
    hidden and weight equal the oracle on logits = softcap(hidden·Wᵀ) in float64."""
    if backend.slow and not full_matrix() and mode not in ("vanilla", "cispo"):
        pytest.skip(f"{backend.id} is slow: vanilla and cispo by default")
    _, y, old, A, mask, isw = _inputs(seed=3)
    B, T = y.shape
    g = torch.Generator().manual_seed(4)
    h = torch.randn(B, T, 16, generator=g)
    W = torch.randn(41, 16, generator=g)
    cap, agg = 6.0, AGGS[MODES.index(mode) % len(AGGS)]
    h64, W64 = h.double().requires_grad_(True), W.double().requires_grad_(True)
    z64 = cap * torch.tanh(h64 @ W64.T / cap)
    lp = torch.log_softmax(z64 / 0.8, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    want, want_m = gv.get_policy_loss_fn(mode)(old.double(), lp, A.double(), mask, agg, CONFIG, isw.double())
    want_gh, want_gw = torch.autograd.grad(want, (h64, W64))
    hb, Wb = backend.put(h).requires_grad_(True), backend.put(W).requires_grad_(True)
    loss, metrics = gv.fused_linear_policy_loss(hb, Wb, *backend.put((y, old, A, mask)), mode, agg, CONFIG,
                                                backend.put(isw), temperature=0.8, logit_softcap=cap, chunk_size=8,
                                                backend=backend.name)
    loss.backward()
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5, abs_tol=1e-6), (loss.item(), want.item())
    assert set(metrics) == set(want_m)
    for k, v in want_m.items():
        tol = 1.0 / int(mask.sum()) + 1e-6 if "clipfrac" in k else 1e-5 * max(1.0, abs(v))
        assert abs(metrics[k] - v) <= tol, (k, metrics[k], v)
    for got, ref in ((hb.grad, want_gh), (Wb.grad, want_gw)):
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
