"""Logits that share a large offset, for the eager reference and for every backend.

Softmax is shift-invariant, so logits near ±1e4 with a spread of a few units are an ordinary
distribution; only an implementation that forms ``x − lse`` or ``lse − Σ p·x`` from values of size
1e4 loses ~1e-3 absolutely (one float32 ulp of 1e4) and with it the log-probs, the entropy and the
gradient. Every backend here is compared with the float64 reference on the same float32 logits,
and the float32 reference itself too (it is what backend="auto" falls back to without the extension).

The CUDA kernels run in host emulation (tests/test_cuda.py builds grpo_cuda_kernels.cu with g++).
"""
import math
import types

import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference, token_logprobs_reference
from helpers import assert_close, assert_close_scaled
from test_cuda import emulated_ext  # noqa: F401  (the session fixture that builds the emulated kernels)

B, T, V = 4, 5, 67
RTOL = 1e-5  # README, "Correct against float64": fp32 to 1e-5 relative

BACKENDS = [b for b in ("torch", "cpu", "triton") if unavailable_reason(b, torch.device("cpu")) is None] + ["cuda-emulated"]


@pytest.fixture
def backend(request, monkeypatch):
    """A backend name for grpo_fast's public functions; "cuda-emulated" installs the host-emulated
    CUDA kernels as the "cuda" backend for CPU tensors (as tests/test_cuda.py's ``tgt`` does)."""
    name = request.param
    if name != "cuda-emulated":
        return name
    import grpo_fast.backends as backends
    from grpo_fast.backends import cuda as cuda_backend

    ext = request.getfixturevalue("emulated_ext")
    fake = types.SimpleNamespace(
        DEVICE_TYPES=("cpu",), unavailable_reason=lambda: None,
        fused_loss=lambda inp, grad: cuda_backend.fused_loss_with(ext, inp, grad, 0, 0),
        token_logprobs=lambda z, y, temp, ent: cuda_backend.token_logprobs_with(ext, z, y, temp, ent, 0, 0),
    )
    load = backends._load
    monkeypatch.setattr(backends, "_load", lambda n: fake if n == "cuda" else load(n))
    return "cuda"


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


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", OFFSETS)
def test_backend_token_logprobs_with_offset(backend, kind):
    z, y = _offset_logits(kind), _ids()
    lp, ent = grpo_fast.token_logprobs(z, y, return_entropy=True, backend=backend)
    want_lp, want_ent = token_logprobs_reference(z.double(), y, return_entropy=True)
    assert_close_scaled(lp, want_lp, RTOL, "logp")
    assert_close_scaled(ent, want_ent, RTOL, "entropy")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kind", OFFSETS)
def test_backend_loss_with_offset(backend, kind, level):
    z, y = _offset_logits(kind), _ids()
    kw = _loss_kwargs(z, y, level)
    z32 = z.clone().requires_grad_(True)
    loss, met = grpo_fast.grpo_loss(z32, y, backend=backend, **kw)
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


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
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
    lp, ent = grpo_fast.token_logprobs(z, y, return_entropy=True, backend=backend)
    assert torch.equal(lp.isnan(), nan_at) and torch.equal(ent.isnan(), nan_at), (lp, ent)
    want_lp, want_ent = token_logprobs_reference(z.double(), y, return_entropy=True)
    assert_close_scaled(lp[~nan_at], want_lp[~nan_at], RTOL, "logp of the other rows")
    assert_close_scaled(ent[~nan_at], want_ent[~nan_at], RTOL, "entropy of the other rows")

    kw = _loss_kwargs(z.masked_fill(z.isinf(), 0.0), y, level)
    zz = z.clone().requires_grad_(True)
    loss, met = grpo_fast.grpo_loss(zz, y, backend=backend, **kw)
    assert math.isnan(loss.item()), loss
    loss.backward()
    assert zz.grad[1, 2].isnan().all()
    want, _ = grpo_loss_reference(z.double(), y, **kw)
    assert math.isnan(want.item())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
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

    def run(zin):
        zz = zin.clone().requires_grad_(True)
        loss, met = grpo_fast.grpo_loss(zz, y, backend=backend, completion_mask=mask, **kw)
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
