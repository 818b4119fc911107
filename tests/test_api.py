"""The stable Python API (:mod:`pfedmoap_cli.api`): what it exports, returns and raises, and that the CLI goes through it."""

from __future__ import annotations

import dataclasses
import inspect

import pandas as pd
import pytest

from conftest import one_line_error
from pfedmoap_cli import api
from pfedmoap_cli.errors import ArtifactError, ConfigError, StorageError, UserError

STABLE = [
    "partition", "train", "evaluate", "evaluate_on_dataset", "report", "method_names",
    "PartitionResult", "TrainResult", "RoundScore", "EvaluationResult", "CrossDatasetResult", "ReportResult",
    "UserError", "ConfigError", "DataError", "ArtifactError", "StorageError", "FederationError",
]
PARTITION = dict(dataset="synthetic", clients=4, seed=1, pathological=True, shots=2, dataset_options={"train_per_class": 2, "test_per_class": 1})
TRAIN = dict(method="promptfl", rounds=2, local_epochs=1, n_ctx=2, batch_size=4, frac=0.5, progress=False)


def test_the_stable_surface():
    assert api.__all__ == STABLE
    assert "stable import surface" in api.__doc__
    for name in STABLE:
        assert getattr(api, name).__doc__, name
    for result in (api.PartitionResult, api.TrainResult, api.RoundScore, api.EvaluationResult, api.CrossDatasetResult, api.ReportResult):
        assert dataclasses.is_dataclass(result) and result.__dataclass_params__.frozen, result
    for function in (api.partition, api.train, api.report):  # keyword-only: the flags' names are the interface
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in inspect.signature(function).parameters.values()), function


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace with one promptfl run, trained by the API in two calls (stop after round 0, then resume)."""
    ws = tmp_path_factory.mktemp("api") / "ws"
    part = api.partition(workspace=ws, **PARTITION)
    first = api.train(workspace=ws, stop_after=1, **TRAIN)
    second = api.train(workspace=ws, resume=True, **TRAIN)
    return ws, part, first, second


def test_partition_train_and_resume_return_what_they_wrote(trained):
    ws, part, first, second = trained
    assert part.path.parent == ws / "partitions" and part.path.is_file() and part.num_clients == 4 and part.num_classes == 36
    from pfedmoap_cli.artifacts.partition import resolve_partition_path

    assert resolve_partition_path(ws / "partitions", None) == part.path  # made current
    assert len(part.train_sizes) == 4 and part.dataset == "synthetic" and part.scheme == "pathological"
    import hashlib

    assert hashlib.sha256(part.path.read_bytes()).hexdigest() == part.sha256

    assert (first.completed_rounds, first.total_rounds, first.finished) == (1, 2, False)
    assert (second.completed_rounds, second.finished, second.run_id) == (2, True, first.run_id)
    assert second.run_dir == ws / "runs" / second.run_id and second.settings["method"] == "promptfl"
    assert isinstance(second.metrics, pd.DataFrame)
    pd.testing.assert_frame_equal(second.metrics, pd.read_csv(second.run_dir / "metrics.csv"))
    test_acc = second.metrics[(second.metrics.split == "test") & (second.metrics.metric == "accuracy")]
    assert sorted(test_acc["round"].unique()) == [0, 1]
    assert second.last_mean_accuracy == pytest.approx(test_acc[test_acc["round"] == 1]["value"].mean())
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.run_id = "x"  # type: ignore[misc]


def test_evaluate_and_report(trained):
    ws, _, _, run = trained
    seen = []
    result = api.evaluate(run.run_id, workspace=ws, round=1, progress=False, on_round=seen.append)
    assert result.path == run.run_dir / "evaluation.csv" and [s.round for s in result.rounds] == [1] and seen == list(result.rounds)
    pd.testing.assert_frame_equal(result.frame, pd.read_csv(result.path))
    assert len(result.frame) == 4 * 2  # 4 clients x (accuracy, loss) of round 1
    recorded = run.metrics[(run.metrics["round"] == 1) & (run.metrics.split == "test") & (run.metrics.metric == "accuracy")]
    assert result.rounds[0].mean_accuracy == pytest.approx(recorded["value"].mean()) and result.rounds[0].clients == 4

    summary = api.report(workspace=ws)
    assert list(summary.frame.run_id) == [run.run_id] and summary.files == (ws / "reports" / "runs.csv",)
    assert summary.markdown.startswith("| run_id |") and summary.warnings == ()


def test_errors_are_user_errors_not_exits(tmp_path, trained):
    ws = trained[0]
    with pytest.raises(ConfigError, match="choose one partition scheme, got --dirichlet and --iid"):
        api.partition(workspace=tmp_path / "a", dataset="synthetic", dirichlet=0.5, iid=True)
    with pytest.raises(ConfigError, match="^unknown method 'nope'"):
        api.train(workspace=ws, method="nope", progress=False)
    with pytest.raises(ArtifactError, match="already exists"):
        api.train(workspace=ws, **TRAIN)  # the same settings again, without resume
    with pytest.raises(ArtifactError, match="no run .*to resume"):
        api.train(workspace=ws, resume=True, **{**TRAIN, "seed": 7})
    with pytest.raises(ConfigError, match="--report-to 'nope' is not a tracker"):
        api.train(workspace=ws, report_to=["nope"], progress=False)
    with pytest.raises(ConfigError, match="engine must be 'local' or 'flower'"):
        api.train(workspace=ws, engine="ray", progress=False)
    with pytest.raises(ConfigError, match="--round must be between 0 and 1"):
        api.evaluate(trained[3].run_id, workspace=ws, round=5, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        api.report(workspace=tmp_path / "file")
    assert issubclass(api.ConfigError, UserError)


@pytest.mark.parametrize(
    "command, function",
    [
        (("partition", "--dataset", "synthetic", "--iid"), "partition"),
        (("evaluate", "--run", "some-run"), "evaluate"),
        (("report",), "report"),
        (("report", "--table", "demo"), "report"),
    ],
)
def test_the_cli_commands_call_the_api(cli, monkeypatch, command, function):
    def spy(*args, **kwargs):
        raise ConfigError(f"api.{function} was called")

    monkeypatch.setattr(api, function, spy)
    assert one_line_error(cli(*command)) == f"error: api.{function} was called"
