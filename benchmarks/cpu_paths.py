"""The CPU extension's instruction-set paths against their two limits, measured back to back.

    python -m benchmarks cpu-paths [--shape 8x512x32000] [--dtypes fp32,bf16] [--isas avx2,avx512] [--rounds 7]

For each (dtype, ISA path) it times, interleaved round by round so that a change of machine load hits
every variant alike, and reports medians:

    copy       dst.copy_(src) of the logits: reads and writes N·V·elt bytes, what the fused in-place
               loss must move at least (the bandwidth limit; issue #15's yardstick: in place >= 80%)
    exp        the path's vectorized e^x (``vexp``, the one the row kernels use) over an L1-resident
               block, N·V values, one thread, divided by torch's thread count: the exp-throughput
               limit of a pass that takes one exp per logit (every dtype's token-level row does)
    in place   grpo_loss(backend="cpu", inplace=True) forward + backward (loss_scale = grad_output)
    fresh buf  the same with inplace=False (the gradient buffer comes from the reuse cache after the
               first call; issue #15's target: <= 1.3x in place)

The load average before and after is printed: on a busy machine the numbers mean little (compare the
ratios within a round, and rerun when the load is low).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse_shape(text: str):
    b, t, v = (int(x) for x in text.lower().split("x"))
    return b, t, v


def _inputs(B, T, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    kw = dict(rewards=torch.rand(B, generator=g), group_size=B if B >= 2 else None, old_logp=-torch.rand(B, T, generator=g),
              ref_logp=-torch.rand(B, T, generator=g), beta=0.04, loss_type="dapo", epsilon_high=0.28)
    return logits, ids, kw


def _timer():
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def run(shape=(8, 512, 32000), dtypes=("fp32", "bf16"), isas=None, rounds=7) -> dict:
    import grpo_fast
    from grpo_fast import _C_cpu

    B, T, V = shape
    N = B * T
    threads = torch.get_num_threads()
    isas = [i for i in (isas or _C_cpu.supported_isas()) if i in _C_cpu.supported_isas()]
    exp_block = torch.randn(4096) * 5 - 5  # x − max ≤ 0 mostly, as in the kernels; 16 KiB: L1
    exp_out = torch.empty_like(exp_block)
    reps = max(1, N * V // exp_block.numel())
    results = {}
    load0 = os.getloadavg()
    for dn in dtypes:
        dtype = DTYPES[dn]
        logits, ids, kw = _inputs(B, T, V, dtype)
        backup = logits.clone()
        dst = torch.empty_like(logits)
        times = {("copy", None): []}
        for isa in isas:
            for what in ("exp", "in place", "fresh buf"):
                times[(what, isa)] = []
        prev = _C_cpu.isa()
        try:
            for r in range(rounds + 1):  # round 0 warms up (faults in the buffers, fills the cache)
                el = _timer()
                dst.copy_(logits)
                t_copy = el()
                if r:
                    times[("copy", None)].append(t_copy)
                for isa in isas:
                    _C_cpu.set_isa(isa)
                    el = _timer()
                    for _ in range(reps):
                        _C_cpu.vexp(exp_block.data_ptr(), exp_out.data_ptr(), exp_block.numel())
                    t_exp = el() / threads
                    for inplace, what in ((True, "in place"), (False, "fresh buf")):
                        logits.copy_(backup)
                        z = logits.requires_grad_()
                        el = _timer()
                        loss, _ = grpo_fast.grpo_loss(z, ids, backend="cpu", inplace=inplace, loss_scale=0.5, **kw)
                        (loss * 0.5).backward()
                        dt = el()
                        z.grad = None
                        logits.requires_grad_(False)
                        if r:
                            times[(what, isa)].append(dt)
                    if r:
                        times[("exp", isa)].append(t_exp)
        finally:
            _C_cpu.set_isa(prev)
        results[dn] = {f"{w}" + (f" [{i}]" if i else ""): statistics.median(v) * 1e3 for (w, i), v in times.items()}
        del logits, backup, dst
    return dict(shape=shape, threads=threads, isas=isas, rounds=rounds, load_before=load0, load_after=os.getloadavg(),
                ms=results)


def report(res: dict) -> str:
    B, T, V = res["shape"]
    lines = [f"CPU paths, N={B * T} V={V}, torch threads {res['threads']}, medians of {res['rounds']} interleaved rounds",
             f"load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}",
             f"{'dtype':6s} {'path':8s} {'in place ms':>12s} {'% copy BW':>10s} {'x exp limit':>12s} "
             f"{'fresh buf ms':>13s} {'fresh/in place':>15s} {'copy ms':>8s} {'exp limit ms':>13s}"]
    for dn, ms in res["ms"].items():
        copy = ms["copy"]
        for isa in res["isas"]:
            ip, fb, ex = ms[f"in place [{isa}]"], ms[f"fresh buf [{isa}]"], ms[f"exp [{isa}]"]
            lines.append(f"{dn:6s} {isa:8s} {ip:12.1f} {100 * copy / ip:9.0f}% {ip / ex:12.2f} {fb:13.1f} "
                         f"{fb / ip:15.2f} {copy:8.1f} {ex:13.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks cpu-paths", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=_parse_shape, default=(8, 512, 32000), help="BxTxV (default 8x512x32000)")
    ap.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    ap.add_argument("--isas", type=lambda s: s.split(","), help="default: every path this CPU runs")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    print(report(run(a.shape, a.dtypes, a.isas, a.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
