"""Merge a LoRA adapter into the base weights and save a standalone Hugging Face
folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and no peft.

transformers 5 writes ``config.json`` and ``tokenizer_config.json`` in its own layout
only. transformers 4.x, which many serving stacks still pin, reads such a config
*silently wrong* (no top-level ``rope_theta``: it falls back to 10000, i.e. other
positions, other outputs) and does not know the tokenizer class ``TokenizersBackend``.
:func:`add_transformers4_keys` writes the 4.x keys beside the 5.x ones, with the same
values; both versions then load the folder to identical logits (scripts/check_compat.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# transformers 5's generic fast-tokenizer class; 4.x calls the same thing (a tokenizer
# built from tokenizer.json alone) PreTrainedTokenizerFast.
TOKENIZER_CLASSES_4X = {"TokenizersBackend": "PreTrainedTokenizerFast"}

from common.lora_aggregation import fold_residual


def export_merged(model, tokenizer, out_dir: Path) -> Path:
    """``merge_and_unload`` then safetensors + config + tokenizer, written to a temp
    folder beside ``out_dir`` and renamed: a crash leaves no half-written model.
    The config and tokenizer files also carry transformers 4.x's keys
    (:func:`add_transformers4_keys`)."""
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
        add_transformers4_keys(tmp)
        # mkdtemp makes 0700 and safetensors writes 0600; an exported model is meant to be shared.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def add_transformers4_keys(folder: Path) -> None:
    """Rewrite ``folder``'s config.json and tokenizer_config.json (those present) so
    that transformers 4.x reads them as transformers 5 does; idempotent.

    Hand-written: transformers 5 has no option to save its older layout. Keys added,
    each only when absent:
    - config.json: ``rope_theta``, ``rope_scaling`` (None for plain RoPE, else the
      ``rope_parameters`` without the theta), ``partial_rotary_factor`` and
      ``torch_dtype`` (= ``dtype``), also inside ``text_config`` of a multimodal config.
      A per-layer-type ``rope_parameters`` (e.g. Gemma 3) is left as it is: its 4.x
      keys differ per model.
    - tokenizer_config.json: ``tokenizer_class`` ``TokenizersBackend`` becomes
      ``PreTrainedTokenizerFast`` (transformers 5 loads that name too), and the chat
      template, when it sits in chat_template.jinja only, is copied into it (4.x before
      4.50 reads it from tokenizer_config.json only).
    Raises ``ValueError`` when a file is not a JSON object.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        _add_config_keys(config)
        if isinstance(config.get("text_config"), dict):
            _add_config_keys(config["text_config"])
        _write_json(config_path, config)
    tokenizer_path = folder / "tokenizer_config.json"
    if tokenizer_path.is_file():
        tok = _read_json(tokenizer_path)
        tok["tokenizer_class"] = TOKENIZER_CLASSES_4X.get(tok.get("tokenizer_class"),
                                                          tok.get("tokenizer_class"))
        template = folder / "chat_template.jinja"
        if "chat_template" not in tok and template.is_file():
            tok["chat_template"] = template.read_text(encoding="utf-8")
        _write_json(tokenizer_path, tok)


def _add_config_keys(config: dict[str, Any]) -> None:
    rope = config.get("rope_parameters")
    layer_types = set(config.get("layer_types") or ())
    if isinstance(rope, dict) and not layer_types & set(rope) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            config.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        plain = scaling.get("rope_type", scaling.get("type", "default")) == "default" and len(scaling) <= 1
        config.setdefault("rope_scaling", None if plain else scaling)
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not JSON ({err.msg}): save the model again") from None
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' must hold a JSON object: save the model again")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # as transformers writes them; a temp file and a rename: never half a config
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
