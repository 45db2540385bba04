"""Option codes shared by every backend, and the table of loss types.

The integers match ``csrc/common/grpo_math.h``; the Triton kernels take them as ``tl.constexpr``.
``KernelConfig`` is what a backend receives: validated, resolved (``epsilon_high=None`` already
replaced, ``max_completion_length`` defaulted) and free of Python strings.

Adding a loss type: a row of ``LOSS_TABLE`` below (its code is the next free integer, whatever its
family), its per-token math in ``csrc/common/grpo_math.h`` and the Triton kernels, its line in
``grpo_fast/reference.py``; every membership test reads this table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossType:
    """One loss type: its kernel code, its per-token formula, its aggregation and its metrics."""

    name: str
    code: int  # its number in KernelConfig (the kernels see only FAMILY_CODES[family])
    # Per-token formula (docs/spec.md, "Per-token loss"), the only thing the kernels branch on:
    #   "clip"       PPO's clipped ratio, −min(r1·A, r2·A)        (grpo, bnpo, dr_grpo, dapo, luspo)
    #   "is_weight"  a capped, stop-gradient IS weight on log π   (cispo)
    #   "soft_gate"  a sigmoid gate instead of a hard clip         (sapo)
    family: str
    # How Σ over tokens becomes the loss (docs/spec.md, "Aggregation"):
    #   "row_mean"           mean over rows of each row's token mean (grpo, sapo)
    #   "batch_token_mean"   Σ m·L / Σ m over the batch (bnpo)
    #   "fixed_length"       Σ m·L / (B · max_completion_length) (dr_grpo)
    #   "global_token_mean"  Σ m·L / num_items_in_batch, the token count of the whole step (dapo, cispo)
    #   "row_sum_mean"       mean over rows of each row's token sum (luspo)
    aggregation: str
    flag_metrics: tuple  # the clip-flag metrics it reports (besides entropy and kl)
    delta: bool = False  # accepts delta (two-sided clipping)

    @property
    def uses_num_items(self) -> bool:
        """True when the loss is normalized by ``num_items_in_batch`` (trainers pass the global count)."""
        return self.aggregation == "global_token_mean"


_CLIP_FLAGS = ("clip_ratio_low", "clip_ratio_high", "clip_ratio")
LOSS_TABLE = {
    t.name: t
    for t in (
        LossType("grpo", 0, "clip", "row_mean", _CLIP_FLAGS, delta=True),
        LossType("bnpo", 1, "clip", "batch_token_mean", _CLIP_FLAGS, delta=True),
        LossType("dr_grpo", 2, "clip", "fixed_length", _CLIP_FLAGS, delta=True),
        LossType("dapo", 3, "clip", "global_token_mean", _CLIP_FLAGS, delta=True),
        LossType("luspo", 4, "clip", "row_sum_mean", _CLIP_FLAGS, delta=True),
        LossType("cispo", 5, "is_weight", "global_token_mean", ("cispo_clip_ratio",)),
        LossType("sapo", 6, "soft_gate", "row_mean", ()),
    )
}
LOSS_TYPES = {name: t.code for name, t in LOSS_TABLE.items()}  # name -> code
FAMILY_CODES = {"clip": 0, "is_weight": 1, "soft_gate": 2}  # grpo_math.h enum LossFamily; Triton FAMILY
LOSS_BY_CODE = {t.code: t for t in LOSS_TABLE.values()}
CLIP_FAMILY = tuple(name for name, t in LOSS_TABLE.items() if t.family == "clip")
KL_ESTIMATORS = {"k3": 0, "k1": 1, "k2": 2}
LEVELS = {"token": 0, "sequence": 1}
SCALE_REWARDS = {"none": 0, "group": 1, "batch": 2}
BACKENDS = ("auto", "cpu", "triton", "cuda", "torch")

# Layout of the stats vector every kernel backend returns (grpo_math.h: enum Stat).
STAT_LOSS, STAT_ENTROPY, STAT_KL, STAT_CLIP_LOW, STAT_CLIP_HIGH, STAT_CLIP_REGION, STAT_CISPO_CLIP = range(7)
NUM_STATS = 8


@dataclass(frozen=True)
class KernelConfig:
    """Resolved, validated options in the form the kernels take them."""

    loss_type: int
    kl_estimator: int
    level: int
    has_delta: bool
    bias_correction_kl: bool
    scale_rewards: int
    group_size: int  # 0 when advantages are given
    temperature: float
    eps_low: float
    eps_high: float
    delta: float  # 0.0 when has_delta is False
    beta: float
    sapo_temp_pos: float
    sapo_temp_neg: float
    adv_eps: float
    max_completion_length: float
    num_items: float  # -1.0: not given, use Σ mask of this call
    # verl's per-token forms (grpo_fast/verl_losses.py: fused_policy_loss); the defaults are TRL's
    # formulas. grpo_math.h LossParams has the same fields.
    log_ratio_clamp: float = 0.0  # > 0: r = exp(clamp(s, ±c)), no gradient through r where clamped
    dual_clip_c: float = 0.0  # > 0 (clip family): for A < 0 the loss is at most −A·c (dual clip)
    is_lo: float = 0.0  # is_weight family: the weight is clamp(r, is_lo, is_hi)
    is_hi: float = -1.0  # < 0: eps_high (TRL's cispo cap); see is_bounds

    @property
    def is_bounds(self) -> tuple:
        """The is_weight family's (lo, hi): clamp(r, lo, hi) is its stop-gradient weight."""
        return self.is_lo, (self.eps_high if self.is_hi < 0 else self.is_hi)

    @property
    def loss(self) -> LossType:
        return LOSS_BY_CODE[self.loss_type]

    @property
    def family(self) -> int:
        """The per-token formula's code, all the kernels branch on (grpo_math.h enum LossFamily)."""
        return FAMILY_CODES[self.loss.family]

    @property
    def is_clip_family(self) -> bool:
        return self.loss.family == "clip"


def metric_names(loss_type: str, beta: float) -> list[str]:
    """Names of the metrics ``grpo_loss`` returns for these options, in a fixed order."""
    names = ["entropy"]
    if beta != 0.0:
        names.append("kl")
    return names + list(LOSS_TABLE[loss_type].flag_metrics)


# Where each metric sits in the stats vector.
METRIC_STAT_INDEX = {
    "entropy": STAT_ENTROPY,
    "kl": STAT_KL,
    "clip_ratio_low": STAT_CLIP_LOW,
    "clip_ratio_high": STAT_CLIP_HIGH,
    "clip_ratio": STAT_CLIP_REGION,
    "cispo_clip_ratio": STAT_CISPO_CLIP,
}
