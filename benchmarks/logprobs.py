"""Benchmark of differentiable per-token log-probs + entropy (grpo_fast.logprobs) against eager torch.

    python -m benchmarks logprobs [--quick] [--device cpu|cuda] [--providers a,b] [--shapes N,V ...]

Every provider computes, from logits z (N, V) and ids (N,) at temperature τ = 0.9,
logp (N,) and entropy (N,), then backward of Σ g_l·logp + Σ g_h·entropy (random upstream
gradients: a policy loss with an entropy term), giving ∂z (N, V):

    grpo_fast-<k>  grpo_fast.logprobs(z, ids, return_entropy=True, backend=k): forward reads z once
                   (keeps the per-token lse), backward reads z once and writes ∂z once
    eager          log_softmax(z/τ) -> gather, entropy = −Σ p·log p, through autograd
                   (reads/writes (N, V) tensors about ten times, holds log_softmax and p for backward)
    trl            TRL's selective_log_softmax + entropy_from_logits (its chunked entropy), through
                   autograd, when trl is importable
    loss-<k>       the yardstick, not a log-prob provider: grpo_fast's fused GRPO loss (dapo, inplace=False,
                   advantages g_l per token, the same τ) fwd+bwd on the same logits with backend k. The
                   column "vs loss" divides every provider's time by it, within the same run.

Time: median of ``--repeats`` fwd+bwd runs after one warm-up, providers interleaved round-robin on
CPU (shared machines: load from other jobs hits them alike). Memory: extra peak over what exists
before the call (the logits), in a fresh child process per provider (benchmarks/common.py);
the (N, V) gradient itself (N·V·4 bytes for fp32) is part of every provider's number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, Optional

import torch

from . import common

FULL_SHAPES = [(4096, 32000)]
QUICK_SHAPES = [(512, 4096)]
TEMPERATURE = 0.9


def _inputs(N: int, V: int, dtype: torch.dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g) * 2).to(dtype).to(device).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g).to(device)
    gl = torch.randn(N, generator=g).to(device)
    gh = torch.randn(N, generator=g).to(device)
    return z, ids, gl, gh


def _eager(z, ids):
    logq = torch.log_softmax((z if z.dtype == torch.float64 else z.float()) / TEMPERATURE, dim=-1)
    logp = logq.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    return logp, entropy


def _trl_fns():
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        return None, f"trl not importable ({type(e).__name__}: {e})"
    return (selective_log_softmax, entropy_from_logits), None


def providers(device) -> Dict[str, Optional[Callable]]:
    """name -> fn(z, ids) -> (logp, entropy), or a string saying why it cannot run here."""
    from grpo_fast.backends import unavailable_reason

    import grpo_fast

    out: Dict[str, object] = {}
    for k in ("cpu", "triton", "cuda"):
        why = unavailable_reason(k, torch.device(device))
        out[f"grpo_fast-{k}"] = why or (lambda z, ids, k=k: grpo_fast.logprobs(
            z, ids, temperature=TEMPERATURE, return_entropy=True, backend=k))
    out["eager"] = _eager
    for k in ("cpu", "triton", "cuda"):
        if callable(out[f"grpo_fast-{k}"]):
            out[f"loss-{k}"] = lambda z, ids, k=k: _fused_loss(z, ids, k)
    trl, why = _trl_fns()
    if trl is None:
        out["trl"] = why
    else:
        sls, efl = trl
        out["trl"] = lambda z, ids: (sls(z, ids, temperature=TEMPERATURE), efl(z / TEMPERATURE))
    return out


def _fused_loss(z, ids, backend):
    """The fused GRPO loss on the same (N, V) logits as one row of N tokens (the yardstick row)."""
    import grpo_fast

    g = torch.Generator().manual_seed(1)
    adv = torch.randn(1, ids.numel(), generator=g).to(z.device)
    loss, _ = grpo_fast.grpo_loss(z.unsqueeze(0), ids.unsqueeze(0), adv, temperature=TEMPERATURE, backend=backend)
    return loss


def _step(fn, z, ids, gl, gh):
    out = fn(z, ids)
    if isinstance(out, torch.Tensor):  # the fused loss (the yardstick): a scalar
        out.backward()
        return None
    logp, ent = out
    ((logp * gl).sum() + (ent * gh).sum()).backward()
    return None


def _child(payload: dict) -> dict:
    """One provider's extra peak memory for one fwd+bwd, in this fresh process."""
    dev = payload["device"]
    z, ids, gl, gh = _inputs(payload["N"], payload["V"], common.DTYPES[payload["dtype"]], dev)
    fn = providers(dev)[payload["provider"]]
    _step(fn, z, ids, gl, gh)  # warm-up (lazy imports, thread pools), unmeasured
    z.grad = None
    extra, method = common.extra_peak_memory(lambda: _step(fn, z, ids, gl, gh), dev)
    return {"extra_bytes": extra, "method": method}


def run(shapes, dtype: str, device: str, repeats: int, only=None, memory: bool = True):
    rows = []
    for N, V in shapes:
        z, ids, gl, gh = _inputs(N, V, common.DTYPES[dtype], device)
        provs = providers(device)
        if only:
            provs = {k: v for k, v in provs.items() if k in only}
        runnable = {k: v for k, v in provs.items() if callable(v)}
        for k, v in provs.items():
            if not callable(v):
                print(f"  skip {k}: {v}")
        # accuracy check against eager float64 (first provider's ∂z vs float64)
        zd = z.detach().double().requires_grad_()
        _step(_eager, zd, ids, gl.double(), gh.double())
        want = zd.grad.float()
        times = {k: [] for k in runnable}
        errs = {}
        for name, fn in runnable.items():
            z.grad = None
            _step(fn, z, ids, gl, gh)  # warm-up
            if not name.startswith("loss-"):  # the yardstick computes another quantity
                errs[name] = float((z.grad.float() - want).abs().max() / want.abs().max())
        # round-robin: each repeat runs every provider once
        for _ in range(repeats):
            for name, fn in runnable.items():
                t = common.time_fn(lambda fn=fn: _step(fn, z, ids, gl, gh), repeats=1, warmup=0,
                                   device=torch.device(device), grad_to_none=[z])
                times[name].extend(t.times)
        base = None
        for name in runnable:
            med = sorted(times[name])[len(times[name]) // 2]
            if name == "eager":
                base = med
            row = {"N": N, "V": V, "dtype": dtype, "provider": name, "ms": med * 1e3,
                   "spread": (max(times[name]) - min(times[name])) / med if med else 0.0,
                   "max_rel_err_dz": errs.get(name)}
            if memory:
                try:
                    res = common.run_child("benchmarks.logprobs",
                                           {"N": N, "V": V, "dtype": dtype, "device": device, "provider": name})
                    row["extra_mb"] = res["extra_bytes"] / common.MB
                except Exception as e:  # noqa: BLE001 - report, keep the table
                    row["extra_mb"] = float("nan")
                    print(f"  memory child for {name} failed: {e}")
            rows.append(row)
        loss_ms = next((r["ms"] for r in rows if r["N"] == N and r["V"] == V and r["provider"].startswith("loss-")),
                       None)
        for row in rows:
            if row["N"] == N and row["V"] == V and base:
                row["vs_eager"] = base / (row["ms"] / 1e3)
            if row["N"] == N and row["V"] == V and loss_ms:
                row["vs_loss"] = row["ms"] / loss_ms
    return rows


COLUMNS = [("N", "N", "d"), ("V", "V", "d"), ("dtype", "dtype", ""), ("provider", "provider", ""),
           ("ms", "fwd+bwd ms", ".1f"), ("spread", "spread", ".0%"),
           ("vs_eager", "vs eager", lambda v: f"{v:.2f}x"), ("vs_loss", "vs loss", lambda v: f"{v:.2f}x"),
           ("extra_mb", "extra peak MB", ".0f"),
           ("max_rel_err_dz", "max|dz err|/max|dz|", ".1e")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks logprobs", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=512, V=4096 (seconds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--providers", type=lambda s: s.split(","), default=None, help="comma-separated subset")
    p.add_argument("--shapes", nargs="+", default=None, help="N,V ... (default 4096,32000)")
    p.add_argument("--dtype", default="fp32", choices=list(common.DTYPES))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory children")
    p.add_argument("--out-dir", default="bench_results")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes
              else (QUICK_SHAPES if args.quick else FULL_SHAPES))
    repeats = args.repeats or (3 if args.quick else 7)
    rows = run(shapes, args.dtype, args.device, repeats, args.providers, args.memory)
    print(common.format_table(rows, COLUMNS))
    print(f"time: median of {repeats} fwd+bwd runs, providers interleaved; memory: extra peak over the logits, "
          f"one child process per provider (includes the (N, V) gradient). Shared machines make times noisy.")
    if not args.no_save:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"logprobs_{args.device}.json")
        common.write_json(path, {"machine": common.machine_info(args.device), "rows": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
