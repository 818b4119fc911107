"""A run's files are verified before they are trusted (issue 13).

Each test damages a copy of an interrupted run (2 of 3 rounds done) and
resumes it: the resume either refuses with a one-line :class:`ArtifactError`
naming the damaged file, or recovers and ends bit-identical (metric rows and
checkpoint tensors) to an unbroken run trained independently in this module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pfedmoap_cli.artifacts.checkpoint import load_checkpoint
from pfedmoap_cli.artifacts.partition import save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.run_record import metrics_problem, partition_path_of, read_run_record
from pfedmoap_cli.engine.runner import IfExists, execute_run
from pfedmoap_cli.engine.settings import TrainSettings, validate_settings
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.errors import ArtifactError

ROUNDS = 3
STOP = 2  # the interrupted runs stop after this many rounds


def settings_for(method: str = "fedper", seed: int = 1) -> TrainSettings:
    # FedPer keeps a personal state per client, so rounds have client checkpoints;
    # every round's are kept, so damage to an earlier round can be made and found.
    return validate_settings(
        TrainSettings(
            method=method, rounds=ROUNDS, local_epochs=1, frac=1.0, batch_size=4, n_ctx=2, lr=0.05, seed=seed,
            backbone="tiny-vit", pretrained="none", device="cpu", amp=False, eval_batch_size=64, keep_rounds="all",
        )
    )


class World:
    """One workspace and partition; an unbroken run and a template interrupted run."""

    def __init__(self, root: Path) -> None:
        self.workspace = Workspace(root / "ws")
        self.data_root = root / "data"
        options = {"train_per_class": 1, "test_per_class": 1}
        source = open_dataset("synthetic", self.data_root, **options)
        self.partition_path, _ = save_partition(build_partition(source, PartitionSettings("iid", 4, seed=1), options), self.workspace.partitions_dir)
        self.unbroken = self.train("unbroken").paths
        self.template = self.train("template", stop_after=STOP).paths
        self.other = self.train("other", settings=settings_for(seed=2), stop_after=STOP).paths

    def train(self, run_id: str, settings: TrainSettings | None = None, **kwargs):
        return execute_run(
            self.workspace, self.data_root, settings or settings_for(), self.partition_path, run_id=run_id, progress=False, **kwargs
        )

    def damaged_copy(self, name: str) -> RunPaths:
        """A copy of the interrupted run under the same run id, in a workspace of its own."""
        root = self.workspace.root.parent / f"ws-{name}"
        shutil.copytree(self.workspace.root / "partitions", root / "partitions")
        shutil.copytree(self.template.root, root / "runs" / "template")
        return RunPaths(root / "runs" / "template")

    def resume(self, paths: RunPaths):
        workspace = Workspace(paths.root.parent.parent)
        return execute_run(
            workspace, self.data_root, settings_for(), workspace.partitions_dir / self.partition_path.name, run_id="template",
            progress=False, if_exists=IfExists.RESUME,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("integrity"))


# ---- comparing with the unbroken run ----------------------------------------------------------
def rows_without_run_id(paths: RunPaths) -> list[str]:
    return [line.split(",", 1)[1] for line in paths.metrics_csv.read_text().splitlines()]


def tensors(paths: RunPaths) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(paths.root)): load_checkpoint(p)[0] for p in sorted((paths.root / "checkpoints").rglob("*.safetensors"))}


def assert_like_unbroken(paths: RunPaths, world: World) -> None:
    assert rows_without_run_id(paths) == rows_without_run_id(world.unbroken)
    mine, theirs = tensors(paths), tensors(world.unbroken)
    assert sorted(mine) == sorted(theirs)
    for name, state in theirs.items():
        assert set(mine[name]) == set(state), name
        for key, tensor in state.items():
            assert torch.equal(mine[name][key], tensor), (name, key)
    assert json.loads(paths.progress_json.read_text()) == json.loads(world.unbroken.progress_json.read_text())
    assert metrics_problem(paths) is None
    assert not list(paths.root.rglob("*.tmp"))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ArtifactError)
    return message


def test_the_unbroken_run_is_sealed_round_by_round(world):
    for round_index in range(ROUNDS):
        manifest = json.loads((world.unbroken.round_dir(round_index) / "manifest.json").read_text())
        assert manifest["round"] == round_index and manifest["run_id"] == "unbroken"
        assert set(manifest["files"]) == {"global.safetensors", *(f"client-{c:04d}.safetensors" for c in range(4))}
    assert metrics_problem(world.unbroken) is None


def test_an_undamaged_interrupted_run_resumes_silently(world, capsys):
    paths = world.damaged_copy("clean")
    assert world.resume(paths).finished
    assert capsys.readouterr().err == ""
    assert_like_unbroken(paths, world)


# ---- damaged checkpoints: round 1 does not verify, so rounds 1.. are trained again -------------------
def flip_payload(paths: RunPaths) -> str:
    path = paths.client_checkpoint(1, 3)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte is tensor payload, not header
    path.write_bytes(bytes(data))
    return "client-0003.safetensors changed"


def from_other_run(paths: RunPaths, world: World) -> str:
    shutil.copy(world.other.client_checkpoint(1, 2), paths.client_checkpoint(1, 2))
    return "client-0002.safetensors changed"


def from_other_round(paths: RunPaths) -> str:
    shutil.copy(paths.client_checkpoint(0, 1), paths.client_checkpoint(1, 1))
    return "client-0001.safetensors changed"


def deleted(paths: RunPaths) -> str:
    paths.client_checkpoint(1, 0).unlink()
    return "client-0000.safetensors is missing"


def duplicated(paths: RunPaths) -> str:
    shutil.copy(paths.client_checkpoint(1, 2), paths.client_checkpoint(1, 3))
    return "client-0003.safetensors changed"


def extra_client(paths: RunPaths) -> str:
    shutil.copy(paths.client_checkpoint(1, 2), paths.round_dir(1) / "client-0007.safetensors")
    return "client-0007.safetensors is extra"


DAMAGE = {
    "flipped-bytes": lambda p, w: flip_payload(p),
    "other-run": from_other_run,
    "other-round": lambda p, w: from_other_round(p),
    "deleted": lambda p, w: deleted(p),
    "duplicated": lambda p, w: duplicated(p),
    "extra": lambda p, w: extra_client(p),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_round_is_trained_again(world, capsys, damage):
    paths = world.damaged_copy(damage)
    short = DAMAGE[damage](paths, world)
    assert world.resume(paths).finished
    err = capsys.readouterr().err.strip()
    assert err == f"resuming after round 0: round 1's files do not verify ({short}); rounds from 1 are trained again"
    assert_like_unbroken(paths, world)


@pytest.mark.parametrize("damage", ["flipped-bytes", "other-run", "deleted", "extra"])
def test_evaluate_refuses_a_round_that_does_not_verify(world, cli, damage):
    from conftest import one_line_error

    paths = world.damaged_copy(f"evaluate-{damage}")
    (paths.root / "evaluation.csv").write_text("good\n")
    short = DAMAGE[damage](paths, world)
    message = one_line_error(cli("evaluate", "--run", "template", "--round", "1", workspace=paths.root.parent.parent))
    assert short.split()[0] in message and "round-0001" in message
    assert (paths.root / "evaluation.csv").read_text() == "good\n"  # a failed evaluate keeps the old file


def test_evaluate_writes_the_whole_file(world, cli):
    paths = world.damaged_copy("evaluate-ok")
    result = cli("evaluate", "--run", "template", workspace=paths.root.parent.parent)
    assert result.exit_code == 0, result.stderr
    lines = (paths.root / "evaluation.csv").read_text().splitlines()
    assert {line.split(",")[5] for line in lines[1:]} == {"0", "1"}


def test_a_checkpoint_of_another_method_is_named(world):
    from pfedmoap_cli.artifacts.checkpoint import CheckpointIdentity

    with pytest.raises(ArtifactError) as error:
        load_checkpoint(world.unbroken.global_checkpoint(0), CheckpointIdentity("unbroken", 0, "server", "pfedmoap"))
    assert "written by method 'fedper'" in one_line(error) and "global.safetensors" in str(error.value)
    with pytest.raises(ArtifactError) as error:
        load_checkpoint(world.unbroken.client_checkpoint(1, 2), CheckpointIdentity("unbroken", 1, "3", "fedper"))
    assert "client_id '2'" in one_line(error)
    with pytest.raises(ArtifactError) as error:
        load_checkpoint(world.unbroken.client_checkpoint(1, 2), CheckpointIdentity("unbroken", 0, "2", "fedper"))
    assert "round '1'" in one_line(error)


# ---- progress.json ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ['{"completed_rounds": -1, "total_rounds": 3}', '{"completed_rounds": 99, "total_rounds": 3}', "garbage{"])
def test_an_invalid_progress_file_is_rebuilt_from_the_manifests(world, capsys, text):
    paths = world.damaged_copy(f"progress-{abs(hash(text))}")
    paths.progress_json.write_text(text)
    assert world.resume(paths).finished
    err = capsys.readouterr().err.strip()
    assert "progress.json" in err and "invalid" in err and "\n" not in err
    assert_like_unbroken(paths, world)


def test_an_invalid_progress_file_is_refused_where_it_is_read(world):
    from pfedmoap_cli.engine.run_record import completed_rounds

    paths = world.damaged_copy("progress-read")
    paths.progress_json.write_text('{"completed_rounds": 99, "total_rounds": 3}')
    with pytest.raises(ArtifactError) as error:
        completed_rounds(paths)
    assert "progress.json" in one_line(error) and "--resume" in str(error.value)


def test_progress_that_claims_more_than_verifies(world, capsys):
    paths = world.damaged_copy("progress-more")
    shutil.rmtree(paths.round_dir(1))
    assert world.resume(paths).finished
    assert "progress.json says 2 rounds are complete but round 1's files are missing" in capsys.readouterr().err
    assert_like_unbroken(paths, world)


# ---- metrics.csv ---------------------------------------------------------------------------------
def drop_last_line(text: str) -> str:
    return "".join(text.splitlines(keepends=True)[:-1])


def drop_an_accuracy_row(text: str) -> str:
    lines = text.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if ",accuracy," in line)
    return "".join(lines[:first] + lines[first + 1 :])


METRICS_DAMAGE = {
    "deleted": None,
    "last-line": drop_last_line,
    "accuracy-row": drop_an_accuracy_row,
    "garbage": lambda text: text + "garbage,line\n",
}


@pytest.mark.parametrize("damage", sorted(METRICS_DAMAGE))
def test_damaged_metrics_are_rebuilt_from_the_manifests(world, capsys, damage):
    paths = world.damaged_copy(f"metrics-{damage}")
    change = METRICS_DAMAGE[damage]
    if change is None:
        paths.metrics_csv.unlink()
    else:
        paths.metrics_csv.write_text(change(paths.metrics_csv.read_text()))
    assert metrics_problem(paths) is not None
    assert world.resume(paths).finished
    err = capsys.readouterr().err.strip()
    assert err.startswith("metrics.csv of run template") and err.endswith("rebuilt it from the round manifests") and "\n" not in err
    assert_like_unbroken(paths, world)


# ---- run.json ------------------------------------------------------------------------------------
def edit_lr(record: dict) -> str:
    record["settings"]["lr"] = 0.5
    return json.dumps(record)


def drop_key(record: dict) -> str:
    del record["partition_sha256"]
    return json.dumps(record)


@pytest.mark.parametrize("edit, expected", [(edit_lr, "was edited"), (drop_key, "partition_sha256"), (lambda r: "garbage{", "not valid JSON")])
def test_a_damaged_run_record_is_refused(world, edit, expected):
    paths = world.damaged_copy(f"record-{expected.split()[0]}")
    paths.run_json.write_text(edit(json.loads(paths.run_json.read_text())))
    with pytest.raises(ArtifactError) as error:
        read_run_record(paths)
    assert expected in one_line(error) and ("run.json" in str(error.value))


def test_the_resume_command_refuses_an_edited_run_record(world, cli):
    from conftest import one_line_error

    paths = world.damaged_copy("record-cli")
    paths.run_json.write_text(edit_lr(json.loads(paths.run_json.read_text())))
    message = one_line_error(cli("train", "--resume", "--run-id", "template", workspace=paths.root.parent.parent))
    assert message == "error: run.json of run template was edited (its settings no longer match their recorded hash); restore it or start a new run"


def test_the_partition_is_stored_relative_to_the_workspace(world):
    record = read_run_record(world.unbroken)
    assert not Path(record["partition_file"]).is_absolute()
    moved = world.damaged_copy("moved")  # another workspace folder: the relative path follows it
    assert partition_path_of(read_run_record(moved), moved.root.parent.parent).is_file()
    old = dict(record, partition_file=str(world.partition_path.resolve()))  # records of older versions
    assert partition_path_of(old, Path("/elsewhere")) == world.partition_path.resolve()


# ---- leftovers and old runs -------------------------------------------------------------------------
def test_leftover_temp_files_are_removed(world, capsys):
    paths = world.damaged_copy("tmp")
    (paths.round_dir(1) / ".client-0002.safetensors.abcd.tmp").write_bytes(b"half")
    (paths.root / ".metrics.csv.x1y2.tmp").write_text("half")
    assert world.resume(paths).finished
    assert capsys.readouterr().err == ""
    assert_like_unbroken(paths, world)


def test_a_run_without_manifests_is_refused(world):
    paths = world.damaged_copy("old")
    for manifest in paths.root.rglob("manifest.json"):
        manifest.unlink()
    with pytest.raises(ArtifactError) as error:
        world.resume(paths)
    assert "older pfedmoap version" in one_line(error)
    assert "older pfedmoap version" in metrics_problem(paths)


def test_report_leaves_out_a_run_whose_sealed_rows_were_edited(world):
    """Every row is there, one accuracy value changed: only the manifests can tell, and report must."""
    from pfedmoap_cli.report.runs import summarize_runs

    paths = world.damaged_copy("edited-accuracy")
    lines = paths.metrics_csv.read_text().splitlines(keepends=True)
    row = next(i for i, line in enumerate(lines) if ",test,accuracy," in line)
    cells = lines[row].rstrip("\n").split(",")
    cells[-2] = repr(min(float(cells[-2]) + 0.25, 1.0) if float(cells[-2]) < 0.75 else float(cells[-2]) - 0.25)
    lines[row] = ",".join(cells) + "\n"
    paths.metrics_csv.write_text("".join(lines))
    warnings = []
    table = summarize_runs(paths.root.parent, warn=warnings.append)
    assert table.empty
    assert len(warnings) == 1 and "template" in warnings[0] and "metrics.csv" in warnings[0], warnings


def test_a_sealed_run_left_out_of_a_report_is_repaired_by_the_command_the_warning_names(world, cli):
    from pfedmoap_cli.report.runs import summarize_runs

    paths = world.damaged_copy("report-repair")
    paths.metrics_csv.write_text(paths.metrics_csv.read_text() + "garbage,,\x00\n")
    warnings = []
    assert summarize_runs(paths.root.parent, warn=warnings.append).empty
    assert len(warnings) == 1 and "'pfedmoap train --resume --run-id template' repairs it" in warnings[0], warnings
    done = cli("train", "--resume", "--run-id", "template", "--stop-after", str(STOP), workspace=paths.root.parent.parent)
    assert done.exit_code == 0, done.stderr
    warnings.clear()
    assert len(summarize_runs(paths.root.parent, warn=warnings.append)) == 1 and not warnings
