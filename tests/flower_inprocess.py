"""An in-process stand-in for a Flower grid: the real ClientApp, no network, no Ray.

``InProcessGrid`` delivers each message to the project's real ClientApp (the
object a SuperNode would load) as a node with its own ``node_config``, and
returns the replies, exactly what :class:`pfedmoap_cli.flower.server.FlowerServer`
reads from a Flower grid. Nodes can fail in the ways a deployment's nodes do:

* ``down``: gone (SIGKILLed and past the SuperLink's heartbeat): not listed by
  ``get_node_ids`` and no reply to anything sent to it;
* ``silent``: still listed (a SIGKILLed node the SuperLink has not noticed yet,
  or a hung one) but does not answer: the server's timeout passes; what was
  sent to it waits in its queue and is answered, in order, once it is taken
  out of ``silent`` (a node that was only slow);
* ``late``: gets the message and does the work (its ClientApp runs, its files
  are written) but the reply arrives after the server stopped waiting; an
  entry is a node id (every message) or ``(node id, message type)``;
* ``errors``: ``(node id, message type) -> n``: the next n such messages get an
  error reply without reaching the ClientApp (what a simulation returns when a
  worker process died), with reason ``ERROR_REASON``.

A node is brought back under a new node id (like a restarted SuperNode) with
:meth:`add_node`; it starts with nothing in memory. Each node keeps what its
ClientApp opened between messages (as a simulation worker's process does), in
its own cache: nodes never share what one process holds open. ``sent`` keeps
every message the server sent, ``received`` every (message, reply) pair it got
back. Fast enough to loop over every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pfedmoap_cli.flower import node as node_module

#: The reason of the error replies ``errors`` makes.
ERROR_REASON = "the worker process running this node died"


@dataclass
class InProcessGrid:
    """Nodes (node id -> node_config) answered by ``client_app`` in this process."""

    client_app: object
    nodes: dict[int, dict] = field(default_factory=dict)
    down: set[int] = field(default_factory=set)
    silent: set[int] = field(default_factory=set)
    late: set = field(default_factory=set)
    errors: dict = field(default_factory=dict)
    sent: list[Message] = field(default_factory=list)
    received: list[tuple[Message, Message]] = field(default_factory=list)
    next_id: int = 101
    _open: dict[int, dict] = field(default_factory=dict)  # node id -> what its process keeps open
    _queued: list[Message] = field(default_factory=list)  # sent, not yet delivered (silent nodes)
    _replies: dict[str, Message] = field(default_factory=dict)  # message id -> its reply, not yet pulled

    def __post_init__(self) -> None:
        # Messages are stamped with the identity of the task creating them; a
        # ServerApp process gets it from the SuperLink (as the simulation sets it).
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def add_node(self, node_config: dict) -> int:
        node_id = self.next_id
        self.next_id += 1
        self.nodes[node_id] = dict(node_config)
        return node_id

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.down]

    def push_messages(self, messages):
        """Queue each message for its node (delivered at once unless the node is silent); their message ids."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(message)
            ids.append(message.metadata.message_id)
            self._queued.append(message)
        self._deliver_queued()
        return ids

    def pull_messages(self, message_ids):
        """The replies that have arrived for ``message_ids`` (each one returned once)."""
        self._deliver_queued()
        wanted = set(message_ids)
        replies = [reply for mid, reply in self._replies.items() if mid in wanted]
        for reply in replies:
            del self._replies[reply.metadata.reply_to_message_id]
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def _deliver_queued(self) -> None:
        """Messages reach their node in the order sent, once it is neither silent nor down."""
        waiting = []
        for message in self._queued:
            node = message.metadata.dst_node_id
            if node in self.down or node not in self.nodes:
                continue  # a dead node: the message is lost, no reply (the server's timeout passes)
            if node in self.silent:
                waiting.append(message)  # a hung node: it answers when it is back
                continue
            kind = (node, message.metadata.message_type)
            if self.errors.get(kind, 0) > 0:
                self.errors[kind] -= 1
                reply = Message(Error(code=0, reason=ERROR_REASON), reply_to=message)
            else:
                context = Context(run_id=1, node_id=node, node_config=self.nodes[node], state=RecordDict(), run_config={})
                reply = self._deliver(node, message, context)
                if node in self.late or kind in self.late:
                    continue  # the work was done, the reply came too late
            self.received.append((message, reply))
            self._replies[message.metadata.message_id] = reply
        self._queued = waiting

    def _deliver(self, node: int, message: Message, context: Context) -> Message:
        """Run the ClientApp as node ``node``'s process: with its own open runs, never another node's."""
        outside = dict(node_module._RUNTIMES)
        node_module._RUNTIMES.clear()
        node_module._RUNTIMES.update(self._open.get(node, {}))
        try:
            return self.client_app(message, context)
        finally:
            self._open[node] = dict(node_module._RUNTIMES)
            node_module._RUNTIMES.clear()
            node_module._RUNTIMES.update(outside)
