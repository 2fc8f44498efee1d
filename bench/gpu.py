"""GPU throughput and memory: bfloat16 LoRA and 4-bit QLoRA (bitsandbytes) on CUDA.

NOT RUN YET: written in a session without a GPU machine; docs/benchmarks.md says so.
Variants, each `--steps` optimizer steps of `common.train.train_steps` after 2 warm-up
steps, on client 0's data (WordNet noun.animal, batch 8, max-length 96):
- the default model (SmolLM2-135M-Instruct), bfloat16 weights + LoRA;
- the same, 4-bit NF4 weights (bitsandbytes) + LoRA computed in bfloat16 (QLoRA);
- a config-built ~1.1B Llama (TinyLlama-1.1B's shapes, random weights, the default
  tokenizer's vocabulary), in both settings: speed and memory do not need trained weights.
Reports non-padding tokens per second and peak GPU memory (torch.cuda.max_memory_allocated).
Needs a CUDA device, and bitsandbytes for the QLoRA rows (`pip install bitsandbytes`
on the GPU machine; it is not a fedtune dependency).

    python bench/gpu.py             # short default: 10 steps per variant
    python bench/gpu.py --long      # 50 steps per variant
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common.config import RunConfig  # noqa: E402
from common.data import batches_forever, partition_examples  # noqa: E402
from common.model import load_tokenizer, lora_config, resolve_model_path  # noqa: E402
from common.objectives import causal_lm_loss  # noqa: E402
from common.train import train_steps  # noqa: E402


def large_model_dir(tokenizer, out: Path) -> str:
    """TinyLlama-1.1B's shapes with the default tokenizer's vocabulary, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (out / "config.json").exists():
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632,
                             num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                             pad_token_id=tokenizer.pad_token_id)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return str(out)


def load(path: str, cfg: RunConfig, quantized: bool):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {}
    if quantized:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda", **extra)
    if quantized:  # no gradient checkpointing: same compute as the bfloat16 row
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(cfg))


def measure(path: str, cfg: RunConfig, examples, tokenizer, quantized: bool, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = load(path, cfg, quantized)
    stream = batches_forever(examples, cfg.batch_size, tokenizer.pad_token_id,
                             torch.Generator().manual_seed(0))
    counted = []

    def on_device():
        for batch in stream:
            counted.append(int(batch["attention_mask"].sum()))
            yield {k: v.to("cuda", non_blocking=True) for k, v in batch.items()}

    batches = on_device()
    train_steps(model, batches, causal_lm_loss, cfg, num_steps=2)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    counted.clear()
    start = time.perf_counter()
    train_steps(model, batches, causal_lm_loss, cfg, num_steps=steps)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"tokens/s": sum(counted) / seconds, "peak GB": torch.cuda.max_memory_allocated() / 1e9}
    del model
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="50 steps per variant")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; it measures a GPU (docs/benchmarks.md: not measured)")
    steps = 50 if args.long else 10
    cfg = RunConfig()
    tokenizer = load_tokenizer(cfg.model)
    examples = partition_examples(cfg, 0, cfg.num_clients, tokenizer)
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    with tempfile.TemporaryDirectory() as tmp:
        models = {"SmolLM2-135M (default)": resolve_model_path(cfg.model),
                  "Llama ~1.1B (config-built)": large_model_dir(tokenizer, Path(tmp) / "large")}
        print(f"{torch.cuda.get_device_name()}, {steps} steps per variant, batch {cfg.batch_size}")
        print("| model | weights | tokens/s | peak GPU GB |\n|---|---|---|---|")
        for name, path in models.items():
            for quantized in (False, True):
                if quantized and not has_bnb:
                    print(f"| {name} | nf4 | skipped: bitsandbytes not installed | |")
                    continue
                row = measure(path, cfg, examples, tokenizer, quantized, steps)
                print(f"| {name} | {'nf4 (QLoRA)' if quantized else 'bfloat16'} "
                      f"| {row['tokens/s']:.0f} | {row['peak GB']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
