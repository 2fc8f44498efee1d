"""Screening of client train replies before aggregation.

A reply is rejected when it could corrupt the global adapter or crash aggregation:
arrays that do not match what the server sent (names, shapes, dtypes), NaN/Inf, an
update far larger than the round's median update, or a declared example count that
FedAvg would weight by but that cannot be true. Each check returns a reason from
``REASONS`` and a one-line detail for the log, or ``None`` when the reply passes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from common.config import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, RunConfig
from common.transport import from_wire

# Rejection reasons, in the order they are checked; history rows count each one.
REASONS = ("malformed", "names", "shape", "dtype", "non-finite", "num-examples", "norm")


@dataclass(frozen=True)
class UpdateGuard:
    """Bounds a reply must respect; 0 switches a bound off."""

    max_update_norm_ratio: float = 10.0
    max_num_examples: int = 10_000_000

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "UpdateGuard":
        return cls(max_update_norm_ratio=cfg.max_update_norm_ratio,
                   max_num_examples=cfg.max_num_examples)


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str
    detail: str


def screen_replies(replies: list[Message], reference: ArrayRecord, guard: UpdateGuard, *,
                   transport_dtype: str = "float32") -> tuple[list[Message], list[Rejection]]:
    """Split error-free train replies into (accepted, rejected).

    ``reference`` is the adapter as sent this round, in ``transport_dtype``: replies
    must come back in the same precision.

    Per-reply checks run first; the norm bound then compares each survivor with the
    median of the survivors, so that hostile replies do not set their own yardstick.
    """
    accepted, rejected = [], []
    for reply in replies:
        problem = check_reply(reply, reference, guard, transport_dtype)
        if problem:
            rejected.append(Rejection(reply.metadata.src_node_id, *problem))
        else:
            accepted.append(reply)
    accepted, odd = _same_metric_keys(accepted)
    rejected += odd
    accepted, too_large = _bounded_norms(accepted, reference, guard.max_update_norm_ratio,
                                         transport_dtype)
    return accepted, rejected + too_large


def check_reply(reply: Message, reference: ArrayRecord, guard: UpdateGuard,
                transport_dtype: str = "float32") -> tuple[str, str] | None:
    content = reply.content
    if list(content.array_records) != [ARRAYS_KEY] or list(content.metric_records) != [METRICS_KEY]:
        return "malformed", (f"expected one ArrayRecord '{ARRAYS_KEY}' and one MetricRecord "
                             f"'{METRICS_KEY}', got {sorted(content.keys())}")
    return (check_arrays(content[ARRAYS_KEY], reference, transport_dtype)
            or check_num_examples(content[METRICS_KEY].get(NUM_EXAMPLES_KEY),
                                  cap=guard.max_num_examples))


def check_arrays(arrays: ArrayRecord, reference: ArrayRecord, transport_dtype: str = "float32",
                 ) -> tuple[str, str] | None:
    """Same names, shapes and dtypes as the global adapter sent this round (in
    ``transport_dtype``); all finite."""
    if set(arrays) != set(reference):
        extra, missing = sorted(set(arrays) - set(reference)), sorted(set(reference) - set(arrays))
        return "names", f"unexpected arrays {extra[:3]}, missing arrays {missing[:3]}"
    for name, ref in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(ref.shape):
            return "shape", f"'{name}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:  # what was sent: the transport dtype's wire form
            return "dtype", (f"'{name}' has dtype {got.dtype}, expected {ref.dtype} "
                             f"('transport-dtype' {transport_dtype})")
    for name, got in arrays.items():
        try:
            values = decoded(got, transport_dtype)
        except ValueError as err:  # the payload's own dtype header disagrees with Array.dtype
            return "dtype", f"'{name}': {str(err).splitlines()[0]}"
        if not values.isfinite().all():
            return "non-finite", f"'{name}' holds NaN or Inf"
    return None


def decoded(array, transport_dtype: str):
    """A float32 tensor; a payload unlike its Array.dtype, or not numpy, raises ValueError."""
    return from_wire(array.numpy(), transport_dtype)


def check_num_examples(value, *, cap: int) -> tuple[str, str] | None:
    """FedAvg weights by this number, so one inflated count would outweigh everyone."""
    # bool is an int subclass; a float (even 3.0) is not a count a client computes.
    if isinstance(value, bool) or not isinstance(value, int):
        return "num-examples", f"'{NUM_EXAMPLES_KEY}' is {value!r}, not an integer"
    if value <= 0:
        return "num-examples", f"'{NUM_EXAMPLES_KEY}' is {value}, not positive"
    if cap and value > cap:
        return "num-examples", (f"'{NUM_EXAMPLES_KEY}' is {value}, above "
                                f"'max-num-examples' {cap}")
    return None


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray], transport_dtype: str,
                ) -> float:
    """||client - global|| over all adapter tensors, in float64 (no overflow)."""
    total = 0.0
    for name, ref in reference.items():
        diff = decoded(arrays[name], transport_dtype).numpy().astype(np.float64) - ref
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def _bounded_norms(replies: list[Message], reference: ArrayRecord, ratio: float, dtype: str,
                   ) -> tuple[list[Message], list[Rejection]]:
    if not ratio or not replies:
        return replies, []
    # The update is measured from what the clients received: the rounded global adapter.
    ref = {name: decoded(arr, dtype).numpy().astype(np.float64)
           for name, arr in reference.items()}
    norms = [update_norm(r.content[ARRAYS_KEY], ref, dtype) for r in replies]
    median = float(np.median(norms))
    # A zero median (most clients sent the global adapter back) gives no scale.
    if median == 0.0:
        return replies, []
    accepted, rejected = [], []
    for reply, norm in zip(replies, norms):
        if norm > ratio * median:
            rejected.append(Rejection(reply.metadata.src_node_id, "norm",
                                      f"update norm {norm:.4g} > {ratio:g} x round median "
                                      f"{median:.4g} ('max-update-norm-ratio')"))
        else:
            accepted.append(reply)
    return accepted, rejected


def _same_metric_keys(replies: list[Message]) -> tuple[list[Message], list[Rejection]]:
    """Flower's aggregation raises (ending the run) when metric keys differ between
    replies, so a reply with keys unlike the round's most common set is rejected."""
    if not replies:
        return replies, []
    keysets = [frozenset(r.content[METRICS_KEY].keys()) for r in replies]
    usual = Counter(keysets).most_common(1)[0][0]
    accepted, rejected = [], []
    for reply, keys in zip(replies, keysets):
        if keys == usual:
            accepted.append(reply)
        else:
            rejected.append(Rejection(reply.metadata.src_node_id, "malformed",
                                      f"metric keys {sorted(keys ^ usual)} differ from the "
                                      "other replies'"))
    return accepted, rejected
