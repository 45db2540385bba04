"""TRL's entropy bonus in the fused loss (issue 13): ``entropy_coef`` c gives
loss = policy loss − c·Σ m·H / Σ m, with −c·∂H/∂z written in the same gradient pass of every backend.

Every backend (the ``backend`` fixture: torch, cpu, triton under the interpreter, cuda-emulated) against
the float64 reference with the option on: values, metrics and gradients, both importance-sampling
levels, odd vocabularies, −inf logits, a fully masked row, temperature ≠ 1, bf16; the temperature-
tensor, packed-row and fused-linear paths (chunks, the sequence-level pre-pass, softcap); the option
off bitwise unchanged and the option on visibly changing the gradient; bad values named.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import grpo_fast
from grpo_fast.reference import grpo_loss_reference
from helpers import assert_close, assert_close_scaled, run_backend, run_oracle
from test_backends import case, check, thin
from test_fused_linear import CPU_BACKENDS, _assert_fp32, _case, _side_kwargs
from test_packed import LENS, _batch, _run

_HERE = SimpleNamespace(put=lambda x: x)  # test_backends.case's backend argument: CPU tensors as they are
COEF = 0.3  # large enough that the entropy term moves the loss and the gradient well past the tolerances


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "luspo"])
def test_every_backend(backend, loss_type, level):
    """Ragged mask with a fully masked row, −inf logits, KL on, τ = 0.8, against the float64 oracle."""
    thin(backend, loss_type in ("dapo", "grpo"), "dapo and grpo")
    z, y, kw = case(backend, V=37, seed=3, adv="group" if loss_type != "luspo" else "rows")
    extra = dict(epsilon_high=1.1) if loss_type == "cispo" else {}
    check(backend, z, y, loss_type=loss_type, importance_sampling_level=level, temperature=0.8,
          entropy_coef=COEF, **kw, **extra)


ODD = [  # (B, T, V, dtype)
    pytest.param(2, 3, 1, torch.float32, id="V1"),
    pytest.param(3, 2, 17, torch.float32, id="V17"),
    pytest.param(2, 3, 53, torch.bfloat16, id="bf16-V53"),
    pytest.param(2, 3, 4099, torch.float16, id="fp16-V4099"),
]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("B,T,V,dtype", ODD)
def test_odd_shapes(backend, B, T, V, dtype, level):
    thin(backend, V in (17, 4099), "V17 and fp16-V4099")
    z, y, kw = case(backend, B=B, T=T, V=V, dtype=dtype, seed=5, masked_row=B > 2)
    check(backend, z, y, loss_type="bnpo", importance_sampling_level=level, entropy_coef=-0.7, **kw)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_loss_scale_num_items(backend, level):
    """inplace=True and loss_scale (folded into w_H too), with dapo's num_items_in_batch, which the entropy
    term does not read (TRL: the bonus is the mean over this call's valid tokens)."""
    z, y, kw = case(backend, seed=9, adv="tokens", isr="tokens")
    kw = dict(kw, loss_type="dapo", importance_sampling_level=level, num_items_in_batch=57, entropy_coef=COEF)
    want, _, grad_o = run_oracle(z, y, **kw)
    zz = z.detach().clone().requires_grad_()
    loss, _ = grpo_fast.grpo_loss(zz * 1, y, backend=backend.name, inplace=True, loss_scale=0.25, **kw)
    (loss * 0.25).backward()
    assert_close(loss, want, 1e-6, 1e-5, "loss")
    assert_close_scaled(zz.grad, grad_o * 0.25, 1e-5, "grad")


def test_the_term_is_trl_mean_entropy():
    """loss(c) − loss(0) = −c·Σ m·H / Σ m exactly (the reference's entropy metric is that mean), and the
    gradient differs: the option is not silently ignored."""
    z, y, kw = case(_HERE, seed=4)
    kw = dict(kw, loss_type="dapo", num_items_in_batch=200)
    zd = z.double()
    l0, m0 = grpo_loss_reference(zd, y, **kw)
    l1, _ = grpo_loss_reference(zd, y, entropy_coef=COEF, **kw)
    assert abs(float(l1 - l0) + COEF * float(m0["entropy"])) < 1e-6
    for name in ("cpu", "torch"):
        g0 = run_backend(z, y, name, **kw)[2]
        g1 = run_backend(z, y, name, entropy_coef=COEF, **kw)[2]
        assert float((g1 - g0).abs().max()) > 1e-3 * float(g0.abs().max()), name


@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_off_is_bitwise_unchanged(name):
    """entropy_coef=0 (the default) runs the kernels without the term: the same bits as not passing it."""
    z, y, kw = case(_HERE, seed=6)
    for level in ("token", "sequence"):
        a = run_backend(z, y, name, importance_sampling_level=level, **kw)
        b = run_backend(z, y, name, importance_sampling_level=level, entropy_coef=0.0, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_and_temperature_tensor(backend, level):
    """Packed rows (cu_seqlens) and a (B, T) temperature tensor: the reference on the padded batch."""
    thin(backend, level == "token", "token level")
    padded, packed, (row, col) = _batch(seed=2, adv="rewards", isr="rows")
    opts = dict(loss_type="grpo", importance_sampling_level=level, beta=0.04, group_size=2, entropy_coef=COEF)
    ref_kw = {k: v for k, v in padded.items() if k != "logits"}
    zd = padded["logits"].double().requires_grad_(True)
    want, want_m = grpo_loss_reference(zd, **ref_kw, **opts)
    want.backward()
    loss, m, grad = _run(backend.put(packed), backend.name, **opts)
    assert_close(loss.cpu(), want.detach(), 1e-5 * max(abs(float(want.detach())), 1e-3), 1e-5, "packed loss")
    assert_close_scaled(grad.cpu(), zd.grad[row, col], 1e-5, "packed grad")

    S, T = len(LENS), max(LENS)
    tau = torch.rand(S, T, generator=torch.Generator().manual_seed(1)) + 0.5
    zd = padded["logits"].double().requires_grad_(True)
    want, _ = grpo_loss_reference(zd / tau[..., None].double(), **ref_kw, **opts)
    want.backward()
    loss, m, grad = _run(backend.put(padded), backend.name, temperature=backend.put(tau), **opts)
    assert_close(loss.cpu(), want.detach(), 1e-5 * max(abs(float(want.detach())), 1e-3), 1e-5, "tau loss")
    assert_close_scaled(grad.cpu()[row, col], zd.grad[row, col], 1e-5, "tau grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear(backend, level):
    """fused_linear_grpo_loss: chunks that split rows (and, at sequence level, the log-prob pre-pass with
    the entropy gradient in its backward kernel), rows-path chunks, a softcap."""
    for seed, (chunk, softcap) in enumerate([(5, None), (14, 2.5), (None, 4.0)]):
        h, w, b, ids, mask, side = _case(seed=seed)
        kw = _side_kwargs(side, mask, loss_type="dapo", level=level, temperature=0.8, entropy_coef=COEF)
        _assert_fp32(backend, h, w, b, ids, scale=0.7, softcap=softcap, chunk_size=chunk, **kw)


@pytest.mark.parametrize("value,err", [(float("nan"), ValueError), (float("inf"), ValueError), (1e39, ValueError),
                                       (True, TypeError), ("0.1", TypeError)])
def test_bad_values_are_named(value, err):
    z = torch.randn(2, 3, 5, requires_grad=True)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(err, match="entropy_coef"):
        grpo_fast.grpo_loss(z, y, torch.ones(2), entropy_coef=value, backend="cpu")
    assert z.grad is None


def _compiled_bonus_step(z, y, adv, old, mask, coef, n_items, backend, loss_type):
    return grpo_fast.grpo_loss(z, y, adv, old_logp=old, completion_mask=mask, entropy_coef=coef,
                               num_items_in_batch=n_items, loss_type=loss_type, temperature=0.8, backend=backend)


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_torch_compile_fullgraph_equals_eager(backend_name, loss_type):
    """Under torch.compile(fullgraph=True) the bonus's weights reach the fused kernel (the custom op's
    entropy_weight): loss, metrics and gradient equal eager's, for a coefficient and a num_items_in_batch
    that change between calls (symbolic: one recompile, not one per value). backend="torch" under compile
    rescales dapo's loss to num_items_in_batch after the reference: the bonus (a mean over this call's
    tokens) must not be rescaled with it. A bad coefficient is still named, at run time."""
    if backend_name == "cpu" and grpo_fast.backends.unavailable_reason("cpu", torch.device("cpu")):
        pytest.skip("the CPU extension is not built")
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    g = torch.Generator().manual_seed(11)
    z0 = torch.randn(3, 5, 11, generator=g) * 2
    y = torch.randint(0, 11, (3, 5), generator=g)
    adv, old = torch.randn(3, generator=g), torch.randn(3, 5, generator=g) * 0.1 - 2.0
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    torch._dynamo.reset()
    compiled = torch.compile(_compiled_bonus_step, fullgraph=True, backend="aot_eager")
    for coef, n_items in ((COEF, None), (0.05, 40), (-0.2, 17)):
        got, want = [], []
        for fn, out in ((compiled, got), (_compiled_bonus_step, want)):
            z = z0.clone().requires_grad_()
            loss, metrics = fn(z, y, adv, old, mask, coef, n_items, backend_name, loss_type)
            loss.backward()
            out.extend([loss.detach(), metrics, z.grad])
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7, msg=lambda m: f"c={coef} loss: {m}")
        assert sorted(got[1]) == sorted(want[1])
        for k in want[1]:
            torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-7, msg=lambda m: f"c={coef} grad: {m}")
    off = _compiled_bonus_step(z0.clone(), y, adv, old, mask, 0.0, 17, backend_name, loss_type)[0]
    assert float((want[0] - off).abs()) > 1e-3  # the bonus moved the loss
    assert len(_debug_get_cache_entry_list(_compiled_bonus_step.__code__)) <= 3  # not one graph per value
    for bad, err in ((float("nan"), "entropy_coef must be finite"), (1e39, "entropy_coef must be finite as a float32")):
        z = z0.clone().requires_grad_()
        with pytest.raises(ValueError, match=err):
            compiled(z, y, adv, old, mask, bad, None, backend_name, loss_type)
        assert z.grad is None


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_nan_in_a_masked_row_does_not_reach_the_bonus(backend, level):
    """A fully masked row holding NaN: its entropy is not read (w_H = 0 there), the loss stays finite and
    its gradient row is exactly 0, as without the bonus."""
    z, y, kw = case(backend, seed=8)  # row 1 is fully masked
    z = z.clone()
    z[1, 2, 5] = float("nan")
    loss, _, grad = run_backend(z, y, backend.name, importance_sampling_level=level, entropy_coef=COEF, **kw)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    assert bool((grad[1] == 0).all())
