#!/usr/bin/env python3
"""Submit the fedtune app to a SuperLink and exit with the run's outcome.

`flwr run --stream` streams the run's log but exits 0 whether the ServerApp finished
or failed, and starts the run whether or not the SuperNodes have connected. This
wrapper waits until --nodes SuperNodes are online (bounded by --wait), runs
`flwr run APP CONNECTION --stream`, then asks the SuperLink for the run's final status:
exit 0 only for finished:completed. Stdlib only; `flwr` must be on PATH.

    run-federation.py --nodes 2 --run-config "num-server-rounds=3 local-steps=6"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time


def _flwr_json(*args: str) -> dict:
    out = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True,
                         timeout=120)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {"success": False, "error": (out.stdout + out.stderr).strip()[-500:]}


def wait_for_nodes(connection: str, count: int, timeout: float) -> None:
    deadline, online, last_error = time.time() + timeout, 0, ""
    while True:
        reply = _flwr_json("supernode", "list", connection)
        online = sum(n.get("status") == "online" for n in reply.get("nodes", []))
        last_error = reply.get("error", last_error)
        if online >= count:
            print(f"run-federation: {online} SuperNode(s) online", flush=True)
            return
        if time.time() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            sys.exit(f"run-federation: {online} of {count} SuperNodes online after {timeout:.0f} s"
                     f"{detail}: check the SuperNodes' logs (TLS certificate, registered key, "
                     "address of the SuperLink)")
        time.sleep(3)


def run_status(connection: str, run_id: str) -> str:
    reply = _flwr_json("list", connection, "--run-id", run_id)
    runs = reply.get("runs") or [{}]
    return str(runs[0].get("status", f"unknown ({reply.get('error', reply)})"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default=os.environ.get("FEDTUNE_APP", "/app"),
                        help="the Flower App folder (default: /app in the image)")
    parser.add_argument("--connection", default="fedtune",
                        help="the SuperLink connection in $FLWR_HOME/config.toml")
    parser.add_argument("--nodes", type=int, default=int(os.environ.get("FEDTUNE_NODES", "2")),
                        help="SuperNodes to wait for before starting (default: $FEDTUNE_NODES or 2)")
    parser.add_argument("--wait", type=float, default=300.0,
                        help="seconds to wait for them (default: 300)")
    parser.add_argument("--run-config", default=os.environ.get("FEDTUNE_RUN_CONFIG", ""),
                        help="flwr run --run-config overrides (default: $FEDTUNE_RUN_CONFIG)")
    args = parser.parse_args(argv)

    wait_for_nodes(args.connection, args.nodes, args.wait)
    command = ["flwr", "run", args.app, args.connection, "--stream"]
    if args.run_config.strip():
        command += ["--run-config", args.run_config]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id = None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if run_id is None and (found := re.search(r"Successfully started run (\d+)", line)):
            run_id = found.group(1)
    if proc.wait() != 0 or run_id is None:
        print("run-federation: flwr run could not start the run", file=sys.stderr)
        return 1
    # The stream ends when the run ends; the status may lag by a moment.
    for _ in range(10):
        status = run_status(args.connection, run_id)
        if status.startswith("finished"):
            break
        time.sleep(2)
    print(f"run-federation: run {run_id} {status}", flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
