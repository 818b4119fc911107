"""The ClientApp: a node's answers to the server's query, train and evaluate messages.

``app`` is the ClientApp a SuperNode loads (``pfedmoap_cli.flower.client_app:app``);
:func:`make_client_app` builds one with defaults for the node settings (the
simulation gives every virtual node the run's workspace and data root).
"""

from __future__ import annotations

import sys

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pfedmoap_cli.flower.node import NodeRuntime, NodeSetup, node_runtime
from pfedmoap_cli.flower.protocol import (
    DOWNLOAD_RECORD,
    NODE_RECORD,
    RESULT_RECORD,
    ROUND_RECORD,
    RUN_RECORD,
    SCORE_RECORD,
    UPLOAD_RECORD,
    Refusal,
    RunInfo,
)
from pfedmoap_cli.flower.records import read_json_config, record_to_state, state_to_record
from pfedmoap_cli.methods.base import State


def _run_info(message: Message) -> RunInfo:
    return RunInfo.from_json(read_json_config(message.content.config_records[RUN_RECORD])["run"])


def _round(message: Message) -> dict:
    return read_json_config(message.content.config_records[ROUND_RECORD])


def _refused(message: Message, client_id: int | None, reason: str) -> Message:
    """A reply that carries the node's refusal; the node says it on its own stderr too."""
    print(f"pfedmoap node (client {client_id}): refused: {reason}", file=sys.stderr, flush=True)
    node = ConfigRecord({"client_id": -1 if client_id is None else client_id, "refused": reason})
    return Message(RecordDict({NODE_RECORD: node}), reply_to=message)


def make_client_app(defaults: NodeSetup | None = None) -> ClientApp:
    """A ClientApp whose nodes read their settings from ``--node-config`` over ``defaults``."""
    app = ClientApp()

    def open_step(message: Message, context: Context) -> tuple[NodeRuntime, dict, State]:
        """The node's runtime, the step's ``round`` record and its download; a Refusal if misaddressed."""
        setup = NodeSetup.from_node_config(context.node_config, defaults)
        node = node_runtime(setup, _run_info(message))
        step = _round(message)
        if int(step["client_id"]) != setup.client_id:
            raise Refusal(f"the server addressed client {step['client_id']} to this node, which holds client {setup.client_id}", setup.client_id)
        return node, step, record_to_state(message.content.array_records[DOWNLOAD_RECORD])

    @app.query()
    def query(message: Message, context: Context) -> Message:
        client_id = None
        try:
            setup = NodeSetup.from_node_config(context.node_config, defaults)
            client_id = setup.client_id
            node_runtime(setup, _run_info(message))
        except Refusal as refusal:
            return _refused(message, client_id, str(refusal))
        return Message(RecordDict({NODE_RECORD: ConfigRecord({"client_id": client_id, "refused": ""})}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        try:
            node, step, download = open_step(message, context)
        except Refusal as refusal:
            return _refused(message, refusal.client_id, str(refusal))
        result = node.train(int(step["round"]), download)
        metrics = MetricRecord({"num_examples": int(result.num_examples), "train_loss": float(result.train_loss)})
        content = RecordDict({UPLOAD_RECORD: state_to_record(result.upload), RESULT_RECORD: metrics})
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        try:
            node, step, download = open_step(message, context)
        except Refusal as refusal:
            return _refused(message, refusal.client_id, str(refusal))
        score = node.evaluate(int(step["round"]), download, bool(step["trained"]))
        values = {"accuracy": float(score.accuracy), "loss": float(score.loss), "num_examples": int(score.num_examples)}
        values.update({f"extra.{name}": float(value) for name, value in score.extra.items()})
        return Message(RecordDict({SCORE_RECORD: MetricRecord(values)}), reply_to=message)

    return app


#: The ClientApp SuperNodes load (``[tool.flwr.app.components] clientapp``).
app = make_client_app()
