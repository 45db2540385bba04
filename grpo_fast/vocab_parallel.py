"""Vocabulary parallelism: logits (or the LM head) split along V over a ``torch.distributed`` group.

    # rank r holds logits[..., start_r : start_r + V_r] (or the LM head rows start_r : start_r + V_r)
    logp, ent = grpo_fast.logprobs(local_logits, ids, return_entropy=True, group=tp_group)
    logp, ent = grpo_fast.fused_linear_logprobs(hidden, local_weight, ids, return_entropy=True, group=tp_group)

Every rank passes the same tokens (ids, temperature, hidden states) and its own contiguous slice of
the vocabulary; every rank gets the same per-token outputs (plain tensors, replicated) and the
gradient of ITS shard only (the logits' or the weight's gradient stays sharded; the hidden states'
gradient is all-reduced, as Megatron's "copy to the tensor-parallel region" does).

How (no kernel change): each rank runs its backend's own log-prob kernels on its shard, with the ids
it does not hold clamped into its range (the kernels read x[y]), which yields per token the shard's
lse in two parts (shift_r, log_d_r), its entropy H_r and, on the owner of y, log q_y = x_y − lse_r.
Then, per token, one MAX all-reduce (G = max_r shift_r over non-empty shards) and one SUM all-reduce
of at most four floats:

    a_r = exp((shift_r − G) + log_d_r)          D = Σ_r a_r,   lse = G + log D
    logp = Σ_r 1[y ∈ r]·log q_y + (Σ_r 1[y ∈ r]·log a_r − log D)
    H    = Σ_r a_r·(H_r − log a_r) / D + log D  (H = Σ_r w_r·(H_r − log w_r), w_r = a_r/D)

Backward needs no communication: the shard's kernel gets the GLOBAL lse parts (G, log D) and the
global H, and writes grad_j = (g_logp·(1[j = y] − p_j) − g_H·p_j·(log p_j + H))/τ for its columns;
on the ranks that do not own y, the clamped column's value (which the kernel wrote with the one-hot
term) is rewritten as −(g_logp·p_j + g_H·p_j·(log p_j + H))/τ from the logit read before the kernel.

The shard offsets: by default rank r's shard starts at Σ_{q<r} V_q (sizes all-gathered once per call:
the layout of ``torch.distributed.tensor``'s Shard(-1) and of Megatron's vocab-parallel head);
``vocab_start`` (the same keyword on every rank) gives them explicitly, and the shards must then tile
[0, V) without gaps or overlaps. The same all-gather checks that every rank has the same number of
tokens and the same ids and that the ids lie in [0, V). A check that fails on one rank only (a wrong
dtype there) raises on that rank alone: the others wait in the collective.

DTensor: logits that are a ``torch.distributed.tensor.DTensor`` placed Shard(-1) on a 1-D mesh (or a
weight / bias placed Shard(0)) are read through ``to_local()``, the mesh's group is the group, and
their gradient comes back as a DTensor of the same placement; the per-token outputs are plain tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["ShardLayout"]

_NO_START = -1  # "vocab_start not given" in the all-gathered row


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Where this rank's vocabulary shard lies: columns [start, start + size) of V = total."""

    group: object  # the ProcessGroup
    rank: int
    world: int
    start: int
    size: int
    total: int
    max_size: int  # the largest shard (chunk sizes that depend on V must agree across ranks)


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # an old torch: no DTensor, nothing can be one
        return None, None
    return DTensor, Shard


def is_dtensor(x) -> bool:
    DTensor, _ = _dtensor_types()
    return DTensor is not None and isinstance(x, DTensor)


def unwrap(x, group, name: str, dim: int):
    """(local tensor, group): a DTensor sharded along ``dim`` over a 1-D mesh gives its local shard
    (differentiable: the gradient returns as a DTensor of the same placement) and the mesh's group;
    anything else is returned as is with ``group``."""
    if not is_dtensor(x):
        return x, group
    _, Shard = _dtensor_types()
    mesh, pl = x.device_mesh, tuple(x.placements)
    if mesh.ndim != 1 or len(pl) != 1 or not isinstance(pl[0], Shard) or pl[0].dim % x.dim() != dim % x.dim():
        raise ValueError(f"{name}: a DTensor must be placed Shard({dim}) on a 1-D device mesh (the vocabulary split "
                         f"over its ranks), got placements {pl} on a {mesh.ndim}-D mesh")
    mesh_group = mesh.get_group()
    if group is not None and not isinstance(group, ShardLayout) and group is not mesh_group:
        raise ValueError(f"group: {name} is a DTensor on a mesh whose process group is not the group passed; "
                         "pass group=None (the mesh's group is used) or that group")
    return x.to_local(), (group if group is not None else mesh_group)


def _ids_checksum(ids: torch.Tensor) -> torch.Tensor:
    """An int64 that differs, with high probability, between two different (N,) id tensors."""
    n = ids.numel()
    w = torch.arange(1, n + 1, device=ids.device, dtype=torch.int64) % 1000003 + 1
    return (ids.reshape(-1) * w).sum() * 1000033 + ids.sum()


def shard_layout(group, vocab_start, V_local: int, ids: torch.Tensor, ids_name: str = "ids") -> ShardLayout:
    """All-gather (V_local, N, vocab_start, min id, max id, ids checksum) once and check them on every
    rank: the same N and ids everywhere, shards tiling [0, V), ids in [0, V). ``ids``: int64, already
    checked for shape and dtype (not for range)."""
    if isinstance(group, ShardLayout):
        return group
    if vocab_start is not None:
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start must be an int >= 0 (the first vocabulary id of this rank's shard) or None, "
                             f"got {vocab_start!r}")
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (the ranks that split the vocabulary) or "
                        f"None, got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialized; call torch.distributed.init_process_group "
                           "first (or pass group=None for the whole vocabulary on one rank)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group passed")
    lo, hi = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
    mine = torch.tensor([V_local, ids.numel(), _NO_START if vocab_start is None else vocab_start, lo, hi,
                         int(_ids_checksum(ids))], dtype=torch.int64)
    dev = ids.device
    rows = [torch.empty(6, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(rows, mine.to(dev), group=group)
    table = torch.stack(rows).cpu().tolist()
    sizes, ns, starts = [r[0] for r in table], [r[1] for r in table], [r[2] for r in table]
    if len(set(ns)) != 1:
        raise ValueError(f"{ids_name}: every rank of the group must pass the same tokens (the vocabulary is split, "
                         f"not the tokens), got N = {ns} by rank")
    given = [s != _NO_START for s in starts]
    if any(given) and not all(given):
        raise ValueError(f"vocab_start: given on ranks {[r for r in range(world) if given[r]]} only; pass it on every "
                         "rank of the group or on none (then shard r starts at the sum of the sizes of shards 0..r-1)")
    if not all(given):
        starts = [sum(sizes[:r]) for r in range(world)]
    order = sorted(range(world), key=lambda r: starts[r])
    end = 0
    for r in order:
        if starts[r] != end:
            spans = [f"[{starts[q]}, {starts[q] + sizes[q]})" for q in range(world)]
            raise ValueError(f"vocab_start: the ranks' shards must tile [0, V) without gaps or overlaps, got {spans} "
                             "by rank")
        end += sizes[r]
    total = end
    lo_all, hi_all = min(r[3] for r in table), max(r[4] for r in table)
    if lo_all < 0 or hi_all >= total:
        bad = lo_all if lo_all < 0 else hi_all
        raise ValueError(f"{ids_name} must lie in [0, V) = [0, {total}) (V summed over the group's {world} shards), "
                         f"got a value {bad}")
    if len({r[5] for r in table}) != 1:
        raise ValueError(f"{ids_name}: the ranks of the group passed different ids; every rank must pass the same "
                         "tokens (only the vocabulary is split)")
    return ShardLayout(group=group, rank=rank, world=world, start=starts[rank], size=V_local, total=total,
                       max_size=max(sizes))


class _ReduceGradient(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the group: each rank's shard
    of the LM head contributes its part of ∂loss/∂hidden."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def reduce_gradient(x: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    return _ReduceGradient.apply(x, layout.group) if x.requires_grad else x


class Kernels:
    """A backend's log-prob kernels (backends/__init__.py interface) on this rank's shard, giving the
    outputs of the whole vocabulary (module docstring). ``ids`` are global ids in [0, layout.total)."""

    autograd = False  # as a Backend record: differentiated by the log-prob Functions, not by torch autograd

    def __init__(self, local, layout: ShardLayout):
        self.local, self.layout = local, layout

    def empty_grad(self, logits: torch.Tensor) -> torch.Tensor:
        return self.local.empty_grad(logits)  # the shard's gradient: the local backend's allocator

    def _local_ids(self, ids: torch.Tensor):
        loc = ids - self.layout.start
        own = (loc >= 0) & (loc < self.layout.size)
        return loc.clamp_(0, self.layout.size - 1).contiguous(), own

    def logprobs_forward(self, logits, ids, temperature, return_entropy: bool, mask=None):
        loc, own = self._local_ids(ids)
        # mask (B, T) float32 or None, the same on every rank: the shard kernels do not read a masked row
        lp, ent, lse = self.local.logprobs_forward(logits, loc, temperature, return_entropy, mask=mask)
        shift, log_d = lse[..., 0], lse[..., 1]
        ninf = torch.full_like(shift, float("-inf"))
        # a shard whose logits are all −inf (the kernels report shift = −inf or log_d = −inf) holds no mass
        empty = (shift == float("-inf")) | (log_d == float("-inf"))
        g_max = torch.where(empty, ninf, shift)
        dist.all_reduce(g_max, op=dist.ReduceOp.MAX, group=self.layout.group)
        g_max = torch.where(g_max == float("-inf"), torch.zeros_like(g_max), g_max)  # no mass anywhere: as the kernels
        log_a = torch.where(empty, ninf, (shift - g_max) + log_d)
        a = torch.exp(log_a)
        zero = torch.zeros_like(a)
        parts = [a, torch.where(own, lp, zero), torch.where(own, log_a, zero)]
        if return_entropy:
            parts.append(torch.where(a > 0, a * (ent - log_a), zero))
        sums = torch.stack(parts)
        dist.all_reduce(sums, group=self.layout.group)
        log_D = torch.log(sums[0])
        logp = sums[1] + (sums[2] - log_D)
        entropy = sums[3] / sums[0] + log_D if return_entropy else None
        if mask is not None:  # a masked row's shard outputs are 0 (finite): its combined outputs are set to 0
            keep = mask != 0
            logp = torch.where(keep, logp, torch.zeros_like(logp))
            entropy = torch.where(keep, entropy, torch.zeros_like(entropy)) if return_entropy else None
        return logp, entropy, torch.stack((g_max, log_D), -1).contiguous()

    def logprobs_backward(self, logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad):
        loc, own = self._local_ids(ids)
        # the clamped column's logit, read before the kernel (grad may be the logits' own storage)
        z_y = logits.gather(-1, loc.unsqueeze(-1)).squeeze(-1).float()
        self.local.logprobs_backward(logits, loc, temperature, lse, entropy, g_logp, g_entropy, grad)
        fix = ~own
        inv_tau = 1.0 / temperature.double() if isinstance(temperature, torch.Tensor) else 1.0 / float(temperature)
        inv_tau = inv_tau.float() if isinstance(inv_tau, torch.Tensor) else inv_tau
        log_p = (z_y * inv_tau - lse[..., 0]) - lse[..., 1]
        p = torch.exp(log_p)
        zero = torch.zeros_like(p)
        v = zero
        live = torch.zeros_like(own)
        if g_logp is not None:
            v = v - g_logp * p
            live |= g_logp != 0
        if g_entropy is not None:
            v = v - g_entropy * torch.where(p > 0, p * (log_p + entropy), zero)
            live |= g_entropy != 0
        # a token with no upstream gradient keeps the kernel's zero row (its logits may be NaN: 0·NaN)
        v = torch.where(live, v * inv_tau, zero)
        idx = loc.unsqueeze(-1)
        cur = grad.gather(-1, idx)
        grad.scatter_(-1, idx, torch.where(fix.unsqueeze(-1), v.to(grad.dtype).unsqueeze(-1), cur))


def _local_ids_checked(ids, lead: tuple, device, name: str) -> torch.Tensor:
    """ids of shape ``lead``: shape, dtype and device checked here; the range once V is known."""
    from .logprobs import _check_ids_nd

    return _check_ids_nd(ids, lead, 1 << 62, device, name=name)


def ids_and_layout(group, vocab_start, ids, lead: tuple, V_local: int, device, name: str = "ids"):
    """(ids (B, T) int64, ShardLayout) for the primitives: checked against the whole vocabulary."""
    if isinstance(group, ShardLayout):
        from .logprobs import _check_ids_nd

        return _check_ids_nd(ids, lead, group.total, device, name=name), group
    ids3 = _local_ids_checked(ids, lead, device, name)
    return ids3, shard_layout(group, vocab_start, V_local, ids3, name)


# --------------------------------------------------------------------------------------------
# The GRPO losses over a split vocabulary: the loss in torch on the primitive's per-token vectors
# --------------------------------------------------------------------------------------------

def _split_temperature(opts):
    """(temperature for the primitive, options with the loss's own temperature): a tensor τ goes to
    the primitive and the options keep 1.0 (the kernels' τ is the primitive's)."""
    if isinstance(opts.temperature, torch.Tensor) and opts.temperature.dim() > 0:
        return opts.temperature, dataclasses.replace(opts, temperature=1.0)
    return None, opts


class _SplitLoss:
    """The loss on this rank's shard as a fused-loss backend for ``api._FusedGRPOLoss``: the log-prob
    forward kernel with its all-reduces, the policy loss in torch on the (B, T) log-probs (autograd on
    those small tensors gives ∂loss/∂logp and ∂loss/∂H), then the log-prob backward kernel writes the
    shard's gradient, in forward as the fused kernels do: into the logits themselves with inplace=True
    (no (B, T, V_r) buffer), else into the backend's buffer. ``tau``: the kernels' temperature (a float
    or (B, T) float32)."""

    autograd = False

    def __init__(self, kernels: "Kernels", tau):
        self.kernels, self.tau = kernels, tau

    def empty_grad(self, logits):
        return self.kernels.empty_grad(logits)

    def fused_loss(self, inp, grad):
        from . import packed as _pk
        from .logprobs import upstream_gradient

        keep = (inp.mask != 0).to(torch.float32).contiguous()  # a masked row's shard is read by no kernel
        logp, entropy, lse = self.kernels.logprobs_forward(inp.logits, inp.ids, self.tau, True, mask=keep)
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(grad is not None)
            loss, stats = _pk.loss_from_logp(lp, entropy, inp, None)
            g_lp = torch.autograd.grad(loss, lp, allow_unused=True)[0] if grad is not None else None
        if grad is not None:
            # the entropy bonus −Σ w_H·H: ∂loss/∂H = −w_H (as fused_linear's pre-pass forms it)
            g_ent = None if inp.entropy_weight is None else -inp.entropy_weight
            self.kernels.logprobs_backward(inp.logits, inp.ids, self.tau, lse, entropy,
                                           upstream_gradient(g_lp, inp.ids.shape, keep),
                                           upstream_gradient(g_ent, inp.ids.shape, keep), grad)
        return stats.detach(), logp


def grpo_loss(logits, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask,
              importance_sampling_ratio, num_items_in_batch, cu_seqlens, backend, opts, group, vocab_start,
              inplace=False, loss_scale=1.0):
    """grpo_loss with the vocabulary split over ``group`` (logits (B, T, V_r) on each rank). Kernel
    backends: the gradient is computed in forward (``_SplitLoss``), into the logits with ``inplace``;
    backend="torch": autograd through the log-prob primitive."""
    from . import _autograd as _ag
    from . import backends as _backends
    from . import packed as _pk
    from .api import _FusedGRPOLoss, _self_overlapping, metrics_from_sums
    from .fused_linear import _standin_logits
    from .logprobs import _check_temperature, logprobs
    from .validation import check_logits, validate_loss_args

    if cu_seqlens is not None:
        raise ValueError("cu_seqlens: packed rows are not supported with a vocabulary split (group); pass the padded "
                         "(B, T, V_r) logits")
    logits, group = unwrap(logits, group, "logits", -1)
    z = check_logits(logits)
    B, T, V_local = z.shape
    ids, layout = ids_and_layout(group, vocab_start, completion_ids, (B, T), V_local, z.device, "completion_ids")
    tau, opts = _split_temperature(opts)
    inp = validate_loss_args(_standin_logits(B, T, layout.total, z.dtype, z.device), ids, advantages,
                             rewards=rewards, old_logp=old_logp, ref_logp=ref_logp, completion_mask=completion_mask,
                             importance_sampling_ratio=importance_sampling_ratio,
                             num_items_in_batch=num_items_in_batch, options=opts)
    # valid rows only: a masked row's shard is not read (the mask is the same on every rank, as every argument)
    impl = _backends.resolve(backend, z.device)
    if impl.autograd:
        logp, entropy = logprobs(logits, inp.ids, temperature=inp.cfg.temperature if tau is None else tau,
                                 return_entropy=True, mask=inp.mask, backend=backend, group=layout)
        loss, stats = _pk.loss_from_logp(logp, entropy, inp, None)
        return loss, metrics_from_sums(stats.detach(), inp)
    tau_k = inp.cfg.temperature if tau is None else _check_temperature(tau, (B, T), z.device)
    if z.stride(-1) != 1:
        z = z.contiguous()
    inp = dataclasses.replace(inp, logits=z)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    inplace = inplace and need_grad and not _self_overlapping(z)
    _ag.fold_scale(inp, loss_scale)
    loss, stats = _FusedGRPOLoss.apply(logits, inp, _SplitLoss(Kernels(impl, layout), tau_k), inplace, need_grad,
                                       loss_scale)
    return loss, metrics_from_sums(stats, inp)


def fused_linear_grpo_loss(hidden, weight, bias, completion_ids, advantages, rewards, old_logp, ref_logp,
                           completion_mask, importance_sampling_ratio, num_items_in_batch, logit_scale, logit_softcap,
                           chunk_size, backend, opts, group, vocab_start):
    """fused_linear_grpo_loss through ``fused_linear_logprobs`` (on the valid tokens: a masked one costs no
    GEMM) and the loss in torch on its (B, T) log-probs: with the vocabulary split over ``group`` (weight
    (V_r, H) on each rank), and for a temperature tensor (group None)."""
    from . import packed as _pk
    from .api import metrics_from_sums
    from .fused_linear import _check_linear, _compute_dtype, _standin_logits
    from .logprobs import fused_linear_logprobs
    from .validation import validate_loss_args

    weight, group = unwrap(weight, group, "weight", 0)
    bias, group = unwrap(bias, group, "bias", 0)
    cdtype, autocast = _compute_dtype(hidden)
    B, T, _, V_local = _check_linear(hidden, weight, bias, mixed_ok=autocast)
    if group is not None:
        ids, layout = ids_and_layout(group, vocab_start, completion_ids, (B, T), V_local, hidden.device,
                                     "completion_ids")
        V = layout.total
    else:
        ids, layout, V = completion_ids, None, V_local
    tau, opts = _split_temperature(opts)
    inp = validate_loss_args(_standin_logits(B, T, V, cdtype, hidden.device), ids, advantages, rewards=rewards,
                             old_logp=old_logp, ref_logp=ref_logp, completion_mask=completion_mask,
                             importance_sampling_ratio=importance_sampling_ratio,
                             num_items_in_batch=num_items_in_batch, options=opts)
    logp, entropy = fused_linear_logprobs(hidden, weight, inp.ids, bias=bias,
                                          temperature=inp.cfg.temperature if tau is None else tau,
                                          logit_scale=logit_scale, logit_softcap=logit_softcap, return_entropy=True,
                                          mask=inp.mask, chunk_size=chunk_size, backend=backend, group=layout)
    loss, stats = _pk.loss_from_logp(logp, entropy, inp, None)
    return loss, metrics_from_sums(stats.detach(), inp)
