"""Writes the small example datasets used by docs/guide-own-data.md (run from the repo root):

    python docs/examples/make_examples.py

Arithmetic questions in three topics, 40 each: small enough to ship, with a column
(`topic`) to partition or classify by. The numbers are drawn with a fixed seed, so
the files are the same on every run.
"""

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPERATIONS = {
    "addition": ("plus", lambda a, b: a + b),
    "subtraction": ("minus", lambda a, b: a - b),
    "multiplication": ("times", lambda a, b: a * b),
}


def records(per_topic: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for topic, (word, op) in OPERATIONS.items():
        for _ in range(per_topic):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            rows.append({"instruction": f"What is {a} {word} {b}?", "input": "",
                         "output": f"{a} {word} {b} is {op(a, b)}.", "topic": topic})
    rng.shuffle(rows)  # mixed topics in file order, as real data would be
    return rows


def main() -> None:
    rows = records()
    with open(HERE / "instructions.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    with open(HERE / "chat.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            messages = [{"role": "user", "content": r["instruction"]},
                        {"role": "assistant", "content": r["output"]}]
            fh.write(json.dumps({"messages": messages, "topic": r["topic"]}) + "\n")
    with open(HERE / "instructions.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
