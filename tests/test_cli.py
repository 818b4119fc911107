"""The command line end to end, and its one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import one_line_error

TRAIN = ("train", "--rounds", "2", "--local-epochs", "1", "--n-ctx", "2", "--batch-size", "16")


def partition_small(cli, *extra, workspace=None):
    """A small synthetic partition: 4 clients, few images."""
    return cli(
        "partition", "--dataset", "synthetic", "--clients", "4", "--seed", "1",
        "--option", "train_per_class=3", "--option", "test_per_class=2", *extra, workspace=workspace,
    )


def run_id_of(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("run "))
    return line.split()[1].rstrip(":")


def test_pipeline_end_to_end(cli, tmp_path):
    result = partition_small(cli, "--dirichlet", "0.5")
    assert result.exit_code == 0, result.stderr
    assert "made current" in result.stdout
    result = cli(*TRAIN, "--method", "promptfl")
    assert result.exit_code == 0, result.stderr
    run_id = run_id_of(result.stdout)
    run_dir = tmp_path / "ws" / "runs" / run_id
    record = json.loads((run_dir / "run.json").read_text())
    assert record["settings"]["method"] == "promptfl" and record["settings"]["rounds"] == 2
    assert len(record["partition_sha256"]) == 64
    metrics = pd.read_csv(run_dir / "metrics.csv")
    acc = metrics[(metrics.metric == "accuracy") & (metrics.split == "test")]
    assert sorted(acc["round"].unique()) == [0, 1]
    assert sorted(acc["client_id"].unique()) == [0, 1, 2, 3]
    assert (run_dir / "checkpoints" / "round-0001" / "global.safetensors").is_file()

    # evaluate re-scores the checkpoints and reproduces the training metrics
    result = cli("evaluate", "--run", run_id)
    assert result.exit_code == 0, result.stderr
    rescored = pd.read_csv(run_dir / "evaluation.csv")
    a = acc.sort_values(["round", "client_id"])["value"].to_numpy()
    b = rescored[rescored.metric == "accuracy"].sort_values(["round", "client_id"])["value"].to_numpy()
    assert a.tolist() == pytest.approx(b.tolist(), abs=1e-12)

    result = cli("report")
    assert result.exit_code == 0, result.stderr
    assert "| run_id |" in result.stdout and run_id in result.stdout
    summary = pd.read_csv(tmp_path / "ws" / "reports" / "runs.csv")
    final = acc[acc["round"] == 1]["value"].mean() * 100
    assert summary.loc[0, "final_mean_acc"] == pytest.approx(final)

    # the same command again refuses to overwrite, --resume says it is done
    assert "already exists" in one_line_error(cli(*TRAIN, "--method", "promptfl"))
    result = cli(*TRAIN, "--method", "promptfl", "--resume")
    assert result.exit_code == 0 and "already complete" in result.stdout


@pytest.mark.parametrize("method", ["zsclip", "coop"])
def test_other_methods_train(cli, method):
    assert partition_small(cli, "--pathological", "--shots", "2").exit_code == 0
    result = cli(*TRAIN, "--method", method)
    assert result.exit_code == 0, result.stderr
    assert "2/2 rounds complete" in result.stdout


def test_interrupted_run_resumes_to_identical_metrics(cli, tmp_path):
    for ws in ("a", "b"):
        assert partition_small(cli, "--dirichlet", "0.5", workspace=tmp_path / ws).exit_code == 0
    args = (*TRAIN[:2], "3", *TRAIN[3:], "--method", "coop", "--frac", "0.5")
    full = cli(*args, workspace=tmp_path / "a")
    assert full.exit_code == 0, full.stderr
    part = cli(*args, "--stop-after", "1", workspace=tmp_path / "b")
    assert "1/3 rounds complete" in part.stdout
    resumed = cli(*args, "--resume", workspace=tmp_path / "b")
    assert resumed.exit_code == 0, resumed.stderr
    run_id = run_id_of(full.stdout)
    assert run_id == run_id_of(resumed.stdout)
    a = (tmp_path / "a" / "runs" / run_id / "metrics.csv").read_text()
    b = (tmp_path / "b" / "runs" / run_id / "metrics.csv").read_text()
    assert a == b


def test_seed_zero_is_honoured(cli):
    assert partition_small(cli, "--dirichlet", "0.5").exit_code == 0
    zero = cli(*TRAIN, "--method", "promptfl", "--seed", "0")
    one = cli(*TRAIN, "--method", "promptfl", "--seed", "1")
    assert zero.exit_code == 0 and one.exit_code == 0
    assert "-s0-" in run_id_of(zero.stdout) and "-s1-" in run_id_of(one.stdout)


def test_config_file_and_flags(cli, tmp_path):
    assert partition_small(cli, "--iid").exit_code == 0
    config = tmp_path / "run.toml"
    config.write_text('[train]\nmethod = "promptfl"\nrounds = 1\nlocal_epochs = 1\nn_ctx = 2\nbatch_size = 8\n')
    result = cli("train", "--config", str(config), "--seed", "3")
    assert result.exit_code == 0, result.stderr
    record = json.loads(next((tmp_path / "ws" / "runs").glob("*/run.json")).read_text())
    assert record["settings"]["rounds"] == 1 and record["settings"]["seed"] == 3
    config.write_text("[train]\nroundz = 1\n")
    assert "unknown setting 'roundz'" in one_line_error(cli("train", "--config", str(config)))


def write_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class=5):
    for c, name in enumerate(classes):
        for i in range(per_class):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(folder / f"{i}.png")


class TestBadInput:
    def test_unknown_dataset(self, cli):
        message = one_line_error(cli("partition", "--dataset", "imagenet77", "--iid"))
        assert "unknown dataset 'imagenet77'" in message and "synthetic" in message

    def test_unknown_method(self, cli):
        assert partition_small(cli, "--iid").exit_code == 0
        message = one_line_error(cli("train", "--method", "fedsomething"))
        assert "unknown method 'fedsomething'" in message and "promptfl" in message

    def test_missing_data_root(self, cli, tmp_path):
        result = cli("--data-root", str(tmp_path / "nowhere"), "partition", "--dataset", "imagefolder", "--iid", "--clients", "2")
        assert "--data-root" in one_line_error(result)

    def test_alpha_must_be_positive(self, cli):
        assert "alpha" in one_line_error(partition_small(cli, "--dirichlet", "0"))

    def test_two_schemes(self, cli):
        assert "one partition scheme" in one_line_error(partition_small(cli, "--iid", "--pathological"))

    def test_pathological_more_clients_than_classes(self, cli):
        result = cli("partition", "--dataset", "synthetic", "--pathological", "--clients", "40")
        assert "clients" in one_line_error(result)

    def test_malformed_partition_json(self, cli, tmp_path):
        bad = tmp_path / "bad.json"
        bad.write_text("{oops")
        assert "not valid JSON" in one_line_error(cli("train", "--partition", str(bad)))

    def test_wrong_partition_version(self, cli, tmp_path):
        assert partition_small(cli, "--iid").exit_code == 0
        path = next((tmp_path / "ws" / "partitions").glob("*.json"))
        data = json.loads(path.read_text())
        data["schema"] = "pfedmoap.partition/99"
        path.write_text(json.dumps(data))
        assert "schema" in one_line_error(cli("train", "--method", "zsclip"))

    def test_partition_of_changed_dataset(self, cli, tmp_path):
        data = tmp_path / "images"
        write_image_folder(data)
        part = cli("--data-root", str(data), "partition", "--dataset", "imagefolder", "--iid", "--clients", "2")
        assert part.exit_code == 0, part.stderr
        Image.new("RGB", (8, 8)).save(data / "owl" / "extra.png")
        result = cli("--data-root", str(data), "train", "--method", "zsclip", "--backbone", "tiny-vit", "--pretrained", "none")
        assert "sample hash mismatch" in one_line_error(result)

    def test_resume_of_missing_run(self, cli):
        assert partition_small(cli, "--iid").exit_code == 0
        assert "no run" in one_line_error(cli("train", "--resume", "--run-id", "nope"))
        assert "to resume" in one_line_error(cli(*TRAIN, "--resume"))

    def test_resume_takes_every_setting_but_the_device_from_the_run(self, cli, tmp_path):
        """The evaluation batch is part of a run too (FedOTP solves its transport per batch)."""
        assert partition_small(cli, "--iid").exit_code == 0
        first = cli(*TRAIN, "--stop-after", "1")
        assert first.exit_code == 0, first.stderr
        (run_dir,) = (tmp_path / "ws" / "runs").iterdir()
        message = one_line_error(cli("train", "--resume", "--run-id", run_dir.name, "--eval-batch-size", "7"))
        assert "drop --eval-batch-size" in message
        resumed = cli("train", "--resume", "--run-id", run_dir.name, "--device", "cpu")
        assert resumed.exit_code == 0, resumed.stderr

    def test_no_partition_yet(self, cli):
        assert "pfedmoap partition" in one_line_error(cli("train"))

    def test_bad_setting_value(self, cli):
        assert partition_small(cli, "--iid").exit_code == 0
        assert "--frac" in one_line_error(cli("train", "--frac", "1.5"))

    def test_debug_shows_traceback(self, cli, monkeypatch):
        from pfedmoap_cli.errors import UserError

        monkeypatch.setenv("PFEDMOAP_DEBUG", "1")
        with pytest.raises(UserError):
            cli("partition", "--dataset", "imagenet77", "--iid")


def test_help_and_download_list(cli):
    result = cli("--help")
    assert result.exit_code == 0 and "partition" in result.stdout
    result = cli("train", "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout
    result = cli("download", "--list")
    assert result.exit_code == 0 and "synthetic" in result.stdout
    assert "flowers102" in result.stdout and "missing" in result.stdout


def test_module_entry_point():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pfedmoap_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("pfedmoap ")


def test_recipe_method_options_apply_only_to_methods_that_take_them(tmp_path, monkeypatch):
    from pfedmoap_cli.cli.train_cmd import resolve_settings

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "synthetic.toml").write_text('[train]\nmethod = "pfedmoap"\nmethod_options = { num_experts = 4, lam = 0.0 }\n')
    monkeypatch.setenv("PFEDMOAP_RECIPES", str(recipes))
    assert resolve_settings("synthetic", None, {}).method_options == {"num_experts": 4, "lam": 0.0}
    assert resolve_settings("synthetic", None, {"method": "promptfl"}).method_options == {}
    merged = resolve_settings("synthetic", None, {"method_options": {"lam": 0.5}})
    assert merged.method_options == {"num_experts": 4, "lam": 0.5}


def test_named_pfedmoap_flags_are_method_options(cli, tmp_path):
    assert partition_small(cli, "--pathological", "--shots", "2").exit_code == 0
    result = cli(*TRAIN[:2], "1", *TRAIN[3:], "--method", "pfedmoap", "--num-experts", "2", "--expert-selection", "random",
                 "--lambda", "0", "--gating-dim", "16", "--gating-heads", "4", "--gating-scaling", "5", "--gating-lr", "0.02")
    assert result.exit_code == 0, result.stderr
    record = json.loads(next((tmp_path / "ws" / "runs").glob("*/run.json")).read_text())
    assert record["settings"]["method_options"] == {
        "num_experts": 2, "expert_selection": "random", "lam": 0.0, "gating_dim": 16,
        "gating_heads": 4, "gating_scaling": 5.0, "gating_lr": 0.02,
    }
    # a pFedMoAP flag on a method without that option is an error, not silently dropped
    assert "num_experts" in one_line_error(cli(*TRAIN, "--method", "promptfl", "--num-experts", "2"))


def test_worker_processes_are_reproducible(cli, tmp_path):
    """With --workers the augmentation comes from seeded worker RNGs: two runs agree exactly."""
    texts = []
    for ws in ("a", "b"):
        assert partition_small(cli, "--iid", workspace=tmp_path / ws).exit_code == 0
        result = cli(*TRAIN[:2], "1", *TRAIN[3:], "--method", "promptfl", "--workers", "1", workspace=tmp_path / ws)
        assert result.exit_code == 0, result.stderr
        texts.append(next((tmp_path / ws / "runs").glob("*/metrics.csv")).read_text())
    assert texts[0] == texts[1]


def test_recipes_are_found_in_a_checkout_and_in_a_regular_install(tmp_path, monkeypatch):
    """A checkout has data_recipes/ beside the package; a wheel install carries a copy inside it."""
    from pfedmoap_cli import recipes

    monkeypatch.delenv("PFEDMOAP_RECIPES", raising=False)
    installed = tmp_path / "site-packages" / "pfedmoap_cli"
    (installed / "data_recipes").mkdir(parents=True)
    monkeypatch.setattr(recipes, "__file__", str(installed / "recipes.py"))
    assert recipes.recipes_dir() == installed / "data_recipes"
    (tmp_path / "site-packages" / "data_recipes").mkdir()  # a checkout: the top-level folder wins
    assert recipes.recipes_dir() == tmp_path / "site-packages" / "data_recipes"
    monkeypatch.setenv("PFEDMOAP_RECIPES", str(tmp_path / "mine"))
    assert recipes.recipes_dir() == tmp_path / "mine"
