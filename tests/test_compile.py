"""torch.compile: a training step that calls grpo_loss compiles with fullgraph=True and equals eager."""
import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason

BACKENDS = [b for b in ("torch", "cpu") if unavailable_reason(b, torch.device("cpu")) is None]


def _step(head, hidden, ids, rewards, ref, mask, backend):
    logits = head(hidden)
    loss, met = grpo_fast.grpo_loss(logits, ids, rewards=rewards, group_size=2, ref_logp=ref, beta=0.04,
                                    completion_mask=mask, loss_type="grpo", backend=backend)
    return loss, met["kl"], met["clip_ratio"]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_compiles_fullgraph_and_matches_eager(backend, compiler):
    torch.manual_seed(0)
    B, T, H, V = 4, 5, 16, 37
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(B, T, H)
    ids = torch.randint(0, V, (B, T))
    rewards = torch.rand(B)
    ref = torch.randn(B, T) * 0.1 - 3.6
    mask = (torch.rand(B, T) > 0.2).float()

    eager = _step(head, hidden, ids, rewards, ref, mask, backend)
    eager[0].backward()
    g_eager = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, backend=compiler)
    out = compiled(head, hidden, ids, rewards, ref, mask, backend)
    out[0].backward()
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # inductor may fuse/reorder float ops
    for p, g in zip(head.parameters(), g_eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_value_checks_still_run_under_compile():
    torch._dynamo.reset()
    f = torch.compile(lambda z, y, r: grpo_fast.grpo_loss(z, y, rewards=r, group_size=2, backend="torch")[0], fullgraph=True,
                      backend="aot_eager")
    z = torch.randn(2, 3, 7)
    with pytest.raises(ValueError, match=r"completion_ids must lie in \[0, V\)"):
        f(z, torch.full((2, 3), 7), torch.rand(2))
    with pytest.raises(ValueError, match="rewards must be finite"):
        f(z, torch.zeros(2, 3, dtype=torch.long), torch.tensor([1.0, float("nan")]))


def test_unavailable_backend_under_compile_says_why():
    missing = [b for b in ("cuda", "triton", "cpu") if unavailable_reason(b, torch.device("cpu")) is not None]
    if not missing:
        pytest.skip("every backend is available on CPU tensors here")
    torch._dynamo.reset()
    f = torch.compile(lambda z, y, r: grpo_fast.grpo_loss(z, y, rewards=r, group_size=2, backend=missing[0])[0],
                      fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=f'backend="{missing[0]}" is not available'):
        f(torch.randn(2, 3, 7), torch.zeros(2, 3, dtype=torch.long), torch.rand(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_under_compile_matches_eager_and_double_backward_raises(backend):
    """The autograd contract (tests/test_autograd_contract.py) on the compiled path: the custom op's
    formula reads its saved gradient out of place, so a retained graph runs again exactly like eager;
    torch.compile refuses double backward itself."""
    torch._dynamo.reset()
    z0, y, adv = torch.randn(2, 3, 37), torch.randint(0, 37, (2, 3)), torch.randn(2)
    f = torch.compile(lambda z: grpo_fast.grpo_loss(z, y, adv, backend=backend)[0] * 0.5, fullgraph=True,
                      backend="aot_eager")
    ze = z0.clone().requires_grad_(True)
    (grpo_fast.grpo_loss(ze, y, adv, backend=backend)[0] * 0.5).backward()
    z = z0.clone().requires_grad_(True)
    loss = f(z)
    (g,) = torch.autograd.grad(loss, z, retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(g, ze.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad, 2 * ze.grad, rtol=1e-5, atol=1e-7)
    (g,) = torch.autograd.grad(f(z), z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()
