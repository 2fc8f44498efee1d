"""Client-level DP (DP-FedAvg) on many clients: the held-out improvement a federation
keeps at a user-level epsilon of 8 (delta 1e-5) with 10 or 20 clients per round, and
why, from the noise on the mean against the clipping norm.

Setting: the built-in WordNet data split IID over 50 virtual clients, 10 and 20 of them
sampled per round, a few rounds of a few local steps, the DP recipe's small LoRA (r 4 on
q_proj,v_proj) with FFA-LoRA (only B trained and sent: the fewest noised values). Runs:
no client DP at each clients-per-round (the baseline), then Flower's
DifferentialPrivacyServerSideFixedClipping ('client-dp server-fixed') at the noise
multiplier that spends epsilon 8 over the run's rounds (``common.dp.noise_for_releases``,
Opacus' RDP accountant, no amplification claimed: server/privacy.py says why), at
clipping norms of 1/16, 1/4, 1 and 4 times the median client update norm measured in
the first baseline. Optionally (``--what-if``), runs whose noise on the mean is that of N
clients per round at epsilon 8 (noise multiplier z x n / N with n clients): as far as
the noise goes, what a federation of N per round would keep at epsilon 8 (these runs'
own epsilon is much larger).

Every run is fedtune's ServerApp and ClientApp in one process (bench/inproc.py): the
server-side wrapper lives in the strategy, so it runs there; the client-side modes
('client-fixed', 'client-adaptive', 'local') need Flower's mods, which bench/inproc.py
does not run. A grid subclass records each client's unclipped update (reply minus the
global adapter sent) and the global step, so the report gives the update norms, the
share clipped, and the noise norm actually added. Writes its own section of
docs/privacy-bench.md (bench/privacy.py keeps it).

    python bench/client_dp.py                       # ~30 min on one loaded CPU core
    python bench/client_dp.py --what-if 100,400     # + two runs at the noise of N clients
    python bench/client_dp.py --report-only         # the report from the saved runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.inproc import InProcessGrid  # noqa: E402
from bench.report import load_average, machine, today, write_section  # noqa: E402

NUM_CLIENTS = 50
# Short on purpose: one client's round (2 steps of 4 examples, 64 tokens) takes ~3 s on
# one core, so a 20-client round is about a minute and the whole bench ~35 min.
COMMON = {"partitioner": "iid", "num-clients": NUM_CLIENTS, "local-steps": 2,
          "batch-size": 4, "max-length": 64, "eval-examples": 64, "eval-batch-size": 32,
          "lora-r": 4, "lora-target-modules": "q_proj,v_proj", "lora-dropout": 0.0,
          "ffa-lora": True, "lr": 3e-3, "lr-schedule": "constant", "num-threads": 1}
CLIP_FACTORS = (1 / 16, 1 / 4, 1.0, 4.0)  # x the median round-1 update norm (first baseline)
SECTION = "client-level-dp"
# Trainable values of the default LoRA (r 8, all linear layers) on the built-in model,
# and of its B matrices alone (FFA-LoRA): docs/privacy.md's FFA-LoRA section.
DEFAULT_LORA_D, DEFAULT_LORA_FFA_D = 2_442_240, 1_244_160


def overrides(n: int, rounds: int, clip: float = 0.0, noise: float = 0.0) -> dict:
    """The run config of ``n`` clients per round; client DP when ``clip`` is set."""
    over = {**COMMON, "num-server-rounds": rounds, "eval-every": rounds,
            "fraction-train": n / NUM_CLIENTS, "min-train-clients": n}
    if clip:
        over.update({"client-dp": "server-fixed", "client-dp-clipping-norm": clip,
                     "client-dp-noise-multiplier": noise})
    return over


class WatchingGrid(InProcessGrid):
    """InProcessGrid that keeps, per round, the global adapter sent and each client's
    update (reply minus that adapter), flattened in float64."""

    rounds: list[dict]

    def __init__(self, cfg, run_config):
        super().__init__(cfg, run_config)
        WatchingGrid.rounds = []

    def send_and_receive(self, messages, timeout=None):
        import numpy as np

        from common.config import ARRAYS_KEY

        messages = list(messages)
        replies = super().send_and_receive(messages, timeout)
        train = [(m, r) for m, r in zip(messages, replies)
                 if m.metadata.message_type.startswith("train") and not r.has_error()]
        if train:
            sent = train[0][0].content[ARRAYS_KEY]
            names = sorted(sent.keys())

            def flat(record):
                return np.concatenate([record[k].numpy().astype(np.float64).ravel() for k in names])
            glob = flat(sent)
            WatchingGrid.rounds.append({"global": glob, "updates": [
                flat(r.content[ARRAYS_KEY]) - glob for _, r in train]})
        return replies


def summarize(rounds: list[dict], clip: float, n: int) -> dict:
    """Update norms, the share over ``clip``, the mean update's norm, and the noise
    actually added: global step minus the mean of the clipped updates (rounds 1..R-1)."""
    import numpy as np

    norms = [float(np.linalg.norm(u)) for r in rounds for u in r["updates"]]
    round1 = [float(np.linalg.norm(u)) for u in rounds[0]["updates"]]
    mean_norms, noise_norms = [], []
    for this, after in zip(rounds, rounds[1:]):
        mean = sum(this["updates"]) / len(this["updates"])
        mean_norms.append(float(np.linalg.norm(mean)))
        if clip:
            clipped = sum(u * min(1.0, clip / max(np.linalg.norm(u), 1e-12))
                          for u in this["updates"]) / n
            noise_norms.append(float(np.linalg.norm(after["global"] - this["global"] - clipped)))
    return {"d": int(rounds[0]["global"].size), "update-norms": norms,
            "round1-median-norm": statistics.median(round1),
            "clipped-share": sum(v > clip for v in norms) / len(norms) if clip else 0.0,
            "mean-update-norm": statistics.mean(mean_norms) if mean_norms else float("nan"),
            "noise-norm": statistics.mean(noise_norms) if noise_norms else float("nan")}


def run(out: Path, name: str, over: dict, seed: int = 0) -> dict:
    """One run (or its saved result.json)."""
    folder = out / "".join(c if c.isalnum() else "-" for c in name).strip("-")
    saved = folder / "result.json"
    if saved.exists():
        return json.loads(saved.read_text())
    import random

    import numpy as np

    from bench.inproc import run_federation

    if folder.exists():  # an interrupted run: start it again
        shutil.rmtree(folder)
    # Flower draws the client sample with `random` and the DP noise with numpy's
    # global generator: seed both, so every run is repeatable.
    random.seed(seed)
    np.random.seed(seed)
    started = time.perf_counter()
    run_federation({**over, "run-dir": str(folder)}, grid=WatchingGrid)
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    n = over["min-train-clients"]
    result = {"name": name, "n": n, "rounds": over["num-server-rounds"],
              "clip": over.get("client-dp-clipping-norm", 0.0) if "client-dp" in over else 0.0,
              "noise": over.get("client-dp-noise-multiplier", 0.0) if "client-dp" in over else 0.0,
              "base": history[0]["eval-loss"], "loss": history[-1]["eval-loss"],
              "epsilon": history[-1].get("client-epsilon", 0.0),
              "wall-seconds": time.perf_counter() - started, "load": load_average(),
              **summarize(WatchingGrid.rounds, over.get("client-dp-clipping-norm", 0.0)
                          if "client-dp" in over else 0.0, n)}
    saved.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{name}: loss {result['loss']:.3f} (base {result['base']:.3f}) eps "
          f"{result['epsilon']:.2f} {result['wall-seconds']:.0f} s", flush=True)
    return result


def _fraction(f: float) -> str:
    return f"1/{round(1 / f)}" if f < 1 else f"{f:g}"


def round_sig(x: float, digits: int = 2) -> float:
    return float(f"{x:.{digits - 1}e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", default="10,20", help="clients per round, comma separated")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--what-if", default="", help="N,...: runs with the noise on the mean "
                        "of N clients per round at --epsilon (with the fewest clients, middle clip)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the saved runs in --out, training nothing "
                             "(pass the same --what-if as the measuring run)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-client-dp",
                        help="folder of the saved runs (reused by a rerun)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "privacy-bench.md",
                        help="the markdown file whose client-level section is rewritten")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from common.dp import noise_for_releases

    torch.set_num_threads(1)
    sizes = [int(v) for v in args.clients.split(",")]
    z = noise_for_releases(args.epsilon, args.rounds, args.delta)
    results: dict[str, dict] = {}

    def once(name, over):
        saved = args.out / "".join(c if c.isalnum() else "-" for c in name).strip("-") / "result.json"
        if args.report_only:
            if saved.exists():
                results[name] = json.loads(saved.read_text())
            return
        results[name] = run(args.out, name, {**over, "dp-delta": args.delta})

    for n in sizes:
        once(f"no client DP, {n} per round", overrides(n, args.rounds))
    first = results.get(f"no client DP, {sizes[0]} per round")
    if first is None:
        raise SystemExit(f"no saved baseline run in {args.out}: run without --report-only first")
    clips = [round_sig(f * first["round1-median-norm"]) for f in CLIP_FACTORS]
    for n in sizes:
        for clip in clips:
            once(f"client DP eps {args.epsilon:g}, {n} per round, clip {clip:g}",
                 overrides(n, args.rounds, clip, z))
    median_clip = clips[CLIP_FACTORS.index(1.0)]
    for big in (int(v) for v in args.what_if.split(",") if v):
        once(f"noise of {big} per round, {sizes[0]} per round, clip {median_clip:g}",
             overrides(sizes[0], args.rounds, median_clip, z * sizes[0] / big))
    write_section(SECTION, report(results, args, z, clips), args.doc)
    print(f"wrote {args.doc}")


def report(results: dict, args, z: float, clips: list[float]) -> list[str]:
    """The section's lines: setting, table, and what the numbers say."""
    from common.model import resolve_dtype, resolve_device

    plain = {r["n"]: r for name, r in results.items() if name.startswith("no client DP")}
    d = next(iter(results.values()))["d"]
    need = math.ceil(math.sqrt(d) * z)
    dtype = resolve_dtype("auto", resolve_device("auto"), dp_sgd=False)
    lines = [
        "## Client-level DP on 50 clients (bench/client_dp.py)", "",
        "Measured by `python bench/client_dp.py"
        + (f" --what-if {args.what_if}" if args.what_if else "")
        + (f" --rounds {args.rounds}" if args.rounds != 4 else "") + f"` on {today()}, "
        f"{machine()}, shared with other jobs (1-minute load {next(iter(results.values()))['load']} "
        "at the first run's end), one torch thread, dtype auto "
        f"({dtype}).", "",
        f"Setting: SmolLM2-135M-Instruct, the built-in WordNet data split IID over "
        f"{NUM_CLIENTS} virtual clients (~310 examples each), "
        + " and ".join(str(n) for n in sorted(plain)) + " of them sampled per round, "
        f"{args.rounds} rounds of {COMMON['local-steps']} local steps of {COMMON['batch-size']} "
        f"examples ({COMMON['max-length']} tokens), lr {COMMON['lr']:g} constant; the DP "
        "recipe's small LoRA (r 4 on q_proj,v_proj, dropout 0) with FFA-LoRA: "
        f"d = {d:,} values trained, clipped and noised. Held-out loss over "
        f"{COMMON['eval-examples']} examples drawn before partitioning, after the last round. "
        "Every run uses the same seeds (the client sample and the noise included). "
        "Client DP: Flower's DifferentialPrivacyServerSideFixedClipping (`--client-dp "
        "server-fixed`; the client-side modes need Flower's mods, which this in-process "
        "bench does not run), an unweighted mean of the clipped updates plus Gaussian "
        f"noise of std z C / n per value. z = {z:.3f} spends user-level epsilon "
        f"{args.epsilon:g} (delta {args.delta:g}) over {args.rounds} rounds by Opacus' RDP "
        "accountant, with no amplification by subsampling (Flower samples a fixed number "
        "of clients without replacement). Clipping norms: "
        + ", ".join(_fraction(f) for f in CLIP_FACTORS) + " times the median "
        "round-1 update norm of the first baseline "
        f"({next(iter(plain.values()))['round1-median-norm']:.3g}). Kept improvement = "
        "(base - loss) / (base - loss without client DP at the same clients per round; "
        "that run's FedAvg weights by example counts, which differ by a few percent "
        "between IID partitions). "
        "Each row is one run: differences of a few hundredths are within run-to-run noise.",
        "",
        "| run | clients / round | rounds | clip C | noise multiplier z | user-level epsilon "
        "| noise std on the mean (z C / n) | expected noise norm (sqrt(d) z C / n) "
        "| noise norm / C | measured noise norm | updates clipped | held-out loss "
        "| kept improvement | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    kept: dict[str, float] = {}
    for name, r in results.items():
        n, clip, noise = r["n"], r["clip"], r["noise"]
        std = noise * clip / n
        gain = r["base"] - plain[n]["loss"] if n in plain else float("nan")
        kept[name] = (r["base"] - r["loss"]) / gain if gain > 0 else float("nan")
        expected = math.sqrt(r["d"]) * std
        lines.append(
            f"| {name} | {n} | {r['rounds']} | "
            + (f"{clip:g} | {noise:.3f} | {r['epsilon']:.2f} | {std:.2e} | {expected:.3g} | "
               f"{expected / clip:.1f} | {r['noise-norm']:.3g} | {r['clipped-share']:.0%}"
               if clip else "- | - | none | 0 | 0 | - | - | -")
            + f" | {r['loss']:.3f} | {kept[name]:.0%} | {r['wall-seconds']:.0f} |")
    norms = sorted(v for r in plain.values() for v in r["update-norms"])
    private = {k: r for k, r in results.items() if k.startswith("client DP")}
    best = {}
    for name, r in private.items():
        if r["n"] not in best or kept[name] > kept[best[r["n"]]]:
            best[r["n"]] = name
    what_if = [k for k in results if k.startswith("noise of")]
    lines += [
        "",
        f"Base model held-out loss: {next(iter(results.values()))['base']:.3f}. Client "
        f"update norms without client DP (all rounds): median {statistics.median(norms):.3g}, "
        f"range {norms[0]:.3g} to {norms[-1]:.3g}; the norm of the mean update: "
        + ", ".join(f"{r['mean-update-norm']:.3g} at {n} per round" for n, r in sorted(plain.items()))
        + ".", "",
        f"Best clipping norm at epsilon {args.epsilon:g}: "
        + "; ".join(f"{n} per round: clip {results[k]['clip']:g}, {kept[k]:.0%} kept "
                    f"(loss {results[k]['loss']:.3f})" for n, k in sorted(best.items()))
        + ". Worse than the base model: "
        + (", ".join(f"clip {r['clip']:g} at {r['n']} per round (loss {r['loss']:.3f})"
                     for r in private.values() if r["loss"] > r["base"]) or "none")
        + ". The clip was chosen on the same held-out loss that scores it (every run is "
        "shown), and a tuned clip spends privacy that epsilon does not count: a real "
        "deployment fixes it in advance, or uses adaptive clipping (Andrew et al., 2021).",
        "",
        f"Theory (McMahan et al., 2018, DP-FedAvg): the noise on the mean has std z C / n "
        f"per value, so its norm is about sqrt(d) z C / n, while the mean of clipped "
        f"updates has norm at most C; the ratio (column 'noise norm / C', matched by the "
        f"measured noise) does not depend on C. At epsilon {args.epsilon:g} over "
        f"{args.rounds} rounds z = {z:.3f}, so the noise norm falls below the clipping norm "
        f"only from n > sqrt(d) z = {math.sqrt(d):.0f} x {z:.3f} = about {need} clients per "
        f"round for this adapter (d = {d:,}). With the default LoRA (r 8 on every linear "
        f"layer: {DEFAULT_LORA_D:,} values, {DEFAULT_LORA_FFA_D:,} under FFA-LoRA) it would "
        f"be about {math.ceil(math.sqrt(DEFAULT_LORA_D) * z):,} clients per round "
        f"({math.ceil(math.sqrt(DEFAULT_LORA_FFA_D) * z):,} under FFA-LoRA).", ""]
    if what_if:
        lines += [
            "The loss is less strict than that bound: "
            + "; ".join(f"with the noise on the mean of {round(z * r['n'] / r['noise'])} "
                        f"clients per round (noise norm {math.sqrt(d) * r['noise'] / r['n']:.1f} C) "
                        f"the run kept {kept[k]:.0%}" for k, r in ((k, results[k]) for k in what_if))
            + " (their own epsilon is far above 8: these rows show what a federation of that "
            "many clients per round would keep at epsilon 8, not a private run here). Noise "
            "in random directions of d dimensions moves the loss at second order, the mean "
            "update at first order, so a clip below the typical update norm trades a "
            "smaller step for a much smaller noise std (z C / n); too small a clip leaves "
            "too small a step for the rounds there are.", ""]
    return lines


if __name__ == "__main__":
    main()
