"""Around the training loop: memory measurement, checkpoints, plots."""
from __future__ import annotations

import dataclasses
import os
import random
import resource
from typing import Dict, List

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor


# ------------------------------------------------------------------------------------------------
# Checkpoints, metrics, plots
# ------------------------------------------------------------------------------------------------
_LIBC = None


def _malloc_trim() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim), so that the next peak-RSS
    window starts from the memory in use, not from what an earlier phase freed but malloc kept."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def reset_peak_mem(device: torch.device, trim: bool = False) -> None:
    """Start a new peak-memory window: the CUDA allocator's peak, or on Linux the process's peak RSS
    (writing 5 to /proc/self/clear_refs resets VmHWM; ``trim`` first returns freed heap pages)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    if trim:
        _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the whole process lifetime
        pass


def peak_mem_mb(device: torch.device) -> float:
    """GPU: peak bytes allocated by torch since reset_peak_mem. CPU: the process's peak resident set
    size since then (VmHWM; it includes the Python/torch baseline of a few hundred MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_checkpoint(path: str, step: int, lm, ref_lm, optimizer, gens: Dict[str, torch.Generator], cfg):
    """Called on every rank (under FSDP2 the full weights and optimizer state are gathered from the
    shards, a collective); rank 0 writes. The model and the optimizer are saved as full state dicts
    keyed by parameter name (torch.distributed.checkpoint's ``get_state_dict``), the same file
    whether the run was one process, DDP, FSDP2 or ``--vocab-parallel`` (the head's rows gathered
    from the ranks of the tp group): any of them resumes from it."""
    from . import tp

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the full tensors, on rank 0 only
    model_state = get_model_state_dict(lm.model, options=opts)
    optim_state = get_optimizer_state_dict(lm.model, optimizer, options=opts)
    ref_state = None if ref_lm is None else ref_lm.model.state_dict()
    if tp.find_split(lm.model) is not None:  # the head's rows of every rank (a collective)
        weights, moments = tp.full_state(lm.model, optimizer)
        ref_weights = None if ref_lm is None else tp.full_state(ref_lm.model)[0]
        if _is_main():
            model_state.update(weights)
            for name, st in optim_state["state"].items():
                st.update(moments.get(name, {}))
            if ref_state is not None:
                ref_state.update(ref_weights)
    if not _is_main():
        return
    state = {
        "step": step,
        "model": model_state,
        "ref_model": ref_state,
        "optimizer": optim_state,
        "optimizer_keys": "names",
        "generators": {k: g.get_state() for k, g in gens.items()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
        "config": dataclasses.asdict(cfg),
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def load_checkpoint(path: str, lm, ref_lm, optimizer, gens: Dict[str, torch.Generator]) -> int:
    """Every rank reads the file; under FSDP2 each keeps its shard of the weights and optimizer state,
    with ``--vocab-parallel`` its rows of the LM head."""
    from . import tp

    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    split = tp.find_split(lm.model)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(lm.model, state["model"] if split is None else tp.local_state(lm.model, state["model"]),
                         options=opts)
    if ref_lm is not None and state["ref_model"] is not None:
        ref = state["ref_model"]
        ref_lm.model.load_state_dict(ref if split is None else tp.local_state(ref_lm.model, ref))
    if state.get("optimizer_keys") == "names":
        osd = state["optimizer"] if split is None else tp.local_optimizer_state(lm.model, state["optimizer"])
        set_optimizer_state_dict(lm.model, optimizer, osd, options=opts)
    else:  # written before the checkpoints keyed the optimizer state by name: by position, one process only
        if split is not None or any(isinstance(p, DTensor) for p in lm.parameters()):
            raise ValueError(f"{path}: this checkpoint's optimizer state is keyed by position (an older format); "
                             "resume it without --dist fsdp or --vocab-parallel")
        optimizer.load_state_dict(state["optimizer"])
    for k, g in gens.items():
        g.set_state(state["generators"][k])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"])


def write_plots(out: str, rows: List[dict], title: str) -> List[str]:
    """reward.png and loss.png (and curves.png: reward, loss, kl, entropy) from the metrics rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    steps = [r["step"] for r in rows]
    written = []
    for key, fname in (("reward_mean", "reward.png"), ("loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [r[key] for r in rows])
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=100)
        plt.close(fig)
        written.append(fname)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    for ax, key in zip(axes.flat, ("reward_mean", "loss", "kl", "entropy")):
        ax.plot(steps, [r[key] if r.get(key) is not None else float("nan") for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
    written.append("curves.png")
    return written


def tenth_means(values: List[float]) -> tuple:
    k = max(1, len(values) // 10)
    return sum(values[:k]) / k, sum(values[-k:]) / k


