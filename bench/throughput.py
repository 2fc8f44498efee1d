"""Local training throughput: `train_steps` against a bare PyTorch loop, and the
padding that length-grouped batching removes.

In one process, on the default model (SmolLM2-135M-Instruct, LoRA r=8 all-linear) and
one client's data (WordNet noun.animal), over a fixed set of examples:
- A. `common.train.train_steps` (the loop every client runs) over plain shuffled batches;
- B. a bare loop over the *same* batches with the same loss: forward, loss, backward,
  AdamW step, zero grad; the difference to A is the loop's own overhead;
- C. a bare loop with Hugging Face's built-in loss (`model(labels=...)`): what a plain
  script would write; it runs the LM head over every position, A only over responses;
- D. `train_steps` over the same examples batched with `group-by-length`.
Variants run interleaved (A B C D, A B C D, ...) so a burst of load from other jobs
hits them alike; each reports the median over repeats of non-padding tokens per CPU
second of the process (one torch thread: its compute, whatever other jobs take) and
per wall-clock second.
Writes the throughput section of docs/benchmarks.md.

    python bench/throughput.py            # short default: 96 examples, 2 repeats (~5 min on 2 cores)
    python bench/throughput.py --long     # 256 examples, 4 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.report import load_average, machine, today, write_section  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import batches_forever, padding_fraction, partition_examples  # noqa: E402
from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state  # noqa: E402
from common.objectives import causal_lm_loss  # noqa: E402
from common.runtime import setup_process  # noqa: E402
from common.train import train_steps  # noqa: E402


def epoch_batches(examples, cfg, tokenizer, group: bool) -> list[dict]:
    """One epoch over ``examples``: the same examples either way, batched differently."""
    steps = -(-len(examples) // cfg.batch_size)
    stream = batches_forever(examples, cfg.batch_size, tokenizer.pad_token_id,
                             torch.Generator().manual_seed(cfg.seed), group_by_length=group)
    return [next(stream) for _ in range(steps)]


def bare_loop(model, batches, cfg, *, hf_loss: bool) -> None:
    """The minimal loop: what `train_steps` must not be much slower than."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    for batch in batches:
        if hf_loss:
            loss = model(**batch).loss
        else:
            loss = causal_lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def fedtune_loop(model, batches, cfg) -> None:
    train_steps(model, iter(batches), causal_lm_loss, cfg, num_steps=len(batches))


def real_tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def measure(args) -> dict:
    cfg = RunConfig(num_threads=args.threads)
    setup_process(cfg.num_threads)
    tokenizer, model = load_tokenizer(cfg.model), get_model(cfg)
    examples = partition_examples(cfg, 0, cfg.num_clients, tokenizer)[:args.examples]
    plain = epoch_batches(examples, cfg, tokenizer, group=False)
    grouped = epoch_batches(examples, cfg, tokenizer, group=True)
    start_state = adapter_state(model)
    variants = {
        "A train_steps": (plain, lambda b: fedtune_loop(model, b, cfg)),
        "B bare loop, same loss": (plain, lambda b: bare_loop(model, b, cfg, hf_loss=False)),
        "C bare loop, HF loss": (plain, lambda b: bare_loop(model, b, cfg, hf_loss=True)),
        "D train_steps, group-by-length": (grouped, lambda b: fedtune_loop(model, b, cfg)),
    }
    fedtune_loop(model, plain[:2], cfg)  # warm-up: first-call allocations, lazy imports
    seconds = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for rep in range(args.repeats):
        for name, (batches, fn) in variants.items():
            set_adapter_state(model, start_state)  # identical work every time
            wall0, cpu0 = time.perf_counter(), time.process_time()
            fn(batches)
            seconds[name].append(time.perf_counter() - wall0)
            cpu[name].append(time.process_time() - cpu0)
            print(f"repeat {rep + 1}/{args.repeats} {name}: {seconds[name][-1]:.1f} s wall, "
                  f"{cpu[name][-1]:.1f} s CPU (load {load_average()})", flush=True)
    return {"examples": len(examples), "threads": cfg.num_threads, "batch": cfg.batch_size,
            "rows": [{"name": name, "steps": len(batches), "tokens": real_tokens(batches),
                      "padding": padding_fraction(batches), "seconds": seconds[name],
                      "cpu": cpu[name]}
                     for name, (batches, _) in variants.items()]}


def report(result: dict, command: str, loads: tuple[str, str]) -> list[str]:
    rows = result["rows"]
    for row in rows:
        row["median"] = statistics.median(row["seconds"])
        row["cpu-median"] = statistics.median(row["cpu"])
        row["tps"] = row["tokens"] / row["cpu-median"]
        row["wall-tps"] = row["tokens"] / row["median"]
    base = {r["name"][0]: r for r in rows}
    lines = [
        "## Throughput: the training loop against a bare loop, and padding", "",
        f"Measured by `{command}` on {machine()}, {today()}; load average {loads[0]} at the "
        f"start and {loads[1]} at the end (other engineers' jobs shared the 2 cores, so "
        "absolute speeds are noisy; the variants ran interleaved and the ratios are "
        "within one run).", "",
        f"One process, {result['threads']} torch thread(s), the default model and LoRA, "
        f"one epoch over the first {result['examples']} examples of client 0 (WordNet "
        f"noun.animal), batch {result['batch']}, max-length 96. Tokens are non-padding "
        "tokens (prompt + response). With one torch thread, the process's CPU time "
        "is its compute, whatever other jobs take: tokens/s are per CPU second (median "
        "over the repeats), and the wall-clock figures, which carry the other jobs' "
        "load, are given beside them.", "",
        "| variant | steps | non-padding tokens | padding | CPU s (median; all) | tokens/CPU s | vs A | wall s (median; all) | tokens/wall s | vs A |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['steps']} | {row['tokens']} | {row['padding']:.1%} "
            f"| {row['cpu-median']:.1f} ({', '.join(f'{s:.1f}' for s in row['cpu'])}) "
            f"| {row['tps']:.0f} | {row['tps'] / base['A']['tps']:.3f} "
            f"| {row['median']:.1f} ({', '.join(f'{s:.1f}' for s in row['seconds'])}) "
            f"| {row['wall-tps']:.0f} | {row['wall-tps'] / base['A']['wall-tps']:.3f} |")
    gap = base["A"]["tps"] / base["B"]["tps"]
    lines += [
        "",
        f"- `train_steps` against the bare loop with the same loss: {gap:.3f} of its "
        f"tokens per CPU second (target: at least 0.95: {'met' if gap >= 0.95 else 'NOT met'}; "
        f"wall clock: {base['A']['wall-tps'] / base['B']['wall-tps']:.3f}). "
        f"Against the bare loop with Hugging Face's loss: "
        f"{base['A']['tps'] / base['C']['tps']:.3f}.",
        f"- `group-by-length`: padding {base['A']['padding']:.1%} -> {base['D']['padding']:.1%} "
        f"of the token slots, tokens per CPU second x{base['D']['tps'] / base['A']['tps']:.2f} "
        f"(wall clock x{base['D']['wall-tps'] / base['A']['wall-tps']:.2f}) on the same examples.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="256 examples, 4 repeats")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-throughput.json")
    args = parser.parse_args()
    args.examples = args.examples or (256 if args.long else 96)
    args.repeats = args.repeats or (4 if args.long else 2)
    start_load = load_average()
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    command = "python bench/throughput.py" + (" --long" if args.long else "")
    lines = report(result, command, (start_load, load_average()))
    write_section("throughput", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
