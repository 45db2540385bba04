"""No host sync in the hot path of grpo_loss on accelerator tensors (docs/spec.md, "Host syncs").

Without a GPU the path is exercised on CPU tensors that validation is told to treat as accelerator
tensors (``_host_check`` sees a non-CPU device), while every way of reading a tensor on the host
(``bool``, ``int``, ``float``, ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``) raises: the
forward with the checks in "device" or "off" mode, and the backward with its factor kept as a tensor
(as grad_factor keeps it off the CPU; the device-side scale kernel is tested in test_loss_scale.py)
read nothing. With a GPU, torch's sync debug mode checks the real thing.
"""
from __future__ import annotations

import pytest
import torch

import grpo_fast
from grpo_fast import _autograd as _ag
from grpo_fast import validation
from grpo_fast.backends import unavailable_reason

CPU_OK = unavailable_reason("cpu", torch.device("cpu")) is None
_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy")


def _inputs(V=11, bad=None):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, V, generator=g)
    ids = torch.randint(0, V, (2, 3), generator=g)
    kw = dict(advantages=torch.randn(2, generator=g), completion_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]),
              old_logp=-torch.rand(2, 3, generator=g), beta=0.04, ref_logp=-torch.rand(2, 3, generator=g))
    if bad == "ids":
        ids[1, 0] = V
    elif bad == "advantages":
        kw["advantages"][0] = float("nan")
    elif bad == "completion_mask":
        kw["completion_mask"] = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    return z, ids, kw


@pytest.fixture
def as_accelerator(monkeypatch):
    """validation treats every tensor as an accelerator tensor (its CPU shortcut is off)."""
    real = validation._host_check

    class _Dev:
        type = "accel"

    class _View:
        def __init__(self, t):
            self.device = _Dev()

    monkeypatch.setattr(validation, "_host_check", lambda t, ok, msg: real(_View(t), ok, msg))


@pytest.fixture
def no_host_reads(monkeypatch):
    """Arm with ``no_host_reads()``: from then on a host read of any tensor raises."""
    def arm():
        def fail(self, *a, **k):
            raise AssertionError("a host read of a tensor (a device sync on an accelerator)")

        for name in _READS:
            monkeypatch.setattr(torch.Tensor, name, fail)

    return arm


@pytest.fixture
def mode():
    prev = validation._VALUE_CHECKS[0]
    yield validation.set_value_checks
    validation.set_value_checks(prev)


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
@pytest.mark.parametrize("checks", ["device", "off", pytest.param("sync", marks=pytest.mark.xfail(
    raises=AssertionError, strict=True, reason="the named checks read the data: the spy must see it"))])
def test_forward_and_backward_read_nothing_on_the_host(checks, as_accelerator, no_host_reads, mode, monkeypatch):
    mode(checks)
    z, ids, kw = _inputs()
    want = z.clone().requires_grad_()
    (grpo_fast.grpo_loss(want, ids, backend="cpu", **kw)[0] * 0.25).backward()
    # the backward's factor as on an accelerator: it stays a tensor (grad_factor reads it on CPU only)
    factors = []
    monkeypatch.setattr(_ag, "grad_factor", lambda g, s=1.0: factors.append(g.detach().to(torch.float32) / s)
                        or factors[-1])
    zz = z.clone().requires_grad_()
    no_host_reads()
    loss, metrics = grpo_fast.grpo_loss(zz, ids, backend="cpu", loss_scale=0.25, **kw)
    (loss * 0.25).backward()
    monkeypatch.undo()
    assert len(factors) == 1 and float(factors[0]) == 1.0
    torch.testing.assert_close(zz.grad, want.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", ["ids", "advantages", "completion_mask"])
def test_sync_mode_and_cpu_tensors_keep_the_named_error(bad, mode):
    z, ids, kw = _inputs(bad=bad)
    for checks in ("sync", "device", "off"):  # CPU tensors: the named error in every mode
        mode(checks)
        with pytest.raises(ValueError, match=bad):
            grpo_fast.grpo_loss(z, ids, backend="torch", **kw)


@pytest.mark.parametrize("bad", ["ids", "advantages", "completion_mask"])
def test_device_mode_asserts_on_the_device(bad, as_accelerator, mode):
    """Mode "device": torch._assert_async with the argument's name (on CPU it raises at once; on CUDA
    it is a device-side assert), mode "off": nothing checked."""
    z, ids, kw = _inputs(bad=bad)
    mode("device")
    with pytest.raises(RuntimeError, match=bad):
        grpo_fast.grpo_loss(z, ids, backend="torch", **kw)
    mode("off")
    if bad != "ids":  # out-of-range ids would index out of bounds
        grpo_fast.grpo_loss(z, ids, backend="torch", **kw)


def test_bad_mode_is_named(mode):
    with pytest.raises(ValueError, match="value checks mode must be one of"):
        mode("async")
    validation._VALUE_CHECKS[0] = "fast"  # as a bad GRPO_FAST_VALUE_CHECKS leaves it (the fixture restores it)
    with pytest.raises(ValueError, match="GRPO_FAST_VALUE_CHECKS must be one of"):
        grpo_fast.grpo_loss(*_inputs()[:2], **_inputs()[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_sync_on_cuda(backend, mode):
    if unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(f"{backend} unavailable")
    mode("device")
    z, ids, kw = _inputs(V=1000)
    dev = torch.device("cuda")
    z, ids = z.to(dev).requires_grad_(), ids.to(dev)
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    grpo_fast.grpo_loss(z, ids, backend=backend, loss_scale=0.5, **kw)[0].mul(0.5).backward()  # warm up
    z.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = grpo_fast.grpo_loss(z, ids, backend=backend, loss_scale=0.5, **kw)
        (loss * 0.5).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert z.grad is not None
