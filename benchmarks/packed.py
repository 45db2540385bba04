"""Packed rows and masked rows: the loss does work in proportion to the valid tokens.

    python -m benchmarks packed [--quick] [--backend cpu] [--shape B,T,V] [--padding 0.3] [--repeats 7]

The same GRPO batch (dapo, token level; and GSPO, sequence level), B sequences of random lengths
with a fraction ``--padding`` of the (B, T) grid padding, three ways, fwd+bwd of ``grpo_fast.grpo_loss``:

    padded, all rows swept   (B, T, V) logits with completion_mask = all ones: what a kernel that
                             sweeps every row pays (the reference point, 1.00x)
    padded, masked           (B, T, V) logits with the real completion_mask: masked rows are not
                             read and get a zero gradient
    packed                   (N, V) logits of the valid tokens only, with cu_seqlens (N = valid tokens)

The primitives issue's target: the packed and masked paths take ≤ 0.8x the all-rows time at 30%
padding (the work left is 70%). Time: median of ``--repeats`` runs after one warm-up, the three
interleaved (round-robin); in-place runs (the gradient written into the logits) restore their
input untimed before each run.

``--path fused-linear``: the same three arms through ``grpo_fast.fused_linear_grpo_loss`` from hidden
states (B, T, H) (``--hidden``) and an LM head (V, H), gradients of hidden, weight and bias; there the
GEMMs (three per token) dominate, and a masked token costs none at token level (sequence level still
multiplies every token of the (B, T) grid; packed rows hold only the valid ones).
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import common

FULL_SHAPE = (16, 512, 32000)
QUICK_SHAPE = (8, 32, 2048)
TARGET = 0.8


def _batch(B: int, T: int, V: int, padding: float, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # lengths spread around (1 - padding)·T, clamped to [1, T], then adjusted to hit the padding exactly
    lengths = ((1 - padding) * T * (0.5 + torch.rand(B, generator=g))).round().clamp(1, T).long()
    target = round((1 - padding) * B * T)
    i = 0
    while int(lengths.sum()) != target:
        step = 1 if int(lengths.sum()) < target else -1
        if 1 <= int(lengths[i % B]) + step <= T:
            lengths[i % B] += step
        i += 1
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    valid = mask.bool()
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    packed = {"logits": logits[valid].contiguous(), "ids": ids[valid], "old": old[valid], "cu": cu}
    return {"logits": logits, "ids": ids, "old": old, "mask": mask, "adv": adv, "packed": packed,
            "padding": 1 - float(mask.mean())}


def run(shape, dtype: str, backend: str, padding: float, repeats: int, levels=("token", "sequence")):
    import grpo_fast

    B, T, V = shape
    x = _batch(B, T, V, padding, common.DTYPES[dtype])
    p = x["packed"]
    ones = torch.ones_like(x["mask"])
    rows = []
    for level in levels:
        kw = {"importance_sampling_level": level, "backend": backend, "inplace": True}
        arms = {
            "padded, all rows swept": (x["logits"], lambda z: grpo_fast.grpo_loss(
                z, x["ids"], x["adv"], old_logp=x["old"], completion_mask=ones, **kw)),
            "padded, masked": (x["logits"], lambda z: grpo_fast.grpo_loss(
                z, x["ids"], x["adv"], old_logp=x["old"], completion_mask=x["mask"], **kw)),
            "packed (cu_seqlens)": (p["logits"], lambda z: grpo_fast.grpo_loss(
                z, p["ids"], x["adv"], old_logp=p["old"], cu_seqlens=p["cu"], **kw)),
        }
        work = {k: src.clone() for k, (src, _) in arms.items()}

        def setup(k):
            def f():
                w = work[k]
                w.grad = None
                with torch.no_grad():
                    w.copy_(arms[k][0])
                return w.requires_grad_()
            return f

        def step(fn):
            return lambda z: fn(z)[0].backward()

        rows += _time_arms(level, {k: (step(fn), setup(k)) for k, (_, fn) in arms.items()}, repeats)
    return rows, x["padding"]


def _time_arms(level: str, arms: dict, repeats: int) -> list:
    """Rows of the table for ``arms`` {layout: (fn(inputs), setup() -> inputs)}: one warm-up each, then
    ``repeats`` rounds in turn (round-robin), the median against the all-rows arm's."""
    times = {k: [] for k in arms}
    for fn, setup in arms.values():
        fn(setup())  # warm-up
    for _ in range(repeats):
        for k, (fn, setup) in arms.items():
            times[k].extend(common.time_fn(fn, setup=setup, repeats=1, warmup=0).times)
    base = sorted(times["padded, all rows swept"])[repeats // 2]
    rows = []
    for k in arms:
        med = sorted(times[k])[repeats // 2]
        rows.append({"level": level, "layout": k, "ms": med * 1e3,
                     "spread": (max(times[k]) - min(times[k])) / med if med else 0.0, "vs_all_rows": med / base})
    return rows


LINEAR_SHAPE = (8, 256, 32000)
LINEAR_QUICK = (4, 16, 512)


def run_linear(shape, dtype: str, backend: str, padding: float, repeats: int, H: int,
               levels=("token", "sequence")):
    """The three arms through fused_linear_grpo_loss (fwd+bwd: ∂hidden, ∂weight, ∂bias)."""
    import grpo_fast

    B, T, V = shape
    x = _batch(B, T, 8, padding, torch.float32)  # the layout, ids and advantages; logits replaced below
    g = torch.Generator().manual_seed(1)
    dt = common.DTYPES[dtype]
    hidden = torch.randn(B, T, H, generator=g).to(dt)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(dt)
    bias = (torch.randn(V, generator=g) * 0.1).to(dt)
    ids = torch.randint(0, V, (B, T), generator=g)
    old = -5.0 + 0.2 * torch.randn(B, T, generator=g)
    valid = x["mask"].bool()
    ones = torch.ones_like(x["mask"])
    rows = []
    for level in levels:
        kw = {"importance_sampling_level": level, "backend": backend}
        arms = {
            "padded, all rows swept": (hidden, lambda h, w, b: grpo_fast.fused_linear_grpo_loss(
                h, w, ids, x["adv"], bias=b, old_logp=old, completion_mask=ones, **kw)),
            "padded, masked": (hidden, lambda h, w, b: grpo_fast.fused_linear_grpo_loss(
                h, w, ids, x["adv"], bias=b, old_logp=old, completion_mask=x["mask"], **kw)),
            "packed (cu_seqlens)": (hidden[valid].contiguous(), lambda h, w, b: grpo_fast.fused_linear_grpo_loss(
                h, w, ids[valid], x["adv"], bias=b, old_logp=old[valid], cu_seqlens=x["packed"]["cu"], **kw)),
        }

        def leaves(src):  # fresh leaves each run (untimed): the gradients of hidden, weight and bias
            return lambda: [t.detach().requires_grad_() for t in (src, weight, bias)]

        def step(fn):
            return lambda ls: fn(*ls)[0].backward()

        rows += _time_arms(level, {k: (step(fn), leaves(src)) for k, (src, fn) in arms.items()}, repeats)
    return rows, x["padding"]


COLUMNS = [("level", "level", ""), ("layout", "layout", ""), ("ms", "fwd+bwd ms", ".1f"),
           ("spread", "spread", ".0%"), ("vs_all_rows", "vs all rows", lambda v: f"{v:.2f}x")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks packed", description=__doc__.split("\n\n")[0])
    common.add_shape_args(p, FULL_SHAPE, QUICK_SHAPE)
    p.add_argument("--padding", type=float, default=0.3, help="fraction of the (B, T) grid that is padding")
    p.add_argument("--path", default="logits", choices=["logits", "fused-linear"],
                   help=f"fused-linear: hidden states and the LM head (default shape {LINEAR_SHAPE})")
    p.add_argument("--hidden", type=int, default=256, help="H of the fused-linear path")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.path == "fused-linear":
        shape, repeats = common.shape_and_repeats(args, LINEAR_SHAPE, LINEAR_QUICK)
        H = 16 if args.quick else args.hidden
        rows, pad = run_linear(shape, args.dtype, args.backend, args.padding, repeats, H)
        what = f"fused_linear_grpo_loss, H = {H}"
    else:
        shape, repeats = common.shape_and_repeats(args, FULL_SHAPE, QUICK_SHAPE)
        rows, pad = run(shape, args.dtype, args.backend, args.padding, repeats)
        what = "grpo_loss, in place"
    print(f"B,T,V = {shape}, {args.dtype}, backend={args.backend}, padding {pad:.1%} of the (B, T) grid; {what}")
    print(common.format_table(rows, COLUMNS))
    print(f"time: median of {repeats} fwd+bwd runs, layouts interleaved; target: masked and packed "
          f"<= {TARGET}x the all-rows time at 30% padding.")
    name = "packed" if args.path == "logits" else "packed_linear"
    common.save_rows(args, f"{name}_{args.backend}_{args.dtype}", {"shape": shape, "padding": pad, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
