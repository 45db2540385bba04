"""Options of the pytest-benchmark cases (benchmarks/ runs only on demand; the test suite is tests/).

    pytest benchmarks/ --benchmark-only                      # the full sizes of the loss table
    pytest benchmarks/ --benchmark-only --bench-quick        # small sizes, seconds
    pytest benchmarks/ --benchmark-only --bench-device cuda  # the GPU providers
    pytest benchmarks/ --benchmark-only --benchmark-autosave # then: pytest-benchmark compare
"""
import os
import sys

# Import grpo_fast from this checkout whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    group = parser.getgroup("grpo_fast benchmarks")
    group.addoption("--bench-quick", action="store_true", default=os.environ.get("GRPO_FAST_BENCH_QUICK") == "1",
                    help="small sizes (also GRPO_FAST_BENCH_QUICK=1)")
    group.addoption("--bench-device", default=os.environ.get("GRPO_FAST_BENCH_DEVICE", "cpu"), choices=["cpu", "cuda"],
                    help="device of the loss cases (default cpu; also GRPO_FAST_BENCH_DEVICE)")
    group.addoption("--bench-providers", default=os.environ.get("GRPO_FAST_BENCH_PROVIDERS"),
                    help="comma-separated providers (default: every one for the device, compile excluded on CPU)")
