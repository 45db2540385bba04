"""More than 2^31 logits: every offset must be int64 (B·T·V passes 2^31 at real sizes).

bf16 logits of shape (1, 14136, 151936) (Qwen's vocabulary): 2,147,767,296 elements, 4.3 GB, just
above 2^31. The gradient is written in place (no second buffer). The last rows — whose element
offsets are past 2^31 — are checked against the float64 reference run on those rows alone
(dapo's per-token gradient depends only on the token and the global token count, which is passed).
Marked slow: `pytest -m slow`.
"""
import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference, token_logprobs_reference

V = 151936
T = 2**31 // V + 2  # 14136 rows: T·V > 2^31
LAST = 3


@pytest.mark.slow
@pytest.mark.skipif(unavailable_reason("cpu", torch.device("cpu")) is not None, reason="the CPU extension is not built")
def test_more_than_2_31_logits_cpu():
    assert T * V > 2**31
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(1, T, V, dtype=torch.bfloat16)
    for t0 in range(0, T, 1024):  # fill in slabs: a full float32 randn would need 8.6 GB more
        logits[0, t0:t0 + 1024] = torch.randn(min(1024, T - t0), V, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, V, (1, T), generator=g)
    ids[0, -1] = V - 1  # the very last element of the tensor is a target
    adv = torch.randn(1, T, generator=g)
    tail = logits[:, -LAST:].double().clone()

    lp = grpo_fast.token_logprobs(logits, ids, backend="cpu")
    want_lp = token_logprobs_reference(tail, ids[:, -LAST:])
    torch.testing.assert_close(lp[:, -LAST:].double(), want_lp, rtol=1e-5, atol=1e-5)

    logits.requires_grad_(True)
    loss, _ = grpo_fast.grpo_loss(logits, ids, adv, loss_type="dapo", inplace=True, backend="cpu")
    loss.backward()
    grad = logits.grad
    assert grad.data_ptr() == logits.data_ptr()  # written in place: no second 4.3 GB buffer
    tail.requires_grad_(True)
    ref_loss, _ = grpo_loss_reference(tail, ids[:, -LAST:], adv[:, -LAST:], loss_type="dapo", num_items_in_batch=T)
    ref_loss.backward()
    got = grad[:, -LAST:].double()
    assert (got - tail.grad).abs().max() <= 2e-2 * tail.grad.abs().max()  # bf16 gradient (8 bits of mantissa)
    assert got[0, -1, V - 1] != 0
