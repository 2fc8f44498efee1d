"""`fedtune train`: the same trainer and run folder with no Flower.

Two baselines for every federated run, on the same config:
- centralized: the pooled partitions of all clients, with as many optimizer steps as
  the federation takes in total (rounds x clients per round x local steps);
- local-only (``partition_id``): one client's partition alone, with the steps that
  client takes in the federation (rounds x local steps): the "why federate" baseline.
Both evaluate on the same held-out set after every round-equivalent of steps.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from common.config import DP_EPSILON_KEY, RunConfig
from common.data import (
    batches_forever, heldout_examples, partition_examples, validation_examples,
)
from common.dp import Accountant, PrivateTraining, check_budget, plan
from common.model import adapter_state, get_model, load_tokenizer
from common.objectives import build_objective
from common.runtime import setup_process
from common.train import evaluate, train_steps
from common.lr_control import EarlyStopping  # noqa: F401 - its old home; tests import it here
from server.app import RoundHook
from server.checkpoints import RunFolder, record_data_stats
from server.control import FederationStopped, RoundControl, report_early_stop
from server.strategies import RoundTraffic


class _NoWire:
    """Stands in for a strategy in RoundHook: one local 'client', nothing sent."""

    traffic: RoundTraffic | None = None


def refuse_federated_only(cfg: RunConfig) -> None:
    """ValueError (one line, key and fix) for a setting only a federation has."""
    if cfg.lr_plateau_reject:  # the undo is the server's (server/control.py); untested here
        raise ValueError("config 'lr-plateau-reject' works in federated runs only, not in "
                         "`fedtune train`: set --lr-plateau-reject false")
    if cfg.server_lr_candidates:  # one local "client": there is no aggregate to move along
        raise ValueError("config 'server-lr-search' works in federated runs only, not in "
                         "`fedtune train`: set --server-lr-search ''")
    if cfg.backend != "ray":
        raise ValueError(f"config 'backend' ({cfg.backend}) chooses `fedtune simulate`'s "
                         "engine; `fedtune train` runs no clients: drop --backend")
    if cfg.client_dp != "off":
        raise ValueError("'client-dp' protects clients of a federation; `fedtune train` has "
                         "one party: use --dp-sgd for DP training on the pooled data")


def run_centralized(cfg: RunConfig, *, partition_id: int | None = None) -> RunFolder:
    refuse_federated_only(cfg)
    setup_process(cfg.num_threads)
    run = RunFolder.create(cfg)
    record_data_stats(run)
    model, tokenizer = get_model(cfg), load_tokenizer(cfg.model)
    partitions = range(cfg.num_clients) if partition_id is None else [partition_id]
    examples = [e for p in partitions
                for e in partition_examples(cfg, p, cfg.num_clients, tokenizer)]
    steps_per_round = cfg.local_steps * (cfg.clients_per_round if partition_id is None else 1)
    total_steps = steps_per_round * cfg.num_server_rounds
    torch.manual_seed(cfg.seed)
    batches = batches_forever(examples, cfg.batch_size, tokenizer.pad_token_id,
                              torch.Generator().manual_seed(cfg.seed),
                              group_by_length=cfg.group_by_length)
    objective = build_objective(model, cfg)  # no proximal term: there is no global model
    # DP-SGD over the pooled data: one accountant for the whole run.
    private = None if not cfg.dp_sgd else PrivateTraining(
        plan(cfg, num_examples=len(examples), planned_steps=total_steps), Accountant(),
        examples, tokenizer.pad_token_id, torch.Generator().manual_seed(cfg.seed + 1),
        cfg.dp_grad_sample_mode)
    if private is not None:
        from common.dp import describe_plan, describe_settings

        print(f"fedtune: {describe_settings(cfg)}", flush=True)
        print("fedtune: " + describe_plan(private.plan, num_examples=len(examples),
                                          who="pooled data"), flush=True)
    wire = _NoWire()
    # Early stopping and lr-plateau watch their own validation split: choosing the
    # stopping round on the held-out split would leak it into training decisions.
    control = RoundControl(cfg, run, validation_examples(cfg, tokenizer) if cfg.uses_validation
                           else [], tokenizer.pad_token_id)
    hook = RoundHook(cfg, run, model, tokenizer, heldout_examples(cfg, cfg.num_clients, tokenizer),
                     wire, control=control)
    label = "centralized" if partition_id is None else f"local-only client {partition_id}"
    print(f"fedtune: {label}: {len(examples)} examples, {total_steps} steps, run folder {run.path}",
          flush=True)
    hook(0, ArrayRecord(adapter_state(model)))
    try:
        for server_round in range(1, cfg.num_server_rounds + 1):
            if private is not None:
                check_budget(private.accountant, private.plan, steps_per_round)
            stats = train_steps(model, batches, objective, cfg.replace(lr=control.lr),
                                num_steps=steps_per_round,
                                step_offset=(server_round - 1) * steps_per_round,
                                total_steps=total_steps, desc=f"round {server_round}",
                                private=private)
            client = {"round": server_round, "train-loss": stats.loss,
                      "num-examples": len(examples), "train-seconds": stats.seconds,
                      "partition-id": -1 if partition_id is None else partition_id}
            if private is not None:
                client[DP_EPSILON_KEY] = private.accountant.epsilon(private.plan.delta)
            wire.traffic = RoundTraffic(replies=1, clients=[client])
            hook(server_round, ArrayRecord(adapter_state(model)))  # raises at an early stop
    except FederationStopped as stop:
        report_early_stop(cfg, run, stop)
    return run
