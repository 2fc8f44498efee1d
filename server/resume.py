"""Resuming a run: the strategy continues at round N+1 with its server optimizer state.

``Strategy.start`` (Flower) always counts rounds from 1. Rather than fork its loop, a
resumed run calls ``start`` with ``num_rounds`` = the rounds left and the restored
global arrays, and :class:`ResumableMixin` adds ``round_offset`` = N to every round
number the loop hands the strategy. So ``server-round`` in the train config (the
client's LR schedule offset and seeds) and FedAdam's bias correction, which reads
``server_round``, see the same numbers as in an uninterrupted run. ``RoundHook``
(server/app.py) adds the same offset to the round numbers of ``evaluate_fn``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM
from flwr.serverapp.strategy.fedopt import FedOpt

# Where Flower 1.42 keeps server optimizer state (flwr/serverapp/strategy/fedopt.py,
# fedavgm.py). FedOpt's current_arrays is reset from the global arrays in every
# configure_train, so it needs no saving; FedAvgM's is set only once, in round 1.
FEDOPT_STATE = ("m_t", "v_t")


class ResumableMixin:
    """Round offset plus get/set of the server optimizer state. Put it first in the
    bases, before ``GuardMixin``, so that every layer below logs the true round."""

    round_offset: int = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_train(server_round + self.round_offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    def optimizer_state(self) -> dict[str, dict[str, np.ndarray]]:
        """The server optimizer's state by attribute name; empty for plain averaging."""
        state: dict[str, dict[str, np.ndarray]] = {}
        if isinstance(self, FedOpt):
            state.update({name: dict(getattr(self, name)) for name in FEDOPT_STATE
                          if getattr(self, name)})
        if isinstance(self, FedAvgM) and self.current_arrays is not None:
            names = list(self.current_arrays.keys())
            state["current_arrays"] = {k: a.numpy() for k, a in self.current_arrays.items()}
            if self.momentum_vector is not None:  # a list, in the order of current_arrays
                state["momentum_vector"] = dict(zip(names, self.momentum_vector, strict=True))
        if hasattr(self, "lora_residual_state"):  # lora-aggregation exact (server/lora_aggregation.py)
            state.update(self.lora_residual_state())
        return state

    def load_optimizer_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        """The inverse of :meth:`optimizer_state` (group order as saved)."""
        for name in FEDOPT_STATE:
            if name in state:
                setattr(self, name, dict(state[name]))
        if "current_arrays" in state:
            self.current_arrays = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                               for k, v in state["current_arrays"].items()})
        if "momentum_vector" in state:
            self.momentum_vector = list(state["momentum_vector"].values())
        if hasattr(self, "load_lora_residual_state"):
            self.load_lora_residual_state(state)
