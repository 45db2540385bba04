"""Triton kernels of grpo_fast (``grpo_fast.kernels``).

Only ``@triton.jit`` code lives here; the launchers, the pinned launch configurations and the torch side are in
``grpo_fast/backends/triton_backend.py``. Importing this package needs Triton.
"""
from .grpo import (  # noqa: F401
    _grpo_grad_kernel,
    _grpo_seq_row_kernel,
    _grpo_token_fwd_kernel,
    _logprobs_bwd_kernel,
    _logprobs_fwd_kernel,
    _token_logprobs_kernel,
)

KERNELS = ("_token_logprobs_kernel", "_grpo_token_fwd_kernel", "_grpo_seq_row_kernel", "_grpo_grad_kernel",
           "_logprobs_fwd_kernel", "_logprobs_bwd_kernel")
