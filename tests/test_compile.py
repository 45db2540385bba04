"""torch.compile: a training step that calls grpo_loss compiles with fullgraph=True and equals eager."""
import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

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


# ---- numbers that change between calls (num_items_in_batch with gradient accumulation, schedules)
#
# The first call compiles with the numbers as constants; the first call with a different value
# recompiles once with that number symbolic (dynamo's automatic dynamic), and every later value must
# reuse that graph, give eager's loss and gradient, and still have its value checked (at run time).

STEPS = {  # several distinct values of each option, in the order the steps see them
    "num_items_in_batch": [13, 17, 29, 8],
    "temperature": [1.0, 0.7, 1.3, 0.9],
    "epsilon_low": [0.2, 0.05, 0.3, 0.1],
    "beta": [0.04, 0.1, 0.5, 0.01],
}
DEFAULTS = {"num_items_in_batch": None, "temperature": 1.0, "epsilon_low": 0.2, "beta": 0.04}
# inductor for backend="torch": the reference's formulas are traced, and torch 2.13's inductor gives
# a wrong loss for a later epsilon_low when it reaches a clamp bound as a symbolic float (hence the
# 0-d tensor bounds in api._reference_from_inputs); the kernels are opaque custom ops, and aot_eager
# (faster to compile) sees the same graph around them.
COMPILER = {"torch": "inductor", "cpu": "aot_eager"}


def _graphs(fn) -> int:
    """How many compiled graphs dynamo keeps for fn: what its recompile limit (8) counts."""
    return len(_debug_get_cache_entry_list(fn.__code__))


def _options_step(head, hidden, ids, rewards, old, ref, mask, backend, num_items_in_batch, temperature, epsilon_low, beta):
    logits = head(hidden)
    loss, met = grpo_fast.grpo_loss(logits, ids, rewards=rewards, group_size=2, old_logp=old, ref_logp=ref,
                                    completion_mask=mask, loss_type="dapo", num_items_in_batch=num_items_in_batch,
                                    temperature=temperature, epsilon_low=epsilon_low, beta=beta, backend=backend)
    return loss, met["entropy"], met["kl"], met["clip_ratio"]


def _options_inputs():
    torch.manual_seed(0)
    B, T, H, V = 4, 5, 8, 19
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(B, T, H)
    ids = torch.randint(0, V, (B, T))
    with torch.no_grad():  # ratios spread around 1, so that epsilon_low clips some tokens and not others
        logp = torch.log_softmax(head(hidden), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T)
    ref = logp + 0.2 * torch.randn(B, T)
    mask = (torch.rand(B, T) > 0.2).float()
    return head, (hidden, ids, torch.rand(B), old, ref, mask)


def _run_steps(fn, head, inputs, backend, calls):
    """[(outputs, gradients)] of fn over the calls (dicts of options)."""
    res = []
    for opts in calls:
        head.zero_grad()
        out = fn(head, *inputs, backend, **{**DEFAULTS, **opts})
        out[0].backward()
        res.append(([o.detach() for o in out], [p.grad.clone() for p in head.parameters()]))
    return res


@pytest.mark.parametrize("option", list(STEPS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_number_matches_eager_without_a_recompile_per_value(backend, option):
    head, inputs = _options_inputs()
    calls = [{option: v} for v in STEPS[option]]
    eager = _run_steps(_options_step, head, inputs, backend, calls)
    torch._dynamo.reset()
    compiled = _run_steps(torch.compile(_options_step, fullgraph=True, backend=COMPILER[backend]), head, inputs, backend, calls)
    for i, ((out_c, g_c), (out_e, g_e)) in enumerate(zip(compiled, eager)):
        for a, b in zip(out_c + g_c, out_e + g_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i} ({calls[i]}): {m}")
    # the steps differ (the option matters), and exactly one recompile: when the number turns symbolic
    assert not torch.equal(eager[0][0][0], eager[1][0][0])
    assert _graphs(_options_step) == 2, f"{_graphs(_options_step)} graphs for {len(calls)} values of {option}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch_as_a_tensor_under_fullgraph(backend):
    # TRL and transformers pass num_items_in_batch as a 0-d tensor: no .item(), no graph break,
    # and a new value is new data, not a new graph.
    head, inputs = _options_inputs()
    values = [13, 17, 29, 8]
    eager = _run_steps(_options_step, head, inputs, backend, [{"num_items_in_batch": v} for v in values])
    torch._dynamo.reset()
    compiled = _run_steps(torch.compile(_options_step, fullgraph=True, backend="aot_eager"), head, inputs, backend,
                          [{"num_items_in_batch": torch.tensor(v)} for v in values])
    for (out_c, g_c), (out_e, g_e) in zip(compiled, eager):
        for a, b in zip(out_c + g_c, out_e + g_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert _graphs(_options_step) == 1


def test_bad_changing_number_under_compile_raises_naming_it():
    # Once a number is symbolic its value cannot be checked while tracing: it is checked at run
    # time, with the message eager gives.
    head, inputs = _options_inputs()
    backend = BACKENDS[-1]
    torch._dynamo.reset()
    f = torch.compile(_options_step, fullgraph=True, backend="aot_eager")
    good = [{k: v[0] for k, v in STEPS.items()}, {k: v[1] for k, v in STEPS.items()}]
    _run_steps(f, head, inputs, backend, good)  # every option has been seen with two values: symbolic
    bad = [
        ({"num_items_in_batch": -3}, r"num_items_in_batch must be >= 0, got -3\.0"),
        ({"num_items_in_batch": torch.tensor(-3)}, r"num_items_in_batch must be >= 0, got -3\.0"),
        ({"num_items_in_batch": torch.tensor(float("inf"))}, r"num_items_in_batch must be finite, got inf"),
        ({"temperature": 0.0}, r"temperature must be > 0, got 0\.0"),
        ({"temperature": float("nan")}, r"temperature must be finite, got nan"),
        ({"epsilon_low": 1.5}, r"epsilon_low must lie in \[0, 1\), got 1\.5"),
        ({"beta": float("inf")}, r"beta must be finite, got inf"),
    ]
    for opts, msg in bad:
        with pytest.raises(ValueError, match=msg):
            head.zero_grad()
            f(head, *inputs, backend, **{**good[0], **opts})
        with pytest.raises(ValueError, match=msg):  # eager says the same
            _options_step(head, *inputs, backend, **{**good[0], **opts})
    # and the compiled step still works afterwards
    (out_c, _), = _run_steps(f, head, inputs, backend, [{k: v[2] for k, v in STEPS.items()}])
    (out_e, _), = _run_steps(_options_step, head, inputs, backend, [{k: v[2] for k, v in STEPS.items()}])
    torch.testing.assert_close(out_c[0], out_e[0], rtol=1e-5, atol=1e-6)


def _metrics_step(head, hidden, ids, rewards, old, ref, mask, backend, opts):
    loss, met = grpo_fast.grpo_loss(head(hidden), ids, rewards=rewards, group_size=2, old_logp=old, ref_logp=ref,
                                    completion_mask=mask, backend=backend, **opts)
    return loss, met


def _compare_metrics_steps(backend, compiler, calls):
    """Compiled vs eager over the calls (dicts of options): loss, metrics (same names) and gradients.
    Returns the number of compiled graphs."""
    head, inputs = _options_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(_metrics_step, fullgraph=True, backend=compiler)
    for opts in calls:
        res = []
        for fn in (compiled, _metrics_step):
            head.zero_grad()
            loss, met = fn(head, *inputs, backend, opts)
            loss.backward()
            res.append((loss.detach(), met, [p.grad.clone() for p in head.parameters()]))
        (loss_c, met_c, g_c), (loss_e, met_e, g_e) = res
        assert sorted(met_c) == sorted(met_e), opts
        for a, b in zip([loss_c, *g_c] + [met_c[k] for k in sorted(met_c)], [loss_e, *g_e] + [met_e[k] for k in sorted(met_e)]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{opts}: {m}")
    return _graphs(_metrics_step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_changing_numbers_and_beta_switching_off(backend):
    # epsilon_high, delta and adv_eps are data like the numbers above; beta becoming 0 drops the KL
    # term and the "kl" metric: a different graph, compiled once per side.
    calls = [dict(loss_type="dapo", epsilon_high=e, delta=d, adv_eps=a, beta=b) for e, d, a, b in
             [(0.28, 1.5, 1e-4, 0.04), (0.2, 1.3, 1e-3, 0.1), (0.3, 1.4, 1e-2, 0.0), (0.25, 2.0, 1e-6, 0.2), (0.1, 1.2, 1e-3, 0.0)]]
    assert _compare_metrics_steps(backend, COMPILER[backend], calls) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_sapo_temperatures(backend):
    # The kernels take them as data; the reference (backend="torch") fills a tensor with them,
    # which makes them constants of the graph: each new value compiles anew there.
    calls = [dict(loss_type="sapo", sapo_temperature_pos=p, sapo_temperature_neg=n) for p, n in [(1.0, 1.05), (0.5, 2.0), (2.0, 0.7)]]
    assert _compare_metrics_steps(backend, "aot_eager", calls) == (3 if backend == "torch" else 2)
