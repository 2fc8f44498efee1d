"""PNG curves of a run, drawn from its ``history.jsonl`` and ``clients.jsonl``."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from server.tracking import client_label

PLOTS_DIR = "plots"
EPSILON = "epsilon"  # history column of a DP run: the privacy budget spent up to that round
CLIENT_EPSILON = "client-epsilon"  # client-level DP (server/privacy.py)
AGG_ERROR = "agg-error-mean"  # naive averaging's relative error (server/lora_aggregation.py)


def plot_run(run_dir: Path) -> list[Path]:
    """Write RUN_DIR/plots/{loss,perplexity,clients,traffic}.png (a classifier:
    accuracy.png for perplexity.png), plus epsilon.png when the history has an epsilon
    column; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers, CI or Ray workers
    run_dir = Path(run_dir)
    history = _read_jsonl(run_dir / "history.jsonl")
    if not history:
        raise FileNotFoundError(f"'{run_dir}' has no history.jsonl rows: give a fedtune run folder "
                                "with at least round 0 done (the one `fedtune simulate` printed)")
    clients = _read_jsonl(run_dir / "clients.jsonl")
    out = run_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    title = run_dir.resolve().name
    paths = [_loss(history, out / "loss.png", title)]
    # a classifier's history has accuracy and macro-F1 instead of perplexity; a run with
    # evaluation off (eval-examples 0) neither
    if _series(history, "eval-perplexity")[0]:
        paths.append(_perplexity(history, out / "perplexity.png", title))
    elif _series(history, "eval-accuracy")[0]:
        paths.append(_accuracy(history, out / "accuracy.png", title))
    paths += [_clients(clients, out / "clients.png", title),
              _traffic(history, out / "traffic.png", title)]
    if _series(history, EPSILON)[0] or _series(history, CLIENT_EPSILON)[0]:  # DP runs only
        paths.append(_epsilon(history, out / "epsilon.png", title))
    if _series(history, AGG_ERROR)[0]:  # LoRA adapters (server/lora_aggregation.py)
        paths.append(_aggregation(history, out / "aggregation.png", title))
    return paths


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows that have a finite ``key`` (round 0 has no train loss)."""
    pairs = [(r["round"], r[key]) for r in rows
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _loss(history, path, title):
    fig, ax = _figure(f"Loss per round — {title}", "loss (NLL per response token)")
    ax.plot(*_series(history, "train-loss"), marker="o", label="train (clients, example-weighted)")
    ax.plot(*_series(history, "eval-loss"), marker="o", label="held-out eval (server)")
    ax.legend()
    return _save(fig, path)


def _perplexity(history, path, title):
    fig, ax = _figure(f"Held-out perplexity — {title}", "perplexity (response tokens)")
    ax.plot(*_series(history, "eval-perplexity"), marker="o", color="tab:green")
    return _save(fig, path)


def _accuracy(history, path, title):
    fig, ax = _figure(f"Held-out accuracy — {title}", "accuracy / macro-F1")
    ax.plot(*_series(history, "eval-accuracy"), marker="o", label="accuracy")
    ax.plot(*_series(history, "eval-macro-f1"), marker="o", label="macro-F1")
    ax.legend()
    return _save(fig, path)


def _clients(clients, path, title):
    fig, ax = _figure(f"Train loss per client — {title}", "local train loss")
    for label in sorted({client_label(c) for c in clients}):
        ax.plot(*_series([c for c in clients if client_label(c) == label], "train-loss"),
                marker="o", label=label)
    if clients:
        ax.legend()
    return _save(fig, path)


def _traffic(history, path, title):
    fig, ax = _figure(f"Cumulative traffic — {title}", "MB (train messages as serialized)")
    rounds = [r["round"] for r in history]
    for key, label in (("bytes-sent", "sent by the server"), ("bytes-received", "received")):
        total, cumulative = 0.0, []
        for row in history:
            total += row.get(key, 0) / 1e6
            cumulative.append(total)
        ax.plot(rounds, cumulative, marker="o", label=label)
    ax.legend()
    return _save(fig, path)


def _epsilon(history, path, title):
    fig, ax = _figure(f"Privacy budget spent — {title}", "epsilon spent since round 1 (cumulative)")
    for key, label, color in ((EPSILON, "sample-level (DP-SGD, largest client)", "tab:red"),
                              (CLIENT_EPSILON, "client-level", "tab:purple")):
        if _series(history, key)[0]:
            ax.plot(*_series(history, key), marker="o", color=color, label=label)
    ax.legend()
    return _save(fig, path)


def _aggregation(history, path, title):
    fig, ax = _figure(f"LoRA aggregation error — {title}",
                      "||mean(B_i A_i) - applied||_F / ||mean(B_i A_i)||_F")
    for key, label in (("agg-error-mean", "naive mean(B) mean(A), layer mean"),
                       ("agg-error-max", "naive, worst layer"),
                       ("applied-error-mean", "applied aggregate, layer mean"),
                       ("applied-error-max", "applied aggregate, worst layer")):
        if _series(history, key)[0]:
            ax.plot(*_series(history, key), marker="o", label=label,
                    linestyle="-" if key.startswith("agg") else "--")
    ax.set_yscale("symlog", linthresh=1e-6)  # the exact modes sit at float rounding
    ax.legend()
    return _save(fig, path)


def _figure(title: str, ylabel: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("federated round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".png")
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
