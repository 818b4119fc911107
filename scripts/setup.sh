#!/usr/bin/env bash
# Create .venv and install pfedmoap with the tested versions (CPU torch, offline models),
# with the dev tools, the Flower extra and the tensorboard and mlflow trackers (one pinned set: constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev,flower,tensorboard,mlflow]'
.venv/bin/pfedmoap --version
