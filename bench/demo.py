"""The demo as a user runs it: `fedtune simulate` with its defaults, measured from outside.

Prints the wall time, the peak memory of the whole process tree (PSS: shared pages
split between processes, so the sum is what the machine really holds; RSS summed as
well), how many lines reached the terminal, and the held-out losses. These are the
README's demo figures.

    python bench/demo.py                 # one run of the defaults
    python bench/demo.py --runs 2        # two runs, to see the spread
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import load_average, machine, run_timed, today  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="repetitions (default: 1)")
    args = parser.parse_args(argv)
    fedtune = str(Path(sys.executable).parent / "fedtune")
    print(f"# bench/demo.py on {machine()}, {today()}, load average before: {load_average()}")
    for index in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="fedtune-demo-"))
        try:
            run_dir = work / "run"
            lines, wall, memory = run_timed([fedtune, "simulate", "--run-dir", str(run_dir)],
                                            work / "output.log", env=dict(os.environ),
                                            sample_memory=True)
            history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
            log_lines = len((run_dir / "run.log").read_text().splitlines())
            print(json.dumps({
                "run": index + 1, "wall-s": round(wall, 1),
                "peak-pss-gb": round(memory["pss-mb"] / 1e3, 2),
                "peak-rss-sum-gb": round(memory["rss-mb"] / 1e3, 2),
                "processes": memory["processes"],
                "terminal-lines": len(lines), "run-log-lines": log_lines,
                "eval-loss": [round(r["eval-loss"], 4) for r in history],
                "perplexity": [round(r["eval-perplexity"], 2) for r in history],
                "load-average-after": load_average(),
            }), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
