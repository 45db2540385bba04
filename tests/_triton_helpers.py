"""Assertion helper and tolerance table for the Triton tests (tests/helpers.py did not exist yet).

Tolerances: the backend computes in float32 whatever the logits' dtype, so loss and metrics are
held to float32 accuracy against the float64 reference evaluated on the *same* (rounded) logits;
the gradient is returned in the logits' dtype, so its bar is that dtype's rounding.
"""
import torch

# dtype -> (atol, rtol) of the gradient, which is returned in the logits' dtype.
GRAD_TOL = {
    torch.float32: (1e-6, 1e-4),
    torch.bfloat16: (1e-4, 1.6e-2),  # bf16 keeps 8 bits: one rounding is up to 2^-8 relative
    torch.float16: (1e-5, 2e-3),  # fp16 keeps 11 bits (and subnormals below 6e-5)
}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# loss and metrics: float32 math on every dtype
LOSS_ATOL, LOSS_RTOL = 2e-6, 2e-5


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """|got − want| <= atol + rtol·|want| elementwise; on failure, say how many and where the worst is."""
    got = torch.as_tensor(got).detach().double().cpu()
    want = torch.as_tensor(want).detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    both_nan = torch.isnan(got) & torch.isnan(want)
    err = (got - want).abs()
    bad = ~both_nan & ~(err <= atol + rtol * want.abs())  # NaN in only one of them is a mismatch
    bad &= ~(torch.isinf(got) & (got == want))
    if bad.any():
        score = torch.where(bad, torch.nan_to_num(err, nan=float("inf")), torch.zeros_like(err))
        i = int(score.flatten().argmax())
        where = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} mismatches (atol {atol:g}, rtol {rtol:g}); worst at {where}: "
            f"got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}, |diff| {err.flatten()[i].item():.3g}"
        )
