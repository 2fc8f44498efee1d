"""What `fedtune simulate` shows on the terminal, and what only goes to ``run.log``.

The simulation child prints three kinds of lines: fedtune's own (round lines, summary,
marked by ``RunFolder.log`` with :data:`OWN_LINE_MARK`, and already in ``run.log``),
Flower's and Ray's logs (~130 INFO lines for the demo), and problems (warnings, errors,
tracebacks). The terminal gets fedtune's lines and the problems; ``run.log`` gets
everything. ``--verbose`` shows everything live.

Hand-written because the lines come from three loggers in several processes (Flower's
``flwr`` logger, Ray's log monitor relaying every actor's stdout and stderr, Python
warnings): no one logging configuration reaches all of them, the pipe does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TextIO

# RunFolder.log prefixes its lines with this when the parent asks (CONSOLE_ENV): an
# ASCII record separator, never in Flower's or Ray's output.
OWN_LINE_MARK = "\x1e"
CONSOLE_ENV = "FEDTUNE_CONSOLE_MARK"



def say(line: str) -> None:
    """Print one of fedtune's own lines from the simulation child before the run folder
    exists (RunFolder.log marks the later ones): marked, so the terminal shows it."""
    import os

    print((OWN_LINE_MARK if os.environ.get(CONSOLE_ENV) else "") + line, flush=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ACTOR = re.compile(r"^\((?:\w+ )?pid=\d+(?:, ip=[\d.]+)?\)\s?")  # Ray's "(ClientAppActor pid=12) "
_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:")
_PY_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")
# Known, harmless notices: kept in run.log, not shown. Each names why it is harmless.
NOISE = (
    # fedtune evaluates the global adapter on the server; clients are not asked to
    "fraction_evaluate is set to 0.0",
    # `fedtune simulate` still drives Flower's simulation engine through run_simulation
    # (docs/architecture.md); the notice is for Flower's users, not fedtune's
    "DEPRECATED FEATURE: The `run_simulation` function",
    "This is a deprecated feature. It will be removed",
    "entirely in future versions of Flower.",
    # transformers 5 renamed the attribute that peft reads once per model load
    "`is_gradient_checkpointing` is deprecated",
    # Ray 2.4x announces a future default about GPU visibility; no GPU is asked for
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
    "FutureWarning: Tip: In future versions of Ray",
    # Flower stops its Ray actors this way at the end of every simulation
    "Manually terminating ClientAppActor",
)


class ConsoleFilter:
    """Feed it the child's output lines; it writes run.log and the terminal.

    Lines before the run folder exists are held and written when it appears (Ray's
    start-up comes before the ServerApp creates the folder).
    """

    def __init__(self, run_log: Path, *, verbose: bool = False, out: TextIO | None = None):
        self.run_log, self.verbose = run_log, verbose
        self.out = out or sys.stdout
        self.pending: list[str] = []
        self.error_shown = False  # a one-line "fedtune: error: ..." reached stderr
        self.showing = False  # inside a shown multi-line block (traceback, warning)
        self.hiding = False  # inside a hidden multi-line notice

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        if line.startswith(OWN_LINE_MARK):
            self._show(line[len(OWN_LINE_MARK):])
            return
        self._log(line)
        if self.verbose or self._is_problem(line):
            self._show(line)

    def close(self) -> None:
        self._log(None)

    def _is_problem(self, line: str) -> bool:
        plain = _ACTOR.sub("", _ANSI.sub("", line)).rstrip()
        if any(noise in plain for noise in NOISE):
            self.hiding, self.showing = True, False
            return False
        continued = plain.startswith((" ", "\t")) or not plain
        if continued:  # indented lines belong to the block above them
            return self.showing and not self.hiding
        self.hiding = False
        level = _LEVEL.match(plain)
        if level:
            self.showing = level.group(1) in ("WARNING", "ERROR", "CRITICAL")
        elif (plain.startswith(("Traceback (most recent call last)", "fedtune: warning",
                                "fedtune: error")) or _PY_WARNING.match(plain)):
            self.showing = True
        elif self.showing and re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", plain):
            pass  # the last line of a traceback
        else:
            self.showing = False
        return self.showing

    def _show(self, line: str) -> None:
        # a one-line input error (the child's check_inputs) goes where errors go
        error = line.startswith("fedtune: error:") and self.out is sys.stdout
        self.error_shown = self.error_shown or line.startswith("fedtune: error:")
        print(line, file=sys.stderr if error else self.out, flush=True)

    def _log(self, line: str | None) -> None:
        if line is not None:
            self.pending.append(_ANSI.sub("", line))
        if self.pending and self.run_log.parent.is_dir():
            with open(self.run_log, "a", encoding="utf-8") as fh:
                fh.write("".join(p + "\n" for p in self.pending))
            self.pending.clear()
