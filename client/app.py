"""ClientApp: a Flower message in, local LoRA training with ``common``, a reply out."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import (
    ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, PROXIMAL_MU_KEY,
    SERVER_ROUND_KEY, TRANSPORT_DTYPE_KEY, RunConfig,
)
from common.data import batches_forever, partition_examples
from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state
from common.objectives import build_objective
from common.runtime import config_from_run_config, setup_process
from common.train import evaluate as evaluate_model
from common.train import train_steps
from client.faults import corrupt_if_asked, crash_if_asked
from common.transport import decode_state, encode_state

app = ClientApp()


def _partition(context: Context, cfg: RunConfig) -> tuple[int, int]:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError(
            "node-config lacks 'partition-id': start the SuperNode with "
            "--node-config \"partition-id=0 num-partitions=N\""
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


def _prepare(msg: Message, context: Context):
    cfg = config_from_run_config(context.run_config)
    setup_process(cfg.num_threads)
    model, tokenizer = get_model(cfg), load_tokenizer(cfg.model)  # cached per process
    # Decoded to float32; loading casts to the model's dtype, which training uses.
    set_adapter_state(model, _global_state(msg))
    partition_id, num_partitions = _partition(context, cfg)
    examples = partition_examples(cfg, partition_id, num_partitions, tokenizer)
    return cfg, model, tokenizer, partition_id, examples


@app.train()
def train(msg: Message, context: Context) -> Message:
    # 1. Config, cached model, the global adapter from the message, this node's data.
    cfg, model, tokenizer, partition_id, examples = _prepare(msg, context)
    crash_if_asked(partition_id)  # test hook (client/faults.py); no-op unless asked
    config = msg.content[CONFIG_KEY]
    server_round = int(config[SERVER_ROUND_KEY])
    # 2. Seeds per (run, round, client): reproducible, different across clients.
    seed = cfg.seed * 1_000_003 + server_round * 1_009 + partition_id
    torch.manual_seed(seed)  # LoRA dropout
    batches = batches_forever(examples, cfg.batch_size, tokenizer.pad_token_id,
                              torch.Generator().manual_seed(seed),
                              group_by_length=cfg.group_by_length)
    # 3. The one loop. The objective adds FedProx's term (if the strategy sent mu),
    #    L2-SP and distillation (from the config) to the task loss.
    objective = build_objective(model, cfg, proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)))
    stats = train_steps(model, batches, objective, cfg, num_steps=cfg.local_steps,
                        step_offset=(server_round - 1) * cfg.local_steps,
                        desc=f"client {partition_id} round {server_round}")
    # 4. Reply: adapter tensors only, cast to the precision the server sent them in,
    #    and metrics (num-examples weights FedAvg).
    metrics = MetricRecord({
        "train-loss": stats.loss,
        "train-seconds": stats.seconds,
        "train-tokens": stats.tokens,
        "partition-id": partition_id,
        NUM_EXAMPLES_KEY: len(examples),
    })
    state = corrupt_if_asked(partition_id, adapter_state(model), _global_state(msg))
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
