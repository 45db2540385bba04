"""grpo_fast.logprobs / fused_linear_logprobs / integrations.verl.linear_cross_entropy against float64
autograd through eager log_softmax, on every backend this machine can run.

The oracle here is written in the test (log_softmax, p·log p), not taken from grpo_fast.reference, so
that the reference's own differentiable entropy is checked too (backend="torch"). Shapes are tiny and
odd (V = 53 in Triton blocks of 16, V = 1, T = 1) because the Triton kernels run in the interpreter
without a GPU.
"""
import pytest
import torch

import grpo_fast
from grpo_fast.backends import unavailable_reason

from helpers import assert_close, assert_close_scaled, assert_error_within

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _param(b):
    why = unavailable_reason(b, DEVICE)
    return pytest.param(b, marks=pytest.mark.skipif(why is not None, reason=f"{b}: {why}"))


# "cuda-emu": the CUDA kernels built by g++ with csrc/cuda/host_emulation.h (the emulated_ext fixture
# of tests/backends_fixture.py), installed as the "cuda" backend on CPU tensors.
KERNEL_BACKENDS = [_param("cpu"), _param("triton"), _param("cuda"), "cuda-emu"]
BACKENDS = KERNEL_BACKENDS + [_param("torch")]


@pytest.fixture
def backend(request, monkeypatch):
    """The backend name to pass (indirect parametrization; "cuda-emu" installs the emulated build)."""
    name = request.param
    if name != "cuda-emu":
        return name
    if DEVICE.type == "cuda":
        pytest.skip("the emulated CUDA build runs on CPU tensors; this machine tests the real kernels")
    from backends_fixture import install_emulated_cuda

    install_emulated_cuda(monkeypatch, request.getfixturevalue("emulated_ext"))
    return "cuda"


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    """Triton walks V = 53 in blocks of 16: whole blocks, a ragged tail, −inf across block borders."""
    from grpo_fast.backends import triton_backend

    monkeypatch.setattr(triton_backend, "BLOCK_V_OVERRIDE", 16)


# ---- the oracle ------------------------------------------------------------------------------------
def eager(z, ids, tau):
    """(logp, entropy) by eager log_softmax, in z's dtype (float64 for the oracle)."""
    t = tau.to(z.dtype).unsqueeze(-1) if isinstance(tau, torch.Tensor) else tau
    logq = torch.log_softmax(z / t, dim=-1)
    logp = logq.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    p = logq.exp()
    entropy = -(p * torch.where(p > 0, logq, torch.zeros_like(logq))).sum(-1)  # 0·log 0 = 0
    return logp, entropy


def make(shape, dtype=torch.float32, seed=0, banned=True):
    """logits of ``shape`` (…, V) scaled 3 with a few −inf entries (never the target), ids."""
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    z = torch.randn(shape, generator=g) * 3
    ids = torch.randint(0, V, shape[:-1], generator=g)
    if banned and V > 2:
        ban = (ids + 1 + torch.randint(0, V - 1, ids.shape, generator=g)) % V
        z.scatter_(-1, ban.unsqueeze(-1), float("-inf"))
        z[..., :1][ids.unsqueeze(-1)[..., :1] != 0] = float("-inf")  # and a whole first column where allowed
    return z.to(dtype).to(DEVICE), ids.to(DEVICE)


def upstream(shape, which, seed=1):
    g = torch.Generator().manual_seed(seed)
    gl = torch.randn(shape, generator=g).to(DEVICE) if which in ("logp", "both") else None
    gh = torch.randn(shape, generator=g).to(DEVICE) if which in ("entropy", "both") else None
    return gl, gh


def backprop(logp, ent, gl, gh):
    loss = 0.0
    if gl is not None:
        loss = loss + (logp * gl.to(logp.dtype)).sum()
    if gh is not None:
        loss = loss + (ent * gh.to(ent.dtype)).sum()
    loss.backward()


def run(backend, z, ids, tau, which):
    x = z.detach().clone().requires_grad_()
    logp, ent = grpo_fast.logprobs(x, ids, temperature=tau, return_entropy=True, backend=backend)
    backprop(logp, ent, *upstream(ids.shape, which))
    return logp.detach(), ent.detach(), x.grad


def run_oracle(z, ids, tau, which):
    x = z.detach().double().requires_grad_()
    logp, ent = eager(x, ids, tau)
    backprop(logp, ent, *upstream(ids.shape, which))
    return logp.detach(), ent.detach(), x.grad


def rtol_for(backend):
    """1e-5 for the kernels; backend="torch" is eager float32 autograd, whose entropy gradient loses a
    little more to cancellation (measured up to 3e-5 of the gradient's scale)."""
    return 5e-5 if backend == "torch" else 1e-5


def per_token_tau(lead, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (0.4 + torch.rand(lead, generator=g)).to(DEVICE)


# (logits shape, temperature, which outputs get an upstream gradient)
CASES = [
    pytest.param((9, 53), 1.0, "both", id="NV-V53"),
    pytest.param((2, 3, 53), 0.7, "both", id="BTV-V53-tau0.7"),
    pytest.param((2, 3, 53), "token", "logp", id="BTV-tau-per-token-logp-only"),
    pytest.param((9, 53), "token", "entropy", id="NV-tau-per-token-entropy-only"),
    pytest.param((3, 1, 53), "row", "both", id="BTV-T1-tau-per-row"),
    pytest.param((4, 1), 1.3, "both", id="NV-V1"),
]


def _tau(tau, shape):
    if tau == "token":
        return per_token_tau(shape[:-1])
    if tau == "row":
        return per_token_tau(shape[:1])
    return tau


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape,tau,which", CASES)
def test_fp32_matches_float64_autograd(backend, shape, tau, which):
    z, ids = make(shape)
    t = _tau(tau, shape)
    t_oracle = t.unsqueeze(1).expand(shape[:-1]) if tau == "row" else t
    logp, ent, grad = run(backend, z, ids, t, which)
    o_logp, o_ent, o_grad = run_oracle(z, ids, t_oracle, which)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ids.shape and ent.shape == ids.shape
    assert_close_scaled(logp, o_logp, 1e-5, "logp")
    assert_close_scaled(ent, o_ent, rtol_for(backend), "entropy")
    assert grad.dtype == z.dtype and grad.shape == z.shape
    assert_close_scaled(grad, o_grad, rtol_for(backend), "grad")
    banned = torch.isinf(z)
    assert bool(torch.isfinite(grad).all()) and bool((grad[banned] == 0).all()), "−inf logits must get a 0 gradient"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,tau", [((2, 3, 53), 0.7), ((9, 53), "token")], ids=["BTV", "NV-tau-per-token"])
def test_low_precision_within_twice_torch_error(backend, dtype, shape, tau):
    z, ids = make(shape, dtype)
    t = _tau(tau, shape)
    logp, ent, grad = run(backend, z, ids, t, "both")
    e_logp, e_ent, e_grad = run("torch", z, ids, t, "both")  # eager torch at this precision
    o_logp, o_ent, o_grad = run_oracle(z, ids, t, "both")
    assert grad.dtype == dtype
    assert_error_within(logp, e_logp, o_logp, 1e-5, 1e-5, "logp")
    assert_error_within(ent, e_ent, o_ent, 1e-5, 1e-5, "entropy")
    assert_error_within(grad, e_grad, o_grad, 1e-5, 1e-5, "grad")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_strided_logits(backend):
    # (B, T) strides of a slice, and a last dimension that is not contiguous (copied once)
    z, ids = make((3, 5, 53))
    sliced = z[:, 1:4]
    ids_s = ids[:, 1:4].contiguous()
    tr = z.transpose(0, 2).contiguous().transpose(0, 2)[:, :4]  # stride(-1) != 1
    for zz, ii in ((sliced, ids_s), (tr, ids[:, :4].contiguous())):
        assert not zz.is_contiguous()
        logp, ent, grad = run(backend, zz, ii, 0.9, "both")
        o_logp, o_ent, o_grad = run_oracle(zz, ii, 0.9, "both")
        assert_close_scaled(logp, o_logp, 1e-5, "logp")
        assert_close_scaled(grad, o_grad, rtol_for(backend), "grad")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_retain_graph_twice_equals_eager(backend):
    z, ids = make((2, 4, 53))
    x = z.clone().requires_grad_()
    logp, ent = grpo_fast.logprobs(x, ids, temperature=0.8, return_entropy=True, backend=backend)
    gl, gh = upstream(ids.shape, "both")
    loss = (logp * gl).sum() + (ent * gh).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    xo = z.double().requires_grad_()
    lo, eo = eager(xo, ids, 0.8)
    lo_loss = (lo * gl.double()).sum() + (eo * gh.double()).sum()
    lo_loss.backward(retain_graph=True)
    lo_loss.backward()
    assert_close_scaled(first, xo.grad / 2, rtol_for(backend), "first backward")
    assert_close_scaled(x.grad, xo.grad, rtol_for(backend), "accumulated over two backwards")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_create_graph_is_refused_by_kernel_backends(backend):
    z, ids = make((6, 53))
    x = z.clone().requires_grad_()
    logp, ent = grpo_fast.logprobs(x, ids, return_entropy=True, backend=backend)
    with pytest.raises(RuntimeError, match='create_graph=True .* needs backend="torch"'):
        torch.autograd.grad((logp + ent).sum(), x, create_graph=True)


def test_torch_backend_is_twice_differentiable():
    z, ids = make((6, 53), banned=False)
    x = z.clone().requires_grad_()
    logp, ent = grpo_fast.logprobs(x, ids, temperature=0.9, return_entropy=True, backend="torch")
    (g,) = torch.autograd.grad((logp + ent).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), x)
    xo = z.double().requires_grad_()
    lo, eo = eager(xo, ids, 0.9)
    (go,) = torch.autograd.grad((lo + eo).sum(), xo, create_graph=True)
    (ho,) = torch.autograd.grad(go.square().sum(), xo)
    assert_close_scaled(h, ho, 1e-4, "second derivative")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_only_logp_requested(backend):
    z, ids = make((7, 53))
    x = z.clone().requires_grad_()
    logp, ent = grpo_fast.logprobs(x, ids, temperature=1.5, backend=backend)
    assert ent is None
    gl, _ = upstream(ids.shape, "logp")
    (logp * gl).sum().backward()
    _, _, o_grad = run_oracle(z, ids, 1.5, "logp")
    assert_close_scaled(x.grad, o_grad, rtol_for(backend), "grad")
    with torch.no_grad():
        lp2, _ = grpo_fast.logprobs(z, ids, temperature=1.5, backend=backend)
    assert not lp2.requires_grad and torch.equal(lp2, logp.detach())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_rows_without_upstream_gradient_are_not_read(backend):
    # A token the loss masks out (upstream gradient exactly 0 for logp and entropy) gets a zero row
    # without its logits being read: NaN there does not reach the gradient (eager backward would
    # produce NaN·0 = NaN for that row).
    z, ids = make((6, 53))
    z[2] = float("nan")
    mask = torch.ones(6, dtype=torch.bool, device=DEVICE)
    mask[2] = False
    x = z.clone().requires_grad_()
    logp, ent = grpo_fast.logprobs(x, ids, return_entropy=True, backend=backend)
    assert torch.isnan(logp[2]) and torch.isnan(ent[2])  # forward propagates NaN, as PyTorch does
    loss = torch.where(mask, logp + 0.1 * ent, torch.zeros_like(logp)).sum()
    loss.backward()
    assert bool((x.grad[2] == 0).all())
    ok = mask.clone()
    xo = z[ok].double().requires_grad_()
    lo, eo = eager(xo, ids[ok], 1.0)
    (lo + 0.1 * eo).sum().backward()
    assert_close_scaled(x.grad[ok], xo.grad, 1e-5, "unmasked rows")


# ---- an arbitrary policy loss in plain torch trains through the kernels ------------------------------
def dual_clip_ppo(logp, entropy, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, clip_c=3.0, ent_coef=1e-3):
    """verl's compute_policy_loss (dual-clip PPO, Ye et al. 2020) with token-mean aggregation, minus an
    entropy bonus; written here from the formula, in plain torch."""
    ratio = torch.exp(logp - old_logp)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -advantages * clip_c
    clip2 = torch.minimum(pg3, clip1)
    pg = torch.where(advantages < 0, clip2, clip1)
    n = mask.sum().clamp(min=1)
    return (pg * mask).sum() / n - ent_coef * (entropy * mask).sum() / n


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_arbitrary_torch_policy_loss_matches_float64(backend):
    B, T, V = 3, 5, 53
    z, ids = make((B, T, V), seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ref_logp, _ = eager(z.double(), ids, 0.9)
    old = (ref_logp + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)).float()
    adv = torch.randn(B, T, generator=g).to(DEVICE) * 2
    mask = (torch.rand(B, T, generator=g) > 0.2).float().to(DEVICE)
    x = z.clone().requires_grad_()
    logp, ent = grpo_fast.logprobs(x, ids, temperature=0.9, return_entropy=True, backend=backend)
    loss = dual_clip_ppo(logp, ent, old, adv, mask)
    loss.backward()
    xo = z.double().requires_grad_()
    lo, eo = eager(xo, ids, 0.9)
    loss_o = dual_clip_ppo(lo, eo, old.double(), adv.double(), mask.double())
    loss_o.backward()
    # the loss's branches (clip / dual clip) must be exercised for this to mean anything
    ratio = torch.exp(lo.detach() - old.double())
    assert bool(((ratio > 1.28) & (adv > 0)).any()) and bool(((ratio < 0.8) & (adv < 0)).any())
    assert_close(loss.detach(), loss_o.detach(), 1e-6, 1e-5, "loss")
    assert_close_scaled(x.grad, xo.grad, rtol_for(backend), "grad")


# ---- from hidden states and the LM head -------------------------------------------------------------
LINEAR_CASES = [
    pytest.param(dict(), "BTH", 1.0, id="plain"),
    pytest.param(dict(bias=True), "NH", 0.7, id="bias-NH-tau"),
    pytest.param(dict(bias=True, logit_scale=0.5), "BTH", "token", id="bias-scale-tau-per-token"),
    pytest.param(dict(logit_softcap=4.0, logit_scale=1.5), "NH", 0.8, id="softcap-scale"),
]


def linear_oracle(hidden, weight, bias, ids, tau, scale=1.0, cap=None):
    pre = hidden @ weight.t()
    if bias is not None:
        pre = pre + bias
    z = pre * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return eager(z, ids, tau)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("opts,layout,tau", LINEAR_CASES)
def test_fused_linear_matches_float64(backend, opts, layout, tau):
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 2, 5, 16, 53
    lead = (B, T) if layout == "BTH" else (B * T,)
    hidden = torch.randn(*lead, H, generator=g).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(DEVICE)
    bias = torch.randn(V, generator=g).to(DEVICE) if opts.get("bias") else None
    ids = torch.randint(0, V, lead, generator=g).to(DEVICE)
    t = per_token_tau(lead) if tau == "token" else tau
    scale, cap = opts.get("logit_scale", 1.0), opts.get("logit_softcap")
    gl, gh = upstream(lead, "both")

    params = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    if bias is not None:
        params.append(bias.clone().requires_grad_())
    logp, ent = grpo_fast.fused_linear_logprobs(
        params[0], params[1], ids, bias=params[2] if bias is not None else None, temperature=t,
        logit_scale=scale, logit_softcap=cap, return_entropy=True, chunk_size=4, backend=backend)
    assert logp.shape == ent.shape == ids.shape
    ((logp * gl).sum() + (ent * gh).sum()).backward()

    oparams = [p.detach().double().requires_grad_() for p in params]
    lo, eo = linear_oracle(oparams[0], oparams[1], oparams[2] if bias is not None else None, ids, t, scale, cap)
    ((lo * gl.double()).sum() + (eo * gh.double()).sum()).backward()
    assert_close_scaled(logp, lo, 1e-5, "logp")
    assert_close_scaled(ent, eo, rtol_for(backend), "entropy")
    for name, p, o in zip(("hidden", "weight", "bias"), params, oparams):
        assert_close_scaled(p.grad, o.grad, rtol_for(backend), f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fused_linear_retain_graph(backend):
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(7, 8, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(53, 8, generator=g).to(DEVICE).requires_grad_()
    ids = torch.randint(0, 53, (7,), generator=g).to(DEVICE)
    logp, ent = grpo_fast.fused_linear_logprobs(hidden, weight, ids, return_entropy=True, chunk_size=3, backend=backend)
    loss = logp.sum() - 0.5 * ent.sum()
    loss.backward(retain_graph=True)
    first = (hidden.grad.clone(), weight.grad.clone())
    loss.backward()
    assert torch.allclose(hidden.grad, 2 * first[0]) and torch.allclose(weight.grad, 2 * first[1])


def test_verl_linear_cross_entropy_contract():
    from grpo_fast.integrations.verl import linear_cross_entropy

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(11, 8, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(53, 8, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 53, (11,), generator=g).to(DEVICE)
    logp, ent = linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    assert logp.shape == ent.shape == (11,)
    (logp.sum() + ent.sum()).backward()
    ho, wo = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    lo, eo = linear_oracle(ho, wo, None, labels, 0.7)
    (lo.sum() + eo.sum()).backward()
    assert_close_scaled(logp, lo, 1e-5, "logprobs")
    assert_close_scaled(ent, eo, 1e-5, "entropy")
    assert_close_scaled(hidden.grad, ho.grad, 1e-5, "d hidden")
    assert_close_scaled(weight.grad, wo.grad, 1e-5, "d weight")
    with pytest.raises(TypeError, match="ProcessGroup"):  # a vocabulary split needs a torch.distributed group
        linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, 1.0, "mean")


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    z, ids = make((2, 3, 53))
    with pytest.raises(ValueError, match="logits"):
        grpo_fast.logprobs(z[0, 0], ids[0, 0])
    with pytest.raises(ValueError, match="logits"):
        grpo_fast.logprobs(z.unsqueeze(0), ids)
    with pytest.raises(TypeError, match="logits"):
        grpo_fast.logprobs(z.double(), ids)
    with pytest.raises(ValueError, match="logits"):
        grpo_fast.logprobs(z[:, :, :0], ids)
    with pytest.raises(ValueError, match="ids"):
        grpo_fast.logprobs(z, ids[:, :2])
    with pytest.raises(ValueError, match="ids"):
        grpo_fast.logprobs(z, ids + 53)
    with pytest.raises(TypeError, match="ids"):
        grpo_fast.logprobs(z, ids.float())
    with pytest.raises(ValueError, match="temperature"):
        grpo_fast.logprobs(z, ids, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        grpo_fast.logprobs(z, ids, temperature=torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="temperature"):
        grpo_fast.logprobs(z, ids, temperature=torch.ones(3))
    with pytest.raises(TypeError, match="return_entropy"):
        grpo_fast.logprobs(z, ids, return_entropy=1)
    with pytest.raises(ValueError, match="backend"):
        grpo_fast.logprobs(z, ids, backend="nope")
    with pytest.raises(ValueError, match="hidden"):
        grpo_fast.fused_linear_logprobs(torch.randn(2, 3, 4, 8), torch.randn(53, 8), ids)
    with pytest.raises(ValueError, match="weight"):
        grpo_fast.fused_linear_logprobs(torch.randn(2, 3, 8), torch.randn(53, 7), ids)
    with pytest.raises(ValueError, match="ids"):
        grpo_fast.fused_linear_logprobs(torch.randn(6, 8), torch.randn(53, 8), ids)
    with pytest.raises(ValueError, match="temperature"):
        grpo_fast.fused_linear_logprobs(torch.randn(2, 3, 8), torch.randn(53, 8), ids, temperature=-1.0)


# ---- mask=: valid rows only ----------------------------------------------------------------------------
def _mask_for(lead, dtype, seed=7):
    """A mask of ``lead`` with valid and masked tokens (row 0 fully valid, the last token masked)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(lead, generator=g) > 0.4
    keep.view(-1)[0] = True
    keep.view(-1)[-1] = False
    if dtype is torch.bool:
        return keep.to(DEVICE)
    return (keep.to(dtype) * (3 if dtype is torch.int32 else 0.5)).to(DEVICE)  # nonzero = valid, any value


MASK_CASES = [
    pytest.param((2, 3, 53), 0.7, torch.bool, id="BTV-bool"),
    pytest.param((9, 53), "token", torch.float32, id="NV-tau-per-token-float"),
    pytest.param((3, 4, 53), "row", torch.int32, id="BTV-tau-per-row-int"),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape,tau,mdtype", MASK_CASES)
def test_mask_valid_rows_match_float64_and_masked_rows_are_zero(backend, shape, tau, mdtype):
    # Masked rows hold NaN and +inf logits and get upstream gradients: none of it reaches any output.
    z, ids = make(shape)
    tau = _tau(tau, shape)
    mask = _mask_for(ids.shape, mdtype)
    keep = mask != 0
    z[~keep] = float("nan")
    z[..., 1][~keep] = float("inf")
    x = z.clone().requires_grad_()
    logp, ent = grpo_fast.logprobs(x, ids, temperature=tau, return_entropy=True, mask=mask, backend=backend)
    gl, gh = upstream(ids.shape, "both")
    backprop(logp, ent, gl, gh)
    assert bool((logp[~keep] == 0).all()) and bool((ent[~keep] == 0).all())
    assert bool((x.grad[~keep] == 0).all())
    xo = z[keep].double().requires_grad_()
    lo, eo = eager(xo, ids[keep], tau[keep] if isinstance(tau, torch.Tensor) and tau.shape == ids.shape
                   else (tau[:, None].expand(ids.shape)[keep] if isinstance(tau, torch.Tensor) else tau))
    backprop(lo, eo, gl[keep], gh[keep])
    assert_close_scaled(logp[keep].detach(), lo, 1e-5, "logp")
    assert_close_scaled(ent[keep].detach(), eo, 1e-5, "entropy")
    assert_close_scaled(x.grad[keep], xo.grad, rtol_for(backend), "gradient")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_mask_all_ones_is_no_mask_bitwise_and_all_zeros_gives_zeros(backend):
    z, ids = make((2, 3, 53))
    outs = []
    for mask in (None, torch.ones(ids.shape, device=DEVICE)):
        x = z.clone().requires_grad_()
        logp, ent = grpo_fast.logprobs(x, ids, temperature=0.8, return_entropy=True, mask=mask, backend=backend)
        backprop(logp, ent, *upstream(ids.shape, "both"))
        outs.append((logp.detach(), ent.detach(), x.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    x = torch.full_like(z, float("nan")).requires_grad_()
    logp, ent = grpo_fast.logprobs(x, ids, return_entropy=True, mask=torch.zeros(ids.shape, dtype=torch.bool,
                                                                                  device=DEVICE), backend=backend)
    backprop(logp, ent, *upstream(ids.shape, "both"))
    assert bool((logp == 0).all()) and bool((ent == 0).all()) and bool((x.grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fused_linear_mask_skips_masked_tokens(backend):
    g = torch.Generator().manual_seed(11)
    B, T, H, V = 2, 5, 16, 53
    hidden = torch.randn(B, T, H, generator=g).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(DEVICE)
    bias = torch.randn(V, generator=g).to(DEVICE)
    ids = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = _mask_for((B, T), torch.bool)
    hidden[~mask] = float("nan")
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    logp, ent = grpo_fast.fused_linear_logprobs(h, w, ids, bias=b, temperature=0.9, logit_softcap=5.0, mask=mask,
                                                return_entropy=True, chunk_size=3, backend=backend)
    gl, gh = upstream((B, T), "both")
    backprop(logp, ent, gl, gh)
    assert bool((logp[~mask] == 0).all()) and bool((ent[~mask] == 0).all()) and bool((h.grad[~mask] == 0).all())
    ho, wo, bo = hidden[mask].double().requires_grad_(), weight.double().requires_grad_(), bias.double().requires_grad_()
    lo, eo = linear_oracle(ho, wo, bo, ids[mask], 0.9, cap=5.0)
    backprop(lo, eo, gl[mask], gh[mask])
    assert_close_scaled(logp[mask].detach(), lo, 1e-5, "logp")
    assert_close_scaled(ent[mask].detach(), eo, 1e-5, "entropy")
    for got, want, name in ((h.grad[mask], ho.grad, "hidden"), (w.grad, wo.grad, "weight"), (b.grad, bo.grad, "bias")):
        assert_close_scaled(got, want, 5e-5, name)
    # every token masked: zeros and a zero ∂hidden; none masked: the unmasked call exactly
    h = hidden.clone().requires_grad_()
    logp, ent = grpo_fast.fused_linear_logprobs(h, weight, ids, mask=torch.zeros(B, T, device=DEVICE),
                                                return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert bool((logp == 0).all()) and bool((ent == 0).all()) and bool((h.grad == 0).all())
    clean = torch.randn(B, T, H, generator=g).to(DEVICE)
    a = grpo_fast.fused_linear_logprobs(clean, weight, ids, return_entropy=True, backend=backend)
    m = grpo_fast.fused_linear_logprobs(clean, weight, ids, mask=torch.ones(B, T, device=DEVICE), return_entropy=True,
                                        backend=backend)
    assert torch.equal(a[0], m[0]) and torch.equal(a[1], m[1])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_token_logprobs_mask(backend):
    z, ids = make((3, 4, 53))
    mask = _mask_for(ids.shape, torch.float32)
    keep = mask != 0
    z[~keep] = float("nan")
    for tau in (0.8, per_token_tau(ids.shape)):  # a float: the no-grad kernels; a tensor: the primitive's
        logp, ent = grpo_fast.token_logprobs(z, ids, tau, return_entropy=True, mask=mask, backend=backend)
        lo, eo = eager(z[keep].double(), ids[keep], tau[keep] if isinstance(tau, torch.Tensor) else tau)
        assert bool((logp[~keep] == 0).all()) and bool((ent[~keep] == 0).all())
        assert_close_scaled(logp[keep], lo, 1e-5, "logp")
        assert_close_scaled(ent[keep], eo, 1e-5, "entropy")
    clean, _ = make((3, 4, 53), seed=3)
    a = grpo_fast.token_logprobs(clean, ids, 0.8, return_entropy=True, backend=backend)
    m = grpo_fast.token_logprobs(clean, ids, 0.8, return_entropy=True, mask=torch.ones_like(mask), backend=backend)
    assert torch.equal(a[0], m[0]) and torch.equal(a[1], m[1])


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="the CPU extension is not built")
def test_mask_with_packed_rows():
    z, ids = make((7, 53))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    z[~mask] = float("nan")
    logp, ent = grpo_fast.logprobs(z, ids, temperature=torch.tensor([0.5, 2.0]), cu_seqlens=cu, mask=mask,
                                   return_entropy=True, backend="cpu")
    tau = torch.tensor([0.5] * 3 + [2.0] * 4)
    lo, eo = eager(z[mask].double(), ids[mask], tau[mask].double())
    assert bool((logp[~mask] == 0).all()) and bool((ent[~mask] == 0).all())
    assert_close_scaled(logp[mask], lo, 1e-5, "logp")
    assert_close_scaled(ent[mask], eo, 1e-5, "entropy")


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="the CPU extension is not built")
def test_mask_leaves_the_primitive_losses_unchanged():
    # verl's policy losses and TRL's primitive terms (the benchmark's primitive rows) mask every token
    # term: with mask= (logp and entropy 0 on the padding) their loss and gradient are those without it.
    from benchmarks import options

    x = options._inputs(3, 16, 64, torch.float32)
    for name, loss_fn in options.primitive_cases().items():
        got = []
        for mask in (None, x["mask"]):
            z = x["logits"].clone().requires_grad_()
            logp, ent = grpo_fast.logprobs(z, x["ids"], return_entropy=True, mask=mask, backend="cpu")
            loss = loss_fn(logp, ent, x)
            loss.backward()
            got.append((loss.detach(), z.grad))
        assert bool(torch.isfinite(got[1][0])), name
        torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-6, atol=1e-7, msg=name)


def test_bad_mask_is_named_before_any_kernel(monkeypatch):
    from grpo_fast import backends

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before the mask was checked")

    monkeypatch.setitem(backends.REGISTRY, "cpu", backends.Backend("cpu", __import__("types").SimpleNamespace(
        DEVICE_TYPES=("cpu",), unavailable_reason=lambda: None, fused_loss=no_kernel, token_logprobs=no_kernel,
        logprobs_forward=no_kernel, logprobs_backward=no_kernel)))
    z, ids = make((2, 3, 53))
    z, ids = z.cpu(), ids.cpu()
    hidden, weight = torch.randn(2, 3, 8), torch.randn(53, 8)
    for fn, args in ((grpo_fast.logprobs, (z, ids)), (grpo_fast.fused_linear_logprobs, (hidden, weight, ids)),
                     (grpo_fast.token_logprobs, (z, ids))):
        with pytest.raises(ValueError, match="mask must have the ids' shape"):
            fn(*args, mask=torch.ones(2, 4, dtype=torch.bool), backend="cpu")
        with pytest.raises(TypeError, match="mask must be a bool, integer or floating"):
            fn(*args, mask=torch.ones(2, 3, dtype=torch.complex64), backend="cpu")
        with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
            fn(*args, mask=[[1, 1, 1], [1, 1, 1]], backend="cpu")


# ---- the benchmark's own check ----------------------------------------------------------------------
@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="the CPU extension is not built")
def test_benchmark_table_runs_and_agrees_with_float64():
    from benchmarks import logprobs as bench

    rows = bench.run([(32, 97)], "fp32", "cpu", repeats=1, only=["grpo_fast-cpu", "eager"], memory=False)
    assert [r["provider"] for r in rows] == ["grpo_fast-cpu", "eager"]
    assert all(r["ms"] > 0 and r["max_rel_err_dz"] < 1e-5 for r in rows), rows
    assert rows[1]["vs_eager"] == pytest.approx(1.0)
    # the fused loss as the yardstick: in the same run, every row gets its time over the loss's
    rows = bench.run([(32, 97)], "fp32", "cpu", repeats=1, only=["grpo_fast-cpu", "loss-cpu"], memory=False)
    assert rows[1]["provider"] == "loss-cpu" and rows[1]["vs_loss"] == pytest.approx(1.0)
    assert rows[1]["max_rel_err_dz"] is None  # another quantity: not compared with the log-prob gradient
    assert rows[0]["vs_loss"] == pytest.approx(rows[0]["ms"] / rows[1]["ms"])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fused_linear_bf16_within_twice_eager_error(backend):
    g = torch.Generator().manual_seed(8)
    N, H, V = 10, 16, 53
    hidden = torch.randn(N, H, generator=g).to(DEVICE).bfloat16()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(DEVICE).bfloat16()
    ids = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    gl, gh = upstream((N,), "both")

    def grads(fn, dtype):
        h, w = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
        lp, ent = fn(h, w)
        ((lp.double() * gl.double()).sum() + (ent.double() * gh.double()).sum()).backward()
        return lp.detach(), ent.detach(), h.grad, w.grad

    got = grads(lambda h, w: grpo_fast.fused_linear_logprobs(h, w, ids, temperature=0.8, return_entropy=True,
                                                              chunk_size=4, backend=backend), torch.bfloat16)
    eager_bf16 = grads(lambda h, w: eager((h @ w.t()).float(), ids, 0.8), torch.bfloat16)
    oracle = grads(lambda h, w: eager(h @ w.t(), ids, 0.8), torch.float64)
    for name, a, e, o in zip(("logp", "entropy", "d hidden", "d weight"), got, eager_bf16, oracle):
        assert a.dtype == e.dtype
        assert_error_within(a, e, o, 1e-5, 1e-5, name)


# ---- per-token temperature in the no-grad entry points (old / reference log-probs) -----------------
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_token_logprobs_accept_per_row_temperature(backend):
    z, ids = make((3, 4, 53))
    tau_rows = per_token_tau((3,))
    want_lp, want_ent = eager(z.double(), ids, tau_rows.unsqueeze(1).expand(3, 4))
    lp, ent = grpo_fast.token_logprobs(z, ids, tau_rows, return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == (3, 4)
    assert_close_scaled(lp, want_lp, 1e-5, "logp")
    assert_close_scaled(ent, want_ent, 1e-5, "entropy")
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(3, 4, 8, generator=g).to(DEVICE)
    weight = torch.randn(53, 8, generator=g).to(DEVICE)
    lp2 = grpo_fast.fused_linear_token_logprobs(hidden, weight, ids, temperature=tau_rows, logit_softcap=5.0,
                                                chunk_size=5, backend=backend)
    want2, _ = linear_oracle(hidden.double(), weight.double(), None, ids, tau_rows.unsqueeze(1).expand(3, 4), cap=5.0)
    assert not lp2.requires_grad
    assert_close_scaled(lp2, want2, 1e-5, "fused-linear logp")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("tau", [1e-3, 100.0])
def test_extreme_temperatures(backend, tau):
    # |x| ~ 1e3 at τ = 1e-3 (eager float32 autograd loses ~1e-4 of the gradient there; the kernels
    # form log p = (x·(1/τ) − shift) − log_d from the forward's own rounding and keep 1e-5)
    z, ids = make((6, 53), banned=False)
    logp, ent, grad = run(backend, z, ids, tau, "both")
    o_logp, o_ent, o_grad = run_oracle(z, ids, tau, "both")
    assert_close_scaled(logp, o_logp, 1e-5, "logp")
    assert_close_scaled(ent, o_ent, 1e-5, "entropy")
    assert_close_scaled(grad, o_grad, 1e-5, "grad")


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="the CPU extension is not built")
def test_cpu_every_instruction_set_matches():
    # row_grad_lp is compiled once per ISA (AVX-512, AVX2, portable): each must give the oracle's
    # gradient, with ragged tails (V = 53, 7) and −inf entries
    from grpo_fast import _C_cpu

    prev = _C_cpu.isa()
    try:
        for isa in _C_cpu.supported_isas():
            _C_cpu.set_isa(isa)
            for shape in ((5, 53), (3, 7)):
                z, ids = make(shape)
                z, ids = z.cpu(), ids.cpu()
                logp, ent, grad = run("cpu", z, ids, 0.8, "both")
                o_logp, o_ent, o_grad = run_oracle(z, ids, 0.8, "both")
                assert_close_scaled(logp, o_logp, 1e-5, f"{isa} logp")
                assert_close_scaled(ent, o_ent, 1e-5, f"{isa} entropy")
                assert_close_scaled(grad, o_grad, 1e-5, f"{isa} grad")
    finally:
        _C_cpu.set_isa(prev)
