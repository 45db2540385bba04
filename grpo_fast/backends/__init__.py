"""The backends: one ``Backend`` record per backend, in a small registry, and their dispatch.

    grpo_fast.backends.get("cpu")                  -> Backend (ValueError for an unknown name)
    grpo_fast.backends.available(device)           -> the Backends that can run on ``device``
    grpo_fast.backends.resolve("auto", device)     -> the Backend to use (RuntimeError, saying why,
                                                      for an explicit backend that cannot run there)
    grpo_fast.backends.resolve_name(name, "cuda")  -> its name (strings only: torch.compile folds it)
    grpo_fast.describe_backends()                  -> the table ``grpo-fast info`` prints

"auto" takes the first available backend of ``AUTO_ORDER[device.type]`` (fastest first; "torch" for
any other device type). Every backend, the eager reference included, is a module of this package
(``Backend.module``, imported on first use) with:

    unavailable_reason() -> Optional[str]    None when usable; else why not and how to get it
    DEVICE_TYPES: tuple[str, ...] | None     the tensor device types it runs on ("cpu", "cuda"); None: any
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

    empty_grad(shape, dtype) -> Tensor       optional: a (B, T, V) gradient buffer of its choosing
                                             (the CPU backend's huge-page one); default torch.empty

What differs between backends is one attribute, ``Backend.autograd``:

* False (cpu, triton, cuda): the kernels compute the gradient in the forward pass (fused_loss's
  ``grad``, logprobs_backward) and the public functions wrap them in autograd Functions that are
  differentiable once (a create_graph backward raises).
* True ("torch", grpo_fast/backends/torch_backend.py): the eager reference, differentiated by torch
  autograd. ``grpo_loss``, ``token_logprobs`` and ``grpo_fast.logprobs`` call the reference itself
  (so create_graph / double backward works, and a masked row never reaches a softmax); the
  fused-linear chunk loops call its entry points on one chunk at a time like any backend.

Importing a backend never fails: a missing compiled extension or Triton only makes it unavailable
(``Backend.unavailable_reason``). Adding a backend: its module here, one ``Backend`` in
``REGISTRY``, its place in ``AUTO_ORDER``, its name in ``_config.BACKENDS`` (CONTRIBUTING.md).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional, Tuple, Union

import torch

# The entry points every backend module provides (the contract above).
ENTRY_POINTS = ("fused_loss", "token_logprobs", "logprobs_forward", "logprobs_backward")


class Backend:
    """One backend: its name, its kernels (a module, imported on first use) and how it is differentiated.

    ``module``: the module's name in this package (``"cpu"`` for grpo_fast.backends.cpu), or the
    module-like object itself (tests install the host-emulated CUDA kernels so).
    ``autograd``: see the module docstring (True only for the eager reference, "torch").
    The entry points are looked up on the module at each call, so patching the module works.
    """

    def __init__(self, name: str, module: Union[str, object], *, autograd: bool = False):
        self.name = name
        self.autograd = autograd
        self._module = module
        self._loaded: Optional[Union[ModuleType, object, ImportError]] = None if isinstance(module, str) else module

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, autograd={self.autograd})"

    def _kernels(self):
        """The module, or the ImportError that kept it from loading (the module is not written for
        this build, or a dependency is absent)."""
        if self._loaded is None:
            try:
                self._loaded = importlib.import_module(f"{__name__}.{self._module}")
            except ImportError as e:
                self._loaded = e
        return self._loaded

    @property
    def device_types(self) -> Optional[Tuple[str, ...]]:
        """The tensor device types it runs on (None: any; () when it cannot be imported)."""
        mod = self._kernels()
        return () if isinstance(mod, ImportError) else mod.DEVICE_TYPES

    def unavailable_reason(self, device: Optional[torch.device] = None) -> Optional[str]:
        """None when it can run (on ``device``, if given), else a sentence saying why not and how to fix it."""
        mod = self._kernels()
        if isinstance(mod, ImportError):
            return f"the {self.name} backend could not be imported ({mod})"
        reason = mod.unavailable_reason()
        if reason is None:
            missing = [f for f in ENTRY_POINTS if not hasattr(mod, f)]
            if missing:
                reason = f"the {self.name} backend lacks the kernel entry points {missing} in this build"
        types = mod.DEVICE_TYPES
        if reason is None and device is not None and types is not None and device.type not in types:
            reason = f"the {self.name} backend runs on {'/'.join(types)} tensors, got tensors on {device}"
        return reason

    # ---- the kernel entry points (the contract in the module docstring) ----------------------------

    def fused_loss(self, inp, grad: Optional[torch.Tensor]):
        return self._kernels().fused_loss(inp, grad)

    def token_logprobs(self, logits, ids, temperature, return_entropy: bool, mask=None):
        if mask is None:
            return self._kernels().token_logprobs(logits, ids, temperature, return_entropy)
        return self._kernels().token_logprobs(logits, ids, temperature, return_entropy, mask=mask)

    def logprobs_forward(self, logits, ids, temperature, return_entropy: bool, mask=None):
        if mask is None:  # kernels installed by tests (REGISTRY) may not take a mask
            return self._kernels().logprobs_forward(logits, ids, temperature, return_entropy)
        return self._kernels().logprobs_forward(logits, ids, temperature, return_entropy, mask=mask)

    def logprobs_backward(self, logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad) -> None:
        self._kernels().logprobs_backward(logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad)

    def empty_grad(self, logits: torch.Tensor) -> torch.Tensor:
        """A buffer for ∂loss/∂logits (the logits' shape, dtype and device, stride(-1) == 1)."""
        own = getattr(self._kernels(), "empty_grad", None)
        if own is not None:
            return own(logits.shape, logits.dtype)
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


# Every backend, by name. Tests may replace an entry (monkeypatch.setitem) to install other kernels.
REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    Backend("cpu", "cpu"),
    Backend("triton", "triton_backend"),
    Backend("cuda", "cuda"),
    Backend("torch", "torch_backend", autograd=True),
)}

# Preference order of "auto" per device type: fastest first. Other device types get "torch".
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def get(name: str) -> Backend:
    """The backend called ``name`` ("auto" is not one: see ``resolve``)."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"no backend called {name!r}; the backends are {sorted(REGISTRY)}") from None


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """None when backend ``name`` can run (on ``device``), else a sentence saying why not and how to fix it."""
    return get(name).unavailable_reason(device)


def available(device: torch.device) -> Tuple[Backend, ...]:
    """The backends that can run on ``device``, in the registry's order."""
    return tuple(b for b in REGISTRY.values() if b.unavailable_reason(device) is None)


def describe_backends() -> str:
    lines = ["backends:"]
    for b in REGISTRY.values():
        why = b.unavailable_reason()
        lines.append(f"  {b.name:7s} " + ("available" if why is None else f"unavailable: {why}"))
    return "\n".join(lines)


def resolve(name: str, device: torch.device) -> Backend:
    """The backend to run on ``device``: ``name`` itself, or for "auto" the first available one of
    ``AUTO_ORDER[device.type]``. An explicit backend that cannot run there raises RuntimeError."""
    if name == "auto":
        for cand in AUTO_ORDER.get(device.type, ()):
            if unavailable_reason(cand, device) is None:
                return get(cand)
        return get("torch")
    backend = get(name)
    why = backend.unavailable_reason(device)
    if why is not None:
        raise RuntimeError(f'backend="{name}" is not available: {why}')
    return backend


def resolve_name(name: str, device_type: str) -> str:
    """``resolve(name, torch.device(device_type)).name``: plain strings in and out, so torch.compile
    can evaluate it once at trace time (api.py wraps it in ``assume_constant_result``); raises like
    ``resolve`` for an unavailable explicit backend."""
    return resolve(name, torch.device(device_type)).name
