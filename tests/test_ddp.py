"""DistributedDataParallel: 2 CPU processes (gloo) must produce the single-process gradient.

The test launches this file under torchrun (``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_ddp.py OUT``); each rank takes its half of the prompts (whole groups),
accumulates the GRPO gradient through DDP, and rank 0 saves the all-reduced gradient, which the
test compares with one process doing the whole batch. It then runs two end-to-end training steps
under DDP and checks the replicas still hold identical weights.
"""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

P, G = 4, 3  # prompts, group size: B = 12 rows, 6 per rank
# (name, loss_type, beta, grad_accum, scale_rewards, path)
CASES = [
    ("dapo_accum2", "dapo", 0.04, 2, "group", "logits"),
    ("grpo_batchstd", "grpo", 0.0, 1, "batch", "logits"),
    ("dapo_fused_linear", "dapo", 0.0, 3, "group", "fused_linear"),
    ("cispo_accum2", "cispo", 0.0, 2, "none", "logits"),
]


def _setup(case, out_dir):
    """Model, config and the full (B rows) batch ingredients; identical in every process."""
    from grpo_fast.trainer import loop as tr
    from grpo_fast.model import GPTConfig, TinyGPT
    from grpo_fast.tasks import get_task

    name, loss_type, beta, accum, scale, path = case
    task = get_task("reverse", n_digits=3)
    cfg = tr.TrainConfig(out=out_dir, prompts_per_step=P, group_size=G, loss_type=loss_type, beta=beta,
                         grad_accum=accum, scale_rewards=scale, max_new_tokens=5, progress=False)
    torch.manual_seed(0)
    lm = tr.CausalLM(TinyGPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, block_size=9, n_layer=1, n_head=2, n_embd=24)))
    g = torch.Generator().manual_seed(11)
    B, T = P * G, 5
    ex = [e for e in task.sample(P, g) for _ in range(G)]
    p_ids, p_mask = tr.encode_prompts(task, [e["prompt"] for e in ex], "cpu")
    comp = torch.randint(2, task.tokenizer.vocab_size, (B, T), generator=g)
    stop = torch.randint(0, T + 2, (B,), generator=g)  # EOS position; >= T: the row runs to the end
    for b in range(B):
        if stop[b] < T:
            comp[b, stop[b]] = task.tokenizer.eos_id
    mask = tr.completion_mask_from_ids(comp, task.tokenizer.eos_id)
    comp = torch.where(mask > 0, comp, torch.zeros_like(comp))
    rewards = torch.rand(B, generator=g)
    rewards[:G] = 0.5  # one group of equal rewards: advantage 0
    ref = torch.randn(B, T, generator=g) * 0.1 - 2.0
    return tr, cfg, lm, path, (p_ids, p_mask, comp, mask, rewards, ref)


def _grads(tr, cfg, lm, policy, path, tensors, rows, rank, world):
    p_ids, p_mask, comp, mask, rewards, ref = (t[rows] for t in tensors)
    batch = tr.build_batch(p_ids, p_mask, comp, mask, tr.advantages_for_rank(rewards, cfg, rank, world))
    if cfg.beta != 0:
        batch["ref_logp"] = ref
    lm.zero_grad(set_to_none=True)
    tr.accumulate_gradients(policy, lm, batch, cfg, path, world)
    return {n: p.grad.detach().clone() for n, p in lm.named_parameters()}


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    import grpo_fast

    torch.set_num_threads(1)
    from grpo_fast.trainer import loop as tr

    rank, world = tr.dist_setup(torch.device("cpu"))
    assert world == 2
    for case in CASES:
        if case[5] == "fused_linear" and not hasattr(grpo_fast, "fused_linear_grpo_loss"):
            continue
        tr_, cfg, lm, path, tensors = _setup(case, out_dir)
        policy = torch.nn.parallel.DistributedDataParallel(lm)
        per = P * G // world
        grads = _grads(tr_, cfg, lm, policy, path, tensors, slice(rank * per, (rank + 1) * per), rank, world)
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, f"{case[0]}.pt"))
        del policy  # release the DDP reducer before the process group goes away
    # End to end: two steps of the real loop; the replicas must stay identical.
    cfg = tr.TrainConfig(out=os.path.join(out_dir, "run"), steps=2, warmup_steps=2, prompts_per_step=4, group_size=2,
                         n_layer=1, n_embd=16, n_head=2, n_digits=3, progress=False, plots=False)
    torch.manual_seed(0)
    model = tr.build_default_model(cfg, tr.get_task("reverse", n_digits=3))
    tr.train(cfg, model=model)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    both = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(both, flat)
    dist.barrier()  # no rank tears its process group down while the other is still in a collective
    dist.destroy_process_group()
    if rank == 0:
        torch.save(torch.stack(both), os.path.join(out_dir, "run_params.pt"))


def run_two_processes(script: str, out_dir, nproc: int = 2) -> None:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 script out_dir`` (``nproc``
    processes); fails the test with the end of the ranks' output when it does not exit 0."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.abspath(script), str(out_dir)]
    try:
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:  # seconds normally; only a badly overloaded machine gets here
        pytest.fail(f"torchrun did not finish in 600 s:\n{str(e.stdout)[-2000:]}\n{str(e.stderr)[-3000:]}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def test_two_processes_give_the_single_process_gradient(tmp_path):
    import grpo_fast

    run_two_processes(__file__, tmp_path)
    checked = 0
    for case in CASES:
        if case[5] == "fused_linear" and not hasattr(grpo_fast, "fused_linear_grpo_loss"):
            continue
        tr, cfg, lm, path, tensors = _setup(case, str(tmp_path))
        want = _grads(tr, cfg, lm, lm, path, tensors, slice(0, P * G), 0, 1)
        got = torch.load(tmp_path / f"{case[0]}.pt")
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{case[0]} {n}: {m}")
        assert any(float(v.abs().max()) > 0 for v in want.values())
        checked += 1
    assert checked >= 3
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().strip().splitlines()
    assert len(rows) == 2
    import json

    assert json.loads(rows[-1])["step"] == 2
    assert json.load(open(tmp_path / "run" / "summary.json"))["world_size"] == 2
    params = torch.load(tmp_path / "run_params.pt")
    assert torch.equal(params[0], params[1]), "the DDP replicas diverged"


if __name__ == "__main__":
    worker(sys.argv[1])
