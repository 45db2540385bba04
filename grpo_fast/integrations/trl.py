"""A drop-in for TRL's ``GRPOTrainer`` whose loss is computed by grpo_fast.

Change one import and keep the rest of the script:

    - from trl import GRPOTrainer
    + from grpo_fast.integrations.trl import GRPOTrainer

(or call ``patch_trl()`` once, before ``trl.GRPOTrainer`` is looked up). Generation, rewards,
advantages, logging and the optimizer are TRL's; only ``_compute_loss`` changes. Where TRL runs
the backbone, projects every completion position through the LM head in tiles to get the per-token
log-probs, and then evaluates the loss eagerly on (B, T) tensors, the drop-in runs the backbone and
hands the completion positions' hidden states (B, T, H) and the LM head's weight (V, H) to
``grpo_fast.fused_linear_grpo_loss``: log-probs, ratio, clipping, KL, aggregation and the gradient
of the hidden states and the head come out of one fused pass that never holds the (B, T, V) logits.

The batch layout and every scaling are TRL 1.16's ``GRPOTrainer._compute_loss``:
``prompt_ids``/``prompt_mask`` + ``completion_ids``/``completion_mask`` (times ``tool_mask``),
``advantages`` (B,) or (B, T), ``old_per_token_logps`` (None = on-policy), ``ref_per_token_logps``,
``importance_sampling_ratio`` (vLLM correction, (B, T) or (B, 1)), ``num_items_in_batch`` (the
generation batch's global token count, rescaled to one accumulation window for dapo/cispo) and the
division by the gradient-accumulation steps for the other loss types. The metrics are logged under
TRL's names (``entropy``, ``kl``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean``, ``cispo_clip_ratio``), averaged over processes as TRL does.

TRL options and what they map to (all read from ``GRPOConfig`` / the trainer, as TRL reads them):

    loss_type                    loss_type (grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo); vespo on the
                                 log-prob primitive (below)
    beta                         beta, with kl_estimator="k3" (TRL's only estimator)
    epsilon / epsilon_high       epsilon_low / epsilon_high (each where TRL reads it: see IGNORED_OPTIONS below)
    delta                        delta (clip family; TRL ignores it for cispo, sapo and vespo, so do we)
    use_liger_kernel             Liger's layer kernels on the model (below); the loss stays grpo_fast's
    importance_sampling_level    importance_sampling_level
    temperature                  temperature
    use_bias_correction_kl       use_bias_correction_kl
    vllm_importance_sampling_*   importance_sampling_ratio (TRL computes the ratio; it is passed on)
    max_completion_length        max_completion_length (dr_grpo's normalizer)
    sapo_temperature_pos/neg     sapo_temperature_pos/neg
    top_entropy_quantile         a no-grad entropy pass over the same hidden states, TRL's own
                                 quantile mask, folded into the per-token ratio (it multiplies the
                                 policy term before the KL is added, exactly where TRL applies it)
    router_aux_loss_coef         MoE models: the router load-balancing loss is computed from the same
                                 backbone call and added as TRL adds it

The entropy bonus (entropy_coef, use_adaptive_entropy with entropy_target / entropy_coef_delta / _min /
_max) runs in the fused loss (its ``entropy_coef`` option, rescaled for the drop-in's loss scaling), TRL's
adaptive controller and its ``policy_loss`` / ``entropy_coef`` metrics around it.

On the log-prob primitive: loss_type="vespo", off_policy_mask_threshold, and the entropy bonus together
with top_entropy_quantile < 1 (TRL's bonus then averages over the high-entropy mask) need the
per-token log-probs (and the entropy's gradient) before the loss. With any of them the drop-in runs
``grpo_fast.fused_linear_logprobs`` (no (B, T, V) logits; one fused backward) and evaluates TRL's loss
in torch on the (B, T) vectors: ``reference.per_token_loss`` and ``reference.aggregate`` (the math every
kernel is tested against), TRL's own ``get_gamma_weights`` (VESPO's φ), ``get_off_policy_mask`` and
``get_high_entropy_mask``, TRL's entropy-bonus scaling and its adaptive coefficient update, logged as
TRL logs them (``vespo/phi_seq_mean``, ``policy_loss``, ``entropy_coef``).

Options TRL 1.16 ignores for a loss type are ignored here too, not checked and not used
(``IGNORED_OPTIONS``, by LOSS_TABLE's family): cispo reads only epsilon_high (its cap; ``epsilon`` is its
default), so epsilon, delta and the SAPO temperatures are ignored; sapo ignores epsilon, epsilon_high and
delta; the clip family ignores the SAPO temperatures; vespo ignores all of them.

use_liger_kernel=True: as in trl 1.16, whose GRPOTrainer computes the loss itself (it no longer uses Liger's
``LigerFusedLinearGRPOLoss``, nor its option restrictions) and only lets ``Trainer.train()`` patch the
model's layers (RMSNorm, SwiGLU, RoPE, ...) with Liger's Triton kernels, with
``liger_kernel_config["fused_linear_cross_entropy"]`` forced off (that patch would replace the model's
forward; TRL raises if it is asked for). The patched layers run the backbone, and the loss is grpo_fast's,
with every option above (tests/test_trl_liger.py: against TRL's own trainer with the flag).

Refused with ``ValueError``, never a silent fallback: vision-language models and a subclass that overrides
``_compute_loss``, ``compute_loss`` or ``_get_per_token_logps_and_entropies`` (its loss would otherwise be
replaced without notice), when the trainer is built; and, at the step, a model whose forward was replaced
after the trainer was built (by hand, e.g. Liger's fused_linear_cross_entropy patch): the loss runs inside
the forward the drop-in installed.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import trl
    from trl import GRPOConfig
    from trl import GRPOTrainer as _TRLGRPOTrainer
except ImportError as _e:  # an optional extra: say how to get it
    raise ImportError(
        "grpo_fast.integrations.trl needs TRL: install it with `pip install 'grpo_fast[trl]'` "
        f"(tested with trl 1.16). Import failed with: {_e}"
    ) from _e
from packaging.version import Version  # noqa: E402 - a dependency of trl's transformers

import grpo_fast
from grpo_fast import reference
from grpo_fast._config import LOSS_TABLE, LOSS_TYPES
from grpo_fast.options import GRPOOptions
from grpo_fast.validation import validate_loss_args

__all__ = ["GRPOTrainer", "GRPOConfig", "patch_trl", "unpatch_trl", "TRL_METRIC_NAMES", "TESTED_TRL"]

# The TRL release whose _compute_loss this module reproduces line for line. Another minor release may
# change the loss (TRL changes it often), so it is refused below 1.16 and warned about above.
TESTED_TRL = (1, 16)

# grpo_fast metric name -> the name TRL logs the same quantity under.
TRL_METRIC_NAMES = {
    "entropy": "entropy",
    "kl": "kl",
    "clip_ratio_low": "clip_ratio/low_mean",
    "clip_ratio_high": "clip_ratio/high_mean",
    "clip_ratio": "clip_ratio/region_mean",
    "cispo_clip_ratio": "cispo_clip_ratio",
}

# Loss types computed on the log-prob primitive (fused_linear_logprobs, then the loss in torch on (B, T)
# vectors), with the loss type whose aggregation they share.
PRIMITIVE_LOSS_TYPES = {"vespo": "dapo"}

# The loss options (GRPOOptions names) that TRL 1.16's _compute_loss never reads for a loss type, by
# the per-token family of LOSS_TABLE: the clip family reads epsilon, epsilon_high and delta but not the
# SAPO temperatures; cispo (is_weight) caps the ratio at epsilon_high only (TRL's ``epsilon`` matters only
# as epsilon_high's default, which the trainer has already resolved); sapo (soft_gate) reads its
# temperatures and no clip option. vespo's branch computes φ from the sequence's log-ratio and its own
# vespo_* options: none of them enter its loss or its metrics. grpo_fast neither checks nor uses an
# ignored option: GRPOOptions' default stands in for it (docs/spec.md, the per-loss-type table).
_SAPO_TEMPERATURES = ("sapo_temperature_pos", "sapo_temperature_neg")
_IGNORED_BY_FAMILY = {
    "clip": _SAPO_TEMPERATURES,
    "is_weight": ("epsilon_low", "delta") + _SAPO_TEMPERATURES,
    "soft_gate": ("epsilon_low", "epsilon_high", "delta"),
}
IGNORED_OPTIONS = {name: _IGNORED_BY_FAMILY[t.family] for name, t in LOSS_TABLE.items() if t.family in _IGNORED_BY_FAMILY}
IGNORED_OPTIONS["vespo"] = ("epsilon_low", "epsilon_high", "delta") + _SAPO_TEMPERATURES
_OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOOptions)}

# Methods whose override in a subclass would change the policy loss that the drop-in replaces.
_LOSS_METHODS = ("_compute_loss", "compute_loss", "_get_per_token_logps_and_entropies")


def _trl_version() -> tuple:
    """(major, minor) of the installed trl (packaging's parser: "1.16.0rc1" is (1, 16))."""
    return Version(trl.__version__).release[:2]


if _trl_version() < TESTED_TRL:
    raise ImportError(
        f"grpo_fast.integrations.trl reproduces the loss of trl {TESTED_TRL[0]}.{TESTED_TRL[1]}, got trl "
        f"{trl.__version__}; upgrade with `pip install 'trl>={TESTED_TRL[0]}.{TESTED_TRL[1]}'`"
    )


def unsupported_options(args) -> list:
    """The options of a ``GRPOConfig`` that grpo_fast cannot reproduce, each as a sentence (empty: all fine)."""
    out = []
    loss_type = getattr(args, "loss_type", GRPOOptions.loss_type)
    if loss_type not in LOSS_TYPES and loss_type not in PRIMITIVE_LOSS_TYPES:
        out.append(f"loss_type={loss_type!r} is not implemented by grpo_fast (it implements "
                   f"{sorted(LOSS_TYPES) + sorted(PRIMITIVE_LOSS_TYPES)})")
    if loss_type in LOSS_TABLE and LOSS_TABLE[loss_type].aggregation == "fixed_length" and getattr(args, "max_completion_length", 1) is None:
        out.append(f"loss_type={loss_type!r} normalizes by max_completion_length, which is None")
    return out


def _logit_scale(text_config) -> float:
    """The multiplier some architectures apply to the logits before any softcap (TRL's add_fused_lm_head reads the same fields)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by logits_scaling, HyperCLOVA X multiplies by it.
        s = text_config.logits_scaling
        scale = s if text_config.model_type == "hyperclovax" else 1.0 / s
    return 1.0 if scale is None else float(scale)


def _linear_grpo_loss(hidden, weight, bias, completion_ids, advantages, *, logit_scale, logit_softcap, chunk_size, fused_linear, **options):
    """(loss, metrics) from hidden (B, T, H) and the LM head weight (V, H) / bias (V,).

    The fused-linear path never materializes the (B, T, V) logits; the logits path (fused_linear=False,
    or a grpo_fast without fused_linear_grpo_loss) projects first, then runs grpo_loss's one fused pass
    in place on the fresh logits (nothing else reads them).
    """
    fl = getattr(grpo_fast, "fused_linear_grpo_loss", None)
    if fused_linear and fl is not None:
        return fl(hidden, weight, completion_ids, advantages, bias=bias, logit_scale=logit_scale,
                  logit_softcap=logit_softcap, chunk_size=chunk_size, **options)
    logits = F.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    inplace = True
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
        inplace = False  # tanh's backward reads its output: do not overwrite it
    return grpo_fast.grpo_loss(logits, completion_ids, advantages, inplace=inplace, **options)


def _linear_logprobs(hidden, weight, bias, completion_ids, *, temperature, logit_scale, logit_softcap, backend, fused_linear,
                     chunk_size, mask=None):
    """Per-token (logp, entropy) (B, T) float32, both differentiable in hidden, weight and bias: the
    log-prob primitive, from the hidden states (fused_linear) or from projected logits. mask: the
    completion mask; a masked token is not computed (logp and entropy 0 there, no gradient)."""
    if fused_linear:
        return grpo_fast.fused_linear_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature,
                                               logit_scale=logit_scale, logit_softcap=logit_softcap,
                                               return_entropy=True, mask=mask, chunk_size=chunk_size, backend=backend)
    logits = F.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return grpo_fast.logprobs(logits, completion_ids, temperature=temperature, return_entropy=True, mask=mask,
                              backend=backend)


@torch.no_grad()
def _linear_entropy(hidden, weight, bias, completion_ids, *, temperature, logit_scale, logit_softcap, backend, fused_linear, chunk_size):
    """Per-token entropy (B, T) float32 at ``temperature``, without gradient."""
    fl = getattr(grpo_fast, "fused_linear_token_logprobs", None)
    if fused_linear and fl is not None:
        _, ent = fl(hidden, weight, completion_ids, bias=bias, temperature=temperature, logit_scale=logit_scale,
                    logit_softcap=logit_softcap, return_entropy=True, chunk_size=chunk_size, backend=backend)
        return ent
    logits = F.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    _, ent = grpo_fast.token_logprobs(logits, completion_ids, temperature, return_entropy=True, backend=backend)
    return ent


def _router_aux_loss(text_config, router_logits, attention_mask):
    """The Mixture-of-Experts load-balancing loss, as TRL's fused LM head computes it (Mixtral's function)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts")
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)


def _install_hidden_forward(model) -> None:
    """Wrap ``model.forward`` so that ``model(..., grpo_fast_loss=fn)`` returns ``fn(hidden, weight, bias, scale, softcap)``.

    The loss is computed inside the model's forward, as TRL's own fused LM head does, so that the call
    goes through whatever wraps the model (DDP, FSDP, DeepSpeed, accelerate's autocast) and the head's
    parameters are gathered while that wrapper expects them to be. Without ``grpo_fast_loss`` the
    forward is the previous one, so generation and TRL's no-grad log-prob passes are unchanged.
    With ``grpo_fast_aux=True`` (MoE models) the router load-balancing loss is returned as a third
    element (None when the model returns no router logits).
    """
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = _logit_scale(text_config)

    # Keep the class forward's signature: `generate` validates its kwargs against it (TRL does the same).
    @functools.wraps(type(model).forward)
    def _forward(self, *args, grpo_fast_loss=None, grpo_fast_aux=False, **kwargs):
        if grpo_fast_loss is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        # Like the model's own forward (and TRL's head): router logits whenever the config asks for them.
        if grpo_fast_aux or getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        out = self.base_model(*args, **kwargs)
        hidden = out.last_hidden_state  # (B, P + T, H)
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        try:  # FSDP2 shards the head as DTensors; the loss needs the whole (V, H) matrix, as in TRL
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch without torch.distributed
            DTensor = ()
        if DTensor and isinstance(weight, DTensor):
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        loss, metrics = grpo_fast_loss(hidden.to(weight.device), weight, bias, scale, softcap)
        if not grpo_fast_aux:
            return loss, metrics
        aux = None
        if kwargs.get("output_router_logits") and getattr(out, "router_logits", None) is not None:
            aux = _router_aux_loss(text_config, out.router_logits, kwargs.get("attention_mask"))
        return loss, metrics, aux

    model.forward = types.MethodType(_forward, model)
    model._grpo_fast_forward = _forward  # for _has_hidden_forward


def _has_hidden_forward(model) -> bool:
    """Whether ``model.forward`` still calls the one ``_install_hidden_forward`` put there: that function, or
    a decorator chain down to it through ``__wrapped__`` (accelerate's mixed-precision wrapping, applied in
    ``Trainer.train()``, wraps it so: autocast, then convert_outputs_to_fp32)."""
    target = getattr(model, "_grpo_fast_forward", None)
    f = model.forward
    for _ in range(64):  # a decorator chain is short; a cycle must not hang
        f = getattr(f, "__func__", f)
        if f is target:
            return True
        f = getattr(f, "__wrapped__", None)
        if f is None:
            return False
    return False


class GRPOTrainer(_TRLGRPOTrainer):
    """``trl.GRPOTrainer`` with the policy loss computed by grpo_fast (see the module docstring).

    Takes every argument of ``trl.GRPOTrainer`` plus, keyword-only:

    Args:
        grpo_fast_backend: "auto" | "cpu" | "triton" | "cuda" | "torch" — grpo_fast's kernel backend.
        grpo_fast_fused_linear: True (default): the fused-linear path, no (B, T, V) logits. False:
            project to logits, then grpo_loss's fused pass (in place on the logits).
        grpo_fast_chunk_size: tokens per chunk on the fused-linear path (None: grpo_fast's default).

    Raises:
        ValueError: when built with an option grpo_fast does not implement (see ``unsupported_options``),
            an option value grpo_fast rejects, or a subclass overriding the loss.

    Example:
        >>> from trl import GRPOConfig
        >>> from grpo_fast.integrations.trl import GRPOTrainer
        >>> trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=reward_len,
        ...                       args=GRPOConfig(beta=0.04), train_dataset=dataset)
        >>> trainer.train()
    """

    def __init__(self, *args, grpo_fast_backend: str = "auto", grpo_fast_fused_linear: bool = True,
                 grpo_fast_chunk_size: Optional[int] = None, **kwargs):
        # Refuse before the (possibly large) model is loaded.
        self._grpo_fast_check_subclass()
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            self._grpo_fast_raise(unsupported_options(config))
        grpo_fast.api.check_backend(grpo_fast_backend)
        self.grpo_fast_backend = grpo_fast_backend
        self.grpo_fast_fused_linear = bool(grpo_fast_fused_linear)
        self.grpo_fast_chunk_size = grpo_fast_chunk_size
        super().__init__(*args, **kwargs)

        problems = unsupported_options(self.args)
        if self._is_vlm:
            problems.append("vision-language models (a processor as processing_class) are not supported by the grpo_fast loss")
        self._grpo_fast_raise(problems)
        self._grpo_fast_check_values()

        _install_hidden_forward(self._grpo_fast_head_model())
        self._grpo_fast_cast_fp32 = bool(getattr(self.args, "cast_lm_head_to_fp32", False))

    # ---- checks ----------------------------------------------------------------------------------

    @classmethod
    def _grpo_fast_check_subclass(cls) -> None:
        for name in _LOSS_METHODS:
            if getattr(cls, name) is not getattr(GRPOTrainer, name):
                owner = next(k for k in cls.__mro__ if name in k.__dict__)
                raise ValueError(
                    f"{cls.__name__} overrides {name} (in {owner.__module__}.{owner.__qualname__}): the grpo_fast drop-in "
                    f"replaces TRL's loss, so that override would be silently ignored or silently bypass grpo_fast. "
                    f"Subclass trl.GRPOTrainer instead to keep a custom loss."
                )

    def _grpo_fast_head_model(self):
        """The module TRL gave its fused LM head, whose forward the drop-in wraps: the transformers model
        under a PEFT wrapper."""
        from accelerate.utils import is_peft_model

        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    def _grpo_fast_check_forward(self) -> None:
        """The loss runs inside the model's forward (``_install_hidden_forward``): a patch that replaced that
        forward after the trainer was built would take the ``grpo_fast_loss`` argument into its ``**kwargs``
        and return logits instead of the loss. With use_liger_kernel=True, Trainer.train() patches the model
        with Liger's kernels; TRL 1.16 forces ``liger_kernel_config["fused_linear_cross_entropy"] = False``
        (the only Liger patch that replaces the forward), so this only fails for a patch applied by hand."""
        model = self._grpo_fast_head_model()
        if not _has_hidden_forward(model):
            raise ValueError(
                f"the forward of {type(model).__name__} was replaced after grpo_fast's GRPOTrainer was built (by "
                f"{getattr(model.forward, '__qualname__', model.forward)!r}), so the grpo_fast loss would not run: "
                "apply model patches (e.g. Liger's apply_liger_kernel_to_*) before building the trainer, and keep "
                "Liger's fused_linear_cross_entropy off (TRL's default with use_liger_kernel=True)"
            )

    @staticmethod
    def _grpo_fast_raise(problems) -> None:
        if problems:
            raise ValueError(
                "grpo_fast's GRPOTrainer cannot reproduce these TRL options (use trl.GRPOTrainer for them):\n  - "
                + "\n  - ".join(problems)
            )

    def _grpo_fast_check_values(self) -> None:
        """Run grpo_fast's validation on a 1-token dummy batch so that a bad option value fails now, not at step 1."""
        opts = self._grpo_fast_options()
        logits = torch.zeros(1, 1, 2)
        ids = torch.zeros(1, 1, dtype=torch.long)
        extra = {}
        if opts["beta"] != 0.0:
            extra["ref_logp"] = torch.zeros(1, 1)
        try:
            validate_loss_args(logits, ids, torch.ones(1), options=GRPOOptions(**opts), **extra)
        except (ValueError, TypeError) as e:
            raise ValueError(f"grpo_fast rejects this GRPOConfig: {e}") from e

    def _grpo_fast_options(self) -> dict:
        """grpo_fast's loss options from the trainer's current settings (read where TRL's _compute_loss reads them)."""
        # vespo runs on the log-prob primitive; its options here are those of the loss type it aggregates like.
        lt = PRIMITIVE_LOSS_TYPES.get(self.loss_type, self.loss_type)
        opts = dict(
            loss_type=lt,
            importance_sampling_level=self.importance_sampling_level,
            temperature=self.temperature,
            beta=self.beta,
            kl_estimator="k3",
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.args.delta,
            max_completion_length=self.max_completion_length if LOSS_TABLE[lt].aggregation == "fixed_length" else None,
            sapo_temperature_pos=self.args.sapo_temperature_pos,
            sapo_temperature_neg=self.args.sapo_temperature_neg,
            use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
        )
        # What TRL ignores for this loss type is not validated (nor used): the defaults stand in for it.
        opts.update({name: _OPTION_DEFAULTS[name] for name in IGNORED_OPTIONS.get(self.loss_type, ())})
        return opts

    # ---- the loss --------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        # Settings can be changed on a built trainer; re-check the cheap ones so nothing is bypassed.
        self._grpo_fast_raise(unsupported_options(types.SimpleNamespace(
            loss_type=self.loss_type, entropy_coef=self.entropy_coef, use_adaptive_entropy=self.use_adaptive_entropy,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            max_completion_length=self.max_completion_length,
        )))
        self._grpo_fast_check_forward()
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        opts = self._grpo_fast_options()
        lt = opts["loss_type"]

        # The rollout engine's importance-sampling ratio multiplies the policy term (not the KL), as in TRL.
        isr = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            isr = inputs["importance_sampling_ratio"]
            if isr.dim() == 2 and isr.size(1) == 1:  # sequence_* modes give one ratio per row
                isr = isr.squeeze(1)

        # Normalization: grpo_fast aggregates like TRL's loss before the accumulation scaling; the
        # remaining factor is applied to the scalar (autograd scales the fused gradient by it).
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items = None
        if LOSS_TABLE[lt].uses_num_items:
            # TRL: Σ m·L / (n / P · GA / S) in train, Σ m·L / (n / P) in eval, n = max(num_items_in_batch, 1).
            n = inputs["num_items_in_batch"]
            num_items = max(float(n.item() if isinstance(n, torch.Tensor) else n), 1.0)
            scale = float(self.accelerator.num_processes)
            if mode == "train":
                scale *= self.args.steps_per_generation / ga
        else:
            scale = 1.0 / ga

        per_call = dict(
            old_logp=inputs.get("old_per_token_logps"),  # None: on-policy, ratio 1 with gradient
            ref_logp=inputs["ref_per_token_logps"] if opts["beta"] != 0.0 else None,
            completion_mask=mask,
            num_items_in_batch=num_items,
        )
        advantages = inputs["advantages"]
        if advantages.dim() == 2 and advantages.size(1) == 1:
            advantages = advantages.squeeze(1)
        top_q = self.top_entropy_quantile
        backend, fused_linear, chunk = self.grpo_fast_backend, self.grpo_fast_fused_linear, self.grpo_fast_chunk_size
        cast_fp32 = self._grpo_fast_cast_fp32
        # vespo and the off-policy mask need the log-probs before the loss: the log-prob primitive, then
        # TRL's loss in torch on the (B, T) vectors. So does the entropy bonus with top_entropy_quantile < 1
        # (TRL's bonus then averages over mask × the high-entropy mask, which the fused loss does not take).
        bonus = self._entropy_bonus_enabled
        primitive = (self.loss_type in PRIMITIVE_LOSS_TYPES or self.off_policy_mask_threshold is not None
                     or (bonus and top_q < 1.0))
        extra = {}
        if bonus and not primitive:
            # The fused loss's entropy_coef: TRL subtracts c·mean_m(H)/GA from the loss, which the drop-in
            # returns as `scale`·(the fused loss), so the fused loss gets c/(GA·scale).
            opts = dict(opts, entropy_coef=self._grpo_fast_entropy_coef() / (ga * scale))

        def loss_fn(hidden, weight, bias, logit_scale, softcap):
            h = hidden[:, -T - 1:-1]  # position i scores token i + 1: the completion's T positions
            ctx = nullcontext()
            if cast_fp32:  # TRL's cast_lm_head_to_fp32: head in float32, outside autocast
                h, weight = h.float(), weight.float()
                bias = None if bias is None else bias.float()
                ctx = torch.autocast(h.device.type, enabled=False)
            ids = completion_ids.to(h.device)
            ratio = isr
            if primitive:
                with ctx:
                    # the padding (mask 0) is not computed: its logits are not read, its rows get no gradient
                    logp, ent = _linear_logprobs(h, weight, bias, ids, temperature=opts["temperature"],
                                                 logit_scale=logit_scale, logit_softcap=softcap, backend=backend,
                                                 fused_linear=fused_linear, chunk_size=chunk, mask=mask.to(h.device))
                return self._grpo_fast_primitive_loss(logp, ent, inputs, mask, advantages, isr, opts, per_call,
                                                      scale, ga, mode, extra)
            with ctx:
                if top_q < 1.0:
                    # TRL's high-entropy mask multiplies the policy term before the vLLM ratio and before the
                    # KL is added: the same place as importance_sampling_ratio, so it folds into it.
                    ent = _linear_entropy(h.detach(), weight.detach(), None if bias is None else bias.detach(), ids,
                                          temperature=opts["temperature"], logit_scale=logit_scale,
                                          logit_softcap=softcap, backend=backend, fused_linear=fused_linear,
                                          chunk_size=chunk)
                    em = self.get_high_entropy_mask(ent, mask, 1 - top_q).to(torch.float32)
                    ratio = em if isr is None else em * (isr.unsqueeze(1) if isr.dim() == 1 else isr)
                # loss_scale: the loss is multiplied by `scale` below (and nothing else scales it before
                # backward: GRPOTrainer's loss_is_scaled_for_ga, an accelerator with one accumulation
                # step), so the kernels write that gradient and backward moves no data.
                return _linear_grpo_loss(
                    h, weight, bias, ids, advantages, logit_scale=logit_scale, logit_softcap=softcap,
                    chunk_size=chunk, fused_linear=fused_linear, backend=backend,
                    importance_sampling_ratio=ratio, loss_scale=scale, **opts, **per_call,
                )

        aux_enabled = self.aux_loss_enabled
        with self.accelerator.autocast():  # as TRL runs its forward: mixed precision when configured
            out = model(input_ids=input_ids, attention_mask=attention_mask, grpo_fast_loss=loss_fn,
                        grpo_fast_aux=aux_enabled)
        loss, metrics = out[0], out[1]
        if bonus and not primitive:
            # TRL's policy_loss metric and the adaptive controller's window statistics, from the fused loss:
            # its entropy metric is mean_m(H) over this call's valid tokens, the bonus it subtracted c'·that.
            h_mean, n_tok = metrics["entropy"].detach(), mask.sum().to(torch.float32)
            policy = loss.detach() + opts["entropy_coef"] * h_mean
            extra["policy_loss"] = policy * scale if LOSS_TABLE[lt].uses_num_items else policy
            extra["entropy_stats"] = torch.stack([h_mean.to(n_tok.device) * n_tok, n_tok])
        if scale != 1.0 and not primitive:  # the primitive path returns the scaled loss (and the entropy bonus)
            loss = loss * scale
        if aux_enabled:
            # MoE load balancing, scaled for gradient accumulation like the policy loss (TRL's order and factor).
            aux_loss = out[2]
            if aux_loss is None:
                raise ValueError("router_aux_loss_coef is set but the model returned no router logits")
            loss = loss + self.router_aux_loss_coef * aux_loss / ga
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        self._grpo_fast_log(mode, metrics, mask, advantages, opts["importance_sampling_level"])
        if "phi_seq" in extra:  # TRL's global_masked_mean of a (B, 1) tensor: a mean over rows
            phi = extra["phi_seq"]
            totals = self.accelerator.reduce(torch.stack([phi.sum(), phi.new_tensor(float(phi.shape[0]))]), reduction="sum")
            self._metrics[mode]["vespo/phi_seq_mean"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        if self._entropy_bonus_enabled:
            self._grpo_fast_entropy_controller(mode, extra)
        return loss

    def _grpo_fast_primitive_loss(self, logp, ent, inputs, mask, advantages, isr, opts, per_call, scale, ga, mode, extra):
        """TRL 1.16's _compute_loss on per-token log-probs and entropies (B, T) from the log-prob primitive:
        the per-token loss (reference.per_token_loss, or vespo's gamma-weighted REINFORCE term), the
        off-policy sequence mask, the high-entropy mask, the vLLM ratio, the KL, TRL's aggregation and
        scaling, then the entropy bonus. Returns (loss, metrics) as the fused path does."""
        o = GRPOOptions(**opts)
        maskf = mask.to(logp.dtype)
        old = per_call["old_logp"]
        if old is not None:
            # The primitive gave logp = 0 on masked tokens; TRL's terms there (ratio exp(logp − old), …) are
            # multiplied by the mask, but exp(0 − old) can overflow to inf and inf·0 is NaN: a masked token
            # takes the old log-prob instead (ratio 1), a constant, so nothing reaches a gradient.
            logp = torch.where(mask != 0, logp, old.to(logp.dtype))
        old_t = logp.detach() if old is None else old.to(logp.dtype)
        A2 = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # TRL's (B, 1) or (B, T)
        multiplier = None  # what multiplies the policy term before the KL is added, in TRL's order

        def times(x):
            nonlocal multiplier
            x = x.to(logp.dtype)
            multiplier = x if multiplier is None else multiplier * x

        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old_t)
            times(self.get_off_policy_mask(A2, logp.detach(), sampling, mask, self.off_policy_mask_threshold))
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(ent.detach(), mask, 1 - self.top_entropy_quantile)
            times(entropy_mask)
        vespo = self.loss_type == "vespo"
        if isr is not None and not vespo:
            times(isr.unsqueeze(1) if isr.dim() == 1 else isr)

        ref = per_call["ref_logp"]
        if vespo:
            # TRL's own gamma weights φ(w) (B, 1), detached; the vLLM ratio enters w, not the loss.
            phi = self.get_gamma_weights(A2, logp.detach() - old_t, mask, inputs.get("importance_sampling_ratio"),
                                         k_pos=self.args.vespo_k_pos, lambda_pos=self.args.vespo_lambda_pos,
                                         k_neg=self.args.vespo_k_neg, lambda_neg=self.args.vespo_lambda_neg)
            extra["phi_seq"] = phi.detach()
            L = -phi * A2 * logp
            if multiplier is not None:
                L = L * multiplier
            r = reference.importance_ratio(logp, maskf, o.importance_sampling_level, old)
            kl = None
            if o.beta != 0.0:
                kl = reference.kl_estimate(ref.to(logp.dtype), logp, o.kl_estimator)
                if o.use_bias_correction_kl:
                    kl = kl * r
                L = L + o.beta * kl
        else:
            L, r, kl = reference.per_token_loss(logp, maskf, advantages, o, old_logp=old, ref_logp=ref,
                                                importance_sampling_ratio=multiplier)
        agg = reference.aggregate(L, maskf, LOSS_TABLE[o.loss_type].aggregation,
                                  max_completion_length=o.max_completion_length,
                                  num_items_in_batch=per_call["num_items_in_batch"])
        loss = agg * scale
        # TRL's policy_loss metric: the policy term before the accumulation division (after it for the
        # num_items_in_batch types, whose normalizer includes it).
        extra["policy_loss"] = (loss if LOSS_TABLE[o.loss_type].uses_num_items else agg).detach()

        if self._entropy_bonus_enabled:
            eff = maskf if entropy_mask is None else maskf * entropy_mask
            entropy_loss = (ent * eff).sum() / eff.sum().clamp(min=1.0) / (ga if mode == "train" else 1.0)
            loss = loss - self._grpo_fast_entropy_coef() * entropy_loss
            extra["entropy_stats"] = torch.stack([(ent * eff).sum(), eff.sum()]).detach()

        n_tok = maskf.sum().clamp(min=1.0)
        metrics = {"entropy": (ent.detach() * maskf).sum() / n_tok}
        if kl is not None:
            metrics["kl"] = (kl.detach() * maskf).sum() / n_tok
        if not vespo:
            rows = reference.row_level_flags(o.importance_sampling_level, advantages)
            for name, count in reference.flag_counts(r, advantages.to(logp.dtype), maskf, o, rows).items():
                metrics[name] = count / (mask.shape[0] if rows else n_tok)
        return loss, metrics

    def _grpo_fast_entropy_coef(self) -> float:
        """The coefficient TRL applies in this call: the one set at the end of the previous optimizer step,
        gated off by the adaptive controller while the last window's entropy is above entropy_target."""
        if self.use_adaptive_entropy and not self._last_world_entropy <= self.args.entropy_target:
            return 0.0  # TRL's test, as written there (a NaN entropy gates the bonus off too)
        return float(self.entropy_coef)

    def _grpo_fast_entropy_controller(self, mode, extra) -> None:
        """TRL's entropy-bonus bookkeeping: the policy_loss metric, the adaptive coefficient's window
        statistics and its update at the optimizer-step boundary, the entropy_coef metric."""
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(extra["policy_loss"]).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            stats = extra["entropy_stats"]
            self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _grpo_fast_log(self, mode, metrics, mask, advantages, level) -> None:
        """Append grpo_fast's metric means under TRL's names, reduced over processes as TRL's global_masked_mean."""
        n_tok = mask.sum().float()
        # Clip flags are per row at sequence level with a per-row advantage (TRL's (B, 1) tensors).
        n_flag = n_tok.new_tensor(float(mask.shape[0])) if (level == "sequence" and advantages.dim() == 1) else n_tok
        for name, value in metrics.items():
            count = n_tok if name in ("entropy", "kl") else n_flag
            local = torch.stack([value.to(count.device).float() * count, count])
            totals = self.accelerator.reduce(local, reduction="sum")
            self._metrics[mode][TRL_METRIC_NAMES.get(name, name)].append((totals[0] / totals[1].clamp(min=1.0)).item())


_ORIGINALS: dict = {}


def patch_trl() -> None:
    """Make ``trl.GRPOTrainer`` (every import path of it) this drop-in, for code that cannot change its import.

    Classes that already subclassed ``trl.GRPOTrainer`` before the call keep TRL's loss; scripts
    should call it before building their trainer. ``unpatch_trl()`` restores TRL's class.
    """
    import trl.trainer
    import trl.trainer.grpo_trainer

    for mod in (trl, trl.trainer, trl.trainer.grpo_trainer):
        current = getattr(mod, "GRPOTrainer")
        if current is not GRPOTrainer:
            _ORIGINALS[mod.__name__] = current
        setattr(mod, "GRPOTrainer", GRPOTrainer)


def unpatch_trl() -> None:
    """Undo ``patch_trl()``."""
    import importlib

    for name, cls in list(_ORIGINALS.items()):
        setattr(importlib.import_module(name), "GRPOTrainer", cls)
        del _ORIGINALS[name]


if _trl_version()[:2] != TESTED_TRL:
    warnings.warn(
        f"grpo_fast.integrations.trl reproduces trl {TESTED_TRL[0]}.{TESTED_TRL[1]}'s GRPO loss; trl {trl.__version__} "
        "is installed and its loss may differ. Compare one step against trl.GRPOTrainer (tests/test_trl.py does).",
        stacklevel=2,
    )
