"""A thin GRPO trainer on top of grpo_fast (nanoGPT-style: read it top to bottom).

One step:
  1. take P prompts, sample G completions for each from the policy (temperature, max new tokens,
     stop token; KV cache for the built-in model, ``generate`` for Hugging Face models);
  2. score them with the reward functions (weighted sum) and turn the rewards into group-relative
     advantages (grpo_fast.group_advantages);
  3. old log-probs (only when num_iterations > 1: the ratio is 1 otherwise) and reference
     log-probs from a frozen copy of the starting policy (only when beta != 0);
  4. update: grpo_fast's loss — the fused-linear one when the model's LM head is known (no
     (B, T, V) logits at all), else the fused loss on the logits —, AdamW, gradient clipping,
     gradient accumulation with the global token count passed as ``num_items_in_batch``.

Run it:
    python -m grpo_fast train --out runs/demo                     # built-in task, ~1 min on 2 cores
    python -m grpo_fast train --out runs/cmp --compare            # fused loss vs the eager reference, ~3 min
    torchrun --nproc_per_node 2 -m grpo_fast train --out runs/ddp # DistributedDataParallel (gloo / nccl)
    torchrun --nproc_per_node 2 -m grpo_fast train --dist fsdp --out runs/fsdp  # FSDP2 (fully_shard)
    torchrun --nproc_per_node 2 -m grpo_fast train --vocab-parallel 2 --out runs/tp  # the LM head split along V
    python examples/hf_llama_reverse.py                           # any Hugging Face causal LM

From Python: ``train(TrainConfig(...), model=my_causal_lm, task=my_task)``; the model is any
nn.Module whose forward(input_ids) returns logits (a tensor, a tuple whose first item is the
logits, or an object with ``.logits``).

Distributed: the P prompts of a step are split across ranks (each rank holds whole groups, so the
advantages are the single-process ones); the dapo/cispo normalizer (the number of completion tokens
of the whole step) is summed over ranks with all_reduce and passed as ``num_items_in_batch``.
DDP averages gradients over ranks, so those losses are multiplied by the world size. ``--dist fsdp``
shards the model with FSDP2 instead (``wrap_policy``), which averages the same way; the fused-linear
loss is computed inside the FSDP root's forward (``CausalLM.forward(..., head_loss=...)``), where the
LM head's weight is all-gathered, and sampling runs on gathered weights (``gathered``).
``--vocab-parallel N`` splits the LM head along V over N ranks that share the prompts (trainer/tp.py):
``rank`` / ``world`` below are then those of the data-parallel replicas, the head is a
``tp.ShardedHead`` and every pass through it (loss, log-probs, sampling) takes its group.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule, fully_shard

import grpo_fast

from .._config import LOSS_TABLE
from ..model import GPTConfig, TinyGPT
from ..tasks import Task, get_task


from . import tp
from .config import TrainConfig
from .harness import (load_checkpoint, peak_mem_mb, reset_peak_mem, save_checkpoint, tenth_means,
                      write_plots)


# ------------------------------------------------------------------------------------------------
# Distributed helpers (single process: rank 0 of 1, every collective is a no-op)
# ------------------------------------------------------------------------------------------------
def dist_setup(device: torch.device):
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ``group`` (None: every process)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_gather_cat(t: torch.Tensor, group=None) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def data_group(lm: "CausalLM"):
    """The processes that take different prompts: the dp group of ``--vocab-parallel``, else all (None)."""
    split = lm.vocab_split
    return None if split is None else split.dp_group


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """The repeated layers FSDP2 shards one by one: TinyGPT's ``blocks``, a Hugging Face model's
    modules of the classes it names in ``_no_split_modules`` (LlamaDecoderLayer ...); none for any
    other model (then the whole model is one FSDP unit: correct, but every parameter is gathered at once)."""
    if isinstance(model, TinyGPT):
        return list(model.blocks)
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_policy(lm: "CausalLM", cfg: TrainConfig, world: int, device: torch.device) -> nn.Module:
    """The module the update calls: ``lm`` itself in one process; with several, DDP (``--dist ddp``)
    or FSDP2 (``--dist fsdp``: ``fully_shard`` on every transformer block, then on ``lm``, the root,
    which holds the embeddings and the LM head; fp32 throughout, no mixed-precision policy). FSDP2
    shards ``lm`` in place (its parameters become DTensors split on dim 0) and returns it: create the
    optimizer after this call."""
    if world == 1 or lm.vocab_split is not None:  # --vocab-parallel averages gradients itself (tp.py)
        return lm
    if cfg.dist == "ddp":
        return nn.parallel.DistributedDataParallel(lm)
    if cfg.dist != "fsdp":
        raise ValueError(f"dist must be 'ddp' or 'fsdp', got {cfg.dist!r}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    for block in transformer_blocks(lm.model):
        fully_shard(block, mesh=mesh)
    fully_shard(lm, mesh=mesh)
    # FSDP2 picks its root at the first forward through an FSDP module; sampling calls the inner
    # model directly (under ``gathered``), so settle the root now: ``lm``.
    lm._get_fsdp_state()._lazy_init()
    return lm


def is_fsdp(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextmanager
def gathered(lm: nn.Module):
    """Every parameter of an FSDP2-sharded ``lm`` all-gathered for the duration (no-grad passes that
    call the inner model directly: sampling with the KV cache, HF ``generate``, the old log-probs),
    and sharded again after. A no-op for an unsharded model."""
    if not is_fsdp(lm):
        yield
        return
    units = [m for m in lm.modules() if is_fsdp(m)]
    lm.set_reshard_after_forward(False)  # the blocks' own forward hooks must not reshard inside
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        # Reshard everything and clear the forward order the blocks' hooks recorded meanwhile (FSDP2
        # would otherwise take it for the training forward's and prefetch the wrong blocks in backward).
        lm.reset_iter_state()
        lm.set_reshard_after_forward(True)
        lm.set_reshard_after_forward(False, recurse=False)  # FSDP2's choice for the root: kept until backward


def clip_grad_norm(params, max_norm: float) -> float:
    """torch's clip_grad_norm_, as a float (under FSDP2 the norm is a DTensor over the shards)."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def autocast(cfg: TrainConfig, device: torch.device):
    """nanoGPT's device-agnostic switch: nullcontext for float32, torch.autocast for bfloat16."""
    if cfg.dtype == "float32":
        return nullcontext()
    if cfg.dtype != "bfloat16":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {cfg.dtype!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# The policy: any causal LM behind one interface
# ------------------------------------------------------------------------------------------------
def _first_logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


class CausalLM(nn.Module):
    """Wraps a causal LM; forward gives the completion positions' logits (B, T, V) or hidden states.

    Three kinds of model: the built-in ``TinyGPT`` (KV cache, ``return_hidden``), a Hugging Face
    ``*ForCausalLM`` (``generate``, ``base_model`` + ``get_output_embeddings``), or any module whose
    forward(input_ids) returns logits (no cache, no head: the logits path). This wrapper is what
    DistributedDataParallel wraps and FSDP2's root: the fused-linear loss runs inside its forward
    (``head_loss``), which arms DDP's gradient all-reduce and is where FSDP2 has gathered the LM head.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.is_tiny = isinstance(model, TinyGPT)
        self.is_hf = (not self.is_tiny) and hasattr(model, "get_output_embeddings") and hasattr(model, "base_model") and hasattr(model, "generate")
        cfg = getattr(model, "config", None)
        # Gemma-2/3 cap the final logits, Cohere scales them: the fused-linear loss applies both.
        self.logit_softcap = getattr(cfg, "final_logit_softcapping", None) if self.is_hf else None
        self.logit_scale = float(getattr(cfg, "logit_scale", 1.0) or 1.0) if self.is_hf else 1.0

    def lm_head(self) -> Optional[nn.Module]:
        """The LM head: an nn.Linear, or this rank's rows of it (``tp.ShardedHead``, ``--vocab-parallel``)."""
        if self.is_tiny:
            return self.model.lm_head
        if self.is_hf:
            head = self.model.get_output_embeddings()
            return head if isinstance(head, (nn.Linear, tp.ShardedHead)) else None
        return None

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states (a Hugging Face model: with its logit scale and softcap)."""
        z = self.lm_head()(h)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.logit_softcap is not None:
            z = self.logit_softcap * torch.tanh(z / self.logit_softcap)
        return z

    @property
    def vocab_split(self) -> Optional[tp.VocabSplit]:
        """The process groups and rows of a head split along V (``tp.shard_lm_head``); None when whole."""
        head = self.lm_head()
        return head.split if isinstance(head, tp.ShardedHead) else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int, hidden: bool = False,
                head_loss=None):
        """input_ids: (B, S) = prompt + completion[:, :-1]; attention_mask (B, S) (0 on left padding).

        Returns the last ``n_completion`` positions: logits (B, T, V), or hidden states (B, T, H)
        before the LM head when ``hidden``; position S - T + t scores completion token t.
        ``head_loss``: a function (hidden (B, T, H), lm_head) -> anything, called here, inside this
        module's forward, and its result returned: the fused-linear loss reads the LM head's weight
        there, where FSDP2 has all-gathered it (between forward and backward it is a shard).
        """
        if head_loss is not None:
            return head_loss(self.forward(input_ids, attention_mask, n_completion, hidden=True), self.lm_head())
        T = n_completion
        if self.is_tiny:
            h = self.model(input_ids, return_hidden=True)[:, -T:]
            return h if hidden else self.model.lm_head(h)
        if self.is_hf:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if hidden or self.lm_head() is not None:
                out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
                h = out.last_hidden_state[:, -T:]
                return h if hidden else self.head_logits(h)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return _first_logits(out)[:, -T:]
        if hidden:
            raise ValueError("this model exposes no LM head: use loss_path='logits'")
        return _first_logits(self.model(input_ids))[:, -T:]


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
def _sample_next(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> (B,) token ids drawn from softmax(logits / temperature).

    Inverse-CDF sampling: one uniform u per row, the first token whose cumulative probability
    exceeds u·total. The same distribution as torch.multinomial, ~15x faster on the CPU for
    V = 32k (multinomial re-normalizes in float64). A token of probability 0 is never drawn: its
    cumulative sum equals its predecessor's, and the search takes the first one strictly above u.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=total.device, dtype=total.dtype) * total
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u rounding up to the total (rare) would give V: take the last token of positive probability.
    last = (cdf < total).sum(dim=-1)
    return torch.minimum(idx, last)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) 1.0 up to and including the first ``eos_id`` of each row, 0.0 after it."""
    is_eos = completion_ids == eos_id
    # number of EOS strictly before position t: 0 means "still inside the completion"
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).float()


@torch.no_grad()
def sample_completions(lm: CausalLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                       temperature: float, eos_id: int, pad_id: int, generator: Optional[torch.Generator] = None):
    """Sample one completion per row of ``prompt_ids`` (B, P) (left-padded, mask (B, P)).

    Returns (completion_ids (B, T) int64 padded with ``pad_id`` after the first EOS, mask (B, T)
    float32: 1 up to and including the EOS), T <= max_new_tokens (stops when every row has ended).
    """
    model = lm.model
    B, P = prompt_ids.shape
    split = lm.vocab_split
    was_training = model.training
    model.eval()
    try:
        if lm.is_hf and split is None:
            # HF generate draws from the global torch RNG. top_k=0 / top_p=1: sample the full
            # softmax(logits / τ) the loss assumes, not the model's default truncated one.
            seq = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_id, pad_token_id=pad_id)
            ids = seq[:, P:]
        else:
            cache = model.new_cache(B, P + max_new_tokens) if lm.is_tiny else None
            out = []
            done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
            seq, seq_mask = prompt_ids, prompt_mask
            step_input = prompt_ids
            hf_cache = None
            for _ in range(max_new_tokens):
                if cache is not None:
                    logits = model(step_input, cache=cache)[:, -1]  # only the new positions are computed
                elif lm.is_hf:  # a split head (generate would sample one shard's logits): its KV cache, our draw
                    pos = (seq_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1]:]
                    o = model.base_model(input_ids=step_input, attention_mask=seq_mask, position_ids=pos,
                                         past_key_values=hf_cache, use_cache=True)
                    hf_cache = o.past_key_values
                    logits = lm.head_logits(o.last_hidden_state[:, -1])
                else:
                    logits = _first_logits(model(seq))[:, -1]  # no cache: recompute the whole sequence
                # a split head gives this rank's (B, V_r) logits; tp.sample_next draws the same token on every rank
                nxt = (_sample_next(logits, temperature, generator) if split is None
                       else tp.sample_next(logits, temperature, generator, split))
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                out.append(nxt)
                done |= nxt == eos_id
                step_input = nxt[:, None]
                seq = torch.cat([seq, step_input], dim=1)
                seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
                if bool(done.all()):
                    break
            ids = torch.stack(out, dim=1)
    finally:
        model.train(was_training)
    mask = completion_mask_from_ids(ids, eos_id)
    ids = torch.where(mask > 0, ids, torch.full_like(ids, pad_id))
    return ids, mask


# ------------------------------------------------------------------------------------------------
# Rollout: prompts -> completions -> rewards -> advantages (+ old / reference log-probs)
# ------------------------------------------------------------------------------------------------
def encode_prompts(task: Task, prompts: List[str], device) -> tuple:
    """Left-pad the encoded prompts: (ids (n, P) int64, mask (n, P) float32)."""
    enc = [task.tokenizer.encode(p) for p in prompts]
    P = max(len(e) for e in enc)
    ids = torch.full((len(enc), P), task.tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(enc), P)
    for i, e in enumerate(enc):
        ids[i, P - len(e):] = torch.tensor(e)
        mask[i, P - len(e):] = 1.0
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sequence_logprobs(lm: CausalLM, batch: dict, cfg: TrainConfig, micro: int) -> torch.Tensor:
    """Per-token log-probs (B, T) of the batch's completions under ``lm`` (no grad; old / ref policy).

    From the hidden states and the LM head when the fused-linear path is available (the (B, T, V)
    logits are never built), else from the logits; ``micro`` rows at a time. Valid rows only: a padding
    token (completion_mask 0) is not computed and gets 0, which the loss never reads.
    """
    out = []
    B, T = batch["completion_ids"].shape
    head = lm.lm_head()
    split = lm.vocab_split
    use_fl = (head is not None and hasattr(grpo_fast, "fused_linear_token_logprobs") and cfg.loss_path != "logits"
              and cfg.loss_backend != "torch")
    for s in range(0, B, micro):
        ids, am, y = batch["input_ids"][s:s + micro], batch["attention_mask"][s:s + micro], batch["completion_ids"][s:s + micro]
        m = batch["completion_mask"][s:s + micro]
        if split is not None:  # the head's rows on this rank: the primitives with its group (the same (B, T) everywhere)
            if use_fl:
                out.append(head_logprobs(lm, lm(ids, am, T, hidden=True), y, cfg.temperature, cfg.loss_backend, mask=m))
            else:
                out.append(grpo_fast.logprobs(lm(ids, am, T), y, temperature=cfg.temperature, backend=cfg.loss_backend,
                                              mask=m, **split.kwargs())[0])
        elif use_fl:
            hidden = lm(ids, am, T, hidden=True)
            out.append(grpo_fast.fused_linear_token_logprobs(hidden, head.weight, y, bias=head.bias, logit_scale=lm.logit_scale,
                                                             logit_softcap=lm.logit_softcap, temperature=cfg.temperature,
                                                             backend=cfg.loss_backend, mask=m))
        else:
            out.append(grpo_fast.token_logprobs(lm(ids, am, T), y, cfg.temperature, backend=cfg.loss_backend, mask=m))
    return torch.cat(out)


def head_logprobs(lm: CausalLM, hidden: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                  backend: str = "auto", mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) log-probs of ``ids`` from the hidden states through ``lm``'s LM head (its rows on this rank
    and their group with ``--vocab-parallel``), never building the logits; differentiable."""
    head = lm.lm_head()
    return grpo_fast.fused_linear_logprobs(hidden, head.weight, ids, bias=head.bias, temperature=temperature,
                                           logit_scale=lm.logit_scale, logit_softcap=lm.logit_softcap, backend=backend,
                                           mask=mask, **tp.split_kwargs(head))[0]


def advantages_for_rank(rewards: torch.Tensor, cfg: TrainConfig, rank: int, world: int, group=None) -> torch.Tensor:
    """(n,) advantages of this rank's rows. Groups never straddle ranks, so "group" and "none" are
    local; "batch" divides by the std of every rank's rewards, gathered first. ``rank`` / ``world``:
    this process's place among the ``group`` (None: all) processes that take different prompts."""
    if cfg.scale_rewards == "batch" and world > 1:
        all_r = all_gather_cat(rewards, group)
        return grpo_fast.group_advantages(all_r, cfg.group_size, cfg.scale_rewards).view(world, -1)[rank]
    return grpo_fast.group_advantages(rewards, cfg.group_size, cfg.scale_rewards)


def build_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, advantages, max_completion_length=None) -> dict:
    """The tensors the update reads. The model reads prompt + completion[:, :-1]: position P - 1 + t
    scores completion token t. ``max_completion_length`` (dr_grpo's constant normalizer) is the
    sampling limit, not this batch's T, so that it is the same at every step and on every rank."""
    n, T = completion_ids.shape
    return {
        "max_completion_length": max_completion_length or T,
        "advantages": advantages, "completion_ids": completion_ids, "completion_mask": completion_mask,
        "input_ids": torch.cat([prompt_ids, completion_ids[:, :T - 1]], dim=1),
        "attention_mask": torch.cat([prompt_mask, torch.ones(n, T - 1, device=prompt_mask.device)], dim=1),
        "old_logp": None, "ref_logp": None,
    }


def rollout(lm: CausalLM, ref_lm: Optional[CausalLM], task: Task, cfg: TrainConfig, step_gen: torch.Generator,
            sample_gen: torch.Generator, rank: int, world: int, device) -> dict:
    """One step's experience for this rank: its share of the prompts, G completions each, scored.
    ``rank`` / ``world``: among the processes that take different prompts (``--vocab-parallel``: the dp group)."""
    examples = task.sample(cfg.prompts_per_step, step_gen)  # every rank draws the same prompts ...
    per_rank = cfg.prompts_per_step // world
    examples = examples[rank * per_rank:(rank + 1) * per_rank]  # ... and keeps its own slice
    examples = [e for e in examples for _ in range(cfg.group_size)]  # rows [k·G, (k+1)·G): prompt k's group
    prompts = [e["prompt"] for e in examples]
    prompt_ids, prompt_mask = encode_prompts(task, prompts, device)
    max_new = cfg.max_new_tokens or task.max_new_tokens
    with autocast(cfg, prompt_ids.device):
        comp_ids, comp_mask = sample_completions(lm, prompt_ids, prompt_mask, max_new_tokens=max_new,
                                                 temperature=cfg.temperature, eos_id=task.tokenizer.eos_id,
                                                 pad_id=task.tokenizer.pad_id, generator=sample_gen)
    completions = [task.tokenizer.decode(row) for row in comp_ids.tolist()]
    rewards, parts = task.rewards(prompts, completions, examples)
    rewards = rewards.to(device)
    batch = build_batch(prompt_ids, prompt_mask, comp_ids, comp_mask, advantages_for_rank(rewards, cfg, rank, world, data_group(lm)),
                        max_new)
    batch.update(prompts=prompts, completions=completions, rewards=rewards, reward_parts=parts)
    micro = math.ceil(len(prompts) / cfg.grad_accum)
    # Old log-probs only matter when the policy moves between sampling and a later update.
    with autocast(cfg, prompt_ids.device):
        if cfg.num_iterations > 1:
            batch["old_logp"] = sequence_logprobs(lm, batch, cfg, micro)
        if cfg.beta != 0:
            batch["ref_logp"] = sequence_logprobs(ref_lm, batch, cfg, micro)
    return batch


# ------------------------------------------------------------------------------------------------
# The update: grpo_fast loss, gradient accumulation, DDP scaling
# ------------------------------------------------------------------------------------------------
def resolve_loss_path(lm: CausalLM, cfg: TrainConfig) -> str:
    has_fl = hasattr(grpo_fast, "fused_linear_grpo_loss")
    if cfg.loss_path == "auto":
        return "fused_linear" if (has_fl and lm.lm_head() is not None and cfg.loss_backend != "torch") else "logits"
    if cfg.loss_path == "fused_linear":
        if not has_fl:
            raise RuntimeError("loss_path='fused_linear' needs grpo_fast.fused_linear_grpo_loss, which this build lacks")
        if lm.lm_head() is None:
            raise RuntimeError("loss_path='fused_linear' needs a model whose LM head (an nn.Linear) is known")
        return "fused_linear"
    if cfg.loss_path != "logits":
        raise ValueError(f"loss_path must be 'auto', 'fused_linear' or 'logits', got {cfg.loss_path!r}")
    return "logits"


def loss_options(cfg: TrainConfig) -> dict:
    return dict(loss_type=cfg.loss_type, beta=cfg.beta, kl_estimator=cfg.kl_estimator, epsilon_low=cfg.epsilon_low,
                epsilon_high=cfg.epsilon_high, importance_sampling_level=cfg.importance_sampling_level,
                temperature=cfg.temperature, backend=cfg.loss_backend)


def micro_batch_loss(policy: nn.Module, lm: CausalLM, batch: dict, rows: slice, cfg: TrainConfig, path: str,
                     num_items: float, loss_scale: float = 1.0):
    """The GRPO loss of rows ``rows`` of the batch. ``policy`` is ``lm`` or its DDP wrapper.
    ``loss_scale``: what the caller multiplies the loss by before backward (the kernels fold it in)."""
    ids, mask = batch["completion_ids"][rows], batch["completion_mask"][rows]
    T = ids.shape[1]
    per_call = dict(old_logp=None if batch["old_logp"] is None else batch["old_logp"][rows],
                    ref_logp=None if batch["ref_logp"] is None else batch["ref_logp"][rows],
                    completion_mask=mask, max_completion_length=batch["max_completion_length"],
                    num_items_in_batch=num_items if LOSS_TABLE[cfg.loss_type].uses_num_items else None,
                    loss_scale=loss_scale)
    adv = batch["advantages"][rows]
    if path == "fused_linear":
        # Called inside the policy's forward: under FSDP2 the LM head's weight is all-gathered there,
        # and its gradient goes back through FSDP's reduce-scatter to the shards (DDP: the all-reduce).
        def head_loss(hidden, head):
            return grpo_fast.fused_linear_grpo_loss(hidden, head.weight, ids, adv, bias=head.bias, logit_scale=lm.logit_scale,
                                                    logit_softcap=lm.logit_softcap, **per_call, **loss_options(cfg),
                                                    **tp.split_kwargs(head))
        return policy(batch["input_ids"][rows], batch["attention_mask"][rows], T, head_loss=head_loss)
    logits = policy(batch["input_ids"][rows], batch["attention_mask"][rows], T)
    # inplace: the kernel turns the logits into their gradient; safe when they are the fresh output of
    # the LM head (a Linear does not keep its output for backward) — not when a softcap made them.
    inplace = lm.lm_head() is not None and lm.logit_softcap is None
    return grpo_fast.grpo_loss(logits, ids, adv, inplace=inplace, **per_call, **loss_options(cfg),
                               **tp.split_kwargs(lm.lm_head()))


def accumulate_gradients(policy: nn.Module, lm: CausalLM, batch: dict, cfg: TrainConfig, path: str, world: int) -> dict:
    """Backward of the step's loss over ``grad_accum`` micro-batches into ``.grad``. ``world``: the
    number of data-parallel replicas (the processes, or their tp groups with ``--vocab-parallel``).

    Returns the loss (as the whole step's loss, not this rank's share) and the token-weighted
    means of the loss metrics over this rank's tokens.
    """
    B = batch["completion_ids"].shape[0]
    micro = math.ceil(B / cfg.grad_accum)
    chunks = [slice(s, min(s + micro, B)) for s in range(0, B, micro)]
    # dapo / cispo normalize by the completion tokens of the whole step: every micro-batch, every rank.
    num_items = float(all_reduce_sum(batch["completion_mask"].sum().reshape(1).double(), data_group(lm)).item())
    sum_normalized = LOSS_TABLE[cfg.loss_type].uses_num_items
    # DDP and FSDP2 average gradients over ranks: a sum-normalized loss is multiplied back by the world size;
    # a per-micro-batch mean is divided by the number of micro-batches.
    scale = float(world) if sum_normalized else 1.0 / len(chunks)
    logs: Dict[str, float] = {"loss": 0.0}
    n_tok = max(float(batch["completion_mask"].sum()), 1.0)
    for i, rows in enumerate(chunks):
        last = i == len(chunks) - 1
        # Only the last micro-batch all-reduces (DDP: no_sync for the others) or reduce-scatters (FSDP2).
        sync = nullcontext() if (last or not hasattr(policy, "no_sync")) else policy.no_sync()
        if is_fsdp(policy):
            policy.set_requires_gradient_sync(last)
        with sync:
            with autocast(cfg, batch["completion_ids"].device):
                loss, metrics = micro_batch_loss(policy, lm, batch, rows, cfg, path, num_items, scale)
            (loss * scale).backward()
        logs["loss"] += float(loss.detach()) * scale
        tok = float(batch["completion_mask"][rows].sum())
        for k, v in metrics.items():
            logs[k] = logs.get(k, 0.0) + float(v) * tok / n_tok
    return logs


def update(policy: nn.Module, lm: CausalLM, optimizer, batch: dict, cfg: TrainConfig, path: str, world: int) -> dict:
    """num_iterations × (accumulate gradients -> clip -> AdamW step). Returns the metrics, averaged."""
    logs: Dict[str, float] = {}
    for _ in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        it = accumulate_gradients(policy, lm, batch, cfg, path, world)
        split = lm.vocab_split
        if split is None:
            it["grad_norm"] = clip_grad_norm(lm.parameters(), cfg.max_grad_norm)
        else:  # no DDP wrapper: average over the data-parallel replicas here; the norm sums the shards'
            tp.average_gradients(lm.parameters(), split.dp_group)
            it["grad_norm"] = tp.clip_grad_norm(lm, split, cfg.max_grad_norm)
        optimizer.step()
        for k, v in it.items():
            logs[k] = logs.get(k, 0.0) + v / cfg.num_iterations
    return logs


# ------------------------------------------------------------------------------------------------
# Supervised warm-up: the output format (right length, digits, EOS) and a glimpse of the task
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def policy_reward(lm: CausalLM, task: Task, cfg: TrainConfig, device, n: int = 128) -> float:
    """Mean reward of ``n`` completions sampled for a fixed set of prompts (its own generators: the
    same prompts every call, on every rank, and the training's random streams are left alone)."""
    examples = task.sample(n, torch.Generator().manual_seed(cfg.seed + 7919))
    prompts = [e["prompt"] for e in examples]
    ids, mask = encode_prompts(task, prompts, device)
    with autocast(cfg, device):
        comp, _ = sample_completions(lm, ids, mask, max_new_tokens=cfg.max_new_tokens or task.max_new_tokens,
                                     temperature=cfg.temperature, eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id,
                                     generator=torch.Generator(device=device).manual_seed(cfg.seed + 7920))
    completions = [task.tokenizer.decode(row) for row in comp.tolist()]
    return float(task.rewards(prompts, completions, examples)[0].mean())


def supervised_warmup(lm: CausalLM, task: Task, cfg: TrainConfig, gen: torch.Generator, device, rank: int) -> tuple:
    """Cross-entropy on targets that are the answer with probability ``warmup_answer_frac`` and the
    task's format-only ``warmup_target`` (random digits) otherwise, for at most ``warmup_steps``
    steps; with ``warmup_target_reward`` > 0 it stops at the first check (every 5 steps) where
    ``policy_reward`` reaches it. Returns (the last loss, the steps taken, the last reward checked)."""
    if cfg.warmup_steps <= 0 or task.warmup_target is None:
        return float("nan"), 0, None
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    n = cfg.warmup_batch
    loss = torch.tensor(float("nan"))
    reward = None
    done = 0
    for _ in range(cfg.warmup_steps):
        examples = task.sample(n, gen)
        prompt_ids, prompt_mask = encode_prompts(task, [e["prompt"] for e in examples], device)
        use_answer = torch.rand(n, generator=gen) < cfg.warmup_answer_frac
        targets = [task.tokenizer.encode(e["answer"] if a else task.warmup_target(e, gen)) + [task.tokenizer.eos_id]
                   for e, a in zip(examples, use_answer.tolist())]
        T = max(len(t) for t in targets)
        tgt = torch.full((n, T), -100, dtype=torch.long)
        for i, t in enumerate(targets):
            tgt[i, :len(t)] = torch.tensor(t)
        tgt = tgt.to(device)
        comp = tgt.clamp(min=0)
        args = (torch.cat([prompt_ids, comp[:, :T - 1]], 1), torch.cat([prompt_mask, torch.ones(n, T - 1, device=device)], 1), T)
        if lm.vocab_split is None:
            logits = lm(*args)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        else:  # the head's rows on this rank: the cross-entropy from the split log-probs
            valid = tgt != -100
            loss = -(head_logprobs(lm, lm(*args, hidden=True), comp) * valid).sum() / valid.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_initialized():  # identical data on every rank; keep replicas equal
            tp.average_gradients(lm.parameters(), data_group(lm))
        opt.step()
        done += 1
        if cfg.warmup_target_reward > 0 and done % 5 == 0:
            reward = policy_reward(lm, task, cfg, device)  # the same on every rank: identical weights and prompts
            if reward >= cfg.warmup_target_reward:
                break
    return float(loss.detach()), done, reward


# ------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------
def build_default_model(cfg: TrainConfig, task: Task) -> nn.Module:
    """A model created from a config (nothing downloaded), sized by cfg.n_layer / n_head / n_embd."""
    max_new = cfg.max_new_tokens or task.max_new_tokens
    V = max(cfg.vocab_size, task.tokenizer.vocab_size)
    if cfg.model == "llama":
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError as e:
            raise RuntimeError("--model llama needs Hugging Face transformers: pip install transformers") from e
        conf = LlamaConfig(vocab_size=V, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                           num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                           max_position_embeddings=task.max_prompt_len + max_new, tie_word_embeddings=True,
                           pad_token_id=task.tokenizer.pad_id, eos_token_id=task.tokenizer.eos_id, bos_token_id=None)
        return LlamaForCausalLM(conf)
    if cfg.model != "tiny":
        raise ValueError(f"model must be 'tiny' or 'llama', got {cfg.model!r}")
    return TinyGPT(GPTConfig(vocab_size=V, block_size=task.max_prompt_len + max_new,
                             n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))


def train(cfg: TrainConfig, model: Optional[nn.Module] = None, task: Optional[Task] = None) -> dict:
    """Run GRPO; returns the summary (also written to ``cfg.out``/summary.json on rank 0).

    ``model``: any causal LM (see ``CausalLM``), trained in place; default: built from ``cfg``.
    ``task``: a ``grpo_fast.tasks.Task`` (prompts, tokenizer, reward functions); default: ``cfg.task``.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, model, task)
    finally:
        torch.set_num_threads(threads)  # cfg.threads is this run's choice, not the caller's


def _train(cfg: TrainConfig, model: Optional[nn.Module], task: Optional[Task]) -> dict:
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    rank, world = dist_setup(device)
    n_tp = cfg.vocab_parallel
    if n_tp > 1:
        tp.check_world(n_tp, world, cfg.prompts_per_step)
    elif cfg.prompts_per_step % world:
        raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of processes ({world})")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    task = task or get_task(cfg.task, n_digits=cfg.n_digits)
    model = (model or build_default_model(cfg, task)).to(device)
    if n_tp > 1:  # rank 0's weights everywhere, then each rank keeps its rows of the head (trainer/tp.py)
        tp.shard_lm_head(model, *tp.parallel_groups(n_tp, world, device), broadcast=True)
    lm = CausalLM(model)
    # ``rank`` / ``world`` among the processes that take different prompts (the ranks of a tp group share theirs)
    d_rank, d_world = (rank, world) if lm.vocab_split is None else (lm.vocab_split.dp_rank, lm.vocab_split.dp_size)
    # Generators: the prompts (same on every rank) and the sampling (different per data-parallel rank).
    gens = {"prompts": torch.Generator().manual_seed(cfg.seed + 1),
            "sample": torch.Generator(device=device).manual_seed(cfg.seed + 2 + 1000 * d_rank)}
    is_main = rank == 0
    if is_main:
        os.makedirs(cfg.out, exist_ok=True)
    start_step = 0
    warmup_loss, warmup_done, warmup_reward = float("nan"), 0, None
    if not cfg.resume:
        warmup_loss, warmup_done, warmup_reward = supervised_warmup(lm, task, cfg, gens["prompts"], device, rank)
    ref_lm = CausalLM(copy.deepcopy(model).eval().requires_grad_(False)) if cfg.beta != 0 else None
    policy = wrap_policy(lm, cfg, world, device)  # FSDP2 shards lm's parameters: the optimizer comes after
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    if cfg.resume:
        start_step = load_checkpoint(cfg.resume, lm, ref_lm, optimizer, gens)
    path = resolve_loss_path(lm, cfg)

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    rows: List[dict] = []
    if is_main and cfg.resume and os.path.exists(metrics_path):
        with open(metrics_path) as f:  # keep the steps the checkpoint covers, drop any after it
            rows = [r for r in (json.loads(line) for line in f if line.strip()) if r["step"] <= start_step]
    if is_main:
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    bar = None
    if is_main and cfg.progress:
        try:
            from tqdm import tqdm
        except ImportError:  # optional (pip install tqdm): train without a bar
            tqdm = None
        bar = tqdm and tqdm(total=cfg.steps, initial=start_step, desc=f"grpo[{cfg.loss_backend}/{path}]", dynamic_ncols=True)
    t_train = time.perf_counter()
    for step in range(start_step + 1, cfg.steps + 1):
        reset_peak_mem(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with gathered(lm):  # FSDP2: sampling and the old log-probs call the inner model on full weights
            batch = rollout(lm, ref_lm, task, cfg, gens["prompts"], gens["sample"], d_rank, d_world, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        rollout_peak = peak_mem_mb(device)
        reset_peak_mem(device, trim=True)  # the update's own peak: loss forward + backward + optimizer
        t1u = time.perf_counter()
        logs = update(policy, lm, optimizer, batch, cfg, path, d_world)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        # Rank-averaged metrics for the log (one small all_reduce; the ranks of a tp group hold the same values).
        names = ["reward_mean", "completion_len"] + [f"reward/{k}" for k in batch["reward_parts"]] + sorted(logs)
        local = [float(batch["rewards"].mean()), float(batch["completion_mask"].sum(1).mean())]
        local += [float(v.mean()) for v in batch["reward_parts"].values()] + [logs[k] for k in sorted(logs)]
        vals = all_reduce_sum(torch.tensor(local, dtype=torch.float64)) / world
        row = {"step": step, **{k: float(v) for k, v in zip(names, vals)}}
        row.setdefault("kl", None)  # not computed when beta == 0 (no reference model)
        row.update(step_time_s=(t1 - t0) + (t2 - t1u), rollout_time_s=t1 - t0, update_time_s=t2 - t1u, peak_mem_mb=peak_mem_mb(device),
                   rollout_peak_mem_mb=rollout_peak)
        if is_main:
            rows.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if bar is not None:
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.4f}", step_s=f"{row['step_time_s']:.3f}")
                bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:  # every rank: FSDP gathers
            save_checkpoint(os.path.join(cfg.out, "ckpt.pt"), step, lm, ref_lm, optimizer, gens, cfg)
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t_train

    summary = {}
    save_checkpoint(os.path.join(cfg.out, "ckpt.pt"), cfg.steps, lm, ref_lm, optimizer, gens, cfg)  # rank 0 writes
    if is_main:
        rewards = [r["reward_mean"] for r in rows]
        first, last = tenth_means(rewards) if rewards else (float("nan"), float("nan"))
        times = sorted(r["step_time_s"] for r in rows)
        summary = {
            "task": task.name, "task_description": task.description, "steps": cfg.steps, "world_size": world,
            "vocab_parallel": n_tp,
            "device": str(device), "loss_backend": cfg.loss_backend, "loss_path": path,
            "warmup_final_loss": warmup_loss, "warmup_steps_done": warmup_done, "warmup_final_reward": warmup_reward,
            "reward_first_tenth": first, "reward_last_tenth": last,
            "reward_gain": last - first, "median_step_time_s": times[len(times) // 2] if times else None,
            "median_update_time_s": sorted(r["update_time_s"] for r in rows)[len(rows) // 2] if rows else None,
            "median_rollout_time_s": sorted(r["rollout_time_s"] for r in rows)[len(rows) // 2] if rows else None,
            "vocab_size": lm.lm_head().out_features if lm.lm_head() is not None else None,
            "hidden_size": lm.lm_head().in_features if lm.lm_head() is not None else None,
            "threads": torch.get_num_threads(),
            "peak_mem_mb": max((r["peak_mem_mb"] for r in rows), default=None),
            "train_time_s": train_time, "config": dataclasses.asdict(cfg),
            "plots": write_plots(cfg.out, rows, f"{task.name}: GRPO ({cfg.loss_backend}, {path})") if (cfg.plots and rows) else [],
        }
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


