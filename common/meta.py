"""k-shot adaptation to tasks nobody trained on: the test of meta-learning.

A *task* is one value of the run's partition column (a WordNet lexicographer category
for the built-in data) that the run held out of every client, the held-out split and
the validation split (``meta-test-categories``), or, with a category filter, any value
the filter left out. For each task and seed, an *episode*:

- the task's records shuffled with the seed; the **query set** is the first
  ``query_examples``, the **support set** for k shots the next k (nested: the 8-shot
  set holds the 4-shot one, so the curve over k is not noise between draws), disjoint
  from the query set;
- the initialisation (an adapter) adapts for ``steps`` optimizer steps of the plain
  task loss on the support set (batches of min(k, batch-size), cycling; AdamW at the
  run's lr, constant schedule, no warmup);
- the query loss (mean response-token cross-entropy, nats) is measured after, and for
  k = 0 before any adaptation.

This is the k-shot protocol of MAML (Finn et al. 2017) and Reptile (Nichol et al. 2018),
applied per unseen client task as in FedMeta (Chen et al. 2018). It compares
initialisations: the base model, FedAvg's adapter (+ the same local fine-tune: Jiang et
al. 2019, "FedAvg behaves like Reptile"), Reptile's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from common.config import RunConfig

DEFAULT_SHOTS = (4, 8, 16, 32)


@dataclass(frozen=True)
class Episode:
    """One task under one seed: ``query`` and ``support[k]`` (tokenized examples)."""

    task: str
    seed: int
    query: list[dict]
    support: dict[int, list[dict]]


@dataclass
class KShotReport:
    """Query loss per (task, seed, k); k = 0 is the initialisation before adapting."""

    rows: list[dict] = field(default_factory=list)  # {"task", "seed", "k", "query-loss"}

    def curve(self) -> dict[int, tuple[float, float]]:
        """k -> (mean, population std) of the query loss over tasks and seeds."""
        out = {}
        for k in sorted({r["k"] for r in self.rows}):
            xs = [r["query-loss"] for r in self.rows if r["k"] == k]
            out[k] = (statistics.mean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0)
        return out


def trained_categories(cfg: RunConfig) -> list[str] | None:
    """The partition-column values the run trained on (None: all not held out)."""
    return cfg.category_list or None


def check_unseen(cfg: RunConfig, tasks: list[str]) -> None:
    """Refuse a task the run trained on, in one line naming it and the fix.

    Raises ValueError: no task given, a task in the run's 'categories', or (a run that
    kept all categories) a task not in its 'meta-test-categories'.
    """
    if cfg.task != "causal-lm":
        raise ValueError("k-shot tasks are categories of a causal-lm run's data; a classification "
                         "run's categories are its labels")
    if not tasks:
        raise ValueError("no unseen task: give --unseen-categories, or train the run with "
                         "--meta-test-categories")
    trained = trained_categories(cfg)
    held = set(cfg.meta_test_category_list)
    for task in tasks:
        if trained is not None and task in trained:
            raise ValueError(f"task '{task}' is in the run's categories ({','.join(trained)}): "
                             "its clients trained on it; choose a category the run left out")
        if trained is None and not held:
            raise ValueError(f"task '{task}' was not held out: the run trained on all of its "
                             "data (no categories chosen, no meta-test-categories), so no task "
                             "is unseen; train a run with --meta-test-categories (values of "
                             f"its '{cfg.partition_by}' column)")
        if trained is None and task not in held:
            raise ValueError(f"task '{task}' was not held out: the run kept all categories and "
                             f"held out only {sorted(held)} (meta-test-categories)")


def episodes(cfg: RunConfig, tokenizer, *, tasks: list[str], shots: list[int],
             query_examples: int, seeds: list[int]) -> list[Episode]:
    """The support/query episodes of each task and seed, from ``cfg.dataset``.

    Raises ValueError: a task that is not a value of the partition column, a k < 1, or a
    task with fewer usable records than query + max k.
    """
    from common.data import check_records, detect_format, load_dataset_any, to_messages
    from common.data import tokenize_dataset

    if not shots or min(shots) < 1:
        raise ValueError(f"--shots must be integers >= 1, got {shots}")
    if query_examples < 1:
        raise ValueError(f"--query-examples must be >= 1, got {query_examples}")
    ds = load_dataset_any(cfg.dataset)
    column = cfg.partition_by
    if column not in ds.column_names:
        raise ValueError(f"dataset '{cfg.dataset}' has no column '{column}' (partition-by): "
                         "unseen tasks are values of it")
    fmt = detect_format(ds.column_names, cfg.data_format, cfg.dataset)
    ds, _ = check_records(ds, fmt, "skip", to_messages)
    present = set(ds.unique(column))
    unknown = [t for t in tasks if t not in present]
    if unknown:
        raise ValueError(f"unseen tasks {unknown} are not values of column '{column}': fix "
                         "--unseen-categories")
    need = query_examples + max(shots)
    out = []
    for task in tasks:
        records = ds.filter(lambda r: r[column] == task)
        for seed in seeds:
            shuffled = records.shuffle(seed=seed)
            # over-long records are dropped by tokenization: draw a margin, cut after
            window = shuffled.select(range(min(len(shuffled), need + need // 2 + 8)))
            examples = tokenize_dataset(window, fmt, tokenizer, cfg.max_length,
                                        truncation=cfg.truncation, on_bad_record="skip")
            if len(examples) < need:
                raise ValueError(f"task '{task}' has {len(examples)} usable records, fewer than "
                                 f"--query-examples {query_examples} + the largest k {max(shots)}: "
                                 "lower them")
            query, rest = examples[:query_examples], examples[query_examples:]
            out.append(Episode(task=task, seed=seed, query=query,
                               support={k: rest[:k] for k in sorted(set(shots))}))
    return out


def adaptation_config(cfg: RunConfig, k: int, lr: float | None = None) -> RunConfig:
    """The run's config for k-shot fine-tuning: plain task loss (no proximal term, L2-SP,
    distillation, DP or accumulation), constant lr, no warmup, batch min(k, batch-size)."""
    return cfg.replace(lr=lr or cfg.lr, lr_schedule="constant", warmup_steps=0, l2sp_weight=0.0,
                       distill_teacher="", dp_sgd=False, grad_accum=1, optimizer="adamw",
                       batch_size=min(k, cfg.batch_size), lr_plateau=False,
                       early_stopping_patience=0)


def kshot_report(cfg: RunConfig, adapter: dict[str, torch.Tensor], eps: list[Episode], *,
                 steps: int, lr: float | None = None, model=None, tokenizer=None) -> KShotReport:
    """Query loss of ``adapter`` on every episode before (k = 0) and after ``steps``
    adaptation steps on each k-shot support set. The model's adapter is ``adapter``
    again on return. Raises ValueError for steps < 1."""
    from common.data import batches_forever
    from common.model import get_model, load_tokenizer, set_adapter_state
    from common.objectives import build_objective
    from common.train import evaluate, train_steps

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    model = model if model is not None else get_model(cfg)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    pad = tokenizer.pad_token_id
    report = KShotReport()

    def query_loss(ep: Episode) -> float:
        return evaluate(model, ep.query, batch_size=cfg.eval_batch_size, pad_token_id=pad).loss

    for ep in eps:
        set_adapter_state(model, adapter)
        report.rows.append({"task": ep.task, "seed": ep.seed, "k": 0, "query-loss": query_loss(ep)})
        for k, support in ep.support.items():
            set_adapter_state(model, adapter)
            adapt = adaptation_config(cfg, k, lr)
            torch.manual_seed(ep.seed)
            batches = batches_forever(support, adapt.batch_size, pad,
                                      torch.Generator().manual_seed(ep.seed))
            train_steps(model, batches, build_objective(model, adapt), adapt, num_steps=steps,
                        total_steps=steps, desc=f"{ep.task} k={k} seed={ep.seed}")
            report.rows.append({"task": ep.task, "seed": ep.seed, "k": k,
                                "query-loss": query_loss(ep)})
    set_adapter_state(model, adapter)
    return report
