"""Shared test setup.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter, on CPU tensors; the
variable must be set before triton (and so grpo_fast's Triton backend) is first imported, which a
conftest guarantees. On a GPU machine the same tests run the compiled kernels natively.

Fixtures for every test file (tests/backends_fixture.py): ``backend`` — each backend that can run
here (torch, cpu, triton, cuda-emulated, cuda on a GPU), skipped with the reason otherwise — and the
session-scoped ``emulated_ext`` (the CUDA kernels built by g++ in host emulation).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from backends_fixture import backend, emulated_ext  # noqa: E402,F401  (fixtures, after TRITON_INTERPRET)
