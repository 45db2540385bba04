"""The gradient correction of a fused loss's backward, decided on the device (no host sync).

The fused kernels write the gradient for grad_output = loss_scale in the forward pass; backward must
multiply it by grad_output / loss_scale, which is almost always exactly 1 once the trainer passes its
scale. Reading that factor on the host would stall the stream every step, so every program reads it
itself and, when it is 1, masks off all its lanes: no byte of the gradient is loaded or stored. The
launcher is ``grpo_fast._autograd.scale_unless_one_``.
"""
import triton
import triton.language as tl

from .grpo import _round_to


@triton.jit
def _scale_unless_one_kernel(x_ptr, factor_ptr, T, V, stride_b, stride_t, n_vblocks, BLOCK: tl.constexpr,
                             SOFT_BF16: tl.constexpr):
    """x[b, t, v] *= factor (float32, rounded once to x's dtype) unless factor == 1.

    One program per (row, block of BLOCK columns) on grid axis 0: row = b·T + t of a (B, T, V) view
    with unit stride along V (a contiguous tensor is passed as (1, 1, numel)). SOFT_BF16: round to
    nearest in software (Triton's interpreter truncates; see grpo.py's _round_to)."""
    f = tl.load(factor_ptr)
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_vblocks
    offs = (pid % n_vblocks) * BLOCK + tl.arange(0, BLOCK)
    m = offs < tl.where(f == 1.0, 0, V)  # factor 1: every lane masked off, nothing loaded or stored
    ptr = x_ptr + (row // T) * stride_b + (row % T) * stride_t + offs
    x = tl.load(ptr, mask=m, other=0.0)
    tl.store(ptr, _round_to(x.to(tl.float32) * f, x_ptr.dtype.element_ty, SOFT_BF16), mask=m)
