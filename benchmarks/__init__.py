"""`python -m benchmarks` (from a checkout of the repository): the benchmark tables and the GPU reports.

    python -m benchmarks [all] [--quick] [--device cpu|cuda] [...]   the loss table, then the fused-linear one
    python -m benchmarks loss [options]                             the loss from logits (benchmarks.loss)
    python -m benchmarks fused-linear [options]                     hidden states -> loss (benchmarks.fused_linear)
    python -m benchmarks trl-step [options]                         one TRL GRPOTrainer step (benchmarks.trl_step; not in `all`)
    python -m benchmarks logprobs [options]                         log-probs + entropy with gradient (benchmarks.logprobs; not in `all`)
    python -m benchmarks vocab-parallel [options]                   the vocabulary split over 2 processes vs one (benchmarks.vocab_parallel; not in `all`)
    python -m benchmarks options [options]                          what each loss option costs vs the default (benchmarks.options; not in `all`)
    python -m benchmarks packed [options]                           packed / masked rows vs sweeping every row (benchmarks.packed; not in `all`)
    python -m benchmarks verl-head [options]                        verl's fused log-prob head vs grpo_fast's adapter (benchmarks.verl_head; not in `all`)
    python -m benchmarks cpu-paths [options]                        the CPU extension's ISA paths vs copy bandwidth and the
                                                                    exp-throughput limit (benchmarks.cpu_paths; not in `all`)
    python -m benchmarks kernels [options]                          registers / spills / shared memory of the GPU
                                                                    kernels, compiled ahead of time (no GPU needed)
    python -m benchmarks roofline [--markdown]                      the HBM-bytes model of the loss (a model, not a measurement)
    python -m benchmarks bytes [--markdown | --measure]             HBM bytes per logit of each fused kernel from L2 and
                                                                    its grid (a model); --measure: vs Nsight Compute on a GPU

The benchmarks are tooling, not part of the installed library: they live in this folder, beside
grpo_fast/, and import it from the checkout (or from an installed grpo_fast).

`python -m benchmarks loss --help` lists each table's options. With `all`, the options every table knows
(--quick, --device, --repeats, --out-dir, --no-save) are passed to both.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

TABLES = {"loss": "benchmarks.loss", "fused-linear": "benchmarks.fused_linear",
          "trl-step": "benchmarks.trl_step", "logprobs": "benchmarks.logprobs", "options": "benchmarks.options",
          "packed": "benchmarks.packed", "vocab-parallel": "benchmarks.vocab_parallel", "verl-head": "benchmarks.verl_head",
          "cpu-paths": "benchmarks.cpu_paths", "kernels": "benchmarks.kernel_report", "roofline": "benchmarks.roofline",
          "bytes": "benchmarks.bytes_model"}
ALL = ("loss", "fused-linear")  # what `python -m benchmarks` with no table runs
# Options shared by the tables: name -> takes a value.
_COMMON = {"--quick": False, "--device": True, "--repeats": True, "--out-dir": True, "--no-save": False}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _common_args(argv):
    """The shared options of ``argv`` (for `all`); the others are rejected with a hint."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0]
        if key not in _COMMON:
            raise SystemExit(f"python -m benchmarks all: {a!r} is not an option every table takes; "
                             f"run `python -m benchmarks loss {a}` or `python -m benchmarks fused-linear {a}`")
        out.append(a)
        if _COMMON[key] and "=" not in a:
            if i + 1 >= len(argv):
                raise SystemExit(f"python -m benchmarks: {a} needs a value")
            out.append(argv[i + 1])
            i += 1
        i += 1
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    which = "all"
    if argv and not argv[0].startswith("-"):
        which, argv = argv[0], argv[1:]
    if which != "all" and which not in TABLES:
        print(__doc__.strip())
        print(f"\nunknown table {which!r}; choose one of: all, {', '.join(TABLES)}")
        return 2
    if which != "all":
        if not _available(TABLES[which]):
            print(f"the {which} benchmark ({TABLES[which]}) is not part of this installation")
            return 2
        return int(importlib.import_module(TABLES[which]).main(argv) or 0)
    common = _common_args(argv)
    rc = 0
    for name in ALL:
        module = TABLES[name]
        if not _available(module):
            print(f"\n[{name}] skipped: {module} is not part of this installation")
            continue
        print(f"\n===== {name} =====")
        rc = max(rc, int(importlib.import_module(module).main(list(common)) or 0))
    return rc
