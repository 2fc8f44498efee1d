"""docs/meta-learning.md and docs/meta-learning.png from bench/meta.py's results."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from bench.report import plt

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "meta-learning.md"
PLOT = ROOT / "docs" / "meta-learning.png"


def write_report(feds: dict, val: dict, best_lr: dict, best_reptile: str | None,
                 test: dict) -> None:
    from bench.meta import (ADAPT_LRS, COMMON, FEDERATIONS, MANY, MANY_SUFFIX, QUERY, SHOTS,
                            STEPS, TEST_SEEDS, TEST_TASKS, TRAIN, VAL_SEEDS, VAL_SHOTS,
                            VALIDATION_TASKS)

    lines = [
        "# Meta-learning: k-shot adaptation to tasks nobody trained on",
        "",
        f"Measured by `python bench/meta.py` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPU cores, {platform.machine()}), {time.strftime('%Y-%m-%d')}. "
        f"Load average (1 min) when this report was written: {os.getloadavg()[0]:.1f} on the "
        "2 cores, shared with another engineer's benchmark. Seconds are inflated by that "
        "load; the losses are not (every run is deterministic under its seeds).",
        "",
        "**Setting.** SmolLM2-135M-Instruct + LoRA r=8, the built-in WordNet data. Training "
        f"tasks: four clients, one category each ({TRAIN}), batch {COMMON['batch-size']}, "
        f"max length {COMMON['max-length']} tokens, client lr {COMMON['lr']:g} (cosine). "
        f"Every federation takes the same client steps (4 clients x 32 steps). Unseen tasks, "
        "in no client, no held-out and no validation split: validation tasks "
        f"{', '.join(VALIDATION_TASKS)} (used to tune) and test tasks {', '.join(TEST_TASKS)} "
        "(`--meta-test-categories`, reported). Each run is fedtune's ServerApp and ClientApp "
        "in one process (`bench/inproc.py`).",
        "",
        f"**Protocol** (`common/meta.py`, also `fedtune personalize RUN --unseen-categories "
        f"...`). Per task and seed: a query set of {QUERY} examples and nested k-shot support "
        f"sets disjoint from it; {STEPS} AdamW steps on the support set (batches of min(k, "
        f"{COMMON['batch-size']})), then the query loss (mean response-token cross-entropy, "
        "nats); k = 0 is the initialisation before adapting. Initialisations: the base model "
        "(a fresh LoRA, B = 0), FedAvg's global adapter (adapted as above: FedAvg + local "
        "fine-tune, Jiang et al. 2019), and Reptile's best variant on the validation tasks.",
        "",
        "## 1. The federations",
        "",
        f"Runs named '{MANY_SUFFIX[2:]}' train on 16 categories ({MANY}), one client each, 4 "
        "sampled a round (`--fraction-train 0.25`): the same client steps over more tasks, "
        "since Reptile's premise is a distribution of tasks. Their held-out split covers "
        "their 16 categories, so its loss does not compare with the 4-task runs'.",
        "",
        "| run | training tasks | rounds x local steps | held-out loss, training tasks "
        "(round 0 -> last) | s |",
        "|---|---|---|---|---|",
    ]
    for name, res in feds.items():
        spec = FEDERATIONS[name]
        hist = res["history"]
        lines.append(f"| {name} | {spec.get('num-clients', COMMON['num-clients'])} | "
                     f"{spec['num-server-rounds']} x {spec['local-steps']} | "
                     f"{hist[0]['eval-loss']:.4f} -> {hist[-1]['eval-loss']:.4f} | "
                     f"{res['wall-seconds']:.0f} |")
    lines += [
        "",
        f"## 2. Tuning on the validation tasks (k = {VAL_SHOTS[0]}, seeds {VAL_SEEDS})",
        "",
        "Query loss after adapting, mean over the validation tasks and seeds, per adaptation "
        "lr. The best lr of each initialisation is used on the test tasks; the best Reptile "
        "variant is the one reported.",
        "",
        "| initialisation | " + " | ".join(f"adapt lr {lr:g}" for lr in ADAPT_LRS) + " | chosen |",
        "|---|" + "---|" * (len(ADAPT_LRS) + 1),
    ]
    for init, by_lr in val.items():
        cells = [f"{by_lr[lr]['curve'][str(VAL_SHOTS[0])][0]:.4f}" if lr in by_lr else "-"
                 for lr in ADAPT_LRS]
        chosen = f"lr {best_lr[init]:g}" if init in best_lr else "-"
        if init == best_reptile:
            chosen += ", best Reptile"
        lines.append(f"| {init} | " + " | ".join(cells) + f" | {chosen} |")
    if test:
        lines += [
            "",
            f"## 3. Test tasks: query loss against k ({len(TEST_TASKS)} tasks x "
            f"{len(TEST_SEEDS)} seeds, mean ± std)",
            "",
            "| initialisation | adapt lr | " + " | ".join(f"k={k}" for k in [0, *SHOTS]) + " |",
            "|---|---|" + "---|" * (len(SHOTS) + 1),
        ]
        four = {i: r for i, r in test.items() if not i.endswith(MANY_SUFFIX)}
        many = {i: r for i, r in test.items() if i.endswith(MANY_SUFFIX)}
        for init, res in test.items():
            cells = [f"{res['curve'][str(k)][0]:.4f} ± {res['curve'][str(k)][1]:.3f}"
                     for k in [0, *SHOTS]]
            lines.append(f"| {init} | {res['lr']:g} | " + " | ".join(cells) + " |")
        lines += ["", "Per task (mean over seeds):", "",
                  "| initialisation | task | " + " | ".join(f"k={k}" for k in [0, *SHOTS]) + " |",
                  "|---|---|" + "---|" * (len(SHOTS) + 1)]
        for init, res in test.items():
            for task in TEST_TASKS:
                cells = []
                for k in [0, *SHOTS]:
                    xs = [r["query-loss"] for r in res["rows"] if r["task"] == task and r["k"] == k]
                    cells.append(f"{sum(xs) / len(xs):.4f}")
                lines.append(f"| {init} | {task} | " + " | ".join(cells) + " |")
        lines += ["", goal_line(four, best_reptile, "fedavg", "4 training tasks")]
        many_reptile = next((i for i in many if i.startswith("reptile")), None)
        if many_reptile:
            lines += ["", goal_line(many, many_reptile, "fedavg" + MANY_SUFFIX,
                                    "16 training tasks")]
        lines += ["", "![query loss against k](meta-learning.png)"]
        plot(test)
    marker = "\n## Reading the numbers"
    old = DOC.read_text() if DOC.exists() else ""
    tail = old[old.index(marker):] if marker in old else ""
    DOC.write_text("\n".join(lines) + "\n" + tail)
    print("\n".join(lines))


def goal_line(test: dict, reptile_name: str | None, fedavg_name: str, setting: str) -> str:
    if reptile_name not in test or fedavg_name not in test:
        return f"Goal, {setting} (meta-learned init below FedAvg's at k = 8): not measured yet."
    reptile, fedavg = test[reptile_name]["curve"]["8"][0], test[fedavg_name]["curve"]["8"][0]
    verdict = "met" if reptile < fedavg else "not met"
    return (f"Goal, {setting} (the meta-learned initialisation reaches a lower query loss "
            f"than FedAvg's after k = 8 shots on unseen tasks): **{verdict}**, {reptile_name} "
            f"{reptile:.4f} against {fedavg_name} {fedavg:.4f} "
            f"({(reptile / fedavg - 1) * 100:+.1f}%).")


def plot(test: dict) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4))
    for init, res in test.items():
        ks = sorted(int(k) for k in res["curve"])
        means = [res["curve"][str(k)][0] for k in ks]
        stds = [res["curve"][str(k)][1] for k in ks]
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=init,
                    linestyle="--" if init.endswith("16 tasks") else "-")
    ax.set_xscale("symlog", linthresh=4)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k (support examples; 0 = before adapting)")
    ax.set_ylabel("query loss, unseen tasks (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
