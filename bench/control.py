"""Adaptive learning rate, server optimizer tuning and regularization, each measured on
its own job (issue 16), on the built-in model in short runs a shared 2-core CPU allows.

Sections (each a list of runs; a finished run folder is reused, runs are deterministic):
- adaptive: FedAvg with the fixed cosine schedule vs lr-plateau (+ early stopping), the
  bold driver with its undo, and server-lr-search, at initial learning rates 3e-4, 1e-3
  and 3e-3: rounds to the fixed run's final loss, and the spread of the final loss
  across the 10x lr range.
- fedadam: FedAvg vs FedAdam at several server-eta on the same short run.
- regularization: few examples per client and many local steps, task held-out loss and
  forgetting (loss on docs/examples/chat.jsonl, arithmetic chat no client trains on,
  relative to the base model) for none, weight decay, LoRA dropout, L2-SP, FedProx,
  early stopping.

Every run is fedtune's ServerApp and ClientApp in one process (bench/inproc.py says
why); it writes docs/control.md and docs/control-*.png.

    python bench/control.py                      # every section (~3 h on a loaded 2-core VM)
    python bench/control.py --sections adaptive  # one section
    python bench/control.py --report-only        # the report from the runs done so far
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Two clients (noun.animal, noun.food) instead of the demo's four, batch 4, 64 tokens:
# a quarter of the demo's compute per round, which this machine can afford for ~35 runs.
COMMON = {"categories": "noun.animal,noun.food", "num-clients": 2, "batch-size": 4,
          "max-length": 64, "eval-examples": 24, "eval-batch-size": 24,
          "validation-examples": 24, "num-threads": 1}
# Fixed runs draw the same validation split as the adaptive ones (a patience no run
# reaches), so that every run trains on the same pool.
SAME_POOL = {"early-stopping-patience": 99}
ADAPTIVE = {"lr-plateau": True, "lr-schedule": "constant", "lr-plateau-patience": 0,
            "lr-plateau-factor": 0.5, "early-stopping-patience": 2}
# Bold driver (issue 16): the same controller that can also raise the rate, x2 after a
# round whose validation loss improved, and cut by torch's rule after one that did not
# (patience 0). No cap: a cap would be one more rate to know in advance. Two cuts:
# /2 undoes exactly one raise (the rate returns to the last one that improved); /4 is
# Battiti's (1989) balance, a cut larger than the raise (his x1.1 up, x0.5 down: the
# product 0.55; here 2 x 0.25 = 0.5), which lands below the last rate that improved.
BOLD = {**ADAPTIVE, "lr-plateau-increase": 2.0}
BOLD_4 = {**BOLD, "lr-plateau-factor": 0.25}
# Battiti's full rule (lr-plateau-reject): the same x2 /4 driver, and a round that was
# not better is undone (the next starts from the last accepted adapter). Early stopping
# stays at patience 2: with the undo the global adapter never gets worse, so a stop can
# only save the rounds after two undone rounds in a row.
BOLD_REJECT = {**BOLD_4, "lr-plateau-reject": True}
# server-lr-search: a constant client lr, and after each round the server moves the
# global adapter by s x the aggregated update for the s in {1, 2, 4} with the lowest
# validation loss (no early stopping: the same pool as the fixed runs).
SEARCH = {**SAME_POOL, "lr-schedule": "constant", "server-lr-search": "1,2,4"}
# The same with a half step too: at 3e-3 the search kept s 1 from round 2 on, and a
# constant rate that high oscillates where the cosine schedule decays.
SEARCH_HALF = {**SEARCH, "server-lr-search": "0.5,1,2,4"}
A_ROUNDS = {"num-server-rounds": 6, "local-steps": 2}
B_ROUNDS = {"num-server-rounds": 4, "local-steps": 2, "lr": 1e-3}
# Flower's beta1 (0.9), named: the runs below keep meaning it if fedtune's default moves
B_SERVER_09 = {**B_ROUNDS, "server-beta1": 0.9}
# Small data: 16 examples per client, 3 rounds x 4 local steps of batch 4 = 3 epochs.
C_BASE = {"num-server-rounds": 3, "local-steps": 4, "max-examples-per-client": 16,
          "lr": 3e-3, "lr-schedule": "constant", "lora-dropout": 0.0, "weight-decay": 0.0}

SECTIONS = {
    "adaptive": {
        "cosine lr 3e-4": {**A_ROUNDS, **SAME_POOL, "lr": 3e-4},
        # 1e-3: the demo's default lr, between the two
        "cosine lr 1e-3": {**A_ROUNDS, **SAME_POOL, "lr": 1e-3},
        "cosine lr 3e-3": {**A_ROUNDS, **SAME_POOL, "lr": 3e-3},
        "plateau lr 3e-4": {**A_ROUNDS, **ADAPTIVE, "lr": 3e-4},
        "plateau lr 1e-3": {**A_ROUNDS, **ADAPTIVE, "lr": 1e-3},
        "plateau lr 3e-3": {**A_ROUNDS, **ADAPTIVE, "lr": 3e-3},
        "bold driver x2 /4 reject lr 3e-4": {**A_ROUNDS, **BOLD_REJECT, "lr": 3e-4},
        "bold driver x2 /4 reject lr 1e-3": {**A_ROUNDS, **BOLD_REJECT, "lr": 1e-3},
        "bold driver x2 /4 reject lr 3e-3": {**A_ROUNDS, **BOLD_REJECT, "lr": 3e-3},
        "server-lr search lr 3e-4": {**A_ROUNDS, **SEARCH, "lr": 3e-4},
        "server-lr search lr 1e-3": {**A_ROUNDS, **SEARCH, "lr": 1e-3},
        "server-lr search lr 3e-3": {**A_ROUNDS, **SEARCH, "lr": 3e-3},
        "server-lr search with 0.5 lr 3e-4": {**A_ROUNDS, **SEARCH_HALF, "lr": 3e-4},
        "server-lr search with 0.5 lr 1e-3": {**A_ROUNDS, **SEARCH_HALF, "lr": 1e-3},
        "server-lr search with 0.5 lr 3e-3": {**A_ROUNDS, **SEARCH_HALF, "lr": 3e-3},
    },
    # eta 3e-3 (the old default) learned slower than FedAvg in docs/algorithms.md
    "fedadam": {
        "fedavg": {**B_ROUNDS},
        "fedadam eta 1e-2": {**B_SERVER_09, "strategy": "fedadam", "server-eta": 1e-2},
        "fedadam eta 2e-2": {**B_SERVER_09, "strategy": "fedadam", "server-eta": 2e-2},
        "fedadam eta 3e-2": {**B_SERVER_09, "strategy": "fedadam", "server-eta": 3e-2},
        # eta 2e-2 led FedAvg after round 3, then overshot: a smaller step, or a larger
        # tau (Flower's epsilon under the root: steps closer to eta x update / tau)
        "fedadam eta 1.5e-2": {**B_SERVER_09, "strategy": "fedadam", "server-eta": 1.5e-2},
        "fedadam eta 2e-2 tau 1e-2": {**B_SERVER_09, "strategy": "fedadam", "server-eta": 2e-2,
                                      "server-tau": 1e-2},
        # At tau 1e-3 the clients' updates (~1e-3 an entry after 2 AdamW steps) sit below
        # tau, so sqrt(v) barely matters: the step is ~eta/tau x momentum, FedAvgM with a
        # heavy (0.9) momentum that overshoots in round 4. Two ways out: no server
        # momentum (beta1 0), or a tau far below the updates, where the step is Adam's
        # per-entry normalized one (then eta is a per-entry step size, ~client lr x steps).
        "fedadam eta 1e-2 beta1 0": {**B_ROUNDS, "strategy": "fedadam", "server-eta": 1e-2,
                                     "server-beta1": 0.0},
        "fedadam eta 1.5e-2 beta1 0": {**B_ROUNDS, "strategy": "fedadam", "server-eta": 1.5e-2,
                                       "server-beta1": 0.0},
        "fedadam eta 1e-3 tau 1e-6": {**B_SERVER_09, "strategy": "fedadam", "server-eta": 1e-3,
                                      "server-tau": 1e-6},
        "fedadam eta 3e-3 tau 1e-6": {**B_SERVER_09, "strategy": "fedadam", "server-eta": 3e-3,
                                      "server-tau": 1e-6},
        # Control: at tau 1e-3 FedAdam with beta1 0 moves ~1.3 to 2x FedAvg's update
        # (eta sqrt(1 - beta2^(t+1)) / tau, sqrt(v) being ~1e-4 here): is it the longer
        # step or the per-entry scaling? FedAvgM without momentum at a server lr of 1.7.
        "fedavgm server-lr 1.7 momentum 0": {**B_ROUNDS, "strategy": "fedavgm",
                                             "server-lr": 1.7, "server-momentum": 0.0},
        # FedYogi shares server-beta1: the same pair, so its default is measured too
        "fedyogi eta 1e-2": {**B_SERVER_09, "strategy": "fedyogi", "server-eta": 1e-2},
        "fedyogi eta 1e-2 beta1 0": {**B_ROUNDS, "strategy": "fedyogi", "server-eta": 1e-2,
                                     "server-beta1": 0.0},
    },
    # Early stopping is read off the 'none' run (see EARLY_STOP): the same pool, the same
    # validation split, so a run with --early-stopping-patience 1 is that run cut short.
    "regularization": {
        "none": {**C_BASE, **SAME_POOL},
        "l2-sp 1.0": {**C_BASE, **SAME_POOL, "l2sp-weight": 1.0},
        "lora dropout 0.3": {**C_BASE, **SAME_POOL, "lora-dropout": 0.3},
        "fedprox mu 0.1": {**C_BASE, **SAME_POOL, "strategy": "fedprox", "proximal-mu": 0.1},
        "weight decay 1.0": {**C_BASE, **SAME_POOL, "weight-decay": 1.0},
        "l2-sp 0.1": {**C_BASE, **SAME_POOL, "l2sp-weight": 0.1},
    },
}
EARLY_STOP_PATIENCE = 1
FORGETTING_DATA = ROOT / "docs" / "examples" / "chat.jsonl"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run(out: Path, section: str, name: str) -> dict:
    """One run (or its saved result): history, early stop, forgetting, wall seconds."""
    folder = out / section / slug(name)
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    from bench.inproc import run_federation

    if folder.exists():  # an interrupted run: start it again
        import shutil

        shutil.rmtree(folder)
    started = time.perf_counter()
    cfg = run_federation({**COMMON, **SECTIONS[section][name], "run-dir": str(folder)})
    from bench.control_report import commit

    from bench.report import cpu_name
    from common.model import resolve_device, resolve_dtype

    # what 'auto' meant here (bf16 on a CPU with AMX / AVX-512 BF16, else float32): the
    # losses of runs in different dtypes do not compare
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device), dp_sgd=cfg.dp_sgd)
    result = {"name": name, "wall-seconds": time.perf_counter() - started, "commit": commit(),
              "dtype": dtype, "cpu": cpu_name(),
              "history": [json.loads(l) for l in (folder / "history.jsonl").read_text().splitlines()]}
    stop = folder / "early-stop.json"
    result["early-stop"] = json.loads(stop.read_text()) if stop.exists() else None
    if section == "regularization":
        result.update(forgetting(cfg, folder))
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def forgetting(cfg, folder: Path) -> dict:
    """Loss on general chat text that no client trains on, of the base model and of
    every round's global adapter (``general-loss`` is the last round's)."""
    from common.adapters import read_adapter_weights
    from common.config import RunConfig
    from common.data import heldout_examples
    from common.model import get_model, load_tokenizer, set_adapter_state
    from common.train import evaluate

    tokenizer = load_tokenizer(cfg.model)
    general_cfg = RunConfig(dataset=str(FORGETTING_DATA), categories="", partitioner="iid",
                            num_clients=2, eval_examples=32, max_length=cfg.max_length)
    general = heldout_examples(general_cfg, 2, tokenizer)
    model = get_model(cfg)

    def loss() -> float:
        return evaluate(model, general, batch_size=32, pad_token_id=tokenizer.pad_token_id).loss

    with model.disable_adapter():
        base = loss()
    per_round = {}
    for n in range(1, cfg.num_server_rounds + 1):
        set_adapter_state(model, read_adapter_weights(folder / "adapters" / f"round-{n}"))
        per_round[n] = loss()
    return {"general-loss": per_round[cfg.num_server_rounds], "general-loss-base": base,
            "general-loss-per-round": per_round}


def early_stopped(none: dict) -> dict:
    """The 'none' run as --early-stopping-patience EARLY_STOP_PATIENCE would have ended
    it: the rounds up to the stop (the same rule, common/lr_control.py)."""
    from common.lr_control import EarlyStopping

    history = none["history"]
    stopper = EarlyStopping(EARLY_STOP_PATIENCE, best=history[0]["val-loss"])
    stop = len(history) - 1
    for row in history[1:]:
        if stopper.update(row["val-loss"], row["round"]):
            stop = row["round"]
            break
    per_round = {int(k): v for k, v in none["general-loss-per-round"].items()}
    return {"name": f"early stopping (patience {EARLY_STOP_PATIENCE})",
            "history": history[:stop + 1], "general-loss": per_round[stop],
            "general-loss-base": none["general-loss-base"], "general-loss-per-round": per_round,
            "early-stop": {"stopped-after-round": stop} if stop < len(history) - 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-control")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, dict]] = {}
    for section in args.sections.split(","):
        results[section] = {}
        for name in SECTIONS[section]:
            done = args.out / section / slug(name) / "result.json"
            if args.report_only and not done.exists():
                continue
            results[section][name] = run(args.out, section, name)
            print(f"bench/control: {section} / {name} done", flush=True)
        if section == "regularization" and "none" in results[section]:
            derived = early_stopped(results[section]["none"])
            results[section][derived["name"]] = derived
    from bench.control_report import write_report

    write_report(results, args)


if __name__ == "__main__":
    main()
