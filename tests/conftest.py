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


# ---- the learning tests on the shipped micro-CLIP -------------------------------------------

#: The learning tests' training settings (those of scripts/learning_figures.py), seed 1.
MICRO_CLIP_TRAIN = ("--backbone", "micro-clip", "--pretrained", "synthetic", "--rounds", "3", "--local-epochs", "2",
                    "--n-ctx", "4", "--batch-size", "16", "--lr", "0.005", "--seed", "1")
PATHOLOGICAL = ("--pathological", "--shots", "16", "--clients", "6")
DIRICHLET = ("--dirichlet", "0.5", "--clients", "6")


def train_and_score(cli, workspace: Path, split: tuple[str, ...], methods: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Partition the synthetic world (``split``, seed 1), train each method through the CLI, return final accuracies.

    ``methods`` maps a method to its extra flags, on top of :data:`MICRO_CLIP_TRAIN`.
    """
    result = cli("partition", "--dataset", "synthetic", *split, "--seed", "1")
    assert result.exit_code == 0, result.stderr
    for method, flags in methods.items():
        result = cli("train", "--method", method, *MICRO_CLIP_TRAIN, *flags)
        assert result.exit_code == 0, result.stderr
    return {method: final_accuracy(workspace, method) for method in methods}


@dataclass(frozen=True)
class ZeroShotSplit:
    """The synthetic test split as the shipped micro-CLIP sees it, with the hand-written prompt's class features."""

    clip: object
    domains: list[str]
    sample_domains: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    text: torch.Tensor


@pytest.fixture(scope="session")
def micro_clip_test_split() -> ZeroShotSplit:
    """Rendered and transformed once per session: several learning tests score the same 1,296 images."""
    from pfedmoap_cli.data.sources.synthetic import SyntheticSource
    from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
    from pfedmoap_cli.model.prompt import encode_texts

    clip = load_backbone(BackboneSpec("micro-clip", "synthetic"))
    source = SyntheticSource()
    samples = source.samples("test")
    transform = clip.test_transform()
    return ZeroShotSplit(
        clip=clip,
        domains=list(source.domains),
        sample_domains=[s.domain for s in samples],
        images=torch.stack([transform(source.load_image(s)) for s in samples]),
        labels=torch.tensor([s.label for s in samples]),
        text=encode_texts(clip, [f"a photo of a {name}." for name in source.class_names]),
    )


# ---- Flower ------------------------------------------------------------------------------------

#: Set to 1 (CI does) to make a missing Flower fail the Flower tests instead of skipping them.
REQUIRE_FLOWER_ENV = "PFEDMOAP_REQUIRE_FLOWER"


def method_env(clip, class_names, *, n_ctx: int = 4, num_clients: int = 3, training=None, seed: int = 0):
    """A method's environment on ``clip`` (CPU) over ``class_names``, for unit tests of one method.

    ``training`` defaults to 2 local epochs of SGD at lr 0.05 (momentum 0.9, weight decay 5e-4).
    """
    from pfedmoap_cli.methods.base import LocalTraining, MethodEnv
    from pfedmoap_cli.model.prompt import PromptTextEncoder

    return MethodEnv(
        clip=clip,
        text_encoder=PromptTextEncoder(clip, list(class_names), n_ctx=n_ctx),
        class_names=tuple(class_names),
        num_clients=num_clients,
        training=training or LocalTraining(local_epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4),
        seed=seed,
        device=torch.device("cpu"),
    )


def require_flower():
    """The imported ``flwr`` module, for tests that need Flower: ``flwr = require_flower()``.

    Without Flower (it is the optional ``[flower]`` extra) the test is skipped,
    unless ``PFEDMOAP_REQUIRE_FLOWER=1`` is set, as in CI, where it fails instead:
    there a missing Flower is a broken install, not an optional feature left out.
    """
    import importlib
    import os

    try:
        return importlib.import_module("flwr")
    except ImportError as error:
        if os.environ.get(REQUIRE_FLOWER_ENV, "") == "1":
            pytest.fail(
                f"Flower is required ({REQUIRE_FLOWER_ENV}=1) but 'import flwr' failed: {error}. "
                "Install it with: pip install -c constraints.txt -e '.[dev,flower]'",
                pytrace=False,
            )
        # allow_module_level: test modules call this at import time to skip as a whole.
        pytest.skip(f"Flower not installed (pip install -e '.[flower]'): {error}", allow_module_level=True)


# ---- scheduling ---------------------------------------------------------------------------------

#: Modules that mostly wait on other processes (Flower's SuperLink, SuperNodes and
#: Ray): collected first, so that pytest-xdist hands them to workers at once and
#: the CPU-bound modules run beside them instead of after them.
WAITING_MODULES = ("test_flower_deployment.py", "test_flower_deployment_faults.py", "test_flower_cli.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return WAITING_MODULES.index(name) if name in WAITING_MODULES else len(WAITING_MODULES)

    items.sort(key=rank)  # stable: the order inside each group is kept
