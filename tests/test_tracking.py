"""``--report-to``: what the trackers hold, read back with their own readers, equals metrics.csv.

TensorBoard and MLflow are real here (the tensorboard and mlflow extras, which
scripts/setup.sh installs); each test reads back what the library wrote
(TensorBoard's EventAccumulator, MLflow's client) and compares it with an
independent pandas computation from the run's metrics.csv. wandb is not a test
dependency: its adapter is checked against a stand-in module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from conftest import one_line_error
from pfedmoap_cli.artifacts.partition import load_partition, save_partition
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.engine.runner import IfExists, execute_run
from pfedmoap_cli.engine.settings import TrainSettings
from pfedmoap_cli.engine.workspace import Workspace
from pfedmoap_cli.tracking.registry import parse_report_to
from pfedmoap_cli.tracking.state import read_trackers

try:
    import tensorboard  # noqa: F401

    HAS_TENSORBOARD = True
except ImportError:
    HAS_TENSORBOARD = False
try:
    import mlflow  # noqa: F401

    HAS_MLFLOW = True
except ImportError:
    HAS_MLFLOW = False

needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'pfedmoap[tensorboard]'; scripts/setup.sh installs it)")
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install 'pfedmoap[mlflow]'; scripts/setup.sh installs it)")

ROUNDS = 3
#: pFedMoAP, so the rounds carry its extra test metrics (attention_cNNNN) too.
SETTINGS = TrainSettings(
    method="pfedmoap", rounds=ROUNDS, local_epochs=1, frac=0.5, batch_size=16, n_ctx=2, backbone="tiny-vit", pretrained="none",
    device="cpu", method_options={"num_experts": 2, "gating_dim": 16, "gating_heads": 2},
    keep_rounds="all",  # a fallback to round 1 needs its checkpoints ("auto" keeps the last round's only)
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def world(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    source = open_dataset("synthetic", Path("unused"), train_per_class=3, test_per_class=2)
    partition = build_partition(source, PartitionSettings("dirichlet", 4, seed=2, alpha=0.5), {"train_per_class": 3, "test_per_class": 2})
    path, _ = save_partition(partition, workspace.partitions_dir)
    return workspace, path


def train(world, observers, stop_after=None, if_exists=IfExists.AUTO):
    workspace, partition = world
    return execute_run(workspace, Path("unused"), SETTINGS, partition, run_id="tracked", if_exists=if_exists,
                       progress=False, stop_after=stop_after, observers=observers)


def expected_from_csv(run_dir: Path) -> dict[str, dict[int, float]]:
    """Per-round numbers computed with pandas from metrics.csv (independently of pfedmoap_cli.tracking)."""
    frame = pd.read_csv(run_dir / "metrics.csv")
    test = frame[frame.split == "test"]
    train_ = frame[frame.split == "train"]
    acc = test[test.metric == "accuracy"]
    out = {
        "accuracy/mean": acc.groupby("round").value.mean(),
        "accuracy/weighted": acc.assign(w=acc.value * acc.num_examples).groupby("round").w.sum() / acc.groupby("round").num_examples.sum(),
        "loss/test_mean": test[test.metric == "loss"].groupby("round").value.mean(),
        "loss/train_mean": train_[train_.metric == "loss"].groupby("round").value.mean(),
        "bytes/down_total": train_[train_.metric == "bytes_down"].groupby("round").value.sum(),
        "bytes/up_total": train_[train_.metric == "bytes_up"].groupby("round").value.sum(),
        "clients/missing": frame[frame.metric == "missing"].groupby("round").client_id.nunique().reindex(sorted(frame["round"].unique()), fill_value=0),
    }
    for (client, rows) in acc.groupby("client_id"):
        out[f"accuracy/client_{client:04d}"] = rows.set_index("round").value
    extras = test[~test.metric.isin(["accuracy", "loss", "missing"])]
    for metric, rows in extras.groupby("metric"):
        out[f"extra/{metric}"] = rows.groupby("round").value.mean()
    return {name: {int(k): float(v) for k, v in series.items()} for name, series in out.items()}


def tensorboard_scalars(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_client(workspace: Workspace):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(workspace.root / "mlruns").resolve().as_uri())


def mlflow_runs(client):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def trackers(*names):
    from pfedmoap_cli.tracking.registry import make_trackers

    return make_trackers(names)


# ---- unit rules -------------------------------------------------------------------------------
def test_report_to_accepts_repeats_and_comma_lists():
    assert parse_report_to(["tensorboard,mlflow", " MLflow ", "wandb"]) == ("tensorboard", "mlflow", "wandb")
    assert parse_report_to(None) == ()


def test_unknown_tracker_is_a_one_line_error(cli):
    line = one_line_error(cli("train", "--report-to", "tensorbored"))
    assert "--report-to 'tensorbored' is not a tracker" in line and "tensorboard, mlflow, wandb" in line


def test_missing_library_is_a_one_line_error_naming_the_extra(cli, monkeypatch):
    """A real failed import (a finder that refuses wandb), not a stubbed check."""

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == "wandb" or name.startswith("wandb."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)
    line = one_line_error(cli("train", "--report-to", "wandb"))
    assert line.endswith("--report-to wandb needs the wandb extra: pip install 'pfedmoap[wandb]'")


# ---- real libraries, read back ---------------------------------------------------------------
@needs_tensorboard
@needs_mlflow
def test_stopped_then_resumed_run_is_one_tracker_run_with_each_round_once(world):
    workspace, _ = world
    train(world, trackers("tensorboard", "mlflow"), stop_after=1, if_exists=IfExists.ERROR)
    train(world, [], stop_after=2)  # a round the trackers do not see (trained without --report-to)
    outcome = train(world, trackers("tensorboard", "mlflow"), if_exists=IfExists.RESUME)
    assert outcome.finished
    run_dir = outcome.paths.root
    expected = expected_from_csv(run_dir)
    assert any(name.startswith("extra/attention_c") for name in expected)  # pFedMoAP's expert attention is there to log

    events, scalars = tensorboard_scalars(run_dir)
    assert set(scalars) >= set(expected)
    for name, by_round in expected.items():
        steps = [step for step, _ in scalars[name]]
        assert steps == sorted(by_round), (name, steps)  # each round once, in order
        assert [v for _, v in scalars[name]] == pytest.approx([by_round[r] for r in sorted(by_round)], rel=1e-6, abs=1e-7), name
    histograms = events.Histograms("accuracy/clients")
    assert [h.step for h in histograms] == list(range(ROUNDS)) and all(h.histogram_value.num == 4 for h in histograms)
    assert "settings/text_summary" in events.Tags()["tensors"]

    client = mlflow_client(workspace)
    (run,) = mlflow_runs(client)  # one MLflow run across the stop and the resume
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["method"] == "pfedmoap" and run.data.params["method_options.num_experts"] == "2"
    assert run.data.params["rounds"] == str(ROUNDS)
    for name, by_round in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert [s for s, _ in history] == sorted(by_round), name
        assert [v for _, v in history] == pytest.approx([by_round[r] for r in sorted(by_round)], rel=1e-12, abs=1e-15), name

    state = read_trackers(run_dir)
    assert state["mlflow"]["run_id"] == run.info.run_id and state["mlflow"]["logged_rounds"] == ROUNDS
    assert state["tensorboard"] == {"log_dir": "tensorboard", "logged_rounds": ROUNDS}


@needs_tensorboard
@needs_mlflow
def test_round_retrained_after_a_fallback(world):
    """A damaged last round is trained again: TensorBoard shows it once (purged), MLflow keeps both points at its step."""
    workspace, _ = world
    outcome = train(world, trackers("tensorboard", "mlflow"), if_exists=IfExists.ERROR)
    last = outcome.paths.round_dir(ROUNDS - 1)
    (last / "manifest.json").unlink()  # round 2 no longer verifies: resume trains it again
    train(world, trackers("tensorboard", "mlflow"), if_exists=IfExists.RESUME)
    expected = expected_from_csv(outcome.paths.root)

    _, scalars = tensorboard_scalars(outcome.paths.root)
    assert [s for s, _ in scalars["accuracy/mean"]] == list(range(ROUNDS))
    assert [v for _, v in scalars["accuracy/mean"]] == pytest.approx([expected["accuracy/mean"][r] for r in range(ROUNDS)], rel=1e-6)

    client = mlflow_client(workspace)
    (run,) = mlflow_runs(client)
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy/mean"))
    assert steps == [0, 1, 2, 2]
    assert run.data.metrics["accuracy/mean"] == pytest.approx(expected["accuracy/mean"][ROUNDS - 1], rel=1e-12)
    assert run.info.status == "FINISHED"


@needs_mlflow
def test_mlflow_honours_its_tracking_uri(world, tmp_path, monkeypatch):
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.resolve().as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    train(world, trackers("mlflow"), stop_after=1, if_exists=IfExists.ERROR)
    assert (store).is_dir() and not (world[0].root / "mlruns").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.info.status == "KILLED"  # stopped before its last round: left to be resumed
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy/mean")] == [0]


@needs_tensorboard
def test_a_complete_run_resumed_with_a_tracker_is_logged_from_its_manifests(world):
    from dataclasses import replace

    workspace, partition = world
    settings = replace(SETTINGS, method="zsclip", rounds=2, method_options={})
    execute_run(workspace, Path("unused"), settings, partition, run_id="done", progress=False)  # no tracker
    outcome = execute_run(workspace, Path("unused"), settings, partition, run_id="done", if_exists=IfExists.RESUME,
                          progress=False, observers=trackers("tensorboard"))
    assert outcome.finished and outcome.last_round is None  # nothing trained
    _, scalars = tensorboard_scalars(outcome.paths.root)
    expected = expected_from_csv(outcome.paths.root)["accuracy/mean"]
    assert [s for s, _ in scalars["accuracy/mean"]] == [0, 1]
    assert [v for _, v in scalars["accuracy/mean"]] == pytest.approx([expected[0], expected[1]], rel=1e-6)


# ---- wandb, against a stand-in (the library is optional and not a test dependency) ------------
class FakeWandb(types.ModuleType):
    """Records what the adapter asks of wandb; one history per run id, kept across init() calls."""

    def __init__(self):
        super().__init__("wandb")
        self.histories: dict[str, list[dict]] = {}
        self.inits: list[dict] = []
        self.util = types.SimpleNamespace(generate_id=lambda: f"wb{len(self.histories)}")
        self.Histogram = lambda values: ("histogram", tuple(values))

    def init(self, **kwargs):
        self.inits.append(kwargs)
        history = self.histories.setdefault(kwargs["id"], [])
        return types.SimpleNamespace(log=history.append, define_metric=lambda *a, **k: None, finish=lambda exit_code=0: None)


def test_wandb_resumes_its_run_and_never_logs_a_round_twice(world, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    outcome = train(world, trackers("wandb"), stop_after=2, if_exists=IfExists.ERROR)
    (outcome.paths.round_dir(1) / "manifest.json").unlink()  # resume falls back and trains round 1 again
    train(world, trackers("wandb"), if_exists=IfExists.RESUME)
    assert [init["id"] for init in fake.inits] == ["wb0", "wb0"] and fake.inits[0]["resume"] == "allow"
    assert fake.inits[1]["config"] is None  # the config is given once, when the run is created
    (history,) = fake.histories.values()
    assert [entry["round"] for entry in history] == [0, 1, 2]
    expected = expected_from_csv(outcome.paths.root)
    assert history[2]["accuracy/weighted"] == pytest.approx(expected["accuracy/weighted"][2], rel=1e-12)


# ---- the command line ------------------------------------------------------------------------
def _console_script() -> str:
    script = Path(sys.executable).with_name("pfedmoap")
    if not script.is_file():
        pytest.skip(f"the console script is not installed beside {sys.executable} (pip install -e .)")
    return str(script)


BLOCKER = """
import sys
BLOCKED = {blocked!r}
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Refuse())
"""


def _run(args, workspace: Path, env_extra: dict[str, str] | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for name in ("PFEDMOAP_DEBUG", "PFEDMOAP_WORKSPACE", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return subprocess.run([_console_script(), "--quiet", "--workspace", str(workspace), *args], env=env, capture_output=True, text=True, timeout=600)


PARTITION = ("partition", "--dataset", "synthetic", "--clients", "3", "--seed", "1", "--iid", "--option", "train_per_class=1", "--option", "test_per_class=1")
TRAIN = ("train", "--method", "promptfl", "--rounds", "1", "--local-epochs", "1", "--n-ctx", "2", "--batch-size", "8",
         "--backbone", "tiny-vit", "--pretrained", "none")


@needs_tensorboard
def test_console_script_reports_to_tensorboard_and_names_a_missing_extra(cli, tmp_path):
    workspace = tmp_path / "ws"
    assert cli(*PARTITION, workspace=workspace).exit_code == 0  # in-process: only train goes through the script
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for library, extra in (("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
        (blocker / "sitecustomize.py").write_text(BLOCKER.format(blocked=[library]))
        refused = _run((*TRAIN, "--report-to", library), workspace, {"PYTHONPATH": str(blocker)})
        assert refused.returncode == 2, refused.stderr
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert lines[0].endswith(f"--report-to {library} needs the {extra} extra: pip install 'pfedmoap[{extra}]'"), lines
        assert not (workspace / "runs").exists()  # refused before any run file
    done = _run((*TRAIN, "--report-to", "tensorboard"), workspace)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (workspace / "runs").iterdir()
    _, scalars = tensorboard_scalars(run_dir)
    assert [s for s, _ in scalars["accuracy/mean"]] == [0]
    assert scalars["accuracy/mean"][0][1] == pytest.approx(expected_from_csv(run_dir)["accuracy/mean"][0], rel=1e-6)
    assert json.loads((run_dir / "tracking.json").read_text())["trackers"]["tensorboard"]["logged_rounds"] == 1


SWEEP_TABLE = """
[table]
title = "Tracked sweep"
seeds = [1]
partition_seed = 3
columns = "domains"
compare_paper = false
[train]
rounds = 1
batch_size = 8
n_ctx = 2
backbone = "tiny-vit"
pretrained = "none"
[[datasets]]
name = "synthetic"
domains = ["photo", "sketch", "noisy"]
partition = { scheme = "iid", clients = 3, clients_per_domain = 1, dataset_options = { train_per_class = 1, test_per_class = 1 } }
[[rows]]
key = "zsclip"
method = "zsclip"
"""


@needs_tensorboard
def test_sweep_reports_each_run(cli, tmp_path):
    table = tmp_path / "tracked.toml"
    table.write_text(SWEEP_TABLE)
    result = cli("sweep", "--table", str(table), "--report-to", "tensorboard")
    assert result.exit_code == 0, result.stderr
    (run_dir,) = (tmp_path / "ws" / "runs").iterdir()
    _, scalars = tensorboard_scalars(run_dir)
    assert [s for s, _ in scalars["accuracy/mean"]] == [0]
    assert read_trackers(run_dir)["tensorboard"]["logged_rounds"] == 1
