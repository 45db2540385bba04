"""Benchmark of one TRL GRPO training step: TRL's own loss vs the grpo_fast drop-in.

    python -m benchmarks.trl_step [--quick] [--device cpu|cuda] [--loss-type dapo] [--repeats 5]
                                       [--providers trl,grpo_fast,grpo_fast-logits,grpo_fast-torch]

What is timed: the part of ``GRPOTrainer.training_step`` that the drop-in changes — ``compute_loss``
(backbone forward, LM head, per-token log-probs, loss) plus ``loss.backward()`` — on one fixed batch
in TRL's layout (prompt + completion ids, masks, advantages, old/ref log-probs, num_items_in_batch).
Generation, rewards and the optimizer update are identical for both and left out: on CPU without
vLLM, generation would dominate and hide the difference.

The model is a tiny random Qwen2 built from a config (no download) with a real vocabulary size
(V = 32000, Llama-2's), so that the LM head and the (B·T) × V logits dominate as in real training.

Providers (each a trainer built from the same saved model and config):

    trl                 trl.GRPOTrainer: TRL 1.16's chunked fused LM head (recomputes each tile's logits
                        in backward) and its eager per-token loss
    grpo_fast           grpo_fast.integrations.trl.GRPOTrainer: fused_linear_grpo_loss, backend "auto"
    grpo_fast-logits    the drop-in with grpo_fast_fused_linear=False: full logits, then grpo_loss in place
    grpo_fast-torch     the drop-in with backend "torch" (grpo_fast's chunked eager reference)

Time: median of --repeats runs after one warm-up (benchmarks/common.py time_fn). Peak memory: in a
fresh child process per provider, after a warm-up step so that parameter gradients and lazy buffers
already exist, the peak during one compute_loss + backward minus the memory just before it (CPU: peak
RSS; CUDA: torch.cuda.max_memory_allocated).

On CPU, TRL's chunked LM head has no Triton kernel and runs each (4096 tokens x V) tile through
several whole-tile torch temporaries; on CUDA it uses Triton kernels. The CPU memory ratio therefore
says nothing about the GPU one: measure with --device cuda there.
The loss of every provider is printed next to its time: they must agree.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import tempfile
import time
import warnings
from typing import Optional

import torch

from . import common

PROVIDERS = ("trl", "grpo_fast", "grpo_fast-logits", "grpo_fast-torch")
DEFAULT_PROVIDERS = ("trl", "grpo_fast", "grpo_fast-logits")
# (B, P, T, H, layers): B completions of P prompt + T completion tokens; a 2-layer Qwen2 of width H.
FULL = dict(batch=8, prompt_len=32, completion_len=256, hidden=256, layers=2, vocab=32000)
QUICK = dict(batch=4, prompt_len=16, completion_len=64, hidden=128, layers=2, vocab=32000)


def trl_missing() -> Optional[str]:
    """None when trl and its dependencies import, else why not and how to get them."""
    # The model is built locally: no telemetry pings from TRL's trainer, no download attempts.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        return f"the TRL step benchmark needs trl: pip install 'grpo_fast[trl]' ({e})"
    return None


def build_model(path: str, *, vocab: int, hidden: int, layers: int, seed: int = 0) -> None:
    """Save a random Qwen2 and a small word-level tokenizer under ``path`` (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = "the a cat dog sat on mat ran to red blue one two three yes no".split()
    vocab_map = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in words:
        vocab_map[w] = len(vocab_map)
    tk = Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def build_trainer(provider: str, path: str, *, loss_type: str, out_dir: str, device: str = "cpu"):
    """A GRPOTrainer (TRL's or the drop-in) on the saved model, in train mode, fp32, on ``device``."""
    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

    from grpo_fast.integrations.trl import GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    args = trl.GRPOConfig(output_dir=out_dir, report_to=[], use_cpu=device == "cpu", save_strategy="no", bf16=False,
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
                          loss_type=loss_type, beta=0.04, epsilon=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28)
    common_kw = dict(model=path, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                     train_dataset=Dataset.from_dict({"prompt": ["the cat"] * 4}), processing_class=tok)
    if provider == "trl":
        tr = trl.GRPOTrainer(**common_kw)
    elif provider == "grpo_fast":
        tr = GRPOTrainer(**common_kw)
    elif provider == "grpo_fast-logits":
        tr = GRPOTrainer(**common_kw, grpo_fast_fused_linear=False)
    elif provider == "grpo_fast-torch":
        tr = GRPOTrainer(**common_kw, grpo_fast_backend="torch")
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one window here
    return tr


def make_batch(trainer, *, batch: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0) -> dict:
    """A batch in TRL's layout; old/ref log-probs are the model's own plus noise (ratios off 1, some clipped)."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = batch, prompt_len, completion_len
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)  # ragged completions, right-padded
    completion_mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    dev = trainer.accelerator.device
    prompt_ids, prompt_mask, completion_ids, completion_mask = (
        x.to(dev) for x in (prompt_ids, prompt_mask, completion_ids, completion_mask))
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=torch.randn(B, generator=g).to(dev),
                num_items_in_batch=completion_mask.sum(),
                old_per_token_logps=logp + 0.2 * torch.randn(B, T, generator=g).to(dev),
                ref_per_token_logps=logp + 0.2 * torch.randn(B, T, generator=g).to(dev))


def loss_step(trainer, inputs) -> float:
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach())


def _zero_grads(trainer) -> None:
    # set_to_none=False: keep the gradient buffers, as a training loop does between steps
    trainer.model.zero_grad(set_to_none=False)


def _setup(provider: str, cfg: dict, loss_type: str, path: str, out_dir: str, device: str = "cpu"):
    tr = build_trainer(provider, path, loss_type=loss_type, out_dir=out_dir, device=device)
    inputs = make_batch(tr, batch=cfg["batch"], prompt_len=cfg["prompt_len"], completion_len=cfg["completion_len"],
                        vocab=cfg["vocab"])
    return tr, inputs


def _child_main(payload: str) -> int:
    """Memory child: build one provider, warm it up, measure one step's extra peak RSS."""
    p = json.loads(payload)
    trl_missing()
    warnings.simplefilter("ignore")
    tr, inputs = _setup(p["provider"], p["cfg"], p["loss_type"], p["path"], p["out_dir"], p["device"])
    loss_step(tr, inputs)  # warm-up: gradient buffers, lazy init
    _zero_grads(tr)
    extra, method = common.extra_peak_memory(lambda: loss_step(tr, inputs), p["device"])
    print(json.dumps({"extra_peak": extra, "method": method}))
    return 0


def run(providers=DEFAULT_PROVIDERS, *, quick: bool = False, loss_type: str = "dapo", repeats: int = 5,
        memory: bool = True, out_dir: Optional[str] = "bench_results", overrides: Optional[dict] = None,
        device: str = "cpu") -> dict:
    why = trl_missing()
    if why:
        raise RuntimeError(why)
    warnings.simplefilter("ignore")
    cfg = dict(QUICK if quick else FULL)
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    B, P, T, V, H = cfg["batch"], cfg["prompt_len"], cfg["completion_len"], cfg["vocab"], cfg["hidden"]
    print(f"TRL GRPO step (compute_loss + backward), tiny Qwen2: {cfg['layers']} layers, H = {H}, V = {V}; "
          f"batch B = {B}, prompt P = {P}, completion T = {T} (N = {B * T} tokens, ragged masks); "
          f"loss_type={loss_type}, beta=0.04; fp32, {device}"
          + (f", {torch.get_num_threads()} threads" if device == "cpu" else f" ({torch.cuda.get_device_name()})"))
    print(f"full (B·T) x V fp32 logits would be {B * T * V * 4 / common.MB:.0f} MB")
    rows = []
    with tempfile.TemporaryDirectory(prefix="grpo_fast_trl_bench_") as tmp:
        path = os.path.join(tmp, "model")
        build_model(path, vocab=V, hidden=H, layers=cfg["layers"])
        for prov in providers:
            tr, inputs = _setup(prov, cfg, loss_type, path, os.path.join(tmp, "out"), device)
            losses = []
            cpu_times = []

            def step():
                # CPU time of this process next to the wall time: on a shared machine the wall time
                # also counts the other processes' turns; the CPU time counts this step's own work.
                c0 = time.process_time()
                losses.append(loss_step(tr, inputs))
                cpu_times.append(time.process_time() - c0)

            timing = common.time_fn(step, setup=lambda: _zero_grads(tr), repeats=repeats, warmup=1, device=device)
            row = dict(provider=prov, time_s=timing.median, spread=timing.spread, loss=losses[-1])
            if device == "cpu":
                row["cpu_s"] = statistics.median(cpu_times[1:])  # the warm-up run excluded, as for time_s
            del tr, inputs
            if memory:
                res = common.run_child("benchmarks.trl_step", dict(provider=prov, cfg=cfg, loss_type=loss_type,
                                                                       path=path, out_dir=os.path.join(tmp, "out"),
                                                                       device=device))
                row["extra_peak_mb"] = res["extra_peak"] / common.MB
                row["memory_method"] = res["method"]
            rows.append(row)
            print(f"  {prov}: {row['time_s'] * 1e3:.1f} ms" + (f", {row['extra_peak_mb']:.0f} MB" if memory else ""), flush=True)
    base = next((r for r in rows if r["provider"] == "trl"), None)
    for r in rows:
        if base is not None:
            r["speedup_vs_trl"] = base["time_s"] / r["time_s"]
            if "cpu_s" in r:
                r["cpu_speedup_vs_trl"] = base["cpu_s"] / r["cpu_s"]
            if memory and base.get("extra_peak_mb"):
                r["memory_vs_trl"] = r["extra_peak_mb"] / base["extra_peak_mb"]
    cols = [("provider", "provider", "s"), ("time_s", "median ms", lambda v: f"{v * 1e3:.1f}"),
            ("spread", "spread", lambda v: f"{v * 100:.0f}%"), ("speedup_vs_trl", "vs trl", lambda v: f"{v:.2f}x")]
    if device == "cpu":
        cols += [("cpu_s", "cpu ms", lambda v: f"{v * 1e3:.1f}"), ("cpu_speedup_vs_trl", "cpu vs trl", lambda v: f"{v:.2f}x")]
    if memory:
        cols += [("extra_peak_mb", "peak MB", lambda v: f"{v:.0f}"), ("memory_vs_trl", "mem vs trl", lambda v: f"{v:.2f}x")]
    cols += [("loss", "loss", lambda v: f"{v:.6g}")]
    print()
    print(common.format_table(rows, cols))
    if memory and rows:
        print(f"\npeak MB: {rows[0]['memory_method']}, one step after a warm-up step, fresh process per provider")
    print("time: median of the repeats of compute_loss + backward (wall, and this process's CPU time on CPU); "
          "the batch and weights are the same for every provider")
    result = dict(benchmark="trl_step", config=dict(cfg, loss_type=loss_type, repeats=repeats), rows=rows,
                  machine=common.machine_info(device))
    if out_dir:
        out = os.path.join(out_dir, f"trl_step_{device}_{loss_type}{'_quick' if quick else ''}.json")
        common.write_json(out, result)
        print(f"wrote {out}")
    return result


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trl_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small batch (seconds)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=f"comma-separated, from {','.join(PROVIDERS)}")
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's); 1 makes CPU time = work")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--completion-len", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--out-dir", default="bench_results")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _child_main(args.child)
    why = trl_missing()
    if why:  # a skipped table, not a failure: `python -m benchmarks all` goes on with the others
        print(f"[trl-step] skipped: {why}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[trl-step] skipped: --device cuda but no CUDA device is available")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory children too
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        raise SystemExit(f"unknown providers {bad}; choose from {PROVIDERS}")
    run(providers, quick=args.quick, loss_type=args.loss_type, repeats=args.repeats, memory=not args.no_memory,
        device=args.device,
        out_dir=None if args.no_save else args.out_dir,
        overrides=dict(batch=args.batch, prompt_len=args.prompt_len, completion_len=args.completion_len,
                       hidden=args.hidden, vocab=args.vocab))
    return 0


if __name__ == "__main__":
    sys.exit(main())
