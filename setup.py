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
    cflags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    lflags = []
    if os.environ.get("GRPO_FAST_NO_OPENMP") != "1" and sys.platform != "darwin":
        cflags.append("-fopenmp")
        lflags.append("-fopenmp")
    return Pybind11Extension(
        "grpo_fast._C_cpu",
        sources=["csrc/cpu/grpo_cpu.cpp"],
        include_dirs=["csrc/common"],
        extra_compile_args=cflags,
        extra_link_args=lflags,
        cxx_std=17,
    )


# ---- CUDA extension (csrc/cuda) -------------------------------------------------------------
# BEGIN CUDA BUILD (owned by the CUDA backend; see csrc/cuda/)
def cuda_extensions():
    return []


class BuildExt(build_ext):
    pass
# END CUDA BUILD


setup(ext_modules=[cpu_extension()] + cuda_extensions(), cmdclass={"build_ext": BuildExt})
