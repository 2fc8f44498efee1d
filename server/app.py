"""ServerApp: initial adapter, strategy, and a per-round hook that evaluates the
global adapter on the held-out set, saves it, and appends the metrics history."""

from __future__ import annotations

import logging
import os
import time

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.data import heldout_examples
from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state
from common.runtime import config_from_run_config, setup_process
from common.train import evaluate
from server.checkpoints import RunFolder
from server.strategies import build_strategy
from server.tracking import TensorBoardLog

log = logging.getLogger("fedtune")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    # Clients are idle while the server evaluates, so it may use every core.
    setup_process(os.cpu_count() or 1)
    run = RunFolder.create(cfg)
    model, tokenizer = get_model(cfg), load_tokenizer(cfg.model)
    heldout = heldout_examples(cfg, cfg.num_clients, tokenizer)
    strategy = build_strategy(cfg)
    run.log(f"fedtune: run folder {run.path}")
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(adapter_state(model)),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=RoundHook(cfg, run, model, tokenizer, heldout, strategy),
    )


class RoundHook:
    """Called by ``Strategy.start`` before round 1 and after every round."""

    def __init__(self, cfg: RunConfig, run: RunFolder, model, tokenizer, heldout, strategy):
        self.cfg, self.run, self.model, self.strategy = cfg, run, model, strategy
        self.heldout, self.pad_id = heldout, tokenizer.pad_token_id
        self.started = time.perf_counter()
        self.best_loss = float("inf")
        self.total_bytes = 0  # sent + received since round 1: the communication budget used
        self.tensorboard = TensorBoardLog(run.path) if cfg.tensorboard else None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter_state(self.model, arrays.to_torch_state_dict())
        stats = evaluate(self.model, self.heldout, batch_size=self.cfg.eval_batch_size,
                         pad_token_id=self.pad_id)
        row = {"round": server_round, **stats.row()}
        traffic, clients = getattr(self.strategy, "traffic", None), []
        if server_round > 0 and traffic is not None:
            clients = traffic.clients
            weights = sum(c.get("num-examples", 0) for c in clients) or 1
            row.update({
                "train-loss": sum(c["train-loss"] * c.get("num-examples", 0)
                                  for c in clients) / weights if clients else float("nan"),
                "clients": traffic.replies,
                "bytes-sent": traffic.bytes_sent,
                "bytes-received": traffic.bytes_received,
                # faults and attacks: error replies, rejected replies (per reason), and
                # whether the global adapter changed this round
                "failures": traffic.failures,
                "rejected": sum(traffic.rejected.values()),
                **{f"rejected-{reason}": n for reason, n in traffic.rejected.items()},
                "aggregated": int(traffic.aggregated),
            })
            self.total_bytes += traffic.bytes_sent + traffic.bytes_received
            self.run.append_clients(clients)
            self.run.save_adapter(self.model, server_round)
            if stats.loss < self.best_loss:  # round 0 (no training) is never "best"
                self.best_loss = stats.loss
                self.run.mark_best(server_round)
        row["mb-total"] = round(self.total_bytes / 1e6, 3)
        row["seconds"] = round(time.perf_counter() - self.started, 2)
        self.run.append_history(row)
        if self.tensorboard is not None:
            self.tensorboard.write(row, clients)
        self.run.log(format_row(row))
        return MetricRecord({k: float(v) for k, v in row.items() if k != "round"})


_SHORT_NAMES = {"eval-perplexity": "ppl", "eval-token-accuracy": "token acc",
               "eval-accuracy": "acc", "eval-macro-f1": "macro-F1"}


def format_row(row: dict) -> str:
    metrics = " | ".join(f"{short} {row[key]:8.2f}" if key == "eval-perplexity"
                         else f"{short} {row[key]:.3f}"
                         for key, short in _SHORT_NAMES.items() if key in row)
    line = (f"fedtune | round {row['round']:>3} | train loss {row.get('train-loss', float('nan')):7.4f}"
            f" | eval loss {row['eval-loss']:7.4f} | {metrics}"
            f" | sent {row.get('bytes-sent', 0) / 1e6:6.2f} MB"
            f" | recv {row.get('bytes-received', 0) / 1e6:6.2f} MB"
            f" | total {row.get('mb-total', 0):7.2f} MB | {row['seconds']:7.1f} s")
    if row.get("failures") or row.get("rejected"):
        line += f" | {row['failures']} failed, {row['rejected']} rejected"
    if row.get("aggregated") == 0:
        line += " | global adapter kept"
    return line
