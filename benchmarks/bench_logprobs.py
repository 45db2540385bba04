"""Differentiable log-probs + entropy benchmark as a script: same as `grpo-fast bench logprobs`.

    python benchmarks/bench_logprobs.py --quick          # seconds: N=512 x V=4096
    python benchmarks/bench_logprobs.py                  # N=4096 x V=32000 fp32: grpo_fast vs eager vs TRL
    python benchmarks/bench_logprobs.py --device cuda    # the GPU providers (triton, cuda, eager, trl)

Prints the table (fwd+bwd time, extra peak memory, gradient error), writes
bench_results/logprobs_<device>.json. The code is grpo_fast/bench/logprobs.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grpo_fast.bench.logprobs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
