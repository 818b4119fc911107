"""Checkpoint storage that grows with the participants, --keep-rounds and --eval-every.

FedPer (a personal state per client) over 5 clients, one participant a round
(seed 2: participants 3, 3, 1, 2, 2, 4, 0, 2, 4, 0), so client 1 trains in
round 2 only and round 9 must find its state in round 2's folder. Expected
files are computed here from the sampler, not from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pfedmoap_cli.artifacts.checkpoint import load_checkpoint
from pfedmoap_cli.artifacts.partition import load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.recorder import RunRecorder
from pfedmoap_cli.engine.run_record import metrics_problem
from pfedmoap_cli.engine.runner import IfExists, execute_run
from pfedmoap_cli.engine.settings import TrainSettings, validate_settings
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.seeding import sample_clients

ROUNDS, CLIENTS, FRAC, SEED = 10, 5, 0.2, 2


def settings_for(keep: str, eval_every: int = 1, rounds: int = ROUNDS) -> TrainSettings:
    return validate_settings(
        TrainSettings(
            method="fedper", rounds=rounds, local_epochs=1, frac=FRAC, batch_size=4, n_ctx=2, lr=0.05, seed=SEED,
            backbone="tiny-vit", pretrained="none", device="cpu", amp=False, eval_batch_size=64,
            keep_rounds=keep, eval_every=eval_every,
        )
    )


PARTICIPANTS = [sample_clients(CLIENTS, FRAC, SEED, r) for r in range(ROUNDS)]


def last_trained(client: int, upto: int) -> int:
    return max(r for r in range(upto + 1) if client in PARTICIPANTS[r])


class World:
    def __init__(self, root: Path) -> None:
        self.workspace = Workspace(root / "ws")
        self.data_root = root / "data"
        options = {"train_per_class": 1, "test_per_class": 1}
        source = open_dataset("synthetic", self.data_root, **options)
        self.partition_path, _ = save_partition(build_partition(source, PartitionSettings("iid", CLIENTS, seed=1), options), self.workspace.partitions_dir)
        self.all = self.train("all", settings_for("all")).paths
        self.auto = self.train("auto", settings_for("auto")).paths

    def train(self, run_id: str, settings: TrainSettings, workspace: Workspace | None = None, **kwargs):
        workspace = workspace or self.workspace
        return execute_run(workspace, self.data_root, settings, workspace.partitions_dir / self.partition_path.name, run_id=run_id, progress=False, **kwargs)

    def copy(self, paths: RunPaths, name: str) -> tuple[Workspace, RunPaths]:
        root = self.workspace.root.parent / f"ws-{name}"
        shutil.copytree(self.workspace.root / "partitions", root / "partitions")
        shutil.copytree(paths.root, root / "runs" / paths.root.name)
        return Workspace(root), RunPaths(root / "runs" / paths.root.name)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    assert [c for c in range(CLIENTS) if last_trained(c, ROUNDS - 1) == 2] == [1] and 1 not in PARTICIPANTS[0] + PARTICIPANTS[1]
    return World(tmp_path_factory.mktemp("storage"))


def files(paths: RunPaths) -> set[str]:
    return {str(p.relative_to(paths.root / "checkpoints")) for p in (paths.root / "checkpoints").rglob("*.safetensors")}


def tensors(paths: RunPaths) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_checkpoint(paths.root / "checkpoints" / name)[0] for name in sorted(files(paths))}


def assert_same_run(mine: RunPaths, theirs: RunPaths) -> None:
    strip = lambda p: [line.split(",", 1)[1] for line in p.metrics_csv.read_text().splitlines()]  # noqa: E731
    assert strip(mine) == strip(theirs)
    a, b = tensors(mine), tensors(theirs)
    assert sorted(a) == sorted(b)
    for name in b:
        assert set(a[name]) == set(b[name]) and all(torch.equal(a[name][k], b[name][k]) for k in b[name]), name
    assert metrics_problem(mine) is None


def client_file(round_index: int, client: int) -> str:
    return f"round-{round_index:04d}/client-{client:04d}.safetensors"


# ---- a round writes the server and its participants only --------------------------------------
def test_each_round_writes_the_server_and_its_participants_only(world):
    for r in range(ROUNDS):
        folder = world.all.round_dir(r)
        written = sorted(p.name for p in folder.glob("*.safetensors"))
        assert written == sorted(["global.safetensors", *(f"client-{c:04d}.safetensors" for c in PARTICIPANTS[r])]), r
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        one_client = (folder / f"client-{PARTICIPANTS[r][0]:04d}.safetensors").stat().st_size
        assert size == (folder / "global.safetensors").stat().st_size + len(PARTICIPANTS[r]) * one_client


def test_the_manifest_points_to_every_clients_latest_state(world):
    manifest = json.loads((world.all.round_dir(9) / "manifest.json").read_text())
    expected = {str(c): client_file(last_trained(c, 9), c) for c in range(CLIENTS)}
    assert {c: e["file"] for c, e in manifest["client_states"].items()} == expected
    old = world.all.root / "checkpoints" / client_file(2, 1)
    assert manifest["client_states"]["1"] == {"round": 2, "file": client_file(2, 1), "sha256": hashlib.sha256(old.read_bytes()).hexdigest()}
    partition, sha = load_partition(world.partition_path)
    recorder = RunRecorder("all", settings_for("all"), partition, sha, world.all)
    states = recorder.load_client_states(9, "cpu")
    assert sorted(states) == list(range(CLIENTS))
    for key, tensor in load_checkpoint(old)[0].items():
        assert torch.equal(states[1][key], tensor)


# ---- --keep-rounds ----------------------------------------------------------------------------------
def kept_files(keep: int, last: int = ROUNDS - 1) -> set[str]:
    first = last - keep + 1
    expected = {f"round-{r:04d}/global.safetensors" for r in range(max(first - 1, 0), last + 1)}
    expected |= {client_file(r, c) for r in range(first, last + 1) for c in PARTICIPANTS[r]}
    expected |= {client_file(last_trained(c, r), c) for r in range(first, last + 1) for c in range(CLIENTS) if any(c in PARTICIPANTS[k] for k in range(r + 1))}
    return expected


def test_keep_rounds_auto_keeps_the_last_round_and_what_it_needs(world):
    assert files(world.auto) == kept_files(1)
    assert sorted(p.name for p in (world.auto.root / "checkpoints").iterdir()) == [f"round-{r:04d}" for r in range(ROUNDS)]
    assert all((world.auto.round_dir(r) / "manifest.json").is_file() for r in range(ROUNDS))
    assert metrics_problem(world.auto) is None
    assert_same_rows(world.auto, world.all)


def assert_same_rows(mine: RunPaths, theirs: RunPaths) -> None:
    strip = lambda p: [line.split(",", 1)[1] for line in p.metrics_csv.read_text().splitlines()]  # noqa: E731
    assert strip(mine) == strip(theirs)


def test_keep_rounds_n_leaves_exactly_the_expected_files(world):
    paths = world.train("keep3", settings_for("3")).paths
    assert files(paths) == kept_files(3)
    assert files(world.all) >= kept_files(3)
    assert_same_rows(paths, world.all)


@pytest.mark.parametrize("keep", ["auto", "all"])
def test_a_resumed_run_equals_the_unbroken_one(world, keep):
    run_id = f"resumed-{keep}"
    world.train(run_id, settings_for(keep), stop_after=4)
    resumed = world.train(run_id, settings_for(keep), if_exists=IfExists.RESUME)
    assert resumed.finished
    assert_same_run(resumed.paths, world.auto if keep == "auto" else world.all)


# ---- damage to a file that lives in an old round's folder ---------------------------------------
def damage(paths: RunPaths) -> None:
    path = paths.root / "checkpoints" / client_file(2, 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damage_to_an_old_file_of_the_last_round_is_found_on_resume(world, capsys):
    workspace, paths = world.copy(world.auto, "damaged-auto")
    damage(paths)
    assert metrics_problem(paths) == "round 2 does not verify (client-0001.safetensors changed)"
    capsys.readouterr()
    outcome = world.train("auto", settings_for("auto"), workspace=workspace, if_exists=IfExists.RESUME)
    err = capsys.readouterr().err.strip()
    # Round 9's set needs that file; "auto" deleted what the rounds before need, so all is trained again.
    assert err == "starting again from round 0: round 2's files do not verify (client-0001.safetensors changed); rounds from 0 are trained again"
    assert outcome.finished
    assert_same_run(paths, world.auto)


def test_damage_with_every_round_kept_falls_back_to_the_round_before(world, capsys):
    workspace, paths = world.copy(world.all, "damaged-all")
    damage(paths)
    capsys.readouterr()
    world.train("all", settings_for("all"), workspace=workspace, if_exists=IfExists.RESUME)
    err = capsys.readouterr().err.strip()
    assert err == "resuming after round 1: round 2's files do not verify (client-0001.safetensors changed); rounds from 2 are trained again"
    assert_same_run(paths, world.all)


def test_evaluate_finds_damage_to_an_old_file(world, cli):
    from conftest import one_line_error

    workspace, paths = world.copy(world.auto, "evaluate-damaged")
    damage(paths)
    message = one_line_error(cli("evaluate", "--run", "auto", "--round", "9", workspace=workspace.root))
    assert "round-0002/client-0001.safetensors" in message and "changed" in message


def test_evaluate_scores_kept_rounds_and_refuses_deleted_ones(world, cli):
    from conftest import one_line_error

    workspace, paths = world.copy(world.auto, "evaluate")
    message = one_line_error(cli("evaluate", "--run", "auto", "--round", "3", workspace=workspace.root))
    assert "round 3" in message and "--keep-rounds all" in message and "deleted" in message
    done = cli("evaluate", "--run", "auto", workspace=workspace.root)
    assert done.exit_code == 0, done.stderr
    rescored = [line.split(",") for line in paths.evaluation_csv.read_text().splitlines()[1:]]
    assert {row[5] for row in rescored} == {"9"}
    recorded = {(row[6], row[9]): row[11] for row in (line.split(",") for line in paths.metrics_csv.read_text().splitlines()[1:]) if row[5] == "9" and row[8] == "test"}
    assert {(row[6], row[9]): row[11] for row in rescored} == recorded
    done = cli("evaluate", "--run", "all", "--round", "3", workspace=world.workspace.root)
    assert done.exit_code == 0, done.stderr


# ---- --eval-every ------------------------------------------------------------------------------------
def test_eval_every_scores_every_nth_round_and_the_last(world):
    from pfedmoap_cli.report.runs import summarize_runs

    paths = world.train("every3", settings_for("auto", eval_every=3, rounds=7)).paths
    lines = [line.split(",") for line in paths.metrics_csv.read_text().splitlines()[1:]]
    assert sorted({int(row[5]) for row in lines if row[8] == "test"}) == [2, 5, 6]
    assert {int(row[5]) for row in lines if row[8] == "train"} == set(range(7))
    assert metrics_problem(paths) is None
    warnings: list[str] = []
    table = summarize_runs(paths.root.parent, warn=warnings.append)
    row = table[table["run_id"] == "every3"].iloc[0]
    accuracy = {}
    for cells in lines:
        if cells[8] == "test" and cells[9] == "accuracy":
            accuracy.setdefault(int(cells[5]), []).append(float(cells[10]))
    means = {r: sum(v) / len(v) for r, v in accuracy.items()}
    assert row["rounds"] == 7 and row["final_mean_acc"] == pytest.approx(100 * means[6])
    assert row["last5_mean_acc"] == pytest.approx(100 * (means[2] + means[5] + means[6]) / 3)
    assert not [w for w in warnings if "every3" in w]
    world.train("every3-resumed", settings_for("auto", eval_every=3, rounds=7), stop_after=4)
    resumed = world.train("every3-resumed", settings_for("auto", eval_every=3, rounds=7), if_exists=IfExists.RESUME)
    assert_same_run(resumed.paths, paths)


def test_a_run_missing_an_evaluated_rounds_rows_is_incomplete(world):
    from pfedmoap_cli.report.runs import incomplete_reason, read_metrics_checked

    frame = read_metrics_checked(world.all.metrics_csv)
    frame = frame[~((frame["split"] == "test") & (frame["round"] == 4))]
    assert "round 4" in incomplete_reason(frame, ROUNDS, CLIENTS, lambda r: True)
    assert incomplete_reason(frame, ROUNDS, CLIENTS, lambda r: r != 4) is None


def test_a_deleted_old_file_of_the_last_round_is_found(world):
    """A file no deletion may touch is missing from a folder --keep-rounds prunes: only the last round's manifest tells."""
    _, paths = world.copy(world.auto, "deleted-old")
    (paths.root / "checkpoints" / client_file(2, 1)).unlink()
    assert metrics_problem(paths) == "round 9 does not verify (round-0002/client-0001.safetensors is missing)"


def test_train_says_a_round_was_not_scored_instead_of_printing_nan(cli):
    assert cli("partition", "--dataset", "synthetic", "--iid", "--clients", "2", "--seed", "1",
               "--option", "train_per_class=1", "--option", "test_per_class=1").exit_code == 0
    flags = ("train", "--method", "promptfl", "--rounds", "3", "--eval-every", "2", "--local-epochs", "1", "--n-ctx", "2",
             "--batch-size", "4", "--backbone", "tiny-vit", "--pretrained", "none", "--device", "cpu", "--run-id", "every2")
    stopped = cli(*flags, "--stop-after", "1")
    assert stopped.exit_code == 0, stopped.stderr
    assert "round 0: not scored (--eval-every 2)" in stopped.stdout and "nan" not in stopped.stdout.lower()
    finished = cli("train", "--run-id", "every2", "--resume")
    assert finished.exit_code == 0 and "round 2: mean client accuracy" in finished.stdout, finished.stdout  # the last round always
