"""Memory of one client process: peak resident memory while training the default model,
and what each further simulated client served by the same process adds.

A Ray actor of `fedtune simulate` serves many clients one after the other with one base
model (common/model.py caches it per process). This script does the same in one
process, without Flower: load the model, then train as client 0, 1, 2, ... in turn
(each: its partition tokenized, the adapter reset to the global one, `train_steps`),
reading the process's RSS after each, and its peak RSS (getrusage). If a client copied
the base weights, each would add their size (538 MB in float32). Writes the memory
section of docs/benchmarks.md.

    python bench/memory.py           # short default: 4 clients x 2 steps (~2 min on 2 cores)
    python bench/memory.py --long    # 4 clients x 6 steps, each client served twice
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402

from bench.report import load_average, machine, today, write_section  # noqa: E402

MB = 1e6


def rss() -> float:
    return psutil.Process().memory_info().rss / MB


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB


def measure(args) -> dict:
    before_imports = rss()
    import torch

    from common.config import RunConfig
    from common.data import batches_forever, partition_examples
    from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state
    from common.objectives import build_objective
    from common.runtime import setup_process
    from common.train import train_steps

    cfg = RunConfig(local_steps=args.steps)  # the demo: 4 clients, batch 8, max-length 96
    setup_process(cfg.num_threads)
    after_imports = rss()
    tokenizer, model = load_tokenizer(cfg.model), get_model(cfg)
    base_mb = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if "lora_" not in n) / MB
    after_model = rss()
    global_state = adapter_state(model)
    rows = []
    for visit in range(args.visits):
        for client in range(cfg.num_clients):
            examples = partition_examples(cfg, client, cfg.num_clients, tokenizer)
            set_adapter_state(model, global_state)
            torch.manual_seed(client)
            batches = batches_forever(examples, cfg.batch_size, tokenizer.pad_token_id,
                                      torch.Generator().manual_seed(client))
            train_steps(model, batches, build_objective(model, cfg), cfg, num_steps=cfg.local_steps)
            rows.append({"visit": visit + 1, "client": client, "examples": len(examples),
                         "rss-mb": rss(), "peak-rss-mb": peak_rss()})
            print(rows[-1], flush=True)
    return {"before-imports": before_imports, "after-imports": after_imports,
            "after-model": after_model, "base-weights-mb": base_mb, "rows": rows,
            "steps": cfg.local_steps, "clients": cfg.num_clients}


def report(result: dict, command: str, loads: tuple[str, str]) -> list[str]:
    rows = result["rows"]
    first, last = rows[0], rows[-1]
    growth = (last["rss-mb"] - first["rss-mb"]) / max(1, len(rows) - 1)
    lines = [
        "## Memory: one client process", "",
        f"Measured by `{command}` on {machine()}, {today()}; load average {loads[0]} / "
        f"{loads[1]} (start / end).", "",
        f"One process, one torch thread, the default model (float32) with LoRA r=8, "
        f"serving the demo's {result['clients']} clients in turn ({result['steps']} "
        "steps of batch 8 each), as a Ray actor of `fedtune simulate` does. RSS is the "
        "process's resident memory after each client; peak is getrusage's maximum.", "",
        "| point | RSS (MB) | peak RSS (MB) |", "|---|---|---|",
        f"| before importing torch | {result['before-imports']:.0f} | |",
        f"| after imports | {result['after-imports']:.0f} | |",
        f"| after loading the model + LoRA | {result['after-model']:.0f} | |",
    ]
    for row in rows:
        lines.append(f"| after client {row['client']} (visit {row['visit']}, "
                     f"{row['examples']} examples) | {row['rss-mb']:.0f} | {row['peak-rss-mb']:.0f} |")
    lines += [
        "",
        f"- Peak resident memory of one client training the default model: "
        f"**{first['peak-rss-mb']:.0f} MB** (base weights: {result['base-weights-mb']:.0f} MB "
        "in float32).",
        f"- Each further client served by the same process adds {growth:.0f} MB on average "
        f"(its tokenized partition, kept for the next round; at most 8 are cached), against "
        f"{result['base-weights-mb']:.0f} MB for a copy of the base weights: clients share "
        "the process's one model.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="6 steps, every client twice")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-memory.json")
    args = parser.parse_args()
    args.steps, args.visits = (6, 2) if args.long else (2, 1)
    start_load = load_average()
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    lines = report(result, "python bench/memory.py" + (" --long" if args.long else ""),
                   (start_load, load_average()))
    write_section("memory", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
