"""Speed and memory: bf16 against fp32 per step, and whole runs measured from outside.

Part ``steps`` (one process, one torch thread, the built-in model and LoRA, client 0's
data): the same batches through the training loop (`common/train.py`) in fp32 and in bf16 (16-bit base weights,
float32 LoRA weights under autocast), one step of each in turn so that other jobs' load
hits both alike; then the held-out set evaluated by each, batch by batch in turn.
Reports non-padding tokens per CPU second, the bf16/fp32 ratio, and each one's
held-out loss after the same steps. The bf16 bare loop (forward, loss, backward, AdamW)
gives the compute floor of a run: its CPU seconds per padded token times every batch the
demo's clients train (the same seeded batches as client/app.py), plus the held-out
evaluations, over the cores.

Part ``runs``: `fedtune simulate` as a user runs it, wall time and peak memory of the
whole process tree (RSS summed, and PSS, which splits shared pages): the demo (its
defaults) and the "identical work" of issue 14 (a 4,200-record WordNet JSONL split IID
over 4 clients, q_proj,v_proj r=8, 3 rounds x 10 steps, batch 8, max length 128, 200
held-out examples), each with dtype auto (bf16 here) and float32 on data tokenized
afresh, then auto again on the tokens the first run cached (common/token_cache.py).
Runs are sequential: run this part on an idle machine.

    python bench/speed.py                    # both parts (~30 min on an idle 2-core machine)
    python bench/speed.py --part steps       # the per-step comparison only (~4 min)
    python bench/speed.py --part runs --only demo
    python bench/speed.py --part backends    # the runs under --backend ray and sequential
    python bench/speed.py --report-only      # rewrite the runs section from runs/bench-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.report import load_average, machine, run_timed, today, write_section  # noqa: E402

IDENTICAL = ["--partitioner", "iid", "--categories", "", "--num-clients", "4",
             "--lora-target-modules", "q_proj,v_proj", "--lora-r", "8",
             "--num-server-rounds", "3", "--local-steps", "10", "--batch-size", "8",
             "--max-length", "128", "--eval-examples", "200"]


# --- part 1: steps ----------------------------------------------------------------------
def step_batches(steps: int) -> list[dict]:
    """Client 0's first ``steps`` + 1 batches (seed 0): the first warms up."""
    import torch

    from common.config import RunConfig
    from common.data import batches_forever, partition_examples
    from common.model import load_tokenizer

    base = RunConfig()
    tokenizer = load_tokenizer(base.model)
    examples = partition_examples(base, 0, base.num_clients, tokenizer)
    stream = batches_forever(examples, base.batch_size, tokenizer.pad_token_id,
                             torch.Generator().manual_seed(0))
    return [next(stream) for _ in range(steps + 1)]


def measure_steps(steps: int) -> dict:
    import torch

    from common.config import RunConfig
    from common.data import heldout_examples
    from common.model import get_model, load_tokenizer
    from common.objectives import causal_lm_loss
    from common.precision import autocast
    from common.runtime import setup_process
    from common.train import _loop, evaluate, make_optimizer

    setup_process(1)
    base = RunConfig()
    tokenizer = load_tokenizer(base.model)
    heldout = heldout_examples(base, base.num_clients, tokenizer)
    batches = step_batches(steps)
    cfgs = {"fp32": base.replace(dtype="float32"), "bf16": base.replace(dtype="bfloat16")}
    models = {name: get_model(cfg) for name, cfg in cfgs.items()}
    # one optimizer per model for all steps, as in a client's round (train_steps makes
    # a fresh one per call: one call per step would make every step Adam's first)
    optimizers = {name: make_optimizer(model, cfgs[name]) for name, model in models.items()}
    bare_model = models["bf16"]
    cpu = {"fp32": [], "bf16": [], "bare bf16": []}
    tokens = padded = 0
    for index, batch in enumerate(batches):
        for name, cfg in cfgs.items():
            start = time.process_time()
            models[name].train()
            _loop(models[name], optimizers[name], iter([batch]), causal_lm_loss, cfg,
                  num_steps=1, step_offset=index, total=steps + 1, desc=name)
            if index:  # the first step of each warms up (allocations, lazy imports)
                cpu[name].append(time.process_time() - start)
        if index:
            tokens += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
    # the bare floor: the same math without the loop around it (fresh optimizer state)
    optimizer = torch.optim.AdamW([p for p in bare_model.parameters() if p.requires_grad],
                                  lr=base.lr)
    for batch in batches[1:]:
        start = time.process_time()
        with autocast(bare_model):
            loss = causal_lm_loss(bare_model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu["bare bf16"].append(time.process_time() - start)
    eval_cpu = {"fp32": 0.0, "bf16": 0.0}
    for name, model in models.items():  # warm-up pass, untimed, on one batch
        evaluate(model, heldout[:16], batch_size=16, pad_token_id=tokenizer.pad_token_id)
    chunks = [heldout[i:i + base.eval_batch_size] for i in range(0, len(heldout), base.eval_batch_size)]
    nll = {"fp32": 0.0, "bf16": 0.0}
    count = {"fp32": 0, "bf16": 0}
    for chunk in chunks:
        for name, model in models.items():
            start = time.process_time()
            stats = evaluate(model, chunk, batch_size=base.eval_batch_size,
                             pad_token_id=tokenizer.pad_token_id)
            eval_cpu[name] += time.process_time() - start
            nll[name] += stats.loss * stats.count
            count[name] += stats.count
    eval_loss = {name: nll[name] / count[name] for name in nll}
    eval_tokens = sum(int(sum(len(e["input_ids"]) for e in chunk)) for chunk in chunks)
    return {"steps": steps, "tokens": tokens, "padded-tokens": padded, "cpu": cpu,
            "eval-cpu": eval_cpu,
            "eval-examples": len(heldout), "eval-tokens": eval_tokens, "eval-loss": eval_loss,
            "load": load_average()}


def steps_lines(result: dict, command: str) -> list[str]:
    cpu = result["cpu"]
    tps = {name: result["tokens"] / sum(values) for name, values in cpu.items()}
    eps = {name: result["eval-tokens"] / s for name, s in result["eval-cpu"].items()}
    loss = result["eval-loss"]
    rel = abs(loss["bf16"] - loss["fp32"]) / loss["fp32"]
    return [
        "## Speed: bf16 against fp32, per step", "",
        f"Measured by `{command}` on {machine()}, {today()}; load average {result['load']} "
        "at the end (one torch thread: CPU seconds are this process's compute, whatever "
        "other jobs took; fp32 and bf16 steps alternated).", "",
        f"Built-in SmolLM2-135M-Instruct, LoRA r=8 all-linear, client 0's data, batch 8, "
        f"max-length 96, {result['steps']} steps after one warm-up step each; then the "
        f"{result['eval-examples']} held-out examples evaluated by each.", "",
        "| | CPU s per step (median) | train tokens / CPU s | held-out tokens / CPU s | held-out loss after the steps |",
        "|---|---|---|---|---|",
        f"| fp32 | {statistics.median(cpu['fp32']):.2f} | {tps['fp32']:.0f} | {eps['fp32']:.0f} | {loss['fp32']:.4f} |",
        f"| bf16 (auto here) | {statistics.median(cpu['bf16']):.2f} | {tps['bf16']:.0f} | {eps['bf16']:.0f} | {loss['bf16']:.4f} |",
        f"| bf16 bare loop (floor) | {statistics.median(cpu['bare bf16']):.2f} | {tps['bare bf16']:.0f} | | |",
        "",
        f"- bf16 / fp32: training x{tps['bf16'] / tps['fp32']:.2f} tokens per CPU second, "
        f"evaluation x{eps['bf16'] / eps['fp32']:.2f}; held-out loss differs by {rel:.2%}.",
        f"- the training loop in bf16 against the bare bf16 loop: "
        f"{tps['bf16'] / tps['bare bf16']:.3f} of its tokens per CPU second.", "",
    ]


# --- part 2: runs ---------------------------------------------------------------------
def identical_dataset(path: Path, records: int = 4200) -> Path:
    """4,200 WordNet records (built-in data, shuffled with seed 0) as a JSONL file."""
    import random

    from common.data import wordnet_records

    rows = wordnet_records()
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:records]))
    return path


def run_once(name: str, extra: list[str], work: Path) -> dict:
    fedtune = str(Path(sys.executable).parent / "fedtune")
    run_dir = work / name
    # a token cache of this bench's own (common/token_cache.py): each run's data is
    # tokenized afresh unless the plan repeats a run ("warm")
    env = {**os.environ, "FEDTUNE_TOKEN_CACHE": str(work / "tokens")}
    _, wall, memory = run_timed([fedtune, "simulate", "--run-dir", str(run_dir), *extra],
                                work / f"{name}.log", env=env, sample_memory=True)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    result = {"name": name, "wall-s": round(wall, 1),
              "peak-rss-sum-gb": round(memory["rss-mb"] / 1e3, 2),
              "peak-pss-gb": round(memory["pss-mb"] / 1e3, 2),
              "processes": memory["processes"],
              "eval-loss": [round(r["eval-loss"], 4) for r in history if "eval-loss" in r],
              "load-after": load_average()}
    print(json.dumps(result), flush=True)
    return result


def measure(only: list[str], variants: list[tuple[str, list[str]]]) -> list[dict]:
    """Each of ``only`` (demo, identical) under each variant (name, extra flags), one
    after the other; runs are named ``what-variant``."""
    work = Path(tempfile.mkdtemp(prefix="fedtune-speed-"))
    try:
        data = identical_dataset(work / "wordnet-4200.jsonl")
        plans = {"demo": [], "identical": ["--dataset", str(data), *IDENTICAL]}
        return [run_once(f"{what}-{name}", [*plans[what], *flags], work)
                for what in only for name, flags in variants]
    finally:
        shutil.rmtree(work, ignore_errors=True)


# dtype auto and float32 on data tokenized afresh, then auto again on the tokens the
# first run cached (common/token_cache.py)
DTYPE_RUNS = [("auto", ["--dtype", "auto"]), ("float32", ["--dtype", "float32"]),
              ("auto (warm)", ["--dtype", "auto"])]
BACKEND_RUNS = [("ray", ["--backend", "ray"]), ("sequential", ["--backend", "sequential"])]


def _runs_table(results: list[dict], column: str) -> list[str]:
    """The runs as a table; ``column`` names what follows the run's name (dtype, backend)."""
    lines = [f"| run | {column} | wall s | peak RSS sum GB | peak PSS GB | processes | "
             "held-out loss per evaluated round | load after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        what, variant = r["name"].split("-", 1)
        lines.append(f"| {what} | {variant} | {r['wall-s']} | {r['peak-rss-sum-gb']} | "
                     f"{r['peak-pss-gb']} | {r['processes']} | "
                     f"{' -> '.join(f'{x:.4f}' for x in r['eval-loss'])} | {r['load-after']} |")
    return lines


def backends_lines(results: list[dict], command: str, when: str | None = None) -> list[str]:
    from common.config import RunConfig
    from common.precision import resolve_dtype

    dtype = str(resolve_dtype("auto", "cpu")).removeprefix("torch.")
    lines = [
        "## Speed and memory: Ray against sequential clients", "",
        f"Measured by `{command}` on {machine()}, {when or today()}, one run at a time "
        "(load average after each run in the table). The same runs as the section above "
        f"(dtype auto: {dtype} on this CPU) under each `--backend`: 'ray', Flower's "
        f"simulation engine with one Ray actor per core ({RunConfig().num_threads} torch "
        "thread each, two clients at a time here), and 'sequential', every client in the "
        "server's process one after another with every core (server/sequential.py). "
        "Wall and memory are measured as above (the whole process tree).", "",
        *_runs_table(results, "backend"),
    ]
    by = {r["name"]: r for r in results}
    lines.append("")
    for what in ("demo", "identical"):
        a, b = by.get(f"{what}-sequential"), by.get(f"{what}-ray")
        if a and b:
            rel = (a["eval-loss"][-1] - b["eval-loss"][-1]) / b["eval-loss"][-1]
            lines.append(f"- {what}: sequential against ray: wall x{a['wall-s'] / b['wall-s']:.2f}, "
                         f"peak RSS sum x{a['peak-rss-sum-gb'] / b['peak-rss-sum-gb']:.2f}, "
                         f"peak PSS x{a['peak-pss-gb'] / b['peak-pss-gb']:.2f}, final held-out "
                         f"loss {rel:+.2%}.")
    lines.append("")
    return lines


def runs_lines(results: list[dict], command: str, floor: dict | None,
               when: str | None = None) -> list[str]:
    lines = [
        "## Speed and memory: whole runs", "",
        f"Measured by `{command}` on {machine()}, {when or today()}, one run at a time; "
        f"load average after each run in the table. Wall: `fedtune simulate` start to exit. "
        "Memory: peak over samples (RSS every second, PSS every 5 s) of the whole process tree (the parent, the "
        "simulation child with the ServerApp, Ray's processes and actors), RSS summed "
        "(shared pages counted once per process) and PSS (shared pages split).", "",
        *_runs_table(results, "dtype"),
    ]
    by = {r["name"]: r for r in results}
    lines.append("")
    for what in ("demo", "identical"):
        a, b = by.get(f"{what}-auto"), by.get(f"{what}-float32")
        if a and b:
            rel = (a["eval-loss"][-1] - b["eval-loss"][-1]) / b["eval-loss"][-1]
            lines.append(f"- {what}: auto (bf16) against float32: wall x{a['wall-s'] / b['wall-s']:.2f}, "
                         f"RSS sum x{a['peak-rss-sum-gb'] / b['peak-rss-sum-gb']:.2f}, final "
                         f"held-out loss {rel:+.2%}.")
        warm = by.get(f"{what}-auto (warm)")
        if a and warm:
            lines.append(f"- {what}: run again on its cached tokens: {warm['wall-s']} s against "
                         f"{a['wall-s']} s tokenizing afresh.")
    if floor and by.get("demo-auto"):
        warm = by.get("demo-auto (warm)")
        lines.append(f"- demo wall against the compute floor ({floor['seconds']:.0f} s: "
                     f"{floor['how']}): x{by['demo-auto']['wall-s'] / floor['seconds']:.2f}"
                     + (f", x{warm['wall-s'] / floor['seconds']:.2f} run again" if warm else "")
                     + ".")
    lines.append("")
    return lines


def demo_floor(steps_result: dict) -> dict:
    """The demo's compute at the bare loop's speed, spread over the cores: every batch
    each client trains (the same seeded batches as client/app.py draws, all clients and
    rounds) at the bare bf16 loop's CPU seconds per padded token, plus the held-out set
    evaluated before round 1 and after each round."""
    import torch

    from common.config import RunConfig
    from common.data import batches_forever, partition_examples
    from common.model import load_tokenizer

    cfg = RunConfig()
    tokenizer = load_tokenizer(cfg.model)
    padded = 0
    for partition_id in range(cfg.num_clients):
        examples = partition_examples(cfg, partition_id, cfg.num_clients, tokenizer)
        for server_round in range(1, cfg.num_server_rounds + 1):
            seed = cfg.seed * 1_000_003 + server_round * 1_009 + partition_id  # client/app.py
            stream = batches_forever(examples, cfg.batch_size, tokenizer.pad_token_id,
                                     torch.Generator().manual_seed(seed),
                                     group_by_length=cfg.group_by_length)
            padded += sum(next(stream)["input_ids"].numel()
                          for _ in range(cfg.local_steps * cfg.grad_accum))
    per_token = sum(steps_result["cpu"]["bare bf16"]) / steps_result["padded-tokens"]
    train = per_token * padded
    evals = steps_result["eval-cpu"]["bf16"] * (cfg.num_server_rounds + 1)
    cores = os.cpu_count() or 1
    return {"seconds": (train + evals) / cores,
            "how": f"{train:.0f} CPU s of bare bf16 training ({padded:,} padded tokens) + "
                   f"{evals:.0f} CPU s of evaluation, over {cores} cores"}


def _in_child(fn, *args):
    """fn(*args) in a forked process (its models and allocator state die with it)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("steps", "runs", "backends", "all"), default="all",
                        help="all: steps and runs; backends: the runs under --backend ray "
                             "and sequential")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per dtype (default 8)")
    parser.add_argument("--only", default="demo,identical", help="runs: demo,identical")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-speed.json")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the runs section from --out's saved measurements")
    args = parser.parse_args()
    command = "python bench/speed.py" + "".join(
        f" {flag} {value}" for flag, value in (("--part", args.part), ("--only", args.only))
        if value not in ("all", "demo,identical"))
    print(f"# {command} on {machine()}, {today()}, load average {load_average()}", flush=True)
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.report_only:
        if "runs" not in saved:
            raise SystemExit(f"{args.out} holds no runs: run `python bench/speed.py` first")
        steps = saved["steps"]
        if "padded-tokens" not in steps:  # saved before it was recorded: the same batches
            steps["padded-tokens"] = sum(b["input_ids"].numel()
                                         for b in step_batches(steps["steps"])[1:])
        write_section("speed-runs", runs_lines(saved["runs"], saved.get("runs-command", command),
                                               demo_floor(steps), when=saved.get("runs-date")))
        args.out.write_text(json.dumps(saved, indent=1))
        print("wrote docs/benchmarks.md (runs section) from", args.out)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.part in ("steps", "all"):
        # in a child process: the runs below then start with none of its memory here
        saved["steps"] = _in_child(measure_steps, args.steps)
        write_section("speed-steps", steps_lines(saved["steps"], command))
        args.out.write_text(json.dumps(saved, indent=1))
    if args.part in ("runs", "all"):
        saved["runs"] = measure(args.only.split(","), DTYPE_RUNS)
        saved["runs-command"], saved["runs-date"] = command, today()
        floor = demo_floor(saved["steps"]) if "steps" in saved else None
        write_section("speed-runs", runs_lines(saved["runs"], command, floor))
    if args.part == "backends":
        saved["backends"] = measure(args.only.split(","), BACKEND_RUNS)
        saved["backends-command"], saved["backends-date"] = command, today()
        write_section("speed-backends", backends_lines(saved["backends"], command))
    args.out.write_text(json.dumps(saved, indent=1))
    print(f"wrote docs/benchmarks.md (speed sections) and {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
