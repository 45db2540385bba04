"""Measurement utilities shared by the benchmarks: timing, memory bandwidth, peak memory, output.

Rules every benchmark here follows (and prints in its legend):

* time = the **median** of ``repeats`` runs after ``warmup`` untimed runs. On CPU each run is timed
  with ``time.perf_counter``; on CUDA with ``triton.testing.do_bench`` when Triton is installed
  (it flushes the L2 cache between runs), else with CUDA events.
* the physical limit is measured **in the same run**: a large tensor copy ``dst.copy_(src)``;
  GB/s = (bytes read + bytes written) / time = 2·nbytes / time.
* peak memory on CPU is the peak resident set size (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus the resident set size just before the measured call, in a child
  process that has nothing else to do. On CUDA it is ``torch.cuda.max_memory_allocated`` minus the
  memory allocated before the call.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

GB = 1e9
MB = 1e6


# ---- timing ----------------------------------------------------------------------------------


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TokenShape:
    """What every benchmark case derives from its B, T, V and dtype name (a key of DTYPES)."""

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def logits_bytes(self) -> int:
        return self.N * self.V * self.elt


@dataclass
class Timing:
    """Seconds of each timed run; ``median`` is what the tables report."""

    times: List[float] = field(default_factory=list)
    method: str = "perf_counter"

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the runs were (0.05 = 5%)."""
        if len(self.times) < 2 or self.median == 0:
            return 0.0
        return (max(self.times) - min(self.times)) / self.median


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, setup: Optional[Callable[[], None]] = None, repeats: int = 5,
            warmup: int = 1, device: torch.device = torch.device("cpu"), grad_to_none=None) -> Timing:
    """Median-of-``repeats`` wall time of ``fn()``; ``setup()`` runs before each call, untimed.

    ``setup`` is where a benchmark restores inputs a call consumes (logits overwritten by
    ``inplace=True``) or runs the part it does not time (the forward pass before a timed backward).
    Its return value, if not None, is passed to ``fn``. ``grad_to_none``: tensors whose ``.grad``
    is dropped before each call, untimed (so that backward does not accumulate into the last one).
    On CUDA without a ``setup``, ``triton.testing.do_bench`` times it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, setup=setup, repeats=repeats, warmup=warmup, device=device, grad_to_none=grad_to_none)
    out = Timing(method="perf_counter, median")
    for i in range(warmup + repeats):
        for t in grad_to_none or ():
            t.grad = None
        arg = setup() if setup is not None else None
        gc.collect()  # a collection inside the timed region would be charged to fn
        t0 = time.perf_counter()
        res = fn() if arg is None else fn(arg)
        _sync(device)
        dt = time.perf_counter() - t0
        del res, arg
        if i >= warmup:
            out.times.append(dt)
    return out


def _time_cuda(fn, *, setup, repeats, warmup, device, grad_to_none=None) -> Timing:
    if setup is None:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            # do_bench clears the L2 cache before each run and runs for ``rep`` ms; with quantiles it
            # returns the 20/50/80th percentiles (the median is what is reported, the rest the spread).
            q = do_bench(fn, warmup=25, rep=max(repeats, 5) * 20, grad_to_none=grad_to_none,
                         quantiles=[0.2, 0.5, 0.8])
            ms = list(q) if isinstance(q, (list, tuple)) else [q]
            return Timing(times=[m / 1e3 for m in ms], method="triton.testing.do_bench, median")
    # With a setup between runs (do_bench has none), time each run with CUDA events.
    out = Timing(method="cuda events, median")
    for i in range(warmup + repeats):
        for t in grad_to_none or ():
            t.grad = None
        arg = setup() if setup is not None else None
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        res = fn() if arg is None else fn(arg)
        end.record()
        torch.cuda.synchronize(device)
        del res, arg
        if i >= warmup:
            out.times.append(start.elapsed_time(end) / 1e3)
    return out


# ---- the physical limit ----------------------------------------------------------------------


def copy_bandwidth(device, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s measured now with ``dst.copy_(src)`` of ``nbytes``: 2·nbytes / time.

    ``nbytes`` must be well above the last-level cache so that the copy streams from DRAM / HBM
    (cloud VMs report the host's L3: 480 MiB on the 2-core development VM), hence 1 GiB: 2 GiB of
    traffic.
    """
    device = torch.device(device)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    src.uniform_()  # touch every page so that first-touch page faults are not timed
    dst = torch.empty_like(src)
    dst.zero_()
    t = time_fn(lambda: dst.copy_(src), repeats=repeats, warmup=1, device=device)
    del src, dst
    return 2 * n * 4 / t.median / GB


# ---- peak memory -----------------------------------------------------------------------------

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _status_kb(key: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident set size of this process now."""
    v = _status_kb("VmRSS")
    if v is not None:
        return v
    import psutil  # non-Linux fallback

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ≥ 4.0) to the current RSS; False if unsupported."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last ``reset_peak_rss`` (or since the process started)."""
    v = _status_kb("VmHWM")
    if v is not None:
        return v
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def extra_peak_memory(fn: Callable[[], object], device) -> tuple:
    """(extra peak bytes of ``fn()`` over what was allocated before it, method string).

    CPU: peak RSS minus RSS before the call. Exact when the peak counter can be reset; otherwise the
    process-lifetime peak is used and the number is an upper bound (the method string says so).
    CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the call.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        res = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del res
        return peak - base, "torch.cuda.max_memory_allocated"
    base = rss_bytes()
    exact = reset_peak_rss()
    res = fn()
    peak = peak_rss_bytes()
    del res
    method = "peak RSS (VmHWM reset via clear_refs) - RSS before" if exact else "lifetime peak RSS - RSS before (upper bound)"
    return max(peak - base, 0), method


# Run a memory measurement in a fresh child process: the parent has run other cases and its
# allocator holds freed memory that a measured call could reuse unseen. glibc's mmap threshold is
# pinned low so that every allocation above 64 KiB is its own mapping, returned to the OS on free:
# RSS then follows what is really live (with the default dynamic threshold, blocks up to 32 MiB are
# kept in the heap after the first free and would hide later allocations).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_child(module: str, payload: dict, timeout: float = 1800) -> dict:
    """``python -m module --child JSON`` in a fresh process; returns the JSON its last line prints."""
    env = dict(os.environ)
    env.update(CHILD_ENV)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: grpo_fast and benchmarks
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(payload)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(last[-1])


# ---- machine and output ----------------------------------------------------------------------


def machine_info(device) -> dict:
    """What the numbers were measured on."""
    device = torch.device(device)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import grpo_fast

        info["grpo_fast"] = grpo_fast.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """A plain-text table. ``columns``: (key, header, format) — format is a str.format spec or a callable."""
    cells = []
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            if v is None:
                line.append("-")
            elif callable(fmt):
                line.append(fmt(v))
            else:
                line.append(format(v, fmt))
        cells.append(line)
    heads = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    # Text columns (first ones) left-aligned, numbers right-aligned.
    def fmt_line(vals):
        out = []
        for i, v in enumerate(vals):
            numeric = any(ch.isdigit() for ch in v) and not any(ch.isalpha() for ch in v.replace("x", "").replace("e", ""))
            out.append(v.rjust(widths[i]) if numeric else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_line(heads), sep] + [fmt_line(c) for c in cells])


def add_shape_args(p, full_shape, quick_shape) -> None:
    """The options of a CPU table over one (B, T, V) shape: --quick, --device, --backend, --shape, --dtype,
    --repeats, --out-dir, --no-save (``shape_and_repeats`` reads them back)."""
    p.add_argument("--quick", action="store_true", help=f"B,T,V = {quick_shape} (seconds)")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (the GPU suite times the kernels)")
    p.add_argument("--backend", default="cpu", help="grpo_fast backend: cpu (default), torch, triton")
    p.add_argument("--shape", default=None, help="B,T,V (default %s)" % ",".join(map(str, full_shape)))
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=None, help="default 7 (3 with --quick)")
    p.add_argument("--out-dir", default="bench_results")
    p.add_argument("--no-save", action="store_true")


def shape_and_repeats(args, full_shape, quick_shape):
    """(B, T, V) and the repeat count from the options of ``add_shape_args``."""
    shape = (tuple(int(v) for v in args.shape.split(",")) if args.shape
             else (quick_shape if args.quick else full_shape))
    return shape, args.repeats or (3 if args.quick else 7)


def save_rows(args, name: str, payload: dict) -> None:
    """Unless --no-save: ``payload`` plus the machine into <out-dir>/<name>.json."""
    if args.no_save:
        return
    path = os.path.join(args.out_dir, f"{name}.json")
    write_json(path, {"machine": machine_info(args.device), **payload})
    print(f"wrote {path}")


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        return False
