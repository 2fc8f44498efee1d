"""Compute precision (common/precision.py): bf16 autocast over a 16-bit base with float32
LoRA weights; what travels stays float32; eval-every; the simulate parent stays lean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import precision
from common.data import batches_once, partition_examples
from common.model import adapter_state, get_model, load_base_model, load_tokenizer
from common.objectives import causal_lm_loss
from common.precision import autocast, compute_dtype, resolve_dtype
from common.train import evaluate, train_steps
from common.transport import encode_state

ROOT = Path(__file__).resolve().parents[1]


def test_auto_means_bf16_only_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cpu", dp_sgd=True) == "float32"  # Opacus: fp32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu", dp_sgd=True) == "bfloat16"  # explicit wins


def _first_batch(cfg, tokenizer):
    examples = partition_examples(cfg, 0, cfg.num_clients, tokenizer)
    return next(batches_once(examples, 8, tokenizer.pad_token_id))


def test_bf16_autocast_loss_matches_float32(tiny_cfg, tokenizer):
    """The same weights, once float32 and once bf16 under autocast: the loss agrees to
    bf16's precision (8 mantissa bits over a few layers), and both are finite."""
    batch = _first_batch(tiny_cfg, tokenizer)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = get_model(tiny_cfg.replace(dtype=dtype))
        assert compute_dtype(model) == getattr(torch, dtype)
        with torch.no_grad(), autocast(model):
            losses[dtype] = float(causal_lm_loss(model, batch))
    assert losses["float32"] == pytest.approx(losses["bfloat16"], rel=1e-2)
    assert losses["float32"] != losses["bfloat16"]  # bf16 really ran (not fp32 twice)


def test_adapter_trains_and_travels_in_float32_over_a_bf16_base(tiny_cfg, tokenizer):
    cfg = tiny_cfg.replace(dtype="bfloat16")
    model = get_model(cfg)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert compute_dtype(model) == torch.bfloat16
    before = adapter_state(model)
    examples = partition_examples(cfg, 0, cfg.num_clients, tokenizer)
    from common.data import batches_forever
    from common.objectives import build_objective

    batches = batches_forever(examples, cfg.batch_size, tokenizer.pad_token_id,
                              torch.Generator().manual_seed(0))
    stats = train_steps(model, batches, build_objective(model, cfg), cfg, num_steps=2)
    after = adapter_state(model)
    assert torch.isfinite(torch.tensor(stats.loss))
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)  # it trained
    wire = encode_state(after, "float32")
    assert {a.dtype.name for a in wire.values()} == {"float32"}
    # evaluation runs under the same autocast and returns a finite loss
    assert torch.isfinite(torch.tensor(evaluate(model, examples[:8], batch_size=8,
                                                pad_token_id=tokenizer.pad_token_id).loss))


def test_builtin_bf16_weights_are_the_float32_weights_rounded():
    """The bf16 copy of the built-in model (shared by memory-mapping between processes)
    holds exactly what casting the float32 weights gives."""
    fp32 = load_base_model("smollm2-135m-instruct", "float32")
    bf16 = load_base_model("smollm2-135m-instruct", "bfloat16")
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.29.mlp.down_proj.weight", "model.norm.weight"]
    a, b = dict(fp32.named_parameters()), dict(bf16.named_parameters())
    for name in names:
        assert b[name].dtype == torch.bfloat16
        assert torch.equal(a[name].to(torch.bfloat16), b[name]), name


def _history_rounds(run_dir: Path) -> dict[int, bool]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return {r["round"]: "eval-loss" in r for r in rows}


def test_eval_every_evaluates_its_rounds_and_always_the_last(tiny_cfg, capsys):
    from server.centralized import run_centralized
    from server.summary import print_summary

    cfg = tiny_cfg.replace(num_server_rounds=5, eval_every=2, local_steps=1)
    run = run_centralized(cfg)
    assert _history_rounds(run.path) == {0: True, 1: False, 2: True, 3: False, 4: True, 5: True}
    capsys.readouterr()
    print_summary(run.path, 1.0)
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    skipped = next(cells for cells in table if cells[:1] == ["3"])
    assert skipped[2:5] == ["-", "-", "-"]  # a skipped round's eval cells
    assert "best:" in " ".join(" ".join(c) for c in table)


def test_simulate_parent_imports_no_torch_and_loads_no_model(tiny_model_dir, tiny_dataset,
                                                              tmp_path):
    """`fedtune simulate`'s parent only parses and waits: torch, transformers and the
    data are the child's (which also checks the inputs)."""
    code = (
        "import sys, server.cli as cli\n"
        "cli.simulate = lambda cfg, verbose=False: print(sorted(m for m in "
        "('torch', 'transformers', 'datasets', 'flwr') if m in sys.modules)) or 0\n"
        f"sys.exit(cli.main(['simulate', '--model', {str(tiny_model_dir)!r}, "
        f"'--dataset', {str(tiny_dataset)!r}, '--categories', '', "
        f"'--run-dir', {str(tmp_path / 'run')!r}]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
