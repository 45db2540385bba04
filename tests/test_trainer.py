"""The thin GRPO trainer: rewards, sampling, the update's gradient, one step end to end, resume, CLI.

Small on purpose (a tiny model, a few steps): the whole file runs in well under a minute on 2 cores.
"""
import dataclasses
import json
import math

import pytest
import torch

import grpo_fast
from grpo_fast import trainer as tr
from grpo_fast.model import GPTConfig, TinyGPT
from grpo_fast.tasks import CharTokenizer, addition_exact, digits_format, get_task, reversal_accuracy


def small_cfg(out, **kw) -> tr.TrainConfig:
    base = dict(out=str(out), steps=2, warmup_steps=2, prompts_per_step=4, group_size=4, n_layer=1, n_embd=32,
                n_head=2, vocab_size=0, progress=False, plots=False, threads=1)
    base.update(kw)
    return tr.TrainConfig(**base)


# ---- tasks and reward functions -------------------------------------------------------------

def test_tokenizer_round_trip_stops_at_eos():
    tok = CharTokenizer("0123456789=")
    ids = tok.encode("3071=")
    assert tok.decode(ids) == "3071="
    assert tok.decode(ids[:2] + [tok.eos_id] + ids[2:]) == "30"
    assert tok.decode([tok.pad_id] + ids[:1]) == "3"
    assert tok.decode(ids[:1] + [tok.vocab_size + 5]) == "3?"  # padded-vocabulary ids never read as digits


@pytest.mark.parametrize("completion,answer,expected", [
    ("1703", "1703", 1.0), ("1700", "1703", 0.75), ("17", "1703", 0.5), ("170399", "1703", 4 / 6),
    ("", "1703", 0.0), ("abcd", "1703", 0.0), ("3071", "1703", 0.0),
])
def test_reversal_accuracy(completion, answer, expected):
    assert reversal_accuracy(["x="], [completion], answer=[answer]) == [pytest.approx(expected)]


def test_format_and_addition_rewards():
    assert digits_format(["p"] * 4, ["1703", "170", "17a3", "17031"], answer=["1703"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert addition_exact(["12+34="] * 3, ["46", "47", "046"], answer=["46"] * 3) == [1.0, 0.0, 0.0]


def test_task_reward_is_the_weighted_sum_in_0_1():
    task = get_task("reverse", n_digits=4)
    g = torch.Generator().manual_seed(3)
    ex = task.sample(3, g)
    for e in ex:
        assert e["prompt"].endswith("=") and e["answer"] == e["prompt"][:-1][::-1]
    comps = [ex[0]["answer"], ex[1]["answer"][:2] + "xx", "99999"]
    total, parts = task.rewards([e["prompt"] for e in ex], comps, ex)
    want = 0.8 * parts["reversal_accuracy"] + 0.2 * parts["digits_format"]
    torch.testing.assert_close(total, want)
    assert total[0] == pytest.approx(1.0)
    assert bool(((total >= 0) & (total <= 1)).all())
    add = get_task("add", n_digits=2)
    e = add.sample(5, g)
    assert all(len(x["prompt"]) == 6 and int(x["prompt"][:2]) + int(x["prompt"][3:5]) == int(x["answer"]) for x in e)


# ---- sampling ----------------------------------------------------------------------------------

def test_completion_mask_includes_first_eos_only():
    eos = 1
    ids = torch.tensor([[5, 6, 1, 7, 1], [5, 6, 7, 8, 9], [1, 3, 3, 3, 3]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(tr.completion_mask_from_ids(ids, eos), want)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    m = TinyGPT(GPTConfig(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=32)).eval()
    x = torch.randint(0, 13, (3, 11))
    full = m(x)
    cache = m.new_cache(3, 12)
    steps = [m(x[:, :5], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


class FixedLogits(torch.nn.Module):
    """A 'causal LM' whose next-token logits are always ``z`` (no cache, no LM head)."""

    def __init__(self, z):
        super().__init__()
        self.z = torch.nn.Parameter(z.clone())

    def forward(self, input_ids):
        return self.z.expand(input_ids.shape[0], input_ids.shape[1], -1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_follows_softmax_over_temperature(temperature):
    # eos (id 1) has a tiny probability so that most rows run the full length
    z = torch.tensor([-30.0, -30.0, 0.3, -0.4, 1.1, 0.0])
    lm = tr.CausalLM(FixedLogits(z))
    n, T = 4000, 3
    prompt = torch.full((n, 2), 2)
    ids, mask = tr.sample_completions(lm, prompt, torch.ones(n, 2), max_new_tokens=T, temperature=temperature,
                                      eos_id=1, pad_id=0, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (n, T) and bool((mask == 1).all())
    freq = torch.bincount(ids.flatten(), minlength=6).double() / ids.numel()
    p = torch.softmax(z.double() / temperature, 0)
    # 12,000 draws: the standard error of each frequency is below 0.005
    torch.testing.assert_close(freq, p, atol=0.02, rtol=0)


def test_sampler_never_draws_a_token_of_probability_zero(monkeypatch):
    z = torch.randn(256, 50, generator=torch.Generator().manual_seed(0))
    banned = [0, *range(10, 20), 49]
    z[:, banned] = float("-inf")
    g = torch.Generator().manual_seed(1)
    drawn = torch.cat([tr.loop._sample_next(z, 0.7, g) for _ in range(40)])
    assert not bool(torch.isin(drawn, torch.tensor(banned)).any())
    assert len(set(drawn.tolist())) == 50 - len(banned)  # and every allowed token does come up
    # u rounding up to the total: the last token of positive probability (48), never V or a banned one
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw.get("dtype")))
    assert tr.loop._sample_next(z[:3], 1.0, None).tolist() == [48, 48, 48]


def test_sampling_stops_and_pads_after_eos_and_is_reproducible():
    torch.manual_seed(0)
    task = get_task("reverse", n_digits=3)
    m = TinyGPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, block_size=9, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():  # logits: 1 for EOS, 0 elsewhere (p(EOS) ~ 0.18): rows end at different lengths
        m.ln_f.weight.zero_()
        m.ln_f.bias.fill_(1.0)
        m.lm_head.weight.zero_()  # tied to the embedding; the embedding no longer matters here
        m.lm_head.weight[task.tokenizer.eos_id] = 1.0 / 16
    lm = tr.CausalLM(m)
    p_ids, p_mask = tr.encode_prompts(task, [e["prompt"] for e in task.sample(64, torch.Generator().manual_seed(1))], "cpu")
    kw = dict(max_new_tokens=5, temperature=1.0, eos_id=1, pad_id=0)
    a, ma = tr.sample_completions(lm, p_ids, p_mask, generator=torch.Generator().manual_seed(7), **kw)
    b, mb = tr.sample_completions(lm, p_ids, p_mask, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert a.shape[1] <= 5
    ended = (a == 1).any(1)
    assert bool(ended.any()), "the test wants some rows that stop early"
    for row, m_row in zip(a, ma):
        n = int(m_row.sum())
        if (row == 1).any():
            assert int((row == 1).nonzero()[0]) == n - 1  # the EOS is the last masked token
        assert bool((row[n:] == 0).all())  # pad after it
    assert bool((a[~ended] != 1).all()) and int(ma[~ended].sum(1).min()) == a.shape[1]


# ---- the update --------------------------------------------------------------------------------

def _random_batch(task, lm, B, G, seed, cfg):
    g = torch.Generator().manual_seed(seed)
    ex = [e for e in task.sample(B // G, g) for _ in range(G)]
    p_ids, p_mask = tr.encode_prompts(task, [e["prompt"] for e in ex], "cpu")
    comp, mask = tr.sample_completions(lm, p_ids, p_mask, max_new_tokens=task.max_new_tokens, temperature=1.0,
                                       eos_id=1, pad_id=0, generator=g)
    rewards = torch.rand(B, generator=g)
    # dr_grpo divides by the sampling limit, deliberately not the batch's T here
    batch = tr.build_batch(p_ids, p_mask, comp, mask, tr.advantages_for_rank(rewards, cfg, 0, 1), comp.shape[1] + 3)
    if cfg.beta != 0:
        batch["ref_logp"] = torch.randn(comp.shape, generator=g) * 0.1 - 2.0
    if cfg.num_iterations > 1:
        batch["old_logp"] = tr.sequence_logprobs(lm, batch, cfg, B) + 0.05 * torch.randn(comp.shape, generator=g)
    return batch


def _grads(lm, batch, cfg, path):
    lm.zero_grad(set_to_none=True)
    logs = tr.accumulate_gradients(lm, lm, batch, cfg, path, 1)
    return {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}, logs


def _eager_loss_grads(lm, batch, cfg):
    """The same gradient from the float64 eager reference on the whole batch at once."""
    from grpo_fast.reference import grpo_loss_reference

    lm.zero_grad(set_to_none=True)
    T = batch["completion_ids"].shape[1]
    logits = lm(batch["input_ids"], batch["attention_mask"], T)
    opts = tr.loss_options(cfg)
    opts.pop("backend")
    loss, _ = grpo_loss_reference(logits.double(), batch["completion_ids"], batch["advantages"],
                                  old_logp=batch["old_logp"], ref_logp=batch["ref_logp"],
                                  completion_mask=batch["completion_mask"],
                                  max_completion_length=batch["max_completion_length"], **opts)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}, float(loss.detach())


# (loss path, backend): the eager reference has no fused-linear form in the trainer
PATH_BACKENDS = [("logits", "auto"), ("logits", "torch")] + (
    [("fused_linear", "auto")] if hasattr(grpo_fast, "fused_linear_grpo_loss") else [])


@pytest.mark.parametrize("path,backend", PATH_BACKENDS)
@pytest.mark.parametrize("loss_type,beta,accum,iters", [("dapo", 0.04, 3, 1), ("grpo", 0.0, 2, 2), ("dr_grpo", 0.1, 1, 1)])
def test_accumulated_gradient_equals_float64_full_batch(tmp_path, path, backend, loss_type, beta, accum, iters):
    task = get_task("reverse", n_digits=3)
    torch.manual_seed(0)
    lm = tr.CausalLM(TinyGPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=24)))
    cfg = small_cfg(tmp_path, loss_type=loss_type, beta=beta, grad_accum=accum, num_iterations=iters,
                    loss_backend=backend, max_new_tokens=task.max_new_tokens)
    batch = _random_batch(task, lm, 12, 4, 5, cfg)
    got, logs = _grads(lm, batch, cfg, path)
    want, want_loss = _eager_loss_grads(lm, batch, cfg)
    assert logs["loss"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n].float(), atol=2e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_old_and_ref_logprobs_match_the_logits_path(tmp_path):
    task = get_task("reverse", n_digits=3)
    torch.manual_seed(1)
    lm = tr.CausalLM(TinyGPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=24)))
    cfg = small_cfg(tmp_path, temperature=0.7)
    batch = _random_batch(task, lm, 8, 4, 2, cfg)
    auto = tr.sequence_logprobs(lm, batch, cfg, 3)  # fused-linear when available
    T = batch["completion_ids"].shape[1]
    with torch.no_grad():
        z = lm(batch["input_ids"], batch["attention_mask"], T).double() / 0.7
    want = torch.log_softmax(z, -1).gather(-1, batch["completion_ids"][..., None])[..., 0]
    # valid rows only: a padding token is not computed and gets 0 (the loss never reads it)
    valid = batch["completion_mask"] != 0
    assert 0 < int(valid.sum()) < valid.numel()  # the batch has padding: the mask is exercised
    want = torch.where(valid, want, torch.zeros_like(want))
    torch.testing.assert_close(auto, want.float(), atol=1e-5, rtol=1e-5)
    logits_path = tr.sequence_logprobs(lm, batch, dataclasses.replace(cfg, loss_path="logits"), 5)
    torch.testing.assert_close(logits_path, want.float(), atol=1e-5, rtol=1e-5)


# ---- end to end ---------------------------------------------------------------------------------

REQUIRED = ("step", "reward_mean", "loss", "kl", "entropy", "step_time_s", "peak_mem_mb")


def test_one_training_run_writes_metrics_summary_plots(tmp_path):
    cfg = small_cfg(tmp_path / "run", steps=2, plots=True, vocab_size=300)
    summary = tr.train(cfg)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in REQUIRED:
            assert k in r and r[k] is not None and math.isfinite(r[k]), k
        assert 0.0 <= r["reward_mean"] <= 1.0
    assert json.load(open(tmp_path / "run" / "summary.json"))["steps"] == 2
    assert summary["loss_path"] in ("logits", "fused_linear")
    for png in ("reward.png", "loss.png", "curves.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
    assert (tmp_path / "run" / "ckpt.pt").exists()


def test_resume_reproduces_the_next_step(tmp_path):
    kw = dict(num_iterations=2, grad_accum=2)
    tr.train(small_cfg(tmp_path / "a", steps=3, **kw))
    tr.train(small_cfg(tmp_path / "b", steps=2, **kw))
    tr.train(small_cfg(tmp_path / "b", steps=3, resume=str(tmp_path / "b"), **kw))
    a = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in b] == [1, 2, 3]
    skip = ("step_time_s", "rollout_time_s", "update_time_s", "peak_mem_mb", "rollout_peak_mem_mb")
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in skip} == {k: v for k, v in rb.items() if k not in skip}
    sa = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_from_a_checkpoint_with_the_optimizer_state_keyed_by_position(tmp_path):
    """Checkpoints written before they keyed the optimizer state by parameter name resume as before."""
    import shutil

    tr.train(small_cfg(tmp_path / "b", steps=2))
    shutil.copytree(tmp_path / "b", tmp_path / "old")
    state = torch.load(tmp_path / "old" / "ckpt.pt", weights_only=False)
    lm = tr.CausalLM(tr.build_default_model(small_cfg(tmp_path / "x"), get_task("reverse", n_digits=3)))
    opt = torch.optim.AdamW(lm.parameters(), lr=0.1)
    tr.load_checkpoint(str(tmp_path / "b"), lm, None, opt, {})
    state["optimizer"] = opt.state_dict()  # the older format: optimizer.state_dict(), keyed by position
    del state["optimizer_keys"]
    assert set(state["optimizer"]["state"]) == set(range(len(list(lm.parameters()))))
    torch.save(state, tmp_path / "old" / "ckpt.pt")
    for run in ("b", "old"):
        tr.train(small_cfg(tmp_path / run, steps=3, resume=str(tmp_path / run)))
    b, old = (torch.load(tmp_path / run / "ckpt.pt", weights_only=False) for run in ("b", "old"))
    for k in b["model"]:
        assert torch.equal(b["model"][k], old["model"][k]), k
    assert old["optimizer_keys"] == "names"


def test_cli_flags_round_trip():
    cfg = tr.parse_args(["--out", "x", "--steps", "7", "--loss-backend", "torch", "--no-progress", "--lr", "0.01", "--seed", "3"])
    assert (cfg.out, cfg.steps, cfg.loss_backend, cfg.progress, cfg.lr, cfg.seed) == ("x", 7, "torch", False, 0.01, 3)
    again = tr.parse_args(tr._cli_args(cfg))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_compare_prints_table_and_writes_both_runs(tmp_path, capfd):
    out = tmp_path / "cmp"
    rc = tr.main(["--compare", "--out", str(out), "--steps", "2", "--warmup-steps", "1", "--prompts-per-step", "4",
                  "--group-size", "2", "--n-layer", "1", "--n-embd", "16", "--vocab-size", "300", "--no-progress",
                  "--threads", "1"])
    assert rc == 0
    text = capfd.readouterr().out
    res = json.load(open(out / "compare.json"))
    fs, rs = res["arms"]["fused"], res["arms"]["reference"]
    assert rs["loss_backend"] == "torch" and rs["loss_path"] == "logits" and fs["loss_backend"] != "torch"
    assert fs["vocab_size"] == rs["vocab_size"] == 300 and fs["hidden_size"] == 16
    # the ratios in compare.json are the arms' own numbers, and the printed table says them in words
    assert res["update_speedup"] == pytest.approx(rs["median_update_time_s"] / fs["median_update_time_s"])
    assert res["update_peak_mem_saved_mb"] == pytest.approx(rs["peak_mem_mb"] - fs["peak_mem_mb"])
    assert res["table"] in text
    for words in ("What to look at", "update (loss forward + backward + AdamW step): the fused loss is",
                  "peak memory during the update", "learning: the mean reward went", "agreement: at step 1 (same weights, same samples)",
                  "V=300", "H=16", "machine:"):
        assert words in text, words
    for arm in ("fused", "reference"):
        assert (out / arm / "metrics.jsonl").exists() and (out / arm / "reward.png").exists()
    assert (out / "compare.png").stat().st_size > 1000


def _arm_summary(backend, path, update_s, step_s, peak, first, last):
    return {"task": "reverse", "task_description": "reverse 3 digits", "steps": 100, "device": "cpu", "loss_backend": backend,
            "loss_path": path, "median_update_time_s": update_s, "median_step_time_s": step_s, "median_rollout_time_s": step_s - update_s,
            "peak_mem_mb": peak, "reward_first_tenth": first, "reward_last_tenth": last, "reward_gain": last - first,
            "vocab_size": 32768, "hidden_size": 64, "threads": 1,
            "config": {"model": "tiny", "prompts_per_step": 8, "group_size": 8, "seed": 0}}


def _rows(rewards, losses):
    return [{"step": i + 1, "reward_mean": r, "loss": l} for i, (r, l) in enumerate(zip(rewards, losses))]


def test_compare_report_says_the_ratios_in_words():
    fs = _arm_summary("auto", "fused_linear", 0.1, 0.3, 500.0, 0.45, 0.85)
    rs = _arm_summary("torch", "logits", 0.42, 0.65, 800.0, 0.45, 0.9)
    fa = _rows([0.4, 0.5, 0.6, 0.7], [0.1, 0.2, 0.3, 0.4])
    ref = _rows([0.4, 0.5, 0.65, 0.7], [0.1, 0.2 + 1e-7, 0.25, 0.4])
    text, num = tr.compare_report(fs, rs, fa, ref)
    assert num["update_speedup"] == pytest.approx(4.2) and num["step_speedup"] == pytest.approx(0.65 / 0.3)
    assert num["update_peak_mem_saved_mb"] == pytest.approx(300) and num["update_peak_mem_saved_frac"] == pytest.approx(0.375)
    assert num["identical_reward_steps"] == 2 and num["max_abs_loss_diff_while_identical"] == pytest.approx(1e-7, rel=1e-3)
    assert num["max_abs_diff"]["reward_mean"] == pytest.approx(0.05)
    assert "the fused loss is 4.2x faster (median 0.1 s vs 0.42 s per step)" in text
    assert "300 MB less (38% lower: 500 vs 800 MB" in text
    assert "0.45 -> 0.85 (+0.40) with the fused loss and 0.45 -> 0.90 (+0.45) with the reference" in text
    assert "identical rewards for the first 2 of 4 steps" in text and num["first_step_loss_diff"] == 0.0
    assert "whole step, sampling included (the same code in both arms): 2.2x faster" in text
    # a run where the fused loss loses says so
    slow = _arm_summary("auto", "fused_linear", 0.84, 1.0, 880.0, 0.3, 0.3)
    text, num = tr.compare_report(slow, rs, fa, ref)
    assert num["update_speedup"] == pytest.approx(0.5)
    assert "the fused loss is 2.00x slower" in text and "80 MB more (10% higher" in text and "(+0.00)" in text
    same = _arm_summary("auto", "fused_linear", 0.42, 0.65, 800.0, 0.45, 0.9)
    text, num = tr.compare_report(same, rs, fa, fa)
    assert "the same (800 vs 800 MB" in text and "identical rewards for the first 4 of 4 steps (losses within 0)" in text
    assert "sample different tokens" not in text


def test_hugging_face_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    task = get_task("reverse", n_digits=3)
    conf = transformers.LlamaConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=16, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf)
    lm = tr.CausalLM(model)
    assert lm.is_hf and lm.lm_head() is not None
    ids = torch.randint(2, task.tokenizer.vocab_size, (3, 7))
    am = torch.ones(3, 7)
    torch.testing.assert_close(lm(ids, am, 4), model(input_ids=ids).logits[:, -4:], atol=1e-5, rtol=1e-5)
    summary = tr.train(small_cfg(tmp_path / "hf", steps=2, warmup_steps=1), model=model, task=task)
    assert summary["steps"] == 2


class LogitsOnly(torch.nn.Module):
    """A plain causal LM: forward(input_ids) -> (logits,) — no cache, no known LM head."""

    def __init__(self, vocab_size):
        super().__init__()
        self.inner = TinyGPT(GPTConfig(vocab_size=vocab_size, block_size=12, n_layer=1, n_head=2, n_embd=16))

    def forward(self, input_ids):
        return (self.inner(input_ids),)


def test_any_module_returning_logits_trains(tmp_path):
    task = get_task("reverse", n_digits=3)
    torch.manual_seed(0)
    model = LogitsOnly(task.tokenizer.vocab_size)
    before = [p.detach().clone() for p in model.parameters()]
    summary = tr.train(small_cfg(tmp_path / "plain", steps=2, warmup_steps=0, beta=0.04, num_iterations=2), model=model, task=task)
    assert summary["loss_path"] == "logits"
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- configuration checks: every invalid flag is exit code 2 and one line, before any training ----

def _tiny_argv(out):
    return ["--out", str(out), "--steps", "1", "--warmup-steps", "0", "--prompts-per-step", "2", "--group-size", "2",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--vocab-size", "0", "--no-progress", "--no-plots"]


# (flag, value, words the error line must contain: the flag and its valid range)
INVALID_FLAGS = [
    ("--steps", "0", ">= 1"),
    ("--group-size", "0", ">= 2"),
    ("--group-size", "1", ">= 2"),
    ("--prompts-per-step", "0", ">= 1"),
    ("--grad-accum", "0", ">= 1"),
    ("--temperature", "0", "> 0"),
    ("--temperature", "nan", "> 0"),
    ("--max-new-tokens", "-1", ">= 0"),
    ("--num-iterations", "0", ">= 1"),
    ("--lr", "-1", ">= 0"),
    ("--loss-type", "foo", "dapo"),
    ("--n-embd", "15", "multiple of --n-head"),
    ("--dist", "fsdp1", "ddp, fsdp"),
]


@pytest.mark.parametrize("flag,value,expected", INVALID_FLAGS)
def test_invalid_flag_exits_2_with_one_line(tmp_path, capfd, flag, value, expected):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        tr.main(_tiny_argv(out) + [flag, value])
    assert e.value.code == 2
    err = capfd.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert flag in err and expected in err and value in err, err
    assert not (out / "metrics.jsonl").exists()  # rejected before training


def test_out_that_is_a_file_exits_2(tmp_path, capfd):
    f = tmp_path / "taken"
    f.write_text("not a directory")
    with pytest.raises(SystemExit) as e:
        tr.main(_tiny_argv(f))
    assert e.value.code == 2
    err = capfd.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "--out" in err and "directory" in err, err
    assert f.read_text() == "not a directory"


def test_invalid_flag_from_the_command_line_is_exit_code_2(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "grpo_fast", "train", *_tiny_argv(tmp_path / "run"), "--group-size", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--group-size" in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("field,value", [("steps", 0), ("group_size", 1), ("temperature", 0.0), ("num_iterations", 0),
                                         ("grad_accum", 0), ("max_new_tokens", -1), ("steps", "3"), ("dtype", "float16")])
def test_train_config_rejects_out_of_range_fields(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        tr.train(small_cfg(tmp_path / "run", **{field: value}))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_every_default_and_the_test_config_are_valid(tmp_path):
    tr.TrainConfig()
    small_cfg(tmp_path)
    for f in dataclasses.fields(tr.TrainConfig):
        assert f.name in tr.CONFIG_CHECKS, f"TrainConfig.{f.name} has no range check"


def test_warmup_stops_at_the_target_reward(tmp_path, monkeypatch):
    seen = []

    def fake_reward(lm, task, cfg, device, n=128):
        seen.append(n)
        return [0.1, 0.3, 0.45, 0.9][len(seen) - 1]

    monkeypatch.setattr(tr.loop, "policy_reward", fake_reward)
    s = tr.train(small_cfg(tmp_path / "a", steps=1, warmup_steps=40, warmup_target_reward=0.4))
    assert (s["warmup_steps_done"], s["warmup_final_reward"], len(seen)) == (15, 0.45, 3)  # checked every 5 steps
    seen.clear()
    s = tr.train(small_cfg(tmp_path / "b", steps=1, warmup_steps=12, warmup_target_reward=0.0))
    assert (s["warmup_steps_done"], s["warmup_final_reward"], seen) == (12, None, [])


def test_policy_reward_is_the_task_reward_of_sampled_completions(tmp_path):
    task = get_task("reverse", n_digits=3)
    torch.manual_seed(0)
    lm = tr.CausalLM(TinyGPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, block_size=9, n_layer=1, n_head=2, n_embd=16)))
    cfg = small_cfg(tmp_path)
    r = tr.policy_reward(lm, task, cfg, "cpu", n=32)
    assert 0.0 <= r <= 1.0 and r == tr.policy_reward(lm, task, cfg, "cpu", n=32)  # fixed prompts and samples
