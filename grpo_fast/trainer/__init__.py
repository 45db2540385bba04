"""A thin GRPO trainer on top of grpo_fast.

    loop.py      the training loop, to read top to bottom (nanoGPT's train.py is the model)
    config.py    TrainConfig: every setting, its flag, its valid range
    harness.py   memory measurement, checkpoints, plots
    compare.py   --compare: the fused loss against the eager reference, from the same seed
    tp.py        --vocab-parallel: the LM head split along V over ranks

``python -m grpo_fast train`` (``grpo-fast train``) runs ``main``; from Python,
``train(TrainConfig(...), model=..., task=...)``.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

import torch.distributed as dist

from . import loop, tp
from .compare import compare, compare_plot, compare_report
from .config import CONFIG_CHECKS, ConfigError, TrainConfig, _cli_args, check_config, parse_args  # noqa: F401
from .harness import load_checkpoint, peak_mem_mb, reset_peak_mem, save_checkpoint, tenth_means, write_plots
from .loop import (
    CausalLM,
    accumulate_gradients,
    advantages_for_rank,
    build_batch,
    build_default_model,
    completion_mask_from_ids,
    encode_prompts,
    gathered,
    is_fsdp,
    loss_options,
    policy_reward,
    rollout,
    sample_completions,
    sequence_logprobs,
    supervised_warmup,
    train,
    transformer_blocks,
    update,
    wrap_policy,
)

__all__ = ["TrainConfig", "ConfigError", "CONFIG_CHECKS", "check_config", "parse_args", "train", "main", "compare",
           "compare_report", "compare_plot", "CausalLM", "sample_completions", "completion_mask_from_ids",
           "encode_prompts", "sequence_logprobs", "advantages_for_rank", "build_batch", "rollout", "loss_options",
           "accumulate_gradients", "update", "policy_reward", "supervised_warmup", "build_default_model",
           "load_checkpoint", "save_checkpoint", "peak_mem_mb", "reset_peak_mem", "tenth_means", "write_plots", "loop", "tp",
           "wrap_policy", "gathered", "is_fsdp", "transformer_blocks"]

def main(argv: Optional[List[str]] = None) -> int:
    cfg = parse_args(argv)
    if cfg.compare:
        if "RANK" in os.environ:
            raise SystemExit("--compare runs its two arms as separate single-process runs: do not start it under torchrun")
        compare(cfg)
        return 0
    summary = train(cfg)
    if summary:
        print(f"reward: first tenth {summary['reward_first_tenth']:.3f} -> last tenth {summary['reward_last_tenth']:.3f} "
              f"({summary['reward_gain']:+.3f}); median step {summary['median_step_time_s']:.3f}s, of which the update "
              f"{summary['median_update_time_s']:.3f}s; update peak memory {summary['peak_mem_mb']:.0f} MB; "
              f"wrote {cfg.out}/metrics.jsonl, summary.json, {', '.join(summary['plots'])}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
