"""The ``backend`` fixture: every backend that can run here, for any test file (conftest.py imports it).

Parameters (ids): "torch" (the eager reference), "cpu" (the C++/OpenMP extension), "triton" (compiled
on a GPU, in Triton's CPU interpreter otherwise), "cuda-emulated" (csrc/cuda/grpo_cuda_kernels.cu built
by g++ with csrc/cuda/host_emulation.h and installed as the "cuda" backend for CPU tensors) and "cuda"
(the real kernels on a GPU, marked ``gpu``). Each one that cannot run is skipped with the reason.

``backend_params(...)`` selects some of them for ``indirect`` parametrization. A test gets a :class:`Backend`: ``name`` to pass as ``backend=`` to grpo_fast, ``device`` to put the
tensors on (``put`` moves tensors, and the tensors inside tuples/lists/dicts), and ``slow`` — the
backend executes kernels in Python or one OS thread per CUDA thread, so big parametrizations take a
subset by default (``full_matrix()``: GRPO_FAST_FULL_MATRIX=1 runs everything).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import types

import pytest
import torch

from grpo_fast.backends import unavailable_reason

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EMU_SOURCES = ["csrc/cuda/grpo_cuda_kernels.cu", "csrc/cuda/grpo_cuda_bindings.cpp"]

GPU = torch.device("cuda") if torch.cuda.is_available() else None
TRITON_DEVICE = GPU if GPU is not None else torch.device("cpu")  # on CPU: the interpreter (conftest.py)


def full_matrix() -> bool:
    """GRPO_FAST_FULL_MATRIX=1 (or the older GRPO_FAST_EMULATE_FULL=1): slow backends run every case."""
    return os.environ.get("GRPO_FAST_FULL_MATRIX") == "1" or os.environ.get("GRPO_FAST_EMULATE_FULL") == "1"


@dataclasses.dataclass(frozen=True)
class Backend:
    id: str                # the parameter id: torch, cpu, triton, cuda-emulated, cuda
    name: str              # the backend= argument of grpo_fast's functions
    device: torch.device   # where the tensors go
    slow: bool             # Triton interpreter / CUDA host emulation

    def put(self, x):
        if isinstance(x, torch.Tensor):
            return x.to(self.device)
        if isinstance(x, dict):
            return {k: self.put(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self.put(v) for v in x)
        return x

    def __str__(self) -> str:
        return self.id


@pytest.fixture(scope="session")
def emulated_ext(tmp_path_factory):
    """grpo_cuda_kernels.cu + the bindings built by g++ with -DGF_HOST_EMULATION, imported as a module."""
    import importlib.util
    import subprocess
    import sysconfig

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the emulated kernels with")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 is not installed")
    out_dir = tmp_path_factory.mktemp("cuda_emu")
    so = out_dir / ("_C_cuda_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, "-O2", "-std=c++20", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing", "-DGF_HOST_EMULATION",
           "-DGF_CUDA_MODULE=_C_cuda_emu", "-Icsrc/common", "-Icsrc/cuda", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}"]
    for src in _EMU_SOURCES:
        cmd += ["-x", "c++", src]
    cmd += ["-o", str(so)]
    res = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True)
    assert res.returncode == 0, f"host-emulation build failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    spec = importlib.util.spec_from_file_location("_C_cuda_emu", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def install_emulated_cuda(monkeypatch, ext) -> None:
    """Make backend="cuda" run the host-emulated kernels ``ext`` on CPU tensors (undone by monkeypatch)."""
    import grpo_fast.backends as backends
    from grpo_fast.backends import cuda as cuda_backend

    fake = types.SimpleNamespace(
        DEVICE_TYPES=("cpu",), unavailable_reason=lambda: None,
        fused_loss=lambda inp, grad: cuda_backend.fused_loss_with(ext, inp, grad, 0, 0),
        token_logprobs=lambda z, y, temp, ent, mask=None: cuda_backend.token_logprobs_with(ext, z, y, temp, ent, 0, 0,
                                                                                          mask=mask),
        logprobs_forward=lambda *a, mask=None: cuda_backend.logprobs_forward_with(ext, *a, 0, 0, mask=mask),
        logprobs_backward=lambda *a: cuda_backend.logprobs_backward_with(ext, *a, 0, 0),
    )
    monkeypatch.setitem(backends.REGISTRY, "cuda", backends.Backend("cuda", fake))


def _skip_unless_available(name: str, device) -> list:
    why = "no CUDA device" if device is None else unavailable_reason(name, device)
    return [pytest.mark.skipif(why is not None, reason=f"{name} backend unavailable: {why}")]


BACKEND_PARAMS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpu", id="cpu", marks=_skip_unless_available("cpu", torch.device("cpu"))),
    pytest.param("triton", id="triton", marks=_skip_unless_available("triton", TRITON_DEVICE)),
    pytest.param("cuda-emulated", id="cuda-emulated"),  # skipped by emulated_ext without g++/pybind11
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, *_skip_unless_available("cuda", GPU)]),
]


def backend_params(*ids: str) -> list:
    """The parameters (with their marks) of the given ids, for a test that only wants some backends:
    ``@pytest.mark.parametrize("backend", backend_params("cuda-emulated", "cuda"), indirect=True)``."""
    return [p for p in BACKEND_PARAMS if p.id in ids]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, monkeypatch) -> Backend:
    cpu = torch.device("cpu")
    p = request.param
    if p == "torch":
        return Backend("torch", "torch", cpu, False)
    if p == "cpu":
        return Backend("cpu", "cpu", cpu, False)
    if p == "triton":
        return Backend("triton", "triton", TRITON_DEVICE, TRITON_DEVICE.type == "cpu")
    if p == "cuda-emulated":
        install_emulated_cuda(monkeypatch, request.getfixturevalue("emulated_ext"))
        return Backend("cuda-emulated", "cuda", cpu, True)
    return Backend("cuda", "cuda", GPU, False)
