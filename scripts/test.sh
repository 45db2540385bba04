#!/usr/bin/env bash
# The test suite, from a fresh machine: installs what it needs, builds the extensions, runs pytest.
#   torch 2.13.0 (CPU build here), grpo_fast in editable mode (compiles grpo_fast._C_cpu, and
#   grpo_fast._C_cuda when nvcc is present), the test extras (pytest, hypothesis, triton, trl, ...),
#   verl 0.9.1 (--no-deps, with the `verl` extra's light dependencies), liger-kernel 0.8.5 (--no-deps).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
# torch on the same line: an extra's dependency may not replace it (pip fails instead). transformers pinned to
# the release the suite was last run with: with 5.25.0, Liger 0.8.5's RMSNorm kernel no longer runs in
# TRL 1.16's own trainer with use_liger_kernel=True (tests/test_trl_liger.py compares against that trainer).
$PY -m pip install -q --disable-pip-version-check -e ".[test,trl,verl]" torch==2.13.0 transformers==5.24.0
# verl for tests/test_verl_losses.py, which run verl's own losses: without its dependencies (its pins would
# replace transformers); the verl extra above has what importing its losses needs (~80 MB, mostly ray).
$PY -m pip install -q --disable-pip-version-check --no-deps verl==0.9.1
# Liger for tests/test_trl_liger.py (use_liger_kernel=True with the TRL drop-in): a pure-Python wheel whose
# dependencies (torch, triton) are installed above; pinned, the test fills two gaps of Triton's interpreter
# that this release's kernels hit.
$PY -m pip install -q --disable-pip-version-check --no-deps liger-kernel==0.8.5
# OpenRLHF 0.11.2 for tests/test_openrlhf.py, into its own folder (only the tests' child processes put it on
# their path: deepspeed, once importable, is imported by other libraries): without its dependencies
# (its pins need a flash-attn source build and vLLM), plus what importing its actor and loss needs.
$PY -m pip install -q --disable-pip-version-check --no-deps --upgrade --target .test_deps/openrlhf \
    openrlhf==0.11.2 deepspeed==0.19.8 peft==0.21.2 hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 pylatexenc==2.11 ninja
$PY -c "import pydantic; assert int(pydantic.VERSION.split('.')[0]) >= 2" 2>/dev/null || \
    $PY -m pip install -q --disable-pip-version-check --upgrade --target .test_deps/openrlhf "pydantic>=2,<3"
$PY -m grpo_fast info
exec $PY -m pytest -q -ra tests "$@"
