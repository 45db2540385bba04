"""`grpo-fast train --compare`: the fused loss and the eager reference from the same seed, side by side."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import List


from .config import TrainConfig, _cli_args


# ------------------------------------------------------------------------------------------------
# --compare: the same run with the fused loss and with the eager reference
# ------------------------------------------------------------------------------------------------
def _read_rows(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _machine() -> str:
    """'AMD EPYC 9654, 2 cores, grpo_fast CPU kernel: avx512' (the CPU model from /proc/cpuinfo)."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    name = name or platform.processor() or platform.machine()
    try:
        from .. import _C_cpu

        isa = f", grpo_fast CPU kernel: {_C_cpu.isa()}"
    except ImportError:
        isa = ""
    return f"{name}, {os.cpu_count()} cores{isa}"


def _ratio_words(ref: float, fused: float) -> str:
    """'4.2x faster' / '1.10x slower' for the fused arm, from the two times."""
    r = ref / fused
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def compare_report(fs: dict, rs: dict, fa: List[dict], ref: List[dict]) -> tuple:
    """The comparison of two arms' summaries (fs: fused, rs: reference) and metric rows, as
    (text, numbers): a table, then in words what to look at — the update's speed-up, the memory
    saved during the update, and whether both arms learned the same way."""
    n = min(len(fa), len(ref))
    diff = {k: max((abs(a[k] - b[k]) for a, b in zip(fa[:n], ref[:n])), default=float("nan")) for k in ("loss", "reward_mean")}
    # Sampling is discrete: the tiniest rounding difference eventually flips a sampled token and the
    # two runs then see different batches. Report how long they stayed identical, too.
    same = next((i for i, (a, b) in enumerate(zip(fa, ref)) if a["reward_mean"] != b["reward_mean"]), n)
    same_loss = max((abs(a["loss"] - b["loss"]) for a, b in zip(fa[:same], ref[:same])), default=float("nan"))
    first = abs(fa[0]["loss"] - ref[0]["loss"]) if n else float("nan")
    c = fs["config"]
    lines = [
        f"GRPO on '{fs['task']}' ({fs['task_description']}), {c['model']} model, vocabulary V={fs.get('vocab_size')}, "
        f"hidden H={fs.get('hidden_size')}, {c['prompts_per_step']} prompts x {c['group_size']} completions, "
        f"{fs['steps']} steps, seed {c['seed']}",
        f"machine: {_machine()}; device {fs['device']}, {fs.get('threads')} torch thread(s) per arm, the arms run one after the other",
        "",
        "arm       | loss                     | update s (median) | update peak MB | rollout s (median) | reward first 10% -> last 10%",
        "--------- | ------------------------ | ----------------- | -------------- | ------------------ | ----------------------------",
    ]
    for name, s in (("fused", fs), ("reference", rs)):
        loss = f"{s['loss_backend']}, {s['loss_path']}"
        lines.append(f"{name:<9} | {loss:<24} | {s['median_update_time_s']:17.4f} | {s['peak_mem_mb']:14.0f} | "
                     f"{s['median_rollout_time_s']:18.4f} | {s['reward_first_tenth']:.3f} -> {s['reward_last_tenth']:.3f}")
    upd = rs["median_update_time_s"] / fs["median_update_time_s"]
    step = rs["median_step_time_s"] / fs["median_step_time_s"]
    saved = rs["peak_mem_mb"] - fs["peak_mem_mb"]
    frac = saved / rs["peak_mem_mb"]
    gain_f, gain_r = fs["reward_gain"], rs["reward_gain"]
    lines += [
        "",
        "What to look at:",
        f"  update (loss forward + backward + AdamW step): the fused loss is "
        f"{_ratio_words(rs['median_update_time_s'], fs['median_update_time_s'])} "
        f"(median {fs['median_update_time_s']:.3g} s vs {rs['median_update_time_s']:.3g} s per step)",
        "  peak memory during the update: " + (
            f"{abs(saved):.0f} MB {'less' if saved > 0 else 'more'} ({abs(frac) * 100:.0f}% {'lower' if saved > 0 else 'higher'}: "
            if abs(saved) >= 0.5 else "the same (") + f"{fs['peak_mem_mb']:.0f} vs {rs['peak_mem_mb']:.0f} MB "
        f"{'peak RSS, which includes ~400 MB of Python + torch' if fs['device'] == 'cpu' else 'max allocated'})",
        f"  learning: the mean reward went {fs['reward_first_tenth']:.2f} -> {fs['reward_last_tenth']:.2f} ({gain_f:+.2f}) with the fused "
        f"loss and {rs['reward_first_tenth']:.2f} -> {rs['reward_last_tenth']:.2f} ({gain_r:+.2f}) with the reference "
        f"(first and last tenth of the steps; reward.png)",
        f"  agreement: at step 1 (same weights, same samples) the losses differ by {first:.2g}; identical rewards for the "
        f"first {same} of {n} steps (losses within {same_loss:.2g})" + (
            f", then the runs sample different tokens: AdamW's first steps move each weight by about ±lr whatever its "
            f"gradient's size, which turns rounding differences into different weights (largest |difference| over all "
            f"steps: loss {diff['loss']:.2g}, reward {diff['reward_mean']:.2g})" if same < n else ""),
        f"  whole step, sampling included (the same code in both arms): {_ratio_words(rs['median_step_time_s'], fs['median_step_time_s'])}",
    ]
    numbers = {"update_speedup": upd, "step_speedup": step, "update_peak_mem_saved_mb": saved,
               "update_peak_mem_saved_frac": frac, "reward_gain": {"fused": gain_f, "reference": gain_r},
               "max_abs_diff": diff, "identical_reward_steps": same, "max_abs_loss_diff_while_identical": same_loss,
               "first_step_loss_diff": first}
    return "\n".join(lines), numbers


def compare_plot(path: str, fs: dict, rs: dict, fa: List[dict], ref: List[dict]) -> bool:
    """compare.png: the two reward curves, then bars of the median update time and the update's peak memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"fused": "tab:blue", "reference": "tab:orange"}
    names = {"fused": f"fused ({fs['loss_backend']}, {fs['loss_path']})", "reference": f"reference ({rs['loss_backend']}, {rs['loss_path']})"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    for key, rows in (("fused", fa), ("reference", ref)):
        ax.plot([r["step"] for r in rows], [r["reward_mean"] for r in rows], label=names[key], color=colors[key], alpha=0.85)
    ax.set_title(f"mean reward per step: {fs['reward_gain']:+.2f} fused, {rs['reward_gain']:+.2f} reference (first -> last tenth)")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    saved = (rs["peak_mem_mb"] - fs["peak_mem_mb"]) / rs["peak_mem_mb"] * 100
    bars = (("update time per step, s (median)", "median_update_time_s", "{:.3f} s",
             f"update: fused {_ratio_words(rs['median_update_time_s'], fs['median_update_time_s'])}"),
            ("peak memory during the update, MB", "peak_mem_mb", "{:.0f} MB",
             f"update peak memory: fused {abs(saved):.0f}% {'lower' if saved >= 0 else 'higher'}"))
    for ax, (ylabel, key, fmt, title) in zip(axes[1:], bars):
        vals = [fs[key], rs[key]]
        b = ax.bar(["fused", "reference"], vals, color=[colors["fused"], colors["reference"]])
        for rect, v in zip(b, vals):
            ax.annotate(fmt.format(v), (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(0, max(vals) * 1.15)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"grpo_fast train --compare: V={fs.get('vocab_size')}, H={fs.get('hidden_size')}, {fs['steps']} steps, {fs['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def compare(cfg: TrainConfig) -> dict:
    """Train from the same seed with the fused loss and with backend="torch"; print a table.

    Each arm runs in its own process, so that the CPU peak memory (peak RSS) is that arm's alone.
    """
    fused_backend = "auto" if cfg.loss_backend == "torch" else cfg.loss_backend
    arms = {"fused": dataclasses.replace(cfg, loss_backend=fused_backend, out=os.path.join(cfg.out, "fused")),
            # the eager reference has no fused-linear form: it materializes the logits
            "reference": dataclasses.replace(cfg, loss_backend="torch", loss_path="logits", out=os.path.join(cfg.out, "reference"))}
    os.makedirs(cfg.out, exist_ok=True)
    results = {}
    for name, arm in arms.items():
        print(f"[compare] {name}: backend={arm.loss_backend} loss_path={arm.loss_path}", flush=True)
        subprocess.run([sys.executable, "-m", "grpo_fast", "train", *_cli_args(arm)], check=True)
        with open(os.path.join(arm.out, "summary.json")) as f:
            results[name] = {"summary": json.load(f), "rows": _read_rows(os.path.join(arm.out, "metrics.jsonl"))}
    fs, rs = results["fused"]["summary"], results["reference"]["summary"]
    fa, ref = results["fused"]["rows"], results["reference"]["rows"]
    text, numbers = compare_report(fs, rs, fa, ref)
    print("\n" + text)
    out = {"arms": {k: v["summary"] for k, v in results.items()}, **numbers, "table": text}
    with open(os.path.join(cfg.out, "compare.json"), "w") as f:
        json.dump(out, f, indent=2)
    if cfg.plots:
        compare_plot(os.path.join(cfg.out, "compare.png"), fs, rs, fa, ref)
    return out


