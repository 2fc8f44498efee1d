"""Distillation that delivers a smaller, faster model, on the built-in demo.

Two runs, as a user would make them (the `fedtune` CLI):
1. the teacher: SmolLM2-135M-Instruct + LoRA, fine-tuned federatedly (`fedtune simulate`);
2. for each student size (50% and ~33% of the 30 decoder layers, cut from the teacher's
   merged weights with `--student-layers`): federated fine-tuning of the student
   (a) without KD (`--distill-alpha 1`: cross-entropy only, same start) and (b) with KD,
   one run per objective (forward KL, reverse KL, generalized JSD), at equal steps.
Then each model is exported (`fedtune export`) and measured as a standalone folder:
held-out loss/perplexity (from the run histories, the same split for all), the share of
the teacher's gain over the base model that the student keeps, parameters, generation
speed (new tokens/s, greedy, the same prompts, one thread, interleaved repetitions)
and peak memory (max RSS of a fresh process that loads the model and generates).
Writes docs/distillation.md and docs/distillation.png.

    nice -n 10 python bench/distill.py            # short default (see docs/distillation.md)
    nice -n 10 python bench/distill.py --long     # 5 rounds x 10 local steps, r=32 students
    nice -n 10 python bench/distill.py --student-train mlp   # students' MLPs train in full
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.report, common: run as a script
OBJECTIVES = {"no KD (CE only)": ["--distill-alpha", "1.0"],
              "forward KL": ["--distill-loss", "forward-kl"],
              "reverse KL": ["--distill-loss", "reverse-kl"],
              "JSD (beta 0.5)": ["--distill-loss", "jsd", "--distill-beta", "0.5"]}
PROMPTS = ["Define the word 'otter' (noun).", "Define the word 'fig' (noun).",
           "Define the word 'elbow' (noun).", "Define the word 'fern' (noun)."]


def fedtune(*args: str, quiet: bool = True) -> None:
    subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL if quiet else None)


def simulate(run_dir: Path, flags: list[str]) -> list[dict]:
    """One `fedtune simulate` run; a finished run folder is reused (runs are deterministic)."""
    if not (run_dir / "wall.txt").exists():
        if run_dir.exists():  # an interrupted run: start it again
            import shutil

            shutil.rmtree(run_dir)
        started = time.perf_counter()
        fedtune("simulate", *flags, "--run-dir", str(run_dir))
        (run_dir / "wall.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def export(run_dir: Path, out: Path) -> Path:
    if not (out / "config.json").exists():
        fedtune("export", "--adapter", str(run_dir), "--out", str(out), "--num-threads", "1")
    return out


def peak_memory_mb(folder: Path, max_new_tokens: int) -> float:
    """Peak RSS (VmHWM) of a fresh one-thread process that loads ``folder`` and answers one prompt."""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r})\n"
        f"x = t.apply_chat_template([{{'role': 'user', 'content': {PROMPTS[0]!r}}}], "
        "add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        f"m.generate(**x, max_new_tokens={max_new_tokens}, do_sample=False)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through
        # fork + exec, so every child would report this (large) process's peak
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # Linux: KiB


def generation_speed(folders: dict[str, Path], *, max_new_tokens: int, repeats: int) -> dict:
    """New tokens per second per model: greedy, exactly ``max_new_tokens`` per prompt
    (min_new_tokens: every model writes as many), one thread, the models taking turns
    in each repetition so that load on the machine hits them alike; best repetition."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in folders.items()}
    tokenizer = AutoTokenizer.from_pretrained(next(iter(folders.values())))
    inputs = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True) for p in PROMPTS]
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                for x in inputs:
                    model.generate(**x, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                   do_sample=False, temperature=None, top_p=None, top_k=None,
                                   pad_token_id=tokenizer.pad_token_id)
                times[name].append(time.perf_counter() - started)
    answers = {}
    for name, model in models.items():
        out = model.generate(**inputs[0], max_new_tokens=32, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        answers[name] = tokenizer.decode(out[0, inputs[0]["input_ids"].shape[1]:],
                                         skip_special_tokens=True).strip()
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    return {name: {"tokens-per-second": len(PROMPTS) * max_new_tokens / min(t), "params": params[name],
                   "answer": answers[name], "seconds": t} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true",
                        help="5 rounds x 10 local steps, students with LoRA r=32 (default: short)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--student-rounds", type=int, default=None,
                        help="rounds of each student run (default: the teacher's)")
    parser.add_argument("--student-local-steps", type=int, default=None,
                        help="local steps of each student run (default: the teacher's)")
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--student-lora-r", type=int, default=None)
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a finished teacher run folder to distil (default: train one federatedly)")
    parser.add_argument("--student-train", default="lora", choices=("lora", "mlp"),
                        help="what of each student trains and travels (config 'student-train')")
    parser.add_argument("--layers", default="15,10", help="student depths (default: 15,10 of 30)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES),
                        help="which of: " + ", ".join(OBJECTIVES))
    parser.add_argument("--choice", default="spread", help="student-layer-choice")
    parser.add_argument("--choices-only", action="store_true",
                        help="stop after the teacher run and the layer-choice comparison")
    parser.add_argument("--skip-missing", action="store_true",
                        help="report only the student runs already finished; run none")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-distill")
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.long else 3)
    local_steps = args.local_steps or (10 if args.long else 4)
    rank = args.student_lora_r or (32 if args.long else 8)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common = ["--num-server-rounds", str(rounds), "--local-steps", str(local_steps),
              "--eval-examples", str(args.eval_examples), "--num-threads", "1"]
    out = args.out / f"r{rounds}-s{local_steps}"
    teacher_dir = args.teacher.absolute() if args.teacher else out / "teacher"
    teacher = (simulate(teacher_dir, common) if args.teacher is None else
               [json.loads(line) for line in (teacher_dir / "history.jsonl").read_text().splitlines()])
    rows = [{"name": "teacher (30 layers, LoRA)", "run": teacher_dir, "history": teacher, "layers": 30,
             "steps-per-round": 4 * local_steps}]
    out.mkdir(parents=True, exist_ok=True)  # with --teacher, no teacher run made it
    saved = out / "choices.json"  # evaluation only, but minutes on a loaded machine: once
    depths = [int(n) for n in args.layers.split(",")]
    known = {(c["depth"], c["choice"]): c for c in json.loads(saved.read_text())} if saved.exists() else {}
    if not all((d, c) in known for d in depths for c in ("spread", "similarity")):
        known.update(compare_choices(teacher_dir, depths, eval_examples=args.eval_examples))
        saved.write_text(json.dumps([{**v, "depth": d, "choice": c} for (d, c), v in known.items()]))
    choices = {(d, c): known[(d, c)] for d in depths for c in ("spread", "similarity")}
    print(choices, flush=True)
    if args.choices_only:
        return
    objectives = [o.strip() for o in args.objectives.split(",")]
    s_rounds, s_steps = args.student_rounds or rounds, args.student_local_steps or local_steps
    student_common = ["--num-server-rounds", str(s_rounds), "--local-steps", str(s_steps),
                      "--eval-examples", str(args.eval_examples), "--num-threads", "1"]
    for layers in [int(n) for n in args.layers.split(",")]:
        for objective in objectives:
            slug = (f"student{layers}-{objective.split()[0].lower()}-{args.choice}-r{rank}"
                    f"-r{s_rounds}-s{s_steps}")
            if args.student_train != "lora":  # LoRA-only runs keep their cached folders
                slug += f"-{args.student_train}"
            flags = [*student_common, "--distill-teacher", str(teacher_dir), "--student-layers", str(layers),
                     "--student-layer-choice", args.choice, "--lora-r", str(rank),
                     "--lora-alpha", str(2 * rank), "--student-train", args.student_train,
                     *OBJECTIVES[objective]]
            run_dir = out / slug
            if args.skip_missing and not (run_dir / "wall.txt").exists():
                continue
            rows.append({"name": f"{layers} layers, {objective}", "run": run_dir, "layers": layers,
                         "objective": objective, "history": simulate(run_dir, flags),
                         "steps-per-round": 4 * s_steps})
    # standalone models: the teacher merged, the best student of each size merged
    exports = {"teacher": export(teacher_dir, out / f"export-{teacher_dir.name}")}
    best = {}
    for row in rows[1:]:
        if row["layers"] not in best or row["history"][-1]["eval-loss"] < best[row["layers"]]["history"][-1]["eval-loss"]:
            best[row["layers"]] = row
    for layers, row in best.items():
        exports[f"student {layers} layers ({row['objective']})"] = export(
            row["run"], out / f"export-{row['run'].name}")
    for layers in [int(n) for n in args.layers.split(",")]:
        if layers not in best:  # no finished run: the cut student as built (same speed)
            from common.config import RunConfig
            from common.student import ensure_student

            exports[f"student {layers} layers (cut, untrained)"] = ensure_student(RunConfig(
                distill_teacher=str(teacher_dir.absolute()), student_layers=layers,
                student_layer_choice=args.choice, eval_examples=args.eval_examples))
    speed = generation_speed(exports, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    memory = {name: peak_memory_mb(path, args.max_new_tokens) for name, path in exports.items()}
    write_report(rows, speed, memory, choices, args, rounds=rounds, local_steps=local_steps, rank=rank,
                 student_steps=s_rounds * s_steps * 4)


def compare_choices(teacher_dir: Path, depths: list[int], *, eval_examples: int) -> dict:
    """Held-out loss of each student as cut, before training, for both layer choices:
    spread (DistilBERT) and similarity (ShortGPT), plus the layers each keeps."""
    import torch

    from common.config import RunConfig
    from common.data import heldout_examples
    from common import model as model_cache
    from common.model import get_model, load_tokenizer
    from common.student import RECIPE_FILE, ensure_student
    from common.train import evaluate

    torch.set_num_threads(1)
    result = {}
    for depth in depths:
        for choice in ("spread", "similarity"):
            cfg = RunConfig(distill_teacher=str(teacher_dir.absolute()), student_layers=depth,
                            student_layer_choice=choice, eval_examples=eval_examples)
            tokenizer = load_tokenizer(cfg.model)
            stats = evaluate(get_model(cfg), heldout_examples(cfg, cfg.num_clients, tokenizer),
                             batch_size=cfg.eval_batch_size, pad_token_id=tokenizer.pad_token_id)
            recipe = json.loads((ensure_student(cfg) / RECIPE_FILE).read_text())
            result[(depth, choice)] = {"loss": stats.loss, "layers": recipe["kept-layers"]}
            model_cache._MODELS.clear()  # one student in memory at a time
    return result


def teacher_history(rows) -> list[dict]:
    return rows[0]["history"]


def trained_params(run_dir: Path) -> int:
    """Parameters in the run's saved adapter: what trained, and what each client sent."""
    from common.adapters import find_adapter, read_adapter_weights

    return sum(t.numel() for t in read_adapter_weights(find_adapter(str(run_dir)).path).values())


def keep_ratio(loss: float, base: float, teacher: float) -> float:
    """Share of the teacher's held-out gain over the base model that ``loss`` keeps."""
    return (base - loss) / (base - teacher)


def write_report(rows, speed, memory, choices, args, *, rounds, local_steps, rank,
                 student_steps) -> None:
    base = rows[0]["history"][0]["eval-loss"]
    teacher = rows[0]["history"][-1]["eval-loss"]
    steps = rounds * local_steps * 4
    import shlex

    command = "python " + shlex.join(["bench/distill.py", *sys.argv[1:]])  # runnable as written
    lines = [
        "# Distillation to a smaller, faster student",
        "",
        f"Measured by `nice -n 10 {command}` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPU cores, shared with other jobs: wall times and speeds are "
        f"inflated and uneven; compare ratios measured in the same run), {time.strftime('%Y-%m-%d')}.",
        "",
        f"Setting: SmolLM2-135M-Instruct (30 decoder layers), WordNet definitions split "
        f"naturally into 4 non-IID clients, FedAvg. Teacher: LoRA r=8 on all linear "
        + (f"layers, fine-tuned federatedly (run 1), {rounds} rounds x 4 clients x {local_steps} "
           f"local steps = {steps} optimizer steps. " if args.teacher is None else
           f"layers, the finished run `{args.teacher}` ({(len(teacher_history(rows)) - 1)} "
           "rounds; `bench/distill_heal.py` trains it centrally, 48 steps). ")
        + f"Every student: {student_steps} optimizer steps, "
        f"the same for each. Students: `--student-layers N "
        f"--student-layer-choice {args.choice} --student-train {args.student_train}` cut from "
        "the teacher's merged weights, "
        + (f"LoRA r={rank} on all linear layers" if args.student_train == "lora" else
           f"MLPs and norms trained in full, LoRA r={rank} on the attention projections")
        + ", fine-tuned federatedly with the teacher given as "
        "`--distill-teacher RUN` (run 2); KD runs use alpha 0.5, T 2. Held-out: the same "
        f"{args.eval_examples} examples for every run, loss over response tokens. Base model "
        f"held-out loss {base:.4f}, teacher {teacher:.4f}: the gain a student can keep is "
        f"{base - teacher:.4f}.",
        "",
        "| model | layers | trained (= sent) params | held-out loss (start) | held-out loss (end) | perplexity | keeps of the teacher's gain | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        h = row["history"]
        wall = float((row["run"] / "wall.txt").read_text())
        lines.append(f"| {row['name']} | {row['layers']} | {trained_params(row['run']) / 1e6:.1f}M "
                     f"| {h[0]['eval-loss']:.4f} | {h[-1]['eval-loss']:.4f} "
                     f"| {h[-1]['eval-perplexity']:.2f} | {keep_ratio(h[-1]['eval-loss'], base, teacher):.0%} "
                     f"| {wall:.0f} |")
    lines += ["", "Start: round 0, before any training (for a student: the cut teacher).", "",
              f"Standalone models (`fedtune export`), generation of {args.max_new_tokens} new tokens "
              f"for each of {len(PROMPTS)} prompts, greedy, 1 thread, best of {args.repeats} "
              "interleaved repetitions; peak memory = peak RSS (VmHWM) of a fresh process that loads the "
              "model and answers one prompt:", "",
              "| model | parameters | new tokens/s | speed vs teacher | peak memory (MB) |",
              "|---|---|---|---|---|"]
    t_speed = speed["teacher"]["tokens-per-second"]
    for name, s in speed.items():
        lines.append(f"| {name} | {s['params'] / 1e6:.1f}M | {s['tokens-per-second']:.1f} "
                     f"| {s['tokens-per-second'] / t_speed:.2f}x | {memory[name]:.0f} |")
    lines += ["", "Layer choice, held-out loss of the student as cut from the teacher (before any "
              "training):", "", "| layers | choice | held-out loss | layers kept |", "|---|---|---|---|"]
    for (depth, choice), c in choices.items():
        lines.append(f"| {depth} | {choice} | {c['loss']:.4f} | {', '.join(map(str, c['layers']))} |")
    lines += ["", "Answers to \"" + PROMPTS[0] + "\":", ""]
    lines += [f"- {name}: {s['answer']!r}" for name, s in speed.items()]
    lines += ["", "![held-out loss per round](distillation.png)", ""]
    report = "\n".join(lines)
    (args.out / "report.md").write_text(report)
    print(report)
    plot(rows, base, teacher, ROOT / "docs" / "distillation.png")


def plot(rows, base: float, teacher: float, path: Path) -> None:
    from bench.report import plt as pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        h = row["history"]
        ax.plot([r["round"] * row["steps-per-round"] for r in h], [keep_ratio(r["eval-loss"], base, teacher) for r in h],
                marker="o", label=row["name"],
                linestyle="-" if row["layers"] == 30 or row["layers"] > 12 else "--")
    ax.axhline(0.9, color="grey", linestyle=":", label="90% of the teacher's gain")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("optimizer steps (rounds x 4 clients x local steps)")
    ax.set_ylabel("share of the teacher's held-out gain kept")
    ax.set_title("Students cut from the teacher: keep-ratio against steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
