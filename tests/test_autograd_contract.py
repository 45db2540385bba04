"""The autograd contract of the fused paths (grpo_fast/_autograd.py), as eager PyTorch has it:

* retain_graph: ``torch.autograd.grad(loss, x, retain_graph=True)`` then ``loss.backward()``, or several
  ``loss.backward(retain_graph=True)``, give eager's gradient each time (accumulated like eager's);
  the gradient handed to the user never shares memory with ``.grad``;
* a backward after the graph was freed (no retain_graph) raises, as eager does;
* create_graph (gradient penalties, Hessian-vector products) raises a RuntimeError saying what to use
  (backend="torch"), never a gradient detached from the graph.

For grpo_loss (cpu, triton in the interpreter, cuda in host emulation; inplace False and True),
fused_linear_grpo_loss (every backend) and the custom op's formula used under torch.compile. Oracle:
the float64 reference and autograd. Tiny shapes: the triton interpreter and the emulation are slow.
"""
import pytest
import torch
import torch.nn.functional as F

import grpo_fast
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference, token_logprobs_reference
from helpers import assert_close_scaled
from backends_fixture import backend_params

CPU = torch.device("cpu")


def _backend_param(b):
    why = unavailable_reason(b, CPU)
    return pytest.param(b, marks=pytest.mark.skipif(why is not None, reason=f"{b} backend unavailable on CPU: {why}"))


BACKENDS = [_backend_param(b) for b in ("cpu", "triton")]
FL_BACKENDS = ["torch"] + BACKENDS
SCALES = [pytest.param(1.0, id="go1"), pytest.param(-0.5, id="go-0.5")]  # grad_output of the fused loss
INPLACE = [pytest.param(False, id="buffer"), pytest.param(True, id="inplace")]
SECOND_ORDER = r'second-order gradients are not implemented.*backend="torch"'
RTOL = 1e-5
# A backward after the graph was freed: the loss's own error, or PyTorch's when an op after the loss
# (loss * scale) saved a tensor and is reached first.
TWICE = r"({name}: backward ran twice|backward through the graph a second time).*retain_graph=True"


def _inputs(B=2, T=3, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g) * 2.0
    y = torch.randint(0, V, (B, T), generator=g)
    lp = token_logprobs_reference(z.double(), y).float()
    mask = torch.ones(B, T)
    mask[1, -1] = 0.0
    kw = dict(advantages=torch.randn(B, generator=g), old_logp=lp + torch.randn(B, T, generator=g) * 0.3,
              ref_logp=lp + torch.randn(B, T, generator=g) * 0.3, completion_mask=mask, beta=0.04, loss_type="grpo")
    return z, y, kw


def _oracle(z, y, kw, scale=1.0):
    zr = z.detach().double().requires_grad_(True)
    loss, _ = grpo_loss_reference(zr, y, **kw)
    (loss * scale).backward()
    return zr.grad


def _loss(z, y, kw, backend, inplace, scale=1.0):
    zz = z.clone().requires_grad_(True)
    loss, _ = grpo_fast.grpo_loss(zz, y, backend=backend, inplace=inplace, **kw)
    return zz, loss if scale == 1.0 else loss * scale


def _case(backend, inplace, scale=1.0, dtype=torch.float32):
    """The inputs (z float32, y, kw) and a fresh loss of z in ``dtype``: (z, y, kw, zz, loss)."""
    z, y, kw = _inputs()
    return (z, y, kw) + _loss(z.to(dtype), y, kw, backend, inplace, scale)


def _kernel_matrix(*params):
    """Parametrize a grpo_loss test over BACKENDS × INPLACE, then the given (name, values) pairs."""
    def wrap(fn):
        for name, values in (("backend", BACKENDS), ("inplace", INPLACE)) + params:
            fn = pytest.mark.parametrize(name, values)(fn)
        return fn
    return wrap


# ------------------------------------------------------------------------------------------------
# grpo_loss
# ------------------------------------------------------------------------------------------------

@_kernel_matrix(("scale", SCALES))
def test_autograd_grad_then_backward(backend, inplace, scale):
    """Logging a gradient norm with autograd.grad(retain_graph=True), then the training backward."""
    z, y, kw, zz, loss = _case(backend, inplace, scale)
    (g,) = torch.autograd.grad(loss, zz, retain_graph=True)
    loss.backward()
    assert zz.grad is not None, "the backward after autograd.grad lost the gradient"
    assert torch.equal(zz.grad, g)
    assert zz.grad.data_ptr() != g.data_ptr(), "the user's gradient and .grad share memory"
    assert_close_scaled(g, _oracle(z, y, kw, scale), RTOL, "autograd.grad")


@_kernel_matrix(("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]))
def test_retained_copy_rounds_like_the_handed_out_buffer(backend, inplace, dtype):
    """Low precision, grad_output != 1: the copy of a retained backward and the buffer scaled in place
    by the last one are the same bits (one multiply by a float32 factor, rounded once)."""
    *_, zz, loss = _case(backend, inplace, 0.3, dtype)
    (g,) = torch.autograd.grad(loss, zz, retain_graph=True)
    loss.backward()
    assert zz.grad is not None and zz.grad.dtype == dtype
    assert torch.equal(zz.grad, g)


@_kernel_matrix(("scale", SCALES))
def test_backward_with_retain_graph_accumulates_like_eager(backend, inplace, scale):
    z, y, kw, zz, loss = _case(backend, inplace, scale)
    loss.backward()
    once = zz.grad
    zz, loss = _loss(z, y, kw, backend, inplace, scale)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)  # .grad is now autograd's: accumulating into it must not touch the kept buffer
    loss.backward()
    assert torch.equal(zz.grad, once + once + once)
    assert_close_scaled(zz.grad, 3 * _oracle(z, y, kw, scale), RTOL, "three backwards")


@_kernel_matrix()
def test_backward_after_the_graph_was_freed_raises(backend, inplace):
    *_, zz, loss = _case(backend, inplace)  # no op after the loss: its own backward is the one that runs twice
    loss.backward()
    with pytest.raises(RuntimeError, match=r"grpo_loss: backward ran twice.*retain_graph=True"):
        loss.backward()


@pytest.mark.skipif(unavailable_reason("cpu", CPU) is not None, reason="cpu backend unavailable")
@pytest.mark.parametrize("inplace", INPLACE)
def test_torch_that_cannot_tell_whether_the_graph_is_kept_raises_on_the_second_backward(inplace, monkeypatch):
    """Without the engine's keep-graph flag (an older torch) the first backward hands the buffer out as
    usual; a second one then says so instead of losing the gradient."""
    from grpo_fast import _autograd

    monkeypatch.setattr(_autograd, "_keep_graph", None)
    z, y, kw, zz, loss = _case("cpu", inplace)
    (g,) = torch.autograd.grad(loss, zz, retain_graph=True)
    assert_close_scaled(g, _oracle(z, y, kw), RTOL, "first backward")
    with pytest.raises(RuntimeError, match=r"grpo_loss: backward ran twice.*cannot tell.*Call grpo_loss again"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_logits_written_between_backwards_raises(backend):
    """With inplace=True the logits hold the gradient that the next backward hands out."""
    *_, zz, loss = _case(backend, True)
    loss.backward(retain_graph=True)
    with torch.no_grad():
        zz.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace=True hold its gradient, but they were modified"):
        loss.backward()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@_kernel_matrix()
def test_create_graph_raises_instead_of_a_detached_gradient(backend, inplace):
    z, y, kw, zz, loss = _case(backend, inplace)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.grad(loss, zz, create_graph=True)  # a gradient penalty's first step
    zz, loss = _loss(z, y, kw, backend, inplace, -0.5)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        loss.backward(create_graph=True)
    # what the message advises: backend="torch" is plain autograd, second order included
    zt = z.clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(grpo_fast.grpo_loss(zt, y, backend="torch", **kw)[0], zt, create_graph=True)
    gt.pow(2).sum().backward()
    zr = z.double().requires_grad_(True)
    (gr,) = torch.autograd.grad(grpo_loss_reference(zr, y, **kw)[0], zr, create_graph=True)
    gr.pow(2).sum().backward()
    assert zr.grad.abs().max() > 0
    assert_close_scaled(zt.grad, zr.grad, 1e-4, "gradient-penalty gradient, backend torch")


@pytest.mark.parametrize("backend", backend_params("cuda-emulated", "cuda"), indirect=True)
def test_cuda_backend_keeps_the_contract(backend):
    """The cuda backend (host emulation without a GPU, the real kernels with one) goes through the same
    autograd Function."""
    z, y, kw = backend.put(_inputs())
    want = _oracle(z, y, kw, -0.5)
    for inplace in (False, True):
        zz, loss = _loss(z, y, kw, backend.name, inplace, -0.5)
        (g,) = torch.autograd.grad(loss, zz, retain_graph=True)
        loss.backward(retain_graph=True)
        loss.backward()
        assert torch.equal(zz.grad, g + g)
        assert_close_scaled(g, want, RTOL, f"cuda inplace={inplace}")
        with pytest.raises(RuntimeError, match=TWICE.format(name="grpo_loss")):
            loss.backward()
        zz, loss = _loss(z, y, kw, backend.name, inplace)
        with pytest.raises(RuntimeError, match=SECOND_ORDER):
            torch.autograd.grad(loss, zz, create_graph=True)


def test_compiled_path_formula_has_no_silent_second_order():
    """The custom op's autograd formula (what torch.compile runs; torch.compile itself refuses double
    backward) called eagerly: create_graph raises instead of a gradient penalty of 0."""
    from grpo_fast import GRPOOptions, _ops
    from grpo_fast.validation import validate_loss_args

    z, y, kw = _inputs()
    zz = z.clone().requires_grad_(True)
    inp = validate_loss_args(zz, y, kw["advantages"], old_logp=kw["old_logp"], ref_logp=kw["ref_logp"],
                             completion_mask=kw["completion_mask"],
                             options=GRPOOptions(beta=kw["beta"], loss_type=kw["loss_type"]))
    stats, _ = _ops.fused_loss(inp.logits, inp.ids, inp.mask, inp.weight, inp.advantages, inp.rewards, inp.old_logp,
                               inp.ref_logp, inp.isr, None, *_ops.pack_config(inp.cfg), "cpu", True)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.grad(stats[0], zz, create_graph=True)
    (g,) = torch.autograd.grad(stats[0], zz)  # first order, as before
    assert_close_scaled(g, _oracle(z, y, kw), RTOL, "custom op")


# ------------------------------------------------------------------------------------------------
# fused_linear_grpo_loss
# ------------------------------------------------------------------------------------------------

def _linear_inputs(B=2, T=3, H=8, V=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g)
    z, y, kw = _inputs(B, T, V, seed)
    lp = token_logprobs_reference(F.linear(h, w, b).double(), y).float()
    kw.update(old_logp=lp + 0.1 * torch.randn(B, T, generator=g), ref_logp=lp + 0.1 * torch.randn(B, T, generator=g))
    return h, w, b, y, kw


def _linear_oracle(h, w, b, y, kw, scale):
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w, b)]
    loss, _ = grpo_loss_reference(F.linear(*leaves), y, **kw)
    return torch.autograd.grad(loss * scale, leaves)


def _linear_loss(h, w, b, y, kw, backend, scale=1.0):
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    loss, _ = grpo_fast.fused_linear_grpo_loss(leaves[0], leaves[1], y, bias=leaves[2], chunk_size=4, backend=backend,
                                               **kw)
    return leaves, loss if scale == 1.0 else loss * scale


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", FL_BACKENDS)
def test_fused_linear_retain_graph_like_eager(backend, scale):
    h, w, b, y, kw = _linear_inputs()
    want = _linear_oracle(h, w, b, y, kw, scale)
    leaves, loss = _linear_loss(h, w, b, y, kw, backend, scale)
    got = torch.autograd.grad(loss, leaves, retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    for name, t, g, ref in zip(("hidden", "weight", "bias"), leaves, got, want):
        assert t.grad is not None, f"{name}: the backward after autograd.grad lost the gradient"
        assert torch.equal(t.grad, g + g), name
        assert t.grad.data_ptr() != g.data_ptr(), name
        assert_close_scaled(g, ref, RTOL, f"d{name}")
    with pytest.raises(RuntimeError, match=TWICE.format(name="fused_linear_grpo_loss")):
        loss.backward()


@pytest.mark.parametrize("backend", FL_BACKENDS)
def test_fused_linear_create_graph_raises(backend):
    h, w, b, y, kw = _linear_inputs()
    leaves, loss = _linear_loss(h, w, b, y, kw, backend)
    with pytest.raises(RuntimeError, match=r"fused_linear_grpo_loss: second-order.*grpo_loss\(logits, \.\.\., backend=\"torch\"\)"):
        torch.autograd.grad(loss, leaves, create_graph=True)
