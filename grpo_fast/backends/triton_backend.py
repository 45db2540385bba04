"""The Triton backend: launchers for the kernels of ``grpo_fast.kernels`` (grpo_fast/kernels/).

What runs (N = B·T token rows, one program per row on grid axis 0):

    token level      _grpo_token_fwd_kernel       one sweep of z for lse/entropy, then (with a
                                                  gradient) a reverse second sweep of the same row
                                                  writing dL/dz, on a persistent grid sized so the
                                                  rows in flight fit in L2 (persistent_grid()).
    sequence level   _token_logprobs_kernel       pass 1 (HAS_MASK): logp, entropy, lse per valid token
                     _grpo_seq_row_kernel         per sequence: the row's ratio, loss, stats, dL/dlogp
                     _grpo_grad_kernel            pass 2 over z: writes dL/dz
    token_logprobs   _token_logprobs_kernel

Launch configurations are pinned per (V, dtype, architecture) (pinned_config()): no autotuning,
so the bits of a result do not depend on a timing. The stats are written per token (or per sequence) and summed here with torch: deterministic, no
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

from .._config import NUM_STATS, STAT_LOSS

# Set before Triton is imported (tests/conftest.py does it without a GPU): the kernels then run in
# Triton's NumPy interpreter, on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE_TYPES = ("cuda", "cpu") if INTERPRET else ("cuda",)

# Tests set this to force a block size (e.g. 16 with V = 53: several blocks, a ragged tail).
BLOCK_V_OVERRIDE: Optional[int] = None
# Tests set this to (L2 bytes, SM count) to size the persistent grid of CPU tensors (the
# interpreter) as on a GPU of that L2; None: NOMINAL_DEVICE.
DEVICE_PROPS_OVERRIDE: Optional[tuple] = None

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


# Pinned launch configurations (no autotuning). The reduction order of a row — the lanes of a
# BLOCK_V block, the tree of tl.sum over num_warps warps, the blocks in order — is a function of
# (BLOCK_V, num_warps) and of the compiled layout, and (BLOCK_V, num_warps) are a function of
# (V, bytes per logit, SM architecture). The guarantee: the same inputs give the same bits on every
# run, rank and process that shares the SM architecture, the Triton version (and
# TRITON_DEFAULT_FP_FUSION), and the 16-byte alignment of the logits' pointer and row strides —
# Triton specializes on it, and the vector width it allows sets how many elements each thread sums
# before the cross-thread tree. The grid of the persistent kernel decides only which program
# handles which row. An autotuner picking by timing could pick a different BLOCK_V on another run
# or rank; there is none.
NUM_STAGES = 1  # what the kernel report compiles (Triton's default, 3, would be another build)
BLOCK_BYTES = 16384  # bytes of logits per program per block step on sm_90+: 8192 bf16 / 4096 fp32
BLOCK_BYTES_SM80 = 8192  # ... on sm_80 and older (and the interpreter)
MAX_WARPS = 16


def pinned_config(V: int, elem_bytes: int, arch: int = 90) -> tuple:
    """(BLOCK_V, num_warps) of the V-streaming kernels for V logits of ``elem_bytes`` bytes on SM
    architecture ``arch`` (80, 90, ...; the interpreter passes 0).

    BLOCK_V = min(next_pow2(V), B / elem_bytes) with B = 16 KB of logits per step on sm_90 and newer
    (H100/H200: 3.35–4.8 TB/s need that many bytes in flight per SM with one or two programs per
    SM, the persistent grid), 8 KB on sm_80 (A100, 2 TB/s; and with 16 KB the bf16 token kernel
    compiled without the ÷16 specialization spills on sm_80); num_warps = B/1024 (each thread
    loads 32 bytes, two 16-byte vectors, per step). Every config it can return is compiled for
    sm_80 and sm_90, ÷16 and unaligned, and checked for zero spills by `python -m benchmarks
    kernels` (tests/test_kernel_report.py).
    """
    if V < 1 or elem_bytes not in (2, 4):
        raise ValueError(f"pinned_config: V must be >= 1 and elem_bytes 2 or 4, got V={V}, elem_bytes={elem_bytes}")
    block = min(_next_pow2(V), (BLOCK_BYTES if arch >= 90 else BLOCK_BYTES_SM80) // elem_bytes)
    warps = max(1, min(MAX_WARPS, block * elem_bytes // 1024))
    return block, warps


def pinned_configs(arch: int = 90) -> list:
    """Every distinct (BLOCK_V, num_warps, elem_bytes) pinned_config returns for V = 1024 .. 2^20 on ``arch``:
    what the kernel report compiles."""
    out = []
    for e in (2, 4):
        for lg in range(10, 21):
            c = pinned_config(1 << lg, e, arch) + (e,)
            if c not in out:
                out.append(c)
    return out


# The persistent grid of the token-level loss kernel (two sweeps of each row).
L2_FRACTION = 0.75  # of L2 the rows in flight may fill (H100's L2 is two partitions; other data lives there too)
MAX_PROGRAMS_PER_SM = 2
# (L2 bytes, SM count) assumed for CPU tensors under the interpreter: an H100 SXM's.
NOMINAL_DEVICE = (50 * 1024 * 1024, 132)


def persistent_grid(N: int, V: int, elem_bytes: int, l2_bytes: int, sm_count: int) -> int:
    """Programs of the token-level loss kernel with a gradient: each loops over rows pid, pid + P, ...

    A program holds its row in L2 from sweep 1 (forward, evict-last loads) to the end of sweep 2
    (backward, evict-first loads and stores), and the programs start in step, so the P rows in flight
    all reach their turning point together: P·V·elem_bytes ≤ L2_FRACTION·L2 makes sweep 2 hit L2,
    i.e. one HBM read and one write per logit. P is also at most MAX_PROGRAMS_PER_SM per SM (more only
    queue) and at most N. When not even one row fits the budget (V·e > 37 MB on an H100) sweep 2
    misses in part whatever P is (the bytes model says how much): then P is the full
    MAX_PROGRAMS_PER_SM per SM, for bandwidth.
    A pure function of its arguments; the launcher passes the device's L2 size and SM count.
    """
    if min(N, V, elem_bytes, l2_bytes, sm_count) < 1:
        raise ValueError(f"persistent_grid: every argument must be >= 1, got N={N}, V={V}, elem_bytes={elem_bytes}, "
                         f"l2_bytes={l2_bytes}, sm_count={sm_count}")
    cap = MAX_PROGRAMS_PER_SM * sm_count
    fit = int(L2_FRACTION * l2_bytes) // (V * elem_bytes)
    return min(N, fit if 1 <= fit < cap else cap)


_PROPS = {}


def device_props(dev: torch.device) -> tuple:
    """(L2 bytes, SM count, SM architecture as 80 / 90 / ...) of a CUDA device (cached), or for CPU
    tensors under the interpreter DEVICE_PROPS_OVERRIDE / NOMINAL_DEVICE and architecture 0."""
    if dev.type != "cuda":
        l2, sms = DEVICE_PROPS_OVERRIDE or NOMINAL_DEVICE
        return l2, sms, 0
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _PROPS:
        p = torch.cuda.get_device_properties(idx)
        _PROPS[idx] = (int(p.L2_cache_size), int(p.multi_processor_count), 10 * p.major + p.minor)
    return _PROPS[idx]


def _config(V: int, t: torch.Tensor) -> tuple:
    """(BLOCK_V, num_warps) for logits tensor t: the pinned config, or the tests' BLOCK_V override."""
    block, warps = pinned_config(V, t.element_size(), device_props(t.device)[2])
    if BLOCK_V_OVERRIDE is not None:
        block = BLOCK_V_OVERRIDE
    return block, warps


def _launch_v(kernel_name: str, grid, args: dict, z: torch.Tensor):
    """Launch a kernel that streams V logits of tensor z with its pinned config."""
    block, warps = _config(args["V"], z)
    getattr(_kernels(), kernel_name)[grid](**args, BLOCK_V=block, num_warps=warps, num_stages=NUM_STAGES)


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
                  sapo_pos=cfg.sapo_temp_pos, sapo_neg=cfg.sapo_temp_neg, adv_eps=cfg.adv_eps,
                  lr_clamp=cfg.log_ratio_clamp, dual_c=cfg.dual_clip_c, is_lo=cfg.is_bounds[0], is_hi=cfg.is_bounds[1])
    flags = dict(FAMILY=cfg.family, KL_EST=cfg.kl_estimator, HAS_DELTA=cfg.has_delta,
                 HAS_KL=cfg.beta != 0.0, BIAS_KL=cfg.bias_correction_kl, HAS_OLD=inp.old_logp is not None,
                 ADV_MODE=adv_mode, SCALE=cfg.scale_rewards, ISR_MODE=isr_mode,
                 BLOCK_G=_next_pow2(max(cfg.group_size, 2)),
                 # verl's forms (the floats stay run-time values; these only compile their code in)
                 CLAMP_S=cfg.log_ratio_clamp > 0, DUAL_CLIP=cfg.is_clip_family and cfg.dual_clip_c > 0)
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
    ew = inp.entropy_weight  # the entropy bonus (B, T), or None
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    g_strides = _row_strides(grad) if grad is not None else (0, 0)

    if cfg.level == 0:
        stats = torch.empty((N, NUM_STATS), dtype=torch.float32, device=dev)
        if grad is not None:
            l2, sms, _ = device_props(dev)
            programs = persistent_grid(N, V, z.element_size(), l2, sms)
        else:
            programs = N  # one sweep per row: nothing to keep in L2, one program per row
        _launch_v("_grpo_token_fwd_kernel", (programs,), dict(
            logits_ptr=z, ids_ptr=inp.ids, **ptrs,
            grad_ptr=grad if grad is not None else dummy, logp_ptr=logp, stats_ptr=stats,
            N=N, T=T, V=V, G=max(cfg.group_size, 1), stride_lb=z.stride(0), stride_lt=z.stride(1),
            stride_gb=g_strides[0], stride_gt=g_strides[1],
            temperature=cfg.temperature, **floats, **flags, HAS_GRAD=grad is not None, SOFT_BF16=INTERPRET,
            ew_ptr=ew if ew is not None else dummy, HAS_ENT=ew is not None,
        ), z)
        return stats.sum(0), logp

    # sequence level: pass 1 over z, the per-sequence pass, pass 2 over z (gradient only)
    entropy = torch.empty((B, T), dtype=torch.float32, device=dev)
    # each row's lse in two parts (max, log Σ exp(x − max)): pass 3 never forms x − lse
    lse = torch.empty((B, T, 2), dtype=torch.float32, device=dev) if grad is not None else dummy
    _launch_v("_token_logprobs_kernel", (N,), dict(
        logits_ptr=z, ids_ptr=inp.ids, mask_ptr=inp.mask, logp_ptr=logp, entropy_ptr=entropy, lse_ptr=lse,
        T=T, V=V, stride_lb=z.stride(0), stride_lt=z.stride(1), temperature=cfg.temperature,
        HAS_MASK=True, STORE_ENTROPY=True, STORE_LSE=grad is not None,
    ), z)
    stats = torch.empty((B, NUM_STATS), dtype=torch.float32, device=dev)
    g = torch.empty((B, T), dtype=torch.float32, device=dev) if grad is not None else dummy
    _kernels()._grpo_seq_row_kernel[(B,)](
        logp_ptr=logp, entropy_ptr=entropy, **ptrs, g_ptr=g, stats_ptr=stats,
        T=T, G=max(cfg.group_size, 1), **floats, **flags, HAS_GRAD=grad is not None,
        BLOCK_T=min(_next_pow2(T), 1024), num_warps=4, num_stages=NUM_STAGES,
    )
    if grad is not None:
        _launch_v("_grpo_grad_kernel", (N,), dict(
            logits_ptr=z, ids_ptr=inp.ids, lse_ptr=lse, g_ptr=g, grad_ptr=grad,
            T=T, V=V, stride_lb=z.stride(0), stride_lt=z.stride(1),
            stride_gb=g_strides[0], stride_gt=g_strides[1], temperature=cfg.temperature, SOFT_BF16=INTERPRET,
            ew_ptr=ew if ew is not None else dummy, entropy_ptr=entropy, HAS_ENT=ew is not None,
        ), z)
    stats = stats.sum(0)
    if ew is not None:  # the entropy bonus's share of the loss: −Σ w_H·H over pass 1's entropies
        stats[STAT_LOSS] -= (ew * entropy).sum()
    return stats, logp


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool, mask=None):
    """logp (B, T) float32 of ids under softmax(logits / temperature), and the entropy (or None);
    mask (B, T) float32 contiguous or None: a masked (0) row is not read, its outputs are 0."""
    B, T, V = logits.shape
    assert logits.stride(-1) == 1
    with _device_guard(logits):
        return _token_logprobs(logits, ids, temperature, return_entropy, B, T, V, logits.device, mask)


def _token_logprobs(logits, ids, temperature, return_entropy, B, T, V, dev, mask=None):
    ids = ids.to(torch.int64).contiguous()
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    entropy = torch.empty((B, T), dtype=torch.float32, device=dev) if return_entropy else None
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    _launch_v("_token_logprobs_kernel", (B * T,), dict(
        logits_ptr=logits, ids_ptr=ids, mask_ptr=dummy if mask is None else mask, logp_ptr=logp,
        entropy_ptr=entropy if return_entropy else dummy,
        lse_ptr=dummy, T=T, V=V, stride_lb=logits.stride(0), stride_lt=logits.stride(1),
        temperature=float(temperature), HAS_MASK=mask is not None, STORE_ENTROPY=return_entropy, STORE_LSE=False,
    ), logits)
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# grpo_fast.logprobs (differentiable log-probs and entropy; see grpo_fast/logprobs.py)


def _tau_args(temperature, dummy):
    """(tau_ptr, scalar, TAU_PER_ROW) for a float or a (B, T) float32 per-token temperature."""
    if isinstance(temperature, torch.Tensor):
        return temperature, 1.0, True
    return dummy, float(temperature), False


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, temperature, return_entropy: bool, mask=None):
    """(logp, entropy | None, lse) in one sweep of each row of logits (B, T, V): logp and entropy (B, T)
    float32, lse (B, T, 2) float32 in two parts (shift = max x, log_d = log Σ exp(x − shift)).
    mask (B, T) float32 contiguous or None: a masked (0) row is not read, its outputs are all 0."""
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
            logits_ptr=logits, ids_ptr=ids, tau_ptr=tau_ptr, mask_ptr=dummy if mask is None else mask, logp_ptr=logp,
            entropy_ptr=entropy if return_entropy else dummy, lse_ptr=lse,
            T=T, V=V, stride_lb=logits.stride(0), stride_lt=logits.stride(1), temperature=tau0,
            TAU_PER_ROW=per_row, HAS_MASK=mask is not None, STORE_ENTROPY=return_entropy,
        ), logits)
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
        ), logits)
