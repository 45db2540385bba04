"""Benchmark of the vocabulary split across ranks (grpo_fast/vocab_parallel.py): per-rank time with 2
processes against one process holding the whole vocabulary.

    python -m benchmarks vocab-parallel [--quick] [--N 1024] [--V 151936] [--path logits|fused-linear]
                                        [--threads K] [--repeats R] [--device cpu]

Every run computes logp and entropy (N,) of ids (N,) at τ = 0.9 and the backward of Σ g_l·logp + Σ g_h·H
(random upstream gradients), giving the gradient of the logits (path "logits": ``grpo_fast.logprobs``
on (N, V) fp32 logits) or of hidden (N, H) and the LM head (V, H) (path "fused-linear":
``grpo_fast.fused_linear_logprobs``):

    single   one process, the whole vocabulary, group=None
    split    ``torch.distributed.run --nproc_per_node 2`` (gloo on CPU, nccl on CUDA: one GPU a rank),
             each rank its half of V (V = 151936: 75968 each) with group=the world; ranks start each
             repeat together (a barrier, untimed); per-rank time = the slower rank's median

Both arms run with the same thread count per process (``--threads``, default half the CPUs: each rank
stands for a device of its own). Target (#12): split ≤ 0.65x single at N = 1024, V = 151936 fp32. The
split's log-probs are checked against the single run's (max relative error printed), so a wrong split
fails instead of reporting a time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

TEMPERATURE = 0.9
SEED = 0


def _inputs(N: int, V: int, H: int, path: str, cols: slice, device):
    """The full inputs' slice ``cols`` of V (identical on every process: seeded, built whole then cut)."""
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, V, (N,), generator=g)
    gl, gh = torch.randn(N, generator=g), torch.randn(N, generator=g)
    if path == "logits":
        z = torch.randn(N, V, generator=g) * 2
        leaves = (z[:, cols].contiguous(),)
    else:
        hidden = torch.randn(N, H, generator=g)
        weight = torch.randn(V, H, generator=g) * H ** -0.5
        leaves = (hidden, weight[cols].contiguous())
    leaves = tuple(t.to(device).requires_grad_() for t in leaves)
    return leaves, ids.to(device), gl.to(device), gh.to(device)


def _step(path: str, leaves, ids, gl, gh, group):
    import grpo_fast

    if path == "logits":
        lp, ent = grpo_fast.logprobs(leaves[0], ids, temperature=TEMPERATURE, return_entropy=True, group=group)
    else:
        lp, ent = grpo_fast.fused_linear_logprobs(leaves[0], leaves[1], ids, temperature=TEMPERATURE,
                                                  return_entropy=True, group=group)
    ((gl * lp).sum() + (gh * ent).sum()).backward()
    return lp.detach()


def _time(args, cols, group, barrier):
    device = torch.device(args.device)
    leaves, ids, gl, gh = _inputs(args.N, args.V, args.H, args.path, cols, device)
    times, lp = [], None
    for i in range(1 + args.repeats):
        for t in leaves:
            t.grad = None
        barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        lp = _step(args.path, leaves, ids, gl, gh, group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # the first run warms up (allocations, thread pools, autotuning)
            times.append(time.perf_counter() - t0)
    return times, lp


def _rank_main(args) -> int:
    """One rank of the split run (under torch.distributed.run)."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [args.V // world + (1 if r < args.V % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    times, lp = _time(args, slice(start, start + sizes[rank]), dist.group.WORLD, dist.barrier)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=lp.device)
    every = [torch.zeros_like(med) for _ in range(world)]
    dist.all_gather(every, med)
    if rank == 0:
        with open(args.rank_out, "w") as f:
            json.dump({"medians": [float(t) for t in every], "times": times, "sizes": sizes}, f)
        torch.save(lp.cpu(), args.rank_out + ".logp.pt")
    dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks vocab-parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=64, V=4099, 3 repeats (seconds: checks that it runs)")
    p.add_argument("--N", type=int, default=1024)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--H", type=int, default=1024, help="hidden size (path fused-linear)")
    p.add_argument("--path", default="logits", choices=["logits", "fused-linear"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads in every process (default: half the CPUs)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after one warm-up (default 7; quick 3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out-dir", default="bench_results")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.N, args.V, args.H = 64, 4099, 64
    args.repeats = args.repeats or (3 if args.quick else 7)
    if args.rank_out is not None:
        return _rank_main(args)
    torch.set_num_threads(args.threads)
    single, lp_single = _time(args, slice(0, args.V), None, lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        rank_out = os.path.join(tmp, "ranks.json")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               "-m", "benchmarks.vocab_parallel", "--N", str(args.N), "--V", str(args.V), "--H", str(args.H),
               "--path", args.path, "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--device", args.device, "--rank-out", rank_out]
        res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stdout[-3000:] + res.stderr[-5000:])
            print("vocab-parallel: the split run failed")
            return 1
        with open(rank_out) as f:
            split = json.load(f)
        lp_split = torch.load(rank_out + ".logp.pt")
    err = float(((lp_split.double() - lp_single.cpu().double()).abs().max() / lp_single.abs().max()).item())
    t_single = statistics.median(single)
    t_split = max(split["medians"])
    row = {"path": args.path, "N": args.N, "V": args.V, "H": args.H if args.path == "fused-linear" else None,
           "nproc": args.nproc, "threads": args.threads, "single_ms": 1e3 * t_single, "split_rank_ms": 1e3 * t_split,
           "ratio": t_split / t_single, "shards": split["sizes"], "max_rel_err_logp": err,
           "spread_single": (max(single) - min(single)) / t_single}
    print(f"vocab-parallel ({args.path}, N={args.N}, V={args.V}, fp32, {args.device}, {args.threads} threads a process, "
          f"median of {args.repeats}):")
    print(f"  single process         {row['single_ms']:9.1f} ms")
    print(f"  {args.nproc} ranks, per rank     {row['split_rank_ms']:9.1f} ms   ({row['ratio']:.2f}x single; "
          f"target <= 0.65x)")
    print(f"  max |logp split − single| / max |logp| = {err:.1e}")
    if not args.no_save:
        from . import common

        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"vocab_parallel_{args.path}_{args.device}.json")
        common.write_json(path, {"machine": common.machine_info(args.device), "rows": [row]})
        print(f"wrote {path}")
    if err > 1e-5:
        print("vocab-parallel: the split's log-probs differ from the single process's")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
