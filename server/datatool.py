"""``fedtune data``: what your file becomes under your settings, before you train.

It runs the preflight's own code (``common.datacheck``): the counts are those the run
would record, and the examples are encoded exactly as training encodes them.
"""

from __future__ import annotations

import argparse
import json
import sys

DATA_EXAMPLE = """example:
  fedtune data --dataset docs/examples/chat.jsonl --partitioner iid --categories '' --num-clients 2
  fedtune data --dataset my.jsonl --categories '' --partitioner iid --max-length 256 --show 5 --json
"""


def add_data_parser(sub, add_config_arguments) -> None:
    data = sub.add_parser(
        "data", help="check your data: counts per client and examples with trained spans",
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=DATA_EXAMPLE,
        description="Load, split and tokenize the data as `fedtune simulate` with the same "
                    "flags would, print what became of the records (kept, truncated, "
                    "dropped, skipped) per split and client, and show the first examples "
                    "with their trained tokens marked ([[ ]], or green in a terminal).")
    data.add_argument("--show", type=int, default=3, metavar="N",
                      help="examples to show, in file order (default: 3)")
    data.add_argument("--json", action="store_true", help="print one JSON object instead (default: text)")
    add_config_arguments(data)
    data.set_defaults(run=data_command)


def data_command(args: argparse.Namespace) -> int:
    from common.datacheck import data_report, first_examples, marked_text
    from common.model import load_tokenizer
    from server.cli import config_from_args

    cfg = config_from_args(args)
    tokenizer = load_tokenizer(cfg.model)
    report = data_report(cfg, tokenizer)
    shown = [] if cfg.task == "classification" else first_examples(cfg, tokenizer, args.show)
    if args.json:
        out = report.to_json()
        out["examples"] = [{"where": s["where"], "status": s["status"],
                            "text": marked_text(s["example"], tokenizer, color=False)}
                           for s in shown]
        print(json.dumps(out, indent=2))
        return 0
    color = sys.stdout.isatty()
    for line in report.lines(where=" (listed below)" if report.skipped else ""):
        print(line)
    for where, reason in report.skipped:
        print(f"  skipped {where}: {reason}")
    for name, stats in report.splits.items():
        for where, reason in stats.dropped_reasons[:5]:
            print(f"  {name}: dropped {where}: {reason}")
        if len(stats.dropped_reasons) > 5:
            print(f"  {name}: ... {len(stats.dropped_reasons) - 5} more dropped")
    for item in shown:
        print(f"\n--- {item['where']} ({item['status']}; trained tokens "
              f"{'in green' if color else 'in [[ ]]'})")
        print(marked_text(item["example"], tokenizer, color=color))
    return 0
