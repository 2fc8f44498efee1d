"""A federation under faults: 10 simulated clients on the built-in demo, of which one
replies NaNs, one scales its update x1000 and one crashes every round, against a
clean run with the same settings. Writes docs/faults.md (table, machine, settings).

The faults come from the test hooks in client/faults.py (environment variables read
by the ClientApps); the run itself is the plain `fedtune simulate`.

    python bench/faults.py                    # short default (a few minutes on 2 CPU cores)
    python bench/faults.py --rounds 3 --local-steps 4 --eval-examples 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIENTS = 10
CORRUPT = {3: "nan", 7: "scale1000"}  # partition -> what its replies carry
CRASH = 5  # this partition raises in every round
REASONS = ("malformed", "names", "shape", "dtype", "non-finite", "num-examples", "norm")


def simulate(run_dir: Path, flags: list[str], faults: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0")
    env.pop("FEDTUNE_TEST_CORRUPT", None), env.pop("FEDTUNE_TEST_CRASH_PARTITION", None)
    if faults:
        env["FEDTUNE_TEST_CORRUPT"] = ",".join(f"{p}:{how}" for p, how in CORRUPT.items())
        env["FEDTUNE_TEST_CRASH_PARTITION"] = str(CRASH)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time: numbers are measured
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    with open(run_dir / "simulate.log", "w") as log:  # Flower and Ray talk a lot
        subprocess.run([sys.executable, "-m", "server.cli", "simulate", *flags,
                        "--run-dir", str(run_dir)], cwd=ROOT, env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]
    return {"history": history, "seconds": time.perf_counter() - started}


def summary(result: dict) -> dict:
    rounds = [r for r in result["history"] if r["round"] > 0]
    return {
        "rounds": sum(r.get("aggregated", 1) for r in rounds),
        "of": len(rounds),
        "failures": sum(r.get("failures", 0) for r in rounds),
        "accepted": [r.get("clients", 0) for r in rounds],
        "rejected": {why: sum(r.get(f"rejected-{why}", 0) for r in rounds) for why in REASONS},
        "loss": result["history"][-1]["eval-loss"],
        "base": result["history"][0]["eval-loss"],
        "seconds": result["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--max-examples-per-client", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a smaller model only checks this script, e.g. a test's tiny one")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-faults")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "faults.md")
    args = parser.parse_args()
    flags = ["--model", args.model, "--partitioner", "iid",
             "--categories", "noun.animal,noun.food,noun.plant,noun.body",
             "--num-clients", str(NUM_CLIENTS), "--num-server-rounds", str(args.rounds),
             "--local-steps", str(args.local_steps), "--eval-examples", str(args.eval_examples),
             "--max-examples-per-client", str(args.max_examples_per_client)]
    clean = summary(simulate(args.out / "clean", flags, faults=False))
    faulty = summary(simulate(args.out / "faulty", flags, faults=True))
    write_report(clean, faulty, args)


def _rejected(s: dict) -> str:
    counts = [f"{n} {why}" for why, n in s["rejected"].items() if n]
    return f"{sum(s['rejected'].values())}" + (f" ({', '.join(counts)})" if counts else "")


def write_report(clean: dict, faulty: dict, args) -> None:
    rows = [("clean", clean), ("2 corrupt + 1 crashing", faulty)]
    lines = [
        "# Faults: a federation with corrupt and crashing clients",
        "",
        f"Measured by `python bench/faults.py --rounds {args.rounds} --local-steps "
        f"{args.local_steps} --eval-examples {args.eval_examples} --max-examples-per-client "
        f"{args.max_examples_per_client}"
        + (f" --model {args.model}" if args.model != "smollm2-135m-instruct" else "")
        + f"` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, shared "
        f"with other jobs, so the times are rough), {time.strftime('%Y-%m-%d')}.",
        "",
        f"Setting: {args.model} + LoRA r=8, FedAvg, WordNet definitions of four "
        f"categories split IID over {NUM_CLIENTS} clients (at most "
        f"{args.max_examples_per_client} training examples each), {args.rounds} rounds x "
        f"{args.local_steps} local steps, held-out loss on {args.eval_examples} examples. "
        f"In the faulty run (test hooks in `client/faults.py`) partition 3 replies NaNs, "
        f"partition 7 sends its update x1000 and partition {CRASH} raises in every round; "
        "the server's defaults are unchanged (`max-update-norm-ratio` 10, "
        "`min-train-clients` 2). Base model held-out loss: "
        f"{clean['base']:.4f}.",
        "",
        "| run | rounds aggregated | updates averaged per round | failed replies | rejected replies (why) | final held-out loss | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in rows:
        lines.append(f"| {name} | {s['rounds']} of {s['of']} | {', '.join(map(str, s['accepted']))} "
                     f"| {s['failures']} | {_rejected(s)} "
                     f"| {s['loss']:.4f} | {s['seconds']:.0f} |")
    lines += [
        "",
        f"The faulty run ends {faulty['loss'] - clean['loss']:+.4f} from the clean run's "
        f"held-out loss ({faulty['loss'] / clean['loss'] - 1:+.2%}). Counts come from "
        "`history.jsonl` (`clients`, `failures`, `rejected-<reason>`); a NaN reply is "
        "rejected as `non-finite`, a x1000 update as `norm`, a crash is a failure. "
        "See [security.md](security.md) for what these checks do not catch.",
        "",
    ]
    args.report.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
