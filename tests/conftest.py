"""Shared fixtures: a tiny config-built Llama (random weights, the real SmolLM2
tokenizer) and tiny datasets. Tiny models test behaviour, never results."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from common.config import RunConfig  # noqa: E402
from common.model import load_tokenizer  # noqa: E402

_SCRATCH: Path | None = None


def pytest_configure(config):
    """One scratch folder for everything a test run writes to temp space, removed at the
    end: pytest's tmp_path folders, Ray's session folders (RAY_TMPDIR), torch's and
    every subprocess's temp files (TMPDIR). Without it a run left ~550 MB in
    /tmp/pytest-of-USER plus Ray sessions in /tmp/ray. FEDTUNE_KEEP_TMP=1 keeps it
    (its path is printed) to look at a failure; --basetemp still wins for tmp_path."""
    global _SCRATCH
    if hasattr(config, "workerinput"):  # an xdist worker: the controller owns it
        return
    _SCRATCH = Path(tempfile.mkdtemp(prefix="fedtune-tests-"))
    for name in ("TMPDIR", "RAY_TMPDIR"):
        os.environ[name] = str(_SCRATCH)
    # tokenized splits of the tests' throwaway data: cached for the test run, not in ~/.cache
    os.environ.setdefault("FEDTUNE_TOKEN_CACHE", str(_SCRATCH / "tokens"))
    tempfile.tempdir = str(_SCRATCH)
    if config.option.basetemp is None:
        config.option.basetemp = str(_SCRATCH / "pytest")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (each runs several whole federations: minutes apiece) are
    opt-in, so the README's test command stays under 10 minutes on 2 cores; CI sets
    FEDTUNE_SLOW_TESTS=1 and runs them all."""
    if os.environ.get("FEDTUNE_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: several federations; FEDTUNE_SLOW_TESTS=1 runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config):
    if _SCRATCH is None:
        return
    if os.environ.get("FEDTUNE_KEEP_TMP") == "1":
        print(f"\nfedtune tests: temp files kept in {_SCRATCH}")
    else:
        shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_records(path: Path, categories=("alpha", "beta"), per_category=30) -> Path:
    rows = []
    for c_index, category in enumerate(categories):
        for i in range(per_category):
            rows.append({
                "instruction": f"Name item {i} of group {category}.",
                "input": "",
                "output": f"Item {i} belongs to {category} and number {i * (c_index + 2)}.",
                "category": category,
            })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def tiny_dataset(tmp_path) -> Path:
    return write_records(tmp_path / "tiny.jsonl")


@pytest.fixture()
def tiny_cfg(tiny_model_dir, tiny_dataset, tmp_path) -> RunConfig:
    return RunConfig(
        model=str(tiny_model_dir), dataset=str(tiny_dataset), categories="",
        num_clients=2, eval_examples=8, batch_size=4, local_steps=2, num_server_rounds=2,
        max_length=64, eval_batch_size=8, lora_r=4, lora_dropout=0.0,
        run_dir=str(tmp_path / "run"),
        # exact float32 arithmetic for tests that compare against a hand computation;
        # the bf16 path ('auto' on this CPU) has its own tests (tests/test_precision.py)
        dtype="float32",
    )


@pytest.fixture()
def flower_identity():
    """Messages built outside a running app need the identity Flower sets per run."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
