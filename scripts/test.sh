#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec .venv/bin/python -m pytest "$@"
