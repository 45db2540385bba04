"""`python -m benchmarks kernels`: registers, spills and shared memory of the GPU kernels, no GPU needed.

Each Triton kernel is compiled ahead of time (``triton.compile`` on an ``ASTSource`` with an
explicit ``GPUTarget``) for sm_80 (A100) and sm_90 (H100), for every pinned launch config
(grpo_fast.backends.triton_backend.pinned_config), and the PTX is run through the ``ptxas`` that
ships in the Triton wheel with ``-v``, which reports registers per thread, spill stores/loads and
static shared memory. Triton's own shared-memory scratch (for the cross-warp reductions) comes from
the compiled kernel's metadata.

What is compiled is what runs: Triton's launcher specializes every pointer whose address and every
integer argument whose value is a multiple of 16 (``tt.divisibility = 16``), and that decides the
width of the loads. Each V-streaming kernel is compiled twice: "÷16" (pointers, V and the row
strides multiples of 16, e.g. V = 32000, 128256, 151936 with contiguous logits: 16-byte vector
loads) and "unaligned" (pointers aligned, V and strides not, e.g. V = 50257: element-wide loads).
From the PTX the report also reads the widest vector load and store of global memory (the logits
and the gradient; every other access is a scalar) and the L2 eviction policies the kernel creates
(evict_last for a row read twice, evict_first for its last read and the gradient stores). The CUDA C++ kernels are
added when ``benchmarks.cuda_resources.cuda_kernel_resources()`` exists.

Exit status: 0 when nothing spills, 1 when some kernel spills, 2 when nothing could be compiled.

    python -m benchmarks kernels [--arch 80,90] [--quick | --variants] [--triton-only] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from grpo_fast._config import FAMILY_CODES, KL_ESTIMATORS, LOSS_BY_CODE, LOSS_TABLE
from grpo_fast.backends.triton_backend import NUM_STAGES  # what the launchers pass

ARCHS = (80, 90)


@dataclass
class KernelResources:
    kernel: str
    variant: str  # which constexpr flags (loss type, dtype, ...)
    config: str  # BLOCK_V / num_warps / num_stages
    arch: str  # "sm_80"
    registers: int
    spill_bytes: int  # spill stores + spill loads reported by ptxas
    shared_bytes: int  # Triton's dynamic shared memory + ptxas' static smem
    local_bytes: int = 0  # stack frame (0 unless something spills or an array lives in local memory)
    source: str = "triton"
    align: str = ""  # "÷16" or "unaligned" (see the module doc); "" for the CUDA kernels
    ld_vec_bytes: int = 0  # widest vector load from global memory in bytes (0: scalar loads only)
    st_vec_bytes: int = 0  # widest vector store to global memory in bytes
    l2_policies: str = ""  # L2 eviction policies the kernel creates, e.g. "evict_first,evict_last"


# ---------------------------------------------------------------------------------------------
# compiling without a GPU


@contextlib.contextmanager
def _interpreter_off():
    """TRITON_INTERPRET unset for the duration: @triton.jit then builds compilable JITFunctions, and
    the code generator (which also consults the variable) emits GPU code. The CPU tests set it."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _aot_kernels_module():
    """grpo_fast/kernels/grpo.py loaded as a private module with the interpreter switched off.

    Under TRITON_INTERPRET=1 (the CPU test setup) ``@triton.jit`` makes interpreter objects that
    ``triton.compile`` cannot take, so the file is executed again, as a module of its own.
    """
    from grpo_fast.backends.triton_backend import kernels_dir

    path = kernels_dir() / "grpo.py"
    with _interpreter_off():
        spec = importlib.util.spec_from_file_location("_grpo_fast_kernels_aot", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ptxas_path() -> Optional[str]:
    """The ptxas binary of the Triton wheel (or $TRITON_PTXAS_PATH), or None."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env and os.path.isfile(env):
        return env
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(p) if p.is_file() else None


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def _ptxas_for(arch: int):
    """(ptxas binary, --gpu-name) exactly as Triton's own NVIDIA backend picks them for ``arch``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        return get_ptxas(arch).path, sm_arch_from_capability(arch)
    except (ImportError, AttributeError):  # another Triton layout: the wheel's ptxas, plain sm_XY
        return ptxas_path(), f"sm_{arch}"


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spills, stack and static smem of the (single) kernel in ``ptx``, from ptxas -v.

    Same ptxas and register-allocation flag as Triton's compile, so the numbers are the ones of
    the cubin Triton would load.
    """
    ptxas, gpu_name = _ptxas_for(arch)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu_name}: {out.stderr.strip()[:2000]}")
    log = out.stdout + out.stderr

    def grab(key):
        m = _PTXAS_RE[key].search(log)
        return int(m.group(1)) if m else 0

    return dict(registers=grab("registers"), spill_bytes=grab("spill_st") + grab("spill_ld"),
                stack=grab("stack"), smem=grab("smem"))


ALIGNED_INTS = ("V", "stride_lb", "stride_lt", "stride_gb", "stride_gt")


def divisibility_attrs(fn, signature: dict, aligned: bool) -> dict:
    """The ``tt.divisibility = 16`` attributes Triton's launcher would pass: every pointer (torch
    allocations are 256-byte aligned), and with ``aligned`` also V and the row strides."""
    names = [n for n, t in signature.items() if t.startswith("*") or (aligned and n in ALIGNED_INTS)]
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


_GLOBAL_OP_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?((ld|st)\.global[.\w:]*)", re.M)


def ptx_memory_ops(ptx: str) -> dict:
    """Widest vector ld.global / st.global in bytes (0 when all are scalar) and the L2 eviction
    policies created (createpolicy), from a kernel's PTX."""
    widest = {"ld": 0, "st": 0}
    for op, kind in _GLOBAL_OP_RE.findall(ptx):
        m = re.search(r"\.v(\d)\.b(\d+)", op)
        if m:
            widest[kind] = max(widest[kind], int(m.group(1)) * int(m.group(2)) // 8)
    policies = sorted(set(re.findall(r"createpolicy\.fractional\.L2::(\w+)", ptx)))
    return dict(ld_vec_bytes=widest["ld"], st_vec_bytes=widest["st"], l2_policies=",".join(policies))


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int,
                   aligned: bool = True):
    """triton.compile for a CUDA target without a device, with the launcher's divisibility
    specialization (``aligned``: see divisibility_attrs); returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    for prm in fn.params:  # constexpr parameters with a default (e.g. SOFT_BF16) take it
        if prm.is_constexpr and prm.has_default and prm.name not in constexprs:
            constexprs[prm.name] = prm.default
    sig = {k: v for k, v in signature.items() if k not in constexprs}
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=divisibility_attrs(fn, sig, aligned))
    with _interpreter_off():
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def measure(fn, signature, constexprs, arch, num_warps, num_stages, aligned: bool = True) -> dict:
    k = compile_kernel(fn, signature, constexprs, arch, num_warps, num_stages, aligned)
    use = _ptxas_usage(k.asm["ptx"], arch)
    return dict(registers=use["registers"], spill_bytes=use["spill_bytes"],
                shared_bytes=int(k.metadata.shared) + use["smem"], local_bytes=use["stack"],
                **ptx_memory_ops(k.asm["ptx"]))


# ---------------------------------------------------------------------------------------------
# what to compile


def _ptr(dtype: str) -> str:
    return "*" + dtype


def _sig_logprobs(ldt):
    return {"logits_ptr": _ptr(ldt), "ids_ptr": "*i64", "mask_ptr": "*fp32", "logp_ptr": "*fp32",
            "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "T": "i32", "V": "i32", "stride_lb": "i32",
            "stride_lt": "i32", "temperature": "fp32"}


_SIDE = ("mask_ptr", "weight_ptr", "adv_ptr", "rewards_ptr", "batch_std_ptr", "old_ptr", "ref_ptr", "isr_ptr")
_FLOATS = ("eps_low", "eps_high", "delta", "beta", "sapo_pos", "sapo_neg", "lr_clamp", "dual_c", "is_lo", "is_hi", "adv_eps")


def _sig_token_fwd(ldt):
    s = {"logits_ptr": _ptr(ldt), "ids_ptr": "*i64"}
    s.update({k: ("*fp64" if k == "batch_std_ptr" else "*fp32") for k in _SIDE})
    s.update({"grad_ptr": _ptr(ldt), "logp_ptr": "*fp32", "stats_ptr": "*fp32"})
    s.update({k: "i32" for k in ("N", "T", "V", "G", "stride_lb", "stride_lt", "stride_gb", "stride_gt")})
    s["temperature"] = "fp32"
    s.update({k: "fp32" for k in _FLOATS})
    s["ew_ptr"] = "*fp32"  # the entropy bonus's weights (read only with HAS_ENT)
    return s


def _sig_seq_row():
    s = {"logp_ptr": "*fp32", "entropy_ptr": "*fp32"}
    s.update({k: ("*fp64" if k == "batch_std_ptr" else "*fp32") for k in _SIDE})
    s.update({"g_ptr": "*fp32", "stats_ptr": "*fp32", "T": "i32", "G": "i32"})
    s.update({k: "fp32" for k in _FLOATS})
    return s


def _sig_grad(ldt):
    return {"logits_ptr": _ptr(ldt), "ids_ptr": "*i64", "lse_ptr": "*fp32", "g_ptr": "*fp32", "grad_ptr": _ptr(ldt),
            "T": "i32", "V": "i32", "stride_lb": "i32", "stride_lt": "i32", "stride_gb": "i32", "stride_gt": "i32",
            "temperature": "fp32", "ew_ptr": "*fp32", "entropy_ptr": "*fp32"}


def _sig_lp_fwd(ldt):
    return {"logits_ptr": _ptr(ldt), "ids_ptr": "*i64", "tau_ptr": "*fp32", "mask_ptr": "*fp32", "logp_ptr": "*fp32",
            "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "T": "i32", "V": "i32", "stride_lb": "i32",
            "stride_lt": "i32", "temperature": "fp32"}


def _sig_lp_bwd(ldt):
    return {"logits_ptr": _ptr(ldt), "ids_ptr": "*i64", "tau_ptr": "*fp32", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
            "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "grad_ptr": _ptr(ldt), "T": "i32", "V": "i32",
            "stride_lb": "i32", "stride_lt": "i32", "stride_gb": "i32", "stride_gt": "i32", "temperature": "fp32"}


_LP_FWD_ALL = {"TAU_PER_ROW": True, "HAS_MASK": True, "STORE_ENTROPY": True}
_LP_BWD_ALL = {"TAU_PER_ROW": True, "HAS_G_LOGP": True, "HAS_G_ENT": True}


def _loss_flags(loss_type: int, *, kl=True, grad=True, adv_mode=2, level_seq=False):
    t = LOSS_BY_CODE[loss_type]
    f = dict(FAMILY=FAMILY_CODES[t.family], KL_EST=0, HAS_DELTA=t.delta, HAS_KL=kl, BIAS_KL=False, HAS_OLD=True,
             ADV_MODE=adv_mode, SCALE=1, ISR_MODE=2, HAS_GRAD=grad, BLOCK_G=16, CLAMP_S=False, DUAL_CLIP=False)
    return f


def _verl_flags():
    """verl's vanilla as verl_losses.fused_policy_loss runs it: log-ratio clamp, dual clip, per-token
    advantages, the IS weights folded into the aggregation weights, gradient."""
    return {**_loss_flags(0, kl=False, adv_mode=1), "HAS_DELTA": False, "ISR_MODE": 0, "CLAMP_S": True,
            "DUAL_CLIP": True}


# One loss type of each per-token family (the kernels' code paths): the first of each in the table.
LOSS_NAMES = {}
for _t in LOSS_TABLE.values():
    if _t.family not in {LOSS_BY_CODE[c].family for c in LOSS_NAMES}:
        LOSS_NAMES[_t.code] = _t.name


_DTYPE_OF = {2: "bf16", 4: "fp32"}


def _streaming_jobs(bv: int, nw: int, dt: str, cfg: str, aligned: bool, ns: int):
    """The five V-streaming kernels at one config, heaviest flag set (the loss kernel also with verl's
    vanilla flags), logits of dtype ``dt``."""
    tag = "" if aligned else " unaligned"
    return [
        ("_grpo_token_fwd_kernel", f"grpo+delta+k3+rewards+grad {dt}{tag}", _sig_token_fwd(dt),
         {**_loss_flags(0), "BLOCK_V": bv}, nw, ns, cfg, aligned),
        ("_grpo_token_fwd_kernel", f"verl vanilla (clamp+dual clip)+grad {dt}{tag}", _sig_token_fwd(dt),
         {**_verl_flags(), "BLOCK_V": bv}, nw, ns, cfg, aligned),
        ("_token_logprobs_kernel", f"mask+logp+entropy+lse {dt}{tag}", _sig_logprobs(dt),
         {"HAS_MASK": True, "STORE_ENTROPY": True, "STORE_LSE": True, "BLOCK_V": bv}, nw, ns, cfg, aligned),
        ("_grpo_grad_kernel", f"{dt}{tag}", _sig_grad(dt), {"BLOCK_V": bv}, nw, ns, cfg, aligned),
        ("_logprobs_fwd_kernel", f"tau per row+entropy {dt}{tag}", _sig_lp_fwd(dt),
         {**_LP_FWD_ALL, "BLOCK_V": bv}, nw, ns, cfg, aligned),
        ("_logprobs_bwd_kernel", f"tau per row+g_logp+g_entropy {dt}{tag}", _sig_lp_bwd(dt),
         {**_LP_BWD_ALL, "BLOCK_V": bv}, nw, ns, cfg, aligned),
    ]


STREAMING_KERNELS = 6  # entries of _streaming_jobs


def jobs(quick: bool = False, arch: int = 90):
    """(kernel, variant, fn-name, signature, constexprs, num_warps, num_stages, config label, aligned)
    to compile for ``arch``.

    Every pinned config of ``arch`` (triton_backend.pinned_configs: BLOCK_V, num_warps per bytes
    per logit) of the five V-streaming kernels, ÷16 and unaligned, with the heaviest flag set
    (clip loss with delta, k3 KL, in-kernel advantage, per-token isr, gradient; for the logprobs
    kernels per-token τ, entropy and both upstream gradients); the other loss types and fp16 at
    the bf16 config of real vocabularies. ``quick``: only the configs of real vocabularies
    (the largest block, 16 KB on sm_90, 8 KB on sm_80), bf16 and fp32, ÷16 and unaligned.
    """
    from grpo_fast.backends.triton_backend import pinned_config, pinned_configs

    out = []
    largest = max(bv * e for bv, _, e in pinned_configs(arch))
    for bv, nw, e in pinned_configs(arch):
        if quick and bv * e != largest:
            continue
        cfg = f"BLOCK_V={bv} warps={nw}"
        for aligned in (True, False):
            out += _streaming_jobs(bv, nw, _DTYPE_OF[e], cfg, aligned, NUM_STAGES)
    out.append(("_grpo_seq_row_kernel", "grpo+delta+k3+rewards+grad", _sig_seq_row(),
                {**_loss_flags(0), "BLOCK_T": 1024}, 4, NUM_STAGES, "BLOCK_T=1024 warps=4", True))
    if quick:
        return out
    bv, nw = pinned_config(151936, 2, arch)
    dcfg = f"BLOCK_V={bv} warps={nw}"
    for lt in (5, 6):
        out.append(("_grpo_token_fwd_kernel", f"{LOSS_NAMES[lt]}+k3+rewards+grad bf16", _sig_token_fwd("bf16"),
                    {**_loss_flags(lt), "BLOCK_V": bv}, nw, NUM_STAGES, dcfg, True))
        out.append(("_grpo_seq_row_kernel", f"{LOSS_NAMES[lt]}+k3+rewards+grad", _sig_seq_row(),
                    {**_loss_flags(lt), "BLOCK_T": 1024}, 4, NUM_STAGES, "BLOCK_T=1024 warps=4", True))
    out.append(("_grpo_token_fwd_kernel", "grpo, no grad, fp16", _sig_token_fwd("fp16"),
                {**_loss_flags(0, kl=False, grad=False, adv_mode=0), "BLOCK_V": bv}, nw, NUM_STAGES, dcfg, True))
    # the entropy bonus (entropy_coef) at the config of real vocabularies
    out.append(("_grpo_token_fwd_kernel", "grpo+k3+rewards+grad+entropy bonus bf16", _sig_token_fwd("bf16"),
                {**_loss_flags(0), "HAS_ENT": True, "BLOCK_V": bv}, nw, NUM_STAGES, dcfg, True))
    out.append(("_grpo_grad_kernel", "entropy bonus bf16", _sig_grad("bf16"), {"HAS_ENT": True, "BLOCK_V": bv}, nw,
                NUM_STAGES, dcfg, True))
    return out


def _triton_imported_interpreted() -> bool:
    """True when this process imported (or would import) Triton in interpreter mode: its own
    library functions (tl.sum, tl.cdiv, ... are @jit functions) are then interpreter objects and
    nothing compiles for a GPU in this process."""
    if "triton" not in sys.modules:
        # not imported yet: it would be, interpreted, if the variable is set
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    try:
        from triton.runtime.interpreter import InterpretedFunction
        import triton.language.standard as std
    except ImportError:
        return False
    return isinstance(getattr(std, "sum", None), InterpretedFunction)


def _triton_report_subprocess(archs, quick: bool, variants: bool = False) -> list[KernelResources]:
    """triton_report in a fresh interpreter with TRITON_INTERPRET unset (see above)."""
    pkg_parent = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        cmd = [sys.executable, "-m", "benchmarks.kernel_report", "--triton-only", "--json", out,
               "--arch", ",".join(map(str, archs))] + (["--quick"] if quick else []) + (["--variants"] if variants else [])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode not in (0, 1) or not os.path.exists(out):  # 1 with a report: something spills
            raise RuntimeError(f"kernel report subprocess failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        with open(out) as f:
            return [KernelResources(**d) for d in json.load(f)]


def variant_jobs():
    """Every constexpr flag of the loss kernels varied one at a time from a base set, plus every
    logits dtype and the token_logprobs / logprobs flags, at the default config: a compile check for code
    paths the interpreter accepts but the GPU compiler might not (types differing across branches)."""
    from grpo_fast.backends.triton_backend import pinned_config

    DEFAULT_BLOCK_V, DEFAULT_WARPS = pinned_config(1024, 2)  # small blocks: quick compiles
    base = _loss_flags(0)
    options = dict(FAMILY=sorted(FAMILY_CODES.values()), KL_EST=sorted(KL_ESTIMATORS.values()), HAS_DELTA=(False, True), HAS_KL=(False, True),
                   BIAS_KL=(False, True), HAS_OLD=(False, True), ADV_MODE=range(3), SCALE=range(3),
                   ISR_MODE=range(3), HAS_GRAD=(False, True), CLAMP_S=(False, True), DUAL_CLIP=(False, True))
    flag_sets = [base] + [{**base, k: v} for k, vals in options.items() for v in vals if v != base[k]]
    dcfg = f"BLOCK_V={DEFAULT_BLOCK_V} warps={DEFAULT_WARPS}"
    out = []
    for f in flag_sets:
        label = ",".join(f"{k}={int(v)}" for k, v in f.items() if k != "BLOCK_G" and v != base[k]) or "base"
        out.append(("_grpo_token_fwd_kernel", label, _sig_token_fwd("bf16"), {**f, "BLOCK_V": DEFAULT_BLOCK_V},
                    DEFAULT_WARPS, NUM_STAGES, dcfg))
        out.append(("_grpo_seq_row_kernel", label, _sig_seq_row(), {**f, "BLOCK_T": 256}, 4, NUM_STAGES, "BLOCK_T=256 warps=4"))
    for dt in ("fp32", "fp16"):
        out.append(("_grpo_token_fwd_kernel", f"logits {dt}", _sig_token_fwd(dt), {**base, "BLOCK_V": DEFAULT_BLOCK_V},
                    DEFAULT_WARPS, NUM_STAGES, dcfg))
        out.append(("_grpo_grad_kernel", f"logits {dt}", _sig_grad(dt), {"BLOCK_V": DEFAULT_BLOCK_V}, DEFAULT_WARPS, NUM_STAGES, dcfg))
    for dt in ("bf16", "fp32"):  # the entropy bonus (entropy_coef): token level and sequence level's pass 3
        out.append(("_grpo_token_fwd_kernel", f"HAS_ENT=1, logits {dt}", _sig_token_fwd(dt),
                    {**base, "HAS_ENT": True, "BLOCK_V": DEFAULT_BLOCK_V}, DEFAULT_WARPS, NUM_STAGES, dcfg))
        out.append(("_grpo_grad_kernel", f"HAS_ENT=1, logits {dt}", _sig_grad(dt),
                    {"HAS_ENT": True, "BLOCK_V": DEFAULT_BLOCK_V}, DEFAULT_WARPS, NUM_STAGES, dcfg))
    # Triton specializes integer arguments equal to 1 into constants (T = 1, V = 1, no group)
    ones = {"T": 1, "V": 1}
    out.append(("_grpo_token_fwd_kernel", "T=V=G=1 (specialized)", _sig_token_fwd("bf16"),
                {**base, **ones, "G": 1, "BLOCK_V": DEFAULT_BLOCK_V}, DEFAULT_WARPS, NUM_STAGES, dcfg))
    out.append(("_grpo_seq_row_kernel", "T=G=1 (specialized)", _sig_seq_row(), {**base, "T": 1, "G": 1, "BLOCK_T": 1},
                4, NUM_STAGES, "BLOCK_T=1 warps=4"))
    out.append(("_grpo_grad_kernel", "T=V=1 (specialized)", _sig_grad("bf16"), {**ones, "BLOCK_V": DEFAULT_BLOCK_V},
                DEFAULT_WARPS, NUM_STAGES, dcfg))
    for dt in ("bf16", "fp32", "fp16"):
        for ent, lse in ((False, False), (True, False)):
            for mask in ((False, True) if dt == "bf16" else (False,)):
                out.append(("_token_logprobs_kernel", f"logits {dt}, mask={int(mask)}, entropy={int(ent)}, lse={int(lse)}",
                            _sig_logprobs(dt), {"HAS_MASK": mask, "STORE_ENTROPY": ent, "STORE_LSE": lse,
                                                "BLOCK_V": DEFAULT_BLOCK_V}, DEFAULT_WARPS, NUM_STAGES, dcfg))
    for dt in ("bf16", "fp32", "fp16"):
        for flags in ({}, {"TAU_PER_ROW": True}, {"STORE_ENTROPY": True}, _LP_FWD_ALL):
            label = f"logits {dt}, " + (",".join(k for k in flags) or "no flags")
            out.append(("_logprobs_fwd_kernel", label, _sig_lp_fwd(dt),
                        {"TAU_PER_ROW": False, "HAS_MASK": False, "STORE_ENTROPY": False, **flags,
                         "BLOCK_V": DEFAULT_BLOCK_V},
                        DEFAULT_WARPS, NUM_STAGES, dcfg))
        for flags in ({"HAS_G_LOGP": True}, {"HAS_G_ENT": True}, _LP_BWD_ALL):
            label = f"logits {dt}, " + ",".join(k for k in flags)
            out.append(("_logprobs_bwd_kernel", label, _sig_lp_bwd(dt),
                        {"TAU_PER_ROW": False, "HAS_G_LOGP": False, "HAS_G_ENT": False, **flags,
                         "BLOCK_V": DEFAULT_BLOCK_V}, DEFAULT_WARPS, NUM_STAGES, dcfg))
    return out


_AOT_MODULE = None


def _measure_job(job) -> KernelResources:
    """One (kernel, variant, ..., arch) compile; the unit of work of the process pool."""
    global _AOT_MODULE
    if _AOT_MODULE is None:
        _AOT_MODULE = _aot_kernels_module()
    name, variant, sig, consts, nw, ns, cfg, arch = job
    aligned = True
    if isinstance(arch, tuple):  # (aligned, arch)
        aligned, arch = arch
    r = measure(getattr(_AOT_MODULE, name), sig, consts, arch, nw, ns, aligned)
    return KernelResources(kernel=name, variant=variant, config=cfg, arch=f"sm_{arch}",
                           align="÷16" if aligned else "unaligned", **r)


def triton_report(archs=ARCHS, quick: bool = False, variants: bool = False, workers: Optional[int] = None) -> list[KernelResources]:
    """Compile every job for every arch; one row each, in the order of the jobs.

    Compiles run in ``workers`` processes (default: the CPU count, at most 8; each compile is
    single-threaded MLIR + a ptxas subprocess). The whole report runs in a child process when this
    one imported Triton in interpreter mode (the CPU test session).
    """
    if _triton_imported_interpreted():
        return _triton_report_subprocess(archs, quick, variants)
    work = []
    for arch in archs:
        for job in (variant_jobs() if variants else jobs(quick, arch)):
            if len(job) == 8:  # (..., aligned)
                work.append(job[:7] + ((job[7], arch),))
            else:
                work.append(job + (arch,))
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers <= 1 or len(work) < 4:
        return [_measure_job(j) for j in work]
    import concurrent.futures as cf
    import multiprocessing as mp

    # fork: the workers inherit the loaded modules; nothing here has touched a GPU
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_measure_job, work))


def cuda_report() -> list[KernelResources]:
    """The CUDA extension's kernels, when its helper module exists (written by the CUDA backend)."""
    try:
        from . import cuda_resources
    except ImportError:
        return []
    rows = []
    for d in cuda_resources.cuda_kernel_resources():
        rows.append(KernelResources(kernel=d["kernel"], variant=d.get("variant", ""), config=d.get("config", ""),
                                    arch=str(d["arch"]), registers=int(d["registers"]), spill_bytes=int(d["spill_bytes"]),
                                    shared_bytes=int(d["shared_bytes"]), local_bytes=int(d.get("local_bytes", 0)),
                                    source="cuda"))
    return rows


def format_table(rows: list[KernelResources]) -> str:
    head = ("source", "kernel", "variant", "config", "arch", "align", "regs", "spill B", "smem B", "stack B",
            "ld vec B", "st vec B", "L2 policies")
    body = [(r.source, r.kernel, r.variant, r.config, r.arch, r.align or "-", str(r.registers), str(r.spill_bytes),
             str(r.shared_bytes), str(r.local_bytes), str(r.ld_vec_bytes) if r.source == "triton" else "-",
             str(r.st_vec_bytes) if r.source == "triton" else "-", r.l2_policies or "-") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated SM versions (default 80,90)")
    ap.add_argument("--quick", action="store_true", help="only the pinned configs of real vocabularies (V >= 8192)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    ap.add_argument("--triton-only", action="store_true", help="leave out the CUDA C++ kernels")
    ap.add_argument("--variants", action="store_true",
                    help="instead of the configs: every constexpr flag of the Triton kernels, one at a time (compile check)")
    args = ap.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(",") if a.strip())

    rows: list[KernelResources] = []
    problems = []
    if not _have_triton():
        problems.append("Triton is not installed: no Triton kernels compiled (pip install triton)")
    elif ptxas_path() is None:
        problems.append("ptxas not found in the Triton wheel (set TRITON_PTXAS_PATH): no Triton kernels measured")
    else:
        rows += triton_report(archs, args.quick, args.variants)
    if not args.triton_only:
        rows += cuda_report()
    if not rows:
        print("\n".join(problems) or "no kernels to report")
        return 2
    print(format_table(rows))
    for p in problems:
        print(p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    spilling = [r for r in rows if r.spill_bytes > 0]
    if spilling:
        print(f"\n{len(spilling)} kernel build(s) spill registers:")
        for r in spilling:
            print(f"  {r.source} {r.kernel} [{r.variant}; {r.config}] {r.arch}: {r.spill_bytes} bytes")
        return 1
    print(f"\n{len(rows)} kernel builds, none spills.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
