"""torch.compile(fullgraph=True) of the paths whose small tensors are shaped by data: packed rows
(cu_seqlens), temperature tensors and the vocabulary split (group), for grpo_loss and grpo_fast.logprobs
(grpo_fast/_ops.py). Compiled equals eager: loss, metrics, per-token values and gradients; bad input
still raises eager's named error, at run time. The vocab split runs under torchrun with 2 gloo ranks
(``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_compile_paths.py OUT``),
each rank comparing compiled with eager on its own shard (eager's split is checked against one
process in tests/test_vocab_parallel.py), with plain shards and group=, and with DTensor inputs. Small shapes, aot_eager (the ops are opaque: inductor sees
the same graph around them; one inductor case), each compiled function reused across its cases.
"""
import os
import sys

import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BACKENDS = [b for b in ("torch", "cpu") if unavailable_reason(b, torch.device("cpu")) is None]
S_LENS = [3, 5, 2, 4]  # 4 sequences packed into N = 14 rows
N, V = sum(S_LENS), 13
CU = torch.tensor([0, 3, 8, 10, 14])


def _packed_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * 2
    ids = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(z, -1).gather(-1, ids[:, None])[:, 0]
    old = lp + 0.3 * torch.randn(N, generator=g)
    mask = torch.ones(N)
    mask[[4, 11]] = 0
    return dict(z=z, ids=ids, rewards=torch.rand(4, generator=g), old=old, mask=mask,
                tau_seq=torch.rand(4, generator=g) + 0.5, tau_tok=torch.rand(N, generator=g) + 0.5,
                c_lp=torch.randn(N, generator=g), c_ent=torch.randn(N, generator=g))


def _loss_step(z, ids, rewards, old, mask, cu, tau, backend, level, loss_type):
    return grpo_fast.grpo_loss(z, ids, rewards=rewards, group_size=2, old_logp=old, completion_mask=mask, cu_seqlens=cu,
                               temperature=tau, importance_sampling_level=level, loss_type=loss_type, beta=0.0,
                               backend=backend)


def _run(fn, z0, *args):
    z = z0.clone().requires_grad_()
    loss, metrics = fn(z, *args)
    loss.backward()
    return loss.detach(), metrics, z.grad


def _assert_same(got, want, what):
    loss_c, met_c, g_c = got
    loss_e, met_e, g_e = want
    assert sorted(met_c) == sorted(met_e), what
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} loss: {m}")
    for k in met_e:
        torch.testing.assert_close(met_c[k], met_e[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {k}: {m}")
    assert float(g_e.abs().max()) > 0
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what} gradient: {m}")


# (packed?, temperature, level, loss_type): token and sequence level on packed rows, a temperature
# tensor per sequence / per token, on packed rows and on a padded batch
CASES = [
    ("packed", 0.8, "token", "dapo"),
    ("packed", 0.8, "sequence", "grpo"),
    ("packed", "tau_seq", "token", "dr_grpo"),
    ("packed", "tau_tok", "sequence", "dapo"),
    ("padded", "tau_seq", "token", "grpo"),
    ("padded", "tau_tok", "token", "bnpo"),
]


def _case_args(x, layout, tau, level, loss_type, backend):
    if layout == "packed":
        z, ids, old, mask, cu = x["z"], x["ids"], x["old"], x["mask"], CU
        t = x[tau] if isinstance(tau, str) else tau
    else:  # the same tokens as a padded (4, 5) batch: the packed rows at their places, zeros elsewhere
        T = max(S_LENS)
        row = torch.repeat_interleave(torch.arange(4), torch.tensor(S_LENS))
        col = torch.arange(N) - CU[:-1][row]

        def pad(v, fill=0.0):
            out = torch.full((4, T) + tuple(v.shape[1:]), fill, dtype=v.dtype)
            out[row, col] = v
            return out

        z, ids, old, mask, cu = pad(x["z"]), pad(x["ids"], 0), pad(x["old"]), pad(x["mask"]), None
        t = x[tau] if tau == "tau_seq" else pad(x["tau_tok"], 1.0)
    return z, (ids, x["rewards"], old, mask, cu, t, backend, level, loss_type)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_packed_and_temperature_tensor_compile_fullgraph(backend):
    x = _packed_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(_loss_step, fullgraph=True, backend="aot_eager")
    for layout, tau, level, loss_type in CASES:
        z, args = _case_args(x, layout, tau, level, loss_type, backend)
        _assert_same(_run(compiled, z, *args), _run(_loss_step, z, *args), (layout, tau, level, loss_type))


def test_grpo_loss_packed_under_inductor():
    x = _packed_inputs(1)
    torch._dynamo.reset()
    compiled = torch.compile(_loss_step, fullgraph=True, backend="inductor")
    z, args = _case_args(x, "packed", "tau_seq", "sequence", "grpo", BACKENDS[-1])
    _assert_same(_run(compiled, z, *args), _run(_loss_step, z, *args), "inductor")


def _eps_step(z, ids, rewards, old, mask, eps, tau, backend):
    return grpo_fast.grpo_loss(z, ids, rewards=rewards, group_size=2, old_logp=old, completion_mask=mask, cu_seqlens=CU,
                               epsilon_low=eps, temperature=tau, backend=backend)


def test_changing_numbers_compile_once_more():
    """The options reach the ops inside a tensor: a number changing between calls is one recompile
    (dynamo makes it symbolic), not one per value, and every value equals eager (the loss options on
    packed rows; logit_scale, logit_softcap and chunk_size on the fused-linear forms)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    x = _packed_inputs(6)
    torch._dynamo.reset()
    compiled = torch.compile(_eps_step, fullgraph=True, backend="aot_eager")
    for eps, tau in [(0.2, 1.0), (0.05, 0.8), (0.3, 1.3), (0.1, 0.6)]:
        args = (x["ids"], x["rewards"], x["old"], x["mask"], eps, tau, BACKENDS[-1])
        _assert_same(_run(compiled, x["z"], *args), _run(_eps_step, x["z"], *args), (eps, tau))
    assert len(_debug_get_cache_entry_list(_eps_step.__code__)) == 2
    # logit_scale / logit_softcap / chunk_size of the fused-linear forms too (a tensor as well)
    lin = _linear_inputs()
    hw = (lin["hidden"], lin["weight"], lin["bias"])
    compiled = torch.compile(_scale_step, fullgraph=True, backend="aot_eager")
    for scale, cap, chunk in [(1.0, 4.0, 4), (0.5, 3.0, 5), (0.25, 6.0, 3), (2.0, 5.0, 6)]:
        args = (x["ids"], scale, cap, chunk, BACKENDS[-1], x["c_lp"], x["c_ent"])
        _assert_same_linear(_run_linear(compiled, *hw, *args), _run_linear(_scale_step, *hw, *args), (scale, cap, chunk))
    assert len(_debug_get_cache_entry_list(_scale_step.__code__)) == 2


def _scale_step(h, w, b, ids, scale, cap, chunk, backend, c_lp, c_ent):
    lp, ent = grpo_fast.fused_linear_logprobs(h, w, ids, bias=b, logit_scale=scale, logit_softcap=cap, chunk_size=chunk,
                                              return_entropy=True, backend=backend)
    loss, metrics = grpo_fast.fused_linear_grpo_loss(h.view(2, -1, H), w, ids.view(2, -1), bias=b, advantages=c_lp[:2],
                                                     logit_scale=scale, logit_softcap=cap, chunk_size=chunk,
                                                     backend=backend)
    return loss + (c_lp * lp).sum() + (c_ent * ent).sum(), metrics


def _logprobs_step(z, ids, tau, cu, backend, return_entropy, c_lp, c_ent):
    lp, ent = grpo_fast.logprobs(z, ids, temperature=tau, return_entropy=return_entropy, cu_seqlens=cu,
                                 backend=backend)
    loss = (c_lp * lp).sum() + ((c_ent * ent).sum() if return_entropy else 0.0)
    return loss, {"logp": lp.detach(), **({"entropy": ent.detach()} if return_entropy else {})}


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_compile_fullgraph(backend):
    """The log-prob primitive compiles with fullgraph=True (before: a data-dependent check broke the
    graph): a float τ, a τ tensor per token, packed rows with a τ per sequence, (B, T, V) logits."""
    x = _packed_inputs(2)
    torch._dynamo.reset()
    compiled = torch.compile(_logprobs_step, fullgraph=True, backend="aot_eager")
    z3 = x["z"][:12].reshape(3, 4, V)
    cases = [
        (x["z"], x["ids"], 0.7, None, True, x["c_lp"], x["c_ent"]),
        (x["z"], x["ids"], x["tau_tok"], None, True, x["c_lp"], x["c_ent"]),
        (x["z"], x["ids"], x["tau_seq"], CU, True, x["c_lp"], x["c_ent"]),
        (x["z"], x["ids"], 1.3, None, False, x["c_lp"], x["c_ent"]),
        (z3, x["ids"][:12].reshape(3, 4), x["tau_tok"][:3], None, True, x["c_lp"][:12].reshape(3, 4),
         x["c_ent"][:12].reshape(3, 4)),
    ]
    for i, (z, ids, tau, cu, ent, c_lp, c_ent) in enumerate(cases):
        args = (ids, tau, cu, backend, ent, c_lp, c_ent)
        _assert_same(_run(compiled, z, *args), _run(_logprobs_step, z, *args), f"case {i}")


def _masked_step(z, h, w, b, ids, mask, tau, cu, backend, c_lp, c_ent):
    lp, ent = grpo_fast.logprobs(z, ids, temperature=tau, return_entropy=True, mask=mask, cu_seqlens=cu,
                                 backend=backend)
    lp2, ent2 = grpo_fast.fused_linear_logprobs(h, w, ids, bias=b, temperature=tau, return_entropy=True, mask=mask,
                                                cu_seqlens=cu, chunk_size=4, backend=backend)
    loss = (c_lp * (lp + lp2)).sum() + (c_ent * (ent + ent2)).sum()
    return loss, {"logp": lp.detach(), "entropy": ent.detach(), "linear logp": lp2.detach(),
                  "linear entropy": ent2.detach()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_primitives_compile_fullgraph(backend):
    """mask= (valid rows only) under torch.compile: logprobs and fused_linear_logprobs compiled == eager
    (values and every gradient), a NaN in a masked row reaching nothing, bool and float masks, packed
    rows, a τ tensor; and the masked rows' outputs and gradient rows exactly 0."""
    x, lin = _packed_inputs(9), _linear_inputs()
    z, h = x["z"].clone(), lin["hidden"].clone()
    masked = [4, 11, 12]
    z[4, 2], h[11, 0] = float("nan"), float("nan")
    keep = torch.ones(N, dtype=torch.bool)
    keep[masked] = False
    torch._dynamo.reset()
    compiled = torch.compile(_masked_step, fullgraph=True, backend="aot_eager")
    cases = [(keep, 0.7, None), (keep.float(), x["tau_tok"], None), (keep, x["tau_seq"], CU),
             (torch.zeros(N), 0.9, None)]
    for i, (mask, tau, cu) in enumerate(cases):
        res = []
        for fn in (compiled, _masked_step):
            leaves = [t.clone().requires_grad_() for t in (z, h, lin["weight"], lin["bias"])]
            loss, metrics = fn(*leaves, x["ids"], mask, tau, cu, backend, x["c_lp"], x["c_ent"])
            loss.backward()
            res.append((loss.detach(), metrics, [t.grad for t in leaves]))
        (loss_c, met_c, g_c), (loss_e, met_e, g_e) = res
        assert bool(torch.isfinite(loss_c)), i
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6, msg=lambda m: f"case {i} loss: {m}")
        for k in met_e:
            torch.testing.assert_close(met_c[k], met_e[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"case {i} {k}: {m}")
            assert bool((met_c[k][mask == 0] == 0).all()), (i, k)
        for name, a, b, t in zip(("d logits", "d hidden", "d weight", "d bias"), g_c, g_e, (z, h, lin["weight"],
                                                                                          lin["bias"])):
            # no token with a gradient (every one masked): eager leaves the head's gradient None, the op zeros
            a, b = (torch.zeros_like(t) if g is None else g for g in (a, b))
            assert bool(torch.isfinite(a).all()), (i, name)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"case {i} {name}: {m}")
        assert bool((g_c[0][mask == 0] == 0).all()) and bool((g_c[1][mask == 0] == 0).all()), i


def test_bad_input_under_compile_raises_eagers_error():
    x = _packed_inputs()
    backend = BACKENDS[-1]
    torch._dynamo.reset()
    loss_fn = torch.compile(_loss_step, fullgraph=True, backend="aot_eager")
    lp_fn = torch.compile(_logprobs_step, fullgraph=True, backend="aot_eager")
    z, args = _case_args(x, "packed", "tau_seq", "token", "dapo", backend)
    _run(loss_fn, z, *args)  # compiled once with good input
    bad_cu = torch.tensor([0, 3, 8, 10, 13])
    bad_tau = x["tau_seq"].clone()
    bad_tau[2] = 0.0
    bad_ids = x["ids"].clone()
    bad_ids[5] = V
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of packed tokens N = 14"):
        loss_fn(z, x["ids"], x["rewards"], x["old"], x["mask"], bad_cu, x["tau_seq"], backend, "token", "dapo")
    with pytest.raises(ValueError, match="temperature must be finite and > 0 everywhere"):
        loss_fn(z, x["ids"], x["rewards"], x["old"], x["mask"], CU, bad_tau, backend, "token", "dapo")
    with pytest.raises(ValueError, match=r"completion_ids must lie in \[0, V\)"):
        loss_fn(z, bad_ids, x["rewards"], x["old"], x["mask"], CU, x["tau_seq"], backend, "token", "dapo")
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of packed tokens N = 14"):
        lp_fn(z, x["ids"], x["tau_seq"], bad_cu, backend, True, x["c_lp"], x["c_ent"])
    with pytest.raises(ValueError, match="temperature must be finite and > 0 everywhere"):
        lp_fn(z, x["ids"], bad_tau, CU, backend, True, x["c_lp"], x["c_ent"])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, V\)|ids must lie in \[0, 13\)"):
        lp_fn(z, bad_ids, 0.7, None, backend, True, x["c_lp"], x["c_ent"])


# ---- the fused-linear forms: hidden states and the LM head

H = 6


def _linear_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(N, H, generator=g), weight=torch.randn(V, H, generator=g) * 0.5,
                bias=torch.randn(V, generator=g) * 0.1)


def _run_linear(fn, h0, w0, b0, *args):
    h, w, b = (t.clone().requires_grad_() for t in (h0, w0, b0))
    loss, metrics = fn(h, w, b, *args)
    loss.backward()
    return loss.detach(), metrics, (h.grad, w.grad, b.grad)


def _assert_same_linear(got, want, what):
    for name, g_c, g_e in zip(("d hidden", "d weight", "d bias"), got[2], want[2]):
        _assert_same((got[0], got[1], g_c), (want[0], want[1], g_e), f"{what} {name}")


def _linear_loss_step(h, w, b, ids, rewards, old, mask, cu, tau, backend, level):
    return grpo_fast.fused_linear_grpo_loss(h, w, ids, bias=b, rewards=rewards, group_size=2, old_logp=old,
                                            completion_mask=mask, cu_seqlens=cu, temperature=tau, logit_softcap=4.0,
                                            importance_sampling_level=level, loss_type="grpo", chunk_size=4,
                                            backend=backend)


def _linear_logprobs_step(h, w, b, ids, tau, cu, backend, c_lp, c_ent):
    lp, ent = grpo_fast.fused_linear_logprobs(h, w, ids, bias=b, temperature=tau, cu_seqlens=cu, logit_scale=0.5,
                                              return_entropy=True, chunk_size=4, backend=backend)
    return (c_lp * lp).sum() + (c_ent * ent).sum(), {"logp": lp.detach(), "entropy": ent.detach()}


def test_fused_linear_forms_compile_fullgraph():
    """fused_linear_grpo_loss (padded and packed, float τ and τ tensors, both levels) and
    fused_linear_logprobs (float τ, τ per token, packed rows with τ per sequence) compiled == eager
    (before: neither compiled with fullgraph=True). One backend: the ops run eager's chunk loops,
    whichever kernels they call."""
    backend = BACKENDS[-1]
    x, lin = _packed_inputs(5), _linear_inputs()
    hw = (lin["hidden"], lin["weight"], lin["bias"])
    # a padded batch: 4 rows of 3 tokens (the first 12 packed tokens)
    h4, ids4, old4, mask4 = (x_[:12].reshape(4, 3, *x_.shape[1:]) for x_ in (lin["hidden"], x["ids"], x["old"], x["mask"]))
    h3, ids3 = lin["hidden"][:12].reshape(3, 4, H), x["ids"][:12].reshape(3, 4)
    torch._dynamo.reset()
    loss_fn = torch.compile(_linear_loss_step, fullgraph=True, backend="aot_eager")
    lp_fn = torch.compile(_linear_logprobs_step, fullgraph=True, backend="aot_eager")
    loss_cases = [
        (hw, (x["ids"], x["rewards"], x["old"], x["mask"], CU, 0.8, backend, "token")),
        (hw, (x["ids"], x["rewards"], x["old"], x["mask"], CU, 0.8, backend, "sequence")),
        ((h4,) + hw[1:], (ids4, x["rewards"], old4, mask4, None, x["tau_tok"][:12].reshape(4, 3), backend, "token")),
        ((h4,) + hw[1:], (ids4, x["rewards"], old4, mask4, None, 1.1, backend, "sequence")),
    ]
    for i, (tensors, args) in enumerate(loss_cases):
        _assert_same_linear(_run_linear(loss_fn, *tensors, *args), _run_linear(_linear_loss_step, *tensors, *args),
                            f"fused_linear_grpo_loss case {i}")
    lp_cases = [
        (hw, (x["ids"], 0.7, None, backend, x["c_lp"], x["c_ent"])),
        (hw, (x["ids"], x["tau_tok"], None, backend, x["c_lp"], x["c_ent"])),
        (hw, (x["ids"], x["tau_seq"], CU, backend, x["c_lp"], x["c_ent"])),
        ((h3,) + hw[1:], (ids3, x["tau_tok"][:3], None, backend, x["c_lp"][:12].reshape(3, 4),
                          x["c_ent"][:12].reshape(3, 4))),
    ]
    for i, (tensors, args) in enumerate(lp_cases):
        _assert_same_linear(_run_linear(lp_fn, *tensors, *args), _run_linear(_linear_logprobs_step, *tensors, *args),
                            f"fused_linear_logprobs case {i}")


def _no_grad_step(z, h, w, b, ids, tau, backend, mask=None):
    return (grpo_fast.token_logprobs(z, ids, tau, return_entropy=True, backend=backend, mask=mask)
            + grpo_fast.fused_linear_token_logprobs(h, w, ids, bias=b, temperature=tau, logit_softcap=3.0,
                                                    return_entropy=True, chunk_size=5, backend=backend, mask=mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_logprob_helpers_compile_fullgraph(backend):
    """token_logprobs and fused_linear_token_logprobs (the old / reference log-probs) through the
    primitives' forward ops: compiled == eager, a float τ and a τ per row, with and without a mask."""
    x, lin = _packed_inputs(7), _linear_inputs()
    z, ids = x["z"][:12].reshape(3, 4, V), x["ids"][:12].reshape(3, 4)
    h = lin["hidden"][:12].reshape(3, 4, H)
    mask = x["mask"][:12].reshape(3, 4).clone()
    mask[2, 1:] = 0
    torch._dynamo.reset()
    compiled = torch.compile(_no_grad_step, fullgraph=True, backend="aot_eager")
    for tau, m in ((0.7, None), (x["tau_seq"][:3], None), (0.7, mask), (x["tau_seq"][:3], mask.bool())):
        args = (z.clone().requires_grad_(), h.clone().requires_grad_(), lin["weight"], lin["bias"], ids, tau, backend, m)
        for got, want, name in zip(compiled(*args), _no_grad_step(*args), ("logp", "entropy", "linear logp",
                                                                             "linear entropy")):
            assert not got.requires_grad  # no graph: these are constants of the loss
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---- the vocabulary split: 2 gloo ranks, compiled vs eager on each rank

SPLIT = 7  # rank 0: [0, 7), rank 1: [7, 13)


def _split_cases(x, shard, group, backend):
    """name -> (fn, z (this rank's shard), args): the compiled and the eager function take the same."""
    B, T = 2, 7
    z3 = x["z"].reshape(B, T, V)[..., shard]
    ids3, old3, mask3 = x["ids"].reshape(B, T), x["old"].reshape(B, T), x["mask"].reshape(B, T)
    return {
        "logprobs": (_split_logprobs, x["z"][:, shard], (x["ids"], x["tau_tok"], x["c_lp"], x["c_ent"], backend, group)),
        "logprobs_float_tau": (_split_logprobs, x["z"][:, shard], (x["ids"], 0.8, x["c_lp"], x["c_ent"], backend, group)),
        "logprobs_masked": (_split_logprobs, x["z"][:, shard], (x["ids"], 0.8, x["c_lp"], x["c_ent"], backend, group,
                                                                 x["mask"])),
        "grpo_loss": (_split_loss, z3, (ids3, x["rewards"][:2], old3, mask3, 0.9, backend, group, "token")),
        "grpo_loss_seq_tau": (_split_loss, z3, (ids3, x["rewards"][:2], old3, mask3, x["tau_seq"][:2], backend, group,
                                                "sequence")),
    }


def _split_linear_cases(x, lin, shard, group, backend):
    B, T = 2, 7
    h3, ids3, old3, mask3 = (t.reshape(B, T, *t.shape[1:]) for t in (lin["hidden"], x["ids"], x["old"], x["mask"]))
    w, b = lin["weight"][shard], lin["bias"][shard]
    return {
        "fused_linear_logprobs": (_split_linear_logprobs, (lin["hidden"], w, b),
                                  (x["ids"], x["tau_tok"], x["c_lp"], x["c_ent"], backend, group)),
        "fused_linear_logprobs_masked": (_split_linear_logprobs, (lin["hidden"], w, b),
                                         (x["ids"], 0.8, x["c_lp"], x["c_ent"], backend, group, x["mask"])),
        "fused_linear_grpo_loss": (_split_linear_loss, (h3, w, b), (ids3, x["rewards"][:2], old3, mask3, backend, group)),
    }


def _split_linear_logprobs(h, w, b, ids, tau, c_lp, c_ent, backend, group, mask=None):
    lp, ent = grpo_fast.fused_linear_logprobs(h, w, ids, bias=b, temperature=tau, return_entropy=True, chunk_size=4,
                                              backend=backend, group=group, mask=mask)
    return (c_lp * lp).sum() + (c_ent * ent).sum(), {"logp": lp.detach(), "entropy": ent.detach()}


def _split_linear_loss(h, w, b, ids, rewards, old, mask, backend, group):
    return grpo_fast.fused_linear_grpo_loss(h, w, ids, bias=b, rewards=rewards, group_size=2, old_logp=old,
                                            completion_mask=mask, temperature=0.9, chunk_size=4, backend=backend,
                                            group=group)


def _split_logprobs(z, ids, tau, c_lp, c_ent, backend, group, mask=None):
    lp, ent = grpo_fast.logprobs(z, ids, temperature=tau, return_entropy=True, backend=backend, group=group, mask=mask)
    return (c_lp * lp).sum() + (c_ent * ent).sum(), {"logp": lp.detach(), "entropy": ent.detach()}


def _split_loss(z, ids, rewards, old, mask, tau, backend, group, level):
    return grpo_fast.grpo_loss(z, ids, rewards=rewards, group_size=2, old_logp=old, completion_mask=mask, temperature=tau,
                               importance_sampling_level=level, loss_type="grpo", backend=backend, group=group)


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group([0, 1])
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, V)
    x = _packed_inputs(3)
    res = {}
    compiled = {}
    # the kernel backend (backend="torch" takes the same ops with its eager kernels; the cases above test it)
    for name, (fn, z, args) in _split_cases(x, shard, group, BACKENDS[-1]).items():
        if fn not in compiled:
            compiled[fn] = torch.compile(fn, fullgraph=True, backend="aot_eager")
        res[name] = (_run(compiled[fn], z, *args), _run(fn, z, *args))
    for name, (fn, tensors, args) in _split_linear_cases(x, _linear_inputs(), shard, group, BACKENDS[-1]).items():
        res[name] = (_run_linear(torch.compile(fn, fullgraph=True, backend="aot_eager"), *tensors, *args),
                     _run_linear(fn, *tensors, *args))
    res.update(_dtensor_cases(x, _linear_inputs(), BACKENDS[-1]))
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _local(t):
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


def _dtensor_cases(x, lin, backend):
    """DTensor inputs under torch.compile: logits placed Shard(-1), the LM head Shard(0), on a 1-D mesh of
    the 2 ranks, no group= (the mesh's); compiled == eager, and each gradient a DTensor of its placement."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    B, T = 2, 7
    ids3, old3, mask3 = x["ids"].reshape(B, T), x["old"].reshape(B, T), x["mask"].reshape(B, T)
    out = {}

    def run(fn, leaves, args):
        got = []
        for f in (torch.compile(fn, fullgraph=True, backend="aot_eager"), fn):
            ls = [distribute_tensor(t, mesh, [pl]).requires_grad_() for t, pl in leaves]
            loss, metrics = f(*ls, *args)
            loss.backward()
            for t, (_, pl) in zip(ls, leaves):
                assert isinstance(t.grad, DTensor) and tuple(t.grad.placements) == (pl,), fn.__name__
            got.append((loss.detach(), metrics, tuple(_local(t.grad) for t in ls)))
        return got

    def lp_step(z, ids, mask, c_lp, c_ent):
        lp, ent = grpo_fast.logprobs(z, ids, temperature=0.8, return_entropy=True, mask=mask, backend=backend)
        return (c_lp * lp).sum() + (c_ent * ent).sum(), {"logp": lp.detach(), "entropy": ent.detach()}

    def loss_step(z, ids, rewards, old, mask):
        return grpo_fast.grpo_loss(z, ids, rewards=rewards, group_size=2, old_logp=old, completion_mask=mask,
                                   temperature=0.9, loss_type="grpo", backend=backend)

    def linear_lp_step(w, b, h, ids, c_lp, c_ent):
        lp, ent = grpo_fast.fused_linear_logprobs(h, w, ids, bias=b, temperature=0.8, return_entropy=True,
                                                  chunk_size=4, backend=backend)
        return (c_lp * lp).sum() + (c_ent * ent).sum(), {"logp": lp.detach(), "entropy": ent.detach()}

    def linear_loss_step(w, b, h, ids, rewards, old, mask):
        return grpo_fast.fused_linear_grpo_loss(h, w, ids, bias=b, rewards=rewards, group_size=2, old_logp=old,
                                                completion_mask=mask, temperature=0.9, chunk_size=4, backend=backend)

    out["dtensor logprobs"] = run(lp_step, [(x["z"], Shard(1))], (x["ids"], x["mask"], x["c_lp"], x["c_ent"]))
    out["dtensor grpo_loss"] = run(loss_step, [(x["z"].reshape(B, T, V), Shard(2))],
                                   (ids3, x["rewards"][:2], old3, mask3))
    head = [(lin["weight"], Shard(0)), (lin["bias"], Shard(0))]
    out["dtensor fused_linear_logprobs"] = run(linear_lp_step, head, (lin["hidden"], x["ids"], x["c_lp"], x["c_ent"]))
    out["dtensor fused_linear_grpo_loss"] = run(linear_loss_step, head, (lin["hidden"].reshape(B, T, H), ids3,
                                                                         x["rewards"][:2], old3, mask3))
    return out


def test_vocab_split_compile_fullgraph_two_ranks(tmp_path):
    from test_ddp import run_two_processes

    run_two_processes(__file__, tmp_path)
    for rank in (0, 1):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(res) == 12
        for name, (got, want) in res.items():
            if name.startswith("dtensor"):
                for i, (g_c, g_e) in enumerate(zip(got[2], want[2])):
                    _assert_same((got[0], got[1], g_c), (want[0], want[1], g_e), f"rank {rank} {name} grad {i}")
                continue
            check = _assert_same_linear if name.startswith("fused_linear") else _assert_same
            check(got, want, f"rank {rank} {name}")


if __name__ == "__main__":
    worker(sys.argv[1])
