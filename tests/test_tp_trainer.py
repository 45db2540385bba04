"""``--vocab-parallel 2``: 2 CPU processes (gloo) splitting the LM head must train as one process does.

The test launches this file under torchrun (``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_tp_trainer.py OUT``). Both ranks form one tp group (no data
parallelism) and hold the same batch; TinyGPT's head (13 rows: 7 + 6, tied to the embedding, or
untied) is split with ``tp.shard_lm_head``. The worker:

1. runs two ``loop.update`` steps (GRPO gradient, clipping, SGD with momentum) per case (the
   fused-linear loss with KL and accumulation, the fused loss on the shard's logits, the eager
   reference, a tied Hugging Face Llama) and saves the parameters with the head gathered; the test
   compares them with one process on the whole head (fp32, 2e-6 / 1e-5, as tests/test_fsdp.py); the
   Llama's split sampling (its KV cache) must draw the tokens of a whole-vocabulary loop;
2. draws tokens with ``tp.sample_next`` from the two halves of (B, 37) logits and saves them next to
   ``loop._sample_next``'s draws from the whole rows with the same generator: they must be equal;
3. trains two steps end to end with ``train`` (warm-up, sampling, old and reference log-probs,
   AdamW, checkpoints), which the test compares with the same run in one process (the same
   rewards, the metrics to 1e-5, the weights to 1e-4: AdamW turns rounding in the zero gradient of
   the attention's key bias into a step of ~lr); reloads its checkpoint into a freshly split model,
   loads the one-process checkpoint and resumes from it (the test resumes it in one process too);
4. checks that a split that does not divide the processes fails at start-up on both ranks.

``test_data_parallel_replicas_of_a_split_head`` launches 4 processes (2 replicas × 2 shards): two
optimizer steps on half the prompts per replica give one process's parameters on the whole batch,
and two steps of ``train`` leave every rank with the same whole weights.
"""
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from test_ddp import G, P, _setup, run_two_processes  # noqa: E402

# (name, loss_type, beta, grad_accum, scale_rewards, path, loss_backend, tied, model)
CASES = [
    ("fused_linear_dapo_accum2", "dapo", 0.04, 2, "group", "fused_linear", "auto", True, "tiny"),
    ("logits_grpo_batchstd_untied", "grpo", 0.0, 1, "batch", "logits", "auto", False, "tiny"),
    ("eager_reference_dapo_accum3", "dapo", 0.04, 3, "none", "logits", "torch", True, "tiny"),
    # a Hugging Face Llama: tie_word_embeddings, an embedding with padding_idx
    ("llama_fused_linear_dapo", "dapo", 0.04, 1, "group", "fused_linear", "auto", True, "llama"),
]
STEPS, LR = 2, 0.5
V_SAMPLE, B_SAMPLE, DRAWS = 37, 48, 8


def _case(case, out_dir):
    tr, cfg, lm, path, tensors = _setup(case[:6], out_dir)
    cfg.loss_backend = case[6]
    if case[8] == "llama":
        torch.manual_seed(0)
        llama_cfg = tr.TrainConfig(out=out_dir, model="llama", vocab_size=0, n_layer=1, n_head=2, n_embd=24,
                                   max_new_tokens=5, progress=False)
        lm = tr.CausalLM(tr.build_default_model(llama_cfg, tr.get_task("reverse", n_digits=3)))
        assert lm.is_hf and lm.model.get_input_embeddings().padding_idx is not None
    if not case[7]:  # the head its own tensor: the embedding stays whole on every rank
        lm.model.lm_head.weight = torch.nn.Parameter(lm.model.wte.weight.detach().clone())
    return tr, cfg, lm, path, tensors


def _full_params(lm):
    """Every parameter by name, the split ones gathered (a collective with a split head)."""
    from grpo_fast.trainer import tp

    out = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    if tp.find_split(lm.model) is not None:
        gathered = tp.full_state(lm.model)[0]
        out.update({n: gathered[n] for n in out if n in gathered})
    return out


def _steps(tr, cfg, lm, path, tensors, rank=0, world=1, group=None):
    """STEPS optimizer steps of ``loop.update`` on this data-parallel rank's rows of the batch (all of
    them for ``world`` 1); the parameters after them."""
    per = P * G // world
    p_ids, p_mask, comp, mask, rewards, ref = (t[rank * per:(rank + 1) * per] for t in tensors)
    batch = tr.build_batch(p_ids, p_mask, comp, mask, tr.advantages_for_rank(rewards, cfg, rank, world, group))
    if cfg.beta != 0:
        batch["ref_logp"] = ref
    opt = torch.optim.SGD(lm.parameters(), lr=LR, momentum=0.9)
    for _ in range(STEPS):
        tr.update(lm, lm, opt, batch, cfg, path, world)
    return _full_params(lm)


def _llama_draws(tr, lm, prompt_ids, prompt_mask, generator):
    """Completions of a Hugging Face model sampled the long way: the whole sequence through the
    model at every step (no KV cache), the whole vocabulary's logits, ``loop._sample_next``."""
    seq, mask, out = prompt_ids, prompt_mask, []
    done = torch.zeros(len(seq), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(5):
            nxt = tr._sample_next(lm(seq, mask, 1)[:, -1], 0.9, generator)
            out.append(torch.where(done, torch.zeros_like(nxt), nxt))
            done |= out[-1] == 1
            seq, mask = torch.cat([seq, out[-1][:, None]], 1), torch.cat([mask, torch.ones(len(seq), 1)], 1)
    return torch.stack(out, 1)


def _sample_logits():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(B_SAMPLE, V_SAMPLE, generator=g) * 3
    z[0, 19:] = float("-inf")  # no mass in the second shard ...
    z[1, :19] = float("-inf")  # ... or in the first
    z[2, 18] = 30.0  # a peaked row, at the border
    z[3, 19] = 30.0
    return z


def _run_cfg(tr, out, **kw):
    args = dict(steps=2, warmup_steps=15, warmup_target_reward=0.0, prompts_per_step=4, group_size=4, vocab_size=0,
                n_layer=1, n_embd=16, n_head=2, n_digits=3, beta=0.04, num_iterations=2, grad_accum=2, save_every=1,
                progress=False, plots=False)
    return tr.TrainConfig(out=out, **{**args, **kw})


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    from grpo_fast.trainer import loop as tr
    from grpo_fast.trainer import tp

    rank, world = tr.dist_setup(torch.device("cpu"))
    assert world == 2
    cpu = torch.device("cpu")
    tp_group, dp_group = tp.parallel_groups(2, world, cpu)
    got = {}
    for case in CASES:
        tr_, cfg, lm, path, tensors = _case(case, out_dir)
        split = tp.shard_lm_head(lm.model, tp_group, dp_group)
        assert (split.start, split.local, split.total) == ((0, 7, 13), (7, 6, 13))[rank]
        emb = lm.model.wte if case[8] == "tiny" else lm.model.get_input_embeddings()
        assert (emb.weight is lm.lm_head().weight) == case[7]
        assert tr_.wrap_policy(lm, cfg, world, cpu) is lm
        got[case[0]] = _steps(tr_, cfg, lm, path, tensors)
        if case[8] == "llama":  # the split head's KV-cache sampling draws the long way's tokens
            whole = _case(case, out_dir)[2]
            whole.model.load_state_dict(got[case[0]], strict=False)  # the tied head follows the embedding
            assert torch.equal(whole.model.lm_head.weight, got[case[0]]["model.embed_tokens.weight"])
            task = tr_.get_task("reverse", n_digits=3)
            p_ids, p_mask = tensors[0], tensors[1]
            comp, _ = tr_.sample_completions(lm, p_ids, p_mask, max_new_tokens=5, temperature=0.9,
                                             eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id,
                                             generator=torch.Generator().manual_seed(4))
            want = _llama_draws(tr_, whole, p_ids, p_mask, torch.Generator().manual_seed(4))
            assert torch.equal(comp, want[:, :comp.shape[1]]), (comp, want)
        # the parameters that are not split are the same on both ranks, bit for bit
        split_ids = {id(p) for p in tp.sharded_parameters(lm.model).values()}
        flat = torch.cat([p.detach().flatten() for p in lm.parameters() if id(p) not in split_ids])
        both = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(both, flat)
        assert torch.equal(both[0], both[1]), case[0]
    # sampling over the split vocabulary
    z = _sample_logits()
    split = tp.VocabSplit(tp_group, dp_group, V_SAMPLE)
    g_split, g_whole = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    draws = [(tp.sample_next(z[:, split.rows()], 0.7, g_split, split), tr._sample_next(z, 0.7, g_whole))
             for _ in range(DRAWS)]
    if rank == 0:
        torch.save({"cases": got, "draws": draws}, os.path.join(out_dir, "tp.pt"))
    # a split that does not divide the processes: refused before any collective, on every rank
    with pytest.raises(ValueError, match=r"vocab_parallel \(3\) must divide the number of processes \(2\)"):
        tr.train(_run_cfg(tr, os.path.join(out_dir, "bad"), vocab_parallel=3))
    # end to end, then the checkpoint back into a freshly split model
    task = tr.get_task("reverse", n_digits=3)
    cfg = _run_cfg(tr, os.path.join(out_dir, "tp"), vocab_parallel=2)
    torch.manual_seed(0)
    model = tr.build_default_model(cfg, task)
    tr.train(cfg, model=model, task=task)
    lm = tr.CausalLM(model)
    params = _full_params(lm)
    if rank == 0:
        torch.save(params, os.path.join(out_dir, "tp_params.pt"))
    fresh = tr.CausalLM(tr.build_default_model(cfg, task))
    tp.shard_lm_head(fresh.model, tp_group, dp_group)
    opt = torch.optim.AdamW(fresh.parameters(), lr=cfg.lr)
    assert tr.load_checkpoint(cfg.out, fresh, None, opt, {"sample": torch.Generator()}) == 2
    saved = torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)
    rows, split_names = fresh.vocab_split.rows(), tp.sharded_parameters(fresh.model)
    for n, p in fresh.model.named_parameters():
        mine = (lambda t: t[rows]) if n in split_names else (lambda t: t)
        assert torch.equal(p.detach(), mine(saved["model"][n])), n
        assert torch.equal(opt.state[p]["exp_avg"], mine(saved["optimizer"]["state"][n]["exp_avg"])), n
    # the one-process checkpoint (written by the test before the launch) resumes here for step 3
    tr.train(_run_cfg(tr, os.path.join(out_dir, "tp_resumed"), vocab_parallel=2, steps=3,
                      resume=os.path.join(out_dir, "one")), task=task)
    dist.destroy_process_group()


DP_TP_CASE = ("fused_linear_grpo_batchstd_accum2", "grpo", 0.04, 2, "batch", "fused_linear", "auto", True, "tiny")


def _all_equal(t: torch.Tensor) -> bool:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return all(torch.equal(parts[0], p) for p in parts)


def worker_dp_tp(out_dir: str) -> None:
    """4 processes: 2 data-parallel replicas (half the prompts each) × 2 ranks splitting the head."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    from grpo_fast.trainer import loop as tr
    from grpo_fast.trainer import tp

    rank, world = tr.dist_setup(torch.device("cpu"))
    assert world == 4
    tp_group, dp_group = tp.parallel_groups(2, world, torch.device("cpu"))
    tr_, cfg, lm, path, tensors = _case(DP_TP_CASE, out_dir)
    split = tp.shard_lm_head(lm.model, tp_group, dp_group)
    assert (split.dp_rank, split.tp_rank) == divmod(rank, 2)
    params = _steps(tr_, cfg, lm, path, tensors, split.dp_rank, 2, dp_group)
    assert _all_equal(torch.cat([p.flatten() for p in params.values()])), "the ranks' gathered weights differ"
    if rank == 0:
        torch.save(params, os.path.join(out_dir, "dp_tp.pt"))
    # end to end: 2 steps, 2 prompts per replica; every rank ends with the same whole weights
    task = tr.get_task("reverse", n_digits=3)
    torch.manual_seed(0)
    model = tr.build_default_model(_run_cfg(tr, os.path.join(out_dir, "dp_tp"), vocab_parallel=2), task)
    tr.train(_run_cfg(tr, os.path.join(out_dir, "dp_tp"), vocab_parallel=2, warmup_steps=2), model=model, task=task)
    assert _all_equal(torch.cat([p.flatten() for p in _full_params(tr.CausalLM(model)).values()]))
    dist.destroy_process_group()


def _metrics(path):
    return [json.loads(r) for r in open(path).read().split("\n") if r.strip()]


def _same_metrics(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for k, v in b.items():
            if k.endswith("_s") or k.endswith("_mb") or v is None:
                continue  # times and memory
            assert a[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (b["step"], k)


def test_split_head_trains_as_one_process(tmp_path):
    from grpo_fast.trainer import loop

    task = loop.get_task("reverse", n_digits=3)
    torch.manual_seed(0)
    one = _run_cfg(loop, str(tmp_path / "one"))
    one_model = loop.build_default_model(one, task)
    loop.train(one, model=one_model, task=task)
    run_two_processes(__file__, tmp_path)

    saved = torch.load(tmp_path / "tp.pt")
    for case in CASES:
        tr, cfg, lm, path, tensors = _case(case, str(tmp_path))
        before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
        want = _steps(tr, cfg, lm, path, tensors)
        got = saved["cases"][case[0]]
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=2e-6, rtol=1e-5, msg=lambda m: f"{case[0]} {n}: {m}")
        head = next(n for n in ("lm_head.weight", "wte.weight", "model.embed_tokens.weight") if n in want)
        assert float((want[head] - before[head]).abs().max()) > 1e-3  # the steps moved the split head
    split_draws = torch.stack([a for a, _ in saved["draws"]])
    whole_draws = torch.stack([b for _, b in saved["draws"]])
    assert torch.equal(split_draws, whole_draws)
    assert (split_draws[:, 0] < 19).all() and (split_draws[:, 1] >= 19).all()
    assert (split_draws[:, 2] == 18).all() and (split_draws[:, 3] == 19).all()
    assert len(set(split_draws[:, 4:].flatten().tolist())) > 20  # the draws spread over the vocabulary

    # end to end: the same steps as one process
    got, want = _metrics(tmp_path / "tp" / "metrics.jsonl"), _metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["reward_mean"] for r in got] == [r["reward_mean"] for r in want]
    assert len({r["reward_mean"] for r in want}) > 1 or want[0]["reward_mean"] > 0  # a non-trivial run
    _same_metrics(got, want)
    ckpt = torch.load(tmp_path / "tp" / "ckpt.pt", weights_only=False)
    one_ckpt = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)
    params = torch.load(tmp_path / "tp_params.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["vocab_parallel"] == 2
    assert ckpt["model"].keys() == one_ckpt["model"].keys()
    assert ckpt["optimizer"]["state"].keys() == one_ckpt["optimizer"]["state"].keys()
    for n, p in params.items():
        assert torch.equal(ckpt["model"][n], p), n  # the file holds the gathered weights
        torch.testing.assert_close(p, one_ckpt["model"][n], atol=1e-4, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    for n, st in ckpt["ref_model"].items():
        torch.testing.assert_close(st, one_ckpt["ref_model"][n], atol=1e-4, rtol=1e-4)
    # the split run's checkpoint loads in one process (whole tensors, by name)
    lm = loop.CausalLM(loop.build_default_model(one, task))
    opt = torch.optim.AdamW(lm.parameters(), lr=one.lr)
    assert loop.load_checkpoint(str(tmp_path / "tp"), lm, None, opt, {"prompts": torch.Generator()}) == 2
    for n, p in lm.model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
        assert torch.equal(opt.state[p]["exp_avg"], ckpt["optimizer"]["state"][n]["exp_avg"]), n
    # the one-process checkpoint resumed with the split head takes the one-process step 3
    loop.train(_run_cfg(loop, str(tmp_path / "one_resumed"), steps=3, resume=str(tmp_path / "one")), task=task)
    resumed = _metrics(tmp_path / "tp_resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3]
    _same_metrics(resumed, _metrics(tmp_path / "one_resumed" / "metrics.jsonl"))


def test_bad_splits_fail_at_start_up():
    from grpo_fast.model import GPTConfig, TinyGPT
    from grpo_fast.trainer import TrainConfig, tp

    with pytest.raises(ValueError, match="vocab_parallel must be an integer >= 1"):
        TrainConfig(vocab_parallel=0)
    with pytest.raises(ValueError, match="not with --dist fsdp nor --compare"):
        TrainConfig(vocab_parallel=2, dist="fsdp")
    with pytest.raises(ValueError, match="not with --dist fsdp nor --compare"):
        TrainConfig(vocab_parallel=2, compare=True)
    with pytest.raises(ValueError, match=r"vocab_parallel \(4\) must divide the number of processes \(6\)"):
        tp.check_world(4, 6, 8)
    with pytest.raises(ValueError, match=r"prompts_per_step \(3\) must be divisible by the number of data-parallel "
                                         r"replicas \(4 processes / vocab_parallel 2 = 2\)"):
        tp.check_world(2, 4, 3)
    tp.check_world(2, 4, 8)
    with pytest.raises(ValueError, match=r"vocab_parallel \(14\) must be at most the vocabulary size V = 13"):
        tp.shard_sizes(13, 14)
    assert tp.shard_sizes(13, 2) == [7, 6] and tp.shard_sizes(13, 13) == [1] * 13
    with pytest.raises(ValueError, match="vocab_parallel needs a model whose LM head is known"):
        tp.shard_lm_head(torch.nn.Sequential(torch.nn.Embedding(13, 8), torch.nn.Linear(8, 13)), None, None)
    model = TinyGPT(GPTConfig(vocab_size=13, n_embd=8, n_head=2))
    model.wte.max_norm = 1.0
    with pytest.raises(ValueError, match="tied to the LM head with max_norm"):
        tp.shard_lm_head(model, None, None)


def test_data_parallel_replicas_of_a_split_head(tmp_path):
    """dp × tp = 2 × 2 processes take the optimizer steps of one process on the whole batch."""
    run_two_processes(__file__, tmp_path, nproc=4)
    tr, cfg, lm, path, tensors = _case(DP_TP_CASE, str(tmp_path))
    want = _steps(tr, cfg, lm, path, tensors)
    got = torch.load(tmp_path / "dp_tp.pt")
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=2e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    summary = json.load(open(tmp_path / "dp_tp" / "summary.json"))
    assert summary["world_size"] == 4 and summary["vocab_parallel"] == 2
    assert [r["step"] for r in _metrics(tmp_path / "dp_tp" / "metrics.jsonl")] == [1, 2]


if __name__ == "__main__":
    (worker_dp_tp if os.environ.get("WORLD_SIZE") == "4" else worker)(sys.argv[1])
