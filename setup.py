"""Builds grpo_fast._C_cpu (always) and grpo_fast._C_cuda (when nvcc is found).

Environment:
  GRPO_FAST_CUDA=auto|0|1   auto (default): build the CUDA extension when nvcc is on PATH or
                            CUDA_HOME is set, warn and skip otherwise; 0: never; 1: required.
  GRPO_FAST_NO_OPENMP=1     build the CPU extension single-threaded.
"""
import os
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    # -ffp-contract=off: the kernels place their FMAs by hand; a compiler-made one (GNU mode, clang)
    # would change x = z/τ rounding that the row max relies on (csrc/cpu/row_kernels.h: vshift).
    cflags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    lflags = []
    if os.environ.get("GRPO_FAST_NO_OPENMP") != "1" and sys.platform != "darwin":
        cflags.append("-fopenmp")
        lflags.append("-fopenmp")
    return Pybind11Extension(
        "grpo_fast._C_cpu",
        sources=["csrc/cpu/grpo_cpu.cpp"],
        include_dirs=["csrc/common"],
        # rebuild when a header changes (build_ext only compares the .cpp otherwise)
        depends=sorted(os.path.join("csrc/cpu", f) for f in os.listdir(os.path.join(HERE, "csrc/cpu")) if f.endswith(".h"))
        + sorted(os.path.join("csrc/common", f) for f in os.listdir(os.path.join(HERE, "csrc/common")) if f.endswith(".h")),
        extra_compile_args=cflags,
        extra_link_args=lflags,
        cxx_std=17,
    )


# ---- CUDA extension (csrc/cuda) -------------------------------------------------------------
# BEGIN CUDA BUILD (owned by the CUDA backend; see csrc/cuda/)
# grpo_fast._C_cuda = csrc/cuda/grpo_cuda_kernels.cu (nvcc) + csrc/cuda/grpo_cuda_bindings.cpp (the
# host compiler, pybind11), linked with the static CUDA runtime so that importing it needs no
# libcudart. No torch headers: the module takes raw pointers and a stream handle from Python.
#
#   GRPO_FAST_CUDA_ARCHS="80;90"   override the SM list (default: 80, 90, 100, 120 where nvcc has
#                                  them, plus PTX of the newest for JIT on later GPUs)
import shutil
import subprocess
import time
import warnings

from setuptools import Extension

CUDA_SOURCES = ["csrc/cuda/grpo_cuda_kernels.cu"]
CUDA_HEADERS = ["csrc/cuda/grpo_cuda.h", "csrc/common/grpo_math.h", "csrc/common/grpo_args.h"]
CUDA_ARCHS_WANTED = ("80", "90", "100", "120")  # A100, H100, B200, RTX 50xx; minor versions run these


def _cuda_mode():
    mode = os.environ.get("GRPO_FAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"GRPO_FAST_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_toolkit(nvcc):
    """(library dir holding libcudart_static.a, supported sm numbers), asking nvcc itself, so that a
    wrapper script on PATH (e.g. /usr/local/bin/nvcc) still finds the real toolkit."""
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    cands = []
    for line in out.splitlines():
        line = line.replace("#$ ", "").strip()
        if line.startswith("LIBRARIES="):
            cands += [tok.strip('"')[2:] for tok in line[len("LIBRARIES="):].split() if tok.strip('"').startswith("-L")]
        elif line.startswith("TOP="):
            top = line[len("TOP="):]
            cands += [os.path.join(top, "lib64"), os.path.join(top, "lib")]
    home = os.environ.get("CUDA_HOME") or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    cands += [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    libdir = next((d for d in cands if os.path.exists(os.path.join(d, "libcudart_static.a"))), None)
    if libdir is None:
        raise RuntimeError(f"libcudart_static.a not found next to {nvcc} (looked in {cands})")
    codes = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True).stdout.split()
    sms = sorted({c[3:] for c in codes if c.startswith("sm_") and c[3:].isdigit()}, key=int)
    return libdir, sms


def _cuda_archs(supported):
    env = os.environ.get("GRPO_FAST_CUDA_ARCHS")
    wanted = [a.strip() for a in env.replace(",", ";").split(";") if a.strip()] if env else list(CUDA_ARCHS_WANTED)
    archs = [a for a in wanted if a in supported]
    if not archs:
        raise RuntimeError(f"none of the CUDA archs {wanted} is supported by this nvcc ({supported})")
    return archs


def cuda_extensions():
    """[the _C_cuda Extension] when nvcc is found (GRPO_FAST_CUDA=auto|1), else [] with a warning."""
    mode = _cuda_mode()
    if mode == "0":
        return []
    nvcc = _find_nvcc()
    try:
        if nvcc is None:
            raise RuntimeError("nvcc not found on PATH and CUDA_HOME is not set")
        libdir, supported = _nvcc_toolkit(nvcc)
        archs = _cuda_archs(supported)
    except Exception as e:
        if mode == "1":
            raise
        warnings.warn(f"grpo_fast: skipping the CUDA extension ({e}); set CUDA_HOME or put nvcc on PATH to build it")
        return []
    import pybind11

    ext = Extension(
        "grpo_fast._C_cuda",
        sources=["csrc/cuda/grpo_cuda_bindings.cpp"],  # the .cu files go through nvcc in BuildExt
        include_dirs=[pybind11.get_include(), "csrc/common", "csrc/cuda"],
        library_dirs=[libdir],
        libraries=["cudart_static", "dl", "rt", "pthread"],  # static runtime: no libcudart at import
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
        depends=CUDA_SOURCES + CUDA_HEADERS + ["csrc/common/grpo_bindings.h"],  # relink when a kernel changes (extra_objects are not checked)
        language="c++",
    )
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX: JIT on newer GPUs
    ext.cuda_sources = list(CUDA_SOURCES)
    ext.nvcc = nvcc
    ext.nvcc_flags = [
        "-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
        "-Xptxas", "-v",  # registers / spills per kernel in the build log (tests check 0 spills)
        "--threads", str(max(1, min(len(gencode) // 2, os.cpu_count() or 1))),  # archs in parallel
        "-Icsrc/common", "-Icsrc/cuda",
    ] + gencode
    ext.cuda_optional = mode == "auto"
    return [ext]


class BuildExt(build_ext):
    """build_ext that compiles an extension's .cu files with nvcc first and links the objects in.

    In GRPO_FAST_CUDA=auto mode a failing CUDA build warns and is skipped; the install goes on.
    """

    def build_extension(self, ext):
        cu = getattr(ext, "cuda_sources", None)
        if not cu:
            return super().build_extension(ext)
        try:
            objs = [self._nvcc_compile(ext, src) for src in cu]
            ext.extra_objects = list(ext.extra_objects or []) + [o for o in objs if o not in (ext.extra_objects or [])]
            return super().build_extension(ext)
        except Exception as e:
            if not ext.cuda_optional:
                raise
            warnings.warn(f"grpo_fast: the CUDA extension failed to build and is skipped ({e})")

    def _nvcc_compile(self, ext, src):
        obj = os.path.abspath(os.path.join(self.build_temp, "cuda", os.path.splitext(os.path.basename(src))[0] + ".o"))
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        deps = [os.path.join(HERE, d) for d in [src] + CUDA_HEADERS]
        if not self.force and os.path.exists(obj) and all(os.path.getmtime(obj) >= os.path.getmtime(d) for d in deps):
            return obj
        cmd = [ext.nvcc] + ext.nvcc_flags + ["-c", src, "-o", obj]
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=HERE)
        print(f"grpo_fast: nvcc {src} took {time.time() - t0:.1f} s", flush=True)
        return obj
# END CUDA BUILD


setup(ext_modules=[cpu_extension()] + cuda_extensions(), cmdclass={"build_ext": BuildExt})
