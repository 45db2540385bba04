"""``--vocab-parallel N``: the LM head split along V over N ranks (tensor parallelism of the head only).

The processes form a (dp, tp) device mesh of (world / N) × N ranks (``init_device_mesh``): the N
ranks of a tp group hold the same batch and the same copy of every other parameter, and rows
[start_r, start_r + V_r) of the LM head (and of its bias). Everything that reads the head does it on
the shard, with the primitives' ``group=`` / ``vocab_start=`` (grpo_fast/vocab_parallel.py):

- the loss: ``fused_linear_grpo_loss(hidden, w_r, ..., group=tp, vocab_start=start_r)`` (or
  ``grpo_loss`` on the (B, T, V_r) logits of the shard with ``--loss-path logits``); ∂hidden is
  all-reduced over the tp group (by the primitive, or by ``ShardedHead`` for the logits), so the
  replicated parameters get the same gradient on every rank of the group, and each rank gets the
  gradient of its rows only;
- the old / reference log-probs and the warm-up's cross-entropy: ``fused_linear_logprobs`` likewise;
- sampling: ``sample_next`` draws from softmax(logits / τ) over the whole vocabulary from the (B, V_r)
  logits of each shard (three collectives of B numbers per decode step, never (B, V));
- an embedding tied to the head (TinyGPT, ``tie_word_embeddings``) is split the same way and shares
  the shard: ``ShardedEmbedding`` looks up the rows it holds (zeros for the others) and all-reduces
  the (B, S, H) result (Megatron's vocab-parallel embedding; its backward is the identity).

Data parallelism: the (world / N) tp groups take different prompts, as DDP ranks do; their gradients
are averaged with an all-reduce over the dp group after the backward (``average_gradients``; no DDP
wrapper: the head's shards are different tensors on the ranks of a tp group). Checkpoints hold the
full tensors under the model's own names (``full_state`` gathers the shards, ``local_state`` slices
them): one process and any N read each other's files.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..vocab_parallel import _ReduceGradient


class VocabSplit:
    """The process groups and this rank's rows of the vocabulary: [start, start + local) of ``total``.

    Shared, not copied, by ``copy.deepcopy`` (the reference model's head is split over the same groups)."""

    def __init__(self, tp_group, dp_group, total: int):
        self.tp_group, self.dp_group = tp_group, dp_group
        self.tp_rank, self.tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
        self.dp_rank, self.dp_size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
        self.total = total
        self.sizes = shard_sizes(total, self.tp_size)
        self.start = sum(self.sizes[:self.tp_rank])
        self.local = self.sizes[self.tp_rank]

    def rows(self) -> slice:
        return slice(self.start, self.start + self.local)

    def kwargs(self) -> dict:
        """The primitives' keywords for this shard."""
        return {"group": self.tp_group, "vocab_start": self.start}

    def __deepcopy__(self, memo):
        return self


def shard_sizes(V: int, n: int) -> List[int]:
    """Rows per rank: V // n each, one more on the first V % n ranks (every shard holds at least one row)."""
    if n > V:
        raise ValueError(f"vocab_parallel ({n}) must be at most the vocabulary size V = {V}: every rank holds at "
                         "least one row of the LM head")
    return [V // n + (1 if r < V % n else 0) for r in range(n)]


def parallel_groups(n: int, world: int, device: torch.device) -> Tuple[object, object]:
    """(tp group, dp group) of this rank on a (world / n, n) mesh; ranks r·n .. r·n + n − 1 split the head.
    ``check_world`` first: n divides the number of processes."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // n, n), mesh_dim_names=("dp", "tp"))
    return mesh["tp"].get_group(), mesh["dp"].get_group()


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: every rank continues with the same tensor, and the
    gradient each rank receives is already the whole gradient of its part."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class ShardedHead(nn.Module):
    """Rows ``split.rows()`` of an ``nn.Linear`` LM head; ``forward`` gives the shard's logits (..., V_r).
    ``in_features`` / ``out_features`` are the whole head's (H, V)."""

    def __init__(self, head: nn.Linear, split: VocabSplit):
        super().__init__()
        self.split = split
        self.in_features, self.out_features = head.in_features, head.out_features
        rows = split.rows()
        self.weight = nn.Parameter(head.weight.detach()[rows].clone(), requires_grad=head.weight.requires_grad)
        self.bias = None if head.bias is None else nn.Parameter(head.bias.detach()[rows].clone(),
                                                                requires_grad=head.bias.requires_grad)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The shard's logits (..., V_r); ∂h is summed over the tp group in backward (each shard's part)."""
        if h.requires_grad:
            h = _ReduceGradient.apply(h, self.split.tp_group)
        return F.linear(h, self.weight, self.bias)


class ShardedEmbedding(nn.Module):
    """A token embedding whose rows ``split.rows()`` are ``weight`` (the tied head's shard): the rows of
    the ids this rank holds, zeros for the others, summed over the tp group."""

    def __init__(self, weight: nn.Parameter, split: VocabSplit, embedding: nn.Embedding):
        super().__init__()
        self.split, self.weight = split, weight
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        pad = embedding.padding_idx
        # padding_idx (its row gets no gradient), as a row of this shard or none
        self.padding_idx = pad
        self._local_pad = pad - split.start if pad is not None and 0 <= pad - split.start < split.local else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        loc = ids - self.split.start
        own = (loc >= 0) & (loc < self.split.local)
        x = F.embedding(loc.clamp(0, self.split.local - 1), self.weight, padding_idx=self._local_pad)
        return _SumOverGroup.apply(x * own.unsqueeze(-1).to(x.dtype), self.split.tp_group)


def split_kwargs(head) -> dict:
    """``group`` / ``vocab_start`` for the primitives when ``head`` is a shard, else nothing."""
    return head.split.kwargs() if isinstance(head, ShardedHead) else {}


def shard_lm_head(model: nn.Module, tp_group, dp_group, broadcast: bool = False) -> VocabSplit:
    """Replace ``model``'s LM head (and the embedding, when tied to it) by this rank's rows, in place.

    ``model``: TinyGPT or a Hugging Face ``*ForCausalLM`` whose output embedding is an ``nn.Linear``,
    with the same whole weights on every rank: ``broadcast`` copies the global rank 0's to the others
    first (as DDP does when it wraps a model)."""
    from ..model import TinyGPT

    if isinstance(model, TinyGPT):
        head, emb = model.lm_head, model.wte
    elif hasattr(model, "get_output_embeddings") and hasattr(model, "set_output_embeddings"):
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    else:
        head = emb = None
    if not isinstance(head, nn.Linear):
        raise ValueError("vocab_parallel needs a model whose LM head is known, an nn.Linear: the built-in TinyGPT or "
                         f"a Hugging Face *ForCausalLM; got {type(model).__name__}")
    tied = isinstance(emb, nn.Embedding) and emb.weight is head.weight
    if tied and emb.max_norm is not None:
        raise ValueError("vocab_parallel: an embedding tied to the LM head with max_norm is not supported")
    split = VocabSplit(tp_group, dp_group, head.out_features)
    if broadcast:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    sharded = ShardedHead(head, split)
    new_emb = ShardedEmbedding(sharded.weight, split, emb) if tied else None
    if isinstance(model, TinyGPT):
        model.lm_head = sharded
        if tied:
            model.wte = new_emb
    else:
        model.set_output_embeddings(sharded)
        if tied:
            model.set_input_embeddings(new_emb)
    return split


def sharded_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every name (tied names included) of a parameter split along V: {name: parameter}."""
    out = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (ShardedHead, ShardedEmbedding)):
            for pname, p in m.named_parameters(recurse=False):
                out[f"{mname}.{pname}" if mname else pname] = p
    return out


def find_split(model: nn.Module) -> Optional[VocabSplit]:
    for m in model.modules():
        if isinstance(m, ShardedHead):
            return m.split
    return None


# ------------------------------------------------------------------------------------------------
# Sampling over the split vocabulary
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_next(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator],
                split: VocabSplit) -> torch.Tensor:
    """The (B,) token ids ``loop._sample_next`` draws from the whole (B, V) logits, from this rank's
    (B, V_r) columns: the same inverse CDF with the same uniform u per row (every rank of the tp group
    holds the same generator), taken shard by shard. Three collectives of B numbers: the max of
    logits/τ, each shard's mass (all-gathered: the mass before each shard), and the chosen id (the
    shard that holds it writes it, the others 0, summed). The draw can differ from one process's only
    when u·total falls within the rounding of the cumulative sums (~1e-7 relative) of a boundary."""
    g = split.tp_group
    s = logits.float() / temperature
    m = s.amax(dim=-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=g)
    cdf = torch.exp(s - m.unsqueeze(-1)).cumsum(dim=-1)  # this shard's cumulative mass
    mass = cdf[:, -1].contiguous()
    masses = [torch.empty_like(mass) for _ in range(split.tp_size)]
    dist.all_gather(masses, mass, group=g)
    cum = torch.stack(masses, dim=-1).cumsum(dim=-1)  # (B, n): the mass up to the end of each shard
    total = cum[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=total.device, dtype=total.dtype) * total
    # the shard holding u (the last one with positive mass when u rounds up to the total)
    owner = torch.minimum(torch.searchsorted(cum, u, right=True).squeeze(-1), (cum < total).sum(dim=-1))
    before = torch.where(owner > 0, cum.gather(-1, (owner - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1),
                         torch.zeros_like(mass))
    t = (u.squeeze(-1) - before).unsqueeze(-1)
    idx = torch.minimum(torch.searchsorted(cdf, t, right=True).squeeze(-1), (cdf < cdf[:, -1:]).sum(dim=-1))
    tok = torch.where(owner == split.tp_rank, idx + split.start, torch.zeros_like(idx))
    dist.all_reduce(tok, group=g)
    return tok


# ------------------------------------------------------------------------------------------------
# Gradients: data-parallel averaging and clipping over the split head
# ------------------------------------------------------------------------------------------------
def average_gradients(params, group) -> None:
    """Average ``.grad`` over ``group`` (the data-parallel replicas); nothing for a group of one."""
    n = dist.get_world_size(group)
    if n == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= n


def clip_grad_norm(model: nn.Module, split: VocabSplit, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` of the whole model: the squared norms of the shards are summed
    over the tp group, every other parameter (the same on every rank of the group) counted once."""
    shard_ids = {id(p) for p in sharded_parameters(model).values()}
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    dev = params[0].grad.device
    sq = [torch.zeros((), dtype=torch.float32, device=dev) for _ in range(2)]  # [replicated, sharded]
    for p in params:
        sq[id(p) in shard_ids] += torch.linalg.vector_norm(p.grad.float()) ** 2
    dist.all_reduce(sq[1], group=split.tp_group)
    total = torch.sqrt(sq[0] + sq[1])
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return float(total)


# ------------------------------------------------------------------------------------------------
# Checkpoints: full tensors under the model's names
# ------------------------------------------------------------------------------------------------
def gather_rows(t: torch.Tensor, split: VocabSplit) -> torch.Tensor:
    """The whole (V, ...) tensor from each rank's rows (all-gathered, padded to the largest shard)."""
    big = max(split.sizes)
    pad = torch.zeros((big,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t.detach()
    parts = [torch.empty_like(pad) for _ in range(split.tp_size)]
    dist.all_gather(parts, pad, group=split.tp_group)
    return torch.cat([p[:n] for p, n in zip(parts, split.sizes)])


def full_state(model: nn.Module, optimizer=None) -> Tuple[Dict[str, torch.Tensor], Dict[str, dict]]:
    """(name -> whole tensor, name -> optimizer state with whole tensors) of the split parameters; a
    collective (every rank of the tp group calls it)."""
    split = find_split(model)
    weights, states = {}, {}
    done = {}
    for name, p in sharded_parameters(model).items():
        if id(p) not in done:
            full = {"param": gather_rows(p, split)}
            st = {} if optimizer is None else optimizer.state.get(p, {})
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                    full[k] = gather_rows(v, split)
            done[id(p)] = full
        weights[name] = done[id(p)]["param"].cpu()
        states[name] = {k: v.cpu() for k, v in done[id(p)].items() if k != "param"}
    return weights, states


def local_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` (whole tensors by name) with this rank's rows of the split parameters."""
    split = find_split(model)
    out = dict(state)
    for name in sharded_parameters(model):
        if name in out:
            out[name] = out[name][split.rows()]
    return out


def local_optimizer_state(model: nn.Module, osd: dict) -> dict:
    """An optimizer state dict keyed by name (``get_optimizer_state_dict``) with this rank's rows."""
    split = find_split(model)
    names = sharded_parameters(model)
    state = {}
    for name, st in osd["state"].items():
        if name in names:
            st = {k: (v[split.rows()] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in st.items()}
        state[name] = st
    return {**osd, "state": state}


def check_world(n: int, world: int, prompts_per_step: int) -> None:
    """The start-up checks that need the number of processes only (before any collective)."""
    if world % n:
        raise ValueError(f"vocab_parallel ({n}) must divide the number of processes ({world}): start "
                         f"{n}·k processes (torchrun --nproc_per_node {n}·k) for k data-parallel replicas of {n} ranks")
    if prompts_per_step % (world // n):
        raise ValueError(f"prompts_per_step ({prompts_per_step}) must be divisible by the number of data-parallel "
                         f"replicas ({world} processes / vocab_parallel {n} = {world // n})")
