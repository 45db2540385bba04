"""GRPO with TRL, the loss computed by grpo_fast: the one-import change.

    python examples/trl_dropin.py                                   # tiny random model, runs anywhere (CPU, no download)
    python examples/trl_dropin.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 50   # a real model from the Hub

The script is an ordinary TRL script; the only grpo_fast line is the GRPOTrainer import. With
``--compare`` it also runs TRL's own trainer from the same seed and prints both first-step logs.
Needs ``pip install 'grpo_fast[trl]'``.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from datasets import Dataset
from trl import GRPOConfig

from grpo_fast.integrations.trl import GRPOTrainer  # was: from trl import GRPOTrainer

# ---- defaults -------------------------------------------------------------------------------------
PROMPTS = ["the cat sat on", "a dog ran to", "one two three", "big red mat", "yes no up down", "hot cold fast"]
TARGET_LEN = 12  # the reward prefers completions of about this many characters


def reward_len(completions, **kwargs):
    """A toy reward: closeness of the completion's length to TARGET_LEN characters."""
    return [-abs(len(c) - TARGET_LEN) / TARGET_LEN for c in completions]


def tiny_model(path: str) -> str:
    """Save a random 2-layer Qwen2 and a word-level tokenizer to ``path`` (no download) and return it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = sorted({w for p in PROMPTS for w in p.split()} | set("left right slow on to the".split()))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=1, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a Hub id or local path (default: a tiny random model)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--compare", action="store_true", help="also run trl.GRPOTrainer and print both first steps")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(os.path.join(tmp, "tiny"))
        tokenizer = None  # TRL loads the model's own
        if args.model is None:  # the in-memory word-level tokenizer is not one AutoProcessor can rebuild
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(model)
        config = GRPOConfig(
            output_dir=os.path.join(tmp, "out"), max_steps=args.steps, loss_type=args.loss_type, beta=args.beta,
            per_device_train_batch_size=6, num_generations=3, max_completion_length=8, learning_rate=1e-3,
            logging_steps=1, report_to=[], save_strategy="no", seed=0,
            use_cpu=not torch.cuda.is_available(), bf16=False,
        )
        dataset = Dataset.from_dict({"prompt": PROMPTS})
        trainers = [GRPOTrainer]
        if args.compare:
            import trl

            trainers.append(trl.GRPOTrainer)
        for cls in trainers:
            trainer = cls(model=model, reward_funcs=reward_len, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
            trainer.train()
            first = next(h for h in trainer.state.log_history if "loss" in h)
            keys = ("loss", "grad_norm", "reward", "entropy", "kl", "clip_ratio/region_mean")
            print(f"{cls.__module__}.{cls.__name__} step 1:", {k: round(first[k], 6) for k in keys if k in first})


if __name__ == "__main__":
    main()
