"""`fedtune` command line: one typed config, parsed here and handed to the apps.

This module dispatches: ``simulate`` lives here, ``train`` (centralized and local-only
baselines) in ``server/centralized.py``, ``personalize`` in ``common/personalize.py``,
the tools around a finished run (``evaluate``, ``generate``, ``export``, ``plot``) in
``server/tools.py``.

``fedtune simulate`` runs the ServerApp and N simulated ClientApps on this machine
through Flower's simulation engine, in a child process group, so that a finished or
interrupted run (Ctrl-C included) leaves no Flower or Ray process behind.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from common.config import RunConfig, config_fields, parse_run_config_string
from common.runtime import CONFIG_ENV, setup_process
from server.simulation import INPUT_ERROR_EXIT
from server.summary import INVOKED_AS_ENV, finish_run, invoked_as
from server.tools import add_tool_parsers

EXAMPLE = """example:
  fedtune simulate                                   # built-in demo: SmolLM2 + WordNet, 4 clients
  fedtune simulate --num-server-rounds 5 --strategy fedprox --proximal-mu 0.01 --tensorboard
  fedtune simulate --resume runs/20261126-145844    # continue an interrupted run
  fedtune simulate --resume runs/20261126-145844 --num-server-rounds 6   # or extend it
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


TRAIN_EXAMPLE = """example:
  fedtune train                        # centralized baseline of the default demo
  fedtune train --partition-id 0       # local-only baseline: client 0 (noun.animal) alone
  fedtune train --l2sp-weight 0.1 --distill-teacher base
  fedtune train --task classification --model minilm-l6-v2 --partitioner iid \\
      --categories noun.animal,noun.food,noun.plant,noun.body --batch-size 32
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
    sim.add_argument("--verbose", action="store_true",
                     help="show Flower's and Ray's log lines live (default: only fedtune's "
                          "lines and warnings/errors; everything is in RUN_DIR/run.log)")
    sim.add_argument("--resume", dest="resume-from", default=None, metavar="RUN_DIR",
                     help="continue this run folder after its last completed round, with its "
                          "config; flags given here override it (same as --resume-from; "
                          "default: none, a new run)")
    train = sub.add_parser(
        "train", help="the same trainer without Flower: centralized or local-only baseline",
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EXAMPLE,
        description="Fine-tune without federation, with the same config and run folder. "
                    "Centralized: the pooled partitions of all clients, as many optimizer "
                    "steps as the federation takes in total. Local-only (--partition-id): "
                    "one client's partition, the steps that client takes in the federation.")
    train.add_argument("--partition-id", type=int, default=None, metavar="N",
                       help="train on this client's partition alone (default: all, pooled)")
    add_config_arguments(train)
    train.set_defaults(run=train_command)
    pers = sub.add_parser(
        "personalize", help="k-shot adaptation of a run's adapter: unseen tasks, or each client",
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  fedtune personalize runs/20261126-145844 --unseen-categories "
               "noun.artifact,verb.motion --shots 4,8,16,32\n"
               "  fedtune personalize runs/20261126-145844 --k-steps 5   (each client's own data)\n",
        description="With unseen tasks (--unseen-categories, or the run's "
                    "meta-test-categories): the k-shot protocol on each task, k support "
                    "examples, --steps adaptation steps, query loss on disjoint examples, "
                    "mean and spread over tasks and seeds (common/meta.py). Otherwise each "
                    "client fine-tunes on a support split of its own data.")
    pers.add_argument("run_dir", metavar="RUN_DIR",
                      help="a run folder (its config.json and adapter are used)")
    pers.add_argument("--steps", "--k-steps", dest="k_steps", type=int, default=5, metavar="N",
                      help="adaptation steps (default: 5)")
    pers.add_argument("--unseen-categories", default=None, metavar="A,B",
                      help="tasks the run never trained on (default: its meta-test-categories)")
    pers.add_argument("--shots", default=None, metavar="K,K",
                      help="unseen tasks: support set sizes k (default: 4,8,16,32)")
    pers.add_argument("--seeds", type=int, default=None, metavar="N",
                      help="unseen tasks: episodes per task, seeds 0..N-1 (default: 3)")
    pers.add_argument("--adapt-lr", type=float, default=None, metavar="LR",
                      help="unseen tasks: adaptation lr (default: 0.3 x the run's lr, the "
                           "best for trained adapters in docs/meta-learning.md)")
    pers.add_argument("--support-examples", type=int, default=16, metavar="N",
                      help="each client: support split size (default: 16)")
    pers.add_argument("--query-examples", type=int, default=32, metavar="N",
                      help="query split size per client or task (default: 32)")
    pers.set_defaults(run=personalize_command)
    add_tool_parsers(sub)
    from server.datatool import add_data_parser

    add_data_parser(sub, add_config_arguments)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-config", metavar="'k=v ...' | FILE.toml", default="",
        help="settings as Flower's --run-config string or a TOML file; --key flags win "
             "(default: none)")
    for key, default, help_text in config_fields():
        # A bool may be given bare (--tensorboard) or with a value (--tensorboard false).
        flag = dict(nargs="?", const="true") if isinstance(default, bool) else {}
        # argparse %-formats help strings: a literal % in a config's text must be %%
        text = f"{help_text} (default: {default!r})".replace("%", "%%")
        parser.add_argument(f"--{key}", dest=key, default=None, metavar="V", help=text, **flag)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values: dict = {}
    resume = getattr(args, "resume-from", None)
    if resume:  # the run's own config first: `--resume RUN` alone continues it unchanged
        values.update(_run_config_of(resume))
    if args.run_config:
        source = Path(args.run_config)
        if source.suffix == ".toml":
            if not source.exists():
                raise FileNotFoundError(f"--run-config file '{source}' does not exist: check the path")
            with open(source, "rb") as fh:
                values.update(tomllib.load(fh))
        else:
            values.update(parse_run_config_string(args.run_config))
    for key, _, _ in config_fields():
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if resume:
        values.setdefault("run-dir", resume)
    return RunConfig.from_mapping(values)


def _run_config_of(run_dir: str) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a fedtune run folder (no config.json): "
                                "check the --resume path")
    values = json.loads(path.read_text())
    values.pop("run-dir", None)  # the folder may have moved; it is where it is now
    return values


def preflight(cfg: RunConfig, *, pooled: bool = False) -> RunConfig:
    """:func:`check_inputs`, then :func:`prepare_run_dir` (``fedtune train``: one process;
    ``pooled``: the DP plan is the pooled data's, printed by the trainer)."""
    return prepare_run_dir(check_inputs(cfg, pooled=pooled))


def prepare_run_dir(cfg: RunConfig) -> RunConfig:
    """The run folder: a resumed run's, the one given, or runs/<stamp>; refuses a folder
    that already holds a run. Cheap (no torch): `fedtune simulate`'s parent runs it."""
    if cfg.resume_from:
        if not (Path(cfg.resume_from) / "config.json").is_file():
            raise FileNotFoundError(f"'{cfg.resume_from}' is not a fedtune run folder (no "
                                    "config.json): check the --resume path")
        return cfg.replace(run_dir=cfg.resume_from)
    if not cfg.run_dir:
        cfg = cfg.replace(run_dir=str(Path("runs") / time.strftime("%Y%m%d-%H%M%S")))
    if (Path(cfg.run_dir) / "history.jsonl").exists():
        raise FileExistsError(f"run folder '{cfg.run_dir}' already holds a run: choose another --run-dir")
    return cfg


def check_inputs(cfg: RunConfig, *, pooled: bool = False) -> RunConfig:
    """Fail fast, before any client starts, on what would otherwise fail inside every
    client: bad model path, bad dataset, impossible partitioning, a run that cannot be
    resumed. Also converts the built-in model once, before clients start (so they never
    race to do it). `fedtune simulate` runs it in its child, before Ray starts.
    Returns the config the apps get (a distillation teacher's path made absolute)."""
    from common.datacheck import data_report
    from common.model import check_target_modules, load_tokenizer, resolve_model_path
    from server.checkpoints import share_data_stats

    resolve_model_path(cfg.model)
    check_target_modules(cfg)
    from common.student import check_teacher

    cfg = check_teacher(cfg)  # an absolute path: clients may run in another folder
    if cfg.student_layers:  # built once here, before clients start (they reuse its folder)
        from common.student import describe_student

        from server.console import say

        say(f"fedtune: {describe_student(cfg)}")
    # Load, split and tokenize every partition once, here: an empty partition, a client
    # with no usable example, a Dirichlet split that cannot be drawn, a bad record or a
    # tokenizer without a chat template stop the run before Ray starts, not in a client.
    report = data_report(cfg, load_tokenizer(cfg.model))
    share_data_stats(report.to_json())  # the run folder records it
    check_privacy_plan(cfg, show=not pooled)
    if cfg.resume_from:
        from server.checkpoints import RunFolder, check_resumable

        run = RunFolder.reopen(cfg.resume_from)
        check_resumable(run.load_state(), cfg, run.path)
    return cfg


def check_privacy_plan(cfg: RunConfig, *, show: bool = True) -> None:
    """DP settings that no client could honour fail here, once, not in every client;
    ``show``: print each client's DP-SGD plan before training."""
    if cfg.dp_sgd:
        from common.dp import describe_plan, describe_settings, plan
        from server.console import say

        if show:
            say(f"fedtune: {describe_settings(cfg)}")
        from common.data import load_run_data

        data = load_run_data(cfg, cfg.num_clients)  # records, not examples, set the plan
        examples = 0
        for partition_id in range(cfg.num_clients):
            rows = len(data.partition(partition_id, cfg.max_examples_per_client))
            dp = plan(cfg, num_examples=rows, planned_steps=cfg.num_server_rounds * cfg.local_steps)
            examples += round(dp.expected_batch_size * dp.planned_steps)
            if show:
                who = f"client {partition_id}"
                say(f"fedtune: {describe_plan(dp, num_examples=rows, who=who)}")
        from common.model import resolve_device

        if show and resolve_device(cfg.device).type == "cpu":
            # The default plan is sized for a GPU; on a CPU it can run for hours: say so.
            from common.model import BUILTIN_MODEL

            cost = ""
            if cfg.model == BUILTIN_MODEL:  # measured: docs/privacy-bench.md, 2 cores
                cost = (f": for the built-in model up to about {_duration(examples * 2.0)} "
                        "on 2 cores (2 s per example, docs/privacy.md)")
            say(f"fedtune: DP-SGD computes per-sample gradients in float32 for up to "
                f"{examples:,} examples on the CPU{cost}; lower --grad-accum (the logical "
                "batch) or --local-steps for a shorter run, at some utility (docs/privacy.md)")
    if cfg.client_dp != "off":
        from server.strategies import build_strategy

        build_strategy(cfg)  # Flower's wrappers check their own settings


def _duration(seconds: float) -> str:
    """'40 min' or '3.2 h'."""
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def simulate(cfg: RunConfig, *, verbose: bool = False) -> int:
    """Run the simulation child; its output goes through :class:`ConsoleFilter`: fedtune's
    lines and problems to the terminal, everything to RUN/run.log (``verbose``: all live).
    The ServerApp prints the summary and writes the plots at the end of its last round."""
    from common.runtime import DATA_STATS_ENV, data_stats_file

    stats = data_stats_file()  # the child's preflight fills it; removed whatever happens
    # SIGTERM (kill, a job scheduler) stops the run as Ctrl-C does: the finally blocks
    # stop the simulation's process group and remove the counts' file
    previous = _exit_on_sigterm()
    try:
        return _simulate_child(cfg, {DATA_STATS_ENV: str(stats)}, verbose=verbose)
    finally:
        stats.unlink(missing_ok=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _simulate_child(cfg: RunConfig, extra_env: dict, *, verbose: bool) -> int:
    from server.console import CONSOLE_ENV, ConsoleFilter

    env = dict(os.environ, **{CONFIG_ENV: json.dumps(cfg.to_mapping()), CONSOLE_ENV: "1",
                              INVOKED_AS_ENV: invoked_as(), "PYTHONUNBUFFERED": "1"},
               **extra_env)
    console = ConsoleFilter(Path(cfg.run_dir) / "run.log", verbose=verbose)
    child = subprocess.Popen([sys.executable, "-m", "server.simulation"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", bufsize=1,
                             start_new_session=True, preexec_fn=_die_with_parent)
    try:
        for line in child.stdout:
            console.feed(line)
        code = child.wait()
    except KeyboardInterrupt:
        print("\nfedtune: interrupted, stopping the simulation ...", file=sys.stderr)
        stop_process_group(child)
        return 130
    finally:
        stop_process_group(child)
        console.close()
    if code == INPUT_ERROR_EXIT and console.error_shown:
        return code  # the child's one-line "fedtune: error: ..." is already shown, last
    if code != 0:
        if console.pending:  # it failed before the run folder existed: show its last lines
            print("\n".join(console.pending[-40:]), file=sys.stderr)
            where = "above"
        else:
            where = f"in {Path(cfg.run_dir) / 'run.log'}"
        print(f"fedtune: simulation failed (exit code {code}); its log is {where}",
              file=sys.stderr)
        return code
    reason = no_round_aggregated(Path(cfg.run_dir))
    if reason:
        print(f"fedtune: error: {reason}", file=sys.stderr)
        return 1
    return 0


def no_round_aggregated(run_dir: Path) -> str:
    """A one-line reason when the run trained nothing (every round kept the initial
    adapter, e.g. every client failed), else ''."""
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return f"the run wrote no history in {run_dir}: no round completed"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rounds = [r for r in rows if r.get("round", 0) > 0]
    if rounds and not any(r.get("aggregated", 1) for r in rounds):
        failures = sum(r.get("failures", 0) for r in rounds)
        return (f"no round aggregated a client update ({len(rounds)} rounds, {failures} failed "
                f"replies): the adapter is untrained; see {run_dir / 'run.log'} and the "
                "client errors above")
    return ""


def _exit_on_sigterm():
    """SIGTERM raises SystemExit(143) in this process; returns the previous handler, or
    None where none can be set (not the main thread)."""
    def stop(signum, frame):
        print("\nfedtune: terminated (SIGTERM), stopping the simulation ...", file=sys.stderr)
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:
        return None


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
            child.poll()
            if not _group_running(child.pid):
                return
            time.sleep(0.1)


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. Zombies do not count: Ray's
    actors end as zombies of the exited raylet until init reaps them, and waiting for
    that cost 0.8 to 1.6 s after every run here. ``killpg(pgid, 0)`` (which counts
    zombies too) decides wherever /proc cannot: no /proc, or a /proc of another PID
    namespace that shows none of the group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    seen = False
    for pid in entries:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
                fields = stat.read().rsplit(b")", 1)[1].split()
            if len(fields) < 3 or int(fields[2]) != pgid:
                continue
            seen = True
            # a zombie leader whose other threads still run is a live process
            if fields[0] not in (b"Z", b"X", b"x") or len(os.listdir(f"/proc/{pid}/task")) > 1:
                return True
        except (OSError, IndexError, ValueError):
            continue  # it ended while we looked
    return not seen  # killpg finds the group but /proc shows none of it: trust killpg


def train_command(args: argparse.Namespace) -> int:
    from server.centralized import refuse_federated_only, run_centralized

    # Settings a single trainer cannot honour are refused before the data preflight.
    cfg = config_from_args(args)
    if cfg.resume_from:
        raise ValueError("'resume-from' works with `fedtune simulate` and `flwr run`; "
                         "`fedtune train` always starts a new run: unset it")
    if args.partition_id is not None and not 0 <= args.partition_id < cfg.num_clients:
        raise ValueError(f"--partition-id {args.partition_id} is outside 0..{cfg.num_clients - 1}: "
                         f"pick one of the {cfg.num_clients} clients, or raise --num-clients")
    refuse_federated_only(cfg)
    cfg = _prepared_config(args, pooled=True)
    started = time.perf_counter()
    run = run_centralized(cfg, partition_id=args.partition_id)
    finish_run(cfg, run.path, time.perf_counter() - started)
    return 0


def personalize_command(args: argparse.Namespace) -> int:
    from common.adapters import find_adapter, read_adapter_weights

    source = find_adapter(args.run_dir)
    if source.run_cfg is None:
        raise ValueError(f"'{args.run_dir}' is not a fedtune run folder: personalize needs "
                         "the run's config.json for its clients' data")
    cfg = source.run_cfg
    tasks = (args.unseen_categories if args.unseen_categories is not None
             else cfg.meta_test_categories)
    tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if tasks:
        return _kshot_command(args, cfg, tasks, source)
    given = [flag for flag, value in (("--shots", args.shots), ("--seeds", args.seeds),
                                      ("--adapt-lr", args.adapt_lr)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} set the k-shot protocol on unseen tasks, and "
                         f"'{args.run_dir}' holds none out (no meta-test-categories): give "
                         "--unseen-categories, or drop them")
    from common.personalize import personalize

    setup_process(cfg.num_threads)
    report = personalize(cfg, read_adapter_weights(source.path), k_steps=args.k_steps,
                         support_examples=args.support_examples, query_examples=args.query_examples)
    for client, (b, a) in enumerate(zip(report.before, report.after)):
        print(f"client {client}: query loss {b:.4f} -> {a:.4f}")
    summary = report.summary()
    print(f"mean query loss {summary['query-loss-before-mean']:.4f} "
          f"(std {summary['query-loss-before-std']:.4f}) -> {summary['query-loss-after-mean']:.4f} "
          f"(std {summary['query-loss-after-std']:.4f}) after {args.k_steps} steps")
    return 0


# k-shot adaptation lr over the run's: at the run's own lr, 8 AdamW steps on 8 examples
# made every trained adapter worse on its query set; 0.3x was best (docs/meta-learning.md).
ADAPT_LR_FACTOR = 0.3
DEFAULT_SHOTS, DEFAULT_SEEDS = "4,8,16,32", 3  # personalize --shots / --seeds


def _kshot_command(args: argparse.Namespace, cfg: RunConfig, tasks: list[str], source) -> int:
    from common.adapters import read_adapter_weights
    from common.meta import check_unseen, episodes, kshot_report
    from common.model import load_tokenizer

    args.shots = DEFAULT_SHOTS if args.shots is None else args.shots
    args.seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
    try:
        shots = sorted({int(k) for k in args.shots.split(",") if k.strip()})
    except ValueError:
        raise ValueError(f"--shots must be comma separated integers like 4,8,16; got "
                         f"{args.shots!r}") from None
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.adapt_lr is not None and not args.adapt_lr > 0:
        raise ValueError(f"--adapt-lr must be > 0, got {args.adapt_lr}")
    check_unseen(cfg, tasks)
    setup_process(cfg.num_threads)
    eps = episodes(cfg, load_tokenizer(cfg.model), tasks=tasks, shots=shots,
                   query_examples=args.query_examples, seeds=list(range(args.seeds)))
    report = kshot_report(cfg, read_adapter_weights(source.path), eps, steps=args.k_steps,
                          lr=args.adapt_lr or ADAPT_LR_FACTOR * cfg.lr)
    print(f"unseen tasks {','.join(tasks)}: {args.seeds} seed{'s' * (args.seeds != 1)} each, {args.query_examples} "
          f"query examples, {args.k_steps} adaptation steps at lr "
          f"{args.adapt_lr or ADAPT_LR_FACTOR * cfg.lr:g}")
    for k, (mean, std) in report.curve().items():
        print(f"k={k:<3} query loss {mean:.4f} (std {std:.4f})"
              + ("  (before adapting)" if k == 0 else ""))
    return 0


def _prepared_config(args: argparse.Namespace, *, pooled: bool = False) -> RunConfig:
    """Config from flags, offline mode where nothing needs the Hub, then preflight."""
    cfg = config_from_args(args)
    if _is_offline_config(cfg):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_process(cfg.num_threads)
    return preflight(cfg, pooled=pooled)


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


def console_main() -> int:
    """The `fedtune` console script (and `python -m server.cli`): main(), then exit
    without the interpreter's last garbage collections over the heap. A reader that
    went away (``fedtune data --json | head -1``) ends it quietly with status 1, the way
    Python's docs on SIGPIPE recommend, instead of a BrokenPipeError traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # the exit's own flush of stdout would fail again: point it at /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    from common.runtime import skip_exit_collection

    skip_exit_collection()
    return code


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = parse_args(argv)
    try:
        if args.command != "simulate":
            return args.run(args)
        # The parent only parses and names the run folder: it imports no torch and loads
        # no model or data; the child checks the inputs before Ray starts (a bad input
        # still ends there, in one line, exit 2).
        cfg = config_from_args(args)
        if _is_offline_config(cfg):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cfg = prepare_run_dir(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2
    return simulate(cfg, verbose=args.verbose)


def _is_offline_config(cfg: RunConfig) -> bool:
    from common.config import BUILTIN_CLASSIFIER, BUILTIN_DATASET, BUILTIN_MODEL

    local = lambda s, *builtin: s in builtin or Path(s).expanduser().exists()  # noqa: E731
    return (local(cfg.model, BUILTIN_MODEL, BUILTIN_CLASSIFIER)
            and local(cfg.dataset, BUILTIN_DATASET))


if __name__ == "__main__":
    sys.exit(console_main())
