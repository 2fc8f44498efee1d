"""The run folder: config, global adapter per round (PEFT format), metrics history,
and the server state that ``--resume`` continues from.

Every write is atomic (temp file or folder, then rename), so a crash never leaves a
half-written adapter, history or server state behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from common.config import RunConfig
from common.runtime import DATA_STATS_ENV, data_stats_file
from common.lora_aggregation import save_residual
from server.console import CONSOLE_ENV, OWN_LINE_MARK

HISTORY_COLUMNS = (
    "round", "train-loss", "eval-loss", "eval-perplexity", "eval-token-accuracy",
    "eval-accuracy", "eval-macro-f1", "val-loss", "lr", "server-lr", "rejected-round", "clients",
    "failures", "rejected", "aggregated",
    "bytes-sent", "bytes-received", "mb-total", "seconds",
)


STATE_DIR = "state"
# What an adapter and a server optimizer state are made of: a checkpoint trained with
# other values of these cannot be continued (other keys, e.g. num-server-rounds, may change).
RESUME_KEYS = ("task", "model", "lora-r", "lora-alpha", "lora-target-modules", "strategy")
_VERSIONED = ("fedtune", "flwr", "torch", "transformers", "peft", "numpy")


@dataclass(frozen=True)
class ServerState:
    """What ``--resume`` needs besides the adapter folder: the global arrays exactly as
    the strategy holds them (FedAdam's are float64, the PEFT adapter is the model's
    float32 copy), the server optimizer's state by attribute, and the run's config."""

    server_round: int
    arrays: dict[str, np.ndarray]
    optimizer: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # server/control.py: lr-plateau and early-stopping counters (JSON: floats exact)
    control: dict[str, Any] = field(default_factory=dict)


def check_resumable(state: ServerState, cfg: RunConfig, run_dir: Path) -> None:
    """Refuse a checkpoint that the current settings cannot continue, naming why."""
    now = cfg.to_mapping()
    diffs = [f"{key} {state.config.get(key)!r} -> {now[key]!r}" for key in RESUME_KEYS
             if state.config.get(key) != now[key]]
    if diffs:
        raise ValueError(f"cannot resume '{run_dir}': it was trained with other settings "
                         f"({'; '.join(diffs)}): resume with the run's settings or start a new run")
    if state.server_round >= cfg.num_server_rounds:
        raise ValueError(f"run '{run_dir}' has already completed round {state.server_round} of "
                         f"'num-server-rounds' {cfg.num_server_rounds}: raise --num-server-rounds "
                         "to continue it")
    _check_control_resumable(state, cfg, run_dir)


def _check_control_resumable(state: ServerState, cfg: RunConfig, run_dir: Path) -> None:
    """The controllers' state (server/control.py) must load under the new settings, and
    a run that stopped early needs a larger patience: checked here, before the run
    folder is touched (a refused resume must leave it as it was)."""
    if not (cfg.lr_plateau or cfg.early_stopping_patience):
        return
    from common.lr_control import LossControl

    if cfg.lr_plateau and "plateau" not in state.control:
        raise ValueError(f"cannot resume '{run_dir}' with 'lr-plateau' on: it ran without it "
                         "(no plateau state to continue): resume without --lr-plateau, or "
                         "start a new run")
    control = LossControl(cfg)
    control.load_state_dict(state.control)
    if control.stopper.stopped:
        raise ValueError(
            f"cannot resume '{run_dir}': it stopped early after round {state.server_round} "
            f"({control.stopper.reason()}): raise --early-stopping-patience or set it to 0 "
            "to train on")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def new_run_dir(cfg: RunConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser()
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


class RunFolder:
    """Layout::

        RUN_DIR/config.json            resolved config of the run
        RUN_DIR/adapters/round-N/      global adapter after round N (PeftModel format)
        RUN_DIR/adapter -> adapters/round-N   the latest one (symlink, swapped atomically)
        RUN_DIR/best -> adapters/round-N      the lowest held-out eval loss so far
                                       (none when evaluation is off: eval-examples 0)
        RUN_DIR/history.jsonl|.csv     one row per round (round 0 = before training)
        RUN_DIR/clients.jsonl          per-client train metrics per round
        RUN_DIR/run.log                what the server printed (round lines, summary)
        RUN_DIR/plots/*.png            curves (``fedtune plot``; end of ``fedtune simulate``)
        RUN_DIR/tensorboard/           TensorBoard event files (with --tensorboard)
        RUN_DIR/early-stop.json        why and when early stopping ended the run, what it saved
        RUN_DIR/state/round-N.*        server state after round N, for --resume (the last two)

    See docs/run-folder.md.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: RunConfig) -> "RunFolder":
        path = new_run_dir(cfg)
        if (path / "history.jsonl").exists():
            raise FileExistsError(
                f"run folder '{path}' already holds a run: choose another --run-dir"
            )
        path.mkdir(parents=True, exist_ok=True)
        folder = cls(path)
        folder.write_config(cfg)
        return folder

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.path / "config.json",
                          json.dumps(cfg.to_mapping(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def reopen(cls, path: str | Path) -> "RunFolder":
        """An existing run folder, to continue (``--resume``)."""
        folder = cls(Path(path).expanduser())
        if not (folder.path / "config.json").is_file():
            raise FileNotFoundError(f"'{path}' is not a fedtune run folder (no config.json): "
                                    "check the --resume path")
        return folder

    @property
    def latest_adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def best_adapter(self) -> Path:
        return self.path / "best"

    def save_adapter(self, model, server_round: int) -> Path:
        """``model.save_pretrained`` into a temp folder, then rename into place."""
        final = self.path / "adapters" / f"round-{server_round}"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".round-{server_round}-"))
        try:
            model.save_pretrained(tmp)
            save_residual(model, tmp)  # lora-aggregation exact: the residual, beside it
            if getattr(model, "fedtune_model_name", None):
                from common.model import record_adapter_base

                record_adapter_base(tmp, model.fedtune_model_name)
            share_folder(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._swap_link(self.latest_adapter, final.name)
        return final

    def mark_best(self, server_round: int) -> None:
        """Point ``best`` at a saved round (call after :meth:`save_adapter`)."""
        self._swap_link(self.best_adapter, f"round-{server_round}")

    def _swap_link(self, link: Path, round_dir: str) -> None:
        """A new relative symlink renamed over the old one: readers never see none."""
        link_tmp = self.path / f".{link.name}-link"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        link_tmp.symlink_to(Path("adapters") / round_dir)
        os.replace(link_tmp, link)

    def log(self, line: str, *, echo: bool = True) -> None:
        """Print a line (unless not ``echo``) and keep it in ``run.log``, so the run's
        story outlives the terminal. Under `fedtune simulate` the printed line is marked
        as fedtune's own (server/console.py)."""
        if echo:
            mark = OWN_LINE_MARK if os.environ.get(CONSOLE_ENV) else ""
            print("\n".join(mark + part for part in line.split("\n")), flush=True)
        with open(self.path / "run.log", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def append_history(self, row: dict[str, Any]) -> None:
        with open(self.path / "history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._write_history_csv(self.history())

    def _write_history_csv(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / "history.csv", buf.getvalue())

    def append_clients(self, rows: list[dict[str, Any]]) -> None:
        with open(self.path / "clients.jsonl", "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")

    def history(self) -> list[dict[str, Any]]:
        return self._read_jsonl("history.jsonl")

    def _read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # --- server state, for --resume ---------------------------------------------------
    def save_state(self, state: ServerState) -> None:
        """Tensors first, then the JSON sidecar. The sidecar is the commit: a crash in
        between leaves the previous round as the latest loadable state."""
        folder = self.path / STATE_DIR
        folder.mkdir(exist_ok=True)
        groups = {"global": state.arrays, **state.optimizer}
        flat = {f"{group}/{name}": np.ascontiguousarray(array)
                for group, arrays in groups.items() for name, array in arrays.items()}
        stem = folder / f"round-{state.server_round}"
        atomic_write_bytes(stem.with_suffix(".safetensors"), safetensors.numpy.save(flat))
        sidecar = {"round": state.server_round, "config": state.config,
                   "versions": state.versions or library_versions(),
                   # safetensors sorts its keys; FedAvgM's momentum is a list in key order
                   "order": {group: list(arrays) for group, arrays in groups.items()},
                   "control": state.control}
        atomic_write_text(stem.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
        for old in folder.glob("round-*.*"):  # only the newest committed state is kept
            if _round_of(old) < state.server_round:
                old.unlink(missing_ok=True)

    def load_state(self) -> ServerState:
        """The newest committed server state (a sidecar with its tensors)."""
        sidecars = sorted((self.path / STATE_DIR).glob("round-*.json"), key=_round_of)
        for sidecar in reversed(sidecars):
            tensors = sidecar.with_suffix(".safetensors")
            if not tensors.is_file():
                continue
            meta = json.loads(sidecar.read_text())
            flat = safetensors.numpy.load(tensors.read_bytes())
            groups = {group: {name: flat[f"{group}/{name}"] for name in names}
                      for group, names in meta["order"].items()}
            return ServerState(server_round=meta["round"], arrays=groups.pop("global"),
                               optimizer=groups, config=meta["config"], versions=meta["versions"],
                               control=meta.get("control", {}))
        raise FileNotFoundError(f"run folder '{self.path}' holds no server state "
                                f"({STATE_DIR}/round-N.json): no round finished there, or an "
                                "older fedtune wrote it; start a new run")

    def rewind(self, server_round: int) -> float:
        """Forget rows after ``server_round`` (a crash after the next round's history
        but before its state), point ``adapter`` and ``best`` at what remains, and
        return the best eval loss so far (inf: none)."""
        rows = [r for r in self.history() if r["round"] <= server_round]
        atomic_write_text(self.path / "history.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        self._write_history_csv(rows)
        clients = [r for r in self._read_jsonl("clients.jsonl") if r["round"] <= server_round]
        atomic_write_text(self.path / "clients.jsonl", "".join(json.dumps(r) + "\n" for r in clients))
        self._swap_link(self.latest_adapter, f"round-{server_round}")
        best_round, best_loss = None, float("inf")
        for row in (r for r in rows if r["round"] > 0):
            # the RoundHook's rule: NaN never wins, no eval-loss (evaluation off) neither
            if row.get("eval-loss", float("nan")) < best_loss:
                best_round, best_loss = row["round"], row["eval-loss"]
        if best_round is not None:
            self.mark_best(best_round)
        return best_loss


def _round_of(path: Path) -> int:
    return int(path.name.split(".")[0].removeprefix("round-"))


def share_folder(folder: Path) -> None:
    """0755 folders and 0644 files: mkdtemp makes 0700 and safetensors writes 0600, but
    an adapter is meant to be read by other users and containers mounting the run."""
    os.chmod(folder, 0o755)
    for path in Path(folder).rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def share_data_stats(report: dict) -> None:
    """Hand the preflight's counts (``DataReport.to_json()``) to this process and its
    children (the simulation, Ray's workers) in the file ``DATA_STATS_ENV`` names.
    `fedtune simulate` makes that file and removes it, also when the run is interrupted
    (the simulation process it starts is stopped by a signal, so its exit hooks never
    run); anywhere else a new one is made here and removed when this process exits."""
    named = os.environ.get(DATA_STATS_ENV)
    path = Path(named) if named else None
    if path is None or not path.is_file():
        import atexit

        path = data_stats_file()
        atexit.register(path.unlink, missing_ok=True)
        os.environ[DATA_STATS_ENV] = str(path)
    atomic_write_text(path, json.dumps(report))


def record_data_stats(run: "RunFolder") -> None:
    """The preflight's data counts (``share_data_stats``) into RUN_DIR/data-stats.json,
    one line per split/client and each skipped record in run.log; only the skipped
    total is printed."""
    path = os.environ.get(DATA_STATS_ENV)
    if not path or not Path(path).is_file() or not Path(path).stat().st_size:
        return  # started without the fedtune CLI (flwr run): no preflight counts
    report = json.loads(Path(path).read_text())
    atomic_write_text(run.path / "data-stats.json", json.dumps(report, indent=2) + "\n")
    for name, s in report["splits"].items():
        run.log(f"data | {name}: {s['records']} records: {s['kept']} kept, {s['truncated']} "
                f"truncated, {s['dropped']} dropped", echo=False)
    for item in report["skipped"]:
        run.log(f"data | skipped {item['where']}: {item['reason']}", echo=False)
    for name, items in report.get("dropped", {}).items():
        for item in items:
            run.log(f"data | {name}: dropped {item['where']}: {item['reason']}", echo=False)
    truncated = sum(s["truncated"] for s in report["splits"].values())
    dropped = sum(s["dropped"] for s in report["splits"].values())
    if truncated or dropped:
        run.log(f"fedtune: {truncated} examples truncated, {dropped} dropped at max-length "
                "(see run.log, data-stats.json)")
    if report["skipped"]:
        n = len(report["skipped"])
        run.log(f"fedtune: {n} record{'s' if n != 1 else ''} skipped (see run.log)")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; run files are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
