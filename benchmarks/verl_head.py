"""Benchmark of verl's fused log-prob head: verl's own torch class vs the one grpo_fast's adapter puts in its place.

    python -m benchmarks verl-head [--quick] [--device cpu|cuda] [--dtype fp32|bf16] [--repeats N] [--shapes N,H,V ...]

What verl 0.9.1's actor runs with ``use_fused_kernels=True, impl_backend=torch``: per-token log-probs and
entropies of ``softmax(hidden · Wᵀ / τ)`` (τ = 0.7) at the labels, then backward with upstream gradients
for both outputs (the policy loss and the entropy bonus), giving d hidden and d W. Providers:

    eager       the logits through autograd: (h·Wᵀ/τ) -> log_softmax, gather, entropy -> backward
    verl        verl.utils.experimental.torch_functional.FusedLinearForPPO (chunks of 512 tokens)
    grpo_fast   grpo_fast.integrations.verl_plugin.FusedLinearForPPO (grpo_fast.fused_linear_logprobs,
                chunks of 512 tokens, as verl constructs it)

Time: median of ``--repeats`` fwd+bwd runs after a warm-up (benchmarks/common.py's time_fn). Memory: extra
peak over the inputs during one fwd+bwd (CUDA: max_memory_allocated; CPU: peak RSS in this process, an
upper bound after the first case). Check: max |Δ| of log-probs, entropies and d hidden against eager in
float64. Needs verl 0.9.1 (the adapter checks the version).
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict

import torch

from . import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (tokens, hidden, vocabulary): the Llama-2 and Qwen2 vocabularies
FULL_SHAPES = [(2048, 1024, 32000), (4096, 2048, 151936)]
QUICK_SHAPES = [(256, 128, 4096)]
TEMPERATURE = 0.7


def _eager(h, w, ids):
    logits = (h @ w.t()).float() / TEMPERATURE
    logp = logits.log_softmax(-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def providers() -> Dict[str, Callable]:
    from grpo_fast.integrations import verl_plugin  # enables the adapter; verl's class stays reachable

    verl_head = verl_plugin._saved["FusedLinearForPPO"]()
    ours = verl_plugin.FusedLinearForPPO()
    return {"eager": _eager,
            "verl": lambda h, w, ids: verl_head(h, w, ids, temperature=TEMPERATURE),
            "grpo_fast": lambda h, w, ids: ours(h, w, ids, temperature=TEMPERATURE)}


def _inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_(True)
    w = torch.randn(V, H, generator=g).to(device, dtype).requires_grad_(True)
    ids = torch.randint(0, V, (N,), generator=g).to(device)
    gl = torch.randn(N, generator=g).to(device)
    ge = (0.01 * torch.randn(N, generator=g)).to(device)
    return h, w, ids, gl, ge


def _fwd_bwd(fn, h, w, ids, gl, ge):
    logp, ent = fn(h, w, ids)
    torch.autograd.backward([logp, ent], [gl.to(logp.dtype), ge.to(ent.dtype)])
    return logp.detach(), ent.detach(), h.grad


def run(shapes, dtype, device, repeats, only=None):
    rows = []
    provs = providers()
    for N, H, V in shapes:
        h, w, ids, gl, ge = _inputs(N, H, V, DTYPES[dtype], device)
        h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        ref = _fwd_bwd(_eager, h64, w64, ids, gl.double(), ge.double())
        for name, fn in provs.items():
            if only and name not in only:
                continue
            h.grad = w.grad = None
            got = _fwd_bwd(fn, h, w, ids, gl, ge)
            check = max((a.double() - b).abs().max().item() for a, b in zip(got, ref))
            timing = common.time_fn(lambda: _fwd_bwd(fn, h, w, ids, gl, ge), repeats=repeats,
                                    device=torch.device(device), grad_to_none=[h, w])
            h.grad = w.grad = None
            mem, _ = common.extra_peak_memory(lambda: _fwd_bwd(fn, h, w, ids, gl, ge), device)
            rows.append(dict(shape=f"{N}x{H}x{V}", provider=name, ms=timing.median * 1e3, spread=timing.spread,
                             mem_mib=mem / 2**20, check=check))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks verl-head", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"toy shapes {QUICK_SHAPES}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--providers", type=lambda s: s.split(","), default=None, help="comma-separated subset")
    p.add_argument("--shapes", nargs="*", default=None, help="N,H,V ...")
    args = p.parse_args(argv)
    shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes
              else QUICK_SHAPES if args.quick else FULL_SHAPES)
    repeats = args.repeats or (3 if args.quick else 10)
    rows = run(shapes, args.dtype, args.device, repeats, args.providers)
    print(common.format_table(rows, [("shape", "N x H x V", "s"), ("provider", "provider", "s"),
                                     ("ms", "fwd+bwd ms", ".2f"), ("spread", "spread", ".0%"),
                                     ("mem_mib", "extra peak MiB", ".0f"), ("check", "max |Δ| vs fp64", ".1e")]))
    print(f"device {args.device}, {args.dtype}, τ = {TEMPERATURE}; time: median of {repeats} runs; "
          "check: log-probs, entropies and d hidden vs eager float64")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
