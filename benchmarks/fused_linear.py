"""Benchmark of the GRPO loss from hidden states and the LM head: every available provider, one table.

    python -m benchmarks fused-linear [--quick] [--device cpu|cuda] [--providers a,b] [--shapes B,T,H,V ...]
    
Providers (fwd+bwd: the loss, then loss.backward() giving d hidden, d weight; each skipped with the
reason printed when it cannot run here):

    floor          three bare matmuls of the same shapes, measured in the same run: logits = h·Wᵀ,
                   dh = G·W, dW = Gᵀ·h (G is the logits buffer reused as a gradient). Any method that
                   does not recompute logits needs at least these; the physical limit of this table.
    eager          full logits through autograd: (h·Wᵀ) -> grpo_loss(backend="torch") -> backward
    logits+<k>     full logits, then grpo_loss(backend=k, inplace=True): the fused loss kernel, but the
                   (N, V) logits and their gradient still live at once
    fused-<k>      grpo_fast.fused_linear_grpo_loss(backend=k): chunks, gradient in forward, 3 matmuls
    fused-<k>-seq       the same at importance_sampling_level="sequence" (whole rows per chunk)
    fused-<k>-seq-2pass sequence level with chunks shorter than a row: log-prob pre-pass, 4 matmuls
    trl            TRL's trl.kernels.ChunkedLogProbFunction (log-probs + entropy from hidden states, its
                   default 32768-wide vocabulary tiles) and TRL's per-token GRPO loss formula in torch
    liger          Liger's LigerFusedLinearGRPOLoss (compiled=False off CUDA: inductor's CPU build takes
                   minutes), when liger_kernel is importable

Loss options: DAPO aggregation, ε = 0.2 / 0.28, β = 0.04 with k3 KL, off-policy old log-probs, ~10 %
padding. Every provider computes the same loss (check column: loss, dh and dW vs eager).

Time: median of ``--repeats`` runs after one warm-up; on CPU the providers' runs are interleaved
round-robin so that load from other jobs hits them alike (CUDA: benchmarks/common.py's
do_bench per provider). GFLOP/s counts the
three matmuls (6·N·H·V flops) for every provider, so it compares like with like.

Memory (CPU): in a fresh child process per (case, provider), with glibc's mmap threshold pinned low so
that freed blocks leave the resident set: peak RSS during one fwd+bwd (VmHWM, reset through
/proc/self/clear_refs) minus RSS just before it, after an unmeasured warm-up call. The inputs (hidden,
weight, ids, old/ref log-probs) exist before; the gradients (dh, dW) are created by the call and are
counted ("extra peak"); "work" is extra peak minus the gradients' bytes — the transient working memory
that the logits (and their gradient) would take. On CUDA: torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from . import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (B, T, H, V): the CPU case (N = 1024 tokens, Llama-2 vocabulary, a small model's width).
FULL_SHAPES = [(4, 256, 512, 32000)]
QUICK_SHAPES = [(4, 64, 128, 4096)]  # N = 256: seconds

LOSS_OPTIONS = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.04, kl_estimator="k3",
                    temperature=1.0)


@dataclass(frozen=True)
class Case(common.TokenShape):
    B: int
    T: int
    H: int
    V: int
    dtype: str

    @property
    def grad_bytes(self) -> int:
        """d hidden + d weight, in the inputs' dtype."""
        return (self.N * self.H + self.V * self.H) * self.elt

    @property
    def flops(self) -> float:
        return 6.0 * self.N * self.H * self.V  # three N·H·V matmuls, 2 flops per multiply-add

    @property
    def name(self) -> str:
        return f"B{self.B} T{self.T} H{self.H} V{self.V} {self.dtype}"


def make_inputs(case: Case, device, seed: int = 0) -> dict:
    """Random hidden / LM head like a real model's (logits of std ≈ 2), ids, padding, rewards, old/ref."""
    import grpo_fast

    dev = torch.device(device)
    dt = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = case.B, case.T, case.H, case.V
    hidden = torch.randn(B, T, H, generator=g).to(dev, dt)
    weight = (torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))).to(dev, dt)
    ids = torch.randint(0, V, (B, T), generator=g).to(dev)
    lengths = torch.randint(int(0.8 * T), T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(dev)
    rewards = torch.rand(B, generator=g).to(dev)
    # old / ref near the current policy's own log-probs (computed without materializing the logits)
    logp = grpo_fast.fused_linear_token_logprobs(hidden, weight, ids, backend="torch")
    old = logp + 0.1 * torch.randn(B, T, generator=g).to(dev)
    ref = logp + 0.1 * torch.randn(B, T, generator=g).to(dev)
    return dict(hidden=hidden, weight=weight, ids=ids, mask=mask, rewards=rewards, old=old, ref=ref,
                group_size=min(B, 4) if B % min(B, 4) == 0 else B)


# ---- providers -------------------------------------------------------------------------------


def _leaves(inputs):
    h = inputs["hidden"].detach().clone().requires_grad_(True)
    w = inputs["weight"].detach().clone().requires_grad_(True)
    return h, w


def _loss_kwargs(inputs, level="token"):
    return dict(rewards=inputs["rewards"], group_size=inputs["group_size"], old_logp=inputs["old"],
                ref_logp=inputs["ref"], completion_mask=inputs["mask"], importance_sampling_level=level,
                **LOSS_OPTIONS)


def _floor(inputs, h, w):
    def fn():
        z = h.detach().reshape(-1, h.shape[-1]) @ w.detach().t()  # logits (N, V)
        dh = z @ w.detach()  # z stands in for the logits' gradient: same shape, same cost
        dw = z.t() @ h.detach().reshape(-1, h.shape[-1])
        return None, dh.view(h.shape), dw
    return fn


def _eager(inputs, h, w, backend="torch", level="token"):
    import grpo_fast

    def fn():
        z = torch.matmul(h, w.t())
        loss, _ = grpo_fast.grpo_loss(z, inputs["ids"], backend=backend, inplace=backend != "torch",
                                      **_loss_kwargs(inputs, level))
        loss.backward()
        return loss.detach(), h.grad, w.grad
    return fn


def _fused(inputs, h, w, backend, level="token", chunk_size=None):
    import grpo_fast

    def fn():
        loss, _ = grpo_fast.fused_linear_grpo_loss(h, w, inputs["ids"], backend=backend, chunk_size=chunk_size,
                                                   **_loss_kwargs(inputs, level))
        loss.backward()
        return loss.detach(), h.grad, w.grad
    return fn


def _trl(inputs, h, w):
    """TRL 1.16: ChunkedLogProbFunction (what GRPOTrainer's fused LM head runs) + its per-token loss."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from grpo_fast.reference import group_advantages_reference

    o = LOSS_OPTIONS
    A = group_advantages_reference(inputs["rewards"], inputs["group_size"], "group", 1e-4).unsqueeze(1)
    m = inputs["mask"].float()

    def fn():
        B, T, H = h.shape
        logp, _entropy, *_ = ChunkedLogProbFunction.apply(h.reshape(B * T, H), w, None, inputs["ids"].reshape(-1),
                                                          o["temperature"], _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                          ("entropy",))
        logp = logp.view(B, T)
        # GRPOTrainer._compute_loss, token level, loss_type="dapo"
        coef_1 = torch.exp(logp - inputs["old"])
        coef_2 = torch.clamp(coef_1, 1 - o["epsilon_low"], 1 + o["epsilon_high"])
        per_token = -torch.min(coef_1 * A, coef_2 * A)
        d = inputs["ref"] - logp
        per_token = per_token + o["beta"] * (torch.exp(d) - d - 1)
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
        loss.backward()
        return loss.detach(), h.grad, w.grad
    return fn


def _liger(inputs, h, w, device):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    from grpo_fast.reference import group_advantages_reference

    o = LOSS_OPTIONS
    crit = LigerFusedLinearGRPOLoss(beta=o["beta"], compiled=torch.device(device).type == "cuda",
                                    epsilon_low=o["epsilon_low"], epsilon_high=o["epsilon_high"],
                                    loss_type=o["loss_type"], temperature=o["temperature"])
    A = group_advantages_reference(inputs["rewards"], inputs["group_size"], "group", 1e-4)

    def fn():
        loss, _ = crit(h, w, inputs["ids"], inputs["mask"].to(torch.int64), A, ref_per_token_logps=inputs["ref"],
                       old_per_token_logps=inputs["old"])
        loss.backward()
        return loss.detach(), h.grad, w.grad
    return fn


def _kernel_backend(device) -> str:
    return "cpu" if torch.device(device).type == "cpu" else "triton"


def provider_table(device) -> Dict[str, tuple]:
    """name -> (builder(inputs, h, w) -> fn, level, unavailable() -> reason | None)."""
    from grpo_fast.backends import unavailable_reason

    dev = torch.device(device)
    k = _kernel_backend(dev)

    def kernel_reason():
        return unavailable_reason(k, dev)

    def module_reason(mod):
        def reason():
            import importlib.util

            try:
                found = importlib.util.find_spec(mod) is not None
            except ImportError:
                found = False
            return None if found else f"{mod} is not installed"
        return reason

    none = lambda: None  # noqa: E731
    return {
        "floor": (lambda i, h, w: _floor(i, h, w), "token", none),
        "eager": (lambda i, h, w: _eager(i, h, w), "token", none),
        f"logits+{k}": (lambda i, h, w: _eager(i, h, w, backend=k), "token", kernel_reason),
        f"fused-{k}": (lambda i, h, w: _fused(i, h, w, k), "token", kernel_reason),
        "fused-torch": (lambda i, h, w: _fused(i, h, w, "torch"), "token", none),
        f"fused-{k}-seq": (lambda i, h, w: _fused(i, h, w, k, level="sequence"), "sequence", kernel_reason),
        f"fused-{k}-seq-2pass": (lambda i, h, w: _fused(i, h, w, k, level="sequence", chunk_size=max(1, i["hidden"].shape[1] // 2)),
                                 "sequence", kernel_reason),
        "trl": (lambda i, h, w: _trl(i, h, w), "token", module_reason("trl.kernels.chunked_logprob")),
        "liger": (lambda i, h, w: _liger(i, h, w, dev), "token", module_reason("liger_kernel.chunked_loss")),
    }


# ---- measuring -------------------------------------------------------------------------------


def _check(got, want) -> str:
    """Largest relative error of loss, dh, dW against eager (relative to each tensor's max)."""
    worst = 0.0
    for a, b in zip(got, want):
        if a is None or b is None:
            continue
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30))
    return f"{worst:.0e}"


def run_case(case: Case, providers: List[str], device, *, repeats: int, warmup: int, check: bool, log=print) -> List[dict]:
    """Time every provider on one case. On CPU the runs are interleaved round-robin (run i of every
    provider, then run i + 1 of every provider ...), so that a burst of load from other jobs on a
    shared machine hits all providers alike instead of skewing the one measured at that moment."""
    dev = torch.device(device)
    table = provider_table(dev)
    inputs = make_inputs(case, dev)
    active = {}  # name -> (fn, clear, level)
    for name in providers:
        build, level, reason = table[name]
        why = reason()
        if why is not None:
            log(f"  [{case.name}] {name}: skipped ({why})")
            continue
        h, w = _leaves(inputs)

        def clear(h=h, w=w):
            h.grad = None
            w.grad = None

        try:
            active[name] = (build(inputs, h, w), clear, level)
        except Exception as e:  # a peer failing on this machine is a result to report, not a crash
            log(f"  [{case.name}] {name}: failed to build ({type(e).__name__}: {str(e)[:200]})")
    timings: Dict[str, common.Timing] = {}
    if dev.type == "cuda":
        for name, (fn, clear, _) in list(active.items()):
            try:
                timings[name] = common.time_fn(fn, setup=clear, repeats=repeats, warmup=warmup, device=dev)
            except Exception as e:
                log(f"  [{case.name}] {name}: failed ({type(e).__name__}: {str(e)[:200]})")
                del active[name]
    else:
        timings = {name: common.Timing(method="perf_counter, median, providers interleaved") for name in active}
        for i in range(warmup + repeats):
            for name, (fn, clear, _) in list(active.items()):
                clear()
                gc.collect()  # a collection inside the timed region would be charged to fn
                try:
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                except Exception as e:
                    log(f"  [{case.name}] {name}: failed ({type(e).__name__}: {str(e)[:200]})")
                    del active[name], timings[name]
                    continue
                if i >= warmup:
                    timings[name].times.append(dt)
    rows = []
    refs: Dict[str, tuple] = {}
    for name, (fn, clear, level) in active.items():
        t = timings[name]
        row = dict(case=case.name, provider=name, level=level, ms=t.median * 1e3, spread=t.spread, times=t.times,
                   gflops=case.flops / t.median / 1e9, timing=t.method)
        if check and name != "floor":
            if level not in refs:
                hr, wr = _leaves(inputs)
                refs[level] = _eager(inputs, hr, wr, level=level)()
            clear()
            row["check"] = _check(fn(), refs[level])
        clear()
        rows.append(row)
        log(f"  [{case.name}] {name}: {row['ms']:.1f} ms")
    active.clear()
    gc.collect()
    floor = next((r for r in rows if r["provider"] == "floor"), None)
    eager = next((r["ms"] for r in rows if r["provider"] == "eager"), None)
    for r in rows:
        r["min_ms"] = min(r["times"]) * 1e3
        r["x_floor"] = r["ms"] / floor["ms"] if floor else None
        # best-of-runs ratio: on a machine shared with other jobs the minimum is the least disturbed run
        r["x_floor_min"] = r["min_ms"] / floor["min_ms"] if floor else None
        r["x_eager"] = r["ms"] / eager if eager else None
    return rows


def _memory_in_process(case: Case, provider: str, device) -> dict:
    dev = torch.device(device)
    build, _, reason = provider_table(dev)[provider]
    if reason() is not None:
        return {"extra": None}
    inputs = make_inputs(case, dev)
    h, w = _leaves(inputs)
    fn = build(inputs, h, w)
    fn()  # warm-up: thread pools, lazy initialization
    h.grad = w.grad = None
    extra, method = common.extra_peak_memory(fn, dev)
    return {"extra": extra, "method": method}


def measure_memory(case: Case, provider: str, device) -> dict:
    if torch.device(device).type == "cuda":
        return _memory_in_process(case, provider, device)
    return common.run_child("benchmarks.fused_linear", {"case": asdict(case), "provider": provider, "device": "cpu"})


COLUMNS = [
    ("case", "case", "s"),
    ("provider", "provider", "s"),
    ("ms", "median ms", ".1f"),
    ("spread", "spread", lambda v: f"{v:.0%}"),
    ("x_floor", "x floor", lambda v: f"{v:.2f}x"),
    ("x_floor_min", "x floor (min)", lambda v: f"{v:.2f}x"),
    ("x_eager", "x eager", lambda v: f"{v:.2f}x"),
    ("gflops", "GFLOP/s", ".1f"),
    ("extra_mb", "extra peak MB", ".0f"),
    ("work_mb", "work MB", ".0f"),
    ("work_x", "work/logits", ".2f"),
    ("check", "check", "s"),
]

LEGEND = """\
fwd+bwd: loss, then loss.backward() (d hidden and d weight). x floor = median time / the three bare
matmuls' (floor row); x floor (min) = the same with each row's fastest run (less disturbed by other
jobs on a shared machine), x eager = time / full logits through autograd. GFLOP/s = 6·N·H·V / time for every row.
extra peak = peak memory during the call minus memory before it (inputs allocated, gradients counted);
work = extra peak minus the gradients' bytes (N·H + V·H): what the logits and their gradient cost;
work/logits = work / the bytes of the full (N, V) logits. check = max relative error of loss, dh, dW
vs eager at the same level (the -seq rows vs eager at sequence level)."""


def default_providers(device) -> List[str]:
    return list(provider_table(device))


def run(*, quick: bool = False, device: str = "cpu", providers: Optional[List[str]] = None, shapes=None,
        dtypes=None, repeats: Optional[int] = None, warmup: int = 1, memory: bool = True, check: bool = True,
        out_dir: Optional[str] = "bench_results", log=print) -> dict:
    """Run the fused-linear benchmark; print the table; write JSON under ``out_dir``. Returns the result."""
    dev = torch.device(device)
    shapes = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    dtypes = dtypes or ["fp32"]
    repeats = repeats or (3 if quick else 5)
    known = provider_table(dev)
    providers = providers or default_providers(dev)
    bad = [p for p in providers if p not in known]
    if bad:
        raise SystemExit(f"unknown providers {bad}; known here: {list(known)}")
    if "floor" not in providers:
        providers = ["floor"] + providers  # every ratio is to the floor measured in the same run
    log(f"fused-linear benchmark on {dev} ({torch.get_num_threads()} threads), median of {repeats}")
    rows: List[dict] = []
    for shape in shapes:
        for dt in dtypes:
            case = Case(*shape, dtype=dt)
            case_rows = run_case(case, providers, dev, repeats=repeats, warmup=warmup, check=check, log=log)
            if memory:
                for r in case_rows:
                    try:
                        res = measure_memory(case, r["provider"], dev)
                    except Exception as e:
                        log(f"  memory of {r['provider']}: {type(e).__name__}: {str(e)[:300]}")
                        continue
                    if res.get("extra") is None:
                        continue
                    r["extra_mb"] = res["extra"] / common.MB
                    r["work_mb"] = (res["extra"] - case.grad_bytes) / common.MB
                    r["work_x"] = (res["extra"] - case.grad_bytes) / case.logits_bytes
                    r["memory_method"] = res.get("method")
            for r in case_rows:
                r["logits_mb"] = case.logits_bytes / common.MB
                r["grad_mb"] = case.grad_bytes / common.MB
            rows += case_rows
    text = common.format_table(rows, COLUMNS)
    log("")
    log(text)
    log("")
    log(LEGEND)
    result = {"benchmark": "fused_linear", "machine": common.machine_info(dev), "loss_options": LOSS_OPTIONS,
              "repeats": repeats, "rows": rows, "legend": LEGEND}
    if out_dir:
        path = os.path.join(out_dir, f"fused_linear_{dev.type}.json")
        common.write_json(path, result)
        log(f"\nwrote {path}")
    return result


def _parse_shape(s: str):
    try:
        B, T, H, V = (int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is B,T,H,V (four ints), got {s!r}")
    return (B, T, H, V)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks fused-linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (seconds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--providers", type=lambda s: s.split(","), default=None, help="comma-separated subset")
    p.add_argument("--shapes", type=_parse_shape, nargs="+", default=None, help="B,T,H,V ... (default 4,256,512,32000)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory children")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--out-dir", default="bench_results")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _child_main(payload: str) -> int:
    p = json.loads(payload)
    torch.manual_seed(0)
    print(json.dumps(_memory_in_process(Case(**p["case"]), p["provider"], p["device"])))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return _child_main(args.child)
    run(quick=args.quick, device=args.device, providers=args.providers, shapes=args.shapes, dtypes=args.dtypes,
        repeats=args.repeats, warmup=args.warmup, memory=args.memory, check=args.check,
        out_dir=None if args.no_save else args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
