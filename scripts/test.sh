#!/usr/bin/env bash
# The test suite, from a fresh machine: installs what it needs, builds the extensions, runs pytest.
#   torch 2.13.0 (CPU build here), grpo_fast in editable mode (compiles grpo_fast._C_cpu, and
#   grpo_fast._C_cuda when nvcc is present), the test extras (pytest, hypothesis, triton, trl, ...).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
$PY -m pip install -q --disable-pip-version-check -e ".[test,trl]"
$PY -m grpo_fast info
exec $PY -m pytest -q -ra tests "$@"
