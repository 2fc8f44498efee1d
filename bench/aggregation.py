"""Naive vs exact LoRA aggregation on the built-in demo: error, held-out loss, bytes.

Runs fedtune's ServerApp and ClientApp in this process (`bench/inproc.py`: the code
`fedtune simulate` runs, without Ray's start-up and per-actor model loads) on the
built-in model and WordNet: the natural non-IID split (4 clients, one category each)
and an IID control, once per `--lora-aggregation` mode at equal rounds and local steps;
then naive averaging alone for one round at 1, 6 and 20 local steps (its aggregation
error against client drift); with `--hetero`, heterogeneous ranks. Writes
docs/aggregation.md and docs/aggregation.png with the settings it ran.

    nice -n 10 python bench/aggregation.py --hetero   # 2 rounds: 7 runs + a 3-run sweep + 3
    nice -n 10 python bench/aggregation.py --long     # 5 rounds, 96 eval examples

One 2-round run takes about 4 minutes on one thread of a shared 2-core machine;
finished run folders are reused, so an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import load_average, machine, today  # noqa: E402

MODES = ("naive", "exact", "svd", "alternating")
# name: (run folder prefix, overrides). The third is the non-IID split with 20 local
# steps, where naive averaging's error is ten times larger (the sweep below).
SPLITS = {"non-IID (natural)": ("natural", {}), "IID": ("iid", {"partitioner": "iid"}),
          "non-IID, 20 steps": ("natural-20steps", {"local-steps": 20})}
SHORT = dict(rounds=2, local_steps=6, eval_examples=32, sweep=(1, 6, 20), sweep_batch=4,
             split_modes={"non-IID (natural)": MODES, "IID": MODES, "non-IID, 20 steps": MODES})
LONG = dict(rounds=5, local_steps=6, eval_examples=96, sweep=(1, 6, 20), sweep_batch=8,
            split_modes={"non-IID (natural)": MODES, "IID": MODES, "non-IID, 20 steps": MODES})


def simulate(run_dir: Path, overrides: dict) -> dict:
    """One run in this process; a finished run folder is reused (the runs are deterministic)."""
    from bench.inproc import run_federation

    if not (run_dir / "wall.txt").exists():
        started = time.perf_counter()
        run_federation({**overrides, "run-dir": str(run_dir), "num-threads": 1})
        (run_dir / "wall.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    clients = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    return {"history": rows, "clients": clients,
            "seconds": float((run_dir / "wall.txt").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="the full protocol (hours on 2 CPU cores)")
    parser.add_argument("--hetero", action="store_true",
                        help="also heterogeneous ranks: ranks 4,8,16,16 vs all 16 vs all 4 (svd)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-aggregation")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = LONG if args.long else SHORT
    out = args.out / ("long" if args.long else "short")
    common = {"local-steps": p["local_steps"], "eval-examples": p["eval_examples"],
              "num-server-rounds": p["rounds"]}
    runs = {}
    for split, (prefix, flags) in SPLITS.items():
        for mode in p["split_modes"][split]:
            runs[(split, mode)] = simulate(out / f"{prefix}-{mode}",
                                           {**common, **flags, "lora-aggregation": mode})
    sweep = {}
    for steps in p["sweep"]:  # one round each: only the first aggregation's error matters
        sweep[steps] = simulate(out / f"sweep-steps-{steps}",
                                {"local-steps": steps, "eval-examples": 8,
                                 "batch-size": p["sweep_batch"], "num-server-rounds": 1})
    seeds = {}  # a second seed where the modes' gap is measured (non-IID, 20 steps)
    if not args.long:
        for mode in ("naive", "svd"):
            seeds[mode] = simulate(out / f"seed1-natural-20steps-{mode}",
                                   {**common, "local-steps": 20, "seed": 1, "lora-aggregation": mode})
    hetero = {}
    if args.hetero:  # non-IID, svd mode; alpha = 2 x rank everywhere (the default's ratio)
        for name, flags in (("ranks 4,8,16,16", {"lora-r": 16, "lora-alpha": 32,
                                                 "client-lora-ranks": "4,8,16,16"}),
                            ("all 16", {"lora-r": 16, "lora-alpha": 32}),
                            ("all 4", {"lora-r": 4, "lora-alpha": 8})):
            hetero[name] = simulate(out / f"hetero-{name.replace(' ', '').replace(',', '-')}",
                                    {**common, **flags, "lora-aggregation": "svd"})
    write_report(runs, sweep, p, args, hetero, seeds)


def _mb(row: dict) -> float:
    return (row.get("bytes-sent", 0) + row.get("bytes-received", 0)) / 1e6


def write_report(runs: dict, sweep: dict, p: dict, args, hetero: dict, seeds: dict) -> None:
    command = "python bench/aggregation.py" + (" --long" if args.long else "") + (
        " --hetero" if args.hetero else "")
    lines = [
        "# LoRA aggregation: naive vs exact",
        "",
        f"Measured by `nice -n 10 {command}` on {machine()}, a shared machine loaded by other "
        f"jobs (1-min load average {load_average()} at the end), {today()}, one torch thread, "
        "fedtune's ServerApp and ClientApp in one process (`bench/inproc.py`), dtype auto "
        "(bf16 base weights, float32 LoRA weights). Wall times are not comparable across "
        "runs; losses, errors and bytes are deterministic.",
        "",
        f"Setting: SmolLM2-135M-Instruct + LoRA r=8 (all linear layers), WordNet definitions, "
        f"4 clients, {p['rounds']} rounds x {p['local_steps']} local steps, FedAvg weights "
        f"(examples), held-out {p['eval_examples']} examples (loss over response tokens). "
        "Non-IID: the natural split, one lexicographer category per client; IID: the same "
        "records shuffled into 4 parts; 'non-IID, 20 steps': the natural split with 20 local "
        "steps per round instead (more client drift).",
        "",
        "Columns: *agg error* = ||mean(B_i A_i) - mean(B) mean(A)||_F / ||mean(B_i A_i)||_F, "
        "the mean over adapted layers of what naive averaging loses (measured in every mode); "
        "*applied error* = the same for the aggregate the mode applied (svd: the truncation "
        "error; exact: float rounding; alternating: the replies' own error, 0 when every "
        "client kept the frozen factor); *MB/round* = train messages sent + received, as "
        "serialized, mean over rounds.",
        "",
        "| split | mode | final held-out loss | agg error (mean / max, last round) "
        "| applied error (last round) | MB/round | bytes vs naive |",
        "|---|---|---|---|---|---|---|",
    ]
    for (split, mode), run in runs.items():
        h = run["history"]
        last = h[-1]
        mb = sum(_mb(r) for r in h[1:]) / max(len(h) - 1, 1)
        naive_mb = sum(_mb(r) for r in runs[(split, "naive")]["history"][1:]) / max(len(h) - 1, 1)
        lines.append(f"| {split} | {mode} | {last['eval-loss']:.4f} | "
                     f"{last.get('agg-error-mean', float('nan')):.3f} / "
                     f"{last.get('agg-error-max', float('nan')):.3f} | "
                     f"{last.get('applied-error-mean', float('nan')):.2e} | {mb:.2f} | "
                     f"{mb / naive_mb:.2f}x |")
    lines += ["", "Held-out loss per round:", "", "| split | mode | " +
              " | ".join(f"round {r['round']}" for r in next(iter(runs.values()))["history"]) + " |",
              "|---|---|" + "---|" * len(next(iter(runs.values()))["history"])]
    for (split, mode), run in runs.items():
        lines.append(f"| {split} | {mode} | " +
                     " | ".join(f"{r['eval-loss']:.4f}" for r in run["history"]) + " |")
    lines += ["", f"Naive averaging's error after one round vs local steps (non-IID, batch "
              f"size {p['sweep_batch']}; each run is one round, so the LR schedule has the same "
              "shape at every step count):", "",
              "| local steps | agg error mean | agg error max |", "|---|---|---|"]
    for steps, run in sweep.items():
        row = run["history"][-1]
        lines.append(f"| {steps} | {row['agg-error-mean']:.4f} | {row['agg-error-max']:.4f} |")
    if seeds:
        lines += ["", "Non-IID, 20 steps, seed 1 (LoRA init, data order), the same protocol:", "",
                  "| mode | round 0 | round 1 | round 2 |", "|---|---|---|---|"]
        for mode, run in seeds.items():
            lines.append(f"| {mode} | " + " | ".join(f"{r['eval-loss']:.4f}" for r in run["history"]) + " |")
    if hetero:
        lines += ["", "Heterogeneous ranks (non-IID, svd, lora-alpha 2 x rank: the scaling "
                  "alpha / rank is 2 in every run and every client; MB total = all train "
                  "messages, sent + received, summed over rounds):", "",
                  "| clients' ranks | final held-out loss | vs all 16 | MB total | each client's MB "
                  "in the last round (rank: sent + received) |", "|---|---|---|---|---|"]
        ref = hetero["all 16"]["history"][-1]["eval-loss"]
        for name, run in hetero.items():
            loss = run["history"][-1]["eval-loss"]
            total = sum(_mb(r) for r in run["history"][1:])
            last = max(c["round"] for c in run["clients"])
            per = sorted((c["partition-id"], c["lora-r"], _mb(c)) for c in run["clients"]
                         if c["round"] == last)
            lines.append(f"| {name} | {loss:.4f} | {loss / ref - 1:+.1%} | {total:.1f} | " +
                         ", ".join(f"r{r}: {mb:.1f}" for _, r, mb in per) + " |")
    lines += ["", "![aggregation error and held-out loss per round](aggregation.png)", ""]
    doc = ROOT / "docs" / "aggregation.md"
    text = doc.read_text() if doc.exists() else ""
    start, end = "<!-- bench:aggregation -->", "<!-- end:aggregation -->"
    block = "\n".join([start, *lines, end])
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    plot(runs, sweep, ROOT / "docs" / "aggregation.png")
    print("\n".join(lines))


def plot(runs: dict, sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (err, loss, drift) = plt.subplots(1, 3, figsize=(15, 4.5))
    for (split, mode), run in runs.items():
        h = [r for r in run["history"] if r["round"] > 0]
        style = {"IID": ":", "non-IID, 20 steps": "--"}.get(split, "-")
        if mode == "naive":
            err.plot([r["round"] for r in h], [r["agg-error-mean"] for r in h], style, marker="o",
                     label=f"{split}: naive's error")
        else:
            err.plot([r["round"] for r in h], [max(r["applied-error-mean"], 1e-9) for r in h], style,
                     marker="s", label=f"{split}: {mode} (applied)")
        loss.plot([r["round"] for r in run["history"]], [r["eval-loss"] for r in run["history"]],
                  style, marker="o", label=f"{split}: {mode}")
    err.set_yscale("log")
    err.set_title("aggregation error (layer mean)")
    loss.set_title("held-out loss")
    steps = list(sweep)
    drift.plot(steps, [sweep[s]["history"][-1]["agg-error-mean"] for s in steps], marker="o",
               label="mean over layers")
    drift.plot(steps, [sweep[s]["history"][-1]["agg-error-max"] for s in steps], marker="o",
               label="worst layer")
    drift.set_title("naive error after round 1 vs local steps (non-IID)")
    drift.set_xlabel("local steps")
    for ax in (err, loss):
        ax.set_xlabel("round")
    for ax in (err, loss, drift):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
