"""One OpenRLHF actor update step on a tiny Qwen2, with and without grpo_fast (run by tests/test_openrlhf.py).

    python tests/openrlhf_step.py OUT.json

Runs, in this process, what OpenRLHF 0.11.2's ``PolicyModelActor`` training step computes for one
micro-batch (openrlhf/trainer/ray/ppo_actor.py): ``Actor.forward`` with the entropy, OpenRLHF's
own ``PolicyLoss`` (dual clip, with the global token count), its k3 ``compute_approx_kl`` loss and
the entropy bonus, then backward. Three arms from the same weights and batch: OpenRLHF as shipped
(fp32), the same with ``grpo_fast.integrations.openrlhf.enable()`` (fp32), and OpenRLHF in float64
(the noise floor). Writes losses, metrics, per-token log-probs/entropies and every parameter
gradient's error vs float64 to OUT.json. OpenRLHF must be importable (tests/test_openrlhf.py sets
the path), with the test stand-in for flash_attn (tests/stubs).
"""
from __future__ import annotations

import copy
import json
import sys
import tempfile

import torch


def _model_dir(tmp: str) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp)
    return tmp


def _batch(V: int):
    g = torch.Generator().manual_seed(1)
    B, P, R = 4, 5, 7  # rows, prompt length, response length
    seq = torch.randint(0, V, (B, P + R), generator=g)
    attn = torch.ones(B, P + R, dtype=torch.long)
    attn[0, :2] = 0  # left padding of one prompt
    action_mask = torch.ones(B, R)
    action_mask[1, 4:] = 0  # a short response
    action_mask[2, 6:] = 0
    attn[1, P + 4:] = 0
    attn[2, P + 6:] = 0
    adv = torch.randn(B, 1, generator=g).expand(B, R).contiguous()
    return seq, attn, action_mask, adv


def _step(actor, batch, dtype):
    from openrlhf.models.loss import PolicyLoss, aggregate_loss
    from openrlhf.models.utils import compute_approx_kl

    seq, attn, action_mask, adv = batch
    with torch.no_grad():  # the rollout's old and reference log-probs: the same policy, perturbed
        old = actor(seq, action_mask, attention_mask=attn)
        g = torch.Generator().manual_seed(2)
        old = old + (0.2 * torch.randn(old.shape, generator=g)).to(old.dtype) * action_mask.to(old.dtype)
        base = old + (0.1 * torch.randn(old.shape, generator=g)).to(old.dtype)
    logp, output = actor(seq, action_mask, attention_mask=attn, return_output=True, return_entropy=True)
    info = {"batch_num_tokens": float(action_mask.sum()), "dp_size": 1}
    loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0)
    actor_loss, clip_ratio, ppo_kl, _, _ = loss_fn(logp, old, adv.to(dtype), action_mask=action_mask.to(dtype), **info)
    kl = compute_approx_kl(logp, base, kl_estimator="k3")
    kl_loss = aggregate_loss(kl, action_mask.to(dtype), **info)
    entropy_loss = aggregate_loss(output.entropy[:, -action_mask.shape[1]:], action_mask.to(dtype), **info)
    loss = actor_loss + 0.01 * kl_loss - 0.001 * entropy_loss
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in actor.named_parameters()}
    return {"loss": loss.item(), "actor_loss": actor_loss.item(), "clip_ratio": clip_ratio.item(),
            "ppo_kl": ppo_kl.item(), "kl_loss": kl_loss.item(), "entropy_loss": entropy_loss.item(),
            "logp": logp.detach().double(), "entropy": output.entropy.detach().double()}, grads


def main(out_path: str) -> int:
    from openrlhf.models.actor import Actor

    import grpo_fast.integrations.openrlhf as gf

    with tempfile.TemporaryDirectory() as tmp:
        path = _model_dir(tmp)
        # OpenRLHF loads in bf16 or fp16 only; the update here runs in fp32 (and float64 for the floor)
        actor = Actor(path, attn_implementation="sdpa", param_dtype="bf16", temperature=0.9).float()
    actor.train()
    ref64 = copy.deepcopy(actor).double()
    V = actor.model.config.vocab_size
    batch = _batch(V)

    res = {}
    want, want_g = _step(ref64, batch, torch.float64)
    base, base_g = _step(copy.deepcopy(actor), batch, torch.float32)
    assert not gf.enabled()
    gf.enable(backend="cpu")
    assert gf.enabled()
    fast, fast_g = _step(copy.deepcopy(actor), batch, torch.float32)
    gf.disable()
    assert not gf.enabled()

    def err(a, b):
        return float((a - b).abs().max())

    for arm, (vals, grads) in {"openrlhf": (base, base_g), "grpo_fast": (fast, fast_g)}.items():
        res[arm] = {k: (err(v, want[k]) if isinstance(v, torch.Tensor) else abs(v - want[k]))
                    for k, v in vals.items()}
        res[arm]["grad"] = max(err(grads[n], want_g[n]) / max(float(want_g[n].abs().max()), 1e-30) for n in want_g)
        res[arm]["grad_worst"] = max(want_g, key=lambda n: err(grads[n], want_g[n]) / max(float(want_g[n].abs().max()), 1e-30))
    res["values"] = {k: v for k, v in want.items() if not isinstance(v, torch.Tensor)}
    res["grad_norm"] = float(sum(g.pow(2).sum() for g in want_g.values()) ** 0.5)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
