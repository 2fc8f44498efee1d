"""Personalization: how well the global adapter adapts to each client with little data.

Each client fine-tunes the global adapter for k steps on a small support split of its
own data and is evaluated on its query split, before and after. The mean and spread
across clients measure "adapts to a new task with little data" (the meta-learning
objective Reptile optimizes), for any strategy's adapter.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from common.config import RunConfig
from common.data import batches_forever, partition_examples
from common.model import get_model, load_tokenizer, set_adapter_state
from common.objectives import build_objective
from common.train import evaluate, train_steps


@dataclass(frozen=True)
class PersonalizationReport:
    before: list[float]  # query loss per client, global adapter
    after: list[float]  # query loss per client, after k support steps

    def summary(self) -> dict[str, float]:
        spread = lambda xs: statistics.pstdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        return {"query-loss-before-mean": statistics.mean(self.before),
                "query-loss-before-std": spread(self.before),
                "query-loss-after-mean": statistics.mean(self.after),
                "query-loss-after-std": spread(self.after)}


def personalize(cfg: RunConfig, adapter: dict[str, torch.Tensor], *, k_steps: int,
                support_examples: int, query_examples: int) -> PersonalizationReport:
    if k_steps < 1:
        raise ValueError(f"--k-steps must be >= 1, got {k_steps}")
    if support_examples < cfg.batch_size:
        raise ValueError(
            f"--support-examples {support_examples} is smaller than one batch "
            f"(batch-size {cfg.batch_size}): k={k_steps} steps need at least one full batch"
        )
    model, tokenizer = get_model(cfg), load_tokenizer(cfg.model)
    before, after = [], []
    for partition_id in range(cfg.num_clients):
        examples = partition_examples(cfg, partition_id, cfg.num_clients, tokenizer)
        if len(examples) < support_examples + query_examples:
            raise ValueError(
                f"client {partition_id} has {len(examples)} examples, fewer than "
                f"support ({support_examples}) + query ({query_examples}): lower them"
            )
        support, query = examples[:support_examples], examples[support_examples:support_examples + query_examples]
        set_adapter_state(model, adapter)
        pad = tokenizer.pad_token_id
        before.append(evaluate(model, query, batch_size=cfg.eval_batch_size, pad_token_id=pad).loss)
        torch.manual_seed(cfg.seed + partition_id)
        batches = batches_forever(support, cfg.batch_size, pad,
                                  torch.Generator().manual_seed(cfg.seed + partition_id))
        train_steps(model, batches, build_objective(model, cfg), cfg, num_steps=k_steps,
                    total_steps=k_steps, desc=f"personalize client {partition_id}")
        after.append(evaluate(model, query, batch_size=cfg.eval_batch_size, pad_token_id=pad).loss)
    set_adapter_state(model, adapter)
    return PersonalizationReport(before=before, after=after)
