"""The CPU backend: grpo_fast._C_cpu (csrc/cpu), a C++/OpenMP extension taking raw pointers."""
from __future__ import annotations

DEVICE_TYPES = ("cpu",)

try:
    from .. import _C_cpu  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as e:  # not built: `pip install .` (or `pip install -e .`) compiles it
    _C_cpu = None
    _IMPORT_ERROR = e


def unavailable_reason():
    if _C_cpu is None:
        return (f"the C++ extension grpo_fast._C_cpu is not built ({_IMPORT_ERROR}); "
                "build it with `pip install .` or `pip install -e .` from the repository (needs a C++ compiler)")
    return None
