"""Compare fine-tuning algorithms on the built-in demo at equal total optimizer steps.

Runs, each through the `fedtune` CLI (the code path users run):
centralized (`fedtune train`), local-only (`fedtune train --partition-id i` for every
client), FedAvg, FedProx, FedAdam, FedAvg + L2-SP, FedAvg + a KL pull toward the untuned
base model (`--distill-teacher base`), and Reptile. Distillation proper, a fine-tuned
teacher and a smaller student, is bench/distill.py. Writes docs/algorithms.md (table) and docs/algorithms.png (held-out
loss per round, one line per algorithm), with the machine and settings stated.

    python bench/algorithms.py                 # short default (~30 min on 2 CPU cores)
    python bench/algorithms.py --rounds 5 --local-steps 10 --eval-examples 160
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALGORITHMS = {  # name -> (run folder, fedtune subcommand, extra flags)
    "centralized": ("centralized", "train", []),
    "fedavg": ("fedavg", "simulate", []),
    "fedprox (mu=0.01)": ("fedprox", "simulate", ["--strategy", "fedprox", "--proximal-mu", "0.01"]),
    "fedadam (eta=3e-3)": ("fedadam", "simulate", ["--strategy", "fedadam", "--server-eta", "0.003"]),
    "fedavg + l2-sp (0.01)": ("l2sp", "simulate", ["--l2sp-weight", "0.01"]),
    # The untuned base as "teacher" is a pull toward the pretrained model (a regularizer
    # like L2-SP), not distillation's use: docs/distillation.md has that (bench/distill.py).
    "fedavg + KL to the untuned base (a=0.5, T=2)": ("distill", "simulate", ["--distill-teacher", "base"]),
    "reptile (eps=0.5)": ("reptile", "simulate", ["--strategy", "reptile", "--reptile-epsilon", "0.5"]),
}


def run(out: Path, name: str, folder: str, command: str, flags: list[str],
        common: list[str]) -> dict:
    """One algorithm's run; a finished run folder is reused (the runs are deterministic)."""
    run_dir = out / folder
    if not (run_dir / "history.jsonl").exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "server.cli", command, *common, *flags,
                        "--run-dir", str(run_dir)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        (run_dir / "wall.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]
    return {"name": name, "history": history,
            "seconds": float((run_dir / "wall.txt").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-algorithms")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common = ["--num-server-rounds", str(args.rounds), "--local-steps", str(args.local_steps),
              "--eval-examples", str(args.eval_examples)]
    results = [run(args.out, name, *spec, common) for name, spec in ALGORITHMS.items()]
    local = [run(args.out, f"local-only client {i}", f"local-only-{i}", "train",
                 ["--partition-id", str(i)], common) for i in range(4)]
    write_report(results, local, args)


def write_report(results: list[dict], local: list[dict], args) -> None:
    final = {r["name"]: r["history"][-1]["eval-loss"] for r in results}
    local_final = [r["history"][-1]["eval-loss"] for r in local]
    local_mean = sum(local_final) / len(local_final)
    base = results[0]["history"][0]["eval-loss"]
    lines = [
        "# Algorithms compared on the built-in demo",
        "",
        f"Measured by `python bench/algorithms.py --rounds {args.rounds} --local-steps "
        f"{args.local_steps} --eval-examples {args.eval_examples}` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}), "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Setting: SmolLM2-135M-Instruct + LoRA r=8, WordNet definitions split naturally "
        f"into 4 non-IID clients (noun.animal, noun.body, noun.food, noun.plant), "
        f"{args.rounds} rounds x 4 clients x {args.local_steps} local steps = "
        f"{args.rounds * 4 * args.local_steps} optimizer steps in total for every "
        f"federated run and for centralized; local-only trains one client's data for "
        f"{args.rounds * args.local_steps} steps (what that client does in the federation). "
        f"Held-out: {args.eval_examples} examples of the four categories, loss over "
        "response tokens. Base model held-out loss: "
        f"{base:.4f}.",
        "",
        "| algorithm | final held-out loss | perplexity | vs centralized | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    central = final["centralized"]
    for r in results:
        loss = final[r["name"]]
        lines.append(f"| {r['name']} | {loss:.4f} | {r['history'][-1]['eval-perplexity']:.2f} "
                     f"| {loss / central - 1:+.1%} | {r['seconds']:.0f} |")
    for i, r in enumerate(local):
        lines.append(f"| local-only client {i} | {local_final[i]:.4f} | "
                     f"{r['history'][-1]['eval-perplexity']:.2f} | {local_final[i] / central - 1:+.1%} "
                     f"| {r['seconds']:.0f} |")
    lines.append(f"| local-only, mean of 4 | {local_mean:.4f} | | {local_mean / central - 1:+.1%} | |")
    fedavg = final["fedavg"]
    verdict = (f"FedAvg ends {fedavg / central - 1:+.1%} from centralized on held-out loss "
               f"(target: within 10%) and {fedavg / local_mean - 1:+.1%} from the mean "
               f"local-only client (target: better, i.e. negative).")
    lines += ["", verdict, "", "![held-out loss per round](algorithms.png)", ""]
    (ROOT / "docs" / "algorithms.md").write_text("\n".join(lines))
    plot(results, local, ROOT / "docs" / "algorithms.png")
    print("\n".join(lines))


def plot(results, local, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        rounds = [h["round"] for h in r["history"]]
        ax.plot(rounds, [h["eval-loss"] for h in r["history"]], marker="o", label=r["name"])
    mean = [sum(r["history"][i]["eval-loss"] for r in local) / len(local)
            for i in range(len(local[0]["history"]))]
    ax.plot(range(len(mean)), mean, linestyle="--", color="grey", label="local-only (mean of 4)")
    ax.set_xlabel("round (centralized / local-only: the same number of steps)")
    ax.set_ylabel("held-out loss (response tokens)")
    ax.set_title("Algorithms on the built-in demo, equal total steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
