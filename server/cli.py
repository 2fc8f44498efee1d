"""`fedtune` command line: one typed config, parsed here and handed to the apps.

This module dispatches: ``simulate`` lives here, the tools around a finished run
(``evaluate``, ``generate``, ``export``, ``plot``) in ``server/tools.py``.

``fedtune simulate`` runs the ServerApp and N simulated ClientApps on this machine
through Flower's simulation engine, in a child process group, so that a finished or
interrupted run (Ctrl-C included) leaves no Flower or Ray process behind.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from common.config import RunConfig, config_fields, parse_run_config_string
from common.runtime import CONFIG_ENV, setup_process
from server.tools import TRY_PROMPT, add_tool_parsers

EXAMPLE = """example:
  fedtune simulate                                   # built-in demo: SmolLM2 + WordNet, 4 clients
  fedtune simulate --num-server-rounds 5 --strategy fedprox --proximal-mu 0.01 --tensorboard
  fedtune simulate --model HuggingFaceTB/SmolLM2-360M-Instruct --dataset my_data.jsonl \\
      --partitioner iid --categories '' --num-clients 3

defaults: every --key's default is in `fedtune simulate --help` (README: configuration reference).
"""
TOOLS_EXAMPLE = """
after a run (RUN = the run folder it printed, e.g. runs/20261126-145844):
  fedtune evaluate --adapter RUN                     # held-out loss, perplexity, token accuracy
  fedtune generate --adapter RUN --compare --prompt "Define the word 'otter' (noun)."
  fedtune export --adapter RUN/best --out models/my-model   # merged, loads without peft
  fedtune plot RUN                                   # RUN/plots/*.png
each subcommand's --help shows its examples and defaults.
"""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line like every other fedtune error
    (subparsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"fedtune: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="fedtune", allow_abbrev=False, description="Federated LoRA fine-tuning of language models on Flower.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE + TOOLS_EXAMPLE)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate", help="run the server and N simulated clients on this machine", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE,
        description="Run a federated fine-tuning on this machine (Flower simulation).")
    add_config_arguments(sim)
    add_tool_parsers(sub)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-config", metavar="'k=v ...' | FILE.toml", default="",
        help="settings as Flower's --run-config string or a TOML file; --key flags win")
    for key, default, help_text in config_fields():
        # A bool may be given bare (--tensorboard) or with a value (--tensorboard false).
        flag = dict(nargs="?", const="true") if isinstance(default, bool) else {}
        parser.add_argument(f"--{key}", dest=key, default=None, metavar="V",
                            help=f"{help_text} (default: {default!r})", **flag)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values: dict = {}
    if args.run_config:
        source = Path(args.run_config)
        if source.suffix == ".toml":
            if not source.exists():
                raise FileNotFoundError(f"--run-config file '{source}' does not exist")
            with open(source, "rb") as fh:
                values.update(tomllib.load(fh))
        else:
            values.update(parse_run_config_string(args.run_config))
    for key, _, _ in config_fields():
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return RunConfig.from_mapping(values)


def preflight(cfg: RunConfig) -> RunConfig:
    """Fail fast, in this process, on what would otherwise fail inside every client:
    bad model path, bad dataset, impossible partitioning. Also converts the built-in
    model once, before clients start (so they never race to do it)."""
    from common.data import load_run_data
    from common.model import load_tokenizer, resolve_model_path

    resolve_model_path(cfg.model)
    load_tokenizer(cfg.model)
    load_run_data(cfg, cfg.num_clients)
    if not cfg.run_dir:
        cfg = cfg.replace(run_dir=str(Path("runs") / time.strftime("%Y%m%d-%H%M%S")))
    if (Path(cfg.run_dir) / "history.jsonl").exists():
        raise FileExistsError(f"run folder '{cfg.run_dir}' already holds a run: choose another --run-dir")
    return cfg


def simulate(cfg: RunConfig) -> int:
    env = dict(os.environ, **{CONFIG_ENV: json.dumps(cfg.to_mapping())})
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "server.simulation"], env=env,
                             start_new_session=True, preexec_fn=_die_with_parent)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        print("\nfedtune: interrupted, stopping the simulation ...", file=sys.stderr)
        stop_process_group(child)
        return 130
    finally:
        stop_process_group(child)
    if code != 0:
        print(f"fedtune: simulation failed (exit code {code}); see the log above", file=sys.stderr)
        return code
    print_summary(Path(cfg.run_dir), time.perf_counter() - started, try_prompt(cfg))
    plot_after_run(Path(cfg.run_dir))
    return 0


def plot_after_run(run_dir: Path) -> None:
    """Curves for every run; the run itself succeeded, so a plotting problem only warns."""
    try:
        from server.plots import plot_run

        paths = plot_run(run_dir)
        print(f"plots: {paths[0].parent}/ ({', '.join(p.name for p in paths)})")
    except Exception as err:  # noqa: BLE001 - any failure here must not fail the run
        print(f"fedtune: warning: plotting failed ({type(err).__name__}: {err}); "
              f"retry with `fedtune plot {run_dir}`", file=sys.stderr)


def try_prompt(cfg: RunConfig) -> str:
    """A prompt like the run's data: the first held-out one (the demo: a fixed word)."""
    from common.config import BUILTIN_DATASET

    if cfg.dataset == BUILTIN_DATASET:
        return TRY_PROMPT
    try:
        from common.data import load_run_data, to_messages

        data = load_run_data(cfg, cfg.num_clients)  # cached since preflight
        return to_messages(data.heldout[0], data.fmt)[-2]["content"].splitlines()[0]
    except Exception:  # noqa: BLE001 - a hint line is not worth failing the summary
        return "Hello"


def _die_with_parent() -> None:
    """Linux: SIGTERM the simulation if this process is killed (even by SIGKILL),
    so that a killed `fedtune` never leaves an orphaned simulation behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_process_group(child: subprocess.Popen) -> None:
    """SIGTERM the child's whole group (Ray workers included), SIGKILL what lingers."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(child.pid, 0)
            except ProcessLookupError:
                return
            child.poll()
            time.sleep(0.2)


def print_summary(run_dir: Path, seconds: float, prompt: str = TRY_PROMPT) -> None:
    """The table, the headline and a command to try the model; also kept in run.log."""
    from server.checkpoints import RunFolder

    run = RunFolder(run_dir)
    history = run.history()
    first, last = history[0], history[-1]
    drop = 1 - last["eval-perplexity"] / first["eval-perplexity"]
    best = min(history[1:] or history, key=lambda r: r["eval-loss"])
    lines = ["", f"{'round':>5} {'train loss':>10} {'eval loss':>9} {'perplexity':>10} "
                 f"{'token acc':>9} {'MB sent':>8} {'MB recv':>8}"]
    for row in history:
        lines.append(
            f"{row['round']:>5} {row.get('train-loss', math.nan):>10.4f} {row['eval-loss']:>9.4f} "
            f"{row['eval-perplexity']:>10.2f} {row['eval-token-accuracy']:>9.3f} "
            f"{row.get('bytes-sent', 0) / 1e6:>8.2f} {row.get('bytes-received', 0) / 1e6:>8.2f}")
    lines += [
        "",
        f"held-out perplexity {first['eval-perplexity']:.2f} -> {last['eval-perplexity']:.2f} "
        f"({drop:.0%} lower) after {last['round']} rounds in {seconds:.0f} s",
        f"run folder: {run_dir}  (global adapter: {run_dir / 'adapter'}, "
        f"best: {run_dir / 'best'} = round {best['round']})",
        f"try it: fedtune generate --adapter {run_dir} --prompt {_double_quoted(prompt)}",
    ]
    for line in lines:
        run.log(line)


def _double_quoted(text: str) -> str:
    """Shell double quotes: reads better than shlex.quote for prompts with apostrophes."""
    return '"' + "".join("\\" + c if c in '"$`\\' else c for c in text) + '"'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """argparse, plus a nearest-key hint for a mistyped --flag."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        keys = _option_flags(parser, args.command)
        close = difflib.get_close_matches(flag.split("=")[0], keys, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; see `fedtune {args.command} --help`"
        parser.exit(2, f"fedtune: error: unknown option '{flag}'{hint}\n")
    return args


def _option_flags(parser: argparse.ArgumentParser, command: str) -> list[str]:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [flag for flag in subparsers.choices[command]._option_string_actions
            if flag.startswith("--") and flag != "--help"]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = parse_args(argv)
    try:
        if args.command != "simulate":
            return args.run(args)
        cfg = config_from_args(args)
        if _is_offline_config(cfg):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        setup_process(cfg.num_threads)
        cfg = preflight(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2
    return simulate(cfg)


def _is_offline_config(cfg: RunConfig) -> bool:
    from common.config import BUILTIN_DATASET, BUILTIN_MODEL

    local = lambda s, builtin: s == builtin or Path(s).expanduser().exists()  # noqa: E731
    return local(cfg.model, BUILTIN_MODEL) and local(cfg.dataset, BUILTIN_DATASET)


if __name__ == "__main__":
    sys.exit(main())
