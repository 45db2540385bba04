"""The loss options, once: one frozen record with TRL's names and defaults.

``grpo_loss``, ``fused_linear_grpo_loss``, their module forms and the eager reference take these as
keyword arguments, and the per-call tensors of ``LossTensors`` with them. Each entry point builds
one ``GRPOOptions`` from its keywords (unknown names are a ``TypeError`` listing the known ones),
``validation.validate_loss_args`` checks it once and carries it in ``LossInputs.options``; the
kernels get it packed as ``_config.KernelConfig``.

The public functions' signatures (``inspect.signature``, ``help()``) list every execution keyword
(``Execution``: cu_seqlens, inplace, loss_scale, backend, group, vocab_start), every per-call tensor
and every option explicitly: ``with_options`` builds them from these three records, and appends the
options' documentation to their docstrings.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass(frozen=True)
class GRPOOptions:
    """The options of the GRPO loss (docs/spec.md; TRL's ``GRPOConfig`` names and defaults).

    Options (keyword arguments):
        loss_type: "dapo" (default) | "grpo" | "bnpo" | "dr_grpo" | "luspo" | "cispo" | "sapo":
            the per-token formula and the aggregation (docs/spec.md, "Per-token loss", "Aggregation").
        importance_sampling_level: "token" (default) or "sequence" (GSPO: one ratio per row).
        beta: weight of the KL penalty against the reference policy (needs ``ref_logp``); 0 = none.
        kl_estimator: "k3" (default), "k1" or "k2".
        epsilon_low, epsilon_high: the clip range [1 − ε_low, 1 + ε_high]; ``epsilon_high=None``
            means ε_low. For cispo, ε_high is the raw cap of the IS weight (e.g. 5.0).
        delta: two-sided clipping of the ratio at δ > 1 + ε_high (clip family only); None = off.
        temperature: > 0; every formula uses logits / temperature. ``grpo_loss`` (and ``fused_linear_grpo_loss``,
            padded rows only) also take a tensor:
            (B,) one τ per row or (B, T) per token ((S,) / (N,) with cu_seqlens).
        scale_rewards: "group" (default), "batch" or "none", with ``rewards``: how advantages are scaled.
        adv_eps: > 0 added to the std when scaling rewards (TRL: 1e-4).
        group_size: G, completions per prompt, with ``rewards`` (≥ 2, divides B).
        max_completion_length: the dr_grpo normalizer (default T).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for A > 0 and A ≤ 0.
        use_bias_correction_kl: multiply the KL term by the importance ratio.
        entropy_coef: c, TRL's entropy bonus: loss = policy loss − c·Σ m·H / Σ m, the mean entropy of
            this call's valid tokens at ``temperature`` (TRL 1.16 ``_compute_loss``: not normalized by
            ``num_items_in_batch`` nor by the loss type's aggregation); its gradient −c·∂H/∂z is
            written in the same fused pass. 0 (default) = off. TRL's adaptive coefficient is a new
            value per call.
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    beta: float = 0.0
    kl_estimator: str = "k3"
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    temperature: float = 1.0
    scale_rewards: str = "group"
    adv_eps: float = 1e-4
    group_size: Optional[int] = None
    max_completion_length: Optional[int] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    use_bias_correction_kl: bool = False
    entropy_coef: float = 0.0

    @classmethod
    def from_kwargs(cls, where: str, kwargs: dict) -> "GRPOOptions":
        """The record from keyword arguments; a name that is not an option raises ``TypeError``."""
        unknown = sorted(set(kwargs) - OPTION_NAMES)
        if unknown:
            raise TypeError(f"{where}() got unexpected keyword arguments {unknown}; "
                            f"the loss options are {sorted(OPTION_NAMES)}")
        return cls(**kwargs)

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class LossTensors(NamedTuple):
    """The per-call tensors of the GRPO loss besides the logits (or hidden states), completion_ids and
    advantages, in this order (``grpo_loss`` documents them). Every function taking the loss options
    takes them as keywords (``with_options`` lists them) and reads them with ``LossTensors.pop``; the
    loss modules take them per call."""

    rewards: Optional[torch.Tensor] = None
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    completion_mask: Optional[torch.Tensor] = None
    importance_sampling_ratio: Optional[torch.Tensor] = None
    num_items_in_batch: object = None  # a number, a 0-d tensor, or None

    @classmethod
    def pop(cls, kwargs: dict) -> "LossTensors":
        """Take the per-call tensors out of ``kwargs`` (a function's ``**kwargs``: the options remain)."""
        return cls(**{name: kwargs.pop(name) for name in cls._fields if name in kwargs})


class Execution(NamedTuple):
    """How a GRPO loss runs, not what it computes: the keywords ``grpo_loss`` and ``fused_linear_grpo_loss``
    share besides the per-call tensors and the options (``grpo_loss`` documents them). ``with_options``
    lists them in both signatures; each function reads them with ``Execution.pop``."""

    cu_seqlens: Optional[torch.Tensor] = None
    inplace: bool = False
    loss_scale: float = 1.0
    backend: str = "auto"
    group: object = None  # a torch.distributed ProcessGroup
    vocab_start: Optional[int] = None

    @classmethod
    def pop(cls, kwargs: dict) -> "Execution":
        """Take the execution keywords out of ``kwargs`` (a function's ``**kwargs``)."""
        return cls(**{name: kwargs.pop(name) for name in cls._fields if name in kwargs})


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(GRPOOptions))
_OPTIONS_DOC = GRPOOptions.__doc__.split("Options (keyword arguments):", 1)[1].rstrip()


def with_options(fn):
    """Give ``fn(..., **kwargs)`` a signature that lists every execution keyword (``Execution``), every
    per-call tensor (``LossTensors``) and every option as a keyword with its default, and the options'
    documentation at the end of its docstring. ``fn`` itself is unchanged."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    hints = typing.get_type_hints(Execution)
    generated = [(name, Execution._field_defaults[name], hints[name]) for name in Execution._fields]
    hints = typing.get_type_hints(LossTensors)
    generated += [(name, None, hints[name]) for name in LossTensors._fields]
    generated += [(f.name, f.default, f.type) for f in dataclasses.fields(GRPOOptions)]
    for name, default, annotation in generated:
        if name not in taken:
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
    fn.__signature__ = sig.replace(parameters=params)
    if fn.__doc__:
        fn.__doc__ = fn.__doc__.rstrip() + "\n\n    Loss options (keywords; ``grpo_fast.GRPOOptions``):" + _OPTIONS_DOC + "\n"
    return fn
