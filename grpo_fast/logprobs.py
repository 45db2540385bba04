"""Differentiable per-token log-probs and entropy: the primitive under any policy loss.

    logp, entropy = grpo_fast.logprobs(logits, ids, temperature=0.7, return_entropy=True)
    loss = my_policy_loss(logp, entropy, ...)        # plain torch on (N,) / (B, T) vectors
    loss.backward()                                   # one fused kernel pass over the logits

Forward is the backends' log-prob sweep (one read of the logits: lse, the target's log-prob and the
entropy per token); it keeps the per-token lse in two parts (and the entropy), 12 bytes a token.
Backward is ONE more read of the logits and one write of their gradient, with no reduction:

    ∂L/∂z_j = [g_logp·(1[j = y] − p_j) − g_H·p_j·(log p_j + H)] / τ,
    x = z/τ,   log p_j = (x_j − shift) − log_d,   lse = shift + log_d

with shift = max_j x_j and log_d = log Σ_j exp(x_j − shift). The two parts are never added: x_j − lse
would lose one float32 ulp of |x| to cancellation (~1e-3 at logits near ±1e4, an ordinary distribution
since softmax is shift invariant), and with it ~1e-3 of every p_j and of the gradient.

(∂H/∂x_j = −p_j·(log p_j + H); a banned −inf logit has p_j = 0 and gets 0). Eager PyTorch holds a
float32 copy, the softmax and several (N, V) temporaries for the same two outputs.

``fused_linear_logprobs`` does the same from hidden states and the LM head without ever holding the
(N, V) logits: forward walks the tokens in chunks (one matmul each, lse kept per token); backward
recomputes each chunk's logits (one matmul), applies the formula above through the logit_scale /
softcap chain rule, and accumulates ∂hidden, ∂weight, ∂bias (two matmuls). It reuses the chunking,
transform and gradient-accumulation helpers of ``grpo_fast/fused_linear.py``.

Each kernel backend (grpo_fast/backends/*) provides

    logprobs_forward(logits (B, T, V), ids (B, T) int64, temperature, return_entropy)
        -> (logp, entropy | None, lse): logp and entropy (B, T) float32, lse (B, T, 2) float32
           contiguous, lse[..., 0] = shift and lse[..., 1] = log_d as above (x in the backend's own
           float32 rounding of z/τ; only the same backend's logprobs_backward reads them)
    logprobs_backward(logits, ids, temperature, lse, entropy | None, g_logp | None, g_entropy | None,
                      grad (B, T, V) in the logits' dtype)        # grad may be the logits' storage

with ``temperature`` a float or a (B, T) float32 tensor (one τ per token). backend="torch" (its
``Backend.autograd``) is autograd through ``reference.logprobs_reference`` (twice differentiable);
on the fused-linear chunk loop it runs its eager kernels (grpo_fast/backends/torch_backend.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch.autograd.function import once_differentiable

from . import backends as _backends
from . import vocab_parallel as _vp
from .reference import logprobs_reference
from .validation import LOGIT_DTYPES, _fmt_shape, _host_check, check_backend, check_ids, check_logits, float32_option

__all__ = ["logprobs", "fused_linear_logprobs"]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

def _check_logits_nd(logits) -> torch.Tensor:
    """logits (N, V) or (B, T, V); returned as the (B, T, V) view the kernels take ((N, V) -> (1, N, V))."""
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        if logits.dtype not in LOGIT_DTYPES:
            raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
        N, V = logits.shape
        if V == 0:
            raise ValueError(f"logits must have a vocabulary dimension V > 0, got shape {_fmt_shape(logits)}")
        if N == 0:
            raise ValueError(f"logits must have N > 0 rows, got shape {_fmt_shape(logits)}")
        return logits.unsqueeze(0)
    if isinstance(logits, torch.Tensor) and logits.dim() != 3:
        raise ValueError(f"logits must have shape (N, V) or (B, T, V), got {logits.dim()} dims {_fmt_shape(logits)}")
    return check_logits(logits)


def _check_ids_nd(ids, lead: tuple, V: int, device: torch.device, name: str = "ids") -> torch.Tensor:
    """ids of shape ``lead`` ((N,) or (B, T)), integer, in [0, V): returned as (B, T) int64 contiguous."""
    if isinstance(ids, torch.Tensor) and tuple(ids.shape) != lead:
        raise ValueError(f"{name} must have shape {lead} to match the logits' leading dimensions, got {_fmt_shape(ids)}")
    if isinstance(ids, torch.Tensor) and len(lead) == 1:
        ids = ids.unsqueeze(0)
    B, T = (1, lead[0]) if len(lead) == 1 else lead
    return check_ids(ids, B, T, V, device, name=name)


def _check_temperature(temperature, lead: tuple, device: torch.device, name: str = "temperature"):
    """A float > 0, or a tensor of shape ``lead`` (one τ per token) or (B,) (one per row of (B, T)),
    all finite and > 0: returned as a float or a (B, T) float32 contiguous tensor (B = 1 for (N,))."""
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        rows = (lead[0],) if len(lead) == 2 else None
        shape = tuple(temperature.shape)
        if shape != lead and shape != rows:
            want = f"{lead}" + (f" or {rows}" if rows else "")
            raise ValueError(f"{name} must be a float or a tensor of shape {want}, got {_fmt_shape(temperature)}")
        if not temperature.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {temperature.dtype}")
        if temperature.device != device:
            raise ValueError(f"{name} must be on the logits' device {device}, got {temperature.device}")
        tau = temperature.detach().to(torch.float32)
        message = f"{name} must be finite and > 0 everywhere"
        if _host_check(tau, lambda: (torch.isfinite(tau) & (tau > 0)).all(), message):  # GRPO_FAST_VALUE_CHECKS
            bad = ~(torch.isfinite(tau) & (tau > 0))
            if bool(bad.any()):
                raise ValueError(f"{message}, got {tau[bad].flatten()[0].item()}")
        if shape == rows:
            tau = tau.unsqueeze(1).expand(lead)
        return tau.reshape(1, -1).contiguous() if len(lead) == 1 else tau.contiguous()
    return float32_option(name, temperature, positive=True)  # > 0 and a normal float32, as everywhere


_MASK_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_mask(mask, lead: tuple, device: torch.device) -> Optional[torch.Tensor]:
    """mask of the ids' shape ``lead``, bool / integer / floating (nonzero = a valid token): returned as
    the (B, T) float32 0/1 contiguous tensor the kernels take (B = 1 for (N,)), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of the ids' shape {lead} or None, got {type(mask).__name__}")
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask must have the ids' shape {lead}, got {_fmt_shape(mask)}")
    if not (mask.dtype in _MASK_INT_DTYPES or mask.is_floating_point()):
        raise TypeError(f"mask must be a bool, integer or floating-point tensor, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"mask must be on the logits' device {device}, got {mask.device}")
    keep = (mask.detach() != 0).to(torch.float32)
    return keep.reshape(1, -1).contiguous() if len(lead) == 1 else keep.contiguous()


def _packed_args(x, name: str, what: str, temperature, cu_seqlens):
    """With cu_seqlens: x (N, K) or (1, N, K) as (N, K), cu_seqlens checked against N, and a
    per-sequence (S,) temperature spread over its tokens (N,)."""
    from .packed import check_cu_seqlens, packed_rows

    rows = packed_rows(x, name, what)
    lay = check_cu_seqlens(cu_seqlens, rows.shape[0], rows.device)
    if isinstance(temperature, torch.Tensor) and tuple(temperature.shape) == (lay.S,) and lay.S != lay.N:
        if temperature.device != rows.device:
            raise ValueError(f"temperature must be on the logits' device {rows.device}, got {temperature.device}")
        temperature = temperature[lay.row]
    return rows, temperature


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------
# Autograd on logits
# --------------------------------------------------------------------------------------------

def _kernel_backward(name: str):
    """Decorator making ``fn(ctx, g_logp, g_entropy)`` the backward of an autograd Function over the
    kernels: differentiable once. Autograd runs backward with grad mode on exactly when
    create_graph=True; the kernels' backward is not itself differentiable, so that raises, naming
    ``grpo_fast.<name>``, rather than return a gradient without a graph."""

    def wrap(fn):
        once = once_differentiable(fn)

        def backward(ctx, g_logp, g_entropy=None):
            if torch.is_grad_enabled():
                raise RuntimeError(f"grpo_fast.{name}: the kernel backends are differentiable once; create_graph=True "
                                   f'(higher-order gradients) needs backend="torch"')
            return once(ctx, g_logp, g_entropy)

        return staticmethod(backward)

    return wrap


def upstream_gradient(g, shape, keep):
    """An upstream gradient of logp or entropy as the backward kernels take it: ``shape`` float32
    contiguous, and 0 at a masked row (``keep`` == 0; ``keep`` None: none is masked), so that every
    backend writes that row's gradient as zeros without reading its logits (whatever they hold; an
    upstream NaN there reaches nothing). None stays None (no such term)."""
    if g is None:
        return None
    g = g.reshape(shape).to(torch.float32)
    if keep is not None:
        g = torch.where(keep != 0, g, torch.zeros((), device=g.device))
    return g.contiguous()


class _Logprobs(torch.autograd.Function):
    """logits -> (logp, entropy) through a backend's kernels; backward reads the saved logits once."""

    @staticmethod
    def forward(ctx, logits, z, ids, tau, impl, return_entropy: bool, mask=None):
        # z: the (B, T, V) view (or, for stride(-1) != 1, a contiguous copy) of ``logits`` the kernels read;
        # mask: (B, T) float32 0/1 or None: a masked row is not read (outputs 0)
        logp, entropy, lse = impl.logprobs_forward(z, ids, tau, return_entropy, mask=mask)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: its term is skipped
        ctx.impl, ctx.shape = impl, logits.shape
        ctx.tau = tau if not isinstance(tau, torch.Tensor) else None
        ctx.save_for_backward(z, ids, lse, entropy, tau if isinstance(tau, torch.Tensor) else None, mask)
        out_shape = ids.shape[1:] if logits.dim() == 2 else ids.shape
        logp = logp.view(out_shape)
        if return_entropy:
            return logp, entropy.view(out_shape)
        return logp

    @_kernel_backward("logprobs")
    def backward(ctx, g_logp, g_entropy):
        z, ids, lse, entropy, tau_t, mask = ctx.saved_tensors
        tau = ctx.tau if tau_t is None else tau_t

        def small(g):
            return upstream_gradient(g, ids.shape, mask)

        # the backend's allocator: on CPU huge pages and the reuse of a released gradient's buffer
        # (backends/cpu.py empty_grad); a fresh torch.empty faulted in 4 KiB pages every call
        grad = ctx.impl.empty_grad(z)
        ctx.impl.logprobs_backward(z, ids, tau, lse, entropy, small(g_logp), small(g_entropy), grad)
        return grad.view(ctx.shape), None, None, None, None, None, None


def logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: Union[float, torch.Tensor] = 1.0,
    return_entropy: bool = False,
    mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    group=None,
    vocab_start: Optional[int] = None,
):
    """Per-token log-probs (and entropies) of ``ids`` under softmax(logits / temperature), differentiable.

    The building block for policy losses grpo_fast does not ship: write the loss in plain torch on
    the per-token vectors, and its gradient flows back through one fused kernel pass over the logits
    (no float32 copy, softmax or other (N, V) temporary, unlike eager log_softmax + entropy).

    Args:
        logits: (N, V) or (B, T, V) float32 | bfloat16 | float16; any leading strides.
        ids: (N,) or (B, T) int64 | int32 in [0, V): the tokens whose log-probs are wanted.
        temperature: a float > 0, or a tensor of the ids' shape (one τ per token), or (B,) with
            (B, T, V) logits (one τ per sequence); a constant (no gradient flows to it).
        return_entropy: also return the entropy of each token's distribution, with its gradient
            ∂H/∂z_j = −p_j·(log p_j + H)/τ.
        mask: None, or the ids' shape, bool | integer | floating (nonzero = a valid token): valid rows
            only. A masked token's logits are never read (forward or backward), its logp and entropy
            are 0 and its gradient row is 0, whatever the row holds (NaN, inf) and whatever upstream
            gradient reaches it. With cu_seqlens: (N,) over the packed rows; with group: the same
            mask on every rank.
        cu_seqlens: packed rows (as in ``grpo_loss``): logits (N, V) or (1, N, V) holding S
            sequences; checked, and then ``temperature`` may also be (S,), one τ per sequence.
            Changes nothing per token otherwise.
        backend: "auto" | "cpu" | "triton" | "cuda" | "torch" (autograd through the eager reference;
            the only backend that supports create_graph=True).
        group: a ``torch.distributed`` ProcessGroup over which the vocabulary is split: ``logits`` is
            this rank's shard (..., V_r), ``ids`` are global ids in [0, V) and the same on every rank;
            the outputs are the whole vocabulary's, the same on every rank, and the gradient stays
            this rank's shard (grpo_fast/vocab_parallel.py). A ``DTensor`` placed Shard(-1) on a 1-D
            mesh needs no group. None: the whole vocabulary here.
        vocab_start: with ``group``, this rank's first vocabulary id (pass it on every rank or none);
            None: shard r starts at the sum of the shard sizes of ranks 0..r-1.

    Returns:
        (logp, entropy): float32 tensors of the ids' shape; entropy is None unless return_entropy.
        Both carry gradients to ``logits`` (backward may run several times with retain_graph=True).

    Example:
        >>> logp, ent = grpo_fast.logprobs(logits, ids, temperature=0.7, return_entropy=True, mask=mask)
        >>> ratio = torch.exp((logp - old_logp) * mask)  # 1 on the padding (its logp is 0)
        >>> loss = -(torch.min(ratio * A, ratio.clamp(0.8, 1.2) * A) * mask).sum() / mask.sum() - 1e-3 * ent.mean()
        >>> loss.backward()
    """
    backend = check_backend(backend)
    return_entropy = _check_bool("return_entropy", return_entropy)
    if torch.compiler.is_compiling():  # the kernels as custom ops (grpo_fast/_ops.py)
        from . import _ops

        return _ops.compiled_logprobs(logits, ids, temperature, return_entropy, cu_seqlens, backend, group,
                                      vocab_start, mask)
    logits, group = _vp.unwrap(logits, group, "logits", -1)
    z, ids3, tau, impl, lead = _prepare(logits, ids, temperature, cu_seqlens, backend, group, vocab_start)
    keep = _check_mask(mask, lead, z.device)
    if impl.autograd:
        tau_ref = tau if not isinstance(tau, torch.Tensor) else tau.view(lead)
        zl = z.view(lead + (-1,))
        if keep is not None:  # a masked row is replaced by zeros before the softmax: a NaN there reaches nothing
            k = keep.view(lead) != 0
            zl = torch.where(k.unsqueeze(-1), zl, torch.zeros((), dtype=zl.dtype, device=zl.device))
        logp, entropy = logprobs_reference(zl, ids3.view(lead), tau_ref, return_entropy=return_entropy)
        logp, entropy = logp.float(), (entropy.float() if entropy is not None else None)
        if keep is not None:
            logp = torch.where(k, logp, torch.zeros_like(logp))
            entropy = torch.where(k, entropy, torch.zeros_like(entropy)) if entropy is not None else None
        return logp, entropy
    out = _Logprobs.apply(logits, z, ids3, tau, impl, return_entropy, keep)
    return out if return_entropy else (out, None)


def _prepare(logits, ids, temperature, cu_seqlens, backend: str, group, vocab_start):
    """logprobs' checks (every one, before any kernel) and what its kernels take: (z (B, T, V) with
    stride(-1) == 1, ids (B, T) int64, τ (a float or (B, T) float32), the kernels: a Backend, or the
    shard's vocab_parallel.Kernels with a group, and the ids' shape). ``logits``: a plain tensor (no DTensor)."""
    if cu_seqlens is not None:
        logits, temperature = _packed_args(logits, "logits", "V", temperature, cu_seqlens)
    z = _check_logits_nd(logits)
    lead = tuple(logits.shape[:-1])
    if group is None:
        ids3 = _check_ids_nd(ids, lead, z.shape[-1], z.device)
    else:
        ids3, layout = _vp.ids_and_layout(group, vocab_start, ids, lead, z.shape[-1], z.device)
    tau = _check_temperature(temperature, lead, z.device)
    impl = _backends.resolve(backend, z.device)
    if group is not None:  # the shard's kernels (backend="torch": their eager form) and a few all-reduces
        impl = _vp.Kernels(impl, layout)
    if z.stride(-1) != 1 and not impl.autograd:
        z = z.contiguous()
    return z, ids3, tau, impl, lead


# --------------------------------------------------------------------------------------------
# From hidden states and the LM head
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _LinearPlan:
    impl: _backends.Backend
    transform: object  # fused_linear._Transform
    chunk: int
    dtype: torch.dtype  # of the chunk GEMMs and logits buffers
    ids: torch.Tensor  # (N,) int64
    tau_k: object  # the kernels' temperature: float, or (N,) float32 (τ folded with scale / softcap)
    return_entropy: bool
    out_shape: tuple


def _chunk_tau(tau_k, s: int, e: int):
    return tau_k[s:e].view(1, e - s) if isinstance(tau_k, torch.Tensor) else tau_k


def _linear_forward(plan: _LinearPlan, hidden, weight, bias):
    """The chunk loop's forward: (logp, entropy or None, lse (N, 2)), flat over the N tokens."""
    from .fused_linear import _cast, _matmul_chunk

    N, H = plan.ids.shape[0], hidden.shape[-1]
    V = weight.shape[0]
    hidden2d = hidden.reshape(N, H)
    w, b = _cast(weight, plan.dtype), _cast(bias, plan.dtype)
    buf = torch.empty((min(plan.chunk, N), V), dtype=plan.dtype, device=hidden.device)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty((N, 2), dtype=torch.float32, device=hidden.device)  # (shift, log_d) per token
    entropy = torch.empty(N, dtype=torch.float32, device=hidden.device) if plan.return_entropy else None
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes explicit (plan.dtype) from here on
        for s in range(0, N, plan.chunk):
            e = min(s + plan.chunk, N)
            z = plan.transform.forward_(_matmul_chunk(_cast(hidden2d[s:e], plan.dtype), w, b, buf[:e - s]))
            lp, ent, ls = plan.impl.logprobs_forward(z.view(1, e - s, V), plan.ids[s:e].view(1, -1),
                                                     _chunk_tau(plan.tau_k, s, e), plan.return_entropy)
            logp[s:e] = lp.reshape(-1)
            lse[s:e] = ls.reshape(e - s, 2)
            if entropy is not None:
                entropy[s:e] = ent.reshape(-1)
    return logp, entropy, lse


def _linear_backward(plan: _LinearPlan, hidden, weight, bias, lse, entropy, g_logp, g_entropy, needs):
    """The chunk loop's backward: (∂hidden, ∂weight, ∂bias), None where ``needs`` says not wanted or
    no token carries an upstream gradient. Recomputes each chunk's logits."""
    from .fused_linear import _cast, _Grads, _matmul_chunk

    N, H = plan.ids.shape[0], hidden.shape[-1]
    V = weight.shape[0]
    hidden2d = hidden.reshape(N, H)
    if not hidden2d.is_contiguous():
        hidden2d = hidden2d.contiguous()
    if (g_logp is None and g_entropy is None) or N == 0:  # no token carries a gradient (N = 0: all masked)
        return None, None, None
    gl = None if g_logp is None else g_logp.reshape(N).to(torch.float32).contiguous()
    gh = None if g_entropy is None else g_entropy.reshape(N).to(torch.float32).contiguous()
    live = (gl != 0) if gl is not None else (gh != 0)
    if gl is not None and gh is not None:
        live |= gh != 0
    grads = _Grads(hidden2d, weight, bias, needs, plan.dtype, live=live)  # a token without gradient adds none
    if not grads.any:
        return None, None, None
    w, b = _cast(weight, plan.dtype), _cast(bias, plan.dtype)
    buf = torch.empty((min(plan.chunk, N), V), dtype=plan.dtype, device=hidden.device)
    # The softcap's chain rule needs t = tanh(·) after the kernel wrote the gradient: a second buffer.
    gbuf = torch.empty_like(buf) if plan.transform.softcap is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, N, plan.chunk):
            e = min(s + plan.chunk, N)
            n = e - s
            h_c = _cast(hidden2d[s:e], plan.dtype)
            # The same GEMM and transform as forward: the same logits, so the saved lse parts match them.
            z = plan.transform.forward_(_matmul_chunk(h_c, w, b, buf[:n]))
            grad = z if gbuf is None else gbuf[:n]  # in place: each row is read before it is written
            plan.impl.logprobs_backward(
                z.view(1, n, V), plan.ids[s:e].view(1, n), _chunk_tau(plan.tau_k, s, e),
                lse[s:e].view(1, n, 2), None if entropy is None else entropy[s:e].view(1, n),
                None if gl is None else gl[s:e].view(1, n), None if gh is None else gh[s:e].view(1, n),
                grad.view(1, n, V))
            grads.add_chunk(plan.transform.backward_(grad, z), h_c, w, s, e)
        return grads.finish(hidden, weight, bias)


class _FusedLinearLogprobs(torch.autograd.Function):
    """(hidden, weight, bias) -> (logp, entropy); backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _LinearPlan):
        logp, entropy, lse = _linear_forward(plan, hidden, weight, bias)
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        ctx.save_for_backward(hidden, weight, bias, lse, entropy)
        if plan.return_entropy:
            return logp.view(plan.out_shape), entropy.view(plan.out_shape)
        return logp.view(plan.out_shape)

    @_kernel_backward("fused_linear_logprobs")
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, lse, entropy = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        dh, dw, db = _linear_backward(ctx.plan, hidden, weight, bias, lse, entropy, g_logp, g_entropy, needs)
        return dh, dw, db, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    return_entropy: bool = False,
    mask: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    group=None,
    vocab_start: Optional[int] = None,
):
    """``logprobs`` of ``logits = softcap(logit_scale · (hidden · weightᵀ + bias))`` without the logits.

    Differentiable in hidden, weight and bias through both outputs; never holds more than a chunk of
    logits (forward: one matmul per chunk; backward: the chunk's logits recomputed, then ∂hidden and
    ∂weight: three matmuls per chunk in backward).

    Args:
        hidden: (N, H) or (B, T, H) float32 | bfloat16 | float16 (``hidden[i]`` predicts ``ids[i]``).
        weight: (V, H), the LM head as in ``nn.Linear`` (hidden's dtype and device).
        ids: (N,) or (B, T) int64 | int32 in [0, V).
        bias: (V,) or None.
        temperature: a float > 0, or a tensor of the ids' shape, or (B,) with (B, T, H) hidden.
        logit_scale: > 0, multiplies the logits; logit_softcap: c > 0 or None, ``c·tanh(logits/c)``
            (both before the temperature, as in ``fused_linear_grpo_loss``).
        return_entropy: also return the per-token entropy (with its gradient).
        mask: None, or the ids' shape, bool | integer | floating (nonzero = valid), as in ``logprobs``:
            only the valid tokens' hidden states are gathered (one (N, H) read, one host sync for
            their count) and walked by the chunk loop, so a masked token costs no matmul; its logp
            and entropy are 0 and its ∂hidden row is 0 (whatever it holds). With a group: the same
            mask on every rank.
        chunk_size: tokens per chunk; None picks it from a 256 MiB budget (fused_linear.CHUNK_BUDGET_BYTES).
        cu_seqlens: packed rows, as in ``logprobs`` (hidden (N, H) or (1, N, H); temperature may be (S,)).
        backend: "auto" | "cpu" | "triton" | "cuda" | "torch" — which log-prob kernels run on each chunk.
        group, vocab_start: the LM head split along V over a process group, as in ``logprobs``: weight
            (V_r, H) and bias (V_r,) are this rank's rows (or DTensors placed Shard(0)); hidden and
            ids are the same on every rank; ∂hidden is all-reduced over the group, ∂weight and ∂bias
            stay this rank's rows.

    Returns:
        (logp, entropy): float32 of the ids' shape; entropy is None unless return_entropy.

    Example:
        >>> logp, ent = grpo_fast.fused_linear_logprobs(hidden, model.lm_head.weight, ids, return_entropy=True)
    """
    backend = check_backend(backend)
    return_entropy = _check_bool("return_entropy", return_entropy)
    if torch.compiler.is_compiling():  # the chunk loops as custom ops (grpo_fast/_ops.py)
        from . import _ops

        return _ops.compiled_fused_linear_logprobs(hidden, weight, ids, bias, temperature, logit_scale, logit_softcap,
                                                   return_entropy, chunk_size, cu_seqlens, backend, group, vocab_start,
                                                   mask)
    weight, group = _vp.unwrap(weight, group, "weight", 0)
    bias, group = _vp.unwrap(bias, group, "bias", 0)
    plan, hidden, layout = _linear_plan(hidden, weight, ids, bias, temperature, logit_scale, logit_softcap,
                                        return_entropy, chunk_size, cu_seqlens, backend, group, vocab_start)
    keep = _check_mask(mask, plan.out_shape, hidden.device)
    if layout is not None:  # ∂hidden is summed over the group
        hidden = _vp.reduce_gradient(hidden, layout)
    if keep is not None:
        return _masked_linear(plan, hidden, weight, bias, keep)
    out = _FusedLinearLogprobs.apply(hidden, weight, bias, plan)
    return out if return_entropy else (out, None)


def _masked_linear(plan: _LinearPlan, hidden, weight, bias, keep: torch.Tensor):
    """fused_linear_logprobs on the valid tokens only: their hidden states (and ids, τ) gathered, the
    chunk loop run on them, the outputs scattered back into zeros. Autograd carries ∂hidden back through
    the gather (zero rows for the masked tokens); a masked row's hidden state is never multiplied."""
    N = plan.ids.shape[0]
    sub, idx = valid_plan(plan, keep)
    if idx is None:  # nothing masked: exactly the unmasked call
        out = _FusedLinearLogprobs.apply(hidden, weight, bias, plan)
        return out if plan.return_entropy else (out, None)
    n = idx.numel()
    hidden_v = hidden.reshape(N, hidden.shape[-1])[idx]

    def scatter(v):  # (n,) -> the ids' shape, zeros at the masked tokens (differentiable in v)
        return torch.zeros(N, dtype=torch.float32, device=hidden.device).index_put((idx,), v).view(plan.out_shape)

    if n == 0:  # every token masked: zeros, still attached to hidden (a zero gradient)
        zero = scatter(hidden_v.sum().float().expand(0))
        return zero, (zero.clone() if plan.return_entropy else None)
    out = _FusedLinearLogprobs.apply(hidden_v, weight, bias, sub)
    if plan.return_entropy:
        return scatter(out[0]), scatter(out[1])
    return scatter(out), None


def valid_plan(plan: _LinearPlan, keep: torch.Tensor):
    """The chunk plan of the valid tokens (``keep`` != 0, the checked mask) and their indices (n,) into the
    N tokens; (plan, None) when every token is valid. One host sync (the count)."""
    N = plan.ids.shape[0]
    idx = keep.reshape(N).nonzero().squeeze(1)
    n = idx.numel()
    if n == N:
        return plan, None
    tau_k = plan.tau_k[idx].contiguous() if isinstance(plan.tau_k, torch.Tensor) else plan.tau_k
    return dataclasses.replace(plan, ids=plan.ids[idx].contiguous(), tau_k=tau_k, out_shape=(n,)), idx


def _linear_plan(hidden, weight, ids, bias, temperature, logit_scale, logit_softcap, return_entropy: bool, chunk_size,
                 cu_seqlens, backend: str, group, vocab_start):
    """fused_linear_logprobs' checks (every one, before any kernel) and its chunk plan: (plan, hidden
    (the (N, H) rows with cu_seqlens), the ShardLayout with a group, else None). Plain tensors (no DTensor)."""
    from .fused_linear import (_auto_chunk, _check_chunk_size, _check_linear, _check_transform, _compute_dtype,
                               _Transform)

    if cu_seqlens is not None:
        hidden, temperature = _packed_args(hidden, "hidden", "H", temperature, cu_seqlens)
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2:
        hidden3 = hidden.unsqueeze(0)
    elif isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (N, H) or (B, T, H), got {hidden.dim()} dims {_fmt_shape(hidden)}")
    else:
        hidden3 = hidden
    cdtype, autocast = _compute_dtype(hidden3)
    B, T, H, V = _check_linear(hidden3, weight, bias, mixed_ok=autocast)
    lead = tuple(hidden.shape[:-1])
    tau = _check_temperature(temperature, lead, hidden.device)
    # a per-token τ is checked above; the scalar one also as the temperature the kernel runs at
    scale, cap = _check_transform(logit_scale, logit_softcap, 1.0 if isinstance(tau, torch.Tensor) else tau)
    chunk = _check_chunk_size(chunk_size)
    if group is None:
        ids3 = _check_ids_nd(ids, lead, V, hidden.device)
    else:
        ids3, layout = _vp.ids_and_layout(group, vocab_start, ids, lead, V, hidden.device)
    impl = _backends.resolve(backend, hidden.device)
    transform = _Transform(scale, cap)
    N = B * T
    if chunk is None:  # with a group: from the largest shard, so that every rank walks the same chunks
        chunk = _auto_chunk(N, V if group is None else layout.max_size, torch.empty((), dtype=cdtype).element_size(),
                            transform.n_buffers, impl.autograd)
    if group is not None:  # each chunk's forward all-reduces a few floats per token
        impl = _vp.Kernels(impl, layout)
    if isinstance(tau, torch.Tensor):  # x = z/τ with z = s·pre or c·t: the kernels read pre at τ/s, t at τ/c
        tau_k = (tau / (cap if cap is not None else scale)).reshape(N).contiguous()
    else:
        tau_k = transform.kernel_temperature(tau)
    plan = _LinearPlan(impl=impl, transform=transform, chunk=chunk, dtype=cdtype, ids=ids3.reshape(N),
                       tau_k=tau_k, return_entropy=return_entropy, out_shape=lead)
    return plan, hidden, (layout if group is not None else None)
