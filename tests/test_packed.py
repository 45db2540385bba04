"""Packed rows (issue 12, item 2): (N, V) logits with cu_seqlens give the loss, metrics and logits
gradient of the same batch padded to (S, T_max, V) with a completion mask, on every backend, every
loss type, both importance-sampling levels, rewards + group_size and advantages; bad cu_seqlens and
per-sequence tensors of the wrong length are named before any kernel runs."""
import zlib

import pytest
import torch

import grpo_fast
from grpo_fast._config import LOSS_TABLE
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference, token_logprobs_reference
from helpers import assert_close, assert_close_scaled

V = 37
LENS = [3, 5, 1, 4, 6, 2]  # S = 6 sequences, groups of G = 2 or 3
RTOL = 1e-5

BACKENDS = [b for b in ("torch", "cpu", "triton") if unavailable_reason(b, torch.device("cpu")) is None] + ["cuda-emulated"]


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name != "cuda-emulated":
        return name
    from backends_fixture import install_emulated_cuda  # the emulated_ext fixture is tests/backends_fixture.py's

    install_emulated_cuda(monkeypatch, request.getfixturevalue("emulated_ext"))
    return "cuda"


def _batch(seed=0, adv="rewards", isr=None, inner_mask=True):
    """One random batch in both layouts: padded (S, T, V) + mask and packed (N, V) + cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    S, T, N = len(LENS), max(LENS), sum(LENS)
    cu = torch.tensor([0] + LENS).cumsum(0)
    row = torch.repeat_interleave(torch.arange(S), torch.tensor(LENS))
    col = torch.arange(N) - cu[:-1][row]
    zp = torch.randn(S, T, V, generator=g) * 2.0
    yp = torch.randint(0, V, (S, T), generator=g)
    lp = token_logprobs_reference(zp.double(), yp).float()
    old = lp + torch.randn(S, T, generator=g) * 0.3
    ref = lp + torch.randn(S, T, generator=g) * 0.3
    mask = (torch.arange(T)[None, :] < torch.tensor(LENS)[:, None]).float()
    if inner_mask:  # a masked token inside a valid sequence (tool output), a fully masked sequence
        mask[1, 2] = 0.0
        mask[3, :] = 0.0
    zp = zp.masked_fill(~(torch.arange(T)[None, :] < torch.tensor(LENS)[:, None])[..., None], 0.0)
    per_tok = lambda x: x[row, col]  # noqa: E731
    padded = dict(logits=zp, completion_ids=yp, old_logp=old, ref_logp=ref, completion_mask=mask)
    packed = dict(logits=per_tok(zp), completion_ids=per_tok(yp), old_logp=per_tok(old), ref_logp=per_tok(ref),
                  completion_mask=per_tok(mask), cu_seqlens=cu)
    if adv == "rewards":
        r = torch.randn(S, generator=g)
        padded["rewards"] = packed["rewards"] = r
    elif adv == "rows":
        a = torch.randn(S, generator=g)
        padded["advantages"] = packed["advantages"] = a
    else:  # per token
        a = torch.randn(S, T, generator=g)
        padded["advantages"], packed["advantages"] = a, per_tok(a)
    if isr == "rows":
        w = torch.rand(S, generator=g) + 0.5
        padded["importance_sampling_ratio"] = packed["importance_sampling_ratio"] = w
    elif isr == "tokens":
        w = torch.rand(S, T, generator=g) + 0.5
        padded["importance_sampling_ratio"], packed["importance_sampling_ratio"] = w, per_tok(w)
    return padded, packed, (row, col)


def _run(kw, backend, **opts):
    kw = dict(kw)
    z = kw.pop("logits").clone().requires_grad_(True)
    loss, metrics = grpo_fast.grpo_loss(z, backend=backend, **kw, **opts)
    loss.backward()
    return loss.detach(), metrics, z.grad


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", list(LOSS_TABLE))
def test_packed_equals_padded(backend, level, loss_type):
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon_high=0.28)
    if loss_type == "cispo":
        opts["epsilon_high"] = 1.2
    for adv, isr, extra in (("rewards", "rows", {}), ("tokens", "tokens", {}), ("rows", None, {})):
        padded, packed, (row, col) = _batch(seed=zlib.crc32(f"{loss_type}{level}{adv}".encode()) % 1000, adv=adv, isr=isr)
        if adv == "rewards":
            extra = dict(group_size=2 if loss_type != "sapo" else 3)
        if LOSS_TABLE[loss_type].uses_num_items and adv == "rows":
            extra["num_items_in_batch"] = 40
        if loss_type == "dr_grpo" and adv == "tokens":
            extra["max_completion_length"] = 9
        # The oracle: the padded batch in float64 through the reference.
        zd = padded["logits"].double().requires_grad_(True)
        ref_kw = {k: v for k, v in padded.items() if k != "logits"}
        want, want_m = grpo_loss_reference(zd, **ref_kw, **opts, **extra)
        want.backward()
        want = want.detach()
        loss_p, m_p, g_p = _run(packed, backend, **opts, **extra)
        what = f"{backend} {loss_type} {level} {adv}"
        assert_close(loss_p, want, RTOL * max(abs(float(want)), 1e-3), RTOL, f"loss {what}")
        assert set(m_p) == set(want_m), what
        for name in want_m:
            assert_close(m_p[name], want_m[name], 1e-5, 1e-5, f"metric {name} {what}")
        assert_close_scaled(g_p, zd.grad[row, col], RTOL, f"grad {what}")
        # and the same backend on the padded layout agrees (the rows of padding excluded)
        loss_b, m_b, g_b = _run(padded, backend, **opts, **extra)
        assert_close(loss_p, loss_b, 2e-6 * max(abs(float(want)), 1e-3), 1e-5, f"packed vs padded loss {what}")
        assert_close_scaled(g_p, g_b[row, col], 1e-5, f"packed vs padded grad {what}")


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
def test_packed_shapes(backend):
    """(1, N, V) logits and (1, N) per-token tensors are accepted as (N, V) / (N,)."""
    padded, packed, _ = _batch(adv="tokens")
    a = _run(packed, backend)
    packed1 = {k: (v.unsqueeze(0) if k != "cu_seqlens" else v) for k, v in packed.items()}
    b = _run(packed1, backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2][0])


def _call(packed, **over):
    kw = dict(packed)
    kw.update(over)
    kw = {k: v for k, v in kw.items() if v is not None}
    return grpo_fast.grpo_loss(kw.pop("logits"), backend="cpu", **kw, group_size=2 if "rewards" in kw else None)


@pytest.mark.parametrize("over, err, words", [
    (dict(cu_seqlens=torch.tensor([1, 4, 21])), ValueError, ["cu_seqlens", "start at 0"]),
    (dict(cu_seqlens=torch.tensor([0, 4, 4, 21])), ValueError, ["cu_seqlens", "increasing"]),
    (dict(cu_seqlens=torch.tensor([0, 9, 4, 21])), ValueError, ["cu_seqlens", "increasing"]),
    (dict(cu_seqlens=torch.tensor([0, 4, 20])), ValueError, ["cu_seqlens", "N = 21"]),
    (dict(cu_seqlens=torch.tensor([0.0, 4.0, 21.0])), TypeError, ["cu_seqlens", "int32 or int64"]),
    (dict(cu_seqlens=torch.tensor([[0, 21]])), ValueError, ["cu_seqlens", "(S + 1,)"]),
    (dict(cu_seqlens=[0, 21]), TypeError, ["cu_seqlens", "Tensor"]),
    (dict(rewards=torch.zeros(5)), ValueError, ["rewards", "(6,)"]),
    (dict(rewards=None, advantages=torch.zeros(7)), ValueError, ["advantages", "(21,)", "(6,)"]),
    (dict(importance_sampling_ratio=torch.ones(4)), ValueError, ["importance_sampling_ratio", "(6,)"]),
    (dict(old_logp=torch.zeros(6)), ValueError, ["old_logp", "(21,)"]),
    (dict(completion_mask=torch.ones(20)), ValueError, ["completion_mask", "(21,)"]),
    (dict(completion_ids=torch.zeros(20, dtype=torch.long)), ValueError, ["completion_ids", "(21,)"]),
    (dict(completion_ids=torch.zeros(21)), TypeError, ["completion_ids", "int64 or int32"]),
])
def test_packed_bad_input(over, err, words, monkeypatch):
    _, packed, _ = _batch()
    from grpo_fast.backends import cpu

    monkeypatch.setattr(cpu, "fused_loss", lambda *a: pytest.fail("a kernel ran"))
    with pytest.raises(err) as e:
        _call(packed, **over)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_packed_batch_logits_refused():
    """A (B, T, V) batch other than (1, N, V) with cu_seqlens is a ValueError naming logits."""
    padded, packed, _ = _batch()
    with pytest.raises(ValueError, match="logits must have shape \\(N, V\\) or \\(1, N, V\\)"):
        grpo_fast.grpo_loss(padded["logits"], packed["completion_ids"], rewards=packed["rewards"], group_size=2,
                            cu_seqlens=packed["cu_seqlens"])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"])
def test_packed_fused_linear_equals_padded(backend, level, loss_type):
    """fused_linear_grpo_loss on (N, H) hidden with cu_seqlens: loss, metrics and the hidden /
    weight / bias gradients of the padded batch (float64 oracle), chunks cutting across sequences."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{loss_type}{level}".encode()) % 1000)
    padded, packed, (row, col) = _batch(seed=3, adv="rewards", isr="rows")
    S, T, H = len(LENS), max(LENS), 16
    hp = torch.randn(S, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.1
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, group_size=2,
                epsilon_high=1.2 if loss_type == "cispo" else 0.28)
    hd, Wd, bd = (t.double().requires_grad_(True) for t in (hp, W, b))
    ref_kw = {k: v for k, v in padded.items() if k != "logits"}
    want, want_m = grpo_loss_reference(hd @ Wd.T + bd, **ref_kw, **opts)
    want.backward()
    h = hp[row, col].clone().requires_grad_(True)
    W1, b1 = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    kw = {k: v for k, v in packed.items() if k != "logits"}
    loss, m = grpo_fast.fused_linear_grpo_loss(h, W1, kw.pop("completion_ids"), bias=b1, chunk_size=5,
                                               backend=backend, **kw, **opts)
    loss.backward()
    what = f"{backend} {loss_type} {level}"
    assert_close(loss, want.detach(), RTOL * max(abs(float(want.detach())), 1e-3), RTOL, f"loss {what}")
    for name in want_m:
        assert_close(m[name], want_m[name], 1e-5, 1e-5, f"metric {name} {what}")
    assert_close_scaled(h.grad, hd.grad[row, col], 1e-5, f"grad hidden {what}")
    assert_close_scaled(W1.grad, Wd.grad, 1e-5, f"grad weight {what}")
    assert_close_scaled(b1.grad, bd.grad, 1e-5, f"grad bias {what}")


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
def test_logprobs_accept_cu_seqlens(backend):
    """logprobs / fused_linear_logprobs take cu_seqlens: checked, per-token results unchanged, and a
    per-sequence (S,) temperature is spread over each sequence's tokens."""
    _, packed, (row, _) = _batch()
    z, y, cu = packed["logits"], packed["completion_ids"], packed["cu_seqlens"]
    tau = torch.rand(len(LENS)) + 0.5
    a, _ = grpo_fast.logprobs(z, y, temperature=tau, cu_seqlens=cu, backend=backend)
    b, _ = grpo_fast.logprobs(z, y, temperature=tau[row], backend=backend)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        grpo_fast.logprobs(z, y, cu_seqlens=torch.tensor([0, 3]), backend=backend)
    with pytest.raises(ValueError, match="logits must have shape"):
        grpo_fast.logprobs(z.view(3, 7, V), y.view(3, 7), cu_seqlens=cu, backend=backend)
    h, W = torch.randn(z.shape[0], 8), torch.randn(V, 8)
    a, _ = grpo_fast.fused_linear_logprobs(h, W, y, temperature=tau, cu_seqlens=cu, backend=backend)
    b, _ = grpo_fast.fused_linear_logprobs(h, W, y, temperature=tau[row], backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_nan_in_masked_token(backend, level):
    """Item 3 on packed rows: a NaN in a masked token's logits (completion_mask 0 inside a sequence,
    a fully masked sequence) leaves the loss, metrics and other gradients unchanged; its gradient is 0."""
    _, packed, _ = _batch(adv="rows")
    opts = dict(loss_type="grpo", importance_sampling_level=level, beta=0.04)
    want = _run(packed, backend, **opts)
    bad = dict(packed)
    z = packed["logits"].clone()
    masked = packed["completion_mask"] == 0
    z[masked] = float("nan")
    bad["logits"] = z
    got = _run(bad, backend, **opts)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name
    assert torch.equal(got[2], want[2]) and bool((got[2][masked] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_temperature_tensor(backend, level, loss_type):
    """Issue 12 item 4: grpo_loss takes a temperature tensor, (B,) per row or (B, T) per token (packed:
    (S,) or (N,)): the loss, metrics and gradient of the float64 reference on logits / τ."""
    padded, packed, (row, col) = _batch(seed=5, adv="rewards", isr="rows")
    S, T = len(LENS), max(LENS)
    g = torch.Generator().manual_seed(11)
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, group_size=2,
                epsilon_high=1.2 if loss_type == "cispo" else 0.28)
    for tau in (torch.rand(S, generator=g) + 0.5, torch.rand(S, T, generator=g) + 0.5):
        tau_bt = tau[:, None].expand(S, T) if tau.dim() == 1 else tau
        zd = padded["logits"].double().requires_grad_(True)
        ref_kw = {k: v for k, v in padded.items() if k != "logits"}
        want, want_m = grpo_loss_reference(zd / tau_bt[..., None].double(), **ref_kw, **opts)
        want.backward()
        want = want.detach()
        what = f"{backend} {loss_type} {level} tau{tuple(tau.shape)}"
        for kw, pick in ((padded, lambda x: x[row, col]), (packed, lambda x: x)):
            t = tau if kw is padded else (tau if tau.dim() == 1 else tau[row, col])
            loss, m, grad = _run(kw, backend, temperature=t, **opts)
            assert_close(loss, want, RTOL * max(abs(float(want)), 1e-3), RTOL, f"loss {what}")
            for name in want_m:
                assert_close(m[name], want_m[name], 1e-5, 1e-5, f"metric {name} {what}")
            assert_close_scaled(pick(grad), zd.grad[row, col], RTOL, f"grad {what}")


def test_temperature_tensor_bad_input():
    padded, packed, _ = _batch(adv="rows")
    kw = {k: v for k, v in padded.items() if k != "logits"}
    with pytest.raises(ValueError, match="temperature must be a float or a tensor of shape"):
        grpo_fast.grpo_loss(padded["logits"], temperature=torch.ones(5), backend="torch", **kw)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        grpo_fast.grpo_loss(padded["logits"], temperature=torch.zeros(6), backend="torch", **kw)
    kw = {k: v for k, v in packed.items() if k != "logits"}
    with pytest.raises(ValueError, match="temperature must be a float or a tensor of shape \\(21,\\)"):
        grpo_fast.grpo_loss(packed["logits"], temperature=torch.ones(5), backend="torch", **kw)
