"""What is specific to the CUDA C++ backend (csrc/cuda, grpo_fast._C_cuda).

The kernels' conformance against the float64 reference (every loss type × level × KL estimator ×
dtype, options, odd V, −inf/NaN/extreme logits, masks, inplace, strides, grad_output != 1,
determinism, token_logprobs) is tests/test_backends.py, which runs them as "cuda-emulated" —
grpo_cuda_kernels.cu built by g++ with csrc/cuda/host_emulation.h (one std::thread per CUDA thread,
real barriers and warp shuffles; it checks the kernels' logic but not the device's rounding) — and,
on a GPU, as "cuda" (marked ``gpu``). Here:
  * the extension is built and imports whenever nvcc is present, and its argument checking;
  * backend="cuda" raises a RuntimeError saying why (no CUDA device, or not built and how to build);
  * grpo_math.h compiled by nvcc (its __host__ side) gives the float64 per-token math of docs/spec.md;
  * every kernel for every compiled arch has 0 spill bytes and 0 local memory (cuobjdump), and the
    parser of cuobjdump's report;
  * the host-emulation build itself (tests/backends_fixture.py builds it for the whole session);
  * with a GPU: the device build of grpo_math.h against its host build.
"""
import os
import shutil

import pytest
import torch

import grpo_fast
from grpo_fast._config import CLIP_FAMILY, LOSS_TYPES, KernelConfig
from grpo_fast.backends import unavailable_reason
from helpers import assert_close  # tests/helpers.py: the shared mismatch-locating assertion

try:
    from grpo_fast import _C_cuda
except ImportError as e:  # not built (no nvcc, or GRPO_FAST_CUDA=0)
    _C_cuda = None
    _CUDA_IMPORT_ERROR = e

_CUDA_WHY = unavailable_reason("cuda", torch.device("cuda"))
needs_ext = pytest.mark.skipif(_C_cuda is None, reason="grpo_fast._C_cuda is not built (no nvcc at build time)")

LOSSES = list(LOSS_TYPES)
KLS = ["k3", "k1", "k2"]


# ---------------------------------------------------------------------------------------------
# without a GPU: build, import, dispatch errors, the header's host side, resources


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return shutil.which("nvcc") is not None or bool(home and os.path.exists(os.path.join(home, "bin", "nvcc")))


def test_extension_built_when_nvcc_present():
    if not _nvcc_present():
        pytest.skip("nvcc is not installed (not on PATH, no CUDA_HOME): setup.py skips the CUDA extension")
    if os.environ.get("GRPO_FAST_CUDA") == "0":
        pytest.skip("GRPO_FAST_CUDA=0: the CUDA extension was switched off for this build")
    assert _C_cuda is not None, f"nvcc is present but grpo_fast._C_cuda does not import: {_CUDA_IMPORT_ERROR}"
    assert _C_cuda.NUM_STATS == 8 and _C_cuda.TERM_COLUMNS == 7
    assert _C_cuda.runtime_version() >= 11000  # static runtime: answers without a driver
    n, why = _C_cuda.device_count()  # never raises: 0 and the runtime's reason without a GPU
    assert n >= 0 and (n > 0 or isinstance(why, str))
    # the workspace grows with what is asked for, in 64-float pieces
    tok = _C_cuda.fused_scratch_floats(3, 5, 0, False, True)
    seq = _C_cuda.fused_scratch_floats(3, 5, 1, True, True)
    assert tok % 64 == 0 and tok >= 3 * 5 * 8
    assert seq > _C_cuda.fused_scratch_floats(3, 5, 1, True, False) > _C_cuda.fused_scratch_floats(3, 5, 1, False, False)


def test_extension_rejects_unknown_or_missing_arguments():
    if _C_cuda is None:
        pytest.skip("grpo_fast._C_cuda is not built")
    with pytest.raises(KeyError, match="missing argument"):
        _C_cuda.token_logprobs(logits=0)
    kw = dict(logits=0, dtype=0, B=1, T=1, V=1, stride_b=1, stride_t=1, ids=0, mask=0, temperature=1.0, logp=0,
              entropy=0, device=0, stream=0)
    with pytest.raises(TypeError, match="unexpected argument typo"):
        _C_cuda.token_logprobs(**kw, typo=1)
    with pytest.raises(ValueError, match="ptr must be a device pointer"):
        _C_cuda.token_logprobs(**kw)  # the internal asserts run before any CUDA call


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a CUDA device")
def test_cuda_backend_unavailable_without_gpu():
    why = unavailable_reason("cuda", torch.device("cpu"))
    assert why is not None
    if _C_cuda is None:
        assert "not built" in why and "pip install" in why
    else:
        assert "no CUDA device" in why
    z = torch.randn(2, 3, 11)
    y = torch.randint(0, 11, (2, 3))
    with pytest.raises(RuntimeError, match='backend="cuda" is not available'):
        grpo_fast.grpo_loss(z, y, torch.randn(2), backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        grpo_fast.token_logprobs(z, y, backend="cuda")


def _cfg(loss_type="grpo", kl="k3", level="token", delta=None, bias=False, beta=0.1, eps_low=0.2, eps_high=0.28):
    return KernelConfig(
        loss_type=LOSS_TYPES[loss_type], kl_estimator={"k3": 0, "k1": 1, "k2": 2}[kl],
        level=0 if level == "token" else 1, has_delta=delta is not None, bias_correction_kl=bias,
        scale_rewards=1, group_size=0, temperature=1.0, eps_low=eps_low, eps_high=eps_high,
        delta=0.0 if delta is None else delta, beta=beta, sapo_temp_pos=1.0, sapo_temp_neg=1.05,
        adv_eps=1e-4, max_completion_length=1.0, num_items=-1.0)


def _terms_inputs(n=257, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=g) * 6 - 0.01
    ref = logp + torch.randn(n, generator=g) * 0.5
    adv = torch.randn(n, generator=g)
    isr = 0.5 + torch.rand(n, generator=g)
    ratio = torch.exp(torch.randn(n, generator=g) * 0.4)  # spans every clip region
    return [t.to(device) for t in (logp, ref, adv, isr, ratio)]


def _terms_float64(c: dict, logp, ref, adv, isr, ratio):
    """docs/spec.md's per-token loss in float64 with autograd: (loss, kl, d_logp, d_ratio, flags)."""
    lp = logp.double().requires_grad_(True)
    r = ratio.double().requires_grad_(True)
    A, w, rf = adv.double(), isr.double(), ref.double()
    lo, hi = 1 - c["eps_low"], 1 + c["eps_high"]
    zero = torch.zeros_like(A)
    low = high = cis = zero.bool()
    if c["loss_type"] in CLIP_FAMILY:
        r2 = torch.clamp(r, lo, hi)
        r1 = torch.clamp(r, max=c["delta"]) if c["delta"] is not None else r
        L = -torch.min(r1 * A, r2 * A)
        low, high = (r < lo) & (A < 0), (r > hi) & (A > 0)
    elif c["loss_type"] == "cispo":
        L = -torch.clamp(r, max=c["eps_high"]).detach() * A * lp
        cis = (r > c["eps_high"]) & (A > 0)
    else:
        tau = torch.where(A > 0, torch.full_like(A, 1.0), torch.full_like(A, 1.05))
        L = -(4.0 / tau) * torch.sigmoid(tau * (r - 1)) * A
    L = L * w
    kl = zero
    if c["beta"] != 0:
        d = rf - lp
        kl = {"k3": torch.exp(d) - d - 1, "k1": -d, "k2": 0.5 * d * d}[c["kl"]]
        if c["bias"]:
            kl = kl * r
        L = L + c["beta"] * kl
    L.sum().backward()
    d_logp = lp.grad if lp.grad is not None else zero  # None: nothing depends on it (cispo: stop-gradient on r)
    d_ratio = r.grad if r.grad is not None else zero
    return torch.stack([L.detach(), kl.detach(), d_logp, d_ratio, low.double(), high.double(), cis.double()], dim=1)


_TERM_CASES = (
    [dict(loss_type=lt, kl=kl, delta=None, bias=False, beta=0.1, eps_low=0.2, eps_high=0.28) for lt in LOSSES for kl in KLS]
    + [dict(loss_type="grpo", kl="k3", delta=1.5, bias=True, beta=0.05, eps_low=0.2, eps_high=0.28),
       dict(loss_type="dapo", kl="k2", delta=None, bias=True, beta=0.0, eps_low=0.1, eps_high=0.3),
       dict(loss_type="cispo", kl="k1", delta=None, bias=True, beta=0.2, eps_low=0.2, eps_high=1.1)]
)


@needs_ext
@pytest.mark.parametrize("c", _TERM_CASES, ids=lambda c: f"{c['loss_type']}-{c['kl']}-d{c['delta']}-bc{int(c['bias'])}-b{c['beta']}")
def test_header_compiled_by_nvcc_matches_float64(c):
    """grpo_math.h token_terms() built by nvcc (host side of the GF_HD functions) vs SPEC in float64."""
    from grpo_fast.backends import cuda as cuda_backend

    cfg = _cfg(c["loss_type"], c["kl"], delta=c["delta"], bias=c["bias"], beta=c["beta"],
               eps_low=c["eps_low"], eps_high=c["eps_high"])
    ins = _terms_inputs()
    got = cuda_backend.token_terms(cfg, *ins, on_device=False)
    want = _terms_float64(c, *ins)
    names = ["loss", "kl", "d_logp", "d_ratio", "clip_low", "clip_high", "cispo_clip"]
    for k, name in enumerate(names):
        assert_close(got[:, k], want[:, k], 1e-6, 2e-5, f"{c['loss_type']} {name}")


# ---- static resources of the compiled kernels

_KERNELS = {"token_fused_kernel", "logprob_kernel", "logprob_grad_kernel", "seq_row_kernel", "seq_grad_kernel",
            "advantages_kernel", "reduce_stats_kernel", "token_terms_kernel"}


def test_kernels_have_no_spills_and_no_local_memory():
    from benchmarks import cuda_resources as res

    if res.extension_path() is None:
        pytest.skip("grpo_fast._C_cuda is not built")
    if res.cuobjdump_path() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton wheel) to read the cubins with")
    rows = res.cuda_kernel_resources()
    archs = {r["arch"] for r in rows}
    assert {"sm_80", "sm_90"} <= archs, f"sm_80 and sm_90 must be compiled, found {sorted(archs)}"
    for arch in archs:
        found = {r["kernel"] for r in rows if r["arch"] == arch}
        assert found == _KERNELS, f"{arch}: kernels {sorted(found)} != {sorted(_KERNELS)}"
        variants = {r["variant"] for r in rows if r["arch"] == arch and r["kernel"] == "token_fused_kernel"}
        assert variants == {"float", "__nv_bfloat16", "__half"}, variants
    bad = [r for r in rows if r["spill_bytes"] or r["local_bytes"]]
    assert not bad, "kernels with spills or local memory:\n" + res.format_table(bad)
    assert all(0 < r["registers"] <= 128 for r in rows), res.format_table(rows)  # 512 threads/block fit


def test_resource_usage_parser():
    from benchmarks.cuda_resources import parse_resource_usage, split_kernel_name

    text = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN9grpo_fast4cuda18token_fused_kernelI13__nv_bfloat16EEvNS0_7DevArgsE:
  REG:40 STACK:0 SHARED:1416 LOCAL:0 CONSTANT[0]:1128 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9grpo_fast4cuda14seq_row_kernelENS0_7DevArgsE:
  REG:41 STACK:16 SHARED:2304 LOCAL:8 CONSTANT[0]:1128 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90

Resource usage:
 Function _ZN9grpo_fast4cuda14seq_row_kernelENS0_7DevArgsE:
  REG:41 STACK:16 SHARED:2304 LOCAL:8 CONSTANT[0]:1128 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    rows = parse_resource_usage(text)
    assert [(r["kernel"], r["variant"], r["arch"]) for r in rows] == [
        ("seq_row_kernel", "", "sm_90"), ("token_fused_kernel", "__nv_bfloat16", "sm_90")]
    assert (rows[0]["registers"], rows[0]["spill_bytes"], rows[0]["shared_bytes"], rows[0]["local_bytes"]) == (41, 16, 2304, 8)
    assert split_kernel_name("_ZN9grpo_fast4cuda14logprob_kernelIfEEvNS0_7DevArgsE") == ("logprob_kernel", "float")


# ---------------------------------------------------------------------------------------------
# the host-emulation build (tests/backends_fixture.py: ``emulated_ext``); the kernels' conformance
# against the float64 reference is tests/test_backends.py, on "cuda-emulated" and (on a GPU) "cuda"


def test_emulation_build(emulated_ext):
    """grpo_cuda_kernels.cu and the bindings compile with g++ in host emulation and expose the
    extension's interface (the same constants and scratch sizes as the nvcc build)."""
    ext = emulated_ext
    assert ext.NUM_STATS == 8 and ext.TERM_COLUMNS == 7
    for fn in ("fused_loss", "token_logprobs", "fused_scratch_floats"):
        assert hasattr(ext, fn), fn
    tok = ext.fused_scratch_floats(3, 5, 0, False, True)
    assert tok % 64 == 0 and tok >= 3 * 5 * 8
    assert ext.fused_scratch_floats(3, 5, 1, True, True) > ext.fused_scratch_floats(3, 5, 1, True, False)
    if _C_cuda is not None:
        for args in ((3, 5, 0, False, True), (4, 7, 1, True, True), (2, 9, 1, False, False)):
            assert ext.fused_scratch_floats(*args) == _C_cuda.fused_scratch_floats(*args)


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_WHY is not None, reason=f"needs a CUDA device: {_CUDA_WHY}")
@pytest.mark.parametrize("c", _TERM_CASES, ids=lambda c: f"{c['loss_type']}-{c['kl']}-d{c['delta']}-bc{int(c['bias'])}-b{c['beta']}")
def test_header_device_matches_host(c):
    """grpo_math.h as compiled for the GPU gives the numbers its host side (and the CPU backend) gives."""
    from grpo_fast.backends import cuda as cuda_backend

    cfg = _cfg(c["loss_type"], c["kl"], delta=c["delta"], bias=c["bias"], beta=c["beta"],
               eps_low=c["eps_low"], eps_high=c["eps_high"])
    ins = _terms_inputs(n=1000, seed=3)
    host = cuda_backend.token_terms(cfg, *ins, on_device=False)
    dev = cuda_backend.token_terms(cfg, *[t.cuda() for t in ins], on_device=True)
    torch.cuda.synchronize()
    # expf/sigmoid differ by an ulp or two between libm and the device: not bitwise, but close
    assert_close(dev.cpu(), host, 1e-6, 1e-5, f"{c['loss_type']} device vs host")
    assert torch.equal(dev.cpu()[:, 4:], host[:, 4:]), "clip flags"
