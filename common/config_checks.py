"""RunConfig's checks: each key's range and the combinations no run can honour, and the
DP recipe's defaults. Split from common/config.py (the fields) to keep each file short."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from common.config import (
    BACKENDS, BUILTIN_MODEL, CLIENT_DP_MODES, DATA_FORMATS, DISTILL_LOSSES, DP_GRAD_SAMPLE_MODES, DTYPES,
    KRUM_STRATEGIES, LORA_AGGREGATIONS, LR_SCHEDULES, ON_BAD_RECORDS, OPTIMIZERS,
    PARTITIONERS, STRATEGIES, STUDENT_LAYER_CHOICES, STUDENT_TRAINS, TASKS, TRANSPORT_DTYPES,
    TRUNCATIONS, RunConfig, _attr, _check_choice,
)


def validate(cfg: RunConfig) -> None:
    """Every single-key and cross-key check of a RunConfig; ValueError (one line naming
    the key and what to do) on the first that fails. Called by RunConfig.__post_init__."""
    _check_choice("task", cfg.task, TASKS)
    if cfg.device not in ("auto", "cpu", "cuda") and not (
            cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()):
        raise ValueError(f"config 'device' must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("backend", cfg.backend, BACKENDS)
    _check_choice("transport-dtype", cfg.transport_dtype, TRANSPORT_DTYPES)
    _check_choice("data-format", cfg.data_format, DATA_FORMATS)
    _check_choice("truncation", cfg.truncation, TRUNCATIONS)
    _check_choice("on-bad-record", cfg.on_bad_record, ON_BAD_RECORDS)
    _check_choice("partitioner", cfg.partitioner, PARTITIONERS)
    _check_choice("lr-schedule", cfg.lr_schedule, LR_SCHEDULES)
    _check_choice("strategy", cfg.strategy, STRATEGIES)
    _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _check_lr_control(cfg)
    for name in ("num-threads", "eval-every", "lora-r", "batch-size", "grad-accum", "local-steps",
                 "eval-batch-size", "num-server-rounds", "num-clients",
                 "min-train-clients", "max-length"):
        if getattr(cfg, _attr(name)) < 1:
            raise ValueError(f"config '{name}' must be >= 1, got {getattr(cfg, _attr(name))}")
    for name in ("lr", "lora-alpha", "dirichlet-alpha", "round-timeout", "server-eta",
                 "server-tau", "server-lr", "distill-temperature"):
        if not getattr(cfg, _attr(name)) > 0:
            raise ValueError(f"config '{name}' must be > 0, got {getattr(cfg, _attr(name))}")
    for name in ("proximal-mu", "weight-decay", "max-grad-norm", "warmup-steps",
                 "max-examples-per-client", "l2sp-weight",
                 "early-stopping-patience", "validation-examples",
                 "lr-schedule-steps", "eval-examples"):
        if getattr(cfg, _attr(name)) < 0:
            raise ValueError(f"config '{name}' must be >= 0, got {getattr(cfg, _attr(name))}")
    # 1 would divide by zero in Adam's bias correction (beta1) or never move (beta2)
    if not 0.0 <= cfg.server_beta1 < 1.0:
        raise ValueError(f"config 'server-beta1' must be in [0, 1), or -1 for the strategy's "
                         f"default, got {cfg.server_beta1}")
    if not 0.0 <= cfg.server_beta2 < 1.0:
        raise ValueError(f"config 'server-beta2' must be in [0, 1), got {cfg.server_beta2}")
    for name in ("server-momentum", "distill-alpha"):
        if not 0.0 <= getattr(cfg, _attr(name)) <= 1.0:
            raise ValueError(
                f"config '{name}' must be in [0, 1], got {getattr(cfg, _attr(name))}"
            )
    if not 0.0 < cfg.reptile_epsilon <= 1.0:
        raise ValueError(
            f"config 'reptile-epsilon' must be in (0, 1], got {cfg.reptile_epsilon}"
        )
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"config 'lora-dropout' must be in [0, 1), got {cfg.lora_dropout}")
    if not 0.0 < cfg.fraction_train <= 1.0:
        raise ValueError(
            f"config 'fraction-train' must be in (0, 1], got {cfg.fraction_train}"
        )
    _check_distillation(cfg)
    if cfg.task == "classification" and cfg.distill_teacher:
        raise ValueError(
            "config 'distill-teacher' works with task 'causal-lm' only: unset it or "
            "use --task causal-lm"
        )
    if cfg.strategy == "fedprox" and cfg.proximal_mu == 0.0:
        raise ValueError(
            "config 'strategy' is 'fedprox' but 'proximal-mu' is 0: set "
            "--proximal-mu > 0 (e.g. 0.01) or use --strategy fedavg"
        )
    if cfg.min_train_clients > cfg.num_clients:
        raise ValueError(
            f"config 'min-train-clients' ({cfg.min_train_clients}) exceeds "
            f"'num-clients' ({cfg.num_clients}): lower it or add clients"
        )
    for name in ("num-malicious-clients", "max-update-norm-ratio", "max-num-examples"):
        if getattr(cfg, _attr(name)) < 0:
            raise ValueError(f"config '{name}' must be >= 0, got {getattr(cfg, _attr(name))}")
    if cfg.num_clients_to_select < 1:
        raise ValueError(
            f"config 'num-clients-to-select' must be >= 1, got {cfg.num_clients_to_select}"
        )
    if not 0.0 <= cfg.trim_beta < 0.5:
        raise ValueError(f"config 'trim-beta' must be in [0, 0.5), got {cfg.trim_beta}")
    if cfg.gradient_checkpointing and cfg.dp_sgd:
        raise ValueError(
            "config 'gradient-checkpointing' with 'dp-sgd': Opacus' per-sample gradient "
            "hooks would run twice per layer in the recomputed forward; unset one of them")
    if cfg.eval_dataset and not cfg.eval_examples:
        raise ValueError(
            f"config 'eval-dataset' is {cfg.eval_dataset!r} but 'eval-examples' is 0 "
            "(evaluation off): set --eval-examples >= 1 or leave eval-dataset empty")
    _check_robust_strategy(cfg)
    _check_resume(cfg)
    _check_privacy(cfg)
    _check_lora_aggregation(cfg)


def _check_distillation(cfg: RunConfig) -> None:
    _check_choice("distill-loss", cfg.distill_loss, DISTILL_LOSSES)
    if not 0.0 < cfg.distill_beta < 1.0:
        raise ValueError(f"config 'distill-beta' must be in (0, 1), got {cfg.distill_beta} "
                         "(0 and 1 are distill-loss forward-kl and reverse-kl)")
    if cfg.student_layers < 0:
        raise ValueError(f"config 'student-layers' must be >= 0, got {cfg.student_layers}")
    if cfg.student_layers and cfg.task != "causal-lm":
        raise ValueError("config 'student-layers' works with task 'causal-lm' only: "
                         "set it to 0 or use --task causal-lm")
    choice = cfg.student_layer_choice.strip()
    if choice not in STUDENT_LAYER_CHOICES:
        layers = cfg.student_layer_list  # raises on a malformed list
        if cfg.student_layers and len(layers) != cfg.student_layers:
            raise ValueError(
                f"config 'student-layer-choice' lists {len(layers)} layers but "
                f"'student-layers' is {cfg.student_layers}: list exactly that many")
    _check_choice("student-train", cfg.student_train, STUDENT_TRAINS)
    if cfg.student_train == "mlp" and not cfg.student_layers:
        raise ValueError(f"config 'student-train' {cfg.student_train!r} trains a student's full "
                         "weights and needs 'student-layers' > 0: set --student-layers N or "
                         "--student-train lora")
    if cfg.student_train == "mlp" and cfg.lora_aggregation != "naive":
        # the other aggregations rewrite LoRA factor pairs; full weights are averaged as is
        raise ValueError(f"config 'student-train' {cfg.student_train!r} needs lora-aggregation "
                         f"naive, got {cfg.lora_aggregation!r}: set --lora-aggregation naive")
    if cfg.student_train == "mlp" and cfg.dp_sgd:
        # per-example gradients of ~40M full weights: not measured, nor Opacus' support
        # of every norm class, so refused rather than left to fail mid-round
        raise ValueError(f"config 'student-train' {cfg.student_train!r} is not supported with "
                         "dp-sgd: use --student-train lora, or --dp-sgd false")


def _check_lr_control(cfg: RunConfig) -> None:
    if not 0.0 < cfg.lr_plateau_factor < 1.0:
        raise ValueError(f"config 'lr-plateau-factor' must be in (0, 1), got {cfg.lr_plateau_factor}")
    for name in ("lr-plateau-patience", "lr-plateau-cooldown", "lr-plateau-min-lr",
                 "lr-plateau-threshold", "lr-plateau-max-lr"):
        if getattr(cfg, _attr(name)) < 0:
            raise ValueError(f"config '{name}' must be >= 0, got {getattr(cfg, _attr(name))}")
    if not (cfg.lr_plateau_increase >= 1.0 and math.isfinite(cfg.lr_plateau_increase)):
        raise ValueError("config 'lr-plateau-increase' must be a finite number >= 1 (1: never "
                         f"raise the lr), got {cfg.lr_plateau_increase}")
    cap = cfg.lr_plateau_max_lr
    if cfg.lr_plateau and cap and cap < max(cfg.lr, cfg.lr_plateau_min_lr):
        raise ValueError(f"config 'lr-plateau-max-lr' {cfg.lr_plateau_max_lr} is below 'lr' "
                         f"{cfg.lr} or 'lr-plateau-min-lr' {cfg.lr_plateau_min_lr}: set it "
                         "above both, or 0 for no cap")
    if not cfg.lr_plateau:  # its settings would do nothing: say so rather than run without
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        changed = [f"'{name.replace('_', '-')}' {getattr(cfg, name)!r}" for name in defaults
                   if name.startswith("lr_plateau_") and name != "lr_plateau_reject"
                   and getattr(cfg, name) != defaults[name]]
        if changed:
            raise ValueError(f"config {', '.join(changed)} set but 'lr-plateau' is false, so "
                             "they would do nothing: add --lr-plateau true (and usually "
                             "--lr-schedule constant), or drop them")
    if cfg.lr_plateau_reject:
        _check_reject(cfg)
    _check_server_lr_search(cfg)
    if cfg.uses_validation and cfg.validation_examples < 1:
        raise ValueError("config 'validation-examples' is 0, but early stopping, lr-plateau "
                         "and server-lr-search watch the validation loss: set it >= 1 (e.g. 64)")
    if cfg.optimizer == "adamw-schedulefree" and cfg.dp_sgd:
        raise ValueError("config 'optimizer' adamw-schedulefree cannot run under 'dp-sgd' "
                         "(Opacus' optimizer wrapper hides its train/eval switch): use adamw")

# Undoing a round (or moving along its update: server-lr-search) sets only the global
# adapter: where the server keeps more state that the round moved (an optimizer's
# moments, FedAvgM/Reptile's arrays, the exact residual, the clipping norm and the
# accountant of client-dp), that state would not follow; and an undo without its lr
# rule (lr-plateau off) would retry the same step.
_REJECT_STRATEGIES = ("fedavg", "fedprox")


def _check_reject(cfg: RunConfig) -> None:
    if not cfg.lr_plateau:
        raise ValueError("config 'lr-plateau-reject' needs 'lr-plateau' true (its rule decides "
                         "which rounds to undo): set --lr-plateau true")
    # Battiti's rule cuts the rate with every undo; torch's rule cuts only after
    # `patience` bad rounds and ignores them during `cooldown`, so the undone round
    # would be retried at the same rate from the same adapter.
    for key, value in (("lr-plateau-patience", cfg.lr_plateau_patience),
                       ("lr-plateau-cooldown", cfg.lr_plateau_cooldown)):
        if value != 0:
            raise ValueError(f"config 'lr-plateau-reject' needs '{key}' 0 (an undone round "
                             f"must cut the lr, or the next one retries the same step), got "
                             f"{value}: set --{key} 0")
    _check_replaces_aggregate(cfg, "lr-plateau-reject", "false")


def _check_server_lr_search(cfg: RunConfig) -> None:
    if cfg.server_lr_candidates:  # raises on a malformed list
        _check_replaces_aggregate(cfg, "server-lr-search", "''")


def _check_replaces_aggregate(cfg: RunConfig, key: str, off: str) -> None:
    """lr-plateau-reject and server-lr-search hand the next round an adapter other than
    Flower's aggregate: only where that adapter is the server's whole state."""
    if cfg.strategy not in _REJECT_STRATEGIES:
        raise ValueError(f"config '{key}' works with strategy {_REJECT_STRATEGIES} only, got "
                         f"'{cfg.strategy}' (its server state would not follow the adapter "
                         f"kept): use fedavg or set --{key} {off}")
    if cfg.lora_aggregation != "naive":
        raise ValueError(f"config '{key}' works with 'lora-aggregation' naive only, got "
                         f"'{cfg.lora_aggregation}': use naive or set --{key} {off}")
    if cfg.client_dp != "off":
        why = ("a discarded release still counts in the privacy budget and the clipping state"
               if key == "lr-plateau-reject" else
               "the noise and clipping are set for the aggregate, and a step s x it scales both")
        raise ValueError(f"config '{key}' cannot run with 'client-dp' ({why}): set "
                         f"--client-dp off or --{key} {off}")


def _check_lora_aggregation(cfg: RunConfig) -> None:
    _check_choice("lora-aggregation", cfg.lora_aggregation, LORA_AGGREGATIONS)
    ranks = cfg.client_rank_list  # raises on a malformed list
    if ranks and len(ranks) != cfg.num_clients:
        raise ValueError(f"config 'client-lora-ranks' {cfg.client_lora_ranks!r} has {len(ranks)} "
                         f"ranks for {cfg.num_clients} clients: give one rank per client")
    if ranks and not all(1 <= r <= cfg.lora_r for r in ranks):
        raise ValueError(f"config 'client-lora-ranks' {cfg.client_lora_ranks!r}: each rank must "
                         f"be in [1, lora-r {cfg.lora_r}] (raise lora-r, the global rank, or "
                         "lower the ranks)")
    if ranks and cfg.lora_aggregation != "svd":
        raise ValueError("config 'client-lora-ranks' needs 'lora-aggregation' svd: each "
                         "client's rank is a truncation of the SVD-ordered global factors")
    if cfg.lora_aggregation == "naive":
        return
    why = None
    if cfg.strategy not in ("fedavg", "fedprox"):
        why = (f"strategy {cfg.strategy!r} is not a weighted mean of the updates: use "
               "fedavg or fedprox")
    elif cfg.ffa_lora:
        why = "'ffa-lora' already makes the mean exact (A is frozen): drop one of them"
    elif cfg.client_dp != "off":
        why = "'client-dp' clips and noises the factors' mean: use lora-aggregation naive"
    elif cfg.dp_sgd and cfg.lora_aggregation == "exact":
        why = "'dp-sgd' with the exact mode's residual hooks is untested: use svd or naive"
    elif cfg.dp_sgd and cfg.lora_aggregation == "alternating":
        why = ("'dp-sgd' with a factor frozen per round is untested (FFA-LoRA, 'ffa-lora', "
               "is the private way to an exact mean): use ffa-lora or naive")
    if why:
        raise ValueError(f"config 'lora-aggregation' {cfg.lora_aggregation!r}: {why}")

def _check_privacy(cfg: RunConfig) -> None:
    _check_choice("client-dp", cfg.client_dp, CLIENT_DP_MODES)
    _check_choice("dp-grad-sample-mode", cfg.dp_grad_sample_mode, DP_GRAD_SAMPLE_MODES)
    for name in ("dp-max-grad-norm", "client-dp-clipping-norm", "local-dp-epsilon"):
        if not getattr(cfg, _attr(name)) > 0:
            raise ValueError(f"config '{name}' must be > 0, got {getattr(cfg, _attr(name))}")
    for name in ("dp-target-epsilon", "dp-noise-multiplier", "client-dp-noise-multiplier"):
        if getattr(cfg, _attr(name)) < 0:
            raise ValueError(f"config '{name}' must be >= 0, got {getattr(cfg, _attr(name))}")
    if not 0.0 < cfg.dp_delta < 1.0:
        raise ValueError(f"config 'dp-delta' must be in (0, 1), got {cfg.dp_delta}")
    private = cfg.dp_sgd or cfg.client_dp != "off"
    if cfg.dp_sgd and not (cfg.dp_target_epsilon or cfg.dp_noise_multiplier):
        raise ValueError("config 'dp-sgd' is on with 'dp-target-epsilon' 0 and "
                         "'dp-noise-multiplier' 0: set a budget or a noise multiplier")
    if private and cfg.resume_from:
        raise ValueError("config 'resume-from' cannot continue a differentially private "
                         "run: the clients' accountants live in their Flower contexts, "
                         "which a new run does not have; start a new run")
    if cfg.dp_sgd and cfg.dp_grad_sample_mode == "ghost" and cfg.distill_teacher:
        raise ValueError("config 'dp-grad-sample-mode' ghost needs a loss per example "
                         "and distillation has none here: use hooks, or no distill-teacher")
    if cfg.client_dp != "off" and cfg.transport_dtype != "float32":
        raise ValueError("config 'client-dp' needs 'transport-dtype' float32: the clipping "
                         "and the noise apply to the arrays on the wire")
    if cfg.client_dp != "off" and cfg.strategy in (
            "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"):
        raise ValueError(f"config 'client-dp' calibrates its noise to a mean of clipped "
                         f"updates; strategy {cfg.strategy!r} is not a mean: use fedavg, "
                         "fedprox, fedavgm, reptile or a fedopt strategy")

def _check_resume(cfg: RunConfig) -> None:
    """A resumed run continues in its own folder: its history and best link go on."""
    if cfg.resume_from and cfg.run_dir and (
            os.path.normpath(cfg.run_dir) != os.path.normpath(cfg.resume_from)):
        raise ValueError(
            f"config 'run-dir' ({cfg.run_dir!r}) differs from 'resume-from' "
            f"({cfg.resume_from!r}): a resumed run continues in its own folder, so "
            "leave 'run-dir' empty"
        )

def _check_robust_strategy(cfg: RunConfig) -> None:
    """A robust aggregator only defends with enough replies; the guard in
    server/strategies.py refuses to aggregate fewer than 'min-train-clients', so
    that is the count that must suffice."""
    n, f = cfg.min_train_clients, cfg.num_malicious_clients
    needed = {"fedmedian": 3, "fedtrimmedavg": 3, "krum": 2 * f + 3, "multikrum": 2 * f + 3,
              "bulyan": 4 * f + 3}.get(cfg.strategy, 0)
    if n < needed:
        raise ValueError(
            f"config 'strategy' {cfg.strategy!r} with 'num-malicious-clients' {f} "
            f"needs 'min-train-clients' >= {needed}, got {n}: raise "
            "'min-train-clients' (and 'num-clients') or lower 'num-malicious-clients'"
        )
    if cfg.strategy == "multikrum" and cfg.num_clients_to_select > n - f:
        raise ValueError(
            f"config 'num-clients-to-select' ({cfg.num_clients_to_select}) must be "
            f"<= 'min-train-clients' - 'num-malicious-clients' ({n - f}) for multikrum"
        )
    if cfg.strategy == "fedtrimmedavg" and int(cfg.trim_beta * n) < 1:
        raise ValueError(
            f"config 'trim-beta' {cfg.trim_beta} cuts nothing from "
            f"'min-train-clients' {n} replies: set 'trim-beta' >= {1 / n:.3g} "
            "or add clients"
        )


DP_RECIPE_LOGICAL_BATCH = 256


def dp_recipe_changes(cfg: "RunConfig") -> dict[str, Any]:
    """The DP recipe's values for the settings ``cfg`` leaves at their generic defaults,
    when 'dp-sgd' and 'dp-recipe' are on (else nothing); keyed by attribute name.

    Sources (docs/privacy.md): large logical batches and a constant lr (Li et al.,
    2022); LoRA r 4, no dropout (microsoft/dp-transformers' GPT-2 LoRA at epsilon 8);
    LoRA on q and v only (Yu et al., 2022); lr from bench/privacy.py's sweep.
    Idempotent: no recipe value is a default.
    """
    if not (cfg.dp_sgd and cfg.dp_recipe):
        return {}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    recipe = {
        "grad_accum": max(1, round(DP_RECIPE_LOGICAL_BATCH / cfg.batch_size)),
        "lr_schedule": "constant",
        "lr": 3e-3,
        "lora_dropout": 0.0,
    }
    if not cfg.client_lora_ranks:  # heterogeneous ranks are checked against lora-r
        recipe["lora_r"] = 4
    if cfg.model == BUILTIN_MODEL and cfg.task == "causal-lm":
        recipe["lora_target_modules"] = "q_proj,v_proj"
    return {attr: value for attr, value in recipe.items()
            if getattr(cfg, attr) == defaults[attr] and value != defaults[attr]}
