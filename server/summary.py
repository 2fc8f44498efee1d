"""The end of a run, the same from every launcher: the table, the headline, a command
to try the model (all kept in ``run.log``), and the plots.

``fedtune train`` calls :func:`finish_run` itself; for federated runs the ServerApp
calls it after its last round, so ``fedtune simulate`` and ``flwr run`` end alike.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
from pathlib import Path

from common.config import RunConfig

TRY_PROMPT = "Define the word 'otter' (noun)."
# `fedtune simulate` tells its child how the user invoked fedtune (server/cli.py), so
# the try-it line printed by the ServerApp can be pasted into the same shell.
INVOKED_AS_ENV = "FEDTUNE_INVOKED_AS"
EVALUATION_OFF = "evaluation off"  # printed where a run without evaluation has no metrics


def finish_run(cfg: RunConfig, run_dir: Path, seconds: float) -> None:
    """Summary lines (printed and appended to run.log), then the plots."""
    print_summary(run_dir, seconds, try_prompt(cfg))
    plot_after_run(run_dir)


def plot_after_run(run_dir: Path) -> None:
    """Curves for every run; the run itself succeeded, so a plotting problem only warns."""
    try:
        from server.checkpoints import RunFolder
        from server.plots import plot_run

        paths = plot_run(run_dir)
        RunFolder(run_dir).log(f"plots: {paths[0].parent}/ ({', '.join(p.name for p in paths)})")
    except Exception as err:  # noqa: BLE001 - any failure here must not fail the run
        print(f"fedtune: warning: plotting failed ({type(err).__name__}: {err}); "
              f"retry with `{invoked_as()} plot {run_dir}`", file=sys.stderr)


def try_prompt(cfg: RunConfig) -> str:
    """A prompt like the run's data: the first evaluation one, else the first training
    one when evaluation is off (the demo: a fixed word)."""
    from common.config import BUILTIN_DATASET

    if cfg.dataset == BUILTIN_DATASET:
        return TRY_PROMPT
    try:
        from common.data import eval_split, load_run_data, to_messages

        data = load_run_data(cfg, cfg.num_clients)  # cached since preflight
        records, fmt = (eval_split(cfg) if cfg.eval_dataset else
                        (data.heldout if len(data.heldout) else data.train_pool, data.fmt))
        return to_messages(records[0], fmt)[-2]["content"].splitlines()[0]
    except Exception:  # noqa: BLE001 - a hint line is not worth failing the summary
        return "Hello"


def print_summary(run_dir: Path, seconds: float, prompt: str = TRY_PROMPT) -> None:
    """The table, the headline and a command to try the model; also kept in run.log.
    A run without evaluation (eval-examples 0) says so instead of printing metrics."""
    from server.checkpoints import RunFolder

    run = RunFolder(run_dir)
    history = run.history()
    first, last = history[0], history[-1]
    if "eval-loss" in first:  # eval-every may skip rounds; the last evaluated one counts
        last = next(r for r in reversed(history) if "eval-loss" in r)
    task = json.loads((run_dir / "config.json").read_text()).get("task", "causal-lm")
    evaluated = "eval-loss" in first
    lm = task == "causal-lm"
    metrics = {} if not evaluated else (
        {"eval-perplexity": "perplexity", "eval-token-accuracy": "token acc"} if lm
        else {"eval-accuracy": "accuracy", "eval-macro-f1": "macro-F1"})
    header = [f"{'round':>5}", f"{'train loss':>10}"]
    header += ([f"{'eval loss':>9}"] + [f"{name:>10}" for name in metrics.values()]
               if evaluated else [])
    lines = ["", " ".join(header + [f"{'MB sent':>8}", f"{'MB recv':>8}", f"{'MB total':>9}"])]
    for row in history:
        cells = [f"{row['round']:>5}", f"{row.get('train-loss', math.nan):>10.4f}"]
        if evaluated and "eval-loss" in row:
            cells.append(f"{row['eval-loss']:>9.4f}")
            cells += [f"{row[c]:>10.2f}" if c == "eval-perplexity" else f"{row[c]:>10.3f}"
                      for c in metrics]
        elif evaluated:  # a round that eval-every skips
            cells += [f"{'-':>9}"] + [f"{'-':>10}"] * len(metrics)
        cells += [f"{row.get('bytes-sent', 0) / 1e6:>8.2f}",
                  f"{row.get('bytes-received', 0) / 1e6:>8.2f}", f"{row.get('mb-total', 0):>9.2f}"]
        lines.append(" ".join(cells))
    if not evaluated:
        headline = (f"{EVALUATION_OFF} (eval-examples 0): no held-out metrics; train loss "
                    f"{history[1]['train-loss'] if len(history) > 1 else math.nan:.4f} -> "
                    f"{last.get('train-loss', math.nan):.4f}")
    elif lm:
        ratio = last["eval-perplexity"] / first["eval-perplexity"]
        change = (f"{1 - ratio:.0%} lower" if ratio <= 1 else
                  f"{ratio:.1f}x higher: the run made the model worse; lower --lr")
        headline = (f"held-out perplexity {first['eval-perplexity']:.2f} -> "
                    f"{last['eval-perplexity']:.2f} ({change})")
    else:
        headline = (f"held-out accuracy {first['eval-accuracy']:.3f} -> {last['eval-accuracy']:.3f}, "
                    f"macro-F1 {first['eval-macro-f1']:.3f} -> {last['eval-macro-f1']:.3f}")
    if evaluated:
        best = min([r for r in history[1:] if "eval-loss" in r] or history,
                   key=lambda r: r["eval-loss"])
        best_text = f"best: {run_dir / 'best'} = round {best['round']}"
    else:
        best_text = f"no best: {EVALUATION_OFF}"
    lines += [
        "",
        f"{headline} after {last['round']} round{'s' * (last['round'] != 1)} in {seconds:.0f} s",
        f"run folder: {run_dir}  (global adapter: {run_dir / 'adapter'}, {best_text})",
    ]
    if lm:
        lines.append(f"try it: {invoked_as()} generate --adapter {run_dir} "
                     f"--prompt {_double_quoted(prompt)}")
    for line in lines:
        run.log(line)


def invoked_as() -> str:
    """`fedtune` as the user can paste it into the same shell: the path they typed when
    `fedtune` alone would not run it (README's `.venv/bin/fedtune simulate`, venv not
    activated), else `fedtune` (also under `python -m server.cli`)."""
    if os.environ.get(INVOKED_AS_ENV):
        return os.environ[INVOKED_AS_ENV]
    typed = sys.argv[0] if sys.argv else ""
    if Path(typed).name != "fedtune":
        return "fedtune"
    on_path = shutil.which("fedtune")
    if on_path and Path(on_path).resolve() == Path(typed).resolve():
        return "fedtune"
    return shlex.quote(typed)


def _double_quoted(text: str) -> str:
    """Shell double quotes: reads better than shlex.quote for prompts with apostrophes."""
    return '"' + "".join("\\" + c if c in '"$`\\' else c for c in text) + '"'
