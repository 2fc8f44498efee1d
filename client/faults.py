"""Test hooks, not features: make chosen partitions misbehave the way faulty or hostile
clients do, so tests and bench/faults.py can check that the server copes.

    FEDTUNE_TEST_CRASH_PARTITION=1            partition 1 raises in train()
    FEDTUNE_TEST_CORRUPT="3:nan,7:scale1000"  partition 3 replies NaNs; partition 7 its
                                              update (local - global) times 1000
"""

from __future__ import annotations

import os

import torch

CRASH_ENV = "FEDTUNE_TEST_CRASH_PARTITION"
CORRUPT_ENV = "FEDTUNE_TEST_CORRUPT"


def crash_if_asked(partition_id: int) -> None:
    if os.environ.get(CRASH_ENV) == str(partition_id):
        raise RuntimeError(f"{CRASH_ENV}: partition {partition_id} crashes on purpose")


def corrupt_if_asked(partition_id: int, state: dict[str, torch.Tensor],
                     sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as trained, or corrupted as ``FEDTUNE_TEST_CORRUPT`` asks for this
    partition; ``sent`` is the global adapter the server sent this round."""
    how = _plan().get(partition_id)
    if how is None:
        return state
    if how == "nan":
        return {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    factor = float(how.removeprefix("scale"))
    return {k: sent[k].to(v.dtype) + factor * (v - sent[k].to(v.dtype)) for k, v in state.items()}


def _plan() -> dict[int, str]:
    plan = {}
    for item in filter(None, os.environ.get(CORRUPT_ENV, "").split(",")):
        partition, _, how = item.partition(":")
        if how != "nan" and not how.startswith("scale"):
            raise ValueError(f"{CORRUPT_ENV} entry {item!r}: use PARTITION:nan or PARTITION:scaleK")
        plan[int(partition)] = how
    return plan
