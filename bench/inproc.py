"""Run a federation in this process: fedtune's ServerApp ``main`` and ClientApp ``train``
exactly as `fedtune simulate` runs them, with a small Grid that calls the clients one
after the other instead of Flower's Ray simulation.

Why: on a shared 2-core machine a `fedtune simulate` spends about 90 s starting Ray and
loading the base model into every actor, more than a short benchmark run's training;
here the base model loads once per process (``common.model.get_model`` caches it) and
many runs share it. What differs from a simulation: no Ray, no mods (client_dp_mod,
so no client-level DP), clients in sequence. Every run is deterministic under its seeds,
as under `fedtune simulate`.

    from bench.inproc import run_federation
    run_federation({"num-server-rounds": 2, "run-dir": "runs/x"})
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from flwr.app import Context, Message, RecordDict

from common.config import RunConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class InProcessGrid:
    """Just enough of Flower's Grid for ``Strategy.start``: node ids 1..N (partition
    id = node id - 1), and ``send_and_receive`` that runs the ClientApp's ``train``."""

    def __init__(self, cfg: RunConfig, run_config: Mapping[str, Any]):
        self.nodes = list(range(1, cfg.num_clients + 1))
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={
            "partition-id": n - 1, "num-partitions": cfg.num_clients},
            state=RecordDict(), run_config=dict(run_config)) for n in self.nodes}

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None):
        from client.app import evaluate, train

        replies = []
        for message in messages:
            handler = train if message.metadata.message_type.startswith("train") else evaluate
            replies.append(handler(message, self.contexts[message.metadata.dst_node_id]))
        return replies


def run_federation(overrides: Mapping[str, Any], *, grid: type = InProcessGrid) -> RunConfig:
    """One federated run with the defaults plus ``overrides`` (kebab-case keys); its run
    folder is ``overrides['run-dir']``. ``grid``: an InProcessGrid subclass (a bench that
    watches the messages). Returns the resolved config."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.app import main

    cfg = RunConfig.from_mapping(overrides)
    run_config = cfg.to_mapping()
    fresh_adapter(cfg)
    # Messages built outside a running Flower app need the identity Flower sets per run.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    main(grid(cfg, run_config), Context(run_id=1, node_id=0, node_config={},
                                                  state=RecordDict(), run_config=run_config))
    return cfg


_INITIAL: dict[int, dict] = {}


def fresh_adapter(cfg: RunConfig) -> None:
    """Put the cached model's adapter back to its seeded initial state. The ServerApp
    takes its initial arrays from the model (``server/app.py`` ``open_run``), which in a
    new process is fresh; in this process it still holds the previous run's adapter."""
    from common.model import adapter_state, get_model, set_adapter_state

    model = get_model(cfg)
    if id(model) not in _INITIAL:  # first use: get_model just built it from the seed
        _INITIAL[id(model)] = adapter_state(model)
    set_adapter_state(model, _INITIAL[id(model)])
