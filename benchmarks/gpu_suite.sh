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
#   5. Triton launch configs: the pinned (BLOCK_V, num_warps) per V and dtype, the persistent grid
#   6. bytes per logit: the MODEL (benchmarks/bytes_model.py), then MEASURED with Nsight Compute
#      (dram__bytes_read.sum, dram__bytes_write.sum) next to the model; fails above 1.1 x (1 read + 1 write)
#   7. compute-sanitizer memcheck / racecheck / initcheck on the edge inputs (benchmarks/gpu_checks.py
#      sanitize): inplace, misaligned V, misaligned base pointer, strided rows, all-(-inf) rows, and
#      (memcheck) > 2^31 elements
#   8. head-to-head timing against Liger's triton_grpo_loss and flash-attn's Triton cross-entropy at
#      V = 32k/128k/152k, bf16 and fp32 (a peer that is not installed is skipped with a line saying
#      so); the fused-linear path's bf16 -> fp32 addmm fast path
#   9. benchmarks: python -m benchmarks --device cuda (eager, compile, triton, cuda, TRL when
#      installed; fwd, bwd, fwd+bwd; memory), which also prints the roofline MODEL next to the
#      measured table; and the model alone at the measured bandwidth
# Budget: written for <= 10 minutes on one H100/H200 (not yet timed on one: no GPU was available
# when steps 5-8 were added); OUT_DIR/summary.txt has each step's seconds.
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

# 5. the pinned Triton configs and the persistent grid of the token-level loss on this device
step "triton launch configs" launch_configs.txt $PY - <<'EOF'
import torch
from grpo_fast.backends import triton_backend as tb

l2, sms, arch = tb.device_props(torch.device("cuda"))
print(f"{torch.cuda.get_device_name()}: L2 {l2 / 2**20:.1f} MiB, {sms} SMs, sm_{arch}")
for V in (32000, 50257, 128256, 151936):
    for e, dt in ((2, "bf16"), (4, "fp32")):
        bv, nw = tb.pinned_config(V, e, arch)
        print(f"V={V:7d} {dt}: BLOCK_V={bv} num_warps={nw}; token-level grid with gradient "
              f"{tb.persistent_grid(1 << 20, V, e, l2, sms)} programs")
EOF

# 6. the bytes model, then the same bytes measured with Nsight Compute (model vs measured)
step "bytes model (MODEL)" bytes_model.txt $PY -m benchmarks bytes
step "bytes measured (ncu dram__bytes_read/write.sum vs model)" bytes_measured.txt $PY -m benchmarks bytes --measure --out "$OUT/bytes_measured_table.txt"

# 7. compute-sanitizer on the edge inputs (inplace, misaligned V and base pointer, strided rows,
#    all-(-inf) rows; memcheck also > 2^31 elements), Triton and CUDA kernels
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$SAN" ]; then
  step "compute-sanitizer memcheck" sanitizer_memcheck.txt "$SAN" --tool memcheck --error-exitcode 1 $PY -m benchmarks.gpu_checks sanitize --big
  step "compute-sanitizer racecheck" sanitizer_racecheck.txt "$SAN" --tool racecheck --error-exitcode 1 $PY -m benchmarks.gpu_checks sanitize
  step "compute-sanitizer initcheck" sanitizer_initcheck.txt "$SAN" --tool initcheck --error-exitcode 1 $PY -m benchmarks.gpu_checks sanitize
else
  step "compute-sanitizer (not found: install the CUDA toolkit's compute-sanitizer)" sanitizer.txt false
fi

# 8. head-to-head against the peers (a missing peer is skipped with a line), the addmm fast path
step "peers: Liger triton_grpo_loss, flash-attn Triton cross-entropy (MEASURED)" peers.txt $PY -m benchmarks.gpu_checks peers
step "fused-linear bf16 -> fp32 addmm fast path" addmm.txt $PY -m benchmarks.gpu_checks addmm

# 9. benchmarks (measured), then the model at the measured copy bandwidth
step "benchmarks (cuda)" bench.txt $PY -m benchmarks --device cuda --out-dir "$OUT/bench"
# issue 12's open question: log-probs + entropy with gradients against the fused loss (the loss-<k> rows) in
# bf16, where the CPU is bound by its exps and a GPU by bytes (the table above is fp32)
step "log-probs vs the fused loss, bf16 (cuda)" logprobs_bf16.txt $PY -m benchmarks logprobs --device cuda --dtype bf16 \
    --shapes 4096,32000 1024,151936 8192,151936 --out-dir "$OUT/bench"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step "vocabulary split, 2 GPUs (cuda)" vocab_parallel.txt $PY -m benchmarks vocab-parallel --device cuda --out-dir "$OUT/bench"
fi
step "roofline model" roofline.txt $PY -m benchmarks roofline

echo "results in $OUT" | tee -a "$OUT/summary.txt"
exit $FAILED
