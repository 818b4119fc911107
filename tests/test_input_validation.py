"""Bad input is refused before anything is created, with one line naming a flag that exists (issue 13).

The first tests go through the INSTALLED ``pfedmoap`` script in a subprocess
(exit code, first stderr line, workspace tree afterwards); the rest are unit
tests of the rules themselves.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_line_error
from pfedmoap_cli.artifacts.partition import (
    check_partition_matches_dataset,
    class_name_problem,
    load_partition,
    sample_index_problem,
    save_partition,
)
from pfedmoap_cli.engine.settings import TrainSettings, settle_context_length, validate_settings
from pfedmoap_cli.engine.workspace import Workspace, check_run_id, run_id_problem
from pfedmoap_cli.errors import ArtifactError, ConfigError

SCRIPT = Path(sys.executable).with_name("pfedmoap")
PACKAGE = Path(__file__).resolve().parents[1] / "pfedmoap_cli"
SMALL = ("--dataset", "synthetic", "--iid", "--clients", "3", "--option", "train_per_class=1", "--option", "test_per_class=1")


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT}")
    env = {k: v for k, v in os.environ.items() if k not in {"PFEDMOAP_DEBUG", "PFEDMOAP_WORKSPACE", "PFEDMOAP_DATA"}}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def _tree(root: Path) -> list[str]:
    """Every path under ``root`` (empty when it does not exist)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {p: ((root / p).read_bytes() if (root / p).is_file() else None) for p in _tree(root)}


# ---- through the installed script: refused, one line, nothing created --------------------------

#: (arguments after "--workspace WS", words of the one error line). The workspace holds one
#: small partition beforehand; none of these may add or change anything in it.
BAD_INVOCATIONS = [
    (["train", "--run-id", "../../escape"], ("--run-id",)),
    (["train", "--run-id", "a/b"], ("--run-id",)),
    (["train", "--run-id", ".hidden"], ("--run-id",)),
    (["train", "--lr", "inf"], ("--lr",)),
    (["train", "--lr", "nan"], ("--lr",)),
    (["train", "--lr", "0"], ("--lr",)),
    (["train", "--frac", "nan"], ("--frac",)),
    (["train", "--device", "tpu"], ("--device",)),
    (["train", "--method", "pfedmoap", "--num-experts", "3"], ("--num-experts", "at most 2")),
    (["train", "--method", "pfedmoap", "--gating-lr", "inf"], ("gating_lr",)),
    (["train", "--n-ctx", "2", "--ctx-init", "a photo of a big"], ("--ctx-init", "--n-ctx", "5 tokens")),
    (["train", "--image-pipeline", "opencv"], ("--image-pipeline", "tensor or pil")),
    (["train", "--eval-every", "0"], ("--eval-every",)),
    (["train", "--keep-rounds", "0"], ("--keep-rounds", "auto, all")),
    (["train", "--keep-rounds", "some"], ("--keep-rounds",)),
    (["train", "--image-cache-mb", "-1"], ("--image-cache-mb",)),
    (["sweep", "--table", "demo", "--device", "tpu"], ("--device",)),
    (["partition", *SMALL[:2], "--dirichlet", "nan"], ("--dirichlet",)),
    (["partition", *SMALL[:2], "--dirichlet", "inf"], ("--dirichlet",)),
    (["partition", *SMALL[:2], "--iid", "--clients", "0"], ("--clients",)),
]


@pytest.fixture(scope="module")
def small_ws(tmp_path_factory) -> Path:
    """A workspace with one 3-client synthetic partition, made once for the module."""
    root = tmp_path_factory.mktemp("validation")
    done = _script("--workspace", str(root / "ws"), "partition", *SMALL, cwd=root)
    assert done.returncode == 0, done.stderr
    return root / "ws"


@pytest.mark.parametrize("args, words", BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(small_ws, tmp_path, args, words):
    before = _snapshot(small_ws)
    done = _script("--workspace", str(small_ws), *args, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    after = _snapshot(small_ws)
    assert after == before, sorted(set(after) ^ set(before))
    assert not (tmp_path / "escape").exists() and not (small_ws.parent / "escape").exists()


def test_sweep_with_a_bad_device_on_an_empty_workspace_creates_no_workspace(tmp_path):
    ws = tmp_path / "ws"
    done = _script("--workspace", str(ws), "sweep", "--table", "demo", "--device", "tpu", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: --device"), done.stderr
    assert _tree(ws) == []


# ---- run ids -------------------------------------------------------------------------------

@pytest.mark.parametrize("run_id", ["run1", "synthetic-pfedmoap-s1-1a2b3c4d", "A.b_c-9", "x" * 128])
def test_plain_run_ids_are_accepted(run_id):
    assert run_id_problem(run_id) is None
    assert Workspace(Path("/ws")).run_dir(run_id) == Path("/ws/runs") / run_id


@pytest.mark.parametrize("run_id", ["../../escape", "a/b", "..", "a..b", ".hidden", "-x", "", "x" * 129, "a b", "a\\b", "/abs"])
def test_other_run_ids_are_refused_naming_the_flag(run_id):
    with pytest.raises(ConfigError, match="--run-id"):
        check_run_id(run_id)
    with pytest.raises(ConfigError, match="--run-id"):  # defence in depth: every run path comes from here
        Workspace(Path("/ws")).run_dir(run_id)


# ---- numbers ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("lr", math.inf, "--lr"), ("lr", math.nan, "--lr"), ("lr", 0.0, "--lr"), ("lr", -1.0, "--lr"),
        ("frac", math.nan, "--frac"), ("frac", 0.0, "--frac"), ("frac", 1.5, "--frac"),
        ("momentum", math.nan, "momentum"), ("momentum", -0.1, "momentum"), ("momentum", 1.0, "momentum"),
        ("weight_decay", math.inf, "weight_decay"), ("weight_decay", -1e-4, "weight_decay"),
        ("backbone_seed", -1, "--backbone-seed"), ("device", "cuda:x", "--device"), ("device", "tpu", "--device"),
    ],
)
def test_out_of_range_settings_are_refused(field, value, flag):
    with pytest.raises(ConfigError, match=re.escape(flag)):
        validate_settings(TrainSettings(**{field: value}))


def test_in_range_settings_pass():
    settings = TrainSettings(lr=1e-3, frac=1.0, momentum=0.0, weight_decay=0.0, device="cuda:1")
    assert validate_settings(settings) is settings


def test_num_experts_must_fit_the_federation():
    from pfedmoap_cli.methods.pfedmoap import check_num_experts

    check_num_experts(2, 3)
    check_num_experts(0, 1)
    with pytest.raises(ConfigError, match=r"--num-experts 3 .*at most 2"):
        check_num_experts(3, 3)


def test_only_an_explicit_num_experts_is_checked():
    """A recipe's default K (9 for Table 1) still runs on a smaller partition; one the user gives does not."""
    from pfedmoap_cli.cli.train_cmd import check_federation_size

    settings = TrainSettings(method="pfedmoap", method_options={"num_experts": 9})
    check_federation_size(settings, set(), 4)
    with pytest.raises(ConfigError, match="--num-experts"):
        check_federation_size(settings, {"num_experts"}, 4)


# ---- --ctx-init and --n-ctx -------------------------------------------------------------------

def test_ctx_init_sets_the_recorded_context_length():
    settings = TrainSettings(backbone="micro-clip", n_ctx=16, ctx_init="a photo of a big")
    assert settle_context_length(settings, n_ctx_given=False).n_ctx == 5


def test_ctx_init_disagreeing_with_a_given_n_ctx_is_refused_naming_both():
    settings = TrainSettings(backbone="micro-clip", n_ctx=2, ctx_init="a photo of a big")
    with pytest.raises(ConfigError, match=r"--ctx-init .*5 tokens.*--n-ctx is 2"):
        settle_context_length(settings, n_ctx_given=True)
    agreeing = TrainSettings(backbone="micro-clip", n_ctx=5, ctx_init="a photo of a big")
    assert settle_context_length(agreeing, n_ctx_given=True) == agreeing


# ---- partitions against their dataset ---------------------------------------------------------

@pytest.fixture
def synthetic_partition(tmp_path):
    from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
    from pfedmoap_cli.data.sources import open_dataset

    options = {"train_per_class": 1, "test_per_class": 1}
    source = open_dataset("synthetic", tmp_path / "data", **options)
    partition = build_partition(source, PartitionSettings(scheme="iid", num_clients=3, seed=1), options)
    return source, partition


def test_a_partition_of_its_own_dataset_fits(synthetic_partition):
    source, partition = synthetic_partition
    check_partition_matches_dataset(partition, source)


def test_swapped_or_renamed_class_names_are_refused(synthetic_partition):
    import dataclasses

    source, partition = synthetic_partition
    names = list(partition.class_names)
    swapped = dataclasses.replace(partition, class_names=tuple([names[1], names[0], *names[2:]]))
    with pytest.raises(ArtifactError, match=r"class 0 is .* where the dataset has"):
        check_partition_matches_dataset(swapped, source)
    renamed = dataclasses.replace(partition, class_names=tuple([*names[:-1], "zebra"]))
    assert "zebra" in class_name_problem(renamed, source.class_names)
    shorter = dataclasses.replace(partition, class_names=tuple(names[:-1]))
    assert class_name_problem(shorter, source.class_names).startswith(f"{len(names) - 1} class names")


def test_a_hand_edited_out_of_range_sample_id_is_a_one_line_error(synthetic_partition, tmp_path):
    source, partition = synthetic_partition
    path, _ = save_partition(partition, tmp_path / "parts")
    data = json.loads(path.read_text())
    size = len(source.samples("test"))
    data["clients"][1]["test"].append(size)
    path.write_text(json.dumps(data))
    edited, _ = load_partition(path)  # structurally fine: a new partition, with its own sha256
    with pytest.raises(ArtifactError, match=rf"client 1 holds test sample {size} but the dataset has {size} test samples"):
        check_partition_matches_dataset(edited, source)
    assert sample_index_problem(partition, {"train": len(source.samples("train")), "test": size}) is None


# ---- messages name flags that exist ------------------------------------------------------------

_ERRORS = {"ConfigError", "ArtifactError", "DataError", "UserError", "FederationError", "BadParameter", "UsageError"}
#: Flags of OTHER programs that messages tell users to pass to them (Flower's SuperNode).
_FOREIGN = {"--node-config"}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")


def _message_strings(tree: ast.AST):
    """(line, text) of each string constant inside an error raised with a user-facing error class."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call):
            continue
        func = node.exc.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name not in _ERRORS:
            continue
        for part in ast.walk(node.exc):
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                yield part.lineno, part.value


def _cli_flags() -> set[str]:
    """Every option of every pfedmoap command (hidden ones too), as click sees them."""
    import typer.main

    from pfedmoap_cli.cli.app import app

    root = typer.main.get_command(app)
    flags: set[str] = set()
    commands = [root, *getattr(root, "commands", {}).values()]
    for command in commands:
        for param in command.params:
            flags.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return flags


def test_error_messages_name_only_flags_that_exist():
    known = _cli_flags() | _FOREIGN
    assert {"--clients", "--run-id", "--num-experts", "--ctx-init", "--run"} <= known  # the collection works
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _message_strings(ast.parse(path.read_text(), str(path))):
            wrong += [f"{path.relative_to(PACKAGE.parent)}:{line}: {flag}" for flag in _FLAG.findall(text) if flag not in known]
    assert not wrong, "error messages name flags no command has:\n" + "\n".join(wrong)


def test_flags_named_in_messages_appear_in_help(tmp_path):
    """The same set through the installed script's --help, for the flags the validation messages name."""
    text = "".join(_script(command, "--help", cwd=tmp_path).stdout for command in ("train", "partition", "sweep"))
    for flag in ("--run-id", "--lr", "--frac", "--n-ctx", "--ctx-init", "--num-experts", "--device", "--dirichlet", "--clients", "--backbone-seed"):
        assert flag in text, flag


def test_train_run_id_in_process(cli, tmp_path):
    """Through main() too (the fixture the rest of the suite uses): the flag is named, nothing is created."""
    message = one_line_error(cli("train", "--run-id", "a/b"))
    assert "--run-id" in message
    assert _tree(tmp_path / "ws") == []
