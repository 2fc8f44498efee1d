"""Can a half-depth student heal? The centralized check behind docs/distillation.md.

The same loop as a federated run, without Flower (`fedtune train`: the pooled data of
the 4 WordNet clients): a teacher (SmolLM2-135M-Instruct + LoRA r=8, 48 steps), then
15-of-30-layer students cut from its merged weights (`--student-layer-choice
similarity`), each trained for the same number of steps:
- `--student-train mlp` with KD (forward KL, alpha 0.5, T 2) and without (alpha 1: CE only),
- `--student-train lora` with KD: LoRA r=8 alone, the capacity the old recipe had.
Held-out loss after every 20 steps on the same 32 examples; prints a table of the
keep-ratio (share of the teacher's gain over the base kept) and writes
docs/distillation-heal.png. Finished runs are reused (their folders under --out).

    nice -n 10 python bench/distill_heal.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.report, common: run as a script
STUDENTS = {"MLPs in full + LoRA, KD": ["--student-train", "mlp"],
            "MLPs in full + LoRA, no KD (CE only)": ["--student-train", "mlp", "--distill-alpha", "1.0"],
            "LoRA only, KD": ["--student-train", "lora"]}


def train(run_dir: Path, flags: list[str]) -> list[dict]:
    """One `fedtune train` run, reused when finished (runs are deterministic)."""
    if not (run_dir / "wall.txt").exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run: start it again
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "server.cli", "train", *flags, "--run-dir", str(run_dir)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        (run_dir / "wall.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=10, help="evaluations of each student")
    parser.add_argument("--local-steps", type=int, default=5,
                        help="x 4 clients = steps between evaluations")
    parser.add_argument("--skip-missing", action="store_true",
                        help="report only the student runs already finished; run none")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-distill-heal")
    args = parser.parse_args()
    teacher_dir = args.out / "teacher"
    teacher = train(teacher_dir, ["--num-server-rounds", "3", "--local-steps", "4",
                                  "--eval-examples", "32"])
    base, best = teacher[0]["eval-loss"], teacher[-1]["eval-loss"]
    rows = {}
    for name, flags in STUDENTS.items():
        slug = "-".join(flags[1::2]).replace(".", "")
        run_dir = args.out / f"student{args.layers}-{slug}-r{args.rounds}-s{args.local_steps}"
        if args.skip_missing and not (run_dir / "wall.txt").exists():
            continue
        rows[name] = train(run_dir, [
            "--distill-teacher", str(teacher_dir.absolute()), "--student-layers", str(args.layers),
            "--num-server-rounds", str(args.rounds), "--local-steps", str(args.local_steps),
            "--eval-examples", "32", *flags])
    step = 4 * args.local_steps
    print(f"base {base:.4f}, teacher {best:.4f}, 90% of the gain: {base - 0.9 * (base - best):.4f}")
    print("| steps | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for i in range(args.rounds + 1):
        cells = [f"{h[i]['eval-loss']:.4f} ({keep(h[i]['eval-loss'], base, best):.0%})" for h in rows.values()]
        print(f"| {i * step} | " + " | ".join(cells) + " |")
    suffix = "" if args.rounds == 10 else f"-r{args.rounds}"  # the default run's plot stays
    plot(rows, base, best, step, ROOT / "docs" / f"distillation-heal{suffix}.png")


def keep(loss: float, base: float, teacher: float) -> float:
    return (base - loss) / (base - teacher)


def plot(rows: dict, base: float, teacher: float, step: int, path: Path) -> None:
    from bench.report import plt as pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, h in rows.items():
        ax.plot([r["round"] * step for r in h], [keep(r["eval-loss"], base, teacher) for r in h],
                marker="o", label=name)
    ax.axhline(0.9, color="grey", linestyle=":", label="90% of the teacher's gain")
    ax.axhline(0.0, color="black", linewidth=0.5, label="0: the untuned 30-layer base")
    ax.set_ylim(bottom=max(-3.0, ax.get_ylim()[0]))
    ax.set_xlabel("optimizer steps (batch 8, pooled data)")
    ax.set_ylabel("share of the teacher's held-out gain kept")
    ax.set_title("15-of-30-layer students, centralized: keep-ratio against steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
