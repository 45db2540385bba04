"""The trainer's settings: every field is a command-line flag, every value checked in one place."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch


from .._config import BACKENDS, KL_ESTIMATORS, LEVELS, LOSS_TYPES, SCALE_REWARDS
from ..options import GRPOOptions


# ------------------------------------------------------------------------------------------------
# Defaults. Every field is also a command-line flag (--prompts-per-step 16, --no-warmup ...).
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    out: str = "runs/grpo_fast"  # metrics.jsonl, summary.json, PNG plots, ckpt.pt go here
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "float32"  # float32 | bfloat16 (torch.autocast around the forward passes; weights stay float32)
    # torch CPU threads. The built-in model's matmuls are tiny (~128×64 by 64×256): one thread avoids
    # OpenMP synchronization that costs more than it saves, and leaves the other cores free. 0 = torch's default.
    threads: int = 1
    # task and built-in model
    task: str = "reverse"  # reverse | add (grpo_fast/tasks.py)
    n_digits: int = 3
    model: str = "tiny"  # tiny: grpo_fast.model.TinyGPT | llama: transformers' LlamaForCausalLM from a config
    # The LM head's size. The task uses 13 tokens; the rest pad the vocabulary, as in an LLM (V = 32k-150k
    # with H = 1k-8k: V >> H), so that the LM head and the loss weigh in the update as they do there.
    # 0: the task's 13 tokens only (the loss is then a negligible part of a step).
    vocab_size: int = 32768
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    # supervised warm-up: the output format, and the answer on a fraction of the examples (see tasks.py)
    warmup_steps: int = 150  # at most; it stops earlier once the policy reaches warmup_target_reward
    # Stop the warm-up when the policy's mean reward (128 sampled completions, checked every 5 steps) reaches
    # this: the policy is then only partly right and GRPO has the rest to learn. 0: run all warmup_steps.
    warmup_target_reward: float = 0.4
    warmup_lr: float = 3e-3
    warmup_answer_frac: float = 1.0  # share of warm-up targets that are the right answer (the rest: random digits)
    warmup_batch: int = 32  # sequences per warm-up step
    # GRPO
    steps: int = 100
    prompts_per_step: int = 8  # P, across all ranks
    group_size: int = 8  # G completions per prompt
    temperature: float = 1.0
    max_new_tokens: int = 0  # 0 = the task's default
    lr: float = 1.5e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step (the rollout batch is split)
    num_iterations: int = 1  # optimizer steps on each rollout batch (TRL's num_iterations, μ)
    # loss options (grpo_fast.grpo_loss)
    loss_type: str = GRPOOptions.loss_type
    beta: float = 0.02
    kl_estimator: str = "k3"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28  # DAPO's clip-higher
    scale_rewards: str = "group"
    importance_sampling_level: str = "token"
    loss_backend: str = "auto"  # auto | cpu | triton | cuda | torch (the eager reference)
    loss_path: str = "auto"  # auto: fused-linear when the LM head is known and it is importable | fused_linear | logits
    dist: str = "ddp"  # under torchrun: ddp (DistributedDataParallel) | fsdp (FSDP2, fully_shard per block + root)
    # The loss, the log-probs and sampling then run on the shards, never on (B, T, V) logits (trainer/tp.py).
    vocab_parallel: int = 1  # under torchrun: the LM head (and a tied embedding) split along V over N ranks holding the same batch; processes: a multiple of N; 1: off
    # bookkeeping
    save_every: int = 0  # 0: only at the end
    resume: str = ""  # a checkpoint file or a run directory holding ckpt.pt
    compare: bool = False  # train twice (fused loss / eager reference) and compare
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        check_config(self)


# ------------------------------------------------------------------------------------------------
# The valid range of every field, checked in one place (TrainConfig.__post_init__): a config that
# exists is valid. The command line turns the error into argparse's exit code 2 naming the flag.
# ------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """An out-of-range TrainConfig field: ``field``, ``expected`` (the valid range in words), ``value``."""

    def __init__(self, field: str, expected: str, value):
        super().__init__(f"TrainConfig.{field} must be {expected}, got {value!r}")
        self.field, self.expected, self.value = field, expected, value


def _int(lo: int):
    return (lambda v, c: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an integer >= {lo}"


def _num(lo: float, strict: bool, hi: Optional[float] = None):
    def ok(v, c):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > lo if strict else v >= lo) and (hi is None or v <= hi)
    return ok, f"a finite number {'>' if strict else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")


def _one_of(*choices):
    return (lambda v, c: v in choices), "one of " + ", ".join(choices)


def _flag():
    return (lambda v, c: isinstance(v, bool)), "true or false"


def _device_ok(v, c) -> bool:
    if v == "auto":
        return True
    try:
        d = torch.device(v)
    except (RuntimeError, TypeError):
        return False
    return d.type != "cuda" or torch.cuda.is_available()


def _resume_ok(v, c) -> bool:
    return isinstance(v, str) and (v == "" or os.path.isfile(v) or os.path.isfile(os.path.join(v, "ckpt.pt")))


def _task_names():
    from ..tasks import TASKS
    return tuple(TASKS)


# field -> (check(value, config) -> bool, the valid range in words)
CONFIG_CHECKS = {
    "out": ((lambda v, c: isinstance(v, str) and v != "" and not (os.path.exists(v) and not os.path.isdir(v))),
            "a directory (created if missing), not an existing file"),
    "seed": _int(0),
    "device": (_device_ok, "auto, cpu, or cuda[:N] when CUDA is available (a torch.device string)"),
    "dtype": _one_of("float32", "bfloat16"),
    "threads": _int(0),
    "task": ((lambda v, c: v in _task_names()), "one of " + ", ".join(_task_names())),
    "n_digits": _int(1),
    "model": _one_of("tiny", "llama"),
    "vocab_size": _int(0),
    "n_layer": _int(1),
    "n_head": _int(1),
    "n_embd": ((lambda v, c: _int(1)[0](v, c) and (not isinstance(c.n_head, int) or c.n_head < 1 or v % c.n_head == 0)),
               "a positive integer, a multiple of --n-head"),
    "warmup_steps": _int(0),
    "warmup_lr": _num(0, True),
    "warmup_answer_frac": _num(0, False, 1),
    "warmup_target_reward": (_num(0, False)[0], "a finite number >= 0 (0: run all --warmup-steps)"),
    "warmup_batch": _int(1),
    "steps": _int(1),
    "prompts_per_step": _int(1),
    "group_size": (_int(2)[0], "an integer >= 2 (GRPO compares the completions of a group)"),
    "temperature": _num(0, True),
    "max_new_tokens": (_int(0)[0], "an integer >= 0 (0: the task's default)"),
    "lr": _num(0, False),
    "weight_decay": _num(0, False),
    "max_grad_norm": _num(0, True),
    "grad_accum": _int(1),
    "num_iterations": _int(1),
    "loss_type": _one_of(*LOSS_TYPES),
    "beta": _num(0, False),
    "kl_estimator": _one_of(*KL_ESTIMATORS),
    "epsilon_low": ((lambda v, c: _num(0, False)[0](v, c) and v < 1), "a number >= 0 and < 1"),
    "epsilon_high": _num(0, False),
    "scale_rewards": _one_of(*SCALE_REWARDS),
    "importance_sampling_level": _one_of(*LEVELS),
    "loss_backend": _one_of(*BACKENDS),
    "loss_path": _one_of("auto", "fused_linear", "logits"),
    "dist": _one_of("ddp", "fsdp"),
    "vocab_parallel": ((lambda v, c: _int(1)[0](v, c) and (v == 1 or (c.dist != "fsdp" and not c.compare))),
                       "an integer >= 1 (1: off); above 1 not with --dist fsdp nor --compare"),
    "save_every": (_int(0)[0], "an integer >= 0 (0: only at the end)"),
    "resume": (_resume_ok, "empty, a checkpoint file, or a run directory holding ckpt.pt"),
    "compare": _flag(),
    "progress": _flag(),
    "plots": _flag(),
}


def check_config(cfg: "TrainConfig") -> None:
    """Raise ConfigError (a ValueError) for the first field outside its valid range."""
    for f in dataclasses.fields(cfg):
        ok, expected = CONFIG_CHECKS[f.name]
        v = getattr(cfg, f.name)
        if not ok(v, cfg):
            raise ConfigError(f.name, expected, v)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _field_comments() -> Dict[str, str]:
    """The ``# comment`` after each TrainConfig field, for --help (the defaults block is the documentation)."""
    import inspect
    import re

    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): \w+ = [^#]*#\s*(.*)", line)
        if m:
            out[m.group(1)] = m.group(2).replace("%", "%%")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """argparse's convention (exit code 2, "prog: error: ..."), on one line: no usage dump of 40 flags."""
        self.exit(2, f"{self.prog}: error: {message} (all flags: {self.prog} --help)\n")


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    p = _Parser(prog="grpo-fast train", description="GRPO with grpo_fast on the built-in task.")
    notes = _field_comments()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        note = notes.get(f.name, "")
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=note)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            p.add_argument(flag, dest=f.name, type=typ, default=f.default, help=f"{note} (default: {f.default})".strip())
    try:
        return TrainConfig(**vars(p.parse_args(argv)))
    except ConfigError as e:
        p.error(f"argument --{e.field.replace('_', '-')}: must be {e.expected}, got {e.value}")


def _cli_args(cfg: TrainConfig) -> List[str]:
    """Command-line flags that reproduce ``cfg`` (the inverse of ``parse_args``)."""
    args = []
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("compare", "resume"):
            continue
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args
