#!/usr/bin/env bash
# The main job on the built-in default: set up, partition the synthetic world,
# train a federation and print the results table. Offline, CPU, a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The demo owns its workspace and starts it afresh (its numbers are seeded, so
# a rerun prints the same table). Your own runs belong in another workspace.
export PFEDMOAP_WORKSPACE=pfedmoap-workspace/demo
rm -rf "$PFEDMOAP_WORKSPACE"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
.venv/bin/pfedmoap partition --dataset synthetic
.venv/bin/pfedmoap train
.venv/bin/pfedmoap report
echo "demo finished in $(( $(date +%s) - start )) s (after setup)"
