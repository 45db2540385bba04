"""Two fused-linear items of issue #12: a temperature tensor in ``fused_linear_grpo_loss`` (through
``fused_linear_logprobs`` and the loss in torch), and a NaN in a masked hidden state, which must reach
neither the loss, nor the metrics, nor a gradient (∂weight, ∂bias, ∂hidden) on any fused-linear path.

Oracle for the temperature tensor: the float64 reference (``grpo_loss_reference``) on the full logits
hidden·Wᵀ + b with the same per-token / per-row τ, differentiated by autograd; fp32 1e-5 relative.
"""
import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference

from helpers import assert_close_scaled

CPU = torch.device("cpu")
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    unavailable_reason("cpu", CPU) is not None, reason=f"cpu backend unavailable: {unavailable_reason('cpu', CPU)}"))]
B, T, H, V = 4, 5, 8, 41


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.1 - 2.5
    tau_tok = torch.rand(B, T, generator=g) + 0.5
    tau_row = torch.rand(B, generator=g) + 0.5
    return hidden, weight, bias, ids, mask, adv, old, tau_tok, tau_row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("per", ["token", "row"])
def test_temperature_tensor_matches_the_reference(backend, level, per):
    hidden, weight, bias, ids, mask, adv, old, tau_tok, tau_row = _inputs()
    tau = tau_tok if per == "token" else tau_row
    opts = dict(loss_type="dapo" if level == "token" else "grpo", importance_sampling_level=level, beta=0.0,
                epsilon_high=0.28)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss, metrics = grpo_fast.fused_linear_grpo_loss(h, w, ids, adv, bias=b, old_logp=old, completion_mask=mask,
                                                     temperature=tau, chunk_size=7, backend=backend, **opts)
    loss.backward()
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    tau64 = tau.double().reshape(B, -1, 1)  # (B, T, 1) or (B, 1, 1): the reference divides by τ here
    logits = (h64 @ w64.t() + b64) / tau64
    ref, ref_metrics = grpo_loss_reference(logits, ids, adv.double(), old_logp=old.double(), completion_mask=mask,
                                           temperature=1.0, **opts)
    ref.backward()
    assert_close_scaled(loss, ref, 1e-5, "loss")
    assert_close_scaled(metrics["entropy"], ref_metrics["entropy"], 1e-5, "entropy")
    for got, want, name in ((h.grad, h64.grad, "d hidden"), (w.grad, w64.grad, "d weight"), (b.grad, b64.grad, "d bias")):
        assert float(want.abs().max()) > 0
        assert_close_scaled(got, want, 1e-5, name)


def test_temperature_tensor_refuses_packed_rows():
    hidden, weight, _, ids, _, _, _, tau_tok, _ = _inputs()
    cu = torch.tensor([0, 7, B * T])
    with pytest.raises(ValueError, match="cu_seqlens"):
        grpo_fast.fused_linear_grpo_loss(hidden.reshape(B * T, H), weight, ids.reshape(-1), rewards=torch.rand(2),
                                         group_size=2, cu_seqlens=cu, temperature=tau_tok.reshape(-1))


def _nan_masked(hidden, mask):
    bad = hidden.clone()
    bad[mask == 0] = float("nan")
    return bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["token", "sequence", "sequence-2pass", "tau-tensor", "logprobs"])
def test_nan_in_masked_hidden_reaches_nothing(backend, case):
    """With NaN in the masked hidden states, the loss, the metrics and the gradients equal those with
    zeros there (docs/spec.md, "Valid rows only"), on every backend and fused-linear path."""
    hidden, weight, bias, ids, mask, adv, old, tau_tok, _ = _inputs()

    def run(hid):
        h, w, b = (t.clone().requires_grad_() for t in (hid, weight, bias))
        metrics = {}
        if case == "logprobs":
            lp, ent = grpo_fast.fused_linear_logprobs(h, w, ids, bias=b, return_entropy=True, chunk_size=6,
                                                      backend=backend)
            valid = mask != 0
            loss = torch.where(valid, lp, 0).sum() + 0.1 * torch.where(valid, ent, 0).sum()
        else:
            level = "token" if case == "token" else "sequence"
            chunk = 3 if case == "sequence-2pass" else 10  # a row (T = 5) longer than a chunk: the pre-pass
            tau = tau_tok if case == "tau-tensor" else 0.8
            loss, metrics = grpo_fast.fused_linear_grpo_loss(h, w, ids, adv, bias=b, old_logp=old, completion_mask=mask,
                                                             importance_sampling_level=level, temperature=tau,
                                                             chunk_size=chunk, backend=backend)
        loss.backward()
        return loss.detach(), metrics, (h.grad, w.grad, b.grad)

    want = run(torch.where(mask.unsqueeze(-1) != 0, hidden, torch.zeros_like(hidden)))
    got = run(_nan_masked(hidden, mask))
    assert bool(torch.isfinite(got[0])), f"a masked NaN reached the loss: {got[0]}"
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7, msg="loss")
    assert sorted(got[1]) == sorted(want[1])
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-6, atol=1e-7, msg=name)
    for g, w_, name in zip(got[2], want[2], ("d hidden", "d weight", "d bias")):
        assert bool(torch.isfinite(g).all()), f"{name}: a masked NaN reached the gradient"
        assert float(w_.abs().max()) > 0
        torch.testing.assert_close(g, w_, rtol=1e-6, atol=1e-7, msg=name)
