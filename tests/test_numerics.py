"""Logits that share a large offset, for the eager reference and for every backend.

Softmax is shift-invariant, so logits near ±1e4 with a spread of a few units are an ordinary
distribution; only an implementation that forms ``x − lse`` or ``lse − Σ p·x`` from values of size
1e4 loses ~1e-3 absolutely (one float32 ulp of 1e4) and with it the log-probs, the entropy and the
gradient. Every backend here is compared with the float64 reference on the same float32 logits,
and the float32 reference itself too (it is what backend="auto" falls back to without the extension).

The backends come from the shared ``backend`` fixture (tests/backends_fixture.py): torch, cpu, triton,
the CUDA kernels in host emulation (built by g++), and the real CUDA kernels on a GPU.

The same holds for the differentiable primitive (``grpo_fast.logprobs``, ``fused_linear_logprobs``):
its forward keeps each token's lse in two parts (shift, log Σ exp(x − shift)) and its backward forms
log p_j = (x_j − shift) − log_d, never x_j − lse.
"""
import functools
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
    _check_loss_against_float64(grpo_loss_reference, z, y, _loss_kwargs(z, y, level))


def _check_loss_against_float64(loss_fn, z, y, kw):
    """``loss_fn(z32, y, **kw)`` on float32 logits: its loss, metrics and gradient against the
    float64 reference's on the same logits."""
    z32 = z.clone().requires_grad_(True)
    loss, met = loss_fn(z32, y, **kw)
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
    _check_loss_against_float64(functools.partial(grpo_fast.grpo_loss, backend=backend.name), z, y, kw)


# ---------------------------------------------------------------------------------------------
# the differentiable primitive: grpo_fast.logprobs and fused_linear_logprobs against float64 autograd


def _eager_logprobs(z, ids):
    """(logp, entropy) by eager log_softmax, in z's dtype (float64 for the oracle)."""
    logq = torch.log_softmax(z, dim=-1)
    p = logq.exp()
    return logq.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(p * logq).sum(-1)


def _upstream(shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("kind", OFFSETS)
def test_backend_logprobs_with_offset(backend, kind):
    z, y = backend.put((_offset_logits(kind), _ids()))
    gl, gh = backend.put(_upstream((B, T)))
    x = z.clone().requires_grad_(True)
    lp, ent = grpo_fast.logprobs(x, y, return_entropy=True, backend=backend.name)
    ((lp * gl).sum() + (ent * gh).sum()).backward()
    xo = z.double().requires_grad_(True)
    want_lp, want_ent = _eager_logprobs(xo, y)
    ((want_lp * gl.double()).sum() + (want_ent * gh.double()).sum()).backward()
    assert_close_scaled(lp, want_lp, RTOL, "logp")
    assert_close_scaled(ent, want_ent, RTOL, "entropy")
    assert_close_scaled(x.grad, xo.grad, RTOL, "grad")
    # each upstream gradient alone (the backward kernels skip the other term), atol on the scale of the
    # full gradient (the uniform rows' entropy gradient is 0, and only absolutely small)
    atol = RTOL * float(xo.grad.abs().max())
    for g_lp, g_h in ((gl, None), (None, gh)):
        x.grad = None
        lp, ent = grpo_fast.logprobs(x, y, return_entropy=True, backend=backend.name)
        (lp * g_lp).sum().backward() if g_lp is not None else (ent * g_h).sum().backward()
        xo.grad = None
        want_lp, want_ent = _eager_logprobs(xo, y)
        (want_lp * g_lp.double()).sum().backward() if g_lp is not None else (want_ent * g_h.double()).sum().backward()
        assert_close(x.grad, xo.grad, atol, RTOL, "grad of " + ("logp" if g_lp is not None else "entropy"))


def _linear_with_offset(kind: str, H: int = 16):
    """hidden (B·T, H), weight (V, H), bias (V,) in float32 whose logits hidden·weightᵀ + bias are
    EXACT in float32 (multiples of 2^-9 below 2^14: the GEMM rounds nothing in any order), so that the
    float64 oracle sees the same logits and only the kernels' lse can lose accuracy. The offset comes
    from the bias ("bias": every logit near +1e4) or from a weight column of ones against a hidden
    coordinate of ±1e4, 3e3, … per token ("weight-column": a different offset on every token)."""
    g = torch.Generator().manual_seed(4)
    N = B * T
    hidden = torch.randint(-16, 17, (N, H), generator=g).float() / 16
    weight = torch.randint(-32, 33, (V, H), generator=g).float() / 32
    bias = torch.randint(-8, 9, (V,), generator=g).float() / 8
    if kind == "bias":
        bias = bias + 1e4
    else:
        hidden[:, 0] = torch.tensor([1e4, -1e4, 3e3, -3e3, 0.0, 5e3])[torch.randint(0, 6, (N,), generator=g)]
        weight[:, 0] = 1.0
    return hidden, weight, bias


@pytest.mark.parametrize("kind", ["bias", "weight-column"])
def test_backend_fused_linear_logprobs_with_offset(backend, kind):
    hidden, weight, bias = backend.put(_linear_with_offset(kind))
    z64 = hidden.double() @ weight.double().t() + bias.double()
    assert torch.equal((hidden @ weight.t() + bias).double(), z64)  # the float32 logits are exact
    assert float(z64.abs().min()) > 2e3 if kind == "bias" else float(z64.abs().max()) > 9e3
    y = backend.put(_ids().reshape(-1))
    gl, gh = backend.put(_upstream((B * T,)))
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    lp, ent = grpo_fast.fused_linear_logprobs(params[0], params[1], y, bias=params[2], return_entropy=True,
                                              chunk_size=7, backend=backend.name)
    ((lp * gl).sum() + (ent * gh).sum()).backward()
    oparams = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    want_lp, want_ent = _eager_logprobs(oparams[0] @ oparams[1].t() + oparams[2], y)
    ((want_lp * gl.double()).sum() + (want_ent * gh.double()).sum()).backward()
    assert_close_scaled(lp, want_lp, RTOL, "logp")
    assert_close_scaled(ent, want_ent, RTOL, "entropy")
    for name, p, o in zip(("hidden", "weight", "bias"), params, oparams):
        assert_close_scaled(p.grad, o.grad, RTOL, f"d {name}")


def test_backend_fused_linear_gspo_prepass_with_offset(backend):
    """fused_linear_grpo_loss at sequence level with rows longer than a chunk (the log-prob pre-pass:
    pass 1 logprobs_forward, pass 2 logprobs_backward with the saved lse parts) on per-token offsets
    of ±1e4: the loss, its metrics and the hidden / weight / bias gradients against float64."""
    hidden, weight, bias = _linear_with_offset("weight-column")
    y = _ids()
    z = (hidden @ weight.t() + bias).view(B, T, V)
    kw = backend.put(_loss_kwargs(z, y, "sequence"))
    hidden, weight, bias, y = backend.put((hidden, weight, bias, y))
    params = [t.clone().requires_grad_(True) for t in (hidden.view(B, T, -1), weight, bias)]
    loss, met = grpo_fast.fused_linear_grpo_loss(params[0], params[1], y, bias=params[2], chunk_size=3,
                                                 backend=backend.name, **kw)
    loss.backward()
    oparams = [t.double().requires_grad_(True) for t in (hidden.view(B, T, -1), weight, bias)]
    want, want_met = grpo_loss_reference(oparams[0] @ oparams[1].t() + oparams[2], y, **kw)
    want.backward()
    assert_close(loss, want, 1e-7, RTOL, "loss")
    for k in want_met:
        assert_close_scaled(met[k], want_met[k], RTOL, k)
    for name, p, o in zip(("hidden", "weight", "bias"), params, oparams):
        assert_close_scaled(p.grad, o.grad, RTOL, f"d {name}", atol_scale=RTOL)


# ---------------------------------------------------------------------------------------------
# +inf logits: NaN on every backend (README, Guarantees, "Edges")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_pos_inf_logit_gives_nan_on_every_backend(backend, level):
    """A row with a +inf logit has no finite softmax (inf − inf): its log-prob and entropy are NaN,
    the other rows are untouched, and the loss is NaN when the row is valid. (A masked row is not
    read at all: test_nonfinite_masked_row_is_not_read.) Detecting +inf would need another pass over
    the logits; NaN is what one pass gives everywhere."""
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
    zz = z.clone().requires_grad_(True)
    loss, met = grpo_fast.grpo_loss(zz, y, backend=backend.name, **kw)
    assert math.isnan(loss.item()), loss
    loss.backward()
    assert zz.grad[1, 2].isnan().all()
    want, _ = grpo_loss_reference(z.double(), y, **kw)
    assert math.isnan(want.item())


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_masked_row_is_not_read(backend, level, bad):
    """Issue 12 item 3: masked (padding) rows are not swept. A NaN / ±inf anywhere in a masked row
    (a padding row inside a valid sequence, and a fully masked sequence) leaves the loss, the
    metrics and the other rows' gradients as they are with ordinary values there, and the masked
    rows' gradient is exactly 0 (before: the loss was NaN)."""
    z, y = _offset_logits("mixed-rows"), _ids()
    z = z - z.amax(-1, keepdim=True)
    mask = torch.ones(B, T)
    mask[1, 2] = 0.0  # a masked token inside a valid sequence
    mask[3, :] = 0.0  # a fully masked sequence
    kw = _loss_kwargs(z, y, level)
    kw.pop("completion_mask", None)
    z, y, mask, kw = backend.put((z, y, mask, kw))

    def run(zin):
        zz = zin.clone().requires_grad_(True)
        loss, met = grpo_fast.grpo_loss(zz, y, backend=backend.name, completion_mask=mask, **kw)
        loss.backward()
        return loss.detach(), met, zz.grad

    want = run(z)
    zb = z.clone()
    zb[1, 2, :] = bad
    zb[3, 1, 5] = bad
    zb[3, 4, :] = bad
    got = run(zb)
    assert math.isfinite(got[0].item())
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name
    assert torch.equal(got[2], want[2])
    assert bool((got[2][mask == 0] == 0).all()) and not bool(torch.signbit(got[2][mask == 0]).any())
    # and the float64 reference agrees
    ref, _ = grpo_loss_reference(zb.double(), y, completion_mask=mask, **kw)
    assert_close(got[0], ref, RTOL * max(abs(ref.item()), 1e-3), RTOL, "loss")
