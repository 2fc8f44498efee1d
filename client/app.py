"""ClientApp: a Flower message in, local LoRA training with ``common``, a reply out."""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from common.config import (
    ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, PROXIMAL_MU_KEY, ROUND_LR_KEY,
    SERVER_ROUND_KEY, TRANSPORT_DTYPE_KEY, UNIT_WEIGHT_KEY, DP_EPSILON_KEY, RunConfig,
)
from common.dp import DP_REFUSAL_CODE, BudgetExhausted
from common.data import batches_forever, partition_examples
from common.node_data import local_examples
from common.lora_aggregation import (
    LORA_RESIDUAL_KEY, TRAIN_FACTOR_KEY, lora_rank, set_residual, set_trained_factor,
    truncate_to_rank,
)
from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state
from common.objectives import build_objective
from common.runtime import config_from_run_config, release_memory, setup_process
from common.train import evaluate as evaluate_model
from common.train import train_steps
from client.faults import corrupt_if_asked, crash_if_asked
from common.transport import decode_state, encode_state
from client.privacy import client_dp_mod, private_round, save_accountant

app = ClientApp()
DATA_PATH_KEY = "data-path"  # node-config: this node's own data folder (docs/deployment.md)


def _partition(context: Context, cfg: RunConfig) -> tuple[int, int]:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError(
            "node-config lacks 'partition-id': start the SuperNode with "
            "--node-config \"partition-id=0 num-partitions=N\" (a partition of the "
            "run's dataset) or --node-config \"data-path='/data'\" (its own data)"
        )
    return int(node["partition-id"]), int(node.get("num-partitions", cfg.num_clients))


def _transport_dtype(msg: Message) -> str:
    """The precision the server sent the arrays in (Flower's evaluate messages: float32)."""
    config = msg.content.config_records.get(CONFIG_KEY, {})
    return str(config.get(TRANSPORT_DTYPE_KEY, "float32"))


def _global_state(msg: Message) -> dict:
    """The global adapter this message carries, decoded to float32 tensors."""
    arrays = {name: array.numpy() for name, array in msg.content[ARRAYS_KEY].items()}
    return decode_state(arrays, _transport_dtype(msg))


def _client_rank(context: Context, cfg: RunConfig) -> int:
    """This node's LoRA rank: node-config 'lora-r', else its entry of 'client-lora-ranks',
    else the global 'lora-r' (docs/aggregation.md, heterogeneous ranks)."""
    node = context.node_config
    if "lora-r" in node:
        return int(node["lora-r"])
    ranks = cfg.client_rank_list
    return ranks[int(node["partition-id"])] if ranks and "partition-id" in node else cfg.lora_r


def _prepare(msg: Message, context: Context):
    cfg = config_from_run_config(context.run_config)
    setup_process(cfg.num_threads)
    rank = _client_rank(context, cfg)
    # a lower rank is its own cached model, at the global scaling alpha / R (its alpha is
    # alpha * r / R: common/lora_aggregation.py truncate_to_rank says why); the global
    # adapter is truncated to it
    local_cfg = cfg if rank == cfg.lora_r else cfg.replace(
        lora_r=rank, lora_alpha=cfg.lora_alpha * rank / cfg.lora_r, client_lora_ranks="")
    model, tokenizer = get_model(local_cfg), load_tokenizer(cfg.model)  # cached per process
    # Decoded to float32; loading casts to the model's dtype, which training uses.
    state = _global_state(msg)
    if rank != cfg.lora_r and lora_rank(state) != rank:  # the server may send our rank already
        state = truncate_to_rank(state, rank=rank, global_rank=cfg.lora_r)
    set_adapter_state(model, state)
    # lora-aggregation exact: the server's residual joins the frozen weights (or none)
    residual = msg.content.array_records.get(LORA_RESIDUAL_KEY)
    set_residual(model, residual.to_torch_state_dict() if residual is not None else {})
    partition_id, examples = _examples(context, cfg, tokenizer)
    return cfg, model, tokenizer, partition_id, examples


def _examples(context: Context, cfg: RunConfig, tokenizer) -> tuple[int, list[dict]]:
    """This node's training examples and its id for seeds and metrics: its own files
    with node-config 'data-path' (a real deployment), else a partition of 'dataset'."""
    node = context.node_config
    if DATA_PATH_KEY in node:
        # Seeds differ across clients by partition-id if set, else by Flower's node id.
        client_id = int(node.get("partition-id", context.node_id % 1_000_003))
        return client_id, local_examples(cfg, str(node[DATA_PATH_KEY]), tokenizer)
    partition_id, num_partitions = _partition(context, cfg)
    return partition_id, partition_examples(cfg, partition_id, num_partitions, tokenizer)


@app.train(mods=[client_dp_mod])
def train(msg: Message, context: Context) -> Message:
    # 1. Config, cached model, the global adapter from the message, this node's data.
    cfg, model, tokenizer, partition_id, examples = _prepare(msg, context)
    crash_if_asked(partition_id)  # test hook (client/faults.py); no-op unless asked
    config = msg.content[CONFIG_KEY]
    server_round = int(config[SERVER_ROUND_KEY])
    if ROUND_LR_KEY in config:  # lr-plateau: the server's current peak lr scales the schedule
        cfg = cfg.replace(lr=float(config[ROUND_LR_KEY]))
    # 2. Seeds per (run, round, client): reproducible, different across clients.
    seed = cfg.seed * 1_000_003 + server_round * 1_009 + partition_id
    torch.manual_seed(seed)  # LoRA dropout
    batches = batches_forever(examples, cfg.batch_size, tokenizer.pad_token_id,
                              torch.Generator().manual_seed(seed),
                              group_by_length=cfg.group_by_length)
    #    DP-SGD: this node's accountant (from its context), or a refusal if the round
    #    would overspend its budget; the run goes on with the other clients.
    try:
        private = private_round(cfg, context, examples, tokenizer.pad_token_id, seed)
    except BudgetExhausted as err:
        log(WARNING, "client %d: %s", partition_id, err)
        return Message(error=Error(code=DP_REFUSAL_CODE, reason=str(err)), reply_to=msg)
    # 3. The one loop. The objective adds FedProx's term (if the strategy sent mu),
    #    L2-SP and distillation (from the config) to the task loss.
    #    lora-aggregation alternating: only the factor the server names trains.
    set_trained_factor(model, config.get(TRAIN_FACTOR_KEY))
    objective = build_objective(model, cfg, proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)))
    try:
        stats = train_steps(model, batches, objective, cfg, num_steps=cfg.local_steps,
                            step_offset=(server_round - 1) * cfg.local_steps,
                            desc=f"client {partition_id} round {server_round}", private=private)
    finally:
        set_trained_factor(model, None)  # the cached model is shared: leave it as loaded
    # 4. Reply: adapter tensors only, cast to the precision the server sent them in,
    #    and metrics (num-examples weights FedAvg).
    metrics = MetricRecord({
        "train-loss": stats.loss,
        "train-seconds": stats.seconds,
        "train-tokens": stats.tokens,
        "partition-id": partition_id,
        NUM_EXAMPLES_KEY: len(examples),
        UNIT_WEIGHT_KEY: 1,  # client-level DP averages unweighted (server/privacy.py)
        "lora-r": _client_rank(context, cfg),  # heterogeneous ranks: what this client trained
    })
    if private is not None:
        save_accountant(context, private.accountant)
        metrics[DP_EPSILON_KEY] = private.accountant.epsilon(private.plan.delta)
        metrics["dp-noise-multiplier"] = private.plan.noise_multiplier
        metrics["dp-steps"] = private.accountant.steps
    release_memory()  # this process serves other clients next: give back the step's peak
    # A lower rank replies at its own rank: the server pads it (server/lora_aggregation.py)
    state = adapter_state(model)
    state = corrupt_if_asked(partition_id, state, _global_state(msg))
    wire = encode_state(state, _transport_dtype(msg))
    arrays = ArrayRecord({name: Array(array) for name, array in wire.items()})
    content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global adapter on (part of) this node's data."""
    cfg, model, tokenizer, partition_id, examples = _prepare(msg, context)
    stats = evaluate_model(model, examples[: cfg.eval_examples],
                           batch_size=cfg.eval_batch_size, pad_token_id=tokenizer.pad_token_id)
    metrics = MetricRecord({**stats.row(), NUM_EXAMPLES_KEY: min(len(examples), cfg.eval_examples)})
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)
