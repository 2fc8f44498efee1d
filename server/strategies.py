"""Config name -> Flower strategy, plus what fedtune adds to every strategy:
the bytes each round really moved and the per-client train metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi,
)

from common.config import METRICS_KEY, NUM_EXAMPLES_KEY, RunConfig


@dataclass
class RoundTraffic:
    """What one round sent and received, measured on the Message objects."""

    bytes_sent: int = 0
    bytes_received: int = 0
    replies: int = 0
    failures: int = 0
    clients: list[dict] = field(default_factory=list)


def payload_bytes(msg: Message) -> int:
    """Bytes of the array payloads (tensor data + names) in one message."""
    return sum(record.count_bytes() for record in msg.content.array_records.values())


class TrafficMixin:
    """Records :class:`RoundTraffic` for the round in progress (``self.traffic``)."""

    traffic: RoundTraffic

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.traffic = RoundTraffic(bytes_sent=sum(payload_bytes(m) for m in messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                self.traffic.failures += 1
                continue
            self.traffic.replies += 1
            self.traffic.bytes_received += payload_bytes(reply)
            metrics = reply.content.metric_records.get(METRICS_KEY, {})
            self.traffic.clients.append({
                "round": server_round, "node-id": reply.metadata.src_node_id,
                **{k: v for k, v in metrics.items()},
            })
        return super().aggregate_train(server_round, replies)


class FedAvgLoRA(TrafficMixin, FedAvg):
    """FedAvg over the adapter tensors, weighted by each client's example count."""


class FedProxLoRA(TrafficMixin, FedProx):
    """FedProx: sends ``proximal-mu``; the client adds the proximal term (objectives)."""


class FedAdamLoRA(TrafficMixin, FedAdam):
    """Server-side Adam over the adapter tensors (Reddi et al., 2021)."""


class FedYogiLoRA(TrafficMixin, FedYogi):
    """Server-side Yogi over the adapter tensors."""


class FedAdagradLoRA(TrafficMixin, FedAdagrad):
    """Server-side Adagrad over the adapter tensors."""


class FedAvgMLoRA(TrafficMixin, FedAvgM):
    """FedAvg with server momentum."""


class ReptileLoRA(TrafficMixin, FedAvgM):
    """Reptile's server step, w <- w + epsilon * (avg - w): FedAvgM without momentum
    at server learning rate epsilon (epsilon = 1 is FedAvg)."""


def build_strategy(cfg: RunConfig):
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,  # the server evaluates the global adapter itself
        min_train_nodes=cfg.min_train_clients,
        min_available_nodes=cfg.min_train_clients,
        weighted_by_key=NUM_EXAMPLES_KEY,
    )
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
