"""OpenRLHF's actor log-probs and entropy through grpo_fast's kernels.

OpenRLHF's ``Actor.forward`` (openrlhf/models/actor.py) turns the model's (B, S, V) logits into the
per-token log-probs of the sampled tokens with ``log_probs_from_logits`` and, when the entropy
bonus is on (``--actor.entropy_coef``), into per-token entropies with ``compute_entropy``. Those
two are the vocabulary-sized part of an OpenRLHF policy update (its ``PolicyLoss``, the KL and the
aggregation run on (B, T) vectors and cost nothing next to them). ``enable()`` replaces both, in
the process it runs in, with ``grpo_fast.logprobs``: one kernel pass forward, one backward, no
softmax or log-softmax (B, S, V) temporaries, the same values and gradients.

One line to switch, for OpenRLHF's Ray launcher (every Ray worker gets the patch through Ray's
``worker_process_setup_hook``):

    - python -m openrlhf.cli.train_ppo_ray  --pretrain ... (OpenRLHF's arguments)
    + python -m grpo_fast.integrations.openrlhf --pretrain ... (the same arguments)

or, in your own driver, ``ray.init(runtime_env=grpo_fast.integrations.openrlhf.ray_runtime_env())``
before OpenRLHF's ``train(args)``; in a single process, ``grpo_fast.integrations.openrlhf.enable()``.

What is and is not replaced (docs/spec.md, "OpenRLHF"):

* replaced: ``log_probs_from_logits`` and ``compute_entropy`` as ``Actor.forward`` calls them (and
  in ``openrlhf.models.utils`` for other callers). ``log_probs_from_logits(logits, labels,
  temperature)`` no longer divides ``logits`` in place when ``temperature != 1`` (the actor passes
  logits it has already divided, with the default temperature 1); values are those of softmax at
  that temperature.
* kept: OpenRLHF's ``PolicyLoss`` (any ``policy_loss_type``), KL estimators and aggregation: they
  read the per-token vectors and keep their exact semantics. The packed-samples path
  (``--packing_samples``) needs flash-attn's varlen attention and was not tested here.
* tested versions: OpenRLHF 0.11.2 (``TESTED`` below); ``enable()`` refuses another version with
  an error naming it, as does the launcher.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from ..logprobs import logprobs as _grpo_logprobs

__all__ = ["enable", "disable", "enabled", "ray_runtime_env", "log_probs_from_logits", "compute_entropy", "main"]

TESTED = ("0.11.2", "0.12")  # OpenRLHF versions v with TESTED[0] <= v < TESTED[1]
_PATCHED = ("log_probs_from_logits", "compute_entropy")
_MODULES = ("openrlhf.models.actor", "openrlhf.models.utils")
_THIS = "grpo_fast.integrations.openrlhf"  # also when this file runs as __main__
_originals: dict = {}
_backend = "auto"


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of ``labels`` under softmax(logits / temperature), of the logits' dtype
    and ``labels``' shape (OpenRLHF's function, by ``grpo_fast.logprobs``); differentiable."""
    logp, _ = _grpo_logprobs(logits, labels, temperature=temperature, backend=_backend)
    return logp.to(logits.dtype)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) over the last dimension, of the logits' dtype
    (OpenRLHF's function, by ``grpo_fast.logprobs``); differentiable."""
    ids = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = _grpo_logprobs(logits, ids, return_entropy=True, backend=_backend)
    return entropy.to(logits.dtype)


def check_version(version: Optional[str] = None) -> str:
    """The installed OpenRLHF version; ``RuntimeError`` if it is missing or outside ``TESTED``."""
    from packaging.version import Version  # a dependency of transformers, so of OpenRLHF
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version("openrlhf")
        except metadata.PackageNotFoundError as e:
            raise RuntimeError("grpo_fast.integrations.openrlhf: OpenRLHF is not installed "
                               "(pip install openrlhf; tested with OpenRLHF 0.11.2)") from e
    lo, hi = TESTED
    if not Version(lo) <= Version(version) < Version(hi):
        raise RuntimeError(f"grpo_fast.integrations.openrlhf: OpenRLHF {version} is outside the tested range "
                           f">={lo},<{hi}; its actor's log-prob functions may have changed. Install "
                           f"openrlhf=={lo}, or update and re-test this integration")
    return version


def enable(backend: str = "auto") -> None:
    """Route OpenRLHF's actor log-probs and entropies through grpo_fast in this process (idempotent).

    ``backend``: as in ``grpo_fast.logprobs`` ("auto" picks the fastest for the logits' device).
    Raises ``RuntimeError`` for an OpenRLHF version outside ``TESTED`` before changing anything.
    """
    global _backend
    check_version()
    import importlib

    mods = [importlib.import_module(m) for m in _MODULES]
    for mod in mods:  # every name must be there before anything is replaced
        missing = [n for n in _PATCHED if not hasattr(mod, n)]
        if missing:
            raise RuntimeError(f"grpo_fast.integrations.openrlhf: {mod.__name__} has no {missing}; "
                               "this OpenRLHF is not the one the integration was written for")
    _backend = backend
    this = sys.modules[_THIS]
    for mod in mods:
        for n in _PATCHED:
            current = getattr(mod, n)
            if current is not getattr(this, n):
                _originals[(mod.__name__, n)] = current
                setattr(mod, n, getattr(this, n))


def disable() -> None:
    """Undo ``enable()`` in this process."""
    for (mod_name, n), fn in list(_originals.items()):
        setattr(sys.modules[mod_name], n, fn)
        del _originals[(mod_name, n)]


def enabled() -> bool:
    """Whether OpenRLHF's actor uses grpo_fast's functions in this process."""
    mod = sys.modules.get("openrlhf.models.actor")
    return mod is not None and all(getattr(mod, n) is globals()[n] for n in _PATCHED)


def ray_runtime_env(runtime_env: Optional[dict] = None) -> dict:
    """``runtime_env`` (a dict for ``ray.init``) with the hook that runs ``enable()`` in every Ray worker."""
    env = dict(runtime_env or {})
    if env.get("worker_process_setup_hook") not in (None, f"{_THIS}.enable"):
        raise ValueError("runtime_env already has a worker_process_setup_hook "
                         f"({env['worker_process_setup_hook']!r}); call {_THIS}.enable() from it instead")
    env["worker_process_setup_hook"] = f"{_THIS}.enable"
    return env


def main(argv=None) -> int:
    """``python -m grpo_fast.integrations.openrlhf <openrlhf.cli.train_ppo_ray arguments>``.

    Runs OpenRLHF's launcher as ``python -m openrlhf.cli.train_ppo_ray`` would, with ``ray.init``
    wrapped so that the runtime environment OpenRLHF passes gets the setup hook (``ray_runtime_env``).
    """
    import runpy

    import ray

    check_version()
    argv = list(sys.argv[1:] if argv is None else argv)
    if ray.is_initialized():
        raise RuntimeError("grpo_fast.integrations.openrlhf: Ray is already running in this process; its workers "
                           "would not get the setup hook (start it with ray_runtime_env())")
    ray_init = ray.init

    def init(*args, runtime_env=None, **kwargs):
        return ray_init(*args, runtime_env=ray_runtime_env(runtime_env), **kwargs)

    ray.init = init
    enable()
    sys.argv = ["openrlhf.cli.train_ppo_ray", *argv]
    try:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)
    finally:
        ray.init = ray_init
    return 0


if __name__ == "__main__":
    from grpo_fast.integrations.openrlhf import (
        main as _main,  # the module's own globals, not __main__'s
    )

    sys.exit(_main())
