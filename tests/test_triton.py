"""What is specific to the Triton backend (grpo_fast/kernels, grpo_fast/backends/triton_backend.py).

The conformance matrix against the float64 reference is tests/test_backends.py, which runs this
backend too (natively on a GPU; without one in Triton's interpreter on CPU tensors, tests/conftest.py
sets TRITON_INTERPRET=1). Here: the BLOCK_V override (V = 53 walked in blocks of 16: a ragged tail,
a whole block of −inf, several blocks per row) through the suite's check, the autotuned launch
path, the backend module and its packaging, the repository root not shadowing `kernels`, and the
error without Triton.
"""
import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import token_logprobs_reference

from backends_fixture import TRITON_DEVICE, Backend
from helpers import DTYPE_IDS, assert_close
from test_backends import case, check

DEVICE = TRITON_DEVICE
_WHY = unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton backend unavailable: {_WHY}")
TRITON = Backend("triton", "triton", DEVICE, DEVICE.type == "cpu")
LEVELS = ["token", "sequence"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def block_v(monkeypatch):
    """Force the kernels' BLOCK_V (several blocks and a ragged tail at small V)."""
    from grpo_fast.backends import triton_backend

    def set_(bv):
        monkeypatch.setattr(triton_backend, "BLOCK_V_OVERRIDE", bv)

    return set_


def _banned_block(z, y):
    """−inf on a whole leading block (entries 0..19 with BLOCK_V = 16) and every third entry, never the target."""
    z[..., :20] = float("-inf")
    z[..., ::3] = float("-inf")
    return z, torch.where((y % 3 == 0) | (y < 20), torch.full_like(y, 22), y)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_block_v_ragged_tail(block_v, dtype, level):
    """BLOCK_V = 16 at V = 53: three whole blocks (the first all −inf) and a tail of 5; rewards with
    an equal-reward group, per-token IS ratios, delta; inplace gives the same gradient bit for bit."""
    block_v(16)
    z, y, kw = case(TRITON, dtype=dtype, seed=7, adv="group", isr="tokens", banned=False)
    z, y = _banned_block(z, y)
    kw.update(loss_type="grpo", importance_sampling_level=level, delta=1.6)
    _, met, grad = check(TRITON, z, y, **kw)
    assert bool((grad[torch.isinf(z)] == 0).all()), "banned (-inf) entries must get a zero gradient"
    assert all(torch.isfinite(v) for v in met.values())
    zz = z.clone().requires_grad_(True)
    grpo_fast.grpo_loss(zz, y, backend="triton", inplace=True, **kw)[0].backward()
    assert torch.equal(zz.grad, grad) and zz.grad.data_ptr() == zz.data_ptr()


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "sapo"])
def test_block_v_ragged_tail_losses(block_v, loss_type):
    """The other loss families at BLOCK_V = 16, sequence level, (B, T) advantages."""
    block_v(16)
    z, y, kw = case(TRITON, seed=8, adv="tokens")
    check(TRITON, z, y, loss_type=loss_type, importance_sampling_level="sequence", epsilon_high=1.1 if loss_type == "cispo" else 0.28, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_block_v_token_logprobs(block_v, dtype):
    block_v(16)
    z, y, _ = case(TRITON, B=3, T=4, dtype=dtype, seed=54, banned=False)
    z, y = _banned_block(z, y)
    logp, ent = grpo_fast.token_logprobs(z, y, 0.8, return_entropy=True, backend="triton")
    want_logp, want_ent = token_logprobs_reference(z.double(), y, 0.8, return_entropy=True)
    assert_close(logp, want_logp, 2e-6, 1e-5, "logp")
    assert_close(ent, want_ent, 2e-6, 1e-5, "entropy")
    assert torch.equal(grpo_fast.token_logprobs(z, y, 0.8, backend="triton"), logp)


# ---------------------------------------------------------------------------------------------
# the backend module itself


def test_backend_module():
    from grpo_fast.backends import triton_backend

    assert triton_backend.unavailable_reason() is None
    assert DEVICE.type in triton_backend.DEVICE_TYPES
    kernels = triton_backend.load_kernels()
    assert kernels.__name__ == "grpo_fast.kernels"
    # the kernels of the grpo_fast package that was imported (not those of another checkout)
    import pathlib

    assert pathlib.Path(kernels.__file__).resolve().parent == pathlib.Path(grpo_fast.__file__).resolve().parent / "kernels"
    for name in kernels.KERNELS:
        assert hasattr(kernels, name)


def test_kernels_ship_inside_the_package():
    # The Triton sources are grpo_fast/kernels/, a subpackage like the others: every folder under
    # grpo_fast/ with an __init__.py must be in pyproject's explicit package list.
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert "grpo_fast.kernels" in listed and "kernels" not in listed
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "grpo_fast").rglob("__init__.py")}
    assert on_disk <= listed, f"packages missing from pyproject's list: {sorted(on_disk - listed)}"


def test_repo_root_does_not_shadow_other_packages():
    # transformers (>= 5.23) probes for Hugging Face's `kernels` package with find_spec("kernels").
    # From the repository root (on sys.path for `python -m grpo_fast`, pytest, notebooks), that name
    # must find the installed package or nothing, never a folder of ours.
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    code = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
            "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))")
    found = json.loads(subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                                      check=True).stdout)
    if found is not None:
        origin, locations = found
        for place in [origin or ""] + locations:
            assert not pathlib.Path(place).resolve().is_relative_to(root), f"`import kernels` finds {place} in this repository"


@pytest.mark.parametrize("level", LEVELS)
def test_autotuned_launch_path(level, monkeypatch):
    # The GPU path: autotuner with several configs, pruned by V, each trial run on the same
    # buffers — with inplace=True the trials overwrite the logits, so they must be restored between
    # runs or the final gradient would be computed from a gradient. A stand-in timer (a GPU one
    # cannot run here) makes the last surviving config win.
    from grpo_fast.backends import triton_backend as tb

    calls = []

    def fake_bench(kernel_call, quantiles=None, **_):
        kernel_call()
        kernel_call()  # twice, as a real timer would (and as restore_value must survive)
        calls.append(1)
        t = 100.0 - len(calls)
        return [t, t, t] if quantiles else t

    monkeypatch.setattr(tb, "AUTOTUNE", True)
    monkeypatch.setattr(tb, "BLOCK_V_OVERRIDE", None)
    monkeypatch.setattr(tb, "DO_BENCH", fake_bench)
    monkeypatch.setattr(tb, "AUTOTUNE_CONFIGS", ((16, 4, 1), (32, 4, 1), (8192, 4, 1)))
    monkeypatch.setattr(tb, "_TUNED", {})
    z, y, kw = case(TRITON, seed=31, adv="group")
    for inplace in (False, True):
        check(TRITON, z, y, inplace=inplace, loss_type="dapo", importance_sampling_level=level, **kw)
    assert calls, "the autotuner did not time any config"
    tuned = {k: t for k, t in tb._TUNED.items()}
    assert any(restore for (_, restore) in tuned)  # the inplace launch used a restoring tuner
    for t in tuned.values():
        assert [c.kwargs["BLOCK_V"] for c in tb._prune(t.configs, {}, V=53)] == [16, 32]  # 8192 > max(64, 1024): pruned
        assert all(c.kwargs["BLOCK_V"] == 32 for c in t.cache.values())


def test_unavailable_without_triton(monkeypatch):
    # Importing grpo_fast never needs Triton: without it the backend says why and how to fix it.
    import sys

    from grpo_fast.backends import triton_backend as tb

    monkeypatch.setattr(tb, "_KERNELS", None)
    monkeypatch.delitem(sys.modules, "grpo_fast.kernels", raising=False)
    monkeypatch.delitem(sys.modules, "grpo_fast.kernels.grpo", raising=False)
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is absent
    why = tb.unavailable_reason()
    assert why is not None and "pip install triton" in why
    with pytest.raises(RuntimeError, match="pip install triton"):
        grpo_fast.grpo_loss(torch.randn(2, 2, 5), torch.zeros(2, 2, dtype=torch.long), torch.randn(2), backend="triton")
    monkeypatch.setattr(tb, "_KERNELS", None)  # forget the failure; monkeypatch restores the modules
