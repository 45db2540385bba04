"""FSDP2 (``--dist fsdp``): 2 CPU processes (gloo) must take the single-process optimizer steps.

The test launches this file under torchrun (``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_fsdp.py OUT``). Each rank shards the model with
``loop.wrap_policy`` (fully_shard per block + root; TinyGPT's LM head is tied to the embedding and
split on V = 13 rows, unevenly), takes its half of the prompts and runs two ``loop.update`` steps
(GRPO gradient, clipping, SGD with momentum); rank 0 saves the gathered parameters, which the test compares
with one process taking the same steps on the whole batch, and with DDP doing it on 2 processes.
The cases cover the fused-linear loss (the LM head all-gathered inside the FSDP root's forward,
its gradient reduce-scattered to the shards), the fused loss on the logits, and the eager
reference loss (``loss_backend="torch"``). Then two end-to-end steps of ``train`` under FSDP2,
a checkpoint (gathered), its resume under FSDP2 and its load in one process.
"""
import json
import os
import sys

import torch

from test_ddp import G, P, _setup, run_two_processes

# (name, loss_type, beta, grad_accum, scale_rewards, path, loss_backend)
CASES = [
    ("fused_linear_dapo_accum2", "dapo", 0.04, 2, "group", "fused_linear", "auto"),
    ("logits_grpo_batchstd", "grpo", 0.0, 1, "batch", "logits", "auto"),
    ("eager_reference_dapo_accum3", "dapo", 0.04, 3, "none", "logits", "torch"),
]
# SGD with momentum: the step is linear in the gradient, so parameters compare as tightly as gradients.
# (AdamW divides by sqrt(v): on the attention's key bias, whose gradient is 0 up to rounding, it
# turns 1e-10 of rounding into a visible step; the end-to-end run below uses the trainer's AdamW.)
STEPS, LR = 2, 0.5
MODES = {"fused_linear": ["fsdp", "fsdp_reshard_root", "ddp"], "logits": ["fsdp", "ddp"]}


def _case(case, out_dir, dist_mode="ddp"):
    tr, cfg, lm, path, tensors = _setup(case[:6], out_dir)
    cfg.loss_backend, cfg.dist = case[6], dist_mode
    return tr, cfg, lm, path, tensors


def _steps(tr, cfg, lm, policy, path, tensors, rows, rank, world):
    """STEPS optimizer steps of ``loop.update`` on rows ``rows``; the full parameters after them."""
    p_ids, p_mask, comp, mask, rewards, ref = (t[rows] for t in tensors)
    batch = tr.build_batch(p_ids, p_mask, comp, mask, tr.advantages_for_rank(rewards, cfg, rank, world))
    if cfg.beta != 0:
        batch["ref_logp"] = ref
    opt = torch.optim.SGD(lm.parameters(), lr=LR, momentum=0.9)
    for _ in range(STEPS):
        tr.update(policy, lm, opt, batch, cfg, path, world)
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in lm.model.named_parameters()}


def _tiny_run_cfg(tr, out, **kw):
    args = dict(steps=2, warmup_steps=0, prompts_per_step=4, group_size=2, vocab_size=0, n_layer=2, n_embd=16, n_head=2,
                n_digits=3, progress=False, plots=False, dist="fsdp")
    return tr.TrainConfig(out=out, **{**args, **kw})


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    from grpo_fast.trainer import loop as tr

    rank, world = tr.dist_setup(torch.device("cpu"))
    assert world == 2
    per = P * G // world
    mine = slice(rank * per, (rank + 1) * per)
    for case in CASES:
        got = {}
        for mode in MODES[case[5]]:
            tr_, cfg, lm, path, tensors = _case(case, out_dir, mode.split("_")[0])
            policy = tr.wrap_policy(lm, cfg, world, torch.device("cpu"))
            assert tr.is_fsdp(policy) == (mode != "ddp")
            if mode == "fsdp_reshard_root":
                # the root too frees its gathered parameters after forward: the LM head is a shard
                # again by the time the forward returns, so the loss must be computed inside it
                policy.set_reshard_after_forward(True)
            if mode != "ddp":  # the LM head (tied to the embedding) is a shard of V between steps
                w = lm.model.lm_head.weight
                assert w is lm.model.wte.weight and w.to_local().shape[0] == (7, 6)[rank], w.to_local().shape
            got[mode] = _steps(tr_, cfg, lm, policy, path, tensors, mine, rank, world)
            del policy
        if rank == 0:
            torch.save(got, os.path.join(out_dir, f"{case[0]}.pt"))
    # End to end: two steps of train() under FSDP2 (sampling and old log-probs on gathered weights, a
    # reference model, gradient accumulation, checkpoints gathered from the shards), then a resume.
    task = tr.get_task("reverse", n_digits=3)
    cfg = _tiny_run_cfg(tr, os.path.join(out_dir, "run"), save_every=1, num_iterations=2, grad_accum=2)  # + old log-probs
    torch.manual_seed(0)
    model = tr.build_default_model(cfg, task)
    tr.train(cfg, model=model, task=task)
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(params, os.path.join(out_dir, "run_params.pt"))
    # The checkpoint loads back into a freshly sharded model: every rank holds its shard of it.
    torch.manual_seed(1)
    fresh = tr.CausalLM(tr.build_default_model(cfg, task))
    tr.wrap_policy(fresh, cfg, world, torch.device("cpu"))
    opt = torch.optim.AdamW(fresh.parameters(), lr=cfg.lr)
    gens = {"prompts": torch.Generator(), "sample": torch.Generator()}
    assert tr.load_checkpoint(os.path.join(cfg.out, "ckpt.pt"), fresh, None, opt, gens) == 2
    saved = torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)["optimizer"]["state"]
    for n, p in fresh.model.named_parameters():
        assert torch.equal(p.full_tensor(), params[n]), n
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k].full_tensor(), saved[n][k]), (n, k)
    tr.train(_tiny_run_cfg(tr, os.path.join(out_dir, "resumed"), resume=cfg.out, steps=3), task=task)
    dist.barrier()  # no rank tears its process group down while the other is still in a collective
    dist.destroy_process_group()


def test_fsdp_two_processes_take_the_single_process_steps(tmp_path):
    run_two_processes(__file__, tmp_path)
    for case in CASES:
        tr, cfg, lm, path, tensors = _case(case, str(tmp_path))
        before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
        want = _steps(tr, cfg, lm, lm, path, tensors, slice(0, P * G), 0, 1)
        got = torch.load(tmp_path / f"{case[0]}.pt")
        assert list(got) == MODES[case[5]]
        for mode in got:
            assert got[mode].keys() == want.keys()
            for n in want:
                torch.testing.assert_close(got[mode][n], want[n], atol=2e-6, rtol=1e-5,
                                           msg=lambda m: f"{case[0]} {mode} {n}: {m}")
        # the steps moved the LM head (tied to the embedding: the tensor FSDP2 splits on V)
        assert float((want["wte.weight"] - before["wte.weight"]).abs().max()) > 1e-3
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    params = torch.load(tmp_path / "run_params.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["dist"] == "fsdp"
    for n, p in params.items():
        assert torch.equal(ckpt["model"][n], p), n
    assert json.load(open(tmp_path / "run" / "summary.json"))["world_size"] == 2
    rows = [json.loads(r) for r in (tmp_path / "resumed" / "metrics.jsonl").read_text().split("\n") if r.strip()]
    assert [r["step"] for r in rows] == [3]  # the checkpoint's run covered steps 1-2
    # The FSDP2 checkpoint resumes in one process too (the same full state dicts, keyed by name).
    from grpo_fast.trainer import loop

    cfg = _tiny_run_cfg(loop, str(tmp_path / "one"))
    lm = loop.CausalLM(loop.build_default_model(cfg, loop.get_task("reverse", n_digits=3)))
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr)
    assert loop.load_checkpoint(str(tmp_path / "run"), lm, None, opt, {"prompts": torch.Generator()}) == 2
    for n, p in lm.model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
        assert torch.equal(opt.state[p]["exp_avg"], ckpt["optimizer"]["state"][n]["exp_avg"]), n


if __name__ == "__main__":
    worker(sys.argv[1])
