"""Third-party methods found through the ``pfedmoap.methods`` entry points.

The example plug-in package ``tests/plugin_example`` (method ``localavg``) is
installed with pip into a temporary folder, never into the test environment;
a process with that folder on ``PYTHONPATH`` (or ``sys.path``) sees its
entry point. It must then:

1. train through the installed ``pfedmoap`` console script, options included;
2. pass the checks the project applies to every registered method: the
   registry-looped tests of tests/test_method_registry.py and
   tests/test_method_downloads.py, run in a process where it is registered
   (their lists come from ``method_names()``, so it joins them unchanged).

Broken plug-ins (a module that does not import, an object that is not a
method, a built-in's name) are refused with one line naming the entry point
and its package, and every other method keeps working.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods import base

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "tests" / "plugin_example"
CONSOLE_SCRIPT = Path(sys.executable).parent / "pfedmoap"
PARTITION = (
    "partition", "--dataset", "synthetic", "--clients", "4", "--seed", "1", "--pathological", "--shots", "2",
    "--option", "train_per_class=2", "--option", "test_per_class=1",
)
TRAIN = ("train", "--rounds", "2", "--local-epochs", "1", "--n-ctx", "2", "--batch-size", "4", "--frac", "0.5")

BAD_MODULE = '''"""Plug-ins that must be refused."""
from pfedmoap_cli.methods.promptfl import PromptFL


class Clash(PromptFL):
    name = "promptfl"  # a built-in's name


class NotAMethod:
    pass


class Misnamed(PromptFL):
    name = "misnamed-method"  # not its entry point's name
'''
MODULE_PLUGIN = '''"""A module entry point: importing it registers the method."""
from pfedmoap_cli.methods.base import register_method
from pfedmoap_cli.methods.promptfl import PromptFL


@register_method
class ModulePlugin(PromptFL):
    name = "modplugin"
'''
BAD_ENTRY_POINTS = """[pfedmoap.methods]
broken = pfedmoap_no_such_module:Method
promptfl = pfedmoap_badplugins:Clash
notamethod = pfedmoap_badplugins:NotAMethod
multiline = pfedmoap_badimport:Method
misnamed = pfedmoap_badplugins:Misnamed
empty = pfedmoap_badplugins
modplugin = pfedmoap_modplugin
halfway = pfedmoap_halfway
"""


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """``tests/plugin_example`` installed by pip (offline, no build isolation) into a folder of its own."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "src"
    shutil.copytree(EXAMPLE, source)  # the build writes build/ and *.egg-info next to the sources: not into the repo
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
        check=True, capture_output=True, text=True,
    )
    assert (site / "pfedmoap_localavg").is_dir() and list(site.glob("pfedmoap_localavg-*.dist-info/entry_points.txt"))
    return site


@pytest.fixture(scope="session")
def bad_site(tmp_path_factory) -> Path:
    """A distribution ``pfedmoap-badplugins 0.1`` with bad entry points (and one good module one), written as pip would install it."""
    site = tmp_path_factory.mktemp("bad-plugins")
    (site / "pfedmoap_badplugins.py").write_text(BAD_MODULE)
    (site / "pfedmoap_modplugin.py").write_text(MODULE_PLUGIN)
    # registers its method, then fails: nothing of it may stay registered
    (site / "pfedmoap_halfway.py").write_text(MODULE_PLUGIN.replace('"modplugin"', '"halfway"') + 'raise RuntimeError("failed after registering")\n')
    (site / "pfedmoap_badimport.py").write_text('raise RuntimeError("first line\\nsecond line")\n')  # a multi-line reason
    info = site / "pfedmoap_badplugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pfedmoap-badplugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(BAD_ENTRY_POINTS)
    return site


@pytest.fixture
def registry_with(monkeypatch):
    """Make the registry discover plug-ins again with ``paths`` on sys.path; everything is restored afterwards."""
    base.method_names()  # the built-ins are registered in the copy below
    builtins = dict(base._REGISTRY)
    imported = set(sys.modules)

    def use(*paths: Path) -> None:
        for path in paths:
            monkeypatch.syspath_prepend(str(path))
        importlib.invalidate_caches()
        monkeypatch.setattr(base, "_REGISTRY", dict(builtins))
        monkeypatch.setattr(base, "_BUILTIN", set())
        monkeypatch.setattr(base, "_PLUGIN_PROBLEMS", {})
        monkeypatch.setattr(base, "_plugins_loaded", False)

    yield use
    for name in set(sys.modules) - imported:
        if name.startswith(("pfedmoap_localavg", "pfedmoap_bad", "pfedmoap_modplugin", "pfedmoap_halfway")):
            del sys.modules[name]


def subprocess_env(*paths: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PFEDMOAP_DEBUG", "PFEDMOAP_WORKSPACE", "PYTHONPATH"}}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def pfedmoap(workspace: Path, *args: str, paths: tuple[Path, ...]) -> subprocess.CompletedProcess:
    """The installed console script, in a fresh process that sees the plug-ins under ``paths``."""
    command = [str(CONSOLE_SCRIPT), "--quiet", "--workspace", str(workspace), *args]
    return subprocess.run(command, cwd=workspace.parent, env=subprocess_env(*paths), capture_output=True, text=True, timeout=600)


# ---- the registry ----------------------------------------------------------------------------------


def test_the_installed_plugin_is_registered_with_its_options(registry_with, plugin_site):
    builtins = set(base.method_names())
    registry_with(plugin_site)
    names = base.method_names()
    assert set(names) == builtins | {"localavg"}
    method = base.get_method("localavg")
    assert method.name == "localavg" and issubclass(method, base.FederatedMethod)
    assert method.__module__ == "pfedmoap_localavg"
    from pfedmoap_cli.engine.session import method_options

    assert method_options(method, {"mix": 0.25}).mix == 0.25
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['bogus'\]; its options are \['mix'\]"):
        method_options(method, {"bogus": 1})
    assert base.plugin_problems() == {}


def test_broken_plugins_are_refused_in_one_line_and_the_others_still_work(registry_with, plugin_site, bad_site):
    from pfedmoap_cli.methods.promptfl import PromptFL

    registry_with(plugin_site, bad_site)
    names = base.method_names()
    assert "localavg" in names and "promptfl" in names
    assert "broken" not in names and "notamethod" not in names
    assert base.get_method("promptfl") is PromptFL  # a plug-in cannot replace a built-in
    problems = base.plugin_problems()
    assert sorted(problems) == ["broken", "empty", "halfway", "misnamed", "multiline", "notamethod", "promptfl"]
    for name, message in problems.items():
        assert "\n" not in message
        assert f"entry point '{name} = " in message and "of package pfedmoap-badplugins 0.1" in message
    assert "built-in method's name" in problems["promptfl"]
    assert "not a FederatedMethod subclass" in problems["notamethod"]
    assert "the method's name is 'misnamed-method'; the entry point must have the same name" in problems["misnamed"]
    assert "module pfedmoap_badplugins registered no method named 'empty'" in problems["empty"]
    assert base.get_method("modplugin").__module__ == "pfedmoap_modplugin"  # a module entry point that registers its method
    assert "misnamed-method" not in names and "halfway" not in names
    assert problems["multiline"].endswith("was refused: RuntimeError: first line second line")
    with pytest.raises(ConfigError, match=r"^method plug-in entry point 'broken = pfedmoap_no_such_module:Method' .*package pfedmoap-badplugins 0\.1 was refused: ModuleNotFoundError"):
        base.get_method("broken")
    with pytest.raises(ConfigError, match=r"^unknown method 'nope'"):
        base.get_method("nope")


def test_the_registry_reads_the_entry_points_once(registry_with, plugin_site, monkeypatch):
    import importlib.metadata

    calls = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    registry_with(plugin_site)
    for _ in range(3):
        base.method_names()
        base.get_method("localavg")
    assert calls == [{"group": "pfedmoap.methods"}]


# ---- through the console script --------------------------------------------------------------------


def test_the_console_script_trains_a_plugin_and_refuses_a_broken_one(tmp_path, plugin_site, bad_site):
    ws = tmp_path / "ws"
    paths = (plugin_site, bad_site)  # the broken plug-ins are installed too: they must not get in the way
    assert pfedmoap(ws, *PARTITION, paths=paths).returncode == 0

    trained = pfedmoap(ws, *TRAIN, "--method", "localavg", "--method-option", "mix=0.3", paths=paths)
    assert trained.returncode == 0, trained.stderr
    assert "2/2 rounds complete" in trained.stdout
    (run_dir,) = (ws / "runs").glob("synthetic-localavg-s1-*")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    test_acc = metrics[(metrics.split == "test") & (metrics.metric == "accuracy")]
    assert sorted(test_acc["round"].unique()) == [0, 1] and sorted(test_acc.client_id.unique()) == [0, 1, 2, 3]
    assert len(metrics[(metrics.split == "train") & (metrics.metric == "loss")]) == 4  # 2 participants x 2 rounds
    import json

    assert json.loads((run_dir / "run.json").read_text())["settings"]["method_options"] == {"mix": 0.3}

    refused = pfedmoap(ws, *TRAIN, "--method", "localavg", "--method-option", "mix=2", "--run-id", "bad-mix", paths=paths)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == ["error: localavg: --method-option mix must be in [0, 1], got 2"]

    broken = pfedmoap(ws, *TRAIN, "--method", "broken", paths=paths)
    assert broken.returncode == 2, broken.stderr
    (line,) = broken.stderr.strip().splitlines()
    assert re.fullmatch(
        r"error: method plug-in entry point 'broken = pfedmoap_no_such_module:Method' \(group pfedmoap\.methods\) of package "
        r"pfedmoap-badplugins 0\.1 was refused: ModuleNotFoundError: No module named 'pfedmoap_no_such_module'",
        line,
    ), line
    assert not list((ws / "runs").glob("*-broken-*"))

    builtin = pfedmoap(ws, *TRAIN, "--method", "promptfl", "--rounds", "1", paths=paths)
    assert builtin.returncode == 0 and "1/1 rounds complete" in builtin.stdout, builtin.stderr


# ---- the checks every registered method must pass --------------------------------------------------


def test_the_plugin_passes_the_registry_looped_method_checks(plugin_site):
    """tests/test_method_registry.py and tests/test_method_downloads.py, with localavg registered and selected."""
    command = [
        sys.executable, "-m", "pytest", "tests/test_method_registry.py", "tests/test_method_downloads.py",
        "-k", "localavg or registry_holds", "-v", "-p", "no:cacheprovider", "-n", "0",
    ]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(plugin_site), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    ran = set(re.findall(r"::(\w+)\[localavg\] PASSED", done.stdout))
    # the trains-and-resumes check and the 4 download and scoring checks of a method that trains and does not personalise
    assert ran == {
        "test_method_trains_two_rounds_and_resumes_exactly",
        "test_client_downloads_carry_no_other_clients_data",
        "test_evaluation_downloads_carry_no_other_clients_data_and_need_no_client_state",
        "test_training_on_the_download_alone_reproduces_the_engine",
        "test_node_evaluator_scores_like_the_federation_evaluator",
    }, done.stdout[-3000:]
    assert "test_registry_holds_the_table_1_methods PASSED" in done.stdout  # which reads every registered method's docstring
