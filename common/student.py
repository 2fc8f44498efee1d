"""Distillation's two models: the frozen teacher, and a smaller student cut from it.

The teacher (``distill-teacher``) is a model name/path, ``base``, or a fedtune run
folder / PEFT adapter folder: then its base model plus that adapter, merged, frozen,
loaded once per process and never part of what a client sends.

The student (``student-layers N``) keeps N decoder layers of the model, or of the
teacher's merged weights when the teacher is an adapter, and shares its tokenizer,
embeddings and LM head, so that the logits align token for token. It is a real
``transformers`` model (its config says N layers), built once and saved with
``save_pretrained`` into ``$FEDTUNE_CACHE/students/<recipe hash>/``; every process
(server, clients, tools) loads that same folder, so only the student's LoRA travels.
Layer choice: ``spread`` initialises from evenly spaced layers, as DistilBERT took every
other layer of BERT (Sanh et al., 2019); ``similarity`` drops the layers whose output
is most cosine-similar to their input, ShortGPT's Block Influence (Men et al., 2024).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig

log = logging.getLogger(__name__)

RECIPE_FILE = "fedtune_student.json"
CALIBRATION_EXAMPLES = 16  # ShortGPT-style choice: a few training batches suffice
_TEACHERS: dict[tuple, Any] = {}


# --- the teacher -------------------------------------------------------------------------
def teacher_adapter(cfg: RunConfig):
    """The :class:`common.adapters.AdapterSource` when 'distill-teacher' is a run folder
    or a PEFT adapter folder, else None (a model name or path, or 'base')."""
    name = cfg.distill_teacher
    if name in ("", "base"):
        return None
    path = Path(name).expanduser()
    from common.adapters import ADAPTER_CONFIG, find_adapter, is_run_folder

    if path.is_dir() and (is_run_folder(path) or (path / ADAPTER_CONFIG).exists()):
        return find_adapter(str(path))
    return None


def _teacher_base(cfg: RunConfig, adapter) -> str:
    """The model under the teacher's adapter: the teacher run's model (its student
    folder if that run trained one), else the run's own 'model'."""
    if adapter is not None and adapter.run_cfg is not None:
        return model_source(adapter.run_cfg)
    return cfg.model


def load_teacher(cfg: RunConfig):
    """The frozen teacher for ``cfg``, loaded once per process (eval mode, no gradient).

    'base' with a student is the full base model. A run or adapter folder is its base
    model plus the adapter, merged (peft's ``merge_and_unload``: one plain forward).
    Raises ``ValueError`` when the teacher's tokenizer differs from the student's: the
    divergence compares distributions over the same token ids.
    """
    adapter = teacher_adapter(cfg)
    name = cfg.model if cfg.distill_teacher == "base" else cfg.distill_teacher
    base = _teacher_base(cfg, adapter) if adapter is not None else name
    key = (cfg.distill_teacher, base, _adapter_digest(adapter), cfg.dtype, cfg.device)
    if key in _TEACHERS:
        return _TEACHERS[key]
    from common.model import load_base_model, load_tokenizer

    student_vocab = load_tokenizer(cfg.model).get_vocab()
    teacher_vocab = load_tokenizer(base).get_vocab()
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"config 'distill-teacher' = {cfg.distill_teacher!r} has a different tokenizer "
            f"than the student {cfg.model!r} ({len(teacher_vocab)} vs {len(student_vocab)} "
            "tokens, or different ids): pick a teacher from the same model family"
        )
    teacher = load_base_model(base, cfg.dtype, device=cfg.device, max_length=cfg.max_length)
    if adapter is not None:
        teacher = _merged(teacher, adapter.path, base)
    teacher.eval().requires_grad_(False)
    _TEACHERS[key] = teacher
    return teacher


def _merged(base_model, folder: Path, base_name: str):
    from common.adapters import attach_adapter
    from common.lora_aggregation import fold_residual

    model = attach_adapter(base_model, folder, model_name=base_name)
    fold_residual(model)  # lora-aggregation exact: the residual joins the base weights
    return model.merge_and_unload()


def _adapter_digest(adapter) -> str:
    """sha256 of the adapter's files: a retrained teacher is another recipe."""
    if adapter is None:
        return ""
    digest = hashlib.sha256()
    for path in sorted(adapter.path.resolve().iterdir()):
        if path.suffix in (".safetensors", ".bin", ".json") and path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_teacher(cfg: RunConfig) -> RunConfig:
    """Fail fast on a teacher path that does not exist, and make an existing one
    absolute (simulated clients may run in another working directory)."""
    name = cfg.distill_teacher
    if name in ("", "base"):
        return cfg
    path = Path(name).expanduser()
    if path.exists():
        return cfg.replace(distill_teacher=str(path.absolute()))
    # a Hub name is 'org/name'; a path with more parts, or a relative/absolute prefix,
    # was meant as a local folder
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"config 'distill-teacher' = {name!r} does not exist: give a run folder "
            "(runs/<stamp>), an adapter folder, a model folder or name, or 'base'")
    return cfg


# --- the student -------------------------------------------------------------------------
def model_source(cfg: RunConfig) -> str:
    """What to load as the base model: the student's folder with 'student-layers', else
    'model' as given."""
    if not cfg.student_layers:
        return cfg.model
    return str(ensure_student(cfg))


def spread_layers(depth: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices of ``depth``, the first and the last included
    (30 -> 15: 0, 2, 4, ..., 29; DistilBERT's every other layer). Distinct since the
    spacing (depth-1)/(keep-1) is >= 1."""
    if not 1 <= keep <= depth:
        raise ValueError(f"config 'student-layers' must be in 1..{depth} (the model's "
                         f"decoder layers), got {keep}")
    if keep == 1:
        return [0]
    return [round(i * (depth - 1) / (keep - 1)) for i in range(keep)]


@torch.no_grad()
def block_influence(model, batches) -> list[float]:
    """ShortGPT's Block Influence per decoder layer: 1 - mean cosine similarity of each
    token's hidden state before and after the layer, over non-padding tokens of
    ``batches`` (dicts with input_ids, attention_mask). Low: the layer changes little.
    Hand-written (forward hooks): transformers has no such measure."""
    layers = decoder_layers(model)
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0
    captured: dict[int, tuple] = {}

    def hook(index):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            captured[index] = (hidden_in.detach(), hidden_out.detach())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            captured.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            mask = batch["attention_mask"].bool()
            for i, (hidden_in, hidden_out) in captured.items():
                cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
                sums[i] += float((1 - cos)[mask].sum())
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return (sums / max(1, count)).tolist()


def similarity_layers(influence: list[float], keep: int) -> list[int]:
    """The ``keep`` layers of highest Block Influence, in model order (ShortGPT removes
    the lowest ones, in one pass)."""
    spread_layers(len(influence), keep)  # the range check
    ranked = sorted(range(len(influence)), key=lambda i: -influence[i])
    return sorted(ranked[:keep])


def decoder_layers(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"config 'student-layers': model class {type(model).__name__} has no "
                         "decoder.layers list to cut (Llama, Qwen, Mistral, Gemma... do): "
                         "set student-layers 0")
    return layers


def keep_layers(model, layers: list[int]):
    """Cut ``model`` (a causal LM, in place) down to the decoder ``layers``, in that
    order, and make its config say so; embeddings, final norm and LM head untouched.
    The kept layers are renumbered 0..N-1 (``layer_idx`` addresses the KV cache)."""
    old = decoder_layers(model)
    bad = [i for i in layers if not 0 <= i < len(old)]
    if bad or not layers:
        raise ValueError(f"config 'student-layer-choice': layers {bad or layers} are outside "
                         f"0..{len(old) - 1} (the model's {len(old)} decoder layers)")
    model.get_decoder().layers = torch.nn.ModuleList([old[i] for i in layers])
    for new_index, layer in enumerate(model.get_decoder().layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    return model


def student_recipe(cfg: RunConfig) -> dict:
    """What determines the student's weights; its hash names the cache folder."""
    from common.model import resolve_model_path

    adapter = teacher_adapter(cfg)
    source = _teacher_base(cfg, adapter) if adapter is not None else cfg.model
    recipe = {"version": 1, "model": resolve_model_path(source), "layers": cfg.student_layers,
              "choice": cfg.student_layer_choice.strip(),
              "teacher-adapter": str(adapter.path.resolve()) if adapter else "",
              "teacher-adapter-sha256": _adapter_digest(adapter)}
    if recipe["choice"] == "similarity":  # measured on the run's training data
        recipe.update({"dataset": cfg.dataset, "data-format": cfg.data_format,
                       "categories": cfg.categories, "max-length": cfg.max_length,
                       "seed": cfg.seed, "eval-examples": cfg.eval_examples,
                       "calibration-examples": CALIBRATION_EXAMPLES})
    return recipe


def ensure_student(cfg: RunConfig) -> Path:
    """The student's model folder, built on first use (any process) and then reused.

    A file lock serializes concurrent builders (simulated clients starting together),
    and a temp folder renamed into place makes the result atomic, as for the built-in
    model (common/model.py). Raises ``ValueError`` for a layer count or list that does
    not fit the model.
    """
    recipe = student_recipe(cfg)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    from common.model import cache_dir

    target = cache_dir() / "students" / digest
    if (target / RECIPE_FILE).exists():  # written last: the folder is complete
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / RECIPE_FILE).exists():
            _build_student(cfg, recipe, target)
    return target


def describe_student(cfg: RunConfig) -> str:
    """One line: which layers the student keeps, of how many, and where it is saved."""
    folder = ensure_student(cfg)
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    source = recipe["teacher-adapter"] or recipe["model"]
    return (f"student: {len(recipe['kept-layers'])} of {recipe['teacher-layers']} decoder layers "
            f"({recipe['choice']}: {','.join(map(str, recipe['kept-layers']))}) of {source}, "
            f"saved in {folder}")


def _build_student(cfg: RunConfig, recipe: dict, target: Path) -> None:
    from common.export import add_transformers4_keys
    from common.model import load_base_model, load_tokenizer

    source = recipe["model"]
    model = load_base_model(source, "float32", device="cpu")
    adapter = teacher_adapter(cfg)
    if adapter is not None:
        model = _merged(model, adapter.path, source)
    depth = len(decoder_layers(model))
    choice = recipe["choice"]
    influence: list[float] = []
    if choice == "spread":
        layers = spread_layers(depth, cfg.student_layers)
    elif choice == "similarity":
        influence = block_influence(model, _calibration_batches(cfg, load_tokenizer(cfg.model)))
        layers = similarity_layers(influence, cfg.student_layers)
    else:
        layers = cfg.student_layer_list
    spread_layers(depth, len(layers))  # the range check, with the model's depth
    keep_layers(model, layers)
    log.info("building a %d-layer student of %s (layers %s) in %s", len(layers), source, layers, target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(cfg.model).save_pretrained(tmp)
        add_transformers4_keys(tmp)  # as every folder fedtune writes (common/export.py)
        (tmp / RECIPE_FILE).write_text(json.dumps(
            {**recipe, "teacher-layers": depth, "kept-layers": layers,
             "block-influence": [round(x, 6) for x in influence]}, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _calibration_batches(cfg: RunConfig, tokenizer):
    """The first few records of the run's training pool (before partitioning: the same
    in every process), tokenized as in training."""
    from common.data import batches_once, load_run_data, tokenize_dataset

    data = load_run_data(cfg, cfg.num_clients)
    pool = data.train_pool.select(range(min(CALIBRATION_EXAMPLES, len(data.train_pool))))
    examples = tokenize_dataset(pool, data.fmt, tokenizer, cfg.max_length,
                                truncation=cfg.truncation, on_bad_record=cfg.on_bad_record)
    return list(batches_once(examples, 8, tokenizer.pad_token_id))
