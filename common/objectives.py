"""Loss terms that plug into the one training loop.

An objective maps (model, batch) to a scalar loss. Algorithms differ only here:
plain fine-tuning is the task loss; FedProx adds a proximal term; later objectives
(L2-SP, distillation) add their own terms without touching the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from common.data import IGNORE_INDEX


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for the positions that predict a labelled token, and those labels.

    ``logits_to_keep`` skips the LM head over the prompt (most of each sequence here),
    which is a large share of a small model's compute (49k-word vocabulary).
    """
    labels = batch["labels"]
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
    keep = labels.shape[1] - first + 1
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                logits_to_keep=keep)
    return out.logits[:, :-1, :], labels[:, labels.shape[1] - keep + 1:]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood, 0 where the label is ignored."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(labels.shape)


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over sequences of each sequence's mean response-token NLL.

    A per-sample mean (not Hugging Face's mean over all tokens of the batch) so each
    example weighs the same whatever its length, which DP-SGD's clipping also needs.
    """
    logits, labels = response_logits(model, batch)
    nll = token_nll(logits, labels)
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    has_tokens = counts > 0
    per_sample = nll.sum(dim=1)[has_tokens] / counts[has_tokens]
    return per_sample.mean()


@dataclass
class ProximalTerm:
    """FedProx: (mu/2) * ||w - w_global||^2 over the trainable (adapter) weights.

    Flower's FedProx strategy only sends ``proximal-mu``; the client must add this.
    """

    mu: float
    anchor: dict[str, torch.Tensor]

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for name, param in model.named_parameters():
            if param.requires_grad:
                total = total + (param - self.anchor[name]).pow(2).sum()
        return 0.5 * self.mu * total


@dataclass
class TrainObjective:
    """Task loss plus penalty terms; the loop calls this and nothing else."""

    task_loss: Objective = causal_lm_loss
    penalties: list = field(default_factory=list)

    def __call__(self, model, batch) -> torch.Tensor:
        loss = self.task_loss(model, batch)
        for penalty in self.penalties:
            loss = loss + penalty(model)
        return loss


def snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def build_objective(model, *, proximal_mu: float = 0.0) -> TrainObjective:
    """The objective for this round; call it after the global adapter is loaded."""
    penalties = []
    if proximal_mu > 0:
        penalties.append(ProximalTerm(proximal_mu, snapshot_trainable(model)))
    return TrainObjective(penalties=penalties)
