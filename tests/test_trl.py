"""grpo_fast.integrations.trl against TRL's own GRPOTrainer loss (trl 1.16).

A tiny random Qwen2 (built from a config, no download) and a word-level tokenizer built in memory
are saved to a temporary folder; TRL's GRPOTrainer and the drop-in both load them, so both start
from identical weights. Each comparison feeds the same hand-made batch in TRL's layout (prompt +
completion ids and masks, advantages, old/ref log-probs near the model's own, vLLM ratios,
num_items_in_batch) to ``compute_loss`` of each trainer, back-propagates, and compares the loss, every
parameter's gradient (fp32, 1e-5 relative) and the logged metrics. A short training run checks the
drop-in end to end, on batches TRL generates itself.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

# Nothing here needs the Hub: no telemetry pings from TRL's trainer, no download attempts.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

trl = pytest.importorskip("trl", reason="the TRL integration needs trl: pip install 'grpo_fast[trl]'")
pytest.importorskip("transformers", reason="the TRL integration needs transformers")
pytest.importorskip("datasets", reason="TRL's trainer needs datasets")
pytest.importorskip("tokenizers", reason="the test tokenizer is built with tokenizers")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from grpo_fast.integrations import trl as gf_trl  # noqa: E402
from grpo_fast.integrations.trl import GRPOTrainer, patch_trl, unpatch_trl  # noqa: E402

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"]
LEVELS = ["token", "sequence"]
RTOL = 1e-5  # fp32 model, fp32 loss: both sides accumulate in fp32
V = 97  # odd on purpose: no power-of-two tiling hides a tail bug
WORDS = ("the a cat dog sat on mat ran to red blue big small one two three four five six seven eight nine ten "
         "yes no up down left right fast slow hot cold").split()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's advice on loss_type/level pairs, deprecations
        yield


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


_SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1, pad_token_id=0, bos_token_id=None,
              initializer_range=0.3)  # spread-out logits: entropies and ratios far from their degenerate values


def _save(path, config, model_cls):
    torch.manual_seed(1234)
    tok = _tokenizer()
    model_cls(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, tokenizer): a 2-layer Qwen2 with V = 97 and a word-level tokenizer, saved without any download."""
    return _save(tmp_path_factory.mktemp("tiny_qwen2"), Qwen2Config(**_SMALL, tie_word_embeddings=False), Qwen2ForCausalLM)


def _reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _build(cls, tiny, tmp_path, **config):
    path, tok = tiny
    config.setdefault("per_device_train_batch_size", 6)
    config.setdefault("num_generations", 3)
    config.setdefault("max_completion_length", 8)
    config.setdefault("bf16", False)
    args = trl.GRPOConfig(output_dir=str(tmp_path / cls.__module__), report_to=[], use_cpu=True, save_strategy="no",
                          logging_steps=1, **config)
    ds = Dataset.from_dict({"prompt": ["the cat sat", "a dog ran to", "one two", "big red mat", "yes no up", "hot cold"]})
    return cls(model=path, reward_funcs=_reward_len, args=args, train_dataset=ds, processing_class=tok)


def _batch(trainer, *, seed=0, B=6, P=5, T=7, adv_2d=False, isr=None, tool_mask=False, on_policy=False):
    """A batch in the layout of TRL's _generate_and_score_completions, with log-probs near the model's own."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left-padded prompt
    completion_ids = torch.randint(3, V, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[2, 4:] = 0  # a short completion
    completion_mask[3, 1:] = 0  # a one-token completion
    # Signs alternate so that the row shifts below clip both ways: row 0 low (r < 1 - ε, A < 0), row 1 high.
    sign = torch.tensor([-1.0, 1.0] * B)[:B]
    advantages = (0.2 + torch.rand(B, generator=g)) * sign
    if adv_2d:
        advantages = advantages.unsqueeze(1) * (0.5 + torch.rand(B, T, generator=g))
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T)
    # A per-row shift of the old log-probs moves whole sequences out of the clip range (so the
    # sequence level clips too): ratio ≈ exp(-shift), 0.64 for row 0, 1.57 for row 1.
    row = torch.tensor([0.45, -0.45, 0.1, -0.2, 0.3, 0.0] * B)[:B].unsqueeze(1)
    inputs = dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=completion_mask,
        advantages=advantages,
        # the generation batch's global token count: steps_per_generation accumulation windows of this size
        num_items_in_batch=completion_mask.sum() * trainer.args.steps_per_generation,
        ref_per_token_logps=logp + 0.3 * torch.randn(B, T, generator=g),
    )
    if not on_policy:
        inputs["old_per_token_logps"] = logp + row + 0.2 * torch.randn(B, T, generator=g)
    if isr == "token":
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(B, T, generator=g)
    elif isr == "sequence":
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(B, 1, generator=g)
    if tool_mask:
        tm = torch.ones(B, T, dtype=torch.long)
        tm[0, 2:4] = 0
        inputs["tool_mask"] = tm
    return inputs


def _step(trainer, inputs, *, train=True, ga=2, use_vllm=False):
    """One compute_loss + backward; returns (loss, {param: grad}, {metric: last value})."""
    trainer.model.train(train)
    trainer.current_gradient_accumulation_steps = ga
    # vLLM cannot run here; its importance-sampling correction is only a flag read by _compute_loss.
    trainer.use_vllm = use_vllm
    trainer.vllm_importance_sampling_correction = use_vllm
    for m in trainer._metrics.values():
        m.clear()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    mode = "train" if train else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items() if v}
    return loss.detach(), grads, metrics


def _assert_same_step(ref, ours, *, rtol=RTOL):
    (l0, g0, m0), (l1, g1, m1) = ref, ours
    assert torch.isfinite(l0) and torch.isfinite(l1)
    # abs floor: a loss that is a sum of O(1) terms of both signs cancels to ~1e-3 in some cases
    # (cispo here), and then fp32 summation order alone moves it by ~1e-7 on either side.
    assert math.isclose(l1.item(), l0.item(), rel_tol=rtol, abs_tol=1e-6), f"loss: trl {l0.item()!r} grpo_fast {l1.item()!r}"
    assert set(g0) == set(g1), f"parameters with a gradient differ: {sorted(set(g0) ^ set(g1))}"
    worst = max(g0, key=lambda n: ((g1[n] - g0[n]).norm() / g0[n].norm().clamp(min=1e-30)).item())
    err = ((g1[worst] - g0[worst]).norm() / g0[worst].norm().clamp(min=1e-30)).item()
    idx = (g1[worst] - g0[worst]).abs().argmax()
    assert err <= rtol, (f"gradient of {worst}: relative error {err:.3g} > {rtol}; worst element {idx.item()} trl "
                         f"{g0[worst].flatten()[idx].item()!r} grpo_fast {g1[worst].flatten()[idx].item()!r}")
    # Every TRL metric the drop-in logs, under TRL's name; only the per-sequence extremes are not logged.
    for name in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio",
                 "aux_loss", "vespo/phi_seq_mean", "policy_loss", "entropy_coef"):
        assert (name in m0) == (name in m1), f"metric {name}: logged by trl {name in m0}, by grpo_fast {name in m1}"
        if name in m0:
            assert math.isclose(m1[name], m0[name], rel_tol=1e-5, abs_tol=1e-6), f"metric {name}: trl {m0[name]} grpo_fast {m1[name]}"


def _compare(tiny, tmp_path, *, config=None, batch=None, step=None, ours_kwargs=None):
    config = dict(config or {})
    ref_tr = _build(trl.GRPOTrainer, tiny, tmp_path, **config)
    our_tr = _build(lambda **kw: GRPOTrainer(**kw, **(ours_kwargs or {})), tiny, tmp_path, **config)
    our_tr.model.load_state_dict(ref_tr.model.state_dict())  # identical already (same files); made explicit
    inputs = _batch(ref_tr, **(batch or {}))
    ref = _step(ref_tr, inputs, **(step or {}))
    ours = _step(our_tr, inputs, **(step or {}))
    _assert_same_step(ref, ours)
    return ref, ours


# ---- one step: loss, gradients and metrics equal TRL's ---------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_step_matches_trl(tiny, tmp_path, loss_type, level):
    eps_high = 5.0 if loss_type == "cispo" else 0.28  # cispo: TRL's raw cap on the ratio
    ref, _ = _compare(tiny, tmp_path, config=dict(
        loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon=0.2, epsilon_high=eps_high,
        gradient_accumulation_steps=2, steps_per_generation=4,
    ))
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        # the inputs must exercise the clipped branch, or the comparison proves little
        assert ref[2]["clip_ratio/region_mean"] > 0


# GRPOConfig values that TRL 1.16 ignores for a loss type, each one grpo_fast's validation would reject if it
# were used: epsilon outside [0, 1), delta <= 1 + epsilon_high, epsilon_high < 0, SAPO temperatures <= 0 or NaN.
# cispo's epsilon_high (its cap, which TRL reads) is set, so that TRL's epsilon is not its default.
IGNORED_VALUES = {
    "cispo": dict(epsilon=1.5, epsilon_high=1.1, delta=0.5, sapo_temperature_pos=-1.0, sapo_temperature_neg=0.0),
    "sapo": dict(epsilon=1.5, epsilon_high=-0.5, delta=0.5),
    "dapo": dict(sapo_temperature_pos=float("nan"), sapo_temperature_neg=-1.0),
}

OPTION_CASES = {
    "delta": dict(config=dict(loss_type="grpo", delta=1.5, epsilon_high=0.28)),
    "temperature": dict(config=dict(loss_type="dapo", temperature=0.7, beta=0.02)),
    "no_bias_correction_kl": dict(config=dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False)),
    "on_policy_beta0": dict(config=dict(loss_type="dapo", beta=0.0), batch=dict(on_policy=True)),
    "vllm_is_token": dict(config=dict(loss_type="dapo", beta=0.04), batch=dict(isr="token"), step=dict(use_vllm=True)),
    "vllm_is_sequence": dict(config=dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
                             batch=dict(isr="sequence"), step=dict(use_vllm=True)),
    "top_entropy_quantile": dict(config=dict(loss_type="dapo", top_entropy_quantile=0.4, beta=0.04)),
    "top_entropy_quantile_vllm": dict(config=dict(loss_type="grpo", top_entropy_quantile=0.3, beta=0.04),
                                      batch=dict(isr="token"), step=dict(use_vllm=True)),
    "dr_grpo_max_len": dict(config=dict(loss_type="dr_grpo", max_completion_length=11)),
    "sapo_temperatures": dict(config=dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.3, beta=0.04)),
    "eval_mode": dict(config=dict(loss_type="dapo", beta=0.04, gradient_accumulation_steps=2), step=dict(train=False)),
    "eval_mode_grpo": dict(config=dict(loss_type="grpo", gradient_accumulation_steps=2), step=dict(train=False)),
    "ga1": dict(config=dict(loss_type="cispo", epsilon_high=1.1), step=dict(ga=1)),
    "tool_mask": dict(config=dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.04), batch=dict(tool_mask=True)),
    "advantages_2d": dict(config=dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04), batch=dict(adv_2d=True)),
    "T1": dict(config=dict(loss_type="bnpo", beta=0.04), batch=dict(T=1, P=3)),
    "backend_torch": dict(config=dict(loss_type="dapo", beta=0.04), ours_kwargs=dict(grpo_fast_backend="torch")),
    "cast_lm_head_fp32": dict(config=dict(loss_type="dapo", beta=0.04, cast_lm_head_to_fp32=True)),
    "logits_path": dict(config=dict(loss_type="grpo", beta=0.04), ours_kwargs=dict(grpo_fast_fused_linear=False)),
    # On the log-prob primitive (fused_linear_logprobs + the loss in torch on (B, T) vectors):
    "vespo": dict(config=dict(loss_type="vespo", beta=0.04)),
    "vespo_params_seq_bias_kl": dict(config=dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.1,
                                                  use_bias_correction_kl=True, vespo_k_pos=1.5, vespo_lambda_pos=2.0,
                                                  vespo_k_neg=2.5, vespo_lambda_neg=1.5), step=dict(ga=1)),
    "vespo_vllm_is": dict(config=dict(loss_type="vespo", beta=0.04), batch=dict(isr="token"), step=dict(use_vllm=True)),
    "vespo_eval": dict(config=dict(loss_type="vespo", top_entropy_quantile=0.5), step=dict(train=False)),
    # TRL's vespo reads neither the clip range, delta nor the SAPO temperatures: values grpo_fast rejects
    # for the other loss types are accepted (not checked, not used), and the step still matches TRL.
    "vespo_ignores_clip_options": dict(config=dict(loss_type="vespo", beta=0.04, epsilon=1.5, epsilon_high=-0.5,
                                                    delta=0.5, sapo_temperature_pos=-1.0, sapo_temperature_neg=0.0)),
    # Likewise cispo reads only epsilon_high (the cap), sapo no clip option, the clip family no SAPO temperature
    # (IGNORED_OPTIONS): values grpo_fast would reject are not checked and do not change the step.
    "cispo_ignores_epsilon_delta_sapo": dict(config=dict(loss_type="cispo", beta=0.04, **IGNORED_VALUES["cispo"])),
    "sapo_ignores_clip_options": dict(config=dict(loss_type="sapo", beta=0.04, **IGNORED_VALUES["sapo"])),
    "dapo_ignores_sapo_temperatures": dict(config=dict(loss_type="dapo", beta=0.04, **IGNORED_VALUES["dapo"])),
    "entropy_coef_dapo": dict(config=dict(loss_type="dapo", beta=0.04, entropy_coef=0.05)),
    "entropy_coef_grpo_seq": dict(config=dict(loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.1,
                                              beta=0.04)),
    "entropy_coef_top_quantile": dict(config=dict(loss_type="bnpo", entropy_coef=0.1, top_entropy_quantile=0.4)),
    "entropy_coef_logits_path": dict(config=dict(loss_type="sapo", entropy_coef=0.1, beta=0.04),
                                     ours_kwargs=dict(grpo_fast_fused_linear=False)),
    "entropy_coef_eval": dict(config=dict(loss_type="cispo", entropy_coef=0.1, epsilon_high=1.1), step=dict(train=False)),
    "off_policy_mask": dict(config=dict(loss_type="grpo", off_policy_mask_threshold=0.3, beta=0.04)),
    "off_policy_mask_seq_luspo": dict(config=dict(loss_type="luspo", importance_sampling_level="sequence",
                                                  off_policy_mask_threshold=0.1)),
    "off_policy_mask_vllm_dr_grpo": dict(config=dict(loss_type="dr_grpo", off_policy_mask_threshold=0.2, beta=0.04),
                                         batch=dict(isr="token"), step=dict(use_vllm=True)),
    "all_three": dict(config=dict(loss_type="vespo", off_policy_mask_threshold=0.3, entropy_coef=0.02, beta=0.04,
                                  top_entropy_quantile=0.6)),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_option_matches_trl(tiny, tmp_path, case):
    _compare(tiny, tmp_path, **OPTION_CASES[case])


def _arch(name):
    """Architectures whose LM head differs from Qwen2's: tied embeddings, a final logit softcap, a logit scale."""
    import transformers

    if name == "qwen2_tied":
        return Qwen2Config(**_SMALL, tie_word_embeddings=True), Qwen2ForCausalLM
    if name == "gemma2_softcap":  # z = c·tanh(z/c) before the temperature; c small so that it bends the logits
        cfg = transformers.Gemma2Config(**_SMALL, head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=None)
        return cfg, transformers.Gemma2ForCausalLM
    if name == "granite_scale":  # logits divided by logits_scaling
        cfg = transformers.GraniteConfig(**_SMALL, logits_scaling=0.25)
        return cfg, transformers.GraniteForCausalLM
    if name == "qwen2_moe_aux":  # the router load-balancing loss is added to the policy loss
        cfg = transformers.Qwen2MoeConfig(**_SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=32, output_router_logits=True,
                                          router_aux_loss_coef=0.05, decoder_sparse_step=1)
        return cfg, transformers.Qwen2MoeForCausalLM
    raise ValueError(name)


@pytest.mark.parametrize("arch", ["qwen2_tied", "gemma2_softcap", "granite_scale", "qwen2_moe_aux"])
@pytest.mark.parametrize("fused_linear", [True, False], ids=["fused_linear", "logits"])
def test_architecture_matches_trl(tmp_path, arch, fused_linear):
    model = _save(tmp_path / arch, *_arch(arch))
    _compare(model, tmp_path, config=dict(loss_type="grpo", beta=0.04, temperature=0.8),
             ours_kwargs=dict(grpo_fast_fused_linear=fused_linear))


def _grad_err(a, b):
    """max over parameters of ||a - b|| / ||b||."""
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-30)).item() for n in b)


@pytest.mark.parametrize("fused_linear", [True, False], ids=["fused_linear", "logits"])
def test_bf16_autocast_close_to_trl(tiny, tmp_path, fused_linear):
    """bf16=True (accelerate's autocast, here on CPU): the drop-in runs its forward under the same autocast as TRL.

    bf16 GEMMs round differently in the two implementations, so no 1e-5 match: the drop-in must be
    much closer to TRL-in-bf16 than TRL-in-bf16 is to TRL-in-fp32 (the error bf16 itself brings).
    """
    config = dict(loss_type="dapo", beta=0.04)
    ref32_tr = _build(trl.GRPOTrainer, tiny, tmp_path, **config)
    inputs = _batch(ref32_tr)
    ref32 = _step(ref32_tr, inputs)
    ref_tr = _build(trl.GRPOTrainer, tiny, tmp_path, bf16=True, **config)
    assert ref_tr.accelerator.mixed_precision == "bf16"
    ref = _step(ref_tr, inputs)
    ours = _step(_build(lambda **kw: GRPOTrainer(**kw, grpo_fast_fused_linear=fused_linear), tiny, tmp_path,
                        bf16=True, **config), inputs)
    assert math.isclose(ours[0].item(), ref[0].item(), rel_tol=1e-4), f"loss: trl {ref[0].item()} grpo_fast {ours[0].item()}"
    bf16_effect = _grad_err(ref[1], ref32[1])
    assert bf16_effect > 1e-3  # autocast really ran in bf16
    assert _grad_err(ours[1], ref[1]) <= 0.1 * bf16_effect


# ---- unsupported options fail when the trainer is built ---------------------------------------------


def test_off_policy_mask_drops_rows(tiny, tmp_path):
    """The off-policy mask case above is not vacuous: it changes the loss (some rows are dropped)."""
    with_mask = _compare(tiny, tmp_path, **OPTION_CASES["off_policy_mask"])[0][0]
    without = _compare(tiny, tmp_path, config=dict(loss_type="grpo", beta=0.04))[0][0]
    assert not math.isclose(with_mask.item(), without.item(), rel_tol=1e-3)


def test_adaptive_entropy_matches_trl_over_steps(tiny, tmp_path):
    """use_adaptive_entropy: the coefficient TRL's controller sets after each optimizer step, and the
    bonus it then applies, are the drop-in's too (three steps; the first applies no bonus)."""
    config = dict(loss_type="dapo", beta=0.04, use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=10.0,
                  entropy_coef_delta=0.02)
    ref_tr = _build(trl.GRPOTrainer, tiny, tmp_path, **config)
    our_tr = _build(GRPOTrainer, tiny, tmp_path, **config)
    for seed in range(3):
        inputs = _batch(ref_tr, seed=seed)
        _assert_same_step(_step(ref_tr, inputs), _step(our_tr, inputs))
        assert our_tr.entropy_coef == ref_tr.entropy_coef
        # the window's mean entropy: the fused loss sums it in its own order (float32 rounding apart)
        assert math.isclose(our_tr._last_world_entropy, ref_tr._last_world_entropy, rel_tol=1e-6)
    assert ref_tr.entropy_coef > 0.05  # the controller moved (entropy below the target: the coefficient grows)


@pytest.mark.parametrize("loss_type", sorted(IGNORED_VALUES))
def test_ignored_options_do_not_change_the_step(tiny, tmp_path, loss_type):
    """The values TRL ignores for this loss type give bit for bit the drop-in's step with GRPOConfig's
    defaults for them (the step with them equals TRL's: test_option_matches_trl)."""
    config = dict(loss_type=loss_type, beta=0.04, epsilon_high=IGNORED_VALUES[loss_type].get("epsilon_high", 0.28))
    plain = _build(GRPOTrainer, tiny, tmp_path, **config)
    odd = _build(GRPOTrainer, tiny, tmp_path, **{**config, **IGNORED_VALUES[loss_type]})
    inputs = _batch(plain)
    (l0, g0, m0), (l1, g1, m1) = _step(plain, inputs), _step(odd, inputs)
    assert torch.equal(l0, l1) and m0 == m1
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


@pytest.mark.parametrize("case", ["entropy_coef_dapo", "entropy_coef_grpo_seq", "entropy_coef_logits_path",
                                  "entropy_coef_eval"])
def test_entropy_bonus_runs_in_the_fused_loss(tiny, tmp_path, monkeypatch, case):
    """The entropy bonus (without top_entropy_quantile) is computed by the fused loss (entropy_coef), not on
    the log-prob primitive: the step still matches TRL with the primitive made unusable."""
    import grpo_fast.integrations.trl as drop_in

    def refuse(*args, **kwargs):
        raise AssertionError("the entropy bonus went through the log-prob primitive")

    monkeypatch.setattr(drop_in, "_linear_logprobs", refuse)
    _compare(tiny, tmp_path, **OPTION_CASES[case])


@pytest.mark.parametrize("config, words", [
    (dict(epsilon=1.5), "epsilon_low"),  # a value grpo_fast rejects: at build time, not at step 1
    (dict(loss_type="cispo", epsilon_high=float("nan")), "epsilon_high"),  # cispo's cap is read, so it is checked
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_temperature"),
], ids=["bad_epsilon", "cispo_bad_cap", "sapo_bad_temperature"])
def test_unsupported_option_raises_at_build(tiny, tmp_path, config, words):
    with pytest.raises(ValueError, match=words):
        _build(GRPOTrainer, tiny, tmp_path, **config)


def test_model_forward_replaced_after_build_raises(tiny, tmp_path):
    """A patch that replaces the model's forward after the trainer is built (Liger's fused_linear_cross_entropy
    applied by hand, say) would bypass the grpo_fast loss: the step refuses it, naming the cause."""
    tr = _build(GRPOTrainer, tiny, tmp_path, use_liger_kernel=True)
    assert tr.args.liger_kernel_config == {"fused_linear_cross_entropy": False}  # TRL's own setting, kept
    inputs = _batch(tr)
    _step(tr, inputs)  # accepted: the patches Trainer.train() applies keep the forward (tests/test_trl_liger.py)
    model = tr.model
    model.forward = type(model).forward.__get__(model)
    with pytest.raises(ValueError, match="forward of Qwen2ForCausalLM was replaced"):
        _step(tr, inputs)


def test_mixed_precision_wrapped_forward_keeps_the_loss(tiny, tmp_path):
    """Trainer.train() has accelerate wrap the model's forward for mixed precision (autocast, then
    convert_outputs_to_fp32, a decorator chain through __wrapped__): the drop-in's forward is still found
    in it, and the step is unchanged."""
    tr = _build(GRPOTrainer, tiny, tmp_path, bf16=True, loss_type="dapo", beta=0.04)
    assert tr.accelerator.native_amp
    inputs = _batch(tr)
    before = _step(tr, inputs)
    forward = tr.model.forward
    assert tr.accelerator.prepare_model(tr.model) is tr.model and tr.model.forward is not forward
    after = _step(tr, inputs)
    assert math.isclose(after[0].item(), before[0].item(), rel_tol=1e-6) and _grad_err(after[1], before[1]) <= 1e-6


def test_unsupported_option_set_later_raises_at_step(tiny, tmp_path):
    tr = _build(GRPOTrainer, tiny, tmp_path)
    inputs = _batch(tr)
    tr.loss_type = "not_a_loss"  # changed on a built trainer: still refused, never bypassed
    with pytest.raises(ValueError, match="not_a_loss"):
        _step(tr, inputs)


def test_subclass_overriding_loss_raises(tiny, tmp_path):
    class Custom(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            return super()._compute_loss(model, inputs) * 2

    class CustomLogps(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    for cls in (Custom, CustomLogps):
        with pytest.raises(ValueError, match="overrides"):
            _build(cls, tiny, tmp_path)


def test_patch_trl(tiny, tmp_path):
    original = trl.GRPOTrainer
    patch_trl()
    try:
        from trl import GRPOTrainer as Patched
        from trl.trainer.grpo_trainer import GRPOTrainer as Patched2

        assert Patched is GRPOTrainer and Patched2 is GRPOTrainer
        with pytest.raises(ValueError, match="epsilon_low"):  # the drop-in's checks run
            _build(trl.GRPOTrainer, tiny, tmp_path, epsilon=1.5)
    finally:
        unpatch_trl()
    assert trl.GRPOTrainer is original
    import trl.trainer.grpo_trainer as mod

    assert mod.GRPOTrainer is original


def test_without_trl_import_fails_clearly_and_grpo_fast_still_imports():
    """With trl absent, `import grpo_fast` works and the integration's ImportError says how to install it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['trl'] = None\n"  # makes `import trl` raise ImportError
        "import grpo_fast, grpo_fast.integrations\n"
        "try:\n"
        "    import grpo_fast.integrations.trl\n"
        "except ImportError as e:\n"
        "    print('IMPORT_ERROR', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                         env=dict(os.environ, PYTHONPATH=root))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORT_ERROR" in out.stdout and "pip install 'grpo_fast[trl]'" in out.stdout, out.stdout


# ---- end to end: TRL generates, the drop-in trains -------------------------------------------------


def test_training_run_matches_trl_first_step(tiny, tmp_path):
    """Two optimizer steps on batches TRL generates; the first step's logs equal TRL's, weights move."""
    config = dict(loss_type="grpo", beta=0.04, max_steps=2, learning_rate=1e-2, gradient_accumulation_steps=2,
                  per_device_train_batch_size=3, seed=7, max_completion_length=6)
    logs = []
    for cls in (trl.GRPOTrainer, GRPOTrainer):
        tr = _build(cls, tiny, tmp_path, **config)
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        tr.train()
        moved = [n for n, p in tr.model.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert moved, f"{cls.__module__}: no parameter changed"
        logs.append([h for h in tr.state.log_history if "loss" in h])
    ref, ours = logs
    assert len(ref) == len(ours) == 2
    for key in ("loss", "grad_norm", "entropy", "kl", "clip_ratio/region_mean", "reward"):
        assert key in ours[0], f"{key} not logged by the drop-in"
        assert math.isclose(ours[0][key], ref[0][key], rel_tol=1e-4, abs_tol=1e-6), f"{key}: trl {ref[0][key]} grpo_fast {ours[0][key]}"
    assert all(math.isfinite(h["loss"]) for h in ours)


def test_benchmark_runs_and_providers_agree(tmp_path):
    """benchmarks.trl_step at a toy size: every provider runs one step and reports the same loss."""
    from benchmarks import trl_step

    res = trl_step.run(trl_step.PROVIDERS, quick=True, repeats=1, memory=False, out_dir=str(tmp_path),
                       overrides=dict(batch=2, prompt_len=4, completion_len=8, hidden=32, vocab=257))
    losses = {r["provider"]: r["loss"] for r in res["rows"]}
    assert set(losses) == set(trl_step.PROVIDERS)
    for prov, loss in losses.items():
        assert math.isfinite(loss) and math.isclose(loss, losses["trl"], rel_tol=1e-5, abs_tol=1e-6), (prov, losses)
    assert (tmp_path / "trl_step_cpu_dapo_quick.json").exists()
