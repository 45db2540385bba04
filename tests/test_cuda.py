"""The CUDA C++ backend (csrc/cuda, grpo_fast._C_cuda).

Without a GPU:
  * the extension is built and imports whenever nvcc is present;
  * backend="cuda" raises a RuntimeError saying why (no CUDA device, or not built and how to build);
  * grpo_math.h compiled by nvcc (its __host__ side) gives the float64 per-token math of docs/spec.md;
  * every kernel for every compiled arch has 0 spill bytes and 0 local memory (cuobjdump);
  * the kernel tests below run on the "emulated" target: grpo_cuda_kernels.cu built by g++ with
    csrc/cuda/host_emulation.h (one std::thread per CUDA thread, real barriers and warp shuffles),
    which checks the kernels' logic (indexing, row sweeps, reductions, both levels, inplace)
    but not the device's rounding.
With a GPU (target "cuda", marked ``gpu``; skipped with the reason otherwise): the same tests on the
real kernels, plus the device build of grpo_math.h against its host build.

Each kernel test compares with the float64 reference (grpo_loss_reference on float64 logits): every
loss type × level × KL estimator × dtype, advantage inputs and options, odd V, -inf logits, masked
rows, inplace, strided logits, grad_output != 1, determinism, token_logprobs.
"""
import os
import re
import shutil

import pytest
import torch

import grpo_fast
from grpo_fast._config import CLIP_FAMILY, LOSS_TYPES, KernelConfig
from grpo_fast.backends import unavailable_reason
from grpo_fast.reference import grpo_loss_reference, token_logprobs_reference
from helpers import DTYPE_IDS, assert_close  # tests/helpers.py: the shared mismatch-locating assertion

try:
    from grpo_fast import _C_cuda
except ImportError as e:  # not built (no nvcc, or GRPO_FAST_CUDA=0)
    _C_cuda = None
    _CUDA_IMPORT_ERROR = e

_CUDA_WHY = unavailable_reason("cuda", torch.device("cuda"))
needs_ext = pytest.mark.skipif(_C_cuda is None, reason="grpo_fast._C_cuda is not built (no nvcc at build time)")

LOSSES = list(LOSS_TYPES)
LEVELS = ["token", "sequence"]
KLS = ["k3", "k1", "k2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (dtype, grad atol relative to max|grad|, grad rtol): the gradient comes back in the logits' dtype,
# so its bar is one rounding of that dtype; loss and metrics are fp32 math on every dtype (compared
# with the float64 reference on the same, already rounded, logits).
GRAD_TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (4e-3, 1.6e-2),  # 8 significant bits: one rounding is ≤ 2^-9 relative
    torch.float16: (5e-4, 2e-3),     # 11 bits
}
LOSS_ATOL, LOSS_RTOL = 2e-6, 2e-5
FLAG_METRICS = ("clip_ratio_low", "clip_ratio_high", "clip_ratio", "cispo_clip_ratio")


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
    kw = dict(logits=0, dtype=0, B=1, T=1, V=1, stride_b=1, stride_t=1, ids=0, temperature=1.0, logp=0,
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
# the kernels, on a GPU ("cuda") and in host emulation ("emulated")

_EMU_SOURCES = ["csrc/cuda/grpo_cuda_kernels.cu", "csrc/cuda/grpo_cuda_bindings.cpp"]
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def emulated_ext(tmp_path_factory):
    """grpo_cuda_kernels.cu + the bindings built by g++ with -DGF_HOST_EMULATION, imported as a module."""
    import importlib.util
    import subprocess
    import sysconfig

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the emulated kernels with")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 is not installed")
    out_dir = tmp_path_factory.mktemp("cuda_emu")
    so = out_dir / ("_C_cuda_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, "-O2", "-std=c++20", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing", "-DGF_HOST_EMULATION",
           "-DGF_CUDA_MODULE=_C_cuda_emu", "-Icsrc/common", "-Icsrc/cuda", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}"]
    for src in _EMU_SOURCES:
        cmd += ["-x", "c++", src]
    cmd += ["-o", str(so)]
    res = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True)
    assert res.returncode == 0, f"host-emulation build failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    spec = importlib.util.spec_from_file_location("_C_cuda_emu", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Target:
    """Where the kernel tests run: the "cuda" backend on CUDA tensors, or the same call path on CPU
    tensors with the emulated build installed as the "cuda" backend."""

    def __init__(self, name, device):
        self.name, self.device, self.backend = name, device, "cuda"

    def to(self, *ts):
        out = [t.to(self.device) if isinstance(t, torch.Tensor) else t for t in ts]
        return out if len(out) > 1 else out[0]


@pytest.fixture(params=[
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(_CUDA_WHY is not None, reason=f"needs a CUDA device: {_CUDA_WHY}")]),
    "emulated",
])
def tgt(request, monkeypatch):
    if request.param == "cuda":
        return Target("cuda", "cuda")
    import types

    import grpo_fast.backends as backends
    from grpo_fast.backends import cuda as cuda_backend

    ext = request.getfixturevalue("emulated_ext")
    fake = types.SimpleNamespace(
        DEVICE_TYPES=("cpu",), unavailable_reason=lambda: None,
        fused_loss=lambda inp, grad: cuda_backend.fused_loss_with(ext, inp, grad, 0, 0),
        token_logprobs=lambda z, y, temp, ent: cuda_backend.token_logprobs_with(ext, z, y, temp, ent, 0, 0),
    )
    load = backends._load
    monkeypatch.setattr(backends, "_load", lambda name: fake if name == "cuda" else load(name))
    return Target("emulated", "cpu")


def _inputs(tgt, B=4, T=7, V=53, dtype=torch.float32, seed=0, adv_kind="rows", mask_kind="padded"):
    """Random (never zero) inputs: rounded logits, ids, mask with padding and a fully masked row, old/ref
    log-probs spread around the policy's so that every clip region is visited, and the advantage input."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g) * 2.0).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    lp = token_logprobs_reference(z.double(), y).float()
    old = lp + torch.randn(B, T, generator=g) * 0.3
    ref = lp + torch.randn(B, T, generator=g) * 0.3
    if mask_kind == "padded":
        lens = torch.randint(1, T + 1, (B,), generator=g)
        m = (torch.arange(T)[None, :] < lens[:, None]).float()
        m[-1] = 0.0  # a fully masked row
    else:
        m = torch.ones(B, T)
    kw = dict(old_logp=old, ref_logp=ref, completion_mask=m)
    if adv_kind == "rows":
        kw["advantages"] = torch.randn(B, generator=g)
    elif adv_kind == "tokens":
        kw["advantages"] = torch.randn(B, T, generator=g)
    else:  # rewards; group 0 has equal rewards (its advantages are exactly 0)
        r = torch.rand(B, generator=g)
        r[:2] = 0.5
        kw.update(rewards=r, group_size=2, scale_rewards=adv_kind)
    return tgt.to(z), tgt.to(y), {k: tgt.to(v) for k, v in kw.items()}


def _check(tgt, z, y, *, grad_scale=1.0, inplace=False, **kw):
    """The cuda backend vs grpo_loss_reference on float64 logits: loss, every metric, the gradient."""
    zz = z.clone().requires_grad_(True)
    loss, met = grpo_fast.grpo_loss(zz, y, backend=tgt.backend, inplace=inplace, **kw)
    (loss * grad_scale).backward()
    zr = z.detach().double().requires_grad_(True)
    want_loss, want_met = grpo_loss_reference(zr, y, **kw)
    (want_loss * grad_scale).backward()

    assert loss.dtype == torch.float32 and loss.device == z.device
    assert_close(loss, want_loss, LOSS_ATOL, LOSS_RTOL, "loss")
    assert set(met) == set(want_met), (sorted(met), sorted(want_met))
    for k, v in met.items():
        if k in FLAG_METRICS:
            # fp32 vs fp64 ratios may put one token (or row) on the other side of a clip boundary;
            # flags count per row at sequence level with a per-row advantage, else per valid token
            m, adv = kw.get("completion_mask"), kw.get("advantages")
            per_row = kw.get("importance_sampling_level") == "sequence" and (adv is None or adv.dim() == 1)
            n_tok = float(m.sum()) if m is not None else float(z.shape[0] * z.shape[1])
            denom = float(z.shape[0]) if per_row else max(n_tok, 1.0)
            assert_close(v, want_met[k], 1.01 / denom, 0.0, k)
        else:
            assert_close(v, want_met[k], LOSS_ATOL, LOSS_RTOL, k)
    g = zz.grad
    assert g.dtype == z.dtype and g.shape == z.shape
    atol, rtol = GRAD_TOL[z.dtype]
    wg = zr.grad
    assert_close(g, wg, atol * max(wg.abs().max().item(), 1e-12), rtol, "grad")
    return loss, met, g


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSSES)
def test_matrix(tgt, loss_type, level, kl, dtype):
    """Every loss type × level × KL estimator × dtype, with KL on, padding, a fully masked row; the
    advantage input rotates over (B,), (B, T) and rewards so that each appears with every option."""
    i = LOSSES.index(loss_type) + 7 * LEVELS.index(level) + KLS.index(kl)
    j = LOSSES.index(loss_type) + 7 * LEVELS.index(level)
    diagonal = KLS.index(kl) == j % 3 and DTYPES.index(dtype) == (j // 3) % 3  # one (kl, dtype) per loss × level
    if tgt.name == "emulated" and not diagonal and os.environ.get("GRPO_FAST_EMULATE_FULL") != "1":
        # the emulation runs CUDA threads as OS threads (slow); KL estimators and dtypes are covered by
        # the header test and the other kernel tests, so by default it takes one of each per loss × level
        pytest.skip("emulated: one (KL, dtype) per loss × level; GRPO_FAST_EMULATE_FULL=1 runs all 126")
    adv_kind = ("rows", "tokens", "group")[i % 3]
    z, y, kw = _inputs(tgt, dtype=dtype, seed=i, adv_kind=adv_kind)
    eps_high = 1.1 if loss_type == "cispo" else 0.28  # cispo's raw cap, low enough to be hit
    _check(tgt, z, y, loss_type=loss_type, importance_sampling_level=level, kl_estimator=kl, beta=0.1,
           epsilon_low=0.2, epsilon_high=eps_high, **kw)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSSES)
def test_on_policy_without_kl(tgt, loss_type, level):
    """old_logp=None (r = 1, dr/dlogp = r) and beta = 0 (ref_logp absent)."""
    z, y, kw = _inputs(tgt, seed=11)
    kw.pop("old_logp")
    kw.pop("ref_logp")
    _check(tgt, z, y, loss_type=loss_type, importance_sampling_level=level, **kw)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("adv_kind", ["rows", "tokens", "none", "group", "batch"])
def test_advantage_inputs(tgt, adv_kind, level):
    """(B,) and (B, T) advantages, and rewards with each scale_rewards (a group of equal rewards included)."""
    z, y, kw = _inputs(tgt, B=6, seed=21, adv_kind=adv_kind)
    _check(tgt, z, y, loss_type="grpo", importance_sampling_level=level, beta=0.04, **kw)


_OPTION_CASES = {
    "isr_rows": dict(importance_sampling_ratio="rows"),
    "isr_tokens": dict(importance_sampling_ratio="tokens"),
    "num_items": dict(loss_type="dapo", num_items_in_batch=123),
    "delta": dict(loss_type="grpo", delta=1.6, epsilon_high=0.3),
    "bias_kl": dict(loss_type="bnpo", use_bias_correction_kl=True),
    "dr_grpo_mcl": dict(loss_type="dr_grpo", max_completion_length=19),
    "temperature": dict(loss_type="luspo", temperature=0.7),
    "sapo_temps": dict(loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", list(_OPTION_CASES))
def test_options(tgt, case, level):
    z, y, kw = _inputs(tgt, seed=31, adv_kind="rows")
    opts = dict(_OPTION_CASES[case])
    B, T = y.shape
    g = torch.Generator().manual_seed(5)
    if opts.get("importance_sampling_ratio") == "rows":
        opts["importance_sampling_ratio"] = tgt.to(0.5 + torch.rand(B, generator=g))
    elif opts.get("importance_sampling_ratio") == "tokens":
        opts["importance_sampling_ratio"] = tgt.to(0.5 + torch.rand(B, T, generator=g))
    opts.setdefault("loss_type", "grpo")
    _check(tgt, z, y, importance_sampling_level=level, beta=0.05, **kw, **opts)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype,V", [(torch.float32, 1), (torch.float32, 53), (torch.bfloat16, 53), (torch.float16, 4099),
                                     (torch.float32, 32001), (torch.bfloat16, 32001)],
                         ids=["fp32-V1", "fp32-V53", "bf16-V53", "fp16-V4099", "fp32-V32001", "bf16-V32001"])
def test_odd_vocab(tgt, dtype, V, level):
    """Rows that start off 16-byte boundaries (odd V): head, vector body and tail of each sweep."""
    z, y, kw = _inputs(tgt, B=2, T=3, V=V, dtype=dtype, seed=41, adv_kind="tokens")
    _check(tgt, z, y, loss_type="dapo", importance_sampling_level=level, beta=0.1, **kw)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_neg_inf_logits(tgt, dtype, level):
    """Banned vocabulary entries (-inf) get p = 0, a zero gradient, and no NaN in the entropy."""
    z, y, kw = _inputs(tgt, dtype=dtype, seed=51, adv_kind="group")
    z[..., ::3] = -float("inf")
    y = torch.where(y % 3 == 0, y + 1, y).clamp(max=z.shape[-1] - 1)
    assert (y % 3 != 0).all()
    _, met, g = _check(tgt, z, y, loss_type="grpo", importance_sampling_level=level, beta=0.1, **kw)
    assert (g[..., ::3] == 0).all()
    assert torch.isfinite(met["entropy"])


@pytest.mark.parametrize("level", LEVELS)
def test_nan_logit_propagates(tgt, level):
    """A NaN logit makes the loss NaN, as in PyTorch (fmaxf in the max sweep must not swallow it)."""
    z, y, kw = _inputs(tgt, seed=55, adv_kind="group", mask_kind="full")
    kw.pop("old_logp")
    z[1, 2, 7] = float("nan")
    loss, _ = grpo_fast.grpo_loss(z, y, backend=tgt.backend, loss_type="dapo", importance_sampling_level=level, **kw)
    want, _ = grpo_loss_reference(z.double(), y, loss_type="dapo", importance_sampling_level=level, **kw)
    assert torch.isnan(want) and torch.isnan(loss)


@pytest.mark.parametrize("scale,temperature", [(1e4, 1.0), (2.0, 1e-3), (2.0, 100.0)],
                         ids=["logits1e4", "tau1e-3", "tau100"])
def test_extreme_logits_and_temperatures(tgt, scale, temperature):
    """|logits| of 1e4, or τ = 1e-3 (log-probs ≈ -1e4), or τ = 100: at most twice PyTorch's own float32
    error (flash-attention's rule), plus a floor: the float32 tolerance, and what rounding each log-prob
    to float32 alone moves the loss by (half an ulp of |logp| ≈ 1e4 is 5e-4, times |∂loss/∂logp|),
    which no float32 kernel can beat. (Large logits and small τ at once put the log-probs near -1e8,
    where float32 has no digits left for a ratio: not a meaningful case.)"""
    z, y, kw = _inputs(tgt, seed=57, adv_kind="group", mask_kind="full")
    z = z * scale
    lp64 = token_logprobs_reference(z.double(), y, temperature)
    g = torch.Generator().manual_seed(58)
    old = lp64.float() + tgt.to(torch.randn(y.shape, generator=g) * 0.05)
    kw.update(old_logp=old, ref_logp=old - 0.1, temperature=temperature, loss_type="dapo", beta=0.05)
    outs = {}
    for name, be, zz in (("kernel", tgt.backend, z.clone()), ("fp32", "torch", z.clone()), ("fp64", "torch", z.double())):
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


@pytest.mark.parametrize("level", LEVELS)
def test_fully_masked_rows_and_batch(tgt, level):
    z, y, kw = _inputs(tgt, seed=61, adv_kind="rows")
    _, _, g = _check(tgt, z, y, loss_type="bnpo", importance_sampling_level=level, beta=0.1, **kw)
    assert (g[-1] == 0).all()  # the fully masked row
    kw["completion_mask"] = torch.zeros_like(kw["completion_mask"])
    loss, met, g = _check(tgt, z, y, loss_type="grpo", importance_sampling_level=level, beta=0.1, **kw)
    assert loss.item() == 0.0 and (g == 0).all()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_inplace(tgt, dtype, level):
    """inplace=True: the logits' storage then holds exactly the gradient inplace=False returns."""
    z, y, kw = _inputs(tgt, dtype=dtype, V=131, seed=71, adv_kind="tokens")
    opts = dict(loss_type="dapo", importance_sampling_level=level, beta=0.1, **kw)
    z_keep = z.clone()
    zz = z.clone().requires_grad_(True)
    loss, _ = grpo_fast.grpo_loss(zz, y, backend=tgt.backend, **opts)
    loss.backward()
    assert torch.equal(z, z_keep) and torch.equal(zz.detach(), z_keep), "inplace=False must leave the logits untouched"
    zi = z.clone().requires_grad_(True)
    loss_i, _ = grpo_fast.grpo_loss(zi, y, backend=tgt.backend, inplace=True, **opts)
    loss_i.backward()
    assert torch.equal(loss_i, loss)
    assert torch.equal(zi.grad, zz.grad)
    assert torch.equal(zi.detach(), zz.grad), "with inplace=True the logits hold the gradient"
    _check(tgt, z, y, inplace=True, **opts)  # and that gradient is the reference's


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype,V", [(torch.float32, 53), (torch.bfloat16, 4104)], ids=["fp32-V53", "bf16-V4104"])
def test_strided_logits_and_grad_scale(tgt, dtype, V, level):
    """A slice along T of a bigger tensor (read in place, B/T strides free; the gradient buffer sits
    differently against 16-byte boundaries) and grad_output = 3.5."""
    B, T = 3, 6
    g = torch.Generator().manual_seed(81)
    big = tgt.to((torch.randn(B, T + 2, V, generator=g) * 2).to(dtype))
    z = big[:, 1:-1]
    assert not z.is_contiguous()
    _, y, kw = _inputs(tgt, B=B, T=T, V=V, dtype=dtype, seed=82, adv_kind="rows")
    zz = z.detach().requires_grad_(True)
    loss, _ = grpo_fast.grpo_loss(zz, y, backend=tgt.backend, loss_type="grpo", importance_sampling_level=level, **kw)
    (loss * 3.5).backward()
    zr = z.detach().double().requires_grad_(True)
    want, _ = grpo_loss_reference(zr, y, loss_type="grpo", importance_sampling_level=level, **kw)
    (want * 3.5).backward()
    assert_close(loss, want, LOSS_ATOL, LOSS_RTOL, "loss")
    atol, rtol = GRAD_TOL[dtype]
    assert_close(zz.grad, zr.grad, atol * zr.grad.abs().max().item(), rtol, "grad")


@pytest.mark.parametrize("level", LEVELS)
def test_deterministic(tgt, level):
    """No float atomics: two runs give bitwise the same loss, metrics and gradient."""
    z, y, kw = _inputs(tgt, B=8, T=9, V=1031, dtype=torch.bfloat16, seed=91, adv_kind="group")
    outs = []
    for _ in range(2):
        zz = z.clone().requires_grad_(True)
        loss, met = grpo_fast.grpo_loss(zz, y, backend=tgt.backend, loss_type="grpo", importance_sampling_level=level,
                                        beta=0.1, **kw)
        loss.backward()
        outs.append((loss, met, zz.grad))
    (l0, m0, g0), (l1, m1, g1) = outs
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)


def test_forward_only(tgt):
    """Logits without requires_grad: no gradient is written, the loss and metrics are the same."""
    z, y, kw = _inputs(tgt, seed=101, adv_kind="rows")
    z_keep = z.clone()
    loss, met = grpo_fast.grpo_loss(z, y, backend=tgt.backend, loss_type="grpo", beta=0.1, **kw)
    want, want_met = grpo_loss_reference(z.double(), y, loss_type="grpo", beta=0.1, **kw)
    assert torch.equal(z, z_keep)
    assert_close(loss, want, LOSS_ATOL, LOSS_RTOL, "loss")
    assert_close(met["entropy"], want_met["entropy"], LOSS_ATOL, LOSS_RTOL, "entropy")


@pytest.mark.parametrize("dtype,V", [(torch.float32, 53), (torch.bfloat16, 53), (torch.float16, 4099),
                                     (torch.bfloat16, 32001)], ids=["fp32-V53", "bf16-V53", "fp16-V4099", "bf16-V32001"])
def test_token_logprobs(tgt, dtype, V):
    z, y, _ = _inputs(tgt, B=3, T=5, V=V, dtype=dtype, seed=111)
    z[0, 0, ::5] = -float("inf")
    y[0, 0] = 1
    for temp in (1.0, 0.7):
        logp, ent = grpo_fast.token_logprobs(z, y, temp, return_entropy=True, backend=tgt.backend)
        want_lp, want_ent = token_logprobs_reference(z.double(), y, temp, return_entropy=True)
        assert logp.dtype == torch.float32 and ent.dtype == torch.float32
        assert_close(logp, want_lp, 2e-5, 2e-6, f"logp T={temp}")
        assert_close(ent, want_ent, 2e-5, 2e-6, f"entropy T={temp}")
        lp_only = grpo_fast.token_logprobs(z, y, temp, backend=tgt.backend)
        assert torch.equal(lp_only, logp)


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
