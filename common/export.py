"""Merge a LoRA adapter into the base weights and save a standalone Hugging Face
folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and no peft."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common.lora_aggregation import fold_residual


def export_merged(model, tokenizer, out_dir: Path) -> Path:
    """``merge_and_unload`` then safetensors + config + tokenizer, written to a temp
    folder beside ``out_dir`` and renamed: a crash leaves no half-written model."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists():
        raise FileExistsError(f"export folder '{out_dir}' already exists: choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fold_residual(model)  # lora-aggregation exact: the residual joins the base weights
    merged = model.merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # mkdtemp makes 0700 and safetensors writes 0600; an exported model is meant to be shared.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
