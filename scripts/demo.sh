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
.venv/bin/pfedmoap partition --dataset synthetic   # recipe default: pathological, 6 clients, 16 shots
.venv/bin/pfedmoap train --method zsclip --rounds 1
.venv/bin/pfedmoap train --method promptfl
.venv/bin/pfedmoap train                           # recipe default: pfedmoap
.venv/bin/pfedmoap report
echo "demo finished in $(( $(date +%s) - start )) s (after setup)"
