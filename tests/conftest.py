"""Shared test setup. Kept minimal: anything a single test file needs lives in that file.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter, on CPU tensors; the
variable must be set before triton (and so grpo_fast's Triton backend) is first imported, which a
conftest guarantees. On a GPU machine the same tests run the compiled kernels natively.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
