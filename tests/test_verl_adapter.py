"""grpo_fast.integrations.verl_plugin inside verl 0.9.1's own actor code, on CPU.

The same actor data goes through verl's FSDP engine (``FSDPEngineWithLMHead``) three times, on a tiny
Qwen2 built from a config and patched by verl's ``apply_monkey_patch(use_fused_kernels=True)``:

  * verl:      float32, verl's torch fused head (``FusedLinearForPPO``), verl's policy loss ``<name>``;
  * grpo_fast: float32, the adapter enabled (grpo_fast's head), the policy loss ``grpo_fast_<name>``;
  * reference: float64, ``use_fused_kernels=False`` (verl's eager logits path), verl's ``<name>``.

Two depths: one micro-batch through ``forward_step`` (``prepare_model_inputs`` → the model forward →
``prepare_model_outputs`` → ``verl.workers.utils.losses.ppo_loss`` with entropy bonus and KL loss), and a
mini-batch through ``infer_batch`` (compute_log_prob) and ``train_batch`` (the actor update: two
micro-batches, verl's global token normalization, gradient accumulation, clipping, an SGD step). Compared:
log-probs, entropies, losses, metrics (names, aggregation types, values per micro-batch), grad_norm,
every parameter's gradient and, after the update, every parameter. grpo_fast's float32 error against the
float64 reference must be within 2× verl's own float32 error (the noise floor) plus a 1e-6 relative slack.
Both layouts run: ``use_remove_padding=True`` (verl's packed (1, total_nnz)) and False (padded (B, T));
one micro-batch also under the engine's bfloat16 autocast (the noise floor then is verl's bfloat16 error).

The engine is verl's class with the attributes its step reads set by hand (``object.__new__``): no FSDP
wrapping (the module is plain, so verl's non-FSDP branches run: torch's clip_grad_norm_, no no_sync), a
one-process gloo group for its all-reduce, and verl's device lookup answering "cpu" (verl 0.9.1 has no
CPU platform). Skipped without verl.
"""
import contextlib
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("verl.workers.engine.fsdp.transformer_impl",
                    reason="verl 0.9.1's FSDP engine is not importable: pip install --no-deps verl==0.9.1 && "
                           "pip install -e '.[verl]' (the extra has its light dependencies, peft included)")
transformers = pytest.importorskip("transformers")

from tensordict import TensorDict  # noqa: E402
from verl.models.transformers import monkey_patch  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.experimental import torch_functional  # noqa: E402
from verl.utils.metric import Metric  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.engine.fsdp import transformer_impl  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from grpo_fast.integrations import verl_plugin  # noqa: E402  (importing it enables the adapter)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, P, R, V = 4, 5, 7, 160  # rows, prompt / response width (left / right padded), vocabulary
TEMPERATURE = 0.7


@pytest.fixture(scope="module", autouse=True)
def _verl_restored_after_this_module():
    """Importing the adapter enabled it; later test modules see verl's own registry and head again."""
    verl_plugin.enable()
    yield
    verl_plugin.disable()


@pytest.fixture(scope="module")
def model():
    # verl 0.9.1 has no CPU platform (it falls back to CUDA): its engine step asks for the device here.
    saved_device = transformer_impl.get_device_id, transformer_impl.get_device_name
    transformer_impl.get_device_id = transformer_impl.get_device_name = lambda: "cpu"
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    original_forward = Qwen2ForCausalLM.forward
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)  # spread the next-token distribution (entropies well below log V)
    # verl's apply_monkey_patch also patches trl's value-head model when trl is importable; the trl
    # installed for grpo_fast's TRL drop-in (1.16) no longer has that class, so that part is skipped here.
    saved_trl_probe, monkey_patch.is_trl_available = monkey_patch.is_trl_available, lambda: False
    from transformers.integrations import flash_attention  # verl patches it for remove-padding; restored below
    saved_flash = flash_attention._flash_attention_forward
    try:
        monkey_patch.apply_monkey_patch(m, use_remove_padding=True, ulysses_sp_size=1, use_fused_kernels=True,
                                        fused_kernels_backend="torch")
    finally:
        monkey_patch.is_trl_available = saved_trl_probe
    fused_forward = Qwen2ForCausalLM.forward  # verl patches the class
    initialized_here = not dist.is_initialized()
    if initialized_here:  # verl's forward_backward_batch all-reduces the token count over the dp group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield m, original_forward, fused_forward, {k: v.clone() for k, v in m.state_dict().items()}
    if initialized_here:
        dist.destroy_process_group()
    Qwen2ForCausalLM.forward = original_forward
    flash_attention._flash_attention_forward = saved_flash
    transformer_impl.get_device_id, transformer_impl.get_device_name = saved_device


def _engine(module, autocast_dtype=torch.float32):
    """verl's FSDP engine class with what forward_step / prepare_model_* read, for one CPU process."""
    eng = object.__new__(FSDPEngineWithLMHead)
    eng.module = module
    eng.pad_to_length = False
    eng.use_ulysses_sp = False
    eng.ulysses_device_mesh = None
    eng._autocast_dtype = autocast_dtype  # verl's mixed precision: float32 skips autocast
    eng.engine_config = type("EngineConfig", (), dict(entropy_checkpointing=False,
                                                      entropy_from_logits_with_chunking=False))()
    from verl.utils.torch_functional import entropy_from_logits
    eng.compute_entropy_from_logits = entropy_from_logits
    return eng


def _batch(seed, remove_padding, fused, dtype, rows=B):
    """Actor rows in verl's left/right-padded form, converted by verl to its no-padding form."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.tensor([5, 3, 1, 4] * (rows // 4))
    resp_len = torch.tensor([7, 2, 5, 1] * (rows // 4))
    prompts = torch.randint(1, V, (rows, P), generator=g)
    responses = torch.randint(1, V, (rows, R), generator=g)
    pmask = torch.arange(P).flip(0).unsqueeze(0) < prompt_len.unsqueeze(1)  # left padded
    rmask = torch.arange(R).unsqueeze(0) < resp_len.unsqueeze(1)  # right padded
    attention_mask = torch.cat([pmask, rmask], 1).to(torch.int64)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    old = (-2.5 * torch.rand(rows, R, generator=g, dtype=torch.float64) - 0.05).to(dtype)
    ref = (-2.5 * torch.rand(rows, R, generator=g, dtype=torch.float64) - 0.05).to(dtype)
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, R).to(dtype)
    td = TensorDict(dict(prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1),
                         attention_mask=attention_mask, position_ids=position_ids,
                         response_mask=rmask.to(torch.int64), old_log_probs=old, ref_log_prob=ref,
                         advantages=adv), batch_size=[rows])
    td = left_right_2_no_padding(td)
    for key, value in dict(use_remove_padding=remove_padding, use_fused_kernels=fused, calculate_entropy=True,
                           temperature=TEMPERATURE, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                           pad_token_id=0, use_dynamic_bsz=False, micro_batch_size_per_gpu=B).items():
        tu.assign_non_tensor_data(td, key, value)
    return td


def _config(loss_mode):
    return FSDPActorConfig(ppo_micro_batch_size_per_gpu=B, rollout_n=1, loss_agg_mode="token-mean",
                           entropy_coeff=0.01, use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.1,
                           clip_ratio_low=0.2, clip_ratio_high=0.28,
                           policy_loss=PolicyLossConfig(loss_mode=loss_mode))


@contextlib.contextmanager
def _arm(model, arm):
    """The model set up for one arm (its dtype, verl's fused forward or not, the adapter on or off), from the
    fixture's initial weights; yields (module, use_fused_kernels, dtype, policy-loss prefix)."""
    m, original_forward, fused_forward, initial = model
    cls = type(m)
    fused = arm != "reference"
    dtype = torch.float64 if arm == "reference" else torch.float32
    if arm == "grpo_fast":
        verl_plugin.enable()
    else:
        verl_plugin.disable()
    cls.forward = fused_forward if fused else original_forward
    m.load_state_dict(initial)
    m.to(dtype)
    m.zero_grad(set_to_none=True)
    calls = []
    head = verl_plugin.fused_linear_logprobs
    verl_plugin.fused_linear_logprobs = lambda *a, **k: calls.append(1) or head(*a, **k)
    try:
        yield m, fused, dtype, ("grpo_fast_" if arm == "grpo_fast" else "")
        assert bool(calls) == (arm == "grpo_fast")  # grpo_fast's head ran in its arm only
    finally:
        verl_plugin.fused_linear_logprobs = head
        verl_plugin.enable()
        cls.forward = fused_forward
        m.to(torch.float32)


def _loss_fn(loss_mode):
    config = _config(loss_mode)

    def loss_fn(model_output, data, dp_group=None):  # what verl's actor worker passes to its engine
        return ppo_loss(config, model_output, data, dp_group)

    return loss_fn


def _used_log_probs(nested):
    """Log-probs of a nested (B, j) output without each sequence's last position: it predicts the token after
    the sequence (the next row's first token when packed, a pad when padded), verl's layouts differ there and
    no loss reads it."""
    keep = torch.ones(nested.values().shape[0], dtype=torch.bool)
    keep[nested.offsets()[1:] - 1] = False
    return nested.values()[keep].double()


def _metrics(metrics):
    return {k: (float(v.aggregate()), v.aggregation) if isinstance(v, Metric) else (float(v), None)
            for k, v in metrics.items()}


def _step(model, arm, remove_padding, loss_mode, autocast_dtype=torch.float32):
    """One verl engine micro-batch step; returns log-probs, entropies, loss, metrics and parameter gradients."""
    with _arm(model, arm) as (m, fused, dtype, prefix):
        eng = _engine(m, autocast_dtype if arm != "reference" else torch.float32)
        loss, out = eng.forward_step(_batch(0, remove_padding, fused, dtype), _loss_fn(prefix + loss_mode),
                                            forward_only=False)
        loss.backward()
        mo = out["model_output"]
        return dict(log_probs=_used_log_probs(mo["log_probs"]), entropy=mo["entropy"].values().double(),
                    loss=torch.tensor(float(loss), dtype=torch.float64), metrics=_metrics(out["metrics"]),
                    grads={n: p.grad.detach().double().clone() for n, p in m.named_parameters()})


def _train(model, arm, remove_padding, loss_mode):
    """verl's compute_log_prob (infer_batch) and actor update (train_batch: two micro-batches with gradient
    accumulation, gradient clipping, an SGD step) on one mini-batch of 2B rows."""
    with _arm(model, arm) as (m, fused, dtype, prefix):
        eng = _engine(m)
        eng.optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
        eng.optimizer_config = types.SimpleNamespace(clip_grad=1.0)
        eng._qat_enabled = False
        eng.ulysses_sequence_parallel_size = 1
        inferred = eng.infer_batch(_batch(1, remove_padding, fused, dtype, rows=2 * B))["model_output"]
        out = eng.train_batch(_batch(1, remove_padding, fused, dtype, rows=2 * B), _loss_fn(prefix + loss_mode))
        metrics = {}  # "name[i]": micro-batch i's value (verl aggregates them later), with its aggregation type
        for key, v in out["metrics"].items():
            values, aggregation = (v.values, v.aggregation) if isinstance(v, Metric) else (v, None)
            for i, value in enumerate(values if isinstance(values, list) else [values]):
                metrics[f"{key}[{i}]"] = (float(value), aggregation)
        return dict(log_probs=_used_log_probs(inferred["log_probs"]), entropy=inferred["entropy"].values().double(),
                    loss=torch.tensor(out["loss"], dtype=torch.float64), metrics=metrics,
                    grads={n: p.grad.detach().double().clone() for n, p in m.named_parameters()},
                    params={n: p.detach().double().clone() for n, p in m.named_parameters()})


def _close(name, got, verl, ref):
    noise = (verl - ref).abs().max().item()
    err = (got - ref).abs().max().item()
    slack = 1e-6 * max(1.0, ref.abs().max().item())
    assert err <= 2 * noise + slack, f"{name}: grpo_fast error {err:.3g} > 2x verl's float32 error {noise:.3g}"


def _compare(gf, verl, ref):
    """Every output of the grpo_fast arm within the noise floor; metrics with the same names and types."""
    for key in ("log_probs", "entropy", "loss"):
        _close(key, gf[key], verl[key], ref[key])
    assert set(gf["metrics"]) == set(verl["metrics"]) == set(ref["metrics"])
    for key, (value, aggregation) in ref["metrics"].items():
        assert gf["metrics"][key][1] == verl["metrics"][key][1] == aggregation, key
        _close(key, *(torch.tensor(x, dtype=torch.float64)
                      for x in (gf["metrics"][key][0], verl["metrics"][key][0], value)))
    for group in ("grads", "params"):
        for name in ref.get(group, ()):
            _close(f"{group} {name}", gf[group][name], verl[group][name], ref[group][name])


@pytest.mark.parametrize("loss_mode, remove_padding, autocast_dtype",
                         [("vanilla", False, torch.float32), ("cispo", True, torch.float32),
                          ("vanilla", True, torch.bfloat16)],
                         ids=["vanilla-padded", "cispo-packed", "vanilla-packed-bf16-autocast"])
def test_engine_step_matches_verl(model, remove_padding, loss_mode, autocast_dtype):
    """bf16-autocast: verl's engine step under its bfloat16 autocast (float32 weights), noise floor bfloat16's."""
    ref = _step(model, "reference", remove_padding, loss_mode)
    verl = _step(model, "verl", remove_padding, loss_mode, autocast_dtype)
    gf = _step(model, "grpo_fast", remove_padding, loss_mode, autocast_dtype)
    _compare(gf, verl, ref)
    assert gf["entropy"].max() < 0.9 * math.log(V)  # not a flat distribution


def test_enabled_by_verl_external_modules():
    """The one setting: VERL_USE_EXTERNAL_MODULES makes `import verl` enable the adapter (a fresh process)."""
    code = ("import verl\n"
            "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as reg\n"
            "from verl.utils.experimental import torch_functional as tf\n"
            "from grpo_fast.integrations import verl_plugin as p\n"
            "assert tf.FusedLinearForPPO is p.FusedLinearForPPO\n"
            "assert reg['grpo_fast_vanilla'] is p.verl_losses.vanilla and 'vanilla' in reg\n"
            "print('ok')\n")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="grpo_fast.integrations.verl_plugin",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_untested_verl_version_is_refused(monkeypatch):
    import verl

    verl_plugin.check_verl_version(verl.__version__)
    for version in ("0.9.0", "0.9.2", "0.10.0"):
        with pytest.raises(RuntimeError, match=f"verl {version} is installed"):
            verl_plugin.check_verl_version(version)
    verl_plugin.disable()
    monkeypatch.setattr(verl, "__version__", "0.9.2")
    try:
        with pytest.raises(RuntimeError, match="tested with verl 0.9.1"):
            verl_plugin.enable()
        assert not verl_plugin.is_enabled()  # nothing half-patched
        assert torch_functional.FusedLinearForPPO is not verl_plugin.FusedLinearForPPO
    finally:
        monkeypatch.undo()
        verl_plugin.enable()


@pytest.mark.parametrize("backend", ["triton", "liger", None])
def test_fused_backend_grpo_fast_does_not_replace_is_refused_at_model_build(backend):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1)
    m = Qwen2ForCausalLM(cfg)
    forward = Qwen2ForCausalLM.forward
    with pytest.raises(ValueError, match="impl_backend"):
        monkey_patch.patch_forward_with_backends(m, use_fused_kernels=True, fused_kernels_backend=backend)
    assert Qwen2ForCausalLM.forward is forward  # refused before verl patched the class
    with pytest.raises(ValueError, match="impl_backend"):
        verl_plugin.FusedLinearForPPO(impl_backend=backend)
    monkey_patch.patch_forward_with_backends(m, use_fused_kernels=False, fused_kernels_backend=backend)  # fused off
    assert Qwen2ForCausalLM.forward is forward


def test_a_taken_loss_name_is_refused():
    verl_plugin.disable()
    core_algos.register_policy_loss("grpo_fast_gspo")(core_algos.POLICY_LOSS_REGISTRY["gspo"])
    try:
        with pytest.raises(RuntimeError, match="grpo_fast_gspo"):
            verl_plugin.enable()
        assert not verl_plugin.is_enabled()
    finally:
        core_algos.POLICY_LOSS_REGISTRY.pop("grpo_fast_gspo")
        verl_plugin.enable()
    assert core_algos.POLICY_LOSS_REGISTRY["grpo_fast_gspo"] is verl_plugin.verl_losses.gspo


def test_head_contract():
    """verl's FusedLinearForPPO contract: log-probs float32, entropy in the hidden dtype, the labels' shape."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.bfloat16)
    w = torch.randn(V, 8, generator=g, dtype=torch.bfloat16)
    ids = torch.randint(0, V, (2, 5), generator=g, dtype=torch.int32)
    ours = verl_plugin.FusedLinearForPPO(chunk_size=3)(h, w, ids, temperature=TEMPERATURE)
    theirs = verl_plugin._saved["FusedLinearForPPO"](chunk_size=3)(h, w, ids, temperature=TEMPERATURE)
    logits = (h.double() @ w.double().T) / TEMPERATURE  # the float64 reference of the bfloat16 inputs
    ref = (logits.log_softmax(-1).gather(-1, ids.long().unsqueeze(-1)).squeeze(-1),
           -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
    for a, b, r in zip(ours, theirs, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        _close("bfloat16 head", a.double(), b.double(), r)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inputs, verl's bfloat16 autocast
        ours = verl_plugin.FusedLinearForPPO()(h.float(), w.float(), ids, temperature=TEMPERATURE)
        theirs = verl_plugin._saved["FusedLinearForPPO"]()(h.float(), w.float(), ids, temperature=TEMPERATURE)
    for a, b, r in zip(ours, theirs, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        _close("autocast head", a.double(), b.double(), r)
    with pytest.raises(ValueError, match="input_ids"):
        verl_plugin.FusedLinearForPPO()(h, w, ids[:, :4])
    with pytest.raises(ValueError, match="chunk_size"):
        verl_plugin.FusedLinearForPPO(chunk_size=0)


@pytest.mark.parametrize("loss_mode, remove_padding", [("vanilla", True), ("gspo", False)],
                         ids=["vanilla-packed", "gspo-padded"])
def test_actor_update_matches_verl(model, remove_padding, loss_mode):
    """verl's infer_batch (compute_log_prob) and train_batch (actor update): log-probs, entropies, per
    micro-batch losses and metrics, grad_norm, accumulated gradients and the updated parameters."""
    ref = _train(model, "reference", remove_padding, loss_mode)
    verl = _train(model, "verl", remove_padding, loss_mode)
    gf = _train(model, "grpo_fast", remove_padding, loss_mode)
    assert "grad_norm[0]" in ref["metrics"] and "actor/pg_loss[1]" in ref["metrics"]  # two micro-batches
    _compare(gf, verl, ref)
