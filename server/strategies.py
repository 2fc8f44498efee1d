"""Config name -> Flower strategy, plus what fedtune adds to every strategy:
the transport precision of the adapter in train messages, the bytes each round
really moved, the per-client train metrics, and the screening of replies before
aggregation (``GuardMixin``, checks in ``server/validation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import WARNING
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.serverapp.strategy import (
    Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg,
    FedYogi, Krum, MultiKrum,
)

from common.config import (
    ARRAYS_KEY, DP_EPSILON_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, TRANSPORT_DTYPE_KEY,
    UNIT_WEIGHT_KEY, RunConfig,
)
from common.dp import DP_REFUSAL_CODE
from common.transport import decode_state, encode_state
from server.lora_aggregation import LoraAggregationMixin
from server.resume import ResumableMixin
from server.validation import REASONS, UpdateGuard, screen_replies


@dataclass
class RoundTraffic:
    """What one round sent and received, measured on the Message objects."""

    bytes_sent: int = 0
    bytes_received: int = 0
    replies: int = 0
    failures: int = 0
    clients: list[dict] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    aggregated: bool = True  # False: too few valid replies, the global adapter is kept
    dp_refused: int = 0  # clients that refused to train: their DP budget was spent
    node_bytes: dict[int, dict[str, int]] = field(default_factory=dict)  # per node, both ways


def message_bytes(msg: Message) -> int:
    """Bytes Flower transfers for one message: the deflated objects of its tree.

    Flower 1.42 sends a message as content-addressed objects (message, records,
    arrays, array chunks of up to 5 MB), each pushed once per message: this sums
    their serialized sizes, headers and metadata included, with identical chunks
    (e.g. LoRA B matrices still at zero) counted once, as Flower sends them.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def to_transport(arrays: ArrayRecord, dtype: str) -> ArrayRecord:
    wire = encode_state(arrays.to_torch_state_dict(), dtype)
    return ArrayRecord({name: Array(array) for name, array in wire.items()})


def from_transport(arrays: ArrayRecord, dtype: str) -> ArrayRecord:
    """Back to float32, which the server aggregates in."""
    return ArrayRecord(decode_state({k: a.numpy() for k, a in arrays.items()}, dtype))


class TrafficMixin:
    """Casts the adapter in train messages to the transport dtype and back, and
    records :class:`RoundTraffic` for the round in progress (``self.traffic``)."""

    traffic: RoundTraffic
    sent_arrays: ArrayRecord  # the adapter as the clients received it this round
    global_arrays: ArrayRecord  # the global adapter this round started from (float32)

    def __init__(self, *, transport_dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self.transport_dtype = transport_dtype

    # Set by the round hook when it replaced the aggregate (lr-plateau-reject undid the
    # round, or server-lr-search moved along it: server/control.py); the next round
    # starts from these arrays, not from Flower's latest aggregate.
    next_arrays: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.next_arrays is not None:
            arrays, self.next_arrays = self.next_arrays, None
        config[TRANSPORT_DTYPE_KEY] = self.transport_dtype  # the client replies in it
        # Flower's strategy keeps `arrays` (FedOpt's current_arrays) in float32; only
        # the messages carry the cast copy, one for all (they share their content).
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.global_arrays = arrays
        self.sent_arrays = (arrays if self.transport_dtype == "float32"
                            else to_transport(arrays, self.transport_dtype))
        for message in messages:
            message.content[ARRAYS_KEY] = self.sent_arrays
        for message in messages:
            # heterogeneous ranks: a node that reported a lower rank gets its own adapter,
            # in its own content (Flower's messages share one RecordDict)
            own = self.arrays_for_node(message.metadata.dst_node_id)
            if own is not None:
                message.content = RecordDict({**dict(message.content.items()), ARRAYS_KEY: own})
        sent = {m.metadata.dst_node_id: message_bytes(m) for m in messages}
        self.traffic = RoundTraffic(bytes_sent=sum(sent.values()),
                                    node_bytes={n: {"bytes-sent": b} for n, b in sent.items()})
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.count_replies(server_round, replies)
        if self.transport_dtype != "float32":  # float32 replies are aggregated as they are
            for reply in replies:
                if not reply.has_error():
                    reply.content[ARRAYS_KEY] = from_transport(reply.content[ARRAYS_KEY],
                                                               self.transport_dtype)
        return super().aggregate_train(server_round, replies)

    def receive(self, replies: list[Message]) -> None:
        """Counts the bytes of the replies as they arrived, before any screening."""
        for reply in replies:
            if not reply.has_error():
                size = message_bytes(reply)
                self.traffic.bytes_received += size
                node = self.traffic.node_bytes.setdefault(reply.metadata.src_node_id, {})
                node["bytes-received"] = size

    def count_replies(self, server_round: int, replies: list[Message]) -> None:
        for reply in replies:
            if reply.has_error():
                self.traffic.failures += 1
                if reply.error.code == DP_REFUSAL_CODE:
                    self.traffic.dp_refused += 1
                    log(WARNING, "round %d: node %d refused to train: %s", server_round,
                        reply.metadata.src_node_id, reply.error.reason)
                continue
            self.traffic.replies += 1
            metrics = reply.content.metric_records.get(METRICS_KEY, {})
            self.traffic.clients.append({
                "round": server_round, "node-id": reply.metadata.src_node_id,
                **{k: v for k, v in metrics.items()},
                **self.traffic.node_bytes.get(reply.metadata.src_node_id, {}),
            })


# --- update validation (issue 6) ---------------------------------------------------
class GuardMixin(TrafficMixin):
    """Screens train replies before the strategy aggregates them.

    Rejected replies are logged and counted in ``traffic.rejected``, and never reach
    the aggregator. With fewer than ``min_train_nodes`` valid replies the strategy
    does not aggregate: ``Strategy.start`` then keeps the previous global arrays.
    Bases of any strategy: ``class X(ResumableMixin, GuardMixin, LoraAggregationMixin,
    FlowerStrategy)`` (server/lora_aggregation.py: the aggregation error, exact modes).
    """

    def __init__(self, *, guard: UpdateGuard | None = None, **kwargs):
        super().__init__(**kwargs)
        self.guard = guard or UpdateGuard()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.receive(replies)  # rejected replies were received too
        # heterogeneous ranks: a rank-r reply is padded to the global shapes first
        replies = [self.full_rank_reply(r) for r in replies]
        errors = [r for r in replies if r.has_error()]
        screened = [r for r in replies if not r.has_error()]
        # Replies are checked against what was sent, in the transport dtype.
        accepted, rejected = screen_replies(screened, self.sent_arrays, self.guard,
                                            transport_dtype=self.transport_dtype)
        for rejection in rejected:
            self.traffic.rejected[rejection.reason] += 1
            log(WARNING, "round %d: rejected the reply of node %d (%s): %s", server_round,
                rejection.node_id, rejection.reason, rejection.detail)
        if len(accepted) < self.min_train_nodes:
            self.count_replies(server_round, accepted + errors)
            self.traffic.aggregated = False
            log(WARNING, "round %d: %d valid replies (%d failed, %d rejected), fewer than "
                "'min-train-clients' %d: the global adapter stays as it was", server_round,
                len(accepted), len(errors), len(rejected), self.min_train_nodes)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted + errors)
        return keep_dtypes(arrays, self.global_arrays), metrics


def keep_dtypes(arrays: ArrayRecord | None, reference: ArrayRecord) -> ArrayRecord | None:
    """Cast the aggregate back to the dtypes of the global adapter it updates.

    Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad) computes in numpy float64 and
    returns float64 arrays: sent on, they would double the bytes and every client's
    float32 reply would then fail the dtype check.
    """
    if arrays is None or all(arrays[k].dtype == reference[k].dtype for k in arrays):
        return arrays
    return ArrayRecord({k: Array(arrays[k].numpy().astype(np.dtype(reference[k].dtype)))
                        for k in arrays})


class FedMedianLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, FedMedian):
    """Coordinate-wise median of the adapters (ignores example counts)."""


class FedTrimmedAvgLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, FedTrimmedAvg):
    """Coordinate-wise mean after cutting a 'trim-beta' fraction from each tail."""


class KrumLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, Krum):
    """The one adapter closest to its n - f - 2 nearest neighbours."""


class MultiKrumLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, MultiKrum):
    """Example-weighted mean of the 'num-clients-to-select' best Krum scores."""


class BulyanLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, Bulyan):
    """MultiKrum selection, then a trimmed mean around the coordinate-wise median."""


def build_robust_strategy(cfg: RunConfig, common: dict):
    """The Byzantine-robust aggregators; None for any other 'strategy'."""
    f = cfg.num_malicious_clients
    if cfg.strategy == "fedmedian":
        return FedMedianLoRA(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvgLoRA(beta=cfg.trim_beta, **common)
    if cfg.strategy == "krum":
        return KrumLoRA(num_malicious_nodes=f, **common)
    if cfg.strategy == "multikrum":
        return MultiKrumLoRA(num_malicious_nodes=f,
                             num_nodes_to_select=cfg.num_clients_to_select, **common)
    if cfg.strategy == "bulyan":
        return BulyanLoRA(num_malicious_nodes=f, **common)
    return None
# --- end update validation ------------------------------------------------------------


class FedAvgLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, FedAvg):
    """FedAvg over the adapter tensors, weighted by each client's example count."""


class FedProxLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, FedProx):
    """FedProx: sends ``proximal-mu``; the client adds the proximal term (objectives)."""


class FedAdamLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, FedAdam):
    """Server-side Adam over the adapter tensors (Reddi et al., 2021)."""


class FedYogiLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, FedYogi):
    """Server-side Yogi over the adapter tensors."""


class FedAdagradLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, FedAdagrad):
    """Server-side Adagrad over the adapter tensors."""


class FedAvgMLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, FedAvgM):
    """FedAvg with server momentum."""


class ReptileLoRA(ResumableMixin, GuardMixin, LoraAggregationMixin, FedAvgM):
    """Reptile's server step, w <- w + epsilon * (avg - w): FedAvgM without momentum
    at server learning rate epsilon (epsilon = 1 is FedAvg)."""


# How each train-reply metric combines across clients. Flower's default averages every
# key, which turns ids and flags into meaningless numbers (a mean 'partition-id' 1.55).
_TRAIN_METRIC_RULES = {"train-loss": "mean", "train-tokens": "sum", "train-seconds": "max",
                       DP_EPSILON_KEY: "max"}


def train_metrics(records: list, weight_key: str) -> MetricRecord:
    """The round's train metrics for Flower's log and ``Result``: the example-weighted
    mean train loss, total tokens and examples, the slowest client's seconds and the
    largest DP epsilon; per-client values stay in ``clients.jsonl``.
    Signature of Flower's ``train_metrics_aggr_fn`` (list[RecordDict], weighting key)."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(row.get(weight_key, 1.0)) for row in rows]
    out = MetricRecord({NUM_EXAMPLES_KEY: int(sum(row.get(NUM_EXAMPLES_KEY, 0) for row in rows))})
    for key, rule in _TRAIN_METRIC_RULES.items():
        values = [(float(row[key]), w) for row, w in zip(rows, weights) if key in row]
        if not values:
            continue
        if rule == "mean":
            out[key] = sum(v * w for v, w in values) / (sum(w for _, w in values) or 1.0)
        elif rule == "sum":
            out[key] = sum(v for v, _ in values)
        else:
            out[key] = max(v for v, _ in values)
    return out


def build_strategy(cfg: RunConfig):
    """The strategy 'strategy' names, inside a Flower DP wrapper if 'client-dp' asks."""
    from server.privacy import wrap_client_dp

    return wrap_client_dp(_build_strategy(cfg), cfg)


def _build_strategy(cfg: RunConfig):
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,  # the server evaluates the global adapter itself
        min_train_nodes=cfg.min_train_clients,
        min_available_nodes=cfg.min_train_clients,
        # client-level DP calibrates its noise to an unweighted mean (server/privacy.py)
        weighted_by_key=UNIT_WEIGHT_KEY if cfg.client_dp != "off" else NUM_EXAMPLES_KEY,
        train_metrics_aggr_fn=train_metrics,
        guard=UpdateGuard.from_config(cfg),
        transport_dtype=cfg.transport_dtype,
        lora_aggregation=cfg.lora_aggregation,
    )
    robust = build_robust_strategy(cfg, common)
    if robust is not None:
        return robust
    adaptive = dict(eta=cfg.server_eta, tau=cfg.server_tau)
    moments = dict(beta_1=cfg.server_beta1, beta_2=cfg.server_beta2)
    if cfg.strategy == "fedprox":
        return FedProxLoRA(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedadam":
        return FedAdamLoRA(**common, **adaptive, **moments)
    if cfg.strategy == "fedyogi":
        return FedYogiLoRA(**common, **adaptive, **moments)
    if cfg.strategy == "fedadagrad":
        return FedAdagradLoRA(**common, **adaptive)
    if cfg.strategy == "fedavgm":
        return FedAvgMLoRA(server_learning_rate=cfg.server_lr,
                           server_momentum=cfg.server_momentum, **common)
    if cfg.strategy == "reptile":
        return ReptileLoRA(server_learning_rate=cfg.reptile_epsilon, server_momentum=0.0,
                           **common)
    return FedAvgLoRA(**common)
