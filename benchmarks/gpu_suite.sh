#!/usr/bin/env bash
# gpu_suite.sh — everything to run on the first machine with an NVIDIA GPU, in one command.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]          (default: gpu_results/<host>-<UTC time>)
#
# Steps (each runs even if an earlier one failed; the exit status is non-zero if any failed, and
# OUT_DIR/summary.txt lists each step's status):
#   1. environment: nvidia-smi, nvcc, python / torch / triton versions
#   2. build: the CPU and CUDA extensions in place (GRPO_FAST_CUDA=1: a missing nvcc is an error),
#      and a `pip install --no-deps` into OUT_DIR/site to check the installed layout
#      (grpo_fast.kernels must import from there, outside the source tree)
#   3. tests, natively on the GPU (TRITON_INTERPRET unset): pytest -m "not slow", then the gpu-marked ones
#   4. static kernel report: python -m benchmarks kernels (registers / spills / smem, Triton + CUDA)
#   5. Triton autotuning: the config chosen per vocabulary size
#   6. benchmarks: python -m benchmarks --device cuda (eager, compile, triton, cuda, TRL when
#      installed; fwd, bwd, fwd+bwd; memory), which also prints the roofline MODEL next to the
#      measured table; and the model alone at the measured bandwidth
# Nothing here pip-installs torch: the machine's CUDA build of torch is used as it is.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-gpu_results/$(hostname -s)-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
unset TRITON_INTERPRET  # the kernels must run compiled, not in the CPU interpreter
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}  # Triton 3.9's default, stated explicitly
PY=${PYTHON:-python}
FAILED=0
: > "$OUT/summary.txt"

step() {  # step NAME LOGFILE CMD...: run, tee the output to OUT/LOGFILE, record the status
  local name=$1 log=$2
  shift 2
  echo "=== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  "$@" > >(tee "$OUT/$log") 2>&1
  local rc=$?
  local status="ok"
  [ "$rc" -ne 0 ] && { status="FAILED (exit $rc)"; FAILED=1; }
  echo "    $status in $((SECONDS - t0)) s -> $log" | tee -a "$OUT/summary.txt"
}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to torch: this suite is for a GPU machine (the CPU CI runs the rest)" | tee -a "$OUT/summary.txt"
  exit 2
fi

# 1. environment
step "environment" env.txt bash -c "nvidia-smi; nvcc --version; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name()); print(\"triton\", triton.__version__)'; $PY -m grpo_fast info"

# 2. build
step "build extensions in place" build.txt env GRPO_FAST_CUDA=1 $PY setup.py build_ext --inplace --build-temp "$OUT/build_tmp"
step "install layout (pip --no-deps into $OUT/site)" install.txt bash -c "
  $PY -m pip install --no-deps --no-build-isolation --target '$OUT/site' . &&
  cd / && PYTHONPATH='$OUT/site' $PY -c 'import grpo_fast, grpo_fast.kernels as k; print(grpo_fast.__file__, k.__file__); from grpo_fast.backends import triton_backend as t; print(\"triton backend:\", t.unavailable_reason() or \"available\")'"

# 3. tests on the GPU
step "pytest -m 'not slow' (GPU)" pytest_fast.txt $PY -m pytest -m "not slow" -q -rs --junitxml="$OUT/pytest_fast.xml"
step "pytest -m gpu (GPU, slow ones included)" pytest_gpu.txt $PY -m pytest -m gpu -q -rs --junitxml="$OUT/pytest_gpu.xml"

# 4. static resource report (also the CUDA C++ kernels when built)
step "kernel resources" kernels.txt $PY -m benchmarks kernels --json "$OUT/kernels.json"

# 5. which autotune config Triton picks per V (bf16, token level with gradient)
step "triton autotune choices" autotune.txt $PY - <<'EOF'
import torch
import grpo_fast
from grpo_fast.backends import triton_backend as tb

for V in (8192, 32000, 128256, 151936):
    B, T = 8, 256
    z = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, V, (B, T), device="cuda")
    r = torch.rand(B, device="cuda")
    loss, _ = grpo_fast.grpo_loss(z, y, rewards=r, group_size=8, beta=0.04, ref_logp=torch.randn(B, T, device="cuda") - 5, backend="triton")
    loss.backward()
    for (name, restore), tuner in tb._TUNED.items():
        for key, cfg in tuner.cache.items():
            print(f"V={V:7d} {name:24s} key={key} -> {cfg}")
    tb._TUNED.clear()
EOF

# 6. benchmarks (measured), then the model at the measured copy bandwidth
step "benchmarks (cuda)" bench.txt $PY -m benchmarks --device cuda --out-dir "$OUT/bench"
step "roofline model" roofline.txt $PY -m benchmarks roofline

echo "results in $OUT" | tee -a "$OUT/summary.txt"
exit $FAILED
