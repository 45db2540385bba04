"""The TRL drop-in under several processes (CPU, gloo): ``torchrun --nproc_per_node 2`` and
``accelerate launch --multi_gpu --num_processes 2``.

The test saves the tiny Qwen2 of tests/test_trl.py (built from a config, nothing downloaded) and
launches this file as a worker. Every process builds the same global batch (12 rows in TRL's layout,
old/ref log-probs near the model's own), takes its rank's rows, and for TRL's own GRPOTrainer and for
the drop-in runs ``compute_loss`` through the model as ``accelerator.prepare`` wraps it (DDP: the
backward all-reduces the gradients), with ``num_items_in_batch`` gathered over processes as TRL's
generation step does. Each rank writes its loss, the logged metrics and the (all-reduced) gradients.
The test compares, in fp32 at 1e-5 relative: drop-in vs TRL on every rank of the 2-process run (loss,
every parameter's gradient, the metrics), and the 2-process run vs one process fed the whole global
batch (mean of the ranks' losses, rank 0's gradients, the cross-process metrics), for dapo (the global
num_items_in_batch), grpo and dr_grpo, beta = 0 and != 0, with and without gradient accumulation (each
process's rows in 2 micro-batches, DDP's no_sync on the first). bnpo normalizes by each process's own
tokens (in TRL too): it is compared with TRL only, and its gradient is checked to differ from the
one-process one. Each 2-process launch also runs one optimizer step of ``Trainer.train()`` with TRL's
trainer and with the drop-in (TRL generates, gathers num_items_in_batch, wraps the model in DDP) and
compares the logged loss, grad_norm and metrics. Runtime: three launches, about 70 s on 2 CPU cores.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B_GLOBAL, P, T = 12, 5, 7

# (loss_type, extra config). bnpo normalizes by each process's own token count, so its 2-process
# gradient is not the global-batch one (in TRL too): it is compared with TRL only.
CASES = {
    "dapo_beta": dict(loss_type="dapo", beta=0.04),
    "grpo": dict(loss_type="grpo", beta=0.0),
    "dr_grpo_beta_seq": dict(loss_type="dr_grpo", beta=0.04, importance_sampling_level="sequence"),
    "bnpo_beta": dict(loss_type="bnpo", beta=0.04),
    # Each process splits its 6 rows into 2 micro-batches (DDP's no_sync on the first, as Trainer does);
    # the one-process run still takes the 12 rows at once with gradient_accumulation_steps=1.
    "dapo_beta_ga2": dict(loss_type="dapo", beta=0.04, gradient_accumulation_steps=2),
    "grpo_beta_ga2": dict(loss_type="grpo", beta=0.04, gradient_accumulation_steps=2),
}
GLOBAL_EQUIVALENT = {"dapo_beta", "grpo", "dr_grpo_beta_seq", "dapo_beta_ga2", "grpo_beta_ga2"}


# ---- the worker (run in each process) ----------------------------------------------------------------


def _global_batch(trainer, V):
    """12 rows, the same in every process; log-probs from the unwrapped model."""
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, V, (B_GLOBAL, P), generator=g)
    prompt_mask = torch.ones(B_GLOBAL, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[8, :3] = 0
    completion_ids = torch.randint(3, V, (B_GLOBAL, T), generator=g)
    completion_mask = torch.ones(B_GLOBAL, T, dtype=torch.long)
    completion_mask[2, 4:] = 0
    completion_mask[3, 1:] = 0
    completion_mask[7, 2:] = 0  # rank 1's rows carry fewer tokens: per-rank and global normalizers differ
    completion_mask[9, 3:] = 0
    completion_mask[10, 5:] = 0
    sign = torch.tensor([-1.0, 1.0] * (B_GLOBAL // 2))
    advantages = (0.2 + torch.rand(B_GLOBAL, generator=g)) * sign
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T)
    row = torch.tensor([0.45, -0.45, 0.1, -0.2, 0.3, 0.0] * 2).unsqueeze(1)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=advantages,
                ref_per_token_logps=logp + 0.3 * torch.randn(B_GLOBAL, T, generator=g),
                old_per_token_logps=logp + row + 0.2 * torch.randn(B_GLOBAL, T, generator=g))


def _run_one(cls, model_path, out_dir, config):
    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    config = dict(config)
    ga = config.pop("gradient_accumulation_steps", 1) if world > 1 else 1
    config.pop("gradient_accumulation_steps", None)
    args = trl.GRPOConfig(output_dir=out_dir, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                          per_device_train_batch_size=B_GLOBAL // world // ga, num_generations=3,
                          max_completion_length=T, bf16=False, gradient_accumulation_steps=ga, epsilon=0.2,
                          epsilon_high=0.28, **config)
    ds = Dataset.from_dict({"prompt": ["the cat sat", "a dog ran to", "one two", "big red mat"] * 3})
    tr = cls(model=model_path, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
             train_dataset=ds, processing_class=tok)
    acc = tr.accelerator
    assert acc.num_processes == world, (acc.num_processes, world)
    full = _global_batch(tr, tr.model.config.vocab_size)
    n = B_GLOBAL // world
    inputs = {k: v[rank * n:(rank + 1) * n] for k, v in full.items()}
    # As TRL's _generate_and_score_completions: the global token count of the generation batch.
    inputs["num_items_in_batch"] = acc.gather(inputs["completion_mask"].sum()).sum()
    model = acc.prepare(tr.model)  # DDP when world > 1, as Trainer.train wraps it
    model.train()
    tr.current_gradient_accumulation_steps = ga
    assert tr.args.steps_per_generation == ga  # TRL's default: one generation batch per optimizer step
    losses, metrics = [], []
    m = n // ga
    for i in range(ga):
        micro = {k: v[i * m:(i + 1) * m] if k != "num_items_in_batch" else v for k, v in inputs.items()}
        for v in tr._metrics["train"].values():
            v.clear()
        sync = i == ga - 1  # Trainer: no gradient all-reduce until the window's last micro-batch
        with (nullcontext() if sync else acc.no_sync(model)):
            loss = tr.compute_loss(model, micro)
            acc.backward(loss)
        losses.append(loss.item())
        metrics.append({k: v[-1] for k, v in tr._metrics["train"].items() if v})
    grads = {name: p.grad.detach().double().tolist() for name, p in acc.unwrap_model(model).named_parameters()
             if p.grad is not None}
    # loss: what Trainer logs for the step (the micro-batch losses summed); metrics: each micro-batch's
    return dict(loss=sum(losses), losses=losses, metrics=metrics, ga=ga, grads=grads, world=world, rank=rank,
                distributed_type=str(acc.distributed_type))


def _reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _train_one(cls, model_path, out_dir):
    """One optimizer step of Trainer.train(): TRL generates, gathers num_items_in_batch, wraps in DDP."""
    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_path)
    args = trl.GRPOConfig(output_dir=out_dir, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                          per_device_train_batch_size=3, num_generations=3, max_completion_length=6, bf16=False,
                          gradient_accumulation_steps=2, loss_type="dapo", beta=0.04, max_steps=1,
                          learning_rate=1e-2, seed=7)
    ds = Dataset.from_dict({"prompt": ["the cat sat", "a dog ran to", "one two", "big red mat", "yes no up", "hot cold"]})
    tr = cls(model=model_path, reward_funcs=_reward_len, args=args, train_dataset=ds, processing_class=tok)
    tr.train()
    return [h for h in tr.state.log_history if "loss" in h]


def _worker(model_path, out_path, cases):
    import warnings

    warnings.simplefilter("ignore")
    sys.path.insert(0, ROOT)
    import trl

    from grpo_fast.integrations.trl import GRPOTrainer

    res = {}
    for case in cases.split(","):  # every case in one launch: the processes start once
        res[case] = {}
        for name, cls in (("trl", trl.GRPOTrainer), ("grpo_fast", GRPOTrainer)):
            torch.manual_seed(0)
            res[case][name] = _run_one(cls, model_path, os.path.dirname(out_path), CASES[case])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        res["train"] = {name: _train_one(cls, model_path, os.path.dirname(out_path))
                        for name, cls in (("trl", trl.GRPOTrainer), ("grpo_fast", GRPOTrainer))}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        res["train"] = {name: _train_one(cls, model_path, os.path.dirname(out_path))
                        for name, cls in (("trl", trl.GRPOTrainer), ("grpo_fast", GRPOTrainer))}
    with open(f"{out_path}.rank{int(os.environ.get('RANK', '0'))}.json", "w") as f:
        json.dump(res, f)


# ---- the test ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trl import _SMALL, _save  # the tiny Qwen2 and tokenizer of the single-process tests
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path, _ = _save(tmp_path_factory.mktemp("tiny_qwen2_mp"), Qwen2Config(**_SMALL, tie_word_embeddings=False),
                    Qwen2ForCausalLM)
    return path


def _launch(launcher, nproc, model_path, out_path, port, cases=tuple(CASES)):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    script = [os.path.abspath(__file__), "--worker", model_path, out_path, ",".join(cases)]
    if nproc == 1:
        cmd = [sys.executable] + script
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)] + script
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port)] + script
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    res = []
    for r in range(nproc):
        with open(f"{out_path}.rank{r}.json") as f:
            res.append(json.load(f))
    return res


def _rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _check_same(ours, ref, what, rtol=1e-5, metrics=True):
    assert math.isclose(ours["loss"], ref["loss"], rel_tol=rtol, abs_tol=1e-6), f"{what} loss: {ours['loss']} vs {ref['loss']}"
    assert set(ours["grads"]) == set(ref["grads"]), what
    for name in ref["grads"]:
        err = _rel(ours["grads"][name], ref["grads"][name])
        assert err <= rtol, f"{what}: gradient of {name} relative error {err:.3g}"
    if not metrics:
        return
    assert len(ours["metrics"]) == len(ref["metrics"]), what
    for mo, mr in zip(ours["metrics"], ref["metrics"]):
        for name in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert (name in mo) == (name in mr), f"{what}: metric {name}"
            if name in mr:
                assert math.isclose(mo[name], mr[name], rel_tol=rtol, abs_tol=1e-6), f"{what}: metric {name} {mo[name]} vs {mr[name]}"
    for mo, mr in zip(ours.get("losses", ()), ref["losses"]):  # per micro-batch (absent: a merged result)
        assert math.isclose(mo, mr, rel_tol=rtol, abs_tol=1e-6), f"{what} micro-batch loss: {mo} vs {mr}"


@pytest.fixture(scope="module")
def runs(tiny_path, tmp_path_factory):
    """{launcher or "one": per-rank results}: each launch runs every case once."""
    cache = {}
    port = 29600 + os.getpid() % 300

    def get(launcher):
        if launcher not in cache:
            if launcher == "accelerate":
                pytest.importorskip("accelerate")
            t0 = time.time()
            nproc = 1 if launcher == "one" else 2
            out = tmp_path_factory.mktemp(launcher)
            cache[launcher] = _launch(launcher, nproc, tiny_path, str(out / "res"), port + len(cache))
            print(f"[{launcher}: {time.time() - t0:.1f}s]", end=" ")
        return cache[launcher]

    return get


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_trl_and_global_batch(runs, launcher, case):
    two = [r[case] for r in runs(launcher)]
    for r, res in enumerate(two):
        for impl in ("trl", "grpo_fast"):
            assert res[impl]["world"] == 2 and res[impl]["rank"] == r, res[impl]["rank"]
            assert "MULTI" in res[impl]["distributed_type"], res[impl]["distributed_type"]
        # drop-in vs TRL's own trainer, same 2-process setup, every rank
        _check_same(res["grpo_fast"], res["trl"], f"{launcher} rank {r}: grpo_fast vs trl")
    # DDP all-reduced the gradients: both ranks hold the same
    for name in two[0]["grpo_fast"]["grads"]:
        assert _rel(two[1]["grpo_fast"]["grads"][name], two[0]["grpo_fast"]["grads"][name]) <= 1e-6
    assert two[0]["trl"]["ga"] == CASES[case].get("gradient_accumulation_steps", 1)
    assert two[0]["trl"]["metrics"][-1]["clip_ratio/region_mean"] > 0  # the clipped branch is exercised
    one = runs("one")[0][case]  # the same case, one process, gradient_accumulation_steps=1
    if case not in GLOBAL_EQUIVALENT:
        # bnpo's per-process token normalizer: the 2-process gradient really differs from the global-batch
        # one (so the comparison below can tell normalizations apart)
        assert max(_rel(two[0]["trl"]["grads"][k], one["trl"]["grads"][k]) for k in one["trl"]["grads"]) > 1e-3
        return
    for impl in ("trl", "grpo_fast"):
        merged = dict(two[0][impl], loss=sum(r[impl]["loss"] for r in two) / 2)  # the logged loss: mean over ranks
        del merged["losses"]
        # the metrics are per micro-batch: with accumulation they cover other rows than the one-process run's
        _check_same(merged, one[impl], f"{launcher} {impl}: 2 processes vs 1 process with the global batch",
                    metrics=two[0][impl]["ga"] == 1)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_training_step_matches_trl(runs, launcher):
    """Trainer.train() for one optimizer step (generation, the gathered num_items_in_batch, DDP, 2 micro-batches):
    the logged loss, grad_norm and metrics equal TRL's (1e-4: sampled completions, then an fp32 step)."""
    for rank_res in runs(launcher):
        ref, ours = rank_res["train"]["trl"], rank_res["train"]["grpo_fast"]
        assert len(ref) == len(ours) == 1
        for key in ("loss", "grad_norm", "entropy", "kl", "clip_ratio/region_mean", "reward"):
            assert key in ours[0], f"{key} not logged by the drop-in"
            assert math.isclose(ours[0][key], ref[0][key], rel_tol=1e-4, abs_tol=1e-6), f"{key}: trl {ref[0][key]} grpo_fast {ours[0][key]}"
        assert ref[0]["grad_norm"] > 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(*sys.argv[2:5])
