"""The docs stay true: every `fedtune ...` command in the fenced code blocks of
README.md and docs/*.md, and in the `--help` examples, parses with the real parser.

Parsing means: the subcommand exists, every flag exists, argparse's choices and
types hold, and for `simulate` / `train` the values make a valid config (strategy,
partitioner, numbers in range). Nothing is trained, loaded or read.

Not checked, on purpose:
- a placeholder in angle brackets (`runs/<stamp>`) stands for any value: it is
  replaced by a dummy word, and the flags around it are still checked;
- a command followed in its block by a `fedtune: error:` line is an example of an
  error, so it is expected to fail (README's "Bad input ..." examples);
- `--resume RUN` and `--run-config FILE.toml` read files, so those commands are
  checked by argparse only, not as a config.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from server.cli import build_parser, config_from_args, parse_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
PLACEHOLDER = re.compile(r"<[A-Za-z][\w .-]*>")
# shell punctuation that ends a command: `a && fedtune simulate`, `fedtune plot R | tee`
SHELL_ENDS = {"&&", "||", ";", "|", "&", ">", ">>", "<"}


def fenced_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of each fenced code block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands_in(lines: list[str]) -> list[tuple[int, list[str], bool]]:
    """(line offset, argv after `fedtune`, is an error example) of each command."""
    joined, offsets = [], []
    for offset, line in enumerate(lines):  # a trailing backslash continues the line
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line.strip()
        else:
            joined.append(line)
            offsets.append(offset)
    found = []
    for i, (offset, line) in enumerate(zip(offsets, joined)):
        argv = fedtune_argv(line)
        if argv is not None:
            is_error_example = i + 1 < len(joined) and joined[i + 1].startswith("fedtune: error:")
            found.append((offset, argv, is_error_example))
    return found


def fedtune_argv(line: str) -> list[str] | None:
    """The arguments of the `fedtune` (or `.venv/bin/fedtune`) command in a shell line,
    or None when there is none (output lines like `fedtune | round 1 | ...` included)."""
    lexer = shlex.shlex(PLACEHOLDER.sub("PLACEHOLDER", line.lstrip("$ ")), posix=True,
                        punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: prose or output, not a command
        return None
    for i, token in enumerate(tokens):
        if (token == "fedtune" or token.endswith("/fedtune")) and _command_position(tokens, i):
            argv = []
            for arg in tokens[i + 1:]:
                if arg in SHELL_ENDS:
                    break
                argv.append(arg)
            if argv and not argv[0].startswith(("|", ":")):
                return argv
    return None


def _command_position(tokens: list[str], i: int) -> bool:
    """Whether tokens[i] is the command word, not an argument (`docker build -t
    fedtune .`, `flwr run . fedtune`): first, or after shell punctuation, variable
    assignments (`HF_HUB_OFFLINE=1 fedtune ...`), a prefix like `time`/`nohup`, or a
    printed label."""
    j = i - 1
    while j >= 0 and ("=" in tokens[j] and not tokens[j].startswith("-")
                      or tokens[j] in ("time", "nohup", "exec", "sudo")):
        j -= 1
    # ... or after a label the demo prints, "try it: fedtune generate ..."
    return j < 0 or tokens[j] in SHELL_ENDS or tokens[j].endswith(":")


def parse_error(argv: list[str]) -> str | None:
    """What the real parser says about ``argv``, or None when it is accepted."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = parse_args(argv)
    except SystemExit as exit_info:
        return stderr.getvalue().strip() or f"exit {exit_info.code}"
    reads_files = getattr(args, "resume-from", None) or str(
        getattr(args, "run_config", "")).endswith(".toml")
    if args.command in ("simulate", "train") and not reads_files:
        try:
            config_from_args(args)
        except ValueError as err:
            return f"fedtune: error: {err}"
    return None


def documented_commands() -> list[tuple[str, list[str], bool]]:
    found = []
    for path in DOCS:
        for start, lines in fenced_blocks(path.read_text(encoding="utf-8")):
            for offset, argv, is_error in commands_in(lines):
                found.append((f"{path.relative_to(ROOT)}:{start + offset}", argv, is_error))
    return found


def help_example_commands() -> list[tuple[str, list[str], bool]]:
    """The examples in `fedtune --help` and in each subcommand's --help."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    helps = {"fedtune --help": parser, **{f"fedtune {name} --help": sub
                                          for name, sub in subparsers.choices.items()}}
    found = []
    for where, p in helps.items():
        for offset, argv, is_error in commands_in((p.epilog or "").splitlines()):
            found.append((f"{where} (epilog line {offset + 1})", argv, is_error))
    return found


COMMANDS = documented_commands() + help_example_commands()


def test_the_docs_hold_commands_of_every_subcommand():
    """Guards the extractor itself: if it found nothing, every check would pass."""
    documented = {argv[0] for where, argv, _ in COMMANDS if not where.startswith("fedtune ")}
    assert {"simulate", "train", "personalize", "evaluate", "generate", "export", "plot"} <= documented
    assert len([c for c in COMMANDS if not c[2]]) > 40


@pytest.mark.parametrize("where, argv, is_error", COMMANDS,
                         ids=[f"{w} {' '.join(a)[:60]}" for w, a, _ in COMMANDS])
def test_documented_command_parses(where, argv, is_error):
    if is_error:
        pytest.skip("an example of an error: its next line is the error it prints")
    error = parse_error(argv)
    assert error is None, f"{where}: `fedtune {shlex.join(argv)}` does not parse: {error}"


@pytest.mark.parametrize("markdown, message", [
    ("```bash\nfedtune simulate --made-up-flag 3\n```", "unknown option '--made-up-flag'"),
    ("```\n.venv/bin/fedtune evaluate --adapter runs/<stamp> --dtype float8\n```",
     "argument --dtype: invalid choice: 'float8'"),
    ("```\nfedtune simulate --strategy fedavg \\\n    --partitioner random\n```",
     "config 'partitioner' must be one of"),
    ("```\nfedtune evalute --adapter x\n```", "invalid choice: 'evalute'"),
    ("```\nbash scripts/install.sh && fedtune plot\n```", "required: RUN_DIR"),
])
def test_a_wrong_command_in_the_docs_fails(markdown, message):
    """The check can fail: each of these made-up doc blocks must be caught."""
    (start, lines), = fenced_blocks(markdown)
    (_, argv, is_error), = commands_in(lines)
    assert not is_error
    error = parse_error(argv)
    assert error is not None and message in error, error


def test_output_lines_and_prose_are_not_commands():
    assert fedtune_argv("fedtune | round   1 | train loss  3.6260 | eval loss  3.1994") is None
    assert fedtune_argv("fedtune: error: unknown option '--local-step'") is None
    assert fedtune_argv("try it: fedtune generate --adapter runs/x --prompt \"Hi (there).\"") == [
        "generate", "--adapter", "runs/x", "--prompt", "Hi (there)."]
    assert fedtune_argv("$ fedtune simulate --resume runs/<stamp>   # continue") == [
        "simulate", "--resume", "runs/PLACEHOLDER"]
