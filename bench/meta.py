"""Meta-learning on tasks nobody trained on: k-shot query loss of the base model,
FedAvg's adapter and Reptile's, on WordNet categories held out of the federation.

Protocol (common/meta.py): 4 clients, one training category each (the demo's); three
*validation* tasks to tune on (Reptile's server step size and inner steps, and each
initialisation's adaptation lr) and three *test* tasks reported, none of them in any
client or held-out split. Per task and seed: a query set of 32 examples and nested
k-shot support sets (k = 4, 8, 16, 32) disjoint from it; 8 adaptation steps of AdamW on
the support set, query loss after (k = 0: before adapting). Every federation is the
same work (4 clients x 4 rounds x 8 local steps of batch 4, 64 tokens, or the same
client steps in 2 rounds of 16 or 8 rounds of 4), in one process (bench/inproc.py).
The same FedAvg / Reptile pair also runs with 16 training tasks (clients), 4 sampled a
round, at the same client steps: Reptile's premise is many tasks.

    python bench/meta.py                 # federations, tuning, test (~60 min on a loaded 2-core VM)
    python bench/meta.py --report-only   # the report from the results saved so far

Writes docs/meta-learning.md and docs/meta-learning.png; results (deterministic under
the seeds) in runs/bench-meta/, reused by a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = "noun.animal,noun.food,noun.plant,noun.body"  # the demo's four clients
VALIDATION_TASKS = ["noun.location", "verb.communication", "noun.act"]
TEST_TASKS = ["noun.artifact", "verb.motion", "noun.person"]
COMMON = {"categories": TRAIN, "meta-test-categories": ",".join(TEST_TASKS), "num-clients": 4,
          "batch-size": 4, "max-length": 64, "eval-examples": 32, "eval-batch-size": 32,
          "num-threads": 1, "lr": 1e-3}
FEDERATIONS = {  # equal client steps: 4 clients x 32 steps each
    "fedavg": {"num-server-rounds": 4, "local-steps": 8},
    "reptile eps 0.3": {"num-server-rounds": 4, "local-steps": 8, "strategy": "reptile",
                        "reptile-epsilon": 0.3},
    "reptile eps 0.5": {"num-server-rounds": 4, "local-steps": 8, "strategy": "reptile",
                        "reptile-epsilon": 0.5},
    "reptile eps 0.5, 16 inner steps": {"num-server-rounds": 2, "local-steps": 16,
                                        "strategy": "reptile", "reptile-epsilon": 0.5},
    "reptile eps 0.5, 8 rounds x 4 steps": {"num-server-rounds": 8, "local-steps": 4,
                                            "strategy": "reptile", "reptile-epsilon": 0.5},
}
# Many training tasks: Reptile's premise (Nichol et al. 2018) is a distribution of tasks.
# 16 clients, one category each, none of them a validation or test task; 4 sampled per
# round (fraction-train 0.25), so the client steps stay 4 x 32 as above.
MANY = ("noun.animal,noun.food,noun.plant,noun.body,noun.attribute,noun.cognition,"
        "noun.communication,noun.state,noun.group,noun.substance,noun.event,noun.possession,"
        "verb.change,verb.contact,verb.social,verb.creation")
MANY_TASKS = {"categories": MANY, "num-clients": 16, "fraction-train": 0.25}
MANY_SUFFIX = ", 16 tasks"
FEDERATIONS.update({
    "fedavg" + MANY_SUFFIX: {**MANY_TASKS, "num-server-rounds": 4, "local-steps": 8},
    "reptile eps 0.5" + MANY_SUFFIX: {**MANY_TASKS, "num-server-rounds": 4, "local-steps": 8,
                                      "strategy": "reptile", "reptile-epsilon": 0.5},
})
SHOTS = [4, 8, 16, 32]
QUERY, STEPS = 32, 8
VAL_SHOTS, VAL_SEEDS, TEST_SEEDS = [8], [0, 1], [0, 1, 2]
ADAPT_LRS = [1e-4, 3e-4, 1e-3, 3e-3]
OBSERVED_LOAD = "see the report's load line"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def federation(out: Path, name: str) -> dict:
    """One federated run (or its saved result): the held-out loss per round."""
    folder = out / slug(name)
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    import shutil

    from bench.inproc import run_federation

    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    run_federation({**COMMON, **FEDERATIONS[name], "run-dir": str(folder)})
    history = [json.loads(l) for l in (folder / "history.jsonl").read_text().splitlines()]
    result = {"name": name, "wall-seconds": time.perf_counter() - started, "history": history}
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def adapter_of(out: Path, init: str) -> dict:
    """The initialisation's adapter: the fresh, seeded LoRA (B = 0: the base model) for
    'base', else the run's final global adapter."""
    from common.adapters import find_adapter, read_adapter_weights
    from common.config import RunConfig
    from common.model import adapter_state, get_model

    if init == "base":
        from bench.inproc import fresh_adapter

        cfg = RunConfig.from_mapping(COMMON)
        fresh_adapter(cfg)
        return {k: v.clone() for k, v in adapter_state(get_model(cfg)).items()}
    return read_adapter_weights(find_adapter(str(out / slug(init))).path)


def kshot(out: Path, stage: str, init: str, tasks: list[str], shots: list[int],
          seeds: list[int], lr: float) -> dict:
    """The k-shot rows of one initialisation (or their saved copy)."""
    path = out / f"{stage}-{slug(init)}-lr{lr:g}.json"
    if path.exists():
        return json.loads(path.read_text())
    from common.config import RunConfig
    from common.meta import episodes, kshot_report
    from common.model import load_tokenizer

    cfg = RunConfig.from_mapping(COMMON)
    started = time.perf_counter()
    eps = episodes(cfg, load_tokenizer(cfg.model), tasks=tasks, shots=shots,
                   query_examples=QUERY, seeds=seeds)
    report = kshot_report(cfg, adapter_of(out, init), eps, steps=STEPS, lr=lr)
    result = {"init": init, "lr": lr, "tasks": tasks, "seeds": seeds, "rows": report.rows,
              "curve": {str(k): v for k, v in report.curve().items()},
              "seconds": time.perf_counter() - started}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def at(result: dict, k: int) -> float:
    return result["curve"][str(k)][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-meta")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    feds = {}
    for name in FEDERATIONS:
        if args.report_only and not (args.out / slug(name) / "result.json").exists():
            continue
        feds[name] = federation(args.out, name)
        print(f"bench/meta: federation {name} done", flush=True)
    # Tuning on the validation tasks: Reptile's variant, and each init's adaptation lr.
    val: dict[str, dict[float, dict]] = {}
    for init in ["base", *feds]:
        val[init] = {}
        for lr in ADAPT_LRS:
            saved = args.out / f"val-{slug(init)}-lr{lr:g}.json"
            if args.report_only and not saved.exists():
                continue
            val[init][lr] = kshot(args.out, "val", init, VALIDATION_TASKS, VAL_SHOTS, VAL_SEEDS, lr)
            print(f"bench/meta: validation {init} lr {lr:g}: k=8 {at(val[init][lr], 8):.4f}",
                  flush=True)
    best_lr = {i: min(v, key=lambda lr: at(v[lr], 8)) for i, v in val.items() if v}
    reptiles = [n for n in feds if n.startswith("reptile") and n in best_lr
                and not n.endswith(MANY_SUFFIX)]
    best_reptile = min(reptiles, key=lambda n: at(val[n][best_lr[n]], 8)) if reptiles else None
    test = {}
    many = [n for n in feds if n.endswith(MANY_SUFFIX)]
    for init in ["base", "fedavg", best_reptile, *many]:
        if init is None or init not in best_lr:
            continue
        saved = args.out / f"test-{slug(init)}-lr{best_lr[init]:g}.json"
        if args.report_only and not saved.exists():
            continue
        test[init] = kshot(args.out, "test", init, TEST_TASKS, SHOTS, TEST_SEEDS, best_lr[init])
        print(f"bench/meta: test {init} done", flush=True)
    from bench.meta_report import write_report

    write_report(feds, val, best_lr, best_reptile, test)


if __name__ == "__main__":
    main()
