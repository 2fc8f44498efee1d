"""Scale: `fedtune simulate` with 10, 100 and 1000 virtual clients, 10 sampled per round.

Each run splits all of WordNet IID over N clients and samples 10 per round
(`--fraction-train 10/N --min-train-clients 10`); each client's partition is capped
at the same number of examples, so every round does the same work whatever N is, and
only the federation's bookkeeping could grow with N. Partitions are built on demand
(flwr-datasets shards lazily; a Ray actor tokenizes only the clients it serves and
caches 8). The script samples the memory of the whole process tree once a second
(the CLI, the simulation, Ray's raylet, GCS and workers) and reads seconds per round
from the run's history. Target: peak memory and seconds per round within 1.3x from 10
to 1000 clients. Writes the scale section of docs/benchmarks.md and
docs/benchmarks-scale.png.

    python bench/scale.py            # short default: 3 rounds x 10 clients x 2 steps per N (~12 min on 2 cores)
    python bench/scale.py --long     # 5 rounds x 10 clients x 4 steps, 128 examples per client
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import load_average, machine, plt, run_timed, today, write_section  # noqa: E402

SAMPLED = 10


def run(n: int, args) -> dict:
    run_dir = args.out / f"clients-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "server.cli", "simulate", "--num-clients", str(n),
           "--fraction-train", repr(SAMPLED / n), "--min-train-clients", str(SAMPLED),
           "--partitioner", "iid", "--categories", "", "--num-server-rounds", str(args.rounds),
           "--local-steps", str(args.local_steps), "--eval-examples", str(args.eval_examples),
           "--max-examples-per-client", str(args.examples), "--run-dir", str(run_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    _, wall, memory = run_timed(cmd, args.out / f"clients-{n}.log", env=env, sample_memory=True)
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]
    seconds = [b["seconds"] - a["seconds"] for a, b in zip(history, history[1:])]
    clients = [json.loads(l) for l in (run_dir / "clients.jsonl").read_text().splitlines()]
    return {"clients": n, "wall": wall, "round-seconds": seconds,
            "steady": statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0],
            "sampled": [r["clients"] for r in history[1:]],
            "distinct-partitions": len({c["partition-id"] for c in clients}), **memory}


def report(rows: list[dict], args, command: str, loads: tuple[str, str]) -> list[str]:
    base = rows[0]
    lines = [
        "## Scale: 10, 100 and 1000 virtual clients, 10 sampled per round", "",
        f"Measured by `{command}` on {machine()}, {today()}; load average {loads[0]} at "
        f"the start and {loads[1]} at the end (other engineers' jobs shared the 2 cores; "
        "the runs ran one after the other, so a change of load between them shows up "
        "in seconds per round).", "",
        f"Setting: default model and LoRA, all of WordNet split IID over N clients, "
        f"{SAMPLED} sampled per round, {args.rounds} rounds x {args.local_steps} local "
        f"steps of batch 8, each client's partition capped at {args.examples} examples "
        f"(equal work per round for every N), {args.eval_examples} held-out examples "
        "evaluated per round, 2 Ray actors of one thread each. Memory: the peak over "
        "one-second samples of the sum over the whole process tree (CLI, simulation "
        "process, Ray's daemons and actors); PSS splits shared pages between processes, "
        "RSS counts them in each. Round 1 includes the actors' cold start (imports, "
        "model load); steady = mean of rounds 2 on.", "",
        "| clients | sampled per round | distinct clients trained | peak PSS (MB) | vs 10 | peak RSS sum (MB) | largest process RSS (MB) | processes | round 1 (s) | steady s/round | vs 10 | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {', '.join(map(str, r['sampled']))} | {r['distinct-partitions']} "
            f"| {r['pss-mb']:.0f} | {r['pss-mb'] / base['pss-mb']:.2f} | {r['rss-mb']:.0f} "
            f"| {r['largest-process-rss-mb']:.0f} | {r['processes']} | {r['round-seconds'][0]:.1f} "
            f"| {r['steady']:.1f} | {r['steady'] / base['steady']:.2f} | {r['wall']:.0f} |")
    top = rows[-1]
    mem, sec = top["pss-mb"] / base["pss-mb"], top["steady"] / base["steady"]
    ok = lambda x: "met" if x <= 1.3 else f"NOT met, by {x - 1.3:.2f}"  # noqa: E731
    lines += [
        "",
        f"- From {base['clients']} to {top['clients']} clients: peak memory x{mem:.2f} "
        f"({ok(mem)}), seconds per round x{sec:.2f} ({ok(sec)}); target: at most 1.3.",
        "",
        "![Peak memory and seconds per round against the number of clients](benchmarks-scale.png)",
        "",
    ]
    return lines


def plot(rows: list[dict], path: Path) -> None:
    pyplot = plt()
    fig, (left, right) = pyplot.subplots(1, 2, figsize=(9, 3.5))
    ns = [r["clients"] for r in rows]
    left.plot(ns, [r["pss-mb"] for r in rows], "o-", label="PSS sum")
    left.plot(ns, [r["rss-mb"] for r in rows], "s--", label="RSS sum")
    left.set(xscale="log", xlabel="virtual clients (10 sampled per round)",
             ylabel="peak memory of the process tree (MB)", ylim=(0, None))
    left.legend()
    right.plot(ns, [r["steady"] for r in rows], "o-", label="steady (rounds 2+)")
    right.plot(ns, [r["round-seconds"][0] for r in rows], "s--", label="round 1 (cold start)")
    right.set(xscale="log", xlabel="virtual clients (10 sampled per round)",
              ylabel="seconds per round", ylim=(0, None))
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="5 rounds x 4 steps, 128 examples")
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--examples", type=int, default=None, help="cap per client")
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-scale")
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.long else 3)
    args.local_steps = args.local_steps or (4 if args.long else 2)
    args.examples = args.examples or (128 if args.long else 32)
    args.out.mkdir(parents=True, exist_ok=True)
    start_load = load_average()
    rows = []
    for n in (int(c) for c in args.clients.split(",")):
        rows.append(run(n, args))
        print({k: v for k, v in rows[-1].items()}, flush=True)
        # after each run: a later one that fails leaves the finished rows on disk
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    command = "python bench/scale.py" + (" --long" if args.long else "")
    lines = report(rows, args, command, (start_load, load_average()))
    write_section("scale", lines)
    plot(rows, ROOT / "docs" / "benchmarks-scale.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
