"""Every registered method trains, scores and resumes through the CLI (no per-method test code).

Like timm's registry tests: the list comes from ``methods.base.method_names()``,
so a method added later is exercised here as soon as it is registered. Each
runs 2 rounds with half of 4 clients per round (so some clients sit a round
out or never train) on the synthetic world with the tiny ViT, once straight
through and once interrupted after round 0 and resumed; both must write the
same metrics.
"""

from __future__ import annotations

import sys

import pandas as pd
import pytest

from pfedmoap_cli.methods.base import get_method, method_names

PARTITION = (
    "partition", "--dataset", "synthetic", "--clients", "4", "--seed", "1", "--pathological", "--shots", "2",
    "--option", "train_per_class=2", "--option", "test_per_class=1",
)
TRAIN = ("train", "--rounds", "2", "--local-epochs", "1", "--n-ctx", "2", "--batch-size", "4", "--frac", "0.5")
# Options a method needs to fit the tiny towers (D = 32); the defaults are sized for RN50/ViT-B.
TINY_MODEL_OPTIONS = {"pfedmoap": {"gating_dim": 16, "gating_heads": 4}}


def method_option_flags(method: str) -> tuple[str, ...]:
    flags: list[str] = []
    for key, value in TINY_MODEL_OPTIONS.get(method, {}).items():
        flags += ["--method-option", f"{key}={value}"]
    return tuple(flags)


def test_registry_holds_the_table_1_methods():
    expected = {"zsclip", "coop", "promptfl", "promptfl-ft", "fedprox", "fedper", "fedamp", "pfedprompt", "fedotp"}
    assert expected <= set(method_names())
    for name in method_names():
        cls = get_method(name)
        assert cls.name == name
        assert sys.modules[cls.__module__].__doc__, f"the file of method {name} needs a docstring citing its paper"


@pytest.mark.parametrize("method", method_names())
def test_method_trains_two_rounds_and_resumes_exactly(cli, tmp_path, method):
    for ws in ("a", "b"):
        assert cli(*PARTITION, workspace=tmp_path / ws).exit_code == 0
    args = (*TRAIN, "--method", method, *method_option_flags(method))
    full = cli(*args, workspace=tmp_path / "a")
    assert full.exit_code == 0, full.stderr
    assert "2/2 rounds complete" in full.stdout

    metrics = pd.read_csv(next((tmp_path / "a" / "runs").glob("*/metrics.csv")))
    test_acc = metrics[(metrics.split == "test") & (metrics.metric == "accuracy")]
    assert sorted(test_acc["round"].unique()) == [0, 1]
    assert sorted(test_acc.client_id.unique()) == [0, 1, 2, 3]
    assert test_acc["value"].between(0, 1).all()
    if get_method(method).trains:
        train_loss = metrics[(metrics.split == "train") & (metrics.metric == "loss")]
        assert len(train_loss) == 4  # 2 participants x 2 rounds
        assert train_loss["value"].notna().all()

    part = cli(*args, "--stop-after", "1", workspace=tmp_path / "b")
    assert part.exit_code == 0 and "1/2 rounds complete" in part.stdout, part.stderr
    resumed = cli(*args, "--resume", workspace=tmp_path / "b")
    assert resumed.exit_code == 0, resumed.stderr
    straight = next((tmp_path / "a" / "runs").glob("*/metrics.csv")).read_text()
    assert next((tmp_path / "b" / "runs").glob("*/metrics.csv")).read_text() == straight
