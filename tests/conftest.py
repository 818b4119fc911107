"""Shared fixtures: a CLI runner that goes through the real entry point."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# One thread is steadier and often faster for tiny models on a shared 2-core machine.
torch.set_num_threads(1)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    """Run ``pfedmoap ARGS`` in-process through ``main()`` (error mapping included)."""
    from pfedmoap_cli.cli.app import main

    monkeypatch.delenv("PFEDMOAP_DEBUG", raising=False)
    monkeypatch.delenv("PFEDMOAP_WORKSPACE", raising=False)

    def run(*args: str, workspace: Path | None = None) -> CliResult:
        argv = ["pfedmoap", "--quiet", "--workspace", str(workspace or tmp_path / "ws"), *args]
        monkeypatch.setattr(sys, "argv", argv)
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def one_line_error(result: CliResult) -> str:
    """Assert the CLI failed with exit 2 and a single-line message; return it."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def final_accuracy(workspace: Path, method: str, seed: int = 1) -> float:
    """Final-round mean client test accuracy (a fraction) of the one run of ``method`` and ``seed`` in ``workspace``."""
    import pandas as pd

    (metrics,) = (workspace / "runs").glob(f"*-{method}-s{seed}-*/metrics.csv")
    frame = pd.read_csv(metrics)
    test = frame[(frame.metric == "accuracy") & (frame.split == "test")]
    return float(test[test["round"] == test["round"].max()]["value"].mean())
