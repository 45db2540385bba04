"""The Triton backend against the float64 eager reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with one, the same tests run the compiled kernels on CUDA tensors. Shapes are
small on purpose (the interpreter executes every program in Python) but odd: V = 53 walked in
blocks of 16 (a ragged tail and whole blocks of −inf), V = 4099 in blocks of 1024, T = 1, a fully
masked row, groups of equal rewards.
"""
import itertools

import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference, token_logprobs_reference

from helpers import DTYPE_IDS, DTYPE_TOLS, assert_close, assert_close_scaled, assert_error_within, run_backend, run_oracle

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_WHY = unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton backend unavailable: {_WHY}")

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"]
CLIP = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LEVELS = ["token", "sequence"]
KLS = ["k3", "k1", "k2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def block_v(monkeypatch):
    """Force the kernels' BLOCK_V (several blocks and a ragged tail at small V)."""
    from grpo_fast.backends import triton_backend

    def set_(bv):
        monkeypatch.setattr(triton_backend, "BLOCK_V_OVERRIDE", bv)

    return set_


def make_case(B=4, T=5, V=53, dtype=torch.float32, seed=0, *, adv="row", isr=None, on_policy=False, neg_inf=False):
    """Random inputs (never zeros). Returns (logits in ``dtype``, ids, kwargs for grpo_loss)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    if neg_inf:
        # banned vocabulary entries: a whole leading block (with BLOCK_V = 16) and scattered ones,
        # never the target token
        banned = torch.zeros(B, T, V, dtype=torch.bool)
        banned[..., :20] = True
        banned |= torch.rand(B, T, V, generator=g) < 0.2
        banned.scatter_(-1, y.unsqueeze(-1), False)
        z = z.masked_fill(banned, float("-inf"))
    lp = token_logprobs_reference(z.double(), y).float()
    kw = {}
    kw["completion_mask"] = (torch.rand(B, T, generator=g) > 0.3).float()
    kw["completion_mask"][0] = 1.0
    if B > 2:
        kw["completion_mask"][2] = 0.0  # a fully masked row
    if not on_policy:
        kw["old_logp"] = lp + 0.3 * torch.randn(B, T, generator=g)  # ratios on both sides of the clip range
    kw["ref_logp"] = lp + 0.5 * torch.randn(B, T, generator=g)
    if adv == "row":
        kw["advantages"] = torch.randn(B, generator=g)
    elif adv == "token":
        kw["advantages"] = torch.randn(B, T, generator=g)
    else:  # "rewards-<scale>": G = 2, the last group has equal rewards (A = 0, not NaN)
        r = torch.rand(B, generator=g)
        r[-2:] = 0.5
        kw.update(rewards=r, group_size=2, scale_rewards=adv.split("-")[1])
    if isr == "row":
        kw["importance_sampling_ratio"] = 0.5 + torch.rand(B, generator=g)
    elif isr == "token":
        kw["importance_sampling_ratio"] = 0.5 + torch.rand(B, T, generator=g)
    return z.to(DEVICE), y.to(DEVICE), {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in kw.items()}


# loss and metrics: float32 accumulation on every logits dtype, held to float32 accuracy against the
# oracle on the same (rounded) logits
LOSS_ATOL, LOSS_RTOL = 2e-6, 2e-5
# gradient: the (atol, rtol) of tests/helpers.py's table — the fp32 bar against the oracle, and the
# floor added to twice the eager reference's own error for bf16 / fp16
GRAD_TOLS = {p.values[0]: p.values[1:] for p in DTYPE_TOLS}


def run_triton(z, y, inplace=False, grad_scale=1.0, **kw):
    return run_backend(z, y, "triton", inplace=inplace, grad_scale=grad_scale, **kw)


def check(z, y, grad_scale=1.0, inplace=False, **kw):
    """Triton vs the float64 oracle: loss, every metric (same names), and the gradient."""
    loss, met, grad = run_triton(z, y, inplace=inplace, grad_scale=grad_scale, **kw)
    want_loss, want_met, want_grad = run_oracle(z, y, grad_scale=grad_scale, **kw)
    assert_close(loss, want_loss, LOSS_ATOL, LOSS_RTOL, "loss")
    assert sorted(met) == sorted(want_met), (sorted(met), sorted(want_met))
    for k in want_met:
        assert met[k].dtype == torch.float32 and met[k].dim() == 0
        assert_close(met[k], want_met[k], LOSS_ATOL, LOSS_RTOL, f"metric {k}")
    assert grad.dtype == z.dtype and grad.shape == z.shape
    atol, rtol = GRAD_TOLS[z.dtype]
    if z.dtype == torch.float32:
        assert_close_scaled(grad, want_grad, rtol, "grad (fp32)", atol_scale=atol)
    else:  # flash-attention's rule: at most twice the eager path's error at the same precision
        eager_grad = run_backend(z, y, "torch", grad_scale=grad_scale, **kw)[2]
        assert_error_within(grad, eager_grad, want_grad, atol, rtol, f"grad ({DTYPE_IDS[z.dtype]})")
    return loss, met, grad


# ---------------------------------------------------------------------------------------------
# every loss type x level x KL estimator x dtype; the other options rotate through the cases so
# that each appears with several loss types without multiplying the case count


_ADV = ["row", "token", "rewards-group", "rewards-batch", "rewards-none"]
_ISR = [None, "row", "token"]
_TEMPS = [1.0, 0.7, 1.3]
_MATRIX = list(itertools.product(LOSS_TYPES, LEVELS, KLS, DTYPES))


@pytest.mark.parametrize("i", range(len(_MATRIX)),
                         ids=[f"{lt}-{lv}-{kl}-{DTYPE_IDS[dt]}" for lt, lv, kl, dt in _MATRIX])
def test_matrix(i, block_v):
    loss_type, level, kl, dtype = _MATRIX[i]
    block_v(16 if i % 2 == 0 else None)  # alternate multi-block (V = 53 in blocks of 16) and one block
    z, y, kw = make_case(dtype=dtype, seed=i, adv=_ADV[i % 5], isr=_ISR[(i // 5) % 3], on_policy=i % 4 == 3)
    opts = dict(loss_type=loss_type, importance_sampling_level=level, kl_estimator=kl, beta=0.04,
                temperature=_TEMPS[i % 3], use_bias_correction_kl=(i % 3 == 1))
    if loss_type in CLIP and i % 2 == 1:
        opts["delta"] = 1.5
        opts["epsilon_high"] = 0.28
    if loss_type == "cispo":
        opts["epsilon_high"] = 1.1  # a cap the drawn ratios cross
    if loss_type == "dr_grpo" and i % 2 == 0:
        opts["max_completion_length"] = 7
    if loss_type in ("dapo", "cispo") and i % 3 == 0:
        opts["num_items_in_batch"] = 13
    check(z, y, **kw, **opts)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
def test_without_kl_on_policy(loss_type, level):
    # beta = 0 (no ref_logp at all) and old_logp = None: ratio 1, gradient still flows
    z, y, kw = make_case(T=4, V=37, seed=100, adv="rewards-group", on_policy=True)
    kw.pop("ref_logp")
    check(z, y, loss_type=loss_type, importance_sampling_level=level, **kw)


# ---------------------------------------------------------------------------------------------
# odd vocabularies, -inf logits, masks, inplace, strides, grad_output


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("V,bv", [(53, 16), (4099, None), (1, None)], ids=["V53-blk16", "V4099-blk1024", "V1"])
def test_odd_vocab(level, V, bv, block_v):
    block_v(bv)
    z, y, kw = make_case(B=2, T=3, V=V, seed=V, adv="token")
    check(z, y, loss_type="grpo", importance_sampling_level=level, beta=0.1, **kw)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_neg_inf_logits(level, dtype, block_v):
    block_v(16)
    z, y, kw = make_case(V=53, dtype=dtype, seed=7, neg_inf=True, adv="rewards-group")
    loss, met, grad = check(z, y, loss_type="dapo", importance_sampling_level=level, beta=0.04, **kw)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in met.values())
    assert bool((grad[torch.isinf(z)] == 0).all()), "banned (-inf) entries must get a zero gradient"


@pytest.mark.parametrize("level", LEVELS)
def test_fully_masked_batch(level):
    z, y, kw = make_case(seed=3)
    kw["completion_mask"] = torch.zeros_like(kw["completion_mask"])
    loss, met, grad = check(z, y, loss_type="bnpo", importance_sampling_level=level, beta=0.04, **kw)
    assert float(loss) == 0.0 and bool((grad == 0).all())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_inplace(level, dtype, block_v):
    block_v(16)
    z, y, kw = make_case(dtype=dtype, seed=11, adv="rewards-batch", isr="token")
    opts = dict(loss_type="grpo", importance_sampling_level=level, beta=0.04, delta=1.6, **kw)
    _, _, grad_copy = run_triton(z, y, inplace=False, **opts)
    zz = z.clone().requires_grad_(True)
    before = zz.detach().clone()
    loss, _ = grpo_fast.grpo_loss(zz, y, backend="triton", inplace=True, **opts)
    loss.backward()
    assert torch.equal(zz.grad, grad_copy), "inplace must give the same gradient, bit for bit"
    # the gradient lives in the logits' storage: the logits were overwritten
    assert zz.grad.data_ptr() == zz.data_ptr() and not torch.equal(zz.detach(), before)
    # inplace=False leaves the logits untouched
    zz2 = z.clone().requires_grad_(True)
    grpo_fast.grpo_loss(zz2, y, backend="triton", inplace=False, **opts)[0].backward()
    assert torch.equal(zz2.detach(), z)


@pytest.mark.parametrize("level", LEVELS)
def test_strided_logits_and_grad_scale(level):
    # logits that are a T-slice of a bigger tensor (row strides != T·V), and grad_output = 2.5
    big, y, kw = make_case(T=7, seed=5, adv="token")
    z = big[:, 1:6]
    y = y[:, 1:6].contiguous()
    kw = {k: (v[:, 1:6].contiguous() if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in kw.items()}
    assert not z.is_contiguous() and z.stride(-1) == 1
    check(z, y, grad_scale=2.5, loss_type="sapo", importance_sampling_level=level, beta=0.04, **kw)


def test_single_token_rows():
    z, y, kw = make_case(B=4, T=1, V=53, seed=9, adv="rewards-group")
    kw["completion_mask"] = torch.ones_like(kw["completion_mask"])
    for level in LEVELS:
        check(z, y, loss_type="luspo", importance_sampling_level=level, beta=0.02, **kw)


def test_deterministic():
    z, y, kw = make_case(seed=21, adv="rewards-group")
    a = run_triton(z, y, loss_type="dapo", beta=0.04, **kw)
    b = run_triton(z, y, loss_type="dapo", beta=0.04, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_forward_only():
    # no gradient wanted: the kernels skip the gradient sweep, the loss is the same
    z, y, kw = make_case(seed=4)
    with torch.no_grad():
        loss, met = grpo_fast.grpo_loss(z, y, backend="triton", loss_type="cispo", beta=0.04, **kw)
    want, want_met, _ = run_oracle(z, y, loss_type="cispo", beta=0.04, **kw)
    assert_close(loss, want, LOSS_ATOL, LOSS_RTOL, "loss")
    assert_close(met["cispo_clip_ratio"], want_met["cispo_clip_ratio"], LOSS_ATOL, LOSS_RTOL, "cispo_clip_ratio")


# ---------------------------------------------------------------------------------------------
# token_logprobs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("V,bv", [(53, 16), (4099, None)], ids=["V53-blk16", "V4099"])
def test_token_logprobs(dtype, V, bv, block_v):
    block_v(bv)
    z, y, _ = make_case(B=3, T=4, V=V, dtype=dtype, seed=V + 1, neg_inf=V == 53)
    logp, ent = grpo_fast.token_logprobs(z, y, 0.8, return_entropy=True, backend="triton")
    want_logp, want_ent = token_logprobs_reference(z.double(), y, 0.8, return_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and logp.shape == (3, 4)
    assert_close(logp, want_logp, 1e-5, 1e-5, "logp")
    assert_close(ent, want_ent, 1e-5, 1e-5, "entropy")
    only = grpo_fast.token_logprobs(z, y, 0.8, backend="triton")
    assert torch.equal(only, logp)


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
    z, y, kw = make_case(V=53, seed=31, adv="rewards-group")
    for inplace in (False, True):
        check(z, y, inplace=inplace, loss_type="dapo", importance_sampling_level=level, beta=0.04, **kw)
    assert calls, "the autotuner did not time any config"
    tuned = {k: t for k, t in tb._TUNED.items()}
    assert any(restore for (_, restore) in tuned)  # the inplace launch used a restoring tuner
    for t in tuned.values():
        assert [c.kwargs["BLOCK_V"] for c in tb._prune(t.configs, {}, V=53)] == [16, 32]  # 8192 > max(64, 1024): pruned
        assert all(c.kwargs["BLOCK_V"] == 32 for c in t.cache.values())


def test_entropy_of_peaked_rows():
    # One dominant logit (late-training policies): entropy ~1e-3 next to logits ~25. The kernel keeps
    # Σ p·(x − max) instead of lse − Σ p·x, so it does not lose the digits float32 eager code does.
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 4099, generator=g) * 2
    z[..., 11] += 25.0
    y = torch.randint(0, 4099, (3, 4), generator=g)
    z, y = z.to(DEVICE), y.to(DEVICE)
    _, ent = grpo_fast.token_logprobs(z, y, return_entropy=True, backend="triton")
    _, want = token_logprobs_reference(z.double(), y, return_entropy=True)
    assert float(want.max()) < 1e-2
    # float32 log(d) with d = 1 + O(1e-6) bounds the absolute error near 1e-7; eager float32 is off by
    # 100 % on the smallest of these entropies
    assert_close(ent, want, 2e-7, 1e-3, "entropy of peaked rows")


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
