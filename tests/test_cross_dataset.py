"""``pfedmoap evaluate --run R --dataset OTHER``: a run's global part on every class of another dataset.

1. The score equals an independent computation: the round's global prompt
   read from its checkpoint, the other dataset's images encoded one by one
   through the test transform, its class names in the prompt, argmax over
   its classes.
2. Every registered method either is scored (and the table says what was
   scored) or is refused in one line with the reason (no global part): no
   per-method test code.
3. Scores are recorded per (round, dataset, options); a new score of the same
   key replaces the old one. Bad input is one line, exit 2, through the
   installed script too.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from conftest import one_line_error
from test_method_registry import method_option_flags

from pfedmoap_cli.methods.base import get_method, method_names

CLASSES = ("cat", "dog", "owl", "fox")
PARTITION = ("partition", "--dataset", "synthetic", "--iid", "--clients", "2", "--seed", "1",
             "--option", "train_per_class=1", "--option", "test_per_class=1")
TRAIN = ("train", "--rounds", "2", "--local-epochs", "1", "--frac", "1.0", "--n-ctx", "2", "--batch-size", "8",
         "--backbone", "tiny-vit", "--pretrained", "none", "--keep-rounds", "all")


def write_other_dataset(root: Path, per_class: int = 10) -> Path:
    """An image-folder dataset with other classes than the synthetic world (2 test images per class)."""
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (60 * c, 20 * i, 255 - 60 * c)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def trained(cli, tmp_path):
    """A workspace with a 2-round PromptFL run ``p`` and the other dataset's root."""
    ws = tmp_path / "ws"
    assert cli(*PARTITION, workspace=ws).exit_code == 0
    done = cli(*TRAIN, "--method", "promptfl", "--run-id", "p", workspace=ws)
    assert done.exit_code == 0, done.stderr
    return ws, write_other_dataset(tmp_path / "other")


def rows(ws: Path, run: str) -> list[dict]:
    with (ws / "runs" / run / "cross_dataset.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def independent_score(ws: Path, run: str, round_index: int, other: Path) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the round's global prompt on every image of ``other``, computed directly."""
    import json

    from pfedmoap_cli.data.sources import open_dataset
    from pfedmoap_cli.engine.run_record import run_settings
    from pfedmoap_cli.engine.settings import backbone_spec
    from pfedmoap_cli.model.backbone import load_backbone
    from pfedmoap_cli.model.prompt import PromptTextEncoder

    source = open_dataset("imagefolder", other)
    samples = source.samples("test")
    settings = run_settings(json.loads((ws / "runs" / run / "run.json").read_text()))
    clip = load_backbone(backbone_spec(settings), device=torch.device("cpu"))
    transform = clip.test_transform()
    images = torch.stack([transform(Image.open(other / s.key).convert("RGB")) for s in samples])
    features = clip.encode_images(images)
    ctx = load_file(str(ws / "runs" / run / "checkpoints" / f"round-{round_index:04d}" / "global.safetensors"))["ctx"]
    text = PromptTextEncoder(clip, list(CLASSES), n_ctx=2)(ctx)
    logits = clip.logit_scale * features @ text.t()
    labels = torch.tensor([CLASSES.index(Path(s.key).parent.name) for s in samples])
    return float((logits.argmax(1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


def test_the_global_prompt_is_scored_on_every_class_of_the_other_dataset(cli, trained):
    ws, other = trained
    result = cli("--data-root", str(other), "evaluate", "--run", "p", "--dataset", "imagefolder", workspace=ws)
    assert result.exit_code == 0, result.stderr
    assert "round 1 on imagefolder (4 classes, 8 test images)" in result.stdout and "the global prompt only" in result.stdout
    (row,) = rows(ws, "p")
    accuracy, loss = independent_score(ws, "p", 1, other)
    assert (int(row["round"]), row["dataset"], int(row["num_classes"]), int(row["num_examples"])) == (1, "imagefolder", 4, 8)
    assert float(row["accuracy"]) == pytest.approx(accuracy, abs=1e-9)
    assert float(row["loss"]) == pytest.approx(loss, rel=1e-5)
    assert row["part"] == "the global prompt"


def test_a_score_replaces_only_its_own_round_and_dataset(cli, trained):
    ws, other = trained
    for round_index in ("0", "1", "0"):
        result = cli("--data-root", str(other), "evaluate", "--run", "p", "--dataset", "imagefolder", "--round", round_index, workspace=ws)
        assert result.exit_code == 0, result.stderr
    table = rows(ws, "p")
    assert [int(r["round"]) for r in table] == [0, 1]
    assert float(table[0]["accuracy"]) == pytest.approx(independent_score(ws, "p", 0, other)[0], abs=1e-9)


def test_bad_requests_are_one_line(cli, trained):
    ws, other = trained
    assert "--round must be between 0 and 1" in one_line_error(
        cli("--data-root", str(other), "evaluate", "--run", "p", "--dataset", "imagefolder", "--round", "5", workspace=ws)
    )
    assert "add --dataset NAME" in one_line_error(cli("evaluate", "--run", "p", "--option", "seed=2", workspace=ws))
    assert "unknown dataset" in one_line_error(cli("evaluate", "--run", "p", "--dataset", "nosuch", workspace=ws))
    assert not (ws / "runs" / "p" / "cross_dataset.csv").exists()


def test_a_method_without_a_global_part_is_refused_through_the_installed_script(cli, trained):
    ws, other = trained
    assert cli(*TRAIN, "--method", "coop", "--run-id", "c", workspace=ws).exit_code == 0
    script = Path(sys.executable).with_name("pfedmoap")
    if not script.exists():
        pytest.skip(f"no installed console script at {script}")
    done = subprocess.run(
        [str(script), "--quiet", "--workspace", str(ws), "--data-root", str(other), "evaluate", "--run", "c", "--dataset", "imagefolder"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["error: method coop has no global part to score on another dataset (each client's prompt is its own "
                     "and is never shared); choose a run of a method with a global prompt"]
    assert not (ws / "runs" / "c" / "cross_dataset.csv").exists()


@pytest.mark.parametrize("method", method_names())
def test_every_method_is_scored_or_refused_with_its_reason(cli, tmp_path, method):
    ws, other = tmp_path / "ws", write_other_dataset(tmp_path / "other", per_class=5)
    assert cli(*PARTITION, workspace=ws).exit_code == 0
    trained = cli("train", "--rounds", "1", "--local-epochs", "1", "--frac", "0.5", "--n-ctx", "2", "--batch-size", "8",
                  "--backbone", "tiny-vit", "--pretrained", "none", "--method", method, *method_option_flags(method), "--run-id", "r",
                  workspace=ws)
    assert trained.exit_code == 0, trained.stderr
    result = cli("--data-root", str(other), "evaluate", "--run", "r", "--dataset", "imagefolder", workspace=ws)
    part = get_method(method).global_part
    if part is None:
        assert "has no global part" in one_line_error(result)
        return
    assert result.exit_code == 0, result.stderr
    (row,) = rows(ws, "r")
    assert row["part"] == part and int(row["num_classes"]) == 4 and 0.0 <= float(row["accuracy"]) <= 1.0


def test_the_report_lists_cross_dataset_scores_as_the_global_part_only(cli, trained):
    ws, other = trained
    for round_index in ("0", "1"):
        assert cli("--data-root", str(other), "evaluate", "--run", "p", "--dataset", "imagefolder", "--round", round_index, workspace=ws).exit_code == 0
    reported = cli("report", workspace=ws)
    assert reported.exit_code == 0, reported.stderr
    assert "Cross-dataset: each run's global part only" in reported.stdout
    written = ws / "reports" / "cross_dataset.csv"
    assert str(written) in reported.stdout
    with written.open(newline="") as handle:
        listed = list(csv.DictReader(handle))
    recorded = rows(ws, "p")
    assert [(r["run_id"], r["round"], r["dataset"]) for r in listed] == [("p", "0", "imagefolder"), ("p", "1", "imagefolder")]
    for mine, theirs in zip(listed, recorded):
        assert float(mine["accuracy"]) == pytest.approx(100 * float(theirs["accuracy"]))
        assert mine["part"] == "the global prompt"
    # a damaged table is left out with one warning line; the runs' own report is unchanged
    (ws / "runs" / "p" / "cross_dataset.csv").write_text("garbage\n")
    again = cli("report", workspace=ws)
    assert again.exit_code == 0 and "Cross-dataset" not in again.stdout
    assert "left out the cross-dataset scores of run p" in again.stderr


def test_without_cross_dataset_scores_the_report_is_as_before(cli, trained):
    ws, _ = trained
    reported = cli("report", workspace=ws)
    assert reported.exit_code == 0 and "Cross-dataset" not in reported.stdout
    assert not (ws / "reports" / "cross_dataset.csv").exists()
