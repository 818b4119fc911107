"""Base-to-novel generalisation (PROTOCOL-MORE.md section 6), end to end on the local engine.

A ``--base-to-novel`` partition gives the clients the first m = ceil(C/2)
classes only; every evaluated round then also scores each client on all base
test images (m-way) and, with a second instance of the method over the novel
names, on all novel test images ((C-m)-way). The numbers are checked against
a computation written here from the checkpoints, the micro-CLIP and the
dataset's own labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import one_line_error
from pfedmoap_cli import api
from pfedmoap_cli.artifacts.partition import _encode, check_partition_matches_dataset, load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources.base import DatasetSource, Sample
from pfedmoap_cli.data.sources.synthetic import SyntheticSource
from pfedmoap_cli.errors import ArtifactError

SCRIPT = Path(sys.executable).with_name("pfedmoap")
SMALL = {"train_per_class": 3, "test_per_class": 2}
TRAIN = ("train", "--backbone", "micro-clip", "--pretrained", "synthetic", "--local-epochs", "1", "--n-ctx", "2",
         "--batch-size", "16", "--lr", "0.005", "--seed", "1")


class FiveClasses(DatasetSource):
    """An odd class count (C = 5, so m = 3): 4 train and 2 test samples per class, images never loaded."""

    name = "five"

    def __init__(self, names=("ant", "bee", "cat", "dog", "eel")) -> None:
        self.class_names = list(names)

    def _list_samples(self, split: str) -> list[Sample]:
        per_class = 4 if split == "train" else 2
        return [Sample(key=f"{split}/{label}/{i}", label=label) for i in range(per_class) for label in range(5)]

    def load_image(self, sample: Sample):  # pragma: no cover - never called
        raise AssertionError("not needed")


def save_b2n_partition(workspace: Path, scheme: str = "pathological", clients: int = 3, **extra) -> Path:
    """A base-to-novel synthetic partition written into ``workspace`` and made current."""
    source = SyntheticSource(**SMALL)
    settings = PartitionSettings(scheme, clients, seed=1, base_to_novel=True, **extra)
    path, _ = save_partition(build_partition(source, settings, SMALL), workspace / "partitions")
    return path


def only_run(workspace: Path) -> Path:
    (run_dir,) = (workspace / "runs").iterdir()
    return run_dir


# ---- the partition ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        PartitionSettings("pathological", 3, seed=1, shots=2, base_to_novel=True),
        PartitionSettings("dirichlet", 4, seed=2, alpha=0.5, min_size=2, base_to_novel=True),
        PartitionSettings("iid", 4, seed=1, base_to_novel=True),
        PartitionSettings("iid", 6, seed=1, clients_per_domain=2, base_to_novel=True),
    ],
    ids=["pathological", "dirichlet", "iid", "domain-iid"],
)
def test_partition_holds_base_classes_only_and_records_the_novel_names(settings):
    source = SyntheticSource(**SMALL)
    names = list(source.class_names)
    m = 18  # ceil(36 / 2)
    partition = build_partition(source, settings, SMALL)
    assert list(partition.class_names) == names[:m]
    assert list(partition.novel_class_names) == names[m:]
    assert partition.params["base_to_novel"] is True and partition.params["base_classes"] == m
    train_labels = [s.label for s in source.samples("train")]
    test_labels = [s.label for s in source.samples("test")]
    for client in partition.clients:
        assert {train_labels[i] for i in client.train} <= set(range(m))
        assert {test_labels[i] for i in client.test} <= set(range(m))
        # Histograms are of the dataset's own labels.
        assert client.train_histogram == {k: sum(1 for i in client.train if train_labels[i] == k) for k in set(train_labels[i] for i in client.train)}
    if settings.scheme == "iid":  # iid hands out every base sample, and only those
        assert sorted(i for c in partition.clients for i in c.test) == [i for i, y in enumerate(test_labels) if y < m]
    if settings.scheme == "pathological":  # 18 base classes over 3 clients, 6 each, disjoint
        owned = [{train_labels[i] for i in c.train} for c in partition.clients]
        assert [len(o) for o in owned] == [6, 6, 6] and set().union(*owned) == set(range(m))
    document = json.loads(_encode(partition))
    assert document["novel_class_names"] == names[m:] and document["class_names"] == names[:m]
    check_partition_matches_dataset(partition, source)  # accepted as it is


def test_odd_class_count_rounds_the_base_half_up_and_a_changed_class_list_is_refused():
    source = FiveClasses()
    partition = build_partition(source, PartitionSettings("iid", 2, seed=1, base_to_novel=True), {})
    assert partition.class_names == ("ant", "bee", "cat") and partition.novel_class_names == ("dog", "eel")
    assert partition.params["base_classes"] == 3
    labels = [s.label for s in source.samples("train")]
    assert sorted(i for c in partition.clients for i in c.train) == [i for i, y in enumerate(labels) if y < 3]
    check_partition_matches_dataset(partition, source)
    # Novel names that are not the dataset's last ones (swapped), and a base list cut short.
    swapped = FiveClasses(("ant", "bee", "cat", "eel", "dog"))
    with pytest.raises(ArtifactError, match="does not fit its dataset: class 3 is 'dog' where the dataset has 'eel'"):
        check_partition_matches_dataset(partition, swapped)
    import dataclasses

    shifted = dataclasses.replace(partition, class_names=("ant", "bee"), novel_class_names=("cat", "dog", "eel"))
    with pytest.raises(ArtifactError, match="2 base class names where the dataset's base classes are its first 3"):
        check_partition_matches_dataset(shifted, source)
    # A client holding a novel sample (edited by hand) is refused too.
    novel_sample = next(i for i, y in enumerate(labels) if y == 4)
    client = dataclasses.replace(partition.clients[0], train=partition.clients[0].train + (novel_sample,))
    edited = dataclasses.replace(partition, clients=(client, *partition.clients[1:]))
    with pytest.raises(ArtifactError, match="novel class 4"):
        check_partition_matches_dataset(edited, source)


#: sha256 of these partitions' bytes as the code BEFORE base-to-novel wrote them (measured on that commit).
OLD_PARTITION_SHA256 = {
    "iid": ("0d482d792df1f735344c4b85bba1051bfb53c19a9d4eb61c9f35d066917929fa", PartitionSettings("iid", 4, seed=1)),
    "dirichlet": ("2a413f2b0e0c9764bdd7cf97670b05950adc6e57d4d84a6f68d434cb2a1e9692", PartitionSettings("dirichlet", 4, seed=2, alpha=0.5, min_size=2)),
    "pathological": ("55c193d9f264d3087fabdc24ff15a7dc9c4a84439db840f03dd6369641aa5c47", PartitionSettings("pathological", 6, seed=1, shots=2)),
    "domain-iid": ("38a88019351128090182995ae3af4648b010f32e9f9a8cb84d215789f451c125", PartitionSettings("iid", 6, seed=1, clients_per_domain=2)),
}


@pytest.mark.parametrize("name", sorted(OLD_PARTITION_SHA256))
def test_partitions_without_the_flag_keep_their_bytes(name, tmp_path):
    sha, settings = OLD_PARTITION_SHA256[name]
    partition = build_partition(SyntheticSource(**SMALL), settings, SMALL)
    assert hashlib.sha256(_encode(partition)).hexdigest() == sha
    document = json.loads(_encode(partition))
    assert "novel_class_names" not in document
    assert "base_to_novel" not in document["params"] and "base_classes" not in document["params"]
    assert len(document["class_names"]) == 36
    path, saved_sha = save_partition(partition, tmp_path)
    assert saved_sha == sha and load_partition(path)[0] == partition  # and it reads back as it was


def test_partition_command_flag(cli, tmp_path):
    result = cli("partition", "--dataset", "synthetic", "--pathological", "--shots", "2", "--clients", "3", "--seed", "1",
                 "--option", "train_per_class=3", "--option", "test_per_class=2", "--base-to-novel")
    assert result.exit_code == 0, result.stderr
    assert "18 classes" in result.stdout and "base-to-novel" in result.stdout
    (path,) = (tmp_path / "ws" / "partitions").glob("*.json")
    built = build_partition(SyntheticSource(**SMALL), PartitionSettings("pathological", 3, seed=1, shots=2, base_to_novel=True), SMALL)
    assert path.read_bytes() == _encode(built)
    # pfedmoap evaluate's printed mean is over the clients' own test sets, not the base/novel rows.
    assert cli(*TRAIN, "--method", "promptfl", "--rounds", "1", "--run-id", "flag").exit_code == 0
    evaluated = cli("evaluate", "--run", "flag")
    assert evaluated.exit_code == 0, evaluated.stderr
    frame = pd.read_csv(tmp_path / "ws" / "runs" / "flag" / "metrics.csv")
    test_mean = 100 * split_rows(frame, "test", 0)["value"].mean()
    assert f"round 0: mean client accuracy {test_mean:.2f}% over 3 clients" in evaluated.stdout


# ---- the scores ---------------------------------------------------------------------------------


def hand_scores(run_dir: Path, round_index: int, num_clients: int, ctx_key: str, fallback_key: str) -> dict[str, list[float]]:
    """Every client's base and novel accuracy, from the round's checkpoints, written out plainly.

    A client's context is its own checkpoint's ``ctx_key`` (the newest round
    that wrote one), else the global checkpoint's ``fallback_key``. Base: the
    context in front of the 18 base names, argmax over those 18 columns, over
    every test image of labels 0..17; novel: in front of the 18 novel names,
    over every test image of labels 18..35, truth label - 18.
    """
    from pfedmoap_cli.artifacts.checkpoint import load_checkpoint
    from pfedmoap_cli.model.backbone import BackboneSpec, load_backbone
    from pfedmoap_cli.model.prompt import PromptTextEncoder

    clip = load_backbone(BackboneSpec("micro-clip", "synthetic"), device=torch.device("cpu"))
    source = SyntheticSource(**SMALL)
    samples = source.samples("test")
    transform = clip.test_transform()
    with torch.no_grad():
        images = clip.encode_images(torch.stack([transform(source.load_image(s)) for s in samples]))
    labels = torch.tensor([s.label for s in samples])
    names = list(source.class_names)
    base_text = PromptTextEncoder(clip, names[:18], n_ctx=2)
    novel_text = PromptTextEncoder(clip, names[18:], n_ctx=2)
    server, _ = load_checkpoint(run_dir / "checkpoints" / f"round-{round_index:04d}" / "global.safetensors")
    scores: dict[str, list[float]] = {"base": [], "novel": []}
    for client in range(num_clients):
        ctx = server[fallback_key]
        for r in range(round_index, -1, -1):
            path = run_dir / "checkpoints" / f"round-{r:04d}" / f"client-{client:04d}.safetensors"
            if path.is_file():
                ctx = load_checkpoint(path)[0][ctx_key]
                break
        with torch.no_grad():
            for split, text, mask, shift in (("base", base_text, labels < 18, 0), ("novel", novel_text, labels >= 18, 18)):
                predicted = (images[mask] @ text(ctx).t()).argmax(dim=1)
                scores[split].append(int((predicted == labels[mask] - shift).sum()) / int(mask.sum()))
    return scores


def split_rows(frame: pd.DataFrame, split: str, round_index: int) -> pd.DataFrame:
    rows = frame[(frame["split"] == split) & (frame["metric"] == "accuracy") & (frame["round"] == round_index)]
    return rows.sort_values("client_id")


def test_base_and_novel_scores_equal_a_hand_computation_and_the_report_shows_their_means(cli, tmp_path):
    workspace = tmp_path / "ws"
    save_b2n_partition(workspace)
    result = cli(*TRAIN, "--method", "coop", "--rounds", "2", "--keep-rounds", "all")
    assert result.exit_code == 0, result.stderr
    run_dir = only_run(workspace)
    frame = pd.read_csv(run_dir / "metrics.csv")
    for round_index in (0, 1):
        expected = hand_scores(run_dir, round_index, 3, "ctx", "init_ctx")
        for split in ("base", "novel"):
            rows = split_rows(frame, split, round_index)
            assert rows["client_id"].tolist() == [0, 1, 2]
            assert rows["num_examples"].tolist() == [108, 108, 108]  # 18 classes x 3 domains x 2 test images
            assert rows["value"].tolist() == pytest.approx(expected[split], abs=1e-12), (split, round_index)
        assert len(frame[(frame["split"].isin(["base", "novel"])) & (frame["metric"] == "loss") & (frame["round"] == round_index)]) == 6
    # CoOp's clients own disjoint classes: their base scores differ, so each client's own prompt was used.
    assert len(set(split_rows(frame, "base", 1)["value"])) > 1

    report = cli("report")
    assert report.exit_code == 0, report.stderr
    (row,) = pd.read_csv(workspace / "reports" / "runs.csv").to_dict("records")
    local = 100 * split_rows(frame, "test", 1)["value"].mean()
    base = 100 * split_rows(frame, "base", 1)["value"].mean()
    novel = 100 * split_rows(frame, "novel", 1)["value"].mean()
    assert row["local_acc"] == pytest.approx(local) and row["final_mean_acc"] == pytest.approx(local)
    assert row["base_acc"] == pytest.approx(base) and row["novel_acc"] == pytest.approx(novel)
    assert row["hm"] == pytest.approx(2 * base * novel / (base + novel))
    assert row["hm3"] == pytest.approx(3 / (1 / local + 1 / base + 1 / novel))
    assert "| hm | hm3 |" in report.stdout and "hm = harmonic mean of base and novel, hm3 = of local, base and novel" in report.stdout

    # pfedmoap evaluate re-scores base and novel exactly as training did.
    evaluated = cli("evaluate", "--run", run_dir.name, "--round", "1")
    assert evaluated.exit_code == 0, evaluated.stderr
    again = pd.read_csv(run_dir / "evaluation.csv")
    for split in ("test", "base", "novel"):
        assert split_rows(again, split, 1)["value"].tolist() == split_rows(frame, split, 1)["value"].tolist()


def test_completeness_checks_require_every_clients_base_and_novel_rows(cli, tmp_path):
    from pfedmoap_cli.report.runs import checked_run_metrics, incomplete_reason, read_metrics_checked, run_required_splits

    workspace = tmp_path / "ws"
    save_b2n_partition(workspace)
    assert cli(*TRAIN, "--method", "promptfl", "--rounds", "1").exit_code == 0
    run_dir = only_run(workspace)
    assert run_required_splits(run_dir) == ("base", "novel")
    frame = read_metrics_checked(run_dir / "metrics.csv")
    assert incomplete_reason(frame, 1, 3, None, ("base", "novel")) is None
    assert checked_run_metrics(run_dir)[1] is None
    for split in ("base", "novel"):
        lacking = frame[~((frame["split"] == split) & (frame["metric"] == "accuracy") & (frame["client_id"] == 2))]
        assert incomplete_reason(lacking, 1, 3, None, ("base", "novel")) == (
            f"round 0 has no {split} accuracy for client(s) 2 (a base-to-novel run scores every client on base and novel)"
        )
        # Every row of the split gone: still refused, because the run must have them.
        assert f"no {split} accuracy" in incomplete_reason(frame[frame["split"] != split], 1, 3, None, ("base", "novel"))
        twice = pd.concat([frame, frame[(frame["split"] == split) & (frame["metric"] == "accuracy")].iloc[:1]])
        assert f"two {split} accuracy rows" in incomplete_reason(twice, 1, 3, None, ())
    # On disk: the run is left out of the report with one line.
    text = (run_dir / "metrics.csv").read_text().splitlines(keepends=True)
    (run_dir / "metrics.csv").write_text("".join(line for line in text if ",novel,accuracy," not in line))
    report = cli("report")
    assert "no novel accuracy" in report.stderr and "left out of the report" in report.stderr


def test_a_label_set_bound_method_records_base_rows_only_and_says_why_once(cli, tmp_path):
    workspace = tmp_path / "ws"
    save_b2n_partition(workspace)
    result = cli(*TRAIN, "--method", "pfedprompt", "--rounds", "2")
    assert result.exit_code == 0, result.stderr
    notices = [line for line in result.stderr.splitlines() if "cannot be scored on novel class names" in line]
    assert len(notices) == 1 and "pfedprompt" in notices[0]
    frame = pd.read_csv(only_run(workspace) / "metrics.csv")
    assert set(frame["split"]) == {"test", "base", "train"}
    assert sorted(split_rows(frame, "base", 1)["client_id"]) == [0, 1, 2]
    report = cli("report")
    assert report.exit_code == 0 and "left out" not in report.stderr
    (row,) = pd.read_csv(workspace / "reports" / "runs.csv").to_dict("records")
    assert row["base_acc"] == pytest.approx(100 * split_rows(frame, "base", 1)["value"].mean())
    assert all(math.isnan(row[k]) for k in ("novel_acc", "hm", "hm3"))


def test_runs_without_base_to_novel_list_as_before(cli, tmp_path):
    from pfedmoap_cli.report.runs import RUN_SUMMARY_COLUMNS

    result = cli("partition", "--dataset", "synthetic", "--iid", "--clients", "2", "--seed", "1",
                 "--option", "train_per_class=3", "--option", "test_per_class=2")
    assert result.exit_code == 0, result.stderr
    assert cli(*TRAIN, "--method", "zsclip", "--rounds", "1").exit_code == 0
    frame = pd.read_csv(only_run(tmp_path / "ws") / "metrics.csv")
    assert set(frame["split"]) == {"test"}
    report = cli("report")
    assert report.exit_code == 0, report.stderr
    assert list(pd.read_csv(tmp_path / "ws" / "reports" / "runs.csv").columns) == RUN_SUMMARY_COLUMNS
    assert "hm3" not in report.stdout


def test_flower_refuses_a_base_to_novel_partition_in_one_line(cli, tmp_path):
    workspace = tmp_path / "ws"
    path = save_b2n_partition(workspace)
    message = one_line_error(cli(*TRAIN, "--method", "promptfl", "--rounds", "1", "--engine", "flower"))
    assert "base-to-novel evaluation runs on the local engine" in message and path.name in message
    message = one_line_error(cli(*TRAIN, "--method", "promptfl", "--engine", "flower", "--write-flower-app", str(tmp_path / "app")))
    assert "base-to-novel evaluation runs on the local engine" in message
    assert not (workspace / "runs").exists() and not (tmp_path / "app").exists()
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    env = {k: v for k, v in os.environ.items() if k != "PFEDMOAP_DEBUG"}
    done = subprocess.run([str(SCRIPT), "--quiet", "--workspace", str(workspace), *TRAIN, "--method", "promptfl", "--engine", "flower"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "base-to-novel evaluation runs on the local engine" in lines[0] and "Traceback" not in done.stderr


def test_resuming_a_base_to_novel_run_writes_what_a_straight_run_writes(cli, tmp_path):
    """pFedMoAP (novel scores from its local prompt and experts, gated as usual), stopped after round 0 and resumed."""
    flags = (*TRAIN, "--method", "pfedmoap", "--rounds", "2", "--num-experts", "1", "--run-id", "b2n")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for workspace in (straight, stopped):
        save_b2n_partition(workspace)
    assert cli(*flags, workspace=straight).exit_code == 0
    assert cli(*flags, "--stop-after", "1", workspace=stopped).exit_code == 0
    first = pd.read_csv(stopped / "runs" / "b2n" / "metrics.csv")
    assert set(first["round"]) == {0}
    resumed = cli("train", "--resume", "--run-id", "b2n", workspace=stopped)
    assert resumed.exit_code == 0, resumed.stderr
    expected = (straight / "runs" / "b2n" / "metrics.csv").read_text()
    assert (stopped / "runs" / "b2n" / "metrics.csv").read_text() == expected
    frame = pd.read_csv(straight / "runs" / "b2n" / "metrics.csv")
    for split in ("base", "novel"):
        for round_index in (0, 1):
            assert sorted(split_rows(frame, split, round_index)["client_id"]) == [0, 1, 2]
    assert np.isfinite(frame[frame["split"] == "novel"]["value"]).all()


def test_method_for_class_names_keeps_everything_but_the_label_set():
    """The novel instance: same class, options, frozen CLIP, prompt settings and seed; only the names differ."""
    from pfedmoap_cli.engine.generalisation import method_for_class_names
    from pfedmoap_cli.engine.session import build_method
    from pfedmoap_cli.engine.settings import TrainSettings

    source = SyntheticSource(**SMALL)
    partition = build_partition(source, PartitionSettings("iid", 3, seed=1, base_to_novel=True), SMALL)
    settings = TrainSettings(method="pfedmoap", backbone="micro-clip", pretrained="synthetic", n_ctx=2, seed=7, device="cpu",
                             ctx_init="a photo of a", truncate_prompts=False, method_options={"num_experts": 1, "lam": 0.25})
    _, method = build_method(settings, partition)
    novel = method_for_class_names(method, partition.novel_class_names)
    assert type(novel) is type(method) and novel.options == method.options and novel.options.num_experts == 1
    assert novel.env.clip is method.env.clip and novel.env.seed == 7 and novel.env.num_clients == 3
    assert novel.env.class_names == tuple(source.class_names[18:])
    encoder = novel.env.text_encoder
    assert encoder.class_names == [n.replace("_", " ") for n in source.class_names[18:]]
    assert (encoder.init_phrase, encoder.truncate, encoder.n_ctx) == ("a photo of a", False, method.env.text_encoder.n_ctx)
    # Same seeded initial state (the "init" stream): the novel instance reads the run's states as they are.
    initial, again = method.initial_state(), novel.initial_state()
    assert initial.keys() == again.keys() and all(torch.equal(initial[k], again[k]) for k in initial)
