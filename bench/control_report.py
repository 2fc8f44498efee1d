"""docs/control.md and its plots from bench/control.py's results (one dict per run)."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

from bench.report import plt as pyplot

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "control.md"
# Read off `uptime` while a section's runs went on (the runs do not record it), per
# section; update the one you rerun.
OBSERVED_LOAD = {
    "adaptive": ("2.5 to 4.5 on the 2 cores (two runs at a time throughout; up to 6 while "
                 "a code review's tests and one small run shared the machine with the "
                 "server-lr search runs at 3e-4 and 3e-3, whose seconds are inflated most)"),
    "fedadam": "1.9 to 4.9 on the 2 cores (a full test suite ran beside most of the runs)",
    "regularization": ("1.0 to 2.9 on the 2 cores (another benchmark, bench/meta.py, and a "
                       "test run shared the machine)"),
}
HEADINGS = {"adaptive": "## 1. ", "fedadam": "## 2. ", "regularization": "## 3. "}
READING = "\n## Reading the numbers"


def final(result: dict) -> dict:
    return result["history"][-1]


def rounds_to(result: dict, target: float) -> dict | None:
    """The first row (round > 0) whose held-out loss is at or below ``target``."""
    return next((r for r in result["history"] if r["round"] > 0 and r["eval-loss"] <= target), None)


def kind(name: str) -> str:
    """A run's controller: its name before ' lr ' ('cosine', 'plateau', 'bold driver ...')."""
    return name.rsplit(" lr ", 1)[0]


def commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def old_sections(text: str) -> dict[str, str]:
    """The previous report's section blocks by name (heading to the next heading)."""
    marks = sorted((text.index(h), name) for name, h in HEADINGS.items() if h in text)
    ends = [i for i, _ in marks[1:]] + [text.index(READING) if READING in text else len(text)]
    return {name: text[i:end].rstrip("\n") + "\n" for (i, name), end in zip(marks, ends)}


def write_report(results: dict, args) -> None:
    """Rewrite docs/control.md: the sections in ``results`` from their runs, every other
    section as the previous report had it (each says when and at which commit it was
    measured), and the hand-written 'Reading the numbers' as it was."""
    load = os.getloadavg()
    from bench.control import COMMON, SECTIONS

    lines = [
        "# Adaptive learning rate, FedAdam and regularization, each on its own job",
        "",
        f"Measured by `python bench/control.py --sections NAME` on "
        f"{platform.node() or 'this machine'} ({os.cpu_count()} CPU cores, "
        f"{platform.machine()}); each section says when, at which commit and under which load.",
        "",
        "The machine was shared with other engineers' jobs during these runs, so the "
        "seconds are inflated and uneven: compare the ratios within a run, not the "
        "absolute times. The losses do not depend on the load: every run is deterministic "
        "under its seeds (on the same code: a change to the training loop, such as the bf16 "
        "autocast of `common/precision.py`, moves them, so compare runs within one section).",
        "",
        "Setting (every run): SmolLM2-135M-Instruct + LoRA r=8, the built-in WordNet data "
        f"with two clients ({COMMON['categories']}, one category each), batch "
        f"{COMMON['batch-size']}, max length {COMMON['max-length']} tokens, held-out "
        f"{COMMON['eval-examples']} examples, validation {COMMON['validation-examples']} "
        "(drawn apart from the held-out split in every run, so that all runs train on the "
        "same pool). This is smaller than the demo (four clients, batch 8, 96 tokens): the "
        "demo's runs cost about 100 s per round here, too much for the ~35 runs below. "
        "Each run is fedtune's ServerApp and ClientApp in one process (`bench/inproc.py`: "
        "the same code as `fedtune simulate` without Ray; a 2-round check gave the same "
        "losses to the last digit as `fedtune simulate`).",
        "",
    ]
    old = DOC.read_text() if DOC.exists() else ""
    kept = old_sections(old)
    build = {"adaptive": lambda r: adaptive_section(r, SECTIONS["adaptive"]),
             "fedadam": fedadam_section,
             "regularization": lambda r: regularization_section(
                 r, SECTIONS["regularization"]["none"])}
    for name in HEADINGS:
        if results.get(name):
            block = build[name](results[name])
            commits = sorted({r["commit"] for r in results[name].values() if "commit" in r})
            # where the runs ran (recorded with each run), not where this report is written
            dtypes = sorted({f"{r['dtype']} (on {r['cpu']})" for r in results[name].values()
                             if "dtype" in r and "cpu" in r})
            block[1:1] = ["", f"Measured {time.strftime('%Y-%m-%d')}, runs at commit "
                          f"{', '.join(commits) or 'unrecorded'} (report at {commit()}) "
                          f"(`--sections {name}`). Load average (1 min) during the runs: "
                          f"{OBSERVED_LOAD[name]}; when this report was written: {load[0]:.1f}."
                          + (f" Compute dtype: {'; '.join(dtypes)}."
                             if dtypes else "")]
            lines += block
        elif name in kept:
            lines += kept[name].splitlines() + [""]
    # The hand-written reading of the numbers below this heading survives a rerun.
    tail = old[old.index(READING):] if READING in old else ""
    DOC.write_text("\n".join(lines) + "\n" + tail)
    print("\n".join(lines))


def adaptive_section(res: dict, specs: dict) -> list[str]:
    spec = next(iter(specs.values()))
    rounds = spec["num-server-rounds"]
    plateau = next(s for n, s in specs.items() if kind(n) == "plateau")
    bolds = {kind(n): s for n, s in specs.items() if s.get("lr-plateau-increase", 1.0) > 1.0}
    searches = {kind(n): s for n, s in specs.items() if s.get("server-lr-search")}
    lines = [
        "## 1. Adaptive learning rate (lr-plateau, early stopping, server-lr-search)",
        "",
        f"{rounds} rounds x {spec['local-steps']} local steps per client. Fixed: AdamW with the "
        "cosine schedule over the run (the default). Adaptive, all with a constant lr "
        "schedule, and the lr-plateau ones with `--early-stopping-patience "
        f"{plateau['early-stopping-patience']}`: "
        f"**plateau** `--lr-plateau true --lr-plateau-patience {plateau['lr-plateau-patience']} "
        f"--lr-plateau-factor {plateau['lr-plateau-factor']}` (torch's ReduceLROnPlateau: "
        f"x{plateau['lr-plateau-factor']} after any round whose validation loss is not 0.1% "
        "below the best, never up)"
        + "".join(f"; **{k}**, the same with `--lr-plateau-factor {b['lr-plateau-factor']} "
                  f"--lr-plateau-increase {b['lr-plateau-increase']:g}` (the bold driver: "
                  f"x{b['lr-plateau-increase']:g} after a round whose validation loss is 0.1% "
                  f"below the best, x{b['lr-plateau-factor']} after one that is not; no cap"
                  + ("" if b["early-stopping-patience"] == plateau["early-stopping-patience"]
                     else f"; `--early-stopping-patience {b['early-stopping-patience']}`: "
                     "no early stop")
                  + ("; `--lr-plateau-reject true`: a round that is not better is undone, "
                     "the next one starts from the last accepted global adapter"
                     if b.get("lr-plateau-reject") else "") + ")"
                  for k, b in bolds.items())
        + "".join(f"; **{k}**, a constant client lr (no lr-plateau, no early stopping) and "
                  f"`--server-lr-search {b['server-lr-search']}`: after each round the server "
                  "evaluates the validation loss of old + s x (aggregate - old) for each s "
                  "and keeps the best (one validation pass per candidate, while the clients "
                  "wait)" for k, b in searches.items()) + ".",
        "",
        "| run | final held-out loss | rounds run | stopped early | rounds undone "
        "(lr-plateau-reject) | peak lr in the last round (cosine decays below it) | server "
        "lr chosen, rounds 1 to last (server-lr-search) | MB | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        last = final(r)
        stop = r.get("early-stop")
        undone = [str(h["round"]) for h in r["history"] if h.get("rejected-round")]
        steps = [f"{h['server-lr']:g}" for h in r["history"] if "server-lr" in h]
        lines.append(f"| {name} | {last['eval-loss']:.4f} | {last['round']} | "
                     f"{'after round %d' % stop['stopped-after-round'] if stop else 'no'} | "
                     f"{', '.join(undone) if undone else '-'} | "
                     f"{last.get('lr', float('nan')):.2e} | {' / '.join(steps) or '-'} | "
                     f"{last['mb-total']:.1f} | {last['seconds']:.0f} |")
    lines += ["", "Rounds to reach the fixed schedule's final held-out loss (same initial lr):", "",
              "| controller | initial lr | fixed: final loss (round) | adaptive: first round at "
              "or below it | share of rounds | MB saved | s saved (the fixed run's seconds "
              "after that round) | s, each run's own clock: fixed to its last round / "
              "adaptive to that round |", "|---|---|---|---|---|---|---|---|"]
    lrs = sorted({n.rsplit(" lr ", 1)[1] for n in res}, key=float)
    verdicts: dict[str, dict[str, bool]] = {}
    controllers = [k for k in dict.fromkeys(kind(n) for n in res) if k != "cosine"]
    for label in controllers:
        for lr in lrs:
            fixed, adaptive = res.get(f"cosine lr {lr}"), res.get(f"{label} lr {lr}")
            if not (fixed and adaptive):
                continue
            target = final(fixed)
            hit = rounds_to(adaptive, target["eval-loss"])
            if hit is None:
                best = min(h["eval-loss"] for h in adaptive["history"])
                lines.append(f"| {label} | {lr} | {target['eval-loss']:.4f} ({target['round']}) | "
                             f"never (best {best:.4f}) | - | - | - | - |")
                verdicts.setdefault(label, {})[lr] = False
                continue
            share = hit["round"] / target["round"]
            verdicts.setdefault(label, {})[lr] = share <= 0.7
            # Seconds from the fixed run alone (its time after round hit): the same
            # compute per round, and one run's load, unlike two runs' clocks.
            at = next(h for h in fixed["history"] if h["round"] == hit["round"])
            saved = (f"{target['mb-total'] - hit['mb-total']:.1f} | "
                     f"{target['seconds'] - at['seconds']:.0f} "
                     f"({1 - at['seconds'] / target['seconds']:.0%})"
                     if hit["round"] < target["round"] else "0 | 0")
            # The adaptive run's own clock includes what its control costs (the
            # search's extra validation passes); two runs' clocks see different loads.
            lines.append(f"| {label} | {lr} | {target['eval-loss']:.4f} ({target['round']}) | "
                         f"{hit['round']} | {share:.0%} | {saved} | "
                         f"{target['seconds']:.0f} / {hit['seconds']:.0f} |")
    def spread(label: str, at: list[str]) -> float:
        finals = [final(res[f"{label} lr {lr}"])["eval-loss"] for lr in at]
        return max(finals) - min(finals)

    lines.append("")
    for label in controllers:
        v = verdicts.get(label)
        if v:
            met = [lr for lr, ok in v.items() if ok]
            lines.append(f"- {label}: goal 1 (at most 70% of the rounds at every lr): "
                         f"{'met' if all(v.values()) else 'not met'} ({len(met)} of {len(v)} "
                         f"learning rates{': ' + ', '.join(met) if met else ''}).")
        # the spread over the lrs both this controller and cosine ran (2 or 3 of them)
        both = [lr for lr in lrs if f"{label} lr {lr}" in res and f"cosine lr {lr}" in res]
        if len(both) >= 2:
            ours, fixed = spread(label, both), spread("cosine", both)
            ratio = ours / fixed if fixed else math.inf
            lines.append(f"- {label}: goal 2 (robustness over the 10x lr range, lr "
                         f"{', '.join(both)}): the final held-out loss spans {ours:.4f} against "
                         f"the fixed schedule's {fixed:.4f}, a ratio of {ratio:.2f} (goal: at "
                         f"most 0.33, {'met' if ratio <= 1 / 3 else 'not met'}).")
    lines += ["", "![held-out loss and lr per round](control-adaptive.png)", ""]
    plot_adaptive(res, ROOT / "docs" / "control-adaptive.png")
    return lines


def fedadam_section(res: dict) -> list[str]:
    fedavg = res.get("fedavg")
    lines = ["## 2. FedAdam's server-eta", "",
             "4 rounds x 2 local steps, client lr 1e-3 with the cosine schedule, FedAdam with "
             "Flower's defaults otherwise (beta1 0.9, beta2 0.99, tau 1e-3 unless named). "
             "FedAvgM without momentum (a FedAvg with a longer server step) and FedYogi are "
             "controls, not candidates.", "",
             "| run | final held-out loss | vs FedAvg | held-out loss, rounds 1 to last |",
             "|---|---|---|---|"]
    for name, r in res.items():
        loss = final(r)["eval-loss"]
        rel = f"{loss / final(fedavg)['eval-loss'] - 1:+.1%}" if fedavg else ""
        curve = " / ".join(f"{h['eval-loss']:.3f}" for h in r["history"] if h["round"] > 0)
        lines.append(f"| {name} | {loss:.4f} | {rel} | {curve} |")
    adams = {n: r for n, r in res.items() if n.startswith("fedadam")}
    if fedavg and adams:
        best = min(adams, key=lambda n: final(adams[n])["eval-loss"])
        gap = final(adams[best])["eval-loss"] / final(fedavg)["eval-loss"] - 1
        lines += ["", f"Best final loss: {best}, {gap:+.1%} against FedAvg. Goal (FedAdam at "
                  f"least as good as FedAvg): {'met' if gap <= 0 else 'not met'} in this sweep."]
    lines += ["", "![held-out loss per round](control-fedadam.png)", ""]
    plot_curves(res, ROOT / "docs" / "control-fedadam.png", "FedAvg vs FedAdam's server-eta")
    return lines


def regularization_section(res: dict, spec: dict) -> list[str]:
    none = res.get("none")
    n, rounds, steps = spec["max-examples-per-client"], spec["num-server-rounds"], spec["local-steps"]
    from bench.control import COMMON

    epochs = rounds * steps * COMMON["batch-size"] / n
    lines = ["## 3. Regularization in the small-data regime", "",
             f"{n} examples per client, {rounds} rounds x {steps} local steps of batch "
             f"{COMMON['batch-size']} ({epochs:g} epochs of each client's data), constant lr "
             f"{spec['lr']:g}, no LoRA dropout and no weight decay unless named. Early "
             "stopping is the 'none' run cut where `--early-stopping-patience 1` stops it "
             "(same pool, same validation split: the same run up to there). Task: held-out loss on the clients' categories. Forgetting: loss on the "
             "32 arithmetic chat examples of `docs/examples/chat.jsonl` (general text no "
             "client trains on) minus the base model's loss there; 0 = nothing forgotten, "
             "below 0 = better than the base model.", "",
             "| regularizer | final task loss | best task loss (round) | general loss | "
             "forgetting | forgetting vs none |", "|---|---|---|---|---|---|"]
    for name, r in res.items():
        rows = [h for h in r["history"] if h["round"] > 0]
        best = min(rows, key=lambda h: h["eval-loss"])
        forget = r["general-loss"] - r["general-loss-base"]
        vs = ""
        if none:
            ref = none["general-loss"] - none["general-loss-base"]
            vs = f"{forget / ref:.2f}x" if ref > 0 else "n/a (none forgets nothing)"
        stop = r.get("early-stop")
        note = f" (stopped after round {stop['stopped-after-round']})" if stop else ""
        lines.append(f"| {name}{note} | {final(r)['eval-loss']:.4f} | {best['eval-loss']:.4f} "
                     f"({best['round']}) | {r['general-loss']:.4f} | {forget:+.4f} | {vs} |")
    if none:
        base = none["general-loss-base"]
        lines += ["", f"Base model's loss on the general text: {base:.4f}."]
        ref_task = final(none)["eval-loss"]
        ref_forget = none["general-loss"] - base
        winners = [n for n, r in res.items() if n != "none"
                   and final(r)["eval-loss"] < ref_task
                   and (r["general-loss"] - base) <= 0.5 * ref_forget]
        lines.append(
            "Goal (lower task loss than none and at most half its forgetting): "
            + (f"met by {', '.join(winners)}." if winners else "not met by any regularizer here."))
    lines += ["", "![task and general loss](control-regularization.png)", ""]
    plot_regularization(res, ROOT / "docs" / "control-regularization.png")
    return lines


def plot_curves(res: dict, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in res.items():
        ax.plot([h["round"] for h in r["history"]], [h["eval-loss"] for h in r["history"]],
                marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss (response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_adaptive(res: dict, path: Path) -> None:
    """Held-out loss (left) and the adaptive runs' lr (right) per round: one colour per
    controller, dashed for the fixed cosine runs, one marker per initial lr."""
    plt = pyplot()
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(12, 6.5))
    kinds = list(dict.fromkeys(kind(n) for n in res))
    lrs = sorted({n.rsplit(" lr ", 1)[1] for n in res}, key=float)
    for name, r in res.items():
        adaptive = kind(name) != "cosine"
        style = dict(color=f"C{kinds.index(kind(name))}", linestyle="-" if adaptive else "--",
                     marker="os^v"[lrs.index(name.rsplit(" lr ", 1)[1]) % 4], alpha=0.85)
        rows = r["history"]
        ax.plot([h["round"] for h in rows], [h["eval-loss"] for h in rows], label=name, **style)
        undone = [h for h in rows if h.get("rejected-round")]
        if undone:  # lr-plateau-reject: the round's aggregate was discarded
            ax.scatter([h["round"] for h in undone], [h["eval-loss"] for h in undone],
                       marker="x", s=80, color="k", zorder=3)
        lr_rows = [h for h in rows if "lr" in h]
        if lr_rows and adaptive:  # a fixed run's column is its peak lr
            # server-lr-search: the clients' lr times the server's step, the rate the
            # global adapter effectively moved at
            ax_lr.plot([h["round"] for h in lr_rows],
                       [h["lr"] * h.get("server-lr", 1.0) for h in lr_rows], **style)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss")
    ax.set_title("Fixed cosine (dashed) vs adaptive lr (x: round undone)")
    ax_lr.set_yscale("log")
    ax_lr.set_xlabel("round")
    ax_lr.set_ylabel("clients' peak lr (x the server's step s under server-lr-search)")
    ax_lr.set_title("lr per round (runs that coincide overlap)")
    for a in (ax, ax_lr):
        a.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_regularization(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax, ax_gen) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, r in res.items():
        rows = r["history"]
        ax.plot([h["round"] for h in rows], [h["eval-loss"] for h in rows], marker="o", label=name)
        per_round = {int(k): v for k, v in r["general-loss-per-round"].items()}
        rounds = [0] + [h["round"] for h in rows if h["round"] > 0]
        ax_gen.plot(rounds, [r["general-loss-base"]] + [per_round[n] for n in rounds[1:]],
                    marker="o", label=name)
    ax.set_title("Task: held-out loss per round")
    ax_gen.set_title("Forgetting: loss on general chat text (round 0 = base)")
    for a in (ax, ax_gen):
        a.set_xlabel("round")
        a.set_ylabel("loss (response tokens)")
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
