"""The one place where arguments are checked (docs/spec.md, "Bad input").

``validate_loss_args`` runs before any backend, raises ``ValueError`` (``TypeError`` for a wrong
dtype or type) whose message names the argument, what was expected and what was given, and never
modifies the caller's tensors. It returns the arguments normalized for the kernels: small (B, T)
tensors made contiguous float32 / int64, strings turned into ``KernelConfig`` codes. The (B, T, V)
logits are never copied here unless their last dimension is strided.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .options import GRPOOptions
from ._config import (
    BACKENDS,
    CLIP_FAMILY,
    KL_ESTIMATORS,
    LEVELS,
    LOSS_TABLE,
    LOSS_TYPES,
    SCALE_REWARDS,
    KernelConfig,
)

OPTION_FIELDS = [f.name for f in dataclasses.fields(GRPOOptions)]  # the order unpacked in validate_loss_args
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int64, torch.int32)


def _fmt_shape(t) -> str:
    """(4,) / (4, 3): a shape as Python writes a tuple."""
    return str(tuple(t.shape if isinstance(t, torch.Tensor) else t))


def _choice(name: str, value, choices) -> int:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return choices[value]


def _number(name: str, value, *, allow_none: bool = False, check_value: bool = True, keep_tensor: bool = False):
    """A real number as a float. ``check_value=False`` (under torch.compile, where the number may be
    symbolic) skips the finiteness check: the caller runs it later (check_number_values).
    ``keep_tensor=True`` returns a one-element tensor as a 0-d float64 tensor instead of reading it
    with .item(), which would break a compiled graph."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        if keep_tensor and not (value.dtype == torch.bool or value.is_complex()):
            return value.detach().reshape(()).to(torch.float64)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if check_value:
        _finite_number(name, value)
    return value


def _finite_number(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


# float32's range: the kernels read every float option as float32 (temperature, ε, δ, β, the SAPO
# temperatures, adv_eps in Triton), so an option must keep its meaning after that rounding.
FLT_MAX = float(torch.finfo(torch.float32).max)  # 3.4028235e38; beyond it float32 is inf
FLT_MIN = float(torch.finfo(torch.float32).tiny)  # 1.1754944e-38, the smallest normal float32


def float32_option(name: str, value, *, allow_none: bool = False, positive: bool = False) -> Optional[float]:
    """A real option that the kernels take as float32: finite as a float32 (|x| <= 3.4e38, so 1e39
    is not inf on one backend and finite on another) and 0 or at least the smallest normal float32
    in magnitude (1e-50 would round to 0: a nonzero beta would lose its KL term, a temperature
    would divide by 0). ``positive``: must be > 0 (temperature, the SAPO temperatures)."""
    value = _number(name, value, allow_none=allow_none)
    if value is not None:
        _float32_value(name, value, positive=positive)
    return value


def _float32_value(name: str, value: float, *, positive: bool = False) -> None:
    """The value checks of float32_option on a finite float (also run at run time under compile)."""
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if abs(value) > FLT_MAX:
        raise ValueError(f"{name} must be finite as a float32 (|{name}| <= {FLT_MAX:.8g}; the kernels compute in "
                         f"float32), got {value}")
    if value != 0 and abs(value) < FLT_MIN:
        raise ValueError(f"{name} must be 0 or at least {FLT_MIN:.8g} in magnitude (a normal float32; the kernels "
                         f"compute in float32), got {value}")


def check_temperature(temperature) -> float:
    """τ > 0 and a normal float32 (every backend divides by it in float32)."""
    return float32_option("temperature", temperature, positive=True)


def check_strided(name: str, t: torch.Tensor) -> None:
    """Dense (strided) tensors only: the kernels and the reference index memory by strides, and a
    sparse or otherwise non-strided tensor would fail deep inside with an error about memory formats."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with .to_dense()")


def check_logits(logits, name: str = "logits") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, T, V), got {type(logits).__name__}")
    check_strided(name, logits)
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape (B, T, V), got {logits.dim()} dims {_fmt_shape(logits)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {logits.dtype}")
    B, T, V = logits.shape
    if V == 0:
        raise ValueError(f"{name} must have a vocabulary dimension V > 0, got shape {_fmt_shape(logits)}")
    if B * T == 0:
        raise ValueError(f"{name} must have B·T > 0 tokens, got shape {_fmt_shape(logits)}")
    return logits


def check_ids(ids, B: int, T: int, V: int, device: torch.device, name: str = "completion_ids", check_values: bool = True) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({B}, {T}), got {type(ids).__name__}")
    check_strided(name, ids)
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {ids.dtype}")
    if tuple(ids.shape) != (B, T):
        raise ValueError(f"{name} must have shape ({B}, {T}) to match logits, got {_fmt_shape(ids)}")
    _same_device(name, ids, device)
    if check_values:
        check_token_values(ids, V, None, None, name=name)
    return ids.to(torch.int64).contiguous()


# ---- the checks that read tensor data: a host sync each on an accelerator ---------------------------
# "sync" (default): every check reads the data and raises the named ValueError (on CUDA: one device
# sync per check). "device": on accelerator tensors the checks become torch._assert_async (no sync; a
# violation fails asynchronously as a device-side assert, which does not name the argument on CUDA).
# "off": on accelerator tensors they are skipped (bad ids then index out of bounds in the kernel).
# CPU tensors always get the named checks (reading them costs no sync). docs/spec.md, "Host syncs".
VALUE_CHECK_MODES = ("sync", "device", "off")
_VALUE_CHECKS = [os.environ.get("GRPO_FAST_VALUE_CHECKS", "sync")]


def set_value_checks(mode: str) -> str:
    """How the checks that read tensor data (ids in [0, V), finite rewards/advantages, 0/1 masks) run on
    accelerator tensors: "sync" (default; the named ValueError, one host sync each), "device"
    (torch._assert_async, no host sync) or "off". Returns the previous mode. CPU tensors are always
    checked with the named error. Also set by the environment variable GRPO_FAST_VALUE_CHECKS."""
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"value checks mode must be one of {list(VALUE_CHECK_MODES)}, got {mode!r}")
    prev, _VALUE_CHECKS[0] = _VALUE_CHECKS[0], mode
    return prev


def _host_check(t: torch.Tensor, ok, message: str) -> bool:
    """True when the caller must run its named, synchronizing check on ``t``. Otherwise (an accelerator
    tensor in mode "device" or "off") this has queued the device assertion ``ok()`` (mode "device") or
    nothing, and the caller skips its check."""
    mode = _VALUE_CHECKS[0]
    if mode not in VALUE_CHECK_MODES:  # a bad GRPO_FAST_VALUE_CHECKS: the error names it at the first check
        raise ValueError(f"GRPO_FAST_VALUE_CHECKS must be one of {list(VALUE_CHECK_MODES)}, got {mode!r}")
    if mode == "sync" or t.device.type == "cpu":
        return True
    if mode == "device":
        torch._assert_async(ok(), message)
    return False


def _all_finite(name: str, t: Optional[torch.Tensor]) -> None:
    if t is None:
        return
    message = f"{name} must be finite, got a non-finite value (NaN or inf)"
    if _host_check(t, lambda: torch.isfinite(t).all(), message) and not bool(torch.isfinite(t).all()):
        raise ValueError(message)


def check_token_values(ids: torch.Tensor, V: int, rewards: Optional[torch.Tensor], advantages: Optional[torch.Tensor],
                       name: str = "completion_ids", mask: Optional[torch.Tensor] = None) -> None:
    """The checks that read tensor data (one device sync). Under torch.compile they run inside the
    custom op grpo_fast::check_values instead (see _ops.py)."""
    message = f"{name} must lie in [0, V) = [0, {V})"
    if _host_check(ids, lambda: ((ids >= 0) & (ids < V)).all(), message):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"{message}, got a value {lo if lo < 0 else hi}")
    _all_finite("rewards", rewards)
    _all_finite("advantages", advantages)
    if mask is not None:
        check_mask_values(mask)


def check_mask_values(mask: torch.Tensor, name: str = "completion_mask") -> None:
    """Every entry 0 or 1 (bool, int or float). A mask is a selection, not a weight: TRL's masks are
    0/1, and −1 or NaN would silently give a wrong or NaN loss. Reads the (B, T) mask (one sync)."""
    message = f"{name} must hold only 0 and 1 (bool, int or float)"
    if not _host_check(mask, lambda: ((mask == 0) | (mask == 1)).all(), message):
        return
    bad = (mask != 0) & (mask != 1)  # NaN is neither
    if bool(bad.any()):
        value = mask[bad].flatten()[0].item()
        raise ValueError(f"{message}, got a value {value}")


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {t.device}")


def _float_tensor(name, t, shapes, device, *, finite: bool = False) -> Optional[torch.Tensor]:
    """A small float tensor of one of ``shapes`` (tuples), returned as contiguous float32."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_strided(name, t)
    if not (t.is_floating_point() or t.dtype in (torch.bool, torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise TypeError(f"{name} must be a real-valued tensor, got {t.dtype}")
    if tuple(t.shape) not in shapes:
        want = " or ".join(_fmt_shape(s) for s in shapes)
        raise ValueError(f"{name} must have shape {want}, got {_fmt_shape(t)}")
    _same_device(name, t, device)
    out = t.detach().to(torch.float32).contiguous()
    if finite:
        _all_finite(name, out)
    return out


@dataclass
class LossInputs:
    """Validated, normalized arguments of ``grpo_loss``."""

    logits: torch.Tensor  # (B, T, V), stride(-1) == 1
    ids: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) float32 0/1
    advantages: Optional[torch.Tensor]  # (B,) or (B, T) float32
    rewards: Optional[torch.Tensor]  # (B,) float32
    old_logp: Optional[torch.Tensor]
    ref_logp: Optional[torch.Tensor]
    isr: Optional[torch.Tensor]  # (B,) or (B, T) float32
    weight: torch.Tensor  # (B, T) float32: aggregation weight of each token, m·c_b (0 on padding)
    cfg: KernelConfig
    # the string options, for the reference and the metric names
    loss_type: str
    kl_estimator: str
    level: str
    scale_rewards: str
    epsilon_high: float
    delta: Optional[float]
    max_completion_length: int
    num_items_in_batch: Optional[float]  # or a 0-d float64 tensor under torch.compile
    options: Optional[GRPOOptions] = None  # the validated options, numbers as floats, epsilon_high resolved
    # (B, T) float32 c·m/Σm (entropy_coef c): loss −= Σ entropy_weight·H, and its gradient; None: c = 0
    entropy_weight: Optional[torch.Tensor] = None


def check_group_size(group_size, B: int) -> int:
    """G: an int >= 2 that divides the batch size B (rows [k·G, (k+1)·G) are one prompt's group)."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__} {group_size!r}")
    G = int(group_size)
    if G < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs two completions to compare), got {G}")
    if B % G != 0:
        raise ValueError(f"group_size must divide the batch size B = {B}, got group_size={G} (B % G = {B % G})")
    return G


def aggregation_weights(mask: torch.Tensor, loss_type: str, max_completion_length: int, num_items_in_batch) -> torch.Tensor:
    """w[b, t] such that loss = Σ_{b,t} w·L[b, t] (docs/spec.md, Aggregation); w = 0 on padding.

    Computed once here, in float64 then rounded, so that every kernel only multiplies, and so that a
    chunk of tokens (the fused-linear path) carries the batch's normalization with it.
    ``num_items_in_batch``: None, a number, or (under torch.compile) a 0-d tensor.
    """
    m = mask.to(torch.float64)
    B = m.shape[0]
    agg = LOSS_TABLE[loss_type].aggregation
    if agg == "row_mean":
        c = 1.0 / (m.sum(-1, keepdim=True).clamp(min=1.0) * B)
    elif agg == "batch_token_mean":
        c = 1.0 / m.sum().clamp(min=1.0)
    elif agg == "fixed_length":
        c = torch.tensor(1.0 / (B * max_completion_length), dtype=torch.float64)
    elif agg == "row_sum_mean":
        c = torch.tensor(1.0 / B, dtype=torch.float64)
    elif num_items_in_batch is None:  # global_token_mean: this call's token count
        c = 1.0 / m.sum().clamp(min=1.0)
    else:  # global_token_mean: the global token count across ranks / accumulation steps
        if isinstance(num_items_in_batch, torch.Tensor):  # under torch.compile (see _number)
            n = num_items_in_batch.to(device=m.device, dtype=torch.float64)
        else:  # ones·n rather than torch.tensor(n): a symbolic n stays a graph input, not a constant
            n = torch.ones((), dtype=torch.float64) * num_items_in_batch
        c = 1.0 / n.clamp(min=1.0)
    return (m * c).to(torch.float32)


def entropy_weights(mask: torch.Tensor, entropy_coef: float) -> Optional[torch.Tensor]:
    """w_H[b, t] = c·m / max(Σ m, 1): the entropy bonus −Σ w_H·H is c times the mean entropy of this
    call's valid tokens (TRL 1.16's entropy_loss before its accumulation division), whatever the loss
    type's aggregation. In float64, then rounded, as aggregation_weights. None when c = 0 (off)."""
    if entropy_coef == 0.0:
        return None
    m = mask.to(torch.float64)
    return (m * (entropy_coef / m.sum().clamp(min=1.0))).to(torch.float32)


def check_adv_eps(adv_eps) -> float:
    """adv_eps >= 0 (a negative one flips the sign of the advantages of groups with σ < |adv_eps|)."""
    adv_eps = float32_option("adv_eps", adv_eps)
    if adv_eps < 0:
        raise ValueError(f"adv_eps must be >= 0, got {adv_eps}")
    return adv_eps


def check_number_values(loss_type: str, *, temperature: float, epsilon_low: float, epsilon_high: float,
                        delta: Optional[float], beta: float, adv_eps: float, sapo_temperature_pos: float,
                        sapo_temperature_neg: float, num_items_in_batch: Optional[float]) -> None:
    """The checks of the numeric options' values. Part of validate_loss_args; under torch.compile,
    where a number may be symbolic, they run at run time inside the custom op grpo_fast::check_values
    (_ops.py), with the same messages."""
    for name, value in (("temperature", temperature), ("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high),
                        ("delta", delta), ("beta", beta), ("adv_eps", adv_eps),
                        ("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg),
                        ("num_items_in_batch", num_items_in_batch)):
        if value is not None:
            _finite_number(name, value)
    _float32_value("temperature", temperature, positive=True)
    for name, value in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high), ("delta", delta), ("beta", beta),
                        ("adv_eps", adv_eps), ("sapo_temperature_pos", sapo_temperature_pos),
                        ("sapo_temperature_neg", sapo_temperature_neg)):
        if value is not None:
            _float32_value(name, value)
    if not 0.0 <= epsilon_low < 1.0:
        raise ValueError(f"epsilon_low must lie in [0, 1), got {epsilon_low}")
    if epsilon_high < 0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
    if delta is not None and delta <= 1.0 + epsilon_high:
        raise ValueError(f"delta must be > 1 + epsilon_high = {1.0 + epsilon_high}, got {delta}")
    if adv_eps < 0:
        raise ValueError(f"adv_eps must be >= 0, got {adv_eps}")
    if LOSS_TABLE[loss_type].family == "soft_gate" and (sapo_temperature_pos <= 0 or sapo_temperature_neg <= 0):
        raise ValueError(f"sapo_temperature_pos and sapo_temperature_neg must be > 0, got {sapo_temperature_pos} and {sapo_temperature_neg}")
    if num_items_in_batch is not None and num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        from .backends import describe_backends

        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.\n{describe_backends()}")
    return backend


def validate_loss_args(
    logits,
    completion_ids,
    advantages=None,
    *,
    rewards=None,
    old_logp=None,
    ref_logp=None,
    completion_mask=None,
    importance_sampling_ratio=None,
    num_items_in_batch=None,
    options: Optional[GRPOOptions] = None,
    check_values=True,
) -> LossInputs:
    """Checks and normalizes grpo_loss's tensors and its ``options`` (GRPOOptions; None = the
    defaults). ``check_values=False`` (torch.compile) skips the checks that read tensor data (ids
    range, finiteness, mask values) and the checks of the numbers' values (a number that changes
    between compiled calls is symbolic): the compiled path runs those at run time in a custom op
    (api._compiled_path). A one-element ``num_items_in_batch`` tensor then stays a tensor."""
    o = GRPOOptions() if options is None else options
    (loss_type, importance_sampling_level, beta, kl_estimator, epsilon_low, epsilon_high, delta, temperature,
     scale_rewards, adv_eps, group_size, max_completion_length, sapo_temperature_pos, sapo_temperature_neg,
     use_bias_correction_kl, entropy_coef) = (getattr(o, name) for name in OPTION_FIELDS)
    # -- options (no tensor touched yet)
    lt = _choice("loss_type", loss_type, LOSS_TYPES)
    kl = _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    lvl = _choice("importance_sampling_level", importance_sampling_level, LEVELS)
    sr = _choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    temperature = _number("temperature", temperature, check_value=check_values)
    epsilon_low = _number("epsilon_low", epsilon_low, check_value=check_values)
    epsilon_high = epsilon_low if epsilon_high is None else _number("epsilon_high", epsilon_high, check_value=check_values)
    delta = _number("delta", delta, allow_none=True, check_value=check_values)
    if delta is not None and not LOSS_TABLE[loss_type].delta:
        raise ValueError(f"delta is only defined for the clip-family losses {list(CLIP_FAMILY)}, got delta={delta} with loss_type={loss_type!r}")
    beta = _number("beta", beta, check_value=check_values)
    adv_eps = _number("adv_eps", adv_eps, check_value=check_values)
    sapo_pos = _number("sapo_temperature_pos", sapo_temperature_pos, check_value=check_values)
    sapo_neg = _number("sapo_temperature_neg", sapo_temperature_neg, check_value=check_values)
    n_items = _number("num_items_in_batch", num_items_in_batch, allow_none=True, check_value=check_values,
                      keep_tensor=not check_values)
    # under compile a symbolic number: its value is checked at run time (grpo_fast::check_values)
    entropy_coef = _number("entropy_coef", entropy_coef, check_value=check_values)
    if check_values:
        _float32_value("entropy_coef", entropy_coef)
        check_number_values(loss_type, temperature=temperature, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                            delta=delta, beta=beta, adv_eps=adv_eps, sapo_temperature_pos=sapo_pos,
                            sapo_temperature_neg=sapo_neg, num_items_in_batch=n_items)
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be a bool, got {type(use_bias_correction_kl).__name__}")

    # -- logits and ids
    logits = check_logits(logits)
    B, T, V = logits.shape
    device = logits.device
    ids = check_ids(completion_ids, B, T, V, device, check_values=check_values)

    # -- advantages xor rewards
    if (advantages is None) == (rewards is None):
        given = "both" if advantages is not None else "neither"
        raise ValueError(f"exactly one of advantages and rewards must be given, got {given}")
    if advantages is not None:
        if group_size is not None:
            raise ValueError(f"group_size is only used with rewards, got group_size={group_size} with advantages")
        adv = _float_tensor("advantages", advantages, [(B,), (B, T)], device, finite=check_values)
        rew = None
        G = 0
    else:
        adv = None
        rew = _float_tensor("rewards", rewards, [(B,)], device, finite=check_values)
        if group_size is None:
            raise ValueError("rewards need group_size (the number G of completions per prompt), got group_size=None")
        G = check_group_size(group_size, B)

    # -- per-token side inputs
    old = _float_tensor("old_logp", old_logp, [(B, T)], device)
    ref = _float_tensor("ref_logp", ref_logp, [(B, T)], device)
    if beta != 0.0 and ref is None:
        raise ValueError(f"ref_logp is required when beta != 0 (the KL penalty needs the reference log-probs), got beta={beta} and ref_logp=None")
    if completion_mask is None:
        mask = torch.ones((B, T), dtype=torch.float32, device=device)
    else:
        mask = _float_tensor("completion_mask", completion_mask, [(B, T)], device)
        if check_values:
            check_mask_values(mask)
    isr = _float_tensor("importance_sampling_ratio", importance_sampling_ratio, [(B,), (B, T)], device)

    if max_completion_length is None:
        mcl = T
    else:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, numbers.Integral) or max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
        mcl = int(max_completion_length)

    if logits.stride(-1) != 1:  # the kernels walk V with unit stride; B and T strides are free
        logits = logits.contiguous()

    cfg = KernelConfig(
        loss_type=lt,
        kl_estimator=kl,
        level=lvl,
        has_delta=delta is not None,
        bias_correction_kl=use_bias_correction_kl,
        scale_rewards=sr,
        group_size=G,
        temperature=temperature,
        eps_low=epsilon_low,
        eps_high=epsilon_high,
        delta=0.0 if delta is None else delta,
        beta=beta,
        sapo_temp_pos=sapo_pos,
        sapo_temp_neg=sapo_neg,
        adv_eps=adv_eps,
        max_completion_length=float(mcl),
        # -1 when not given, or given as a tensor (torch.compile): the weights carry it, no kernel reads it
        num_items=-1.0 if n_items is None or isinstance(n_items, torch.Tensor) else n_items,
    )
    return LossInputs(
        logits=logits, ids=ids, mask=mask, advantages=adv, rewards=rew, old_logp=old, ref_logp=ref,
        isr=isr, weight=aggregation_weights(mask, loss_type, mcl, n_items), cfg=cfg, loss_type=loss_type, kl_estimator=kl_estimator, level=importance_sampling_level,
        scale_rewards=scale_rewards, epsilon_high=epsilon_high, delta=delta, max_completion_length=mcl,
        num_items_in_batch=n_items,
        options=dataclasses.replace(o, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                                    temperature=temperature, adv_eps=adv_eps, group_size=G or None,
                                    max_completion_length=mcl, sapo_temperature_pos=sapo_pos,
                                    sapo_temperature_neg=sapo_neg, entropy_coef=entropy_coef),
        entropy_weight=entropy_weights(mask, entropy_coef),
    )
