"""The autograd contract shared by the fused Functions (api._FusedGRPOLoss, fused_linear._FusedLinearGRPOLoss,
the custom op's formula in _ops.py): what a backward may hand out, and what happens on a second one.

The fused kernels produce the gradient in the forward pass, for grad_output = ``loss_scale`` (the factor the
caller multiplies the loss by; 1 by default); backward only scales it by grad_output / loss_scale, and
moves no data when that is 1 (check_loss_scale, grad_factor, scaled). To
avoid a second (B, T, V) buffer the first backward hands the buffer itself to autograd, which may adopt
it as ``.grad`` and later accumulate into it in place. A buffer handed out can therefore never be used
again. So each backward asks the engine whether the graph is kept (``retain_graph=True`` or
``create_graph=True``: this node may run again):

* not kept: the last use. The buffer is scaled in place and handed out, then released (no copy);
* kept: a scaled copy is handed out and the buffer stays as it is for the next backward, exactly
  eager's result each time, at the cost of one gradient-sized allocation per retained backward (eager
  keeps its whole graph too).

Second order is not implemented: the kernels give no graph for their gradient. Instead of a gradient
silently detached from the graph, a backward with ``create_graph=True`` raises, saying what to use.
(``torch.autograd.function.once_differentiable`` is not enough: it returns the gradient detached when
grad_output does not require grad, the usual gradient-penalty case, and its message does not say what
to use instead.)
"""
from __future__ import annotations

import os
import struct
from typing import Optional

import torch

_keep_graph = getattr(getattr(torch._C, "_autograd", None), "_get_current_graph_task_keep_graph", None)


def graph_kept() -> Optional[bool]:
    """Whether the running backward keeps the graph (retain_graph / create_graph); None if torch cannot tell.

    The engine's own flag, as AOTAutograd reads it for its saved tensors (torch/_functorch/_aot_autograd).
    """
    return None if _keep_graph is None else bool(_keep_graph())


def check_loss_scale(loss_scale) -> float:
    """``loss_scale`` of the fused losses: the factor the caller multiplies the returned loss by before
    backward (TRL's 1/gradient_accumulation_steps, a DDP world size). A real number, nonzero and a normal
    float32; returned rounded to float32, the precision of the weights it multiplies and of a float32
    grad_output, so that ``loss * loss_scale`` gives a grad_output exactly equal to it."""
    from .validation import float32_option

    s = float32_option("loss_scale", loss_scale)
    if s == 0:
        raise ValueError("loss_scale must be nonzero (the factor the returned loss is multiplied by before "
                         "backward; the gradient is computed for it in the forward pass), got 0.0")
    return struct.unpack("f", struct.pack("f", s))[0]


def fold_scale(inp, loss_scale: float) -> None:
    """Let the kernels write the gradient of ``loss_scale · loss``: the scale enters through the per-token
    aggregation weight (loss = Σ weight·L), so it costs no pass over the (B, T, V) gradient. The kernels
    then report ``loss_scale · loss``: the caller divides it back (unscaled_loss)."""
    if loss_scale != 1.0:
        inp.weight = inp.weight * loss_scale
        if inp.entropy_weight is not None:  # the entropy bonus is part of the loss too
            inp.entropy_weight = inp.entropy_weight * loss_scale


def unscaled_loss(loss_sum: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """The loss from the kernels' Σ (loss_scale·weight)·L: equal to the unscaled Σ weight·L up to float32
    rounding (a few ulp; exact when loss_scale is a power of two)."""
    return loss_sum.clone() if loss_scale == 1.0 else loss_sum / loss_scale


def grad_factor(grad_output: torch.Tensor, loss_scale: float = 1.0):
    """What a gradient computed for grad_output == ``loss_scale`` is multiplied by: grad_output / loss_scale
    as a float32 0-dim tensor on grad_output's device, or None when it is exactly 1 and known to be so
    without a device sync (a CPU grad_output; reading it is free). On an accelerator the factor stays on
    the device and ``scaled`` applies it with a kernel that does nothing when it is 1 (no host sync)."""
    factor = grad_output.detach().to(torch.float32) / loss_scale
    if factor.device.type == "cpu" and bool(factor == 1):
        return None
    return factor


def scaled(grad: torch.Tensor, factor: Optional[torch.Tensor], keep: bool) -> torch.Tensor:
    """``grad · factor`` (factor None: 1) as a tensor autograd may own: in place on ``grad`` when it is not
    used again (``keep`` False), else a copy. Both round the same way (one float32 multiply per element,
    rounded once to the gradient's dtype)."""
    if keep:
        return grad.clone() if factor is None else torch.mul(grad, factor)
    if factor is not None:
        if factor.device.type == "cpu":
            grad.mul_(factor)
        else:
            scale_unless_one_(grad, factor)
    # A fresh tensor object over the same storage: AccumulateGrad may then adopt it as .grad instead of
    # cloning it (it clones a tensor that other references still hold).
    return grad.detach()


def scale_unless_one_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` in place, decided on the device: with Triton, every program of
    grpo_fast/kernels/scale.py reads the factor and moves no data when it is 1 (the usual case once
    the trainer's scale is passed as loss_scale); without Triton, ``grad.mul_(factor)`` (a full pass,
    still no host sync)."""
    launch = _scale_launcher()
    if launch is None or grad.dim() not in (1, 2, 3) or grad.stride(-1) != 1 or grad.numel() == 0:
        grad.mul_(factor)
        return
    launch(grad, factor)


_SCALE_BLOCK = 2048
_SCALE_KERNEL = []  # [the Triton kernel, or None without Triton], loaded on first use


def _scale_launcher():
    if not _SCALE_KERNEL:
        try:
            from .kernels.scale import _scale_unless_one_kernel as kernel
        except ImportError:  # no Triton
            kernel = None
        _SCALE_KERNEL.append(kernel)
    kernel = _SCALE_KERNEL[0]
    if kernel is None:
        return None
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

    def launch(grad: torch.Tensor, factor: torch.Tensor) -> None:
        x = grad.view(1, 1, -1) if grad.is_contiguous() else grad.view((1,) * (3 - grad.dim()) + tuple(grad.shape))
        B, T, V = x.shape
        n_vblocks = -(-V // _SCALE_BLOCK)
        kernel[(B * T * n_vblocks,)](x, factor.reshape(1), T, V, x.stride(0), x.stride(1), n_vblocks,
                                     BLOCK=_SCALE_BLOCK, SOFT_BF16=interpret)

    return launch


def twice_error(name: str, hint: str) -> RuntimeError:
    """The error of a backward through a loss whose gradient an earlier backward already handed out."""
    if _keep_graph is None:
        return RuntimeError(
            f"{name}: backward ran twice through the same loss; this torch {torch.__version__} cannot tell a "
            f"backward whether the graph is kept, so the first one handed the precomputed gradient to autograd. "
            f"{hint[:1].upper()}{hint[1:]}, or use a newer torch")
    return RuntimeError(
        f"{name}: backward ran twice through the same loss, but the first backward did not keep the graph (its "
        f"precomputed gradient was handed to autograd). Pass retain_graph=True to every backward but the last, "
        f"as with any PyTorch graph, or {hint}")


def check_first_order(message: str) -> None:
    """Raise ``message`` in a backward run with create_graph=True (grad mode is on only then).

    Raised at once rather than from a node on the returned gradient (as once_differentiable does): such a
    node cannot link the gradient to the inputs of the forward, so ``autograd.grad(penalty, logits,
    allow_unused=True)`` would return None instead of failing."""
    if torch.is_grad_enabled():
        raise RuntimeError(message)


def second_order_message(name: str, hint: str) -> str:
    return (f"{name}: second-order gradients are not implemented (backward with create_graph=True: gradient "
            f"penalties, Hessian-vector products). The fused kernels produce the gradient without a graph of "
            f"their own; {hint}")
