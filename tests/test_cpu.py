"""What is specific to the CPU C++ backend (grpo_fast._C_cpu).

The conformance matrix against the float64 reference (every loss type × level × KL estimator × dtype,
options, odd sizes, −inf/NaN logits, masks, inplace, strides, grad_output, token_logprobs) is
tests/test_backends.py, which runs on this backend too. Here: the vectorized exp, every
instruction-set path (AVX-512, AVX2, portable) through the suite's check, determinism across thread
counts and the huge-page-aligned gradient buffer.
"""
from __future__ import annotations

import math

import pytest
import torch

import grpo_fast
from grpo_fast.backends import cpu as cpu_backend

from backends_fixture import Backend
from helpers import DTYPE_IDS, make_inputs, run_backend
from test_backends import check

pytestmark = pytest.mark.skipif(
    cpu_backend.unavailable_reason() is not None, reason=str(cpu_backend.unavailable_reason())
)
_C = cpu_backend._C_cpu
CPU = Backend("cpu", "cpu", torch.device("cpu"), False)


# ---- kernels' internals: exp, instruction sets, determinism ----------------------------------------
@pytest.fixture(params=_C.supported_isas() if cpu_backend.unavailable_reason() is None else ["none"])
def isa(request):
    prev = _C.set_isa(request.param)
    yield request.param
    _C.set_isa(prev)


def test_vexp(isa):
    x = torch.cat([
        torch.linspace(-87.3, 0.0, 100003),
        torch.linspace(-5.0, 88.0, 1001),
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, -87.33, -87.34, -88.0, -100.0, -1e4, -float("inf"), float("nan")]),
    ])
    y = torch.empty_like(x)
    _C.vexp(x.data_ptr(), y.data_ptr(), x.numel())
    want = torch.exp(x.double())
    finite = torch.isfinite(want) & (want > 1.2e-38)  # normal range; below it the kernel flushes to 0
    rel = ((y.double() - want).abs() / want)[finite]
    # measured 8.2e-8 on every path (libm expf: 6.1e-8); a wrong polynomial coefficient shows up here
    assert float(rel.max()) < 1.2e-7, f"{isa}: max relative error {float(rel.max()):.3g}"
    assert float(y[x == -float("inf")]) == 0.0 and float(y[x == -1e4]) == 0.0 and float(y[x == -100.0]) == 0.0
    assert math.isnan(float(y[-1]))
    assert float(y[x == 0.0][0]) == 1.0


def test_bf16_stores_round_as_torch(isa):
    """The vector fp32 -> bf16 conversion of every gradient store equals torch's rounding bit for bit on each
    path: nearest even at the halfway cases, ±0, ±inf, NaN made quiet, and denormals (AVX512_BF16's
    instruction flushes those: its path sends a vector holding one down the integer conversion)."""
    g = torch.Generator().manual_seed(5)
    tiny = torch.finfo(torch.float32).tiny
    u = torch.randint(0, 2 ** 31 - 1, (4099,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([
        torch.randn(20000, generator=g) * torch.logspace(-40, 38, 20000, dtype=torch.float64).float(),
        u.view(torch.float32),  # random bit patterns: every exponent, NaNs and infs included
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), tiny, -tiny, tiny / 3, -tiny / 7, 1e-45,
                      1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, 3.3895314e38]),
    ])
    x[100] = tiny / 5  # a denormal inside an aligned vector of normal values
    y = torch.empty(x.numel(), dtype=torch.int16)
    _C.to_bf16(x.data_ptr(), y.data_ptr(), x.numel())
    want = x.to(torch.bfloat16).view(torch.int16)
    nan = torch.isnan(x)
    assert torch.equal(y[~nan], want[~nan]), f"{isa}: {int((y[~nan] != want[~nan]).sum())} values differ"
    # a NaN stays a NaN (quiet, sign and top payload kept), as torch's
    assert bool(torch.isnan(y[nan].view(torch.bfloat16).float()).all())
    assert torch.equal(y[nan] | 0x40, y[nan]) and torch.equal(y[nan] & ~0x40, (x[nan].view(torch.int32) >> 16).to(
        torch.int16) & ~0x40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_every_isa(isa, level, dtype):
    """Each instruction-set path (AVX-512, AVX2, portable) on a vocabulary with unrolled, single-vector and tail parts."""
    inp = make_inputs(3, 4, 16 * 5 + 7, dtype, seed=31)
    check(CPU, inp["logits"], inp["ids"], advantages=inp["advantages"], old_logp=inp["old_logp"],
          ref_logp=inp["ref_logp"], beta=0.04, completion_mask=inp["completion_mask"], importance_sampling_level=level,
          loss_type="grpo", temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("V", [16 * 12, 16 * 5 + 7], ids=["aligned-rows", "unaligned-rows"])
def test_streamed_gradient_rows_equal_plain_ones(isa, V, dtype):
    """A separate gradient buffer (inplace=False, the log-prob backward) is written with streaming stores
    where its rows are aligned, and padding rows with streaming zeros (row_kernels.h: put, stream_ok,
    row_zero); in place, plain stores. The values are the same: bitwise equal gradients on every path,
    with aligned rows (every row streamed) and unaligned ones (plain stores, zeros with unaligned ends)."""
    inp = make_inputs(3, 5, V, dtype, seed=17)
    kw = dict(advantages=inp["advantages"], old_logp=inp["old_logp"], completion_mask=inp["completion_mask"],
              loss_type="dapo", temperature=0.8)
    for entropy_coef in (0.0, 0.05):  # with the bonus: the row math of the log-prob backward, from the kept exps
        grads = []
        for inplace, backend in ((False, "cpu"), (True, "cpu"), (False, "torch")):
            z = inp["logits"].clone().requires_grad_()
            loss, _ = grpo_fast.grpo_loss(z, inp["ids"], backend=backend, inplace=inplace, entropy_coef=entropy_coef,
                                          **kw)
            loss.backward()
            grads.append(z.grad.clone())
        assert torch.equal(grads[0], grads[1])
        assert bool((grads[0][1] == 0).all())  # the fully masked row: zeros (streamed with inplace=False)
        torch.testing.assert_close(grads[0].float(), grads[2].float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-6)
    # the log-prob backward into its own buffer, a masked row's upstream gradients 0: against the torch backend
    m = inp["completion_mask"]
    outs = []
    for backend in ("cpu", "torch"):
        z = inp["logits"].clone().requires_grad_()
        lp, ent = grpo_fast.logprobs(z, inp["ids"], temperature=0.8, return_entropy=True, backend=backend)
        ((lp * m).sum() + 0.3 * (ent * m).sum()).backward()
        outs.append(z.grad.float())
    assert bool((outs[0][1] == 0).all())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_deterministic_across_threads(level, dtype):
    inp = make_inputs(8, 33, 301, dtype, seed=41)
    kw = dict(rewards=inp["rewards"], group_size=4, old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], beta=0.04,
              completion_mask=inp["completion_mask"], importance_sampling_level=level, loss_type="dapo")
    prev = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            loss, metrics, grad = run_backend(inp["logits"], inp["ids"], "cpu", **kw)
            logp = grpo_fast.token_logprobs(inp["logits"], inp["ids"], backend="cpu")
            out.append((loss, metrics, grad, logp))
    finally:
        torch.set_num_threads(prev)
    for loss, metrics, grad, logp in out[1:]:
        assert torch.equal(loss, out[0][0])
        assert all(torch.equal(metrics[k], out[0][1][k]) for k in metrics)
        assert torch.equal(grad, out[0][2])
        assert torch.equal(logp, out[0][3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_empty_grad_buffer_is_aligned_contiguous_and_usable(dtype):
    from grpo_fast.backends import cpu

    shape = (3, 7, 500_001)  # > 8 huge pages (16 MiB) in every dtype: the aligned, advised path
    g = cpu.empty_grad(shape, dtype)
    assert g.shape == shape and g.dtype == dtype and g.is_contiguous()
    if cpu._madvise is not None:
        assert g.data_ptr() % (2 << 20) == 0
    g.fill_(1.5)
    assert bool((g == 1.5).all())
    small = cpu.empty_grad((2, 3, 5), dtype)  # small buffers: plain torch.empty
    assert small.shape == (2, 3, 5) and small.is_contiguous()


# ---- gradient buffer reuse (backends/cpu.py, _GradCache) ------------------------------------------------
def _big_case(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, V = 2, 8, 270_000  # 17 MB of fp32: above the huge-page threshold, where the cache applies
    z = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    return z, y, dict(advantages=torch.randn(B, generator=g), loss_type="grpo")


def _grad(z, y, kw):
    zz = z.clone().requires_grad_()
    grpo_fast.grpo_loss(zz, y, backend="cpu", **kw)[0].backward()
    return zz.grad


def test_grad_buffer_is_reused_only_once_released(monkeypatch):
    from grpo_fast.backends import cpu

    if cpu._use_count is None:
        pytest.skip("this torch has no storage use count: the cache is off")
    monkeypatch.setattr(cpu, "GRAD_CACHE", cpu._GradCache(2))
    (z1, y1, kw1), (z2, y2, kw2) = _big_case(1), _big_case(2)
    want1, want2 = _grad(z1, y1, kw1).clone(), _grad(z2, y2, kw2).clone()
    g1 = _grad(z1, y1, kw1)
    ptr1 = g1.data_ptr()
    g2 = _grad(z2, y2, kw2)  # g1 alive: fresh memory, g1 untouched
    assert g2.data_ptr() != ptr1
    assert torch.equal(g1, want1) and torch.equal(g2, want2)
    view = g1[1]  # only a view of the first gradient survives: still referenced
    del g1
    g3 = _grad(z2, y2, kw2)
    assert g3.data_ptr() not in (ptr1, g2.data_ptr())
    assert torch.equal(view, want1[1]) and torch.equal(g2, want2) and torch.equal(g3, want2)
    del view, g3  # both released: reused, newest first
    g4 = _grad(z1, y1, kw1)
    assert torch.equal(g4, want1) and torch.equal(g2, want2)
    assert len(cpu.GRAD_CACHE._raws) <= 2, "the cache keeps at most `slots` buffers"
    del g4
    assert _grad(z1, y1, kw1).data_ptr() in {raw.data_ptr() + (-raw.data_ptr() % cpu._HUGE if cpu._madvise else 0)
                                             for raw, _ in cpu.GRAD_CACHE._raws}


def test_grad_cache_off_and_clear(monkeypatch):
    from grpo_fast.backends import cpu

    monkeypatch.setattr(cpu, "GRAD_CACHE", cpu._GradCache(0))
    z, y, kw = _big_case(3)
    a = _grad(z, y, kw)
    assert cpu.GRAD_CACHE._raws == []
    monkeypatch.setattr(cpu, "GRAD_CACHE", cpu._GradCache(1))
    b = _grad(z, y, kw)
    assert torch.equal(a, b) and len(cpu.GRAD_CACHE._raws) == (0 if cpu._use_count is None else 1)
    cpu.GRAD_CACHE.clear()
    assert cpu.GRAD_CACHE._raws == []


def test_isa_benchmarks_run_at_a_toy_size(tmp_path):
    """benchmarks/cpu_paths.py and the per-ISA providers of benchmarks/loss.py run and agree with eager
    (they must not rot between benchmark runs)."""
    from benchmarks import cpu_paths
    from benchmarks import loss as bench
    from grpo_fast import _C_cpu

    isas = _C_cpu.supported_isas()
    res = cpu_paths.run(shape=(2, 4, 64), dtypes=("fp32", "bf16"), rounds=1)
    assert res["isas"] == isas and all(v > 0 for ms in res["ms"].values() for v in ms.values())
    assert "x exp limit" in cpu_paths.report(res)
    assert _C_cpu.isa() == isas[0], "the benchmark left another instruction set selected"
    inputs = bench.make_inputs(bench.make_cases([(8, 4, 64)], ["fp32"])[0], torch.device("cpu"))
    want = bench.PROVIDERS["cpu"].build(inputs)(inputs["logits"])
    for isa in isas:
        prov = bench.PROVIDERS[f"cpu-{isa}"]
        assert prov.unavailable(torch.device("cpu")) is None
        got = prov.build(inputs)(inputs["logits"])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert _C_cpu.isa() == isas[0]
