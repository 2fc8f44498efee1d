"""ServerApp: initial adapter (or a resumed run's), strategy, and a per-round hook that
evaluates the global adapter on the held-out set, saves it with the server state, and
appends the metrics history."""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.config import DP_EPSILON_KEY, RunConfig
from common.data import heldout_examples, validation_examples
from common.lora_aggregation import set_residual
from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state
from common.runtime import all_cores, config_from_run_config, release_memory, setup_process
from common.train import evaluate
from server.privacy import client_level_epsilon
from server.sequential import SequentialGrid
from server.checkpoints import RunFolder, ServerState, check_resumable, record_data_stats
from server.control import FederationStopped, RoundControl, report_early_stop
from server.strategies import build_strategy
from server.summary import EVALUATION_OFF, finish_run
from server.tracking import TensorBoardLog

log = logging.getLogger("fedtune")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    # As many threads as a client and `fedtune train`: evaluation then costs the same
    # in both (bench/overhead.py), and a second torch thread stalls whenever another
    # process holds a core: 32 held-out examples took 14-34 s at 2 threads against 8 s
    # at 1 on a shared 2-core machine (docs/benchmarks.md, overhead).
    setup_process(cfg.num_threads)
    model, tokenizer = get_model(cfg), load_tokenizer(cfg.model)
    strategy = build_strategy(cfg)
    run, initial_arrays, done, best_loss = open_run(cfg, strategy, model)
    if cfg.backend == "sequential" and not isinstance(grid, SequentialGrid):
        run.log("fedtune: warning: 'backend' sequential applies to `fedtune simulate`; this "
                "run's clients run on its federation's engine")
    heldout = heldout_examples(cfg, cfg.num_clients, tokenizer)
    # lr-plateau and early stopping: the validation loss each round (server/control.py);
    # train_config is the record Strategy.start hands configure_train every round, so
    # the lr the control sets after round N reaches round N+1's clients.
    train_config = ConfigRecord()
    control = RoundControl(cfg, run, validation_examples(cfg, tokenizer) if cfg.uses_validation
                           else [], tokenizer.pad_token_id, train_config, resumed_round=done)
    # A resumed run runs only the rounds left; the strategy and the hook add `done`
    # to Flower's round numbers (server/resume.py explains why).
    hook = RoundHook(cfg, run, model, tokenizer, heldout, strategy,
                     resumed_round=done, best_loss=best_loss, control=control)
    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=cfg.num_server_rounds - done,
            timeout=cfg.round_timeout,
            train_config=train_config,
            evaluate_fn=hook,
        )
    except FederationStopped as stop:  # raised by the hook after the round was saved
        report_early_stop(cfg, run, stop)
    # The table, headline, try-it line and plots: the same for `fedtune simulate` and
    # `flwr run`, since both end here.
    finish_run(cfg, run.path, time.perf_counter() - hook.started)


def open_run(cfg: RunConfig, strategy, model) -> tuple[RunFolder, ArrayRecord, int, float]:
    """A new run folder and the initial adapter; or, with 'resume-from', the run's
    folder rewound to its last saved server state, the exact global arrays of that
    round, and the strategy's optimizer state and round offset restored.
    Returns (run, initial arrays, rounds done, best eval loss so far)."""
    if not cfg.resume_from:
        run = RunFolder.create(cfg)
        run.log(f"fedtune: run folder {run.path}")
        record_data_stats(run)
        return run, ArrayRecord(adapter_state(model)), 0, float("inf")
    run = RunFolder.reopen(cfg.resume_from)
    state = run.load_state()
    check_resumable(state, cfg, run.path)
    expected = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    if {k: tuple(v.shape) for k, v in state.arrays.items()} != expected:
        raise ValueError(f"cannot resume '{run.path}': its adapter tensors differ in names or "
                         "shapes from this model's LoRA adapter: start a new run")
    strategy.load_optimizer_state(state.optimizer)
    strategy.round_offset = state.server_round
    best_loss = run.rewind(state.server_round)
    run.write_config(cfg.replace(run_dir=str(run.path)))  # this segment's settings
    run.log(f"fedtune: resuming run folder {run.path} after round {state.server_round} "
            f"(rounds {state.server_round + 1}..{cfg.num_server_rounds})")
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.arrays.items()})
    return run, arrays, state.server_round, best_loss


class RoundHook:
    """Called by ``Strategy.start`` before round 1 and after every round."""

    def __init__(self, cfg: RunConfig, run: RunFolder, model, tokenizer, heldout, strategy, *,
                 resumed_round: int = 0, best_loss: float = float("inf"), control=None):
        self.cfg, self.run, self.model, self.strategy = cfg, run, model, strategy
        # server/control.py: lr-plateau, early stopping, server-lr-search (or None)
        self.control = control
        self.heldout, self.pad_id = heldout, tokenizer.pad_token_id
        self.offset, self.best_loss = resumed_round, best_loss
        history = run.history()  # a resumed run's seconds and MB go on from where they stopped
        self.started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
        # sent + received since round 1: the communication budget used
        self.total_bytes = int(history[-1].get("mb-total", 0) * 1e6) if history else 0
        self.tensorboard = TensorBoardLog(run.path) if cfg.tensorboard else None
        self.releases = 0  # aggregated rounds: the releases client-level DP accounts

    def evaluates(self, server_round: int) -> bool:
        """Whether round ``server_round`` is evaluated: never with evaluation off
        (eval-examples 0), else rounds 0, N, 2N, ... of eval-every N and the last."""
        return bool(self.heldout) and (server_round % self.cfg.eval_every == 0
                                       or server_round >= self.cfg.num_server_rounds)

    def _evaluate(self, server_round: int, arrays: ArrayRecord, row: dict) -> ArrayRecord:
        """Validation (lr control) and held-out columns into ``row``; returns the global
        adapter after this round: the step server-lr-search chose, or the last accepted
        one when lr-plateau-reject undoes the round; else ``arrays``."""
        if self.control is not None:  # validation loss, lr used and the next round's lr
            traffic = getattr(self.strategy, "traffic", None)
            if (server_round > 0 and self.cfg.server_lr_candidates and traffic is not None
                    and traffic.aggregated):
                # server-lr-search (server/control.py): a step along the round's update
                chosen, found = self.control.search_server_lr(
                    self.model, arrays, self.strategy.global_arrays)
                row.update(found)
                if chosen is not arrays:
                    arrays = self.strategy.next_arrays = chosen
            row.update(self.control.observe(self.model, server_round, row.get("val-loss")))
            # lr-plateau-reject (server/control.py): a round that was not better is undone
            kept = self.control.kept(arrays, rejected=bool(row.get("rejected-round")))
            if kept is not arrays:
                arrays = kept
                set_adapter_state(self.model, arrays.to_torch_state_dict())
                self.strategy.next_arrays = arrays
        if self.evaluates(server_round):  # evaluation off or a skipped round: no eval columns
            row.update(evaluate(self.model, self.heldout, batch_size=self.cfg.eval_batch_size,
                                pad_token_id=self.pad_id).row())
            release_memory()
        return arrays

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += self.offset
        if self.offset and server_round == self.offset:
            if self.control is not None:  # the saved arrays: the last accepted adapter
                self.control.kept(arrays, rejected=False)
            return None  # Flower's "round 0" of a resumed run: that round is in the history
        traffic = getattr(self.strategy, "traffic", None)
        if server_round > 0 and traffic is not None and not traffic.aggregated:
            # Nothing aggregated: the global adapter is the one this round started from.
            # Flower's loop hands back its own last aggregate, which is not that one after
            # the hook replaced it (server-lr-search, lr-plateau-reject: next_arrays), and
            # would send that again next round.
            started = getattr(self.strategy, "global_arrays", None)  # None: a stand-in
            if started is not None and started is not arrays:
                arrays = self.strategy.next_arrays = started
        set_adapter_state(self.model, arrays.to_torch_state_dict())
        # lora-aggregation exact: the residual folded into the frozen weights (else none)
        set_residual(self.model, getattr(self.strategy, "residual", {}))
        row: dict = {"round": server_round}
        with all_cores():  # the clients wait for this: the server may use every core
            arrays = self._evaluate(server_round, arrays, row)
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
                # server/lora_aggregation.py: naive averaging's error and the applied one
                **getattr(self.strategy, "aggregation_stats", {}),
            })
            self.releases += int(traffic.aggregated)
            row.update(privacy_columns(self.cfg, clients, traffic, server_round, self.releases))
            self.total_bytes += traffic.bytes_sent + traffic.bytes_received
            self.run.append_clients(clients)
            self.run.save_adapter(self.model, server_round)
            # round 0 (no training) and a round that aggregated nothing are never "best";
            # without evaluation no round is (no `best` link: nothing measured which is)
            if row.get("eval-loss", float("nan")) < self.best_loss and traffic.aggregated:
                self.best_loss = row["eval-loss"]
                self.run.mark_best(server_round)
        row["mb-total"] = round(self.total_bytes / 1e6, 3)
        row["seconds"] = round(time.perf_counter() - self.started, 2)
        self.run.append_history(row)
        if server_round > 0:  # last: the state file commits the round for --resume
            # `fedtune train` passes a stand-in strategy without a server optimizer
            optimizer_state = getattr(self.strategy, "optimizer_state", dict)
            self.run.save_state(ServerState(
                server_round=server_round, config=self.cfg.to_mapping(),
                arrays={k: a.numpy() for k, a in arrays.items()},
                optimizer=optimizer_state(),
                control=self.control.state_dict() if self.control is not None else {}))
        if self.tensorboard is not None:
            self.tensorboard.write(row, clients)
        self.run.log(format_row(row, eval_every=self.cfg.eval_every if self.heldout else 0))
        if self.control is not None:
            self.control.stop_if_done(server_round)  # raises FederationStopped
        return MetricRecord({k: float(v) for k, v in row.items() if k != "round"})


_SHORT_NAMES = {"eval-perplexity": "ppl", "eval-token-accuracy": "token acc",
               "eval-accuracy": "acc", "eval-macro-f1": "macro-F1"}


def privacy_columns(cfg: RunConfig, clients: list[dict], traffic, server_round: int,
                    releases: int) -> dict:
    """'epsilon': the largest sample-level (DP-SGD) epsilon a client reported so far;
    'client-epsilon': the client-level epsilon of the releases so far (local DP: one
    per round a client took part in, at most every round)."""
    row: dict = {}
    if cfg.dp_sgd:
        reported = [c[DP_EPSILON_KEY] for c in clients if DP_EPSILON_KEY in c]
        row["epsilon"] = max(reported) if reported else float("nan")
        row["dp-refused"] = traffic.dp_refused
    if cfg.client_dp != "off":
        row["client-epsilon"] = client_level_epsilon(
            cfg, server_round if cfg.client_dp == "local" else releases)
    return row


def format_row(row: dict, *, eval_every: int = 0) -> str:
    """The round's line; ``eval_every`` > 0: evaluation is on and a row without eval
    columns is a round that eval-every skipped (else evaluation is off)."""
    metrics = " | ".join(f"{short} {row[key]:8.2f}" if key == "eval-perplexity"
                         else f"{short} {row[key]:.3f}"
                         for key, short in _SHORT_NAMES.items() if key in row)
    evaluated = (f"eval loss {row['eval-loss']:7.4f} | {metrics}" if "eval-loss" in row
                 else f"not evaluated (eval-every {eval_every})" if eval_every
                 else EVALUATION_OFF)
    line = (f"fedtune | round {row['round']:>3} | train loss {row.get('train-loss', float('nan')):7.4f}"
            f" | {evaluated}"
            f" | sent {row.get('bytes-sent', 0) / 1e6:6.2f} MB"
            f" | recv {row.get('bytes-received', 0) / 1e6:6.2f} MB"
            f" | total {row.get('mb-total', 0):7.2f} MB | {row['seconds']:7.1f} s")
    if row.get("failures") or row.get("rejected"):
        line += f" | {row['failures']} failed, {row['rejected']} rejected"
    if row.get("aggregated") == 0:
        line += " | global adapter kept"
    if row.get("rejected-round"):
        line += " | round rejected (validation loss not better): previous global adapter kept"
    for key in ("epsilon", "client-epsilon"):
        if key in row:
            line += f" | {key} {row[key]:.2f}"
    if "lr" in row:
        line += f" | lr {row['lr']:.2e}"
    if "server-lr" in row:
        line += f" | server lr {row['server-lr']:g}"
    if row.get("dp-refused"):
        line += f" | {row['dp-refused']} over DP budget"
    return line
