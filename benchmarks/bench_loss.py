"""The GRPO loss benchmark as a script: same as `grpo-fast bench loss`.

    python benchmarks/bench_loss.py --quick              # seconds: small sizes, 3 repeats
    python benchmarks/bench_loss.py                      # N=4096 x V=32000 and N=1024 x V=151936, fp32 and bf16
    python benchmarks/bench_loss.py --device cuda        # the GPU providers (triton, cuda, compile, eager)

Prints the table, writes bench_results/loss_<device>.json and .png. The code and the measurement
rules are in grpo_fast/bench/loss.py and grpo_fast/bench/common.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grpo_fast.bench.loss import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
