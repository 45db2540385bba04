"""grpo_fast inside verl's actor: importing this module enables it (verl 0.9.1).

One setting, in the environment of every process that imports verl (the driver and its Ray workers):

    VERL_USE_EXTERNAL_MODULES=grpo_fast.integrations.verl_plugin

``import verl`` then imports this module (``verl/__init__.py``: ``import_external_libs``), which

1. replaces verl's torch fused log-prob head, ``verl.utils.experimental.torch_functional.FusedLinearForPPO``
   (what verl's HF model forwards call when ``actor_rollout_ref.model.use_fused_kernels=True`` with
   ``fused_kernel_options.impl_backend=torch``), by :class:`FusedLinearForPPO`: the same constructor,
   call and output contract (per-token log-probs in float32 and entropies in the hidden states'
   dtype, of the labels' shape, (1, total_nnz) in verl's packed remove-padding layout or (B, T)
   padded; logits divided by verl's temperature), computed by ``grpo_fast.fused_linear_logprobs``;
2. registers grpo_fast's implementations of verl's policy losses (``grpo_fast.verl_losses``) in verl's
   registry under ``grpo_fast_<name>`` (``grpo_fast_vanilla``, ``grpo_fast_gspo``, ...), chosen with
   ``actor_rollout_ref.actor.policy_loss.loss_mode=grpo_fast_vanilla``;
3. checks the configuration: verl outside the tested versions (:data:`VERL_TESTED`) raises
   RuntimeError at import, and a model built with ``use_fused_kernels=True`` and a fused-kernel
   backend grpo_fast does not replace ("triton", "liger") raises ValueError when verl patches the
   model (``apply_monkey_patch``), before any step runs.

Why not an entry point in verl's ``verl.plugins`` group: verl 0.9.1 loads those inside
``except Exception: logging.debug(...)``, so a failed check would leave verl running its own code
without a word, and every installation of grpo_fast would enable it. An import error from
``VERL_USE_EXTERNAL_MODULES`` stops ``import verl``.

:func:`disable` restores verl's own functions (the tests run both paths in one process).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import verl_losses
from ..logprobs import fused_linear_logprobs

__all__ = ["VERL_TESTED", "LOSS_PREFIX", "FusedLinearForPPO", "check_verl_version", "enable", "disable",
           "is_enabled"]

VERL_TESTED = ("0.9.1",)  # the verl versions this adapter was tested against (tests/test_verl_adapter.py)
LOSS_PREFIX = "grpo_fast_"
_BACKENDS = ("torch",)  # verl's fused-kernel backends whose computation grpo_fast replaces

_saved: dict = {}  # what enable() replaced: name -> verl's original


def check_verl_version(version: str) -> None:
    """RuntimeError unless ``version`` is one of :data:`VERL_TESTED`."""
    if version not in VERL_TESTED:
        raise RuntimeError(
            f"grpo_fast.integrations.verl_plugin: verl {version} is installed, but the adapter was tested with "
            f"verl {', '.join(VERL_TESTED)} only (it replaces verl internals that change between releases). "
            f"Install verl=={VERL_TESTED[-1]} or remove grpo_fast.integrations.verl_plugin from "
            f"VERL_USE_EXTERNAL_MODULES")


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` contract on grpo_fast's fused-linear log-probs.

    ``FusedLinearForPPO(chunk_size=512, impl_backend="torch")(hidden_states, vocab_weights, input_ids,
    temperature=1.0)`` returns ``(log_probs, entropy)`` of ``softmax(hidden_states · vocab_weightsᵀ /
    temperature)`` at ``input_ids``: hidden_states (T, H) or (B, T, H), input_ids of its leading shape,
    log_probs float32, entropy in hidden_states' dtype (before autocast), both differentiable in
    hidden_states and vocab_weights. Under autocast (verl's engine step with bfloat16 mixed precision)
    both inputs are cast to autocast's dtype first, as verl's matmul is. ``chunk_size`` is the number of
    tokens per chunk, as in verl. ``impl_backend`` other than "torch" raises ValueError (grpo_fast does not
    replace Liger's head).
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        _check_backend(impl_backend)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0):
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() not in (2, 3):
            got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else hidden_states
            raise ValueError(f"hidden_states must be a (T, H) or (B, T, H) tensor, got {got!r}")
        if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(f"input_ids must have hidden_states' leading shape {tuple(hidden_states.shape[:-1])}, "
                             f"got {tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids!r}")
        device, out_dtype = hidden_states.device.type, hidden_states.dtype
        if torch.is_autocast_enabled(device):  # verl's `hidden_states @ vocab_weights.t()` runs in autocast's dtype
            dtype = torch.get_autocast_dtype(device)
            hidden_states, vocab_weights = hidden_states.to(dtype), vocab_weights.to(dtype)
        logp, ent = fused_linear_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                          temperature=temperature, return_entropy=True, chunk_size=self.chunk_size)
        return logp, ent.to(out_dtype)


def _check_backend(impl_backend: Optional[str]) -> None:
    if impl_backend not in _BACKENDS:
        raise ValueError(
            f"fused_kernel_options.impl_backend={impl_backend!r}: with grpo_fast.integrations.verl_plugin enabled, "
            f"verl's fused log-prob head runs on grpo_fast, which replaces the {' / '.join(_BACKENDS)} backend only; "
            f"set actor_rollout_ref.model.fused_kernel_options.impl_backend=torch (or disable the plugin)")


def _checked_patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend=None):
    """verl's ``patch_forward_with_backends``, after refusing a fused backend grpo_fast does not replace."""
    if use_fused_kernels:
        _check_backend(fused_kernels_backend)
    return _saved["patch_forward_with_backends"](model, use_fused_kernels=use_fused_kernels,
                                                  fused_kernels_backend=fused_kernels_backend)


def _loss_names():
    return {LOSS_PREFIX + name: fn for name, fn in verl_losses.POLICY_LOSSES.items()}


def enable() -> None:
    """Check verl's version, patch its torch fused head, register the ``grpo_fast_*`` policy losses.

    Idempotent. Raises RuntimeError for an untested verl and for a loss name already registered by
    someone else.
    """
    if _saved:
        return
    import verl
    check_verl_version(verl.__version__)
    from verl.models.transformers import monkey_patch
    from verl.trainer.ppo import core_algos
    from verl.utils.experimental import torch_functional

    taken = sorted(n for n in _loss_names() if n in core_algos.POLICY_LOSS_REGISTRY)
    if taken:
        raise RuntimeError(f"verl's policy-loss registry already has {taken}; grpo_fast registers its losses "
                           f"under these names and will not replace another implementation")
    _saved["FusedLinearForPPO"] = torch_functional.FusedLinearForPPO
    _saved["patch_forward_with_backends"] = monkey_patch.patch_forward_with_backends
    torch_functional.FusedLinearForPPO = FusedLinearForPPO
    monkey_patch.patch_forward_with_backends = _checked_patch_forward_with_backends
    for name, fn in _loss_names().items():
        core_algos.register_policy_loss(name)(fn)


def disable() -> None:
    """Restore verl's own fused head and model patching and unregister the ``grpo_fast_*`` losses."""
    if not _saved:
        return
    from verl.models.transformers import monkey_patch
    from verl.trainer.ppo import core_algos
    from verl.utils.experimental import torch_functional

    torch_functional.FusedLinearForPPO = _saved.pop("FusedLinearForPPO")
    monkey_patch.patch_forward_with_backends = _saved.pop("patch_forward_with_backends")
    for name in _loss_names():
        core_algos.POLICY_LOSS_REGISTRY.pop(name, None)


def is_enabled() -> bool:
    return bool(_saved)


enable()
