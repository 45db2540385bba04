"""`python -m benchmarks bytes`: a MODEL of the HBM bytes per logit each fused kernel moves, from the
L2 size and the grid; with ``--measure`` on a GPU, the same bytes counted by Nsight Compute.

The roofline (benchmarks/roofline.py) says how many bytes a variant *must* move; this model says
how many each kernel *does* move, given how it walks the logits — which is why the kernels are
built as they are. Everything except ``--measure`` is arithmetic, not a measurement.

The token-level fused loss with a gradient reads a row twice (sweep 1: the online logsumexp and
entropy; sweep 2: the gradient, which needs the lse) and writes the gradient once. Whether
sweep 2 reads HBM again depends on L2:

  * R rows are in flight at once (the grid of a persistent kernel, else the programs resident
    on the SMs); they start in step, so they all reach their turning point together.
  * L2 holds L2_FRACTION (3/4) of its size for them (H100's L2 is two partitions, and the
    gradient, the per-token vectors and the other programs' lines live there too).
  * Reverse sweep 2 (Triton and CUDA): the block read last is re-read first. Block j of a row,
    counted from the row's end, was read d = j bytes ago by its own program, so R·d·(1 + s)
    bytes have entered L2 since (s: how much of a gradient store stays in L2 — s = 1 when stores
    allocate like loads, s = 0 with evict-first / streaming stores). Under LRU it is still there
    while R·d·(1 + s) ≤ L2_eff: the hit fraction of sweep 2 is min(1, L2_eff / (R·(1 + s)·row)).
  * Forward sweep 2 (the Triton kernel before issue #15, one program per row): block 0 is the
    oldest line of the row, so LRU either keeps the whole row (R·row·(1 + s) ≤ L2_eff) or
    thrashes it entirely: hit 1 or 0.

HBM bytes per logit = e (sweep 1) + (1 − hit)·e (sweep 2) + e (gradient) + the per-token vectors
(ids, mask, weight, advantages, old / ref log-probs, IS ratio, logp, 8 stats: ~68 B a row) / V,
with e the bytes of a logit. The kernels' grids (grpo_fast.backends.triton_backend.persistent_grid
for Triton; row_grid() in csrc/cuda/grpo_cuda_kernels.cu, mirrored by cuda_grid() below) keep
R·row ≤ L2_eff with evict-first stores, so the model predicts one read + one write per logit;
on a GPU ``--measure`` checks that with dram__bytes_read.sum and dram__bytes_write.sum.

    python -m benchmarks bytes [--markdown]          the model for H100 / H200 / A100 (and this GPU's L2)
    python -m benchmarks bytes --measure [--out F]   model vs Nsight Compute on this GPU (needs ncu)
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from grpo_fast.backends.triton_backend import L2_FRACTION, MAX_PROGRAMS_PER_SM, persistent_grid

MiB = 1024 * 1024


@dataclass(frozen=True)
class Device:
    name: str
    l2_bytes: int
    sms: int
    hbm_gbps: float


# Data-sheet values. H200 SXM is the GH100 configuration of H100 SXM (132 SMs, 50 MB L2) with
# HBM3e; on a GPU the model also runs with the device's own L2_cache_size and SM count.
DEVICES = (
    Device("H100 SXM", 50 * MiB, 132, 3350.0),
    Device("H200 SXM", 50 * MiB, 132, 4800.0),
    Device("A100 SXM", 40 * MiB, 108, 2039.0),
)
VOCABS = (32000, 128256, 151936)
ELT = {"bf16": 2, "fp32": 4}
ROW_SIDE_BYTES = 68  # per token row: ids 8, mask, weight, advantage, old, ref, isr, logp 4 each, stats 32
N_ROWS = 16384  # rows of a modelled batch (only matters when N is smaller than the grid)
CUDA_MAX_BLOCKS_PER_SM = 16  # kMaxPerSm of row_grid()


def cuda_grid(N: int, V: int, elem_bytes: int, l2_bytes: int, sms: int) -> int:
    """row_grid() of csrc/cuda/grpo_cuda_kernels.cu for the two-sweep token kernel: as many blocks
    as rows fit in 3/4 of L2, at most 16 per SM and at most N; all 16 per SM when not one row fits."""
    cap = CUDA_MAX_BLOCKS_PER_SM * sms
    fit = (l2_bytes * 3 // 4) // (V * elem_bytes)
    return min(N, fit if 1 <= fit < cap else cap)


def cuda_grid_before(N: int, V: int, elem_bytes: int, l2_bytes: int, sms: int) -> int:
    """row_grid() before issue #15: never fewer than one block per SM."""
    per_sm = (l2_bytes * 3 // 4) // (sms * V * elem_bytes)
    return min(N, sms * max(1, min(CUDA_MAX_BLOCKS_PER_SM, per_sm)))


def sweep2_hit(rows_in_flight: int, row_bytes: int, l2_bytes: int, store_alloc: float, reverse: bool) -> float:
    """Fraction of sweep 2's reads served by L2 (see the module doc)."""
    l2_eff = L2_FRACTION * l2_bytes
    demand = rows_in_flight * (1.0 + store_alloc) * row_bytes
    if reverse:
        return min(1.0, l2_eff / demand)
    return 1.0 if demand <= l2_eff else 0.0


# (label, grid rule, reverse sweep 2, store allocation s). The "before" rows are the designs that
# issue #15 replaced, kept in the model to show why.
KERNELS = {
    "triton": ("persistent grid, reverse sweep 2, evict-first stores", persistent_grid, True, 0.0),
    "cuda": ("grid sized to L2, reverse sweep 2, streaming (.cs) stores", cuda_grid, True, 0.0),
    "triton (before)": ("one program per row (2 per SM resident), forward sweep 2",
                        lambda N, V, e, l2, sms: min(N, MAX_PROGRAMS_PER_SM * sms), False, 1.0),
    "cuda (before)": ("≥ 1 block per SM, reverse sweep 2, stores allocate", cuda_grid_before, True, 1.0),
}


def token_level(backend: str, V: int, elem_bytes: int, device: Device, N: int = N_ROWS) -> dict:
    """The token-level fused loss with a gradient: grid, sweep-2 hit rate, HBM bytes per logit (MODEL)."""
    _, grid_rule, reverse, s = KERNELS[backend]
    R = grid_rule(N, V, elem_bytes, device.l2_bytes, device.sms)
    hit = sweep2_hit(R, V * elem_bytes, device.l2_bytes, s, reverse)
    per_logit = elem_bytes * (2.0 + (1.0 - hit)) + ROW_SIDE_BYTES / V
    return dict(backend=backend, device=device.name, V=V, elem_bytes=elem_bytes, grid=R, hit=hit,
                bytes_per_logit=per_logit, ratio=per_logit / (2.0 * elem_bytes))


def other_kernels(elem_bytes: int) -> list:
    """(kernel, bytes per logit, why) of the one-sweep kernels and the sequence level (MODEL)."""
    e = elem_bytes
    return [
        ("token level, no gradient", e, "one sweep"),
        ("sequence level (GSPO) with gradient", 3 * e, "pass 1 and pass 3 are separate launches: the row is read twice"),
        ("logprobs forward", e, "one sweep"),
        ("logprobs backward", 2 * e, "one sweep: read + write"),
    ]


def rows(devices=DEVICES, vocabs=VOCABS, backends=tuple(KERNELS)) -> list:
    return [token_level(b, V, ELT[dt], d) for d in devices for b in backends for dt in ELT for V in vocabs]


def format_table(rs: list, markdown: bool = False) -> str:
    head = ["device", "backend", "V", "dtype", "grid", "sweep-2 L2 hit", "HBM B/logit", "× (1 read + 1 write)"]
    dt_of = {v: k for k, v in ELT.items()}
    body = [[r["device"], r["backend"], str(r["V"]), dt_of[r["elem_bytes"]], str(r["grid"]), f"{r['hit']:.2f}",
             f"{r['bytes_per_logit']:.2f}", f"{r['ratio']:.3f}"] for r in rs]
    title = "MODEL, not a measurement: HBM bytes per logit of the token-level fused loss with gradient"
    if markdown:
        return f"_{title}._\n\n" + "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                                             + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def markdown() -> str:
    parts = ["## Bytes model (a MODEL, not a measurement)", "",
             "HBM bytes per logit of the token-level fused loss with a gradient, predicted from the L2 size "
             "and each kernel's grid (`benchmarks/bytes_model.py`; its docstring derives the rule). The "
             "\"before\" rows are the designs issue #15 replaced. Generated by `python -m benchmarks bytes "
             "--markdown`; `bash benchmarks/gpu_suite.sh` measures the same bytes with Nsight Compute "
             "(`dram__bytes_read.sum`, `dram__bytes_write.sum`) and prints model vs measured.", "",
             "The assumption that carries it: evict-first (Triton) and streaming `.cs` (CUDA) gradient stores "
             "do not displace the rows waiting for their second sweep (s = 0). Were they to allocate in L2 "
             "like loads (s = 1), the same grids would give a sweep-2 hit rate of about 0.5 at large V, "
             "≈ 1.25 × (1 read + 1 write); the Nsight Compute measurement decides.", "",
             format_table(rows(devices=DEVICES[:2]), markdown=True), "",
             "One-sweep kernels and the sequence level (bytes per logit, e = bytes of a logit):", ""]
    parts += [f"- {k}: {b}·e ({why})" for k, b, why in other_kernels(1)]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# measuring on a GPU (Nsight Compute)

KERNEL_REGEX = {"triton": "regex:_grpo_token_fwd_kernel", "cuda": "regex:token_fused_kernel"}


def run_case(backend: str, V: int, dtype: str, N: int) -> None:
    """One token-level loss with a gradient (what ncu profiles): N rows of V logits."""
    import torch

    import grpo_fast

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    B, T = 8, N // 8
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(B, T, V, device="cuda", dtype=dt, generator=g).requires_grad_(True)
    y = torch.randint(0, V, (B, T), device="cuda", generator=g)
    old = torch.randn(B, T, device="cuda", generator=g) - 5
    loss, _ = grpo_fast.grpo_loss(z, y, rewards=torch.rand(B, device="cuda", generator=g), group_size=4,
                                  old_logp=old, loss_type="dapo", backend=backend)
    loss.backward()
    torch.cuda.synchronize()


def _ncu_bytes(ncu: str, backend: str, V: int, dtype: str, N: int) -> Optional[tuple]:
    """(dram bytes read, written) of the token-level kernel's one launch, from ncu's CSV."""
    cmd = [ncu, "--metrics", "dram__bytes_read.sum,dram__bytes_write.sum", "--csv", "--print-units", "base",
           "--kernel-name", KERNEL_REGEX[backend], "--launch-count", "1",
           sys.executable, "-m", "benchmarks.bytes_model", "--run-case", backend, str(V), dtype, str(N)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    text = res.stdout[res.stdout.find('"ID"'):] if '"ID"' in res.stdout else ""
    got = {}
    for row in csv.DictReader(io.StringIO(text)):
        try:
            got[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
    if "dram__bytes_read.sum" not in got or "dram__bytes_write.sum" not in got:
        print(f"  ncu gave no dram bytes for {backend} V={V} {dtype} (exit {res.returncode}): {res.stderr.strip()[-600:]}")
        return None
    return got["dram__bytes_read.sum"], got["dram__bytes_write.sum"]


def measure(N: int = 2048, out: Optional[str] = None) -> int:
    """Model vs Nsight Compute on this GPU for every available backend, V and dtype. Exit 1 when a
    measurement is above 1.1 × (1 read + 1 write) per logit, 2 when nothing could be measured."""
    import torch

    from grpo_fast.backends import unavailable_reason

    if not torch.cuda.is_available():
        print("--measure needs a CUDA device")
        return 2
    ncu = shutil.which("ncu") or ("/usr/local/cuda/bin/ncu" if os.path.exists("/usr/local/cuda/bin/ncu") else None)
    if ncu is None:
        print("Nsight Compute (ncu) not found: install it or put it on PATH; nothing measured")
        return 2
    p = torch.cuda.get_device_properties(0)
    dev = Device(torch.cuda.get_device_name(0), int(p.L2_cache_size), int(p.multi_processor_count), 0.0)
    print(f"device: {dev.name}, L2 {dev.l2_bytes / MiB:.1f} MiB, {dev.sms} SMs; N = {N} token rows")
    lines = ["backend  V       dtype  grid  model B/logit  measured read  measured write  measured B/logit  × ideal"]
    worst, n = 0.0, 0
    for backend in ("triton", "cuda"):
        why = unavailable_reason(backend, torch.device("cuda"))
        if why:
            print(f"  {backend}: skipped ({why})")
            continue
        for dtype, e in ELT.items():
            for V in VOCABS:
                model = token_level(backend, V, e, dev, N)
                got = _ncu_bytes(ncu, backend, V, dtype, N)
                if got is None:
                    continue
                rd, wr = (x / (N * V) for x in got)
                ratio = (rd + wr) / (2 * e)
                worst, n = max(worst, ratio), n + 1
                lines.append(f"{backend:7s}  {V:6d}  {dtype:5s}  {model['grid']:4d}  {model['bytes_per_logit']:13.2f}  "
                             f"{rd:13.2f}  {wr:14.2f}  {rd + wr:16.2f}  {ratio:.3f}")
    text = "\n".join(lines)
    print("MEASURED (Nsight Compute dram__bytes_*.sum, one launch) next to the MODEL\n" + text)
    if out:
        with open(out, "w") as f:
            f.write(f"{dev.name}\n{text}\n")
    if n == 0:
        return 2
    print(f"worst measured: {worst:.3f} × (1 read + 1 write) per logit (target ≤ 1.1)")
    return 0 if worst <= 1.1 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks bytes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", action="store_true", help="print the markdown section of BENCHMARKS.md")
    ap.add_argument("--measure", action="store_true", help="on a GPU: model vs Nsight Compute counters")
    ap.add_argument("--rows", type=int, default=2048, help="token rows N of a measured case (default 2048)")
    ap.add_argument("--out", default=None, help="with --measure: also write the table here")
    ap.add_argument("--run-case", nargs=4, metavar=("BACKEND", "V", "DTYPE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_case:
        b, V, dt, N = args.run_case
        run_case(b, int(V), dt, int(N))
        return 0
    if args.measure:
        return measure(args.rows, args.out)
    print(markdown() if args.markdown else format_table(rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
