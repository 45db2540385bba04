"""The CUDA C++ backend: grpo_fast._C_cuda (csrc/cuda), hand-written kernels taking raw pointers.

One thread block per token row: 16-byte loads, online logsumexp (warp shuffles, then shared
memory), fp32 math for fp32/bf16/fp16 logits, and the gradient written in the same kernel while the
row is in L2. The per-token GRPO math is csrc/common/grpo_math.h, shared with the CPU backend.
The extension is built by setup.py when nvcc is found (GRPO_FAST_CUDA=auto|0|1) and links the CUDA
runtime statically; it takes the stream from ``torch.cuda.current_stream()``, so it orders with
torch's own work like any torch op.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._config import KernelConfig
from . import _native

DEVICE_TYPES = ("cuda",)

try:
    from .. import _C_cuda
    _IMPORT_ERROR = None
except ImportError as e:  # not built: no nvcc at install time, or GRPO_FAST_CUDA=0
    _C_cuda = None
    _IMPORT_ERROR = e

def unavailable_reason() -> Optional[str]:
    """None when the CUDA backend can run, else why not and how to fix it."""
    if _C_cuda is None:
        return (f"the CUDA extension grpo_fast._C_cuda is not built ({_IMPORT_ERROR}); build it with nvcc on "
                "PATH or CUDA_HOME set: `GRPO_FAST_CUDA=1 pip install .` (or `python setup.py build_ext --inplace`)")
    if not torch.cuda.is_available():
        return ("no CUDA device is available (torch.cuda.is_available() is False): the cuda backend needs CUDA "
                "tensors on an NVIDIA GPU with a CUDA build of torch")
    return None


def _device_and_stream(t: torch.Tensor):
    dev = t.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(dev).cuda_stream


def fused_loss(inp, grad: Optional[torch.Tensor]):
    """The fused pass (see the backend interface in grpo_fast/backends/__init__.py).

    Args:
        inp: validation.LossInputs with (B, T, V) CUDA logits, stride(-1) == 1.
        grad: None, or (B, T, V) in the logits' dtype (may be inp.logits itself: inplace).
    Returns:
        stats: (NUM_STATS,) float32 sums; logp: (B, T) float32.
    """
    with torch.cuda.device(inp.logits.device):
        return fused_loss_with(_C_cuda, inp, grad, *_device_and_stream(inp.logits))


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool, mask=None):
    """(logp (B, T) float32, entropy (B, T) float32 or None) without gradient; ids (B, T) integer."""
    with torch.cuda.device(logits.device):
        return token_logprobs_with(_C_cuda, logits, ids, temperature, return_entropy, *_device_and_stream(logits),
                                   mask=mask)


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, temperature, return_entropy: bool, mask=None):
    """Forward of grpo_fast.logprobs: (logp, entropy | None, lse): (B, T) float32, lse (B, T, 2) float32 in
    two parts (see grpo_fast/logprobs.py)."""
    with torch.cuda.device(logits.device):
        return logprobs_forward_with(_C_cuda, logits, ids, temperature, return_entropy, *_device_and_stream(logits),
                                     mask=mask)


def logprobs_backward(logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad) -> None:
    """Backward of grpo_fast.logprobs: grad (B, T, V) ← (g_logp·(onehot − p) − g_entropy·p·(log p + H))/τ."""
    with torch.cuda.device(logits.device):
        logprobs_backward_with(_C_cuda, logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad,
                               *_device_and_stream(logits))


# The calls themselves, with the extension module, device index and stream given explicitly (the
# tests run them on the host-emulation build of the same kernels too); the keywords are _native's,
# the same as the CPU extension's.


def logprobs_forward_with(ext, logits, ids, temperature, return_entropy: bool, device: int, stream: int, mask=None):
    return _native.logprobs_forward(ext, logits, ids, temperature, return_entropy, mask, device=device, stream=stream)


def logprobs_backward_with(ext, logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad,
                           device: int, stream: int) -> None:
    _native.logprobs_backward(ext, logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad,
                              device=device, stream=stream)


def fused_loss_with(ext, inp, grad: Optional[torch.Tensor], device: int, stream: int):
    B, T, _ = inp.logits.shape
    n_scratch = ext.fused_scratch_floats(B, T, inp.cfg.level, inp.rewards is not None, grad is not None)
    scratch = torch.empty((n_scratch,), dtype=torch.float32, device=inp.logits.device)
    return _native.fused_loss(ext, inp, grad, scratch=scratch.data_ptr(), scratch_floats=n_scratch, device=device,
                              stream=stream)


def token_logprobs_with(ext, logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool,
                        device: int, stream: int, mask=None):
    return _native.token_logprobs(ext, logits, ids, temperature, return_entropy, mask, device=device, stream=stream)


def token_terms(cfg: KernelConfig, logp, ref, adv, isr, ratio, *, on_device: bool, ext=None) -> torch.Tensor:
    """grpo_math.h token_terms() as compiled by nvcc, on 1-D float32 tensors of equal length n.

    on_device=False runs the header's host side (CPU tensors), True its device side (CUDA tensors).
    Returns (n, 7) float32: loss, kl, d_logp, d_ratio, clip_low, clip_high, cispo_clip.
    """
    ext = ext or _C_cuda
    ts = [t.detach().to(torch.float32).contiguous() for t in (logp, ref, adv, isr, ratio)]
    n = ts[0].numel()
    dev = ts[0].device
    out = torch.empty((n, ext.TERM_COLUMNS), dtype=torch.float32, device=dev)
    device, stream = _device_and_stream(ts[0]) if on_device else (0, 0)
    ext.token_terms(
        **_native.params_kwargs(cfg), n=n, logp=ts[0].data_ptr(), ref=ts[1].data_ptr(), adv=ts[2].data_ptr(),
        isr=ts[3].data_ptr(), ratio=ts[4].data_ptr(), out=out.data_ptr(), on_device=on_device,
        device=device, stream=stream,
    )
    return out
