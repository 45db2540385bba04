"""Option codes shared by every backend.

The integers match ``csrc/common/grpo_math.h``; the Triton kernels take them as ``tl.constexpr``.
``KernelConfig`` is what a backend receives: validated, resolved (``epsilon_high=None`` already
replaced, ``max_completion_length`` defaulted) and free of Python strings.
"""
from __future__ import annotations

from dataclasses import dataclass

LOSS_TYPES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3, "luspo": 4, "cispo": 5, "sapo": 6}
CLIP_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
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

    @property
    def is_clip_family(self) -> bool:
        return self.loss_type <= LOSS_TYPES["luspo"]


def metric_names(loss_type: str, beta: float) -> list[str]:
    """Names of the metrics ``grpo_loss`` returns for these options, in a fixed order."""
    names = ["entropy"]
    if beta != 0.0:
        names.append("kl")
    if loss_type in CLIP_FAMILY:
        names += ["clip_ratio_low", "clip_ratio_high", "clip_ratio"]
    elif loss_type == "cispo":
        names.append("cispo_clip_ratio")
    return names


# Where each metric sits in the stats vector.
METRIC_STAT_INDEX = {
    "entropy": STAT_ENTROPY,
    "kl": STAT_KL,
    "clip_ratio_low": STAT_CLIP_LOW,
    "clip_ratio_high": STAT_CLIP_HIGH,
    "clip_ratio": STAT_CLIP_REGION,
    "cispo_clip_ratio": STAT_CISPO_CLIP,
}
