"""Communication cost of the adapter at float32, float16 and bfloat16 transport.

Runs the built-in demo three times through the `fedtune` CLI, once per
`--transport-dtype`, and reads each run's history: bytes per client per round (as
Flower serializes the train messages), their ratio to float32 measured in the same
run of this script, and the held-out loss and perplexity after the last round with
their change against float32. Then the adapter's size against the full model's: the
default model measured, and a Qwen2-0.5B-like and a Llama-2-7B-like model counted from
their transformers configs on the meta device (no download, no memory). Writes
docs/benchmarks.md (communication section) and docs/benchmarks-communication.png.

    python bench/communication.py                   # short default (~6 min on 2 CPU cores)
    python bench/communication.py --rounds 3 --local-steps 6 --eval-examples 96
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
sys.path.insert(0, str(ROOT))
PRECISIONS = ("float32", "float16", "bfloat16")
BYTES_FP32 = 4


def run(out: Path, dtype: str, common: list[str]) -> dict:
    run_dir = out / dtype
    if not (run_dir / "history.jsonl").exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "server.cli", "simulate", *common,
                        "--transport-dtype", dtype, "--run-dir", str(run_dir)], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        (run_dir / "wall.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]
    return {"dtype": dtype, "history": history,
            "seconds": float((run_dir / "wall.txt").read_text())}


# --- adapter vs full model -------------------------------------------------------------
def lora_numel(model, r: int) -> int:
    """LoRA parameters peft's 'all-linear' adds: r * (in + out) per Linear, output head
    excluded (peft leaves the LM head alone)."""
    import torch

    output = model.get_output_embeddings()
    return sum(r * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not output)


def base_numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings once


def meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def reference_configs() -> dict:
    """Published shapes (the models' config.json on the Hub), rebuilt offline."""
    from transformers import LlamaConfig, Qwen2Config

    return {
        "Qwen2-0.5B-like (Qwen2Config)": Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
        "Llama-2-7B-like (LlamaConfig)": LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    }


def size_rows(r: int) -> list[dict]:
    from common.config import RunConfig
    from common.model import adapter_state, get_model

    model = get_model(RunConfig())  # the default demo model with the default LoRA
    base = model.get_base_model()
    adapter = sum(t.numel() for t in adapter_state(model).values())
    full = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    counted = lora_numel(meta_model(base.config), r)
    if counted != adapter:  # the formula used for the large models must match peft here
        raise RuntimeError(f"LoRA count {counted} != peft's {adapter} on the default model")
    rows = [{"model": "SmolLM2-135M-Instruct (demo, measured)", "base": full, "adapter": adapter}]
    for name, config in reference_configs().items():
        meta = meta_model(config)
        rows.append({"model": name, "base": base_numel(meta), "adapter": lora_numel(meta, r)})
    return rows


# --- report -------------------------------------------------------------------------------
def per_client(row: dict, key: str) -> float:
    return row[key] / max(row["clients"], 1) / 1e6


def write_report(results: list[dict], sizes: list[dict], args, command: str) -> None:
    base = {r["dtype"]: r for r in results}["float32"]
    machine = (f"{platform.node() or 'this machine'} ({os.cpu_count()} CPU cores, "
               f"{platform.processor() or platform.machine()}, no GPU)")
    lines = [
        "# Benchmarks", "",
        "## Communication: transport precision of the adapter", "",
        f"Measured by `{command}` on {machine}, {time.strftime('%Y-%m-%d')}, while other "
        "jobs shared the machine (wall times are indicative only).", "",
        f"Setting: the built-in demo (SmolLM2-135M-Instruct, float32 weights, LoRA r=8 on "
        f"all linear layers, WordNet definitions in 4 non-IID clients), FedAvg, "
        f"{args.rounds} rounds x 4 clients x {args.local_steps} local steps, held-out "
        f"evaluation on {args.eval_examples} examples. Only `--transport-dtype` changes "
        "between the runs: the adapter in every train message, server to client and "
        "back, is cast to it; clients train and the server aggregates in float32.", "",
        "Bytes are the train messages as Flower 1.42 serializes them (every object of "
        "the message tree, headers included; identical chunks once, so round 1's "
        "message, whose LoRA B matrices are still zero, is smaller), per client, from "
        "`history.jsonl`. Ratios are against the float32 run of the same invocation.", "",
        "| transport | round | MB sent per client | MB received per client | vs float32 (sent / received) | MB total (budget used) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for row, ref in zip(r["history"][1:], base["history"][1:]):
            sent, recv = per_client(row, "bytes-sent"), per_client(row, "bytes-received")
            ratio = (f"{sent / per_client(ref, 'bytes-sent'):.3f} / "
                     f"{recv / per_client(ref, 'bytes-received'):.3f}")
            lines.append(f"| {r['dtype']} | {row['round']} | {sent:.3f} | {recv:.3f} | {ratio} "
                         f"| {row['mb-total']:.2f} |")
    last_ref = base["history"][-1]
    lines += ["", "| transport | held-out loss | perplexity | loss vs float32 | perplexity vs float32 | wall time (s) |",
              "|---|---|---|---|---|---|"]
    for r in results:
        last = r["history"][-1]
        lines.append(
            f"| {r['dtype']} | {last['eval-loss']:.4f} | {last['eval-perplexity']:.2f} "
            f"| {last['eval-loss'] / last_ref['eval-loss'] - 1:+.2%} "
            f"| {last['eval-perplexity'] / last_ref['eval-perplexity'] - 1:+.2%} | {r['seconds']:.0f} |")
    worst = max(abs(r["history"][-1]["eval-loss"] / last_ref["eval-loss"] - 1) for r in results)
    lines += ["", f"Largest change of the held-out loss against float32: {worst:.2%} "
              f"(target: below 1%: {'met' if worst < 0.01 else 'NOT met'}). Base model "
              f"held-out loss: {base['history'][0]['eval-loss']:.4f}.", "",
              "![MB per client per round by transport precision](benchmarks-communication.png)", "",
              "### Adapter against full model", "",
              "What a round trip of the adapter costs against shipping the full model, "
              "with the default LoRA (r=8, all linear layers but the LM head). The demo "
              "model is measured (peft's adapter, the base parameters); the other two are "
              "counted from transformers configs built on the meta device with the "
              "published shapes of Qwen2-0.5B and Llama-2-7B (the same count gives peft's "
              "number on the demo model; the script checks it). Full model: every base "
              "parameter in float32, tied embeddings once.", "",
              "| model | base parameters | adapter parameters | adapter MB (fp32) | full model MB (fp32) | adapter / full (fp32) | 16-bit adapter / full fp32 |",
              "|---|---|---|---|---|---|---|"]
    for s in sizes:
        ratio = s["adapter"] / s["base"]
        lines.append(f"| {s['model']} | {s['base'] / 1e6:,.1f} M | {s['adapter'] / 1e6:.2f} M "
                     f"| {s['adapter'] * BYTES_FP32 / 1e6:,.1f} | {s['base'] * BYTES_FP32 / 1e6:,.0f} "
                     f"| {ratio:.2%} | {ratio / 2:.2%} |")
    lines.append("")
    from bench.report import write_section

    write_section("communication", lines[2:])  # lines[:2]: the page title
    plot(results, ROOT / "docs" / "benchmarks-communication.png")
    print("\n".join(lines))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rounds = [row["round"] for row in results[0]["history"][1:]]
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        values = [per_client(row, "bytes-sent") + per_client(row, "bytes-received")
                  for row in r["history"][1:]]
        ax.bar([x + (i - (len(results) - 1) / 2) * width for x in rounds], values, width,
               label=r["dtype"])
    ax.set_xticks(rounds)
    ax.set_xlabel("federated round")
    ax.set_ylabel("MB per client (sent + received)")
    ax.set_title("Train-message bytes per client per round, by transport precision")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-communication")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common = ["--num-server-rounds", str(args.rounds), "--local-steps", str(args.local_steps),
              "--eval-examples", str(args.eval_examples)]
    results = [run(args.out, dtype, common) for dtype in PRECISIONS]
    command = (f"python bench/communication.py --rounds {args.rounds} --local-steps "
               f"{args.local_steps} --eval-examples {args.eval_examples}")
    write_report(results, size_rows(r=8), args, command)


if __name__ == "__main__":
    main()
