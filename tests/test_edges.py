"""Numerics at the edges, for every backend available here, against the float64 reference.

-inf logits, logits of magnitude 1e4, fp16 near its range, fully masked rows and batches, groups of
equal rewards, T = 1, V = 1, extreme temperatures; NaN propagates (it is never replaced).
"""
import math

import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference

BACKENDS = [b for b in ("torch", "cpu", "triton") if unavailable_reason(b, torch.device("cpu")) is None]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)  # every draw below is reproducible


def _case(B=4, T=3, V=37, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g) * scale
    y = torch.randint(0, V, (B, T), generator=g)
    rewards = torch.rand(B, generator=g)
    m = torch.ones(B, T)
    return z.to(dtype), y, rewards, m


def _run(backend, z, y, **kw):
    zz = z.clone().requires_grad_(True)
    loss, met = grpo_fast.grpo_loss(zz, y, backend=backend, **kw)
    loss.backward()
    return loss, met, zz.grad


def _ref(z, y, **kw):
    zz = z.double().requires_grad_(True)
    loss, met = grpo_loss_reference(zz, y, **kw)
    loss.backward()
    return loss, met, zz.grad


def _close(got, want, rtol=1e-5, what=""):
    got, want = got.double(), want.double()
    atol = rtol * max(want.abs().max().item(), 1e-30) + 1e-12
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    if bad.any():
        i = int(err.flatten().argmax())
        where = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches; worst at {where}: got {got.flatten()[i].item()}, "
                             f"want {want.flatten()[i].item()} (rtol {rtol})")


def _check_all(backend, z, y, rtol=1e-5, **kw):
    loss, met, grad = _run(backend, z, y, **kw)
    rkw = {k: v for k, v in kw.items() if k not in ("inplace",)}
    wl, wm, wg = _ref(z, y, **rkw)
    assert torch.isfinite(loss), loss
    _close(loss, wl, rtol, "loss")
    for k in wm:
        _close(met[k], wm[k], rtol, k)
    assert torch.isfinite(grad).all()
    _close(grad, wg.to(grad.dtype), rtol, "grad")
    return loss, met, grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_banned_vocabulary(backend):
    z, y, r, m = _case()
    z[..., ::3] = -float("inf")
    y = (y // 3) * 3 + 1  # targets never banned
    y = y.clamp(max=z.shape[-1] - 1)
    _, met, grad = _check_all(backend, z, y, rewards=r, group_size=2, loss_type="grpo")
    assert (grad[..., ::3] == 0).all()
    assert torch.isfinite(met["entropy"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitude_logits(backend):
    z, y, r, m = _case(scale=1e4)
    _check_all(backend, z, y, rewards=r, group_size=2, old_logp=None, loss_type="bnpo")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_near_its_range(backend):
    z, y, r, m = _case(scale=1.0)
    z = (z.sign() * (6.0e4 - 2e3 * z.abs().clamp(max=5))).to(torch.float16)  # within [±5.0e4, ±6.0e4]
    loss, _, grad = _run(backend, z, y, rewards=r, group_size=2)
    wl, _, wg = _ref(z, y, rewards=r, group_size=2)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    _close(loss, wl, 1e-4, "loss")
    assert (grad.double() - wg).abs().max() <= 2e-3 * wg.abs().max() + 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"])
def test_fully_masked_rows_and_batch(backend, loss_type):
    z, y, r, m = _case(seed=3)
    ref = torch.randn(4, 3, generator=torch.Generator().manual_seed(3)) - 3
    m[1] = 0
    eh = 4.0 if loss_type == "cispo" else None
    _, _, grad = _check_all(backend, z, y, rewards=r, group_size=2, completion_mask=m, loss_type=loss_type,
                            beta=0.1, ref_logp=ref, epsilon_high=eh, importance_sampling_level="sequence")
    assert (grad[1] == 0).all()
    m.zero_()
    loss, met, grad = _run(backend, z, y, rewards=r, group_size=2, completion_mask=m, loss_type=loss_type,
                           beta=0.1, ref_logp=ref, epsilon_high=eh)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert all(torch.isfinite(v) and v.item() == 0.0 for v in met.values()), met


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_rewards_in_a_group(backend):
    z, y, _, m = _case(B=6, seed=4)
    r = torch.tensor([0.7, 0.7, 0.7, 0.1, 0.9, 0.5])
    for scale in ("group", "batch", "none"):
        _check_all(backend, z, y, rewards=r, group_size=3, scale_rewards=scale, loss_type="grpo",
                   old_logp=torch.randn(6, 3) * 0.1 - 3.5)
    # The first group contributes nothing: its advantage is exactly 0.
    _, _, grad = _run(backend, z, y, rewards=r, group_size=3, loss_type="grpo")
    assert (grad[:3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_single_vocab(backend):
    z, y, r, m = _case(B=2, T=1, V=5, seed=5)
    _check_all(backend, z, y, rewards=r, group_size=2, loss_type="dapo")
    z1 = torch.randn(2, 3, 1)
    y1 = torch.zeros(2, 3, dtype=torch.long)
    loss, met, grad = _run(backend, z1, y1, rewards=torch.tensor([0.0, 1.0]), group_size=2, old_logp=torch.full((2, 3), -0.1))
    wl, _, _ = _ref(z1, y1, rewards=torch.tensor([0.0, 1.0]), group_size=2, old_logp=torch.full((2, 3), -0.1))
    _close(loss, wl, 1e-6, "loss")
    assert met["entropy"].item() == 0.0 and (grad == 0).all()  # p = 1: logp = 0, no gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-3, 100.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extreme_temperatures(backend, temperature, seed):
    # At τ = 1e-3 the log-probs are ≈ -4000: float32 holds them to 2^-24·4000 ≈ 2.4e-4 at best, and
    # that error passes through every ratio exp(logp - old) into the loss. The bar: at most twice
    # PyTorch's own float32 error (one sample of that rounding noise) plus that explicit budget,
    # 8 ulps of the largest |logp| times the size of the loss's terms before they cancel.
    z, y, r, m = _case(seed=6)
    g = torch.Generator().manual_seed(seed)
    lp = grpo_fast.token_logprobs(z, y, temperature, backend="torch")
    old = lp + torch.randn(4, 3, generator=g) * 0.05
    kw = dict(rewards=r, group_size=2, temperature=temperature, old_logp=old, loss_type="dapo", beta=0.05, ref_logp=old - 0.1)
    loss, met, grad = _run(backend, z, y, **kw)
    tl, tm, tg = _run("torch", z, y, **kw)
    wl, wm, wg = _ref(z, y, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    lp64 = grpo_fast.reference.token_logprobs_reference(z.double(), y, temperature)
    ratio = torch.exp(lp64 - old.double())
    adv = grpo_fast.group_advantages(r, 2).double()[:, None]
    d = (old.double() - 0.1) - lp64
    terms = (ratio * adv.abs() + 0.05 * (torch.exp(d) + d.abs() + 1)).sum() / lp64.numel()  # dapo: w = 1/N
    budget = 8 * 2.0**-24 * lp64.abs().max().item() * terms.item()
    for name, got, fp32, want, extra in [("loss", loss, tl, wl, budget), ("grad", grad, tg, wg, 0.0)] + \
            [(k, met[k], tm[k], wm[k], 0.0) for k in wm]:
        err = (got.double() - want).abs().max().item()
        err32 = (fp32.double() - want).abs().max().item()
        assert err <= 2 * err32 + extra + 1e-5 * want.abs().max().item() + 1e-9, (name, err, err32, extra)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_logits_propagates(backend):
    z, y, r, m = _case(seed=7)
    z[2, 1, 5] = float("nan")
    loss, _ = grpo_fast.grpo_loss(z, y, rewards=r, group_size=2, backend=backend)
    assert math.isnan(loss.item())
