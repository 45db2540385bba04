"""Shared test helpers: the dtype tolerance table, assertions that say where a mismatch is, random
GRPO inputs, and runners for a backend and for the float64 oracle.

Accuracy rule (STYLE.md, after flash-attention):
  * fp32 logits: the backend must match the float64 oracle (``grpo_loss_reference`` on
    ``logits.double()``) to ``rtol`` with an ``atol`` scaled to the size of the compared values.
  * bf16 / fp16 logits: the oracle evaluates the same rounded logits in float64; the backend's error
    may be at most twice the error of the eager reference run at that precision
    (``grpo_loss(..., backend="torch")`` on the bf16/fp16 logits) plus a small floor ``atol``/``rtol``.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

import grpo_fast
from grpo_fast.reference import grpo_loss_reference

# (dtype, atol, rtol): fp32 — the bar against the float64 oracle (atol relative to max|oracle|);
# bf16/fp16 — the floor added to twice the eager reference's own error at that precision.
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-5, 1e-5, id="bf16"),
    pytest.param(torch.float16, 1e-5, 1e-5, id="fp16"),
]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def assert_close(got, want, atol: float, rtol: float, what: str = "") -> None:
    """|got − want| <= atol + rtol·|want| elementwise (NaN only where both are NaN, equal infs pass).

    On failure the message says how many elements fail and where the worst one is, with both values.
    """
    got = torch.as_tensor(got).detach().double().cpu()
    want = torch.as_tensor(want).detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    ok = err <= atol + rtol * want.abs()
    ok |= torch.isnan(got) & torch.isnan(want)
    ok |= torch.isinf(got) & (got == want)
    if not bool(ok.all()):
        bad = ~ok
        score = torch.where(bad, torch.nan_to_num(err, nan=float("inf")), torch.zeros_like(err))
        i = int(score.flatten().argmax())
        where = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} mismatches (atol {atol:.3g}, rtol {rtol:.3g}); worst at "
            f"index {where}: got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}, "
            f"|diff| {err.flatten()[i].item():.3g}"
        )


def assert_close_scaled(got, want, rtol: float, what: str = "", atol_scale: Optional[float] = None) -> None:
    """assert_close with atol = (atol_scale or rtol)·max|want|: for tensors whose small entries only
    carry absolute accuracy (gradients: most p_j are tiny next to the target entry)."""
    want_t = torch.as_tensor(want).detach().double()
    scale = float(want_t[torch.isfinite(want_t)].abs().max()) if bool(torch.isfinite(want_t).any()) else 1.0
    assert_close(got, want, (atol_scale if atol_scale is not None else rtol) * max(scale, 1e-30), rtol, what)


def assert_error_within(got, lowp, oracle, atol: float, rtol: float, what: str = "", factor: float = 2.0) -> None:
    """Low-precision rule: max|got − oracle| <= factor·max|lowp − oracle| + atol + rtol·max|oracle|.

    ``lowp`` is the eager reference run at the same precision as ``got``.
    """
    got = torch.as_tensor(got).detach().double().cpu()
    lowp = torch.as_tensor(lowp).detach().double().cpu()
    oracle = torch.as_tensor(oracle).detach().double().cpu()
    assert got.shape == oracle.shape == lowp.shape, f"{what}: shapes {tuple(got.shape)}, {tuple(lowp.shape)}, {tuple(oracle.shape)}"
    err = (got - oracle).abs()
    err_ref = float((lowp - oracle).abs().max()) if oracle.numel() else 0.0
    bound = factor * err_ref + atol + rtol * (float(oracle.abs().max()) if oracle.numel() else 0.0)
    if not bool(torch.isfinite(got).eq(torch.isfinite(oracle)).all()) or float(err.max()) > bound:
        i = int(torch.nan_to_num(err, nan=float("inf")).flatten().argmax())
        where = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{what}: max error {float(err.max()):.3g} > bound {bound:.3g} (= {factor}·{err_ref:.3g} of the "
            f"eager reference at this precision + floor); worst at index {where}: got {got.flatten()[i].item()!r}, "
            f"oracle {oracle.flatten()[i].item()!r}, eager {lowp.flatten()[i].item()!r}"
        )


# ---- inputs ------------------------------------------------------------------------------------------
def make_inputs(B: int, T: int, V: int, dtype=torch.float32, *, seed: int = 0, scale: float = 2.0,
                banned: bool = True, masked_row: bool = True, spread: float = 0.2) -> dict:
    """Random GRPO inputs (never zeros): logits (B, T, V) of ``dtype``, ids, completion_mask with
    ragged lengths (and row 1 fully masked when ``masked_row`` and B > 1), old/ref log-probs near the
    policy's own (so that ratios straddle the clip range), advantages (B,) and rewards (B,).

    ``banned``: a few vocabulary entries per row are −inf (never at the target id).
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * scale
    ids = torch.randint(0, V, (B, T), generator=g)
    if banned and V > 2:
        n_ban = max(1, V // 10)
        ban = torch.randint(0, V, (B, T, n_ban), generator=g)
        ban = torch.where(ban == ids.unsqueeze(-1), (ban + 1) % V, ban)  # never the target
        logits.scatter_(-1, ban, float("-inf"))
    logits = logits.to(dtype)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    if masked_row and B > 1:
        mask[1] = 0.0
    with torch.no_grad():
        x = logits.double()
        logp = (x.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, -1)).float()
    old = logp + spread * torch.randn(B, T, generator=g)
    ref = logp + 0.5 * spread * torch.randn(B, T, generator=g)
    return dict(
        logits=logits, ids=ids, completion_mask=mask, old_logp=old, ref_logp=ref,
        advantages=torch.randn(B, generator=g), rewards=torch.rand(B, generator=g),
    )


# ---- runners -----------------------------------------------------------------------------------------
def run_backend(logits, ids, backend: str, *, inplace: bool = False, grad_scale: float = 1.0, **kw):
    """grpo_loss on a fresh copy of ``logits`` + backward of ``loss·grad_scale``: (loss, metrics, grad)."""
    z = logits.detach().clone().requires_grad_()
    loss, metrics = grpo_fast.grpo_loss(z, ids, backend=backend, inplace=inplace, **kw)
    (loss * grad_scale).backward() if grad_scale != 1.0 else loss.backward()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, z.grad


def run_oracle(logits, ids, *, grad_scale: float = 1.0, **kw):
    """The float64 reference on the same (rounded) logits: (loss, metrics, grad), all float64."""
    z = logits.detach().double().requires_grad_()
    loss, metrics = grpo_loss_reference(z, ids, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), {k: v.detach().double() for k, v in metrics.items()}, z.grad
