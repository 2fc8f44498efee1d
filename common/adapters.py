"""Find a trained adapter and attach it to a base model, for the tools that use one
(``fedtune evaluate``, ``generate``, ``export``).

An adapter is given as a fedtune run folder (its ``adapter``, or ``--round N``), or as
any PEFT adapter folder. Everything that does not fit is a one-line ``ValueError`` /
``FileNotFoundError`` naming the path and the fix.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import RunConfig
from common.lora_aggregation import load_residual, set_residual
from common.model import set_adapter_state

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterSource:
    path: Path                    # the PEFT folder: adapter_config.json + weights
    run_cfg: RunConfig | None     # the run's config when the adapter comes from a run folder


def find_adapter(location: str, *, round_num: int | None = None) -> AdapterSource:
    """A run folder, one of its rounds, a run's ``adapter``/``best`` link, or a PEFT folder."""
    given = Path(location).expanduser()
    if not given.exists():
        raise FileNotFoundError(
            f"adapter '{location}' does not exist: give a run folder (runs/<stamp>), "
            "a round folder (runs/<stamp>/adapters/round-N) or a PEFT adapter folder")
    if is_run_folder(given):
        folder = _round_folder(given, round_num)
    elif round_num is not None:
        raise ValueError(f"--round needs a run folder, but '{location}' is not one "
                         "(no config.json + history.jsonl)")
    else:
        folder = given
    if not (folder / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(
            f"'{folder}' is neither a fedtune run folder (config.json + history.jsonl) "
            f"nor a PEFT adapter folder ({ADAPTER_CONFIG})")
    return AdapterSource(path=folder, run_cfg=_owning_run_config(folder))


def is_run_folder(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "history.jsonl").exists()


def run_config(run_dir: Path) -> RunConfig:
    try:
        values = json.loads((run_dir / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"run folder '{run_dir}': config.json is not JSON ({err.msg})") from None
    return RunConfig.from_mapping(values)


def _round_folder(run_dir: Path, round_num: int | None) -> Path:
    if round_num is None:
        if not (run_dir / "adapter").exists():
            raise FileNotFoundError(f"run folder '{run_dir}' has no adapter yet: no round finished")
        return run_dir / "adapter"
    folder = run_dir / "adapters" / f"round-{round_num}"
    if not folder.exists():
        rounds = sorted(int(p.name.split("-")[1]) for p in (run_dir / "adapters").glob("round-*"))
        raise FileNotFoundError(
            f"run folder '{run_dir}' has no round {round_num}; it holds rounds "
            f"{', '.join(map(str, rounds)) or 'none'}")
    return folder


def _owning_run_config(folder: Path) -> RunConfig | None:
    """The run's config when ``folder`` is (a link to) RUN/adapters/round-N: then the
    tools default to the run's model, LoRA settings, held-out split and max-length."""
    real = folder.resolve()
    if real.parent.name == "adapters" and is_run_folder(real.parent.parent):
        return run_config(real.parent.parent)
    return None


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.exists():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"adapter folder '{folder}' has no {' or '.join(WEIGHT_FILES)}")


def attach_adapter(base, folder: Path, *, model_name: str):
    """Wrap ``base`` with the adapter in ``folder``, refusing any tensor that does not fit.

    Not ``PeftModel.from_pretrained``: it only warns about missing or unused tensors,
    and an adapter from another model or rank would then run half-loaded.
    """
    from peft import PeftConfig, get_peft_model

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, OSError, TypeError) as err:
        raise ValueError(f"adapter '{folder}': cannot read {ADAPTER_CONFIG}: "
                         f"{str(err).splitlines()[0]}") from None
    config.inference_mode = True
    try:
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 deprecated alias; the tools' one-line
            # errors would otherwise come after three lines of this FutureWarning.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            # The adapter names the public Hub id of the built-in model (portable), while
            # fedtune loads that model from its local copy: peft's rename notice is expected.
            warnings.filterwarnings("ignore", message=".*`base_model_name_or_path` was renamed",
                                    category=UserWarning)
            model = get_peft_model(base, config)
        set_adapter_state(model, read_adapter_weights(folder))
        set_residual(model, load_residual(folder))  # lora-aggregation exact (if saved)
    except ValueError as err:
        raise ValueError(f"adapter '{folder}' does not fit model '{model_name}': "
                         f"{str(err).splitlines()[0]}") from None
    model.eval()
    return model
