"""The fused-linear GRPO loss against the float64 reference on full logits.

Oracle: logits = softcap((hidden·Wᵀ + b)·scale) built in float64 from the same (rounded) inputs, then
``grpo_loss_reference`` and autograd for the hidden, weight and bias gradients. Every backend with a
logits kernel that is available here runs the same table; chunk sizes that do not divide B·T (and
that split rows and groups) are used on purpose.

Tolerances: fp32 1e-5 relative to the largest reference value (the chunk GEMMs sum in another order
than the float64 oracle; measured errors are ≈1e-6). bf16: at most twice the error of the same
computation done by torch in bf16 (flash-attention's rule), see ``_assert_bf16``.
"""
import pytest
import torch

import grpo_fast
from grpo_fast import fused_linear as fl
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference, token_logprobs_reference

CPU = torch.device("cpu")
CPU_BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    unavailable_reason("cpu", CPU) is not None, reason=f"cpu backend unavailable: {unavailable_reason('cpu', CPU)}"))]
# Triton's interpreter runs the Triton kernels on CPU tensors when there is no GPU (tests/conftest.py
# sets TRITON_INTERPRET=1): slow, so only the per-loss-type table and the log-probs run it here.
_TRITON_CPU = unavailable_reason("triton", CPU)
INTERP_BACKENDS = CPU_BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(
    _TRITON_CPU is not None, reason=f"triton backend unavailable on CPU tensors: {_TRITON_CPU}"))]
HAS_CUDA = torch.cuda.is_available()
GPU_BACKENDS = [pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.skipif(
    not HAS_CUDA or unavailable_reason(b, torch.device("cuda")) is not None,
    reason=f"{b} backend needs a CUDA device ({'no CUDA' if not HAS_CUDA else unavailable_reason(b, torch.device('cuda'))})")])
    for b in ("triton", "cuda")]

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _case(B=4, T=7, H=16, V=53, seed=0, dtype=torch.float32, bias=True, device="cpu", w_scale=0.5):
    """Random hidden/weight/bias (never zeros), ids, mask with a fully masked row, side inputs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * w_scale
    b = torch.randn(V, generator=g) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    if B > 2:
        mask[1] = False  # a fully masked row
    # old / ref log-probs near the policy's own (ratios around 1, some clipped; KL of realistic size)
    logp = token_logprobs_reference(_logits(hidden.double(), weight.double(), None if b is None else b.double(), 1.0, None), ids)
    side = dict(
        rewards=torch.rand(B, generator=g),
        old=(logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2).float(),
        ref=(logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2).float(),
        adv_tok=torch.randn(B, T, generator=g),
        isr_row=torch.rand(B, generator=g) + 0.5,
        isr_tok=torch.rand(B, T, generator=g) + 0.5,
    )
    dev = torch.device(device)
    cast = lambda t: None if t is None else t.to(dev, dtype)  # noqa: E731
    side = {k: v.to(dev) for k, v in side.items()}
    return cast(hidden), cast(weight), cast(b), ids.to(dev), mask.to(dev), side


def _logits(hidden, weight, bias, scale, softcap):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _reference(hidden, weight, bias, ids, *, scale=1.0, softcap=None, dtype=torch.float64, **kw):
    """Loss, metrics and (dh, dW, db) from full logits computed by torch at ``dtype``."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in (hidden, weight, bias)]
    loss, met = grpo_loss_reference(_logits(*leaves, scale, softcap), ids, **kw)
    loss.backward()
    return loss.detach(), met, [None if t is None else t.grad for t in leaves]


def _fused(backend, hidden, weight, bias, ids, *, scale=1.0, softcap=None, chunk_size=None, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, met = grpo_fast.fused_linear_grpo_loss(leaves[0], leaves[1], ids, bias=leaves[2], logit_scale=scale,
                                                 logit_softcap=softcap, chunk_size=chunk_size, backend=backend, **kw)
    loss.backward()
    return loss.detach(), met, [None if t is None else t.grad for t in leaves]


def _close(got, want, rtol, what, atol=0.0):
    """|got − want| ≤ rtol·max|want| + atol elementwise; on failure say where and by how much."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = rtol * max(want.abs().max().item(), 1e-6) + atol
    err = (got - want).abs()
    if not bool(err.max() <= tol) or not bool(torch.isfinite(got).all()):
        i = int(torch.nan_to_num(err, nan=float("inf")).flatten().argmax())
        where = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        raise AssertionError(f"{what}: max error {err.max().item():.3e} > {tol:.3e} at {where}: "
                             f"got {got.flatten()[i].item()}, want {want.flatten()[i].item()}")


def _assert_fp32(backend, hidden, weight, bias, ids, rtol=1e-5, **kw):
    loss, met, grads = _fused(backend, hidden, weight, bias, ids, **kw)
    kw.pop("chunk_size", None)
    wl, wm, wg = _reference(hidden, weight, bias, ids, **kw)
    assert loss.dtype == torch.float32
    _close(loss, wl, rtol, "loss")
    assert set(met) == set(wm), (sorted(met), sorted(wm))
    for k in wm:
        # k3 = e^d − d − 1 cancels for small d: float32 gets it to ≈1e-7 absolute per token, whatever
        # the path (the eager reference at float32 too), hence an absolute floor for the kl mean.
        _close(met[k], wm[k], rtol, f"metric {k}", atol=1e-6 if k == "kl" else 0.0)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, wg):
        if want is None:
            assert got is None
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape
        _close(got, want, rtol, f"d{name}")


def _side_kwargs(side, mask, *, loss_type, level, beta=0.04, adv="rewards", isr=None, **extra):
    kw = dict(loss_type=loss_type, importance_sampling_level=level, completion_mask=mask,
              old_logp=side["old"], beta=beta, ref_logp=side["ref"] if beta else None, **extra)
    if adv == "rewards":
        kw.update(rewards=side["rewards"], group_size=2)
    elif adv == "row":
        kw["advantages"] = side["rewards"] - 0.5
    else:
        kw["advantages"] = side["adv_tok"]
    if isr == "row":
        kw["importance_sampling_ratio"] = side["isr_row"]
    elif isr == "tok":
        kw["importance_sampling_ratio"] = side["isr_tok"]
    if loss_type == "cispo":
        kw.setdefault("epsilon_high", 1.1)  # a cap near 1 so that some ratios are clipped
    return kw


# ------------------------------------------------------------------------------------------------
# fp32 against the float64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", INTERP_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_fp32(backend, loss_type, level):
    # chunk 5 splits rows and groups (token level) and forces the pre-pass at sequence level (T = 7)
    for seed, (chunk, softcap, bias) in enumerate([(5, None, True), (13, 2.5, False), (None, 4.0, True)]):
        h, w, b, ids, mask, side = _case(seed=seed, bias=bias)
        kw = _side_kwargs(side, mask, loss_type=loss_type, level=level, temperature=0.8)
        _assert_fp32(backend, h, w, b, ids, scale=0.7, softcap=softcap, chunk_size=chunk, **kw)


OPTION_CASES = {
    "adv_row_isr_tok": dict(adv="row", isr="tok"),
    "adv_tok_isr_row": dict(adv="tok", isr="row"),
    "on_policy_no_kl": dict(beta=0.0, old_logp=None),
    "delta_k1": dict(delta=1.5, kl_estimator="k1", epsilon_high=0.28),
    "k2_bias_corr": dict(kl_estimator="k2", use_bias_correction_kl=True),
    "num_items_mcl": dict(num_items_in_batch=40, max_completion_length=11),
    "scale_none": dict(scale_rewards="none"),
    "scale_batch_temp": dict(scale_rewards="batch", temperature=1.7),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_fp32(backend, case, level):
    opts = dict(OPTION_CASES[case])
    old_none = "old_logp" in opts and opts.pop("old_logp") is None
    loss_types = ["dr_grpo", "dapo"] if "num_items_in_batch" in opts else ["grpo", "cispo", "sapo"]
    if "delta" in opts:
        loss_types = ["grpo", "bnpo"]
    for i, lt in enumerate(loss_types):
        h, w, b, ids, mask, side = _case(B=6, T=5, V=61, seed=10 + i)
        kw = _side_kwargs(side, mask, loss_type=lt, level=level, **opts)
        if old_none:
            kw["old_logp"] = None
        _assert_fp32(backend, h, w, b, ids, chunk_size=7 if i % 2 == 0 else 10, softcap=3.0 if i else None, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunk", [1, 3, 6, 7, 13, 28, 29, 1000])
def test_chunk_sizes(backend, chunk):
    """Chunks of one token, of less / exactly / more than one row (T = 7), of the whole batch and beyond."""
    h, w, b, ids, mask, side = _case(B=4, T=7, V=41, seed=3)
    for level in ("token", "sequence"):
        kw = _side_kwargs(side, mask, loss_type="grpo", level=level)
        _assert_fp32(backend, h, w, b, ids, chunk_size=chunk, softcap=5.0, scale=1.3, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_shapes(backend):
    """T = 1, B = G = 2, V = 1 (every log-prob 0), H = 1."""
    for B, T, H, V, chunk in [(2, 1, 8, 37, 1), (2, 5, 1, 19, 3), (4, 3, 8, 1, 5)]:
        h, w, b, ids, mask, side = _case(B=B, T=T, H=H, V=V, seed=B * T + V)
        if T == 1:
            # reference.py tells row flags from token values by shape (x.shape[1] == 1), so at T = 1 its
            # masked means ignore the mask; compare there on a full mask only.
            mask = torch.ones_like(mask)
        kw = _side_kwargs(side, mask, loss_type="bnpo", level="token")
        _assert_fp32(backend, h, w, b, ids, chunk_size=chunk, **kw)


# ------------------------------------------------------------------------------------------------
# bf16: at most twice torch's own bf16 error
# ------------------------------------------------------------------------------------------------

def _assert_bf16(backend, hidden, weight, bias, ids, **kw):
    """Low precision (bf16 or fp16, the inputs' dtype): at most twice torch's own error at that dtype."""
    chunk = kw.pop("chunk_size", None)
    wl, wm, wg = _reference(hidden, weight, bias, ids, **kw)
    tl, tm, tg = _reference(hidden, weight, bias, ids, dtype=hidden.dtype, **kw)
    loss, met, grads = _fused(backend, hidden, weight, bias, ids, chunk_size=chunk, **kw)

    def check(got, torch_bf16, want, what):
        want = want.double().cpu()
        e_torch = (torch_bf16.double().cpu() - want).abs().max().item()
        e_ours = (got.double().cpu() - want).abs().max().item()
        tol = 2 * e_torch
        if want.dim() == 0:
            # A scalar's bf16 error is a sum of ± roundings whose cancellation is luck (ours / torch's
            # ranged 0.03–8 over 12 seeds while the gradients' ranged 0.2–1.6): for scalars allow
            # bf16's resolution of the value too.
            tol = max(tol, 2.0 ** -8 * (abs(want.item()) + 1e-2))
        assert e_ours <= tol, f"{what}: error {e_ours:.3e} > {tol:.3e} (torch bf16's error {e_torch:.3e})"

    check(loss, tl, wl, "loss")
    for k in ("entropy", "kl"):
        if k in wm:
            check(met[k], tm[k], wm[k], f"metric {k}")
    for name, got, t, want in zip(("hidden", "weight", "bias"), grads, tg, wg):
        if want is not None:
            assert got.dtype == hidden.dtype
            check(got, t, want, f"d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_bf16(backend, loss_type, level):
    # On-policy (old_logp=None, r = 1): off-policy, bf16 rounding flips tokens across the clip edges,
    # where the gradient jumps, and the max error then measures luck, not precision. The off-policy
    # logic is the same code as in fp32 and tested there.
    for seed, (chunk, softcap, bias) in enumerate([(11, None, True), (4, 3.0, True), (None, None, False)]):
        h, w, b, ids, mask, side = _case(B=4, T=9, H=64, V=301, seed=20 + seed, dtype=torch.bfloat16, bias=bias,
                                         w_scale=0.25)
        kw = _side_kwargs(side, mask, loss_type=loss_type, level=level)
        kw["old_logp"] = None
        _assert_bf16(backend, h, w, b, ids, chunk_size=chunk, softcap=softcap, scale=0.9, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16(backend, hidden_dtype):
    """Under torch.autocast the chunk GEMMs run in autocast's dtype (as F.linear would); the gradients
    come back in each input's own dtype (fp32 master weights)."""
    h, w, b, ids, mask, side = _case(B=4, T=9, H=64, V=301, seed=30, w_scale=0.25)
    h = h.to(hidden_dtype)
    kw = _side_kwargs(side, mask, loss_type="grpo", level="token")
    kw["old_logp"] = None
    # oracle and torch's own computation on the bf16-rounded operands autocast feeds the GEMM
    hb, wb, bb = (t.bfloat16() for t in (h, w, b))
    wl, _, wg = _reference(hb, wb, bb, ids, **kw)
    tl, _, tg = _reference(hb, wb, bb, ids, dtype=torch.bfloat16, **kw)
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = grpo_fast.fused_linear_grpo_loss(leaves[0], leaves[1], ids, bias=leaves[2], chunk_size=10,
                                                   backend=backend, **kw)
    loss.backward()
    for name, leaf, t, want in zip(("hidden", "weight", "bias"), leaves, tg, wg):
        assert leaf.grad.dtype == leaf.dtype, name
        e_ours = (leaf.grad.double() - want).abs().max().item()
        e_torch = (t.double() - want).abs().max().item()
        assert e_ours <= 2 * e_torch, f"d{name}: {e_ours:.3e} > 2 × {e_torch:.3e}"
    assert abs(loss.item() - wl.item()) <= max(2 * abs(tl.item() - wl.item()), 2.0 ** -8 * (abs(wl.item()) + 1e-2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = grpo_fast.fused_linear_token_logprobs(h, w, ids, bias=b, backend=backend)
    want = token_logprobs_reference(_logits(hb.double(), wb.double(), bb.double(), 1.0, None), ids)
    e_torch = (token_logprobs_reference(_logits(hb, wb, bb, 1.0, None), ids).double() - want).abs().max().item()
    assert (lp.double() - want).abs().max().item() <= 2 * e_torch


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fp16(backend, level):
    for seed, (chunk, softcap, lt) in enumerate([(7, None, "bnpo"), (20, 3.0, "sapo")]):
        h, w, b, ids, mask, side = _case(B=4, T=9, H=64, V=301, seed=50 + seed, dtype=torch.float16, w_scale=0.25)
        kw = _side_kwargs(side, mask, loss_type=lt, level=level)
        kw["old_logp"] = None
        _assert_bf16(backend, h, w, b, ids, chunk_size=chunk, softcap=softcap, scale=0.9, **kw)


# ------------------------------------------------------------------------------------------------
# token log-probs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", INTERP_BACKENDS)
def test_token_logprobs(backend):
    h, w, b, ids, mask, side = _case(B=3, T=5, V=47, seed=5)
    for softcap, chunk, bias in [(None, 4, b), (2.0, None, None), (6.0, 15, b)]:
        z = _logits(h.double(), w.double(), None if bias is None else bias.double(), 1.5, softcap)
        want_lp, want_ent = token_logprobs_reference(z, ids, 0.7, return_entropy=True)
        lp, ent = grpo_fast.fused_linear_token_logprobs(h, w, ids, bias=bias, logit_scale=1.5, logit_softcap=softcap,
                                                        temperature=0.7, return_entropy=True, chunk_size=chunk,
                                                        backend=backend)
        assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ids.shape
        _close(lp, want_lp, 1e-5, "logp")
        _close(ent, want_ent, 1e-5, "entropy")
        lp_only = grpo_fast.fused_linear_token_logprobs(h, w, ids, bias=bias, logit_scale=1.5, logit_softcap=softcap,
                                                        temperature=0.7, chunk_size=chunk, backend=backend)
        assert torch.equal(lp_only, lp)


# ------------------------------------------------------------------------------------------------
# autograd behaviour, module form, chunking really bounds the logits
# ------------------------------------------------------------------------------------------------

def test_grad_output_scaling_and_partial_requires_grad():
    h, w, b, ids, mask, side = _case(seed=7)
    kw = _side_kwargs(side, mask, loss_type="dapo", level="token")
    _, _, (wh, ww, wb) = _reference(h, w, b, ids, **kw)
    hh, wwt = h.clone().requires_grad_(True), w.clone()  # frozen head: only hidden needs a gradient
    loss, _ = grpo_fast.fused_linear_grpo_loss(hh, wwt, ids, bias=b, chunk_size=6, backend="torch", **kw)
    (loss * -2.5).backward()
    _close(hh.grad, -2.5 * wh, 1e-5, "dhidden scaled")
    # head only (frozen trunk), through the module form
    crit = grpo_fast.FusedLinearGRPOLoss(chunk_size=9, backend="torch", loss_type="dapo", importance_sampling_level="token",
                                         beta=0.04)
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    per_call = {k: kw[k] for k in ("rewards", "old_logp", "ref_logp", "completion_mask")}
    loss, met = crit(h, wg, ids, bias=bg, group_size=2, **per_call)
    loss.backward()
    _close(wg.grad, ww, 1e-5, "dweight (module)")
    _close(bg.grad, wb, 1e-5, "dbias (module)")
    assert "clip_ratio" in met


def test_backward_twice_raises_unless_the_graph_was_retained():
    """retain_graph=True keeps the gradients for the next backward (tests/test_autograd_contract.py)."""
    h, w, b, ids, mask, side = _case(seed=8)
    hh = h.clone().requires_grad_(True)
    loss, _ = grpo_fast.fused_linear_grpo_loss(hh, w, ids, advantages=side["adv_tok"], backend="torch")
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_no_grad_matches_and_noncontiguous_hidden():
    h, w, b, ids, mask, side = _case(B=4, T=6, H=10, seed=9)
    kw = _side_kwargs(side, mask, loss_type="grpo", level="sequence")
    wl, wm, _ = _reference(h, w, b, ids, **kw)
    h_nc = h.transpose(0, 1).contiguous().transpose(0, 1)  # same values, (B, T) strides swapped
    assert not h_nc.is_contiguous()
    calls = []
    orig = fl._Grads.add_chunk
    fl._Grads.add_chunk = lambda self, *a: calls.append(1) or orig(self, *a)
    try:
        with torch.no_grad():
            loss, met = grpo_fast.fused_linear_grpo_loss(h_nc.requires_grad_(True), w, ids, bias=b, chunk_size=4,
                                                         backend="torch", **kw)
    finally:
        fl._Grads.add_chunk = orig
    assert not calls, "no gradient GEMMs under torch.no_grad"
    h_nc = h_nc.detach()
    _close(loss, wl, 1e-5, "loss (no_grad)")
    _close(met["entropy"], wm["entropy"], 1e-5, "entropy (no_grad)")
    _assert_fp32("torch", h_nc, w, b, ids, chunk_size=12, **kw)


def test_module_rejects_per_call_and_unknown_options():
    with pytest.raises(ValueError, match="per-call"):
        grpo_fast.FusedLinearGRPOLoss(rewards=torch.ones(2))
    with pytest.raises(TypeError, match="unknown options"):
        grpo_fast.FusedLinearGRPOLoss(chunk_sizes=4)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("chunk,softcap", [(5, None), (16, 2.0), (30, None)])
def test_never_more_than_a_chunk_of_logits(monkeypatch, level, chunk, softcap):
    """Every matmul into a logits buffer writes at most chunk_size rows, and nothing of size B·T×V is allocated."""
    B, T, V = 6, 8, 29
    h, w, b, ids, mask, side = _case(B=B, T=T, V=V, seed=11)
    rows = []
    orig = fl._matmul_chunk

    def spy(h_c, weight, bias, out):
        rows.append(out.shape[0])
        assert out.untyped_storage().nbytes() < B * T * V * out.element_size()
        return orig(h_c, weight, bias, out)

    monkeypatch.setattr(fl, "_matmul_chunk", spy)
    kw = _side_kwargs(side, mask, loss_type="grpo", level=level)
    _assert_fp32("torch", h, w, b, ids, chunk_size=chunk, softcap=softcap, **kw)
    assert rows and max(rows) <= chunk < B * T
    # one logits GEMM per token (three matmuls in all), two at sequence level when a row is longer than a chunk;
    # at token level only the valid tokens are multiplied (a masked one costs no GEMM)
    # at sequence level too when that costs less (fused_linear._sequence_on_valid_tokens: the log-prob
    # primitive on the valid tokens, 2 GEMMs into a logits buffer each, against the chunk loop over all)
    n = int((mask != 0).sum())
    assert 0 < n < B * T
    if level == "token":
        assert sum(rows) == n
    elif (n < B * T) if chunk < T else (5 * n < 3 * B * T):
        assert sum(rows) == 2 * n  # the primitive: forward, then backward recomputes
    else:
        assert sum(rows) == (2 if chunk < T else 1) * B * T


def test_auto_chunk_rule():
    # a batch that fits the budget is still split in 4 chunks, never below 256 tokens
    assert fl._auto_chunk(1024, 32000, 4, 1, False) == 256
    assert fl._auto_chunk(100, 32000, 4, 1, False) == 100
    # large vocabularies: the 256 MiB budget decides (441 tokens of 152k fp32 logits -> 384)
    assert fl._auto_chunk(65536, 152064, 4, 1, False) == 384
    assert fl._auto_chunk(65536, 152064, 4, 1, False) * 152064 * 4 <= fl.CHUNK_BUDGET_BYTES
    # sequence level: a whole row when it fits the budget (rows path), else the budget (pre-pass)
    assert fl._auto_chunk(1024, 32000, 4, 1, False, row=512) == 512
    assert fl._auto_chunk(65536, 152064, 4, 1, False, row=8192) == 384


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    h, w, b, ids, mask, side = _case()
    adv = side["adv_tok"]
    f = grpo_fast.fused_linear_grpo_loss
    with pytest.raises(ValueError, match="hidden must have shape"):
        f(h[0], w, ids, adv)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 16\)"):
        f(h, w[:, :5], ids, adv)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):  # outside autocast
        f(h, w.double(), ids, adv)
    with pytest.raises(TypeError, match="hidden must be float32"):
        f(h.double(), w.double(), ids, adv)
    with pytest.raises(ValueError, match=r"bias must have shape \(53,\)"):
        f(h, w, ids, adv, bias=b[:-1])
    with pytest.raises(ValueError, match="logit_scale must be > 0"):
        f(h, w, ids, adv, logit_scale=0.0)
    with pytest.raises(ValueError, match="logit_softcap must be > 0"):
        f(h, w, ids, adv, logit_softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        f(h, w, ids, adv, chunk_size=0)
    with pytest.raises(ValueError, match="completion_ids must lie in"):
        f(h, w, ids + 53, adv)
    with pytest.raises(ValueError, match="exactly one of advantages and rewards"):
        f(h, w, ids, adv, rewards=side["rewards"], group_size=2)
    with pytest.raises(ValueError, match="hidden must have B·T > 0"):
        f(h[:, :0], w, ids[:, :0], adv[:, :0])
    with pytest.raises(ValueError, match="backend must be one of"):
        f(h, w, ids, adv, backend="nope")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        grpo_fast.fused_linear_token_logprobs(h, w, ids, temperature=0.0)


# ------------------------------------------------------------------------------------------------
# GPU backends (triton, cuda, and torch on CUDA tensors)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch"] + GPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_backends(backend, level):
    for i, lt in enumerate(LOSS_TYPES):
        h, w, b, ids, mask, side = _case(B=4, T=7, H=32, V=131, seed=40 + i, device="cuda")
        kw = _side_kwargs(side, mask, loss_type=lt, level=level)
        # TF32 is off by default for matmuls in torch; fp32 GEMMs on GPU sum in another order than
        # the float64 oracle, hence the same 1e-5 relative budget as on CPU.
        _assert_fp32(backend, h, w, b, ids, chunk_size=5 if i % 2 else 10, softcap=3.0 if i % 3 == 0 else None, **kw)


# ------------------------------------------------------------------------------------------------
# the benchmark's own plumbing (tiny shapes: it must not rot between benchmark runs)
# ------------------------------------------------------------------------------------------------

def test_benchmark_smoke(tmp_path):
    from benchmarks import fused_linear as bench

    # floor is always added; one memory child per provider (a fresh interpreter each: keep it to two)
    res = bench.run(shapes=[(2, 8, 16, 64)], providers=["fused-torch"], repeats=1, warmup=0, memory=True,
                    out_dir=str(tmp_path), log=lambda *a: None)
    rows = {r["provider"]: r for r in res["rows"]}
    assert set(rows) == {"floor", "fused-torch"}
    for name, r in rows.items():
        assert r["ms"] > 0 and r["x_floor"] > 0
        if name != "floor":
            assert float(r["check"]) < 1e-4, (name, r["check"])  # same loss and gradients as eager
        assert r.get("extra_mb") is not None, name  # the child-process memory measurement ran
    assert (tmp_path / "fused_linear_cpu.json").exists()
