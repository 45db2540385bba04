#!/usr/bin/env bash
# The test suite, from a fresh machine: installs what it needs, builds the extensions, runs pytest.
#   torch 2.13.0 (CPU build here), grpo_fast in editable mode (compiles grpo_fast._C_cpu, and
#   grpo_fast._C_cuda when nvcc is present), the test extras (pytest, hypothesis, triton, trl, ...),
#   verl 0.9.1 (--no-deps, with the `verl` extra's light dependencies).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
# torch on the same line: an extra's dependency may not replace it (pip fails instead).
$PY -m pip install -q --disable-pip-version-check -e ".[test,trl,verl]" torch==2.13.0
# verl for tests/test_verl_losses.py, which run verl's own losses: without its dependencies (its pins would
# replace transformers); the verl extra above has what importing its losses needs (~80 MB, mostly ray).
$PY -m pip install -q --disable-pip-version-check --no-deps verl==0.9.1
$PY -m grpo_fast info
exec $PY -m pytest -q -ra tests "$@"
