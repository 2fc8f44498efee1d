"""Privacy against utility on the built-in data: the held-out improvement DP-SGD keeps
at epsilon 1, 3 and 8 (delta 1e-5) against the best non-private run, at equal
examples processed, and what a large logical batch costs per example and in memory.

One client's partition of the built-in WordNet data (the DP mechanism is per client:
a federation adds averaging, not privacy accounting), trained by the product's own
loop (``common.train.train_steps``) with the product's DP wrapper (``common.dp``).
Each setting starts from the same base model and processes the same number of
examples (expected, under Poisson sampling); the held-out loss is over examples drawn
before partitioning. Kept improvement = (base - DP loss) / (base - best no-DP loss).

The sweep is small and documented in the report: no DP over its learning rates with
the default LoRA; DP over its learning rates at epsilon 8 with the DP recipe's LoRA,
then epsilon 1 and 3 at the best one; then the logical batch size at epsilon 8.

    python bench/privacy.py                  # short CPU setting (~75 min on 2 busy cores)
    python bench/privacy.py --long --out docs   # the setting that settles the targets (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTITION = 1  # of 4: 1,999 examples, a delta of 1e-5 is far below 1/N
SHORT = {"examples": 192, "logical": 32, "trend": (8, 64), "lrs": (1e-3, 3e-3, 1e-2),
         "dp-lrs": (1e-3, 3e-3, 1e-2), "eval": 64, "batch": 8, "epsilons": (1.0, 3.0)}
LONG = {"examples": 16384, "logical": 512, "trend": (8, 64, 1024), "lrs": (3e-4, 1e-3, 3e-3),
        "dp-lrs": (1e-3, 3e-3, 1e-2), "eval": 256, "batch": 32, "epsilons": (1.0, 3.0)}
DP_LORA = {"lora_r": 4, "lora_target_modules": "q_proj,v_proj", "lora_dropout": 0.0,
           "lr_schedule": "constant", "dp_recipe": False}  # the recipe's LoRA, spelled out


def _setup():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))


_BASE: dict[str, float] = {}


def run_setting(cfg, epsilon: float, examples_budget: int, seed: int = 0) -> dict:
    """Train from the base adapter on the partition for ``examples_budget`` examples
    (expected), then the held-out loss; the cached model is restored afterwards."""
    import torch

    from common.data import batches_forever, heldout_examples, partition_examples
    from common.dp import Accountant, PrivateTraining, plan
    from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state
    from common.objectives import build_objective
    from common.train import evaluate, train_steps

    tokenizer = load_tokenizer(cfg.model)
    examples = partition_examples(cfg, PARTITION, 4, tokenizer)
    heldout = heldout_examples(cfg, 4, tokenizer)
    model = get_model(cfg)
    initial = {k: v.clone() for k, v in adapter_state(model).items()}
    logical = cfg.batch_size * cfg.grad_accum
    steps = max(1, examples_budget // logical)
    private = None
    if epsilon:
        dp = plan(cfg.replace(dp_sgd=True, dp_target_epsilon=epsilon), num_examples=len(examples),
                  planned_steps=steps)
        private = PrivateTraining(dp, Accountant(), examples, tokenizer.pad_token_id,
                                  torch.Generator().manual_seed(seed + 1), cfg.dp_grad_sample_mode)
    torch.manual_seed(seed)
    batches = batches_forever(examples, cfg.batch_size, tokenizer.pad_token_id,
                              torch.Generator().manual_seed(seed))
    stats = train_steps(model, batches, build_objective(model, cfg), cfg, num_steps=steps,
                        total_steps=steps, private=private, desc=f"eps {epsilon or 'inf'}")
    loss = evaluate(model, heldout, batch_size=cfg.eval_batch_size,
                    pad_token_id=tokenizer.pad_token_id).loss
    set_adapter_state(model, initial)
    if "base" not in _BASE:  # B = 0: every adapter starts as the base model
        _BASE["base"] = evaluate(model, heldout, batch_size=cfg.eval_batch_size,
                                 pad_token_id=tokenizer.pad_token_id).loss
    base = _BASE["base"]
    return {"loss": loss, "base": base, "steps": steps, "n": len(examples), "examples": stats.examples,
            "logical": logical, "lr": cfg.lr, "seconds": stats.seconds,
            "epsilon": private.accountant.epsilon(private.plan.delta) if private else 0.0,
            "noise": private.plan.noise_multiplier if private else 0.0,
            "sample-rate": private.plan.sample_rate if private else 0.0,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def utility(cfg, s: dict, saved: Path) -> dict:
    """The documented sweep; results are saved after every run (a rerun skips them)."""
    results = json.loads(saved.read_text()) if saved.exists() else {}

    def once(name, c, eps):
        if name not in results:
            results[name] = run_setting(c, eps, s["examples"])
            saved.write_text(json.dumps(results, indent=1))
            r = results[name]
            print(f"{name:34s} loss {r['loss']:.3f} (base {r['base']:.3f}) eps {r['epsilon']:.2f} "
                  f"noise {r['noise']:.2f} {r['seconds']:.0f} s", flush=True)
        return results[name]

    batch = s["batch"]
    for lr in s["lrs"]:
        once(f"no DP, lr {lr:g}", cfg.replace(lr=lr, batch_size=batch), 0.0)
    dp = cfg.replace(batch_size=batch, grad_accum=max(1, s["logical"] // batch), **DP_LORA)
    for lr in s["dp-lrs"]:
        once(f"DP eps 8, L {s['logical']}, lr {lr:g}", dp.replace(lr=lr), 8.0)
    best_lr = min(s["dp-lrs"], key=lambda lr: results[f"DP eps 8, L {s['logical']}, lr {lr:g}"]["loss"])
    for eps in s["epsilons"]:
        once(f"DP eps {eps:g}, L {s['logical']}, lr {best_lr:g}", dp.replace(lr=best_lr), eps)
    for logical in s["trend"]:
        if logical != s["logical"]:
            once(f"DP eps 8, L {logical}, lr {best_lr:g}",
                 dp.replace(lr=best_lr, batch_size=min(batch, logical),
                            grad_accum=max(1, logical // batch)), 8.0)
    return results


# --- cost per example and peak memory: one process per setting ---------------------------
COSTS = {  # name -> (batch-size, grad-accum, dp: "" (off), "hooks" or "ghost")
    "no DP, batch 8": (8, 1, ""),
    "DP hooks, batch 8": (8, 1, "hooks"),
    "DP hooks, logical 32 = 4 x 8 micro-batches": (8, 4, "hooks"),
    "DP hooks, one physical batch of 32": (32, 1, "hooks"),
    "DP ghost, logical 32 = 4 x 8 micro-batches": (8, 4, "ghost"),
    "DP ghost, one physical batch of 32": (32, 1, "ghost"),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_cost(batch: int, accum: int, mode: str) -> dict:
    """Seconds per example and peak resident memory of one logical step (Linux RSS,
    sampled every 20 ms) above the memory after a one-example warm-up step, which
    pages the weights in; ``mode``: "" (no DP), "hooks" or "ghost"."""
    import torch

    from common.config import RunConfig
    from common.data import batches_forever, partition_examples
    from common.dp import Accountant, DPPlan, PrivateTraining
    from common.model import get_model, load_tokenizer
    from common.objectives import build_objective
    from common.train import train_steps

    cfg = RunConfig(batch_size=batch, grad_accum=accum, **DP_LORA)
    tokenizer = load_tokenizer(cfg.model)
    examples = partition_examples(cfg, PARTITION, 4, tokenizer)
    model = get_model(cfg)
    logical = batch * accum

    def step(c, n):
        dp = DPPlan(noise_multiplier=1.0, sample_rate=n / len(examples), expected_batch_size=n,
                    max_grad_norm=1.0, delta=1e-5, budget=0.0, planned_steps=2,
                    micro_batches=c.grad_accum)
        private = PrivateTraining(dp, Accountant(), examples, tokenizer.pad_token_id,
                                  torch.Generator().manual_seed(7), mode) if mode else None
        batches = batches_forever(examples, c.batch_size, tokenizer.pad_token_id,
                                  torch.Generator().manual_seed(7))
        return train_steps(model, batches, build_objective(model, c), c, num_steps=1,
                           private=private)

    step(cfg.replace(batch_size=1, grad_accum=1), 1)  # warm-up: weights paged in
    before, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.02)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    stats = step(cfg, logical)
    done.set()
    watcher.join()
    return {"seconds-per-example": stats.seconds / max(1, stats.examples),
            "examples": stats.examples, "peak-mib": (max(peak[0], _rss()) - before) / 2**20}


def costs(saved: Path) -> dict:
    """Each setting in its own process; saved after each (a rerun skips them)."""
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for name, (batch, accum, mode) in COSTS.items():
        if name in results:
            continue
        child = subprocess.run([sys.executable, __file__, "--cost", f"{batch},{accum},{mode}"],
                               capture_output=True, text=True, cwd=ROOT)
        if child.returncode:
            raise RuntimeError(child.stderr[-2000:])
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        saved.write_text(json.dumps(results, indent=1))
        print(name, results[name], flush=True)
    return results


# --- report ----------------------------------------------------------------------------------
def kept(r: dict, best_plain: dict) -> float:
    gain = r["base"] - best_plain["loss"]
    return (r["base"] - r["loss"]) / gain if gain > 0 else float("nan")


def write_report(results: dict, cost: dict, s: dict, args, out: Path) -> None:
    lines = _utility_lines(results, s, args) if results else [
        "# Privacy: what large logical batches cost (the utility sweep: see docs/privacy.md)",
        "", "Measured by `python bench/privacy.py " + " ".join(args.argv) + f"` on "
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores shared "
        "with other jobs, one torch thread (absolute times drift; ratios are measured in the "
        "same run). The utility sweep was not run in this measurement.", ""]
    lines += _cost_lines(cost)
    path = out / "privacy-bench.md"
    # bench/client_dp.py's section (client-level DP) is its own: keep it.
    sections = re.findall(r"<!-- section:.*?<!-- end:[^>]*-->",
                          path.read_text() if path.exists() else "", re.S)
    path.write_text("\n".join(lines + sections) + ("\n" if sections else ""))


def _utility_lines(results: dict, s: dict, args) -> list[str]:
    plain = {k: v for k, v in results.items() if k.startswith("no DP")}
    best_plain = min(plain.values(), key=lambda r: r["loss"])
    base = best_plain["base"]
    lines = [
        "# Privacy: the improvement DP-SGD keeps, and what large logical batches cost",
        "",
        "Measured by `python bench/privacy.py" + (" " + " ".join(args.argv) if args.argv else "")
        + f"` on {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores "
        "shared with other jobs, one torch thread (absolute times drift; ratios are measured in "
        "the same run).",
        "",
        f"Setting: SmolLM2-135M-Instruct, one client's partition of the built-in WordNet data "
        f"(partition {PARTITION} of 4, {results[next(iter(results))]['n']:,} examples), "
        f"{s['examples']:,} examples processed per run (expected, under Poisson sampling), "
        f"held-out loss over {s['eval']} examples drawn before partitioning (base model "
        f"{base:.3f}). No DP: the default LoRA (r 8, all linear layers, dropout 0.05, cosine lr), "
        f"batch {s['batch']}. DP-SGD: the DP recipe's LoRA (r 4 on q_proj,v_proj, dropout 0, "
        "constant lr), clip 1, delta 1e-5, the noise computed by Opacus for the logical "
        "sampling rate to spend epsilon over the run's steps.",
        "",
        "Sweep: no DP at lr " + ", ".join(f"{v:g}" for v in s["lrs"]) + "; DP at epsilon 8 "
        f"with a logical batch of {s['logical']} at lr " + ", ".join(f"{v:g}" for v in s["dp-lrs"])
        + "; epsilon " + ", ".join(f"{v:g}" for v in s["epsilons"]) + " at the best DP lr; "
        "the logical batch " + ", ".join(str(v) for v in s["trend"]) + " at epsilon 8 and the "
        "best DP lr. Each row is one run (seed 0): differences of a few hundredths are "
        "within run-to-run noise.",
        "",
        "| run | logical batch | steps | lr | noise multiplier | sampling rate | epsilon "
        "| held-out loss | kept improvement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['logical']} | {r['steps']} | {r['lr']:g} | {r['noise']:.2f} | "
            f"{r['sample-rate']:.3f} | {r['epsilon']:.2f} | {r['loss']:.3f} | "
            f"{kept(r, best_plain):.0%} |")
    by_eps = _curve(results, best_plain)
    verdict = []
    for eps, target in ((8.0, 0.6), (3.0, 0.4)):
        if eps in by_eps:
            value = by_eps[eps]
            verdict.append(f"epsilon {eps:g}: {value:.0%} kept (target {target:.0%}: "
                           f"{'reached' if value >= target else 'not reached'} in this setting)")
    lines += ["", "Best of each epsilon: " + "; ".join(verdict) + ".", "",
              "What this does and does not show: each run processes "
              f"{s['examples']:,} examples, so DP-SGD takes only "
              f"{max(1, s['examples'] // s['logical'])} steps at a logical batch of "
              f"{s['logical']}; both sides are early in training, where the no-DP run's "
              "improvement is also far from its end. The private and the non-private runs "
              "use different LoRA settings (each its own default: the recipe's under DP), "
              "and each row is one seed. Whether the shares hold over a full run is what "
              "`python bench/privacy.py --long` settles.", "",
              "![kept improvement against epsilon](privacy.png)", ""]
    return lines


def _cost_lines(cost: dict) -> list[str]:
    lines: list[str] = []
    if cost:
        ref = cost["no DP, batch 8"]
        lines += [
            "## Cost per example and peak memory", "",
            "One logical step, each setting in its own process, after a one-example warm-up "
            "step that pages the weights in; peak = the resident memory above that during "
            "the step (Linux RSS sampled every 20 ms). One step each on a loaded machine: "
            "the times are rough, the memory is not. Every DP setting draws the same Poisson "
            "batch (seed 7). Saved per setting in runs/bench-privacy-costs.json, which a "
            "rerun reuses.", "",
            "| setting | examples in the step | s / example | vs no DP, batch 8 | peak memory (MiB) |",
            "|---|---|---|---|---|",
        ]
        for name, c in cost.items():
            lines.append(f"| {name} | {c['examples']} | {c['seconds-per-example']:.3f} | "
                         f"{c['seconds-per-example'] / ref['seconds-per-example']:.2f}x | "
                         f"{c['peak-mib']:.0f} |")
        lines.append("")
    return lines


def _curve(results: dict, best_plain: dict) -> dict[float, float]:
    best: dict[float, float] = {}
    for r in results.values():
        if r["epsilon"]:
            eps = round(r["epsilon"])
            best[eps] = max(best.get(eps, -1e9), kept(r, best_plain))
    return dict(sorted(best.items()))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = min((r for k, r in results.items() if k.startswith("no DP")), key=lambda r: r["loss"])
    curve = _curve(results, plain)
    eps = [*curve, 32.0]  # no DP (epsilon infinity) drawn at the right edge
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(eps, [*curve.values(), 1.0], marker="o")
    for target_eps, target in ((8, 0.6), (3, 0.4)):
        ax.plot([target_eps], [target], marker="_", markersize=20, color="red")
    ax.set_xscale("log", base=2)
    ax.set_xticks([*curve, 32.0], [f"{e:g}" for e in curve] + ["no DP"])
    ax.set_ylim(min(0.0, *curve.values()) - 0.05, 1.05)
    ax.set_xlabel("epsilon (delta 1e-5)")
    ax.set_ylabel("kept share of the no-DP improvement")
    ax.set_title("DP-SGD utility (red: targets)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="the GPU setting (settles the targets)")
    parser.add_argument("--examples", type=int, help="examples processed per run")
    parser.add_argument("--lrs", help="comma separated learning rates of the no-DP sweep")
    parser.add_argument("--dp-lrs", help="comma separated learning rates of the DP sweep")
    parser.add_argument("--logical", type=int, help="the DP runs' logical batch")
    parser.add_argument("--trend", help="comma separated logical batches at epsilon 8")
    parser.add_argument("--epsilons", help="comma separated epsilons below 8 (default 1,3)")
    parser.add_argument("--skip-costs", action="store_true")
    parser.add_argument("--only-costs", action="store_true",
                        help="measure the costs and reuse the saved utility runs")
    parser.add_argument("--cost", help=argparse.SUPPRESS)  # child: batch,accum,private
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    _setup()
    if args.cost:
        batch, accum, mode = args.cost.split(",")
        print(json.dumps(measure_cost(int(batch), int(accum), mode)))
        return
    from common.config import RunConfig

    s = dict(LONG if args.long else SHORT)
    if args.examples:
        s["examples"] = args.examples
    if args.lrs:
        s["lrs"] = tuple(float(v) for v in args.lrs.split(","))
    if args.logical:
        s["logical"] = args.logical
    if args.epsilons is not None:
        s["epsilons"] = tuple(float(v) for v in args.epsilons.split(",") if v)
    if args.dp_lrs:
        s["dp-lrs"] = tuple(float(v) for v in args.dp_lrs.split(","))
    if args.trend:
        s["trend"] = tuple(int(v) for v in args.trend.split(","))
    cfg = RunConfig(eval_examples=s["eval"], device="auto")
    saved = ROOT / "runs" / f"bench-privacy{'-long' if args.long else ''}.json"
    saved.parent.mkdir(exist_ok=True)
    cost = {} if args.skip_costs else costs(saved.with_name(saved.stem + "-costs.json"))
    if args.only_costs:
        results = json.loads(saved.read_text()) if saved.exists() else {}
    else:
        results = utility(cfg, s, saved)
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(results, cost, s, args, args.out)
    if results:
        plot(results, args.out / "privacy.png")
    print(f"wrote {args.out / 'privacy-bench.md'}")


if __name__ == "__main__":
    main()
