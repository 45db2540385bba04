"""inplace=True never yields a silently wrong gradient; no_grad computes and overwrites nothing."""
import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference

BACKENDS = [b for b in ("cpu", "triton") if unavailable_reason(b, torch.device("cpu")) is None]


def _ids_adv(B=2, T=3, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_logits_that_autograd_saved_raises_instead_of_corrupting(backend):
    # exp saves its output for backward; overwriting it with the gradient must not go unnoticed.
    ids, adv = _ids_adv()
    x = torch.randn(2, 3, 5, requires_grad=True)
    loss, _ = grpo_fast.grpo_loss(x.exp(), ids, adv, inplace=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_an_lm_head_output_is_fine(backend):
    ids, adv = _ids_adv()
    h = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    loss, _ = grpo_fast.grpo_loss(h @ w.T, ids, adv, inplace=True, backend=backend)
    loss.backward()
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    grpo_loss_reference(h64 @ w64.T, ids, adv.double())[0].backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_self_overlapping_logits_falls_back_to_a_buffer(backend):
    # An expanded batch: both rows are the same memory and cannot both hold their own gradient.
    ids, adv = _ids_adv()
    grads = []
    for inplace in (True, False):
        x = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        loss, _ = grpo_fast.grpo_loss(x.expand(2, 3, 5), ids, adv, inplace=inplace, backend=backend)
        loss.backward()
        grads.append(x.grad)
    x64 = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(1)).double().requires_grad_(True)
    grpo_loss_reference(x64.expand(2, 3, 5), ids, adv.double())[0].backward()
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0].double(), x64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_leaves_logits_untouched_even_with_inplace(backend):
    ids, adv = _ids_adv()
    z = torch.randn(2, 3, 5, requires_grad=True)
    before = z.detach().clone()
    with torch.no_grad():
        loss, _ = grpo_fast.grpo_loss(z, ids, adv, inplace=True, backend=backend)
    assert torch.equal(z.detach(), before)
    want, _ = grpo_loss_reference(before.double(), ids, adv.double())
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_t1_sequence_level_with_per_token_advantages_counts_tokens(backend):
    # advantages of shape (B, T) = (B, 1): per-token advantages, so the clip flags are token means
    # over the valid tokens, in the reference and the kernels alike (decided by options, not shape).
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 1, 7, generator=g)
    ids = torch.randint(0, 7, (4, 1), generator=g)
    adv = torch.tensor([[1.0], [1.0], [-1.0], [1.0]])
    lp = grpo_fast.token_logprobs(z, ids, backend="torch")
    old = lp - torch.tensor([[0.5], [0.5], [0.5], [0.0]])  # r = e^0.5 on rows 0-2, 1 on row 3
    mask = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    _, met = grpo_fast.grpo_loss(z, ids, adv, old_logp=old, completion_mask=mask,
                                 importance_sampling_level="sequence", backend=backend)
    _, want = grpo_loss_reference(z.double(), ids, adv.double(), old_logp=old.double(), completion_mask=mask.double(),
                                  importance_sampling_level="sequence")
    assert met["clip_ratio_high"].item() == pytest.approx(1 / 3) == want["clip_ratio_high"].item()
