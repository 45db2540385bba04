"""What is specific to the Triton backend (grpo_fast/kernels, grpo_fast/backends/triton_backend.py).

The conformance matrix against the float64 reference is tests/test_backends.py, which runs this
backend too (natively on a GPU; without one in Triton's interpreter on CPU tensors, tests/conftest.py
sets TRITON_INTERPRET=1). Here: the BLOCK_V override (V = 53 walked in blocks of 16: a ragged tail,
a whole block of −inf, several blocks per row) through the suite's check, the pinned launch
configs and the persistent grid of the token-level loss, the backend module and its packaging, the repository root not shadowing `kernels`, and the
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


# ---------------------------------------------------------------------------------------------
# launch configuration: pinned configs, the persistent grid of the token-level loss


def test_pinned_config_is_a_function_of_v_dtype_arch():
    from grpo_fast.backends import triton_backend as tb

    # 16 KB of logits per block step at large V, next_pow2(V) below; warps follow the block bytes
    assert tb.pinned_config(151936, 2, 90) == (8192, 16)
    assert tb.pinned_config(151936, 4, 90) == (4096, 16)
    assert tb.pinned_config(32000, 2, 80) == (4096, 8)  # sm_80: 8 KB per step
    assert tb.pinned_config(32000, 4, 0) == (2048, 8)  # the interpreter: sm_80's rule
    assert tb.pinned_config(53, 4, 0) == (64, 1)
    assert tb.pinned_config(1000, 2, 90) == (1024, 2)
    for V in (53, 1000, 32000, 128256, 151936):
        for e in (2, 4):
            assert tb.pinned_config(V, e, 80) == tb.pinned_config(V, e, 86)  # one rule per architecture family
    with pytest.raises(ValueError, match="elem_bytes"):
        tb.pinned_config(100, 3)
    configs = tb.pinned_configs(90)
    assert (8192, 16, 2) in configs and (4096, 16, 4) in configs and len(configs) == len(set(configs))
    assert (4096, 8, 2) in tb.pinned_configs(80) and (8192, 16, 2) not in tb.pinned_configs(80)
    assert not hasattr(tb, "AUTOTUNE_CONFIGS")  # no timing-based choice left anywhere


def test_persistent_grid_sizing_rule():
    from grpo_fast.backends.triton_backend import MAX_PROGRAMS_PER_SM, persistent_grid

    MB = 1024 * 1024
    h100 = (50 * MB, 132)
    # rows in flight fill at most 3/4 of L2: 37.5 MB / (V·e)
    assert persistent_grid(10 ** 6, 151936, 4, *h100) == int(0.75 * 50 * MB) // (151936 * 4) == 64
    assert persistent_grid(10 ** 6, 151936, 2, *h100) == 129
    assert persistent_grid(10 ** 6, 128256, 2, *h100) == 153
    # small rows: capped at MAX_PROGRAMS_PER_SM per SM; few rows: one program per row
    assert persistent_grid(10 ** 6, 32000, 2, *h100) == MAX_PROGRAMS_PER_SM * 132
    assert persistent_grid(7, 151936, 4, *h100) == 7
    # the budget always holds while a row fits
    for V in (32000, 50257, 128256, 151936, 262144):
        for e in (2, 4):
            for l2, sms in ((40 * MB, 108), h100, (60 * MB, 132)):
                p = persistent_grid(10 ** 6, V, e, l2, sms)
                assert 1 <= p <= MAX_PROGRAMS_PER_SM * sms and p * V * e <= 0.75 * l2
    # a row larger than the budget: full parallelism (sweep 2 misses in part anyway)
    assert persistent_grid(10 ** 6, 20 * 10 ** 6, 4, *h100) == MAX_PROGRAMS_PER_SM * 132
    with pytest.raises(ValueError, match="sm_count"):
        persistent_grid(10, 10, 2, 1024, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_persistent_grid_loops_over_rows(block_v, dtype, monkeypatch):
    """A tiny L2 leaves room for 2 rows in flight: each program loops over 12 rows (masked ones
    included), the reverse sweep runs over 4 blocks; the results are those of one program per row
    bit for bit (the grid decides only which program reads which row), inplace too."""
    from grpo_fast.backends import triton_backend as tb

    block_v(16)
    z, y, kw = case(TRITON, dtype=dtype, seed=11, adv="group")
    kw.update(loss_type="dapo", importance_sampling_level="token")
    V = z.shape[-1]
    monkeypatch.setattr(tb, "DEVICE_PROPS_OVERRIDE", (int(2 * V * z.element_size() / tb.L2_FRACTION) + 1, 1))
    assert tb.persistent_grid(24, V, z.element_size(), *tb.DEVICE_PROPS_OVERRIDE) == 2
    launched = []
    real = tb._launch_v
    monkeypatch.setattr(tb, "_launch_v", lambda name, grid, args, t: (launched.append((name, grid)), real(name, grid, args, t)))
    loss2, _, grad2 = check(TRITON, z, y, **kw)
    assert ("_grpo_token_fwd_kernel", (2,)) in launched
    zz = z.clone().requires_grad_(True)
    grpo_fast.grpo_loss(zz, y, backend="triton", inplace=True, **kw)[0].backward()
    assert torch.equal(zz.grad, grad2)
    monkeypatch.setattr(tb, "DEVICE_PROPS_OVERRIDE", (1 << 40, 1 << 20))  # every row its own program
    z1 = z.clone().requires_grad_(True)
    loss1, _ = grpo_fast.grpo_loss(z1, y, backend="triton", **kw)
    loss1.backward()
    assert ("_grpo_token_fwd_kernel", (24,)) in launched
    assert torch.equal(loss1.detach(), loss2) and torch.equal(z1.grad, grad2)


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
