#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
# The whole suite runs test files in 4 workers (pytest-xdist): the Flower deployment
# tests spend most of their time waiting on SuperNodes, so two workers wait while two
# compute. Given arguments (a file, -k ...), pytest runs them as asked.
if [ $# -eq 0 ]; then
  set -- -n "${PFEDMOAP_TEST_WORKERS:-4}" --dist loadfile --no-loadscope-reorder
fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec .venv/bin/python -m pytest "$@"
