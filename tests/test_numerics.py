"""Logits that share a large offset, for the eager reference and for every backend.

Softmax is shift-invariant, so logits near ±1e4 with a spread of a few units are an ordinary
distribution; only an implementation that forms ``x − lse`` or ``lse − Σ p·x`` from values of size
1e4 loses ~1e-3 absolutely (one float32 ulp of 1e4) and with it the log-probs, the entropy and the
gradient. Every backend here is compared with the float64 reference on the same float32 logits,
and the float32 reference itself too (it is what backend="auto" falls back to without the extension).

The backends come from the shared ``backend`` fixture (tests/backends_fixture.py): torch, cpu, triton,
the CUDA kernels in host emulation (built by g++), and the real CUDA kernels on a GPU.
"""
import math
import pytest
import torch

import grpo_fast
from grpo_fast.reference import grpo_loss_reference, token_logprobs_reference
from helpers import assert_close, assert_close_scaled

B, T, V = 4, 5, 67
RTOL = 1e-5  # README, "Correct against float64": fp32 to 1e-5 relative

OFFSETS = ["plus1e4", "minus1e4", "all-minus1e4", "mixed-rows"]


def _offset_logits(kind: str, seed: int = 0) -> torch.Tensor:
    """float32 (B, T, V) logits: a spread of a few units around a large common offset per row."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.randn(B, T, V, generator=g) * 3.0
    if kind == "plus1e4":
        return spread + 1e4
    if kind == "minus1e4":
        return spread - 1e4
    if kind == "all-minus1e4":  # every logit equal: the uniform distribution, entropy log V
        return torch.full((B, T, V), -1e4)
    offs = torch.tensor([1e4, -1e4, 3e3, -3e3, 0.0, 5e3])[torch.randint(0, 6, (B, T, 1), generator=g)]
    return spread + offs  # a different offset on every row


def _loss_kwargs(z: torch.Tensor, y: torch.Tensor, level: str, seed: int = 1) -> dict:
    """Off-policy inputs around the float64 log-probs, so that ratios and KL are not trivial."""
    g = torch.Generator().manual_seed(seed)
    lp = token_logprobs_reference(z.double(), y).float()
    return dict(
        advantages=torch.randn(B, generator=g), old_logp=lp + 0.2 * torch.randn(B, T, generator=g),
        ref_logp=lp + 0.2 * torch.randn(B, T, generator=g), beta=0.1, loss_type="grpo",
        importance_sampling_level=level,
    )


def _ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the float32 reference against float64


@pytest.mark.parametrize("kind", OFFSETS)
def test_reference_token_logprobs_with_offset(kind):
    z, y = _offset_logits(kind), _ids()
    lp, ent = token_logprobs_reference(z, y, return_entropy=True)
    want_lp, want_ent = token_logprobs_reference(z.double(), y, return_entropy=True)
    assert lp.dtype == torch.float32
    assert_close_scaled(lp, want_lp, RTOL, "logp")
    assert_close_scaled(ent, want_ent, RTOL, "entropy")
    if kind == "all-minus1e4":
        assert_close(ent, torch.full((B, T), math.log(V)), 1e-6, 1e-6, "entropy = log V")
        assert_close(lp, torch.full((B, T), -math.log(V)), 1e-6, 1e-6, "logp = -log V")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kind", OFFSETS)
def test_reference_loss_with_offset(kind, level):
    z, y = _offset_logits(kind), _ids()
    kw = _loss_kwargs(z, y, level)
    z32 = z.clone().requires_grad_(True)
    loss, met = grpo_loss_reference(z32, y, **kw)
    loss.backward()
    z64 = z.double().requires_grad_(True)
    want, want_met = grpo_loss_reference(z64, y, **kw)
    want.backward()
    assert_close(loss, want, 1e-7, RTOL, "loss")
    for k in want_met:
        assert_close_scaled(met[k], want_met[k], RTOL, k)
    assert_close_scaled(z32.grad, z64.grad, RTOL, "grad", atol_scale=RTOL)


# ---------------------------------------------------------------------------------------------
# every backend against float64


@pytest.mark.parametrize("kind", OFFSETS)
def test_backend_token_logprobs_with_offset(backend, kind):
    z, y = backend.put((_offset_logits(kind), _ids()))
    lp, ent = grpo_fast.token_logprobs(z, y, return_entropy=True, backend=backend.name)
    want_lp, want_ent = token_logprobs_reference(z.double(), y, return_entropy=True)
    assert_close_scaled(lp, want_lp, RTOL, "logp")
    assert_close_scaled(ent, want_ent, RTOL, "entropy")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kind", OFFSETS)
def test_backend_loss_with_offset(backend, kind, level):
    z, y = _offset_logits(kind), _ids()
    z, y, kw = backend.put((z, y, _loss_kwargs(z, y, level)))
    z32 = z.clone().requires_grad_(True)
    loss, met = grpo_fast.grpo_loss(z32, y, backend=backend.name, **kw)
    loss.backward()
    z64 = z.double().requires_grad_(True)
    want, want_met = grpo_loss_reference(z64, y, **kw)
    want.backward()
    assert_close(loss, want, 1e-7, RTOL, "loss")
    for k in want_met:
        assert_close_scaled(met[k], want_met[k], RTOL, k)
    assert_close_scaled(z32.grad, z64.grad, RTOL, "grad", atol_scale=RTOL)


# ---------------------------------------------------------------------------------------------
# +inf logits: NaN on every backend (README, Guarantees, "Edges")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_pos_inf_logit_gives_nan_on_every_backend(backend, level):
    """A row with a +inf logit has no finite softmax (inf − inf): its log-prob and entropy are NaN,
    the other rows are untouched, and the loss is NaN — even where the row is masked, as with NaN
    logits (the kernels multiply by the mask rather than skip, so nothing non-finite is hidden).
    Detecting +inf would need another pass over the logits; NaN is what one pass gives everywhere."""
    z, y = _offset_logits("mixed-rows"), _ids()
    z = z - z.amax(-1, keepdim=True)  # ordinary logits around 0
    z[1, 2, 4] = float("inf")
    nan_at = torch.zeros(B, T, dtype=torch.bool)
    nan_at[1, 2] = True
    z, y, nan_at = backend.put((z, y, nan_at))
    lp, ent = grpo_fast.token_logprobs(z, y, return_entropy=True, backend=backend.name)
    assert torch.equal(lp.isnan(), nan_at) and torch.equal(ent.isnan(), nan_at), (lp, ent)
    want_lp, want_ent = token_logprobs_reference(z.double(), y, return_entropy=True)
    assert_close_scaled(lp[~nan_at], want_lp[~nan_at], RTOL, "logp of the other rows")
    assert_close_scaled(ent[~nan_at], want_ent[~nan_at], RTOL, "entropy of the other rows")

    kw = backend.put(_loss_kwargs(z.masked_fill(z.isinf(), 0.0).cpu(), y.cpu(), level))
    for mask in (None, (~nan_at).float()):
        zz = z.clone().requires_grad_(True)
        loss, met = grpo_fast.grpo_loss(zz, y, backend=backend.name, completion_mask=mask, **kw)
        assert math.isnan(loss.item()), (mask, loss)
        loss.backward()
        assert zz.grad[1, 2].isnan().all()
    want, _ = grpo_loss_reference(z.double(), y, **kw)
    assert math.isnan(want.item())
