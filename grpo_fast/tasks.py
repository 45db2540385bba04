"""Built-in tasks with verifiable rewards: nothing to download, checkable by a few lines of Python.

A task gives the trainer four things:

    task.tokenizer                 encode(str) -> list[int], decode(list[int]) -> str, eos_id, vocab_size
    task.sample(n, generator)      n examples: dicts with "prompt" (str) and the fields the rewards read
    task.reward_funcs              reward functions, TRL's signature:
                                   f(prompts: list[str], completions: list[str], **fields) -> list[float]
    task.reward_weights            one weight per function; the trainer's reward is the weighted sum

The default, ``reverse``: the prompt is a string of digits followed by "=", and the completion must
be those digits in reverse order, then the end token. "307=" -> "703<eos>". Its reward lies in
[0, 1]: 0.8 × the fraction of positions right + 0.2 × the format (only digits, the right length).
A freshly initialized model writes random tokens (reward ~0). The trainer's short supervised
warm-up (32 examples a step) teaches the format and starts on the answer, and stops once the
policy's sampled reward reaches 0.4 (``warmup_target_reward``), while it is only partly right: GRPO
has to take it the rest of the way from the reward. ``warmup_answer_frac`` < 1 replaces that share of the warm-up targets by
``warmup_target`` (random digits of the right length: the format without the answer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import torch


class CharTokenizer:
    """One token per character, plus ``<pad>`` (0) and ``<eos>`` (1)."""

    def __init__(self, alphabet: str):
        self.itos = ["<pad>", "<eos>"] + list(alphabet)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad_id, self.eos_id = 0, 1
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> List[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to (not including) the first ``<eos>``; ``<pad>`` is dropped; an id beyond the
        alphabet (a model with a padded vocabulary) reads as "?", which no reward accepts."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(self.itos[i] if i < self.vocab_size else "?")
        return "".join(out)


# ---- reward functions (TRL's signature: the trainer passes each example's fields as lists) ----

def reversal_accuracy(prompts: List[str], completions: List[str], answer: List[str], **_) -> List[float]:
    """Fraction of the answer's positions the completion gets right; extra characters count as wrong.

    "1703" for answer "1703" -> 1.0; "1700" -> 0.75; "17" -> 0.5; "170399" -> 4/6.
    """
    out = []
    for c, a in zip(completions, answer):
        hits = sum(1 for x, y in zip(c, a) if x == y)
        out.append(hits / max(len(a), len(c), 1))
    return out


def digits_format(prompts: List[str], completions: List[str], answer: List[str], **_) -> List[float]:
    """1.0 when the completion is only digits and exactly as long as the answer, else 0.0."""
    return [float(len(c) == len(a) and c.isdigit()) for c, a in zip(completions, answer)]


def addition_exact(prompts: List[str], completions: List[str], answer: List[str], **_) -> List[float]:
    """1.0 when the completion is exactly the sum, else 0.0."""
    return [float(c == a) for c, a in zip(completions, answer)]


@dataclass
class Task:
    name: str
    tokenizer: CharTokenizer
    make_example: Callable[[torch.Generator], Dict[str, str]]
    reward_funcs: List[Callable]
    reward_weights: List[float]
    max_prompt_len: int
    max_new_tokens: int
    # Supervised warm-up targets: a completion string for an example (the format, not the answer).
    warmup_target: Callable[[Dict[str, str], torch.Generator], str] = None
    description: str = ""
    fields: List[str] = field(default_factory=lambda: ["answer"])

    def sample(self, n: int, generator: torch.Generator) -> List[Dict[str, str]]:
        return [self.make_example(generator) for _ in range(n)]

    def rewards(self, prompts: List[str], completions: List[str], examples: List[Dict[str, str]]):
        """(total (n,), {function name: (n,)}): the weighted sum and each function's values, float32."""
        kw = {k: [e[k] for e in examples] for k in self.fields}
        parts = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for f, w in zip(self.reward_funcs, self.reward_weights):
            r = torch.tensor(f(prompts, completions, **kw), dtype=torch.float32)
            parts[f.__name__] = r
            total += w * r
        return total, parts


def _digits(n: int, g: torch.Generator) -> str:
    return "".join(str(int(d)) for d in torch.randint(0, 10, (n,), generator=g))


def reverse_task(n_digits: int = 3) -> Task:
    """Reverse ``n_digits`` digits: "307=" -> "703"."""
    tok = CharTokenizer("0123456789=")

    def make(g):
        s = _digits(n_digits, g)
        return {"prompt": s + "=", "answer": s[::-1]}

    return Task(
        name="reverse",
        tokenizer=tok,
        make_example=make,
        reward_funcs=[reversal_accuracy, digits_format],
        reward_weights=[0.8, 0.2],
        max_prompt_len=n_digits + 1,
        max_new_tokens=n_digits + 2,
        warmup_target=lambda ex, g: _digits(len(ex["answer"]), g),  # right length, random digits
        description=f"reverse {n_digits} digits; reward 0.8·positional accuracy + 0.2·format, in [0, 1]",
    )


def addition_task(n_digits: int = 2) -> Task:
    """Add two ``n_digits``-digit numbers: "12+34=" -> "46", "07+05=" -> "12". Exact match, in {0, 1}."""
    tok = CharTokenizer("0123456789+=")

    def make(g):
        a, b = (int(x) for x in torch.randint(0, 10 ** n_digits, (2,), generator=g))
        # Zero-padded operands: every prompt has the same length, so no padding inside the prompt.
        return {"prompt": f"{a:0{n_digits}d}+{b:0{n_digits}d}=", "answer": str(a + b)}

    return Task(
        name="add",
        tokenizer=tok,
        make_example=make,
        reward_funcs=[addition_exact],
        reward_weights=[1.0],
        max_prompt_len=2 * n_digits + 2,
        max_new_tokens=n_digits + 2,
        warmup_target=lambda ex, g: _digits(len(ex["answer"]), g),
        description=f"add two {n_digits}-digit numbers; exact-match reward in {{0, 1}}",
    )


TASKS = {"reverse": reverse_task, "add": addition_task}


def get_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**kwargs)
