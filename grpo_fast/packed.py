"""Packed rows: (N, V) logits with ``cu_seqlens`` instead of (B, T, V) logits with a padding mask.

A packed batch holds S sequences back to back: sequence s is the rows ``[cu_seqlens[s],
cu_seqlens[s+1])`` of the (N, V) logits. Per-sequence tensors (rewards, advantages (S,), the IS
ratio (S,)) have one value per sequence; per-token tensors (old_logp, ref_logp, completion_mask,
advantages or the IS ratio per token) are (N,).

How it runs (docs/spec.md, "Packed rows"):

* Everything small is laid out once in the padded form it stands for: (S, T_max) tensors, T_max the
  longest sequence, built by one scatter of the (N,) vectors (O(N), never O(N·V)). The padded
  layout's own checks (``validate_loss_args`` on a stand-in (S, T_max, V) tensor of V elements) then
  run unchanged, and so do the aggregation weights, the group advantages and every option check:
  the packed loss is the padded loss by construction, and the two cannot drift apart.
* Token level, kernel backends: the batch is one (1, N) row with per-token advantages and per-token
  aggregation weights, which the fused kernels already take: one read of the logits, the gradient
  written in the forward pass, no kernel change. (The rewards' group advantages are then computed
  once in torch on the (S,) rewards instead of inside the kernel; S floats.)
* Sequence level (and backend="torch"): the kernels would need each sequence's ratio before its
  tokens' gradients, and their segments are rows of a (B, T) layout. Rather than teach every kernel
  segments, the loss runs through the differentiable log-prob primitive (``grpo_fast.logprobs``:
  one read of the logits forward, one read and one gradient write backward) and the policy loss in
  torch on the (N,) log-probs (``reference.per_token_loss``'s math on the (S, T_max) layout). Cost:
  one more read of the logits than the fused token-level pass (the padded fused sequence-level
  kernels read a row twice too) and 8 bytes a token kept between forward and backward; never more
  than the gradient is materialized.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ._config import STAT_ENTROPY
from .validation import LossInputs, _fmt_shape, check_strided

CU_DTYPES = (torch.int32, torch.int64)


@dataclass
class Layout:
    """Where each of the N packed tokens sits in the (S, T_max) padded layout."""

    cu: torch.Tensor  # (S + 1,) int64
    S: int
    T: int  # T_max, the longest sequence
    N: int
    row: torch.Tensor  # (N,) int64: its sequence
    col: torch.Tensor  # (N,) int64: its position in the sequence

    def pad(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """(N,) -> (S, T_max), ``fill`` at the padding."""
        out = torch.full((self.S, self.T), fill, dtype=x.dtype, device=x.device)
        out[self.row, self.col] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(S, T_max) -> (1, N) contiguous, the packed tokens in order."""
        return x[self.row, self.col].reshape(1, self.N).contiguous()


def check_cu_seqlens(cu_seqlens, N: int, device: torch.device) -> Layout:
    """cu_seqlens: int32/int64 (S + 1,), S >= 1, starting at 0, strictly increasing, ending at N."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32 or int64, got {type(cu_seqlens).__name__}")
    check_strided("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in CU_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (S + 1,) with S >= 1 sequences, got {_fmt_shape(cu_seqlens)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the logits' device {device}, got {cu_seqlens.device}")
    cu = cu_seqlens.detach().to(torch.int64)
    first, last = int(cu[0]), int(cu[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths <= 0).any()):
        s = int(torch.nonzero(lengths <= 0)[0, 0])
        raise ValueError(f"cu_seqlens must be strictly increasing (every sequence at least one token), got "
                         f"cu_seqlens[{s}] = {int(cu[s])} and cu_seqlens[{s + 1}] = {int(cu[s + 1])}")
    if last != N:
        raise ValueError(f"cu_seqlens must end at the number of packed tokens N = {N}, got cu_seqlens[-1] = {last}")
    S = cu.shape[0] - 1
    row = torch.repeat_interleave(torch.arange(S, device=device), lengths)
    col = torch.arange(N, device=device) - cu[:-1][row]
    return Layout(cu=cu, S=S, T=int(lengths.max()), N=N, row=row, col=col)


def packed_rows(x, name: str, what: str = "logits"):
    """(N, K) or (1, N, K) -> the (N, K) view; anything else a ValueError naming the argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, K) with cu_seqlens, got {type(x).__name__}")
    if x.dim() == 3:
        if x.shape[0] != 1:
            raise ValueError(f"{name} must have shape (N, {what[0]}) or (1, N, {what[0]}) with cu_seqlens (packed rows), "
                             f"got {_fmt_shape(x)}; pass a (B, T, {what[0]}) batch with completion_mask instead of cu_seqlens")
        return x[0]
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, {what[0]}) or (1, N, {what[0]}) with cu_seqlens, got {x.dim()} dims "
                         f"{_fmt_shape(x)}")
    return x


def _per_token(name: str, t, lay: Layout, *, per_seq_ok: bool = False):
    """A per-token (N,) (or (1, N)) tensor, or with ``per_seq_ok`` a per-sequence (S,) one: returned
    in the padded layout's shape ((S, T_max) or (S,)), as given (validate_loss_args converts)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    shape = tuple(t.shape)
    if per_seq_ok and shape == (lay.S,):
        return t
    if shape == (1, lay.N):
        t = t[0]
    elif shape != (lay.N,):
        want = f"({lay.N},)" + (f" per token or ({lay.S},) per sequence" if per_seq_ok else "")
        raise ValueError(f"{name} must have shape {want} with cu_seqlens (N = {lay.N} packed tokens, S = {lay.S} "
                         f"sequences), got {_fmt_shape(t)}")
    if t.device != lay.row.device:
        raise ValueError(f"{name} must be on the logits' device {lay.row.device}, got {t.device}")
    return lay.pad(t)


def _per_seq(name: str, t, lay: Layout):
    if t is not None and isinstance(t, torch.Tensor) and tuple(t.shape) != (lay.S,):
        raise ValueError(f"{name} must have shape ({lay.S},), one value per sequence of cu_seqlens, got {_fmt_shape(t)}")
    return t


def padded_args(lay: Layout, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask,
                importance_sampling_ratio):
    """The packed tensors in the (S, T_max) layout they stand for, for validate_loss_args."""
    ids = completion_ids
    if isinstance(ids, torch.Tensor):
        if tuple(ids.shape) == (1, lay.N):
            ids = ids[0]
        if tuple(ids.shape) != (lay.N,):
            raise ValueError(f"completion_ids must have shape ({lay.N},) to match the packed logits, got {_fmt_shape(ids)}")
        if ids.dtype in CU_DTYPES:  # other dtypes: validate_loss_args names them
            ids = lay.pad(ids)
    mask = lay.pad(torch.ones(lay.N, dtype=torch.float32, device=lay.row.device))
    if completion_mask is not None:
        mask = _per_token("completion_mask", completion_mask, lay)  # the padding is 0 (the scatter's fill)
    return dict(
        completion_ids=ids,
        advantages=_per_token("advantages", advantages, lay, per_seq_ok=True),
        rewards=_per_seq("rewards", rewards, lay),
        old_logp=_per_token("old_logp", old_logp, lay),
        ref_logp=_per_token("ref_logp", ref_logp, lay),
        completion_mask=mask,
        importance_sampling_ratio=_per_token("importance_sampling_ratio", importance_sampling_ratio, lay, per_seq_ok=True),
    )


def flat_inputs(inp: LossInputs, lay: Layout, logits3: torch.Tensor) -> LossInputs:
    """The padded LossInputs as ONE (1, N) row of the packed (1, N, V) logits, for the token-level
    kernels: per-token advantages (the group advantages computed here from the rewards), per-token
    weights and IS ratio. Valid at token level only (a sequence-level kernel would see one row)."""
    from .reference import group_advantages_reference

    A = inp.advantages
    if A is None:
        A = group_advantages_reference(inp.rewards, inp.cfg.group_size, inp.scale_rewards, inp.cfg.adv_eps).float()
    if A.dim() == 1:
        A = A.unsqueeze(1).expand(lay.S, lay.T)
    isr = inp.isr
    if isr is not None and isr.dim() == 1:
        isr = isr.unsqueeze(1).expand(lay.S, lay.T)

    def flat(x):
        return None if x is None else lay.unpad(x)

    return replace(inp, logits=logits3, ids=flat(inp.ids), mask=flat(inp.mask), weight=flat(inp.weight),
                   entropy_weight=flat(inp.entropy_weight),
                   advantages=flat(A), rewards=None, old_logp=flat(inp.old_logp), ref_logp=flat(inp.ref_logp),
                   isr=flat(isr), cfg=replace(inp.cfg, group_size=0))


def loss_from_logp(logp: torch.Tensor, entropy: torch.Tensor, inp: LossInputs, lay: Optional[Layout]):
    """(loss, stats) from the packed (N,) log-probs (differentiable) and entropies: the policy loss
    in torch on the (S, T_max) layout (fused_linear._loss_from_logp: reference.per_token_loss and
    flag_counts, the aggregation weights). Padding positions get log-prob 0, weight 0 and mask 0.
    ``lay=None``: a padded (B, T) batch (logp and entropy already (B, T))."""
    from .fused_linear import _loss_from_logp
    from .reference import group_advantages_reference

    A = inp.advantages
    if A is None:
        A = group_advantages_reference(inp.rewards, inp.cfg.group_size, inp.scale_rewards, inp.cfg.adv_eps).float()
    valid = inp.mask != 0
    # where, not a product: a masked token's log-prob (NaN if its logits hold one) is replaced by 0,
    # its upstream gradient is exactly 0, and the primitive's backward writes its row as zeros
    # without reading it.
    pad = (lambda x: x.reshape(inp.mask.shape)) if lay is None else lay.pad  # noqa: E731  (None: already (B, T))
    lp = pad(logp.reshape(-1).float())
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    ent = pad(entropy.reshape(-1).float())  # differentiable: the entropy bonus (entropy_coef) reads it
    loss, stats = _loss_from_logp(lp, inp.mask, inp.weight, A, inp.old_logp, inp.ref_logp, inp.isr, inp,
                                  ent, inp.entropy_weight)
    stats[STAT_ENTROPY] = torch.where(valid, ent.detach(), torch.zeros_like(ent)).sum()
    return loss, stats


def valid_logprobs(fn, rows: torch.Tensor, inp: LossInputs, lay: Layout, eager: bool, **kw):
    """(logp, entropy) (N,) of the packed rows through the primitive ``fn`` (logprobs or
    fused_linear_logprobs). ``eager`` (backend="torch", autograd through the eager softmax, where
    0·NaN would carry a masked row's NaN into its gradient): only the valid rows are evaluated and
    the others get 0; the kernel backends take the mask (a masked row is not read, and on the
    fused-linear path not multiplied)."""
    ids = lay.unpad(inp.ids)[0]
    if not eager:
        return fn(rows, ids, return_entropy=True, mask=lay.unpad(inp.mask)[0], **kw)
    idx = torch.nonzero(lay.unpad(inp.mask)[0] != 0, as_tuple=True)[0]
    lp_v, ent_v = fn(rows[idx], ids[idx], return_entropy=True, **kw)
    zeros = torch.zeros(lay.N, dtype=lp_v.dtype, device=lp_v.device)
    return zeros.index_put((idx,), lp_v), zeros.index_put((idx,), ent_v)

