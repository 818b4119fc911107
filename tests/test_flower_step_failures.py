"""What the Flower server does when a client's step fails (an error reply, no reply).

A deployment records such a client as missing and goes on (tested in
``test_flower_runtime``); a simulation, where every node is this machine's,
sends the step once more and, when it fails again, stops the run before
anything of the round is written, with the node's reason in a one-line
error. A node that did not answer the handshake is asked again later.
Everything runs the real ClientApp over the in-process grid (no Ray).
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from conftest import require_flower

require_flower()

from flower_inprocess import ERROR_REASON  # noqa: E402
from test_flower_runtime import (  # noqa: E402
    OPTIONS,
    HookedRuntime,
    assert_same_run_files,
    messages,
    metric_rows,
    settings_for,
    step_of,
    world,  # noqa: F401  (the module's workspace fixture)
)

from pfedmoap_cli.engine.runner import IfExists, execute_run  # noqa: E402
from pfedmoap_cli.engine.workspace import RunPaths  # noqa: E402
from pfedmoap_cli.errors import FederationError  # noqa: E402
from pfedmoap_cli.flower.server_app import FlowerGridRuntime  # noqa: E402
from pfedmoap_cli.flower.simulation import simulation_options  # noqa: E402

#: The simulation's rules with the in-process grid's instant timeouts.
STRICT = dataclasses.replace(simulation_options(OPTIONS.round_timeout), join_timeout=0.0, query_timeout=OPTIONS.query_timeout)


@pytest.fixture(scope="module")
def local_runs(world):  # noqa: F811
    """The in-process engine's run of each method used here: what every recovered run must equal."""
    done = {}

    def run(method: str):
        if method not in done:
            outcome = execute_run(world.workspace, world.data_root, settings_for(method), world.partition_path, run_id=f"ref-{method}", progress=False)
            done[method] = outcome.paths
        return done[method]

    return run


def test_the_simulation_rules():
    assert (STRICT.retries, STRICT.require_every_client) == (1, True)
    # the handshake of a simulation waits no longer than a step, so a lost reply is asked again soon
    assert simulation_options(60.0).query_timeout == 60.0 and simulation_options(7200.0).query_timeout == 300.0
    assert (OPTIONS.retries, OPTIONS.require_every_client) == (0, False)  # a deployment's defaults


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_step_that_failed_once_is_sent_again_and_the_run_is_the_local_one(world, local_runs, kind, capsys):  # noqa: F811
    grid, node_of = world.grid()
    client = 2  # a participant of both rounds
    grid.errors[(node_of[client], kind)] = 1
    outcome = execute_run(
        world.workspace, world.data_root, settings_for("pfedmoap"), world.partition_path, run_id=f"retry-{kind}", progress=False,
        runtime=FlowerGridRuntime(grid, STRICT),
    )
    assert outcome.finished
    assert_same_run_files(outcome.paths, local_runs("pfedmoap"), rounds=2)
    sent = [step_of(m)["round"] for m in messages(grid, kind) if step_of(m)["client_id"] == client]
    assert sent == [0, 0, 1], sent  # round 0 twice, round 1 once
    assert f"round 0: sending {kind} again to clients [{client}] (attempt 2)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_slow_step_is_waited_for_not_sent_again(world, local_runs, kind, capsys):  # noqa: F811
    """A node slower than the round timeout (a cold start under load) gets no second copy of its step:
    the second attempt waits for the answer to the first, which is the local engine's run."""
    grid, node_of = world.grid()
    client = 2  # a participant of both rounds
    node = node_of[client]
    release_at: list[float] = []
    push, pull = grid.push_messages, grid.pull_messages

    def slow_push(sent):
        sent = list(sent)
        if not release_at and any(m.metadata.dst_node_id == node and m.metadata.message_type == kind for m in sent):
            grid.silent.add(node)  # queued, answered once the node is back: past the first wait, within the second
            release_at.append(time.monotonic() + 1.5 * STRICT.round_timeout)
        return push(sent)

    def slow_pull(ids):
        if release_at and time.monotonic() >= release_at[0]:
            grid.silent.discard(node)
        return pull(ids)

    grid.push_messages, grid.pull_messages = slow_push, slow_pull
    outcome = execute_run(
        world.workspace, world.data_root, settings_for("pfedmoap"), world.partition_path, run_id=f"slow-{kind}", progress=False,
        runtime=FlowerGridRuntime(grid, STRICT),
    )
    assert outcome.finished
    assert_same_run_files(outcome.paths, local_runs("pfedmoap"), rounds=2)
    sent = [step_of(m)["round"] for m in messages(grid, kind) if step_of(m)["client_id"] == client]
    assert sent == [0, 1], sent  # one message per round: the slow one was not sent twice
    err = capsys.readouterr().err
    assert f"round 0: waiting longer for {kind} of clients [{client}] (attempt 2)" in err
    assert "sending" not in err


def test_a_client_that_keeps_failing_stops_the_run_before_its_round_is_written(world, local_runs):  # noqa: F811
    settings = settings_for("pfedmoap")
    grid, node_of = world.grid()

    def fail_round_one(summary):
        if summary.round_index == 0:  # client 3 trains in round 1 only: both of its round-1 train messages fail
            grid.errors[(node_of[3], "train")] = 2

    with pytest.raises(FederationError) as caught:
        execute_run(
            world.workspace, world.data_root, settings, world.partition_path, run_id="keeps-failing", progress=False,
            runtime=HookedRuntime(FlowerGridRuntime(grid, STRICT), fail_round_one),
        )
    message = str(caught.value)
    assert message == (
        f"round 1: train failed for clients [3] (client 3: error: {ERROR_REASON}); "
        "nothing of this round was written: fix the cause and run the same command with --resume"
    )
    assert caught.value.exit_code == 1 and "\n" not in message
    paths = RunPaths(world.workspace.run_dir("keeps-failing"))
    assert {row[4] for row in metric_rows(paths)[1:]} == {"0"}  # round 0's rows only
    assert json.loads(paths.progress_json.read_text())["completed_rounds"] == 1
    assert not paths.global_checkpoint(1).exists()

    # the cause gone, the same command with --resume ends exactly like the in-process run
    resumed = execute_run(
        world.workspace, world.data_root, settings, world.partition_path, run_id="keeps-failing", progress=False,
        if_exists=IfExists.RESUME, runtime=FlowerGridRuntime(world.grid(first_id=301)[0], STRICT),
    )
    assert resumed.finished
    assert_same_run_files(resumed.paths, local_runs("pfedmoap"), rounds=2)


def test_a_simulation_stops_when_a_node_never_answers_the_handshake(world):  # noqa: F811
    """Every virtual node of a simulation exists from the start: one that never answers is a failed runtime."""
    grid, node_of = world.grid()
    grid.silent.add(node_of[1])
    with pytest.raises(FederationError) as raised:
        execute_run(
            world.workspace, world.data_root, settings_for("coop"), world.partition_path, run_id="never-answered", progress=False,
            runtime=FlowerGridRuntime(grid, STRICT),
        )
    message = str(raised.value)
    assert message.startswith("no node answered for clients [1] within 0 s of the start, so nothing was trained") and "\n" not in message
    assert "--resume" in message
    paths = RunPaths(world.workspace.run_dir("never-answered"))
    assert not paths.metrics_csv.exists() or len(metric_rows(paths)) == 1  # the header at most
    assert not paths.global_checkpoint(0).exists()
    assert simulation_options(60.0).join_timeout == 60.0  # one handshake wait, no longer than a step


def test_a_deployment_asks_a_node_again_that_did_not_answer_the_handshake(world):  # noqa: F811
    grid, node_of = world.grid()
    slow = node_of[3]
    grid.silent.add(slow)  # no answer to the first query (a node still loading its model)
    outcome = execute_run(
        world.workspace, world.data_root, settings_for("coop"), world.partition_path, run_id="asked-again", progress=False,
        runtime=HookedRuntime(FlowerGridRuntime(grid, OPTIONS), lambda summary: grid.silent.discard(slow)),
    )
    assert outcome.finished
    queries = [m for m in grid.sent if m.metadata.message_type == "query" and m.metadata.dst_node_id == slow]
    # asked once: the server waits for that question's answer (at round 0's start, then at round 1's,
    # when it comes) instead of queueing more copies behind it for a node that is only slow
    assert len(queries) == 1
    # client 3 trains in round 1 (participants {2, 3}): it does, on the node that answered late
    trained = {step_of(m)["client_id"] for m in messages(grid, "train", 1)}
    assert 3 in trained
    rows = metric_rows(outcome.paths)
    assert not [r for r in rows if r[4] == "1" and r[5] == "3" and r[8] == "missing"]


def test_a_nodes_error_report_becomes_one_line():
    from pfedmoap_cli.flower.server import error_summary

    # the shape of the reason Flower's simulation puts in an error reply when the ClientApp raised
    remote = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=3371)\n"
        '  File "client_app.py", line 92, in evaluate\n    raise RuntimeError("disk full")\nRuntimeError: disk full\n\n'
        "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: disk full'>"
    )
    assert error_summary(remote) == "the ClientApp raised: disk full"
    assert error_summary("Error: Node Unavailable") == "Error: Node Unavailable"
    assert error_summary("") == "an error without a reason"
