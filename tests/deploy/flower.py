"""Helpers for the deployment tests: a SuperLink, SuperNodes and `flwr` as separate
processes, the way docs/deployment.md runs them without Docker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONNECTION = "fedtune"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    return dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0",
                HF_HUB_OFFLINE="1", PATH=f"{BIN}:{os.environ['PATH']}",
                # else the SuperLink and SuperNodes `uv sync` the app (a CUDA torch)
                FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")


def write_connection(flwr_home: Path, address: str, ca: Path) -> None:
    """The `flwr` CLI's connection to our SuperLink, in $FLWR_HOME/config.toml."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\nroot-certificates = "{ca.resolve()}"\n')


class Processes:
    """Started processes, each in its own process group, all stopped at the end."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        # A SuperLink and a SuperNode each start a SuperExec child: stop the whole group.
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self.procs.values():  # children that outlived their parent
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def superlink_args(certs: Path, port: int, database: Path) -> list[str]:
    """``certs``: the superlink/ folder of scripts/make_certs.py."""
    return [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "superlink.crt"),
            "--ssl-keyfile", str(certs / "superlink.key"),
            "--enable-supernode-auth", "--database", str(database),
            "--disable-runtime-dependency-installation"]


def supernode_args(superlink: str, ca: Path, key: Path, node_config: str, port: int,
                   max_wait_time: int = 30) -> list[str]:
    # --max-retries/--max-wait-time: without them a SuperNode retries an unreachable
    # SuperLink forever; with them it exits non-zero with Flower's exit code 305 message.
    return [str(BIN / "flower-supernode"), "--superlink", superlink,
            "--root-certificates", str(ca), "--auth-supernode-private-key", str(key),
            "--node-config", node_config, "--port", str(port),
            "--max-retries", "5", "--max-wait-time", str(max_wait_time)]


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def online_nodes(env: dict[str, str]) -> int:
    out = subprocess.run([str(BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=60).stdout
    try:
        nodes = json.loads(out)["nodes"]
    except (ValueError, KeyError):
        return 0
    return sum(node["status"] == "online" for node in nodes)


def wait_online(env: dict[str, str], count: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if online_nodes(env) >= count:
            return
        time.sleep(2)
    raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")
