#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Given arguments (a file, -k ...), pytest runs them as asked.
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# The whole suite: test files in 4 workers (pytest-xdist), since the Flower deployment
# tests spend most of their time waiting on SuperNodes (two workers wait while two
# compute); then the tests marked `ray` (Flower's simulation runtime) alone, so that
# Ray starts its workers on a machine that is not also running the rest of the suite.
status=0
.venv/bin/python -m pytest -n "${PFEDMOAP_TEST_WORKERS:-4}" --dist loadfile --no-loadscope-reorder -m "not ray" || status=$?
ray_status=0
.venv/bin/python -m pytest -m ray || ray_status=$?
# exit code 5: no test was selected (a suite without Flower's simulation tests) is fine here
if [ "$ray_status" -ne 0 ] && [ "$ray_status" -ne 5 ]; then status=$ray_status; fi
exit "$status"
