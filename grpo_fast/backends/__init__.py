"""Backend registry and dispatch.

A kernel backend is a module with:

    unavailable_reason() -> Optional[str]    None when usable; else why not and how to get it
    DEVICE_TYPES: tuple[str, ...]            the tensor device types it runs on ("cpu", "cuda")
    fused_loss(inp: LossInputs, grad: Optional[Tensor]) -> (stats, logp)
        One fused pass over inp.logits (B, T, V) (stride(-1) == 1, B/T strides arbitrary).
        Inputs (validation.py: LossInputs): ids (B,T) int64, mask (B,T) f32, weight (B,T) f32 — the
        aggregation weight, loss = Σ weight·L —, advantages (B,)|(B,T) f32 or rewards (B,) f32 with
        cfg.group_size (advantage computed in the kernel), old/ref (B,T) f32 or None, isr (B,)|(B,T)
        f32 or None, cfg: KernelConfig (integer codes of csrc/common/grpo_math.h). All contiguous.
        stats: float32 tensor (NUM_STATS,) of SUMS laid out as _config.STAT_* (grpo_math.h, enum
               Stat): [Σ w·loss (the loss itself), Σ m·entropy, Σ m·kl, #clip_low, #clip_high,
               #clip_region, #cispo_clip, 0]. Flags count valid tokens, or rows at sequence level
               with a per-row advantage. api.metrics_from_sums divides.
        logp:  float32 (B, T), the per-token log-probs at inp.cfg.temperature.
        grad:  None, or a (B, T, V) tensor of the logits' dtype (stride(-1) == 1, possibly the logits
               themselves for inplace=True) that receives ∂loss/∂logits for grad_output = 1.
    token_logprobs(logits, ids, temperature, return_entropy) -> (logp (B,T) f32, entropy (B,T) f32 | None)
    logprobs_forward(logits, ids, temperature, return_entropy) -> (logp, entropy | None, lse (B,T,2) f32)
    logprobs_backward(logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad) -> None
        The differentiable log-probs of grpo_fast/logprobs.py (see its docstring): lse is kept in two
        parts (shift = max x, log Σ exp(x − shift)) and backward forms log p = (x − shift) − log_d.

"torch" is the eager reference and goes through autograd instead (see grpo_fast/api.py).
Importing a backend never fails: a missing compiled extension or Triton only makes it unavailable.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

# Preference order of "auto" per device type: fastest first.
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
_MODULES = {"cpu": "cpu", "triton": "triton_backend", "cuda": "cuda"}


def _load(name: str):
    try:
        return importlib.import_module(f"{__name__}.{_MODULES[name]}")
    except ImportError as e:  # the module is not written for this build, or a dependency is absent
        return e


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """None when ``name`` can run on ``device``, else a sentence saying why not and how to fix it."""
    if name == "torch":
        return None
    mod = _load(name)
    if isinstance(mod, ImportError):
        return f"the {name} backend could not be imported ({mod})"
    reason = mod.unavailable_reason()
    if reason is None and device is not None and device.type not in mod.DEVICE_TYPES:
        reason = f"the {name} backend runs on {'/'.join(mod.DEVICE_TYPES)} tensors, got tensors on {device}"
    return reason


def describe_backends() -> str:
    lines = ["backends:"]
    for name in ("cpu", "triton", "cuda", "torch"):
        why = unavailable_reason(name)
        lines.append(f"  {name:7s} " + ("available" if why is None else f"unavailable: {why}"))
    return "\n".join(lines)


def resolve_name(name: str, device_type: str) -> str:
    """The concrete backend name ``name`` stands for on this device type ("torch" = the reference).

    Plain strings in and out, so torch.compile can evaluate it once at trace time (api.py wraps it
    in ``assume_constant_result``); raises like ``resolve`` for an unavailable explicit backend.
    """
    mod = resolve(name, torch.device(device_type))
    return "torch" if mod is None else next(k for k, v in _MODULES.items() if mod.__name__.endswith("." + v))


def resolve(name: str, device: torch.device):
    """The backend module to use (None means the eager "torch" reference)."""
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("torch",)):
            if unavailable_reason(cand, device) is None:
                return None if cand == "torch" else _load(cand)
        return None
    if name == "torch":
        return None
    why = unavailable_reason(name, device)
    if why is not None:
        raise RuntimeError(f'backend="{name}" is not available: {why}')
    return _load(name)
