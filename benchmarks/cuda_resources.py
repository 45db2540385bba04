"""Registers, spills, shared and local memory of the CUDA C++ kernels, read from the built extension.

``cuda_kernel_resources()`` runs ``cuobjdump --dump-resource-usage`` on grpo_fast/_C_cuda*.so (no GPU
needed) and returns one dict per (kernel, template variant, arch) with the keys ``kernel``,
``variant``, ``arch`` ("sm_90"), ``registers``, ``spill_bytes``, ``shared_bytes``, ``local_bytes``
and ``stack_bytes``. ``python -m benchmarks kernels`` prints them next to the Triton kernels.

cuobjdump reports each function's STACK (its stack frame) and LOCAL (other local memory) but not
spills by themselves. ptxas puts spilled registers in the stack frame, and these kernels have no
local arrays, calls or recursion, so the frame is there only if something spilled: ``spill_bytes``
is the frame size, an upper bound that is 0 exactly when nothing spills (``-Xptxas -v`` in the build
log gives the split into spill stores and loads).

cuobjdump is taken from $GRPO_FAST_CUOBJDUMP, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, then the
copy that ships in the Triton wheel.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

_FUNC_RE = re.compile(r"^\s*Function\s+(\S+):\s*$")
_FIELDS_RE = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")
_ARCH_RE = re.compile(r"^\s*arch\s*=\s*(sm_\d+\w*)")


def extension_path() -> Optional[str]:
    """Path of the built grpo_fast._C_cuda shared object, or None when it is not built."""
    spec = importlib.util.find_spec("grpo_fast")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(d, "_C_cuda*.so")) + glob.glob(os.path.join(d, "_C_cuda*.pyd")))
        if hits:
            return hits[0]
    return None


def cuobjdump_path() -> Optional[str]:
    """A cuobjdump binary (the CUDA toolkit's or the Triton wheel's), or None."""
    env = os.environ.get("GRPO_FAST_CUOBJDUMP")
    if env and os.path.isfile(env):
        return env
    found = shutil.which("cuobjdump")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "cuobjdump")):
            return os.path.join(home, "bin", "cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if p.is_file():
            return str(p)
    return None


def _read_name(s: str, i: int):
    """One <length><identifier> of the Itanium mangling at s[i:] -> (identifier, next index)."""
    m = re.match(r"\d+", s[i:])
    if not m:
        return None, i
    n = int(m.group(0))
    j = i + len(m.group(0))
    return s[j:j + n], j + n


def split_kernel_name(mangled: str) -> tuple[str, str]:
    """'_ZN9grpo_fast4cuda18token_fused_kernelI13__nv_bfloat16EEvNS0_7DevArgsE' ->
    ('token_fused_kernel', '__nv_bfloat16'); the template argument is '' for a non-template kernel.

    A small reader for the names these kernels get (namespaced, at most one type argument), so the
    report needs no c++filt."""
    if not mangled.startswith("_ZN"):
        return mangled, ""
    i, parts = 3, []
    while i < len(mangled) and mangled[i].isdigit():
        name, i = _read_name(mangled, i)
        parts.append(name)
    kernel = parts[-1] if parts else mangled
    variant = ""
    if i < len(mangled) and mangled[i] == "I":
        builtin = {"f": "float", "d": "double", "i": "int", "l": "long"}
        c = mangled[i + 1] if i + 1 < len(mangled) else ""
        if c.isdigit():
            variant, _ = _read_name(mangled, i + 1)
        else:
            variant = builtin.get(c, c)
    return kernel, variant


def parse_resource_usage(text: str) -> list[dict]:
    """Rows from `cuobjdump --dump-resource-usage` output, one per (function, arch), deduplicated."""
    rows, seen = [], set()
    arch, func = None, None
    for line in text.splitlines():
        m = _ARCH_RE.match(line)
        if m:
            arch, func = m.group(1), None
            continue
        m = _FUNC_RE.match(line)
        if m:
            func = m.group(1)
            continue
        if func and arch and "REG:" in line:
            f = {k: int(v) for k, v in _FIELDS_RE.findall(line)}
            kernel, variant = split_kernel_name(func)
            key = (func, arch)
            func = None
            if key in seen:  # the fatbin lists each cubin twice (host and device copies)
                continue
            seen.add(key)
            rows.append(dict(
                kernel=kernel, variant=variant, arch=arch, registers=f.get("REG", 0),
                spill_bytes=f.get("STACK", 0), shared_bytes=f.get("SHARED", 0), local_bytes=f.get("LOCAL", 0),
                stack_bytes=f.get("STACK", 0), mangled=key[0],
            ))
    rows.sort(key=lambda r: (r["kernel"], r["variant"], int(re.sub(r"\D", "", r["arch"]) or 0)))
    return rows


def cuda_kernel_resources(so_path: Optional[str] = None, cuobjdump: Optional[str] = None) -> list[dict]:
    """Resource usage of every kernel in the built _C_cuda extension, for every compiled arch.

    Returns [] when the extension is not built or no cuobjdump is found (the report then just has
    no CUDA rows); raises RuntimeError when cuobjdump itself fails on the file.
    """
    so_path = so_path or extension_path()
    cuobjdump = cuobjdump or cuobjdump_path()
    if so_path is None or cuobjdump is None:
        return []
    res = subprocess.run([cuobjdump, "--dump-resource-usage", so_path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cuobjdump} --dump-resource-usage {so_path} failed: {res.stderr.strip()}")
    return parse_resource_usage(res.stdout)


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "variant", "arch", "regs", "spill B", "smem B", "local B")
    body = [(r["kernel"], r["variant"], r["arch"], str(r["registers"]), str(r["spill_bytes"]),
             str(r["shared_bytes"]), str(r["local_bytes"])) for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


if __name__ == "__main__":
    print(format_table(cuda_kernel_resources()))
