"""Integrations of grpo_fast's kernels into training frameworks.

Each integration lives in its own submodule and imports its framework only when that submodule is
imported, so ``import grpo_fast`` and ``import grpo_fast.integrations`` never need the framework:

    from grpo_fast.integrations.trl import GRPOTrainer     # needs `pip install grpo_fast[trl]`
    from grpo_fast.integrations.verl import linear_cross_entropy   # verl's fused log-prob head; no verl needed
    grpo_fast.integrations.openrlhf.enable()                       # OpenRLHF's actor log-probs/entropy (needs openrlhf)
"""

__all__ = ["trl", "verl", "openrlhf"]
