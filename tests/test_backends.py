"""One conformance suite for every backend that can run (the ``backend`` fixture, tests/backends_fixture.py):
torch (the eager reference), cpu, triton (interpreter without a GPU), cuda-emulated (the CUDA kernels
built by g++ in host emulation) and, on a GPU, the real cuda kernels (marked ``gpu``).

Each case compares the backend with the float64 oracle (grpo_loss_reference on the same, already
rounded, logits in float64) through one helper, :func:`check`:
  * loss and every metric (the same names, float32 scalars): 1e-5 relative (and a small absolute
    floor) on every logits dtype — the kernels and the eager reference accumulate in float32;
  * clip-flag metrics (clip_ratio_low/high/clip_ratio/cispo_clip_ratio): float32 and float64 ratios may
    put one token (or one row, for per-row flags at sequence level) on the other side of a clip
    boundary, so these may differ by one flag over the count's denominator — on every backend;
  * gradient: dtype, shape and device of the logits; fp32: 1e-5 relative with the absolute tolerance
    scaled to max|grad|; bf16/fp16: at most twice the eager reference's own error at that precision
    plus a floor (tests/helpers.py); for the eager reference itself at bf16/fp16 (that rule would
    compare it with itself), one rounding to the dtype: |grad − oracle| ≤ eps·|oracle| + 1e-5·max|oracle|.

The matrix is every loss type of grpo_fast._config.LOSS_TABLE × importance-sampling level × KL
estimator × dtype. Slow backends (Triton interpreter, CUDA emulation) run one (KL, dtype) per
loss × level and a subset of the other parametrizations by default; GRPO_FAST_FULL_MATRIX=1 runs all.
Then options one at a time, odd vocabularies, −inf / NaN / extreme logits, masks, inplace, strides,
grad_output != 1, determinism, no-grad forward and token_logprobs.
"""
from __future__ import annotations

import math

import pytest
import torch

import grpo_fast
from grpo_fast._config import LOSS_TABLE
from grpo_fast.reference import grpo_loss_reference, token_logprobs_reference

from backends_fixture import full_matrix
from helpers import DTYPE_IDS, assert_close, assert_close_scaled, assert_error_within, make_inputs, run_backend, run_oracle

LOSS_TYPES = list(LOSS_TABLE)
LEVELS = ["token", "sequence"]
KLS = ["k3", "k1", "k2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLAG_METRICS = sorted({k for lt in LOSS_TABLE.values() for k in lt.flag_metrics})
# Per-loss options that make the interesting branches happen on random inputs.
LOSS_OPTS = {"cispo": dict(epsilon_high=1.1), "sapo": dict(sapo_temperature_pos=0.9, sapo_temperature_neg=1.2)}

RTOL = 1e-5          # README, "Correct against float64"
LOSS_ATOL = 1e-6     # absolute floor for the loss (it can be near 0)
METRIC_ATOL = 2e-6   # ... and for the metrics (kl can be ~1e-2)
GRAD_ATOL = 1e-5     # fp32: × max|grad|; bf16/fp16: the floor of the eager rule


def thin(backend, keep: bool, what: str = "") -> None:
    """Skip a case on a slow backend unless it is one of the kept ones (or GRPO_FAST_FULL_MATRIX=1)."""
    if backend.slow and not keep and not full_matrix():
        pytest.skip(f"{backend.id} is slow: {what or 'a subset'} by default; GRPO_FAST_FULL_MATRIX=1 runs all")


# ---- inputs ------------------------------------------------------------------------------------------
def case(backend, B=4, T=6, V=53, dtype=torch.float32, seed=0, *, adv="rows", isr=None, on_policy=False,
         kl=True, banned=True, masked_row=True, group_size=2):
    """(logits, ids, kwargs) on the backend's device, from helpers.make_inputs (ragged mask, row 1 fully
    masked, a few −inf logits per row). adv: "rows" (B,), "tokens" (B, T), or "group" / "batch" /
    "none" — rewards in groups of ``group_size`` with that scale_rewards, the first two rewards equal
    (with groups of 2, a group with A = 0)."""
    inp = make_inputs(B, T, V, dtype, seed=seed, banned=banned, masked_row=masked_row)
    g = torch.Generator().manual_seed(seed + 1000)
    kw = dict(completion_mask=inp["completion_mask"])
    if not on_policy:
        kw["old_logp"] = inp["old_logp"]
    if kl:
        kw.update(ref_logp=inp["ref_logp"], beta=0.04)
    if adv == "rows":
        kw["advantages"] = inp["advantages"]
    elif adv == "tokens":
        kw["advantages"] = torch.randn(B, T, generator=g)
    else:
        r = inp["rewards"].clone()
        r[:2] = 0.75
        kw.update(rewards=r, group_size=group_size, scale_rewards=adv)
    if isr == "rows":
        kw["importance_sampling_ratio"] = 0.5 + torch.rand(B, generator=g)
    elif isr == "tokens":
        kw["importance_sampling_ratio"] = 0.5 + torch.rand(B, T, generator=g)
    return backend.put(inp["logits"]), backend.put(inp["ids"]), backend.put(kw)


# ---- the one comparison ------------------------------------------------------------------------------
def compare(backend, got, z, y, *, grad_scale=1.0, **kw):
    """``got`` = (loss, metrics, grad) of ``backend`` on logits ``z`` (loss·grad_scale backpropagated)
    against the float64 oracle, by the rules of the module docstring. Returns ``got``."""
    loss, met, grad = got
    loss_o, met_o, grad_o = run_oracle(z, y, grad_scale=grad_scale, **kw)
    # a NaN on both sides would compare equal: the inputs here must give a finite loss and gradient
    assert math.isfinite(float(loss_o)) and bool(torch.isfinite(grad_o).all()), "non-finite oracle: bad test inputs"
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.device == z.device
    assert_close(loss, loss_o, LOSS_ATOL, RTOL, "loss")
    assert sorted(met) == sorted(met_o), (sorted(met), sorted(met_o))
    for k, v in met.items():
        assert v.dtype == torch.float32 and v.dim() == 0, k
        if k in FLAG_METRICS:
            m, adv = kw.get("completion_mask"), kw.get("advantages")
            per_row = kw.get("importance_sampling_level") == "sequence" and (adv is None or adv.dim() == 1)
            n_tok = float(m.sum()) if m is not None else float(y.numel())
            denom = float(y.shape[0]) if per_row else max(n_tok, 1.0)
            assert_close(v, met_o[k], 1.01 / denom, 0.0, f"metric {k} (one flipped flag allowed)")
        else:
            assert_close(v, met_o[k], METRIC_ATOL, RTOL, f"metric {k}")
    assert grad is not None and grad.dtype == z.dtype and grad.shape == z.shape and grad.device == z.device
    if z.dtype == torch.float32:
        assert_close_scaled(grad, grad_o, RTOL, "grad (fp32)", atol_scale=GRAD_ATOL)
    elif backend.name == "torch":  # the eager reference at low precision: fp32 math, one rounding
        scale = float(grad_o.abs().max())
        assert_close(grad, grad_o, GRAD_ATOL * scale, torch.finfo(z.dtype).eps, f"grad ({DTYPE_IDS[z.dtype]})")
    else:
        eager = run_backend(z, y, "torch", grad_scale=grad_scale, **kw)[2]
        # with grad_output != 1 the fused gradient is rounded twice (forward, then after the scaling)
        # where eager rounds once: a floor of one unit of the dtype's precision relative to max|grad|
        rtol = RTOL if grad_scale == 1.0 else torch.finfo(z.dtype).eps
        assert_error_within(grad, eager, grad_o, GRAD_ATOL, rtol, f"grad ({DTYPE_IDS[z.dtype]})")
    return got


def check(backend, z, y, *, grad_scale=1.0, inplace=False, **kw):
    """Run ``backend`` (fresh copy of ``z``, backward of loss·grad_scale) and compare with the oracle."""
    got = run_backend(z, y, backend.name, inplace=inplace, grad_scale=grad_scale, **kw)
    return compare(backend, got, z, y, grad_scale=grad_scale, **kw)


# ---- the matrix ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matrix(backend, loss_type, level, kl, dtype):
    """Every loss type × level × KL estimator × dtype, KL on, ragged mask with a fully masked row,
    −inf logits; the advantage input rotates over (B,), (B, T) and rewards."""
    j = LOSS_TYPES.index(loss_type) + len(LOSS_TYPES) * LEVELS.index(level)
    thin(backend, KLS.index(kl) == j % 3 and DTYPES.index(dtype) == (j // 3) % 3, "one (KL, dtype) per loss × level")
    i = j + KLS.index(kl)
    z, y, kw = case(backend, dtype=dtype, seed=i, adv=("rows", "tokens", "group")[i % 3])
    check(backend, z, y, loss_type=loss_type, importance_sampling_level=level, kl_estimator=kl, temperature=0.9,
          **kw, **LOSS_OPTS.get(loss_type, {}))


# ---- one option at a time ----------------------------------------------------------------------------
OPTIONS = {
    "on_policy": dict(on_policy=True),
    "isr_rows": dict(isr="rows"),
    "isr_tokens": dict(isr="tokens"),
    "adv_tokens": dict(adv="tokens"),
    "adv_tokens_cispo": dict(adv="tokens", loss_type="cispo", epsilon_high=1.1),
    "rewards_group": dict(adv="group"),
    "rewards_batch": dict(adv="batch"),
    "rewards_none": dict(adv="none"),
    "delta": dict(loss_type="grpo", delta=1.5, epsilon_high=0.3),
    "bias_corrected_kl": dict(loss_type="bnpo", use_bias_correction_kl=True, beta=0.1),
    "num_items": dict(loss_type="dapo", num_items_in_batch=37),
    "dr_grpo_mcl": dict(loss_type="dr_grpo", max_completion_length=11),
    "temperature": dict(loss_type="luspo", temperature=1.7),
    "eps_low_high": dict(epsilon_low=0.1, epsilon_high=0.28),
    "sapo_temps": dict(loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
    "cispo_eps_high": dict(loss_type="cispo", epsilon_high=1.05),
    "no_kl": dict(kl=False),
}
_CASE_KEYS = ("on_policy", "isr", "adv", "kl")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options(backend, option, level, dtype):
    thin(backend, dtype == torch.float32, "fp32 only")
    opts = dict(OPTIONS[option])
    z, y, kw = case(backend, dtype=dtype, seed=7, **{k: opts.pop(k) for k in _CASE_KEYS if k in opts})
    kw.update(opts)
    kw.setdefault("loss_type", "grpo")
    check(backend, z, y, importance_sampling_level=level, **kw)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_without_kl(backend, loss_type, level):
    """old_logp=None (r = 1, dr/dlogp = r) and beta = 0 (ref_logp absent), every loss type."""
    z, y, kw = case(backend, T=4, V=37, seed=100, adv="group", on_policy=True, kl=False)
    check(backend, z, y, loss_type=loss_type, importance_sampling_level=level, **kw, **LOSS_OPTS.get(loss_type, {}))


# ---- sizes -----------------------------------------------------------------------------------------------
ODD = [  # (B, T, V, dtype, kept on slow backends)
    pytest.param(2, 3, 1, torch.float32, True, id="V1"),
    pytest.param(3, 2, 17, torch.float32, False, id="V17"),
    pytest.param(2, 3, 53, torch.bfloat16, True, id="bf16-V53"),
    pytest.param(4, 1, 53, torch.float32, True, id="T1"),
    pytest.param(2, 3, 4099, torch.float16, True, id="fp16-V4099"),
    pytest.param(2, 3, 32001, torch.float32, True, id="V32001"),
    pytest.param(2, 3, 32001, torch.bfloat16, True, id="bf16-V32001"),
    pytest.param(2, 3, 32001, torch.float16, False, id="fp16-V32001"),
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("B,T,V,dtype,keep", ODD)
def test_odd_sizes(backend, B, T, V, dtype, keep, level):
    """Odd vocabularies (rows off 16-byte boundaries: head, vector body, tail), T = 1, big V."""
    thin(backend, keep, "fp32 and one vocabulary per dtype")
    z, y, kw = case(backend, B, T, V, dtype, seed=41 + V, adv="tokens" if T > 1 else "group", banned=V > 2,
                    masked_row=False, group_size=B)  # T = 1: one group of the whole batch
    check(backend, z, y, loss_type="dapo", importance_sampling_level=level, **kw)


# ---- special values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_neg_inf_logits(backend, dtype, level):
    """Banned entries (every third, and a leading block of 20): p = 0, zero gradient, finite entropy."""
    z, y, kw = case(backend, dtype=dtype, seed=51, adv="group", banned=False)
    z[..., ::3] = float("-inf")
    z[..., :20] = float("-inf")
    y = torch.where((y % 3 == 0) | (y < 20), torch.full_like(y, 22), y)
    loss, met, g = check(backend, z, y, loss_type="grpo", importance_sampling_level=level, **kw)
    assert bool((g[torch.isinf(z)] == 0).all()), "banned (-inf) entries must get a zero gradient"
    assert all(math.isfinite(float(v)) for v in met.values()) and math.isfinite(float(loss))


def test_peaked_rows(backend):
    """A row where every logit but the target is −inf (p_y = 1, entropy 0) and a very peaked row."""
    z, y, kw = case(backend, B=2, T=4, seed=2, banned=False, masked_row=False)
    z[0, 0] = float("-inf")
    z[0, 0, y[0, 0]] = 3.0
    z[1, 1, y[1, 1]] = 60.0
    check(backend, z, y, loss_type="dapo", **kw)


@pytest.mark.parametrize("loss_type", ["dapo", "sapo"])
def test_banned_target(backend, loss_type):
    """A target whose logit is −inf: logp = −inf, r = 0; the loss stays finite (no KL term), as in torch."""
    z, y, kw = case(backend, B=2, T=4, seed=4, masked_row=False, kl=False)
    z[0, 2, y[0, 2]] = float("-inf")
    loss, _, grad = check(backend, z, y, loss_type=loss_type, **kw)
    assert math.isfinite(float(loss)) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("level", LEVELS)
def test_nan_logit_propagates(backend, level):
    """A NaN logit makes the loss NaN, as in PyTorch (a max sweep must not swallow it)."""
    z, y, kw = case(backend, seed=55, adv="group", masked_row=False, banned=False, on_policy=True)
    z[1, 2, 7] = float("nan")
    loss, _ = grpo_fast.grpo_loss(z, y, backend=backend.name, loss_type="dapo", importance_sampling_level=level, **kw)
    want, _ = grpo_loss_reference(z.double(), y, loss_type="dapo", importance_sampling_level=level, **kw)
    assert math.isnan(float(want)) and math.isnan(float(loss))


@pytest.mark.parametrize("scale,temperature", [(1e4, 1.0), (2.0, 1e-3), (2.0, 100.0)],
                         ids=["logits1e4", "tau1e-3", "tau100"])
def test_extreme_logits_and_temperatures(backend, scale, temperature):
    """|logits| of 1e4, or τ = 1e-3 (log-probs ≈ −1e4), or τ = 100: at most twice eager float32's own
    error (flash-attention's rule), plus a floor: the float32 tolerance, and what rounding each log-prob
    to float32 alone moves the loss by (half an ulp of |logp| ≈ 1e4 is 5e-4, times |∂loss/∂logp|),
    which no float32 kernel can beat. (Large logits and small τ at once put the log-probs near −1e8,
    where float32 has no digits left for a ratio: not a meaningful case.)"""
    if backend.name == "torch":
        pytest.skip("the eager float32 reference is the yardstick here (it loses ~1e-4 of the gradient at |logits| 1e4)")
    z, y, kw = case(backend, seed=57, adv="group", masked_row=False, banned=False)
    z = z * scale
    kw["completion_mask"] = torch.ones_like(kw["completion_mask"])
    lp64 = token_logprobs_reference(z.double(), y, temperature)
    g = torch.Generator().manual_seed(58)
    old = lp64.float() + backend.put(torch.randn(y.shape, generator=g) * 0.05)
    kw.update(old_logp=old, ref_logp=old - 0.1, temperature=temperature, loss_type="dapo", beta=0.05)
    outs = {}
    for name, be, zz in (("kernel", backend.name, z.clone()), ("fp32", "torch", z.clone()), ("fp64", "torch", z.double())):
        zz.requires_grad_(True)
        loss, met = (grpo_loss_reference(zz, y, **kw) if name == "fp64" else grpo_fast.grpo_loss(zz, y, backend=be, **kw))
        loss.backward()
        outs[name] = [loss, zz.grad] + [met[k] for k in sorted(met)]
    assert torch.isfinite(outs["kernel"][0]) and torch.isfinite(outs["kernel"][1]).all()
    # ∂loss/∂logp_t of dapo with r ≈ 1 and k3: w·(|A|·r + β·|1 − e^d|) ≤ w·(2|A| + β), w = 1/Σm
    half_ulp = torch.ldexp(torch.ones_like(lp64), torch.frexp(lp64.float())[1].to(torch.int32) - 24)
    adv = grpo_fast.group_advantages(kw["rewards"], kw["group_size"]).double()[:, None]
    lp_floor = {"loss": ((2 * adv.abs() + 0.05) * half_ulp).sum().item() / y.numel(),
                "kl": (0.2 * half_ulp).sum().item() / y.numel()}  # |1 − e^d| ≤ 0.2 for d = ref − logp ≈ −0.1
    for what, got, fp32, want in zip(["loss", "grad"] + sorted(met), outs["kernel"], outs["fp32"], outs["fp64"]):
        err = (got.double() - want).abs().max().item()
        err32 = (fp32.double() - want).abs().max().item()
        floor = 1e-5 * want.abs().max().item() + 1e-9 + lp_floor.get(what, 0.0)
        assert err <= 2 * err32 + floor, (what, err, err32, floor)


# ---- masks -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
def test_fully_masked_rows_and_batch(backend, level):
    """A fully masked row gets a zero gradient; a fully masked batch: loss 0, zero gradient, finite metrics."""
    z, y, kw = case(backend, seed=61)
    _, _, g = check(backend, z, y, loss_type="bnpo", importance_sampling_level=level, **kw)
    assert bool((g[1] == 0).all())
    kw["completion_mask"] = torch.zeros_like(kw["completion_mask"])
    loss, met, g = check(backend, z, y, loss_type="grpo", importance_sampling_level=level, **kw)
    assert float(loss) == 0.0 and bool((g == 0).all())
    assert all(math.isfinite(float(v)) for v in met.values())


# ---- autograd plumbing: inplace, strides, grad_output, no grad ------------------------------------
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_inplace(backend, dtype, level):
    """inplace=True: the logits' storage then holds exactly the gradient inplace=False returns, which is
    the oracle's; inplace=False leaves the logits untouched."""
    z, y, kw = case(backend, dtype=dtype, V=131, seed=71, adv="tokens", isr="tokens")
    kw.update(loss_type="dapo", importance_sampling_level=level)
    keep = z.clone()
    zz = z.clone().requires_grad_(True)
    loss, _ = grpo_fast.grpo_loss(zz, y, backend=backend.name, **kw)
    loss.backward()
    assert torch.equal(zz.detach(), keep), "inplace=False must leave the logits untouched"
    zi = z.clone().requires_grad_(True)
    loss_i, _ = grpo_fast.grpo_loss(zi, y, backend=backend.name, inplace=True, **kw)
    loss_i.backward()
    assert torch.equal(loss_i, loss)
    assert torch.equal(zi.grad, zz.grad), "inplace must give the same gradient, bit for bit"
    if backend.name != "torch":  # the eager reference may ignore inplace (nothing to fuse)
        assert zi.grad.data_ptr() == zi.data_ptr() and torch.equal(zi.detach(), zz.grad), \
            "with inplace=True the logits hold the gradient"
    check(backend, z, y, inplace=True, **kw)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("dtype,V", [(torch.float32, 53), (torch.bfloat16, 4104)], ids=["fp32-V53", "bf16-V4104"])
@pytest.mark.parametrize("level", LEVELS)
def test_strided_logits_and_grad_output(backend, level, dtype, V, inplace):
    """logits = a slice along T of a bigger tensor (model(...).logits[:, p-1:-1]: B/T strides free, read in
    place; the gradient buffer sits differently against 16-byte boundaries) and grad_output = 3.5. With
    inplace=True the gradient lands in that bigger buffer, around which nothing is touched."""
    thin(backend, not inplace, "copy only")
    B, T, P = 3, 5, 4
    z0, y, kw = case(backend, B, T, V, dtype, seed=24)
    big = case(backend, B, T + P, V, dtype, seed=23)[0]
    big[:, P - 1:-1] = z0  # (its −inf entries avoid the target ids)
    kw.update(loss_type="grpo", importance_sampling_level=level)
    if inplace:
        buf = big.clone()
        z = buf[:, P - 1:-1].requires_grad_()
    else:
        leaf = big.clone().requires_grad_()
        z = leaf[:, P - 1:-1]
    assert not z.is_contiguous()
    loss, met = grpo_fast.grpo_loss(z, y, backend=backend.name, inplace=inplace, **kw)
    (loss * 3.5).backward()
    if inplace:
        grad = z.grad
        if backend.name != "torch":
            assert torch.equal(buf[:, P - 1:-1], grad), "the gradient must land in the strided buffer"
        assert torch.equal(buf[:, : P - 1], big[:, : P - 1]) and torch.equal(buf[:, -1], big[:, -1])
    else:  # rows outside the slice get no gradient
        grad = leaf.grad[:, P - 1:-1]
        assert bool((leaf.grad[:, : P - 1] == 0).all()) and bool((leaf.grad[:, -1] == 0).all())
    compare(backend, (loss.detach(), {k: v.detach() for k, v in met.items()}, grad), z0, y, grad_scale=3.5, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_grad_output(backend, dtype):
    thin(backend, dtype == torch.bfloat16, "bf16 only")
    z, y, kw = case(backend, B=3, T=5, dtype=dtype, seed=22)
    check(backend, z, y, grad_scale=3.5, loss_type="bnpo", **kw)


def test_forward_only(backend):
    """Logits without requires_grad: nothing is written to them, the loss and metrics are the oracle's."""
    z, y, kw = case(backend, seed=101)
    keep = z.clone()
    loss, met = grpo_fast.grpo_loss(z, y, backend=backend.name, loss_type="cispo", epsilon_high=1.1, **kw)
    want, want_met = grpo_loss_reference(z.double(), y, loss_type="cispo", epsilon_high=1.1, **kw)
    assert torch.equal(z, keep)
    assert_close(loss, want, LOSS_ATOL, RTOL, "loss")
    assert_close(met["entropy"], want_met["entropy"], METRIC_ATOL, RTOL, "entropy")
    assert_close(met["cispo_clip_ratio"], want_met["cispo_clip_ratio"], 1.01 / float(kw["completion_mask"].sum()), 0.0,
                 "cispo_clip_ratio")


@pytest.mark.parametrize("level", LEVELS)
def test_deterministic(backend, level):
    """No float atomics: two runs give bitwise the same loss, metrics and gradient."""
    V = 131 if backend.id == "triton" and backend.slow else 1031  # the interpreter: a smaller vocabulary
    z, y, kw = case(backend, B=8, T=9, V=V, dtype=torch.bfloat16, seed=91, adv="group")
    outs = [run_backend(z, y, backend.name, loss_type="grpo", importance_sampling_level=level, **kw) for _ in range(2)]
    (l0, m0, g0), (l1, m1, g1) = outs
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)


# ---- token_logprobs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,V", [(torch.float32, 1), (torch.float32, 53), (torch.bfloat16, 53), (torch.float16, 53),
                                     (torch.float16, 4099), (torch.float32, 32001), (torch.bfloat16, 32001)],
                         ids=["fp32-V1", "fp32-V53", "bf16-V53", "fp16-V53", "fp16-V4099", "fp32-V32001", "bf16-V32001"])
def test_token_logprobs(backend, dtype, V):
    """Log-probs and entropy (float32) against float64 at two temperatures, with and without the entropy
    (the same log-probs, bitwise), contiguous and strided over B; −inf entries in row (0, 0)."""
    thin(backend, V != 32001 or dtype == torch.bfloat16, "one dtype at V = 32001")
    inp = make_inputs(3, 5, V, dtype, seed=111 + V, banned=V > 2)
    z, y = backend.put(inp["logits"]), backend.put(inp["ids"])
    strided = torch.cat([z, z[:, :2]], dim=1)[:, :5]
    for logits in (z, strided):
        for temp in (1.0, 0.7):
            logp, ent = grpo_fast.token_logprobs(logits, y, temp, return_entropy=True, backend=backend.name)
            want_lp, want_ent = token_logprobs_reference(logits.double(), y, temp, return_entropy=True)
            assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and logp.shape == y.shape
            assert bool((logp <= 0).all()), "a log-probability above 0"
            if V == 1:
                assert bool((logp == 0).all()) and bool((ent == 0).all())
            assert_close(logp, want_lp, 2e-6, RTOL, f"logp T={temp}")
            assert_close(ent, want_ent, 2e-6, RTOL, f"entropy T={temp}")
            assert torch.equal(grpo_fast.token_logprobs(logits, y, temp, backend=backend.name), logp)


def test_entropy_of_peaked_rows(backend):
    """One dominant logit (late-training policies): entropy ~1e-3 next to logits ~25. The kernels keep
    Σ p·(x − max) instead of lse − Σ p·x, so they do not lose the digits float32 eager code does."""
    if backend.name == "torch":
        pytest.skip("the eager float32 reference loses these digits (lse − Σ p·x); the kernels must not")
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 4099, generator=g) * 2
    z[..., 11] += 25.0
    y = torch.randint(0, 4099, (3, 4), generator=g)
    z, y = backend.put(z), backend.put(y)
    _, ent = grpo_fast.token_logprobs(z, y, return_entropy=True, backend=backend.name)
    _, want = token_logprobs_reference(z.double(), y, return_entropy=True)
    assert float(want.max()) < 1e-2
    assert_close(ent, want, 2e-7, 1e-3, "entropy of peaked rows")
