"""grpo_fast: fused GRPO loss kernels (CPU C++, Triton, CUDA) with an eager PyTorch reference.

    loss, metrics = grpo_fast.grpo_loss(logits, completion_ids, rewards=rewards, group_size=8)

See docs/spec.md for the math; ``grpo_fast.reference`` is that math in eager PyTorch.
"""
from .api import GRPOLoss, group_advantages, grpo_loss, token_logprobs
from .backends import describe_backends
from .fused_linear import FusedLinearGRPOLoss, fused_linear_grpo_loss, fused_linear_token_logprobs
from .logprobs import fused_linear_logprobs, logprobs
from .options import GRPOOptions
from .validation import set_value_checks

__version__ = "0.1.0"

__all__ = ["grpo_loss", "GRPOLoss", "group_advantages", "token_logprobs", "describe_backends",
           "fused_linear_grpo_loss", "FusedLinearGRPOLoss", "fused_linear_token_logprobs", "logprobs",
           "fused_linear_logprobs", "GRPOOptions", "set_value_checks", "__version__"]
