"""The public functions: validation, backend dispatch and autograd.

The kernel backends compute the gradient in the forward pass (every aggregation weight depends only
on the mask, so ∂loss/∂logits is known as soon as a row's logits have been read). The autograd
Function keeps that gradient and, in backward, only scales it by grad_output — no second pass over
the logits unless grad_output != 1.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import _autograd as _ag
from . import backends as _backends
from . import vocab_parallel as _vp
from ._config import LOSS_TABLE, METRIC_STAT_INDEX, SCALE_REWARDS, STAT_LOSS, metric_names
from .options import Execution, GRPOOptions, LossTensors, with_options
from .reference import grpo_loss_reference, group_advantages_reference, logprobs_reference, row_level_flags
from .validation import (
    LossInputs,
    _choice,
    _float_tensor,
    check_adv_eps,
    check_backend,
    check_group_size,
    check_ids,
    check_logits,
    check_temperature,
    validate_loss_args,
)

__all__ = ["grpo_loss", "GRPOLoss", "group_advantages", "token_logprobs"]


class _FusedGRPOLoss(torch.autograd.Function):
    """logits -> (loss, stats) through a kernel backend; the gradient is produced in forward."""

    @staticmethod
    def forward(ctx, logits, inp: LossInputs, backend: _backends.Backend, inplace: bool, need_grad: bool,
                loss_scale: float = 1.0):
        grad = None
        if need_grad:
            # inplace: the kernel overwrites each row with its gradient after reading it; else the
            # backend's buffer (the CPU backend's is huge-page backed)
            grad = inp.logits if inplace else backend.empty_grad(inp.logits)
        stats, _ = backend.fused_loss(inp, grad)
        if inplace and inp.logits is logits:
            # The kernel wrote through a raw pointer, which autograd cannot see. Tell it, so that any
            # backward that saved these logits (exp, sigmoid, a z-loss built on them) raises PyTorch's
            # "modified by an inplace operation" error instead of silently reading the gradient.
            torch.autograd.graph.increment_version(logits)
        # Kept as an attribute, not save_for_backward: with inplace=True the buffer is the (already
        # overwritten) input, which the version-counter check would otherwise reject or copy.
        ctx.grad = grad
        ctx.handed_out = False  # True once a backward has handed the buffer to autograd
        # The buffer's version from now on: with inplace=True it is the logits' storage, and a write
        # to the logits before a backward would silently change the gradient.
        ctx.version = None if grad is None else grad._version
        # inp.weight carries loss_scale (_ag.fold_scale): the gradient is that of loss_scale·loss
        ctx.loss_scale = loss_scale
        loss = _ag.unscaled_loss(stats[STAT_LOSS], loss_scale)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        # The contract (retain_graph, create_graph) is _autograd.py's: the buffer is handed out on the
        # last backward only; a backward that keeps the graph gets a copy.
        _ag.check_first_order(_SECOND_ORDER)
        grad = ctx.grad
        if grad is None:
            if ctx.handed_out:
                raise _ag.twice_error("grpo_loss", "call grpo_loss again for each backward")
            return None, None, None, None, None, None
        if grad._version != ctx.version:
            # inplace=True: the buffer is the logits' storage, and something wrote to the logits
            raise RuntimeError(
                "grpo_loss: the logits of a loss computed with inplace=True hold its gradient, but they were "
                "modified after the forward pass; do not write to (or reuse) such logits before the last "
                "backward, or pass inplace=False")
        keep = bool(_ag.graph_kept())  # unknown (old torch): as not kept; a later backward then raises
        if not keep:
            ctx.grad = None  # release the (B, T, V) buffer as soon as autograd takes it
            ctx.handed_out = True
        factor = _ag.grad_factor(grad_loss, ctx.loss_scale)
        return _ag.scaled(grad, factor, keep), None, None, None, None, None


_SECOND_ORDER = _ag.second_order_message(
    "grpo_loss", 'use backend="torch" (the eager reference, plain autograd) for a loss that needs them')


def metrics_from_sums(stats: torch.Tensor, inp: LossInputs) -> dict:
    """Turn a backend's stats (sums, see _config.STAT_*) into the metric means of docs/spec.md."""
    n_tok = inp.mask.sum().clamp(min=1.0)
    # Clip flags counted once per row are averaged over the B rows (TRL's masked_batch_mean does the same).
    row_flags = row_level_flags(inp.level, inp.advantages)
    n_flag = float(inp.mask.shape[0]) if row_flags else n_tok
    out = {}
    for name in metric_names(inp.loss_type, inp.cfg.beta):
        denom = n_tok if name in ("entropy", "kl") else n_flag
        out[name] = (stats[METRIC_STAT_INDEX[name]] / denom).float()
    return out


@with_options
def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: Optional[torch.Tensor] = None,
    **kwargs,  # the execution keywords (options.Execution), the per-call tensors (options.LossTensors), the options
):
    """The GRPO loss from completion logits in one fused pass (docs/spec.md).

    Args:
        logits: (B, T, V) float32 | bfloat16 | float16 — the completion positions' logits, already
            shifted so that ``logits[b, t]`` scores ``completion_ids[b, t]``. Any B/T strides.
        completion_ids: (B, T) int64 | int32, each in [0, V).
        advantages: (B,) or (B, T); or pass ``rewards`` (B,) with ``group_size`` instead and the
            group-relative advantage is computed inside the kernel.
        old_logp, ref_logp: (B, T) log-probs of the sampling and the reference policy (float32).
            ``old_logp=None`` is on-policy (ratio 1, gradient still flows).
        completion_mask: (B, T) 1 for real tokens, 0 for padding (bool/int/float); None = all ones.
        importance_sampling_ratio: (B,) or (B, T), the rollout engine's correction (TRL's vLLM
            importance sampling); multiplies the policy term.
        num_items_in_batch: the dapo/cispo normalizer: the token count of the whole step (across
            ranks and accumulation steps); None = Σ completion_mask of this call.
        cu_seqlens: packed rows: logits (N, V) (or (1, N, V)) holding S sequences back to back,
            sequence s the rows [cu_seqlens[s], cu_seqlens[s+1]); int32/int64 (S + 1,), from 0,
            strictly increasing, to N. Then rewards, (S,) advantages and an (S,) IS ratio are per
            sequence, completion_ids and the other per-token tensors (N,); the loss, metrics and
            gradient are those of the same batch padded to (S, T_max, V) (dr_grpo's default
            max_completion_length is then the longest sequence). See grpo_fast/packed.py.
        inplace: let the kernel write the gradient into the logits' storage (do not read the
            logits afterwards). Saves a (B, T, V) allocation.
        loss_scale: the factor the caller multiplies the returned loss by before backward (gradient
            accumulation's 1/steps, a world size). The kernels write the gradient of loss_scale·loss in
            the forward pass, so a backward with grad_output == loss_scale moves no data; any other
            grad_output is still exact (one pass rescales). The returned loss is the unscaled one.
        backend: "auto" | "cpu" | "triton" | "cuda" | "torch".
        group, vocab_start: the vocabulary split over a ``torch.distributed`` process group, as in
            ``grpo_fast.logprobs``: logits (B, T, V_r) are this rank's shard (or a DTensor placed
            Shard(-1)), every other argument is the same on every rank. The loss then goes through the
            log-prob kernels with a few all-reduces per token (grpo_fast/vocab_parallel.py), the shard's
            gradient computed in forward (into the logits with ``inplace``); cu_seqlens refused.
        The loss options (below) are TRL's GRPOConfig options of the same name.

    Returns:
        (loss, metrics): a float32 scalar with a gradient for ``logits``, and a dict of detached
        float32 scalars (``entropy``, ``kl`` when beta != 0, ``clip_ratio_low``/``_high``/``clip_ratio``
        for the clip family, ``cispo_clip_ratio`` for cispo).

    Example:
        >>> loss, metrics = grpo_fast.grpo_loss(logits, completion_ids, rewards=rewards, group_size=8,
        ...                                     completion_mask=mask, beta=0.04, ref_logp=ref_logp)
        >>> loss.backward()
    """
    cu_seqlens, inplace, loss_scale, backend, group, vocab_start = Execution.pop(kwargs)
    backend = check_backend(backend)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    compiling = torch.compiler.is_compiling()
    # Under torch.compile the backward multiplies the saved gradient out of place anyway: no fold.
    loss_scale = 1.0 if compiling else _ag.check_loss_scale(loss_scale)
    tensors = LossTensors.pop(kwargs)
    opts = GRPOOptions.from_kwargs("grpo_loss", kwargs)
    tau_tensor = isinstance(opts.temperature, torch.Tensor) and opts.temperature.dim() > 0
    if compiling:  # a Shard(-1) DTensor: its shard and its mesh's group (the gradient returns as a DTensor)
        logits, group = _vp.unwrap(logits, group, "logits", -1)
    if compiling and (group is not None or cu_seqlens is not None or tau_tensor):
        from . import _ops

        # Shapes that depend on data (cu_seqlens' layout, the shard offsets): eager's code in one custom op
        return _ops.compiled_grpo_loss(logits, completion_ids, advantages, tensors, opts, cu_seqlens, backend, group,
                                       vocab_start)
    if group is not None or _vp.is_dtensor(logits):
        return _vp.grpo_loss(logits, completion_ids, advantages, *tensors, cu_seqlens, backend, opts, group, vocab_start,
                             inplace, loss_scale)
    tau = None
    if tau_tensor:  # one τ per row or per token: through the log-prob primitive (see _tau_tensor_loss)
        tau, opts = opts.temperature, dataclasses.replace(opts, temperature=1.0)
    if cu_seqlens is not None or tau is not None:
        return _packed_grpo_loss(logits, completion_ids, advantages, *tensors, cu_seqlens, inplace, backend, opts, tau,
                                 loss_scale)
    inp = validate_loss_args(logits, completion_ids, advantages, **tensors._asdict(), options=opts,
                             check_values=not compiling)
    if compiling:
        return _compiled_path(logits, inp, backend)
    impl = _backends.resolve(backend, logits.device)
    if impl.autograd:
        return _reference_from_inputs(logits, inp)
    # Grad mode decides, not only requires_grad: under no_grad nothing is computed or overwritten.
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    # Logits whose elements share memory (an expanded batch: a stride of 0) cannot hold their own
    # gradient: every row would write the same bytes. They get a fresh buffer instead.
    inplace = inplace and need_grad and not _self_overlapping(inp.logits)
    _ag.fold_scale(inp, loss_scale)
    loss, stats = _FusedGRPOLoss.apply(logits, inp, impl, inplace, need_grad, loss_scale)
    return loss, metrics_from_sums(stats, inp)


def _packed_grpo_loss(logits, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask,
                      importance_sampling_ratio, num_items_in_batch, cu_seqlens, inplace, backend, opts, tau=None,
                      loss_scale=1.0):
    """grpo_loss on packed rows (grpo_fast/packed.py): the padded layout's checks and weights on
    (S, T_max) small tensors; token level through the fused kernels as one (1, N) row, sequence
    level and backend="torch" through the differentiable log-prob primitive. ``tau``: a temperature
    tensor (then ``opts.temperature`` is 1), which always takes the primitive. ``loss_scale`` folds into
    the fused kernels' gradient (the primitive's backward is a pass of its own: nothing to fold)."""
    from . import packed as _pk
    from .fused_linear import _standin_logits
    from .logprobs import _check_temperature
    from .logprobs import logprobs as _logprobs

    if cu_seqlens is None:  # a padded batch with a temperature tensor
        return _tau_tensor_loss(logits, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask,
                                importance_sampling_ratio, num_items_in_batch, backend, opts, tau)
    rows = _pk.packed_rows(logits, "logits", "V")
    check_logits(rows.unsqueeze(0))
    N, V = rows.shape
    lay = _pk.check_cu_seqlens(cu_seqlens, N, rows.device)
    padded = _pk.padded_args(lay, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask,
                             importance_sampling_ratio)
    inp = validate_loss_args(_standin_logits(lay.S, lay.T, V, rows.dtype, rows.device), num_items_in_batch=num_items_in_batch,
                             options=opts, **padded)
    impl = _backends.resolve(backend, rows.device)
    temperature = inp.cfg.temperature
    if tau is not None:  # (S,) per sequence or (N,) per token
        if isinstance(tau, torch.Tensor) and tuple(tau.shape) == (lay.S,) and lay.S != lay.N:
            _check_temperature(tau, (lay.S,), rows.device)
            tau = tau[lay.row]
        temperature = _check_temperature(tau, (N,), rows.device)[0]
    if not impl.autograd and inp.cfg.level == 0 and tau is None:
        logits3 = rows.unsqueeze(0)
        if logits3.stride(-1) != 1:
            logits3 = logits3.contiguous()
        flat = _pk.flat_inputs(inp, lay, logits3)
        need_grad = logits.requires_grad and torch.is_grad_enabled()
        inplace = inplace and need_grad and not _self_overlapping(logits3)
        _ag.fold_scale(flat, loss_scale)
        loss, stats = _FusedGRPOLoss.apply(logits3, flat, impl, inplace, need_grad, loss_scale)
        return loss, metrics_from_sums(stats, flat)
    if isinstance(temperature, torch.Tensor) and impl.autograd:  # valid_logprobs selects rows: τ with them
        idx = torch.nonzero(lay.unpad(inp.mask)[0] != 0, as_tuple=True)[0]
        fn = lambda z, y, **kw: _logprobs(z, y, temperature=temperature[idx], **kw)  # noqa: E731
    else:
        fn = lambda z, y, **kw: _logprobs(z, y, temperature=temperature, **kw)  # noqa: E731
    logp, entropy = _pk.valid_logprobs(fn, rows, inp, lay, impl.autograd, backend=backend)
    loss, stats = _pk.loss_from_logp(logp, entropy, inp, lay)
    return loss, metrics_from_sums(stats.detach(), inp)


def _tau_tensor_loss(logits, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask,
                     importance_sampling_ratio, num_items_in_batch, backend, opts, tau):
    """grpo_loss on a padded (B, T, V) batch with a temperature tensor (B,) or (B, T): the loss in
    torch on the log-probs of grpo_fast.logprobs (which takes per-token τ), like packed sequence
    level. Kernel backends: the primitive with the completion mask (a masked row is not read, forward
    or backward); backend="torch" evaluates only valid rows."""
    from . import packed as _pk
    from .logprobs import _check_temperature
    from .logprobs import logprobs as _logprobs

    inp = validate_loss_args(logits, completion_ids, advantages, rewards=rewards, old_logp=old_logp, ref_logp=ref_logp,
                             completion_mask=completion_mask, importance_sampling_ratio=importance_sampling_ratio,
                             num_items_in_batch=num_items_in_batch, options=opts)
    B, T, _ = inp.logits.shape
    tau = _check_temperature(tau, (B, T), logits.device)  # (B, T) float32, finite and > 0
    if _backends.resolve(backend, logits.device).autograd:
        valid = inp.mask != 0
        lp_v, ent_v = _logprobs(logits[valid], inp.ids[valid], temperature=tau[valid], return_entropy=True,
                                backend="torch")
        zeros = torch.zeros((B, T), dtype=lp_v.dtype, device=logits.device)
        where = torch.nonzero(valid, as_tuple=True)
        logp, entropy = zeros.index_put(where, lp_v), zeros.index_put(where, ent_v)
    else:
        logp, entropy = _logprobs(logits, inp.ids, temperature=tau, return_entropy=True, mask=inp.mask,
                                  backend=backend)
    loss, stats = _pk.loss_from_logp(logp, entropy, inp, None)
    return loss, metrics_from_sums(stats.detach(), inp)


def _self_overlapping(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` are the same memory through a stride of 0 (``x.expand``,
    broadcasting), the way logits come to share memory in practice. (Overlap built by hand with
    as_strided is not detected; such logits should not be passed with inplace=True.)"""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


# Availability does not change within a process: let dynamo evaluate the resolution at trace time
# (it imports modules, which dynamo would refuse to trace) and bake the name into the graph.
_resolve_name_const = torch._dynamo.assume_constant_result(_backends.resolve_name)


def _compiled_path(logits: torch.Tensor, inp: LossInputs, backend: str):
    """Under torch.compile: the value checks and the kernel as custom ops (grpo_fast/_ops.py).

    The numbers may be symbolic (dynamo makes a number that changed between calls a graph input):
    they reach the ops inside a tensor, and their values are checked there, at run time. The checked
    mask feeds everything after it, so the checks cannot be dropped as dead code and always run
    before the kernel. ``inplace`` is a permission, not a promise: it is not used here.
    """
    from . import _ops

    codes, numbers = _ops.pack_config(inp.cfg)
    n_items = inp.num_items_in_batch
    if n_items is not None and not isinstance(n_items, torch.Tensor):
        n_items = torch.ones((), dtype=torch.float64) * n_items
    coef = torch.ones((), dtype=torch.float64) * inp.options.entropy_coef  # ones·c: a symbolic c stays an input
    inp.mask = _ops.check_values(inp.ids, logits.shape[-1], inp.mask, inp.rewards, inp.advantages, codes, numbers, n_items,
                                 coef)
    resolved = _resolve_name_const(backend, logits.device.type)
    if _backends.REGISTRY[resolved].autograd:  # the name is a trace-time constant, and so is this
        return _reference_from_inputs(logits, inp)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    stats, _ = _ops.fused_loss(inp.logits, inp.ids, inp.mask, inp.weight, inp.advantages, inp.rewards, inp.old_logp,
                               inp.ref_logp, inp.isr, inp.entropy_weight, codes, numbers, resolved, need_grad)
    return stats[STAT_LOSS], metrics_from_sums(stats.detach(), inp)


def _reference_from_inputs(logits: torch.Tensor, inp: LossInputs):
    """backend="torch": the eager reference on the validated inputs."""
    n_items = inp.num_items_in_batch
    # Under torch.compile num_items_in_batch may be symbolic or a 0-d tensor, which the reference
    # would make a constant (a recompile per value) or read with .item() (a graph break): the
    # reference then normalizes by this call's token count and the loss is rescaled here.
    rescale = torch.compiler.is_compiling() and n_items is not None and LOSS_TABLE[inp.loss_type].uses_num_items
    options = inp.options
    bonus = rescale and inp.entropy_weight is not None
    if bonus:  # the entropy bonus is a mean over this call's tokens, not num_items_in_batch's: added after the rescale
        options = dataclasses.replace(options, entropy_coef=0.0)
    if torch.compiler.is_compiling():
        # The clip bounds as 0-d tensors, which the reference's clamps and comparisons take as well:
        # a symbolic float there is specialized by aot_eager (a recompile per value) and miscompiled
        # by inductor (torch 2.13: a later value gets a wrong loss; tests/test_compile.py).
        one = torch.ones((), dtype=torch.float64)
        options = dataclasses.replace(options, epsilon_low=one * options.epsilon_low, epsilon_high=one * options.epsilon_high,
                                      delta=None if options.delta is None else one * options.delta)
    loss, metrics = grpo_loss_reference(
        logits, inp.ids, inp.advantages, rewards=inp.rewards, old_logp=inp.old_logp, ref_logp=inp.ref_logp,
        completion_mask=inp.mask, importance_sampling_ratio=inp.isr, num_items_in_batch=None if rescale else n_items,
        **options.as_kwargs(),
    )
    if rescale:
        n = n_items.to(inp.mask.device) if isinstance(n_items, torch.Tensor) else torch.ones((), dtype=torch.float64) * n_items
        loss = loss * (inp.mask.sum(dtype=torch.float64).clamp(min=1.0) / n.clamp(min=1.0)).to(loss.dtype)
    if bonus:  # −Σ w_H·H, H differentiable, a masked row's logits replaced by zeros (as the reference does)
        valid = inp.mask != 0
        z = torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        _, entropy = logprobs_reference(z, inp.ids, options.temperature, return_entropy=True)
        loss = loss - (inp.entropy_weight * torch.where(valid, entropy, torch.zeros_like(entropy))).sum().to(loss.dtype)
    return loss, metrics


class _LossModule(torch.nn.Module):
    """A loss function as a module: options fixed at construction, tensors per call.

    Subclasses name the function (``_fn``), its positional tensor arguments (``_POSITIONAL``) and the
    keyword tensors that belong to each call (``_PER_CALL``). Unknown option names and per-call
    tensors passed as options fail at construction, not at the first step.
    """

    _fn = None
    _POSITIONAL: tuple = ()
    _PER_CALL: tuple = ()

    def __init__(self, **options):
        super().__init__()
        name = type(self).__name__
        bad = sorted(set(options) & set(self._PER_CALL))
        if bad:
            raise ValueError(f"{bad} are per-call tensors: pass them to forward(), not to {name}()")
        import inspect

        known = set(inspect.signature(type(self)._fn).parameters) - set(self._POSITIONAL)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"{name} got unknown options {unknown}; known: {sorted(known - set(self._PER_CALL))}")
        self.options = options

    def forward(self, *tensors, **per_call):
        return type(self)._fn(*tensors, **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class GRPOLoss(_LossModule):
    """``grpo_loss`` as a module: options fixed at construction, tensors per call.

    Example:
        >>> crit = grpo_fast.GRPOLoss(beta=0.04, group_size=8, epsilon_high=0.28)
        >>> loss, metrics = crit(logits, completion_ids, rewards=rewards, ref_logp=ref, completion_mask=mask)
    """

    _fn = grpo_loss
    _POSITIONAL = ("logits", "completion_ids", "advantages")
    _PER_CALL = LossTensors._fields + ("cu_seqlens",)

    def forward(self, logits, completion_ids, advantages=None, **per_call):
        return super().forward(logits, completion_ids, advantages, **per_call)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", adv_eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (B,) float32 from rewards (B,): rows [k·G, (k+1)·G) are prompt k's G completions.

    ``scale_rewards``: "group" (divide by the group's unbiased std + adv_eps; TRL's default),
    "batch" (by the std of all B rewards), "none" (Dr. GRPO). A group of equal rewards gets 0.
    """
    _choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    adv_eps = check_adv_eps(adv_eps)
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor (B,), got {getattr(rewards, 'shape', type(rewards).__name__)}")
    B = rewards.shape[0]
    # The loss's own checks of rewards and group_size.
    r = _float_tensor("rewards", rewards, [(B,)], rewards.device, finite=True)
    G = check_group_size(group_size, B)
    return group_advantages_reference(r, G, scale_rewards, adv_eps)


@torch.no_grad()
def token_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0, *, return_entropy: bool = False, backend: str = "auto",
                   mask: Optional[torch.Tensor] = None):
    """Per-token log-probs (B, T) float32 of ``completion_ids`` under softmax(logits / temperature).

    No gradient: this is for the old-policy and reference log-probs. With ``return_entropy=True``
    also returns the per-token entropy (B, T) float32. ``temperature``: a float, or a (B, T) / (B,)
    tensor (one τ per token / per sequence; computed by ``grpo_fast.logprobs``' kernels). ``mask``:
    None or (B, T) bool / integer / floating, nonzero = valid: a masked token's logits are not read
    and its outputs are 0 (as ``grpo_fast.logprobs``' mask).
    """
    backend = check_backend(backend)
    logits = check_logits(logits)
    if torch.compiler.is_compiling():  # the log-prob primitive's forward op (grpo_fast/_ops.py)
        from . import _ops

        logp, entropy = _ops.compiled_logprobs(logits, completion_ids, temperature, return_entropy, None, backend,
                                               None, None, mask)
        return (logp, entropy) if return_entropy else logp
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        from .logprobs import logprobs

        logp, entropy = logprobs(logits, completion_ids, temperature=temperature, return_entropy=return_entropy,
                                 mask=mask, backend=backend)
        return (logp, entropy) if return_entropy else logp
    from .logprobs import _check_mask

    B, T, V = logits.shape
    ids = check_ids(completion_ids, B, T, V, logits.device)
    temperature = check_temperature(temperature)
    keep = _check_mask(mask, (B, T), logits.device)
    impl = _backends.resolve(backend, logits.device)
    if not impl.autograd and logits.stride(-1) != 1:  # the kernels read rows by raw pointer
        logits = logits.contiguous()
    logp, entropy = impl.token_logprobs(logits, ids, temperature, return_entropy, mask=keep)
    return (logp, entropy) if return_entropy else logp
