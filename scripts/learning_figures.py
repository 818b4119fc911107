#!/usr/bin/env python
"""Measure the figures that the learning tests' docstrings and thresholds rest on.

The learning tests (``tests/test_learning_behaviour.py``,
``tests/test_pfedmoap_learning.py``, ``tests/test_fedotp_learning.py``) each
run one case; their thresholds were set from the spread over several worlds
and seeds, which this script measures. Rerun it whenever the shipped
micro-CLIP weights or a method's defaults change, and update the docstrings
and thresholds from its output.

Every case is run through the command line in its own workspace: partition
the synthetic world (``--split``: pathological, 6 clients, 16 shots, or
Dirichlet alpha 0.5 over 6 clients; world seed and partition seed as listed), then train each method with the tests' settings
(3 rounds x 2 local epochs, 4 context tokens, batch 16, lr 0.005). It prints
the final-round mean client accuracy (%) per case and method, and each
method's mean +- std and its gain over zero-shot and PromptFL.

Usage::

    OMP_NUM_THREADS=1 python scripts/learning_figures.py [--methods zsclip coop ...] [--cases 0/1 0/2 ...]

A method may be measured under other flags too, as a labelled copy
``LABEL@method`` with ``--method-flags "LABEL@method=FLAGS"``: for example a
method's untrained start (``u@fedcocoop`` with ``--lr 1e-9``) beside it.
"""

from __future__ import annotations

import argparse
import shlex
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

COMMON = ["--backbone", "micro-clip", "--rounds", "3", "--local-epochs", "2",
          "--n-ctx", "4", "--batch-size", "16", "--lr", "0.005"]
METHOD_FLAGS = {
    "pfedmoap": ["--num-experts", "5", "--lambda", "0.5"],
}
DEFAULT_METHODS = ["zsclip", "coop", "promptfl", "pfedmoap", "fedotp"]
DEFAULT_CASES = ["0/1", "0/2", "0/3", "0/4", "0/5", "1/1", "1/2", "2/1", "2/2"]


def cli(workspace: Path, *args: str) -> None:
    command = [sys.executable, "-m", "pfedmoap_cli", "--workspace", str(workspace), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")


def final_accuracy(workspace: Path, method: str) -> float:
    """Final-round mean client test accuracy (%) of the one run of ``method`` in ``workspace``."""
    (metrics,) = (workspace / "runs").glob(f"synthetic-{method}-s*/metrics.csv")
    frame = pd.read_csv(metrics)
    test = frame[(frame.metric == "accuracy") & (frame.split == "test")]
    return 100 * float(test[test["round"] == test["round"].max()]["value"].mean())


SPLITS = {
    "pathological": ["--pathological", "--shots", "16", "--clients", "6"],
    "dirichlet": ["--dirichlet", "0.5", "--clients", "6"],
}


def run_case(case: str, methods: list[str], pretrained: str, split: str) -> dict[str, float]:
    world, seed = case.split("/")
    with tempfile.TemporaryDirectory(prefix="pfedmoap-learning-") as tmp:
        ws = Path(tmp)
        option = ["--option", f"seed={world}"] if world != "0" else []
        cli(ws, "partition", "--dataset", "synthetic", *SPLITS[split], "--seed", seed, *option)
        accuracy = {}
        for label in methods:
            method = label.split("@")[-1]
            started = time.time()
            cli(ws, "train", "--method", method, *COMMON, "--pretrained", pretrained, "--seed", seed, *METHOD_FLAGS.get(label, []))
            accuracy[label] = final_accuracy(ws, method)
            # Moved aside, so another label of the same method (other flags) is measured in the same workspace.
            for run in (ws / "runs").glob(f"synthetic-{method}-s*"):
                run.rename(ws / f"done-{label.replace('@', '_')}-{time.time_ns()}")
            print(f"  [{case} {label} {time.time() - started:.0f}s {accuracy[label]:.2f}]", flush=True)
        return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="world/seed pairs (world 0 is the default world)")
    parser.add_argument("--split", choices=sorted(SPLITS), default="pathological")
    parser.add_argument("--method-flags", nargs="*", default=[], help="METHOD=FLAGS (space-separated flags appended for METHOD; METHOD may be an alias NAME@method)")
    parser.add_argument("--pretrained", default="synthetic", help="micro-CLIP weights: the shipped tag or a candidate file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for item in args.method_flags:
        name, flags = item.split("=", 1)
        METHOD_FLAGS[name] = shlex.split(flags)
    results = {}
    for case in args.cases:
        results[case] = run_case(case, args.methods, args.pretrained, args.split)
        print(case, "  ".join(f"{m} {v:.2f}" for m, v in results[case].items()), flush=True)
    print()
    print("world/seed  " + "  ".join(f"{c:>6}" for c in args.cases))
    for m in args.methods:
        print(f"{m:<11} " + "  ".join(f"{results[c][m]:6.2f}" for c in args.cases))
    print()
    for m in args.methods:
        values = [results[c][m] for c in args.cases]
        line = f"{m:<11} mean {statistics.mean(values):6.2f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"
        for base in ("zsclip", "promptfl"):
            if base in args.methods and m != base:
                gains = [results[c][m] - results[c][base] for c in args.cases]
                line += f"   vs {base}: {min(gains):+.2f} .. {max(gains):+.2f} (mean {statistics.mean(gains):+.2f})"
        print(line)


if __name__ == "__main__":
    main()
