"""A small causal transformer (GPT-2 style, pre-norm) for the built-in task, with a KV cache.

Created from a config and trained from scratch: nothing is downloaded. Any other causal LM works
with the trainer too (see grpo_fast/trainer/loop.py, ``CausalLM``); this one exists so that
``grpo-fast train`` runs on a fresh machine.

    model = TinyGPT(GPTConfig(vocab_size=16, block_size=32))
    logits = model(input_ids)                         # (B, S, V)
    hidden = model(input_ids, return_hidden=True)     # (B, S, H), before model.lm_head
    cache = model.new_cache(B, max_len)               # then model(new_ids, cache=cache) per step
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 16
    block_size: int = 32  # the longest prompt + completion, in tokens
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    tie_weights: bool = True  # lm_head shares the token embedding (GPT-2); fewer parameters to learn


class KVCache:
    """Keys and values of every layer for the positions seen so far: (B, n_head, max_len, head_dim)."""

    def __init__(self, n_layer: int, B: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (B, n_head, max_len, head_dim)
        self.k: List[torch.Tensor] = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v: List[torch.Tensor] = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0  # number of positions already cached


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor, layer: int, cache: Optional[KVCache]) -> torch.Tensor:
        B, S, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, S, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Append this call's keys/values; the new queries see every cached position and the
            # causal part of the new ones.
            p = cache.pos
            cache.k[layer][:, :, p:p + S] = k
            cache.v[layer][:, :, p:p + S] = v
            k, v = cache.k[layer][:, :, :p + S], cache.v[layer][:, :, :p + S]
            if S == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                mask = torch.ones(S, p + S, dtype=torch.bool, device=x.device).tril(diagonal=p)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, S, C))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + learned position embeddings, ``n_layer`` pre-norm blocks, final LayerNorm, ``lm_head``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2: scale the residual projections by 1/sqrt(2·n_layer) so the stream's
                # variance does not grow with depth.
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        p = self.wte.weight
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head, p.device, p.dtype)

    def forward(self, input_ids: torch.Tensor, *, cache: Optional[KVCache] = None, return_hidden: bool = False) -> torch.Tensor:
        """input_ids: (B, S) int64 -> logits (B, S, V), or hidden states (B, S, H) with ``return_hidden``.

        With ``cache``, ``input_ids`` are the next S positions after ``cache.pos`` and the cache advances.
        """
        B, S = input_ids.shape
        start = 0 if cache is None else cache.pos
        if start + S > self.config.block_size:
            raise ValueError(f"sequence of {start + S} tokens exceeds block_size={self.config.block_size}")
        pos = torch.arange(start, start + S, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, i, cache)
        if cache is not None:
            cache.pos += S
        x = self.ln_f(x)
        return x if return_hidden else self.lm_head(x)
