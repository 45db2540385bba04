"""``loss_scale``: the factor the caller multiplies the returned loss by before backward, folded into the
gradient the fused kernels write in the forward pass (grpo_fast/_autograd.py).

Every backend, the fused-linear path and packed rows give the gradient of the scale-free loss times
grad_output (the float64 oracle's), for grad_output equal to loss_scale (no pass in backward) and
different from it (one correcting pass); the returned loss is the unscaled one. The device-side
correction kernel (grpo_fast/kernels/scale.py) runs in Triton's interpreter here.
"""
from __future__ import annotations

import pytest
import torch

import grpo_fast
from grpo_fast import _autograd as _ag
from grpo_fast.backends import unavailable_reason

from helpers import assert_close_scaled
from test_backends import LOSS_ATOL, RTOL, case, compare, thin

# (loss_scale, grad_output): equal (TRL's 1/GA, a non-dyadic 1/3, a world size) and different
CASES = [pytest.param(0.25, 0.25, id="s=go=1/4"), pytest.param(1 / 3, 1 / 3, id="s=go=1/3"),
         pytest.param(4.0, 4.0, id="s=go=4"), pytest.param(0.25, -1.5, id="s=1/4,go=-1.5"),
         pytest.param(3.0, 1.0, id="s=3,go=1")]
CPU_OK = unavailable_reason("cpu", torch.device("cpu")) is None


def _run(backend, z, y, loss_scale, grad_output, inplace=False, **kw):
    zz = z.detach().clone().requires_grad_()
    loss, met = grpo_fast.grpo_loss(zz, y, backend=backend.name, inplace=inplace, loss_scale=loss_scale, **kw)
    (loss * grad_output).backward()
    return loss.detach(), {k: v.detach() for k, v in met.items()}, zz.grad


@pytest.mark.parametrize("loss_scale, grad_output", CASES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradient_is_the_scale_free_one_times_grad_output(backend, level, loss_scale, grad_output):
    thin(backend, level == "token" and loss_scale in (0.25, 1 / 3), "token level, two scales")
    z, y, kw = case(backend, seed=31)
    kw = dict(kw, importance_sampling_level=level)
    got = _run(backend, z, y, loss_scale, grad_output, **kw)
    compare(backend, got, z, y, grad_scale=grad_output, **kw)


@pytest.mark.parametrize("inplace", [False, True])
def test_low_precision_and_inplace(backend, inplace):
    thin(backend, inplace, "inplace only")
    z, y, kw = case(backend, dtype=torch.bfloat16, seed=32)
    for s, go in ((0.125, 0.125), (0.125, 2.0)):
        got = _run(backend, z, y, s, go, inplace=inplace, **kw)
        compare(backend, got, z, y, grad_scale=go, **kw)


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
@pytest.mark.parametrize("loss_scale", [0.25, 1 / 3, 1 / 7, 1024.0])
def test_backward_moves_no_data_when_grad_output_is_the_scale(loss_scale, monkeypatch):
    """On CPU the factor is read for free: exactly 1 (no multiply) when grad_output == loss_scale, for
    any float scale (the scale is rounded to float32 like the grad_output of ``loss * loss_scale``)."""
    factors = []
    real = _ag.grad_factor

    def spy(g, s=1.0):
        factors.append(real(g, s))
        return factors[-1]

    monkeypatch.setattr(_ag, "grad_factor", spy)
    z, y, kw = case(type("B", (), {"put": staticmethod(lambda x: x)}), seed=33)
    zz = z.clone().requires_grad_()
    loss, _ = grpo_fast.grpo_loss(zz, y, backend="cpu", inplace=True, loss_scale=loss_scale, **kw)
    (loss * loss_scale).backward()
    assert factors == [None]
    assert zz.grad.data_ptr() == zz.data_ptr(), "the gradient was not the in-place buffer handed out"
    (loss2 := grpo_fast.grpo_loss(z.clone().requires_grad_(), y, backend="cpu", loss_scale=loss_scale, **kw)[0])
    (loss2 * 2.0).backward()
    assert factors[-1] is not None and float(factors[-1]) == pytest.approx(2.0 / loss_scale, rel=1e-6)


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
def test_loss_value_and_metrics_are_unscaled():
    z, y, kw = case(type("B", (), {"put": staticmethod(lambda x: x)}), seed=34)
    base, met = grpo_fast.grpo_loss(z, y, backend="cpu", **kw)
    for s in (0.25, 1 / 3, 1e-3, 37.0, -2.0):
        loss, met_s = grpo_fast.grpo_loss(z, y, backend="cpu", loss_scale=s, **kw)
        if s in (0.25, -2.0):  # a power of two: exact
            assert torch.equal(loss, base)
        torch.testing.assert_close(loss, base, rtol=4 * RTOL / 10, atol=LOSS_ATOL)
        assert met_s.keys() == met.keys() and all(torch.equal(met_s[k], met[k]) for k in met)


@pytest.mark.parametrize("bad, err, match", [
    (0.0, ValueError, "loss_scale must be nonzero"), (float("nan"), ValueError, "loss_scale must be finite"),
    (1e39, ValueError, "loss_scale must be finite as a float32"), (True, TypeError, "loss_scale must be a real"),
    ("2", TypeError, "loss_scale must be a real")])
def test_bad_loss_scale_is_named(bad, err, match):
    z = torch.randn(2, 3, 5)
    with pytest.raises(err, match=match):
        grpo_fast.grpo_loss(z, torch.zeros(2, 3, dtype=torch.long), torch.ones(2), loss_scale=bad)
    with pytest.raises(err, match=match):
        grpo_fast.fused_linear_grpo_loss(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long),
                                         torch.ones(2), loss_scale=bad)


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
@pytest.mark.parametrize("loss_scale, grad_output", [(0.25, 0.25), (1 / 3, -2.0)])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear(level, loss_scale, grad_output):
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 4, 6, 16, 53
    h, w, b = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    kw = dict(rewards=torch.rand(B, generator=g), group_size=2, completion_mask=mask, beta=0.04,
              ref_logp=-torch.rand(B, T, generator=g) * 3, importance_sampling_level=level, loss_type="dapo")
    want = []
    for args in ((1.0, "torch", None), (loss_scale, "cpu", 5), (loss_scale, "cpu", T)):  # chunks: one per row / pre-pass
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        loss, _ = grpo_fast.fused_linear_grpo_loss(hh, ww, ids, bias=bb, loss_scale=args[0], backend=args[1],
                                                   chunk_size=args[2], **kw)
        (loss * grad_output).backward()
        got = (loss.detach(), hh.grad, ww.grad, bb.grad)
        if not want:
            want = got
            continue
        torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=LOSS_ATOL)
        for name, a, e in zip(("dhidden", "dweight", "dbias"), got[1:], want[1:]):
            assert_close_scaled(a, e.double(), 2 * RTOL, name)


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
def test_packed_rows():
    g = torch.Generator().manual_seed(6)
    cu = torch.tensor([0, 3, 8, 10])
    N, V = 10, 29
    z = torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    kw = dict(cu_seqlens=cu, advantages=torch.randn(3, generator=g), loss_type="dapo")
    grads = []
    for s, go in ((1.0, 0.5), (0.5, 0.5), (0.25, 0.5)):
        zz = z.clone().requires_grad_()
        loss, _ = grpo_fast.grpo_loss(zz, y, backend="cpu", loss_scale=s, **kw)
        (loss * go).backward()
        grads.append(zz.grad)
    for g_ in grads[1:]:
        assert_close_scaled(g_, grads[0].double(), RTOL, "packed grad")


# ---- the device-side correction kernel (Triton's interpreter on CPU tensors here) ---------------------
def _launcher():
    launch = _ag._scale_launcher()
    if launch is None:
        pytest.skip("Triton is not installed")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scale_kernel_contiguous(dtype, monkeypatch):
    launch = _launcher()
    monkeypatch.setattr(_ag, "_SCALE_BLOCK", 64)  # several programs and a ragged tail
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    x = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(7)).to(dev, dtype)
    for f in (1.0, 0.3, -2.5):
        factor = torch.tensor(f, dtype=torch.float32, device=dev)
        y = x.clone()
        launch(y, factor)
        assert torch.equal(y, (x.float() * factor).to(dtype)), f


def test_scale_kernel_strided_view_touches_only_the_view(monkeypatch):
    launch = _launcher()
    monkeypatch.setattr(_ag, "_SCALE_BLOCK", 16)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    base = torch.randn(4, 6, 40, generator=torch.Generator().manual_seed(8)).to(dev)
    keep = base.clone()
    view = base[1::2, ::3, 3:30]  # B/T strides, an offset, stride(-1) == 1
    launch(view, torch.tensor(0.5, device=dev))
    want = keep.clone()
    want[1::2, ::3, 3:30] *= 0.5
    assert torch.equal(base, want)
    launch(view, torch.tensor(1.0, device=dev))
    assert torch.equal(base, want)
