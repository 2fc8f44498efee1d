"""Client side of DP: the client-level DP mod 'client-dp' asks for (Flower's), and
DP-SGD's accountant, kept in the node's Flower context so epsilon composes over the
whole run rather than restarting each round."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod

from common.config import RunConfig
from common.dp import Accountant, PrivateTraining, check_budget, plan
from common.runtime import config_from_run_config

ACCOUNTANT_KEY = "fedtune-dp-accountant"


def client_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Registered on train only: on evaluate replies (no arrays) Flower's DP mods
    return errors, which broke whole runs."""
    cfg = config_from_run_config(context.run_config)
    if cfg.client_dp == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if cfg.client_dp == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    if cfg.client_dp == "local":
        # Sensitivity = the clipping norm: add/remove-one adjacency, as Opacus accounts.
        local = LocalDpMod(cfg.client_dp_clipping_norm, cfg.client_dp_clipping_norm,
                           cfg.local_dp_epsilon, cfg.dp_delta)
        return local(msg, context, call_next)
    return call_next(msg, context)


def load_accountant(context: Context) -> Accountant:
    record = context.state.config_records.get(ACCOUNTANT_KEY)
    return Accountant.from_json(str(record["history"])) if record else Accountant()


def save_accountant(context: Context, accountant: Accountant) -> None:
    context.state.config_records[ACCOUNTANT_KEY] = ConfigRecord(
        {"history": accountant.to_json()})


def private_round(cfg: RunConfig, context: Context, examples: list[dict], pad_token_id: int,
                  seed: int) -> PrivateTraining | None:
    """This round's DP-SGD setup, or None without 'dp-sgd'. Raises
    ``common.dp.BudgetExhausted`` when the round would overspend the budget."""
    if not cfg.dp_sgd:
        return None
    accountant = load_accountant(context)
    dp = plan(cfg, num_examples=len(examples),
              planned_steps=cfg.num_server_rounds * cfg.local_steps)
    check_budget(accountant, dp, cfg.local_steps)
    return PrivateTraining(dp, accountant, examples, pad_token_id,
                           torch.Generator().manual_seed(seed), cfg.dp_grad_sample_mode)
