"""``fedtune evaluate | generate | export | plot``: the tools around a finished run.

Each tool is a parser (``add_*``) and a runner (``run_*``); the runner returns an exit
code and raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` for bad
input, which ``server/cli.py`` prints as one line with exit code 2. The ML lives in
``common/`` (adapters, generate, export, train.evaluate); this module only wires it.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import BUILTIN_CLASSIFIER, BUILTIN_DATASET, BUILTIN_MODEL, DTYPES, RunConfig
from server.summary import TRY_PROMPT

HELP = argparse.RawDescriptionHelpFormatter
if TYPE_CHECKING:  # the tools import torch and peft lazily: `fedtune --help` stays fast
    from common.adapters import AdapterSource

EVALUATE_EXAMPLE = f"""examples:
  fedtune evaluate --adapter runs/20261126-145844            # latest round, the run's held-out split
  fedtune evaluate --adapter runs/20261126-145844 --round 1
  fedtune evaluate --adapter runs/20261126-145844/best --dataset my_eval.jsonl --eval-examples 200
  fedtune evaluate                                           # the base model alone ({BUILTIN_MODEL})
  fedtune evaluate --adapter runs/my-classifier --json       # classifier: accuracy, macro-F1, confusion matrix

defaults: --model is the run's model (else {BUILTIN_MODEL}); with a run folder and no
--dataset, the run's evaluation data (its --eval-dataset, else its held-out split);
else the first --eval-examples (96) records of --dataset ({BUILTIN_DATASET}).
"""
GENERATE_EXAMPLE = f"""examples:
  fedtune generate --adapter runs/20261126-145844 --prompt "{TRY_PROMPT}"
  fedtune generate --adapter runs/20261126-145844 --prompts-file prompts.txt --compare
  fedtune generate --adapter runs/20261126-145844 --prompt "Define the word 'fig' (noun)." \\
      --temperature 0.7 --top-p 0.9 --seed 1

defaults: greedy (--temperature 0), --max-new-tokens 64, --top-p 1.0, --seed 0;
--model is the run's model (else {BUILTIN_MODEL}); --dtype float32 (decoding is faster in it).
"""
EXPORT_EXAMPLE = f"""examples:
  fedtune export --adapter runs/20261126-145844 --out models/wordnet-smollm2
  fedtune export --adapter runs/20261126-145844/best --out models/best --dtype bfloat16

The folder loads without peft:
  AutoModelForCausalLM.from_pretrained("models/wordnet-smollm2")
defaults: --model is the run's model (else {BUILTIN_MODEL}); --dtype float32 (the adapter
is merged into full-precision weights whatever precision the run computed in).
"""
PLOT_EXAMPLE = """examples:
  fedtune plot runs/20261126-145844       # writes runs/20261126-145844/plots/*.png

Writes loss.png, perplexity.png, clients.png and traffic.png, epsilon.png when the
run's history has an epsilon column (differential privacy), and aggregation.png when it
has the LoRA aggregation error (agg-error-mean).
`fedtune simulate` and `fedtune train` run this at the end of every run.
"""


def add_tool_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="held-out metrics of base + adapter (causal LM or classifier)",
                       description="Evaluate a base model plus adapter on a dataset. Causal LM: "
                                   "loss, perplexity, token accuracy over response tokens. "
                                   "Classification: loss, accuracy, macro-F1 and the confusion matrix.",
                       formatter_class=HELP, epilog=EVALUATE_EXAMPLE, allow_abbrev=False)
    _add_model_arguments(p, adapter_required=False)
    p.add_argument("--dataset", default=None, metavar="SOURCE",
                   help="dataset as in `simulate --dataset` (default: the run's eval-dataset "
                        f"or held-out split, else '{BUILTIN_DATASET}')")
    p.add_argument("--data-format", default=None, choices=("auto", "instruction", "chat"),
                   help="record format (default: the run's, else auto)")
    p.add_argument("--eval-examples", type=int, default=None, metavar="N",
                   help="first N records of --dataset, or of a run's shuffled eval-dataset "
                        "(default: the run's eval-examples, else 96)")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="token cap per example (default: the run's, else 96)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="evaluation batch size (default: the run's eval-batch-size, else 16)")
    p.add_argument("--json", action="store_true",
                   help="print the metrics (and a classifier's labels and confusion matrix) as "
                        "one JSON object (default: off, a readable summary)")
    p.set_defaults(run=run_evaluate)

    p = sub.add_parser("generate", help="answer prompts with base + adapter (chat template)",
                       description="Generate answers with the base model plus adapter.",
                       formatter_class=HELP, epilog=GENERATE_EXAMPLE, allow_abbrev=False)
    _add_model_arguments(p, adapter_required=False)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a user message (repeatable; default: none, then --prompts-file)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="one prompt per line, blank lines skipped (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="most tokens generated per answer (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling mass, used when --temperature > 0 (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--compare", action="store_true",
                   help="print the base model's answer beside the fine-tuned one (default: off)")
    p.set_defaults(run=run_generate)

    p = sub.add_parser("export", help="merge the adapter into the base weights, save a HF folder",
                       description="Merge base + adapter into one standalone Hugging Face model folder.",
                       formatter_class=HELP, epilog=EXPORT_EXAMPLE, allow_abbrev=False)
    _add_model_arguments(p, adapter_required=True)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new folder for the merged model (required; must not exist)")
    p.set_defaults(run=run_export)

    p = sub.add_parser("plot", help="PNG curves of a run (loss, perplexity, clients, traffic, epsilon)",
                       description="Draw a run's curves into RUN_DIR/plots/.",
                       formatter_class=HELP, epilog=PLOT_EXAMPLE, allow_abbrev=False)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a fedtune run folder")
    p.set_defaults(run=run_plot)


def _add_model_arguments(p: argparse.ArgumentParser, *, adapter_required: bool) -> None:
    p.add_argument("--adapter", required=adapter_required, default=None, metavar="PATH",
                   help="run folder (uses its `adapter`), RUN/best, RUN/adapters/round-N, or "
                        "any PEFT adapter folder" + (" (required)" if adapter_required else
                                                     " (default: none, the base model alone)"))
    p.add_argument("--round", type=int, default=None, metavar="N",
                   help="round N of the run folder given as --adapter (default: the latest)")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help=f"base model (default: the run's model, else '{BUILTIN_MODEL}')")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="base weight and compute dtype ('auto': bfloat16 where the CPU or GPU "
                        "has it natively; default: the run's, else auto; export: float32)")
    p.add_argument("--num-threads", type=int, default=None, metavar="N",
                   help="torch threads (default: every core, %d here). On a machine other jobs "
                        "are using, 1 or 2 can be several times faster: a torch thread that "
                        "loses its core stalls all the others at each operation"
                        % (os.cpu_count() or 1))


@dataclass(frozen=True)
class Loaded:
    model: object
    tokenizer: object
    cfg: RunConfig                # the run's config (or the defaults), --model/--dtype applied
    source: AdapterSource | None
    labels: list[str] | None      # classification: the run's label names, by class id


def _load(args: argparse.Namespace) -> Loaded:
    """Base model + adapter, with the run's config when the adapter comes from a run
    folder, so its task, model, dtype and max-length are the defaults."""
    from common.adapters import attach_adapter, find_adapter
    from common.model import load_base_model, load_tokenizer
    from common.runtime import setup_process

    if args.round is not None and not args.adapter:
        raise ValueError("--round needs --adapter RUN_DIR")
    source = find_adapter(args.adapter, round_num=args.round) if args.adapter else None
    if source and source.run_cfg is None and _is_classifier_adapter(source.path):
        raise ValueError(f"adapter '{source.path}' is a sequence classifier: give its run "
                         "folder as --adapter, whose data defines the labels")
    cfg = source.run_cfg if source and source.run_cfg else RunConfig()
    cfg = cfg.replace(model=args.model or cfg.model, dtype=args.dtype or cfg.dtype)
    if cfg.model in (BUILTIN_MODEL, BUILTIN_CLASSIFIER) or Path(cfg.model).expanduser().exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model: never wait on the Hub
    setup_process(_num_threads(args))
    labels = None
    if cfg.task == "classification":
        from common.data import class_labels

        labels = class_labels(cfg)  # as in training: sorted labels of the run's training pool
    from common.student import model_source

    tokenizer = load_tokenizer(cfg.model)
    # a run that trained a smaller student (student-layers): its adapter is on the student
    base = load_base_model(model_source(cfg), cfg.dtype, num_labels=len(labels or ()),
                           max_length=cfg.max_length)  # the attention kernel the run used
    if labels:  # named classes in an exported config.json, not LABEL_0, LABEL_1, ...
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {label: i for i, label in enumerate(labels)}
    model = attach_adapter(base, source.path, model_name=cfg.model) if source else base
    return Loaded(model, tokenizer, cfg, source, labels)


def _num_threads(args: argparse.Namespace) -> int:
    threads = getattr(args, "num_threads", None)
    if threads is None:
        return os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"--num-threads {threads}: give a whole number of threads, 1 or more")
    return threads


def _is_classifier_adapter(folder: Path) -> bool:
    try:
        return json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    except (OSError, ValueError):
        return False  # attach_adapter reports an unreadable config with its own message


def run_evaluate(args: argparse.Namespace) -> int:
    from common.train import evaluate

    loaded = _load(args)
    cfg, examples, data = _evaluation_data(args, loaded)
    stats = evaluate(loaded.model, examples, batch_size=cfg.eval_batch_size,
                     pad_token_id=loaded.tokenizer.pad_token_id)
    classify = loaded.labels is not None
    result = {"adapter": str(loaded.source.path) if loaded.source else None, "model": cfg.model,
              "data": data, "examples": len(examples),
              **({} if classify else {"tokens": stats.count}), **stats.row(prefix="")}
    if classify:  # rows: true label, columns: predicted label, in the order of "labels"
        result.update({"labels": loaded.labels, "confusion-matrix": stats.confusion})
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['adapter'] or 'base model'} on {data}: {len(examples)} examples"
          + ("" if classify else f", {stats.count} response tokens"))
    print(" | ".join(f"{k} {v:.4f}" for k, v in stats.row(prefix="").items()))
    if classify:
        print("\n".join(format_confusion(loaded.labels, stats.confusion)))
    return 0


def _evaluation_data(args: argparse.Namespace, loaded: Loaded):
    """(config, tokenized examples, description): for an adapter from a run folder and
    no --dataset, the run's evaluation data (its eval-dataset, else its held-out split);
    else the first records of --dataset."""
    from common.data import heldout_examples, leading_examples

    cfg, source = loaded.cfg, loaded.source
    use_run = source is not None and source.run_cfg is not None and args.dataset is None
    if use_run and not cfg.eval_dataset:
        if not cfg.evaluates:
            raise ValueError("this run had evaluation off (eval-examples 0), so it holds no "
                             "held-out split: give --dataset FILE (records it did not train on)")
        if args.eval_examples is not None:
            raise ValueError(f"--eval-examples needs --dataset: the run's held-out split has its "
                             f"own size ({cfg.eval_examples}); changing it would overlap training data")
    if args.eval_examples is not None and args.eval_examples < 1:
        raise ValueError(f"--eval-examples must be >= 1, got {args.eval_examples}")
    changes = {"dataset": args.dataset, "data_format": args.data_format,
               "eval_examples": args.eval_examples, "max_length": args.max_length,
               "eval_batch_size": args.batch_size}
    cfg = cfg.replace(**{k: v for k, v in changes.items() if v is not None})
    if not use_run:  # a file's first records: the run's own evaluation settings do not apply
        cfg = cfg.replace(eval_dataset="", eval_examples=args.eval_examples or 96)
    if use_run and cfg.eval_dataset:  # no overlap with training: any --eval-examples is fine
        return (cfg, heldout_examples(cfg, cfg.num_clients, loaded.tokenizer),
                f"the run's eval-dataset '{cfg.eval_dataset}'")
    if use_run:
        return cfg, heldout_examples(cfg, cfg.num_clients, loaded.tokenizer), "the run's held-out split"
    return (cfg, leading_examples(cfg, loaded.tokenizer, labels=loaded.labels),
            f"first records of '{cfg.dataset}'")


def format_confusion(labels: list[str], matrix: list[list[int]]) -> list[str]:
    """The matrix as a table: one row per true label, one column per predicted label."""
    width = max(len(label) for label in labels + [str(max(map(max, matrix)))])
    lines = ["confusion matrix (rows: true label, columns: predicted label):",
             " " * width + " " + " ".join(f"{label:>{width}}" for label in labels)]
    for label, row in zip(labels, matrix):
        lines.append(f"{label:<{width}} " + " ".join(f"{n:>{width}}" for n in row))
    return lines


def run_generate(args: argparse.Namespace) -> int:
    from common.generate import Sampling, base_and_tuned, generate

    prompts = _prompts(args)
    if args.compare and not args.adapter:
        raise ValueError("--compare needs --adapter: it prints base and fine-tuned answers")
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
    if args.dtype is None or args.dtype == "auto":
        # one token at a time, batch 1: overhead-bound, and in bf16 (casts of the fp32
        # LoRA weights every step) twice as slow on an AMX CPU (87 s against 46 s)
        args.dtype = "float32"
    loaded = _load(args)
    if loaded.labels is not None:
        raise ValueError("generate needs a causal-LM run; this one is a classifier: "
                         "use `fedtune evaluate` for its accuracy and confusion matrix")
    model, tokenizer = loaded.model, loaded.tokenizer
    for prompt in prompts:
        print(f"> {prompt}")
        if args.compare:
            base, tuned = base_and_tuned(model, tokenizer, prompt, sampling)
            print(_labelled("base:       ", base))
            print(_labelled("fine-tuned: ", tuned))
        else:
            print(generate(model, tokenizer, prompt, sampling))
        print()
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--prompts-file '{path}' does not exist: check the path")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    if not prompts:
        raise ValueError(f'give --prompt TEXT or --prompts-file FILE, e.g. --prompt "{TRY_PROMPT}"')
    return prompts


def _labelled(label: str, text: str) -> str:
    """label + text, continuation lines indented under the text's first line."""
    return label + textwrap.indent(text, " " * len(label)).lstrip()


def run_export(args: argparse.Namespace) -> int:
    from common.export import export_merged

    out = Path(args.out).expanduser()
    if out.exists():  # before loading the model: fail in a second, not a minute
        raise FileExistsError(f"export folder '{out}' already exists: choose another --out")
    if args.dtype is None or args.dtype == "auto":
        args.dtype = "float32"  # merge at full precision; --dtype bfloat16 halves the files
    loaded = _load(args)
    export_merged(loaded.model, loaded.tokenizer, out)
    auto = "AutoModelForSequenceClassification" if loaded.labels else "AutoModelForCausalLM"
    print(f"merged model saved to {out}; load it with {auto}.from_pretrained('{out}') "
          "(no peft needed)")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from server.plots import plot_run

    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist: give the folder that "
                                "`fedtune simulate` printed (runs/<stamp>)")
    for path in plot_run(run_dir):
        print(path)
    return 0
