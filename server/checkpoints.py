"""The run folder: config, global adapter per round (PEFT format), metrics history.

Every write is atomic (temp file or folder, then rename), so a crash never leaves a
half-written adapter or history behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common.config import RunConfig

HISTORY_COLUMNS = (
    "round", "train-loss", "eval-loss", "eval-perplexity", "eval-token-accuracy",
    "eval-accuracy", "eval-macro-f1", "clients", "failures", "rejected", "aggregated",
    "bytes-sent", "bytes-received", "mb-total", "seconds",
)


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
        RUN_DIR/history.jsonl|.csv     one row per round (round 0 = before training)
        RUN_DIR/clients.jsonl          per-client train metrics per round
        RUN_DIR/run.log                what the server printed (round lines, summary)
        RUN_DIR/plots/*.png            curves (``fedtune plot``; end of ``fedtune simulate``)
        RUN_DIR/tensorboard/           TensorBoard event files (with --tensorboard)

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
        atomic_write_text(path / "config.json",
                          json.dumps(cfg.to_mapping(), indent=2, sort_keys=True) + "\n")
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

    def log(self, line: str) -> None:
        """Print a line and keep it in ``run.log``, so the run's story outlives the terminal."""
        print(line, flush=True)
        with open(self.path / "run.log", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def append_history(self, row: dict[str, Any]) -> None:
        with open(self.path / "history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        rows = self.history()
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
        path = self.path / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; run files are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
