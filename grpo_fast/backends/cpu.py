"""The CPU backend: grpo_fast._C_cpu (csrc/cpu), a C++/OpenMP extension taking raw pointers.

The extension sees no torch types: this module hands it ``tensor.data_ptr()`` integers, sizes,
strides (in elements) and a dtype code, so one build works with any torch version. The thread
count is torch's (``torch.get_num_threads()``); results do not depend on it (bitwise).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from .._config import NUM_STATS

DEVICE_TYPES = ("cpu",)

try:
    from .. import _C_cpu  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as e:  # not built: `pip install .` (or `pip install -e .`) compiles it
    _C_cpu = None
    _IMPORT_ERROR = e

# Storage dtype codes of csrc/cpu/dtype.h (enum DType).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def unavailable_reason():
    if _C_cpu is None:
        return (f"the C++ extension grpo_fast._C_cpu is not built ({_IMPORT_ERROR}); "
                "build it with `pip install .` or `pip install -e .` from the repository (needs a C++ compiler)")
    return None


# --- gradient buffers -----------------------------------------------------------------------------
# A fresh (B, T, V) gradient buffer costs more to fault in than the kernel takes to fill it: 4 KiB
# pages, one fault each (measured here: 160 ms to first-touch 524 MB, 39 ms to rewrite it). With
# transparent huge pages in "madvise" mode (the common default), asking for huge pages before the
# first touch makes that 46 ms. So the buffer is over-allocated by 2 MiB, aligned, and advised.
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>


def _load_madvise():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_madvise = _load_madvise()


def empty_grad(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor for the gradient, backed by huge pages when possible,
    and reusing the memory of an earlier gradient that is no longer referenced (see _GradCache).

    Falls back to ``torch.empty`` for small buffers, off Linux, or when madvise is refused (the
    advice is only a hint: correctness never depends on it).
    """
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < 8 * _HUGE:
        return torch.empty(shape, dtype=dtype)
    with _CACHE_LOCK:  # from the use-count test to the view that raises it: one thread at a time
        raw = GRAD_CACHE.take(nbytes)
        if raw is None:
            raw = _new_raw(nbytes)
            GRAD_CACHE.put(raw)
        start = -raw.data_ptr() % _HUGE if _madvise is not None else 0
        return raw[start:start + nbytes].view(dtype).view(shape)


def _new_raw(nbytes: int) -> torch.Tensor:
    """Bytes for an ``nbytes`` buffer: 2 MiB more, with the aligned part advised for huge pages."""
    if _madvise is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    raw = torch.empty(nbytes + _HUGE, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE
    _madvise(raw.data_ptr() + start, (nbytes // _HUGE) * _HUGE, _MADV_HUGEPAGE)
    return raw


# The storage's reference count (torch's own, as torch.utils.checkpoint reads it); None on a torch without it.
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _GradCache:
    """The CPU analogue of PyTorch's caching allocator, for the (B, T, V) gradient of inplace=False.

    A fresh buffer costs page faults on first touch (more than the kernel takes to fill it, see above);
    a training loop asks for the same size every step, after the previous step's gradient was consumed
    (the optimizer step, ``zero_grad(set_to_none=True)``). The cache keeps the raw bytes of the last
    ``slots`` gradients (2: a loss whose gradient is still alive, e.g. accumulated into ``.grad``, plus
    the next) and hands one out again only when no tensor refers to its storage any more: its storage's
    use count is back to the cache's own reference. A view, ``.grad``, a ``detach()`` or a NumPy array
    of the gradient all hold the storage, so memory still referenced is never handed out. The price:
    up to ``slots`` released gradient buffers stay allocated between calls (``clear()`` frees them;
    ``slots = 0`` turns the cache off).
    """

    def __init__(self, slots: int = 2):
        self.slots = slots
        self._raws = []  # [(raw uint8 tensor, use count when only the cache holds it)], newest last

    def take(self, nbytes: int) -> Optional[torch.Tensor]:
        """A released cached buffer of at least ``nbytes`` (at most twice: no huge buffer kept for a small
        gradient), moved to the newest position; None if there is none."""
        if _use_count is None or self.slots <= 0:
            return None
        for i, (raw, alone) in enumerate(self._raws):
            cap = raw.numel() - (_HUGE if _madvise is not None else 0)
            if nbytes <= cap <= 2 * nbytes and _use_count(raw.untyped_storage()._cdata) == alone:
                self._raws.append(self._raws.pop(i))
                return raw
        return None

    def put(self, raw: torch.Tensor) -> None:
        """Remember a new buffer (before any view of it exists); the oldest one beyond ``slots`` is
        forgotten (freed once its gradient is released)."""
        if _use_count is None or self.slots <= 0:
            return
        self._raws.append((raw, _use_count(raw.untyped_storage()._cdata)))
        del self._raws[:-self.slots]

    def clear(self) -> None:
        self._raws.clear()


GRAD_CACHE = _GradCache()
_CACHE_LOCK = threading.Lock()


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _check_small(name: str, t: Optional[torch.Tensor]) -> None:
    # validation.py hands over contiguous float32 CPU tensors; the kernel reads them by raw pointer.
    assert t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()), name


def fused_loss(inp, grad: Optional[torch.Tensor]):
    """One fused pass over ``inp.logits`` (see grpo_fast/backends/__init__.py for the contract).

    Args:
        inp: validation.LossInputs — logits (B, T, V) fp32/bf16/fp16 with stride(-1) == 1 and any B/T
            strides; ids (B, T) int64; mask, weight (B, T) f32; advantages (B,)|(B, T) or rewards (B,);
            old/ref (B, T) or None; isr (B,)|(B, T) or None; cfg: KernelConfig.
        grad: None, or (B, T, V) of the logits' dtype, stride(-1) == 1 — possibly the logits themselves
            (inplace): receives ∂loss/∂logits for grad_output = 1.

    Returns:
        stats (NUM_STATS,) float32 of sums (_config.STAT_*), logp (B, T) float32.
    """
    logits, cfg = inp.logits, inp.cfg
    B, T, V = logits.shape
    assert logits.device.type == "cpu" and logits.stride(-1) == 1
    assert inp.ids.dtype == torch.int64 and inp.ids.is_contiguous()
    for name in ("mask", "weight", "advantages", "rewards", "old_logp", "ref_logp", "isr"):
        _check_small(name, getattr(inp, name))
    if grad is not None:
        assert grad.shape == logits.shape and grad.dtype == logits.dtype and grad.stride(-1) == 1
    logp = torch.empty((B, T), dtype=torch.float32)
    stats = torch.empty((NUM_STATS,), dtype=torch.float32)
    adv = inp.advantages
    _C_cpu.fused_loss(
        # logits and gradient
        logits.data_ptr(), _DTYPE_CODES[logits.dtype], B, T, V, logits.stride(0), logits.stride(1),
        _ptr(grad), grad.stride(0) if grad is not None else 0, grad.stride(1) if grad is not None else 0,
        # per-token inputs
        inp.ids.data_ptr(), inp.mask.data_ptr(), inp.weight.data_ptr(),
        _ptr(adv), adv.dim() if adv is not None else 0,
        _ptr(inp.rewards), cfg.group_size, cfg.scale_rewards, cfg.adv_eps,
        _ptr(inp.old_logp), _ptr(inp.ref_logp) if cfg.beta != 0.0 else 0,
        _ptr(inp.isr), inp.isr.dim() if inp.isr is not None else 0,
        # options
        cfg.family, cfg.kl_estimator, cfg.level, cfg.has_delta, cfg.bias_correction_kl,
        cfg.temperature, cfg.eps_low, cfg.eps_high, cfg.delta, cfg.beta, cfg.sapo_temp_pos, cfg.sapo_temp_neg,
        # outputs
        logp.data_ptr(), stats.data_ptr(), torch.get_num_threads(),
    )
    return stats, logp


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool):
    """Per-token log-probs (B, T) float32 [and entropies (B, T) float32, else None], no gradient.

    Args:
        logits: (B, T, V) fp32/bf16/fp16 with stride(-1) == 1 (any B/T strides).
        ids: (B, T) int64 contiguous (validation.check_ids).
    """
    B, T, V = logits.shape
    assert logits.device.type == "cpu" and logits.stride(-1) == 1
    ids = ids.to(torch.int64).contiguous()
    logp = torch.empty((B, T), dtype=torch.float32)
    entropy = torch.empty((B, T), dtype=torch.float32) if return_entropy else None
    _C_cpu.token_logprobs(
        logits.data_ptr(), _DTYPE_CODES[logits.dtype], B, T, V, logits.stride(0), logits.stride(1),
        ids.data_ptr(), float(temperature), logp.data_ptr(), _ptr(entropy), torch.get_num_threads(),
    )
    return logp, entropy


def _temperature_args(temperature):
    """(scalar, pointer) for the kernels: a float, or per-token temperatures (B, T) float32 contiguous."""
    if isinstance(temperature, torch.Tensor):
        _check_small("temperature", temperature)
        return 1.0, temperature.data_ptr()
    return float(temperature), 0


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, temperature, return_entropy: bool):
    """Forward of grpo_fast.logprobs: (logp, entropy | None, lse); logp and entropy (B, T) float32, lse
    (B, T, 2) float32 in two parts (max x, log Σ exp(x − max)) (see grpo_fast/logprobs.py).

    Args:
        logits: (B, T, V) fp32/bf16/fp16 with stride(-1) == 1 (any B/T strides).
        ids: (B, T) int64 contiguous.
        temperature: a float > 0, or (B, T) float32 contiguous per-token temperatures.
    """
    B, T, V = logits.shape
    assert logits.device.type == "cpu" and logits.stride(-1) == 1
    assert ids.dtype == torch.int64 and ids.is_contiguous()
    tau0, tau_ptr = _temperature_args(temperature)
    logp = torch.empty((B, T), dtype=torch.float32)
    lse = torch.empty((B, T, 2), dtype=torch.float32)
    entropy = torch.empty((B, T), dtype=torch.float32) if return_entropy else None
    _C_cpu.logprobs_fwd(
        logits.data_ptr(), _DTYPE_CODES[logits.dtype], B, T, V, logits.stride(0), logits.stride(1),
        ids.data_ptr(), tau0, tau_ptr, logp.data_ptr(), _ptr(entropy), lse.data_ptr(), torch.get_num_threads(),
    )
    return logp, entropy, lse


def logprobs_backward(logits: torch.Tensor, ids: torch.Tensor, temperature, lse: torch.Tensor,
                      entropy: Optional[torch.Tensor], g_logp: Optional[torch.Tensor],
                      g_entropy: Optional[torch.Tensor], grad: torch.Tensor) -> None:
    """Backward of grpo_fast.logprobs: grad (B, T, V) ← ∂L/∂logits from the upstream gradients.

    grad_j = (g_logp·(1[j = y] − p_j) − g_entropy·p_j·(log p_j + H)) / τ, log p = (x − lse[..., 0]) − lse[..., 1]
    with x = logits/τ and lse (B, T, 2) float32 contiguous from logprobs_forward.
    g_logp / g_entropy: (B, T) float32 contiguous or None (zero); entropy is needed with g_entropy.
    grad: (B, T, V) of the logits' dtype, stride(-1) == 1 (may be the logits themselves).
    """
    B, T, V = logits.shape
    assert logits.device.type == "cpu" and logits.stride(-1) == 1
    assert grad.shape == logits.shape and grad.dtype == logits.dtype and grad.stride(-1) == 1
    for name, t in (("lse", lse), ("entropy", entropy), ("g_logp", g_logp), ("g_entropy", g_entropy)):
        _check_small(name, t)
    assert g_entropy is None or entropy is not None
    assert lse.shape == (B, T, 2), "lse: (B, T, 2) (max, log Σ exp(x − max)) from logprobs_forward"
    tau0, tau_ptr = _temperature_args(temperature)
    _C_cpu.logprobs_bwd(
        logits.data_ptr(), _DTYPE_CODES[logits.dtype], B, T, V, logits.stride(0), logits.stride(1),
        grad.data_ptr(), grad.stride(0), grad.stride(1), ids.data_ptr(), tau0, tau_ptr, lse.data_ptr(),
        _ptr(entropy), _ptr(g_logp), _ptr(g_entropy), torch.get_num_threads(),
    )
