"""Server side of ``lora-aggregation`` (math in ``common/lora_aggregation.py``).

:class:`LoraAggregationMixin` sits below the update guard and the transport cast in every
strategy's bases, so it sees the screened float32 replies. Each round it measures how far
naive averaging is from the mean of the clients' updates (``aggregation_stats``, history
columns ``agg-error-mean``/``-max``), and in the ``exact`` and ``svd`` modes replaces the
strategy's per-tensor mean of the LoRA factors:

- ``svd``: the global B, A are the best rank-r factors of the weighted mean of B_i A_i.
  Nothing but the rank-r adapter travels: the bytes of naive averaging.
- ``exact`` (FedEx-LoRA): the global B, A are the naive means, and the cumulative residual
  sum over rounds of (mean(B_i A_i) - B̄ Ā), kept as low-rank factors P, Q per layer
  (``residual``), goes to every client in each train message (record ``lora-residual``,
  counted in bytes-sent) and is added to the frozen base weights by a forward hook. Its
  rank grows by at most (n - 1) r per round (n clients) until it reaches min(d, k); its
  full-size form never exists except in ``fedtune export``. It is part of the server
  state (``--resume``) and saved beside each round's adapter (``fedtune evaluate``/``export``).
- ``alternating`` (RoLoRA): the train config names the factor the clients train this
  round (``lora-train-factor``: B in odd rounds, A in even ones); the global trained
  factor is the weighted mean of the replies' and the frozen one stays the one sent, so
  the new global product is exactly mean(B_i A_i). Nothing but the adapter travels, and
  the factor follows from the round number: no state to resume.

Heterogeneous ranks travel at each client's own rank: a client replies with its rank-r
factors, :meth:`LoraAggregationMixin.full_rank_reply` pads them to the global rank R
before the update guard sees them and remembers the node's rank, and from then on
:meth:`LoraAggregationMixin.arrays_for_node` sends that node the global factors
truncated to r (a node not seen yet gets rank R and truncates them itself).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from common.config import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from common.lora_aggregation import (
    A_SUFFIX, B_SUFFIX, LORA_RESIDUAL_KEY, TRAIN_FACTOR_KEY, aggregate_lora, lora_rank,
    pad_to_rank, trained_factor, truncate_to_rank,
)
from common.transport import decode_state, encode_state

RESIDUAL_GROUP = "lora-residual"  # the server state group (server/checkpoints.py) it is saved in


class LoraAggregationMixin:
    """Measures the aggregation error and applies ``lora-aggregation``. Bases order:
    ``class X(ResumableMixin, GuardMixin, LoraAggregationMixin, FlowerStrategy)``."""

    def __init__(self, *, lora_aggregation: str = "naive", **kwargs):
        super().__init__(**kwargs)
        self.lora_aggregation = lora_aggregation
        self.residual: dict[str, torch.Tensor] = {}  # exact: cumulative residual factors
        self.aggregation_stats: dict[str, float] = {}  # this round's, for the history
        self.node_ranks: dict[int, int] = {}  # heterogeneous ranks: node id -> its rank < R
        self._by_rank: dict[int, ArrayRecord] = {}  # this round's truncated adapters

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.aggregation_stats = {}  # a round that does not aggregate has none
        self._by_rank = {}
        if self.lora_aggregation == "alternating":
            config[TRAIN_FACTOR_KEY] = trained_factor(server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.residual:  # one record shared by all messages, as Flower shares the arrays
            record = ArrayRecord({k: Array(v.numpy()) for k, v in self.residual.items()})
            for message in messages:
                message.content[LORA_RESIDUAL_KEY] = record
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        # In partition order (else node order): a float sum (Flower's FedAvg) or the QR
        # of the stacked factors then does not depend on which reply came first, nor on
        # the node ids a restarted simulation draws anew, and a resumed run stays bit-exact.
        replies = sorted(replies, key=_client_order)
        arrays, metrics = super().aggregate_train(server_round, replies)
        valid = [r for r in replies if not r.has_error()]
        if arrays is None or not valid:
            return arrays, metrics
        key = getattr(self, "weighted_by_key", NUM_EXAMPLES_KEY)
        weights = [float(r.content[METRICS_KEY].get(key, 1)) for r in valid]
        states = [r.content[ARRAYS_KEY].to_torch_state_dict() for r in valid]
        sent = None
        if self.lora_aggregation == "alternating":  # the float32 global this round started from
            sent = self.global_arrays.to_torch_state_dict()
        lora, residual, self.aggregation_stats = aggregate_lora(
            states, weights, mode=self.lora_aggregation, residual=self.residual,
            sent=sent, factor=trained_factor(server_round), align=True)
        if self.lora_aggregation == "naive":
            return arrays, metrics
        if self.lora_aggregation == "exact":
            self.residual = residual
        out = {k: (Array(lora[k].numpy()) if k in lora else arrays[k]) for k in arrays}
        return ArrayRecord(out), metrics

    # --- heterogeneous ranks on the wire (TrafficMixin and GuardMixin call these) --------
    def arrays_for_node(self, node_id: int) -> ArrayRecord | None:
        """The adapter for ``node_id`` when it trains a rank below the global one: the
        float32 global factors truncated to its rank (``truncate_to_rank``), in the
        transport dtype; None: the record shared by all nodes."""
        rank = self.node_ranks.get(node_id)
        if rank is None:
            return None
        if rank not in self._by_rank:
            state = truncate_to_rank(self.global_arrays.to_torch_state_dict(), rank=rank,
                                     global_rank=lora_rank(self.global_arrays))
            wire = encode_state(state, self.transport_dtype)
            self._by_rank[rank] = ArrayRecord({k: Array(v) for k, v in wire.items()})
        return self._by_rank[rank]

    def full_rank_reply(self, reply: Message) -> Message:
        """A reply at a rank r below the global R, padded to R (``pad_to_rank`` against
        the float32 global this round started from), in the transport dtype; the node's
        rank is remembered for :meth:`arrays_for_node`. Other replies pass unchanged."""
        if reply.has_error() or ARRAYS_KEY not in reply.content.array_records:
            return reply
        arrays = reply.content[ARRAYS_KEY]
        rank, global_rank = lora_rank(arrays), lora_rank(self.global_arrays)
        node = reply.metadata.src_node_id
        if not 0 < rank < global_rank:
            self.node_ranks.pop(node, None)
            return reply  # full rank, or not a LoRA adapter: the guard judges it
        declared = reply.content.metric_records.get(METRICS_KEY, {}).get("lora-r")
        expected = {k: _truncated_shape(k, tuple(a.shape), rank)
                    for k, a in self.global_arrays.items()}
        if declared != rank or {k: tuple(a.shape) for k, a in arrays.items()} != expected:
            return reply  # not the rank-r adapter it says it is: the guard rejects it
        state = decode_state({k: a.numpy() for k, a in arrays.items()}, self.transport_dtype)
        padded = pad_to_rank(state, self.global_arrays.to_torch_state_dict(), rank=rank,
                             global_rank=global_rank)
        wire = encode_state(padded, self.transport_dtype)
        reply.content[ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in wire.items()})
        self.node_ranks[node] = rank
        return reply

    # --- server state (server/resume.py calls these) ------------------------------------
    def lora_residual_state(self) -> dict[str, dict[str, np.ndarray]]:
        return {RESIDUAL_GROUP: {k: v.numpy() for k, v in self.residual.items()}} \
            if self.residual else {}

    def load_lora_residual_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        self.residual = {k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in state.get(RESIDUAL_GROUP, {}).items()}


def _truncated_shape(key: str, shape: tuple, rank: int) -> tuple:
    """The shape of global tensor ``key`` in a rank-``rank`` adapter."""
    if key.endswith(A_SUFFIX):
        return (rank, *shape[1:])
    if key.endswith(B_SUFFIX):
        return (*shape[:-1], rank)
    return shape


def _client_order(reply: Message) -> tuple[float, int]:
    metrics = {} if reply.has_error() else reply.content.metric_records.get(METRICS_KEY, {})
    return float(metrics.get("partition-id", -1)), reply.metadata.src_node_id
