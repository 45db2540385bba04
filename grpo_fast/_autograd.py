"""The autograd contract shared by the fused Functions (api._FusedGRPOLoss, fused_linear._FusedLinearGRPOLoss,
the custom op's formula in _ops.py): what a backward may hand out, and what happens on a second one.

The fused kernels produce the gradient in the forward pass; backward only scales it by grad_output. To
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

from typing import Optional

import torch

_keep_graph = getattr(getattr(torch._C, "_autograd", None), "_get_current_graph_task_keep_graph", None)


def graph_kept() -> Optional[bool]:
    """Whether the running backward keeps the graph (retain_graph / create_graph); None if torch cannot tell.

    The engine's own flag, as AOTAutograd reads it for its saved tensors (torch/_functorch/_aot_autograd).
    """
    return None if _keep_graph is None else bool(_keep_graph())


def scaled(grad: torch.Tensor, scale: Optional[torch.Tensor], keep: bool) -> torch.Tensor:
    """``grad · scale`` (scale None: 1) as a tensor autograd may own: in place on ``grad`` when it is not
    used again (``keep`` False), else a copy. Both round the same way (one multiply in the same kernel)."""
    if keep:
        return grad.clone() if scale is None else torch.mul(grad, scale)
    if scale is not None:
        grad.mul_(scale)
    # A fresh tensor object over the same storage: AccumulateGrad may then adopt it as .grad instead of
    # cloning it (it clones a tensor that other references still hold).
    return grad.detach()


def scale_factor(grad_output: torch.Tensor) -> Optional[torch.Tensor]:
    """None when grad_output is exactly 1 (no pass over the gradient), else a float32 0-dim factor:
    applied in float32 and rounded once, even to a bf16 gradient."""
    if bool(grad_output == 1):
        return None
    return grad_output.detach().to(torch.float32)


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
