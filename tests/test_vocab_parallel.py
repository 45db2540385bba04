"""The vocabulary split across ranks (grpo_fast/vocab_parallel.py): 2 CPU processes (gloo) against one.

The test launches this file under torchrun (``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_vocab_parallel.py OUT``). Every rank builds the same full inputs (seeded),
keeps its slice of the vocabulary (V = 37: shards of 19 and 18, so uneven), runs each case and saves
its outputs and the gradients of its shard; the test then runs each case in one process on the whole
vocabulary and compares (fp32, 1e-5 relative): per-token values, the logits' / weight's / bias'
gradients (the shards concatenated) and the hidden states' gradient (all-reduced: every rank's equals
the single-process one). The inputs put target ids in either shard and make one row's logits −inf
across a whole shard (both ways round). Bad input (different N, ids out of range, shards that do not
tile V, different ids) must raise the same clear error on both ranks. One launch, a few seconds.
"""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

V, H = 37, 8
SPLIT = 19  # rank 0: [0, 19), rank 1: [19, 37)
B, T = 3, 4
TAU = 0.7


def inputs():
    """The full inputs, identical on every process (seeded)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 0], ids[0, 1], ids[1, 0], ids[1, 1] = 3, 30, SPLIT - 1, SPLIT  # both shards, at the border
    z[0, 2, SPLIT:] = float("-inf")  # a row with no mass in shard 1 ...
    ids[0, 2] = 5
    z[1, 2, :SPLIT] = float("-inf")  # ... and one with none in shard 0
    ids[1, 2] = 25
    z[2, 1, 7] = 9.0  # a peaked row
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    tau_t = torch.rand(B, T, generator=g) + 0.5
    c_lp, c_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[2, 3] = 0
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.1 - 2.0
    return dict(z=z, ids=ids, hidden=hidden, weight=weight, bias=bias, tau_t=tau_t, c_lp=c_lp, c_ent=c_ent, mask=mask,
                adv=adv, old=old)


SHARDED = {"d_logits": -1, "d_weight": 0, "d_bias": 0}  # gradients split along V (dim)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def run_cases(x, shard, group, mesh=None):
    """Every case's outputs and gradients. ``shard``: slice of V this process holds (all of it for the
    single-process run, with group=None). ``mesh``: pass the sharded logits / weight / bias as DTensors
    placed Shard(-1) / Shard(0) on it (and no group); their gradients must keep that placement."""
    import grpo_fast
    from grpo_fast.integrations.verl import linear_cross_entropy

    out = {}
    kw = {} if group is None or mesh is not None else {"group": group}

    def sharded(t, dim=-1):  # this process's part of t along V, a leaf (a DTensor with a mesh)
        if mesh is None:
            return _leaf(t[..., shard] if dim == -1 else t[shard])
        from torch.distributed.tensor import DTensor, Shard

        local = (t[..., shard] if dim == -1 else t[shard]).clone()
        d = dim % t.dim()
        return DTensor.from_local(local, mesh, [Shard(d)], run_check=False, shape=t.shape,
                                  stride=t.contiguous().stride()).detach().requires_grad_()

    def primitive_loss(lp, ent):
        return (x["c_lp"] * lp).sum() + (x["c_ent"] * ent).sum()

    from grpo_fast.backends import unavailable_reason

    # the Triton kernels too where they run (under TRITON_INTERPRET=1, which tests/conftest.py sets)
    triton = ("triton",) if unavailable_reason("triton", torch.device("cpu")) is None else ()
    for backend in ("cpu", "torch") + triton:
        z = sharded(x["z"])
        tau = x["tau_t"] if backend == "torch" else TAU
        lp, ent = grpo_fast.logprobs(z, x["ids"], temperature=tau, return_entropy=True, backend=backend, **kw)
        primitive_loss(lp, ent).backward()
        out[f"logprobs_{backend}"] = dict(logp=lp, ent=ent, d_logits=z.grad)
    # valid rows only: the masked token's logits are NaN and reach nothing, on either rank
    z_nan = x["z"].clone()
    z_nan[x["mask"] == 0] = float("nan")
    for backend in ("cpu", "torch"):
        z = sharded(z_nan)
        lp, ent = grpo_fast.logprobs(z, x["ids"], temperature=TAU, return_entropy=True, mask=x["mask"],
                                     backend=backend, **kw)
        primitive_loss(lp, ent).backward()
        out[f"logprobs_mask_{backend}"] = dict(logp=lp, ent=ent, d_logits=z.grad)
    # (N, V) rows and logp only (no entropy term in backward)
    z = sharded(x["z"].reshape(B * T, V))
    lp, _ = grpo_fast.logprobs(z, x["ids"].reshape(-1), backend="cpu", **kw)
    (x["c_lp"].reshape(-1) * lp).sum().backward()
    out["logprobs_rows"] = dict(logp=lp, d_logits=z.grad)

    h, w, b = _leaf(x["hidden"]), sharded(x["weight"], 0), sharded(x["bias"], 0)
    lp, ent = grpo_fast.fused_linear_logprobs(h, w, x["ids"], bias=b, temperature=TAU, logit_softcap=3.0,
                                              return_entropy=True, chunk_size=5, backend="cpu", **kw)
    primitive_loss(lp, ent).backward()
    out["fused_linear_logprobs"] = dict(logp=lp, ent=ent, d_hidden=h.grad, d_weight=w.grad, d_bias=b.grad)
    h, w, b = _leaf(x["hidden"]), sharded(x["weight"], 0), sharded(x["bias"], 0)
    lp, ent = grpo_fast.fused_linear_logprobs(h, w, x["ids"], bias=b, temperature=TAU, logit_softcap=3.0,
                                              return_entropy=True, mask=x["mask"], chunk_size=5, backend="cpu", **kw)
    primitive_loss(lp, ent).backward()
    out["fused_linear_logprobs_mask"] = dict(logp=lp, ent=ent, d_hidden=h.grad, d_weight=w.grad, d_bias=b.grad)

    z = sharded(x["z"])
    loss, metrics = grpo_fast.grpo_loss(z, x["ids"], x["adv"], old_logp=x["old"], completion_mask=x["mask"], beta=0.0,
                                        loss_type="grpo", temperature=TAU, backend="cpu", **kw)
    loss.backward()
    out["grpo_loss"] = dict(loss=loss, entropy=metrics["entropy"], clip=metrics["clip_ratio"], d_logits=z.grad)
    # inplace=True: the shard's gradient is written into the logits themselves (no (B, T, V_r) buffer), in
    # forward; loss_scale folded into it (the gradient of a backward with grad_output 1 is the loss's own)
    z = sharded(x["z"])
    loss, metrics = grpo_fast.grpo_loss(z, x["ids"], x["adv"], old_logp=x["old"], completion_mask=x["mask"], beta=0.04,
                                        ref_logp=x["old"] - 0.1, loss_type="grpo", temperature=TAU, inplace=True,
                                        loss_scale=0.25, backend="cpu", **kw)
    loss.backward()
    if mesh is None:  # the gradient handed out is the logits' own storage (a DTensor's backward wraps it anew)
        assert z.grad.data_ptr() == z.data_ptr(), "inplace=True did not hand out the logits' storage"
    out["grpo_loss_inplace"] = dict(loss=loss, kl=metrics["kl"], clip=metrics["clip_ratio"], d_logits=z.grad)
    # TRL's entropy bonus: across ranks through the primitive's entropy gradient, in one process in the kernel
    z = sharded(x["z"])
    loss, metrics = grpo_fast.grpo_loss(z, x["ids"], x["adv"], old_logp=x["old"], completion_mask=x["mask"],
                                        loss_type="dapo", importance_sampling_level="sequence", temperature=TAU,
                                        entropy_coef=0.4, backend="cpu", **kw)
    loss.backward()
    out["grpo_loss_entropy_coef"] = dict(loss=loss, entropy=metrics["entropy"], d_logits=z.grad)

    h, w = _leaf(x["hidden"]), sharded(x["weight"], 0)
    loss, metrics = grpo_fast.fused_linear_grpo_loss(h, w, x["ids"], x["adv"], old_logp=x["old"],
                                                     completion_mask=x["mask"], loss_type="dapo", chunk_size=5,
                                                     temperature=x["tau_t"], backend="cpu", **kw)
    loss.backward()
    out["fused_linear_grpo_loss"] = dict(loss=loss, entropy=metrics["entropy"], d_hidden=h.grad, d_weight=w.grad)
    h, w = _leaf(x["hidden"]), sharded(x["weight"], 0)
    loss, metrics = grpo_fast.fused_linear_grpo_loss(h, w, x["ids"], x["adv"], old_logp=x["old"],
                                                     completion_mask=x["mask"], loss_type="grpo", chunk_size=5,
                                                     temperature=TAU, entropy_coef=0.4, backend="cpu", **kw)
    loss.backward()
    out["fused_linear_entropy_coef"] = dict(loss=loss, d_hidden=h.grad, d_weight=w.grad)

    h, w = _leaf(x["hidden"].reshape(B * T, H)), sharded(x["weight"], 0)
    lp, ent = linear_cross_entropy(h, w, x["ids"].reshape(-1), TAU, "none", group)
    primitive_loss(lp.view(B, T), ent.view(B, T)).backward()
    out["verl"] = dict(logp=lp, ent=ent, d_hidden=h.grad, d_weight=w.grad)
    return {k: {n: _plain(t, n, mesh) for n, t in v.items()} for k, v in out.items()}


def _plain(t, name, mesh):
    """A saved output: outputs are plain tensors; a sharded gradient of a DTensor is a DTensor of the
    same placement (its local part is saved)."""
    from grpo_fast.vocab_parallel import is_dtensor

    if mesh is not None and name in SHARDED:
        from torch.distributed.tensor import Shard

        assert is_dtensor(t) and tuple(t.placements) == (Shard(SHARDED[name] % t.dim()),), (name, t)
        t = t.to_local()
    assert not is_dtensor(t), name
    return t.detach().clone()


def _errors(x, rank, group):
    """The bad-input cases: each must raise ValueError on every rank; the messages are returned."""
    import grpo_fast

    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, V)
    z = x["z"][..., shard]
    bad = x["ids"].clone()
    bad[2, 3] = V
    other = x["ids"].clone()
    if rank == 1:
        other[1, 3] = (other[1, 3] + 1) % V
    cases = {
        "different_n": lambda: grpo_fast.logprobs(z[:, : T - rank], x["ids"][:, : T - rank], group=group),
        "ids_out_of_range": lambda: grpo_fast.logprobs(z, bad, group=group),
        "no_tiling": lambda: grpo_fast.logprobs(z, x["ids"], group=group, vocab_start=0 if rank == 0 else SPLIT + 1),
        "different_ids": lambda: grpo_fast.logprobs(z, other, group=group),
        "loss_ids_out_of_range": lambda: grpo_fast.grpo_loss(z, bad, x["adv"], group=group),
        "fused_different_n": lambda: grpo_fast.fused_linear_logprobs(
            x["hidden"][: B - rank], x["weight"][shard], x["ids"][: B - rank], group=group),
    }
    msgs = {}
    for name, fn in cases.items():
        try:
            fn()
        except ValueError as e:
            msgs[name] = str(e)
        else:
            msgs[name] = None
    return msgs


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    import grpo_fast

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    group = dist.new_group([0, 1])
    x = inputs()
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, V)
    res = run_cases(x, shard, group)
    # Explicit vocab_start, not in rank order: rank 0 holds the upper part.
    swapped = slice(V - SPLIT, V) if rank == 0 else slice(0, V - SPLIT)
    z = _leaf(x["z"][..., swapped])
    lp, ent = grpo_fast.logprobs(z, x["ids"], temperature=TAU, return_entropy=True, group=group,
                                 vocab_start=swapped.start)
    ((x["c_lp"] * lp).sum() + (x["c_ent"] * ent).sum()).backward()
    res["vocab_start_swapped"] = dict(logp=lp.detach(), ent=ent.detach(), d_logits=z.grad)
    # DTensors placed Shard(-1) / Shard(0) on a 1-D CPU mesh (torch.chunk's sizes: 19 and 18), no group
    from torch.distributed.device_mesh import init_device_mesh

    res["dtensor"] = run_cases(x, shard, None, init_device_mesh("cpu", (world,)))
    res["errors"] = _errors(x, rank, group)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ---- the test (pytest process) ---------------------------------------------------------------------


def _check(name, got0, got1, want, swapped=False):
    from helpers import assert_close_scaled

    for key, w in want.items():
        if key in SHARDED:
            parts = (got1[key], got0[key]) if swapped else (got0[key], got1[key])
            g = torch.cat(parts, SHARDED[key])
        else:
            g = got0[key]
            torch.testing.assert_close(got1[key], g, rtol=0, atol=0, msg=f"{name} {key}: the ranks differ")
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), finite), f"{name} {key}: non-finite entries differ"
        assert_close_scaled(g[finite], w[finite], 1e-5, f"{name} {key}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from test_ddp import run_two_processes

    out = tmp_path_factory.mktemp("vocab_parallel")
    run_two_processes(__file__, out)
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")


@pytest.fixture(scope="module")
def single():
    return run_cases(inputs(), slice(0, V), None)


def test_two_ranks_match_one_process(ranks, single):
    got0, got1 = ranks
    want = single
    for name, w in want.items():
        _check(name, got0[name], got1[name], w)
    # the fixtures must exercise what they claim: targets in both shards, a whole shard at −inf
    x = inputs()
    assert bool((x["ids"] < SPLIT).any()) and bool((x["ids"] >= SPLIT).any())
    assert bool(torch.isinf(x["z"][0, 2, SPLIT:]).all()) and bool(torch.isinf(x["z"][1, 2, :SPLIT]).all())
    assert float(want["logprobs_cpu"]["d_logits"].abs().max()) > 0
    # with a mask: the masked token's outputs and gradient row are 0, the others those without a mask
    keep = x["mask"] != 0
    for backend in ("cpu", "torch"):
        m, u = want[f"logprobs_mask_{backend}"], want[f"logprobs_{backend}"]
        assert bool((m["logp"][~keep] == 0).all()) and bool((m["d_logits"][~keep] == 0).all())
    m, u = want["logprobs_mask_cpu"], want["logprobs_cpu"]
    assert torch.equal(m["logp"][keep], u["logp"][keep]) and torch.equal(m["d_logits"][keep], u["d_logits"][keep])
    m, u = want["fused_linear_logprobs_mask"], want["fused_linear_logprobs"]
    assert bool((m["ent"][~keep] == 0).all()) and bool((m["d_hidden"][~keep] == 0).all())
    torch.testing.assert_close(m["logp"][keep], u["logp"][keep], rtol=1e-5, atol=1e-6)


def test_explicit_vocab_start_and_dtensor(ranks, single):
    got0, got1 = ranks
    want = single["logprobs_cpu"]
    _check("vocab_start_swapped", got0["vocab_start_swapped"], got1["vocab_start_swapped"], want, swapped=True)
    for name, w in single.items():
        _check(f"dtensor {name}", got0["dtensor"][name], got1["dtensor"][name], w)


def test_bad_input_raises_on_every_rank(ranks):
    expect = {
        "different_n": "same tokens",
        "ids_out_of_range": r"\[0, 37\)",
        "no_tiling": "tile",
        "different_ids": "different ids",
        "loss_ids_out_of_range": r"completion_ids must lie in \[0, V\) = \[0, 37\)",
        "fused_different_n": "same tokens",
    }
    import re

    for r, got in enumerate(ranks):
        for name, pattern in expect.items():
            msg = got["errors"][name]
            assert msg is not None, f"rank {r}: {name} did not raise"
            assert re.search(pattern, msg), f"rank {r}: {name}: {msg}"


def test_a_group_that_is_not_a_process_group_is_refused():
    import grpo_fast

    x = inputs()
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        grpo_fast.logprobs(x["z"], x["ids"], group=object())
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        grpo_fast.fused_linear_grpo_loss(x["hidden"], x["weight"], x["ids"], x["adv"], group="tp")


if __name__ == "__main__":
    worker(sys.argv[1])
