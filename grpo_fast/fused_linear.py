"""The fused-linear GRPO loss: from hidden states and the LM head, never materializing the logits.

The (B·T) × V logits of an RL batch are the largest tensor of a GRPO step (8k tokens × 152k vocab
× 4 B = 5 GB per sequence). This path walks the tokens in chunks and, per chunk of n tokens:

    pre   = h_c · Wᵀ (+ b)                 torch matmul (BLAS / cuBLAS)      n·H·V MACs
    kernel(pre) -> loss sums, ∂loss/∂pre   the backend's fused logits kernel, gradient written IN PLACE
                                           into the chunk's own buffer (one read, one write of n·V)
    dh_c  = ∂pre · W                       matmul                             n·H·V MACs
    dW   += ∂preᵀ · h_c,  db += Σ ∂pre      matmul                             n·H·V MACs

Three matmuls in all and nothing recomputed: the gradient is produced in the forward pass (every
aggregation weight depends only on the mask, docs/spec.md "Gradient") and backward only scales it by
grad_output, as ``api._FusedGRPOLoss`` does for logits. TRL's ``ChunkedLogProbFunction`` and
Liger's fused-linear GRPO recompute each chunk's logits in backward (four matmuls).

Chunks add up because the backend contract returns SUMS (stats) and takes the batch's aggregation
weight per token (``LossInputs.weight``, computed once for the whole batch): a chunk's
``Σ w·L`` is its exact share of the loss whatever the loss type. Per-chunk ``LossInputs`` are slices
of the validated full-batch ones, with tokens flattened to a (1, n) "batch" and per-row
advantages / importance ratios expanded to per-token for that chunk only. Advantages from rewards are
computed once for the batch (the kernels' own group statistics would see only the chunk).

logit_scale and logit_softcap without an extra pass over the chunk: the kernel divides by its
temperature anyway, so it is handed ``pre`` with temperature τ/s (scale only), or
``t = tanh(s·pre/c)`` with temperature τ/c (softcap: z = c·t). Its gradient is then already
∂loss/∂pre (scale only), or ∂loss/∂t, chained by (1 − t²)·s/c — which needs ``t`` after the kernel
has overwritten its input, so with a softcap the gradient goes to a second chunk buffer.

Sequence-level importance sampling (GSPO) needs a row's ratio before any token of the row gets its
gradient. Two strategies, chosen per call:

* rows fit in a chunk (chunk_size ≥ T; the default whenever one row's logits fit the budget):
  chunk by whole rows. The backend's kernel does the sequence-level math itself (it reads the chunk
  twice: statistics, then the gradient once the row's ratio is known): still three matmuls.
* a row does not fit (long rows × big vocabularies): a log-prob pre-pass. Pass 1 computes each
  chunk's logits and per-token log-prob / entropy with the backend's ``logprobs_forward`` (the kernels
  of ``grpo_fast.logprobs``), keeping each token's lse in its two parts (shift, log_d); the loss as a
  function of the small (B, T) log-prob tensor is then differentiated by torch autograd, with the
  reference's math (``_loss_from_logp``), giving per-token ``g = ∂loss/∂logp``; pass 2 recomputes each
  chunk's logits and writes ``g·(onehot − softmax)/τ`` in place with the backend's
  ``logprobs_backward`` (g_logp = g, no entropy term). Four matmuls instead of three
  and two kernel passes: measured 1.7–1.9× the three-matmul floor against 1.1–1.2× for the one-pass
  paths (B4 T256 H512 V32000 fp32 on 2 shared CPU cores; ``python -m benchmarks fused-linear``, rows
  ``fused-cpu-seq`` / ``fused-cpu-seq-2pass``), i.e. ≈ 1.5× the time of the rows path. It runs
  only when a row does not fit the budget: chunking whole rows would then need a T·V buffer (5 GB at
  T = 8k, V = 152k), which is what this path exists to avoid.

Backend "torch" uses the same loop with its eager kernels (grpo_fast/backends/torch_backend.py):
per-chunk autograd over the reference's formulas, so it too never holds more than a chunk of logits.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import torch

from . import _autograd as _ag
from . import backends as _backends
from . import vocab_parallel as _vp
from ._config import METRIC_STAT_INDEX, NUM_STATS, STAT_ENTROPY, STAT_KL, STAT_LOSS
from .api import _LossModule, metrics_from_sums
from .options import Execution, GRPOOptions, LossTensors, with_options
from .reference import (
    flag_counts,
    group_advantages_reference,
    per_token_loss,
    row_level_flags,
)
from .validation import (
    LOGIT_DTYPES,
    LossInputs,
    _fmt_shape,
    _number,
    check_backend,
    check_ids,
    check_strided,
    check_temperature,
    float32_option,
    validate_loss_args,
)

__all__ = ["fused_linear_grpo_loss", "FusedLinearGRPOLoss", "fused_linear_token_logprobs"]

# Default memory budget for the chunk's logits buffer(s). 256 MiB keeps the working set far below
# the weight gradient of any real LM head while each chunk's GEMMs stay large (≥ 256 rows).
CHUNK_BUDGET_BYTES = 256 << 20
# Below this many tokens per chunk the GEMMs become bound by re-reading W (V·H) once per chunk.
MIN_CHUNK_TOKENS = 256
# When the whole batch would fit the budget, still split it in this many chunks, so that the logits
# never all live at once (peak ≈ 1/4 of the full logits) at no measurable speed cost.
MIN_CHUNKS = 4
# Chunk lengths are rounded to a multiple of this (GEMM tiles like whole blocks of rows).
CHUNK_ROUND = 64
# Elementwise passes (softcap chain rule, upcasts) run over blocks of at most this many elements, so
# their float32 temporaries stay small next to the chunk.
_ELEMWISE_BLOCK = 1 << 20


# --------------------------------------------------------------------------------------------
# Argument checks specific to this path (everything else goes through validation.py)
# --------------------------------------------------------------------------------------------

def _check_linear(hidden, weight, bias, mixed_ok: bool = False):
    """hidden (B, T, H), weight (V, H), bias (V,) | None: same device, same dtype unless ``mixed_ok``
    (autocast decides the compute dtype). Returns (B, T, H, V)."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor of shape (B, T, H), got {type(hidden).__name__}")
    check_strided("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, T, H), got {hidden.dim()} dims {_fmt_shape(hidden)}")
    if hidden.dtype not in LOGIT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape (V, H), got {type(weight).__name__}")
    check_strided("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H) as in nn.Linear, got {weight.dim()} dims {_fmt_shape(weight)}")
    B, T, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, {H}) to match hidden's H = {H}, got {_fmt_shape(weight)}")
    if weight.dtype not in LOGIT_DTYPES or (weight.dtype != hidden.dtype and not mixed_ok):
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype} (or any float dtype under torch.autocast), "
                        f"got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    if V == 0:
        raise ValueError(f"weight must have a vocabulary dimension V > 0, got shape {_fmt_shape(weight)}")
    if B * T == 0:
        raise ValueError(f"hidden must have B·T > 0 tokens, got shape {_fmt_shape(hidden)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor of shape ({V},) or None, got {type(bias).__name__}")
        check_strided("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},) to match weight's V = {V}, got {_fmt_shape(bias)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias must be on hidden's device {hidden.device}, got {bias.device}")
    return B, T, H, V


def _check_transform(logit_scale, logit_softcap, temperature):
    """scale > 0, cap > 0 or None, and the temperature the kernel then runs at (τ/s or τ/c) a
    positive normal float32 like every temperature (validation.float32_option)."""
    scale = _number("logit_scale", logit_scale)
    if scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {scale}")
    scale = float32_option("logit_scale", scale)
    cap = _number("logit_softcap", logit_softcap, allow_none=True)
    if cap is not None and cap <= 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {cap}")
    cap = float32_option("logit_softcap", cap, allow_none=True)
    tau = check_temperature(temperature)
    float32_option("temperature / logit_softcap" if cap is not None else "temperature / logit_scale",
                   _Transform(scale, cap).kernel_temperature(tau))
    return scale, cap


def _check_chunk_size(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk) or None, got {chunk_size!r}")
    return int(chunk_size)


def _standin_logits(B: int, T: int, V: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (B, T, V) tensor of V elements (strides (0, 0, 1)) for validate_loss_args' shape checks.

    stride(-1) == 1, so validation never copies it; nothing ever reads its (uninitialized) values.
    """
    return torch.empty((1, 1, V), dtype=dtype, device=device).expand(B, T, V)


def _compute_dtype(hidden: torch.Tensor):
    """(dtype of the chunk GEMMs and logits, whether autocast chose it).

    Under torch.autocast the projection runs in autocast's dtype as F.linear would (TRL's fused head
    does the same); otherwise in the inputs' dtype.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev), True
    return hidden.dtype, False


# --------------------------------------------------------------------------------------------
# The logit transform: z = c·tanh(s·pre/c) or z = s·pre, folded into the kernel's temperature
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Transform:
    scale: float
    softcap: Optional[float]

    @property
    def n_buffers(self) -> int:
        """Chunk-sized buffers per chunk: the softcap keeps t alive next to the gradient."""
        return 2 if self.softcap is not None else 1

    def kernel_temperature(self, temperature: float) -> float:
        # x = z/τ: with z = s·pre the kernel reads pre at τ/s; with z = c·t it reads t at τ/c.
        return temperature / (self.softcap if self.softcap is not None else self.scale)

    def forward_(self, pre: torch.Tensor) -> torch.Tensor:
        """In place: the matmul output becomes what the kernel reads (pre itself, or t)."""
        if self.softcap is not None:
            pre.mul_(self.scale / self.softcap).tanh_()
        return pre

    def backward_(self, grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """In place: ∂loss/∂(kernel input) -> ∂loss/∂pre. ``t`` is destroyed (softcap only)."""
        if self.softcap is None:
            return grad  # the kernel's temperature already carried the scale
        k = self.scale / self.softcap
        n, V = grad.shape
        rows = max(1, _ELEMWISE_BLOCK // max(V, 1))
        for i in range(0, n, rows):
            tb = t[i:i + rows].float()
            # (1 − t)(1 + t) instead of 1 − t²: 1 − t is exact near |t| → 1, where 1 − t² cancels.
            d = (1.0 - tb).mul_(tb.add_(1.0)).mul_(k)
            gb = grad[i:i + rows]
            gb.copy_(gb.float().mul_(d))
        return grad


# --------------------------------------------------------------------------------------------
# The per-token GRPO math on log-probs (torch): the reference's own terms (reference.per_token_loss,
# flag_counts), returned as the backend's SUMS so that chunks add, and differentiable in logp for the
# pre-pass
# --------------------------------------------------------------------------------------------

def _loss_from_logp(logp, mask, weight, A, old, ref, isr, inp: LossInputs, entropy=None, entropy_weight=None):
    """loss = Σ w·L (differentiable in logp) and the stats sums except entropy.

    logp: (R, T) float32; mask, weight: (R, T); A: (R,) or (R, T); old, ref, isr: (R, T) | (R,) | None.
    entropy_weight (R, T) or None (LossInputs.entropy_weight): the entropy bonus, loss −= Σ w_H·entropy,
    with entropy (R, T) (differentiable where its gradient is wanted; masked tokens' values are dropped).
    """
    o = inp.options
    L, r, kl = per_token_loss(logp, mask, A, o, old_logp=old, ref_logp=ref, importance_sampling_ratio=isr,
                              cfg=inp.cfg)
    stats = torch.zeros(NUM_STATS, dtype=torch.float32, device=logp.device)
    for name, count in flag_counts(r, A, mask, o, row_level_flags(o.importance_sampling_level, A)).items():
        stats[METRIC_STAT_INDEX[name]] = count
    if kl is not None:
        stats[STAT_KL] = (kl.detach() * mask).sum()
    loss = (weight * L).sum()
    if entropy_weight is not None:  # where: a masked token's entropy (NaN if its logits hold one) is dropped
        loss = loss - (entropy_weight * torch.where(mask != 0, entropy, torch.zeros_like(entropy))).sum()
    stats[STAT_LOSS] = loss.detach()
    return loss, stats


# --------------------------------------------------------------------------------------------
# Chunk planning and the loop
# --------------------------------------------------------------------------------------------

def _auto_chunk(N: int, V: int, elem: int, n_buffers: int, torch_backend: bool, row: int = 0) -> int:
    """Tokens per chunk: a quarter of the batch (≥ 256 tokens), within the 256 MiB budget.

    ``row`` = T at sequence level: a whole row when it fits the budget (rows path, three matmuls)
    rather than the pre-pass (four).
    """
    per_token = V * elem * n_buffers
    if torch_backend:
        per_token += V * 4 * 5  # autograd's float32 temporaries (upcast, exp, softmax, grad, p·x)
    budget_tokens = max(1, CHUNK_BUDGET_BYTES // per_token)
    quarter = -(-N // MIN_CHUNKS)
    quarter = -(-quarter // CHUNK_ROUND) * CHUNK_ROUND
    chunk = min(budget_tokens, max(MIN_CHUNK_TOKENS, quarter))
    if chunk >= CHUNK_ROUND:
        chunk -= chunk % CHUNK_ROUND
    if row and chunk < row <= budget_tokens:
        chunk = row
    return max(1, min(chunk, N))


@dataclasses.dataclass
class _Plan:
    """Everything the chunk loop needs besides the three differentiable tensors."""

    inp: LossInputs  # the full batch, validated (its logits are a stand-in)
    A: torch.Tensor  # (B,) or (B, T) float32: advantages (from rewards if needed)
    impl: _backends.Backend
    transform: _Transform
    chunk: int  # tokens per chunk
    dtype: torch.dtype  # of the chunk GEMMs and logits buffers
    grad_enabled: bool  # torch.is_grad_enabled() at the call (forward runs with grad disabled)
    B: int
    T: int
    V: int
    loss_scale: float = 1.0  # folded into inp.weight (_autograd.fold_scale): the gradients are of loss_scale·loss
    all_valid: bool = False  # every token's mask is nonzero (the valid tokens gathered): no masked row to zero


def _chunk_inputs(plan: _Plan, buf: torch.Tensor, s: int, e: int, rows: bool) -> LossInputs:
    """LossInputs of tokens [s, e) (or rows [s, e) when ``rows``), logits = buf (n, V)."""
    inp, T = plan.inp, plan.T
    if rows:
        k = e - s
        sl = slice(s, e)
        logits = buf.view(k, T, plan.V)

        def cut(x):
            return None if x is None else x[sl]

        ids, mask, weight, A, old, ref, isr, ew = (cut(x) for x in (inp.ids, inp.mask, inp.weight, plan.A,
                                                                    inp.old_logp, inp.ref_logp, inp.isr,
                                                                    inp.entropy_weight))
    else:
        n = e - s
        logits = buf.view(1, n, plan.V)
        B = plan.B

        def cut(x):
            if x is None:
                return None
            if x.dim() == 1:  # per row -> per token, for this chunk's tokens only
                first, last = s // T, (e - 1) // T + 1
                x = x[first:last].view(-1, 1).expand(last - first, T).reshape(-1)[s - first * T:e - first * T]
            else:
                x = x.view(B * T)[s:e]
            return x.reshape(1, n)

        ids, mask, weight, A, old, ref, isr, ew = (cut(x) for x in (inp.ids, inp.mask, inp.weight, plan.A,
                                                                    inp.old_logp, inp.ref_logp, inp.isr,
                                                                    inp.entropy_weight))
    cfg = dataclasses.replace(inp.cfg, temperature=plan.transform.kernel_temperature(inp.cfg.temperature), group_size=0)
    def contig(x):  # the backends read these by raw pointer (an expanded row can have stride 0)
        return None if x is None else x.contiguous()

    return dataclasses.replace(inp, logits=logits, ids=contig(ids), mask=contig(mask), advantages=contig(A),
                               rewards=None, old_logp=contig(old), ref_logp=contig(ref), isr=contig(isr),
                               weight=contig(weight), entropy_weight=contig(ew), cfg=cfg)


class _Grads:
    """Gradient buffers of hidden (N, H), weight (V, H) and bias (V,), filled chunk by chunk.

    ``live``: (N,) bool, the tokens that carry a gradient (None: all). The others (masked out) get
    exactly zero rows of ∂pre and of hidden in the weight GEMM, so that a NaN or inf in a masked hidden
    state (or in its logits) cannot reach ∂weight / ∂bias through 0·NaN.
    """

    def __init__(self, hidden2d, weight, bias, needs, compute_dtype, live=None):
        dev = hidden2d.device
        dead = None if live is None or not any(needs) else torch.nonzero(~live.reshape(-1)).squeeze(1)  # one sync
        self.dead = dead if dead is not None and dead.numel() else None
        self.low_precision = compute_dtype != torch.float32
        self.dh = torch.empty_like(hidden2d) if needs[0] else None
        # The weight and bias gradients sum over every chunk: float32 accumulators, so that a bf16
        # gradient is rounded once at the end, not once per chunk.
        # The first chunk overwrites them (GEMM with beta = 0): no zero-fill pass over V·H.
        self.dw = torch.empty(weight.shape, dtype=torch.float32, device=dev) if needs[1] else None
        self.db = torch.empty(bias.shape, dtype=torch.float32, device=dev) if needs[2] else None
        self.first = True

    @property
    def any(self) -> bool:
        return self.dh is not None or self.dw is not None or self.db is not None

    def add_chunk(self, dpre, h_c, weight, s, e):
        """dpre: (n, V) ∂loss/∂pre of tokens [s, e); h_c: (n, H); weight (V, H): all in the compute dtype."""
        if self.dead is not None:  # the chunk's masked rows, by index: no pass over the chunk, no sync
            rows = self.dead[(self.dead >= s) & (self.dead < e)] - s
            dpre.index_fill_(0, rows, 0)
            h_c = h_c.index_fill(0, rows, 0)
        if self.dh is not None:
            if self.dh.dtype == dpre.dtype:
                torch.mm(dpre, weight, out=self.dh[s:e])
            else:  # autocast: the hidden states' gradient in their own dtype
                self.dh[s:e].copy_(torch.mm(dpre, weight))
        beta = 0.0 if self.first else 1.0  # beta = 0: dw's uninitialized values are ignored, NaN included
        if self.dw is not None:
            if not self.low_precision:
                self.dw.addmm_(dpre.t(), h_c, beta=beta)
            elif dpre.is_cuda:
                try:  # cuBLAS bf16 GEMM with a float32 output (torch >= 2.8)
                    torch.addmm(self.dw, dpre.t(), h_c, beta=beta, out_dtype=torch.float32, out=self.dw)
                except (TypeError, RuntimeError):
                    self.dw.addmm_(dpre.t().float(), h_c.float(), beta=beta)
            else:  # CPU: no mixed-precision GEMM; a float32 GEMM on upcast copies (chunk-sized)
                self.dw.addmm_(dpre.t().float(), h_c.float(), beta=beta)
        if self.db is not None:
            if self.first:
                torch.sum(dpre, 0, dtype=torch.float32, out=self.db)
            else:
                self.db.add_(dpre.sum(0, dtype=torch.float32))
        self.first = False

    def finish(self, hidden, weight, bias):
        dh = None if self.dh is None else self.dh.view(hidden.shape)
        dw = None if self.dw is None else self.dw.to(weight.dtype)
        db = None if self.db is None else self.db.to(bias.dtype)
        return dh, dw, db


def _matmul_chunk(h_c, weight, bias, out):
    """out (n, V) = h_c · Wᵀ (+ b), in the inputs' dtype (BLAS accumulates in float32 for bf16)."""
    if bias is None:
        torch.mm(h_c, weight.t(), out=out)
    else:
        torch.addmm(bias, h_c, weight.t(), out=out)
    return out


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _run_chunks(plan: _Plan, hidden, weight, bias, needs):
    """The fused forward + gradient. Returns (stats (NUM_STATS,) sums, dh, dw, db)."""
    weight_in, bias_in = weight, bias
    B, T, V = plan.B, plan.T, plan.V
    N = B * T
    hidden2d = hidden.reshape(N, hidden.shape[-1])
    if not hidden2d.is_contiguous():
        hidden2d = hidden2d.contiguous()
    grads = _Grads(hidden2d, weight, bias, needs, plan.dtype, live=None if plan.all_valid else plan.inp.mask != 0)
    weight, bias = _cast(weight, plan.dtype), _cast(bias, plan.dtype)  # once (V·H), autocast only
    sequence = plan.inp.cfg.level == 1
    rows = sequence and plan.chunk >= T
    if sequence and not rows:
        return _run_prepass(plan, hidden, hidden2d, weight, bias, grads, weight_in, bias_in)

    step = plan.chunk // T if rows else plan.chunk  # rows or tokens per chunk
    total = B if rows else N
    tokens_max = min(step * T if rows else step, N)
    buf = torch.empty((tokens_max, V), dtype=plan.dtype, device=hidden.device)
    gbuf = None
    if grads.any and plan.transform.softcap is not None:
        gbuf = torch.empty_like(buf)
    stats = torch.zeros(NUM_STATS, dtype=torch.float32, device=hidden.device)
    for s in range(0, total, step):
        e = min(s + step, total)
        ts, te = (s * T, e * T) if rows else (s, e)
        n = te - ts
        h_c = _cast(hidden2d[ts:te], plan.dtype)
        chunk = plan.transform.forward_(_matmul_chunk(h_c, weight, bias, buf[:n]))
        cinp = _chunk_inputs(plan, chunk, s, e, rows)
        grad = None
        if grads.any:
            grad = chunk if gbuf is None else gbuf[:n]  # in place unless t must survive the kernel
        # The backend sees the chunk as its (1, n, V) or (k, T, V) batch; grad takes the same shape.
        st, _ = plan.impl.fused_loss(cinp, None if grad is None else grad.view(cinp.logits.shape))
        stats += st.to(stats.device)
        if grad is not None:
            dpre = plan.transform.backward_(grad, chunk)
            grads.add_chunk(dpre, h_c, weight, ts, te)
    return (stats,) + grads.finish(hidden, weight_in, bias_in)


def _run_prepass(plan: _Plan, hidden, hidden2d, weight, bias, grads: _Grads, weight_in, bias_in):
    """Sequence level with rows longer than a chunk: log-prob pre-pass, then one gradient pass."""
    B, T, V = plan.B, plan.T, plan.V
    N = B * T
    inp = plan.inp
    step = plan.chunk
    buf = torch.empty((min(step, N), V), dtype=plan.dtype, device=hidden.device)
    tau_k = plan.transform.kernel_temperature(inp.cfg.temperature)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(N, dtype=torch.float32, device=hidden.device)
    # each token's lse in its two parts (shift, log_d), which pass 2 forms the softmax from
    lse = torch.empty((N, 2), dtype=torch.float32, device=hidden.device) if grads.any else None
    ids = inp.ids.view(N)
    # Pass 1: log-probs and entropies, chunk by chunk (no gradient buffer).
    for s in range(0, N, step):
        e = min(s + step, N)
        chunk = plan.transform.forward_(_matmul_chunk(_cast(hidden2d[s:e], plan.dtype), weight, bias, buf[:e - s]))
        lp, ent, ls = plan.impl.logprobs_forward(chunk.view(1, e - s, V), ids[s:e].view(1, -1), tau_k, True)
        logp[s:e] = lp.reshape(-1)
        entropy[s:e] = ent.reshape(-1)
        if lse is not None:
            lse[s:e] = ls.reshape(e - s, 2)
    # The loss as a function of the (B, T) log-probs: small, so torch autograd gives g = ∂loss/∂logp.
    # A masked token's log-prob and entropy (NaN when its hidden state holds one) are replaced by 0,
    # not multiplied by its zero weight: 0·NaN would reach the loss and the entropy metric.
    valid = inp.mask != 0
    with torch.enable_grad():
        lp = logp.view(B, T).detach().requires_grad_(grads.any)
        ent_v = torch.where(valid, entropy.view(B, T), 0.0)
        loss, stats = _loss_from_logp(torch.where(valid, lp, 0.0), inp.mask, inp.weight, plan.A, inp.old_logp,
                                      inp.ref_logp, inp.isr, inp, ent_v, inp.entropy_weight)
        g = torch.autograd.grad(loss, lp)[0].reshape(N) if grads.any else None
    # the entropy bonus −Σ w_H·H: ∂loss/∂H = −w_H, into the same backward kernel as g
    g_ent = None if inp.entropy_weight is None or g is None else (-inp.entropy_weight).reshape(N).contiguous()
    stats[STAT_ENTROPY] = ent_v.sum()
    if g is None:
        return (stats,) + grads.finish(hidden, weight_in, bias_in)
    # Pass 2: recompute each chunk's logits (the same GEMM and transform: the saved lse parts match
    # them); the log-prob backward kernel writes g·(onehot − softmax)/τ in place.
    gbuf = torch.empty_like(buf) if plan.transform.softcap is not None else None
    for s in range(0, N, step):
        e = min(s + step, N)
        n = e - s
        h_c = _cast(hidden2d[s:e], plan.dtype)
        chunk = plan.transform.forward_(_matmul_chunk(h_c, weight, bias, buf[:n]))
        grad = chunk if gbuf is None else gbuf[:n]
        plan.impl.logprobs_backward(chunk.view(1, n, V), ids[s:e].view(1, n), tau_k, lse[s:e].view(1, n, 2),
                                    None if g_ent is None else entropy[s:e].view(1, n), g[s:e].view(1, n),
                                    None if g_ent is None else g_ent[s:e].view(1, n), grad.view(1, n, V))
        grads.add_chunk(plan.transform.backward_(grad, chunk), h_c, weight, s, e)
    return (stats,) + grads.finish(hidden, weight_in, bias_in)


class _FusedLinearGRPOLoss(torch.autograd.Function):
    """(hidden, weight, bias) -> (loss, stats); every gradient is produced in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        # Under torch.no_grad no gradient is computed: one matmul per chunk and the loss kernel only.
        g = plan.grad_enabled
        needs = (g and ctx.needs_input_grad[0], g and ctx.needs_input_grad[1],
                 g and bias is not None and ctx.needs_input_grad[2])
        # Every dtype is explicit from here on (plan.dtype): autocast must not re-cast the chunk GEMMs.
        with torch.autocast(hidden.device.type, enabled=False):
            stats, dh, dw, db = _run_chunks(plan, hidden, weight, bias, needs)
        ctx.grads = (dh, dw, db)
        ctx.loss_scale = plan.loss_scale
        loss = _ag.unscaled_loss(stats[STAT_LOSS], plan.loss_scale)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        # The contract (retain_graph, create_graph) is _autograd.py's: the buffers are handed out on the
        # last backward only; a backward that keeps the graph gets copies.
        _ag.check_first_order(_SECOND_ORDER)
        grads = ctx.grads
        if grads is None:
            raise _ag.twice_error("fused_linear_grpo_loss", "call fused_linear_grpo_loss again for each backward")
        keep = bool(_ag.graph_kept())  # unknown (old torch): as not kept; a later backward then raises
        if not keep:
            ctx.grads = None  # release the buffers as soon as autograd takes them
        factor = _ag.grad_factor(grad_loss, ctx.loss_scale)
        grads = tuple(None if t is None else _ag.scaled(t, factor, keep) for t in grads)
        return grads[0], grads[1], grads[2], None


_SECOND_ORDER = _ag.second_order_message(
    "fused_linear_grpo_loss",
    'compute the logits (hidden @ weight.T) and use grpo_fast.grpo_loss(logits, ..., backend="torch") for a loss '
    "that needs them")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

@with_options
def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    **kwargs,  # the execution keywords (options.Execution), the per-call tensors (options.LossTensors), the options
):
    """The GRPO loss of ``logits = softcap(logit_scale · (hidden · weightᵀ + bias))`` without the logits.

    Args:
        hidden: (B, T, H) float32 | bfloat16 | float16 — the hidden states of the completion positions
            (already shifted: ``hidden[b, t]`` predicts ``completion_ids[b, t]``).
        weight: (V, H), the LM head as in ``nn.Linear`` (same dtype and device as hidden).
        completion_ids: (B, T) int64 | int32 in [0, V).
        advantages: (B,) or (B, T); or ``rewards`` (B,) with ``group_size``.
        bias: (V,) or None.
        logit_scale: > 0, multiplies the logits (e.g. Cohere's 0.0625).
        logit_softcap: c > 0 or None: logits become ``c·tanh(logits / c)`` (Gemma 2), before the
            temperature.
        chunk_size: tokens per chunk; None picks it from a 256 MiB budget for the chunk's logits (and
            at most a quarter of the batch, at least 256 tokens). At importance_sampling_level
            "sequence" a chunk holds ⌊chunk_size / T⌋ whole rows, or, when a row is longer than a
            chunk, the two-pass path of the module docstring runs.
        inplace: accepted for option compatibility with ``grpo_loss``; the chunk buffers are private,
            so the gradient is always written in place into them.
        loss_scale: as in ``grpo_loss``: the factor the caller multiplies the returned loss by before
            backward; the gradients are computed for it, so backward moves no data when grad_output
            equals it. The returned loss is the unscaled one.
        backend: "auto" | "cpu" | "triton" | "cuda" | "torch" — which logits kernel runs on each chunk.
        rewards, old_logp, ref_logp, completion_mask, importance_sampling_ratio, num_items_in_batch:
            as in ``grpo_loss``; the loss options (below) too.
        cu_seqlens: packed rows as in ``grpo_loss``: hidden (N, H) (or (1, N, H)), per-token tensors
            (N,), rewards and per-sequence advantages / IS ratio (S,).
        group, vocab_start: the LM head split along V over a process group, as in
            ``fused_linear_logprobs`` (weight (V_r, H), bias (V_r,) per rank, or DTensors placed
            Shard(0)). With a group, and with a temperature tensor ((B, T) per token or (B,) per row),
            the loss goes through ``fused_linear_logprobs`` and is computed in torch on its (B, T)
            log-probs (four matmuls per chunk instead of three); cu_seqlens is then refused.

    Returns:
        (loss, metrics): a float32 scalar with gradients for hidden, weight and bias, and the metrics
        dict of ``grpo_loss``.

    Example:
        >>> loss, metrics = grpo_fast.fused_linear_grpo_loss(hidden, model.lm_head.weight, completion_ids,
        ...                                                   rewards=rewards, group_size=8, completion_mask=mask)
        >>> loss.backward()
    """
    cu_seqlens, inplace, loss_scale, backend, group, vocab_start = Execution.pop(kwargs)
    backend = check_backend(backend)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    loss_scale = _ag.check_loss_scale(loss_scale)
    tensors = LossTensors.pop(kwargs)
    opts = GRPOOptions.from_kwargs("fused_linear_grpo_loss", kwargs)
    if torch.compiler.is_compiling():  # eager's code in one custom op (grpo_fast/_ops.py); loss_scale: not folded
        from . import _ops

        return _ops.compiled_fused_linear_grpo_loss(hidden, weight, bias, completion_ids, advantages, tensors, opts,
                                                    logit_scale, logit_softcap, chunk_size, cu_seqlens, backend, group,
                                                    vocab_start)
    cdtype, autocast = _compute_dtype(hidden)
    if cu_seqlens is not None:
        from .packed import packed_rows

        hidden = packed_rows(hidden, "hidden", "H").unsqueeze(0)
    if group is not None or _vp.is_dtensor(weight) or (isinstance(opts.temperature, torch.Tensor)
                                                       and opts.temperature.dim() > 0):
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: packed rows are not supported with a vocabulary split (group) or a "
                             "temperature tensor in fused_linear_grpo_loss; pass padded (B, T, H) hidden states")
        return _vp.fused_linear_grpo_loss(hidden, weight, bias, completion_ids, advantages, *tensors, logit_scale,
                                          logit_softcap, chunk_size, backend, opts, group, vocab_start)
    B, T, H, V = _check_linear(hidden, weight, bias, mixed_ok=autocast)
    scale, cap = _check_transform(logit_scale, logit_softcap, opts.temperature)
    chunk = _check_chunk_size(chunk_size)
    if cu_seqlens is not None:
        return _packed_fused_linear(hidden, weight, bias, completion_ids, advantages, *tensors, cu_seqlens,
                                    backend, opts, cdtype, _Transform(scale, cap), chunk, logit_scale, logit_softcap,
                                    loss_scale)
    inp = validate_loss_args(_standin_logits(B, T, V, cdtype, hidden.device), completion_ids, advantages,
                             **tensors._asdict(), options=opts)
    impl = _backends.resolve(backend, hidden.device)
    transform = _Transform(scale, cap)
    if inp.cfg.level == 1 and _sequence_on_valid_tokens(inp, impl, transform, chunk, cdtype):
        from . import packed as _pk
        from .logprobs import fused_linear_logprobs

        # the valid tokens' log-probs through the primitive (a masked token: no GEMM), the loss in torch
        logp, entropy = fused_linear_logprobs(hidden, weight, inp.ids, bias=bias, temperature=inp.cfg.temperature,
                                              logit_scale=logit_scale, logit_softcap=logit_softcap,
                                              return_entropy=True, mask=inp.mask, chunk_size=chunk, backend=backend)
        loss, stats = _pk.loss_from_logp(logp, entropy, inp, None)
        return loss, metrics_from_sums(stats.detach(), inp)
    loss, stats = _linear_loss(hidden, weight, bias, inp, impl, transform, chunk, cdtype, loss_scale)
    return loss, metrics_from_sums(stats, inp)


def _sequence_on_valid_tokens(inp: LossInputs, impl, transform: _Transform, chunk: Optional[int],
                              cdtype: torch.dtype) -> bool:
    """Sequence level on a padded batch: whether the log-prob primitive on the valid tokens (n of the N:
    4 GEMMs and 3 sweeps of the logits each) costs less than the chunk loop over every token. With the
    log-prob pre-pass (a row longer than a chunk) the loop does the same work per token: the primitive
    wins whenever a token is masked. When a chunk holds whole rows the loop does 3 GEMMs and 2 sweeps per
    token: the primitive measured 1.43x of it per token (benchmarks/packed.py --path fused-linear), so it
    takes over below 60% valid tokens. One host sync (the count)."""
    B, T, V = inp.logits.shape
    N = B * T
    n = int((inp.mask != 0).sum())
    if n == N or n == 0:
        return False
    if chunk is None:
        chunk = _auto_chunk(N, V, torch.empty((), dtype=cdtype).element_size(), transform.n_buffers, impl.autograd,
                            row=T)
    return 5 * n < 3 * N if chunk >= T else n < N


def _linear_loss(hidden, weight, bias, inp: LossInputs, impl, transform: _Transform, chunk: Optional[int],
                 cdtype: torch.dtype, loss_scale: float, valid_only: bool = True):
    """(loss, stats) of the chunked fused pass on validated inputs (their logits a (B, T, V) stand-in);
    ``impl``: the resolved backend (or an object with its entry points and ``autograd``). At token level
    the chunk loop walks the valid tokens only (``_valid_tokens``; ``valid_only=False``: the inputs are
    the valid tokens already)."""
    if valid_only and inp.cfg.level == 0:
        valid = _valid_tokens(hidden, inp, cdtype)
        if valid is not None:  # the valid tokens (every token when none is masked): no masked row left to zero
            hidden, inp = valid
            valid_only = False
    B, T, V = inp.logits.shape
    if chunk is None:
        chunk = _auto_chunk(B * T, V, torch.empty((), dtype=cdtype).element_size(), transform.n_buffers,
                            impl.autograd, row=T if inp.cfg.level == 1 else 0)
    A = inp.advantages
    if A is None:  # once for the batch: a chunk's kernel would only see its own rows' rewards
        A = group_advantages_reference(inp.rewards, inp.cfg.group_size, inp.scale_rewards, inp.cfg.adv_eps)
    _ag.fold_scale(inp, loss_scale)
    plan = _Plan(inp=inp, A=A, impl=impl, transform=transform, chunk=chunk, dtype=cdtype,
                 grad_enabled=torch.is_grad_enabled(), B=B, T=T, V=V, loss_scale=loss_scale,
                 all_valid=not valid_only)
    return _FusedLinearGRPOLoss.apply(hidden, weight, bias, plan)


def _valid_tokens(hidden, inp: LossInputs, cdtype: torch.dtype):
    """Token level with masked tokens (padding): (hidden of the valid tokens (1, n, H), their inputs as one
    (1, n) row), so that a masked token costs no GEMM (forward, ∂hidden or ∂weight) and no kernel row;
    ∂hidden of a masked token is 0 through the gather. (hidden, inp) as they are when every token is
    valid; None when none is (the chunk loop zeros every row). The per-token weights, advantages, ratios
    and the entropy bonus's weights were formed on the whole (B, T) batch and are gathered, so the loss
    is that of the whole batch. One host sync (the count of valid tokens)."""
    from . import packed as _pk

    B, T, V = inp.logits.shape
    N = B * T
    idx = torch.nonzero(inp.mask.reshape(N) != 0).squeeze(1)
    n = idx.numel()
    if n == N:
        return hidden, inp
    if n == 0:
        return None
    lay = _pk.Layout(cu=None, S=B, T=T, N=n, row=idx // T, col=idx % T)
    flat = _pk.flat_inputs(inp, lay, _standin_logits(1, n, V, cdtype, hidden.device))
    return hidden.reshape(N, hidden.shape[-1])[idx].unsqueeze(0), flat


def _packed_fused_linear(hidden, weight, bias, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask,
                         importance_sampling_ratio, num_items_in_batch, cu_seqlens, backend, opts, cdtype, transform,
                         chunk, logit_scale, logit_softcap, loss_scale=1.0):
    """fused_linear_grpo_loss on packed rows (grpo_fast/packed.py), hidden (1, N, H): token level is
    the chunk loop over one (1, N) row with per-token advantages and weights; sequence level goes
    through fused_linear_logprobs and the loss in torch on the (N,) log-probs."""
    from . import packed as _pk
    from .logprobs import fused_linear_logprobs

    _, N, _ = hidden.shape
    V = weight.shape[0]
    lay = _pk.check_cu_seqlens(cu_seqlens, N, hidden.device)
    padded = _pk.padded_args(lay, completion_ids, advantages, rewards, old_logp, ref_logp, completion_mask,
                             importance_sampling_ratio)
    inp = validate_loss_args(_standin_logits(lay.S, lay.T, V, cdtype, hidden.device),
                             num_items_in_batch=num_items_in_batch, options=opts, **padded)
    if inp.cfg.level == 1:
        logp, entropy = _pk.valid_logprobs(
            lambda h, y, **kw: fused_linear_logprobs(h, weight, y, **kw), hidden[0], inp, lay,
            _backends.resolve(backend, hidden.device).autograd, bias=bias, temperature=inp.cfg.temperature, logit_scale=logit_scale,
            logit_softcap=logit_softcap, chunk_size=chunk, backend=backend)
        loss, stats = _pk.loss_from_logp(logp, entropy, inp, lay)
        return loss, metrics_from_sums(stats.detach(), inp)
    flat = _pk.flat_inputs(inp, lay, _standin_logits(1, N, V, cdtype, hidden.device))
    impl = _backends.resolve(backend, hidden.device)
    # the chunk loop over the one (1, N) row, walking its valid tokens only (a masked token: no GEMM)
    loss, stats = _linear_loss(hidden, weight, bias, flat, impl, transform, chunk, cdtype, loss_scale)
    return loss, metrics_from_sums(stats, flat)


class FusedLinearGRPOLoss(_LossModule):
    """``fused_linear_grpo_loss`` as a module: options fixed at construction, tensors per call.

    Example:
        >>> crit = grpo_fast.FusedLinearGRPOLoss(beta=0.04, group_size=8, logit_softcap=30.0)
        >>> loss, metrics = crit(hidden, model.lm_head.weight, completion_ids, rewards=rewards, ref_logp=ref,
        ...                      completion_mask=mask)
    """

    _fn = fused_linear_grpo_loss
    _POSITIONAL = ("hidden", "weight", "completion_ids", "advantages")
    _PER_CALL = ("bias",) + LossTensors._fields + ("cu_seqlens",)

    def forward(self, hidden, weight, completion_ids, advantages=None, **per_call):
        return super().forward(hidden, weight, completion_ids, advantages, **per_call)


@torch.no_grad()
def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    mask: Optional[torch.Tensor] = None,
):
    """Per-token log-probs (B, T) float32 of ``completion_ids`` under the LM head, chunk by chunk.

    No gradient: this is for the old-policy and reference log-probs. hidden (B, T, H), weight (V, H),
    bias (V,) | None as in ``fused_linear_grpo_loss``; with ``return_entropy=True`` also returns the
    per-token entropy (B, T) float32.

    ``temperature``: a float, or a (B, T) / (B,) tensor (one τ per token / per sequence; computed by
    ``grpo_fast.fused_linear_logprobs``' chunk loop). ``mask``: None or (B, T) bool / integer /
    floating, nonzero = valid: only the valid tokens' hidden states are multiplied (the completion mask
    of a padded batch: the padding costs no matmul), a masked token's outputs are 0 (as
    ``grpo_fast.fused_linear_logprobs``' mask).

    Example:
        >>> ref_logp = grpo_fast.fused_linear_token_logprobs(ref_hidden, ref_model.lm_head.weight, completion_ids)
    """
    backend = check_backend(backend)
    if torch.compiler.is_compiling():  # fused_linear_logprobs' forward op (grpo_fast/_ops.py)
        from . import _ops

        _check_linear(hidden, weight, bias, mixed_ok=_compute_dtype(hidden)[1])  # (B, T, H) here, as below
        logp, entropy = _ops.compiled_fused_linear_logprobs(hidden, weight, completion_ids, bias, temperature,
                                                            logit_scale, logit_softcap, return_entropy, chunk_size,
                                                            None, backend, None, None, mask)
        return (logp, entropy) if return_entropy else logp
    if (isinstance(temperature, torch.Tensor) and temperature.dim() > 0) or mask is not None:
        # one τ per token, or valid rows only: fused_linear_logprobs' chunk loop (here without a graph)
        from .logprobs import fused_linear_logprobs

        _check_linear(hidden, weight, bias, mixed_ok=_compute_dtype(hidden)[1])  # (B, T, H) here, as below
        logp, entropy = fused_linear_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature,
                                              logit_scale=logit_scale, logit_softcap=logit_softcap,
                                              return_entropy=return_entropy, mask=mask, chunk_size=chunk_size,
                                              backend=backend)
        return (logp, entropy) if return_entropy else logp
    cdtype, autocast = _compute_dtype(hidden)
    B, T, H, V = _check_linear(hidden, weight, bias, mixed_ok=autocast)
    scale, cap = _check_transform(logit_scale, logit_softcap, temperature)
    chunk = _check_chunk_size(chunk_size)
    ids = check_ids(completion_ids, B, T, V, hidden.device)
    temperature = check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    impl = _backends.resolve(backend, hidden.device)
    transform = _Transform(scale, cap)
    N = B * T
    if chunk is None:
        chunk = _auto_chunk(N, V, torch.empty((), dtype=cdtype).element_size(), 1, impl.autograd)
    hidden2d = hidden.reshape(N, H)
    weight, bias = _cast(weight, cdtype), _cast(bias, cdtype)
    ids = ids.view(N)
    tau_k = transform.kernel_temperature(temperature)
    buf = torch.empty((min(chunk, N), V), dtype=cdtype, device=hidden.device)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(N, dtype=torch.float32, device=hidden.device) if return_entropy else None
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes explicit (cdtype) from here on
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = transform.forward_(_matmul_chunk(_cast(hidden2d[s:e], cdtype), weight, bias, buf[:e - s]))
            lp, ent = impl.token_logprobs(z.view(1, e - s, V), ids[s:e].view(1, -1), tau_k, return_entropy)
            logp[s:e] = lp.reshape(-1)
            if return_entropy:
                entropy[s:e] = ent.reshape(-1)
    logp = logp.view(B, T)
    return (logp, entropy.view(B, T)) if return_entropy else logp
