"""torch.library custom ops, so that a training step calling grpo_loss, fused_linear_grpo_loss, logprobs or
fused_linear_logprobs compiles with fullgraph=True (docs/spec.md, "Autograd and torch.compile").

Eager calls go through api._FusedGRPOLoss (the gradient buffer is reused in place, no copy when
grad_output == 1). Under torch.compile the kernels are opaque custom ops with fake (meta)
implementations and a registered autograd formula; the compiled backward scales the precomputed
gradient out of place (one extra pass over it, which the compiler may fuse with what follows).

Value checks that read tensor data (ids in [0, V), finite rewards) cannot be traced, nor can those
of a number that changes between calls (dynamo makes it symbolic), so under compile they run inside
``grpo_fast::check_values`` — still before any kernel, at run time.

Packed rows, temperature tensors, the vocabulary split and the fused-linear loss run eager's own code
inside one op each (``grpo_loss_eager``, ``fused_linear_grpo_loss_eager``: the gradient computed with the
loss); the log-prob primitives are a forward and a backward op each, with the formula between them.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._autograd import check_first_order
from ._config import LOSS_TYPES, NUM_STATS, KernelConfig
from .api import _SECOND_ORDER  # the fused losses' second-order errors (imported lazily: api loads first)
from .fused_linear import _SECOND_ORDER as _SECOND_ORDER_LINEAR
from .options import GRPOOptions

_FIELDS = dataclasses.fields(KernelConfig)
# The integer codes pick code paths (a change recompiles anyway); the float options may change every
# call (num_items_in_batch with gradient accumulation, a beta or temperature schedule).
_CODE_FIELDS = [f.name for f in _FIELDS if f.type in ("int", "bool", int, bool)]
_NUMBER_FIELDS = [f.name for f in _FIELDS if f.name not in _CODE_FIELDS]
_LOSS_TYPE_NAMES = {code: name for name, code in LOSS_TYPES.items()}


def pack_config(cfg: KernelConfig) -> Tuple[List[int], Tensor]:
    """KernelConfig as custom-op arguments (custom ops take no dataclasses): the codes as ints, the
    float options as a float64 CPU tensor. A float that changes between compiled calls is symbolic;
    as an element of a float list it would be specialized (one recompile per value, then dynamo's
    recompile limit); inside a tensor it is data. ``ones·x`` rather than ``torch.tensor(x)``: dynamo
    keeps a symbolic x a graph input in the former only."""
    one = torch.ones((), dtype=torch.float64)
    return [int(getattr(cfg, n)) for n in _CODE_FIELDS], torch.stack([one * getattr(cfg, n) for n in _NUMBER_FIELDS])


def unpack_config(codes: List[int], numbers: Tensor) -> KernelConfig:
    kw = dict(zip(_NUMBER_FIELDS, numbers.tolist()))
    for f, v in zip(_CODE_FIELDS, codes):
        kw[f] = bool(v) if KernelConfig.__dataclass_fields__[f].type in ("bool", bool) else int(v)
    return KernelConfig(**kw)


@torch.library.custom_op("grpo_fast::check_values", mutates_args=())
def check_values(ids: Tensor, vocab: int, mask: Tensor, rewards: Optional[Tensor], advantages: Optional[Tensor],
                 codes: List[int], numbers: Tensor, num_items: Optional[Tensor], entropy_coef: Tensor) -> Tensor:
    """Raises ValueError on out-of-range ids, non-finite rewards/advantages, mask values other than
    0/1, or a bad value of a
    numeric option (``codes, numbers``: pack_config's; ``num_items``: num_items_in_batch as a 0-d
    tensor, or None; ``entropy_coef`` as a 0-d float64 tensor); returns the mask."""
    from .validation import _finite_number, _float32_value, check_number_values, check_token_values

    coef = float(entropy_coef)
    _finite_number("entropy_coef", coef)
    _float32_value("entropy_coef", coef)
    cfg = unpack_config(codes, numbers)
    check_number_values(
        _LOSS_TYPE_NAMES[cfg.loss_type], temperature=cfg.temperature, epsilon_low=cfg.eps_low,
        epsilon_high=cfg.eps_high, delta=cfg.delta if cfg.has_delta else None, beta=cfg.beta, adv_eps=cfg.adv_eps,
        sapo_temperature_pos=cfg.sapo_temp_pos, sapo_temperature_neg=cfg.sapo_temp_neg,
        num_items_in_batch=None if num_items is None else float(num_items.item()))
    check_token_values(ids, vocab, rewards, advantages, mask=mask)
    return mask.clone()


@check_values.register_fake
def _(ids, vocab, mask, rewards, advantages, codes, numbers, num_items, entropy_coef):
    return torch.empty_like(mask)


@torch.library.custom_op("grpo_fast::fused_loss", mutates_args=())
def fused_loss(
    logits: Tensor, ids: Tensor, mask: Tensor, weight: Tensor, advantages: Optional[Tensor],
    rewards: Optional[Tensor], old_logp: Optional[Tensor], ref_logp: Optional[Tensor], isr: Optional[Tensor],
    entropy_weight: Optional[Tensor], codes: List[int], numbers: Tensor, backend: str, need_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """(stats (NUM_STATS,) float32 sums, grad (B, T, V) in the logits' dtype, or (0,) without grad).
    ``entropy_weight``: the entropy bonus's per-token weights (LossInputs.entropy_weight), or None."""
    from . import backends
    from .validation import LossInputs

    impl = backends.resolve(backend, logits.device)
    inp = LossInputs(logits=logits, ids=ids, mask=mask, advantages=advantages, rewards=rewards, old_logp=old_logp,
                     ref_logp=ref_logp, isr=isr, weight=weight, cfg=unpack_config(codes, numbers), loss_type="", kl_estimator="",
                     level="", scale_rewards="", epsilon_high=0.0, delta=None, max_completion_length=0,
                     num_items_in_batch=None, entropy_weight=entropy_weight)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_grad else None
    stats, _ = impl.fused_loss(inp, grad)
    return stats, grad if grad is not None else logits.new_empty(0)


@fused_loss.register_fake
def _(logits, ids, mask, weight, advantages, rewards, old_logp, ref_logp, isr, entropy_weight, codes, numbers, backend,
      need_grad):
    stats = logits.new_empty(NUM_STATS, dtype=torch.float32)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else logits.new_empty(0)
    return stats, grad


def register_precomputed_gradients(op, n_inputs: int, n_grads: int, message: str) -> None:
    """The autograd formula of an op returning (values whose [0] is the loss, then the gradients of its
    first ``n_grads`` inputs for grad_output 1, each (0,) when not computed): backward scales them by
    grad_output. ``message``: the error of a second-order backward."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[1:1 + n_grads])

    def backward(ctx, grad_values, *_):
        # No second order (the saved gradients have no graph): a create_graph backward raises instead of
        # silently dropping the Hessian term (torch.compile refuses double backward anyway).
        check_first_order(message)
        # Out of place from the saved gradients: a retained graph (retain_graph=True) can run this again.
        grads = tuple((g * grad_values[0]).to(g.dtype) if g.numel() else None for g in ctx.saved_tensors)
        return grads + (None,) * (n_inputs - n_grads)

    op.register_autograd(backward, setup_context=setup_context)


register_precomputed_gradients(fused_loss, 14, 1, _SECOND_ORDER)


# --------------------------------------------------------------------------------------------
# Packed rows (cu_seqlens), temperature tensors and the vocabulary split (group) under torch.compile
#
# These paths shape small tensors by data (the (S, T_max) layout of cu_seqlens, the shard offsets
# all-gathered over the group), which a graph cannot trace. Each runs as an opaque custom op around
# eager's own code (every check included, at run time, before any kernel); a process group crosses
# the op boundary by its name and is resolved inside, as torch's functional collectives do.
# --------------------------------------------------------------------------------------------

_OPTION_FIELDS = dataclasses.fields(GRPOOptions)


def _kind(field) -> str:
    t = str(field.type)
    return "s" if "str" in t else "b" if "bool" in t else "i" if "int" in t else "f"


_SEP = "\x1f"  # between the fields' codes (custom ops take no list of strings)


def _loss_names(opts: GRPOOptions) -> List[str]:
    """While tracing: the string options checked as eager checks them (they shape the graph: the metric
    names), and the metric names of the values an eager op returns."""
    from ._config import KL_ESTIMATORS, LEVELS, SCALE_REWARDS, metric_names
    from .validation import _choice

    for name, choices in (("loss_type", LOSS_TYPES), ("kl_estimator", KL_ESTIMATORS),
                          ("importance_sampling_level", LEVELS), ("scale_rewards", SCALE_REWARDS)):
        _choice(name, getattr(opts, name), choices)
    return metric_names(opts.loss_type, opts.beta)


def pack_options(opts: GRPOOptions) -> Tuple[str, Tensor]:
    """GRPOOptions as custom-op arguments: one code per field, joined by _SEP ("s<value>" for a string,
    "n" for None, "b" / "i" / "f" for a number, whose value is the next element of the float64 CPU
    tensor: data, so that a number changing between compiled calls does not recompile per value).
    A temperature tensor is passed on its own: its field is packed as 1.0."""
    fmt, nums = [], []
    one = torch.ones((), dtype=torch.float64)
    for f in _OPTION_FIELDS:
        v = getattr(opts, f.name)
        if isinstance(v, Tensor) and v.dim() > 0:
            v = 1.0
        if v is None:
            fmt.append("n")
        elif _kind(f) == "s":
            fmt.append("s" + v)
        else:
            fmt.append(_kind(f))
            nums.append(v.detach().to("cpu", torch.float64).reshape(()) if isinstance(v, Tensor) else one * v)
    return _SEP.join(fmt), (torch.stack(nums) if nums else one.new_empty(0))


def unpack_options(fmt: str, numbers: Tensor, temperature: Optional[Tensor]) -> GRPOOptions:
    values = iter(numbers.tolist())
    kw = {}
    for f, code in zip(_OPTION_FIELDS, fmt.split(_SEP)):
        if code == "n":
            kw[f.name] = None
        elif code[0] == "s":
            kw[f.name] = code[1:]
        else:
            x = next(values)
            kw[f.name] = bool(x) if code == "b" else int(x) if code == "i" else x
    if temperature is not None:
        kw["temperature"] = temperature
    return GRPOOptions(**kw)


def group_name(group) -> Optional[str]:
    """A process group as a custom-op argument: its registered name (None: no group)."""
    import torch.distributed as dist

    if group is None:
        return None
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (the ranks that split the vocabulary) or "
                        f"None, got {type(group).__name__}")
    return group.group_name


_AUTOGRAD_KEYS = [getattr(torch._C.DispatchKey, k) for k in ("AutogradOther", "AutogradNestedTensor", "AutogradCPU",
                                                                "AutogradCUDA", "ADInplaceOrView")
                  if hasattr(torch._C.DispatchKey, k)]


@contextlib.contextmanager
def autograd_inside_op():
    """Autograd back on inside a custom op's implementation (the dispatcher runs it below the autograd
    keys, grad mode off): eager's own autograd Functions then record and differentiate as in eager."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for k in _AUTOGRAD_KEYS:
        exclude = exclude.remove(k)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def resolve_group(name: Optional[str]):
    if name is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


@torch.library.custom_op("grpo_fast::grpo_loss_eager", mutates_args=())
def grpo_loss_eager(
    logits: Tensor, completion_ids: Tensor, advantages: Optional[Tensor], rewards: Optional[Tensor],
    old_logp: Optional[Tensor], ref_logp: Optional[Tensor], completion_mask: Optional[Tensor],
    importance_sampling_ratio: Optional[Tensor], num_items_in_batch: Optional[Tensor], cu_seqlens: Optional[Tensor],
    temperature: Optional[Tensor], fmt: str, numbers: Tensor, backend: str, group: Optional[str],
    vocab_start: Optional[int], n_values: int, need_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """Eager ``grpo_loss`` (packed rows, a temperature tensor, a vocabulary split) as one op: (values
    = [loss, metrics in metric_names order] float32, the logits' gradient for grad_output 1 (computed
    here, as the fused kernels compute theirs in the forward pass), or (0,) without grad)."""
    from ._config import metric_names
    from .api import grpo_loss

    opts = unpack_options(fmt, numbers, temperature)
    x = logits.detach().requires_grad_(need_grad)
    with autograd_inside_op():
        loss, metrics = grpo_loss(x, completion_ids, advantages, rewards=rewards, old_logp=old_logp, ref_logp=ref_logp,
                                  completion_mask=completion_mask, importance_sampling_ratio=importance_sampling_ratio,
                                  num_items_in_batch=num_items_in_batch, cu_seqlens=cu_seqlens, backend=backend,
                                  group=resolve_group(group), vocab_start=vocab_start, **opts.as_kwargs())
        grad = torch.autograd.grad(loss, x)[0].contiguous() if need_grad else logits.new_empty(0)
    names = metric_names(opts.loss_type, opts.beta)
    assert len(names) + 1 == n_values, (names, n_values)
    values = torch.stack([loss.detach().float()] + [metrics[n].float() for n in names])
    return values, grad


@grpo_loss_eager.register_fake
def _(logits, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask, importance_sampling_ratio,
      num_items_in_batch, cu_seqlens, temperature, fmt, numbers, backend, group, vocab_start, n_values, need_grad):
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else logits.new_empty(0)
    return logits.new_empty(n_values, dtype=torch.float32), grad


register_precomputed_gradients(grpo_loss_eager, 18, 1, _SECOND_ORDER)


def compiled_grpo_loss(logits, completion_ids, advantages, tensors, opts: GRPOOptions, cu_seqlens, backend: str,
                       group, vocab_start):
    """grpo_loss under torch.compile with cu_seqlens, a temperature tensor or a group: grpo_loss_eager."""
    names = _loss_names(opts)
    fmt, numbers = pack_options(opts)
    per_call, tau = _loss_tensor_args(tensors, opts)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    values, _ = grpo_loss_eager(logits, completion_ids, advantages, *per_call, cu_seqlens, tau, fmt, numbers, backend,
                                group_name(group), vocab_start, len(names) + 1, need_grad)
    # clones: no output may alias another where an input is a tensor subclass (a DTensor)
    return values[0], {n: values[i + 1].detach().clone() for i, n in enumerate(names)}


# ---- grpo_fast.logprobs: forward and backward kernels as two ops, the formula between them

def _fresh(out: Tensor, given: Optional[Tensor]) -> Tensor:
    """``out``, or a copy when it shares memory with the op's input ``given`` (op outputs may not alias)."""
    if given is not None and out.untyped_storage().data_ptr() == given.untyped_storage().data_ptr():
        return out.clone()
    return out


_LAYOUT_FIELDS = ("rank", "world", "start", "size", "total", "max_size")


@torch.library.custom_op("grpo_fast::logprobs_forward", mutates_args=())
def logprobs_forward(
    logits: Tensor, ids: Tensor, temperature: Optional[Tensor], tau_number: Tensor, cu_seqlens: Optional[Tensor],
    mask: Optional[Tensor], backend: str, return_entropy: bool, group: Optional[str], vocab_start: Optional[int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """logprobs' checks and forward kernel: (logp (B, T), entropy (B, T) or (0,), lse (B, T, 2), the
    checked ids (B, T) int64, τ ((B, T) float32, or the float as a 0-d float64 tensor), the shard
    layout (6,) int64 or (0,), the checked mask (B, T) float32 0/1 or (0,) without one), (B, T) being
    (1, N) for (N, V) logits. ``temperature``: a tensor τ, else ``tau_number`` holds the float."""
    from .logprobs import _check_mask, _prepare

    tau_in = temperature if temperature is not None else float(tau_number)
    z, ids3, tau, impl, lead = _prepare(logits, ids, tau_in, cu_seqlens, backend, resolve_group(group), vocab_start)
    keep = _check_mask(mask, lead, z.device)  # before any kernel, as eager
    logp, entropy, lse = impl.logprobs_forward(z, ids3, tau, return_entropy, mask=keep)
    if isinstance(tau, Tensor):
        tau_out = _fresh(tau, temperature)
    else:
        tau_out = torch.tensor(tau, dtype=torch.float64)
    layout = logits.new_empty(0, dtype=torch.int64)
    if group is not None:
        layout = torch.tensor([getattr(impl.layout, f) for f in _LAYOUT_FIELDS], dtype=torch.int64)
    return (logp.view(ids3.shape), entropy.view(ids3.shape) if return_entropy else logp.new_empty(0), lse,
            _fresh(ids3, ids), tau_out, layout, keep if keep is not None else logp.new_empty(0))


def _bt(logits: Tensor) -> Tuple[int, int]:
    return (1, logits.shape[0]) if logits.dim() == 2 else (logits.shape[0], logits.shape[1])


@logprobs_forward.register_fake
def _(logits, ids, temperature, tau_number, cu_seqlens, mask, backend, return_entropy, group, vocab_start):
    B, T = _bt(logits)
    f32 = dict(dtype=torch.float32, device=logits.device)
    tau = torch.empty((B, T), **f32) if temperature is not None else torch.empty((), dtype=torch.float64)
    layout = torch.empty(len(_LAYOUT_FIELDS) if group is not None else 0, dtype=torch.int64)
    return (torch.empty((B, T), **f32), torch.empty((B, T) if return_entropy else (0,), **f32),
            torch.empty((B, T, 2), **f32), torch.empty((B, T), dtype=torch.int64, device=logits.device), tau, layout,
            torch.empty((B, T) if mask is not None else (0,), **f32))


@torch.library.custom_op("grpo_fast::logprobs_backward", mutates_args=())
def logprobs_backward(
    logits: Tensor, ids: Tensor, tau: Tensor, lse: Tensor, entropy: Optional[Tensor], g_logp: Optional[Tensor],
    g_entropy: Optional[Tensor], backend: str, group: Optional[str], layout: Tensor, keep: Tensor,
) -> Tensor:
    """The logits' gradient (their shape and dtype) from the upstream gradients of logp and entropy:
    the backend's backward kernel on what logprobs_forward returned. ``keep``: its checked mask, or
    (0,): a masked row gets zero upstream gradients, so the kernel writes it as zeros unread."""
    from . import backends
    from .logprobs import upstream_gradient
    from .vocab_parallel import Kernels, ShardLayout

    z = logits.unsqueeze(0) if logits.dim() == 2 else logits
    if z.stride(-1) != 1:
        z = z.contiguous()
    impl = backends.resolve(backend, z.device)
    if group is not None:
        impl = Kernels(impl, ShardLayout(group=resolve_group(group), **dict(zip(_LAYOUT_FIELDS, layout.tolist()))))
    tau_k = float(tau) if tau.dim() == 0 else tau

    def small(g):
        return upstream_gradient(g, ids.shape, keep if keep.numel() else None)

    grad = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    impl.logprobs_backward(z, ids, tau_k, lse, entropy, small(g_logp), small(g_entropy), grad)
    return grad.view(logits.shape)


@logprobs_backward.register_fake
def _(logits, ids, tau, lse, entropy, g_logp, g_entropy, backend, group, layout, keep):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _logprobs_setup_context(ctx, inputs, output):
    logits, _ids, _temperature, _tau_number, _cu, _mask, backend, return_entropy, group, _vs = inputs
    _logp, entropy, lse, ids3, tau, layout, keep = output
    ctx.backend, ctx.group, ctx.return_entropy = backend, group, return_entropy
    ctx.save_for_backward(logits, ids3, tau, lse, entropy, layout, keep)


def _logprobs_backward_formula(ctx, g_logp, g_entropy, *_):
    if torch.is_grad_enabled():
        raise RuntimeError('grpo_fast.logprobs: the kernel backends are differentiable once; create_graph=True '
                           '(higher-order gradients) needs backend="torch" outside torch.compile')
    logits, ids3, tau, lse, entropy, layout, keep = ctx.saved_tensors
    grad = logprobs_backward(logits, ids3, tau, lse, entropy if ctx.return_entropy else None, g_logp,
                             g_entropy if ctx.return_entropy else None, ctx.backend, ctx.group, layout, keep)
    return (grad,) + (None,) * 9


logprobs_forward.register_autograd(_logprobs_backward_formula, setup_context=_logprobs_setup_context)


def compiled_logprobs(logits, ids, temperature, return_entropy: bool, cu_seqlens, backend: str, group, vocab_start,
                      mask=None):
    """grpo_fast.logprobs under torch.compile: logprobs_forward / logprobs_backward. The checks that
    shape the outputs (the logits' rank) run while tracing; all others inside the forward op."""
    from .logprobs import _check_logits_nd
    from .packed import packed_rows
    from .vocab_parallel import unwrap

    logits, group = unwrap(logits, group, "logits", -1)  # a Shard(-1) DTensor: its shard and its mesh's group
    if cu_seqlens is not None:
        logits = packed_rows(logits, "logits", "V")
    _check_logits_nd(logits)
    lead = tuple(logits.shape[:-1])
    tau_t = temperature if isinstance(temperature, Tensor) and temperature.dim() > 0 else None
    one = torch.ones((), dtype=torch.float64)
    tau_n = one if tau_t is not None else (temperature.detach().to("cpu", torch.float64).reshape(())
                                            if isinstance(temperature, Tensor) else one * temperature)
    logp, entropy, *_ = logprobs_forward(logits, ids, tau_t, tau_n, cu_seqlens, mask, backend, return_entropy,
                                         group_name(group), vocab_start)
    return logp.view(lead), (entropy.view(lead) if return_entropy else None)


# ---- fused_linear_grpo_loss: eager's code in one op, its three gradients computed inside

def transform_args(logit_scale, logit_softcap) -> Tuple[Tensor, bool]:
    """logit_scale and logit_softcap as op arguments: [scale, cap] as data in a float64 CPU tensor (a value
    changing between compiled calls is one recompile, not one per value), and whether there is a softcap.
    Their types are checked here, their values inside the op (eager's checks)."""
    from .validation import _number

    scale = _number("logit_scale", logit_scale, check_value=False)
    cap = _number("logit_softcap", logit_softcap, allow_none=True, check_value=False)
    one = torch.ones((), dtype=torch.float64)
    return torch.stack([one * scale, one * (1.0 if cap is None else cap)]), cap is not None


def transform_values(transform: Tensor, has_softcap: bool):
    scale, cap = transform.tolist()
    return scale, (cap if has_softcap else None)


@torch.library.custom_op("grpo_fast::fused_linear_grpo_loss_eager", mutates_args=())
def fused_linear_grpo_loss_eager(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], completion_ids: Tensor, advantages: Optional[Tensor],
    rewards: Optional[Tensor], old_logp: Optional[Tensor], ref_logp: Optional[Tensor],
    completion_mask: Optional[Tensor], importance_sampling_ratio: Optional[Tensor],
    num_items_in_batch: Optional[Tensor], cu_seqlens: Optional[Tensor], temperature: Optional[Tensor], fmt: str,
    numbers: Tensor, transform: Tensor, has_softcap: bool, chunk_size: Optional[int], backend: str,
    group: Optional[str], vocab_start: Optional[int], n_values: int, needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eager ``fused_linear_grpo_loss`` as one op: (values as in grpo_loss_eager, ∂hidden, ∂weight, ∂bias
    for grad_output 1, each (0,) when ``needs`` (hidden, weight, bias) says it is not wanted)."""
    from ._config import metric_names
    from .fused_linear import fused_linear_grpo_loss

    opts = unpack_options(fmt, numbers, temperature)
    logit_scale, logit_softcap = transform_values(transform, has_softcap)
    leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip((hidden, weight, bias), needs)]
    with autograd_inside_op():
        loss, metrics = fused_linear_grpo_loss(
            leaves[0], leaves[1], completion_ids, advantages, bias=leaves[2], rewards=rewards, old_logp=old_logp,
            ref_logp=ref_logp, completion_mask=completion_mask, importance_sampling_ratio=importance_sampling_ratio,
            num_items_in_batch=num_items_in_batch, cu_seqlens=cu_seqlens, logit_scale=logit_scale,
            logit_softcap=logit_softcap, chunk_size=chunk_size, backend=backend, group=resolve_group(group),
            vocab_start=vocab_start, **opts.as_kwargs())
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(loss, wanted) if wanted else ())
    grads = [next(got).contiguous() if t is not None and t.requires_grad else hidden.new_empty(0) for t in leaves]
    names = metric_names(opts.loss_type, opts.beta)
    assert len(names) + 1 == n_values, (names, n_values)
    values = torch.stack([loss.detach().float()] + [metrics[n].float() for n in names])
    return (values, *grads)


@fused_linear_grpo_loss_eager.register_fake
def _(hidden, weight, bias, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask,
      importance_sampling_ratio, num_items_in_batch, cu_seqlens, temperature, fmt, numbers, transform, has_softcap,
      chunk_size, backend, group, vocab_start, n_values, needs):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None and n else hidden.new_empty(0)
             for t, n in zip((hidden, weight, bias), needs)]
    return (hidden.new_empty(n_values, dtype=torch.float32), *grads)


register_precomputed_gradients(fused_linear_grpo_loss_eager, 23, 3, _SECOND_ORDER_LINEAR)


def _loss_tensor_args(tensors, opts: GRPOOptions):
    """The per-call tensors as op arguments: num_items_in_batch as a 0-d tensor, the τ tensor apart."""
    n_items = tensors.num_items_in_batch
    if n_items is not None and not isinstance(n_items, Tensor):
        n_items = torch.ones((), dtype=torch.float64) * n_items
    tau = opts.temperature if isinstance(opts.temperature, Tensor) and opts.temperature.dim() > 0 else None
    return (tensors.rewards, tensors.old_logp, tensors.ref_logp, tensors.completion_mask,
            tensors.importance_sampling_ratio, n_items), tau


def compiled_fused_linear_grpo_loss(hidden, weight, bias, completion_ids, advantages, tensors, opts: GRPOOptions,
                                    logit_scale, logit_softcap, chunk_size, cu_seqlens, backend: str, group,
                                    vocab_start):
    """fused_linear_grpo_loss under torch.compile: fused_linear_grpo_loss_eager."""
    from .vocab_parallel import unwrap

    # a Shard(0) DTensor head: its rows and its mesh's group (the gradient returns as a DTensor through to_local)
    weight, group = unwrap(weight, group, "weight", 0)
    bias, group = unwrap(bias, group, "bias", 0)
    names = _loss_names(opts)
    fmt, numbers = pack_options(opts)
    per_call, tau = _loss_tensor_args(tensors, opts)
    g = torch.is_grad_enabled()
    needs = [g and isinstance(t, Tensor) and t.requires_grad for t in (hidden, weight, bias)]
    values, *_ = fused_linear_grpo_loss_eager(
        hidden, weight, bias, completion_ids, advantages, *per_call, cu_seqlens, tau, fmt, numbers,
        *transform_args(logit_scale, logit_softcap), chunk_size, backend, group_name(group), vocab_start,
        len(names) + 1, needs)
    # clones: no output may alias another where an input is a tensor subclass (a DTensor)
    return values[0], {n: values[i + 1].detach().clone() for i, n in enumerate(names)}


# ---- grpo_fast.fused_linear_logprobs: the chunk loop's forward and backward as two ops

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("grpo_fast::fused_linear_logprobs_forward", mutates_args=())
def fused_linear_logprobs_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, temperature: Optional[Tensor],
    tau_number: Tensor, transform: Tensor, has_softcap: bool, return_entropy: bool,
    chunk_size: Optional[int], cu_seqlens: Optional[Tensor], mask: Optional[Tensor], backend: str,
    group: Optional[str], vocab_start: Optional[int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fused_linear_logprobs' checks and forward chunk loop: (logp (N,), entropy (N,) or (0,), lse (N, 2),
    the checked ids (N,) int64, the kernels' τ ((N,) float32, or the float as a 0-d float64 tensor), the
    shard layout (6,) int64 or (0,), [chunk, compute dtype index] int64, the checked mask (N,) float32 0/1
    or (0,)). With a mask only the valid tokens' rows are walked (as eager); the others' outputs are 0."""
    from .logprobs import _check_mask, _linear_forward, _linear_plan, valid_plan

    tau_in = temperature if temperature is not None else float(tau_number)
    plan, rows, layout = _linear_plan(hidden, weight, ids, bias, tau_in, *transform_values(transform, has_softcap),
                                      return_entropy, chunk_size, cu_seqlens, backend, resolve_group(group),
                                      vocab_start)
    keep = _check_mask(mask, plan.out_shape, hidden.device)
    sub, idx = valid_plan(plan, keep) if keep is not None else (plan, None)
    if idx is None:
        logp, entropy, lse = _linear_forward(plan, rows, weight, bias)
    else:  # the valid rows gathered, their outputs scattered into zeros
        lp_v, ent_v, lse_v = _linear_forward(sub, rows.reshape(-1, rows.shape[-1])[idx], weight, bias)
        N = plan.ids.shape[0]
        logp = lp_v.new_zeros(N).index_copy_(0, idx, lp_v)
        lse = lse_v.new_zeros((N, 2)).index_copy_(0, idx, lse_v)
        entropy = None if ent_v is None else ent_v.new_zeros(N).index_copy_(0, idx, ent_v)
    tau_k = plan.tau_k if isinstance(plan.tau_k, Tensor) else torch.tensor(plan.tau_k, dtype=torch.float64)
    lay = (torch.tensor([getattr(layout, f) for f in _LAYOUT_FIELDS], dtype=torch.int64) if layout is not None
           else torch.empty(0, dtype=torch.int64))
    return (logp, entropy if entropy is not None else logp.new_empty(0), lse, _fresh(plan.ids, ids),
            _fresh(tau_k, temperature), lay, torch.tensor([plan.chunk, _DTYPES.index(plan.dtype)]),
            keep.reshape(-1) if keep is not None else logp.new_empty(0))


@fused_linear_logprobs_forward.register_fake
def _(hidden, weight, bias, ids, temperature, tau_number, transform, has_softcap, return_entropy, chunk_size,
      cu_seqlens, mask, backend, group, vocab_start):
    n = hidden.numel() // hidden.shape[-1]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    tau = torch.empty(n, **f32) if temperature is not None else torch.empty((), dtype=torch.float64)
    lay = torch.empty(len(_LAYOUT_FIELDS) if group is not None else 0, dtype=torch.int64)
    return (torch.empty(n, **f32), torch.empty(n if return_entropy else 0, **f32), torch.empty((n, 2), **f32),
            torch.empty(n, dtype=torch.int64, device=hidden.device), tau, lay, torch.empty(2, dtype=torch.int64),
            torch.empty(n if mask is not None else 0, **f32))


@torch.library.custom_op("grpo_fast::fused_linear_logprobs_backward", mutates_args=())
def fused_linear_logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], lse: Tensor, entropy: Optional[Tensor],
    g_logp: Optional[Tensor], g_entropy: Optional[Tensor], ids: Tensor, tau_k: Tensor, layout: Tensor,
    plan_ints: Tensor, transform: Tensor, has_softcap: bool, backend: str, group: Optional[str], needs: List[bool],
    keep: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(∂hidden, ∂weight, ∂bias), each (0,) when not wanted: the chunk loop's backward on what
    fused_linear_logprobs_forward returned; ∂hidden all-reduced over the group. ``keep``: the checked
    mask (N,) or (0,): then only the valid tokens' rows are walked, and a masked token's ∂hidden row is 0."""
    import torch.distributed as dist

    from . import backends
    from .fused_linear import _Transform
    from .logprobs import _LinearPlan, _linear_backward, valid_plan
    from .vocab_parallel import Kernels, ShardLayout

    rows = hidden.reshape(-1, hidden.shape[-1])
    impl = backends.resolve(backend, hidden.device)
    pg = resolve_group(group)
    if pg is not None:
        impl = Kernels(impl, ShardLayout(group=pg, **dict(zip(_LAYOUT_FIELDS, layout.tolist()))))
    chunk, dtype = plan_ints.tolist()
    plan = _LinearPlan(impl=impl, transform=_Transform(*transform_values(transform, has_softcap)), chunk=chunk,
                       dtype=_DTYPES[dtype], ids=ids, tau_k=float(tau_k) if tau_k.dim() == 0 else tau_k,
                       return_entropy=entropy is not None, out_shape=tuple(ids.shape))
    needs = (needs[0], needs[1], bias is not None and needs[2])
    sub, idx = valid_plan(plan, keep) if keep.numel() else (plan, None)
    if idx is None:
        dh, dw, db = _linear_backward(plan, rows, weight, bias, lse, entropy, g_logp, g_entropy, needs)
    else:  # the valid tokens only, as the forward walked them; a masked token's upstream gradients are dropped

        def pick(t):  # (N,) per-token values of the valid tokens
            return None if t is None else t.reshape(-1)[idx]

        dh, dw, db = _linear_backward(sub, rows[idx], weight, bias, lse[idx], pick(entropy), pick(g_logp),
                                      pick(g_entropy), needs)
        if dh is not None:
            dh = dh.new_zeros(rows.shape).index_copy_(0, idx, dh.reshape(-1, rows.shape[-1]))
    if dh is not None and pg is not None:
        dist.all_reduce(dh, group=pg)
    out = []
    for g, t, n in zip((dh, dw, db), (hidden, weight, bias), needs):
        if not n:
            out.append(hidden.new_empty(0))
        else:  # None: no token carries an upstream gradient
            out.append(torch.zeros_like(t, memory_format=torch.contiguous_format) if g is None else g.reshape(t.shape))
    return tuple(out)


@fused_linear_logprobs_backward.register_fake
def _(hidden, weight, bias, lse, entropy, g_logp, g_entropy, ids, tau_k, layout, plan_ints, transform, has_softcap,
      backend, group, needs, keep):
    # which gradients come back depends on the upstream gradients' values (none for a token without
    # one): the fake has the shapes of the wanted ones, and the real op zero-fills the others
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None and n
                 else hidden.new_empty(0) for t, n in zip((hidden, weight, bias), needs))


def _linear_lp_setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    transform, has_softcap, return_entropy = inputs[6:9]
    backend, group = inputs[12], inputs[13]
    _logp, entropy, lse, ids, tau_k, layout, plan_ints, keep = output
    ctx.consts = (has_softcap, return_entropy, backend, group, bias is not None)
    ctx.save_for_backward(hidden, weight, bias if bias is not None else hidden.new_empty(0), lse, entropy, ids, tau_k,
                          layout, plan_ints, transform, keep)


def _linear_lp_backward(ctx, g_logp, g_entropy, *_):
    if torch.is_grad_enabled():
        raise RuntimeError("grpo_fast.fused_linear_logprobs: the kernel backends are differentiable once; "
                           "create_graph=True (higher-order gradients) is not supported")
    hidden, weight, bias, lse, entropy, ids, tau_k, layout, plan_ints, transform, keep = ctx.saved_tensors
    has_softcap, return_entropy, backend, group, has_bias = ctx.consts
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), has_bias and bool(ctx.needs_input_grad[2])]
    grads = fused_linear_logprobs_backward(
        hidden, weight, bias if has_bias else None, lse, entropy if return_entropy else None, g_logp,
        g_entropy if return_entropy else None, ids, tau_k, layout, plan_ints, transform, has_softcap, backend,
        group, needs, keep)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * 12


fused_linear_logprobs_forward.register_autograd(_linear_lp_backward, setup_context=_linear_lp_setup_context)


def compiled_fused_linear_logprobs(hidden, weight, ids, bias, temperature, logit_scale, logit_softcap,
                                   return_entropy: bool, chunk_size, cu_seqlens, backend: str, group, vocab_start,
                                   mask=None):
    """fused_linear_logprobs under torch.compile: the two ops above."""
    from .packed import packed_rows
    from .vocab_parallel import unwrap

    weight, group = unwrap(weight, group, "weight", 0)  # as compiled_fused_linear_grpo_loss
    bias, group = unwrap(bias, group, "bias", 0)
    if cu_seqlens is not None:
        hidden = packed_rows(hidden, "hidden", "H")
    if not isinstance(hidden, Tensor) or hidden.dim() not in (2, 3):
        from .validation import _fmt_shape

        raise ValueError(f"hidden must have shape (N, H) or (B, T, H), got {_fmt_shape(hidden)}")
    lead = tuple(hidden.shape[:-1])
    tau_t = temperature if isinstance(temperature, Tensor) and temperature.dim() > 0 else None
    one = torch.ones((), dtype=torch.float64)
    tau_n = one if tau_t is not None else (temperature.detach().to("cpu", torch.float64).reshape(())
                                            if isinstance(temperature, Tensor) else one * temperature)
    logp, entropy, *_ = fused_linear_logprobs_forward(hidden, weight, bias, ids, tau_t, tau_n,
                                                      *transform_args(logit_scale, logit_softcap), return_entropy,
                                                      chunk_size, cu_seqlens, mask, backend, group_name(group),
                                                      vocab_start)
    return logp.view(lead), (entropy.view(lead) if return_entropy else None)
