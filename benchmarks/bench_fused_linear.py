"""The fused-linear GRPO benchmark as a script: same as `grpo-fast bench fused-linear`.

    python benchmarks/bench_fused_linear.py --quick      # seconds: B4 T64 H128 V4096
    python benchmarks/bench_fused_linear.py              # the issue's case: B4 T256 H512 V32000 fp32
    python benchmarks/bench_fused_linear.py --shapes 2,512,1024,151936 --dtypes bf16

Prints the table, writes bench_results/fused_linear_<device>.json. The code and the measurement rules
are in grpo_fast/bench/fused_linear.py and grpo_fast/bench/common.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grpo_fast.bench.fused_linear import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
