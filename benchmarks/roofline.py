"""A roofline MODEL of the GRPO loss: HBM bytes each variant must move, over peak bandwidth.

Everything here is arithmetic, not a measurement: the predicted floor time of a variant is the
bytes it moves to and from device memory divided by the memory bandwidth (H100 SXM: 3.35 TB/s
HBM3; A100 SXM 80 GB: 2.0 TB/s HBM2e). Only the (N, V) tensors are counted (N = B·T tokens, V
vocabulary); per-token vectors are O(N) and negligible next to them.

Eager (grpo_fast/reference.py through autograd; each op reads its operands from HBM and writes its
result, as it must once a (N, V) tensor is far larger than L2). Bytes per (N, V) element, with
e = bytes per logit (4 fp32, 2 bf16) and f = 4 (float32 intermediates):

  forward
    x = logits.to(float32)             read e, write f      (no op, 0 bytes, when the logits are fp32)
    x = x / temperature                read f, write f
    logsumexp(x): amax                 read f
                  x - max              read f, write f
                  exp_ (in place)      read f, write f
                  sum                  read f
    entropy (no grad): p = exp(x-lse)  x - lse: read f, write f;  exp: read f, write f
      p > 0                            read f, write 1 (bool)
      p * x                            read 2f, write f
      zeros_like(x)                    write f
      where(...)                       read 1 + 2f, write f
      sum                              read f
  backward (autograd)
    gather's backward: zeros (N, V)    write f (then a scatter of N values)
    logsumexp's backward               x - lse: read f, write f;  exp: read f, write f;  · grad: read f, write f
    sum of the two branches            read 2f, write f
    / temperature                      read f, write f
    .to(float32)'s backward            read f, write e      (absent for fp32 logits)

Fused (the Triton / CUDA kernels): the forward reads the logits once (online logsumexp);
with a gradient it writes dL/dz, e per element, in the same program. The token-level kernels
sweep each row twice (once for the lse, once for the gradient) on a grid sized so that the rows
in flight fit in L2, the second sweep backwards: it hits L2 by design (benchmarks/bytes_model.py
models how much, per kernel, from the L2 size and the grid). Two numbers are given: the one-read
ideal and the two-read bound, which the sequence-level (GSPO) variant always pays.
``inplace=True`` moves the same bytes (the gradient overwrites the logits instead of a new
buffer): it changes the memory footprint, not the traffic. Backward of a fused loss is 0 bytes when
grad_output == 1 (the gradient is already there) and one read + one write of it otherwise.

    python -m benchmarks.roofline [--markdown] [--bandwidth GBPS]
"""
from __future__ import annotations

import argparse
from typing import Iterable, Optional, Sequence

F32 = 4  # bytes of a float32 intermediate

# Peak HBM bandwidth in GB/s (1 GB = 1e9 bytes), from the vendors' data sheets.
DEVICES = {"H100 SXM (HBM3, 3.35 TB/s)": 3350.0, "A100 SXM (HBM2e, 2.0 TB/s)": 2000.0}

# The sizes of the issue: Llama-2-style vocabulary at N = 4096 tokens, Qwen2.5's at N = 1024.
CASES = [(4096, 32000, "fp32"), (4096, 32000, "bf16"), (1024, 151936, "fp32"), (1024, 151936, "bf16")]

ELT = {"fp32": 4, "bf16": 2, "fp16": 2}


def eager_bytes_per_element(elt: int) -> dict:
    """Bytes per (N, V) element moved by the eager reference: forward, backward (see module doc)."""
    cast = 0 if elt == F32 else elt + F32
    fwd = (
        cast
        + 2 * F32  # / temperature
        + F32 + 2 * F32 + 2 * F32 + F32  # logsumexp: amax, x - max, exp_, sum
        + 2 * F32 + 2 * F32  # p = exp(x - lse)
        + (F32 + 1) + 3 * F32 + F32 + (1 + 2 * F32 + F32) + F32  # p > 0, p * x, zeros, where, sum
    )
    bwd = (
        F32  # zeros of gather's backward
        + 6 * F32  # logsumexp's backward
        + 3 * F32  # sum of the two branches
        + 2 * F32  # / temperature
        + (0 if elt == F32 else F32 + elt)  # back to the logits' dtype
    )
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def variants(elt: int) -> list:
    """(name, bytes per (N, V) element, note) of every modelled variant."""
    eager = eager_bytes_per_element(elt)
    return [
        ("eager fwd", eager["fwd"], "reference.py forward (loss + entropy metric)"),
        ("eager bwd", eager["bwd"], "autograd backward of it"),
        ("eager fwd+bwd", eager["fwd+bwd"], ""),
        ("fused fwd (no grad)", elt, "one read of the logits"),
        ("fused fwd+grad, ideal", 2 * elt, "read + write the gradient (inplace: same bytes)"),
        ("fused fwd+grad, 2 reads", 3 * elt, "GSPO (two launches); token level only if sweep 2 missed L2 (bytes model)"),
        ("fused bwd, grad_output = 1", 0, "gradient already made in forward"),
        ("fused bwd, grad_output != 1", 2 * elt, "one scaling pass over the gradient"),
    ]


def rows(cases: Optional[Iterable[Sequence]] = None, devices: Optional[dict] = None, bandwidth_gbps: Optional[float] = None):
    """One dict per (case, variant): bytes and the predicted floor time on each device (ms)."""
    devices = dict(DEVICES if devices is None else devices)
    if bandwidth_gbps:
        devices[f"measured copy BW ({bandwidth_gbps:.0f} GB/s)"] = float(bandwidth_gbps)
    out = []
    for N, V, dtype in (CASES if cases is None else cases):
        elt = ELT[str(dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16").replace("float16", "fp16")]
        for name, per_elt, note in variants(elt):
            nbytes = N * V * per_elt
            out.append(dict(N=N, V=V, dtype=dtype, variant=name, bytes=nbytes, note=note,
                            ms={d: nbytes / (bw * 1e9) * 1e3 for d, bw in devices.items()}))
    return out


def format_table(cases=None, device: str = "cuda", bandwidth_gbps: Optional[float] = None, markdown: bool = False) -> str:
    """The model as a text (or markdown) table. ``device`` is accepted for the benchmark's call;
    the measured bandwidth is added as a column only for a CUDA run (a CPU's copy bandwidth says
    nothing about a GPU)."""
    rs = rows(cases, bandwidth_gbps=bandwidth_gbps if device == "cuda" else None)
    devs = list(rs[0]["ms"]) if rs else []
    head = ["N", "V", "dtype", "variant", "GB moved"] + [f"floor ms, {d}" for d in devs] + ["note"]
    body = [[str(r["N"]), str(r["V"]), str(r["dtype"]), r["variant"], f"{r['bytes'] / 1e9:.2f}"]
            + [f"{r['ms'][d]:.3f}" for d in devs] + [r["note"]] for r in rs]
    title = "MODEL, not a measurement: floor time = bytes that must cross HBM / peak bandwidth"
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return f"_{title}._\n\n" + "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def speedup_bounds(cases=None) -> list:
    """(case, eager fwd+bwd bytes / fused fwd+grad bytes) for the one-read and two-read fused
    kernels: the most a memory-bound fused kernel can gain over eager (a MODEL)."""
    out = []
    for N, V, dtype in (CASES if cases is None else cases):
        elt = ELT[dtype]
        e = eager_bytes_per_element(elt)["fwd+bwd"]
        out.append((f"N={N} V={V} {dtype}", e / (2 * elt), e / (3 * elt)))
    return out


def markdown() -> str:
    parts = [
        "## Roofline model (a MODEL, not a measurement)",
        "",
        "Predicted floor times of the GRPO loss on H100 SXM (3.35 TB/s) and A100 SXM (2.0 TB/s): the "
        "bytes each variant must move through HBM divided by the peak bandwidth. Real kernels reach "
        "70–90 % of peak at best, so measured times are above these floors. Generated by "
        "`python -m benchmarks.roofline --markdown`; the per-op byte count of the eager path is in "
        "the docstring of `benchmarks/roofline.py`.",
        "",
        format_table(markdown=True),
        "",
        "Upper bound on the fused kernels' speed-up over eager forward+backward (ratio of bytes):",
        "",
        "| case | one read + one write | two reads + one write |",
        "|---|---|---|",
    ]
    parts += [f"| {c} | {a:.1f}x | {b:.1f}x |" for c, a, b in speedup_bounds()]
    parts += [
        "",
        "Reading it: eager fwd+bwd moves about 34 float32-sized passes over (N, V) (fp32 logits; "
        "37 for bf16, counting the up- and down-casts) because every op of "
        "reference.py (upcast, division by the temperature, logsumexp's max / subtract / exp / "
        "sum, the entropy metric, then autograd's zeros, exp, multiply, add and downcast) is its "
        "own kernel with its own (N, V) result. The fused kernels read the logits once (twice at "
        "worst: GSPO) and write the gradient once, in the logits' dtype. `inplace=True` does not change "
        "these bytes; it removes the (N, V) gradient allocation (memory, not time).",
    ]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description="Roofline MODEL of the GRPO loss.")
    ap.add_argument("--markdown", action="store_true", help="print the markdown section of BENCHMARKS.md")
    ap.add_argument("--bandwidth", type=float, default=None, help="add a column at this bandwidth (GB/s)")
    args = ap.parse_args(argv)
    print(markdown() if args.markdown else format_table(bandwidth_gbps=args.bandwidth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
