"""The backend registry (grpo_fast/backends/__init__.py): records, lookup, "auto" and availability.

Fast: nothing here runs a kernel. The kernels themselves are tests/test_backends.py's.
"""
import types

import pytest
import torch

import grpo_fast
from grpo_fast import backends
from grpo_fast._config import BACKENDS

CPU = torch.device("cpu")


def test_registry_names_are_the_validated_backend_names():
    assert set(backends.REGISTRY) | {"auto"} == set(BACKENDS)
    for name, b in backends.REGISTRY.items():
        assert b.name == name and backends.get(name) is b


def test_unknown_name_is_a_value_error_listing_the_backends():
    with pytest.raises(ValueError, match=r"no backend called 'tpu'.*'cpu'.*'torch'"):
        backends.get("tpu")
    with pytest.raises(ValueError, match="no backend called 'auto'"):  # "auto" is resolved, not a backend
        backends.get("auto")


def test_only_the_eager_reference_is_differentiated_by_autograd():
    assert [n for n, b in backends.REGISTRY.items() if b.autograd] == ["torch"]
    torch_b = backends.get("torch")
    assert torch_b.device_types is None and torch_b.unavailable_reason(torch.device("meta")) is None


def test_resolve_auto_follows_the_order_and_ends_at_torch():
    for dev_type, order in backends.AUTO_ORDER.items():
        want = next(n for n in order if backends.unavailable_reason(n, torch.device(dev_type)) is None)
        assert backends.resolve("auto", torch.device(dev_type)).name == want
        assert backends.resolve_name("auto", dev_type) == want
    assert backends.resolve("auto", torch.device("meta")).name == "torch"  # no kernels for other device types
    assert backends.get("torch") in backends.available(CPU)
    assert all(b.unavailable_reason(CPU) is None for b in backends.available(CPU))


def _fake_module(**missing):
    entry = {f: (lambda *a: None) for f in backends.ENTRY_POINTS if f not in missing}
    return types.SimpleNamespace(DEVICE_TYPES=("cpu",), unavailable_reason=lambda: None, **entry)


def test_explicit_backend_on_the_wrong_device_says_why(monkeypatch):
    monkeypatch.setitem(backends.REGISTRY, "cpu", backends.Backend("cpu", _fake_module()))
    with pytest.raises(RuntimeError, match=r'backend="cpu" is not available: .*cpu tensors, got tensors on meta'):
        backends.resolve("cpu", torch.device("meta"))


def test_a_module_lacking_an_entry_point_is_unavailable_naming_it(monkeypatch):
    monkeypatch.setitem(backends.REGISTRY, "cuda", backends.Backend("cuda", _fake_module(logprobs_backward=True)))
    why = backends.unavailable_reason("cuda", CPU)
    assert why is not None and "logprobs_backward" in why
    with pytest.raises(RuntimeError, match='backend="cuda" is not available.*logprobs_backward'):
        grpo_fast.logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="cuda")


def test_calls_go_through_the_record_to_the_module(monkeypatch):
    """A registry entry replaced (as the emulated CUDA build is installed) is what the public functions call."""
    calls = []
    fake = _fake_module()
    fake.token_logprobs = lambda z, y, tau, ent: (calls.append(tau) or torch.zeros(y.shape), None)
    monkeypatch.setitem(backends.REGISTRY, "cuda", backends.Backend("cuda", fake))
    out = grpo_fast.token_logprobs(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), 0.5, backend="cuda")
    assert calls == [0.5] and out.shape == (1, 3)


def test_describe_backends_lists_every_backend():
    text = grpo_fast.describe_backends()
    for name in backends.REGISTRY:
        assert f"  {name} " in text
    assert "torch   available" in text
