"""`fedtune simulate --backend sequential`: the ServerApp and every ClientApp in one
process, the clients one after another, each with every core.

Why a Grid of our own: Flower's simulation engine has one backend, Ray, which runs a
process per concurrent client, each with its own copy of the base model (the demo in
float32: 11 processes, 8.5 GB summed RSS; in this process: 3.4 GB, docs/benchmarks.md). Flower's
``Backend`` interface would fit, but its engine builds a RayBackend unconditionally
(``flwr.server.superlink.fleet.vce.vce_api.start_vce``). So this module gives the
ServerApp a ``Grid`` that hands each message to the ClientApp in this process: the same
``server.app:app`` and ``client.app:app`` objects, mods included, and the model cached
once per process (``common.model.get_model``) serves the server and every client (a
lower LoRA rank under client-lora-ranks is another cached model, as in a Ray actor).

What matches Flower's engine: messages cross serialized by Flower's protobuf serde
(``flwr.common.serde``, the whole message at once where Flower's transports send the
content apart), so server and clients share no objects, as over a network; a
client that raises becomes an error reply (ErrorCode.CLIENT_APP_RAISED_EXCEPTION with
the exception in the reason, as the Ray engine reports it) and the run goes on; each
node keeps its Context (its ``state``) from round to round. What differs: clients run
in sequence, so ``round-timeout`` cannot cut one short, and the order is the messages'
order (node 1, 2, ...); results equal the Ray engine's at the same torch thread count
(tests/test_sequential.py).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.config import RunConfig

RUN_ID = 1
SERVER_NODE_ID = 0


def over_the_wire(message: Message) -> Message:
    """A copy of ``message`` through Flower's protobuf serialization and back: what the
    receiver of a real transport gets (no object shared with the sender)."""
    data = message_to_proto(message).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


class SequentialGrid(Grid):
    """Flower's Grid over ClientApps run in this process, one message at a time.

    Nodes are ``1..num_nodes``; node n is partition n - 1 of ``num_nodes`` (node-config
    ``partition-id`` / ``num-partitions``, as Flower's simulation sets them).
    ``push_messages`` runs each message's ClientApp at once and keeps the reply;
    ``pull_messages`` hands the replies out.
    """

    def __init__(self, client_app, num_nodes: int, run_config: dict, run: Run):
        self.client_app, self._run = client_app, run
        self.contexts = {
            node: Context(run_id=run.run_id, node_id=node,
                          node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                          state=RecordDict(), run_config=dict(run_config))
            for node in range(1, num_nodes + 1)}
        self.replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            if message.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {message.metadata.dst_node_id} in this simulation "
                                 f"(nodes 1..{len(self.contexts)})")
            reply = self._handle(over_the_wire(message))
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self.replies[message.metadata.message_id] = over_the_wire(reply)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        # Every reply exists when push_messages returns: a timeout has nothing to wait for.
        return self.pull_messages(self.push_messages(messages))

    def _handle(self, message: Message) -> Message:
        """The ClientApp's reply; an exception becomes an error reply, as in Flower's
        simulation engine (``vce_api.worker``), and the node's context is kept."""
        context = self.contexts[message.metadata.dst_node_id]
        try:
            return self.client_app(message, context)
        except Exception as err:  # noqa: BLE001 - a client's failure is the server's to handle
            log(logging.ERROR, "ClientApp of node %d raised: %s\n%s", context.node_id, err,
                traceback.format_exc())
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason=f"{type(err)}:<'{err}'>"), reply_to=message)


def run_sequential(cfg: RunConfig, server_app=None, client_app=None, *,
                   client_threads: int | None = None) -> float:
    """Run ``server_app`` (default ``server.app:app``) over ``cfg.num_clients`` nodes of
    ``client_app`` (default ``client.app:app``) in this process. ``cfg`` is the
    server's run-config; the clients' is the same with num-threads ``client_threads``
    (default: cfg's). ``common.runtime.CONFIG_ENV``, where set, still overrides both, as
    in every fedtune process. Returns the wall seconds. Raises what the ServerApp
    raises; a ClientApp's exception is an error reply (see :class:`SequentialGrid`)."""
    from flwr.supercore.task_identity import TaskIdentity

    if server_app is None:
        from server.app import app as server_app
    if client_app is None:
        from client.app import app as client_app
    started = time.perf_counter()
    run = Run.create_empty(run_id=RUN_ID)
    # Messages built outside a Flower runtime need the task identity it sets per run
    # (flwr.simulation.run_simulation sets the same dummy one for its Python API).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SERVER_NODE_ID
    run_config = cfg.to_mapping()
    client_config = cfg.replace(num_threads=client_threads or cfg.num_threads).to_mapping()
    grid = SequentialGrid(client_app, cfg.num_clients, client_config, run)
    server_app(grid, Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={},
                             state=RecordDict(), run_config=run_config))
    return time.perf_counter() - started
