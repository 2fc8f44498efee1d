"""Privacy against utility on the built-in demo: no DP, DP-SGD at epsilon 8 and 2
(delta 1e-5, per client, for the whole run), each with and without FFA-LoRA.

Each round runs the product's own pieces in one process: the strategy's
configure_train, the real ClientApp `train` handler (with each node's Flower Context,
so the accountant composes over rounds), the strategy's aggregate_train, and the
server's held-out evaluation. Ray is left out so six runs fit in minutes; what it
would add is the same for every row. Step time is the clients' own training time
(train-seconds) per optimizer step, the median over client-rounds, so the DP / non-DP
ratio compares like with like.

    python bench/privacy.py                  # short default (~25 min on 2 busy CPU cores)
    python bench/privacy.py --rounds 3 --local-steps 6 --eval-examples 96   # the demo's steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {  # name -> config changes
    "no DP": {},
    "no DP, FFA-LoRA": {"ffa_lora": True},
    "DP eps 8": {"dp_sgd": True, "dp_target_epsilon": 8.0},
    "DP eps 8, FFA-LoRA": {"dp_sgd": True, "dp_target_epsilon": 8.0, "ffa_lora": True},
    "DP eps 2": {"dp_sgd": True, "dp_target_epsilon": 2.0},
    "DP eps 2, FFA-LoRA": {"dp_sgd": True, "dp_target_epsilon": 2.0, "ffa_lora": True},
}


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def run_setting(cfg) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from client.app import train
    from common.data import heldout_examples
    from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state
    from common.train import evaluate
    from server.strategies import build_strategy

    model, tokenizer = get_model(cfg), load_tokenizer(cfg.model)
    initial = adapter_state(model)  # B = 0: the base model
    heldout = heldout_examples(cfg, cfg.num_clients, tokenizer)
    strategy = build_strategy(cfg)
    nodes = list(range(1, cfg.num_clients + 1))
    contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=cfg.to_mapping(),
                           node_config={"partition-id": n - 1, "num-partitions": cfg.num_clients})
                for n in nodes}
    arrays = ArrayRecord({k: v.clone() for k, v in initial.items()})
    rows, started = [], time.perf_counter()
    for server_round in range(1, cfg.num_server_rounds + 1):
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid(nodes)))
        replies = [train(m, contexts[m.metadata.dst_node_id]) for m in sent]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        metrics = [r.content["metrics"] for r in replies if not r.has_error()]
        set_adapter_state(model, arrays.to_torch_state_dict())
        stats = evaluate(model, heldout, batch_size=cfg.eval_batch_size,
                         pad_token_id=tokenizer.pad_token_id)
        rows.append({"round": server_round, "eval-loss": stats.loss,
                     "perplexity": stats.perplexity,
                     "train-seconds": sum(m["train-seconds"] for m in metrics),
                     "step-seconds": [m["train-seconds"] / cfg.local_steps for m in metrics],
                     "epsilon": max((m.get("dp-epsilon", 0.0) for m in metrics), default=0.0),
                     "noise": max((m.get("dp-noise-multiplier", 0.0) for m in metrics),
                                  default=0.0)})
    set_adapter_state(model, initial)  # the cached model starts the next setting clean
    base = evaluate(model, heldout, batch_size=cfg.eval_batch_size,
                    pad_token_id=tokenizer.pad_token_id)
    # the median client-round: robust to one-time costs and to other jobs' bursts
    return {"rows": rows, "base-loss": base.loss, "wall": time.perf_counter() - started,
            "step-seconds": statistics.median(s for r in rows for s in r["step-seconds"]),
            "adapter-values": sum(v.numel() for v in adapter_state(model).values())}


def interleaved_step_times(cfg, pairs: int) -> dict:
    """Plain and DP-SGD steps on the same batch of `batch-size` examples, alternated
    so that other jobs' load hits both alike; medians in seconds. This is the step-time
    ratio the target is about: the per-example gradients, clipping and noise."""
    from common.data import collate, partition_examples
    from common.dp import Accountant, DPPlan, PrivateTraining
    from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state
    from common.objectives import build_objective
    from common.train import train_steps

    import torch

    tokenizer = load_tokenizer(cfg.model)
    examples = partition_examples(cfg, 0, cfg.num_clients, tokenizer)[: cfg.batch_size]
    batch = collate(examples, tokenizer.pad_token_id)
    times: dict[str, list[float]] = {}
    for ffa in (False, True):
        model = get_model(cfg.replace(ffa_lora=ffa))
        start = adapter_state(model)
        dp = DPPlan(noise_multiplier=1.0, sample_rate=1.0, expected_batch_size=len(examples),
                    max_grad_norm=1.0, delta=1e-5, budget=0.0, planned_steps=pairs)
        for i in range(pairs + 1):  # the first pair warms up and is dropped
            for private in (None, PrivateTraining(dp, Accountant(), examples,
                                                  tokenizer.pad_token_id,
                                                  torch.Generator().manual_seed(i))):
                stats = train_steps(model, iter([batch]), build_objective(model, cfg), cfg,
                                    num_steps=1, private=private)
                key = ("DP" if private else "plain") + (" FFA" if ffa else "")
                if i:
                    times.setdefault(key, []).append(stats.seconds)
        set_adapter_state(model, start)
    return {k: statistics.median(v) for k, v in times.items()}


def write_report(results: dict, cfg, args, out: Path) -> None:
    plain = results["no DP"]["step-seconds"]
    plain_ffa = results["no DP, FFA-LoRA"]["step-seconds"]
    lines = [
        "# Privacy: held-out loss against epsilon on the built-in demo",
        "",
        "Measured by `" + " ".join(["python bench/privacy.py",
                                    *(a for a in args.argv if a != "--only-steps")]) + "`"
        + (" (the step-time table rerun alone with `--only-steps`)" if args.only_steps else "")
        + " on "
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores shared with other jobs (absolute times drift; the "
        "ratios are measured in the same run).",
        "",
        f"Settings: SmolLM2-135M-Instruct, LoRA r={cfg.lora_r} on all linear layers, "
        f"{cfg.num_clients} WordNet clients, {cfg.num_server_rounds} rounds x "
        f"{cfg.local_steps} local steps, batch {cfg.batch_size} (Poisson sampling under DP: "
        f"expected batch {cfg.batch_size}), lr {cfg.lr:g}, FedAvg; DP-SGD per example, clip "
        f"{cfg.dp_max_grad_norm:g}, delta {cfg.dp_delta:g}, each client's noise computed "
        "by Opacus for its own sampling rate to spend the budget over the run. Held-out "
        f"loss over {cfg.eval_examples} examples drawn before partitioning "
        f"(base model: {results['no DP']['base-loss']:.3f}).",
        "",
        "| setting | adapter values sent | noise multiplier | epsilon spent (max client) "
        "| held-out loss | perplexity | median step time (s) | step time / no-DP | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name == "interleaved":
            continue
        last = r["rows"][-1]
        baseline = plain_ffa if "FFA" in name else plain
        lines.append(
            f"| {name} | {r['adapter-values']:,} | {last['noise']:.2f} | "
            f"{last['epsilon']:.2f} | {last['eval-loss']:.3f} | {last['perplexity']:.2f} | "
            f"{r['step-seconds']:.2f} | {r['step-seconds'] / baseline:.2f}x | {r['wall']:.0f} |")
    steps = results["interleaved"]
    ratio, ratio_ffa = steps["DP"] / steps["plain"], steps["DP FFA"] / steps["plain FFA"]
    lines += [
        "",
        "The step times in the table come from runs one after another on a shared machine, "
        "so other jobs' load differs between rows. The ratio below is measured with plain "
        f"and DP-SGD steps alternated on one batch of {cfg.batch_size} examples, "
        f"{args.pairs} pairs after a warm-up, medians:",
        "",
        "| | plain step (s) | DP-SGD step (s) | DP / plain |",
        "|---|---|---|---|",
        f"| LoRA | {steps['plain']:.2f} | {steps['DP']:.2f} | **{ratio:.2f}x** |",
        f"| FFA-LoRA | {steps['plain FFA']:.2f} | {steps['DP FFA']:.2f} | {ratio_ffa:.2f}x |",
        "",
        f"Target: DP step time at most 1.5x non-DP: {'met' if ratio <= 1.5 else 'missed'} "
        f"({ratio:.2f}x).",
        "",
        "![held-out loss against epsilon](privacy.png)",
        "",
    ]
    (out / "privacy-bench.md").write_text("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ffa, marker in ((False, "o"), (True, "s")):
        names = [n for n in SETTINGS if ("FFA" in n) == ffa]
        # no DP is epsilon = infinity: drawn at the right edge
        eps = [results[n]["rows"][-1]["epsilon"] or 16.0 for n in names]
        loss = [results[n]["rows"][-1]["eval-loss"] for n in names]
        order = sorted(range(len(names)), key=lambda i: eps[i])
        ax.plot([eps[i] for i in order], [loss[i] for i in order], marker=marker,
                label="FFA-LoRA" if ffa else "LoRA")
    ax.axhline(results["no DP"]["base-loss"], color="grey", ls="--",
               label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 8, 16], ["2", "8", "no DP"])
    ax.set_xlabel("epsilon spent per client (delta 1e-5)")
    ax.set_ylabel("held-out loss (response tokens)")
    ax.set_title("Privacy vs utility, built-in demo")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=6,
                        help="plain/DP step pairs for the step-time ratio")
    parser.add_argument("--only-steps", action="store_true",
                        help="measure the step-time ratio and reuse runs/bench-privacy.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import RunConfig

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    torch.set_num_threads(1)  # as each simulated client does: 2 threads collapse on a busy machine
    cfg = RunConfig(num_server_rounds=args.rounds, local_steps=args.local_steps,
                    eval_examples=args.eval_examples)
    saved = ROOT / "runs" / "bench-privacy.json"
    results = json.loads(saved.read_text()) if args.only_steps and saved.exists() else {}
    for name, changes in SETTINGS.items():
        if name in results:
            continue
        results[name] = run_setting(cfg.replace(**changes))
        last = results[name]["rows"][-1]
        print(f"{name:20s} loss {last['eval-loss']:.3f} eps {last['epsilon']:.2f} "
              f"step {results[name]['step-seconds']:.2f} s", flush=True)
    saved.parent.mkdir(exist_ok=True)
    saved.write_text(json.dumps(results, indent=1))
    times = interleaved_step_times(cfg, args.pairs)
    print("interleaved step times:", times, flush=True)
    results = {**results, "interleaved": times}
    write_report(results, cfg, args, args.out)
    plot(results, args.out / "privacy.png")
    print(f"wrote {args.out / 'privacy-bench.md'} and {args.out / 'privacy.png'}")


if __name__ == "__main__":
    main()
