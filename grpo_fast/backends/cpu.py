"""The CPU backend: grpo_fast._C_cpu (csrc/cpu), a C++/OpenMP extension taking raw pointers.

The extension sees no torch types: grpo_fast/backends/_native.py hands it ``tensor.data_ptr()``
integers, sizes, strides (in elements) and codes as keyword arguments (the same ones as the CUDA
extension), so one build works with any torch version. The thread count is torch's
(``torch.get_num_threads()``); results do not depend on it (bitwise).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from . import _native

DEVICE_TYPES = ("cpu",)

try:
    from .. import _C_cpu  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as e:  # not built: `pip install .` (or `pip install -e .`) compiles it
    _C_cpu = None
    _IMPORT_ERROR = e


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


def _context() -> dict:
    # torch's thread count; the results do not depend on it (bitwise)
    return dict(nthreads=torch.get_num_threads())


def fused_loss(inp, grad: Optional[torch.Tensor]):
    """One fused pass over ``inp.logits`` (CPU tensors; see _native.fused_loss and the contract in
    grpo_fast/backends/__init__.py). Returns stats (NUM_STATS,) float32 sums and logp (B, T) float32."""
    assert inp.logits.device.type == "cpu"
    return _native.fused_loss(_C_cpu, inp, grad, **_context())


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool, mask=None):
    """Per-token log-probs (B, T) float32 [and entropies (B, T) float32, else None], no gradient."""
    assert logits.device.type == "cpu"
    return _native.token_logprobs(_C_cpu, logits, ids, temperature, return_entropy, mask, **_context())


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, temperature, return_entropy: bool, mask=None):
    """Forward of grpo_fast.logprobs: (logp, entropy | None, lse) (see _native.logprobs_forward)."""
    assert logits.device.type == "cpu"
    return _native.logprobs_forward(_C_cpu, logits, ids, temperature, return_entropy, mask, **_context())


def logprobs_backward(logits: torch.Tensor, ids: torch.Tensor, temperature, lse: torch.Tensor,
                      entropy: Optional[torch.Tensor], g_logp: Optional[torch.Tensor],
                      g_entropy: Optional[torch.Tensor], grad: torch.Tensor) -> None:
    """Backward of grpo_fast.logprobs: grad (B, T, V) ← ∂L/∂logits (see _native.logprobs_backward)."""
    assert logits.device.type == "cpu"
    _native.logprobs_backward(_C_cpu, logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad, **_context())
