"""Process-level setup shared by every entry point (threads, quiet libraries)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from common.config import RunConfig

# `fedtune simulate` passes its resolved config to the ServerApp and the ClientApps
# through this variable: Flower's public run_simulation() has no run-config argument,
# and Ray's workers inherit the driver's environment.
CONFIG_ENV = "FEDTUNE_RUN_CONFIG"


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The one way an app turns Flower's ``context.run_config`` into a RunConfig."""
    values = dict(run_config)
    if os.environ.get(CONFIG_ENV):
        values.update(json.loads(os.environ[CONFIG_ENV]))
    return RunConfig.from_mapping(values)


# The path of a JSON file with the preflight's data counts (server/checkpoints.py), not
# the JSON: with 1,000 clients the counts were ~150 KB, and Linux refuses to start any
# process (Ray's daemons first) whose environment holds a string over 128 KiB (E2BIG).
DATA_STATS_ENV = "FEDTUNE_DATA_STATS"


def data_stats_file() -> Path:
    """A new empty file for the preflight's counts; its creator removes it."""
    fd, path = tempfile.mkstemp(prefix="fedtune-data-stats-", suffix=".json")
    os.close(fd)
    return Path(path)


def setup_process(num_threads: int) -> None:
    import torch  # here, not at the top: `fedtune simulate`'s parent never imports torch

    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" per load
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()  # one bar per filter/shuffle floods client logs
    except ImportError:
        pass


def release_memory() -> None:
    """Give the memory a training round or an evaluation freed back to the system.

    glibc keeps freed blocks in its arenas: a client process grew from 1.9 to 2.4 GB
    RSS over 18 steps of differently shaped batches and ``malloc_trim`` brought it back
    to 1.2 GB (docs/benchmarks.md, memory). Called between rounds, not inside the loop
    (the next step would allocate the same blocks again). A no-op without glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def skip_exit_collection() -> None:
    """Call when the process is about to exit: the interpreter's last garbage
    collections will not walk the heap that torch, transformers, Flower and Ray built.

    ``gc.freeze()`` (the standard library's) moves every tracked object to the
    permanent generation, which no later collection visits.
    Exit handlers, file flushing and module teardown still run as usual; only the
    cycle search over the existing heap is skipped, and the OS frees the memory anyway.
    Measured (``fedtune simulate``'s child, one py-spy dump per second after its exit
    handlers): 3.5 s in ``gc_collect_main`` before the process ended, 0.5 s with it.
    Not for a process that goes on working (its cyclic garbage would never be freed).
    """
    import gc

    gc.freeze()


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's or a
    scheduler's CPU set), not every core of the host."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


@contextlib.contextmanager
def all_cores():
    """torch uses every core this process may run on inside the block, then its own
    thread count again. For work that nothing runs beside: the server's evaluation
    between rounds, while every client waits for the next round's message. Measured once
    (one-off script) on the demo's 96 held-out examples, 2 cores: 10.4 s at one thread,
    6.0 s at two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(before, usable_cores()))
    try:
        yield
    finally:
        torch.set_num_threads(before)
