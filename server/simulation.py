"""Child process of ``fedtune simulate``: Flower's simulation engine (Ray), or with
'backend' sequential every client in this process (server/sequential.py).

Reads the resolved config from the environment (see ``common.runtime``); the parent
owns the process group and cleans it up.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

from common.runtime import CONFIG_ENV, config_from_run_config


INPUT_ERROR_EXIT = 2  # a bad input, reported in one line before Ray starts


def main() -> int:
    cfg = config_from_run_config({})
    from common.runtime import release_memory, setup_process, skip_exit_collection, usable_cores
    from server.cli import check_inputs

    setup_process(cfg.num_threads)
    try:
        cfg = check_inputs(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fedtune: error: {err}", flush=True)
        return INPUT_ERROR_EXIT
    release_memory()  # the check tokenized every partition; the clients hold their own
    cores = usable_cores()
    if cfg.backend == "sequential":  # server/sequential.py: no Ray, one copy of the model
        from server.sequential import run_sequential

        # The apps read their config from the contexts (no environment to override it):
        # the server saves the run's config as given, and the clients, which run one at
        # a time in this process, each use every core.
        os.environ.pop(CONFIG_ENV, None)
        run_sequential(cfg, client_threads=max(cfg.num_threads, cores))
        skip_exit_collection()
        return 0
    # the apps (here and in Ray's workers, which inherit this environment) read it
    os.environ[CONFIG_ENV] = json.dumps(cfg.to_mapping())
    # Ray prestarts idle Python workers (~85 MB each) that a simulation of a few actors
    # never uses; its raylet reads its settings from this process's environment.
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import app as server_app

    backend = {
        # One Ray actor per `num-threads` cores: each actor is a process holding one
        # copy of the base model, reused for every client and round it serves.
        "client_resources": {"num_cpus": min(cfg.num_threads, cores), "num_gpus": 0.0},
        "init_args": {"num_cpus": cores, "num_gpus": 0, "include_dashboard": False,
                      "log_to_driver": True},
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="flwr")
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=cfg.num_clients, backend_config=backend)
    skip_exit_collection()  # the run is saved and Ray is down: only the exit is left
    return 0


if __name__ == "__main__":
    sys.exit(main())
