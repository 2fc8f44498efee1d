"""Child process of ``fedtune simulate``: Flower's simulation engine, in-process.

Reads the resolved config from the environment (see ``common.runtime``); the parent
owns the process group and cleans it up.
"""

from __future__ import annotations

import os
import sys
import warnings

from common.runtime import config_from_run_config


def main() -> int:
    cfg = config_from_run_config({})
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import app as server_app

    cores = os.cpu_count() or 1
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
