"""Benchmark of the GRPO loss from logits: every available provider, one table.

    python -m benchmarks loss [--quick] [--device cpu|cuda] [--providers eager,cpu,...] [--compile]
    
Providers (each skipped, with the reason printed, when it cannot run here):

    eager           grpo_loss(backend="torch"): the eager reference through autograd (the baseline)
    compile         torch.compile of the same reference (opt-in on CPU with --compile: inductor's C++
                    build of forward and backward takes minutes on a small machine; on by default on CUDA)
    cpu             grpo_loss(backend="cpu"), inplace=False: the C++/OpenMP kernel
    cpu-inplace     the same with inplace=True: the gradient overwrites the logits
    cpu[-inplace]-avx2, cpu[-inplace]-avx512, cpu[-inplace]-avx512bf16, cpu[-inplace]-generic
                    the same on one instruction-set path of the extension (switched per call, like
                    GRPO_FAST_CPU_ISA): compare the paths back to back in one run
    triton[-inplace], cuda[-inplace]   the GPU kernels (--device cuda)
    trl             TRL's own selective_log_softmax + entropy_from_logits (eager PyTorch on CPU,
                    TRL's Triton kernel on CUDA) and GRPOTrainer's per-token loss formula, when trl
                    is installed: what a TRL user runs today

Modes:

    fwd        the loss with logits.requires_grad False (no gradient computed or stored)
    fwd+bwd    the loss with grad, then loss.backward()
    bwd        loss.backward() alone, the forward run untimed before it. For the fused providers the
               gradient is produced in the forward pass and backward only hands it over (scales it
               when grad_output != 1), so their bwd is ~0 and their fwd includes the gradient work
               only when a gradient is asked for. "fwd+bwd minus fwd" would not be a backward time.

Traffic model (what a one-pass kernel cannot avoid; N = B·T tokens, elt = bytes per logit):
fwd reads N·V·elt; fwd+bwd reads N·V·elt and writes the gradient, N·V·elt. GB/s = those bytes / time
for every provider (so GB/s compares like with like), and "%BW" divides it by the copy bandwidth
measured at the start and end of this run. bwd rows have no byte count.

Memory: extra peak over the inputs (logits, ids, old/ref, ...), measured in a fresh child process per
case (see benchmarks/common.py), also as a multiple of the logits' bytes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (B, T, V). B = 8 is one group of 8 completions (fused advantages need B % group_size == 0).
FULL_SHAPES = [(8, 512, 32000), (8, 128, 151936)]  # N = 4096 x 32k (Llama-2), N = 1024 x 152k (Qwen2.5)
QUICK_SHAPES = [(8, 64, 8192)]  # N = 512: 16 MB of fp32 logits, the whole --quick run takes seconds
GROUP_SIZE = 8

# A realistic TRL configuration: DAPO aggregation, asymmetric clip (ε_high = 0.28), rewards
# normalized per group inside the kernel, off-policy ratio, k3 KL against a reference policy.
LOSS_OPTIONS = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.04, kl_estimator="k3",
                    group_size=GROUP_SIZE, scale_rewards="group", temperature=1.0)

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Case(common.TokenShape):
    B: int
    T: int
    V: int
    dtype: str  # key of DTYPES

    @property
    def name(self) -> str:
        return f"N={self.N} V={self.V} {self.dtype}"

    def bytes_moved(self, mode: str) -> Optional[int]:
        """Minimum traffic of a one-pass kernel: read the logits; with grad also write their gradient."""
        if mode == "fwd":
            return self.logits_bytes
        if mode == "fwd+bwd":
            return 2 * self.logits_bytes
        return None


def make_cases(shapes, dtypes) -> List[Case]:
    return [Case(B, T, V, d) for (B, T, V) in shapes for d in dtypes]


# ---- inputs ----------------------------------------------------------------------------------


def make_inputs(case: Case, device, seed: int = 0) -> dict:
    """Random inputs of a realistic GRPO step (never zeros: they hide unwritten outputs).

    logits ~ 2·N(0, 1) in the case's dtype; rows padded to a random length in [T/2, T]; old and ref
    log-probs are the true log-probs plus noise, so ratios are near 1 and some tokens get clipped.
    """
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T, V = case.B, case.T, case.V
    dtype = DTYPES[case.dtype]
    logits = torch.empty((B, T, V), dtype=dtype, device=device)
    # Fill in row blocks so that no (B, T, V) float32 temporary is made for a bf16 case: that would
    # inflate the process's memory before the measurements.
    for b in range(B):
        logits[b].copy_(torch.randn((T, V), generator=g).mul_(2.0))
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64).to(device)
    rewards = torch.randn(B, generator=g).to(device)
    logp = _true_logp(logits, ids)
    old = (logp + 0.1 * torch.randn((B, T), generator=g).to(device)).contiguous()
    ref = (logp + 0.1 * torch.randn((B, T), generator=g).to(device)).contiguous()
    return dict(logits=logits, ids=ids, mask=mask, rewards=rewards, old_logp=old, ref_logp=ref)


@torch.no_grad()
def _true_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = torch.empty(ids.shape, dtype=torch.float32, device=logits.device)
    for b in range(logits.shape[0]):  # one row at a time: no (B, T, V) float32 temporary
        x = logits[b].float()
        out[b] = x.gather(-1, ids[b].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, -1)
    return out


# ---- providers -------------------------------------------------------------------------------


@dataclass
class Provider:
    name: str
    backend: Optional[str] = None  # grpo_fast backend, for the fused providers
    inplace: bool = False
    devices: tuple = ("cpu", "cuda")
    peer: bool = False  # another project's code: its disagreement with eager is reported, not a failure
    isa: Optional[str] = None  # the CPU extension's instruction-set path (None: the best available)

    @property
    def fused(self) -> bool:
        return self.backend is not None and self.backend != "torch"

    def unavailable(self, device: torch.device) -> Optional[str]:
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)} only"
        if self.backend is not None:
            from grpo_fast.backends import unavailable_reason

            why = unavailable_reason(self.backend, device)
            if why is None and self.isa is not None:
                from grpo_fast import _C_cpu

                if self.isa not in _C_cpu.supported_isas():
                    why = f"the {self.isa} path is not available on this CPU/build ({_C_cpu.supported_isas()})"
            return why
        if self.name == "trl" and importlib.util.find_spec("trl") is None:
            return "trl is not installed (pip install trl)"
        if self.name == "compile" and not hasattr(torch, "compile"):
            return "torch.compile needs torch >= 2.0"
        return None

    def build(self, inputs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function logits -> loss (a scalar with a gradient when logits.requires_grad)."""
        kw = dict(rewards=inputs["rewards"], old_logp=inputs["old_logp"], ref_logp=inputs["ref_logp"],
                  completion_mask=inputs["mask"], **LOSS_OPTIONS)
        ids = inputs["ids"]
        if self.backend is not None:
            from grpo_fast.api import grpo_loss

            backend, inplace = self.backend, self.inplace
            if self.isa is None:
                return lambda logits: grpo_loss(logits, ids, backend=backend, inplace=inplace, **kw)[0]
            from grpo_fast import _C_cpu

            def on_isa(logits, isa=self.isa):
                prev = _C_cpu.set_isa(isa)
                try:
                    return grpo_loss(logits, ids, backend=backend, inplace=inplace, **kw)[0]
                finally:
                    _C_cpu.set_isa(prev)

            return on_isa
        if self.name == "compile":
            from grpo_fast.reference import grpo_loss_reference

            mask = inputs["mask"].to(torch.float32)
            kw = {**kw, "completion_mask": mask}
            compiled = torch.compile(lambda logits: grpo_loss_reference(logits, ids, **kw)[0])
            return compiled
        if self.name == "trl":
            return _trl_loss_fn(inputs)
        raise ValueError(f"unknown provider {self.name}")


def _trl_loss_fn(inputs: dict):
    """GRPOTrainer's loss path: TRL's log-prob and entropy helpers, its per-token loss formula.

    trl.trainer.utils.selective_log_softmax (per-row logsumexp loop) for the log-probs,
    entropy_from_logits under no_grad for the entropy metric (chunked log_softmax), then
    compute_loss's formula for dapo with the k3 KL. Only the helpers are TRL's code; the few
    (B, T) lines below follow GRPOTrainer.compute_loss.
    """
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    from grpo_fast.reference import group_advantages_reference

    ids, old, ref = inputs["ids"], inputs["old_logp"], inputs["ref_logp"]
    mask = inputs["mask"].to(torch.float32)
    o = LOSS_OPTIONS
    adv = group_advantages_reference(inputs["rewards"], o["group_size"], o["scale_rewards"]).unsqueeze(1)

    def loss_fn(logits):
        x = logits / o["temperature"]
        logp = selective_log_softmax(x, ids)
        with torch.no_grad():
            entropy = entropy_from_logits(x)
        coef1 = torch.exp(logp - old)
        coef2 = torch.clamp(coef1, 1 - o["epsilon_low"], 1 + o["epsilon_high"])
        per_token = -torch.min(coef1 * adv, coef2 * adv)
        d = ref - logp
        per_token = per_token + o["beta"] * (torch.exp(d) - d - 1)
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        loss.entropy = entropy  # keep it alive like the trainer does until logging
        return loss

    return loss_fn


PROVIDERS = {p.name: p for p in [
    Provider("eager", backend="torch"),
    Provider("compile"),
    Provider("cpu", backend="cpu", devices=("cpu",)),
    Provider("cpu-inplace", backend="cpu", inplace=True, devices=("cpu",)),
    Provider("triton", backend="triton", devices=("cuda",)),
    Provider("triton-inplace", backend="triton", inplace=True, devices=("cuda",)),
    Provider("cuda", backend="cuda", devices=("cuda",)),
    Provider("cuda-inplace", backend="cuda", inplace=True, devices=("cuda",)),
    Provider("trl", peer=True),
] + [Provider(f"cpu{ip}-{isa}", backend="cpu", inplace=bool(ip), devices=("cpu",), isa=isa)
     for isa in ("avx512bf16", "avx512", "avx2", "generic") for ip in ("", "-inplace")]}
# eager's backend is "torch": not a fused kernel (Provider.fused is False for it).


def default_providers(device: torch.device, quick: bool, compile_: bool) -> List[str]:
    names = ["eager"]
    if compile_ or (device.type == "cuda" and not quick):
        names.append("compile")
    names += ["cpu", "cpu-inplace"] if device.type == "cpu" else ["triton", "triton-inplace", "cuda", "cuda-inplace"]
    if not quick:
        names.append("trl")  # importing trl (and transformers) alone takes seconds
    return names


# ---- one case --------------------------------------------------------------------------------


class _Runner:
    """Runs one provider's modes on one set of inputs, restoring what a run consumes."""

    def __init__(self, fn, logits: torch.Tensor, backup: Optional[torch.Tensor], inplace: bool):
        self.fn, self.logits, self.backup, self.inplace = fn, logits, backup, inplace

    def _prepare(self, grad: bool) -> None:
        lg = self.logits
        lg.grad = None
        if self.inplace and self.backup is not None:
            with torch.no_grad():
                lg.copy_(self.backup)  # the previous run overwrote them with their gradient
        lg.requires_grad_(grad)

    def setup_for(self, mode: str):
        if mode == "fwd":
            return lambda: self._prepare(False)
        if mode == "fwd+bwd":
            return lambda: self._prepare(True)

        def setup_bwd():
            self._prepare(True)
            return self.fn(self.logits)  # untimed forward; fn(loss) below times backward alone

        return setup_bwd

    def call_for(self, mode: str):
        if mode == "fwd":
            return lambda: self.fn(self.logits)
        if mode == "fwd+bwd":
            def fwd_bwd():
                loss = self.fn(self.logits)
                loss.backward()
                return loss

            return fwd_bwd
        return lambda loss: loss.backward()

    def time(self, mode: str, *, repeats: int, warmup: int, device) -> common.Timing:
        """Median time of ``mode``. Per-run setup only where a run consumes something (inplace
        logits, the forward before a timed backward), so that on CUDA the other modes go through
        do_bench; dropping the last gradient is done untimed through ``grad_to_none``."""
        if mode == "fwd" or (mode == "fwd+bwd" and not self.inplace):
            self._prepare(mode == "fwd+bwd")
            return common.time_fn(self.call_for(mode), repeats=repeats, warmup=warmup, device=device,
                                  grad_to_none=[self.logits] if mode == "fwd+bwd" else None)
        return common.time_fn(self.call_for(mode), setup=self.setup_for(mode), repeats=repeats,
                              warmup=warmup, device=device)

    def result(self):
        """(loss value, gradient of the first 16 tokens of row 0 as float32) of one fwd+bwd."""
        self._prepare(True)
        loss = self.fn(self.logits)
        loss.backward()
        g = self.logits.grad[0, :16].detach().float().clone()
        value = float(loss.detach())
        self._prepare(False)
        return value, g


def _check(value, grad, ref_value, ref_grad, dtype: str, peer: bool = False) -> str:
    """'ok' when loss and gradient slice agree with the eager provider's, else 'FAIL(...)'.

    A peer (TRL) computes in the logits' dtype where eager accumulates in fp32 (TRL's bf16
    log_softmax rounds log-probs to bf16), so its difference is reported as 'differs(...)'.
    """
    tol = 1e-3 if dtype == "fp32" else 3e-2  # eager and fused both accumulate in fp32; bf16 grads are rounded
    lerr = abs(value - ref_value) / max(abs(ref_value), 1e-6)
    gerr = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-30))
    if lerr <= tol and gerr <= tol:
        return "ok"
    return f"{'differs' if peer else 'FAIL'}(loss {lerr:.1e}, grad {gerr:.1e})"


def run_case(case: Case, providers: List[str], device, *, repeats: int, warmup: int, check: bool = True,
             log=print) -> List[dict]:
    """Time every provider and mode on one case. Returns one row per (provider, mode)."""
    device = torch.device(device)
    inputs = make_inputs(case, device)
    logits = inputs["logits"]
    any_inplace = any(PROVIDERS[p].inplace for p in providers)
    backup = logits.detach().clone() if any_inplace else None
    rows, ref = [], None
    order = sorted(providers, key=lambda p: p != "eager")  # eager first: the others' ratio and check
    for name in order:
        prov = PROVIDERS[name]
        t_build = time.perf_counter()
        res = {}
        status = None
        try:
            fn = prov.build(inputs)
            runner = _Runner(fn, logits, backup, prov.inplace)
            build_s = time.perf_counter() - t_build
            for mode in MODES:
                if mode == "fwd" and prov.inplace:
                    continue  # without a gradient inplace changes nothing: same as the non-inplace row
                t0 = time.perf_counter()
                t = runner.time(mode, repeats=repeats, warmup=warmup, device=device)
                res[mode] = t
                log(f"  {case.name:24s} {name:15s} {mode:8s} {t.median * 1e3:10.2f} ms  (spread {t.spread:.0%}, "
                    f"{time.perf_counter() - t0:.1f}s wall{'' if build_s < 1 else f', built in {build_s:.0f}s'})")
            if check:
                value, grad = runner.result()
        except Exception as e:  # one broken provider must not cost the whole table; it is reported
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            log(f"  {case.name:24s} {name:15s} ERROR {msg}")
            rows.append(dict(case=case.name, N=case.N, V=case.V, dtype=case.dtype, provider=name, mode="error",
                             ms=None, check=f"ERROR {msg}"))
            logits.grad = None
            logits.requires_grad_(False)
            if backup is not None:
                with torch.no_grad():
                    logits.copy_(backup)  # a failed inplace run may have written into them
            continue
        if check:
            if ref is None:
                ref = (value, grad)
                status = "reference" if name == "eager" else "no eager to compare"
            else:
                status = _check(value, grad, ref[0], ref[1], case.dtype, prov.peer)
        for mode, t in res.items():
            nbytes = case.bytes_moved(mode)
            rows.append(dict(case=case.name, N=case.N, V=case.V, dtype=case.dtype, provider=name, mode=mode,
                             ms=t.median * 1e3, spread=t.spread, times_ms=[x * 1e3 for x in t.times],
                             timing=t.method, bytes=nbytes,
                             gbps=(nbytes / t.median / common.GB) if nbytes else None, check=status))
        del fn, runner
    if backup is not None:
        del backup
    del inputs, logits
    # Ratios to eager, measured in this same run.
    eager = {r["mode"]: r["ms"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        e = eager.get(r["mode"])
        r["speedup"] = (e / r["ms"]) if e and r.get("ms") else None
        if r["mode"] == "bwd" and PROVIDERS[r["provider"]].fused:
            # Not a speedup: the gradient was made in forward; bwd only hands it over.
            r["speedup"] = None
            r["note"] = "grad made in fwd"
    return rows


# ---- memory (child process) ------------------------------------------------------------------


def measure_memory(case: Case, providers: List[str], device) -> dict:
    """{provider: {mode: extra peak bytes}} for fwd and fwd+bwd, plus the method used."""
    device = torch.device(device)
    if device.type == "cuda":
        return _memory_in_process(case, providers, device)
    return common.run_child("benchmarks.loss", {"case": asdict(case), "providers": providers, "device": "cpu"})


def _memory_in_process(case: Case, providers: List[str], device) -> dict:
    inputs = make_inputs(case, device)
    logits = inputs["logits"]
    backup = logits.detach().clone() if any(PROVIDERS[p].inplace for p in providers) else None
    out: Dict[str, dict] = {}
    method = None
    for name in providers:
        prov = PROVIDERS[name]
        out[name] = {}
        try:
            runner = _Runner(prov.build(inputs), logits, backup, prov.inplace)
            for mode in ("fwd", "fwd+bwd"):
                setup, call = runner.setup_for(mode), runner.call_for(mode)
                setup()
                # Warm-up per mode (torch.compile builds a separate graph without grad): lazy
                # initialization, compilation and thread pools are not the case's memory.
                call()
                setup()  # restores inplace-overwritten logits, drops the warm-up's gradient
                # The gradient stays alive until the peak is read: a training step holds it too.
                extra, method = common.extra_peak_memory(call, device)
                out[name][mode] = extra
            runner._prepare(False)
            del runner
        except Exception as e:  # reported by the timing pass already; leave its memory cells empty
            print(f"memory of {name}: {type(e).__name__}: {e}", file=sys.stderr)
            logits.grad = None
            logits.requires_grad_(False)
    out["_method"] = method
    return out


def _child_main(payload: str) -> int:
    p = json.loads(payload)
    torch.manual_seed(0)
    res = _memory_in_process(Case(**p["case"]), p["providers"], torch.device(p["device"]))
    print(json.dumps(res))
    return 0


# ---- the whole benchmark ---------------------------------------------------------------------

COLUMNS = [
    ("case", "case", "s"),
    ("provider", "provider", "s"),
    ("mode", "mode", "s"),
    ("ms", "median ms", ".2f"),
    ("spread", "spread", lambda v: f"{v:.0%}" if v < 10 else ">999%"),
    ("speedup", "vs eager", lambda v: f"{v:.1f}x"),
    ("bytes", "MB moved", lambda v: f"{v / common.MB:.0f}"),
    ("gbps", "GB/s", ".1f"),
    ("pct_bw", "%BW", lambda v: f"{v:.0%}"),
    ("extra_mb", "extra peak MB", ".0f"),
    ("extra_x", "x logits", ".2f"),
    ("check", "check", "s"),
    ("note", "note", "s"),
]

LEGEND = """\
fwd = loss without grad; fwd+bwd = loss with grad + loss.backward(); bwd = loss.backward() alone (forward
untimed before it). The fused kernels compute the gradient during the forward pass, so their bwd only
hands it to autograd (~0 ms) and their fwd+bwd is the one honest number to compare.
MB moved = the one-pass minimum: fwd reads N·V·elt, fwd+bwd reads and writes N·V·elt. GB/s = MB moved /
median time for every provider; %BW = GB/s / copy bandwidth measured in this run (the physical limit).
extra peak = peak memory during the call minus memory before it (inputs already allocated), the
gradient included; x logits = extra peak / the logits' bytes. check = loss and gradient of row 0's
first 16 tokens vs eager (rel. error <= 1e-3 fp32, 3e-2 bf16)."""


def run(*, quick: bool = False, device: str = "cpu", providers: Optional[List[str]] = None,
        shapes=None, dtypes=None, repeats: Optional[int] = None, warmup: int = 1, memory: bool = True,
        check: bool = True, compile_: bool = False, out_dir: Optional[str] = "bench_results",
        plot: bool = True, log=None) -> dict:
    """Run the loss benchmark; print the table; write JSON (and a PNG) under ``out_dir``.

    Returns the result dict (also what the JSON holds): machine, bandwidth, rows, skipped providers.
    """
    log = log or _print_flush
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    shapes = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    dtypes = dtypes or ["fp32", "bf16"]
    repeats = repeats or (3 if quick else 5)
    names = providers or default_providers(dev, quick, compile_)
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; known: {sorted(PROVIDERS)}")
    skipped = {}
    usable = []
    for n in names:
        why = PROVIDERS[n].unavailable(dev)
        if why is None:
            usable.append(n)
        else:
            skipped[n] = why
            log(f"skipping provider {n}: {why}")
    cases = make_cases(shapes, dtypes)
    if not usable:
        log("no requested provider can run here; nothing to time")
        cases = []
    bw_bytes = 2**30  # src and dst each far above the last-level cache, also in --quick
    bw = [common.copy_bandwidth(dev, bw_bytes)]
    log(f"copy bandwidth ({bw_bytes / 2**20:.0f} MiB src -> dst): {bw[0]:.1f} GB/s")
    rows = []
    mem_method = None
    for case in cases:
        log(f"{case.name}: logits {case.logits_bytes / common.MB:.0f} MB")
        case_rows = run_case(case, usable, dev, repeats=repeats, warmup=warmup, check=check, log=log)
        if memory:
            t0 = time.perf_counter()
            mem = measure_memory(case, usable, dev)
            mem_method = mem.pop("_method", None)
            log(f"  memory measured in {time.perf_counter() - t0:.1f}s ({mem_method})")
            for r in case_rows:
                extra = mem.get(r["provider"], {}).get(r["mode"])
                if extra is not None:
                    r["extra_bytes"] = extra
                    r["extra_mb"] = extra / common.MB
                    r["extra_x"] = extra / case.logits_bytes
        rows += case_rows
    bw.append(common.copy_bandwidth(dev, bw_bytes))
    limit = max(bw)  # the best the memory system did in this run
    for r in rows:
        r["pct_bw"] = r["gbps"] / limit if r.get("gbps") else None
    result = dict(
        benchmark="loss", quick=quick, machine=common.machine_info(dev), copy_bandwidth_gbps=bw,
        bandwidth_limit_gbps=limit, providers=usable, skipped=skipped, loss_options=LOSS_OPTIONS,
        repeats=repeats, warmup=warmup, memory_method=mem_method, legend=LEGEND, rows=rows,
        targets=_targets(rows),
    )
    log("")
    log(report(result))
    model = _roofline(cases, dev, limit, log)
    if model is not None:
        result["model"] = model
    if out_dir:
        tag = f"loss_{dev.type}{'_quick' if quick else ''}"
        path = os.path.join(out_dir, tag + ".json")
        common.write_json(path, result)
        log(f"wrote {path}")
        if plot and common.have_matplotlib():
            png = os.path.join(out_dir, tag + ".png")
            plot_result(result, png)
            log(f"wrote {png}")
    return result


def _print_flush(*args) -> None:
    print(*args, flush=True)  # progress lines show up in a log file as they happen


def report(result: dict) -> str:
    m = result["machine"]
    head = (f"GRPO loss benchmark — {m['cpu']} ({m['nproc']} cores, torch threads {m['torch_threads']})"
            + (f", {m['gpu']}" if m.get("gpu") else "") + f", torch {m['torch']}\n"
            f"options: {result['loss_options']}; median of {result['repeats']} runs after {result['warmup']} warm-up\n"
            f"copy bandwidth: {', '.join(f'{b:.1f}' for b in result['copy_bandwidth_gbps'])} GB/s "
            f"(limit used: {result['bandwidth_limit_gbps']:.1f} GB/s)")
    lines = [head, common.format_table(result["rows"], COLUMNS), LEGEND]
    if result.get("quick"):
        lines.append("--quick: the logits fit in the last-level cache, so %BW (a DRAM limit) can pass 100%; "
                     "a smoke run, not the numbers to quote")
    if result.get("memory_method"):
        lines.append(f"memory: {result['memory_method']}, in a fresh child process per case")
    if result["skipped"]:
        lines.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()))
    for t in result["targets"]:
        lines.append(f"target: {t}")
    return "\n".join(lines)


def _targets(rows: List[dict]) -> List[str]:
    """The issue's targets, where this run has the rows to judge them (information, not a test)."""
    out = []
    case = "N=4096 V=32000 fp32"
    for prov in ("cpu", "cpu-inplace", "triton", "cuda"):
        r = next((r for r in rows if r["case"] == case and r["provider"] == prov and r["mode"] == "fwd+bwd"), None)
        if r and r.get("speedup"):
            out.append(f"{prov} fwd+bwd {r['speedup']:.1f}x eager at {case} (goal >= 10x): "
                       f"{'met' if r['speedup'] >= 10 else 'NOT met'}")
    for prov in ("cpu-inplace", "triton-inplace", "cuda-inplace"):
        for r in rows:
            if r["provider"] == prov and r["mode"] == "fwd+bwd" and r.get("extra_x") is not None:
                out.append(f"{prov} extra peak {r['extra_x']:.2f}x logits at {r['case']} (goal <= 0.25x): "
                           f"{'met' if r['extra_x'] <= 0.25 else 'NOT met'}")
    return out


def _roofline(cases, device, limit_gbps, log) -> Optional[dict]:
    """Print the analytic model of benchmarks.roofline (the Triton helper's), when it exists, for these
    cases, and return its rows for the JSON. It is a model of HBM traffic, labelled as such."""
    try:
        from . import roofline

        spec = [(c.N, c.V, c.dtype) for c in cases]
        text = roofline.format_table(spec, device=device.type, bandwidth_gbps=limit_gbps)
        log("\n" + str(text))
        rows = roofline.rows(spec, bandwidth_gbps=limit_gbps if device.type == "cuda" else None)
        return {"label": "MODEL (benchmarks.roofline), not a measurement", "rows": rows}
    except Exception as e:  # the model is an extra; never lose the measured table over it
        log(f"(roofline model not printed: {type(e).__name__}: {e})")
        return None


def plot_result(result: dict, path: str) -> None:
    """Two rows of panels per case: median time per mode (log scale), and extra peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(2, len(cases), figsize=(4.5 * len(cases), 7), squeeze=False)
    width = 0.8 / max(len(provs), 1)
    for j, case in enumerate(cases):
        ax = axes[0][j]
        for i, p in enumerate(provs):
            xs, ys = [], []
            for k, mode in enumerate(MODES):
                r = next((r for r in rows if r["case"] == case and r["provider"] == p and r["mode"] == mode), None)
                if r and r["ms"] > 0:
                    xs.append(k + i * width)
                    ys.append(r["ms"])
            ax.bar(xs, ys, width, label=p)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(MODES))], MODES)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(case, fontsize=9)
        ax2 = axes[1][j]
        mem = [(p, next((r.get("extra_x") for r in rows if r["case"] == case and r["provider"] == p
                         and r["mode"] == "fwd+bwd"), None)) for p in provs]
        mem = [(p, v) for p, v in mem if v is not None]
        bars = ax2.bar([p for p, _ in mem], [v for _, v in mem], color=[f"C{provs.index(p)}" for p, _ in mem])
        for bar, (_, v) in zip(bars, mem):  # a 0.00x bar is invisible without its number
            ax2.annotate(f"{v:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                         va="bottom", fontsize=8)
        ax2.set_ylabel("fwd+bwd extra peak / logits bytes")
        ax2.tick_params(axis="x", labelrotation=30, labelsize=8)
    axes[0][0].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"grpo_fast loss — {m.get('gpu') or m['cpu']}; copy BW {result['bandwidth_limit_gbps']:.0f} GB/s",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_shapes(text: str):
    out = []
    for item in text.split(","):
        parts = [int(x) for x in item.lower().split("x")]
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BxTxV")
        out.append(tuple(parts))
    return out


def build_parser(prog: str = "python -m benchmarks loss") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Benchmark the GRPO loss providers (table, JSON, PNG).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LEGEND)
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 repeats: a smoke run in well under a minute")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu providers, or the GPU ones")
    ap.add_argument("--providers", type=lambda s: [x for x in s.split(",") if x],
                    help=f"comma-separated subset of {','.join(PROVIDERS)}")
    ap.add_argument("--compile", dest="compile_", action="store_true", help="add the torch.compile provider (slow to build on CPU)")
    ap.add_argument("--dtypes", type=lambda s: s.split(","), help="comma-separated subset of fp32,bf16,fp16")
    ap.add_argument("--shapes", type=_parse_shapes, help="comma-separated BxTxV, e.g. 8x512x32000")
    ap.add_argument("--repeats", type=int, help="timed runs per measurement (default 5; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory child processes")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip comparing each provider with eager")
    ap.add_argument("--out-dir", default="bench_results", help="where the JSON and PNG go (default ./bench_results)")
    ap.add_argument("--no-save", action="store_true", help="print the table only")
    ap.add_argument("--no-plot", dest="plot", action="store_false", help="JSON without the PNG")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: the memory measurement process
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return _child_main(args.child)
    if args.dtypes:
        bad = [d for d in args.dtypes if d not in DTYPES]
        if bad:
            raise SystemExit(f"unknown dtypes {bad}; known: {list(DTYPES)}")
    result = run(quick=args.quick, device=args.device, providers=args.providers, shapes=args.shapes,
                 dtypes=args.dtypes, repeats=args.repeats, warmup=args.warmup, memory=args.memory, check=args.check,
                 compile_=args.compile_, out_dir=None if args.no_save else args.out_dir, plot=args.plot)
    # a provider that failed is a failed benchmark, not a row to read past
    return 1 if any(r.get("mode") == "error" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
