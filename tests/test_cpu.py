"""The CPU C++ backend (grpo_fast._C_cpu) against the float64 reference.

Every loss type × importance-sampling level × KL estimator × logits dtype, then one option at a time
(on-policy, IS ratios, advantages vs rewards, delta, bias-corrected KL, num_items_in_batch, odd
sizes, inplace, grad_output != 1, strided logits), token_logprobs, the vectorized exp, every
instruction-set path and determinism across thread counts. Accuracy rule: tests/helpers.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import grpo_fast
from grpo_fast.backends import cpu as cpu_backend
from grpo_fast.reference import token_logprobs_reference

from helpers import (
    DTYPE_TOLS,
    assert_close,
    assert_close_scaled,
    assert_error_within,
    make_inputs,
    run_backend,
    run_oracle,
)

pytestmark = pytest.mark.skipif(
    cpu_backend.unavailable_reason() is not None, reason=str(cpu_backend.unavailable_reason())
)
_C = cpu_backend._C_cpu

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"]
# Per-loss options that make the interesting branches happen on random inputs.
LOSS_OPTS = {"cispo": dict(epsilon_high=1.1), "sapo": dict(sapo_temperature_pos=0.9, sapo_temperature_neg=1.2)}


def _check(dtype, atol, rtol, ids, logits, grad_scale=1.0, inplace=False, **kw):
    """Run the cpu backend and the oracle on the same inputs and compare loss, metrics and gradient.

    With grad_scale != 1 at low precision the fused gradient is rounded twice (to the logits' dtype
    in forward, again after backward's scaling) where eager rounds once, so the gradient's floor is
    one unit of that dtype's precision (relative to max|grad|).
    """
    loss, metrics, grad = run_backend(logits, ids, "cpu", inplace=inplace, grad_scale=grad_scale, **kw)
    loss_o, metrics_o, grad_o = run_oracle(logits, ids, grad_scale=grad_scale, **kw)
    # A NaN on both sides would compare equal: the inputs here must give a finite loss and gradient.
    assert math.isfinite(float(loss_o)) and bool(torch.isfinite(grad_o).all()), "non-finite oracle: bad test inputs"
    assert sorted(metrics) == sorted(metrics_o)
    assert grad.dtype == logits.dtype
    if dtype == torch.float32:
        assert_close(loss, loss_o, 0.1 * atol, rtol, "loss")
        for k in metrics:
            assert_close(metrics[k], metrics_o[k], atol, rtol, f"metric {k}")
        assert_close_scaled(grad, grad_o, rtol, "grad")
    else:
        loss_t, metrics_t, grad_t = run_backend(logits, ids, "torch", grad_scale=grad_scale, **kw)
        assert_error_within(loss, loss_t, loss_o, atol, rtol, "loss")
        for k in metrics:
            assert_error_within(metrics[k], metrics_t[k], metrics_o[k], atol, rtol, f"metric {k}")
        grad_rtol = rtol if grad_scale == 1.0 else torch.finfo(dtype).eps
        assert_error_within(grad, grad_t, grad_o, atol, grad_rtol, "grad")
    return loss, metrics, grad


# ---- the full matrix ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("kl_estimator", ["k3", "k1", "k2"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matrix(loss_type, level, kl_estimator, dtype, atol, rtol):
    inp = make_inputs(4, 6, 53, dtype, seed=hash((loss_type, level, kl_estimator)) % 1000)
    _check(dtype, atol, rtol, inp["ids"], inp["logits"], advantages=inp["advantages"], old_logp=inp["old_logp"],
           ref_logp=inp["ref_logp"], completion_mask=inp["completion_mask"], beta=0.04, kl_estimator=kl_estimator,
           loss_type=loss_type, importance_sampling_level=level, temperature=0.9, **LOSS_OPTS.get(loss_type, {}))


# ---- one option at a time ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    "opts",
    [
        pytest.param(dict(old_logp=None), id="on_policy"),
        pytest.param(dict(isr="B"), id="isr_B"),
        pytest.param(dict(isr="BT"), id="isr_BT"),
        pytest.param(dict(delta=1.5, loss_type="grpo"), id="delta"),
        pytest.param(dict(use_bias_correction_kl=True, beta=0.1), id="bias_corrected_kl"),
        pytest.param(dict(num_items_in_batch=37), id="num_items"),
        pytest.param(dict(loss_type="dr_grpo", max_completion_length=11), id="dr_grpo_mcl"),
        pytest.param(dict(adv="BT"), id="adv_BT"),
        pytest.param(dict(adv="BT", loss_type="cispo", epsilon_high=1.1), id="adv_BT_cispo"),
        pytest.param(dict(beta=0.0, ref_logp=None), id="no_kl"),
        pytest.param(dict(temperature=1.7, epsilon_low=0.1, epsilon_high=0.28), id="temp_eps"),
    ],
)
def test_options(opts, level, dtype, atol, rtol):
    B, T = 4, 6
    inp = make_inputs(B, T, 53, dtype, seed=7)
    g = torch.Generator().manual_seed(3)
    kw = dict(advantages=inp["advantages"], old_logp=inp["old_logp"], ref_logp=inp["ref_logp"],
              completion_mask=inp["completion_mask"], beta=0.04, importance_sampling_level=level)
    opts = dict(opts)
    isr = opts.pop("isr", None)
    if isr is not None:
        kw["importance_sampling_ratio"] = 0.5 + torch.rand((B,) if isr == "B" else (B, T), generator=g)
    if opts.pop("adv", None) == "BT":
        kw["advantages"] = torch.randn(B, T, generator=g)
    kw.update(opts)
    _check(dtype, atol, rtol, inp["ids"], inp["logits"], **kw)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS[:2])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_rewards(scale_rewards, level, dtype, atol, rtol):
    """Advantages computed inside the kernel from rewards; group 1 has equal rewards (A = 0)."""
    B, G = 6, 3
    inp = make_inputs(B, 5, 53, dtype, seed=11)
    rewards = inp["rewards"].clone()
    rewards[G:2 * G] = 0.75
    _check(dtype, atol, rtol, inp["ids"], inp["logits"], rewards=rewards, group_size=G, scale_rewards=scale_rewards,
           adv_eps=1e-4, old_logp=inp["old_logp"], completion_mask=inp["completion_mask"],
           importance_sampling_level=level, loss_type="grpo")


@pytest.mark.parametrize(
    "B,T,V,G",
    [
        pytest.param(4, 1, 53, 4, id="T1_B_eq_G"),
        pytest.param(2, 3, 1, 2, id="V1"),
        pytest.param(3, 2, 17, 3, id="V17"),
        pytest.param(2, 3, 32001, 2, id="V32001"),
    ],
)
def test_odd_sizes(B, T, V, G):
    inp = make_inputs(B, T, V, seed=B * 100 + V, masked_row=False, banned=V > 2)
    for level in ("token", "sequence"):
        _check(torch.float32, 1e-5, 1e-5, inp["ids"], inp["logits"], rewards=inp["rewards"], group_size=G,
               old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], beta=0.04, completion_mask=inp["completion_mask"],
               importance_sampling_level=level, loss_type="dapo")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_large_vocab(dtype, atol, rtol):
    inp = make_inputs(2, 3, 32001, dtype, seed=5)
    _check(dtype, atol, rtol, inp["ids"], inp["logits"], advantages=inp["advantages"], old_logp=inp["old_logp"],
           ref_logp=inp["ref_logp"], beta=0.04, completion_mask=inp["completion_mask"], loss_type="grpo")


def test_all_masked():
    """Every token masked: loss 0, gradient 0, metrics finite (means over max(n, 1))."""
    inp = make_inputs(2, 4, 53, seed=1)
    mask = torch.zeros(2, 4)
    loss, metrics, grad = _check(torch.float32, 1e-5, 1e-5, inp["ids"], inp["logits"], advantages=inp["advantages"],
                                 old_logp=inp["old_logp"], completion_mask=mask, loss_type="grpo")
    assert float(loss) == 0.0 and bool((grad == 0).all())


def test_peaked_rows():
    """Rows where every logit but the target is −inf (p_y = 1, entropy 0) and very peaked rows."""
    inp = make_inputs(2, 4, 53, seed=2, banned=False)
    logits = inp["logits"].clone()
    logits[0, 0] = float("-inf")
    logits[0, 0, inp["ids"][0, 0]] = 3.0
    logits[1, 1, inp["ids"][1, 1]] = 60.0
    _check(torch.float32, 1e-5, 1e-5, inp["ids"], logits, advantages=inp["advantages"], old_logp=inp["old_logp"],
           completion_mask=torch.ones(2, 4), loss_type="dapo", beta=0.04, ref_logp=inp["ref_logp"])


@pytest.mark.parametrize("loss_type", ["dapo", "sapo"])
def test_banned_target(loss_type):
    """A target id whose logit is −inf: logp = −inf, r = 0; the loss stays finite (no KL term), as in torch."""
    inp = make_inputs(2, 4, 53, seed=4, masked_row=False)
    logits = inp["logits"].clone()
    logits[0, 2, inp["ids"][0, 2]] = float("-inf")
    loss, metrics, grad = _check(torch.float32, 1e-5, 1e-5, inp["ids"], logits, advantages=inp["advantages"],
                                 old_logp=inp["old_logp"], loss_type=loss_type)
    assert math.isfinite(float(loss)) and bool(torch.isfinite(grad).all())


def test_nan_propagates():
    inp = make_inputs(2, 3, 53, seed=3, banned=False, masked_row=False)
    logits = inp["logits"].clone()
    logits[1, 2, 7] = float("nan")
    loss, _ = grpo_fast.grpo_loss(logits, inp["ids"], inp["advantages"], backend="cpu")
    assert math.isnan(float(loss))


# ---- autograd plumbing: inplace, grad_output, strides --------------------------------------------
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace(level, dtype, atol, rtol):
    inp = make_inputs(3, 5, 53, dtype, seed=21)
    kw = dict(advantages=inp["advantages"], old_logp=inp["old_logp"], completion_mask=inp["completion_mask"],
              importance_sampling_level=level, loss_type="grpo")
    # inplace=False leaves the logits untouched
    z = inp["logits"].clone().requires_grad_()
    before = z.detach().clone()
    loss, _ = grpo_fast.grpo_loss(z, inp["ids"], backend="cpu", **kw)
    loss.backward()
    assert torch.equal(z.detach(), before)
    # inplace=True: the same gradient, and the logits' storage now holds it
    z2 = inp["logits"].clone().requires_grad_()
    loss2, _ = grpo_fast.grpo_loss(z2, inp["ids"], backend="cpu", inplace=True, **kw)
    loss2.backward()
    assert torch.equal(loss2, loss)
    assert torch.equal(z2.grad, z.grad)
    assert torch.equal(z2.detach(), z.grad)
    _check(dtype, atol, rtol, inp["ids"], inp["logits"], inplace=True, **kw)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_grad_output(dtype, atol, rtol):
    inp = make_inputs(3, 5, 53, dtype, seed=22)
    _check(dtype, atol, rtol, inp["ids"], inp["logits"], grad_scale=3.5, advantages=inp["advantages"],
           old_logp=inp["old_logp"], completion_mask=inp["completion_mask"], loss_type="bnpo")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_strided_logits(inplace, dtype, atol, rtol):
    """logits = a slice along T of a bigger tensor (as model(...).logits[:, p-1:-1]): read in place, no copy."""
    B, T, V, P = 3, 5, 53, 4
    inp = make_inputs(B, T, V, dtype, seed=24)
    big = make_inputs(B, T + P, V, dtype, seed=23)["logits"]
    big[:, P - 1:-1] = inp["logits"]  # (its banned entries avoid the target ids)
    kw = dict(advantages=inp["advantages"], old_logp=inp["old_logp"], completion_mask=inp["completion_mask"],
              loss_type="dapo", beta=0.04, ref_logp=inp["ref_logp"])
    leaf = big.clone().requires_grad_()
    z = leaf[:, P - 1:-1]
    assert not z.is_contiguous()
    zc = z.detach().clone()
    if inplace:  # a strided view of a bigger buffer: the gradient must land in that buffer (no copy)
        buf = big.clone()
        z = buf[:, P - 1:-1].requires_grad_()
        assert not z.is_contiguous()
    loss, metrics = grpo_fast.grpo_loss(z, inp["ids"], backend="cpu", inplace=inplace, **kw)
    loss.backward()
    if inplace:
        grad = buf[:, P - 1:-1]
        assert torch.equal(grad, z.grad)
        assert torch.equal(buf[:, : P - 1], big[:, : P - 1]) and torch.equal(buf[:, -1], big[:, -1])
    else:  # rows outside the slice get no gradient
        grad = leaf.grad[:, P - 1:-1]
        assert bool((leaf.grad[:, : P - 1] == 0).all()) and bool((leaf.grad[:, -1] == 0).all())
    loss_o, metrics_o, grad_o = run_oracle(zc, inp["ids"], **kw)
    assert math.isfinite(float(loss_o)) and bool(torch.isfinite(grad_o).all()), "non-finite oracle: bad test inputs"
    if dtype == torch.float32:
        assert_close(loss, loss_o, 1e-6, rtol, "loss")
        assert_close_scaled(grad, grad_o, rtol, "grad")
    else:
        loss_t, _, grad_t = run_backend(zc, inp["ids"], "torch", **kw)
        assert_error_within(loss, loss_t, loss_o, atol, rtol, "loss")
        assert_error_within(grad, grad_t, grad_o, atol, rtol, "grad")


def test_no_grad_needed():
    """Logits that do not require grad: the kernel writes no gradient, the loss is still right."""
    inp = make_inputs(3, 4, 53, seed=25)
    loss, _ = grpo_fast.grpo_loss(inp["logits"], inp["ids"], inp["advantages"], old_logp=inp["old_logp"], backend="cpu")
    loss_o, _, _ = run_oracle(inp["logits"], inp["ids"], advantages=inp["advantages"], old_logp=inp["old_logp"])
    assert_close(loss, loss_o, 1e-6, 1e-5, "loss")


# ---- token_logprobs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("V", [1, 53, 32001])
def test_token_logprobs(V, dtype, atol, rtol):
    inp = make_inputs(2, 5, V, dtype, seed=V, banned=V > 2)
    big = torch.cat([inp["logits"], inp["logits"][:, :2]], dim=1)[:, :5]  # strided over B
    for logits in (inp["logits"], big):
        logp, ent = grpo_fast.token_logprobs(logits, inp["ids"], 0.8, return_entropy=True, backend="cpu")
        logp_only = grpo_fast.token_logprobs(logits, inp["ids"], 0.8, backend="cpu")
        assert torch.equal(logp, logp_only)
        assert bool((logp <= 0).all()), "a log-probability above 0"
        if V == 1:
            assert bool((logp == 0).all()) and bool((ent == 0).all())
        logp_o, ent_o = token_logprobs_reference(logits.double(), inp["ids"], 0.8, return_entropy=True)
        if dtype == torch.float32:
            assert_close(logp, logp_o, atol, rtol, "logp")
            assert_close(ent, ent_o, atol, rtol, "entropy")
        else:
            logp_t, ent_t = token_logprobs_reference(logits, inp["ids"], 0.8, return_entropy=True)
            assert_error_within(logp, logp_t, logp_o, atol, rtol, "logp")
            assert_error_within(ent, ent_t, ent_o, atol, rtol, "entropy")


# ---- kernels' internals: exp, instruction sets, determinism ----------------------------------------
@pytest.fixture(params=_C.supported_isas() if cpu_backend.unavailable_reason() is None else ["none"])
def isa(request):
    prev = _C.set_isa(request.param)
    yield request.param
    _C.set_isa(prev)


def test_vexp(isa):
    x = torch.cat([
        torch.linspace(-87.3, 0.0, 100003),
        torch.linspace(-5.0, 88.0, 1001),
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, -87.33, -87.34, -88.0, -100.0, -1e4, -float("inf"), float("nan")]),
    ])
    y = torch.empty_like(x)
    _C.vexp(x.data_ptr(), y.data_ptr(), x.numel())
    want = torch.exp(x.double())
    finite = torch.isfinite(want) & (want > 1.2e-38)  # normal range; below it the kernel flushes to 0
    rel = ((y.double() - want).abs() / want)[finite]
    # measured 8.2e-8 on every path (libm expf: 6.1e-8); a wrong polynomial coefficient shows up here
    assert float(rel.max()) < 1.2e-7, f"{isa}: max relative error {float(rel.max()):.3g}"
    assert float(y[x == -float("inf")]) == 0.0 and float(y[x == -1e4]) == 0.0 and float(y[x == -100.0]) == 0.0
    assert math.isnan(float(y[-1]))
    assert float(y[x == 0.0][0]) == 1.0


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_every_isa(isa, level, dtype, atol, rtol):
    """Each instruction-set path (AVX-512, AVX2, portable) on a vocabulary with unrolled, single-vector and tail parts."""
    inp = make_inputs(3, 4, 16 * 5 + 7, dtype, seed=31)
    _check(dtype, atol, rtol, inp["ids"], inp["logits"], advantages=inp["advantages"], old_logp=inp["old_logp"],
           ref_logp=inp["ref_logp"], beta=0.04, completion_mask=inp["completion_mask"], importance_sampling_level=level,
           loss_type="grpo", temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_deterministic_across_threads(level, dtype):
    inp = make_inputs(8, 33, 301, dtype, seed=41)
    kw = dict(rewards=inp["rewards"], group_size=4, old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], beta=0.04,
              completion_mask=inp["completion_mask"], importance_sampling_level=level, loss_type="dapo")
    prev = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            loss, metrics, grad = run_backend(inp["logits"], inp["ids"], "cpu", **kw)
            logp = grpo_fast.token_logprobs(inp["logits"], inp["ids"], backend="cpu")
            out.append((loss, metrics, grad, logp))
    finally:
        torch.set_num_threads(prev)
    for loss, metrics, grad, logp in out[1:]:
        assert torch.equal(loss, out[0][0])
        assert all(torch.equal(metrics[k], out[0][1][k]) for k in metrics)
        assert torch.equal(grad, out[0][2])
        assert torch.equal(logp, out[0][3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_empty_grad_buffer_is_aligned_contiguous_and_usable(dtype):
    from grpo_fast.backends import cpu

    shape = (3, 7, 500_001)  # > 8 huge pages (16 MiB) in every dtype: the aligned, advised path
    g = cpu.empty_grad(shape, dtype)
    assert g.shape == shape and g.dtype == dtype and g.is_contiguous()
    if cpu._madvise is not None:
        assert g.data_ptr() % (2 << 20) == 0
    g.fill_(1.5)
    assert bool((g == 1.5).all())
    small = cpu.empty_grad((2, 3, 5), dtype)  # small buffers: plain torch.empty
    assert small.shape == (2, 3, 5) and small.is_contiguous()
