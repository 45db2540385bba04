"""The Triton backend: launchers for the kernels of ``grpo_fast.kernels`` (grpo_fast/kernels/).

What runs (N = B·T token rows, one program per row on grid axis 0):

    token level      _grpo_token_fwd_kernel       one sweep of z for lse/entropy, then (with a
                                                  gradient) a second sweep of the same row writing
                                                  dL/dz — from L2 while the rows in flight fit there.
    sequence level   _grpo_seq_logp_kernel        pass 1: logp, entropy, lse per valid token
                     _grpo_seq_row_kernel         per sequence: the row's ratio, loss, stats, dL/dlogp
                     _grpo_grad_kernel            pass 2 over z: writes dL/dz
    token_logprobs   _token_logprobs_kernel

The stats are written per token (or per sequence) and summed here with torch: deterministic, no
atomics. Works natively on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests
it without a GPU). See grpo_fast/backends/__init__.py for the interface this module implements.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Optional

import torch

from .._config import NUM_STATS

# Set before Triton is imported (tests/conftest.py does it without a GPU): the kernels then run in
# Triton's NumPy interpreter, on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE_TYPES = ("cuda", "cpu") if INTERPRET else ("cuda",)

# Autotune on a GPU; under the interpreter one fixed config (timing interpreted code means nothing).
AUTOTUNE = not INTERPRET
# Tests set this to force a block size (e.g. 16 with V = 53: several blocks, a ragged tail); it
# bypasses autotuning on a GPU too.
BLOCK_V_OVERRIDE: Optional[int] = None

_KERNELS = None  # the loaded kernels module, or the ImportError that prevented loading it


def kernels_dir() -> Path:
    """The folder holding the kernel sources (grpo_fast/kernels/), found without importing Triton."""
    return Path(__file__).resolve().parents[1] / "kernels"


def load_kernels():
    """The ``grpo_fast.kernels`` module (the ``@triton.jit`` code). Raises ImportError when Triton
    is missing."""
    return importlib.import_module("grpo_fast.kernels")


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = load_kernels()
        except ImportError as e:
            _KERNELS = e
    return _KERNELS


def unavailable_reason() -> Optional[str]:
    k = _kernels()
    if isinstance(k, ImportError):
        if isinstance(k, ModuleNotFoundError) and (k.name or "").split(".")[0] == "triton":
            return "Triton is not installed; install it with `pip install triton` (or `pip install grpo_fast[triton]`)"
        return f"the Triton kernels could not be imported ({k}); reinstall grpo_fast and triton"
    if not INTERPRET and not torch.cuda.is_available():
        return ("no CUDA device is visible to torch; run on a GPU, or set TRITON_INTERPRET=1 before "
                "importing grpo_fast to run the kernels (slowly) in Triton's CPU interpreter")
    return None


# ---------------------------------------------------------------------------------------------
# launch configurations


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# (BLOCK_V, num_warps, num_stages) tried by the autotuner, per distinct V. The kernels stream V
# (memory bound); wider blocks and more warps keep more bytes in flight. All are checked for zero
# register spills on sm_80 and sm_90 by `python -m benchmarks kernels`.
AUTOTUNE_CONFIGS = (
    (1024, 4, 1),
    (2048, 8, 1),
    (4096, 8, 1),
    (4096, 16, 1),
    (8192, 16, 1),
    (2048, 4, 2),
)
# What the interpreter (and kernel-report's "default" rows) use: one config, no tuning.
DEFAULT_BLOCK_V = 1024
DEFAULT_WARPS = 4


def _prune(configs, named_args, **kwargs):
    # a block wider than the (rounded-up) vocabulary is pure waste; keep at least one config
    V = {**(named_args or {}), **kwargs}["V"]  # the launchers pass every argument by keyword
    keep = [c for c in configs if c.kwargs["BLOCK_V"] <= max(_next_pow2(V), 1024)]
    return keep or list(configs)[:1]


_TUNED = {}
# The autotuner's timing function (None: Triton's do_bench on the GPU). Tests put a stand-in here to
# run the tuning path — pruning, trial runs, restoring inplace buffers — under the interpreter.
DO_BENCH = None


def _tuned(kernel_name: str, restore: tuple = ()):
    """The autotuned wrapper of a V-streaming kernel (built lazily, once per (kernel, restore)).

    ``restore`` names pointer arguments the kernel overwrites in a way that changes its inputs
    (inplace gradients): the autotuner restores them between trial runs. That costs one copy of
    the logits, once per new V, on the first inplace call (the tuned config is then cached).
    """
    key = (kernel_name, restore)
    if key not in _TUNED:
        import triton

        fn = getattr(_kernels(), kernel_name)
        configs = [triton.Config({"BLOCK_V": bv}, num_warps=nw, num_stages=ns) for bv, nw, ns in AUTOTUNE_CONFIGS]
        _TUNED[key] = triton.autotune(configs=configs, key=["V"], prune_configs_by={"early_config_prune": _prune},
                                      restore_value=list(restore), do_bench=DO_BENCH)(fn)
    return _TUNED[key]


def _launch_v(kernel_name: str, grid, args: dict, restore: tuple = ()):
    """Launch a kernel that streams V: fixed config under the interpreter or an override, else autotuned."""
    if not AUTOTUNE or BLOCK_V_OVERRIDE is not None:
        bv = BLOCK_V_OVERRIDE or min(DEFAULT_BLOCK_V, _next_pow2(args["V"]))
        getattr(_kernels(), kernel_name)[grid](**args, BLOCK_V=bv, num_warps=DEFAULT_WARPS)
    else:
        _tuned(kernel_name, restore)[grid](**args)


# ---------------------------------------------------------------------------------------------
# the interface (grpo_fast/backends/__init__.py)


def _row_strides(t: torch.Tensor):
    return t.stride(0), t.stride(1)


def _common_args(inp, dummy):
    """Pointers, sizes, floats and flags the two loss kernels share."""
    cfg = inp.cfg
    if inp.advantages is not None:
        adv_mode = 1 if inp.advantages.dim() == 2 else 0
    else:
        adv_mode = 2
    if adv_mode == 2 and cfg.scale_rewards == 2:
        # std of all B rewards as a device scalar: read by pointer, no host synchronization
        batch_std = inp.rewards.to(torch.float64).std().reshape(1)
    else:
        batch_std = dummy
    isr_mode = 0 if inp.isr is None else (1 if inp.isr.dim() == 1 else 2)
    ptrs = dict(
        mask_ptr=inp.mask, weight_ptr=inp.weight,
        adv_ptr=inp.advantages if inp.advantages is not None else dummy,
        rewards_ptr=inp.rewards if inp.rewards is not None else dummy,
        batch_std_ptr=batch_std,
        old_ptr=inp.old_logp if inp.old_logp is not None else dummy,
        ref_ptr=inp.ref_logp if (inp.ref_logp is not None and cfg.beta != 0.0) else dummy,
        isr_ptr=inp.isr if inp.isr is not None else dummy,
    )
    floats = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, delta=cfg.delta, beta=cfg.beta,
                  sapo_pos=cfg.sapo_temp_pos, sapo_neg=cfg.sapo_temp_neg, adv_eps=cfg.adv_eps)
    flags = dict(FAMILY=cfg.family, KL_EST=cfg.kl_estimator, HAS_DELTA=cfg.has_delta,
                 HAS_KL=cfg.beta != 0.0, BIAS_KL=cfg.bias_correction_kl, HAS_OLD=inp.old_logp is not None,
                 ADV_MODE=adv_mode, SCALE=cfg.scale_rewards, ISR_MODE=isr_mode,
                 BLOCK_G=_next_pow2(max(cfg.group_size, 2)))
    return ptrs, floats, flags


def _device_guard(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: make it the tensors' one (multi-GPU processes)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def fused_loss(inp, grad: Optional[torch.Tensor]):
    """One fused pass over inp.logits (B, T, V): (stats (NUM_STATS,) f32 of sums, logp (B, T) f32).

    When ``grad`` is given ((B, T, V), the logits' dtype, stride(-1) == 1; may be the logits
    themselves) it receives ∂loss/∂logits for grad_output = 1.
    """
    z = inp.logits
    B, T, V = z.shape
    N = B * T
    dev = z.device
    assert z.stride(-1) == 1 and (grad is None or grad.stride(-1) == 1)
    with _device_guard(z):
        return _fused_loss(inp, grad, z, B, T, V, N, dev)


def _fused_loss(inp, grad, z, B, T, V, N, dev):
    dummy = torch.empty(1, dtype=torch.float32, device=dev)  # stands for absent optional tensors
    ptrs, floats, flags = _common_args(inp, dummy)
    cfg = inp.cfg
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    inplace = grad is not None and grad.data_ptr() == z.data_ptr()
    restore = ("grad_ptr",) if inplace else ()
    g_strides = _row_strides(grad) if grad is not None else (0, 0)

    if cfg.level == 0:
        stats = torch.empty((N, NUM_STATS), dtype=torch.float32, device=dev)
        _launch_v("_grpo_token_fwd_kernel", (N,), dict(
            logits_ptr=z, ids_ptr=inp.ids, **ptrs,
            grad_ptr=grad if grad is not None else dummy, logp_ptr=logp, stats_ptr=stats,
            T=T, V=V, G=max(cfg.group_size, 1), stride_lb=z.stride(0), stride_lt=z.stride(1),
            stride_gb=g_strides[0], stride_gt=g_strides[1],
            temperature=cfg.temperature, **floats, **flags, HAS_GRAD=grad is not None, SOFT_BF16=INTERPRET,
        ), restore)
        return stats.sum(0), logp

    # sequence level: pass 1 over z, the per-sequence pass, pass 2 over z (gradient only)
    entropy = torch.empty((B, T), dtype=torch.float32, device=dev)
    # each row's lse in two parts (max, log Σ exp(x − max)): pass 3 never forms x − lse
    lse = torch.empty((B, T, 2), dtype=torch.float32, device=dev) if grad is not None else dummy
    _launch_v("_grpo_seq_logp_kernel", (N,), dict(
        logits_ptr=z, ids_ptr=inp.ids, mask_ptr=inp.mask, logp_ptr=logp, entropy_ptr=entropy, lse_ptr=lse,
        T=T, V=V, stride_lb=z.stride(0), stride_lt=z.stride(1), temperature=cfg.temperature,
        STORE_LSE=grad is not None,
    ))
    stats = torch.empty((B, NUM_STATS), dtype=torch.float32, device=dev)
    g = torch.empty((B, T), dtype=torch.float32, device=dev) if grad is not None else dummy
    _kernels()._grpo_seq_row_kernel[(B,)](
        logp_ptr=logp, entropy_ptr=entropy, **ptrs, g_ptr=g, stats_ptr=stats,
        T=T, G=max(cfg.group_size, 1), **floats, **flags, HAS_GRAD=grad is not None,
        BLOCK_T=min(_next_pow2(T), 1024), num_warps=4,
    )
    if grad is not None:
        _launch_v("_grpo_grad_kernel", (N,), dict(
            logits_ptr=z, ids_ptr=inp.ids, lse_ptr=lse, g_ptr=g, grad_ptr=grad,
            T=T, V=V, stride_lb=z.stride(0), stride_lt=z.stride(1),
            stride_gb=g_strides[0], stride_gt=g_strides[1], temperature=cfg.temperature, SOFT_BF16=INTERPRET,
        ), restore)
    return stats.sum(0), logp


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool):
    """logp (B, T) float32 of ids under softmax(logits / temperature), and the entropy (or None)."""
    B, T, V = logits.shape
    assert logits.stride(-1) == 1
    with _device_guard(logits):
        return _token_logprobs(logits, ids, temperature, return_entropy, B, T, V, logits.device)


def _token_logprobs(logits, ids, temperature, return_entropy, B, T, V, dev):
    ids = ids.to(torch.int64).contiguous()
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    entropy = torch.empty((B, T), dtype=torch.float32, device=dev) if return_entropy else None
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    _launch_v("_token_logprobs_kernel", (B * T,), dict(
        logits_ptr=logits, ids_ptr=ids, logp_ptr=logp, entropy_ptr=entropy if return_entropy else dummy,
        lse_ptr=dummy, T=T, V=V, stride_lb=logits.stride(0), stride_lt=logits.stride(1),
        temperature=float(temperature), STORE_ENTROPY=return_entropy, STORE_LSE=False,
    ))
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# grpo_fast.logprobs (differentiable log-probs and entropy; see grpo_fast/logprobs.py)


def _tau_args(temperature, dummy):
    """(tau_ptr, scalar, TAU_PER_ROW) for a float or a (B, T) float32 per-token temperature."""
    if isinstance(temperature, torch.Tensor):
        return temperature, 1.0, True
    return dummy, float(temperature), False


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, temperature, return_entropy: bool):
    """(logp, entropy | None, lse) in one sweep of each row of logits (B, T, V): logp and entropy (B, T)
    float32, lse (B, T, 2) float32 in two parts (shift = max x, log_d = log Σ exp(x − shift))."""
    B, T, V = logits.shape
    assert logits.stride(-1) == 1 and ids.dtype == torch.int64 and ids.is_contiguous()
    dev = logits.device
    with _device_guard(logits):
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        tau_ptr, tau0, per_row = _tau_args(temperature, dummy)
        logp = torch.empty((B, T), dtype=torch.float32, device=dev)
        lse = torch.empty((B, T, 2), dtype=torch.float32, device=dev)
        entropy = torch.empty((B, T), dtype=torch.float32, device=dev) if return_entropy else None
        _launch_v("_logprobs_fwd_kernel", (B * T,), dict(
            logits_ptr=logits, ids_ptr=ids, tau_ptr=tau_ptr, logp_ptr=logp,
            entropy_ptr=entropy if return_entropy else dummy, lse_ptr=lse,
            T=T, V=V, stride_lb=logits.stride(0), stride_lt=logits.stride(1), temperature=tau0,
            TAU_PER_ROW=per_row, STORE_ENTROPY=return_entropy,
        ))
    return logp, entropy, lse


def logprobs_backward(logits, ids, temperature, lse, entropy, g_logp, g_entropy, grad) -> None:
    """grad (B, T, V) ← (g_logp·(onehot − p) − g_entropy·p·(log p + H))/τ: one sweep of each row.

    g_logp / g_entropy: (B, T) float32 contiguous or None (zero); lse (B, T, 2) float32 contiguous from
    logprobs_forward. grad may be the logits' storage.
    """
    B, T, V = logits.shape
    assert logits.stride(-1) == 1 and grad.stride(-1) == 1 and grad.shape == logits.shape
    assert lse.shape == (B, T, 2) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert g_entropy is None or entropy is not None
    dev = logits.device
    inplace = grad.data_ptr() == logits.data_ptr()
    with _device_guard(logits):
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        tau_ptr, tau0, per_row = _tau_args(temperature, dummy)
        gs = _row_strides(grad)
        _launch_v("_logprobs_bwd_kernel", (B * T,), dict(
            logits_ptr=logits, ids_ptr=ids, tau_ptr=tau_ptr, lse_ptr=lse,
            entropy_ptr=entropy if entropy is not None else dummy,
            g_logp_ptr=g_logp if g_logp is not None else dummy,
            g_ent_ptr=g_entropy if g_entropy is not None else dummy, grad_ptr=grad,
            T=T, V=V, stride_lb=logits.stride(0), stride_lt=logits.stride(1), stride_gb=gs[0], stride_gt=gs[1],
            temperature=tau0, TAU_PER_ROW=per_row, HAS_G_LOGP=g_logp is not None, HAS_G_ENT=g_entropy is not None,
            SOFT_BF16=INTERPRET,
        ), ("grad_ptr",) if inplace else ())
