"""The one training loop and the one evaluation, in plain PyTorch.

Every algorithm runs through :func:`train_steps`: what differs is the objective it is
given (see ``common/objectives.py``), never the loop.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from common.config import RunConfig
from common.data import IGNORE_INDEX, batches_once
from common.objectives import Objective, response_logits, token_nll
from common.precision import autocast


@dataclass(frozen=True)
class TrainStats:
    loss: float
    steps: int
    examples: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class EvalStats:
    """Held-out loss plus the task's metrics (named as in the metrics history)."""

    loss: float
    metrics: dict[str, float]
    count: int  # response tokens (causal LM) or examples (classification)
    # classification only: confusion[true][predicted] counts. Kept out of ``metrics``,
    # which holds scalars only (it becomes a Flower MetricRecord and a history row).
    confusion: list[list[int]] | None = None

    @property
    def perplexity(self) -> float:
        return self.metrics.get("perplexity", math.nan)

    @property
    def token_accuracy(self) -> float:
        return self.metrics.get("token-accuracy", math.nan)

    def row(self, prefix: str = "eval-") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, **{prefix + k: v for k, v in self.metrics.items()}}


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier at a run-global step, so decay continues across rounds."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW, or schedule-free AdamW ('optimizer' adamw-schedulefree; Defazio et al. 2024,
    the ``schedulefree`` package). Its state starts fresh every round, as AdamW's does:
    its base sequence z and weight sum describe this client's own trajectory, which the
    server's aggregate replaces, so carrying them into the next round (context.state)
    would pull the client back toward its last local iterate. Warmup stays run-global
    (``lr_factor``), not the package's per-optimizer ``warmup_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw-schedulefree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextmanager
def _as_is(optimizer, objective, batches):
    yield optimizer, objective, batches


def train_steps(model: torch.nn.Module, batches, objective: Objective, cfg: RunConfig, *,
                num_steps: int, step_offset: int = 0, total_steps: int | None = None,
                desc: str = "train", private=None) -> TrainStats:
    """``num_steps`` optimizer steps of ``objective`` over ``batches``.

    ``step_offset`` is the run-global step of the first one (round r starts at
    (r-1) * local-steps), so the schedule decays across rounds instead of restarting.
    The optimizer is fresh each call: AdamW moments do not travel between rounds.
    ``private`` (a ``common.dp.PrivateTraining``) makes the same loop DP-SGD: Opacus'
    optimizer, Poisson batches, and the objective without its weight penalties, which
    the DP optimizer adds after the noise (common/dp.py says why).
    """
    total = total_steps or cfg.total_local_steps
    optimizer = make_optimizer(model, cfg)
    model.train()  # before wrapping: Opacus computes per-sample gradients in train mode
    if private is None:
        wrap = _as_is(optimizer, objective, batches)
    else:
        from common.dp import private_training

        wrap = private_training(model, optimizer, objective, private)
    schedule_free = cfg.optimizer == "adamw-schedulefree"  # never under DP (config check)
    if schedule_free:
        optimizer.train()  # gradients at y, the interpolation of z and the average x
    with wrap as (optimizer, objective, batches):
        try:
            return _loop(model, optimizer, batches, objective, cfg, num_steps=num_steps,
                         step_offset=step_offset, total=total, desc=desc)
        finally:
            if schedule_free:  # the averaged weights x into the model: what is sent and evaluated
                optimizer.eval()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def accumulation_weights(micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Each micro-batch's share of its optimizer step: its example count over the step's.

    The objectives return a per-sample mean per micro-batch, so weighting by examples
    makes the step's loss the mean over all examples of the step, whatever the sizes
    (the last micro-batch of an epoch is often short): as transformers' trainer since
    4.46 divides by ``num_items_in_batch`` instead of by the accumulation count. One
    micro-batch (always under DP) gets weight 1, the loss exactly as before.
    """
    if len(micro_batches) == 1:
        return [1.0]
    counts = [_example_count(b["labels"]) for b in micro_batches]
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def _example_count(labels: torch.Tensor) -> int:
    """Examples that count in a per-sample mean: rows with a labelled token (causal LM,
    as ``per_sample_mean``), or every row (classification: one label each)."""
    if labels.dim() == 1:
        return int(labels.shape[0])
    return int((labels != IGNORE_INDEX).any(dim=1).sum())


def _loop(model, optimizer, batches, objective, cfg: RunConfig, *, num_steps: int,
          step_offset: int, total: int, desc: str) -> TrainStats:
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    losses, examples, tokens = [], 0, 0
    start = time.perf_counter()
    # disable=None: no bars when stderr is not a terminal (Ray actors, CI logs).
    progress = tqdm(range(num_steps), desc=desc, leave=False, mininterval=2.0, disable=None)
    for step in progress:
        factor = lr_factor(step_offset + step, total=total, warmup=cfg.warmup_steps,
                           schedule=("constant" if cfg.optimizer == "adamw-schedulefree"
                                     else cfg.lr_schedule))  # schedule-free: no schedule
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        step_loss = 0.0
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        shares = accumulation_weights(micro)
        for batch, share in zip(micro, shares):
            batch = to_device(batch, device)
            with autocast(model):  # 16-bit base: bf16 matmuls, fp32 LoRA weights and loss
                loss = objective(model, batch)
            # Under DP-SGD (common/dp.py) each micro-batch's loss enters unweighted:
            # Opacus recovers per-example gradients from it and normalizes the sum.
            weighted = share != 1.0 and not getattr(optimizer, "per_example_clipping", False)
            (loss * share if weighted else loss).backward()
            step_loss += float(loss.detach()) * share
            examples += batch["input_ids"].shape[0]
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        if cfg.max_grad_norm > 0:  # under DP a no-op: Opacus replaces .grad at its step
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return TrainStats(loss=sum(losses) / max(1, len(losses)), steps=num_steps,
                      examples=examples, tokens=tokens,
                      seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[dict], *, batch_size: int,
             pad_token_id: int) -> EvalStats:
    """Causal LM: token-level loss, perplexity and next-token accuracy over response
    tokens. Classification: loss, accuracy and macro-F1."""
    was_training = model.training
    model.eval()
    try:
        with autocast(model):
            if examples and "label" in examples[0]:
                return _evaluate_classification(model, examples, batch_size, pad_token_id)
            return _evaluate_causal_lm(model, examples, batch_size, pad_token_id)
    finally:
        model.train(was_training)


def _evaluate_causal_lm(model, examples, batch_size, pad_token_id) -> EvalStats:
    nll_sum, correct, count = 0.0, 0, 0
    device = next(model.parameters()).device
    # shortest first: each batch pads to about its own length (the demo's held-out
    # split: 6,000 instead of 7,280 padded tokens for 5,560 real ones); the sums do not
    # depend on the order
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    for batch in batches_once(examples, batch_size, pad_token_id):
        batch = to_device(batch, device)
        logits, labels = response_logits(model, batch)
        mask = labels != IGNORE_INDEX
        nll_sum += float(token_nll(logits, labels).sum())
        correct += int(((logits.argmax(-1) == labels) & mask).sum())
        count += int(mask.sum())
    loss = nll_sum / max(1, count)
    return EvalStats(loss=loss, count=count, metrics={
        "perplexity": math.exp(min(loss, 50.0)), "token-accuracy": correct / max(1, count)})


def _evaluate_classification(model, examples, batch_size, pad_token_id) -> EvalStats:
    loss_sum, predicted, actual, num_classes = 0.0, [], [], 0
    device = next(model.parameters()).device
    for batch in batches_once(examples, batch_size, pad_token_id):
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += float(torch.nn.functional.cross_entropy(
            logits.float(), batch["labels"], reduction="sum"))
        predicted += logits.argmax(-1).tolist()
        actual += batch["labels"].tolist()
        num_classes = logits.shape[-1]
    accuracy = sum(p == a for p, a in zip(predicted, actual)) / max(1, len(actual))
    return EvalStats(loss=loss_sum / max(1, len(actual)), count=len(actual), metrics={
        "accuracy": accuracy, "macro-f1": macro_f1(predicted, actual)},
        confusion=confusion_matrix(predicted, actual, num_classes=num_classes))


def confusion_matrix(predicted: list[int], actual: list[int], *,
                     num_classes: int) -> list[list[int]]:
    """counts[true][predicted], over every class the model has (a class absent from
    the data still gets its row and column, so matrices of one run line up)."""
    counts = [[0] * num_classes for _ in range(num_classes)]
    for p, a in zip(predicted, actual):
        counts[a][p] += 1
    return counts


def macro_f1(predicted: list[int], actual: list[int]) -> float:
    """Mean F1 over the classes that occur in either list (scikit-learn's default)."""
    scores = []
    for label in sorted(set(predicted) | set(actual)):
        tp = sum(p == a == label for p, a in zip(predicted, actual))
        fp = sum(p == label != a for p, a in zip(predicted, actual))
        fn = sum(a == label != p for p, a in zip(predicted, actual))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(1, len(scores))
