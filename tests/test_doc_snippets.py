"""Every Python snippet in README.md and docs/*.md runs as written.

A snippet reads what an earlier step of its guide made (a run's adapter, an export, a
TensorBoard folder). Those artifacts are made here, small, under the names the snippet
uses, in a scratch folder that is the snippet's working directory; then the snippet
runs in a fresh Python process. A placeholder like ``runs/<stamp>`` becomes a real
folder name. A snippet that reads something not listed in ARTIFACTS fails the test:
add its maker below.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_docs import DOCS, fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
STAMP = "20261130-120000"


def python_snippets() -> list[tuple[str, str]]:
    """(file:line, code) of each ```python block."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        starts = [i for i, line in enumerate(text.splitlines(), start=1)
                  if re.match(r"^\s*```python\s*$", line)]
        for start, lines in fenced_blocks(text):
            if start - 1 in starts:
                found.append((f"{doc.relative_to(ROOT)}:{start}", "\n".join(lines)))
    return found


def _builtin_adapter(folder: Path, tmp: Path) -> None:
    from common.config import RunConfig
    from common.model import get_model

    get_model(RunConfig(seed=0)).save_pretrained(folder)  # a fresh LoRA on the built-in model


def _classifier_export(folder: Path, tmp: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from common.model import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6-v2")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        id2label={0: "multiplication", 1: "subtraction"},
                        label2id={"multiplication": 0, "subtraction": 1})
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _causal_export(folder: Path, tmp: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _tensorboard_run(folder: Path, tmp: Path) -> None:
    from server.tracking import TensorBoardLog

    log = TensorBoardLog(folder.parent)
    for rnd, loss in ((0, 4.4), (1, 3.9)):
        row = {"round": rnd, "eval-loss": loss, "eval-perplexity": 2.7 ** loss,
               "eval-token-accuracy": 0.3, "train-loss": loss, "bytes-sent": 1e6,
               "bytes-received": 1e6, "mb-total": 2.0 * rnd}
        log.write(row, [{"partition-id": p, "train-loss": loss} for p in range(4)] if rnd else [])
    log.writer.close()


# path as the snippet writes it -> maker of that folder
ARTIFACTS = {
    "runs/<stamp>/adapter": _builtin_adapter,
    "models/own-classify": _classifier_export,
    "models/wordnet-quick": _causal_export,
    "runs/quick-fedprox/tensorboard": _tensorboard_run,
}
READS = re.compile(r"""["']((?:runs|models)/[^"']+)["']""")


SNIPPETS = python_snippets()


@pytest.mark.parametrize("where, code", SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_snippet_runs_as_written(where, code, tmp_path):
    for path in READS.findall(code):
        assert path in ARTIFACTS, f"{where} reads '{path}': add its maker to ARTIFACTS"
        target = tmp_path / path.replace("<stamp>", STAMP)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        ARTIFACTS[path](target, tmp_path)
    runnable = code.replace("<stamp>", STAMP)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", runnable], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{where}:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{where} printed nothing"


def test_snippets_are_found():
    places = [where for where, _ in SNIPPETS]
    assert any(p.startswith("README.md:") for p in places), places
