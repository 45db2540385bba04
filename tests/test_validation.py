"""Every bad input of docs/spec.md raises before any kernel runs, naming the argument; tensors untouched."""
import pytest
import torch

import grpo_fast

B, T, V = 4, 3, 11


def _good(**over):
    g = torch.Generator().manual_seed(0)
    kw = dict(
        logits=torch.randn(B, T, V, generator=g),
        completion_ids=torch.randint(0, V, (B, T), generator=g),
        rewards=torch.randn(B, generator=g),
        group_size=2,
    )
    kw.update(over)
    return kw


def call(**over):
    kw = _good(**over)
    logits = kw.pop("logits")
    ids = kw.pop("completion_ids")
    return grpo_fast.grpo_loss(logits, ids, **kw)


BAD = [
    # (id, overrides, exception, words the message must contain)
    ("ids-shape", dict(completion_ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, ["completion_ids", f"({B}, {T})"]),
    ("ids-range-high", dict(completion_ids=torch.full((B, T), V)), ValueError, ["completion_ids", "[0, V)", str(V)]),
    ("ids-range-neg", dict(completion_ids=torch.full((B, T), -1)), ValueError, ["completion_ids", "-1"]),
    ("ids-float", dict(completion_ids=torch.zeros(B, T)), TypeError, ["completion_ids", "int64", "float32"]),
    ("both-adv-rewards", dict(advantages=torch.randn(B)), ValueError, ["advantages", "rewards", "both"]),
    ("neither", dict(rewards=None, group_size=None), ValueError, ["advantages", "rewards", "neither"]),
    ("rewards-no-G", dict(group_size=None), ValueError, ["group_size", "rewards"]),
    ("B%G", dict(group_size=3), ValueError, ["group_size", "B = 4"]),
    ("G<2", dict(group_size=1), ValueError, ["group_size", ">= 2", "1"]),
    ("rewards-nan", dict(rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0])), ValueError, ["rewards", "finite"]),
    ("rewards-shape", dict(rewards=torch.randn(B, 1)), ValueError, ["rewards", f"({B},)"]),
    ("adv-inf", dict(rewards=None, group_size=None, advantages=torch.tensor([1.0, float("inf"), 0.0, 1.0])), ValueError, ["advantages", "finite"]),
    ("adv-shape", dict(rewards=None, group_size=None, advantages=torch.randn(B, T + 2)), ValueError, ["advantages", f"({B}, {T})"]),
    ("beta-no-ref", dict(beta=0.1), ValueError, ["ref_logp", "beta"]),
    ("temperature-0", dict(temperature=0.0), ValueError, ["temperature", "> 0"]),
    ("temperature-neg", dict(temperature=-1.0), ValueError, ["temperature", "-1.0"]),
    ("eps-low-1", dict(epsilon_low=1.0), ValueError, ["epsilon_low", "[0, 1)"]),
    ("eps-low-neg", dict(epsilon_low=-0.1), ValueError, ["epsilon_low", "-0.1"]),
    ("eps-high-neg", dict(epsilon_high=-0.5), ValueError, ["epsilon_high", ">= 0"]),
    ("delta-small", dict(delta=1.1, epsilon_high=0.2), ValueError, ["delta", "1.2", "1.1"]),
    ("unknown-loss", dict(loss_type="ppo"), ValueError, ["loss_type", "ppo"]),
    ("unknown-kl", dict(kl_estimator="k4"), ValueError, ["kl_estimator", "k4"]),
    ("unknown-level", dict(importance_sampling_level="sentence"), ValueError, ["importance_sampling_level", "sentence"]),
    ("unknown-scale", dict(scale_rewards="std"), ValueError, ["scale_rewards", "std"]),
    ("cispo-delta", dict(loss_type="cispo", delta=5.0), ValueError, ["delta", "cispo"]),
    ("sapo-delta", dict(loss_type="sapo", delta=5.0), ValueError, ["delta", "sapo"]),
    ("logits-f64", dict(logits=torch.randn(B, T, V, dtype=torch.float64)), TypeError, ["logits", "float64"]),
    ("logits-int", dict(logits=torch.zeros(B, T, V, dtype=torch.int32)), TypeError, ["logits", "int32"]),
    ("logits-2d", dict(logits=torch.randn(B, V)), ValueError, ["logits", "(B, T, V)"]),
    ("V=0", dict(logits=torch.randn(B, T, 0)), ValueError, ["logits", "V > 0"]),
    ("BT=0", dict(logits=torch.randn(B, 0, V), completion_ids=torch.zeros(B, 0, dtype=torch.long)), ValueError, ["logits", "B·T > 0"]),
    ("old-shape", dict(old_logp=torch.randn(B, T + 1)), ValueError, ["old_logp", f"({B}, {T})"]),
    ("ref-shape", dict(ref_logp=torch.randn(T, B), beta=0.1), ValueError, ["ref_logp"]),
    ("mask-shape", dict(completion_mask=torch.ones(B)), ValueError, ["completion_mask"]),
    ("isr-shape", dict(importance_sampling_ratio=torch.ones(B + 1)), ValueError, ["importance_sampling_ratio"]),
    ("backend", dict(backend="jax"), ValueError, ["backend", "jax", "cpu", "triton"]),
    ("temperature-str", dict(temperature="1"), TypeError, ["temperature"]),
    ("max-len", dict(max_completion_length=0), ValueError, ["max_completion_length"]),
    ("num-items-neg", dict(num_items_in_batch=-3), ValueError, ["num_items_in_batch"]),
    # float options the kernels read as float32: finite there, and not rounded to 0 when nonzero
    ("temperature-f32-inf", dict(temperature=1e39), ValueError, ["temperature", "float32", "1e+39"]),
    ("temperature-f32-zero", dict(temperature=1e-39), ValueError, ["temperature", "float32", "1e-39"]),
    ("beta-f32-zero", dict(beta=1e-50, ref_logp=torch.randn(B, T)), ValueError, ["beta", "float32", "1e-50"]),
    ("beta-f32-inf", dict(beta=-1e39, ref_logp=torch.randn(B, T)), ValueError, ["beta", "float32", "-1e+39"]),
    ("eps-high-f32-inf", dict(epsilon_high=1e39), ValueError, ["epsilon_high", "float32"]),
    ("delta-f32-inf", dict(delta=1e39), ValueError, ["delta", "float32"]),
    ("sapo-pos-f32-inf", dict(loss_type="sapo", sapo_temperature_pos=1e39), ValueError, ["sapo_temperature_pos", "float32"]),
    ("sapo-neg-f32-zero", dict(loss_type="sapo", sapo_temperature_neg=1e-45), ValueError, ["sapo_temperature_neg", "float32"]),
    ("adv-eps-f32-inf", dict(adv_eps=1e39), ValueError, ["adv_eps", "float32"]),
    # completion_mask: a selection, 0 or 1 only
    ("mask-neg", dict(completion_mask=torch.ones(B, T).index_fill_(1, torch.tensor([1]), -1.0)), ValueError, ["completion_mask", "0 and 1", "-1.0"]),
    ("mask-nan", dict(completion_mask=torch.ones(B, T).index_fill_(0, torch.tensor([2]), float("nan"))), ValueError, ["completion_mask", "nan"]),
    ("mask-frac", dict(completion_mask=torch.full((B, T), 0.5)), ValueError, ["completion_mask", "0.5"]),
    ("mask-int-2", dict(completion_mask=torch.full((B, T), 2)), ValueError, ["completion_mask", "2.0"]),
]


@pytest.mark.parametrize("over,exc,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(over, exc, words):
    kw = _good(**over)
    snapshot = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    logits = kw.pop("logits")
    ids = kw.pop("completion_ids")
    with pytest.raises(exc) as info:
        grpo_fast.grpo_loss(logits, ids, inplace=True, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} lacks {w!r}"
    kw["logits"], kw["completion_ids"] = logits, ids
    for k, v in snapshot.items():  # nothing written before the error (inplace=True asked for)
        assert torch.equal(kw[k], v) or (v.isnan().any() and torch.equal(kw[k].isnan(), v.isnan())), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put one tensor elsewhere")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="completion_ids must be on the logits' device"):
        call(completion_ids=torch.zeros(B, T, dtype=torch.long, device="cuda"))


def test_device_mismatch_reported_with_meta_tensor():
    # Without a GPU, a meta tensor stands in for "another device".
    with pytest.raises(ValueError, match="old_logp must be on the logits' device"):
        call(old_logp=torch.empty(B, T, device="meta"))


def test_good_input_passes_and_accepts_int32_ids_and_bool_masks():
    loss, met = call(completion_ids=torch.randint(0, V, (B, T), dtype=torch.int32),
                     completion_mask=torch.rand(B, T) > 0.2, backend="torch")
    assert torch.isfinite(loss)


def test_non_contiguous_inputs_are_accepted():
    big = torch.randn(B, T + 2, V + 3)
    logits = big[:, 1:-1, :V]  # strided in B and T, and in V's slice
    loss, _ = call(logits=logits, backend="torch")
    loss2, _ = call(logits=logits.contiguous(), backend="torch")
    assert torch.equal(loss, loss2)


def test_unavailable_backend_named_explicitly_says_why():
    for name in ("cpu", "triton", "cuda"):
        why = grpo_fast.backends.unavailable_reason(name, torch.device("cpu"))
        if why is None:
            continue
        with pytest.raises(RuntimeError, match=f'backend="{name}" is not available'):
            call(backend=name)


def test_token_logprobs_validates():
    with pytest.raises(ValueError, match="temperature"):
        grpo_fast.token_logprobs(torch.randn(B, T, V), torch.zeros(B, T, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="completion_ids"):
        grpo_fast.token_logprobs(torch.randn(B, T, V), torch.zeros(B, T + 1, dtype=torch.long))


def test_float32_options_agree_with_the_kernels_or_raise():
    # 3e38 and the smallest normal float32 still pass: the bounds are float32's, not tighter
    for kw in (dict(temperature=3e38), dict(temperature=1.2e-38), dict(beta=1.2e-38, ref_logp=torch.randn(B, T)),
               dict(beta=0.0), dict(epsilon_high=3e38)):
        loss, _ = call(backend="torch", **kw)
    for t in (1e39, 1e-39, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            grpo_fast.token_logprobs(torch.randn(B, T, V), torch.zeros(B, T, dtype=torch.long), temperature=t)


def test_fused_linear_float32_options():
    h, w, y = torch.randn(B, T, 8), torch.randn(V, 8), torch.zeros(B, T, dtype=torch.long)
    for kw, name in ((dict(logit_scale=1e39), "logit_scale"), (dict(logit_softcap=1e39), "logit_softcap"),
                     (dict(temperature=1e39), "temperature"),
                     (dict(temperature=1e-30, logit_scale=1e10), "temperature / logit_scale")):
        with pytest.raises(ValueError, match=name):
            grpo_fast.fused_linear_token_logprobs(h, w, y, **kw)
        with pytest.raises(ValueError, match=name):
            grpo_fast.fused_linear_grpo_loss(h, w, y, rewards=torch.randn(B), group_size=2, **kw)


def test_mask_values_checked_under_compile():
    torch._dynamo.reset()
    f = torch.compile(lambda z, y, r, m: grpo_fast.grpo_loss(z, y, rewards=r, group_size=2, completion_mask=m,
                                                             backend="torch")[0], fullgraph=True, backend="aot_eager")
    z, y, r = torch.randn(2, 3, 7), torch.zeros(2, 3, dtype=torch.long), torch.rand(2)
    assert torch.isfinite(f(z, y, r, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])))
    with pytest.raises(ValueError, match="completion_mask must hold only 0 and 1"):
        f(z, y, r, torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, 0.0]]))


def _sparse(t):
    return t.to_sparse()


SPARSE = [  # every tensor argument of grpo_loss, as a sparse COO tensor
    ("logits", dict(logits=_sparse(torch.randn(B, T, V)))),
    ("completion_ids", dict(completion_ids=_sparse(torch.randint(1, V, (B, T))))),
    ("rewards", dict(rewards=_sparse(torch.randn(B)))),
    ("advantages", dict(rewards=None, group_size=None, advantages=_sparse(torch.randn(B)))),
    ("old_logp", dict(old_logp=_sparse(torch.randn(B, T)))),
    ("ref_logp", dict(ref_logp=_sparse(torch.randn(B, T)), beta=0.1)),
    ("completion_mask", dict(completion_mask=_sparse(torch.ones(B, T)))),
    ("importance_sampling_ratio", dict(importance_sampling_ratio=_sparse(torch.ones(B)))),
]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("name,over", SPARSE, ids=[c[0] for c in SPARSE])
def test_sparse_tensors_raise_type_error_naming_the_argument(name, over):
    with pytest.raises(TypeError, match=f"{name} must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"):
        call(**over)
    if name == "logits":
        csr = torch.randn(B * T, V).to_sparse_csr()
        with pytest.raises(TypeError, match="logits must be a dense"):
            call(logits=csr)


def test_sparse_tensors_rejected_by_the_other_entry_points():
    z, y = torch.randn(B, T, V), torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(TypeError, match="logits must be a dense"):
        grpo_fast.token_logprobs(z.to_sparse(), y)
    with pytest.raises(TypeError, match="completion_ids must be a dense"):
        grpo_fast.token_logprobs(z, y.to_sparse())
    with pytest.raises(TypeError, match="rewards must be a dense"):
        grpo_fast.group_advantages(torch.randn(B).to_sparse(), 2)
    h, w, b = torch.randn(B, T, 8), torch.randn(V, 8), torch.randn(V)
    for kw, name in ((dict(hidden=h.to_sparse()), "hidden"), (dict(weight=w.to_sparse()), "weight"),
                     (dict(bias=b.to_sparse()), "bias"), (dict(completion_ids=y.to_sparse()), "completion_ids")):
        args = dict(hidden=h, weight=w, completion_ids=y, bias=b)
        args.update(kw)
        with pytest.raises(TypeError, match=f"{name} must be a dense"):
            grpo_fast.fused_linear_token_logprobs(**args)
        with pytest.raises(TypeError, match=f"{name} must be a dense"):
            grpo_fast.fused_linear_grpo_loss(**args, rewards=torch.randn(B), group_size=2)
    with pytest.raises(TypeError, match="completion_mask must be a dense"):
        grpo_fast.fused_linear_grpo_loss(h, w, y, rewards=torch.randn(B), group_size=2,
                                         completion_mask=torch.ones(B, T).to_sparse())


def test_group_advantages_validates():
    with pytest.raises(ValueError, match="group_size"):
        grpo_fast.group_advantages(torch.randn(6), 4)
    with pytest.raises(ValueError, match="rewards must be finite"):
        grpo_fast.group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_fast.group_advantages(torch.randn(4), 2, scale_rewards="z")
    # adv_eps as grpo_loss checks it: a negative one would flip the sign of low-variance groups
    with pytest.raises(ValueError, match="adv_eps must be >= 0, got -0.1"):
        grpo_fast.group_advantages(torch.randn(4), 2, adv_eps=-0.1)
    with pytest.raises(ValueError, match="adv_eps must be finite as a float32"):
        grpo_fast.group_advantages(torch.randn(4), 2, adv_eps=1e39)
